//! `waypoint server run`: the stand-in server. Both Waypoint ports (gRPC 9701 and HTTP 9702)
//! serve the same small HTTPS JSON API with the self-signed certificate from the data dir:
//!
//! | method, path        | auth     | what                                                   |
//! |---------------------|----------|--------------------------------------------------------|
//! | `GET /`             | none     | `waypoint stand-in server` (readiness probe)           |
//! | `GET /v1/status`    | none     | bootstrapped?, advertise address, runner count         |
//! | `POST /v1/bootstrap`| loopback | first call mints the bootstrap token; later ones 409   |
//! | `GET /v1/whoami`    | token    | the kind of the presented token                        |
//! | `POST /v1/tokens`   | token    | mints a login or runner token                          |
//! | `POST /v1/runners`  | token    | a runner registers or beats (`id`, docker status)      |
//! | `GET /v1/runners`   | token    | registered runners with last-seen times                |
//! | `POST /v1/config`   | token    | sets the advertise address (`server config-set`)       |
//!
//! Tokens go in `Authorization: Bearer TOKEN` (a bare token is accepted too, as Waypoint's
//! gRPC metadata carries it). Error bodies are plain text.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, IoContext, Result};
use crate::state::{Advertise, Bootstrap, StateStore, TokenKind};
use crate::{debug_log, log, tls};

/// Largest request body the API reads; its documents are tiny.
const MAX_REQUEST_BODY: usize = 64 * 1024;

/// The exact text Waypoint answers a second bootstrap with; the agent keys on it.
pub const ALREADY_BOOTSTRAPPED: &str = "server is already bootstrapped";

/// What `server run` was asked to do.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `-db`: the state file; its directory is the data dir.
    pub db_path: PathBuf,
    /// `-listen-grpc`.
    pub listen_grpc: String,
    /// `-listen-http`.
    pub listen_http: String,
    /// `-advertise-addr` and friends, if given.
    pub advertise: Option<Advertise>,
    /// `-tls-cert-file` and `-tls-key-file`, if given; otherwise a self-signed pair is used.
    pub tls_files: Option<(PathBuf, PathBuf)>,
}

/// State shared by all connections.
pub struct Shared {
    store: Mutex<StateStore>,
}

impl Shared {
    /// Opens (or creates) the state at `db_path`.
    pub fn open(db_path: &Path) -> Result<Self> {
        Ok(Shared {
            store: Mutex::new(StateStore::open(db_path)?),
        })
    }
}

/// A bound, not yet serving server.
pub struct Server {
    grpc: TcpListener,
    http: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
}

impl Server {
    /// Prepares the data dir, state, certificate and both listeners.
    pub async fn bind(opts: &ServerOptions) -> Result<Server> {
        let data_dir = match opts.db_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&data_dir)
            .io_context(|| format!("failed to create data dir {}", data_dir.display()))?;
        let shared = Shared::open(&opts.db_path)?;
        if let Some(adv) = &opts.advertise {
            shared.store.lock().await.set_advertise(adv.clone())?;
        }

        let identity = match &opts.tls_files {
            Some((cert, key)) => tls::load_identity(cert, key)?,
            None => {
                let names: Vec<String> = opts
                    .advertise
                    .iter()
                    .filter_map(|a| split_host(&a.addr))
                    .collect();
                let (identity, created) = tls::load_or_create_server_identity(&data_dir, &names)?;
                if created {
                    log!(
                        "server: generated a self-signed tls certificate in {}",
                        data_dir.display()
                    );
                } else {
                    log!(
                        "server: reusing the tls certificate in {}",
                        data_dir.display()
                    );
                }
                identity
            }
        };
        let acceptor = TlsAcceptor::from(tls::server_config(identity)?);

        let grpc = TcpListener::bind(&opts.listen_grpc)
            .await
            .io_context(|| format!("failed to listen on {} (-listen-grpc)", opts.listen_grpc))?;
        let http = TcpListener::bind(&opts.listen_http)
            .await
            .io_context(|| format!("failed to listen on {} (-listen-http)", opts.listen_http))?;
        Ok(Server {
            grpc,
            http,
            acceptor,
            shared: Arc::new(shared),
        })
    }

    /// The bound "gRPC" address (useful with port 0).
    pub fn grpc_addr(&self) -> Result<SocketAddr> {
        self.grpc
            .local_addr()
            .io_context(|| "failed to read the grpc listener address".into())
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> Result<SocketAddr> {
        self.http
            .local_addr()
            .io_context(|| "failed to read the http listener address".into())
    }

    /// Whether the server was bootstrapped already.
    pub async fn bootstrapped(&self) -> bool {
        self.shared.store.lock().await.state().bootstrapped
    }

    /// Serves both ports until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let grpc = tokio::spawn(accept_loop(
            self.grpc,
            self.acceptor.clone(),
            self.shared.clone(),
            "grpc",
        ));
        let http = tokio::spawn(accept_loop(self.http, self.acceptor, self.shared, "http"));
        shutdown.await;
        grpc.abort();
        http.abort();
    }
}

/// The host part of `HOST:PORT` (brackets removed), if any.
fn split_host(addr: &str) -> Option<String> {
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    port_name: &'static str,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning on the error.
                log!("server: {port_name} accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            // Readiness probes that open and close plain TCP connections land here; they are
            // normal, so handshake failures are logged only when verbose.
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        debug_log!("server: {port_name} tls handshake from {peer} failed: {e}");
                        return;
                    }
                    Err(_) => {
                        debug_log!("server: {port_name} tls handshake from {peer} timed out");
                        return;
                    }
                };
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&shared, peer, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                debug_log!("server: {port_name} connection from {peer} ended with an error: {e}");
            }
        });
    }
}

async fn handle(
    shared: &Shared,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let reply = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(body) => {
            route(
                shared,
                peer.ip(),
                &method,
                &path,
                auth.as_deref(),
                &body.to_bytes(),
            )
            .await
        }
        Err(e) => ApiReply::text(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        ),
    };
    debug_log!(
        "server: {method} {path} from {peer} -> {}",
        reply.status.as_u16()
    );
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = reply.status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    response
}

/// An API answer before it becomes an HTTP response.
#[derive(Debug)]
pub struct ApiReply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl ApiReply {
    fn text(status: StatusCode, text: impl Into<String>) -> Self {
        ApiReply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: text.into().into_bytes(),
        }
    }

    fn json(value: serde_json::Value) -> Self {
        ApiReply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
        }
    }

    fn internal(context: &str, err: Error) -> Self {
        log!("server: {context}: {err}");
        ApiReply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{context}: {err}"),
        )
    }
}

/// The token from an `Authorization` header: `Bearer TOKEN` or a bare token.
fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        Some(_) => return None,
        None => value,
    };
    (!token.is_empty()).then_some(token)
}

#[derive(Deserialize)]
struct MintRequest {
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct RegisterRequest {
    id: String,
    #[serde(default)]
    docker_ok: bool,
    #[serde(default)]
    docker_version: Option<String>,
}

#[derive(Deserialize)]
struct ConfigRequest {
    advertise_addr: String,
    #[serde(default = "default_true")]
    advertise_tls: bool,
    #[serde(default)]
    advertise_tls_skip_verify: bool,
}

fn default_true() -> bool {
    true
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> std::result::Result<T, ApiReply> {
    serde_json::from_slice(body).map_err(|e| {
        ApiReply::text(
            StatusCode::BAD_REQUEST,
            format!("bad json request body: {e}"),
        )
    })
}

/// Routes one request. Separate from the socket code so unit tests can call it directly.
pub async fn route(
    shared: &Shared,
    peer: IpAddr,
    method: &Method,
    path: &str,
    authorization: Option<&str>,
    body: &[u8],
) -> ApiReply {
    match (method, path) {
        (&Method::GET, "/") => ApiReply::text(StatusCode::OK, "waypoint stand-in server"),
        (&Method::GET, "/v1/status") => {
            let store = shared.store.lock().await;
            let state = store.state();
            ApiReply::json(json!({
                "standin": true,
                "version": crate::VERSION_LINE,
                "bootstrapped": state.bootstrapped,
                "advertise_addr": state.advertise.as_ref().map(|a| a.addr.clone()),
                "advertise_tls": state.advertise.as_ref().map(|a| a.tls),
                "advertise_tls_skip_verify": state.advertise.as_ref().map(|a| a.tls_skip_verify),
                "runners": state.runners.len(),
            }))
        }
        (&Method::POST, "/v1/bootstrap") => {
            // Only from inside the server's own network namespace (the agent runs
            // `docker exec SERVER waypoint server bootstrap`), so nobody on the network can
            // race the agent for the one bootstrap token.
            if !peer.to_canonical().is_loopback() {
                log!(
                    "server: refused a bootstrap request from {peer}: bootstrap is only allowed from loopback"
                );
                return ApiReply::text(
                    StatusCode::FORBIDDEN,
                    "bootstrap is only allowed from loopback",
                );
            }
            let mut store = shared.store.lock().await;
            match store.bootstrap() {
                Ok(Bootstrap::Minted(token)) => {
                    log!("server: bootstrapped; the bootstrap token is persisted");
                    ApiReply::json(json!({ "token": token }))
                }
                Ok(Bootstrap::AlreadyBootstrapped) => {
                    log!("server: refused a second bootstrap: {ALREADY_BOOTSTRAPPED}");
                    ApiReply::text(StatusCode::CONFLICT, ALREADY_BOOTSTRAPPED)
                }
                Err(e) => ApiReply::internal("failed to persist the bootstrap", e),
            }
        }
        (_, "/" | "/v1/status" | "/v1/bootstrap") => method_not_allowed(),
        (_, "/v1/whoami" | "/v1/tokens" | "/v1/runners" | "/v1/config") => {
            let mut store = shared.store.lock().await;
            let kind = match bearer(authorization).and_then(|t| store.authenticate(t)) {
                Some(kind) => kind,
                None => {
                    log!("server: rejected {method} {path} from {peer}: missing or unknown token");
                    return ApiReply::text(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized: missing or unknown token",
                    );
                }
            };
            authenticated(&mut store, kind, method, path, body)
        }
        _ => ApiReply::text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

fn method_not_allowed() -> ApiReply {
    ApiReply::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

fn authenticated(
    store: &mut StateStore,
    kind: TokenKind,
    method: &Method,
    path: &str,
    body: &[u8],
) -> ApiReply {
    match (method, path) {
        (&Method::GET, "/v1/whoami") => {
            ApiReply::json(json!({ "token_kind": kind.as_str(), "standin": true }))
        }
        (&Method::POST, "/v1/tokens") => {
            let request: MintRequest = if body.is_empty() {
                MintRequest { kind: None }
            } else {
                match parse_json(body) {
                    Ok(r) => r,
                    Err(reply) => return reply,
                }
            };
            let new_kind = match request.kind.as_deref() {
                None | Some("login") => TokenKind::Login,
                Some("runner") => TokenKind::Runner,
                Some(other) => {
                    return ApiReply::text(
                        StatusCode::BAD_REQUEST,
                        format!("unknown token kind {other:?}"),
                    );
                }
            };
            match store.mint(new_kind) {
                Ok(token) => {
                    log!("server: issued a {} token", new_kind.as_str());
                    ApiReply::json(json!({ "token": token, "token_kind": new_kind.as_str() }))
                }
                Err(e) => ApiReply::internal("failed to persist the new token", e),
            }
        }
        (&Method::POST, "/v1/runners") => {
            let request: RegisterRequest = match parse_json(body) {
                Ok(r) => r,
                Err(reply) => return reply,
            };
            if request.id.is_empty() || request.id.len() > 128 {
                return ApiReply::text(
                    StatusCode::BAD_REQUEST,
                    "runner id must be 1 to 128 characters",
                );
            }
            match store.register_runner(
                &request.id,
                request.docker_ok,
                request.docker_version.clone(),
            ) {
                Ok(changed) => {
                    if changed {
                        log!(
                            "server: runner {} registered (docker_ok={}, docker_version={})",
                            request.id,
                            request.docker_ok,
                            request.docker_version.as_deref().unwrap_or("-")
                        );
                    }
                    ApiReply::json(json!({ "id": request.id, "registered": true }))
                }
                Err(e) => ApiReply::internal("failed to persist the runner", e),
            }
        }
        (&Method::GET, "/v1/runners") => {
            let runners: Vec<_> = store.state().runners.values().cloned().collect();
            ApiReply::json(json!({ "runners": runners }))
        }
        (&Method::POST, "/v1/config") => {
            let request: ConfigRequest = match parse_json(body) {
                Ok(r) => r,
                Err(reply) => return reply,
            };
            if split_host(&request.advertise_addr).is_none() {
                return ApiReply::text(StatusCode::BAD_REQUEST, "advertise_addr must be HOST:PORT");
            }
            let advertise = Advertise {
                addr: request.advertise_addr,
                tls: request.advertise_tls,
                tls_skip_verify: request.advertise_tls_skip_verify,
            };
            match store.set_advertise(advertise.clone()) {
                Ok(()) => {
                    log!("server: advertise address set to {}", advertise.addr);
                    ApiReply::json(json!({ "advertise_addr": advertise.addr }))
                }
                Err(e) => ApiReply::internal("failed to persist the configuration", e),
            }
        }
        _ => method_not_allowed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));

    fn json_of(reply: &ApiReply) -> serde_json::Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    #[tokio::test]
    async fn bootstrap_only_once_and_only_from_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(&dir.path().join("data.db")).unwrap();
        let remote = route(&shared, REMOTE, &Method::POST, "/v1/bootstrap", None, b"").await;
        assert_eq!(remote.status, StatusCode::FORBIDDEN);
        let first = route(&shared, LOOPBACK, &Method::POST, "/v1/bootstrap", None, b"").await;
        assert_eq!(first.status, StatusCode::OK);
        let token = json_of(&first)["token"].as_str().unwrap().to_string();
        let second = route(&shared, LOOPBACK, &Method::POST, "/v1/bootstrap", None, b"").await;
        assert_eq!(second.status, StatusCode::CONFLICT);
        assert_eq!(second.body, ALREADY_BOOTSTRAPPED.as_bytes());

        // IPv4-mapped loopback counts as loopback.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let third = route(&shared, mapped, &Method::POST, "/v1/bootstrap", None, b"").await;
        assert_eq!(third.status, StatusCode::CONFLICT);

        let auth = format!("Bearer {token}");
        let who = route(
            &shared,
            REMOTE,
            &Method::GET,
            "/v1/whoami",
            Some(&auth),
            b"",
        )
        .await;
        assert_eq!(json_of(&who)["token_kind"], "bootstrap");
        let status = route(&shared, REMOTE, &Method::GET, "/v1/status", None, b"").await;
        assert_eq!(json_of(&status)["bootstrapped"], true);
    }

    #[tokio::test]
    async fn authenticated_endpoints_need_an_issued_token() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(&dir.path().join("data.db")).unwrap();
        for (method, path) in [
            (Method::GET, "/v1/whoami"),
            (Method::POST, "/v1/tokens"),
            (Method::GET, "/v1/runners"),
            (Method::POST, "/v1/runners"),
            (Method::POST, "/v1/config"),
        ] {
            for auth in [
                None,
                Some("Bearer nope"),
                Some("Basic abc"),
                Some("Bearer "),
            ] {
                let reply = route(&shared, LOOPBACK, &method, path, auth, b"{}").await;
                assert_eq!(
                    reply.status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} {auth:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn tokens_runners_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(&dir.path().join("data.db")).unwrap();
        let boot = route(&shared, LOOPBACK, &Method::POST, "/v1/bootstrap", None, b"").await;
        let boot = json_of(&boot)["token"].as_str().unwrap().to_string();

        let minted = route(
            &shared,
            REMOTE,
            &Method::POST,
            "/v1/tokens",
            Some(&boot),
            br#"{"kind":"runner"}"#,
        )
        .await;
        assert_eq!(minted.status, StatusCode::OK);
        let runner_token = format!("bearer {}", json_of(&minted)["token"].as_str().unwrap());
        let who = route(
            &shared,
            REMOTE,
            &Method::GET,
            "/v1/whoami",
            Some(&runner_token),
            b"",
        )
        .await;
        assert_eq!(json_of(&who)["token_kind"], "runner");

        let reg = br#"{"id":"r1","docker_ok":true,"docker_version":"20.10.24"}"#;
        let reply = route(
            &shared,
            REMOTE,
            &Method::POST,
            "/v1/runners",
            Some(&runner_token),
            reg,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        let list = route(
            &shared,
            REMOTE,
            &Method::GET,
            "/v1/runners",
            Some(&runner_token),
            b"",
        )
        .await;
        assert_eq!(json_of(&list)["runners"][0]["docker_version"], "20.10.24");
        assert!(json_of(&list)["runners"][0]["last_seen"].is_string());

        let bad = route(
            &shared,
            REMOTE,
            &Method::POST,
            "/v1/config",
            Some(&boot),
            br#"{"advertise_addr":""}"#,
        )
        .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        let cfg = br#"{"advertise_addr":"192.0.2.10:9701","advertise_tls":true,"advertise_tls_skip_verify":true}"#;
        let set = route(
            &shared,
            REMOTE,
            &Method::POST,
            "/v1/config",
            Some(&boot),
            cfg,
        )
        .await;
        assert_eq!(set.status, StatusCode::OK);
        let status = route(&shared, REMOTE, &Method::GET, "/v1/status", None, b"").await;
        let status = json_of(&status);
        assert_eq!(status["advertise_addr"], "192.0.2.10:9701");
        assert_eq!(status["runners"], 1);
        drop(shared);

        // Everything survives a restart.
        let reopened = Shared::open(&dir.path().join("data.db")).unwrap();
        let status = route(&reopened, REMOTE, &Method::GET, "/v1/status", None, b"").await;
        assert_eq!(json_of(&status)["advertise_addr"], "192.0.2.10:9701");
        let who = route(
            &reopened,
            REMOTE,
            &Method::GET,
            "/v1/whoami",
            Some(&runner_token),
            b"",
        )
        .await;
        assert_eq!(who.status, StatusCode::OK);
    }

    #[test]
    fn parses_authorization_headers() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn splits_hosts() {
        assert_eq!(split_host("10.0.0.1:9701").as_deref(), Some("10.0.0.1"));
        assert_eq!(split_host("[::1]:9701").as_deref(), Some("::1"));
        assert_eq!(
            split_host("pilot.example").as_deref(),
            Some("pilot.example")
        );
        assert_eq!(split_host(":9701"), None);
    }
}
