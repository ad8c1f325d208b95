//! The server's persistent state: the token-signing key, the user, a log of issued tokens,
//! the advertise configuration, the runners and the projects. One JSON document at the `-db` path (where
//! Waypoint keeps its bolt database), written atomically with mode 0600.
//!
//! As in Waypoint, a server is bootstrapped exactly when it has a signing key: the key is made
//! by the bootstrap itself, persisted in the same atomic write as the bootstrap user, before
//! the token is handed out, so neither a crash nor a restart can open a second bootstrap.
//! Tokens are verified with the key (see [`crate::token`]); the `tokens` list is only a log for
//! tests (which token the bootstrap issued) and is never consulted to authenticate.
//!
//! A snapshot is this document behind a magic line; a restore is staged next to the database
//! as `waypoint-restore.db` and applied by the next [`StateStore::open`], as Waypoint does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::write_atomic;
use crate::now_rfc3339;
use crate::project::{Project, project_id};
use crate::token::{self, KEY_ID};

/// What a token was issued as (the log's view; the token itself says login or runner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// The one token `server bootstrap` hands out (a login token).
    Bootstrap,
    /// A token from `token new` or `user token`.
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

/// One issued token, logged for tests. The file is 0600.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub kind: TokenKind,
    pub secret: String,
    pub issued_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<String>,
}

/// `server config-set -advertise-addr=…` (or `server run -advertise-addr=…`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertise {
    pub addr: String,
    pub tls: bool,
    pub tls_skip_verify: bool,
}

/// A runner's adoption state, as Waypoint names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Adoption {
    Pending,
    Preadopted,
    Adopted,
    Rejected,
}

impl Adoption {
    pub fn as_str(self) -> &'static str {
        match self {
            Adoption::Pending => "pending",
            Adoption::Preadopted => "preadopted",
            Adoption::Adopted => "adopted",
            Adoption::Rejected => "rejected",
        }
    }
}

/// A registered runner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerRecord {
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_adoption")]
    pub adoption_state: Adoption,
    pub docker_ok: bool,
    pub docker_version: Option<String>,
    pub first_seen: String,
    pub last_seen: String,
}

fn default_adoption() -> Adoption {
    Adoption::Preadopted
}

/// The persisted document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedState {
    /// Marks the file as the stand-in's, not a Waypoint bolt database.
    pub standin: bool,
    pub format: u32,
    /// Whether the server was bootstrapped (it has a signing key); kept for readers.
    pub bootstrapped: bool,
    pub bootstrapped_at: Option<String>,
    /// Token-signing keys by id, hex. Empty until the bootstrap.
    #[serde(default)]
    pub hmac_keys: BTreeMap<String, String>,
    /// User ids (the bootstrap creates Waypoint's default user).
    #[serde(default)]
    pub users: Vec<String>,
    pub tokens: Vec<TokenRecord>,
    pub advertise: Option<Advertise>,
    pub runners: BTreeMap<String, RunnerRecord>,
    /// Projects by id (the name in lower case, as Waypoint keys them). Absent from state files
    /// written before the stand-in modelled projects.
    #[serde(default)]
    pub projects: BTreeMap<String, Project>,
}

impl Default for PersistedState {
    fn default() -> Self {
        PersistedState {
            standin: true,
            format: 2,
            bootstrapped: false,
            bootstrapped_at: None,
            hmac_keys: BTreeMap::new(),
            users: Vec::new(),
            tokens: Vec::new(),
            advertise: None,
            runners: BTreeMap::new(),
            projects: BTreeMap::new(),
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

/// The first line of a stand-in snapshot.
pub const SNAPSHOT_MAGIC: &str = "waypoint-standin-snapshot 1";
/// Where a staged restore waits for the next start, next to the database.
pub const RESTORE_FILE: &str = "waypoint-restore.db";

/// Why the database could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// Reading it failed (Go's `open PATH: reason`).
    Io(String),
    /// It is not a stand-in state file (bolt says `invalid database`).
    Invalid(String),
    /// Writing the fresh or restored state failed.
    Write(Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Io(e) => write!(f, "{e}"),
            OpenError::Invalid(_) => write!(f, "invalid database"),
            OpenError::Write(e) => write!(f, "{e}"),
        }
    }
}

/// The state and the file it lives in. Every change goes through [`StateStore::commit`], which
/// writes first and updates memory only when the write succeeded.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    state: PersistedState,
    /// Set when the open applied a staged restore.
    pub restored: bool,
}

impl StateStore {
    /// Opens the state at `path`: applies a staged restore first, creates (and persists) an
    /// empty state on first start.
    pub fn open(path: &Path) -> std::result::Result<Self, OpenError> {
        let staged = restore_path(path);
        let mut restored = false;
        if staged.exists() {
            std::fs::rename(&staged, path)
                .map_err(|e| OpenError::Io(crate::context::go_path_error("rename", path, &e)))?;
            restored = true;
        }
        match std::fs::read(path) {
            // An empty file is a new database for bolt too (a crash right after creating it).
            Ok(bytes) if bytes.is_empty() => {
                let mut store = StateStore {
                    path: path.to_path_buf(),
                    state: PersistedState::default(),
                    restored,
                };
                store
                    .commit(PersistedState::default())
                    .map_err(OpenError::Write)?;
                Ok(store)
            }
            Ok(bytes) => {
                let mut state: PersistedState = serde_json::from_slice(&bytes).map_err(|e| {
                    OpenError::Invalid(format!(
                        "{} is not a stand-in state file (a real Waypoint database?): {e}",
                        path.display()
                    ))
                })?;
                if !state.standin {
                    return Err(OpenError::Invalid(format!(
                        "{} is not a stand-in state file",
                        path.display()
                    )));
                }
                let mut store = StateStore {
                    path: path.to_path_buf(),
                    state: state.clone(),
                    restored,
                };
                // Format 1 (hex tokens, no key): a bootstrapped server gets a key, so it stays
                // bootstrapped; its old hex tokens fail like foreign tokens would.
                if state.format < 2 {
                    state.format = 2;
                    if state.bootstrapped && state.hmac_keys.is_empty() {
                        state.hmac_keys.insert(
                            KEY_ID.into(),
                            token::new_key_hex().map_err(OpenError::Write)?,
                        );
                        state.users = vec![token::DEFAULT_USER_ID.into()];
                    }
                    store.commit(state).map_err(OpenError::Write)?;
                }
                Ok(store)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Like bolt.Open(path, 0600): create the file, with Go's error when that fails
                // (e.g. a missing directory: nothing creates it).
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| OpenError::Io(crate::context::go_path_error("open", path, &e)))?;
                let mut store = StateStore {
                    path: path.to_path_buf(),
                    state: PersistedState::default(),
                    restored,
                };
                store
                    .commit(PersistedState::default())
                    .map_err(OpenError::Write)?;
                Ok(store)
            }
            Err(e) => Err(OpenError::Io(crate::context::go_path_error(
                "open", path, &e,
            ))),
        }
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.path
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

    /// Whether the server is bootstrapped (has a signing key).
    pub fn bootstrapped(&self) -> bool {
        !self.state.hmac_keys.is_empty()
    }

    /// The signing key with id `id`.
    pub fn key(&self, id: &str) -> Option<Vec<u8>> {
        self.state.hmac_keys.get(id).and_then(|k| token::unhex(k))
    }

    /// Bootstraps the server if it has no signing key yet; see the module docs.
    pub fn bootstrap(&mut self) -> Result<Bootstrap> {
        if self.bootstrapped() {
            return Ok(Bootstrap::AlreadyBootstrapped);
        }
        let key_hex = token::new_key_hex()?;
        let key = token::unhex(&key_hex).unwrap_or_default();
        let token = token::encode(&token::Body::login(token::DEFAULT_USER_ID, None), &key)?;
        let now = now_rfc3339();
        let mut next = self.state.clone();
        next.hmac_keys.insert(KEY_ID.into(), key_hex);
        next.users = vec![token::DEFAULT_USER_ID.into()];
        next.bootstrapped = true;
        next.bootstrapped_at = Some(now.clone());
        next.tokens.push(TokenRecord {
            kind: TokenKind::Bootstrap,
            secret: token.clone(),
            issued_at: now,
            runner_id: None,
            valid_until: None,
        });
        self.commit(next)?;
        Ok(Bootstrap::Minted(token))
    }

    /// Signs `body` (creating the key first if there is none, as Waypoint's lazy key does)
    /// and logs the token as `kind`.
    pub fn mint(&mut self, kind: TokenKind, body: &token::Body) -> Result<String> {
        let mut next = self.state.clone();
        if !next.hmac_keys.contains_key(KEY_ID) {
            next.hmac_keys.insert(KEY_ID.into(), token::new_key_hex()?);
            next.bootstrapped = true;
        }
        let key = token::unhex(&next.hmac_keys[KEY_ID]).unwrap_or_default();
        let secret = token::encode(body, &key)?;
        next.tokens.push(TokenRecord {
            kind,
            secret: secret.clone(),
            issued_at: now_rfc3339(),
            runner_id: (body.kind == token::Kind::Runner).then(|| body.subject.clone()),
            valid_until: body.valid_until.map(|(s, n)| token::go_time_string(s, n)),
        });
        self.commit(next)?;
        Ok(secret)
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

    /// A runner's record.
    pub fn runner(&self, id: &str) -> Option<&RunnerRecord> {
        self.state.runners.get(&id.to_lowercase())
    }

    /// Waypoint's `RunnerCreate` (an upsert keeping first-seen and adoption state, resetting
    /// adoption to pending when the labels changed), then pre-adoption of a runner that is not
    /// adopted, unless it is rejected. Returns the resulting adoption state.
    pub fn register_runner(
        &mut self,
        id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Adoption> {
        let now = now_rfc3339();
        let key = id.to_lowercase();
        let mut next = self.state.clone();
        let record = match next.runners.get(&key) {
            Some(old) => RunnerRecord {
                id: id.to_string(),
                labels: labels.clone(),
                adoption_state: if &old.labels == labels {
                    old.adoption_state
                } else {
                    Adoption::Pending
                },
                docker_ok: old.docker_ok,
                docker_version: old.docker_version.clone(),
                first_seen: old.first_seen.clone(),
                last_seen: now,
            },
            None => RunnerRecord {
                id: id.to_string(),
                labels: labels.clone(),
                adoption_state: Adoption::Pending,
                docker_ok: false,
                docker_version: None,
                first_seen: now.clone(),
                last_seen: now,
            },
        };
        let mut record = record;
        if !matches!(
            record.adoption_state,
            Adoption::Rejected | Adoption::Adopted
        ) {
            record.adoption_state = Adoption::Preadopted;
        }
        let state = record.adoption_state;
        next.runners.insert(key, record);
        self.commit(next)?;
        Ok(state)
    }

    /// Waypoint's `RunnerOffline`: a remote runner that is pending or pre-adopted is deleted
    /// when its configuration stream ends; adopted and rejected ones are kept.
    pub fn runner_offline(&mut self, id: &str) -> Result<bool> {
        let key = id.to_lowercase();
        match self.state.runners.get(&key) {
            Some(r) if matches!(r.adoption_state, Adoption::Pending | Adoption::Preadopted) => {
                let mut next = self.state.clone();
                next.runners.remove(&key);
                self.commit(next)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Records what a runner reports about Docker; persisted only when it changed. Returns
    /// false when the runner is not registered.
    pub fn report_docker(
        &mut self,
        id: &str,
        docker_ok: bool,
        docker_version: Option<String>,
    ) -> Result<bool> {
        let key = id.to_lowercase();
        let Some(r) = self.state.runners.get_mut(&key) else {
            return Ok(false);
        };
        if r.docker_ok == docker_ok && r.docker_version == docker_version {
            return Ok(true);
        }
        let mut next = self.state.clone();
        if let Some(r) = next.runners.get_mut(&key) {
            r.docker_ok = docker_ok;
            r.docker_version = docker_version;
        }
        self.commit(next)?;
        Ok(true)
    }

    /// Waypoint's `RunnerDelete` (`runner forget`): removes the record; forgetting an unknown
    /// id is not an error.
    pub fn forget_runner(&mut self, id: &str) -> Result<()> {
        let key = id.to_lowercase();
        if !self.state.runners.contains_key(&key) {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.runners.remove(&key);
        self.commit(next)
    }

    /// A project by name (looked up in lower case, as Waypoint's `projectGet` does).
    pub fn project(&self, name: &str) -> Option<&Project> {
        self.state.projects.get(&project_id(name))
    }

    /// Waypoint's `ProjectPut`: creates or replaces the project under its id, keeping the
    /// applications of the one it replaces.
    pub fn put_project(&mut self, mut project: Project) -> Result<()> {
        let id = project_id(&project.name);
        if let Some(prev) = self.state.projects.get(&id) {
            project.applications = prev.applications.clone();
        }
        let mut next = self.state.clone();
        next.projects.insert(id, project);
        self.commit(next)
    }

    /// The snapshot document: the magic line and the whole state, signing keys included.
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        let mut out = format!("{SNAPSHOT_MAGIC}\n").into_bytes();
        out.extend(
            serde_json::to_vec_pretty(&self.state).map_err(|source| Error::Json {
                context: "failed to encode the snapshot".into(),
                source,
            })?,
        );
        out.push(b'\n');
        Ok(out)
    }

    /// Validates `snapshot` and stages it next to the database for the next start.
    pub fn stage_restore(&self, snapshot: &[u8]) -> std::result::Result<(), String> {
        let state = parse_snapshot(snapshot)?;
        let json = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
        let staged = restore_path(&self.path);
        write_atomic(&staged, &json, 0o600).map_err(|e| e.to_string())
    }
}

/// The staged-restore path for database `db`.
pub fn restore_path(db: &Path) -> PathBuf {
    match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(RESTORE_FILE),
        _ => PathBuf::from(RESTORE_FILE),
    }
}

/// Reads a stand-in snapshot.
pub fn parse_snapshot(bytes: &[u8]) -> std::result::Result<PersistedState, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "snapshot is not valid".to_string())?;
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    if first.trim() != SNAPSHOT_MAGIC {
        return Err("snapshot header is invalid: not a stand-in snapshot".into());
    }
    let state: PersistedState =
        serde_json::from_str(rest).map_err(|e| format!("snapshot data is invalid: {e}"))?;
    if !state.standin {
        return Err("snapshot data is invalid: not stand-in state".into());
    }
    Ok(state)
}

/// Creates the directory of the data dir, as the open needs it.
pub fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .io_context(|| format!("failed to create data dir {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstraps_once_even_across_reopen_and_tokens_verify_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        let mut store = StateStore::open(&path).unwrap();
        assert!(path.exists(), "made at first start, like Waypoint's db");
        assert!(!store.bootstrapped());
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
        let body = token::decode(&token, &|id| reopened.key(id)).unwrap();
        assert_eq!(body.subject, token::DEFAULT_USER_ID);
        assert_eq!(reopened.state().tokens[0].kind, TokenKind::Bootstrap);
        assert_eq!(reopened.state().tokens[0].secret, token);
    }

    #[test]
    fn failed_persist_leaves_the_server_unbootstrapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/data.db");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let mut store = StateStore::open(&path).unwrap();
        std::fs::remove_dir_all(dir.path().join("sub")).unwrap();
        assert!(store.bootstrap().is_err());
        assert!(!store.bootstrapped());
        assert!(store.state().tokens.is_empty());
    }

    #[test]
    fn preadopted_runners_vanish_when_offline_adopted_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::open(&dir.path().join("data.db")).unwrap();
        let labels = BTreeMap::new();
        assert_eq!(
            store.register_runner("r1", &labels).unwrap(),
            Adoption::Preadopted
        );
        assert!(store.report_docker("r1", true, Some("24".into())).unwrap());
        assert!(store.runner_offline("r1").unwrap());
        assert!(store.runner("r1").is_none());
        assert!(!store.report_docker("r1", true, None).unwrap());
        store.register_runner("r2", &labels).unwrap();
        store.forget_runner("r2").unwrap();
        store.forget_runner("never-seen").unwrap();
        assert!(store.state().runners.is_empty());
    }

    #[test]
    fn restores_are_staged_and_applied_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        let mut store = StateStore::open(&path).unwrap();
        let snapshot = store.snapshot().unwrap();
        let Bootstrap::Minted(_) = store.bootstrap().unwrap() else {
            panic!()
        };
        assert!(store.stage_restore(b"nope").is_err());
        store.stage_restore(&snapshot).unwrap();
        assert!(
            store.bootstrapped(),
            "nothing changes before the next start"
        );
        drop(store);
        let store = StateStore::open(&path).unwrap();
        assert!(store.restored);
        assert!(
            !store.bootstrapped(),
            "a pre-bootstrap snapshot is bootstrappable again"
        );
        assert!(!restore_path(&path).exists());
    }

    #[test]
    fn projects_are_keyed_in_lower_case_and_keep_their_applications() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        let mut store = StateStore::open(&path).unwrap();
        let web = Project {
            name: "Web".into(),
            remote_enabled: true,
            ..Project::default()
        };
        store.put_project(web.clone()).unwrap();
        assert_eq!(store.project("WEB"), Some(&web));
        assert_eq!(store.state().projects.keys().collect::<Vec<_>>(), ["web"]);
        // Applications come from the stored project, never from the upsert.
        let mut stored = store.state().clone();
        if let Some(p) = stored.projects.get_mut("web") {
            p.applications = vec!["app".into()];
        }
        store.commit(stored).unwrap();
        store
            .put_project(Project {
                name: "web".into(),
                applications: vec!["other".into()],
                ..Project::default()
            })
            .unwrap();
        drop(store);
        let store = StateStore::open(&path).unwrap();
        let p = store.project("web").unwrap();
        assert_eq!(p.name, "web", "the name as last given");
        assert_eq!(p.applications, ["app"]);
        assert!(!p.remote_enabled, "everything else replaced");
    }

    #[test]
    fn state_files_from_before_projects_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        std::fs::write(
            &path,
            br#"{"standin":true,"format":2,"bootstrapped":false,"bootstrapped_at":null,
                "hmac_keys":{},"users":[],"tokens":[],"advertise":null,"runners":{}}"#,
        )
        .unwrap();
        let mut store = StateStore::open(&path).unwrap();
        assert!(store.state().projects.is_empty());
        store
            .put_project(Project {
                name: "p".into(),
                ..Project::default()
            })
            .unwrap();
        let snapshot = store.snapshot().unwrap();
        let parsed = parse_snapshot(&snapshot).unwrap();
        assert!(
            parsed.projects.contains_key("p"),
            "snapshots carry projects"
        );
    }

    #[test]
    fn refuses_a_file_that_is_not_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        std::fs::write(&path, b"\x00bolt").unwrap();
        let err = StateStore::open(&path).unwrap_err();
        assert_eq!(err.to_string(), "invalid database");
        assert!(matches!(err, OpenError::Invalid(d) if d.contains("not a stand-in state file")));
    }
}
