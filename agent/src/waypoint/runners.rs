//! The runner containers `waypoint-runner-1..N`.
//!
//! Each runs `runner agent` with its own token (minted once with `waypoint token new` in the
//! server container, stored 0600 in `STATE_DIR/waypoint/runner-N-token`, reused ever after),
//! finds the server by name on the Pilot network (on a runner-only host: at the server VM's
//! address, with tokens minted there by a one-shot `waypoint-mint` container), and builds through the host's Docker API
//! over mutual TLS: `DOCKER_HOST=tcp://GATEWAY:2376`, `DOCKER_TLS_VERIFY=1`, and the runner
//! client certificate mounted read-only at `DOCKER_CERT_PATH=/certs`. No Docker socket is
//! mounted and nothing is privileged: what a runner may do on the host is exactly what the
//! TLS API grants its certificate.
//!
//! A token minted by a run that was killed before storing it is simply never used; the next
//! run mints another. Runners beyond N are removed (their token files are kept, so scaling up
//! again reuses them).

use std::collections::BTreeSet;
use std::time::Duration;

use bollard::Docker;

use super::containers::{self, Action, ExecOutput};
use super::spec::ContainerSpec;
use super::{
    GRPC_PORT, MINT_NAME, RUNNER_CERT_PATH, RUNNER_PREFIX, Role, SERVER_NAME, ServerRef,
    WaypointError, WaypointPlan, images, read_token, token_from_output, write_token,
};

/// How long `waypoint token new` may take.
const MINT_LIMIT: Duration = Duration::from_secs(30);

/// The name of runner `index` (1-based).
pub fn name(index: u32) -> String {
    format!("{RUNNER_PREFIX}{index}")
}

/// The spec of runner `index` for the image `image_id`, with its token and Waypoint runner ID.
pub fn spec(
    plan: &WaypointPlan,
    index: u32,
    image_id: &str,
    token: &str,
    runner_id: &str,
    server_address: &str,
) -> ContainerSpec {
    let c = &plan.config;
    ContainerSpec {
        name: name(index),
        role: Role::Runner,
        image: c.runner_image.clone(),
        image_id: image_id.to_string(),
        cmd: vec!["runner".into(), "agent".into(), format!("-id={runner_id}")],
        env: {
            let mut env = super::cli_env(server_address, token);
            env.extend([
                format!("DOCKER_HOST={}", plan.runner_docker_host()),
                "DOCKER_TLS_VERIFY=1".into(),
                format!("DOCKER_CERT_PATH={RUNNER_CERT_PATH}"),
            ]);
            env
        },
        binds: vec![format!(
            "{}:{RUNNER_CERT_PATH}:ro",
            plan.runner_cert_dir.display()
        )],
        publish: Vec::new(),
        network_mode: c.network.name.clone(),
        restart_unless_stopped: true,
    }
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Default)]
pub struct RunnersReport {
    /// Each wanted runner and what was done to it.
    pub runners: Vec<(String, Action)>,
    /// Runners beyond the wanted count, removed.
    pub removed: Vec<String>,
    /// Tokens minted in this run.
    pub minted: u32,
}

impl RunnersReport {
    pub fn changed(&self) -> bool {
        self.minted > 0 || !self.removed.is_empty() || self.runners.iter().any(|(_, a)| a.changed())
    }

    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if self.runners.is_empty() {
            parts.push("no runners wanted".into());
        } else if self.runners.iter().all(|(_, a)| !a.changed()) {
            parts.push(format!(
                "{} runner(s) running, unchanged",
                self.runners.len()
            ));
        } else {
            parts.extend(self.runners.iter().map(|(n, a)| format!("{n} {a}")));
        }
        if self.minted > 0 {
            parts.push(format!("{} runner token(s) minted", self.minted));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {}", self.removed.join(", ")));
        }
        parts.join("; ")
    }
}

/// Converges runners 1..=N and removes the rest. `runner_id_prefix` makes the Waypoint runner
/// IDs (`PREFIX-runner-N`) distinct between hosts.
pub async fn ensure(
    docker: &Docker,
    plan: &WaypointPlan,
    runner_id_prefix: &str,
) -> Result<RunnersReport, WaypointError> {
    let c = &plan.config;
    let mut report = RunnersReport::default();
    let wanted: BTreeSet<String> = (1..=c.runners).map(name).collect();

    // Fewer first: scaling down never waits on the creates of scaling up.
    for (found, _) in containers::list_role(docker, Role::Runner).await? {
        if !wanted.contains(&found) {
            containers::remove(docker, &found).await?;
            report.removed.push(found);
        }
    }
    if c.runners == 0 {
        return Ok(report);
    }

    let image_id = images::image_id(docker, &c.runner_image)
        .await?
        .ok_or_else(|| {
            WaypointError::Conflict(format!(
                "image {} is not present (the images step makes it present)",
                c.runner_image
            ))
        })?;
    let server_address = match plan.server {
        ServerRef::Local => format!("{SERVER_NAME}:{GRPC_PORT}"),
        ServerRef::Remote => super::remote_server(plan)?.0,
    };
    for index in 1..=c.runners {
        let token_path = plan.runner_token_path(index);
        let token = match read_token(&token_path)? {
            Some(t) => t,
            None => {
                let t = mint(docker, plan).await?;
                // Stored before the runner gets it, so a restart of the agent reuses it.
                write_token(&token_path, &t)?;
                report.minted += 1;
                t
            }
        };
        let runner_id = format!("{runner_id_prefix}-runner-{index}");
        let ensured = containers::ensure(
            docker,
            &spec(plan, index, &image_id, &token, &runner_id, &server_address),
        )
        .await?;
        report.runners.push((name(index), ensured.action));
    }
    Ok(report)
}

/// Mints a token with `waypoint token new` against the runners' server: in the server
/// container on this host, or in a one-shot container against the server VM (runner-only
/// host). Authenticated with the server's token, passed in the environment of that one
/// command, never on its command line.
async fn mint(docker: &Docker, plan: &WaypointPlan) -> Result<String, WaypointError> {
    let out = match plan.server {
        ServerRef::Local => super::server_cli(docker, plan, &["token", "new"], MINT_LIMIT).await?,
        ServerRef::Remote => {
            let (address, token) = super::remote_server(plan)?;
            let image_id = images::image_id(docker, &plan.config.runner_image)
                .await?
                .ok_or_else(|| {
                    WaypointError::Conflict(format!(
                        "image {} is not present",
                        plan.config.runner_image
                    ))
                })?;
            let spec = ContainerSpec {
                name: MINT_NAME.into(),
                role: Role::Mint,
                image: plan.config.runner_image.clone(),
                image_id,
                cmd: vec!["token".into(), "new".into()],
                env: super::cli_env(&address, &token),
                binds: Vec::new(),
                publish: Vec::new(),
                network_mode: plan.config.network.name.clone(),
                restart_unless_stopped: false,
            };
            containers::run_once(docker, &spec, MINT_LIMIT).await?
        }
    };
    let token = mint_outcome(plan, &out)?;
    tracing::info!("minted a waypoint runner token");
    Ok(token)
}

/// What `waypoint token new` (run as [`mint`] runs it for `plan`) printed and how it ended:
/// the new token, or the error to report. A successful command's output is never shown (it
/// may hold a token in a form not understood here). Pure: public for the fuzz targets and
/// tests.
pub fn mint_outcome(plan: &WaypointPlan, out: &ExecOutput) -> Result<String, WaypointError> {
    let (bootstrap_path, container) = match plan.server {
        ServerRef::Local => (plan.bootstrap_token_path(), SERVER_NAME.to_string()),
        ServerRef::Remote => (plan.remote_token_path(), MINT_NAME.to_string()),
    };
    if out.exit_code == Some(0) {
        if let Some(token) = token_from_output(&out.stdout) {
            return Ok(token);
        }
        // Its stdout may hold a token in a form not understood here: never shown.
        return Err(WaypointError::Command {
            container,
            command: "waypoint token new".into(),
            status: "exit 0".into(),
            output: "no token found in its output".into(),
        });
    }
    // On failure the command printed no token: its output can be shown.
    let output = format!("{} {}", out.stdout.trim(), out.stderr.trim());
    let lower = output.to_ascii_lowercase();
    if lower.contains("unauthorized") || lower.contains("401") || lower.contains("rejected") {
        return Err(WaypointError::TokenRejected {
            token_file: bootstrap_path,
            detail: output.trim().to_string(),
            hint: match plan.server {
                ServerRef::Local => {
                    "write a valid Waypoint token there (mode 0600), or see the recovery steps \
                     that `pilot-agent up` gives after removing it"
                }
                ServerRef::Remote => {
                    "it came from the server VM's credentials; check that VM's \
                     `pilot-agent credentials`, then remove the file so the next pass fetches it \
                     again"
                }
            },
        });
    }
    Err(WaypointError::Command {
        container,
        command: "waypoint token new".into(),
        status: out
            .exit_code
            .map_or("no exit code".into(), |c| format!("exit {c}")),
        output: output.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, WaypointConfig};

    fn out(exit_code: Option<i64>, stdout: &str, stderr: &str) -> ExecOutput {
        ExecOutput {
            exit_code,
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn mint_outcomes() {
        let plan = WaypointPlan::from_config(&Config {
            waypoint: Some(WaypointConfig::default()),
            ..Config::default()
        })
        .unwrap();
        let token = "tok_0123456789abcdef";
        assert_eq!(
            mint_outcome(&plan, &out(Some(0), &format!("{token}\n"), "")).unwrap(),
            token
        );
        // Exit 0 but no token: the output is never shown.
        let e = mint_outcome(&plan, &out(Some(0), "a secret maybe", "")).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = mint_outcome(&plan, &out(Some(1), "", "rpc error: Unauthorized")).unwrap_err();
        assert!(matches!(e, WaypointError::TokenRejected { .. }), "{e}");
        let e = mint_outcome(&plan, &out(Some(2), "", "server unavailable")).unwrap_err();
        assert!(e.to_string().contains("server unavailable"), "{e}");
    }
}
