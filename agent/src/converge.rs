//! One converge pass under the state lock: what `pilot-agent up` runs once.
//!
//! The state directory is created, the lock taken (one converge at a time: `up` by hand while
//! `run` works would race), and the engine runs the steps of [`crate::plan`], writing
//! `STATE_DIR/status.json` as it goes; the finished pass is appended to
//! `STATE_DIR/history.jsonl` ([`crate::history_file`]). `run`'s passes take the same lock and
//! do the same (`service`).

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::engine::{Engine, EngineError};
use crate::fsutil::{self, FsError, MODE_PRIVATE_DIR};
use crate::history_file::{self, PassClock};
use crate::plan::{self, Ctx, UpOptions};
use crate::status_file::Status;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "another pilot-agent is converging this host (it holds {path}); try again when it is done"
    )]
    Locked { path: PathBuf },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Converges the host once with a loaded configuration.
pub async fn converge_once(config: Config, options: UpOptions) -> Result<Status, UpError> {
    fsutil::ensure_dir(&config.state_dir, MODE_PRIVATE_DIR)?;
    let lock_path = config.state().lock();
    let Some(_lock) = fsutil::try_lock(&lock_path)? else {
        return Err(UpError::Locked { path: lock_path });
    };
    if options.rotate_db_password {
        if config.database.is_some() {
            tracing::info!("--rotate-db-password: the database step rotates the password");
        } else {
            tracing::warn!("--rotate-db-password has no effect: no database section");
        }
    }
    let engine = Engine::new("up", plan::up_steps(&config))?
        .with_status_file(config.status_path())
        .with_annotation(plan::annotate_status);
    let history = config.state().history();
    let clock = PassClock::start();
    let status = engine.run(Arc::new(Ctx::new(config, options))).await?;
    // Still under the lock: one writer of the history at a time.
    history_file::record(&history, &status, None, &clock);
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_converge_is_refused_while_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let _held = fsutil::try_lock(&config.state().lock()).unwrap().unwrap();
        let err = converge_once(config, UpOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, UpError::Locked { .. }), "{err}");
        assert!(!dir.path().join("status.json").exists());
    }
}
