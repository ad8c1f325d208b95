//! `pilot-agent run`: load the configuration, then hand over to [`crate::service`] until
//! SIGTERM or SIGINT.
//!
//! The signal handlers are installed before anything else, so a SIGTERM during the first
//! pass (systemd stopping a unit that is still starting) is a clean shutdown too, never the
//! default action that would kill the process mid-write.

use std::path::Path;

use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, ConfigError};
use crate::service::{self, RunSummary, ServiceError, ShutdownOptions};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// Runs the service with the configuration at `config_path` until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> Result<RunSummary, RunError> {
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let config = Config::load(config_path)?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM".to_string(),
            _ = int.recv() => "SIGINT".to_string(),
        }
    };
    Ok(service::run(config, shutdown, ShutdownOptions::default()).await?)
}
