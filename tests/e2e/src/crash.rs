//! Crash-safety helpers shared by the SIGKILL tests (tests/converge.rs, tests/reliability.rs):
//! seeded kill points spread over a cold converge, the checks that a host is converged and
//! that no file is torn (every JSON and PEM file parses, no temporary file left), a summary of
//! what a killed run left behind, and the reset of a simulated VM to a cold host.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// The agent's status.json, parsed.
pub fn status_json(agent: &Agent) -> Result<Value> {
    let p = agent.status_path();
    let text = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON: {text}", p.display()))
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
    let status = status_json(agent)?;
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
