//! `bench-runners [--runs N] [--json PATH]`: what more runners cost. Run through
//! `scripts/bench-runners` (which builds first). Needs root.
//!
//! For each of N (default 3) runs and for `waypoint.start_parallelism` 1 (one runner after
//! another, as the agent made them before) and 8 (the default), side by side on fresh
//! simulated VMs with the Waypoint stand-in baked in:
//! - cold: `pilot-agent up` with 1 runner (everything: TLS, image load, server, bootstrap);
//! - 1 -> 10: `up` after `runners: 10` (nine tokens minted, nine containers made);
//! - 10 -> 20: `up` after `runners: 20`.
//!
//! Prints every run and min / median / max of each figure and of the ratio sequential /
//! parallel, and writes JSON (default `$CARGO_TARGET_DIR/bench-runners.json`). A benchmark,
//! not a test: it asserts nothing about times (it fails only when a run itself fails).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use pilot_e2e::agent::{Agent, waypoint_section};
use pilot_e2e::bake_standin;
use pilot_e2e::floor::stats;
use pilot_harness::{Vm, VmOptions, require_root, target_dir};
use serde_json::json;

const USAGE: &str = "usage: bench-runners [--runs N] [--json PATH]";
const IMAGE: &str = "pilot/waypoint:0.11.4";
const SETTINGS: [u32; 2] = [1, 8];

fn parse_args() -> Result<pilot_e2e::BenchArgs> {
    pilot_e2e::bench_args(3, target_dir().join("bench-runners.json"), USAGE)
}

/// One VM's figures: cold with 1 runner, 1 -> 10, 10 -> 20.
#[derive(Clone, Copy)]
struct Run {
    cold: Duration,
    to_10: Duration,
    to_20: Duration,
}

/// Picks one figure of a run.
type Figure = dyn Fn(&Run) -> Duration;

fn sections(images: &std::path::Path, runners: u32, parallelism: u32) -> String {
    waypoint_section(IMAGE, IMAGE, images, runners)
        + &format!("\x20 start_parallelism: {parallelism}\n")
}

fn bench_one(parallelism: u32) -> Result<Run> {
    let vm = Vm::start(VmOptions::default())?;
    let images = bake_standin(&vm, IMAGE)?;
    let mut figures = Vec::new();
    for runners in [1, 10, 20] {
        let agent = Agent::with_sections(&vm, &sections(&images, runners, parallelism))?;
        figures.push(agent.up_ok(&vm)?);
        let running = vm.docker_ok([
            "ps",
            "-q",
            "--filter",
            "label=io.pilot.role=runner",
            "--filter",
            "status=running",
        ])?;
        if running.lines().count() != runners as usize {
            bail!(
                "{runners} runners wanted, {} running",
                running.lines().count()
            );
        }
    }
    vm.cleanup()?;
    Ok(Run {
        cold: figures[0],
        to_10: figures[1],
        to_20: figures[2],
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    require_root()?;
    // runs[setting] = figures of each run.
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); SETTINGS.len()];
    for i in 0..args.runs {
        for (k, &p) in SETTINGS.iter().enumerate() {
            let r = bench_one(p)
                .with_context(|| format!("run {} of {}, parallelism {p}", i + 1, args.runs))?;
            println!(
                "run {}/{} parallelism {p}: cold up (1 runner) {:.3}s, 1 -> 10 {:.3}s, \
                 10 -> 20 {:.3}s",
                i + 1,
                args.runs,
                r.cold.as_secs_f64(),
                r.to_10.as_secs_f64(),
                r.to_20.as_secs_f64()
            );
            runs[k].push(r);
        }
    }
    let secs =
        |k: usize, f: &Figure| -> Vec<f64> { runs[k].iter().map(|r| f(r).as_secs_f64()).collect() };
    let ratio = |f: &Figure| -> Vec<f64> {
        runs[0]
            .iter()
            .zip(&runs[1])
            .map(|(a, b)| f(a).as_secs_f64() / f(b).as_secs_f64())
            .collect()
    };
    let figures: [(&str, &Figure); 3] = [
        ("cold up, 1 runner", &|r| r.cold),
        ("1 -> 10 runners", &|r| r.to_10),
        ("10 -> 20 runners", &|r| r.to_20),
    ];
    println!();
    println!(
        "{:<36} {:>9} {:>9} {:>9}   (n = {})",
        "", "min", "median", "max", args.runs
    );
    let mut summary = serde_json::Map::new();
    for (name, f) in figures {
        let mut rows = Vec::new();
        for (k, p) in SETTINGS.iter().enumerate() {
            rows.push((format!("{name} (s), parallelism {p}"), stats(&secs(k, f))));
        }
        rows.push((format!("{name}: 1 / {}", SETTINGS[1]), stats(&ratio(f))));
        for (label, s) in rows {
            println!(
                "{label:<36} {:>9.3} {:>9.3} {:>9.3}",
                s["min"].as_f64().unwrap_or_default(),
                s["median"].as_f64().unwrap_or_default(),
                s["max"].as_f64().unwrap_or_default()
            );
            summary.insert(label, s);
        }
    }
    let report = json!({
        "benchmark": "bench-runners",
        "runs": args.runs,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "units": "seconds",
        "definitions": {
            "cold": "wall time of `pilot-agent up` with 1 runner on a fresh VM",
            "1 -> 10": "wall time of `up` after the configuration went from 1 to 10 runners",
            "10 -> 20": "wall time of `up` after the configuration went from 10 to 20 runners",
            "parallelism": "waypoint.start_parallelism: runners minted for / made at once",
        },
        "summary": summary,
    });
    pilot_e2e::write_json_report(&args.json, &report)?;
    println!("\nJSON: {}", args.json.display());
    Ok(())
}
