//! The command line of the image builder.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::aws::{AwsBuildArgs, AwsCleanupArgs, AwsPublishArgs};
use crate::userdata::UserDataInput;

#[derive(Debug, Parser)]
#[command(
    name = "pilot-image",
    version,
    about = "Build Pilot VM images (local raw/qcow2, AWS AMI)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// A bootable disk image on this machine (raw and/or qcow2).
    Local,
    /// An AMI made through the EC2 API from a builder instance.
    Aws,
}

/// Where `publish` puts a disk built on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishTarget {
    /// An AMI: the disk uploaded as an EBS snapshot (EBS direct APIs) and registered.
    Aws,
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
    /// Build an image: a local disk from a Debian root file system, or an AWS AMI.
    Build {
        /// Where the image is made.
        #[arg(long, value_enum, default_value_t = Target::Local)]
        target: Target,
        /// Build definition (YAML); defaults are embedded.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Flags of `--target aws` (image/src/aws/args.rs); boxed, they are the bulk of the enum.
        #[command(flatten)]
        aws: Box<AwsBuildArgs>,
        /// Flags of `--target local` (image/src/local).
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Publish a locally built raw disk: an EBS snapshot of it (EBS direct APIs), an AMI
    /// registered from it, copied, shared and deprecated as asked (the Bottlerocket way).
    ///
    /// Prints one `REGION AMI` line per region on stdout, the home region first.
    Publish {
        /// Where the disk is published.
        #[arg(long, value_enum)]
        target: PublishTarget,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Flags of `--target aws` (image/src/aws/args.rs).
        #[command(flatten)]
        aws: Box<AwsPublishArgs>,
    },
    /// Remove every resource tagged with a build id (leftovers of a killed AWS build).
    Cleanup {
        /// The build id the resources are tagged with.
        #[arg(long)]
        build_id: String,
        /// Where the EC2 API is, and the clean-up's bounds.
        #[command(flatten)]
        aws: AwsCleanupArgs,
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
}
