//! Typed errors of database provisioning.
//!
//! No variant ever carries a password: the application password only travels to the server as
//! a SCRAM verifier, the admin password only inside the connection handshake, and the server
//! messages kept as sources ("password authentication failed for user …") name users, never
//! secrets. Display strings follow the usual Rust convention of not repeating the source: print
//! the chain (`{:#}` with anyhow, or walk `source()`) to get the server's reason.

use std::path::PathBuf;

use crate::config::database::InvalidSetting;

/// A boxed error from the layers below (tokio-postgres, rustls, I/O, timeouts).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// A setting is unusable as given; `field` is the settings field (the config loader maps it
    /// to the YAML key and its line:column).
    #[error("invalid database setting `{field}`: {reason}")]
    InvalidSetting { field: &'static str, reason: String },

    /// The server could not be reached or is not accepting connections yet (refused, timed out,
    /// connection dropped, starting up, too many connections). This is the fail-open case: the
    /// engine reports the step `degraded` and retries with backoff.
    #[error("database server {host}:{port} is unreachable")]
    Unreachable {
        host: String,
        port: u16,
        #[source]
        source: BoxError,
    },

    /// The server refused the credentials of `user` (wrong password, or no pg_hba.conf entry).
    #[error("database server refused the login of user {user:?}")]
    Auth {
        user: String,
        #[source]
        source: BoxError,
    },

    /// A TLS problem: the CA file could not be used, or the handshake failed (certificate not
    /// trusted, wrong name, server without TLS while TLS is required).
    #[error("database tls: {context}")]
    Tls {
        context: String,
        #[source]
        source: BoxError,
    },

    /// The server asked for the password in a form it could read (cleartext) or crack offline
    /// (MD5), and its identity was not verified: `tls: disable`, or `tls: require` without
    /// `ca_file`. Nothing was sent; the connection was dropped on the request. Not transient:
    /// a setting on one side or the other has to change.
    #[error(
        "database server {host}:{port} asked for the {method} of user {user:?}, and its \
         certificate was not verified ({reason}); the agent sent no password. Set `tls: \
         verify-full` with `ca_file` naming the server's CA, or enable SCRAM on the server \
         (pg_hba.conf method scram-sha-256, password_encryption = scram-sha-256, then set the \
         password again)"
    )]
    UnverifiedServer {
        host: String,
        port: u16,
        user: String,
        /// "cleartext password" or "MD5 password".
        method: &'static str,
        /// Why the server counts as unverified, in terms of the settings.
        reason: &'static str,
    },

    /// A statement failed or timed out; `context` says what was being done.
    #[error("database: failed to {context}")]
    Query {
        context: String,
        #[source]
        source: BoxError,
    },

    /// The server's state conflicts with what the agent may change on its own (for example, the
    /// application database exists but belongs to another role). Nothing was changed; an
    /// operator has to decide.
    #[error("database: {0}")]
    Conflict(String),

    /// A secret file (stored application password, admin password file) could not be read or
    /// written. The path is shown; the content never is.
    #[error("cannot use database secret file {}", path.display())]
    Secret {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
}

impl DatabaseError {
    /// True when retrying later may succeed without anyone changing the configuration: the
    /// engine maps these to `degraded` and retries in the background with backoff.
    pub fn is_transient(&self) -> bool {
        matches!(self, DatabaseError::Unreachable { .. })
    }

    pub(crate) fn query(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        DatabaseError::Query {
            context: context.into(),
            source: source.into(),
        }
    }

    pub(crate) fn secret(path: impl Into<PathBuf>, source: impl Into<BoxError>) -> Self {
        DatabaseError::Secret {
            path: path.into(),
            source: source.into(),
        }
    }
}

impl From<InvalidSetting> for DatabaseError {
    fn from(InvalidSetting { field, reason }: InvalidSetting) -> Self {
        DatabaseError::InvalidSetting { field, reason }
    }
}
