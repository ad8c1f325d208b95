//! The command-line flags of `pilot-image build --target aws`, `pilot-image publish --target aws`
//! and `pilot-image cleanup`.
//!
//! Flags rather than a build file: the AWS flow has few knobs, and each has an obvious default
//! (a Debian 12 source image from Debian's own account, a small builder, bounded waits).

use std::path::PathBuf;

/// Debian's AWS account, which publishes the official Debian cloud images
/// (<https://wiki.debian.org/Cloud/AmazonEC2Image>).
pub const DEBIAN_OWNER: &str = "136693071363";

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

/// The flags of `build --target aws` (ignored by the other targets).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "AWS target (--target aws)")]
pub struct AwsBuildArgs {
    #[command(flatten)]
    pub connection: AwsConnection,
    /// Tag value of `pilot:build-id` on every resource of this build (default: generated).
    /// Letters, digits and `-`, at most 64.
    #[arg(long, value_name = "ID")]
    pub build_id: Option<String>,
    /// Owner (account id, or `self`, `amazon`) of the source image.
    #[arg(long, value_name = "OWNER", default_value = DEBIAN_OWNER)]
    pub source_owner: String,
    /// Name pattern of the source image (`*` wildcards); the newest match by CreationDate wins.
    #[arg(long, value_name = "PATTERN", default_value = "debian-12-amd64-*")]
    pub source_name: String,
    /// Architecture of the source image.
    #[arg(long, value_name = "ARCH", default_value = "x86_64")]
    pub source_arch: String,
    /// Instance type of the builder.
    #[arg(long, value_name = "TYPE", default_value = "t3.small")]
    pub instance_type: String,
    /// Subnet for the builder (default: the default VPC's default subnet).
    #[arg(long, value_name = "SUBNET")]
    pub subnet_id: Option<String>,
    /// Name prefix of the AMI; the AMI is named PREFIX-BUILD_ID.
    #[arg(long, value_name = "PREFIX", default_value = "pilot")]
    pub ami_name_prefix: String,
    /// HTTPS URL of the agent's .deb that the builder installs (renders the `stock` user-data
    /// and makes it power the builder off once the agent package is installed).
    #[arg(long, value_name = "URL", conflicts_with = "user_data_file")]
    pub agent_deb_url: Option<String>,
    /// User-data for the builder instead of the rendered `stock` one (at most 16 KiB). It must
    /// power the instance off when provisioning is done: the build waits for that.
    #[arg(long, value_name = "FILE")]
    pub user_data_file: Option<PathBuf>,
    /// Stop the builder with StopInstances as soon as it is running instead of waiting for the
    /// user-data to power it off. Only for EC2 emulators that run no user-data (moto): on EC2
    /// it would snapshot an instance that is still being provisioned.
    #[arg(long)]
    pub stop_after_provision: bool,
    /// Seconds to wait for the builder to reach `running`.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub launch_timeout: u64,
    /// Seconds to wait for the builder to provision and power itself off.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub provision_timeout: u64,
    /// Seconds to wait for the AMI to become `available`.
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
    /// Test hook: the wait of this step keeps polling past success until cancelled or timed
    /// out, so that a test can interrupt a wait that an emulator would end at once.
    #[arg(long, hide = true, env = "PILOT_IMAGE_TEST_HOLD", value_name = "STEP")]
    pub test_hold: Option<String>,
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
    /// BIOS (the local build's GRUB in the MBR gap).
    LegacyBios,
    /// UEFI only (an EFI system partition).
    Uefi,
    /// UEFI where the instance type supports it, else BIOS (both boot paths on the disk).
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

/// What a failed (or cancelled) publish does with what it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Remove everything of the publish in every region (images, snapshots).
    Cleanup,
    /// Keep it for inspection and print the `pilot-image cleanup` command that reaps it.
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
