//! dockerd configured for mutual TLS, never plain TCP.
//!
//! Two converge steps use this module:
//! 1. [`ensure_config`]: merge the listener and TLS keys into `daemon.json`
//!    ([`daemon_config`]) and, under systemd, write the drop-in that clears the unit's
//!    `-H fd://` (dockerd refuses to start with hosts both on its command line and in
//!    `daemon.json`), plus one that moves the socket unit's listener off dockerd's socket
//!    path ([`socket_dropin_content`] says why).
//! 2. [`ensure_serving`]: restart dockerd through the [`service`] backend only when what it
//!    reads at start changed since it last came up healthy, or when it does not answer over
//!    TLS; then poll ([`ready`]) until it answers over mutual TLS.
//!
//! "What it reads at start" is a fingerprint of `daemon.json`, the drop-in and the server's
//! CA, certificate and key, recorded in `STATE_DIR/docker-applied` only after dockerd came up
//! with them. A run killed after writing a new certificate but before the restart therefore
//! restarts on the next run, even though no file changes then.

pub mod daemon_config;
pub mod ready;
pub mod restart;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::fsutil::{self, FsError, MODE_PUBLIC, MODE_PUBLIC_DIR, MODE_SECRET};
use crate::pki::PkiLayout;

pub use daemon_config::TlsSettings;
pub use ready::{DaemonInfo, TlsProbe};
pub use restart::ServiceManager;

/// Where the socket unit listens instead of dockerd's socket path. Nothing connects to it;
/// it exists because docker.service `Requires=` its socket unit.
pub const ACTIVATION_SOCKET: &str = "/run/pilot-agent-docker-activation.sock";
/// Name of the systemd drop-in files (for the service and for its socket unit).
pub const DROPIN_NAME: &str = "pilot-agent.conf";
/// Name of the fingerprint marker in the state directory.
pub const APPLIED_MARKER: &str = "docker-applied";

/// How long to wait for a dockerd that should already be serving (at boot it may still be
/// starting) before restarting it.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "{path} is not valid JSON ({source}); fix it: the agent does not overwrite a dockerd \
         configuration it cannot read"
    )]
    DaemonConfigInvalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} must hold a JSON object; fix it: the agent does not overwrite it")]
    DaemonConfigNotObject { path: PathBuf },
    #[error("restarting dockerd with `{command}` failed: {detail}")]
    Restart { command: String, detail: String },
    #[error(
        "dockerd did not answer over mutual TLS at {addr} within {:.1}s; last error: {last_error}",
        waited.as_secs_f64()
    )]
    NotReady {
        addr: SocketAddr,
        last_error: String,
        waited: Duration,
    },
}

/// Everything the two steps need, derived from the configuration.
#[derive(Debug, Clone)]
pub struct DockerPlan {
    pub daemon_config: PathBuf,
    pub settings: TlsSettings,
    /// The drop-in path and content (systemd only).
    pub dropin: Option<(PathBuf, String)>,
    /// The socket unit's drop-in path and content (systemd, unit named `*.service`).
    pub socket_dropin: Option<(PathBuf, String)>,
    pub service: ServiceManager,
    pub probe: TlsProbe,
    pub ready_timeout: Duration,
    pub applied_marker: PathBuf,
}

impl DockerPlan {
    pub fn from_config(config: &Config) -> Self {
        let pki = PkiLayout::new(config.pki_dir());
        let server = pki.server();
        let operator = pki.leaf("operator");
        let d = &config.docker;
        let service = ServiceManager::from(&d.service);
        let dropin = service.is_systemd().then(|| {
            (
                d.systemd_dropin_dir.join(DROPIN_NAME),
                dropin_content(&d.dockerd_path.to_string_lossy()),
            )
        });
        let socket_dropin = match &d.service {
            crate::config::ServiceConfig::Systemd { unit } => {
                restart::socket_unit(unit).map(|socket| {
                    // Beside the service's drop-in directory (/etc/systemd/system).
                    let units_dir = d
                        .systemd_dropin_dir
                        .parent()
                        .map(PathBuf::from)
                        .unwrap_or_default();
                    (
                        units_dir.join(format!("{socket}.d")).join(DROPIN_NAME),
                        socket_dropin_content(&d.socket.to_string_lossy()),
                    )
                })
            }
            crate::config::ServiceConfig::Command { .. } => None,
        };
        DockerPlan {
            daemon_config: d.daemon_config.clone(),
            settings: TlsSettings {
                hosts: vec![
                    format!("unix://{}", d.socket.display()),
                    format!("tcp://{}", d.tls_listen),
                ],
                ca: server.ca,
                cert: server.cert,
                key: server.key,
                live_restore: d.live_restore,
            },
            dropin,
            socket_dropin,
            service,
            probe: TlsProbe {
                addr: TlsProbe::connect_addr(d.tls_listen),
                ca: operator.ca,
                cert: operator.cert,
                key: operator.key,
            },
            ready_timeout: Duration::from_secs(d.ready_timeout_secs),
            applied_marker: config.state_dir.join(APPLIED_MARKER),
        }
    }
}

/// The systemd drop-in. `ExecStart=` empty first: a drop-in adds to a list otherwise.
/// `$DOCKER_OPTS` is left out on purpose: a `-H` there would conflict with `daemon.json`;
/// dockerd options belong in `daemon.json` on an agent-managed host.
pub fn dropin_content(dockerd: &str) -> String {
    format!(
        "# Written by pilot-agent. dockerd takes its listeners (`hosts`) from daemon.json;\n\
         # a -H flag here as well would make it refuse to start.\n\
         [Service]\n\
         ExecStart=\n\
         ExecStart={dockerd} --containerd=/run/containerd/containerd.sock\n"
    )
}

/// The socket unit's drop-in. dockerd must listen on its unix socket itself (`unix://` in
/// `hosts`): given the unit's socket (`fd://`) while TLS is on, dockerd wraps that one in TLS
/// as well. But the stock socket unit listens on the same path: dockerd then replaces the
/// file, the unit's listener is orphaned, and a client that connects while dockerd starts
/// (the unit's file is still there) waits in that listener's backlog forever; after a
/// restart, socket activation is gone too. docker.service `Requires=` its socket unit, so it
/// cannot be disabled or masked: it gets a path of its own that nothing uses.
pub fn socket_dropin_content(dockerd_socket: &str) -> String {
    format!(
        "# Written by pilot-agent. dockerd listens on {dockerd_socket} itself (daemon.json\n\
         # `hosts`); this unit keeps out of its way on a path nothing connects to.\n\
         [Socket]\n\
         ListenStream=\n\
         ListenStream={ACTIVATION_SOCKET}\n"
    )
}

/// What [`ensure_config`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigReport {
    pub daemon_config_changed: bool,
    pub dropin_changed: bool,
    pub socket_dropin_changed: bool,
}

/// Step 1: `daemon.json` and the drop-in.
pub fn ensure_config(plan: &DockerPlan) -> Result<ConfigReport, DockerError> {
    let daemon_config_changed = daemon_config::ensure(&plan.daemon_config, &plan.settings)?;
    let write_dropin = |dropin: &Option<(PathBuf, String)>| -> Result<bool, DockerError> {
        let Some((path, content)) = dropin else {
            return Ok(false);
        };
        if let Some(dir) = path.parent() {
            fsutil::ensure_dir(dir, MODE_PUBLIC_DIR)?;
        }
        Ok(fsutil::write_atomic(path, content.as_bytes(), MODE_PUBLIC)?.changed())
    };
    let dropin_changed = write_dropin(&plan.dropin)?;
    let socket_dropin_changed = write_dropin(&plan.socket_dropin)?;
    Ok(ConfigReport {
        daemon_config_changed,
        dropin_changed,
        socket_dropin_changed,
    })
}

/// What [`ensure_serving`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingReport {
    /// Why dockerd was restarted, if it was.
    pub restarted: Option<String>,
    pub info: DaemonInfo,
    /// How long the readiness wait took (after the restart command returned).
    pub waited: Duration,
    pub addr: SocketAddr,
}

impl ServingReport {
    pub fn summary(&self) -> String {
        let serving = format!(
            "dockerd {} (API {}) serves mutual TLS at {}",
            self.info.version, self.info.api_version, self.addr
        );
        match &self.restarted {
            Some(reason) => format!(
                "restarted dockerd ({reason}); {serving}, ready {:.2}s after the restart",
                self.waited.as_secs_f64()
            ),
            None => serving,
        }
    }
}

/// Step 2: dockerd serving what [`ensure_config`] and the PKI wrote.
pub async fn ensure_serving(plan: &DockerPlan) -> Result<ServingReport, DockerError> {
    let fingerprint = fingerprint(plan)?;
    let recorded = fsutil::read_optional(&plan.applied_marker)?;
    let reason = if recorded.as_deref() == Some(fingerprint.as_bytes()) {
        match ready::wait_ready(&plan.probe, GRACE.min(plan.ready_timeout)).await {
            Ok((info, waited)) => {
                return Ok(ServingReport {
                    restarted: None,
                    info,
                    waited,
                    addr: plan.probe.addr,
                });
            }
            Err(DockerError::NotReady { last_error, .. }) => {
                format!("not answering over TLS: {last_error}")
            }
            Err(e) => return Err(e),
        }
    } else if recorded.is_none() {
        "first configuration".to_string()
    } else {
        "its configuration or certificate changed".to_string()
    };

    tracing::info!(reason, "restarting dockerd");
    plan.service.restart_docker(plan.ready_timeout).await?;
    let (info, waited) = match ready::wait_ready(&plan.probe, plan.ready_timeout).await {
        Ok(r) => r,
        Err(DockerError::NotReady {
            addr,
            last_error,
            waited,
        }) => {
            // The unit's state says more than a refused connection (failed, restarting).
            let last_error = match plan.service.describe().await {
                Some(state) => format!("{last_error}; {state}"),
                None => last_error,
            };
            return Err(DockerError::NotReady {
                addr,
                last_error,
                waited,
            });
        }
        Err(e) => return Err(e),
    };
    // Recorded only now: a run killed before this point restarts again next time.
    fsutil::write_atomic(&plan.applied_marker, fingerprint.as_bytes(), MODE_SECRET)?;
    Ok(ServingReport {
        restarted: Some(reason),
        info,
        waited,
        addr: plan.probe.addr,
    })
}

/// Digest of the files dockerd reads when it starts.
fn fingerprint(plan: &DockerPlan) -> Result<String, DockerError> {
    let mut files = vec![plan.daemon_config.clone()];
    for (path, _) in plan.dropin.iter().chain(&plan.socket_dropin) {
        files.push(path.clone());
    }
    files.extend([
        plan.settings.ca.clone(),
        plan.settings.cert.clone(),
        plan.settings.key.clone(),
    ]);
    let mut h = Sha256::new();
    for f in &files {
        h.update(f.as_os_str().as_encoded_bytes());
        h.update([0]);
        match fsutil::read_optional(f)? {
            Some(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            None => h.update(b"absent"),
        }
    }
    let mut hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex.push('\n');
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_from_config() {
        let mut c = Config {
            state_dir: "/srv/state".into(),
            ..Config::default()
        };
        let p = DockerPlan::from_config(&c);
        assert_eq!(
            p.settings.hosts,
            vec!["unix:///var/run/docker.sock", "tcp://0.0.0.0:2376"]
        );
        assert_eq!(
            p.settings.cert,
            PathBuf::from("/srv/state/pki/server/cert.pem")
        );
        assert_eq!(p.probe.addr, "127.0.0.1:2376".parse().unwrap());
        assert_eq!(
            p.probe.key,
            PathBuf::from("/srv/state/pki/operator/key.pem")
        );
        let (path, content) = p.dropin.unwrap();
        assert_eq!(
            path,
            PathBuf::from("/etc/systemd/system/docker.service.d/pilot-agent.conf")
        );
        assert!(content.contains("\nExecStart=\nExecStart=/usr/sbin/dockerd --containerd="));
        let exec = content.lines().last().unwrap();
        assert!(!exec.contains("-H"), "{exec}");
        assert_eq!(p.applied_marker, PathBuf::from("/srv/state/docker-applied"));
        let (path, content) = p.socket_dropin.unwrap();
        assert_eq!(
            path,
            PathBuf::from("/etc/systemd/system/docker.socket.d/pilot-agent.conf")
        );
        assert!(
            content.contains(
                "\nListenStream=\nListenStream=/run/pilot-agent-docker-activation.sock\n"
            ),
            "{content}"
        );

        c.docker.service = crate::config::ServiceConfig::Command {
            restart_command: vec!["/bin/true".into()],
        };
        assert!(DockerPlan::from_config(&c).dropin.is_none());
        assert!(DockerPlan::from_config(&c).socket_dropin.is_none());
    }

    #[test]
    fn fingerprint_follows_every_file_dockerd_reads() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config {
            state_dir: dir.path().join("state"),
            ..Config::default()
        };
        c.docker.daemon_config = dir.path().join("daemon.json");
        c.docker.systemd_dropin_dir = dir.path().join("dropin");
        let p = DockerPlan::from_config(&c);
        let a = fingerprint(&p).unwrap();
        ensure_config(&p).unwrap();
        let b = fingerprint(&p).unwrap();
        assert_ne!(a, b);
        assert_eq!(b, fingerprint(&p).unwrap(), "stable");
        std::fs::create_dir_all(p.settings.cert.parent().unwrap()).unwrap();
        std::fs::write(&p.settings.cert, "new cert").unwrap();
        assert_ne!(fingerprint(&p).unwrap(), b);
    }

    #[test]
    fn config_step_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.docker.daemon_config = dir.path().join("etc/docker/daemon.json");
        c.docker.systemd_dropin_dir = dir.path().join("docker.service.d");
        let p = DockerPlan::from_config(&c);
        assert_eq!(
            ensure_config(&p).unwrap(),
            ConfigReport {
                daemon_config_changed: true,
                dropin_changed: true,
                socket_dropin_changed: true
            }
        );
        assert_eq!(
            ensure_config(&p).unwrap(),
            ConfigReport {
                daemon_config_changed: false,
                dropin_changed: false,
                socket_dropin_changed: false
            }
        );
    }
}
