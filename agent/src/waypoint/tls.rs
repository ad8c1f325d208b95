//! Waypoint over verified TLS.
//!
//! Left to itself, `waypoint server run` makes a new self-signed certificate (no names) for
//! each listener at every start, so its clients can only skip verification, and a client that
//! skips it sends its token to whoever answers. The agent instead:
//! - issues the server a certificate from its own CA (`pki/waypoint`: the host's names and
//!   addresses, `waypoint-server`, the Pilot network's gateway, a fixed advertise address),
//!   copies it into `STATE_DIR/waypoint/server-tls/`, owned by the user the server image runs
//!   as (uid 100 in Waypoint's official image, root in Pilot's) with the key 0600, mounts that
//!   read-only at [`SERVER_TLS_PATH`] and starts the server with `-tls-cert-file` and
//!   `-tls-key-file` (Waypoint 0.11.4, `internal/cli/server_run.go`, reads them once at
//!   start: the certificate's SHA-256 is part of the container's spec, so a rotation replaces
//!   the container);
//! - has every Waypoint client it starts (the bootstrap, `runner token`, the runners) verify
//!   the server: Waypoint's client (`pkg/serverclient/client.go`) uses Go's system roots
//!   unless told to skip verification, and Go reads those from `SSL_CERT_FILE`, which points
//!   at the agent's CA (on a runner-only host: the server VM's CA, pinned by the host's
//!   `server.ca_sha256` and stored when a runner token is minted).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use bollard::Docker;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
};
use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};

use super::{WaypointError, containers};
use crate::fsutil::{self, FsError, MODE_PRIVATE_DIR, MODE_PUBLIC, MODE_SECRET};
use crate::layout::LeafPaths;

/// Where the server's TLS files (`ca.pem`, `cert.pem`, `key.pem`) are mounted in the server
/// container and in the one-shot bootstrap container.
pub const SERVER_TLS_PATH: &str = "/pilot-tls";

/// Where a runner on a runner-only host finds the server VM's CA (`ca.pem`).
pub const SERVER_CA_PATH: &str = "/pilot-waypoint-ca";

/// The name of the short-lived container (created, never started) that the image's
/// `/etc/passwd` and `/etc/group` are read from when its `USER` is a name.
const PROBE_NAME: &str = "waypoint-user-probe";

/// Records for which image the ownership of `server-tls/` was decided: `IMAGE_ID UID GID`.
const OWNER_MARKER: &str = "owner";

/// The user a container of an image runs as when the agent does not set one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageUser {
    pub uid: u32,
    pub gid: u32,
}

impl ImageUser {
    pub const ROOT: ImageUser = ImageUser { uid: 0, gid: 0 };
}

/// One side of the image's `USER uid[:gid]`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Id(u32),
    Name(String),
}

fn who(s: &str) -> Who {
    match s.parse::<u32>() {
        Ok(id) => Who::Id(id),
        Err(_) => Who::Name(s.to_string()),
    }
}

/// Resolves `USER` as dockerd does: a name through the image's `/etc/passwd`, a group name
/// through its `/etc/group`, no group: the user's primary group (0 for a uid with no entry).
/// `files` gives the content of those two files when the spec needs them. Pure: the error
/// names what could not be found.
pub fn resolve_user(
    user: &str,
    files: impl Fn(&str) -> Option<String>,
) -> Result<ImageUser, String> {
    let user = user.trim();
    if user.is_empty() {
        return Ok(ImageUser::ROOT);
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (who(u), Some(who(g))),
        None => (who(user), None),
    };
    let passwd_entry = |matches: &dyn Fn(&[&str]) -> bool| -> Option<(u32, u32)> {
        let passwd = files("/etc/passwd")?;
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || !matches(&f) {
                return None;
            }
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        })
    };
    let (uid, primary_gid) = match &u {
        Who::Id(uid) => {
            let want = uid.to_string();
            let gid = passwd_entry(&|f| f[2] == want).map_or(0, |(_, g)| g);
            (*uid, gid)
        }
        Who::Name(name) => passwd_entry(&|f| f[0] == name)
            .ok_or_else(|| format!("user {name:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match g {
        None => primary_gid,
        Some(Who::Id(gid)) => gid,
        Some(Who::Name(name)) => files("/etc/group")
            .and_then(|group| {
                group.lines().find_map(|line| {
                    let f: Vec<&str> = line.split(':').collect();
                    (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok())?
                })
            })
            .ok_or_else(|| format!("group {name:?} is not in the image's /etc/group"))?,
    };
    Ok(ImageUser { uid, gid })
}

/// The user containers of `image_id` run as by default (see [`resolve_user`]).
pub async fn image_user(docker: &Docker, image_id: &str) -> Result<ImageUser, WaypointError> {
    let inspect = docker
        .inspect_image(image_id)
        .await
        .map_err(|e| WaypointError::docker(format!("inspect image {image_id}"), e))?;
    let user = inspect.config.and_then(|c| c.user).unwrap_or_default();
    let needs_files = user.split(':').any(|p| !p.is_empty());
    let files = if needs_files {
        read_image_files(docker, image_id).await?
    } else {
        Vec::new()
    };
    resolve_user(&user, |path| {
        files
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, text)| text.clone())
    })
    .map_err(|why| {
        WaypointError::Conflict(format!(
            "cannot tell which user image {image_id} runs as (USER {user:?}): {why}"
        ))
    })
}

/// `/etc/passwd` and `/etc/group` of an image, read through a container that is created and
/// removed but never started. A file the image lacks is left out.
async fn read_image_files(
    docker: &Docker,
    image_id: &str,
) -> Result<Vec<(String, String)>, WaypointError> {
    // A probe left by a killed run.
    containers::remove(docker, PROBE_NAME).await?;
    let body = bollard::models::ContainerCreateBody {
        image: Some(image_id.to_string()),
        // Never started; a command is only needed for images without one.
        cmd: Some(vec!["true".into()]),
        network_disabled: Some(true),
        ..Default::default()
    };
    docker
        .create_container(
            Some(
                CreateContainerOptionsBuilder::default()
                    .name(PROBE_NAME)
                    .build(),
            ),
            body,
        )
        .await
        .map_err(|e| WaypointError::docker(format!("create container {PROBE_NAME}"), e))?;
    let mut files = Vec::new();
    let mut failure = None;
    for path in ["/etc/passwd", "/etc/group"] {
        let options = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let chunks: Result<Vec<bytes::Bytes>, _> = docker
            .download_from_container(PROBE_NAME, Some(options))
            .try_collect()
            .await;
        match chunks {
            Ok(chunks) => match file_from_tar(&chunks.concat()) {
                Some(text) => files.push((path.to_string(), text)),
                None => tracing::debug!(path, "not a regular file in the image"),
            },
            Err(e) if super::is_not_found(&e) => {}
            Err(e) => {
                failure = Some(WaypointError::docker(
                    format!("read {path} of {image_id}"),
                    e,
                ));
                break;
            }
        }
    }
    containers::remove(docker, PROBE_NAME).await?;
    match failure {
        Some(e) => Err(e),
        None => Ok(files),
    }
}

/// The first regular file of a tar archive, as text; at most 1 MiB is read (a passwd file
/// is a few KiB).
fn file_from_tar(archive: &[u8]) -> Option<String> {
    use std::io::Read;
    let mut archive = tar::Archive::new(archive);
    let mut entry = archive
        .entries()
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.header().entry_type().is_file())?;
    let mut text = String::new();
    (&mut entry).take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

/// What [`ensure_server_files`] left in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// SHA-256 (hex) of the certificate the server is to serve.
    pub cert_sha256: String,
    pub owner: ImageUser,
    /// Whether any file was written, re-owned or re-moded.
    pub changed: bool,
}

/// Copies the server's certificate, key and CA from `leaf` into `dir` for a server image
/// whose ID is `image_id`, owned by the user it runs as: the directory 0700, the key 0600, so
/// that inside the container only that user reads the key (on the host, the state directory
/// above is root's and 0700). Checks before it writes.
pub async fn ensure_server_files(
    docker: &Docker,
    leaf: &LeafPaths,
    dir: &Path,
    image_id: &str,
) -> Result<ServerTls, WaypointError> {
    let cert = read_leaf(&leaf.cert)?;
    let key = read_leaf(&leaf.key)?;
    let ca = read_leaf(&leaf.ca)?;
    let marker = dir.join(OWNER_MARKER);
    let owner = match recorded_owner(&marker, image_id)? {
        Some(owner) => owner,
        None => image_user(docker, image_id).await?,
    };
    let mut changed = fsutil::ensure_dir(dir, MODE_PRIVATE_DIR)?;
    changed |= chown(dir, owner)?;
    for (name, content, mode) in [
        ("ca.pem", &ca, MODE_PUBLIC),
        ("cert.pem", &cert, MODE_PUBLIC),
        ("key.pem", &key, MODE_SECRET),
    ] {
        let path = dir.join(name);
        changed |= fsutil::write_atomic(&path, content, mode)?.changed();
        changed |= chown(&path, owner)?;
    }
    let record = format!("{image_id} {} {}\n", owner.uid, owner.gid);
    changed |= fsutil::write_atomic(&marker, record.as_bytes(), MODE_PUBLIC)?.changed();
    Ok(ServerTls {
        cert_sha256: hex(&Sha256::digest(&cert)),
        owner,
        changed,
    })
}

fn read_leaf(path: &Path) -> Result<Vec<u8>, WaypointError> {
    fsutil::read_optional(path)?.ok_or_else(|| {
        WaypointError::Conflict(format!(
            "{} is missing: the pki step issues the Waypoint server's certificate",
            path.display()
        ))
    })
}

fn recorded_owner(marker: &Path, image_id: &str) -> Result<Option<ImageUser>, WaypointError> {
    let Some(bytes) = fsutil::read_optional(marker)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    let f: Vec<&str> = text.split_whitespace().collect();
    Ok(match f.as_slice() {
        [id, uid, gid] if *id == image_id => match (uid.parse(), gid.parse()) {
            (Ok(uid), Ok(gid)) => Some(ImageUser { uid, gid }),
            _ => None,
        },
        _ => None,
    })
}

/// Gives `path` to `owner` unless it has it; whether it changed.
fn chown(path: &Path, owner: ImageUser) -> Result<bool, WaypointError> {
    let meta = fs::symlink_metadata(path).map_err(|e| FsError::new("stat", path, e))?;
    if meta.uid() == owner.uid && meta.gid() == owner.gid {
        return Ok(false);
    }
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid))
        .map_err(|e| FsError::new("chown", path, e))?;
    Ok(true)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) of a file's bytes, or of nothing when it is absent: put into a container's
/// spec so that a new CA or certificate replaces the container (Go reads its roots once).
pub fn file_sha256(path: &Path) -> Result<String, WaypointError> {
    let bytes = fsutil::read_optional(path)?.unwrap_or_default();
    Ok(hex(&Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          waypoint:x:100:1000:Linux User,,,:/home/waypoint:/sbin/nologin\n";
    const GROUP: &str = "root:x:0:root\nwaypoint:x:1000:\nstaff:x:50:\n";

    fn files(path: &str) -> Option<String> {
        match path {
            "/etc/passwd" => Some(PASSWD.into()),
            "/etc/group" => Some(GROUP.into()),
            _ => None,
        }
    }

    #[test]
    fn users_resolve_as_dockerd_resolves_them() {
        let r = |u: &str| resolve_user(u, files);
        assert_eq!(r(""), Ok(ImageUser::ROOT));
        assert_eq!(r("root"), Ok(ImageUser::ROOT));
        // Waypoint's official image: `USER waypoint`.
        assert_eq!(
            r("waypoint"),
            Ok(ImageUser {
                uid: 100,
                gid: 1000
            })
        );
        assert_eq!(
            r("100"),
            Ok(ImageUser {
                uid: 100,
                gid: 1000
            })
        );
        assert_eq!(r("4242"), Ok(ImageUser { uid: 4242, gid: 0 }));
        assert_eq!(r("waypoint:staff"), Ok(ImageUser { uid: 100, gid: 50 }));
        assert_eq!(r("100:7"), Ok(ImageUser { uid: 100, gid: 7 }));
        assert!(r("nobody").unwrap_err().contains("\"nobody\""));
        assert!(r("waypoint:nogroup").unwrap_err().contains("nogroup"));
        // An image without /etc/passwd can still run as a number.
        assert_eq!(
            resolve_user("100", |_| None),
            Ok(ImageUser { uid: 100, gid: 0 })
        );
        assert!(resolve_user("waypoint", |_| None).is_err());
    }

    #[test]
    fn the_first_file_of_an_archive_is_read() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(PASSWD.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "passwd", PASSWD.as_bytes()).unwrap();
        let archive = b.into_inner().unwrap();
        assert_eq!(file_from_tar(&archive).as_deref(), Some(PASSWD));
        assert_eq!(file_from_tar(b"not a tar"), None);
    }

    fn plan(role: crate::config::Role) -> super::super::WaypointPlan {
        use crate::config::{Config, WaypointConfig};
        super::super::WaypointPlan::from_config(&Config {
            waypoint: Some(WaypointConfig::default()),
            role,
            state_dir: "/state".into(),
            ..Config::default()
        })
        .unwrap()
    }

    fn env<'a>(spec: &'a super::super::spec::ContainerSpec, name: &str) -> Option<&'a str> {
        spec.env
            .iter()
            .find_map(|e| e.strip_prefix(name)?.strip_prefix('='))
    }

    /// No Waypoint client the agent starts skips verification, and each one's roots are the
    /// CA that issued the server's certificate, mounted where `SSL_CERT_FILE` points.
    #[test]
    fn every_waypoint_client_verifies_the_server() {
        use super::super::{bootstrap, runners, server};
        use crate::config::Role;
        let local = plan(Role::Server);
        let s = server::spec(&local, "sha256:i", "c0ffee");
        assert!(
            s.cmd
                .contains(&"-tls-cert-file=/pilot-tls/cert.pem".to_string())
        );
        assert!(
            s.cmd
                .contains(&"-tls-key-file=/pilot-tls/key.pem".to_string())
        );
        assert!(s.cmd.contains(&"-url-enabled=false".to_string()));
        assert!(
            s.binds
                .contains(&"/state/waypoint/server-tls:/pilot-tls:ro".to_string()),
            "{:?}",
            s.binds
        );
        assert_eq!(env(&s, server::CERT_HASH_ENV), Some("c0ffee"));
        // A rotated certificate is another spec: the container is replaced.
        assert_ne!(s.hash(), server::spec(&local, "sha256:i", "beef").hash());

        let b = bootstrap::spec(&local, "sha256:i");
        assert_eq!(env(&b, "SSL_CERT_FILE"), Some("/pilot-tls/ca.pem"));
        assert!(
            b.binds
                .contains(&"/state/waypoint/server-tls:/pilot-tls:ro".to_string())
        );

        let r = runners::spec(
            &local,
            1,
            "sha256:i",
            "tok",
            "h-runner-1",
            "waypoint-server:9701",
            "ab",
        );
        assert_eq!(env(&r, "SSL_CERT_FILE"), Some("/certs/ca.pem"));
        assert!(r.binds.contains(&"/state/pki/runner:/certs:ro".to_string()));
        assert_eq!(env(&r, runners::CA_HASH_ENV), Some("ab"));
        assert_eq!(
            local.runner_server_ca().0,
            Path::new("/state/pki/runner/ca.pem")
        );

        let remote = plan(Role::Runner);
        let r = runners::spec(
            &remote,
            1,
            "sha256:i",
            "tok",
            "h-runner-1",
            "203.0.113.7:9701",
            "ab",
        );
        assert_eq!(env(&r, "SSL_CERT_FILE"), Some("/pilot-waypoint-ca/ca.pem"));
        assert!(
            r.binds
                .contains(&"/state/waypoint/server-ca:/pilot-waypoint-ca:ro".to_string()),
            "{:?}",
            r.binds
        );
        assert_eq!(
            remote.runner_server_ca().0,
            Path::new("/state/waypoint/server-ca/ca.pem")
        );

        for spec in [&s, &b, &r] {
            assert_eq!(
                env(spec, "WAYPOINT_SERVER_TLS_SKIP_VERIFY").unwrap_or("false"),
                "false"
            );
            assert!(
                !spec.cmd.iter().any(|a| a.contains("skip-verify")),
                "{}: {:?}",
                spec.name,
                spec.cmd
            );
        }
        let cli = super::super::cli_env("127.0.0.1:9701", "t", "/pilot-tls/ca.pem");
        assert!(cli.contains(&"WAYPOINT_SERVER_TLS_SKIP_VERIFY=false".to_string()));
        assert!(cli.contains(&"SSL_CERT_FILE=/pilot-tls/ca.pem".to_string()));
    }

    #[test]
    fn the_owner_record_is_per_image() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join(OWNER_MARKER);
        assert_eq!(recorded_owner(&marker, "sha256:a").unwrap(), None);
        fs::write(&marker, "sha256:a 100 1000\n").unwrap();
        assert_eq!(
            recorded_owner(&marker, "sha256:a").unwrap(),
            Some(ImageUser {
                uid: 100,
                gid: 1000
            })
        );
        assert_eq!(recorded_owner(&marker, "sha256:b").unwrap(), None);
        fs::write(&marker, "sha256:a x 1000\n").unwrap();
        assert_eq!(recorded_owner(&marker, "sha256:a").unwrap(), None);
    }
}
