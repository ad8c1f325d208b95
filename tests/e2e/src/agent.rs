//! Driving `pilot-agent` inside a simulated VM, shared by the converge suite
//! (tests/converge.rs) and `bench-converge`: the configuration that points the agent at the
//! VM's own dockerd, state directory and service script; running it in the VM's namespaces;
//! the operator's docker CLI over mutual TLS from the outside namespace; an in-process
//! mutual-TLS probe of dockerd's `/version`; an `nft monitor` that sees every nftables
//! transaction in the VM; and file snapshots to prove that a run rewrote nothing.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use pilot_harness::{Vm, target_bin};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The plain Docker API port the agent's firewall locks.
pub const PLAIN_PORT: u16 = 2375;
/// dockerd's mutual-TLS port (`docker.tls_listen`).
pub const TLS_PORT: u16 = 2376;
/// The agent's nftables table (the default `firewall.table`).
pub const AGENT_TABLE: &str = "pilot_agent";

/// The agent as configured for one VM: `VM_DIR/agent.yaml`, state in `VM_DIR/agent-state`
/// (both removed with the VM).
#[derive(Debug, Clone)]
pub struct Agent {
    bin: PathBuf,
    config: PathBuf,
    state_dir: PathBuf,
}

/// A string as a YAML scalar (JSON strings are YAML).
fn yaml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl Agent {
    /// Writes the configuration for `vm`: the VM's dockerd socket, `daemon.json` and
    /// `dockerd-ctl restart` as the service manager; 2376 open (with a certificate) to the
    /// outside namespace's address only. No `waypoint:` or `database:` section: `up` runs the
    /// converge core (firewall, PKI, Docker mutual TLS) and nothing else.
    pub fn new(vm: &Vm) -> Result<Agent> {
        Agent::with_sections(vm, "")
    }

    /// Like [`Agent::new`], with more top-level YAML (e.g. `waypoint:` and `database:`
    /// sections) appended to the configuration.
    pub fn with_sections(vm: &Vm, sections: &str) -> Result<Agent> {
        let bin = target_bin("pilot-agent")?;
        let state_dir = vm.dir().join("agent-state");
        let config = vm.dir().join("agent.yaml");
        let d = |p: &Path| yaml_str(&p.display().to_string());
        let text = format!(
            "# pilot-agent configuration for simulated VM {name} (written by pilot-e2e).\n\
             state_dir: {state}\n\
             docker:\n\
             \x20 socket: {sock}\n\
             \x20 daemon_config: {daemon}\n\
             \x20 systemd_dropin_dir: {dropin}\n\
             \x20 tls_listen: 0.0.0.0:{TLS_PORT}\n\
             \x20 service:\n\
             \x20   manager: command\n\
             \x20   restart_command: [{ctl}, restart]\n\
             \x20 ready_timeout_secs: 30\n\
             firewall:\n\
             \x20 table: {AGENT_TABLE}\n\
             \x20 lock_ports: [{PLAIN_PORT}]\n\
             \x20 docker_api_sources: [{outside}/32]\n",
            name = vm.name(),
            state = d(&state_dir),
            sock = d(&vm.docker_socket()),
            daemon = d(&vm.daemon_json()),
            dropin = d(&vm.dir().join("systemd-dropin")),
            ctl = d(&vm.dockerd_ctl()),
            outside = vm.outside_addr(),
        );
        let text = text + sections;
        fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
        Ok(Agent {
            bin,
            config,
            state_dir,
        })
    }

    /// The same agent run with another configuration file (e.g. a broken one).
    pub fn with_config(&self, config: &Path) -> Agent {
        Agent {
            config: config.to_path_buf(),
            ..self.clone()
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    pub fn status_path(&self) -> PathBuf {
        self.state_dir.join("status.json")
    }
    pub fn pki_dir(&self) -> PathBuf {
        self.state_dir.join("pki")
    }
    /// The operator's client directory (docker CLI layout: ca.pem, cert.pem, key.pem).
    pub fn operator_dir(&self) -> PathBuf {
        self.pki_dir().join("operator")
    }

    /// `pilot-agent --config CONFIG ARGS...` inside the VM (its network and UTS namespaces).
    /// nsenter execs the agent, so the child's PID is the agent's (SIGKILL reaches it).
    pub fn cmd<I, S>(&self, vm: &Vm, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = vm.cmd(&self.bin);
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("PILOT_AGENT_CONFIG")
            .env("PILOT_AGENT_LOG", "info")
            .stdin(Stdio::null());
        c
    }

    /// Runs the agent with `args` to completion; returns its output and wall time.
    pub fn run<I, S>(&self, vm: &Vm, args: I) -> Result<(Output, Duration)>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let t0 = Instant::now();
        let out = self
            .cmd(vm, args)
            .output()
            .context("cannot run pilot-agent")?;
        Ok((out, t0.elapsed()))
    }

    /// `pilot-agent up`, which must exit 0; returns its wall time.
    pub fn up_ok(&self, vm: &Vm) -> Result<Duration> {
        let (out, took) = self.run(vm, ["up"])?;
        ensure!(
            out.status.success(),
            "pilot-agent up exited {} after {took:?}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(took)
    }

    /// The docker CLI in the outside namespace with the operator's certificate, verifying
    /// dockerd against the agent's CA at the VM's veth address (no skip-verify).
    pub fn operator_docker<I, S>(&self, vm: &Vm, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let op = self.operator_dir();
        self.docker_with(vm, &op.join("ca.pem"), &op, args)
    }

    /// Like [`Agent::operator_docker`] but trusting `ca` instead of the agent's CA.
    pub fn docker_with<I, S>(&self, vm: &Vm, ca: &Path, client_dir: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = vm.outside_cmd("docker");
        c.arg("--tlsverify")
            .arg("--tlscacert")
            .arg(ca)
            .arg("--tlscert")
            .arg(client_dir.join("cert.pem"))
            .arg("--tlskey")
            .arg(client_dir.join("key.pem"))
            .arg("-H")
            .arg(format!("tcp://{}:{TLS_PORT}", vm.addr()))
            .args(args)
            .env("DOCKER_CONFIG", vm.dir().join("docker-cli-operator"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH")
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::null());
        c
    }

    /// `docker version` as the operator; returns "SERVER_VERSION API_VERSION".
    pub fn operator_docker_version(&self, vm: &Vm) -> Result<String> {
        let out = self
            .operator_docker(
                vm,
                [
                    "version",
                    "--format",
                    "{{.Server.Version}} {{.Server.APIVersion}}",
                ],
            )
            .output()
            .context("cannot run docker")?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(
            out.status.success() && !text.is_empty(),
            "operator `docker version` over mutual TLS failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(text)
    }
}

/// dockerd's PID from the VM's pidfile, if that process runs.
pub fn dockerd_pid(vm: &Vm) -> Result<u32> {
    let p = vm.dir().join("dockerd.pid");
    let text = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let pid: u32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} holds {text:?}", p.display()))?;
    ensure!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "dockerd (pid {pid}) is not running"
    );
    Ok(pid)
}

/// Runs `nft ARGS` inside the VM; returns stdout (fails on a non-zero exit).
pub fn nft(vm: &Vm, args: &[&str]) -> Result<String> {
    let out = vm
        .cmd("nft")
        .args(args)
        .output()
        .context("cannot run nft")?;
    ensure!(
        out.status.success(),
        "nft {} failed in VM {}: {}",
        args.join(" "),
        vm.name(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feeds `script` to `nft -f -` inside the VM; returns the nft process's PID.
pub fn nft_script(vm: &Vm, script: &str) -> Result<u32> {
    let mut child = vm
        .cmd("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft -f -")?;
    let pid = child.id();
    child
        .stdin
        .take()
        .context("no stdin pipe")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft -f - failed in VM {} ({}): {}\nscript:\n{script}",
        vm.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(pid)
}

// ---------------------------------------------------------------------------------------------
// nft monitor

/// Table the monitor's marks create and delete in one transaction.
const MARK_TABLE: &str = "e2e_monitor_mark";

/// `nft monitor` inside a VM, every line timestamped when read. nft prints each
/// transaction's events followed by `# new generation N by process PID (nft)`, so the lines
/// between two [`Mark`]s are exactly the transactions committed between them.
pub struct NftMonitor {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: Option<JoinHandle<()>>,
}

/// A transaction of our own in the monitor's stream: lines `start..end` are its events and
/// its generation line.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    pub start: usize,
    pub end: usize,
    /// When its generation line was read.
    pub at: Instant,
}

impl NftMonitor {
    /// Starts the monitor and returns once it is seen to report transactions (a first mark).
    pub fn start(vm: &Vm) -> Result<(NftMonitor, Mark)> {
        let mut child = vm
            .cmd("nft")
            .arg("monitor")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nft monitor")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut v) = sink.lock() {
                    v.push((Instant::now(), line));
                }
            }
        });
        let monitor = NftMonitor {
            child,
            lines,
            reader: Some(reader),
        };
        // Until nft has subscribed, marks go unseen; retry until one shows.
        let mark = monitor.mark_within(vm, Duration::from_secs(10))?;
        Ok((monitor, mark))
    }

    /// Commits a mark transaction and waits until the monitor reports it.
    pub fn mark(&self, vm: &Vm) -> Result<Mark> {
        self.mark_within(vm, Duration::from_secs(5))
    }

    fn mark_within(&self, vm: &Vm, timeout: Duration) -> Result<Mark> {
        let deadline = Instant::now() + timeout;
        loop {
            let pid = nft_script(
                vm,
                &format!("add table inet {MARK_TABLE}\ndelete table inet {MARK_TABLE}\n"),
            )?;
            let needle = format!(" by process {pid} ");
            let attempt_end = (Instant::now() + Duration::from_millis(500)).min(deadline);
            loop {
                {
                    let lines = self.lock()?;
                    if let Some(end) = lines.iter().rposition(|(_, l)| {
                        l.starts_with("# new generation") && l.contains(&needle)
                    }) {
                        ensure!(
                            end >= 2
                                && lines[end - 2].1 == format!("add table inet {MARK_TABLE}")
                                && lines[end - 1].1 == format!("delete table inet {MARK_TABLE}"),
                            "nft monitor reported the mark transaction unexpectedly: {:?}",
                            &lines[end.saturating_sub(2)..=end]
                        );
                        return Ok(Mark {
                            start: end - 2,
                            end: end + 1,
                            at: lines[end].0,
                        });
                    }
                }
                if Instant::now() >= attempt_end {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if Instant::now() >= deadline {
                bail!(
                    "nft monitor in VM {} did not report a transaction within {timeout:?}",
                    vm.name()
                );
            }
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<(Instant, String)>>> {
        self.lines
            .lock()
            .map_err(|_| anyhow!("monitor line buffer poisoned"))
    }

    /// What the monitor printed between two marks (other processes' transactions).
    pub fn between(&self, a: &Mark, b: &Mark) -> Result<Vec<(Instant, String)>> {
        let lines = self.lock()?;
        Ok(lines[a.end..b.start].to_vec())
    }
}

impl Drop for NftMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mutual-TLS probe

/// An in-process client of dockerd's TLS API (rustls): the server verified against `ca` at
/// the IP address connected to, the client certificate presented.
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    pub fn new(ca: &Path, cert: &Path, key: &Path) -> Result<TlsClient> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let pem_err = |p: &Path| {
            let p = p.display().to_string();
            move |e: rustls::pki_types::pem::Error| anyhow!("cannot read PEM {p}: {e:?}")
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(pem_err(ca))? {
            roots.add(c.map_err(pem_err(ca))?)?;
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(pem_err(cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err(cert))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(TlsClient {
            config: Arc::new(config),
        })
    }

    /// `GET path` over mutual TLS; returns the HTTP status code and body. Call it from a
    /// thread in the right network namespace.
    pub fn get(&self, addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let conn =
            rustls::ClientConnection::new(Arc::clone(&self.config), ServerName::from(addr.ip()))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut buf = Vec::new();
        match tls.read_to_end(&mut buf) {
            Ok(_) => {}
            // A peer that closes without close_notify: what arrived is still the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
            Err(e) => return Err(e.into()),
        }
        let text = String::from_utf8_lossy(&buf);
        let code = text
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| text.strip_prefix("HTTP/1.0 "))
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP answer: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }
}

// ---------------------------------------------------------------------------------------------
// File snapshots

/// What a file is, for "did anything rewrite it": content, mtime, inode (a rename changes
/// it), mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub content: Vec<u8>,
    pub mtime_ns: i128,
    pub ino: u64,
    pub mode: u32,
}

/// Every regular file under `root` (recursively) and the `extra` files, keyed by path.
pub fn snapshot(root: &Path, extra: &[PathBuf]) -> Result<BTreeMap<PathBuf, FileState>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = extra.to_vec();
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                dirs.push(e.path());
            } else if t.is_file() {
                files.push(e.path());
            }
        }
    }
    for f in files {
        let meta = fs::metadata(&f).with_context(|| format!("cannot stat {}", f.display()))?;
        let content = fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
        out.insert(
            f,
            FileState {
                content,
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                ino: meta.ino(),
                mode: meta.mode(),
            },
        );
    }
    Ok(out)
}

/// Human-readable differences between two snapshots (empty when identical).
pub fn snapshot_diff(
    before: &BTreeMap<PathBuf, FileState>,
    after: &BTreeMap<PathBuf, FileState>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (p, a) in before {
        match after.get(p) {
            None => diffs.push(format!("{} disappeared", p.display())),
            Some(b) if a != b => {
                let mut what = Vec::new();
                if a.content != b.content {
                    what.push("content");
                }
                if a.mtime_ns != b.mtime_ns {
                    what.push("mtime");
                }
                if a.ino != b.ino {
                    what.push("inode (replaced)");
                }
                if a.mode != b.mode {
                    what.push("mode");
                }
                diffs.push(format!("{} changed: {}", p.display(), what.join(", ")));
            }
            Some(_) => {}
        }
    }
    for p in after.keys() {
        if !before.contains_key(p) {
            diffs.push(format!("{} appeared", p.display()));
        }
    }
    diffs
}
