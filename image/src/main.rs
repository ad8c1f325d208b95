//! The `pilot-image` binary: parses the command line and dispatches to the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pilot_image::aws::{self, AwsBuildArgs, AwsCleanupArgs, AwsError};
use pilot_image::cli::{Cli, Command, LocalArgs, Target};
use pilot_image::local::{self, Definition, LocalError, Plan};
use pilot_image::userdata::{self, UserDataError, UserDataInput};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::UserData {
            from,
            input,
            output,
        } => match user_data(from, input, output) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pilot-image user-data: {e}");
                ExitCode::from(1)
            }
        },
        Command::Build {
            target: Target::Aws,
            dry_run,
            aws,
            ..
        } => aws_build(*aws, dry_run),
        Command::Cleanup { build_id, aws } => aws_cleanup(&build_id, &aws),
        Command::Build {
            target: Target::Local,
            file,
            dry_run,
            local,
            ..
        } => match build_local(file, dry_run, &local) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pilot-image build: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// Validates everything and renders before anything is written, so a refused render (bad
/// flag, over 16 KiB) leaves no output file.
fn user_data(
    from: Option<PathBuf>,
    flags: UserDataInput,
    output: Option<PathBuf>,
) -> Result<(), UserDataError> {
    let input = match from {
        Some(path) => flags.over(UserDataInput::from_file(&path)?),
        None => flags,
    };
    let text = userdata::render(&input.validate()?)?;
    match output {
        Some(path) => userdata::write_atomic(&path, &text),
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .map_err(|source| UserDataError::Write {
                path: PathBuf::from("<stdout>"),
                source,
            }),
    }
}

/// `build --target aws`: the build id goes to stderr before anything else, so that an operator
/// can always run `cleanup --build-id`; the AMI id alone goes to stdout. Exit 2 when the flags
/// are refused (nothing was created), 130 when cancelled by a signal (like a shell), 1 on any
/// other failure (after the clean-up).
fn aws_build(args: AwsBuildArgs, dry_run: bool) -> ExitCode {
    let build_id = args.build_id.clone().unwrap_or_else(aws::new_build_id);
    eprintln!(
        "pilot-image: build id {build_id} (leftovers: pilot-image cleanup --build-id {build_id})"
    );
    let plan = match aws::build::Plan::new(args, build_id) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pilot-image build: {e}");
            return ExitCode::from(2);
        }
    };
    if dry_run {
        print!("{}", plan.describe());
        return ExitCode::SUCCESS;
    }
    match aws::build_blocking(plan) {
        Ok(built) => {
            println!("{}", built.image_id);
            ExitCode::SUCCESS
        }
        Err(AwsError::Cancelled) => {
            eprintln!("pilot-image build: cancelled; everything of the build was removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("pilot-image build: {e}");
            ExitCode::from(1)
        }
    }
}

fn aws_cleanup(build_id: &str, args: &AwsCleanupArgs) -> ExitCode {
    match aws::cleanup_blocking(build_id, args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pilot-image cleanup: {e}");
            ExitCode::from(1)
        }
    }
}

/// `build --target local`: the plan (printed with --dry-run), else the build and its summary.
fn build_local(file: Option<PathBuf>, dry_run: bool, args: &LocalArgs) -> Result<(), LocalError> {
    let def = Definition::load(file.as_deref(), args.overrides())?;
    let plan = Plan::new(def)?;
    if dry_run {
        print!("{}", plan.render());
        return Ok(());
    }
    let report = local::build(&plan)?;
    println!(
        "built in {:.1}s (root file system {}):",
        report.total.as_secs_f64(),
        if report.rootfs_cached {
            "from the cache"
        } else {
            "made and cached"
        }
    );
    for (step, took) in &report.steps {
        println!("  {step:<10} {:>7.1}s", took.as_secs_f64());
    }
    for (format, path, bytes) in &report.outputs {
        println!(
            "  {format:<6} {} ({} MiB on disk)",
            path.display(),
            bytes / (1024 * 1024)
        );
    }
    Ok(())
}
