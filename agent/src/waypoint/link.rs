//! A runner-only host's link to the server VM: the `server-link` step, and the mint of each
//! runner's token through the server VM's endpoint.
//!
//! The host holds one secret of the server VM's: its endpoint token (`server.token_file`),
//! which should be of scope `runner`. With it, the runners step asks the server VM to mint
//! one Waypoint token per runner (`POST /v1/runner-token`, [`mint_remote`]) and stores it
//! 0600 in `STATE_DIR/waypoint/runner-N-token`, and the Waypoint address that came with it
//! in `server-address`. The host never receives the server's bootstrap token or the
//! database password, so a compromised runner host can use its runners' tokens and mint
//! more of them (until its endpoint token is revoked), and nothing else.
//!
//! The `server-link` step, each pass:
//! - removes `STATE_DIR/waypoint/server-token`, the server's bootstrap token that earlier
//!   versions fetched and kept here (the runner tokens minted with it stay valid);
//! - stores `server.waypoint_address` when it is set (it overrides the minted address);
//! - checks that the server VM is there and is the pinned one (`GET /healthz`, no token).
//!   Unreachable, timed out: `degraded`; the runners keep running on their stored tokens and
//!   the service retries with backoff. A CA that does not match the pin: an error, since
//!   retrying does not fix it.

use std::time::Duration;

use pilot_values::Secret;

use super::runner_id::{self, RunnerId};
use super::{WaypointError, WaypointPlan, read_token, write_token};
use crate::config::ServerLink;
use crate::remote::{self, RemoteError};

/// Where the link stands after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// The server VM answered and nothing stored changed.
    Current(String),
    /// The server VM answered and what is stored changed (the detail says what).
    Changed(String),
    /// The server VM could not be reached now; what was stored before stays in use.
    Unreachable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "{} is missing or empty: it must hold the server VM's endpoint token of scope \
         `runner` (one line, mode 0600)", .0.display()
    )]
    NoToken(std::path::PathBuf),
    /// A wrong pin, a refused token: retrying does not help.
    #[error(transparent)]
    Refused(RemoteError),
    #[error(transparent)]
    Waypoint(#[from] WaypointError),
}

fn endpoint_token(link: &ServerLink) -> Result<Secret, LinkError> {
    match read_token(&link.token_file)? {
        Some(t) => Ok(Secret::new(t)),
        None => Err(LinkError::NoToken(link.token_file.clone())),
    }
}

/// The `server-link` step (see the module docs).
pub async fn converge(plan: &WaypointPlan, link: &ServerLink) -> Result<LinkState, LinkError> {
    endpoint_token(link)?;
    let mut changed = Vec::new();
    let legacy = plan.remote_token_path();
    if crate::fsutil::remove_if_exists(&legacy).map_err(WaypointError::from)? {
        tracing::warn!(
            file = %legacy.display(),
            "removed the server VM's Waypoint token that an earlier version kept on this host"
        );
        changed.push(format!(
            "removed {} (the server's Waypoint token, no longer kept on a runner host)",
            legacy.display()
        ));
    }
    if let Some(address) = &link.waypoint_address
        && store_address(plan, address)?
    {
        changed.push(format!("runners dial Waypoint at {address}"));
    }
    if let Err(e) = remote::probe(
        &link.endpoint,
        &link.ca_sha256,
        Duration::from_secs(link.timeout_secs),
    )
    .await
    {
        if e.is_transient() {
            return Ok(LinkState::Unreachable(degraded_detail(plan, &e)));
        }
        return Err(LinkError::Refused(e));
    }
    let dial = read_token(&plan.remote_address_path())?
        .map(|a| format!("runners dial Waypoint at {a}"))
        .unwrap_or_else(|| "no runner token minted yet".into());
    Ok(if changed.is_empty() {
        LinkState::Current(format!("server VM {} reached; {dial}", link.endpoint))
    } else {
        LinkState::Changed(format!(
            "server VM {} reached; {}",
            link.endpoint,
            changed.join("; ")
        ))
    })
}

/// Writes the Waypoint address the runners dial; whether it changed.
fn store_address(plan: &WaypointPlan, address: &str) -> Result<bool, WaypointError> {
    let path = plan.remote_address_path();
    if read_token(&path)?.as_deref() == Some(address) {
        return Ok(false);
    }
    write_token(&path, address)?;
    Ok(true)
}

/// Stores the server VM's CA (its fingerprint already checked against `server.ca_sha256` by
/// the call that brought it): the runners verify the Waypoint server with it.
fn store_server_ca(plan: &WaypointPlan, ca_pem: &str) -> Result<bool, WaypointError> {
    let dir = plan.server_ca_dir();
    let mut changed = crate::fsutil::ensure_dir(&dir, crate::fsutil::MODE_PUBLIC_DIR)?;
    changed |= crate::fsutil::write_atomic(
        &dir.join("ca.pem"),
        ca_pem.as_bytes(),
        crate::fsutil::MODE_PUBLIC,
    )?
    .changed();
    Ok(changed)
}

/// Mints the token of runner `runner_id` at the server VM's endpoint and stores it (0600,
/// `runner-N-token`, before anything uses it) and the Waypoint address that came with it
/// (unless `server.waypoint_address` overrides it). Errors name the server and the reason,
/// never a token.
pub async fn mint_remote(
    plan: &WaypointPlan,
    runner_id: &RunnerId,
) -> Result<String, WaypointError> {
    let link = plan
        .link
        .as_ref()
        .ok_or_else(|| WaypointError::Conflict("role: runner without a server section".into()))?;
    let token = endpoint_token(link).map_err(|e| match e {
        LinkError::Waypoint(w) => w,
        other => WaypointError::Conflict(other.to_string()),
    })?;
    let minted = remote::mint_runner_token(
        &link.endpoint,
        &token,
        &link.ca_sha256,
        &runner_id.to_string(),
        Duration::from_secs(link.timeout_secs),
    )
    .await
    .map_err(|e| {
        WaypointError::Conflict(format!(
            "cannot get a token for runner {runner_id} from the server VM: {e}"
        ))
    })?;
    let address = link
        .waypoint_address
        .clone()
        .unwrap_or_else(|| minted.waypoint_address.clone());
    let token = minted.waypoint_token.expose().to_string();
    // The CA first: a runner never gets a token without the means to verify its server.
    store_server_ca(plan, &minted.ca_pem)?;
    write_token(&plan.runner_token_path(runner_id.index()), &token)?;
    store_address(plan, &address)?;
    tracing::info!(
        runner_id = %runner_id,
        server = %link.endpoint,
        "the server VM minted a Waypoint runner token"
    );
    Ok(token)
}

fn degraded_detail(plan: &WaypointPlan, e: &RemoteError) -> String {
    let have = plan.runner_token_path(1).exists() && plan.remote_address_path().exists();
    if have {
        format!("{e}; the runners keep the tokens minted before; retrying")
    } else {
        format!("{e}; no runner token minted yet, so no runners; retrying")
    }
}

/// What [`deregister`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deregistered {
    /// Runner IDs the server VM forgot.
    pub forgotten: Vec<String>,
    /// Runner IDs it could not be made to forget, with why.
    pub failed: Vec<String>,
}

/// A runner-only host shutting down (`server.deregister`): removes each runner container, has
/// the server VM forget its runner (`POST /v1/runner-forget`, all at once, each bounded by
/// `server.timeout_secs`), and discards its token (the next start mints new ones). Waypoint
/// 0.11 cannot revoke a runner token, so the discarded ones stay valid for their runner ID
/// until the server's keys change; what this ends is the server listing runners that are
/// gone. `runner_id_prefix` is what the runners step named them with (the host name).
pub async fn deregister(
    docker: &bollard::Docker,
    plan: &WaypointPlan,
    runner_id_prefix: &str,
) -> Result<Deregistered, LinkError> {
    let link = plan
        .link
        .as_ref()
        .ok_or_else(|| WaypointError::Conflict("role: runner without a server section".into()))?;
    let token = endpoint_token(link)?;
    let mut removed = Vec::new();
    for (name, _) in super::containers::list_role(docker, super::Role::Runner).await? {
        super::containers::remove(docker, &name).await?;
        if let Some(index) = runner_id::index_of(&name) {
            removed.push(RunnerId::new(runner_id_prefix, index));
        }
    }
    let timeout = Duration::from_secs(link.timeout_secs);
    let calls = removed.iter().map(|runner| {
        let id = runner.to_string();
        let token = &token;
        async move {
            let r =
                remote::forget_runner(&link.endpoint, token, &link.ca_sha256, &id, timeout).await;
            (id, r)
        }
    });
    let mut done = Deregistered::default();
    for (id, result) in futures_util::future::join_all(calls).await {
        match result {
            Ok(()) => done.forgotten.push(id),
            Err(e) => {
                tracing::warn!(runner_id = %id, error = %e, "the server VM did not forget a runner");
                done.failed.push(format!("{id} ({e})"));
            }
        }
    }
    for runner in &removed {
        crate::fsutil::remove_if_exists(&plan.runner_token_path(runner.index()))
            .map_err(WaypointError::from)?;
    }
    Ok(done)
}
