//! The bootable disk, made without loop devices or mounts, booting under BIOS and UEFI alike
//! (EC2 and Compute Engine offer both; EC2's newer instance types and Compute Engine's
//! Shielded VMs want UEFI, older EC2 types want BIOS):
//!
//! - a GPT written by sfdisk into a sparse file: a 1 MiB BIOS boot partition (GRUB's core image
//!   for BIOS), a 126 MiB EFI system partition (FAT32, GRUB for UEFI at the removable-media path
//!   `EFI/BOOT/BOOTX64.EFI`, so that no firmware boot entry is needed), and the root partition
//!   LAST, from 128 MiB, so that cloud-init's growpart can grow it to the volume's size at first
//!   boot (it can only grow the partition that ends the disk);
//! - the ext4 root file system made by `mkfs.ext4 -d` straight into the partition's byte range
//!   (`-E offset=`);
//! - the EFI system partition made by `mkfs.fat -C` in a side file, filled by mtools (no mount)
//!   with Debian's signed shim and GRUB (Secure Boot; see `customize::ESP_FILES`) and copied in,
//!   its zero blocks skipped so the raw disk stays sparse;
//! - GRUB for BIOS written the way grub-install would for a GPT disk: `boot.img`'s code into the
//!   first 440 bytes (the protective MBR's partition entry after it stays), with the sector of
//!   the core image patched in, and the core image into the BIOS boot partition, with the sector
//!   of its second block patched into its first sector's block list.
//!
//! Both GRUBs start from the same few lines (customize.rs; embedded in the BIOS core image, on
//! the EFI system partition for the signed UEFI GRUB): find the root file system by UUID and
//! read /boot/grub/grub.cfg from it, so neither depends on disk or partition numbering. grub.cfg boots /vmlinuz and /initrd.img, links that Debian's kernel packages
//! maintain: kernel upgrades inside the VM keep booting without a boot loader update, and
//! nothing on the EFI system partition ever changes (it is not even mounted).
//!
//! GRUB rather than extlinux or systemd-boot: extlinux must be installed onto a mounted file
//! system, and systemd-boot has no BIOS half; GRUB's images are plain files written at fixed
//! offsets.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::customize::{CORE_IMG_IN_ROOT, ESP_FILES, ESP_GRUB_CFG_IN_ROOT, ROOT_LABEL};
use super::error::LocalError;
use super::run::{self, run_logged};

const MIB: u64 = 1024 * 1024;
const SECTOR: u64 = 512;
/// The BIOS boot partition: 1 MiB at 1 MiB (aligned; GRUB's core image is about 60 KiB).
pub const BIOS_BOOT_START: u64 = MIB;
const BIOS_BOOT_SIZE: u64 = MIB;
/// The EFI system partition: 2 MiB to 128 MiB (FAT32 needs 65,525 clusters; 126 MiB of
/// 512-byte clusters has room for those and for firmware updates a cloud may drop there).
pub const ESP_START: u64 = 2 * MIB;
const ESP_SIZE: u64 = 126 * MIB;
/// The root partition: from 128 MiB to 1 MiB before the end (the backup GPT's 33 sectors live
/// in that last MiB; a fixed end keeps the partition's size known without reading it back).
pub const ROOT_START: u64 = 128 * MIB;
const END_RESERVE: u64 = MIB;
/// Disk space the layout takes besides the root file system, in MiB.
pub const LAYOUT_OVERHEAD_MIB: u64 = (ROOT_START + END_RESERVE) / MIB;

/// GPT partition types (the UEFI specification's, GRUB's, and the Discoverable Partitions
/// Specification's root partition for x86-64, which systemd's tools recognise).
const TYPE_BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// Bytes of boot.img that are boot code (then the disk signature and the partition table).
const MBR_CODE: usize = 440;
/// boot.img: where the LBA of the core image's first sector is (GRUB_BOOT_MACHINE_KERNEL_SECTOR).
const BOOT_KERNEL_SECTOR: usize = 0x5c;
/// The core image's first sector (diskboot.img) ends with a 12-byte block list entry: the LBA
/// of the rest of the core image (8 bytes), its length (2) and segment (2). grub-mkimage
/// fills the length; the LBA defaults to 2 (the core image at sector 1).
const DISKBOOT_BLOCKLIST_START: usize = SECTOR as usize - 12;

fn io(context: String) -> impl FnOnce(std::io::Error) -> LocalError {
    move |source| LocalError::Io { context, source }
}

/// A fresh random UUID for the root file system (the kernel makes it; no extra crate).
pub fn new_uuid() -> Result<String, LocalError> {
    let s = fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map_err(io("cannot read /proc/sys/kernel/random/uuid".to_owned()))?;
    Ok(s.trim().to_owned())
}

/// The partition table sfdisk is fed, for a disk of `size` bytes.
pub fn partition_table(size: u64) -> String {
    let s = |bytes: u64| bytes / SECTOR;
    format!(
        "label: gpt\nunit: sectors\n\
         start={}, size={}, type={TYPE_BIOS_BOOT}, name=\"bios-boot\"\n\
         start={}, size={}, type={TYPE_ESP}, name=\"esp\"\n\
         start={}, size={}, type={TYPE_ROOT_X86_64}, name=\"root\"\n",
        s(BIOS_BOOT_START),
        s(BIOS_BOOT_SIZE),
        s(ESP_START),
        s(ESP_SIZE),
        s(ROOT_START),
        s(size - ROOT_START - END_RESERVE),
    )
}

/// Writes the raw disk `raw` of `size_mib` MiB: the partition table and the root file system
/// made from `root`.
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

    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(raw)
        .stdin(Stdio::piped());
    run_logged_with_input(
        "partition",
        &mut sfdisk,
        partition_table(size).as_bytes(),
        log,
    )?;

    let part_kib = (size - ROOT_START - END_RESERVE) / 1024;
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-t", "ext4", "-L", ROOT_LABEL, "-U", root_uuid])
        .arg("-E")
        .arg(format!("offset={ROOT_START}"))
        .arg("-d")
        .arg(root)
        .arg(raw)
        .arg(format!("{part_kib}k"));
    run_logged("filesystem", &mut mkfs, log)
}

/// Makes the EFI system partition in `scratch` (a FAT32 file system holding [`ESP_FILES`]
/// from the root file system) and copies it into `raw`.
pub fn make_esp(root: &Path, raw: &Path, scratch: &Path, log: &Path) -> Result<(), LocalError> {
    for (src, _, package) in ESP_FILES {
        if !root.join(src).is_file() {
            return Err(LocalError::BootLoader(format!(
                "{} is missing (is {package} in the package list?)",
                root.join(src).display()
            )));
        }
    }
    let esp = scratch.join("esp.img");
    let _ = fs::remove_file(&esp);
    let mut mkfs = Command::new("mkfs.fat");
    mkfs.args(["-F", "32", "-n", "PILOT-ESP", "-C"])
        .arg(&esp)
        .arg((ESP_SIZE / 1024).to_string());
    run_logged("esp-filesystem", &mut mkfs, &log.with_extension("mkfs.log"))?;
    // MTOOLS_SKIP_CHECK: mtools' documented switch for image files, whose geometry it would
    // otherwise compare with a floppy's.
    let mut dirs: Vec<String> = Vec::new();
    for (_, dest, _) in ESP_FILES {
        // Every parent directory of the file, outermost first.
        let parts: Vec<&str> = dest.split('/').collect();
        for n in 1..parts.len() {
            let dir = format!("::/{}", parts[..n].join("/"));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    let mut mmd = Command::new("mmd");
    mmd.env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&esp)
        .args(&dirs);
    run_logged("esp-directories", &mut mmd, &log.with_extension("mmd.log"))?;
    for (i, (src, dest, _)) in ESP_FILES.iter().enumerate() {
        let mut mcopy = Command::new("mcopy");
        mcopy
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&esp)
            .arg(root.join(src))
            .arg(format!("::/{dest}"));
        run_logged(
            "esp-files",
            &mut mcopy,
            &log.with_extension(format!("mcopy{i}.log")),
        )?;
    }
    copy_sparse(&esp, raw, ESP_START, ESP_SIZE)?;
    let _ = fs::remove_file(&esp);
    let _ = fs::remove_file(root.join(ESP_GRUB_CFG_IN_ROOT));
    Ok(())
}

/// Copies `src` (at most `limit` bytes) into `dest` at `at`, skipping all-zero blocks (the
/// destination's range is a hole already, so they read back as zeros).
fn copy_sparse(src: &Path, dest: &Path, at: u64, limit: u64) -> Result<(), LocalError> {
    let mut from = File::open(src).map_err(io(format!("cannot open {}", src.display())))?;
    let len = from
        .metadata()
        .map_err(io(format!("cannot stat {}", src.display())))?
        .len();
    if len > limit {
        return Err(LocalError::BootLoader(format!(
            "{} is {len} bytes; its partition holds {limit}",
            src.display()
        )));
    }
    let mut to = OpenOptions::new()
        .write(true)
        .open(dest)
        .map_err(io(format!("cannot open {}", dest.display())))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    loop {
        let n = from
            .read(&mut buf)
            .map_err(io(format!("cannot read {}", src.display())))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            to.seek(SeekFrom::Start(at + offset))
                .and_then(|_| to.write_all(&buf[..n]))
                .map_err(io(format!("cannot write into {}", dest.display())))?;
        }
        offset += n as u64;
    }
    to.sync_all()
        .map_err(io(format!("cannot fsync {}", dest.display())))
}

/// Writes GRUB for BIOS (both images taken from the image's own grub-pc-bin): boot.img's code
/// into the protective MBR and the core image into the BIOS boot partition.
pub fn install_boot_loader(root: &Path, raw: &Path) -> Result<(), LocalError> {
    let boot_img_path = root.join("usr/lib/grub/i386-pc/boot.img");
    let mut boot_img = fs::read(&boot_img_path).map_err(io(format!(
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
    let mut core =
        fs::read(&core_path).map_err(io(format!("cannot read {}", core_path.display())))?;
    if core.len() > BIOS_BOOT_SIZE as usize || core.len() < SECTOR as usize {
        return Err(LocalError::BootLoader(format!(
            "GRUB's core image is {} bytes; the BIOS boot partition holds {BIOS_BOOT_SIZE}",
            core.len()
        )));
    }
    patch_bios_boot(&mut boot_img, &mut core)?;
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)
        .map_err(io(format!("cannot open {}", raw.display())))?;
    // The protective MBR sfdisk wrote must survive: only the code area is replaced.
    let mut mbr = [0u8; SECTOR as usize];
    disk.read_exact(&mut mbr)
        .map_err(io(format!("cannot read the MBR of {}", raw.display())))?;
    if mbr[510..512] != [0x55, 0xaa] || mbr[446 + 4] != 0xee {
        return Err(LocalError::BootLoader(format!(
            "{} has no protective MBR after partitioning",
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
    write_at(&mut disk, BIOS_BOOT_START, &core)?;
    disk.sync_all()
        .map_err(io(format!("cannot fsync {}", raw.display())))?;
    let _ = fs::remove_file(core_path);
    Ok(())
}

/// Points boot.img at the core image's first sector, and the core image's block list at its
/// second, both in the BIOS boot partition (what grub-install's setup does for a GPT disk).
/// The defaults are checked first: a GRUB whose layout differs is refused, not patched blindly.
pub fn patch_bios_boot(boot_img: &mut [u8], core: &mut [u8]) -> Result<(), LocalError> {
    let core_lba = BIOS_BOOT_START / SECTOR;
    let read_u64 = |b: &[u8], at: usize| {
        let mut le = [0u8; 8];
        le.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(le)
    };
    if read_u64(boot_img, BOOT_KERNEL_SECTOR) != 1 {
        return Err(LocalError::BootLoader(
            "boot.img's core image sector is not GRUB's default (1): unknown GRUB layout".into(),
        ));
    }
    if read_u64(core, DISKBOOT_BLOCKLIST_START) != 2 {
        return Err(LocalError::BootLoader(
            "the core image's block list does not start at GRUB's default (2): unknown GRUB layout"
                .into(),
        ));
    }
    boot_img[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    core[DISKBOOT_BLOCKLIST_START..DISKBOOT_BLOCKLIST_START + 8]
        .copy_from_slice(&(core_lba + 1).to_le_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_puts_the_root_partition_last_and_inside_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        let size = 1024 * MIB;
        File::create(&raw).unwrap().set_len(size).unwrap();
        let log = dir.path().join("log");
        let mut sfdisk = Command::new("sfdisk");
        sfdisk
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&raw)
            .stdin(Stdio::piped());
        run_logged_with_input(
            "partition",
            &mut sfdisk,
            partition_table(size).as_bytes(),
            &log,
        )
        .unwrap_or_else(|e| panic!("sfdisk: {e}: {}", fs::read_to_string(&log).unwrap()));
        let out = Command::new("sfdisk").arg("-J").arg(&raw).output().unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let parts = v["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .clone();
        let field = |i: usize, k: &str| parts[i][k].clone();
        assert_eq!(v["partitiontable"]["label"], "gpt");
        assert_eq!(parts.len(), 3);
        assert_eq!(field(0, "type"), TYPE_BIOS_BOOT);
        assert_eq!(field(1, "type"), TYPE_ESP);
        assert_eq!(field(2, "type"), TYPE_ROOT_X86_64);
        assert_eq!(field(0, "start"), BIOS_BOOT_START / SECTOR);
        assert_eq!(field(1, "start"), ESP_START / SECTOR);
        assert_eq!(field(2, "start"), ROOT_START / SECTOR);
        let root_end = field(2, "start").as_u64().unwrap() + field(2, "size").as_u64().unwrap();
        // Ends in the last MiB, before the backup GPT (its last 33 sectors).
        assert_eq!(root_end * SECTOR, size - END_RESERVE);
        let last_lba = v["partitiontable"]["lastlba"].as_u64().unwrap();
        assert!(root_end - 1 <= last_lba);
        // Each partition ends where the next starts: no gap growpart or GRUB could trip on.
        for i in 0..2 {
            let end = field(i, "start").as_u64().unwrap() + field(i, "size").as_u64().unwrap();
            assert_eq!(end, field(i + 1, "start").as_u64().unwrap());
        }
    }

    fn grub_like() -> (Vec<u8>, Vec<u8>) {
        let mut boot = vec![0u8; SECTOR as usize];
        boot[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&1u64.to_le_bytes());
        let mut core = vec![0u8; 3 * SECTOR as usize];
        core[DISKBOOT_BLOCKLIST_START..DISKBOOT_BLOCKLIST_START + 8]
            .copy_from_slice(&2u64.to_le_bytes());
        core[DISKBOOT_BLOCKLIST_START + 8] = 2; // the length grub-mkimage wrote
        (boot, core)
    }

    #[test]
    fn bios_boot_is_pointed_at_the_bios_boot_partition() {
        let (mut boot, mut core) = grub_like();
        patch_bios_boot(&mut boot, &mut core).unwrap();
        assert_eq!(
            boot[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8],
            2048u64.to_le_bytes()
        );
        assert_eq!(
            core[DISKBOOT_BLOCKLIST_START..DISKBOOT_BLOCKLIST_START + 8],
            2049u64.to_le_bytes()
        );
        assert_eq!(core[DISKBOOT_BLOCKLIST_START + 8], 2, "the length stays");
    }

    #[test]
    fn an_unknown_grub_layout_is_refused() {
        let (mut boot, mut core) = grub_like();
        boot[BOOT_KERNEL_SECTOR] = 7;
        assert!(patch_bios_boot(&mut boot, &mut core).is_err());
        let (mut boot, mut core) = grub_like();
        core[DISKBOOT_BLOCKLIST_START] = 9;
        assert!(patch_bios_boot(&mut boot, &mut core).is_err());
    }
}
