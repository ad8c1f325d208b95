//! Crash-safe file writes, used for every file the agent writes.
//!
//! A file is written to a temporary file in the same directory, created with its final mode
//! (so a key is 0600 before its first byte exists), fsynced, renamed over the target and the
//! directory fsynced: a reader (or the next run after a SIGKILL) sees the old file or the new
//! one, never a torn one. When the target already holds the same bytes and mode nothing is
//! written at all, so a converged host keeps its mtimes and dockerd sees no change.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of private keys and secrets.
pub const MODE_SECRET: u32 = 0o600;
/// Mode of certificates and other public files.
pub const MODE_PUBLIC: u32 = 0o644;
/// Mode of directories that hold keys.
pub const MODE_PRIVATE_DIR: u32 = 0o700;
/// Mode of directories whose content is not secret.
pub const MODE_PUBLIC_DIR: u32 = 0o755;

/// Marks our temporary files so that leftovers of a killed run can be told from other files.
const TEMP_MARK: &str = ".pilot-agent-";
const TEMP_SUFFIX: &str = ".tmp";

/// What [`write_atomic`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The file already had this content and mode: nothing was touched.
    Unchanged,
    /// Only the mode differed and was corrected in place (content and mtime kept).
    ModeFixed,
    /// The content was (re)written.
    Written,
}

impl WriteOutcome {
    /// True when the file on disk is different from before the call.
    pub fn changed(self) -> bool {
        self != WriteOutcome::Unchanged
    }
}

/// A file system operation that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct FsError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl FsError {
    pub fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        FsError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes `content` to `path` atomically with `mode`, unless the file already has exactly
/// this content and mode. The parent directory must exist.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<WriteOutcome, FsError> {
    let dir = parent_dir(path)?;
    let name = file_name(path)?;
    remove_stale_temps(dir, &name);

    match fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.len() == content.len() as u64 => {
            let current = fs::read(path).map_err(|e| FsError::new("read", path, e))?;
            if current == content {
                if meta.mode() & 0o7777 == mode {
                    return Ok(WriteOutcome::Unchanged);
                }
                fs::set_permissions(path, Permissions::from_mode(mode))
                    .map_err(|e| FsError::new("chmod", path, e))?;
                return Ok(WriteOutcome::ModeFixed);
            }
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(FsError::new("stat", path, e)),
    }

    // The temporary file is created with the final mode (tempfile passes it to open(2)), so
    // a secret is never readable by others, not even while empty.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}{TEMP_MARK}"))
        .suffix(TEMP_SUFFIX)
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| FsError::new("create temporary file in", dir, e))?;
    // open(2) applied the umask; set the exact mode (a no-op for 0600 under any usual umask).
    tmp.as_file()
        .set_permissions(Permissions::from_mode(mode))
        .map_err(|e| FsError::new("chmod", tmp.path(), e))?;
    tmp.write_all(content)
        .map_err(|e| FsError::new("write", tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| FsError::new("fsync", tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| FsError::new("rename temporary file to", path, e.error))?;
    sync_dir(dir)?;
    Ok(WriteOutcome::Written)
}

/// Creates `dir` (and missing parents) and gives `dir` itself `mode`; returns whether
/// anything changed. Parents are created with the usual 0755.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<bool, FsError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            if meta.mode() & 0o7777 == mode {
                return Ok(false);
            }
            fs::set_permissions(dir, Permissions::from_mode(mode))
                .map_err(|e| FsError::new("chmod", dir, e))?;
            Ok(true)
        }
        Ok(_) => Err(FsError::new(
            "create directory",
            dir,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| FsError::new("create directory", dir, e))?;
            fs::set_permissions(dir, Permissions::from_mode(mode))
                .map_err(|e| FsError::new("chmod", dir, e))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            Ok(true)
        }
        Err(e) => Err(FsError::new("stat", dir, e)),
    }
}

/// Reads a file that may be absent.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, FsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FsError::new("read", path, e)),
    }
}

/// Removes a file if it exists; returns whether it existed.
pub fn remove_if_exists(path: &Path) -> Result<bool, FsError> {
    match fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                sync_dir(dir)?;
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(FsError::new("remove", path, e)),
    }
}

/// An exclusive lock on a file, held until dropped (flock(2): released by the kernel when
/// the process dies, so a killed run never leaves a stale lock behind).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Takes the exclusive lock on `path` (created 0600 if absent) without waiting; `Ok(None)`
/// when another process holds it.
pub fn try_lock(path: &Path) -> Result<Option<FileLock>, FsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(MODE_SECRET)
        .open(path)
        .map_err(|e| FsError::new("open lock file", path, e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(FileLock { _file: file })),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(None),
        Err(e) => Err(FsError::new("lock", path, e.into())),
    }
}

fn sync_dir(dir: &Path) -> Result<(), FsError> {
    // The rename is durable only once the directory entry is on disk.
    let d = File::open(dir).map_err(|e| FsError::new("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| FsError::new("fsync directory", dir, e))
}

fn parent_dir(path: &Path) -> Result<&Path, FsError> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => Ok(p),
        _ => Ok(Path::new(".")),
    }
    .and_then(|p| {
        if p.is_dir() {
            Ok(p)
        } else {
            Err(FsError::new(
                "write",
                path,
                io::Error::new(io::ErrorKind::NotFound, "parent directory does not exist"),
            ))
        }
    })
}

fn file_name(path: &Path) -> Result<String, FsError> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            FsError::new(
                "write",
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
            )
        })
}

/// Removes temporary files that a killed run left next to `name`. Best effort: a leftover
/// is harmless (never read), only untidy.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}{TEMP_MARK}");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if file_name.starts_with(&prefix) && file_name.ends_with(TEMP_SUFFIX) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn mtime(p: &Path) -> SystemTime {
        fs::metadata(p).unwrap().modified().unwrap()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn writes_then_skips_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        assert_eq!(
            write_atomic(&p, b"secret", MODE_SECRET).unwrap(),
            WriteOutcome::Written
        );
        assert_eq!(fs::read(&p).unwrap(), b"secret");
        assert_eq!(mode(&p), 0o600);
        let before = mtime(&p);
        let ino = fs::metadata(&p).unwrap().ino();
        assert_eq!(
            write_atomic(&p, b"secret", MODE_SECRET).unwrap(),
            WriteOutcome::Unchanged
        );
        assert_eq!(mtime(&p), before);
        assert_eq!(
            fs::metadata(&p).unwrap().ino(),
            ino,
            "file must not be replaced"
        );
    }

    #[test]
    fn replaces_changed_content_by_rename() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", MODE_PUBLIC).unwrap();
        let ino = fs::metadata(&p).unwrap().ino();
        assert_eq!(
            write_atomic(&p, b"two!", MODE_PUBLIC).unwrap(),
            WriteOutcome::Written
        );
        assert_eq!(fs::read(&p).unwrap(), b"two!");
        assert_ne!(fs::metadata(&p).unwrap().ino(), ino, "written by rename");
        assert_eq!(mode(&p), 0o644);
    }

    #[test]
    fn fixes_mode_without_rewriting() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        fs::write(&p, b"k").unwrap();
        fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            write_atomic(&p, b"k", MODE_SECRET).unwrap(),
            WriteOutcome::ModeFixed
        );
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn secret_mode_despite_permissive_umask_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_atomic(&p, b"x", MODE_SECRET).unwrap();
        assert_eq!(mode(&p), 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }

    #[test]
    fn stale_temporary_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".daemon.json.pilot-agent-abc123.tmp");
        let foreign = dir.path().join(".daemon.json.swp");
        fs::write(&stale, b"half").unwrap();
        fs::write(&foreign, b"editor").unwrap();
        write_atomic(&dir.path().join("daemon.json"), b"{}", MODE_PUBLIC).unwrap();
        assert!(!stale.exists());
        assert!(foreign.exists(), "files that are not ours stay");
    }

    #[test]
    fn missing_parent_is_an_error_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope/file");
        let err = write_atomic(&p, b"x", MODE_PUBLIC).unwrap_err();
        assert!(err.to_string().contains("nope/file"), "{err}");
    }

    #[test]
    fn lock_is_exclusive_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = try_lock(&p).unwrap().expect("free lock");
        assert!(try_lock(&p).unwrap().is_none(), "second holder refused");
        drop(held);
        assert!(try_lock(&p).unwrap().is_some());
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn ensure_dir_sets_mode_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        assert!(ensure_dir(&d, MODE_PRIVATE_DIR).unwrap());
        assert_eq!(mode(&d), 0o700);
        assert!(!ensure_dir(&d, MODE_PRIVATE_DIR).unwrap());
        fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        assert!(ensure_dir(&d, MODE_PRIVATE_DIR).unwrap());
        assert_eq!(mode(&d), 0o700);
    }
}
