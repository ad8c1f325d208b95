//! `cloud:` — where the host's identity (instance id, region, addresses) comes from: the AWS
//! or GCP instance metadata service, detected or chosen, or the host itself.
//!
//! Every request to the metadata service has a short timeout and is retried a bounded number
//! of times, and the whole lookup has a budget: a metadata service that is absent or slow
//! costs at most `total_budget_secs` per pass, never a hang at boot.

use std::time::Duration;

use super::schema::{Node, Walker};

/// The link-local address both AWS and GCP serve their metadata on (GCP also answers to
/// `metadata.google.internal`, which resolves to it).
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";

const KEYS: &[&str] = &[
    "provider",
    "metadata_url",
    "timeout_ms",
    "retries",
    "total_budget_secs",
];

/// Which metadata service to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderSetting {
    /// Probe AWS and GCP concurrently; the first that answers wins; neither: the host.
    Auto,
    Aws,
    Gcp,
    /// Do not ask any metadata service: host name and machine id.
    None,
}

impl ProviderSetting {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderSetting::Auto => "auto",
            ProviderSetting::Aws => "aws",
            ProviderSetting::Gcp => "gcp",
            ProviderSetting::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudConfig {
    pub provider: ProviderSetting,
    /// Base URL of the metadata service (`http://HOST[:PORT]`, no path); tests point it at
    /// the harness's metadata server.
    pub metadata_url: String,
    /// Limit of one request (connect, send, read the answer).
    pub timeout: Duration,
    /// Further attempts of a request that timed out, could not connect or got a 5xx.
    pub retries: u32,
    /// Limit of the whole lookup, every provider and request included.
    pub total_budget: Duration,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            provider: ProviderSetting::Auto,
            metadata_url: DEFAULT_METADATA_URL.into(),
            // IMDS and the GCP metadata server answer in about a millisecond on the instance;
            // 500 ms is generous for them and short for boot.
            timeout: Duration::from_millis(500),
            retries: 2,
            total_budget: Duration::from_secs(3),
        }
    }
}

/// Whether `url` is a usable metadata base URL: `http://HOST[:PORT]` with an optional
/// trailing slash. Metadata services speak plain HTTP on a link-local address; TLS, paths
/// and credentials in the URL would be mistakes.
pub fn valid_metadata_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@', ' '])
        && authority.parse::<hyper::Uri>().is_ok()
}

pub fn read(w: &mut Walker, node: &Node<'_>) -> CloudConfig {
    let mut c = CloudConfig::default();
    let Some(f) = w.mapping(node, "cloud", KEYS) else {
        return c;
    };
    if let Some(p) = f.choice(w, "provider", &["auto", "aws", "gcp", "none"]) {
        c.provider = match p.as_str() {
            "aws" => ProviderSetting::Aws,
            "gcp" => ProviderSetting::Gcp,
            "none" => ProviderSetting::None,
            _ => ProviderSetting::Auto,
        };
    }
    if let Some(url) = f.string(w, "metadata_url") {
        if valid_metadata_url(&url) {
            c.metadata_url = url.trim_end_matches('/').to_string();
        } else if let Some(n) = f.get("metadata_url") {
            w.error(
                n,
                format!(
                    "cloud.metadata_url: expected http://HOST[:PORT] (plain HTTP, no path), \
                     got \"{url}\""
                ),
            );
        }
    }
    // The ranges make the conversions lossless.
    if let Some(ms) = f.integer(w, "timeout_ms", 1, 60_000) {
        c.timeout = Duration::from_millis(ms as u64);
    }
    if let Some(n) = f.integer(w, "retries", 0, 10) {
        c.retries = n as u32;
    }
    if let Some(s) = f.integer(w, "total_budget_secs", 1, 300) {
        c.total_budget = Duration::from_secs(s as u64);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_yaml("cloud:\n").unwrap();
        assert_eq!(c.cloud, CloudConfig::default());
        let c = Config::from_yaml(
            "cloud:\n  provider: gcp\n  metadata_url: http://127.0.0.1:8080/\n  timeout_ms: 50\n  retries: 0\n  total_budget_secs: 1\n",
        )
        .unwrap();
        assert_eq!(c.cloud.provider, ProviderSetting::Gcp);
        assert_eq!(c.cloud.metadata_url, "http://127.0.0.1:8080");
        assert_eq!(c.cloud.timeout, Duration::from_millis(50));
        assert_eq!(c.cloud.retries, 0);
        assert_eq!(c.cloud.total_budget, Duration::from_secs(1));
    }

    #[test]
    fn bad_values_are_reported_with_positions() {
        let errs = Config::from_yaml(
            "cloud:\n  provider: azure\n  metadata_url: https://x/y\n  retries: 99\n",
        )
        .unwrap_err();
        let text: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(text[0].starts_with("2:13: cloud.provider"), "{text:?}");
        assert!(text[1].contains("cloud.metadata_url"), "{text:?}");
        assert!(text[2].contains("cloud.retries"), "{text:?}");
    }

    #[test]
    fn the_example_documents_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agent.yaml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.cloud, CloudConfig::default());
    }

    #[test]
    fn metadata_urls() {
        assert!(valid_metadata_url("http://169.254.169.254"));
        assert!(valid_metadata_url("http://metadata.google.internal/"));
        assert!(valid_metadata_url("http://[::1]:8080"));
        assert!(!valid_metadata_url("https://169.254.169.254"));
        assert!(!valid_metadata_url("http://169.254.169.254/latest"));
        assert!(!valid_metadata_url("http://"));
        assert!(!valid_metadata_url("http://u:p@host"));
    }
}
