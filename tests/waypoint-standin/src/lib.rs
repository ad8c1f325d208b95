//! A STAND-IN for HashiCorp Waypoint 0.11.4, for tests only.
//!
//! Waypoint's binaries and container images cannot be fetched on the machines that build and
//! test pilot-agent (and Waypoint is archived), yet the agent drives Waypoint through exactly
//! two surfaces: its container image and its command line. This crate builds a small binary
//! named `waypoint` that speaks that same surface with Waypoint 0.11.4's rules, so that the
//! end-to-end suites fail where the agent would fail against a real Waypoint:
//!
//! - the command line: each command's exact flag set, Go's flag errors, errors printed as
//!   `! ...` on stdout, exit codes (1, 127 for an unknown command), the CLI directory and the
//!   contexts `server bootstrap` writes (see [`cli`], [`flags`], [`ui`], [`context`]);
//! - `server run`: the `-accept-tos` rule, the URL service start that holds the listeners
//!   back, a fresh self-signed certificate per listener and start, bootstrap open to any
//!   client but only once ([`server`], [`state`], [`tls`]);
//! - tokens shaped like Waypoint's (base58, `wp24` magic, HMAC-signed, stateless): login
//!   tokens that can do everything, runner tokens bound to a runner id and expiring, and
//!   Waypoint's refusal texts ([`token`], [`service`]);
//! - `runner agent`: exits 1 if it cannot reach the server within 10 s at start, registers
//!   with a held stream, reconnects after, is listed by the server only while connected
//!   ([`runner`]); it also checks the Docker API at `DOCKER_HOST` after registering, which the
//!   real runner does not, and reports it in a JSON status file that tests read;
//! - `server snapshot` / `server restore` with the signing key in the snapshot;
//! - projects: `project apply`, `project list`, `project inspect`, stored in the server state
//!   (so in snapshots) with the server's checks of `UpsertProject` ([`project`]);
//! - `waypoint entrypoint [--] CMD...` (or the binary named `waypoint-entrypoint`) plays
//!   Waypoint's entrypoint (see [`entrypoint`]).
//!
//! It is NOT Waypoint: nothing here speaks gRPC (the ports serve an HTTPS JSON API), builds or
//! deploys. Every log line starts with `waypoint stand-in:` and goes to stderr, so nobody
//! mistakes its output for the real thing. Waypoint's code is BUSL-licensed; it was read for
//! behaviour only and nothing of it is copied here.

pub mod cli;
pub mod client;
pub mod conn;
pub mod context;
pub mod docker;
pub mod entrypoint;
pub mod error;
pub mod flags;
pub mod fsutil;
pub mod project;
pub mod runner;
pub mod server;
pub mod service;
pub mod state;
pub mod tls;
pub mod token;
pub mod ui;

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
