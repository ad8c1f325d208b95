//! `waypoint runner agent`, after its start-up connection succeeded (see `cli.rs`): the
//! runner's life as Waypoint's runner lives it, plus the stand-in's Docker check.
//!
//! - Registration: the runner opens its configuration stream (`POST /v1/runner/config`, held
//!   open by the server) with its id, labels and token. While the stream is open the server
//!   lists the runner; when it closes, the server forgets a pre-adopted runner (Waypoint's
//!   `RunnerOffline`).
//! - When the server goes away, the runner reconnects by itself, with gRPC's backoff (1 s,
//!   growing 1.6 times up to 120 s).
//! - When the server REFUSES the stream (missing, foreign, expired or other-runner token), the
//!   runner logs `error receiving configuration, exiting` and stays up without registering,
//!   as Waypoint's runner does: it never exits by itself after its start.
//! - Only after the first registration it checks the Docker API at `DOCKER_HOST` (with the
//!   Docker client's TLS rules) every 2 s and reports the result to the server. Waypoint's
//!   runner does not do that (its plugins use Docker when a job runs); the stand-in keeps it so
//!   end-to-end tests can prove the runner reaches Docker over verified mutual TLS.
//!
//! What worked and what failed goes to stderr (one line per change, never a token) and to a
//! JSON status file that tests read with `docker exec RUNNER cat
//! /tmp/waypoint-runner-status.json` (path from `WAYPOINT_STANDIN_STATUS_FILE`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client::HttpClient;
use crate::conn::ServerConn;
use crate::docker::{self, Docker};
use crate::error::Result;
use crate::fsutil::write_atomic;
use crate::service::{Code, RpcError};
use crate::{debug_log, log, now_rfc3339};

pub const ENV_STATUS_FILE: &str = "WAYPOINT_STANDIN_STATUS_FILE";
pub const DEFAULT_STATUS_FILE: &str = "/tmp/waypoint-runner-status.json";

/// Time between Docker checks.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Deadline for each call to the server or to Docker.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A configuration stream silent this long is taken as broken.
const STREAM_SILENCE: Duration = Duration::from_secs(15);

/// The status file's document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerStatus {
    pub standin: bool,
    pub runner_id: String,
    pub server_addr: String,
    /// The configuration stream is open and the server registered the runner.
    pub server_ok: bool,
    pub server_error: Option<String>,
    pub registered_as: Option<String>,
    pub docker_host: String,
    pub docker_ok: bool,
    pub docker_error: Option<String>,
    pub docker_version: Option<String>,
    pub docker_tls: bool,
    pub docker_tls_verified: bool,
    pub updated_at: String,
}

/// What `runner agent` was asked to do.
pub struct RunnerOptions {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// The server connection, token included.
    pub server: ServerConn,
    /// Snapshot of the Docker variables (`DOCKER_HOST`, …).
    pub docker_env: HashMap<String, String>,
    pub status_file: PathBuf,
}

/// Reads the Docker variables the runner uses from the process environment.
pub fn docker_env_from_process() -> HashMap<String, String> {
    [
        docker::ENV_HOST,
        docker::ENV_TLS_VERIFY,
        docker::ENV_CERT_PATH,
        docker::ENV_TLS,
    ]
    .iter()
    .filter_map(|name| std::env::var(name).ok().map(|v| (name.to_string(), v)))
    .collect()
}

/// gRPC's reconnect backoff: 1 s, times 1.6 each attempt, at most 120 s, ±20 % jitter.
fn backoff(attempt: u32) -> Duration {
    let base = (1.6f64).powi(attempt.min(12) as i32).min(120.0);
    let jitter = crate::token::random_bytes::<1>().map_or(128, |b| b[0]);
    let factor = 0.8 + 0.4 * f64::from(jitter) / 255.0;
    Duration::from_secs_f64(base * factor)
}

struct Shared {
    status: Mutex<RunnerStatus>,
    path: PathBuf,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut RunnerStatus)) {
        let snapshot = {
            let mut s = match self.status.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            f(&mut s);
            s.updated_at = now_rfc3339();
            s.clone()
        };
        write_status(&self.path, &snapshot);
    }

    fn get(&self) -> RunnerStatus {
        match self.status.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// How one configuration stream ended.
enum StreamEnd {
    /// The server went away (Waypoint: `Unavailable`): reconnect.
    Unavailable(String),
    /// The server refused it: the runner stops trying.
    Refused(RpcError),
}

/// Runs the agent until `shutdown` completes.
pub async fn run(opts: RunnerOptions, shutdown: impl Future<Output = ()>) -> Result<()> {
    let client = opts.server.client(CALL_TIMEOUT)?;
    let shared = Arc::new(Shared {
        status: Mutex::new(RunnerStatus {
            standin: true,
            runner_id: opts.id.clone(),
            server_addr: opts.server.describe(),
            server_ok: false,
            server_error: None,
            registered_as: None,
            docker_host: String::new(),
            docker_ok: false,
            docker_error: None,
            docker_version: None,
            docker_tls: false,
            docker_tls_verified: false,
            updated_at: now_rfc3339(),
        }),
        path: opts.status_file.clone(),
    });
    shared.update(|_| {});
    log!("runner: cookie not set for runner, will skip adoption process");
    log!(
        "runner: starting as {} against server {}",
        opts.id,
        opts.server.describe()
    );

    let token = opts.server.token.clone();
    let (registered_tx, mut registered_rx) = tokio::sync::watch::channel(false);
    let config_loop = {
        let shared = shared.clone();
        let client = client.clone();
        let id = opts.id.clone();
        let labels = opts.labels.clone();
        let token = token.clone();
        async move {
            let mut attempt = 0u32;
            loop {
                match config_stream(
                    &client,
                    token.as_deref(),
                    &id,
                    &labels,
                    &shared,
                    &registered_tx,
                )
                .await
                {
                    (true, end) => {
                        attempt = 0;
                        if let StreamEnd::Refused(e) = end {
                            refused(&shared, &e);
                            break;
                        }
                        log!("runner: runner disconnected from server, attempting reconnect");
                    }
                    (false, StreamEnd::Unavailable(e)) => {
                        if attempt == 0 {
                            log!("runner: error connecting to Waypoint server, will retry: {e}");
                        } else {
                            debug_log!("runner: reconnect attempt {attempt} failed: {e}");
                        }
                    }
                    (false, StreamEnd::Refused(e)) => {
                        refused(&shared, &e);
                        break;
                    }
                }
                shared.update(|s| {
                    s.server_ok = false;
                    if s.server_error.is_none() {
                        s.server_error = Some("runner disconnected from server".into());
                    }
                });
                let _ = registered_tx.send(false);
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            // Like Waypoint's runner after its config stream gave up: still running, idle.
            std::future::pending::<()>().await;
        }
    };

    let docker_loop = {
        let shared = shared.clone();
        let client = client.clone();
        let id = opts.id.clone();
        let env = opts.docker_env.clone();
        async move {
            // Docker is touched only after the first registration.
            while !*registered_rx.borrow_and_update() {
                if registered_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            let mut last: Option<(bool, Option<String>, Option<String>, String)> = None;
            loop {
                let mut s = shared.get();
                check_docker(&env, &mut s).await;
                shared.update(|st| {
                    st.docker_host = s.docker_host.clone();
                    st.docker_ok = s.docker_ok;
                    st.docker_error = s.docker_error.clone();
                    st.docker_version = s.docker_version.clone();
                    st.docker_tls = s.docker_tls;
                    st.docker_tls_verified = s.docker_tls_verified;
                });
                let now = (
                    s.docker_ok,
                    s.docker_version.clone(),
                    s.docker_error.clone(),
                    s.docker_host.clone(),
                );
                if last.as_ref() != Some(&now) {
                    match &s.docker_error {
                        None => log!(
                            "runner: docker {} ok, version {}",
                            s.docker_host,
                            s.docker_version.as_deref().unwrap_or("?")
                        ),
                        Some(e) => log!("runner: docker {} failed: {e}", s.docker_host),
                    }
                    last = Some(now);
                }
                if *registered_rx.borrow() {
                    let body = json!({
                        "id": id,
                        "docker_ok": s.docker_ok,
                        "docker_version": s.docker_version,
                    });
                    match call(&client, token.as_deref(), Method::POST, "/v1/runners", body).await {
                        Ok(()) => {}
                        Err(e) => log!(
                            "runner: the server refused the runner's report: {}",
                            e.message
                        ),
                    }
                }
                tokio::time::sleep(HEARTBEAT).await;
            }
        }
    };

    tokio::select! {
        _ = shutdown => {}
        _ = config_loop => {}
        _ = docker_loop => {}
    }
    log!("runner: stopping on signal");
    Ok(())
}

fn refused(shared: &Shared, e: &RpcError) {
    log!(
        "runner: error receiving configuration, exiting: err=\"{}\"",
        e.go_text()
    );
    shared.update(|s| {
        s.server_ok = false;
        s.registered_as = None;
        s.server_error = Some(e.message.clone());
    });
}

/// One configuration stream: opens it, waits for the registration, then holds it until it
/// ends. Returns whether the runner got registered, and how the stream ended.
async fn config_stream(
    client: &HttpClient,
    token: Option<&str>,
    id: &str,
    labels: &BTreeMap<String, String>,
    shared: &Shared,
    registered: &tokio::sync::watch::Sender<bool>,
) -> (bool, StreamEnd) {
    let body = json!({ "id": id, "labels": labels })
        .to_string()
        .into_bytes();
    let mut stream = match client
        .stream(Method::POST, "/v1/runner/config", token, Some(body))
        .await
    {
        Ok(s) => s,
        Err(e) => return (false, StreamEnd::Unavailable(e.to_string())),
    };
    if stream.status != 200 {
        let mut text = Vec::new();
        while let Ok(Some(chunk)) = stream.next_chunk().await {
            text.extend_from_slice(&chunk);
        }
        return (false, StreamEnd::Refused(rpc_error(stream.status, &text)));
    }
    let mut was_registered = false;
    loop {
        match tokio::time::timeout(STREAM_SILENCE, stream.next_chunk()).await {
            Ok(Ok(Some(chunk))) => {
                if !was_registered && chunk.windows(10).any(|w| w == b"registered") {
                    was_registered = true;
                    shared.update(|s| {
                        s.server_ok = true;
                        s.server_error = None;
                        s.registered_as = Some(id.to_string());
                    });
                    let _ = registered.send(true);
                    log!(
                        "runner: server {} ok, registered as {id}",
                        shared.get().server_addr
                    );
                }
            }
            Ok(Ok(None)) => {
                return (
                    was_registered,
                    StreamEnd::Unavailable("stream closed".into()),
                );
            }
            Ok(Err(e)) => return (was_registered, StreamEnd::Unavailable(e)),
            Err(_) => {
                return (
                    was_registered,
                    StreamEnd::Unavailable("no keepalive from the server".into()),
                );
            }
        }
    }
}

/// The error of a refused API call, from its JSON body.
pub fn rpc_error(status: u16, body: &[u8]) -> RpcError {
    serde_json::from_slice::<RpcError>(body).unwrap_or_else(|_| {
        RpcError::new(
            if status == 401 {
                Code::Unauthenticated
            } else {
                Code::Unknown
            },
            String::from_utf8_lossy(body).trim().to_string(),
        )
    })
}

async fn call(
    client: &HttpClient,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> std::result::Result<(), RpcError> {
    let reply = client
        .send(method, path, token, Some(body.to_string().into_bytes()))
        .await
        .map_err(|e| RpcError::new(Code::Unavailable, e.to_string()))?;
    if reply.status == 200 {
        Ok(())
    } else {
        Err(rpc_error(reply.status, &reply.body))
    }
}

async fn check_docker(env: &HashMap<String, String>, status: &mut RunnerStatus) {
    let docker = match Docker::from_env(&|k| env.get(k).cloned(), CALL_TIMEOUT) {
        Ok(d) => d,
        Err(e) => {
            status.docker_host = env.get(docker::ENV_HOST).cloned().unwrap_or_default();
            status.docker_ok = false;
            status.docker_error = Some(e.to_string());
            status.docker_version = None;
            status.docker_tls = false;
            status.docker_tls_verified = false;
            return;
        }
    };
    status.docker_host = docker.description.clone();
    status.docker_tls = docker.tls;
    status.docker_tls_verified = docker.verified;
    match docker.version().await {
        Ok(v) => {
            status.docker_ok = true;
            status.docker_error = None;
            status.docker_version = Some(v);
        }
        Err(e) => {
            status.docker_ok = false;
            status.docker_error = Some(e.to_string());
            status.docker_version = None;
        }
    }
}

fn write_status(path: &Path, status: &RunnerStatus) {
    let written = serde_json::to_vec_pretty(status)
        .map_err(|e| e.to_string())
        .and_then(|json| write_atomic(path, &json, 0o644).map_err(|e| e.to_string()));
    if let Err(e) = written {
        log!(
            "runner: failed to write the status file {}: {e}",
            path.display()
        );
    }
}
