//! `pilot-agent collect-logs`: one redacted archive an operator can attach to a ticket.
//!
//! ```text
//! pilot-agent-logs-HOST-YYYYMMDDTHHMMSSZ.tar.gz      0600, written atomically
//!   pilot-agent-logs-HOST-YYYYMMDDTHHMMSSZ/          every entry below it (0700 / 0600)
//!     MANIFEST                  each part: ok / partial / missing and why, bytes,
//!                               redactions; redactions per kind; the secrets looked for
//!                               (where they live, never their values)
//!     status.txt                `pilot-agent status --long`
//!     status.json               `pilot-agent status --json --long`
//!     history.txt               `pilot-agent status --history --limit 50`
//!     backup-last.json          the last backup attempt and the last good backup
//!     journal.txt               `journalctl -b -u pilot-agent -u pilot-agent-firewall
//!                               --no-pager -o short-iso` (newest 32 MiB), or why not
//!     containers/list.txt       the containers labelled io.pilot.managed=true
//!     containers/NAME.log       the newest 500 lines of stdout and stderr, timestamped
//!     containers/NAME.json      `docker inspect NAME`
//!     nft.txt                   `nft list table inet TABLE`: the agent's table only
//!     docker/daemon.json        `docker.daemon_config` as it is
//!     versions.txt              pilot-agent, dockerd (API /version), kernel, os-release
//!     certificates.txt          subject, issuer, validity, SANs, SHA-256 of each certificate
//! ```
//!
//! Every part goes through the [`Redactor`] before it is kept ([`redact`] says what it
//! hides, [`secrets`] where the values come from); a part that cannot be had is listed with
//! its reason and never stops the archive. When a secret file exists but cannot be read (not
//! root), its value cannot be redacted, so the parts that could carry it (the journal and
//! the containers) are left out, with that reason.

pub mod redact;
pub mod secrets;
pub mod sources;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use time::OffsetDateTime;
use time::macros::format_description;

pub use redact::{Counts, Redacted, Redactor, SecretKind};
pub use sources::{Problem, Raw, Tools};

use crate::config::Config;
use crate::fsutil::{self, FsError, MODE_SECRET};

#[derive(Debug, thiserror::Error)]
pub enum DiagnosticsError {
    #[error("cannot build the archive: {0}")]
    Archive(#[source] std::io::Error),
    #[error("cannot write the archive: {0}")]
    Write(#[from] FsError),
}

/// What to collect, and where to write it.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The configuration, or the defaults when it did not load (`config_loaded` false).
    pub config: &'a Config,
    pub config_loaded: bool,
    /// Why the defaults are used (what `status` warns).
    pub warning: Option<&'a str>,
    /// `--output`; `None`: [`default_output`] in the current directory.
    pub output: Option<&'a Path>,
    pub tools: &'a Tools,
}

/// One part as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartEntry {
    pub name: String,
    pub bytes: usize,
    pub problem: Option<Problem>,
    pub redactions: Counts,
}

/// What [`collect`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    /// The parts in archive order (the MANIFEST first).
    pub parts: Vec<PartEntry>,
    /// Markers written, per kind, over all parts.
    pub redactions: Counts,
}

impl Written {
    /// Parts that are partial or missing.
    pub fn incomplete(&self) -> impl Iterator<Item = &PartEntry> {
        self.parts.iter().filter(|p| p.problem.is_some())
    }
}

/// The host's name (this UTS namespace's), safe for a file name.
pub fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    sources::safe_name(name.trim(), "unknown-host")
}

/// `pilot-agent-logs-HOST-YYYYMMDDTHHMMSSZ`.
pub fn archive_stem(host: &str, now: OffsetDateTime) -> String {
    let fmt = format_description!("[year][month][day]T[hour][minute][second]Z");
    let utc = now.to_offset(time::UtcOffset::UTC);
    let stamp = utc
        .format(fmt)
        .unwrap_or_else(|_| utc.unix_timestamp().to_string());
    format!("pilot-agent-logs-{host}-{stamp}")
}

/// `./pilot-agent-logs-HOST-YYYYMMDDTHHMMSSZ.tar.gz`.
pub fn default_output(host: &str, now: OffsetDateTime) -> PathBuf {
    Path::new(".").join(format!("{}.tar.gz", archive_stem(host, now)))
}

/// The archive's top directory: the output's name without `.tar.gz` / `.tgz`.
fn top_dir(output: &Path, fallback: &str) -> String {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".tar.gz")
        .or_else(|| name.strip_suffix(".tgz"))
        .unwrap_or(&name);
    let safe: String = stem
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    match safe.trim_start_matches('.') {
        "" => fallback.to_string(),
        s => s.to_string(),
    }
}

/// Gathers every part, redacts it, and writes the archive (0600, atomically).
pub async fn collect(req: &Request<'_>) -> Result<Written, DiagnosticsError> {
    let now = OffsetDateTime::now_utc();
    let host = hostname();
    let stem = archive_stem(&host, now);
    let output = req
        .output
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_output(&host, now));
    let top = top_dir(&output, &stem);

    let known = secrets::gather(req.config, req.config_loaded);
    for why in &known.unreadable {
        tracing::warn!("{why}: its value cannot be redacted");
    }
    let withheld = (!known.unreadable.is_empty()).then(|| {
        format!(
            "left out: {} secret file(s) could not be read ({}), so their values could not be \
             redacted; run collect-logs as root",
            known.unreadable.len(),
            known.unreadable.join("; ")
        )
    });

    let mut raw = sources::status(req.config, req.warning);
    raw.push(sources::history(req.config));
    raw.push(sources::backup_record(req.config));
    raw.push(match &withheld {
        Some(why) => Raw::missing("journal.txt", why.clone()),
        None => sources::journal(req.tools).await,
    });
    let docker = sources::docker(req.config).await;
    match &withheld {
        Some(why) => raw.push(Raw::missing("containers/list.txt", why.clone())),
        None => raw.extend(sources::containers(&docker, req.tools).await),
    }
    raw.push(sources::nft(req.tools, &req.config.firewall.table).await);
    raw.push(sources::daemon_json(req.config));
    raw.push(sources::versions(&docker, req.tools).await);
    raw.push(sources::certificates(req.config));

    let mut parts = Vec::with_capacity(raw.len() + 1);
    let mut files = Vec::with_capacity(raw.len() + 1);
    let mut total = Counts::default();
    for r in raw {
        let Redacted { text, counts } = known.redactor.redact_log(&r.text, r.line_prefix);
        // The reason is part of the text (and so already redacted there); redact its copy
        // for the MANIFEST too, without counting it twice.
        let problem = r.problem.map(|p| match p {
            Problem::Partial(s) => Problem::Partial(known.redactor.redact(&s).text),
            Problem::Missing(s) => Problem::Missing(known.redactor.redact(&s).text),
        });
        tracing::debug!(
            part = r.name,
            bytes = text.len(),
            redactions = counts.total()
        );
        total.add(&counts);
        parts.push(PartEntry {
            name: r.name.clone(),
            bytes: text.len(),
            problem,
            redactions: counts,
        });
        files.push((r.name, text.into_bytes()));
    }

    let manifest = known.redactor.redact(&manifest(&ManifestInput {
        top: &top,
        now,
        host: &host,
        req,
        parts: &parts,
        total: &total,
        known: &known,
    }));
    parts.insert(
        0,
        PartEntry {
            name: "MANIFEST".into(),
            bytes: manifest.text.len(),
            problem: None,
            redactions: Counts::default(),
        },
    );
    files.insert(0, ("MANIFEST".into(), manifest.text.into_bytes()));

    let bytes = archive(&top, &files, now).map_err(DiagnosticsError::Archive)?;
    fsutil::write_atomic(&output, &bytes, MODE_SECRET)?;
    tracing::info!(
        path = %output.display(),
        bytes = bytes.len(),
        parts = parts.len(),
        incomplete = parts.iter().filter(|p| p.problem.is_some()).count(),
        redactions = total.total(),
        "wrote the diagnostics archive"
    );
    Ok(Written {
        path: output,
        parts,
        redactions: total,
    })
}

struct ManifestInput<'a> {
    top: &'a str,
    now: OffsetDateTime,
    host: &'a str,
    req: &'a Request<'a>,
    parts: &'a [PartEntry],
    total: &'a Counts,
    known: &'a secrets::KnownSecrets,
}

/// The MANIFEST: what each part is, what is missing and why, what was redacted.
fn manifest(m: &ManifestInput<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pilot-agent collect-logs {}",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(out, "archive:    {}", m.top);
    let _ = writeln!(
        out,
        "created:    {}",
        crate::status_file::millis::format(m.now)
    );
    let _ = writeln!(out, "host:       {}", m.host);
    let _ = writeln!(out, "state dir:  {}", m.req.config.state_dir.display());
    match m.req.warning {
        Some(w) => {
            let _ = writeln!(out, "config:     not loaded: {w}");
        }
        None => {
            let _ = writeln!(out, "config:     loaded");
        }
    }
    out.push_str(
        "\nEvery part was redacted before it was written: each secret the agent knows \
         (listed under SECRETS LOOKED FOR) and each text shaped like one (PEM private key \
         blocks, the values of WAYPOINT_SERVER_TOKEN, Bearer tokens, words whose SHA-256 is \
         an endpoint token's) is replaced by [REDACTED:KIND].\n",
    );

    out.push_str("\nPARTS\n");
    let width = m.parts.iter().map(|p| p.name.len()).max().unwrap_or(8);
    for p in m.parts {
        let (state, why) = match &p.problem {
            None => ("ok", String::new()),
            Some(Problem::Partial(w)) => ("partial", format!("  {w}")),
            Some(Problem::Missing(w)) => ("missing", format!("  {w}")),
        };
        let redactions = match p.redactions.total() {
            0 => String::new(),
            n => format!(", {n} redacted"),
        };
        let _ = writeln!(
            out,
            "{state:8} {:width$}  {} bytes{redactions}{why}",
            p.name, p.bytes
        );
    }

    out.push_str("\nREDACTIONS (markers written, by kind)\n");
    for kind in SecretKind::ALL {
        let _ = writeln!(out, "{:22} {}", kind.as_str(), m.total.get(kind));
    }
    let _ = writeln!(out, "{:22} {}", "total", m.total.total());

    out.push_str("\nSECRETS LOOKED FOR (where each value was read; never the value)\n");
    if m.known.found.is_empty() {
        out.push_str("none found\n");
    }
    for (kind, source) in &m.known.found {
        let _ = writeln!(out, "{:22} {}", kind.as_str(), source.display());
    }
    if !m.known.unreadable.is_empty() || !m.known.notes.is_empty() {
        out.push_str("\nNOTES\n");
        for why in &m.known.unreadable {
            let _ = writeln!(out, "- {why}: its value could not be redacted");
        }
        for note in &m.known.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

/// A gzipped tar of `files` under the directory `top`: directories 0700, files 0600, owned
/// by root, all with the time `now`.
fn archive(
    top: &str,
    files: &[(String, Vec<u8>)],
    now: OffsetDateTime,
) -> std::io::Result<Vec<u8>> {
    let mtime = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let gz = GzEncoder::new(Vec::new(), Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut dirs: Vec<String> = vec![format!("{top}/")];
    for (name, _) in files {
        if let Some((dir, _)) = name.rsplit_once('/') {
            let d = format!("{top}/{dir}/");
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for d in &dirs {
        let mut h = header(tar::EntryType::Directory, 0o700, 0);
        tar.append_data(&mut h, d, std::io::empty())?;
    }
    for (name, data) in files {
        let mut h = header(tar::EntryType::Regular, 0o600, data.len() as u64);
        tar.append_data(&mut h, format!("{top}/{name}"), data.as_slice())?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A host with nothing to reach: no dockerd, no nft, no journalctl; a state directory
    /// with a token and a status file. The archive is still written, 0600, every part there
    /// (those that could not be had saying why), and no secret in it.
    #[tokio::test]
    async fn an_archive_is_written_even_when_every_source_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let w = state.join("waypoint");
        std::fs::create_dir_all(&w).unwrap();
        let token = "bootstrap-secret-0123456789abcdef";
        std::fs::write(w.join("bootstrap-token"), format!("{token}\n")).unwrap();
        let mut status = crate::status_file::Status::start("up", ["waypoint-bootstrap".into()]);
        status.steps[0].detail = format!("bootstrapped with {token}");
        status.write(&state.join("status.json")).unwrap();
        let daemon = dir.path().join("daemon.json");
        std::fs::write(&daemon, format!("{{\"labels\": [\"t={token}\"]}}")).unwrap();
        let mut config = Config {
            state_dir: state,
            ..Config::default()
        };
        config.docker.socket = dir.path().join("no-docker.sock");
        config.docker.daemon_config = daemon;
        let tools = Tools {
            journalctl: vec!["/nonexistent/journalctl".into()],
            nft: vec!["/nonexistent/nft".into()],
            os_release: dir.path().join("no-os-release"),
            ..Tools::default()
        };
        let out = dir.path().join("out.tar.gz");
        let req = Request {
            config: &config,
            config_loaded: true,
            warning: None,
            output: Some(&out),
            tools: &tools,
        };
        let written = collect(&req).await.unwrap();
        assert_eq!(written.path, out);
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let mut entries = std::collections::BTreeMap::new();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(
            std::fs::File::open(&out).unwrap(),
        ));
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let mut text = String::new();
            e.read_to_string(&mut text).unwrap();
            entries.insert(path, text);
        }
        let names: Vec<&str> = entries.keys().map(String::as_str).collect();
        for want in [
            "out/",
            "out/MANIFEST",
            "out/status.txt",
            "out/status.json",
            "out/journal.txt",
            "out/containers/list.txt",
            "out/nft.txt",
            "out/docker/daemon.json",
            "out/versions.txt",
            "out/certificates.txt",
        ] {
            assert!(names.contains(&want), "{want} not in {names:?}");
        }
        assert!(
            entries["out/journal.txt"].contains("/nonexistent/journalctl"),
            "{}",
            entries["out/journal.txt"]
        );
        let manifest = &entries["out/MANIFEST"];
        assert!(manifest.contains("missing  journal.txt"), "{manifest}");
        assert!(
            manifest.contains("missing  containers/list.txt"),
            "{manifest}"
        );
        assert!(manifest.contains("partial  versions.txt"), "{manifest}");
        assert!(
            SecretKind::ALL
                .iter()
                .all(|k| !manifest.contains(&k.marker())),
            "the MANIFEST's own words are no secret: {manifest}"
        );
        assert!(
            manifest.contains(&format!("{:22} 3\n", "bootstrap-token")),
            "{manifest}"
        );
        assert!(
            entries["out/status.txt"].contains("[REDACTED:bootstrap-token]"),
            "{}",
            entries["out/status.txt"]
        );
        for (name, text) in &entries {
            assert!(!text.contains(token), "{name} holds the token");
        }
        assert_eq!(written.redactions.get(SecretKind::BootstrapToken), 2 + 1);
        assert!(written.incomplete().count() >= 3);
    }

    /// A secret file that cannot be read: the parts that could carry its value are left out.
    #[tokio::test]
    async fn an_unreadable_secret_withholds_the_logs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state/database/password")).unwrap();
        let mut config = Config {
            state_dir: dir.path().join("state"),
            ..Config::default()
        };
        config.docker.socket = dir.path().join("no-docker.sock");
        let tools = Tools {
            journalctl: vec!["echo".into(), "a journal line".into()],
            nft: vec!["/nonexistent/nft".into()],
            ..Tools::default()
        };
        let out = dir.path().join("out.tar.gz");
        let req = Request {
            config: &config,
            config_loaded: true,
            warning: None,
            output: Some(&out),
            tools: &tools,
        };
        let written = collect(&req).await.unwrap();
        for name in ["journal.txt", "containers/list.txt"] {
            let part = written.parts.iter().find(|p| p.name == name).unwrap();
            assert!(
                matches!(&part.problem, Some(Problem::Missing(why))
                    if why.starts_with("left out: 1 secret file(s) could not be read")),
                "{part:?}"
            );
        }
    }

    #[test]
    fn names_of_the_archive() {
        let t = time::macros::datetime!(2025-03-04 05:06:07 UTC);
        assert_eq!(
            default_output("vm-1", t),
            Path::new("./pilot-agent-logs-vm-1-20250304T050607Z.tar.gz")
        );
        assert_eq!(top_dir(Path::new("/tmp/x/diag.tar.gz"), "f"), "diag");
        assert_eq!(top_dir(Path::new("diag.tgz"), "f"), "diag");
        assert_eq!(top_dir(Path::new("/tmp/.."), "f"), "f");
    }
}
