//! Waypoint's own backup and restore, driven as its documentation says
//! (`website/content/docs/server/run/maintenance.mdx` at v0.11.4):
//! - `waypoint server snapshot -` writes a consistent snapshot of the running server to stdout
//!   (`internal/cli/snapshot_backup.go`; a FILE argument is opened without write access in
//!   0.11.4, so only stdout works);
//! - `waypoint server restore -exit -` stages a snapshot read from stdin; the server applies it
//!   at its next start, and `-exit` makes it exit so that its restart policy restarts it
//!   (`internal/cli/snapshot_restore.go`).
//!
//! Both run in the server container against its own loopback with the bootstrap token, like
//! the agent's other server commands ([`super::server_cli`]). The snapshot holds the server's
//! token-signing key: it never goes to a log or an error.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bollard::Docker;

use super::containers::{self, ExecBytes};
use super::{HTTP_PORT, SERVER_NAME, WaypointError, WaypointPlan, ready, server_command};

/// How long a snapshot or a restore may take (a server with thousands of deployments has a
/// database of tens of megabytes).
pub const LIMIT: Duration = Duration::from_secs(300);

/// Runs `waypoint ARGS` in the server container with the bootstrap token, bytes in and out.
async fn server_cli_bytes(
    docker: &Docker,
    plan: &WaypointPlan,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<ExecBytes, WaypointError> {
    let (argv, env) = server_command(docker, plan, args).await?;
    containers::exec_bytes(docker, SERVER_NAME, &argv, &env, stdin, LIMIT).await
}

/// The failure of a snapshot command: its exit status and stderr (Waypoint prints its errors
/// there for these two commands). Never stdout, which is the snapshot itself.
fn failed(command: &str, out: &ExecBytes) -> WaypointError {
    WaypointError::Command {
        container: SERVER_NAME.into(),
        command: command.into(),
        status: out
            .exit_code
            .map_or("no exit code".into(), |c| format!("exit {c}")),
        output: out.stderr.trim().chars().take(500).collect(),
    }
}

/// A snapshot of the running server.
pub async fn take(docker: &Docker, plan: &WaypointPlan) -> Result<Vec<u8>, WaypointError> {
    let out = server_cli_bytes(docker, plan, &["server", "snapshot", "-"], None).await?;
    if out.exit_code != Some(0) {
        return Err(failed("waypoint server snapshot -", &out));
    }
    if out.stdout.is_empty() {
        return Err(WaypointError::Conflict(
            "waypoint server snapshot printed nothing".into(),
        ));
    }
    Ok(out.stdout)
}

/// Stages `snapshot` on the running server and waits until the server has restarted with it
/// and answers again (at most `ready_timeout`); returns how long the server was away.
pub async fn restore(
    docker: &Docker,
    plan: &WaypointPlan,
    snapshot: &[u8],
    ready_timeout: Duration,
) -> Result<Duration, WaypointError> {
    let before = start_marker(docker).await?;
    let staged_at = Instant::now();
    let out = server_cli_bytes(
        docker,
        plan,
        &["server", "restore", "-exit", "-"],
        Some(snapshot),
    )
    .await?;
    if out.exit_code != Some(0) {
        return Err(failed("waypoint server restore -exit -", &out));
    }
    // The server exits once the snapshot is staged; dockerd restarts it (restart policy
    // unless-stopped) and the new process applies the staged data before it listens.
    let deadline = staged_at + ready_timeout;
    loop {
        let now = start_marker(docker).await?;
        if now != before && now.1 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(WaypointError::Timeout {
                what: format!("{SERVER_NAME}'s restart to apply the staged snapshot"),
                limit: ready_timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addr = address(docker, plan).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    ready::wait_ready(addr, left.max(Duration::from_secs(1))).await?;
    Ok(staged_at.elapsed())
}

/// The server container's start time and whether it runs: a restart changes the first.
async fn start_marker(docker: &Docker) -> Result<(String, bool), WaypointError> {
    let c = containers::inspect(docker, SERVER_NAME)
        .await?
        .ok_or_else(|| WaypointError::Conflict(format!("{SERVER_NAME} does not exist")))?;
    let state = c.state.unwrap_or_default();
    Ok((
        state.started_at.unwrap_or_default(),
        state.running.unwrap_or(false),
    ))
}

/// Where the server's HTTPS port answers on the Pilot network (as the server step probes it).
pub async fn address(docker: &Docker, plan: &WaypointPlan) -> Result<SocketAddr, WaypointError> {
    let c = containers::inspect(docker, SERVER_NAME)
        .await?
        .ok_or_else(|| WaypointError::Conflict(format!("{SERVER_NAME} does not exist")))?;
    containers::address_on(&c, &plan.config.network.name)
        .and_then(|ip| ip.parse().ok())
        .map(|ip| SocketAddr::new(ip, HTTP_PORT))
        .ok_or_else(|| {
            WaypointError::Conflict(format!(
                "{SERVER_NAME} has no address on network {}",
                plan.config.network.name
            ))
        })
}
