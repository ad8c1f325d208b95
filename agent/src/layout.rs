//! The on-disk contract: every file the agent keeps under `STATE_DIR` (`state_dir:`, by default
//! `/var/lib/pilot-agent`), named in one place.
//!
//! ```text
//! STATE_DIR/                         0700 (as the package installs it)
//!   lock                             one converge at a time (`up`, `run`): an flock, no content
//!   status.json                      what `pilot-agent status` reads; no secret (0644)
//!   history.jsonl                    the newest converge passes, one JSON line each, for
//!                                    `pilot-agent status --history` (0600)
//!   instance-id                      the clone marker: the instance this state belongs to
//!   identity.json                    the last identity the metadata service gave (0644)
//!   firewall.json                    the agent's nftables rules as nft listed them after the
//!                                    last apply: what rules changed in place are found by
//!   pki/                             0700, see PkiLayout
//!     ca/ca.pem, ca/ca-key.pem       the agent's CA (key 0600)
//!     server/{ca,cert,key}.pem       the server certificate of dockerd and of the HTTPS endpoint
//!                                    (docker CLI layout; keys 0600)
//!     runner/{ca,cert,key}.pem       the runners' client certificate, mounted read-only
//!     operator/{ca,cert,key}.pem     the operators' client certificate
//!     waypoint/{ca,cert,key}.pem     the Waypoint server's certificate (serverAuth, the host's
//!                                    names, `waypoint-server`, the Pilot network's gateway)
//!   database/                        0700
//!     password                       the application role's password (0600)
//!     password.pending               a rotation's new password until ALTER ROLE committed
//!   waypoint/                        0700; every token 0600
//!     bootstrap-token                the server's bootstrap token (a server can be
//!                                    bootstrapped once: losing it loses the server)
//!     runner-N-token                 runner N's token
//!     advertise-address              the address last set with `server config-set`
//!     server-tls/{ca,cert,key}.pem   0700, owned by the server image's user: the copy of
//!                                    pki/waypoint mounted read-only into the server container
//!     server-address                 runner-only host: the server VM's Waypoint address
//!     server-ca/ca.pem               runner-only host: the server VM's CA, which verifies
//!                                    its Waypoint server (mounted read-only into runners)
//!     server-token                   removed if found (earlier versions kept the server's
//!                                    bootstrap token on runner hosts)
//! ```
//!
//! Everything else under the directory is foreign to the agent and left alone. Paths are
//! built here only; the modules that write the files own their modes and atomic writes.

use std::path::{Path, PathBuf};

/// The files under the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

impl StateLayout {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        StateLayout {
            root: state_dir.into(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The converge lock: `up` and `run` hold it while they change the host.
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// `status.json`: the steps of the last run and the host's condition.
    pub fn status(&self) -> PathBuf {
        self.root.join("status.json")
    }

    /// `backup-last.json`: the last backup attempt and the last successful backup
    /// ([`crate::backup::Record`]).
    pub fn backup_record(&self) -> PathBuf {
        self.root.join("backup-last.json")
    }

    /// `history.jsonl`: the newest converge passes, one line each ([`crate::history_file`]).
    pub fn history(&self) -> PathBuf {
        self.root.join("history.jsonl")
    }

    /// The clone marker: the instance this state directory was made on.
    pub fn instance_marker(&self) -> PathBuf {
        self.root.join("instance-id")
    }

    /// The identity the metadata service gave last, standing in when it gives none.
    pub fn remembered_identity(&self) -> PathBuf {
        self.root.join("identity.json")
    }

    /// The record of the firewall table's rules as nft listed them after the last apply.
    pub fn firewall_listing(&self) -> PathBuf {
        self.root.join("firewall.json")
    }

    /// The certificates and keys.
    pub fn pki(&self) -> PkiLayout {
        PkiLayout::new(self.root.join("pki"))
    }

    /// The application role's password (its rotation's `.pending` sits beside it).
    pub fn database_password(&self) -> PathBuf {
        self.root.join("database").join("password")
    }

    /// The Waypoint tokens and markers (0700).
    pub fn waypoint(&self) -> WaypointFiles {
        WaypointFiles::new(self.root.join("waypoint"))
    }
}

/// The files under `STATE_DIR/waypoint` (every token 0600).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointFiles {
    dir: PathBuf,
}

impl WaypointFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WaypointFiles { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's bootstrap token.
    pub fn bootstrap_token(&self) -> PathBuf {
        self.dir.join("bootstrap-token")
    }

    /// Runner `index`'s token.
    pub fn runner_token(&self, index: u32) -> PathBuf {
        self.dir.join(format!("runner-{index}-token"))
    }

    /// The address the server advertises, as last set.
    pub fn advertise_address(&self) -> PathBuf {
        self.dir.join("advertise-address")
    }

    /// On a runner-only host: the server VM's Waypoint address (`HOST:PORT`).
    pub fn server_address(&self) -> PathBuf {
        self.dir.join("server-address")
    }

    /// On a runner-only host: the server VM's Waypoint token.
    pub fn server_token(&self) -> PathBuf {
        self.dir.join("server-token")
    }

    /// The Waypoint server's TLS files as its container reads them (owned by the image's user).
    pub fn server_tls_dir(&self) -> PathBuf {
        self.dir.join("server-tls")
    }

    /// On a runner-only host: the directory of the server VM's CA (`ca.pem`), which verifies
    /// the Waypoint server the runners dial.
    pub fn server_ca_dir(&self) -> PathBuf {
        self.dir.join("server-ca")
    }
}

/// Where the files of one certificate live (the docker CLI's layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafPaths {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The file layout under `STATE_DIR/pki`.
#[derive(Debug, Clone)]
pub struct PkiLayout {
    root: PathBuf,
}

impl PkiLayout {
    pub fn new(pki_dir: impl Into<PathBuf>) -> Self {
        PkiLayout {
            root: pki_dir.into(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.ca_dir().join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.ca_dir().join("ca-key.pem")
    }

    /// The directory and files of the certificate called `name` (`server`, `runner`,
    /// `operator`).
    pub fn leaf(&self, name: &str) -> LeafPaths {
        let dir = self.root.join(name);
        LeafPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        }
    }

    /// dockerd's server certificate.
    pub fn server(&self) -> LeafPaths {
        self.leaf(SERVER_LEAF)
    }

    /// The Waypoint server's certificate.
    pub fn waypoint(&self) -> LeafPaths {
        self.leaf(WAYPOINT_LEAF)
    }
}

/// The name of dockerd's server certificate under `pki/`.
pub const SERVER_LEAF: &str = "server";

/// The name of the Waypoint server's certificate under `pki/`: its own key, so that what the
/// Waypoint container can read never includes dockerd's key.
pub const WAYPOINT_LEAF: &str = "waypoint";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_documented_layout() {
        let s = StateLayout::new("/s");
        assert_eq!(s.lock(), Path::new("/s/lock"));
        assert_eq!(s.status(), Path::new("/s/status.json"));
        assert_eq!(s.history(), Path::new("/s/history.jsonl"));
        assert_eq!(s.instance_marker(), Path::new("/s/instance-id"));
        assert_eq!(s.remembered_identity(), Path::new("/s/identity.json"));
        assert_eq!(s.database_password(), Path::new("/s/database/password"));
        let w = s.waypoint();
        assert_eq!(w.dir(), Path::new("/s/waypoint"));
        assert_eq!(
            w.bootstrap_token(),
            Path::new("/s/waypoint/bootstrap-token")
        );
        assert_eq!(w.runner_token(2), Path::new("/s/waypoint/runner-2-token"));
        assert_eq!(
            w.advertise_address(),
            Path::new("/s/waypoint/advertise-address")
        );
        assert_eq!(w.server_address(), Path::new("/s/waypoint/server-address"));
        assert_eq!(w.server_token(), Path::new("/s/waypoint/server-token"));
        assert_eq!(w.server_tls_dir(), Path::new("/s/waypoint/server-tls"));
        assert_eq!(w.server_ca_dir(), Path::new("/s/waypoint/server-ca"));
        let pki = s.pki();
        assert_eq!(pki.ca_cert(), Path::new("/s/pki/ca/ca.pem"));
        assert_eq!(pki.ca_key(), Path::new("/s/pki/ca/ca-key.pem"));
        assert_eq!(pki.server().key, Path::new("/s/pki/server/key.pem"));
        assert_eq!(pki.leaf("runner").dir, Path::new("/s/pki/runner"));
        assert_eq!(pki.waypoint().cert, Path::new("/s/pki/waypoint/cert.pem"));
    }
}
