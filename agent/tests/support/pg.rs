//! A throwaway PostgreSQL 15 cluster on 127.0.0.1 for integration tests.
//!
//! `initdb` runs as the `postgres` user in a temporary directory (superuser `postgres` with a
//! random password, SCRAM for every TCP login), the server listens on a free loopback port
//! with no Unix socket, is started by `pg_ctl -w` (which waits for the server to report
//! "ready" in postmaster.pid: no fixed sleep) and is always stopped by [`TestCluster`]'s
//! `Drop`, which signals only the postmaster PID this cluster wrote. Durability is off:
//! a cluster lives for one test.
//!
//! Every statement and connection is logged (`log_statement=all`, `log_connections=on`) so
//! tests can assert on what the server saw: which statements ran, that TLS was used, and that
//! no plain-text password ever reached the server.
//!
//! Needs root (to run as `postgres`); without it, [`TestCluster::start`] fails loudly.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Debian's PostgreSQL 15 server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const SUPERUSER: &str = "postgres";
pub const HOST: &str = "127.0.0.1";

/// What to switch on besides the defaults.
#[derive(Default)]
pub struct ClusterOptions {
    /// PEM server certificate chain and key: the server runs with `ssl=on`.
    pub tls: Option<(String, String)>,
}

pub struct TestCluster {
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    postmaster_pid: Option<u32>,
    start_duration: Duration,
}

impl TestCluster {
    pub fn start() -> Result<TestCluster> {
        Self::start_with(ClusterOptions::default())
    }

    pub fn start_with(options: ClusterOptions) -> Result<TestCluster> {
        if effective_uid() != 0 {
            bail!(
                "the PostgreSQL test cluster needs root (it runs initdb and postgres as the postgres user)"
            );
        }
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("pilot-agent-pg-")
            .tempdir()
            .context("cannot make the cluster's temporary directory")?;
        chown_postgres(dir.path())?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
        let mut cluster = TestCluster {
            dir,
            port: 0,
            password: random_hex(16)?,
            postmaster_pid: None,
            start_duration: Duration::ZERO,
        };
        cluster.init(&options)?;
        // A port found free can be taken before postgres binds it: try a few.
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    cluster.postmaster_pid = Some(cluster.read_postmaster_pid()?);
                    cluster.start_duration = t0.elapsed();
                    return Ok(cluster);
                }
                Err(e) if cluster.log_text().contains("Address already in use") => {
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no free port")))
    }

    fn init(&self, options: &ClusterOptions) -> Result<()> {
        let pwfile = self.dir.path().join("pwfile");
        fs::write(&pwfile, &self.password)?;
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600))?;
        chown_postgres(&pwfile)?;
        run(as_postgres(&format!("{PG_BIN}/initdb"))
            .current_dir(self.dir.path())
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "--no-instructions", "--locale=C", "-E", "UTF8"]))
        .context("initdb failed")?;
        fs::remove_file(&pwfile)?;

        let mut conf = String::from(
            "\n# pilot-agent test cluster\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = ''\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             log_statement = 'all'\nlog_connections = on\n\
             max_connections = 20\nshared_buffers = 16MB\n",
        );
        if let Some((cert, key)) = &options.tls {
            let data = self.data_dir();
            let (cert_path, key_path) = (data.join("server.crt"), data.join("server.key"));
            fs::write(&cert_path, cert)?;
            fs::write(&key_path, key)?;
            // postgres refuses a key readable by others.
            fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
            chown_postgres(&cert_path)?;
            chown_postgres(&key_path)?;
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        let conf_path = self.data_dir().join("postgresql.conf");
        let mut text = fs::read_to_string(&conf_path)?;
        text.push_str(&conf);
        fs::write(&conf_path, text)?;
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<()> {
        // The port goes on the command line so that a retry with another port needs no edit.
        run(as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .current_dir(self.dir.path())
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "30", "-o"])
            .arg(format!("-p {}", self.port))
            .arg("start"))
        .with_context(|| format!("pg_ctl start failed: {}", tail(&self.log_text(), 15)))
    }

    fn read_postmaster_pid(&self) -> Result<u32> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .context("cannot read postmaster.pid")?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("postmaster.pid has no PID on its first line")
    }

    pub fn host(&self) -> &'static str {
        HOST
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn superuser_password(&self) -> &str {
        &self.password
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }
    /// The server log so far (statements, connections, errors).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    /// How long [`TestCluster::start`] took (initdb + start).
    pub fn start_duration(&self) -> Duration {
        self.start_duration
    }

    /// Connects without TLS as `user`.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(HOST)
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(database)
            .connect_timeout(Duration::from_secs(5));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A superuser connection to the `postgres` database.
    pub async fn superuser(&self) -> Result<tokio_postgres::Client> {
        self.connect(SUPERUSER, &self.password, "postgres")
            .await
            .context("cannot connect as the test cluster's superuser")
    }

    fn stop(&mut self) -> Result<()> {
        let Some(pid) = self.postmaster_pid.take() else {
            return Ok(());
        };
        // SIGINT is a fast shutdown (backends end, shared memory released); SIGQUIT is an
        // immediate one; SIGKILL is the last resort. Only this cluster's postmaster is signalled.
        for (signal, wait) in [("INT", 10), ("QUIT", 5), ("KILL", 5)] {
            if !alive(pid) {
                return Ok(());
            }
            let _ = Command::new("kill")
                .args(["-s", signal, &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(wait);
            while Instant::now() < deadline {
                if !alive(pid) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("postmaster {pid} survived SIGKILL")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("test cluster in {}: {e:#}", self.dir.path().display());
        }
    }
}

/// A process that exists and is not a zombie (pg_ctl's postmaster is reparented when pg_ctl
/// exits, and its new parent may reap it late).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name, which may contain spaces.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"])
        .arg(program)
        .env("HOME", "/var/lib/postgresql");
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn chown_postgres(path: &Path) -> Result<()> {
    run(Command::new("chown").arg("postgres:postgres").arg(path))
}

fn effective_uid() -> u32 {
    // /proc/self/status avoids a libc dependency for one call.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// A loopback port that nothing listens on right now.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind((HOST, 0))?;
    Ok(listener.local_addr()?.port())
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
