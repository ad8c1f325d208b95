//! Keeps the agent's table in place between passes: `nft monitor` reports every change to
//! the ruleset as it is committed, and each burst of events is answered with [`converge`]
//! (one `nft list table`, and a transaction only when the table is not the desired one).
//!
//! Why a monitor and not the pass timer: Debian's `nftables.service` starts with `flush
//! ruleset`, and an operator's `nft -f` of a full ruleset does the same; waiting for the next
//! pass (300 s by default) would leave 2375, 2376 and the Waypoint ports open that long.
//! `nft monitor` is nft's own client of the netlink event group (NFNLGRP_NFTABLES): no
//! maintained Rust crate subscribes to it, and its output needs no parsing here, only its
//! arrival. The agent's own transactions are reported too; the converge that follows finds
//! the table in place and sends nothing, so the watcher does not feed itself.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use super::{FirewallReport, FirewallSpec, Nft, converge};

/// Events within this long of one another are one burst (a `flush ruleset` reports every
/// table, chain and rule it removes): one converge answers them all.
const QUIET: Duration = Duration::from_millis(20);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What the watcher reports for each table it put back.
#[derive(Debug, Clone)]
pub struct Restored {
    pub report: FirewallReport,
    /// From the first event of the burst to the table applied.
    pub took: Duration,
}

/// Runs until the task is dropped or aborted (which also ends the `nft monitor` child).
/// `spec` gives the desired table at each check (it changes when the Waypoint server is
/// bootstrapped: [`FirewallSpec::current`]). `restored` is called for every repair (metrics,
/// tests).
pub async fn watch(
    spec: impl Fn() -> FirewallSpec + Send + 'static,
    nft: Nft,
    record: PathBuf,
    restored: impl Fn(&Restored) + Send + 'static,
) {
    let mut delay = BACKOFF_MIN;
    loop {
        let (mut cmd, text) = nft.command(&["monitor"]);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    "cannot run `{text}` (retrying in {} s): {e}",
                    delay.as_secs()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let Some(stdout) = child.stdout.take() else {
            return;
        };
        let mut lines = BufReader::new(stdout).lines();
        let started = Instant::now();
        // A change between the last pass and the monitor's start has sent no event.
        check(&spec(), &nft, &record, Instant::now(), &restored).await;
        while let Ok(Some(_)) = lines.next_line().await {
            let first = Instant::now();
            // The rest of the burst.
            while let Ok(Ok(Some(_))) = tokio::time::timeout(QUIET, lines.next_line()).await {}
            check(&spec(), &nft, &record, first, &restored).await;
        }
        let _ = child.kill().await;
        tracing::warn!("`{text}` ended; restarting it in {} s", delay.as_secs());
        if started.elapsed() > BACKOFF_MAX {
            delay = BACKOFF_MIN;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

async fn check(
    spec: &FirewallSpec,
    nft: &Nft,
    record: &std::path::Path,
    since: Instant,
    restored: &impl Fn(&Restored),
) {
    match converge(spec, nft, Some(record)).await {
        Ok(report) if report.changed => {
            let r = Restored {
                took: since.elapsed(),
                report,
            };
            tracing::warn!(
                took_ms = r.took.as_millis() as u64,
                "the ruleset changed under the agent: {}",
                r.report.summary()
            );
            restored(&r);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot check the firewall table after a ruleset change: {e}"),
    }
}
