//! The command line: the contract operators, systemd units and the Pilot CLI script against.
//! Exit codes follow `cloud-init status`: 0 done and healthy, 1 error, 2 degraded.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Default configuration path; `--config` or `PILOT_AGENT_CONFIG` override it.
pub const DEFAULT_CONFIG: &str = "/etc/pilot/agent.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "pilot-agent",
    version,
    about = "Host agent for a Pilot VM",
    long_about = "Host agent for a Pilot VM.\n\n\
        Converges the host to a known state, idempotently: a private CA and certificates, Docker \
        configured for mutual TLS on 2376, an nftables table that locks 2375 before Docker \
        listens, the Waypoint server and runner containers, and the database user for \
        applications. Serves health and credentials over HTTPS.\n\n\
        Exit codes (as `cloud-init status`): 0 done and healthy, 1 error, 2 degraded."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "PILOT_AGENT_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Converge the host once and exit (0 healthy, 1 error, 2 degraded).
    Up(UpArgs),
    /// Converge, then serve the HTTPS endpoint and re-converge on drift until SIGTERM.
    Run,
    /// Apply only the agent's nftables table (for the early-boot unit ordered before docker.service).
    Firewall,
    /// Show what the agent did and whether the host is healthy (exit 0 done, 1 error, 2 degraded).
    ///
    /// Reads STATE_DIR/status.json, which `up` and `run` write. Exit codes, as `cloud-init
    /// status`: 0 done and healthy, 1 error, 2 degraded. Unlike cloud-init, a host where the
    /// agent never ran (no status file: `not-started`) exits 1, and so does a run whose agent
    /// was killed before it finished (`running`, but its pid is gone). A run still under way
    /// reports its condition so far; `--wait` waits for the end, at most `--timeout` seconds
    /// (then it reports the state, says so on stderr and exits 1).
    ///
    /// --history shows the last converge passes instead (STATE_DIR/history.jsonl: `up` and
    /// every pass of `run`, the newest 200 or more kept), newest last: when each started and
    /// how long after power-on, the command and `run`'s trigger, the condition, the time it
    /// took, and its steps slowest first with their milliseconds (as `systemd-analyze blame`).
    /// It exits 1 when there is no pass to show, else 0 whatever the passes' conditions (the
    /// host's health now is plain `status`'s answer).
    ///
    /// Works without a valid configuration: if the default one cannot be loaded, it warns and
    /// reads the default state directory. Never prints a secret.
    #[command(verbatim_doc_comment)]
    Status(StatusArgs),
    /// Print what the Pilot CLI needs: Waypoint address and token, database credentials, CA.
    ///
    /// For root (the token and password files are 0600). Parts whose section is not configured
    /// or whose step has not converged yet are left out and listed under `missing`. The
    /// Waypoint address is the first `host.extra_names` entry, else a specific
    /// `waypoint.publish_address`, else `host.hostname`, else the host's first usable address;
    /// the port is `waypoint.grpc_port`. Exits 0 when it printed (even with parts missing:
    /// check `missing`), 1 when the configuration or a file cannot be read.
    #[command(verbatim_doc_comment)]
    Credentials(CredentialsArgs),
    /// Back up the Waypoint server and the agent's tokens into one file (0600).
    ///
    /// Waypoint's online snapshot (`waypoint server snapshot`) with the bootstrap token, the
    /// runner tokens and the advertise address record, as a tar file whose manifest lists each
    /// part's size and SHA-256. Not the host's CA or keys: they belong to the VM. Written
    /// atomically to --output, else to `backup.dir` (default STATE_DIR/backups) as
    /// pilot-backup-TIME.tar; prints the file. `run` takes backups on the `backup:` schedule.
    #[command(verbatim_doc_comment)]
    Backup(BackupArgs),
    /// Restore a backup onto this VM's Waypoint server (a fresh VM, or the one it came from).
    ///
    /// Checks every part against the manifest first (a mismatch changes nothing), stages the
    /// snapshot (`waypoint server restore -exit`, the server restarts with it), puts the
    /// backup's tokens back so runners and the Pilot CLI keep working, converges, and says
    /// which tokens no longer work. Waits for a pass of `run` under way to finish first.
    #[command(verbatim_doc_comment)]
    Restore(RestoreArgs),
    /// Write one redacted archive of logs and state to attach to a support ticket.
    ///
    /// Holds `status --long` and its JSON, the agent's journal since boot, the newest lines
    /// of each managed container's log (and its inspect output), the agent's nftables table,
    /// dockerd's daemon.json, versions (agent, dockerd, kernel, OS) and the certificates'
    /// summary, with a MANIFEST that lists each part and why any is missing. Every secret the
    /// agent knows (Waypoint tokens, database and admin passwords, endpoint tokens, private
    /// keys) is replaced by [REDACTED:KIND] before it is written. For root (the secret files
    /// are 0600). Works without a valid configuration, as `status` does. The archive is 0600;
    /// its path is printed. Exits 0 when it was written (even with parts missing: see the
    /// MANIFEST), 1 when nothing could be written or an explicit --config does not load.
    #[command(verbatim_doc_comment)]
    CollectLogs(CollectLogsArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Write the man pages generated from this command line (for packaging).
    #[command(hide = true)]
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Make a new database password and set it on the role (otherwise it is never regenerated).
    #[arg(long)]
    pub rotate_db_password: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Add per-step durations and details, certificate expiry and host figures.
    #[arg(long)]
    pub long: bool,
    /// Wait until the agent is done (or failed) before reporting.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds and report the state then.
    #[arg(long, default_value_t = 300, requires = "wait")]
    pub timeout: u64,
    /// Show the last converge passes, newest last, each step's duration slowest first.
    #[arg(long, conflicts_with_all = ["long", "wait"])]
    pub history: bool,
    /// With --history: how many passes to show.
    #[arg(
        long,
        default_value_t = 10,
        requires = "history",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Write the backup here instead of the backup directory.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A file written by `pilot-agent backup` (or the schedule).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct CredentialsArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CollectLogsArgs {
    /// The archive to write (default: ./pilot-agent-logs-HOSTNAME-TIMESTAMP.tar.gz).
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write pilot-agent.8 and one page per subcommand into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Writes `pilot-agent.8` and `pilot-agent-SUBCOMMAND.8` (hidden ones left out) into `dir`,
/// generated from this very definition so the manual cannot drift from `--help`. Returns the
/// pages written.
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut pages = Vec::new();
    // Section 8 (system administration), as the units' Documentation=man:pilot-agent(8).
    let mut write = |name: String, usage: String, cmd: clap::Command| -> std::io::Result<()> {
        let path = dir.join(format!("{name}.8"));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.display_name(name.clone()).bin_name(usage))
            .title(name.to_uppercase())
            .section("8")
            .render(&mut out)?;
        std::fs::write(&path, out)?;
        pages.push(path);
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        write(
            format!("pilot-agent-{name}"),
            format!("pilot-agent {name}"),
            sub.clone(),
        )?;
    }
    write("pilot-agent".to_owned(), "pilot-agent".to_owned(), cmd)?;
    Ok(pages)
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file; reports every problem with file, line and column.
    Validate {
        /// The file to check.
        file: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
