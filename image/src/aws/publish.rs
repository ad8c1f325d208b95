//! `pilot-image publish --target aws`: the Bottlerocket way to make an AMI. The raw disk that
//! was built (and booted in the tests) on this machine is uploaded as an EBS snapshot through
//! the EBS direct APIs (awslabs' coldsnap: StartSnapshot, PutSnapshotBlock, CompleteSnapshot),
//! registered as an AMI, then copied, shared and deprecated as asked. No builder instance, no
//! install at build time: the AMI is the very disk.
//!
//! Leak rules: every resource carries `pilot:build-id=<id>` from its
//! create call (StartSnapshot `Tags`, RegisterImage and CopyImage `TagSpecifications`; the images
//! are tagged again with CreateTags right after, for EC2 emulators that ignore the create call's
//! tags, and the copies' snapshots once the copy lists them). A failure, Ctrl-C or SIGTERM
//! removes everything of the publish in every region through [`super::reap`], unless
//! `--on-error=abort`, which keeps it and prints the `pilot-image cleanup` command that reaps it.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_ec2::primitives::{DateTime, DateTimeFormat};
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, ImageState,
    ImdsSupportValues, LaunchPermission, LaunchPermissionModifications, OperationType,
    ResourceType, SnapshotAttributeName, VolumeType,
};
use coldsnap::UploadZeroBlocks as ZeroBlocks;
use coldsnap::{SnapshotUploader, SnapshotWaiter, WaitParams};
use tracing::{info, warn};

use super::args::{AwsConnection, AwsPublishArgs, BootMode, OnError};
use super::cancel::{Cancel, Progress};
use super::ec2::{
    Deadline, Ec2, describe_image, image_snapshots, sdk_config, secs, tag_spec, tags,
};
use super::error::{AwsError, Result, api, chain};
use super::id::check_build_id;
use super::reap::{self, Known};

/// The steps, in order; `PILOT_IMAGE_FAIL_AFTER` names one of them. Steps with nothing to do
/// (no copy region, no share, no deprecation) still run, as no-ops, so each can fail.
pub const STEPS: [&str; 8] = [
    "upload-snapshot",
    "wait-snapshot",
    "register-image",
    "wait-image",
    "copy-image",
    "wait-copies",
    "share",
    "deprecate",
];

const GIB: u64 = 1024 * 1024 * 1024;
/// The root device of the image (what Amazon's own HVM images use).
pub const ROOT_DEVICE: &str = "/dev/xvda";

/// Everything checked before the first API call.
#[derive(Debug, Clone)]
pub struct Plan {
    pub build_id: String,
    pub args: AwsPublishArgs,
    pub ami_name: String,
    pub disk_size: u64,
    pub volume_size: u32,
    pub boot_mode: BootMode,
    /// True when the boot mode was read from the disk rather than given.
    pub boot_mode_detected: bool,
    pub deprecate_at: Option<DateTime>,
    fail_after: Option<&'static str>,
}

impl Plan {
    pub fn new(args: AwsPublishArgs, build_id: String) -> Result<Plan> {
        check_build_id(&build_id)?;
        let fail_after = match args.fail_after.as_deref() {
            None => None,
            Some(n) => Some(
                *STEPS
                    .iter()
                    .find(|s| **s == n)
                    .ok_or_else(|| AwsError::Invalid {
                        flag: "PILOT_IMAGE_FAIL_AFTER",
                        reason: format!("unknown step {n:?}; steps: {}", STEPS.join(", ")),
                    })?,
            ),
        };
        let ami_name = format!("{}-{build_id}", args.ami_name_prefix);
        if ami_name.len() > 128
            || !ami_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c))
        {
            return Err(AwsError::Invalid {
                flag: "--ami-name-prefix",
                reason: format!(
                    "{ami_name:?} is not a valid AMI name (3 to 128 of A-Za-z0-9()[] ./-'@_)"
                ),
            });
        }
        let disk = &args.disk;
        let meta = std::fs::metadata(disk).map_err(|source| AwsError::Disk {
            path: disk.clone(),
            source,
        })?;
        if !meta.is_file() || meta.len() == 0 {
            return Err(AwsError::BadDisk {
                path: disk.clone(),
                reason: "not a non-empty regular file".into(),
            });
        }
        let disk_size = meta.len();
        let needed = u32::try_from(disk_size.div_ceil(GIB)).map_err(|_| AwsError::BadDisk {
            path: disk.clone(),
            reason: format!("{disk_size} bytes is too large for an EBS volume"),
        })?;
        let volume_size = match args.volume_size {
            Some(v) if v < needed => {
                return Err(AwsError::Invalid {
                    flag: "--volume-size",
                    reason: format!(
                        "{v} GiB is smaller than the disk ({disk_size} bytes needs {needed})"
                    ),
                });
            }
            Some(v) => v,
            None => needed,
        };
        let (boot_mode, boot_mode_detected) = match args.boot_mode {
            Some(m) => (m, false),
            None => (read_boot_mode(disk)?, true),
        };
        let mut seen = BTreeSet::new();
        for r in &args.copy_to_regions {
            check_region(r)?;
            if !seen.insert(r) || args.connection.region.as_deref() == Some(r.as_str()) {
                return Err(AwsError::Invalid {
                    flag: "--copy-to-region",
                    reason: format!("{r} is given twice (or is the home region)"),
                });
            }
        }
        if args.encrypt_boot && args.copy_to_regions.is_empty() {
            return Err(AwsError::Invalid {
                flag: "--encrypt-boot",
                reason: "encrypts the copies (CopyImage); give --copy-to-region".into(),
            });
        }
        for a in &args.share_accounts {
            if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) {
                return Err(AwsError::Invalid {
                    flag: "--share-account",
                    reason: format!("{a:?} is not a 12-digit AWS account id"),
                });
            }
        }
        for o in &args.share_org_arns {
            if !o.starts_with("arn:aws") || !o.contains(":organization/") {
                return Err(AwsError::Invalid {
                    flag: "--share-org-arn",
                    reason: format!(
                        "{o:?} is not an organization ARN (arn:aws:organizations::ACCOUNT:organization/o-...)"
                    ),
                });
            }
        }
        let deprecate_at = args
            .deprecate_at
            .as_deref()
            .map(parse_future_time)
            .transpose()?;
        if args.upload_workers == Some(0) {
            return Err(AwsError::Invalid {
                flag: "--upload-workers",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Plan {
            build_id,
            args,
            ami_name,
            disk_size,
            volume_size,
            boot_mode,
            boot_mode_detected,
            deprecate_at,
            fail_after,
        })
    }

    /// What `--dry-run` prints.
    pub fn describe(&self) -> String {
        let a = &self.args;
        format!(
            "build id: {}\nregion: {}\nendpoint: {}\ndisk: {} ({} bytes)\nimage: {} {} {} ({}), \
             root {ROOT_DEVICE} gp3 {} GiB, ENA, IMDSv2\ncopies: {}\nshared with: {}\n\
             deprecate at: {}\non error: {}\nsteps: {}\n",
            self.build_id,
            a.connection
                .region
                .as_deref()
                .unwrap_or("(SDK default chain)"),
            a.connection
                .endpoint_url
                .as_deref()
                .unwrap_or("(SDK default chain)"),
            a.disk.display(),
            self.disk_size,
            self.ami_name,
            a.arch,
            self.boot_mode.as_str(),
            if self.boot_mode_detected {
                "read from the disk"
            } else {
                "--boot-mode"
            },
            self.volume_size,
            list(&a.copy_to_regions),
            list(
                &a.share_accounts
                    .iter()
                    .chain(&a.share_org_arns)
                    .cloned()
                    .collect::<Vec<_>>()
            ),
            a.deprecate_at.as_deref().unwrap_or("-"),
            match a.on_error {
                OnError::Cleanup => "remove everything",
                OnError::Abort => "keep it, print the cleanup command",
            },
            STEPS.join(", "),
        )
    }

    /// The command that reaps this publish in every region it touches.
    pub fn cleanup_command(&self, home: &str) -> String {
        let mut cmd = format!(
            "pilot-image cleanup --build-id {} --region {home}",
            self.build_id
        );
        for r in &self.args.copy_to_regions {
            cmd.push_str(&format!(" --also-region {r}"));
        }
        if let Some(url) = &self.args.connection.endpoint_url {
            cmd.push_str(&format!(" --endpoint-url {url}"));
        }
        cmd
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(" ")
    }
}

fn check_region(r: &str) -> Result<()> {
    if r.is_empty()
        || r.len() > 32
        || !r
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(AwsError::Invalid {
            flag: "--copy-to-region",
            reason: format!("{r:?} is not a region name (e.g. eu-west-1)"),
        });
    }
    Ok(())
}

/// An RFC 3339 time in the future (EC2 refuses a deprecation in the past).
pub fn parse_future_time(s: &str) -> Result<DateTime> {
    let t = DateTime::from_str(s, DateTimeFormat::DateTimeWithOffset).map_err(|e| {
        AwsError::Invalid {
            flag: "--deprecate-at",
            reason: format!("{s:?} is not an RFC 3339 time: {e}"),
        }
    })?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if t.secs() <= i64::try_from(now).unwrap_or(i64::MAX) {
        return Err(AwsError::Invalid {
            flag: "--deprecate-at",
            reason: format!("{s} is not in the future"),
        });
    }
    Ok(t)
}

/// The boot mode a disk's partition table implies (shared with the GCP target).
pub use crate::partitions::boot_mode_of;

fn read_boot_mode(path: &Path) -> Result<BootMode> {
    crate::partitions::read_boot_mode(path).map_err(|e| match e {
        crate::partitions::ReadError::Io(source) => AwsError::Disk {
            path: path.to_owned(),
            source,
        },
        crate::partitions::ReadError::Table(reason) => AwsError::BadDisk {
            path: path.to_owned(),
            reason,
        },
    })
}

/// The outcome of a publish: the AMI of each region, home region first.
#[derive(Debug, Clone)]
pub struct Published {
    pub build_id: String,
    pub snapshot_id: String,
    pub images: Vec<(String, String)>,
    pub upload: Duration,
    pub duration: Duration,
}

/// Runs a publish on its own runtime: signals cancel it; a failure cleans up (or, with
/// `--on-error=abort`, keeps everything and names the clean-up command).
pub fn publish_blocking(plan: Plan) -> Result<Published> {
    // Multi-threaded: coldsnap's snapshot waiter sleeps with std::thread::sleep, which must not
    // stall the signal task.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AwsError::Invalid {
            flag: "--target",
            reason: format!("cannot start the async runtime: {e}"),
        })?;
    rt.block_on(run(plan))
}

/// One region's client and what the publish made there.
struct Region {
    name: String,
    ec2: Ec2,
    known: Known,
    image: Option<String>,
}

async fn run(plan: Plan) -> Result<Published> {
    let cancel = Cancel::on_signals().map_err(|e| AwsError::Invalid {
        flag: "--target",
        reason: format!("cannot install signal handlers: {e}"),
    })?;
    let poll = Duration::from_millis(plan.args.poll_interval_ms.max(1));
    let config = sdk_config(&plan.args.connection).await?;
    let home_name = config
        .region()
        .map(|r| r.as_ref().to_owned())
        .ok_or(AwsError::NoRegion)?;
    let ebs = aws_sdk_ebs::Client::new(&config);
    let mut regions = vec![Region {
        name: home_name.clone(),
        ec2: Ec2::from_config(&config, poll),
        known: Known::default(),
        image: None,
    }];
    for r in &plan.args.copy_to_regions {
        let conn: AwsConnection = plan.args.connection.in_region(r);
        regions.push(Region {
            name: r.clone(),
            ec2: Ec2::connect(&conn, poll).await?,
            known: Known::default(),
            image: None,
        });
    }
    info!(
        "publishing {} ({} bytes) as {} in {} (boot mode {}{}, {} GiB)",
        plan.args.disk.display(),
        plan.disk_size,
        plan.ami_name,
        regions
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        plan.boot_mode.as_str(),
        if plan.boot_mode_detected {
            ", from the disk's partition table"
        } else {
            ""
        },
        plan.volume_size,
    );
    let t0 = Instant::now();
    let mut steps = Steps {
        plan: &plan,
        cancel: &cancel,
        ebs,
        regions: &mut regions,
        progress: Progress::new(&STEPS, plan.fail_after),
        upload: Duration::ZERO,
    };
    match steps.run().await {
        Ok(snapshot_id) => {
            let upload = steps.upload;
            let images: Vec<(String, String)> = regions
                .iter()
                .filter_map(|r| r.image.clone().map(|i| (r.name.clone(), i)))
                .collect();
            info!("published {} in {}", plan.ami_name, secs(t0.elapsed()));
            Ok(Published {
                build_id: plan.build_id.clone(),
                snapshot_id,
                images,
                upload,
                duration: t0.elapsed(),
            })
        }
        Err(cause) => {
            warn!("publish {} failed: {cause}", plan.build_id);
            let command = plan.cleanup_command(&home_name);
            if plan.args.on_error == OnError::Abort {
                warn!(
                    "--on-error=abort: kept what publish {} made; reap it with: {command}",
                    plan.build_id
                );
                return Err(cause);
            }
            info!(
                "removing everything of publish {} in {}",
                plan.build_id,
                regions
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let timeout = Duration::from_secs(plan.args.cleanup_timeout);
            let mut failures = Vec::new();
            for r in &regions {
                if let Err(e) = reap::reap(&r.ec2, &plan.build_id, r.known.clone(), timeout).await {
                    failures.push(format!("{}: {e}", r.name));
                }
            }
            if failures.is_empty() {
                Err(cause)
            } else {
                let mut all = vec![format!("publish failed: {cause}")];
                all.extend(failures);
                all.push(format!("run: {command}"));
                Err(AwsError::Cleanup(all))
            }
        }
    }
}

struct Steps<'a> {
    plan: &'a Plan,
    cancel: &'a Cancel,
    ebs: aws_sdk_ebs::Client,
    /// The home region first, then the copy regions in the order given.
    regions: &'a mut Vec<Region>,
    progress: Progress,
    upload: Duration,
}

impl Steps<'_> {
    async fn run(&mut self) -> Result<String> {
        let snapshot_id = self.upload_snapshot().await?;
        self.wait_snapshot(&snapshot_id).await?;
        self.register_image(&snapshot_id).await?;
        self.wait_image().await?;
        self.copy_image().await?;
        self.wait_copies().await?;
        self.share().await?;
        self.deprecate().await?;
        Ok(snapshot_id)
    }

    fn id(&self) -> &str {
        &self.plan.build_id
    }

    fn start(&mut self, step: &'static str) -> Result<()> {
        Ok(self.progress.start(self.cancel, step)?)
    }

    fn done(&self, step: &'static str, detail: &str) -> Result<()> {
        Ok(self.progress.done(step, detail)?)
    }

    fn home(&mut self) -> &mut Region {
        &mut self.regions[0]
    }

    /// `upload-snapshot`: the disk as an EBS snapshot, tagged in StartSnapshot. Blocks of
    /// zeroes are not sent (an unencrypted snapshot reads them back as zeroes).
    async fn upload_snapshot(&mut self) -> Result<String> {
        self.start("upload-snapshot")?;
        let path: PathBuf = self.plan.args.disk.clone();
        let ebs_tags: Vec<aws_sdk_ebs::types::Tag> = tags(self.id(), &self.plan.ami_name)
            .iter()
            .map(|t| {
                aws_sdk_ebs::types::Tag::builder()
                    .set_key(t.key().map(str::to_owned))
                    .set_value(t.value().map(str::to_owned))
                    .build()
            })
            .collect();
        let description = format!("Pilot VM disk (pilot-image publish {})", self.id());
        let uploader = SnapshotUploader::new(self.ebs.clone());
        let upload = uploader.upload_from_file(
            &path,
            Some(i64::from(self.plan.volume_size)),
            Some(&description),
            Some(ebs_tags),
            None,
            Some(ZeroBlocks::Omit),
            None,
            None,
            self.plan.args.upload_workers,
        );
        let t0 = Instant::now();
        // On a signal the upload is dropped: its snapshot, tagged in StartSnapshot, is found by
        // the clean-up through the tag.
        let snapshot_id = tokio::select! {
            r = upload => r.map_err(|e| AwsError::Upload { path: path.clone(), message: chain(&e) })?,
            () = self.cancel.cancelled() => return Err(AwsError::Cancelled),
        };
        self.upload = t0.elapsed();
        self.home().known.snapshots.insert(snapshot_id.clone());
        let allocated = std::fs::metadata(&path).map_or(0, |m| m.blocks() * 512);
        let secs_f = self.upload.as_secs_f64().max(1e-6);
        info!(
            "uploaded {} MiB ({} MiB allocated) in {}: {:.1} MB/s of disk, {:.1} MB/s of data",
            self.plan.disk_size / (1024 * 1024),
            allocated / (1024 * 1024),
            secs(self.upload),
            self.plan.disk_size as f64 / 1e6 / secs_f,
            allocated as f64 / 1e6 / secs_f,
        );
        self.done("upload-snapshot", &snapshot_id)?;
        Ok(snapshot_id)
    }

    /// `wait-snapshot`: coldsnap's waiter until `completed` (three answers in a row), bounded
    /// by `--snapshot-timeout`.
    async fn wait_snapshot(&mut self, snapshot_id: &str) -> Result<()> {
        self.start("wait-snapshot")?;
        let poll = self.regions[0].ec2.poll;
        let timeout = Duration::from_secs(self.plan.args.snapshot_timeout);
        // coldsnap counts attempts in a u8: spread the timeout over at most 250 of them.
        let every = poll.max(timeout / 250);
        let attempts = u8::try_from((timeout.as_millis() / every.as_millis().max(1)).clamp(1, 250))
            .unwrap_or(250);
        let waiter = SnapshotWaiter::new(self.regions[0].ec2.client.clone());
        let id = snapshot_id.to_owned();
        let task = tokio::spawn(async move {
            waiter
                .wait(
                    &id,
                    WaitParams::new(None, None, Some(attempts), Some(every)),
                )
                .await
                .map_err(|e| chain(&e))
        });
        let res = tokio::select! {
            r = task => r.map_err(|e| e.to_string()).and_then(|r| r),
            () = self.cancel.cancelled() => return Err(AwsError::Cancelled),
        };
        res.map_err(|message| AwsError::SnapshotWait {
            snapshot: snapshot_id.to_owned(),
            message,
        })?;
        self.done("wait-snapshot", &format!("{snapshot_id} completed"))
    }

    /// `register-image`: the AMI from the snapshot, with what a current EC2 image has (HVM,
    /// ENA, the disk's boot mode, gp3 root on /dev/xvda deleted with the instance, IMDSv2
    /// required), tagged in the call.
    async fn register_image(&mut self, snapshot_id: &str) -> Result<()> {
        self.start("register-image")?;
        let plan = self.plan;
        let a = &plan.args;
        let root = BlockDeviceMapping::builder()
            .device_name(ROOT_DEVICE)
            .ebs(
                EbsBlockDevice::builder()
                    .snapshot_id(snapshot_id)
                    .volume_size(i32::try_from(plan.volume_size).unwrap_or(i32::MAX))
                    .volume_type(VolumeType::Gp3)
                    .delete_on_termination(true)
                    .build(),
            )
            .build();
        let home = &mut self.regions[0];
        let out = home
            .ec2
            .client
            .register_image()
            .name(&plan.ami_name)
            .description(format!(
                "Pilot VM image (pilot-image publish {})",
                plan.build_id
            ))
            .architecture(ArchitectureValues::from(a.arch.as_str()))
            .virtualization_type("hvm")
            .ena_support(true)
            .boot_mode(BootModeValues::from(plan.boot_mode.as_str()))
            .root_device_name(ROOT_DEVICE)
            .block_device_mappings(root)
            .imds_support(ImdsSupportValues::V20)
            .tag_specifications(tag_spec(
                ResourceType::Image,
                &plan.build_id,
                &plan.ami_name,
            ))
            .send()
            .await
            .map_err(api("RegisterImage"))?;
        let image_id = out
            .image_id()
            .ok_or(AwsError::Incomplete {
                op: "RegisterImage",
                what: "ImageId",
            })?
            .to_owned();
        home.known.images.insert(image_id.clone());
        home.image = Some(image_id.clone());
        retag(&home.ec2, &image_id, &plan.build_id, &plan.ami_name).await?;
        self.done("register-image", &format!("{image_id} {}", plan.ami_name))
    }

    /// `wait-image`: the AMI is `available`.
    async fn wait_image(&mut self) -> Result<()> {
        self.start("wait-image")?;
        let (plan, cancel) = (self.plan, self.cancel);
        let home = &mut self.regions[0];
        let image = home.image.clone().unwrap_or_default();
        wait_available(plan, cancel, &home.ec2, &image, &mut home.known.snapshots).await?;
        self.done("wait-image", &format!("{image} available"))
    }

    /// `copy-image`: CopyImage into each `--copy-to-region`, tagged (image and snapshots).
    async fn copy_image(&mut self) -> Result<()> {
        self.start("copy-image")?;
        let plan = self.plan;
        let home_name = self.regions[0].name.clone();
        let source = self.regions[0].image.clone().unwrap_or_default();
        let mut made = Vec::new();
        for r in self.regions.iter_mut().skip(1) {
            let mut call = r
                .ec2
                .client
                .copy_image()
                .source_image_id(&source)
                .source_region(&home_name)
                .name(&plan.ami_name)
                .description(format!(
                    "Pilot VM image (pilot-image publish {}, copy of {home_name} {source})",
                    plan.build_id
                ))
                .tag_specifications(tag_spec(
                    ResourceType::Image,
                    &plan.build_id,
                    &plan.ami_name,
                ))
                .tag_specifications(tag_spec(
                    ResourceType::Snapshot,
                    &plan.build_id,
                    &format!("{} snapshot", plan.ami_name),
                ));
            if plan.args.encrypt_boot {
                call = call.encrypted(true);
                if let Some(key) = &plan.args.kms_key_id {
                    call = call.kms_key_id(key);
                }
            }
            let out = call.send().await.map_err(api("CopyImage"))?;
            let image_id = out
                .image_id()
                .ok_or(AwsError::Incomplete {
                    op: "CopyImage",
                    what: "ImageId",
                })?
                .to_owned();
            r.known.images.insert(image_id.clone());
            r.image = Some(image_id.clone());
            retag(&r.ec2, &image_id, &plan.build_id, &plan.ami_name).await?;
            made.push(format!("{} {image_id}", r.name));
        }
        self.done("copy-image", &none_if_empty(made))
    }

    /// `wait-copies`: each copy is `available`, its snapshots tagged.
    async fn wait_copies(&mut self) -> Result<()> {
        self.start("wait-copies")?;
        let (plan, cancel) = (self.plan, self.cancel);
        let mut done = Vec::new();
        for r in self.regions.iter_mut().skip(1) {
            let image = r.image.clone().unwrap_or_default();
            wait_available(plan, cancel, &r.ec2, &image, &mut r.known.snapshots).await?;
            done.push(format!("{} {image}", r.name));
        }
        self.done("wait-copies", &none_if_empty(done))
    }

    /// `share`: launch permission for each account and organization on every region's image,
    /// and CreateVolumePermission for the accounts on its snapshots.
    async fn share(&mut self) -> Result<()> {
        self.start("share")?;
        let a = &self.plan.args;
        if a.share_accounts.is_empty() && a.share_org_arns.is_empty() {
            return self.done("share", "nothing to share");
        }
        let mut perms = LaunchPermissionModifications::builder();
        for acct in &a.share_accounts {
            perms = perms.add(LaunchPermission::builder().user_id(acct).build());
        }
        for org in &a.share_org_arns {
            perms = perms.add(LaunchPermission::builder().organization_arn(org).build());
        }
        let perms = perms.build();
        for r in self.regions.iter() {
            let Some(image) = &r.image else { continue };
            r.ec2
                .client
                .modify_image_attribute()
                .image_id(image)
                .launch_permission(perms.clone())
                .send()
                .await
                .map_err(api("ModifyImageAttribute"))?;
            if !a.share_accounts.is_empty() {
                // The OperationType + UserIds form (EC2 takes it and CreateVolumePermission
                // modifications alike; moto only the first).
                for snap in &r.known.snapshots {
                    r.ec2
                        .client
                        .modify_snapshot_attribute()
                        .snapshot_id(snap)
                        .attribute(SnapshotAttributeName::CreateVolumePermission)
                        .operation_type(OperationType::Add)
                        .set_user_ids(Some(a.share_accounts.clone()))
                        .send()
                        .await
                        .map_err(api("ModifySnapshotAttribute"))?;
                }
            }
        }
        let whom: Vec<String> = a
            .share_accounts
            .iter()
            .chain(&a.share_org_arns)
            .cloned()
            .collect();
        self.done("share", &format!("with {}", whom.join(" ")))
    }

    /// `deprecate`: EnableImageDeprecation on every region's image.
    async fn deprecate(&mut self) -> Result<()> {
        self.start("deprecate")?;
        let Some(at) = self.plan.deprecate_at else {
            return self.done("deprecate", "no --deprecate-at");
        };
        for r in self.regions.iter() {
            let Some(image) = &r.image else { continue };
            r.ec2
                .client
                .enable_image_deprecation()
                .image_id(image)
                .deprecate_at(at)
                .send()
                .await
                .map_err(api("EnableImageDeprecation"))?;
        }
        let when = self.plan.args.deprecate_at.clone().unwrap_or_default();
        self.done("deprecate", &format!("at {when}"))
    }
}

fn none_if_empty(v: Vec<String>) -> String {
    if v.is_empty() {
        "no --copy-to-region".to_owned()
    } else {
        v.join(", ")
    }
}

/// Tags an image again (CreateTags), after its create call carried the same tags: EC2
/// emulators (moto) ignore RegisterImage's and CopyImage's TagSpecifications.
async fn retag(ec2: &Ec2, image_id: &str, build_id: &str, name: &str) -> Result<()> {
    ec2.client
        .create_tags()
        .resources(image_id)
        .set_tags(Some(tags(build_id, name)))
        .send()
        .await
        .map_err(api("CreateTags"))?;
    Ok(())
}

/// Waits (bounded by `--image-timeout`) for `available`, tagging the snapshots the image lists
/// that are not tagged yet (a copy's, which CopyImage made in its region).
async fn wait_available(
    plan: &Plan,
    cancel: &Cancel,
    ec2: &Ec2,
    image_id: &str,
    snapshots: &mut BTreeSet<String>,
) -> Result<()> {
    let deadline = Deadline::new(Duration::from_secs(plan.args.image_timeout));
    let what = format!("image {image_id} to be available");
    let mut last = String::from("not described yet");
    loop {
        if let Some(image) = describe_image(ec2, image_id).await? {
            let fresh: Vec<String> = image_snapshots(&image)
                .into_iter()
                .filter(|s| !snapshots.contains(s))
                .collect();
            if !fresh.is_empty() {
                ec2.client
                    .create_tags()
                    .set_resources(Some(fresh.clone()))
                    .set_tags(Some(tags(
                        &plan.build_id,
                        &format!("{} snapshot", plan.ami_name),
                    )))
                    .send()
                    .await
                    .map_err(api("CreateTags"))?;
                snapshots.extend(fresh);
            }
            let state = image.state().cloned();
            last = state.as_ref().map_or("unknown", |s| s.as_str()).to_owned();
            match state {
                Some(ImageState::Available) => return Ok(()),
                Some(ImageState::Pending) | None => {}
                Some(other) => {
                    return Err(AwsError::ImageFailed {
                        image: image_id.to_owned(),
                        state: other.as_str().to_owned(),
                        reason: super::ec2::image_reason(&image),
                    });
                }
            }
        }
        deadline.check(&what, &last)?;
        cancel.sleep(ec2.poll).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deprecation_time_is_rfc3339_and_future() {
        assert!(parse_future_time("2999-01-01T00:00:00Z").is_ok());
        assert!(parse_future_time("2999-01-01T02:00:00+02:00").is_ok());
        assert!(parse_future_time("2000-01-01T00:00:00Z").is_err());
        assert!(parse_future_time("tomorrow").is_err());
    }

    #[test]
    fn regions_are_checked() {
        assert!(check_region("eu-west-1").is_ok());
        assert!(check_region("EU west").is_err());
        assert!(check_region("").is_err());
    }
}
