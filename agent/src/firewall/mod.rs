//! The agent's nftables table: the lock on 2375, the allow-list on Docker's TLS port and on
//! published ports.
//!
//! The agent owns exactly one table (`inet pilot_agent` by default) and never reads, flushes
//! or changes any other: Docker's rules and the operator's stay theirs. [`converge`] lists
//! the table, and only when it differs from [`Ruleset`] (its chains, its rule comments, and
//! its rules' expressions against the [`Listed`] record of the last apply) replaces it in one
//! atomic `nft -j -f` transaction; a converged host sees no transaction at all. It runs
//! before dockerd is given a TCP listener (`up`), at boot before docker.service (`pilot-agent
//! firewall`, with [`FirewallSpec::fail_closed`] when the configuration does not load), and
//! under `run` whenever nft reports a change to the ruleset (`service::firewall_watch`).

mod ruleset;
pub mod watch;

use std::path::Path;
use std::process::Stdio;

use nftables::schema::Nftables;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

pub use ruleset::{
    COMMENT_PREFIX, ChainSpec, DOCKER_BRIDGES, FirewallSpec, Listed, ListedRule, METADATA_V4,
    METADATA_V6, Ruleset, waypoint_bootstrapped,
};

use crate::fsutil::{self, FsError, MODE_PUBLIC};

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run `{command}`: {source}")]
    Exec {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {}", stderr.trim())]
    Nft { command: String, stderr: String },
    #[error("cannot parse the output of `{command}`: {source}")]
    Parse {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("nft lists table inet {table} other than it was applied right before")]
    NotApplied { table: String },
    #[error(transparent)]
    Record(#[from] FsError),
}

/// How `nft` is run: the program and leading arguments. A real host runs plain `nft`; tests
/// prefix `ip netns exec NS` to work inside a namespace of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nft {
    argv: Vec<String>,
}

impl Default for Nft {
    fn default() -> Self {
        Nft {
            argv: vec!["nft".into()],
        }
    }
}

impl Nft {
    pub fn with_argv(argv: Vec<String>) -> Self {
        Nft { argv }
    }

    fn command(&self, args: &[&str]) -> (Command, String) {
        let mut all: Vec<&str> = self.argv.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        let text = all.join(" ");
        let mut cmd = Command::new(all[0]);
        cmd.args(&all[1..]);
        (cmd, text)
    }

    /// The table as nft lists it, or `None` when it does not exist.
    pub async fn list_table(
        &self,
        table: &str,
    ) -> Result<Option<Nftables<'static>>, FirewallError> {
        // JSON output, and JSON-free argv apart from the name (validated as an identifier).
        let (mut cmd, text) = self.command(&["-j", "list", "table", "inet", table]);
        let out =
            cmd.stdin(Stdio::null())
                .output()
                .await
                .map_err(|source| FirewallError::Exec {
                    command: text.clone(),
                    source,
                })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            // nft's words for a missing table ("No such file or directory", ENOENT).
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(FirewallError::Nft {
                command: text,
                stderr,
            });
        }
        parse_listing(&text, &out.stdout).map(Some)
    }

    /// Applies a batch in one transaction (`nft -j -f -`).
    pub async fn apply(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        // Serializing the crate's schema types cannot fail (plain data, string keys).
        let payload = serde_json::to_vec(batch).unwrap_or_default();
        let (mut cmd, text) = self.command(&["-j", "-f", "-"]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| FirewallError::Exec {
                command: text.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&payload)
                .await
                .map_err(|source| FirewallError::Exec {
                    command: text.clone(),
                    source,
                })?;
            // Dropping stdin closes it: nft reads to EOF.
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|source| FirewallError::Exec {
                command: text.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(FirewallError::Nft {
                command: text,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }
}

/// Parses what `command` (`nft -j list table ...`) printed. Pure: public for the fuzz targets
/// and tests (compare the result with [`Ruleset::matches`]).
pub fn parse_listing(command: &str, stdout: &[u8]) -> Result<Nftables<'static>, FirewallError> {
    serde_json::from_slice(stdout).map_err(|source| FirewallError::Parse {
        command: command.to_string(),
        source,
    })
}

/// What [`converge`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallReport {
    /// Whether a transaction was sent.
    pub changed: bool,
    pub table: String,
    pub rules: usize,
    pub hash: String,
}

impl FirewallReport {
    pub fn summary(&self) -> String {
        let what = if self.changed {
            "applied"
        } else {
            "already in place"
        };
        format!(
            "table inet {} {what} ({} rules, {})",
            self.table, self.rules, self.hash
        )
    }
}

/// Makes the live table equal to `spec`'s, sending a transaction only if it differs.
///
/// `record` is the file of the [`Listed`] rules of the last apply. With it, a table whose
/// comments match but whose expressions differ from the record (a rule replaced in place
/// under its comment) is replaced, and so is one with no record to compare with (the first
/// run after an upgrade, a lost file); after every apply the table is listed again and
/// recorded. Without it (`None`: tests of the ruleset alone) comments decide.
pub async fn converge(
    spec: &FirewallSpec,
    nft: &Nft,
    record: Option<&Path>,
) -> Result<FirewallReport, FirewallError> {
    let desired = Ruleset::new(spec);
    let report = |changed| FirewallReport {
        changed,
        table: desired.table.clone(),
        rules: desired.rule_count(),
        hash: desired.hash.clone(),
    };
    if let Some(live) = nft.list_table(&desired.table).await? {
        if desired.matches(&live) {
            let Some(path) = record else {
                return Ok(report(false));
            };
            let listed = Listed::of(&desired.table, &desired.hash, &live);
            if read_record(path).as_ref() == Some(&listed) {
                return Ok(report(false));
            }
            tracing::warn!(
                table = desired.table,
                "the table's rules differ from what was applied (changed in place) or \
                 there is no record of them; replacing the table"
            );
        }
    }
    nft.apply(&desired.batch()).await?;
    tracing::info!(
        table = desired.table,
        hash = desired.hash,
        "nftables table applied"
    );
    if let Some(path) = record {
        let live = nft.list_table(&desired.table).await?;
        let Some(live) = live.filter(|l| desired.matches(l)) else {
            return Err(FirewallError::NotApplied {
                table: desired.table.clone(),
            });
        };
        let listed = Listed::of(&desired.table, &desired.hash, &live);
        // Serializing plain data cannot fail.
        let text = serde_json::to_vec_pretty(&listed).unwrap_or_default();
        fsutil::write_atomic(path, &text, MODE_PUBLIC)?;
    }
    Ok(report(true))
}

/// The record at `path`, or `None` when it is missing or unreadable (the table is then
/// replaced and recorded anew).
fn read_record(path: &Path) -> Option<Listed> {
    let bytes = fsutil::read_optional(path).ok()??;
    serde_json::from_slice(&bytes).ok()
}
