//! dockerd's `daemon.json`: the agent merges in the keys it owns and keeps every other key
//! and value the operator (or the image) put there.
//!
//! Owned keys: `hosts` (the unix socket and the TLS listener), `tls`, `tlsverify`,
//! `tlscacert`, `tlscert`, `tlskey`, and `live-restore` (`docker.live_restore`, on by default:
//! a certificate rotation restarts dockerd, and with it on the Waypoint containers keep
//! running through the restart instead of being stopped and started again). The file is rewritten only when the merged document
//! differs from the current one *as JSON*, so an operator's formatting survives as long as
//! nothing the agent owns changes. A file that is not a JSON object is an error, never
//! overwritten: it is the operator's, and dockerd would refuse it as well.
//!
//! See <https://docs.docker.com/reference/cli/dockerd/#daemon-configuration-file>.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::fsutil::{self, MODE_PUBLIC, MODE_PUBLIC_DIR};

use super::DockerError;

/// The keys the agent sets; all others are left as they are.
pub const OWNED_KEYS: &[&str] = &[
    "hosts",
    "tls",
    "tlsverify",
    "tlscacert",
    "tlscert",
    "tlskey",
    "live-restore",
];

/// What the agent wants in `daemon.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// e.g. `unix:///var/run/docker.sock`, `tcp://0.0.0.0:2376`.
    pub hosts: Vec<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// dockerd's `live-restore`.
    pub live_restore: bool,
}

impl TlsSettings {
    fn apply(&self, map: &mut Map<String, Value>) {
        map.insert(
            "hosts".into(),
            Value::Array(self.hosts.iter().cloned().map(Value::String).collect()),
        );
        map.insert("tls".into(), Value::Bool(true));
        map.insert("tlsverify".into(), Value::Bool(true));
        map.insert("tlscacert".into(), path_value(&self.ca));
        map.insert("tlscert".into(), path_value(&self.cert));
        map.insert("tlskey".into(), path_value(&self.key));
        map.insert("live-restore".into(), Value::Bool(self.live_restore));
    }
}

fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// The new content of the file, or `None` when the current content already says it all.
pub fn merge(
    path: &Path,
    current: Option<&[u8]>,
    settings: &TlsSettings,
) -> Result<Option<Vec<u8>>, DockerError> {
    let existing = match current {
        Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => {
            let value: Value = serde_json::from_slice(bytes).map_err(|source| {
                DockerError::DaemonConfigInvalid {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            match value {
                Value::Object(map) => Some(map),
                _ => {
                    return Err(DockerError::DaemonConfigNotObject {
                        path: path.to_path_buf(),
                    });
                }
            }
        }
        _ => None,
    };
    let mut merged = existing.clone().unwrap_or_default();
    settings.apply(&mut merged);
    if existing.as_ref() == Some(&merged) {
        return Ok(None);
    }
    // Serializing a JSON value cannot fail.
    let mut out = serde_json::to_vec_pretty(&Value::Object(merged)).unwrap_or_default();
    out.push(b'\n');
    Ok(Some(out))
}

/// Merges `settings` into the file at `path`; returns whether the file changed.
pub fn ensure(path: &Path, settings: &TlsSettings) -> Result<bool, DockerError> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            fsutil::ensure_dir(dir, MODE_PUBLIC_DIR)?;
        }
    }
    let current = fsutil::read_optional(path)?;
    match merge(path, current.as_deref(), settings)? {
        None => Ok(false),
        Some(content) => {
            fsutil::write_atomic(path, &content, MODE_PUBLIC)?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TlsSettings {
        TlsSettings {
            hosts: vec![
                "unix:///var/run/docker.sock".into(),
                "tcp://0.0.0.0:2376".into(),
            ],
            ca: "/var/lib/pilot-agent/pki/server/ca.pem".into(),
            cert: "/var/lib/pilot-agent/pki/server/cert.pem".into(),
            key: "/var/lib/pilot-agent/pki/server/key.pem".into(),
            live_restore: true,
        }
    }

    #[test]
    fn absent_file_gets_the_owned_keys() {
        let out = merge(Path::new("d.json"), None, &settings())
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["hosts"][1], "tcp://0.0.0.0:2376");
        assert_eq!(v["tls"], true);
        assert_eq!(v["tlsverify"], true);
        assert_eq!(v["tlskey"], "/var/lib/pilot-agent/pki/server/key.pem");
        assert_eq!(v["live-restore"], true);
        assert_eq!(v.as_object().unwrap().len(), OWNED_KEYS.len());
        assert!(out.ends_with(b"}\n"));
    }

    #[test]
    fn foreign_keys_and_values_are_kept_and_owned_ones_replaced() {
        let current = br#"{
  "log-driver": "journald",
  "default-address-pools": [{"base": "10.200.0.0/16", "size": 24}],
  "hosts": ["tcp://0.0.0.0:2375"],
  "tlsverify": false,
  "features": {"buildkit": true}
}"#;
        let out = merge(Path::new("d.json"), Some(current), &settings())
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["log-driver"], "journald");
        assert_eq!(v["default-address-pools"][0]["size"], 24);
        assert_eq!(v["features"]["buildkit"], true);
        // The plain listener the operator had is gone; TLS verification is on.
        assert_eq!(
            v["hosts"],
            serde_json::json!(["unix:///var/run/docker.sock", "tcp://0.0.0.0:2376"])
        );
        assert_eq!(v["tlsverify"], true);
    }

    #[test]
    fn merged_output_is_a_fixed_point() {
        let out = merge(
            Path::new("d.json"),
            Some(br#"{"debug": true}"#),
            &settings(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            merge(Path::new("d.json"), Some(&out), &settings()).unwrap(),
            None
        );
    }

    #[test]
    fn operator_formatting_survives_when_nothing_owned_changes() {
        let out = merge(Path::new("d.json"), None, &settings())
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let compact = serde_json::to_vec(&v).unwrap();
        assert_eq!(
            merge(Path::new("d.json"), Some(&compact), &settings()).unwrap(),
            None
        );
    }

    #[test]
    fn invalid_files_are_errors_not_overwritten() {
        let err = merge(
            Path::new("/etc/docker/daemon.json"),
            Some(b"{ nope"),
            &settings(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/etc/docker/daemon.json"), "{err}");
        assert!(matches!(
            merge(Path::new("d.json"), Some(b"[1]"), &settings()).unwrap_err(),
            DockerError::DaemonConfigNotObject { .. }
        ));
        // Empty or whitespace: as absent.
        assert!(
            merge(Path::new("d.json"), Some(b"  \n"), &settings())
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn foreign_numbers_keep_their_value() {
        // Found by fuzz target daemon_json (fuzz/artifacts/daemon_json/
        // crash-float-roundtrip-20-digits): serde_json's default, approximate float parsing
        // read this number as 9.9999999999993e19 and the file written back as
        // 9.999999999999299e19, another number than the operator's.
        let current = br#"{"":99999999999992999924, "f": 0.1000000000000000055511151231257827}"#;
        let out = merge(Path::new("d.json"), Some(current), &settings())
            .unwrap()
            .unwrap();
        let before: Value = serde_json::from_slice(current).unwrap();
        let after: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(after[""], before[""]);
        assert_eq!(after["f"], before["f"]);
        assert_eq!(
            merge(Path::new("d.json"), Some(&out), &settings()).unwrap(),
            None
        );
    }

    #[test]
    fn ensure_writes_once_and_keeps_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("etc/docker/daemon.json");
        assert!(ensure(&p, &settings()).unwrap());
        let m = std::fs::metadata(&p).unwrap().modified().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert!(!ensure(&p, &settings()).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), m);
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
    }
}
