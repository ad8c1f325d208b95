//! `database:` — the admin connection to the Pilot PostgreSQL and the application role and
//! database to provision there ([`DatabaseSettings`]).
//!
//! The section is optional: without it `up` has no database step. `host` and `admin_user`
//! are required; the admin password comes inline (`admin_password`) or, better, from a file
//! (`admin_password_file`) so that the YAML (user-data, say) need not carry it.

use super::schema::{self, Node, Walker};
use std::path::PathBuf;

use pilot_values::{Secret, TlsMode};

pub const DEFAULT_PORT: u16 = 5432;
pub const DEFAULT_ADMIN_DATABASE: &str = "postgres";
pub const DEFAULT_APP_ROLE: &str = "pilot_app";
pub const DEFAULT_APP_DATABASE: &str = "pilot";
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 5;
pub const DEFAULT_STATEMENT_TIMEOUT_SECS: u64 = 30;

/// A setting that is unusable as given; `field` is the settings field (the loader maps it to
/// the YAML key and its line:column).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid database setting `{field}`: {reason}")]
pub struct InvalidSetting {
    pub field: &'static str,
    pub reason: String,
}

/// The `database` section of the agent configuration. `Debug` is safe to log: the inline
/// admin password is a [`Secret`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseSettings {
    /// Host name or IP address of the server (also the name checked by `verify-full`).
    pub host: String,
    pub port: u16,
    /// A role that may create roles and databases (an RDS master user is enough).
    pub admin_user: String,
    /// The admin password inline; prefer `admin_password_file` so that YAML need not carry it.
    pub admin_password: Option<Secret>,
    /// A file holding the admin password (one trailing newline is ignored).
    pub admin_password_file: Option<PathBuf>,
    /// The database the admin connects to.
    pub admin_database: String,
    pub tls: TlsMode,
    /// PEM file of the CA(s) that sign the server certificate (for RDS: the region bundle).
    pub ca_file: Option<PathBuf>,
    /// The application role, made with `LOGIN` and nothing else.
    pub app_role: String,
    /// The application database, owned by `app_role`.
    pub app_database: String,
    /// Deadline for a whole connect (TCP, TLS, authentication).
    pub connect_timeout_secs: u64,
    /// Deadline for each statement.
    pub statement_timeout_secs: u64,
}

impl DatabaseSettings {
    /// Settings with every optional field at its default.
    pub fn new(host: impl Into<String>, admin_user: impl Into<String>) -> Self {
        DatabaseSettings {
            host: host.into(),
            port: DEFAULT_PORT,
            admin_user: admin_user.into(),
            admin_password: None,
            admin_password_file: None,
            admin_database: DEFAULT_ADMIN_DATABASE.to_owned(),
            tls: TlsMode::default(),
            ca_file: None,
            app_role: DEFAULT_APP_ROLE.to_owned(),
            app_database: DEFAULT_APP_DATABASE.to_owned(),
            connect_timeout_secs: DEFAULT_CONNECT_TIMEOUT_SECS,
            statement_timeout_secs: DEFAULT_STATEMENT_TIMEOUT_SECS,
        }
    }

    /// Checks everything that can be checked without the server or the file system, so that
    /// `config validate` can report it. The error names the offending field.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let invalid = |field, reason: &str| {
            Err(InvalidSetting {
                field,
                reason: reason.to_owned(),
            })
        };
        // Also the name `verify-full` checks the server's certificate against.
        if let Err(why) = pilot_values::check_host(&self.host) {
            return invalid("host", &why);
        }
        if self.port == 0 {
            return invalid("port", "must be 1 to 65535");
        }
        if let Err(why) = pilot_values::pg_role_name(&self.admin_user) {
            return invalid("admin_user", &why);
        }
        if self.admin_database.is_empty() {
            return invalid("admin_database", "must not be empty");
        }
        if self.admin_password.is_some() && self.admin_password_file.is_some() {
            return invalid(
                "admin_password_file",
                "set either admin_password or admin_password_file, not both",
            );
        }
        for (field, name) in [
            ("app_role", &self.app_role),
            ("app_database", &self.app_database),
        ] {
            pilot_values::pg_identifier(name).map_err(|reason| InvalidSetting { field, reason })?;
        }
        if self.app_role.starts_with("pg_") {
            return invalid("app_role", "role names starting with pg_ are reserved");
        }
        if self.app_role == self.admin_user {
            // Provisioning sets the app role's password: it must never be the admin's.
            return invalid("app_role", "must differ from admin_user");
        }
        if self.tls == TlsMode::Disable && self.ca_file.is_some() {
            return invalid("ca_file", "has no effect with tls: disable");
        }
        if self.connect_timeout_secs == 0 {
            return invalid("connect_timeout_secs", "must be at least 1");
        }
        if self.statement_timeout_secs == 0 {
            return invalid("statement_timeout_secs", "must be at least 1");
        }
        Ok(())
    }
}

const KEYS: &[&str] = &[
    "host",
    "port",
    "admin_user",
    "admin_password",
    "admin_password_file",
    "admin_database",
    "tls",
    "ca_file",
    "app_role",
    "app_database",
    "connect_timeout_secs",
    "statement_timeout_secs",
];

/// Reads the section; `None` only when it is unusable (the problems are recorded in `w`).
pub fn read(w: &mut Walker, node: &Node<'_>) -> Option<DatabaseSettings> {
    let f = w.mapping(node, "database", KEYS)?;
    let required = |w: &mut Walker, key: &str| -> Option<String> {
        match f.get(key) {
            Some(n) => schema::non_empty_string(w, n, &f.path_of(key)),
            None => {
                w.error(node, format!("database.{key} is required"));
                None
            }
        }
    };
    let host = required(w, "host");
    let admin_user = required(w, "admin_user");
    let mut s = DatabaseSettings::new(
        host.clone().unwrap_or_default(),
        admin_user.clone().unwrap_or_default(),
    );
    if let Some(p) = f.port(w, "port") {
        s.port = p;
    }
    if let Some(n) = f.get("admin_password") {
        if let Some(p) = schema::non_empty_string(w, n, "database.admin_password") {
            s.admin_password = Some(Secret::new(p));
        }
    }
    if let Some(p) = f.path(w, "admin_password_file") {
        s.admin_password_file = Some(p);
    }
    for (key, slot) in [
        ("admin_database", &mut s.admin_database),
        ("app_role", &mut s.app_role),
        ("app_database", &mut s.app_database),
    ] {
        if let Some(n) = f.get(key) {
            if let Some(v) = schema::string(w, n, &f.path_of(key)) {
                *slot = v;
            }
        }
    }
    if let Some(mode) = f.choice(w, "tls", &["disable", "require", "verify-full"]) {
        // `choice` admitted only the three names `TlsMode` parses.
        s.tls = mode.parse::<TlsMode>().unwrap_or_default();
    }
    if let Some(p) = f.path(w, "ca_file") {
        s.ca_file = Some(p);
    }
    // The range checks make the conversions lossless.
    if let Some(t) = f.integer(w, "connect_timeout_secs", 1, 600) {
        s.connect_timeout_secs = t as u64;
    }
    if let Some(t) = f.integer(w, "statement_timeout_secs", 1, 3600) {
        s.statement_timeout_secs = t as u64;
    }
    if host.is_none() || admin_user.is_none() {
        return None;
    }
    // The rules that span fields (and the identifier syntax): map the field they name back to
    // where it is in the file.
    match s.validate() {
        Ok(()) => Some(s),
        Err(InvalidSetting { field, reason }) => {
            let at = f.get(field).unwrap_or(node);
            w.error(at, format!("database.{field}: {reason}"));
            None
        }
    }
}
