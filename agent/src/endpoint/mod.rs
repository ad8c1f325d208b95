//! The HTTPS endpoint of `pilot-agent run`: health, status, credentials and metrics for the
//! Pilot CLI, operators and Prometheus, served by hyper (HTTP/1.1) over tokio-rustls with the
//! server certificate of the agent's CA (`STATE_DIR/pki/server`).
//!
//! ```text
//! GET  /healthz          no authentication: {"status", "condition"}; 200 when done and not in error, else 503
//! GET  /v1/status        = `pilot-agent status --json`                        scope read, admin
//! GET  /metrics          Prometheus text, no secrets                          scope read, admin
//! GET  /v1/credentials   = `pilot-agent credentials --json` (bootstrap token,
//!                        database password)                                   scope admin
//! POST /v1/runner-token  {"runner_id": "HOST-runner-N"} -> one new Waypoint
//!                        runner token, the Waypoint address, the agent CA     scope runner, admin
//! POST /v1/runner-forget {"runner_id": "HOST-runner-N"} -> the server forgets
//!                        that runner (a runner host shutting down)            scope runner, admin
//! ```
//!
//! Every path but `/healthz` needs `Authorization: Bearer TOKEN` ([`auth`]): none or a wrong
//! one is 401 (and counted by the rate limiter), a valid token whose scope does not allow the
//! route is 403 (logged with the token's name; not counted: the holder already has a valid
//! token and learns nothing by trying, while counting would let one misconfigured client of
//! a shared address lock out the others). Unknown paths are answered 404 only after
//! authentication, so they tell a scanner nothing. A slow or hostile
//! client cannot pin the agent: connections are capped in total and per source, the TLS
//! handshake and the request head each have a deadline, and a connection lives at most
//! [`MAX_CONNECTION_LIFETIME`]. The certificate is swapped in place by
//! [`Endpoint::reload_tls`] (new connections use it; open ones keep theirs).
//!
//! The files behind the routes are read on the blocking pool: each is one small file, but
//! a stalled disk must not stall the accept loop.

pub mod auth;
pub mod metrics;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::config::endpoint::{EndpointConfig, Scope};
use crate::pki::{LeafPaths, PkiLayout};
use crate::status_file::{RunStatus, Status};
use crate::views::{credentials, status_report as status_cmd};

pub use metrics::Telemetry;

use auth::{Admission, Principal, RateLimiter, TokenSet};

/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one source (per [`auth::source_key`]) may hold at once.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 16;
/// Deadline of the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a request head, from the moment hyper starts reading it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed (gracefully, after its request in flight) this long after it
/// opened, however active: keep-alive cannot hold a slot for ever.
pub const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long [`Endpoint::shutdown`] lets requests in flight finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// hyper's read buffer (its minimum is 8 KiB): bounds the request head.
pub const MAX_BUF: usize = 16 * 1024;
/// The largest body of `POST /v1/runner-token` (`{"runner_id": "..."}` is well under it).
pub const MAX_RUNNER_TOKEN_BODY: usize = 1024;
/// Deadline for reading a request body once the head was read.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The path of the runner token route.
pub const RUNNER_TOKEN_PATH: &str = "/v1/runner-token";

/// Where a runner host that shuts down has the server forget its runners.
pub const RUNNER_FORGET_PATH: &str = "/v1/runner-forget";

/// Whether `path` is one of the runner routes, which take `POST` only.
fn is_runner_path(path: &str) -> bool {
    path == RUNNER_TOKEN_PATH || path == RUNNER_FORGET_PATH
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("the configuration has no endpoint section")]
    NotConfigured,
    #[error("cannot read the endpoint token hash file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "endpoint token hash file {path}: expected one line of 64 hex digits (the SHA-256 of \
         the token)"
    )]
    TokenFileFormat { path: PathBuf },
    #[error(
        "cannot load the endpoint's TLS identity {path}: {reason} (the pki step writes it: \
         run `pilot-agent up` first)"
    )]
    Identity { path: PathBuf, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What every connection shares.
struct State {
    config: Arc<Config>,
    telemetry: Arc<Telemetry>,
    /// Swapped whole by the refresher (the only writer), so a request sees one version.
    tokens: RwLock<Arc<TokenSet>>,
    /// One runner token minted at a time: a runner-scope holder cannot pile up `docker
    /// exec`s in the server container.
    mint: tokio::sync::Mutex<()>,
    limiter: RateLimiter,
    window_secs: u64,
    tls: RwLock<Arc<ServerConfig>>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

impl State {
    fn acceptor(&self) -> TlsAcceptor {
        // A poisoned lock still holds a complete config (the write is one assignment).
        let cfg = self
            .tls
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        TlsAcceptor::from(cfg)
    }

    fn tokens(&self) -> Arc<TokenSet> {
        self.tokens
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Re-reads the token hash files that changed (on the blocking pool; see
    /// [`TokenSet::refresh`]).
    async fn refresh_tokens(self: &Arc<Self>) -> Vec<String> {
        let current = self.tokens();
        let refreshed = tokio::task::spawn_blocking(move || {
            let mut next = (*current).clone();
            let changed = next.refresh();
            (next, changed)
        })
        .await;
        match refreshed {
            Ok((next, changed)) => {
                if !changed.is_empty() {
                    *self
                        .tokens
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(next);
                }
                for c in &changed {
                    match &c.error {
                        Some(error) => tracing::error!(
                            token = %c.name,
                            error = %error,
                            "endpoint: cannot use the token's hash file; the token is refused"
                        ),
                        None => tracing::info!(
                            token = %c.name,
                            path = %c.path.display(),
                            accepted = c.accepted,
                            "endpoint: token hash file changed"
                        ),
                    }
                }
                changed.into_iter().map(|c| c.name).collect()
            }
            Err(e) => {
                tracing::error!(error = %e, "endpoint: token refresh failed");
                Vec::new()
            }
        }
    }

    fn per_source(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Counts one connection of a source while alive.
struct SourceSlot {
    state: Arc<State>,
    key: IpAddr,
}

impl SourceSlot {
    fn take(state: &Arc<State>, source: IpAddr) -> Option<SourceSlot> {
        let key = auth::source_key(source);
        let mut map = state.per_source();
        let n = map.entry(key).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            state: state.clone(),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.state.per_source();
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// The running endpoint. Dropping it without [`Endpoint::shutdown`] stops it too (without
/// waiting).
pub struct Endpoint {
    local_addr: SocketAddr,
    state: Arc<State>,
    cert_paths: LeafPaths,
    stop: watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Endpoint {
    /// Binds `endpoint.listen`, TLS with STATE_DIR/pki/server/{cert,key}.pem. Errors if the
    /// configuration has no endpoint section, the token hash cannot be read, the certificate
    /// is missing, or the address cannot be bound.
    pub async fn start(
        config: Arc<Config>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Endpoint, EndpointError> {
        let ep: EndpointConfig = config
            .endpoint
            .clone()
            .ok_or(EndpointError::NotConfigured)?;
        let tokens = TokenSet::load(&ep.tokens)?;
        let cert_paths = PkiLayout::new(config.pki_dir()).server();
        let tls = load_tls(&cert_paths)?;
        let listener =
            TcpListener::bind(ep.listen)
                .await
                .map_err(|source| EndpointError::Bind {
                    addr: ep.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| EndpointError::Bind {
                addr: ep.listen,
                source,
            })?;
        let state = Arc::new(State {
            config,
            telemetry,
            tokens: RwLock::new(Arc::new(tokens)),
            mint: tokio::sync::Mutex::new(()),
            limiter: RateLimiter::new(ep.rate_limit),
            window_secs: ep.rate_limit.window_secs,
            tls: RwLock::new(tls),
            per_source: Mutex::new(HashMap::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(refresh_tokens(state.clone(), stop_rx.clone()));
        let server = tokio::spawn(serve(listener, state.clone(), stop_rx));
        tracing::info!(
            listen = %local_addr,
            tokens = state.tokens().active(),
            "endpoint: serving HTTPS"
        );
        Ok(Endpoint {
            local_addr,
            state,
            cert_paths,
            stop,
            server: Some(server),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Re-reads the certificate and key (after the pki step changed them). New connections
    /// use them; on error the current ones stay in use.
    pub fn reload_tls(&self) -> Result<(), EndpointError> {
        let cfg = load_tls(&self.cert_paths)?;
        *self
            .state
            .tls
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = cfg;
        tracing::info!("endpoint: TLS certificate reloaded");
        Ok(())
    }

    /// Re-reads the token hash files that changed now, instead of at the next periodic
    /// refresh ([`auth::TOKEN_REFRESH_INTERVAL`]); returns the names of the tokens whose
    /// hash changed (revoked, replaced or restored).
    pub async fn reload_tokens(&self) -> Vec<String> {
        self.state.refresh_tokens().await
    }

    /// Stops accepting, lets requests in flight end (at most [`SHUTDOWN_GRACE`]), returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            // The server task bounds its own drain by SHUTDOWN_GRACE; the margin covers
            // scheduling. A panic in it has already been reported by the runtime.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), server).await;
        }
        tracing::info!("endpoint: stopped");
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The server's TLS configuration from the leaf certificate and key files.
fn load_tls(paths: &LeafPaths) -> Result<Arc<ServerConfig>, EndpointError> {
    let identity = |path: &PathBuf, reason: String| EndpointError::Identity {
        path: path.clone(),
        reason,
    };
    let mut certs = CertificateDer::pem_file_iter(&paths.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| identity(&paths.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(identity(&paths.cert, "no certificate in the file".into()));
    }
    // The CA after the leaf: a runner-only host knows only the CA's fingerprint and finds the
    // CA in the chain to verify the leaf against (crate::remote). Clients that already trust
    // the CA ignore it. The pki step writes ca.pem before the leaf, so it is the leaf's CA.
    let ca = CertificateDer::pem_file_iter(&paths.ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| identity(&paths.ca, e.to_string()))?;
    certs.extend(ca);
    let key = PrivateKeyDer::from_pem_file(&paths.key)
        .map_err(|e| identity(&paths.key, e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| identity(&paths.cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| identity(&paths.cert, e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Re-reads the token hash files every [`auth::TOKEN_REFRESH_INTERVAL`] until told to stop:
/// `run` does not reload its configuration, so this is what makes a revoked file token stop
/// working without a restart.
async fn refresh_tokens(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(auth::TOKEN_REFRESH_INTERVAL) => {}
        }
        state.refresh_tokens().await;
    }
}

/// Accepts until told to stop, then drains the connections (bounded).
async fn serve(listener: TcpListener, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow with the connection count.
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                tracing::warn!(error = %e, "endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(source = %peer.ip(), "endpoint: connection limit reached; closed");
            continue;
        };
        let Some(slot) = SourceSlot::take(&state, peer.ip()) else {
            tracing::debug!(source = %peer.ip(), "endpoint: per-source connection limit reached; closed");
            continue;
        };
        let acceptor = state.acceptor();
        conns.spawn(connection(
            tcp,
            peer,
            acceptor,
            state.clone(),
            stop.clone(),
            (permit, slot),
        ));
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "endpoint: connections still open after the grace period; closed"
        );
        conns.shutdown().await;
    }
}

async fn connection<G: Send + 'static>(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
    _guards: G,
) {
    let source = peer.ip();
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
        // No request is in flight before the handshake: nothing to let finish.
        _ = stop.wait_for(|s| *s) => return,
    };
    let tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(source = %source, error = %e, "endpoint: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(source = %source, "endpoint: TLS handshake timed out");
            return;
        }
    };
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, source, req).await) }
    });
    let conn = http_builder().serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(source = %source, error = %e, "endpoint: connection ended");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => {}
        _ = tokio::time::sleep(MAX_CONNECTION_LIFETIME) => {}
    }
    // Finish the request in flight, then close; the server's drain bounds the wait.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// The HTTP/1 server settings of every connection: the request head's deadline
/// ([`HEADER_READ_TIMEOUT`]) and size ([`MAX_BUF`]). Public for the fuzz targets and tests,
/// which serve requests with exactly these settings.
pub fn http_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF);
    builder
}

/// What a request asks for, decided by its method and path alone (see [`route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A method the endpoint never serves (not GET, HEAD, or POST to
    /// [`RUNNER_TOKEN_PATH`]): 405, before anything else.
    MethodNotAllowed,
    /// `/healthz`: answered without authentication.
    Healthz,
    /// `/v1/status`.
    Status,
    /// `/v1/credentials`.
    Credentials,
    /// `/metrics`.
    Metrics,
    /// `POST /v1/runner-token`.
    RunnerToken,
    /// `POST /v1/runner-forget`.
    RunnerForget,
    /// `GET`/`HEAD` of a runner route: 405 (`Allow: POST`), after authentication.
    RunnerTokenNotPost,
    /// Any other path: 404, but only after authentication.
    NotFound,
}

impl Route {
    /// Whether the bearer token is checked before this route is answered: every route but
    /// `/healthz` and a refused method (an unknown path too, so that a 404 tells a scanner
    /// nothing).
    pub fn needs_auth(self) -> bool {
        !matches!(self, Route::MethodNotAllowed | Route::Healthz)
    }

    /// Whether a token of `scope` may use this route. `admin` may use every route; an
    /// unknown path is answered 404 to any valid token.
    pub fn allows(self, scope: Scope) -> bool {
        match self {
            Route::MethodNotAllowed | Route::Healthz | Route::NotFound => true,
            Route::Status | Route::Metrics => matches!(scope, Scope::Admin | Scope::Read),
            Route::Credentials => scope == Scope::Admin,
            Route::RunnerToken | Route::RunnerForget | Route::RunnerTokenNotPost => {
                matches!(scope, Scope::Admin | Scope::Runner)
            }
        }
    }
}

/// The route of a request with `method` and (URI) `path`. Pure: public for the fuzz targets
/// and tests; [`Endpoint`] answers every request by it.
pub fn route(method: &Method, path: &str) -> Route {
    if method == Method::POST && path == RUNNER_TOKEN_PATH {
        return Route::RunnerToken;
    }
    if method == Method::POST && path == RUNNER_FORGET_PATH {
        return Route::RunnerForget;
    }
    if method != Method::GET && method != Method::HEAD {
        return Route::MethodNotAllowed;
    }
    match path {
        "/healthz" => Route::Healthz,
        "/v1/status" => Route::Status,
        "/v1/credentials" => Route::Credentials,
        "/metrics" => Route::Metrics,
        RUNNER_TOKEN_PATH | RUNNER_FORGET_PATH => Route::RunnerTokenNotPost,
        _ => Route::NotFound,
    }
}

type Resp = Response<Full<Bytes>>;

async fn handle(state: &State, source: IpAddr, req: Request<Incoming>) -> Resp {
    let resp = respond(state, source, req).await;
    let r = &state.telemetry.requests;
    let counter = match resp.status() {
        StatusCode::OK => &r.ok,
        StatusCode::UNAUTHORIZED => &r.unauthorized,
        StatusCode::FORBIDDEN => &r.forbidden,
        StatusCode::TOO_MANY_REQUESTS => &r.rate_limited,
        StatusCode::NOT_FOUND => &r.not_found,
        _ => &r.other,
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    resp
}

async fn respond(state: &State, source: IpAddr, req: Request<Incoming>) -> Resp {
    let route = route(req.method(), req.uri().path());
    if route == Route::MethodNotAllowed {
        let allow = if is_runner_path(req.uri().path()) {
            "POST"
        } else {
            "GET, HEAD"
        };
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        return r;
    }
    if route == Route::Healthz {
        return healthz(state).await;
    }
    let who = match authenticate(state, source, &req) {
        Ok(who) => who,
        Err(r) => return *r,
    };
    if !route.allows(who.scope) {
        tracing::warn!(
            source = %source,
            token = %who.name,
            scope = %who.scope,
            path = req.uri().path(),
            "endpoint: request refused: the token's scope does not allow this route"
        );
        return text(
            StatusCode::FORBIDDEN,
            "forbidden: this token's scope does not allow this route\n",
        );
    }
    match route {
        Route::Status => v1_status(state).await,
        Route::Credentials => v1_credentials(state).await,
        Route::Metrics => metrics_text(state).await,
        Route::RunnerToken => match runner_of(source, req).await {
            Ok(runner) => mint_for(state, source, &who, &runner).await,
            Err(r) => *r,
        },
        Route::RunnerForget => match runner_of(source, req).await {
            Ok(runner) => forget_for(state, source, &who, &runner).await,
            Err(r) => *r,
        },
        Route::RunnerTokenNotPost => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            r
        }
        Route::MethodNotAllowed | Route::Healthz | Route::NotFound => {
            text(StatusCode::NOT_FOUND, "not found\n")
        }
    }
}

/// Who the request authenticated as; else the 401 or 429 to send.
/// The response is boxed: it is large, and the `Ok` path is the common one.
fn authenticate(
    state: &State,
    source: IpAddr,
    req: &Request<Incoming>,
) -> Result<Principal, Box<Resp>> {
    use std::sync::atomic::Ordering::Relaxed;
    let now = Instant::now();
    if let Admission::Limited { retry_after } = state.limiter.admit(source, now) {
        state.telemetry.rate_limited.fetch_add(1, Relaxed);
        tracing::debug!(source = %source, "endpoint: request refused: rate limited");
        // Round up: a client that waits exactly this long finds the window over.
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        let mut r = text(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed authentications from this address\n",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        return Err(Box::new(r));
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let failure = match state.tokens().authenticate(presented) {
        Ok(who) => return Ok(who),
        Err(f) => f,
    };
    state.telemetry.auth_failures.fetch_add(1, Relaxed);
    let record = state.limiter.record_failure(source, now);
    tracing::warn!(
        source = %source,
        reason = failure.reason(),
        path = req.uri().path(),
        failures = record.failures,
        "endpoint: authentication failed"
    );
    if record.engaged {
        tracing::warn!(
            source = %source,
            failures = record.failures,
            window_secs = state.window_secs,
            "endpoint: too many failed authentications; refusing this source until the window passes"
        );
    }
    let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
    let challenge = match failure {
        auth::AuthFailure::Wrong => "Bearer realm=\"pilot-agent\", error=\"invalid_token\"",
        _ => "Bearer realm=\"pilot-agent\"",
    };
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    Err(Box::new(r))
}

/// The body of `POST /v1/runner-token`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RunnerTokenRequest {
    runner_id: String,
}

/// A 4xx/5xx answer with a short JSON `{"error": ...}` body (no secret ever goes in it).
fn json_error(code: StatusCode, message: &str) -> Resp {
    json_response(code, &json!({ "error": message }))
}

/// The runner ID in the body of a runner route (`POST /v1/runner-token`, `POST
/// /v1/runner-forget`): a JSON object `{"runner_id": "HOST-runner-N"}` of at most
/// [`MAX_RUNNER_TOKEN_BODY`] bytes, or the answer that refuses it.
async fn runner_of(
    source: IpAddr,
    req: Request<Incoming>,
) -> Result<crate::waypoint::runners::RunnerId, Box<Resp>> {
    let refuse = |r: Resp| Err(Box::new(r));
    let json_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return refuse(json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json",
        ));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let too_large = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is limited to {MAX_RUNNER_TOKEN_BODY} bytes"),
        )
    };
    if declared.is_some_and(|n| n > MAX_RUNNER_TOKEN_BODY as u64) {
        return refuse(too_large());
    }
    let read = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(req.into_body(), MAX_RUNNER_TOKEN_BODY).collect(),
    )
    .await;
    let body = match read {
        Err(_) => {
            return refuse(json_error(
                StatusCode::REQUEST_TIMEOUT,
                "the body was not sent in time",
            ));
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return refuse(too_large()),
        Ok(Err(e)) => {
            tracing::debug!(source = %source, error = %e, "endpoint: cannot read a request body");
            return refuse(json_error(StatusCode::BAD_REQUEST, "cannot read the body"));
        }
        Ok(Ok(b)) => b.to_bytes(),
    };
    let request: RunnerTokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => {
            return refuse(json_error(
                StatusCode::BAD_REQUEST,
                "expected a JSON object {\"runner_id\": \"HOST-runner-N\"} and nothing else",
            ));
        }
    };
    crate::waypoint::runners::RunnerId::parse(&request.runner_id).ok_or_else(|| {
        Box::new(json_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "runner_id: expected HOST-runner-N (HOST a DNS name, N from 1 to {}), as \
                 pilot-agent names its runners",
                pilot_values::MAX_RUNNERS
            ),
        ))
    })
}

/// Runs `f` against this host's Waypoint server (Docker connected, one runner route at a
/// time: the wait is bounded by the command limit of the one ahead), or the 409 answer of a
/// host that runs none.
async fn with_local_server<T>(
    state: &State,
    f: impl AsyncFnOnce(
        &bollard::Docker,
        &crate::waypoint::WaypointPlan,
    ) -> Result<T, crate::waypoint::WaypointError>,
) -> Result<Result<T, crate::waypoint::WaypointError>, Box<Resp>> {
    use crate::waypoint::{self, ServerRef, WaypointPlan};
    let plan = match WaypointPlan::from_config(&state.config) {
        Some(plan) if plan.server == ServerRef::Local => plan,
        _ => {
            return Err(Box::new(json_error(
                StatusCode::CONFLICT,
                "this host runs no Waypoint server (no waypoint section, or role: runner)",
            )));
        }
    };
    let _one = state.mint.lock().await;
    Ok(match waypoint::connect(&plan.socket).await {
        Ok(docker) => f(&docker, &plan).await,
        Err(e) => Err(e),
    })
}

/// `POST /v1/runner-forget`: `waypoint runner forget ID` in this host's server, for a runner
/// host that shuts down (it has removed the runner). Forgetting a runner the server does not
/// know is no error. A runner-scope token may forget any runner of the agent's naming, as it
/// may mint for any: the scope is what a runner host needs, and a runner that was forgotten
/// while it still runs registers again with its token.
async fn forget_for(
    state: &State,
    source: IpAddr,
    who: &Principal,
    runner: &crate::waypoint::runners::RunnerId,
) -> Resp {
    let forgotten = with_local_server(state, async |docker, plan| {
        crate::waypoint::runners::forget(docker, plan, runner).await
    })
    .await;
    let forgotten = match forgotten {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    match forgotten {
        Ok(()) => {
            tracing::info!(
                source = %source,
                token = %who.name,
                runner_id = %runner,
                "endpoint: the Waypoint server forgot a runner"
            );
            json_response(
                StatusCode::OK,
                &json!({ "runner_id": runner.to_string(), "forgotten": true }),
            )
        }
        Err(e) => {
            tracing::error!(
                source = %source,
                token = %who.name,
                runner_id = %runner,
                error = %e,
                "endpoint: cannot forget a runner"
            );
            let mut r = json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the Waypoint server could not forget the runner now; retry later",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            r
        }
    }
}

async fn mint_for(
    state: &State,
    source: IpAddr,
    who: &Principal,
    runner: &crate::waypoint::runners::RunnerId,
) -> Resp {
    use crate::waypoint::WaypointError;
    let minted = with_local_server(state, async |docker, plan| {
        crate::waypoint::runners::mint_local(docker, plan, runner).await
    })
    .await;
    let minted = match minted {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    let token = match minted {
        Ok(t) => pilot_values::Secret::new(t),
        Err(e) => {
            // The error names a command, a file or a container, never a token.
            tracing::error!(
                source = %source,
                token = %who.name,
                runner_id = %runner,
                error = %e,
                "endpoint: cannot mint a runner token"
            );
            let not_yet = matches!(
                e,
                WaypointError::Connect { .. }
                    | WaypointError::Conflict(_)
                    | WaypointError::NotReady { .. }
                    | WaypointError::Timeout { .. }
            );
            let mut r = if not_yet {
                json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the Waypoint server is not ready to mint tokens yet; retry later",
                )
            } else {
                json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "minting the runner token failed (see the agent's log)",
                )
            };
            if not_yet {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            }
            return r;
        }
    };
    let config = state.config.clone();
    let view = blocking(move || {
        let addrs = crate::addresses::interface_addrs().unwrap_or_default();
        credentials::runner_view(&config, &addrs)
    })
    .await;
    let (address, ca_pem) = match view {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            tracing::error!(error = %e, "endpoint: cannot read the Waypoint address or the CA");
            return internal_error();
        }
        None => return internal_error(),
    };
    // An audit trail: who asked for which runner, never the token.
    tracing::info!(
        source = %source,
        token = %who.name,
        runner_id = %runner,
        "endpoint: minted a Waypoint runner token"
    );
    let ca_sha256 = ca_pem
        .as_deref()
        .and_then(|pem| crate::remote::Fingerprint::of_pem(pem).ok())
        .map(|fp| fp.to_string());
    json_response(
        StatusCode::OK,
        &json!({
            "runner_id": runner.to_string(),
            "waypoint": {
                "address": address,
                "token": token.expose(),
                // Waypoint serves a certificate of the agent's CA (`ca_pem`).
                "tls_skip_verify": false,
            },
            "ca_pem": ca_pem,
            "ca_sha256": ca_sha256,
        }),
    )
}

/// Runs a file-reading closure on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "endpoint: request task failed");
            None
        }
    }
}

async fn healthz(state: &State) -> Resp {
    let path = state.config.status_path();
    match blocking(move || status_cmd::Observation::observe(&path)).await {
        Some(Ok(obs)) => {
            let run = obs.run_status();
            let condition = obs.condition();
            // Healthy or degraded (a database still away) serve; an error or a host still
            // converging does not, so a load balancer's check routes only to a usable host.
            let code =
                if run == RunStatus::Done && condition != crate::status_file::Condition::Error {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
            json_response(code, &json!({"status": run, "condition": condition}))
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "endpoint: cannot read the status file");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "error", "condition": "error"}),
            )
        }
        None => internal_error(),
    }
}

async fn v1_status(state: &State) -> Resp {
    let path = state.config.status_path();
    match blocking(move || status_cmd::Observation::observe(&path)).await {
        Some(Ok(obs)) => json_response(StatusCode::OK, &status_cmd::render_json(&obs, None)),
        Some(Err(e)) => {
            tracing::error!(error = %e, "endpoint: cannot read the status file");
            internal_error()
        }
        None => internal_error(),
    }
}

async fn v1_credentials(state: &State) -> Resp {
    let config = state.config.clone();
    let gathered = blocking(move || {
        let addrs = crate::addresses::interface_addrs().unwrap_or_default();
        credentials::gather(&config, &addrs).map(|c| c.to_json())
    })
    .await;
    match gathered {
        Some(Ok(v)) => json_response(StatusCode::OK, &v),
        Some(Err(e)) => {
            // The error names a file and why, never its content.
            tracing::error!(error = %e, "endpoint: cannot gather the credentials");
            internal_error()
        }
        None => internal_error(),
    }
}

async fn metrics_text(state: &State) -> Resp {
    let path = state.config.status_path();
    let record_path = state.config.state().backup_record();
    let (status, rss, backup) = blocking(move || {
        // A missing or unreadable status only leaves out the per-step gauges.
        (
            Status::read(&path).ok().flatten(),
            metrics::rss_bytes(),
            crate::backup::read_record(&record_path),
        )
    })
    .await
    .unwrap_or((None, None, None));
    let mut body = metrics::render(&state.telemetry, status.as_ref(), rss);
    if let Some(record) = &backup {
        body.push_str(&metrics::render_backup(record));
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json_response(code: StatusCode, v: &Value) -> Resp {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Status and credentials must not be kept by a proxy or a client cache.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn text(code: StatusCode, body: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn internal_error() -> Resp {
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error (see the agent's log)\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_method_and_path() {
        assert_eq!(route(&Method::GET, "/healthz"), Route::Healthz);
        assert_eq!(route(&Method::HEAD, "/v1/status"), Route::Status);
        assert_eq!(route(&Method::GET, "/v1/credentials"), Route::Credentials);
        assert_eq!(route(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::GET, "/metrics/"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/HEALTHZ"), Route::NotFound);
        assert_eq!(route(&Method::POST, "/healthz"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::POST, "/v1/runner-token"), Route::RunnerToken);
        assert_eq!(
            route(&Method::POST, "/v1/runner-forget"),
            Route::RunnerForget
        );
        assert_eq!(
            route(&Method::GET, "/v1/runner-forget"),
            Route::RunnerTokenNotPost
        );
        assert!(Route::RunnerForget.needs_auth());
        assert_eq!(
            route(&Method::PUT, "/v1/runner-token"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            route(&Method::GET, "/v1/runner-token"),
            Route::RunnerTokenNotPost
        );
        assert_eq!(
            route(&Method::POST, "/v1/runner-token/"),
            Route::MethodNotAllowed
        );
        assert!(!Route::Healthz.needs_auth());
        assert!(!Route::MethodNotAllowed.needs_auth());
        assert!(Route::NotFound.needs_auth());
        assert!(Route::Credentials.needs_auth());
        assert!(Route::RunnerToken.needs_auth());
    }

    #[test]
    fn scopes_allow_exactly_their_routes() {
        use Scope::*;
        let table = [
            (Route::Status, [true, false, true]),
            (Route::Metrics, [true, false, true]),
            (Route::Credentials, [true, false, false]),
            (Route::RunnerToken, [true, true, false]),
            (Route::RunnerForget, [true, true, false]),
            (Route::RunnerTokenNotPost, [true, true, false]),
            (Route::NotFound, [true, true, true]),
        ];
        for (route, want) in table {
            for (scope, want) in [Admin, Runner, Read].into_iter().zip(want) {
                assert_eq!(route.allows(scope), want, "{route:?} {scope}");
            }
        }
    }
}
