//! What a raw disk's partition table says about how it boots, read from its first 34 sectors.
//! Shared by the clouds: `publish --target aws` picks EC2's boot mode from it, `publish --target
//! gcp` the image's `UEFI_COMPATIBLE` guest OS feature. Not behind a cloud feature: it reads
//! bytes only.

use std::io::Read as _;
use std::path::Path;

pub use crate::aws::args::BootMode;

/// The boot mode a disk's partition table implies: an EFI system partition means UEFI; with a
/// BIOS boot partition (GPT) or boot code in the MBR as well, `uefi-preferred`; otherwise BIOS.
/// A disk without a partition table is refused (pass `--boot-mode`).
pub fn boot_mode_of(head: &[u8]) -> std::result::Result<BootMode, String> {
    /// The EFI system partition's type GUID as stored on disk (mixed-endian).
    const ESP: [u8; 16] = [
        0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9,
        0x3b,
    ];
    /// The BIOS boot partition's (GRUB's core image on GPT): "Hah!IdontNeedEFI".
    const BIOS_BOOT: &[u8; 16] = b"Hah!IdontNeedEFI";
    if head.len() < 512 || head[510..512] != [0x55, 0xaa] {
        return Err(
            "no partition table (no 0x55AA signature in sector 0); pass --boot-mode".into(),
        );
    }
    let mbr_types: Vec<u8> = (0..4).map(|i| head[0x1be + 16 * i + 4]).collect();
    // Boot code in the MBR (GRUB's boot.img), as the local build writes it.
    let mbr_code = head[..440].iter().any(|b| *b != 0);
    if !mbr_types.contains(&0xee) {
        return Ok(match (mbr_types.contains(&0xef), mbr_code) {
            (true, true) => BootMode::UefiPreferred,
            (true, false) => BootMode::Uefi,
            (false, _) => BootMode::LegacyBios,
        });
    }
    let hdr = head
        .get(512..512 + 92)
        .filter(|h| &h[..8] == b"EFI PART")
        .ok_or("protective MBR without a GPT header in sector 1")?;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&hdr[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let u32_at = |o: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&hdr[o..o + 4]);
        u32::from_le_bytes(b)
    };
    let (lba, count, size) = (u64_at(72), u32_at(80), u32_at(84));
    let start = usize::try_from(lba.saturating_mul(512)).map_err(|_| "GPT entries too far")?;
    let (count, size) = (count as usize, size as usize);
    if size < 128 {
        return Err(format!("GPT entry size {size} is below 128"));
    }
    let (mut esp, mut bios) = (false, false);
    for i in 0..count {
        let Some(entry) = head.get(start + i * size..start + i * size + 16) else {
            break;
        };
        esp |= entry == ESP;
        bios |= entry == BIOS_BOOT;
    }
    Ok(match (esp, bios) {
        (true, true) => BootMode::UefiPreferred,
        (true, false) => BootMode::Uefi,
        (false, _) => BootMode::LegacyBios,
    })
}

/// Sector 0, the GPT header and the default 128 entries of 128 bytes (34 sectors) of `path`,
/// and the boot mode they imply; the error is the reason, for the caller's own error type.
pub fn read_boot_mode(path: &Path) -> Result<BootMode, ReadError> {
    let mut head = Vec::with_capacity(34 * 512);
    std::fs::File::open(path)
        .and_then(|f| f.take(34 * 512).read_to_end(&mut head))
        .map_err(ReadError::Io)?;
    boot_mode_of(&head).map_err(ReadError::Table)
}

/// Why [`read_boot_mode`] failed.
#[derive(Debug)]
pub enum ReadError {
    /// The disk could not be read.
    Io(std::io::Error),
    /// The partition table is missing or broken (the reason).
    Table(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(types: &[u8], code: bool) -> Vec<u8> {
        let mut d = vec![0u8; 34 * 512];
        if code {
            d[0] = 0xeb;
        }
        for (i, t) in types.iter().enumerate() {
            d[0x1be + 16 * i + 4] = *t;
        }
        d[510] = 0x55;
        d[511] = 0xaa;
        d
    }

    fn gpt(types: &[[u8; 16]]) -> Vec<u8> {
        let mut d = mbr(&[0xee], false);
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            d[1024 + 128 * i..1024 + 128 * i + 16].copy_from_slice(t);
        }
        d
    }

    const ESP: [u8; 16] = [
        0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9,
        0x3b,
    ];
    const LINUX: [u8; 16] = [
        0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d,
        0xe4,
    ];

    #[test]
    fn boot_mode_follows_the_partition_table() {
        // The local build: MBR, one Linux partition, GRUB's boot.img in the MBR.
        assert_eq!(boot_mode_of(&mbr(&[0x83], true)), Ok(BootMode::LegacyBios));
        assert_eq!(boot_mode_of(&mbr(&[0xef, 0x83], false)), Ok(BootMode::Uefi));
        assert_eq!(
            boot_mode_of(&mbr(&[0xef, 0x83], true)),
            Ok(BootMode::UefiPreferred)
        );
        assert_eq!(boot_mode_of(&gpt(&[ESP, LINUX])), Ok(BootMode::Uefi));
        assert_eq!(
            boot_mode_of(&gpt(&[*b"Hah!IdontNeedEFI", ESP, LINUX])),
            Ok(BootMode::UefiPreferred)
        );
        assert_eq!(boot_mode_of(&gpt(&[LINUX])), Ok(BootMode::LegacyBios));
        assert!(boot_mode_of(&[0u8; 1024]).is_err());
        let mut broken = gpt(&[ESP]);
        broken[512] = b'X';
        assert!(boot_mode_of(&broken).is_err());
    }
}
