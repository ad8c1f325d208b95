//! Drives the real `waypoint` stand-in binary as Waypoint's entrypoint, on loopback: it reports
//! a live server and the address the server advertises, fails open after ~5 s against an
//! address that refuses or never answers (and still runs the application), binds the source
//! address it is told to, and is skipped by WAYPOINT_CEB_DISABLE. Every process started here is
//! waited for or killed by its own handle.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_waypoint");
const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it yields a value or the deadline passes.
fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stand-in server on loopback (killed through its own handle on drop), with its ports.
struct ServerProc {
    child: Child,
    grpc: String,
    http: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_after(line: &str, marker: &str) -> Option<String> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split_whitespace().next().map(str::to_string)
}

fn start_server(db: &Path, extra: &[&str]) -> ServerProc {
    let mut child = Command::new(BIN)
        .args(["server", "run", "-accept-tos", "-url-enabled=false"])
        .arg(format!("-db={}", db.display()))
        .env("HOME", db.parent().expect("the data dir"))
        .args(["-listen-grpc=127.0.0.1:0", "-listen-http=127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the stand-in server");
    let stderr = child.stderr.take().expect("piped stderr");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            sink.lock().unwrap().push(line);
        }
    });
    let find = |marker: &str| {
        poll(&format!("the server to log {marker:?}"), || {
            lines
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| addr_after(l, marker))
        })
    };
    let grpc = find("grpc listening on ");
    let http = find("http listening on ");
    ServerProc { child, grpc, http }
}

/// Runs `program` (the stand-in or a link to it) with a clean Waypoint environment plus `env`.
fn run(program: &Path, args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for var in [
        "WAYPOINT_SERVER_ADDR",
        "WAYPOINT_SERVER_TOKEN",
        "WAYPOINT_SERVER_TLS",
        "WAYPOINT_SERVER_TLS_SKIP_VERIFY",
        "WAYPOINT_CEB_DISABLE",
        "WAYPOINT_CEB_INVITE_TOKEN",
        "WAYPOINT_STANDIN_SOURCE_ADDR",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let t0 = Instant::now();
    let out = cmd.output().expect("run waypoint");
    (out, t0.elapsed())
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The entrypoint's JSON line (the first line of stdout).
fn report(out: &Output) -> Value {
    let lines = stdout_lines(out);
    let first = lines.first().unwrap_or_else(|| {
        panic!(
            "no stdout; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let v: Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{first:?}: {e}"));
    assert_eq!(v["standin"], true, "{v}");
    v
}

/// An application that records that it ran (in `marker`), prints a line and exits with `code`.
fn app(marker: &Path, code: u8) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("echo ran > \"$1\"; echo app-output; exit {code}"),
        "sh".into(),
        marker.display().to_string(),
    ]
}

fn env_for<'a>(addr: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("WAYPOINT_SERVER_ADDR", addr),
        ("WAYPOINT_SERVER_TLS", "true"),
        ("WAYPOINT_SERVER_TLS_SKIP_VERIFY", "true"),
        ("WAYPOINT_CEB_INVITE_TOKEN", "invite-token-for-tests"),
    ];
    env.extend_from_slice(extra);
    env
}

#[test]
fn reports_a_live_server_and_its_advertise_address_then_execs_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        &dir.path().join("data.db"),
        &["-advertise-addr=198.51.100.7:9701"],
    );
    let marker = dir.path().join("ran");
    let cmd = app(&marker, 7);
    let mut args = vec!["entrypoint", "--"];
    args.extend(cmd.iter().map(String::as_str));
    let (out, took) = run(Path::new(BIN), &args, &env_for(&server.grpc, &[]));
    let v = report(&out);
    assert_eq!(v["entrypoint"], "connected", "{v}");
    assert_eq!(v["server_addr"], server.grpc.as_str());
    assert_eq!(v["advertise_addr"], "198.51.100.7:9701");
    assert!(v["error"].is_null(), "{v}");
    assert!(v["elapsed_ms"].as_u64().unwrap() < 5000, "{v}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The app ran after the line, with its own exit code (exec: it replaced the entrypoint).
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout_lines(&out)[1..], ["app-output"]);
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "ran");

    // Run as `waypoint-entrypoint` (no `--`), against the HTTP port, after `config-set` changed
    // the advertise address.
    let bootstrap = Command::new(BIN)
        .args([
            "server",
            "bootstrap",
            "-server-tls-skip-verify",
            "-context-create=",
        ])
        .arg(format!("-server-addr={}", server.grpc))
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    let token = String::from_utf8_lossy(&bootstrap.stdout)
        .trim()
        .to_string();
    // config-set has no connection flags in Waypoint: the environment says where and who.
    let set = Command::new(BIN)
        .args(["server", "config-set", "-advertise-addr=203.0.113.9:9701"])
        .env("HOME", dir.path())
        .env("WAYPOINT_SERVER_ADDR", &server.grpc)
        .env("WAYPOINT_SERVER_TOKEN", &token)
        .env("WAYPOINT_SERVER_TLS", "true")
        .env("WAYPOINT_SERVER_TLS_SKIP_VERIFY", "true")
        .env_remove("WAYPOINT_CONTEXT")
        .output()
        .unwrap();
    assert!(set.status.success(), "{set:?}");
    let link = dir.path().join("waypoint-entrypoint");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    std::fs::remove_file(&marker).unwrap();
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (out, _) = run(&link, &args, &env_for(&server.http, &[]));
    let v = report(&out);
    assert_eq!(v["entrypoint"], "connected", "{v}");
    assert_eq!(v["advertise_addr"], "203.0.113.9:9701");
    assert_eq!(out.status.code(), Some(7));
    assert!(
        marker.exists(),
        "the app did not run as waypoint-entrypoint"
    );

    // Without an advertise address the field is null; no command: exit 0 after the line.
    let bare_dir = tempfile::tempdir().unwrap();
    let bare = start_server(&bare_dir.path().join("data.db"), &[]);
    let (out, _) = run(Path::new(BIN), &["entrypoint"], &env_for(&bare.grpc, &[]));
    let v = report(&out);
    assert_eq!(v["entrypoint"], "connected", "{v}");
    assert!(v["advertise_addr"].is_null(), "{v}");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout_lines(&out).len(), 1);
}

/// Asserts a fail-open report: disconnected after about the 5 s window, the app still ran.
fn assert_failed_open(out: &Output, took: Duration, marker: &Path, error_needle: &str) {
    let v = report(out);
    assert_eq!(v["entrypoint"], "disconnected", "{v}");
    assert!(v["advertise_addr"].is_null(), "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains(error_needle), "{error}");
    let ms = v["elapsed_ms"].as_u64().unwrap();
    assert!((4900..6500).contains(&ms), "elapsed_ms {ms}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout_lines(out)[1..], ["app-output"]);
    assert!(
        marker.exists(),
        "the app did not run after the entrypoint failed open"
    );
}

#[test]
fn a_server_that_never_answers_fails_open_after_five_seconds_from_the_given_source() {
    // Accepts TCP but never speaks: the TLS handshake waits until the window closes.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = peers.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((stream, peer)) = silent.accept() {
            seen.lock().unwrap().push(peer.ip());
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let cmd = app(&marker, 0);
    let mut args = vec!["entrypoint", "--"];
    args.extend(cmd.iter().map(String::as_str));
    let env = env_for(&addr, &[("WAYPOINT_STANDIN_SOURCE_ADDR", "127.0.0.2")]);
    let (out, took) = run(Path::new(BIN), &args, &env);
    assert_failed_open(&out, took, &marker, "no answer");
    let peers = peers.lock().unwrap().clone();
    assert!(!peers.is_empty(), "the entrypoint never connected");
    assert!(
        peers
            .iter()
            .all(|p| *p == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
        "{peers:?}"
    );
}

#[test]
fn a_refused_address_is_retried_for_five_seconds_then_the_app_runs() {
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let cmd = app(&marker, 0);
    let mut args = vec!["entrypoint", "--"];
    args.extend(cmd.iter().map(String::as_str));
    let (out, took) = run(Path::new(BIN), &args, &env_for(&addr, &[]));
    assert_failed_open(&out, took, &marker, "cannot connect");
}

#[test]
fn an_unverifiable_certificate_is_not_a_connection() {
    // TLS on by default and verification not skipped: the stand-in's self-signed certificate is
    // refused, as Waypoint's entrypoint would refuse it.
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&dir.path().join("data.db"), &[]);
    let marker = dir.path().join("ran");
    let cmd = app(&marker, 0);
    let mut args = vec!["entrypoint", "--"];
    args.extend(cmd.iter().map(String::as_str));
    let env = [
        ("WAYPOINT_SERVER_ADDR", server.grpc.as_str()),
        // Verification against the system bundle fails before any retry can succeed.
        ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
    ];
    let (out, took) = run(Path::new(BIN), &args, &env);
    assert_failed_open(&out, took, &marker, "tls handshake");
}

#[test]
fn ceb_disable_skips_the_server_and_runs_the_app_at_once() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let cmd = app(&marker, 3);
    let mut args = vec!["entrypoint", "--"];
    args.extend(cmd.iter().map(String::as_str));
    let env = env_for(&addr, &[("WAYPOINT_CEB_DISABLE", "1")]);
    let (out, took) = run(Path::new(BIN), &args, &env);
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(out.status.code(), Some(3));
    // No report line: stdout is the app's alone.
    assert_eq!(stdout_lines(&out), ["app-output"]);
    assert!(marker.exists());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("WAYPOINT_CEB_DISABLE"),
        "{out:?}"
    );
    assert!(silent.accept().is_err(), "a disabled entrypoint connected");

    // A command that cannot be executed: 127, as shells and Docker say "not found".
    let (out, _) = run(
        Path::new(BIN),
        &["entrypoint", "--", "/nonexistent/app"],
        &env,
    );
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("waypoint stand-in: entrypoint"));
}
