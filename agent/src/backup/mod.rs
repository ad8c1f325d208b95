//! Backups of the Waypoint server with what the agent keeps that belongs with it, and their
//! restore (see [`archive`] for the file, [`restore`] for putting one back).
//!
//! A backup is Waypoint's own online snapshot (`waypoint server snapshot`, consistent while
//! the server runs) with the bootstrap token, the runner tokens and the advertise address
//! record: after a restore the server has the signing key it had when the snapshot was taken,
//! so exactly the tokens issued before it are valid again, and these are they. The host's CA
//! and keys are not in it: they belong to the VM, and a new VM makes its own.
//!
//! Files are `DIR/pilot-backup-YYYYMMDDTHHMMSSZ.tar`, 0600 in a 0700 directory, written
//! atomically (a failed backup leaves no partial file and removes no older one). After a
//! successful scheduled backup the directory keeps the newest `keep`. The outcome of the last
//! attempt is `STATE_DIR/backup-last.json` (time, file, size, result), which the status and
//! `/metrics` show.

pub mod archive;
pub mod restore;
pub mod upgrade;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bollard::Docker;
use serde::{Deserialize, Serialize};

use crate::fsutil::{self, FsError};
use crate::waypoint::runner_id::RunnerId;
use crate::waypoint::{self, WaypointError, WaypointPlan};
use archive::{Manifest, Part};

/// File names of backups: `PREFIX` + UTC time + `.tar`.
pub const FILE_PREFIX: &str = "pilot-backup-";
pub const FILE_SUFFIX: &str = ".tar";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Waypoint(#[from] WaypointError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    #[error("cannot encode the backup: {0}")]
    Encode(#[source] std::io::Error),
    #[error("{0}")]
    Refused(String),
}

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    pub file: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// RFC 3339.
    pub at: String,
    pub duration_ms: u64,
    /// Runner tokens included.
    pub runner_tokens: u32,
}

/// The last backup attempt, as `STATE_DIR/backup-last.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339 time of the attempt.
    pub attempted_at: String,
    /// `ok` or `failed`.
    pub result: String,
    /// The error of a failed attempt (never a secret: Waypoint's stderr, a path, an errno).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last successful backup (kept across failed attempts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ok: Option<Taken>,
    /// Backups in the directory after the attempt.
    #[serde(default)]
    pub kept: u32,
}

/// Takes a backup of the server of `plan` into `path` (written atomically, 0600; its
/// directory must exist).
/// `host` is this VM's host name, the prefix of its runner IDs.
pub async fn take(
    docker: &Docker,
    plan: &WaypointPlan,
    host: &str,
    path: &Path,
) -> Result<Taken, BackupError> {
    let started = Instant::now();
    let now = time::OffsetDateTime::now_utc();
    let bootstrap = waypoint::read_token(&plan.bootstrap_token_path())?.ok_or_else(|| {
        BackupError::Refused(format!(
            "no bootstrap token in {}: the server is not bootstrapped by this agent, so a \
             backup could not be used",
            plan.bootstrap_token_path().display()
        ))
    })?;
    let snapshot = waypoint::snapshot::take(docker, plan).await?;
    let mut parts = vec![
        Part {
            name: archive::SNAPSHOT.into(),
            data: snapshot,
            runner_id: None,
        },
        Part {
            name: archive::BOOTSTRAP_TOKEN.into(),
            data: bootstrap.into_bytes(),
            runner_id: None,
        },
    ];
    let mut runner_tokens = 0;
    for index in 1..=pilot_values::MAX_RUNNERS {
        if let Some(t) = waypoint::read_token(&plan.runner_token_path(index))? {
            parts.push(Part {
                name: archive::runner_token_part(index),
                data: t.into_bytes(),
                runner_id: Some(RunnerId::new(host, index).to_string()),
            });
            runner_tokens += 1;
        }
    }
    if let Some(a) = waypoint::read_token(&plan.advertise_marker_path())? {
        parts.push(Part {
            name: archive::ADVERTISE.into(),
            data: a.into_bytes(),
            runner_id: None,
        });
    }
    let server_image_id = waypoint::containers::inspect(docker, waypoint::SERVER_NAME)
        .await?
        .and_then(|c| c.image)
        .unwrap_or_default();
    let manifest = Manifest {
        format: String::new(),
        created_at: rfc3339(now),
        host: host.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        server_image: plan.config.server_image.clone(),
        server_image_id,
        parts: Vec::new(),
    };
    let bytes = archive::encode(manifest, &parts, now.unix_timestamp().max(0) as u64)
        .map_err(BackupError::Encode)?;
    // The directory is the caller's: the backup directory is made 0700 by [`ensure_dir`];
    // an operator's `--output /tmp/x.tar` must not change the mode of /tmp.
    fsutil::write_atomic(path, &bytes, fsutil::MODE_SECRET)?;
    Ok(Taken {
        file: path.to_path_buf(),
        size: bytes.len() as u64,
        sha256: archive::sha256_hex(&bytes),
        at: rfc3339(now),
        duration_ms: started.elapsed().as_millis() as u64,
        runner_tokens,
    })
}

/// Makes the backup directory `dir` (0700: backups hold tokens and the signing key).
pub fn ensure_dir(dir: &Path) -> Result<(), FsError> {
    fsutil::ensure_dir(dir, fsutil::MODE_PRIVATE_DIR)?;
    Ok(())
}

/// The path of a new backup in `dir` taken at `now`.
pub fn new_path(dir: &Path, now: SystemTime) -> PathBuf {
    let t = time::OffsetDateTime::from(now);
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    dir.join(format!("{FILE_PREFIX}{stamp}{FILE_SUFFIX}"))
}

/// The backups in `dir`, oldest first (their names sort by time).
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, FsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(FsError::new("list", dir, e)),
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(FILE_PREFIX) && n.ends_with(FILE_SUFFIX))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Removes all but the newest `keep` backups of `dir`; returns the ones removed.
pub fn prune(dir: &Path, keep: u32) -> Result<Vec<PathBuf>, FsError> {
    let all = list(dir)?;
    let excess = all.len().saturating_sub(keep as usize);
    let mut removed = Vec::new();
    for p in all.into_iter().take(excess) {
        if fsutil::remove_if_exists(&p)? {
            removed.push(p);
        }
    }
    Ok(removed)
}

/// The record of the last attempt, if any (an unreadable one counts as none).
pub fn read_record(path: &Path) -> Option<Record> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn write_record(path: &Path, record: &Record) -> Result<(), FsError> {
    let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
    fsutil::write_atomic(path, &bytes, fsutil::MODE_SECRET)?;
    Ok(())
}

/// Whether a scheduled backup is due at `now`: none succeeded yet, or the last success is
/// `interval` old. A failed attempt does not move the due time: the next pass tries again.
pub fn due(record: Option<&Record>, interval: Duration, now: time::OffsetDateTime) -> bool {
    let Some(last) = record.and_then(|r| r.last_ok.as_ref()) else {
        return true;
    };
    match time::OffsetDateTime::parse(&last.at, &time::format_description::well_known::Rfc3339) {
        Ok(at) => now - at >= interval,
        Err(_) => true,
    }
}

pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// One line on a backup for the status: where, how big, when.
pub fn describe(t: &Taken) -> String {
    format!(
        "{} ({} bytes, {} runner tokens) at {} in {:.2}s",
        t.file.display(),
        t.size,
        t.runner_tokens,
        t.at,
        t.duration_ms as f64 / 1000.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut made = Vec::new();
        for i in 0..5u64 {
            let p = new_path(dir.path(), t0 + Duration::from_secs(i * 3600));
            std::fs::write(&p, b"x").unwrap();
            made.push(p);
        }
        std::fs::write(dir.path().join("notes.txt"), b"keep me").unwrap();
        assert_eq!(
            made[0].file_name().unwrap().to_str().unwrap(),
            "pilot-backup-20270115T080000Z.tar"
        );
        assert_eq!(list(dir.path()).unwrap(), made);
        let removed = prune(dir.path(), 2).unwrap();
        assert_eq!(removed, made[..3].to_vec());
        assert_eq!(list(dir.path()).unwrap(), made[3..].to_vec());
        assert!(dir.path().join("notes.txt").exists());
        assert!(prune(dir.path(), 2).unwrap().is_empty());
        assert!(list(&dir.path().join("none")).unwrap().is_empty());
    }

    #[test]
    fn due_after_the_interval_since_the_last_success() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let hour = Duration::from_secs(3600);
        assert!(due(None, hour, now));
        let taken = |secs_ago: i64| Taken {
            file: "/b".into(),
            size: 1,
            sha256: String::new(),
            at: rfc3339(now - time::Duration::seconds(secs_ago)),
            duration_ms: 1,
            runner_tokens: 0,
        };
        let rec = |last_ok| Record {
            attempted_at: rfc3339(now),
            result: "failed".into(),
            error: Some("disk full".into()),
            last_ok,
            kept: 1,
        };
        assert!(due(Some(&rec(None)), hour, now));
        assert!(!due(Some(&rec(Some(taken(3599)))), hour, now));
        assert!(due(Some(&rec(Some(taken(3600)))), hour, now));
    }
}
