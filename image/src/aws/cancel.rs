//! Ctrl-C (SIGINT) and SIGTERM turn into a cancellation that the build observes between API
//! calls and during waits. An API call in flight is allowed to finish, so that every resource
//! the service created is known (and tagged) before the clean-up runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::ec2::secs;
use super::error::{AwsError, Result};

/// Shared by the build and the signal task.
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
                    warn!("{name}: cancelling the build and cleaning up");
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

    /// Errors with [`AwsError::Cancelled`] once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(AwsError::Cancelled)
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
        let notified = self.inner.notify.notified();
        // Checked after creating the `Notified` future, so a cancel between the check and the
        // select is not lost.
        self.check()?;
        tokio::select! {
            _ = notified => Err(AwsError::Cancelled),
            _ = tokio::time::sleep(d) => self.check(),
        }
    }
}

/// Progress of a publish's steps, one line each on stderr (`[ 3/8] register-image ...` then
/// `... done in 0.05 s: ami-1`): a step starts only while not
/// cancelled, and `PILOT_IMAGE_FAIL_AFTER` fails the run right after the step it names.
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
        info!("[{:2}/{}] {step} ...", self.index, self.steps.len());
        Ok(())
    }

    pub(crate) fn done(&self, step: &'static str, detail: &str) -> Result<()> {
        info!(
            "[{:2}/{}] {step} done in {}: {detail}",
            self.index,
            self.steps.len(),
            secs(self.started.elapsed())
        );
        if self.fail_after == Some(step) {
            return Err(AwsError::Injected { step });
        }
        Ok(())
    }
}
