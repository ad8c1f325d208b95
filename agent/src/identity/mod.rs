//! The host's identity: which instance this is, where, and by which addresses and names it is
//! reached. Read from the cloud's instance metadata service or, off-cloud, from the host.
//!
//! ```text
//! identity/http.rs    hyper-util client: timeout per attempt, bounded retries, one deadline
//! identity/aws.rs     EC2 IMDSv2 (token flow only; an IMDSv1-only service is an error)
//! identity/gcp.rs     GCE metadata server (Metadata-Flavor: Google, both ways)
//! identity/host.rs    host name and machine id
//! identity/marker.rs  STATE_DIR/instance-id: a state directory cloned to another instance
//! ```
//!
//! [`resolve`] runs once per pass (the plan shares its [`Resolution`] as a fact). Its identity
//! feeds the server certificate's SANs (the public address too, so that the Pilot CLI verifies
//! the endpoint and Docker without skip-verify), `status.json` (`identity`) and the clone
//! marker. A metadata service that is absent or slow costs at most `cloud.total_budget_secs`;
//! then the host's own identity is used, and the step says why.

pub mod aws;
pub mod gcp;
pub mod http;
pub mod local;
pub mod marker;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::addresses::San;
use crate::config::CloudConfig;
use crate::config::cloud::ProviderSetting;

pub use http::HttpError;

/// Where an identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Aws,
    Gcp,
    /// The host itself: kernel host name, `/etc/machine-id`.
    Host,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Aws => "aws",
            Provider::Gcp => "gcp",
            Provider::Host => "host",
        }
    }

    pub fn parse(s: &str) -> Option<Provider> {
        match s {
            "aws" => Some(Provider::Aws),
            "gcp" => Some(Provider::Gcp),
            "host" => Some(Provider::Host),
            _ => None,
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who this host is. Fields a provider does not know are `None` (GCP has no public host name;
/// the host knows no region).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub provider: Provider,
    /// EC2 instance id, GCE numeric instance id, or the machine id.
    pub instance_id: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub private_ipv4: Option<Ipv4Addr>,
    pub public_ipv4: Option<Ipv4Addr>,
    /// The private DNS name (EC2 local-hostname, GCE hostname) or the kernel's host name.
    pub hostname: Option<String>,
    /// EC2 public-hostname, when the instance has one.
    pub public_hostname: Option<String>,
}

impl Identity {
    /// The names and addresses clients may use to reach this host, for the server
    /// certificate: private and public IPv4, host name and public host name.
    pub fn sans(&self) -> Vec<San> {
        let mut sans = Vec::new();
        for ip in [self.private_ipv4, self.public_ipv4].into_iter().flatten() {
            sans.push(San::Ip(IpAddr::V4(ip)));
        }
        for name in [&self.hostname, &self.public_hostname]
            .into_iter()
            .flatten()
        {
            sans.push(San::parse(name));
        }
        sans
    }
}

/// How bad a failed lookup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The metadata service did not answer (in time): it may come back; retried next pass.
    Degraded,
    /// It answered wrongly (IMDSv1 only, not GCP, bad values): a person must look.
    Error,
}

/// Why the configured provider gave no identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
}

/// Why one provider gave no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The IMDSv2 token request was refused: the service speaks only IMDSv1, which the agent
    /// never uses (its GETs need no token, which is what SSRF attacks exploit).
    #[error(
        "aws metadata refused the IMDSv2 token request (PUT {url}: HTTP {status}); the agent \
         does not fall back to IMDSv1: enable IMDSv2 on the instance (metadata option \
         HttpTokens=required)"
    )]
    ImdsV1Only { url: String, status: u16 },
    /// The IMDSv2 token was refused on a GET.
    #[error("aws metadata refused the session token on GET {url} (HTTP {status})")]
    TokenRefused { url: String, status: u16 },
    #[error(
        "{url} answered without the `Metadata-Flavor: Google` header: not a GCP metadata server"
    )]
    NotGoogle { url: String },
    #[error("{provider} metadata {url}: HTTP {status}")]
    Status {
        provider: Provider,
        url: String,
        status: u16,
    },
    #[error("{provider} metadata {url}: {reason}")]
    Invalid {
        provider: Provider,
        url: String,
        reason: String,
    },
}

impl ProviderError {
    /// No answer (in time): the service is absent, slow or down, not wrong.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ProviderError::Http(HttpError::NoAnswer { .. } | HttpError::Budget { .. })
        )
    }

    /// Whether this answer proves that the service is not this provider's (in `auto`, the
    /// other cloud's metadata server answering the probe): a 404 or other refusal of the
    /// first request, or GCP's header missing.
    fn is_not_this_provider(&self) -> bool {
        matches!(
            self,
            ProviderError::Status { .. } | ProviderError::NotGoogle { .. }
        )
    }
}

/// The outcome of [`resolve`]: the identity to use, and what went wrong on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub identity: Identity,
    pub configured: ProviderSetting,
    /// Set when the configured (or, in `auto`, a detected) provider failed and the host's
    /// identity stands in.
    pub problem: Option<Problem>,
    /// Providers `auto` tried that were not there, with why (for the step's detail).
    pub absent: Vec<String>,
    /// The identity is the one a metadata service gave in an earlier pass
    /// (`STATE_DIR/identity.json`), standing in because this pass's lookup gave none: the
    /// certificate keeps its public names through a metadata outage.
    pub remembered: bool,
    pub elapsed: Duration,
}

impl Resolution {
    /// The identity may decide about the clone marker only if it is what the configuration
    /// asked for: a stand-in (the host's after a failed lookup) must not make a VM believe it
    /// was cloned and throw its CA away.
    pub fn is_authoritative(&self) -> bool {
        self.problem.is_none() && !self.remembered
    }

    /// The `identity` object of `status.json`.
    pub fn report(&self) -> Report {
        Report {
            identity: self.identity.clone(),
            configured: self.configured.as_str().to_string(),
            problem: self.problem.as_ref().map(|p| p.message.clone()),
            remembered: self.remembered,
            elapsed_ms: u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// One line for the identity step's status.
    pub fn summary(&self) -> String {
        let i = &self.identity;
        let mut parts = vec![format!(
            "{} instance {}",
            i.provider,
            i.instance_id.as_deref().unwrap_or("(unknown)")
        )];
        if let Some(r) = &i.region {
            parts.push(format!("region {r}"));
        }
        let addrs: Vec<String> = i.sans().iter().map(|s| s.to_string()).collect();
        if !addrs.is_empty() {
            parts.push(format!("addresses {}", addrs.join(", ")));
        }
        let mut line = parts.join(", ");
        line.push_str(&format!(" ({} ms)", self.elapsed.as_millis()));
        if !self.absent.is_empty() {
            line.push_str(&format!("; no metadata: {}", self.absent.join("; ")));
        }
        match (&self.problem, self.remembered) {
            (Some(p), true) => {
                line = format!("{}; using the identity read earlier: {line}", p.message)
            }
            (Some(p), false) => line = format!("{}; using the host's identity: {line}", p.message),
            (None, true) => {
                line =
                    format!("no metadata service answered; using the identity read earlier: {line}")
            }
            (None, false) => {}
        }
        line
    }
}

/// The `identity` object of `status.json`: what was used, and why if it is a stand-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    #[serde(flatten)]
    pub identity: Identity,
    /// `cloud.provider` as configured (`auto`, `aws`, `gcp`, `none`).
    pub configured: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// True when a metadata service gave this identity in an earlier pass, not this one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remembered: bool,
    pub elapsed_ms: u64,
}

/// Finds this host's identity as `config` says, within `config.total_budget`. Never fails:
/// when the metadata service gives nothing, the host's identity stands in and
/// [`Resolution::problem`] says why (`auto` finding no service at all is not a problem: the
/// host is simply not on a cloud).
pub async fn resolve(config: &CloudConfig, hostname_override: Option<&str>) -> Resolution {
    let started = Instant::now();
    let deadline = started + config.total_budget;
    let client = http::MetadataClient::new(config, deadline);
    let mut absent = Vec::new();
    // `None`: the host's identity, with the problem that made it a stand-in, if any.
    let found: Result<Identity, Option<Problem>> = match config.provider {
        ProviderSetting::None => Err(None),
        ProviderSetting::Aws => bounded(deadline, aws::fetch(&client))
            .await
            .map_err(|e| Some(problem(e))),
        ProviderSetting::Gcp => bounded(deadline, gcp::fetch(&client))
            .await
            .map_err(|e| Some(problem(e))),
        ProviderSetting::Auto => match bounded(deadline, detect(&client)).await {
            Ok(identity) => Ok(identity),
            Err(Detection::Failed(e)) => Err(Some(problem(e))),
            Err(Detection::Absent(why)) => {
                absent = why;
                Err(None)
            }
        },
    };
    let (identity, problem) = match found {
        Ok(identity) => (identity, None),
        Err(problem) => (local::identity(hostname_override), problem),
    };
    Resolution {
        identity,
        configured: config.provider,
        problem,
        absent,
        remembered: false,
        elapsed: started.elapsed(),
    }
}

/// [`resolve`] for the agent's state directory: an identity from a metadata service is kept
/// in `STATE_DIR/identity.json`; when a later lookup gives none (failed, or nothing answered
/// in `auto`), that identity stands in, marked `remembered` (never authoritative for the
/// clone marker). Without it a metadata outage would drop the public names from the server
/// certificate, re-issue it and restart dockerd, and re-issue it again when IMDS returns.
pub async fn resolve_for_state(
    config: &CloudConfig,
    hostname_override: Option<&str>,
    state_dir: &std::path::Path,
) -> Resolution {
    let mut r = resolve(config, hostname_override).await;
    if r.identity.provider != Provider::Host {
        if r.problem.is_none() {
            if let Err(e) = marker::remember(state_dir, &r.identity) {
                tracing::warn!("cannot keep the instance identity: {e}");
            }
        }
        return r;
    }
    // `none` asks for the host's identity, whatever a metadata service said before.
    if config.provider == ProviderSetting::None {
        return r;
    }
    let fits = |i: &Identity| match config.provider {
        ProviderSetting::Aws => i.provider == Provider::Aws,
        ProviderSetting::Gcp => i.provider == Provider::Gcp,
        _ => i.provider != Provider::Host,
    };
    if let Some(earlier) = marker::remembered(state_dir).filter(fits) {
        r.identity = earlier;
        r.remembered = true;
    }
    r
}

/// The host's identity, as `cloud.provider: none` gives it (no network).
pub fn host_resolution(hostname_override: Option<&str>) -> Resolution {
    Resolution {
        identity: local::identity(hostname_override),
        configured: ProviderSetting::None,
        problem: None,
        absent: Vec::new(),
        remembered: false,
        elapsed: Duration::ZERO,
    }
}

fn problem(e: ProviderError) -> Problem {
    Problem {
        severity: if e.is_unreachable() {
            Severity::Degraded
        } else {
            Severity::Error
        },
        message: e.to_string(),
    }
}

/// A safety net over the client's own deadline (a task that overruns it still ends).
async fn bounded<T, E: From<ProviderError>>(
    deadline: Instant,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    // Slack for the last attempt's own clean-up; the client stops at the deadline itself.
    match tokio::time::timeout_at(deadline + Duration::from_millis(50), f).await {
        Ok(r) => r,
        Err(_) => Err(E::from(ProviderError::Http(HttpError::Budget {
            url: "metadata".into(),
        }))),
    }
}

/// What `auto` found when no provider gave an identity.
enum Detection {
    /// Neither service is there: `provider: unreachable or refused` per provider.
    Absent(Vec<String>),
    /// A service is there but answered wrongly (an IMDSv1-only service): an error.
    Failed(ProviderError),
}

impl From<ProviderError> for Detection {
    fn from(e: ProviderError) -> Self {
        if e.is_unreachable() {
            Detection::Absent(vec![e.to_string()])
        } else {
            Detection::Failed(e)
        }
    }
}

/// `auto`: AWS and GCP are asked concurrently; the first identity wins. When neither gives
/// one, a service that answered as a metadata service but wrongly (IMDSv1 only) is an error;
/// otherwise the host is not on a cloud.
async fn detect(client: &http::MetadataClient) -> Result<Identity, Detection> {
    let aws = aws::fetch(client);
    let gcp = gcp::fetch(client);
    tokio::pin!(aws, gcp);
    let mut aws_err: Option<ProviderError> = None;
    let mut gcp_err: Option<ProviderError> = None;
    while aws_err.is_none() || gcp_err.is_none() {
        tokio::select! {
            r = &mut aws, if aws_err.is_none() => match r {
                Ok(identity) => return Ok(identity),
                Err(e) => aws_err = Some(e),
            },
            r = &mut gcp, if gcp_err.is_none() => match r {
                Ok(identity) => return Ok(identity),
                Err(e) => gcp_err = Some(e),
            },
        }
    }
    let mut absent = Vec::new();
    let mut failed = None;
    for (provider, err) in [(Provider::Aws, aws_err), (Provider::Gcp, gcp_err)] {
        let Some(err) = err else { continue };
        if err.is_unreachable() || err.is_not_this_provider() {
            absent.push(format!("{provider}: {err}"));
        } else if failed.is_none() {
            failed = Some(err);
        }
    }
    match failed {
        Some(e) => Err(Detection::Failed(e)),
        None => Err(Detection::Absent(absent)),
    }
}

/// Checks a value the instance reported: printable ASCII without separators, as instance
/// ids, regions and zones are (it ends up in file names and the marker).
fn plain_value(provider: Provider, url: &str, value: String) -> Result<String, ProviderError> {
    let ok = !value.is_empty()
        && value.len() <= 255
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(value)
    } else {
        Err(ProviderError::Invalid {
            provider,
            url: url.to_string(),
            reason: format!("unexpected value {value:?}"),
        })
    }
}

fn ipv4_value(provider: Provider, url: &str, value: &str) -> Result<Ipv4Addr, ProviderError> {
    value.parse().map_err(|_| ProviderError::Invalid {
        provider,
        url: url.to_string(),
        reason: format!("expected an IPv4 address, got {value:?}"),
    })
}

fn dns_value(provider: Provider, url: &str, value: String) -> Result<String, ProviderError> {
    if pilot_values::is_dns_name(&value) {
        Ok(value.trim_end_matches('.').to_ascii_lowercase())
    } else {
        Err(ProviderError::Invalid {
            provider,
            url: url.to_string(),
            reason: format!("expected a DNS name, got {value:?}"),
        })
    }
}
