//! Boot test of `pilot-image build --target local` (needs root, mmdebstrap, QEMU, genisoimage,
//! cloud-init's make-mime, OVMF; FAILS when any is missing, never skips).
//!
//! Builds the agent's package (scripts/build-deb), bakes the Waypoint STAND-IN as a `docker
//! save` tarball tagged as the agent's default image (pilot/waypoint:0.11.4), builds the image
//! (the root file system is cached in /var/cache/pilot-image, so reruns are fast), boots it
//! under QEMU (TCG) with a NoCloud seed whose user-data is rendered by `pilot-image user-data`
//! plus a test part that prints `pilot-agent status --json` and Docker's view to the serial
//! console every 3 s, and waits until the agent reports done: degraded with only the database
//! step degraded (the user-data names a database at 10.0.2.2, which QEMU's restricted user
//! network does not route anywhere), the stand-in containers running from the baked image,
//! that image preloaded at build time (the agent's images step finds it present, loads
//! nothing) and never pulled (no RepoDigests).
//!
//! It boots the disk twice, each time on a fresh overlay 2 GiB larger than the disk was built:
//! under BIOS (SeaBIOS: GRUB from the protective MBR and the BIOS boot partition) on virtio-blk,
//! and under UEFI with Secure Boot enforced (OVMF's Secure Boot build with Microsoft's keys,
//! from Debian's `ovmf`: Debian's signed shim at the EFI system partition's removable-media
//! path, then its signed GRUB and kernel) on NVMe, as on EC2 Nitro (the initramfs must carry
//! the nvme driver),
//! and checks that the guest saw the firmware it was booted with and that cloud-init grew the
//! root partition and file system to the larger disk.
//!
//! QEMU's network is `-netdev user,restrict=on`: the guest reaches nothing outside the VM.
//! QEMU is killed by PID when the test ends, also on failure.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_harness::{Vm, VmOptions};
use serde_json::Value;

const WORK: &str = "/var/cache/pilot-image/boot-test";
const STANDIN_TAG: &str = "pilot/waypoint:0.11.4";
const QEMU: &str = "/opt/pilot-agent/bin/qemu-system-x86_64";
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Bounds of the steps before the boot: the package build may wait for the shared cargo
/// lock, and a root file system built from scratch downloads every package.
const SLOW: Duration = Duration::from_secs(30 * 60);
const QUICK: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs a command to completion within `limit` (killed by PID past it: the test fails, it
/// does not hang); its stdout.
fn run(cmd: &mut Command, what: &str, limit: Duration) -> Result<String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    // Drained on threads so that a full pipe cannot stall the child while it is polled.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    if !status.success() {
        bail!("{what} failed ({status}):\n{stdout}\n{stderr}");
    }
    Ok(stdout)
}

fn require_tools() -> Result<()> {
    pilot_harness::require_root()?;
    for tool in [QEMU, "/usr/bin/genisoimage", "/usr/bin/mmdebstrap"] {
        ensure!(
            Path::new(tool).is_file(),
            "{tool} is missing: run scripts/setup.sh"
        );
    }
    Ok(())
}

/// Copies a serial console log out of the scratch directory when a boot ends (also on
/// failure), under the given name in WORK, so that it can be read after the scratch directory
/// is gone.
struct KeepSerial(PathBuf, String);

impl Drop for KeepSerial {
    fn drop(&mut self) {
        let _ = fs::copy(&self.0, Path::new(WORK).join(&self.1));
    }
}

/// QEMU, killed by PID on drop.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the guest last printed on its serial console.
#[derive(Default, Debug)]
struct Seen {
    status: Option<Value>,
    docker: Option<String>,
    image: Option<String>,
    /// `uefi` or `bios`: whether /sys/firmware/efi exists in the guest.
    firmware: Option<String>,
    /// The last byte of the SecureBoot EFI variable (`1`: on), empty without one.
    secure_boot: Option<String>,
    /// How many times the agent logged `loading image` (a baked tarball loaded) this boot.
    loads: Option<u64>,
    /// The root file system's size in bytes (findmnt), and its partition's.
    root_bytes: Option<u64>,
    root_part_bytes: Option<u64>,
    /// The root file system's device (`/dev/vda3`, `/dev/nvme0n1p3`).
    root_device: Option<String>,
}

fn read_serial(path: &Path) -> Seen {
    let bytes = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let mut seen = Seen::default();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(i) = line.find("PILOT-STATUS {") {
            // A line cut by a kernel message does not parse: the next one will.
            if let Ok(v) = serde_json::from_str::<Value>(&line[i + "PILOT-STATUS ".len()..]) {
                seen.status = Some(v);
            }
        } else if let Some(i) = line.find("PILOT-DOCKER ") {
            seen.docker = Some(line[i + "PILOT-DOCKER ".len()..].to_owned());
        } else if let Some(i) = line.find("PILOT-IMAGE ") {
            seen.image = Some(line[i + "PILOT-IMAGE ".len()..].to_owned());
        } else if let Some(i) = line.find("PILOT-SECUREBOOT") {
            seen.secure_boot = Some(line[i + "PILOT-SECUREBOOT".len()..].trim().to_owned());
        } else if let Some(i) = line.find("PILOT-FIRMWARE ") {
            seen.firmware = Some(line[i + "PILOT-FIRMWARE ".len()..].trim().to_owned());
        } else if let Some(i) = line.find("PILOT-LOADS ") {
            seen.loads = line[i + "PILOT-LOADS ".len()..].trim().parse().ok();
        } else if let Some(i) = line.find("PILOT-ROOT ") {
            let mut words = line[i + "PILOT-ROOT ".len()..].split_whitespace();
            seen.root_bytes = words.next().and_then(|w| w.parse().ok());
            seen.root_part_bytes = words.next().and_then(|w| w.parse().ok());
            seen.root_device = words.next().map(str::to_owned);
        }
    }
    seen
}

/// Steps not converged (not ok/changed), by name and state.
fn unconverged(status: &Value) -> Vec<(String, String)> {
    status["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter(|s| !matches!(s["state"].as_str(), Some("ok" | "changed")))
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or("?").to_owned(),
                        s["state"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The test part of the user-data: a loop printing status and Docker's view to ttyS0.
const STATUS_PART: &str = r#"#cloud-config
# Test only: reports to the serial console (no login needed) every 3 s.
bootcmd:
  - |
    cat > /usr/local/sbin/pilot-status-serial <<'EOF'
    #!/bin/sh
    # The console is reopened every round: serial-getty's vhangup() revokes open descriptors.
    # Bounded commands: a docker CLI call can hang on docker.socket while dockerd restarts.
    while :; do
      {
        echo "PILOT-STATUS $(timeout 10 pilot-agent status --json 2>/dev/null | tr -d '\n')"
        echo "PILOT-DOCKER $(timeout 10 docker ps -a --format '{{.Names}}|{{.Image}}|{{.State}}' 2>&1 | tr '\n' ';')"
        echo "PILOT-IMAGE $(timeout 10 docker image inspect --format '{{.Id}}|{{json .RepoDigests}}' pilot/waypoint:0.11.4 2>&1 | tr '\n' ';')"
        if [ -d /sys/firmware/efi ]; then echo "PILOT-FIRMWARE uefi"; else echo "PILOT-FIRMWARE bios"; fi
        echo "PILOT-SECUREBOOT $(od -An -tu1 /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c 2>/dev/null | awk '{print $NF}')"
        echo "PILOT-LOADS $(timeout 5 journalctl -u pilot-agent --no-pager -o cat 2>/dev/null | grep -c 'loading image')"
        echo "PILOT-ROOT $(findmnt -bno SIZE /) $(lsblk -bno SIZE "$(findmnt -no SOURCE /)") $(findmnt -no SOURCE /)"
        # The agent's warnings and errors, so that a failed step can be read from the log (by
        # level in the text: journald gives every stderr line priority info).
        timeout 5 journalctl -u pilot-agent --no-pager -o cat 2>&1 | grep -E ' (WARN|ERROR) ' | tail -n 6 | sed 's/^/PILOT-WARN /'
      } >/dev/ttyS0 2>&1
      sleep 3
    done
    EOF
    chmod 755 /usr/local/sbin/pilot-status-serial
    # bootcmd runs inside cloud-init.service, which sysinit.target waits for: a unit with the
    # default dependencies (After=basic.target), or a blocking systemd-run, would deadlock.
    systemd-run --no-block --unit=pilot-status-serial -p DefaultDependencies=no /usr/local/sbin/pilot-status-serial
"#;

/// Step 1: the agent's package (scripts/build-deb; the test build, which CI compiles anyway:
/// the shipped `dist` build is the same code).
fn agent_deb(work: &Path) -> Result<PathBuf> {
    let deb = run(
        Command::new(repo().join("scripts/build-deb"))
            .arg(work.join("deb"))
            .env("PILOT_DEB_PROFILE", "release"),
        "scripts/build-deb",
        SLOW,
    )?;
    let deb = PathBuf::from(deb.lines().last().unwrap_or_default().trim());
    ensure!(deb.is_file(), "build-deb printed no package path");
    Ok(deb)
}

/// Step 2: the stand-in as a `docker save` tarball (a throwaway dockerd in a namespace).
fn standin_tar(work: &Path, scratch: &Path) -> Result<PathBuf> {
    let standin_tar = work.join("waypoint.tar");
    let vm = Vm::start(VmOptions::default())?;
    vm.import_standin(STANDIN_TAG)?;
    let partial = scratch.join("waypoint.tar");
    vm.save_image(STANDIN_TAG, &partial)?;
    fs::rename(&partial, &standin_tar)?;
    vm.cleanup()?;
    Ok(standin_tar)
}

struct Built {
    raw: PathBuf,
    qcow2: PathBuf,
    took: Duration,
}

/// Step 3: the image, raw and qcow2, by the real binary; checks that no temporary directory
/// is left in the output directory.
fn build_image(
    name: &str,
    out_dir: &Path,
    deb: &Path,
    image: &Path,
    definition: Option<&Path>,
) -> Result<Built> {
    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pilot-image"));
    cmd.args(["build", "--target", "local", "--name", name])
        .args(["--format", "raw", "--format", "qcow2"])
        .arg("--output-dir")
        .arg(out_dir)
        .arg("--agent-deb")
        .arg(deb)
        .arg("--image")
        .arg(image)
        .stdin(Stdio::null());
    if let Some(file) = definition {
        cmd.arg("--file").arg(file);
    }
    let build = run(&mut cmd, "pilot-image build", SLOW)?;
    let took = started.elapsed();
    eprintln!("{build}");
    let qcow2 = out_dir.join(format!("{name}.qcow2"));
    let raw = out_dir.join(format!("{name}.raw"));
    ensure!(qcow2.is_file() && raw.is_file(), "the build left no image");
    let leftovers: Vec<_> = fs::read_dir(out_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".pilot-image-tmp-"))
        .collect();
    ensure!(
        leftovers.is_empty(),
        "temporary directories left: {leftovers:?}"
    );
    Ok(Built { raw, qcow2, took })
}

/// Step 4: the NoCloud seed: rendered user-data + the test's status part, as MIME multi-part.
fn make_seed(scratch: &Path) -> Result<PathBuf> {
    let image_bin = env!("CARGO_BIN_EXE_pilot-image");
    let seed_dir = scratch.join("seed");
    fs::create_dir_all(&seed_dir)?;
    let password = scratch.join("db-admin-password");
    fs::write(&password, "not-a-real-password\n")?;
    let pilot_part = scratch.join("pilot.yaml");
    run(
        Command::new(image_bin)
            .args(["user-data", "--flavour", "aws", "--db-host", "10.0.2.2"])
            .args(["--db-admin-user", "pilot_admin", "--db-tls", "disable"])
            .arg("--db-admin-password-file")
            .arg(&password)
            .arg("-o")
            .arg(&pilot_part),
        "pilot-image user-data",
        QUICK,
    )?;
    let status_part = scratch.join("status.yaml");
    fs::write(&status_part, STATUS_PART)?;
    let mime = run(
        Command::new("cloud-init")
            .args(["devel", "make-mime"])
            .args(
                [
                    format!("{}:cloud-config", pilot_part.display()),
                    format!("{}:cloud-config", status_part.display()),
                ]
                .iter()
                .flat_map(|a| ["-a".to_owned(), a.clone()]),
            ),
        "cloud-init devel make-mime",
        QUICK,
    )?;
    fs::write(seed_dir.join("user-data"), mime)?;
    fs::write(
        seed_dir.join("meta-data"),
        format!(
            "instance-id: pilot-boot-test-{}\nlocal-hostname: pilot-boot\n",
            std::process::id()
        ),
    )?;
    let seed = scratch.join("seed.iso");
    run(
        Command::new("genisoimage")
            .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(&seed)
            .arg(seed_dir.join("user-data"))
            .arg(seed_dir.join("meta-data")),
        "genisoimage",
        QUICK,
    )?;
    Ok(seed)
}

#[test]
fn local_image_boots_and_the_agent_converges() -> Result<()> {
    require_tools()?;
    let work = Path::new(WORK);
    fs::create_dir_all(work)?;
    let scratch = tempfile::tempdir_in(work)?;
    let deb = agent_deb(work)?;
    let standin = standin_tar(work, scratch.path())?;
    let Built {
        raw,
        qcow2,
        took: build_time,
    } = build_image("pilot-boot-test", &work.join("out"), &deb, &standin, None)?;
    let seed = make_seed(scratch.path())?;
    // What `publish` will read from this disk: both boot paths, so EC2's RegisterImage gets
    // `uefi-preferred` and Compute Engine's image UEFI_COMPATIBLE.
    let mode = pilot_image::partitions::read_boot_mode(&raw)
        .map_err(|e| anyhow::anyhow!("cannot read the built disk's partition table: {e:?}"))?;
    ensure!(
        mode == pilot_image::aws::BootMode::UefiPreferred,
        "the built disk's boot mode is {mode:?}, expected UefiPreferred (GPT with a BIOS boot and \
         an EFI system partition)"
    );

    // 5. Boot throwaway overlays of the built image, larger than it was built (the root
    //    partition and file system must grow to them), first under BIOS (SeaBIOS), then under
    //    UEFI (OVMF): the one disk boots both.
    let built_bytes = fs::metadata(&raw)?.len();
    let bios = boot_until_done(&qcow2, &seed, scratch.path(), Firmware::Bios, true)?;
    let uefi = boot_until_done(&qcow2, &seed, scratch.path(), Firmware::Uefi, true)?;
    // 6. The attacker's view: the same disk with one byte of its boot loader changed is
    //    refused by the firmware under Secure Boot.
    tampered_shim_is_refused(&raw, scratch.path())?;

    eprintln!(
        "FIGURES: build {:.1}s; raw {} MiB allocated ({} MiB apparent); qcow2 {} MiB; \
         BIOS: first status {:.1}s, done {:.1}s; UEFI: first status {:.1}s, done {:.1}s; \
         root file system {} MiB on a {} MiB disk built at {} MiB; status: {}",
        build_time.as_secs_f64(),
        allocated(&raw) / (1 << 20),
        built_bytes / (1 << 20),
        fs::metadata(&qcow2)?.len() / (1 << 20),
        bios.first_status.as_secs_f64(),
        bios.done.as_secs_f64(),
        uefi.first_status.as_secs_f64(),
        uefi.done.as_secs_f64(),
        uefi.root_bytes / (1 << 20),
        BOOT_DISK_BYTES / (1 << 20),
        built_bytes / (1 << 20),
        uefi.status
    );
    Ok(())
}

/// The virtual disk the image boots on: 2 GiB more than the 4 GiB it is built with.
const BOOT_DISK_BYTES: u64 = 6 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Firmware {
    Bios,
    Uefi,
}

/// OVMF from Debian's `ovmf` package (scripts/setup.sh): the Secure Boot build of the firmware
/// code, and the variable store with Microsoft's keys enrolled and Secure Boot on (what
/// Compute Engine's Shielded VMs and EC2's UEFI Secure Boot trust), of which each boot gets a
/// fresh copy. It needs SMM, hence the q35 machine.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

struct Booted {
    status: Value,
    first_status: Duration,
    done: Duration,
    root_bytes: u64,
}

/// Boots a fresh overlay of `qcow2` (BOOT_DISK_BYTES large) with the NoCloud `seed` under
/// `firmware` and waits until the agent reports done (degraded naming only the database),
/// the stand-in containers run from the baked image, the firmware is the one asked for and
/// Copies the built disk, changes one byte in the middle of the shim at
/// `EFI/BOOT/BOOTX64.EFI` (through mtools, at the EFI system partition's offset), and boots
/// the copy under OVMF with Secure Boot on: the firmware must refuse the image ("Access
/// Denied" on the serial console) and no kernel may start.
fn tampered_shim_is_refused(raw: &Path, scratch: &Path) -> Result<()> {
    const ESP_OFFSET: u64 = 2 << 20;
    let copy = scratch.join("tampered.raw");
    run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(raw)
            .arg(&copy),
        "cp --sparse=always",
        QUICK,
    )?;
    let image = format!("{}@@{ESP_OFFSET}", copy.display());
    let shim = scratch.join("BOOTX64.EFI");
    run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &image, "::/EFI/BOOT/BOOTX64.EFI"])
            .arg(&shim),
        "mcopy (out)",
        QUICK,
    )?;
    let mut bytes = fs::read(&shim)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&shim, &bytes)?;
    run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-o", "-i", &image])
            .arg(&shim)
            .arg("::/EFI/BOOT/BOOTX64.EFI"),
        "mcopy (in)",
        QUICK,
    )?;
    let vars = scratch.join("OVMF_VARS-tampered.fd");
    fs::copy(OVMF_VARS, &vars)?;
    let serial = scratch.join("serial-tampered.log");
    let _keep = KeepSerial(serial.clone(), "serial-last-tampered.log".to_owned());
    let _qemu = Qemu(
        Command::new(QEMU)
            .args(["-accel", "tcg", "-m", "1024", "-smp", "1"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .args(["-machine", "q35,smm=on"])
            .args(["-global", "driver=cfi.pflash01,property=secure,value=on"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=root,format=raw",
                copy.display()
            ))
            .args(["-device", "nvme,drive=root,serial=pilot-root"])
            .args(["-net", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start QEMU")?,
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).into_owned();
        ensure!(
            !text.contains("EFI stub")
                && !text.contains("Welcome to GRUB")
                && !text.contains("Press enter to boot the selected OS"),
            "a tampered shim was run under Secure Boot (serial log: {WORK}/serial-last-tampered.log)"
        );
        if text.contains("NVMe") && text.contains("Access Denied") {
            eprintln!(
                "tampered shim refused: {}",
                text.lines()
                    .find(|l| l.contains("Access Denied"))
                    .unwrap_or_default()
                    .trim()
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no refusal of the tampered shim within 300 s (serial log: {WORK}/serial-last-tampered.log)"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    fs::remove_file(&copy)?;
    Ok(())
}

/// the root file system has grown to the disk.
fn boot_until_done(
    qcow2: &Path,
    seed: &Path,
    scratch: &Path,
    firmware: Firmware,
    preloaded: bool,
) -> Result<Booted> {
    let tag = match firmware {
        Firmware::Bios => "bios",
        Firmware::Uefi => "uefi",
    };
    // Named after the image and the firmware: a second boot must never read the serial log
    // (or reuse the overlay) of an earlier one.
    let stem = qcow2
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let overlay = scratch.join(format!("{stem}-{tag}.qcow2"));
    ensure!(!overlay.exists(), "{} exists already", overlay.display());
    run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(qcow2)
            .arg(&overlay)
            .arg(BOOT_DISK_BYTES.to_string()),
        "qemu-img create",
        QUICK,
    )?;
    let serial = scratch.join(format!("serial-{stem}-{tag}.log"));
    ensure!(!serial.exists(), "{} exists already", serial.display());
    let _keep_serial = KeepSerial(serial.clone(), format!("serial-last-{tag}.log"));
    let mut qemu = Command::new(QEMU);
    qemu.args(["-accel", "tcg", "-m", "2048", "-smp", "2"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!("file={},media=cdrom,format=raw", seed.display()))
        .args(["-netdev", "user,id=n0,restrict=on"])
        .args(["-device", "virtio-net-pci,netdev=n0"]);
    // The disk: virtio-blk under BIOS (Compute Engine's and QEMU's usual), NVMe under UEFI
    // (EC2 Nitro's, and Compute Engine's NVMe disks): the root on NVMe is found only if the
    // initramfs carries the nvme driver.
    match firmware {
        Firmware::Bios => {
            qemu.arg("-drive")
                .arg(format!("file={},if=virtio,format=qcow2", overlay.display()));
        }
        Firmware::Uefi => {
            qemu.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=root,format=qcow2",
                    overlay.display()
                ))
                .args(["-device", "nvme,drive=root,serial=pilot-root"]);
        }
    }
    if firmware == Firmware::Uefi {
        for f in [OVMF_CODE, OVMF_VARS] {
            ensure!(
                Path::new(f).is_file(),
                "{f} is missing: run scripts/setup.sh (ovmf)"
            );
        }
        let vars = scratch.join("OVMF_VARS.fd");
        fs::copy(OVMF_VARS, &vars)?;
        qemu.args(["-machine", "q35,smm=on"])
            .args(["-global", "driver=cfi.pflash01,property=secure,value=on"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
    }
    let boot_started = Instant::now();
    let _qemu = Qemu(
        qemu.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start QEMU")?,
    );

    let mut first_status = None;
    let status = loop {
        let seen = read_serial(&serial);
        if let Some(s) = &seen.status {
            first_status.get_or_insert_with(|| boot_started.elapsed());
            let bad = unconverged(s);
            let only_db = bad
                .iter()
                .all(|(n, st)| n == "database" && st == "degraded");
            if s["status"] == "done" && only_db {
                break s.clone();
            }
            if s["condition"] == "error" && s["status"] == "done" {
                bail!(
                    "{tag}: the agent reported an error (serial log: {WORK}/serial-last-{tag}.log): {s}"
                );
            }
        }
        if boot_started.elapsed() > BOOT_TIMEOUT {
            let tail = fs::read_to_string(&serial).unwrap_or_default();
            let tail: String = tail
                .chars()
                .rev()
                .take(4000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "{tag}: no converged status within {BOOT_TIMEOUT:?} (serial log: \
                 {WORK}/serial-last-{tag}.log); last seen: {seen:?}\nserial tail:\n{tail}"
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let done = boot_started.elapsed();
    let bad = unconverged(&status);
    ensure!(
        status["condition"] == "healthy"
            || (status["condition"] == "degraded"
                && bad.len() == 1
                && bad[0] == ("database".to_owned(), "degraded".to_owned())),
        "{tag}: expected healthy, or degraded with only the database: {status}"
    );

    // The stand-in containers run from the baked image, which was loaded (no registry digest).
    // Docker's line is printed after the status line it follows: wait for one that shows them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let s = read_serial(&serial);
        let docker = s.docker.clone().unwrap_or_default();
        if docker.contains(&format!("waypoint-server|{STANDIN_TAG}|running"))
            && docker.contains(&format!("waypoint-runner-1|{STANDIN_TAG}|running"))
            && s.firmware.is_some()
            && s.root_bytes.is_some()
            && s.loads.is_some()
            && s.secure_boot.is_some()
        {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "{tag}: stand-in containers not running from {STANDIN_TAG}, or no firmware/root \
             line: {s:?}"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    // Preloaded at build time, the agent finds the image present; otherwise it loads the
    // baked tarball (a later pass, if one ran before this status was read, finds it present).
    let images_detail = status["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == "images"))
        .and_then(|s| s["detail"].as_str())
        .unwrap_or_default()
        .to_owned();
    ensure!(
        images_detail.starts_with(&format!("{STANDIN_TAG} present"))
            || (!preloaded && images_detail.starts_with(&format!("{STANDIN_TAG} loaded from "))),
        "{tag}: the images step says {images_detail:?} (preloaded: {preloaded})"
    );
    // And the journal agrees: no tarball loaded when preloaded, one otherwise.
    let loads = seen.loads.unwrap_or(u64::MAX);
    ensure!(
        if preloaded { loads == 0 } else { loads >= 1 },
        "{tag}: the agent logged `loading image` {loads} time(s) (preloaded: {preloaded})"
    );
    let image = seen.image.clone().unwrap_or_default();
    ensure!(
        image.contains("|[]"),
        "{tag}: {STANDIN_TAG} has registry digests (pulled?) or is missing: {image}"
    );
    ensure!(
        seen.firmware.as_deref() == Some(tag),
        "booted with {tag} firmware, the guest saw {:?}",
        seen.firmware
    );
    // Under UEFI, Secure Boot is on: shim, GRUB and the kernel were all verified.
    let want_sb = match firmware {
        Firmware::Bios => "",
        Firmware::Uefi => "1",
    };
    ensure!(
        seen.secure_boot.as_deref() == Some(want_sb),
        "{tag}: Secure Boot variable {:?}, expected {want_sb:?}",
        seen.secure_boot
    );
    let want_device = match firmware {
        Firmware::Bios => "/dev/vda3",
        Firmware::Uefi => "/dev/nvme0n1p3",
    };
    ensure!(
        seen.root_device.as_deref() == Some(want_device),
        "{tag}: the root file system is on {:?}, expected {want_device}",
        seen.root_device
    );
    // The root partition ends 1 MiB before the disk's end (backup GPT) and starts at 128 MiB;
    // grown, it is within a few MiB of the disk, and the file system within ext4's overhead
    // (journal, inode tables: a few percent) of the partition. Not grown, both would be about
    // 2 GiB smaller.
    let part = seen.root_part_bytes.unwrap_or(0);
    let root = seen.root_bytes.unwrap_or(0);
    ensure!(
        part > BOOT_DISK_BYTES - (130 << 20),
        "{tag}: the root partition was not grown to the {BOOT_DISK_BYTES}-byte disk: {part} bytes"
    );
    ensure!(
        root > part / 100 * 95,
        "{tag}: the root file system was not grown to its {part}-byte partition: {root} bytes"
    );
    Ok(Booted {
        status,
        first_status: first_status.unwrap_or_default(),
        done,
        root_bytes: root,
    })
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Size of the ballast layer the preload benchmark adds to the stand-in: with it the image is
/// about as large as Pilot's real Waypoint image (~800 MB).
const BALLAST_BYTES: u64 = 760 << 20;

/// Writes `dst`: the `docker save` tarball `src` with one more layer holding `bytes` of
/// incompressible data, under the same tag (the config's diff_ids and history and the
/// manifest's layer list are extended; the config is renamed after its new digest, as Docker
/// names it).
fn with_ballast(src: &Path, dst: &Path, bytes: u64) -> Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::Write;

    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(fs::File::open(src)?);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        entries.push((path, data));
    }
    let find = |name: &str| entries.iter().position(|(p, _)| p == name);
    let manifest_at = find("manifest.json").context("no manifest.json")?;
    let mut manifest: Value = serde_json::from_slice(&entries[manifest_at].1)?;
    let config_name = manifest[0]["Config"]
        .as_str()
        .context("manifest without Config")?
        .to_owned();
    let config_at = find(&config_name).context("config missing")?;
    let mut config: Value = serde_json::from_slice(&entries[config_at].1)?;

    // The layer: one file of xorshift output (not zeros: nothing on the way may make it sparse).
    let layer_path = dst.with_extension("layer.tar");
    let mut layer_digest = Sha256::new();
    {
        struct Hashing<'a, W: Write>(W, &'a mut Sha256);
        impl<W: Write> Write for Hashing<'_, W> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let n = self.0.write(b)?;
                self.1.update(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.0.flush()
            }
        }
        let file = std::io::BufWriter::new(fs::File::create(&layer_path)?);
        let mut layer = tar::Builder::new(Hashing(file, &mut layer_digest));
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        struct Noise(u64, u64);
        impl Read for Noise {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.1 as usize) / 8 * 8;
                for chunk in buf[..n].chunks_exact_mut(8) {
                    self.0 ^= self.0 << 13;
                    self.0 ^= self.0 >> 7;
                    self.0 ^= self.0 << 17;
                    chunk.copy_from_slice(&self.0.to_le_bytes());
                }
                self.1 -= n as u64;
                Ok(n)
            }
        }
        layer.append_data(
            &mut header,
            "pilot-bench-ballast",
            Noise(0x9e37_79b9_7f4a_7c15, bytes / 8 * 8),
        )?;
        layer.into_inner()?.0.into_inner()?.sync_all()?;
    }
    let diff_id = format!("sha256:{:x}", layer_digest.finalize());
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .context("config without rootfs.diff_ids")?
        .push(Value::String(diff_id));
    if let Some(history) = config["history"].as_array_mut() {
        history.push(serde_json::json!({
            "created": "2026-01-01T00:00:00Z",
            "created_by": "pilot-image benchmark ballast"
        }));
    }
    let config_bytes = serde_json::to_vec(&config)?;
    let new_config_name = format!("{:x}.json", Sha256::digest(&config_bytes));
    manifest[0]["Config"] = Value::String(new_config_name.clone());
    manifest[0]["Layers"]
        .as_array_mut()
        .context("manifest without Layers")?
        .push(Value::String("pilot-bench-ballast/layer.tar".into()));
    entries[config_at] = (new_config_name, config_bytes);
    entries[manifest_at].1 = serde_json::to_vec(&manifest)?;
    // `repositories` names the old image id; Docker uses manifest.json when it is there.
    entries.retain(|(p, _)| p != "repositories");

    let mut out = tar::Builder::new(std::io::BufWriter::new(fs::File::create(dst)?));
    for (path, data) in &entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        if path.ends_with('/') {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
        }
        header.set_cksum();
        out.append_data(&mut header, path, data.as_slice())?;
    }
    out.append_path_with_name(&layer_path, "pilot-bench-ballast/layer.tar")?;
    out.into_inner()?.into_inner()?.sync_all()?;
    fs::remove_file(&layer_path)?;
    Ok(())
}

/// The benchmark behind scripts/bench-image-preload (ignored in the test suite: two image
/// builds and two first boots under TCG with an ~800 MB image take about half an hour).
/// Side by side in one run: the image with the Waypoint image preloaded into its Docker data
/// root at build time, and the image with the tarball copied in for the agent to load at first
/// boot. Prints build time, image sizes and first boot to `done` for each.
#[test]
#[ignore = "benchmark: run by scripts/bench-image-preload"]
fn bench_first_boot_with_and_without_preloaded_images() -> Result<()> {
    require_tools()?;
    let work = Path::new(WORK).join("bench-preload");
    fs::create_dir_all(&work)?;
    let scratch = tempfile::tempdir_in(&work)?;
    let deb = agent_deb(Path::new(WORK))?;
    let standin = standin_tar(Path::new(WORK), scratch.path())?;
    let big = work.join("waypoint-800mb.tar");
    with_ballast(&standin, &big, BALLAST_BYTES)?;
    let tar_mib = fs::metadata(&big)?.len() >> 20;
    let seed = make_seed(scratch.path())?;
    let load_at_boot = scratch.path().join("load-at-boot.yaml");
    fs::write(&load_at_boot, "preload_images: false\n")?;

    let mut lines = Vec::new();
    for (name, definition) in [
        ("preloaded", None),
        ("loaded-at-boot", Some(load_at_boot.as_path())),
    ] {
        let built = build_image(name, &work.join("out"), &deb, &big, definition)?;
        let booted = boot_until_done(
            &built.qcow2,
            &seed,
            scratch.path(),
            Firmware::Bios,
            definition.is_none(),
        )?;
        lines.push(format!(
            "{name}: build {:.1}s, raw {} MiB allocated, qcow2 {} MiB, first status {:.1}s, \
             boot to done {:.1}s",
            built.took.as_secs_f64(),
            allocated(&built.raw) >> 20,
            fs::metadata(&built.qcow2)?.len() >> 20,
            booted.first_status.as_secs_f64(),
            booted.done.as_secs_f64(),
        ));
        fs::remove_file(&built.raw)?;
        fs::remove_file(&built.qcow2)?;
    }
    eprintln!("BENCH image tarball {tar_mib} MiB (stand-in + ballast layer)");
    for line in lines {
        eprintln!("BENCH {line}");
    }
    Ok(())
}
