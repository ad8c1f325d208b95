//! A real OpenSSH server inside a simulated VM, for operators' `ssh root@VM ...` from the
//! outside namespace.
//!
//! Everything lives in `VM_DIR/sshd/`: its own `sshd_config` (the machine's `/etc/ssh` is never
//! read for the server's settings nor touched), its own ed25519 host key, a generated client key
//! whose public half is the only entry of `authorized_keys`, a `known_hosts` that pins the host
//! key at the VM's address, the pid file and the log (`sshd -D -e`). Only root may log in, only
//! with that key (`PermitRootLogin prohibit-password`, `UsePAM no`, `StrictModes yes`); sshd
//! listens on the VM's address, port 22, inside the VM's network namespace, so the machine's
//! own sshd (if any) is not affected.
//!
//! Sessions get `SetEnv` variables from [`SshdOptions::env`] (e.g. a `PATH` that finds the
//! built `pilot-agent` and `PILOT_AGENT_CONFIG`), so an operator's command is exactly what it
//! would be on a real host: `ssh root@VM pilot-agent status`.
//!
//! sshd needs its privilege separation directory `/run/sshd` (normally made by the package's
//! service unit, which does not run on a machine without systemd): [`Sshd::start`] creates it
//! (root, 0755) when it is missing, which changes nothing else on the machine.
//!
//! The server is stopped by its PID (verified by its command line) on [`Sshd::stop`] or `Drop`,
//! together with any session processes still below it; the VM's own clean-up would also find it
//! (its command line names the VM directory, and it lives in the VM's network namespace).

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::sys;
use crate::vm::Vm;

/// The port sshd listens on (the VM's address).
pub const SSH_PORT: u16 = 22;

/// sshd's privilege separation directory (compiled into Debian's sshd).
const PRIVSEP_DIR: &str = "/run/sshd";

/// How a test sshd is made.
#[derive(Debug, Clone, Default)]
pub struct SshdOptions {
    /// Variables set in every session (`SetEnv NAME=VALUE` in sshd_config); values must not
    /// contain whitespace or quotes.
    pub env: Vec<(String, String)>,
}

/// A running sshd inside a VM; see the module documentation.
pub struct Sshd {
    dir: PathBuf,
    addr: Ipv4Addr,
    child: Option<Child>,
    pid: u32,
    /// A string in sshd's command line (also after it retitles itself), checked before any
    /// signal so that a reused PID is never hit.
    marker: String,
    stopped: bool,
}

impl Sshd {
    /// Generates the keys and configuration in `VM_DIR/sshd/`, starts sshd in the VM's network
    /// and UTS namespaces and returns once the VM's port 22 accepts connections from the
    /// outside namespace.
    pub fn start(vm: &Vm, opts: SshdOptions) -> Result<Sshd> {
        crate::require_root()?;
        let sshd_bin = Path::new("/usr/sbin/sshd");
        if !sshd_bin.is_file() {
            bail!("/usr/sbin/sshd is missing: install openssh-server (scripts/setup.sh)");
        }
        ensure_privsep_dir()?;
        let dir = vm.dir().join("sshd");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // StrictModes applies to authorized_keys and every directory above it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;

        keygen(&dir.join("ssh_host_ed25519_key"), "pilot-harness host key")?;
        keygen(&dir.join("client_key"), "pilot-harness operator")?;
        let client_pub = read_pub(&dir.join("client_key.pub"))?;
        write_file(&dir.join("authorized_keys"), &client_pub, 0o600)?;
        let host_pub = read_pub(&dir.join("ssh_host_ed25519_key.pub"))?;
        // known_hosts: "ADDR TYPE KEY" (port 22 needs no [addr]:port form).
        let mut fields = host_pub.split_whitespace();
        let (kind, key) = match (fields.next(), fields.next()) {
            (Some(k), Some(v)) => (k, v),
            _ => bail!("unexpected host public key: {host_pub:?}"),
        };
        write_file(
            &dir.join("known_hosts"),
            &format!("{} {kind} {key}\n", vm.addr()),
            0o600,
        )?;

        let config = dir.join("sshd_config");
        write_file(&config, &render_config(&dir, vm.addr(), &opts)?, 0o600)?;
        // Check the configuration first: a typo gives sshd's own message, not a timeout.
        let check = vm
            .cmd(sshd_bin)
            .arg("-t")
            .arg("-f")
            .arg(&config)
            .output()
            .context("cannot run sshd -t")?;
        if !check.status.success() {
            bail!(
                "sshd rejects {}: {}",
                config.display(),
                String::from_utf8_lossy(&check.stderr).trim()
            );
        }

        let log_path = dir.join("sshd.log");
        let log = fs::File::create(&log_path)?;
        // nsenter execs sshd (no fork for net/uts namespaces): the child's PID is sshd's.
        let child = vm
            .cmd(sshd_bin)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start sshd")?;
        let pid = child.id();
        let marker = format!("-f {}", config.display());
        append_record(vm.dir(), &format!("pid {pid} {marker}"))?;
        let mut sshd = Sshd {
            dir,
            addr: vm.addr(),
            child: Some(child),
            pid,
            marker,
            stopped: false,
        };
        let target = SocketAddr::from((vm.addr(), SSH_PORT));
        sys::poll(
            Duration::from_secs(10),
            &format!("sshd on {target} to accept from outside"),
            || {
                if let Some(c) = sshd.child.as_mut()
                    && let Ok(Some(st)) = c.try_wait()
                {
                    bail!("sshd exited ({st}): {}", sys::tail(&log_path, 20));
                }
                Ok(vm
                    .connect_from_outside(SSH_PORT, sys::POLL * 4)
                    .ok()
                    .map(|_| ()))
            },
        )?;
        Ok(sshd)
    }

    /// `ssh root@VM REMOTE_COMMAND` from the outside namespace: the generated client key, the
    /// host key checked against the generated `known_hosts` (no trust on first use), no
    /// prompts, and no configuration from `~/.ssh` or `/etc/ssh/ssh_config`.
    pub fn ssh(&self, vm: &Vm, remote_command: &str) -> Command {
        let mut c = vm.outside_cmd("ssh");
        c.arg("-F")
            .arg("/dev/null")
            .arg("-i")
            .arg(self.client_key())
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.known_hosts().display()
            ))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "IdentityAgent=none",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
                "-p",
            ])
            .arg(SSH_PORT.to_string())
            .arg(format!("root@{}", self.addr))
            .arg("--")
            .arg(remote_command)
            .stdin(Stdio::null());
        c
    }

    /// Runs [`Sshd::ssh`] to completion.
    pub fn ssh_output(&self, vm: &Vm, remote_command: &str) -> Result<Output> {
        self.ssh(vm, remote_command)
            .output()
            .with_context(|| format!("cannot run ssh root@{} {remote_command}", self.addr))
    }

    /// sshd's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// `VM_DIR/sshd`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("sshd_config")
    }
    /// The operator's private key (authorized for root).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }
    /// `known_hosts` with the VM's host key at its address.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
    /// sshd's log (stderr of `sshd -D -e`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("sshd.log")
    }
    /// The host's public key line (`ssh-ed25519 AAAA... comment`).
    pub fn host_public_key(&self) -> Result<String> {
        read_pub(&self.dir.join("ssh_host_ed25519_key.pub"))
    }

    /// Stops sshd (and any session still running below it); reports what survived.
    pub fn stop(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        // Sessions first found, then the listener stopped, then the sessions: a session's
        // processes are re-parented once the listener is gone and could not be found later.
        let below = descendants(self.pid);
        if sys::signal_verified(self.pid, &self.marker, libc::SIGTERM)
            && !sys::wait_gone(&[self.pid], Duration::from_secs(5)).is_empty()
        {
            sys::signal_verified(self.pid, &self.marker, libc::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            // Reaps it (or kills a process that never got as far as its marker).
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &below {
            sys::signal(*p, libc::SIGKILL);
        }
        let stuck = sys::wait_gone(&below, Duration::from_secs(5));
        if !stuck.is_empty() {
            bail!("sshd session processes survived SIGKILL: {stuck:?}");
        }
        let _ = fs::remove_file(self.dir.join("sshd.pid"));
        Ok(())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("pilot-harness: sshd clean-up: {e:#}");
        }
    }
}

impl std::fmt::Debug for Sshd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sshd")
            .field("pid", &self.pid)
            .field("addr", &self.addr)
            .field("dir", &self.dir)
            .finish()
    }
}

fn render_config(dir: &Path, addr: Ipv4Addr, opts: &SshdOptions) -> Result<String> {
    let d = |p: &str| dir.join(p).display().to_string();
    let mut text = format!(
        "# sshd for a pilot-harness simulated VM (written by tests/harness/src/sshd.rs).\n\
         ListenAddress {addr}:{SSH_PORT}\n\
         HostKey {host_key}\n\
         PidFile {pid}\n\
         AuthorizedKeysFile {authorized}\n\
         AuthenticationMethods publickey\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         AllowUsers root\n\
         UsePAM no\n\
         StrictModes yes\n\
         PermitUserEnvironment no\n\
         UseDNS no\n\
         X11Forwarding no\n\
         AllowTcpForwarding no\n\
         AllowAgentForwarding no\n\
         PermitTunnel no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         LogLevel VERBOSE\n\
         # Tests open many sessions in a row: no random early drops.\n\
         MaxStartups 100\n",
        host_key = d("ssh_host_ed25519_key"),
        pid = d("sshd.pid"),
        authorized = d("authorized_keys"),
    );
    if !opts.env.is_empty() {
        let mut line = String::from("SetEnv");
        for (k, v) in &opts.env {
            if k.is_empty()
                || k.contains(['=', ' ', '\t', '"', '\''])
                || v.contains([' ', '\t', '"', '\'', '\n'])
            {
                bail!("sshd SetEnv cannot carry {k:?}={v:?} (no whitespace or quotes)");
            }
            line.push_str(&format!(" {k}={v}"));
        }
        text.push_str(&line);
        text.push('\n');
    }
    Ok(text)
}

/// Creates `/run/sshd` (root, 0755) when missing: sshd refuses to start without it.
fn ensure_privsep_dir() -> Result<()> {
    let p = Path::new(PRIVSEP_DIR);
    if p.is_dir() {
        return Ok(());
    }
    match fs::create_dir(p) {
        Ok(()) => {
            eprintln!(
                "pilot-harness: created sshd's privilege separation directory {PRIVSEP_DIR} \
                 (it was missing; no systemd to make it here)"
            );
        }
        // Another test made it at the same time.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {PRIVSEP_DIR}")),
    }
    fs::set_permissions(p, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {PRIVSEP_DIR}"))
}

/// `ssh-keygen -t ed25519` without a passphrase into `path` (and `path.pub`).
fn keygen(path: &Path, comment: &str) -> Result<()> {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    sys::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path)
            .stdin(Stdio::null()),
    )
    .map(|_| ())
}

fn read_pub(path: &Path) -> Result<String> {
    Ok(fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_string())
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    // `mode` applies only to a new file.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Appends a line to the VM's record (`VM_DIR/record`, format in `names::Record`), so that
/// `scripts/harness-clean` stops sshd after a crashed test.
fn append_record(vm_dir: &Path, line: &str) -> Result<()> {
    let path = vm_dir.join("record");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

/// Every process below `pid` (children, their children, ...), from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = sys::all_pids()
        .into_iter()
        .filter_map(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // After the command name (in parentheses): state, then the parent's PID.
            let rest = &stat[stat.rfind(')')? + 1..];
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for (p, pp) in &parents {
            if *pp == parent && !found.contains(p) {
                found.push(*p);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}
