//! `pilot-image publish --target aws` end to end: the real binary against moto (started by the
//! test harness on 127.0.0.1), which serves EC2 and the EBS direct APIs (StartSnapshot,
//! PutSnapshotBlock, CompleteSnapshot, ListSnapshotBlocks, GetSnapshotBlock), checked with
//! aws-sdk-ec2 and coldsnap's downloader.
//!
//! What moto does not check, and so these tests cannot: RegisterImage keeps only the name and
//! the description (not the boot mode, ENA, architecture, root device, block-device mapping or
//! IMDS support; it even makes its own snapshot for the image) and ignores TagSpecifications,
//! as CopyImage does (the publish tags with CreateTags right after, which is what the tests
//! see); CompleteSnapshot does not verify the checksum; EnableImageDeprecation is not
//! implemented (HTTP 500), so `--deprecate-at` is tested as a failing last step whose
//! clean-up removes everything. Moto's StartSnapshot also makes an untagged EC2 volume, which
//! real AWS does not: it is not counted as a leak (leftovers are found by the build-id tag).
//! Also here: `build --target aws` (the instance-based builder, removed) is refused with the
//! way to publish, and `cleanup` still reaps everything such a builder left under a build id.
//! Without moto (scripts/setup.sh makes its venv) these tests fail; they never skip.
#![cfg(feature = "aws")]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::Filter;
use pilot_harness::Moto;
use pilot_image::aws::publish::STEPS;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_pilot-image");
const HOME: &str = "us-east-1";
const COPY: &str = "eu-west-1";
const SHARE: &str = "123456789012";
const MIB: u64 = 1024 * 1024;

/// The binary with dummy credentials and nothing of this machine's AWS set-up.
fn pilot_image(moto: &Moto) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", HOME)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/pilot-image-test")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/pilot-image-test",
        )
        .env("AWS_ENDPOINT_URL", moto.endpoint())
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("PILOT_IMAGE_FAIL_AFTER");
    cmd
}

fn publish_cmd(moto: &Moto, disk: &Path, build_id: &str, extra: &[&str]) -> Command {
    let mut cmd = pilot_image(moto);
    cmd.args(["publish", "--target", "aws", "--disk"])
        .arg(disk)
        .args([
            "--build-id",
            build_id,
            "--endpoint-url",
            &moto.endpoint(),
            "--region",
            HOME,
            "--poll-interval-ms",
            "50",
            // coldsnap's waiter wants three `completed` answers in a row, spaced by the
            // timeout / 250: 120 ms here.
            "--snapshot-timeout",
            "30",
            "--cleanup-timeout",
            "60",
        ])
        .args(extra);
    cmd
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn run(mut cmd: Command) -> Run {
    let out = cmd.output().expect("cannot run pilot-image");
    let r = Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("--- pilot-image {:?}\n{}", r.status, r.stderr);
    r
}

/// A raw disk with a GPT (EFI system partition + Linux partition, by sfdisk), random data at
/// known offsets and sparse zeros elsewhere; `data_mib` MiB of data in all.
fn make_disk(dir: &Path, name: &str, size_mib: u64, data_mib: u64) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size_mib * MIB).unwrap();
    drop(f);
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sfdisk (util-linux) is installed");
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"label: gpt\nsize=4MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
              type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        )
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    // Data: a pseudo-random stream (xorshift), in 256 KiB pieces spread over the Linux
    // partition, and the last 4 KiB of the disk.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut piece = vec![0u8; 256 * 1024];
    let pieces = data_mib * 4;
    let span = (size_mib - 6) * MIB;
    for i in 0..pieces {
        for b in piece.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let off = 5 * MIB + (span / pieces.max(1)) * i;
        f.seek(SeekFrom::Start(off / 4096 * 4096)).unwrap();
        f.write_all(&piece).unwrap();
    }
    f.seek(SeekFrom::Start(size_mib * MIB - 4096)).unwrap();
    f.write_all(&piece[..4096]).unwrap();
    f.sync_all().unwrap();
    path
}

fn sha256_prefix(path: &Path, len: u64) -> (String, bool) {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap());
        f.read_exact(&mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n as u64;
    }
    // The rest (a snapshot is a whole number of GiB) must read as zeroes.
    let mut rest_zero = true;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        rest_zero &= buf[..n].iter().all(|b| *b == 0);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    (hex, rest_zero)
}

fn sdk_config(moto: &Moto, region: &'static str) -> aws_config::SdkConfig {
    let rt = rt();
    rt.block_on(
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region))
            .endpoint_url(moto.endpoint())
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load(),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn ec2(moto: &Moto, region: &'static str) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::new(&sdk_config(moto, region))
}

fn tag_filter(build_id: &str) -> Filter {
    Filter::builder()
        .name("tag:pilot:build-id")
        .values(build_id)
        .build()
}

/// Images and snapshots tagged with the build id in one region (names sorted).
fn tagged(
    moto: &Moto,
    region: &'static str,
    build_id: &str,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let c = ec2(moto, region);
    rt().block_on(async {
        let imgs = c
            .describe_images()
            .owners("self")
            .filters(tag_filter(build_id))
            .send()
            .await
            .unwrap();
        let snaps = c
            .describe_snapshots()
            .owner_ids("self")
            .filters(tag_filter(build_id))
            .send()
            .await
            .unwrap();
        (
            imgs.images()
                .iter()
                .map(|i| i.image_id().unwrap().to_owned())
                .collect(),
            snaps
                .snapshots()
                .iter()
                .map(|s| s.snapshot_id().unwrap().to_owned())
                .collect(),
        )
    })
}

fn assert_nothing_left(moto: &Moto, build_id: &str, context: &str) {
    for region in [HOME, COPY] {
        let (images, snaps) = tagged(moto, region, build_id);
        assert!(
            images.is_empty() && snaps.is_empty(),
            "{context}: {build_id} left in {region}: images {images:?}, snapshots {snaps:?}"
        );
    }
}

/// The `uploaded ... MB/s` line of a run.
fn throughput(stderr: &str) -> String {
    stderr
        .lines()
        .find(|l| l.contains("pilot-image: uploaded "))
        .unwrap_or("no upload line")
        .to_owned()
}

#[test]
fn publish_uploads_registers_copies_and_shares() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "disk.raw", 64, 1);
    let build_id = "publish-happy";
    let t0 = Instant::now();
    let r = run(publish_cmd(
        &moto,
        &disk,
        build_id,
        &["--copy-to-region", COPY, "--share-account", SHARE],
    ));
    let took = t0.elapsed();
    assert!(r.status.success(), "publish failed: {}", r.stderr);
    for step in STEPS {
        assert!(
            r.stderr.contains(&format!("] {step} done in ")),
            "no progress line for {step}"
        );
    }
    // The GPT has an EFI system partition and no BIOS boot partition: UEFI.
    assert!(
        r.stderr
            .contains("boot mode uefi, from the disk's partition table"),
        "{}",
        r.stderr
    );
    // stdout: `REGION AMI`, the home region first.
    let lines: Vec<(&str, &str)> = r
        .stdout
        .lines()
        .map(|l| l.split_once(' ').expect("REGION AMI"))
        .collect();
    assert_eq!(lines.len(), 2, "{:?}", r.stdout);
    assert_eq!(lines[0].0, HOME);
    assert_eq!(lines[1].0, COPY);
    let (home_ami, copy_ami) = (lines[0].1.to_owned(), lines[1].1.to_owned());
    assert!(home_ami.starts_with("ami-") && copy_ami.starts_with("ami-"));
    let snapshot = r
        .stderr
        .lines()
        .find_map(|l| l.split("upload-snapshot done in ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .expect("the upload names its snapshot")
        .trim()
        .to_owned();
    eprintln!(
        "figure: publish against moto took {took:?}; {}",
        throughput(&r.stderr)
    );

    // What moto records of RegisterImage and CopyImage: name, description, state, tags.
    for (region, ami) in [(HOME, &home_ami), (COPY, &copy_ami)] {
        let c = ec2(&moto, region);
        let (img, perms) = rt().block_on(async {
            let img = c
                .describe_images()
                .image_ids(ami)
                .send()
                .await
                .unwrap()
                .images()
                .first()
                .cloned()
                .expect("the image exists");
            let perms = c
                .describe_image_attribute()
                .image_id(ami)
                .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
                .send()
                .await
                .unwrap();
            (img, perms)
        });
        assert_eq!(img.name(), Some(format!("pilot-{build_id}").as_str()));
        assert_eq!(img.state().map(|s| s.as_str()), Some("available"));
        assert!(
            img.description().unwrap_or_default().contains(build_id),
            "{img:?}"
        );
        let tags: Vec<(String, String)> = img
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
            .collect();
        assert!(
            tags.contains(&("pilot:build-id".into(), build_id.into())),
            "{region}: {tags:?}"
        );
        let users: Vec<&str> = perms
            .launch_permissions()
            .iter()
            .filter_map(|p| p.user_id())
            .collect();
        assert_eq!(users, [SHARE], "{region} launch permissions");
    }
    // Both regions hold the build's images and tagged snapshots; the copy is in its region.
    let (home_imgs, home_snaps) = tagged(&moto, HOME, build_id);
    let (copy_imgs, copy_snaps) = tagged(&moto, COPY, build_id);
    assert_eq!(home_imgs, BTreeSet::from([home_ami.clone()]));
    assert_eq!(copy_imgs, BTreeSet::from([copy_ami.clone()]));
    assert!(home_snaps.contains(&snapshot), "{home_snaps:?}");
    assert!(!copy_snaps.is_empty());

    // The uploaded snapshot: shared for CreateVolume, and its blocks are the disk's.
    let c = ec2(&moto, HOME);
    let vol_perms = rt().block_on(async {
        c.describe_snapshot_attribute()
            .snapshot_id(&snapshot)
            .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
            .send()
            .await
            .unwrap()
    });
    let users: Vec<&str> = vol_perms
        .create_volume_permissions()
        .iter()
        .filter_map(|p| p.user_id())
        .collect();
    assert_eq!(users, [SHARE]);
    let back = dir.path().join("back.raw");
    let ebs = aws_sdk_ebs::Client::new(&sdk_config(&moto, HOME));
    let t0 = Instant::now();
    rt().block_on(async {
        coldsnap::SnapshotDownloader::new(ebs)
            .download_to_file(&snapshot, &back, None, None, None)
            .await
            .unwrap()
    });
    eprintln!("figure: download of {snapshot} took {:?}", t0.elapsed());
    let disk_len = std::fs::metadata(&disk).unwrap().len();
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 1024 * MIB);
    let (want, _) = sha256_prefix(&disk, disk_len);
    let (got, rest_zero) = sha256_prefix(&back, disk_len);
    assert_eq!(
        got, want,
        "the snapshot's first {disk_len} bytes differ from the disk"
    );
    assert!(rest_zero, "the snapshot past the disk is not zeroes");
    eprintln!("figure: sha256 of disk and snapshot {want}");

    // `cleanup` with the copy region reaps both regions.
    let r = run({
        let mut c = pilot_image(&moto);
        c.args([
            "cleanup",
            "--build-id",
            build_id,
            "--region",
            HOME,
            "--also-region",
            COPY,
            "--poll-interval-ms",
            "50",
        ]);
        c
    });
    assert!(r.status.success(), "{}", r.stderr);
    assert_nothing_left(&moto, build_id, "cleanup of a finished publish");
    moto.cleanup().unwrap();
}

#[test]
fn a_failure_after_any_step_leaves_nothing_in_any_region() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "small.raw", 8, 1);
    for step in STEPS {
        let build_id = format!("pfail-{step}");
        let mut cmd = publish_cmd(
            &moto,
            &disk,
            &build_id,
            &["--copy-to-region", COPY, "--share-account", SHARE],
        );
        cmd.env("PILOT_IMAGE_FAIL_AFTER", step);
        let r = run(cmd);
        assert_eq!(r.status.code(), Some(1), "after {step}: {}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("failure injected after step {step}")),
            "after {step}: {}",
            r.stderr
        );
        assert!(
            r.stdout.is_empty(),
            "a failed publish printed {:?}",
            r.stdout
        );
        assert_nothing_left(&moto, &build_id, &format!("failure after {step}"));
    }
    moto.cleanup().unwrap();
}

/// EnableImageDeprecation is a real failure against moto (not implemented, HTTP 500): the last
/// step fails after images exist in both regions, and the clean-up removes them.
#[test]
fn deprecate_at_reaches_enable_image_deprecation_and_a_real_failure_cleans_up() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "small.raw", 8, 1);
    let build_id = "pdeprecate";
    let r = run(publish_cmd(
        &moto,
        &disk,
        build_id,
        &[
            "--copy-to-region",
            COPY,
            "--deprecate-at",
            "2999-01-01T00:00:00Z",
        ],
    ));
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("] share done in "), "{}", r.stderr);
    assert!(
        r.stderr.contains("ec2 EnableImageDeprecation failed"),
        "{}",
        r.stderr
    );
    assert_nothing_left(&moto, build_id, "failed EnableImageDeprecation");
    // A past time is refused before any call.
    let r = run(publish_cmd(
        &moto,
        &disk,
        "ppast",
        &["--deprecate-at", "2001-01-01T00:00:00Z"],
    ));
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("is not in the future"), "{}", r.stderr);
    moto.cleanup().unwrap();
}

#[test]
fn on_error_abort_keeps_everything_and_names_the_cleanup_command() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "small.raw", 8, 1);
    let build_id = "pabort";
    let mut cmd = publish_cmd(
        &moto,
        &disk,
        build_id,
        &["--copy-to-region", COPY, "--on-error", "abort"],
    );
    cmd.env("PILOT_IMAGE_FAIL_AFTER", "wait-copies");
    let r = run(cmd);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    for region in [HOME, COPY] {
        let (images, snaps) = tagged(&moto, region, build_id);
        assert_eq!(images.len(), 1, "{region}: {images:?}");
        assert!(!snaps.is_empty(), "{region}");
    }
    let command = r
        .stderr
        .lines()
        .find_map(|l| l.split("reap it with: ").nth(1))
        .expect("the cleanup command is printed")
        .to_owned();
    assert_eq!(
        command,
        format!(
            "pilot-image cleanup --build-id {build_id} --region {HOME} --also-region {COPY} \
             --endpoint-url {}",
            moto.endpoint()
        )
    );
    let words: Vec<&str> = command.split_whitespace().collect();
    let mut c = pilot_image(&moto);
    c.args(&words[1..]).args(["--poll-interval-ms", "50"]);
    let r = run(c);
    assert!(r.status.success(), "{}", r.stderr);
    assert_nothing_left(&moto, build_id, "the printed cleanup command");
    moto.cleanup().unwrap();
}

#[test]
fn sigint_during_the_upload_leaves_nothing() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Large enough that the upload (512-byte blocks at moto) takes seconds.
    let disk = make_disk(dir.path(), "big.raw", 128, 4);
    let build_id = "psigint-upload";
    let mut child = publish_cmd(&moto, &disk, build_id, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        eprintln!("pilot-image| {line}");
        let hit = line.contains("] upload-snapshot ...");
        seen.push(line);
        if hit {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("upload-snapshot ...")),
        "{seen:?}"
    );
    // Let StartSnapshot happen and some blocks go.
    std::thread::sleep(Duration::from_millis(1500));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    for line in lines {
        eprintln!("pilot-image| {line}");
        seen.push(line);
    }
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(
        !text.contains("upload-snapshot done"),
        "the upload finished before the signal: {text}"
    );
    assert_nothing_left(&moto, build_id, "SIGINT during the upload");
    moto.cleanup().unwrap();
}

/// `build --target aws` (the instance-based builder) was removed: refused like a bad flag,
/// before any API call, with the way to an AMI now; also when an old command line carries the
/// builder's flags, which clap alone would refuse as unknown.
#[test]
fn build_target_aws_is_removed_and_points_to_publish() {
    for extra in [
        &[][..],
        &[
            "--agent-deb-url",
            "https://example.com/a.deb",
            "--source-owner",
            "self",
        ][..],
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(["build", "--target", "aws"]).args(extra);
        let r = run(cmd);
        assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
        assert!(r.stdout.is_empty(), "{:?}", r.stdout);
        assert!(
            r.stderr.contains("build --target aws was removed")
                && r.stderr.contains("pilot-image build --target local")
                && r.stderr
                    .contains("pilot-image publish --target aws --disk OUT/NAME.raw"),
            "{}",
            r.stderr
        );
    }
}

/// What is left of a build id in the home region, by tag: instances not terminated, images,
/// snapshots, volumes, key pairs, security groups.
fn all_tagged(moto: &Moto, build_id: &str) -> Vec<(&'static str, BTreeSet<String>)> {
    let c = ec2(moto, HOME);
    let (images, snapshots) = tagged(moto, HOME, build_id);
    rt().block_on(async {
        let f = tag_filter(build_id);
        let inst = c
            .describe_instances()
            .filters(f.clone())
            .send()
            .await
            .unwrap();
        let instances = inst
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| {
                i.state().and_then(|s| s.name())
                    != Some(&aws_sdk_ec2::types::InstanceStateName::Terminated)
            })
            .map(|i| i.instance_id().unwrap().to_owned())
            .collect();
        let vols = c
            .describe_volumes()
            .filters(f.clone())
            .send()
            .await
            .unwrap();
        let kps = c
            .describe_key_pairs()
            .filters(f.clone())
            .send()
            .await
            .unwrap();
        let sgs = c
            .describe_security_groups()
            .filters(f)
            .send()
            .await
            .unwrap();
        vec![
            ("instances", instances),
            ("images", images),
            ("snapshots", snapshots),
            (
                "volumes",
                vols.volumes()
                    .iter()
                    .map(|v| v.volume_id().unwrap().to_owned())
                    .collect(),
            ),
            (
                "key pairs",
                kps.key_pairs()
                    .iter()
                    .map(|k| k.key_name().unwrap().to_owned())
                    .collect(),
            ),
            (
                "security groups",
                sgs.security_groups()
                    .iter()
                    .map(|g| g.group_id().unwrap().to_owned())
                    .collect(),
            ),
        ]
    })
}

/// `cleanup --build-id` stays broad: what the removed builder of older versions left under a
/// build id (a running instance with its security group and key pair, a detached volume, an
/// image made from the instance and its snapshot) is reaped whole, and a second run is a no-op.
/// The resources are made here with the SDK, tagged as the builder tagged them.
#[test]
fn cleanup_reaps_what_an_old_instance_builder_left() {
    use aws_sdk_ec2::types::{InstanceType, KeyType, ResourceType, Tag, TagSpecification};
    let moto = Moto::start().unwrap();
    let build_id = "old-builder";
    let c = ec2(&moto, HOME);
    let spec = |kind: ResourceType| {
        TagSpecification::builder()
            .resource_type(kind)
            .tags(Tag::builder().key("pilot:build-id").value(build_id).build())
            .build()
    };
    rt().block_on(async {
        // Any image moto ships will do as the builder's source.
        let source = c.describe_images().send().await.unwrap().images()[0]
            .image_id()
            .unwrap()
            .to_owned();
        let name = format!("pilot-image-{build_id}");
        c.create_key_pair()
            .key_name(&name)
            .key_type(KeyType::Ed25519)
            .tag_specifications(spec(ResourceType::KeyPair))
            .send()
            .await
            .unwrap();
        let sg = c
            .create_security_group()
            .group_name(&name)
            .description("old builder")
            .tag_specifications(spec(ResourceType::SecurityGroup))
            .send()
            .await
            .unwrap()
            .group_id()
            .unwrap()
            .to_owned();
        let run = c
            .run_instances()
            .image_id(&source)
            .instance_type(InstanceType::T3Small)
            .min_count(1)
            .max_count(1)
            .key_name(&name)
            .security_group_ids(&sg)
            .tag_specifications(spec(ResourceType::Instance))
            .tag_specifications(spec(ResourceType::Volume))
            .send()
            .await
            .unwrap();
        let instance = run.instances()[0].instance_id().unwrap().to_owned();
        c.create_volume()
            .availability_zone(format!("{HOME}a"))
            .size(1)
            .tag_specifications(spec(ResourceType::Volume))
            .send()
            .await
            .unwrap();
        let image = c
            .create_image()
            .instance_id(&instance)
            .name(format!("pilot-{build_id}"))
            .tag_specifications(spec(ResourceType::Image))
            .send()
            .await
            .unwrap()
            .image_id()
            .unwrap()
            .to_owned();
        // The builder tagged the image's snapshots once the image listed them.
        let img = c.describe_images().image_ids(&image).send().await.unwrap();
        let snaps: Vec<String> = img.images()[0]
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
            .map(str::to_owned)
            .collect();
        c.create_tags()
            .set_resources(Some(snaps))
            .tags(Tag::builder().key("pilot:build-id").value(build_id).build())
            .send()
            .await
            .unwrap();
    });
    for (kind, ids) in all_tagged(&moto, build_id) {
        assert!(!ids.is_empty(), "the set-up made no {kind}");
    }
    let cleanup = || {
        let mut cmd = pilot_image(&moto);
        cmd.args([
            "cleanup",
            "--build-id",
            build_id,
            "--region",
            HOME,
            "--poll-interval-ms",
            "50",
            "--cleanup-timeout",
            "60",
        ]);
        run(cmd)
    };
    let r = cleanup();
    assert!(r.status.success(), "{}", r.stderr);
    for (kind, ids) in all_tagged(&moto, build_id) {
        assert!(ids.is_empty(), "cleanup left {kind}: {ids:?}");
    }
    assert!(cleanup().status.success(), "a second cleanup is a no-op");
    moto.cleanup().unwrap();
}
