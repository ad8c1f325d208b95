//! A Pilot VM on a cloud, end to end in simulated VMs.
//!
//! - `advertise_address_from_imds_reaches_applications_on_the_list_only`: an EC2 metadata
//!   service (IMDSv2, token required) at 169.254.169.254 inside the VM's namespace names the
//!   VM's address as the instance's public IPv4. `pilot-agent up` with `cloud.provider: aws`:
//!   1. status (JSON and table) says provider `aws`, the instance id and both addresses, and
//!      the metadata server saw the token flow (a PUT, then GETs carrying the token);
//!   2. the Waypoint STAND-IN server reports the advertise address the agent set
//!      (`PUBLIC_IPV4:9701`), and `credentials` names the same address;
//!   3. an "application" in the outside namespace runs the (stand-in) Waypoint entrypoint with
//!      the entrypoint's environment (`WAYPOINT_SERVER_ADDR` = the advertised address, TLS
//!      skip-verify, an invite token) from an address on `waypoint.application_sources`: it
//!      connects and learns the advertised address; from an address not on the list it
//!      cannot (the firewall drops it), and, as Waypoint's entrypoint does, it starts the
//!      application anyway after ~5 s; a second `up` changes nothing.
//! - `runner_only_host_works_against_the_server_vm_and_survives_a_cut_link`: two VMs joined by
//!   a direct link. The server VM runs `pilot-agent run` with its endpoint; the runner-only VM
//!   (`role: runner`, the server VM's endpoint, a `runner`-scope token and the CA
//!   fingerprint) runs `pilot-agent run` too:
//!   1. its `server-link` step reached the server VM over HTTPS pinned to that CA, and each
//!      runner's token was minted there (`POST /v1/runner-token`) and stored 0600; the runner
//!      VM holds no copy of the server's bootstrap token and its token gets 403 for
//!      `/v1/credentials`; its runners registered with the server VM's Waypoint (the server lists them) and reach the
//!      runner VM's own Docker over verified mutual TLS; the runner VM has no server container;
//!   2. a wrong CA fingerprint is an error that names both fingerprints, never a trust;
//!   3. the link cut: both agents keep running, the runner VM becomes `degraded`
//!      (`server-link` degraded), its runners keep running, the server VM stays `healthy`;
//!   4. the link restored: the runner VM is `healthy` again without a restart; every runner
//!      verifies the server VM's Waypoint certificate (the server VM's CA, pinned);
//!   5. the runner VM's `run` stopped (SIGTERM, `server.deregister: stop`): its runners are
//!      removed and the server VM's Waypoint lists none of them;
//!   6. a fake server on the path (`openssl s_server` with another CA's certificate at the
//!      address the runner VM is told to dial): the runners refuse its certificate and it
//!      hears no token and no request.
//!
//! Needs root and a machine prepared by scripts/setup.sh; without them every test FAILS.
//! Run: `cargo build --release --workspace && cargo nextest run --release -p pilot-e2e --test
//! cloud` (`--no-capture` shows the figures).

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pilot_e2e::agent::{Agent, ENDPOINT_PORT, EndpointToken};
use pilot_e2e::{bake_standin, foreign_ca, poll, standin_runner_status, standin_server_state};
use pilot_harness::metadata::{Instance, MetadataOptions};
use pilot_harness::standin::standin_binary;
use pilot_harness::{Vm, VmOptions, require_root};
use serde_json::Value;

/// The image reference the agent's configuration names (the content is the Waypoint stand-in).
const IMAGE: &str = "pilot/waypoint:0.11.4";
/// Waypoint's gRPC port, published on the host.
const GRPC: u16 = 9701;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `waypoint:` for the stand-in baked in `images`, with `extra` lines appended to it.
fn waypoint_section(images: &Path, runners: u32, extra: &str) -> String {
    pilot_e2e::agent::waypoint_section(IMAGE, IMAGE, images, runners) + extra
}

/// What the stand-in entrypoint printed (its one JSON line) and the whole output.
struct Entrypoint {
    report: Value,
    output: String,
    took: Duration,
}

/// Runs the stand-in Waypoint entrypoint in the outside namespace of `vm` with the
/// environment Waypoint gives deployed applications, from `source`, wrapping an application
/// that prints `app started`.
fn entrypoint_from_outside(vm: &Vm, server_addr: &str, source: Ipv4Addr) -> Result<Entrypoint> {
    let bin = standin_binary()?;
    let t0 = Instant::now();
    let out = vm
        .outside_cmd(&bin)
        .args(["entrypoint", "--", "echo", "app started"])
        .env("WAYPOINT_SERVER_ADDR", server_addr)
        .env("WAYPOINT_SERVER_TLS", "1")
        .env("WAYPOINT_SERVER_TLS_SKIP_VERIFY", "1")
        .env("WAYPOINT_CEB_INVITE_TOKEN", "invite-from-the-deployment")
        .env("WAYPOINT_STANDIN_SOURCE_ADDR", source.to_string())
        .output()
        .context("cannot run the stand-in entrypoint")?;
    let took = t0.elapsed();
    let output = text(&out);
    ensure!(
        out.status.success(),
        "entrypoint exited {}: {output}",
        out.status
    );
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .with_context(|| format!("no JSON line from the entrypoint: {output}"))?;
    Ok(Entrypoint {
        report,
        output,
        took,
    })
}

#[test]
fn advertise_address_from_imds_reaches_applications_on_the_list_only() -> Result<()> {
    require_root()?;
    let vm = Vm::start(VmOptions::default())?;
    let images = bake_standin(&vm, IMAGE)?;
    let public = vm.addr();
    let instance_id = "i-0c10d5a7e1f2a3b4c";
    let mut options = MetadataOptions::aws(instance_id);
    options.instance = Instance {
        public_ipv4: Some(public),
        ..Instance::aws(instance_id)
    };
    let imds = vm.serve_metadata(options)?;
    let app_source = vm.outside_alias(1)?;
    let stranger = vm.outside_alias(2)?;

    let agent = Agent::with_sections(
        &vm,
        &waypoint_section(
            &images,
            1,
            &format!("\x20 application_sources: [{app_source}/32]\n"),
        ),
    )?;
    agent.edit_config(|t| {
        t.replace(
            "cloud:\n  provider: none\n",
            "cloud:\n  provider: aws\n  timeout_ms: 500\n",
        )
    })?;
    let took = agent.up_ok(&vm)?;
    eprintln!("cloud: up with IMDSv2 identity took {took:.2?}");

    // 1. Status names the provider and the addresses; the token flow was used.
    let status = agent.status_json()?;
    let id = &status["identity"];
    ensure!(
        id["provider"] == "aws"
            && id["instance_id"] == instance_id
            && id["public_ipv4"] == public.to_string().as_str()
            && id["private_ipv4"] == "10.0.1.23",
        "identity in status: {id}"
    );
    let (out, _) = agent.run(&vm, ["status", "--long"])?;
    let table = text(&out);
    ensure!(
        table.contains("aws") && table.contains(&public.to_string()),
        "status table lacks the provider or the public address:\n{table}"
    );
    let requests = imds.requests();
    ensure!(
        requests.iter().any(|r| r.method == "PUT")
            && requests
                .iter()
                .filter(|r| r.method == "GET")
                .all(|r| r.valid_token),
        "IMDSv2 token flow not followed: {requests:?}"
    );

    // 2. The advertised address: set by the agent, reported by the stand-in, in credentials.
    let advertised = format!("{public}:{GRPC}");
    let step = status["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "waypoint-advertise"))
        .cloned()
        .context("no waypoint-advertise step")?;
    ensure!(
        step["state"] == "changed"
            && step["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&advertised)),
        "waypoint-advertise: {step}"
    );
    let server_state = standin_server_state(&vm)?;
    ensure!(
        server_state["advertise"]["addr"] == advertised.as_str(),
        "the stand-in server advertises {} (wanted {advertised})",
        server_state["advertise"]
    );
    let (out, _) = agent.run(&vm, ["credentials", "--json"])?;
    let creds: Value = serde_json::from_slice(&out.stdout).context("credentials --json")?;
    ensure!(
        creds["waypoint"]["address"] == advertised.as_str(),
        "credentials name {} (wanted {advertised})",
        creds["waypoint"]["address"]
    );

    // 3. An application on the list connects; one off the list cannot and starts anyway.
    let on_list = entrypoint_from_outside(&vm, &advertised, app_source)?;
    ensure!(
        on_list.report["entrypoint"] == "connected"
            && on_list.report["advertise_addr"] == advertised.as_str()
            && on_list.output.contains("app started"),
        "application from {app_source} (on the list): {}",
        on_list.output
    );
    let off_list = entrypoint_from_outside(&vm, &advertised, stranger)?;
    ensure!(
        off_list.report["entrypoint"] == "disconnected" && off_list.output.contains("app started"),
        "application from {stranger} (not on the list) reached Waypoint or did not start: {}",
        off_list.output
    );
    eprintln!(
        "cloud: entrypoint on the list connected in {:.2?}; off the list gave up after {:.2?} \
         and started the application",
        on_list.took, off_list.took
    );

    // A second pass: nothing to set again.
    agent.up_ok(&vm)?;
    let again = agent.status_json()?;
    let step = again["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "waypoint-advertise"))
        .cloned()
        .context("no waypoint-advertise step")?;
    ensure!(step["state"] == "ok", "second pass: {step}");
    Ok(())
}

fn step<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or(&Value::Null)
}

fn healthy(v: &Value) -> bool {
    v["status"] == "done" && v["condition"] == "healthy"
}

#[test]
fn runner_only_host_works_against_the_server_vm_and_survives_a_cut_link() -> Result<()> {
    require_root()?;
    let server_vm = Vm::start(VmOptions::default())?;
    let runner_vm = Vm::start(VmOptions::default())?;
    let link = server_vm.link(&runner_vm)?;
    let server_addr = link.addr_of(&server_vm);
    let runner_addr = link.addr_of(&runner_vm);

    // The server VM: Waypoint advertised on the link, 9701 open to the runner VM only (and
    // the operator), the endpoint served.
    let server_images = bake_standin(&server_vm, IMAGE)?;
    let token = EndpointToken::generate(&server_vm)?;
    let server = Agent::with_sections(
        &server_vm,
        &(waypoint_section(
            &server_images,
            0,
            &format!(
                "\x20 advertise_address: {server_addr}\n\
                 \x20 application_sources: [{runner_addr}/32]\n"
            ),
        ) + &format!(
            "endpoint:\n\
             \x20 listen: 0.0.0.0:{ENDPOINT_PORT}\n\
             \x20 tokens:\n\
             \x20   - {{ name: runner-vm, scope: runner, sha256_file: {hash} }}\n\
             service:\n\
             \x20 interval_secs: 300\n",
            hash = Value::String(token.sha256_file.display().to_string()),
        )),
    )?;
    let mut server_run = server.spawn_run(&server_vm, &server_vm.dir().join("agent-run.log"))?;
    server.wait_status(
        &mut server_run,
        Duration::from_secs(150),
        "the server VM's first pass",
        healthy,
    )?;
    let (out, _) = server.run(&server_vm, ["credentials", "--json"])?;
    let creds: Value = serde_json::from_slice(&out.stdout).context("credentials --json")?;
    let pin = creds["ca_sha256"]
        .as_str()
        .context("credentials have no ca_sha256")?
        .to_string();
    ensure!(
        creds["waypoint"]["address"] == format!("{server_addr}:{GRPC}").as_str(),
        "server VM credentials: {}",
        creds["waypoint"]["address"]
    );

    // The runner-only VM.
    let runner_images = bake_standin(&runner_vm, IMAGE)?;
    let token_file = runner_vm.dir().join("server-token");
    fs::write(&token_file, format!("{}\n", token.token))?;
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600))?;
    let runner_sections_with = |pin: &str, server_extra: &str| {
        format!(
            "role: runner\n\
             server:\n\
             \x20 endpoint: {server_addr}:{ENDPOINT_PORT}\n\
             \x20 token_file: {tf}\n\
             \x20 ca_sha256: \"{pin}\"\n\
             \x20 timeout_secs: 3\n\
             \x20 deregister: stop\n\
             {server_extra}\
             service:\n\
             \x20 interval_secs: 10\n\
             \x20 database_retry_max_secs: 5\n",
            tf = Value::String(token_file.display().to_string()),
        ) + &waypoint_section(&runner_images, 2, "")
    };
    let runner_sections = |pin: &str| runner_sections_with(pin, "");

    // 2. A wrong pin first: an error naming both fingerprints, and nothing fetched.
    let wrong_pin = "00:".repeat(31) + "00";
    let wrong = Agent::with_sections(&runner_vm, &runner_sections(&wrong_pin))?;
    let (out, _) = wrong.run(&runner_vm, ["up"])?;
    let status = wrong.status_json()?;
    let link_step = step(&status, "server-link");
    ensure!(
        !out.status.success()
            && link_step["state"] == "error"
            && link_step["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&wrong_pin) && d.contains(&pin)),
        "wrong pin: exit {}, server-link {link_step}",
        out.status
    );
    ensure!(
        !wrong.state_dir().join("waypoint/runner-1-token").exists()
            && !wrong.state_dir().join("waypoint/server-token").exists(),
        "tokens stored despite a wrong pin"
    );

    // 1. The right pin: runners registered with the server VM, Docker over TLS at home.
    let runner = Agent::with_sections(&runner_vm, &runner_sections(&pin))?;
    let mut runner_run = runner.spawn_run(&runner_vm, &runner_vm.dir().join("agent-run.log"))?;
    let t0 = Instant::now();
    let first = runner.wait_status(
        &mut runner_run,
        Duration::from_secs(150),
        "the runner VM's first pass",
        healthy,
    )?;
    eprintln!("cloud: runner-only host converged in {:.2?}", t0.elapsed());
    ensure!(
        // The link only checks the server VM now (it stores nothing of the server's); the
        // runners step has the server VM's endpoint mint each runner's token.
        step(&first, "server-link")["state"] == "ok"
            && step(&first, "waypoint-runners")["detail"]
                .as_str()
                .is_some_and(|d| d.contains("2 runner token(s) minted"))
            && step(&first, "waypoint-server").is_null()
            && step(&first, "database").is_null(),
        "runner VM steps: {first}"
    );
    let hostname = runner_vm.hostname().to_string();
    for i in 1..=2 {
        let name = format!("waypoint-runner-{i}");
        let s = poll(Duration::from_secs(30), &format!("{name} ready"), || {
            let s = standin_runner_status(&runner_vm, &name).map_err(|e| format!("{e:#}"))?;
            let ok = s["server_ok"] == true
                && s["docker_ok"] == true
                && s["docker_tls_verified"] == true
                && s["registered_as"] == format!("{hostname}-runner-{i}").as_str();
            if ok { Ok(Some(s)) } else { Err(s.to_string()) }
        })?;
        ensure!(
            s["server_addr"]
                .as_str()
                .is_some_and(|a| a.contains(&server_addr.to_string())),
            "{name} dials {} instead of the server VM",
            s["server_addr"]
        );
    }
    let on_server = standin_server_state(&server_vm)?;
    ensure!(
        (1..=2).all(|i| !on_server["runners"][format!("{hostname}-runner-{i}")].is_null()),
        "the server VM's Waypoint does not know the runner VM's runners: {}",
        on_server["runners"]
    );
    let local_servers = runner_vm.docker_ok(["ps", "-aq", "--filter", "name=waypoint-server"])?;
    ensure!(
        local_servers.trim().is_empty(),
        "a runner-only host runs a server"
    );
    // Least privilege: the runner VM (runner-scope token) holds its runners' own tokens and
    // not the server's bootstrap token, anywhere in its state directory; and its token is
    // refused the server VM's credentials.
    let bootstrap = fs::read_to_string(server.state_dir().join("waypoint/bootstrap-token"))?;
    let bootstrap = bootstrap.trim();
    ensure!(
        bootstrap.len() >= 16,
        "the server VM has no bootstrap token"
    );
    let grep = std::process::Command::new("grep")
        .args(["-rlF", "--", bootstrap])
        .arg(runner.state_dir())
        .output()?;
    ensure!(
        grep.stdout.is_empty(),
        "the runner VM keeps the server's bootstrap token in {}",
        String::from_utf8_lossy(&grep.stdout)
    );
    for i in 1..=2 {
        let mode = fs::metadata(
            runner
                .state_dir()
                .join(format!("waypoint/runner-{i}-token")),
        )?
        .permissions()
        .mode()
            & 0o777;
        ensure!(mode == 0o600, "runner-{i}-token has mode {mode:o}");
    }
    // -k: this checks the scope, not TLS (the agent's own client pins the CA). The token
    // goes in a header file, not on the command line.
    let header = runner_vm.dir().join("auth-header");
    fs::write(&header, format!("Authorization: Bearer {}\n", token.token))?;
    fs::set_permissions(&header, fs::Permissions::from_mode(0o600))?;
    let out = runner_vm
        .cmd("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("@{}", header.display()))
        .arg(format!(
            "https://{server_addr}:{ENDPOINT_PORT}/v1/credentials"
        ))
        .output()
        .context("curl")?;
    let code = String::from_utf8_lossy(&out.stdout);
    ensure!(
        code.trim() == "403",
        "a runner-scope token got {code} for /v1/credentials"
    );

    // 3. Cut the link: both keep running; the runner VM is degraded, the server VM healthy.
    link.cut()?;
    let t_cut = Instant::now();
    let degraded = runner.wait_status(
        &mut runner_run,
        Duration::from_secs(60),
        "the runner VM degraded after the cut",
        |v| v["condition"] == "degraded" && step(v, "server-link")["state"] == "degraded",
    )?;
    eprintln!(
        "cloud: runner VM degraded {:.2?} after the cut: {}",
        t_cut.elapsed(),
        step(&degraded, "server-link")["detail"]
    );
    let running = runner_vm.docker_ok([
        "ps",
        "-q",
        "--filter",
        "label=io.pilot.role=runner",
        "--filter",
        "status=running",
    ])?;
    ensure!(
        running.lines().count() == 2,
        "runners stopped while the link was cut: {running:?}"
    );
    server_run.ensure_running()?;
    runner_run.ensure_running()?;
    ensure!(
        healthy(&server.status_json()?),
        "the server VM is not healthy while cut off from the runner VM"
    );

    // 4. Restore it: healthy again, same processes.
    link.restore()?;
    let t_restore = Instant::now();
    runner.wait_status(
        &mut runner_run,
        Duration::from_secs(60),
        "the runner VM healthy after the link returned",
        |v| healthy(v) && step(v, "server-link")["state"] == "ok",
    )?;
    eprintln!(
        "cloud: runner VM healthy {:.2?} after the link returned",
        t_restore.elapsed()
    );
    server_run.ensure_running()?;
    runner_run.ensure_running()?;
    ensure!(
        (1..=2).all(
            |i| standin_runner_status(&runner_vm, &format!("waypoint-runner-{i}"))
                .is_ok_and(|s| s["server_addr"]
                    .as_str()
                    .is_some_and(|a| a.ends_with("(tls)")))
        ),
        "a runner does not verify the server VM's Waypoint"
    );

    // 5. The runner VM's `run` stopped (SIGTERM, as systemd stops it when an autoscaling
    //    group terminates the instance; `deregister: stop` here, there is no systemd to say
    //    the machine is shutting down): its runners are gone and the server VM's Waypoint
    //    forgot them, so it lists exactly the runners that exist.
    let t_stop = Instant::now();
    let stopped = runner_run.terminate(Duration::from_secs(30))?;
    eprintln!(
        "cloud: the runner VM's run stopped ({stopped}) in {:.2?}",
        t_stop.elapsed()
    );
    let left = runner_vm.docker_ok(["ps", "-aq", "--filter", "label=io.pilot.role=runner"])?;
    ensure!(
        left.trim().is_empty(),
        "runners left after the stop: {left}"
    );
    let on_server = standin_server_state(&server_vm)?;
    let still: Vec<&String> = on_server["runners"]
        .as_object()
        .map(|m| {
            m.keys()
                .filter(|k| k.starts_with(&format!("{hostname}-runner-").to_lowercase()))
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        still.is_empty(),
        "the server VM still lists the stopped host's runners {still:?}"
    );
    for i in 1..=2 {
        ensure!(
            !runner
                .state_dir()
                .join(format!("waypoint/runner-{i}-token"))
                .exists(),
            "runner-{i}-token kept after deregistering"
        );
    }

    // 6. A fake server on the path: the runner VM is told to dial an address where something
    //    else answers TLS, with a certificate of another CA. Each runner refuses the
    //    handshake, so its token never reaches the impostor.
    let fake = runner_vm.dir().join("impostor");
    let fake_cert = foreign_ca(&fake)?;
    let outside = runner_vm.outside_addr();
    let heard = fake.join("heard");
    let impostor = Impostor::start(&runner_vm, &fake_cert, &fake.join("key.pem"), &heard)?;
    let misled = Agent::with_sections(
        &runner_vm,
        &runner_sections_with(&pin, &format!("\x20 waypoint_address: {outside}:{GRPC}\n")),
    )?;
    let (out, _) = misled.run(&runner_vm, ["up"])?;
    eprintln!("cloud: up towards the impostor exited {}", out.status);
    let env = runner_vm.docker_ok([
        "inspect",
        "-f",
        "{{range .Config.Env}}{{println .}}{{end}}",
        "waypoint-runner-1",
    ])?;
    ensure!(
        env.lines()
            .any(|l| l == format!("WAYPOINT_SERVER_ADDR={outside}:{GRPC}")),
        "runner-1 does not dial the impostor: {env}"
    );
    // A client that verifies ends each handshake with an alert; one that does not would send
    // its request (and token) at once. Either ends the wait; the checks below tell which.
    let runner_tokens: Vec<String> = (1..=2)
        .map(|i| {
            fs::read_to_string(
                runner
                    .state_dir()
                    .join(format!("waypoint/runner-{i}-token")),
            )
            .map(|t| t.trim().to_string())
        })
        .collect::<Result<_, _>>()?;
    poll(
        Duration::from_secs(60),
        "runner-1 reaching the impostor",
        || {
            let text = fs::read_to_string(&heard).unwrap_or_default();
            let log = fs::read_to_string(heard.with_extension("log")).unwrap_or_default();
            let attempts = log.matches("alert").count();
            let leaked = !text.is_empty();
            if attempts >= 2 || leaked {
                Ok(Some(()))
            } else {
                Err(format!("impostor heard: {text}; its log: {log}"))
            }
        },
    )?;
    drop(impostor);
    let log = fs::read_to_string(heard.with_extension("log"))?;
    let heard = fs::read_to_string(&heard).unwrap_or_default();
    eprintln!(
        "cloud: the impostor saw {} refused handshake(s) and heard {} byte(s)",
        log.matches("alert").count(),
        heard.len()
    );
    for (i, token) in runner_tokens.iter().enumerate() {
        ensure!(
            !heard.contains(token.as_str()),
            "the impostor received runner-{}'s token:\n{heard}",
            i + 1
        );
    }
    ensure!(
        heard.is_empty(),
        "the impostor received a request:\n{heard}"
    );
    Ok(())
}

/// A TLS server in the outside namespace of a VM on the Waypoint port, with a certificate of
/// another CA (`socat`, which writes what a client sends, unbuffered, to `heard` and logs each
/// connection, handshake alerts included, to `heard.log`). Ended by its PID when dropped.
struct Impostor(std::process::Child);

impl Impostor {
    fn start(vm: &Vm, cert: &Path, key: &Path, heard: &Path) -> Result<Impostor> {
        let log = heard.with_extension("log");
        let listen = format!(
            "OPENSSL-LISTEN:{GRPC},reuseaddr,fork,verify=0,cert={},key={}",
            cert.display(),
            key.display()
        );
        let child = vm
            .outside_cmd("socat")
            .args(["-d", "-d", &listen])
            .arg(format!("OPEN:{},creat,append", heard.display()))
            .stdin(std::process::Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("socat")?;
        let impostor = Impostor(child);
        poll(Duration::from_secs(10), "the impostor listening", || {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening on") {
                Ok(Some(()))
            } else {
                Err(text)
            }
        })?;
        Ok(impostor)
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
