//! `pilot-image build --target aws` and `pilot-image cleanup`: a packer-style AMI build through
//! the EC2 API (aws-sdk-ec2).
//!
//! The flow ([`build`]): find the newest source image matching the filters, create a key pair
//! and a security group, run a builder instance with the install user-data, wait until the
//! user-data has provisioned it and powered it off, create the image, wait until it is
//! `available`, tag its snapshots, then terminate the builder and delete the key pair and the
//! security group.
//!
//! Every resource carries the tag `pilot:build-id=<id>` from the moment the API returns it:
//! tags are part of the create call (`TagSpecifications`) wherever EC2 allows it. The one
//! exception is the image's snapshots, whose ids are known only after CreateImage; they are
//! tagged as soon as the image lists them, and the clean-up also finds them through the image
//! and through EC2's description `Created by CreateImage(<instance>) ...`.
//!
//! Any failure, or SIGINT/SIGTERM, removes everything of the build in reverse order
//! ([`reap`]): the image and its snapshots, the instance (and its volumes), the security group,
//! the key pair. `pilot-image cleanup --build-id ID` runs the same reaper for a build that was
//! killed before it could clean up.
//!
//! `pilot-image publish --target aws` ([`publish`]) makes an AMI the Bottlerocket way instead:
//! a locally built raw disk uploaded as an EBS snapshot (EBS direct APIs, coldsnap), registered,
//! copied to other regions, shared and deprecated, under the same tag and clean-up rules.
//!
//! Modules, each using only those before it: [`args`] (the flags), `error`, `id` (build ids),
//! `ec2` (the client, tags, waits, the describe and delete calls that the build and the
//! clean-up share), `cancel` (signals), `reap` (the clean-up), `build` (the steps), `publish`
//! (the upload-and-register steps).
//! Everything but the flags needs the crate's `aws` feature (on by default).

pub mod args;
#[cfg(feature = "aws")]
pub mod build;
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

pub use args::{AwsBuildArgs, AwsCleanupArgs, AwsConnection, AwsPublishArgs, BootMode, OnError};
#[cfg(feature = "aws")]
pub use build::{Built, build_blocking};
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

/// What `build --target aws`, `publish` and `cleanup` answer in a binary built without the `aws` feature
/// (only the flags are there, so that the command line is the same).
pub const NO_AWS_SUPPORT: &str = "built without AWS support; rebuild with --features aws";
