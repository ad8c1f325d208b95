//! Harness names, address plan and the on-disk record of what each harness object created.
//!
//! Every object the harness makes is named after its owner's *harness name*: `pv<N>` for a
//! simulated VM (slot N), `pv<N>-o` for its outside namespace, `pv<N>-db` for its database host,
//! `pvm<PORT>` for a moto server, `pvp<PORT>` for a PostgreSQL on 127.0.0.1. Network namespaces,
//! veths, cgroups (`pilot-harness-<name>`), directories (`/run/pilot-harness/<name>/`) and an
//! environment marker on every process (`PILOT_HARNESS_OWNER=<name>`) all carry it, so
//! [`crate::leftovers`] and `harness-clean` ([`crate::clean`]) can find them and touch nothing
//! else.
//!
//! Slots are claimed by creating `/run/pilot-harness/pv<N>` with mkdir(2), which is atomic
//! across threads and processes; the directory is removed last on clean-up, so a slot is free
//! only once everything named after it is gone. A crashed run's slot stays taken until
//! `scripts/harness-clean` removes its leftovers.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::sys;

/// Where per-object directories and records live.
pub const RUN_DIR: &str = "/run/pilot-harness";

/// Environment variable set on every process the harness starts, naming its owner.
pub const OWNER_ENV: &str = "PILOT_HARNESS_OWNER";

/// Prefix of the cgroup-parent the harness gives each VM's dockerd.
pub const CGROUP_PREFIX: &str = "pilot-harness-";

/// Number of VM slots: each uses two /24s of 10.250.0.0/16 (2N: VM<->outside, 2N+1: VM<->db).
pub(crate) const SLOTS: u32 = 128;

/// Whether `s` is a harness name (or derived from one, such as `pv3-o`, `pv3-uts`).
pub fn is_harness_name(s: &str) -> bool {
    let rest = s
        .strip_prefix("pvm")
        .or_else(|| s.strip_prefix("pvp"))
        .or_else(|| s.strip_prefix("pv"))
        .unwrap_or("");
    rest.starts_with(|c: char| c.is_ascii_digit())
        && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Whether harness name `s` is a PostgreSQL's: a VM's database host (`pv<N>-db`) or a loopback
/// cluster (`pvp<PORT>`). Their processes stop on SIGQUIT (immediate shutdown); the auxiliary
/// ones ignore SIGTERM.
pub fn is_postgres_name(s: &str) -> bool {
    is_harness_name(s) && (s.ends_with("-db") || s.starts_with("pvp"))
}

/// Whether `candidate` is `name` or derived from it (`name-…`).
pub fn belongs_to(candidate: &str, name: &str) -> bool {
    candidate == name
        || candidate
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// The addresses of slot N.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub slot: u32,
}

impl Plan {
    fn octet(&self, second: bool) -> u8 {
        // Invariant: slot < SLOTS = 128, so 2*slot+1 <= 255.
        (self.slot * 2 + u32::from(second)) as u8
    }
    /// The VM's address on its link to the outside namespace.
    pub fn vm(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.octet(false), 2)
    }
    /// The outside namespace's address (the VM's default gateway).
    pub fn outside(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.octet(false), 1)
    }
    /// The VM's address on its link to the database host.
    pub fn vm_db_side(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.octet(true), 1)
    }
    /// The database host's address.
    pub fn db(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.octet(true), 2)
    }
    /// The /24 of the VM<->db link, as CIDR.
    pub fn db_subnet(&self) -> String {
        format!("10.250.{}.0/24", self.octet(true))
    }
    /// A secondary address of the outside namespace on the VM's /24 (`n` >= 1: .3, .4, ...),
    /// so the VM answers it like the primary one; `None` when `n` is 0 or too large.
    pub fn outside_alias(&self, n: u8) -> Option<Ipv4Addr> {
        // .1 is the outside's primary, .2 the VM's, .255 the broadcast address.
        let host = n.checked_add(2).filter(|h| *h >= 3 && *h <= 254)?;
        Some(Ipv4Addr::new(10, 250, self.octet(false), host))
    }
    /// dockerd's bridge address inside the VM (`bip`).
    pub fn bip(&self) -> String {
        format!("172.30.{}.1/24", self.slot)
    }
    /// The VM's container subnet (containers reach the db through the VM's NAT).
    pub fn container_subnet(&self) -> String {
        format!("172.30.{}.0/24", self.slot)
    }
}

/// The point-to-point /30 joining the VMs of slots `a` and `b` directly ([`crate::Vm::link`]):
/// the address of `a`'s end and of `b`'s end. Every unordered pair of slots has its own /30 in
/// 10.251.0.0/16 (128 x 128 pairs x 4 addresses fill it exactly), clear of the slots' own
/// 10.250.0.0/16 and the containers' 172.30.0.0/16. `None` for a slot with itself or out of range.
pub(crate) fn link_addrs(a: u32, b: u32) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if a == b || a >= SLOTS || b >= SLOTS {
        return None;
    }
    let (lo, hi) = (a.min(b), a.max(b));
    // Invariant: lo, hi < 128, so base <= (127 * 128 + 127) * 4 = 65532 fits the /16.
    let base = (lo * SLOTS + hi) * 4;
    let at = |host: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 251, 0, 0)) + base + host);
    // The lower slot takes .1 of the /30, the higher .2.
    let (lo_addr, hi_addr) = (at(1), at(2));
    Some(if a == lo {
        (lo_addr, hi_addr)
    } else {
        (hi_addr, lo_addr)
    })
}

/// The prefix length of the links made by [`link_addrs`].
pub(crate) const LINK_PREFIX: u8 = 30;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Claims a free VM slot by creating its directory; returns the slot and the directory.
pub(crate) fn claim_slot() -> Result<(Plan, PathBuf)> {
    fs::create_dir_all(RUN_DIR).with_context(|| format!("cannot create {RUN_DIR}"))?;
    // Start at a different slot per process and call, so concurrent runs rarely race for the
    // same directory (they would only retry the next one).
    let start =
        (std::process::id().wrapping_mul(7)).wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed));
    for i in 0..SLOTS {
        let slot = (start.wrapping_add(i)) % SLOTS;
        let dir = Path::new(RUN_DIR).join(format!("pv{slot}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok((Plan { slot }, dir)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    bail!(
        "all {SLOTS} harness VM slots under {RUN_DIR} are taken: leftovers of crashed runs? \
         run scripts/harness-clean"
    )
}

/// Claims a named directory under [`RUN_DIR`] (fails if it exists: a leftover or a live owner).
pub(crate) fn claim_dir(name: &str) -> Result<PathBuf> {
    fs::create_dir_all(RUN_DIR).with_context(|| format!("cannot create {RUN_DIR}"))?;
    let dir = Path::new(RUN_DIR).join(name);
    fs::create_dir(&dir).with_context(|| {
        format!(
            "cannot create {} (a leftover of a crashed run? run scripts/harness-clean)",
            dir.display()
        )
    })?;
    Ok(dir)
}

/// The append-only list of resources an object created, in `DIR/record`, read by
/// `scripts/harness-clean` after a crash. One resource per line:
///
/// ```text
/// owner <pid> <start-ticks>      the test process (alive: harness-clean leaves this one alone)
/// netns <name>
/// pid <pid> <marker>             kill only if /proc/<pid>/cmdline contains <marker>
/// pidfile <path> <marker>        the same, PID read from a file the daemon rewrites
/// cgroup <dir-name>              directories of this name anywhere under /sys/fs/cgroup
/// link <netns> <ifname>          a veth end inside a harness namespace (from `Vm::link`): it
///                                goes with its namespace, so clean-up needs no step of its own
/// ```
pub(crate) struct Record {
    path: PathBuf,
}

/// One line of a record, as [`Record::read`] parses it. Lines naming a namespace, cgroup or
/// link are not needed to find those (they carry the owner's name): they read as `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecordEntry {
    /// The test process that made the object; `None` fields when the line is malformed.
    Owner {
        pid: Option<u32>,
        start_ticks: Option<u64>,
    },
    /// A process to signal only while its command line contains `marker`.
    Pid {
        pid: u32,
        marker: String,
    },
    /// The same, its PID read from `path` when needed.
    Pidfile {
        path: PathBuf,
        marker: String,
    },
    Other,
}

impl Record {
    /// Starts the record in `dir`, naming this process as the owner.
    pub fn create(dir: &Path) -> Result<Record> {
        let r = Record {
            path: dir.join("record"),
        };
        let me = std::process::id();
        let ticks = sys::start_ticks(me).unwrap_or(0);
        r.add(&format!("owner {me} {ticks}"))?;
        Ok(r)
    }

    /// Appends one line (flushed at once: the process may be killed right after).
    pub fn add(&self, line: &str) -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        writeln!(f, "{line}").with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// The entries of the record in `dir` (empty when there is none or it is unreadable).
    pub fn read(dir: &Path) -> Vec<RecordEntry> {
        fs::read_to_string(dir.join("record"))
            .map(|text| text.lines().filter_map(parse_record_line).collect())
            .unwrap_or_default()
    }
}

/// Parses one record line (`KIND A REST`, fields separated by runs of blanks; REST, the marker,
/// may hold blanks itself). `None` for a blank line or a PID line whose PID is no number.
fn parse_record_line(line: &str) -> Option<RecordEntry> {
    let split = |s: &str| -> (String, String) {
        let s = s.trim();
        match s.split_once(char::is_whitespace) {
            Some((a, b)) => (a.to_string(), b.trim().to_string()),
            None => (s.to_string(), String::new()),
        }
    };
    let (kind, rest) = split(line);
    let (a, b) = split(&rest);
    Some(match kind.as_str() {
        "" => return None,
        "owner" => RecordEntry::Owner {
            pid: a.parse().ok(),
            start_ticks: split(&b).0.parse().ok(),
        },
        "pid" => RecordEntry::Pid {
            pid: a.parse().ok()?,
            marker: b,
        },
        "pidfile" => RecordEntry::Pidfile {
            path: PathBuf::from(a),
            marker: b,
        },
        _ => RecordEntry::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_names() {
        for ok in [
            "pv0", "pv12", "pv12-o", "pv12-db", "pv3-uts", "pvm41234", "pvp41234",
        ] {
            assert!(is_harness_name(ok), "{ok}");
        }
        for bad in [
            "pv", "pvx", "eth0", "pvm", "pvp", "pvpx1", "p3", "pv3/x", "",
        ] {
            assert!(!is_harness_name(bad), "{bad}");
        }
        for pg in ["pv3-db", "pvp5432"] {
            assert!(is_postgres_name(pg), "{pg}");
        }
        for other in ["pv3", "pvm5432", "pv3-o", "db"] {
            assert!(!is_postgres_name(other), "{other}");
        }
    }

    #[test]
    fn record_lines_parse_like_the_harness_writes_them() {
        let parse = |l: &str| parse_record_line(l);
        assert_eq!(
            parse("owner 42 123456"),
            Some(RecordEntry::Owner {
                pid: Some(42),
                start_ticks: Some(123456)
            })
        );
        assert_eq!(
            parse("owner x"),
            Some(RecordEntry::Owner {
                pid: None,
                start_ticks: None
            })
        );
        assert_eq!(
            parse("pid 7  socat TCP-LISTEN:2375,fork UNIX-CONNECT:/x "),
            Some(RecordEntry::Pid {
                pid: 7,
                marker: "socat TCP-LISTEN:2375,fork UNIX-CONNECT:/x".into()
            })
        );
        assert_eq!(
            parse("pidfile /run/pilot-harness/pv3/dockerd.pid --config-file /a b"),
            Some(RecordEntry::Pidfile {
                path: "/run/pilot-harness/pv3/dockerd.pid".into(),
                marker: "--config-file /a b".into()
            })
        );
        assert_eq!(parse("pid x marker"), None);
        assert_eq!(parse("netns pv3"), Some(RecordEntry::Other));
        assert_eq!(parse("   "), None);
    }

    #[test]
    fn derived_names_belong_to_their_owner() {
        assert!(belongs_to("pv3", "pv3"));
        assert!(belongs_to("pv3-db", "pv3"));
        assert!(!belongs_to("pv31", "pv3"));
        assert!(!belongs_to("pv3", "pv3-db"));
    }

    #[test]
    fn address_plan_is_disjoint_per_slot() {
        let a = Plan { slot: 0 };
        let b = Plan { slot: 127 };
        assert_eq!(a.vm().to_string(), "10.250.0.2");
        assert_eq!(a.db().to_string(), "10.250.1.2");
        assert_eq!(b.outside().to_string(), "10.250.254.1");
        assert_eq!(b.db_subnet(), "10.250.255.0/24");
        assert_eq!(b.bip(), "172.30.127.1/24");
        assert_eq!(a.outside_alias(0), None);
        assert_eq!(a.outside_alias(1), Some(Ipv4Addr::new(10, 250, 0, 3)));
        assert_eq!(b.outside_alias(252), Some(Ipv4Addr::new(10, 250, 254, 254)));
        assert_eq!(b.outside_alias(253), None);
    }

    #[test]
    fn link_addresses_are_unique_per_pair_and_outside_the_other_plans() {
        let mut seen = std::collections::HashSet::new();
        for a in 0..SLOTS {
            for b in (a + 1)..SLOTS {
                let (x, y) = link_addrs(a, b).unwrap();
                assert_eq!(link_addrs(b, a), Some((y, x)), "symmetric");
                // Both ends in one /30, neither the network nor the broadcast address.
                let (xn, yn) = (u32::from(x), u32::from(y));
                assert_eq!(xn >> 2, yn >> 2, "{x} {y}");
                assert!(xn & 3 != 0 && xn & 3 != 3 && yn & 3 != 0 && yn & 3 != 3);
                assert_eq!(x.octets()[..2], [10, 251]);
                assert!(seen.insert(xn >> 2), "{a}-{b} shares a /30");
            }
        }
        assert_eq!(link_addrs(3, 3), None);
        assert_eq!(link_addrs(0, SLOTS), None);
        assert_eq!(
            link_addrs(0, 1),
            Some((Ipv4Addr::new(10, 251, 0, 5), Ipv4Addr::new(10, 251, 0, 6)))
        );
    }
}
