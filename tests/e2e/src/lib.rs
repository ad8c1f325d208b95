//! End-to-end suites live in tests/; helpers they share (and the benchmarks in src/bin/) here.

pub mod agent;

use std::time::{Duration, Instant};

/// Polls `check` every 100 ms until it yields `Some`, or fails after `timeout` naming `what`
/// and the last error `check` reported (an `Err` means "not yet, and this is why").
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
