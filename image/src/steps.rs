//! What a publish to any cloud shares (`publish --target aws|gcp`, `cleanup`): the cancellation
//! that Ctrl-C and SIGTERM become, the progress lines of the steps with the failure injection
//! the leak tests use, the bound on a wait, and build ids. Each target's error type converts
//! [`StepError`] into its own variants (`From`), so `?` works in either.
//!
//! A cancellation is observed between API calls (and upload chunks) and during waits: a call
//! in flight is allowed to finish, so that every resource the service created is known (and
//! labelled) before the clean-up runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{info, warn};

/// Why a step did not go on; each target's error has a variant for each.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("cancelled by a signal")]
    Cancelled,
    #[error("failure injected after step {step} (PILOT_IMAGE_FAIL_AFTER)")]
    Injected { step: &'static str },
    #[error("timed out after {waited:?} waiting for {what} (last seen: {last})")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
}

/// Shared by the publish and the signal task.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    cancelled: AtomicBool,
    notify: Notify,
}

impl Cancel {
    /// Installs SIGINT and SIGTERM handlers that cancel. The handlers stay installed for the
    /// life of the process, so a second Ctrl-C during the clean-up does not kill the process
    /// half-way through it; the clean-up itself is bounded.
    pub fn on_signals() -> std::io::Result<Cancel> {
        let cancel = Cancel::default();
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let c = cancel.clone();
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                };
                if c.is_cancelled() {
                    warn!("{name} again: the clean-up is bounded and is finishing");
                } else {
                    warn!("{name}: cancelling and cleaning up");
                    c.cancel();
                }
            }
        });
        Ok(cancel)
    }

    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Errors with [`StepError::Cancelled`] once cancelled.
    pub fn check(&self) -> Result<(), StepError> {
        if self.is_cancelled() {
            Err(StepError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Resolves once cancelled (at once if already).
    pub async fn cancelled(&self) {
        loop {
            // Created before the check: a `notify_waiters` in between still wakes it.
            let notified = self.inner.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// Sleeps for `d` unless cancelled first (then errors at once).
    pub async fn sleep(&self, d: Duration) -> Result<(), StepError> {
        tokio::select! {
            () = self.cancelled() => Err(StepError::Cancelled),
            () = tokio::time::sleep(d) => self.check(),
        }
    }
}

/// Progress of a publish's steps, one line each on stderr (`[ 3/8] register-image ...` then
/// `... done in 0.05 s: ami-1`): a step starts only while not cancelled, and
/// `PILOT_IMAGE_FAIL_AFTER` fails the run right after the step it names.
pub(crate) struct Progress {
    steps: &'static [&'static str],
    index: usize,
    started: Instant,
    fail_after: Option<&'static str>,
}

impl Progress {
    pub(crate) fn new(steps: &'static [&'static str], fail_after: Option<&'static str>) -> Self {
        Progress {
            steps,
            index: 0,
            started: Instant::now(),
            fail_after,
        }
    }

    pub(crate) fn start(&mut self, cancel: &Cancel, step: &'static str) -> Result<(), StepError> {
        cancel.check()?;
        self.index = self
            .steps
            .iter()
            .position(|s| *s == step)
            .map_or(0, |i| i + 1);
        self.started = Instant::now();
        info!("[{:2}/{}] {step} ...", self.index, self.steps.len());
        Ok(())
    }

    pub(crate) fn done(&self, step: &'static str, detail: &str) -> Result<(), StepError> {
        info!(
            "[{:2}/{}] {step} done in {}: {detail}",
            self.index,
            self.steps.len(),
            secs(self.started.elapsed())
        );
        if self.fail_after == Some(step) {
            return Err(StepError::Injected { step });
        }
        Ok(())
    }
}

/// `1.23 s` for progress lines.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A bound on a wait.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: Instant,
    limit: Duration,
}

impl Deadline {
    pub fn new(limit: Duration) -> Deadline {
        Deadline {
            start: Instant::now(),
            limit,
        }
    }

    pub fn expired(&self) -> bool {
        self.start.elapsed() >= self.limit
    }

    /// Errors with [`StepError::Timeout`] naming `what` and the last state seen.
    pub fn check(&self, what: impl Into<String>, last: impl Into<String>) -> Result<(), StepError> {
        if self.expired() {
            return Err(StepError::Timeout {
                what: what.into(),
                waited: self.start.elapsed(),
                last: last.into(),
            });
        }
        Ok(())
    }
}

/// A fresh build id, `pb-<unix seconds>-<8 hex digits>`: sortable by time, unique enough to
/// never collide with another build of the same account, and valid as an EC2 tag value and a
/// GCP label value alike.
pub fn new_build_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut r = [0u8; 4];
    // Without randomness (no getrandom source), the process id still separates two builds
    // started in the same second on one machine.
    if getrandom::fill(&mut r).is_err() {
        r = std::process::id().to_be_bytes();
    }
    format!(
        "pb-{secs}-{}",
        r.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_differ_and_have_their_form() {
        let (a, b) = (new_build_id(), new_build_id());
        assert_ne!(a, b);
        assert!(a.starts_with("pb-") && a.len() <= 63, "{a}");
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
            "{a}"
        );
    }

    #[test]
    fn a_deadline_names_what_it_waited_for() {
        let d = Deadline::new(Duration::ZERO);
        assert!(d.expired());
        let e = d.check("image ami-1", "pending").unwrap_err();
        assert!(e.to_string().contains("image ami-1") && e.to_string().contains("pending"));
        assert!(
            Deadline::new(Duration::from_secs(60))
                .check("x", "y")
                .is_ok()
        );
    }
}
