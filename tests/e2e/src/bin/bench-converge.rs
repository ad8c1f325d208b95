//! `bench-converge [--runs N] [--json PATH]`: how long `pilot-agent up` takes, against what
//! it cannot avoid. Run through `scripts/bench-converge` (which builds first). Needs root.
//!
//! For each of N (default 5) fresh simulated VMs, side by side:
//! - floor: the same VM's dockerd switched to an equivalent mutual-TLS `daemon.json` by hand
//!   (certificates made with the openssl CLI): `dockerd-ctl restart` plus the time until 2376
//!   answers `/version` over mutual TLS (polled every 5 ms from inside the VM). That restart
//!   and readiness wait is what any converge to TLS must pay;
//! - cold: `pilot-agent up` on the untouched host (the original daemon.json is put back and
//!   dockerd restarted with it first, untimed): firewall, CA and certificates, daemon.json,
//!   the restart, the readiness wait;
//! - warm: `pilot-agent up` again (nothing to do).
//!
//! Prints every run and min / median / max of each figure and of cold / floor, and writes
//! the figures as JSON (default `$CARGO_TARGET_DIR/bench-converge.json`). A benchmark, not a
//! test: it asserts nothing about times (it fails only when a run itself fails).

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pilot_e2e::agent::Agent;
use pilot_e2e::floor::{docker_tls_floor, stats};
use pilot_harness::{Vm, VmOptions, require_root, target_dir};
use serde_json::{Value, json};

const USAGE: &str = "usage: bench-converge [--runs N] [--json PATH]";

fn parse_args() -> Result<pilot_e2e::BenchArgs> {
    pilot_e2e::bench_args(5, target_dir().join("bench-converge.json"), USAGE)
}

/// One VM's figures.
struct Run {
    vm: String,
    floor: Duration,
    floor_restart: Duration,
    cold: Duration,
    warm: Duration,
    cold_steps: Value,
    warm_steps: Value,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    require_root()?;
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let r = bench_one().with_context(|| format!("run {} of {}", i + 1, args.runs))?;
        println!(
            "run {}/{} ({}): floor {:.3}s (restart {:.3}s + TLS ready {:.3}s), cold up {:.3}s, \
             warm up {:.3}s, cold/floor {:.2}",
            i + 1,
            args.runs,
            r.vm,
            r.floor.as_secs_f64(),
            r.floor_restart.as_secs_f64(),
            (r.floor - r.floor_restart).as_secs_f64(),
            r.cold.as_secs_f64(),
            r.warm.as_secs_f64(),
            r.cold.as_secs_f64() / r.floor.as_secs_f64()
        );
        println!("    cold steps: {}", r.cold_steps);
        runs.push(r);
    }

    let secs = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> { runs.iter().map(f).collect() };
    let cold = secs(&|r| r.cold.as_secs_f64());
    let floor = secs(&|r| r.floor.as_secs_f64());
    let warm = secs(&|r| r.warm.as_secs_f64());
    let ratio = secs(&|r| r.cold.as_secs_f64() / r.floor.as_secs_f64());
    let overhead = secs(&|r| r.cold.as_secs_f64() - r.floor.as_secs_f64());
    println!();
    println!(
        "{:<28} {:>9} {:>9} {:>9}   (n = {})",
        "",
        "min",
        "median",
        "max",
        runs.len()
    );
    for (name, v) in [
        ("cold up (s)", &cold),
        ("floor: restart + TLS (s)", &floor),
        ("cold - floor (s)", &overhead),
        ("cold / floor", &ratio),
        ("warm up (s)", &warm),
    ] {
        let s = stats(v);
        println!(
            "{name:<28} {:>9.3} {:>9.3} {:>9.3}",
            s["min"].as_f64().unwrap_or_default(),
            s["median"].as_f64().unwrap_or_default(),
            s["max"].as_f64().unwrap_or_default()
        );
    }

    let report = json!({
        "benchmark": "bench-converge",
        "runs": runs.len(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "units": "seconds",
        "definitions": {
            "floor": "dockerd-ctl restart with an equivalent mutual-TLS daemon.json, plus the \
                      time until 2376 answers /version over mutual TLS (polled every 5 ms)",
            "cold": "wall time of `pilot-agent up` on the untouched VM (exit 0)",
            "warm": "wall time of a second `pilot-agent up` (nothing to do)",
        },
        "summary": {
            "cold": stats(&cold),
            "floor": stats(&floor),
            "cold_minus_floor": stats(&overhead),
            "cold_over_floor": stats(&ratio),
            "warm": stats(&warm),
        },
        "per_run": runs.iter().map(|r| json!({
            "vm": r.vm,
            "floor": r.floor.as_secs_f64(),
            "floor_restart_command": r.floor_restart.as_secs_f64(),
            "cold": r.cold.as_secs_f64(),
            "warm": r.warm.as_secs_f64(),
            "cold_over_floor": r.cold.as_secs_f64() / r.floor.as_secs_f64(),
            "cold_steps": r.cold_steps,
            "warm_steps": r.warm_steps,
        })).collect::<Vec<_>>(),
    });
    pilot_e2e::write_json_report(&args.json, &report)?;
    println!("\nJSON: {}", args.json.display());
    Ok(())
}

fn bench_one() -> Result<Run> {
    let vm = Vm::start(VmOptions::default())?;
    let agent = Agent::new(&vm)?;

    // The floor, by hand (the VM is put back as it was).
    let (floor, floor_restart) = docker_tls_floor(&vm)?;

    let cold = agent.up_ok(&vm)?;
    let cold_steps = step_durations(&agent)?;
    let warm = agent.up_ok(&vm)?;
    let warm_steps = step_durations(&agent)?;
    agent.operator_docker_version(&vm)?;
    let name = vm.name().to_string();
    vm.cleanup()?;
    Ok(Run {
        vm: name,
        floor,
        floor_restart,
        cold,
        warm,
        cold_steps,
        warm_steps,
    })
}

/// Each step's state and duration (finished - started) from status.json.
fn step_durations(agent: &Agent) -> Result<Value> {
    let status: Value = serde_json::from_slice(&fs::read(agent.status_path())?)?;
    let mut out = serde_json::Map::new();
    for s in status["steps"]
        .as_array()
        .context("status.json has no steps")?
    {
        let name = s["name"].as_str().unwrap_or_default().to_string();
        let secs = match (s["started_at"].as_str(), s["finished_at"].as_str()) {
            (Some(a), Some(b)) => rfc3339_secs(b)? - rfc3339_secs(a)?,
            _ => f64::NAN,
        };
        out.insert(
            name,
            json!({ "state": s["state"], "seconds": (secs * 1000.0).round() / 1000.0 }),
        );
    }
    Ok(Value::Object(out))
}

/// Seconds of the day of an RFC 3339 UTC time ("...THH:MM:SS.fffZ"): enough for durations
/// within one run (a run across midnight would show a negative step time, nothing worse).
fn rfc3339_secs(t: &str) -> Result<f64> {
    let time = t
        .split_once('T')
        // Drop the offset: "Z", "+00:00" (the agent writes UTC).
        .map(|(_, t)| t.split(['Z', '+', '-']).next().unwrap_or(t))
        .with_context(|| format!("not an RFC 3339 time: {t}"))?;
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next(), parts.next(), parts.next());
    match (h, m, s) {
        (Some(h), Some(m), Some(s)) => {
            Ok(h.parse::<f64>()? * 3600.0 + m.parse::<f64>()? * 60.0 + s.parse::<f64>()?)
        }
        _ => bail!("not an RFC 3339 time: {t}"),
    }
}
