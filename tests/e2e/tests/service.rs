//! pilot-agent as a service, end to end in simulated VMs with a real
//! sshd (key authentication, root only) that an operator in the outside namespace logs in to.
//!
//! - `operator_reads_status_over_ssh` (converge core only, `up`):
//!   1. `ssh root@VM pilot-agent status` (and `--json`) before the agent ever ran: exit 1 and
//!      a plain "has not run"; the session really is inside the VM (its hostname);
//!   2. while `up` is held in its dockerd restart (the service manager's restart command waits
//!      for a gate file the test creates), `status` says `running`, and `status --wait
//!      --timeout 5` ends after 5 s (not before, and not much later) with exit 1 and a
//!      time-out note;
//!   3. after `up`: `status` exits 0 and its table shows the header and one row per step with
//!      the state from the JSON; `status --json` carries schema, status, condition, command,
//!      pid, version and per step name, state, detail and RFC 3339 start/finish; `--long` adds
//!      certificates and host figures; no output holds private key material.
//! - `status_history_shows_each_up_slowest_step_first` (converge core only, no sshd: the
//!   fastest VM that runs `up`): two `up`s, then `pilot-agent status --history --json` shows
//!   both passes oldest first (`up`, healthy, RFC 3339 times, time since power-on growing,
//!   a duration within the measured one), each with every step of status.json, converged,
//!   with its duration and no detail; the newest pass's durations are status.json's;
//!   `--limit 1` gives the newest; the text form has a block per pass whose first step line
//!   is that pass's slowest step, then slower to faster.
//! - `run_serves_endpoint_and_repairs` (Waypoint stand-in, PostgreSQL, `endpoint:` and
//!   `service:` sections, `pilot-agent run` as a child):
//!   1. `ssh root@VM pilot-agent status --json` shows the `run` object (mode, pid, passes);
//!   2. the endpoint at the VM's address from the outside namespace, verified against the
//!      agent CA (a foreign CA fails the handshake): `/healthz` without a token carries only
//!      status and condition; `/v1/status` matches `status --json`; `/v1/credentials` gives a
//!      database login that works (psql in the VM) and a Waypoint token that the stand-in
//!      server accepts (`GET /v1/whoami`, while a wrong token gets 401 there); `/metrics`;
//!   3. 1,000 requests with missing, wrong or malformed tokens all get 401 (with
//!      `WWW-Authenticate: Bearer`) or 429 (with `Retry-After`); both counts are printed, at
//!      most `rate_limit.failures` are 401, and then even the right token gets 429 from that
//!      source, while loopback in the VM is served; once the window passes the right token
//!      works again from outside; the agent logged the failures with the source address;
//!   4. `docker kill waypoint-server`: `run` starts it again and `/v1/status` shows the repair
//!      (`run.repairs` grows); a restart of the VM's dockerd: `run` reconnects, the
//!      containers run again and `run.repairs` grows again;
//!   5. no secret value (database and admin passwords, Waypoint bootstrap and runner tokens,
//!      the endpoint token and its hash, private key material) appears in the agent's log,
//!      status.json, any `status` output or any endpoint answer but `/v1/credentials`;
//!   6. SIGTERM: `run` exits 0.
//! - `collect_logs_holds_every_part_and_no_secret` (the same host, one `up`, no sshd): the
//!   host's secrets (bootstrap and runner tokens, database and admin passwords, endpoint token
//!   and its hash, the server key) are planted where `collect-logs` reads: the log (stdout and
//!   stderr, the bootstrap token split over two lines) and environment of a container labelled
//!   as the agent's, a step detail of status.json, a label in daemon.json; the grep is shown
//!   to find them there. `pilot-agent collect-logs --output FILE` exits 0, prints the path,
//!   writes it 0600; extracted, every part is there (status text and JSON, journal, each
//!   managed container's log and inspect, the agent's nftables table alone, daemon.json,
//!   versions, certificates) and listed in the MANIFEST, which counts each kind's
//!   redactions; no file of it holds any secret value or a PEM private key header.
//!
//! Needs root and a machine prepared by scripts/setup.sh (openssh-server among others);
//! without them every test FAILS. sshd needs /run/sshd, which the harness creates if missing.
//! Run: `cargo build --release --workspace && cargo nextest run --release -p pilot-e2e --test
//! service` (`--no-capture` shows the figures).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_e2e::agent::{
    Agent, ENDPOINT_PORT, EndpointToken, HttpResponse, HttpsClient, RateLimit, RunningAgent,
    sha256_hex,
};
use pilot_e2e::stack::RunHost;
use pilot_e2e::{foreign_ca, phase, poll, start_operator_sshd};
use pilot_harness::{Postgres, Sshd, Vm, VmOptions, leftovers, require_root};
use serde_json::Value;

/// `endpoint.rate_limit` in the run test: short window, so the test can see it pass.
const RL_FAILURES: u32 = 10;
const RL_WINDOW_SECS: u64 = 5;
/// How many unauthenticated requests the flood sends.
const FLOOD: usize = 1000;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Replaces the service manager's restart command by one that waits until `gate` exists
/// (bounded, 120 s) and then runs `dockerd-ctl restart`: a dockerd restart the test holds.
fn gate_restarts(vm: &Vm, agent: &Agent, gate: &Path) -> Result<()> {
    let script = vm.dir().join("gated-restart");
    fs::write(
        &script,
        "#!/bin/sh\n\
         # Holds dockerd's restart until the test creates the gate file (at most 120 s).\n\
         gate=$1; shift\n\
         i=0\n\
         while [ ! -e \"$gate\" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n\
         exec \"$@\"\n",
    )?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    let q = |p: &Path| Value::String(p.display().to_string()).to_string();
    let old = format!("restart_command: [{}, restart]", q(&vm.dockerd_ctl()));
    let new = format!(
        "restart_command: [{}, {}, {}, restart]",
        q(&script),
        q(gate),
        q(&vm.dockerd_ctl())
    );
    let mut replaced = false;
    agent.edit_config(|t| {
        replaced = t.contains(&old);
        t.replace(&old, &new)
    })?;
    ensure!(replaced, "the agent configuration has no `{old}`");
    Ok(())
}

fn step_names(status: &Value) -> Vec<String> {
    status["steps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `t` parsed as an RFC 3339 time, or None: times are compared as instants, never as text.
fn rfc3339(t: &Value) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(t.as_str()?, &time::format_description::well_known::Rfc3339).ok()
}

/// Whether `t` is an RFC 3339 time (`2026-11-22T05:48:40.123Z`).
fn is_rfc3339(t: &Value) -> bool {
    rfc3339(t).is_some()
}

/// Checks the fields of `status --json` of a finished, healthy run by `command`.
fn check_status_json(v: &Value, command: &str) -> Result<()> {
    ensure!(v["schema"] == 1, "schema: {v}");
    ensure!(v["status"] == "done", "status: {v}");
    ensure!(v["condition"] == "healthy", "condition: {v}");
    ensure!(v["command"] == command, "command: {v}");
    ensure!(v["pid"].as_u64().is_some_and(|p| p > 0), "pid: {v}");
    ensure!(
        v["version"].as_str().is_some_and(|s| !s.is_empty()),
        "version: {v}"
    );
    ensure!(is_rfc3339(&v["started_at"]), "started_at: {v}");
    ensure!(is_rfc3339(&v["finished_at"]), "finished_at: {v}");
    let steps = v["steps"].as_array().context("no steps array")?;
    ensure!(!steps.is_empty(), "no steps: {v}");
    for s in steps {
        ensure!(s["name"].as_str().is_some(), "step without name: {s}");
        ensure!(
            matches!(s["state"].as_str(), Some("ok" | "changed")),
            "step not converged: {s}"
        );
        ensure!(s["detail"].as_str().is_some(), "step without detail: {s}");
        ensure!(
            is_rfc3339(&s["started_at"]) && is_rfc3339(&s["finished_at"]),
            "step times: {s}"
        );
        ensure!(
            rfc3339(&s["started_at"]) <= rfc3339(&s["finished_at"]),
            "step finished before it started: {s}"
        );
    }
    for core in ["firewall", "pki", "docker-tls"] {
        ensure!(
            step_names(v).iter().any(|n| n == core),
            "no {core} step: {v}"
        );
    }
    Ok(())
}

/// Checks the plain `status` table against the JSON of the same status.
fn check_status_table(table: &str, v: &Value) -> Result<()> {
    let field = |k: &str| {
        table.lines().find_map(|l| {
            l.strip_prefix(&format!("{k}:"))
                .map(|r| r.trim().to_string())
        })
    };
    ensure!(
        field("status").as_deref() == v["status"].as_str(),
        "table status vs JSON {}:\n{table}",
        v["status"]
    );
    ensure!(
        field("condition").as_deref() == v["condition"].as_str(),
        "table condition vs JSON {}:\n{table}",
        v["condition"]
    );
    let cmd = field("command").unwrap_or_default();
    ensure!(
        cmd.contains(&format!("pid {}", v["pid"])),
        "table command line lacks the pid:\n{table}"
    );
    let header = table
        .lines()
        .position(|l| l.starts_with("STEP") && l.contains("STATE") && l.contains("DETAIL"))
        .with_context(|| format!("no STEP/STATE/DETAIL header:\n{table}"))?;
    let rows: Vec<&str> = table.lines().skip(header + 1).collect();
    for s in v["steps"].as_array().context("no steps")? {
        let name = s["name"].as_str().unwrap_or_default();
        let state = s["state"].as_str().unwrap_or_default();
        ensure!(
            rows.iter().any(|r| {
                let mut w = r.split_whitespace();
                w.next() == Some(name) && w.next() == Some(state)
            }),
            "no row `{name} {state}` in the table:\n{table}"
        );
    }
    Ok(())
}

/// The base64 lines of every private key under `dir` (recursively): if one shows up in an
/// output, key material leaked.
fn private_key_lines(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let text = fs::read_to_string(&p).unwrap_or_default();
            if !text.contains("PRIVATE KEY-----") {
                continue;
            }
            for l in text
                .lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 24)
            {
                out.push((format!("key line of {}", p.display()), l.to_string()));
            }
        }
    }
    ensure!(
        !out.is_empty(),
        "no private keys found under {}",
        dir.display()
    );
    Ok(out)
}

/// Fails naming every (secret, place) pair where a secret value occurs.
fn assert_no_secrets(secrets: &[(String, String)], places: &[(String, String)]) -> Result<()> {
    let mut leaks = Vec::new();
    for (what, value) in secrets {
        ensure!(value.len() >= 8, "secret {what} is too short to grep for");
        for (place, text) in places {
            if text.contains(value.as_str()) {
                leaks.push(format!("{what} in {place}"));
            }
        }
        for (place, text) in places {
            if text.contains("PRIVATE KEY") {
                leaks.push(format!("a PEM private key header in {place}"));
            }
        }
    }
    leaks.dedup();
    ensure!(leaks.is_empty(), "secrets leaked: {leaks:#?}");
    Ok(())
}

/// Stops sshd, removes the VM and checks that nothing of it is left on the machine.
fn cleanup_checked(sshd: Sshd, vm: Vm) -> Result<()> {
    sshd.stop()?;
    let name = vm.name().to_string();
    vm.cleanup()?;
    let left = leftovers(&[name]);
    ensure!(left.is_empty(), "leftovers: {left:#?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// `status` over SSH

#[test]
fn operator_reads_status_over_ssh() -> Result<()> {
    let mut s = phase("setup", setup_status_vm)?;
    phase("status before any run", || status_before_any_run(&s))?;
    let mut up = phase("status while up is held", || {
        status_while_up_is_held(&mut s)
    })?;
    phase("status after up", || status_after_up(&mut s, &mut up))?;
    phase("no key material in any output", || {
        s.outputs.push(("up's log".into(), up.log()?));
        s.outputs.push((
            "status.json".into(),
            fs::read_to_string(s.agent.status_path())?,
        ));
        assert_no_secrets(&private_key_lines(&s.agent.pki_dir())?, &s.outputs)
    })?;
    drop(up);
    cleanup_checked(s.sshd, s.vm)
}

/// A VM (converge core only) whose dockerd restarts wait for `gate`, sshd for the operator,
/// and every output collected for the secret grep.
struct StatusVm {
    agent: Agent,
    gate: PathBuf,
    outputs: Vec<(String, String)>,
    sshd: Sshd,
    vm: Vm,
}

fn setup_status_vm() -> Result<StatusVm> {
    require_root()?;
    let vm = Vm::start(VmOptions::default())?;
    let agent = Agent::new(&vm)?;
    let gate = vm.dir().join("restart-gate");
    gate_restarts(&vm, &agent, &gate)?;
    let sshd = start_operator_sshd(&vm, &agent)?;
    Ok(StatusVm {
        agent,
        gate,
        outputs: Vec::new(),
        sshd,
        vm,
    })
}

/// (1) Never ran: a plain answer, exit 1.
fn status_before_any_run(s: &StatusVm) -> Result<()> {
    let out = s.sshd.ssh_output(&s.vm, "pilot-agent status")?;
    ensure!(
        out.status.code() == Some(1)
            && stdout(&out).contains("not-started")
            && stdout(&out).contains("has not run"),
        "status before any run: {} {}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    let out = s.sshd.ssh_output(&s.vm, "pilot-agent status --json")?;
    let v: Value = serde_json::from_str(&stdout(&out)).context("status --json")?;
    ensure!(
        out.status.code() == Some(1) && v["status"] == "not-started" && v["condition"] == "error",
        "status --json before any run: {v}"
    );
    Ok(())
}

/// (2) `up` held in dockerd's restart: the host is still converging; returns the held `up`.
fn status_while_up_is_held(s: &mut StatusVm) -> Result<RunningAgent> {
    let (vm, agent, sshd) = (&s.vm, &s.agent, &s.sshd);
    let log = vm.dir().join("agent-up.log");
    let mut up = agent.spawn_run_args(vm, &["up"], &log)?;
    poll(
        Duration::from_secs(60),
        "up to reach the docker-tls step",
        || {
            if let Ok(Some(st)) = up.try_exit() {
                return Err(format!("up exited early ({st}): {}", up.log_tail(20)));
            }
            let s = agent.status_json().map_err(|e| format!("{e:#}"))?;
            let running = s["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|st| st["name"] == "docker-tls" && st["state"] == "running");
            if running {
                Ok(Some(()))
            } else {
                Err(s.to_string())
            }
        },
    )?;
    let out = sshd.ssh_output(vm, "pilot-agent status")?;
    ensure!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("status:") && l.contains("running")),
        "status during up: {}{}",
        stdout(&out),
        stderr(&out)
    );
    s.outputs
        .push(("status during up".into(), stdout(&out) + &stderr(&out)));
    let t0 = Instant::now();
    let out = sshd.ssh_output(vm, "pilot-agent status --wait --timeout 5")?;
    let waited = t0.elapsed();
    eprintln!(
        "service: `ssh root@VM pilot-agent status --wait --timeout 5` on a converging host \
         ended after {waited:.2?} with {}",
        out.status
    );
    ensure!(
        out.status.code() == Some(1) && stderr(&out).contains("timed out"),
        "status --wait --timeout 5 while converging: {} {}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    ensure!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(8),
        "status --wait --timeout 5 took {waited:?}"
    );
    ensure!(up.try_exit()?.is_none(), "up ended while held");
    s.outputs
        .push(("status --wait".into(), stdout(&out) + &stderr(&out)));
    Ok(up)
}

/// (3) Let the restart go; `up` converges; `status` (table, `--json`, `--long`, `--long
/// --json`) shows it.
fn status_after_up(s: &mut StatusVm, up: &mut RunningAgent) -> Result<()> {
    let (vm, sshd) = (&s.vm, &s.sshd);
    fs::write(&s.gate, "")?;
    let st = poll(Duration::from_secs(90), "up to finish", || {
        up.try_exit().map_err(|e| format!("{e:#}"))
    })?;
    ensure!(st.success(), "up exited {st}:\n{}", up.log_tail(40));
    let out = sshd.ssh_output(vm, "pilot-agent status --wait --timeout 30")?;
    ensure!(
        out.status.code() == Some(0),
        "status after up: {} {}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    let out_json = sshd.ssh_output(vm, "pilot-agent status --json")?;
    ensure!(
        out_json.status.code() == Some(0),
        "status --json: {}",
        stderr(&out_json)
    );
    let v: Value = serde_json::from_str(&stdout(&out_json)).context("status --json")?;
    check_status_json(&v, "up")?;
    let out_table = sshd.ssh_output(vm, "pilot-agent status")?;
    ensure!(
        out_table.status.code() == Some(0),
        "status: {}",
        stderr(&out_table)
    );
    check_status_table(&stdout(&out_table), &v)?;
    let out_long = sshd.ssh_output(vm, "pilot-agent status --long")?;
    ensure!(
        out_long.status.code() == Some(0),
        "status --long: {}",
        stderr(&out_long)
    );
    let long = stdout(&out_long);
    for needle in [
        "certificates:",
        "host:",
        "load:",
        "memory:",
        "disk:",
        "DURATION",
    ] {
        ensure!(
            long.contains(needle),
            "status --long lacks {needle:?}:\n{long}"
        );
    }
    let out_long_json = sshd.ssh_output(vm, "pilot-agent status --long --json")?;
    let lj: Value =
        serde_json::from_str(&stdout(&out_long_json)).context("status --long --json")?;
    ensure!(
        lj["certificates"].as_array().is_some_and(|c| !c.is_empty())
            && lj["host"]["memory_total_bytes"]
                .as_u64()
                .is_some_and(|m| m > 0),
        "status --long --json: {lj}"
    );
    eprintln!(
        "service: `ssh root@VM pilot-agent status` after up:\n{}",
        stdout(&out_table)
    );
    for (name, o) in [
        ("status", &out_table),
        ("status --json", &out_json),
        ("status --long", &out_long),
        ("status --long --json", &out_long_json),
    ] {
        s.outputs.push((name.to_string(), stdout(o) + &stderr(o)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// `status --history`

#[test]
fn status_history_shows_each_up_slowest_step_first() -> Result<()> {
    let vm = pilot_e2e::start_vm("service")?;
    let agent = Agent::new(&vm)?;
    let took = phase("two ups", || Ok([agent.up_ok(&vm)?, agent.up_ok(&vm)?]))?;
    let passes = phase("status --history --json", || {
        history_json(&vm, &agent, took)
    })?;
    phase("status --history", || history_text(&vm, &agent, &passes))?;
    let name = vm.name().to_string();
    vm.cleanup()?;
    let left = leftovers(&[name]);
    ensure!(left.is_empty(), "leftovers: {left:#?}");
    Ok(())
}

/// (history 1) Both passes, oldest first, with their times and every step's name, state and
/// duration; the second pass's durations are those of status.json's steps. Returns the
/// passes.
fn history_json(vm: &Vm, agent: &Agent, took: [Duration; 2]) -> Result<Vec<Value>> {
    let (out, _) = agent.run(vm, ["status", "--history", "--json"])?;
    ensure!(
        out.status.code() == Some(0),
        "status --history --json: {} {}",
        out.status,
        stderr(&out)
    );
    let v: Value = serde_json::from_str(&stdout(&out)).context("status --history --json")?;
    let passes = v["passes"].as_array().cloned().unwrap_or_default();
    ensure!(
        v["schema"] == 1 && v["recorded"] == 2 && v["skipped_lines"] == 0 && passes.len() == 2,
        "two passes recorded: {v:#}"
    );
    let status = agent.status_json()?;
    let names = step_names(&status);
    for (i, (pass, took)) in passes.iter().zip(took).enumerate() {
        let ms = pass["duration_ms"].as_u64().unwrap_or(u64::MAX);
        ensure!(
            pass["command"] == "up"
                && pass["condition"] == "healthy"
                && pass.get("trigger").is_none()
                && is_rfc3339(&pass["started_at"])
                && is_rfc3339(&pass["finished_at"])
                && pass["since_boot_ms"].as_u64().is_some_and(|b| b > 0)
                && u128::from(ms) <= took.as_millis(),
            "pass {i} (up took {took:?}): {pass:#}"
        );
        let steps = pass["steps"].as_array().cloned().unwrap_or_default();
        ensure!(
            step_names(pass) == names
                && steps.iter().all(|s| {
                    (s["state"] == "ok" || s["state"] == "changed")
                        && s["duration_ms"].as_u64().is_some()
                        && s.get("detail").is_none()
                }),
            "pass {i}: the steps of status.json ({names:?}), converged, with durations and \
             no detail: {pass:#}"
        );
    }
    ensure!(
        rfc3339(&passes[0]["started_at"]) < rfc3339(&passes[1]["started_at"])
            && passes[0]["since_boot_ms"].as_u64() < passes[1]["since_boot_ms"].as_u64(),
        "oldest first: {passes:#?}"
    );
    ensure!(
        passes[0]["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["state"] == "changed"))
            && passes[1]["steps"]
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["state"] == "ok")),
        "the first up changed the host, the second nothing: {passes:#?}"
    );
    // The newest pass is the one status.json shows: the same durations.
    for (recorded, shown) in passes[1]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(status["steps"].as_array().into_iter().flatten())
    {
        let shown_ms = match (
            rfc3339(&shown["started_at"]),
            rfc3339(&shown["finished_at"]),
        ) {
            (Some(a), Some(b)) => (b - a).whole_milliseconds(),
            _ => bail!("status.json step without times: {shown}"),
        };
        ensure!(
            recorded["duration_ms"].as_u64().map(i128::from) == Some(shown_ms),
            "step {} took {shown_ms} ms in status.json: {recorded}",
            shown["name"]
        );
    }
    // --limit keeps the newest.
    let (out, _) = agent.run(vm, ["status", "--history", "--json", "--limit", "1"])?;
    let v: Value = serde_json::from_str(&stdout(&out)).context("--limit 1")?;
    ensure!(
        v["passes"].as_array().is_some_and(|p| p.len() == 1) && v["passes"][0] == passes[1],
        "--limit 1: {v:#}"
    );
    Ok(passes)
}

/// (history 2) The text form: a block per pass, oldest first, whose step lines run from the
/// slowest step (as the JSON says) down.
fn history_text(vm: &Vm, agent: &Agent, passes: &[Value]) -> Result<()> {
    let (out, _) = agent.run(vm, ["status", "--history"])?;
    let text = stdout(&out);
    ensure!(
        out.status.code() == Some(0) && text.starts_with("history:   2 of 2 recorded passes"),
        "status --history: {}\n{text}\n{}",
        out.status,
        stderr(&out)
    );
    eprintln!("service: `pilot-agent status --history` after two ups:\n{text}");
    // Each block: "pass:" line, header lines, then "  MS ms  NAME  STATE" lines.
    let mut blocks: Vec<Vec<(u64, String)>> = Vec::new();
    for line in text.lines() {
        if line.starts_with("pass:") {
            blocks.push(Vec::new());
        } else if let (Some(block), true) = (blocks.last_mut(), line.starts_with("  ")) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [ms, "ms", name, _state, ..] => block.push((ms.parse()?, name.to_string())),
                _ => bail!("not a step line: {line:?}\n{text}"),
            }
        }
    }
    ensure!(blocks.len() == 2, "two blocks:\n{text}");
    for (i, (block, pass)) in blocks.iter().zip(passes).enumerate() {
        let steps = pass["steps"].as_array().cloned().unwrap_or_default();
        let slowest = steps
            .iter()
            .filter_map(|s| s["duration_ms"].as_u64())
            .max()
            .unwrap_or_default();
        let slowest_names: Vec<&str> = steps
            .iter()
            .filter(|s| s["duration_ms"].as_u64() == Some(slowest))
            .filter_map(|s| s["name"].as_str())
            .collect();
        ensure!(
            block.len() == steps.len()
                && block.first().is_some_and(|(ms, name)| {
                    *ms == slowest && slowest_names.contains(&name.as_str())
                })
                && block.windows(2).all(|w| w[0].0 >= w[1].0),
            "pass {i}: the slowest step ({slowest_names:?}, {slowest} ms) first, then slower \
             to faster: {block:?}\n{text}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// `run`, the endpoint and repairs

/// The full host ([`RunHost`]: Waypoint stand-in, PostgreSQL, endpoint and service sections)
/// with sshd for the operator.
struct RunSetup {
    token: EndpointToken,
    agent: Agent,
    sshd: Sshd,
    pg: Postgres,
    vm: Vm,
}

fn run_setup() -> Result<RunSetup> {
    let RunHost {
        token,
        agent,
        pg,
        vm,
    } = RunHost::start(RateLimit {
        failures: RL_FAILURES,
        window_secs: RL_WINDOW_SECS,
    })?;
    let sshd = start_operator_sshd(&vm, &agent)?;
    Ok(RunSetup {
        token,
        agent,
        sshd,
        pg,
        vm,
    })
}

impl RunSetup {
    fn endpoint(&self) -> SocketAddr {
        SocketAddr::from((self.vm.addr(), ENDPOINT_PORT))
    }

    /// GET from the outside namespace.
    fn get_outside(
        &self,
        client: &HttpsClient,
        path: &str,
        auth: Option<&str>,
    ) -> Result<HttpResponse> {
        let addr = self.endpoint();
        self.vm
            .in_outside_ns(|| client.get(addr, path, auth, Duration::from_secs(5)))?
    }

    /// `/v1/status` with the right token from the VM's loopback (a source the flood does not
    /// rate limit).
    fn status_loopback(&self, client: &HttpsClient) -> Result<Value> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ENDPOINT_PORT));
        let token = self.token.token.clone();
        let r = self
            .vm
            .in_vm_ns(|| client.get_bearer(addr, "/v1/status", &token, Duration::from_secs(5)))??;
        ensure!(
            r.code == 200,
            "/v1/status from loopback: {} {}",
            r.code,
            r.body
        );
        r.json()
    }

    /// Whether container `name` runs, and its ID.
    fn container(&self, name: &str) -> Result<(bool, String)> {
        let out = self
            .vm
            .docker_ok(["inspect", "-f", "{{.State.Running}} {{.Id}}", name])?;
        let (running, id) = out.split_once(' ').unwrap_or(("", ""));
        Ok((running == "true", id.to_string()))
    }

    fn secret_file(&self, rel: &str) -> Result<String> {
        let p = self.agent.state_dir().join(rel);
        Ok(fs::read_to_string(&p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim()
            .to_string())
    }

    /// The `Authorization` header with the right token.
    fn bearer(&self) -> String {
        format!("Bearer {}", self.token.token)
    }
}

fn run_repairs(v: &Value) -> (u64, u64) {
    (
        v["run"]["repairs"].as_u64().unwrap_or(0),
        v["run"]["passes"].as_u64().unwrap_or(0),
    )
}

#[test]
fn run_serves_endpoint_and_repairs() -> Result<()> {
    let s = phase("setup", run_setup)?;
    let vm = &s.vm;
    let t0 = Instant::now();
    let mut run = s.agent.spawn_run(vm, &vm.dir().join("agent-run.log"))?;
    let mut outputs: Vec<(String, String)> = Vec::new();
    phase("first pass", || first_pass(&s, &mut run, t0))?;
    let ssh_json = phase("status over ssh", || status_over_ssh(&s, &mut outputs))?;
    let client = phase("endpoint verified against the agent CA", || {
        endpoint_verified(&s, &mut outputs)
    })?;
    phase("status and metrics over the endpoint", || {
        endpoint_status_and_metrics(&s, &client, &ssh_json, &mut outputs)
    })?;
    let creds = phase("credentials work", || credentials_work(&s, &client))?;
    phase("rate limit", || {
        rate_limit_engages(&s, &client, &run, &mut outputs)
    })?;
    let killed = phase("repair of a killed server", || {
        repair_killed_server(&s, &client)
    })?;
    phase("repair after dockerd's restart", || {
        repair_after_dockerd_restart(&s, &client, &mut run, killed, &mut outputs)
    })?;
    phase("no secret outside /v1/credentials", || {
        no_secret_leaks(&s, &run, &creds, &mut outputs)
    })?;
    phase("SIGTERM", || {
        // 6. SIGTERM: a clean exit.
        let pid = run.pid();
        let st = run.terminate(Duration::from_secs(20))?;
        ensure!(st.success(), "run (pid {pid}) exited {st} on SIGTERM");
        Ok(())
    })?;

    let RunSetup { sshd, pg, vm, .. } = s;
    pg.cleanup()?;
    cleanup_checked(sshd, vm)
}

/// The first pass: done, healthy, with the run object.
fn first_pass(s: &RunSetup, run: &mut RunningAgent, t0: Instant) -> Result<()> {
    let first = s.agent.wait_first_pass(
        run,
        Duration::from_secs(150),
        "run's first pass to converge",
    )?;
    eprintln!(
        "service: run's first pass converged after {:.2?}",
        t0.elapsed()
    );
    ensure!(
        first["run"]["mode"] == "run",
        "run object: {}",
        first["run"]
    );
    ensure!(
        first["run"]["pid"].as_u64() == Some(u64::from(run.pid())),
        "run.pid {} vs the agent's {}",
        first["run"]["pid"],
        run.pid()
    );
    Ok(())
}

/// (1) The operator over SSH: `status --json` with the run object, the table, `--long`;
/// returns the JSON.
fn status_over_ssh(s: &RunSetup, outputs: &mut Vec<(String, String)>) -> Result<Value> {
    let vm = &s.vm;
    let out = s.sshd.ssh_output(vm, "pilot-agent status --json")?;
    ensure!(
        out.status.code() == Some(0),
        "ssh status --json: {} {}",
        out.status,
        stderr(&out)
    );
    let ssh_json: Value = serde_json::from_str(&stdout(&out)).context("status --json over ssh")?;
    check_status_json(&ssh_json, "run")?;
    ensure!(
        ssh_json["run"]["mode"] == "run" && ssh_json["run"]["passes"].as_u64().is_some(),
        "status --json has no run object: {ssh_json}"
    );
    outputs.push(("ssh status --json".into(), stdout(&out) + &stderr(&out)));
    let out = s.sshd.ssh_output(vm, "pilot-agent status")?;
    ensure!(
        out.status.code() == Some(0),
        "ssh status: {} {}",
        out.status,
        stderr(&out)
    );
    check_status_table(&stdout(&out), &ssh_json)?;
    eprintln!(
        "service: `ssh root@VM pilot-agent status` under run:\n{}",
        stdout(&out)
    );
    outputs.push(("ssh status".into(), stdout(&out) + &stderr(&out)));
    let out = s.sshd.ssh_output(vm, "pilot-agent status --long")?;
    outputs.push(("ssh status --long".into(), stdout(&out) + &stderr(&out)));
    Ok(ssh_json)
}

/// (2) The endpoint, verified against the agent CA at the VM's address (a foreign CA fails the
/// handshake); `/healthz` without a token carries only status and condition. Returns a
/// client trusting the agent CA.
fn endpoint_verified(s: &RunSetup, outputs: &mut Vec<(String, String)>) -> Result<HttpsClient> {
    let vm = &s.vm;
    vm.wait_tcp_from_outside(ENDPOINT_PORT, Duration::from_secs(30))?;
    let client = HttpsClient::new(&s.agent.ca_cert())?;
    let foreign = HttpsClient::new(&foreign_ca(&vm.dir().join("foreign-ca"))?)?;
    match s.get_outside(&foreign, "/healthz", None) {
        Ok(r) => bail!(
            "a client trusting a foreign CA got an answer: {} {}",
            r.code,
            r.body
        ),
        Err(e) => {
            let e = format!("{e:#}");
            ensure!(
                e.contains("certificate") || e.contains("Certificate"),
                "foreign CA failed for another reason: {e}"
            );
        }
    }
    let health = s.get_outside(&client, "/healthz", None)?;
    let hv = health.json()?;
    ensure!(
        health.code == 200 && hv["status"] == "done" && hv["condition"] == "healthy",
        "/healthz: {} {}",
        health.code,
        health.body
    );
    let extra: Vec<&String> = hv
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| *k != "status" && *k != "condition")
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        extra.is_empty(),
        "/healthz carries more than status and condition: {extra:?}"
    );
    outputs.push(("/healthz".into(), health.body.clone()));
    Ok(client)
}

/// (2) `/v1/status` matches `status --json`; `/metrics`; `/v1/credentials` needs the token.
fn endpoint_status_and_metrics(
    s: &RunSetup,
    client: &HttpsClient,
    ssh_json: &Value,
    outputs: &mut Vec<(String, String)>,
) -> Result<()> {
    let bearer = s.bearer();
    let st = s.get_outside(client, "/v1/status", Some(&bearer))?;
    ensure!(st.code == 200, "/v1/status: {} {}", st.code, st.body);
    let sv = st.json()?;
    ensure!(
        sv["status"] == ssh_json["status"]
            && sv["condition"] == ssh_json["condition"]
            && step_names(&sv) == step_names(ssh_json)
            && sv["run"]["mode"] == "run",
        "/v1/status {sv} differs from `status --json` {ssh_json}"
    );
    outputs.push(("/v1/status".into(), st.body.clone()));
    let metrics = s.get_outside(client, "/metrics", Some(&bearer))?;
    ensure!(
        metrics.code == 200 && metrics.body.contains("# TYPE"),
        "/metrics: {} {}",
        metrics.code,
        metrics.body
    );
    outputs.push(("/metrics".into(), metrics.body.clone()));
    let unauth = s.get_outside(client, "/v1/credentials", None)?;
    ensure!(
        unauth.code == 401,
        "/v1/credentials without a token: {}",
        unauth.code
    );
    Ok(())
}

/// What `/v1/credentials` answered (the one answer that must carry secrets).
struct Credentials {
    body: String,
    db_pw: String,
    wp_token: String,
}

/// (2) `/v1/credentials` gives a database login that works (psql in the VM) and a Waypoint
/// token that the stand-in server accepts (`GET /v1/whoami`, while a wrong token gets 401).
fn credentials_work(s: &RunSetup, client: &HttpsClient) -> Result<Credentials> {
    let vm = &s.vm;
    let cr = s.get_outside(client, "/v1/credentials", Some(&s.bearer()))?;
    ensure!(cr.code == 200, "/v1/credentials: {} {}", cr.code, cr.body);
    let c = cr.json()?;
    let ca_text = fs::read_to_string(s.agent.ca_cert())?;
    ensure!(
        c["ca_pem"].as_str().map(str::trim) == Some(ca_text.trim()),
        "ca_pem is not the agent CA"
    );
    let db = &c["database"];
    let (db_host, db_port, db_name, db_user, db_pw) = (
        db["host"].as_str().context("database.host")?,
        db["port"].as_u64().context("database.port")?,
        db["name"].as_str().context("database.name")?,
        db["user"].as_str().context("database.user")?,
        db["password"].as_str().context("database.password")?,
    );
    ensure!(
        db_host == s.pg.addr().to_string() && db_port == u64::from(s.pg.port()),
        "database address {db_host}:{db_port}"
    );
    let login = vm
        .cmd("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            db_host,
            "-p",
            &db_port.to_string(),
            "-U",
            db_user,
            "-d",
            db_name,
        ])
        .args(["-c", "SELECT current_user"])
        .env("PGPASSWORD", db_pw)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()?;
    ensure!(
        login.status.success() && stdout(&login).trim() == db_user,
        "database login with the returned credentials: {}{}",
        stdout(&login),
        stderr(&login)
    );
    let wp_addr = c["waypoint"]["address"]
        .as_str()
        .context("waypoint.address")?;
    let wp_token = c["waypoint"]["token"].as_str().context("waypoint.token")?;
    ensure!(
        wp_addr == format!("{}:9701", vm.addr()),
        "waypoint.address {wp_addr}"
    );
    // As the Pilot CLI would: Waypoint verified with the CA the credentials carry
    // (`tls_skip_verify` false).
    ensure!(
        c["waypoint"]["tls_skip_verify"] == false,
        "waypoint.tls_skip_verify {}",
        c["waypoint"]["tls_skip_verify"]
    );
    let cli_ca = vm.dir().join("cli-ca.pem");
    fs::write(&cli_ca, c["ca_pem"].as_str().context("ca_pem")?)?;
    let whoami = |token: &str| -> Result<(String, String)> {
        let out = vm
            .outside_cmd("curl")
            .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
            .arg(&cli_ca)
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("https://{}:9702/v1/whoami", vm.addr()))
            .output()?;
        let text = stdout(&out);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        Ok((code.to_string(), body.to_string()))
    };
    let (code, body) = whoami(wp_token)?;
    ensure!(
        code == "200",
        "the stand-in rejects the returned token: {code} {body}"
    );
    let (code, _) = whoami("not-a-waypoint-token")?;
    ensure!(
        code == "401",
        "the stand-in accepts any token ({code}): the check proves nothing"
    );
    eprintln!("service: credentials work: psql login as {db_user}, Waypoint /v1/whoami: {body}");
    Ok(Credentials {
        body: cr.body.clone(),
        db_pw: db_pw.to_string(),
        wp_token: wp_token.to_string(),
    })
}

/// (3) The flood: missing, wrong and malformed tokens from one source get 401 (at most
/// `rate_limit.failures` of them) or 429; then even the right token gets 429 from there,
/// while loopback is served; once the window passes it works again; the log names the source.
fn rate_limit_engages(
    s: &RunSetup,
    client: &HttpsClient,
    run: &RunningAgent,
    outputs: &mut Vec<(String, String)>,
) -> Result<()> {
    let vm = &s.vm;
    let bearer = s.bearer();
    let wrong_last = {
        let mut t = s.token.token.clone();
        let last = if t.ends_with('0') { '1' } else { '0' };
        t.pop();
        t.push(last);
        t
    };
    let addr = s.endpoint();
    let t_flood = Instant::now();
    let answers: Vec<Result<HttpResponse>> = vm.in_outside_ns(|| {
        (0..FLOOD)
            .map(|i| {
                let auth = match i % 5 {
                    0 => None,
                    1 => Some(format!("Bearer wrong-token-{i}")),
                    2 => Some(format!("Bearer {wrong_last}")),
                    3 => Some("Bearer ".to_string()),
                    _ => Some(format!("Basic {}", s.token.token)),
                };
                let path = if i % 2 == 0 {
                    "/v1/credentials"
                } else {
                    "/v1/status"
                };
                client.get(addr, path, auth.as_deref(), Duration::from_secs(5))
            })
            .collect()
    })?;
    let flood_took = t_flood.elapsed();
    let (mut n401, mut n429, mut other) = (0usize, 0usize, Vec::new());
    for (i, a) in answers.iter().enumerate() {
        match a {
            Ok(r) if r.code == 401 => {
                ensure!(
                    r.header("www-authenticate")
                        .is_some_and(|h| h.starts_with("Bearer")),
                    "401 without WWW-Authenticate: Bearer: {r:?}"
                );
                n401 += 1;
            }
            Ok(r) if r.code == 429 => {
                ensure!(
                    r.header("retry-after").is_some(),
                    "429 without Retry-After: {r:?}"
                );
                n429 += 1;
            }
            Ok(r) => other.push(format!("#{i}: {} {}", r.code, r.body)),
            Err(e) => other.push(format!("#{i}: {e:#}")),
        }
        if let Ok(r) = a {
            outputs.push((format!("flood answer {i}"), r.body.clone()));
        }
    }
    eprintln!(
        "service: {FLOOD} requests with missing/wrong tokens in {flood_took:.2?}: {n401} x 401, \
         {n429} x 429, {} other (rate_limit failures {RL_FAILURES}, window {RL_WINDOW_SECS} s)",
        other.len()
    );
    ensure!(
        other.is_empty(),
        "answers other than 401/429: {:#?}",
        &other[..other.len().min(10)]
    );
    ensure!(
        n401 >= 1 && n401 <= RL_FAILURES as usize && n429 == FLOOD - n401,
        "the rate limit did not engage as configured: {n401} x 401, {n429} x 429"
    );
    let limited = s.get_outside(client, "/v1/status", Some(&bearer))?;
    ensure!(
        limited.code == 429,
        "the right token from a rate-limited source: {} (want 429)",
        limited.code
    );
    s.status_loopback(client)
        .context("loopback is limited with the outside source")?;
    let t_wait = Instant::now();
    poll(
        Duration::from_secs(RL_WINDOW_SECS * 4 + 10),
        "the rate limit window to pass",
        || match s.get_outside(client, "/v1/status", Some(&bearer)) {
            Ok(r) if r.code == 200 => Ok(Some(())),
            Ok(r) => Err(format!("{}", r.code)),
            Err(e) => Err(format!("{e:#}")),
        },
    )?;
    eprintln!(
        "service: the right token works again from outside {:.2?} after the flood ended",
        t_wait.elapsed()
    );
    let run_log = run.log()?;
    ensure!(
        run_log.contains(&vm.outside_addr().to_string()),
        "the agent's log does not name the failing source {}",
        vm.outside_addr()
    );
    Ok(())
}

/// (4) `docker kill waypoint-server`: `run` starts it again (the same container) and
/// `/v1/status` shows the repair; returns `run.repairs` and `run.passes` after it.
fn repair_killed_server(s: &RunSetup, client: &HttpsClient) -> Result<(u64, u64)> {
    let before = s.status_loopback(client)?;
    let (r0, p0) = run_repairs(&before);
    let (_, server_id) = s.container("waypoint-server")?;
    s.vm.docker_ok(["kill", "waypoint-server"])?;
    let t_kill = Instant::now();
    let after_kill = poll(
        Duration::from_secs(60),
        "run to repair the killed server",
        || {
            let v = s.status_loopback(client).map_err(|e| format!("{e:#}"))?;
            let (running, _) = s
                .container("waypoint-server")
                .map_err(|e| format!("{e:#}"))?;
            if running && run_repairs(&v).0 > r0 {
                Ok(Some(v))
            } else {
                Err(format!("server running {running}; run {}", v["run"]))
            }
        },
    )?;
    let (r1, p1) = run_repairs(&after_kill);
    eprintln!(
        "service: killed waypoint-server repaired in {:.2?}: repairs {r0} -> {r1}, passes \
         {p0} -> {p1}, last trigger {}",
        t_kill.elapsed(),
        after_kill["run"]["last_trigger"]
    );
    ensure!(
        is_rfc3339(&after_kill["run"]["last_repair_at"]),
        "{}",
        after_kill["run"]
    );
    ensure!(
        s.container("waypoint-server")?.1 == server_id,
        "the killed server was replaced instead of started"
    );
    Ok((r1, p1))
}

/// (4) A restart of the VM's dockerd: `run` reconnects, the containers run again and the
/// status shows a repair or a reconnection pass. dockerd brings the `unless-stopped`
/// containers back itself when it restarts, so whether `run` has anything left to change
/// depends on who is first. Either counts: a repair by `run`, or `run` reconnecting to the
/// new dockerd and verifying the whole host (a pass triggered by `docker-reconnected`, which
/// only a broken event stream produces).
fn repair_after_dockerd_restart(
    s: &RunSetup,
    client: &HttpsClient,
    run: &mut RunningAgent,
    (r1, p1): (u64, u64),
    outputs: &mut Vec<(String, String)>,
) -> Result<()> {
    let vm = &s.vm;
    let p_pre = run_repairs(&s.status_loopback(client)?).1;
    let restart = vm.restart_dockerd()?;
    let t_restart = Instant::now();
    let after_restart = poll(
        Duration::from_secs(90),
        "run to repair after dockerd's restart",
        || {
            run.ensure_running().map_err(|e| format!("{e:#}"))?;
            let v = s.status_loopback(client).map_err(|e| format!("{e:#}"))?;
            let server = s
                .container("waypoint-server")
                .map_err(|e| format!("{e:#}"))?
                .0;
            let runner = s
                .container("waypoint-runner-1")
                .map_err(|e| format!("{e:#}"))?
                .0;
            let (r, p) = run_repairs(&v);
            let reconnected = v["run"]["last_trigger"]
                .as_str()
                .is_some_and(|t| t.contains("docker-reconnected"));
            if server
                && runner
                && p > p_pre.max(p1)
                && (r > r1 || reconnected)
                && v["condition"] == "healthy"
            {
                Ok(Some(v))
            } else {
                Err(format!(
                    "server {server}, runner {runner}; run {}",
                    v["run"]
                ))
            }
        },
    )?;
    let (r2, p2) = run_repairs(&after_restart);
    eprintln!(
        "service: dockerd restarted ({restart:.2?}); repaired {:.2?} later: repairs {r1} -> \
         {r2}, passes {p1} -> {p2}, last trigger {}",
        t_restart.elapsed(),
        after_restart["run"]["last_trigger"]
    );
    outputs.push(("/v1/status after repairs".into(), after_restart.to_string()));
    let out = s.sshd.ssh_output(vm, "pilot-agent status --json")?;
    outputs.push((
        "ssh status --json after repairs".into(),
        stdout(&out) + &stderr(&out),
    ));
    let v: Value = serde_json::from_str(&stdout(&out)).context("status --json")?;
    ensure!(
        run_repairs(&v).0 >= r2,
        "status --json lags /v1/status: {}",
        v["run"]
    );
    Ok(())
}

/// (5) No secret anywhere but /v1/credentials: database and admin passwords, Waypoint
/// bootstrap and runner tokens, the endpoint token and its hash, private key material.
fn no_secret_leaks(
    s: &RunSetup,
    run: &RunningAgent,
    creds: &Credentials,
    outputs: &mut Vec<(String, String)>,
) -> Result<()> {
    let mut secrets = vec![
        ("database password".to_string(), creds.db_pw.clone()),
        ("admin password".to_string(), s.pg.password().to_string()),
        (
            "Waypoint bootstrap token".to_string(),
            creds.wp_token.clone(),
        ),
        (
            "Waypoint runner token".to_string(),
            s.secret_file("waypoint/runner-1-token")?,
        ),
        ("endpoint token".to_string(), s.token.token.clone()),
        (
            "endpoint token hash".to_string(),
            sha256_hex(s.token.token.as_bytes())?,
        ),
    ];
    ensure!(
        s.secret_file("database/password")? == creds.db_pw,
        "the returned password is not the stored one"
    );
    secrets.extend(private_key_lines(&s.agent.pki_dir())?);
    // The grep can fail: the one answer that must carry the secrets is caught by it.
    ensure!(
        assert_no_secrets(
            &secrets[..3],
            &[("/v1/credentials".into(), creds.body.clone())]
        )
        .is_err(),
        "the secret grep does not find the secrets in /v1/credentials"
    );
    outputs.push(("agent log".into(), run.log()?));
    outputs.push((
        "status.json".into(),
        fs::read_to_string(s.agent.status_path())?,
    ));
    assert_no_secrets(&secrets, outputs)
}

// ---------------------------------------------------------------------------------------------
// `collect-logs`

/// The container the test starts to log the host's secrets, labelled as the agent's.
const LEAKY: &str = "pilot-e2e-leaky";

/// Every file of the collect-logs archive that must be there (below its top directory).
const ARCHIVE_PARTS: [&str; 15] = [
    "MANIFEST",
    "status.txt",
    "status.json",
    "journal.txt",
    "containers/list.txt",
    "containers/waypoint-server.log",
    "containers/waypoint-server.json",
    "containers/waypoint-runner-1.log",
    "containers/waypoint-runner-1.json",
    "containers/pilot-e2e-leaky.log",
    "containers/pilot-e2e-leaky.json",
    "nft.txt",
    "docker/daemon.json",
    "versions.txt",
    "certificates.txt",
];

#[test]
fn collect_logs_holds_every_part_and_no_secret() -> Result<()> {
    let RunHost {
        token,
        agent,
        pg,
        vm,
    } = phase("setup", || {
        RunHost::start(RateLimit {
            failures: RL_FAILURES,
            window_secs: RL_WINDOW_SECS,
        })
    })?;
    phase("up", || agent.up_ok(&vm).map(|_| ()))?;
    let secrets = phase("the host's secrets", || {
        let read = |rel: &str| -> Result<String> {
            let p = agent.state_dir().join(rel);
            Ok(fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .trim()
                .to_string())
        };
        let mut secrets = vec![
            (
                "Waypoint bootstrap token".to_string(),
                read("waypoint/bootstrap-token")?,
            ),
            (
                "Waypoint runner token".to_string(),
                read("waypoint/runner-1-token")?,
            ),
            ("database password".to_string(), read("database/password")?),
            ("admin password".to_string(), pg.password().to_string()),
            ("endpoint token".to_string(), token.token.clone()),
            (
                "endpoint token hash".to_string(),
                sha256_hex(token.token.as_bytes())?,
            ),
        ];
        secrets.extend(private_key_lines(agent.state_dir())?);
        Ok(secrets)
    })?;
    phase("secrets where collect-logs looks", || {
        plant_secrets(&vm, &agent, &secrets)
    })?;
    let dir = phase("collect-logs", || run_collect_logs(&vm, &agent))?;
    phase("no secret in the archive", || {
        let files = archive_files(&dir)?;
        assert_no_secrets(&secrets, &files)
    })?;
    phase("every part", || check_archive_parts(&vm, &dir))?;

    pg.cleanup()?;
    let name = vm.name().to_string();
    vm.cleanup()?;
    let left = leftovers(&[name]);
    ensure!(left.is_empty(), "leftovers: {left:#?}");
    Ok(())
}

/// Puts the host's secrets where collect-logs reads, as leaks would: the log and the
/// environment of a container labelled `io.pilot.managed=true` (stdout and stderr, a PEM key,
/// `WAYPOINT_SERVER_TOKEN=`, a `Bearer` header, the bootstrap token split over two lines),
/// a step detail of status.json and a label in daemon.json. Checks that the grep finds them
/// there, so that its finding nothing in the archive means something.
fn plant_secrets(vm: &Vm, agent: &Agent, secrets: &[(String, String)]) -> Result<()> {
    let value = |what: &str| -> Result<&str> {
        secrets
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, v)| v.as_str())
            .with_context(|| format!("no {what}"))
    };
    let boot = value("Waypoint bootstrap token")?;
    let key = fs::read_to_string(agent.pki_dir().join("server/key.pem"))?;
    let script = "echo \"bootstrap $LEAK_BOOT runner $WAYPOINT_SERVER_TOKEN\"; \
                  echo \"database $LEAK_DB\" >&2; \
                  echo \"admin $LEAK_ADMIN Authorization: Bearer $LEAK_ENDPOINT sha256 $LEAK_HASH\"; \
                  printf '%s\\n' \"$LEAK_KEY\" >&2; \
                  printf 'split %s\\n%s end\\n' \"$(echo \"$LEAK_BOOT\" | busybox cut -c1-12)\" \
                  \"$(echo \"$LEAK_BOOT\" | busybox cut -c13-)\"; \
                  exec busybox sleep 3600";
    let env = [
        ("LEAK_BOOT", boot),
        ("WAYPOINT_SERVER_TOKEN", value("Waypoint runner token")?),
        ("LEAK_DB", value("database password")?),
        ("LEAK_ADMIN", value("admin password")?),
        ("LEAK_ENDPOINT", value("endpoint token")?),
        ("LEAK_HASH", value("endpoint token hash")?),
        ("LEAK_KEY", key.as_str()),
    ];
    let mut args: Vec<String> = ["run", "-d", "--name", LEAKY, "--network", "none"]
        .map(String::from)
        .to_vec();
    args.extend(
        [
            "--label",
            "io.pilot.managed=true",
            "--label",
            "io.pilot.role=e2e",
        ]
        .map(String::from),
    );
    for (k, v) in env {
        args.extend(["-e".to_string(), format!("{k}={v}")]);
    }
    args.extend(
        [
            "--entrypoint",
            "/bin/sh",
            pilot_e2e::stack::IMAGE,
            "-c",
            script,
        ]
        .map(String::from),
    );
    vm.docker_ok(&args)?;
    let logs = poll(Duration::from_secs(10), "the leaky container's log", || {
        let out = vm.docker(["logs", LEAKY]).map_err(|e| e.to_string())?;
        let text = stdout(&out) + &stderr(&out);
        Ok(text.contains(" end").then_some(text))
    })?;

    let status_path = agent.status_path();
    let mut status: Value = serde_json::from_str(&fs::read_to_string(&status_path)?)?;
    let detail = format!(
        "{} (leaked: {} {})",
        status["steps"][0]["detail"].as_str().unwrap_or_default(),
        value("database password")?,
        boot
    );
    status["steps"][0]["detail"] = Value::String(detail);
    fs::write(&status_path, serde_json::to_string_pretty(&status)?)?;
    let mut daemon: Value = serde_json::from_str(&fs::read_to_string(vm.daemon_json())?)?;
    daemon["labels"] = serde_json::json!([format!("pilot.leak={}", value("admin password")?)]);
    fs::write(vm.daemon_json(), serde_json::to_string_pretty(&daemon)?)?;

    let planted = [
        ("the leaky container's log".to_string(), logs),
        ("its inspect".to_string(), vm.docker_ok(["inspect", LEAKY])?),
        ("status.json".to_string(), fs::read_to_string(&status_path)?),
        (
            "daemon.json".to_string(),
            fs::read_to_string(vm.daemon_json())?,
        ),
    ];
    // The grep finds what was planted: every named secret and the server key's lines.
    let server_key = agent.pki_dir().join("server/key.pem").display().to_string();
    for (what, v) in secrets
        .iter()
        .filter(|(what, _)| !what.starts_with("key line of") || what.ends_with(&server_key))
    {
        ensure!(
            planted.iter().any(|(_, text)| text.contains(v.as_str())),
            "the planted {what} is nowhere to be found"
        );
    }
    Ok(())
}

/// `pilot-agent collect-logs --output FILE` in the VM: exit 0, the path printed, the file
/// 0600; extracts it and returns the archive's top directory.
fn run_collect_logs(vm: &Vm, agent: &Agent) -> Result<PathBuf> {
    let out_dir = vm.dir().join("collected");
    fs::create_dir_all(&out_dir)?;
    let archive = out_dir.join("pilot-diag.tar.gz");
    let t0 = Instant::now();
    let args: [&std::ffi::OsStr; 3] = [
        "collect-logs".as_ref(),
        "--output".as_ref(),
        archive.as_ref(),
    ];
    let (out, _) = agent.run(vm, args)?;
    eprintln!(
        "service: collect-logs took {:?}; stderr:\n{}",
        t0.elapsed(),
        stderr(&out)
    );
    ensure!(
        out.status.code() == Some(0),
        "collect-logs exited {}: {}",
        out.status,
        stderr(&out)
    );
    ensure!(
        stdout(&out).trim() == archive.display().to_string(),
        "collect-logs printed {:?}, not the archive's path",
        stdout(&out)
    );
    let mode = fs::metadata(&archive)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "the archive has mode {mode:o}, want 600");
    let extracted = out_dir.join("x");
    fs::create_dir_all(&extracted)?;
    let tar = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&extracted)
        .output()?;
    ensure!(tar.status.success(), "tar -xzf: {}", stderr(&tar));
    let top = extracted.join("pilot-diag");
    ensure!(top.is_dir(), "no top directory pilot-diag/ in the archive");
    Ok(top)
}

/// Every file under `dir` as (relative path, text).
fn archive_files(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                let rel = p.strip_prefix(dir)?.display().to_string();
                out.push((rel, String::from_utf8_lossy(&fs::read(&p)?).into_owned()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Each part is there with what it should hold, and the MANIFEST counts the redactions.
fn check_archive_parts(vm: &Vm, dir: &Path) -> Result<()> {
    let files = archive_files(dir)?;
    let get = |name: &str| -> Result<&str> {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
            .with_context(|| {
                let names: Vec<&String> = files.iter().map(|(n, _)| n).collect();
                format!("no {name} in the archive: {names:?}")
            })
    };
    for part in ARCHIVE_PARTS {
        get(part)?;
        let mode = fs::metadata(dir.join(part))?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "{part} has mode {mode:o}");
    }
    let manifest = get("MANIFEST")?;
    for (name, _) in &files {
        ensure!(
            name == "MANIFEST" || manifest.contains(&format!(" {name} ")),
            "the MANIFEST does not list {name}:\n{manifest}"
        );
    }
    for part in [
        "status.txt",
        "status.json",
        "containers/list.txt",
        "nft.txt",
    ] {
        ensure!(
            manifest.contains(&format!("ok       {part} ")),
            "{part} is not `ok` in the MANIFEST:\n{manifest}"
        );
    }
    for kind in [
        "bootstrap-token",
        "runner-token",
        "database-password",
        "admin-password",
        "endpoint-token",
        "endpoint-token-sha256",
        "private-key",
    ] {
        let n = manifest
            .lines()
            .find_map(|l| l.strip_prefix(kind)?.trim().parse::<u32>().ok())
            .unwrap_or(0);
        ensure!(n > 0, "no {kind} redaction counted:\n{manifest}");
    }

    let status = get("status.txt")?;
    ensure!(
        status.starts_with("status:    done\ncondition: healthy\n")
            && status.contains("\ncertificates:\n")
            && status.contains("\nhost:\n"),
        "status.txt is not `status --long`:\n{status}"
    );
    let json: Value = serde_json::from_str(get("status.json")?)?;
    ensure!(
        json["status"] == "done"
            && json["condition"] == "healthy"
            && json["certificates"]
                .as_array()
                .is_some_and(|c| c.len() == 4),
        "status.json is not `status --json --long`: {json:#}"
    );
    let list = get("containers/list.txt")?;
    for name in ["waypoint-server", "waypoint-runner-1", LEAKY] {
        ensure!(list.contains(name), "{name} not in list.txt:\n{list}");
    }
    let leaky = get("containers/pilot-e2e-leaky.log")?;
    ensure!(
        leaky.contains(
            " stdout bootstrap [REDACTED:bootstrap-token] runner [REDACTED:runner-token]"
        ) && leaky.contains(" stderr database [REDACTED:database-password]")
            && leaky.contains(" stderr [REDACTED:private-key]")
            && leaky.contains(" stdout split [REDACTED:bootstrap-token]\n end\n"),
        "the leaky container's log, redacted:\n{leaky}"
    );
    let nft = get("nft.txt")?;
    let tables: Vec<&str> = nft.lines().filter(|l| l.starts_with("table ")).collect();
    ensure!(
        tables == ["table inet pilot_agent {"],
        "nft.txt holds other tables than the agent's: {tables:?}"
    );
    let daemon: Value = serde_json::from_str(get("docker/daemon.json")?)?;
    ensure!(daemon["tlsverify"] == true, "daemon.json: {daemon:#}");
    let versions = get("versions.txt")?;
    ensure!(
        versions.contains("pilot-agent   ")
            && versions.contains("dockerd       ")
            && !versions.contains("dockerd       unknown")
            && versions.contains("kernel        "),
        "versions.txt:\n{versions}"
    );
    let certs = get("certificates.txt")?;
    ensure!(
        ["ca (", "server (", "runner (", "operator (", "waypoint ("]
            .iter()
            .all(|c| certs.contains(c))
            && certs.matches("  sha256      ").count() == 5
            && certs.contains(&vm.addr().to_string()),
        "certificates.txt:\n{certs}"
    );
    Ok(())
}
