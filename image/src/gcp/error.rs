//! Errors of the GCP target: typed, lowercase, naming the API call and Google's error reason.
//! No message carries the access token or a resumable-upload session URI (both are
//! credentials): transport errors are formatted without their URL.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum GcpError {
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("cannot read the disk {path}: {source}")]
    Disk {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadDisk { path: PathBuf, reason: String },
    #[error("packaging {path} as disk.raw in a tar.gz failed: {reason}")]
    Package { path: PathBuf, reason: String },
    #[error("no access token: {0}")]
    NoToken(String),
    /// The service answered with an error status; `reason` is the first of Google's
    /// `error.errors[].reason` (e.g. `alreadyExists`, `notFound`, `resourceNotReady`).
    #[error("{op} failed: HTTP {status}{}: {message}", .reason.as_deref().map(|r| format!(" {r}")).unwrap_or_default())]
    Api {
        op: &'static str,
        status: u16,
        reason: Option<String>,
        message: String,
    },
    /// The request did not get an answer (connection refused, reset, timed out).
    #[error("{op} failed: {message}")]
    Transport { op: &'static str, message: String },
    #[error("{op}: unexpected answer: {what}")]
    Answer { op: &'static str, what: String },
    #[error("the uploaded object gs://{bucket}/{object} differs from what was sent: {what}")]
    Verify {
        bucket: String,
        object: String,
        what: String,
    },
    /// A Compute Engine operation ended with `error` (every error of it, in order).
    #[error("operation {operation} ({kind} {target}) failed: {errors}")]
    Operation {
        operation: String,
        kind: String,
        target: String,
        errors: String,
    },
    #[error("timed out after {waited:?} waiting for {what} (last seen: {last})")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error("failure injected after step {step} (PILOT_IMAGE_FAIL_AFTER)")]
    Injected { step: &'static str },
    #[error("cancelled by a signal")]
    Cancelled,
    #[error("clean-up left resources behind: {}", .0.join("; "))]
    Cleanup(Vec<String>),
}

impl From<crate::steps::StepError> for GcpError {
    fn from(e: crate::steps::StepError) -> Self {
        use crate::steps::StepError;
        match e {
            StepError::Cancelled => GcpError::Cancelled,
            StepError::Injected { step } => GcpError::Injected { step },
            StepError::Timeout { what, waited, last } => GcpError::Timeout { what, waited, last },
        }
    }
}

impl GcpError {
    /// HTTP 404: the resource is already gone, which the clean-up wants anyway.
    pub fn is_not_found(&self) -> bool {
        matches!(self, GcpError::Api { status: 404, .. })
    }

    /// Google's error reason, when the service gave one.
    pub fn reason(&self) -> Option<&str> {
        match self {
            GcpError::Api { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }
}

pub type Result<T, E = GcpError> = std::result::Result<T, E>;
