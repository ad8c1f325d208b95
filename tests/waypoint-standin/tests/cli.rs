//! Drives the real `waypoint` stand-in binary on loopback: server, bootstrap-once across a
//! restart, tokens, config, and the runner agent against the server and against a fake Docker
//! API that demands mutual TLS. No Docker daemon needed. Every process started here is killed
//! by its own handle when its guard drops, even when an assertion fails.

use std::io::{BufRead, BufReader};
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
const DEADLINE: Duration = Duration::from_secs(20);

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

/// A child process with its stderr captured line by line; killed (by PID, via its handle) on drop.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn waypoint");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[child] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, lines }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
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
        poll("the child to exit after SIGTERM", || {
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

fn start_server(db: &Path, grpc: &str) -> ServerProc {
    let proc = Proc::spawn(
        Command::new(BIN)
            .arg("server")
            .arg("run")
            .arg("-accept-tos")
            .arg(format!("-db={}", db.display()))
            .arg(format!("-listen-grpc={grpc}"))
            .args(["-listen-http", "127.0.0.1:0"]),
    );
    let grpc = addr_after(&proc.wait_line("grpc listening on "), "grpc listening on ");
    let http = addr_after(&proc.wait_line("http listening on "), "http listening on ");
    let server = ServerProc { proc, grpc, http };
    // Readiness the way the agent checks it: HTTPS on the HTTP port answers.
    poll("the server to answer GET / over tls", || {
        let reply = api(&server.http, Method::GET, "/", None).ok()?;
        (reply.status == 200 && reply.text() == "waypoint stand-in server").then_some(())
    });
    server
}

fn api(addr: &str, method: Method, path: &str, token: Option<&str>) -> Result<Reply, String> {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let target = Target::Tcp {
        host: host.to_string(),
        port: port.parse().expect("port"),
    };
    let config = tls::client_config_skip_verify(None).map_err(|e| e.to_string())?;
    let name = tls::server_name(host).map_err(|e| e.to_string())?;
    let client = HttpClient::new(target, Some((config, name)), Duration::from_secs(5));
    block_on(client.send(method, path, token, None)).map_err(|e| e.to_string())
}

fn api_json(addr: &str, method: Method, path: &str, token: Option<&str>) -> Value {
    let reply = api(addr, method, path, token).expect("api call");
    assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    serde_json::from_slice(&reply.body).expect("json")
}

/// Runs the CLI with a clean Waypoint/Docker environment plus `env`.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for var in [
        "WAYPOINT_SERVER_ADDR",
        "WAYPOINT_SERVER_TOKEN",
        "WAYPOINT_SERVER_TLS",
        "WAYPOINT_SERVER_TLS_SKIP_VERIFY",
        "DOCKER_HOST",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "DOCKER_TLS",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run waypoint")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn bootstrap(grpc: &str) -> Output {
    cli(
        &[
            "server",
            "bootstrap",
            &format!("-server-addr={grpc}"),
            "-server-tls-skip-verify",
        ],
        &[],
    )
}

fn client_env<'a>(grpc: &'a str, token: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("WAYPOINT_SERVER_ADDR", grpc),
        ("WAYPOINT_SERVER_TOKEN", token),
        ("WAYPOINT_SERVER_TLS", "true"),
        ("WAYPOINT_SERVER_TLS_SKIP_VERIFY", "true"),
    ]
}

fn assert_token(text: &str) {
    assert_eq!(text.len(), 64, "a token is 64 hex characters: {text:?}");
    assert!(text.chars().all(|c| c.is_ascii_hexdigit()), "{text:?}");
}

#[test]
fn version_help_and_usage_errors() {
    let out = cli(&["version"], &[]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "Waypoint v0.11.4 (stand-in)");
    let out = cli(&["--help"], &[]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("STAND-IN"));
    let out = cli(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown command"));
    let out = cli(&["server", "bootstrap", "-no-such-flag"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("flag provided but not defined: -no-such-flag"));
    // Like Waypoint, the server refuses to start without -accept-tos.
    let dir = tempfile::tempdir().unwrap();
    let out = cli(
        &[
            "server",
            "run",
            &format!("-db={}/data.db", dir.path().display()),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("-accept-tos"), "{}", stderr(&out));
    assert!(
        !dir.path().join("data.db").exists(),
        "a refused start must not touch the data dir"
    );
}

#[test]
fn bootstrap_once_survives_restart_and_tokens_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/data.db");
    let mut server = start_server(&db, "127.0.0.1:0");

    let status = api_json(&server.grpc, Method::GET, "/v1/status", None);
    assert_eq!(status["standin"], true);
    assert_eq!(status["bootstrapped"], false);

    // First bootstrap: only the token on stdout.
    let first = bootstrap(&server.grpc);
    assert!(first.status.success(), "{}", stderr(&first));
    let boot = stdout(&first);
    assert_token(&boot);
    // Second bootstrap: Waypoint's refusal, exit 1.
    let second = bootstrap(&server.grpc);
    assert_eq!(second.status.code(), Some(1));
    assert!(
        stderr(&second).contains("server is already bootstrapped"),
        "{}",
        stderr(&second)
    );
    assert_eq!(stdout(&second), "");

    // whoami: 401 without or with a wrong token, 200 with the bootstrap token.
    assert_eq!(
        api(&server.grpc, Method::GET, "/v1/whoami", None)
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        api(&server.grpc, Method::GET, "/v1/whoami", Some("wrong"))
            .unwrap()
            .status,
        401
    );
    let who = api_json(&server.http, Method::GET, "/v1/whoami", Some(&boot));
    assert_eq!(who["token_kind"], "bootstrap");

    // token new with the bootstrap token (environment), then with a wrong one.
    let out = cli(&["token", "new"], &client_env(&server.grpc, &boot));
    assert!(out.status.success(), "{}", stderr(&out));
    let login = stdout(&out);
    assert_token(&login);
    assert_eq!(
        api_json(&server.grpc, Method::GET, "/v1/whoami", Some(&login))["token_kind"],
        "login"
    );
    let wrong = "0123456789abcdef-not-a-token";
    let out = cli(&["token", "new"], &client_env(&server.grpc, wrong));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("rejected the token"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains(wrong) && stdout(&out).is_empty(),
        "no token may be echoed"
    );
    // As in Waypoint, the environment means plain gRPC unless WAYPOINT_SERVER_TLS says TLS;
    // against a TLS-only server that fails.
    let out = cli(
        &["token", "new"],
        &[
            ("WAYPOINT_SERVER_ADDR", server.grpc.as_str()),
            ("WAYPOINT_SERVER_TOKEN", boot.as_str()),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    // Flags instead of the environment, and the runner-token alias.
    let out = cli(
        &[
            "runner",
            "token",
            &format!("-server-addr={}", server.grpc),
            &format!("-server-auth-token={login}"),
            "-server-tls-skip-verify",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        api_json(&server.grpc, Method::GET, "/v1/whoami", Some(&stdout(&out)))["token_kind"],
        "runner"
    );

    // config-set persists and shows in /v1/status.
    let out = cli(
        &[
            "server",
            "config-set",
            "-advertise-addr=192.0.2.10:9701",
            "-advertise-tls-skip-verify=true",
        ],
        &client_env(&server.grpc, &login),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(
        &["server", "config-set", "-advertise-addr=192.0.2.10:9701"],
        &client_env(&server.grpc, wrong),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        api_json(&server.http, Method::GET, "/v1/status", None)["advertise_addr"],
        "192.0.2.10:9701"
    );

    // The state file is private; the certificate is kept for the restart.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let cert_before = std::fs::read(dir.path().join("data").join(tls::CERT_FILE)).unwrap();

    // Restart: SIGTERM ends the server cleanly; the new one refuses a second bootstrap.
    assert!(
        server.proc.terminate().success(),
        "server should exit 0 on SIGTERM"
    );
    let first_log = server.proc.log();
    let server = start_server(&db, "127.0.0.1:0");
    let again = bootstrap(&server.grpc);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("server is already bootstrapped"));
    assert_eq!(
        api_json(&server.grpc, Method::GET, "/v1/whoami", Some(&boot))["token_kind"],
        "bootstrap"
    );
    let status = api_json(&server.grpc, Method::GET, "/v1/status", None);
    assert_eq!(status["bootstrapped"], true);
    assert_eq!(status["advertise_addr"], "192.0.2.10:9701");
    let cert_after = std::fs::read(dir.path().join("data").join(tls::CERT_FILE)).unwrap();
    assert_eq!(
        cert_before, cert_after,
        "the self-signed certificate is reused after a restart"
    );

    // No token value ever reaches the server's logs.
    let logs = format!("{first_log}\n{}", server.proc.log());
    assert!(
        logs.lines().all(|l| l.starts_with("waypoint stand-in:")),
        "{logs}"
    );
    for secret in [&boot, &login] {
        assert!(
            !logs.contains(secret.as_str()),
            "a token leaked into the server log"
        );
    }
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
    grpc: &str,
    token: &str,
    docker_port: u16,
    cert_dir: &Path,
    status_file: &Path,
    id: &str,
) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["runner", "agent", "-vv", &format!("-id={id}")]);
    for (k, v) in client_env(grpc, token) {
        cmd.env(k, v);
    }
    cmd.env("DOCKER_HOST", format!("tcp://127.0.0.1:{docker_port}"))
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", cert_dir)
        .env_remove("DOCKER_TLS")
        .env("WAYPOINT_STANDIN_STATUS_FILE", status_file);
    Proc::spawn(&mut cmd)
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
fn runner_registers_survives_outages_and_reports_unreachable_docker() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data.db");
    let mut server = start_server(&db, "127.0.0.1:0");
    let boot = stdout(&bootstrap(&server.grpc));
    assert_token(&boot);
    let out = cli(&["runner", "token"], &client_env(&server.grpc, &boot));
    assert!(out.status.success(), "{}", stderr(&out));
    let runner_token = stdout(&out);

    let certs = tempfile::tempdir().unwrap();
    let pki = Pki::new("test ca");
    pki.write_client_dir(certs.path(), &pki);
    let status_file = dir.path().join("runner-status.json");
    let docker_port = free_port(); // nothing listens there
    let mut runner = start_runner(
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
    assert_eq!(status["docker_ok"], false);
    assert_eq!(status["docker_tls"], true);
    assert_eq!(status["docker_tls_verified"], true);
    assert!(
        status["docker_error"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{status}"
    );
    assert!(status["updated_at"].is_string());
    let runners = api_json(&server.grpc, Method::GET, "/v1/runners", Some(&boot));
    assert_eq!(runners["runners"][0]["id"], "runner-one");
    assert_eq!(runners["runners"][0]["docker_ok"], false);

    // The server goes away: the runner keeps running and says so; it comes back on the same
    // port: the runner registers again by itself.
    let grpc = server.grpc.clone();
    assert!(server.proc.terminate().success());
    poll("the runner to notice the server is gone", || {
        let s = read_status(&status_file)?;
        (s["server_ok"] == false && s["server_error"].is_string()).then_some(())
    });
    assert!(runner.running(), "the runner must survive a server outage");
    let server = start_server(&db, &grpc);
    poll("the runner to register again", || {
        let s = read_status(&status_file)?;
        (s["server_ok"] == true).then_some(())
    });
    assert!(runner.running());

    // SIGTERM ends it cleanly; it never logged its token.
    assert!(
        runner.terminate().success(),
        "runner should exit 0 on SIGTERM"
    );
    let log = runner.log();
    assert!(
        !log.contains(&runner_token),
        "the token leaked into the runner log"
    );
    assert!(log.contains("runner: docker tcp://127.0.0.1:"), "{log}");
    drop(server);
}

#[test]
fn runner_verifies_docker_with_mutual_tls_and_recovers_when_docker_appears() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&dir.path().join("data.db"), "127.0.0.1:0");
    let boot = stdout(&bootstrap(&server.grpc));
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
    let good_runner = start_runner(
        &server.grpc,
        &boot,
        docker_port,
        good.path(),
        &good_status,
        "good",
    );
    let bad_runner = start_runner(
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
