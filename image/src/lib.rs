//! pilot-image: bakes the agent, Docker, nftables, cloud-init and the Waypoint container images
//! into a VM image, so a new Pilot VM needs no installs and no pulls at boot.
//!
//! Progress is reported as `tracing` events (INFO, WARN for failures), whose message is the
//! whole line; the binary (src/main.rs) writes them to stderr as `pilot-image: MESSAGE`.

pub mod aws;
pub mod cli;
pub mod gcp;
pub mod local;
pub mod partitions;
#[cfg(any(feature = "aws", feature = "gcp"))]
pub mod steps;
pub mod userdata;
