//! `bench-service [--status-runs N] [--idle-secs S] [--wrk-secs S] [--wrk-connections C]
//! [--wrk-threads T] [--json PATH]`: figures of `pilot-agent run` as a service. Run through
//! `scripts/bench-service` (which builds first). Needs root and `wrk` (Debian package).
//!
//! One simulated VM with the Waypoint stand-in, PostgreSQL and the `endpoint:` and `service:`
//! sections, `pilot-agent run` started as a child; once its first pass has converged:
//! - memory: VmRSS (and its anonymous / file-backed parts) of the idle `run`, sampled every
//!   250 ms for `--idle-secs` (default 10), and VmHWM (the peak, converge pass included), from
//!   /proc/PID/status; target: idle VmRSS <= 10 MiB;
//! - `pilot-agent status` latency: wall time of N (default 100) runs of the binary, from spawn
//!   to exit (as the operator's shell sees it, without SSH), plain and `--json`; and N/10 runs
//!   over `ssh root@VM pilot-agent status` from the outside namespace, for scale; target:
//!   median <= 20 ms;
//! - the endpoint on the VM's loopback with `wrk --latency` (run inside the VM's network
//!   namespace; wrk does not verify the certificate): `/healthz` and an authenticated
//!   `/v1/status`, requests/s and p50 / p99 latency, non-2xx counts.
//!
//! Prints a table and writes JSON (default `$CARGO_TARGET_DIR/bench-service.json`). A benchmark,
//! not a test: it asserts nothing about the figures (it fails only when something does not
//! work). wrk and the agent share this machine's cores: requests/s is a floor for a real host.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_e2e::agent::{ENDPOINT_PORT, RateLimit};
use pilot_e2e::stack::RunHost;
use pilot_e2e::{start_operator_sshd, write_json_report};
use pilot_harness::{require_root, target_dir};
use serde_json::{Value, json};

const USAGE: &str = "usage: bench-service [--status-runs N] [--idle-secs S] [--wrk-secs S] \
                     [--wrk-connections C] [--wrk-threads T] [--json PATH]";

struct Args {
    status_runs: usize,
    idle_secs: u64,
    wrk_secs: u64,
    wrk_connections: u32,
    wrk_threads: u32,
    json: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        status_runs: 100,
        idle_secs: 10,
        wrk_secs: 10,
        wrk_connections: 16,
        wrk_threads: 2,
        json: target_dir().join("bench-service.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> Result<u64> {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .with_context(|| format!("{name} needs a positive number\n{USAGE}"))
        };
        match arg.as_str() {
            "--status-runs" => a.status_runs = num("--status-runs")? as usize,
            "--idle-secs" => a.idle_secs = num("--idle-secs")?,
            "--wrk-secs" => a.wrk_secs = num("--wrk-secs")?,
            "--wrk-connections" => a.wrk_connections = num("--wrk-connections")? as u32,
            "--wrk-threads" => a.wrk_threads = num("--wrk-threads")? as u32,
            "--json" => a.json = it.next().map(PathBuf::from).context(USAGE)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    require_root()?;
    ensure!(
        Command::new("wrk")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok(),
        "wrk is not installed (Debian package `wrk`)"
    );

    // The host: VM, database, baked stand-in, agent with endpoint and service sections.
    let RunHost {
        token,
        agent,
        pg,
        vm,
    } = RunHost::start(RateLimit {
        failures: 10,
        window_secs: 60,
    })?;
    let t0 = Instant::now();
    let mut run = agent.spawn_run(&vm, &vm.dir().join("agent-run.log"))?;
    agent.wait_first_pass(&mut run, Duration::from_secs(150), "run's first pass")?;
    let converged = t0.elapsed();
    vm.wait_tcp_from_outside(ENDPOINT_PORT, Duration::from_secs(30))?;
    println!(
        "bench-service: VM {} converged by `run` in {:.2}s (pid {})",
        vm.name(),
        converged.as_secs_f64(),
        run.pid()
    );

    // Memory of the idle service (nsenter execs the agent: the child's PID is the agent's).
    let pid = run.pid();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ensure!(
        comm.trim() == "pilot-agent",
        "pid {pid} is {comm:?}, not pilot-agent"
    );
    let mut rss = Vec::new();
    let mut anon = Vec::new();
    let mut file = Vec::new();
    let end = Instant::now() + Duration::from_secs(args.idle_secs);
    while Instant::now() < end {
        run.ensure_running()?;
        let st = proc_status(pid)?;
        rss.push(st.0 as f64);
        anon.push(st.1 as f64);
        file.push(st.2 as f64);
        // A sampling period, not a readiness wait.
        std::thread::sleep(Duration::from_millis(250));
    }
    let hwm = proc_field(pid, "VmHWM")? as f64;
    let passes_idle = agent.status_json()?["run"]["passes"].clone();

    // `status` latency: the binary itself (no SSH), plain and --json.
    let bin = pilot_harness::target_bin("pilot-agent")?;
    let time_status = |json_out: bool| -> Result<Vec<f64>> {
        let mut v = Vec::new();
        for _ in 0..args.status_runs {
            let mut c = Command::new(&bin);
            c.arg("--config").arg(agent.config_path()).arg("status");
            if json_out {
                c.arg("--json");
            }
            c.stdout(Stdio::null()).stderr(Stdio::null());
            let t = Instant::now();
            let st = c.status().context("cannot run pilot-agent status")?;
            v.push(t.elapsed().as_secs_f64() * 1000.0);
            ensure!(st.code() == Some(0), "pilot-agent status exited {st}");
        }
        Ok(v)
    };
    let status_plain = time_status(false)?;
    let status_json = time_status(true)?;

    // ... and over SSH from the outside namespace, for scale.
    let sshd = start_operator_sshd(&vm, &agent)?;
    let mut status_ssh = Vec::new();
    for _ in 0..(args.status_runs / 10).max(3) {
        let t = Instant::now();
        let out = sshd.ssh_output(&vm, "pilot-agent status")?;
        status_ssh.push(t.elapsed().as_secs_f64() * 1000.0);
        ensure!(
            out.status.code() == Some(0),
            "ssh pilot-agent status exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The endpoint under load on the VM's loopback.
    let base = format!("https://127.0.0.1:{ENDPOINT_PORT}");
    let wrk = |path: &str, auth: Option<&str>| -> Result<Value> {
        let mut c = vm.cmd("wrk");
        c.arg(format!("-t{}", args.wrk_threads))
            .arg(format!("-c{}", args.wrk_connections))
            .arg(format!("-d{}s", args.wrk_secs))
            .arg("--latency");
        if let Some(a) = auth {
            c.arg("-H").arg(format!("Authorization: Bearer {a}"));
        }
        let out = c
            .arg(format!("{base}{path}"))
            .output()
            .context("cannot run wrk")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "wrk {path} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_wrk(&text).with_context(|| format!("wrk output for {path}:\n{text}"))
    };
    let healthz = wrk("/healthz", None)?;
    let v1_status = wrk("/v1/status", Some(&token.token))?;
    let rss_after_load = proc_field(pid, "VmRSS")? as f64;
    let hwm_after_load = proc_field(pid, "VmHWM")? as f64;

    // Report.
    let kib = |v: &[f64]| v.iter().map(|k| k / 1024.0).collect::<Vec<f64>>();
    println!();
    println!(
        "{:<44} {:>10} {:>10} {:>10}  target",
        "", "min", "median", "max"
    );
    let row = |name: &str, s: &Value, target: &str| {
        println!(
            "{name:<44} {:>10.2} {:>10.2} {:>10.2}  {target}",
            s["min"].as_f64().unwrap_or_default(),
            s["median"].as_f64().unwrap_or_default(),
            s["max"].as_f64().unwrap_or_default(),
        );
    };
    let rss_s = stats(&kib(&rss));
    let anon_s = stats(&kib(&anon));
    let file_s = stats(&kib(&file));
    row("run idle VmRSS (MiB)", &rss_s, "<= 10 MiB");
    row("  of which RssAnon (MiB)", &anon_s, "");
    row("  of which RssFile (MiB)", &file_s, "");
    let plain_s = stats(&status_plain);
    let json_s = stats(&status_json);
    let ssh_s = stats(&status_ssh);
    row(
        &format!("`status` (ms, n={})", status_plain.len()),
        &plain_s,
        "<= 20 ms",
    );
    row(
        &format!("`status --json` (ms, n={})", status_json.len()),
        &json_s,
        "<= 20 ms",
    );
    row(
        &format!(
            "`ssh root@VM pilot-agent status` (ms, n={})",
            status_ssh.len()
        ),
        &ssh_s,
        "(SSH included)",
    );
    println!(
        "run VmHWM (peak, converge pass included): {:.2} MiB; after the wrk runs: VmRSS {:.2} \
         MiB, VmHWM {:.2} MiB; passes while idle: {passes_idle}",
        hwm / 1024.0,
        rss_after_load / 1024.0,
        hwm_after_load / 1024.0
    );
    println!();
    println!(
        "endpoint on loopback (wrk -t{} -c{} -d{}s):  {:>10} {:>9} {:>9} {:>9}",
        args.wrk_threads,
        args.wrk_connections,
        args.wrk_secs,
        "req/s",
        "p50 ms",
        "p99 ms",
        "non-2xx"
    );
    for (name, w) in [
        ("GET /healthz", &healthz),
        ("GET /v1/status (bearer)", &v1_status),
    ] {
        println!(
            "  {name:<42} {:>10.0} {:>9.2} {:>9.2} {:>9}",
            w["requests_per_sec"].as_f64().unwrap_or_default(),
            w["p50_ms"].as_f64().unwrap_or_default(),
            w["p99_ms"].as_f64().unwrap_or_default(),
            w["non_2xx"]
        );
    }

    let report = json!({
        "benchmark": "bench-service",
        "vm": vm.name(),
        "first_pass_seconds": converged.as_secs_f64(),
        "memory_kib": {
            "idle_vmrss": rss_s, "idle_rss_anon": anon_s, "idle_rss_file": file_s,
            "vmhwm_after_converge": hwm, "vmrss_after_wrk": rss_after_load,
            "vmhwm_after_wrk": hwm_after_load, "samples": rss.len(),
            "target_idle_vmrss_kib": 10 * 1024,
        },
        "status_ms": {
            "plain": plain_s, "json": json_s, "over_ssh": ssh_s, "target_ms": 20,
        },
        "endpoint_loopback": {
            "tool": "wrk",
            "threads": args.wrk_threads, "connections": args.wrk_connections,
            "seconds": args.wrk_secs,
            "healthz": healthz, "v1_status_bearer": v1_status,
        },
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    write_json_report(&args.json, &report)?;
    println!("\nJSON: {}", args.json.display());

    let code = run.terminate(Duration::from_secs(20))?;
    ensure!(code.success(), "run exited {code} on SIGTERM");
    sshd.stop()?;
    pg.cleanup()?;
    vm.cleanup()?;
    Ok(())
}

/// (VmRSS, RssAnon, RssFile) of `pid` in KiB.
fn proc_status(pid: u32) -> Result<(u64, u64, u64)> {
    Ok((
        proc_field(pid, "VmRSS")?,
        proc_field(pid, "RssAnon")?,
        proc_field(pid, "RssFile")?,
    ))
}

/// A `kB` field of /proc/PID/status.
fn proc_field(pid: u32, name: &str) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .with_context(|| format!("no {name} in /proc/{pid}/status"))
}

/// min / median / max / mean of `v`.
fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return json!({});
    }
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "n": n, "min": r(s[0]), "median": r(median), "max": r(s[n - 1]),
        "mean": r(s.iter().sum::<f64>() / n as f64),
    })
}

/// Requests/s, p50 / p99 latency (ms) and non-2xx count from `wrk --latency` output.
fn parse_wrk(text: &str) -> Result<Value> {
    let rps: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec")?;
    let pct = |p: &str| -> Option<f64> {
        text.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == p).then_some(())?;
            duration_ms(w.next()?)
        })
    };
    let requests: u64 = text
        .lines()
        .find_map(|l| {
            let l = l.trim();
            let (n, rest) = l.split_once(' ')?;
            rest.starts_with("requests in").then(|| n.parse().ok())?
        })
        .context("no request count")?;
    let non_2xx: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let socket_errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|s| s.trim().to_string());
    Ok(json!({
        "requests": requests,
        "requests_per_sec": rps,
        "p50_ms": pct("50%").context("no 50% line (--latency)")?,
        "p75_ms": pct("75%"),
        "p90_ms": pct("90%"),
        "p99_ms": pct("99%").context("no 99% line (--latency)")?,
        "non_2xx": non_2xx,
        "socket_errors": socket_errors,
    }))
}

/// wrk's durations (`812.00us`, `1.23ms`, `2.01s`, `1.5m`) in milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    for (unit, factor) in [("us", 0.001), ("ms", 1.0), ("s", 1000.0), ("m", 60_000.0)] {
        if let Some(n) = s.strip_suffix(unit)
            && let Ok(v) = n.parse::<f64>()
        {
            return Some(v * factor);
        }
    }
    None
}
