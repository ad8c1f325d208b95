//! pilot-agent: converges a Pilot VM to a known state and keeps it there.
//!
//! The binary (`main.rs`) is a thin shell over this library: [`cli`] defines the command line,
//! which is also the source of the man page and of `--help`.

pub mod cli;
pub mod commands;
pub mod config;
pub mod docker;
pub mod engine;
pub mod firewall;
pub mod fsutil;
pub mod host;
pub mod pki;
pub mod plan;
pub mod status;
pub mod database;
