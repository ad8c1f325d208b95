//! Finding what harness objects left on the machine: network namespaces, links in the host
//! namespace, mounts, cgroups, processes and directories carrying a harness name (see
//! [`crate::names`]), and whether an object's owner still runs. The same scan drives the
//! clean-up in `Drop` (scoped to exact names), `harness-clean` ([`crate::clean`]) and
//! [`leftovers`], which suites call after dropping everything to assert that nothing is left.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::names::{
    CGROUP_PREFIX, OWNER_ENV, RUN_DIR, Record, RecordEntry, belongs_to, is_harness_name,
};
use crate::sys;

/// A process that belongs to a harness object, and why we think so.
#[derive(Debug, Clone)]
pub(crate) struct HarnessProc {
    pub pid: u32,
    pub owner: String,
    pub why: Evidence,
}

/// What ties a process to its harness object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evidence {
    /// `PILOT_HARNESS_OWNER=<name>` in its environment.
    Environment,
    /// A harness path or name in its command line.
    CommandLine,
    /// A harness cgroup (a container of a VM's dockerd).
    Cgroup,
    /// It lives in a harness network namespace.
    NetworkNamespace,
}

impl Evidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Evidence::Environment => "environment",
            Evidence::CommandLine => "command line",
            Evidence::Cgroup => "cgroup",
            Evidence::NetworkNamespace => "network namespace",
        }
    }
}

/// Harness names that follow a marker (`/run/pilot-harness/`, `pilot-harness-`) in `text`, in
/// the order they appear.
fn harness_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let run_dir = format!("{RUN_DIR}/");
    for marker in [run_dir.as_str(), CGROUP_PREFIX] {
        for (i, _) in text.match_indices(marker) {
            let tok: String = text[i + marker.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if is_harness_name(&tok) {
                out.push((i, tok));
            }
        }
    }
    out.sort();
    out.into_iter().map(|(_, t)| t).collect()
}

/// Named network namespaces (in `/run/netns`) whose names satisfy `wanted`.
pub(crate) fn netns_names(wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
    names_in(Path::new("/run/netns"), false, wanted)
}

/// Processes owned by a harness object whose name satisfies `wanted`: by the owner variable in
/// their environment, a harness path or name in their command line, a harness cgroup, or by
/// living in a harness network namespace.
pub(crate) fn processes(wanted: &dyn Fn(&str) -> bool) -> Vec<HarnessProc> {
    let ns_inodes: HashMap<u64, String> = netns_names(wanted)
        .into_iter()
        .filter_map(|n| sys::netns_inode(&n).map(|i| (i, n)))
        .collect();
    let owner_prefix = format!("{OWNER_ENV}=");
    let mut found = Vec::new();
    for pid in sys::all_pids() {
        if !sys::alive(pid) {
            continue;
        }
        let mut hit = |owner: String, why: Evidence| {
            if wanted(&owner) {
                found.push(HarnessProc { pid, owner, why });
                true
            } else {
                false
            }
        };
        if let Some(owner) = sys::environ(pid)
            .into_iter()
            .find_map(|kv| kv.strip_prefix(&owner_prefix).map(str::to_string))
            && is_harness_name(&owner)
            && hit(owner, Evidence::Environment)
        {
            continue;
        }
        if let Some(cmd) = sys::cmdline(pid)
            && harness_tokens(&cmd)
                .into_iter()
                .any(|t| hit(t, Evidence::CommandLine))
        {
            continue;
        }
        if let Ok(cg) = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            && harness_tokens(&cg)
                .into_iter()
                .any(|t| hit(t, Evidence::Cgroup))
        {
            continue;
        }
        if let Some(n) = sys::proc_netns_inode(pid).and_then(|i| ns_inodes.get(&i)) {
            hit(n.clone(), Evidence::NetworkNamespace);
        }
    }
    found
}

/// Cgroup directories (`pilot-harness-<name>`) whose name satisfies `wanted`.
pub(crate) fn cgroups(wanted: &dyn Fn(&str) -> bool) -> Vec<std::path::PathBuf> {
    sys::find_cgroups(&|dir: &str| {
        dir.strip_prefix(CGROUP_PREFIX)
            .is_some_and(|n| is_harness_name(n) && wanted(n))
    })
}

/// Links in the host namespace whose names satisfy `wanted` (a veth end whose peer went with a
/// removed namespace is gone itself; one that is left means its namespace was never made).
pub(crate) fn host_links(wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
    names_in(Path::new("/sys/class/net"), false, wanted)
}

/// The directories `/run/pilot-harness/<name>` whose names satisfy `wanted`.
pub(crate) fn run_dirs(wanted: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    names_in(Path::new(RUN_DIR), true, wanted)
        .into_iter()
        .map(|n| Path::new(RUN_DIR).join(n))
        .collect()
}

/// Sorted harness names of the entries of `dir` (only directories if `dirs_only`) that satisfy
/// `wanted`.
fn names_in(dir: &Path, dirs_only: bool, wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter(|e| !dirs_only || e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| is_harness_name(n) && wanted(n))
        .collect();
    v.sort();
    v
}

/// Mount points `ROOT/<name>[/...]` for a root in `roots` and a harness name satisfying `wanted`,
/// in mount order (a path carries one entry per stacked mount).
pub(crate) fn mounts(roots: &[&str], wanted: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    sys::mount_points()
        .into_iter()
        .filter(|m| {
            roots.iter().any(|root| {
                m.strip_prefix(root)
                    .ok()
                    .and_then(|rest| rest.components().next())
                    .and_then(|c| c.as_os_str().to_str())
                    .is_some_and(|o| is_harness_name(o) && wanted(o))
            })
        })
        .collect()
}

/// Whether the test process that made the object with directory `/run/pilot-harness/<name>`
/// still runs (per the record's `owner` line: PID and start time), or the object is being made
/// or removed right now. Asked afresh each time: tests make and remove objects all the time.
pub(crate) fn owner_running(name: &str) -> bool {
    let dir = Path::new(RUN_DIR).join(name);
    if !dir.is_dir() {
        return false;
    }
    let owner = Record::read(&dir).into_iter().find_map(|e| match e {
        RecordEntry::Owner { pid, start_ticks } => Some((pid, start_ticks)),
        _ => None,
    });
    match owner {
        Some((Some(pid), Some(ticks))) => sys::alive(pid) && sys::start_ticks(pid) == Some(ticks),
        Some(_) => false,
        // The harness writes the record just after mkdir, and removing the directory deletes
        // the record just before the directory: without one, the object is alive if its
        // directory changed in the last minute.
        None => fs::metadata(&dir)
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age < Duration::from_secs(60))
                    || t > SystemTime::now()
            }),
    }
}

/// Whether harness name `name` belongs to a live object: its own (per [`owner_running`]) or
/// that of the name it derives from (`pv3-uts` -> `pv3`; `pv3-db` has a directory and record
/// of its own, and counts as live while either runs).
pub(crate) fn owner_alive(name: &str) -> bool {
    let mut n = name;
    loop {
        if owner_running(n) {
            return true;
        }
        match n.rsplit_once('-') {
            Some((base, _)) => n = base,
            None => return false,
        }
    }
}

fn scan(wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    for n in netns_names(wanted) {
        out.push(format!("network namespace {n}"));
    }
    for n in host_links(wanted) {
        out.push(format!("link {n} in the host namespace"));
    }
    for m in mounts(&[RUN_DIR, "/run/netns"], wanted) {
        out.push(format!("mount {}", m.display()));
    }
    for c in cgroups(wanted) {
        out.push(format!("cgroup {}", c.display()));
    }
    for p in processes(wanted) {
        out.push(format!(
            "process {} of {} ({}): {}",
            p.pid,
            p.owner,
            p.why.as_str(),
            sys::cmdline(p.pid).unwrap_or_default()
        ));
    }
    for d in run_dirs(wanted) {
        out.push(format!("directory {}", d.display()));
    }
    out
}

/// Everything left on the machine by the harness objects named `names` (and the objects derived
/// from them: `pv3` covers `pv3-o`, `pv3-db`, `pv3-uts`): network namespaces, links in the host
/// namespace, mounts, cgroups, processes and directories, one description per line. Empty means
/// clean.
pub fn leftovers<S: AsRef<str>>(names: &[S]) -> Vec<String> {
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    scan(&|cand: &str| names.iter().any(|n| belongs_to(cand, n)))
}

/// Everything left by any harness object, of this or any other run.
pub fn all_leftovers() -> Vec<String> {
    scan(&|_| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_after_markers() {
        assert_eq!(
            harness_tokens("dockerd --config-file /run/pilot-harness/pv3/daemon.json"),
            vec!["pv3"]
        );
        assert_eq!(
            harness_tokens("pilot-harness-pv3-uts infinity"),
            vec!["pv3-uts"]
        );
        assert_eq!(
            harness_tokens("postgres: pilot-harness-pv7-db: checkpointer"),
            vec!["pv7-db"]
        );
        assert_eq!(
            harness_tokens("4:memory:/x/pilot-harness-pv9/abcdef"),
            vec!["pv9"]
        );
        assert_eq!(
            harness_tokens(
                "postgres -D /run/pilot-harness/pvp5432/data -c cluster_name=pilot-harness-pv1"
            ),
            vec!["pvp5432", "pv1"]
        );
        assert_eq!(
            harness_tokens("x pilot-harness-pv2 /run/pilot-harness/pv1/y"),
            vec!["pv2", "pv1"],
            "in the order they appear"
        );
        assert!(harness_tokens("bash scripts/harness-clean").is_empty());
        assert!(harness_tokens("/run/pilot-harness/record").is_empty());
    }
}
