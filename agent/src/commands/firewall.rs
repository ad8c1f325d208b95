//! `pilot-agent firewall`: apply only the agent's nftables table.
//!
//! For the early-boot unit ordered before docker.service: after a reboot the lock on 2375 is
//! in place before dockerd listens. It writes no status file (that is `up`'s and `run`'s) and
//! needs nothing but the configuration and `nft`.

use std::path::Path;

use crate::config::{Config, ConfigError};
use crate::firewall::{self, FirewallError, FirewallReport, FirewallSpec, Nft};

#[derive(Debug, thiserror::Error)]
pub enum FirewallCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

pub async fn firewall(config_path: &Path) -> Result<FirewallReport, FirewallCommandError> {
    let config = Config::load(config_path)?;
    Ok(firewall::converge(&FirewallSpec::from_config(&config), &Nft::default()).await?)
}
