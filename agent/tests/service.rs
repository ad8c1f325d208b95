//! The real `pilot-agent run`, without Docker: systemd's notification protocol (READY=1,
//! WATCHDOG=1, STATUS=, STOPPING=1 on a unix datagram socket the test binds, as systemd
//! would), a clean exit 0 on SIGTERM with the status written, and a periodic pass that
//! repairs drift and is counted as a repair.
//!
//! The agent runs in a network namespace of its own (`unshare --net`, which execs it, so the
//! pid is the agent's): its firewall step applies its nftables table there, never to the
//! machine's ruleset, and the namespace disappears with the process. dockerd is absent on
//! purpose (the socket path does not exist and the restart command is `true`): `docker-tls`
//! fails, the other steps converge, and the event watcher keeps retrying in the background,
//! which is the loop's behaviour when dockerd is lost. Needs root (namespaces, nft): without
//! it the tests fail, they do not skip.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pilot-agent");

fn need_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it runs the agent in a new network namespace with nft)"
    );
}

/// A `run` process in its own network namespace, with a notify socket; killed on drop if it
/// is still there.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    notify: UnixDatagram,
    /// Every notification so far, one line each (`READY=1`, `STATUS=...`).
    messages: Vec<String>,
}

fn write_config(dir: &Path, interval_secs: u64) -> PathBuf {
    let p = |name: &str| dir.join(name).display().to_string();
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {state}\n\
             host:\n  hostname: service-test\n\
             docker:\n\
             \x20 socket: {sock}\n\
             \x20 daemon_config: {daemon}\n\
             \x20 systemd_dropin_dir: {dropin}\n\
             \x20 service:\n    manager: command\n    restart_command: [/bin/true]\n\
             \x20 ready_timeout_secs: 1\n\
             firewall:\n  table: pilot_agent_service_test\n\
             service:\n  interval_secs: {interval_secs}\n",
            state = p("state"),
            sock = p("no-dockerd.sock"),
            daemon = p("daemon.json"),
            dropin = p("dropin"),
        ),
    )
    .unwrap();
    config
}

impl Agent {
    /// Starts `run`; `notify`: with NOTIFY_SOCKET (else the socket is bound but not passed).
    fn start(interval_secs: u64, watchdog_usec: Option<u64>, notify_env: bool) -> Agent {
        need_root();
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), interval_secs);
        let socket = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&socket).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--", BIN, "--config"])
            .arg(&config)
            .arg("run")
            .env_remove("PILOT_AGENT_CONFIG")
            .env_remove("WATCHDOG_PID")
            .env("PILOT_AGENT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap());
        if notify_env {
            cmd.env("NOTIFY_SOCKET", &socket);
        } else {
            cmd.env_remove("NOTIFY_SOCKET");
        }
        match watchdog_usec {
            Some(usec) => cmd.env("WATCHDOG_USEC", usec.to_string()),
            None => cmd.env_remove("WATCHDOG_USEC"),
        };
        let child = cmd.spawn().expect("run unshare --net pilot-agent run");
        Agent {
            child,
            dir,
            notify,
            messages: Vec::new(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn status_path(&self) -> PathBuf {
        self.dir.path().join("state/status.json")
    }

    fn status(&self) -> Value {
        let bytes = std::fs::read(self.status_path()).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// Reads notifications until `done(messages)` holds; panics with the agent's log when
    /// `within` passes or the agent exits first.
    fn read_until(&mut self, what: &str, within: Duration, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + within;
        while !done(&self.messages) {
            if Instant::now() > deadline {
                panic!(
                    "no {what} within {within:?}; got {:?}\nagent log:\n{}",
                    self.messages,
                    self.log()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent exited ({status}) before {what}\nagent log:\n{}",
                    self.log()
                );
            }
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.notify.recv(&mut buf) {
                for l in String::from_utf8_lossy(&buf[..n]).lines() {
                    self.messages.push(l.to_string());
                }
            }
        }
    }

    fn wait_for_message(&mut self, line: &str, within: Duration) {
        self.read_until(line, within, |m| m.iter().any(|l| l == line));
    }

    fn count(&self, line: &str) -> usize {
        self.messages.iter().filter(|m| *m == line).count()
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Waits for the exit, at most `within`.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {within:?}\nagent log:\n{}",
                self.log()
            );
            // Keep draining notifications (STOPPING=1 comes before the exit).
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.notify.recv(&mut buf) {
                for l in String::from_utf8_lossy(&buf[..n]).lines() {
                    self.messages.push(l.to_string());
                }
            }
        }
    }

    fn drain(&mut self) {
        self.notify.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            for l in String::from_utf8_lossy(&buf[..n]).lines() {
                self.messages.push(l.to_string());
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `within` passes.
fn poll(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_notifies_systemd_pings_the_watchdog_and_stops_cleanly_on_sigterm() {
    // WATCHDOG_USEC 600 ms: pings every 300 ms.
    let mut agent = Agent::start(300, Some(600_000), true);
    let started = Instant::now();
    agent.wait_for_message("READY=1", Duration::from_secs(60));
    let ready_after = started.elapsed();

    // READY=1 comes after the first pass: the status says so, with the run counters.
    let s = agent.status();
    assert_eq!(s["command"], "run", "{s:#}");
    assert_eq!(s["status"], "done", "{s:#}");
    assert_eq!(s["run"]["mode"], "run", "{s:#}");
    assert_eq!(s["run"]["pid"], agent.child.id(), "{s:#}");
    assert_eq!(s["run"]["passes"], 1, "{s:#}");
    assert_eq!(s["run"]["repairs"], 0, "{s:#}");
    assert_eq!(s["run"]["last_trigger"], "start", "{s:#}");
    let state = |name: &str| {
        s["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|st| st["name"] == name)
            .map(|st| st["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    // The firewall worked in the namespace; dockerd is absent.
    assert_eq!(state("firewall"), "changed", "{s:#}");
    assert_eq!(state("pki"), "changed", "{s:#}");
    assert_eq!(state("docker-tls"), "error", "{s:#}");
    assert!(
        agent
            .messages
            .iter()
            .any(|m| m.starts_with("STATUS=error after pass 1 (start)")),
        "{:?}",
        agent.messages
    );

    // Watchdog pings keep coming while the loop idles.
    agent.wait_for_message("WATCHDOG=1", Duration::from_secs(5));
    agent.read_until("4 watchdog pings", Duration::from_secs(5), |m| {
        m.iter().filter(|l| *l == "WATCHDOG=1").count() >= 4
    });

    // Resident memory of the idle agent (the target: 10 MiB), for the report.
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();

    // `status` shows the service counters.
    let out = Command::new(BIN)
        .args(["--config"])
        .arg(agent.dir.path().join("agent.yaml"))
        .arg("status")
        .env_remove("PILOT_AGENT_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("service:   1 passes, 0 repairs, last trigger: start"),
        "{text}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "docker-tls failed: error\n{text}"
    );

    // SIGTERM: STOPPING=1, exit 0 promptly, status written with stopped_at.
    let term = Instant::now();
    agent.signal(rustix::process::Signal::TERM);
    let status = agent.wait_exit(Duration::from_secs(10));
    let stop_took = term.elapsed();
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    agent.drain();
    assert!(agent.count("STOPPING=1") == 1, "{:?}", agent.messages);
    let s = agent.status();
    assert_eq!(s["status"], "done", "{s:#}");
    assert!(s["run"]["stopped_at"].is_string(), "{s:#}");
    assert_eq!(s["run"]["passes"], 1, "{s:#}");
    eprintln!(
        "READY=1 after {} ms, idle RSS {rss_kib} KiB, {} watchdog pings, exit {} ms after SIGTERM",
        ready_after.as_millis(),
        agent.count("WATCHDOG=1"),
        stop_took.as_millis()
    );
}

/// The periodic pass finds drift (daemon.json removed behind the agent's back) and repairs
/// it: counted as a repair, with the trigger `interval`. Without NOTIFY_SOCKET the
/// notifications are no-ops, and SIGINT stops the agent like SIGTERM.
#[test]
fn a_periodic_pass_repairs_drift_and_sigint_stops_the_agent() {
    // No NOTIFY_SOCKET for this one: nothing depends on it.
    let mut agent = Agent::start(10, None, false);
    let status_path = agent.status_path();
    let passes = |n: u64| {
        let path = status_path.clone();
        move || {
            std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|s| s["run"]["passes"].as_u64() >= Some(n) && s["status"] == "done")
        }
    };
    assert!(poll(Duration::from_secs(60), passes(1)), "{}", agent.log());
    let daemon_json = agent.dir.path().join("daemon.json");
    assert!(daemon_json.exists());
    std::fs::remove_file(&daemon_json).unwrap();
    let removed = Instant::now();
    assert!(poll(Duration::from_secs(20), passes(2)), "{}", agent.log());
    let repaired_after = removed.elapsed();
    assert!(daemon_json.exists(), "the pass re-wrote daemon.json");
    let s = agent.status();
    assert_eq!(s["run"]["last_trigger"], "interval", "{s:#}");
    assert_eq!(s["run"]["repairs"], 1, "{s:#}");
    assert!(s["run"]["last_repair_at"].is_string(), "{s:#}");
    // Each pass is in the history (`status --history`) with the trigger that made it; the
    // second is recorded before status.json counts it.
    let history =
        std::fs::read_to_string(agent.dir.path().join("state").join("history.jsonl")).unwrap();
    let records: Vec<Value> = history
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let triggers: Vec<&str> = records
        .iter()
        .map(|r| r["trigger"].as_str().unwrap_or("-"))
        .collect();
    assert!(triggers.starts_with(&["start", "interval"]), "{history}");
    assert!(records.iter().all(|r| r["command"] == "run"), "{history}");

    agent.signal(rustix::process::Signal::INT);
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(agent.status()["run"]["stopped_at"].is_string());
    assert!(agent.log().contains("SIGINT: stopping"), "{}", agent.log());
    eprintln!(
        "drift repaired {} ms after it was made (interval 10 s)",
        repaired_after.as_millis()
    );
}

#[test]
fn run_with_a_bad_config_exits_1_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nservice:\n  interval_secs: 1\n",
            state.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env_remove("PILOT_AGENT_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(":3:18: service.interval_secs"), "{stderr}");
    assert!(!state.exists());
}
