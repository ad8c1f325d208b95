//! `pilot-image publish --target gcp`: the raw disk that was built (and booted in the tests)
//! on this machine becomes a Compute Engine image, as Google documents for importing a
//! bootable disk: `disk.raw` in a gzip'd sparse GNU tar, uploaded to Cloud Storage, then
//! `images.insert` with `rawDisk.source` naming the object.
//!
//! Leak rules as for AWS: the object carries the custom metadata `pilot-build-id=<id>` from its
//! initiating upload request (objects have no labels) and lives under `pilot-image/<id>/`; the
//! image carries the label `pilot-build-id=<id>` from images.insert. A failure, Ctrl-C or
//! SIGTERM removes both through [`super::reap`], unless `--on-error=abort`, which keeps them
//! and prints the `pilot-image cleanup --target gcp` command that reaps them.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::api::Api;
use super::args::{COMPUTE_ENDPOINT, GcpConnection, GcpPublishArgs, STORAGE_ENDPOINT};
use super::cancel::{Cancel, Deadline, Progress, secs};
use super::compute::{get_image, insert_image, wait_operation};
use super::error::{GcpError, Result};
use super::id::{BUILD_ID_LABEL, check_build_id, check_label, is_resource_name};
use super::pack::{Package, package};
use super::reap::{self, Known};
use super::storage::{self, CHUNK_UNIT};
use crate::aws::{AwsPublishArgs, BootMode, OnError};
use crate::partitions::{ReadError, read_boot_mode};

/// The steps, in order; `PILOT_IMAGE_FAIL_AFTER` names one of them.
pub const STEPS: [&str; 5] = [
    "package",
    "upload-object",
    "insert-image",
    "wait-image",
    "delete-object",
];

const GIB: u64 = 1024 * 1024 * 1024;

/// A Cloud KMS key's resource name: `projects/P/locations/L/keyRings/R/cryptoKeys/K`, with an
/// optional `/cryptoKeyVersions/V` (the form images.insert takes in `kmsKeyName`).
fn is_kms_key_name(k: &str) -> bool {
    let parts: Vec<&str> = k.split('/').collect();
    let names = [
        "projects",
        "locations",
        "keyRings",
        "cryptoKeys",
        "cryptoKeyVersions",
    ];
    (parts.len() == 8 || parts.len() == 10)
        && parts.chunks(2).zip(names).all(|(pair, name)| {
            pair[0] == name
                && !pair[1].is_empty()
                && pair[1]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
}

/// Everything checked before the first API call.
#[derive(Debug, Clone)]
pub struct Plan {
    pub build_id: String,
    pub disk: PathBuf,
    pub disk_size: u64,
    pub project: String,
    pub bucket: String,
    pub object: String,
    pub image_name: String,
    pub family: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub storage_location: Option<String>,
    /// The Cloud KMS key the image is encrypted with (`imageEncryptionKey.kmsKeyName`).
    pub kms_key_name: Option<String>,
    /// `UEFI_COMPATIBLE` among the guest OS features.
    pub uefi: bool,
    /// True when that was read from the disk's partition table rather than `--boot-mode`.
    pub uefi_detected: bool,
    /// `X86_64` or `ARM64`.
    pub architecture: &'static str,
    pub chunk: u64,
    pub keep_object: bool,
    pub on_error: OnError,
    pub image_timeout: Duration,
    pub cleanup_timeout: Duration,
    pub poll: Duration,
    pub connection: GcpConnection,
    fail_after: Option<&'static str>,
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> GcpError {
    GcpError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// The flags of `publish` that only `--target aws` reads, when given: refused rather than
/// silently ignored.
fn aws_only(a: &AwsPublishArgs) -> Vec<&'static str> {
    let mut v = Vec::new();
    let mut given = |set: bool, flag: &'static str| {
        if set {
            v.push(flag);
        }
    };
    given(a.connection.region.is_some(), "--region");
    given(a.connection.endpoint_url.is_some(), "--endpoint-url");
    given(a.ami_name_prefix != "pilot", "--ami-name-prefix");
    given(a.volume_size.is_some(), "--volume-size");
    given(!a.copy_to_regions.is_empty(), "--copy-to-region");
    given(a.encrypt_boot, "--encrypt-boot");
    given(a.kms_key_id.is_some(), "--kms-key-id");
    given(!a.share_accounts.is_empty(), "--share-account");
    given(!a.share_org_arns.is_empty(), "--share-org-arn");
    // Compute Engine's deprecation times are informational only (the state changes only when
    // a client changes it), unlike EC2's: not offered rather than offered with other meaning.
    given(a.deprecate_at.is_some(), "--deprecate-at");
    given(a.upload_workers.is_some(), "--upload-workers");
    v
}

impl Plan {
    /// `shared` holds the flags both targets read (`--disk`, `--build-id`, `--on-error`,
    /// `--boot-mode`, `--arch`, the timeouts, the fail-after hook).
    pub fn new(shared: &AwsPublishArgs, args: GcpPublishArgs, build_id: String) -> Result<Plan> {
        check_build_id(&build_id)?;
        let foreign = aws_only(shared);
        if !foreign.is_empty() {
            return Err(invalid(
                "--target gcp",
                format!("{} apply to --target aws only", foreign.join(", ")),
            ));
        }
        let fail_after = match shared.fail_after.as_deref() {
            None => None,
            Some(n) => Some(*STEPS.iter().find(|s| **s == n).ok_or_else(|| {
                invalid(
                    "PILOT_IMAGE_FAIL_AFTER",
                    format!("unknown step {n:?}; steps: {}", STEPS.join(", ")),
                )
            })?),
        };
        let conn = args.connection;
        let project = conn
            .project
            .clone()
            .ok_or_else(|| invalid("--project", "required (or env GOOGLE_CLOUD_PROJECT)"))?;
        // Project ids: 6 to 30 of a-z0-9-, starting with a letter (older ones may hold a
        // domain prefix `example.com:`), so only what cannot be one is refused.
        if project.is_empty()
            || !project
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b))
        {
            return Err(invalid(
                "--project",
                format!("{project:?} is not a project id"),
            ));
        }
        let bucket = conn
            .bucket
            .clone()
            .ok_or_else(|| invalid("--bucket", "required: the tarball is uploaded to it"))?;
        if bucket.len() < 3
            || bucket.len() > 222
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        {
            return Err(invalid(
                "--bucket",
                format!("{bucket:?} is not a bucket name (3 to 63 of a-z0-9-_.)"),
            ));
        }
        for (flag, url) in [
            ("--storage-endpoint", &conn.storage_endpoint),
            ("--compute-endpoint", &conn.compute_endpoint),
        ] {
            if !(url.starts_with("https://") || url.starts_with("http://127.0.0.1:")) {
                return Err(invalid(
                    flag,
                    format!(
                        "{url:?}: https only (the token travels with every request); plain \
                         http only to an emulator on http://127.0.0.1:PORT"
                    ),
                ));
            }
        }

        let disk = shared.disk.clone();
        let meta = std::fs::metadata(&disk).map_err(|source| GcpError::Disk {
            path: disk.clone(),
            source,
        })?;
        let disk_size = meta.len();
        if !meta.is_file() || disk_size == 0 || disk_size % GIB != 0 {
            return Err(GcpError::BadDisk {
                path: disk.clone(),
                reason: format!(
                    "{disk_size} bytes: Compute Engine imports only a regular file whose size is \
                     a whole number of GiB (build it with --disk-size-mib a multiple of 1024)"
                ),
            });
        }

        let image_name = match args.image_name {
            Some(n) => n,
            None => default_image_name(&disk, &build_id)?,
        };
        if !is_resource_name(&image_name) {
            return Err(invalid(
                "--image-name",
                format!("{image_name:?} is not [a-z]([-a-z0-9]{{0,61}}[a-z0-9])?"),
            ));
        }
        if let Some(f) = &args.family
            && !is_resource_name(f)
        {
            return Err(invalid(
                "--family",
                format!("{f:?} is not [a-z]([-a-z0-9]{{0,61}}[a-z0-9])?"),
            ));
        }
        let mut labels = BTreeMap::new();
        for kv in &args.labels {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| invalid("--label", format!("{kv:?} is not KEY=VALUE")))?;
            check_label(k, v).map_err(|r| invalid("--label", r))?;
            if k == BUILD_ID_LABEL || labels.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(invalid(
                    "--label",
                    format!("{k} is given twice (or is the build id's own label)"),
                ));
            }
        }
        labels.insert(BUILD_ID_LABEL.to_owned(), build_id.clone());
        if labels.len() > 64 {
            return Err(invalid("--label", "an image holds at most 64 labels"));
        }
        if let Some(l) = &args.storage_location
            && (l.is_empty()
                || !l
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            return Err(invalid(
                "--storage-location",
                format!("{l:?} is not a location (e.g. eu, us-central1)"),
            ));
        }
        if let Some(k) = &args.kms_key_name
            && !is_kms_key_name(k)
        {
            return Err(invalid(
                "--kms-key-name",
                format!(
                    "{k:?} is not projects/P/locations/L/keyRings/R/cryptoKeys/K (optionally \
                     /cryptoKeyVersions/V)"
                ),
            ));
        }
        let chunk = args.upload_chunk_kib.saturating_mul(1024);
        if chunk == 0 || chunk % CHUNK_UNIT != 0 {
            return Err(invalid(
                "--upload-chunk-kib",
                "a positive multiple of 256 (Cloud Storage's rule for resumable chunks)",
            ));
        }
        let (mode, uefi_detected) = match shared.boot_mode {
            Some(m) => (m, false),
            None => (
                read_boot_mode(&disk).map_err(|e| match e {
                    ReadError::Io(source) => GcpError::Disk {
                        path: disk.clone(),
                        source,
                    },
                    ReadError::Table(reason) => GcpError::BadDisk {
                        path: disk.clone(),
                        reason,
                    },
                })?,
                true,
            ),
        };
        let architecture = match shared.arch.as_str() {
            "arm64" => "ARM64",
            _ => "X86_64",
        };
        Ok(Plan {
            object: storage::object_name(&build_id, &image_name),
            build_id,
            disk,
            disk_size,
            project,
            bucket,
            image_name,
            family: args.family,
            labels,
            storage_location: args.storage_location,
            kms_key_name: args.kms_key_name,
            uefi: matches!(mode, BootMode::Uefi | BootMode::UefiPreferred),
            uefi_detected,
            architecture,
            chunk,
            keep_object: args.keep_object,
            on_error: shared.on_error,
            image_timeout: Duration::from_secs(shared.image_timeout),
            cleanup_timeout: Duration::from_secs(shared.cleanup_timeout),
            poll: Duration::from_millis(shared.poll_interval_ms.max(1)),
            connection: conn,
            fail_after,
        })
    }

    /// The guest OS features of the image: UEFI when the disk has an EFI system partition,
    /// multi-queue SCSI and gVNIC (the image's kernel has virtio-scsi and gve).
    pub fn guest_os_features(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.uefi {
            f.push("UEFI_COMPATIBLE");
        }
        f.extend(["VIRTIO_SCSI_MULTIQUEUE", "GVNIC"]);
        f
    }

    /// images.insert's body.
    pub fn image_body(&self, source: &str) -> serde_json::Value {
        let mut body = serde_json::json!({
            "name": self.image_name,
            "description": format!("Pilot VM image (pilot-image publish {})", self.build_id),
            "labels": self.labels,
            "rawDisk": { "source": source, "containerType": "TAR" },
            "guestOsFeatures": self.guest_os_features().iter()
                .map(|t| serde_json::json!({ "type": t })).collect::<Vec<_>>(),
            "architecture": self.architecture,
        });
        if let Some(f) = &self.family {
            body["family"] = serde_json::json!(f);
        }
        if let Some(l) = &self.storage_location {
            body["storageLocations"] = serde_json::json!([l]);
        }
        if let Some(k) = &self.kms_key_name {
            body["imageEncryptionKey"] = serde_json::json!({ "kmsKeyName": k });
        }
        body
    }

    /// What `--dry-run` prints.
    pub fn describe(&self) -> String {
        format!(
            "build id: {}\nproject: {}\ndisk: {} ({} bytes)\nobject: gs://{}/{} (metadata \
             {BUILD_ID_LABEL}={})\nimage: {} family {} labels {} architecture {}\nguest OS \
             features: {} ({})\nstorage location: {}\nencryption: {}\nkeep object: {}\nstorage endpoint: \
             {}\ncompute endpoint: {}\non error: {}\nsteps: {}\n",
            self.build_id,
            self.project,
            self.disk.display(),
            self.disk_size,
            self.bucket,
            self.object,
            self.build_id,
            self.image_name,
            self.family.as_deref().unwrap_or("-"),
            self.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            self.architecture,
            self.guest_os_features().join(" "),
            if self.uefi_detected {
                "UEFI read from the disk's partition table"
            } else {
                "UEFI from --boot-mode"
            },
            self.storage_location.as_deref().unwrap_or("-"),
            self.kms_key_name.as_deref().map_or_else(
                || "Google-managed".to_owned(),
                |k| format!("Cloud KMS key {k}")
            ),
            if self.keep_object {
                "yes"
            } else {
                "no (deleted once the image is READY)"
            },
            self.connection.storage_endpoint,
            self.connection.compute_endpoint,
            match self.on_error {
                OnError::Cleanup => "remove everything",
                OnError::Abort => "keep it, print the cleanup command",
            },
            STEPS.join(", "),
        )
    }

    /// The command that reaps this publish.
    pub fn cleanup_command(&self) -> String {
        let mut cmd = format!(
            "pilot-image cleanup --target gcp --build-id {} --project {} --bucket {}",
            self.build_id, self.project, self.bucket
        );
        let c = &self.connection;
        if c.storage_endpoint != STORAGE_ENDPOINT {
            cmd.push_str(&format!(" --storage-endpoint {}", c.storage_endpoint));
        }
        if c.compute_endpoint != COMPUTE_ENDPOINT {
            cmd.push_str(&format!(" --compute-endpoint {}", c.compute_endpoint));
        }
        cmd
    }
}

/// `NAME-BUILD_ID` from the disk's file name (lowercased, anything else than a-z0-9 turned
/// into `-`, shortened so that the whole fits 63 characters).
fn default_image_name(disk: &std::path::Path, build_id: &str) -> Result<String> {
    let stem = disk
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let mut base: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
        base.insert_str(0, "pilot-");
    }
    let room = 63usize.saturating_sub(build_id.len() + 1);
    base.truncate(room);
    let base = base.trim_end_matches('-');
    let name = format!("{base}-{build_id}");
    if base.is_empty() || !is_resource_name(&name) {
        return Err(invalid(
            "--image-name",
            format!("cannot make an image name from the disk's name and {build_id}: pass one"),
        ));
    }
    Ok(name)
}

/// The outcome of a publish.
#[derive(Debug, Clone)]
pub struct Published {
    pub build_id: String,
    pub project: String,
    pub image: String,
    pub self_link: Option<String>,
    pub tarball_size: u64,
    pub upload: Duration,
    pub duration: Duration,
}

/// Runs a publish on its own runtime: signals cancel it; a failure cleans up (or, with
/// `--on-error=abort`, keeps everything and names the clean-up command).
pub fn publish_blocking(plan: Plan) -> Result<Published> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| invalid("--target", format!("cannot start the async runtime: {e}")))?;
    rt.block_on(run(plan))
}

async fn run(plan: Plan) -> Result<Published> {
    let cancel = Cancel::on_signals()
        .map_err(|e| invalid("--target", format!("cannot install signal handlers: {e}")))?;
    let api = Api::connect(&plan.connection, &plan.project, plan.poll).await?;
    info!(
        "publishing {} ({} bytes) as image {} of project {} through gs://{}/{} (guest OS \
         features {}{})",
        plan.disk.display(),
        plan.disk_size,
        plan.image_name,
        plan.project,
        plan.bucket,
        plan.object,
        plan.guest_os_features().join(" "),
        if plan.uefi_detected {
            ", UEFI from the disk's partition table"
        } else {
            ""
        },
    );
    let t0 = Instant::now();
    let mut steps = Steps {
        plan: &plan,
        cancel: &cancel,
        api: &api,
        progress: Progress::new(&STEPS, plan.fail_after),
        known: Known::default(),
        package: None,
        upload: Duration::ZERO,
        self_link: None,
    };
    let outcome = steps.run().await;
    let tarball_size = steps.package.as_ref().map_or(0, |p| p.sent.size);
    // The tarball on this machine goes in every case (it is not a cloud resource).
    drop(steps.package.take());
    match outcome {
        Ok(()) => {
            info!("published {} in {}", plan.image_name, secs(t0.elapsed()));
            Ok(Published {
                build_id: plan.build_id.clone(),
                project: plan.project.clone(),
                image: plan.image_name.clone(),
                self_link: steps.self_link,
                tarball_size,
                upload: steps.upload,
                duration: t0.elapsed(),
            })
        }
        Err(cause) => {
            warn!("publish {} failed: {cause}", plan.build_id);
            let command = plan.cleanup_command();
            if plan.on_error == OnError::Abort {
                warn!(
                    "--on-error=abort: kept what publish {} made; reap it with: {command}",
                    plan.build_id
                );
                return Err(cause);
            }
            info!("removing everything of publish {}", plan.build_id);
            match reap::reap(
                &api,
                &plan.bucket,
                &plan.build_id,
                steps.known,
                plan.cleanup_timeout,
            )
            .await
            {
                Ok(_) => Err(cause),
                Err(e) => Err(GcpError::Cleanup(vec![
                    format!("publish failed: {cause}"),
                    e.to_string(),
                    format!("run: {command}"),
                ])),
            }
        }
    }
}

struct Steps<'a> {
    plan: &'a Plan,
    cancel: &'a Cancel,
    api: &'a Api,
    progress: Progress,
    known: Known,
    package: Option<Package>,
    upload: Duration,
    self_link: Option<String>,
}

impl Steps<'_> {
    async fn run(&mut self) -> Result<()> {
        self.package().await?;
        self.upload_object().await?;
        self.insert_image().await?;
        self.wait_image().await?;
        self.delete_object().await
    }

    fn start(&mut self, step: &'static str) -> Result<()> {
        Ok(self.progress.start(self.cancel, step)?)
    }

    fn done(&self, step: &'static str, detail: &str) -> Result<()> {
        Ok(self.progress.done(step, detail)?)
    }

    /// `package`: disk.raw in a sparse GNU tar.gz next to the disk.
    async fn package(&mut self) -> Result<()> {
        self.start("package")?;
        let t0 = Instant::now();
        let p = package(&self.plan.disk, self.cancel).await?;
        let allocated = std::fs::metadata(&self.plan.disk).map_or(0, |m| m.blocks() * 512);
        info!(
            "packed the {} MiB disk ({} MiB allocated) into a {:.1} MiB tar.gz in {}",
            self.plan.disk_size >> 20,
            allocated >> 20,
            p.sent.size as f64 / 1048576.0,
            secs(t0.elapsed())
        );
        let detail = format!("{} ({} bytes)", p.path().display(), p.sent.size);
        self.package = Some(p);
        self.done("package", &detail)
    }

    /// `upload-object`: the resumable upload, metadata in the first request, checked after.
    async fn upload_object(&mut self) -> Result<()> {
        self.start("upload-object")?;
        let plan = self.plan;
        let Some(p) = &self.package else {
            return Err(invalid("--disk", "no package"));
        };
        // Known before the upload: an upload whose last answer is lost still made the object.
        self.known.objects.insert(plan.object.clone());
        let t0 = Instant::now();
        storage::upload(
            self.api,
            self.cancel,
            &storage::Destination {
                bucket: &plan.bucket,
                object: &plan.object,
                build_id: &plan.build_id,
            },
            p.path(),
            &p.sent,
            plan.chunk,
        )
        .await?;
        self.upload = t0.elapsed();
        let secs_f = self.upload.as_secs_f64().max(1e-6);
        info!(
            "uploaded {:.1} MiB in {}: {:.1} MB/s of tarball, {:.1} MB/s of disk",
            p.sent.size as f64 / 1048576.0,
            secs(self.upload),
            p.sent.size as f64 / 1e6 / secs_f,
            plan.disk_size as f64 / 1e6 / secs_f,
        );
        let detail = format!(
            "gs://{}/{} ({} bytes, md5 {})",
            plan.bucket, plan.object, p.sent.size, p.sent.md5
        );
        self.done("upload-object", &detail)
    }

    /// `insert-image`: images.insert from the object, labelled in the call.
    async fn insert_image(&mut self) -> Result<()> {
        self.start("insert-image")?;
        let plan = self.plan;
        let source = storage::public_url(&self.api.storage, &plan.bucket, &plan.object)?;
        let op = insert_image(self.api, &plan.image_body(&source)).await?;
        self.known.images.insert(plan.image_name.clone());
        self.known.operations.insert(op.name.clone());
        if let Some(e) = op.failure() {
            return Err(e);
        }
        let detail = format!("{} (operation {} {})", plan.image_name, op.name, op.status);
        self.done("insert-image", &detail)
    }

    /// `wait-image`: the import's operation is DONE without error and the image READY.
    async fn wait_image(&mut self) -> Result<()> {
        self.start("wait-image")?;
        let plan = self.plan;
        let deadline = Deadline::new(plan.image_timeout);
        let ops: Vec<String> = self.known.operations.iter().cloned().collect();
        for name in ops {
            let op = wait_operation(self.api, Some(self.cancel), &name, deadline).await?;
            self.known.operations.remove(&name);
            if let Some(e) = op.failure() {
                return Err(e);
            }
        }
        loop {
            let image = get_image(self.api, &plan.image_name).await?;
            let status = image
                .as_ref()
                .and_then(|i| i.status.clone())
                .unwrap_or_else(|| "absent".into());
            match status.as_str() {
                "READY" => {
                    let image = image.ok_or(GcpError::Answer {
                        op: "compute images.get",
                        what: "no image".into(),
                    })?;
                    self.self_link = image.self_link.clone();
                    let detail = format!(
                        "{} READY ({} GB disk, {} bytes archived)",
                        self.self_link.as_deref().unwrap_or(&plan.image_name),
                        image.disk_size_gb.as_deref().unwrap_or("?"),
                        image.archive_size_bytes.as_deref().unwrap_or("?"),
                    );
                    return self.done("wait-image", &detail);
                }
                "FAILED" | "absent" | "DELETING" => {
                    return Err(GcpError::Answer {
                        op: "compute images.get",
                        what: format!("image {} is {status} after its import", plan.image_name),
                    });
                }
                _ => {}
            }
            deadline.check(format!("image {} to be READY", plan.image_name), status)?;
            self.cancel.sleep(self.api.poll).await?;
        }
    }

    /// `delete-object`: the tarball, unless `--keep-object` (the image holds its own copy).
    async fn delete_object(&mut self) -> Result<()> {
        self.start("delete-object")?;
        let plan = self.plan;
        if plan.keep_object {
            return self.done(
                "delete-object",
                &format!("kept gs://{}/{} (--keep-object)", plan.bucket, plan.object),
            );
        }
        storage::delete(self.api, &plan.bucket, &plan.object).await?;
        self.known.objects.remove(&plan.object);
        self.done(
            "delete-object",
            &format!("deleted gs://{}/{}", plan.bucket, plan.object),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_image_names_fit() {
        let d = std::path::Path::new("/out/Pilot_Image.raw");
        assert_eq!(
            default_image_name(d, "pb-1-ab").unwrap(),
            "pilot-image-pb-1-ab"
        );
        let d = std::path::Path::new("/out/9.raw");
        assert_eq!(default_image_name(d, "x").unwrap(), "pilot-9-x");
        let long = format!("/out/{}.raw", "a".repeat(80));
        let n = default_image_name(std::path::Path::new(&long), "pb-1763790000-0a1b2c3d").unwrap();
        assert!(
            n.len() <= 63 && n.ends_with("-pb-1763790000-0a1b2c3d"),
            "{n}"
        );
        assert!(default_image_name(d, &"a".repeat(63)).is_err());
    }
}
