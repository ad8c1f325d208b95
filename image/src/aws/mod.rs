//! `pilot-image publish --target aws` and `pilot-image cleanup`: an AMI made the Bottlerocket
//! way ([`publish`]): the locally built raw disk, the one the tests booted, uploaded as an EBS
//! snapshot (EBS direct APIs, coldsnap), registered, copied to other regions, shared and
//! deprecated. There is no instance-based builder (`build --target aws` was removed: it
//! installed packages at build time into a vendor disk nobody had tested; docs/images.md).
//!
//! Every resource carries the tag `pilot:build-id=<id>` from the moment the API returns it:
//! tags are part of the create call wherever EC2 allows it, and the copies' snapshots are
//! tagged as soon as the copy lists them.
//!
//! Any failure, or SIGINT/SIGTERM, removes everything of the publish in every region
//! ([`reap`]) unless `--on-error=abort`. `pilot-image cleanup --build-id ID` runs the same
//! reaper for a publish that was killed before it could clean up; it also still reaps the
//! instances, key pairs and security groups that the removed builder of older versions made.
//!
//! Modules, each using only those before it: [`args`] (the flags), `error`, `id` (build ids),
//! `ec2` (the client, tags, waits, the describe and delete calls that the publish and the
//! clean-up share), `cancel` (signals), `reap` (the clean-up), `publish` (the
//! upload-and-register steps).
//! Everything but the flags needs the crate's `aws` feature (on by default).

pub mod args;
#[cfg(feature = "aws")]
pub mod cancel;
#[cfg(feature = "aws")]
pub mod ec2;
#[cfg(feature = "aws")]
pub mod error;
#[cfg(feature = "aws")]
pub mod id;
#[cfg(feature = "aws")]
pub mod publish;
#[cfg(feature = "aws")]
pub mod reap;

pub use args::{AwsCleanupArgs, AwsConnection, AwsPublishArgs, BootMode, OnError};
#[cfg(feature = "aws")]
pub use ec2::{Deadline, Ec2, build_filter, filter, secs, tag_spec, tags};
#[cfg(feature = "aws")]
pub use error::AwsError;
#[cfg(feature = "aws")]
pub use id::{BUILD_ID_TAG, MAX_BUILD_ID, check_build_id, new_build_id};
#[cfg(feature = "aws")]
pub use publish::{Published, publish_blocking};
#[cfg(feature = "aws")]
pub use reap::cleanup_blocking;

/// What `publish --target aws` and `cleanup` answer in a binary built without the `aws` feature
/// (only the flags are there, so that the command line is the same).
pub const NO_AWS_SUPPORT: &str = "built without AWS support; rebuild with --features aws";
