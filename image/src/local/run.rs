//! Running the build's commands with their output in a log file; a failure quotes the log's
//! last lines.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus};

use super::error::LocalError;

/// Lines of a failed command's output quoted in the error.
const LOG_TAIL_LINES: usize = 25;

pub(crate) fn spawn_error(step: &str, cmd: &Command, e: std::io::Error) -> LocalError {
    LocalError::Io {
        context: format!(
            "step {step}: cannot run {}",
            cmd.get_program().to_string_lossy()
        ),
        source: e,
    }
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn check_status(
    step: &str,
    cmd: &Command,
    status: ExitStatus,
    log: &Path,
) -> Result<(), LocalError> {
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    if let Ok(mut f) = File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    Err(LocalError::Command {
        step: step.to_owned(),
        command: command_line(cmd),
        status: status.to_string(),
        tail,
    })
}

/// Runs `cmd` with its output in `log`; on failure the error quotes the log's last lines.
pub(crate) fn run_logged(step: &str, cmd: &mut Command, log: &Path) -> Result<(), LocalError> {
    let out = File::create(log).map_err(|e| LocalError::Io {
        context: format!("cannot create {}", log.display()),
        source: e,
    })?;
    let err = out.try_clone().map_err(|e| LocalError::Io {
        context: format!("cannot reopen {}", log.display()),
        source: e,
    })?;
    let status = cmd
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| spawn_error(step, cmd, e))?;
    check_status(step, cmd, status, log)
}
