//! pilot-demo: the README's first command. Boots a simulated Pilot VM on this machine (a network
//! namespace with its own dockerd, an outside namespace for the operator, a PostgreSQL host in
//! a third namespace), bakes the Waypoint STAND-IN image into it as a VM image would, runs
//! `pilot-agent up` inside it, and shows from the outside what the agent changed: the plain
//! Docker API on 2375 locked, Docker reachable only with a client certificate, the Waypoint
//! server and runner running, the application's database user working. Then it runs `up` again
//! to show that a converged host is left alone, and removes everything it made.
//!
//! It touches nothing of the host: everything lives in namespaces and daemons it starts.
//! `--keep` leaves the VM running for a look around (remove it with `scripts/harness-clean`).

use std::fs;
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use pilot_e2e::agent::Agent;
use pilot_e2e::{bake_standin, write_admin_password};
use pilot_harness::{Postgres, Vm, VmOptions, require_root};

/// The image name the agent is configured with; the stand-in is tagged with it.
const IMAGE: &str = "pilot/waypoint:0.11.4";

fn say(text: impl AsRef<str>) {
    println!("==> {}", text.as_ref());
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pilot-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `GET /_ping` on the VM's plain Docker port from the outside namespace: the original Pilot's
/// hole. Returns what came back, or that nothing did.
fn probe_plain_api(vm: &Vm) -> Result<String> {
    let out = vm
        .outside_cmd("curl")
        .args(["-s", "--max-time", "2"])
        .arg(format!("http://{}:2375/_ping", vm.addr()))
        .output()
        .context("cannot run curl in the outside namespace")?;
    Ok(if out.status.success() {
        format!(
            "answered {:?}: the Docker API is open to anyone",
            String::from_utf8_lossy(&out.stdout)
        )
    } else {
        "no answer (locked)".to_string()
    })
}

fn run() -> Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    require_root()?;

    say("starting a simulated Pilot VM: network namespace, own hostname, own dockerd");
    let vm = Vm::start(VmOptions::default())?;
    say(format!(
        "VM {} (hostname {}) at {}, operator side at {}; ready in {:.2?}",
        vm.name(),
        vm.hostname(),
        vm.addr(),
        vm.outside_addr(),
        vm.start_duration()
    ));
    let pg = Postgres::start(&vm)?;
    say(format!(
        "PostgreSQL host at {}:{} (its own namespace)",
        pg.addr(),
        pg.port()
    ));

    // What the original bootstrap did: the Docker API as plain HTTP on 2375.
    vm.start_socat(
        2375,
        &format!("UNIX-CONNECT:{}", vm.docker_socket().display()),
    )?;
    say(format!(
        "before the agent, GET /_ping on {}:2375 from outside: {}",
        vm.addr(),
        probe_plain_api(&vm)?
    ));

    // Bake the image as pilot-image does: a `docker save` tarball, absent from dockerd.
    let images = bake_standin(&vm, IMAGE)?;
    let admin_password = write_admin_password(&vm, &pg)?;
    say(format!(
        "baked the Waypoint stand-in image into {} (not loaded in dockerd)",
        images.display()
    ));

    let sections = format!(
        "waypoint:\n  server_image: {IMAGE}\n  runner_image: {IMAGE}\n  images_dir: {images}\n  \
         runners: 2\ndatabase:\n  host: {host}\n  port: {port}\n  admin_user: {user}\n  \
         admin_password_file: {pw}\n  tls: disable\n  connect_timeout_secs: 3\n",
        images = images.display(),
        host = pg.addr(),
        port = pg.port(),
        user = pg.superuser(),
        pw = admin_password.display(),
    );
    let agent = Agent::with_sections(&vm, &sections)?;
    say(format!(
        "running `pilot-agent --config {} up` inside the VM",
        agent.config_path().display()
    ));
    let t0 = Instant::now();
    let code = agent
        .cmd(&vm, ["up"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .context("cannot run pilot-agent")?
        .code();
    let cold = t0.elapsed();
    say(format!("pilot-agent up exited {code:?} after {cold:.2?}"));
    if code != Some(0) {
        bail!("pilot-agent up did not converge (exit {code:?}); see its log above");
    }

    say("what the operator sees (`pilot-agent status --long` over the VM's shell):");
    agent
        .cmd(&vm, ["status", "--long"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .context("cannot run pilot-agent status")?;

    say(format!(
        "after the agent, GET /_ping on {}:2375 from outside: {}",
        vm.addr(),
        probe_plain_api(&vm)?
    ));
    let no_cert = vm
        .outside_cmd("curl")
        .args(["-sk", "--max-time", "3"])
        .arg(format!("https://{}:2376/_ping", vm.addr()))
        .output()?;
    say(format!(
        "2376 without a client certificate: {}",
        if no_cert.status.success() {
            "ANSWERED (this would be a hole)".to_string()
        } else {
            format!("refused (curl exit {:?})", no_cert.status.code())
        }
    ));
    say(format!(
        "2376 with the operator certificate, server verified against the agent's CA: {}",
        agent.operator_docker_version(&vm)?
    ));
    let ps = agent
        .operator_docker(
            &vm,
            ["ps", "--format", "{{.Names}}\t{{.Status}}\t{{.Ports}}"],
        )
        .output()?;
    say("containers (listed over mutual TLS from outside):");
    print!("{}", String::from_utf8_lossy(&ps.stdout));
    let runner = vm.docker_ok([
        "exec",
        "waypoint-runner-1",
        "cat",
        "/tmp/waypoint-runner-status.json",
    ])?;
    say(format!("waypoint-runner-1 reports: {}", runner.trim()));

    let password = fs::read_to_string(agent.state_dir().join("database/password"))
        .context("cannot read the application password the agent stored")?;
    let login = vm
        .cmd("psql")
        .args([
            "-h",
            &pg.addr().to_string(),
            "-p",
            &pg.port().to_string(),
            "-U",
            "pilot_app",
            "-d",
            "pilot",
            "-qAtc",
            "create table if not exists demo (id int); select current_user",
        ])
        .env("PGPASSWORD", password.trim())
        .env("PGCONNECT_TIMEOUT", "3")
        .output()?;
    say(format!(
        "application role logs in to its database and creates a table: {}",
        if login.status.success() {
            format!("ok (as {})", String::from_utf8_lossy(&login.stdout).trim())
        } else {
            format!("FAILED: {}", String::from_utf8_lossy(&login.stderr).trim())
        }
    ));

    let t1 = Instant::now();
    let (out, _) = agent.run(&vm, ["up"])?;
    say(format!(
        "second `pilot-agent up`: exit {:?} in {:.2?} (nothing to do: no restart, no rewrite, \
         no firewall transaction)",
        out.status.code(),
        t1.elapsed()
    ));

    if keep {
        say(format!(
            "--keep: VM {} stays up. Enter it with `nsenter --net=/run/netns/{}`; remove it with \
             `scripts/harness-clean`",
            vm.name(),
            vm.name()
        ));
        std::mem::forget(pg);
        std::mem::forget(vm);
        return Ok(());
    }
    say("removing the VM, its dockerd and the PostgreSQL host");
    let t2 = Instant::now();
    pg.cleanup()?;
    vm.cleanup()?;
    say(format!("clean-up done in {:.2?}", t2.elapsed()));
    Ok(())
}
