//! Putting a backup back: onto a fresh VM (its agent has bootstrapped a new, empty server) or
//! onto the VM it came from.
//!
//! 1. The file is read and verified completely ([`super::archive::read`]); any mismatch
//!    refuses it before anything changes.
//! 2. The snapshot is staged the way Waypoint wants: `waypoint server restore -exit -` on the
//!    running server (authenticated with its current token), which exits; dockerd restarts it
//!    and the new process applies the snapshot before it listens
//!    ([`crate::waypoint::snapshot::restore`]).
//! 3. The server now has the signing key of the snapshot (Waypoint issue #3383: tokens issued
//!    since the snapshot no longer verify), so the tokens of the backup are put back: the
//!    bootstrap token, the advertise record, and each runner token whose runner ID is this
//!    host's (a backup of another host name has runner IDs this host does not run; those
//!    runners get new tokens minted with the restored bootstrap token). Local runner tokens
//!    not in the backup were signed with the replaced key and are discarded.
//!
//! The caller then converges (the runners step restarts the runners with their tokens).

use std::path::Path;
use std::time::Duration;

use bollard::Docker;

use super::BackupError;
use super::archive::{self, Backup};
use crate::waypoint::runner_id::RunnerId;
use crate::waypoint::{self, WaypointPlan};

/// What a restore did, for the operator.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// Host name and time of the snapshot.
    pub snapshot_host: String,
    pub snapshot_at: String,
    pub snapshot_image: String,
    /// From `restore -exit` to the server answering again.
    pub downtime: Duration,
    /// Files of `STATE_DIR/waypoint` written from the backup.
    pub restored: Vec<String>,
    /// Tokens this host held that the restore made invalid, by file name.
    pub invalidated: Vec<String>,
    /// Runner IDs in the backup that are not this host's (another host name).
    pub foreign_runners: Vec<String>,
}

impl RestoreReport {
    /// What the operator is told, one line each.
    pub fn lines(&self) -> Vec<String> {
        let mut l = vec![
            format!(
                "restored the Waypoint server's data as it was at {} on {} (image {})",
                self.snapshot_at, self.snapshot_host, self.snapshot_image
            ),
            format!(
                "the server was away for {:.1}s while it applied the snapshot",
                self.downtime.as_secs_f64()
            ),
            format!("tokens put back: {}", self.restored.join(", ")),
        ];
        if !self.invalidated.is_empty() {
            l.push(format!(
                "no longer valid (signed with the key the restore replaced): {}; the Pilot CLI \
                 gets the restored token from `pilot-agent credentials`",
                self.invalidated.join(", ")
            ));
        }
        l.push(format!(
            "every token Waypoint issued after {} (`waypoint token new`, runner hosts' runner \
             tokens minted since) no longer works: issue them again",
            self.snapshot_at
        ));
        if !self.foreign_runners.is_empty() {
            l.push(format!(
                "the snapshot lists runners of {}: {} (forget them with `waypoint runner \
                 forget ID` if that host is gone)",
                self.snapshot_host,
                self.foreign_runners.join(", ")
            ));
        }
        l
    }
}

/// Checks a backup without touching anything (what `restore` does first).
pub fn verify(file: &Path) -> Result<Backup, BackupError> {
    let backup = archive::read(file)?;
    // Token parts must be tokens: one line, no spaces (what the agent's token files hold).
    for (name, data) in &backup.parts {
        if name == archive::SNAPSHOT {
            continue;
        }
        let text = std::str::from_utf8(data).unwrap_or("");
        if text.is_empty() || text.trim() != text || text.contains(char::is_whitespace) {
            return Err(BackupError::Refused(format!(
                "{}: part {name} is not a single token",
                file.display()
            )));
        }
    }
    if !backup.parts.contains_key(archive::BOOTSTRAP_TOKEN) {
        return Err(BackupError::Refused(format!(
            "{}: no {} in the backup",
            file.display(),
            archive::BOOTSTRAP_TOKEN
        )));
    }
    Ok(backup)
}

/// Restores `backup` onto the running server of `plan`; `host` is this host's name (its
/// runner IDs' prefix).
pub async fn restore(
    docker: &Docker,
    plan: &WaypointPlan,
    host: &str,
    backup: &Backup,
) -> Result<RestoreReport, BackupError> {
    let m = &backup.manifest;
    let mut report = RestoreReport {
        snapshot_host: m.host.clone(),
        snapshot_at: m.created_at.clone(),
        snapshot_image: m.server_image.clone(),
        ..RestoreReport::default()
    };
    let current_bootstrap = waypoint::read_token(&plan.bootstrap_token_path())?;
    let timeout = Duration::from_secs(plan.config.ready_timeout_secs.max(60));
    report.downtime =
        waypoint::snapshot::restore(docker, plan, &backup.parts[archive::SNAPSHOT], timeout)
            .await?;
    // From here the server verifies tokens with the snapshot's key.
    let bootstrap = text(&backup.parts[archive::BOOTSTRAP_TOKEN]);
    if current_bootstrap.as_deref() != Some(bootstrap) {
        report.invalidated.push("bootstrap-token".into());
    }
    waypoint::write_token(&plan.bootstrap_token_path(), bootstrap)?;
    report.restored.push("bootstrap-token".into());
    match backup.parts.get(archive::ADVERTISE) {
        Some(a) => {
            waypoint::write_token(&plan.advertise_marker_path(), text(a))?;
        }
        // The advertise step sets the address again.
        None => {
            crate::fsutil::remove_if_exists(&plan.advertise_marker_path())?;
        }
    }
    for index in 1..=pilot_values::MAX_RUNNERS {
        let part = archive::runner_token_part(index);
        let ours = RunnerId::new(host, index).to_string();
        let info = m.parts.iter().find(|p| p.name == part);
        let path = plan.runner_token_path(index);
        let current = waypoint::read_token(&path)?;
        match info {
            Some(i) if i.runner_id.as_deref() == Some(ours.as_str()) => {
                let t = text(&backup.parts[&part]);
                if current.as_deref().is_some_and(|c| c != t) {
                    report.invalidated.push(format!("runner-{index}-token"));
                }
                waypoint::write_token(&path, t)?;
                report.restored.push(format!("runner-{index}-token"));
            }
            other => {
                if let Some(i) = other {
                    report
                        .foreign_runners
                        .push(i.runner_id.clone().unwrap_or_else(|| part.clone()));
                }
                if current.is_some() {
                    crate::fsutil::remove_if_exists(&path)?;
                    report.invalidated.push(format!("runner-{index}-token"));
                }
            }
        }
    }
    Ok(report)
}

fn text(data: &[u8]) -> &str {
    // `verify` checked every token part is UTF-8.
    std::str::from_utf8(data).unwrap_or("")
}
