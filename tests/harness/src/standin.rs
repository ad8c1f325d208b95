//! Packages the Waypoint STAND-IN (`waypoint`, package `waypoint-standin`) as a container image,
//! since Waypoint's own images cannot be pulled here.
//!
//! [`write_standin_rootfs_tar`] writes a root file system tarball for `docker import`:
//! - `/bin/waypoint`: the release build of the stand-in (a dynamic binary);
//! - the shared libraries `ldd` lists for it, at the paths `ldd` printed, the dynamic loader
//!   included (copying the dynamic binary and its few glibc libraries spares a second, static
//!   build of all its dependencies);
//! - `/bin/busybox` from Debian's busybox-static, with `/bin/sh`, `cat`, `ls`, `sleep`, `wget`,
//!   `nc`, … as symlinks, so tests can `docker exec CONTAINER cat FILE`;
//! - `/tmp` (1777), `/data` (Waypoint's volume), minimal `/etc/passwd`, `/etc/group`,
//!   `/etc/nsswitch.conf`.
//!
//! Import it with the stand-in as the entrypoint (exec form):
//!
//! ```text
//! docker import --change 'ENTRYPOINT ["/bin/waypoint"]' rootfs.tar TAG
//! ```
//!
//! [`Vm::import_standin`](crate::vm::Vm::import_standin) does exactly that.
//!
//! A second variant, [`build_rootfs_tar_uid100`], mirrors the official Waypoint image's users
//! (its `Dockerfile`): the binary at `/usr/bin/waypoint` (and `/usr/bin/waypoint-entrypoint`),
//! user `waypoint` with uid 100 (group `waypoint`, gid 1000), `HOME=/home/waypoint`, `/data`
//! owned by uid 100, `/run/user/100`, subuid/subgid ranges, and `USER waypoint`: a container
//! of it runs as uid 100 unless told otherwise, so it cannot read root-only files (a 0600
//! root-owned key, a `data.db` written by the root variant). [`import_standin_uid100`]
//! imports it with [`docker_import_changes_uid100`]. Pilot's own image runs the stand-in as
//! root and keeps using the first variant.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Where the stand-in lives in the image.
pub const STANDIN_PATH: &str = "/bin/waypoint";

/// Where the official image (and the uid-100 variant) keeps the binary.
pub const STANDIN_PATH_UID100: &str = "/usr/bin/waypoint";

/// The uid and gid of the `waypoint` user of the uid-100 variant (the official image makes
/// the user with `adduser -S`, uid 100; its group gets the first free gid, 1000).
pub const WAYPOINT_UID: u64 = 100;
pub const WAYPOINT_GID: u64 = 1000;

/// The image's entrypoint in exec form, as JSON-serialised into `ENTRYPOINT [...]` by
/// [`Vm::import_standin`](crate::vm::Vm::import_standin).
pub const STANDIN_ENTRYPOINT: &[&str] = &[STANDIN_PATH];

/// The `--change` argument for `docker import`: `ENTRYPOINT ["/bin/waypoint"]`.
pub fn docker_import_change() -> String {
    format!("ENTRYPOINT [\"{STANDIN_PATH}\"]")
}

/// The `--change` arguments for `docker import` of the uid-100 variant: the official image's
/// `USER`, environment, volume and entrypoint (no `WORKDIR`, so `/`).
pub fn docker_import_changes_uid100() -> Vec<String> {
    vec![
        "USER waypoint".to_string(),
        "ENV USER=waypoint".to_string(),
        "ENV HOME=/home/waypoint".to_string(),
        "ENV XDG_RUNTIME_DIR=/run/user/100".to_string(),
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "VOLUME [\"/data\"]".to_string(),
        format!("ENTRYPOINT [\"{STANDIN_PATH_UID100}\"]"),
    ]
}

/// Imports the uid-100 variant of the stand-in as image `tag` into `vm`'s dockerd (see the
/// module docs); [`Vm::import_standin`](crate::vm::Vm::import_standin) stays the root one.
pub fn import_standin_uid100(vm: &crate::vm::Vm, tag: &str) -> Result<()> {
    let tar = vm.dir().join("standin-uid100-rootfs.tar");
    write_standin_rootfs_tar_uid100(&tar).context("cannot package the Waypoint stand-in")?;
    let changes = docker_import_changes_uid100();
    let refs: Vec<&str> = changes.iter().map(String::as_str).collect();
    let res = vm.import_rootfs(&tar, tag, &refs);
    let _ = fs::remove_file(&tar);
    res
}

/// Busybox applets linked into `/bin`. Tests use `sh`, `cat`, `ls`, `sleep`, `wget` and `nc`;
/// the rest make a shell inside the container bearable when debugging.
const APPLETS: &[&str] = &[
    "sh", "cat", "ls", "sleep", "wget", "nc", "echo", "env", "grep", "ps", "kill", "mkdir", "rm",
    "test", "true", "false", "id", "hostname",
];

/// Where Debian's busybox-static installs busybox (merged /usr makes both paths one file).
const BUSYBOX_CANDIDATES: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];

/// Modification time written into every entry, so two builds of one binary are identical.
const FIXED_MTIME: u64 = 1_700_000_000;

/// The release build of the stand-in binary:
/// `$CARGO_TARGET_DIR` (default `/var/cache/pilot-agent/target`) `/release/waypoint`.
pub fn standin_binary() -> Result<PathBuf> {
    crate::target_bin("waypoint").context("build it first: cargo build --release --workspace")
}

/// Writes the stand-in's root file system tarball to `out` (see the module docs).
pub fn write_standin_rootfs_tar(out: &Path) -> Result<()> {
    write_tar(out, |binary, writer| build_rootfs_tar(binary, writer))
}

/// Writes the uid-100 variant's root file system tarball to `out` (see the module docs).
pub fn write_standin_rootfs_tar_uid100(out: &Path) -> Result<()> {
    write_tar(out, |binary, writer| {
        build_rootfs_tar_uid100(binary, writer)
    })
}

fn write_tar(
    out: &Path,
    build: impl FnOnce(&Path, &mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let binary = standin_binary()?;
    let partial = out.with_extension("tar.partial");
    let written = File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))
        .and_then(|file| {
            let mut writer = BufWriter::new(file);
            build(&binary, &mut writer)?;
            let file = writer.into_inner().context("cannot flush the tarball")?;
            file.sync_all().context("cannot fsync the tarball")
        })
        .and_then(|()| {
            fs::rename(&partial, out)
                .with_context(|| format!("cannot rename into {}", out.display()))
        });
    if written.is_err() {
        let _ = fs::remove_file(&partial);
    }
    written
}

/// The libraries `ldd` resolves for `binary`, the dynamic loader included.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        // The image has no LD_LIBRARY_PATH: resolve as its loader will, from the default paths.
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .context("cannot run ldd (package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text).with_context(|| format!("cannot use the ldd output for {}", binary.display()))
}

/// Parses `ldd` output: `name => /path (addr)`, `/loader (addr)`, and vDSO lines without path.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let resolved = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("library {} not found", name.trim());
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        // linux-vdso.so.1 lives in the kernel; "statically linked" has no path either.
        if resolved.starts_with('/') {
            libs.push(PathBuf::from(resolved));
        }
    }
    Ok(libs)
}

fn find_static_busybox() -> Result<PathBuf> {
    let path = BUSYBOX_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context(
            "busybox not found in /bin or /usr/bin: install busybox-static (scripts/setup.sh)",
        )?;
    if !shared_libraries(&path)?.is_empty() {
        bail!(
            "{} is dynamically linked: install busybox-static instead of busybox",
            path.display()
        );
    }
    Ok(path)
}

/// Tar entries, parents before children, owned by root.
struct RootfsTar<W: Write> {
    builder: tar::Builder<W>,
    dirs: BTreeSet<String>,
}

impl<W: Write> RootfsTar<W> {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        Self::header_owned(kind, mode, size, 0, 0)
    }

    fn header_owned(kind: tar::EntryType, mode: u32, size: u64, uid: u64, gid: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(FIXED_MTIME);
        header.set_size(size);
        header
    }

    /// `path` is absolute in the image; the archive holds it relative to the root.
    fn relative(path: &str) -> Result<&str> {
        let rel = path.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("bad path for the image: {path:?}");
        }
        Ok(rel)
    }

    fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let rel = Self::relative(path)?.to_string();
        if let Some((parent, _)) = rel.rsplit_once('/') {
            self.dir(&format!("/{parent}"), 0o755)?;
        }
        if self.dirs.insert(rel.clone()) {
            let mut header = Self::header(tar::EntryType::Directory, mode, 0);
            self.builder
                .append_data(&mut header, format!("{rel}/"), io::empty())
                .with_context(|| format!("cannot add directory {path}"))?;
        }
        Ok(())
    }

    /// A directory owned by `uid:gid` (its parents are root's).
    fn dir_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Result<()> {
        let rel = Self::relative(path)?.to_string();
        if let Some((parent, _)) = rel.rsplit_once('/') {
            self.dir(&format!("/{parent}"), 0o755)?;
        }
        if !self.dirs.insert(rel.clone()) {
            bail!("directory {path} was added before its owner was set");
        }
        let mut header = Self::header_owned(tar::EntryType::Directory, mode, 0, uid, gid);
        self.builder
            .append_data(&mut header, format!("{rel}/"), io::empty())
            .with_context(|| format!("cannot add directory {path}"))
    }

    fn parent_of(&mut self, path: &str) -> Result<()> {
        match Self::relative(path)?.rsplit_once('/') {
            Some((parent, _)) => self.dir(&format!("/{parent}"), 0o755),
            None => Ok(()),
        }
    }

    fn file(&mut self, path: &str, mode: u32, size: u64, data: impl Read) -> Result<()> {
        self.parent_of(path)?;
        let mut header = Self::header(tar::EntryType::Regular, mode, size);
        self.builder
            .append_data(&mut header, Self::relative(path)?, data)
            .with_context(|| format!("cannot add file {path}"))
    }

    /// Copies a host file (following symlinks) to `path` in the image.
    fn copy(&mut self, host: &Path, path: &str, mode: u32) -> Result<()> {
        let file = File::open(host).with_context(|| format!("cannot open {}", host.display()))?;
        let size = file
            .metadata()
            .with_context(|| format!("cannot stat {}", host.display()))?
            .len();
        self.file(path, mode, size, file)
    }

    fn text(&mut self, path: &str, content: &str) -> Result<()> {
        self.file(path, 0o644, content.len() as u64, content.as_bytes())
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.parent_of(path)?;
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.builder
            .append_link(&mut header, Self::relative(path)?, target)
            .with_context(|| format!("cannot add symlink {path}"))
    }
}

/// Writes the stand-in image's root file system (the binary, its libraries, busybox) as a
/// tar to `out` (public for the chroot test in `tests/standin_chroot.rs`).
pub fn build_rootfs_tar(binary: &Path, out: impl Write) -> Result<()> {
    let mut tar = RootfsTar {
        builder: tar::Builder::new(out),
        dirs: BTreeSet::new(),
    };
    tar.dir("/bin", 0o755)?;
    tar.dir("/etc", 0o755)?;
    tar.dir("/tmp", 0o1777)?;
    tar.dir("/data", 0o755)?;
    tar.dir("/root", 0o700)?;
    tar.copy(binary, STANDIN_PATH, 0o755)?;
    add_common(&mut tar, binary)?;
    tar.text(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    tar.text("/etc/group", "root:x:0:\nnogroup:x:65534:\n")?;
    finish(tar)
}

/// Writes the uid-100 variant's root file system (see the module docs) as a tar to `out`.
pub fn build_rootfs_tar_uid100(binary: &Path, out: impl Write) -> Result<()> {
    let mut tar = RootfsTar {
        builder: tar::Builder::new(out),
        dirs: BTreeSet::new(),
    };
    tar.dir("/bin", 0o755)?;
    tar.dir("/etc", 0o755)?;
    tar.dir("/tmp", 0o1777)?;
    tar.dir("/root", 0o700)?;
    tar.dir_owned("/data", 0o755, WAYPOINT_UID, WAYPOINT_GID)?;
    tar.dir_owned("/home/waypoint", 0o755, WAYPOINT_UID, WAYPOINT_GID)?;
    tar.dir_owned("/run/user/100", 0o700, WAYPOINT_UID, WAYPOINT_GID)?;
    tar.copy(binary, STANDIN_PATH_UID100, 0o755)?;
    tar.symlink("/usr/bin/waypoint-entrypoint", "waypoint")?;
    add_common(&mut tar, binary)?;
    tar.text(
        "/etc/passwd",
        &format!(
            "root:x:0:0:root:/root:/bin/sh\n\
             waypoint:x:{WAYPOINT_UID}:{WAYPOINT_GID}:Linux User,,,:/home/waypoint:/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        ),
    )?;
    tar.text(
        "/etc/group",
        &format!("root:x:0:\nwaypoint:x:{WAYPOINT_GID}:waypoint\nnogroup:x:65534:\n"),
    )?;
    tar.text("/etc/subuid", "waypoint:100000:65536\n")?;
    tar.text("/etc/subgid", "waypoint:100000:65536\n")?;
    finish(tar)
}

/// What both variants hold besides the binary and the users: the libraries, busybox.
fn add_common<W: Write>(tar: &mut RootfsTar<W>, binary: &Path) -> Result<()> {
    let libraries = shared_libraries(binary)?;
    let busybox = find_static_busybox()?;
    for lib in &libraries {
        let path = lib
            .to_str()
            .with_context(|| format!("library path {} is not UTF-8", lib.display()))?;
        tar.copy(lib, path, 0o755)?;
    }
    tar.copy(&busybox, "/bin/busybox", 0o755)?;
    for applet in APPLETS {
        tar.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    tar.text(
        "/etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files dns\n",
    )
}

fn finish<W: Write>(tar: RootfsTar<W>) -> Result<()> {
    tar.builder
        .into_inner()
        .context("cannot finish the tarball")?
        .flush()
        .context("cannot flush the tarball")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f98)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f98)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f98)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

    #[test]
    fn entrypoint_is_exec_form() {
        assert_eq!(docker_import_change(), r#"ENTRYPOINT ["/bin/waypoint"]"#);
        assert_eq!(STANDIN_ENTRYPOINT, ["/bin/waypoint"]);
    }

    fn entries_of(
        bytes: &[u8],
    ) -> BTreeMap<String, (tar::EntryType, u32, u64, u64, Option<String>)> {
        let mut entries = BTreeMap::new();
        let mut archive = tar::Archive::new(bytes);
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let path = format!("/{}", entry.path().unwrap().display())
                .trim_end_matches('/')
                .to_string();
            let header = entry.header();
            let link = entry.link_name().unwrap().map(|l| l.display().to_string());
            entries.insert(
                path,
                (
                    header.entry_type(),
                    header.mode().unwrap(),
                    header.uid().unwrap(),
                    header.gid().unwrap(),
                    link,
                ),
            );
        }
        entries
    }

    /// The static busybox stands in for the binary here, so no release build is needed.
    #[test]
    fn uid100_variant_has_the_official_images_user_home_and_data_owner() {
        let binary = find_static_busybox().unwrap();
        let mut bytes = Vec::new();
        build_rootfs_tar_uid100(&binary, &mut bytes).unwrap();
        let entries = entries_of(&bytes);
        let (kind, mode, uid, _, _) = &entries["/usr/bin/waypoint"];
        assert!(kind.is_file());
        assert_eq!((mode & 0o777, *uid), (0o755, 0));
        assert_eq!(
            entries["/usr/bin/waypoint-entrypoint"].4.as_deref(),
            Some("waypoint")
        );
        assert!(
            !entries.contains_key("/bin/waypoint"),
            "the official image has no /bin/waypoint"
        );
        for dir in ["/data", "/home/waypoint", "/run/user/100"] {
            let (kind, _, uid, gid, _) = &entries[dir];
            assert!(kind.is_dir(), "{dir}");
            assert_eq!((*uid, *gid), (WAYPOINT_UID, WAYPOINT_GID), "{dir}");
        }
        assert_eq!(entries["/tmp"].1 & 0o7777, 0o1777);
        assert_eq!(entries["/root"].2, 0);
        let changes = docker_import_changes_uid100();
        assert!(changes.contains(&"USER waypoint".to_string()));
        assert!(changes.contains(&"ENV HOME=/home/waypoint".to_string()));
        assert_eq!(
            changes.last().unwrap(),
            r#"ENTRYPOINT ["/usr/bin/waypoint"]"#
        );
        // The root variant is unchanged: root-owned /data, /bin/waypoint.
        let mut bytes = Vec::new();
        build_rootfs_tar(&binary, &mut bytes).unwrap();
        let root = entries_of(&bytes);
        assert_eq!(root["/data"].2, 0);
        assert!(root.contains_key("/bin/waypoint"));
    }

    /// Needs the release build of the stand-in (`cargo build --release --workspace`).
    #[test]
    fn tarball_holds_binary_loader_libraries_and_shell() {
        let binary = standin_binary().unwrap();
        let mut bytes = Vec::new();
        build_rootfs_tar(&binary, &mut bytes).unwrap();

        let mut entries = BTreeMap::new();
        let mut archive = tar::Archive::new(bytes.as_slice());
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let path = format!("/{}", entry.path().unwrap().display())
                .trim_end_matches('/')
                .to_string();
            let header = entry.header();
            let link = entry.link_name().unwrap().map(|l| l.display().to_string());
            entries.insert(
                path,
                (
                    header.entry_type(),
                    header.mode().unwrap(),
                    header.size().unwrap(),
                    link,
                ),
            );
        }

        let (kind, mode, size, _) = &entries["/bin/waypoint"];
        assert!(kind.is_file());
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(*size, fs::metadata(&binary).unwrap().len());

        // The loader the binary asks for, and every library ldd lists, at ldd's paths.
        let libs = shared_libraries(&binary).unwrap();
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
        for lib in &libs {
            let (kind, _, size, _) = &entries[lib.to_str().unwrap()];
            assert!(
                kind.is_file(),
                "{} must be a file, not a link",
                lib.display()
            );
            assert_eq!(*size, fs::metadata(lib).unwrap().len());
        }

        let (kind, _, _, link) = &entries["/bin/sh"];
        assert!(kind.is_symlink());
        assert_eq!(link.as_deref(), Some("busybox"));
        assert!(entries["/bin/busybox"].0.is_file());
        for applet in ["cat", "ls", "sleep", "wget", "nc"] {
            assert!(
                entries.contains_key(&format!("/bin/{applet}")),
                "missing /bin/{applet}"
            );
        }
        assert_eq!(entries["/tmp"].1 & 0o7777, 0o1777);
        assert!(entries["/data"].0.is_dir());
        assert!(entries["/etc/passwd"].0.is_file());
        assert!(entries["/etc/group"].0.is_file());
    }
}
