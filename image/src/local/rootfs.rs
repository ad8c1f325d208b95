//! The Debian root file system: which mirror, the cache of mmdebstrap tarballs keyed by what
//! went into them, and making one when the cache has none.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::definition::{Definition, FALLBACK_MIRROR};
use super::error::LocalError;
use super::run::run_logged;

/// Bumped when the way a cached root file system is made changes, so old caches are not reused.
const CACHE_FORMAT: &str = "pilot-image rootfs v1 mmdebstrap minbase";

/// Where apt's sources are configured on the build machine.
const APT_SOURCES: &[&str] = &["/etc/apt/sources.list", "/etc/apt/sources.list.d"];

/// The mirror to use and where it came from (for the plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub url: String,
    pub source: String,
}

/// The definition's mirror, else the first apt source of this machine serving `suite`, else
/// deb.debian.org.
pub fn resolve_mirror(def: &Definition) -> Mirror {
    if let Some(url) = &def.mirror {
        return Mirror {
            url: url.clone(),
            source: "build definition".to_owned(),
        };
    }
    for root in APT_SOURCES {
        let mut files: Vec<PathBuf> = match fs::read_dir(root) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => vec![PathBuf::from(root)],
        };
        files.sort();
        for file in files {
            let Ok(text) = fs::read_to_string(&file) else {
                continue;
            };
            let name = file.to_string_lossy();
            let found = if name.ends_with(".sources") {
                mirror_in_deb822(&text, &def.suite)
            } else if name.ends_with(".list") {
                mirror_in_one_line(&text, &def.suite)
            } else {
                None
            };
            if let Some(url) = found {
                return Mirror {
                    url: url.trim_end_matches('/').to_owned(),
                    source: file.display().to_string(),
                };
            }
        }
    }
    Mirror {
        url: FALLBACK_MIRROR.to_owned(),
        source: "fallback (no apt source serves the suite)".to_owned(),
    }
}

/// First `URIs:` of a `Types: deb` stanza whose `Suites:` include `suite` (deb822 format).
fn mirror_in_deb822(text: &str, suite: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let serves = field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == suite));
        if enabled && is_deb && serves {
            if let Some(uri) = field("URIs").and_then(|u| {
                u.split_whitespace()
                    .find(|u| u.starts_with("http"))
                    .map(str::to_owned)
            }) {
                return Some(uri);
            }
        }
    }
    None
}

/// First `deb [options] URI SUITE ...` line serving `suite` (one-line format).
fn mirror_in_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']'))?;
            rest.drain(..=end);
        }
        match rest.as_slice() {
            [uri, s, ..] if *s == suite && uri.starts_with("http") => Some((*uri).to_owned()),
            _ => None,
        }
    })
}

/// The cache file for this mirror + suite + components + package list.
pub fn cache_path(def: &Definition, mirror: &Mirror) -> PathBuf {
    let mut packages = def.packages.clone();
    packages.sort();
    packages.dedup();
    let mut h = Sha256::new();
    for part in [
        CACHE_FORMAT,
        &mirror.url,
        &def.suite,
        &def.components.join(","),
        &packages.join(","),
    ] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    let hex: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    def.cache_dir.join(format!("rootfs-{hex}.tar"))
}

/// Fails with a clear error unless `mirror` serves `suite` (its Release file answers).
pub fn check_mirror(mirror: &Mirror, suite: &str) -> Result<(), LocalError> {
    let url = format!("{}/dists/{suite}/Release", mirror.url);
    let out = Command::new("curl")
        .args([
            "-fsS",
            "-o",
            "/dev/null",
            "--max-time",
            "20",
            "--retry",
            "1",
        ])
        .arg(&url)
        .output()
        .map_err(|e| LocalError::Io {
            context: "cannot run curl (to check the mirror)".to_owned(),
            source: e,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(LocalError::Mirror {
        url: mirror.url.clone(),
        detail: format!(
            "GET {url} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

/// Makes the cached root file system tarball with mmdebstrap (its temporary tree lives in the
/// cache directory, under TMPDIR, and the tarball is renamed into place when complete).
pub fn build_cache(
    def: &Definition,
    mirror: &Mirror,
    cache: &Path,
    log: &Path,
) -> Result<(), LocalError> {
    fs::create_dir_all(&def.cache_dir).map_err(|e| LocalError::Io {
        context: format!("cannot create {}", def.cache_dir.display()),
        source: e,
    })?;
    let partial = cache.with_extension(format!("tar.partial-{}", std::process::id()));
    let mut cmd = Command::new("mmdebstrap");
    cmd.env("TMPDIR", &def.cache_dir)
        .arg("--variant=minbase")
        .arg("--format=tar")
        .arg("--mode=root")
        .arg(format!("--components={}", def.components.join(",")))
        .arg(format!("--include={}", def.packages.join(",")))
        .arg(&def.suite)
        .arg(&partial)
        .arg(&mirror.url);
    let result = run_logged("rootfs", &mut cmd, log);
    if result.is_err() {
        let _ = fs::remove_file(&partial);
        return result;
    }
    fs::rename(&partial, cache).map_err(|e| {
        let _ = fs::remove_file(&partial);
        LocalError::Io {
            context: format!("cannot rename {} into place", partial.display()),
            source: e,
        }
    })
}

/// Unpacks the cached tarball into `dir` (owners, modes, device nodes and xattrs kept).
pub fn extract(cache: &Path, dir: &Path, log: &Path) -> Result<(), LocalError> {
    fs::create_dir_all(dir).map_err(|e| LocalError::Io {
        context: format!("cannot create {}", dir.display()),
        source: e,
    })?;
    let mut cmd = Command::new("tar");
    cmd.args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(cache)
        .arg("-C")
        .arg(dir);
    run_logged("extract", &mut cmd, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_picks_the_stanza_serving_the_suite() {
        let text = "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\n\
                    Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            mirror_in_deb822(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian/")
        );
        assert_eq!(mirror_in_deb822(text, "trixie"), None);
    }

    #[test]
    fn one_line_format_with_options() {
        let text = "# c\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(
            mirror_in_one_line(text, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
    }

    #[test]
    fn cache_key_ignores_package_order_but_not_the_mirror() {
        let mut d = Definition::load(None, Default::default()).unwrap();
        let m = Mirror {
            url: "http://a/debian".into(),
            source: String::new(),
        };
        let a = cache_path(&d, &m);
        d.packages.reverse();
        assert_eq!(a, cache_path(&d, &m));
        let m2 = Mirror {
            url: "http://b/debian".into(),
            source: String::new(),
        };
        assert_ne!(a, cache_path(&d, &m2));
    }
}
