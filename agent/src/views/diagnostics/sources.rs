//! The parts of the diagnostics archive, each gathered on its own: a part that cannot be had
//! says why ([`Raw::missing`]) and never stops the others. Nothing here redacts: the caller
//! runs every part through the redactor before a byte of it is kept.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::query_parameters::{ListContainersOptionsBuilder, LogsOptionsBuilder};
use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::redact::LinePrefix;
use crate::config::Config;
use crate::pki;
use crate::views::status_report::{
    self, CertExpiry, Extras, Observation, Target, render_json, render_text,
};

/// Width of `status.txt` (what `pilot-agent status --long` prints without `COLUMNS`).
const STATUS_WIDTH: usize = 100;
/// Bound on one Docker API call.
const DOCKER_CALL: Duration = Duration::from_secs(20);
/// Bound on `journalctl` and `nft`.
const TOOL_LIMIT: Duration = Duration::from_secs(60);
/// The journal is cut to its newest this many bytes.
pub const JOURNAL_MAX: usize = 32 * 1024 * 1024;
/// A container's log is cut to its newest this many bytes (on top of the line count).
const CONTAINER_LOG_MAX: usize = 8 * 1024 * 1024;

/// One part before redaction.
#[derive(Debug, Clone)]
pub struct Raw {
    /// The path inside the archive, below its top directory.
    pub name: String,
    pub text: String,
    /// `None`: collected whole.
    pub problem: Option<Problem>,
    /// For a log whose lines carry a prefix of their own (see [`Redactor::redact_log`]).
    pub line_prefix: Option<LinePrefix>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Collected, but something of it is missing (the text says what).
    Partial(String),
    /// Not collected; the text is the reason.
    Missing(String),
}

impl Raw {
    pub fn ok(name: impl Into<String>, text: impl Into<String>) -> Raw {
        Raw {
            name: name.into(),
            text: text.into(),
            problem: None,
            line_prefix: None,
        }
    }

    /// A part that could not be collected: its file says why, and so does the MANIFEST.
    pub fn missing(name: impl Into<String>, why: impl Into<String>) -> Raw {
        let name = name.into();
        let why = why.into();
        Raw {
            text: format!("pilot-agent collect-logs: {name} could not be collected: {why}\n"),
            name,
            problem: Some(Problem::Missing(why)),
            line_prefix: None,
        }
    }
}

/// The prefix of a line of `containers/NAME.log`: `TIMESTAMP STREAM `.
pub fn container_log_prefix(line: &str) -> usize {
    let Some(first) = line.find(' ') else {
        return 0;
    };
    match line[first + 1..].find(' ') {
        Some(second) if first + 1 + second < 120 => first + 1 + second + 1,
        _ => 0,
    }
}

/// The prefix of a line of `journalctl -o short-iso`: `TIMESTAMP HOST UNIT[PID]: `.
pub fn journal_prefix(line: &str) -> usize {
    if line.starts_with("-- ") {
        return 0;
    }
    let head = &line.as_bytes()[..line.len().min(256)];
    head.windows(2)
        .position(|w| w == b": ")
        .map_or(0, |i| i + 2)
}

/// The programs run and how much is taken; tests point them elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// `journalctl` and its arguments, up to (not including) the unit selection.
    pub journalctl: Vec<String>,
    /// `nft` and leading arguments (as [`crate::firewall::Nft`]).
    pub nft: Vec<String>,
    /// The newest lines taken from each managed container's log.
    pub log_lines: usize,
    /// `/etc/os-release`.
    pub os_release: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            journalctl: vec!["journalctl".into()],
            nft: vec!["nft".into()],
            log_lines: 500,
            os_release: PathBuf::from("/etc/os-release"),
        }
    }
}

/// `history.txt`: `status --history --limit 50` (why the last boots and passes took as long
/// as they did).
pub fn history(config: &Config) -> Raw {
    match crate::views::history::HistoryView::read(&config.state().history(), 50) {
        Ok(view) if view.is_empty() => Raw::missing("history.txt", "no pass recorded yet"),
        Ok(view) => Raw::ok(
            "history.txt",
            crate::views::history::render_text(&view, STATUS_WIDTH),
        ),
        Err(e) => Raw::missing("history.txt", e.to_string()),
    }
}

/// `backup-last.json`: the last backup attempt and the last good backup (no secret in it).
pub fn backup_record(config: &Config) -> Raw {
    let path = config.state().backup_record();
    match std::fs::read_to_string(&path) {
        Ok(text) => Raw::ok("backup-last.json", text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Raw::missing("backup-last.json", "no backup attempted by `run` yet")
        }
        Err(e) => Raw::missing("backup-last.json", format!("{}: {e}", path.display())),
    }
}

/// `status.txt` (`status --long`) and `status.json` (`status --json --long`), with the
/// warning `status` prints on stderr when the configuration did not load.
pub fn status(config: &Config, warning: Option<&str>) -> Vec<Raw> {
    let target = Target {
        state_dir: config.state_dir.clone(),
        daemon_config: config.docker.daemon_config.clone(),
        warning: warning.map(str::to_string),
    };
    match Observation::observe(&target.status_path()) {
        Ok(observation) => {
            let extras = Extras::gather(&target);
            let mut text = String::new();
            if let Some(w) = warning {
                let _ = writeln!(text, "pilot-agent: {w}");
            }
            text.push_str(&render_text(
                &observation,
                Some(&extras),
                STATUS_WIDTH,
                true,
                OffsetDateTime::now_utc(),
            ));
            // Serializing a Value cannot fail.
            let mut json = serde_json::to_string_pretty(&render_json(&observation, Some(&extras)))
                .unwrap_or_default();
            json.push('\n');
            vec![Raw::ok("status.txt", text), Raw::ok("status.json", json)]
        }
        Err(e) => vec![
            Raw::missing("status.txt", e.to_string()),
            Raw::missing("status.json", e.to_string()),
        ],
    }
}

/// What a program printed, its newest `max` bytes of stdout.
struct ToolOutput {
    stdout: Vec<u8>,
    /// Bytes dropped from the start of stdout.
    cut: u64,
    stderr: String,
    status: std::process::ExitStatus,
}

/// Runs `argv` (at most [`TOOL_LIMIT`]), keeping the newest `max` bytes of its stdout.
async fn run_tool(argv: &[String], max: usize) -> Result<ToolOutput, String> {
    let (program, args) = argv.split_first().ok_or("no program given")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let run = async {
        let mut kept: Vec<u8> = Vec::new();
        let mut cut = 0u64;
        let mut err = Vec::new();
        let read_err = stderr.read_to_end(&mut err);
        let read_out = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = stdout.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                // Drop the oldest bytes in batches, not on every read.
                if kept.len() > max.saturating_mul(2).max(1 << 20) {
                    let drop = kept.len() - max;
                    kept.drain(..drop);
                    cut += drop as u64;
                }
            }
            Ok::<(), std::io::Error>(())
        };
        let (out, errs) = tokio::join!(read_out, read_err);
        out.map_err(|e| format!("reading the output of {program}: {e}"))?;
        errs.map_err(|e| format!("reading the errors of {program}: {e}"))?;
        let status = child
            .wait()
            .await
            .map_err(|e| format!("waiting for {program}: {e}"))?;
        if kept.len() > max {
            let drop = kept.len() - max;
            kept.drain(..drop);
            cut += drop as u64;
        }
        Ok(ToolOutput {
            stdout: kept,
            cut,
            stderr: String::from_utf8_lossy(&err).trim().to_string(),
            status,
        })
    };
    tokio::time::timeout(TOOL_LIMIT, run)
        .await
        .map_err(|_| format!("{program} did not finish within {} s", TOOL_LIMIT.as_secs()))?
}

/// `journal.txt`: the agent's units since boot, as `journalctl -b -u pilot-agent -u
/// pilot-agent-firewall --no-pager -o short-iso` prints them (the newest [`JOURNAL_MAX`]
/// bytes). Without journalctl, or when it fails, the file says why.
pub async fn journal(tools: &Tools) -> Raw {
    const NAME: &str = "journal.txt";
    let mut argv = tools.journalctl.clone();
    argv.extend(
        [
            "-b",
            "-u",
            "pilot-agent",
            "-u",
            "pilot-agent-firewall",
            "--no-pager",
            "-o",
            "short-iso",
        ]
        .map(String::from),
    );
    match run_tool(&argv, JOURNAL_MAX).await {
        Err(why) => Raw::missing(NAME, why),
        Ok(out) if !out.status.success() => Raw::missing(
            NAME,
            format!(
                "`{}` failed ({}): {}",
                argv.join(" "),
                out.status,
                out.stderr
            ),
        ),
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut problem = None;
            if out.cut > 0 {
                // Start at a whole line.
                if let Some(nl) = text.find('\n') {
                    text.drain(..=nl);
                }
                let why = format!(
                    "the journal since boot is larger than {} MiB: its oldest {} bytes were \
                     left out",
                    JOURNAL_MAX / (1024 * 1024),
                    out.cut
                );
                text.insert_str(0, &format!("[pilot-agent collect-logs: {why}]\n"));
                problem = Some(Problem::Partial(why));
            }
            if !out.stderr.is_empty() {
                // journalctl says "No journal files were found." and the like on stderr.
                text.push_str(&format!("[journalctl: {}]\n", out.stderr));
            }
            Raw {
                name: NAME.into(),
                text,
                problem,
                line_prefix: Some(journal_prefix),
            }
        }
    }
}

/// `nft.txt`: the agent's own table only (`nft list table inet TABLE`), in the current
/// network namespace.
pub async fn nft(tools: &Tools, table: &str) -> Raw {
    const NAME: &str = "nft.txt";
    let mut argv = tools.nft.clone();
    argv.extend(["list", "table", "inet", table].map(String::from));
    match run_tool(&argv, JOURNAL_MAX).await {
        Err(why) => Raw::missing(NAME, why),
        Ok(out) if !out.status.success() => {
            let why = if out.stderr.contains("No such file or directory") {
                format!("the table inet {table} does not exist ({})", out.stderr)
            } else {
                format!(
                    "`{}` failed ({}): {}",
                    argv.join(" "),
                    out.status,
                    out.stderr
                )
            };
            Raw::missing(NAME, why)
        }
        Ok(out) => Raw::ok(NAME, String::from_utf8_lossy(&out.stdout).into_owned()),
    }
}

/// `docker/daemon.json`: the file the agent writes (`docker.daemon_config`), as it is.
pub fn daemon_json(config: &Config) -> Raw {
    const NAME: &str = "docker/daemon.json";
    let path = &config.docker.daemon_config;
    match std::fs::read(path) {
        Ok(bytes) => Raw::ok(NAME, String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) => Raw::missing(NAME, format!("cannot read {}: {e}", path.display())),
    }
}

/// An error with its causes, `error: cause: cause` (a cause its error already names is not
/// repeated).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}

/// A call to dockerd, bounded by [`DOCKER_CALL`]; `what` (if not empty) leads its error.
async fn bounded<T, E: std::error::Error + 'static>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    let lead = if what.is_empty() {
        String::new()
    } else {
        format!("{what}: ")
    };
    match tokio::time::timeout(DOCKER_CALL, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{lead}{}", chain(&e))),
        Err(_) => Err(format!(
            "{lead}no answer within {} s",
            DOCKER_CALL.as_secs()
        )),
    }
}

/// Connects to dockerd's socket (`docker.socket`).
pub async fn docker(config: &Config) -> Result<Docker, String> {
    bounded("", crate::waypoint::connect(&config.docker.socket)).await
}

/// File names inside the archive: what a container name may hold, nothing else.
fn file_name(name: &str) -> String {
    safe_name(name, "unnamed")
}

/// `name` with every character but `A-Za-z0-9-_.` replaced by `_` and no leading dot;
/// `fallback` when nothing is left.
pub(super) fn safe_name(name: &str, fallback: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match s.trim_start_matches('.') {
        "" => fallback.to_string(),
        t => t.to_string(),
    }
}

/// `containers/list.txt` and, per container labelled `io.pilot.managed=true` (running or
/// not), `containers/NAME.log` (its newest `tools.log_lines` lines of stdout and stderr,
/// with dockerd's timestamps, in the order dockerd gives them) and `containers/NAME.json`
/// (`docker inspect`).
pub async fn containers(docker: &Result<Docker, String>, tools: &Tools) -> Vec<Raw> {
    const LIST: &str = "containers/list.txt";
    let docker = match docker {
        Ok(d) => d,
        Err(why) => return vec![Raw::missing(LIST, why.clone())],
    };
    let filters: HashMap<String, Vec<String>> = HashMap::from([(
        "label".to_string(),
        vec![format!("{}=true", crate::waypoint::LABEL_MANAGED)],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let list = match bounded(
        "list the managed containers",
        docker.list_containers(Some(options)),
    )
    .await
    {
        Ok(list) => list,
        Err(why) => return vec![Raw::missing(LIST, why)],
    };
    let mut summary = String::from("NAME\tROLE\tSTATE\tSTATUS\tIMAGE\tID\n");
    let mut parts = Vec::new();
    let mut names: Vec<(String, String)> = Vec::new();
    for c in &list {
        let name = c
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_string())
            .or_else(|| c.id.clone())
            .unwrap_or_default();
        let role = c
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::waypoint::LABEL_ROLE))
            .cloned()
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            summary,
            "{name}\t{role}\t{}\t{}\t{}\t{}",
            c.state
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            c.status.clone().unwrap_or_default(),
            c.image.clone().unwrap_or_default(),
            c.id.clone().unwrap_or_default(),
        );
        names.push((name, c.id.clone().unwrap_or_default()));
    }
    names.sort();
    parts.push(Raw::ok(LIST, summary));
    for (name, id) in names {
        let file = file_name(&name);
        let target = if id.is_empty() { &name } else { &id };
        parts.push(container_log(docker, target, &file, tools.log_lines).await);
        let inspect_name = format!("containers/{file}.json");
        parts.push(
            match bounded(
                &format!("inspect {name}"),
                docker.inspect_container(
                    target,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                ),
            )
            .await
            {
                Ok(inspect) => {
                    // Serializing the API's own model cannot fail.
                    let mut json = serde_json::to_string_pretty(&inspect).unwrap_or_default();
                    json.push('\n');
                    Raw::ok(inspect_name, json)
                }
                Err(why) => Raw::missing(inspect_name, why),
            },
        );
    }
    parts
}

/// The newest `lines` lines of a container's stdout and stderr, each line as
/// `TIMESTAMP STREAM MESSAGE`.
async fn container_log(docker: &Docker, target: &str, file: &str, lines: usize) -> Raw {
    let name = format!("containers/{file}.log");
    let options = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        .tail(&lines.to_string())
        .build();
    let read = async {
        let mut stream = docker.logs(target, Some(options));
        let mut text = String::new();
        let mut cut = false;
        while let Some(chunk) = stream.next().await {
            let (stream_name, message) = match chunk? {
                LogOutput::StdOut { message } => ("stdout", message),
                LogOutput::StdErr { message } => ("stderr", message),
                LogOutput::Console { message } => ("console", message),
                LogOutput::StdIn { .. } => continue,
            };
            let message = String::from_utf8_lossy(&message);
            for line in message.lines() {
                // dockerd puts the timestamp first: "2025-01-02T03:04:05.123456789Z text".
                let (ts, rest) = line.split_once(' ').unwrap_or((line, ""));
                let _ = writeln!(text, "{ts} {stream_name} {rest}");
            }
            if text.len() > CONTAINER_LOG_MAX * 2 {
                let drop = text.len() - CONTAINER_LOG_MAX;
                let at = text[drop..].find('\n').map_or(drop, |i| drop + i + 1);
                text.drain(..at);
                cut = true;
            }
        }
        Ok::<_, bollard::errors::Error>((text, cut))
    };
    match bounded(&format!("read the log of {target}"), read).await {
        Ok((text, cut)) => Raw {
            name,
            text,
            problem: cut.then(|| {
                Problem::Partial(format!(
                    "longer than {} MiB: cut to its newest lines",
                    CONTAINER_LOG_MAX / (1024 * 1024)
                ))
            }),
            line_prefix: Some(container_log_prefix),
        },
        Err(why) => Raw::missing(name, why),
    }
}

/// `versions.txt`: the agent, dockerd (through the API), the kernel and `/etc/os-release`.
pub async fn versions(docker: &Result<Docker, String>, tools: &Tools) -> Raw {
    let mut text = String::new();
    let mut missing = Vec::new();
    let _ = writeln!(text, "pilot-agent   {}", env!("CARGO_PKG_VERSION"));
    match docker {
        Ok(d) => match bounded("dockerd's /version", d.version()).await {
            Ok(v) => {
                let s = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    text,
                    "dockerd       {} (API {}, minimum API {}, commit {}, {}, {}/{}, kernel {})",
                    s(&v.version),
                    s(&v.api_version),
                    s(&v.min_api_version),
                    s(&v.git_commit),
                    s(&v.go_version),
                    s(&v.os),
                    s(&v.arch),
                    s(&v.kernel_version),
                );
            }
            Err(why) => {
                let _ = writeln!(text, "dockerd       unknown: {why}");
                missing.push(format!("dockerd: {why}"));
            }
        },
        Err(why) => {
            let _ = writeln!(text, "dockerd       unknown: {why}");
            missing.push(format!("dockerd: {why}"));
        }
    }
    for (label, path) in [
        ("kernel", "/proc/sys/kernel/osrelease"),
        ("kernel build", "/proc/version"),
    ] {
        match std::fs::read_to_string(path) {
            Ok(v) => {
                let _ = writeln!(text, "{label:13} {}", v.trim());
            }
            Err(e) => {
                let _ = writeln!(text, "{label:13} unknown: cannot read {path}: {e}");
                missing.push(format!("{label}: {e}"));
            }
        }
    }
    let _ = writeln!(text, "\n{}:", tools.os_release.display());
    match std::fs::read_to_string(&tools.os_release) {
        Ok(v) => text.push_str(&v),
        Err(e) => {
            let _ = writeln!(text, "cannot read it: {e}");
            missing.push(format!("{}: {e}", tools.os_release.display()));
        }
    }
    Raw {
        name: "versions.txt".into(),
        text,
        problem: (!missing.is_empty()).then(|| Problem::Partial(missing.join("; "))),
        line_prefix: None,
    }
}

/// `certificates.txt`: for each of the agent's certificates (those `status --long` lists,
/// the Waypoint server's and, on a runner host, the server VM's CA), its subject, issuer,
/// validity (days left, as `status --long` computes them), SANs and SHA-256 fingerprint.
pub fn certificates(config: &Config) -> Raw {
    let now = OffsetDateTime::now_utc();
    let mut list: Vec<CertExpiry> = status_report::certificates(&config.state_dir, now);
    let state = config.state();
    let mut extra = vec![("waypoint".to_string(), state.pki().waypoint().cert)];
    let server_ca = state.waypoint().server_ca_dir().join("ca.pem");
    if server_ca.exists() {
        extra.push(("server-vm-ca".to_string(), server_ca));
    }
    for (name, path) in extra {
        list.push(CertExpiry {
            name,
            path,
            not_after: None,
            days_left: None,
            problem: None,
        });
    }
    let mut text = String::new();
    let mut unreadable = Vec::new();
    for c in &list {
        let _ = writeln!(text, "{} ({})", c.name, c.path.display());
        match describe(&c.path, now) {
            Ok(lines) => text.push_str(&lines),
            Err(why) => {
                let _ = writeln!(text, "  {why}");
                if why != "absent" {
                    unreadable.push(format!("{}: {why}", c.name));
                }
            }
        }
        text.push('\n');
    }
    Raw {
        name: "certificates.txt".into(),
        text,
        problem: (!unreadable.is_empty()).then(|| Problem::Partial(unreadable.join("; "))),
        line_prefix: None,
    }
}

/// The summary lines of the first certificate in a PEM file.
fn describe(path: &Path, now: OffsetDateTime) -> Result<String, String> {
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("absent".into()),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let der = pki::parse_pem_cert(&pem).ok_or("not a PEM certificate")?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|_| "not a valid certificate")?;
    let v = cert.validity();
    let not_after = v.not_after.to_datetime();
    let sans: Vec<String> = pki::cert_sans(&cert)
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut out = String::new();
    let _ = writeln!(out, "  subject     {}", cert.subject());
    let _ = writeln!(out, "  issuer      {}", cert.issuer());
    let _ = writeln!(out, "  serial      {}", cert.raw_serial_as_string());
    let _ = writeln!(
        out,
        "  not before  {}",
        crate::status_file::millis::format(v.not_before.to_datetime())
    );
    let _ = writeln!(
        out,
        "  not after   {} ({} days left)",
        crate::status_file::millis::format(not_after),
        (not_after - now).whole_days()
    );
    let _ = writeln!(
        out,
        "  SANs        {}",
        if sans.is_empty() {
            "-".to_string()
        } else {
            sans.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "  sha256      {}",
        pilot_values::Fingerprint::of_der(&der)
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::diagnostics::{Redactor, SecretKind};

    #[tokio::test]
    async fn a_missing_program_is_a_reason_not_an_error() {
        let tools = Tools {
            journalctl: vec!["/nonexistent/journalctl".into()],
            nft: vec!["/nonexistent/nft".into()],
            ..Tools::default()
        };
        let j = journal(&tools).await;
        assert!(matches!(j.problem, Some(Problem::Missing(_))), "{j:?}");
        assert!(
            j.text.contains("cannot run /nonexistent/journalctl"),
            "{}",
            j.text
        );
        let n = nft(&tools, "pilot_agent").await;
        assert!(matches!(n.problem, Some(Problem::Missing(_))), "{n:?}");
    }

    #[tokio::test]
    async fn a_failing_program_says_how_and_a_long_output_keeps_its_end() {
        let tools = Tools {
            journalctl: vec!["sh".into(), "-c".into(), "echo nope >&2; exit 3".into()],
            ..Tools::default()
        };
        let j = journal(&tools).await;
        assert!(
            j.text.contains("nope") && j.text.contains("3"),
            "{}",
            j.text
        );

        let argv: Vec<String> = ["sh", "-c", "seq 1 400000"].map(String::from).to_vec();
        let out = run_tool(&argv, 1000).await.unwrap();
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.cut > 0);
        assert!(String::from_utf8_lossy(&out.stdout).ends_with("399999\n400000\n"));
    }

    #[test]
    fn log_line_prefixes() {
        let line = "2025-01-02T03:04:05.123456789Z stderr message: with spaces";
        assert_eq!(&line[container_log_prefix(line)..], "message: with spaces");
        assert_eq!(container_log_prefix("nospace"), 0);
        let line = "2025-01-02T03:04:05+0000 vm pilot-agent[42]: converge finished: ok";
        assert_eq!(&line[journal_prefix(line)..], "converge finished: ok");
        assert_eq!(journal_prefix("-- No entries --"), 0);
        assert_eq!(journal_prefix("no colon"), 0);
    }

    #[test]
    fn a_secret_split_over_two_log_lines_is_found_behind_the_next_prefix() {
        let mut r = Redactor::new();
        let token = "bootstrap-9f3KxQ2vLmP8wZ7rT1yB";
        r.add_value(SecretKind::BootstrapToken, token);
        let (a, b) = token.split_at(12);
        let log = format!(
            "2025-01-02T03:04:05.1Z stdout token {a}\n2025-01-02T03:04:05.2Z stdout {b} end\n"
        );
        let out = r.redact_log(&log, Some(container_log_prefix));
        assert_eq!(
            out.text,
            "2025-01-02T03:04:05.1Z stdout token [REDACTED:bootstrap-token]\n end\n"
        );
        // Without the prefix rule the halves stay apart (what a plain part gets).
        assert!(r.redact(&log).text.contains(a));
    }

    #[test]
    fn container_names_make_safe_file_names() {
        assert_eq!(file_name("waypoint-runner-1"), "waypoint-runner-1");
        assert_eq!(file_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(file_name(".."), "unnamed");
    }
}
