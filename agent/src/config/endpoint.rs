//! `endpoint:` — the agent's HTTPS endpoint (health, status, credentials, metrics) served by
//! `pilot-agent run`: where it listens, the SHA-256 of the bearer token it accepts, who may
//! reach it, and how failed authentications are rate limited.
//!
//! The section's presence turns the endpoint on (`endpoint:` alone gives every default). The
//! configuration carries the token's hash, never the token: inline (`token_sha256`) or, the
//! default, from a file (`token_sha256_file`), not both.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;

use super::schema::{self, Node, Walker};

/// Where user-data puts the token's hash (one line, 64 hex digits).
pub const DEFAULT_TOKEN_SHA256_FILE: &str = "/etc/pilot/endpoint-token.sha256";
/// Default listen address.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8443);

const KEYS: &[&str] = &[
    "listen",
    "token_sha256_file",
    "token_sha256",
    "sources",
    "rate_limit",
];

/// The SHA-256 of the bearer token. Its `Debug` does not show the value: a hash of a weak
/// token can be brute-forced, so it stays out of logs as the token does.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Parses exactly 64 hex digits (either case), surrounding whitespace ignored.
    pub fn from_hex(s: &str) -> Option<TokenHash> {
        pilot_values::parse_sha256_hex(s).map(TokenHash)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(<redacted>)")
    }
}

/// Where the token's hash comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file holding one line of 64 hex digits, read when the endpoint starts.
    File(PathBuf),
    /// The hash written in the configuration.
    Inline(TokenHash),
}

/// Failed authentications allowed per source address within a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Failures from one source address after which it gets 429 until the window passes.
    pub failures: u32,
    pub window_secs: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            failures: 10,
            window_secs: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// `ADDRESS:PORT` the HTTPS endpoint binds.
    pub listen: SocketAddr,
    pub token: TokenSource,
    /// Who may reach `listen` besides loopback (the firewall enforces it); empty: anyone.
    pub sources: Vec<IpNet>,
    pub rate_limit: RateLimit,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            listen: DEFAULT_LISTEN,
            token: TokenSource::File(PathBuf::from(DEFAULT_TOKEN_SHA256_FILE)),
            sources: Vec::new(),
            rate_limit: RateLimit::default(),
        }
    }
}

pub fn read(w: &mut Walker, node: &Node<'_>) -> EndpointConfig {
    let mut c = EndpointConfig::default();
    let Some(f) = w.mapping(node, "endpoint", KEYS) else {
        return c;
    };
    if let Some(addr) = f.socket_addr(w, "listen") {
        c.listen = addr;
    }
    let file = f.path(w, "token_sha256_file");
    let inline = f.get("token_sha256").and_then(|n| {
        let s = schema::string(w, n, "endpoint.token_sha256")?;
        let hash = TokenHash::from_hex(&s);
        if hash.is_none() {
            // The value is (meant to be) a hash; say how long it was, not what it was.
            w.error(
                n,
                format!(
                    "endpoint.token_sha256: expected exactly 64 hex digits (the SHA-256 of \
                     the token, e.g. from `printf %s TOKEN | sha256sum`), got {} characters",
                    s.trim().len()
                ),
            );
        }
        hash
    });
    match (file, inline) {
        (Some(_), Some(_)) => {
            let at = f.get("token_sha256").unwrap_or(node);
            w.error(
                at,
                "endpoint: give token_sha256_file or token_sha256, not both",
            );
        }
        (Some(path), None) => c.token = TokenSource::File(path),
        (None, Some(hash)) => c.token = TokenSource::Inline(hash),
        (None, None) => {}
    }
    if let Some(nets) = f.list(w, "sources", schema::cidr) {
        c.sources = nets;
    }
    if let Some(n) = f.get("rate_limit") {
        if let Some(rl) = w.mapping(n, "endpoint.rate_limit", &["failures", "window_secs"]) {
            // The range checks make the conversions lossless.
            if let Some(v) = rl.integer(w, "failures", 1, 1_000_000) {
                c.rate_limit.failures = v as u32;
            }
            if let Some(v) = rl.integer(w, "window_secs", 1, 86_400) {
                c.rate_limit.window_secs = v as u64;
            }
        }
    }
    c
}

/// The endpoint's port must not be one the agent locks or gives to something else.
pub(super) fn check_port(w: &mut Walker, at: &Node<'_>, config: &super::Config) {
    let Some(e) = &config.endpoint else {
        return;
    };
    let p = e.listen.port();
    let clash = if p == config.docker.tls_listen.port() {
        Some("docker.tls_listen's port")
    } else if config.firewall.lock_ports.contains(&p) {
        Some("a port in firewall.lock_ports")
    } else if let Some(wp) = config
        .waypoint
        .as_ref()
        .filter(|wp| wp.grpc_port == p || wp.http_port == p)
    {
        Some(if wp.grpc_port == p {
            "waypoint.grpc_port"
        } else {
            "waypoint.http_port"
        })
    } else {
        None
    };
    if let Some(what) = clash {
        w.error(
            at,
            format!("endpoint.listen: port {p} is {what}; listen on another port"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::errors;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn absent_section_means_no_endpoint() {
        assert_eq!(Config::from_yaml("").unwrap().endpoint, None);
    }

    #[test]
    fn empty_section_gives_defaults() {
        let c = Config::from_yaml("endpoint:\n").unwrap();
        let e = c.endpoint.unwrap();
        assert_eq!(e, EndpointConfig::default());
        assert_eq!(e.listen, "0.0.0.0:8443".parse::<SocketAddr>().unwrap());
        assert_eq!(
            e.token,
            TokenSource::File(PathBuf::from("/etc/pilot/endpoint-token.sha256"))
        );
        assert!(e.sources.is_empty());
        assert_eq!(
            e.rate_limit,
            RateLimit {
                failures: 10,
                window_secs: 60
            }
        );
    }

    #[test]
    fn every_key_read() {
        let yaml = format!(
            "endpoint:\n  listen: \"[::]:9443\"\n  token_sha256: {}\n  sources: [10.0.0.0/8, \
             2001:db8::1]\n  rate_limit: {{ failures: 3, window_secs: 5 }}\n",
            HASH.to_uppercase()
        );
        let e = Config::from_yaml(&yaml).unwrap().endpoint.unwrap();
        assert_eq!(e.listen, "[::]:9443".parse::<SocketAddr>().unwrap());
        assert_eq!(
            e.token,
            TokenSource::Inline(TokenHash::from_hex(HASH).unwrap())
        );
        assert_eq!(e.sources.len(), 2);
        assert_eq!(e.sources[1].to_string(), "2001:db8::1/128");
        assert_eq!(
            e.rate_limit,
            RateLimit {
                failures: 3,
                window_secs: 5
            }
        );
    }

    #[test]
    fn token_file_read() {
        let e = Config::from_yaml("endpoint:\n  token_sha256_file: /run/hash\n")
            .unwrap()
            .endpoint
            .unwrap();
        assert_eq!(e.token, TokenSource::File("/run/hash".into()));
    }

    #[test]
    fn both_token_sources_rejected() {
        let e = errors(&format!(
            "endpoint:\n  token_sha256_file: /run/hash\n  token_sha256: {HASH}\n"
        ));
        assert_eq!(
            e,
            vec!["3:17: endpoint: give token_sha256_file or token_sha256, not both"]
        );
    }

    #[test]
    fn bad_hash_rejected_without_echoing_it() {
        let e = errors("endpoint:\n  token_sha256: my-secret-token\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("2:17: endpoint.token_sha256: expected exactly 64 hex"));
        assert!(e[0].contains("got 15 characters"), "{}", e[0]);
        assert!(!e[0].contains("my-secret-token"));
        // 63 and 65 digits, and a non-hex digit.
        for bad in [&HASH[1..], &format!("{HASH}0")[..], &HASH.replace('9', "g")] {
            assert_eq!(
                errors(&format!("endpoint:\n  token_sha256: \"{bad}\"\n")).len(),
                1
            );
        }
        let e = errors("endpoint:\n  token_sha256: 12\n");
        assert_eq!(
            e,
            vec!["2:17: endpoint.token_sha256: expected a string, got the integer 12"]
        );
    }

    #[test]
    fn bad_values_reported_with_positions() {
        let e = errors(
            "endpoint:\n  listen: 8443\n  token_sha256_file: relative\n  sources: [10.0.0.1/8, \
             nope]\n  rate_limit:\n    failures: 0\n    window: 5\n  port: 1\n",
        );
        assert_eq!(
            e,
            vec![
                "2:11: endpoint.listen: expected a string, got the integer 8443",
                "3:22: endpoint.token_sha256_file: expected an absolute path, got \"relative\"",
                "4:13: endpoint.sources[0]: \"10.0.0.1/8\" has bits set after the prefix \
                 length; did you mean \"10.0.0.0/8\"?",
                "4:25: endpoint.sources[1]: expected a network in CIDR notation (e.g. \
                 10.0.0.0/8) or an IP address, got \"nope\"",
                "6:15: endpoint.rate_limit.failures: must be between 1 and 1000000, got 0",
                "7:5: unknown key `window` in `endpoint.rate_limit` (expected one of: failures, window_secs)",
                "8:3: unknown key `port` in `endpoint` (expected one of: listen, \
                 token_sha256_file, token_sha256, sources, rate_limit)",
            ]
        );
    }

    #[test]
    fn listen_must_have_a_port() {
        let e = errors("endpoint:\n  listen: \"0.0.0.0:0\"\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("2:11: endpoint.listen: expected ADDRESS:PORT"));
    }

    #[test]
    fn port_clashes_rejected() {
        assert_eq!(
            errors("endpoint:\n  listen: 0.0.0.0:2376\n"),
            vec![
                "2:11: endpoint.listen: port 2376 is docker.tls_listen's port; listen on another port"
            ]
        );
        assert_eq!(errors("endpoint:\n  listen: 0.0.0.0:2375\n").len(), 1);
        assert_eq!(
            errors("waypoint:\nendpoint:\n  listen: 0.0.0.0:9702\n"),
            vec!["3:11: endpoint.listen: port 9702 is waypoint.http_port; listen on another port"]
        );
    }

    #[test]
    fn debug_hides_the_hash() {
        let hash = TokenHash::from_hex(HASH).unwrap();
        let shown = format!("{:?}", TokenSource::Inline(hash));
        assert!(!shown.contains("9f86"), "{shown}");
    }
}
