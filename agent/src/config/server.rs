//! `role:` and `server:` — whether this host runs the Waypoint server (the default) or only
//! runners against the server of another Pilot VM, and how a runner-only host reaches that VM.
//!
//! ```yaml
//! role: runner
//! server:
//!   endpoint: 10.0.1.5:8443            # the server VM's pilot-agent endpoint (HOST[:PORT])
//!   token_file: /etc/pilot/server-token  # its bearer token, one line, mode 0600
//!   ca_sha256: "3F:9A:…"               # SHA-256 of the server VM's agent CA certificate
//!   deregister: shutdown               # when `run` stops: have the server forget this
//!                                      # host's runners (shutdown | stop | never)
//! ```
//!
//! The fingerprint is what makes the first contact safe: the runner host trusts exactly the CA
//! it names (`pilot-agent credentials` on the server VM prints it), so a man in the middle
//! cannot hand out a Waypoint token of its own. The configuration carries the token's path,
//! never the token.

use std::path::PathBuf;
use std::str::FromStr;

use super::schema::{self, Node, Walker};
pub use pilot_values::Role;
use pilot_values::{Fingerprint, ServerEndpoint};

/// Where user-data puts the server VM's endpoint token on a runner-only host.
pub const DEFAULT_TOKEN_FILE: &str = "/etc/pilot/server-token";

const KEYS: &[&str] = &[
    "endpoint",
    "token_file",
    "ca_sha256",
    "waypoint_address",
    "timeout_secs",
    "deregister",
];

/// When a runner-only host's `run`, stopping, removes its runners and has the server VM
/// forget them (`server.deregister`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Deregister {
    /// Only when the machine itself is shutting down (systemd says `stopping`): an instance
    /// that an autoscaling group terminates leaves no runner behind on the server, while a
    /// restart of the service (an upgrade) keeps the runners running.
    #[default]
    Shutdown,
    /// Whenever `run` stops (hosts without systemd).
    Stop,
    Never,
}

impl FromStr for Deregister {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shutdown" => Ok(Deregister::Shutdown),
            "stop" => Ok(Deregister::Stop),
            "never" => Ok(Deregister::Never),
            _ => Err(format!(
                "server.deregister: expected shutdown, stop or never, got \"{s}\""
            )),
        }
    }
}

/// How a runner-only host reaches the server VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLink {
    /// The server VM's HTTPS endpoint (`pilot-agent run`'s `endpoint:`).
    pub endpoint: ServerEndpoint,
    /// File holding the bearer token of that endpoint (one line; 0600).
    pub token_file: PathBuf,
    /// SHA-256 of the server VM's agent CA certificate (DER).
    pub ca_sha256: Fingerprint,
    /// `HOST:PORT` the runners dial for Waypoint; default: the address the server VM's
    /// credentials name (its advertise address).
    pub waypoint_address: Option<String>,
    /// Bound on one request to the server VM.
    pub timeout_secs: u64,
    /// When `run` stopping has the server VM forget this host's runners.
    pub deregister: Deregister,
}

pub fn read_role(w: &mut Walker, node: &Node<'_>) -> Role {
    match schema::string(w, node, "role").map(|s| s.parse::<Role>()) {
        None => Role::Server,
        Some(Ok(role)) => role,
        Some(Err(why)) => {
            w.error(node, format!("role: {why}"));
            Role::Server
        }
    }
}

/// Reads `server:`; `None` when a required key is missing or wrong (each one reported).
pub fn read(w: &mut Walker, node: &Node<'_>) -> Option<ServerLink> {
    let f = w.mapping(node, "server", KEYS)?;
    let endpoint = match f.get("endpoint") {
        None => {
            w.error(
                node,
                "server.endpoint is required: the server VM's pilot-agent endpoint, HOST[:PORT]",
            );
            None
        }
        Some(n) => schema::non_empty_string(w, n, "server.endpoint").and_then(|s| {
            match ServerEndpoint::from_str(&s) {
                Ok(e) => Some(e),
                Err(why) => {
                    w.error(n, format!("server.endpoint: {why}, got \"{s}\""));
                    None
                }
            }
        }),
    };
    let ca_sha256 = match f.get("ca_sha256") {
        None => {
            w.error(
                node,
                "server.ca_sha256 is required: the SHA-256 fingerprint of the server VM's CA \
                 (`pilot-agent credentials` on the server VM prints it)",
            );
            None
        }
        Some(n) => schema::non_empty_string(w, n, "server.ca_sha256").and_then(|s| {
            match Fingerprint::from_str(&s) {
                Ok(fp) => Some(fp),
                Err(_) => {
                    w.error(
                        n,
                        format!(
                            "server.ca_sha256: expected 64 hex digits (colons allowed), got \"{s}\""
                        ),
                    );
                    None
                }
            }
        }),
    };
    let token_file = f
        .path(w, "token_file")
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_FILE));
    let waypoint_address = f.get("waypoint_address").and_then(|n| {
        let s = schema::non_empty_string(w, n, "server.waypoint_address")?;
        match pilot_values::parse_host_port(&s, None) {
            Ok(_) => Some(s),
            Err(why) => {
                w.error(n, format!("server.waypoint_address: {why}, got \"{s}\""));
                None
            }
        }
    });
    let timeout_secs = f
        .integer(w, "timeout_secs", 1, 300)
        // Range-checked above.
        .map_or(10, |s| s as u64);
    let deregister = f.get("deregister").map_or(Deregister::default(), |n| {
        match schema::string(w, n, "server.deregister").map(|s| s.parse::<Deregister>()) {
            Some(Ok(d)) => d,
            Some(Err(why)) => {
                w.error(n, why);
                Deregister::default()
            }
            None => Deregister::default(),
        }
    });
    Some(ServerLink {
        endpoint: endpoint?,
        token_file,
        ca_sha256: ca_sha256?,
        waypoint_address,
        timeout_secs,
        deregister,
    })
}
