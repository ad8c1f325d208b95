//! `harness-clean` (`scripts/harness-clean`, `src/bin/harness-clean.rs`): removes what killed
//! or crashed test runs of the harness left behind: processes, mounts, cgroups, network
//! namespaces (and with them their veths), host links and directories. It touches only
//! harness-named things, found by the same rules and scan as [`crate::leftovers`]:
//!
//! - processes carrying `PILOT_HARNESS_OWNER=<name>`, a harness path or name in their command
//!   line or cgroup, living in a harness network namespace, or recorded in
//!   `/run/pilot-harness/<name>/record` (signalled only while their command line still holds
//!   the recorded marker: the PID may have been reused);
//! - mounts below `/run/pilot-harness/<name>/`, cgroups `pilot-harness-<name>`, namespaces
//!   `/run/netns/<name>`, links `<name>` in the host namespace, `/run/pilot-harness/<name>/`.
//!
//! Objects whose owning test process still runs (per their record,
//! [`crate::leftovers::owner_alive`]) are left alone unless [`Options::all`].
//!
//! Order matters: containers are killed first (a PID 1 may ignore SIGTERM), then dockerd alone
//! with SIGTERM (it stops its containerd and shims itself and hangs if they are killed under
//! it), PostgreSQL with SIGQUIT (its auxiliary processes ignore SIGTERM), the rest with
//! SIGTERM, SIGKILL for whatever is left; then mounts (deepest first), cgroups, namespaces,
//! links and, last, directories, each looked at again just before it goes since tests may be
//! making or removing objects meanwhile.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::leftovers::{self, Evidence};
use crate::names::{OWNER_ENV, RUN_DIR, Record, RecordEntry, is_harness_name, is_postgres_name};
use crate::sys;

/// What one run does (the program's flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// `--all`: also remove objects whose owner still runs.
    pub all: bool,
    /// `--check`: only report leftovers (of any owner); exit 1 if there are some.
    pub check: bool,
    /// `--skip-live`: with `check`, ignore objects whose owner still runs.
    pub skip_live: bool,
    /// `-q`: print only what was removed or is left.
    pub quiet: bool,
}

/// The PATH of the programs this runs (`ip`): root's usual one, whatever the caller's is.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs harness-clean; returns its exit status: 0 when nothing harness-named is left (of the
/// objects considered), 1 when something is (or when not run as root).
pub fn run(options: &Options) -> u8 {
    if sys::euid() != 0 {
        eprintln!("harness-clean: must run as root");
        return 1;
    }
    let out = Out {
        quiet: options.quiet,
    };
    let scope = if options.check {
        Scope {
            live_too: !options.skip_live,
        }
    } else {
        Scope {
            live_too: options.all,
        }
    };
    let found = Found::discover(&scope);
    if options.check {
        return report(&scope, &found, &out);
    }
    if !options.all {
        let live: Vec<String> = all_names_in(Path::new(RUN_DIR))
            .into_iter()
            .filter(|n| is_harness_name(n) && leftovers::owner_alive(n))
            .collect();
        if !live.is_empty() {
            out.info(&format!(
                "leaving alone (owner still running): {}",
                live.join(" ")
            ));
        }
    }
    remove(&scope, found, &out);
    // What could not be removed, of the objects this run was to remove.
    let scope = Scope {
        live_too: options.all,
    };
    report(&scope, &Found::discover(&scope), &Out { quiet: true })
}

/// Which harness names a run handles: all of them, or only those whose owner no longer runs.
/// Asked afresh for each resource (an owner may end, an object appear, while this runs).
struct Scope {
    live_too: bool,
}

impl Scope {
    fn wanted(&self, name: &str) -> bool {
        is_harness_name(name) && (self.live_too || !leftovers::owner_alive(name))
    }
}

struct Out {
    quiet: bool,
}

impl Out {
    /// Progress, silenced by `-q`.
    fn info(&self, msg: &str) {
        if !self.quiet {
            println!("harness-clean: {msg}");
        }
    }
    /// What was left or failed: always printed.
    fn note(&self, msg: &str) {
        println!("harness-clean: {msg}");
    }
}

/// Why a process is taken for a harness object's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Why {
    /// Its PID is in the object's record and its command line holds the recorded marker.
    Recorded(String),
    Found(Evidence),
}

#[derive(Debug, Clone)]
struct Proc {
    owner: String,
    why: Why,
}

impl Proc {
    /// `OWNER (WHY)`, as the messages show it.
    fn describe(&self) -> String {
        match &self.why {
            Why::Recorded(marker) => format!("{} (recorded: {marker})", self.owner),
            Why::Found(e) => format!("{} ({})", self.owner, e.as_str()),
        }
    }
}

/// What the run found at its start. Mounts and cgroups are looked up when they are handled.
struct Found {
    netns: Vec<String>,
    procs: BTreeMap<u32, Proc>,
    links: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Found {
    fn discover(scope: &Scope) -> Found {
        let wanted = |n: &str| scope.wanted(n);
        let netns = leftovers::netns_names(&wanted);
        let mut procs = recorded_processes(scope);
        for p in leftovers::processes(&wanted) {
            procs.entry(p.pid).or_insert(Proc {
                owner: p.owner,
                why: Why::Found(p.why),
            });
        }
        Found {
            netns,
            procs,
            links: leftovers::host_links(&wanted),
            dirs: leftovers::run_dirs(&wanted),
        }
    }
}

/// The processes in the records of wanted objects that still run what was recorded.
fn recorded_processes(scope: &Scope) -> BTreeMap<u32, Proc> {
    let mut out = BTreeMap::new();
    for dir in leftovers::run_dirs(&|n: &str| scope.wanted(n)) {
        let Some(name) = dir.file_name().and_then(OsStr::to_str) else {
            continue;
        };
        for entry in Record::read(&dir) {
            let (pid, marker) = match entry {
                RecordEntry::Pid { pid, marker } => (Some(pid), marker),
                RecordEntry::Pidfile { path, marker } => (sys::read_pidfile(&path), marker),
                _ => continue,
            };
            let Some(pid) = pid.filter(|p| sys::alive(*p)) else {
                continue;
            };
            if sys::cmdline(pid).is_some_and(|c| c.contains(&marker)) {
                out.insert(
                    pid,
                    Proc {
                        owner: name.to_string(),
                        why: Why::Recorded(marker),
                    },
                );
            }
        }
    }
    out
}

/// Mount points below `/run/pilot-harness/<wanted>`, deepest first.
fn run_dir_mounts(scope: &Scope) -> Vec<PathBuf> {
    let mut m = leftovers::mounts(&[RUN_DIR], &|n: &str| scope.wanted(n));
    m.sort_by(|a, b| (b.components().count(), b).cmp(&(a.components().count(), a)));
    m
}

fn cgroups(scope: &Scope) -> Vec<PathBuf> {
    leftovers::cgroups(&|n: &str| scope.wanted(n))
}

/// `--check`: prints every leftover; 1 if there is one.
fn report(scope: &Scope, found: &Found, out: &Out) -> u8 {
    let mut left = Vec::new();
    for (pid, p) in &found.procs {
        left.push(format!(
            "process {pid} of {}: {}",
            p.describe(),
            sys::cmdline(*pid).unwrap_or_default()
        ));
    }
    left.extend(
        run_dir_mounts(scope)
            .iter()
            .map(|m| format!("mount {}", m.display())),
    );
    left.extend(
        cgroups(scope)
            .iter()
            .map(|c| format!("cgroup {}", c.display())),
    );
    left.extend(found.netns.iter().map(|n| format!("network namespace {n}")));
    left.extend(found.links.iter().map(|n| format!("link {n}")));
    left.extend(
        found
            .dirs
            .iter()
            .map(|d| format!("directory {}", d.display())),
    );
    for l in &left {
        out.note(&format!("left: {l}"));
    }
    if left.is_empty() {
        out.info("nothing left");
        0
    } else {
        1
    }
}

fn remove(scope: &Scope, found: Found, out: &Out) {
    kill_processes(scope, found.procs, out);
    unmount(scope, out);
    remove_cgroups(scope, out);
    // Each one is looked at again just before it goes: tests may be making or removing objects.
    for n in &found.netns {
        if Path::new("/run/netns").join(n).exists() && scope.wanted(n) {
            out.info(&format!("deleting network namespace {n}"));
            if !ip(&["netns", "del", n]) {
                out.note(&format!("cannot delete network namespace {n}"));
            }
        }
    }
    for n in &found.links {
        if Path::new("/sys/class/net").join(n).exists() && scope.wanted(n) {
            out.info(&format!("deleting link {n}"));
            if !ip(&["link", "del", n]) {
                out.note(&format!("cannot delete link {n}"));
            }
        }
    }
    for d in &found.dirs {
        let name = d.file_name().and_then(OsStr::to_str).unwrap_or_default();
        if !d.is_dir() || !scope.wanted(name) {
            continue;
        }
        if !sys::mounts_under(d).is_empty() {
            out.note(&format!(
                "keeping {}: something is still mounted below it",
                d.display()
            ));
            continue;
        }
        out.info(&format!("removing {}", d.display()));
        if let Err(e) = sys::remove_tree_one_fs(d) {
            out.note(&format!("cannot remove {}: {e}", d.display()));
        }
    }
}

fn kill_processes(scope: &Scope, mut procs: BTreeMap<u32, Proc>, out: &Out) {
    procs.retain(|pid, p| scope.wanted(&p.owner) && sys::alive(*pid));
    if procs.is_empty() {
        return;
    }
    let (mut in_cgroup, mut dockerds, mut postgres, mut others) = (vec![], vec![], vec![], vec![]);
    for (pid, p) in &procs {
        let cmd = sys::cmdline(*pid).unwrap_or_default();
        out.info(&format!("killing process {pid} of {}: {cmd}", p.describe()));
        if p.why == Why::Found(Evidence::Cgroup) {
            in_cgroup.push(*pid);
        } else if cmd == "dockerd" || cmd.starts_with("dockerd ") {
            dockerds.push(*pid);
        } else if is_postgres_name(&p.owner) {
            postgres.push(*pid);
        } else {
            others.push(*pid);
        }
    }
    let signal_all = |pids: &[u32], sig| pids.iter().for_each(|p| sys::signal(*p, sig));
    // Containers first (a PID 1 may ignore SIGTERM). Then dockerd alone: it stops its
    // containerd and shims itself, and hangs if they are killed under it.
    signal_all(&in_cgroup, libc::SIGKILL);
    signal_all(&dockerds, libc::SIGTERM);
    signal_all(
        &sys::wait_gone(&dockerds, Duration::from_secs(10)),
        libc::SIGKILL,
    );
    // PostgreSQL takes SIGQUIT, its immediate shutdown: its auxiliary processes ignore SIGTERM.
    signal_all(&postgres, libc::SIGQUIT);
    signal_all(&others, libc::SIGTERM);
    let all: Vec<u32> = procs.keys().copied().collect();
    let left = sys::wait_gone(&all, Duration::from_secs(5));
    if !left.is_empty() {
        signal_all(&left, libc::SIGKILL);
        let left = sys::wait_gone(&left, Duration::from_secs(5));
        if !left.is_empty() {
            let pids: Vec<String> = left.iter().map(u32::to_string).collect();
            out.note(&format!("processes survived SIGKILL: {}", pids.join(" ")));
        }
    }
}

fn unmount(scope: &Scope, out: &Out) {
    // Several rounds: a path can carry stacked mounts (a dockerd restarted twice binds its
    // data-root onto itself twice), and an unmount can uncover another.
    for _ in 0..8 {
        let mounts = run_dir_mounts(scope);
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            out.info(&format!("unmounting {}", m.display()));
            sys::umount(&m);
        }
    }
}

fn remove_cgroups(scope: &Scope, out: &Out) {
    let mut cgs = cgroups(scope);
    for c in &cgs {
        out.info(&format!("removing cgroup {}", c.display()));
    }
    // rmdir bottom-up; the kernel may still count exiting tasks for a moment: retry for 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cgs.is_empty() {
        cgs.retain(|c| !sys::rmdir_tree(c));
        if cgs.is_empty() || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    for c in &cgs {
        out.note(&format!(
            "cannot remove cgroup {} (processes still in it?)",
            c.display()
        ));
    }
}

/// Runs `ip ARGS` (its messages go to this program's stderr); whether it succeeded.
fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .env("PATH", PATH)
        .env_remove(OWNER_ENV)
        .status()
        .is_ok_and(|s| s.success())
}

/// The names of every entry of `dir`, sorted.
fn all_names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_described_as_the_messages_show_them() {
        let p = Proc {
            owner: "pv3".into(),
            why: Why::Recorded("socat TCP-LISTEN:2375".into()),
        };
        assert_eq!(p.describe(), "pv3 (recorded: socat TCP-LISTEN:2375)");
        let p = Proc {
            owner: "pv3-db".into(),
            why: Why::Found(Evidence::Environment),
        };
        assert_eq!(p.describe(), "pv3-db (environment)");
    }

    #[test]
    fn a_name_without_a_directory_has_no_live_owner() {
        // No harness object is ever named like this: there is no directory for it.
        let scope = Scope { live_too: false };
        assert!(scope.wanted("pv4294967295-none"));
        assert!(!scope.wanted("eth0"));
        assert!(Scope { live_too: true }.wanted("pvm1"));
    }
}
