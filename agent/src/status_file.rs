//! The status file, `STATE_DIR/status.json`: what the agent is doing and how each step went.
//!
//! It is written atomically by the engine at every step transition and read by
//! `pilot-agent status` (and the HTTPS endpoint). Its field names and values are an API, as in
//! `cloud-init status --format json`, but with wall-clock RFC 3339 times:
//!
//! ```json
//! {"schema": 1, "status": "done", "condition": "healthy", "pid": 812,
//!  "version": "0.1.0", "command": "up",
//!  "started_at": "2025-05-01T10:00:00.120Z", "finished_at": "2025-05-01T10:00:03.874Z",
//!  "steps": [{"name": "firewall", "state": "ok", "detail": "...",
//!             "started_at": "...", "finished_at": "..."}]}
//! ```
//!
//! `pilot-agent run` adds a `run` object (absent for `up`; adding it did not bump the schema):
//!
//! ```json
//! "run": {"pid": 812, "mode": "run", "passes": 7, "last_trigger": "docker-event: waypoint-server die",
//!         "repairs": 1, "last_repair_at": "...", "last_pass_condition": "healthy",
//!         "last_pass_finished_at": "...", "stopped_at": null}
//! ```
//!
//! While `run` re-converges after its first pass, the file's `status` is `running` with the
//! new pass's steps; readers judge such a file by [`Status::between_passes`].
//!
//! The identity step adds an `identity` object (also additive):
//!
//! ```json
//! "identity": {"provider": "aws", "instance_id": "i-0abc", "region": "eu-west-1",
//!              "zone": "eu-west-1b", "private_ipv4": "10.0.1.23", "public_ipv4": "203.0.113.45",
//!              "hostname": "ip-10-0-1-23.eu-west-1.compute.internal",
//!              "public_hostname": "ec2-203-0-113-45.eu-west-1.compute.amazonaws.com",
//!              "configured": "auto", "elapsed_ms": 4}
//! ```
//!
//! Never put a secret in a detail: this file is world-readable and shown to operators.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fsutil::{self, FsError, MODE_PUBLIC};

/// Bumped when a field changes meaning or disappears (adding fields does not bump it).
pub const SCHEMA: u32 = 1;

/// Whether a run is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// The agent never wrote a status (the reader's answer when the file is absent).
    NotStarted,
    Running,
    Done,
}

/// How healthy the host is, from the steps so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    Healthy,
    /// Something outside the host (a database) is not there yet; the rest converged.
    Degraded,
    Error,
}

impl Condition {
    /// `up` and `status` exit codes, as `cloud-init status`: 0 healthy, 1 error, 2 degraded.
    pub fn exit_code(self) -> u8 {
        match self {
            Condition::Healthy => 0,
            Condition::Error => 1,
            Condition::Degraded => 2,
        }
    }
}

/// One step's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Pending,
    Running,
    /// Already converged: nothing was changed.
    Ok,
    /// Converged by changing something.
    Changed,
    /// Waiting on something outside the host; retried, does not hold back other steps.
    Degraded,
    Error,
    /// Not run because a step it depends on failed or is degraded.
    Skipped,
}

impl StepState {
    pub fn is_finished(self) -> bool {
        !matches!(self, StepState::Pending | StepState::Running)
    }

    /// Whether dependents may run.
    pub fn is_converged(self) -> bool {
        matches!(self, StepState::Ok | StepState::Changed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStatus {
    pub name: String,
    pub state: StepState,
    /// What happened, for operators; never a secret.
    pub detail: String,
    #[serde(with = "millis::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "millis::option")]
    pub finished_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub schema: u32,
    pub status: RunStatus,
    pub condition: Condition,
    /// The process that wrote the file (a `running` status whose pid is gone was killed).
    pub pid: u32,
    /// The agent's version.
    pub version: String,
    /// The command that ran (`up`, `run`).
    pub command: String,
    #[serde(with = "millis")]
    pub started_at: OffsetDateTime,
    #[serde(with = "millis::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub steps: Vec<StepStatus>,
    /// Written by `pilot-agent run` only (boxed: most statuses are `up`'s, without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Box<RunInfo>>,
    /// Who the host is and which addresses its certificate names (the identity step's
    /// fact); absent until that step ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Boxed: it is large, and most readers of a status never look at it.
    pub identity: Option<Box<crate::identity::Report>>,
}

/// What `pilot-agent run` adds to the status: how many passes it made and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The `run` process.
    pub pid: u32,
    /// Always `run` (room for other long-running modes).
    pub mode: String,
    /// Passes finished so far (the one under way not counted).
    pub passes: u64,
    /// Why the latest pass (under way or finished) ran: `start`, `interval`,
    /// `docker-event: waypoint-server die`, `docker-reconnected`, `degraded-retry: database`,
    /// `retry: ...` (the pass could not start: another converge held the lock).
    pub last_trigger: String,
    /// Passes after the first that changed at least one step.
    pub repairs: u64,
    #[serde(default, with = "millis::option")]
    pub last_repair_at: Option<OffsetDateTime>,
    /// The condition the last finished pass ended with (what readers report while the next
    /// pass is under way).
    #[serde(default)]
    pub last_pass_condition: Option<Condition>,
    #[serde(default, with = "millis::option")]
    pub last_pass_finished_at: Option<OffsetDateTime>,
    /// Set when `run` shut down cleanly (SIGTERM/SIGINT).
    #[serde(default, with = "millis::option")]
    pub stopped_at: Option<OffsetDateTime>,
}

impl RunInfo {
    pub fn new() -> RunInfo {
        RunInfo {
            pid: std::process::id(),
            mode: "run".into(),
            passes: 0,
            last_trigger: String::new(),
            repairs: 0,
            last_repair_at: None,
            last_pass_condition: None,
            last_pass_finished_at: None,
            stopped_at: None,
        }
    }
}

impl Default for RunInfo {
    fn default() -> Self {
        RunInfo::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("status file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Status {
    /// A fresh status for a run of `command` over steps named `steps`, all pending.
    pub fn start(command: &str, steps: impl IntoIterator<Item = String>) -> Status {
        Status {
            schema: SCHEMA,
            status: RunStatus::Running,
            condition: Condition::Healthy,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            command: command.to_string(),
            started_at: now(),
            finished_at: None,
            steps: steps
                .into_iter()
                .map(|name| StepStatus {
                    name,
                    state: StepState::Pending,
                    detail: String::new(),
                    started_at: None,
                    finished_at: None,
                })
                .collect(),
            run: None,
            identity: None,
        }
    }

    /// The condition of the last pass of `run` when this file shows a later pass under way
    /// (`running`, with a pass already finished): the host was converged by then and `run`
    /// is only re-checking it, so readers report `done` with this condition instead of
    /// `running`. `None` for `up`, a first pass, or a finished pass.
    pub fn between_passes(&self) -> Option<Condition> {
        let run = self.run.as_ref()?;
        if self.status != RunStatus::Running || run.passes == 0 {
            return None;
        }
        // The new pass's finished steps count too: a container found dead is news.
        let so_far = self.compute_condition();
        Some(run.last_pass_condition.unwrap_or(so_far).max(so_far))
    }

    /// The condition the steps so far add up to: any error is an error, else any degraded
    /// (or skipped, which only follows an error or a degraded step) is degraded.
    pub fn compute_condition(&self) -> Condition {
        self.steps
            .iter()
            .map(|s| match s.state {
                StepState::Error => Condition::Error,
                StepState::Degraded | StepState::Skipped => Condition::Degraded,
                _ => Condition::Healthy,
            })
            .max()
            .unwrap_or(Condition::Healthy)
    }

    pub fn step(&self, name: &str) -> Option<&StepStatus> {
        self.steps.iter().find(|s| s.name == name)
    }

    pub fn step_mut(&mut self, name: &str) -> Option<&mut StepStatus> {
        self.steps.iter_mut().find(|s| s.name == name)
    }

    /// Writes the file atomically (readers never see half a status).
    pub fn write(&self, path: &Path) -> Result<(), StatusError> {
        // Serializing plain structs with string keys cannot fail.
        let mut json = serde_json::to_vec_pretty(self).unwrap_or_default();
        json.push(b'\n');
        fsutil::write_atomic(path, &json, MODE_PUBLIC)?;
        Ok(())
    }

    /// Reads the file; `None` when the agent never wrote one.
    pub fn read(path: &Path) -> Result<Option<Status>, StatusError> {
        let Some(bytes) = fsutil::read_optional(path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StatusError::Parse {
                path: path.to_path_buf(),
                source,
            })
    }
}

/// Timestamps in status.json: RFC 3339 in UTC with exactly three fractional digits
/// (`2026-11-22T08:36:21.700Z`). `time`'s own RFC 3339 output drops trailing zeros
/// (`.7Z`), which makes equal-width comparison and `sort` on the text lie; a fixed width
/// keeps the file sortable by eye and by tools. Reading accepts any RFC 3339 time, so
/// files written by older agents still load.
pub mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::macros::format_description;
    use time::{OffsetDateTime, UtcOffset};

    /// Format `t` the way status.json stores it.
    pub fn format(t: OffsetDateTime) -> String {
        let fmt = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let utc = t.to_offset(UtcOffset::UTC);
        // Only years outside 0..=9999 fail to format; fall back to time's own text.
        utc.format(fmt).unwrap_or_else(|_| utc.to_string())
    }

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        OffsetDateTime::parse(&text, &Rfc3339).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use time::OffsetDateTime;

        pub fn serialize<S: Serializer>(
            t: &Option<OffsetDateTime>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&super::format(*t)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<OffsetDateTime>, D::Error> {
            match Option::<String>::deserialize(d)? {
                Some(text) => {
                    OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                        .map(Some)
                        .map_err(serde::de::Error::custom)
                }
                None => Ok(None),
            }
        }
    }
}

/// The wall-clock time, to the millisecond (enough for operators, and stable in JSON).
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    let ms = t.millisecond();
    t.replace_millisecond(ms).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_the_documented_api() {
        let mut s = Status::start("up", ["firewall".to_string(), "pki".to_string()]);
        s.step_mut("firewall").unwrap().state = StepState::Changed;
        s.step_mut("firewall").unwrap().started_at = Some(now());
        s.step_mut("firewall").unwrap().finished_at = Some(now());
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["status"], "running");
        assert_eq!(v["condition"], "healthy");
        assert_eq!(v["pid"], std::process::id());
        assert_eq!(v["command"], "up");
        assert!(v["finished_at"].is_null());
        let started = v["started_at"].as_str().unwrap();
        assert!(
            OffsetDateTime::parse(started, &time::format_description::well_known::Rfc3339).is_ok(),
            "{started}"
        );
        assert!(started.ends_with('Z'), "UTC: {started}");
        assert_eq!(v["steps"][0]["name"], "firewall");
        assert_eq!(v["steps"][0]["state"], "changed");
        assert_eq!(v["steps"][1]["state"], "pending");
        assert!(v["steps"][1]["started_at"].is_null());
        assert_eq!(
            serde_json::to_value(RunStatus::NotStarted).unwrap(),
            "not-started"
        );
    }

    #[test]
    fn timestamps_have_three_fractional_digits_and_sort_as_text() {
        // 700 ms was written `.7Z` by time's RFC 3339, which sorts after `.701Z`.
        let a = time::macros::datetime!(2026-11-22 08:36:21.700 UTC);
        let b = time::macros::datetime!(2026-11-22 08:36:21.701 UTC);
        let c = time::macros::datetime!(2026-11-22 08:36:22 UTC);
        let (fa, fb, fc) = (millis::format(a), millis::format(b), millis::format(c));
        assert_eq!(fa, "2026-11-22T08:36:21.700Z");
        assert_eq!(fc, "2026-11-22T08:36:22.000Z");
        assert!(fa < fb && fb < fc, "{fa} {fb} {fc}");
        // Other offsets are written in UTC.
        let local = time::macros::datetime!(2026-11-22 09:36:21.7 +01:00);
        assert_eq!(millis::format(local), fa);
        // Older files (time's trimmed form) still read back to the same instant.
        let mut s = Status::start("up", ["x".to_string()]);
        s.started_at = a;
        let mut v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["started_at"], "2026-11-22T08:36:21.700Z");
        v["started_at"] = "2026-11-22T08:36:21.7Z".into();
        let back: Status = serde_json::from_value(v).unwrap();
        assert_eq!(back.started_at, a);
    }

    #[test]
    fn condition_and_exit_codes() {
        let mut s = Status::start("up", ["a".to_string(), "b".to_string()]);
        s.step_mut("a").unwrap().state = StepState::Ok;
        assert_eq!(s.compute_condition(), Condition::Healthy);
        s.step_mut("b").unwrap().state = StepState::Degraded;
        assert_eq!(s.compute_condition(), Condition::Degraded);
        s.step_mut("a").unwrap().state = StepState::Error;
        assert_eq!(s.compute_condition(), Condition::Error);
        assert_eq!(Condition::Healthy.exit_code(), 0);
        assert_eq!(Condition::Error.exit_code(), 1);
        assert_eq!(Condition::Degraded.exit_code(), 2);
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status.json");
        assert_eq!(Status::read(&p).unwrap(), None);
        let s = Status::start("up", ["x".to_string()]);
        s.write(&p).unwrap();
        assert_eq!(Status::read(&p).unwrap(), Some(s));
    }
}
