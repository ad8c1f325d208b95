//! pilot-image: bakes the agent, Docker, nftables, cloud-init and the Waypoint container images
//! into a VM image, so a new Pilot VM needs no installs and no pulls at boot.

pub mod aws;
pub mod cli;
pub mod local;
pub mod userdata;
