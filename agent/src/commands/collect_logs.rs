//! `pilot-agent collect-logs [--output FILE]`: loads the configuration (falling back to the
//! defaults as `status` does), writes the redacted diagnostics archive
//! ([`crate::views::diagnostics`]) and reports where. Exit 0 when it was written, even with
//! parts missing (the MANIFEST says which and why); 1 when nothing could be written.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
pub use crate::views::diagnostics::DiagnosticsError;
use crate::views::diagnostics::{self, Problem, Request, Tools, Written};
use crate::views::status_report::Target;

#[derive(Debug, thiserror::Error)]
pub enum CollectLogsError {
    /// An explicitly named configuration (`--config`, `PILOT_AGENT_CONFIG`) did not load.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Collect(#[from] DiagnosticsError),
}

/// What `main.rs` prints: the path on stdout, the rest on stderr.
#[derive(Debug, Clone)]
pub struct Collected {
    pub path: PathBuf,
    /// The configuration did not load and the defaults were used (as `status` warns).
    pub warning: Option<String>,
    /// One line per part that is partial or missing.
    pub notes: Vec<String>,
    pub written: Written,
}

/// The configuration to collect for: the one at `config_path`, or, when that is the default
/// path and it does not load, the defaults with `status`'s warning. `Ok((config, None))`
/// when it loaded.
pub fn resolve(
    config_path: &Path,
    explicit: bool,
) -> Result<(Config, Option<String>), ConfigError> {
    match Config::load(config_path) {
        Ok(config) => Ok((config, None)),
        Err(e) if explicit => Err(e),
        // The same fallback and words as `status`.
        Err(_) => Ok((
            Config::default(),
            Target::resolve(config_path, false)?.warning,
        )),
    }
}

/// Runs `pilot-agent collect-logs`.
pub async fn collect_logs(
    config_path: &Path,
    explicit: bool,
    output: Option<&Path>,
) -> Result<Collected, CollectLogsError> {
    let (config, warning) = resolve(config_path, explicit)?;
    let tools = Tools::default();
    let request = Request {
        config: &config,
        config_loaded: warning.is_none(),
        warning: warning.as_deref(),
        output,
        tools: &tools,
    };
    let written = diagnostics::collect(&request).await?;
    let notes = written
        .incomplete()
        .map(|p| match &p.problem {
            Some(Problem::Missing(why)) => format!("{}: not collected: {why}", p.name),
            Some(Problem::Partial(why)) => format!("{}: partial: {why}", p.name),
            None => p.name.clone(),
        })
        .collect();
    Ok(Collected {
        path: written.path.clone(),
        warning,
        notes,
        written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_default_configuration_falls_back_and_an_explicit_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("agent.yaml");
        let (config, warning) = resolve(&missing, false).unwrap();
        assert_eq!(config, Config::default());
        let w = warning.unwrap();
        assert!(w.contains("reading the default state directory"), "{w}");
        assert!(matches!(
            resolve(&missing, true),
            Err(ConfigError::Read { .. })
        ));
        std::fs::write(&missing, "state_dir: relative\n").unwrap();
        assert!(resolve(&missing, false).unwrap().1.is_some());
        assert!(matches!(
            resolve(&missing, true),
            Err(ConfigError::Invalid { .. })
        ));
        std::fs::write(&missing, format!("state_dir: {}\n", dir.path().display())).unwrap();
        let (config, warning) = resolve(&missing, true).unwrap();
        assert_eq!(config.state_dir, dir.path());
        assert_eq!(warning, None);
    }
}
