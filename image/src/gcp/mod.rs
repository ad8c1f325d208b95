//! `pilot-image publish --target gcp` and `pilot-image cleanup --target gcp`: a locally built
//! raw disk becomes a Compute Engine image through the Cloud Storage JSON API and the Compute
//! Engine v1 REST API (reqwest; Google's generated crates cost too much compile time for five
//! calls, docs/images.md has the figures).
//!
//! Modules, each using only those before it: [`args`] (the flags), `error`, `id` (build ids,
//! names, labels), `cancel` (signals, progress, deadlines), `api` (the client, the token, the
//! error answers), `pack` (the sparse tar.gz), `storage`, `compute`, `reap` (the clean-up),
//! `publish` (the steps). Everything but the flags needs the crate's `gcp` feature (on by
//! default).

#[cfg(feature = "gcp")]
pub mod api;
pub mod args;
#[cfg(feature = "gcp")]
pub mod cancel;
#[cfg(feature = "gcp")]
pub mod compute;
#[cfg(feature = "gcp")]
pub mod error;
#[cfg(feature = "gcp")]
pub mod id;
#[cfg(feature = "gcp")]
pub mod pack;
#[cfg(feature = "gcp")]
pub mod publish;
#[cfg(feature = "gcp")]
pub mod reap;
#[cfg(feature = "gcp")]
pub mod storage;

pub use args::{GcpCleanupArgs, GcpConnection, GcpPublishArgs};
#[cfg(feature = "gcp")]
pub use error::GcpError;
#[cfg(feature = "gcp")]
pub use id::{BUILD_ID_LABEL, check_build_id, new_build_id};
#[cfg(feature = "gcp")]
pub use publish::{Plan, Published, publish_blocking};
#[cfg(feature = "gcp")]
pub use reap::cleanup_blocking;

/// What `publish --target gcp` and `cleanup --target gcp` answer in a binary built without
/// the `gcp` feature.
pub const NO_GCP_SUPPORT: &str = "built without GCP support; rebuild with --features gcp";
