//! The stand-in image's root file system entered with chroot: needs root (it fails, it does not
//! skip, without it), so it is an integration test and `cargo test --lib` runs without root.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use pilot_harness::standin::{build_rootfs_tar, standin_binary};

/// Removes the directory when dropped, also when an assertion fails.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Proves the image's file system is complete without a Docker daemon: unpacked and
/// entered with chroot (root only), the stand-in starts with only the libraries packed.
#[test]
fn rootfs_runs_the_standin_in_a_chroot() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (chroot); run the harness tests as root"
    );
    let mut bytes = Vec::new();
    build_rootfs_tar(&standin_binary().unwrap(), &mut bytes).unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let root = ScratchDir(std::env::temp_dir().join(format!(
        "pilot-standin-rootfs-{}-{nanos}",
        std::process::id()
    )));
    fs::create_dir(&root.0).unwrap();
    let mut archive = tar::Archive::new(bytes.as_slice());
    archive.set_preserve_permissions(true);
    archive.unpack(&root.0).unwrap();

    let version = Command::new("chroot")
        .arg(&root.0)
        .args(["/bin/waypoint", "version"])
        .output()
        .unwrap();
    assert!(
        version.status.success(),
        "{}",
        String::from_utf8_lossy(&version.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        "Waypoint v0.11.4 (stand-in)"
    );

    let shell = Command::new("chroot")
        .arg(&root.0)
        .args(["/bin/sh", "-c", "cat /etc/passwd && ls -d /data /tmp"])
        .output()
        .unwrap();
    assert!(
        shell.status.success(),
        "{}",
        String::from_utf8_lossy(&shell.stderr)
    );
    assert!(String::from_utf8_lossy(&shell.stdout).starts_with("root:x:0:0:"));
}
