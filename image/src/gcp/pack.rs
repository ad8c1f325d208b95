//! The disk in the form Compute Engine imports: `disk.raw` alone in a gzip'd tar, GNU format,
//! sparse (Google's recipe: `tar --format=oldgnu -Sczf image.tar.gz disk.raw`).
//!
//! GNU tar rather than the `tar` crate: the crate (0.4.46) does write old-GNU sparse entries
//! too, but gzip would then be one more dependency (flate2), and GNU tar is the tool Google
//! documents and tests its importer with, on every Debian machine like sfdisk. It writes to a
//! temporary file next to the disk (removed when dropped, on success, failure or signal): the
//! upload then knows its size and MD5 before it starts and can resend a chunk after an error.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine as _;
use md5::{Digest as _, Md5};
use tempfile::NamedTempFile;

use super::cancel::Cancel;
use super::error::{GcpError, Result};
use super::storage::Sent;

/// The tarball and what the upload must send.
#[derive(Debug)]
pub struct Package {
    pub file: NamedTempFile,
    pub sent: Sent,
}

impl Package {
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// Packs `disk` as `disk.raw` into a temporary `.NAME.XXXX.tar.gz` in the disk's directory.
pub async fn package(disk: &Path, cancel: &Cancel) -> Result<Package> {
    let fail = |reason: String| GcpError::Package {
        path: disk.to_owned(),
        reason,
    };
    let dir = disk
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_owned);
    let file_name = disk
        .file_name()
        .ok_or_else(|| fail("the disk path has no file name".into()))?;
    let stem = disk
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = tempfile::Builder::new()
        .prefix(&format!(".{stem}."))
        .suffix(".tar.gz")
        .tempfile_in(&dir)
        .map_err(|e| {
            fail(format!(
                "cannot make a temporary file in {}: {e}",
                dir.display()
            ))
        })?;
    let mut child = tokio::process::Command::new("tar")
        // -S: holes are recorded, not stored; oldgnu: the format Compute Engine reads; the
        // member is renamed to disk.raw whatever the disk's name; owner and group 0 so the
        // archive does not depend on who built it.
        .args([
            "--format=oldgnu",
            "--sparse",
            "--create",
            "--gzip",
            "--file",
        ])
        .arg(file.path())
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--transform=s,.*,disk.raw,",
            "--directory",
        ])
        .arg(&dir)
        .arg("--")
        .arg(file_name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run GNU tar ({e}); install it (apt-get install tar gzip)"
            ))
        })?;
    let mut stderr = child.stderr.take();
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| fail(format!("waiting for tar: {e}")))?,
        () = cancel.cancelled() => {
            // kill_on_drop would do it too; killed here so that it is gone before the
            // temporary file is removed.
            let _ = child.kill().await;
            return Err(GcpError::Cancelled);
        }
    };
    if !status.success() {
        let mut msg = String::new();
        if let Some(e) = stderr.as_mut() {
            use tokio::io::AsyncReadExt as _;
            let _ = e.read_to_string(&mut msg).await;
        }
        return Err(fail(format!("tar {status}: {}", msg.trim())));
    }
    let path = file.path().to_owned();
    let sent = tokio::task::spawn_blocking(move || digest(&path))
        .await
        .map_err(|e| fail(format!("hashing the tarball: {e}")))?
        .map_err(|e| fail(format!("hashing the tarball: {e}")))?;
    Ok(Package { file, sent })
}

/// Size and base64 MD5 (Cloud Storage's `md5Hash`) of a file.
fn digest(path: &Path) -> std::io::Result<Sent> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Sent {
        size,
        md5: base64::engine::general_purpose::STANDARD.encode(h.finalize()),
    })
}
