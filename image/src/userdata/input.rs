//! What the deployment gives `pilot-image user-data`: the flags, or the same keys in a `--from`
//! JSON file. Nothing here is checked (see [`super::spec`] and [`super::validate`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::UserDataError;
use super::token::TokenHashInput;

/// Which template: a baked image on AWS or GCP, or a stock Debian 12 image that installs the
/// agent package at first boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// AWS EC2, baked image.
    Aws,
    /// Google Compute Engine, baked image.
    Gcp,
    /// Stock Debian 12 image: installs docker.io, nftables and the agent package at boot.
    Stock,
}

impl Flavour {
    pub const ALL: [Flavour; 3] = [Flavour::Aws, Flavour::Gcp, Flavour::Stock];

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Aws => "aws",
            Flavour::Gcp => "gcp",
            Flavour::Stock => "stock",
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `database.tls` of the agent's configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DbTls {
    Disable,
    #[default]
    Require,
    VerifyFull,
}

impl DbTls {
    pub(super) fn name(self) -> &'static str {
        match self {
            DbTls::Disable => "disable",
            DbTls::Require => "require",
            DbTls::VerifyFull => "verify-full",
        }
    }
}

/// `role:` of the agent's configuration: the Waypoint server VM, or a runner-only host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The Waypoint server, its runners and the database (one VM per account).
    #[default]
    Server,
    /// Runners only, registered with the server VM named by --server-endpoint.
    Runner,
}

/// What the deployment provides, as given: flags, or keys of the `--from` JSON file (the flag
/// names with `_` for `-`). Nothing is checked until [`UserDataInput::validate`].
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDataInput {
    /// Cloud flavour: aws or gcp (baked image), stock (installs the agent package at boot).
    /// Default: aws.
    #[arg(long, value_enum)]
    pub flavour: Option<Flavour>,
    /// PostgreSQL host (DNS name or IP address) for the application database.
    #[arg(long)]
    pub db_host: Option<String>,
    /// PostgreSQL port (default 5432).
    #[arg(long)]
    pub db_port: Option<u32>,
    /// PostgreSQL user that may create roles and databases.
    #[arg(long)]
    pub db_admin_user: Option<String>,
    /// Local file whose one line is the admin password; the VM gets it as
    /// /etc/pilot/db-admin-password (0600). A file, not a flag, keeps it out of `ps`.
    #[arg(long)]
    pub db_admin_password_file: Option<PathBuf>,
    /// TLS to the database (default require).
    #[arg(long, value_enum)]
    pub db_tls: Option<DbTls>,
    /// SHA-256 of an `admin` endpoint token named `default`, 64 hex digits (the token never
    /// reaches the VM). Turns the agent's HTTPS endpoint on, as do the two flags below.
    #[arg(long)]
    pub endpoint_token_sha256: Option<String>,
    /// An endpoint token by its SHA-256: NAME:SCOPE:SHA256, SCOPE admin, runner or read
    /// (repeatable; in --from: `endpoint_tokens`, objects {"name", "scope", "sha256"}).
    #[arg(long = "endpoint-token", value_name = "NAME:SCOPE:SHA256")]
    #[serde(default, alias = "endpoint_tokens")]
    pub endpoint_token: Vec<TokenHashInput>,
    /// Generate a strong endpoint token (32 random bytes, base64url) of SCOPE admin, runner or
    /// read: the VM gets its SHA-256, the token is printed once on stderr as `NAME SCOPE TOKEN`
    /// (repeatable; in --from: `generate_endpoint_tokens`). A runner-only host's
    /// --server-token-file takes a `runner` one, e.g. runners:runner.
    #[arg(long = "generate-endpoint-token", value_name = "NAME:SCOPE")]
    #[serde(default, alias = "generate_endpoint_tokens")]
    pub generate_endpoint_token: Vec<String>,
    /// Networks (CIDR) that may reach the agent's endpoint (`endpoint.sources`; default
    /// anyone; comma-separated or repeated).
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    #[serde(default)]
    pub endpoint_sources: Vec<String>,
    /// HTTPS URL of the agent's .deb (required with --flavour stock, refused otherwise).
    #[arg(long)]
    pub agent_deb_url: Option<String>,
    /// Waypoint runner containers on the VM (0 to 32; default 1).
    #[arg(long)]
    pub runners: Option<u32>,
    /// More names or addresses in the Docker server certificate (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub extra_names: Vec<String>,
    /// server (default): the Waypoint server VM; runner: runners only, registered with the
    /// server VM (--server-endpoint, --server-ca-sha256, --server-token-file).
    #[arg(long, value_enum)]
    pub role: Option<Role>,
    /// With --role runner: the server VM's pilot-agent endpoint, HOST[:PORT] (port default
    /// 8443; IPv6 as [ADDR]:PORT).
    #[arg(long)]
    pub server_endpoint: Option<String>,
    /// With --role runner: SHA-256 fingerprint of the server VM's agent CA, 64 hex digits
    /// (colons allowed; `pilot-agent credentials` on the server VM prints it).
    #[arg(long)]
    pub server_ca_sha256: Option<String>,
    /// With --role runner: local file whose one line is a `runner`-scope endpoint token of
    /// the server VM (`--generate-endpoint-token NAME:runner` on the server's user-data prints
    /// one); the VM gets it as /etc/pilot/server-token (0600).
    #[arg(long)]
    pub server_token_file: Option<PathBuf>,
    /// Server only: the address Waypoint advertises to applications, HOST[:PORT] or auto
    /// (the agent's default).
    #[arg(long)]
    pub advertise_address: Option<String>,
    /// Server only: networks (CIDR) that may reach Waypoint's gRPC port, where applications
    /// and runner-only hosts connect from (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub application_sources: Vec<String>,
}

impl UserDataInput {
    /// Reads a `--from` file: a JSON object with the same keys as the flags (`db_host`, ...).
    /// A relative `db_admin_password_file` or `server_token_file` in it is relative to the
    /// current directory.
    pub fn from_file(path: &Path) -> Result<UserDataInput, UserDataError> {
        let text = std::fs::read_to_string(path).map_err(|source| UserDataError::ReadFrom {
            path: path.to_owned(),
            source,
        })?;
        UserDataInput::from_json(&text, path)
    }

    /// [`UserDataInput::from_file`] of the file's text (`path` names it in errors). Pure:
    /// public for the fuzz targets and tests.
    pub fn from_json(text: &str, path: &Path) -> Result<UserDataInput, UserDataError> {
        serde_json::from_str(text).map_err(|source| UserDataError::ParseFrom {
            path: path.to_owned(),
            source,
        })
    }

    /// `self` (the flags) over `base` (the file): a flag given wins.
    pub fn over(self, base: UserDataInput) -> UserDataInput {
        UserDataInput {
            flavour: self.flavour.or(base.flavour),
            db_host: self.db_host.or(base.db_host),
            db_port: self.db_port.or(base.db_port),
            db_admin_user: self.db_admin_user.or(base.db_admin_user),
            db_admin_password_file: self.db_admin_password_file.or(base.db_admin_password_file),
            db_tls: self.db_tls.or(base.db_tls),
            endpoint_token_sha256: self.endpoint_token_sha256.or(base.endpoint_token_sha256),
            endpoint_token: or_list(self.endpoint_token, base.endpoint_token),
            generate_endpoint_token: or_list(
                self.generate_endpoint_token,
                base.generate_endpoint_token,
            ),
            endpoint_sources: or_list(self.endpoint_sources, base.endpoint_sources),
            agent_deb_url: self.agent_deb_url.or(base.agent_deb_url),
            runners: self.runners.or(base.runners),
            extra_names: or_list(self.extra_names, base.extra_names),
            role: self.role.or(base.role),
            server_endpoint: self.server_endpoint.or(base.server_endpoint),
            server_ca_sha256: self.server_ca_sha256.or(base.server_ca_sha256),
            server_token_file: self.server_token_file.or(base.server_token_file),
            advertise_address: self.advertise_address.or(base.advertise_address),
            application_sources: or_list(self.application_sources, base.application_sources),
        }
    }
}

/// A list flag given (non-empty) replaces the file's list; it does not add to it.
fn or_list<T>(flags: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flags.is_empty() { file } else { flags }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let file = UserDataInput {
            db_host: Some("file-host".into()),
            db_port: Some(6543),
            extra_names: vec!["from-file".into()],
            ..Default::default()
        };
        let flags = UserDataInput {
            db_host: Some("flag-host".into()),
            ..Default::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.db_host.as_deref(), Some("flag-host"));
        assert_eq!(merged.db_port, Some(6543));
        assert_eq!(merged.extra_names, ["from-file"]);
    }
}
