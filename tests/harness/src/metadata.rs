//! A cloud instance metadata server for tests: EC2's IMDS (v2 token flow, or IMDSv1 only) or
//! GCE's metadata server, optionally slow, on loopback or on an address inside a namespace the
//! test made.
//!
//! It follows the documented protocols closely enough that a client which is wrong about them
//! fails here as it would on the cloud:
//! - AWS IMDSv2 (<https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html>):
//!   `PUT /latest/api/token` needs `X-aws-ec2-metadata-token-ttl-seconds` (1-21600, else
//!   400) and answers a token; `GET /latest/meta-data/...` without a valid, unexpired
//!   `X-aws-ec2-metadata-token` is 401; a request with `X-Forwarded-For` is refused (403);
//!   `public-ipv4` / `public-hostname` are 404 when the instance has none.
//! - IMDSv1 only ([`Imds::V1Only`]): the PUT is refused (403 or 405) and GETs need no token.
//! - GCE (<https://cloud.google.com/compute/docs/metadata/querying-metadata>): every request
//!   needs `Metadata-Flavor: Google` (else 403) and every answer carries it (unless
//!   [`MetadataOptions::impostor`]).
//! - User-data ([`MetadataOptions::user_data`]): AWS `GET /latest/user-data` (token rules as
//!   for `meta-data/`), GCE `GET /computeMetadata/v1/instance/attributes/user-data` (the
//!   header rule); 404 on both when the instance has none. It is what a container must never
//!   read (tests/e2e/tests/containment.rs puts a secret in it).
//! - Slow: every answer waits [`MetadataServer::set_delay`] first.
//! - Absent: [`absent_url`] names a loopback port nobody listens on.
//!
//! The server runs on its own thread with its own tokio runtime, so sync and async tests use
//! it alike; it stops when dropped. Every request is recorded ([`MetadataServer::requests`]),
//! so tests assert retries and the token flow instead of assuming them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

pub const AWS_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const AWS_TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const GCP_FLAVOR_HEADER: &str = "metadata-flavor";

/// What the instance is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    pub region: String,
    pub zone: String,
    pub private_ipv4: Ipv4Addr,
    pub public_ipv4: Option<Ipv4Addr>,
    pub hostname: String,
    /// AWS only (GCE has no public host name).
    pub public_hostname: Option<String>,
}

impl Instance {
    /// An EC2 instance with a public address and name (documentation addresses).
    pub fn aws(instance_id: &str) -> Instance {
        Instance {
            instance_id: instance_id.into(),
            region: "eu-west-1".into(),
            zone: "eu-west-1b".into(),
            private_ipv4: Ipv4Addr::new(10, 0, 1, 23),
            public_ipv4: Some(Ipv4Addr::new(203, 0, 113, 45)),
            hostname: "ip-10-0-1-23.eu-west-1.compute.internal".into(),
            public_hostname: Some("ec2-203-0-113-45.eu-west-1.compute.amazonaws.com".into()),
        }
    }

    /// A GCE instance with an external address.
    pub fn gcp(instance_id: &str) -> Instance {
        Instance {
            instance_id: instance_id.into(),
            region: "europe-west1".into(),
            zone: "europe-west1-c".into(),
            private_ipv4: Ipv4Addr::new(10, 132, 0, 7),
            public_ipv4: Some(Ipv4Addr::new(198, 51, 100, 77)),
            hostname: "pilot-1.europe-west1-c.c.pilot-test.internal".into(),
            public_hostname: None,
        }
    }
}

/// Which metadata protocol the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Aws(Imds),
    Gcp,
}

/// EC2 metadata versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imds {
    /// IMDSv2 required (`HttpTokens=required`): every GET needs a token.
    V2,
    /// IMDSv1 only: the token PUT is refused with this status (403 or 405).
    V1Only { put_status: u16 },
}

#[derive(Debug, Clone)]
pub struct MetadataOptions {
    pub flavor: Flavor,
    pub instance: Instance,
    /// Delay before every answer.
    pub delay: Duration,
    /// GCP: answer without `Metadata-Flavor: Google` (a server that is not Google's).
    pub impostor: bool,
    /// The instance's user-data (`None`: the paths answer 404, as for an instance without).
    pub user_data: Option<String>,
}

impl MetadataOptions {
    pub fn aws(instance_id: &str) -> Self {
        MetadataOptions {
            flavor: Flavor::Aws(Imds::V2),
            instance: Instance::aws(instance_id),
            delay: Duration::ZERO,
            impostor: false,
            user_data: None,
        }
    }

    pub fn gcp(instance_id: &str) -> Self {
        MetadataOptions {
            flavor: Flavor::Gcp,
            instance: Instance::gcp(instance_id),
            delay: Duration::ZERO,
            impostor: false,
            user_data: None,
        }
    }
}

/// One request the server answered (or was answering when a client gave up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// The AWS token header was present and valid.
    pub valid_token: bool,
    pub status: u16,
}

struct State {
    options: MetadataOptions,
    /// token -> expiry.
    tokens: HashMap<String, Instant>,
    issued: u64,
    requests: Vec<Recorded>,
}

/// A running metadata server; stops when dropped.
pub struct MetadataServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A URL on loopback where nothing listens (connections are refused): an absent service.
pub fn absent_url() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind an ephemeral loopback port")?;
    let addr = l.local_addr()?;
    drop(l);
    Ok(format!("http://{addr}"))
}

impl MetadataServer {
    /// Serves on an ephemeral port of 127.0.0.1.
    pub fn start(options: MetadataOptions) -> Result<MetadataServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        MetadataServer::start_on(listener, options)
    }

    /// Serves on `addr` inside the network namespace at `ns_path` (e.g. 169.254.169.254:80
    /// in a simulated VM, once the test gave the VM that address).
    pub fn start_in_netns(
        ns_path: &Path,
        addr: SocketAddr,
        options: MetadataOptions,
    ) -> Result<MetadataServer> {
        let listener = crate::sys::run_in_netns(ns_path, || TcpListener::bind(addr))?
            .with_context(|| format!("bind {addr} in {}", ns_path.display()))?;
        MetadataServer::start_on(listener, options)
    }

    /// Serves on every address of `addrs` inside the network namespace at `ns_path`, one
    /// server behind them all (tokens issued on one address are valid on the others, and
    /// [`MetadataServer::requests`] has every request): e.g. 169.254.169.254:80 and
    /// [fd00:ec2::254]:80. [`MetadataServer::addr`] is the first.
    pub fn start_in_netns_on(
        ns_path: &Path,
        addrs: &[SocketAddr],
        options: MetadataOptions,
    ) -> Result<MetadataServer> {
        let mut listeners = Vec::new();
        for addr in addrs {
            let l = crate::sys::run_in_netns(ns_path, || TcpListener::bind(addr))?
                .with_context(|| format!("bind {addr} in {}", ns_path.display()))?;
            listeners.push(l);
        }
        MetadataServer::start_on_listeners(listeners, options)
    }

    /// Serves on a listener the caller bound (the socket keeps its namespace).
    pub fn start_on(listener: TcpListener, options: MetadataOptions) -> Result<MetadataServer> {
        MetadataServer::start_on_listeners(vec![listener], options)
    }

    /// Serves on every listener (each keeps its namespace); [`MetadataServer::addr`] is the
    /// first's.
    pub fn start_on_listeners(
        listeners: Vec<TcpListener>,
        options: MetadataOptions,
    ) -> Result<MetadataServer> {
        let first = listeners.first().context("no listener to serve on")?;
        let addr = first.local_addr()?;
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        let state = Arc::new(Mutex::new(State {
            options,
            tokens: HashMap::new(),
            issued: 0,
            requests: Vec::new(),
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("metadata server runtime")?;
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("metadata-server".into())
            .spawn(move || runtime.block_on(serve(listeners, shared, stopped)))
            .context("spawn the metadata server thread")?;
        Ok(MetadataServer {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL (`cloud.metadata_url`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A poisoned lock only means a test thread panicked; the data is still usable.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.with(|s| s.requests.clone())
    }

    pub fn clear_requests(&self) {
        self.with(|s| s.requests.clear())
    }

    /// Answers wait this long from now on (0: prompt).
    pub fn set_delay(&self, delay: Duration) {
        self.with(|s| s.options.delay = delay)
    }

    /// The instance changes (a state directory "copied to another host").
    pub fn set_instance_id(&self, id: &str) {
        self.with(|s| s.options.instance.instance_id = id.to_string())
    }

    pub fn set_flavor(&self, flavor: Flavor) {
        self.with(|s| s.options.flavor = flavor)
    }

    /// The instance's user-data from now on (`None`: 404).
    pub fn set_user_data(&self, user_data: Option<&str>) {
        self.with(|s| s.options.user_data = user_data.map(str::to_string))
    }

    /// Forgets every token issued (as after their TTL).
    pub fn expire_tokens(&self) {
        self.with(|s| s.tokens.clear())
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listeners: Vec<TcpListener>,
    state: Arc<Mutex<State>>,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    // One accept loop per listener; all of them end when the server stops (the runtime, and
    // with it every task, is dropped when `block_on` returns).
    for listener in listeners {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("metadata server: {e}");
                continue;
            }
        };
        tokio::spawn(accept_loop(listener, state.clone()));
    }
    let _ = stopped.await;
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (delay, response, record) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let (response, valid_token) = respond(&mut s, &req);
        let record = Recorded {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            valid_token,
            status: response.status().as_u16(),
        };
        (s.options.delay, response, record)
    };
    // Recorded before the delay: a client that gives up still counts as an attempt.
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .requests
        .push(record);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

fn reply(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r
}

fn header<'r>(req: &'r Request<Incoming>, name: &str) -> Option<&'r str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The answer and whether the request carried a valid AWS token.
fn respond(s: &mut State, req: &Request<Incoming>) -> (Response<Full<Bytes>>, bool) {
    match s.options.flavor {
        Flavor::Aws(imds) => aws(s, imds, req),
        Flavor::Gcp => (gcp(s, req), false),
    }
}

fn aws(s: &mut State, imds: Imds, req: &Request<Incoming>) -> (Response<Full<Bytes>>, bool) {
    let path = req.uri().path();
    // IMDS refuses anything that went through a proxy (SSRF defence).
    if req.headers().contains_key("x-forwarded-for") {
        return (reply(StatusCode::FORBIDDEN, "Forbidden"), false);
    }
    if path == "/latest/api/token" {
        if req.method() != Method::PUT {
            return (reply(StatusCode::METHOD_NOT_ALLOWED, ""), false);
        }
        if let Imds::V1Only { put_status } = imds {
            let status = StatusCode::from_u16(put_status).unwrap_or(StatusCode::FORBIDDEN);
            return (reply(status, ""), false);
        }
        let ttl = header(req, AWS_TTL_HEADER).and_then(|v| v.parse::<u64>().ok());
        let Some(ttl) = ttl.filter(|t| (1..=21600).contains(t)) else {
            return (reply(StatusCode::BAD_REQUEST, "Bad Request"), false);
        };
        s.issued += 1;
        let token = format!("AQAEA{:016x}-{}", s.issued, std::process::id());
        s.tokens
            .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        let mut r = reply(StatusCode::OK, token);
        if let Ok(v) = ttl.to_string().parse() {
            r.headers_mut().insert(AWS_TTL_HEADER, v);
        }
        return (r, false);
    }
    let valid_token = header(req, AWS_TOKEN_HEADER)
        .and_then(|t| s.tokens.get(t))
        .is_some_and(|expiry| *expiry > Instant::now());
    if path == "/latest/user-data" {
        if req.method() != Method::GET {
            return (reply(StatusCode::METHOD_NOT_ALLOWED, ""), valid_token);
        }
        if imds == Imds::V2 && !valid_token {
            return (reply(StatusCode::UNAUTHORIZED, "Unauthorized"), false);
        }
        let r = match &s.options.user_data {
            Some(u) => reply(StatusCode::OK, u.clone()),
            None => reply(StatusCode::NOT_FOUND, "Not Found"),
        };
        return (r, valid_token);
    }
    let Some(key) = path.strip_prefix("/latest/meta-data/") else {
        return (reply(StatusCode::NOT_FOUND, "Not Found"), valid_token);
    };
    if req.method() != Method::GET {
        return (reply(StatusCode::METHOD_NOT_ALLOWED, ""), valid_token);
    }
    // IMDSv2 (required): a GET without a valid token is 401. IMDSv1 needs none.
    if imds == Imds::V2 && !valid_token {
        return (reply(StatusCode::UNAUTHORIZED, "Unauthorized"), false);
    }
    let i = &s.options.instance;
    let value = match key {
        "instance-id" => Some(i.instance_id.clone()),
        "placement/region" => Some(i.region.clone()),
        "placement/availability-zone" => Some(i.zone.clone()),
        "local-ipv4" => Some(i.private_ipv4.to_string()),
        "public-ipv4" => i.public_ipv4.map(|a| a.to_string()),
        "local-hostname" => Some(i.hostname.clone()),
        "public-hostname" => i.public_hostname.clone(),
        _ => None,
    };
    let r = match value {
        Some(v) => reply(StatusCode::OK, v),
        None => reply(StatusCode::NOT_FOUND, "Not Found"),
    };
    (r, valid_token)
}

fn gcp(s: &mut State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let flavored = |mut r: Response<Full<Bytes>>| {
        if !s.options.impostor {
            r.headers_mut().insert(
                GCP_FLAVOR_HEADER,
                hyper::header::HeaderValue::from_static("Google"),
            );
        }
        r
    };
    if req.headers().contains_key("x-forwarded-for") {
        return flavored(reply(StatusCode::FORBIDDEN, "Forbidden"));
    }
    let path = req.uri().path();
    let Some(key) = path.strip_prefix("/computeMetadata/v1/instance/") else {
        return flavored(reply(StatusCode::NOT_FOUND, "Not Found"));
    };
    if header(req, GCP_FLAVOR_HEADER) != Some("Google") {
        return flavored(reply(
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.",
        ));
    }
    if req.method() != Method::GET {
        return flavored(reply(StatusCode::METHOD_NOT_ALLOWED, ""));
    }
    let i = &s.options.instance;
    let value = match key {
        "id" => Some(i.instance_id.clone()),
        "zone" => Some(format!("projects/123456789012/zones/{}", i.zone)),
        "hostname" => Some(i.hostname.clone()),
        "network-interfaces/0/ip" => Some(i.private_ipv4.to_string()),
        "network-interfaces/0/access-configs/0/external-ip" => i.public_ipv4.map(|a| a.to_string()),
        "attributes/user-data" => s.options.user_data.clone(),
        _ => None,
    };
    flavored(match value {
        Some(v) => reply(StatusCode::OK, v),
        None => reply(StatusCode::NOT_FOUND, "Not Found"),
    })
}

/// Convenience for tests: the requests whose path ends with `suffix`.
pub fn count(requests: &[Recorded], suffix: &str) -> usize {
    requests.iter().filter(|r| r.path.ends_with(suffix)).count()
}
