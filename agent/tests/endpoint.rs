//! The HTTPS endpoint on loopback: a state directory with a real PKI (the pki module's CA and
//! server certificate), the endpoint started as `run` starts it, and a client that trusts the
//! agent CA only (no skip-verify). Checks authentication, the rate limit, the routes, the
//! certificate reload, and that no secret reaches the log; and the scoped tokens as an
//! attacker holding one sees them: each scope against each route (200/401/403/404), the
//! runner token route's body limits and id grammar, and revocation without a restart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use pilot_agent::addresses::San;
use pilot_agent::config::endpoint::{EndpointToken, RateLimit, Scope, TokenHash, TokenSource};
use pilot_agent::config::{Config, EndpointConfig, PkiConfig, WaypointConfig};
use pilot_agent::database::DatabaseSettings;
use pilot_agent::endpoint::{Endpoint, EndpointError, Telemetry};
use pilot_agent::pki::{self, LeafSpec, PkiLayout, Policy};
use pilot_agent::status_file::{Condition, RunStatus, Status, StepState};

const TOKEN: &str = "tok-5c0ab1e-very-secret-endpoint-token";
const RUNNER_TOKEN: &str = "tok-runner-0ff1ce-very-secret-token";
const READ_TOKEN: &str = "tok-read-b0a7-very-secret-token";
const DB_PASSWORD: &str = "pw-d4tabase-very-secret-password";
const BOOTSTRAP_TOKEN: &str = "wp-bootstrap-c0ffee-very-secret-token";

fn hash_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn token_hash_hex() -> String {
    hash_hex(TOKEN)
}

/// A state directory with the CA and a server certificate for `sans`, a token hash file,
/// a finished status and a stored database password.
struct Fixture {
    dir: tempfile::TempDir,
    config: Arc<Config>,
}

impl Fixture {
    fn new(rate_limit: RateLimit) -> Result<Fixture> {
        Fixture::build(rate_limit, false)
    }

    /// Three scoped tokens (`ops` admin and `runner-pool` runner from hash files, `prom`
    /// read inline), and a Waypoint server section whose Docker socket does not exist: a
    /// runner token request that passes every check reaches the mint and gets 503.
    fn scoped(rate_limit: RateLimit) -> Result<Fixture> {
        Fixture::build(rate_limit, true)
    }

    fn hash_file(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.sha256"))
    }

    fn build(rate_limit: RateLimit, scoped: bool) -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let state_dir = dir.path().join("state");
        let hash_file = dir.path().join("endpoint-token.sha256");
        std::fs::write(&hash_file, format!("{}\n", token_hash_hex()))?;
        std::fs::set_permissions(&hash_file, std::fs::Permissions::from_mode(0o600))?;
        let mut db = DatabaseSettings::new("db.invalid", "pilot_admin");
        db.app_role = "pilot_app".into();
        let tokens = if scoped {
            let mut tokens = Vec::new();
            for (name, scope, token) in [
                ("ops", Scope::Admin, TOKEN),
                ("runner-pool", Scope::Runner, RUNNER_TOKEN),
            ] {
                let path = dir.path().join(format!("{name}.sha256"));
                std::fs::write(&path, format!("{}\n", hash_hex(token)))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                tokens.push(EndpointToken {
                    name: name.into(),
                    scope,
                    source: TokenSource::File(path),
                });
            }
            tokens.push(EndpointToken {
                name: "prom".into(),
                scope: Scope::Read,
                source: TokenSource::Inline(
                    TokenHash::from_hex(&hash_hex(READ_TOKEN)).context("hash")?,
                ),
            });
            tokens
        } else {
            vec![EndpointToken::default_admin(TokenSource::File(hash_file))]
        };
        let mut config = Config {
            state_dir: state_dir.clone(),
            database: Some(db),
            endpoint: Some(EndpointConfig {
                listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
                tokens,
                sources: Vec::new(),
                rate_limit,
            }),
            ..Config::default()
        };
        if scoped {
            config.waypoint = Some(WaypointConfig::default());
            config.docker.socket = dir.path().join("no-dockerd.sock");
            let tokens_dir = state_dir.join("waypoint");
            std::fs::create_dir_all(&tokens_dir)?;
            let bootstrap = tokens_dir.join("bootstrap-token");
            std::fs::write(&bootstrap, format!("{BOOTSTRAP_TOKEN}\n"))?;
            std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o600))?;
        }
        issue_server_cert(&config, &["127.0.0.1", "localhost"])?;
        let mut status = Status::start("run", ["pki".to_string(), "database".to_string()]);
        status.status = RunStatus::Done;
        status.condition = Condition::Healthy;
        status.steps[0].state = StepState::Ok;
        status.steps[1].state = StepState::Changed;
        status.write(&config.status_path())?;
        let pw = state_dir.join("database/password");
        std::fs::create_dir_all(pw.parent().context("password dir")?)?;
        std::fs::write(&pw, DB_PASSWORD)?;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600))?;
        Ok(Fixture {
            dir,
            config: Arc::new(config),
        })
    }

    fn ca_pem(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(
            PkiLayout::new(self.config.pki_dir()).ca_cert(),
        )?)
    }
}

/// Runs the pki module as the pki step does, for a server certificate with these SANs.
fn issue_server_cert(config: &Config, sans: &[&str]) -> Result<()> {
    let layout = PkiLayout::new(config.pki_dir());
    let sans = sans.iter().map(|s| San::parse(s)).collect();
    pki::ensure(
        &layout,
        &Policy::from(&PkiConfig::default()),
        &[LeafSpec::server(sans)],
        time::OffsetDateTime::now_utc(),
    )?;
    Ok(())
}

/// An HTTPS client that trusts exactly one CA.
struct Client {
    tls: TlsConnector,
    addr: SocketAddr,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Client {
    fn new(ca_pem: &[u8], addr: SocketAddr) -> Result<Client> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert?)?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(pilot_agent::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client {
            tls: TlsConnector::from(Arc::new(cfg)),
            addr,
        })
    }

    async fn get(&self, name: &str, path: &str, auth: Option<&str>) -> Result<Reply> {
        self.send(hyper::Method::GET, name, path, auth, &[], None)
            .await
    }

    /// `POST /v1/runner-token` to localhost with a JSON body.
    async fn mint(&self, auth: Option<&str>, body: &str) -> Result<Reply> {
        self.send(
            hyper::Method::POST,
            "localhost",
            "/v1/runner-token",
            auth,
            &[(header::CONTENT_TYPE, "application/json")],
            Some(body.as_bytes().to_vec()),
        )
        .await
    }

    async fn send(
        &self,
        method: hyper::Method,
        name: &str,
        path: &str,
        auth: Option<&str>,
        headers: &[(header::HeaderName, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply> {
        let tcp = TcpStream::connect(self.addr).await?;
        let server_name = ServerName::try_from(name.to_string())?;
        let tls = self.tls.connect(server_name, tcp).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, name);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        for (k, v) in headers {
            req = req.header(k, *v);
        }
        let resp = match body {
            Some(b) => {
                sender
                    .send_request(req.body(http_body_util::Full::new(Bytes::from(b)))?)
                    .await?
            }
            None => {
                // An empty body of the same type: one sender, one body type.
                sender
                    .send_request(req.body(http_body_util::Full::new(Bytes::new()))?)
                    .await?
            }
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8(body.to_vec())?,
        })
    }
}

impl Client {
    /// Writes `bytes` as they are over TLS to localhost and returns what came back until
    /// the server closed or went quiet.
    async fn raw(&self, bytes: &[u8]) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = TcpStream::connect(self.addr).await?;
        let mut tls = self
            .tls
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        tls.write_all(bytes).await?;
        tls.flush().await?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    out.extend_from_slice(&buf[..n]);
                    // The head and a short body are in: enough to judge.
                    if out.windows(4).any(|w| w == b"\r\n\r\n") && out.len() > 64 {
                        break;
                    }
                }
                _ => break,
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Log lines of the endpoint, captured for the secret check.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Sets a subscriber for this thread; `#[tokio::test]` runs every task of the test on it.
fn capture_logs() -> (Capture, tracing::subscriber::DefaultGuard) {
    let cap = Capture::default();
    let writer = cap.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    // Tests run in parallel, each with its own thread-local subscriber: a callsite whose
    // interest was cached while another test's subscriber came or went could otherwise be
    // skipped here.
    tracing::callsite::rebuild_interest_cache();
    (cap, guard)
}

fn assert_no_secrets(text: &str, what: &str) {
    let mut secrets = vec![
        ("database password", DB_PASSWORD.to_string()),
        ("bootstrap token", BOOTSTRAP_TOKEN.to_string()),
    ];
    for token in [TOKEN, RUNNER_TOKEN, READ_TOKEN] {
        let hash = hash_hex(token);
        secrets.push(("token", token.to_string()));
        secrets.push(("token hash (upper case)", hash.to_uppercase()));
        secrets.push(("token hash", hash));
    }
    for (name, secret) in secrets {
        assert!(
            !text.contains(&secret),
            "{what} contains the {name}:\n{text}"
        );
    }
}

#[tokio::test]
async fn authenticates_rate_limits_serves_and_logs_no_secret() -> Result<()> {
    let (logs, _guard) = capture_logs();
    let fx = Fixture::new(RateLimit {
        failures: 5,
        window_secs: 3600,
    })?;
    let telemetry = Arc::new(Telemetry::default());
    telemetry.record_pass("start", Duration::from_millis(1500), 2, false);
    telemetry.record_pass(
        "docker-event: waypoint-server die",
        Duration::from_millis(300),
        1,
        true,
    );
    telemetry.record_docker_event();
    let ep = Endpoint::start(fx.config.clone(), telemetry.clone()).await?;
    let addr = ep.local_addr();
    assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    let client = Client::new(&fx.ca_pem()?, addr)?;

    // /healthz: no token needed, status and condition only.
    let r = client.get("localhost", "/healthz", None).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    assert_eq!(
        v,
        serde_json::json!({"status": "done", "condition": "healthy"})
    );
    // By IP address too (the certificate names 127.0.0.1).
    let r = client.get("127.0.0.1", "/healthz", None).await?;
    assert_eq!(r.status, StatusCode::OK);

    // The right token: every route.
    let auth = bearer(TOKEN);
    let r = client.get("localhost", "/v1/status", Some(&auth)).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    assert_eq!(v["status"], "done");
    assert_eq!(v["condition"], "healthy");
    assert_eq!(v["steps"][1]["name"], "database");
    assert_eq!(v["steps"][1]["state"], "changed");
    assert_no_secrets(&r.body, "/v1/status");

    let r = client
        .get("localhost", "/v1/credentials", Some(&auth))
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    assert_eq!(v["database"]["password"], DB_PASSWORD);
    assert_eq!(v["database"]["user"], "pilot_app");
    assert_eq!(v["database"]["host"], "db.invalid");
    assert_eq!(
        v["ca_pem"].as_str().map(str::as_bytes),
        Some(&fx.ca_pem()?[..])
    );
    assert_eq!(v["missing"], serde_json::json!(["waypoint"]));

    let r = client.get("localhost", "/metrics", Some(&auth)).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.headers[header::CONTENT_TYPE]
            .to_str()?
            .starts_with("text/plain; version=0.0.4")
    );
    let samples = parse_prometheus(&r.body)?;
    let get = |name: &str| {
        samples
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no sample {name} in\n{}", r.body))
    };
    assert_eq!(get("pilot_agent_passes_total{trigger=\"start\"}"), 1.0);
    assert_eq!(
        get("pilot_agent_passes_total{trigger=\"docker-event\"}"),
        1.0
    );
    assert_eq!(get("pilot_agent_repairs_total"), 1.0);
    assert_eq!(get("pilot_agent_docker_events_total"), 1.0);
    assert_eq!(get("pilot_agent_last_pass_duration_seconds"), 0.3);
    assert_eq!(
        get("pilot_agent_step_state{step=\"database\",state=\"changed\"}"),
        1.0
    );
    assert_eq!(
        get("pilot_agent_step_state{step=\"database\",state=\"ok\"}"),
        0.0
    );
    assert!(get("process_resident_memory_bytes") > 1e6);
    assert_eq!(get("pilot_agent_endpoint_auth_failures_total"), 0.0);
    assert_no_secrets(&r.body, "/metrics");

    // Unknown paths: 404 only with the token.
    let r = client.get("localhost", "/nope", Some(&auth)).await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Missing, malformed and wrong tokens: 401 with a Bearer challenge, until the limit.
    let hash = token_hash_hex();
    let wrong = [
        None,
        Some("Basic dXNlcjpwYXNz".to_string()),
        Some(bearer("not-the-token")),
        Some(bearer(&hash)),
        Some(bearer(&TOKEN[..TOKEN.len() - 1])),
    ];
    for a in &wrong {
        let r = client
            .get("localhost", "/v1/credentials", a.as_deref())
            .await?;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{a:?}");
        let challenge = r.headers[header::WWW_AUTHENTICATE].to_str()?;
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert!(!r.body.contains("pilot_app"));
    }
    // The limit (5) is reached: 429 with Retry-After, even with the right token.
    for a in [None, Some(auth.clone())] {
        let r = client.get("localhost", "/v1/status", a.as_deref()).await?;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{a:?}");
        let retry: u64 = r.headers[header::RETRY_AFTER].to_str()?.parse()?;
        assert!((3500..=3600).contains(&retry), "{retry}");
    }
    // Health stays available to the limited source.
    let r = client.get("localhost", "/healthz", None).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(telemetry.auth_failures(), 5);
    assert_eq!(telemetry.rate_limited(), 2);

    ep.shutdown().await;
    // Stopped: nothing listens any more.
    assert!(TcpStream::connect(addr).await.is_err());

    let text = logs.text();
    assert_no_secrets(&text, "the log");
    let failures: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("authentication failed"))
        .collect();
    assert_eq!(failures.len(), 5, "{text}");
    assert!(
        failures.iter().all(|l| l.contains("source=127.0.0.1")),
        "{text}"
    );
    for reason in [
        "no Authorization header",
        "not a Bearer token",
        "wrong token",
    ] {
        assert!(
            failures.iter().any(|l| l.contains(reason)),
            "{reason}: {text}"
        );
    }
    assert!(text.contains("too many failed authentications"), "{text}");
    drop(fx.dir);
    Ok(())
}

/// `name{labels} value` samples of a text exposition, after checking its shape: every
/// sample's family has a `# TYPE` line before it, values parse as floats.
fn parse_prometheus(text: &str) -> Result<Vec<(String, f64)>> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                bail!("bad TYPE line: {line}");
            };
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                bail!("bad metric type: {line}");
            }
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            bail!("unexpected line: {line:?}");
        }
        let (series, value) = line.rsplit_once(' ').context("no value")?;
        let name = series.split('{').next().unwrap_or_default();
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            bail!("bad metric name: {line}");
        }
        if series.contains('{') && !series.ends_with('}') {
            bail!("bad labels: {line}");
        }
        if !typed.contains(name) {
            bail!("sample before its TYPE line: {line}");
        }
        samples.push((series.to_string(), value.parse::<f64>()?));
    }
    Ok(samples)
}

#[tokio::test]
async fn healthz_is_503_until_done() -> Result<()> {
    let fx = Fixture::new(RateLimit::default())?;
    let mut status = Status::start("run", ["pki".to_string()]);
    status.steps[0].state = StepState::Running;
    status.write(&fx.config.status_path())?;
    let ep = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default())).await?;
    let client = Client::new(&fx.ca_pem()?, ep.local_addr())?;
    let r = client.get("localhost", "/healthz", None).await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    assert_eq!(v["status"], "running");
    std::fs::remove_file(fx.config.status_path())?;
    let r = client.get("localhost", "/healthz", None).await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    assert_eq!(v["status"], "not-started");
    // Only status and condition: nothing else leaks without a token.
    assert_eq!(v.as_object().map(|o| o.len()), Some(2));

    // Finished, but in error: not a host to route to. Degraded still serves.
    let mut status = Status::start("run", ["pki".to_string(), "database".to_string()]);
    status.status = RunStatus::Done;
    status.condition = Condition::Error;
    status.steps[0].state = StepState::Error;
    status.steps[1].state = StepState::Skipped;
    status.write(&fx.config.status_path())?;
    let r = client.get("localhost", "/healthz", None).await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    assert_eq!(v["condition"], "error");
    status.condition = Condition::Degraded;
    status.steps[0].state = StepState::Ok;
    status.steps[1].state = StepState::Degraded;
    status.write(&fx.config.status_path())?;
    let r = client.get("localhost", "/healthz", None).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    ep.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn certificate_is_verified_and_reloaded() -> Result<()> {
    let fx = Fixture::new(RateLimit::default())?;
    let ep = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default())).await?;
    let client = Client::new(&fx.ca_pem()?, ep.local_addr())?;
    // A name the certificate does not carry fails verification.
    let err = client
        .get("reloaded.example", "/healthz", None)
        .await
        .err()
        .context("a name outside the certificate must fail")?;
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    // Another CA is not trusted.
    let other = tempfile::tempdir()?;
    let other_config = Config {
        state_dir: other.path().to_path_buf(),
        ..Config::default()
    };
    issue_server_cert(&other_config, &["localhost"])?;
    let stranger = Client::new(
        &std::fs::read(PkiLayout::new(other_config.pki_dir()).ca_cert())?,
        ep.local_addr(),
    )?;
    assert!(stranger.get("localhost", "/healthz", None).await.is_err());

    // The pki step re-issues the certificate with a new name; reload picks it up.
    issue_server_cert(&fx.config, &["127.0.0.1", "localhost", "reloaded.example"])?;
    assert!(
        client
            .get("reloaded.example", "/healthz", None)
            .await
            .is_err()
    );
    ep.reload_tls()?;
    let r = client.get("reloaded.example", "/healthz", None).await?;
    assert_eq!(r.status, StatusCode::OK);

    // A broken key leaves the working certificate in place.
    let key = PkiLayout::new(fx.config.pki_dir()).server().key;
    let good_key = std::fs::read(&key)?;
    std::fs::write(&key, "garbage")?;
    assert!(matches!(
        ep.reload_tls(),
        Err(EndpointError::Identity { .. })
    ));
    let r = client.get("reloaded.example", "/healthz", None).await?;
    assert_eq!(r.status, StatusCode::OK);
    std::fs::write(&key, good_key)?;
    ep.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn start_fails_clearly_without_certificate_or_token_hash() -> Result<()> {
    let fx = Fixture::new(RateLimit::default())?;
    let server = PkiLayout::new(fx.config.pki_dir()).server();
    std::fs::remove_file(&server.cert)?;
    let e = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default()))
        .await
        .err()
        .context("no certificate must fail")?;
    assert!(matches!(e, EndpointError::Identity { .. }), "{e}");
    assert!(e.to_string().contains("cert.pem"), "{e}");

    let fx = Fixture::new(RateLimit::default())?;
    let Some(TokenSource::File(hash_file)) =
        fx.config.endpoint.as_ref().map(|e| &e.tokens[0].source)
    else {
        bail!("fixture uses a hash file");
    };
    std::fs::write(hash_file, "short\n")?;
    let e = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default()))
        .await
        .err()
        .context("a bad hash file must fail")?;
    assert!(matches!(e, EndpointError::TokenFileFormat { .. }), "{e}");

    let no_endpoint = Config {
        endpoint: None,
        ..(*fx.config).clone()
    };
    assert!(matches!(
        Endpoint::start(Arc::new(no_endpoint), Arc::new(Telemetry::default())).await,
        Err(EndpointError::NotConfigured)
    ));
    Ok(())
}

#[tokio::test]
async fn world_readable_hash_file_is_warned_about() -> Result<()> {
    let (logs, _guard) = capture_logs();
    let fx = Fixture::new(RateLimit::default())?;
    let Some(TokenSource::File(hash_file)) =
        fx.config.endpoint.as_ref().map(|e| &e.tokens[0].source)
    else {
        bail!("fixture uses a hash file");
    };
    std::fs::set_permissions(hash_file, std::fs::Permissions::from_mode(0o644))?;
    let ep = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default())).await?;
    ep.shutdown().await;
    let text = logs.text();
    assert!(text.contains("readable by group or others"), "{text}");
    assert_no_secrets(&text, "the log");
    Ok(())
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_silent_client() -> Result<()> {
    let fx = Fixture::new(RateLimit::default())?;
    let ep = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default())).await?;
    let addr = ep.local_addr();
    // A client that opens TCP and never speaks TLS must not hold shutdown past its bound.
    let idle = TcpStream::connect(addr).await?;
    let started = std::time::Instant::now();
    ep.shutdown().await;
    let took = started.elapsed();
    // It waits on nothing: the half-open connection is dropped at once, not after the
    // handshake deadline or the grace period.
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    drop(idle);
    Ok(())
}

const GOOD_ID: &str = r#"{"runner_id": "vm-7.example-runner-2"}"#;

#[tokio::test]
async fn each_scope_gets_exactly_its_routes() -> Result<()> {
    let (logs, _guard) = capture_logs();
    // A limit of 2 failures: the 403s below must not count towards it.
    let fx = Fixture::scoped(RateLimit {
        failures: 2,
        window_secs: 3600,
    })?;
    let telemetry = Arc::new(Telemetry::default());
    let ep = Endpoint::start(fx.config.clone(), telemetry.clone()).await?;
    let client = Client::new(&fx.ca_pem()?, ep.local_addr())?;
    let (admin, runner, read) = (bearer(TOKEN), bearer(RUNNER_TOKEN), bearer(READ_TOKEN));
    use StatusCode as S;
    // Route, then what admin, runner and read get. The runner token route passes every
    // check and reaches the mint, which has no Waypoint server here: 503.
    let table: [(&str, &str, [S; 3]); 6] = [
        ("GET", "/v1/status", [S::OK, S::FORBIDDEN, S::OK]),
        ("GET", "/metrics", [S::OK, S::FORBIDDEN, S::OK]),
        (
            "GET",
            "/v1/credentials",
            [S::OK, S::FORBIDDEN, S::FORBIDDEN],
        ),
        (
            "POST",
            "/v1/runner-token",
            [S::SERVICE_UNAVAILABLE, S::SERVICE_UNAVAILABLE, S::FORBIDDEN],
        ),
        (
            "GET",
            "/v1/runner-token",
            [S::METHOD_NOT_ALLOWED, S::METHOD_NOT_ALLOWED, S::FORBIDDEN],
        ),
        ("GET", "/nope", [S::NOT_FOUND, S::NOT_FOUND, S::NOT_FOUND]),
    ];
    for (method, path, want) in table {
        for (auth, want) in [&admin, &runner, &read].into_iter().zip(want) {
            let r = if method == "POST" {
                client.mint(Some(auth), GOOD_ID).await?
            } else {
                client.get("localhost", path, Some(auth)).await?
            };
            assert_eq!(
                r.status, want,
                "{method} {path} with {auth:.12}: {}",
                r.body
            );
            if !(auth == &admin && path == "/v1/credentials") {
                assert_no_secrets(&r.body, path);
            }
            if want == S::FORBIDDEN {
                assert!(r.headers.get(header::WWW_AUTHENTICATE).is_none());
            }
            if want == S::SERVICE_UNAVAILABLE {
                assert_eq!(r.headers[header::RETRY_AFTER], "10");
            }
        }
    }
    // The admin's credentials do carry the secrets (that is what admin is for).
    let r = client
        .get("localhost", "/v1/credentials", Some(&admin))
        .await?;
    assert!(r.body.contains(BOOTSTRAP_TOKEN) && r.body.contains(DB_PASSWORD));
    // Six 403s above, a limit of 2: not counted, no 429.
    assert_eq!(telemetry.auth_failures(), 0);
    let r = client.get("localhost", "/v1/status", Some(&read)).await?;
    assert_eq!(r.status, S::OK);
    // No token, a wrong one: 401 on every route, whatever its scope.
    for path in ["/v1/credentials", "/v1/runner-token"] {
        let r = client.get("localhost", path, None).await?;
        assert_eq!(r.status, S::UNAUTHORIZED, "{path}");
    }
    let r = client.mint(Some(&bearer("not-a-token")), GOOD_ID).await?;
    assert_eq!(
        r.status,
        S::TOO_MANY_REQUESTS,
        "the third failure is over the limit"
    );
    ep.shutdown().await;

    let text = logs.text();
    assert_no_secrets(&text, "the log");
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("scope does not allow"))
        .collect();
    assert_eq!(refused.len(), 6, "{text}");
    assert!(
        refused
            .iter()
            .any(|l| l.contains("token=runner-pool") && l.contains("/v1/credentials")),
        "{text}"
    );
    assert!(
        text.contains("cannot mint a runner token")
            && text.contains("runner_id=vm-7.example-runner-2"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn runner_token_requests_are_bounded_and_checked() -> Result<()> {
    let (logs, _guard) = capture_logs();
    let fx = Fixture::scoped(RateLimit::default())?;
    let ep = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default())).await?;
    let client = Client::new(&fx.ca_pem()?, ep.local_addr())?;
    let runner = bearer(RUNNER_TOKEN);
    use StatusCode as S;

    // Not JSON by its type: 415 before the body is read.
    let r = client
        .send(
            hyper::Method::POST,
            "localhost",
            "/v1/runner-token",
            Some(&runner),
            &[(header::CONTENT_TYPE, "text/plain")],
            Some(GOOD_ID.as_bytes().to_vec()),
        )
        .await?;
    assert_eq!(r.status, S::UNSUPPORTED_MEDIA_TYPE, "{}", r.body);
    // Over the limit: 413, whether declared or sent.
    let big = format!(r#"{{"runner_id": "{}-runner-1"}}"#, "a".repeat(2000));
    let r = client.mint(Some(&runner), &big).await?;
    assert_eq!(r.status, S::PAYLOAD_TOO_LARGE, "{}", r.body);
    // Sent chunked, with no length declared: cut off at the limit all the same.
    let chunk = "a".repeat(4096);
    let raw = format!(
        "POST /v1/runner-token HTTP/1.1\r\nHost: localhost\r\nAuthorization: {runner}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n\
         0\r\n\r\n",
        chunk.len()
    );
    let answer = client.raw(raw.as_bytes()).await?;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Not the one object with the one field: 400.
    for body in [
        "",
        "not json",
        "[]",
        r#"{"runner_id": 7}"#,
        r#"{"runner_id": "h-runner-1", "scope": "admin"}"#,
        r#"{"id": "h-runner-1"}"#,
    ] {
        let r = client.mint(Some(&runner), body).await?;
        assert_eq!(r.status, S::BAD_REQUEST, "{body:?}: {}", r.body);
    }
    // Ids the agent would never make: 400, and nothing minted.
    for id in [
        "",
        "h",
        "h-runner-0",
        "h-runner-01",
        "h-runner-33",
        "h_x-runner-1",
        "-runner-1",
        "h-runner-1\n",
        "../../etc-runner-1",
        "h-runner-1; rm -rf /",
    ] {
        let body = serde_json::json!({ "runner_id": id }).to_string();
        let r = client.mint(Some(&runner), &body).await?;
        assert_eq!(r.status, S::BAD_REQUEST, "{id:?}: {}", r.body);
        assert!(r.body.contains("HOST-runner-N"), "{}", r.body);
    }
    // Content-Type with parameters is still JSON; the valid id reaches the mint.
    let r = client
        .send(
            hyper::Method::POST,
            "localhost",
            "/v1/runner-token",
            Some(&runner),
            &[(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            Some(GOOD_ID.as_bytes().to_vec()),
        )
        .await?;
    assert_eq!(r.status, S::SERVICE_UNAVAILABLE, "{}", r.body);
    ep.shutdown().await;
    let text = logs.text();
    assert_no_secrets(&text, "the log");
    // Only the one valid request got as far as the mint.
    assert_eq!(
        text.matches("cannot mint a runner token").count(),
        1,
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn revoked_file_token_is_refused_after_reload() -> Result<()> {
    let (logs, _guard) = capture_logs();
    let fx = Fixture::scoped(RateLimit::default())?;
    let ep = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default())).await?;
    let client = Client::new(&fx.ca_pem()?, ep.local_addr())?;
    let runner = bearer(RUNNER_TOKEN);
    let admin = bearer(TOKEN);
    assert_eq!(
        client.mint(Some(&runner), GOOD_ID).await?.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // Revoked by removing its file: refused at the next reload, the others unaffected.
    std::fs::remove_file(fx.hash_file("runner-pool"))?;
    assert_eq!(ep.reload_tokens().await, ["runner-pool"]);
    let r = client.mint(Some(&runner), GOOD_ID).await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(
        client
            .get("localhost", "/v1/status", Some(&admin))
            .await?
            .status,
        StatusCode::OK
    );
    // Nothing changed: nothing reloaded.
    assert!(ep.reload_tokens().await.is_empty());

    // Replaced in place (a new token for the old name) by the periodic refresh alone: the
    // old admin token stops working within a few refresh intervals, the new one works.
    let new_admin = "tok-admin-rotated-very-secret-token";
    std::fs::write(fx.hash_file("ops"), format!("{}\n", hash_hex(new_admin)))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = client.get("localhost", "/v1/status", Some(&admin)).await?;
        if r.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old admin token still works"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = client
        .get("localhost", "/v1/status", Some(&bearer(new_admin)))
        .await?;
    assert_eq!(r.status, StatusCode::OK);
    // A file that turns malformed disables its token (fails closed), with the path logged.
    std::fs::write(fx.hash_file("ops"), "garbage\n")?;
    assert_eq!(ep.reload_tokens().await, ["ops"]);
    let r = client
        .get("localhost", "/v1/status", Some(&bearer(new_admin)))
        .await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Restored: accepted again.
    std::fs::write(
        fx.hash_file("runner-pool"),
        format!("{}\n", hash_hex(RUNNER_TOKEN)),
    )?;
    assert_eq!(ep.reload_tokens().await, ["runner-pool"]);
    assert_eq!(
        client.mint(Some(&runner), GOOD_ID).await?.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    ep.shutdown().await;
    let text = logs.text();
    assert_no_secrets(&text, "the log");
    assert!(!text.contains(&hash_hex(new_admin)), "{text}");
    assert!(text.contains("ops.sha256"), "{text}");
    Ok(())
}

#[tokio::test]
async fn a_missing_token_file_disables_only_its_token() -> Result<()> {
    // Captured also because a test thread without a subscriber that first reaches a log
    // call site can make tracing cache it as disabled for the parallel tests that count lines.
    let (logs, _guard) = capture_logs();
    let fx = Fixture::scoped(RateLimit::default())?;
    std::fs::remove_file(fx.hash_file("runner-pool"))?;
    // Starts: the other tokens still work.
    let ep = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default())).await?;
    let client = Client::new(&fx.ca_pem()?, ep.local_addr())?;
    let r = client.mint(Some(&bearer(RUNNER_TOKEN)), GOOD_ID).await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = client
        .get("localhost", "/v1/status", Some(&bearer(READ_TOKEN)))
        .await?;
    assert_eq!(r.status, StatusCode::OK);
    ep.shutdown().await;
    // The single-token form without its file: no token at all, an error as before.
    let fx = Fixture::new(RateLimit::default())?;
    std::fs::remove_file(fx.dir.path().join("endpoint-token.sha256"))?;
    let e = Endpoint::start(fx.config.clone(), Arc::new(Telemetry::default()))
        .await
        .err()
        .context("no usable token must fail")?;
    assert!(matches!(e, EndpointError::TokenFile { .. }), "{e}");
    let text = logs.text();
    assert!(
        text.contains("token=runner-pool") && text.contains("missing or empty"),
        "{text}"
    );
    assert_no_secrets(&text, "the log");
    Ok(())
}

// Compile-time check of the public API other modules call.
#[allow(dead_code)]
fn api_shape(e: &Endpoint, t: &Telemetry) {
    let _: SocketAddr = e.local_addr();
    let _: Result<(), EndpointError> = e.reload_tls();
    drop(e.reload_tokens());
    t.record_pass("start", Duration::ZERO, 0, false);
    t.record_docker_event();
}
