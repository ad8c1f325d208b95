//! Finding what harness objects left on the machine: network namespaces, links in the host
//! namespace, mounts, cgroups, processes and directories carrying a harness name (see
//! [`crate::names`]). The same scan drives the clean-up in `Drop` (scoped to exact names) and
//! [`leftovers`], which suites call after dropping everything to assert that nothing is left.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use crate::names::{CGROUP_PREFIX, OWNER_ENV, RUN_DIR, belongs_to, is_harness_name};
use crate::sys;

/// A process that belongs to a harness object, and why we think so.
#[derive(Debug, Clone)]
pub(crate) struct HarnessProc {
    pub pid: u32,
    pub owner: String,
    pub why: &'static str,
}

/// Harness names that follow a marker (`/run/pilot-harness/`, `pilot-harness-`) in `text`.
fn harness_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let run_dir = format!("{RUN_DIR}/");
    for marker in [run_dir.as_str(), CGROUP_PREFIX] {
        let mut rest = text;
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            let tok: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if is_harness_name(&tok) {
                out.push(tok);
            }
        }
    }
    out
}

/// Named network namespaces (in `/run/netns`) whose names satisfy `wanted`.
pub(crate) fn netns_names(wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
    let Ok(rd) = fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| is_harness_name(n) && wanted(n))
        .collect();
    v.sort();
    v
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
        let mut hit = |owner: String, why: &'static str| {
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
            && hit(owner, "owner environment variable")
        {
            continue;
        }
        if let Some(cmd) = sys::cmdline(pid)
            && harness_tokens(&cmd)
                .into_iter()
                .any(|t| hit(t, "command line"))
        {
            continue;
        }
        if let Ok(cg) = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            && harness_tokens(&cg).into_iter().any(|t| hit(t, "cgroup"))
        {
            continue;
        }
        if let Some(n) = sys::proc_netns_inode(pid).and_then(|i| ns_inodes.get(&i)) {
            hit(n.clone(), "network namespace");
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

fn scan(wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    for n in netns_names(wanted) {
        out.push(format!("network namespace {n}"));
    }
    if let Ok(rd) = fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            if let Some(n) = e.file_name().to_str()
                && is_harness_name(n)
                && wanted(n)
            {
                out.push(format!("link {n} in the host namespace"));
            }
        }
    }
    for m in sys::mount_points() {
        let owner = m
            .strip_prefix(RUN_DIR)
            .or_else(|_| m.strip_prefix("/run/netns"))
            .ok()
            .and_then(|rest| rest.components().next())
            .and_then(|c| c.as_os_str().to_str().map(str::to_string));
        if owner.is_some_and(|o| is_harness_name(&o) && wanted(&o)) {
            out.push(format!("mount {}", m.display()));
        }
    }
    for c in cgroups(wanted) {
        out.push(format!("cgroup {}", c.display()));
    }
    for p in processes(wanted) {
        out.push(format!(
            "process {} of {} ({}): {}",
            p.pid,
            p.owner,
            p.why,
            sys::cmdline(p.pid).unwrap_or_default()
        ));
    }
    if let Ok(rd) = fs::read_dir(RUN_DIR) {
        for e in rd.flatten() {
            if let Some(n) = e.file_name().to_str()
                && is_harness_name(n)
                && wanted(n)
            {
                out.push(format!(
                    "directory {}",
                    Path::new(RUN_DIR).join(n).display()
                ));
            }
        }
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
        assert!(harness_tokens("bash scripts/harness-clean").is_empty());
        assert!(harness_tokens("/run/pilot-harness/record").is_empty());
    }
}
