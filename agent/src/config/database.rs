//! `database:` — the admin connection to the Pilot PostgreSQL and the application role and
//! database to provision there ([`crate::database::DatabaseSettings`]).
//!
//! The section is optional: without it `up` has no database step. `host` and `admin_user`
//! are required; the admin password comes inline (`admin_password`) or, better, from a file
//! (`admin_password_file`) so that the YAML (user-data, say) need not carry it.

use super::schema::{self, Node, Walker};
use crate::database::{DatabaseError, DatabaseSettings, Secret, TlsMode};

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
    // The rules that span fields (and the identifier syntax) are the provisioning module's
    // own; map the field it names back to where it is in the file.
    match s.validate() {
        Ok(()) => Some(s),
        Err(DatabaseError::InvalidSetting { field, reason }) => {
            let at = f.get(field).unwrap_or(node);
            w.error(at, format!("database.{field}: {reason}"));
            None
        }
        Err(other) => {
            w.error(node, format!("database: {other}"));
            None
        }
    }
}
