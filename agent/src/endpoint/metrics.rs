//! What `/metrics` shows: the counters the run loop and the endpoint feed ([`Telemetry`]), the
//! per-step outcome of the last pass (from status.json at scrape time), and the process's
//! resident memory, in the Prometheus text exposition format (version 0.0.4).
//!
//! Nothing here is a secret: counts, durations, step names and states. Label values come from
//! fixed sets (trigger kinds are cut at the first `:` and capped, step names are the agent's
//! own), so a client cannot grow the label space.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::status_file::{Status, StepState};

/// Distinct trigger kinds kept apart; more than this (a run loop bug) are counted as `other`.
const MAX_TRIGGER_KINDS: usize = 16;

/// Counters shared by the run loop (passes, Docker events) and the endpoint (requests,
/// authentication failures). Lock-free except the per-trigger table, touched once per pass.
#[derive(Debug, Default)]
pub struct Telemetry {
    passes: AtomicU64,
    /// Passes after the first that changed something: drift the agent repaired.
    repairs: AtomicU64,
    changed_steps: AtomicU64,
    last_pass_micros: AtomicU64,
    /// Unix time of the end of the last pass, in milliseconds; 0: none yet.
    last_pass_unix_ms: AtomicU64,
    docker_events: AtomicU64,
    /// Times the firewall table was put back after an outside change to the ruleset.
    firewall_restores: AtomicU64,
    by_trigger: Mutex<BTreeMap<String, u64>>,
    pub(crate) auth_failures: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) requests: Requests,
}

/// Requests answered, by route and class of outcome.
#[derive(Debug, Default)]
pub(crate) struct Requests {
    pub ok: AtomicU64,
    pub unauthorized: AtomicU64,
    /// 403: a valid token whose scope does not allow the route.
    pub forbidden: AtomicU64,
    pub rate_limited: AtomicU64,
    pub not_found: AtomicU64,
    pub other: AtomicU64,
}

impl Telemetry {
    /// One converge pass ended. `trigger` says why it ran (`start`, `interval`,
    /// `docker-event: waypoint-server die`); only the part before the first `:` becomes a
    /// label. `repair`: the run loop counted this pass as a repair (its rule, kept in one
    /// place, `service`, so /metrics and status.json's `run.repairs` cannot disagree).
    pub fn record_pass(
        &self,
        trigger: &str,
        duration: Duration,
        changed_steps: usize,
        repair: bool,
    ) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        if repair {
            self.repairs.fetch_add(1, Ordering::Relaxed);
        }
        self.changed_steps
            .fetch_add(changed_steps as u64, Ordering::Relaxed);
        self.last_pass_micros.store(
            u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.last_pass_unix_ms.store(now_ms, Ordering::Relaxed);
        let kind = trigger_kind(trigger);
        // A poisoned lock only means another thread panicked mid-increment: the map is intact.
        let mut map = self
            .by_trigger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = if map.contains_key(&kind) || map.len() < MAX_TRIGGER_KINDS {
            kind
        } else {
            "other".to_string()
        };
        *map.entry(key).or_insert(0) += 1;
    }

    /// A Docker event about a managed container arrived.
    pub fn record_docker_event(&self) {
        self.docker_events.fetch_add(1, Ordering::Relaxed);
    }

    /// The firewall watcher put the table back after an outside change.
    pub fn record_firewall_restore(&self) {
        self.firewall_restores.fetch_add(1, Ordering::Relaxed);
    }

    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    pub fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
    }

    pub fn auth_failures(&self) -> u64 {
        self.auth_failures.load(Ordering::Relaxed)
    }

    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }
}

/// `docker-event: waypoint-server die` -> `docker-event`; only `[a-z0-9_-]`, so the label
/// needs no escaping.
fn trigger_kind(trigger: &str) -> String {
    let head = trigger.split(':').next().unwrap_or_default().trim();
    let kind: String = head
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    if kind.is_empty() {
        "unknown".into()
    } else {
        kind
    }
}

const STEP_STATES: &[(StepState, &str)] = &[
    (StepState::Pending, "pending"),
    (StepState::Running, "running"),
    (StepState::Ok, "ok"),
    (StepState::Changed, "changed"),
    (StepState::Degraded, "degraded"),
    (StepState::Error, "error"),
    (StepState::Skipped, "skipped"),
];

/// Renders the exposition text. `status` is the last status file (if any), `rss_bytes` the
/// process's resident memory (if known).
pub fn render(t: &Telemetry, status: Option<&Status>, rss_bytes: Option<u64>) -> String {
    let mut out = String::with_capacity(4096);
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    // Writing to a String cannot fail.
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: String| vec![(String::new(), v)];

    let by_trigger: Vec<(String, String)> = {
        let map = t
            .by_trigger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.iter()
            .map(|(k, v)| (format!("{{trigger=\"{k}\"}}"), v.to_string()))
            .collect()
    };
    family(
        "pilot_agent_passes_total",
        "counter",
        "Converge passes run, by what triggered them.",
        &by_trigger,
    );
    family(
        "pilot_agent_repairs_total",
        "counter",
        "Passes after the first that changed something (drift repaired).",
        &one(load(&t.repairs).to_string()),
    );
    family(
        "pilot_agent_changed_steps_total",
        "counter",
        "Steps that changed something, summed over passes.",
        &one(load(&t.changed_steps).to_string()),
    );
    let last_ms = load(&t.last_pass_unix_ms);
    if last_ms > 0 {
        family(
            "pilot_agent_last_pass_duration_seconds",
            "gauge",
            "Duration of the last converge pass.",
            &one(format!("{:.6}", load(&t.last_pass_micros) as f64 / 1e6)),
        );
        family(
            "pilot_agent_last_pass_timestamp_seconds",
            "gauge",
            "Unix time the last converge pass ended.",
            &one(format!("{:.3}", last_ms as f64 / 1e3)),
        );
    }
    family(
        "pilot_agent_docker_events_total",
        "counter",
        "Docker events about managed containers received.",
        &one(load(&t.docker_events).to_string()),
    );
    family(
        "pilot_agent_firewall_restores_total",
        "counter",
        "Times the agent's nftables table was put back after an outside change to the ruleset.",
        &one(load(&t.firewall_restores).to_string()),
    );
    if let Some(status) = status {
        let mut samples = Vec::new();
        for step in &status.steps {
            let name = label_value(&step.name);
            for (state, word) in STEP_STATES {
                let v = u8::from(step.state == *state);
                samples.push((
                    format!("{{step=\"{name}\",state=\"{word}\"}}"),
                    v.to_string(),
                ));
            }
        }
        family(
            "pilot_agent_step_state",
            "gauge",
            "State of each step in the last status (1 for the current state).",
            &samples,
        );
    }
    family(
        "pilot_agent_endpoint_auth_failures_total",
        "counter",
        "Requests to the endpoint with a missing or wrong bearer token.",
        &one(load(&t.auth_failures).to_string()),
    );
    family(
        "pilot_agent_endpoint_rate_limited_total",
        "counter",
        "Requests refused with 429 because their source failed authentication too often.",
        &one(load(&t.rate_limited).to_string()),
    );
    let r = &t.requests;
    family(
        "pilot_agent_endpoint_responses_total",
        "counter",
        "Responses of the endpoint, by class.",
        &[
            ("{class=\"ok\"}".into(), load(&r.ok).to_string()),
            (
                "{class=\"unauthorized\"}".into(),
                load(&r.unauthorized).to_string(),
            ),
            (
                "{class=\"forbidden\"}".into(),
                load(&r.forbidden).to_string(),
            ),
            (
                "{class=\"rate_limited\"}".into(),
                load(&r.rate_limited).to_string(),
            ),
            (
                "{class=\"not_found\"}".into(),
                load(&r.not_found).to_string(),
            ),
            ("{class=\"other\"}".into(), load(&r.other).to_string()),
        ],
    );
    if let Some(rss) = rss_bytes {
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            &one(rss.to_string()),
        );
    }
    out
}

/// The backup gauges (appended to [`render`]'s text when `backup:` keeps a record): when the
/// last attempt was, whether it succeeded, and the last successful backup's time and size, so
/// that an alert can fire on "no good backup for a day".
pub fn render_backup(record: &crate::backup::Record) -> String {
    let mut out = String::new();
    let unix = |at: &str| {
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| t.unix_timestamp())
    };
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {value}");
    };
    if let Some(t) = unix(&record.attempted_at) {
        gauge(
            "pilot_agent_backup_last_attempt_timestamp_seconds",
            "Unix time of the last backup attempt.",
            t.to_string(),
        );
    }
    gauge(
        "pilot_agent_backup_last_attempt_success",
        "1 if the last backup attempt succeeded, 0 if it failed.",
        u8::from(record.result == "ok").to_string(),
    );
    if let Some(ok) = &record.last_ok {
        if let Some(t) = unix(&ok.at) {
            gauge(
                "pilot_agent_backup_last_success_timestamp_seconds",
                "Unix time of the last successful backup.",
                t.to_string(),
            );
        }
        gauge(
            "pilot_agent_backup_last_success_size_bytes",
            "Size of the last successful backup file.",
            ok.size.to_string(),
        );
    }
    gauge(
        "pilot_agent_backups_kept",
        "Backups in the backup directory after the last attempt.",
        record.kept.to_string(),
    );
    out
}

/// Escapes a label value as the text format requires (`\`, `"`, newline).
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The process's resident set size, from `/proc/self/status` (`VmRSS`, in kB).
pub fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn backup_gauges() {
        let rec = crate::backup::Record {
            attempted_at: "2026-12-07T20:00:00Z".into(),
            result: "failed".into(),
            error: Some("No space left on device".into()),
            last_ok: Some(crate::backup::Taken {
                file: "/b/pilot-backup-x.tar".into(),
                size: 9728,
                sha256: String::new(),
                at: "2026-12-07T19:00:00Z".into(),
                duration_ms: 80,
                runner_tokens: 2,
            }),
            kept: 3,
        };
        let text = super::render_backup(&rec);
        assert!(
            text.contains("pilot_agent_backup_last_attempt_success 0\n"),
            "{text}"
        );
        assert!(
            text.contains("pilot_agent_backup_last_success_timestamp_seconds 1796670000\n"),
            "{text}"
        );
        assert!(text.contains("pilot_agent_backup_last_success_size_bytes 9728\n"));
        assert!(text.contains("pilot_agent_backups_kept 3\n"));
        // The error text is not a metric (it is in the status).
        assert!(!text.contains("space"), "{text}");
    }

    use super::*;

    #[test]
    fn trigger_kinds_are_bounded_labels() {
        assert_eq!(
            trigger_kind("docker-event: waypoint-server die"),
            "docker-event"
        );
        assert_eq!(trigger_kind("interval"), "interval");
        assert_eq!(trigger_kind("We\"ird{}"), "weird");
        assert_eq!(trigger_kind(": x"), "unknown");
        let t = Telemetry::default();
        for i in 0..40 {
            t.record_pass(&format!("kind{i}"), Duration::from_millis(5), 0, false);
        }
        let map = t.by_trigger.lock().unwrap();
        assert_eq!(map.len(), MAX_TRIGGER_KINDS + 1);
        assert_eq!(map["other"], 40 - MAX_TRIGGER_KINDS as u64);
    }

    #[test]
    fn repairs_are_counted_as_the_run_loop_reports_them() {
        let t = Telemetry::default();
        t.record_pass("start", Duration::from_secs(2), 5, false);
        t.record_pass("interval", Duration::from_millis(30), 0, false);
        t.record_pass(
            "docker-event: waypoint-server die",
            Duration::from_secs(1),
            1,
            true,
        );
        assert_eq!(t.passes(), 3);
        assert_eq!(t.repairs(), 1);
        let text = render(&t, None, Some(4096));
        assert!(text.contains("pilot_agent_passes_total{trigger=\"docker-event\"} 1\n"));
        assert!(text.contains("pilot_agent_repairs_total 1\n"));
        assert!(text.contains("pilot_agent_changed_steps_total 6\n"));
        assert!(text.contains("pilot_agent_last_pass_duration_seconds 1.000000\n"));
        assert!(text.contains("process_resident_memory_bytes 4096\n"));
    }

    #[test]
    fn no_pass_no_last_pass_gauges() {
        let text = render(&Telemetry::default(), None, None);
        assert!(!text.contains("last_pass"));
        assert!(text.contains("# TYPE pilot_agent_passes_total counter\n"));
    }

    #[test]
    fn rss_is_read() {
        let rss = rss_bytes().unwrap();
        assert!(rss > 1024 * 1024, "{rss}");
    }
}
