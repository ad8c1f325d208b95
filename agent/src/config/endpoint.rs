//! `endpoint:` — the agent's HTTPS endpoint (health, status, credentials, runner tokens,
//! metrics) served by `pilot-agent run`: where it listens, the bearer tokens it accepts and
//! what each may do, who may reach it, and how failed authentications are rate limited.
//!
//! The section's presence turns the endpoint on (`endpoint:` alone gives every default: one
//! `admin` token whose hash is in [`DEFAULT_TOKEN_SHA256_FILE`]). The configuration carries
//! tokens' hashes, never tokens. Each token has a scope, so that every holder gets what it
//! needs and nothing more:
//!
//! ```yaml
//! endpoint:
//!   tokens:
//!     - { name: operators, scope: admin, sha256_file: /etc/pilot/endpoint-admin.sha256 }
//!     - { name: runner-pool, scope: runner, sha256_file: /etc/pilot/endpoint-runner.sha256 }
//!     - { name: prometheus, scope: read, sha256: 9f86d0…0a08 }
//! ```
//!
//! The single-token form of earlier versions (`token_sha256` or `token_sha256_file`) still
//! works: it is one `admin` token named `default`, and may be combined with `tokens`.
//! `name` is required (it names the token in logs, never the secret) and unique; `scope` is
//! required, so that nobody gets `admin` by leaving it out.

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
/// The name of the token that `token_sha256`/`token_sha256_file` (or neither) give.
pub const DEFAULT_TOKEN_NAME: &str = "default";
/// Longest token name: it goes into log lines.
pub const MAX_TOKEN_NAME: usize = 64;

const KEYS: &[&str] = &[
    "listen",
    "token_sha256_file",
    "token_sha256",
    "tokens",
    "sources",
    "rate_limit",
];
const TOKEN_KEYS: &[&str] = &["name", "scope", "sha256", "sha256_file"];

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

/// Where a token's hash comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file holding one line of 64 hex digits. The endpoint re-reads it when it changes,
    /// so emptying or removing the file revokes the token without a restart.
    File(PathBuf),
    /// The hash written in the configuration.
    Inline(TokenHash),
}

/// What a token may do at the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Everything: status, metrics, credentials (the Waypoint bootstrap token and the
    /// database password), runner tokens. For operators and the Pilot CLI.
    Admin,
    /// Only what a runner-only host needs: `POST /v1/runner-token`, one runner token at a
    /// time. Never the bootstrap token or the database password.
    Runner,
    /// Status and metrics, no secret: for monitoring.
    Read,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Admin, Scope::Runner, Scope::Read];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Runner => "runner",
            Scope::Read => "read",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One accepted bearer token: its name (for logs), scope and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointToken {
    pub name: String,
    pub scope: Scope,
    pub source: TokenSource,
}

impl EndpointToken {
    /// The token of the single-token form: `admin`, named [`DEFAULT_TOKEN_NAME`].
    pub fn default_admin(source: TokenSource) -> Self {
        EndpointToken {
            name: DEFAULT_TOKEN_NAME.into(),
            scope: Scope::Admin,
            source,
        }
    }
}

/// Whether `s` is a token name: 1 to [`MAX_TOKEN_NAME`] of `A-Z a-z 0-9 . _ -`, starting
/// with a letter or digit (it is logged and must not need quoting).
pub fn is_token_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.len() <= MAX_TOKEN_NAME
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
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
    /// The accepted tokens, never empty: the single-token form first (as `default`), then
    /// `tokens` in their order.
    pub tokens: Vec<EndpointToken>,
    /// Who may reach `listen` besides loopback (the firewall enforces it); empty: anyone.
    pub sources: Vec<IpNet>,
    pub rate_limit: RateLimit,
}

impl EndpointConfig {
    /// A configuration with one `admin` token from `source` and every other default.
    pub fn with_admin_token(source: TokenSource) -> Self {
        EndpointConfig {
            tokens: vec![EndpointToken::default_admin(source)],
            ..EndpointConfig::default()
        }
    }
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            listen: DEFAULT_LISTEN,
            tokens: vec![EndpointToken::default_admin(TokenSource::File(
                PathBuf::from(DEFAULT_TOKEN_SHA256_FILE),
            ))],
            sources: Vec::new(),
            rate_limit: RateLimit::default(),
        }
    }
}

/// A hash written in the configuration; the message says how long it was, never what it was.
fn inline_hash(w: &mut Walker, n: &Node<'_>, path: &str) -> Option<TokenHash> {
    let s = schema::string(w, n, path)?;
    let hash = TokenHash::from_hex(&s);
    if hash.is_none() {
        w.error(
            n,
            format!(
                "{path}: expected exactly 64 hex digits (the SHA-256 of the token, e.g. from \
                 `printf %s TOKEN | sha256sum`), got {} characters",
                s.trim().len()
            ),
        );
    }
    hash
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
    let inline = f
        .get("token_sha256")
        .and_then(|n| inline_hash(w, n, "endpoint.token_sha256"));
    let single = match (file, inline) {
        (Some(_), Some(_)) => {
            let at = f.get("token_sha256").unwrap_or(node);
            w.error(
                at,
                "endpoint: give token_sha256_file or token_sha256, not both",
            );
            None
        }
        (Some(path), None) => Some(TokenSource::File(path)),
        (None, Some(hash)) => Some(TokenSource::Inline(hash)),
        (None, None) => None,
    };
    let listed = f.get("tokens").map(|n| read_tokens(w, n, single.as_ref()));
    c.tokens = match (single, listed) {
        (single, Some(listed)) => single
            .map(EndpointToken::default_admin)
            .into_iter()
            .chain(listed)
            .collect(),
        (Some(single), None) => vec![EndpointToken::default_admin(single)],
        // Neither: the default file, as before there were scopes.
        (None, None) => c.tokens,
    };
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

/// `endpoint.tokens`: a non-empty list of `{name, scope, sha256 | sha256_file}`. Names are
/// unique (`default` is taken when the single-token form is given too); two entries with the
/// same inline hash would make the scope ambiguous, so that is an error as well.
fn read_tokens(
    w: &mut Walker,
    node: &Node<'_>,
    single: Option<&TokenSource>,
) -> Vec<EndpointToken> {
    let saphyr::YamlData::Sequence(items) = &node.data else {
        w.error(
            node,
            format!(
                "endpoint.tokens: expected a list, got {}",
                schema::describe(node)
            ),
        );
        return Vec::new();
    };
    if items.is_empty() {
        w.error(
            node,
            "endpoint.tokens: must not be empty (leave the key out to use the default admin \
             token file)",
        );
    }
    let mut names: Vec<String> = Vec::new();
    if single.is_some() {
        names.push(DEFAULT_TOKEN_NAME.into());
    }
    // Each inline hash and where it was given.
    let mut hashes: Vec<(TokenHash, String)> = Vec::new();
    if let Some(TokenSource::Inline(h)) = single {
        hashes.push((h.clone(), "endpoint.token_sha256".into()));
    }
    let single = single.is_some();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("endpoint.tokens[{i}]");
        let Some(f) = w.mapping(item, &path, TOKEN_KEYS) else {
            continue;
        };
        let name = match f.get("name") {
            None => {
                w.error(
                    item,
                    format!("{path}.name is required: what the logs call this token"),
                );
                None
            }
            Some(n) => schema::string(w, n, &format!("{path}.name")).and_then(|s| {
                if !is_token_name(&s) {
                    w.error(
                        n,
                        format!(
                            "{path}.name: expected 1 to {MAX_TOKEN_NAME} letters, digits, `.`, \
                             `_` or `-`, starting with a letter or digit, got \"{s}\""
                        ),
                    );
                    None
                } else if names.contains(&s) {
                    let by = if single && s == DEFAULT_TOKEN_NAME {
                        "the token of token_sha256/token_sha256_file"
                    } else {
                        "another token"
                    };
                    w.error(n, format!("{path}.name: \"{s}\" is taken by {by}"));
                    None
                } else {
                    names.push(s.clone());
                    Some(s)
                }
            }),
        };
        let scope = match f.get("scope") {
            None => {
                w.error(
                    item,
                    format!("{path}.scope is required: one of admin, runner, read"),
                );
                None
            }
            Some(_) => f
                .choice(w, "scope", &["admin", "runner", "read"])
                .and_then(|s| Scope::parse(&s)),
        };
        let file = f.path(w, "sha256_file");
        let inline = f
            .get("sha256")
            .and_then(|n| inline_hash(w, n, &format!("{path}.sha256")).map(|h| (h, n)));
        let source = match (file, inline) {
            (Some(_), Some((_, n))) => {
                w.error(n, format!("{path}: give sha256_file or sha256, not both"));
                None
            }
            (Some(p), None) => Some(TokenSource::File(p)),
            (None, Some((hash, n))) => {
                if let Some((_, at)) = hashes.iter().find(|(h, _)| *h == hash) {
                    w.error(n, format!("{path}.sha256: the same hash as {at}"));
                }
                hashes.push((hash.clone(), path.clone()));
                Some(TokenSource::Inline(hash))
            }
            (None, None) => {
                if f.get("sha256").is_none() && f.get("sha256_file").is_none() {
                    w.error(
                        item,
                        format!("{path}: give sha256 (the token's SHA-256) or sha256_file"),
                    );
                }
                None
            }
        };
        if let (Some(name), Some(scope), Some(source)) = (name, scope, source) {
            out.push(EndpointToken {
                name,
                scope,
                source,
            });
        }
    }
    out
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
            e.tokens,
            vec![EndpointToken {
                name: "default".into(),
                scope: Scope::Admin,
                source: TokenSource::File(PathBuf::from("/etc/pilot/endpoint-token.sha256")),
            }]
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
            e.tokens,
            vec![EndpointToken::default_admin(TokenSource::Inline(
                TokenHash::from_hex(HASH).unwrap()
            ))]
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
        assert_eq!(
            e.tokens,
            vec![EndpointToken::default_admin(TokenSource::File(
                "/run/hash".into()
            ))]
        );
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
                 token_sha256_file, token_sha256, tokens, sources, rate_limit)",
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
    fn scoped_tokens_read_with_the_single_form_as_default_admin() {
        let other = HASH.replace('9', "a");
        let yaml = format!(
            "endpoint:\n  token_sha256_file: /etc/pilot/old.sha256\n  tokens:\n    - name: \
             runner-pool\n      scope: runner\n      sha256_file: /etc/pilot/runner.sha256\n    \
             - {{ name: prom, scope: read, sha256: {HASH} }}\n    - {{ name: ops.1, scope: \
             admin, sha256: {other} }}\n"
        );
        let e = Config::from_yaml(&yaml).unwrap().endpoint.unwrap();
        let got: Vec<(&str, Scope)> = e.tokens.iter().map(|t| (&t.name[..], t.scope)).collect();
        assert_eq!(
            got,
            [
                ("default", Scope::Admin),
                ("runner-pool", Scope::Runner),
                ("prom", Scope::Read),
                ("ops.1", Scope::Admin)
            ]
        );
        assert_eq!(
            e.tokens[1].source,
            TokenSource::File("/etc/pilot/runner.sha256".into())
        );
        // Only `tokens`: no default file is added.
        let e = Config::from_yaml(&format!(
            "endpoint:\n  tokens: [{{ name: r, scope: runner, sha256: {HASH} }}]\n"
        ))
        .unwrap()
        .endpoint
        .unwrap();
        assert_eq!(e.tokens.len(), 1);
        assert_eq!(e.tokens[0].scope, Scope::Runner);
    }

    #[test]
    fn bad_token_entries_reported_with_positions_without_echoing_hashes() {
        let old = HASH.replace('9', "b");
        let yaml = format!(
            "endpoint:\n  token_sha256: {old}\n  tokens:\n    - {{ scope: runner, sha256: \
             {HASH} }}\n    - {{ name: default, scope: admin, sha256_file: /a }}\n    - {{ name: \
             x, scope: root, sha256: my-secret-token }}\n    - {{ name: \"bad name\", sha256_file: \
             rel }}\n    - {{ name: y, scope: read }}\n    - {{ name: z, scope: read, sha256: \
             {HASH}, sha256_file: /b, ttl: 1 }}\n    - {{ name: w, scope: read, sha256: {HASH} }}\n\
             \x20   - {{ name: v, scope: read, sha256: {HASH} }}\n"
        );
        let e = errors(&yaml);
        assert_eq!(
            e,
            vec![
                "4:7: endpoint.tokens[0].name is required: what the logs call this token",
                "5:15: endpoint.tokens[1].name: \"default\" is taken by the token of \
                 token_sha256/token_sha256_file",
                "6:25: endpoint.tokens[2].scope: expected one of admin, runner, read, got \"root\"",
                "6:39: endpoint.tokens[2].sha256: expected exactly 64 hex digits (the SHA-256 of \
                 the token, e.g. from `printf %s TOKEN | sha256sum`), got 15 characters",
                "7:7: endpoint.tokens[3].scope is required: one of admin, runner, read",
                "7:15: endpoint.tokens[3].name: expected 1 to 64 letters, digits, `.`, `_` or \
                 `-`, starting with a letter or digit, got \"bad name\"",
                "7:40: endpoint.tokens[3].sha256_file: expected an absolute path, got \"rel\"",
                "8:7: endpoint.tokens[4]: give sha256 (the token's SHA-256) or sha256_file",
                "9:39: endpoint.tokens[5]: give sha256_file or sha256, not both",
                "9:122: unknown key `ttl` in `endpoint.tokens[5]` (expected one of: name, scope, \
                 sha256, sha256_file)",
                "10:39: endpoint.tokens[6].sha256: the same hash as endpoint.tokens[0]",
                "11:39: endpoint.tokens[7].sha256: the same hash as endpoint.tokens[0]",
            ]
        );
        assert!(
            e.iter()
                .all(|m| !m.contains(HASH) && !m.contains(&old) && !m.contains("my-secret"))
        );
        // The hash of the single-token form counts too.
        let e = errors(&format!(
            "endpoint:\n  token_sha256: {HASH}\n  tokens: [{{ name: r, scope: runner, sha256: \
             {HASH} }}]\n"
        ));
        assert_eq!(
            e,
            vec!["3:46: endpoint.tokens[0].sha256: the same hash as endpoint.token_sha256"]
        );
        assert_eq!(
            errors("endpoint:\n  tokens: []\n"),
            vec![
                "2:11: endpoint.tokens: must not be empty (leave the key out to use the default \
                 admin token file)"
            ]
        );
        assert_eq!(
            errors("endpoint:\n  tokens: admin\n"),
            vec!["2:11: endpoint.tokens: expected a list, got the string \"admin\""]
        );
    }

    #[test]
    fn token_names() {
        for ok in ["a", "runner-pool", "ops.1", "A_b", &"x".repeat(64)] {
            assert!(is_token_name(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(!is_token_name(bad), "{bad}");
        }
    }

    #[test]
    fn debug_hides_the_hash() {
        let hash = TokenHash::from_hex(HASH).unwrap();
        let shown = format!("{:?}", TokenSource::Inline(hash));
        assert!(!shown.contains("9f86"), "{shown}");
    }
}
