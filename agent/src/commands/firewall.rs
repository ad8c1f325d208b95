//! `pilot-agent firewall`: apply only the agent's nftables table.
//!
//! For the early-boot unit ordered before docker.service: after a reboot the lock on 2375 is
//! in place before dockerd listens. It writes no status file (that is `up`'s and `run`'s) and
//! needs nothing but the configuration and `nft`.
//!
//! A configuration that does not load still gets a table: [`FirewallSpec::fail_closed`]
//! (2375 dropped, Docker's TLS port, the endpoint and the Waypoint ports open to loopback and
//! Docker's bridges only, the metadata service closed to containers), and the command then
//! fails with the configuration's errors, so the unit shows failed and `pilot-agent status`
//! names them. Booting with no table would leave dockerd's and Waypoint's ports open.

use std::path::Path;

use crate::config::{Config, ConfigError};
use crate::firewall::{self, FirewallError, FirewallReport, FirewallSpec, Nft};

#[derive(Debug, thiserror::Error)]
pub enum FirewallCommandError {
    /// The configuration did not load; `applied` is the fail-closed table put in its place
    /// (or why even that failed).
    #[error("{error}")]
    Config {
        #[source]
        error: ConfigError,
        applied: Result<FirewallReport, FirewallError>,
    },
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

pub async fn firewall(config_path: &Path) -> Result<FirewallReport, FirewallCommandError> {
    let nft = Nft::default();
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            // No record: the state directory is the broken configuration's to name. The
            // comments alone decide, and `up` replaces the table once the configuration
            // loads (its hash differs).
            let applied = firewall::converge(&FirewallSpec::fail_closed(), &nft, None).await;
            return Err(FirewallCommandError::Config { error, applied });
        }
    };
    let record = config.state().firewall_listing();
    crate::fsutil::ensure_dir(&config.state_dir, crate::fsutil::MODE_PRIVATE_DIR)
        .map_err(FirewallError::from)?;
    Ok(firewall::converge(&FirewallSpec::current(&config), &nft, Some(&record)).await?)
}
