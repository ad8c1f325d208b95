//! `waypoint runner agent`: registers with the server using its token and checks the Docker API
//! at `DOCKER_HOST`, every 2 s, until SIGTERM. What worked and what failed goes to stderr (one
//! line per change, never a token) and to a JSON status file that tests read with
//! `docker exec RUNNER cat /tmp/waypoint-runner-status.json` (path from
//! `WAYPOINT_STANDIN_STATUS_FILE`).
//!
//! The Docker settings are re-read on every round, certificate files included, so a runner
//! recovers by itself when the daemon comes back or the agent rotates the certificates.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::conn::ServerConn;
use crate::docker::{self, Docker};
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use crate::{log, now_rfc3339};

pub const ENV_STATUS_FILE: &str = "WAYPOINT_STANDIN_STATUS_FILE";
pub const DEFAULT_STATUS_FILE: &str = "/tmp/waypoint-runner-status.json";

/// Time between rounds; also what a recovering server or daemon waits at most to be noticed.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Deadline for each call to the server or to Docker.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The status file's document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerStatus {
    pub standin: bool,
    pub runner_id: String,
    pub server_addr: String,
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
    /// The server connection, or why it could not be resolved.
    pub server: std::result::Result<ServerConn, String>,
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

/// Runs the agent until `shutdown` completes. Returns an error only for a configuration that
/// can never work (no server address, no token); the status file says so first.
pub async fn run(opts: RunnerOptions, shutdown: impl Future<Output = ()>) -> Result<()> {
    let mut status = RunnerStatus {
        standin: true,
        runner_id: opts.id.clone(),
        server_addr: String::new(),
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
    };

    // A missing address or token cannot heal by waiting: report it and exit 1, as Waypoint's
    // runner does, but leave the status file behind for whoever investigates.
    let fatal = |status: &mut RunnerStatus, err: Error| -> Result<()> {
        status.server_error = Some(err.to_string());
        status.updated_at = now_rfc3339();
        write_status(&opts.status_file, status);
        log!("runner: cannot start: {err}");
        Err(err)
    };
    let server = match &opts.server {
        Ok(s) => s.clone(),
        Err(e) => return fatal(&mut status, Error::Config(e.clone())),
    };
    status.server_addr = server.describe();
    let token = match server.require_token() {
        Ok(t) => t.to_string(),
        Err(e) => return fatal(&mut status, e),
    };
    let client = match server.client(CALL_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return fatal(&mut status, e),
    };
    log!(
        "runner: starting as {} against server {}",
        opts.id,
        server.describe()
    );

    tokio::pin!(shutdown);
    let mut last_server: Option<(bool, Option<String>)> = None;
    let mut last_docker: Option<(bool, Option<String>, Option<String>, String)> = None;
    loop {
        let round = async {
            check_docker(&opts.docker_env, &mut status).await;
            let registration = register(&client, &token, &opts.id, &status).await;
            status.server_ok = registration.is_ok();
            status.server_error = registration.err();
            status.registered_as = status.server_ok.then(|| opts.id.clone());
            status.updated_at = now_rfc3339();
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = round => {}
        }
        write_status(&opts.status_file, &status);

        let docker_now = (
            status.docker_ok,
            status.docker_version.clone(),
            status.docker_error.clone(),
            status.docker_host.clone(),
        );
        if last_docker.as_ref() != Some(&docker_now) {
            match &status.docker_error {
                None => log!(
                    "runner: docker {} ok, version {}",
                    status.docker_host,
                    status.docker_version.as_deref().unwrap_or("?")
                ),
                Some(e) => log!("runner: docker {} failed: {e}", status.docker_host),
            }
            last_docker = Some(docker_now);
        }
        let server_now = (status.server_ok, status.server_error.clone());
        if last_server.as_ref() != Some(&server_now) {
            match &status.server_error {
                None => log!(
                    "runner: server {} ok, registered as {}",
                    status.server_addr,
                    opts.id
                ),
                Some(e) => log!("runner: server {} failed: {e}", status.server_addr),
            }
            last_server = Some(server_now);
        }

        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
    log!("runner: stopping on signal");
    Ok(())
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

async fn register(
    client: &crate::client::HttpClient,
    token: &str,
    id: &str,
    status: &RunnerStatus,
) -> std::result::Result<(), String> {
    let body =
        json!({ "id": id, "docker_ok": status.docker_ok, "docker_version": status.docker_version });
    let reply = client
        .send(
            Method::POST,
            "/v1/runners",
            Some(token),
            Some(body.to_string().into_bytes()),
        )
        .await
        .map_err(|e| e.to_string())?;
    match reply.status {
        200 => Ok(()),
        401 => Err(format!(
            "the server rejected the runner's token (401): {}",
            reply.text()
        )),
        other => Err(format!("the server answered {other}: {}", reply.text())),
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
