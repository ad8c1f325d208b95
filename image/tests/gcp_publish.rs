//! `pilot-image publish --target gcp` end to end: the real binary against the Cloud Storage
//! emulator from PyPI (`gcp-storage-emulator`, which serves the JSON API's resumable uploads,
//! custom metadata, listings and deletes) and the Compute Engine STAND-IN
//! (tests/gcp-compute-standin/standin.py: images.insert/get/list/delete and global operations
//! as documented, which fetches the tarball from the emulator and checks it as the importer
//! does), both started by the test harness on 127.0.0.1 ([`pilot_harness::Gcp`]).
//!
//! Checked with real tools: GNU tar lists and extracts the uploaded object, sfdisk and
//! mkfs.ext4 make the disk, curl asks both services what exists. Without the emulator (the venv
//! of scripts/setup.sh) or these tools the tests fail; they never skip.
#![cfg(feature = "gcp")]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pilot_harness::Gcp;
use pilot_image::gcp::publish::STEPS;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_pilot-image");
const PROJECT: &str = "pilot-test-project";
const BUCKET: &str = "pilot-images-test";
/// The bearer token the stand-in requires; no output of the binary may contain it.
const TOKEN: &str = "ya29.standin-token-5f1c0e9b7a3d4c21";
const MIB: u64 = 1024 * 1024;

/// A Cloud KMS key name (the stand-in checks its form, as images.insert does).
const KMS_KEY: &str = "projects/pilot-test/locations/global/keyRings/images/cryptoKeys/pilot";

fn start() -> Gcp {
    Gcp::start(BUCKET, TOKEN).expect("the GCP emulator and stand-in start (scripts/setup.sh)")
}

/// The binary with the token in GOOGLE_OAUTH_ACCESS_TOKEN and nothing of this machine's set-up.
fn pilot_image() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("GOOGLE_OAUTH_ACCESS_TOKEN", TOKEN)
        // No metadata server is asked: the token is given.
        .env("GCE_METADATA_HOST", "127.0.0.1:9")
        .env_remove("GOOGLE_CLOUD_PROJECT")
        .env_remove("PILOT_IMAGE_FAIL_AFTER");
    cmd
}

fn endpoints(gcp: &Gcp) -> Vec<String> {
    vec![
        "--project".into(),
        PROJECT.into(),
        "--bucket".into(),
        BUCKET.into(),
        "--storage-endpoint".into(),
        gcp.storage_endpoint(),
        "--compute-endpoint".into(),
        gcp.compute_endpoint(),
    ]
}

fn publish_cmd(gcp: &Gcp, disk: &Path, build_id: &str, extra: &[&str]) -> Command {
    let mut cmd = pilot_image();
    cmd.args(["publish", "--target", "gcp", "--disk"])
        .arg(disk)
        .args(["--build-id", build_id])
        .args(endpoints(gcp))
        .args(["--poll-interval-ms", "50", "--cleanup-timeout", "60"])
        .args(extra);
    cmd
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs to the end; fails the test if the token shows anywhere in the output.
fn run(mut cmd: Command) -> Run {
    let out = cmd.output().expect("cannot run pilot-image");
    let r = Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("--- pilot-image {:?}\n{}", r.status, r.stderr);
    assert_no_token(&r.stdout);
    assert_no_token(&r.stderr);
    r
}

fn assert_no_token(text: &str) {
    assert!(
        !text.contains(TOKEN) && !text.contains("standin-token"),
        "the access token was printed: {text}"
    );
}

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(name).is_file())
    });
    assert!(found, "{name} is missing: run scripts/setup.sh");
    let mut c = Command::new(name);
    c.env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    c
}

fn check(mut c: Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 1 GiB sparse raw disk as the local build makes it: GPT with a BIOS boot partition, an EFI
/// system partition and a Linux partition (from 34 MiB) holding an ext4 file system with a few
/// files, one of them `random_mib` MiB of random bytes.
fn make_disk(dir: &Path, name: &str, random_mib: usize) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1024 * MIB)
        .unwrap();
    let mut sfdisk = tool("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&path)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"label: gpt\n\
              start=2048, size=2048, type=21686148-6248-494E-B1C7-47A2C3F6E2F4\n\
              start=4096, size=65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
              start=69632, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        )
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    let files = dir.join(format!("{name}.files"));
    std::fs::create_dir_all(files.join("etc")).unwrap();
    std::fs::write(files.join("etc/hostname"), "pilot\n").unwrap();
    std::fs::write(files.join("etc/os-release"), "ID=debian\nVERSION_ID=12\n").unwrap();
    let mut random = vec![0u8; random_mib.max(1) * MIB as usize];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut random)
        .unwrap();
    std::fs::write(files.join("random.bin"), &random).unwrap();
    // The file system from 34 MiB, 989 MiB long (the backup GPT keeps the last 33 sectors).
    let mut mkfs = tool("mkfs.ext4");
    mkfs.args(["-q", "-F", "-E"])
        .arg(format!("offset={}", 34 * MIB))
        .arg("-d")
        .arg(&files)
        .arg(&path)
        .arg("989M");
    check(mkfs, "mkfs.ext4");
    std::fs::remove_dir_all(&files).unwrap();
    path
}

fn sha256(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn curl_json(args: &[&str]) -> serde_json::Value {
    let mut c = tool("curl");
    c.args(["-sS", "--fail-with-body"]).args(args);
    serde_json::from_str(&check(c, "curl")).expect("a JSON answer")
}

/// The images of the project labelled with the build id (names), as images.list filters.
fn images_of(gcp: &Gcp, build_id: &str) -> Vec<String> {
    let url = format!(
        "{}/projects/{PROJECT}/global/images?filter=labels.pilot-build-id%3D{build_id}",
        gcp.compute_endpoint()
    );
    let auth = format!("Authorization: Bearer {TOKEN}");
    curl_json(&["-H", &auth, &url])["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| i["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The objects of the whole bucket that belong to the build: under its prefix, or carrying
/// its id in their metadata.
fn objects_of(gcp: &Gcp, build_id: &str) -> Vec<String> {
    let url = format!("{}/storage/v1/b/{BUCKET}/o", gcp.storage_endpoint());
    curl_json(&[&url])["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|o| {
                    o["name"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("pilot-image/{build_id}/"))
                        || o["metadata"]["pilot-build-id"].as_str() == Some(build_id)
                })
                .map(|o| o["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn assert_nothing_left(gcp: &Gcp, build_id: &str, context: &str) {
    let (images, objects) = (images_of(gcp, build_id), objects_of(gcp, build_id));
    assert!(
        images.is_empty() && objects.is_empty(),
        "{context}: {build_id} left images {images:?}, objects {objects:?}"
    );
}

fn line_with<'a>(stderr: &'a str, needle: &str) -> &'a str {
    stderr
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or("(no such line)")
}

#[test]
fn publish_uploads_one_sparse_disk_raw_and_imports_it() {
    let gcp = start();
    let dir = tempfile::tempdir().unwrap();
    // 32 MiB of random data: a tarball large enough for a throughput figure.
    let disk = make_disk(dir.path(), "pilot.raw", 32);
    let build_id = "gcp-happy";
    let t0 = Instant::now();
    let r = run(publish_cmd(
        &gcp,
        &disk,
        build_id,
        &[
            "--family",
            "pilot",
            "--label",
            "env=test",
            "--keep-object",
            "--kms-key-name",
            KMS_KEY,
        ],
    ));
    let took = t0.elapsed();
    assert!(
        r.status.success(),
        "publish failed: {}\n{}",
        r.stderr,
        gcp.logs()
    );
    for step in STEPS {
        assert!(
            r.stderr.contains(&format!("] {step} done in ")),
            "no progress line for {step}"
        );
    }
    let image = format!("pilot-{build_id}");
    assert_eq!(r.stdout, format!("{PROJECT} {image}\n"));
    eprintln!(
        "figure: publish took {took:?}; {}; {}; disk allocated {} bytes",
        line_with(&r.stderr, "packed the"),
        line_with(&r.stderr, "pilot-image: uploaded"),
        allocated(&disk),
    );

    // The object: a gzip'd tar that GNU tar lists as one disk.raw of 1 GiB, stored sparse
    // (header type 'S'), whose bytes are the disk's.
    let object = format!("pilot-image/{build_id}/{image}.tar.gz");
    let meta = curl_json(&[&format!(
        "{}/storage/v1/b/{BUCKET}/o/{}",
        gcp.storage_endpoint(),
        object.replace('/', "%2F")
    )]);
    assert_eq!(meta["metadata"]["pilot-build-id"], build_id, "{meta}");
    let tarball = dir.path().join("back.tar.gz");
    let mut c = tool("curl");
    c.args(["-sS", "--fail", "-o"])
        .arg(&tarball)
        .arg(format!("{}/{BUCKET}/{object}", gcp.storage_endpoint()));
    check(c, "download");
    let size = std::fs::metadata(&tarball).unwrap().len();
    assert_eq!(meta["size"], size.to_string());
    let mut c = tool("tar");
    c.arg("-tvf").arg(&tarball);
    let listing = check(c, "tar -tvf");
    eprintln!("figure: tar -tvf: {listing}");
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 1, "{listing}");
    assert!(lines[0].ends_with(" disk.raw"), "{listing}");
    assert!(lines[0].contains(" 1073741824 "), "{listing}");
    let mut gz = tool("gzip")
        .arg("-dc")
        .arg(&tarball)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut header = [0u8; 512];
    gz.stdout.as_mut().unwrap().read_exact(&mut header).unwrap();
    drop(gz.stdout.take());
    let _ = gz.wait();
    assert_eq!(&header[..9], b"disk.raw\0");
    assert_eq!(header[156], b'S', "the member is not a GNU sparse file");
    assert_eq!(&header[257..265], b"ustar  \0", "not the old GNU format");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut c = tool("tar");
    c.arg("-xSzf").arg(&tarball).arg("-C").arg(&out);
    check(c, "tar -x");
    let want = sha256(&disk);
    assert_eq!(
        sha256(&out.join("disk.raw")),
        want,
        "the extracted disk differs"
    );
    eprintln!(
        "figure: tar.gz {size} bytes for a disk of {} bytes allocated; sha256 {want}",
        allocated(&disk)
    );

    // The image, as images.get tells.
    let auth = format!("Authorization: Bearer {TOKEN}");
    let img = curl_json(&[
        "-H",
        &auth,
        &format!(
            "{}/projects/{PROJECT}/global/images/{image}",
            gcp.compute_endpoint()
        ),
    ]);
    assert_eq!(img["status"], "READY", "{img}");
    assert_eq!(img["family"], "pilot");
    assert_eq!(img["labels"]["pilot-build-id"], build_id);
    assert_eq!(img["labels"]["env"], "test");
    assert_eq!(img["diskSizeGb"], "1");
    assert_eq!(img["architecture"], "X86_64");
    assert_eq!(img["imageEncryptionKey"]["kmsKeyName"], KMS_KEY, "{img}");
    assert_eq!(
        img["rawDisk"]["source"],
        format!("{}/{BUCKET}/{object}", gcp.storage_endpoint())
    );
    let features: Vec<&str> = img["guestOsFeatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        features,
        ["UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE", "GVNIC"]
    );

    // A second publish of the same name: images.insert answers 409 alreadyExists; its own
    // object is removed, the first publish's image stays.
    let r = run(publish_cmd(
        &gcp,
        &disk,
        "gcp-dup",
        &["--image-name", &image],
    ));
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("HTTP 409 alreadyExists"), "{}", r.stderr);
    assert_nothing_left(&gcp, "gcp-dup", "a refused duplicate");
    assert_eq!(images_of(&gcp, build_id), std::slice::from_ref(&image));

    // Without --keep-object the tarball goes once the image is READY.
    let r = run(publish_cmd(&gcp, &disk, "gcp-noobj", &[]));
    assert!(r.status.success(), "{}", r.stderr);
    assert!(objects_of(&gcp, "gcp-noobj").is_empty());
    assert_eq!(images_of(&gcp, "gcp-noobj"), ["pilot-gcp-noobj"]);

    // `cleanup --target gcp` reaps the image and the kept object.
    for id in [build_id, "gcp-noobj"] {
        let mut c = pilot_image();
        c.args(["cleanup", "--target", "gcp", "--build-id", id])
            .args(endpoints(&gcp))
            .args(["--poll-interval-ms", "50"]);
        let r = run(c);
        assert!(r.status.success(), "{}", r.stderr);
        assert_nothing_left(&gcp, id, "cleanup of a finished publish");
    }
    gcp.cleanup().unwrap();
}

#[test]
fn a_failure_after_any_step_leaves_nothing() {
    let gcp = start();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "small.raw", 1);
    for step in STEPS {
        let build_id = format!("gfail-{step}");
        let mut cmd = publish_cmd(&gcp, &disk, &build_id, &["--keep-object"]);
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
        assert_nothing_left(&gcp, &build_id, &format!("failure after {step}"));
    }
    // The tarball next to the disk is gone too.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("small.raw")]);
    gcp.cleanup().unwrap();
}

#[test]
fn a_failed_import_is_reported_in_full_and_cleaned_up() {
    let gcp = start();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "small.raw", 1);
    // The stand-in fails the import of an image named refuse-import*: the operation ends DONE
    // with an error, which the publish reports whole, and the object goes.
    let r = run(publish_cmd(
        &gcp,
        &disk,
        "gbad",
        &["--image-name", "refuse-import-1", "--keep-object"],
    ));
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("(insert ")
            && r.stderr
                .contains("INVALID_IMAGE_FILE: the stand-in refuses"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("HTTP 400"), "{}", r.stderr);
    assert_nothing_left(&gcp, "gbad", "a failed import");
    // Refused flags make nothing at all (exit 2).
    for (flag, value, says) in [
        ("--label", "Bad=x", "label key \"Bad\""),
        ("--image-name", "Not_A_Name", "is not [a-z]"),
        ("--upload-chunk-kib", "100", "multiple of 256"),
        (
            "--kms-key-name",
            "projects/p/keyRings/r/cryptoKeys/k",
            "is not projects/P/locations/L",
        ),
        (
            "--copy-to-region",
            "eu-west-1",
            "apply to --target aws only",
        ),
    ] {
        let r = run(publish_cmd(&gcp, &disk, "gflags", &[flag, value]));
        assert_eq!(r.status.code(), Some(2), "{flag}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{flag}: {}", r.stderr);
    }
    // The token goes over plain http only to 127.0.0.1.
    let mut c = pilot_image();
    c.args(["publish", "--target", "gcp", "--disk"])
        .arg(&disk)
        .args([
            "--build-id",
            "gflags",
            "--project",
            PROJECT,
            "--bucket",
            BUCKET,
            "--storage-endpoint",
            "http://example.com",
        ]);
    let r = run(c);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("https only"), "{}", r.stderr);
    assert_nothing_left(&gcp, "gflags", "refused flags");
    gcp.cleanup().unwrap();
}

#[test]
fn on_error_abort_keeps_everything_and_the_printed_cleanup_reaps_it() {
    let gcp = start();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "small.raw", 1);
    let build_id = "gabort";
    // Right after images.insert: the image is still being imported, which the clean-up must
    // wait for (images.delete answers resourceNotReady meanwhile).
    let mut cmd = publish_cmd(&gcp, &disk, build_id, &["--on-error", "abort"]);
    cmd.env("PILOT_IMAGE_FAIL_AFTER", "insert-image");
    let r = run(cmd);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert_eq!(images_of(&gcp, build_id).len(), 1);
    assert_eq!(objects_of(&gcp, build_id).len(), 1);
    let command = r
        .stderr
        .lines()
        .find_map(|l| l.split("reap it with: ").nth(1))
        .expect("the cleanup command is printed")
        .to_owned();
    assert_eq!(
        command,
        format!(
            "pilot-image cleanup --target gcp --build-id {build_id} --project {PROJECT} \
             --bucket {BUCKET} --storage-endpoint {} --compute-endpoint {}",
            gcp.storage_endpoint(),
            gcp.compute_endpoint()
        )
    );
    let words: Vec<&str> = command.split_whitespace().collect();
    let mut c = pilot_image();
    c.args(&words[1..]).args(["--poll-interval-ms", "50"]);
    let r = run(c);
    assert!(r.status.success(), "{}", r.stderr);
    assert_nothing_left(&gcp, build_id, "the printed cleanup command");
    gcp.cleanup().unwrap();
}

#[test]
fn sigint_during_the_upload_leaves_nothing() {
    let gcp = start();
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB of random data (incompressible) in 256 KiB requests: the upload takes a while.
    let disk = make_disk(dir.path(), "big.raw", 64);
    let build_id = "gsigint";
    let mut child = publish_cmd(&gcp, &disk, build_id, &["--upload-chunk-kib", "256"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        eprintln!("pilot-image| {line}");
        let hit = line.contains("] upload-object ...");
        seen.push(line);
        if hit {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    for line in lines {
        eprintln!("pilot-image| {line}");
        seen.push(line);
    }
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert_no_token(&text);
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(
        !text.contains("upload-object done"),
        "the upload finished before the signal: {text}"
    );
    assert!(
        text.contains("asked to cancel the resumable upload"),
        "{text}"
    );
    assert_nothing_left(&gcp, build_id, "SIGINT during the upload");
    gcp.cleanup().unwrap();
}

#[test]
fn a_wrong_token_is_refused_and_never_printed() {
    let gcp = start();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "small.raw", 1);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "ya29.standin-token-wrong\n").unwrap();
    let mut cmd = publish_cmd(&gcp, &disk, "gtoken", &[]);
    cmd.arg("--access-token-file").arg(&token_file);
    let r = run(cmd);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("compute images.insert failed: HTTP 401"),
        "{}",
        r.stderr
    );
    // The object made before the refusal is removed; the image listing of the clean-up is
    // refused as well, which the error says.
    assert!(objects_of(&gcp, "gtoken").is_empty());
    assert!(
        r.stderr.contains("clean-up left resources behind"),
        "{}",
        r.stderr
    );
    gcp.cleanup().unwrap();
}
