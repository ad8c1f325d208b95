//! Step `server-link` of a runner-only host: the server VM's Waypoint address and token,
//! fetched from that VM's HTTPS endpoint (`GET /v1/credentials`, its CA pinned by
//! `server.ca_sha256`), stored 0600 in `STATE_DIR/waypoint/server-address` and
//! `server-token` for the runners step.
//!
//! - Unreachable, timed out, rate limited, not bootstrapped yet: `degraded`. The runners keep
//!   running on what was fetched before (nothing here stops them), and the service retries
//!   with backoff; the host is `healthy` again on the first pass that reaches the server VM.
//! - A CA that does not match the pin, a token the server VM rejects: an error. Retrying does
//!   not fix either; a person must look, and nothing fetched is trusted.
//! - A different Waypoint token than the stored one (the server VM's Waypoint was re-created):
//!   the runner tokens minted with the old one are discarded, so the runners step mints new
//!   ones and re-creates the runners.

use std::time::Duration;

use pilot_values::Secret;

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
        "{} is missing or empty: it must hold the server VM's endpoint token (one line, mode \
         0600)", .0.display()
    )]
    NoToken(std::path::PathBuf),
    /// A wrong pin, a refused token: retrying does not help.
    #[error(transparent)]
    Refused(RemoteError),
    #[error(transparent)]
    Waypoint(#[from] WaypointError),
}

/// Fetches and stores the server VM's Waypoint credentials (see the module docs).
pub async fn converge(plan: &WaypointPlan, link: &ServerLink) -> Result<LinkState, LinkError> {
    let token = match read_token(&link.token_file)? {
        Some(t) => Secret::new(t),
        None => return Err(LinkError::NoToken(link.token_file.clone())),
    };
    let fetched = remote::fetch_credentials(
        &link.endpoint,
        &token,
        &link.ca_sha256,
        Duration::from_secs(link.timeout_secs),
    )
    .await;
    let creds = match fetched {
        Ok(c) => c,
        Err(e) if e.is_transient() => return Ok(LinkState::Unreachable(degraded_detail(plan, &e))),
        Err(e) => return Err(LinkError::Refused(e)),
    };
    let address = link
        .waypoint_address
        .clone()
        .unwrap_or_else(|| creds.waypoint_address.clone());

    let mut changed = Vec::new();
    let token_path = plan.remote_token_path();
    if read_token(&token_path)?.as_deref() != Some(creds.waypoint_token.expose()) {
        // Minted with the old token, by a server that may no longer know them.
        let discarded = super::discard_files(plan, |name, _| {
            name.starts_with("runner-") && name.ends_with("-token")
        })?
        .len();
        write_token(&token_path, creds.waypoint_token.expose())?;
        changed.push(if discarded == 0 {
            "stored the server's Waypoint token".to_string()
        } else {
            format!(
                "stored the server's new Waypoint token (discarded {discarded} runner token(s) \
                 minted with the old one)"
            )
        });
    }
    let address_path = plan.remote_address_path();
    if read_token(&address_path)?.as_deref() != Some(address.as_str()) {
        write_token(&address_path, &address)?;
        changed.push(format!("runners dial Waypoint at {address}"));
    }
    Ok(if changed.is_empty() {
        LinkState::Current(format!(
            "server VM {} reached; runners dial Waypoint at {address}",
            link.endpoint
        ))
    } else {
        LinkState::Changed(format!(
            "server VM {} reached; {}",
            link.endpoint,
            changed.join("; ")
        ))
    })
}

fn degraded_detail(plan: &WaypointPlan, e: &RemoteError) -> String {
    let have = plan.remote_token_path().exists() && plan.remote_address_path().exists();
    if have {
        format!("{e}; the runners keep the credentials fetched before; retrying")
    } else {
        format!("{e}; no credentials fetched yet, so no runners; retrying")
    }
}
