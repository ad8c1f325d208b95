//! The commands behind the CLI, as library functions: `main.rs` only parses arguments, sets
//! up logging, calls one of these and turns the result into an exit code.

pub mod backup;
pub mod collect_logs;
pub mod credentials;
pub mod firewall;
pub mod run;
pub mod status;
pub mod up;
pub mod validate;
