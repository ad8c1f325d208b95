//! pilot-agent: converges a Pilot VM to a known state and keeps it there.
//!
//! The binary (`main.rs`) is a thin shell over this library: [`cli`] defines the command line,
//! which is also the source of the man page and of `--help`.

pub mod cli;
