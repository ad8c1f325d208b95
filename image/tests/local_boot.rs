//! Boot test of `pilot-image build --target local` (needs root, mmdebstrap, QEMU, genisoimage,
//! cloud-init's make-mime; FAILS when any is missing, never skips).
//!
//! Builds the agent's package (scripts/build-deb), bakes the Waypoint STAND-IN as a `docker
//! save` tarball tagged as the agent's default image (pilot/waypoint:0.11.4), builds the image
//! (the root file system is cached in /var/cache/pilot-image, so reruns are fast), boots it
//! under QEMU (TCG) with a NoCloud seed whose user-data is rendered by `pilot-image user-data`
//! plus a test part that prints `pilot-agent status --json` and Docker's view to the serial
//! console every 3 s, and waits until the agent reports done: degraded with only the database
//! step degraded (the user-data names a database at 10.0.2.2, which QEMU's restricted user
//! network does not route anywhere), the stand-in containers running from the baked image,
//! and that image loaded (no RepoDigests), not pulled.
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

/// Copies the serial console log out of the scratch directory when the test ends (also on
/// failure), so that it can be read after the scratch directory is gone.
struct KeepSerial(PathBuf);

impl Drop for KeepSerial {
    fn drop(&mut self) {
        let _ = fs::copy(&self.0, Path::new(WORK).join("serial-last.log"));
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

#[test]
fn local_image_boots_and_the_agent_converges() -> Result<()> {
    require_tools()?;
    let work = Path::new(WORK);
    fs::create_dir_all(work)?;
    let scratch = tempfile::tempdir_in(work)?;
    let image_bin = env!("CARGO_BIN_EXE_pilot-image");

    // 1. The agent's package.
    let deb_dir = work.join("deb");
    let deb = run(
        Command::new(repo().join("scripts/build-deb"))
            .arg(&deb_dir)
            // The test build (CI compiles it anyway); the shipped `dist` build is the same code.
            .env("PILOT_DEB_PROFILE", "release"),
        "scripts/build-deb",
        SLOW,
    )?;
    let deb = PathBuf::from(deb.lines().last().unwrap_or_default().trim());
    ensure!(deb.is_file(), "build-deb printed no package path");

    // 2. The stand-in as a `docker save` tarball (a throwaway dockerd in a namespace).
    let standin_tar = work.join("waypoint.tar");
    {
        let vm = Vm::start(VmOptions::default())?;
        vm.import_standin(STANDIN_TAG)?;
        let partial = scratch.path().join("waypoint.tar");
        vm.save_image(STANDIN_TAG, &partial)?;
        fs::rename(&partial, &standin_tar)?;
        vm.cleanup()?;
    }

    // 3. The image.
    let out_dir = work.join("out");
    let started = Instant::now();
    let build = run(
        Command::new(image_bin)
            .args(["build", "--target", "local", "--name", "pilot-boot-test"])
            .args(["--format", "raw", "--format", "qcow2"])
            .arg("--output-dir")
            .arg(&out_dir)
            .arg("--agent-deb")
            .arg(&deb)
            .arg("--image")
            .arg(&standin_tar)
            .stdin(Stdio::null()),
        "pilot-image build",
        SLOW,
    )?;
    let build_time = started.elapsed();
    eprintln!("{build}");
    let qcow2 = out_dir.join("pilot-boot-test.qcow2");
    let raw = out_dir.join("pilot-boot-test.raw");
    ensure!(qcow2.is_file() && raw.is_file(), "the build left no image");
    let leftovers: Vec<_> = fs::read_dir(&out_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".pilot-image-tmp-"))
        .collect();
    ensure!(
        leftovers.is_empty(),
        "temporary directories left: {leftovers:?}"
    );

    // 4. The NoCloud seed: rendered user-data + the test's status part, as MIME multi-part.
    let seed_dir = scratch.path().join("seed");
    fs::create_dir_all(&seed_dir)?;
    let password = scratch.path().join("db-admin-password");
    fs::write(&password, "not-a-real-password\n")?;
    let pilot_part = scratch.path().join("pilot.yaml");
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
    let status_part = scratch.path().join("status.yaml");
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
    let seed = scratch.path().join("seed.iso");
    run(
        Command::new("genisoimage")
            .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(&seed)
            .arg(seed_dir.join("user-data"))
            .arg(seed_dir.join("meta-data")),
        "genisoimage",
        QUICK,
    )?;

    // 5. Boot a throwaway overlay of the built image.
    let overlay = scratch.path().join("disk.qcow2");
    run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&qcow2)
            .arg(&overlay),
        "qemu-img create",
        QUICK,
    )?;
    let serial = scratch.path().join("serial.log");
    let _keep_serial = KeepSerial(serial.clone());
    let boot_started = Instant::now();
    let _qemu = Qemu(
        Command::new(QEMU)
            .args(["-accel", "tcg", "-m", "2048", "-smp", "2"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
            .arg("-drive")
            .arg(format!("file={},media=cdrom,format=raw", seed.display()))
            .args(["-netdev", "user,id=n0,restrict=on"])
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start QEMU")?,
    );

    // 6. Wait for done (degraded naming only the database).
    let mut first_status = None;
    let (status, seen) = loop {
        let seen = read_serial(&serial);
        if let Some(s) = &seen.status {
            first_status.get_or_insert_with(|| boot_started.elapsed());
            let bad = unconverged(s);
            let only_db = bad
                .iter()
                .all(|(n, st)| n == "database" && st == "degraded");
            if s["status"] == "done" && only_db {
                break (s.clone(), seen);
            }
            if s["condition"] == "error" && s["status"] == "done" {
                bail!("the agent reported an error (serial log: {WORK}/serial-last.log): {s}");
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
                "no converged status within {BOOT_TIMEOUT:?} (serial log: {WORK}/serial-last.log); \
                 last seen: {seen:?}\nserial tail:\n{tail}"
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let boot_to_done = boot_started.elapsed();
    let bad = unconverged(&status);
    ensure!(
        status["condition"] == "healthy"
            || (status["condition"] == "degraded"
                && bad.len() == 1
                && bad[0] == ("database".to_owned(), "degraded".to_owned())),
        "expected healthy, or degraded with only the database: {status}"
    );

    // The stand-in containers run from the baked image, which was loaded (no registry digest).
    // Docker's line is printed after the status line it follows: wait for one that shows them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let s = read_serial(&serial);
        let docker = s.docker.clone().unwrap_or_default();
        if docker.contains(&format!("waypoint-server|{STANDIN_TAG}|running"))
            && docker.contains(&format!("waypoint-runner-1|{STANDIN_TAG}|running"))
        {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "stand-in containers not running from {STANDIN_TAG}: {:?} (first seen {:?})",
            s.docker,
            seen.docker
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let image = seen.image.unwrap_or_default();
    ensure!(
        image.contains("|[]"),
        "{STANDIN_TAG} has registry digests (pulled?) or is missing: {image}"
    );

    eprintln!(
        "FIGURES: build {:.1}s; boot to first status {:.1}s; boot to done {:.1}s; raw {} MiB allocated \
         ({} MiB apparent); qcow2 {} MiB; status: {}",
        build_time.as_secs_f64(),
        first_status.unwrap_or_default().as_secs_f64(),
        boot_to_done.as_secs_f64(),
        allocated(&raw) / (1 << 20),
        fs::metadata(&raw)?.len() / (1 << 20),
        fs::metadata(&qcow2)?.len() / (1 << 20),
        status
    );
    Ok(())
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}
