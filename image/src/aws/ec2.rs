//! The EC2 client and what the publish ([`super::publish`]) and the clean-up ([`super::reap`])
//! share: tags and filters, bounded waits, and the describe and delete calls both make. It
//! uses neither of them, so imports run one way: publish uses reap and ec2, reap uses ec2.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    Filter, Image, Instance, ResourceType, Tag, TagSpecification, VolumeState,
};
use tracing::info;

use super::args::AwsConnection;
use super::error::{AwsError, Result, api};
use super::id::BUILD_ID_TAG;
pub use crate::steps::{Deadline, secs};

/// The EC2 client plus the polling interval of waits.
#[derive(Debug, Clone)]
pub struct Ec2 {
    pub client: Client,
    pub poll: Duration,
}

impl Ec2 {
    /// A client for `conn`; credentials from the SDK's default chain.
    pub async fn connect(conn: &AwsConnection, poll: Duration) -> Result<Ec2> {
        let config = sdk_config(conn).await?;
        Ok(Ec2::from_config(&config, poll))
    }

    /// A client from a loaded configuration (shared with the EBS client of `publish`).
    pub fn from_config(config: &SdkConfig, poll: Duration) -> Ec2 {
        Ec2 {
            client: Client::new(config),
            poll,
        }
    }
}

/// The SDK configuration for `conn`: region, endpoint, bounded calls; errors without a region.
pub async fn sdk_config(conn: &AwsConnection) -> Result<SdkConfig> {
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
    Ok(config)
}

/// A multi-threaded runtime is not needed: the build is one sequence of API calls.
pub(super) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
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

/// One instance, or None while EC2 does not know it yet (its API is eventually consistent:
/// a fresh instance id can answer InvalidInstanceID.NotFound for a moment).
pub async fn describe_instance(ec2: &Ec2, instance_id: &str) -> Result<Option<Instance>> {
    match ec2
        .client
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .map_err(api("DescribeInstances"))
    {
        Ok(out) => Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .cloned()),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// One image, or None if EC2 does not know it (yet, or any more).
pub async fn describe_image(ec2: &Ec2, image_id: &str) -> Result<Option<Image>> {
    match ec2
        .client
        .describe_images()
        .image_ids(image_id)
        .send()
        .await
        .map_err(api("DescribeImages"))
    {
        Ok(out) => Ok(out
            .images()
            .iter()
            .find(|i| i.image_id() == Some(image_id))
            .cloned()),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The snapshot ids in an image's block-device mappings.
pub fn image_snapshots(image: &Image) -> Vec<String> {
    image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
        .map(str::to_owned)
        .collect()
}

/// EC2's StateReason of an image, e.g. `Server.InternalError: ...`.
pub fn image_reason(image: &Image) -> String {
    image.state_reason().map_or_else(
        || "no state reason given".to_owned(),
        |r| {
            format!(
                "{}: {}",
                r.code().unwrap_or("no code"),
                r.message().unwrap_or("no message")
            )
        },
    )
}

/// Deletes a security group (one a builder of an older pilot-image made), retrying while EC2 still sees it in use: a terminated
/// instance's network interface lingers for a while (DependencyViolation).
pub async fn delete_security_group(ec2: &Ec2, sg: &str, deadline: Deadline) -> Result<()> {
    let what = format!("security group {sg}");
    delete_retrying(ec2, &what, "DependencyViolation", deadline, || async {
        let sent = ec2.client.delete_security_group().group_id(sg).send().await;
        sent.map(drop).map_err(api("DeleteSecurityGroup"))
    })
    .await
}

/// Deletes a volume, retrying while it is still being detached (VolumeInUse).
pub async fn delete_volume(ec2: &Ec2, vol: &str, deadline: Deadline) -> Result<()> {
    delete_retrying(ec2, vol, "VolumeInUse", deadline, || async {
        let sent = ec2.client.delete_volume().volume_id(vol).send().await;
        sent.map(drop).map_err(api("DeleteVolume"))
    })
    .await
}

/// Runs `delete` until it succeeds or EC2 no longer knows the resource, retrying while EC2
/// answers `busy` (something it depends on is still going away) and the deadline allows.
async fn delete_retrying<F, Fut>(
    ec2: &Ec2,
    what: &str,
    busy: &str,
    deadline: Deadline,
    delete: F,
) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    loop {
        match delete().await {
            Ok(()) => {
                info!("cleanup: deleted {what}");
                return Ok(());
            }
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) if e.code() == Some(busy) && !deadline.expired() => {
                tokio::time::sleep(ec2.poll).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Deletes the build's volumes that are no longer attached (those attached to a live instance
/// go with it: an old builder's root volume was delete-on-termination).
pub async fn delete_build_volumes(ec2: &Ec2, build_id: &str, deadline: Deadline) -> Result<()> {
    let vols = ec2
        .client
        .describe_volumes()
        .filters(build_filter(build_id))
        .send()
        .await
        .map_err(api("DescribeVolumes"))?;
    for v in vols.volumes() {
        if let (Some(id), Some(VolumeState::Available)) = (v.volume_id(), v.state()) {
            delete_volume(ec2, id, deadline).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{ImageState, StateReason};

    #[test]
    fn image_failure_names_the_state_reason() {
        let img = Image::builder()
            .image_id("ami-1")
            .state(ImageState::Failed)
            .state_reason(
                StateReason::builder()
                    .code("Server.InternalError")
                    .message("snapshot failed")
                    .build(),
            )
            .build();
        let e = AwsError::ImageFailed {
            image: "ami-1".into(),
            state: "failed".into(),
            reason: image_reason(&img),
        };
        assert_eq!(
            e.to_string(),
            "image ami-1 is failed: Server.InternalError: snapshot failed"
        );
        assert_eq!(
            image_reason(&Image::builder().build()),
            "no state reason given"
        );
    }
}
