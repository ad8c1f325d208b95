use std::process::ExitCode;

use clap::Parser;
use pilot_image::cli::Cli;

fn main() -> ExitCode {
    let _cli = Cli::parse();
    eprintln!("pilot-image: this command is not implemented yet");
    ExitCode::from(1)
}
