//! Bootstrapping the Waypoint server exactly once, and keeping its token.
//!
//! A Waypoint server hands out its bootstrap token once: every later `server bootstrap` fails
//! with "server is already bootstrapped". A token lost between the server printing it and the
//! agent storing it is lost for good. So the bootstrap does not run as a `docker exec` (whose
//! output dies with the connection of a killed agent) but as a one-shot container,
//! `waypoint-bootstrap`, that shares the server's network namespace (it dials the server on
//! loopback) and whose output dockerd keeps in a log on the host (`json-file`, whatever the
//! daemon's default driver):
//!
//! 1. a token file on disk: done (a leftover bootstrap container is removed);
//! 2. no token file: find or create `waypoint-bootstrap`; start it only if it never ran;
//!    wait for it to exit;
//! 3. exit 0 (or a failure after the token was printed: Waypoint exits 1 when it cannot
//!    write its CLI context under `$HOME`): read the token from its log, persist it
//!    atomically with mode 0600, and only then remove the container (and with it the log
//!    that held the token);
//! 4. "already bootstrapped": the token is lost; an error with the recovery steps. The agent
//!    never removes the server's volume on its own.
//!
//! A run killed anywhere in 2-3 is finished by the next run from the container's log; a
//! container that has run is never started again, so there is never a second bootstrap.

use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ContainerStateStatusEnum;
use bollard::query_parameters::CreateContainerOptionsBuilder;

use super::containers;
use super::spec::ContainerSpec;
use super::tls::SERVER_TLS_PATH;
use super::{
    BOOTSTRAP_NAME, GRPC_PORT, Role, SERVER_NAME, WaypointError, WaypointPlan, images, read_token,
    token_from_output, write_token,
};

/// Waypoint's answer to a second bootstrap.
pub const ALREADY_BOOTSTRAPPED: &str = "already bootstrapped";

/// How long the bootstrap command may take.
const BOOTSTRAP_LIMIT: Duration = Duration::from_secs(60);

/// What [`ensure`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// The token was on disk already.
    TokenOnDisk,
    /// The server was bootstrapped now (or by a run killed before it stored the token) and
    /// the token stored.
    Bootstrapped { took: Duration },
}

impl Bootstrap {
    pub fn summary(&self, plan: &WaypointPlan) -> String {
        let path = plan.bootstrap_token_path();
        match self {
            Bootstrap::TokenOnDisk => format!(
                "{SERVER_NAME} is bootstrapped; its token is in {}",
                path.display()
            ),
            Bootstrap::Bootstrapped { took } => format!(
                "bootstrapped {SERVER_NAME} in {:.2}s; token stored in {} (0600)",
                took.as_secs_f64(),
                path.display()
            ),
        }
    }
}

/// The one-shot bootstrap container for the server image `image_id`.
pub fn spec(plan: &WaypointPlan, image_id: &str) -> ContainerSpec {
    ContainerSpec {
        name: BOOTSTRAP_NAME.into(),
        role: Role::Bootstrap,
        image: plan.config.server_image.clone(),
        image_id: image_id.to_string(),
        cmd: vec![
            "server".into(),
            "bootstrap".into(),
            // Loopback is among the names of the server's certificate, which is verified
            // against the agent's CA (SSL_CERT_FILE): the token is printed only after the
            // server proved it is the one the agent started.
            format!("-server-addr=127.0.0.1:{GRPC_PORT}"),
            // No CLI context under $HOME: nothing uses it, and a failed write makes the
            // command exit 1 after printing the token.
            "-context-create=".into(),
        ],
        env: vec![format!("SSL_CERT_FILE={SERVER_TLS_PATH}/ca.pem")],
        binds: vec![format!(
            "{}:{SERVER_TLS_PATH}:ro",
            plan.server_tls_dir().display()
        )],
        publish: Vec::new(),
        // The server's own network namespace: its loopback reaches the server whatever
        // the published ports and the firewall admit. (Waypoint accepts a bootstrap from any
        // client; being first is what counts.)
        network_mode: format!("container:{SERVER_NAME}"),
        restart_unless_stopped: false,
        user: None,
    }
}

/// The container's create body, with its log kept on the host: the log holds the token
/// until the agent has stored it, so it must neither leave the host (a daemon.json that
/// ships logs to CloudWatch, journald-to-remote, ...) nor be unreadable by `docker logs`.
/// The container is removed, and the log with it, once the token is stored.
fn create_body(spec: &ContainerSpec) -> bollard::models::ContainerCreateBody {
    let mut body = spec.create_body();
    let host = body.host_config.get_or_insert_with(Default::default);
    host.log_config = Some(bollard::models::HostConfigLogConfig {
        typ: Some("json-file".into()),
        config: None,
    });
    body
}

/// Makes sure the server is bootstrapped and its token is on disk (see the module docs).
pub async fn ensure(docker: &Docker, plan: &WaypointPlan) -> Result<Bootstrap, WaypointError> {
    let token_path = plan.bootstrap_token_path();
    if read_token(&token_path)?.is_some() {
        // A run killed after storing the token but before removing its container.
        if containers::inspect(docker, BOOTSTRAP_NAME).await?.is_some() {
            containers::remove(docker, BOOTSTRAP_NAME).await?;
        }
        return Ok(Bootstrap::TokenOnDisk);
    }

    let start = Instant::now();
    let existing = containers::inspect(docker, BOOTSTRAP_NAME).await?;
    let status = existing
        .as_ref()
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.status);
    match status {
        None => {
            let image_id = images::image_id(docker, &plan.config.server_image)
                .await?
                .ok_or_else(|| {
                    WaypointError::Conflict(format!(
                        "image {} is not present",
                        plan.config.server_image
                    ))
                })?;
            let spec = spec(plan, &image_id);
            let options = CreateContainerOptionsBuilder::default()
                .name(BOOTSTRAP_NAME)
                .build();
            match docker
                .create_container(Some(options), create_body(&spec))
                .await
            {
                Ok(_) => {}
                // Created by a run we raced with (there is the lock, but be safe): use it.
                Err(e) if super::status_of(&e) == Some(409) => {}
                Err(e) => {
                    return Err(WaypointError::docker(
                        format!("create container {BOOTSTRAP_NAME}"),
                        e,
                    ));
                }
            }
            tracing::info!("bootstrapping the waypoint server");
            start_or_clean_up(docker).await?;
        }
        Some(ContainerStateStatusEnum::CREATED) => {
            // Created by a killed run, never started: the bootstrap has not happened yet.
            tracing::info!("bootstrapping the waypoint server (container left by a killed run)");
            start_or_clean_up(docker).await?;
        }
        Some(other) => {
            // Running or finished: never started twice. Its log has the answer.
            tracing::info!(
                state = %other,
                "finishing a bootstrap that a killed run started"
            );
        }
    }

    wait_exit(docker).await?;
    let exit_code = containers::inspect(docker, BOOTSTRAP_NAME)
        .await?
        .and_then(|c| c.state)
        .and_then(|s| s.exit_code);
    let (stdout, stderr) = containers::logs(docker, BOOTSTRAP_NAME).await?;

    match outcome(plan, exit_code, &stdout, &stderr) {
        Outcome::Token(token) => {
            // Persisted before anything else happens with it, including removing the
            // container whose log is its only other copy.
            write_token(&token_path, &token)?;
            tracing::info!(path = %token_path.display(), "stored the waypoint bootstrap token");
            containers::remove(docker, BOOTSTRAP_NAME).await?;
            Ok(Bootstrap::Bootstrapped {
                took: start.elapsed(),
            })
        }
        Outcome::Unrecognised(e) => Err(e),
        Outcome::Failed(e) => {
            containers::remove(docker, BOOTSTRAP_NAME).await?;
            Err(e)
        }
    }
}

/// What the bootstrap container's exit code and output mean (see [`outcome`]).
#[derive(Debug)]
pub enum Outcome {
    /// It printed the token: store it, then remove the container.
    Token(String),
    /// It exited 0 but no token is recognised in its output: the container is kept, its log
    /// being the only copy of a token printed in a form not understood here. The error shows
    /// none of the output.
    Unrecognised(WaypointError),
    /// It failed (having printed no token): remove the container, then report the error.
    Failed(WaypointError),
}

/// Reads the finished bootstrap container's exit code and logs. Pure: public for the fuzz
/// targets and tests.
pub fn outcome(plan: &WaypointPlan, exit_code: Option<i64>, stdout: &str, stderr: &str) -> Outcome {
    let token_path = plan.bootstrap_token_path();
    if exit_code == Some(0) {
        return match token_from_output(stdout) {
            Some(token) => Outcome::Token(token),
            // Kept: if the output has the token in a form not understood here, `docker logs`
            // on this container is the only copy an operator can still recover it from.
            None => Outcome::Unrecognised(WaypointError::Command {
                container: BOOTSTRAP_NAME.into(),
                command: "waypoint server bootstrap".into(),
                status: "exit 0".into(),
                output: format!(
                    "no token found in its output; the container is kept: read \
                     `docker logs {BOOTSTRAP_NAME}`, write the token to {} (mode 0600) and \
                     run `pilot-agent up` again",
                    token_path.display()
                ),
            }),
        };
    }
    if stderr.contains(ALREADY_BOOTSTRAPPED) || stdout.contains(ALREADY_BOOTSTRAPPED) {
        // Checked first: that answer carries no token.
        return Outcome::Failed(WaypointError::TokenLost {
            token_file: token_path,
            server: SERVER_NAME,
            volume: plan.config.volume.clone(),
        });
    }
    // Waypoint prints the token, then writes a CLI context under $HOME, and exits 1 if that
    // write fails (server_bootstrap.go in 0.11.4): the server *is* bootstrapped and this log
    // is the token's only copy. Keep it. (The agent passes `-context-create=`, which skips the
    // write; an image whose CLI differs may still do it.)
    if let Some(token) = printed_token(stdout) {
        tracing::warn!(
            status = ?exit_code,
            "waypoint server bootstrap failed after printing its token; keeping the token"
        );
        return Outcome::Token(token);
    }
    Outcome::Failed(WaypointError::Command {
        container: BOOTSTRAP_NAME.into(),
        command: "waypoint server bootstrap".into(),
        status: exit_code.map_or("no exit code".into(), |c| format!("exit {c}")),
        // No token-shaped line is ever copied into an error.
        output: last_lines(&redact_tokens(&format!("{stdout}{stderr}")), 5),
    })
}

/// The token a failed bootstrap printed before its error: the first line that is not one
/// of Waypoint's error lines (`! ...` and their indented continuations) and has a token's
/// shape.
fn printed_token(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('!'))
        .map(str::trim)
        .find(|l| is_token_shaped(l))
        .map(str::to_string)
}

/// A line that could be a token: long, without whitespace.
fn is_token_shaped(line: &str) -> bool {
    line.len() >= 16 && !line.contains(char::is_whitespace)
}

/// `text` with every token-shaped line replaced, for error messages.
fn redact_tokens(text: &str) -> String {
    text.lines()
        .map(|l| {
            if is_token_shaped(l.trim()) {
                "<redacted>"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts the bootstrap container; if that fails (the server went away), removes it so the
/// next run starts clean. A container that never started has printed no token.
async fn start_or_clean_up(docker: &Docker) -> Result<(), WaypointError> {
    if let Err(e) = containers::start(docker, BOOTSTRAP_NAME).await {
        let _ = containers::remove(docker, BOOTSTRAP_NAME).await;
        return Err(e);
    }
    Ok(())
}

/// Waits until the bootstrap container is not running (at most [`BOOTSTRAP_LIMIT`]).
async fn wait_exit(docker: &Docker) -> Result<(), WaypointError> {
    containers::wait_exit(docker, BOOTSTRAP_NAME, BOOTSTRAP_LIMIT)
        .await
        .map_err(|e| match e {
            WaypointError::Timeout { limit, .. } => WaypointError::Timeout {
                what: format!("{BOOTSTRAP_NAME} (waypoint server bootstrap)"),
                limit,
            },
            other => other,
        })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, WaypointConfig};

    fn plan() -> WaypointPlan {
        WaypointPlan::from_config(&Config {
            waypoint: Some(WaypointConfig::default()),
            ..Config::default()
        })
        .unwrap()
    }

    #[test]
    fn outcomes_of_the_bootstrap_container() {
        let p = plan();
        let token = "s.b4d8e0f1a2c3d4e5f6071829";
        match outcome(&p, Some(0), &format!("Bootstrapping...\n{token}\n"), "") {
            Outcome::Token(t) => assert_eq!(t, token),
            other => panic!("{other:?}"),
        }
        // Exit 0 without a recognisable token: kept, and the output (maybe a token) not shown.
        let Outcome::Unrecognised(e) = outcome(&p, Some(0), "token is abc def ghi jkl mno", "")
        else {
            panic!("not kept");
        };
        assert!(!e.to_string().contains("abc def"), "{e}");
        // Waypoint 0.11.4 when the CLI context cannot be written: the token, then the error,
        // exit 1. The server is bootstrapped: the token is kept.
        let failed_after = format!(
            "{token}\n! Error setting the CLI context: mkdir /home/waypoint/.config: \
             permission denied\n  The Waypoint server successfully bootstrapped, but creating \
             the context failed.\n"
        );
        match outcome(&p, Some(1), &failed_after, "") {
            Outcome::Token(t) => assert_eq!(t, token),
            other => panic!("{other:?}"),
        }
        // A failure without a token: its error lines, and never a token-shaped line.
        let Outcome::Failed(e) = outcome(
            &p,
            Some(1),
            "! failed to create client: error connecting to server: context deadline exceeded\n",
            &format!("{token}\n"),
        ) else {
            panic!("not failed");
        };
        let e = e.to_string();
        assert!(e.contains("context deadline exceeded"), "{e}");
        assert!(!e.contains(token), "a token-shaped line in an error: {e}");
        assert!(matches!(
            outcome(&p, Some(1), "", "server is already bootstrapped"),
            Outcome::Failed(WaypointError::TokenLost { .. })
        ));
        let Outcome::Failed(e) = outcome(&p, None, "1\n2\n3\n4\n5\n6\n7", "") else {
            panic!("not failed");
        };
        assert!(e.to_string().contains("3 | 4 | 5 | 6 | 7"), "{e}");
    }
}
