//! How CLI commands and the runner find the server, as Waypoint's `serverclient` does it.
//! Later sources win: the CLI context (`WAYPOINT_CONTEXT` or the default one), then the
//! environment, then the connection flags of the commands that have them.
//!
//! - Context: address, TLS and skip-verify from its server block; a token only if it says
//!   `require_auth`.
//! - Environment, only when `WAYPOINT_SERVER_ADDR` is set: `WAYPOINT_SERVER_TLS` (default
//!   FALSE), `WAYPOINT_SERVER_TLS_SKIP_VERIFY`, and auth is on iff `WAYPOINT_SERVER_TOKEN` is
//!   non-empty.
//! - Flags, only when `-server-addr` is non-empty: address, `-server-tls` (default TRUE) and
//!   `-server-tls-skip-verify` (the environment's skip-verify is then ignored); they never turn
//!   auth on: there is no token flag.
//! - The token: sent only when auth is on; `WAYPOINT_SERVER_TOKEN` overrides a context's.
//!
//! The stand-in server speaks only TLS, so a caller that forgets to ask for TLS fails here as it
//! would against Waypoint: the dial blocks for its 10 s and ends in
//! `error connecting to server: context deadline exceeded`.

use std::time::{Duration, Instant};

use hyper::Method;

use crate::client::{HttpClient, Target};
use crate::context::{ContextConfig, Storage};
use crate::error::{Error, Result};
use crate::flags::{Parsed, Spec, parse_bool};
use crate::tls;

pub const ENV_ADDR: &str = "WAYPOINT_SERVER_ADDR";
pub const ENV_TOKEN: &str = "WAYPOINT_SERVER_TOKEN";
pub const ENV_TLS: &str = "WAYPOINT_SERVER_TLS";
pub const ENV_TLS_SKIP_VERIFY: &str = "WAYPOINT_SERVER_TLS_SKIP_VERIFY";
pub const ENV_CONTEXT: &str = "WAYPOINT_CONTEXT";
pub const ENV_COOKIE: &str = "WAYPOINT_SERVER_COOKIE";

/// Waypoint's dial timeout (`grpc.WithBlock` with a 10 s context).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection flags (`flagSetConnection`): only on the commands that have them in
/// Waypoint (`server bootstrap` among those modelled here).
pub const CONNECTION_FLAGS: [Spec; 3] = [
    Spec::string("server-addr", "", "Address for the server."),
    Spec::boolean(
        "server-tls",
        true,
        "True if the server should be connected to via TLS.",
    ),
    Spec::boolean(
        "server-tls-skip-verify",
        false,
        "True to skip verification of the TLS certificate advertised by the server.",
    ),
];

/// A resolved server connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerConn {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub tls_skip_verify: bool,
    pub token: Option<String>,
}

// Hand-written so a token never reaches a log line through `{:?}`.
impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("tls_skip_verify", &self.tls_skip_verify)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A boolean environment variable (`true`, `1`, `false`, ... as Go's `strconv.ParseBool`);
/// unset or empty is `None`. (The entrypoint's rule; the CLI's is [`waypoint_env_bool`].)
pub fn env_bool(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<bool>> {
    match env(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => parse_bool(&v)
            .map(Some)
            .ok_or_else(|| Error::Config(format!("{name}={v:?} is not a boolean"))),
    }
}

/// Waypoint's `env.GetBool`: lower-cased `ParseBool`, empty means the default.
pub fn waypoint_env_bool(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
    default: bool,
) -> std::result::Result<bool, String> {
    match env(name).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => parse_bool(&v.to_lowercase()).ok_or_else(|| {
            format!("failed to parse a boolean from environment variable {name}={v}")
        }),
    }
}

/// Splits `HOST:PORT` (IPv6 in brackets).
pub fn split_host_port(addr: &str) -> Result<(String, u16)> {
    let bad = || Error::Config(format!("server address {addr:?} is not HOST:PORT"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Waypoint's `connectConfig`: what the sources said, before the token rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub addr: String,
    pub tls: bool,
    pub tls_skip_verify: bool,
    pub auth: bool,
    /// The context's token (the environment's is applied by [`Resolved::token`]).
    pub context_token: String,
}

impl Resolved {
    fn apply_context(&mut self, cfg: &ContextConfig) {
        if cfg.address.is_empty() {
            return;
        }
        self.addr = cfg.address.clone();
        self.tls = cfg.tls;
        self.tls_skip_verify = cfg.tls_skip_verify;
        if cfg.require_auth {
            self.auth = true;
            self.context_token = cfg.auth_token.clone();
        }
    }

    /// The token to send, Waypoint's rule: none unless auth is on; then the environment's
    /// over the context's; `-` is an explicit guest.
    pub fn token(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> std::result::Result<Option<String>, String> {
        if !self.auth {
            return Ok(None);
        }
        let mut token = self.context_token.clone();
        if let Some(v) = env(ENV_TOKEN).filter(|v| !v.is_empty()) {
            token = v;
        }
        if token.is_empty() {
            return Err(format!(
                "No token available at the {ENV_TOKEN} environment variable"
            ));
        }
        Ok((token != "-").then_some(token))
    }

    /// The context a successful bootstrap stores: this connection, with the new token.
    pub fn context_with_token(&self, token: &str) -> ContextConfig {
        ContextConfig {
            address: self.addr.clone(),
            tls: self.tls,
            tls_skip_verify: self.tls_skip_verify,
            require_auth: true,
            auth_token: token.to_string(),
            workspace: String::new(),
        }
    }
}

/// Resolves the connection from the CLI context in `storage`, the environment (`env`) and,
/// for commands with connection flags, `flags`.
pub fn resolve(
    storage: Option<&Storage>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: Option<&Parsed>,
) -> std::result::Result<Resolved, String> {
    let mut r = Resolved::default();
    if let Some(storage) = storage {
        let name = match env(ENV_CONTEXT).filter(|v| !v.is_empty()) {
            Some(n) => Some(n),
            None => storage.default_name()?,
        };
        if let Some(name) = name.filter(|n| !n.is_empty() && n != "-") {
            r.apply_context(&storage.load(&name)?);
        }
    }
    if let Some(addr) = env(ENV_ADDR).filter(|v| !v.is_empty()) {
        r.addr = addr;
        r.tls = waypoint_env_bool(env, ENV_TLS, false)?;
        r.tls_skip_verify = waypoint_env_bool(env, ENV_TLS_SKIP_VERIFY, false)?;
        r.auth = env(ENV_TOKEN).is_some_and(|t| !t.is_empty());
    }
    if let Some(flags) = flags {
        let addr = flags.str("server-addr");
        if !addr.is_empty() {
            r.addr = addr.to_string();
            r.tls = flags.bool("server-tls");
            r.tls_skip_verify = flags.bool("server-tls-skip-verify");
        }
    }
    Ok(r)
}

impl ServerConn {
    /// The connection for `resolved` with `token`, if its address is usable.
    pub fn new(resolved: &Resolved, token: Option<String>) -> Result<ServerConn> {
        let (host, port) = split_host_port(&resolved.addr)?;
        Ok(ServerConn {
            host,
            port,
            tls: resolved.tls,
            tls_skip_verify: resolved.tls_skip_verify,
            token,
        })
    }

    /// A client for the server.
    pub fn client(&self, timeout: Duration) -> Result<HttpClient> {
        let target = Target::Tcp {
            host: self.host.clone(),
            port: self.port,
        };
        let tls = if !self.tls {
            None
        } else {
            let config = if self.tls_skip_verify {
                tls::client_config_skip_verify(None)?
            } else {
                tls::client_config_system_roots()?
            };
            Some((config, tls::server_name(&self.host)?))
        };
        Ok(HttpClient::new(target, tls, timeout))
    }

    /// `HOST:PORT (tls, skip-verify)`, for log lines. Never includes the token.
    pub fn describe(&self) -> String {
        let mode = match (self.tls, self.tls_skip_verify) {
            (false, _) => "plain, no tls",
            (true, false) => "tls",
            (true, true) => "tls, skip-verify",
        };
        format!("{}:{} ({mode})", self.host, self.port)
    }
}

/// Dials like Waypoint's blocking gRPC dial: retries (gRPC's 1 s backoff growing by 1.6) until
/// `GET /v1/version` (Waypoint's unauthenticated `GetVersionInfo`) answers over the configured
/// transport, or `timeout` passes: then `error connecting to server: context deadline exceeded`.
pub async fn dial(
    addr: &str,
    resolved: &Resolved,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let deadline = Instant::now() + timeout;
    let exceeded = || "error connecting to server: context deadline exceeded".to_string();
    let mut backoff = Duration::from_secs(1);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(exceeded());
        }
        let attempt = async {
            let conn = ServerConn::new(resolved, None).map_err(|e| e.to_string())?;
            let client = conn.client(remaining).map_err(|e| e.to_string())?;
            client
                .send(Method::GET, "/v1/version", None, None)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(remaining, attempt).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => crate::debug_log!("dial {addr}: {e}"),
            Err(_) => return Err(exceeded()),
        }
        let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(pause).await;
        backoff = backoff.mul_f64(1.6).min(Duration::from_secs(120));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::parse_with_env;
    use std::collections::HashMap;

    fn resolve_with(
        args: &[&str],
        vars: &[(&str, &str)],
        ctx: Option<&ContextConfig>,
    ) -> std::result::Result<(Resolved, Option<String>), String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let parsed = parse_with_env(&args, &CONNECTION_FLAGS, &|_| None).unwrap();
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = |k: &str| vars.get(k).cloned();
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::new(dir.path());
        if let Some(c) = ctx {
            storage.set("ctx", c).unwrap();
        }
        let r = resolve(Some(&storage), &env, Some(&parsed))?;
        let token = r.token(&env)?;
        Ok((r, token))
    }

    #[test]
    fn flag_address_defaults_to_tls_and_sends_no_token() {
        let (r, token) = resolve_with(
            &["-server-addr=127.0.0.1:9701", "-server-tls-skip-verify"],
            &[(ENV_TOKEN, "t")],
            None,
        )
        .unwrap();
        assert_eq!(
            (r.addr.as_str(), r.tls, r.tls_skip_verify),
            ("127.0.0.1:9701", true, true)
        );
        assert_eq!(token, None, "flags never turn auth on");
        let (r, _) =
            resolve_with(&["-server-addr", "h:1", "-server-tls=false"], &[], None).unwrap();
        assert!(!r.tls);
    }

    #[test]
    fn env_address_defaults_to_plain_and_flags_ignore_env_skip_verify() {
        let (r, token) = resolve_with(
            &[],
            &[(ENV_ADDR, "waypoint-server:9701"), (ENV_TOKEN, "t")],
            None,
        )
        .unwrap();
        assert!(!r.tls);
        assert_eq!(token.as_deref(), Some("t"));
        let (r, token) = resolve_with(
            &["-server-addr=a:2"],
            &[
                (ENV_ADDR, "b:3"),
                (ENV_TOKEN, "env"),
                (ENV_TLS_SKIP_VERIFY, "true"),
            ],
            None,
        )
        .unwrap();
        assert_eq!((r.addr.as_str(), r.tls_skip_verify), ("a:2", false));
        assert_eq!(
            token.as_deref(),
            Some("env"),
            "auth stays on from the environment"
        );
        let err = resolve_with(&[], &[(ENV_ADDR, "a:1"), (ENV_TLS, "maybe")], None).unwrap_err();
        assert_eq!(
            err,
            "failed to parse a boolean from environment variable WAYPOINT_SERVER_TLS=maybe"
        );
        let (r, _) = resolve_with(&[], &[(ENV_ADDR, "a:1"), (ENV_TLS, "TRUE")], None).unwrap();
        assert!(r.tls);
        let (_, token) = resolve_with(&[], &[(ENV_TOKEN, "orphan")], None).unwrap();
        assert_eq!(token, None, "a token without an address is not sent");
    }

    #[test]
    fn the_default_context_comes_first_and_env_overrides_its_token() {
        let ctx = ContextConfig {
            address: "ctx:9701".into(),
            tls: true,
            tls_skip_verify: true,
            require_auth: true,
            auth_token: "ctx-token".into(),
            workspace: String::new(),
        };
        let (r, token) = resolve_with(&[], &[], Some(&ctx)).unwrap();
        assert_eq!(
            (r.addr.as_str(), token.as_deref()),
            ("ctx:9701", Some("ctx-token"))
        );
        let (_, token) = resolve_with(&[], &[(ENV_TOKEN, "env-token")], Some(&ctx)).unwrap();
        assert_eq!(token.as_deref(), Some("env-token"));
        let empty = ContextConfig {
            auth_token: String::new(),
            ..ctx
        };
        let err = resolve_with(&[], &[], Some(&empty)).unwrap_err();
        assert_eq!(
            err,
            "No token available at the WAYPOINT_SERVER_TOKEN environment variable"
        );
    }

    #[test]
    fn debug_output_redacts_the_token() {
        let c = ServerConn {
            host: "a".into(),
            port: 1,
            tls: true,
            tls_skip_verify: true,
            token: Some("s3cr3t".into()),
        };
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert!(!c.describe().contains("s3cr3t"));
        assert!(split_host_port("nohost").is_err());
        assert!(split_host_port("::1:9701").is_err());
    }
}
