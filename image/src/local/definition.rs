//! The build definition of `--target local`: the embedded defaults (image/defaults/local.yaml),
//! an optional YAML file whose keys override them, and command-line overrides on top; then
//! validation, so that a bad input fails before anything is made.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::LocalError;

/// The embedded default definition (every key present; a test checks it parses complete).
pub const DEFAULT_DEFINITION: &str = include_str!("../../defaults/local.yaml");

/// Used when no apt source serves the suite.
pub const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";

/// The smallest disk accepted; the real floor is the root file system's size (checked later).
pub const MIN_DISK_SIZE_MIB: u64 = 1024;

/// Output formats of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A raw disk image (sparse).
    Raw,
    /// QEMU's copy-on-write format (`qemu-img convert -O qcow2`).
    Qcow2,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

/// One layer of the definition: every key optional, so a file may set only what it changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layer {
    mirror: Option<String>,
    suite: Option<String>,
    components: Option<Vec<String>>,
    packages: Option<Vec<String>>,
    agent_deb: Option<PathBuf>,
    images: Option<Vec<PathBuf>>,
    images_dir: Option<PathBuf>,
    preload_images: Option<bool>,
    disk_size_mib: Option<u64>,
    formats: Option<Vec<Format>>,
    kernel_cmdline: Option<String>,
    name: Option<String>,
    output_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
}

impl Layer {
    fn parse(text: &str, origin: &str) -> Result<Layer, LocalError> {
        // An empty file (or one with only comments) is a definition that changes nothing.
        if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        }) {
            return Ok(Layer::default());
        }
        serde_norway::from_str(text).map_err(|e| LocalError::Definition {
            origin: origin.to_owned(),
            message: with_line(e.to_string(), text),
        })
    }

    /// `self` over `base`: each key of `self` that is set wins.
    fn over(self, base: Layer) -> Layer {
        Layer {
            mirror: self.mirror.or(base.mirror),
            suite: self.suite.or(base.suite),
            components: self.components.or(base.components),
            packages: self.packages.or(base.packages),
            agent_deb: self.agent_deb.or(base.agent_deb),
            images: self.images.or(base.images),
            images_dir: self.images_dir.or(base.images_dir),
            preload_images: self.preload_images.or(base.preload_images),
            disk_size_mib: self.disk_size_mib.or(base.disk_size_mib),
            formats: self.formats.or(base.formats),
            kernel_cmdline: self.kernel_cmdline.or(base.kernel_cmdline),
            name: self.name.or(base.name),
            output_dir: self.output_dir.or(base.output_dir),
            cache_dir: self.cache_dir.or(base.cache_dir),
        }
    }
}

/// serde_norway's messages end with "at line L column C", except for an unknown key of the
/// top-level mapping: that one gets the line of the key added here.
fn with_line(message: String, text: &str) -> String {
    if message.contains(" line ") {
        return message;
    }
    let key = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    let line = key.and_then(|key| {
        text.lines().position(|l| {
            l.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
    });
    match line {
        Some(i) => format!("{message} at line {} column 1", i + 1),
        None => message,
    }
}

/// Command-line overrides of `pilot-image build --target local` (flags win over the file).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub mirror: Option<String>,
    pub formats: Vec<Format>,
    pub output_dir: Option<PathBuf>,
    pub disk_size_mib: Option<u64>,
    pub agent_deb: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub name: Option<String>,
    pub cache_dir: Option<PathBuf>,
}

impl Overrides {
    fn into_layer(self) -> Layer {
        Layer {
            mirror: self.mirror,
            formats: (!self.formats.is_empty()).then_some(self.formats),
            output_dir: self.output_dir,
            disk_size_mib: self.disk_size_mib,
            agent_deb: self.agent_deb,
            images: (!self.images.is_empty()).then_some(self.images),
            name: self.name,
            cache_dir: self.cache_dir,
            ..Layer::default()
        }
    }
}

/// A complete, validated build definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    /// The mirror URL; `None` until [`super::rootfs::resolve_mirror`] picks the configured one.
    pub mirror: Option<String>,
    pub suite: String,
    pub components: Vec<String>,
    pub packages: Vec<String>,
    pub agent_deb: PathBuf,
    pub images: Vec<PathBuf>,
    pub images_dir: PathBuf,
    /// Load `images` into the image's Docker data root at build time (see [`super::preload`])
    /// instead of copying the tarballs into `images_dir` for the agent to load at boot.
    pub preload_images: bool,
    pub disk_size_mib: u64,
    pub formats: Vec<Format>,
    pub kernel_cmdline: String,
    pub name: String,
    pub output_dir: PathBuf,
    pub cache_dir: PathBuf,
}

impl Definition {
    /// Embedded defaults, then `file` (if any), then `overrides`; validated.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Definition, LocalError> {
        match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| LocalError::Definition {
                    origin: path.display().to_string(),
                    message: format!("cannot read it: {e}"),
                })?;
                Definition::from_yaml(&text, &path.display().to_string(), overrides)
            }
            None => Definition::from_yaml("", "<no definition file>", overrides),
        }
    }

    /// [`Definition::load`] of a definition file's text; `origin` names it in errors. Pure:
    /// public for the fuzz targets and tests.
    pub fn from_yaml(
        text: &str,
        origin: &str,
        overrides: Overrides,
    ) -> Result<Definition, LocalError> {
        let defaults = Layer::parse(DEFAULT_DEFINITION, "<embedded image/defaults/local.yaml>")?;
        let from_file = Layer::parse(text, origin)?;
        let layer = overrides.into_layer().over(from_file.over(defaults));
        Definition::complete(layer)?.validated()
    }

    fn complete(l: Layer) -> Result<Definition, LocalError> {
        // The embedded defaults set every key, so a missing one is a packaging bug.
        fn need<T>(v: Option<T>, key: &str) -> Result<T, LocalError> {
            v.ok_or_else(|| LocalError::Invalid {
                field: key.to_owned(),
                message: "missing (the embedded defaults should set it)".to_owned(),
            })
        }
        let mirror = need(l.mirror, "mirror")?;
        Ok(Definition {
            mirror: (!mirror.trim().is_empty()).then(|| mirror.trim().to_owned()),
            suite: need(l.suite, "suite")?,
            components: need(l.components, "components")?,
            packages: need(l.packages, "packages")?,
            agent_deb: need(l.agent_deb, "agent_deb")?,
            images: need(l.images, "images")?,
            images_dir: need(l.images_dir, "images_dir")?,
            preload_images: need(l.preload_images, "preload_images")?,
            disk_size_mib: need(l.disk_size_mib, "disk_size_mib")?,
            formats: need(l.formats, "formats")?,
            kernel_cmdline: need(l.kernel_cmdline, "kernel_cmdline")?,
            name: need(l.name, "name")?,
            output_dir: need(l.output_dir, "output_dir")?,
            cache_dir: need(l.cache_dir, "cache_dir")?,
        })
    }

    fn validated(mut self) -> Result<Definition, LocalError> {
        let invalid = |field: &str, message: String| LocalError::Invalid {
            field: field.to_owned(),
            message,
        };
        if let Some(m) = &self.mirror {
            if !(m.starts_with("http://") || m.starts_with("https://")) {
                return Err(invalid(
                    "mirror",
                    format!("{m:?} is not an http:// or https:// URL"),
                ));
            }
            self.mirror = Some(m.trim_end_matches('/').to_owned());
        }
        // Words that reach mmdebstrap's command line and apt: no spaces, commas or shell-ish
        // characters, so that a typo cannot turn into another option.
        let word = |s: &str| {
            !s.is_empty()
                && !s.starts_with('-')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-._:".contains(c))
        };
        if !word(&self.suite) {
            return Err(invalid(
                "suite",
                format!("{:?} is not a suite name", self.suite),
            ));
        }
        if self.components.is_empty() {
            return Err(invalid("components", "must not be empty".to_owned()));
        }
        for (field, list) in [
            ("components", &self.components),
            ("packages", &self.packages),
        ] {
            if let Some(bad) = list.iter().find(|p| !word(p)) {
                return Err(invalid(field, format!("{bad:?} is not a package name")));
            }
        }
        if self.formats.is_empty() {
            return Err(invalid(
                "formats",
                "must name at least one of: raw, qcow2".to_owned(),
            ));
        }
        let mut seen = Vec::new();
        self.formats.retain(|f| {
            let new = !seen.contains(f);
            seen.push(*f);
            new
        });
        if self.disk_size_mib < MIN_DISK_SIZE_MIB {
            return Err(invalid(
                "disk_size_mib",
                format!(
                    "{} MiB is too small (at least {MIN_DISK_SIZE_MIB})",
                    self.disk_size_mib
                ),
            ));
        }
        if self.name.is_empty()
            || self.name.starts_with('.')
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(invalid(
                "name",
                format!(
                    "{:?}: use letters, digits, '-', '.', '_' (not leading '.')",
                    self.name
                ),
            ));
        }
        if !self.images_dir.is_absolute() {
            return Err(invalid(
                "images_dir",
                format!("{} is not an absolute path", self.images_dir.display()),
            ));
        }
        if self.kernel_cmdline.contains('\n') {
            return Err(invalid("kernel_cmdline", "must be one line".to_owned()));
        }
        let mut names = Vec::new();
        for image in &self.images {
            let base = image.file_name().map(|n| n.to_string_lossy().into_owned());
            match base {
                Some(b) if b.ends_with(".tar") && !names.contains(&b) => names.push(b),
                Some(b) if b.ends_with(".tar") => {
                    return Err(invalid(
                        "images",
                        format!("two tarballs are named {b}: they would overwrite each other"),
                    ));
                }
                _ => {
                    return Err(invalid(
                        "images",
                        format!(
                            "{}: the agent loads only files named *.tar",
                            image.display()
                        ),
                    ));
                }
            }
        }
        Ok(self)
    }

    /// Paths of the outputs, per format.
    pub fn output_path(&self, format: Format) -> PathBuf {
        self.output_dir
            .join(format!("{}.{}", self.name, format.extension()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_are_complete_and_valid() {
        let d = Definition::load(None, Overrides::default()).unwrap();
        assert_eq!(d.suite, "bookworm");
        assert_eq!(d.formats, vec![Format::Raw, Format::Qcow2]);
        assert!(d.packages.iter().any(|p| p == "docker.io"));
        assert_eq!(d.mirror, None);
    }

    #[test]
    fn file_keys_override_defaults_and_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("def.yaml");
        std::fs::write(&f, "disk_size_mib: 2048\nformats: [qcow2]\nname: x\n").unwrap();
        let o = Overrides {
            name: Some("y".into()),
            ..Overrides::default()
        };
        let d = Definition::load(Some(&f), o).unwrap();
        assert_eq!(d.disk_size_mib, 2048);
        assert_eq!(d.formats, vec![Format::Qcow2]);
        assert_eq!(d.name, "y");
        assert_eq!(d.suite, "bookworm");
    }

    #[test]
    fn unknown_format_and_unknown_key_are_errors_with_positions() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("def.yaml");
        std::fs::write(&f, "suite: bookworm\nformats: [raw, vmdk]\n").unwrap();
        let e = Definition::load(Some(&f), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("vmdk") && e.contains("line 2"), "{e}");
        std::fs::write(&f, "sutie: bookworm\n").unwrap();
        let e = Definition::load(Some(&f), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("sutie") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("mirror: ftp://x/debian\n", "mirror"),
            ("formats: []\n", "formats"),
            ("disk_size_mib: 10\n", "disk_size_mib"),
            ("packages: [\"docker.io --force\"]\n", "packages"),
            ("name: ../x\n", "name"),
            ("images: [/tmp/a.tgz]\n", "images"),
        ];
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("def.yaml");
        for (text, field) in cases {
            std::fs::write(&f, text).unwrap();
            let e = Definition::load(Some(&f), Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
