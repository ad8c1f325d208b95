//! Removal of everything a publish made, found by its build id (plus what the failing publish
//! itself knows): the image import is awaited first (an image cannot be deleted while it is
//! being created), then every image labelled `pilot-build-id=ID` is deleted and its operation
//! awaited, then every object under `pilot-image/ID/` whose metadata names the build. Every
//! removal is attempted even when another fails; "not found" counts as removed, so running it
//! twice is harmless.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::api::Api;
use super::args::GcpConnection;
use super::cancel::{Deadline, secs};
use super::compute::{delete_image, list_images, wait_operation};
use super::error::{GcpError, Result};
use super::id::{BUILD_ID_LABEL, check_build_id};
use super::storage;

/// What a publish knows it made, besides what the listings find.
#[derive(Debug, Default, Clone)]
pub struct Known {
    pub objects: BTreeSet<String>,
    pub images: BTreeSet<String>,
    /// images.insert operations that may still be running.
    pub operations: BTreeSet<String>,
}

/// `pilot-image cleanup --target gcp --build-id ID` on its own runtime.
pub fn cleanup_blocking(
    build_id: &str,
    conn: &GcpConnection,
    timeout: Duration,
    poll: Duration,
) -> Result<Known> {
    check_build_id(build_id)?;
    let project = conn.project.clone().ok_or(GcpError::Invalid {
        flag: "--project",
        reason: "required with --target gcp (or env GOOGLE_CLOUD_PROJECT)".into(),
    })?;
    let bucket = conn.bucket.clone().ok_or(GcpError::Invalid {
        flag: "--bucket",
        reason: "required with --target gcp: the publish's objects are in it".into(),
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| GcpError::Invalid {
            flag: "--target",
            reason: format!("cannot start the async runtime: {e}"),
        })?;
    rt.block_on(async {
        let api = Api::connect(conn, &project, poll).await?;
        reap(&api, &bucket, build_id, Known::default(), timeout).await
    })
}

/// Finds and removes everything of `build_id`; returns what was found. Each wait is bounded
/// by `timeout`.
pub async fn reap(
    api: &Api,
    bucket: &str,
    build_id: &str,
    known: Known,
    timeout: Duration,
) -> Result<Known> {
    let t0 = Instant::now();
    let mut errors = Vec::new();
    let mut found = known;

    // 1. An import still running: its image can be deleted only once it is done.
    for op in &found.operations {
        if let Err(e) = wait_operation(api, None, op, Deadline::new(timeout)).await {
            errors.push(e.to_string());
        }
    }

    // 2. Images, by label and by name.
    match list_images(api, &format!("labels.{BUILD_ID_LABEL}={build_id}")).await {
        Ok(list) => found.images.extend(list.into_iter().map(|i| i.name)),
        Err(e) => errors.push(e.to_string()),
    }
    // 3. Objects under the build's prefix that say they are the build's.
    match storage::list(api, bucket, &storage::prefix(build_id)).await {
        Ok(list) => {
            for o in list {
                if o.build_id() == Some(build_id) {
                    found.objects.insert(o.name);
                } else {
                    warn!(
                        "cleanup: gs://{bucket}/{} is under the build's prefix but its metadata \
                         {BUILD_ID_LABEL} is {:?}: left alone",
                        o.name,
                        o.build_id()
                    );
                }
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    info!(
        "cleanup: images {}; objects {}",
        list(&found.images),
        list(&found.objects)
    );

    for image in &found.images {
        if let Err(e) = delete_one_image(api, image, timeout).await {
            errors.push(e.to_string());
        }
    }
    for object in &found.objects {
        match storage::delete(api, bucket, object).await {
            Ok(true) => info!("cleanup: deleted gs://{bucket}/{object}"),
            Ok(false) => {}
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
        Err(GcpError::Cleanup(errors))
    }
}

/// images.delete and its operation; `resourceNotReady` (an image still being created) is
/// retried until the deadline.
async fn delete_one_image(api: &Api, image: &str, timeout: Duration) -> Result<()> {
    let deadline = Deadline::new(timeout);
    loop {
        match delete_image(api, image).await {
            Ok(None) => return Ok(()),
            Ok(Some(op)) => {
                let op = wait_operation(api, None, &op.name, deadline).await?;
                if let Some(e) = op.failure() {
                    return Err(e);
                }
                info!("cleanup: deleted image {image}");
                return Ok(());
            }
            Err(e) if e.reason() == Some("resourceNotReady") && !deadline.expired() => {
                tokio::time::sleep(api.poll).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn list(s: &BTreeSet<String>) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.iter().cloned().collect::<Vec<_>>().join(" ")
    }
}
