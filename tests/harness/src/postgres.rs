//! A PostgreSQL 15 server for tests, in one of two places:
//!
//! - on a separate simulated host that a [`Vm`] reaches over its own link ([`Postgres::start`]),
//!   so tests can cut the database off and bring it back:
//!
//!   ```text
//!   pvN (the VM)                           pvN-db (database host)
//!   pvN-db 10.250.(2N+1).1/24  <--veth-->  pvN-vm 10.250.(2N+1).2/24, postgres on :5432
//!   ```
//!
//! - on 127.0.0.1 and a free port of the host ([`Postgres::start_loopback`], harness name
//!   `pvp<PORT>`), for tests that talk to it from the test process itself (the agent's
//!   database tests).
//!
//! The cluster is made with `initdb` as the `postgres` user in `/run/pilot-harness/<name>/`
//! (superuser `postgres` with a random password, SCRAM for every TCP login; no Unix socket),
//! `pg_hba.conf` on a database host also accepting the VM's link and its containers' subnet.
//! The server is the harness's child (no `pg_ctl`), carries the owner's name in its
//! environment and process titles, and is in the object's record, so a killed test's cluster is
//! found by `scripts/harness-clean`. Every statement and connection is logged
//! (`log_statement=all`, `log_connections=on`; [`Postgres::log_text`]) so tests can assert on
//! what the server saw: which statements ran, that TLS was used, that no plain-text password
//! reached it. [`PostgresOptions::tls`] switches TLS on. Durability is switched off: these
//! clusters live for one test.

use std::fs;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::leftovers;
use crate::names::{self, CGROUP_PREFIX, OWNER_ENV, Plan, Record};
use crate::sys;
use crate::vm::Vm;

/// Where Debian's PostgreSQL 15 server binaries are.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The superuser initdb makes (its password: [`Postgres::password`]).
pub const SUPERUSER: &str = "postgres";

/// What to switch on besides the defaults.
#[derive(Clone, Default)]
pub struct PostgresOptions {
    /// PEM server certificate chain and private key: the server runs with `ssl=on` (and still
    /// accepts clients without TLS).
    pub tls: Option<(String, String)>,
}

/// Where the server runs.
enum Host {
    /// On database host `<vm>-db`, linked to VM `vm`.
    Db { vm: String, plan: Plan },
    /// On 127.0.0.1, in the host's namespace.
    Loopback,
}

/// A running PostgreSQL; dropping it stops it and removes everything it made.
pub struct Postgres {
    name: String,
    host: Host,
    addr: Ipv4Addr,
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
        Postgres::start_with(vm, &PostgresOptions::default())
    }

    /// [`Postgres::start`] with options.
    pub fn start_with(vm: &Vm, options: &PostgresOptions) -> Result<Postgres> {
        crate::require_root()?;
        let t0 = Instant::now();
        let name = format!("{}-db", vm.name());
        let dir = names::claim_dir(&name)?;
        let plan = vm.plan();
        let host = Host::Db {
            vm: vm.name().to_string(),
            plan,
        };
        let mut pg = Postgres::new(name, host, plan.db(), dir, 5432)?;
        // On error `pg` is dropped here, which removes whatever was already made.
        pg.set_up(options)
            .with_context(|| format!("cannot start PostgreSQL host {}", pg.name))?;
        pg.start_duration = t0.elapsed();
        Ok(pg)
    }

    /// Initialises a cluster and starts it on 127.0.0.1 and a free port; returns once
    /// `pg_isready` answers. Needs root (the cluster runs as the `postgres` user) and
    /// PostgreSQL 15, nothing else of the harness's programs.
    pub fn start_loopback(options: &PostgresOptions) -> Result<Postgres> {
        if sys::euid() != 0 {
            bail!(
                "the PostgreSQL test cluster needs root (it runs initdb and postgres as the \
                 postgres user); running as uid {}",
                sys::euid()
            );
        }
        if !Path::new(PG_BIN).join("postgres").is_file() {
            bail!("{PG_BIN}/postgres is missing: run scripts/setup.sh");
        }
        let t0 = Instant::now();
        // A port found free can be taken before postgres binds it (or its name be a crashed
        // run's leftover): try a few.
        let mut last_error = None;
        for _ in 0..5 {
            let port = crate::free_loopback_port()?;
            let name = format!("pvp{port}");
            let dir = match names::claim_dir(&name) {
                Ok(dir) => dir,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let mut pg = Postgres::new(name, Host::Loopback, Ipv4Addr::LOCALHOST, dir, port)?;
            match pg.set_up(options) {
                Ok(()) => {
                    pg.start_duration = t0.elapsed();
                    return Ok(pg);
                }
                // Dropping `pg` removes this attempt.
                Err(e) if pg.log_text().contains("Address already in use") => {
                    last_error = Some(e);
                }
                Err(e) => {
                    return Err(e.context(format!("cannot start PostgreSQL {}", pg.name)));
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no free port"))
            .context("cannot start PostgreSQL on 127.0.0.1"))
    }

    fn new(name: String, host: Host, addr: Ipv4Addr, dir: PathBuf, port: u16) -> Result<Self> {
        Ok(Postgres {
            name,
            host,
            addr,
            dir,
            port,
            password: random_hex(16)?,
            child: None,
            start_duration: Duration::ZERO,
            torn_down: false,
        })
    }

    fn set_up(&mut self, options: &PostgresOptions) -> Result<()> {
        let record = Record::create(&self.dir)?;
        if let Host::Db { vm, plan } = &self.host {
            record.add(&format!("netns {}", self.name))?;
            make_db_host(&self.name, vm, plan)?;
        }
        self.init(options)?;

        // Started directly (setpriv execs, nsenter without --fork execs): the child is the
        // postmaster. cluster_name puts the owner's name into every backend's process title.
        let name = self.name.clone();
        let data = self.data_dir();
        let log_path = self.log_path();
        let log = fs::File::create(&log_path)?;
        let mut cmd = match &self.host {
            Host::Db { .. } => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{name}"))
                    .arg("--")
                    .arg("setpriv");
                c
            }
            Host::Loopback => Command::new("setpriv"),
        };
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(format!("{PG_BIN}/postgres"))
        .arg("-D")
        .arg(&data);
        let mut settings = vec![
            format!("listen_addresses={}", self.addr),
            format!("port={}", self.port),
            "unix_socket_directories=".to_string(),
            format!("cluster_name={CGROUP_PREFIX}{name}"),
            "fsync=off".to_string(),
            "synchronous_commit=off".to_string(),
            "full_page_writes=off".to_string(),
            "dynamic_shared_memory_type=mmap".to_string(),
            "log_statement=all".to_string(),
            "log_connections=on".to_string(),
        ];
        if let Host::Loopback = self.host {
            // Many of these run side by side on the test machine, each for a few connections.
            settings.extend(["max_connections=20", "shared_buffers=16MB"].map(String::from));
        }
        if options.tls.is_some() {
            // Relative to the data directory, where init() wrote them.
            settings.extend(
                [
                    "ssl=on",
                    "ssl_cert_file=server.crt",
                    "ssl_key_file=server.key",
                ]
                .map(String::from),
            );
        }
        for s in &settings {
            cmd.arg("-c").arg(s);
        }
        cmd.current_dir(&self.dir)
            .env(OWNER_ENV, &name)
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
                let ok = self
                    .client_cmd("pg_isready")
                    .args(["-q", "-t", "1", "-h", &self.addr.to_string()])
                    .args(["-p", &self.port.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                Ok(ok.then_some(()))
            },
        )
    }

    /// initdb as postgres (the directory is the cluster's, the password file only its), then
    /// the access rules and the TLS files.
    fn init(&self, options: &PostgresOptions) -> Result<()> {
        let data = self.data_dir();
        let pwfile = self.dir.join("pwfile");
        fs::write(&pwfile, &self.password)?;
        sys::run(
            Command::new("install")
                .args(["-d", "-o", "postgres", "-g", "postgres", "-m", "0700"])
                .arg(&data),
        )?;
        chown_postgres(&pwfile)?;
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600))?;
        let mut initdb = as_postgres(&format!("{PG_BIN}/initdb"));
        initdb
            .current_dir(&self.dir)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "--no-instructions", "--locale=C", "-E", "UTF8"]);
        sys::run(&mut initdb).context("initdb failed")?;
        let _ = fs::remove_file(&pwfile);

        if let Host::Db { plan, .. } = &self.host {
            let hba = data.join("pg_hba.conf");
            let mut text = fs::read_to_string(&hba)?;
            text.push_str(&format!(
                "\n# pilot-harness: the VM's link, and its containers (NATed by the VM, listed anyway)\n\
                 host all all {} scram-sha-256\nhost all all {} scram-sha-256\n",
                plan.db_subnet(),
                plan.container_subnet()
            ));
            fs::write(&hba, text)?;
        }
        if let Some((cert, key)) = &options.tls {
            let (cert_path, key_path) = (data.join("server.crt"), data.join("server.key"));
            fs::write(&cert_path, cert)?;
            fs::write(&key_path, key)?;
            // postgres refuses a key that others can read.
            fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
            chown_postgres(&cert_path)?;
            chown_postgres(&key_path)?;
        }
        Ok(())
    }

    /// A command that runs `program` where the cluster's clients are: inside the VM's network
    /// namespace, or on the host for a loopback cluster. It carries the owner marker of the VM
    /// (of the cluster on loopback), so clean-up finds it if it hangs.
    fn client_cmd(&self, program: &str) -> Command {
        match &self.host {
            Host::Db { vm, .. } => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{vm}"))
                    .arg("--")
                    .arg(program)
                    .env(OWNER_ENV, vm);
                c
            }
            Host::Loopback => {
                let mut c = Command::new(program);
                c.env(OWNER_ENV, &self.name);
                c
            }
        }
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    /// The server's address: the database host's (reachable from the VM), or 127.0.0.1.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }
    /// The port postgres listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The superuser's name ([`SUPERUSER`]).
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }
    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }
    /// The harness name (`pvN-db`, or `pvp<PORT>` on loopback).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// A libpq URL for the superuser.
    pub fn url(&self) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@{}:{}/postgres",
            self.password, self.addr, self.port
        )
    }
    /// How long starting took (initdb and start).
    pub fn start_duration(&self) -> Duration {
        self.start_duration
    }
    /// The server's log (its stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }
    /// The server log so far: statements, connections, errors.
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The VM and the VM-side name of the VM<->db link; fails for a loopback cluster.
    fn vm_link(&self) -> Result<(&str, String, &Plan)> {
        match &self.host {
            Host::Db { vm, plan } => Ok((vm, format!("{vm}-db"), plan)),
            Host::Loopback => bail!("{} runs on 127.0.0.1: it has no link to a VM", self.name),
        }
    }

    /// Runs SQL as the superuser with `psql` from where the clients are (inside the VM's network
    /// namespace, or on the host); returns unaligned, tuples-only output. Gives up after a 3 s
    /// connect timeout (10 s in all), so a test against a cut link fails fast.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = self
            .client_cmd("timeout")
            .args(["10", "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &self.addr.to_string(), "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", "postgres", "-c", sql])
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "3")
            .output()
            .context("cannot run psql")?;
        if !out.status.success() {
            bail!(
                "psql against {}:{} failed ({}): {}",
                self.addr,
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
    /// Fails for a loopback cluster.
    pub fn cut_link(&self) -> Result<()> {
        let (vm, link, _) = self.vm_link()?;
        sys::run_args("ip", &["-n", vm, "link", "set", &link, "down"]).map(|_| ())
    }

    /// Brings the link back (and its route, which the kernel dropped with the link).
    pub fn restore_link(&self) -> Result<()> {
        let (vm, link, plan) = self.vm_link()?;
        sys::run_args("ip", &["-n", vm, "link", "set", &link, "up"])?;
        let src = plan.vm_db_side().to_string();
        sys::run_args(
            "ip",
            &[
                "-n",
                vm,
                "route",
                "replace",
                &plan.db_subnet(),
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

    /// Stops the server and removes what it made; reports what could not be removed.
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
        // SIGINT is PostgreSQL's fast shutdown (backends end, shared memory is released),
        // SIGQUIT its immediate one, SIGKILL the last resort.
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            for (sig, wait) in [(libc::SIGINT, 5), (libc::SIGQUIT, 5)] {
                sys::signal(pid, sig);
                if sys::wait_gone(&[pid], Duration::from_secs(wait)).is_empty() {
                    break;
                }
            }
            let _ = child.kill();
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
                "cleanup of PostgreSQL {name} incomplete: {}",
                errors.join("; ")
            )
        }
    }
}

/// Makes database host `db` (a namespace) and its link to VM `vm`.
fn make_db_host(db: &str, vm: &str, plan: &Plan) -> Result<()> {
    sys::run_args("ip", &["netns", "add", db])?;
    sys::run_args("ip", &["-n", db, "link", "set", "lo", "up"])?;
    let (vm_if, db_if) = (format!("{vm}-db"), format!("{vm}-vm"));
    sys::run_args(
        "ip",
        &[
            "link", "add", &vm_if, "netns", vm, "type", "veth", "peer", "name", &db_if, "netns", db,
        ],
    )?;
    let vm_cidr = format!("{}/24", plan.vm_db_side());
    let db_cidr = format!("{}/24", plan.db());
    sys::run_args("ip", &["-n", vm, "addr", "add", &vm_cidr, "dev", &vm_if])?;
    sys::run_args("ip", &["-n", vm, "link", "set", &vm_if, "up"])?;
    sys::run_args("ip", &["-n", db, "addr", "add", &db_cidr, "dev", &db_if])?;
    sys::run_args("ip", &["-n", db, "link", "set", &db_if, "up"])?;
    Ok(())
}

fn chown_postgres(path: &Path) -> Result<()> {
    sys::run(Command::new("chown").arg("postgres:postgres").arg(path)).map(|_| ())
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
