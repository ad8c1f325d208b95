//! Small system helpers the rest of the harness is built on: running commands with errors that
//! say what failed, polling with deadlines, processes (alive, command line, verified kill),
//! mounts from `/proc/self/mountinfo`, cgroup directories, and running code inside a network
//! namespace with `setns(2)`.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The interval between two looks at a condition that is being waited for.
pub(crate) const POLL: Duration = Duration::from_millis(25);

/// Renders a command for error messages: program and arguments, space separated.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion and returns its output, failing (with its stderr) when it
/// cannot start or exits non-zero.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs a command given as program and arguments; see [`run`].
pub(crate) fn run_args<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run(&mut cmd)
}

/// Polls `check` every [`POLL`] until it returns `Some`, or fails after `timeout` with `what`.
pub(crate) fn poll<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL);
    }
}

/// The last `lines` lines of a (log) file, for error messages; empty when unreadable.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    // Logs can grow large: the last 16 KiB always hold the lines that explain a failure.
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Writes a file by writing a sibling temp file and renaming it over, so readers (dockerd,
/// scripts) never see half a file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot rename {} into place", tmp.display()))
}

/// Removes `path` and everything below it, like `rm -rf --one-file-system`: a directory on
/// another file system than `path` (a mount that appeared below it) is left alone, and so are
/// the directories above it. Goes on after an error; returns the first one.
pub(crate) fn remove_tree_one_fs(path: &Path) -> io::Result<()> {
    let dev = fs::symlink_metadata(path)?.dev();
    let mut first_error = None;
    remove_entry(path, dev, &mut first_error);
    first_error.map_or(Ok(()), Err)
}

fn remove_entry(path: &Path, dev: u64, first_error: &mut Option<io::Error>) {
    let mut keep = |e: io::Error| {
        let e = io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        first_error.get_or_insert(e);
    };
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => return keep(e),
    };
    if !md.is_dir() {
        if let Err(e) = fs::remove_file(path) {
            keep(e);
        }
        return;
    }
    if md.dev() != dev {
        return keep(io::Error::other("on another file system, skipped"));
    }
    match fs::read_dir(path) {
        Ok(rd) => {
            for e in rd.flatten() {
                remove_entry(&e.path(), dev, first_error);
            }
        }
        Err(e) => {
            first_error.get_or_insert(e);
        }
    }
    if let Err(e) = fs::remove_dir(path) {
        first_error.get_or_insert(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The command line of a process with NULs turned into spaces; `None` when it is gone.
pub(crate) fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let s: String = String::from_utf8_lossy(&raw)
        .chars()
        .map(|c| if c == '\0' { ' ' } else { c })
        .collect();
    Some(s.trim_end().to_string())
}

/// The environment of a process as `KEY=VALUE` strings; empty when unreadable.
pub(crate) fn environ(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/environ"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The scheduler state letter of a process (`R`, `S`, `Z`, ...); `None` when it is gone.
fn state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces and parentheses: the state follows the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// Whether a process exists and is not a zombie (a zombie no longer runs anything; its parent
/// only has to reap it).
pub(crate) fn alive(pid: u32) -> bool {
    matches!(state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// All process ids on the machine, except this process.
pub(crate) fn all_pids() -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| *p != me)
        .collect()
}

/// Sends `sig` to `pid` (errors such as "no such process" are ignored: the caller re-checks).
pub(crate) fn signal(pid: u32, sig: i32) {
    let Ok(p) = i32::try_from(pid) else { return };
    if p <= 1 {
        return; // never signal init or a process group by accident
    }
    // SAFETY: kill(2) has no memory effects; a stale pid at worst yields ESRCH.
    unsafe {
        libc::kill(p, sig);
    }
}

/// Sends `sig` to `pid` only if its command line still contains `marker` (a recorded PID may
/// have been reused by an unrelated process). Returns whether it was sent.
pub(crate) fn signal_verified(pid: u32, marker: &str, sig: i32) -> bool {
    match cmdline(pid) {
        Some(c) if c.contains(marker) && alive(pid) => {
            signal(pid, sig);
            true
        }
        _ => false,
    }
}

/// Waits until none of `pids` is alive; returns those still alive after `timeout`.
pub(crate) fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        thread::sleep(POLL);
    }
}

/// Reads a PID file: the first whitespace-separated token (PostgreSQL's postmaster.pid has
/// more lines after it).
pub(crate) fn read_pidfile(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat); with
/// the PID it identifies a process uniquely.
pub(crate) fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come fields 3.. ; the start time is field 22, i.e. index 19 here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// The nsfs inode of a named network namespace (`/run/netns/NAME`), if it exists.
pub(crate) fn netns_inode(name: &str) -> Option<u64> {
    fs::metadata(format!("/run/netns/{name}"))
        .ok()
        .map(|m| m.ino())
}

/// The nsfs inode of the network namespace a process is in.
pub(crate) fn proc_netns_inode(pid: u32) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Runs `f` on a fresh thread that has first entered the network namespace at `ns_path`.
///
/// setns(2) with CLONE_NEWNET switches only the calling thread, so the rest of the process stays
/// where it is. Sockets keep the namespace they were made in, so a `TcpStream` opened by `f`
/// may be returned and used from any thread.
pub(crate) fn run_in_netns<T: Send>(ns_path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = fs::File::open(ns_path)
        .with_context(|| format!("cannot open network namespace {}", ns_path.display()))?;
    thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            // SAFETY: setns(2) on a valid fd we own; it only changes this thread's namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("setns into {}", ns_path.display()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside {} panicked", ns_path.display()))?
    })
}

// ---------------------------------------------------------------------------------------------
// Mounts

/// Undoes the octal escapes (`\040` for a space) that mountinfo uses in paths.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points in this mount namespace, in mount order.
pub(crate) fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect()
}

/// Mount points at or below `dir`.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mount_points()
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Unmounts everything at or below `dir`, deepest first, falling back to a lazy unmount; loops
/// because a path can carry stacked mounts (a dockerd restarted twice binds its data-root
/// onto itself twice).
pub(crate) fn unmount_all_under(dir: &Path) -> Result<()> {
    for _ in 0..16 {
        let mut mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        mounts.dedup();
        for m in mounts {
            umount(&m);
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        bail!("mounts left under {}: {left:?}", dir.display())
    }
}

/// Unmounts `path` (its topmost mount), detaching it lazily when it is busy.
pub(crate) fn umount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2(2) with a valid NUL-terminated path.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    if rc != 0 {
        // Busy (an open file, a process with its cwd there): detach it now; the kernel frees it
        // when the last user goes.
        // SAFETY: as above.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cgroups

/// Where cgroup hierarchies are mounted (v1 controllers below it, or the v2 root itself).
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Directories anywhere in the cgroup hierarchies whose name satisfies `wanted`, without
/// descending into the ones found. dockerd places a relative `cgroup-parent` below its own
/// cgroup, which differs per controller (memory may be nested deeper), hence the walk.
pub(crate) fn find_cgroups(wanted: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk_cgroups(Path::new(CGROUP_ROOT), 0, wanted, &mut found);
    found
}

fn walk_cgroups(dir: &Path, depth: usize, wanted: &dyn Fn(&str) -> bool, out: &mut Vec<PathBuf>) {
    if depth > 8 {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        let p = e.path();
        if e.file_name().to_str().is_some_and(wanted) {
            out.push(p);
        } else {
            walk_cgroups(&p, depth + 1, wanted, out);
        }
    }
}

/// One bottom-up pass of rmdir over a cgroup directory and its descendants (`find DIR -depth
/// -type d -exec rmdir`), errors ignored: the kernel refuses while tasks (even exiting ones)
/// are counted in it, so callers retry. Returns whether `dir` is gone.
pub(crate) fn rmdir_tree(dir: &Path) -> bool {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
    !dir.exists()
}

/// Every process in a cgroup directory and its descendants.
pub(crate) fn cgroup_procs(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_procs(&e.path()));
            }
        }
    }
    pids
}

/// Removes a cgroup directory and its descendants bottom-up (cgroup directories are removed
/// with rmdir; the files in them are virtual). Retries while the kernel still counts exiting
/// tasks in them.
pub(crate) fn remove_cgroup_tree(dir: &Path, timeout: Duration) -> Result<()> {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path(), timeout)?;
            }
        }
    }
    poll(
        timeout,
        &format!("rmdir {}", dir.display()),
        || match fs::remove_dir(dir) {
            Ok(()) => Ok(Some(())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(())),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("rmdir {}", dir.display())),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_removal_removes_files_directories_and_symlinks_not_their_targets() {
        let outside =
            std::env::temp_dir().join(format!("pilot-harness-sys-{}", std::process::id()));
        let root = outside.join("tree");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), "x").unwrap();
        fs::write(outside.join("target"), "kept").unwrap();
        std::os::unix::fs::symlink(outside.join("target"), root.join("a/link")).unwrap();
        remove_tree_one_fs(&root).unwrap();
        assert!(!root.exists());
        assert_eq!(fs::read_to_string(outside.join("target")).unwrap(), "kept");
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\"), r"/end\");
    }
}
