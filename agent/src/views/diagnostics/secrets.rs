//! Where the secrets the agent knows live, read into a [`Redactor`] (see `layout.rs` for the
//! state directory's files and `config/database.rs`, `config/endpoint.rs`, `config/server.rs`
//! for the ones the configuration names):
//!
//! | kind | where |
//! |---|---|
//! | bootstrap, runner and other Waypoint tokens | `STATE_DIR/waypoint/*-token` |
//! | database password | `STATE_DIR/database/password` and `password.pending` |
//! | admin password | `database.admin_password` or the file `database.admin_password_file` |
//! | endpoint tokens | their hashes: `endpoint.tokens[].sha256` / `sha256_file` (and the single-token form); a runner host's `server.token_file` holds one in clear |
//! | private keys | every `*.pem` under `STATE_DIR/pki` and `STATE_DIR/waypoint` that holds a `PRIVATE KEY` block: each line of its body |
//!
//! A file that exists but cannot be read (not root) is reported: its value cannot be
//! redacted, so the parts that could carry it are not collected.

use std::io;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::redact::{Redactor, SecretKind};
use crate::config::Config;
use crate::config::endpoint::{DEFAULT_TOKEN_SHA256_FILE, TokenHash, TokenSource};

/// How deep the key search goes under `STATE_DIR/pki` and `STATE_DIR/waypoint`.
const KEY_SEARCH_DEPTH: usize = 3;
/// Larger `.pem` files are not keys of the agent's.
const KEY_FILE_MAX: u64 = 64 * 1024;

/// The secrets found, and what could not be read.
#[derive(Debug, Default)]
pub struct KnownSecrets {
    pub redactor: Redactor,
    /// Values found per kind (one per file or setting; hashes for endpoint tokens).
    pub found: Vec<(SecretKind, PathBuf)>,
    /// Secret files that exist but could not be read, with why.
    pub unreadable: Vec<String>,
    /// Other remarks for the MANIFEST (a short secret, the configuration not loaded).
    pub notes: Vec<String>,
}

impl KnownSecrets {
    fn value(&mut self, kind: SecretKind, source: &Path, value: &str) {
        if value.trim().is_empty() {
            return;
        }
        if value.trim().chars().count() < 8 {
            self.notes.push(format!(
                "the {kind} in {} is shorter than 8 characters: its redaction may also hide \
                 unrelated text",
                source.display()
            ));
        }
        self.redactor.add_value(kind, value);
        self.found.push((kind, source.to_path_buf()));
    }

    /// Reads a secret file; absent is fine, unreadable is recorded.
    fn file(&mut self, kind: SecretKind, path: &Path) {
        match read_small(path) {
            Ok(Some(text)) => {
                // Every line too: a file of several lines holds several values.
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    if line.trim() != text.trim() {
                        self.redactor.add_value(kind, line);
                    }
                }
                self.value(kind, path, &text);
            }
            Ok(None) => {}
            Err(e) => self
                .unreadable
                .push(format!("cannot read {}: {e}", path.display())),
        }
    }

    fn token_hash_file(&mut self, path: &Path) {
        match read_small(path) {
            Ok(Some(text)) => {
                if let Some(hash) = TokenHash::from_hex(&text) {
                    self.redactor.add_token_hash(*hash.as_bytes());
                    self.found
                        .push((SecretKind::EndpointToken, path.to_path_buf()));
                }
            }
            Ok(None) => {}
            Err(e) => self
                .unreadable
                .push(format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// A file's text (lossy UTF-8), `None` when absent; wiped from memory when dropped.
fn read_small(path: &Path) -> io::Result<Option<Zeroizing<String>>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            Ok(Some(Zeroizing::new(
                String::from_utf8_lossy(&bytes).into_owned(),
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads every secret of `config` (see the module docs). `loaded` is false when the
/// configuration did not load and `config` is the defaults: the files the default
/// configuration would name are read then too.
pub fn gather(config: &Config, loaded: bool) -> KnownSecrets {
    let mut k = KnownSecrets::default();
    let state = config.state();

    let waypoint = state.waypoint();
    match std::fs::read_dir(waypoint.dir()) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with("-token"))
                .collect();
            names.sort();
            for name in names {
                let kind = if name == "bootstrap-token" || name == "server-token" {
                    SecretKind::BootstrapToken
                } else if name.starts_with("runner-") {
                    SecretKind::RunnerToken
                } else {
                    SecretKind::WaypointToken
                };
                k.file(kind, &waypoint.dir().join(name));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => k
            .unreadable
            .push(format!("cannot list {}: {e}", waypoint.dir().display())),
    }

    let password = state.database_password();
    k.file(SecretKind::DatabasePassword, &password);
    let mut pending = password.into_os_string();
    pending.push(".pending");
    k.file(SecretKind::DatabasePassword, Path::new(&pending));

    if let Some(db) = &config.database {
        if let Some(p) = &db.admin_password {
            k.value(
                SecretKind::AdminPassword,
                Path::new("database.admin_password"),
                p.expose(),
            );
        }
        if let Some(file) = &db.admin_password_file {
            k.file(SecretKind::AdminPassword, file);
        }
    }

    if let Some(endpoint) = &config.endpoint {
        for token in &endpoint.tokens {
            match &token.source {
                TokenSource::File(path) => k.token_hash_file(path),
                TokenSource::Inline(hash) => {
                    k.redactor.add_token_hash(*hash.as_bytes());
                    k.found.push((
                        SecretKind::EndpointToken,
                        PathBuf::from(format!("endpoint token {}", token.name)),
                    ));
                }
            }
        }
    }
    if let Some(server) = &config.server {
        k.file(SecretKind::EndpointToken, &server.token_file);
    }
    if !loaded {
        // What the default configuration's user-data would have written.
        k.token_hash_file(Path::new(DEFAULT_TOKEN_SHA256_FILE));
        k.file(
            SecretKind::EndpointToken,
            Path::new(crate::config::server::DEFAULT_TOKEN_FILE),
        );
        k.notes.push(
            "the configuration did not load: the admin password and endpoint tokens it would \
             name are unknown, so only their default files and the shapes of secrets are \
             redacted"
                .to_string(),
        );
    }

    for dir in [
        state.pki().root().to_path_buf(),
        waypoint.dir().to_path_buf(),
    ] {
        find_keys(&mut k, &dir, KEY_SEARCH_DEPTH);
    }
    k
}

/// Adds the body lines of every PEM private key under `dir` (see [`KEY_SEARCH_DEPTH`]).
fn find_keys(k: &mut KnownSecrets, dir: &Path, depth: usize) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            k.unreadable
                .push(format!("cannot list {}: {e}", dir.display()));
            return;
        }
    };
    let mut paths: Vec<(PathBuf, bool)> = entries
        .flatten()
        .filter_map(|e| {
            let t = e.file_type().ok()?;
            Some((e.path(), t.is_dir()))
        })
        .collect();
    paths.sort();
    for (path, is_dir) in paths {
        if is_dir {
            if depth > 0 {
                find_keys(k, &path, depth - 1);
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "pem")
            || std::fs::metadata(&path).is_ok_and(|m| m.len() > KEY_FILE_MAX)
        {
            continue;
        }
        match read_small(&path) {
            Ok(Some(text)) if text.contains("PRIVATE KEY-----") => {
                let mut any = false;
                for line in text.lines() {
                    let line = line.trim();
                    if line.len() >= 16 && !line.starts_with("-----") {
                        k.redactor.add_value(SecretKind::PrivateKey, line);
                        any = true;
                    }
                }
                if any {
                    k.found.push((SecretKind::PrivateKey, path));
                }
            }
            Ok(_) => {}
            Err(e) => k
                .unreadable
                .push(format!("cannot read {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DatabaseSettings;
    use crate::config::EndpointConfig;
    use sha2::Digest;

    #[test]
    fn every_secret_of_the_state_dir_and_configuration_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let w = state.join("waypoint");
        std::fs::create_dir_all(&w).unwrap();
        std::fs::write(w.join("bootstrap-token"), "boot-0123456789abcdef\n").unwrap();
        std::fs::write(w.join("runner-2-token"), "runner-0123456789abcdef\n").unwrap();
        std::fs::write(w.join("advertise-address"), "203.0.113.7:9701\n").unwrap();
        std::fs::create_dir_all(state.join("database")).unwrap();
        std::fs::write(state.join("database/password"), "dbpass-0123456789\n").unwrap();
        std::fs::create_dir_all(state.join("pki/server")).unwrap();
        std::fs::write(
            state.join("pki/server/key.pem"),
            "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH\nshort\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::write(
            state.join("pki/server/cert.pem"),
            "-----BEGIN CERTIFICATE-----\nMIIBcertificatebodyline\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let admin = dir.path().join("admin-password");
        std::fs::write(&admin, "adminpass-0123\n").unwrap();
        let token = "endpoint-token-0123456789abcdef";
        let hash = dir.path().join("endpoint.sha256");
        let hex: String = sha2::Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(&hash, format!("{hex}\n")).unwrap();

        let mut db = DatabaseSettings::new("db", "admin");
        db.admin_password_file = Some(admin);
        let config = Config {
            state_dir: state,
            database: Some(db),
            endpoint: Some(EndpointConfig::with_admin_token(TokenSource::File(hash))),
            ..Config::default()
        };
        let k = gather(&config, true);
        assert!(k.unreadable.is_empty(), "{:?}", k.unreadable);
        let kinds: Vec<SecretKind> = k.found.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(
            kinds,
            [
                SecretKind::BootstrapToken,
                SecretKind::RunnerToken,
                SecretKind::DatabasePassword,
                SecretKind::AdminPassword,
                SecretKind::EndpointToken,
                SecretKind::PrivateKey,
            ]
        );
        let text = format!(
            "boot-0123456789abcdef runner-0123456789abcdef dbpass-0123456789 adminpass-0123 \
             {token} {hex} MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH MIIBcertificatebodyline \
             203.0.113.7:9701"
        );
        assert_eq!(
            k.redactor.redact(&text).text,
            "[REDACTED:bootstrap-token] [REDACTED:runner-token] [REDACTED:database-password] \
             [REDACTED:admin-password] [REDACTED:endpoint-token] \
             [REDACTED:endpoint-token-sha256] [REDACTED:private-key] MIIBcertificatebodyline \
             203.0.113.7:9701"
        );
    }

    #[test]
    fn an_unreadable_secret_file_is_reported() {
        // A directory where the password file should be: unreadable even for root (a file
        // of mode 0000 is not, and the tests run as root).
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("database/password")).unwrap();
        let config = Config {
            state_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let k = gather(&config, true);
        assert_eq!(k.unreadable.len(), 1, "{:?}", k.unreadable);
        assert!(
            k.unreadable[0].contains("database/password"),
            "{:?}",
            k.unreadable
        );
    }

    #[test]
    fn without_a_configuration_the_default_files_are_tried_and_it_is_said() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let k = gather(&config, false);
        assert!(
            k.notes.iter().any(|n| n.contains("did not load")),
            "{:?}",
            k.notes
        );
    }
}
