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

pub mod args;
pub mod build;
pub mod cancel;
pub mod error;
pub mod reap;

use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

pub use args::{AwsBuildArgs, AwsCleanupArgs, AwsConnection};
pub use build::{Built, build_blocking};
pub use error::AwsError;
pub use reap::cleanup_blocking;

use error::Result;

/// The tag that marks every resource of a build.
pub const BUILD_ID_TAG: &str = "pilot:build-id";
/// Longest accepted build id: it becomes part of resource names (AMI names allow 128).
pub const MAX_BUILD_ID: usize = 64;

/// Checks a build id given on the command line: it is embedded in names and tag filters.
pub fn check_build_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > MAX_BUILD_ID
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(AwsError::Invalid {
            flag: "--build-id",
            reason: format!("expected 1 to {MAX_BUILD_ID} letters, digits or '-', got {id:?}"),
        });
    }
    Ok(())
}

/// A fresh build id, `pb-<unix seconds>-<8 hex digits>`: sortable by time, unique enough to
/// never collide with another build of the same account.
pub fn new_build_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut r = [0u8; 4];
    // Without randomness (no getrandom source), the process id still separates two builds
    // started in the same second on one machine.
    if getrandom::fill(&mut r).is_err() {
        r = std::process::id().to_be_bytes();
    }
    format!(
        "pb-{secs}-{}",
        r.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The EC2 client plus the polling interval of waits.
#[derive(Debug, Clone)]
pub struct Ec2 {
    pub client: Client,
    pub poll: Duration,
}

impl Ec2 {
    /// A client for `conn`; credentials from the SDK's default chain.
    pub async fn connect(conn: &AwsConnection, poll: Duration) -> Result<Ec2> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
            // Bounded calls: a hung connection must not hang the build or the clean-up.
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(Duration::from_secs(60))
                .operation_timeout(Duration::from_secs(180))
                .build(),
        );
        if let Some(region) = &conn.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &conn.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(AwsError::NoRegion);
        }
        Ok(Ec2 {
            client: Client::new(&config),
            poll,
        })
    }
}

/// `tag:pilot:build-id = id`, for every Describe call of the clean-up.
pub fn build_filter(build_id: &str) -> Filter {
    filter(&format!("tag:{BUILD_ID_TAG}"), [build_id])
}

pub fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    let mut f = Filter::builder().name(name);
    for v in values {
        f = f.values(v);
    }
    f.build()
}

/// The tags of one resource type: the build id, a Name, and who made it.
pub fn tag_spec(kind: ResourceType, build_id: &str, name: &str) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(kind);
    for t in tags(build_id, name) {
        spec = spec.tags(t);
    }
    spec.build()
}

pub fn tags(build_id: &str, name: &str) -> Vec<Tag> {
    [
        (BUILD_ID_TAG, build_id),
        ("Name", name),
        ("pilot:created-by", "pilot-image"),
    ]
    .into_iter()
    .map(|(k, v)| Tag::builder().key(k).value(v).build())
    .collect()
}

/// A bounded wait: `expired` once `limit` has passed since `start`.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: Instant,
    limit: Duration,
}

impl Deadline {
    pub fn new(limit: Duration) -> Deadline {
        Deadline {
            start: Instant::now(),
            limit,
        }
    }

    /// Errors with [`AwsError::Timeout`] naming `what` and the last state seen.
    pub fn check(&self, what: impl Into<String>, last: impl Into<String>) -> Result<()> {
        if self.start.elapsed() >= self.limit {
            return Err(AwsError::Timeout {
                what: what.into(),
                waited: self.limit,
                last: last.into(),
            });
        }
        Ok(())
    }

    pub fn expired(&self) -> bool {
        self.start.elapsed() >= self.limit
    }
}

/// `1.23 s` for progress lines.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A multi-threaded runtime is not needed: the build is one sequence of API calls.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_are_checked() {
        assert!(check_build_id("pb-1763790000-0a1b2c3d").is_ok());
        assert!(check_build_id(&new_build_id()).is_ok());
        for bad in ["", "a b", "x/y", "tag:*", &"a".repeat(65)] {
            assert!(check_build_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn generated_ids_differ() {
        assert_ne!(new_build_id(), new_build_id());
    }
}
