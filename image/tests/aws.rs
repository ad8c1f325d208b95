//! `pilot-image build --target aws` and `pilot-image cleanup` end to end: the real binary
//! against a real EC2 API (moto, started by the test harness on 127.0.0.1), checked by
//! describing what is left, by tag and by name, with aws-sdk-ec2.
//!
//! Moto runs no user-data and does not stop instances by itself, so the builds here pass
//! `--stop-after-provision`, except the one that cancels the genuine wait for the builder to
//! power itself off. Its built-in images all share one CreationDate; the source is an Ubuntu
//! image that moto ships (the newest-by-date choice is unit-tested in src/aws/build.rs).
//! Without moto (scripts/setup.sh makes its venv) these tests fail; they never skip.
//! Built only with the crate's `aws` feature (the default): without it there is no AWS target.
#![cfg(feature = "aws")]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Filter, InstanceStateName};
use pilot_harness::Moto;
use pilot_image::aws::build::STEPS;

const BIN: &str = env!("CARGO_BIN_EXE_pilot-image");
/// An image that moto ships (owner and name of Canonical's Xenial image).
const SOURCE_OWNER: &str = "099720109477";
const SOURCE_NAME: &str = "ubuntu/images/hvm-ssd/ubuntu-xenial-*";
const REGION: &str = "us-east-1";

/// The binary with dummy credentials and nothing from this machine's AWS set-up: no shared
/// files, no instance metadata lookups (traffic stays on loopback).
fn pilot_image(moto: &Moto) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/pilot-image-test")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/pilot-image-test",
        )
        .env("AWS_ENDPOINT_URL", moto.endpoint())
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("PILOT_IMAGE_FAIL_AFTER")
        .env_remove("PILOT_IMAGE_TEST_HOLD");
    cmd
}

/// `build --target aws` against moto, `extra` appended.
fn build_cmd(moto: &Moto, build_id: Option<&str>, extra: &[&str]) -> Command {
    build_cmd_from(moto, SOURCE_NAME, build_id, extra)
}

fn build_cmd_from(
    moto: &Moto,
    source_name: &str,
    build_id: Option<&str>,
    extra: &[&str],
) -> Command {
    let mut cmd = pilot_image(moto);
    cmd.args(["build", "--target", "aws", "--endpoint-url"])
        .arg(moto.endpoint())
        .args([
            "--agent-deb-url",
            "https://example.com/pilot-agent.deb",
            "--source-owner",
            SOURCE_OWNER,
            "--source-name",
            source_name,
            "--poll-interval-ms",
            "50",
            "--cleanup-timeout",
            "60",
        ]);
    if let Some(id) = build_id {
        cmd.args(["--build-id", id]);
    }
    cmd.args(extra);
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

/// A running build whose stderr lines arrive on a channel (and are echoed for the test log).
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run pilot-image");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("pilot-image| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    fn wait_line(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!(
            "no line with {needle:?} from pilot-image; saw:\n{}",
            self.seen.join("\n")
        );
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Waits (bounded) for the exit; the rest of stderr is collected.
    fn wait(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait for pilot-image") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("pilot-image did not exit within 60 s");
            }
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(line);
            }
        };
        // The reader thread ends at EOF, which follows the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        (status, self.seen.join("\n"))
    }
}

/// What EC2 still holds of a build: by tag, and by the names the build gives (so an untagged
/// resource would show up too).
#[derive(Debug, Default, PartialEq, Eq)]
struct Leftovers {
    /// Not terminated.
    instances: BTreeSet<String>,
    images: BTreeSet<String>,
    snapshots: BTreeSet<String>,
    key_pairs: BTreeSet<String>,
    security_groups: BTreeSet<String>,
    volumes: BTreeSet<String>,
}

impl Leftovers {
    fn is_empty(&self) -> bool {
        *self == Leftovers::default()
    }
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn leftovers(moto: &Moto, build_id: &str) -> Leftovers {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .endpoint_url(moto.endpoint())
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load()
            .await;
        let c = aws_sdk_ec2::Client::new(&config);
        let tag = filter("tag:pilot:build-id", build_id);
        let mut l = Leftovers::default();
        let mut all_instances = BTreeSet::new();
        let out = c
            .describe_instances()
            .filters(tag.clone())
            .send()
            .await
            .unwrap();
        for i in out.reservations().iter().flat_map(|r| r.instances()) {
            let id = i.instance_id().unwrap().to_owned();
            all_instances.insert(id.clone());
            if i.state().and_then(|s| s.name()) != Some(&InstanceStateName::Terminated) {
                l.instances.insert(id);
            }
        }
        for f in [tag.clone(), filter("name", &format!("pilot-{build_id}"))] {
            let out = c
                .describe_images()
                .owners("self")
                .filters(f)
                .send()
                .await
                .unwrap();
            l.images.extend(
                out.images()
                    .iter()
                    .map(|i| i.image_id().unwrap().to_owned()),
            );
        }
        let out = c
            .describe_snapshots()
            .owner_ids("self")
            .filters(tag.clone())
            .send()
            .await
            .unwrap();
        l.snapshots.extend(
            out.snapshots()
                .iter()
                .map(|s| s.snapshot_id().unwrap().to_owned()),
        );
        for i in &all_instances {
            let f = filter("description", &format!("Created by CreateImage({i})*"));
            let out = c
                .describe_snapshots()
                .owner_ids("self")
                .filters(f)
                .send()
                .await
                .unwrap();
            l.snapshots.extend(
                out.snapshots()
                    .iter()
                    .map(|s| s.snapshot_id().unwrap().to_owned()),
            );
        }
        for f in [
            tag.clone(),
            filter("key-name", &format!("pilot-image-{build_id}")),
        ] {
            let out = c.describe_key_pairs().filters(f).send().await.unwrap();
            l.key_pairs.extend(
                out.key_pairs()
                    .iter()
                    .map(|k| k.key_name().unwrap().to_owned()),
            );
        }
        for f in [
            tag.clone(),
            filter("group-name", &format!("pilot-image-{build_id}")),
        ] {
            let out = c
                .describe_security_groups()
                .filters(f)
                .send()
                .await
                .unwrap();
            l.security_groups.extend(
                out.security_groups()
                    .iter()
                    .map(|g| g.group_id().unwrap().to_owned()),
            );
        }
        let out = c.describe_volumes().filters(tag).send().await.unwrap();
        l.volumes.extend(
            out.volumes()
                .iter()
                .map(|v| v.volume_id().unwrap().to_owned()),
        );
        l
    })
}

/// The image's tags and state, as EC2 describes it.
fn image_facts(moto: &Moto, image_id: &str) -> (String, Vec<(String, String)>, Vec<String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .endpoint_url(moto.endpoint())
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load()
            .await;
        let c = aws_sdk_ec2::Client::new(&config);
        let out = c
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .unwrap();
        let img = out.images().first().expect("the image exists").clone();
        let mut tags: Vec<(String, String)> = img
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
            .collect();
        tags.sort();
        let snaps = img
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
            .map(str::to_owned)
            .collect();
        (img.state().unwrap().as_str().to_owned(), tags, snaps)
    })
}

fn assert_nothing_left(moto: &Moto, build_id: &str, context: &str) {
    let left = leftovers(moto, build_id);
    assert!(
        left.is_empty(),
        "{context}: build {build_id} left {left:#?}"
    );
}

#[test]
fn happy_path_yields_a_tagged_available_ami() {
    let moto = Moto::start().unwrap();
    let t0 = Instant::now();
    let r = run(build_cmd(&moto, None, &["--stop-after-provision"]));
    let took = t0.elapsed();
    assert!(r.status.success(), "build failed: {}", r.stderr);
    // The generated build id comes first, so that an operator can always clean up.
    let first = r.stderr.lines().next().unwrap_or_default();
    let build_id = first
        .strip_prefix("pilot-image: build id ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("first stderr line does not name the build id: {first:?}"))
        .to_owned();
    assert!(build_id.starts_with("pb-"), "{build_id}");
    for step in STEPS {
        assert!(
            r.stderr.contains(&format!("] {step} done in ")),
            "no progress line for {step}"
        );
    }
    let image_id = r.stdout.trim().to_owned();
    assert!(image_id.starts_with("ami-"), "stdout: {:?}", r.stdout);

    let (state, tags, snaps) = image_facts(&moto, &image_id);
    assert_eq!(state, "available");
    assert!(
        tags.contains(&("pilot:build-id".into(), build_id.clone())),
        "{tags:?}"
    );
    assert!(
        tags.contains(&("Name".into(), format!("pilot-{build_id}"))),
        "{tags:?}"
    );
    assert!(!snaps.is_empty(), "the image has no snapshot");

    // Described by tag: exactly the image and its snapshots remain; the builder, its key pair,
    // security group and volumes are gone.
    let left = leftovers(&moto, &build_id);
    assert_eq!(left.images, BTreeSet::from([image_id.clone()]));
    assert_eq!(left.snapshots, snaps.into_iter().collect::<BTreeSet<_>>());
    assert!(left.instances.is_empty(), "{left:?}");
    assert!(left.key_pairs.is_empty(), "{left:?}");
    assert!(left.security_groups.is_empty(), "{left:?}");
    assert!(left.volumes.is_empty(), "{left:?}");
    eprintln!("figure: build against moto took {took:?}");

    // `cleanup --build-id` removes a finished build too, image included.
    let r = run({
        let mut c = pilot_image(&moto);
        c.args([
            "cleanup",
            "--build-id",
            &build_id,
            "--poll-interval-ms",
            "50",
        ]);
        c
    });
    assert!(r.status.success());
    assert_nothing_left(&moto, &build_id, "cleanup of a finished build");
    moto.cleanup().unwrap();
}

#[test]
fn a_failure_after_any_step_leaves_nothing_of_the_build() {
    let moto = Moto::start().unwrap();
    for step in STEPS {
        let build_id = format!("fail-after-{step}");
        let mut cmd = build_cmd(&moto, Some(&build_id), &["--stop-after-provision"]);
        cmd.env("PILOT_IMAGE_FAIL_AFTER", step);
        let r = run(cmd);
        assert_eq!(r.status.code(), Some(1), "after {step}: {}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("failure injected after step {step}")),
            "after {step}: {}",
            r.stderr
        );
        assert!(r.stderr.contains("cleanup of build"), "after {step}");
        assert!(r.stdout.is_empty(), "a failed build printed {:?}", r.stdout);
        assert_nothing_left(&moto, &build_id, &format!("failure after {step}"));
    }
    moto.cleanup().unwrap();
}

#[test]
fn an_unknown_step_name_is_refused_before_any_api_call() {
    let moto = Moto::start().unwrap();
    let mut cmd = build_cmd(&moto, Some("bad-step"), &["--stop-after-provision"]);
    cmd.env("PILOT_IMAGE_FAIL_AFTER", "create-imag");
    let r = run(cmd);
    assert_eq!(r.status.code(), Some(2));
    assert!(
        r.stderr.contains("unknown step \"create-imag\""),
        "{}",
        r.stderr
    );
    assert_nothing_left(&moto, "bad-step", "refused plan");
    moto.cleanup().unwrap();
}

#[test]
fn sigint_during_the_image_wait_leaves_nothing() {
    let moto = Moto::start().unwrap();
    let build_id = "sigint-image-wait";
    // Moto makes images available at once: the hold keeps the wait polling so that the
    // signal lands in it, with the image and its snapshot already made.
    let mut cmd = build_cmd(&moto, Some(build_id), &["--stop-after-provision"]);
    cmd.env("PILOT_IMAGE_TEST_HOLD", "wait-image");
    let mut b = Running::spawn(cmd);
    b.wait_line("] wait-image ...");
    let before = leftovers(&moto, build_id);
    assert_eq!(before.images.len(), 1, "{before:?}");
    assert!(!before.snapshots.is_empty(), "{before:?}");
    let t0 = Instant::now();
    b.signal(libc::SIGINT);
    let (status, stderr) = b.wait();
    eprintln!("figure: cancel to exit {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("SIGINT: cancelling"), "{stderr}");
    assert_nothing_left(&moto, build_id, "SIGINT during wait-image");
    moto.cleanup().unwrap();
}

#[test]
fn sigint_while_waiting_for_the_builder_to_power_off_leaves_nothing() {
    let moto = Moto::start().unwrap();
    let build_id = "sigint-provision-wait";
    // No --stop-after-provision: the build waits, as on EC2, for the builder to stop itself,
    // which a moto instance never does.
    let mut b = Running::spawn(build_cmd(&moto, Some(build_id), &[]));
    b.wait_line("] wait-stopped ...");
    b.signal(libc::SIGINT);
    let (status, stderr) = b.wait();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert_nothing_left(&moto, build_id, "SIGINT during wait-stopped");
    moto.cleanup().unwrap();
}

#[test]
fn the_provisioning_wait_is_bounded() {
    let moto = Moto::start().unwrap();
    let build_id = "provision-timeout";
    let r = run(build_cmd(
        &moto,
        Some(build_id),
        &["--provision-timeout", "1"],
    ));
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("timed out after 1s waiting for instance"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("last seen: running"), "{}", r.stderr);
    assert_nothing_left(&moto, build_id, "provisioning timeout");
    moto.cleanup().unwrap();
}

#[test]
fn cleanup_reaps_a_build_killed_mid_way() {
    let moto = Moto::start().unwrap();
    let build_id = "sigkill-mid-way";
    let mut cmd = build_cmd(&moto, Some(build_id), &["--stop-after-provision"]);
    cmd.env("PILOT_IMAGE_TEST_HOLD", "wait-image");
    let mut b = Running::spawn(cmd);
    b.wait_line("] wait-image ...");
    b.signal(libc::SIGKILL);
    let (status, _) = b.wait();
    assert_eq!(status.code(), None, "SIGKILL ends it without an exit code");
    let left = leftovers(&moto, build_id);
    assert_eq!(left.instances.len(), 1, "{left:?}");
    assert_eq!(left.images.len(), 1, "{left:?}");
    assert!(!left.snapshots.is_empty(), "{left:?}");
    assert_eq!(left.key_pairs.len(), 1, "{left:?}");
    assert_eq!(left.security_groups.len(), 1, "{left:?}");

    let cleanup = || {
        let mut c = pilot_image(&moto);
        c.args([
            "cleanup",
            "--build-id",
            build_id,
            "--poll-interval-ms",
            "50",
        ]);
        run(c)
    };
    let t0 = Instant::now();
    let r = cleanup();
    eprintln!("figure: cleanup took {:?}", t0.elapsed());
    assert!(r.status.success(), "{}", r.stderr);
    assert_nothing_left(&moto, build_id, "cleanup --build-id");
    // Idempotent: nothing to do is success.
    assert!(cleanup().status.success());
    moto.cleanup().unwrap();
}

#[test]
fn no_matching_source_image_is_a_clear_error() {
    let moto = Moto::start().unwrap();
    let build_id = "no-source";
    let r = run(build_cmd_from(
        &moto,
        "no-such-image-*",
        Some(build_id),
        &["--stop-after-provision"],
    ));
    assert_eq!(r.status.code(), Some(1));
    assert!(
        r.stderr
            .contains("no source image owned by 099720109477 named \"no-such-image-*\""),
        "{}",
        r.stderr
    );
    assert_nothing_left(&moto, build_id, "no source image");
    moto.cleanup().unwrap();
}

/// The rendered builder user-data (`--dry-run` prints it) is valid cloud-config.
#[test]
fn builder_user_data_passes_cloud_init_schema() {
    let out = Command::new(BIN)
        .args([
            "build",
            "--target",
            "aws",
            "--dry-run",
            "--build-id",
            "dry",
            "--agent-deb-url",
            "https://example.com/pilot-agent.deb",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (plan, user_data) = text
        .split_once("--- builder user-data ---\n")
        .expect("dry-run prints the user-data");
    assert!(plan.contains("image name: pilot-dry"), "{plan}");
    assert!(user_data.contains("power_state:"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("user-data");
    std::fs::write(&file, user_data).unwrap();
    schema(&file);
}

fn schema(file: &Path) {
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cloud-init (scripts/setup.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "cloud-init schema: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
