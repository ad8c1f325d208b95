//! Waypoint server and runners, and the application database, converged by the real
//! `pilot-agent up` inside a simulated VM (its own dockerd), against PostgreSQL on its own
//! database host and the Waypoint STAND-IN image (baked as a `docker save` tarball and removed
//! from dockerd, so the agent must load it).
//!
//! - `converges_idempotently_scales_and_recovers`: one VM through cold converge, a second `up`
//!   that changes nothing, runners 1 -> 3 -> 1, a lost token, an image that is neither baked
//!   nor pullable; prints the cold converge time against its floor and the warm time.
//! - `the_official_images_user_serves_the_agents_certificate_and_a_new_one_replaces_it`: the
//!   uid-100 stand-in (Waypoint's official image's user) serving the agent CA's certificate.
//! - `database_outage_fails_open`: the database link is cut before the first `up`.
//! - `sigkill_at_random_points_never_duplicates`: `up` killed at random points, then run again.
//!
//! Needs root and a machine prepared by scripts/setup.sh; without them every test FAILS.
//! Run: `cargo build --release --workspace && cargo test --release -p pilot-e2e --test waypoint`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_e2e::agent::{database_section, waypoint_section};
use pilot_e2e::crash::{Rng, kill_after, running_steps, seed_from_env};
use pilot_e2e::floor::container_floor;
use pilot_e2e::{
    bake_standin, bake_standin_uid100, bootstrap_tokens, cert_fingerprint, foreign_ca, poll,
    standin_runner_status, standin_server_state, step_state, tls_seen_from_outside,
    write_admin_password,
};
use pilot_harness::{Postgres, Vm, VmOptions, require_root, target_bin};
use serde_json::Value;

/// The image reference the agent's configuration names (Pilot's image name; the content is
/// the Waypoint stand-in).
const IMAGE: &str = "pilot/waypoint:0.11.4";
const GATEWAY: &str = "172.29.0.1";

/// A VM with PostgreSQL, the stand-in image baked into `VM_DIR/images/` (and absent from
/// dockerd), and the agent configured for both.
struct Setup {
    vm: Vm,
    pg: Postgres,
    agent: PathBuf,
    config: PathBuf,
    state: PathBuf,
    images: PathBuf,
}

fn setup() -> Result<Setup> {
    setup_with(bake_standin)
}

/// [`setup`] with the stand-in image baked by `bake`.
fn setup_with(bake: fn(&Vm, &str) -> Result<PathBuf>) -> Result<Setup> {
    require_root()?;
    let vm = Vm::start(VmOptions::default())?;
    let pg = Postgres::start(&vm)?;
    let images = bake(&vm, IMAGE)?;
    write_admin_password(&vm, &pg)?;
    let s = Setup {
        agent: target_bin("pilot-agent")?,
        config: vm.dir().join("agent.yaml"),
        state: vm.dir().join("state"),
        images,
        vm,
        pg,
    };
    s.write_config(1, IMAGE)?;
    Ok(s)
}

impl Setup {
    fn write_config(&self, runners: u32, runner_image: &str) -> Result<()> {
        let d = self.vm.dir();
        let text = format!(
            "state_dir: {state}\n\
             docker:\n\
             \x20 socket: {sock}\n\
             \x20 daemon_config: {daemon}\n\
             \x20 tls_listen: 0.0.0.0:2376\n\
             \x20 service:\n\
             \x20   manager: command\n\
             \x20   restart_command: [{ctl}, restart]\n\
             \x20 ready_timeout_secs: 30\n",
            state = self.state.display(),
            sock = self.vm.docker_socket().display(),
            daemon = self.vm.daemon_json().display(),
            ctl = self.vm.dockerd_ctl().display(),
        ) + &waypoint_section(IMAGE, runner_image, &self.images, runners)
            // The tests reach 9701/9702 from the outside namespace, as the Pilot CLI and the
            // applications would: it is an application source (an unlisted source gets no
            // answer, which tests/containment.rs shows).
            + &format!("\x20 application_sources: [{}/32]\n", self.vm.outside_addr())
            + &database_section(&self.pg, &d.join("pg-admin-password"));
        fs::write(&self.config, text)?;
        Ok(())
    }

    /// Runs `pilot-agent up` in the VM; returns its exit code, stderr and wall time.
    fn up(&self, extra: &[&str]) -> Result<(i32, String, Duration)> {
        let t0 = Instant::now();
        let out: Output = self
            .vm
            .cmd(&self.agent)
            .arg("--config")
            .arg(&self.config)
            .arg("up")
            .args(extra)
            .env("PILOT_AGENT_LOG", "info")
            .output()
            .context("cannot run pilot-agent up")?;
        let took = t0.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        Ok((out.status.code().unwrap_or(-1), stderr, took))
    }

    /// `up` that must exit with `code`; returns its wall time.
    fn up_expect(&self, code: i32, what: &str) -> Result<Duration> {
        self.up_expect_with(&[], code, what).map(|(took, _)| took)
    }

    /// `up ARGS` that must exit with `code`; returns its wall time and stderr (the log).
    fn up_expect_with(&self, args: &[&str], code: i32, what: &str) -> Result<(Duration, String)> {
        let (got, stderr, took) = self.up(args)?;
        if got != code {
            bail!(
                "{what}: `pilot-agent up` exited {got}, expected {code}\nstatus: {}\nstderr:\n{stderr}",
                serde_json::to_string_pretty(&self.status().unwrap_or(Value::Null))?
            );
        }
        eprintln!("waypoint: {what}: up exited {got} in {took:.2?}");
        Ok((took, stderr))
    }

    fn status(&self) -> Result<Value> {
        let p = self.state.join("status.json");
        Ok(serde_json::from_str(
            &fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
        )?)
    }

    fn step(&self, name: &str) -> Result<(String, String)> {
        step_state(&self.status()?, name)
    }

    /// The agent's containers: name -> (ID, created time), running or not.
    fn containers(&self) -> Result<BTreeMap<String, (String, String)>> {
        let out = self.vm.docker_ok([
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            "label=io.pilot.managed=true",
            "--format",
            "{{.Names}} {{.ID}} {{.CreatedAt}}",
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                Some((
                    it.next()?.to_string(),
                    (it.next()?.to_string(), it.next()?.to_string()),
                ))
            })
            .collect())
    }

    fn role_count(&self, role: &str) -> Result<usize> {
        let out = self.vm.docker_ok([
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=io.pilot.role={role}"),
        ])?;
        Ok(out.lines().filter(|l| !l.is_empty()).count())
    }

    fn read_secret(&self, rel: &str) -> Result<String> {
        let p = self.state.join(rel);
        let mode = fs::metadata(&p)
            .with_context(|| format!("{} missing", p.display()))?
            .permissions()
            .mode()
            & 0o777;
        ensure!(mode == 0o600, "{} has mode {mode:o}, want 600", p.display());
        Ok(fs::read_to_string(&p)?.trim().to_string())
    }

    /// The bootstrap tokens the server ever issued.
    fn bootstrap_tokens(&self) -> Result<Vec<String>> {
        Ok(bootstrap_tokens(&standin_server_state(&self.vm)?))
    }

    /// Logs in as the application role with the stored password and creates a table.
    fn app_creates_a_table(&self, table: &str) -> Result<()> {
        let password = self.read_secret("database/password")?;
        let out = self
            .vm
            .cmd("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &self.pg.addr().to_string()])
            .args(["-U", "pilot_app", "-d", "pilot", "-c"])
            .arg(format!(
                "CREATE TABLE {table} (id int); INSERT INTO {table} VALUES (7); SELECT id FROM {table}"
            ))
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains('7'),
            "the application role cannot use its database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn runner_status(&self, name: &str) -> Result<Value> {
        standin_runner_status(&self.vm, name)
    }

    /// Polls until runner `name` has registered with the server and called the Docker API
    /// over verified mutual TLS (the stand-in runner beats every 2 s).
    fn wait_runner_ready(&self, name: &str) -> Result<Value> {
        poll(Duration::from_secs(20), &format!("{name} ready"), || {
            let s = self.runner_status(name).map_err(|e| format!("{e:#}"))?;
            // `(tls)`: the runner verified the server ("(tls, skip-verify)" otherwise).
            let ok = s["server_ok"] == true
                && s["server_addr"]
                    .as_str()
                    .is_some_and(|a| a.ends_with("(tls)"))
                && s["docker_ok"] == true
                && s["docker_tls"] == true
                && s["docker_tls_verified"] == true;
            if ok { Ok(Some(s)) } else { Err(s.to_string()) }
        })
    }

    /// curl from the outside namespace to the published HTTPS port.
    fn curl_outside(&self, path: &str, token: Option<&str>) -> Result<(String, String)> {
        // Verified: the server serves the certificate the agent's CA issued it, with the
        // VM's address among its names (a token is never sent to an unverified server).
        let mut c = self.vm.outside_cmd("curl");
        c.args(["-s", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
            .arg(self.state.join("pki/ca/ca.pem"));
        if let Some(t) = token {
            c.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = c
            .arg(format!("https://{}:9702{path}", self.vm.addr()))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        Ok((code.to_string(), body.to_string()))
    }
}

/// A TCP connect from the outside namespace to the VM's `port` every 20 ms (a shell loop of
/// `bash`'s `/dev/tcp`, 300 ms each), writing the wall-clock time of each completed handshake.
/// Ended by its PID when dropped.
struct ConnectProbe {
    child: std::process::Child,
    out: PathBuf,
}

impl ConnectProbe {
    fn start(vm: &Vm, port: u16) -> Result<ConnectProbe> {
        let out = vm.dir().join(format!("connect-probe-{port}"));
        let script = format!(
            "while :; do if timeout 0.3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null; \
             then date +%s.%N; fi; sleep 0.02; done",
            ip = vm.addr()
        );
        let child = vm
            .outside_cmd("bash")
            .args(["-c", &script])
            .stdout(fs::File::create(&out)?)
            .spawn()
            .context("the connect probe")?;
        Ok(ConnectProbe { child, out })
    }

    /// The time of the first completed handshake, waiting up to `limit` for one.
    fn first_success(&self, limit: Duration) -> Result<std::time::SystemTime> {
        let line = poll(limit, "a connection from outside", || {
            let text = fs::read_to_string(&self.out).map_err(|e| e.to_string())?;
            Ok(text.lines().next().map(str::to_string))
        })?;
        let secs: f64 = line.trim().parse().context("date +%s.%N")?;
        Ok(std::time::UNIX_EPOCH + Duration::from_secs_f64(secs))
    }
}

impl Drop for ConnectProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The container work a cold converge cannot avoid, by hand on the same dockerd just before
/// the agent's cold run (see `pilot_e2e::floor::container_floor`): returns (load, the rest).
fn measure_container_floor(s: &Setup) -> Result<(Duration, Duration)> {
    container_floor(&s.vm, &s.images.join("waypoint.tar"), IMAGE)
}

/// Seconds between two RFC 3339 times of the status file.
fn step_seconds(step: &Value) -> Option<f64> {
    let parse = |v: &Value| -> Option<f64> {
        // "2026-11-22T04:41:43.123456789Z": seconds of the day are enough within one run.
        let t = v.as_str()?;
        let time = t.split('T').nth(1)?.trim_end_matches('Z');
        let time = time.split(['+', '-']).next()?;
        let mut parts = time.split(':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    };
    Some(parse(&step["finished_at"])? - parse(&step["started_at"])?)
}

#[test]
fn converges_idempotently_scales_and_recovers() -> Result<()> {
    let s = setup()?;
    let hostname = s.vm.hostname().to_string();
    let (floor_load, floor_containers) = measure_container_floor(&s)?;

    // Cold converge: dockerd restarted for TLS, image loaded from the tarball, network,
    // volume, server, bootstrap, runner token, runner, database role. Meanwhile an
    // application source outside the VM tries to connect to 9701 every 20 ms: Waypoint gives
    // the bootstrap token to whoever asks first, so no connection may succeed before the
    // agent has stored it.
    let probe = ConnectProbe::start(&s.vm, 9701)?;
    let (cold, cold_log) = s.up_expect_with(&[], 0, "cold converge")?;
    let connected = probe.first_success(Duration::from_secs(10))?;
    let stored = fs::metadata(s.state.join("waypoint/bootstrap-token"))?.modified()?;
    ensure!(
        connected >= stored,
        "an outside source connected to 9701 {:?} before the agent stored the bootstrap token",
        stored.duration_since(connected).unwrap_or_default()
    );
    eprintln!(
        "waypoint: 9701 first reachable from outside {:?} after the bootstrap token was stored",
        connected.duration_since(stored).unwrap_or_default()
    );
    if std::env::var_os("WAYPOINT_SHOW_LOG").is_some() {
        eprintln!("waypoint: the cold run's log:\n{cold_log}");
    }
    let status = s.status()?;
    ensure!(status["condition"] == "healthy", "{status}");
    let (state, detail) = s.step("images")?;
    ensure!(
        state == "changed" && detail.contains("loaded from") && detail.contains("waypoint.tar"),
        "images: {state}: {detail}"
    );

    // The server answers on its published port, from outside the VM.
    let (code, body) = s.curl_outside("/", None)?;
    ensure!(code == "200", "GET / from outside: {code} {body}");
    // Both listeners serve the certificate of the agent's CA (not Waypoint's per-start
    // self-signed one): it verifies with the VM's address checked, and another CA does not
    // verify it.
    let issued = cert_fingerprint(&fs::read(s.state.join("pki/waypoint/cert.pem"))?)?;
    let ca = s.state.join("pki/ca/ca.pem");
    let stranger = foreign_ca(&s.vm.dir().join("stranger-ca"))?;
    for port in [9701, 9702] {
        let addr = std::net::IpAddr::V4(s.vm.addr());
        let (verified, served) = tls_seen_from_outside(&s.vm, addr, port, &ca)?;
        ensure!(
            verified && served == issued,
            "{port}: verified {verified}, serves {served}, the agent issued {issued}"
        );
        let (verified, _) = tls_seen_from_outside(&s.vm, addr, port, &stranger)?;
        ensure!(!verified, "{port}: verified against a foreign CA");
    }

    // The runner reached the server with its token and Docker over mutual TLS at the gateway.
    let runner = s.wait_runner_ready("waypoint-runner-1")?;
    ensure!(
        runner["registered_as"] == format!("{hostname}-runner-1").as_str(),
        "{runner}"
    );
    ensure!(
        runner["docker_host"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("{GATEWAY}:2376")),
        "{runner}"
    );
    let bootstrap_token = s.read_secret("waypoint/bootstrap-token")?;
    let runner_token = s.read_secret("waypoint/runner-1-token")?;
    ensure!(bootstrap_token != runner_token);
    // No secret outlives the one-shot bootstrap container: not in the agent's log, not in
    // any container's log (`docker logs` of everything left on the VM, running or not).
    let names = s.vm.docker_ok(["ps", "-a", "--format", "{{.Names}}"])?;
    ensure!(
        !names.lines().any(|n| n == "waypoint-bootstrap"),
        "the bootstrap container (and its log) is still there"
    );
    for name in names.lines() {
        let out = s.vm.docker(["logs", name])?;
        let logs = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for (what, secret) in [("bootstrap", &bootstrap_token), ("runner", &runner_token)] {
            ensure!(
                !logs.contains(secret.as_str()),
                "the {what} token in `docker logs {name}`"
            );
        }
    }
    for (what, secret) in [("bootstrap", &bootstrap_token), ("runner", &runner_token)] {
        ensure!(
            !cold_log.contains(secret.as_str()),
            "the {what} token in the agent's log"
        );
    }
    let (code, body) = s.curl_outside("/v1/runners", Some(&bootstrap_token))?;
    ensure!(
        code == "200" && body.contains(&format!("{hostname}-runner-1")),
        "GET /v1/runners: {code} {body}"
    );
    ensure!(
        s.bootstrap_tokens()? == vec![bootstrap_token.clone()],
        "one bootstrap, and its token is the stored one"
    );
    let dir_mode = fs::metadata(s.state.join("waypoint"))?.permissions().mode() & 0o777;
    ensure!(dir_mode == 0o700, "token directory mode {dir_mode:o}");
    // The state directory itself stays 0700 (it was set to 0755 by `up`).
    let dir_mode = fs::metadata(&s.state)?.permissions().mode() & 0o777;
    ensure!(dir_mode == 0o700, "state directory mode {dir_mode:o}");

    // The firewall admits the Pilot network to dockerd's TLS port and nothing wider: from the
    // default bridge the same port at that bridge's gateway stays closed.
    let probe = |network: &str, ip: &str| -> Result<bool> {
        let out = s.vm.docker([
            "run",
            "--rm",
            "--network",
            network,
            "--entrypoint",
            "nc",
            IMAGE,
            "-w",
            "2",
            ip,
            "2376",
        ])?;
        Ok(out.status.success())
    };
    ensure!(
        probe("pilot", GATEWAY)?,
        "the pilot network cannot reach 2376"
    );
    // The harness gives the default bridge 172.30.N.0/24, gateway .1.
    let bridge_gateway = s.vm.container_subnet().replace(".0/24", ".1");
    ensure!(
        !probe("bridge", &bridge_gateway)?,
        "the default bridge reaches 2376 at {bridge_gateway}"
    );

    // The runner gets Docker only over TLS: no socket, no privilege, certificates read-only.
    let inspect: Value = serde_json::from_str(&s.vm.docker_ok(["inspect", "waypoint-runner-1"])?)?;
    let hc = &inspect[0]["HostConfig"];
    ensure!(hc["Privileged"] == false, "{hc}");
    let binds = hc["Binds"].to_string();
    ensure!(!binds.contains("docker.sock"), "{binds}");
    ensure!(binds.contains("pki/runner:/certs:ro"), "{binds}");

    // The application role logs in to its database and creates a table.
    s.app_creates_a_table("t_cold")?;
    let password = s.read_secret("database/password")?;

    // No secret in the log or the status file.
    let status_text = fs::read_to_string(s.state.join("status.json"))?;
    for (what, secret) in [
        ("bootstrap token", &bootstrap_token),
        ("runner token", &runner_token),
        ("database password", &password),
        ("admin password", &s.pg.password().to_string()),
    ] {
        ensure!(
            !cold_log.contains(secret.as_str()),
            "the log shows the {what}"
        );
        ensure!(
            !status_text.contains(secret.as_str()),
            "status.json shows the {what}"
        );
    }

    // Floor: what the run cannot avoid, measured side by side on this dockerd: its restart
    // until it answered over TLS (the docker-tls step of this run) and the container work
    // done by hand with the CLI just before (image load, server until HTTPS, bootstrap,
    // token, runner).
    let steps = status["steps"].as_array().cloned().unwrap_or_default();
    let step_time = |name: &str| {
        steps
            .iter()
            .find(|st| st["name"] == name)
            .and_then(step_seconds)
            .unwrap_or(f64::NAN)
    };
    let (_, server_detail) = s.step("waypoint-server")?;
    let server_ready: f64 = server_detail
        .split("ready after ")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or(f64::NAN);
    let docker_tls = step_time("docker-tls");
    let floor = docker_tls + floor_load.as_secs_f64() + floor_containers.as_secs_f64();
    for st in &steps {
        eprintln!(
            "waypoint: cold step {:<19} {:<8} {:>6.3}s  {}",
            st["name"].as_str().unwrap_or_default(),
            st["state"].as_str().unwrap_or_default(),
            step_seconds(st).unwrap_or(f64::NAN),
            st["detail"].as_str().unwrap_or_default()
        );
    }

    // A second `up`: nothing created or removed, nothing changed, the same password.
    let before = s.containers()?;
    let warm = s.up_expect(0, "second up")?;
    ensure!(
        s.containers()? == before,
        "containers changed on a second up"
    );
    let status = s.status()?;
    let changed: Vec<String> = status["steps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|st| st["state"] != "ok")
        .map(|st| format!("{}: {} ({})", st["name"], st["state"], st["detail"]))
        .collect();
    ensure!(changed.is_empty(), "second up changed: {changed:#?}");
    ensure!(s.read_secret("database/password")? == password);

    // Scale 1 -> 3 -> 1: exactly that many runners; runner 1 and the server untouched.
    let server_id = before["waypoint-server"].0.clone();
    let runner1_id = before["waypoint-runner-1"].0.clone();
    s.write_config(3, IMAGE)?;
    s.up_expect(0, "runners: 3")?;
    let now = s.containers()?;
    ensure!(s.role_count("runner")? == 3, "{now:?}");
    ensure!(now["waypoint-server"].0 == server_id && now["waypoint-runner-1"].0 == runner1_id);
    s.wait_runner_ready("waypoint-runner-3")?;
    s.write_config(1, IMAGE)?;
    s.up_expect(0, "runners: 1")?;
    let now = s.containers()?;
    ensure!(s.role_count("runner")? == 1, "{now:?}");
    ensure!(now["waypoint-server"].0 == server_id && now["waypoint-runner-1"].0 == runner1_id);
    // The server lists exactly the live runners: the removed ones were forgotten.
    let listed: Vec<String> = standin_server_state(&s.vm)?["runners"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    ensure!(
        listed == vec![format!("{hostname}-runner-1").to_lowercase()],
        "the server lists {listed:?} after scaling down to one runner"
    );
    let (_, detail) = s.step("waypoint-runners")?;
    ensure!(
        detail.contains("the server forgot"),
        "waypoint-runners: {detail}"
    );

    // Drift: a server stopped by hand is started (the same container); a changed spec (its
    // published port) replaces it, and there is still one server.
    s.vm.docker_ok(["stop", "-t", "1", "waypoint-server"])?;
    s.up_expect(0, "server stopped")?;
    let (state, detail) = s.step("waypoint-server")?;
    ensure!(
        state == "changed" && detail.contains("started"),
        "{state}: {detail}"
    );
    ensure!(s.containers()?["waypoint-server"].0 == server_id);
    fs::write(
        &s.config,
        fs::read_to_string(&s.config)?.replace("waypoint:\n", "waypoint:\n  http_port: 19702\n"),
    )?;
    s.up_expect(0, "http_port changed")?;
    let (state, detail) = s.step("waypoint-server")?;
    ensure!(
        state == "changed" && detail.contains("replaced"),
        "{state}: {detail}"
    );
    let server_id = s.containers()?["waypoint-server"].0.clone();
    ensure!(s.role_count("server")? == 1);
    ensure!(
        s.containers()?["waypoint-runner-1"].0 == runner1_id,
        "runner replaced"
    );
    let published = s.vm.docker_ok(["port", "waypoint-server", "9702/tcp"])?;
    ensure!(published.contains(":19702"), "{published}");
    s.write_config(1, IMAGE)?;
    s.up_expect(0, "http_port back")?;
    let server_id = {
        let id = s.containers()?["waypoint-server"].0.clone();
        ensure!(
            id != server_id,
            "server not replaced when its port changed back"
        );
        id
    };
    s.wait_runner_ready("waypoint-runner-1")?;

    // Rotation on request: a new password, set on the role, stored; nothing else changes.
    s.up_expect_with(&["--rotate-db-password"], 0, "rotate")?;
    let rotated = s.read_secret("database/password")?;
    ensure!(
        rotated != password,
        "--rotate-db-password kept the password"
    );
    s.app_creates_a_table("t_rotated")?;
    s.up_expect(0, "after rotation")?;
    ensure!(s.read_secret("database/password")? == rotated);

    // The bootstrap token lost while the server's volume holds a bootstrapped server: a clear
    // error with the way out, and the volume and server untouched.
    let token_file = s.state.join("waypoint/bootstrap-token");
    let kept = s.vm.dir().join("bootstrap-token.kept");
    fs::rename(&token_file, &kept)?;
    s.up_expect(1, "token lost")?;
    let (state, detail) = s.step("waypoint-bootstrap")?;
    ensure!(state == "error", "waypoint-bootstrap: {state}: {detail}");
    for needle in [
        "already bootstrapped",
        "docker volume rm waypoint-server",
        "bootstrap-token",
    ] {
        ensure!(detail.contains(needle), "detail lacks {needle:?}: {detail}");
    }
    ensure!(s.containers()?["waypoint-server"].0 == server_id);
    s.vm.docker_ok(["volume", "inspect", "waypoint-server"])?;
    ensure!(
        s.bootstrap_tokens()?.len() == 1,
        "a second bootstrap happened"
    );
    ensure!(
        s.role_count("bootstrap")? == 0,
        "bootstrap container left behind"
    );
    // Recovery (a): put a valid token back.
    fs::rename(&kept, &token_file)?;
    s.up_expect(0, "token restored")?;

    // An image that is neither baked nor pullable (a registry on the VM's loopback where
    // nothing listens): a clear error; the running server is left alone.
    let absent = "127.0.0.1:9/pilot/absent:1";
    s.write_config(1, absent)?;
    s.up_expect(1, "image not available")?;
    let (state, detail) = s.step("images")?;
    ensure!(state == "error", "images: {state}: {detail}");
    for needle in [absent, s.images.to_str().unwrap_or_default(), "pull"] {
        ensure!(detail.contains(needle), "detail lacks {needle:?}: {detail}");
    }
    ensure!(s.containers()?["waypoint-server"].0 == server_id);

    // The floor's dockerd part measured by the harness too, side by side.
    let restart = s.vm.restart_dockerd()?;
    eprintln!(
        "waypoint: BENCH cold converge {:.2}s; floor {:.2}s = docker-tls step {:.2}s (dockerd \
         restart + TLS ready) + CLI image load {:.2}s + CLI containers {:.2}s (network, volume, \
         server until HTTPS, bootstrap, token, runner); agent over the floor {:+.2}s; the \
         agent's server readiness wait {:.2}s; warm up {:.2}s; harness `dockerd-ctl restart` \
         with the containers running {:.2}s",
        cold.as_secs_f64(),
        floor,
        docker_tls,
        floor_load.as_secs_f64(),
        floor_containers.as_secs_f64(),
        cold.as_secs_f64() - floor,
        server_ready,
        warm.as_secs_f64(),
        restart.as_secs_f64()
    );
    s.pg.cleanup()?;
    s.vm.cleanup()
}

/// Waypoint's official image runs as `waypoint` (uid 100). The server reads the key the agent
/// gave it (owned by uid 100, 0600: no other user of the container reads it) and serves the
/// agent CA's certificate; the runner verifies it and reaches Docker over TLS; a new
/// certificate (the old one removed, as a rotation would replace it) replaces the server
/// container, which serves the new one on the same data, and the runner comes back.
#[test]
fn the_official_images_user_serves_the_agents_certificate_and_a_new_one_replaces_it() -> Result<()>
{
    use std::os::unix::fs::MetadataExt;
    let s = setup_with(bake_standin_uid100)?;
    s.up_expect(0, "cold converge, uid-100 image")?;
    ensure!(s.status()?["condition"] == "healthy", "{}", s.status()?);
    let uid = s.vm.docker_ok(["exec", "waypoint-server", "id", "-u"])?;
    ensure!(uid.trim() == "100", "the server runs as uid {uid}");
    let tls = s.state.join("waypoint/server-tls");
    for (path, mode) in [
        (tls.clone(), 0o700),
        (tls.join("key.pem"), 0o600),
        (tls.join("cert.pem"), 0o644),
    ] {
        let m = fs::metadata(&path)?;
        ensure!(
            (m.uid(), m.gid(), m.mode() & 0o777) == (100, 1000, mode),
            "{}: {}:{} {:o}",
            path.display(),
            m.uid(),
            m.gid(),
            m.mode() & 0o777
        );
    }
    let served = |what: &str| -> Result<String> {
        let issued = cert_fingerprint(&fs::read(s.state.join("pki/waypoint/cert.pem"))?)?;
        let (verified, served) = tls_seen_from_outside(
            &s.vm,
            std::net::IpAddr::V4(s.vm.addr()),
            9701,
            &s.state.join("pki/ca/ca.pem"),
        )?;
        ensure!(
            verified && served == issued,
            "{what}: verified {verified}, serves {served}, issued {issued}"
        );
        Ok(served)
    };
    let first = served("first certificate")?;
    s.wait_runner_ready("waypoint-runner-1")?;
    let server_id = || {
        s.vm.docker_ok(["inspect", "-f", "{{.Id}}", "waypoint-server"])
    };
    let id_before = server_id()?;
    let bootstrap_token = s.read_secret("waypoint/bootstrap-token")?;

    fs::remove_file(s.state.join("pki/waypoint/cert.pem"))?;
    s.up_expect(0, "a new Waypoint certificate")?;
    let (state, detail) = s.step("pki")?;
    ensure!(
        state == "changed" && detail.contains("waypoint (missing)"),
        "pki: {state}: {detail}"
    );
    let second = served("new certificate")?;
    ensure!(
        second != first,
        "the server still serves the old certificate"
    );
    ensure!(
        server_id()? != id_before,
        "the server container was not replaced"
    );
    // Same data: the bootstrap token still authenticates, and the runner reconnects.
    let (code, body) = s.curl_outside("/v1/runners", Some(&bootstrap_token))?;
    ensure!(
        code == "200",
        "GET /v1/runners after the new certificate: {code} {body}"
    );
    s.wait_runner_ready("waypoint-runner-1")?;
    ensure!(
        s.bootstrap_tokens()? == vec![bootstrap_token],
        "one bootstrap, before and after"
    );
    s.vm.cleanup()
}

#[test]
fn database_outage_fails_open() -> Result<()> {
    let s = setup()?;
    s.pg.cut_link()?;
    let took = s.up_expect(2, "database link cut")?;
    let status = s.status()?;
    ensure!(status["condition"] == "degraded", "{status}");
    let (state, detail) = s.step("database")?;
    eprintln!("waypoint: database step with the link cut: {state}: {detail}");
    let target = format!("{}:{}", s.pg.addr(), s.pg.port());
    ensure!(
        state == "degraded" && detail.contains("database") && detail.contains(&target),
        "database step: {state}: {detail}"
    );
    // Everything else converged: Waypoint is up and its runner works.
    for step in ["waypoint-server", "waypoint-bootstrap", "waypoint-runners"] {
        let (state, detail) = s.step(step)?;
        ensure!(state == "changed", "{step}: {state}: {detail}");
    }
    let (code, _) = s.curl_outside("/", None)?;
    ensure!(code == "200", "server not answering: {code}");
    s.wait_runner_ready("waypoint-runner-1")?;
    ensure!(
        took < Duration::from_secs(20),
        "a cut database held `up` for {took:?}"
    );

    s.pg.restore_link()?;
    s.up_expect(0, "link restored")?;
    let (state, detail) = s.step("database")?;
    ensure!(state == "changed", "database: {state}: {detail}");
    s.app_creates_a_table("t_after_outage")?;

    // Not every database failure is the outside's: a wrong admin password needs a person, so
    // it is an error (exit 1), not degraded, and still holds back nothing else.
    fs::write(s.vm.dir().join("pg-admin-password"), "not-the-password\n")?;
    s.up_expect(1, "wrong admin password")?;
    let (state, detail) = s.step("database")?;
    ensure!(
        state == "error",
        "database with a wrong admin password: {state}: {detail}"
    );
    let (state, detail) = s.step("waypoint-runners")?;
    ensure!(state == "ok", "waypoint-runners: {state}: {detail}");
    s.pg.cleanup()?;
    s.vm.cleanup()
}

#[test]
fn sigkill_at_random_points_never_duplicates() -> Result<()> {
    let s = setup()?;
    s.write_config(2, IMAGE)?;
    let seed = seed_from_env("WAYPOINT_KILL_SEED")?;
    eprintln!("waypoint: kill test seed {seed} (set WAYPOINT_KILL_SEED to repeat)");
    let mut rng = Rng(seed);

    // Once through, so the kills land in this phase (Waypoint and database), not in the
    // first dockerd restart; and the password every later run must keep.
    s.up_expect(0, "baseline")?;
    let password = s.read_secret("database/password")?;

    // How long the phase takes from a reset: the range the kill points are drawn from.
    reset(&s)?;
    let phase = s.up_expect(0, "phase after reset")?;
    let points: u64 = 8;
    let slot = (phase.as_micros() as u64 / points).max(1);
    for i in 0..points {
        reset(&s)?;
        // One point in each eighth of the phase, so the kills spread over all of it.
        let at = Duration::from_micros(i * slot + rng.next_u64() % slot);
        let child =
            s.vm.cmd(&s.agent)
                .arg("--config")
                .arg(&s.config)
                .arg("up")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
        kill_after(child, at)?;
        let running = s.status().map(|st| running_steps(&st)).unwrap_or_default();
        let (code, stderr, _) = s.up(&[])?;
        ensure!(
            code == 0,
            "kill {i} at {at:?}: the next up exited {code}\n{}\n{stderr}",
            serde_json::to_string_pretty(&s.status()?)?
        );
        ensure!(
            s.role_count("server")? == 1,
            "kill {i} at {at:?}: not one server"
        );
        ensure!(s.role_count("runner")? == 2, "kill {i} at {at:?}: runners");
        ensure!(
            s.role_count("bootstrap")? == 0,
            "kill {i} at {at:?}: bootstrap container left"
        );
        let tokens = s.bootstrap_tokens()?;
        ensure!(
            tokens == vec![s.read_secret("waypoint/bootstrap-token")?],
            "kill {i} at {at:?}: {} bootstrap(s), or the stored token is not the server's",
            tokens.len()
        );
        ensure!(
            s.read_secret("database/password")? == password,
            "kill {i} at {at:?}: the database password changed"
        );
        eprintln!("waypoint: kill {i} at {at:.2?} (running: {running:?}): recovered");
    }
    s.app_creates_a_table("t_after_kills")?;
    s.wait_runner_ready("waypoint-runner-2")?;
    s.pg.cleanup()?;
    s.vm.cleanup()
}

/// Back to "nothing of Waypoint or the database yet" (Docker's TLS set-up stays): the agent's
/// containers, the image, the server's volume, the application role and database.
/// The stored database password stays: the next run must give the new role exactly it.
fn reset(s: &Setup) -> Result<()> {
    let ids =
        s.vm.docker_ok(["ps", "-aq", "--filter", "label=io.pilot.managed=true"])?;
    let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        s.vm.docker_ok(args)?;
    }
    let _ = s.vm.docker(["volume", "rm", "waypoint-server"])?;
    // The image too: the kills also land in the load from the baked tarball.
    let _ = s.vm.docker(["rmi", IMAGE])?;
    // The stored tokens stay: they belong to the removed volume's server, and the agent must
    // notice (the volume is gone) and discard them rather than hand them to the new server.
    s.pg.psql("DROP DATABASE IF EXISTS pilot")?;
    s.pg.psql("DROP ROLE IF EXISTS pilot_app")?;
    Ok(())
}
