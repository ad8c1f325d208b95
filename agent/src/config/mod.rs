//! The agent's configuration: `/etc/pilot/agent.yaml` (or `--config`, `PILOT_AGENT_CONFIG`).
//!
//! Everything has a default except what only the deployment knows, and every path the agent
//! writes is configurable so that the test harness can point it into a simulated VM. Loading
//! checks the whole file and reports every problem with its line and column
//! ([`ConfigError::Invalid`]); nothing on the host is touched before a configuration loaded.
//!
//! Adding a section (as `waypoint:`, `database:` and `endpoint:` were added): write
//! `config/<section>.rs` with the typed struct, its `Default` and a `read` function like
//! [`docker::read`], add the key to [`TOP_LEVEL_KEYS`] and one line to [`Config::from_yaml`].

pub mod backup;
pub mod bounds;
pub mod cloud;
pub mod database;
pub mod docker;
pub mod endpoint;
pub mod firewall;
pub mod host;
pub mod pki;
pub mod schema;
pub mod server;
pub mod service;
pub mod waypoint;

use std::fmt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use saphyr::{LoadableYamlNode, MarkedYaml};

pub use backup::BackupConfig;
pub use cloud::CloudConfig;
pub use docker::{DockerConfig, ServiceConfig};
pub use endpoint::EndpointConfig;
pub use firewall::FirewallConfig;
pub use host::HostConfig;
pub use pki::PkiConfig;
pub use schema::Diagnostic;
use schema::Walker;
pub use server::{Deregister, Role, ServerLink};
pub use service::ServiceSettings;
pub use waypoint::{Advertise, WaypointConfig};

use crate::layout::StateLayout;
pub use database::DatabaseSettings;

/// Default location of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/pilot/agent.yaml";
/// Default state directory: keys, certificates, status.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pilot-agent";

/// The sections and keys allowed at the top of the file.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "state_dir",
    "role",
    "server",
    "host",
    "cloud",
    "pki",
    "docker",
    "firewall",
    "waypoint",
    "database",
    "endpoint",
    "service",
    "backup",
];

/// A loaded and fully checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the agent keeps its keys, certificates, status and markers.
    pub state_dir: PathBuf,
    /// Server VM (the default) or runner-only host.
    pub role: Role,
    /// How a runner-only host reaches the server VM; `Some` exactly when `role: runner`.
    pub server: Option<ServerLink>,
    pub host: HostConfig,
    /// Where the host's identity comes from (cloud metadata or the host).
    pub cloud: CloudConfig,
    pub pki: PkiConfig,
    pub docker: DockerConfig,
    pub firewall: FirewallConfig,
    /// The Waypoint server and runners; `None` (no `waypoint:` key): no containers managed.
    pub waypoint: Option<WaypointConfig>,
    /// The application database; `None` (no `database:` key): no database step.
    pub database: Option<DatabaseSettings>,
    /// The HTTPS endpoint of `run`; `None` (no `endpoint:` key): not served.
    pub endpoint: Option<EndpointConfig>,
    /// How `run` schedules its passes (defaults when there is no `service:` key).
    pub service: ServiceSettings,
    /// Scheduled backups of the Waypoint server; `None` (no `backup:` key): none scheduled.
    pub backup: Option<BackupConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", InvalidDisplay { path, diagnostics })]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

/// Renders `FILE:LINE:COL: message`, one per line, as compilers do (editors jump to them).
struct InvalidDisplay<'a> {
    path: &'a Path,
    diagnostics: &'a [Diagnostic],
}

impl fmt::Display for InvalidDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{d}", self.path.display())?;
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            role: Role::Server,
            server: None,
            host: HostConfig::default(),
            cloud: CloudConfig::default(),
            pki: PkiConfig::default(),
            docker: DockerConfig::default(),
            firewall: FirewallConfig::default(),
            waypoint: None,
            database: None,
            endpoint: None,
            service: ServiceSettings::default(),
            backup: None,
        }
    }
}

impl Config {
    /// Reads and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_yaml(&text).map_err(|diagnostics| ConfigError::Invalid {
            path: path.to_path_buf(),
            diagnostics,
        })
    }

    /// Checks a configuration given as YAML text; on failure returns every problem found,
    /// in file order.
    pub fn from_yaml(text: &str) -> Result<Config, Vec<Diagnostic>> {
        // Before the parser, whose recursion a deeply nested file would overflow.
        bounds::check(text).map_err(|d| vec![d])?;
        let mut w = Walker::default();
        let docs = match MarkedYaml::load_from_str(text) {
            Ok(docs) => docs,
            Err(e) => {
                // A syntax error stops the YAML parser; nothing after it can be trusted.
                w.error_at(e.marker(), format!("invalid YAML: {}", e.info()));
                return Err(w.diagnostics);
            }
        };
        if let Some(extra) = docs.get(1) {
            w.error(
                extra,
                "the configuration must be a single YAML document (found a second one)",
            );
        }
        let mut config = Config::default();
        if let Some(root) = docs.first() {
            config = read_root(&mut w, root);
        }
        if w.diagnostics.is_empty() {
            Ok(config)
        } else {
            w.diagnostics.sort_by_key(|d| (d.line, d.col));
            Err(w.diagnostics)
        }
    }

    /// The files under the state directory (the on-disk contract).
    pub fn state(&self) -> StateLayout {
        StateLayout::new(&self.state_dir)
    }

    /// The file that `pilot-agent status` reads.
    pub fn status_path(&self) -> PathBuf {
        self.state().status()
    }

    /// Where the CA, the server and the client certificates live.
    pub fn pki_dir(&self) -> PathBuf {
        self.state().pki().root().to_path_buf()
    }

    /// Sources allowed to reach Docker's TLS port besides loopback: the configured CIDRs, the
    /// Docker networks containers that use the API live on, and the Pilot network's subnet
    /// (the runners'), so the firewall admits exactly the path the runners take and nothing
    /// wider.
    pub fn docker_api_allowed_sources(&self) -> Vec<IpNet> {
        let mut all = self.firewall.docker_api_sources.clone();
        all.extend(self.firewall.docker_networks.iter().copied());
        if let Some(w) = &self.waypoint {
            if !all.contains(&w.subnet()) {
                all.push(w.subnet());
            }
        }
        all
    }
}

impl Config {
    /// The Waypoint server's published ports (gRPC, then HTTP, which serves the same API as
    /// grpc-web and `/v1/exec`) and who may reach them besides loopback, or `None` when this
    /// host runs no Waypoint server: the application sources, the operators (the Pilot CLI
    /// speaks to the same ports), and the container networks on this host (applications
    /// deployed here reach the advertised address through the host).
    pub fn waypoint_allowed_sources(&self) -> Option<(Vec<u16>, Vec<IpNet>)> {
        if self.role != Role::Server {
            return None;
        }
        let w = self.waypoint.as_ref()?;
        let mut all = w.application_sources.clone();
        for net in self.docker_api_allowed_sources() {
            if !all.contains(&net) {
                all.push(net);
            }
        }
        Some((vec![w.grpc_port, w.http_port], all))
    }
}

fn read_root(w: &mut Walker, root: &MarkedYaml<'_>) -> Config {
    let mut config = Config::default();
    let Some(fields) = w.mapping(root, "", TOP_LEVEL_KEYS) else {
        return config;
    };
    if let Some(dir) = fields.path(w, "state_dir") {
        config.state_dir = dir;
    }
    if let Some(node) = fields.get("host") {
        config.host = host::read(w, node);
    }
    if let Some(node) = fields.get("cloud") {
        config.cloud = cloud::read(w, node);
    }
    if let Some(node) = fields.get("pki") {
        config.pki = pki::read(w, node);
    }
    if let Some(node) = fields.get("docker") {
        config.docker = docker::read(w, node);
    }
    if let Some(node) = fields.get("firewall") {
        config.firewall = firewall::read(w, node);
    }
    // The key's presence turns Waypoint on, even with no value (`waypoint:`): every default.
    if let Some(node) = lookup(root, &["waypoint"]) {
        config.waypoint = Some(waypoint::read(w, node));
    }
    if let Some(node) = lookup(root, &["database"]) {
        config.database = database::read(w, node);
    }
    // Like `waypoint:`, the key's presence turns the endpoint on.
    if let Some(node) = lookup(root, &["endpoint"]) {
        config.endpoint = Some(endpoint::read(w, node));
    }
    if let Some(node) = fields.get("service") {
        config.service = service::read(w, node);
    }
    if let Some(node) = fields.get("role") {
        config.role = server::read_role(w, node);
    }
    read_role_sections(w, root, &mut config);
    // Like `waypoint:`, the key's presence turns scheduled backups on.
    if let Some(node) = lookup(root, &["backup"]) {
        let b = backup::read(w, node);
        if config.role != Role::Server || config.waypoint.is_none() {
            w.error(
                node,
                "backup: backs up this host's Waypoint server; it needs a `waypoint:` section \
                 on a server VM (not `role: runner`)",
            );
        }
        config.backup = Some(b);
    }

    // Locking the TLS port would cut the agent off from dockerd (and the runners with it).
    let tls_port = config.docker.tls_listen.port();
    if config.firewall.lock_ports.contains(&tls_port) {
        let at = lookup(root, &["firewall", "lock_ports"])
            .or_else(|| lookup(root, &["docker", "tls_listen"]))
            .unwrap_or(root);
        w.error(
            at,
            format!(
                "firewall.lock_ports must not contain docker.tls_listen's port {tls_port}: \
                 the TLS API would be locked out"
            ),
        );
    }
    if let Some(wp) = &config.waypoint {
        check_waypoint_ports(w, root, &config, wp);
    }
    let endpoint_at = lookup(root, &["endpoint", "listen"])
        .or_else(|| lookup(root, &["endpoint"]))
        .unwrap_or(root);
    endpoint::check_port(w, endpoint_at, &config);
    config
}

/// `server:` belongs to `role: runner` and is required there; a runner-only host runs runners
/// (its `waypoint:` defaults apply even without the key) and no database user.
fn read_role_sections(w: &mut Walker, root: &MarkedYaml<'_>, config: &mut Config) {
    let server_node = lookup(root, &["server"]);
    match (config.role, server_node) {
        (Role::Server, Some(n)) => w.error(
            n,
            "server: configures a runner-only host; add `role: runner` or remove it",
        ),
        (Role::Server, None) => {}
        (Role::Runner, None) => {
            let at = lookup(root, &["role"]).unwrap_or(root);
            w.error(
                at,
                "role: runner needs a `server:` section (endpoint, token_file, ca_sha256 of \
                 the server VM)",
            );
        }
        (Role::Runner, Some(n)) => {
            config.server = server::read(w, n);
            if config.waypoint.is_none() {
                config.waypoint = Some(WaypointConfig::default());
            }
            if let Some(db) = lookup(root, &["database"]) {
                w.error(
                    db,
                    "database: is provisioned by the server VM; a runner-only host (role: \
                     runner) has no database section",
                );
            }
        }
    }
}

/// Published Waypoint ports must not be ports the firewall locks or dockerd's TLS port.
fn check_waypoint_ports(
    w: &mut Walker,
    root: &MarkedYaml<'_>,
    config: &Config,
    wp: &WaypointConfig,
) {
    for (key, port) in [("grpc_port", wp.grpc_port), ("http_port", wp.http_port)] {
        let clash = if port == config.docker.tls_listen.port() {
            Some("docker.tls_listen's port")
        } else if config.firewall.lock_ports.contains(&port) {
            Some("a port in firewall.lock_ports")
        } else {
            None
        };
        if let Some(what) = clash {
            let at = lookup(root, &["waypoint", key])
                .or_else(|| lookup(root, &["waypoint"]))
                .unwrap_or(root);
            w.error(
                at,
                format!("waypoint.{key}: {port} is {what}; publish Waypoint on another port"),
            );
        }
    }
}

/// The node at a path of mapping keys, if every step exists.
fn lookup<'n, 'a>(root: &'n MarkedYaml<'a>, keys: &[&str]) -> Option<&'n MarkedYaml<'a>> {
    keys.iter()
        .try_fold(root, |node, key| node.data.as_mapping_get(key))
}

#[cfg(test)]
pub(crate) mod tests;
