//! A STAND-IN for HashiCorp Waypoint, for tests only.
//!
//! Waypoint's binaries and container images cannot be fetched on the machines that build and
//! test pilot-agent, yet the agent drives Waypoint through exactly two surfaces: its container
//! image and its command line. This crate builds a small binary named `waypoint` that speaks
//! that same surface, so the end-to-end suites can run the agent unchanged:
//!
//! - `waypoint server run -accept-tos -db=/data/data.db -listen-grpc=… -listen-http=…` serves a
//!   small HTTPS JSON API on both ports with a self-signed certificate kept in the data dir;
//! - `waypoint server bootstrap` mints the first token exactly once, as Waypoint does: a second
//!   bootstrap, even after a restart, fails with "server is already bootstrapped" and exit 1;
//! - `waypoint token new`, `waypoint runner token`, `waypoint server config-set`;
//! - `waypoint runner agent` registers with the server and checks the Docker API at
//!   `DOCKER_HOST` with the Docker client's TLS rules (`DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`),
//!   and reports what worked in a JSON status file that tests read;
//! - `waypoint entrypoint [--] CMD...` (or the binary named `waypoint-entrypoint`) plays
//!   Waypoint's entrypoint: it tries the server at `WAYPOINT_SERVER_ADDR` for at most 5 s, prints
//!   one JSON line saying whether it connected and what address the server advertises, then
//!   executes CMD either way (fail open); `WAYPOINT_CEB_DISABLE` skips the connection;
//! - `waypoint version` prints `Waypoint v0.11.4 (stand-in)`.
//!
//! It is NOT Waypoint: nothing here speaks gRPC, builds or deploys. Every log line starts with
//! `waypoint stand-in:` so nobody mistakes its output for the real thing. Waypoint's code is
//! BUSL-licensed; it was read for behaviour only and nothing of it is copied here.

pub mod cli;
pub mod client;
pub mod conn;
pub mod docker;
pub mod entrypoint;
pub mod error;
pub mod flags;
pub mod fsutil;
pub mod runner;
pub mod server;
pub mod state;
pub mod tls;

use std::sync::atomic::{AtomicU8, Ordering};

/// What `waypoint version` prints: the Waypoint release the agent is written against, marked
/// as a stand-in.
pub const VERSION_LINE: &str = "Waypoint v0.11.4 (stand-in)";

/// Prefix of every log line, so test logs never pass the stand-in off as Waypoint.
pub const LOG_PREFIX: &str = "waypoint stand-in:";

static VERBOSITY: AtomicU8 = AtomicU8::new(0);

/// Sets how chatty the logs are (`-v`, `-vv`, `-vvv` count up from 0).
pub fn set_verbosity(level: u8) {
    VERBOSITY.store(level, Ordering::Relaxed);
}

/// The verbosity set by [`set_verbosity`].
pub fn verbosity() -> u8 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// Logs one line to stderr with the stand-in prefix.
///
/// Plain stderr lines rather than `tracing`: the stand-in plays a foreign program whose output
/// tests read line by line, and the prefix is part of that contract.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("{} {}", $crate::LOG_PREFIX, format_args!($($arg)*))
    };
}

/// Like [`log!`], only when `-v` (or more) was given.
#[macro_export]
macro_rules! debug_log {
    ($($arg:tt)*) => {
        if $crate::verbosity() > 0 {
            $crate::log!($($arg)*);
        }
    };
}

/// The current wall-clock time as RFC 3339 (UTC), for records and status files.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        // Formatting a UTC time with a year in 0..=9999 as RFC 3339 cannot fail; fall back to
        // the Unix time rather than panic should the clock be absurd.
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}
