//! How CLI commands and the runner find the server: `-server-addr`, `-server-auth-token`,
//! `-server-tls`, `-server-tls-skip-verify` flags, else Waypoint's environment variables
//! `WAYPOINT_SERVER_ADDR`, `WAYPOINT_SERVER_TOKEN`, `WAYPOINT_SERVER_TLS`,
//! `WAYPOINT_SERVER_TLS_SKIP_VERIFY`.
//!
//! Defaults follow Waypoint: with `-server-addr` TLS is on unless `-server-tls=false`; from the
//! environment TLS is off unless `WAYPOINT_SERVER_TLS` is true. The stand-in server speaks only
//! TLS, so a caller that forgets to ask for TLS fails here as it would against Waypoint.

use std::time::Duration;

use crate::client::{HttpClient, Target};
use crate::error::{Error, Result};
use crate::flags::{Kind, Parsed, Spec, parse_bool};
use crate::tls;

pub const ENV_ADDR: &str = "WAYPOINT_SERVER_ADDR";
pub const ENV_TOKEN: &str = "WAYPOINT_SERVER_TOKEN";
pub const ENV_TLS: &str = "WAYPOINT_SERVER_TLS";
pub const ENV_TLS_SKIP_VERIFY: &str = "WAYPOINT_SERVER_TLS_SKIP_VERIFY";

/// The connection flags every client command accepts.
pub const CONNECTION_FLAGS: [Spec; 5] = [
    Spec::value(
        "server-addr",
        "address of the server, HOST:PORT (else WAYPOINT_SERVER_ADDR)",
    ),
    Spec::value(
        "server-auth-token",
        "token to present (else WAYPOINT_SERVER_TOKEN)",
    ),
    Spec::boolean(
        "server-tls",
        "connect over tls (default true with -server-addr)",
    ),
    Spec::boolean(
        "server-tls-skip-verify",
        "do not verify the server certificate",
    ),
    Spec::ignored("server-require-auth", Kind::Bool),
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
/// unset or empty is `None`.
pub fn env_bool(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<bool>> {
    match env(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => parse_bool(&v)
            .map(Some)
            .ok_or_else(|| Error::Config(format!("{name}={v:?} is not a boolean"))),
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

/// Resolves the connection from parsed flags and the environment (`env` looks a variable up).
pub fn resolve(parsed: &Parsed, env: &dyn Fn(&str) -> Option<String>) -> Result<ServerConn> {
    let (addr, from_flag) = match parsed.value("server-addr").filter(|v| !v.is_empty()) {
        Some(addr) => (addr.to_string(), true),
        None => match env(ENV_ADDR).filter(|v| !v.is_empty()) {
            Some(addr) => (addr, false),
            None => {
                return Err(Error::Config(format!(
                    "no server connection configuration found: set -server-addr or {ENV_ADDR}"
                )));
            }
        },
    };
    let (host, port) = split_host_port(&addr)?;
    let tls = match parsed.bool("server-tls") {
        Some(v) => v,
        None if from_flag => true,
        None => env_bool(env, ENV_TLS)?.unwrap_or(false),
    };
    let tls_skip_verify = match parsed.bool("server-tls-skip-verify") {
        Some(v) => v,
        None => env_bool(env, ENV_TLS_SKIP_VERIFY)?.unwrap_or(false),
    };
    let token = parsed
        .value("server-auth-token")
        .map(str::to_string)
        .or_else(|| env(ENV_TOKEN))
        .filter(|t| !t.is_empty());
    Ok(ServerConn {
        host,
        port,
        tls,
        tls_skip_verify,
        token,
    })
}

impl ServerConn {
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

    /// The token, or Waypoint's error for its absence.
    pub fn require_token(&self) -> Result<&str> {
        self.token.as_deref().ok_or_else(|| {
            Error::Config(format!(
                "no token available: set -server-auth-token or {ENV_TOKEN}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::parse;
    use std::collections::HashMap;

    fn resolve_with(args: &[&str], vars: &[(&str, &str)]) -> Result<ServerConn> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let parsed = parse(&args, &CONNECTION_FLAGS).unwrap();
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(&parsed, &|k| vars.get(k).cloned())
    }

    #[test]
    fn flag_address_defaults_to_tls() {
        let c = resolve_with(
            &["-server-addr=127.0.0.1:9701", "-server-tls-skip-verify"],
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.tls, c.tls_skip_verify),
            ("127.0.0.1", 9701, true, true)
        );
        assert_eq!(c.token, None);
        let c = resolve_with(&["-server-addr", "h:1", "-server-tls=false"], &[]).unwrap();
        assert!(!c.tls);
    }

    #[test]
    fn env_address_defaults_to_plain_like_waypoint() {
        let c = resolve_with(&[], &[(ENV_ADDR, "waypoint-server:9701"), (ENV_TOKEN, "t")]).unwrap();
        assert!(!c.tls);
        assert_eq!(c.token.as_deref(), Some("t"));
        let c = resolve_with(
            &[],
            &[
                (ENV_ADDR, "[::1]:9701"),
                (ENV_TLS, "true"),
                (ENV_TLS_SKIP_VERIFY, "1"),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.host.as_str(), c.tls, c.tls_skip_verify),
            ("[::1]", true, true)
        );
    }

    #[test]
    fn flags_override_env() {
        let c = resolve_with(
            &["-server-auth-token=flag", "-server-addr=a:2"],
            &[(ENV_ADDR, "b:3"), (ENV_TOKEN, "env")],
        )
        .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.token.as_deref()),
            ("a", 2, Some("flag"))
        );
    }

    #[test]
    fn reports_missing_and_malformed_settings() {
        let err = resolve_with(&[], &[]).unwrap_err().to_string();
        assert!(err.contains(ENV_ADDR), "{err}");
        assert!(resolve_with(&["-server-addr=nohost"], &[]).is_err());
        assert!(resolve_with(&["-server-addr=::1:9701"], &[]).is_err());
        let err = resolve_with(&[], &[(ENV_ADDR, "a:1"), (ENV_TLS, "maybe")])
            .unwrap_err()
            .to_string();
        assert!(err.contains(ENV_TLS), "{err}");
        let c = resolve_with(&["-server-addr=a:1"], &[]).unwrap();
        assert!(
            c.require_token()
                .unwrap_err()
                .to_string()
                .contains(ENV_TOKEN)
        );
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn debug_output_redacts_the_token() {
        let c = resolve_with(&["-server-addr=a:1", "-server-auth-token=s3cr3t"], &[]).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert!(!c.describe().contains("s3cr3t"));
    }
}
