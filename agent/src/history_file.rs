//! The pass history, `STATE_DIR/history.jsonl`: one line per finished converge pass, so that
//! "why did this boot take 90 s" has an answer after the fact (`pilot-agent status
//! --history`, as `cloud-init analyze` answers it for cloud-init).
//!
//! `status.json` holds only the pass under way or the last one; this file keeps the newest
//! passes of `up` and of every pass of `run`, each a JSON object on its own line (JSON Lines):
//!
//! ```json
//! {"schema": 1, "command": "run", "trigger": "docker-event: waypoint-server die",
//!  "version": "0.1.0", "started_at": "2026-05-01T10:00:00.120Z",
//!  "finished_at": "2026-05-01T10:00:03.874Z", "since_boot_ms": 14210, "duration_ms": 3754,
//!  "condition": "degraded",
//!  "steps": [{"name": "firewall", "state": "ok", "duration_ms": 12},
//!            {"name": "database", "state": "degraded", "duration_ms": 3001,
//!             "detail": "database server db.internal:5432 is unreachable: ..."},
//!            {"name": "waypoint-runners", "state": "skipped", "duration_ms": null}]}
//! ```
//!
//! - `trigger` is `run`'s `last_trigger` ([`crate::status_file::RunInfo`]); absent for `up`.
//! - `since_boot_ms` is the time since power-on when the pass started (`/proc/uptime`, the
//!   kernel's `CLOCK_BOOTTIME`, which a clock step at boot does not move); absent when
//!   unknown. `duration_ms` is the pass's own monotonic time. Step durations come from the
//!   step times of `status.json` (wall clock: a clock step in the middle of a pass, as
//!   chrony's first sync at boot, can skew one).
//! - A step's `detail` is kept only for `error` and `degraded` steps, cut to one line of at
//!   most [`DETAIL_MAX_CHARS`]: it is the same text `status.json` shows (where the engine's
//!   rule is that a detail never holds a secret; database and Waypoint errors are built to
//!   name users, files and addresses, never a password or token), and it is what answers
//!   "why". Other steps' details (what was checked, which addresses) are not kept.
//!
//! Appending a line is all a pass costs. When a line would take the file past
//! [`COMPACT_AFTER`] lines, it is rewritten atomically instead ([`fsutil::write_atomic`]) with
//! the newest [`KEEP`] records, the new one last, so it stays bounded (a few hundred
//! kilobytes). Mode 0600, as for every file that
//! is not meant for others (the state directory is 0700 anyway).
//!
//! A pass killed mid-write (SIGKILL, power loss) can leave a torn last line: the next append
//! starts on a new line, and readers skip such lines and count them ([`History::skipped`]),
//! never failing on them. A failure to record is logged and never fails the pass
//! ([`record`]).

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fsutil::{self, FsError, MODE_SECRET};
use crate::status_file::{Condition, Status, StepState, millis};

/// Bumped when a field changes meaning or disappears (adding fields does not bump it).
pub const SCHEMA: u32 = 1;

/// How many records a compaction keeps.
pub const KEEP: usize = 200;

/// A file with more lines than this is compacted to the newest [`KEEP`] records.
pub const COMPACT_AFTER: usize = 2 * KEEP;

/// The longest step detail kept, in characters.
pub const DETAIL_MAX_CHARS: usize = 240;

/// Readers look at no more than the last this many bytes: a file this large was not written
/// by the agent (its records are about 1 KiB and it keeps a few hundred), and its head is
/// not worth the memory.
pub const READ_LIMIT: u64 = 8 * 1024 * 1024;

/// One finished converge pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassRecord {
    pub schema: u32,
    /// `up` or `run`.
    pub command: String,
    /// Why `run` made the pass (its `last_trigger`); `None` for `up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// The agent's version.
    pub version: String,
    #[serde(with = "millis")]
    pub started_at: OffsetDateTime,
    #[serde(with = "millis")]
    pub finished_at: OffsetDateTime,
    /// Milliseconds since power-on when the pass started; `None` when unknown.
    #[serde(default)]
    pub since_boot_ms: Option<u64>,
    /// How long the pass took (monotonic clock).
    pub duration_ms: u64,
    pub condition: Condition,
    /// In the engine's order (the order of `status.json`).
    pub steps: Vec<StepRecord>,
}

/// One step of a recorded pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub state: StepState,
    /// `None` for a step that never started (skipped).
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// Only for `error` and `degraded` steps: the first line of their detail, cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl PassRecord {
    /// The record of the finished pass `status`, started when `clock` was.
    pub fn from_status(status: &Status, trigger: Option<&str>, clock: &PassClock) -> PassRecord {
        let finished_at = status.finished_at.unwrap_or_else(crate::status_file::now);
        PassRecord {
            schema: SCHEMA,
            command: status.command.clone(),
            trigger: trigger.map(str::to_string),
            version: status.version.clone(),
            started_at: status.started_at,
            finished_at,
            since_boot_ms: clock.since_boot.map(millis_of),
            duration_ms: millis_of(clock.started.elapsed()),
            condition: status.condition,
            steps: status
                .steps
                .iter()
                .map(|s| StepRecord {
                    name: s.name.clone(),
                    state: s.state,
                    duration_ms: match (s.started_at, s.finished_at) {
                        (Some(a), Some(b)) => {
                            Some(u64::try_from((b - a).whole_milliseconds()).unwrap_or(0))
                        }
                        _ => None,
                    },
                    detail: matches!(s.state, StepState::Error | StepState::Degraded)
                        .then(|| one_line(&s.detail, DETAIL_MAX_CHARS))
                        .filter(|d| !d.is_empty()),
                })
                .collect(),
        }
    }

    /// The steps, slowest first (`systemd-analyze blame`); steps that never ran last, in
    /// their order.
    pub fn steps_by_duration(&self) -> Vec<&StepRecord> {
        let mut steps: Vec<&StepRecord> = self.steps.iter().collect();
        // Stable: equal durations keep the engine's order.
        steps.sort_by_key(|s| std::cmp::Reverse(s.duration_ms));
        steps
    }
}

/// When a pass started, by the two clocks its record needs: the monotonic one for its
/// duration and the boot clock for the time since power-on. Taken before the engine runs.
#[derive(Debug, Clone, Copy)]
pub struct PassClock {
    started: Instant,
    since_boot: Option<Duration>,
}

impl PassClock {
    pub fn start() -> PassClock {
        PassClock {
            started: Instant::now(),
            since_boot: since_boot(),
        }
    }
}

/// The time since power-on: the first field of `/proc/uptime` (`CLOCK_BOOTTIME`, suspend
/// included, unmoved by a wall-clock step). `None` without procfs.
pub fn since_boot() -> Option<Duration> {
    let text = fs::read_to_string("/proc/uptime").ok()?;
    parse_uptime(&text)
}

fn parse_uptime(text: &str) -> Option<Duration> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    // Refuses negative, infinite, NaN and out-of-range values.
    Duration::try_from_secs_f64(secs).ok()
}

fn millis_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The first line of `text`, trimmed and cut to `max` characters (marked with `…`).
fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty());
    let line = line.unwrap_or_default();
    if line.chars().count() <= max {
        return line.to_string();
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("cannot encode a history record: {0}")]
    Encode(#[source] serde_json::Error),
}

/// What [`append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The line was added at the end.
    Line,
    /// The line would have taken the file past [`COMPACT_AFTER`] lines: it was rewritten with
    /// the newest [`KEEP`] records, this one last.
    Compacted { kept: usize, dropped_lines: usize },
}

/// Appends `record` to the history file at `path` (created 0600), compacting it when the
/// line would take it past [`COMPACT_AFTER`] lines. The caller holds the state lock (one writer).
pub fn append(path: &Path, record: &PassRecord) -> Result<Appended, HistoryError> {
    append_bounded(path, record, KEEP, COMPACT_AFTER)
}

/// [`append`] with explicit bounds (tests use small ones).
pub fn append_bounded(
    path: &Path,
    record: &PassRecord,
    keep: usize,
    compact_after: usize,
) -> Result<Appended, HistoryError> {
    let mut line = serde_json::to_string(record).map_err(HistoryError::Encode)?;
    line.push('\n');
    let existing = read_tail(path)?;
    let (bytes, cut_head) = existing.unwrap_or_default();
    let lines = bytes.iter().filter(|b| **b == b'\n').count()
        + usize::from(bytes.last().is_some_and(|b| *b != b'\n'));
    if cut_head || lines + 1 > compact_after {
        let parsed = parse(&bytes);
        let keep_old = keep.saturating_sub(1);
        let from = parsed.records.len().saturating_sub(keep_old);
        let mut out = Vec::with_capacity(bytes.len().min(keep * 2048));
        for r in &parsed.records[from..] {
            let mut l = serde_json::to_vec(r).map_err(HistoryError::Encode)?;
            l.push(b'\n');
            out.extend_from_slice(&l);
        }
        out.extend_from_slice(line.as_bytes());
        fsutil::write_atomic(path, &out, MODE_SECRET)?;
        return Ok(Appended::Compacted {
            kept: parsed.records.len() - from + 1,
            dropped_lines: lines.saturating_sub(parsed.records.len() - from),
        });
    }
    // A torn last line (a write cut short) stays a line of its own: readers skip it.
    if bytes.last().is_some_and(|b| *b != b'\n') {
        line.insert(0, '\n');
    }
    append_line(path, line.as_bytes(), bytes.len() as u64)?;
    Ok(Appended::Line)
}

/// Appends `line` with O_APPEND and fsyncs it. On failure (a full disk) the file is cut
/// back to `previous_len`, so a half-written line is not left behind.
fn append_line(path: &Path, line: &[u8], previous_len: u64) -> Result<(), FsError> {
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(MODE_SECRET)
        .open(path)
        .map_err(|e| FsError::new("open", path, e))?;
    let meta = file.metadata().map_err(|e| FsError::new("stat", path, e))?;
    if meta.permissions().mode() & 0o7777 != MODE_SECRET {
        file.set_permissions(Permissions::from_mode(MODE_SECRET))
            .map_err(|e| FsError::new("chmod", path, e))?;
    }
    let written = file
        .write_all(line)
        .and_then(|()| file.sync_data())
        .map_err(|e| FsError::new("append to", path, e));
    if written.is_err() {
        // Best effort: the error above is the one to report.
        let _ = file.set_len(previous_len);
    }
    written
}

/// Records the pass `status` in the history file at `path`; a failure is logged, never
/// returned: the history is for operators, and the pass's work is done.
pub fn record(path: &Path, status: &Status, trigger: Option<&str>, clock: &PassClock) {
    let record = PassRecord::from_status(status, trigger, clock);
    match append(path, &record) {
        Ok(Appended::Line) => {}
        Ok(Appended::Compacted {
            kept,
            dropped_lines,
        }) => tracing::debug!(
            kept,
            dropped_lines,
            "compacted the pass history {}",
            path.display()
        ),
        Err(e) => tracing::warn!("cannot record the pass in the history: {e}"),
    }
}

/// The history file as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Oldest first.
    pub records: Vec<PassRecord>,
    /// Lines that are not a record (a write cut short, or text that is not the agent's).
    pub skipped: usize,
}

/// Reads the history file; `None` when there is none. Unreadable lines are skipped and
/// counted, never an error.
pub fn read(path: &Path) -> Result<Option<History>, HistoryError> {
    Ok(read_tail(path)?.map(|(bytes, _)| parse(&bytes)))
}

/// The records in `bytes`, one per line; blank lines are ignored, others that do not parse
/// are counted in [`History::skipped`].
pub fn parse(bytes: &[u8]) -> History {
    let mut history = History::default();
    for line in bytes.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<PassRecord>(line) {
            Ok(r) => history.records.push(r),
            Err(_) => history.skipped += 1,
        }
    }
    history
}

/// The file's content, at most its last [`READ_LIMIT`] bytes starting at a line; whether
/// its head was left out. `None` when absent.
fn read_tail(path: &Path) -> Result<Option<(Vec<u8>, bool)>, FsError> {
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FsError::new("open", path, e)),
    };
    let len = file
        .metadata()
        .map_err(|e| FsError::new("stat", path, e))?
        .len();
    let cut_head = len > READ_LIMIT;
    if cut_head {
        file.seek(SeekFrom::Start(len - READ_LIMIT))
            .map_err(|e| FsError::new("seek", path, e))?;
    }
    let mut bytes = Vec::new();
    file.take(READ_LIMIT)
        .read_to_end(&mut bytes)
        .map_err(|e| FsError::new("read", path, e))?;
    if cut_head {
        // Start at the first whole line.
        let start = bytes.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.drain(..start);
    }
    Ok(Some((bytes, cut_head)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(command: &str, n: u64) -> PassRecord {
        let mut s = Status::start(
            command,
            ["firewall", "pki", "docker-tls", "database"].map(String::from),
        );
        let t = s.started_at;
        let durations = [12, 830, 2104];
        for (step, ms) in s.steps.iter_mut().zip(durations) {
            step.state = StepState::Changed;
            step.detail = "made 10.0.0.5 a SAN".into();
            step.started_at = Some(t);
            step.finished_at = Some(t + time::Duration::milliseconds(ms));
        }
        let db = s.step_mut("database").unwrap();
        db.state = StepState::Degraded;
        db.detail = format!("database server db:5432 is unreachable\nsecond line {n}");
        db.started_at = Some(t);
        db.finished_at = Some(t + time::Duration::milliseconds(1500));
        s.condition = s.compute_condition();
        s.finished_at = Some(t + time::Duration::milliseconds(2200));
        let clock = PassClock {
            started: Instant::now(),
            since_boot: Some(Duration::from_millis(14_210 + n)),
        };
        let mut r = PassRecord::from_status(&s, (command == "run").then_some("interval"), &clock);
        // Measured when the record is made; fixed here so records compare equal.
        r.duration_ms = 2200 + n;
        r
    }

    #[test]
    fn a_record_keeps_names_states_durations_and_only_bad_details() {
        let r = pass("run", 1);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["command"], "run");
        assert_eq!(v["trigger"], "interval");
        assert_eq!(v["condition"], "degraded");
        assert_eq!(v["since_boot_ms"], 14_211);
        assert!(v["started_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["duration_ms"], 2201);
        let steps = v["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 4);
        assert_eq!(steps[0]["name"], "firewall");
        assert_eq!(steps[0]["state"], "changed");
        assert_eq!(steps[0]["duration_ms"], 12);
        // Details of converged steps (addresses, what was checked) are not kept.
        assert!(steps[0].get("detail").is_none(), "{v}");
        assert!(!v.to_string().contains("10.0.0.5"), "{v}");
        // A degraded step's first line is.
        assert_eq!(steps[3]["detail"], "database server db:5432 is unreachable");
        // `up` has no trigger.
        let up = serde_json::to_value(pass("up", 1)).unwrap();
        assert!(up.get("trigger").is_none(), "{up}");

        let names: Vec<&str> = r
            .steps_by_duration()
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["docker-tls", "database", "pki", "firewall"]);
    }

    #[test]
    fn a_step_that_never_ran_has_no_duration_and_sorts_last() {
        let mut s = Status::start("up", ["a", "b"].map(String::from));
        s.steps[0].state = StepState::Error;
        s.steps[0].detail = "x".repeat(1000);
        s.steps[0].started_at = Some(s.started_at);
        s.steps[0].finished_at = Some(s.started_at);
        s.steps[1].state = StepState::Skipped;
        s.steps[1].finished_at = Some(s.started_at);
        let r = PassRecord::from_status(&s, None, &PassClock::start());
        assert_eq!(r.steps[1].duration_ms, None);
        assert_eq!(r.steps[0].duration_ms, Some(0));
        let detail = r.steps[0].detail.as_deref().unwrap();
        assert_eq!(detail.chars().count(), DETAIL_MAX_CHARS);
        assert!(detail.ends_with('…'));
        assert_eq!(r.steps_by_duration()[1].name, "b");
        // A step whose clock went back (a wall-clock step) is 0, not a negative number.
        s.steps[0].finished_at = Some(s.started_at - time::Duration::seconds(5));
        let r = PassRecord::from_status(&s, None, &PassClock::start());
        assert_eq!(r.steps[0].duration_ms, Some(0));
    }

    #[test]
    fn appends_one_line_per_pass_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("history.jsonl");
        assert_eq!(read(&p).unwrap(), None);
        let (a, b) = (pass("up", 1), pass("run", 2));
        assert_eq!(append(&p, &a).unwrap(), Appended::Line);
        assert_eq!(append(&p, &b).unwrap(), Appended::Line);
        let text = fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
        let h = read(&p).unwrap().unwrap();
        assert_eq!(h.skipped, 0);
        assert_eq!(h.records, vec![a, b]);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        // A file made with another mode is put back to 0600.
        fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        append(&p, &pass("run", 3)).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn the_file_is_bounded_to_the_newest_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("history.jsonl");
        let (keep, after) = (5, 10);
        let mut compactions = 0;
        for n in 1..=33 {
            match append_bounded(&p, &pass("run", n), keep, after).unwrap() {
                Appended::Line => {}
                Appended::Compacted {
                    kept,
                    dropped_lines,
                } => {
                    compactions += 1;
                    assert_eq!(kept, keep);
                    assert_eq!(dropped_lines, after - keep + 1);
                }
            }
            let lines = fs::read_to_string(&p).unwrap().lines().count();
            assert!(lines <= after, "{lines} lines after pass {n}");
        }
        // 10 lines, then 5 after each compaction: at 11, 17, 23, 29.
        assert_eq!(compactions, 4);
        let h = read(&p).unwrap().unwrap();
        let boots: Vec<u64> = h.records.iter().filter_map(|r| r.since_boot_ms).collect();
        // The newest are kept, oldest first: the last compaction (at 29) kept 25..=29, then
        // 30..=33 were appended.
        assert_eq!(boots, (25..=33).map(|n| 14_210 + n).collect::<Vec<_>>());
        // Compaction is an atomic rewrite: no temporary file is left, and the mode holds.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn torn_and_corrupt_lines_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("history.jsonl");
        append(&p, &pass("up", 1)).unwrap();
        // A pass killed in the middle of its write: half a line, no newline.
        let whole = serde_json::to_string(&pass("up", 2)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&whole.as_bytes()[..whole.len() / 2]).unwrap();
        drop(f);
        let h = read(&p).unwrap().unwrap();
        assert_eq!((h.records.len(), h.skipped), (1, 1));
        // The next pass starts on a line of its own: both whole records read back.
        append(&p, &pass("up", 3)).unwrap();
        let h = read(&p).unwrap().unwrap();
        assert_eq!((h.records.len(), h.skipped), (2, 1));
        assert_eq!(h.records[1].since_boot_ms, Some(14_213));

        // Garbage of every kind: not JSON, JSON of another shape, invalid UTF-8, blank lines
        // (ignored, not counted), a record with fields added by a later version (read).
        let mut later = serde_json::to_value(pass("run", 4)).unwrap();
        later["added_later"] = serde_json::json!({"x": 1});
        let mut bytes = fs::read(&p).unwrap();
        bytes.extend_from_slice(b"not json\n{\"schema\": 1}\n\xff\xfe\n\n   \n[1,2]\n");
        bytes.extend_from_slice(later.to_string().as_bytes());
        bytes.push(b'\n');
        fs::write(&p, &bytes).unwrap();
        let h = read(&p).unwrap().unwrap();
        assert_eq!((h.records.len(), h.skipped), (3, 5));
        assert_eq!(h.records[2].command, "run");
        // Compaction drops what it cannot read.
        let (keep, after) = (3, 3);
        append_bounded(&p, &pass("run", 5), keep, after).unwrap();
        let h = read(&p).unwrap().unwrap();
        assert_eq!((h.records.len(), h.skipped), (3, 0));
    }

    #[test]
    fn a_huge_file_is_read_from_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("history.jsonl");
        let line = serde_json::to_string(&pass("run", 7)).unwrap() + "\n";
        let filler = "x".repeat(1023) + "\n";
        let mut bytes = filler.repeat((READ_LIMIT / 1024) as usize + 8).into_bytes();
        bytes.extend_from_slice(line.as_bytes());
        fs::write(&p, &bytes).unwrap();
        let h = read(&p).unwrap().unwrap();
        assert_eq!(h.records.len(), 1);
        // Only what is within the limit was looked at.
        assert!(h.skipped <= (READ_LIMIT / 1024) as usize, "{}", h.skipped);
        // The next append compacts it to its records.
        assert!(matches!(
            append(&p, &pass("run", 8)).unwrap(),
            Appended::Compacted { kept: 2, .. }
        ));
        let h = read(&p).unwrap().unwrap();
        assert_eq!((h.records.len(), h.skipped), (2, 0));
    }

    #[test]
    fn an_unwritable_path_is_an_error_and_record_only_logs() {
        let dir = tempfile::tempdir().unwrap();
        // The path is a directory: nothing can be appended, and the error names the path.
        let p = dir.path().join("history.jsonl");
        fs::create_dir(&p).unwrap();
        let e = append(&p, &pass("up", 1)).unwrap_err();
        assert!(e.to_string().contains("history.jsonl"), "{e}");
        // `record` only logs it.
        let s = Status::start("up", ["a".to_string()]);
        record(&p, &s, None, &PassClock::start());
        assert!(p.is_dir());
    }

    #[test]
    fn uptime_parses() {
        assert_eq!(
            parse_uptime("14.21 52.10\n"),
            Some(Duration::from_millis(14_210))
        );
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("-1 2"), None);
        assert_eq!(parse_uptime("nan 2"), None);
        assert_eq!(parse_uptime("1e300 2"), None);
        assert!(since_boot().is_some(), "/proc/uptime is readable on Linux");
    }
}
