//! The runner host's client of the server VM's endpoint over HTTPS, the server authenticated
//! by the pinned fingerprint of its agent CA:
//!
//! - [`mint_runner_token`]: `POST /v1/runner-token` with the host's `runner`-scope bearer
//!   token: one new Waypoint token for one runner, with the Waypoint address. This is all a
//!   runner host asks for; it never holds the server's bootstrap token or the database
//!   password.
//! - [`probe`]: `GET /healthz`, no token: is the server VM there, and is it the pinned one.
//! - [`fetch_credentials`]: `GET /v1/credentials` (an `admin` token): for operators' tools and
//!   tests, not used by the runner host.
//!
//! ```text
//! remote/mod.rs    ServerEndpoint (HOST[:PORT]), mint_runner_token, probe, fetch_credentials, RemoteError
//! remote/pin.rs    Fingerprint, the verifier that trusts exactly the pinned CA
//! ```
//!
//! Verification, in order: the server must present the pinned CA in its certificate chain
//! (see [`pin`]); its leaf must verify against that CA alone (webpki: signature, validity,
//! serverAuth, the dialled host among the SANs: an IP address or a DNS name); and the `ca_pem`
//! of the answer must be the same CA. The token is sent only after all of the TLS part passed.
//!
//! Errors are shaped for the runner host's status: [`RemoteError::is_transient`] says "the
//! server VM is away or busy, retry" (degraded); the rest need a person (a wrong pin, token or
//! server). No error, log line or `Debug` output carries the token.

pub mod pin;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use pilot_values::Secret;

pub use pin::{ChainFailure, Fingerprint, FingerprintError, PinnedCaVerifier};

pub use pilot_values::{DEFAULT_ENDPOINT_PORT as DEFAULT_PORT, EndpointParseError, ServerEndpoint};
/// The path of the credentials (admin scope).
pub const CREDENTIALS_PATH: &str = "/v1/credentials";
/// The path that mints a runner token (runner scope).
pub const RUNNER_TOKEN_PATH: &str = "/v1/runner-token";
/// The unauthenticated health path.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Where a runner host that shuts down has the server VM forget one of its runners.
pub const RUNNER_FORGET_PATH: &str = "/v1/runner-forget";
/// The largest answer read: the credentials are a few KiB at most.
const MAX_BODY: usize = 1024 * 1024;

/// What the runner host takes from the server VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCredentials {
    /// `host:port` of the Waypoint server's gRPC API, as the server VM advertises it.
    pub waypoint_address: String,
    pub waypoint_token: Secret,
    /// Whether Waypoint's certificate cannot be verified (it is self-signed in its container).
    pub waypoint_tls_skip_verify: bool,
    /// The server VM's agent CA; its fingerprint is the pin.
    pub ca_pem: String,
    /// The whole answer without its secrets (`waypoint.token`, `database.password`).
    pub raw: Value,
}

/// What the server VM's endpoint minted for one runner ([`mint_runner_token`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedRunnerToken {
    /// The runner ID the token was minted for, as the server echoed it.
    pub runner_id: String,
    /// `host:port` of the Waypoint server's gRPC API, as the server VM advertises it.
    pub waypoint_address: String,
    pub waypoint_token: Secret,
    /// Whether Waypoint's certificate cannot be verified (it is self-signed in its container).
    pub waypoint_tls_skip_verify: bool,
    /// The server VM's agent CA; its fingerprint is the pin.
    pub ca_pem: String,
}

/// What a call to the server VM's endpoint found wrong.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot reach the server endpoint {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("the server endpoint {endpoint} did not answer within {timeout:?} ({stage})")]
    Timeout {
        endpoint: String,
        timeout: Duration,
        /// What was under way: connecting, the TLS handshake, the request, the answer.
        stage: &'static str,
    },
    #[error(
        "the server endpoint {endpoint} did not present the pinned CA: expected CA fingerprint \
         {expected}, presented {}; check the pinned fingerprint against the server VM's \
         `openssl x509 -noout -fingerprint -sha256 -in STATE_DIR/pki/ca/ca.pem`",
        list(presented)
    )]
    PinMismatch {
        endpoint: String,
        expected: Fingerprint,
        /// Every certificate the server sent, leaf first.
        presented: Vec<Fingerprint>,
    },
    #[error(
        "the server endpoint {endpoint}'s certificate does not verify against the pinned CA \
         {pin}: {reason}"
    )]
    Certificate {
        endpoint: String,
        pin: Fingerprint,
        reason: String,
    },
    #[error("TLS with the server endpoint {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error(
        "the server endpoint {endpoint}'s answer names CA {served}, not the pinned CA \
         {expected}; its TLS chain and its credentials disagree"
    )]
    ServedCaMismatch {
        endpoint: String,
        expected: Fingerprint,
        served: Fingerprint,
    },
    #[error(
        "the server endpoint {endpoint} rejected the token (401): check this host's endpoint \
         token against the server VM's token hashes (a revoked token is rejected too)"
    )]
    Unauthorized { endpoint: String },
    #[error(
        "the server endpoint {endpoint} accepted the token but its scope does not allow {path} \
         (403): a runner host needs a token of scope `runner` (endpoint.tokens on the server VM)"
    )]
    Forbidden {
        endpoint: String,
        path: &'static str,
    },
    #[error("the server endpoint {endpoint} refuses this host for now: too many failed authentications (429){}",
        retry_after.map(|d| format!(", retry after {}s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        endpoint: String,
        retry_after: Option<Duration>,
    },
    #[error("the server endpoint {endpoint} answered {status} for {path}{}",
        detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        endpoint: String,
        path: &'static str,
        status: u16,
        /// The `error` field of the answer, when it had one (the endpoint's own words).
        detail: Option<String>,
    },
    #[error("bad answer from the server endpoint {endpoint}: {reason}")]
    BadResponse { endpoint: String, reason: String },
    #[error(
        "the server VM is not ready yet: its answer lacks {} (it has not finished \
         converging)",
        missing.join(", ")
    )]
    NotReady { missing: Vec<String> },
    #[error("the endpoint token cannot be sent: it holds characters not allowed in an HTTP header")]
    InvalidToken,
    #[error(transparent)]
    Endpoint(#[from] EndpointParseError),
}

fn list(fps: &[Fingerprint]) -> String {
    match fps {
        [] => "no certificate".into(),
        [leaf] => format!("only a leaf certificate {leaf} (the server must send its CA too)"),
        [leaf, rest @ ..] => format!(
            "leaf {leaf} with {}",
            rest.iter()
                .map(Fingerprint::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl RemoteError {
    /// Whether trying again later may succeed without anyone changing anything: the server
    /// unreachable or slow, rate limiting, failing (5xx), or not converged yet.
    pub fn is_transient(&self) -> bool {
        match self {
            RemoteError::Unreachable { .. }
            | RemoteError::Timeout { .. }
            | RemoteError::RateLimited { .. }
            | RemoteError::NotReady { .. } => true,
            RemoteError::Status { status, .. } => (500..600).contains(status),
            _ => false,
        }
    }
}

/// Fetches the server VM's credentials (see the module documentation). `timeout` bounds the
/// whole exchange, connect to last byte.
pub async fn fetch_credentials(
    endpoint: &ServerEndpoint,
    token: &Secret,
    pin: &Fingerprint,
    timeout: Duration,
) -> Result<RemoteCredentials, RemoteError> {
    let call = Call::new(endpoint, timeout);
    let auth = bearer(token)?;
    let tls = call.connect(endpoint, pin).await?;
    let answer = call
        .request(tls, Method::GET, CREDENTIALS_PATH, Some(auth), None)
        .await?;
    answer.check(&call.name, CREDENTIALS_PATH)?;
    parse_credentials(&call.name, pin, answer.json(&call.name)?)
}

/// Asks the server VM's endpoint to mint one Waypoint runner token for `runner_id`
/// (`POST /v1/runner-token`, see the module documentation). `timeout` bounds the whole
/// exchange. Each call mints a new token: the caller stores it before using it.
pub async fn mint_runner_token(
    endpoint: &ServerEndpoint,
    token: &Secret,
    pin: &Fingerprint,
    runner_id: &str,
    timeout: Duration,
) -> Result<MintedRunnerToken, RemoteError> {
    let call = Call::new(endpoint, timeout);
    let auth = bearer(token)?;
    let body = call.runner_body(runner_id)?;
    let tls = call.connect(endpoint, pin).await?;
    let answer = call
        .request(tls, Method::POST, RUNNER_TOKEN_PATH, Some(auth), Some(body))
        .await?;
    answer.check(&call.name, RUNNER_TOKEN_PATH)?;
    parse_runner_token(&call.name, pin, runner_id, answer.json(&call.name)?)
}

/// Has the server VM's Waypoint forget runner `runner_id` (`POST /v1/runner-forget`): what a
/// runner host does for each of its runners as it shuts down, so that the server lists only
/// runners that exist.
pub async fn forget_runner(
    endpoint: &ServerEndpoint,
    token: &Secret,
    pin: &Fingerprint,
    runner_id: &str,
    timeout: Duration,
) -> Result<(), RemoteError> {
    let call = Call::new(endpoint, timeout);
    let auth = bearer(token)?;
    let body = call.runner_body(runner_id)?;
    let tls = call.connect(endpoint, pin).await?;
    let answer = call
        .request(
            tls,
            Method::POST,
            RUNNER_FORGET_PATH,
            Some(auth),
            Some(body),
        )
        .await?;
    answer.check(&call.name, RUNNER_FORGET_PATH)
}

/// Whether the server VM's endpoint is there and is the pinned one: `GET /healthz`, no
/// token. Any HTTP answer counts (a server VM still converging answers 503).
pub async fn probe(
    endpoint: &ServerEndpoint,
    pin: &Fingerprint,
    timeout: Duration,
) -> Result<(), RemoteError> {
    let call = Call::new(endpoint, timeout);
    let tls = call.connect(endpoint, pin).await?;
    call.request(tls, Method::GET, HEALTHZ_PATH, None, None)
        .await
        .map(|_| ())
}

fn bearer(token: &Secret) -> Result<HeaderValue, RemoteError> {
    let mut auth = HeaderValue::try_from(format!("Bearer {}", token.expose()))
        .map_err(|_| RemoteError::InvalidToken)?;
    auth.set_sensitive(true);
    Ok(auth)
}

/// One request to the server VM: its name in messages and one deadline for every stage.
struct Call {
    name: String,
    deadline: Instant,
    timeout: Duration,
}

/// What the server VM answered.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Bytes,
}

impl Call {
    fn new(endpoint: &ServerEndpoint, timeout: Duration) -> Call {
        Call {
            name: endpoint.to_string(),
            deadline: Instant::now() + timeout,
            timeout,
        }
    }

    /// The body of a runner route: `{"runner_id": ID}`.
    fn runner_body(&self, runner_id: &str) -> Result<Vec<u8>, RemoteError> {
        serde_json::to_vec(&serde_json::json!({ "runner_id": runner_id })).map_err(|e| {
            RemoteError::BadResponse {
                endpoint: self.name.clone(),
                reason: format!("cannot build the request: {e}"),
            }
        })
    }

    fn timed_out(&self, stage: &'static str) -> RemoteError {
        RemoteError::Timeout {
            endpoint: self.name.clone(),
            timeout: self.timeout,
            stage,
        }
    }

    fn http_err(&self, e: &dyn fmt::Display) -> RemoteError {
        RemoteError::Unreachable {
            endpoint: self.name.clone(),
            reason: format!("HTTP exchange failed: {e}"),
        }
    }

    /// TCP, then TLS with the pinned CA as the only trust anchor.
    async fn connect(
        &self,
        endpoint: &ServerEndpoint,
        pin: &Fingerprint,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, RemoteError> {
        let server_name = ServerName::try_from(endpoint.host.clone())
            .map_err(|_| EndpointParseError(format!("invalid host {:?}", endpoint.host)))?;
        let tcp = tokio::time::timeout_at(
            self.deadline,
            TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
        )
        .await
        .map_err(|_| self.timed_out("connecting"))?
        .map_err(|e| RemoteError::Unreachable {
            endpoint: self.name.clone(),
            reason: e.to_string(),
        })?;
        let _ = tcp.set_nodelay(true);

        let provider = crate::tls::provider();
        let verifier = Arc::new(PinnedCaVerifier::new(*pin, provider.clone()));
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| RemoteError::Tls {
                endpoint: self.name.clone(),
                reason: e.to_string(),
            })?
            .dangerous()
            // Not dangerous: the verifier runs full webpki verification against the pinned CA.
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio::time::timeout_at(
            self.deadline,
            TlsConnector::from(Arc::new(cfg)).connect(server_name, tcp),
        )
        .await
        .map_err(|_| self.timed_out("TLS handshake"))?
        .map_err(|e| handshake_error(&self.name, pin, &verifier, e))
    }

    /// One request over the connection; the answer's body is read up to [`MAX_BODY`].
    async fn request(
        &self,
        tls: tokio_rustls::client::TlsStream<TcpStream>,
        method: Method,
        path: &str,
        auth: Option<HeaderValue>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, RemoteError> {
        let (mut sender, conn) = tokio::time::timeout_at(
            self.deadline,
            hyper::client::conn::http1::handshake(TokioIo::new(tls)),
        )
        .await
        .map_err(|_| self.timed_out("sending the request"))?
        .map_err(|e| self.http_err(&e))?;
        // The connection task ends with the exchange: aborted on every return path.
        let _driver = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "remote: connection to the server endpoint ended");
            }
        }));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.name.as_str())
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("pilot-agent/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = auth {
            req = req.header(header::AUTHORIZATION, auth);
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| RemoteError::BadResponse {
                endpoint: self.name.clone(),
                reason: format!("cannot build the request: {e}"),
            })?;
        let resp = tokio::time::timeout_at(self.deadline, sender.send_request(req))
            .await
            .map_err(|_| self.timed_out("waiting for the answer"))?
            .map_err(|e| self.http_err(&e))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = tokio::time::timeout_at(
            self.deadline,
            Limited::new(resp.into_body(), MAX_BODY).collect(),
        )
        .await
        .map_err(|_| self.timed_out("reading the answer"))?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                RemoteError::BadResponse {
                    endpoint: self.name.clone(),
                    reason: format!("the answer is larger than {MAX_BODY} bytes"),
                }
            } else {
                self.http_err(&e)
            }
        })?
        .to_bytes();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}

impl Answer {
    /// 200 or the error its status means.
    fn check(&self, name: &str, path: &'static str) -> Result<(), RemoteError> {
        let endpoint = name.to_string();
        match self.status {
            StatusCode::OK => Ok(()),
            StatusCode::UNAUTHORIZED => Err(RemoteError::Unauthorized { endpoint }),
            StatusCode::FORBIDDEN => Err(RemoteError::Forbidden { endpoint, path }),
            StatusCode::TOO_MANY_REQUESTS => Err(RemoteError::RateLimited {
                endpoint,
                retry_after: self.retry_after,
            }),
            s => Err(RemoteError::Status {
                endpoint,
                path,
                status: s.as_u16(),
                detail: self.error_field(),
            }),
        }
    }

    /// The `error` of a JSON error answer, shortened and printable (it goes into a status
    /// detail; the endpoint never puts a secret in it).
    fn error_field(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        let e = v.get("error")?.as_str()?;
        Some(
            e.chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>(),
        )
    }

    fn json(&self, name: &str) -> Result<Value, RemoteError> {
        serde_json::from_slice(&self.body).map_err(|e| RemoteError::BadResponse {
            endpoint: name.to_string(),
            reason: format!("not JSON: {e}"),
        })
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The error of a failed handshake: the verifier's record when it refused the chain.
fn handshake_error(
    endpoint: &str,
    pin: &Fingerprint,
    verifier: &PinnedCaVerifier,
    e: std::io::Error,
) -> RemoteError {
    match verifier.failure() {
        Some(ChainFailure::CaNotPresented { presented }) => {
            return RemoteError::PinMismatch {
                endpoint: endpoint.into(),
                expected: *pin,
                presented,
            };
        }
        Some(ChainFailure::Invalid { reason }) => {
            return RemoteError::Certificate {
                endpoint: endpoint.into(),
                pin: *pin,
                reason,
            };
        }
        None => {}
    }
    // tokio-rustls wraps TLS errors in io::Error; anything else is the transport failing
    // (reset, closed mid-handshake: a server restarting or at its connection limit).
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(t) => RemoteError::Tls {
            endpoint: endpoint.into(),
            reason: t.to_string(),
        },
        None => RemoteError::Unreachable {
            endpoint: endpoint.into(),
            reason: format!("connection lost during the TLS handshake: {e}"),
        },
    }
}

/// Takes what the runner host needs from the answer (the documented JSON of `pilot-agent
/// credentials --json`) and checks its CA against the pin. `endpoint` names the server in
/// errors. Pure: public for the fuzz targets and tests.
pub fn parse_credentials(
    endpoint: &str,
    pin: &Fingerprint,
    mut value: Value,
) -> Result<RemoteCredentials, RemoteError> {
    let bad = |reason: String| RemoteError::BadResponse {
        endpoint: endpoint.into(),
        reason,
    };
    if !value.is_object() {
        return Err(bad("expected a JSON object".into()));
    }
    let text = |v: &Value, field: &str| -> Result<Option<String>, RemoteError> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s.is_empty() => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            _ => Err(bad(format!("{field}: expected a string"))),
        }
    };
    let waypoint = &value["waypoint"];
    if !waypoint.is_null() && !waypoint.is_object() {
        return Err(bad("waypoint: expected an object".into()));
    }
    let address = text(&waypoint["address"], "waypoint.address")?;
    let token = text(&waypoint["token"], "waypoint.token")?.map(Secret::new);
    let skip_verify = match &waypoint["tls_skip_verify"] {
        Value::Bool(b) => *b,
        // Waypoint's certificate is self-signed unless the server says otherwise.
        Value::Null => true,
        _ => {
            return Err(bad(
                "waypoint.tls_skip_verify: expected true or false".into()
            ));
        }
    };
    let ca_pem = text(&value["ca_pem"], "ca_pem")?;

    let mut missing = Vec::new();
    if waypoint.is_null() {
        missing.push("waypoint".to_string());
    } else {
        if address.is_none() {
            missing.push("waypoint.address".into());
        }
        if token.is_none() {
            missing.push("waypoint.token".into());
        }
    }
    if ca_pem.is_none() {
        missing.push("ca_pem".into());
    }
    let (Some(waypoint_address), Some(waypoint_token), Some(ca_pem)) = (address, token, ca_pem)
    else {
        return Err(RemoteError::NotReady { missing });
    };

    let served = Fingerprint::of_pem(&ca_pem).map_err(|e| bad(format!("ca_pem: {e}")))?;
    if served != *pin {
        return Err(RemoteError::ServedCaMismatch {
            endpoint: endpoint.into(),
            expected: *pin,
            served,
        });
    }

    for (section, field) in [("waypoint", "token"), ("database", "password")] {
        if let Some(obj) = value.get_mut(section).and_then(Value::as_object_mut) {
            obj.remove(field);
        }
    }
    Ok(RemoteCredentials {
        waypoint_address,
        waypoint_token,
        waypoint_tls_skip_verify: skip_verify,
        ca_pem,
        raw: value,
    })
}

/// Takes the minted token from the answer of `POST /v1/runner-token` and checks its CA
/// against the pin and its runner ID against the one asked for. Pure: public for the fuzz
/// targets and tests.
pub fn parse_runner_token(
    endpoint: &str,
    pin: &Fingerprint,
    runner_id: &str,
    value: Value,
) -> Result<MintedRunnerToken, RemoteError> {
    let bad = |reason: String| RemoteError::BadResponse {
        endpoint: endpoint.into(),
        reason,
    };
    if !value.is_object() {
        return Err(bad("expected a JSON object".into()));
    }
    let text = |v: &Value, field: &str| -> Result<String, RemoteError> {
        match v {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(bad(format!("{field}: expected a non-empty string"))),
        }
    };
    let echoed = text(&value["runner_id"], "runner_id")?;
    if echoed != runner_id {
        return Err(bad(format!(
            "runner_id: asked for {runner_id:?}, the answer is for {echoed:?}"
        )));
    }
    let waypoint = &value["waypoint"];
    let address = text(&waypoint["address"], "waypoint.address")?;
    let token = Secret::new(text(&waypoint["token"], "waypoint.token")?);
    let skip_verify = match &waypoint["tls_skip_verify"] {
        Value::Bool(b) => *b,
        Value::Null => true,
        _ => {
            return Err(bad(
                "waypoint.tls_skip_verify: expected true or false".into()
            ));
        }
    };
    let ca_pem = match &value["ca_pem"] {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::Null => {
            return Err(RemoteError::NotReady {
                missing: vec!["ca_pem".into()],
            });
        }
        _ => return Err(bad("ca_pem: expected a string".into())),
    };
    let served = Fingerprint::of_pem(&ca_pem).map_err(|e| bad(format!("ca_pem: {e}")))?;
    if served != *pin {
        return Err(RemoteError::ServedCaMismatch {
            endpoint: endpoint.into(),
            expected: *pin,
            served,
        });
    }
    Ok(MintedRunnerToken {
        runner_id: echoed,
        waypoint_address: address,
        waypoint_token: token,
        waypoint_tls_skip_verify: skip_verify,
        ca_pem,
    })
}

/// The answer's checks; the client's tests against a real endpoint are in
/// `agent/tests/remote.rs`.
#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Fingerprint;
    use super::{RemoteError, parse_credentials, parse_runner_token};

    const WAYPOINT_TOKEN: &str = "wp-bootstrap-9876543210-very-secret";

    #[test]
    fn answers_are_checked() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pin = Fingerprint::of_der(ca.der());
        let parse = |v: serde_json::Value| parse_credentials("h:1", &pin, v);
        let full = json!({
            "waypoint": {"address": "w:9701", "token": WAYPOINT_TOKEN, "tls_skip_verify": false},
            "database": {"host": "db", "port": 5432, "name": "pilot", "user": "u", "password": "pw"},
            "ca_pem": ca.pem(), "missing": [],
        });
        let c = parse(full.clone()).unwrap();
        assert!(!c.waypoint_tls_skip_verify);
        assert!(c.raw["waypoint"].get("token").is_none());
        assert!(c.raw["database"].get("password").is_none());
        assert_eq!(c.raw["database"]["user"], json!("u"));

        let e = parse(json!({"waypoint": null, "ca_pem": null})).unwrap_err();
        assert!(
            matches!(&e, RemoteError::NotReady { missing } if missing == &["waypoint", "ca_pem"]),
            "{e:?}"
        );
        assert!(e.to_string().contains("lacks waypoint, ca_pem"), "{e}");
        let mut v = full.clone();
        v["waypoint"]["token"] = json!(42);
        assert!(matches!(parse(v), Err(RemoteError::BadResponse { .. })));
        let mut v = full.clone();
        v["ca_pem"] = json!("garbage");
        assert!(matches!(parse(v), Err(RemoteError::BadResponse { .. })));
        assert!(matches!(
            parse(json!([1, 2])),
            Err(RemoteError::BadResponse { .. })
        ));
    }

    #[test]
    fn minted_tokens_are_checked() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pin = Fingerprint::of_der(ca.der());
        let good = json!({
            "runner_id": "h-runner-1",
            "waypoint": {"address": "w:9701", "token": WAYPOINT_TOKEN, "tls_skip_verify": true},
            "ca_pem": ca.pem(),
        });
        let m = parse_runner_token("h:1", &pin, "h-runner-1", good.clone()).unwrap();
        assert_eq!(m.waypoint_address, "w:9701");
        assert_eq!(m.waypoint_token.expose(), WAYPOINT_TOKEN);
        assert!(!format!("{m:?}").contains(WAYPOINT_TOKEN));
        // Another runner's answer, another CA, no token: refused, the token in no error.
        let e = parse_runner_token("h:1", &pin, "h-runner-2", good.clone()).unwrap_err();
        assert!(matches!(e, RemoteError::BadResponse { .. }), "{e}");
        assert!(!e.to_string().contains(WAYPOINT_TOKEN));
        let other = Fingerprint::of_der(b"another CA");
        assert!(matches!(
            parse_runner_token("h:1", &other, "h-runner-1", good.clone()),
            Err(RemoteError::ServedCaMismatch { .. })
        ));
        let mut v = good.clone();
        v["waypoint"]["token"] = json!("");
        assert!(matches!(
            parse_runner_token("h:1", &pin, "h-runner-1", v),
            Err(RemoteError::BadResponse { .. })
        ));
        let mut v = good;
        v["ca_pem"] = json!(null);
        assert!(matches!(
            parse_runner_token("h:1", &pin, "h-runner-1", v),
            Err(RemoteError::NotReady { .. })
        ));
    }
}
