//! Per-instance state: `STATE_DIR/instance-id` (the clone marker) and `STATE_DIR/identity.json`
//! (the last identity a metadata service gave).
//!
//! The marker holds `PROVIDER INSTANCE_ID` of the instance that made the state directory. A
//! VM started from an image that carries a state directory, or a state directory copied to
//! another host, finds another instance id there: it must not keep the image's CA and keys
//! (every VM of the image could then impersonate every other and sign for it), so the pki
//! step discards them, issues new ones and then writes the new marker. The same instance id
//! changes nothing. Like azure-init's per-instance provisioning marker.
//!
//! Only an authoritative identity decides (see [`Verdict::Undecided`]): a metadata service
//! that is slow at one boot must not cost a VM its CA.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{Identity, Provider, Resolution};
use crate::fsutil::{self, FsError, MODE_PUBLIC};
use crate::layout::StateLayout;

pub fn marker_path(state_dir: &Path) -> PathBuf {
    StateLayout::new(state_dir).instance_marker()
}

pub fn identity_path(state_dir: &Path) -> PathBuf {
    StateLayout::new(state_dir).remembered_identity()
}

/// The instance a state directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub provider: Provider,
    pub instance_id: String,
}

impl Marker {
    /// The marker of an identity that has an instance id.
    pub fn of(identity: &Identity) -> Option<Marker> {
        Some(Marker {
            provider: identity.provider,
            instance_id: identity.instance_id.clone()?,
        })
    }

    fn parse(text: &str) -> Option<Marker> {
        let (provider, id) = text.trim().split_once(' ')?;
        let id = id.trim();
        let provider = Provider::parse(provider)?;
        (!id.is_empty() && !id.contains(char::is_whitespace)).then(|| Marker {
            provider,
            instance_id: id.to_string(),
        })
    }
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.provider, self.instance_id)
    }
}

/// What the marker says about this state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No (readable) marker: the first run, or an agent from before markers. The state is
    /// adopted as this instance's; the marker is written.
    First { current: Marker },
    /// Made by this instance.
    Same,
    /// Made by `previous`, another instance: discard the keys, issue new ones, then write
    /// `current`.
    Cloned { previous: Marker, current: Marker },
    /// The identity cannot decide (a stand-in after a failed lookup, no instance id, or a
    /// marker from a cloud while no metadata service answered): nothing is touched.
    Undecided { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("cannot discard the cloned state's keys under {path}: {source}")]
    Discard {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Compares the marker in `state_dir` with `resolution`.
pub fn check(state_dir: &Path, resolution: &Resolution) -> Result<Verdict, MarkerError> {
    if !resolution.is_authoritative() {
        return Ok(Verdict::Undecided {
            reason: "the instance's identity is a stand-in (metadata lookup failed)".into(),
        });
    }
    let Some(current) = Marker::of(&resolution.identity) else {
        return Ok(Verdict::Undecided {
            reason: format!(
                "the {} identity has no instance id",
                resolution.identity.provider
            ),
        });
    };
    let previous = fsutil::read_optional(&marker_path(state_dir))?
        .and_then(|b| Marker::parse(&String::from_utf8_lossy(&b)));
    Ok(match previous {
        None => Verdict::First { current },
        Some(p) if p == current => Verdict::Same,
        // A state made on a cloud instance, and now no metadata service answers: a glitch as
        // likely as a move off the cloud. Keep everything.
        Some(p) if p.provider != Provider::Host && current.provider == Provider::Host => {
            Verdict::Undecided {
                reason: format!(
                    "the state belongs to {p}, but no metadata service answered; keeping it"
                ),
            }
        }
        Some(previous) => Verdict::Cloned { previous, current },
    })
}

/// Removes the CA, keys and certificates under `pki_dir` (a clone's copies of the image's).
/// A run killed half-way leaves the old marker, so the next run discards again.
pub fn discard_pki(pki_dir: &Path) -> Result<(), MarkerError> {
    match std::fs::remove_dir_all(pki_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MarkerError::Discard {
            path: pki_dir.to_path_buf(),
            source,
        }),
    }
}

/// Writes the marker (atomically; unchanged bytes are not rewritten).
pub fn write(state_dir: &Path, marker: &Marker) -> Result<bool, MarkerError> {
    let text = format!("{marker}\n");
    Ok(fsutil::write_atomic(&marker_path(state_dir), text.as_bytes(), MODE_PUBLIC)?.changed())
}

/// Keeps the last identity a metadata service gave, for passes where it does not answer.
pub fn remember(state_dir: &Path, identity: &Identity) -> Result<bool, MarkerError> {
    // Serializing a plain struct with string keys cannot fail.
    let mut json = serde_json::to_vec_pretty(identity).unwrap_or_default();
    json.push(b'\n');
    Ok(fsutil::write_atomic(&identity_path(state_dir), &json, MODE_PUBLIC)?.changed())
}

/// The identity [`remember`] kept, if any and readable.
pub fn remembered(state_dir: &Path) -> Option<Identity> {
    let bytes = fsutil::read_optional(&identity_path(state_dir)).ok()??;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cloud::ProviderSetting;
    use crate::identity::{Problem, Severity};

    fn resolution(provider: Provider, id: &str) -> Resolution {
        Resolution {
            identity: Identity {
                provider,
                instance_id: Some(id.into()),
                region: None,
                zone: None,
                private_ipv4: None,
                public_ipv4: None,
                hostname: None,
                public_hostname: None,
            },
            configured: ProviderSetting::Auto,
            problem: None,
            absent: Vec::new(),
            remembered: false,
            elapsed: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let aws1 = resolution(Provider::Aws, "i-1");
        let Verdict::First { current } = check(d, &aws1).unwrap() else {
            panic!("no marker yet")
        };
        assert!(write(d, &current).unwrap());
        assert!(
            !write(d, &current).unwrap(),
            "unchanged bytes are not rewritten"
        );
        assert_eq!(
            std::fs::read_to_string(marker_path(d)).unwrap(),
            "aws i-1\n"
        );
        assert_eq!(check(d, &aws1).unwrap(), Verdict::Same);
        let aws2 = resolution(Provider::Aws, "i-2");
        assert!(
            matches!(check(d, &aws2).unwrap(), Verdict::Cloned { previous, .. } if previous.instance_id == "i-1")
        );
        // No metadata answered: the host's identity does not override a cloud marker.
        let host = resolution(Provider::Host, "0123");
        assert!(matches!(
            check(d, &host).unwrap(),
            Verdict::Undecided { .. }
        ));
        // A stand-in never decides.
        let mut failed = aws2.clone();
        failed.problem = Some(Problem {
            severity: Severity::Degraded,
            message: "x".into(),
        });
        assert!(matches!(
            check(d, &failed).unwrap(),
            Verdict::Undecided { .. }
        ));
        // A state made off-cloud, now on a cloud instance: cloned from a local image.
        write(d, &Marker::of(&host.identity).unwrap()).unwrap();
        assert!(matches!(check(d, &aws1).unwrap(), Verdict::Cloned { .. }));
        // Garbage is no marker.
        std::fs::write(marker_path(d), "???").unwrap();
        assert!(matches!(check(d, &aws1).unwrap(), Verdict::First { .. }));
    }

    #[test]
    fn discard_removes_the_whole_pki_tree_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(pki.join("ca")).unwrap();
        std::fs::write(pki.join("ca/ca-key.pem"), "k").unwrap();
        discard_pki(&pki).unwrap();
        assert!(!pki.exists());
        discard_pki(&pki).unwrap();
    }

    #[test]
    fn remembered_identity_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(remembered(dir.path()), None);
        let r = resolution(Provider::Gcp, "42");
        assert!(remember(dir.path(), &r.identity).unwrap());
        assert_eq!(remembered(dir.path()), Some(r.identity));
    }
}
