//! The runner containers `waypoint-runner-1..N`.
//!
//! Each runs `runner agent -id=HOST-runner-N` with its own runner token (minted once with
//! `waypoint runner token -id=HOST-runner-N -expires-in=0` in the server container: a token
//! Waypoint accepts from that runner only, for runner calls only, never a login token that
//! could mint more or change the server), stored 0600 in `STATE_DIR/waypoint/runner-N-token`, reused ever after),
//! finds the server by name on the Pilot network (on a runner-only host: at the server VM's
//! address, each token minted there by the server VM's endpoint, `POST /v1/runner-token`, so
//! that the host never holds a token that could mint more), and builds through the host's
//! Docker API
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
use futures_util::{StreamExt, TryStreamExt, stream};

use super::containers::{self, Action, ExecOutput};
pub use super::runner_id::{RunnerId, index_of, name};
use super::spec::ContainerSpec;
use super::tls::{self, SERVER_CA_PATH};
use super::{
    GRPC_PORT, MINT_NAME, RUNNER_CERT_PATH, Role, SERVER_NAME, ServerRef, WaypointError,
    WaypointPlan, images, read_token, token_from_output, write_token,
};

/// How long `waypoint runner token` may take.
const MINT_LIMIT: Duration = Duration::from_secs(30);

/// The variable that carries the SHA-256 of the CA the runner verifies its server with into
/// the spec (and so its hash).
pub const CA_HASH_ENV: &str = "PILOT_WAYPOINT_CA_SHA256";

/// The spec of runner `index` for the image `image_id`, with its token and Waypoint runner ID,
/// verifying its server with the CA whose SHA-256 is `server_ca_sha256`.
pub fn spec(
    plan: &WaypointPlan,
    index: u32,
    image_id: &str,
    token: &str,
    runner_id: &str,
    server_address: &str,
    server_ca_sha256: &str,
) -> ContainerSpec {
    let c = &plan.config;
    ContainerSpec {
        name: name(index),
        role: Role::Runner,
        image: c.runner_image.clone(),
        image_id: image_id.to_string(),
        cmd: vec!["runner".into(), "agent".into(), format!("-id={runner_id}")],
        env: {
            let (_, ca_file) = plan.runner_server_ca();
            let mut env = super::cli_env(server_address, token, &ca_file);
            env.extend([
                format!("DOCKER_HOST={}", plan.runner_docker_host()),
                "DOCKER_TLS_VERIFY=1".into(),
                format!("DOCKER_CERT_PATH={RUNNER_CERT_PATH}"),
                // Go reads SSL_CERT_FILE once: a new CA must restart the runner.
                format!("{CA_HASH_ENV}={server_ca_sha256}"),
            ]);
            env
        },
        binds: {
            let mut binds = vec![format!(
                "{}:{RUNNER_CERT_PATH}:ro",
                plan.runner_cert_dir.display()
            )];
            if plan.server == ServerRef::Remote {
                binds.push(format!(
                    "{}:{SERVER_CA_PATH}:ro",
                    plan.server_ca_dir().display()
                ));
            }
            binds
        },
        publish: Vec::new(),
        network_mode: c.network.name.clone(),
        restart_unless_stopped: true,
        // Root, as Waypoint's own `runner install -platform=docker` runs its runners: the
        // official image's user is `waypoint` (uid 100), which could not read the client key
        // mounted at /certs (0600, root's, in a 0700 directory). Root of the container is not
        // root of the host: no privilege, no socket, only what the TLS API grants the key.
        user: Some("root".into()),
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
    /// Runner IDs of removed runners that the server forgot (`waypoint runner forget`).
    pub forgotten: Vec<String>,
    /// Removed runners the server could not be made to forget, with why.
    pub not_forgotten: Vec<String>,
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
        if !self.forgotten.is_empty() {
            parts.push(format!("the server forgot {}", self.forgotten.join(", ")));
        }
        if !self.not_forgotten.is_empty() {
            parts.push(format!(
                "the server still lists {}",
                self.not_forgotten.join(", ")
            ));
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
            if plan.server == ServerRef::Local
                && let Some(index) = index_of(&found)
            {
                forget_local(
                    docker,
                    plan,
                    &RunnerId::new(runner_id_prefix, index),
                    &mut report,
                )
                .await;
            }
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
    // `waypoint.start_parallelism` (8 by default): runners do not wait on one another's mint
    // and create, and a small host's dockerd does not get dozens of requests at once.
    let parallel = c.start_parallelism.max(1) as usize;
    // Tokens first: on a runner-only host the server's address comes with a minted token.
    // Runners are independent of one another: their tokens are minted, and their containers
    // made, a few at a time, so that N runners cost about what one does.
    let tokens: Vec<(u32, RunnerId, String, bool)> = stream::iter(1..=c.runners)
        .map(|index| runner_token(docker, plan, RunnerId::new(runner_id_prefix, index)))
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
    report.minted = tokens.iter().filter(|(_, _, _, minted)| *minted).count() as u32;
    let server_address = match plan.server {
        ServerRef::Local => format!("{SERVER_NAME}:{GRPC_PORT}"),
        ServerRef::Remote => super::remote_server(plan)?,
    };
    let (ca_path, _) = plan.runner_server_ca();
    let server_ca_sha256 = tls::file_sha256(&ca_path)?;
    let specs: Vec<ContainerSpec> = tokens
        .iter()
        .map(|(index, runner_id, token, _)| {
            spec(
                plan,
                *index,
                &image_id,
                token,
                &runner_id.to_string(),
                &server_address,
                &server_ca_sha256,
            )
        })
        .collect();
    // Owned specs: a future borrowing from the iterator would not be `Send` for every
    // lifetime the step's future needs.
    let mut made: Vec<(String, Action)> = stream::iter(specs)
        .map(|spec| async move {
            let ensured = containers::ensure(docker, &spec).await?;
            Ok::<_, WaypointError>((spec.name, ensured.action))
        })
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
    made.sort_by_key(|(name, _)| index_of(name));
    report.runners = made;
    Ok(report)
}

/// Runner `runner`'s token: the stored one, or one minted now (stored before any runner gets
/// it, so that a restarted agent reuses it); whether it was minted.
async fn runner_token(
    docker: &Docker,
    plan: &WaypointPlan,
    runner: RunnerId,
) -> Result<(u32, RunnerId, String, bool), WaypointError> {
    let index = runner.index();
    let token_path = plan.runner_token_path(index);
    let stored = read_token(&token_path)?;
    // On a runner-only host the server VM's CA comes with a minted token; tokens kept without
    // it (an earlier version) or with another server VM's are minted again (the old ones are
    // not used).
    let stored = stored.filter(|_| plan.server == ServerRef::Local || ca_stored(plan));
    if let Some(t) = stored {
        return Ok((index, runner, t, false));
    }
    let t = match plan.server {
        ServerRef::Local => {
            let t = mint_local(docker, plan, &runner).await?;
            write_token(&token_path, &t)?;
            t
        }
        // Stored by the mint, as here.
        ServerRef::Remote => super::link::mint_remote(plan, &runner).await?,
    };
    Ok((index, runner, t, true))
}

/// `waypoint runner forget ID` in the server container, so that the server lists exactly the
/// runners that exist (Waypoint keeps a removed runner's record until it is forgotten, and
/// forgetting an unknown one is not an error). A failure is reported in the step's detail,
/// not as the step's error: the container is gone either way, and the next removal tries
/// nothing for it again.
async fn forget_local(
    docker: &Docker,
    plan: &WaypointPlan,
    runner: &RunnerId,
    report: &mut RunnersReport,
) {
    let id = runner.to_string();
    match forget(docker, plan, runner).await {
        Ok(()) => report.forgotten.push(id),
        Err(e) => {
            tracing::warn!(runner_id = %id, error = %e, "waypoint runner forget failed");
            report.not_forgotten.push(format!("{id} ({e})"));
        }
    }
}

/// `waypoint runner forget RUNNER` in the server container on this host (the runners step
/// for runners it removes, the endpoint's `POST /v1/runner-forget` for runner hosts).
pub async fn forget(
    docker: &Docker,
    plan: &WaypointPlan,
    runner: &RunnerId,
) -> Result<(), WaypointError> {
    let id = runner.to_string();
    let out = super::server_cli(docker, plan, &["runner", "forget", &id], MINT_LIMIT).await?;
    if out.exit_code == Some(0) {
        return Ok(());
    }
    // A failed forget prints no token: its output can be shown.
    Err(out.failure(SERVER_NAME, format!("waypoint runner forget {id}")))
}

/// Whether the server VM's CA is stored and is the one `server.ca_sha256` pins (runner-only
/// host). Tokens minted by another server VM (the pin was changed to a new one) are then
/// minted again by the pinned one, with its CA.
fn ca_stored(plan: &WaypointPlan) -> bool {
    let Some(link) = &plan.link else {
        return false;
    };
    std::fs::read_to_string(plan.runner_server_ca().0)
        .ok()
        .and_then(|pem| pilot_values::Fingerprint::of_pem(&pem).ok())
        .is_some_and(|stored| stored == link.ca_sha256)
}

/// Mints the token of runner `runner` with `waypoint runner token -id=RUNNER -expires-in=0`
/// in the server container on this host, authenticated with the bootstrap token (passed in
/// the environment of that one command, never on its command line). The token is scoped to
/// that runner ID (Waypoint 0.11's `GenerateRunnerToken`); it does not expire, because the
/// runner keeps it in its environment for as long as it runs (`runner forget` ends it). The
/// runners step and the endpoint's `POST /v1/runner-token` (for runner-only hosts) both mint
/// through here.
pub async fn mint_local(
    docker: &Docker,
    plan: &WaypointPlan,
    runner: &RunnerId,
) -> Result<String, WaypointError> {
    if plan.server != ServerRef::Local {
        return Err(WaypointError::Conflict(
            "a runner-only host runs no Waypoint server to mint tokens with".into(),
        ));
    }
    let id = format!("-id={runner}");
    let out = super::server_cli(
        docker,
        plan,
        &["runner", "token", &id, "-expires-in=0"],
        MINT_LIMIT,
    )
    .await?;
    let token = mint_outcome(plan, &out)?;
    tracing::info!(runner_id = %runner, "minted a waypoint runner token");
    Ok(token)
}

/// What `waypoint runner token` (run as [`mint_local`] runs it for `plan`) printed and how it ended:
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
            command: "waypoint runner token".into(),
            status: "exit 0".into(),
            output: "no token found in its output".into(),
        });
    }
    // On failure the command printed no token: its output can be shown.
    let output = format!("{} {}", out.stdout.trim(), out.stderr.trim());
    if is_auth_failure(&output) {
        return Err(WaypointError::TokenRejected {
            token_file: bootstrap_path,
            detail: output.trim().to_string(),
            hint: match plan.server {
                ServerRef::Local => {
                    "write a valid Waypoint token there (mode 0600), or see the recovery steps \
                     that `pilot-agent up` gives after removing it"
                }
                ServerRef::Remote => {
                    "a runner-only host mints no tokens itself (the server VM's endpoint does); \
                     remove the file, it is left from an earlier version"
                }
            },
        });
    }
    Err(WaypointError::Command {
        container,
        command: "waypoint runner token".into(),
        status: out
            .exit_code
            .map_or("no exit code".into(), |c| format!("exit {c}")),
        output: output.trim().to_string(),
    })
}

/// Waypoint 0.11.4's answers to a missing or bad token (pkg/server/singleprocess/auth.go):
/// "Authorization token is not supplied", "...: invalid authentication token" (bad
/// signature, unknown key, expired), "failed to base58 decode token" (not a Waypoint token
/// at all), "Failed to decode authentication token" (wrong magic).
fn is_auth_failure(output: &str) -> bool {
    [
        "Authorization token is not supplied",
        "invalid authentication token",
        "failed to base58 decode token",
        "Failed to decode authentication token",
    ]
    .iter()
    .any(|m| output.contains(m))
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
        // Waypoint prints its errors on stdout, `! ` first.
        for said in [
            "! Authorization token is not supplied",
            "! bad token signature: invalid authentication token",
            "! failed to base58 decode token: invalid base58 digit ('0')",
        ] {
            let e = mint_outcome(&plan, &out(Some(1), said, "")).unwrap_err();
            assert!(
                matches!(e, WaypointError::TokenRejected { .. }),
                "{said}: {e}"
            );
        }
        // Words the agent once looked for are not Waypoint's: a plain command error.
        let e = mint_outcome(&plan, &out(Some(1), "", "rpc error: Unauthorized")).unwrap_err();
        assert!(matches!(e, WaypointError::Command { .. }), "{e}");
        let e = mint_outcome(&plan, &out(Some(2), "", "server unavailable")).unwrap_err();
        assert!(e.to_string().contains("server unavailable"), "{e}");
    }

    #[test]
    fn a_stored_server_ca_counts_only_when_it_is_the_pinned_one() {
        use crate::config::{Role, ServerLink};
        let dir = tempfile::tempdir().unwrap();
        let pem = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.self_signed(&key).unwrap().pem()
        };
        let (pinned, other) = (pem("pinned"), pem("other"));
        let plan = WaypointPlan::from_config(&Config {
            state_dir: dir.path().to_path_buf(),
            role: Role::Runner,
            waypoint: Some(WaypointConfig::default()),
            server: Some(ServerLink {
                endpoint: "10.0.0.5".parse().unwrap(),
                token_file: "/t".into(),
                ca_sha256: pilot_values::Fingerprint::of_pem(&pinned).unwrap(),
                waypoint_address: None,
                timeout_secs: 10,
                deregister: Default::default(),
            }),
            ..Config::default()
        })
        .unwrap();
        assert!(!ca_stored(&plan), "nothing stored");
        let ca = plan.runner_server_ca().0;
        std::fs::create_dir_all(ca.parent().unwrap()).unwrap();
        std::fs::write(&ca, &other).unwrap();
        assert!(!ca_stored(&plan), "another server VM's CA");
        std::fs::write(&ca, &pinned).unwrap();
        assert!(ca_stored(&plan));
    }
}
