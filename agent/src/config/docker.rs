//! `docker:` — where dockerd's configuration lives, where it listens and how it is restarted.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::schema::{self, Node, Walker};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    /// dockerd's unix socket; kept in `hosts` beside the TLS listener.
    pub socket: PathBuf,
    /// dockerd's configuration file; the agent merges its keys in and keeps all others.
    pub daemon_config: PathBuf,
    /// Where the systemd drop-in that clears `-H fd://` goes (systemd manager only).
    pub systemd_dropin_dir: PathBuf,
    /// The dockerd binary named in the drop-in's `ExecStart=`.
    pub dockerd_path: PathBuf,
    /// Address of the mutual-TLS listener.
    pub tls_listen: SocketAddr,
    /// How dockerd is restarted after its configuration or certificate changed.
    pub service: ServiceConfig,
    /// How long to wait for dockerd to answer over TLS after a restart.
    pub ready_timeout_secs: u64,
    /// dockerd's `live-restore`: containers keep running while dockerd restarts (a
    /// certificate rotation restarts it), so the Waypoint server and runners do not stop.
    pub live_restore: bool,
}

/// The service backend that restarts dockerd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceConfig {
    /// `systemctl daemon-reload` then `systemctl restart UNIT` (a real VM).
    Systemd { unit: String },
    /// Run this command (argv, no shell) to restart dockerd (the test harness).
    Command { restart_command: Vec<String> },
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            socket: PathBuf::from("/var/run/docker.sock"),
            daemon_config: PathBuf::from("/etc/docker/daemon.json"),
            systemd_dropin_dir: PathBuf::from("/etc/systemd/system/docker.service.d"),
            dockerd_path: PathBuf::from("/usr/sbin/dockerd"),
            tls_listen: SocketAddr::from(([0, 0, 0, 0], 2376)),
            service: ServiceConfig::Systemd {
                unit: "docker.service".into(),
            },
            ready_timeout_secs: 60,
            live_restore: true,
        }
    }
}

pub fn read(w: &mut Walker, node: &Node<'_>) -> DockerConfig {
    let mut c = DockerConfig::default();
    let Some(f) = w.mapping(
        node,
        "docker",
        &[
            "socket",
            "daemon_config",
            "systemd_dropin_dir",
            "dockerd_path",
            "tls_listen",
            "service",
            "ready_timeout_secs",
            "live_restore",
        ],
    ) else {
        return c;
    };
    if let Some(p) = f.path(w, "socket") {
        c.socket = p;
    }
    if let Some(p) = f.path(w, "daemon_config") {
        c.daemon_config = p;
    }
    if let Some(p) = f.path(w, "systemd_dropin_dir") {
        c.systemd_dropin_dir = p;
    }
    if let Some(p) = f.path(w, "dockerd_path") {
        c.dockerd_path = p;
    }
    if let Some(a) = f.socket_addr(w, "tls_listen") {
        c.tls_listen = a;
    }
    if let Some(s) = f.integer(w, "ready_timeout_secs", 1, 3600) {
        // Range-checked above.
        c.ready_timeout_secs = s as u64;
    }
    if let Some(b) = f.bool(w, "live_restore") {
        c.live_restore = b;
    }
    if let Some(n) = f.get("service") {
        if let Some(s) = read_service(w, n) {
            c.service = s;
        }
    }
    c
}

fn read_service(w: &mut Walker, node: &Node<'_>) -> Option<ServiceConfig> {
    let f = w.mapping(
        node,
        "docker.service",
        &["manager", "unit", "restart_command"],
    )?;
    let manager = f.choice(w, "manager", &["systemd", "command"]);
    let unit = f
        .get("unit")
        .and_then(|n| schema::non_empty_string(w, n, "docker.service.unit"));
    let command = f.list(w, "restart_command", schema::non_empty_string);
    match manager.as_deref().unwrap_or("systemd") {
        "systemd" => {
            if let Some(n) = f.get("restart_command") {
                w.error(
                    n,
                    "docker.service.restart_command is used only with `manager: command`",
                );
            }
            Some(ServiceConfig::Systemd {
                unit: unit.unwrap_or_else(|| "docker.service".into()),
            })
        }
        _ => {
            if let Some(n) = f.get("unit") {
                w.error(
                    n,
                    "docker.service.unit is used only with `manager: systemd`",
                );
            }
            match command {
                Some(argv) if !argv.is_empty() => Some(ServiceConfig::Command {
                    restart_command: argv,
                }),
                Some(_) => {
                    // Present but empty (or all items bad, which were reported already).
                    if let Some(n) = f.get("restart_command") {
                        w.error(n, "docker.service.restart_command must not be empty");
                    }
                    None
                }
                None => {
                    let at = f.get("manager").unwrap_or(node);
                    if f.get("restart_command").is_none() {
                        w.error(
                            at,
                            "docker.service.restart_command is required with `manager: command`",
                        );
                    }
                    None
                }
            }
        }
    }
}
