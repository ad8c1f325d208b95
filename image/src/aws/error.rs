//! Errors of the AWS target: typed, lowercase, with the API operation and the AWS error code.

use std::time::Duration;

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("no AWS region: pass --region or set AWS_REGION")]
    NoRegion,
    /// `code` is the AWS error code when the service answered (e.g. `InvalidGroup.NotFound`).
    #[error("ec2 {op} failed: {message}")]
    Api {
        op: &'static str,
        code: Option<String>,
        message: String,
    },
    #[error("ec2 {op}: the answer lacks {what}")]
    Incomplete {
        op: &'static str,
        what: &'static str,
    },
    #[error("timed out after {waited:?} waiting for {what} (last seen: {last})")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error("image {image} is {state}: {reason}")]
    ImageFailed {
        image: String,
        state: String,
        reason: String,
    },
    #[error("cannot read the disk {path}: {source}")]
    Disk {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadDisk {
        path: std::path::PathBuf,
        reason: String,
    },
    /// coldsnap's StartSnapshot/PutSnapshotBlock/CompleteSnapshot failed (its error chain).
    #[error("ebs snapshot upload of {path} failed: {message}")]
    Upload {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("snapshot {snapshot} did not complete: {message}")]
    SnapshotWait { snapshot: String, message: String },
    #[error("failure injected after step {step} (PILOT_IMAGE_FAIL_AFTER)")]
    Injected { step: &'static str },
    #[error("cancelled by a signal")]
    Cancelled,
    #[error("clean-up left resources behind: {}", .0.join("; "))]
    Cleanup(Vec<String>),
}

impl From<crate::steps::StepError> for AwsError {
    fn from(e: crate::steps::StepError) -> Self {
        use crate::steps::StepError;
        match e {
            StepError::Cancelled => AwsError::Cancelled,
            StepError::Injected { step } => AwsError::Injected { step },
            StepError::Timeout { what, waited, last } => AwsError::Timeout { what, waited, last },
        }
    }
}

impl AwsError {
    /// The AWS error code, when the service answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            AwsError::Api { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// An `*.NotFound` answer: the resource is already gone, which clean-up wants anyway.
    pub fn is_not_found(&self) -> bool {
        self.code().is_some_and(|c| {
            c.ends_with(".NotFound") || c.ends_with(".Malformed") || c == "InvalidAMIID.Unavailable"
        })
    }
}

/// Wraps an SDK error with the operation's name; the message keeps the whole source chain
/// (connection refused, the HTTP status, the service's message).
pub fn api<E, R>(op: &'static str) -> impl FnOnce(SdkError<E, R>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    move |e| AwsError::Api {
        op,
        code: e.code().map(str::to_owned),
        message: DisplayErrorContext(&e).to_string(),
    }
}

/// An error and its sources, `: `-separated (coldsnap's errors nest the SDK's).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

pub type Result<T, E = AwsError> = std::result::Result<T, E>;
