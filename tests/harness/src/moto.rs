//! An EC2 API for tests: `moto_server` from the venv that `scripts/setup.sh` makes, on
//! 127.0.0.1 and a free port. Point aws-sdk-ec2 at [`Moto::endpoint`] with dummy credentials.
//! Beware (HARNESS.md): RunInstances with an unknown AMI id succeeds there.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::leftovers;
use crate::names::{self, OWNER_ENV, Record};
use crate::sys;

/// The moto server entry point installed by `scripts/setup.sh`.
pub const MOTO_SERVER: &str = "/opt/pilot-agent/venv/bin/moto_server";
/// The venv's Python (with boto3), for small client scripts in tests.
pub const VENV_PYTHON: &str = "/opt/pilot-agent/venv/bin/python";

/// A running moto server; dropping it stops it.
pub struct Moto {
    name: String,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    start_duration: Duration,
    torn_down: bool,
}

impl Moto {
    /// Starts moto on 127.0.0.1 and a free port; returns once it answers HTTP.
    pub fn start() -> Result<Moto> {
        if !Path::new(MOTO_SERVER).exists() {
            bail!("{MOTO_SERVER} is missing: run scripts/setup.sh (it makes the moto venv)");
        }
        let t0 = Instant::now();
        // A free port: bind port 0, note it, let it go. Another process could take it in
        // between; moto then fails to bind and start() reports it.
        let port = crate::free_loopback_port()?;
        let name = format!("pvm{port}");
        let dir = names::claim_dir(&name)?;
        let mut moto = Moto {
            name,
            dir,
            port,
            child: None,
            start_duration: Duration::ZERO,
            torn_down: false,
        };
        moto.launch()
            .with_context(|| format!("cannot start moto on 127.0.0.1:{port}"))?;
        moto.start_duration = t0.elapsed();
        Ok(moto)
    }

    fn launch(&mut self) -> Result<()> {
        let record = Record::create(&self.dir)?;
        let log_path = self.dir.join("moto.log");
        let log = fs::File::create(&log_path)?;
        let port = self.port.to_string();
        let child = Command::new(MOTO_SERVER)
            .args(["-H", "127.0.0.1", "-p", &port])
            .env(OWNER_ENV, &self.name)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {MOTO_SERVER}"))?;
        record.add(&format!(
            "pid {} moto_server -H 127.0.0.1 -p {port}",
            child.id()
        ))?;
        self.child = Some(child);
        sys::poll(Duration::from_secs(30), "moto to answer HTTP", || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                bail!("moto exited ({st}): {}", sys::tail(&log_path, 20));
            }
            Ok(http(self.port, "GET", "/moto-api/").ok().map(|_| ()))
        })
    }

    /// `http://127.0.0.1:PORT`, the endpoint URL for the AWS SDK.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    /// The port moto listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The harness name (`pvm<PORT>`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// How long [`Moto::start`] took.
    pub fn start_duration(&self) -> Duration {
        self.start_duration
    }

    /// Forgets every resource (instances, images, tags): `POST /moto-api/reset`.
    pub fn reset(&self) -> Result<()> {
        let status = http(self.port, "POST", "/moto-api/reset")?;
        if status != 200 {
            bail!("moto reset answered HTTP {status}");
        }
        Ok(())
    }

    /// Stops moto; reports what could not be removed.
    pub fn cleanup(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            sys::signal(pid, libc::SIGTERM);
            if !sys::wait_gone(&[pid], Duration::from_secs(5)).is_empty() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        sweep("moto", &self.name, &self.dir)
    }
}

/// After the children are gone: SIGKILL to any process still carrying `name` (a server's own
/// children), then the scratch directory removed. Shared with the GCP emulators.
pub(crate) fn sweep(kind: &str, name: &str, dir: &Path) -> Result<()> {
    let rest: Vec<u32> = leftovers::processes(&|c: &str| c == name)
        .iter()
        .map(|p| p.pid)
        .collect();
    for p in &rest {
        sys::signal(*p, libc::SIGKILL);
    }
    let stuck = sys::wait_gone(&rest, Duration::from_secs(5));
    let removed = fs::remove_dir_all(dir);
    if !stuck.is_empty() {
        bail!("{kind} {name}: processes survived SIGKILL: {stuck:?}");
    }
    removed.with_context(|| format!("cannot remove {}", dir.display()))
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("pilot-harness: {e:#} (scripts/harness-clean removes leftovers)");
        }
    }
}

/// A minimal HTTP/1.1 request to 127.0.0.1:port without a body; returns the status code
/// (also the GCP emulators' readiness probe).
pub(crate) fn http(port: u16, method: &str, path: &str) -> Result<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer from 127.0.0.1:{port}: {line:?}"))
}
