//! `waypoint server run`: the stand-in server. Both Waypoint ports (gRPC 9701 and HTTP 9702)
//! serve the same small HTTPS JSON API (HTTP/1.1, not gRPC), each with its own self-signed
//! certificate made at this start (or the `-tls-cert-file` pair):
//!
//! | method, path              | Waypoint RPC it stands for | auth  |
//! |---------------------------|----------------------------|-------|
//! | `GET /`                   | the browser UI             | none  |
//! | `GET /v1/version`         | `GetVersionInfo`           | none  |
//! | `GET /v1/status`          | (stand-in: state summary)  | none  |
//! | `POST /v1/bootstrap`      | `BootstrapToken`           | none  |
//! | `GET /v1/whoami`          | (stand-in: the token)      | token |
//! | `POST /v1/tokens`         | `GenerateLoginToken`, `GenerateRunnerToken` | token |
//! | `POST /v1/runner/config`  | `RunnerConfig` (a stream held while the runner is up) | token |
//! | `POST /v1/runners`        | a runner's further calls (it reports Docker) | token |
//! | `GET /v1/runners`         | `ListRunners`              | token |
//! | `POST /v1/runners/forget` | `ForgetRunner`             | token |
//! | `POST`/`GET /v1/config`   | `SetServerConfig`, `GetServerConfig` | token |
//! | `GET /v1/snapshot`        | `CreateSnapshot`           | token |
//! | `POST /v1/restore`        | `RestoreSnapshot` (`?exit=true`: exit 2 after staging) | token |
//! | `POST /v1/projects`       | `UpsertProject` (`{"project": {...}}`) | token |
//! | `GET /v1/projects`        | `ListProjects`             | token |
//! | `POST /v1/projects/get`   | `GetProject` (`{"project": "NAME"}`) | token |
//!
//! The token goes in `Authorization` bare, as Waypoint's gRPC metadata carries it
//! (`Bearer TOKEN` is accepted too). Authentication and the calls follow Waypoint's rules
//! ([`crate::service`]); errors are JSON `{"code": "...", "message": "..."}` with Waypoint's
//! message. As in Waypoint, bootstrap is open to every client that reaches a port.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::service::{self, Auth, Code, Endpoint, Principal, RpcError};
use crate::state::{Advertise, Bootstrap, OpenError, StateStore};
use crate::{debug_log, log, tls};

/// Largest request body the API reads (snapshots included).
const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

/// How often the runner configuration stream sends a keepalive line.
pub const STREAM_KEEPALIVE: Duration = Duration::from_secs(1);

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
    /// `-tls-cert-file` and `-tls-key-file`, if given; otherwise each listener self-signs.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// `-disable-ui`: `GET /` answers 404.
    pub disable_ui: bool,
}

/// State shared by all connections.
pub struct Shared {
    store: Mutex<StateStore>,
    /// Open configuration streams per runner id (lower case).
    live: std::sync::Mutex<HashMap<String, u32>>,
    exit: watch::Sender<Option<i32>>,
    ui: bool,
    /// The CLI's in-memory local server: every call is the superuser's.
    superuser: bool,
}

impl Shared {
    /// Opens (or creates) the state at `db_path`.
    pub fn open(db_path: &Path) -> std::result::Result<Self, OpenError> {
        let store = StateStore::open(db_path)?;
        if store.restored {
            log!(
                "server: applied the staged restore to {}",
                db_path.display()
            );
        }
        Ok(Shared {
            store: Mutex::new(store),
            live: std::sync::Mutex::new(HashMap::new()),
            exit: watch::channel(None).0,
            ui: true,
            superuser: false,
        })
    }

    /// The state for the CLI's local server (Waypoint's in-memory server on `data.db` in the
    /// working directory, used by some commands when no server is configured): no auth.
    pub fn open_local(db_path: &Path) -> std::result::Result<Self, OpenError> {
        let mut shared = Shared::open(db_path)?;
        shared.superuser = true;
        Ok(shared)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        match self.live.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn is_online(&self, id: &str) -> bool {
        self.live().get(&id.to_lowercase()).is_some_and(|n| *n > 0)
    }

    /// Whether the server was bootstrapped already.
    pub async fn bootstrapped(&self) -> bool {
        self.store.lock().await.bootstrapped()
    }

    /// Stores the `-advertise-addr` of `server run`.
    pub async fn set_advertise(&self, advertise: Advertise) -> crate::error::Result<()> {
        self.store.lock().await.set_advertise(advertise)
    }
}

/// A bound, not yet serving server.
pub struct Server {
    grpc: TcpListener,
    http: TcpListener,
    grpc_tls: TlsAcceptor,
    http_tls: TlsAcceptor,
    shared: Arc<Shared>,
}

/// Go's `net.Listen` error text.
fn listen_error(addr: &str, e: &std::io::Error) -> String {
    let reason = crate::context::go_errno_text(e);
    if e.kind() == std::io::ErrorKind::AddrInUse || e.raw_os_error() == Some(13) {
        format!("listen tcp {addr}: bind: {reason}")
    } else {
        format!("listen tcp {addr}: {reason}")
    }
}

impl Server {
    /// Binds both listeners and gives each its certificate, as `server run` does after the
    /// database and the URL service. Errors are the texts `server run` prints.
    pub async fn bind(
        mut shared: Shared,
        opts: &ServerOptions,
    ) -> std::result::Result<Server, String> {
        shared.ui = !opts.disable_ui;
        let grpc = TcpListener::bind(&opts.listen_grpc)
            .await
            .map_err(|e| listen_error(&opts.listen_grpc, &e))?;
        let http = TcpListener::bind(&opts.listen_http)
            .await
            .map_err(|e| listen_error(&opts.listen_http, &e))?;
        let cert = match &opts.tls_files {
            None => tls::ServerCert::SelfSigned,
            Some((cert, key)) => tls::ServerCert::Files(Arc::new(
                tls::FileCertResolver::new(cert, key).map_err(|e| e.to_string())?,
            )),
        };
        if opts.tls_files.is_none() {
            log!(
                "server: each listener uses its own self-signed certificate, made now, kept in memory"
            );
        }
        let grpc_tls = TlsAcceptor::from(tls::server_config(&cert).map_err(|e| e.to_string())?);
        let http_tls = TlsAcceptor::from(tls::server_config(&cert).map_err(|e| e.to_string())?);
        Ok(Server {
            grpc,
            http,
            grpc_tls,
            http_tls,
            shared: Arc::new(shared),
        })
    }

    /// The bound "gRPC" address (useful with port 0).
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// Whether the server was bootstrapped already.
    pub async fn bootstrapped(&self) -> bool {
        self.shared.bootstrapped().await
    }

    /// Serves both ports until `shutdown` completes (exit code 0) or a restore with `-exit`
    /// asks the server to exit (code 2). Open runner streams end as the server stops, so the
    /// runners that only a stream kept registered are forgotten, as in Waypoint.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> i32 {
        let grpc = tokio::spawn(accept_loop(
            self.grpc,
            self.grpc_tls,
            self.shared.clone(),
            "grpc",
        ));
        let http = tokio::spawn(accept_loop(
            self.http,
            self.http_tls,
            self.shared.clone(),
            "http",
        ));
        let mut exit = self.shared.exit.subscribe();
        let code = tokio::select! {
            _ = shutdown => 0,
            code = async {
                loop {
                    if let Some(code) = *exit.borrow_and_update() {
                        return code;
                    }
                    if exit.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            } => code,
        };
        grpc.abort();
        http.abort();
        let ids: Vec<String> = self.shared.live().drain().map(|(id, _)| id).collect();
        let mut store = self.shared.store.lock().await;
        for id in ids {
            if let Err(e) = store.runner_offline(&id) {
                log!("server: failed to mark runner {id} offline: {e}");
            }
        }
        code
    }
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
                async move { Ok::<_, Infallible>(handle(shared, peer, req).await) }
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

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes)).boxed_unsync()
}

fn respond(reply: ApiReply) -> Response<Body> {
    let mut response = Response::new(full(reply.body));
    *response.status_mut() = reply.status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    response
}

async fn handle(shared: Arc<Shared>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return respond(ApiReply::error(RpcError::new(
                Code::InvalidArgument,
                format!("cannot read the request body: {e}"),
            )));
        }
    };
    if method == Method::POST && path == "/v1/runner/config" {
        return runner_config(shared, peer, auth.as_deref(), &body).await;
    }
    let reply = route(&shared, &method, &path, &query, auth.as_deref(), &body).await;
    debug_log!(
        "server: {method} {path} from {peer} -> {}",
        reply.status.as_u16()
    );
    respond(reply)
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

    fn json(value: Value) -> Self {
        ApiReply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
        }
    }

    fn error(err: RpcError) -> Self {
        ApiReply {
            status: StatusCode::from_u16(err.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            content_type: "application/json",
            body: err.to_json().to_string().into_bytes(),
        }
    }
}

/// The token from an `Authorization` header: a bare token or `Bearer TOKEN`.
fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        Some(_) => return None,
        None => value,
    };
    (!token.is_empty()).then_some(token)
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> std::result::Result<T, ApiReply> {
    let body = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| {
        ApiReply::error(RpcError::new(
            Code::InvalidArgument,
            format!("bad json request body: {e}"),
        ))
    })
}

async fn authorize(
    shared: &Shared,
    authorization: Option<&str>,
    endpoint: Endpoint,
) -> std::result::Result<Principal, RpcError> {
    if shared.superuser {
        return Ok(Principal::Superuser);
    }
    let outcome = {
        let store = shared.store.lock().await;
        service::authenticate(&store, bearer(authorization), endpoint)
    };
    match outcome {
        Auth::Ok(p) => Ok(p),
        Auth::Refused(e) => {
            log!("server: refused {endpoint:?}: {}", e.message);
            Err(e)
        }
        Auth::Tarpit(e) => {
            log!(
                "server: refused {endpoint:?} after the {} s tarpit: {}",
                service::TARPIT.as_secs(),
                e.message
            );
            tokio::time::sleep(service::TARPIT).await;
            Err(e)
        }
    }
}

#[derive(Deserialize)]
struct MintRequest {
    #[serde(default)]
    kind: Option<String>,
    #[serde(flatten)]
    rest: Value,
}

#[derive(Deserialize)]
struct ReportRequest {
    id: String,
    #[serde(default)]
    docker_ok: bool,
    #[serde(default)]
    docker_version: Option<String>,
}

#[derive(Deserialize)]
struct ForgetRequest {
    #[serde(default)]
    id: String,
}

#[derive(Deserialize)]
struct ConfigRequest {
    #[serde(default)]
    advertise_addr: String,
    #[serde(default = "default_true")]
    advertise_tls: bool,
    #[serde(default)]
    advertise_tls_skip_verify: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
struct UpsertProjectRequest {
    #[serde(default)]
    project: Option<crate::project::Project>,
}

#[derive(Deserialize)]
struct GetProjectRequest {
    #[serde(default)]
    project: Option<String>,
}

fn endpoint_of(method: &Method, path: &str, body: &[u8]) -> Option<Endpoint> {
    Some(match (method, path) {
        (&Method::GET, "/v1/whoami") => Endpoint::Whoami,
        (&Method::POST, "/v1/tokens") => {
            let kind = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["kind"].as_str().map(str::to_string));
            if kind.as_deref() == Some("runner") {
                Endpoint::GenerateRunnerToken
            } else {
                Endpoint::GenerateLoginToken
            }
        }
        (&Method::POST, "/v1/runners") => Endpoint::RunnerReport,
        (&Method::GET, "/v1/runners") => Endpoint::ListRunners,
        (&Method::POST, "/v1/runners/forget") => Endpoint::ForgetRunner,
        (&Method::POST, "/v1/config") => Endpoint::SetServerConfig,
        (&Method::GET, "/v1/config") => Endpoint::GetServerConfig,
        (&Method::GET, "/v1/snapshot") => Endpoint::CreateSnapshot,
        (&Method::POST, "/v1/restore") => Endpoint::RestoreSnapshot,
        (&Method::POST, "/v1/projects") => Endpoint::UpsertProject,
        (&Method::GET, "/v1/projects") => Endpoint::ListProjects,
        (&Method::POST, "/v1/projects/get") => Endpoint::GetProject,
        _ => return None,
    })
}

/// Routes one unary request. Separate from the socket code so unit tests can call it.
pub async fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &str,
    authorization: Option<&str>,
    body: &[u8],
) -> ApiReply {
    match (method, path) {
        (&Method::GET, "/") if shared.ui => {
            return ApiReply::text(StatusCode::OK, "waypoint stand-in server");
        }
        (&Method::GET, "/") => return ApiReply::text(StatusCode::NOT_FOUND, "404 page not found"),
        (&Method::GET, "/v1/version") => {
            return ApiReply::json(json!({
                "standin": true,
                "version": "v0.11.4",
                "version_line": crate::VERSION_LINE,
            }));
        }
        (&Method::GET, "/v1/status") => {
            let store = shared.store.lock().await;
            let state = store.state();
            return ApiReply::json(json!({
                "standin": true,
                "version": crate::VERSION_LINE,
                "bootstrapped": store.bootstrapped(),
                "advertise_addr": state.advertise.as_ref().map(|a| a.addr.clone()),
                "advertise_tls": state.advertise.as_ref().map(|a| a.tls),
                "advertise_tls_skip_verify": state.advertise.as_ref().map(|a| a.tls_skip_verify),
                "runners": state.runners.len(),
                "projects": state.projects.len(),
            }));
        }
        (&Method::POST, "/v1/bootstrap") => {
            let mut store = shared.store.lock().await;
            return match store.bootstrap() {
                Ok(Bootstrap::Minted(token)) => {
                    log!("server: bootstrapped; the signing key and the user are persisted");
                    ApiReply::json(json!({ "token": token }))
                }
                Ok(Bootstrap::AlreadyBootstrapped) => {
                    log!("server: refused a second bootstrap: {ALREADY_BOOTSTRAPPED}");
                    ApiReply::error(RpcError::new(Code::PermissionDenied, ALREADY_BOOTSTRAPPED))
                }
                Err(e) => ApiReply::error(RpcError::new(
                    Code::Internal,
                    format!("failed to persist the bootstrap: {e}"),
                )),
            };
        }
        _ => {}
    }
    let Some(endpoint) = endpoint_of(method, path, body) else {
        let known = [
            "/",
            "/v1/version",
            "/v1/status",
            "/v1/bootstrap",
            "/v1/whoami",
            "/v1/tokens",
            "/v1/runners",
            "/v1/runners/forget",
            "/v1/config",
            "/v1/snapshot",
            "/v1/restore",
            "/v1/runner/config",
            "/v1/projects",
            "/v1/projects/get",
        ];
        return if known.contains(&path) {
            ApiReply::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        } else {
            ApiReply::text(StatusCode::NOT_FOUND, "404 page not found")
        };
    };
    let who = match authorize(shared, authorization, endpoint).await {
        Ok(p) => p,
        Err(e) => return ApiReply::error(e),
    };
    match call(shared, endpoint, &who, query, body).await {
        Ok(reply) => reply,
        Err(e) => ApiReply::error(e),
    }
}

async fn call(
    shared: &Shared,
    endpoint: Endpoint,
    who: &Principal,
    query: &str,
    body: &[u8],
) -> std::result::Result<ApiReply, RpcError> {
    let bad = |reply: ApiReply| -> RpcError {
        serde_json::from_slice(&reply.body)
            .unwrap_or_else(|_| RpcError::new(Code::InvalidArgument, "bad json request body"))
    };
    Ok(match endpoint {
        Endpoint::Whoami => ApiReply::json(service::whoami(who)),
        Endpoint::GenerateLoginToken | Endpoint::GenerateRunnerToken => {
            let request: MintRequest = parse_json(body).map_err(bad)?;
            let mut store = shared.store.lock().await;
            let token = if endpoint == Endpoint::GenerateRunnerToken {
                let req = serde_json::from_value(request.rest).map_err(|e| {
                    RpcError::new(Code::InvalidArgument, format!("bad request: {e}"))
                })?;
                service::generate_runner(&mut store, who, &req)?
            } else {
                if request.kind.as_deref().is_some_and(|k| k != "login") {
                    return Err(RpcError::new(Code::InvalidArgument, "unknown token kind"));
                }
                let req = serde_json::from_value(request.rest).map_err(|e| {
                    RpcError::new(Code::InvalidArgument, format!("bad request: {e}"))
                })?;
                service::generate_login(&mut store, who, &req)?
            };
            log!("server: issued a token ({endpoint:?})");
            ApiReply::json(json!({ "token": token }))
        }
        Endpoint::RunnerReport => {
            let req: ReportRequest = parse_json(body).map_err(bad)?;
            let other_runner = matches!(who, Principal::Runner { id, .. }
                if !id.is_empty() && !id.eq_ignore_ascii_case(&req.id));
            if other_runner {
                return Err(RpcError::new(
                    Code::PermissionDenied,
                    "provided runner token is for a different runner",
                ));
            }
            let mut store = shared.store.lock().await;
            match store.report_docker(&req.id, req.docker_ok, req.docker_version.clone()) {
                Ok(true) => ApiReply::json(json!({ "id": req.id, "recorded": true })),
                Ok(false) => return Err(RpcError::new(Code::NotFound, "runner not found")),
                Err(e) => {
                    return Err(RpcError::new(
                        Code::Internal,
                        format!("failed to update runner: {e}"),
                    ));
                }
            }
        }
        Endpoint::ListRunners => {
            let store = shared.store.lock().await;
            ApiReply::json(service::list_runners(&store, &|id| shared.is_online(id)))
        }
        Endpoint::ForgetRunner => {
            let req: ForgetRequest = parse_json(body).map_err(bad)?;
            let mut store = shared.store.lock().await;
            service::forget_runner(&mut store, &req.id)?;
            log!("server: forgot runner {:?}", req.id);
            ApiReply::json(json!({ "forgotten": req.id }))
        }
        Endpoint::SetServerConfig => {
            let req: ConfigRequest = parse_json(body).map_err(bad)?;
            let advertise = Advertise {
                addr: req.advertise_addr,
                tls: req.advertise_tls,
                tls_skip_verify: req.advertise_tls_skip_verify,
            };
            let mut store = shared.store.lock().await;
            service::set_server_config(&mut store, advertise.clone())?;
            log!("server: advertise address set to {:?}", advertise.addr);
            ApiReply::json(json!({ "advertise_addr": advertise.addr }))
        }
        Endpoint::GetServerConfig => {
            let store = shared.store.lock().await;
            ApiReply::json(json!({ "advertise": store.state().advertise }))
        }
        Endpoint::CreateSnapshot => {
            let store = shared.store.lock().await;
            let bytes = store
                .snapshot()
                .map_err(|e| RpcError::new(Code::Internal, e.to_string()))?;
            ApiReply {
                status: StatusCode::OK,
                content_type: "application/octet-stream",
                body: bytes,
            }
        }
        Endpoint::RestoreSnapshot => {
            let store = shared.store.lock().await;
            store
                .stage_restore(body)
                .map_err(|e| RpcError::new(Code::Internal, e))?;
            log!("server: staged a restore; it is applied at the next start");
            if query
                .split('&')
                .any(|kv| kv == "exit=true" || kv == "exit=1")
            {
                log!("server: exiting with code 2 so the restore is applied at the restart");
                let exit = shared.exit.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = exit.send(Some(2));
                });
            }
            ApiReply::json(json!({ "staged": true }))
        }
        Endpoint::UpsertProject => {
            let req: UpsertProjectRequest = parse_json(body).map_err(bad)?;
            let Some(project) = req.project else {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    "project: cannot be blank.",
                ));
            };
            let mut store = shared.store.lock().await;
            let stored = service::upsert_project(&mut store, project)?;
            log!("server: upserted project {:?}", stored.name);
            ApiReply::json(json!({ "project": stored }))
        }
        Endpoint::GetProject => {
            let req: GetProjectRequest = parse_json(body).map_err(bad)?;
            let store = shared.store.lock().await;
            ApiReply::json(service::get_project(&store, req.project.as_deref())?)
        }
        Endpoint::ListProjects => {
            let store = shared.store.lock().await;
            ApiReply::json(service::list_projects(&store))
        }
        Endpoint::RunnerConfig => {
            return Err(RpcError::new(Code::InvalidArgument, "use the stream"));
        }
    })
}

#[derive(Deserialize)]
struct RunnerConfigRequest {
    id: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

/// `RunnerConfig`: registers the runner and holds the answer open, one keepalive line a
/// second, for as long as the runner is connected. When the stream ends the runner goes
/// offline ([`StateStore::runner_offline`]).
async fn runner_config(
    shared: Arc<Shared>,
    peer: SocketAddr,
    authorization: Option<&str>,
    body: &[u8],
) -> Response<Body> {
    let who = match authorize(&shared, authorization, Endpoint::RunnerConfig).await {
        Ok(p) => p,
        Err(e) => return respond(ApiReply::error(e)),
    };
    let req: RunnerConfigRequest = match parse_json(body) {
        Ok(r) => r,
        Err(reply) => return respond(reply),
    };
    let adoption = {
        let mut store = shared.store.lock().await;
        let adoption = service::register_runner(&mut store, &who, &req.id, &req.labels);
        if adoption.is_ok() {
            // Counted while the store is held, so a previous stream's offline cannot slip
            // between this registration and its count.
            *shared.live().entry(req.id.to_lowercase()).or_insert(0) += 1;
        }
        adoption
    };
    let adoption = match adoption {
        Ok(a) => a,
        Err(e) => {
            log!(
                "server: refused runner {:?} from {peer}: {}",
                req.id,
                e.message
            );
            return respond(ApiReply::error(e));
        }
    };
    log!(
        "server: runner {} registered ({}) from {peer}",
        req.id,
        adoption.as_str()
    );
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let first = json!({ "registered": true, "adoption_state": adoption.as_str() });
    let _ = tx.try_send(Bytes::from(format!("{first}\n")));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(STREAM_KEEPALIVE).await;
            if tx
                .send(Bytes::from_static(b"{\"keepalive\":true}\n"))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let body = StreamBody {
        rx,
        guard: Some(OfflineGuard {
            shared: shared.clone(),
            id: req.id.clone(),
        }),
    };
    let mut response = Response::new(body.boxed_unsync());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// The configuration stream's body: lines from a channel; dropping it (the runner went away,
/// the server stops) marks the runner offline.
struct StreamBody {
    rx: mpsc::Receiver<Bytes>,
    guard: Option<OfflineGuard>,
}

impl hyper::body::Body for StreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(bytes)) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Poll::Ready(None) => {
                this.guard.take();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

struct OfflineGuard {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for OfflineGuard {
    fn drop(&mut self) {
        let key = self.id.to_lowercase();
        // Waypoint marks a runner offline when its stream ends. gRPC notices a dead stream at
        // once; the stand-in notices at its next keepalive, so a runner that restarted may
        // already hold a new stream: only the last stream's end takes the runner offline.
        let last = {
            let mut live = self.shared.live();
            match live.get_mut(&key) {
                Some(n) => {
                    *n = n.saturating_sub(1);
                    let last = *n == 0;
                    if last {
                        live.remove(&key);
                    }
                    last
                }
                // The server's shutdown already took it offline.
                None => false,
            }
        };
        if !last {
            return;
        }
        let shared = self.shared.clone();
        let id = self.id.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut store = shared.store.lock().await;
                if shared.is_online(&id) {
                    return;
                }
                match store.runner_offline(&id) {
                    Ok(true) => log!("server: runner {id} disconnected; its record is removed"),
                    Ok(false) => log!("server: runner {id} disconnected"),
                    Err(e) => log!("server: failed to mark runner {id} offline: {e}"),
                }
            });
        }
    }
}

/// The URL service settings of `server run`.
#[derive(Debug, Clone)]
pub struct UrlOptions {
    pub enabled: bool,
    pub api_addr: String,
    pub api_insecure: bool,
}

/// gRPC's minimum connect timeout: how long one attempt to reach the URL service may take.
pub const URL_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The URL service start of `server run`, which happens before the listeners open: one
/// synchronous attempt to reach `-url-api-addr` (name resolution and TCP connect, bounded by
/// gRPC's 20 s connect timeout); when it fails, Waypoint logs
/// `URL service unavailable, will retry in the background`, sleeps one backoff interval
/// (0.5 s ± 50 %) and goes on, retrying in the background. The stand-in does the same (it
/// cannot speak the URL service's protocol, so an address that answers is treated as
/// unavailable too). Returns how long the start was held up.
pub async fn init_url_service(opts: &UrlOptions) -> Duration {
    let started = std::time::Instant::now();
    if !opts.enabled {
        log!("server: URL service is not configured or explicitly disabled");
        return Duration::ZERO;
    }
    let attempt = tokio::time::timeout(
        URL_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(opts.api_addr.as_str()),
    )
    .await;
    match attempt {
        Ok(Ok(_)) => log!(
            "server: the URL service at {} accepted a connection; the stand-in does not speak \
             its protocol and treats it as unavailable",
            opts.api_addr
        ),
        Ok(Err(e)) => debug_log!("server: URL service at {} failed: {e}", opts.api_addr),
        Err(_) => debug_log!(
            "server: URL service at {} did not connect within {} s",
            opts.api_addr,
            URL_CONNECT_TIMEOUT.as_secs()
        ),
    }
    let jitter = crate::token::random_bytes::<1>().map_or(128, |b| b[0]);
    let sleep = Duration::from_millis(250 + u64::from(jitter) * 500 / 255);
    log!(
        "server: URL service unavailable, will retry in the background (sleep {} ms, tls={})",
        sleep.as_millis(),
        !opts.api_insecure
    );
    tokio::time::sleep(sleep).await;
    let api_addr = opts.api_addr.clone();
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(750);
        loop {
            tokio::time::sleep(wait).await;
            let ok = tokio::time::timeout(
                URL_CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect(api_addr.as_str()),
            )
            .await;
            debug_log!(
                "server: URL service retry at {api_addr}: {}",
                match ok {
                    Ok(Ok(_)) => "connected (not modelled)".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_string(),
                }
            );
            wait = (wait.mul_f64(1.5)).min(Duration::from_secs(60));
        }
    });
    started.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(reply: &ApiReply) -> Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    async fn post(shared: &Shared, path: &str, auth: Option<&str>, body: &[u8]) -> ApiReply {
        route(shared, &Method::POST, path, "", auth, body).await
    }

    async fn get(shared: &Shared, path: &str, auth: Option<&str>) -> ApiReply {
        route(shared, &Method::GET, path, "", auth, b"").await
    }

    #[tokio::test]
    async fn bootstrap_is_open_to_anyone_but_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(&dir.path().join("data.db")).unwrap();
        let first = post(&shared, "/v1/bootstrap", None, b"").await;
        assert_eq!(first.status, StatusCode::OK);
        let token = json_of(&first)["token"].as_str().unwrap().to_string();
        let second = post(&shared, "/v1/bootstrap", None, b"").await;
        assert_eq!(second.status, StatusCode::FORBIDDEN);
        assert_eq!(json_of(&second)["message"], ALREADY_BOOTSTRAPPED);
        assert_eq!(json_of(&second)["code"], "PermissionDenied");
        let who = get(&shared, "/v1/whoami", Some(&token)).await;
        assert_eq!(json_of(&who)["token_kind"], "login");
        let who = get(&shared, "/v1/whoami", Some(&format!("Bearer {token}"))).await;
        assert_eq!(who.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn authentication_failures_carry_waypoints_texts() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(&dir.path().join("data.db")).unwrap();
        let boot = json_of(&post(&shared, "/v1/bootstrap", None, b"").await)["token"]
            .as_str()
            .unwrap()
            .to_string();
        let cases: &[(Option<&str>, &str)] = &[
            (None, "Authorization token is not supplied"),
            (Some("Basic abc"), "Authorization token is not supplied"),
            (
                Some("0123456789abcdef"),
                "failed to base58 decode token: Invalid base58 digit ('0')",
            ),
        ];
        for (auth, message) in cases {
            let reply = get(&shared, "/v1/whoami", *auth).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{auth:?}");
            assert_eq!(json_of(&reply)["message"], *message);
        }
        // A token of another server (another key) has a bad signature.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Shared::open(&other_dir.path().join("data.db")).unwrap();
        let foreign = json_of(&post(&other, "/v1/bootstrap", None, b"").await)["token"]
            .as_str()
            .unwrap()
            .to_string();
        let reply = get(&shared, "/v1/whoami", Some(&foreign)).await;
        assert_eq!(
            json_of(&reply)["message"],
            "bad token signature: invalid authentication token"
        );
        assert_eq!(
            get(&shared, "/v1/whoami", Some(&boot)).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn runner_tokens_are_scoped_like_waypoints() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(&dir.path().join("data.db")).unwrap();
        let boot = json_of(&post(&shared, "/v1/bootstrap", None, b"").await)["token"]
            .as_str()
            .unwrap()
            .to_string();
        let minted = post(
            &shared,
            "/v1/tokens",
            Some(&boot),
            br#"{"kind":"runner","id":"host-runner-1","duration_ns":0}"#,
        )
        .await;
        assert_eq!(minted.status, StatusCode::OK);
        let runner = json_of(&minted)["token"].as_str().unwrap().to_string();

        // Not registered yet: every call but the registration is refused, after the tarpit.
        let t0 = std::time::Instant::now();
        let reply = post(&shared, "/v1/tokens", Some(&runner), br#"{"kind":"login"}"#).await;
        assert!(t0.elapsed() >= service::TARPIT, "{:?}", t0.elapsed());
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert_eq!(json_of(&reply)["message"], "runner is not adopted");

        // Registered (pre-adopted by its token): a login token still cannot be had ...
        {
            let mut store = shared.store.lock().await;
            let who = match service::authenticate(&store, Some(&runner), Endpoint::RunnerConfig) {
                Auth::Ok(p) => p,
                other => panic!("{other:?}"),
            };
            assert!(
                service::register_runner(&mut store, &who, "other-runner", &Default::default())
                    .unwrap_err()
                    .message
                    .contains("different runner")
            );
            service::register_runner(&mut store, &who, "host-runner-1", &Default::default())
                .unwrap();
        }
        let reply = post(&shared, "/v1/tokens", Some(&runner), br#"{"kind":"login"}"#).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            json_of(&reply)["message"],
            "no user found from current context"
        );
        // ... nor a token for another runner; its own id is fine.
        let reply = post(
            &shared,
            "/v1/tokens",
            Some(&runner),
            br#"{"kind":"runner","id":"host-runner-2"}"#,
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            json_of(&reply)["message"],
            "cannot generate a token for runner host-runner-2 using a runner token for runner host-runner-1"
        );
        let reply = post(
            &shared,
            "/v1/tokens",
            Some(&runner),
            br#"{"kind":"runner","id":"host-runner-1"}"#,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        // Waypoint 0.11 has no RBAC: the adopted runner's token may set the server config.
        let reply = post(
            &shared,
            "/v1/config",
            Some(&runner),
            br#"{"advertise_addr":"192.0.2.1:9701"}"#,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);

        // Listing and forgetting.
        let list = get(&shared, "/v1/runners", Some(&boot)).await;
        assert_eq!(json_of(&list)["runners"][0]["id"], "host-runner-1");
        assert_eq!(json_of(&list)["runners"][0]["adoption_state"], "preadopted");
        let reply = post(
            &shared,
            "/v1/runners/forget",
            Some(&boot),
            br#"{"id":"host-runner-1"}"#,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        let list = get(&shared, "/v1/runners", Some(&boot)).await;
        assert_eq!(json_of(&list)["runners"].as_array().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn expired_runner_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(&dir.path().join("data.db")).unwrap();
        let boot = json_of(&post(&shared, "/v1/bootstrap", None, b"").await)["token"]
            .as_str()
            .unwrap()
            .to_string();
        let minted = post(
            &shared,
            "/v1/tokens",
            Some(&boot),
            br#"{"kind":"runner","duration_ns":1000000}"#,
        )
        .await;
        let runner = json_of(&minted)["token"].as_str().unwrap().to_string();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reply = get(&shared, "/v1/runners", Some(&runner)).await;
        let message = json_of(&reply)["message"].as_str().unwrap().to_string();
        assert!(
            message.starts_with("Token has expired. The token was valid until: "),
            "{message}"
        );
        assert!(
            message.ends_with(": invalid authentication token"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn projects_need_a_token_and_follow_waypoints_rules() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(&dir.path().join("data.db")).unwrap();
        let boot = json_of(&post(&shared, "/v1/bootstrap", None, b"").await)["token"]
            .as_str()
            .unwrap()
            .to_string();
        // Authenticated like every token route.
        let reply = get(&shared, "/v1/projects", None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            json_of(&reply)["message"],
            "Authorization token is not supplied"
        );
        let reply = post(
            &shared,
            "/v1/projects",
            None,
            br#"{"project":{"name":"web"}}"#,
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

        let reply = post(
            &shared,
            "/v1/projects",
            Some(&boot),
            br#"{"project":{"name":"Web","remote_enabled":true,"data_source":{"git":{"url":"https://example.com/r.git"}}}}"#,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", json_of(&reply));
        let list = get(&shared, "/v1/projects", Some(&boot)).await;
        assert_eq!(
            json_of(&list),
            json!({ "projects": [{ "project": "web" }], "total_count": 1 })
        );
        let got = post(
            &shared,
            "/v1/projects/get",
            Some(&boot),
            br#"{"project":"WEB"}"#,
        )
        .await;
        assert_eq!(json_of(&got)["project"]["name"], "Web");
        assert_eq!(
            json_of(&got)["project"]["data_source"]["git"]["url"],
            "https://example.com/r.git"
        );

        // Unknown: NotFound, externalized with Waypoint's detail.
        let missing = post(
            &shared,
            "/v1/projects/get",
            Some(&boot),
            br#"{"project":"nope"}"#,
        )
        .await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        let err: RpcError = serde_json::from_slice(&missing.body).unwrap();
        assert_eq!(err.code, Code::NotFound);
        assert_eq!(
            err.human_text(),
            "failed to get project\n\"project_name\": \"\""
        );

        // Validation and storage failures.
        let bad = post(
            &shared,
            "/v1/projects",
            Some(&boot),
            br#"{"project":{"name":"a.b"}}"#,
        )
        .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            json_of(&bad)["message"],
            "project: (name: name \"a.b\" must be alpha numeric.)."
        );
        let big = json!({ "project": {
            "name": "big",
            "waypoint_hcl": crate::project::b64::encode(&[b' '; 6000]),
        }});
        let reply = post(
            &shared,
            "/v1/projects",
            Some(&boot),
            big.to_string().as_bytes(),
        )
        .await;
        let err: RpcError = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(err.code, Code::FailedPrecondition);
        assert_eq!(
            err.human_text(),
            "failed to upsert project\n\"project_name\": \"big\""
        );
        assert_eq!(
            json_of(&get(&shared, "/v1/projects", Some(&boot)).await)["total_count"],
            1,
            "nothing stored on failure"
        );
    }

    #[tokio::test]
    async fn runner_tokens_may_apply_projects_as_on_waypoint() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::open(&dir.path().join("data.db")).unwrap();
        let boot = json_of(&post(&shared, "/v1/bootstrap", None, b"").await)["token"]
            .as_str()
            .unwrap()
            .to_string();
        let mint = |body: &'static [u8]| {
            let shared = &shared;
            let boot = boot.clone();
            async move {
                json_of(&post(shared, "/v1/tokens", Some(&boot), body).await)["token"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        // A token for any runner passes authentication everywhere, and UpsertProject looks at
        // no user: Waypoint 0.11.4 lets it apply projects.
        let any_runner = mint(br#"{"kind":"runner"}"#).await;
        let reply = post(
            &shared,
            "/v1/projects",
            Some(&any_runner),
            br#"{"project":{"name":"from-runner"}}"#,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", json_of(&reply));
        // An id-bound one once its runner is registered (pre-adopted).
        let bound = mint(br#"{"kind":"runner","id":"r1"}"#).await;
        {
            let mut store = shared.store.lock().await;
            let who = match service::authenticate(&store, Some(&bound), Endpoint::RunnerConfig) {
                Auth::Ok(p) => p,
                other => panic!("{other:?}"),
            };
            service::register_runner(&mut store, &who, "r1", &Default::default()).unwrap();
        }
        let reply = post(
            &shared,
            "/v1/projects",
            Some(&bound),
            br#"{"project":{"name":"from-bound-runner"}}"#,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", json_of(&reply));
        let list = get(&shared, "/v1/projects", Some(&bound)).await;
        assert_eq!(json_of(&list)["total_count"], 2);
        // A trigger token is refused, as everywhere.
        let trigger = mint(br#"{"kind":"login","trigger":true}"#).await;
        let reply = get(&shared, "/v1/projects", Some(&trigger)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn the_ui_can_be_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let mut shared = Shared::open(&dir.path().join("data.db")).unwrap();
        assert_eq!(get(&shared, "/", None).await.status, StatusCode::OK);
        shared.ui = false;
        assert_eq!(get(&shared, "/", None).await.status, StatusCode::NOT_FOUND);
        assert_eq!(
            get(&shared, "/v1/nothing", None).await.status,
            StatusCode::NOT_FOUND
        );
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
}
