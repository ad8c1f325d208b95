//! `pilot-agent status [--json] [--long] [--wait [--timeout SECS]]`: reads the status view
//! ([`crate::views::status_report`]), waits when asked, and picks the output and the exit code
//! (0 done and healthy, 1 error, 2 degraded, as `cloud-init status`).
//!
//! `pilot-agent status --history [--limit N] [--json]`: the newest passes from the history
//! view ([`crate::views::history`]); see [`history`] for its exit code.

use std::time::Duration;

use time::OffsetDateTime;

pub use crate::history_file::HistoryError;
use crate::status_file::StatusError;
use crate::views::history::{self, HistoryView};
pub use crate::views::status_report::Target;
use crate::views::status_report::{Extras, Observation, render_json, render_text, wait_for};

/// How often `--wait` reads the status file: fast enough that the answer follows the agent
/// within a blink, cheap enough (one small file read) to be negligible.
pub const POLL_INTERVAL: Duration = Duration::from_millis(150);

/// Width of the plain output when `COLUMNS` does not say (wide enough for a terminal over SSH).
const DEFAULT_WIDTH: usize = 100;

/// What the command was asked for.
#[derive(Debug, Clone, Default)]
pub struct StatusOptions {
    pub json: bool,
    pub long: bool,
    /// `--wait`, bounded by `--timeout`.
    pub wait: Option<Duration>,
}

/// What `main.rs` prints and returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// For stdout.
    pub output: String,
    /// For stderr after the output (the timeout). [`Target::warning`] is the caller's to print,
    /// before waiting.
    pub notes: Vec<String>,
    pub exit_code: u8,
}

/// Runs `pilot-agent status` against `target`.
pub fn status(target: &Target, options: &StatusOptions) -> Result<StatusReport, StatusError> {
    let path = target.status_path();
    let mut notes = Vec::new();
    let (observation, timed_out) = match options.wait {
        Some(timeout) => {
            let w = wait_for(&path, timeout, POLL_INTERVAL)?;
            (w.observation, w.timed_out)
        }
        None => (Observation::observe(&path)?, false),
    };
    let extras = options.long.then(|| Extras::gather(target));
    let output = if options.json {
        // Serializing a Value cannot fail.
        let mut s = serde_json::to_string_pretty(&render_json(&observation, extras.as_ref()))
            .unwrap_or_default();
        s.push('\n');
        s
    } else {
        render_text(
            &observation,
            extras.as_ref(),
            output_width(),
            options.long,
            OffsetDateTime::now_utc(),
        )
    };
    let mut exit_code = observation.exit_code();
    if timed_out {
        let secs = options.wait.unwrap_or_default().as_secs();
        notes.push(format!("timed out after {secs} s waiting for pilot-agent"));
        exit_code = 1;
    }
    Ok(StatusReport {
        output,
        notes,
        exit_code,
    })
}

/// Runs `pilot-agent status --history` against `target`: the newest `limit` passes of
/// `STATE_DIR/history.jsonl` ([`crate::views::history`]).
///
/// Exit code: 1 when there is no pass to show (no history file, or nothing readable in it),
/// as `status` exits 1 for `not-started`: nothing is known to have converged here, and a
/// script asking for the history gets told so. 0 otherwise, whatever the passes' conditions:
/// the history is a record of the past, and the host's health now is `status`'s answer (a
/// pass that failed last week must not make this command fail). Unreadable lines are skipped
/// with a note on stderr.
pub fn history(target: &Target, limit: usize, json: bool) -> Result<StatusReport, HistoryError> {
    let view = HistoryView::read(&target.history_path(), limit)?;
    let output = if json {
        // Serializing a Value cannot fail.
        let mut s = serde_json::to_string_pretty(&history::render_json(&view)).unwrap_or_default();
        s.push('\n');
        s
    } else {
        history::render_text(&view, output_width())
    };
    Ok(StatusReport {
        output,
        notes: view.notes(),
        exit_code: if view.is_empty() { 1 } else { 0 },
    })
}

/// The terminal width: `COLUMNS` when set (shells export it), else a default that fits an
/// SSH session. Not the tty's size: piping to `less` or `grep` should not change the table.
pub fn output_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|w| *w >= 40)
        .unwrap_or(DEFAULT_WIDTH)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::status_file::{RunStatus, StepState};
    use crate::views::status_report::tests::{sample, write};

    #[test]
    fn status_times_out_with_exit_1_and_a_note() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &sample(StepState::Running, RunStatus::Running, std::process::id()),
        );
        let target = Target {
            state_dir: dir.path().to_path_buf(),
            daemon_config: dir.path().join("daemon.json"),
            warning: None,
        };
        let options = StatusOptions {
            json: true,
            long: false,
            wait: Some(Duration::from_millis(300)),
        };
        let r = status(&target, &options).unwrap();
        assert_eq!(r.exit_code, 1);
        assert_eq!(r.notes, vec!["timed out after 0 s waiting for pilot-agent"]);
        let v: Value = serde_json::from_str(&r.output).unwrap();
        assert_eq!(v["status"], "running");
    }
}
