//! The real `pilot-agent` binary: `status` and `credentials` against a temporary state
//! directory (output, exit codes, `--wait` ending on time, no secret in status output).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pilot_agent::status_file::{RunStatus, Status, StepState};

const TOKEN: &str = "wp-bootstrap-token-5f1c9e2a7d";
const PASSWORD: &str = "db-password-Qx7mN2pL9vR4";

struct Host {
    _dir: tempfile::TempDir,
    state: PathBuf,
    config: PathBuf,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let config = dir.path().join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "state_dir: {}\ndocker:\n  daemon_config: {}\nhost:\n  extra_names: [pilot.example.com]\n\
                 waypoint:\n  grpc_port: 9701\ndatabase:\n  host: db.internal\n  admin_user: admin\n  \
                 admin_password: admin-secret-value\n",
                state.display(),
                dir.path().join("daemon.json").display()
            ),
        )
        .unwrap();
        Host {
            _dir: dir,
            state,
            config,
        }
    }

    fn agent(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_pilot-agent"))
            .env_remove("PILOT_AGENT_CONFIG")
            .env_remove("COLUMNS")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run pilot-agent")
    }

    fn write_status(&self, run: RunStatus, db: StepState, pid: u32) {
        let mut s = Status::start("up", ["firewall".to_string(), "database".to_string()]);
        s.pid = pid;
        s.status = run;
        let t = s.started_at;
        for step in &mut s.steps {
            step.state = StepState::Changed;
            step.detail = "converged".into();
            step.started_at = Some(t);
            step.finished_at = Some(t + time::Duration::milliseconds(20));
        }
        let d = s.step_mut("database").unwrap();
        d.state = db;
        d.detail = format!("database step is {db:?}");
        if run == RunStatus::Done {
            s.finished_at = Some(t + time::Duration::seconds(1));
        } else {
            d.finished_at = None;
        }
        s.condition = s.compute_condition();
        s.write(&self.state.join("status.json")).unwrap();
    }

    /// The secret files the agent keeps, where it keeps them.
    fn write_secrets(&self) {
        let tokens = self.state.join("waypoint");
        std::fs::create_dir_all(&tokens).unwrap();
        std::fs::write(tokens.join("bootstrap-token"), format!("{TOKEN}\n")).unwrap();
        let db = self.state.join("database");
        std::fs::create_dir_all(&db).unwrap();
        std::fs::write(db.join("password"), format!("{PASSWORD}\n")).unwrap();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    pid
}

#[test]
fn no_status_file_says_so_and_exits_1() {
    let host = Host::new();
    let out = host.agent(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("status:    not-started\n"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "pilot-agent has not run on this host (no {})",
            host.state.join("status.json").display()
        )),
        "{stdout}"
    );
    let out = host.agent(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["status"], "not-started");
    assert_eq!(v["condition"], "error");
}

#[test]
fn exit_codes_follow_the_condition() {
    let host = Host::new();
    let me = std::process::id();
    for (run, db, pid, code, condition) in [
        (RunStatus::Done, StepState::Ok, me, 0, "healthy"),
        (RunStatus::Done, StepState::Degraded, me, 2, "degraded"),
        (RunStatus::Done, StepState::Error, me, 1, "error"),
        (
            RunStatus::Running,
            StepState::Running,
            dead_pid(),
            1,
            "error",
        ),
    ] {
        host.write_status(run, db, pid);
        let out = host.agent(&["status"]);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{db:?}: {}",
            text(&out.stdout)
        );
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains(&format!("condition: {condition}\n")),
            "{stdout}"
        );
        assert!(stdout.contains("STEP      STATE     DETAIL\n"), "{stdout}");
        assert!(
            stdout.contains("firewall  changed   converged\n"),
            "{stdout}"
        );
        let out = host.agent(&["status", "--json"]);
        assert_eq!(out.status.code(), Some(code));
        let v = json(&out);
        assert_eq!(v["condition"], condition);
        assert_eq!(v["schema"], 1);
        assert_eq!(v["steps"][0]["name"], "firewall");
        assert_eq!(v["steps"][0]["state"], "changed");
        assert!(v["steps"][0]["started_at"].as_str().unwrap().ends_with('Z'));
        if run == RunStatus::Running {
            assert_eq!(
                v["detail"],
                format!("agent (pid {pid}) is not running; last run did not finish")
            );
            assert!(stdout.contains("last run did not finish"), "{stdout}");
        }
    }
}

#[test]
fn wait_ends_at_the_timeout() {
    let host = Host::new();
    // A live pid: this test process, which "is converging" for as long as it likes.
    host.write_status(RunStatus::Running, StepState::Running, std::process::id());
    let t0 = Instant::now();
    let out = host.agent(&["status", "--wait", "--timeout", "1", "--json"]);
    let took = t0.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        text(&out.stderr).contains("timed out after 1 s waiting for pilot-agent"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(json(&out)["status"], "running");

    // A finished run: --wait returns at once with its code.
    host.write_status(RunStatus::Done, StepState::Degraded, std::process::id());
    let t0 = Instant::now();
    let out = host.agent(&["status", "--wait", "--timeout", "30"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn status_never_prints_secrets_and_credentials_does() {
    let host = Host::new();
    host.write_secrets();
    host.write_status(RunStatus::Done, StepState::Ok, std::process::id());
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["status", "--long"],
        &["status", "--long", "--json"],
    ] {
        let out = host.agent(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        for secret in [TOKEN, PASSWORD, "admin-secret-value"] {
            assert!(!all.contains(secret), "{args:?} printed a secret: {all}");
        }
    }
    let out = host.agent(&["status", "--long", "--json"]);
    let v = json(&out);
    assert_eq!(v["certificates"].as_array().unwrap().len(), 4);
    assert!(v["host"]["memory_total_bytes"].as_u64().unwrap() > 0);

    let out = host.agent(&["credentials", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json(&out);
    assert_eq!(v["waypoint"]["token"], TOKEN);
    assert_eq!(v["waypoint"]["address"], "pilot.example.com:9701");
    assert_eq!(v["waypoint"]["tls_skip_verify"], false);
    assert_eq!(v["database"]["password"], PASSWORD);
    assert_eq!(v["database"]["host"], "db.internal");
    assert_eq!(v["database"]["port"], 5432);
    assert_eq!(v["missing"], serde_json::json!(["ca_pem"]));
    // The admin password is the agent's, not the application's: never handed out.
    assert!(!text(&out.stdout).contains("admin-secret-value"));
}

#[test]
fn status_with_an_explicit_config_that_cannot_be_read_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_pilot-agent"))
        .env_remove("PILOT_AGENT_CONFIG")
        .args(["--config", "/nonexistent/agent.yaml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read configuration /nonexistent/agent.yaml"));
}

/// `status --history`: none yet (exit 1, said plainly), then the passes `up` recorded, newest
/// last and their steps slowest first; a torn line is skipped with a note; `--limit`;
/// `--json`; flags that make no sense with it are refused.
#[test]
fn history_shows_recorded_passes_and_says_when_there_are_none() {
    use pilot_agent::history_file::{PassClock, PassRecord, append};

    let host = Host::new();
    let path = host.state.join("history.jsonl");
    let out = host.agent(&["status", "--history"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "history:   none\ndetail:    pilot-agent has recorded no converge pass on this \
             host (no {})\n",
            path.display()
        )
    );
    let out = host.agent(&["status", "--history", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["passes"], serde_json::json!([]));

    // Two passes as `up` records them, a torn line between them (a killed write).
    let pass = |slow: &str, ms: i64| {
        let mut s = Status::start("up", ["firewall".to_string(), slow.to_string()]);
        let t = s.started_at;
        for step in &mut s.steps {
            step.state = StepState::Ok;
            step.started_at = Some(t);
            step.finished_at = Some(t + time::Duration::milliseconds(5));
        }
        s.steps[1].finished_at = Some(t + time::Duration::milliseconds(ms));
        s.status = RunStatus::Done;
        s.finished_at = Some(t + time::Duration::milliseconds(ms));
        PassRecord::from_status(&s, None, &PassClock::start())
    };
    append(&path, &pass("pki", 830)).unwrap();
    let mut torn = std::fs::read(&path).unwrap();
    torn.extend_from_slice(b"{\"schema\": 1, \"comm");
    std::fs::write(&path, torn).unwrap();
    append(&path, &pass("docker-tls", 2104)).unwrap();

    let out = host.agent(&["status", "--history"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("history:   2 of 2 recorded passes, newest last"),
        "{stdout}"
    );
    let steps: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(str::trim)
        .collect();
    assert_eq!(
        steps,
        [
            "830 ms  pki       ok",
            "5 ms  firewall  ok",
            "2104 ms  docker-tls  ok",
            "5 ms  firewall    ok",
        ],
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains("skipped 1 unreadable line(s) of "),
        "{}",
        text(&out.stderr)
    );

    let out = host.agent(&["status", "--history", "--limit", "1", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json(&out);
    assert_eq!(v["recorded"], 2);
    assert_eq!(v["skipped_lines"], 1);
    let passes = v["passes"].as_array().unwrap();
    assert_eq!(passes.len(), 1);
    assert_eq!(passes[0]["command"], "up");
    assert_eq!(passes[0]["steps"][1]["name"], "docker-tls");
    assert_eq!(passes[0]["steps"][1]["duration_ms"], 2104);

    for bad in [
        &["status", "--history", "--wait"][..],
        &["status", "--history", "--long"],
        &["status", "--history", "--limit", "0"],
        &["status", "--limit", "3"],
    ] {
        let out = host.agent(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
    }
}
