//! Ctrl-C (SIGINT) and SIGTERM become a cancellation that the publish observes between API
//! calls and upload chunks and during waits; a call in flight finishes, so that everything
//! the service made is known before the clean-up runs. The same design as the AWS target's
//! `cancel` module, with this target's error type (the two features build independently).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::error::{GcpError, Result};

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
    /// Installs SIGINT and SIGTERM handlers that cancel; they stay for the life of the process
    /// so that a second Ctrl-C does not kill the (bounded) clean-up half-way.
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
                    warn!("{name}: cancelling the publish and cleaning up");
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

    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(GcpError::Cancelled)
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
    pub async fn sleep(&self, d: Duration) -> Result<()> {
        tokio::select! {
            () = self.cancelled() => Err(GcpError::Cancelled),
            () = tokio::time::sleep(d) => self.check(),
        }
    }
}

/// One progress line per step on stderr (`[2/5] upload-object ...`, then `... done in 0.05 s:
/// DETAIL`); `PILOT_IMAGE_FAIL_AFTER` fails the run right after the step it names.
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

    pub(crate) fn start(&mut self, cancel: &Cancel, step: &'static str) -> Result<()> {
        cancel.check()?;
        self.index = self
            .steps
            .iter()
            .position(|s| *s == step)
            .map_or(0, |i| i + 1);
        self.started = Instant::now();
        info!("[{}/{}] {step} ...", self.index, self.steps.len());
        Ok(())
    }

    pub(crate) fn done(&self, step: &'static str, detail: &str) -> Result<()> {
        info!(
            "[{}/{}] {step} done in {}: {detail}",
            self.index,
            self.steps.len(),
            secs(self.started.elapsed())
        );
        if self.fail_after == Some(step) {
            return Err(GcpError::Injected { step });
        }
        Ok(())
    }
}

/// `1.23 s`.
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

    /// Errors with [`GcpError::Timeout`] once expired.
    pub fn check(&self, what: impl Into<String>, last: impl Into<String>) -> Result<()> {
        if self.expired() {
            return Err(GcpError::Timeout {
                what: what.into(),
                waited: self.start.elapsed(),
                last: last.into(),
            });
        }
        Ok(())
    }
}
