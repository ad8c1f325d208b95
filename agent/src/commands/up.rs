//! `pilot-agent up`: load and check the configuration completely before anything on the host
//! changes, then converge once ([`crate::converge`]) and exit.

use std::path::Path;

use crate::config::Config;
pub use crate::converge::UpError;
use crate::plan::UpOptions;
use crate::status_file::Status;

/// Loads the configuration at `config_path` and converges the host once.
pub async fn up(config_path: &Path, options: UpOptions) -> Result<Status, UpError> {
    let config = Config::load(config_path)?;
    crate::converge::converge_once(config, options).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

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
}
