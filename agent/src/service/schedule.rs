//! When `run` makes its next pass, and why: pure bookkeeping over `Instant`s (no timers, no
//! I/O), so that debounce and backoff are tested without waiting.
//!
//! Reasons for a pass, each with its own due time; the earliest due one names the pass, and a
//! pass covers every reason pending when it starts (they all ask for the same full converge):
//! - a Docker event of a managed container: due [`DEBOUNCE`] after the first event of a burst,
//!   so that `kill`, `die`, `stop` of one container (and of its neighbours) make one pass;
//! - dockerd answering again after it was lost: due at once;
//! - the periodic pass: `interval` after the last pass ended;
//! - a degraded pass (the database unreachable, or any other step that waits on something
//!   outside the host): 5 s after it, doubling per degraded pass up to
//!   `database_retry_max_secs`, reset by a pass that is not degraded;
//! - a pass that could not run (another converge holds the lock): [`RETRY_SOON`] later.

use std::fmt;
use std::time::{Duration, Instant};

use crate::config::ServiceSettings;
use crate::config::service::DATABASE_RETRY_MIN_SECS;

/// A burst of Docker events shorter than this is one pass.
pub const DEBOUNCE: Duration = Duration::from_secs(1);
/// How soon a pass that could not start is tried again.
pub const RETRY_SOON: Duration = Duration::from_secs(2);

/// Why a pass runs; its text is `status.json`'s `run.last_trigger`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The first pass.
    Start,
    /// The periodic pass.
    Interval,
    /// Docker events of managed containers: the first one (`waypoint-server die`) and how
    /// many more came in the same burst.
    DockerEvent { first: String, more: usize },
    /// dockerd answers again after its event stream was lost.
    DockerReconnected,
    /// Steps (named) were degraded in the last pass.
    DegradedRetry(String),
    /// The pass could not run (the reason) and is tried again.
    Retry(String),
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Start => f.write_str("start"),
            Trigger::Interval => f.write_str("interval"),
            Trigger::DockerEvent { first, more: 0 } => write!(f, "docker-event: {first}"),
            Trigger::DockerEvent { first, more } => {
                write!(f, "docker-event: {first} (+{more} more)")
            }
            Trigger::DockerReconnected => f.write_str("docker-reconnected"),
            Trigger::DegradedRetry(steps) => write!(f, "degraded-retry: {steps}"),
            Trigger::Retry(why) => write!(f, "retry: {why}"),
        }
    }
}

/// The pending reasons for the next pass.
#[derive(Debug, Clone)]
pub struct Schedule {
    interval: Duration,
    retry_max: Duration,
    periodic_due: Instant,
    /// Due time and the degraded steps.
    degraded_retry: Option<(Instant, String)>,
    next_retry_delay: Duration,
    event: Option<(Instant, String, usize)>,
    reconnected: Option<Instant>,
    soon: Option<(Instant, String)>,
    start: Option<Instant>,
}

impl Schedule {
    /// A schedule whose first pass (`start`) is due at `now`.
    pub fn new(settings: &ServiceSettings, now: Instant) -> Schedule {
        let interval = Duration::from_secs(settings.interval_secs);
        Schedule {
            interval,
            retry_max: Duration::from_secs(settings.database_retry_max_secs),
            periodic_due: now + interval,
            degraded_retry: None,
            next_retry_delay: Duration::from_secs(DATABASE_RETRY_MIN_SECS),
            event: None,
            reconnected: None,
            soon: None,
            start: Some(now),
        }
    }

    /// A Docker event (`waypoint-server die`) of a managed container.
    pub fn docker_event(&mut self, now: Instant, what: String) {
        match &mut self.event {
            // Part of the burst already waiting: the pass is not pushed back, so a container
            // that flaps forever still gets a pass every DEBOUNCE.
            Some((_, _, more)) => *more += 1,
            None => self.event = Some((now + DEBOUNCE, what, 0)),
        }
    }

    /// dockerd answers again after it was lost.
    pub fn docker_reconnected(&mut self, now: Instant) {
        self.reconnected.get_or_insert(now);
    }

    /// A pass ended at `now`; `degraded` names its steps that wait on something outside
    /// (`None`: none did).
    pub fn pass_finished(&mut self, now: Instant, degraded: Option<String>) {
        self.periodic_due = now + self.interval;
        if let Some(steps) = degraded {
            let delay = self.next_retry_delay.min(self.retry_max);
            self.degraded_retry = Some((now + delay, steps));
            self.next_retry_delay = (delay * 2).min(self.retry_max);
        } else {
            self.degraded_retry = None;
            self.next_retry_delay = Duration::from_secs(DATABASE_RETRY_MIN_SECS);
        }
    }

    /// A pass for `trigger` could not start; try again soon, for the same reason.
    pub fn pass_not_run(&mut self, now: Instant, trigger: &Trigger) {
        let why = match trigger {
            Trigger::Retry(why) => why.clone(),
            other => other.to_string(),
        };
        self.soon = Some((now + RETRY_SOON, why));
    }

    /// The earliest due reason and its time.
    pub fn next(&self) -> (Instant, Trigger) {
        let mut best = (self.periodic_due, Trigger::Interval);
        let mut consider = |at: Instant, t: Trigger| {
            if at < best.0 {
                best = (at, t);
            }
        };
        if let Some(at) = self.start {
            consider(at, Trigger::Start);
        }
        if let Some(at) = self.reconnected {
            consider(at, Trigger::DockerReconnected);
        }
        if let Some((at, first, more)) = &self.event {
            consider(
                *at,
                Trigger::DockerEvent {
                    first: first.clone(),
                    more: *more,
                },
            );
        }
        if let Some((at, steps)) = &self.degraded_retry {
            consider(*at, Trigger::DegradedRetry(steps.clone()));
        }
        if let Some((at, why)) = &self.soon {
            consider(*at, Trigger::Retry(why.clone()));
        }
        best
    }

    /// The pass to make now, if one is due. Every pending reason is covered by it and
    /// cleared; the periodic and degraded timers restart when the pass ends.
    pub fn take(&mut self, now: Instant) -> Option<Trigger> {
        let (at, trigger) = self.next();
        if at > now {
            return None;
        }
        self.start = None;
        self.reconnected = None;
        self.event = None;
        self.soon = None;
        self.degraded_retry = None;
        Some(trigger)
    }

    /// The delay the next degraded pass will wait (for the status line).
    pub fn degraded_retry_in(&self, now: Instant) -> Option<Duration> {
        self.degraded_retry
            .as_ref()
            .map(|(at, _)| at.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(interval: u64, retry_max: u64) -> ServiceSettings {
        ServiceSettings {
            interval_secs: interval,
            database_retry_max_secs: retry_max,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_pass_then_periodic() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&settings(300, 300), t0);
        assert_eq!(s.take(t0), Some(Trigger::Start));
        assert_eq!(s.take(t0), None);
        s.pass_finished(t0 + 2 * S, None);
        assert_eq!(s.next(), (t0 + 302 * S, Trigger::Interval));
        assert_eq!(s.take(t0 + 301 * S), None);
        assert_eq!(s.take(t0 + 302 * S), Some(Trigger::Interval));
    }

    #[test]
    fn a_burst_of_events_is_one_pass_after_the_debounce() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&settings(300, 300), t0);
        s.take(t0);
        s.pass_finished(t0, None);
        let t1 = t0 + 10 * S;
        s.docker_event(t1, "waypoint-server kill".into());
        s.docker_event(t1 + S / 10, "waypoint-server die".into());
        s.docker_event(t1 + S / 5, "waypoint-server stop".into());
        assert_eq!(s.take(t1 + S / 2), None);
        let trigger = s.take(t1 + S).unwrap();
        assert_eq!(
            trigger.to_string(),
            "docker-event: waypoint-server kill (+2 more)"
        );
        assert_eq!(s.take(t1 + S), None, "the burst is consumed by one pass");
        // An event during the pass asks for another pass after it.
        s.docker_event(t1 + 2 * S, "waypoint-runner-1 die".into());
        s.pass_finished(t1 + 3 * S, None);
        assert_eq!(
            s.take(t1 + 3 * S).unwrap().to_string(),
            "docker-event: waypoint-runner-1 die"
        );
    }

    #[test]
    fn degraded_passes_back_off_exponentially_to_the_cap() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&settings(300, 30), t0);
        s.take(t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            s.pass_finished(now, Some("database".into()));
            let (at, trigger) = s.next();
            assert_eq!(trigger.to_string(), "degraded-retry: database");
            delays.push((at - now).as_secs());
            now = at;
            assert!(s.take(now).is_some());
        }
        assert_eq!(delays, [5, 10, 20, 30, 30, 30]);
        // Converged: back to the periodic pass, and the next degradation starts at 5 s again.
        s.pass_finished(now, None);
        assert_eq!(s.next(), (now + 300 * S, Trigger::Interval));
        s.pass_finished(now, Some("database".into()));
        assert_eq!(
            s.next(),
            (now + 5 * S, Trigger::DegradedRetry("database".into()))
        );
    }

    #[test]
    fn reconnect_is_immediate_and_a_locked_pass_is_retried_soon() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&settings(300, 300), t0);
        s.take(t0);
        s.pass_finished(t0, None);
        s.docker_reconnected(t0 + 5 * S);
        assert_eq!(s.take(t0 + 5 * S), Some(Trigger::DockerReconnected));
        s.pass_not_run(t0 + 5 * S, &Trigger::DockerReconnected);
        assert_eq!(s.take(t0 + 6 * S), None);
        assert_eq!(
            s.take(t0 + 7 * S).unwrap().to_string(),
            "retry: docker-reconnected"
        );
    }
}
