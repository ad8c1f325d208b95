//! `bench [--runs N] [--out PATH] [--service-json PATH]`: the project's figures side by side in
//! one run. Run through `scripts/bench` (which builds first and adds the service
//! figures of `bench-service`). Needs root. A benchmark, not a test: it asserts nothing about
//! times and fails only when a run itself fails.
//!
//! For each of N (default 5) fresh simulated VMs with the Waypoint stand-in baked in (one
//! runner, no database section: the original Pilot made its database with Terraform):
//! - floor: what any converge to this end state must pay, by hand on the same VM
//!   (`pilot_e2e::floor`): dockerd restarted into mutual TLS until 2376 answers, plus the
//!   container work with the docker CLI (image load; network, volume, server until HTTPS,
//!   bootstrap, token, runner);
//! - cold: `pilot-agent up` on the untouched host, to exit 0;
//! - warm: `pilot-agent up` again (nothing to do);
//! - Pilot replay: the same host reset to cold, brought up by
//!   tests/e2e/replay/pilot-post-install.sh (the original Pilot's post-install steps: plain
//!   2375, docker restart, `waypoint install` with its fixed sleeps and retry loop, token
//!   fetch); its fixed sleeps are reported apart.
//!
//! Prints each run and a table of min / median / max, writes JSON (default
//! /var/cache/pilot-agent/bench.json). `--service-json PATH`: merge the JSON that
//! `bench-service` wrote (`run` idle RSS, `status` latency, endpoint throughput / p99) under
//! "service".

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use pilot_e2e::floor::{container_floor, docker_tls_floor, stats};
use pilot_e2e::stack::{IMAGE, Stack};
use pilot_harness::require_root;
use serde_json::{Value, json};

const USAGE: &str = "usage: bench [--runs N] [--out PATH] [--service-json PATH]";

struct Args {
    runs: usize,
    out: PathBuf,
    service_json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        runs: 5,
        out: PathBuf::from("/var/cache/pilot-agent/bench.json"),
        service_json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                args.runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .with_context(|| format!("--runs needs a positive count\n{USAGE}"))?
            }
            "--out" => args.out = it.next().map(PathBuf::from).context(USAGE)?,
            "--service-json" => {
                args.service_json = Some(it.next().map(PathBuf::from).context(USAGE)?)
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(args)
}

/// One VM's figures, in seconds.
struct Run {
    vm: String,
    floor_tls: f64,
    floor_load: f64,
    floor_containers: f64,
    cold: f64,
    warm: f64,
    replay: f64,
    replay_sleeps: f64,
    replay_detail: Value,
}

impl Run {
    fn floor(&self) -> f64 {
        self.floor_tls + self.floor_load + self.floor_containers
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    require_root()?;
    let replay_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("replay/pilot-post-install.sh");
    ensure!(
        replay_script.is_file(),
        "{} is missing",
        replay_script.display()
    );
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let r =
            bench_one(&replay_script).with_context(|| format!("run {} of {}", i + 1, args.runs))?;
        println!(
            "run {}/{} ({}): cold up {:.3}s; floor {:.3}s (TLS restart+ready {:.3}s, image load \
             {:.3}s, containers {:.3}s); warm up {:.3}s; Pilot replay {:.3}s (of which fixed \
             sleeps {:.3}s)",
            i + 1,
            args.runs,
            r.vm,
            r.cold,
            r.floor(),
            r.floor_tls,
            r.floor_load,
            r.floor_containers,
            r.warm,
            r.replay,
            r.replay_sleeps
        );
        runs.push(r);
    }

    let col = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> { runs.iter().map(f).collect() };
    let rows: Vec<(&str, &str, Vec<f64>)> = vec![
        (
            "cold_up",
            "cold converge: pilot-agent up (s)",
            col(&|r| r.cold),
        ),
        (
            "floor",
            "floor: TLS restart + containers (s)",
            col(&Run::floor),
        ),
        (
            "floor_tls",
            "  dockerd restart + TLS ready (s)",
            col(&|r| r.floor_tls),
        ),
        (
            "floor_image_load",
            "  image load (s)",
            col(&|r| r.floor_load),
        ),
        (
            "floor_containers",
            "  containers by hand (s)",
            col(&|r| r.floor_containers),
        ),
        (
            "cold_over_floor",
            "cold / floor",
            col(&|r| r.cold / r.floor()),
        ),
        (
            "cold_minus_floor",
            "cold - floor (s)",
            col(&|r| r.cold - r.floor()),
        ),
        ("pilot_replay", "Pilot replay (s)", col(&|r| r.replay)),
        (
            "pilot_replay_fixed_sleeps",
            "  of which fixed sleeps (s)",
            col(&|r| r.replay_sleeps),
        ),
        (
            "replay_over_cold",
            "Pilot replay / cold",
            col(&|r| r.replay / r.cold),
        ),
        (
            "replay_without_sleeps_over_cold",
            "(replay - its sleeps) / cold",
            col(&|r| (r.replay - r.replay_sleeps) / r.cold),
        ),
        (
            "warm_up",
            "warm re-run: pilot-agent up (s)",
            col(&|r| r.warm),
        ),
    ];
    println!();
    println!(
        "{:<38} {:>9} {:>9} {:>9}   (n = {})",
        "",
        "min",
        "median",
        "max",
        runs.len()
    );
    let mut summary = serde_json::Map::new();
    for (key, name, v) in &rows {
        let s = stats(v);
        println!(
            "{name:<38} {:>9.3} {:>9.3} {:>9.3}",
            s["min"].as_f64().unwrap_or_default(),
            s["median"].as_f64().unwrap_or_default(),
            s["max"].as_f64().unwrap_or_default()
        );
        summary.insert(key.to_string(), s);
    }

    let mut report = json!({
        "benchmark": "bench",
        "runs": runs.len(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "units": "seconds unless a ratio",
        "definitions": {
            "cold_up": "wall time of `pilot-agent up` on a fresh simulated VM (Waypoint stand-in \
                        baked as a tarball, one runner, no database) until it exits 0",
            "floor": "the same VM by hand: dockerd restarted with an equivalent mutual-TLS \
                      daemon.json until 2376 answers /version over mutual TLS, plus docker CLI \
                      image load, network, volume, server until HTTPS, bootstrap, token, runner",
            "pilot_replay": "tests/e2e/replay/pilot-post-install.sh on the same VM reset to cold: \
                             the original Pilot's daemon.json (plain tcp://0.0.0.0:2375), docker \
                             restart, the CLI's 30 s wait, `waypoint install` (5 s kludge sleep, \
                             connect retry loop, bootstrap, runner, adoption), token fetch, the \
                             CLI's two 2 s waits",
            "warm_up": "wall time of a second `pilot-agent up` (nothing to do)",
        },
        "summary": Value::Object(summary),
        "per_run": runs.iter().map(|r| json!({
            "vm": r.vm,
            "cold_up": r.cold,
            "floor_tls": r.floor_tls,
            "floor_image_load": r.floor_load,
            "floor_containers": r.floor_containers,
            "warm_up": r.warm,
            "pilot_replay": r.replay,
            "pilot_replay_fixed_sleeps": r.replay_sleeps,
            "pilot_replay_detail": r.replay_detail,
        })).collect::<Vec<_>>(),
    });
    if let Some(p) = &args.service_json {
        match fs::read(p) {
            Ok(bytes) => {
                report["service"] = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not JSON", p.display()))?;
                println!("\nservice figures merged from {}", p.display());
            }
            Err(e) => println!("\nno service figures ({}: {e})", p.display()),
        }
    }
    pilot_e2e::write_json_report(&args.out, &report)?;
    println!("JSON: {}", args.out.display());
    Ok(())
}

fn bench_one(replay_script: &Path) -> Result<Run> {
    let stack = Stack::start(false, 1)?;
    let vm = &stack.vm;
    let original = fs::read(vm.daemon_json())?;
    let tarball = stack.images.join("waypoint.tar");

    // The floor, by hand; each part leaves the VM as it found it.
    let (floor_tls, _) = docker_tls_floor(vm)?;
    let (floor_load, floor_containers) = container_floor(vm, &tarball, IMAGE)?;

    let cold = stack.agent.up_ok(vm)?;
    stack.check_containers()?;
    let warm = stack.agent.up_ok(vm)?;

    // The original Pilot on the same host, from cold.
    stack.reset_cold(&original)?;
    let out = Command::new("bash")
        .arg(replay_script)
        .env("DOCKER_HOST", vm.docker_host())
        .env("DOCKER_CONFIG", vm.dir().join("docker-cli-replay"))
        .env("PILOT_DAEMON_JSON", vm.daemon_json())
        .env(
            "PILOT_DOCKER_RESTART",
            format!("{} restart", vm.dockerd_ctl().display()),
        )
        .env("PILOT_IMAGE", IMAGE)
        .env("PILOT_IMAGE_TAR", &tarball)
        .env("PILOT_VM_NETNS", vm.netns_path())
        .env("PILOT_VM_ADDR", vm.addr().to_string())
        .output()
        .context("cannot run the Pilot replay")?;
    ensure!(
        out.status.success(),
        "the Pilot replay failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let detail: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("the replay printed no JSON: {stdout}"))?;
    let replay = detail["total_s"].as_f64().context("replay total_s")?;
    let replay_sleeps = detail["fixed_sleeps_s"]
        .as_f64()
        .context("replay fixed_sleeps_s")?;
    let name = vm.name().to_string();
    stack.cleanup()?;
    Ok(Run {
        vm: name,
        floor_tls: floor_tls.as_secs_f64(),
        floor_load: floor_load.as_secs_f64(),
        floor_containers: floor_containers.as_secs_f64(),
        cold: secs(cold),
        warm: secs(warm),
        replay,
        replay_sleeps,
        replay_detail: detail,
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
