//! The floor of a cold converge: the work any converge to this end state must pay, measured
//! by hand on the same VM so that benchmarks and suites can put the agent's time next to it.
//!
//! - [`docker_tls_floor`]: dockerd switched to an equivalent mutual-TLS `daemon.json` (made
//!   with the openssl CLI): `dockerd-ctl restart` plus the wait until 2376 answers `/version`
//!   over mutual TLS (polled every 5 ms from inside the VM). The VM is put back as it was.
//! - [`container_floor`]: the Waypoint container work, done with the docker CLI: load the
//!   baked image; network and volume; the server until it answers HTTPS; its bootstrap; its
//!   advertise address; a runner token; one runner. Everything (the image too) is removed again afterwards. The
//!   CLI's own start-up per command makes this a slight over-estimate.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_harness::Vm;
use serde_json::{Value, json};

use crate::agent::{TLS_PORT, TlsClient};

/// The TLS part of the floor, measured on `vm` whose dockerd runs its original
/// configuration: returns (restart + TLS ready, the restart command alone). Afterwards the
/// original daemon.json is back and dockerd restarted with it (untimed).
pub fn docker_tls_floor(vm: &Vm) -> Result<(Duration, Duration)> {
    let original = fs::read(vm.daemon_json())?;
    let tls = make_tls_material(vm)?;
    let mut cfg: Value = serde_json::from_slice(&original)?;
    cfg["hosts"] = json!([
        format!("unix://{}", vm.docker_socket().display()),
        format!("tcp://0.0.0.0:{TLS_PORT}")
    ]);
    cfg["tls"] = json!(true);
    cfg["tlsverify"] = json!(true);
    cfg["tlscacert"] = json!(tls.join("ca.pem"));
    cfg["tlscert"] = json!(tls.join("server-cert.pem"));
    cfg["tlskey"] = json!(tls.join("server-key.pem"));
    vm.write_daemon_json(&cfg)?;
    let client = TlsClient::new(
        &tls.join("ca.pem"),
        &tls.join("client-cert.pem"),
        &tls.join("client-key.pem"),
    )?;
    let probe_addr = SocketAddr::from(([127, 0, 0, 1], TLS_PORT));
    let t0 = Instant::now();
    vm.restart_dockerd()?;
    let restart = t0.elapsed();
    let floor = vm.in_vm_ns(|| -> Result<Duration> {
        let deadline = t0 + Duration::from_secs(30);
        loop {
            let last = match client.get(probe_addr, "/version", Duration::from_secs(1)) {
                Ok((200, _)) => return Ok(t0.elapsed()),
                Ok((code, body)) => format!("HTTP {code}: {body}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("dockerd did not answer /version over mutual TLS within 30 s: {last}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })??;
    // Back to the untouched host, untimed.
    vm.write_daemon_json(&serde_json::from_slice(&original)?)?;
    vm.restart_dockerd()?;
    fs::remove_dir_all(&tls)?;
    Ok((floor, restart))
}

/// The container part of the floor with the docker CLI on `vm`'s socket: returns (image load,
/// the rest: network, volume, server until HTTPS, bootstrap, token, runner started). `tarball`
/// is the baked `docker save` of `image`, which must be absent from dockerd; everything made
/// is removed afterwards, the image too.
pub fn container_floor(vm: &Vm, tarball: &Path, image: &str) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    vm.docker_ok([
        "load",
        "-q",
        "-i",
        tarball.to_str().context("tarball path is not UTF-8")?,
    ])?;
    let load = t0.elapsed();
    let t1 = Instant::now();
    vm.docker_ok([
        "network",
        "create",
        "--subnet",
        "172.28.0.0/24",
        "floor-net",
    ])?;
    vm.docker_ok(["volume", "create", "floor-data"])?;
    vm.docker_ok(
        [
            "run",
            "-d",
            "--name",
            "floor-server",
            "--network",
            "floor-net",
            "-v",
            "floor-data:/data",
            "-p",
            "29701:9701",
            "-p",
            "29702:9702",
            image,
        ]
        .into_iter()
        .chain(crate::WAYPOINT_SERVER_RUN),
    )?;
    let ip = vm.docker_ok([
        "inspect",
        "-f",
        "{{(index .NetworkSettings.Networks \"floor-net\").IPAddress}}",
        "floor-server",
    ])?;
    crate::wait_https_200(
        || vm.cmd("curl"),
        &format!("https://{ip}:9702/"),
        "1",
        Duration::from_secs(20),
        "the floor server to answer",
    )?;
    let token = vm.docker_ok([
        "run",
        "--name",
        "floor-boot",
        "--network",
        "container:floor-server",
        image,
        "server",
        "bootstrap",
        "-server-addr=127.0.0.1:9701",
        "-server-tls-skip-verify",
    ])?;
    // `waypoint ARGS` in the server against its loopback with the bootstrap token, as the
    // agent runs it.
    let server_cli = |args: &[&str]| {
        let token_env = format!("WAYPOINT_SERVER_TOKEN={}", token.trim());
        let mut argv = vec![
            "exec",
            "-e",
            "WAYPOINT_SERVER_ADDR=127.0.0.1:9701",
            "-e",
            token_env.as_str(),
            "-e",
            "WAYPOINT_SERVER_TLS=true",
            "-e",
            "WAYPOINT_SERVER_TLS_SKIP_VERIFY=true",
            "floor-server",
            "waypoint",
        ];
        argv.extend_from_slice(args);
        vm.docker_ok(argv)
    };
    // The advertise address the agent sets after the bootstrap.
    server_cli(&[
        "server",
        "config-set",
        &format!("-advertise-addr={}:9701", vm.addr()),
    ])?;
    let runner_token = server_cli(&["token", "new"])?;
    vm.docker_ok([
        "run",
        "-d",
        "--name",
        "floor-runner",
        "--network",
        "floor-net",
        "-e",
        "WAYPOINT_SERVER_ADDR=floor-server:9701",
        "-e",
        &format!("WAYPOINT_SERVER_TOKEN={}", runner_token.trim()),
        "-e",
        "WAYPOINT_SERVER_TLS=true",
        "-e",
        "WAYPOINT_SERVER_TLS_SKIP_VERIFY=true",
        image,
        "runner",
        "agent",
    ])?;
    let rest = t1.elapsed();
    vm.docker_ok(["rm", "-f", "floor-runner", "floor-boot", "floor-server"])?;
    vm.docker_ok(["volume", "rm", "floor-data"])?;
    vm.docker_ok(["network", "rm", "floor-net"])?;
    vm.docker_ok(["rmi", image])?;
    Ok((load, rest))
}

/// A CA, a server certificate for dockerd (127.0.0.1, the VM's address, localhost) and a
/// client certificate, made with the openssl CLI in `VM_DIR/bench-tls`.
fn make_tls_material(vm: &Vm) -> Result<PathBuf> {
    let dir = vm.dir().join("bench-tls");
    fs::create_dir_all(&dir)?;
    let p = |n: &str| dir.join(n);
    fs::write(
        p("server.ext"),
        format!(
            "subjectAltName=IP:127.0.0.1,IP:{},DNS:localhost\nextendedKeyUsage=serverAuth\n",
            vm.addr()
        ),
    )?;
    fs::write(p("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &["-days", "1", "-subj", "/CN=bench CA"],
            &["-keyout", "ca-key.pem", "-out", "ca.pem"],
        ],
    )?;
    for who in ["server", "client"] {
        let (key, csr, cert, ext) = (
            format!("{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}-cert.pem"),
            format!("{who}.ext"),
        );
        openssl(
            &dir,
            &[
                &["req"],
                &ec[..],
                &["-subj", &format!("/CN=bench {who}")],
                &["-keyout", &key, "-out", &csr],
            ],
        )?;
        openssl(
            &dir,
            &[
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca-key.pem",
                ],
                &[
                    "-CAcreateserial",
                    "-days",
                    "1",
                    "-extfile",
                    &ext,
                    "-out",
                    &cert,
                ],
            ],
        )?;
    }
    Ok(dir)
}

fn openssl(dir: &Path, parts: &[&[&str]]) -> Result<()> {
    let args: Vec<&str> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let out = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .context("cannot run openssl")?;
    ensure!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// min / median / max of `v` as JSON.
pub fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    json!({
        "min": s.first().copied().unwrap_or_default(),
        "median": median,
        "max": s.last().copied().unwrap_or_default(),
    })
}
