//! A PostgreSQL 15 server on a separate simulated host that a [`Vm`] reaches over its own
//! link, so tests can cut the database off and bring it back.
//!
//! ```text
//!   pvN (the VM)                           pvN-db (database host)
//!   pvN-db 10.250.(2N+1).1/24  <--veth-->  pvN-vm 10.250.(2N+1).2/24, postgres on :5432
//! ```
//!
//! The cluster is made with `initdb` as the `postgres` user in `/run/pilot-harness/pvN-db/`
//! (superuser `postgres` with a random password, SCRAM), `pg_hba.conf` accepting password
//! logins from the VM's link and its containers' subnet, and runs inside the database
//! namespace. Durability is switched off: these clusters live for one test.

use std::fs;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::leftovers;
use crate::names::{self, CGROUP_PREFIX, OWNER_ENV, Plan, Record};
use crate::sys;
use crate::vm::Vm;

/// Where Debian's PostgreSQL 15 server binaries are.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running PostgreSQL on its own database host namespace; dropping it stops and removes it.
pub struct Postgres {
    name: String,
    vm_name: String,
    plan: Plan,
    dir: PathBuf,
    port: u16,
    password: String,
    child: Option<Child>,
    start_duration: Duration,
    torn_down: bool,
}

impl Postgres {
    /// Makes the database host for `vm`, initialises a cluster and starts it; returns once
    /// `pg_isready` answers from inside the VM.
    pub fn start(vm: &Vm) -> Result<Postgres> {
        crate::require_root()?;
        let t0 = Instant::now();
        let name = format!("{}-db", vm.name());
        let dir = names::claim_dir(&name)?;
        let mut pg = Postgres {
            name,
            vm_name: vm.name().to_string(),
            plan: vm.plan(),
            dir,
            port: 5432,
            password: random_hex(16)?,
            child: None,
            start_duration: Duration::ZERO,
            torn_down: false,
        };
        // On error `pg` is dropped here, which removes whatever was already made.
        pg.set_up(vm)
            .with_context(|| format!("cannot start PostgreSQL host {}", pg.name))?;
        pg.start_duration = t0.elapsed();
        Ok(pg)
    }

    fn set_up(&mut self, vm: &Vm) -> Result<()> {
        let record = Record::create(&self.dir)?;
        let (db, vmns) = (self.name.clone(), self.vm_name.clone());
        record.add(&format!("netns {db}"))?;
        sys::run_args("ip", &["netns", "add", &db])?;
        sys::run_args("ip", &["-n", &db, "link", "set", "lo", "up"])?;
        let (vm_if, db_if) = (self.vm_link(), format!("{vmns}-vm"));
        sys::run_args(
            "ip",
            &[
                "link", "add", &vm_if, "netns", &vmns, "type", "veth", "peer", "name", &db_if,
                "netns", &db,
            ],
        )?;
        let vm_cidr = format!("{}/24", self.plan.vm_db_side());
        let db_cidr = format!("{}/24", self.plan.db());
        sys::run_args("ip", &["-n", &vmns, "addr", "add", &vm_cidr, "dev", &vm_if])?;
        sys::run_args("ip", &["-n", &vmns, "link", "set", &vm_if, "up"])?;
        sys::run_args("ip", &["-n", &db, "addr", "add", &db_cidr, "dev", &db_if])?;
        sys::run_args("ip", &["-n", &db, "link", "set", &db_if, "up"])?;

        // initdb as postgres: the directory is the cluster's, the password file only its.
        let data = self.data_dir();
        let pwfile = self.dir.join("pwfile");
        fs::write(&pwfile, &self.password)?;
        sys::run(Command::new("install").args([
            "-d",
            "-o",
            "postgres",
            "-g",
            "postgres",
            "-m",
            "0700",
            &data.display().to_string(),
        ]))?;
        sys::run(Command::new("chown").args(["postgres:postgres", &pwfile.display().to_string()]))?;
        fs::set_permissions(&pwfile, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let mut initdb = as_postgres(&format!("{PG_BIN}/initdb"));
        initdb
            .current_dir(&self.dir)
            .args(["-D", &data.display().to_string()])
            .args([
                "-U",
                "postgres",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "--locale=C", "-E", "UTF8"]);
        sys::run(&mut initdb).context("initdb failed")?;
        let _ = fs::remove_file(&pwfile);

        let hba = data.join("pg_hba.conf");
        let mut text = fs::read_to_string(&hba)?;
        text.push_str(&format!(
            "\n# pilot-harness: the VM's link, and its containers (NATed by the VM, listed anyway)\n\
             host all all {} scram-sha-256\nhost all all {} scram-sha-256\n",
            self.plan.db_subnet(),
            self.plan.container_subnet()
        ));
        fs::write(&hba, text)?;

        // Started directly (setpriv execs, nsenter without --fork execs): the child is the
        // postmaster. cluster_name puts the owner's name into every backend's process title.
        let log_path = self.dir.join("postgres.log");
        let log = fs::File::create(&log_path)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{db}"))
            .args([
                "--",
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(format!("{PG_BIN}/postgres"))
            .args(["-D", &data.display().to_string()])
            .args(["-c", &format!("listen_addresses={}", self.plan.db())])
            .args(["-c", &format!("port={}", self.port)])
            .args(["-c", "unix_socket_directories="])
            .args(["-c", &format!("cluster_name={CGROUP_PREFIX}{db}")])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args([
                "-c",
                "full_page_writes=off",
                "-c",
                "dynamic_shared_memory_type=mmap",
            ])
            .current_dir(&self.dir)
            .env(OWNER_ENV, &db)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("cannot start postgres")?;
        record.add(&format!("pid {} {}", child.id(), data.display()))?;
        self.child = Some(child);

        sys::poll(
            Duration::from_secs(30),
            "postgres to accept connections",
            || {
                if let Some(c) = self.child.as_mut()
                    && let Ok(Some(st)) = c.try_wait()
                {
                    bail!("postgres exited ({st}): {}", sys::tail(&log_path, 20));
                }
                let ok = vm
                    .cmd("pg_isready")
                    .args(["-q", "-t", "1", "-h", &self.addr().to_string()])
                    .args(["-p", &self.port.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                Ok(ok.then_some(()))
            },
        )
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    /// The database host's address (reachable from the VM).
    pub fn addr(&self) -> Ipv4Addr {
        self.plan.db()
    }
    /// The port postgres listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The superuser's name.
    pub fn superuser(&self) -> &str {
        "postgres"
    }
    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }
    /// The harness name of the database host (`pvN-db`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// A libpq URL for the superuser.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{}@{}:{}/postgres",
            self.password,
            self.addr(),
            self.port
        )
    }
    /// How long [`Postgres::start`] took.
    pub fn start_duration(&self) -> Duration {
        self.start_duration
    }
    /// The VM-side name of the VM<->db link.
    fn vm_link(&self) -> String {
        format!("{}-db", self.vm_name)
    }

    /// Runs SQL as the superuser with `psql` from inside the VM's network namespace; returns
    /// unaligned, tuples-only output. Gives up after a 3 s connect timeout (10 s in all), so a
    /// test against a cut link fails fast.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.vm_name))
            .args([
                "--",
                "timeout",
                "10",
                "psql",
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-h", &self.addr().to_string(), "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "3")
            .env(OWNER_ENV, &self.vm_name)
            .output()
            .context("cannot run psql")?;
        if !out.status.success() {
            bail!(
                "psql against {}:{} failed ({}): {}",
                self.addr(),
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Makes the database unreachable from the VM: the VM's end of the link goes down, so its
    /// packets to the database follow the default route into the outside namespace, which
    /// drops them (no forwarding): clients wait for their connect timeout, as in a real outage.
    pub fn cut_link(&self) -> Result<()> {
        sys::run_args(
            "ip",
            &["-n", &self.vm_name, "link", "set", &self.vm_link(), "down"],
        )
        .map(|_| ())
    }

    /// Brings the link back (and its route, which the kernel dropped with the link).
    pub fn restore_link(&self) -> Result<()> {
        let link = self.vm_link();
        sys::run_args("ip", &["-n", &self.vm_name, "link", "set", &link, "up"])?;
        let src = self.plan.vm_db_side().to_string();
        sys::run_args(
            "ip",
            &[
                "-n",
                &self.vm_name,
                "route",
                "replace",
                &self.plan.db_subnet(),
                "dev",
                &link,
                "proto",
                "kernel",
                "scope",
                "link",
                "src",
                &src,
            ],
        )
        .map(|_| ())
    }

    /// Stops the server and removes its host; reports what could not be removed.
    pub fn cleanup(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        let name = self.name.clone();
        let mine = |c: &str| c == name;
        // SIGINT is PostgreSQL's fast shutdown: backends end, shared memory is released.
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            sys::signal(pid, libc::SIGINT);
            if !sys::wait_gone(&[pid], Duration::from_secs(5)).is_empty() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let rest: Vec<u32> = leftovers::processes(&mine).iter().map(|p| p.pid).collect();
        for p in &rest {
            sys::signal(*p, libc::SIGKILL);
        }
        let stuck = sys::wait_gone(&rest, Duration::from_secs(10));
        if !stuck.is_empty() {
            errors.push(format!("processes survived SIGKILL: {stuck:?}"));
        }
        // Deleting the namespace destroys the veth pair, the VM's end included.
        if sys::netns_inode(&name).is_some()
            && let Err(e) = sys::run_args("ip", &["netns", "del", &name])
        {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = sys::unmount_all_under(&self.dir) {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            errors.push(format!("cannot remove {}: {e}", self.dir.display()));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "cleanup of PostgreSQL host {name} incomplete: {}",
                errors.join("; ")
            )
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("pilot-harness: {e:#} (scripts/harness-clean removes leftovers)");
        }
    }
}

/// A command that runs `program` as the postgres user (setpriv execs: no extra process).
fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ])
    .arg(program)
    .env("HOME", "/var/lib/postgresql");
    c
}

/// `bytes` random bytes from the kernel, hex encoded.
pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
