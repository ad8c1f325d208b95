//! The command-line flags of `pilot-image publish --target aws` and `pilot-image cleanup`.
//!
//! Flags rather than a build file: the AWS flow has few knobs, and each has an obvious default
//! (the disk's own boot mode and size, bounded waits).

use std::path::PathBuf;

/// Where the EC2 API is: region and endpoint. Credentials come from the SDK's usual chain
/// (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared files, SSO, the instance's role).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AwsConnection {
    /// AWS region (default: the SDK's chain, e.g. AWS_REGION or the profile).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// EC2 endpoint URL, e.g. an EC2 emulator on http://127.0.0.1:5000 (default: the SDK's
    /// chain: AWS_ENDPOINT_URL_EC2, AWS_ENDPOINT_URL, then the region's public endpoint).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
}

impl AwsConnection {
    /// The same endpoint in another region.
    pub fn in_region(&self, region: &str) -> AwsConnection {
        AwsConnection {
            region: Some(region.to_owned()),
            endpoint_url: self.endpoint_url.clone(),
        }
    }
}

/// The flags of `pilot-image cleanup`.
#[derive(Debug, Clone, clap::Args)]
pub struct AwsCleanupArgs {
    #[command(flatten)]
    pub connection: AwsConnection,
    /// Seconds to wait for each resource to go away.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub cleanup_timeout: u64,
    /// Milliseconds between two polls.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub poll_interval_ms: u64,
    /// Also reap the build's resources in this region (repeatable): the copy regions of a
    /// `publish --copy-to-region`.
    #[arg(long = "also-region", value_name = "REGION")]
    pub also_regions: Vec<String>,
}

/// How an EC2 instance boots the image (RegisterImage's `BootMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BootMode {
    /// BIOS only (boot code in the MBR, no EFI system partition).
    LegacyBios,
    /// UEFI only (an EFI system partition).
    Uefi,
    /// UEFI where the instance type supports it, else BIOS (both boot paths on the disk, as the
    /// local build makes it).
    UefiPreferred,
}

impl BootMode {
    /// EC2's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BootMode::LegacyBios => "legacy-bios",
            BootMode::Uefi => "uefi",
            BootMode::UefiPreferred => "uefi-preferred",
        }
    }
}

/// What a failed (or cancelled) publish or build does with what it made (Packer's
/// `-on-error`; `build --target local` uses it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnError {
    /// Remove everything it made (a publish: in every region or project, images, snapshots,
    /// objects; a build: its temporary directory).
    #[default]
    Cleanup,
    /// Keep it for inspection and print how to remove it (a publish: the `pilot-image cleanup`
    /// command).
    Abort,
}

/// The flags of `publish --target aws`: a locally built raw disk becomes an EBS snapshot (EBS
/// direct APIs), an AMI registered from it, and copies of it in other regions.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "AWS target (--target aws)")]
pub struct AwsPublishArgs {
    #[command(flatten)]
    pub connection: AwsConnection,
    /// The raw disk image to publish (e.g. `pilot-image build --target local --format raw`).
    #[arg(long, value_name = "DISK.raw")]
    pub disk: PathBuf,
    /// Tag value of `pilot:build-id` on every resource of this publish (default: generated).
    /// Letters, digits and `-`, at most 64.
    #[arg(long, value_name = "ID")]
    pub build_id: Option<String>,
    /// Name prefix of the AMI; the AMI is named PREFIX-BUILD_ID in every region.
    #[arg(long, value_name = "PREFIX", default_value = "pilot")]
    pub ami_name_prefix: String,
    /// How instances boot the image (default: what the disk's partition table has: an EFI
    /// system partition means uefi, with a BIOS boot partition or an MBR too uefi-preferred,
    /// else legacy-bios).
    #[arg(long, value_enum, value_name = "MODE")]
    pub boot_mode: Option<BootMode>,
    /// Architecture of the image.
    #[arg(long, value_name = "ARCH", default_value = "x86_64",
          value_parser = ["x86_64", "arm64"])]
    pub arch: String,
    /// Size in GiB of the snapshot and of the root volume (default: the disk's size rounded up
    /// to a GiB).
    #[arg(long, value_name = "GIB")]
    pub volume_size: Option<u32>,
    /// Copy the AMI into this region too (repeatable; CopyImage, tagged).
    #[arg(long = "copy-to-region", value_name = "REGION")]
    pub copy_to_regions: Vec<String>,
    /// Encrypt the copies' snapshots (CopyImage `Encrypted`; the home region's image is not
    /// encrypted: the EBS direct upload is plain).
    #[arg(long)]
    pub encrypt_boot: bool,
    /// KMS key of the encrypted copies (default: the region's `aws/ebs` key). It must exist in
    /// every copy region (a multi-Region key, or the same alias in each).
    #[arg(long, value_name = "KEY", requires = "encrypt_boot")]
    pub kms_key_id: Option<String>,
    /// Let this AWS account launch the image (repeatable; also CreateVolumePermission on its
    /// snapshots).
    #[arg(long = "share-account", value_name = "ACCOUNT_ID")]
    pub share_accounts: Vec<String>,
    /// Let this AWS Organization launch the image (repeatable).
    #[arg(long = "share-org-arn", value_name = "ARN")]
    pub share_org_arns: Vec<String>,
    /// Deprecate the image in every region at this time (RFC 3339, e.g.
    /// 2027-06-30T00:00:00Z; EnableImageDeprecation).
    #[arg(long, value_name = "RFC3339")]
    pub deprecate_at: Option<String>,
    /// What a failure, Ctrl-C or SIGTERM does with what the publish made.
    #[arg(long, value_enum, default_value_t = OnError::Cleanup)]
    pub on_error: OnError,
    /// Concurrent PutSnapshotBlock calls (coldsnap's default: 64).
    #[arg(long, value_name = "N")]
    pub upload_workers: Option<usize>,
    /// Seconds to wait for the snapshot to be `completed`.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub snapshot_timeout: u64,
    /// Seconds to wait for each AMI (and copy) to become `available`.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub image_timeout: u64,
    /// Seconds to wait for each resource to go away during clean-up.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub cleanup_timeout: u64,
    /// Milliseconds between two polls of a waited-for state.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub poll_interval_ms: u64,
    /// Test hook: fail right after this step (the clean-up then runs as after a real failure).
    #[arg(long, hide = true, env = "PILOT_IMAGE_FAIL_AFTER", value_name = "STEP")]
    pub fail_after: Option<String>,
}
