//! Smoke suite for the test harness itself: a simulated VM comes up with its own hostname and
//! dockerd, the Waypoint stand-in answers HTTPS from the outside namespace, PostgreSQL answers
//! and can be cut off, moto answers the EC2 API, `dockerd-ctl restart` applies a rewritten
//! daemon.json, nothing is left on the machine once everything is dropped, and
//! `scripts/harness-clean` removes what a killed test process left behind.
//!
//! Needs root and a machine prepared by scripts/setup.sh; without them every test FAILS.
//! Run: `cargo test --release -p pilot-e2e --test smoke` (tests run in parallel threads).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_e2e::{poll, wait_https_200};
use pilot_harness::moto::VENV_PYTHON;
use pilot_harness::{Moto, Postgres, Vm, leftovers, require_root};
use serde_json::json;

fn start_vm() -> Result<Vm> {
    pilot_e2e::start_vm("smoke")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn vm_has_its_own_dockerd_hostname_and_outside_namespace() -> Result<()> {
    let vm = start_vm()?;

    let api = vm.docker_ok(["version", "--format", "{{.Server.APIVersion}}"])?;
    eprintln!("smoke: dockerd API {api}");
    ensure!(!api.is_empty(), "dockerd reported no API version");
    let name = vm.docker_ok(["info", "--format", "{{.Name}}"])?;
    ensure!(
        name == vm.hostname(),
        "dockerd sees hostname {name:?}, the VM's is {:?}",
        vm.hostname()
    );
    let inside = vm.cmd("hostname").output()?;
    ensure!(
        stdout(&inside) == vm.hostname(),
        "hostname inside the VM: {}",
        stdout(&inside)
    );
    let host = Command::new("hostname").output()?;
    ensure!(
        stdout(&host) != vm.hostname(),
        "the VM's hostname leaked to the host"
    );

    // A plain Docker API on 2375 in front of the unix socket, reachable from outside: what the
    // agent's firewall must lock.
    vm.start_socat(
        2375,
        &format!("UNIX-CONNECT:{}", vm.docker_socket().display()),
    )?;
    vm.wait_tcp_from_outside(2375, Duration::from_secs(5))?;
    let ping = vm
        .outside_cmd("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://{}:2375/_ping", vm.addr()))
        .output()?;
    ensure!(
        stdout(&ping) == "OK",
        "plain /_ping from outside answered {:?}",
        stdout(&ping)
    );

    let status = vm.dockerd_ctl_run("status")?;
    ensure!(
        status.starts_with("running"),
        "dockerd-ctl status: {status}"
    );
    vm.cleanup()
}

#[test]
fn standin_waypoint_server_answers_https_from_outside() -> Result<()> {
    let vm = start_vm()?;
    let t0 = Instant::now();
    vm.import_standin("hashicorp/waypoint:latest")?;
    eprintln!("smoke: stand-in image imported in {:?}", t0.elapsed());
    vm.docker_ok(
        [
            "run",
            "-d",
            "--name",
            "waypoint-server",
            "-p",
            "9701:9701",
            "-p",
            "9702:9702",
            "-v",
            "waypoint-server:/data",
            "hashicorp/waypoint:latest",
        ]
        .into_iter()
        .chain(pilot_e2e::WAYPOINT_SERVER_RUN),
    )?;
    let url = format!("https://{}:9702/", vm.addr());
    let waited = wait_https_200(
        || vm.outside_cmd("curl"),
        &url,
        "2",
        Duration::from_secs(30),
        "HTTP 200 from the stand-in on 9702",
    );
    if let Err(e) = waited {
        let logs = vm.docker(["logs", "waypoint-server"])?;
        bail!(
            "{e:#}\ncontainer logs:\n{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
    }
    eprintln!(
        "smoke: stand-in answered HTTPS 200 from outside after {:?}",
        t0.elapsed()
    );
    // The gRPC port speaks TLS too: a TLS handshake succeeds (curl exit 35 would mean not).
    let grpc = vm
        .outside_cmd("curl")
        .args(["-k", "-s", "-o", "/dev/null", "--max-time", "5"])
        .arg(format!("https://{}:9701/", vm.addr()))
        .status()?;
    ensure!(
        grpc.code() != Some(35) && grpc.code() != Some(7),
        "no TLS on 9701 from outside: curl {grpc}"
    );
    vm.cleanup()
}

#[test]
fn postgres_answers_from_the_vm_and_can_be_cut_off() -> Result<()> {
    let vm = start_vm()?;
    let pg = Postgres::start(&vm)?;
    eprintln!(
        "smoke: PostgreSQL {} on {}:{} ready in {:?}",
        pg.name(),
        pg.addr(),
        pg.port(),
        pg.start_duration()
    );
    ensure!(pg.psql("select 1")? == "1");

    pg.cut_link()?;
    let t0 = Instant::now();
    let cut = pg.psql("select 1");
    eprintln!(
        "smoke: with the link cut, psql gave up after {:?}",
        t0.elapsed()
    );
    ensure!(
        cut.is_err(),
        "the database still answered with the link cut"
    );
    ensure!(
        t0.elapsed() < Duration::from_secs(12),
        "psql took {:?} to fail",
        t0.elapsed()
    );

    pg.restore_link()?;
    poll(
        Duration::from_secs(15),
        "the database to answer again",
        || match pg.psql("select 1") {
            Ok(v) if v == "1" => Ok(Some(())),
            Ok(v) => Err(format!("answered {v:?}")),
            Err(e) => Err(format!("{e:#}")),
        },
    )?;
    pg.cleanup()?;
    vm.cleanup()
}

#[test]
fn moto_answers_describe_images() -> Result<()> {
    require_root()?;
    let moto = Moto::start()?;
    eprintln!(
        "smoke: moto on {} ready in {:?}",
        moto.endpoint(),
        moto.start_duration()
    );
    let script = r#"
import sys, boto3
ec2 = boto3.client("ec2", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
print(len(ec2.describe_images()["Images"]))
"#;
    let out = Command::new(VENV_PYTHON)
        .args(["-c", script, &moto.endpoint()])
        .output()
        .context("cannot run the venv's python")?;
    ensure!(
        out.status.success(),
        "DescribeImages failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: usize = stdout(&out)
        .parse()
        .context("DescribeImages printed no count")?;
    eprintln!("smoke: moto DescribeImages returned {n} images");
    ensure!(n > 0, "moto returned no images");
    moto.reset()?;
    moto.cleanup()
}

#[test]
fn dockerd_ctl_restart_applies_daemon_json() -> Result<()> {
    let vm = start_vm()?;
    let labels = || vm.docker_ok(["info", "--format", "{{json .Labels}}"]);
    ensure!(
        !labels()?.contains("pilot-test"),
        "label present before the change"
    );

    let good = vm.read_daemon_json()?;
    // A daemon.json dockerd refuses: restart must fail and say why (the dockerd log).
    let mut bad = good.clone();
    bad["no-such-directive"] = json!(true);
    vm.write_daemon_json(&bad)?;
    let err = match vm.restart_dockerd() {
        Ok(_) => bail!("dockerd restarted with an invalid daemon.json"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("no-such-directive"),
        "failed restart does not say why: {err}"
    );

    let mut cfg = good;
    // dockerd wants labels as key=value (a bare "pilot-test" is refused).
    cfg["labels"] = json!(["pilot-test=yes"]);
    vm.write_daemon_json(&cfg)?;
    let took = vm.restart_dockerd()?;
    eprintln!("smoke: dockerd-ctl restart took {took:?}");
    let now = labels()?;
    ensure!(
        now.contains("pilot-test"),
        "label missing after restart: {now}"
    );
    vm.cleanup()
}

#[test]
fn nothing_is_left_after_dropping_everything() -> Result<()> {
    require_root()?;
    let names;
    {
        let vm = start_vm()?;
        let pg = Postgres::start(&vm)?;
        let moto = Moto::start()?;
        names = vec![vm.name().to_string(), moto.name().to_string()];

        // A restarted dockerd mounts its data-root again; the clean-up must still find all.
        // (Before the container below: dockerd would give its SIGTERM-deaf PID 1 10 s.)
        vm.restart_dockerd()?;
        vm.start_socat(
            2375,
            &format!("UNIX-CONNECT:{}", vm.docker_socket().display()),
        )?;
        // A container whose PID 1 ignores SIGTERM, and a process started in the VM and never
        // waited for: the clean-up must get rid of both.
        vm.import_busybox("busybox:smoke")?;
        vm.docker_ok([
            "run",
            "-d",
            "-p",
            "8080:8080",
            "busybox:smoke",
            "sleep",
            "1000",
        ])?;
        let _leaked = vm.cmd("sleep").arg("1000").spawn()?;
        ensure!(pg.psql("select 1")? == "1");

        let during = leftovers(&names);
        for kind in [
            "network namespace",
            "process",
            "cgroup",
            "mount",
            "directory",
        ] {
            ensure!(
                during.iter().any(|l| l.starts_with(kind)),
                "leftovers() sees no {kind} of a live VM: {during:#?}"
            );
        }
        let t0 = Instant::now();
        drop(pg);
        drop(moto);
        drop(vm);
        eprintln!(
            "smoke: VM, PostgreSQL and moto removed in {:?}",
            t0.elapsed()
        );
    }
    let left = leftovers(&names);
    ensure!(
        left.is_empty(),
        "left behind after drop:\n{}",
        left.join("\n")
    );
    Ok(())
}

#[test]
fn cleanup_runs_when_a_test_panics() -> Result<()> {
    require_root()?;
    let name = std::sync::Mutex::new(String::new());
    let outcome = std::panic::catch_unwind(|| {
        let vm = start_vm().expect("VM starts");
        *name.lock().expect("not poisoned") = vm.name().to_string();
        vm.import_busybox("busybox:smoke").expect("busybox imports");
        vm.docker_ok(["run", "-d", "busybox:smoke", "sleep", "1000"])
            .expect("container runs");
        panic!("deliberate panic with VM {} alive", vm.name());
    });
    ensure!(outcome.is_err(), "the closure should have panicked");
    let name = name.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))?;
    ensure!(!name.is_empty(), "the VM never started");
    let left = leftovers(&[name]);
    ensure!(
        left.is_empty(),
        "left behind after a panic:\n{}",
        left.join("\n")
    );
    Ok(())
}

/// Set in the child process that `harness_clean_removes_what_a_killed_run_left` kills.
const KILLED_RUN_ENV: &str = "PILOT_SMOKE_KILLED_RUN";

/// Not a test of its own: the child process of `harness_clean_removes_what_a_killed_run_left`.
/// It makes a VM with a container, PostgreSQL and moto, says READY, and blocks on stdin until
/// it is killed with SIGKILL, so no Drop runs: the situation `scripts/harness-clean` is for.
#[test]
#[ignore = "helper process of harness_clean_removes_what_a_killed_run_left"]
fn killed_run_helper() -> Result<()> {
    if std::env::var_os(KILLED_RUN_ENV).is_none() {
        return Ok(());
    }
    let vm = start_vm()?;
    let pg = Postgres::start(&vm)?;
    let moto = Moto::start()?;
    vm.import_busybox("busybox:smoke")?;
    vm.docker_ok(["run", "-d", "busybox:smoke", "sleep", "1000"])?;
    vm.start_socat(
        2375,
        &format!("UNIX-CONNECT:{}", vm.docker_socket().display()),
    )?;
    println!("READY {} {} {}", vm.name(), pg.name(), moto.name());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

#[test]
fn harness_clean_removes_what_a_killed_run_left() -> Result<()> {
    require_root()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--exact", "killed_run_helper", "--ignored", "--nocapture"])
        .env(KILLED_RUN_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let names: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("READY ").map(str::to_string))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .context("the helper process ended without making its VM")?;
    child.kill()?;
    child.wait()?;
    let after_kill = leftovers(&names);
    ensure!(
        after_kill.len() > 5,
        "a killed run should have left things behind: {after_kill:#?}"
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/harness-clean");
    let t0 = Instant::now();
    let out = Command::new("bash").arg(&script).arg("-q").output()?;
    eprintln!(
        "smoke: harness-clean took {:?}:\n{}{}",
        t0.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "harness-clean failed ({})",
        out.status
    );
    let left = leftovers(&names);
    ensure!(
        left.is_empty(),
        "left behind after harness-clean:\n{}",
        left.join("\n")
    );
    Ok(())
}
