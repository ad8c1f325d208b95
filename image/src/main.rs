//! The `pilot-image` binary: parses the command line and dispatches to the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pilot_image::cli::{Cli, Command};
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
        Command::Build { .. } | Command::Cleanup { .. } => {
            eprintln!("pilot-image: this command is not implemented yet");
            ExitCode::from(1)
        }
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
