//! The `pilot-agent` binary: parse the command line, set up logging to stderr, run one
//! command of the library and turn its result into an exit code (0 healthy, 1 error,
//! 2 degraded, as `cloud-init status`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use pilot_agent::cli::{Cli, Command, ConfigCommand};
use pilot_agent::commands;
use pilot_agent::config::ConfigError;
use pilot_agent::engine;
use pilot_agent::plan::UpOptions;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Whether the operator chose the configuration (`--config` or `PILOT_AGENT_CONFIG`):
    // `status` falls back to defaults only for the default path.
    let config_explicit = !matches!(
        matches.value_source("config"),
        None | Some(ValueSource::DefaultValue)
    );
    init_logging();
    match run(cli, config_explicit) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // anyhow's alternate form: "context: cause: cause".
            eprintln!("pilot-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli, config_explicit: bool) -> anyhow::Result<u8> {
    match cli.command {
        Command::Config(ConfigCommand::Validate { file }) => {
            let v = commands::validate::validate(&file);
            for line in &v.lines {
                println!("{line}");
            }
            Ok(if v.valid { 0 } else { 1 })
        }
        Command::Up(args) => {
            let options = UpOptions {
                rotate_db_password: args.rotate_db_password,
            };
            let rt = runtime()?;
            match rt.block_on(commands::up::up(&cli.config, options)) {
                Ok(status) => {
                    let code = engine::exit_code(&status);
                    tracing::info!(condition = ?status.condition, "converge finished");
                    Ok(code)
                }
                Err(commands::up::UpError::Config(e)) => Err(config_error(e)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Firewall => {
            let rt = runtime()?;
            match rt.block_on(commands::firewall::firewall(&cli.config)) {
                Ok(report) => {
                    tracing::info!("{}", report.summary());
                    Ok(0)
                }
                Err(commands::firewall::FirewallCommandError::Config { error, applied }) => {
                    match applied {
                        Ok(report) => tracing::warn!(
                            "the configuration does not load: fail-closed {}",
                            report.summary()
                        ),
                        Err(e) => tracing::error!(
                            "the configuration does not load, and the fail-closed table \
                             could not be applied either: {e}"
                        ),
                    }
                    Err(config_error(error))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Status(args) => {
            let target = commands::status::Target::resolve(&cli.config, config_explicit)
                .map_err(config_error)?;
            if args.history {
                if let Some(warning) = &target.warning {
                    eprintln!("pilot-agent: {warning}");
                }
                // The history is a record of the past: a configuration that does not load
                // now is warned about, not turned into the exit code (see `history`).
                let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
                let report = commands::status::history(&target, limit, args.json)?;
                print!("{}", report.output);
                for note in &report.notes {
                    eprintln!("pilot-agent: {note}");
                }
                return Ok(report.exit_code);
            }
            let options = commands::status::StatusOptions {
                json: args.json,
                long: args.long,
                wait: args.wait.then(|| Duration::from_secs(args.timeout)),
            };
            if let Some(warning) = &target.warning {
                eprintln!("pilot-agent: {warning}");
            }
            let report = commands::status::status(&target, &options)?;
            print!("{}", report.output);
            for note in &report.notes {
                eprintln!("pilot-agent: {note}");
            }
            // A configuration that does not load: no agent can run on it, so the host is in
            // error whatever the last status file says.
            Ok(if target.warning.is_some() {
                1
            } else {
                report.exit_code
            })
        }
        Command::Credentials(args) => match commands::credentials::render(&cli.config, args.json) {
            Ok(out) => {
                print!("{out}");
                Ok(0)
            }
            Err(commands::credentials::CredentialsError::Config(e)) => Err(config_error(e)),
            Err(e) => Err(e.into()),
        },
        Command::Backup(args) => {
            let rt = runtime()?;
            match rt.block_on(commands::backup::backup(&cli.config, args.output)) {
                Ok(taken) => {
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&taken)?);
                    } else {
                        println!("{}", taken.file.display());
                        eprintln!(
                            "pilot-agent: backed up to {}",
                            pilot_agent::backup::describe(&taken)
                        );
                    }
                    Ok(0)
                }
                Err(commands::backup::BackupCommandError::Config(e)) => Err(config_error(e)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Restore(args) => {
            let rt = runtime()?;
            match rt.block_on(commands::backup::restore(&cli.config, &args.file)) {
                Ok(restored) => {
                    for line in restored.report.lines() {
                        println!("{line}");
                    }
                    let code = match &restored.status {
                        Some(status) => {
                            println!(
                                "converged after the restore: {:?} ({:.1}s in all)",
                                status.condition,
                                restored.took.as_secs_f64()
                            );
                            engine::exit_code(status)
                        }
                        None => {
                            println!(
                                "the running service converges the host (it held the lock \
                                 again first); check `pilot-agent status --wait`"
                            );
                            0
                        }
                    };
                    Ok(code)
                }
                Err(commands::backup::BackupCommandError::Config(e)) => Err(config_error(e)),
                Err(e) => Err(e.into()),
            }
        }
        Command::CollectLogs(args) => {
            let rt = runtime()?;
            match rt.block_on(commands::collect_logs::collect_logs(
                &cli.config,
                config_explicit,
                args.output.as_deref(),
            )) {
                Ok(done) => {
                    if let Some(warning) = &done.warning {
                        eprintln!("pilot-agent: {warning}");
                    }
                    for note in &done.notes {
                        eprintln!("pilot-agent: {note}");
                    }
                    println!("{}", done.path.display());
                    Ok(0)
                }
                Err(commands::collect_logs::CollectLogsError::Config(e)) => Err(config_error(e)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Man(args) => {
            for page in pilot_agent::cli::write_man_pages(&args.out)
                .with_context(|| format!("cannot write man pages into {}", args.out.display()))?
            {
                println!("{}", page.display());
            }
            Ok(0)
        }
        Command::Run => {
            let rt = runtime()?;
            let result = rt.block_on(commands::run::run(&cli.config));
            // A pass aborted at shutdown may leave a blocking task (key generation) behind;
            // do not let it hold the exit past systemd's stop timeout.
            rt.shutdown_timeout(Duration::from_secs(5));
            match result {
                Ok(summary) => {
                    tracing::info!(
                        passes = summary.run.passes,
                        repairs = summary.run.repairs,
                        aborted_pass = summary.aborted_pass,
                        "stopped by {}",
                        summary.stopped_by
                    );
                    Ok(0)
                }
                Err(commands::run::RunError::Config(e)) => Err(config_error(e)),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// A configuration error names every problem, one per line, so print them as they are.
fn config_error(e: ConfigError) -> anyhow::Error {
    match &e {
        ConfigError::Invalid { diagnostics, .. } => {
            for line in e.to_string().lines() {
                eprintln!("{line}");
            }
            anyhow::anyhow!(
                "the configuration has {} problem(s); nothing was changed",
                diagnostics.len()
            )
        }
        // Its message already names the cause; as an anyhow chain it would print it twice.
        ConfigError::Read { .. } => anyhow::anyhow!("{e}"),
    }
}

/// One thread: the agent's work is I/O-bound and small; blocking work goes to
/// `spawn_blocking`. It also keeps the long-running agent's memory low.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PILOT_AGENT_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
