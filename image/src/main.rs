//! The `pilot-image` binary: parses the command line and dispatches to the library.
//!
//! Results go to stdout (the AMI id, a plan, a build summary, rendered user-data); progress and
//! errors are `tracing` events, written to stderr one line each by [`Human`]: `pilot-image:
//! MESSAGE`, or `pilot-image COMMAND: MESSAGE` for the events that carry a `command` field.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pilot_image::aws::{self, AwsCleanupArgs, AwsPublishArgs};
use pilot_image::cli::{self, Cli, Command, LocalArgs, PublishTarget, Target};
use pilot_image::gcp::{self, GcpCleanupArgs, GcpPublishArgs};
use pilot_image::local::{self, Definition, LocalError, Plan};
use pilot_image::userdata::{self, UserDataError, UserDataInput};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber, error};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

fn main() -> ExitCode {
    report_to_stderr();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Before clap: an old `build --target aws` line also carries the builder's flags, which
    // clap would refuse one by one; say where the AMI build went instead.
    if cli::removed_build_target(&args) {
        error!(command = "build", "{}", cli::REMOVED_AWS_BUILD);
        return ExitCode::from(2);
    }
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::UserData {
            from,
            input,
            output,
        } => match user_data(from, input, output) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(command = "user-data", "{e}");
                ExitCode::from(1)
            }
        },
        Command::Publish {
            target: PublishTarget::Aws,
            dry_run,
            aws,
            ..
        } => aws_publish(*aws, dry_run),
        Command::Publish {
            target: PublishTarget::Gcp,
            dry_run,
            aws,
            gcp,
        } => gcp_publish(&aws, *gcp, dry_run),
        Command::Cleanup {
            build_id,
            target: PublishTarget::Aws,
            aws,
            ..
        } => aws_cleanup(&build_id, &aws),
        Command::Cleanup {
            build_id,
            target: PublishTarget::Gcp,
            aws,
            gcp,
        } => gcp_cleanup(&build_id, &aws, &gcp),
        Command::Build {
            target: Target::Local,
            file,
            dry_run,
            local,
        } => match build_local(file, dry_run, &local) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(command = "build", "{e}");
                ExitCode::from(1)
            }
        },
    }
}

/// Validates everything and renders before anything is written, so a refused render (bad
/// flag, over 16 KiB) leaves no output file and prints no token. Generated endpoint tokens go
/// to stderr, one `NAME SCOPE TOKEN` line each, before the user-data is written: a token that
/// could not be printed leaves no user-data holding its hash.
fn user_data(
    from: Option<PathBuf>,
    flags: UserDataInput,
    output: Option<PathBuf>,
) -> Result<(), UserDataError> {
    let input = match from {
        Some(path) => flags.over(UserDataInput::from_file(&path)?),
        None => flags,
    };
    let spec = input.validate()?;
    let text = userdata::render(&spec)?;
    let lines = userdata::token_lines(&spec.endpoint_tokens);
    if !lines.is_empty() {
        let mut err = std::io::stderr().lock();
        err.write_all(lines.as_bytes())
            .and_then(|()| err.flush())
            .map_err(|source| UserDataError::PrintTokens { source })?;
    }
    if spec.server.is_none() {
        for t in spec
            .endpoint_tokens
            .iter()
            .filter(|t| t.generated.is_some() && t.scope == userdata::Scope::Runner)
        {
            tracing::info!(
                command = "user-data",
                "endpoint token {} (scope runner) is for runner-only hosts: give it to their \
                 user-data as the one line of --server-token-file (pilot-image user-data \
                 --role runner)",
                t.name
            );
        }
    }
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

/// `publish --target aws`: the build id goes to stderr before anything else, so that an
/// operator can always run `cleanup --build-id`; stdout gets one `REGION AMI` line per region.
/// Exit 2 when the flags are refused (nothing was created), 130 when cancelled by a signal
/// (like a shell), 1 on any other failure (after the clean-up unless `--on-error=abort`).
#[cfg(feature = "aws")]
fn aws_publish(args: AwsPublishArgs, dry_run: bool) -> ExitCode {
    let build_id = args.build_id.clone().unwrap_or_else(aws::new_build_id);
    tracing::info!("build id {build_id} (leftovers: pilot-image cleanup --build-id {build_id})");
    let plan = match aws::publish::Plan::new(args, build_id) {
        Ok(p) => p,
        Err(e) => {
            error!(command = "publish", "{e}");
            return ExitCode::from(2);
        }
    };
    if dry_run {
        print!("{}", plan.describe());
        return ExitCode::SUCCESS;
    }
    let keep = plan.args.on_error == aws::OnError::Abort;
    match aws::publish_blocking(plan) {
        Ok(published) => {
            let mut out = std::io::stdout().lock();
            for (region, image) in &published.images {
                if writeln!(out, "{region} {image}").is_err() {
                    return ExitCode::from(1);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => publish_failed(&e, matches!(e, aws::AwsError::Cancelled), keep),
    }
}

/// A failed publish of either target: 130 with what was kept or removed after a signal, else
/// 1 with the error.
#[cfg(any(feature = "aws", feature = "gcp"))]
fn publish_failed(e: &dyn std::fmt::Display, cancelled: bool, keep: bool) -> ExitCode {
    if !cancelled {
        error!(command = "publish", "{e}");
        return ExitCode::from(1);
    }
    error!(
        command = "publish",
        "cancelled; {}",
        if keep {
            "what the publish made was kept (--on-error=abort)"
        } else {
            "everything of the publish was removed"
        }
    );
    ExitCode::from(130)
}

#[cfg(feature = "aws")]
fn aws_cleanup(build_id: &str, args: &AwsCleanupArgs) -> ExitCode {
    match aws::cleanup_blocking(build_id, args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            error!(command = "cleanup", "{e}");
            ExitCode::from(1)
        }
    }
}

/// Without the `aws` feature: refused like a bad flag (exit 2).
#[cfg(not(feature = "aws"))]
fn aws_publish(_args: AwsPublishArgs, _dry_run: bool) -> ExitCode {
    error!(command = "publish", "{}", aws::NO_AWS_SUPPORT);
    ExitCode::from(2)
}

/// Without the `aws` feature: a failed clean-up (exit 1, its only failure code).
#[cfg(not(feature = "aws"))]
fn aws_cleanup(_build_id: &str, _args: &AwsCleanupArgs) -> ExitCode {
    error!(command = "cleanup", "{}", aws::NO_AWS_SUPPORT);
    ExitCode::from(1)
}

/// `publish --target gcp`: as `publish --target aws` (build id first on stderr, exit 2 for
/// refused flags, 130 on a signal, 1 on a failure); stdout gets one `PROJECT IMAGE` line.
#[cfg(feature = "gcp")]
fn gcp_publish(shared: &AwsPublishArgs, args: GcpPublishArgs, dry_run: bool) -> ExitCode {
    let build_id = shared.build_id.clone().unwrap_or_else(gcp::new_build_id);
    tracing::info!(
        "build id {build_id} (leftovers: pilot-image cleanup --target gcp --build-id {build_id} \
         --project {} --bucket {})",
        args.connection.project.as_deref().unwrap_or("PROJECT"),
        args.connection.bucket.as_deref().unwrap_or("BUCKET"),
    );
    let plan = match gcp::Plan::new(shared, args, build_id) {
        Ok(p) => p,
        Err(e) => {
            error!(command = "publish", "{e}");
            return ExitCode::from(2);
        }
    };
    if dry_run {
        print!("{}", plan.describe());
        return ExitCode::SUCCESS;
    }
    let keep = plan.on_error == aws::OnError::Abort;
    match gcp::publish_blocking(plan) {
        Ok(p) => {
            if let Some(link) = &p.self_link {
                tracing::info!("image {link}");
            }
            match writeln!(std::io::stdout().lock(), "{} {}", p.project, p.image) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            }
        }
        Err(e) => publish_failed(&e, matches!(e, gcp::GcpError::Cancelled), keep),
    }
}

/// `cleanup --target gcp`: the bounds come from the shared `--cleanup-timeout` and
/// `--poll-interval-ms`.
#[cfg(feature = "gcp")]
fn gcp_cleanup(build_id: &str, shared: &AwsCleanupArgs, args: &GcpCleanupArgs) -> ExitCode {
    let timeout = std::time::Duration::from_secs(shared.cleanup_timeout);
    let poll = std::time::Duration::from_millis(shared.poll_interval_ms.max(1));
    match gcp::cleanup_blocking(build_id, &args.connection, timeout, poll) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e @ gcp::GcpError::Invalid { .. }) => {
            error!(command = "cleanup", "{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            error!(command = "cleanup", "{e}");
            ExitCode::from(1)
        }
    }
}

/// Without the `gcp` feature: refused like a bad flag (exit 2).
#[cfg(not(feature = "gcp"))]
fn gcp_publish(_shared: &AwsPublishArgs, _args: GcpPublishArgs, _dry_run: bool) -> ExitCode {
    error!(command = "publish", "{}", gcp::NO_GCP_SUPPORT);
    ExitCode::from(2)
}

/// Without the `gcp` feature: a failed clean-up (exit 1).
#[cfg(not(feature = "gcp"))]
fn gcp_cleanup(_build_id: &str, _shared: &AwsCleanupArgs, _args: &GcpCleanupArgs) -> ExitCode {
    error!(command = "cleanup", "{}", gcp::NO_GCP_SUPPORT);
    ExitCode::from(1)
}

/// `build --target local`: the plan (printed with --dry-run), else the build and its summary.
fn build_local(file: Option<PathBuf>, dry_run: bool, args: &LocalArgs) -> Result<(), LocalError> {
    let def = Definition::load(file.as_deref(), args.overrides())?;
    let plan = Plan::new(def)?;
    if dry_run {
        print!("{}", plan.render());
        return Ok(());
    }
    let on_failure = match args.on_error {
        aws::OnError::Cleanup => local::OnFailure::Remove,
        aws::OnError::Abort => local::OnFailure::Keep,
    };
    let report = local::build(&plan, on_failure)?;
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

/// Installs the one reporter: this crate's events (the library's progress and this file's
/// errors) at INFO and above, as [`Human`] lines on stderr. Other crates' events (the AWS SDK
/// logs through `tracing` too) are not shown.
fn report_to_stderr() {
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(Human);
    // Fails only if a subscriber is already set, and then that one reports.
    let _ = tracing_subscriber::registry()
        .with(layer)
        .with(Targets::new().with_target("pilot_image", Level::INFO))
        .try_init();
}

/// One event, one line: `pilot-image: MESSAGE`, or `pilot-image COMMAND: MESSAGE` when the
/// event has a `command` field; any other field follows as ` NAME=VALUE`. No level, time or
/// target: the lines read as they always have, and tests and operators match them.
struct Human;

impl<S, N> FormatEvent<S, N> for Human
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = HumanFields::default();
        event.record(&mut fields);
        match &fields.command {
            Some(command) => write!(writer, "pilot-image {command}: ")?,
            None => write!(writer, "pilot-image: ")?,
        }
        writeln!(writer, "{}{}", fields.message, fields.rest)
    }
}

#[derive(Default)]
struct HumanFields {
    message: String,
    command: Option<String>,
    rest: String,
}

impl Visit for HumanFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "command" => self.command = Some(value.to_owned()),
            name => self.rest.push_str(&format!(" {name}={value}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            // The message's Debug is its text (format_args!).
            "message" => self.message = format!("{value:?}"),
            "command" => self.command = Some(format!("{value:?}")),
            name => self.rest.push_str(&format!(" {name}={value:?}")),
        }
    }
}
