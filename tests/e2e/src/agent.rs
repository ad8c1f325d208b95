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
        // PILOT_AGENT_BIN runs the suites (and benchmarks) against another build of the agent,
        // e.g. the `dist` profile that is packaged and shipped.
        let bin = match std::env::var_os("PILOT_AGENT_BIN") {
            Some(p) => PathBuf::from(p),
            None => target_bin("pilot-agent")?,
        };
        let state_dir = vm.dir().join("agent-state");
        let config = vm.dir().join("agent.yaml");
        let d = |p: &Path| yaml_str(&p.display().to_string());
        let text = format!(
            "# pilot-agent configuration for simulated VM {name} (written by pilot-e2e).\n\
             state_dir: {state}\n\
             # A host outside any cloud: no metadata service to ask (the identity suites\n\
             # serve one and set the provider themselves).\n\
             cloud:\n\
             \x20 provider: none\n\
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
    /// The agent binary (for a command line [`Agent::cmd`] cannot build, e.g. one that must
    /// use the default configuration path).
    pub fn bin(&self) -> &Path {
        &self.bin
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

// ---------------------------------------------------------------------------------------------
// `pilot-agent run` as a child, its endpoint's token, and an HTTPS client for the endpoint

/// The endpoint's default port (`endpoint.listen`).
pub const ENDPOINT_PORT: u16 = 8443;

impl Agent {
    /// Rewrites the configuration file through `edit` (e.g. to replace the service manager's
    /// restart command); takes effect at the agent's next start.
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) -> Result<()> {
        let text = fs::read_to_string(&self.config)
            .with_context(|| format!("cannot read {}", self.config.display()))?;
        fs::write(&self.config, edit(text))
            .with_context(|| format!("cannot write {}", self.config.display()))
    }

    /// The agent's CA certificate (what clients of the endpoint verify against).
    pub fn ca_cert(&self) -> PathBuf {
        self.pki_dir().join("ca").join("ca.pem")
    }

    /// Reads `status.json` as JSON.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let p = self.status_path();
        let text =
            fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON: {text}", p.display()))
    }

    /// Starts `pilot-agent --config CONFIG run` inside the VM; its stdout and stderr (the log)
    /// go to `log`, so tests can grep the whole log for secrets afterwards.
    pub fn spawn_run(&self, vm: &Vm, log: &Path) -> Result<RunningAgent> {
        self.spawn_run_args(vm, &["run"], log)
    }

    /// Like [`Agent::spawn_run`] with other arguments (e.g. `up`, to watch it from outside).
    pub fn spawn_run_args(&self, vm: &Vm, args: &[&str], log: &Path) -> Result<RunningAgent> {
        let out =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = self
            .cmd(vm, args)
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start pilot-agent {}", args.join(" ")))?;
        Ok(RunningAgent {
            pid: child.id(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }
}

/// A `pilot-agent run` (or other long) child (nsenter execs the agent, so its PID is the
/// agent's). Dropping it kills it by that PID.
pub struct RunningAgent {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl RunningAgent {
    pub fn pid(&self) -> u32 {
        self.pid
    }
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    /// Everything the agent logged so far.
    pub fn log(&self) -> Result<String> {
        Ok(String::from_utf8_lossy(
            &fs::read(&self.log).with_context(|| format!("cannot read {}", self.log.display()))?,
        )
        .into_owned())
    }
    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log().unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `Some(status)` once the agent has exited.
    pub fn try_exit(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("pilot-agent run (pid {}) was already reaped", self.pid),
        }
    }

    /// Fails with the log's tail when the agent has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(st) = self.try_exit()? {
            bail!(
                "pilot-agent run (pid {}) exited {st}:\n{}",
                self.pid,
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; then SIGKILL and an error.
    pub fn terminate(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        signal(self.pid, "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "pilot-agent run (pid {}) did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.pid,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Agent {
    /// Polls the agent's status.json until `want` holds (returning it), failing early when
    /// `run` exits and after `timeout` naming `what`.
    pub fn wait_status(
        &self,
        run: &mut RunningAgent,
        timeout: Duration,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        crate::poll(timeout, what, || {
            if let Ok(Some(st)) = run.try_exit() {
                return Err(format!("run exited ({st}): {}", run.log_tail(30)));
            }
            let v = self.status_json().map_err(|e| format!("{e:#}"))?;
            if want(&v) {
                Ok(Some(v))
            } else {
                Err(v.to_string())
            }
        })
    }

    /// [`Agent::wait_status`] until `run`'s first pass is done and healthy.
    pub fn wait_first_pass(
        &self,
        run: &mut RunningAgent,
        timeout: Duration,
        what: &str,
    ) -> Result<serde_json::Value> {
        self.wait_status(run, timeout, what, |v| {
            v["status"] == "done"
                && v["condition"] == "healthy"
                && v["run"]["passes"].as_u64().is_some_and(|p| p >= 1)
        })
    }
}

/// Sends signal `sig` (a name: `TERM`) to `pid` with kill(1): this crate has no libc binding.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A bearer token for the endpoint and the file with its SHA-256 that the configuration names.
#[derive(Clone)]
pub struct EndpointToken {
    pub token: String,
    pub sha256_file: PathBuf,
}

impl std::fmt::Debug for EndpointToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointToken")
            .field("sha256_file", &self.sha256_file)
            .finish_non_exhaustive()
    }
}

impl EndpointToken {
    /// A random token (32 bytes from /dev/urandom, hex) and `VM_DIR/endpoint-token.sha256`.
    pub fn generate(vm: &Vm) -> Result<EndpointToken> {
        let mut raw = [0u8; 32];
        fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let sha256_file = vm.dir().join("endpoint-token.sha256");
        fs::write(&sha256_file, format!("{}\n", sha256_hex(token.as_bytes())?))?;
        Ok(EndpointToken { token, sha256_file })
    }
}

/// SHA-256 of `data` as 64 lowercase hex digits (sha256sum, from coreutils).
pub fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run sha256sum")?;
    child
        .stdin
        .take()
        .context("no stdin pipe")?
        .write_all(data)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    ensure!(
        out.status.success() && hex.len() == 64,
        "sha256sum failed: {text}"
    );
    Ok(hex)
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub code: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("HTTP {} body is not JSON: {:?}", self.code, self.body))
    }
}

/// An HTTPS client (rustls, no client certificate) that verifies the server against the CA
/// certificates in a PEM file, at the IP address it connects to: no skip-verify.
pub struct HttpsClient {
    config: Arc<rustls::ClientConfig>,
}

impl HttpsClient {
    pub fn new(ca: &Path) -> Result<HttpsClient> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| anyhow!("cannot read PEM {}: {e:?}", ca.display()))?;
        for c in certs {
            roots.add(c.map_err(|e| anyhow!("cannot read PEM {}: {e:?}", ca.display()))?)?;
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(HttpsClient {
            config: Arc::new(config),
        })
    }

    /// `GET path` with `Authorization: Bearer TOKEN` when `bearer` is given (`raw_auth` sets the
    /// header's whole value instead). One connection per request (`Connection: close`). Call it
    /// from a thread in the right network namespace.
    pub fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        auth: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let conn =
            rustls::ClientConnection::new(Arc::clone(&self.config), ServerName::from(addr.ip()))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(a) = auth {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes())
            .with_context(|| format!("TLS to {addr}"))?;
        let mut buf = Vec::new();
        match tls.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
            Err(e) => return Err(anyhow!(e).context(format!("reading from {addr}"))),
        }
        parse_http(&buf)
    }

    /// Like [`HttpsClient::get`] with `Authorization: Bearer TOKEN`.
    pub fn get_bearer(
        &self,
        addr: SocketAddr,
        path: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<HttpResponse> {
        self.get(addr, path, Some(&format!("Bearer {token}")), timeout)
    }
}

/// Parses an HTTP/1.x response (Content-Length, chunked or read-to-close bodies).
fn parse_http(buf: &[u8]) -> Result<HttpResponse> {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("not an HTTP answer: {:?}", String::from_utf8_lossy(buf)))?;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut raw_body = &buf[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        while let Some(eol) = raw_body.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&raw_body[..eol]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size {size_text:?}"))?;
            raw_body = &raw_body[eol + 2..];
            if size == 0 || raw_body.len() < size {
                break;
            }
            out.extend_from_slice(&raw_body[..size]);
            raw_body = raw_body.get(size + 2..).unwrap_or_default();
        }
        out
    } else {
        let len = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        match len {
            Some(n) => raw_body[..n.min(raw_body.len())].to_vec(),
            None => raw_body.to_vec(),
        }
    };
    Ok(HttpResponse {
        code,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The `endpoint:` rate limit of [`service_sections`].
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub failures: u32,
    pub window_secs: u64,
}

/// The `waypoint:` section: the server from `server_image` and `runners` runners from
/// `runner_image`, loaded from the tarballs baked in `images_dir`, 30 s to become ready.
pub fn waypoint_section(
    server_image: &str,
    runner_image: &str,
    images_dir: &Path,
    runners: u32,
) -> String {
    format!(
        "waypoint:\n\
         \x20 server_image: {server}\n\
         \x20 runner_image: {runner}\n\
         \x20 images_dir: {images}\n\
         \x20 runners: {runners}\n\
         \x20 ready_timeout_secs: 30\n",
        server = yaml_str(server_image),
        runner = yaml_str(runner_image),
        images = yaml_str(&images_dir.display().to_string()),
    )
}

/// The `database:` section: PostgreSQL `pg`, its superuser's password in
/// `admin_password_file`, no TLS, a 2 s connect time-out.
pub fn database_section(pg: &pilot_harness::Postgres, admin_password_file: &Path) -> String {
    format!(
        "database:\n\
         \x20 host: {host}\n\
         \x20 port: {port}\n\
         \x20 admin_user: {user}\n\
         \x20 admin_password_file: {pw}\n\
         \x20 tls: disable\n\
         \x20 connect_timeout_secs: 2\n",
        host = pg.addr(),
        port = pg.port(),
        user = yaml_str(pg.superuser()),
        pw = yaml_str(&admin_password_file.display().to_string()),
    )
}

/// Configuration sections for `pilot-agent run` on a full Pilot host: `waypoint:` (server and
/// one runner from `image`, baked in `images`), `database:` on `pg` (admin password in
/// `admin_password_file`), `endpoint:` on [`ENDPOINT_PORT`] accepting `token`, and `service:`
/// (a 300 s periodic pass, database retries capped at 10 s). Append to [`Agent::with_sections`].
pub fn run_sections(
    image: &str,
    images: &Path,
    pg: &pilot_harness::Postgres,
    admin_password_file: &Path,
    token: &EndpointToken,
    rate_limit: RateLimit,
) -> String {
    waypoint_section(image, image, images, 1)
        + &database_section(pg, admin_password_file)
        + &format!(
            "endpoint:\n\
             \x20 listen: 0.0.0.0:{ENDPOINT_PORT}\n\
             \x20 token_sha256_file: {hash}\n\
             \x20 rate_limit: {{ failures: {failures}, window_secs: {window} }}\n\
             service:\n\
             \x20 interval_secs: 300\n\
             \x20 database_retry_max_secs: 10\n",
            hash = yaml_str(&token.sha256_file.display().to_string()),
            failures = rate_limit.failures,
            window = rate_limit.window_secs,
        )
}
