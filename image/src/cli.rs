//! The command line of the image builder.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::aws::{AwsCleanupArgs, AwsPublishArgs};
use crate::gcp::{GcpCleanupArgs, GcpPublishArgs};
use crate::userdata::UserDataInput;

#[derive(Debug, Parser)]
#[command(
    name = "pilot-image",
    version,
    about = "Build Pilot VM images (local raw/qcow2) and publish them (AWS AMI)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where `build` makes the image: only here. An AMI is the local disk published
/// (`publish --target aws`); `build --target aws` is refused by [`removed_build_target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// A bootable disk image on this machine (raw and/or qcow2).
    Local,
}

/// What `build --target aws` answers since the instance-based AMI builder was removed
/// (docs/images.md): the AMI is the disk the tests booted, published as it is.
pub const REMOVED_AWS_BUILD: &str = "build --target aws was removed (an AMI is now the tested \
     local disk, uploaded as it is): run `pilot-image build --target local` then \
     `pilot-image publish --target aws --disk OUT/NAME.raw ...`";

/// Whether `args` (the whole command line, program name first) is a `build --target aws`.
///
/// Checked on the raw arguments, before clap: an old invocation carries the builder's flags
/// too (`--agent-deb-url`, `--source-owner`, ...), and clap would refuse the first of them as
/// unknown instead of saying where the AMI build went.
pub fn removed_build_target<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> bool {
    let args: Vec<&std::ffi::OsStr> = args.iter().skip(1).map(AsRef::as_ref).collect();
    // The subcommand is the first word: the top level has no flag that takes a value.
    if args.first().is_none_or(|a| *a != "build") {
        return false;
    }
    let mut rest = args[1..].iter().take_while(|a| **a != "--");
    while let Some(arg) = rest.next() {
        if *arg == "--target=aws"
            || (*arg == "--target" && rest.next().is_some_and(|v| *v == "aws"))
        {
            return true;
        }
    }
    false
}

/// Where `publish` puts a disk built on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishTarget {
    /// An AMI: the disk uploaded as an EBS snapshot (EBS direct APIs) and registered.
    Aws,
    /// A Compute Engine image: the disk as disk.raw in a sparse tar.gz, uploaded to Cloud
    /// Storage and imported with images.insert.
    Gcp,
}

/// Flags of `build --target local` (they override the build definition's keys).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Local image (--target local)")]
pub struct LocalArgs {
    /// Debian mirror URL (default: the one in /etc/apt/sources.list.d serving the suite).
    #[arg(long)]
    pub mirror: Option<String>,
    /// Output format; repeat for both (default: raw and qcow2).
    #[arg(long = "format", value_enum)]
    pub formats: Vec<crate::local::Format>,
    /// Directory the images are written to.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Disk size in MiB.
    #[arg(long)]
    pub disk_size_mib: Option<u64>,
    /// The agent's Debian package (scripts/build-deb).
    #[arg(long)]
    pub agent_deb: Option<PathBuf>,
    /// A `docker save` tarball to bake into the image; repeat for more.
    #[arg(long = "image", value_name = "TAR")]
    pub images: Vec<PathBuf>,
    /// Image name (files NAME.raw, NAME.qcow2).
    #[arg(long)]
    pub name: Option<String>,
    /// Where root file systems are cached between builds.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// What a failed build leaves: `cleanup` removes its temporary directory; `abort` keeps it
    /// (the unpacked root file system, the half-made disk, the logs) as
    /// OUTPUT_DIR/pilot-image-failed-NAME-PID and prints where.
    #[arg(long, value_enum, default_value_t = crate::aws::OnError::Cleanup)]
    pub on_error: crate::aws::OnError,
}

impl LocalArgs {
    pub fn overrides(&self) -> crate::local::Overrides {
        crate::local::Overrides {
            mirror: self.mirror.clone(),
            formats: self.formats.clone(),
            output_dir: self.output_dir.clone(),
            disk_size_mib: self.disk_size_mib,
            agent_deb: self.agent_deb.clone(),
            images: self.images.clone(),
            name: self.name.clone(),
            cache_dir: self.cache_dir.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build an image: a local disk from a Debian root file system (publish it as an AMI with
    /// `publish --target aws`).
    Build {
        /// Where the image is made (only `local`; `aws` was removed: use `publish`).
        #[arg(long, value_enum, default_value_t = Target::Local)]
        target: Target,
        /// Build definition (YAML); defaults are embedded.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Flags of `--target local` (image/src/local).
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Publish a locally built raw disk: an EBS snapshot of it (EBS direct APIs), an AMI
    /// registered from it, copied, shared and deprecated as asked (the Bottlerocket way); or a
    /// Compute Engine image imported from it through Cloud Storage (`--target gcp`).
    ///
    /// Prints one `REGION AMI` line per region on stdout, the home region first; with
    /// `--target gcp` one `PROJECT IMAGE` line.
    Publish {
        /// Where the disk is published.
        #[arg(long, value_enum)]
        target: PublishTarget,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Flags of `--target aws` (image/src/aws/args.rs); `--target gcp` reads the shared
        /// ones (`--disk`, `--build-id`, `--on-error`, `--boot-mode`, `--arch`, the timeouts).
        #[command(flatten)]
        aws: Box<AwsPublishArgs>,
        /// Flags of `--target gcp` (image/src/gcp/args.rs).
        #[command(flatten)]
        gcp: Box<GcpPublishArgs>,
    },
    /// Remove every resource tagged (AWS) or labelled (GCP) with a build id: leftovers of a
    /// killed or `--on-error=abort` publish.
    Cleanup {
        /// The build id the resources are tagged with.
        #[arg(long)]
        build_id: String,
        /// Where the build's resources are (default: AWS, as before `--target` existed).
        #[arg(long, value_enum, default_value_t = PublishTarget::Aws)]
        target: PublishTarget,
        /// Where the EC2 API is, and the clean-up's bounds (`--cleanup-timeout` and
        /// `--poll-interval-ms` apply to `--target gcp` too).
        #[command(flatten)]
        aws: AwsCleanupArgs,
        /// Where the Google Cloud APIs are (`--target gcp`).
        #[command(flatten)]
        gcp: Box<GcpCleanupArgs>,
    },
    /// Render the cloud-init user-data a Pilot VM boots with (refuses output over 16 KiB).
    ///
    /// Tokens of --generate-endpoint-token are printed once on stderr, one `NAME SCOPE TOKEN`
    /// line each; the user-data holds only their SHA-256.
    UserData {
        /// JSON file with the same keys as the flags (`db_host`, `extra_names`, ...); a flag
        /// given on the command line wins over the file.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        #[command(flatten)]
        input: UserDataInput,
        /// Write here (atomically, mode 0600) instead of to standard output.
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: Option<PathBuf>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn build_target_aws_is_recognised_before_parsing() {
        let removed = |line: &str| removed_build_target(&line.split(' ').collect::<Vec<_>>());
        assert!(removed("pilot-image build --target aws"));
        assert!(removed("pilot-image build --target=aws"));
        assert!(removed(
            "pilot-image build --dry-run --agent-deb-url https://x/a.deb --target aws"
        ));
        assert!(!removed("pilot-image build"));
        assert!(!removed("pilot-image build --target local"));
        assert!(!removed("pilot-image publish --target aws --disk d.raw"));
        assert!(!removed("pilot-image build --name aws --target local"));
        assert!(!removed("pilot-image build -- --target aws"));
        assert!(!removed("pilot-image"));
    }
}
