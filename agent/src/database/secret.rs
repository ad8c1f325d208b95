//! The application password: its redacting [`Secret`] type, generation, and the 0600 files
//! that hold it under the agent's state directory.
//!
//! Two files live side by side:
//! - `<secret_path>`: the password the role has (after the last successful run). This is what
//!   the credentials output reads.
//! - `<secret_path>.pending`: a new password during a rotation, written before the server is
//!   told and promoted over `<secret_path>` only after `ALTER ROLE` committed. See
//!   `super::provision` for why this ordering is crash-safe.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::error::DatabaseError;
use crate::fsutil;

/// Characters of a generated password: the URL-safe base64 alphabet. 64 symbols, so a random
/// byte masked to 6 bits picks one uniformly, and the password needs no escaping in a
/// `postgres://` URL, a shell or YAML.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// 43 symbols of 6 bits = 258 bits of entropy, as much as 32 random bytes in base64url.
pub(crate) const GENERATED_LEN: usize = 43;

pub use pilot_values::Secret;

/// Reads the stored application password (for the credentials output). The file is only
/// read: a missing file is an error (`NotFound` in the source), never a reason to make one.
pub fn read_password(secret_path: &Path) -> Result<Secret, DatabaseError> {
    match read_secret_file(secret_path)? {
        Some(secret) => Ok(secret),
        None => Err(DatabaseError::secret(
            secret_path,
            io::Error::new(
                io::ErrorKind::NotFound,
                "no stored password: the database step has not converged yet",
            ),
        )),
    }
}

/// Reads a password file, dropping one trailing newline (`\n` or `\r\n`) so files written by
/// `echo` or an editor work. An empty file is an error: using it would mean an empty password.
pub(crate) fn read_secret_file(path: &Path) -> Result<Option<Secret>, DatabaseError> {
    let Some(bytes) = fsutil::read_optional(path).map_err(|e| DatabaseError::secret(path, e))?
    else {
        return Ok(None);
    };
    let bytes = Zeroizing::new(bytes);
    pilot_values::secret::secret_from_line(&bytes)
        .map(Some)
        .map_err(|why| DatabaseError::secret(path, io::Error::new(io::ErrorKind::InvalidData, why)))
}

/// Makes a new random password from the OS generator (getrandom(2)).
pub(crate) fn generate_password() -> io::Result<Secret> {
    let mut bytes = Zeroizing::new([0u8; GENERATED_LEN]);
    getrandom::fill(bytes.as_mut())
        .map_err(|e| io::Error::other(format!("cannot get random bytes: {e}")))?;
    let text: String = bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 0x3f)]))
        .collect();
    Ok(Secret::new(text))
}

/// The stored password and its pending successor, as files.
pub(crate) struct SecretStore {
    current: PathBuf,
    pending: PathBuf,
}

impl SecretStore {
    pub(crate) fn new(secret_path: &Path) -> Self {
        let mut pending = secret_path.as_os_str().to_owned();
        pending.push(".pending");
        SecretStore {
            current: secret_path.to_path_buf(),
            pending: PathBuf::from(pending),
        }
    }

    pub(crate) fn current_path(&self) -> &Path {
        &self.current
    }

    /// Reads the stored password and corrects a mode looser than 0600 (an operator may have
    /// copied the file in by hand).
    pub(crate) fn read_current(&self) -> Result<Option<Secret>, DatabaseError> {
        let secret = read_secret_file(&self.current)?;
        if secret.is_some() {
            tighten_mode(&self.current)?;
        }
        Ok(secret)
    }

    pub(crate) fn read_pending(&self) -> Result<Option<Secret>, DatabaseError> {
        read_secret_file(&self.pending)
    }

    /// Persists `secret` as the stored password (temp file 0600, fsync, rename, fsync dir).
    pub(crate) fn write_current(&self, secret: &Secret) -> Result<(), DatabaseError> {
        write_secret(&self.current, secret)
    }

    pub(crate) fn write_pending(&self, secret: &Secret) -> Result<(), DatabaseError> {
        write_secret(&self.pending, secret)
    }

    /// Makes the pending password the stored one. Written as "copy atomically, then delete"
    /// rather than a bare rename so that every step is one of fsutil's durable operations; a
    /// crash between the two leaves both files with the same content, which the next run
    /// resolves like any leftover pending file (it logs in, and promotes again: a no-op).
    pub(crate) fn promote_pending(&self, secret: &Secret) -> Result<(), DatabaseError> {
        write_secret(&self.current, secret)?;
        self.discard_pending()
    }

    pub(crate) fn discard_pending(&self) -> Result<(), DatabaseError> {
        fsutil::remove_if_exists(&self.pending)
            .map(|_| ())
            .map_err(|e| DatabaseError::secret(&self.pending, e))
    }
}

fn write_secret(path: &Path, secret: &Secret) -> Result<(), DatabaseError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The state directory is created private if missing; an existing one keeps its mode
        // (it is the agent's state dir, owned by the config, not by this module).
        if !dir.is_dir() {
            fsutil::ensure_dir(dir, fsutil::MODE_PRIVATE_DIR)
                .map_err(|e| DatabaseError::secret(path, e))?;
        }
    }
    let mut content = Zeroizing::new(Vec::with_capacity(secret.expose().len() + 1));
    content.extend_from_slice(secret.expose().as_bytes());
    content.push(b'\n');
    fsutil::write_atomic(path, &content, fsutil::MODE_SECRET)
        .map(|_| ())
        .map_err(|e| DatabaseError::secret(path, e))
}

fn tighten_mode(path: &Path) -> Result<(), DatabaseError> {
    let meta = fs::metadata(path).map_err(|e| DatabaseError::secret(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "stored database password was readable by others; setting mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(fsutil::MODE_SECRET))
            .map_err(|e| DatabaseError::secret(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted_in_debug_and_display() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn generated_passwords_are_long_url_safe_and_distinct() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.expose().len(), GENERATED_LEN);
        assert!(a.expose().bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn read_trims_one_trailing_newline_and_rejects_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        fs::write(&p, "abc \r\n").unwrap();
        assert_eq!(read_password(&p).unwrap().expose(), "abc ");
        fs::write(&p, "abc").unwrap();
        assert_eq!(read_password(&p).unwrap().expose(), "abc");
        fs::write(&p, "\n").unwrap();
        let err = read_password(&p).unwrap_err();
        assert!(matches!(err, DatabaseError::Secret { .. }), "{err:?}");
        let missing = read_password(&dir.path().join("missing")).unwrap_err();
        assert!(
            matches!(missing, DatabaseError::Secret { .. }),
            "{missing:?}"
        );
    }

    #[test]
    fn store_writes_0600_and_promotes_pending() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::new(&dir.path().join("state/db-password"));
        store.write_current(&Secret::new("one")).unwrap();
        let mode = fs::metadata(store.current_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let state_mode = fs::metadata(dir.path().join("state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(state_mode & 0o777, 0o700);
        store.write_pending(&Secret::new("two")).unwrap();
        assert_eq!(store.read_current().unwrap().unwrap().expose(), "one");
        let pending = store.read_pending().unwrap().unwrap();
        store.promote_pending(&pending).unwrap();
        assert_eq!(store.read_current().unwrap().unwrap().expose(), "two");
        assert!(store.read_pending().unwrap().is_none());
    }

    #[test]
    fn loose_mode_is_tightened_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        fs::write(&p, "abc\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        SecretStore::new(&p).read_current().unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
