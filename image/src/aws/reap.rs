//! Removal of everything a build made, found by its `pilot:build-id` tag (plus what the failing
//! build itself knows), in dependency order: images are deregistered before their snapshots
//! are deleted, instances are terminated (and awaited) before their volumes and security group
//! go, and the key pair last. Every removal is attempted even when another fails; "not found"
//! counts as removed, so running it twice is harmless.
//!
//! `publish` makes only snapshots and images (in each copy region too). Instances, key pairs and
//! security groups are still looked for, by tag, because the instance-based builder of older
//! pilot-image versions (`build --target aws`, removed) made them under the same tag: a build
//! id of such a version is reaped whole by today's `cleanup`, at the cost of three Describe
//! calls that find nothing for a publish.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::InstanceStateName;
use tracing::info;

use super::args::AwsCleanupArgs;
use super::ec2::{
    Deadline, Ec2, build_filter, delete_build_volumes, delete_security_group, delete_volume,
    describe_image, describe_instance, filter, image_snapshots, runtime, secs,
};
use super::error::{AwsError, Result, api};
use super::id::check_build_id;

/// Resource ids to remove besides those found by tag.
#[derive(Debug, Default, Clone)]
pub struct Known {
    pub instances: BTreeSet<String>,
    pub images: BTreeSet<String>,
    pub snapshots: BTreeSet<String>,
    pub volumes: BTreeSet<String>,
    /// Key pair names (DeleteKeyPair by name: moto ignores KeyPairId).
    pub key_pairs: BTreeSet<String>,
    pub security_groups: BTreeSet<String>,
}

impl Known {
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
            && self.images.is_empty()
            && self.snapshots.is_empty()
            && self.volumes.is_empty()
            && self.key_pairs.is_empty()
            && self.security_groups.is_empty()
    }
}

/// `pilot-image cleanup --build-id ID` on its own runtime.
pub fn cleanup_blocking(build_id: &str, args: &AwsCleanupArgs) -> Result<Known> {
    check_build_id(build_id)?;
    let rt = runtime().map_err(|e| AwsError::Invalid {
        flag: "--build-id",
        reason: format!("cannot start the async runtime: {e}"),
    })?;
    rt.block_on(async {
        let poll = Duration::from_millis(args.poll_interval_ms.max(1));
        let timeout = Duration::from_secs(args.cleanup_timeout);
        let ec2 = Ec2::connect(&args.connection, poll).await?;
        let mut result = reap(&ec2, build_id, Known::default(), timeout).await;
        // The copy regions of a `publish`: each reaped even when another failed.
        for region in &args.also_regions {
            let conn = args.connection.in_region(region);
            let other = match Ec2::connect(&conn, poll).await {
                Ok(ec2) => reap(&ec2, build_id, Known::default(), timeout).await,
                Err(e) => Err(e),
            };
            result = match (result, other) {
                (Ok(a), Ok(_)) => Ok(a),
                (Err(AwsError::Cleanup(mut a)), Err(b)) => {
                    a.push(format!("{region}: {b}"));
                    Err(AwsError::Cleanup(a))
                }
                (Err(a), Err(b)) => Err(AwsError::Cleanup(vec![
                    a.to_string(),
                    format!("{region}: {b}"),
                ])),
                (Err(a), Ok(_)) => Err(a),
                (Ok(_), Err(b)) => Err(AwsError::Cleanup(vec![format!("{region}: {b}")])),
            };
        }
        result
    })
}

/// Finds and removes every resource of `build_id`; returns what was removed. Each phase's
/// wait is bounded by `timeout`.
pub async fn reap(ec2: &Ec2, build_id: &str, known: Known, timeout: Duration) -> Result<Known> {
    let t0 = Instant::now();
    let mut errors = Vec::new();
    let mut found = match discover(ec2, build_id, known).await {
        Ok(f) => f,
        // Without the inventory nothing can be removed safely.
        Err(e) => return Err(AwsError::Cleanup(vec![e.to_string()])),
    };
    note(&found);

    // 1. Images, after noting their snapshots (a deregistered image no longer names them).
    for image in &found.images {
        match describe_image(ec2, image).await {
            Ok(Some(img)) => found.snapshots.extend(image_snapshots(&img)),
            Ok(None) => {}
            Err(e) => errors.push(e.to_string()),
        }
        match ec2
            .client
            .deregister_image()
            .image_id(image)
            .send()
            .await
            .map_err(api("DeregisterImage"))
        {
            Ok(_) => info!("cleanup: deregistered {image}"),
            Err(e) if e.is_not_found() => {}
            Err(e) => errors.push(e.to_string()),
        }
    }

    // 2. Snapshots: EC2 refuses to delete one while an image still uses it (InUse) for a
    // moment after the deregistration, hence the retry until the deadline.
    for snap in &found.snapshots {
        let deadline = Deadline::new(timeout);
        loop {
            match ec2
                .client
                .delete_snapshot()
                .snapshot_id(snap)
                .send()
                .await
                .map_err(api("DeleteSnapshot"))
            {
                Ok(_) => {
                    info!("cleanup: deleted {snap}");
                    break;
                }
                Err(e) if e.is_not_found() => break,
                Err(e) if e.code() == Some("InvalidSnapshot.InUse") && !deadline.expired() => {
                    tokio::time::sleep(ec2.poll).await;
                }
                Err(e) => {
                    errors.push(e.to_string());
                    break;
                }
            }
        }
    }

    // 3. Instances: terminate, then wait, because their security group and volumes can go
    // only once they are terminated.
    let live: Vec<String> = found.instances.iter().cloned().collect();
    if !live.is_empty() {
        match ec2
            .client
            .terminate_instances()
            .set_instance_ids(Some(live.clone()))
            .send()
            .await
            .map_err(api("TerminateInstances"))
        {
            Ok(_) => info!("cleanup: terminating {}", live.join(" ")),
            Err(e) if e.is_not_found() => {}
            Err(e) => errors.push(e.to_string()),
        }
        let deadline = Deadline::new(timeout);
        for id in &live {
            if let Err(e) = wait_terminated(ec2, id, deadline).await {
                errors.push(e.to_string());
            }
        }
    }

    // 4. Volumes left detached by the instances.
    for vol in &found.volumes {
        if let Err(e) = delete_volume(ec2, vol, Deadline::new(timeout)).await {
            errors.push(e.to_string());
        }
    }
    if let Err(e) = delete_build_volumes(ec2, build_id, Deadline::new(timeout)).await {
        errors.push(e.to_string());
    }

    // 5. Security groups (in reverse order of creation: after the instances, before the key
    // pair).
    for sg in &found.security_groups {
        if let Err(e) = delete_security_group(ec2, sg, Deadline::new(timeout)).await {
            errors.push(e.to_string());
        }
    }

    // 6. Key pairs.
    for kp in &found.key_pairs {
        match ec2
            .client
            .delete_key_pair()
            .key_name(kp)
            .send()
            .await
            .map_err(api("DeleteKeyPair"))
        {
            Ok(_) => info!("cleanup: deleted key pair {kp}"),
            Err(e) if e.is_not_found() => {}
            Err(e) => errors.push(e.to_string()),
        }
    }

    info!(
        "cleanup of build {build_id} {} in {}",
        if errors.is_empty() {
            "complete"
        } else {
            "incomplete"
        },
        secs(t0.elapsed())
    );
    if errors.is_empty() {
        Ok(found)
    } else {
        Err(AwsError::Cleanup(errors))
    }
}

fn note(found: &Known) {
    let list = |s: &BTreeSet<String>| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.iter().cloned().collect::<Vec<_>>().join(" ")
        }
    };
    info!(
        "cleanup: images {}; snapshots {}; instances {}; volumes {}; security groups {}; key pairs {}",
        list(&found.images),
        list(&found.snapshots),
        list(&found.instances),
        list(&found.volumes),
        list(&found.security_groups),
        list(&found.key_pairs),
    );
}

/// Everything tagged with the build id, plus `known`. Instances already terminated are left
/// out, but their ids still find the snapshots of images made from them (EC2 describes such a
/// snapshot as `Created by CreateImage(<instance>) for <image>`), which covers a build killed
/// after CreateImage and before it could tag the snapshots.
async fn discover(ec2: &Ec2, build_id: &str, mut known: Known) -> Result<Known> {
    let c = &ec2.client;
    let by_tag = build_filter(build_id);

    let images = c
        .describe_images()
        .owners("self")
        .filters(by_tag.clone())
        .send()
        .await
        .map_err(api("DescribeImages"))?;
    for img in images.images() {
        if let Some(id) = img.image_id() {
            known.images.insert(id.to_owned());
            known.snapshots.extend(image_snapshots(img));
        }
    }

    let mut all_instances = known.instances.clone();
    let mut pages = c
        .describe_instances()
        .filters(by_tag.clone())
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(api("DescribeInstances"))?;
        for inst in page.reservations().iter().flat_map(|r| r.instances()) {
            let Some(id) = inst.instance_id() else {
                continue;
            };
            all_instances.insert(id.to_owned());
            let gone = matches!(
                inst.state().and_then(|s| s.name()),
                Some(InstanceStateName::Terminated)
            );
            if !gone {
                known.instances.insert(id.to_owned());
            }
        }
    }

    let snaps = c
        .describe_snapshots()
        .owner_ids("self")
        .filters(by_tag.clone())
        .send()
        .await
        .map_err(api("DescribeSnapshots"))?;
    known.snapshots.extend(
        snaps
            .snapshots()
            .iter()
            .filter_map(|s| s.snapshot_id())
            .map(str::to_owned),
    );
    if !all_instances.is_empty() {
        let patterns: Vec<String> = all_instances
            .iter()
            .map(|i| format!("Created by CreateImage({i})*"))
            .collect();
        let snaps = c
            .describe_snapshots()
            .owner_ids("self")
            .filters(filter("description", patterns.iter().map(String::as_str)))
            .send()
            .await
            .map_err(api("DescribeSnapshots"))?;
        known.snapshots.extend(
            snaps
                .snapshots()
                .iter()
                .filter_map(|s| s.snapshot_id())
                .map(str::to_owned),
        );
    }

    let vols = c
        .describe_volumes()
        .filters(by_tag.clone())
        .send()
        .await
        .map_err(api("DescribeVolumes"))?;
    known.volumes.extend(
        vols.volumes()
            .iter()
            .filter_map(|v| v.volume_id())
            .map(str::to_owned),
    );

    let kps = c
        .describe_key_pairs()
        .filters(by_tag.clone())
        .send()
        .await
        .map_err(api("DescribeKeyPairs"))?;
    known.key_pairs.extend(
        kps.key_pairs()
            .iter()
            .filter_map(|k| k.key_name())
            .map(str::to_owned),
    );

    let sgs = c
        .describe_security_groups()
        .filters(by_tag)
        .send()
        .await
        .map_err(api("DescribeSecurityGroups"))?;
    known.security_groups.extend(
        sgs.security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .map(str::to_owned),
    );
    Ok(known)
}

async fn wait_terminated(ec2: &Ec2, id: &str, deadline: Deadline) -> Result<()> {
    loop {
        let state = describe_instance(ec2, id)
            .await?
            .and_then(|i| i.state().and_then(|s| s.name()).cloned());
        match state {
            None | Some(InstanceStateName::Terminated) => return Ok(()),
            Some(s) => deadline.check(format!("instance {id} to terminate"), s.as_str())?,
        }
        tokio::time::sleep(ec2.poll).await;
    }
}
