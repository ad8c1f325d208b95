//! Errors of `pilot-image user-data`: the flag of a refused value, the file that cannot be
//! read or written, the random number generator or standard error failing a generated token.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("{flag}: cannot read {path}: {source}")]
    ReadFlagFile {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--from: cannot read {path}: {source}")]
    ReadFrom {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "--from: {path} is not a valid input file (a JSON object with the flags' keys): {source}"
    )]
    ParseFrom {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{flag}: the operating system's random number generator failed: {reason}")]
    Random { flag: &'static str, reason: String },
    #[error("cannot print the generated endpoint tokens: {source}; no user-data written")]
    PrintTokens {
        #[source]
        source: io::Error,
    },
    #[error(
        "rendered user-data is {size} bytes, over EC2's user-data limit of {limit} bytes (16 KiB); \
         nothing written"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("template {template} has no single placeholder {placeholder} (a bug in the template)")]
    Template {
        template: String,
        placeholder: String,
    },
    #[error("cannot write user-data to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `Err(UserDataError::Invalid)` for `flag`.
pub(super) fn invalid<T>(
    flag: &'static str,
    reason: impl Into<String>,
) -> Result<T, UserDataError> {
    Err(UserDataError::Invalid {
        flag,
        reason: reason.into(),
    })
}
