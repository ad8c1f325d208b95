//! Crash-safety helpers shared by the SIGKILL tests (tests/converge.rs, tests/reliability.rs,
//! tests/waypoint.rs): seeded kill points spread over a cold converge, one kill of a command at
//! such a point, the checks that a host is converged and that no file is torn (every JSON and
//! PEM file parses, no temporary file left), a summary of what a killed run left behind, the
//! reset of a simulated VM to a cold host, and [`Sigkill`], the whole campaign: a timed cold
//! run, then for each kill point a killed run, a run that must converge, and the checks.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use pilot_harness::Vm;
use serde_json::Value;

use crate::agent::{AGENT_TABLE, Agent, TLS_PORT, nft, snapshot};

/// SplitMix64: small, seedable, good enough to spread kill points and mutate inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n) (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The seed in environment variable `var` (to replay a run), else one from the clock.
pub fn seed_from_env(var: &str) -> Result<u64> {
    match std::env::var(var) {
        Ok(s) => s
            .parse()
            .with_context(|| format!("{var} must be an unsigned integer")),
        Err(_) => Ok(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)),
    }
}

/// `n` kill points within `span`: half of them uniform, one in each equal slice of `span` (the
/// whole converge, most of which is dockerd's restart and readiness wait), the other half
/// log-uniform, one in each slice of [1 ms, span] on a log scale (dense over the first tens of
/// milliseconds, where the table, the keys, the certificates and daemon.json are written).
/// Shuffled, so the VM's history does not line up with the kill point.
pub fn kill_points(rng: &mut Rng, n: usize, span: Duration) -> Vec<Duration> {
    let uniform = n.div_ceil(2);
    let log = n - uniform;
    let floor = Duration::from_millis(1).min(span);
    let ratio = span.as_secs_f64() / floor.as_secs_f64();
    let mut points: Vec<Duration> = (0..uniform)
        .map(|i| span.mul_f64((i as f64 + rng.unit()) / uniform as f64))
        .collect();
    for i in 0..log {
        let exponent = (i as f64 + rng.unit()) / log as f64;
        points.push(floor.mul_f64(ratio.powf(exponent)));
    }
    for i in (1..points.len()).rev() {
        points.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    points
}

/// Runs `openssl ARGS PATH`; returns stdout (fails on a non-zero exit).
pub fn openssl(args: &[&str], path: &Path) -> Result<String> {
    let out = Command::new("openssl").args(args).arg(path).output()?;
    ensure!(
        out.status.success(),
        "openssl {} {}: {}",
        args.join(" "),
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The agent's temporary files (`.NAME.pilot-agent-XXXX.tmp`, see agent/src/fsutil.rs).
pub fn is_temp_file(name: &str) -> bool {
    name.contains(".pilot-agent-") && name.ends_with(".tmp")
}

/// No file under `dir` is torn: no temporary file is left, every `*.json` parses as JSON,
/// every `*.pem` parses (openssl) as the certificate or key it claims to be, and the
/// `docker-applied` marker is a fingerprint. Returns how many files were checked.
pub fn check_no_torn_files(dir: &Path) -> Result<usize> {
    let files = snapshot(dir, &[])?;
    for (path, f) in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ensure!(
            !is_temp_file(&name),
            "temporary file left: {}",
            path.display()
        );
        if name.ends_with(".json") {
            serde_json::from_slice::<Value>(&f.content)
                .with_context(|| format!("{} is not JSON", path.display()))?;
        } else if name == "docker-applied" {
            let text = String::from_utf8_lossy(&f.content);
            ensure!(
                text.len() == 65
                    && text.ends_with('\n')
                    && text[..64].bytes().all(|b| b.is_ascii_hexdigit()),
                "{} is not a fingerprint: {text:?}",
                path.display()
            );
        } else if name.ends_with(".pem") {
            let text = String::from_utf8_lossy(&f.content);
            if text.contains("BEGIN CERTIFICATE") {
                openssl(&["x509", "-noout", "-in"], path)?;
            } else if text.contains("PRIVATE KEY") {
                openssl(&["pkey", "-noout", "-in"], path)?;
            } else {
                bail!("{} is neither a certificate nor a key", path.display());
            }
        }
    }
    Ok(files.len())
}

/// The host is converged: status done and healthy; no torn file (see
/// [`check_no_torn_files`]) under the state dir or next to daemon.json; the CA key matches
/// the CA; each leaf carries the CA, chains to it for its purpose and matches its key;
/// daemon.json asks for mutual TLS; the agent's table exists; the operator's `docker version`
/// works.
pub fn check_converged(vm: &Vm, agent: &Agent) -> Result<()> {
    let status = agent.status_json()?;
    ensure!(
        status["status"] == "done" && status["condition"] == "healthy",
        "status: {status}"
    );
    check_no_torn_files(agent.state_dir())?;
    for e in fs::read_dir(vm.dir())? {
        let name = e?.file_name().to_string_lossy().into_owned();
        ensure!(
            !is_temp_file(&name),
            "temporary file left next to daemon.json: {name}"
        );
    }
    let daemon: Value =
        serde_json::from_slice(&fs::read(vm.daemon_json())?).context("daemon.json is not JSON")?;
    ensure!(
        daemon["tlsverify"] == true
            && daemon["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().any(|x| x == &format!("tcp://0.0.0.0:{TLS_PORT}"))),
        "daemon.json does not configure mutual TLS: {daemon}"
    );
    check_pki(agent)?;
    nft(vm, &["list", "table", "inet", AGENT_TABLE]).context("the agent's table is missing")?;
    agent.operator_docker_version(vm)?;
    Ok(())
}

/// The CA certificate matches the CA key; each leaf (server, runner, operator) carries the CA,
/// verifies against it for its purpose and matches its key.
pub fn check_pki(agent: &Agent) -> Result<()> {
    let pki = agent.pki_dir();
    let ca = pki.join("ca/ca.pem");
    let pubkey_of_cert = |p: &Path| openssl(&["x509", "-noout", "-pubkey", "-in"], p);
    let pubkey_of_key = |p: &Path| openssl(&["pkey", "-pubout", "-in"], p);
    ensure!(
        pubkey_of_cert(&ca)? == pubkey_of_key(&pki.join("ca/ca-key.pem"))?,
        "the CA certificate does not match the CA key"
    );
    let ca_bytes = fs::read(&ca)?;
    for (leaf, purpose) in [
        ("server", "sslserver"),
        ("runner", "sslclient"),
        ("operator", "sslclient"),
    ] {
        let dir = pki.join(leaf);
        ensure!(
            fs::read(dir.join("ca.pem"))? == ca_bytes,
            "{leaf}/ca.pem is not the CA certificate"
        );
        let out = Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(&ca)
            .arg(dir.join("cert.pem"))
            .output()?;
        ensure!(
            out.status.success(),
            "{leaf}/cert.pem does not verify against the CA for {purpose}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            pubkey_of_cert(&dir.join("cert.pem"))? == pubkey_of_key(&dir.join("key.pem"))?,
            "{leaf}/cert.pem does not match {leaf}/key.pem"
        );
    }
    Ok(())
}

/// What a killed run left behind, in a few words (for the report).
pub fn leftover_state(vm: &Vm, agent: &Agent, original_daemon_json: &[u8]) -> String {
    let pki = agent.pki_dir();
    let certs: Vec<&str> = ["ca/ca", "server/cert", "runner/cert", "operator/cert"]
        .into_iter()
        .filter(|c| pki.join(format!("{c}.pem")).exists())
        .collect();
    let daemon = match fs::read(vm.daemon_json()) {
        Ok(b) if b == original_daemon_json => "original",
        Ok(_) => "rewritten",
        Err(_) => "absent",
    };
    let table = nft(vm, &["list", "table", "inet", AGENT_TABLE]).is_ok();
    let applied = agent.state_dir().join("docker-applied").exists();
    format!(
        "table {}, certs [{}], daemon.json {daemon}, docker-applied {}",
        if table { "yes" } else { "no" },
        certs.join(" "),
        if applied { "yes" } else { "no" }
    )
}

/// Back to a cold host: no agent table, no state, the original daemon.json, dockerd
/// restarted with it (waiting out any restart a killed run left running: dockerd-ctl
/// serializes them).
pub fn reset_cold(vm: &Vm, agent: &Agent, original_daemon_json: &[u8]) -> Result<()> {
    let _ = nft(vm, &["delete", "table", "inet", AGENT_TABLE]);
    if agent.state_dir().exists() {
        fs::remove_dir_all(agent.state_dir())?;
    }
    fs::write(vm.daemon_json(), original_daemon_json)?;
    vm.restart_dockerd()?;
    Ok(())
}

/// The steps status.json says are running (what a kill interrupted), by name.
pub fn running_steps(status: &Value) -> Vec<String> {
    status["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["state"] == "running")
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect()
}

/// Lets `child` run for `delay`, then SIGKILLs it if it still runs, and reaps it. Returns
/// whether the kill landed (false: the child had finished by itself).
pub fn kill_after(mut child: Child, delay: Duration) -> Result<bool> {
    // The kill point itself: a deliberate random delay, not a wait for a condition.
    std::thread::sleep(delay);
    let killed = match child.try_wait()? {
        Some(_) => false,
        None => {
            child.kill()?;
            true
        }
    };
    child.wait()?;
    Ok(killed)
}

/// A seeded SIGKILL campaign against `pilot-agent ARGS` on a cold host. A cold run is timed
/// (it must exit 0 and pass the checks) and the host reset; then [`kill_points`] spread over
/// 1.1 times that run (the count from `count_var`, the seed from `seed_var`, both printed) are
/// visited in turn (this part's share of them): the command is started and SIGKILLed at the
/// point, then run again, and that run must exit 0, leave the host converged
/// ([`check_converged`]), pass `check`, and keep every file under the `kept` directories of
/// the state dir that the killed run left (every file is written whole, so whatever key or
/// certificate it left is good and must not be regenerated); then the host is reset with
/// `reset` (given the original daemon.json). At least one kill must land mid-run.
pub struct Sigkill<'a> {
    /// Prefix of every line printed ("converge", "reliability").
    pub label: &'a str,
    pub vm: &'a Vm,
    pub agent: &'a Agent,
    /// The agent's arguments, killed and then run again (`&["up"]`).
    pub args: &'a [&'a str],
    /// The environment variable whose value replays a run's seed.
    pub seed_var: &'a str,
    /// The environment variable with the number of kill points, and its default.
    pub count_var: &'a str,
    pub default_count: usize,
    /// This run visits the points `i` with `i % parts == part` (a campaign split over VMs,
    /// all parts drawing from one seed); `0` of `1` for all of them.
    pub part: usize,
    pub parts: usize,
    /// Top-level directories of the state dir whose files (temporary ones aside) the next run
    /// must keep byte for byte once a killed run wrote them.
    pub kept: &'a [&'a str],
    /// More checks of a converged host, after the cold run and after every recovery.
    pub check: &'a dyn Fn() -> Result<()>,
    /// Back to a cold host, given the original daemon.json.
    pub reset: &'a dyn Fn(&[u8]) -> Result<()>,
}

impl Sigkill<'_> {
    /// Runs the campaign; prints the plan, one line per kill and a summary.
    pub fn run(&self) -> Result<()> {
        let t0 = Instant::now();
        let (vm, agent, label, seed_var) = (self.vm, self.agent, self.label, self.seed_var);
        let cmd = self.args.join(" ");
        let original = fs::read(vm.daemon_json())?;
        let seed = seed_from_env(seed_var)?;
        let total: usize = match std::env::var(self.count_var) {
            Ok(s) => s
                .parse()
                .with_context(|| format!("{} must be a count", self.count_var))?,
            Err(_) => self.default_count,
        };
        let parts = self.parts.max(1);
        ensure!(
            total >= parts,
            "{} must be at least {parts}",
            self.count_var
        );
        let part_note = if parts > 1 {
            format!(" (part {} of {parts})", self.part)
        } else {
            String::new()
        };

        // A cold run, timed: the kill points are spread over it.
        let (out, cold) = agent.run(vm, self.args)?;
        ensure!(
            out.status.success(),
            "pilot-agent {cmd} exited {} after {cold:?}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        check_converged(vm, agent)?;
        (self.check)()?;
        (self.reset)(&original)?;
        let span = cold.mul_f64(1.1);
        let mut rng = Rng(seed);
        let mine: Vec<(usize, Duration)> = kill_points(&mut rng, total, span)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % parts == self.part)
            .collect();
        eprintln!(
            "{label}: cold {cmd} took {cold:?}; {} of {total} SIGKILLs at random points within \
             {span:?}{part_note} (seed {seed}; replay with {seed_var}={seed})",
            mine.len()
        );

        let mut landed = 0;
        for &(i, delay) in &mine {
            let log = vm
                .dir()
                .join(format!("killed-{}-{i}.log", self.args.join("-")));
            let child = agent
                .cmd(vm, self.args)
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log)?)
                .spawn()
                .with_context(|| format!("cannot start pilot-agent {cmd}"))?;
            let killed = kill_after(child, delay)?;
            landed += usize::from(killed);
            let left = leftover_state(vm, agent, &original);
            let running = agent
                .status_json()
                .map(|s| running_steps(&s))
                .unwrap_or_default();
            let context = || {
                format!(
                    "kill {i}: SIGKILL after {delay:?} (seed {seed}, replay with \
                     {seed_var}={seed}); the killed run left: {left}; running: {running:?}"
                )
            };
            let before = self.kept_files()?;

            let (out, took) = agent.run(vm, self.args)?;
            ensure!(
                out.status.success(),
                "{}\n{cmd} after the kill exited {}:\n{}",
                context(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            check_converged(vm, agent).with_context(context)?;
            (self.check)().with_context(context)?;
            let state = agent.state_dir();
            for (rel, content) in &before {
                let now = fs::read(state.join(rel)).ok();
                ensure!(
                    now.as_deref() == Some(content.as_slice()),
                    "{}\n{} was {} by the next {cmd}",
                    context(),
                    rel.display(),
                    if now.is_some() { "replaced" } else { "removed" }
                );
            }
            eprintln!(
                "{label}: kill {i:>2} at {:>7.1} ms: {} (running: {running:?}) -> left {left}; \
                 {} kept files unchanged; next {cmd} exit 0 in {took:.2?}, converged",
                delay.as_secs_f64() * 1000.0,
                if killed { "killed" } else { "had finished" },
                before.len(),
            );
            (self.reset)(&original)?;
        }
        ensure!(
            landed > 0,
            "no SIGKILL landed while {cmd} was running (all {} runs had finished)",
            mine.len()
        );
        eprintln!(
            "{label}: {landed} of {} SIGKILLs landed mid-run{part_note}; every following {cmd} \
             converged, passed the checks, kept the files it had to and left no torn file \
             ({:?} in all)",
            mine.len(),
            t0.elapsed()
        );
        Ok(())
    }

    /// The files under the `kept` directories of the state dir (relative paths) and their
    /// content, temporary files aside (a half-written one is the one thing the next run must
    /// NOT keep: it is removed, and [`check_converged`] asserts none is left).
    fn kept_files(&self) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
        let state = self.agent.state_dir();
        if !state.exists() {
            return Ok(BTreeMap::new());
        }
        Ok(snapshot(state, &[])?
            .into_iter()
            .filter_map(|(p, f)| {
                let rel = p.strip_prefix(state).ok()?.to_path_buf();
                let top = rel.components().next()?.as_os_str().to_str()?.to_string();
                let temp = rel
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_temp_file);
                (self.kept.contains(&top.as_str()) && !temp).then_some((rel, f.content))
            })
            .collect())
    }
}
