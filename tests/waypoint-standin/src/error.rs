//! The stand-in's error type: one enum for the whole crate, since it is a single small program.

use crate::client::ClientError;

/// Everything that can go wrong in the stand-in. Messages are lowercase and carry context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line: unknown command or flag, missing value.
    #[error("{0}")]
    Usage(String),
    /// Missing or contradictory configuration (environment or flags).
    #[error("{0}")]
    Config(String),
    /// A file-system or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Building a TLS configuration failed.
    #[error("{context}: {source}")]
    Tls {
        context: String,
        #[source]
        source: rustls::Error,
    },
    /// Generating the self-signed certificate failed.
    #[error("failed to generate the server certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A JSON document could not be read or written.
    #[error("{context}: {source}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    /// Talking to the server or to Docker failed below HTTP.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server answered, but with an error.
    #[error("server answered {status}: {message}")]
    Server { status: u16, message: String },
    /// Random bytes for a token could not be had.
    #[error("failed to read random bytes for a token: {0}")]
    Random(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to I/O errors, in the `with_context` style.
pub trait IoContext<T> {
    fn io_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
