//! The HTTP side: one reqwest client, the bearer token, URL building, and Google's error
//! answers turned into [`GcpError::Api`]. Neither the token nor a resumable-upload session URI
//! ever reaches a log line or an error message: the token travels only in the
//! `Authorization` header (which reqwest marks sensitive), transport errors drop their URL.

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, Url};
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::args::GcpConnection;
use super::error::{GcpError, Result};

/// An OAuth 2.0 access token. Its Debug form is redacted; the string is wiped on drop.
pub struct Token(Zeroizing<String>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(redacted)")
    }
}

impl Token {
    /// Checks that the token can be a header value, without saying what it is.
    fn new(raw: &str, from: &str) -> Result<Token> {
        let t = raw.trim();
        if t.is_empty() {
            return Err(GcpError::NoToken(format!("{from} is empty")));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(GcpError::NoToken(format!(
                "{from} holds characters an access token cannot have (whitespace or non-ASCII)"
            )));
        }
        Ok(Token(Zeroizing::new(t.to_owned())))
    }
}

/// The metadata server's answer (only the token is kept).
#[derive(serde::Deserialize)]
struct MetadataToken {
    access_token: String,
}

/// Where the token comes from, in order: `--access-token-file`, env
/// `GOOGLE_OAUTH_ACCESS_TOKEN` (Terraform's convention; `gcloud auth print-access-token`
/// prints one), the GCE metadata server's default service account (host from env
/// `GCE_METADATA_HOST`, as Google's libraries read it, else `metadata.google.internal`).
pub async fn access_token(file: Option<&Path>, http: &reqwest::Client) -> Result<Token> {
    if let Some(path) = file {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            GcpError::NoToken(format!(
                "cannot read --access-token-file {}: {e}",
                path.display()
            ))
        })?);
        return Token::new(&text, "--access-token-file");
    }
    if let Ok(env) = std::env::var("GOOGLE_OAUTH_ACCESS_TOKEN") {
        let env = Zeroizing::new(env);
        return Token::new(&env, "GOOGLE_OAUTH_ACCESS_TOKEN");
    }
    let host = std::env::var("GCE_METADATA_HOST")
        .unwrap_or_else(|_| "metadata.google.internal".to_owned());
    let url = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token");
    let answer = http
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .and_then(Response::error_for_status);
    let none = |why: String| {
        GcpError::NoToken(format!(
            "no --access-token-file, no GOOGLE_OAUTH_ACCESS_TOKEN (e.g. `export \
             GOOGLE_OAUTH_ACCESS_TOKEN=$(gcloud auth print-access-token)`), and the GCE \
             metadata server at {host} gave none: {why}"
        ))
    };
    let body: MetadataToken = answer
        .map_err(|e| none(chain(&e.without_url())))?
        .json()
        .await
        .map_err(|e| none(chain(&e.without_url())))?;
    let raw = Zeroizing::new(body.access_token);
    Token::new(&raw, "the metadata server's token")
}

/// The two APIs of one project.
#[derive(Debug)]
pub struct Api {
    pub http: reqwest::Client,
    token: Token,
    pub storage: String,
    pub compute: String,
    pub project: String,
    pub poll: Duration,
}

impl Api {
    /// The client (rustls on aws-lc-rs, the platform's roots) and the token.
    pub async fn connect(conn: &GcpConnection, project: &str, poll: Duration) -> Result<Api> {
        // The process-wide rustls provider, aws-lc-rs (what the AWS SDK uses); an error only
        // says that one is installed already.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            // No redirects: a 3xx from these APIs is not expected, and following one would
            // send the token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pilot-image/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GcpError::Transport {
                op: "HTTP client",
                message: chain(&e),
            })?;
        let token = access_token(conn.access_token_file.as_deref(), &http).await?;
        Ok(Api {
            http,
            token,
            storage: conn.storage_endpoint.trim_end_matches('/').to_owned(),
            compute: conn.compute_endpoint.trim_end_matches('/').to_owned(),
            project: project.to_owned(),
            poll,
        })
    }

    /// A request with the bearer token.
    pub fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.http
            .request(method, url)
            .bearer_auth(self.token.0.as_str())
    }

    /// Sends; an error status becomes [`GcpError::Api`] with Google's message and reason.
    pub async fn send(&self, op: &'static str, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(transport(op))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(api_error(op, resp).await)
        }
    }

    /// Sends and parses a JSON answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        op: &'static str,
        req: RequestBuilder,
    ) -> Result<T> {
        let resp = self.send(op, req).await?;
        resp.json().await.map_err(|e| GcpError::Answer {
            op,
            what: chain(&e.without_url()),
        })
    }

    /// `{compute}/projects/{project}/global/SEGMENTS...`.
    pub fn global(&self, segments: &[&str]) -> Result<Url> {
        let mut all = vec!["projects", self.project.as_str(), "global"];
        all.extend_from_slice(segments);
        url(&self.compute, &all)
    }
}

/// `base` with each segment appended, percent-encoded (a `/` inside a segment too: an object
/// name is one segment of the JSON API's path).
pub fn url(base: &str, segments: &[&str]) -> Result<Url> {
    let bad = |why: String| GcpError::Invalid {
        flag: "--storage-endpoint/--compute-endpoint",
        reason: why,
    };
    let mut u = Url::parse(base).map_err(|e| bad(format!("{base:?}: {e}")))?;
    u.path_segments_mut()
        .map_err(|()| bad(format!("{base:?} cannot have a path")))?
        .pop_if_empty()
        .extend(segments);
    Ok(u)
}

/// Wraps a transport error with the operation's name, without the URL.
pub fn transport(op: &'static str) -> impl FnOnce(reqwest::Error) -> GcpError {
    move |e| GcpError::Transport {
        op,
        message: chain(&e.without_url()),
    }
}

/// Google's error body: `{"error": {"code", "message", "errors": [{"reason", "message"}]}}`.
#[derive(serde::Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(serde::Deserialize)]
struct ErrorItem {
    #[serde(default)]
    reason: Option<String>,
}

/// The error answer as a [`GcpError::Api`]; a body that is not Google's JSON is quoted (at
/// most 500 characters).
pub async fn api_error(op: &'static str, resp: Response) -> GcpError {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => GcpError::Api {
            op,
            status,
            reason: b.error.errors.into_iter().find_map(|e| e.reason),
            message: b.error.message,
        },
        Err(_) => GcpError::Api {
            op,
            status,
            reason: None,
            message: text.chars().take(500).collect::<String>().trim().to_owned(),
        },
    }
}

/// An error and its sources, `: `-separated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_one_encoded_segment() {
        let u = url(
            "http://127.0.0.1:9/storage/v1/",
            &["b", "bkt", "o", "pilot-image/x/y.tar.gz"],
        )
        .unwrap();
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:9/storage/v1/b/bkt/o/pilot-image%2Fx%2Fy.tar.gz"
        );
    }

    #[test]
    fn tokens_are_redacted_and_checked() {
        let t = Token::new(" ya29.secret \n", "test").unwrap();
        assert_eq!(t.0.as_str(), "ya29.secret");
        assert!(!format!("{t:?}").contains("secret"));
        let err = Token::new("ya29 secret", "test").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(Token::new("  ", "test").is_err());
    }
}
