//! The command-line flags of `pilot-image publish --target gcp` and `pilot-image cleanup
//! --target gcp`. The flags that `publish` shares with `--target aws` (`--disk`, `--build-id`,
//! `--on-error`, `--image-timeout`, `--cleanup-timeout`, `--poll-interval-ms`, `--arch`) are
//! [`crate::aws::AwsPublishArgs`]'s: one command line, one spelling.

use std::path::PathBuf;

/// Cloud Storage's JSON API (and the host of `https://storage.googleapis.com/BUCKET/OBJECT`,
/// the form `rawDisk.source` takes).
pub const STORAGE_ENDPOINT: &str = "https://storage.googleapis.com";
/// Compute Engine's v1 REST API.
pub const COMPUTE_ENDPOINT: &str = "https://compute.googleapis.com/compute/v1";

/// Where the APIs are and who calls them.
#[derive(Debug, Clone, clap::Args)]
pub struct GcpConnection {
    /// Google Cloud project of the image (env GOOGLE_CLOUD_PROJECT).
    #[arg(long, value_name = "PROJECT", env = "GOOGLE_CLOUD_PROJECT")]
    pub project: Option<String>,
    /// Cloud Storage bucket the disk's tarball is uploaded to (it must exist; the objects go
    /// under `pilot-image/BUILD_ID/`).
    #[arg(long, value_name = "BUCKET")]
    pub bucket: Option<String>,
    /// File holding an OAuth 2.0 access token (e.g. `gcloud auth print-access-token >FILE`).
    /// Default: env GOOGLE_OAUTH_ACCESS_TOKEN, else the GCE metadata server's service-account
    /// token when running on Compute Engine.
    #[arg(long, value_name = "FILE")]
    pub access_token_file: Option<PathBuf>,
    /// Cloud Storage endpoint (an emulator, e.g. http://127.0.0.1:9023).
    #[arg(long, value_name = "URL", default_value = STORAGE_ENDPOINT)]
    pub storage_endpoint: String,
    /// Compute Engine endpoint, up to and including the version (`.../compute/v1`).
    #[arg(long, value_name = "URL", default_value = COMPUTE_ENDPOINT)]
    pub compute_endpoint: String,
}

/// The flags of `publish --target gcp` besides the shared ones.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "GCP target (--target gcp)")]
pub struct GcpPublishArgs {
    #[command(flatten)]
    pub connection: GcpConnection,
    /// Name of the image (default: the disk's file name and the build id, `NAME-BUILD_ID`);
    /// `[a-z]([-a-z0-9]{0,61}[a-z0-9])?`.
    #[arg(long, value_name = "NAME")]
    pub image_name: Option<String>,
    /// Image family (instances created from the family get its newest image).
    #[arg(long, value_name = "FAMILY")]
    pub family: Option<String>,
    /// Another label on the image, `KEY=VALUE` (repeatable; GCP label rules; the
    /// `pilot-build-id` label is always set).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Where the image is stored (a multi-region such as `eu`, or a region; default: the
    /// multi-region nearest the bucket).
    #[arg(long, value_name = "LOCATION")]
    pub storage_location: Option<String>,
    /// Encrypt the image with this Cloud KMS key (customer-managed, CMEK; Packer's
    /// `image_encryption_key`): `projects/P/locations/L/keyRings/R/cryptoKeys/K`. Compute
    /// Engine's service agent needs `roles/cloudkms.cryptoKeyEncrypterDecrypter` on it.
    /// Default: Google-managed encryption.
    #[arg(long, value_name = "KEY")]
    pub kms_key_name: Option<String>,
    /// Keep the tarball in the bucket once the image is READY (by default it is deleted: the
    /// image holds its own copy of the disk, and the tarball would only cost storage).
    #[arg(long)]
    pub keep_object: bool,
    /// Size of each resumable-upload request, in KiB: a multiple of 256 (Cloud Storage's
    /// rule). Larger requests are faster; smaller ones resend less after an error.
    #[arg(long, value_name = "KIB", default_value_t = 16384)]
    pub upload_chunk_kib: u64,
}

/// The flags of `cleanup --target gcp` besides `--build-id` and the shared bounds.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "GCP target (--target gcp)")]
pub struct GcpCleanupArgs {
    #[command(flatten)]
    pub connection: GcpConnection,
}
