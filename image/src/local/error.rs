//! Errors of the local target.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("build definition {origin}: {message}")]
    Definition { origin: String, message: String },
    #[error("build definition: {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("building a local image needs root (chroot, device nodes in the root file system)")]
    NotRoot,
    #[error("{tool} not found on PATH: install the Debian package {package} (scripts/setup.sh)")]
    MissingTool { tool: String, package: String },
    #[error("mirror {url} is unusable: {detail}")]
    Mirror { url: String, detail: String },
    #[error(
        "not enough free space in {dir}: the build needs about {need_mib} MiB there, {have_mib} MiB are free ({detail})"
    )]
    NoSpace {
        dir: PathBuf,
        need_mib: u64,
        have_mib: u64,
        detail: String,
    },
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("step {step}: `{command}` {status}; last lines of its output:\n{tail}")]
    Command {
        step: String,
        command: String,
        status: String,
        tail: String,
    },
    #[error("boot loader: {0}")]
    BootLoader(String),
    #[error(
        "disk_size_mib {disk_mib} is too small: the root file system takes {rootfs_mib} MiB (give at least {need_mib})"
    )]
    DiskTooSmall {
        disk_mib: u64,
        rootfs_mib: u64,
        need_mib: u64,
    },
}
