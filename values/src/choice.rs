//! The enumerated values of the configuration and its numeric bounds.

use std::fmt;
use std::str::FromStr;

/// The most runners one host may run (`waypoint.runners`): each holds a Waypoint token and a
/// Docker client certificate, and a host that needs more wants runner-only hosts instead.
pub const MAX_RUNNERS: u32 = 32;

/// What this host is in a Pilot deployment (`role:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// The Waypoint server, its runners and the database user (one VM per account).
    #[default]
    Server,
    /// Runners only, registered with the server of another Pilot VM (`server:`).
    Runner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Runner => "runner",
        }
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "server" => Ok(Role::Server),
            "runner" => Ok(Role::Runner),
            other => Err(format!("expected `server` or `runner`, got \"{other}\"")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the connection to the database server is protected (`database.tls`); the names and
/// meanings are libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Plain TCP. Only for a server on the same host or a private link.
    Disable,
    /// TLS required. The certificate is not checked (protects against passive eavesdropping
    /// only), unless `ca_file` is set: then its chain must lead to that CA, but the name is not
    /// checked (libpq's `verify-ca`).
    #[default]
    Require,
    /// TLS required, the certificate must chain to `ca_file` (or to the system roots without
    /// one) and name the configured `host`.
    VerifyFull,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Require => "require",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(TlsMode::Disable),
            "require" => Ok(TlsMode::Require),
            "verify-full" => Ok(TlsMode::VerifyFull),
            other => Err(format!(
                "unknown tls mode {other:?}: expected disable, require or verify-full"
            )),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for r in [Role::Server, Role::Runner] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        for t in [TlsMode::Disable, TlsMode::Require, TlsMode::VerifyFull] {
            assert_eq!(t.as_str().parse::<TlsMode>(), Ok(t));
        }
        assert!("Server".parse::<Role>().is_err());
        assert!("verify-ca".parse::<TlsMode>().is_err());
    }
}
