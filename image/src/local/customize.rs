//! Turns the cached root file system into a Pilot image: the agent package installed and its
//! units enabled, the Waypoint image tarballs copied in, cloud-init cleaned and set up for EC2,
//! Compute Engine and NoCloud (root partition grown at first boot), the clouds' drivers in the
//! initramfs, machine-id and SSH host keys removed (so every clone gets its own), fstab and the
//! boot loader's files (GRUB for BIOS and for UEFI) written.
//!
//! Commands inside the root file system run in a chroot within new mount and PID namespaces
//! (`unshare --mount --pid --fork`, private propagation): /proc, /sys, /dev and /run are mounted
//! only there and disappear with the namespace, whatever happens, and any process a package
//! would leave behind dies with the namespace's init. A `policy-rc.d` that forbids starting
//! services is in place while packages are configured, so nothing starts on this machine.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use super::definition::Definition;
use super::error::LocalError;
use super::run::run_logged;

/// GRUB's core image for BIOS, made by grub-mkimage inside the root file system.
pub const CORE_IMG_IN_ROOT: &str = "tmp/pilot-image-core.img";
/// The configuration embedded in GRUB's core image for BIOS.
const EARLY_CFG_IN_ROOT: &str = "tmp/pilot-image-grub-early.cfg";
/// The configuration Debian's signed GRUB reads from the EFI system partition.
pub const ESP_GRUB_CFG_IN_ROOT: &str = "tmp/pilot-image-esp-grub.cfg";

/// The EFI system partition's files: (source in the root file system, path on the partition,
/// the package that provides it). UEFI boots through Debian's Microsoft-signed shim at the
/// removable-media path, so that Secure Boot can be on (Compute Engine's Shielded VMs, EC2's
/// UEFI Secure Boot) and no firmware boot entry is needed; shim loads Debian's signed GRUB
/// from its own directory, and shim's MokManager is beside them for when a verification
/// fails. No fallback (fbx64.efi): it would write boot entries a cloud does not keep. Debian's
/// signed GRUB reads `grub.cfg` from its prefix, `/EFI/debian` on the same partition, and
/// that finds the root file system by UUID and reads /boot/grub/grub.cfg, the file the BIOS
/// GRUB reads too. The kernel is Debian's signed one, which shim's Debian key verifies.
pub const ESP_FILES: [(&str, &str, &str); 4] = [
    (
        "usr/lib/shim/shimx64.efi.signed",
        "EFI/BOOT/BOOTX64.EFI",
        "shim-signed",
    ),
    (
        "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
        "EFI/BOOT/grubx64.efi",
        "grub-efi-amd64-signed",
    ),
    (
        "usr/lib/shim/mmx64.efi.signed",
        "EFI/BOOT/mmx64.efi",
        "shim-signed",
    ),
    (ESP_GRUB_CFG_IN_ROOT, "EFI/debian/grub.cfg", "pilot-image"),
];

/// File system label of the root partition.
pub const ROOT_LABEL: &str = "pilot-root";

/// Modules built into the BIOS core image: enough to find the root file system by UUID on a
/// GPT (or MBR) disk and read the configuration from it; the rest are loaded from
/// /boot/grub/i386-pc on demand.
const GRUB_BIOS_MODULES: &str = "biosdisk part_gpt part_msdos ext2 normal configfile linux search search_fs_uuid serial terminal echo test gzio";

/// Storage and network drivers the clouds need, forced into the initramfs and checked there
/// (Debian's MODULES=most takes most storage drivers but no network ones): NVMe (EC2 Nitro's
/// EBS volumes, Compute Engine's NVMe disks), virtio-scsi and virtio-blk (Compute Engine's
/// default disk interface, QEMU), ENA (EC2's network), gVNIC (Compute Engine's network).
pub const INITRAMFS_DRIVERS: [&str; 5] = ["nvme", "virtio_scsi", "virtio_blk", "ena", "gve"];

/// cloud-init's settings for the clouds the image is published to.
const CLOUD_INIT_CFG: &str = "\
# Written by pilot-image. The datasources of the clouds this image is published to (EC2,
# Compute Engine) and NoCloud for local boots; ds-identify picks the one the platform has.
datasource_list: [ NoCloud, Ec2, GCE, None ]
# The root partition ends the disk: grown to the volume's size at first boot (growpart, from
# cloud-guest-utils), then the file system (resize2fs). These are Debian's defaults, written
# here so that the image does not depend on them.
growpart:
  mode: auto
  devices: [ \"/\" ]
resize_rootfs: true
";

fn io(context: String) -> impl FnOnce(std::io::Error) -> LocalError {
    move |source| LocalError::Io { context, source }
}

fn write(root: &Path, rel: &str, text: &str, mode: u32) -> Result<(), LocalError> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(format!("cannot create {}", parent.display())))?;
    }
    fs::write(&path, text).map_err(io(format!("cannot write {}", path.display())))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .map_err(io(format!("cannot chmod {}", path.display())))
}

/// Copies the agent package and the image tarballs in, writes the files that depend on the
/// disk (fstab, grub.cfg by the root file system's UUID), then runs the chroot script.
pub fn customize(
    def: &Definition,
    root: &Path,
    root_uuid: &str,
    log: &Path,
) -> Result<(), LocalError> {
    fs::copy(&def.agent_deb, root.join("tmp/pilot-agent.deb"))
        .map_err(io(format!("cannot copy {}", def.agent_deb.display())))?;

    write(
        root,
        "etc/fstab",
        &format!(
            "# Written by pilot-image. The root file system by UUID (not by device name).\n\
             UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
        ),
        0o644,
    )?;
    let cmdline = format!(
        "root=UUID={root_uuid} ro console=tty0 console=ttyS0,115200 {}",
        def.kernel_cmdline
    );
    // The kernel and initrd through Debian's /vmlinuz and /initrd.img links, which the kernel
    // packages keep current: a kernel upgrade inside the VM needs no boot loader update.
    write(
        root,
        "boot/grub/grub.cfg",
        &format!(
            "# Written by pilot-image (static: the kernel is reached through /vmlinuz).\n\
             serial --unit=0 --speed=115200\n\
             terminal_input serial console\n\
             terminal_output serial console\n\
             set timeout=1\n\
             search --no-floppy --fs-uuid --set=root {root_uuid}\n\
             menuentry 'Pilot (Debian)' {{\n\
             \x20 linux /vmlinuz {}\n\
             \x20 initrd /initrd.img\n\
             }}\n",
            cmdline.trim_end()
        ),
        0o644,
    )?;
    // cloud-init renders the network configuration for ifupdown into interfaces.d.
    write(
        root,
        "etc/network/interfaces",
        "# Written by pilot-image; cloud-init writes the interfaces into interfaces.d.\n\
         source /etc/network/interfaces.d/*\n\
         auto lo\niface lo inet loopback\n",
        0o644,
    )?;
    // The host keys were removed for cloning; cloud-init makes new ones at first boot, and
    // this makes them when no datasource ran (sshd refuses to start without keys).
    write(
        root,
        "etc/systemd/system/ssh.service.d/pilot-host-keys.conf",
        "# Written by pilot-image: missing host keys are made before sshd's own check.\n\
         [Service]\n\
         ExecStartPre=\n\
         ExecStartPre=/usr/bin/ssh-keygen -A\n\
         ExecStartPre=/usr/sbin/sshd -t\n",
        0o644,
    )?;
    // cloud-init sets the real host name from the instance's metadata.
    write(root, "etc/hostname", "localhost\n", 0o644)?;
    write(
        root,
        "etc/hosts",
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;

    // Embedded in the BIOS GRUB, and read by the signed UEFI GRUB from the EFI system
    // partition: the root file system by UUID, whatever the disk and partition numbering of the
    // machine (a second volume on EC2 can come first).
    write(
        root,
        EARLY_CFG_IN_ROOT,
        &format!(
            "search --no-floppy --fs-uuid --set=root {root_uuid}\n\
             set prefix=($root)/boot/grub\n"
        ),
        0o644,
    )?;
    write(
        root,
        ESP_GRUB_CFG_IN_ROOT,
        &format!(
            "# Written by pilot-image: the root file system by UUID, then its grub.cfg.\n\
             search --no-floppy --fs-uuid --set=root {root_uuid}\n\
             set prefix=($root)/boot/grub\n\
             configfile $prefix/grub.cfg\n"
        ),
        0o644,
    )?;
    write(
        root,
        "etc/initramfs-tools/modules",
        &format!(
            "# Written by pilot-image: the clouds' storage and network drivers (see\n\
             # image/src/local/customize.rs), loaded from the initramfs.\n{}\n",
            INITRAMFS_DRIVERS.join("\n")
        ),
        0o644,
    )?;
    write(
        root,
        "etc/cloud/cloud.cfg.d/90_pilot_image.cfg",
        CLOUD_INIT_CFG,
        0o644,
    )?;

    let images = root.join(def.images_dir.strip_prefix("/").unwrap_or(&def.images_dir));
    fs::create_dir_all(&images).map_err(io(format!("cannot create {}", images.display())))?;
    // Preloaded images are in the Docker data root already (preload.rs): no tarball copies.
    let copied: &[std::path::PathBuf] = if def.preload_images { &[] } else { &def.images };
    for tar in copied {
        // File names were checked unique and ending in .tar when the definition was loaded.
        let Some(name) = tar.file_name() else {
            continue;
        };
        let dest = images.join(name);
        fs::copy(tar, &dest).map_err(io(format!("cannot copy {}", tar.display())))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o600))
            .map_err(io(format!("cannot chmod {}", dest.display())))?;
    }

    write(
        root,
        "tmp/pilot-image-customize.sh",
        &chroot_script(),
        0o755,
    )?;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--pid",
        "--fork",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-euc",
        MOUNT_AND_CHROOT,
        "pilot-image-chroot",
    ])
    .arg(root);
    run_logged("customize", &mut cmd, log)?;
    for leftover in ["tmp/pilot-agent.deb", "tmp/pilot-image-customize.sh"] {
        let _ = fs::remove_file(root.join(leftover));
    }
    Ok(())
}

/// Runs in the new namespaces with the root file system as $1.
const MOUNT_AND_CHROOT: &str = r#"
R=$1
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
exec chroot "$R" /bin/sh -eu /tmp/pilot-image-customize.sh
"#;

fn chroot_script() -> String {
    let drivers = INITRAMFS_DRIVERS.join(" ");
    format!(
        r#"export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
echo "pilot-image: forbidding service starts (policy-rc.d)"
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
echo "pilot-image: installing the agent package"
dpkg -i /tmp/pilot-agent.deb
systemctl enable pilot-agent-firewall.service pilot-agent.service
systemctl enable ssh.service
echo "pilot-image: boot loader files (BIOS; UEFI's are Debian's signed shim and GRUB)"
grub-mkimage -O i386-pc -c /{EARLY_CFG_IN_ROOT} -p /boot/grub -o /{CORE_IMG_IN_ROOT} {GRUB_BIOS_MODULES}
rm -f /{EARLY_CFG_IN_ROOT}
mkdir -p /boot/grub/i386-pc /boot/grub/x86_64-efi
cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst /boot/grub/i386-pc/
cp /usr/lib/grub/x86_64-efi/*.mod /usr/lib/grub/x86_64-efi/*.lst /boot/grub/x86_64-efi/
echo "pilot-image: the clouds' drivers in the initramfs"
update-initramfs -u -k all
for m in {drivers}; do
  lsinitramfs /initrd.img | grep -Eq "/$m\.ko(\.[a-z]+)?$" || {{ echo "pilot-image: $m is not in the initramfs" >&2; exit 1; }}
done
echo "pilot-image: cleaning for cloning"
cloud-init clean --logs
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/resolv.conf
apt-get clean
rm -f /usr/sbin/policy-rc.d
"#
    )
}
