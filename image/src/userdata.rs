//! Cloud-init user-data for a Pilot VM: the `#cloud-config` templates shipped in `cloud-init/`
//! (embedded at compile time), filled from flags and/or a JSON input file, refused above EC2's
//! 16 KiB user-data limit, and written atomically with mode 0600 (they carry secrets).
//!
//! The templates are valid cloud-config themselves, so `cloud-init schema` checks the shipped
//! files as well as every rendering. Two kinds of placeholder keep them valid:
//! - a line whose text is `# @@NAME@@` (a YAML comment) is replaced by a generated block,
//!   indented like that line; an empty block removes the line;
//! - the double-quoted scalar `"@@NAME@@"` is replaced by a double-quoted YAML string.
//!
//! The template is scanned once, line by line, so text that came from the deployment (a
//! password that happens to read `# @@SECRET_FILES@@`) is never taken for a placeholder.
//!
//! The agent's configuration is written to `/etc/pilot/agent.yaml`, and carries no secret: the
//! endpoint token's SHA-256 goes to `/etc/pilot/endpoint-token.sha256`, which agent.yaml's
//! `endpoint.token_sha256_file` names (the section turns the agent's HTTPS endpoint on), and
//! the database admin password to `/etc/pilot/db-admin-password`, which
//! `database.admin_password_file` names.
//!
//! A runner-only host (`--role runner`) gets `role: runner` and a `server:` section instead of
//! `database:`: the server VM's endpoint, the SHA-256 pin of its CA, and the path of that
//! endpoint's bearer token, which is written to `/etc/pilot/server-token` (0600).

use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// EC2's limit on raw (not base64-encoded) user-data. GCE allows more, but one limit keeps a
/// rendered user-data usable on either cloud.
pub const USER_DATA_LIMIT: usize = 16 * 1024;
/// Where the agent reads its configuration by default.
pub const AGENT_CONFIG_PATH: &str = "/etc/pilot/agent.yaml";
/// The database admin password, named by `database.admin_password_file`.
pub const DB_ADMIN_PASSWORD_PATH: &str = "/etc/pilot/db-admin-password";
/// The SHA-256 (hex) of the endpoint's bearer token, named by `endpoint.token_sha256_file`.
pub const ENDPOINT_TOKEN_SHA256_PATH: &str = "/etc/pilot/endpoint-token.sha256";
/// The server VM's endpoint token on a runner-only host, named by `server.token_file`
/// (the agent's default, agent/src/config/server.rs DEFAULT_TOKEN_FILE).
pub const SERVER_TOKEN_PATH: &str = "/etc/pilot/server-token";
/// The agent's own bound on `waypoint.runners` (agent/src/config/waypoint.rs, MAX_RUNNERS).
pub const MAX_RUNNERS: u32 = 32;
/// PostgreSQL truncates longer names (NAMEDATALEN 64), which would log in as someone else.
const MAX_PG_NAME_BYTES: usize = 63;

const AWS_TEMPLATE: &str = include_str!("../../cloud-init/aws.yaml");
const GCP_TEMPLATE: &str = include_str!("../../cloud-init/gcp.yaml");
const STOCK_TEMPLATE: &str = include_str!("../../cloud-init/stock.yaml");

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

    /// The template text (the file `cloud-init/<name>.yaml`, embedded).
    pub fn template(self) -> &'static str {
        match self {
            Flavour::Aws => AWS_TEMPLATE,
            Flavour::Gcp => GCP_TEMPLATE,
            Flavour::Stock => STOCK_TEMPLATE,
        }
    }

    /// The template's path relative to the repository root.
    pub fn template_file(self) -> String {
        format!("cloud-init/{}.yaml", self.name())
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
    fn name(self) -> &'static str {
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
    /// SHA-256 of the endpoint's bearer token, 64 hex digits (the token never reaches the VM).
    #[arg(long)]
    pub endpoint_token_sha256: Option<String>,
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
    /// With --role runner: local file whose one line is the server VM's endpoint token; the
    /// VM gets it as /etc/pilot/server-token (0600).
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
        serde_json::from_str(&text).map_err(|source| UserDataError::ParseFrom {
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
            agent_deb_url: self.agent_deb_url.or(base.agent_deb_url),
            runners: self.runners.or(base.runners),
            extra_names: if self.extra_names.is_empty() {
                base.extra_names
            } else {
                self.extra_names
            },
            role: self.role.or(base.role),
            server_endpoint: self.server_endpoint.or(base.server_endpoint),
            server_ca_sha256: self.server_ca_sha256.or(base.server_ca_sha256),
            server_token_file: self.server_token_file.or(base.server_token_file),
            advertise_address: self.advertise_address.or(base.advertise_address),
            application_sources: if self.application_sources.is_empty() {
                base.application_sources
            } else {
                self.application_sources
            },
        }
    }

    /// Checks every value (naming the flag of the first bad one) and reads the password and
    /// token files.
    pub fn validate(self) -> Result<UserDataSpec, UserDataError> {
        let flavour = self.flavour.unwrap_or(Flavour::Aws);
        let role = self.role.unwrap_or_default();
        self.refuse_other_roles_flags(role)?;
        let database = self.database()?;
        let server = match role {
            Role::Server => None,
            Role::Runner => Some(self.server_link()?),
        };
        let advertise_address = self
            .advertise_address
            .as_deref()
            .map(|a| {
                if a == "auto" {
                    return Ok(a.to_owned());
                }
                check_host_port(a)
                    .map(|()| a.to_owned())
                    .or_else(|why| invalid("--advertise-address", format!("{why}, got {a:?}")))
            })
            .transpose()?;
        let application_sources = self
            .application_sources
            .iter()
            .map(|s| parse_cidr(s).or_else(|why| invalid("--application-sources", why)))
            .collect::<Result<Vec<_>, _>>()?;
        let endpoint_token_sha256 = self
            .endpoint_token_sha256
            .as_deref()
            .map(|h| {
                if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    Ok(h.to_ascii_lowercase())
                } else {
                    invalid(
                        "--endpoint-token-sha256",
                        format!(
                            "expected 64 hex digits (a SHA-256), got {} characters",
                            h.len()
                        ),
                    )
                }
            })
            .transpose()?;
        let agent_deb_url = match (flavour, self.agent_deb_url) {
            (Flavour::Stock, None) => {
                return invalid("--agent-deb-url", "required with --flavour stock");
            }
            (Flavour::Stock, Some(url)) => Some(check_url(url)?),
            (other, Some(_)) => {
                return invalid(
                    "--agent-deb-url",
                    format!(
                        "used only with --flavour stock (a {other} image is baked with the agent)"
                    ),
                );
            }
            (_, None) => None,
        };
        let runners = self.runners.unwrap_or(1);
        if runners > MAX_RUNNERS {
            return invalid(
                "--runners",
                format!("must be 0 to {MAX_RUNNERS}, got {runners}"),
            );
        }
        if runners == 0 && role == Role::Runner {
            return invalid(
                "--runners",
                "must be 1 or more with --role runner (a runner-only host without runners does nothing)",
            );
        }
        for name in &self.extra_names {
            if name.parse::<IpAddr>().is_err() && !is_dns_name(name) {
                return invalid(
                    "--extra-names",
                    format!("expected a DNS name or an IP address, got {name:?}"),
                );
            }
        }
        Ok(UserDataSpec {
            flavour,
            database,
            endpoint_token_sha256,
            agent_deb_url,
            runners,
            extra_names: self.extra_names,
            server,
            advertise_address,
            application_sources,
        })
    }

    /// A runner-only host has no database (the server VM provisions it) and no Waypoint server
    /// (nothing to advertise or admit); a server VM has no server VM to reach.
    fn refuse_other_roles_flags(&self, role: Role) -> Result<(), UserDataError> {
        let given: &[(&'static str, bool)] = match role {
            Role::Runner => &[
                ("--db-host", self.db_host.is_some()),
                ("--db-port", self.db_port.is_some()),
                ("--db-admin-user", self.db_admin_user.is_some()),
                (
                    "--db-admin-password-file",
                    self.db_admin_password_file.is_some(),
                ),
                ("--db-tls", self.db_tls.is_some()),
                ("--advertise-address", self.advertise_address.is_some()),
                (
                    "--application-sources",
                    !self.application_sources.is_empty(),
                ),
            ],
            Role::Server => &[
                ("--server-endpoint", self.server_endpoint.is_some()),
                ("--server-ca-sha256", self.server_ca_sha256.is_some()),
                ("--server-token-file", self.server_token_file.is_some()),
            ],
        };
        match (role, given.iter().find(|(_, g)| *g)) {
            (_, None) => Ok(()),
            (Role::Runner, Some((flag, _))) if flag.starts_with("--db-") => invalid(
                flag,
                "not used with --role runner: the server VM provisions the database",
            ),
            (Role::Runner, Some((flag, _))) => invalid(
                flag,
                "not used with --role runner: a runner-only host runs no Waypoint server \
                 (set it on the server VM)",
            ),
            (Role::Server, Some((flag, _))) => invalid(
                flag,
                "used only with --role runner (the server VM a runner-only host registers with)",
            ),
        }
    }

    /// `server:` of a runner-only host; every part is required.
    fn server_link(&self) -> Result<ServerLinkSpec, UserDataError> {
        let Some(endpoint) = &self.server_endpoint else {
            return invalid(
                "--server-endpoint",
                "required with --role runner: the server VM's pilot-agent endpoint, HOST[:PORT]",
            );
        };
        if let Err(why) = check_host_port(endpoint) {
            return invalid("--server-endpoint", format!("{why}, got {endpoint:?}"));
        }
        let Some(pin) = &self.server_ca_sha256 else {
            return invalid(
                "--server-ca-sha256",
                "required with --role runner: the SHA-256 fingerprint of the server VM's CA \
                 (`pilot-agent credentials` on the server VM prints it)",
            );
        };
        let ca_sha256 = normalize_fingerprint(pin).ok_or_else(|| UserDataError::Invalid {
            flag: "--server-ca-sha256",
            reason: format!(
                "expected a SHA-256 fingerprint: 64 hex digits, together or in 32 pairs \
                 separated by ':', got {pin:?}"
            ),
        })?;
        let Some(token_file) = &self.server_token_file else {
            return invalid(
                "--server-token-file",
                "required with --role runner: a file holding the server VM's endpoint token",
            );
        };
        let token = read_one_line_file("--server-token-file", token_file)?;
        // It travels in an HTTP Authorization header and the agent trims what it reads, so
        // only visible ASCII survives both unchanged.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return invalid(
                "--server-token-file",
                format!(
                    "{} must hold a token of visible ASCII characters without spaces",
                    token_file.display()
                ),
            );
        }
        Ok(ServerLinkSpec {
            endpoint: endpoint.clone(),
            ca_sha256,
            token,
        })
    }

    fn database(&self) -> Result<Option<DatabaseSpec>, UserDataError> {
        let Some(host) = &self.db_host else {
            if self.db_port.is_some()
                || self.db_admin_user.is_some()
                || self.db_admin_password_file.is_some()
                || self.db_tls.is_some()
            {
                return invalid("--db-host", "required when another --db-* flag is given");
            }
            return Ok(None);
        };
        if host.parse::<IpAddr>().is_err() && !is_dns_name(host) {
            return invalid(
                "--db-host",
                format!("expected a DNS name or an IP address, got {host:?}"),
            );
        }
        let port = self.db_port.unwrap_or(5432);
        let port = match u16::try_from(port) {
            Ok(p) if p > 0 => p,
            _ => return invalid("--db-port", format!("must be 1 to 65535, got {port}")),
        };
        let Some(admin_user) = &self.db_admin_user else {
            return invalid("--db-admin-user", "required with --db-host");
        };
        if admin_user.is_empty()
            || admin_user.len() > MAX_PG_NAME_BYTES
            || admin_user.chars().any(char::is_control)
        {
            return invalid(
                "--db-admin-user",
                format!(
                    "expected 1 to {MAX_PG_NAME_BYTES} bytes without control characters, got {admin_user:?}"
                ),
            );
        }
        let admin_password = self
            .db_admin_password_file
            .as_deref()
            .map(read_password_file)
            .transpose()?;
        Ok(Some(DatabaseSpec {
            host: host.clone(),
            port,
            admin_user: admin_user.clone(),
            admin_password,
            tls: self.db_tls.unwrap_or_default(),
        }))
    }
}

/// A checked input, ready to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDataSpec {
    pub flavour: Flavour,
    pub database: Option<DatabaseSpec>,
    /// Lowercase hex.
    pub endpoint_token_sha256: Option<String>,
    /// Only for [`Flavour::Stock`].
    pub agent_deb_url: Option<String>,
    pub runners: u32,
    pub extra_names: Vec<String>,
    /// `Some` exactly for a runner-only host (`role: runner`).
    pub server: Option<ServerLinkSpec>,
    /// `waypoint.advertise_address` (server only): `auto` or `HOST[:PORT]` as given.
    pub advertise_address: Option<String>,
    /// `waypoint.application_sources` (server only), in canonical `ADDR/LEN` form.
    pub application_sources: Vec<String>,
}

/// The `server:` section of a runner-only host and the server VM's endpoint token.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerLinkSpec {
    /// `HOST[:PORT]` as given.
    pub endpoint: String,
    /// Uppercase hex pairs separated by `:`, as `openssl x509 -fingerprint -sha256` prints.
    pub ca_sha256: String,
    /// One line of visible ASCII.
    pub token: String,
}

// By hand so that a `{:?}` never shows the token.
impl fmt::Debug for ServerLinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerLinkSpec")
            .field("endpoint", &self.endpoint)
            .field("ca_sha256", &self.ca_sha256)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The `database:` section and the admin password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseSpec {
    pub host: String,
    pub port: u16,
    pub admin_user: String,
    /// One line, no newline or NUL (what the agent's password file reader accepts).
    pub admin_password: Option<String>,
    pub tls: DbTls,
}

// By hand so that a `{:?}` in a log or a panic message never shows the password.
impl fmt::Debug for DatabaseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSpec")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("admin_user", &self.admin_user)
            .field(
                "admin_password",
                &self.admin_password.as_ref().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("{flag}: cannot read {path}: {source}")]
    ReadFlagFile {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--from: cannot read {path}: {source}")]
    ReadFrom {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "--from: {path} is not a valid input file (a JSON object with the flags' keys): {source}"
    )]
    ParseFrom {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "rendered user-data is {size} bytes, over EC2's user-data limit of {limit} bytes (16 KiB); \
         nothing written"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("template {template} has no single placeholder {placeholder} (a bug in the template)")]
    Template {
        template: String,
        placeholder: String,
    },
    #[error("cannot write user-data to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn invalid<T>(flag: &'static str, reason: impl Into<String>) -> Result<T, UserDataError> {
    Err(UserDataError::Invalid {
        flag,
        reason: reason.into(),
    })
}

fn read_password_file(path: &Path) -> Result<String, UserDataError> {
    read_one_line_file("--db-admin-password-file", path)
}

/// The same rules as the agent's password file reader (agent/src/database/secret.rs): UTF-8,
/// one trailing newline (or CRLF) dropped, not empty, no NUL or newline inside.
fn read_one_line_file(flag: &'static str, path: &Path) -> Result<String, UserDataError> {
    let bytes = std::fs::read(path).map_err(|source| UserDataError::ReadFlagFile {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let Ok(text) = String::from_utf8(bytes) else {
        return invalid(flag, format!("{} is not UTF-8", path.display()));
    };
    let line = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if line.is_empty() {
        return invalid(flag, format!("{} is empty", path.display()));
    }
    if line.contains(['\0', '\n']) {
        return invalid(
            flag,
            format!("{} must hold one line without NUL", path.display()),
        );
    }
    Ok(line.to_owned())
}

fn check_url(url: String) -> Result<String, UserDataError> {
    // HTTPS only: the package runs as root, so a tampered download would own the VM.
    let Some(rest) = url.strip_prefix("https://") else {
        return invalid(
            "--agent-deb-url",
            format!("expected an https:// URL, got {url:?}"),
        );
    };
    if rest.is_empty() || rest.starts_with('/') {
        return invalid("--agent-deb-url", format!("no host in {url:?}"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid(
            "--agent-deb-url",
            format!("must not contain spaces or control characters: {url:?}"),
        );
    }
    Ok(url)
}

/// RFC 1123 host name syntax, as the agent checks `host.extra_names`.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `HOST`, `HOST:PORT`, `IPV6` or `[IPV6]:PORT`, HOST an IP address or a DNS name: what the
/// agent accepts for `server.endpoint` and `waypoint.advertise_address` (both have a default
/// port). An unspecified address (0.0.0.0, ::) is refused: nobody can dial it.
fn check_host_port(s: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((host, tail)) = rest.split_once(']') else {
            return Err("an IPv6 address in brackets needs the closing `]`".into());
        };
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p),
            None if tail.is_empty() => None,
            None => return Err("expected `:PORT` after `]`".into()),
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "{host:?} between `[` and `]` is not an IPv6 address"
            ));
        }
        (host, port)
    } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
        // A bare IPv6 address: its colons are not a port separator.
        (s, None)
    } else {
        match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    if let Some(p) = port {
        if !matches!(p.parse::<u16>(), Ok(n) if n > 0) {
            return Err(format!("{p:?} is not a port (1-65535)"));
        }
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {
            Err("an unspecified address (0.0.0.0, ::) cannot be dialled".into())
        }
        Ok(_) => Ok(()),
        Err(_) if is_dns_name(host) => Ok(()),
        Err(_) => Err(format!(
            "expected HOST[:PORT] with HOST an IP address or a DNS name ({host:?} is neither)"
        )),
    }
}

/// A SHA-256 fingerprint as the agent reads `server.ca_sha256` (agent/src/remote/pin.rs): 64
/// hex digits together or in 32 colon-separated pairs, optionally after openssl's
/// `sha256 Fingerprint=`. Returns the uppercase colon form `openssl x509 -fingerprint` prints.
fn normalize_fingerprint(s: &str) -> Option<String> {
    const OPENSSL_PREFIX: &str = "sha256 fingerprint=";
    let s = match s.get(..OPENSSL_PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(OPENSSL_PREFIX) => &s[OPENSSL_PREFIX.len()..],
        _ => s,
    };
    let digits = if s.contains(':') {
        // Pairs: exactly 32 of 2 digits, so a digit lost in copying is caught, not shifted.
        let pairs: Vec<&str> = s.split(':').collect();
        if pairs.len() != 32 || pairs.iter().any(|p| p.len() != 2) {
            return None;
        }
        pairs.concat()
    } else {
        s.to_owned()
    };
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let upper = digits.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..32).map(|i| &upper[2 * i..2 * i + 2]).collect();
    Some(pairs.join(":"))
}

/// A network as the agent reads `waypoint.application_sources`: `ADDR/LEN` with no bits set
/// after the prefix, or a bare address (one host). Returns the canonical `ADDR/LEN`, so the
/// agent's parser never sees a spelling it might read differently.
fn parse_cidr(s: &str) -> Result<String, String> {
    let expected = || {
        format!(
            "expected a network in CIDR notation (e.g. 198.51.100.0/24) or an IP address, got {s:?}"
        )
    };
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| expected())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        // Digits only: u8's parser would take a leading `+`.
        Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => {
            match l.parse::<u32>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("prefix length of {s:?} must be 0 to {max}")),
            }
        }
        Some(_) => return Err(expected()),
    };
    let network = match ip {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    if network != ip {
        return Err(format!(
            "{s:?} has bits set after the prefix length; did you mean \"{network}/{len}\"?"
        ));
    }
    Ok(format!("{ip}/{len}"))
}

/// A YAML double-quoted scalar holding exactly `s`, in printable ASCII only: everything else
/// is escaped (`\n`, `\xXX`, `\uXXXX`, `\UXXXXXXXX`), so no input can end the scalar, start
/// a new key, or carry a character that cloud-init's YAML 1.1 reader rejects.
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        // `write!` into a String cannot fail.
        let _ = match c {
            '"' => out.write_str("\\\""),
            '\\' => out.write_str("\\\\"),
            '\n' => out.write_str("\\n"),
            '\t' => out.write_str("\\t"),
            ' '..='~' => out.write_char(c),
            c if u32::from(c) <= 0xff => write!(out, "\\x{:02x}", u32::from(c)),
            c if u32::from(c) <= 0xffff => write!(out, "\\u{:04x}", u32::from(c)),
            c => write!(out, "\\U{:08x}", u32::from(c)),
        };
    }
    out.push('"');
    out
}

/// The text of `/etc/pilot/agent.yaml`: only what the deployment decides; every other key keeps
/// the agent's default. Every string from the input is quoted by [`yaml_quote`].
pub fn agent_config(spec: &UserDataSpec) -> String {
    let mut s = format!(
        "# Written by cloud-init from `pilot-image user-data --flavour {}`.\n\
         # Keys not set here keep the agent's defaults; check with `pilot-agent config validate`.\n",
        spec.flavour
    );
    if spec.server.is_some() {
        s.push_str("role: runner\n");
    }
    if !spec.extra_names.is_empty() {
        s.push_str("host:\n  extra_names:\n");
        for name in &spec.extra_names {
            s.push_str(&format!("    - {}\n", yaml_quote(name)));
        }
    }
    s.push_str(&format!("waypoint:\n  runners: {}\n", spec.runners));
    if let Some(address) = &spec.advertise_address {
        s.push_str(&format!("  advertise_address: {}\n", yaml_quote(address)));
    }
    if !spec.application_sources.is_empty() {
        s.push_str("  application_sources:\n");
        for net in &spec.application_sources {
            s.push_str(&format!("    - {}\n", yaml_quote(net)));
        }
    }
    if let Some(db) = &spec.database {
        s.push_str(&format!(
            "database:\n  host: {}\n  port: {}\n  admin_user: {}\n",
            yaml_quote(&db.host),
            db.port,
            yaml_quote(&db.admin_user)
        ));
        if db.admin_password.is_some() {
            s.push_str(&format!(
                "  admin_password_file: {DB_ADMIN_PASSWORD_PATH}\n"
            ));
        }
        s.push_str(&format!("  tls: {}\n", db.tls.name()));
    }
    if let Some(server) = &spec.server {
        // The token in its own 0600 file (see `secret_files`), like the database password.
        s.push_str(&format!(
            "server:\n  endpoint: {}\n  token_file: {SERVER_TOKEN_PATH}\n  ca_sha256: {}\n",
            yaml_quote(&server.endpoint),
            yaml_quote(&server.ca_sha256)
        ));
    }
    if spec.endpoint_token_sha256.is_some() {
        // The hash in its own 0600 file (see `secret_files`), not inline: agent.yaml stays
        // free of anything that helps an attacker.
        s.push_str(&format!(
            "endpoint:\n  token_sha256_file: {ENDPOINT_TOKEN_SHA256_PATH}\n"
        ));
    }
    s
}

/// The `write_files` entries for the secrets (empty when there are none).
fn secret_files(spec: &UserDataSpec) -> String {
    let entry = |path: &str, content: &str| {
        format!(
            "- path: {path}\n  owner: root:root\n  permissions: '0600'\n  content: {}\n",
            yaml_quote(&format!("{content}\n"))
        )
    };
    let mut s = String::new();
    if let Some(password) = spec
        .database
        .as_ref()
        .and_then(|d| d.admin_password.as_deref())
    {
        s.push_str(&entry(DB_ADMIN_PASSWORD_PATH, password));
    }
    if let Some(server) = &spec.server {
        s.push_str(&entry(SERVER_TOKEN_PATH, &server.token));
    }
    if let Some(hash) = &spec.endpoint_token_sha256 {
        s.push_str(&entry(ENDPOINT_TOKEN_SHA256_PATH, hash));
    }
    s
}

/// Renders the user-data for `spec`, refusing it above [`USER_DATA_LIMIT`] bytes.
pub fn render(spec: &UserDataSpec) -> Result<String, UserDataError> {
    let blocks = [
        ("AGENT_CONFIG", agent_config(spec)),
        ("SECRET_FILES", secret_files(spec)),
    ];
    let scalars: Vec<(&str, String)> = spec
        .agent_deb_url
        .iter()
        .map(|url| ("AGENT_DEB_URL", yaml_quote(url)))
        .collect();
    let text = fill(spec.flavour, &blocks, &scalars)?;
    if text.len() > USER_DATA_LIMIT {
        return Err(UserDataError::TooLarge {
            size: text.len(),
            limit: USER_DATA_LIMIT,
        });
    }
    Ok(text)
}

/// One pass over the template (see the module doc); every placeholder asked for must be there
/// exactly once.
fn fill(
    flavour: Flavour,
    blocks: &[(&str, String)],
    scalars: &[(&str, String)],
) -> Result<String, UserDataError> {
    let template = flavour.template();
    let block_markers: Vec<String> = blocks.iter().map(|(n, _)| format!("# @@{n}@@")).collect();
    let scalar_markers: Vec<String> = scalars
        .iter()
        .map(|(n, _)| format!("\"@@{n}@@\""))
        .collect();
    let mut uses = vec![0usize; blocks.len() + scalars.len()];
    let mut out = String::with_capacity(template.len() + 1024);
    for line in template.lines() {
        let text = line.trim_start();
        let indent = &line[..line.len() - text.len()];
        if let Some(i) = block_markers.iter().position(|m| text == m) {
            uses[i] += 1;
            for l in blocks[i].1.lines() {
                if !l.is_empty() {
                    out.push_str(indent);
                    out.push_str(l);
                }
                out.push('\n');
            }
            continue;
        }
        let mut line = line.to_owned();
        if let Some(j) = scalar_markers
            .iter()
            .position(|m| line.contains(m.as_str()))
        {
            uses[blocks.len() + j] += line.matches(scalar_markers[j].as_str()).count();
            line = line.replace(scalar_markers[j].as_str(), &scalars[j].1);
        }
        out.push_str(&line);
        out.push('\n');
    }
    let names = blocks.iter().chain(scalars).map(|(n, _)| *n);
    for (name, used) in names.zip(uses) {
        if used != 1 {
            return Err(UserDataError::Template {
                template: flavour.template_file(),
                placeholder: name.to_owned(),
            });
        }
    }
    Ok(out)
}

/// Writes `text` to `path` atomically (temp file in the same directory, fsync, rename, fsync
/// of the directory), mode 0600: a crash leaves the old file or the new one, never half of it.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), UserDataError> {
    let err = |source| UserDataError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".user-data.")
        .tempfile_in(dir)
        .map_err(err)?;
    // tempfile already makes it 0600; say so explicitly, the file carries secrets.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    tmp.write_all(text.as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(flavour: Flavour) -> UserDataSpec {
        UserDataSpec {
            flavour,
            database: Some(DatabaseSpec {
                host: "db.example.internal".into(),
                port: 5432,
                admin_user: "pilot_admin".into(),
                admin_password: Some("s3cret".into()),
                tls: DbTls::Require,
            }),
            endpoint_token_sha256: Some("ab".repeat(32)),
            agent_deb_url: (flavour == Flavour::Stock)
                .then(|| "https://example.com/pilot-agent.deb".into()),
            runners: 2,
            extra_names: vec!["pilot.example.com".into()],
            server: None,
            advertise_address: Some("pilot.example.com:19701".into()),
            application_sources: vec!["198.51.100.0/24".into(), "2001:db8::/32".into()],
        }
    }

    fn runner_spec(flavour: Flavour) -> UserDataSpec {
        UserDataSpec {
            database: None,
            server: Some(ServerLinkSpec {
                endpoint: "10.0.1.5:8443".into(),
                ca_sha256: normalize_fingerprint(&"3f".repeat(32)).unwrap(),
                token: "srv-t0ken".into(),
            }),
            advertise_address: None,
            application_sources: Vec::new(),
            ..spec(flavour)
        }
    }

    fn parse(text: &str) -> saphyr::Yaml<'_> {
        use saphyr::LoadableYamlNode;
        let mut docs = saphyr::Yaml::load_from_str(text).expect("valid YAML");
        assert_eq!(docs.len(), 1);
        docs.remove(0)
    }

    #[test]
    fn yaml_quote_round_trips_hostile_strings() {
        for s in [
            "",
            "plain",
            "quote\" back\\slash",
            "new\nline\ttab\r",
            "# @@SECRET_FILES@@",
            "key: value\n- item",
            "\u{0}\u{7f}\u{85}\u{a0}é\u{feff}€𝄞",
            "'single' {flow} [seq] &anchor *alias !tag %dir @at `tick`",
        ] {
            let q = yaml_quote(s);
            assert!(q.bytes().all(|b| (b' '..=b'~').contains(&b)), "{q}");
            let doc = format!("k: {q}\n");
            let y = parse(&doc);
            assert_eq!(y["k"].as_str(), Some(s), "round trip of {s:?} via {q}");
        }
    }

    #[test]
    fn every_flavour_fills_all_placeholders() {
        for f in Flavour::ALL {
            let text = render(&spec(f)).unwrap();
            assert!(text.starts_with("#cloud-config\n"), "{f}");
            for left in ["@@AGENT_CONFIG@@", "@@SECRET_FILES@@", "@@AGENT_DEB_URL@@"] {
                assert!(!text.contains(left), "{f}: {left} left:\n{text}");
            }
            let y = parse(&text);
            let files = y["write_files"].as_vec().unwrap();
            let paths: Vec<_> = files.iter().map(|e| e["path"].as_str().unwrap()).collect();
            assert_eq!(
                paths,
                [
                    AGENT_CONFIG_PATH,
                    DB_ADMIN_PASSWORD_PATH,
                    ENDPOINT_TOKEN_SHA256_PATH
                ]
            );
            for e in files {
                assert_eq!(e["permissions"].as_str(), Some("0600"));
            }
            assert_eq!(files[1]["content"].as_str(), Some("s3cret\n"));
            assert_eq!(
                files[0]["content"].as_str(),
                Some(agent_config(&spec(f)).as_str())
            );
        }
    }

    #[test]
    fn optional_parts_disappear() {
        let mut s = spec(Flavour::Aws);
        s.database = None;
        s.endpoint_token_sha256 = None;
        s.extra_names.clear();
        let text = render(&s).unwrap();
        let y = parse(&text);
        assert_eq!(y["write_files"].as_vec().unwrap().len(), 1);
        let config = agent_config(&s);
        assert!(!config.contains("database:") && !config.contains("host:"));
    }

    #[test]
    fn endpoint_section_names_the_hash_file_only_when_a_hash_is_given() {
        let s = spec(Flavour::Gcp);
        let config = agent_config(&s);
        let y = parse(&config);
        assert_eq!(
            y["endpoint"]["token_sha256_file"].as_str(),
            Some(ENDPOINT_TOKEN_SHA256_PATH)
        );
        // The hash itself stays in its 0600 file, out of agent.yaml.
        assert!(!config.contains(&"ab".repeat(32)), "{config}");
        let mut s = spec(Flavour::Gcp);
        s.endpoint_token_sha256 = None;
        assert!(!agent_config(&s).contains("endpoint"));
    }

    #[test]
    fn stock_url_is_quoted_into_runcmd() {
        let mut s = spec(Flavour::Stock);
        s.agent_deb_url = Some("https://example.com/a deb?x=\"1\"".into());
        let text = render(&s).unwrap();
        let y = parse(&text);
        let curl = &y["runcmd"].as_vec().unwrap()[0];
        let args = curl.as_vec().unwrap();
        assert_eq!(args.last().unwrap().as_str(), s.agent_deb_url.as_deref());
    }

    #[test]
    fn a_password_that_looks_like_a_placeholder_stays_data() {
        let mut s = spec(Flavour::Stock);
        if let Some(d) = s.database.as_mut() {
            d.admin_password = Some("# @@SECRET_FILES@@ \"@@AGENT_DEB_URL@@\"".into());
        }
        let text = render(&s).unwrap();
        let y = parse(&text);
        assert_eq!(
            y["write_files"][1]["content"].as_str(),
            Some("# @@SECRET_FILES@@ \"@@AGENT_DEB_URL@@\"\n")
        );
    }

    #[test]
    fn size_limit_is_inclusive_at_16384() {
        let mut s = spec(Flavour::Aws);
        let base = render(&s).unwrap().len();
        let pad = USER_DATA_LIMIT - base;
        if let Some(d) = s.database.as_mut() {
            d.admin_password = Some(format!("s3cret{}", "x".repeat(pad)));
        }
        assert_eq!(render(&s).unwrap().len(), USER_DATA_LIMIT);
        if let Some(d) = s.database.as_mut() {
            d.admin_password.as_mut().unwrap().push('x');
        }
        match render(&s) {
            Err(UserDataError::TooLarge { size, limit }) => {
                assert_eq!((size, limit), (USER_DATA_LIMIT + 1, USER_DATA_LIMIT));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    fn input() -> UserDataInput {
        UserDataInput {
            db_host: Some("10.0.0.5".into()),
            db_admin_user: Some("pilot_admin".into()),
            ..Default::default()
        }
    }

    fn flag_of(r: Result<UserDataSpec, UserDataError>) -> &'static str {
        match r {
            Err(UserDataError::Invalid { flag, .. }) => flag,
            Err(UserDataError::ReadFlagFile { flag, .. }) => flag,
            other => panic!("expected an invalid flag, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: Vec<(UserDataInput, &str)> = vec![
            (
                UserDataInput {
                    db_port: Some(0),
                    ..input()
                },
                "--db-port",
            ),
            (
                UserDataInput {
                    db_port: Some(65536),
                    ..input()
                },
                "--db-port",
            ),
            (
                UserDataInput {
                    db_host: Some(String::new()),
                    ..input()
                },
                "--db-host",
            ),
            (
                UserDataInput {
                    db_host: None,
                    ..input()
                },
                "--db-host",
            ),
            (
                UserDataInput {
                    db_admin_user: None,
                    ..input()
                },
                "--db-admin-user",
            ),
            (
                UserDataInput {
                    endpoint_token_sha256: Some("abc".into()),
                    ..input()
                },
                "--endpoint-token-sha256",
            ),
            (
                UserDataInput {
                    endpoint_token_sha256: Some("g".repeat(64)),
                    ..input()
                },
                "--endpoint-token-sha256",
            ),
            (
                UserDataInput {
                    flavour: Some(Flavour::Stock),
                    ..input()
                },
                "--agent-deb-url",
            ),
            (
                UserDataInput {
                    flavour: Some(Flavour::Stock),
                    agent_deb_url: Some("http://example.com/a.deb".into()),
                    ..input()
                },
                "--agent-deb-url",
            ),
            (
                UserDataInput {
                    agent_deb_url: Some("https://example.com/a.deb".into()),
                    ..input()
                },
                "--agent-deb-url",
            ),
            (
                UserDataInput {
                    runners: Some(33),
                    ..input()
                },
                "--runners",
            ),
            (
                UserDataInput {
                    extra_names: vec!["not a name".into()],
                    ..input()
                },
                "--extra-names",
            ),
            (
                UserDataInput {
                    db_admin_password_file: Some("/nonexistent/pw".into()),
                    ..input()
                },
                "--db-admin-password-file",
            ),
        ];
        for (i, want) in cases {
            let shown = format!("{i:?}");
            assert_eq!(flag_of(i.validate()), want, "{shown}");
        }
    }

    #[test]
    fn runner_renders_role_server_and_token_file_without_database() {
        for f in Flavour::ALL {
            let s = runner_spec(f);
            let text = render(&s).unwrap();
            let y = parse(&text);
            let files = y["write_files"].as_vec().unwrap();
            let paths: Vec<_> = files.iter().map(|e| e["path"].as_str().unwrap()).collect();
            assert_eq!(
                paths,
                [
                    AGENT_CONFIG_PATH,
                    SERVER_TOKEN_PATH,
                    ENDPOINT_TOKEN_SHA256_PATH
                ]
            );
            assert_eq!(files[1]["permissions"].as_str(), Some("0600"));
            assert_eq!(files[1]["content"].as_str(), Some("srv-t0ken\n"));
            let config = agent_config(&s);
            assert!(!config.contains("srv-t0ken"), "{config}");
            let c = parse(&config);
            assert_eq!(c["role"].as_str(), Some("runner"));
            assert_eq!(c["server"]["endpoint"].as_str(), Some("10.0.1.5:8443"));
            assert_eq!(c["server"]["token_file"].as_str(), Some(SERVER_TOKEN_PATH));
            let pin = ["3F"; 32].join(":");
            assert_eq!(c["server"]["ca_sha256"].as_str(), Some(pin.as_str()));
            assert!(c.as_mapping_get("database").is_none(), "{config}");
            assert_eq!(c["waypoint"]["runners"].as_integer(), Some(2));
            assert!(
                !config.contains("advertise_address") && !config.contains("application_sources")
            );
        }
    }

    #[test]
    fn server_renders_advertise_address_and_sources() {
        let config = agent_config(&spec(Flavour::Aws));
        let c = parse(&config);
        assert!(
            c.as_mapping_get("role").is_none() && c.as_mapping_get("server").is_none(),
            "{config}"
        );
        assert_eq!(
            c["waypoint"]["advertise_address"].as_str(),
            Some("pilot.example.com:19701")
        );
        let sources: Vec<_> = c["waypoint"]["application_sources"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(sources, ["198.51.100.0/24", "2001:db8::/32"]);
    }

    #[test]
    fn host_port_forms() {
        for ok in [
            "10.0.1.5",
            "10.0.1.5:8443",
            "pilot.example.com:1",
            "pilot.example.com.",
            "2001:db8::1",
            "[2001:db8::1]",
            "[2001:db8::1]:8443",
        ] {
            assert_eq!(check_host_port(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ":8443",
            "host:0",
            "host:65536",
            "host:",
            "host:x",
            "bad host",
            "0.0.0.0",
            "[::]:1",
            "[::1",
            "[::1]x",
            "[nothost]:1",
            "a:b:c",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fingerprint_forms() {
        let upper = ["AB"; 32].join(":");
        for ok in [
            "ab".repeat(32),
            "AB".repeat(32),
            ["ab"; 32].join(":"),
            format!("SHA256 Fingerprint={}", ["Ab"; 32].join(":")),
        ] {
            assert_eq!(
                normalize_fingerprint(&ok).as_deref(),
                Some(upper.as_str()),
                "{ok}"
            );
        }
        for bad in [
            String::new(),
            "ab".repeat(31),
            "ab".repeat(33),
            "gg".repeat(32),
            ["ab"; 31].join(":"),
            format!("{}:a:b", ["ab"; 31].join(":")),
            format!("{}:", "ab".repeat(32)),
            " ".to_owned() + &"ab".repeat(32),
        ] {
            assert_eq!(normalize_fingerprint(&bad), None, "{bad}");
        }
    }

    #[test]
    fn cidr_forms() {
        for (input, want) in [
            ("198.51.100.0/24", "198.51.100.0/24"),
            ("203.0.113.7", "203.0.113.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("2001:0db8:0::/48", "2001:db8::/48"),
            ("::1", "::1/128"),
        ] {
            assert_eq!(parse_cidr(input).as_deref(), Ok(want), "{input}");
        }
        for bad in [
            "",
            "/24",
            "198.51.100.0/",
            "198.51.100.0/33",
            "198.51.100.1/24",
            "198.51.100.0/+24",
            "198.51.100.0/ 24",
            "198.51.100.0/24/1",
            "2001:db8::/129",
            "2001:db8::1/64",
            "300.1.1.0/24",
            "example.com/24",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert!(
            parse_cidr("198.51.100.1/24")
                .unwrap_err()
                .contains("198.51.100.0/24")
        );
    }

    fn runner_input(dir: &Path) -> UserDataInput {
        let token = dir.join("token");
        std::fs::write(&token, "srv-t0ken\n").unwrap();
        UserDataInput {
            role: Some(Role::Runner),
            server_endpoint: Some("10.0.1.5".into()),
            server_ca_sha256: Some("3f".repeat(32)),
            server_token_file: Some(token),
            ..Default::default()
        }
    }

    #[test]
    fn runner_input_validates() {
        let dir = tempfile::tempdir().unwrap();
        let s = runner_input(dir.path()).validate().unwrap();
        let server = s.server.as_ref().unwrap();
        assert_eq!(server.token, "srv-t0ken");
        assert_eq!(server.ca_sha256, ["3F"; 32].join(":"));
        assert!(s.database.is_none());
        assert!(!format!("{s:?}").contains("srv-t0ken"));
    }

    #[test]
    fn role_flags_name_their_flag() {
        let dir = tempfile::tempdir().unwrap();
        let r = || runner_input(dir.path());
        let bad_token = dir.path().join("bad-token");
        std::fs::write(&bad_token, "two words\n").unwrap();
        let cases: Vec<(UserDataInput, &str)> = vec![
            (
                UserDataInput {
                    server_endpoint: None,
                    ..r()
                },
                "--server-endpoint",
            ),
            (
                UserDataInput {
                    server_endpoint: Some("0.0.0.0:8443".into()),
                    ..r()
                },
                "--server-endpoint",
            ),
            (
                UserDataInput {
                    server_ca_sha256: None,
                    ..r()
                },
                "--server-ca-sha256",
            ),
            (
                UserDataInput {
                    server_ca_sha256: Some("3f".repeat(31)),
                    ..r()
                },
                "--server-ca-sha256",
            ),
            (
                UserDataInput {
                    server_token_file: None,
                    ..r()
                },
                "--server-token-file",
            ),
            (
                UserDataInput {
                    server_token_file: Some("/nonexistent/t".into()),
                    ..r()
                },
                "--server-token-file",
            ),
            (
                UserDataInput {
                    server_token_file: Some(bad_token.clone()),
                    ..r()
                },
                "--server-token-file",
            ),
            (
                UserDataInput {
                    db_host: Some("db".into()),
                    ..r()
                },
                "--db-host",
            ),
            (
                UserDataInput {
                    db_tls: Some(DbTls::Disable),
                    ..r()
                },
                "--db-tls",
            ),
            (
                UserDataInput {
                    db_admin_password_file: Some("/x".into()),
                    ..r()
                },
                "--db-admin-password-file",
            ),
            (
                UserDataInput {
                    advertise_address: Some("auto".into()),
                    ..r()
                },
                "--advertise-address",
            ),
            (
                UserDataInput {
                    application_sources: vec!["10.0.0.0/8".into()],
                    ..r()
                },
                "--application-sources",
            ),
            (
                UserDataInput {
                    runners: Some(0),
                    ..r()
                },
                "--runners",
            ),
            (
                UserDataInput {
                    server_endpoint: Some("10.0.1.5".into()),
                    ..input()
                },
                "--server-endpoint",
            ),
            (
                UserDataInput {
                    server_ca_sha256: Some("3f".repeat(32)),
                    ..input()
                },
                "--server-ca-sha256",
            ),
            (
                UserDataInput {
                    server_token_file: Some(bad_token),
                    ..input()
                },
                "--server-token-file",
            ),
            (
                UserDataInput {
                    advertise_address: Some("0.0.0.0".into()),
                    ..input()
                },
                "--advertise-address",
            ),
            (
                UserDataInput {
                    application_sources: vec!["10.0.0.0/8".into(), "10.0.0.1/8".into()],
                    ..input()
                },
                "--application-sources",
            ),
        ];
        for (i, want) in cases {
            let shown = format!("{i:?}");
            assert_eq!(flag_of(i.validate()), want, "{shown}");
        }
        // Allowed: a runner host's own endpoint; a server's advertise `auto`.
        let ok = UserDataInput {
            endpoint_token_sha256: Some("ab".repeat(32)),
            ..r()
        };
        assert!(ok.validate().is_ok());
        let ok = UserDataInput {
            advertise_address: Some("auto".into()),
            application_sources: vec!["203.0.113.7".into()],
            ..input()
        };
        let s = ok.validate().unwrap();
        assert_eq!(s.application_sources, ["203.0.113.7/32"]);
    }

    #[test]
    fn password_file_follows_the_agents_rules() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        for (content, ok) in [
            (&b"pw\n"[..], Some("pw")),
            (b"pw\r\n", Some("pw")),
            (b"pw", Some("pw")),
            (b"\n", None),
            (b"", None),
            (b"a\nb\n", None),
            (b"a\0b", None),
            (b"\xff\xfe", None),
        ] {
            std::fs::write(&file, content).unwrap();
            let r = read_password_file(&file);
            assert_eq!(r.as_deref().ok(), ok, "{content:?}");
        }
    }

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

    #[test]
    fn debug_hides_the_password() {
        let s = spec(Flavour::Aws);
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn atomic_write_is_0600_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("user-data");
        std::fs::write(&out, "old").unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&out, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "new");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
