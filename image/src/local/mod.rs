//! `pilot-image build --target local`: a bootable Debian bookworm disk (raw and/or qcow2) with
//! the agent, Docker, nftables, cloud-init, sshd and the Waypoint image tarballs baked in.
//!
//! Steps, each printed with its duration: check (inputs, tools, free space, mirror), rootfs
//! (mmdebstrap into a cache keyed by mirror + suite + packages, reused between builds),
//! extract, customize (a chroot in private namespaces: see [`customize`]), disk (partition
//! table, `mkfs.ext4 -d`, GRUB: see [`disk`]), qcow2, and publish. Everything is made in a
//! temporary directory inside the output directory and renamed to its final path only at the
//! end: a failed or interrupted build leaves no half-written image there (and removes its
//! temporary directory; one left by a killed build is removed by the next build).

pub mod customize;
pub mod definition;
pub mod disk;
pub mod error;
pub mod preload;
pub mod rootfs;
mod run;

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tracing::{info, warn};

pub use definition::{Definition, Format, Overrides};
pub use error::LocalError;
use rootfs::Mirror;

/// Prefix of the temporary build directories in the output directory (then the builder's PID).
const TMP_PREFIX: &str = ".pilot-image-tmp-";

/// Estimated size of a root file system not cached yet (the default package list unpacks to
/// about 1 GiB; the margin covers mmdebstrap's tree and its tarball side by side).
const ROOTFS_ESTIMATE_MIB: u64 = 1536;

/// Programs the build runs, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("tar", "tar"),
    ("unshare", "util-linux"),
    ("sfdisk", "fdisk"),
    ("mkfs.fat", "dosfstools"),
    ("mmd", "mtools"),
    ("mcopy", "mtools"),
    ("mkfs.ext4", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
    ("curl", "curl"),
];

/// What a finished build made.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// Final paths, per format, with the bytes each takes on disk.
    pub outputs: Vec<(Format, PathBuf, u64)>,
    /// Whether the root file system came from the cache.
    pub rootfs_cached: bool,
    /// Every step with its duration, in order.
    pub steps: Vec<(String, Duration)>,
    pub total: Duration,
}

/// Everything decided before a build starts (what `--dry-run` prints).
#[derive(Debug, Clone)]
pub struct Plan {
    pub def: Definition,
    pub mirror: Mirror,
    pub cache: PathBuf,
    pub cached: bool,
    pub space: Vec<SpaceNeed>,
}

/// Free space wanted on one file system.
#[derive(Debug, Clone)]
pub struct SpaceNeed {
    pub dir: PathBuf,
    pub need_mib: u64,
    pub have_mib: u64,
    pub detail: String,
}

impl Plan {
    /// Resolves the mirror and the cache entry and checks the inputs and the free space,
    /// without changing anything.
    pub fn new(def: Definition) -> Result<Plan, LocalError> {
        check_inputs(&def)?;
        let mirror = rootfs::resolve_mirror(&def);
        let cache = rootfs::cache_path(&def, &mirror);
        let cached = cache.is_file();
        let space = space_needs(&def, &cache, cached)?;
        Ok(Plan {
            def,
            mirror,
            cache,
            cached,
            space,
        })
    }

    /// The plan as text, one step a line.
    pub fn render(&self) -> String {
        let d = &self.def;
        let mut s = String::new();
        let _ = writeln!(s, "plan for pilot-image build --target local:");
        let _ = writeln!(
            s,
            "  check     inputs, tools, free space{}",
            if self.cached {
                ""
            } else {
                ", the mirror's Release file"
            }
        );
        for need in &self.space {
            let _ = writeln!(
                s,
                "            {}: needs ~{} MiB, {} MiB free ({})",
                need.dir.display(),
                need.need_mib,
                need.have_mib,
                need.detail
            );
        }
        if self.cached {
            let _ = writeln!(s, "  rootfs    cached: {}", self.cache.display());
        } else {
            let _ = writeln!(
                s,
                "  rootfs    mmdebstrap --variant=minbase {} from {} ({}), components {}, into {}",
                d.suite,
                self.mirror.url,
                self.mirror.source,
                d.components.join(","),
                self.cache.display()
            );
            let _ = writeln!(s, "            packages: {}", d.packages.join(" "));
        }
        let _ = writeln!(
            s,
            "  extract   the cached tarball into a temporary directory in {}",
            d.output_dir.display()
        );
        let _ = writeln!(
            s,
            "  customize chroot: dpkg -i {}; enable pilot-agent-firewall.service pilot-agent.service ssh.service; \
             cloud-init clean, datasources NoCloud/Ec2/GCE, growpart; initramfs with {}; empty /etc/machine-id; \
             remove SSH host keys; fstab and grub.cfg by UUID; GRUB images for BIOS and UEFI",
            d.agent_deb.display(),
            customize::INITRAMFS_DRIVERS.join(",")
        );
        if d.images.is_empty() {
            let _ = writeln!(s, "            no container images to bake");
        }
        for image in &d.images {
            let _ = writeln!(
                s,
                "            image {} -> {}",
                image.display(),
                if d.preload_images {
                    "/var/lib/docker (preload: docker load by the image's dockerd in a chroot)"
                        .to_owned()
                } else {
                    d.images_dir.display().to_string()
                }
            );
        }
        let _ = writeln!(
            s,
            "  disk      {} MiB raw: GPT (sfdisk): BIOS boot, EFI system (FAT32, mtools), root ext4 from 128 MiB \
             (mkfs.ext4 -d); GRUB for BIOS and UEFI, console=ttyS0",
            d.disk_size_mib
        );
        if d.formats.contains(&Format::Qcow2) {
            let _ = writeln!(s, "  qcow2     qemu-img convert -O qcow2");
        }
        for f in &d.formats {
            let _ = writeln!(s, "  publish   {}", d.output_path(*f).display());
        }
        s
    }
}

/// Reports a step's start and end (with its duration) as progress events (the binary writes
/// them to stderr) and records the duration.
struct Progress {
    steps: Vec<(String, Duration)>,
}

impl Progress {
    fn step<T>(
        &mut self,
        name: &str,
        detail: &str,
        f: impl FnOnce() -> Result<T, LocalError>,
    ) -> Result<T, LocalError> {
        info!("[{name}] {detail}");
        let start = Instant::now();
        let r = f();
        let took = start.elapsed();
        match &r {
            Ok(_) => info!("[{name}] done in {:.1}s", took.as_secs_f64()),
            Err(_) => warn!("[{name}] FAILED after {:.1}s", took.as_secs_f64()),
        }
        self.steps.push((name.to_owned(), took));
        r
    }
}

/// What a failed build does with its temporary directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Remove it (the default): nothing of the build is left.
    #[default]
    Remove,
    /// Keep it, renamed `pilot-image-failed-NAME-PID` in the output directory (the unpacked
    /// root file system, the half-made disk, every step's log), and say where: Packer's
    /// `-on-error=abort`, for a build that must be debugged. Later builds do not remove it.
    Keep,
}

/// Prefix of a failed build's directory kept by [`OnFailure::Keep`].
pub const KEPT_PREFIX: &str = "pilot-image-failed-";

/// Runs the build the plan describes.
pub fn build(plan: &Plan, on_failure: OnFailure) -> Result<BuildReport, LocalError> {
    let started = Instant::now();
    let def = &plan.def;
    let mut p = Progress { steps: Vec::new() };
    p.step("check", "root, tools, free space, mirror", || {
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err(LocalError::NotRoot);
        }
        check_tools()?;
        for need in &plan.space {
            if need.have_mib < need.need_mib {
                return Err(LocalError::NoSpace {
                    dir: need.dir.clone(),
                    need_mib: need.need_mib,
                    have_mib: need.have_mib,
                    detail: need.detail.clone(),
                });
            }
        }
        if !plan.cached {
            rootfs::check_mirror(&plan.mirror, &def.suite)?;
        }
        Ok(())
    })?;

    fs::create_dir_all(&def.output_dir).map_err(|e| LocalError::Io {
        context: format!("cannot create {}", def.output_dir.display()),
        source: e,
    })?;
    remove_stale_tmp_dirs(&def.output_dir);
    // Dropped (removed) on every early return: no half-built image stays behind.
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{TMP_PREFIX}{}-", std::process::id()))
        .tempdir_in(&def.output_dir)
        .map_err(|e| LocalError::Io {
            context: format!(
                "cannot make a temporary directory in {}",
                def.output_dir.display()
            ),
            source: e,
        })?;
    let logs = tmp.path().join("logs");
    fs::create_dir_all(&logs).map_err(|e| LocalError::Io {
        context: format!("cannot create {}", logs.display()),
        source: e,
    })?;

    let outputs = match steps(plan, &mut p, tmp.path(), &logs) {
        Ok(outputs) => outputs,
        Err(e) => {
            if on_failure == OnFailure::Keep {
                keep_failed(def, tmp);
            }
            return Err(e);
        }
    };
    drop(tmp);
    Ok(BuildReport {
        outputs,
        rootfs_cached: plan.cached,
        steps: p.steps,
        total: started.elapsed(),
    })
}

/// The build's steps after the check, in the temporary directory `tmp`: the outputs at their
/// final paths.
fn steps(
    plan: &Plan,
    p: &mut Progress,
    tmp: &Path,
    logs: &Path,
) -> Result<Vec<(Format, PathBuf, u64)>, LocalError> {
    let def = &plan.def;
    if plan.cached {
        p.step(
            "rootfs",
            &format!("cached: {}", plan.cache.display()),
            || Ok(()),
        )?;
    } else {
        p.step(
            "rootfs",
            &format!(
                "mmdebstrap {} from {} into {}",
                def.suite,
                plan.mirror.url,
                plan.cache.display()
            ),
            || rootfs::build_cache(def, &plan.mirror, &plan.cache, &logs.join("rootfs.log")),
        )?;
    }

    let root = tmp.join("rootfs");
    p.step("extract", "unpacking the root file system", || {
        rootfs::extract(&plan.cache, &root, &logs.join("extract.log"))
    })?;

    let uuid = disk::new_uuid()?;
    p.step(
        "customize",
        "agent package, units, images, cloud-init clean, machine-id, boot files",
        || customize::customize(def, &root, &uuid, &logs.join("customize.log")),
    )?;

    if def.preload_images && !def.images.is_empty() {
        p.step(
            "preload",
            "the images loaded into the image's Docker data root by its own dockerd",
            || preload::preload(def, &root, &logs.join("preload.log")),
        )?;
    }

    let raw = tmp.join(format!("{}.raw", def.name));
    p.step(
        "disk",
        &format!(
            "{} MiB: GPT, ext4 (mkfs.ext4 -d), EFI system partition, GRUB for BIOS and UEFI",
            def.disk_size_mib
        ),
        || {
            check_disk_size(def, &root)?;
            disk::make_raw(
                &root,
                &raw,
                def.disk_size_mib,
                &uuid,
                &logs.join("disk.log"),
            )?;
            disk::make_esp(&root, &raw, tmp, &logs.join("esp.log"))?;
            disk::install_boot_loader(&root, &raw)
        },
    )?;
    // The tree is no longer needed; free its space before the conversion.
    p.step("tidy", "removing the unpacked root file system", || {
        fs::remove_dir_all(&root).map_err(|e| LocalError::Io {
            context: format!("cannot remove {}", root.display()),
            source: e,
        })
    })?;

    let qcow2 = tmp.join(format!("{}.qcow2", def.name));
    if def.formats.contains(&Format::Qcow2) {
        p.step("qcow2", "qemu-img convert -O qcow2", || {
            disk::convert_qcow2(&raw, &qcow2, &logs.join("qcow2.log"))
        })?;
    }

    let outputs = p.step("publish", "renaming into place", || {
        let mut outputs = Vec::new();
        for f in &def.formats {
            let made = match f {
                Format::Raw => &raw,
                Format::Qcow2 => &qcow2,
            };
            let dest = def.output_path(*f);
            fs::rename(made, &dest).map_err(|e| LocalError::Io {
                context: format!("cannot rename {} to {}", made.display(), dest.display()),
                source: e,
            })?;
            outputs.push((*f, dest.clone(), disk::allocated_bytes(&dest)));
        }
        Ok(outputs)
    })?;
    Ok(outputs)
}

/// Renames a failed build's temporary directory out of the way of the stale-directory sweep
/// and says where it is. Nothing in it is mounted: the chroots' mounts lived in namespaces
/// that ended with their commands.
fn keep_failed(def: &Definition, tmp: tempfile::TempDir) {
    let kept = def
        .output_dir
        .join(format!("{KEPT_PREFIX}{}-{}", def.name, std::process::id()));
    let path = tmp.keep();
    match fs::rename(&path, &kept) {
        Ok(()) => warn!(
            "kept the failed build for inspection: {} (logs in {}/logs); remove it with: rm -rf {}",
            kept.display(),
            kept.display(),
            kept.display()
        ),
        Err(e) => warn!(
            "kept the failed build for inspection: {} (could not rename it to {}: {e}; the \
             next build removes it); remove it with: rm -rf {}",
            path.display(),
            kept.display(),
            path.display()
        ),
    }
}

fn check_tools() -> Result<(), LocalError> {
    for (tool, package) in TOOLS {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(LocalError::MissingTool {
                tool: (*tool).to_owned(),
                package: (*package).to_owned(),
            });
        }
    }
    Ok(())
}

/// The agent package and every image tarball must exist; each tarball must be a `docker save`
/// archive (a top-level manifest.json), the format the agent loads.
fn check_inputs(def: &Definition) -> Result<(), LocalError> {
    let input = |path: &Path, message: String| LocalError::Input {
        path: path.to_owned(),
        message,
    };
    if !def.agent_deb.is_file() {
        return Err(input(
            &def.agent_deb,
            "agent package not found: build it with scripts/build-deb (or give --agent-deb)"
                .to_owned(),
        ));
    }
    for image in &def.images {
        let file = File::open(image).map_err(|e| input(image, format!("cannot open: {e}")))?;
        let mut archive = tar::Archive::new(file);
        let entries = archive
            .entries()
            .map_err(|e| input(image, format!("not a tar archive: {e}")))?;
        let mut has_manifest = false;
        for entry in entries {
            let entry = entry.map_err(|e| input(image, format!("not a tar archive: {e}")))?;
            let path = entry.path().map(|p| p.into_owned()).unwrap_or_default();
            if path == Path::new("manifest.json") || path == Path::new("./manifest.json") {
                has_manifest = true;
                break;
            }
        }
        if !has_manifest {
            return Err(input(
                image,
                "not a `docker save` archive (no manifest.json)".to_owned(),
            ));
        }
    }
    Ok(())
}

/// Free MiB on the file system holding `dir` (or its nearest existing ancestor), and its id.
fn free_mib(dir: &Path) -> Result<(u64, u64), LocalError> {
    use std::os::unix::ffi::OsStrExt;
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            probe = PathBuf::from("/");
            break;
        }
    }
    let c =
        std::ffi::CString::new(probe.as_os_str().as_bytes()).map_err(|_| LocalError::Input {
            path: dir.to_owned(),
            message: "path contains a NUL byte".to_owned(),
        })?;
    // SAFETY: statvfs is plain old data (all-zero is a valid value); `c` is a valid C string
    // and `st` a valid, writable statvfs for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(LocalError::Io {
            context: format!("cannot statvfs {}", probe.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64 / (1024 * 1024);
    Ok((free, st.f_fsid as u64))
}

/// Cold build: mmdebstrap's tree and its tarball in the cache directory. Every build: the
/// extracted tree, the raw disk (sparse: about the tree's size) and the qcow2 (about the
/// same) in the output directory. Two directories on one file system add up.
fn space_needs(def: &Definition, cache: &Path, cached: bool) -> Result<Vec<SpaceNeed>, LocalError> {
    let rootfs_mib = if cached {
        fs::metadata(cache)
            .map(|m| m.len() / (1024 * 1024))
            .unwrap_or(ROOTFS_ESTIMATE_MIB)
    } else {
        ROOTFS_ESTIMATE_MIB
    };
    let images_mib: u64 = def
        .images
        .iter()
        .map(|i| fs::metadata(i).map(|m| m.len()).unwrap_or(0) / (1024 * 1024))
        .sum();
    let per_copy = rootfs_mib + images_mib;
    let copies = if def.formats.contains(&Format::Qcow2) {
        3
    } else {
        2
    };
    let out_need = per_copy * copies + 256;
    let (out_free, out_fs) = free_mib(&def.output_dir)?;
    let mut needs = Vec::new();
    let out_detail = format!(
        "root file system ~{rootfs_mib} MiB + images {images_mib} MiB, {copies} copies (tree, raw{})",
        if copies == 3 { ", qcow2" } else { "" }
    );
    if cached {
        needs.push(SpaceNeed {
            dir: def.output_dir.clone(),
            need_mib: out_need,
            have_mib: out_free,
            detail: out_detail,
        });
        return Ok(needs);
    }
    let cache_need = ROOTFS_ESTIMATE_MIB * 2;
    let (cache_free, cache_fs) = free_mib(&def.cache_dir)?;
    if cache_fs == out_fs {
        needs.push(SpaceNeed {
            dir: def.output_dir.clone(),
            need_mib: out_need + cache_need,
            have_mib: out_free,
            detail: format!(
                "{out_detail}; plus the root file system cache {cache_need} MiB (same file system)"
            ),
        });
    } else {
        needs.push(SpaceNeed {
            dir: def.output_dir.clone(),
            need_mib: out_need,
            have_mib: out_free,
            detail: out_detail,
        });
        needs.push(SpaceNeed {
            dir: def.cache_dir.clone(),
            need_mib: cache_need,
            have_mib: cache_free,
            detail: "mmdebstrap's tree and its tarball".to_owned(),
        });
    }
    Ok(needs)
}

/// The root file system plus a quarter for ext4's own structures and some room to grow.
fn check_disk_size(def: &Definition, root: &Path) -> Result<(), LocalError> {
    let out = Command::new("du")
        .args(["-s", "-x", "--block-size=1M"])
        .arg(root)
        .output()
        .map_err(|e| LocalError::Io {
            context: "cannot run du".to_owned(),
            source: e,
        })?;
    let rootfs_mib: u64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let need_mib = rootfs_mib + rootfs_mib / 4 + 128 + disk::LAYOUT_OVERHEAD_MIB;
    if def.disk_size_mib < need_mib {
        return Err(LocalError::DiskTooSmall {
            disk_mib: def.disk_size_mib,
            rootfs_mib,
            need_mib,
        });
    }
    Ok(())
}

/// Temporary directories of builds whose process is gone (killed builds).
fn remove_stale_tmp_dirs(output_dir: &Path) {
    let Ok(entries) = fs::read_dir(output_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            info!("removing {name}, left by a build that was killed");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
