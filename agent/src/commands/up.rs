//! `pilot-agent up`: converge once and exit.
//!
//! The configuration is loaded and checked completely before anything on the host changes;
//! then the state directory is created, a lock taken (one converge at a time: `up` by hand
//! while `run` works would race), and the engine runs the steps of [`crate::plan`], writing
//! `STATE_DIR/status.json` as it goes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::engine::{Engine, EngineError};
use crate::fsutil::{self, FsError, MODE_PUBLIC_DIR};
use crate::plan::{self, Ctx, UpOptions};
use crate::status::Status;

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

/// Name of the lock file in the state directory.
pub const LOCK_FILE: &str = "lock";

/// Loads the configuration at `config_path` and converges the host once.
pub async fn up(config_path: &Path, options: UpOptions) -> Result<Status, UpError> {
    let config = Config::load(config_path)?;
    up_with(config, options).await
}

/// Converges with an already loaded configuration.
pub async fn up_with(config: Config, options: UpOptions) -> Result<Status, UpError> {
    fsutil::ensure_dir(&config.state_dir, MODE_PUBLIC_DIR)?;
    let lock_path = config.state_dir.join(LOCK_FILE);
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
    let status = engine.run(Arc::new(Ctx::new(config, options))).await?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration with errors changes nothing: not even the state directory appears.
    #[tokio::test]
    async fn bad_config_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let daemon = dir.path().join("daemon.json");
        let cfg = dir.path().join("agent.yaml");
        std::fs::write(
            &cfg,
            format!(
                "state_dir: {}\ndocker:\n  daemon_config: {}\n  tls_listen: nope\nfirewall:\n  lock_ports: [0]\n",
                state.display(),
                daemon.display()
            ),
        )
        .unwrap();
        let err = up(&cfg, UpOptions::default()).await.unwrap_err();
        match err {
            UpError::Config(ConfigError::Invalid { diagnostics, .. }) => {
                assert_eq!(diagnostics.len(), 2, "{diagnostics:?}")
            }
            other => panic!("{other}"),
        }
        assert!(!state.exists());
        assert!(!daemon.exists());
    }

    #[tokio::test]
    async fn a_second_converge_is_refused_while_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let _held = fsutil::try_lock(&dir.path().join(LOCK_FILE))
            .unwrap()
            .unwrap();
        let err = up_with(config, UpOptions::default()).await.unwrap_err();
        assert!(matches!(err, UpError::Locked { .. }), "{err}");
        assert!(!dir.path().join("status.json").exists());
    }
}
