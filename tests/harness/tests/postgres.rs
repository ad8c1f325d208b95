//! The loopback PostgreSQL ([`Postgres::start_loopback`]) against a real server: it answers
//! with and without TLS, logs what it saw, leaves nothing behind when dropped, and what a
//! killed test left of it is removed by harness-clean ([`pilot_harness::clean`]). Needs root;
//! fails (never skips) without.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use pilot_harness::clean::{self, Options};
use pilot_harness::{Postgres, PostgresOptions, leftovers};

/// A self-signed certificate for `localhost` and its key, PEM, made by openssl.
fn self_signed() -> Result<(String, String)> {
    let dir = std::env::temp_dir().join(format!("pilot-harness-pg-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("cannot run openssl")?;
    ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pems = (
        std::fs::read_to_string(&cert)?,
        std::fs::read_to_string(&key)?,
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(pems)
}

#[test]
fn a_loopback_cluster_answers_with_tls_logs_and_leaves_nothing() -> Result<()> {
    let pg = Postgres::start_loopback(&PostgresOptions {
        tls: Some(self_signed()?),
    })?;
    eprintln!("{} started in {:?}", pg.name(), pg.start_duration());
    let name = pg.name().to_string();
    ensure!(name == format!("pvp{}", pg.port()), "{name}");
    ensure!(pg.addr().is_loopback());
    ensure!(pg.psql("SELECT 40 + 2")? == "42");
    ensure!(pg.cut_link().is_err(), "a loopback cluster has no link");

    // A TLS login (psql's own, not the fixture's), seen as such by the server.
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
            pg.port()
        ))
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .env("PGPASSWORD", pg.password())
        .output()?;
    ensure!(
        out.status.success(),
        "psql over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).trim() == "t");
    let log = pg.log_text();
    ensure!(
        log.contains("SELECT 40 + 2"),
        "statements are logged:\n{log}"
    );
    ensure!(
        log.contains("SSL enabled"),
        "connections are logged:\n{log}"
    );

    pg.cleanup()?;
    let left = leftovers(&[&name]);
    ensure!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

/// Set in the child process of `harness_clean_removes_a_killed_tests_loopback_cluster`.
const KILLED_RUN_ENV: &str = "PILOT_HARNESS_KILLED_PG";

/// Not a test of its own: the child process of
/// `harness_clean_removes_a_killed_tests_loopback_cluster`. It starts a cluster with a client
/// connected (a backend process), says READY, and blocks until it is killed with SIGKILL.
#[test]
#[ignore = "helper process of harness_clean_removes_a_killed_tests_loopback_cluster"]
fn killed_pg_helper() -> Result<()> {
    if std::env::var_os(KILLED_RUN_ENV).is_none() {
        return Ok(());
    }
    let pg = Postgres::start_loopback(&PostgresOptions::default())?;
    let _client = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            pg.port()
        ))
        .args(["-X", "-c", "SELECT pg_sleep(600)"])
        .env("PGPASSWORD", pg.password())
        // As every process the harness starts: so that harness-clean finds it too.
        .env("PILOT_HARNESS_OWNER", pg.name())
        .stdout(Stdio::null())
        .spawn()?;
    println!("READY {}", pg.name());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

#[test]
fn harness_clean_removes_a_killed_tests_loopback_cluster() -> Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--exact", "killed_pg_helper", "--ignored", "--nocapture"])
        .env(KILLED_RUN_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let name = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("READY ").map(str::to_string))
        .context("the helper process ended without starting its cluster")?;
    child.kill()?;
    child.wait()?;
    let after_kill = leftovers(&[&name]);
    ensure!(
        after_kill
            .iter()
            .filter(|l| l.starts_with("process "))
            .count()
            >= 3,
        "a killed test should have left its postmaster, auxiliaries and backend: {after_kill:#?}"
    );

    // What scripts/harness-clean runs; objects of tests still running are left alone.
    let status = clean::run(&Options {
        quiet: true,
        ..Options::default()
    });
    let left = leftovers(&[&name]);
    ensure!(
        left.is_empty(),
        "left behind after harness-clean: {left:#?}"
    );
    ensure!(status == 0, "harness-clean exited {status}");
    Ok(())
}
