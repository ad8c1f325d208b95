//! The service backend that restarts dockerd: systemd on a real VM, a command in the test
//! harness (which runs its own dockerd). An enum rather than a trait object: there are two.
//! Every command and wait here is bounded: a restart that never completes is an error.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::config::ServiceConfig;

use super::DockerError;

/// How dockerd is restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceManager {
    /// `systemctl daemon-reload` (the drop-ins may be new), then a restart of UNIT (and of
    /// its socket unit, when there is one) queued with `--no-block` and followed until UNIT is
    /// active again under a new invocation.
    Systemd { unit: String },
    /// A command (argv, no shell) that restarts dockerd and returns.
    Command { argv: Vec<String> },
}

impl From<&ServiceConfig> for ServiceManager {
    fn from(c: &ServiceConfig) -> Self {
        match c {
            ServiceConfig::Systemd { unit } => ServiceManager::Systemd { unit: unit.clone() },
            ServiceConfig::Command { restart_command } => ServiceManager::Command {
                argv: restart_command.clone(),
            },
        }
    }
}

/// The socket unit that activates a service unit (`docker.service` -> `docker.socket`).
pub fn socket_unit(unit: &str) -> Option<String> {
    unit.strip_suffix(".service")
        .map(|stem| format!("{stem}.socket"))
}

/// The properties of a unit the restart follows, from `systemctl show`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub result: String,
    pub invocation_id: String,
}

impl UnitState {
    /// Parses `systemctl show -p ...` output (`Key=value` lines; unknown keys ignored).
    pub fn parse(text: &str) -> Self {
        let mut s = UnitState::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let slot = match key {
                "LoadState" => &mut s.load_state,
                "ActiveState" => &mut s.active_state,
                "SubState" => &mut s.sub_state,
                "Result" => &mut s.result,
                "InvocationID" => &mut s.invocation_id,
                _ => continue,
            };
            *slot = value.trim().to_string();
        }
        s
    }

    fn describe(&self) -> String {
        format!(
            "{} ({}), result {}",
            self.active_state, self.sub_state, self.result
        )
    }
}

impl ServiceManager {
    /// Whether the systemd drop-ins apply.
    pub fn is_systemd(&self) -> bool {
        matches!(self, ServiceManager::Systemd { .. })
    }

    /// Restarts dockerd; each command, and under systemd the wait for the unit to be active
    /// again, must finish within `limit`.
    pub async fn restart_docker(&self, limit: Duration) -> Result<(), DockerError> {
        match self {
            ServiceManager::Systemd { unit } => restart_systemd(unit, limit).await,
            ServiceManager::Command { argv } => run(argv, limit).await,
        }
    }

    /// The unit's state in one line, for an error message (systemd only; best effort).
    pub async fn describe(&self) -> Option<String> {
        match self {
            ServiceManager::Systemd { unit } => show(unit, Duration::from_secs(5))
                .await
                .ok()
                .map(|s| format!("{unit} is {}", s.describe())),
            ServiceManager::Command { .. } => None,
        }
    }
}

/// Why not a plain blocking `systemctl restart`: Debian's docker.service has
/// `TimeoutStartSec=0`, so the job waits without bound for dockerd's READY=1, and killing
/// systemctl at our deadline would leave the job queued. The restart is queued with
/// `--no-block` and followed here, bounded: the unit must be `active` under a new invocation
/// ID (Type=notify: dockerd has said it is ready), so the TLS probe that follows cannot be
/// answered by the dockerd being replaced.
///
/// The socket unit is restarted with the service: its listener moves off dockerd's socket
/// path (the drop-in written by the config step), which takes effect only when it restarts.
async fn restart_systemd(unit: &str, limit: Duration) -> Result<(), DockerError> {
    let systemctl = |args: &[&str]| -> Vec<String> {
        std::iter::once("systemctl")
            .chain(args.iter().copied())
            .map(String::from)
            .collect()
    };
    run(&systemctl(&["daemon-reload"]), limit).await?;
    let before = show(unit, limit).await?;
    let mut units = Vec::new();
    if let Some(socket) = socket_unit(unit) {
        if show(&socket, limit).await?.load_state == "loaded" {
            units.push(socket);
        }
    }
    units.push(unit.to_string());
    let mut argv = systemctl(&["restart", "--no-block"]);
    argv.extend(units);
    let command = argv.join(" ");
    run(&argv, limit).await?;

    let start = Instant::now();
    let mut interval = Duration::from_millis(100);
    loop {
        let now = show(
            unit,
            limit
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(1)),
        )
        .await?;
        // No invocation before: the unit was not running, so any active one is the new one.
        let new_invocation =
            before.invocation_id.is_empty() || now.invocation_id != before.invocation_id;
        if now.active_state == "active" && new_invocation {
            return Ok(());
        }
        if start.elapsed() >= limit {
            return Err(DockerError::Restart {
                command,
                detail: format!(
                    "{unit} not active again within {}s: {}",
                    limit.as_secs(),
                    now.describe()
                ),
            });
        }
        tokio::time::sleep(interval.min(limit.saturating_sub(start.elapsed()))).await;
        interval = (interval * 2).min(Duration::from_secs(1));
    }
}

async fn show(unit: &str, limit: Duration) -> Result<UnitState, DockerError> {
    let argv: Vec<String> = [
        "systemctl",
        "show",
        "-p",
        "LoadState",
        "-p",
        "ActiveState",
        "-p",
        "SubState",
        "-p",
        "Result",
        "-p",
        "InvocationID",
        unit,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Ok(UnitState::parse(&run_capture(&argv, limit, true).await?))
}

/// Runs a command to completion within `limit`.
async fn run(argv: &[String], limit: Duration) -> Result<(), DockerError> {
    run_capture(argv, limit, false).await.map(|_| ())
}

/// Runs a command to completion within `limit`; its stdout on success when `capture` (else
/// stdout is /dev/null: a restart command that leaves a daemon behind holding a captured
/// stdout would never be seen to finish).
async fn run_capture(
    argv: &[String],
    limit: Duration,
    capture: bool,
) -> Result<String, DockerError> {
    let command = argv.join(" ");
    let Some((program, args)) = argv.split_first() else {
        return Err(DockerError::Restart {
            command,
            detail: "empty command".into(),
        });
    };
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        // If the deadline passes, the command is killed rather than left behind.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DockerError::Restart {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| DockerError::Restart {
            command: command.clone(),
            detail: format!("did not finish within {}s", limit.as_secs()),
        })?
        .map_err(|e| DockerError::Restart {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(DockerError::Restart {
            command,
            detail: format!("{}: {}", out.status, stderr.trim()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(argv: &[&str]) -> ServiceManager {
        ServiceManager::Command {
            argv: argv.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn command_backend_runs_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("restarted");
        let touch = cmd(&["touch", marker.to_str().unwrap()]);
        touch.restart_docker(Duration::from_secs(5)).await.unwrap();
        assert!(marker.exists());

        let err = cmd(&["sh", "-c", "echo no dockerd here >&2; exit 3"])
            .restart_docker(Duration::from_secs(5))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("no dockerd here"), "{text}");

        let err = cmd(&["sleep", "10"])
            .restart_docker(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");

        let err = cmd(&["/nonexistent/restart"])
            .restart_docker(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/restart"), "{err}");
    }

    #[test]
    fn unit_state_and_socket_unit() {
        let s = UnitState::parse(
            "LoadState=loaded\nActiveState=activating\nSubState=start\nResult=success\n\
             InvocationID=0123abcd\nOther=x\n",
        );
        assert_eq!(s.load_state, "loaded");
        assert_eq!(s.active_state, "activating");
        assert_eq!(s.invocation_id, "0123abcd");
        assert_eq!(s.describe(), "activating (start), result success");
        assert_eq!(UnitState::parse("").active_state, "");
        assert_eq!(
            socket_unit("docker.service").as_deref(),
            Some("docker.socket")
        );
        assert_eq!(socket_unit("docker"), None);
    }
}
