//! systemd's notification protocol for `run` (`Type=notify`): `READY=1`, `STATUS=`,
//! `WATCHDOG=1`, `STOPPING=1`, through the `sd-notify` crate. Without `NOTIFY_SOCKET` every
//! call does nothing, so `run` behaves the same outside systemd.
//!
//! The watchdog pings come from their own task, and only while [`Health`] says the run loop is
//! alive: the loop beats on every turn (it turns at least every [`Health::beat_interval`]),
//! and a pass may not run longer than [`PASS_STUCK_AFTER`]. The runtime has one thread, so a
//! step that blocked it would stop the pings as well: systemd then restarts the agent, which
//! is safe at any point (every write of the engine is atomic, every step idempotent).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// A pass running longer than this is stuck (the slowest steps are bounded well below it: the
/// database step at 5 min, dockerd and Waypoint readiness at their `ready_timeout_secs`).
pub const PASS_STUCK_AFTER: Duration = Duration::from_secs(30 * 60);

/// Sends one notification; failures are logged, never fatal (systemd may be gone during
/// shutdown, and a missing socket must not stop the agent).
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// `STATUS=` line shown by `systemctl status`.
pub fn status_line(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// The run loop's pulse, read by the watchdog task.
#[derive(Debug)]
pub struct Health {
    origin: Instant,
    beat_interval: Duration,
    /// Milliseconds since `origin` of the loop's last turn.
    last_beat_ms: AtomicU64,
    /// Milliseconds since `origin` when the pass under way started, plus one (0: no pass).
    pass_started_ms: AtomicU64,
    stopping: AtomicBool,
}

impl Health {
    pub fn new(beat_interval: Duration) -> Health {
        Health {
            origin: Instant::now(),
            beat_interval,
            last_beat_ms: AtomicU64::new(0),
            pass_started_ms: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// How often the loop must turn at least (it has a timer of this period).
    pub fn beat_interval(&self) -> Duration {
        self.beat_interval
    }

    pub fn beat(&self, now: Instant) {
        self.last_beat_ms.store(self.ms(now), Ordering::Relaxed);
    }

    pub fn pass_started(&self, now: Instant) {
        self.pass_started_ms
            .store(self.ms(now) + 1, Ordering::Relaxed);
    }

    pub fn pass_ended(&self) {
        self.pass_started_ms.store(0, Ordering::Relaxed);
    }

    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// `Ok` when the watchdog may be pinged at `now`; else why not.
    pub fn check(&self, now: Instant) -> Result<(), String> {
        let now_ms = self.ms(now);
        let beat_age = now_ms.saturating_sub(self.last_beat_ms.load(Ordering::Relaxed));
        // Two missed beats: the loop is not turning.
        let limit = 2 * u64::try_from(self.beat_interval.as_millis()).unwrap_or(u64::MAX / 4);
        if beat_age > limit {
            return Err(format!("the run loop has not turned for {beat_age} ms"));
        }
        let started = self.pass_started_ms.load(Ordering::Relaxed);
        if started > 0 {
            let age = Duration::from_millis(now_ms.saturating_sub(started - 1));
            if age > PASS_STUCK_AFTER {
                return Err(format!(
                    "the pass under way has run for {} s",
                    age.as_secs()
                ));
            }
        }
        Ok(())
    }
}

/// Pings `WATCHDOG=1` every `period` (half of systemd's `WATCHDOG_USEC`) while `health` is
/// good; stops pinging (and says why, once) when it is not. Runs until aborted.
pub async fn watchdog(health: Arc<Health>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut silent = false;
    loop {
        tick.tick().await;
        if health.stopping.load(Ordering::Relaxed) {
            // STOPPING=1 was sent; systemd no longer expects pings.
            continue;
        }
        match health.check(Instant::now()) {
            Ok(()) => {
                if silent {
                    tracing::info!("the run loop is healthy again; pinging the watchdog");
                    silent = false;
                }
                notify(&[NotifyState::Watchdog]);
            }
            Err(why) => {
                if !silent {
                    tracing::error!("not pinging systemd's watchdog: {why}");
                    silent = true;
                }
            }
        }
    }
}

/// The watchdog period systemd asks for (`WATCHDOG_USEC` for this pid), halved as
/// `sd_watchdog_enabled(3)` recommends; `None` when there is no watchdog.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_a_turning_loop_and_no_stuck_pass() {
        let h = Health::new(Duration::from_secs(1));
        let t0 = h.origin;
        h.beat(t0);
        assert!(h.check(t0 + Duration::from_millis(1500)).is_ok());
        let err = h.check(t0 + Duration::from_secs(3)).unwrap_err();
        assert!(err.contains("has not turned"), "{err}");
        let later = t0 + PASS_STUCK_AFTER + Duration::from_secs(10);
        h.pass_started(t0);
        h.beat(later);
        let err = h.check(later).unwrap_err();
        assert!(err.contains("pass under way"), "{err}");
        h.pass_ended();
        assert!(h.check(later).is_ok());
    }
}
