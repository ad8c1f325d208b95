//! The command line of the image builder.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
    },
    /// Remove every resource tagged with a build id (leftovers of a killed AWS build).
    Cleanup {
        /// The build id the resources are tagged with.
        #[arg(long)]
        build_id: String,
    },
    /// Render the cloud-init user-data a Pilot VM boots with (refuses output over 16 KiB).
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
