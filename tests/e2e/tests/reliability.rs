//! Reliability suite: attack, crash, outage, full disk and bad input, each with
//! counts printed (`--no-capture` shows them). Every test needs root and a machine prepared by
//! scripts/setup.sh, and FAILS without them.
//!
//! - `teamtnt_attack_never_succeeds`: an attacker in the VM's outside namespace (routed to the
//!   VM, and an allowed source of 2376, so the TLS handshake is reached) replays the TeamTNT
//!   attack, `POST /containers/create` with `HostConfig.Binds ["/:/host"]` and `Privileged`
//!   then `POST /containers/{id}/start`, against 2375 and 2376, each in plain HTTP and in TLS
//!   without a client certificate.
//!   - control: against the original Pilot's daemon.json (`tcp://0.0.0.0:2375`) the attack
//!     succeeds and the container writes into the host's file system: the attacker code can
//!     succeed. Not counted below.
//!   - before: the VM as it boots from a Pilot image, before the agent's `up`: Debian's
//!     dockerd listens on its unix socket only, so on a real VM nothing answers on 2375 or
//!     2376 (the harness's converge suite puts socat on 2375 from the start, which no real VM
//!     has). Then the boot unit `pilot-agent firewall` runs and a rogue plain listener (socat
//!     to the socket: "something else opens 2375") is started, and the attack goes on.
//!   - during: throughout a cold `up` (the rogue listener still there).
//!   - after: once `up` exited 0.
//!
//!   Zero API answers, creations and starts in every phase; afterwards no container with the
//!   host's root bound exists and the control's marker was written exactly once.
//! - `sigkill_30_points_{a,b,c}`: `up` of a cold host with the Waypoint stand-in and
//!   PostgreSQL SIGKILLed at PILOT_REL_KILLS (default 30) seeded random points, split over
//!   three VMs (seed printed; PILOT_REL_SEED replays), then `up` again: it converges
//!   every time, with one server, the runners and no bootstrap container (no duplicates),
//!   every key, certificate, token and the database password the killed run left unchanged,
//!   one bootstrap whose token is the stored one, the application role logging in with the
//!   stored password, and no torn file (every JSON and PEM parses, no temporary file left).
//! - `database_outage_at_boot_then_dockerd_restart`: the database link cut before the first
//!   `up`: exit 2, degraded, the database step names the database; dockerd restarted and the
//!   link restored: `up` exits 0, done, no duplicate container, the role logs in.
//! - `full_state_filesystem_keeps_previous_state`: the state directory on a 512 KiB tmpfs,
//!   filled up after a converge: `up` (warm, and asked to re-issue the server certificate)
//!   exits non-zero with an error naming the lack of space, and every file of the previous
//!   state is byte-identical and parses; `status` still reads it; space back: `up` converges.
//! - `malformed_configs_and_status_files_never_panic`: seeded random mutations of
//!   agent/examples/agent.yaml, truncations, binary garbage, huge files and deep nesting for
//!   `config validate` (and `up` on those that are invalid by construction); malformed
//!   status.json files for `status` (plain, --json, --long, --wait): exit 0/1/2 only (never
//!   101 or a signal), never "panicked" on stderr, and an error (exit 1) that names the file
//!   for what cannot be read.
//!
//! Run: `cargo build --release --workspace && cargo nextest run --release -p pilot-e2e --test
//! reliability --no-capture`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_e2e::agent::{Agent, PLAIN_PORT, TLS_PORT, snapshot, snapshot_diff};
use pilot_e2e::crash::{Rng, Sigkill, check_converged, check_no_torn_files, seed_from_env};
use pilot_e2e::stack::Stack;
use pilot_e2e::{phase, step_state};
use pilot_harness::{Vm, VmOptions, require_root, target_bin};
use serde_json::{Value, json};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The TeamTNT attack

/// The image the attacker names: TeamTNT used `alpine`; here Debian's busybox imported as it.
const ATTACK_IMAGE: &str = "alpine:latest";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Wire {
    /// HTTP straight on TCP.
    Plain,
    /// HTTPS without a client certificate, not verifying the server (curl -k).
    TlsNoCert,
}

/// What one attack attempt achieved.
#[derive(Debug, Default, Clone)]
struct Outcome {
    connected: bool,
    /// A Docker API answer (an `Api-Version` header) came back.
    api: bool,
    created: bool,
    started: bool,
    /// The start request's status and body, when one was sent (for the control's report).
    start_reply: Option<(u16, String)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    attempts: usize,
    connected: usize,
    api: usize,
    created: usize,
    started: usize,
}

impl Tally {
    fn add(&mut self, o: &Outcome) {
        self.attempts += 1;
        self.connected += usize::from(o.connected);
        self.api += usize::from(o.api);
        self.created += usize::from(o.created);
        self.started += usize::from(o.started);
    }
    fn successes(&self) -> usize {
        self.api + self.created + self.started
    }
}

/// The create request's body: the host's root bound at /host, privileged, and a command that
/// appends a line to `marker` (a path on the host) through that bind, proving the takeover.
fn attack_body(marker: &Path) -> String {
    attack_body_with(marker, true)
}

fn attack_body_with(marker: &Path, privileged: bool) -> String {
    json!({
        "Image": ATTACK_IMAGE,
        "Cmd": ["/bin/sh", "-c", format!("echo pwned >> /host{}", marker.display())],
        "HostConfig": { "Binds": ["/:/host"], "Privileged": privileged },
    })
    .to_string()
}

/// An HTTP/1.0 exchange on a fresh TCP connection: (connected, status, has Api-Version, body).
fn http_exchange(addr: SocketAddr, request: &str) -> (bool, u16, bool, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(250)) else {
        return (false, 0, false, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    if s.write_all(request.as_bytes()).is_err() {
        return (true, 0, false, String::new());
    }
    let mut buf = Vec::new();
    // Until EOF or the timeout; what arrived before an error is kept in `buf`.
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let api = head.to_ascii_lowercase().contains("\napi-version:");
    (true, code, api, body.to_string())
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.0\r\nHost: docker\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn created_id(body: &str) -> Option<String> {
    serde_json::from_str::<Value>(body.trim())
        .ok()?
        .get("Id")?
        .as_str()
        .map(str::to_string)
}

/// The attack through `exchange(PATH, BODY) -> (connected, status, has Api-Version, body)`:
/// the create request, then the start of what it created.
fn attack(exchange: impl Fn(&str, &str) -> (bool, u16, bool, String), body: &str) -> Outcome {
    let (connected, code, api, reply) = exchange("/containers/create", body);
    let mut o = Outcome {
        connected,
        api,
        ..Outcome::default()
    };
    if code == 201
        && let Some(id) = created_id(&reply)
    {
        o.created = true;
        let (_, code, _, reply) = exchange(&format!("/containers/{id}/start"), "");
        o.started = code == 204;
        o.start_reply = Some((code, reply));
    }
    o
}

/// The attack in plain HTTP (call from a thread in the attacker's namespace).
fn plain_attack(addr: SocketAddr, body: &str) -> Outcome {
    attack(|path, body| http_exchange(addr, &post(path, body)), body)
}

/// One curl from the attacker's namespace: TLS without a client certificate, server not
/// verified. Returns (connected, status, has Api-Version, body).
fn curl_tls(vm: &Vm, url: &str, body: &str) -> (bool, u16, bool, String) {
    let out = vm
        .outside_cmd("curl")
        .args(["-sk", "--connect-timeout", "0.25", "--max-time", "2", "-i"])
        .args(["-X", "POST", "-H", "Content-Type: application/json"])
        .args(["--data-binary", body])
        .args(["-w", "\n%{http_code} %{time_connect}"])
        .arg(url)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else {
        return (false, 0, false, String::new());
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (reply, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut f = last.split_whitespace();
    let code = f.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let connected = f
        .next()
        .and_then(|t| t.parse::<f64>().ok())
        .is_some_and(|t| t > 0.0);
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((reply, ""));
    let api = head.to_ascii_lowercase().contains("\napi-version:");
    (connected, code, api, body.to_string())
}

fn tls_attack(vm: &Vm, port: u16, body: &str) -> Outcome {
    let base = format!("https://{}:{port}", vm.addr());
    attack(
        |path, body| curl_tls(vm, &format!("{base}{path}"), body),
        body,
    )
}

type Tallies = Mutex<BTreeMap<(&'static str, u16, Wire), Tally>>;

/// Attacks every (port, wire) pair from the outside namespace, round after round, until `stop`
/// is set (and at least one round ran), recording under `phase`.
fn attack_until(vm: &Vm, phase: &'static str, body: &str, stop: &AtomicBool, tallies: &Tallies) {
    let addr = |port| SocketAddr::from((vm.addr(), port));
    let record = |port, wire, o| {
        if let Ok(mut t) = tallies.lock() {
            t.entry((phase, port, wire)).or_default().add(&o);
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = vm.in_outside_ns(|| {
                loop {
                    for port in [PLAIN_PORT, TLS_PORT] {
                        record(port, Wire::Plain, plain_attack(addr(port), body));
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            });
        });
        s.spawn(|| {
            loop {
                for port in [PLAIN_PORT, TLS_PORT] {
                    record(port, Wire::TlsNoCert, tls_attack(vm, port, body));
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        });
    });
}

/// Attacks for `dur`.
fn attack_for(vm: &Vm, phase: &'static str, body: &str, dur: Duration, tallies: &Tallies) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| attack_until(vm, phase, body, &stop, tallies));
        // The phase's length is the point here: attack for this long, then stop.
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
    });
}

/// IDs of containers (any state) that bind the host's root.
fn host_root_containers(vm: &Vm) -> Result<Vec<String>> {
    let ids = vm.docker_ok(["ps", "-aq", "--no-trunc"])?;
    let mut found = Vec::new();
    for id in ids.lines().filter(|l| !l.is_empty()) {
        let binds = vm.docker_ok(["inspect", "-f", "{{json .HostConfig.Binds}}", id])?;
        if binds.contains("\"/:/host\"") {
            found.push(id.to_string());
        }
    }
    Ok(found)
}

/// The attack phases, in order (the tallies' first key).
const ATTACK_PHASES: [&str; 4] = [
    "1 before: nothing listens",
    "2 before: firewall + rogue 2375",
    "3 during up",
    "4 after up",
];

#[test]
fn teamtnt_attack_never_succeeds() -> Result<()> {
    let t = phase("setup", setup_attack)?;
    phase("control: the original Pilot's plain 2375", || {
        control_attack_succeeds(&t)
    })?;
    let tallies = phase("attack before, during and after up", || attack_phases(&t))?;
    phase("no attack succeeded", || {
        check_no_attack_succeeded(&t, &tallies)
    })?;
    t.vm.cleanup()
}

/// A VM with the attacker's image, the marker the attack's container would write on the
/// host, the attack's body and the original daemon.json.
struct AttackVm {
    agent: Agent,
    marker: PathBuf,
    body: String,
    original: Vec<u8>,
    vm: Vm,
}

fn setup_attack() -> Result<AttackVm> {
    require_root()?;
    let vm = Vm::start(VmOptions::default())?;
    let agent = Agent::new(&vm)?;
    vm.import_busybox(ATTACK_IMAGE)?;
    let marker = vm.dir().join("pwned-by-attacker");
    let body = attack_body(&marker);
    let original = fs::read(vm.daemon_json())?;
    Ok(AttackVm {
        agent,
        marker,
        body,
        original,
        vm,
    })
}

/// Control: the original Pilot's cloud-init daemon.json (src/util/templates.ts of
/// pilot-framework/pilot-cli): hosts tcp://0.0.0.0:2375 and the socket, then a restart. The
/// attack succeeds and its container writes the marker on the host; then the VM is put back.
fn control_attack_succeeds(t: &AttackVm) -> Result<()> {
    let (vm, marker, body) = (&t.vm, &t.marker, &t.body);
    let mut pilot: Value = serde_json::from_slice(&t.original)?;
    pilot["hosts"] = json!([vm.docker_host(), format!("tcp://0.0.0.0:{PLAIN_PORT}")]);
    pilot["log-driver"] = json!("json-file");
    pilot["log-opts"] = json!({"max-size": "200m", "max-file": "3"});
    vm.write_daemon_json(&pilot)?;
    vm.restart_dockerd()?;
    let plain_2375 = SocketAddr::from((vm.addr(), PLAIN_PORT));
    let control = vm.in_outside_ns(|| plain_attack(plain_2375, body))?;
    ensure!(
        control.api && control.created,
        "control: the original Pilot's plain 2375 should accept the attack: {control:?}"
    );
    // This machine is itself a guest whose capability set runc cannot grant a privileged
    // container ("unable to apply caps"): dockerd accepted the request, the kernel here
    // refused the capabilities. The takeover itself needs only the bind, so the control then
    // proves it without `Privileged`.
    let mut how = "privileged";
    if !control.started {
        how = "unprivileged: this machine refuses a privileged container's capabilities";
        let unprivileged = attack_body_with(marker, false);
        let second = vm.in_outside_ns(|| plain_attack(plain_2375, &unprivileged))?;
        ensure!(
            second.api && second.created && second.started,
            "control: the attack without Privileged should start: {second:?} (the privileged \
             one: {control:?})"
        );
    }
    let wrote = pilot_e2e::poll(Duration::from_secs(10), "the control's marker", || {
        Ok(fs::read_to_string(marker)
            .ok()
            .filter(|t| t.contains("pwned")))
    })?;
    ensure!(wrote.lines().count() == 1, "control marker: {wrote:?}");
    for id in host_root_containers(vm)? {
        vm.docker_ok(["rm", "-f", &id])?;
    }
    fs::write(vm.daemon_json(), &t.original)?;
    vm.restart_dockerd()?;
    eprintln!(
        "reliability: control: against the original Pilot's daemon.json (plain 2375) the attack \
         created a privileged container binding / and started one ({how}) that wrote {} on \
         the host",
        marker.display()
    );
    Ok(())
}

/// The attack in each of [`ATTACK_PHASES`]: as a Pilot VM boots (dockerd on its unix socket
/// only); after the boot unit `pilot-agent firewall` and with a rogue plain listener on 2375;
/// during a cold `up`; after it.
fn attack_phases(t: &AttackVm) -> Result<BTreeMap<(&'static str, u16, Wire), Tally>> {
    let (vm, agent, body) = (&t.vm, &t.agent, &t.body);
    let [before, rogue, during, after] = ATTACK_PHASES;
    let tallies: Tallies = Mutex::new(BTreeMap::new());
    // Before, as a Pilot VM boots: dockerd on its unix socket only.
    attack_for(vm, before, body, Duration::from_secs(1), &tallies);
    // The boot unit, then a rogue plain listener on 2375.
    let (fw, _) = agent.run(vm, ["firewall"])?;
    ensure!(fw.status.success(), "pilot-agent firewall: {}", stderr(&fw));
    vm.start_socat(
        PLAIN_PORT,
        &format!("UNIX-CONNECT:{}", vm.docker_socket().display()),
    )?;
    attack_for(vm, rogue, body, Duration::from_secs(1), &tallies);

    // During a cold `up`.
    let stop = AtomicBool::new(false);
    let up = std::thread::scope(|s| {
        s.spawn(|| attack_until(vm, during, body, &stop, &tallies));
        let up = agent.run(vm, ["up"]);
        stop.store(true, Ordering::Relaxed);
        up
    })?;
    ensure!(
        up.0.status.success(),
        "up under attack exited {}:\n{}",
        up.0.status,
        stderr(&up.0)
    );
    attack_for(vm, after, body, Duration::from_secs(1), &tallies);
    check_converged(vm, agent)?;
    tallies
        .into_inner()
        .map_err(|_| anyhow::anyhow!("tally poisoned"))
}

/// Zero API answers, creations and starts in every phase (each port and wire attempted); no
/// container with the host's root bound; the control's marker written exactly once; the rogue
/// listener still answering on loopback.
fn check_no_attack_succeeded(
    t: &AttackVm,
    tallies: &BTreeMap<(&'static str, u16, Wire), Tally>,
) -> Result<()> {
    let vm = &t.vm;
    eprintln!(
        "reliability: TeamTNT replay from {} (outside namespace):",
        vm.outside_addr()
    );
    eprintln!(
        "  {:<34} {:>5} {:<10} {:>8} {:>9} {:>4} {:>7} {:>7}",
        "phase", "port", "wire", "attempts", "connected", "api", "created", "started"
    );
    let mut attempts = 0;
    let mut successes = 0;
    for ((phase, port, wire), tally) in tallies {
        eprintln!(
            "  {phase:<34} {port:>5} {:<10} {:>8} {:>9} {:>4} {:>7} {:>7}",
            format!("{wire:?}"),
            tally.attempts,
            tally.connected,
            tally.api,
            tally.created,
            tally.started
        );
        attempts += tally.attempts;
        successes += tally.successes();
    }
    eprintln!("reliability: {attempts} attack attempts, {successes} successes");
    for phase in ATTACK_PHASES {
        for port in [PLAIN_PORT, TLS_PORT] {
            for wire in [Wire::Plain, Wire::TlsNoCert] {
                ensure!(
                    tallies
                        .get(&(phase, port, wire))
                        .is_some_and(|tally| tally.attempts > 0),
                    "no {wire:?} attempt on {port} in phase {phase:?}"
                );
            }
        }
    }
    ensure!(successes == 0, "the attack succeeded: {tallies:#?}");
    let left = host_root_containers(vm)?;
    ensure!(
        left.is_empty(),
        "containers with the host's root bound: {left:?}"
    );
    let marks = fs::read_to_string(&t.marker)?;
    ensure!(
        marks.lines().count() == 1,
        "the marker was written again after the control: {marks:?}"
    );
    // The rogue listener still works on loopback inside the VM: the lock, not its absence,
    // kept the attacker out.
    let (_, code, api, _) = vm.in_vm_ns(|| {
        http_exchange(
            SocketAddr::from(([127, 0, 0, 1], PLAIN_PORT)),
            "GET /_ping HTTP/1.0\r\n\r\n",
        )
    })?;
    ensure!(
        code == 200 && api,
        "the rogue listener does not answer on loopback ({code})"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SIGKILL at random points of a cold converge (Waypoint stand-in and PostgreSQL on)

/// Waypoint runners in the kill test.
const KILL_RUNNERS: u32 = 1;

/// Kills the points `i % parts == part` of PILOT_REL_KILLS points; all parts draw from one seed.
fn sigkill_part(part: usize, parts: usize) -> Result<()> {
    let stack = Stack::start(true, KILL_RUNNERS)?;
    let check = || -> Result<()> {
        stack.check_containers()?;
        let stored = stack.read_secret("waypoint/bootstrap-token")?;
        let issued = stack.bootstrap_tokens()?;
        ensure!(
            issued == vec![stored],
            "the server issued {} bootstrap token(s), or the stored one is not its",
            issued.len()
        );
        stack.app_login()
    };
    Sigkill {
        label: "reliability",
        vm: &stack.vm,
        agent: &stack.agent,
        args: &["up"],
        seed_var: "PILOT_REL_SEED",
        count_var: "PILOT_REL_KILLS",
        default_count: 30,
        part,
        parts,
        // Every key and certificate, the Waypoint tokens, the database password.
        kept: &["pki", "waypoint", "database"],
        check: &check,
        reset: &|original| stack.reset_cold(original),
    }
    .run()?;
    stack.cleanup()
}

// Three parts of 10 (of the default 30) on three VMs: each stays well inside nextest's
// per-test limit, and CI's two test threads run them beside the shorter tests.
#[test]
fn sigkill_30_points_a() -> Result<()> {
    sigkill_part(0, 3)
}

#[test]
fn sigkill_30_points_b() -> Result<()> {
    sigkill_part(1, 3)
}

#[test]
fn sigkill_30_points_c() -> Result<()> {
    sigkill_part(2, 3)
}

// ---------------------------------------------------------------------------------------------
// Database outage at boot, dockerd restarted between runs

#[test]
fn database_outage_at_boot_then_dockerd_restart() -> Result<()> {
    let stack = Stack::start(true, 1)?;
    let (vm, agent) = (&stack.vm, &stack.agent);
    let pg = stack.pg.as_ref().context("no database")?;
    pg.cut_link()?;
    let (out, took) = agent.run(vm, ["up"])?;
    ensure!(
        out.status.code() == Some(2),
        "up with the database cut off exited {} (want 2, degraded):\n{}",
        out.status,
        stderr(&out)
    );
    let status = agent.status_json()?;
    let (state, detail) = step_state(&status, "database")?;
    let target = format!("{}:{}", pg.addr(), pg.port());
    ensure!(
        status["status"] == "done"
            && status["condition"] == "degraded"
            && state == "degraded"
            && detail.contains("database")
            && detail.contains(&target),
        "with the database cut off: status {} / {}, database step {state}: {detail}",
        status["status"],
        status["condition"]
    );
    let (st, _) = agent.run(vm, ["status"])?;
    ensure!(
        st.status.code() == Some(2),
        "status exited {} (want 2)",
        st.status
    );
    stack.check_containers()?;
    eprintln!("reliability: database cut off at boot: up exit 2 in {took:.2?}; database: {detail}");

    let restart = vm.restart_dockerd()?;
    pg.restore_link()?;
    let (out, took) = agent.run(vm, ["up"])?;
    ensure!(
        out.status.success(),
        "up after dockerd's restart and the database's return exited {}:\n{}",
        out.status,
        stderr(&out)
    );
    check_converged(vm, agent)?;
    stack.check_containers()?;
    stack.wait_server(Duration::from_secs(20))?;
    stack.app_login()?;
    let (state, detail) = step_state(&agent.status_json()?, "database")?;
    ensure!(state == "changed", "database: {state}: {detail}");
    let (st, _) = agent.run(vm, ["status"])?;
    ensure!(st.status.success(), "status exited {} (want 0)", st.status);
    eprintln!(
        "reliability: dockerd restarted ({restart:.2?}), database back: up exit 0 in \
         {took:.2?}, done and healthy, one server and runner, role logs in"
    );
    stack.cleanup()
}

// ---------------------------------------------------------------------------------------------
// State directory on a tiny, full file system

#[test]
fn full_state_filesystem_keeps_previous_state() -> Result<()> {
    require_root()?;
    let vm = Vm::start(VmOptions::default())?;
    let agent = Agent::new(&vm)?;
    let mount = pilot_e2e::TmpfsMount::new(agent.state_dir(), "512k")?;
    agent.up_ok(&vm)?;
    check_converged(&vm, &agent)?;
    let before = snapshot(agent.state_dir(), &[])?;
    let filler = pilot_e2e::fill(agent.state_dir())?;
    let df = Command::new("df").arg(agent.state_dir()).output()?;
    eprintln!(
        "reliability: state dir on a 512 KiB tmpfs, {} files, filled with {filler} bytes:\n{}",
        before.len(),
        String::from_utf8_lossy(&df.stdout).trim()
    );
    let filler_path = agent.state_dir().join("filler");
    let unchanged = |what: &str| -> Result<()> {
        let mut now = snapshot(agent.state_dir(), &[])?;
        now.remove(&filler_path);
        let diff = snapshot_diff(&before, &now);
        ensure!(
            diff.is_empty(),
            "{what}: the previous state changed:\n{}",
            diff.join("\n")
        );
        check_no_torn_files(agent.state_dir()).with_context(|| what.to_string())?;
        Ok(())
    };

    // A warm `up` (only status.json to write), then one that must re-issue the server
    // certificate (a new name).
    let extra = vm.dir().join("agent-extra-name.yaml");
    fs::write(
        &extra,
        fs::read_to_string(agent.config_path())? + "host:\n  extra_names: [full-disk.example]\n",
    )?;
    for (what, a) in [
        ("warm up on a full disk", agent.clone()),
        ("re-issuing up on a full disk", agent.with_config(&extra)),
    ] {
        let (out, _) = a.run(&vm, ["up"])?;
        let err = stderr(&out);
        ensure!(
            !out.status.success() && out.status.code() != Some(101) && out.status.code().is_some(),
            "{what}: up exited {}:\n{err}",
            out.status
        );
        ensure!(!err.contains("panicked"), "{what}: panic:\n{err}");
        ensure!(
            err.contains("No space left on device"),
            "{what}: the error does not say the disk is full:\n{err}"
        );
        unchanged(what)?;
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        eprintln!("reliability: {what}: exit {}; {last}", out.status);
    }
    let (st, _) = agent.run(&vm, ["status", "--json"])?;
    ensure!(
        st.status.code().is_some_and(|c| c <= 2)
            && serde_json::from_slice::<Value>(&st.stdout).is_ok(),
        "status on a full disk: {} {}",
        st.status,
        stderr(&st)
    );
    // Space back: the re-issuing configuration converges.
    fs::remove_file(&filler_path)?;
    agent.with_config(&extra).up_ok(&vm)?;
    let cert = pilot_e2e::crash::openssl(
        &["x509", "-noout", "-ext", "subjectAltName", "-in"],
        &agent.pki_dir().join("server/cert.pem"),
    )?;
    ensure!(
        cert.contains("full-disk.example"),
        "server cert SANs: {cert}"
    );
    check_converged(&vm, &agent)?;
    eprintln!("reliability: space back: up converged, the server certificate has the new name");
    drop(mount);
    vm.cleanup()
}

// ---------------------------------------------------------------------------------------------
// Malformed configurations and status files

/// A run of the agent binary outside any VM, killed if it outlives `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("PILOT_AGENT_CONFIG")
        .spawn()?;
    let deadline = Instant::now() + limit;
    // Drain the pipes on threads, so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let o = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let e = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
    })
}

/// Never a panic nor a crash: an exit code of 0, 1 or 2 and no "panicked" on stderr.
fn no_panic(what: &str, out: &Output) -> Result<i32> {
    let err = stderr(out);
    let code = out.status.code();
    ensure!(
        !err.contains("panicked") && matches!(code, Some(0..=2)),
        "{what}: exit {} (101 is a panic, none a signal):\n{}",
        out.status,
        err.chars().take(2000).collect::<String>()
    );
    Ok(code.unwrap_or(-1))
}

/// One random change to YAML text.
fn mutate(rng: &mut Rng, text: &str) -> Vec<u8> {
    const SPECIAL: &[&str] = &[
        ":", "-", "[", "]", "{", "}", "\"", "'", "&a", "*a", "!!binary", "|", ">", "%YAML", "@",
        "\t", "\n", "\0", "#", ",", "? ", "---", "...", "<<: *a", "\\", "\u{feff}", "\u{202e}",
    ];
    const SCALARS: &[&str] = &[
        "99999999999999999999999",
        "-1",
        "0",
        "1e400",
        ".nan",
        "~",
        "null",
        "true",
        "[]",
        "{}",
        "\"\"",
        "0x10",
        "0o7",
        "[1, [2, [3]]]",
        "{a: 1}",
        "\"unterminated",
        "- x",
        "2376:2375",
        "300.5.1.1/33",
        "::/129",
        "/dev/null",
        "../../etc/passwd",
        "é✓𝄞",
    ];
    let mut b = text.as_bytes().to_vec();
    let n = b.len().max(1);
    match rng.below(8) {
        0 => {
            // Delete a range.
            let a = rng.below(n);
            let len = rng.below(64).min(b.len().saturating_sub(a));
            b.drain(a..a + len);
        }
        1 => {
            let at = rng.below(n);
            let s = SPECIAL[rng.below(SPECIAL.len())];
            b.splice(at..at, s.bytes());
        }
        2 => {
            // Random bytes, invalid UTF-8 included.
            let at = rng.below(n);
            let bytes: Vec<u8> = (0..1 + rng.below(8))
                .map(|_| rng.next_u64() as u8)
                .collect();
            b.splice(at..at, bytes);
        }
        3 | 4 => {
            // Replace the value of a random `key: value` line.
            let lines: Vec<&str> = text.lines().collect();
            let i = rng.below(lines.len());
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            if let Some((k, _)) = lines[i].split_once(':') {
                out[i] = format!("{k}: {}", SCALARS[rng.below(SCALARS.len())]);
            }
            b = (out.join("\n") + "\n").into_bytes();
        }
        5 => {
            // Duplicate a line (duplicate keys).
            let lines: Vec<&str> = text.lines().collect();
            let i = rng.below(lines.len());
            let mut out = lines.clone();
            out.insert(i, lines[i]);
            b = (out.join("\n") + "\n").into_bytes();
        }
        6 => {
            // Re-indent a line.
            let lines: Vec<&str> = text.lines().collect();
            let i = rng.below(lines.len());
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            out[i] = format!("{}{}", " ".repeat(rng.below(7)), lines[i].trim_start());
            b = (out.join("\n") + "\n").into_bytes();
        }
        _ => {
            // Truncate.
            b.truncate(rng.below(n));
        }
    }
    b
}

#[test]
fn malformed_configs_and_status_files_never_panic() -> Result<()> {
    let mut m = phase("setup", Malformed::new)?;
    phase("random mutations of the example", || {
        random_mutations(&mut m)
    })?;
    phase("hand-made bad configurations", || {
        bad_configurations(&mut m)
    })?;
    phase("malformed status files", || malformed_status_files(&mut m))?;
    drop(m);
    Ok(())
}

/// The agent binary run outside any VM on files in a temporary directory, with one seeded
/// generator for every random input.
struct Malformed {
    bin: PathBuf,
    /// agent/examples/agent.yaml, the text the mutations start from.
    example: String,
    seed: u64,
    rng: Rng,
    /// How long one run of the binary may take.
    limit: Duration,
    /// The configuration file each case writes.
    cfg: PathBuf,
    dir: PathBuf,
    /// Removes `dir` when dropped.
    _tmp: TempDir,
}

impl Malformed {
    fn new() -> Result<Malformed> {
        let bin = target_bin("pilot-agent")?;
        let tmp = TempDir::new("pilot-rel-malformed")?;
        let dir = tmp.0.clone();
        let example_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../agent/examples/agent.yaml");
        let example = fs::read_to_string(&example_path)
            .with_context(|| format!("cannot read {}", example_path.display()))?;
        let seed = seed_from_env("PILOT_REL_SEED")?;
        Ok(Malformed {
            bin,
            example,
            seed,
            rng: Rng(seed),
            limit: Duration::from_secs(20),
            cfg: dir.join("agent.yaml"),
            dir,
            _tmp: tmp,
        })
    }

    /// `pilot-agent config validate FILE`.
    fn validate(&self, file: &Path) -> Result<Output> {
        run_bounded(
            Command::new(&self.bin)
                .args(["config", "validate"])
                .arg(file),
            self.limit,
        )
    }

    /// `pilot-agent --config CFG ARGS`.
    fn with_config(&self, args: &[&str]) -> Result<Output> {
        run_bounded(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.cfg)
                .args(args),
            self.limit,
        )
    }
}

/// (1) Random mutations: validate never panics; an invalid file is named with line:col.
fn random_mutations(m: &mut Malformed) -> Result<()> {
    let mutations: usize = match std::env::var("PILOT_REL_MUTATIONS") {
        Ok(s) => s.parse().context("PILOT_REL_MUTATIONS must be a count")?,
        Err(_) => 400,
    };
    let (seed, cfg) = (m.seed, m.cfg.clone());
    let mut counts: BTreeMap<i32, usize> = BTreeMap::new();
    for i in 0..mutations {
        let mut text = m.example.clone().into_bytes();
        for _ in 0..1 + m.rng.below(3) {
            text = mutate(&mut m.rng, &String::from_utf8_lossy(&text));
        }
        fs::write(&cfg, &text)?;
        let out = m.validate(&cfg)?;
        let what = format!("mutation {i} (seed {seed}, replay with PILOT_REL_SEED={seed})");
        let code = no_panic(&what, &out)?;
        *counts.entry(code).or_default() += 1;
        if code == 1 {
            let all = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
            ensure!(
                all.contains(&format!("{}:", cfg.display())),
                "{what}: the error does not name the file:\n{all}\ninput:\n{}",
                String::from_utf8_lossy(&text)
            );
        }
    }
    eprintln!(
        "reliability: {mutations} mutations of agent/examples/agent.yaml (seed {seed}): \
         `config validate` exit codes {counts:?}, no panic"
    );
    Ok(())
}

/// Configurations invalid by construction (but the truncated examples, which may be valid).
fn bad_configuration_cases(m: &mut Malformed) -> Vec<(&'static str, Vec<u8>)> {
    let mut garbage = vec![0u8; 4096];
    for b in garbage.iter_mut() {
        *b = m.rng.next_u64() as u8;
    }
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("binary garbage", garbage),
        ("NUL bytes", vec![0u8; 1024]),
        ("invalid UTF-8", b"state_dir: /tmp/\xff\xfe\n".to_vec()),
        ("deep flow nesting", "[".repeat(100_000).into_bytes()),
        ("deep mapping nesting", "{a: ".repeat(50_000).into_bytes()),
        (
            "deep block nesting",
            (0..5_000)
                .map(|d| format!("{}k{d}:\n", " ".repeat(d)))
                .collect::<String>()
                .into_bytes(),
        ),
        (
            // A compact block sequence nested 100,000 deep on one line: it overflowed the
            // parser's stack (exit 134) before the depth bound.
            "deep compact sequence",
            format!("host:\n  extra_names:\n  {}x\n", "- ".repeat(100_000)).into_bytes(),
        ),
        (
            // 24 MB, its one error (an unknown key) on its last line.
            "huge file",
            format!(
                "state_dir: /tmp/x\nhost:\n  extra_names:\n{}tabel: x\n",
                "    - a.example\n".repeat(1_500_000)
            )
            .into_bytes(),
        ),
        (
            "huge scalar",
            format!("state_dir: \"{}\n", "x".repeat(20_000_000)).into_bytes(),
        ),
        (
            "alias bomb",
            b"a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n\
              c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\n\
              e: &e [*d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e]\n"
                .to_vec(),
        ),
        ("a scalar root", b"just a string\n".to_vec()),
        ("a list root", b"- state_dir: /tmp\n".to_vec()),
        (
            "two documents",
            b"state_dir: /tmp/a\n---\nstate_dir: /tmp/b\n".to_vec(),
        ),
    ];
    for cut in [1, 7, 100, 500, 1000, 2000] {
        let b = m.example.as_bytes();
        if cut < b.len() {
            cases.push(("truncated example", b[..cut].to_vec()));
        }
    }
    cases
}

/// (2) Hand-made bad files: invalid by construction, for validate, up and status; and a
/// configuration that is a directory, or missing.
fn bad_configurations(m: &mut Malformed) -> Result<()> {
    let cases = bad_configuration_cases(m);
    let cfg = &m.cfg;
    let mut rows = Vec::new();
    for (name, bytes) in &cases {
        fs::write(cfg, bytes)?;
        let t0 = Instant::now();
        let out = m.validate(cfg)?;
        let code = no_panic(&format!("validate: {name}"), &out)?;
        let took = t0.elapsed();
        let all = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
        let first = all
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(110)
            .collect::<String>();
        if *name != "truncated example" {
            ensure!(code == 1, "validate: {name}: exit {code} (want 1):\n{all}");
            ensure!(
                all.contains(&format!("{}:", cfg.display())),
                "validate: {name}: the error does not name the file:\n{all}"
            );
            // Invalid by construction, so `up` stops at loading it, before touching anything.
            let up = m.with_config(&["up"])?;
            ensure!(
                no_panic(&format!("up: {name}"), &up)? == 1,
                "up: {name}: exit {} (want 1)",
                up.status
            );
            let st = m.with_config(&["status"])?;
            ensure!(
                no_panic(&format!("status: {name}"), &st)? == 1,
                "status --config with {name}: exit {} (want 1)",
                st.status
            );
        }
        rows.push(format!(
            "{name:<22} {:>9} B  exit {code}  {took:>9.2?}  {first}",
            bytes.len()
        ));
    }
    // A configuration that is a directory, or missing.
    for (name, path) in [
        ("directory", m.dir.clone()),
        ("missing", m.dir.join("absent.yaml")),
    ] {
        let out = m.validate(&path)?;
        let code = no_panic(&format!("validate: {name}"), &out)?;
        ensure!(code == 1, "validate of a {name} path: exit {code}");
        rows.push(format!("{name:<22} {:>11}  exit {code}", "-"));
    }
    eprintln!(
        "reliability: hand-made bad configurations:\n  {}",
        rows.join("\n  ")
    );
    Ok(())
}

/// Malformed status.json files: (name, content, whether `status` must fail with exit 1).
fn malformed_status_cases(rng: &mut Rng) -> Result<Vec<(String, Vec<u8>, bool)>> {
    let good = json!({
        "schema": 1, "status": "done", "condition": "healthy", "pid": 1, "version": "0.1.0",
        "command": "up", "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:01Z",
        "steps": [{"name": "firewall", "state": "ok", "detail": "",
                   "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z"}]
    });
    let good_text = serde_json::to_string_pretty(&good)?;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v.to_string().into_bytes()
    };
    let mut bad: Vec<(String, Vec<u8>, bool)> = vec![
        ("empty".into(), Vec::new(), true),
        ("null".into(), b"null".to_vec(), true),
        ("a list".into(), b"[]".to_vec(), true),
        ("an empty object".into(), b"{}".to_vec(), true),
        (
            "binary garbage".into(),
            (0..4096).map(|_| rng.next_u64() as u8).collect(),
            true,
        ),
        (
            "invalid UTF-8".into(),
            b"{\"status\": \"\xff\"}".to_vec(),
            true,
        ),
        (
            "deep nesting".into(),
            "[".repeat(100_000).into_bytes(),
            true,
        ),
        (
            "huge string".into(),
            format!("{{\"x\": \"{}\"}}", "y".repeat(20_000_000)).into_bytes(),
            true,
        ),
        (
            "unknown status".into(),
            with(&|v| v["status"] = json!("exploded")),
            true,
        ),
        (
            "pid too large".into(),
            with(&|v| v["pid"] = json!(99_999_999_999u64)),
            true,
        ),
        ("negative pid".into(), with(&|v| v["pid"] = json!(-5)), true),
        (
            "bad time".into(),
            with(&|v| v["started_at"] = json!("yesterday")),
            true,
        ),
        (
            "steps not a list".into(),
            with(&|v| v["steps"] = json!({"a": 1})),
            true,
        ),
        (
            "unknown step state".into(),
            with(&|v| v["steps"][0]["state"] = json!("??")),
            true,
        ),
        // Odd but well-formed: any of 0, 1, 2 is a fine answer, as long as nothing panics.
        (
            "schema 999".into(),
            with(&|v| v["schema"] = json!(999)),
            false,
        ),
        (
            "running, pid 0".into(),
            with(&|v| {
                v["status"] = json!("running");
                v["pid"] = json!(0)
            }),
            false,
        ),
        ("no steps".into(), with(&|v| v["steps"] = json!([])), false),
        (
            "year 9999".into(),
            with(&|v| v["finished_at"] = json!("9999-12-31T23:59:59Z")),
            false,
        ),
        (
            "control chars in detail".into(),
            with(&|v| v["steps"][0]["detail"] = json!("\u{1b}[2J\u{7}\r")),
            false,
        ),
        (
            "long step name".into(),
            with(&|v| v["steps"][0]["name"] = json!("s".repeat(100_000))),
            false,
        ),
    ];
    for cut in (1..good_text.len()).step_by(37) {
        bad.push((
            format!("truncated at {cut}"),
            good_text.as_bytes()[..cut].to_vec(),
            true,
        ));
    }
    Ok(bad)
}

/// (3) Malformed status files, read by `status` through a valid configuration.
fn malformed_status_files(m: &mut Malformed) -> Result<()> {
    let state = m.dir.join("state");
    fs::create_dir_all(&state)?;
    fs::write(&m.cfg, format!("state_dir: {}\n", state.display()))?;
    let status_path = state.join("status.json");
    let bad = malformed_status_cases(&mut m.rng)?;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for (name, bytes, must_fail) in &bad {
        fs::write(&status_path, bytes)?;
        for args in [
            &["status"][..],
            &["status", "--json"][..],
            &["status", "--long"][..],
            &["status", "--wait", "--timeout", "1"][..],
        ] {
            let out = m.with_config(args)?;
            let what = format!("{} with status.json {name}", args.join(" "));
            let code = no_panic(&what, &out)?;
            if *must_fail {
                ensure!(code == 1, "{what}: exit {code} (want 1)");
                ensure!(
                    stderr(&out).contains(&status_path.display().to_string()),
                    "{what}: the error does not name the file:\n{}",
                    stderr(&out)
                );
            }
            *tally
                .entry(format!("{} exit {code}", args.join(" ")))
                .or_default() += 1;
        }
    }
    // status.json a directory.
    fs::remove_file(&status_path)?;
    fs::create_dir(&status_path)?;
    let out = m.with_config(&["status"])?;
    ensure!(
        no_panic("status.json a directory", &out)? == 1,
        "status.json a directory: {}",
        out.status
    );
    eprintln!(
        "reliability: {} malformed status files x 4 invocations (+1 directory): {tally:?}, no panic",
        bad.len()
    );
    Ok(())
}

/// A fresh directory under the system temp dir, removed when dropped (a failed test too).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<TempDir> {
        let d = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d)?;
        Ok(TempDir(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
