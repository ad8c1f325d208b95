//! Google Cloud for tests: the Cloud Storage emulator (`gcp-storage-emulator`, from PyPI, in the
//! venv that `scripts/setup.sh` makes; in memory) and the Compute Engine STAND-IN
//! (tests/gcp-compute-standin/standin.py, Flask in the same venv), each on 127.0.0.1 and a free
//! port. Both are stopped by PID when [`Gcp`] is dropped. The stand-in requires the bearer
//! token given to [`Gcp::start`] (passed in its environment, never on its command line).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::moto::{http, sweep};
use crate::names::{self, OWNER_ENV, Record};
use crate::sys;

/// The emulator's entry point installed by `scripts/setup.sh`.
pub const STORAGE_EMULATOR: &str = "/opt/pilot-agent/venv/bin/gcp-storage-emulator";
/// The venv's Python (Flask), which runs the stand-in.
pub const VENV_PYTHON: &str = "/opt/pilot-agent/venv/bin/python";
/// The Compute Engine stand-in.
pub const COMPUTE_STANDIN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../gcp-compute-standin/standin.py"
);

/// A running emulator and stand-in; dropping it stops both.
pub struct Gcp {
    name: String,
    dir: PathBuf,
    storage_port: u16,
    compute_port: u16,
    bucket: String,
    children: Vec<Child>,
    start_duration: Duration,
    torn_down: bool,
}

impl Gcp {
    /// Starts both, with `bucket` made in the emulator and `token` the one bearer token the
    /// stand-in accepts; returns once both answer HTTP.
    pub fn start(bucket: &str, token: &str) -> Result<Gcp> {
        for p in [STORAGE_EMULATOR, VENV_PYTHON] {
            if !Path::new(p).exists() {
                bail!("{p} is missing: run scripts/setup.sh (it installs gcp-storage-emulator)");
            }
        }
        let t0 = Instant::now();
        let storage_port = crate::free_loopback_port()?;
        let compute_port = crate::free_loopback_port()?;
        let name = format!("pvm{storage_port}");
        let dir = names::claim_dir(&name)?;
        let mut gcp = Gcp {
            name,
            dir,
            storage_port,
            compute_port,
            bucket: bucket.to_owned(),
            children: Vec::new(),
            start_duration: Duration::ZERO,
            torn_down: false,
        };
        gcp.launch(token)
            .context("cannot start the Cloud Storage emulator and the Compute stand-in")?;
        gcp.start_duration = t0.elapsed();
        Ok(gcp)
    }

    fn launch(&mut self, token: &str) -> Result<()> {
        let record = Record::create(&self.dir)?;
        let storage_log = self.dir.join("storage.log");
        let sport = self.storage_port.to_string();
        let child = Command::new(STORAGE_EMULATOR)
            .args(["start", "--host", "127.0.0.1", "--port", &sport])
            .args(["--default-bucket", &self.bucket, "--in-memory"])
            .env(OWNER_ENV, &self.name)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&storage_log)?)
            .stderr(fs::File::create(self.dir.join("storage.err"))?)
            .spawn()
            .with_context(|| format!("cannot run {STORAGE_EMULATOR}"))?;
        record.add(&format!(
            "pid {} gcp-storage-emulator start --port {sport}",
            child.id()
        ))?;
        self.children.push(child);

        let compute_log = self.dir.join("compute.log");
        let cport = self.compute_port.to_string();
        let child = Command::new(VENV_PYTHON)
            .arg(COMPUTE_STANDIN)
            .args(["--port", &cport, "--storage", &self.storage_endpoint()])
            .env(OWNER_ENV, &self.name)
            .env("STANDIN_TOKEN", token)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&compute_log)?)
            .stderr(fs::File::create(self.dir.join("compute.err"))?)
            .spawn()
            .with_context(|| format!("cannot run {COMPUTE_STANDIN}"))?;
        record.add(&format!("pid {} standin.py --port {cport}", child.id()))?;
        self.children.push(child);

        let (sp, cp) = (self.storage_port, self.compute_port);
        let dir = self.dir.clone();
        sys::poll(
            Duration::from_secs(30),
            "the emulator and stand-in to answer",
            || {
                for c in self.children.iter_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        bail!(
                            "a GCP test server exited ({st}): {} {}",
                            sys::tail(&dir.join("storage.err"), 20),
                            sys::tail(&dir.join("compute.err"), 20)
                        );
                    }
                }
                // The emulator's health check is `/`; the stand-in answers 401 without a token,
                // which is an answer.
                let up = http(sp, "GET", "/").is_ok_and(|s| s == 200)
                    && http(cp, "GET", "/compute/v1/projects/p/global/images")
                        .is_ok_and(|s| s == 401);
                Ok(up.then_some(()))
            },
        )
    }

    /// `http://127.0.0.1:PORT`: `--storage-endpoint`.
    pub fn storage_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.storage_port)
    }
    /// `http://127.0.0.1:PORT/compute/v1`: `--compute-endpoint`.
    pub fn compute_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/compute/v1", self.compute_port)
    }
    /// The bucket made at start.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }
    /// How long [`Gcp::start`] took.
    pub fn start_duration(&self) -> Duration {
        self.start_duration
    }
    /// The stand-in's and the emulator's logs (for a failing test's message).
    pub fn logs(&self) -> String {
        format!(
            "storage: {}\ncompute: {}",
            sys::tail(&self.dir.join("storage.err"), 30),
            sys::tail(&self.dir.join("compute.err"), 30)
        )
    }

    /// Stops both; reports what could not be removed.
    pub fn cleanup(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let pids: Vec<u32> = self.children.iter().map(Child::id).collect();
        for pid in &pids {
            sys::signal(*pid, libc::SIGTERM);
        }
        let stuck = sys::wait_gone(&pids, Duration::from_secs(5));
        for c in self.children.iter_mut() {
            if stuck.contains(&c.id()) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        self.children.clear();
        sweep("gcp", &self.name, &self.dir)
    }
}

impl Drop for Gcp {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("pilot-harness: {e:#} (scripts/harness-clean removes leftovers)");
        }
    }
}
