//! The HTTPS endpoint of `pilot-agent run`: health, status, credentials and metrics for the
//! Pilot CLI, operators and Prometheus, served by hyper (HTTP/1.1) over tokio-rustls with the
//! server certificate of the agent's CA (`STATE_DIR/pki/server`).
//!
//! ```text
//! GET /healthz          no authentication: {"status", "condition"}; 200 when done and not in error, else 503
//! GET /v1/status        = `pilot-agent status --json`            (bearer token)
//! GET /v1/credentials   = `pilot-agent credentials --json`       (bearer token)
//! GET /metrics          Prometheus text, no secrets              (bearer token)
//! ```
//!
//! Every path but `/healthz` needs `Authorization: Bearer TOKEN` ([`auth`]); unknown paths are
//! answered 404 only after authentication, so they tell a scanner nothing. A slow or hostile
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
use http_body_util::Full;
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
use crate::config::endpoint::{EndpointConfig, TokenHash};
use crate::pki::{LeafPaths, PkiLayout};
use crate::status_file::{RunStatus, Status};
use crate::views::{credentials, status_report as status_cmd};

pub use metrics::Telemetry;

use auth::{Admission, RateLimiter};

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
    token: TokenHash,
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
        let token = auth::load_token_hash(&ep.token)?;
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
            token,
            limiter: RateLimiter::new(ep.rate_limit),
            window_secs: ep.rate_limit.window_secs,
            tls: RwLock::new(tls),
            per_source: Mutex::new(HashMap::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, state.clone(), stop_rx));
        tracing::info!(listen = %local_addr, "endpoint: serving HTTPS");
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
    /// Neither GET nor HEAD: 405, before anything else.
    MethodNotAllowed,
    /// `/healthz`: answered without authentication.
    Healthz,
    /// `/v1/status`.
    Status,
    /// `/v1/credentials`.
    Credentials,
    /// `/metrics`.
    Metrics,
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
}

/// The route of a request with `method` and (URI) `path`. Pure: public for the fuzz targets
/// and tests; [`Endpoint`] answers every request by it.
pub fn route(method: &Method, path: &str) -> Route {
    if method != Method::GET && method != Method::HEAD {
        return Route::MethodNotAllowed;
    }
    match path {
        "/healthz" => Route::Healthz,
        "/v1/status" => Route::Status,
        "/v1/credentials" => Route::Credentials,
        "/metrics" => Route::Metrics,
        _ => Route::NotFound,
    }
}

type Resp = Response<Full<Bytes>>;

async fn handle(state: &State, source: IpAddr, req: Request<Incoming>) -> Resp {
    let resp = respond(state, source, &req).await;
    let r = &state.telemetry.requests;
    let counter = match resp.status() {
        StatusCode::OK => &r.ok,
        StatusCode::UNAUTHORIZED => &r.unauthorized,
        StatusCode::TOO_MANY_REQUESTS => &r.rate_limited,
        StatusCode::NOT_FOUND => &r.not_found,
        _ => &r.other,
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    resp
}

async fn respond(state: &State, source: IpAddr, req: &Request<Incoming>) -> Resp {
    let route = route(req.method(), req.uri().path());
    if route == Route::MethodNotAllowed {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if route == Route::Healthz {
        return healthz(state).await;
    }
    if let Some(r) = authenticate(state, source, req) {
        return r;
    }
    match route {
        Route::Status => v1_status(state).await,
        Route::Credentials => v1_credentials(state).await,
        Route::Metrics => metrics_text(state).await,
        Route::MethodNotAllowed | Route::Healthz | Route::NotFound => {
            text(StatusCode::NOT_FOUND, "not found\n")
        }
    }
}

/// `None` when the request may proceed; else the 401 or 429 to send.
fn authenticate(state: &State, source: IpAddr, req: &Request<Incoming>) -> Option<Resp> {
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
        return Some(r);
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let failure = auth::check(presented, &state.token).err()?;
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
    Some(r)
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
    let (status, rss) = blocking(move || {
        // A missing or unreadable status only leaves out the per-step gauges.
        (Status::read(&path).ok().flatten(), metrics::rss_bytes())
    })
    .await
    .unwrap_or((None, None));
    let body = metrics::render(&state.telemetry, status.as_ref(), rss);
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
        assert!(!Route::Healthz.needs_auth());
        assert!(!Route::MethodNotAllowed.needs_auth());
        assert!(Route::NotFound.needs_auth());
        assert!(Route::Credentials.needs_auth());
    }
}
