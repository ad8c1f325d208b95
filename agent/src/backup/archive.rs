//! The backup file: a tar archive (`tar -tvf` lists it) whose first member is
//! `manifest.json` and whose other members are exactly the parts the manifest lists, each with
//! its size and SHA-256:
//!
//! ```text
//! manifest.json            format, time, host, versions, the parts
//! waypoint.snapshot        `waypoint server snapshot -` (holds the token-signing key)
//! tokens/bootstrap-token   the token the server handed out at its bootstrap
//! tokens/runner-N-token    runner N's token (its runner ID in the manifest)
//! advertise-address        what the server advertises, as last set
//! ```
//!
//! Reading checks everything before anything is used: a member that is not listed, listed
//! twice, of another size or digest, or missing, refuses the whole file. The checksums catch
//! corruption and edits of one part; they do not authenticate the file (whoever can rewrite it
//! can rewrite the manifest too: keep backups where only operators write).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's `format`.
pub const FORMAT: &str = "pilot-backup/1";
pub const MANIFEST: &str = "manifest.json";
pub const SNAPSHOT: &str = "waypoint.snapshot";
pub const BOOTSTRAP_TOKEN: &str = "tokens/bootstrap-token";
pub const ADVERTISE: &str = "advertise-address";

/// A manifest larger than this is not one the agent wrote.
const MAX_MANIFEST: u64 = 1 << 20;
/// The largest part read (a Waypoint database of many thousand deployments is far below).
const MAX_PART: u64 = 4 << 30;

/// The name of runner `index`'s token part.
pub fn runner_token_part(index: u32) -> String {
    format!("tokens/runner-{index}-token")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The host name of the VM backed up.
    pub host: String,
    pub agent_version: String,
    /// The server image (as configured) and its ID when the snapshot was taken.
    pub server_image: String,
    pub server_image_id: String,
    pub parts: Vec<PartInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// For a runner token: the Waypoint runner ID it was minted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<String>,
}

/// A part to write: its name, bytes and, for a runner token, its runner ID.
pub struct Part {
    pub name: String,
    pub data: Vec<u8>,
    pub runner_id: Option<String>,
}

/// A backup read back and verified.
pub struct Backup {
    pub manifest: Manifest,
    pub parts: BTreeMap<String, Vec<u8>>,
}

// Hand-written: the parts are secrets.
impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup")
            .field("manifest", &self.manifest)
            .field("parts", &self.parts.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Pilot backup: {why}")]
    NotABackup { path: String, why: String },
    #[error(
        "{path}: part {part} does not match the manifest ({why}); the file is damaged or was \
         edited, and nothing was restored"
    )]
    Mismatch {
        path: String,
        part: String,
        why: String,
    },
}

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The archive's bytes: the manifest (its `parts` filled in from `parts`) and the parts, in
/// that order; every member 0600 and owned by root, dated `mtime`.
pub fn encode(mut manifest: Manifest, parts: &[Part], mtime: u64) -> std::io::Result<Vec<u8>> {
    manifest.format = FORMAT.to_string();
    manifest.parts = parts
        .iter()
        .map(|p| PartInfo {
            name: p.name.clone(),
            size: p.data.len() as u64,
            sha256: sha256_hex(&p.data),
            runner_id: p.runner_id.clone(),
        })
        .collect();
    let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
    let mut builder = tar::Builder::new(Vec::new());
    let mut append = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, data)
    };
    append(MANIFEST, &manifest_json)?;
    for p in parts {
        append(&p.name, &p.data)?;
    }
    builder.into_inner()
}

/// Reads and verifies the backup at `path` (see the module docs).
pub fn read(path: &Path) -> Result<Backup, ArchiveError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ArchiveError::Io {
        path: shown.clone(),
        source,
    })?;
    decode(std::io::BufReader::new(file), &shown)
}

/// [`read`] from any reader; `shown` names the file in errors.
pub fn decode(reader: impl Read, shown: &str) -> Result<Backup, ArchiveError> {
    let not = |why: String| ArchiveError::NotABackup {
        path: shown.to_string(),
        why,
    };
    let io = |source| ArchiveError::Io {
        path: shown.to_string(),
        source,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(io)?;
    let mut manifest: Option<Manifest> = None;
    let mut parts = BTreeMap::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| not(format!("unreadable tar member: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| not(format!("unreadable member name: {e}")))?
            .to_string_lossy()
            .into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(not(format!("member {name} is not a regular file")));
        }
        let size = entry.size();
        let Some(m) = &manifest else {
            if name != MANIFEST {
                return Err(not(format!("the first member is {name}, not {MANIFEST}")));
            }
            if size > MAX_MANIFEST {
                return Err(not(format!("{MANIFEST} is {size} bytes")));
            }
            let mut text = Vec::new();
            entry.read_to_end(&mut text).map_err(io)?;
            let m: Manifest = serde_json::from_slice(&text)
                .map_err(|e| not(format!("{MANIFEST} does not parse: {e}")))?;
            if m.format != FORMAT {
                return Err(not(format!(
                    "format {:?}, this agent reads {FORMAT:?}",
                    m.format
                )));
            }
            let mut seen = std::collections::BTreeSet::new();
            for p in &m.parts {
                if !seen.insert(p.name.as_str()) || p.name == MANIFEST {
                    return Err(not(format!("{MANIFEST} lists {} twice", p.name)));
                }
            }
            if !m.parts.iter().any(|p| p.name == SNAPSHOT) {
                return Err(not(format!("{MANIFEST} lists no {SNAPSHOT}")));
            }
            manifest = Some(m);
            continue;
        };
        let mismatch = |why: String| ArchiveError::Mismatch {
            path: shown.to_string(),
            part: name.clone(),
            why,
        };
        let Some(info) = m.parts.iter().find(|p| p.name == name) else {
            return Err(mismatch("it is not listed".into()));
        };
        if parts.contains_key(&name) {
            return Err(mismatch("it is in the file twice".into()));
        }
        if size != info.size || size > MAX_PART {
            return Err(mismatch(format!(
                "{size} bytes, the manifest says {}",
                info.size
            )));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut data).map_err(io)?;
        if sha256_hex(&data) != info.sha256 {
            return Err(mismatch("its SHA-256 differs".into()));
        }
        parts.insert(name, data);
    }
    let manifest = manifest.ok_or_else(|| not("the file is empty".into()))?;
    if let Some(missing) = manifest.parts.iter().find(|p| !parts.contains_key(&p.name)) {
        return Err(ArchiveError::Mismatch {
            path: shown.to_string(),
            part: missing.name.clone(),
            why: "it is missing from the file".into(),
        });
    }
    Ok(Backup { manifest, parts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let manifest = Manifest {
            format: String::new(),
            created_at: "2026-12-07T19:00:00Z".into(),
            host: "pilot-1".into(),
            agent_version: "0.1.0".into(),
            server_image: "pilot/waypoint:0.11.4".into(),
            server_image_id: "sha256:ab".into(),
            parts: vec![],
        };
        let parts = vec![
            Part {
                name: SNAPSHOT.into(),
                data: b"snapshot bytes \x00\x01".to_vec(),
                runner_id: None,
            },
            Part {
                name: BOOTSTRAP_TOKEN.into(),
                data: b"tok_bootstrap_0123456789".to_vec(),
                runner_id: None,
            },
            Part {
                name: runner_token_part(1),
                data: b"tok_runner_0123456789".to_vec(),
                runner_id: Some("pilot-1-runner-1".into()),
            },
        ];
        encode(manifest, &parts, 1_800_000_000).unwrap()
    }

    /// The archive with member `name`'s data replaced by `f(data)` (tar headers rebuilt).
    fn rewrite(bytes: &[u8], f: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) -> Vec<u8> {
        let mut out = tar::Builder::new(Vec::new());
        let mut a = tar::Archive::new(bytes);
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            if let Some(d) = f(&name, data) {
                let mut h = tar::Header::new_gnu();
                h.set_size(d.len() as u64);
                h.set_mode(0o600);
                out.append_data(&mut h, &name, &d[..]).unwrap();
            }
        }
        out.into_inner().unwrap()
    }

    #[test]
    fn round_trip() {
        let b = decode(&sample()[..], "b.tar").unwrap();
        assert_eq!(b.manifest.format, FORMAT);
        assert_eq!(b.manifest.parts.len(), 3);
        assert_eq!(b.parts[SNAPSHOT], b"snapshot bytes \x00\x01");
        assert_eq!(
            b.manifest.parts[2].runner_id.as_deref(),
            Some("pilot-1-runner-1")
        );
        assert!(!format!("{b:?}").contains("tok_"), "{b:?}");
    }

    #[test]
    fn a_changed_part_is_refused_naming_it() {
        let bad = rewrite(&sample(), |name, mut d| {
            if name == BOOTSTRAP_TOKEN {
                d[4] ^= 1;
            }
            Some(d)
        });
        let e = decode(&bad[..], "b.tar").unwrap_err().to_string();
        assert!(e.contains("tokens/bootstrap-token"), "{e}");
        assert!(e.contains("SHA-256 differs"), "{e}");
        assert!(!e.contains("tok_"), "{e}");
    }

    #[test]
    fn missing_extra_and_reordered_members_are_refused() {
        let missing = rewrite(&sample(), |n, d| (n != SNAPSHOT).then_some(d));
        let e = decode(&missing[..], "b").unwrap_err().to_string();
        assert!(
            e.contains("waypoint.snapshot") && e.contains("missing"),
            "{e}"
        );

        let mut extra = rewrite(&sample(), |_, d| Some(d));
        extra.truncate(extra.len() - 1024); // drop the end-of-archive blocks
        let mut b = tar::Builder::new(extra);
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        b.append_data(&mut h, "evil", &b"x"[..]).unwrap();
        let extra = b.into_inner().unwrap();
        let e = decode(&extra[..], "b").unwrap_err().to_string();
        assert!(e.contains("evil") && e.contains("not listed"), "{e}");

        let e = decode(&b"not a tar at all"[..], "b")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a Pilot backup") || e.contains("cannot read"),
            "{e}"
        );

        let longer = rewrite(&sample(), |n, mut d| {
            if n == SNAPSHOT {
                d.push(0);
            }
            Some(d)
        });
        let e = decode(&longer[..], "b").unwrap_err().to_string();
        assert!(e.contains("bytes, the manifest says"), "{e}");
    }

    /// The fuzz seed (written with Python's tarfile, not by this module) reads as a backup.
    #[test]
    fn the_fuzz_seed_is_a_backup() {
        let seed = include_bytes!("../../../fuzz/corpus/backup_archive/valid.tar");
        let b = decode(&seed[..], "valid.tar").unwrap();
        assert_eq!(b.manifest.parts.len(), 4);
        assert_eq!(b.parts[ADVERTISE], b"203.0.113.7:9701");
    }

    #[test]
    fn another_format_is_refused() {
        let other = rewrite(&sample(), |n, d| {
            if n == MANIFEST {
                let s = String::from_utf8(d)
                    .unwrap()
                    .replace(FORMAT, "pilot-backup/9");
                Some(s.into_bytes())
            } else {
                Some(d)
            }
        });
        let e = decode(&other[..], "b").unwrap_err().to_string();
        assert!(e.contains("pilot-backup/9"), "{e}");
    }
}
