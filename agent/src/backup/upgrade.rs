//! Guarded upgrades of the Waypoint server: when `waypoint.server_image` names another image
//! than the running server's, the server step does not just replace the container.
//!
//! 1. A backup first (Waypoint's snapshot and the tokens, in the backup directory, like any
//!    other): the way back if the new version changes the data and then fails.
//! 2. The old container is removed before the new one is created (one fixed name: never two
//!    servers on one volume), then the new one must answer over HTTPS, accept the bootstrap
//!    token (its data and signing key are there) and see every local runner online again,
//!    all within `waypoint.ready_timeout_secs`.
//! 3. Otherwise it is rolled back: the new container removed, the previous image started on
//!    the same volume, the snapshot staged on it (the new version may have migrated the
//!    database before failing), and the step fails naming the image. The failed image ID is
//!    remembered (`STATE_DIR/waypoint/upgrade-failed`) so that later passes keep the previous
//!    server instead of trying again; another image, or removing that file, tries again.
//!
//! Waypoint's own advice for upgrades (`website/content/commands/server-upgrade.mdx`,
//! `docs/server/run/maintenance.mdx`) is the same: snapshot first, one server at a time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::Docker;
use serde::{Deserialize, Serialize};

use super::{BackupError, Taken};
use crate::fsutil;
use crate::waypoint::runner_id::RunnerId;
use crate::waypoint::server::{self, ServerReport};
use crate::waypoint::{self, LABEL_MANAGED, SERVER_NAME, WaypointError, WaypointPlan};

/// Why the last upgrade attempt failed, kept so that passes do not retry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub image: String,
    pub image_id: String,
    pub previous_image_id: String,
    pub at: String,
    pub reason: String,
}

/// A server running another image than the configured one.
#[derive(Debug, Clone)]
pub struct Pending {
    pub from_image_id: String,
    pub to_image_id: String,
}

/// What the server step does about the image.
#[derive(Debug)]
pub enum Plan {
    /// No server yet, or it runs the configured image: converge as usual.
    Converge,
    /// Upgrade it under guard.
    Upgrade(Pending),
    /// This image failed before; the previous server stays.
    KeepPrevious(Failed),
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Waypoint(#[from] WaypointError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Fs(#[from] crate::fsutil::FsError),
    #[error(
        "will not upgrade the Waypoint server to {image}: the backup before it failed ({reason}); \
         the server keeps running {previous}"
    )]
    NoBackup {
        image: String,
        previous: String,
        reason: String,
    },
    #[error(
        "the upgrade of the Waypoint server to {image} failed ({reason}); rolled back to the \
         previous image {previous} with the data of the backup {backup}{restore}"
    )]
    RolledBack {
        image: String,
        previous: String,
        reason: String,
        backup: String,
        /// Empty, or why the rollback itself went wrong.
        restore: String,
    },
    #[error(
        "the Waypoint server stays on {previous}: the upgrade to {} ({}) failed at {} ({}); \
         set another waypoint.server_image, or remove {marker} to try this one again",
        failed.image, short(&failed.image_id), failed.at, failed.reason
    )]
    Refused {
        failed: Failed,
        previous: String,
        marker: PathBuf,
    },
}

fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

/// The file that remembers a failed upgrade.
pub fn marker_path(plan: &WaypointPlan) -> PathBuf {
    plan.tokens_dir.join("upgrade-failed")
}

/// Decides what the server step does: compares the running server's image with the
/// configured one.
pub async fn plan(docker: &Docker, wp: &WaypointPlan) -> Result<Plan, UpgradeError> {
    let wanted = server::wanted_image_id(docker, wp).await?;
    let Some(existing) = waypoint::containers::inspect(docker, SERVER_NAME).await? else {
        return Ok(Plan::Converge);
    };
    let ours = existing
        .config
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .and_then(|l| l.get(LABEL_MANAGED))
        .is_some_and(|v| v == "true");
    let running = existing
        .state
        .as_ref()
        .and_then(|s| s.running)
        .unwrap_or(false);
    let current = existing.image.clone().unwrap_or_default();
    // Only a running server of ours with a bootstrap token has data worth guarding; anything
    // else the ordinary converge replaces (a stopped server is started or replaced there).
    let bootstrapped = waypoint::read_token(&wp.bootstrap_token_path())?.is_some();
    if !ours || !running || !bootstrapped || current.is_empty() || current == wanted {
        if current == wanted {
            fsutil::remove_if_exists(&marker_path(wp))?;
        }
        return Ok(Plan::Converge);
    }
    if let Some(failed) = read_failed(&marker_path(wp))
        && failed.image_id == wanted
        && failed.previous_image_id == current
    {
        return Ok(Plan::KeepPrevious(failed));
    }
    Ok(Plan::Upgrade(Pending {
        from_image_id: current,
        to_image_id: wanted,
    }))
}

fn read_failed(path: &Path) -> Option<Failed> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// What a successful upgrade did.
#[derive(Debug)]
pub struct Upgraded {
    pub server: ServerReport,
    pub backup: Taken,
    /// From the old server's removal to the new one answering with its runners online.
    pub downtime: Duration,
    pub from_image_id: String,
}

impl Upgraded {
    pub fn summary(&self, image: &str) -> String {
        format!(
            "upgraded the Waypoint server from {} to {image} ({}) after a backup to {}; away \
             {:.2}s, runners online again; {}",
            short(&self.from_image_id),
            short(self.server.id.as_str()),
            self.backup.file.display(),
            self.downtime.as_secs_f64(),
            self.server.summary()
        )
    }
}

/// Runs the guarded upgrade `pending` (see the module docs); `host` names the local runners,
/// `backup_path` is where the backup before it goes.
pub async fn upgrade(
    docker: &Docker,
    wp: &WaypointPlan,
    host: &str,
    backup_path: &Path,
    pending: Pending,
) -> Result<Upgraded, UpgradeError> {
    let image = wp.config.server_image.clone();
    let backup = super::take(docker, wp, host, backup_path)
        .await
        .map_err(|e| UpgradeError::NoBackup {
            image: image.clone(),
            previous: short(&pending.from_image_id).to_string(),
            reason: e.to_string(),
        })?;
    tracing::info!(
        from = short(&pending.from_image_id),
        to = %image,
        backup = %backup.file.display(),
        "upgrading the Waypoint server"
    );
    let deadline = Duration::from_secs(wp.config.ready_timeout_secs);
    let started = Instant::now();
    let attempt = async {
        let report = server::ensure_image(docker, wp, &pending.to_image_id).await?;
        wait_healthy(docker, wp, host, started + deadline).await?;
        Ok::<_, WaypointError>(report)
    }
    .await;
    match attempt {
        Ok(server) => {
            fsutil::remove_if_exists(&marker_path(wp))?;
            Ok(Upgraded {
                server,
                backup,
                downtime: started.elapsed(),
                from_image_id: pending.from_image_id,
            })
        }
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(%image, %reason, "the upgraded Waypoint server is not healthy; rolling back");
            let restore = match rollback(docker, wp, &pending, &backup).await {
                Ok(()) => String::new(),
                Err(e) => format!("; the rollback did not complete: {e}"),
            };
            let failed = Failed {
                image: image.clone(),
                image_id: pending.to_image_id.clone(),
                previous_image_id: pending.from_image_id.clone(),
                at: super::rfc3339(time::OffsetDateTime::now_utc()),
                reason: reason.clone(),
            };
            let bytes = serde_json::to_vec_pretty(&failed).unwrap_or_default();
            fsutil::write_atomic(&marker_path(wp), &bytes, fsutil::MODE_SECRET)?;
            Err(UpgradeError::RolledBack {
                image,
                previous: short(&pending.from_image_id).to_string(),
                reason,
                backup: backup.file.display().to_string(),
                restore,
            })
        }
    }
}

/// The previous image back on the volume, with the data of the backup.
async fn rollback(
    docker: &Docker,
    wp: &WaypointPlan,
    pending: &Pending,
    backup: &Taken,
) -> Result<(), UpgradeError> {
    waypoint::containers::remove(docker, SERVER_NAME).await?;
    server::ensure_image(docker, wp, &pending.from_image_id).await?;
    let verified = super::restore::verify(&backup.file)?;
    let snapshot = &verified.parts[super::archive::SNAPSHOT];
    let timeout = Duration::from_secs(wp.config.ready_timeout_secs.max(30));
    waypoint::snapshot::restore(docker, wp, snapshot, timeout).await?;
    Ok(())
}

/// Waits until the server accepts the bootstrap token and lists every local runner online.
async fn wait_healthy(
    docker: &Docker,
    wp: &WaypointPlan,
    host: &str,
    deadline: Instant,
) -> Result<(), WaypointError> {
    let expected: Vec<String> = (1..=wp.config.runners)
        .map(|i| RunnerId::new(host, i).to_string())
        .collect();
    loop {
        let last = match waypoint::server_cli(
            docker,
            wp,
            &["runner", "list", "-json"],
            Duration::from_secs(10),
        )
        .await
        {
            Ok(out) if out.exit_code == Some(0) => {
                let online = online_runners(&out.stdout);
                let missing: Vec<&String> =
                    expected.iter().filter(|id| !online.contains(id)).collect();
                if missing.is_empty() {
                    return Ok(());
                }
                format!(
                    "runners not online: {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            // What `runner list` printed on failure is Waypoint's error text (no secret).
            Ok(out) => format!(
                "`waypoint runner list` failed: {}",
                format!("{} {}", out.stdout.trim(), out.stderr.trim()).trim()
            ),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(WaypointError::Conflict(format!(
                "not healthy within the deadline: {last}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The IDs of the runners `waypoint runner list -json` prints as online (one JSON document
/// per runner, concatenated; protojson leaves `online` out when false).
pub fn online_runners(stdout: &str) -> Vec<String> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<serde_json::Value>()
        .map_while(Result::ok)
        .filter(|r| r["online"] == true)
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_runners_are_read_from_concatenated_documents() {
        let out = "{\n\t\"id\": \"h-runner-1\",\n\t\"online\": true\n}\n{\n\t\"id\": \"h-runner-2\"\n}\n{\"id\": \"h-runner-3\", \"online\": true}\n";
        assert_eq!(online_runners(out), ["h-runner-1", "h-runner-3"]);
        assert!(online_runners("No runners found\n").is_empty());
    }

    #[test]
    fn failures_name_the_image_and_the_way_out() {
        let e = UpgradeError::Refused {
            failed: Failed {
                image: "pilot/waypoint:0.12".into(),
                image_id: "sha256:0123456789abcdef0123".into(),
                previous_image_id: "sha256:aa".into(),
                at: "2026-12-07T20:00:00Z".into(),
                reason: "not healthy".into(),
            },
            previous: "aa".into(),
            marker: "/var/lib/pilot-agent/waypoint/upgrade-failed".into(),
        }
        .to_string();
        assert!(e.contains("pilot/waypoint:0.12 (0123456789ab)"), "{e}");
        assert!(
            e.contains("remove /var/lib/pilot-agent/waypoint/upgrade-failed"),
            "{e}"
        );
    }
}
