//! `pilot-agent backup` and `pilot-agent restore`: Waypoint's data and the agent's tokens in
//! one file, and back (see [`crate::backup`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backup::{self, BackupError, Taken, restore::RestoreReport};
use crate::config::{Config, ConfigError, Role};
use crate::converge::{self, UpError};
use crate::fsutil::{self, FsError};
use crate::plan::UpOptions;
use crate::status_file::Status;
use crate::waypoint::{self, WaypointPlan};

/// How long `restore` waits for a pass of `run` under way to release the state lock.
const LOCK_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum BackupCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    NotHere(String),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Waypoint(#[from] waypoint::WaypointError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "another pilot-agent kept the state lock {path} for {}s; try again when its pass is done",
        LOCK_WAIT.as_secs()
    )]
    Locked { path: PathBuf },
    #[error("{0}")]
    Host(String),
}

fn server_plan(config: &Config) -> Result<WaypointPlan, BackupCommandError> {
    if config.role != Role::Server {
        return Err(BackupCommandError::NotHere(
            "this is a runner-only host (role: runner): back up the server VM instead".into(),
        ));
    }
    WaypointPlan::from_config(config).ok_or_else(|| {
        BackupCommandError::NotHere(
            "the configuration has no waypoint section: there is no server to back up".into(),
        )
    })
}

fn host(config: &Config) -> Result<String, BackupCommandError> {
    crate::addresses::host_name(config).map_err(|e| BackupCommandError::Host(e.to_string()))
}

/// `pilot-agent backup [--output FILE]`: one backup now, into FILE or the backup directory
/// (`backup.dir`, else `STATE_DIR/backups`). It does not prune: that is the schedule's.
pub async fn backup(
    config_path: &Path,
    output: Option<PathBuf>,
) -> Result<Taken, BackupCommandError> {
    let config = Config::load(config_path)?;
    let plan = server_plan(&config)?;
    let path = match output {
        // The operator's directory, as it is (it must exist; its mode is theirs).
        Some(p) => p,
        None => {
            let dir = config
                .backup
                .clone()
                .unwrap_or_default()
                .dir_under(&config.state_dir);
            backup::ensure_dir(&dir).map_err(BackupError::from)?;
            backup::new_path(&dir, std::time::SystemTime::now())
        }
    };
    let docker = waypoint::connect(&config.docker.socket).await?;
    Ok(backup::take(&docker, &plan, &host(&config)?, &path).await?)
}

/// What `restore` did: the restore itself and the converge after it.
#[derive(Debug)]
pub struct Restored {
    pub report: RestoreReport,
    /// The converge pass that restarted the runners with their tokens; `None` when `run`
    /// held the lock again first (its pass does the same).
    pub status: Option<Status>,
    pub took: Duration,
}

/// `pilot-agent restore FILE`: verifies the file completely (a mismatch changes nothing),
/// stages the snapshot on the running server, puts the tokens back and converges.
pub async fn restore(config_path: &Path, file: &Path) -> Result<Restored, BackupCommandError> {
    let started = Instant::now();
    let config = Config::load(config_path)?;
    let plan = server_plan(&config)?;
    let verified = backup::restore::verify(file)?;
    tracing::info!(
        parts = verified.manifest.parts.len(),
        host = verified.manifest.host,
        created_at = verified.manifest.created_at,
        "the backup's checksums match"
    );
    let host = host(&config)?;
    let lock_path = config.state().lock();
    let lock = wait_for_lock(&lock_path).await?;
    let docker = waypoint::connect(&config.docker.socket).await?;
    let report = backup::restore::restore(&docker, &plan, &host, &verified).await?;
    drop(lock);
    let status = match converge::converge_once(config, UpOptions::default()).await {
        Ok(s) => Some(s),
        Err(UpError::Locked { .. }) => None,
        Err(e) => {
            return Err(BackupCommandError::NotHere(format!(
                "the data is restored, but the converge after it failed: {e}"
            )));
        }
    };
    Ok(Restored {
        report,
        status,
        took: started.elapsed(),
    })
}

async fn wait_for_lock(path: &Path) -> Result<fsutil::FileLock, BackupCommandError> {
    if let Some(dir) = path.parent() {
        fsutil::ensure_dir(dir, fsutil::MODE_PRIVATE_DIR)?;
    }
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        if let Some(lock) = fsutil::try_lock(path)? {
            return Ok(lock);
        }
        if Instant::now() >= deadline {
            return Err(BackupCommandError::Locked {
                path: path.to_path_buf(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
