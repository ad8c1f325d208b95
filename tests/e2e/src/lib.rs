//! End-to-end suites live in tests/; helpers they share (and the benchmarks in src/bin/) here.

pub mod agent;
pub mod crash;
pub mod floor;
pub mod stack;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use pilot_harness::{Postgres, Sshd, SshdOptions, Vm, VmOptions, require_root};
use serde_json::Value;

use crate::agent::Agent;

/// Runs phase `name` of a long test: an error gets `phase NAME` as its outermost context, and
/// a panic is raised again as `phase NAME: MESSAGE`, so a failure names the phase it is in.
pub fn phase<T>(name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result.with_context(|| format!("phase {name}")),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(a panic without a message)".to_string());
            panic!("phase {name}: {message}");
        }
    }
}

/// Starts a simulated VM (needs root) and prints `SUITE: VM NAME (ADDR, hostname H) started
/// in T`.
pub fn start_vm(suite: &str) -> anyhow::Result<Vm> {
    require_root()?;
    let vm = Vm::start(VmOptions::default())?;
    eprintln!(
        "{suite}: VM {} ({}, hostname {}) started in {:?}",
        vm.name(),
        vm.addr(),
        vm.hostname(),
        vm.start_duration()
    );
    Ok(vm)
}

/// Polls `check` every 100 ms until it yields `Some`, or fails after `timeout` naming `what`
/// and the last error `check` reported (an `Err` means "not yet, and this is why").
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a TLS client in the outside namespace of `vm` sees at `ip:port`: whether the served
/// chain verifies against `ca` with `ip` checked among the certificate's addresses (openssl
/// `s_client -verify_return_error -verify_ip`), and the served certificate's SHA-256
/// fingerprint (`AB:CD:...`, as `openssl x509 -fingerprint -sha256` prints it).
pub fn tls_seen_from_outside(
    vm: &Vm,
    ip: std::net::IpAddr,
    port: u16,
    ca: &Path,
) -> anyhow::Result<(bool, String)> {
    let s_client = |verify: bool| {
        let mut c = vm.outside_cmd("timeout");
        c.args(["10", "openssl", "s_client", "-connect"])
            .arg(format!("{ip}:{port}"))
            .arg("-CAfile")
            .arg(ca)
            .stdin(std::process::Stdio::null());
        if verify {
            c.args(["-verify_return_error", "-verify_ip", &ip.to_string()]);
        }
        c.output().context("openssl s_client")
    };
    let verified = s_client(true)?;
    let text = String::from_utf8_lossy(&verified.stdout);
    let ok = verified.status.success() && text.contains("Verify return code: 0 (ok)");
    let shown = s_client(false)?;
    let text = String::from_utf8_lossy(&shown.stdout).into_owned();
    let pem = text
        .find("-----BEGIN CERTIFICATE-----")
        .and_then(|start| {
            let end = text[start..].find("-----END CERTIFICATE-----")?;
            Some(text[start..start + end + "-----END CERTIFICATE-----".len()].to_string())
        })
        .with_context(|| format!("no certificate served at {ip}:{port}: {text}"))?;
    Ok((ok, cert_fingerprint(pem.as_bytes())?))
}

/// The SHA-256 fingerprint of a PEM certificate, as `openssl x509 -fingerprint -sha256`
/// prints it (`AB:CD:...`).
pub fn cert_fingerprint(pem: &[u8]) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("openssl x509")?;
    child
        .stdin
        .take()
        .context("openssl's stdin")?
        .write_all(pem)?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "openssl x509 refused the certificate");
    let text = String::from_utf8_lossy(&out.stdout);
    let fp = text
        .trim()
        .rsplit_once('=')
        .map(|(_, fp)| fp.to_string())
        .context("no fingerprint")?;
    Ok(fp)
}

/// Bakes the Waypoint stand-in into `vm` the way a Pilot image does: a `docker save` tarball
/// tagged `tag` in `VM_DIR/images/`, and the image absent from dockerd, so the agent must load
/// it. Returns the images directory.
pub fn bake_standin(vm: &Vm, tag: &str) -> anyhow::Result<PathBuf> {
    let images = vm.dir().join("images");
    fs::create_dir_all(&images)?;
    vm.import_standin(tag)?;
    vm.save_image(tag, &images.join("waypoint.tar"))?;
    vm.docker_ok(["rmi", tag])?;
    Ok(images)
}

/// [`bake_standin`] with the uid-100 variant of the stand-in: Waypoint's official image's
/// `USER waypoint` (uid 100, gid 1000), `HOME` and a `/data` that user owns.
pub fn bake_standin_uid100(vm: &Vm, tag: &str) -> anyhow::Result<PathBuf> {
    let images = vm.dir().join("images");
    fs::create_dir_all(&images)?;
    pilot_harness::standin::import_standin_uid100(vm, tag)?;
    vm.save_image(tag, &images.join("waypoint.tar"))?;
    vm.docker_ok(["rmi", tag])?;
    Ok(images)
}

/// Writes the PostgreSQL superuser's password to `VM_DIR/pg-admin-password` (0600), the file
/// the agent's `database.admin_password_file` names; returns its path.
pub fn write_admin_password(vm: &Vm, pg: &Postgres) -> anyhow::Result<PathBuf> {
    let path = vm.dir().join("pg-admin-password");
    fs::write(&path, format!("{}\n", pg.password()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// The Waypoint stand-in server's persisted state (its `-db` file in the volume of the
/// `waypoint-server` container of `vm`): tokens, advertise address, registered runners.
pub fn standin_server_state(vm: &Vm) -> anyhow::Result<Value> {
    let text = vm.docker_ok(["exec", "waypoint-server", "cat", "/data/data.db"])?;
    serde_json::from_str(&text).context("the stand-in server's state")
}

/// The bootstrap tokens a stand-in server's state says it ever issued.
pub fn bootstrap_tokens(state: &Value) -> Vec<String> {
    state["tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| t["kind"] == "bootstrap")
                .filter_map(|t| t["secret"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The status file the stand-in runner container `name` of `vm` keeps.
pub fn standin_runner_status(vm: &Vm, name: &str) -> anyhow::Result<Value> {
    let text = vm.docker_ok(["exec", name, "cat", "/tmp/waypoint-runner-status.json"])?;
    serde_json::from_str(&text).with_context(|| format!("the status of {name}"))
}

/// The arguments of `waypoint server run` as the agent passes them (agent/src/waypoint/
/// server.rs), for the floor and the smoke suite that start a server by hand: state in
/// `/data/data.db`, gRPC on 9701, HTTP(S) on 9702.
pub const WAYPOINT_SERVER_RUN: [&str; 7] = [
    "server",
    "run",
    "-accept-tos",
    "-url-enabled=false",
    "-db=/data/data.db",
    "-listen-grpc=0.0.0.0:9701",
    "-listen-http=0.0.0.0:9702",
];

/// Polls until `curl -k` (a fresh one from `curl` each time: `vm.cmd("curl")` inside the VM,
/// `vm.outside_cmd("curl")` from outside) gets HTTP 200 from `url`, each try bounded by
/// `max_time` seconds; fails after `timeout` naming `what` and the last answer.
pub fn wait_https_200(
    curl: impl Fn() -> Command,
    url: &str,
    max_time: &str,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<()> {
    poll(timeout, what, || {
        let out = curl()
            .args(["-k", "-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["--max-time", max_time])
            .arg(url)
            .output()
            .map_err(|e| e.to_string())?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if code == "200" {
            Ok(Some(()))
        } else {
            Err(format!("curl {}: HTTP {code:?}", out.status))
        }
    })
}

/// Makes a CA that did not sign anything of the agent's (`DIR/ca.pem`, key `DIR/key.pem`,
/// P-256, one day), to show that a client trusting it is refused; returns the certificate.
pub fn foreign_ca(dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let ca = dir.join("ca.pem");
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec"])
        .args([
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", "/CN=not the agent's CA", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(&ca)
        .output()
        .context("cannot run openssl")?;
    ensure!(
        made.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    Ok(ca)
}

/// sshd in `vm` (key authentication, root) whose sessions find `pilot-agent` on PATH (a
/// symlink to the built binary in `VM_DIR/bin`, as /usr/bin/pilot-agent on a real host) and
/// its configuration (PILOT_AGENT_CONFIG); checks that a session runs inside the VM.
pub fn start_operator_sshd(vm: &Vm, agent: &Agent) -> anyhow::Result<Sshd> {
    let bin = vm.dir().join("bin");
    fs::create_dir_all(&bin)?;
    let link = bin.join("pilot-agent");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(pilot_harness::target_bin("pilot-agent")?, &link)?;
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bin.display()
    );
    let sshd = Sshd::start(
        vm,
        SshdOptions {
            env: vec![
                ("PATH".into(), path),
                (
                    "PILOT_AGENT_CONFIG".into(),
                    agent.config_path().display().to_string(),
                ),
            ],
        },
    )?;
    // The session runs inside the VM: its hostname, not the machine's.
    let out = sshd.ssh_output(vm, "hostname")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.trim() == vm.hostname(),
        "ssh root@{} hostname: {} {}{}",
        vm.addr(),
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(sshd)
}

/// The state and detail of step `name` in a status.json.
pub fn step_state(status: &Value, name: &str) -> anyhow::Result<(String, String)> {
    let s = status["steps"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .with_context(|| format!("no step {name} in {status}"))?;
    Ok((
        s["state"].as_str().unwrap_or_default().to_string(),
        s["detail"].as_str().unwrap_or_default().to_string(),
    ))
}

/// The arguments every benchmark binary takes: `[--runs N] [--json PATH]`.
pub struct BenchArgs {
    pub runs: usize,
    pub json: PathBuf,
}

/// Parses [`BenchArgs`] from the command line (`-h`/`--help` prints `usage` and exits).
pub fn bench_args(
    default_runs: usize,
    default_json: PathBuf,
    usage: &str,
) -> anyhow::Result<BenchArgs> {
    let mut args = BenchArgs {
        runs: default_runs,
        json: default_json,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                args.runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .with_context(|| format!("--runs needs a positive count\n{usage}"))?
            }
            "--json" => args.json = it.next().map(PathBuf::from).context(usage.to_string())?,
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}\n{usage}"),
        }
    }
    Ok(args)
}

/// Writes a benchmark's JSON report (pretty, with a final newline), making its directory.
pub fn write_json_report(path: &Path, report: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A tmpfs of `size` mounted on `dir` (a directory the test owns); unmounted when dropped, and
/// by the VM's clean-up (which unmounts everything under its directory) if the test dies.
pub struct TmpfsMount(PathBuf);

impl TmpfsMount {
    pub fn new(dir: &Path, size: &str) -> anyhow::Result<TmpfsMount> {
        fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()?;
        ensure!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(TmpfsMount(dir.to_path_buf()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with `dir/filler` until ENOSPC; returns its size.
pub fn fill(dir: &Path) -> anyhow::Result<u64> {
    use std::io::Write as _;
    const ENOSPC: i32 = 28;
    let path = dir.join("filler");
    let mut f = fs::File::create(&path)?;
    let chunk = vec![0xa5u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(ENOSPC) => break,
            Err(e) => return Err(e).context("filling the file system"),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::phase;

    #[test]
    fn phase_names_the_phase_of_an_error_and_of_a_panic() {
        let e = phase("two", || -> anyhow::Result<()> { anyhow::bail!("broke") }).unwrap_err();
        assert_eq!(format!("{e:#}"), "phase two: broke");
        let p = std::panic::catch_unwind(|| {
            phase("three", || -> anyhow::Result<()> { panic!("boom {}", 3) })
        })
        .unwrap_err();
        assert_eq!(
            p.downcast_ref::<String>().map(String::as_str),
            Some("phase three: boom 3")
        );
        assert_eq!(phase("four", || Ok(4)).unwrap(), 4);
    }
}
