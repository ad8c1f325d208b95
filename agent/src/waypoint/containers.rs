//! Managed containers converged to their [`ContainerSpec`]: check, then act only if needed.
//!
//! [`ensure`] looks the container up by its fixed name and
//! - creates it when absent; a create that answers 409 (the name is taken: a run killed right
//!   after its create, or a container made by hand) looks again and adopts or replaces what it
//!   finds, so there is never a second container of one name;
//! - replaces it when its `io.pilot.spec-hash` label differs (or it is not the agent's);
//! - starts it when it is stopped (`created`, `exited`), unpauses it when paused;
//! - leaves it alone when it runs with the right hash.
//!
//! Also here: removing containers, listing the agent's by role, running a command in a
//! container ([`exec`]) with its output and exit code, and one-shot containers ([`run_once`]).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use super::spec::ContainerSpec;
use super::{LABEL_MANAGED, LABEL_ROLE, LABEL_SPEC_HASH, Role, WaypointError, is_not_found};

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Running with the right spec: nothing done.
    Unchanged,
    /// Was stopped or paused; started.
    Started,
    /// Did not exist; created and started.
    Created,
    /// Existed with another spec (or not the agent's); removed, created and started.
    Replaced { reason: String },
}

impl Action {
    pub fn changed(&self) -> bool {
        *self != Action::Unchanged
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Unchanged => f.write_str("running, unchanged"),
            Action::Started => f.write_str("started"),
            Action::Created => f.write_str("created"),
            Action::Replaced { reason } => write!(f, "replaced ({reason})"),
        }
    }
}

/// The container as [`ensure`] left it.
#[derive(Debug, Clone)]
pub struct Ensured {
    pub action: Action,
    pub id: String,
    pub inspect: ContainerInspectResponse,
}

/// How many times [`ensure`] goes round (inspect, act) before giving up: a conflict means
/// someone else changed the container in between, which settles within a round or two.
const ROUNDS: usize = 4;

/// Converges the container `spec.name` to `spec` and returns it running.
pub async fn ensure(docker: &Docker, spec: &ContainerSpec) -> Result<Ensured, WaypointError> {
    let hash = spec.hash();
    let mut replaced: Option<String> = None;
    let mut created = false;
    let mut last_conflict = String::new();
    for _ in 0..ROUNDS {
        match inspect(docker, &spec.name).await? {
            None => {
                match create(docker, spec).await {
                    Ok(()) => created = true,
                    // The name is taken after all: look again.
                    Err(e) if super::status_of(&e) == Some(409) => {
                        last_conflict = e.to_string();
                        continue;
                    }
                    Err(e) => {
                        return Err(WaypointError::docker(
                            format!("create container {}", spec.name),
                            e,
                        ));
                    }
                }
            }
            Some(existing) => {
                let labels = existing
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.clone())
                    .unwrap_or_default();
                let status = existing
                    .state
                    .as_ref()
                    .and_then(|s| s.status)
                    .unwrap_or(ContainerStateStatusEnum::EMPTY);
                let ours = labels.get(LABEL_MANAGED).map(String::as_str) == Some("true");
                let same = labels.get(LABEL_SPEC_HASH) == Some(&hash);
                let why_replace = if !ours {
                    Some("it was not made by pilot-agent".to_string())
                } else if !same {
                    Some("its spec changed".to_string())
                } else if matches!(
                    status,
                    ContainerStateStatusEnum::DEAD | ContainerStateStatusEnum::REMOVING
                ) {
                    Some(format!("it is {status}"))
                } else {
                    None
                };
                if let Some(reason) = why_replace {
                    tracing::info!(container = spec.name, reason, "replacing container");
                    remove(docker, &spec.name).await?;
                    replaced.get_or_insert(reason);
                    continue;
                }
                let action = match status {
                    ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING => {
                        None
                    }
                    ContainerStateStatusEnum::PAUSED => {
                        docker.unpause_container(&spec.name).await.map_err(|e| {
                            WaypointError::docker(format!("unpause container {}", spec.name), e)
                        })?;
                        Some(Action::Started)
                    }
                    _ => {
                        start(docker, &spec.name).await?;
                        Some(Action::Started)
                    }
                };
                let action = match (action, &replaced, created) {
                    (_, Some(reason), _) => Action::Replaced {
                        reason: reason.clone(),
                    },
                    (_, None, true) => Action::Created,
                    (Some(a), None, false) => a,
                    (None, None, false) => Action::Unchanged,
                };
                if action.changed() {
                    tracing::info!(container = spec.name, %action, "container converged");
                }
                let inspect = inspect(docker, &spec.name).await?.ok_or_else(|| {
                    WaypointError::Conflict(format!(
                        "container {} disappeared while it was being started",
                        spec.name
                    ))
                })?;
                return Ok(Ensured {
                    action,
                    id: inspect.id.clone().unwrap_or_default(),
                    inspect,
                });
            }
        }
    }
    Err(WaypointError::Conflict(format!(
        "container {} kept changing under the agent (something else creates or removes it); \
         last conflict: {last_conflict}",
        spec.name
    )))
}

/// Inspects a container by name or ID; `None` when there is none.
pub async fn inspect(
    docker: &Docker,
    name: &str,
) -> Result<Option<ContainerInspectResponse>, WaypointError> {
    match docker
        .inspect_container(
            name,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
    {
        Ok(c) => Ok(Some(c)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(WaypointError::docker(
            format!("inspect container {name}"),
            e,
        )),
    }
}

async fn create(docker: &Docker, spec: &ContainerSpec) -> Result<(), bollard::errors::Error> {
    let options = CreateContainerOptionsBuilder::default()
        .name(&spec.name)
        .build();
    docker
        .create_container(Some(options), spec.create_body())
        .await?;
    tracing::info!(
        container = spec.name,
        image = spec.image,
        "created container"
    );
    Ok(())
}

/// Starts a container; one that already runs is fine (dockerd answers 304).
pub async fn start(docker: &Docker, name: &str) -> Result<(), WaypointError> {
    match docker
        .start_container(
            name,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if super::status_of(&e) == Some(304) => Ok(()),
        Err(e) => Err(WaypointError::docker(format!("start container {name}"), e)),
    }
}

/// Removes a container, running or not (its anonymous volumes with it; named volumes, such as
/// the server's data, are never removed). A container already gone is fine.
pub async fn remove(docker: &Docker, name: &str) -> Result<(), WaypointError> {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => {
            tracing::info!(container = name, "removed container");
            Ok(())
        }
        Err(e) if is_not_found(&e) => Ok(()),
        // "removal of container ... is already in progress": it is going away.
        Err(e) if super::status_of(&e) == Some(409) && e.to_string().contains("in progress") => {
            Ok(())
        }
        Err(e) => Err(WaypointError::docker(format!("remove container {name}"), e)),
    }
}

/// The agent's containers of `role`, running or not, as `(name, summary)`.
pub async fn list_role(
    docker: &Docker,
    role: Role,
) -> Result<Vec<(String, ContainerSummary)>, WaypointError> {
    let filters: HashMap<String, Vec<String>> = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_ROLE}={}", role.as_str()),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let list = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| WaypointError::docker(format!("list {} containers", role.as_str()), e))?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let name = c
                .names
                .as_ref()?
                .first()?
                .trim_start_matches('/')
                .to_string();
            Some((name, c))
        })
        .collect())
}

/// What a command run with [`exec`] printed, and how it ended.
#[derive(Clone)]
pub struct ExecOutput {
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    /// The error of a failed `command` in `container`, with what it printed. Only for commands
    /// whose failure prints no secret (`config-set`, `runner forget`).
    pub fn failure(&self, container: &str, command: impl Into<String>) -> WaypointError {
        WaypointError::Command {
            container: container.to_string(),
            command: command.into(),
            status: self
                .exit_code
                .map_or("no exit code".into(), |c| format!("exit {c}")),
            output: format!("{} {}", self.stdout.trim(), self.stderr.trim())
                .trim()
                .to_string(),
        }
    }
}

// Hand-written: stdout may be a token.
impl fmt::Debug for ExecOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecOutput")
            .field("exit_code", &self.exit_code)
            .field("stdout", &format_args!("<{} bytes>", self.stdout.len()))
            .field("stderr", &self.stderr)
            .finish()
    }
}

/// Runs `argv` in the running container `container` with extra environment `env`, waits for
/// it (at most `limit`) and returns its output and exit code.
pub async fn exec(
    docker: &Docker,
    container: &str,
    argv: &[String],
    env: &[String],
    limit: Duration,
) -> Result<ExecOutput, WaypointError> {
    let raw = exec_bytes(docker, container, argv, env, None, limit).await?;
    Ok(ExecOutput {
        exit_code: raw.exit_code,
        stdout: String::from_utf8_lossy(&raw.stdout).into_owned(),
        stderr: raw.stderr,
    })
}

/// What a command run with [`exec_bytes`] printed: stdout as bytes (a Waypoint snapshot is
/// binary), stderr as text.
pub struct ExecBytes {
    pub exit_code: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

// Hand-written: stdout may be a snapshot, which holds the server's signing key.
impl fmt::Debug for ExecBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecBytes")
            .field("exit_code", &self.exit_code)
            .field("stdout", &format_args!("<{} bytes>", self.stdout.len()))
            .field("stderr", &self.stderr)
            .finish()
    }
}

/// [`exec`] with stdout kept as bytes and, when `stdin` is given, those bytes written to the
/// command's standard input, which is then closed (`waypoint server restore -` reads to EOF).
pub async fn exec_bytes(
    docker: &Docker,
    container: &str,
    argv: &[String],
    env: &[String],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<ExecBytes, WaypointError> {
    use tokio::io::AsyncWriteExt;
    let what = format!("run `{}` in {container}", argv.join(" "));
    let run = async {
        let created = docker
            .create_exec(
                container,
                CreateExecOptions {
                    cmd: Some(argv.to_vec()),
                    env: Some(env.to_vec()),
                    attach_stdin: Some(stdin.is_some()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| WaypointError::docker(what.clone(), e))?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        match docker
            .start_exec(&created.id, None)
            .await
            .map_err(|e| WaypointError::docker(what.clone(), e))?
        {
            StartExecResults::Attached {
                mut output,
                mut input,
            } => {
                if let Some(data) = stdin {
                    // Written while nothing reads the output: a command that answers before
                    // it has read everything would block on a full pipe only past the
                    // kernel's buffers, and `server restore` reads all of its input first.
                    let write = async {
                        input.write_all(data).await?;
                        input.flush().await?;
                        input.shutdown().await
                    };
                    write.await.map_err(|e| WaypointError::Command {
                        container: container.to_string(),
                        command: argv.join(" "),
                        status: "stdin not delivered".into(),
                        output: e.to_string(),
                    })?;
                }
                while let Some(chunk) = output.next().await {
                    match chunk.map_err(|e| WaypointError::docker(what.clone(), e))? {
                        LogOutput::StdOut { message } => stdout.extend_from_slice(&message),
                        LogOutput::StdErr { message } => stderr.extend_from_slice(&message),
                        _ => {}
                    }
                }
            }
            StartExecResults::Detached => {}
        }
        let inspected = docker
            .inspect_exec(&created.id)
            .await
            .map_err(|e| WaypointError::docker(what.clone(), e))?;
        Ok(ExecBytes {
            exit_code: inspected.exit_code,
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    };
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| WaypointError::Timeout { what, limit })?
}

/// Waits until container `name` is not running (at most `limit`).
pub async fn wait_exit(docker: &Docker, name: &str, limit: Duration) -> Result<(), WaypointError> {
    let options = WaitContainerOptionsBuilder::default()
        .condition("not-running")
        .build();
    let wait = async {
        let mut stream = docker.wait_container(name, Some(options));
        match stream.next().await {
            // A non-zero exit is an error to bollard; to the callers it is an answer.
            None
            | Some(Ok(_))
            | Some(Err(bollard::errors::Error::DockerContainerWaitError { .. })) => Ok(()),
            Some(Err(e)) => Err(WaypointError::docker(format!("wait for {name}"), e)),
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| WaypointError::Timeout {
            what: name.to_string(),
            limit,
        })?
}

/// Runs the one-shot container `spec` to its end (at most `limit`) and returns its output and
/// exit code. The container is removed in every case, leftovers of a killed run first: its
/// environment and log may hold secrets, and dockerd keeps both until it is gone.
pub async fn run_once(
    docker: &Docker,
    spec: &ContainerSpec,
    limit: Duration,
) -> Result<ExecOutput, WaypointError> {
    let name = spec.name.as_str();
    remove(docker, name).await?;
    let options = CreateContainerOptionsBuilder::default().name(name).build();
    docker
        .create_container(Some(options), spec.create_body())
        .await
        .map_err(|e| WaypointError::docker(format!("create container {name}"), e))?;
    let result = async {
        start(docker, name).await?;
        wait_exit(docker, name, limit).await?;
        let exit_code = inspect(docker, name)
            .await?
            .and_then(|c| c.state)
            .and_then(|s| s.exit_code);
        let (stdout, stderr) = logs(docker, name).await?;
        Ok(ExecOutput {
            exit_code,
            stdout,
            stderr,
        })
    }
    .await;
    remove(docker, name).await?;
    result
}

/// The stdout and stderr a container has logged so far.
pub async fn logs(docker: &Docker, name: &str) -> Result<(String, String), WaypointError> {
    let options = bollard::query_parameters::LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .build();
    let mut stream = docker.logs(name, Some(options));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(chunk) = stream.next().await {
        match chunk.map_err(|e| WaypointError::docker(format!("read the logs of {name}"), e))? {
            LogOutput::StdOut { message } => out.extend_from_slice(&message),
            LogOutput::StdErr { message } => err.extend_from_slice(&message),
            _ => {}
        }
    }
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

/// The container's address on `network`, if it is attached and has one.
pub fn address_on(inspect: &ContainerInspectResponse, network: &str) -> Option<String> {
    inspect
        .network_settings
        .as_ref()?
        .networks
        .as_ref()?
        .get(network)?
        .ip_address
        .clone()
        .filter(|ip| !ip.is_empty())
}

/// The program the container's image runs (its entrypoint), to run more commands of the same
/// program with [`exec`]; `waypoint` from `PATH` when the image sets none.
pub fn entrypoint(inspect: &ContainerInspectResponse) -> Vec<String> {
    inspect
        .config
        .as_ref()
        .and_then(|c| c.entrypoint.clone())
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| vec!["waypoint".to_string()])
}
