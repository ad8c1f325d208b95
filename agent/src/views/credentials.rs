//! `pilot-agent credentials [--json]`: what the Pilot CLI needs to use this host, for root on
//! the host (the token and password files are 0600): the Waypoint address and bootstrap token,
//! the database host, port, name, user and password, and the agent's CA certificate.
//!
//! A part whose section is not configured, or whose step has not converged yet, is left out
//! and named in `missing` (`waypoint`, `waypoint.token`, `database`, `database.password`,
//! `ca_pem`), so a script can tell "not yet" from "never". The JSON field names are an API:
//!
//! ```json
//! {"waypoint": {"address": "pilot.example.com:9701", "token": "...", "tls_skip_verify": false},
//!  "database": {"host": "...", "port": 5432, "name": "pilot", "user": "pilot_app",
//!               "password": "..."},
//!  "ca_pem": "-----BEGIN CERTIFICATE-----\n...", "ca_sha256": "3F:9A:...", "missing": []}
//! ```
//!
//! The Waypoint address is the one the server advertises to applications (the
//! `waypoint-advertise` step's, so the CLI and every entrypoint dial the same address); before
//! that step ran, `waypoint.advertise_address` when set, else the first of: the first
//! `host.extra_names` entry (the name clients are told to use), `waypoint.publish_address` when
//! it is a specific address, `host.hostname`, the first non-loopback, non-link-local address of
//! an interface that `host.exclude_interfaces` does not exclude (IPv4 first), the kernel's host
//! name, with `waypoint.grpc_port`. `ca_sha256` is the CA certificate's SHA-256 fingerprint, the
//! value a runner-only host pins (`server.ca_sha256`). On a runner-only host `waypoint` is
//! missing: the server VM's credentials have it.
//! `tls_skip_verify` is false: Waypoint serves a certificate of the agent's CA (`ca_pem`) with
//! the host's names and addresses, so the CLI verifies it (Go: `SSL_CERT_FILE=ca.pem`). Agents
//! of earlier builds answered true (Waypoint's own self-signed certificate); the field stays.
//!
//! The secrets are held as [`Secret`] (redacted in `Debug`/`Display`) and exposed only when the
//! output is rendered.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::addresses::{self, InterfaceAddr};
use crate::config::{Config, ConfigError};
use crate::database::{self, Secret};
use crate::pki::PkiLayout;
use crate::plan;
use crate::waypoint::{ServerRef, WaypointPlan};
use pilot_values::join_host_port;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "cannot read {path}: permission denied; run `pilot-agent credentials` as root \
         (the file is readable by root only)"
    )]
    PermissionDenied { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the database password: {0}")]
    Password(#[source] database::DatabaseError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointCredentials {
    /// `host:port` of the server's gRPC API.
    pub address: String,
    /// The bootstrap token; `None` until the waypoint-bootstrap step has converged.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseCredentials {
    pub host: String,
    pub port: u16,
    pub name: String,
    pub user: String,
    /// `None` until the database step has converged.
    pub password: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub waypoint: Option<WaypointCredentials>,
    pub database: Option<DatabaseCredentials>,
    pub ca_pem: Option<String>,
    /// Field paths that are absent, with why (for the plain output).
    pub missing: Vec<(String, String)>,
}

/// Loads the configuration at `config_path` and gathers the credentials.
pub fn credentials(config_path: &Path) -> Result<Credentials, CredentialsError> {
    let config = Config::load(config_path)?;
    gather(&config, &interface_addrs())
}

fn interface_addrs() -> Vec<InterfaceAddr> {
    // Without the interface list the address falls back to the host name: not worth failing.
    addresses::interface_addrs().unwrap_or_default()
}

/// Gathers the credentials of `config`'s host; `addrs` are the host's interface addresses.
pub fn gather(config: &Config, addrs: &[InterfaceAddr]) -> Result<Credentials, CredentialsError> {
    let mut missing = Vec::new();
    let waypoint = match WaypointPlan::from_config(config) {
        None => {
            missing.push((
                "waypoint".into(),
                "no waypoint section in the configuration".into(),
            ));
            None
        }
        Some(plan) if plan.server == ServerRef::Remote => {
            missing.push((
                "waypoint".into(),
                "a runner-only host (role: runner): the server VM's credentials have the \
                 Waypoint address and token"
                    .into(),
            ));
            None
        }
        Some(plan) => {
            let address = waypoint_address(config, &plan, addrs)?;
            let token = read_secret(&plan.bootstrap_token_path())?;
            if token.is_none() {
                missing.push((
                    "waypoint.token".into(),
                    format!(
                        "{} does not exist yet: the {} step has not converged",
                        plan.bootstrap_token_path().display(),
                        plan::WAYPOINT_BOOTSTRAP
                    ),
                ));
            }
            Some(WaypointCredentials { address, token })
        }
    };
    let database = match &config.database {
        None => {
            missing.push((
                "database".into(),
                "no database section in the configuration".into(),
            ));
            None
        }
        Some(settings) => {
            let path = plan::database_password_path(config);
            let password = match std::fs::symlink_metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                _ => Some(read_password(&path)?),
            };
            if password.is_none() {
                missing.push((
                    "database.password".into(),
                    format!(
                        "{} does not exist yet: the {} step has not converged",
                        path.display(),
                        plan::DATABASE
                    ),
                ));
            }
            Some(DatabaseCredentials {
                host: settings.host.clone(),
                port: settings.port,
                name: settings.app_database.clone(),
                user: settings.app_role.clone(),
                password,
            })
        }
    };
    let ca_path = PkiLayout::new(config.pki_dir()).ca_cert();
    let ca_pem = read_file(&ca_path)?.map(|b| String::from_utf8_lossy(&b).into_owned());
    if ca_pem.is_none() {
        missing.push((
            "ca_pem".into(),
            format!(
                "{} does not exist yet: the {} step has not converged",
                ca_path.display(),
                plan::PKI
            ),
        ));
    }
    Ok(Credentials {
        waypoint,
        database,
        ca_pem,
        missing,
    })
}

/// What a runner-only host gets with a minted runner token (`POST /v1/runner-token`): the
/// Waypoint address the runners dial and the agent CA (PEM; `None` before the pki step). No
/// secret is read: not the bootstrap token, not the database password.
pub fn runner_view(
    config: &Config,
    addrs: &[InterfaceAddr],
) -> Result<(String, Option<String>), CredentialsError> {
    let plan = WaypointPlan::from_config(config).ok_or_else(|| CredentialsError::Read {
        path: PathBuf::from("waypoint"),
        source: io::Error::new(io::ErrorKind::NotFound, "no waypoint section"),
    })?;
    let address = waypoint_address(config, &plan, addrs)?;
    let ca_path = PkiLayout::new(config.pki_dir()).ca_cert();
    let ca_pem = read_file(&ca_path)?.map(|b| String::from_utf8_lossy(&b).into_owned());
    Ok((address, ca_pem))
}

/// The address the Pilot CLI should dial: the one the server advertises to applications (as
/// the `waypoint-advertise` step last set it), else the configured advertise address, else
/// [`addresses::waypoint_host`] with the gRPC port.
fn waypoint_address(
    config: &Config,
    plan: &WaypointPlan,
    addrs: &[InterfaceAddr],
) -> Result<String, CredentialsError> {
    if let Some(set) = read_file(&plan.advertise_marker_path())? {
        let set = String::from_utf8_lossy(&set).trim().to_string();
        if !set.is_empty() {
            return Ok(set);
        }
    }
    if let Some(fixed) = plan.config.advertise.fixed() {
        return Ok(fixed);
    }
    Ok(join_host_port(
        &addresses::waypoint_host(config, addrs),
        plan.config.grpc_port,
    ))
}

fn read_file(path: &Path) -> Result<Option<Vec<u8>>, CredentialsError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err(CredentialsError::PermissionDenied {
                path: path.to_path_buf(),
            })
        }
        Err(source) => Err(CredentialsError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A token file: one line; empty counts as absent.
fn read_secret(path: &Path) -> Result<Option<Secret>, CredentialsError> {
    let Some(bytes) = read_file(path)? else {
        return Ok(None);
    };
    let bytes = zeroize::Zeroizing::new(bytes);
    let text = String::from_utf8_lossy(&bytes);
    let token = text.trim();
    Ok((!token.is_empty()).then(|| Secret::new(token)))
}

fn read_password(path: &Path) -> Result<Secret, CredentialsError> {
    // Check readability first so that a non-root caller gets the clear message, not the
    // database module's generic one.
    if let Err(e) = std::fs::File::open(path)
        && e.kind() == io::ErrorKind::PermissionDenied
    {
        return Err(CredentialsError::PermissionDenied {
            path: path.to_path_buf(),
        });
    }
    database::read_password(path).map_err(CredentialsError::Password)
}

impl Credentials {
    /// The SHA-256 fingerprint of the agent's CA certificate: what a runner-only host's
    /// `server.ca_sha256` pins.
    pub fn ca_sha256(&self) -> Option<String> {
        let pem = self.ca_pem.as_deref()?;
        crate::remote::Fingerprint::of_pem(pem)
            .ok()
            .map(|f| f.to_string())
    }

    /// The JSON output (the documented API). Exposes the secrets: only for the command's stdout.
    pub fn to_json(&self) -> Value {
        json!({
            "waypoint": self.waypoint.as_ref().map(|w| {
                let mut v = json!({"address": w.address, "tls_skip_verify": false});
                if let Some(t) = &w.token {
                    v["token"] = json!(t.expose());
                }
                v
            }),
            "database": self.database.as_ref().map(|d| {
                let mut v = json!({
                    "host": d.host, "port": d.port, "name": d.name, "user": d.user,
                });
                if let Some(p) = &d.password {
                    v["password"] = json!(p.expose());
                }
                v
            }),
            "ca_pem": self.ca_pem,
            "ca_sha256": self.ca_sha256(),
            "missing": self.missing.iter().map(|(field, _)| field).collect::<Vec<_>>(),
        })
    }

    /// The plain output: `key: value` lines, the CA PEM, then what is missing and why.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        if let Some(w) = &self.waypoint {
            let _ = writeln!(out, "waypoint address:   {}", w.address);
            if let Some(t) = &w.token {
                let _ = writeln!(out, "waypoint token:     {}", t.expose());
            }
            let _ = writeln!(
                out,
                "waypoint tls:       skip verification (Waypoint's own self-signed certificate)"
            );
        }
        if let Some(d) = &self.database {
            let _ = writeln!(out, "database host:      {}", d.host);
            let _ = writeln!(out, "database port:      {}", d.port);
            let _ = writeln!(out, "database name:      {}", d.name);
            let _ = writeln!(out, "database user:      {}", d.user);
            if let Some(p) = &d.password {
                let _ = writeln!(out, "database password:  {}", p.expose());
            }
        }
        if let Some(fp) = self.ca_sha256() {
            let _ = writeln!(out, "agent CA sha256:    {fp}");
        }
        if let Some(pem) = &self.ca_pem {
            let _ = writeln!(out, "agent CA certificate:");
            out.push_str(pem);
            if !pem.ends_with('\n') {
                out.push('\n');
            }
        }
        if !self.missing.is_empty() {
            let _ = writeln!(out, "missing:");
            for (field, why) in &self.missing {
                let _ = writeln!(out, "  {field}: {why}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WaypointConfig;
    use crate::database::DatabaseSettings;

    #[test]
    fn gathers_what_exists_and_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            state_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        config.host.extra_names = vec!["pilot.example.com".into()];
        let c = gather(&config, &[]).unwrap();
        let v = c.to_json();
        assert!(v["waypoint"].is_null());
        assert!(v["database"].is_null());
        assert!(v["ca_pem"].is_null());
        assert_eq!(v["missing"], json!(["waypoint", "database", "ca_pem"]));

        config.waypoint = Some(WaypointConfig::default());
        config.database = Some(DatabaseSettings::new("db.internal", "admin"));
        let c = gather(&config, &[]).unwrap();
        assert_eq!(
            c.to_json()["missing"],
            json!(["waypoint.token", "database.password", "ca_pem"])
        );
        assert!(
            c.to_text().contains("  database.password: "),
            "{}",
            c.to_text()
        );

        let plan = WaypointPlan::from_config(&config).unwrap();
        std::fs::create_dir_all(&plan.tokens_dir).unwrap();
        std::fs::write(plan.bootstrap_token_path(), "tok-123\n").unwrap();
        let pw = plan::database_password_path(&config);
        std::fs::create_dir_all(pw.parent().unwrap()).unwrap();
        std::fs::write(&pw, "pw-456\n").unwrap();
        let ca = PkiLayout::new(config.pki_dir()).ca_cert();
        std::fs::create_dir_all(ca.parent().unwrap()).unwrap();
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let c = gather(&config, &[]).unwrap();
        let v = c.to_json();
        assert_eq!(
            v,
            json!({
                "waypoint": {"address": format!("pilot.example.com:{}",
                    WaypointConfig::default().grpc_port), "token": "tok-123",
                    "tls_skip_verify": false},
                "database": {"host": "db.internal", "port": 5432, "name": "pilot",
                    "user": "pilot_app", "password": "pw-456"},
                "ca_pem": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
                // The PEM above holds the single byte 0.
                "ca_sha256": crate::remote::Fingerprint::of_der(&[0]).to_string(),
                "missing": [],
            })
        );
        let text = c.to_text();
        assert!(text.contains("waypoint token:     tok-123\n"), "{text}");
        assert!(text.contains("database password:  pw-456\n"), "{text}");
        // Debug never shows the secrets.
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("tok-123") && !debug.contains("pw-456"),
            "{debug}"
        );
    }
}
