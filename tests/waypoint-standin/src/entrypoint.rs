//! `waypoint entrypoint [--] CMD ARGS...` (also run as `waypoint-entrypoint CMD ARGS...`): a
//! stand-in for Waypoint's entrypoint, the small program that wraps an application in its
//! container and connects it to the Waypoint server.
//!
//! What it keeps of Waypoint's behaviour is what a deployment sees from outside:
//! - it reads `WAYPOINT_SERVER_ADDR` (HOST:PORT), `WAYPOINT_SERVER_TLS` (default true),
//!   `WAYPOINT_SERVER_TLS_SKIP_VERIFY` and `WAYPOINT_CEB_INVITE_TOKEN` (optional);
//! - `WAYPOINT_CEB_DISABLE` set (non-empty): no connection at all, the application just runs;
//! - it tries to reach the server for at most [`CONNECT_WINDOW`] (5 s) and then *fails open*:
//!   the application runs whether the server answered or not.
//!
//! What it adds, for tests: after the attempt it prints ONE JSON line to stdout,
//!
//! ```text
//! {"standin":true,"entrypoint":"connected"|"disconnected","server_addr":"HOST:PORT"|null,
//!  "advertise_addr":"HOST:PORT"|null,"error":"..."|null,"elapsed_ms":N}
//! ```
//!
//! where `advertise_addr` is what the server's `GET /v1/status` reports. Then it `exec`s CMD,
//! so the application replaces it (keeps its PID, its signals and its exit code); without CMD it
//! exits 0. When CMD cannot be executed it exits 127 (not found) or 126 (any other reason), as
//! shells and Docker do. `WAYPOINT_STANDIN_SOURCE_ADDR=IP` binds the client socket to that
//! source address (a test hook: one namespace, several sources).
//!
//! Waypoint reaches its server over gRPC; the stand-in asks the stand-in server's HTTPS API
//! (`GET /v1/status`) with the same client and TLS code as the other commands.

use std::ffi::OsString;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{Value, json};

use crate::conn::{self, ENV_ADDR, ENV_TLS, ENV_TLS_SKIP_VERIFY, ServerConn};
use crate::log;

/// Set (non-empty): skip the server connection entirely and run the application.
pub const ENV_CEB_DISABLE: &str = "WAYPOINT_CEB_DISABLE";
/// The invite token the entrypoint would present to register (optional here).
pub const ENV_CEB_INVITE_TOKEN: &str = "WAYPOINT_CEB_INVITE_TOKEN";
/// Stand-in only: the source IP address of the connection to the server.
pub const ENV_STANDIN_SOURCE_ADDR: &str = "WAYPOINT_STANDIN_SOURCE_ADDR";

/// The program name under which the binary behaves as the entrypoint.
pub const PROGRAM_NAME: &str = "waypoint-entrypoint";

/// How long the entrypoint tries to reach the server before it runs the application anyway:
/// Waypoint's entrypoint fails open after 5 s so a dead server never keeps an app down.
pub const CONNECT_WINDOW: Duration = Duration::from_secs(5);

/// Pause between two attempts within the window (a refused connection fails at once).
const RETRY_PAUSE: Duration = Duration::from_millis(250);

const HELP: &str = "\
Usage: waypoint entrypoint [--] CMD [ARGS...]   (waypoint STAND-IN)
       waypoint-entrypoint CMD [ARGS...]

Tries to reach the server at WAYPOINT_SERVER_ADDR for at most 5 s (WAYPOINT_SERVER_TLS, default
true; WAYPOINT_SERVER_TLS_SKIP_VERIFY), prints one JSON line with the outcome to stdout, then
executes CMD whatever the outcome. WAYPOINT_CEB_DISABLE=1 skips the connection and the line.
";

/// The outcome of the connection attempt: the JSON line on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub connected: bool,
    pub server_addr: Option<String>,
    pub advertise_addr: Option<String>,
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl Report {
    fn disconnected(server_addr: Option<String>, error: String, started: Instant) -> Report {
        Report {
            connected: false,
            server_addr,
            advertise_addr: None,
            error: Some(error),
            elapsed: started.elapsed(),
        }
    }

    /// The JSON document printed on stdout (one line).
    pub fn to_json(&self) -> Value {
        json!({
            "standin": true,
            "entrypoint": if self.connected { "connected" } else { "disconnected" },
            "server_addr": self.server_addr,
            "advertise_addr": self.advertise_addr,
            "error": self.error,
            "elapsed_ms": u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// Runs the entrypoint with `args` (after `entrypoint`, or after the program name when run as
/// `waypoint-entrypoint`); returns the exit code unless CMD replaced this process.
pub fn main(args: Vec<String>) -> i32 {
    let command: &[String] = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        Some("-h" | "-help" | "--help") => {
            print!("{HELP}");
            return 0;
        }
        _ => &args,
    };
    let env = |name: &str| std::env::var(name).ok();
    if env(ENV_CEB_DISABLE).is_some_and(|v| !v.is_empty()) {
        log!("entrypoint: disabled by {ENV_CEB_DISABLE}; running the command without a server");
    } else {
        let report = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(check(&env, CONNECT_WINDOW)),
            // Fail open, as for any other reason the server cannot be reached.
            Err(e) => Report::disconnected(
                env(ENV_ADDR),
                format!("failed to start the async runtime: {e}"),
                Instant::now(),
            ),
        };
        announce(&report);
    }
    match command.split_first() {
        None => 0,
        Some((program, rest)) => exec(program, rest),
    }
}

/// Logs the outcome on stderr and prints the JSON line on stdout (before CMD writes anything).
fn announce(report: &Report) {
    let ms = report.elapsed.as_millis();
    match (&report.error, report.connected) {
        (_, true) => log!(
            "entrypoint: connected to {} in {ms} ms (advertise address {})",
            report.server_addr.as_deref().unwrap_or("?"),
            report.advertise_addr.as_deref().unwrap_or("not set")
        ),
        (Some(e), false) => {
            log!("entrypoint: disconnected after {ms} ms, running the command anyway: {e}")
        }
        (None, false) => log!("entrypoint: disconnected after {ms} ms"),
    }
    let mut out = std::io::stdout().lock();
    // A closed stdout must not keep the application from starting.
    let _ = writeln!(out, "{}", report.to_json());
    let _ = out.flush();
}

/// Replaces this process with `program` (returns only when that fails).
fn exec(program: &str, args: &[String]) -> i32 {
    let err = Command::new(program)
        .args(args.iter().map(OsString::from))
        .exec();
    log!("entrypoint: cannot execute {program:?}: {err}");
    if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

/// Tries to reach the server named by the environment (`env` looks a variable up) for at most
/// `window`; never fails: every problem becomes a "disconnected" report with its reason.
pub async fn check(env: &dyn Fn(&str) -> Option<String>, window: Duration) -> Report {
    let started = Instant::now();
    let Some(addr) = env(ENV_ADDR).filter(|a| !a.is_empty()) else {
        return Report::disconnected(None, format!("{ENV_ADDR} is not set"), started);
    };
    let client = match client_from_env(env, &addr, window) {
        Ok(client) => client,
        Err(e) => return Report::disconnected(Some(addr), e, started),
    };
    if env(ENV_CEB_INVITE_TOKEN).is_some_and(|t| !t.is_empty()) {
        crate::debug_log!("entrypoint: an invite token is set ({ENV_CEB_INVITE_TOKEN})");
    }
    let deadline = started + window;
    let mut last_error = String::from("no attempt was made");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        match tokio::time::timeout(remaining, status_once(&client)).await {
            Ok(Ok(advertise_addr)) => {
                return Report {
                    connected: true,
                    server_addr: Some(addr),
                    advertise_addr,
                    error: None,
                    elapsed: started.elapsed(),
                };
            }
            Ok(Err(e)) => last_error = e,
            Err(_) => {
                last_error = format!("no answer from {addr}");
                break;
            }
        }
        let pause = RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(pause).await;
    }
    let error = format!(
        "no connection to the server within {} s: {last_error}",
        window.as_secs_f32()
    );
    Report::disconnected(Some(addr), error, started)
}

/// The client for the server at `addr`, configured from the environment.
fn client_from_env(
    env: &dyn Fn(&str) -> Option<String>,
    addr: &str,
    timeout: Duration,
) -> Result<crate::client::HttpClient, String> {
    let (host, port) = conn::split_host_port(addr).map_err(|e| e.to_string())?;
    // Unlike the CLI's connection flags, the entrypoint speaks TLS unless told otherwise.
    let tls = conn::env_bool(env, ENV_TLS)
        .map_err(|e| e.to_string())?
        .unwrap_or(true);
    let tls_skip_verify = conn::env_bool(env, ENV_TLS_SKIP_VERIFY)
        .map_err(|e| e.to_string())?
        .unwrap_or(false);
    let server = ServerConn {
        host,
        port,
        tls,
        tls_skip_verify,
        token: None,
    };
    let client = server.client(timeout).map_err(|e| e.to_string())?;
    match env(ENV_STANDIN_SOURCE_ADDR).filter(|s| !s.is_empty()) {
        None => Ok(client),
        Some(source) => {
            let ip: IpAddr = source.parse().map_err(|_| {
                format!("{ENV_STANDIN_SOURCE_ADDR}={source:?} is not an ip address")
            })?;
            Ok(client.with_source_addr(ip))
        }
    }
}

/// One `GET /v1/status`: the server's advertise address on success.
async fn status_once(client: &crate::client::HttpClient) -> Result<Option<String>, String> {
    let reply = client
        .send(Method::GET, "/v1/status", None, None)
        .await
        .map_err(|e| e.to_string())?;
    if reply.status != 200 {
        return Err(format!(
            "server answered {} to GET /v1/status: {}",
            reply.status,
            reply.text()
        ));
    }
    let status: Value = serde_json::from_slice(&reply.body)
        .map_err(|e| format!("the server's status is not json: {e}"))?;
    Ok(status["advertise_addr"].as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    #[tokio::test]
    async fn bad_settings_fail_open_at_once() {
        for (vars, needle) in [
            (vec![], ENV_ADDR),
            (vec![(ENV_ADDR, "nohost")], "not HOST:PORT"),
            (vec![(ENV_ADDR, "127.0.0.1:1"), (ENV_TLS, "maybe")], ENV_TLS),
            (
                vec![(ENV_ADDR, "127.0.0.1:1"), (ENV_STANDIN_SOURCE_ADDR, "x")],
                ENV_STANDIN_SOURCE_ADDR,
            ),
        ] {
            let report = check(&env_of(&vars), Duration::from_secs(5)).await;
            assert!(!report.connected);
            let error = report.error.clone().unwrap_or_default();
            assert!(error.contains(needle), "{error}");
            assert!(report.elapsed < Duration::from_secs(1), "{report:?}");
            let line = report.to_json();
            assert_eq!(line["entrypoint"], "disconnected");
            assert_eq!(line["standin"], true);
            assert!(line["advertise_addr"].is_null());
        }
    }

    #[tokio::test]
    async fn a_refused_address_is_retried_until_the_window_ends() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let window = Duration::from_millis(800);
        let report = check(&env_of(&[(ENV_ADDR, &addr)]), window).await;
        assert!(!report.connected);
        assert!(report.elapsed >= window, "{report:?}");
        assert!(report.elapsed < window * 3, "{report:?}");
        let error = report.error.unwrap();
        assert!(error.contains("cannot connect"), "{error}");
        assert_eq!(report.server_addr.as_deref(), Some(addr.as_str()));
    }
}
