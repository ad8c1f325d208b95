//! The metadata services' HTTP client: hyper-util's pooled HTTP/1 client with a timeout per
//! attempt, bounded retries and one deadline for the whole lookup.
//!
//! Metadata services are plain HTTP on a link-local address. No proxy is consulted (hyper
//! reads no `HTTP_PROXY`): a proxy in front of IMDS would hand out the instance's
//! credentials to whoever runs it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::config::CloudConfig;

/// Metadata answers are a few bytes; anything larger is not a metadata service.
const MAX_BODY: usize = 64 * 1024;
/// First pause between attempts (doubled each time, cut to the deadline): a service that just
/// refused a connection gets a moment instead of three refusals in a microsecond.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Every attempt failed to connect, timed out or got a 5xx.
    #[error("{url}: no answer after {attempts} attempt(s): {last}")]
    NoAnswer {
        url: String,
        attempts: u32,
        last: String,
    },
    /// The lookup's total budget ran out before (or while) this request ran.
    #[error("{url}: the metadata lookup's time budget ran out")]
    Budget { url: String },
    #[error("{url}: not a valid request: {reason}")]
    Request { url: String, reason: String },
}

/// An answer (any status but 5xx, which is retried).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as trimmed text (metadata values are ASCII; anything else is lossy-decoded
    /// and then rejected by the caller's validation).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

/// A client bound to one metadata base URL and one deadline.
#[derive(Clone)]
pub struct MetadataClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: String,
    timeout: Duration,
    retries: u32,
    deadline: Instant,
}

impl MetadataClient {
    /// A client for `config.metadata_url` whose requests all end by `deadline`.
    pub fn new(config: &CloudConfig, deadline: Instant) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            // An idle connection is reused for the next GET; none outlives the lookup.
            .pool_idle_timeout(config.total_budget)
            .build(connector);
        MetadataClient {
            client,
            base: config.metadata_url.trim_end_matches('/').to_string(),
            timeout: config.timeout,
            retries: config.retries,
            deadline,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `method path` with `headers`, retrying connection failures, timeouts and 5xx
    /// answers up to `retries` more times, never past the deadline.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Answer, HttpError> {
        let url = self.url(path);
        let uri: Uri =
            url.parse()
                .map_err(|e: hyper::http::uri::InvalidUri| HttpError::Request {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0;
        let mut last = String::new();
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return Err(if attempts == 0 {
                    HttpError::Budget { url }
                } else {
                    HttpError::NoAnswer {
                        url,
                        attempts,
                        last: format!("{last} (then the time budget ran out)"),
                    }
                });
            }
            let limit = self.timeout.min(self.deadline - now);
            attempts += 1;
            let request = build(&method, &uri, headers).map_err(|reason| HttpError::Request {
                url: url.clone(),
                reason,
            })?;
            match tokio::time::timeout(limit, self.exchange(request)).await {
                Ok(Ok(answer)) if !answer.status.is_server_error() => return Ok(answer),
                Ok(Ok(answer)) => last = format!("HTTP {}", answer.status.as_u16()),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("no answer within {} ms", limit.as_millis()),
            }
            tracing::debug!(%url, attempt = attempts, "metadata request failed: {last}");
            if attempts > self.retries {
                return Err(HttpError::NoAnswer {
                    url,
                    attempts,
                    last,
                });
            }
            let pause = backoff.min(self.deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
            backoff *= 2;
        }
    }

    async fn exchange(&self, request: Request<Empty<Bytes>>) -> Result<Answer, String> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| error_chain(&e))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

fn build(
    method: &Method,
    uri: &Uri,
    headers: &[(&'static str, &str)],
) -> Result<Request<Empty<Bytes>>, String> {
    let mut request = Request::builder().method(method.clone()).uri(uri.clone());
    for (name, value) in headers {
        // Header names are case-insensitive; hyper sends them lower-cased.
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("{name}: {e}"))?;
        let value = HeaderValue::from_str(value).map_err(|e| format!("header {name}: {e}"))?;
        request = request.header(name, value);
    }
    request.body(Empty::new()).map_err(|e| e.to_string())
}

/// hyper-util's errors say "client error (Connect)" and keep the reason in their causes.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}
