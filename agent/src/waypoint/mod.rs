//! The Waypoint server and its runners, as containers on the host's dockerd, driven through the
//! Docker API (bollard, over dockerd's unix socket, API version negotiated: Debian's dockerd
//! 20.10 speaks API 1.41) and never through the docker CLI.
//!
//! What the converge steps of [`crate::plan`] call, in order:
//! 1. [`images`]: the server and runner images present, loaded from the tarballs baked into the
//!    VM image when absent, pulled only when no tarball has them;
//! 2. [`network`]: the `pilot` bridge network (its gateway is how runners reach the host's
//!    Docker API over TLS) and the server's data volume;
//! 3. [`server`]: the `waypoint-server` container, then its readiness (HTTPS on 9702) polled
//!    with a deadline;
//! 4. [`bootstrap`]: the server bootstrapped exactly once, its token persisted (0600) before
//!    anything uses it;
//! 5. [`runners`]: `waypoint-runner-1..N`, each with its own runner token, and nothing beyond N.
//!
//! Every container carries the labels `io.pilot.managed=true`, `io.pilot.role` and
//! `io.pilot.spec-hash` (SHA-256 of its canonical [`spec::ContainerSpec`]), and has a fixed
//! name, so that dockerd itself guarantees there is never a second server: a create that
//! conflicts (a run killed after its create) inspects and adopts or replaces what it finds
//! ([`containers`]).

pub mod advertise;
pub mod bootstrap;
pub mod containers;
pub mod images;
pub mod link;
pub mod network;
pub mod ready;
pub mod runner_id;
pub mod runners;
pub mod server;
pub mod snapshot;
pub mod spec;
pub mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::{API_DEFAULT_VERSION, Docker};

use crate::config::{Config, WaypointConfig};
use crate::fsutil::FsError;
use crate::layout::WaypointFiles;

/// The server container's name (also its DNS name on the Pilot network).
pub const SERVER_NAME: &str = "waypoint-server";
/// The one-shot container that bootstraps the server (see [`bootstrap`]).
pub const BOOTSTRAP_NAME: &str = "waypoint-bootstrap";
/// The one-shot container that mints runner tokens on a runner-only host (there is no
/// server container there to run `waypoint runner token` in).
pub const MINT_NAME: &str = "waypoint-mint";
/// Runner containers are `waypoint-runner-1`, `-2`, ...
pub const RUNNER_PREFIX: &str = "waypoint-runner-";

/// Labels on everything the agent makes in Docker.
pub const LABEL_MANAGED: &str = "io.pilot.managed";
pub const LABEL_ROLE: &str = "io.pilot.role";
pub const LABEL_SPEC_HASH: &str = "io.pilot.spec-hash";

/// Waypoint's ports inside the server container.
pub const GRPC_PORT: u16 = 9701;
pub const HTTP_PORT: u16 = 9702;

/// Where the runner's client certificate is mounted in its container (`DOCKER_CERT_PATH`).
pub const RUNNER_CERT_PATH: &str = "/certs";

/// Deadline of one Docker API request. Long enough for loading a large image tarball, which is
/// one request; short enough that a hung dockerd does not hold `up` forever.
const API_TIMEOUT_SECS: u64 = 300;

/// A container's role, as its `io.pilot.role` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Bootstrap,
    Runner,
    Mint,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Bootstrap => "bootstrap",
            Role::Mint => "mint",
            Role::Runner => "runner",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("cannot reach dockerd at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("docker: cannot {context}")]
    Docker {
        context: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error(
        "image {image} is not present, no tarball in {dir} holds it{tried}, and pulling it \
         failed: {pull_error}; bake it into the VM image (`docker save {image} -o {dir}/NAME.tar`) \
         or make a registry that has it reachable"
    )]
    ImageUnavailable {
        image: String,
        dir: String,
        /// ` (looked at a.tar, b.tar)` or empty.
        tried: String,
        pull_error: String,
    },
    #[error("cannot read image tarball {path}")]
    Tarball {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Conflict(String),
    #[error(
        "the Waypoint server did not answer over HTTPS at {addr} within {:.1}s; last error: \
         {last_error}",
        waited.as_secs_f64()
    )]
    NotReady {
        addr: String,
        waited: Duration,
        last_error: String,
    },
    #[error("`{command}` in container {container} failed ({status}): {output}")]
    Command {
        container: String,
        command: String,
        status: String,
        output: String,
    },
    #[error(
        "the Waypoint server is already bootstrapped, but its token is not in {token_file}: a \
         Waypoint server hands out its bootstrap token only once, so the agent cannot get it \
         again and will not touch the server or its data. To recover, either (a) write a valid \
         Waypoint token (for example the one in an operator's Waypoint CLI context) to \
         {token_file} (mode 0600) and run `pilot-agent up` again; or (b) if losing Waypoint's \
         data (projects, deployments, config) is acceptable: stop the agent, run \
         `docker rm -f {server}` and `docker volume rm {volume}`, then `pilot-agent up` \
         bootstraps a fresh server. The agent never removes the volume itself."
    )]
    TokenLost {
        token_file: PathBuf,
        server: &'static str,
        volume: String,
    },
    #[error("the Waypoint server rejected the token in {token_file} ({detail}); {hint}")]
    TokenRejected {
        token_file: PathBuf,
        detail: String,
        hint: &'static str,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{what} did not finish within {}s", limit.as_secs())]
    Timeout { what: String, limit: Duration },
}

impl WaypointError {
    pub(crate) fn docker(context: impl Into<String>, source: bollard::errors::Error) -> Self {
        WaypointError::Docker {
            context: context.into(),
            source,
        }
    }
}

/// The HTTP status of a Docker API error answer, if it is one.
pub(crate) fn status_of(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

pub(crate) fn is_not_found(e: &bollard::errors::Error) -> bool {
    status_of(e) == Some(404)
}

/// Connects to dockerd's unix socket and negotiates the API version down to the daemon's.
/// `up` does this once and shares the client between its Waypoint steps (`plan::Ctx::docker`).
pub async fn connect(socket: &Path) -> Result<Docker, WaypointError> {
    let connect_error = |source| WaypointError::Connect {
        socket: socket.to_path_buf(),
        source,
    };
    let docker = Docker::connect_with_unix(
        &socket.to_string_lossy(),
        API_TIMEOUT_SECS,
        API_DEFAULT_VERSION,
    )
    .map_err(connect_error)?;
    docker.negotiate_version().await.map_err(connect_error)
}

/// Everything the Waypoint steps need, derived from the configuration once.
#[derive(Debug, Clone)]
pub struct WaypointPlan {
    pub config: WaypointConfig,
    /// dockerd's unix socket.
    pub socket: PathBuf,
    /// `STATE_DIR/waypoint`: the bootstrap and runner tokens (0600, directory 0700).
    pub tokens_dir: PathBuf,
    /// The runner's client certificate directory (docker CLI layout), mounted read-only.
    pub runner_cert_dir: PathBuf,
    /// The Waypoint server's certificate as the pki step issues it (`pki/waypoint`).
    pub server_leaf: crate::layout::LeafPaths,
    /// The host's Docker TLS port, which runners reach at the network's gateway.
    pub docker_tls_port: u16,
    /// Where the runners' server is.
    pub server: ServerRef,
    /// On a runner-only host: how to reach the server VM's endpoint, which mints each
    /// runner's token (`POST /v1/runner-token`).
    pub link: Option<crate::config::ServerLink>,
}

/// Where the runners find the Waypoint server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerRef {
    /// The `waypoint-server` container on this host, by name on the Pilot network.
    Local,
    /// The server of another Pilot VM (`role: runner`): its address is what the server VM's
    /// endpoint answered with the runner tokens it minted
    /// ([`WaypointPlan::remote_address_path`]). The host holds no token of that server
    /// but its runners' own.
    Remote,
}

impl WaypointPlan {
    /// `None` when the configuration has no `waypoint:` section.
    pub fn from_config(config: &Config) -> Option<Self> {
        let waypoint = config.waypoint.clone()?;
        Some(WaypointPlan {
            config: waypoint,
            socket: config.docker.socket.clone(),
            tokens_dir: config.state().waypoint().dir().to_path_buf(),
            runner_cert_dir: config.state().pki().leaf("runner").dir,
            server_leaf: config.state().pki().waypoint(),
            docker_tls_port: config.docker.tls_listen.port(),
            server: match config.role {
                crate::config::Role::Server => ServerRef::Local,
                crate::config::Role::Runner => ServerRef::Remote,
            },
            link: config.server.clone(),
        })
    }

    /// The address this host's server advertises, as last set (see [`advertise`]).
    pub fn advertise_marker_path(&self) -> PathBuf {
        WaypointFiles::new(&self.tokens_dir).advertise_address()
    }

    /// On a runner-only host: the server VM's Waypoint address (`HOST:PORT`).
    pub fn remote_address_path(&self) -> PathBuf {
        WaypointFiles::new(&self.tokens_dir).server_address()
    }

    /// Where earlier versions kept the server VM's Waypoint bootstrap token on a runner-only
    /// host. Nothing writes it now; the `server-link` step removes a leftover one.
    pub fn remote_token_path(&self) -> PathBuf {
        WaypointFiles::new(&self.tokens_dir).server_token()
    }

    /// The server's TLS files as its container reads them (see [`tls`]).
    pub fn server_tls_dir(&self) -> PathBuf {
        WaypointFiles::new(&self.tokens_dir).server_tls_dir()
    }

    /// On a runner-only host: the directory of the server VM's CA (see [`tls`]).
    pub fn server_ca_dir(&self) -> PathBuf {
        WaypointFiles::new(&self.tokens_dir).server_ca_dir()
    }

    /// The CA runners verify their Waypoint server with, as a path on the host and as the
    /// path their containers see (`SSL_CERT_FILE`): this host's CA (in the runner's client
    /// certificate directory, already mounted at `/certs`) or, on a runner-only host, the
    /// server VM's.
    pub fn runner_server_ca(&self) -> (PathBuf, String) {
        match self.server {
            ServerRef::Local => (
                self.runner_cert_dir.join("ca.pem"),
                format!("{RUNNER_CERT_PATH}/ca.pem"),
            ),
            ServerRef::Remote => (
                self.server_ca_dir().join("ca.pem"),
                format!("{}/ca.pem", tls::SERVER_CA_PATH),
            ),
        }
    }

    pub fn bootstrap_token_path(&self) -> PathBuf {
        WaypointFiles::new(&self.tokens_dir).bootstrap_token()
    }

    pub fn runner_token_path(&self, index: u32) -> PathBuf {
        WaypointFiles::new(&self.tokens_dir).runner_token(index)
    }

    /// `DOCKER_HOST` of the runners: the host's TLS port at the Pilot network's gateway.
    pub fn runner_docker_host(&self) -> String {
        format!(
            "tcp://{}:{}",
            self.config.network.gateway, self.docker_tls_port
        )
    }
}

/// What one Waypoint step did: whether anything changed, and the status detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub changed: bool,
    pub detail: String,
}

/// Step `images`: the server and runner images present.
pub async fn converge_images(
    docker: &Docker,
    plan: &WaypointPlan,
) -> Result<Report, WaypointError> {
    let c = &plan.config;
    // A runner-only host needs no server image.
    let mut wanted = vec![&c.runner_image];
    if plan.server == ServerRef::Local && c.server_image != c.runner_image {
        wanted.insert(0, &c.server_image);
    }
    let mut found = Vec::new();
    for image in wanted {
        found.push(images::ensure(docker, image, &c.images_dir).await?);
    }
    Ok(Report {
        changed: found.iter().any(|i| i.source != images::Source::Present),
        detail: found
            .iter()
            .map(images::Image::summary)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// Step `network`: the Pilot network and the server's data volume.
///
/// A volume that has to be created is empty: no token stored for an earlier server is valid
/// for the server that will start on it, so they are discarded first (before the create, so a
/// run killed in between discards again rather than keeping them).
pub async fn converge_network(
    docker: &Docker,
    plan: &WaypointPlan,
) -> Result<Report, WaypointError> {
    let c = &plan.config;
    let mut parts = Vec::new();
    let mut changed = false;
    match network::ensure_network(docker, &c.network).await? {
        network::NetworkAction::Unchanged => parts.push(format!(
            "network {} ({} gateway {}) in place",
            c.network.name, c.network.subnet, c.network.gateway
        )),
        network::NetworkAction::Created => {
            changed = true;
            parts.push(format!(
                "created network {} ({} gateway {})",
                c.network.name, c.network.subnet, c.network.gateway
            ));
        }
        network::NetworkAction::Rebuilt { removed } => {
            changed = true;
            parts.push(format!(
                "rebuilt network {} with {} gateway {} (removed {} to re-create them)",
                c.network.name,
                c.network.subnet,
                c.network.gateway,
                if removed.is_empty() {
                    "no containers".to_string()
                } else {
                    removed.join(", ")
                }
            ));
        }
    }
    if plan.server == ServerRef::Remote {
        // No server here, so no data volume.
    } else if network::volume_exists(docker, &c.volume).await? {
        parts.push(format!("volume {} in place", c.volume));
    } else {
        let discarded = discard_tokens(plan)?;
        network::ensure_volume(docker, &c.volume).await?;
        changed = true;
        parts.push(if discarded.is_empty() {
            format!("created volume {}", c.volume)
        } else {
            format!(
                "created volume {} (discarded the tokens of the server that used the old \
                 one: {})",
                c.volume,
                discarded.join(", ")
            )
        });
    }
    Ok(Report {
        changed,
        detail: parts.join("; "),
    })
}

/// Removes every stored Waypoint token; returns the names of the files removed.
fn discard_tokens(plan: &WaypointPlan) -> Result<Vec<String>, WaypointError> {
    let marker = plan.advertise_marker_path();
    // The advertise marker describes the old server too: the new one advertises nothing.
    let removed = discard_files(plan, |name, path| {
        name.ends_with("-token") || path == marker.as_path()
    })?;
    for name in &removed {
        tracing::warn!(
            file = name,
            "discarded a token of a server whose volume is gone"
        );
    }
    Ok(removed)
}

/// Removes the files of `STATE_DIR/waypoint` that `which(name, path)` picks; returns their
/// names, sorted. A missing directory holds nothing to remove.
pub(crate) fn discard_files(
    plan: &WaypointPlan,
    which: impl Fn(&str, &Path) -> bool,
) -> Result<Vec<String>, WaypointError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(&plan.tokens_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(source) => {
            return Err(FsError::new("list", &plan.tokens_dir, source).into());
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if which(&name, &entry.path()) && crate::fsutil::remove_if_exists(&entry.path())? {
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Step `waypoint-server`: the server container, ready.
pub async fn converge_server(
    docker: &Docker,
    plan: &WaypointPlan,
) -> Result<Report, WaypointError> {
    let r = server::ensure(docker, plan).await?;
    Ok(Report {
        changed: r.action.changed(),
        detail: r.summary(),
    })
}

/// Step `waypoint-bootstrap`: bootstrapped once, token on disk.
pub async fn converge_bootstrap(
    docker: &Docker,
    plan: &WaypointPlan,
) -> Result<Report, WaypointError> {
    let b = bootstrap::ensure(docker, plan).await?;
    Ok(Report {
        changed: b != bootstrap::Bootstrap::TokenOnDisk,
        detail: b.summary(plan),
    })
}

/// Step `waypoint-advertise`: the server advertises `address` to deployed applications.
pub async fn converge_advertise(
    docker: &Docker,
    plan: &WaypointPlan,
    address: &str,
) -> Result<Report, WaypointError> {
    advertise::ensure(docker, plan, address).await
}

/// Step `waypoint-runners`: runners 1..=N, nothing beyond.
pub async fn converge_runners(
    docker: &Docker,
    plan: &WaypointPlan,
    runner_id_prefix: &str,
) -> Result<Report, WaypointError> {
    let r = runners::ensure(docker, plan, runner_id_prefix).await?;
    Ok(Report {
        changed: r.changed(),
        detail: r.summary(),
    })
}

/// The environment of a Waypoint CLI command or runner against the server at `address`
/// (`HOST:PORT`) with `token`, verifying the server's certificate against the CA at `ca_file`
/// (a path inside the container): Go takes its roots from `SSL_CERT_FILE`, and Waypoint's
/// client verifies unless told to skip (see [`tls`]).
pub(crate) fn cli_env(address: &str, token: &str, ca_file: &str) -> Vec<String> {
    vec![
        format!("WAYPOINT_SERVER_ADDR={address}"),
        format!("WAYPOINT_SERVER_TOKEN={token}"),
        "WAYPOINT_SERVER_TLS=true".into(),
        "WAYPOINT_SERVER_TLS_SKIP_VERIFY=false".into(),
        format!("SSL_CERT_FILE={ca_file}"),
    ]
}

/// Runs `waypoint ARGS` in the server container against its own loopback, authenticated with
/// the bootstrap token.
pub(crate) async fn server_cli(
    docker: &Docker,
    plan: &WaypointPlan,
    args: &[&str],
    limit: Duration,
) -> Result<containers::ExecOutput, WaypointError> {
    let (argv, env) = server_command(docker, plan, args).await?;
    containers::exec(docker, SERVER_NAME, &argv, &env, limit).await
}

/// The command line and environment of `waypoint ARGS` in the server container, against its
/// own loopback (among the certificate's names) with the bootstrap token.
pub(crate) async fn server_command(
    docker: &Docker,
    plan: &WaypointPlan,
    args: &[&str],
) -> Result<(Vec<String>, Vec<String>), WaypointError> {
    let bootstrap_path = plan.bootstrap_token_path();
    let bootstrap = read_token(&bootstrap_path)?.ok_or_else(|| {
        WaypointError::Conflict(format!(
            "no Waypoint token in {} to run `waypoint {}` with (the waypoint-bootstrap step \
             stores it)",
            bootstrap_path.display(),
            args.join(" ")
        ))
    })?;
    let server = containers::inspect(docker, SERVER_NAME)
        .await?
        .ok_or_else(|| WaypointError::Conflict(format!("{SERVER_NAME} does not exist")))?;
    let mut argv = containers::entrypoint(&server);
    argv.extend(args.iter().map(|a| a.to_string()));
    let env = cli_env(
        &format!("127.0.0.1:{GRPC_PORT}"),
        &bootstrap,
        &format!("{}/ca.pem", tls::SERVER_TLS_PATH),
    );
    Ok((argv, env))
}

/// On a runner-only host: the server VM's Waypoint address, as stored when the server VM's
/// endpoint minted a runner token (or `server.waypoint_address`).
pub(crate) fn remote_server(plan: &WaypointPlan) -> Result<String, WaypointError> {
    read_token(&plan.remote_address_path())?.ok_or_else(|| {
        WaypointError::Conflict(format!(
            "{} is missing: it is stored when the server VM's endpoint mints a runner token",
            plan.remote_address_path().display()
        ))
    })
}

/// A token file's content: one line, no surrounding whitespace.
pub(crate) fn read_token(path: &Path) -> Result<Option<String>, WaypointError> {
    let Some(bytes) = crate::fsutil::read_optional(path)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    Ok((!text.is_empty()).then_some(text))
}

/// Persists a token: 0600 in a 0700 directory, written atomically (temp file, fsync, rename).
pub(crate) fn write_token(path: &Path, token: &str) -> Result<(), WaypointError> {
    if let Some(dir) = path.parent() {
        crate::fsutil::ensure_dir(dir, crate::fsutil::MODE_PRIVATE_DIR)?;
    }
    crate::fsutil::write_atomic(
        path,
        format!("{token}\n").as_bytes(),
        crate::fsutil::MODE_SECRET,
    )?;
    Ok(())
}

/// A token as a command printed it: the last non-empty line of its stdout, which must look
/// like a token (no spaces), so a changed CLI output is an error rather than a stored banner.
/// Public for the fuzz targets and tests.
pub fn token_from_output(stdout: &str) -> Option<String> {
    let line = stdout.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    (line.len() >= 16 && !line.contains(char::is_whitespace)).then(|| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_the_last_line_of_output() {
        assert_eq!(
            token_from_output("abcdefghijklmnopqrstuvwxyz0123\n").as_deref(),
            Some("abcdefghijklmnopqrstuvwxyz0123")
        );
        assert_eq!(
            token_from_output("Bootstrapping...\n\n  tok_0123456789abcdef  \n\n").as_deref(),
            Some("tok_0123456789abcdef")
        );
        assert_eq!(token_from_output(""), None);
        assert_eq!(token_from_output("server is already bootstrapped\n"), None);
        assert_eq!(token_from_output("short\n"), None);
    }

    #[test]
    fn token_files_are_private_and_read_back_trimmed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("waypoint/bootstrap-token");
        assert_eq!(read_token(&p).unwrap(), None);
        write_token(&p, "tok_0123456789abcdef").unwrap();
        assert_eq!(
            read_token(&p).unwrap().as_deref(),
            Some("tok_0123456789abcdef")
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
    }

    #[test]
    fn discarding_a_servers_tokens_keeps_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().to_path_buf(),
            waypoint: Some(WaypointConfig::default()),
            ..Config::default()
        };
        let plan = WaypointPlan::from_config(&config).unwrap();
        // Nothing stored yet: nothing to discard, no error.
        assert!(discard_tokens(&plan).unwrap().is_empty());
        for name in [
            "bootstrap-token",
            "runner-1-token",
            "runner-2-token",
            "notes",
        ] {
            write_token(&plan.tokens_dir.join(name), "x").unwrap();
        }
        write_token(&plan.advertise_marker_path(), "203.0.113.7:9701").unwrap();
        let runners = discard_files(&plan, |n, _| {
            n.starts_with("runner-") && n.ends_with("-token")
        })
        .unwrap();
        assert_eq!(runners, ["runner-1-token", "runner-2-token"]);
        assert_eq!(
            discard_tokens(&plan).unwrap(),
            ["advertise-address", "bootstrap-token"]
        );
        assert!(plan.tokens_dir.join("notes").exists());
    }
}
