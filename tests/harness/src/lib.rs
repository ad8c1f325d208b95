//! Test harness: simulated Pilot VMs on this machine, and the real services around them.
//!
//! - [`Vm`]: a network namespace with its own hostname and its own dockerd (configured only by
//!   its `daemon.json`, controlled by its `dockerd-ctl` script), and an "outside" namespace
//!   (operator / attacker side) joined to it by a veth pair. The agent runs inside it with
//!   [`Vm::cmd`], rewrites its `daemon.json` and restarts it with `dockerd-ctl restart`.
//! - [`VmLink`]: two VMs joined directly ([`Vm::link`]), cut and restored at will;
//!   [`Vm::outside_alias`] gives the outside namespace more source addresses, and
//!   [`Vm::serve_metadata`] serves the cloud metadata server at 169.254.169.254 inside a VM,
//!   [`Vm::serve_metadata_outside`] outside it (169.254.169.254 and fd00:ec2::254, routed through
//!   the VM's link, as on a cloud).
//! - [`Postgres`]: PostgreSQL 15 on its own database host namespace linked to a VM, with
//!   [`Postgres::cut_link`] / [`Postgres::restore_link`] to simulate an outage, or on 127.0.0.1
//!   ([`Postgres::start_loopback`], the agent's database tests); TLS on request.
//! - [`Moto`]: the EC2 API (moto) on 127.0.0.1.
//! - [`metadata`]: an AWS IMDS / GCE metadata server (loopback or inside a test's namespace).
//! - [`leftovers`]: what harness objects left behind (namespaces, links, mounts, cgroups,
//!   processes, directories); suites assert it is empty after dropping everything.
//! - [`clean`]: the `harness-clean` program (`scripts/harness-clean`), which removes what
//!   killed test runs left behind.
//! - [`standin`]: packaging of the Waypoint STAND-IN binary as a container image.
//! - [`Sshd`]: a real OpenSSH server inside a VM (own config, host key and client key), for an
//!   operator's `ssh root@VM ...` from the outside namespace.
//!
//! Every object removes what it made when dropped (also while a test panics). What a killed
//! test process leaves behind is recorded under `/run/pilot-harness/<name>/` and removed by
//! `scripts/harness-clean` ([`clean`]). Everything needs root: without it the harness fails loudly, it never
//! skips. Facts this is built on (and traps avoided) are in `/work/shared/HARNESS.md`: dockerd
//! is entered with `nsenter`, not `ip netns exec`; each dockerd has its own cgroup-parent and
//! bip; stopped dockerds leave bind mounts that must be unmounted.

pub mod clean;
pub mod gcp;
pub mod leftovers;
pub mod metadata;
pub mod moto;
pub mod names;
pub mod postgres;
pub mod sshd;
pub mod standin;
mod sys;
pub mod vm;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

pub use gcp::Gcp;
pub use leftovers::{all_leftovers, leftovers};
pub use moto::Moto;
pub use postgres::{Postgres, PostgresOptions};
pub use sshd::{Sshd, SshdOptions};
pub use vm::{METADATA_ADDR, METADATA_ADDR_V6, Vm, VmLink, VmOptions};

/// Programs the harness runs; all installed by `scripts/setup.sh`.
const REQUIRED_PROGRAMS: &[&str] = &[
    "ip",
    "nsenter",
    "unshare",
    "setsid",
    "setpriv",
    "flock",
    "dockerd",
    "containerd",
    "docker",
    "curl",
    "socat",
    "psql",
    "pg_isready",
];

/// Fails with a clear message unless this process is root and can make network and UTS
/// namespaces, and the programs the harness runs are installed. Suites call it first so that a
/// run without root FAILS (it is never skipped silently). The result is computed once.
pub fn require_root() -> Result<()> {
    static CHECK: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    match CHECK.get_or_init(check_root) {
        Ok(()) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

fn check_root() -> std::result::Result<(), String> {
    let euid = sys::euid();
    if euid != 0 {
        return Err(format!(
            "the end-to-end harness needs root (network namespaces, dockerd, cgroups); running \
             as uid {euid}: run the suites as root (scripts/test.sh)"
        ));
    }
    let missing: Vec<&str> = REQUIRED_PROGRAMS
        .iter()
        .copied()
        .filter(|p| !on_path(p))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the end-to-end harness needs {}: run scripts/setup.sh",
            missing.join(", ")
        ));
    }
    let ns = Command::new("unshare")
        .args(["--net", "--uts", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match ns {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "cannot create network/UTS namespaces here (`unshare --net --uts true`: {}); the \
             end-to-end harness needs them",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run unshare: {e}")),
    }
}

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Root's usual sbin directories too: dockerd and ip live there.
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .any(|d| d.join(program).is_file())
}

/// The cargo target directory the suites' binaries are built into:
/// `$CARGO_TARGET_DIR`, default `/var/cache/pilot-agent/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pilot-agent/target"))
}

/// The release build of workspace binary `name` (e.g. `pilot-agent`, `waypoint`); fails with
/// what to run when it has not been built.
pub fn target_bin(name: &str) -> Result<PathBuf> {
    let p = target_dir().join("release").join(name);
    if !Path::new(&p).is_file() {
        bail!(
            "{} is missing: run `cargo build --release --workspace` (with CARGO_TARGET_DIR={})",
            p.display(),
            target_dir().display()
        );
    }
    Ok(p)
}

/// A port on 127.0.0.1 that nothing listens on right now: bound to port 0, noted, let go.
/// Another process can take it before the caller binds it; callers that must not fail then
/// retry with another one.
pub fn free_loopback_port() -> Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("cannot find a free port on 127.0.0.1")
}
