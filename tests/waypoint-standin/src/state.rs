//! The server's persistent state: the bootstrap marker, the tokens it issued, the advertise
//! configuration and the runners it has seen. One JSON document at the `-db` path (where
//! Waypoint keeps its database), written atomically with mode 0600.
//!
//! The one rule that matters to the agent lives here: a server can be bootstrapped only once.
//! The bootstrap token and the marker are persisted in the same atomic write before the token
//! is handed out, so neither a crash nor a restart can open a second bootstrap.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::write_atomic;
use crate::now_rfc3339;

/// What a token was issued as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// The one token `server bootstrap` hands out.
    Bootstrap,
    /// A token from `token new`.
    Login,
    /// A token from `runner token`.
    Runner,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Bootstrap => "bootstrap",
            TokenKind::Login => "login",
            TokenKind::Runner => "runner",
        }
    }
}

/// One issued token. Kept in clear in a 0600 file: the stand-in must hand it back to nobody,
/// only compare against it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub kind: TokenKind,
    pub secret: String,
    pub issued_at: String,
}

/// `server config-set -advertise-addr=…` (or `server run -advertise-addr=…`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertise {
    pub addr: String,
    pub tls: bool,
    pub tls_skip_verify: bool,
}

/// A runner that registered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerRecord {
    pub id: String,
    pub docker_ok: bool,
    pub docker_version: Option<String>,
    pub first_seen: String,
    pub last_seen: String,
}

/// The persisted document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedState {
    /// Marks the file as the stand-in's, not a Waypoint bolt database.
    pub standin: bool,
    pub format: u32,
    pub bootstrapped: bool,
    pub bootstrapped_at: Option<String>,
    pub tokens: Vec<TokenRecord>,
    pub advertise: Option<Advertise>,
    pub runners: BTreeMap<String, RunnerRecord>,
}

impl Default for PersistedState {
    fn default() -> Self {
        PersistedState {
            standin: true,
            format: 1,
            bootstrapped: false,
            bootstrapped_at: None,
            tokens: Vec::new(),
            advertise: None,
            runners: BTreeMap::new(),
        }
    }
}

/// Result of a bootstrap attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// First bootstrap: the new token, already persisted.
    Minted(String),
    /// Waypoint's answer to every later attempt.
    AlreadyBootstrapped,
}

/// The state and the file it lives in. Every change goes through [`StateStore::commit`], which
/// writes first and updates memory only when the write succeeded.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    state: PersistedState,
}

impl StateStore {
    /// Opens the state at `path`, creating (and persisting) an empty one on first start.
    pub fn open(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let state = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                    context: format!(
                        "{} is not a stand-in state file (a real Waypoint database?)",
                        path.display()
                    ),
                    source,
                })?;
                Ok(StateStore {
                    path: path.to_path_buf(),
                    state,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut store = StateStore {
                    path: path.to_path_buf(),
                    state: PersistedState::default(),
                };
                store.commit(PersistedState::default())?;
                Ok(store)
            }
            Err(e) => Err(e).io_context(|| format!("failed to read {}", path.display())),
        }
    }

    /// The current state.
    pub fn state(&self) -> &PersistedState {
        &self.state
    }

    fn commit(&mut self, next: PersistedState) -> Result<()> {
        let json = serde_json::to_vec_pretty(&next).map_err(|source| Error::Json {
            context: "failed to encode the server state".into(),
            source,
        })?;
        write_atomic(&self.path, &json, 0o600)?;
        self.state = next;
        Ok(())
    }

    /// Bootstraps the server if it never was; see the module docs.
    pub fn bootstrap(&mut self) -> Result<Bootstrap> {
        if self.state.bootstrapped {
            return Ok(Bootstrap::AlreadyBootstrapped);
        }
        let token = new_token()?;
        let now = now_rfc3339();
        let mut next = self.state.clone();
        next.bootstrapped = true;
        next.bootstrapped_at = Some(now.clone());
        next.tokens.push(TokenRecord {
            kind: TokenKind::Bootstrap,
            secret: token.clone(),
            issued_at: now,
        });
        self.commit(next)?;
        Ok(Bootstrap::Minted(token))
    }

    /// The kind of `candidate` if this server issued it. Compares against every token in
    /// constant time and never stops early, so timing tells nothing about near misses.
    pub fn authenticate(&self, candidate: &str) -> Option<TokenKind> {
        let mut found = None;
        for record in &self.state.tokens {
            if bool::from(record.secret.as_bytes().ct_eq(candidate.as_bytes())) {
                found = Some(record.kind);
            }
        }
        found
    }

    /// Issues and persists a new token.
    pub fn mint(&mut self, kind: TokenKind) -> Result<String> {
        let token = new_token()?;
        let mut next = self.state.clone();
        next.tokens.push(TokenRecord {
            kind,
            secret: token.clone(),
            issued_at: now_rfc3339(),
        });
        self.commit(next)?;
        Ok(token)
    }

    /// Sets and persists the advertise configuration.
    pub fn set_advertise(&mut self, advertise: Advertise) -> Result<()> {
        if self.state.advertise.as_ref() == Some(&advertise) {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.advertise = Some(advertise);
        self.commit(next)
    }

    /// Records a runner's registration or heartbeat.
    ///
    /// A new runner or a change in what it reports is persisted; a plain heartbeat only moves
    /// `last_seen` in memory, so a runner beating every 2 s does not fsync every 2 s.
    pub fn register_runner(
        &mut self,
        id: &str,
        docker_ok: bool,
        docker_version: Option<String>,
    ) -> Result<bool> {
        let now = now_rfc3339();
        match self.state.runners.get_mut(id) {
            Some(r) if r.docker_ok == docker_ok && r.docker_version == docker_version => {
                r.last_seen = now;
                Ok(false)
            }
            existing => {
                let first_seen = existing
                    .map(|r| r.first_seen.clone())
                    .unwrap_or_else(|| now.clone());
                let mut next = self.state.clone();
                next.runners.insert(
                    id.to_string(),
                    RunnerRecord {
                        id: id.to_string(),
                        docker_ok,
                        docker_version,
                        first_seen,
                        last_seen: now,
                    },
                );
                self.commit(next)?;
                Ok(true)
            }
        }
    }
}

/// A new random token: 32 bytes from the OS, hex-encoded.
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstraps_once_even_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        let mut store = StateStore::open(&path).unwrap();
        assert!(
            path.exists(),
            "the state file is made at first start, like Waypoint's db"
        );
        let Bootstrap::Minted(token) = store.bootstrap().unwrap() else {
            panic!("first bootstrap refused")
        };
        assert_eq!(store.bootstrap().unwrap(), Bootstrap::AlreadyBootstrapped);
        drop(store);

        let mut reopened = StateStore::open(&path).unwrap();
        assert_eq!(
            reopened.bootstrap().unwrap(),
            Bootstrap::AlreadyBootstrapped
        );
        assert_eq!(reopened.authenticate(&token), Some(TokenKind::Bootstrap));
    }

    #[test]
    fn failed_persist_leaves_the_server_unbootstrapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/data.db");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let mut store = StateStore::open(&path).unwrap();
        // Make the directory vanish so the write fails.
        std::fs::remove_dir_all(dir.path().join("sub")).unwrap();
        assert!(store.bootstrap().is_err());
        assert!(!store.state().bootstrapped);
        assert!(store.state().tokens.is_empty());
    }

    #[test]
    fn authenticates_only_issued_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::open(&dir.path().join("data.db")).unwrap();
        assert_eq!(store.authenticate(""), None);
        let Bootstrap::Minted(boot) = store.bootstrap().unwrap() else {
            panic!()
        };
        let login = store.mint(TokenKind::Login).unwrap();
        let runner = store.mint(TokenKind::Runner).unwrap();
        assert_ne!(boot, login);
        assert_eq!(store.authenticate(&boot), Some(TokenKind::Bootstrap));
        assert_eq!(store.authenticate(&login), Some(TokenKind::Login));
        assert_eq!(store.authenticate(&runner), Some(TokenKind::Runner));
        assert_eq!(store.authenticate(&boot[..63]), None);
        assert_eq!(store.authenticate(&format!("{boot}0")), None);
        assert_eq!(store.authenticate("wrong"), None);
        assert_eq!(store.authenticate(""), None);
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn runner_heartbeats_persist_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        let mut store = StateStore::open(&path).unwrap();
        assert!(store.register_runner("r1", false, None).unwrap());
        assert!(!store.register_runner("r1", false, None).unwrap());
        assert!(
            store
                .register_runner("r1", true, Some("20.10.24".into()))
                .unwrap()
        );
        let reopened = StateStore::open(&path).unwrap();
        assert_eq!(
            reopened.state().runners["r1"].docker_version.as_deref(),
            Some("20.10.24")
        );
    }

    #[test]
    fn refuses_a_file_that_is_not_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        std::fs::write(&path, b"\x00bolt").unwrap();
        let err = StateStore::open(&path).unwrap_err();
        assert!(
            err.to_string().contains("not a stand-in state file"),
            "{err}"
        );
    }
}
