//! The service backend that restarts dockerd: systemd on a real VM, a command in the test
//! harness (which runs its own dockerd). An enum rather than a trait object: there are two.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::config::ServiceConfig;

use super::DockerError;

/// How dockerd is restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceManager {
    /// `systemctl daemon-reload` (the drop-in may be new) then `systemctl restart UNIT`.
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

impl ServiceManager {
    /// Whether the systemd drop-in applies.
    pub fn is_systemd(&self) -> bool {
        matches!(self, ServiceManager::Systemd { .. })
    }

    /// Restarts dockerd; each command must finish within `limit`.
    pub async fn restart_docker(&self, limit: Duration) -> Result<(), DockerError> {
        match self {
            ServiceManager::Systemd { unit } => {
                run(&["systemctl".into(), "daemon-reload".into()], limit).await?;
                run(&["systemctl".into(), "restart".into(), unit.clone()], limit).await
            }
            ServiceManager::Command { argv } => run(argv, limit).await,
        }
    }
}

async fn run(argv: &[String], limit: Duration) -> Result<(), DockerError> {
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
        .stdout(Stdio::null())
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
        Ok(())
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
}
