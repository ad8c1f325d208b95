//! The client against the real endpoint on loopback (a state directory with the pki module's
//! CA and server certificate), a leaf-only TLS server, and plain TCP listeners that refuse or
//! stall; and the runner host's path with a `runner`-scope token: refused the credentials,
//! linked by `/healthz`, each runner's token minted by `POST /v1/runner-token` and stored
//! 0600, and no bootstrap token or database password anywhere in its state directory.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use pilot_agent::addresses::San;
use pilot_agent::config::endpoint::{EndpointToken, RateLimit, Scope, TokenHash, TokenSource};
use pilot_agent::config::{Config, EndpointConfig, PkiConfig, Role, ServerLink, WaypointConfig};
use pilot_agent::endpoint::{Endpoint, Telemetry};
use pilot_agent::pki::{self, LeafSpec, PkiLayout, Policy};
use pilot_agent::remote::{
    DEFAULT_PORT, Fingerprint, FingerprintError, RemoteError, ServerEndpoint, fetch_credentials,
    mint_runner_token,
};
use pilot_agent::waypoint::WaypointPlan;
use pilot_agent::waypoint::link::{self, LinkState};
use pilot_agent::waypoint::runners::RunnerId;
use pilot_values::Secret;

const TOKEN: &str = "tok-remote-0123456789-very-secret";
const RUNNER_TOKEN: &str = "tok-runner-scope-0123456789-secret";
const DB_PASSWORD: &str = "pw-database-0123456789-very-secret";
const MINTED: &str = "wp-runner-minted-0123456789-secret";
const WAYPOINT_TOKEN: &str = "wp-bootstrap-9876543210-very-secret";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A server VM's state directory: CA, server certificate for `sans`, the endpoint's token
/// hash, and (when `bootstrapped`) the Waypoint bootstrap token.
struct ServerVm {
    _dir: tempfile::TempDir,
    config: Arc<Config>,
}

impl ServerVm {
    fn new(sans: &[&str], bootstrapped: bool, rate_limit: RateLimit) -> ServerVm {
        let dir = tempfile::tempdir().unwrap();
        let hash = |t: &str| -> TokenHash {
            let hex: String = Sha256::digest(t.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            TokenHash::from_hex(&hex).unwrap()
        };
        let mut config = Config {
            state_dir: dir.path().join("state"),
            waypoint: Some(WaypointConfig::default()),
            endpoint: Some(EndpointConfig {
                listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
                tokens: vec![
                    EndpointToken::default_admin(TokenSource::Inline(hash(TOKEN))),
                    EndpointToken {
                        name: "runner-pool".into(),
                        scope: Scope::Runner,
                        source: TokenSource::Inline(hash(RUNNER_TOKEN)),
                    },
                ],
                sources: Vec::new(),
                rate_limit,
            }),
            // No dockerd there: the endpoint cannot mint (503).
            docker: pilot_agent::config::DockerConfig {
                socket: dir.path().join("no-dockerd.sock"),
                ..Default::default()
            },
            ..Config::default()
        };
        config.host.extra_names = vec!["pilot.example.com".into()];
        let layout = PkiLayout::new(config.pki_dir());
        let sans: BTreeSet<San> = sans.iter().map(|s| San::parse(s)).collect();
        pki::ensure(
            &layout,
            &Policy::from(&PkiConfig::default()),
            &[LeafSpec::server(sans)],
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        if bootstrapped {
            let plan = WaypointPlan::from_config(&config).unwrap();
            std::fs::create_dir_all(&plan.tokens_dir).unwrap();
            std::fs::write(plan.bootstrap_token_path(), format!("{WAYPOINT_TOKEN}\n")).unwrap();
            let pw = config.state_dir.join("database/password");
            std::fs::create_dir_all(pw.parent().unwrap()).unwrap();
            std::fs::write(&pw, DB_PASSWORD).unwrap();
        }
        ServerVm {
            _dir: dir,
            config: Arc::new(config),
        }
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(PkiLayout::new(self.config.pki_dir()).ca_cert()).unwrap()
    }

    fn pin(&self) -> Fingerprint {
        Fingerprint::of_pem(&self.ca_pem()).unwrap()
    }

    async fn start(&self) -> Endpoint {
        Endpoint::start(self.config.clone(), Arc::new(Telemetry::default()))
            .await
            .unwrap()
    }
}

fn at(host: &str, addr: SocketAddr) -> ServerEndpoint {
    ServerEndpoint {
        host: host.into(),
        port: addr.port(),
    }
}

fn token() -> Secret {
    Secret::new(TOKEN)
}

/// No error text may carry any token.
fn assert_no_token(e: &RemoteError) {
    for text in [e.to_string(), format!("{e:?}")] {
        for secret in [TOKEN, WAYPOINT_TOKEN, RUNNER_TOKEN, MINTED, DB_PASSWORD] {
            assert!(!text.contains(secret), "{text}");
        }
    }
}

#[tokio::test]
async fn runner_scope_token_is_refused_the_credentials() {
    let vm = ServerVm::new(&["127.0.0.1"], true, RateLimit::default());
    let ep = vm.start().await;
    let server = at("127.0.0.1", ep.local_addr());
    let e = fetch_credentials(&server, &Secret::new(RUNNER_TOKEN), &vm.pin(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            RemoteError::Forbidden {
                path: "/v1/credentials",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert!(e.to_string().contains("scope `runner`"), "{e}");
    assert_no_token(&e);
    // The same token may ask for a runner token: it gets as far as the mint, which has no
    // Waypoint server here (503, retry later).
    let id = RunnerId::new("vm-2", 1).to_string();
    let e = mint_runner_token(&server, &Secret::new(RUNNER_TOKEN), &vm.pin(), &id, TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RemoteError::Status { status: 503, .. }),
        "{e:?}"
    );
    assert!(e.is_transient());
    assert!(e.to_string().contains("not ready to mint"), "{e}");
    // The admin token still gets everything (what operators use it for).
    let c = fetch_credentials(&server, &token(), &vm.pin(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(c.waypoint_token.expose(), WAYPOINT_TOKEN);
    ep.shutdown().await;
}

/// A stand-in for the server VM's endpoint where it can mint (the real one needs a Waypoint
/// server in Docker; the e2e test `cloud` runs that): the real certificate chain, `/healthz`,
/// and `POST /v1/runner-token` answering as the endpoint does when the bearer token is
/// `RUNNER_TOKEN`. It records the requests' paths.
async fn minting_server(vm: &ServerVm) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use http_body_util::{BodyExt, Full};
    let paths = PkiLayout::new(vm.config.pki_dir()).server();
    let mut chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    chain.extend(
        CertificateDer::pem_file_iter(&paths.ca)
            .unwrap()
            .map(Result::unwrap),
    );
    let key = PrivateKeyDer::from_pem_file(&paths.key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(pilot_agent::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ca_pem = vm.ca_pem();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let (ca_pem, log) = (ca_pem.clone(), log.clone());
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let (ca_pem, log) = (ca_pem.clone(), log.clone());
                    async move {
                        log.lock()
                            .unwrap()
                            .push(format!("{} {}", req.method(), req.uri().path()));
                        let authorized = req
                            .headers()
                            .get(hyper::header::AUTHORIZATION)
                            .is_some_and(|v| {
                                v.as_bytes() == format!("Bearer {RUNNER_TOKEN}").as_bytes()
                            });
                        let (status, body) = match req.uri().path() {
                            "/healthz" => (200, json!({"status": "done", "condition": "healthy"})),
                            "/v1/runner-token" if authorized => {
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let asked: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap();
                                (
                                    200,
                                    json!({
                                        "runner_id": asked["runner_id"],
                                        "waypoint": {"address": "10.9.8.7:9701", "token": MINTED, "tls_skip_verify": true},
                                        "ca_pem": ca_pem,
                                    }),
                                )
                            }
                            _ => (403, json!({"error": "forbidden"})),
                        };
                        let mut resp =
                            hyper::Response::new(Full::new(bytes::Bytes::from(body.to_string())));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service),
            );
        }
    });
    (addr, seen)
}

/// Every file under `dir`, recursively, with its content.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn runner_host_gets_runner_tokens_and_keeps_no_server_secret() {
    use std::os::unix::fs::PermissionsExt;
    let vm = ServerVm::new(&["127.0.0.1"], true, RateLimit::default());
    let ep = vm.start().await;
    let (minter, seen) = minting_server(&vm).await;

    // The runner host: role runner, its endpoint token (runner scope) in a 0600 file, and
    // the bootstrap token that an earlier version fetched and kept in its state directory.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("server-token");
    std::fs::write(&token_file, format!("{RUNNER_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link_to = |addr: SocketAddr| ServerLink {
        endpoint: at("127.0.0.1", addr),
        token_file: token_file.clone(),
        ca_sha256: vm.pin(),
        waypoint_address: None,
        timeout_secs: 5,
        deregister: Default::default(),
    };
    let runner_config = |addr: SocketAddr| Config {
        state_dir: dir.path().join("state"),
        role: Role::Runner,
        server: Some(link_to(addr)),
        waypoint: Some(WaypointConfig {
            runners: 2,
            ..WaypointConfig::default()
        }),
        ..Config::default()
    };
    // server-link against the real endpoint: reached by /healthz, the old token removed.
    let config = runner_config(ep.local_addr());
    let plan = WaypointPlan::from_config(&config).unwrap();
    std::fs::create_dir_all(&plan.tokens_dir).unwrap();
    std::fs::write(plan.remote_token_path(), format!("{WAYPOINT_TOKEN}\n")).unwrap();
    let state = link::converge(&plan, config.server.as_ref().unwrap())
        .await
        .unwrap();
    assert!(
        matches!(&state, LinkState::Changed(d) if d.contains("server-token")),
        "{state:?}"
    );
    assert!(!plan.remote_token_path().exists());
    let state = link::converge(&plan, config.server.as_ref().unwrap())
        .await
        .unwrap();
    assert!(matches!(state, LinkState::Current(_)), "{state:?}");

    // The runners step's mint, against a server that can mint.
    let config = runner_config(minter);
    let plan = WaypointPlan::from_config(&config).unwrap();
    for index in 1..=2 {
        let id = RunnerId::new("vm-2", index);
        let got = link::mint_remote(&plan, &id).await.unwrap();
        assert_eq!(got, MINTED);
        let stored = plan.runner_token_path(index);
        assert_eq!(std::fs::read_to_string(&stored).unwrap().trim(), MINTED);
        let mode = std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", stored.display());
    }
    assert_eq!(
        std::fs::read_to_string(plan.remote_address_path())
            .unwrap()
            .trim(),
        "10.9.8.7:9701"
    );
    // What it asked for: the runner token route only, never the credentials.
    assert_eq!(
        *seen.lock().unwrap(),
        ["POST /v1/runner-token", "POST /v1/runner-token"]
    );
    // The whole state directory: neither the server's bootstrap token nor the database
    // password, nor the host's own endpoint token.
    let all = files(&config.state_dir);
    assert!(!all.is_empty());
    for (path, content) in &all {
        let text = String::from_utf8_lossy(content);
        for secret in [WAYPOINT_TOKEN, DB_PASSWORD, RUNNER_TOKEN] {
            assert!(
                !text.contains(secret),
                "{} holds a secret it must not",
                path.display()
            );
        }
    }
    ep.shutdown().await;
}

#[tokio::test]
async fn right_pin_fetches_the_credentials() {
    let vm = ServerVm::new(&["127.0.0.1", "localhost"], true, RateLimit::default());
    let ep = vm.start().await;
    for host in ["127.0.0.1", "localhost"] {
        let c = fetch_credentials(&at(host, ep.local_addr()), &token(), &vm.pin(), TIMEOUT)
            .await
            .unwrap();
        assert_eq!(
            c.waypoint_address,
            format!("pilot.example.com:{}", WaypointConfig::default().grpc_port)
        );
        assert_eq!(c.waypoint_token.expose(), WAYPOINT_TOKEN);
        // Waypoint serves a certificate of the agent CA: the CLI verifies it.
        assert!(!c.waypoint_tls_skip_verify);
        assert_eq!(c.ca_pem, vm.ca_pem());
        assert_eq!(c.raw["waypoint"]["address"], json!(c.waypoint_address));
        for text in [c.raw.to_string(), format!("{c:?}")] {
            assert!(!text.contains(WAYPOINT_TOKEN), "{text}");
        }
    }
    ep.shutdown().await;
}

#[tokio::test]
async fn wrong_pin_names_both_fingerprints() {
    let vm = ServerVm::new(&["127.0.0.1"], true, RateLimit::default());
    let other = ServerVm::new(&["127.0.0.1"], true, RateLimit::default());
    let ep = vm.start().await;
    let e = fetch_credentials(
        &at("127.0.0.1", ep.local_addr()),
        &token(),
        &other.pin(),
        TIMEOUT,
    )
    .await
    .unwrap_err();
    let RemoteError::PinMismatch {
        expected,
        presented,
        ..
    } = &e
    else {
        panic!("{e:?}");
    };
    assert_eq!(*expected, other.pin());
    // Leaf first, then the CA (once the endpoint sends it as well, twice here).
    assert!(presented.len() >= 2, "leaf and CA: {presented:?}");
    assert_eq!(presented[1], vm.pin());
    let text = e.to_string();
    assert!(text.contains(&other.pin().to_string()), "{text}");
    assert!(text.contains(&vm.pin().to_string()), "{text}");
    assert!(!e.is_transient());
    assert_no_token(&e);
    ep.shutdown().await;
}

#[tokio::test]
async fn name_not_in_the_certificate_is_a_certificate_error() {
    let vm = ServerVm::new(&["192.0.2.1", "pilot.invalid"], true, RateLimit::default());
    let ep = vm.start().await;
    let e = fetch_credentials(
        &at("127.0.0.1", ep.local_addr()),
        &token(),
        &vm.pin(),
        TIMEOUT,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RemoteError::Certificate { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("127.0.0.1"), "{text}");
    assert!(!e.is_transient());
    ep.shutdown().await;
}

#[tokio::test]
async fn wrong_token_is_unauthorized_then_rate_limited() {
    let vm = ServerVm::new(
        &["127.0.0.1"],
        true,
        RateLimit {
            failures: 2,
            window_secs: 60,
        },
    );
    let ep = vm.start().await;
    let server = at("127.0.0.1", ep.local_addr());
    let wrong = Secret::new("tok-wrong-0000");
    for _ in 0..2 {
        let e = fetch_credentials(&server, &wrong, &vm.pin(), TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(e, RemoteError::Unauthorized { .. }), "{e:?}");
        assert!(!e.is_transient());
        assert!(!e.to_string().contains("tok-wrong"), "{e}");
    }
    let e = fetch_credentials(&server, &token(), &vm.pin(), TIMEOUT)
        .await
        .unwrap_err();
    let RemoteError::RateLimited { retry_after, .. } = &e else {
        panic!("{e:?}");
    };
    assert!(retry_after.is_some_and(|d| d > Duration::ZERO && d <= Duration::from_secs(60)));
    assert!(e.is_transient());
    assert_no_token(&e);
    ep.shutdown().await;
}

#[tokio::test]
async fn not_bootstrapped_is_not_ready() {
    let vm = ServerVm::new(&["127.0.0.1"], false, RateLimit::default());
    let ep = vm.start().await;
    let e = fetch_credentials(
        &at("127.0.0.1", ep.local_addr()),
        &token(),
        &vm.pin(),
        TIMEOUT,
    )
    .await
    .unwrap_err();
    let RemoteError::NotReady { missing } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(missing, &["waypoint.token"]);
    assert!(e.is_transient());
    ep.shutdown().await;
}

#[tokio::test]
async fn served_ca_other_than_the_pin_is_refused() {
    let vm = ServerVm::new(&["127.0.0.1"], true, RateLimit::default());
    let other = ServerVm::new(&["127.0.0.1"], true, RateLimit::default());
    let pin = vm.pin();
    let ep = vm.start().await;
    // The TLS chain still carries the pinned CA (loaded at start); the answer is read per
    // request, so it now names another CA.
    std::fs::write(
        PkiLayout::new(vm.config.pki_dir()).ca_cert(),
        other.ca_pem(),
    )
    .unwrap();
    let e = fetch_credentials(&at("127.0.0.1", ep.local_addr()), &token(), &pin, TIMEOUT)
        .await
        .unwrap_err();
    let RemoteError::ServedCaMismatch {
        expected, served, ..
    } = &e
    else {
        panic!("{e:?}");
    };
    assert_eq!((*expected, *served), (pin, other.pin()));
    assert!(!e.is_transient());
    assert_no_token(&e);
    ep.shutdown().await;
}

/// A TLS server presenting only its leaf (the endpoint as it is without the CA in its chain):
/// the pinned CA cannot be found, and the token is never sent.
#[tokio::test]
async fn leaf_only_chain_is_a_pin_error() {
    let vm = ServerVm::new(&["127.0.0.1"], true, RateLimit::default());
    let paths = PkiLayout::new(vm.config.pki_dir()).server();
    let leaf = CertificateDer::pem_file_iter(&paths.cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&paths.key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(pilot_agent::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // The handshake fails on the client's alert: nothing to read afterwards.
        acceptor.accept(tcp).await.is_ok()
    });
    let e = fetch_credentials(&at("127.0.0.1", addr), &token(), &vm.pin(), TIMEOUT)
        .await
        .unwrap_err();
    let RemoteError::PinMismatch { presented, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(presented, &[Fingerprint::of_der(&leaf)]);
    assert!(e.to_string().contains("only a leaf certificate"), "{e}");
    assert!(!server.await.unwrap(), "the server's handshake should fail");
}

#[tokio::test]
async fn nothing_listening_is_transient() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let pin = Fingerprint::of_der(b"any");
    let e = fetch_credentials(&at("127.0.0.1", addr), &token(), &pin, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(e, RemoteError::Unreachable { .. }), "{e:?}");
    assert!(e.is_transient());
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}

#[tokio::test]
async fn silent_listener_times_out_within_the_bound() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts and holds the connection without a byte of TLS.
    let holder = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(tcp);
    });
    let pin = Fingerprint::of_der(b"any");
    let limit = Duration::from_millis(300);
    let started = Instant::now();
    let e = fetch_credentials(&at("127.0.0.1", addr), &token(), &pin, limit)
        .await
        .unwrap_err();
    let took = started.elapsed();
    let RemoteError::Timeout { stage, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(*stage, "TLS handshake");
    assert!(e.is_transient());
    assert!(
        took >= limit && took < limit + Duration::from_secs(1),
        "{took:?}"
    );
    holder.abort();
}

#[test]
fn fingerprint_parses_and_round_trips() {
    let fp = Fingerprint::of_der(b"certificate");
    let shown = fp.to_string();
    assert_eq!(shown.len(), 32 * 3 - 1);
    assert_eq!(shown, shown.to_uppercase());
    let plain: String = shown.split(':').collect();
    for text in [
        shown.clone(),
        shown.to_lowercase(),
        plain.clone(),
        plain.to_lowercase(),
        format!("  {shown}\n"),
        format!("sha256 Fingerprint={shown}"),
        format!("SHA256 FINGERPRINT={plain}"),
    ] {
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp), "{text:?}");
    }
    assert_eq!(format!("{fp:?}"), format!("Fingerprint({shown})"));
}

#[test]
fn fingerprint_rejects_bad_input() {
    let shown = Fingerprint::of_der(b"certificate").to_string();
    let plain: String = shown.split(':').collect();
    for bad in [
        String::new(),
        plain[..62].to_string(),
        format!("{plain}00"),
        format!("{}g", &plain[..63]),
        shown[..shown.len() - 3].to_string(),
        format!("{shown}:00"),
        // Separators in the wrong places, though 64 digits.
        format!("{}:{}", &plain[..3], &plain[3..]),
        shown.replace(':', "-"),
        shown.replace(':', " "),
        format!("sha1 Fingerprint={shown}"),
        "é".repeat(32),
    ] {
        assert_eq!(
            bad.parse::<Fingerprint>(),
            Err(FingerprintError::Format),
            "{bad:?}"
        );
    }
    assert!(matches!(
        Fingerprint::of_pem("not a certificate"),
        Err(FingerprintError::Pem(_))
    ));
}

#[test]
fn fingerprint_of_pem_is_that_of_its_der() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["ca.invalid".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    assert_eq!(
        Fingerprint::of_pem(&cert.pem()).unwrap(),
        Fingerprint::of_der(cert.der())
    );
    // As `openssl x509 -fingerprint -sha256` computes it: SHA-256 over the DER.
    let digest: [u8; 32] = Sha256::digest(cert.der()).into();
    assert_eq!(Fingerprint::of_der(cert.der()).as_bytes(), &digest);
}

#[test]
fn server_endpoint_parses() {
    let ok = |s: &str, host: &str, port: u16| {
        let e: ServerEndpoint = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!((e.host.as_str(), e.port), (host, port), "{s}");
    };
    ok("10.0.0.5:9443", "10.0.0.5", 9443);
    ok("10.0.0.5", "10.0.0.5", DEFAULT_PORT);
    ok("Pilot.Example.com.", "pilot.example.com", DEFAULT_PORT);
    ok("pilot.example.com:8443", "pilot.example.com", 8443);
    ok("[2001:db8::1]:9443", "2001:db8::1", 9443);
    ok("[2001:db8::1]", "2001:db8::1", DEFAULT_PORT);
    ok("2001:db8::1", "2001:db8::1", DEFAULT_PORT);
    ok(" localhost:1 ", "localhost", 1);
    for bad in [
        "",
        ":8443",
        "host:",
        "host:0",
        "host:65536",
        "host:port",
        "[2001:db8::1",
        "[2001:db8::1]9443",
        "[pilot.example.com]:1",
        "bad_name!:8443",
        "a b:1",
    ] {
        assert!(bad.parse::<ServerEndpoint>().is_err(), "{bad:?}");
    }
    let v6: ServerEndpoint = "[2001:db8::1]:9443".parse().unwrap();
    assert_eq!(v6.to_string(), "[2001:db8::1]:9443");
    let v4: ServerEndpoint = "10.0.0.5".parse().unwrap();
    assert_eq!(v4.to_string(), "10.0.0.5:8443");
}

#[tokio::test]
async fn token_with_a_newline_is_refused_before_connecting() {
    let pin = Fingerprint::of_der(b"any");
    // Port 1 on loopback: nothing is contacted, the token is refused first.
    let e = fetch_credentials(
        &"127.0.0.1:1".parse().unwrap(),
        &Secret::new("tok\r\nX-Injected: 1"),
        &pin,
        TIMEOUT,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RemoteError::InvalidToken), "{e:?}");
    assert!(!e.to_string().contains("Injected"), "{e}");
}
