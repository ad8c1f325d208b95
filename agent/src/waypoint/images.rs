//! The Waypoint images made present without a registry when possible.
//!
//! A Pilot VM image bakes `docker save` tarballs of its images into a directory
//! (`waypoint.images_dir`, default `/var/lib/pilot-agent/images/*.tar`), so that a new VM
//! needs no pull at boot. [`ensure`] checks the image; when it is absent it reads each
//! tarball's `manifest.json` (only that entry: the `tar` crate seeks over the layers) to find
//! the one whose `RepoTags` name the image, and loads just that one through the API
//! (`POST /images/load`, streamed from the file). Only when no tarball has it is the image
//! pulled; a failed pull is an error that says where the agent looked.

use std::io::Read;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::{CreateImageOptionsBuilder, ImportImageOptionsBuilder};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use super::{WaypointError, is_not_found};

/// Where an image came from in this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Already present.
    Present,
    /// Loaded from this tarball.
    Loaded(PathBuf),
    /// Pulled from its registry.
    Pulled,
}

/// An image as [`ensure`] left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub reference: String,
    /// `sha256:...`
    pub id: String,
    pub source: Source,
}

impl Image {
    pub fn summary(&self) -> String {
        let short = self.id.trim_start_matches("sha256:");
        let short = &short[..short.len().min(12)];
        match &self.source {
            Source::Present => format!("{} present ({short})", self.reference),
            Source::Loaded(p) => {
                format!("{} loaded from {} ({short})", self.reference, p.display())
            }
            Source::Pulled => format!("{} pulled ({short})", self.reference),
        }
    }
}

/// Makes `reference` present: as is, else from a tarball in `images_dir`, else by a pull.
pub async fn ensure(
    docker: &Docker,
    reference: &str,
    images_dir: &Path,
) -> Result<Image, WaypointError> {
    if let Some(id) = image_id(docker, reference).await? {
        return Ok(Image {
            reference: reference.to_string(),
            id,
            source: Source::Present,
        });
    }

    let dir = images_dir.to_path_buf();
    let wanted = normalize(reference);
    let (found, tried) = tokio::task::spawn_blocking(move || find_tarball(&dir, &wanted))
        .await
        .map_err(|e| WaypointError::Conflict(format!("tarball search panicked: {e}")))??;
    if let Some(tarball) = found {
        tracing::info!(image = reference, tarball = %tarball.display(), "loading image");
        load(docker, &tarball).await?;
        return match image_id(docker, reference).await? {
            Some(id) => Ok(Image {
                reference: reference.to_string(),
                id,
                source: Source::Loaded(tarball),
            }),
            None => Err(WaypointError::Conflict(format!(
                "{} names image {reference} in its manifest.json, but loading it did not make \
                 the image present",
                tarball.display()
            ))),
        };
    }

    tracing::info!(
        image = reference,
        images_dir = %images_dir.display(),
        "image not baked; pulling it"
    );
    let unavailable = |pull_error: String| WaypointError::ImageUnavailable {
        image: reference.to_string(),
        dir: images_dir.display().to_string(),
        tried: if tried.is_empty() {
            " (it has no *.tar files)".to_string()
        } else {
            format!(" (looked at {})", tried.join(", "))
        },
        pull_error,
    };
    if let Err(e) = pull(docker, reference).await {
        return Err(unavailable(e));
    }
    match image_id(docker, reference).await? {
        Some(id) => Ok(Image {
            reference: reference.to_string(),
            id,
            source: Source::Pulled,
        }),
        None => Err(unavailable(
            "the pull finished but the image is still absent".into(),
        )),
    }
}

/// The image's ID, or `None` when dockerd does not have it.
pub async fn image_id(docker: &Docker, reference: &str) -> Result<Option<String>, WaypointError> {
    match docker.inspect_image(reference).await {
        Ok(i) => Ok(Some(i.id.unwrap_or_default())),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(WaypointError::docker(
            format!("inspect image {reference}"),
            e,
        )),
    }
}

/// Size of the chunks streamed to dockerd.
const CHUNK: usize = 256 * 1024;

/// `docker load < tarball`, streamed from the file.
async fn load(docker: &Docker, tarball: &Path) -> Result<(), WaypointError> {
    let file = tokio::fs::File::open(tarball)
        .await
        .map_err(|source| WaypointError::Tarball {
            path: tarball.to_path_buf(),
            source,
        })?;
    let chunks = futures_util::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), Some(file)))
            }
            // Hand the error to dockerd's request (it aborts the load), then stop.
            Err(e) => Some((Err(e), None)),
        }
    });
    let options = ImportImageOptionsBuilder::default().quiet(true).build();
    let mut progress = docker.import_image_stream(options, chunks, None);
    while let Some(item) = progress.next().await {
        item.map_err(|e| {
            WaypointError::docker(format!("load image tarball {}", tarball.display()), e)
        })?;
    }
    Ok(())
}

/// `docker pull`; the error text when it fails.
async fn pull(docker: &Docker, reference: &str) -> Result<(), String> {
    let (name, tag) = split_tag(reference);
    let mut builder = CreateImageOptionsBuilder::default().from_image(name);
    if let Some(tag) = tag {
        builder = builder.tag(tag);
    }
    let mut progress = docker.create_image(Some(builder.build()), None, None);
    while let Some(item) = progress.next().await {
        item.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Splits `name[:tag]` (a digest reference stays whole: `from_image` takes it as is).
fn split_tag(reference: &str) -> (&str, Option<&str>) {
    if reference.contains('@') {
        return (reference, None);
    }
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(i) => (
            &reference[..last_slash + i],
            Some(&reference[last_slash + i + 1..]),
        ),
        None => (reference, None),
    }
}

/// The form `docker save` writes into `RepoTags`: Docker Hub's `docker.io/` and `library/`
/// dropped, `:latest` added when there is no tag.
pub fn normalize(reference: &str) -> String {
    let mut r = reference;
    for prefix in ["docker.io/", "index.docker.io/", "registry-1.docker.io/"] {
        if let Some(rest) = r.strip_prefix(prefix) {
            r = rest;
            break;
        }
    }
    let r = r.strip_prefix("library/").unwrap_or(r);
    match split_tag(r) {
        (_, Some(_)) => r.to_string(),
        _ if r.contains('@') => r.to_string(),
        (name, None) => format!("{name}:latest"),
    }
}

/// The first `*.tar` in `dir` (by name) whose manifest lists `wanted` (normalised), and the
/// names of the tarballs looked at. A missing directory is no tarball, not an error; an
/// unreadable tarball is skipped (and named in the list).
fn find_tarball(dir: &Path, wanted: &str) -> Result<(Option<PathBuf>, Vec<String>), WaypointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, Vec::new())),
        Err(source) => {
            return Err(WaypointError::Tarball {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut tarballs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar") && p.is_file())
        .collect();
    tarballs.sort();
    let mut tried = Vec::new();
    for path in tarballs {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match repo_tags(&path) {
            Ok(tags) => {
                tried.push(name);
                if tags.iter().any(|t| normalize(t) == wanted) {
                    return Ok((Some(path), tried));
                }
            }
            // One broken tarball must not hide the image in another.
            Err(e) => {
                tracing::warn!("skipping image tarball: {e}");
                tried.push(format!("{name} (unreadable)"));
            }
        }
    }
    Ok((None, tried))
}

/// The largest `manifest.json` read from a tarball (1 MiB: thousands of images' worth).
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// The `RepoTags` of every image in a `docker save` tarball (from its `manifest.json`).
pub fn repo_tags(path: &Path) -> Result<Vec<String>, WaypointError> {
    let file = std::fs::File::open(path).map_err(|source| WaypointError::Tarball {
        path: path.to_path_buf(),
        source,
    })?;
    repo_tags_from(file, path)
}

/// [`repo_tags`] of a tarball already open (`path` names it in errors). Public for the fuzz
/// targets and tests, which read tarballs from memory.
pub fn repo_tags_from<R: Read + std::io::Seek>(
    tarball: R,
    path: &Path,
) -> Result<Vec<String>, WaypointError> {
    let err = |source: std::io::Error| WaypointError::Tarball {
        path: path.to_path_buf(),
        source,
    };
    let mut archive = tar::Archive::new(tarball);
    // Seeks over the layers instead of reading them: a large image costs a few header reads.
    for entry in archive.entries_with_seek().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let is_manifest = entry
            .path()
            .map_err(err)?
            .to_str()
            .is_some_and(|p| p.trim_start_matches("./") == "manifest.json");
        if !is_manifest {
            continue;
        }
        // A real manifest is a few hundred bytes per image; a tarball claiming more is not
        // read into memory (the header's size may lie, hence `take`).
        if entry.size() > MAX_MANIFEST_BYTES {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "manifest.json is {} bytes, above the {MAX_MANIFEST_BYTES}-byte bound",
                    entry.size()
                ),
            )));
        }
        let mut text = String::new();
        (&mut entry)
            .take(MAX_MANIFEST_BYTES)
            .read_to_string(&mut text)
            .map_err(err)?;
        #[derive(serde::Deserialize)]
        struct Item {
            #[serde(rename = "RepoTags", default)]
            repo_tags: Option<Vec<String>>,
        }
        let items: Vec<Item> = serde_json::from_str(&text).map_err(|e| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("manifest.json is not a docker save manifest: {e}"),
            ))
        })?;
        return Ok(items
            .into_iter()
            .flat_map(|i| i.repo_tags.unwrap_or_default())
            .collect());
    }
    Err(err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "no manifest.json: not a `docker save` tarball",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_as_docker_save_writes_them() {
        assert_eq!(normalize("pilot/waypoint:0.11.4"), "pilot/waypoint:0.11.4");
        assert_eq!(normalize("docker.io/library/busybox"), "busybox:latest");
        assert_eq!(normalize("busybox"), "busybox:latest");
        assert_eq!(
            normalize("registry.local:5000/pilot/waypoint"),
            "registry.local:5000/pilot/waypoint:latest"
        );
        assert_eq!(
            split_tag("registry.local:5000/x"),
            ("registry.local:5000/x", None)
        );
        assert_eq!(split_tag("a/b:1"), ("a/b", Some("1")));
    }

    fn write_save_tarball(path: &Path, manifest: &str, layer_size: usize) {
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        // A big layer before the manifest, as `docker save` orders them.
        let layer = vec![7u8; layer_size];
        let mut h = tar::Header::new_gnu();
        h.set_size(layer.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "abc/layer.tar", layer.as_slice())
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(manifest.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "manifest.json", manifest.as_bytes())
            .unwrap();
        b.finish().unwrap();
    }

    #[test]
    fn finds_the_tarball_that_names_the_image() {
        let dir = tempfile::tempdir().unwrap();
        write_save_tarball(
            &dir.path().join("a-other.tar"),
            r#"[{"Config":"x.json","RepoTags":["busybox:latest"],"Layers":["abc/layer.tar"]}]"#,
            1 << 20,
        );
        write_save_tarball(
            &dir.path().join("b-waypoint.tar"),
            r#"[{"Config":"y.json","RepoTags":["pilot/waypoint:0.11.4","pilot/waypoint:latest"],"Layers":[]}]"#,
            10,
        );
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let (found, tried) = find_tarball(dir.path(), "pilot/waypoint:0.11.4").unwrap();
        assert_eq!(found, Some(dir.path().join("b-waypoint.tar")));
        assert_eq!(tried, vec!["a-other.tar", "b-waypoint.tar"]);
        let (found, tried) = find_tarball(dir.path(), "pilot/absent:1").unwrap();
        assert_eq!(found, None);
        assert_eq!(tried.len(), 2);
        assert_eq!(
            find_tarball(&dir.path().join("missing"), "x:1").unwrap(),
            (None, vec![])
        );
    }

    #[test]
    fn an_oversized_manifest_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.tar");
        let manifest = format!(
            r#"[{{"RepoTags": ["{}"]}}]"#,
            "x".repeat(MAX_MANIFEST_BYTES as usize)
        );
        write_save_tarball(&p, &manifest, 16);
        let e = repo_tags(&p).unwrap_err();
        let why = std::error::Error::source(&e).map(|s| s.to_string());
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("above the 1048576-byte bound")),
            "{e}: {why:?}"
        );
    }

    /// The manifest of `fuzz/artifacts/image_manifest/crash-repotags-given-twice`: docker
    /// never writes a key twice; such a file is refused, naming it, and nothing panics.
    #[test]
    fn a_manifest_with_a_key_given_twice_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("twice.tar");
        let manifest = r#"[{"Config":"sc7fc026e04c807","RepoTags":333333333333333000,"Lag":"x.json","RepoTags":null,"Layers":[]}]"#;
        write_save_tarball(&p, manifest, 16);
        let e = repo_tags(&p).unwrap_err().to_string();
        assert!(e.contains("twice.tar"), "{e}");
    }

    #[test]
    fn a_tarball_without_manifest_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_cksum();
        b.append_data(&mut h, "x", &b"x"[..]).unwrap();
        b.finish().unwrap();
        drop(b);
        let e = repo_tags(&p).unwrap_err().to_string();
        assert!(e.contains("broken.tar"), "{e}");
    }
}
