//! The bootable disk, made without loop devices or mounts: an MBR partition table written by
//! sfdisk into a sparse file, the ext4 root file system made by `mkfs.ext4 -d` straight into
//! the partition's byte range (`-E offset=`), and GRUB for BIOS written the way grub-install
//! would for an MBR disk: `boot.img`'s code into the first 440 bytes (the partition table after
//! it stays) and the core image (grub-mkimage, prefix `(hd0,msdos1)/boot/grub`) into the gap
//! between the MBR and the partition. boot.img loads sector 1 by default and grub-mkimage
//! writes the core's own length into its first sector's block list, so nothing needs patching.
//!
//! GRUB rather than extlinux: extlinux must be installed onto a mounted file system (a loop
//! device and a mount on this machine, both of which a failure can leave behind), GRUB's
//! images are plain files written at fixed offsets. The configuration boots /vmlinuz and
//! /initrd.img, links that Debian's kernel packages maintain, so kernel upgrades inside the
//! VM keep booting without a boot loader update.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::customize::{CORE_IMG_IN_ROOT, ROOT_LABEL};
use super::error::LocalError;
use super::run::{self, run_logged};

const MIB: u64 = 1024 * 1024;
/// The partition starts at 1 MiB (sector 2048): aligned, and the gap holds GRUB's core image.
const PART_START: u64 = MIB;
const SECTOR: u64 = 512;
/// Bytes of boot.img that are boot code (then the disk signature and the partition table).
const MBR_CODE: usize = 440;

fn io(context: String) -> impl FnOnce(std::io::Error) -> LocalError {
    move |source| LocalError::Io { context, source }
}

/// A fresh random UUID for the root file system (the kernel makes it; no extra crate).
pub fn new_uuid() -> Result<String, LocalError> {
    let s = fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map_err(io("cannot read /proc/sys/kernel/random/uuid".to_owned()))?;
    Ok(s.trim().to_owned())
}

/// Writes the raw disk `raw` of `size_mib` MiB from the root file system `root`.
pub fn make_raw(
    root: &Path,
    raw: &Path,
    size_mib: u64,
    root_uuid: &str,
    log: &Path,
) -> Result<(), LocalError> {
    let size = size_mib * MIB;
    let file = File::create(raw).map_err(io(format!("cannot create {}", raw.display())))?;
    file.set_len(size)
        .map_err(io(format!("cannot size {}", raw.display())))?;
    drop(file);

    // One primary Linux partition from 1 MiB to the end, marked active (some BIOSes want one).
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(raw)
        .stdin(Stdio::piped());
    let table = format!(
        "label: dos\nunit: sectors\nstart={}, type=83, bootable\n",
        PART_START / SECTOR
    );
    run_logged_with_input("partition", &mut sfdisk, table.as_bytes(), log)?;

    let part_kib = (size - PART_START) / 1024;
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-t", "ext4", "-L", ROOT_LABEL, "-U", root_uuid])
        .arg("-E")
        .arg(format!("offset={PART_START}"))
        .arg("-d")
        .arg(root)
        .arg(raw)
        .arg(format!("{part_kib}k"));
    run_logged("filesystem", &mut mkfs, log)
}

/// Writes GRUB's boot code and core image (both taken from the image's own grub-pc-bin).
pub fn install_boot_loader(root: &Path, raw: &Path) -> Result<(), LocalError> {
    let boot_img_path = root.join("usr/lib/grub/i386-pc/boot.img");
    let boot_img = fs::read(&boot_img_path).map_err(io(format!(
        "cannot read {} (is grub-pc-bin in the package list?)",
        boot_img_path.display()
    )))?;
    if boot_img.len() != SECTOR as usize {
        return Err(LocalError::BootLoader(format!(
            "{} is {} bytes, expected {SECTOR}",
            boot_img_path.display(),
            boot_img.len()
        )));
    }
    let core_path = root.join(CORE_IMG_IN_ROOT);
    let core = fs::read(&core_path).map_err(io(format!("cannot read {}", core_path.display())))?;
    let gap = (PART_START - SECTOR) as usize;
    if core.len() > gap {
        return Err(LocalError::BootLoader(format!(
            "GRUB's core image is {} bytes; the gap before the partition holds {gap}",
            core.len()
        )));
    }
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)
        .map_err(io(format!("cannot open {}", raw.display())))?;
    // The partition table sfdisk wrote must survive: only the code area is replaced.
    let mut mbr = [0u8; SECTOR as usize];
    disk.read_exact(&mut mbr)
        .map_err(io(format!("cannot read the MBR of {}", raw.display())))?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Err(LocalError::BootLoader(format!(
            "{} has no MBR signature after partitioning",
            raw.display()
        )));
    }
    mbr[..MBR_CODE].copy_from_slice(&boot_img[..MBR_CODE]);
    let write_at = |disk: &mut File, at: u64, bytes: &[u8]| {
        disk.seek(SeekFrom::Start(at))
            .and_then(|_| disk.write_all(bytes))
            .map_err(io(format!(
                "cannot write the boot loader into {}",
                raw.display()
            )))
    };
    write_at(&mut disk, 0, &mbr)?;
    write_at(&mut disk, SECTOR, &core)?;
    disk.sync_all()
        .map_err(io(format!("cannot fsync {}", raw.display())))?;
    let _ = fs::remove_file(core_path);
    Ok(())
}

/// `qemu-img convert -O qcow2`.
pub fn convert_qcow2(raw: &Path, qcow2: &Path, log: &Path) -> Result<(), LocalError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(qcow2);
    run_logged("qcow2", &mut cmd, log)
}

/// Space a file really takes on disk (raw images are sparse).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn run_logged_with_input(
    step: &str,
    cmd: &mut Command,
    input: &[u8],
    log: &Path,
) -> Result<(), LocalError> {
    let log_file = File::create(log).map_err(io(format!("cannot create {}", log.display())))?;
    let err_file = log_file
        .try_clone()
        .map_err(io(format!("cannot reopen {}", log.display())))?;
    let mut child = cmd
        .stdout(log_file)
        .stderr(err_file)
        .spawn()
        .map_err(|e| run::spawn_error(step, cmd, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .map_err(io(format!("cannot feed {step}")))?;
    }
    let status = child
        .wait()
        .map_err(io(format!("cannot wait for {step}")))?;
    run::check_status(step, cmd, status, log)
}
