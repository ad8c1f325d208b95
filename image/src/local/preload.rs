//! Loads the Waypoint images into the image's own Docker data root at build time, so that the
//! first boot loads nothing (`preload_images: true`, the default).
//!
//! The image's own dockerd does it, run inside the root file system: a chroot within new
//! mount, PID and network namespaces (`unshare --mount --pid --net --fork`). The dockerd and
//! the image's Docker are the same version, so the data root it writes is one the VM's dockerd
//! reads, with the storage driver the VM uses (overlay2, named explicitly so that a build host
//! without it fails instead of writing a vfs data root the VM would not read). It has no
//! network (only the namespace's loopback, down), no bridge, no iptables rules; it listens on a
//! private socket in the chroot's /run, a tmpfs that disappears with the namespace, as do
//! dockerd and containerd (killed with the namespace's init when the script ends, whatever
//! happens).
//!
//! Afterwards the state that belongs to a running daemon rather than to the images is removed
//! (networks, the containerd root, runtimes, temporary files): the VM's dockerd makes its own
//! at first start. `mkfs.ext4 -d` copies the overlay2 layers with their extended attributes
//! (`trusted.overlay.*`) and whiteout devices, which is what overlay2 needs.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use super::definition::Definition;
use super::error::LocalError;
use super::run::run_logged;

/// Where the tarballs are put for the chroot, relative to the root file system.
const STAGE_IN_ROOT: &str = "tmp/pilot-image-preload";
const SCRIPT_IN_ROOT: &str = "tmp/pilot-image-preload.sh";

fn io(context: String) -> impl FnOnce(std::io::Error) -> LocalError {
    move |source| LocalError::Io { context, source }
}

/// Loads every tarball of `def.images` into `root`'s /var/lib/docker.
pub fn preload(def: &Definition, root: &Path, log: &Path) -> Result<(), LocalError> {
    let stage = root.join(STAGE_IN_ROOT);
    fs::create_dir_all(&stage).map_err(io(format!("cannot create {}", stage.display())))?;
    for (i, tar) in def.images.iter().enumerate() {
        // Hard links where the tarball is on the same file system (no copy of ~800 MB), else a
        // copy; numbered, so that the load order is the definition's.
        let dest = stage.join(format!("{i:03}.tar"));
        if fs::hard_link(tar, &dest).is_err() {
            fs::copy(tar, &dest).map_err(io(format!("cannot copy {}", tar.display())))?;
        }
    }
    let script = root.join(SCRIPT_IN_ROOT);
    fs::write(&script, SCRIPT).map_err(io(format!("cannot write {}", script.display())))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))
        .map_err(io(format!("cannot chmod {}", script.display())))?;

    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--pid",
        "--net",
        "--fork",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-euc",
        MOUNT_AND_CHROOT,
        "pilot-image-preload",
    ])
    .arg(root);
    let result = run_logged("preload", &mut cmd, log);
    let _ = fs::remove_dir_all(&stage);
    let _ = fs::remove_file(&script);
    result
}

/// Runs in the new namespaces with the root file system as $1. The root is bind-mounted onto
/// itself first: dockerd's layer extraction makes `/` private (mount --make-rprivate), which
/// only works on a mount point. cgroup2 is mounted because dockerd reads its controllers at
/// start; nothing is written to it (no container runs).
const MOUNT_AND_CHROOT: &str = r#"
R=$1
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup" || true
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
exec chroot "$R" /bin/sh -eu /tmp/pilot-image-preload.sh
"#;

const SCRIPT: &str = r#"export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
SOCK=unix:///run/pilot-image-preload.sock
echo "pilot-image: starting the image's dockerd (no network, overlay2)"
dockerd --data-root /var/lib/docker --host "$SOCK" --pidfile /run/pilot-image-preload.pid \
  --exec-root /run/pilot-image-preload-exec --storage-driver overlay2 --bridge none \
  --iptables=false --ip6tables=false --ip-masq=false --userland-proxy=false \
  --log-driver none --live-restore=false >/run/dockerd.log 2>&1 &
DOCKERD=$!
i=0
until docker -H "$SOCK" version >/dev/null 2>&1; do
  i=$((i + 1))
  if [ "$i" -gt 120 ] || ! kill -0 "$DOCKERD" 2>/dev/null; then
    echo "pilot-image: dockerd did not start:" >&2
    tail -n 30 /run/dockerd.log >&2
    exit 1
  fi
  sleep 0.5
done
driver=$(docker -H "$SOCK" info --format '{{.Driver}}')
[ "$driver" = overlay2 ] || { echo "pilot-image: dockerd uses $driver, not overlay2" >&2; exit 1; }
for t in /tmp/pilot-image-preload/*.tar; do
  echo "pilot-image: loading $t"
  docker -H "$SOCK" load -i "$t"
done
docker -H "$SOCK" image ls --digests
kill "$DOCKERD"
wait "$DOCKERD" || true
# What belongs to a running daemon, not to the images: the VM's dockerd makes its own.
rm -rf /var/lib/docker/network /var/lib/docker/runtimes /var/lib/docker/tmp /var/lib/docker/buildkit \
  /var/lib/docker/containers/* /var/lib/containerd
echo "pilot-image: preloaded"
"#;
