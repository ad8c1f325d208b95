//! Drives the real `waypoint` stand-in binary on loopback and checks it behaves as Waypoint
//! 0.11.4 does: the command line (flag sets, Go's errors, `! ` errors on stdout, exit codes),
//! bootstrap (open to all, once, the CLI context it writes), tokens (base58, scoped runner
//! tokens, expiry, Waypoint's refusal texts), the runner's life (10 s start-up dial, held
//! registration, reconnects, listed only while connected), the URL service start, the
//! certificate flags, projects, snapshot and restore (projects included), and the runner's
//! Docker check over mutual TLS against a fake Docker API. No Docker daemon needed. Every
//! process started here is killed by its own handle when its guard drops, even when an
//! assertion fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use waypoint_standin::client::{HttpClient, Reply, Target};
use waypoint_standin::tls;

const BIN: &str = env!("CARGO_BIN_EXE_waypoint");
const DEADLINE: Duration = Duration::from_secs(30);

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

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

/// A child process with stdout and stderr captured line by line; killed (by PID, via its
/// handle) on drop.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    out: Arc<Mutex<Vec<String>>>,
}

fn capture(stream: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>, tag: &'static str) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[child {tag}] {line}");
            sink.lock().unwrap().push(line);
        }
    });
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn waypoint");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::new(Mutex::new(Vec::new()));
        capture(child.stderr.take().expect("stderr"), lines.clone(), "err");
        capture(child.stdout.take().expect("stdout"), out.clone(), "out");
        Proc { child, lines, out }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap().join("\n")
    }

    fn wait_line(&self, needle: &str) -> String {
        poll(&format!("a log line with {needle:?}"), || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
    }

    /// Sends SIGTERM to this child only and waits for it to exit.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        poll("the child to exit", || {
            self.child.try_wait().expect("try_wait")
        })
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A stand-in server process on loopback.
struct ServerProc {
    proc: Proc,
    grpc: String,
    http: String,
}

fn addr_after(line: &str, marker: &str) -> String {
    let rest = &line[line.find(marker).expect("marker") + marker.len()..];
    rest.split_whitespace().next().expect("address").to_string()
}

/// An isolated HOME (the CLI directory and contexts go there) for the processes of a test.
struct Home(tempfile::TempDir);

impl Home {
    fn new() -> Home {
        Home(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        for var in [
            "WAYPOINT_SERVER_ADDR",
            "WAYPOINT_SERVER_TOKEN",
            "WAYPOINT_SERVER_TLS",
            "WAYPOINT_SERVER_TLS_SKIP_VERIFY",
            "WAYPOINT_CONTEXT",
            "WAYPOINT_SERVER_COOKIE",
            "WAYPOINT_WORKSPACE",
            "XDG_CONFIG_HOME",
            "DOCKER_HOST",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
            "DOCKER_TLS",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("HOME", self.path()).current_dir(self.path());
        cmd
    }

    /// Runs the CLI with this HOME, a clean Waypoint/Docker environment plus `env`.
    fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command();
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        cmd.output().expect("run waypoint")
    }

    fn start_server(&self, db: &Path, grpc: &str, extra: &[&str]) -> ServerProc {
        let mut cmd = self.command();
        cmd.args(["server", "run", "-accept-tos", "-url-enabled=false"])
            .arg(format!("-db={}", db.display()))
            .arg(format!("-listen-grpc={grpc}"))
            .args(["-listen-http", "127.0.0.1:0"])
            .args(extra);
        let proc = Proc::spawn(&mut cmd);
        let grpc = addr_after(&proc.wait_line("grpc listening on "), "grpc listening on ");
        let http = addr_after(&proc.wait_line("http listening on "), "http listening on ");
        let server = ServerProc { proc, grpc, http };
        // Readiness the way the agent checks it: HTTPS on the HTTP port answers.
        poll("the server to answer GET / over tls", || {
            let reply = api(&server.http, Method::GET, "/", None).ok()?;
            (reply.status == 200).then_some(())
        });
        server
    }
}

fn api(addr: &str, method: Method, path: &str, token: Option<&str>) -> Result<Reply, String> {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let target = Target::Tcp {
        host: host.to_string(),
        port: port.parse().expect("port"),
    };
    let config = tls::client_config_skip_verify(None).map_err(|e| e.to_string())?;
    let name = tls::server_name(host).map_err(|e| e.to_string())?;
    let client = HttpClient::new(target, Some((config, name)), Duration::from_secs(10));
    block_on(client.send(method, path, token, None)).map_err(|e| e.to_string())
}

fn api_json(addr: &str, method: Method, path: &str, token: Option<&str>) -> Value {
    let reply = api(addr, method, path, token).expect("api call");
    assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    serde_json::from_slice(&reply.body).expect("json")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The error-style block on stdout (`! ` line and its `  ` continuations), unwrapped.
fn error_block(text: &str) -> Option<String> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("! "));
    let mut block = lines.next()?[2..].to_string();
    for l in lines.take_while(|l| l.starts_with("  ")) {
        block.push(' ');
        block.push_str(&l[2..]);
    }
    Some(block)
}

/// Asserts Waypoint's error style: exit 1, `! TEXT` on stdout (word-wrapped at 80 columns
/// like Waypoint's, continuation lines indented), stderr free of it.
fn assert_wp_error(out: &Output, first_line: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(out);
    let block = error_block(&text).unwrap_or_default();
    assert!(
        block.starts_with(first_line),
        "wanted `! {first_line}` on stdout, got: {text:?} (stderr: {:?})",
        stderr(out)
    );
    assert!(
        text.lines()
            .all(|l| l.chars().count() <= 82 || !l[2..].contains(' ')),
        "{text}"
    );
    assert!(!stderr(out).contains(first_line), "{}", stderr(out));
}

fn bootstrap(home: &Home, grpc: &str, extra: &[&str]) -> Output {
    let addr = format!("-server-addr={grpc}");
    let mut args = vec![
        "server",
        "bootstrap",
        addr.as_str(),
        "-server-tls-skip-verify",
    ];
    args.extend_from_slice(extra);
    home.cli(&args, &[])
}

fn client_env<'a>(grpc: &'a str, token: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("WAYPOINT_SERVER_ADDR", grpc),
        ("WAYPOINT_SERVER_TOKEN", token),
        ("WAYPOINT_SERVER_TLS", "true"),
        ("WAYPOINT_SERVER_TLS_SKIP_VERIFY", "true"),
    ]
}

const BASE58: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

fn assert_token(text: &str) {
    assert!(text.len() > 100, "a Waypoint-like token is long: {text:?}");
    assert!(text.chars().all(|c| BASE58.contains(c)), "base58: {text:?}");
    assert!(
        !text.chars().all(|c| c.is_ascii_hexdigit()),
        "not hex: {text:?}"
    );
}

fn read_status(path: &Path) -> Option<Value> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A loopback port with nothing listening on it (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_runner(
    home: &Home,
    grpc: &str,
    token: &str,
    docker_port: u16,
    cert_dir: &Path,
    status_file: &Path,
    id: &str,
) -> Proc {
    let mut cmd = home.command();
    cmd.args(["runner", "agent", "-vv", &format!("-id={id}")]);
    for (k, v) in client_env(grpc, token) {
        cmd.env(k, v);
    }
    cmd.env("DOCKER_HOST", format!("tcp://127.0.0.1:{docker_port}"))
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", cert_dir)
        .env("WAYPOINT_STANDIN_STATUS_FILE", status_file);
    Proc::spawn(&mut cmd)
}

#[test]
fn dispatch_help_exit_codes_and_go_flag_errors() {
    let home = Home::new();
    let out = home.cli(&["version"], &[]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "Waypoint v0.11.4 (stand-in)");
    assert_eq!(
        stdout(&home.cli(&["-v"], &[])),
        "Waypoint v0.11.4 (stand-in)"
    );

    // Help goes to stderr with exit 0; unknown commands exit 127; an unknown word under a
    // parent shows the parent's help with exit 1.
    for help in [
        &["--help"][..],
        &["runner", "token", "-h"],
        &["server", "run", "-help"],
    ] {
        let out = home.cli(help, &[]);
        assert_eq!(out.status.code(), Some(0), "{help:?}");
        assert!(stdout(&out).is_empty(), "{help:?}: help is on stderr");
        assert!(!stderr(&out).is_empty());
    }
    assert_eq!(home.cli(&["frobnicate"], &[]).status.code(), Some(127));
    assert_eq!(home.cli(&[], &[]).status.code(), Some(127));
    let out = home.cli(&["server", "bogus"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("subcommands"), "{}", stderr(&out));
    let out = home.cli(&["-plain", "token", "new"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Invalid flags before the subcommand"));

    // Connection flags exist only where Waypoint has them; no token flags anywhere.
    for cmd in [
        &["token", "new"][..],
        &["user", "token"],
        &["runner", "token"],
        &["server", "config-set"],
        &["runner", "agent"],
        &["server", "run"],
    ] {
        let mut args = cmd.to_vec();
        args.push("-server-addr=127.0.0.1:9701");
        assert_wp_error(
            &home.cli(&args, &[]),
            "flag provided but not defined: -server-addr",
        );
    }
    for flag in ["-server-auth-token=x", "-server-require-auth"] {
        let name = flag.split('=').next().unwrap();
        assert_wp_error(
            &home.cli(&["server", "bootstrap", flag], &[]),
            &format!("flag provided but not defined: {name}"),
        );
    }
    // Go's other texts; -v/-vv are stripped wherever they are.
    assert_wp_error(
        &home.cli(&["runner", "token", "-vv", "-expires-in=5d"], &[]),
        "invalid value \"5d\" for flag -expires-in: time: unknown unit \"ds\" in duration \"5ds\"",
    );
    assert_wp_error(
        &home.cli(&["runner", "token", "-label=nokey"], &[]),
        "invalid value \"nokey\" for flag -label: missing = in KV pair: \"nokey\"",
    );
    assert_wp_error(
        &home.cli(&["server", "bootstrap", "-server-tls=maybe"], &[]),
        "invalid boolean value \"maybe\" for -server-tls: strconv.ParseBool: parsing \"maybe\": invalid syntax",
    );
    assert_wp_error(
        &home.cli(&["server", "bootstrap", "-server-addr"], &[]),
        "flag needs an argument: -server-addr",
    );
    assert_wp_error(
        &home.cli(&["runner", "agent", "-concurrency=x"], &[]),
        "invalid value \"x\" for flag -concurrency: strconv.ParseInt: parsing \"x\": invalid syntax",
    );
    assert_wp_error(
        &home.cli(&["runner", "forget", "some-id", "-plain"], &[]),
        "Flags must be specified before positional arguments in the CLI command.",
    );
    // Telemetry flags have Waypoint's names (the TOS refusal proves the parse went through).
    assert_wp_error(
        &home.cli(
            &["server", "run", "-telemetry-opencensus-agent-addr=x"],
            &[],
        ),
        "flag provided but not defined: -telemetry-opencensus-agent-addr",
    );
    let dir = tempfile::tempdir().unwrap();
    let db = format!("-db={}/data.db", dir.path().display());
    let out = home.cli(
        &[
            "server",
            "run",
            &db,
            "-telemetry-oc-agent-addr=x",
            "-url-api-addr=a:1",
            "-p",
            "x",
            "-w=y",
            "-a",
            "z",
            "-plain",
        ],
        &[],
    );
    assert_wp_error(
        &out,
        "The \"-accept-tos\" flag must be provided to use the Waypoint URL service.",
    );
    assert!(
        !dir.path().join("data.db").exists(),
        "a refused start must not touch the data dir"
    );
    // The TOS rule only holds with the default control address.
    let missing = format!("-db={}/no/such/dir/data.db", dir.path().display());
    let out = home.cli(
        &[
            "server",
            "run",
            &missing,
            "-url-control-addr=https://example.invalid",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("! Error opening database: open ")
            && stdout(&out).contains("no such file or directory"),
        "{}",
        stdout(&out)
    );

    // Every command creates the CLI directory first, and fails without it.
    assert!(home.path().join(".config/waypoint").is_dir());
    let blocked = tempfile::tempdir().unwrap();
    std::fs::write(blocked.path().join(".config"), b"a file").unwrap();
    let out = Command::new(BIN)
        .args(["token", "new"])
        .env("HOME", blocked.path())
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .unwrap();
    assert_wp_error(
        &out,
        &format!(
            "could not create any of the following paths: {}/.config/waypoint",
            blocked.path().display()
        ),
    );
}

#[test]
fn bootstrap_once_writes_a_context_and_tokens_follow_waypoints_rules() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data.db");
    let mut server = home.start_server(&db, "127.0.0.1:0", &[]);
    assert_eq!(
        api_json(&server.grpc, Method::GET, "/v1/status", None)["bootstrapped"],
        false
    );
    assert!(
        server
            .proc
            .stdout()
            .contains("» Server requires bootstrapping!")
    );

    // First bootstrap: only the token on stdout, and a default CLI context with it.
    let first = bootstrap(&home, &server.grpc, &[]);
    assert!(first.status.success(), "{first:?}");
    let boot = stdout(&first);
    assert_token(&boot);
    let ctx_dir = home.path().join(".config/waypoint/context");
    let default = std::fs::read_link(ctx_dir.join("_default.hcl")).unwrap();
    let name = default.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with("bootstrap-") && name.ends_with(".hcl"),
        "{name}"
    );
    let ctx = std::fs::read_to_string(ctx_dir.join(&name)).unwrap();
    assert!(
        ctx.contains(&boot) && ctx.contains("require_auth     = true"),
        "{ctx}"
    );
    // Commands without any environment now connect through that context.
    let out = home.cli(&["user", "token"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_token(&stdout(&out));

    // Second bootstrap: Waypoint's refusal, on stdout, exit 1.
    assert_wp_error(
        &bootstrap(&home, &server.grpc, &["-context-create="]),
        "Error bootstrapping the server: server is already bootstrapped",
    );

    // token new: the deprecation note on stderr, the token alone on stdout.
    let bare = Home::new();
    let out = bare.cli(&["token", "new"], &client_env(&server.grpc, &boot));
    assert!(out.status.success(), "{out:?}");
    let login = stdout(&out);
    assert_token(&login);
    assert!(stderr(&out).contains("deprecated"));
    assert_eq!(
        api_json(&server.grpc, Method::GET, "/v1/whoami", Some(&login))["token_kind"],
        "login"
    );

    // Refusals with Waypoint's texts.
    assert_wp_error(
        &bare.cli(
            &["token", "new"],
            &client_env(&server.grpc, "0123456789abcdef0123"),
        ),
        "failed to base58 decode token: Invalid base58 digit ('0')",
    );
    let other_home = Home::new();
    let other_dir = tempfile::tempdir().unwrap();
    let other = other_home.start_server(&other_dir.path().join("data.db"), "127.0.0.1:0", &[]);
    let foreign = stdout(&bootstrap(&other_home, &other.grpc, &["-context-create="]));
    assert_wp_error(
        &bare.cli(&["token", "new"], &client_env(&server.grpc, &foreign)),
        "bad token signature: invalid authentication token",
    );
    assert_wp_error(
        &bare.cli(
            &["token", "new"],
            &[
                ("WAYPOINT_SERVER_ADDR", &server.grpc),
                ("WAYPOINT_SERVER_TLS", "1"),
                ("WAYPOINT_SERVER_TLS_SKIP_VERIFY", "1"),
            ],
        ),
        "Authorization token is not supplied",
    );
    assert_wp_error(
        &bare.cli(&["user", "token"], &[]),
        "failed to create client: no server connection configuration found",
    );

    // Runner tokens: scoped to their runner, refused for minting login tokens (after the
    // tarpit while that runner is unknown), and they expire.
    let out = bare.cli(
        &["runner", "token", "-id=host-runner-1", "-expires-in=0"],
        &client_env(&server.grpc, &boot),
    );
    assert!(out.status.success(), "{out:?}");
    let runner_token = stdout(&out);
    assert_token(&runner_token);
    let t0 = Instant::now();
    assert_wp_error(
        &bare.cli(&["token", "new"], &client_env(&server.grpc, &runner_token)),
        "runner is not adopted",
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(5),
        "the tarpit: {:?}",
        t0.elapsed()
    );
    let out = bare.cli(
        &["runner", "token", "-expires-in=1s"],
        &client_env(&server.grpc, &boot),
    );
    let short = stdout(&out);
    std::thread::sleep(Duration::from_millis(1200));
    let out = bare.cli(&["runner", "list"], &client_env(&server.grpc, &short));
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.starts_with("! Token has expired. The token was valid until: "),
        "{text}"
    );
    assert!(
        text.lines().skip(1).all(|l| l.starts_with("  ")),
        "wrapped lines are indented: {text}"
    );
    assert!(
        text.replace("\n  ", " ")
            .contains("invalid authentication token"),
        "{text}"
    );

    // As in Waypoint, the environment means plain gRPC unless WAYPOINT_SERVER_TLS says TLS:
    // against a TLS-only server the 10 s dial runs out.
    let t0 = Instant::now();
    assert_wp_error(
        &bare.cli(
            &["token", "new"],
            &[
                ("WAYPOINT_SERVER_ADDR", &server.grpc),
                ("WAYPOINT_SERVER_TOKEN", &boot),
            ],
        ),
        "failed to create client: error connecting to server: context deadline exceeded",
    );
    assert!(t0.elapsed() >= Duration::from_secs(9), "{:?}", t0.elapsed());

    // config-set: Waypoint's output, persisted, shown in /v1/status.
    let out = bare.cli(
        &[
            "server",
            "config-set",
            "-advertise-addr=192.0.2.10:9701",
            "-advertise-tls-skip-verify=true",
        ],
        &client_env(&server.grpc, &login),
    );
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains("» Modifying server configuration with the following settings:"),
        "{text}"
    );
    assert!(
        text.contains("             advertise-addr: 192.0.2.10:9701"),
        "{text}"
    );
    assert!(text.ends_with("Server configuration set!"), "{text}");
    assert_eq!(
        api_json(&server.http, Method::GET, "/v1/status", None)["advertise_addr"],
        "192.0.2.10:9701"
    );

    // The state file is private; no certificate is kept in the data dir.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        ["data.db"],
        "per-start certificates are not persisted"
    );

    // Restart: SIGTERM ends the server cleanly; tokens stay valid, bootstrap stays closed.
    assert!(server.proc.terminate().success());
    let first_log = server.proc.log();
    let server = home.start_server(&db, &server.grpc, &[]);
    assert_wp_error(
        &bootstrap(&home, &server.grpc, &["-context-create="]),
        "Error bootstrapping the server: server is already bootstrapped",
    );
    assert_eq!(
        api(&server.grpc, Method::GET, "/v1/whoami", Some(&boot))
            .unwrap()
            .status,
        200
    );
    // No token value ever reaches the server's logs, which are all stand-in lines on stderr.
    let logs = format!("{first_log}\n{}", server.proc.log());
    assert!(
        logs.lines().all(|l| l.starts_with("waypoint stand-in:")),
        "{logs}"
    );
    for secret in [&boot, &login, &runner_token] {
        assert!(
            !logs.contains(secret.as_str()),
            "a token leaked into the server log"
        );
    }
    drop(other);
}

#[test]
fn bootstrap_prints_the_token_then_fails_when_the_context_cannot_be_written() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let server = home.start_server(&dir.path().join("data.db"), "127.0.0.1:0", &[]);
    // The CLI directory exists, but its `context` entry is a dangling symlink: no default
    // context (so the command starts), and no context directory can be made there.
    let cli_dir = home.path().join(".config/waypoint");
    std::fs::create_dir_all(&cli_dir).unwrap();
    std::os::unix::fs::symlink("/nonexistent/standin-context", cli_dir.join("context")).unwrap();
    let out = bootstrap(&home, &server.grpc, &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(&out);
    let mut lines = text.lines();
    let token = lines.next().unwrap();
    assert_token(token);
    let error = lines.next().unwrap();
    assert!(
        error.starts_with("! Error setting the CLI context: mkdir "),
        "{text}"
    );
    assert!(
        error.ends_with("/.config/waypoint/context: file exists"),
        "{text}"
    );
    assert!(
        text.contains(
            "  The Waypoint server successfully bootstrapped, but creating the context failed."
        ),
        "{text}"
    );
    // The server is bootstrapped with exactly that token.
    assert_eq!(
        api_json(&server.grpc, Method::GET, "/v1/whoami", Some(token))["token_kind"],
        "login"
    );
}

#[test]
fn runner_agent_lives_like_waypoints_runner() {
    let home = Home::new();
    // Nothing listens: exit 1 after the 10 s start-up dial, instead of retrying forever.
    let dead = format!("127.0.0.1:{}", free_port());
    let t0 = Instant::now();
    let out = home.cli(&["runner", "agent", "-id=x"], &client_env(&dead, "t"));
    assert_wp_error(
        &out,
        "failed to create client: error connecting to server: context deadline exceeded",
    );
    assert!(t0.elapsed() >= Duration::from_secs(9), "{:?}", t0.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data.db");
    let mut server = home.start_server(&db, "127.0.0.1:0", &[]);
    let boot = stdout(&bootstrap(&home, &server.grpc, &["-context-create="]));
    let out = home.cli(
        &["runner", "token", "-id=runner-one"],
        &client_env(&server.grpc, &boot),
    );
    assert!(out.status.success(), "{out:?}");
    let runner_token = stdout(&out);

    let certs = tempfile::tempdir().unwrap();
    let pki = Pki::new("test ca");
    pki.write_client_dir(certs.path(), &pki);
    let status_file = dir.path().join("runner-status.json");
    let docker_port = free_port(); // nothing listens there
    let mut runner = start_runner(
        &home,
        &server.grpc,
        &runner_token,
        docker_port,
        certs.path(),
        &status_file,
        "runner-one",
    );
    let status = poll("the runner to register and report docker down", || {
        let s = read_status(&status_file)?;
        (s["server_ok"] == true && s["docker_error"].is_string()).then_some(s)
    });
    assert_eq!(status["registered_as"], "runner-one");
    assert_eq!(status["docker_tls_verified"], true);
    assert!(runner.stdout().contains("» Runner configuration:"));
    let list = home.cli(&["runner", "list"], &client_env(&server.grpc, &boot));
    assert!(
        stdout(&list).contains("runner-one") && stdout(&list).contains("preadopted"),
        "{list:?}"
    );
    let runners = api_json(&server.grpc, Method::GET, "/v1/runners", Some(&boot));
    assert_eq!(runners["runners"][0]["online"], true);

    // The same token used by a runner with another id is refused; that runner stays up,
    // unregistered, and is not listed.
    let other_status = dir.path().join("other-status.json");
    let mut other = start_runner(
        &home,
        &server.grpc,
        &runner_token,
        docker_port,
        certs.path(),
        &other_status,
        "runner-two",
    );
    let s = poll("the other runner to be refused", || {
        let s = read_status(&other_status)?;
        s["server_error"].is_string().then_some(s)
    });
    assert_eq!(
        s["server_error"],
        "provided runner token is for a different runner"
    );
    assert_eq!(
        s["docker_host"], "",
        "Docker is not touched before a registration"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        other.running(),
        "Waypoint's runner does not exit after its start"
    );
    other.terminate();

    // The server goes away and comes back on the same port: the runner registers again.
    let grpc = server.grpc.clone();
    assert!(server.proc.terminate().success());
    poll("the runner to notice the server is gone", || {
        let s = read_status(&status_file)?;
        (s["server_ok"] == false).then_some(())
    });
    assert!(runner.running(), "the runner must survive a server outage");
    let server = home.start_server(&db, &grpc, &[]);
    poll("the runner to register again", || {
        let s = read_status(&status_file)?;
        (s["server_ok"] == true).then_some(())
    });

    // SIGTERM ends it cleanly; the server then lists exactly no runner.
    assert!(runner.terminate().success());
    poll("the server to forget the stopped runner", || {
        let out = home.cli(&["runner", "list"], &client_env(&server.grpc, &boot));
        (stdout(&out) == "No runners found").then_some(())
    });
    let out = home.cli(
        &["runner", "forget", "never-seen"],
        &client_env(&server.grpc, &boot),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "Runner \"never-seen\" forgotten.");
    let log = runner.log();
    assert!(
        !log.contains(&runner_token),
        "the token leaked into the runner log"
    );
    assert!(log.contains("runner: docker tcp://127.0.0.1:"), "{log}");
}

#[test]
fn server_run_tries_the_url_service_and_uses_given_certificates() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    // The URL service is on by default: the server tries it before opening its listeners.
    let url = format!("-url-api-addr=127.0.0.1:{}", free_port());
    let mut cmd = home.command();
    cmd.args(["server", "run", "-accept-tos", &url])
        .arg(format!("-db={}/data.db", dir.path().display()))
        .args(["-listen-grpc=127.0.0.1:0", "-listen-http=127.0.0.1:0"]);
    let server = Proc::spawn(&mut cmd);
    server.wait_line("URL service unavailable, will retry in the background");
    server.wait_line("grpc listening on ");
    let banner = poll("the banner", || {
        let s = server.stdout();
        s.contains("URL Service:").then_some(s)
    });
    assert!(banner.contains("(account: guest)"), "{banner}");
    drop(server);

    // With -tls-cert-file/-tls-key-file the listeners serve that certificate.
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "given");
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    let db2 = dir.path().join("db2.db");
    let server = home.start_server(
        &db2,
        "127.0.0.1:0",
        &[
            &format!("-tls-cert-file={}", dir.path().join("cert.pem").display()),
            &format!("-tls-key-file={}", dir.path().join("key.pem").display()),
        ],
    );
    let (host, port) = server.http.rsplit_once(':').unwrap();
    let config = tls::client_config_with_ca(&dir.path().join("cert.pem"), None).unwrap();
    let client = HttpClient::new(
        Target::Tcp {
            host: host.to_string(),
            port: port.parse().unwrap(),
        },
        Some((config, tls::server_name(host).unwrap())),
        Duration::from_secs(5),
    );
    let reply = block_on(client.send(Method::GET, "/", None, None)).expect("verified tls");
    assert_eq!(reply.status, 200);
}

#[test]
fn snapshot_and_restore_bring_back_the_signing_key() {
    let home = Home::new();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let db_a = dir_a.path().join("data.db");
    let mut a = home.start_server(&db_a, "127.0.0.1:0", &[]);
    let b = home.start_server(&dir_b.path().join("data.db"), "127.0.0.1:0", &[]);
    let token_a = stdout(&bootstrap(&home, &a.grpc, &["-context-create="]));
    let token_b = stdout(&bootstrap(&home, &b.grpc, &["-context-create="]));

    // A file target is created empty and fails, as in 0.11.4.
    let file = home.path().join("snap.bin");
    let out = home.cli(
        &["server", "snapshot", file.to_str().unwrap()],
        &client_env(&b.grpc, &token_b),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "Error generating Snapshot: rpc error: code = Unknown desc = error writing snapshot data: write {}: bad file descriptor",
            file.display()
        )
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
    // Stdout works.
    let out = home.cli(&["server", "snapshot", "-"], &client_env(&b.grpc, &token_b));
    assert!(out.status.success(), "{out:?}");
    let snapshot = out.stdout.clone();
    assert!(!snapshot.is_empty());

    // Restore B's snapshot into A with -exit: staged, A exits 2, nothing changed before that.
    let mut restore = home.command();
    restore
        .args(["server", "restore", "-exit", "-"])
        .envs(client_env(&a.grpc, &token_a))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = restore.spawn().unwrap();
    child.stdin.take().unwrap().write_all(&snapshot).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "Server data restored.");
    assert_eq!(
        a.proc.wait_exit().code(),
        Some(2),
        "the server exits 2 after staging"
    );

    // At the next start A has B's data and key: A's own tokens are foreign now.
    let a2 = home.start_server(&db_a, "127.0.0.1:0", &[]);
    let reply = api(&a2.grpc, Method::GET, "/v1/whoami", Some(&token_a)).unwrap();
    assert_eq!(reply.status, 401);
    assert!(
        reply
            .text()
            .contains("bad token signature: invalid authentication token"),
        "{}",
        reply.text()
    );
    assert_eq!(
        api(&a2.grpc, Method::GET, "/v1/whoami", Some(&token_b))
            .unwrap()
            .status,
        200
    );
    assert!(a2.proc.log().contains("applied the staged restore"));
}

/// Runs `waypoint ARGS` with the client environment of `grpc` and `token` and asserts it
/// succeeded; returns its stdout.
fn cli_ok(home: &Home, args: &[&str], grpc: &str, token: &str) -> String {
    let out = home.cli(args, &client_env(grpc, token));
    assert!(out.status.success(), "{args:?}: {out:?}");
    stdout(&out)
}

/// Asserts exit 1 and an error-style block on stdout starting with `prefix` (for errors that
/// Waypoint prints without wrapping them, or with a command's help after them).
fn assert_wp_error_prefix(out: &Output, prefix: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(out);
    assert!(
        error_block(&text).is_some_and(|b| b.starts_with(prefix)),
        "wanted `! {prefix}` on stdout, got: {text:?} (stderr: {:?})",
        stderr(out)
    );
}

/// Asserts exit 1 and the error-style block on stdout (unwrapped) equal to `block`.
fn assert_wp_error_block(out: &Output, block: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        error_block(&stdout(out)).as_deref(),
        Some(block),
        "stdout: {}",
        stdout(out)
    );
}

#[test]
fn projects_apply_list_inspect_like_waypoint() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let server = home.start_server(&dir.path().join("data.db"), "127.0.0.1:0", &[]);
    let token = stdout(&bootstrap(&home, &server.grpc, &["-context-create="]));
    let env = client_env(&server.grpc, &token);
    let grpc = server.grpc.as_str();

    assert_eq!(
        cli_ok(&home, &["project", "list"], grpc, &token),
        "No projects found."
    );

    // Flag sets and argument rules.
    assert_wp_error(
        &home.cli(&["project", "apply", "-bogus", "x"], &env),
        "flag provided but not defined: -bogus",
    );
    for cmd in [
        &["project", "apply"][..],
        &["project", "list"],
        &["project", "inspect"],
    ] {
        let mut args = cmd.to_vec();
        args.push("-server-addr=127.0.0.1:9701");
        assert_wp_error(
            &home.cli(&args, &env),
            "flag provided but not defined: -server-addr",
        );
    }
    assert_wp_error(
        &home.cli(&["project", "list", "-remote"], &env),
        "The -remote flag has been deprecated. Use -local=false instead",
    );
    assert_wp_error_prefix(
        &home.cli(&["project", "apply"], &env),
        "Single argument required.",
    );
    assert_wp_error(
        &home.cli(&["project", "apply", "x", "-data-source=git"], &env),
        "Flags must be specified before positional arguments in the CLI command.",
    );
    assert_wp_error(
        &home.cli(&["project", "apply", "web/app"], &env),
        "The project/app argument has been deprecated.",
    );
    let out = home.cli(&["project", "bogus"], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("apply"), "{}", stderr(&out));

    // Create, then update: the non-interactive UI's step lines.
    let out = cli_ok(
        &home,
        &[
            "project",
            "apply",
            "-data-source=git",
            "-git-url=https://example.com/r.git",
            "-git-ref=main",
            "MyApp",
        ],
        grpc,
        &token,
    );
    assert_eq!(
        out,
        "-> Checking for an existing project named: MyApp\n\
         -> Creating project \"MyApp\"...\n\
         -> Project \"MyApp\" created"
    );
    let out = cli_ok(
        &home,
        &[
            "project",
            "apply",
            "-data-source=git",
            "-git-path=sub",
            "myapp",
        ],
        grpc,
        &token,
    );
    assert_eq!(
        out,
        "-> Checking for an existing project named: myapp\n\
         -> Updating project \"myapp\"...\n\
         -> Project \"myapp\" updated"
    );
    cli_ok(
        &home,
        &["project", "apply", "-data-source=local", "other"],
        grpc,
        &token,
    );
    // Waypoint 0.11.4 prints an unknown data source and still upserts.
    let out = cli_ok(
        &home,
        &["project", "apply", "-data-source=svn", "odd"],
        grpc,
        &token,
    );
    assert!(
        out.contains(
            "\n! Unknown value for -data-source set. Must be either 'git' or 'local' or unset.\n"
        ) && out.ends_with("-> Project \"odd\" created"),
        "{out}"
    );

    // The server's refusals, through the CLI.
    assert_wp_error_block(
        &home.cli(&["project", "apply", "a.b"], &env),
        "Error upserting project: project: (name: name \"a.b\" must be alpha numeric.).",
    );
    assert_wp_error_block(
        &home.cli(
            &[
                "project",
                "apply",
                "-data-source=git",
                "-git-auth-type=basic",
                "needs-creds",
            ],
            &env,
        ),
        "Error upserting project: project: (data_source: (Source: (Git: (Auth: (Basic: \
         (password: cannot be blank; username: cannot be blank.).); url: cannot be blank.).).).).",
    );
    assert_wp_error_block(
        &home.cli(
            &[
                "project",
                "apply",
                "-data-source=git",
                "-git-url=https://example.com/r.git",
                "-poll",
                "-poll-interval=30",
                "polled",
            ],
            &env,
        ),
        "Error upserting project: project: (data_source_poll: (interval: time: missing unit in \
         duration \"30\".).).",
    );
    let big = home.path().join("big.hcl");
    std::fs::write(&big, vec![b'#'; 6000]).unwrap();
    let big_arg = format!("-waypoint-hcl={}", big.display());
    assert_wp_error_block(
        &home.cli(&["project", "apply", &big_arg, "big"], &env),
        "Error upserting project: failed to upsert project \"project_name\": \"big\"",
    );
    assert_wp_error_prefix(
        &home.cli(&["project", "apply", "-poll", "nosource"], &env),
        "To enable polling, you must specify a git data source for the project with -data-source=git",
    );
    assert_wp_error_prefix(
        &home.cli(&["project", "apply", "-waypoint-hcl=w.txt", "x"], &env),
        "Error reading HCL file specified with the -waypoint-hcl flag: open w.txt: no such file or directory",
    );
    assert_wp_error_prefix(
        &home.cli(
            &["project", "apply", "-from-waypoint-hcl=waypoint.hcl", "x"],
            &env,
        ),
        "Error loading HCL file specified with the -from-waypoint-hcl flag: waypoint stand-in:",
    );

    // list: the ids (lower case), sorted, one a line; -json: one document each.
    assert_eq!(
        cli_ok(&home, &["project", "list"], grpc, &token),
        "myapp\nodd\nother"
    );
    assert_eq!(
        cli_ok(&home, &["project", "list", "-json"], grpc, &token),
        "{\n\t\"project\": \"myapp\"\n}\n{\n\t\"project\": \"odd\"\n}\n{\n\t\"project\": \"other\"\n}"
    );

    // inspect: 0.11.4 wants -project even with a NAME.
    assert_wp_error(
        &home.cli(&["project", "inspect", "myapp"], &env),
        "No project specified, and no waypoint.hcl found.",
    );
    let out = cli_ok(&home, &["project", "inspect", "-p", "MYAPP"], grpc, &token);
    for row in [
        "» Project Info:",
        "              Project Name: MyApp",
        "            Remote Enabled: true",
        "               Data Source: Git",
        "                   Git URL: https://example.com/r.git",
        "                   Git Ref: main",
        "                  Git Path: sub",
        "  Data Source Poll Enabled: false",
    ] {
        assert!(out.lines().any(|l| l == row), "{row:?} in:\n{out}");
    }
    assert!(
        !out.contains("Workspaces"),
        "empty rows are left out: {out}"
    );
    let out = cli_ok(
        &home,
        &["project", "inspect", "-p", "x", "-json", "other"],
        grpc,
        &token,
    );
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({ "name": "other", "dataSource": { "local": {} } })
    );
    let out = home.cli(&["project", "inspect", "-p", "nope"], &env);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out),
        "! Failed to format project: failed to get project\n  \"project_name\": \"\""
    );
    assert_wp_error_prefix(
        &home.cli(&["project", "inspect", "-p", "x", "a", "b"], &env),
        "No more than 1 argument required.",
    );

    // Authentication as for every client command; a runner token may apply (no RBAC).
    let no_token = [
        ("WAYPOINT_SERVER_ADDR", grpc),
        ("WAYPOINT_SERVER_TLS", "true"),
        ("WAYPOINT_SERVER_TLS_SKIP_VERIFY", "true"),
    ];
    assert_wp_error(
        &home.cli(&["project", "list"], &no_token),
        "Authorization token is not supplied",
    );
    assert_wp_error(
        &home.cli(&["project", "apply", "x"], &no_token),
        "Error checking for project: Authorization token is not supplied",
    );
    let runner = cli_ok(&home, &["runner", "token"], grpc, &token);
    cli_ok(&home, &["project", "apply", "from-runner"], grpc, &runner);
    assert!(
        cli_ok(&home, &["project", "list"], grpc, &runner)
            .lines()
            .any(|l| l == "from-runner")
    );
    assert_eq!(
        api_json(grpc, Method::GET, "/v1/status", None)["projects"],
        4
    );

    // Without any server configuration: Waypoint's local server on ./data.db.
    let local = Home::new();
    let out = local.cli(&["project", "apply", "solo"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&local.cli(&["project", "list"], &[])), "solo");
    assert!(local.path().join("data.db").exists());
}

#[test]
fn snapshot_and_restore_keep_projects() {
    let home = Home::new();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = home.start_server(&dir_a.path().join("data.db"), "127.0.0.1:0", &[]);
    let db_b = dir_b.path().join("data.db");
    let mut b = home.start_server(&db_b, "127.0.0.1:0", &[]);
    let token_a = stdout(&bootstrap(&home, &a.grpc, &["-context-create="]));
    let token_b = stdout(&bootstrap(&home, &b.grpc, &["-context-create="]));
    cli_ok(
        &home,
        &[
            "project",
            "apply",
            "-data-source=git",
            "-git-url=https://example.com/web.git",
            "-git-ref=v1",
            "Web",
        ],
        &a.grpc,
        &token_a,
    );
    cli_ok(
        &home,
        &["project", "apply", "-data-source=local", "tools"],
        &a.grpc,
        &token_a,
    );
    cli_ok(&home, &["project", "apply", "only-on-b"], &b.grpc, &token_b);

    let out = home.cli(&["server", "snapshot", "-"], &client_env(&a.grpc, &token_a));
    assert!(out.status.success(), "{out:?}");
    let snapshot = out.stdout.clone();

    // Restore A's snapshot into B: staged, B exits 2, and at its next start B has A's
    // projects (and only those: the restore replaces the whole state).
    let mut restore = home.command();
    restore
        .args(["server", "restore", "-exit", "-"])
        .envs(client_env(&b.grpc, &token_b))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = restore.spawn().unwrap();
    child.stdin.take().unwrap().write_all(&snapshot).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(b.proc.wait_exit().code(), Some(2));

    let b2 = home.start_server(&db_b, "127.0.0.1:0", &[]);
    // A's key came along, so A's token works on B now.
    assert_eq!(
        cli_ok(&home, &["project", "list"], &b2.grpc, &token_a),
        "tools\nweb"
    );
    let out = cli_ok(
        &home,
        &["project", "inspect", "-p", "web", "-json"],
        &b2.grpc,
        &token_a,
    );
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["name"], "Web");
    assert_eq!(doc["remoteEnabled"], true);
    assert_eq!(
        doc["dataSource"]["git"]["url"],
        "https://example.com/web.git"
    );
    assert_eq!(doc["dataSource"]["git"]["ref"], "v1");
    assert_eq!(
        api_json(&b2.grpc, Method::GET, "/v1/status", None)["projects"],
        2
    );
}

/// A test PKI: a CA, a daemon certificate for 127.0.0.1 and a client certificate, written in
/// the Docker CLI layout (ca.pem, cert.pem, key.pem) into `client_dir`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Pki {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn leaf(&self, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write_client_dir(&self, dir: &Path, trusted_ca: &Pki) {
        let (cert, key) = self.leaf(&[], ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(dir.join("ca.pem"), trusted_ca.ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
    }
}

/// A fake Docker API on 127.0.0.1 that demands a client certificate from `pki` (like
/// `dockerd --tlsverify`) and answers `GET /version`. Stops when dropped.
struct FakeDocker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    versions_served: Arc<AtomicUsize>,
}

impl FakeDocker {
    fn start(port: u16, pki: &Pki) -> FakeDocker {
        let (cert_pem, key_pem) = pki.leaf(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        let certs = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
        listener.set_nonblocking(true).unwrap();
        let versions_served = Arc::new(AtomicUsize::new(0));
        let served = versions_served.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let accept_loop = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let acceptor = acceptor.clone();
                        let served = served.clone();
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let service = hyper::service::service_fn(
                                move |req: hyper::Request<hyper::body::Incoming>| {
                                    let served = served.clone();
                                    async move {
                                        let body = if req.uri().path() == "/version" {
                                            served.fetch_add(1, Ordering::SeqCst);
                                            r#"{"Version":"20.10.24+fake","ApiVersion":"1.41"}"#
                                        } else {
                                            r#"{"message":"not found"}"#
                                        };
                                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                            Bytes::from(body),
                                        )))
                                    }
                                },
                            );
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept_loop => {}
                    _ = stopped => {}
                }
            });
        });
        FakeDocker {
            stop: Some(stop),
            thread: Some(thread),
            versions_served,
        }
    }
}

impl Drop for FakeDocker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn runner_verifies_docker_with_mutual_tls_and_recovers_when_docker_appears() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let server = home.start_server(&dir.path().join("data.db"), "127.0.0.1:0", &[]);
    let boot = stdout(&bootstrap(&home, &server.grpc, &["-context-create="]));
    assert_token(&boot);

    let pki = Pki::new("docker ca");
    let good = tempfile::tempdir().unwrap();
    pki.write_client_dir(good.path(), &pki);
    // Same client certificate authority, but the runner trusts a different CA for the daemon.
    let rogue = Pki::new("rogue ca");
    let bad = tempfile::tempdir().unwrap();
    pki.write_client_dir(bad.path(), &rogue);

    let docker_port = free_port();
    let good_status = dir.path().join("good.json");
    let bad_status = dir.path().join("bad.json");
    // A login token is accepted by runners too (Waypoint's legacy pre-adoption).
    let good_runner = start_runner(
        &home,
        &server.grpc,
        &boot,
        docker_port,
        good.path(),
        &good_status,
        "good",
    );
    let bad_runner = start_runner(
        &home,
        &server.grpc,
        &boot,
        docker_port,
        bad.path(),
        &bad_status,
        "bad",
    );

    // Docker is not there yet.
    poll("the runner to report docker unreachable", || {
        let s = read_status(&good_status)?;
        (s["docker_ok"] == false && s["docker_error"].is_string()).then_some(())
    });

    // Docker appears: the runner with the right CA and client certificate gets its version.
    let docker = FakeDocker::start(docker_port, &pki);
    let status = poll("the runner to reach docker over mutual tls", || {
        let s = read_status(&good_status)?;
        (s["docker_ok"] == true && s["server_ok"] == true).then_some(s)
    });
    assert_eq!(status["docker_version"], "20.10.24+fake");
    assert_eq!(status["docker_tls_verified"], true);
    assert_eq!(status["docker_error"], Value::Null);
    assert!(docker.versions_served.load(Ordering::SeqCst) >= 1);
    poll(
        "the server to list the runner with its docker version",
        || {
            let runners = api_json(&server.grpc, Method::GET, "/v1/runners", Some(&boot));
            let list = runners["runners"].as_array()?.clone();
            list.iter()
                .any(|r| r["id"] == "good" && r["docker_version"] == "20.10.24+fake")
                .then_some(())
        },
    );

    // The runner that trusts another CA refuses the daemon's certificate.
    let status = poll("the runner with the wrong ca to fail verification", || {
        let s = read_status(&bad_status)?;
        let err = s["docker_error"].as_str()?.to_string();
        err.contains("certificate").then_some(s)
    });
    assert_eq!(status["docker_ok"], false);
    assert_eq!(
        status["server_ok"], true,
        "docker failing must not hold back registration"
    );
    drop(good_runner);
    drop(bad_runner);
    drop(docker);
}
