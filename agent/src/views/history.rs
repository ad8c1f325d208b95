//! The history view, `pilot-agent status --history [--limit N] [--json]`: the newest converge
//! passes from `STATE_DIR/history.jsonl` ([`crate::history_file`]), newest last, each with its
//! steps slowest first, as `systemd-analyze blame` and `cloud-init analyze blame` show them:
//! what answers "why did this boot take 90 s".
//!
//! Like the status view it needs no valid configuration (the command falls back to the
//! default state directory) and prints no secret: a record holds step names, states and
//! durations, and only the one-line detail of an `error` or `degraded` step, the same text
//! `status` shows.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::history_file::{self, HistoryError, PassRecord};
use crate::views::status_report::{duration, truncate};

/// The history as read for one `--history` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryView {
    pub path: PathBuf,
    /// Whether the file exists at all.
    pub exists: bool,
    /// The passes to show: the newest `limit`, oldest first.
    pub passes: Vec<PassRecord>,
    /// How many readable records the file holds.
    pub recorded: usize,
    /// Lines that are not a record (skipped).
    pub skipped: usize,
}

impl HistoryView {
    /// Reads the history file at `path`, keeping its newest `limit` passes.
    pub fn read(path: &Path, limit: usize) -> Result<HistoryView, HistoryError> {
        let history = history_file::read(path)?;
        let exists = history.is_some();
        let history = history.unwrap_or_default();
        let recorded = history.records.len();
        let mut passes = history.records;
        passes.drain(..recorded.saturating_sub(limit));
        Ok(HistoryView {
            path: path.to_path_buf(),
            exists,
            passes,
            recorded,
            skipped: history.skipped,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.passes.is_empty()
    }

    /// The line that explains an empty answer.
    pub fn detail(&self) -> Option<String> {
        if !self.is_empty() {
            return None;
        }
        Some(if self.exists {
            format!(
                "no readable converge pass in {} ({} unreadable line(s))",
                self.path.display(),
                self.skipped
            )
        } else {
            format!(
                "pilot-agent has recorded no converge pass on this host (no {})",
                self.path.display()
            )
        })
    }

    /// For stderr: lines that were skipped, when there are records too (an empty answer says
    /// it in its detail).
    pub fn notes(&self) -> Vec<String> {
        if self.skipped == 0 || self.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "skipped {} unreadable line(s) of {} (a write cut short, or text that is not the \
             agent's)",
            self.skipped,
            self.path.display()
        )]
    }
}

/// The JSON answer: `passes` are the file's records as they are (newest last, steps in the
/// engine's order), with how many the file holds and how many lines were skipped.
pub fn render_json(view: &HistoryView) -> Value {
    let mut v = json!({
        "schema": history_file::SCHEMA,
        "recorded": view.recorded,
        "skipped_lines": view.skipped,
        // Serializing plain structs with string keys cannot fail.
        "passes": serde_json::to_value(&view.passes).unwrap_or_default(),
    });
    if let Some(detail) = view.detail() {
        v["detail"] = json!(detail);
    }
    v
}

/// The plain answer: a header line, then one block per pass (newest last): when and how long
/// after power-on it started, the command and its trigger, the condition, the time it took,
/// and its steps slowest first with their milliseconds. Details are cut to `width`.
pub fn render_text(view: &HistoryView, width: usize) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    if let Some(detail) = view.detail() {
        let _ = writeln!(out, "history:   none");
        let _ = writeln!(out, "detail:    {detail}");
        return out;
    }
    let _ = writeln!(
        out,
        "history:   {} of {} recorded passes, newest last ({})",
        view.passes.len(),
        view.recorded,
        view.path.display()
    );
    for pass in &view.passes {
        out.push('\n');
        render_pass(&mut out, pass, width);
    }
    out
}

fn render_pass(out: &mut String, pass: &PassRecord, width: usize) {
    let when = crate::status_file::millis::format(pass.started_at);
    let boot = match pass.since_boot_ms {
        Some(ms) => format!("{} after power-on", duration(ms_duration(ms))),
        None => "time since power-on unknown".to_string(),
    };
    let _ = writeln!(out, "pass:      {when} ({boot})");
    match pass.trigger.as_deref() {
        Some(t) if !t.is_empty() => {
            let _ = writeln!(out, "command:   {} (trigger: {t})", pass.command);
        }
        _ => {
            let _ = writeln!(out, "command:   {}", pass.command);
        }
    }
    let _ = writeln!(out, "condition: {}", json_word(&pass.condition));
    let took = if pass.duration_ms >= 1000 {
        format!(
            "{} ms ({})",
            pass.duration_ms,
            duration(ms_duration(pass.duration_ms))
        )
    } else {
        format!("{} ms", pass.duration_ms)
    };
    let _ = writeln!(out, "took:      {took}");
    let steps = pass.steps_by_duration();
    let durations: Vec<String> = steps
        .iter()
        .map(|s| match s.duration_ms {
            Some(ms) => format!("{ms} ms"),
            None => "-".to_string(),
        })
        .collect();
    let dur_w = durations.iter().map(|d| d.len()).max().unwrap_or(1);
    // A width beyond u16::MAX makes `format!` panic; a history file is outside input.
    let name_w = steps
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(4)
        .min(64);
    // "changed", "degraded": the longest states.
    let state_w = 8;
    let prefix_w = 2 + dur_w + 2 + name_w + 2 + state_w + 2;
    let detail_w = width.saturating_sub(prefix_w).max(20);
    for (step, dur) in steps.iter().zip(&durations) {
        let detail = step
            .detail
            .as_deref()
            .map(|d| truncate(d, detail_w))
            .unwrap_or_default();
        let line = format!(
            "  {dur:>dur_w$}  {:name_w$}  {:state_w$}  {detail}",
            step.name,
            json_word(&step.state)
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn ms_duration(ms: u64) -> time::Duration {
    time::Duration::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// A value's JSON word (`healthy`, `changed`): the text and JSON answers use the same.
fn json_word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => String::from("?"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history_file::{PassClock, append};
    use crate::status_file::{Status, StepState};

    fn record(trigger: Option<&str>, durations: &[(&str, Option<i64>, StepState)]) -> PassRecord {
        let mut s = Status::start(
            if trigger.is_some() { "run" } else { "up" },
            durations.iter().map(|(n, _, _)| n.to_string()),
        );
        let t = s.started_at;
        for (step, (_, ms, state)) in s.steps.iter_mut().zip(durations) {
            step.state = *state;
            step.detail = format!("{state:?} detail\nmore");
            step.started_at = ms.map(|_| t);
            step.finished_at = Some(t + time::Duration::milliseconds(ms.unwrap_or(0)));
        }
        s.condition = s.compute_condition();
        s.finished_at = Some(t + time::Duration::seconds(4));
        let mut r = PassRecord::from_status(&s, trigger, &PassClock::start());
        r.duration_ms = 3754;
        r.since_boot_ms = Some(14_210);
        r
    }

    fn view_of(dir: &Path, records: &[PassRecord], limit: usize) -> HistoryView {
        let p = dir.join("history.jsonl");
        for r in records {
            append(&p, r).unwrap();
        }
        HistoryView::read(&p, limit).unwrap()
    }

    #[test]
    fn text_blocks_list_steps_slowest_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = record(
            None,
            &[
                ("firewall", Some(12), StepState::Changed),
                ("pki", Some(830), StepState::Changed),
                ("docker-tls", Some(2104), StepState::Changed),
            ],
        );
        let second = record(
            Some("docker-event: waypoint-server die"),
            &[
                ("firewall", Some(9), StepState::Ok),
                ("database", Some(3001), StepState::Degraded),
                ("waypoint-runners", None, StepState::Skipped),
            ],
        );
        let view = view_of(dir.path(), &[first, second], 10);
        let text = render_text(&view, 100);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("history:   2 of 2 recorded passes, newest last ("),
            "{text}"
        );
        assert_eq!(lines[1], "");
        assert!(
            lines[2].starts_with("pass:      ") && lines[2].ends_with("(14.2 s after power-on)"),
            "{text}"
        );
        assert_eq!(lines[3], "command:   up");
        assert_eq!(lines[4], "condition: healthy");
        assert_eq!(lines[5], "took:      3754 ms (3.8 s)");
        assert_eq!(lines[6], "  2104 ms  docker-tls  changed");
        assert_eq!(lines[7], "   830 ms  pki         changed");
        assert_eq!(lines[8], "    12 ms  firewall    changed");
        assert_eq!(lines[9], "");
        assert_eq!(
            lines[11],
            "command:   run (trigger: docker-event: waypoint-server die)"
        );
        assert_eq!(lines[12], "condition: degraded");
        assert_eq!(
            lines[14],
            "  3001 ms  database          degraded  Degraded detail"
        );
        assert_eq!(lines[15], "     9 ms  firewall          ok");
        assert_eq!(lines[16], "        -  waypoint-runners  skipped");
        assert_eq!(lines.len(), 17, "{text}");
        assert_eq!(view.notes(), Vec::<String>::new());
    }

    #[test]
    fn limit_keeps_the_newest_and_json_carries_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<PassRecord> = (0..5)
            .map(|i| {
                let mut r = record(Some("interval"), &[("firewall", Some(i), StepState::Ok)]);
                r.duration_ms = i as u64;
                r
            })
            .collect();
        let view = view_of(dir.path(), &records, 2);
        assert_eq!(view.recorded, 5);
        assert_eq!(view.passes, records[3..].to_vec());
        let v = render_json(&view);
        assert_eq!(v["schema"], 1);
        assert_eq!(v["recorded"], 5);
        assert_eq!(v["skipped_lines"], 0);
        assert!(v.get("detail").is_none());
        let passes = v["passes"].as_array().unwrap();
        assert_eq!(passes.len(), 2);
        assert_eq!(passes[1]["duration_ms"], 4);
        assert_eq!(passes[1]["trigger"], "interval");
        assert_eq!(passes[1]["steps"][0]["name"], "firewall");
        assert_eq!(passes[1]["steps"][0]["duration_ms"], 4);
        assert!(render_text(&view, 100).starts_with("history:   2 of 5 recorded passes"));
    }

    #[test]
    fn no_history_and_unreadable_lines_are_said() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("history.jsonl");
        let view = HistoryView::read(&p, 10).unwrap();
        assert!(view.is_empty());
        assert_eq!(
            render_text(&view, 100),
            format!(
                "history:   none\ndetail:    pilot-agent has recorded no converge pass on this \
                 host (no {})\n",
                p.display()
            )
        );
        let v = render_json(&view);
        assert_eq!(v["passes"], json!([]));
        assert_eq!(v["recorded"], 0);
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("recorded no converge pass")
        );

        std::fs::write(&p, "garbage\n{\"cut\": ").unwrap();
        let view = HistoryView::read(&p, 10).unwrap();
        assert!(view.is_empty());
        assert_eq!(
            view.detail().unwrap(),
            format!(
                "no readable converge pass in {} (2 unreadable line(s))",
                p.display()
            )
        );
        // With records, skipped lines are a note for stderr and a count in JSON.
        append(&p, &record(None, &[("firewall", Some(1), StepState::Ok)])).unwrap();
        let view = HistoryView::read(&p, 10).unwrap();
        assert_eq!(view.passes.len(), 1);
        assert_eq!(render_json(&view)["skipped_lines"], 2);
        let notes = view.notes();
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].starts_with("skipped 2 unreadable line(s) of "),
            "{notes:?}"
        );
    }

    #[test]
    fn long_details_are_cut_to_the_width() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = record(None, &[("database", Some(5), StepState::Error)]);
        r.steps[0].detail = Some("y".repeat(200));
        let text = render_text(&view_of(dir.path(), &[r], 1), 80);
        let step = text.lines().last().unwrap();
        assert!(step.starts_with("  5 ms  database"), "{text}");
        assert_eq!(step.chars().count(), 80, "{text}");
        assert!(text.contains('…'), "{text}");
    }
}
