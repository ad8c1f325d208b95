use std::process::ExitCode;

use clap::Parser;
use pilot_agent::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Up(_) | Command::Run | Command::Firewall | Command::Status(_)
        | Command::Credentials(_) | Command::Config(_) => {
            eprintln!("pilot-agent: this command is not implemented yet");
            ExitCode::from(1)
        }
    }
}
