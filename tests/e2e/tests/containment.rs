//! What an attacker inside a container, or outside the VM, can reach, seen from their side:
//! real binaries (the agent, dockerd, busybox, curl, nft) in namespaces the test makes.
//!
//! - `containers_never_read_the_metadata_service`: the metadata server OUTSIDE the VM, as on
//!   a cloud ([`Vm::serve_metadata_outside`]: 169.254.169.254 and fd00:ec2::254 in the outside
//!   namespace, routed through the VM's link), with a secret in its user-data. After `up`, a
//!   busybox container on Docker's default bridge (IPv4 and IPv6) and one on the Pilot network
//!   the agent made try to read it, GCP's way (`wget --header 'Metadata-Flavor: Google'`) and
//!   AWS's (IMDSv2: a raw `PUT /latest/api/token` through `nc`, then the GET with the token):
//!   no attempt gets an answer, and the server logs no request. The host (a process in the
//!   VM's namespace) reads the secret both ways over both families. Control: with only the
//!   agent's two forward-chain metadata rules deleted, the same containers read the secret on
//!   every attempt; a second `up` puts them back and they read nothing again.
//! - `allow_lists_hold_from_outside_and_the_table_comes_back_under_run`: `pilot-agent run`
//!   with the endpoint, `waypoint.application_sources`, `firewall.docker_api_sources` and
//!   `endpoint.sources` all naming one outside address. From another outside address 2375,
//!   2376, 8443, 9701 and 9702 give no answer (not even a refusal); from the listed one
//!   9701/9702 connect, 2376 serves `/version` over mutual TLS and 8443 `/healthz`. Control:
//!   the agent stopped (SIGSTOP) and its table deleted, the unlisted address connects to every
//!   port; SIGCONT, and the watcher puts the table back. Then 10 `nft flush ruleset` and 10
//!   in-place edits (the rule dropping 2375 replaced by one accepting it, same comment): an
//!   outside scanner polling 2375 every 10 ms finds it locked again (figures printed; bound
//!   10 s), and `/metrics` counts every restore.
//! - `broken_config_boots_fail_closed`: `pilot-agent firewall` on a configuration nested
//!   100,000 deep exits 1 naming FILE:LINE:COL and leaves the fail-closed table: from outside
//!   nothing answers on 2375, 2376, 8443 (listeners put there by the test) or 9701/9702
//!   (published by a container, as the Waypoint server's are); loopback still reaches 2376 and
//!   8443, a container on docker0 reaches 2376 but not 2375 nor the metadata service.
//!   `pilot-agent status` exits 1 naming the first error, both with `--config` and on the
//!   default path /etc/pilot/agent.yaml (an overlay of /etc in a private mount namespace, so
//!   the machine's /etc is untouched). Control: before the table every port answers from
//!   outside and the container reads the metadata.
//!
//! Needs root and a machine prepared by scripts/setup.sh; without them every test FAILS.
//! Run: `cargo build --release --workspace && cargo nextest run --release -p pilot-e2e --test
//! containment` (`--no-capture` shows the figures).

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_e2e::agent::{
    AGENT_TABLE, Agent, ENDPOINT_PORT, EndpointToken, HttpsClient, PLAIN_PORT, TLS_PORT, nft,
    nft_script, signal,
};
use pilot_e2e::{bake_standin, phase, poll};
use pilot_harness::metadata::{Flavor, Imds, MetadataOptions, MetadataServer, Recorded};
use pilot_harness::{Vm, VmOptions, require_root};
use serde_json::{Map, Value, json};

/// The image reference the agent's configuration names (the content is the Waypoint stand-in).
const IMAGE: &str = "pilot/waypoint:0.11.4";
/// Debian's static busybox as an image: the attacker's tools (sh, wget, nc).
const BUSYBOX: &str = "e2e/busybox:containment";
/// Waypoint's gRPC and HTTP ports, published on the host.
const GRPC: u16 = 9701;
const HTTP: u16 = 9702;
/// The IPv6 subnet of the default bridge in the metadata test's VM.
const CONTAINER_V6: &str = "fd00:c0::/64";
/// Attempts per attacker, flavour and family (run at once: a dropped attempt costs its time-out).
const ATTEMPTS: usize = 3;
/// What each network step of an attempt may take: a dropped SYN is never answered.
const STEP_SECS: u32 = 2;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A secret nobody could guess or find elsewhere on the machine.
fn make_secret() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("pilot-containment-secret-{}-{nanos:x}", std::process::id())
}

/// User-data shaped like what the Pilot image writes: a cloud-config carrying a password.
fn user_data(secret: &str) -> String {
    format!(
        "#cloud-config\nwrite_files:\n- path: /etc/pilot/db-admin-password\n  permissions: \
         '0600'\n  content: {secret}\n"
    )
}

/// `waypoint:` for the stand-in baked in `images` (no runners: the server and the Pilot
/// network are what matter here), with `extra` lines appended.
fn waypoint_section(images: &Path, extra: &str) -> String {
    pilot_e2e::agent::waypoint_section(IMAGE, IMAGE, images, 0) + extra
}

/// min / median / p90 / max of `v`, in milliseconds.
fn stats(v: &[Duration]) -> String {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return "no samples".into();
    }
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    format!(
        "min {:.1} ms, median {:.1} ms, p90 {:.1} ms, max {:.1} ms ({} rounds)",
        ms[0],
        at(0.5),
        at(0.9),
        ms[ms.len() - 1],
        ms.len()
    )
}

// ---------------------------------------------------------------------------------------------
// Reading the metadata service the way an attacker in a container would

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Md {
    /// `Metadata-Flavor: Google` is all GCP asks for.
    Gcp,
    /// IMDSv2: a PUT for a token, then the GET carrying it.
    Aws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// A busybox `sh` script that makes `attempts` attempts at once to read the user-data and
/// prints each attempt's output between markers. Only busybox is used (`busybox APPLET`), so
/// the same script runs in the containers and on the host.
fn attack_script(md: Md, family: Family, attempts: usize) -> String {
    let (url_host, nc_host) = match family {
        Family::V4 => ("169.254.169.254", "169.254.169.254"),
        Family::V6 => ("[fd00:ec2::254]", "fd00:ec2::254"),
    };
    let t = STEP_SECS;
    let one = match md {
        Md::Gcp => format!(
            "busybox timeout {t} busybox wget -q -O - --header 'Metadata-Flavor: Google' \
             http://{url_host}/computeMetadata/v1/instance/attributes/user-data"
        ),
        // Raw HTTP through nc, as an attacker without curl does: the token is the answer's
        // last line (the server closes an HTTP/1.0 exchange after the answer). The sleep
        // keeps nc's input open until then: busybox nc half-closes the socket at the end of
        // its input, and the harness's server (hyper) may drop a half-closed request
        // unanswered, which made one attempt in a few fail without any firewall.
        Md::Aws => format!(
            r#"r=$({{ printf 'PUT /latest/api/token HTTP/1.0\r\nHost: {url_host}\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n'; busybox sleep 1; }} | busybox timeout {t} busybox nc {nc_host} 80); echo "$r"; tok=$(echo "$r" | busybox tail -n 1); {{ printf 'GET /latest/user-data HTTP/1.0\r\nHost: {url_host}\r\nX-aws-ec2-metadata-token: %s\r\n\r\n' "$tok"; busybox sleep 1; }} | busybox timeout {t} busybox nc {nc_host} 80"#
        ),
    };
    format!(
        r#"d=$(busybox mktemp -d)
attempt() {{ {one}; }}
i=0; while [ $i -lt {attempts} ]; do i=$((i+1)); (attempt >"$d/$i" 2>&1; echo "rc=$?" >>"$d/$i") & done
wait
i=0; while [ $i -lt {attempts} ]; do i=$((i+1)); echo BEGIN-ATTEMPT; busybox cat "$d/$i"; echo; echo END-ATTEMPT; done
busybox rm -rf "$d"
"#
    )
}

/// Attempts, answers (anything from the server, a refusal included) and leaks (the secret).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    attempts: usize,
    answers: usize,
    leaks: usize,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.attempts += o.attempts;
        self.answers += o.answers;
        self.leaks += o.leaks;
    }
}

fn tally(output: &str, secret: &str) -> Tally {
    let mut t = Tally::default();
    for chunk in output.split("BEGIN-ATTEMPT").skip(1) {
        let body = chunk.split("END-ATTEMPT").next().unwrap_or_default();
        t.attempts += 1;
        let leaked = body.contains(secret);
        let answered = leaked
            || body.contains("HTTP/")
            || body.contains("refused")
            || body.contains("reset by peer");
        t.answers += usize::from(answered);
        t.leaks += usize::from(leaked);
    }
    t
}

/// Who attacks: the host (a process in the VM's namespaces) or a container.
#[derive(Debug, Clone)]
enum Attacker {
    Host,
    Container(String),
}

impl Attacker {
    fn name(&self) -> &str {
        match self {
            Attacker::Host => "host",
            Attacker::Container(c) => c,
        }
    }

    fn run(&self, vm: &Vm, script: &str) -> Result<Output> {
        match self {
            Attacker::Host => vm
                .cmd("busybox")
                .args(["sh", "-c", script])
                .stdin(Stdio::null())
                .output()
                .context("cannot run busybox sh in the VM"),
            Attacker::Container(c) => vm.docker(["exec", c.as_str(), "sh", "-c", script]),
        }
    }
}

/// Every attacker in `who` (with its address family) attacks `md` at once, GCP then AWS
/// (the server speaks one flavour at a time); prints and returns each one's tally.
fn metadata_round(
    vm: &Vm,
    imds: &MetadataServer,
    label: &str,
    who: &[(Attacker, Family)],
    secret: &str,
) -> Result<Vec<(String, Tally)>> {
    let mut all = Vec::new();
    for md in [Md::Gcp, Md::Aws] {
        imds.set_flavor(match md {
            Md::Gcp => Flavor::Gcp,
            Md::Aws => Flavor::Aws(Imds::V2),
        });
        let script_for = |f: Family| attack_script(md, f, ATTEMPTS);
        let outputs: Vec<Result<Output>> = std::thread::scope(|s| {
            let handles: Vec<_> = who
                .iter()
                .map(|(a, f)| {
                    let script = script_for(*f);
                    s.spawn(move || a.run(vm, &script))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("attack thread panicked")))
                })
                .collect()
        });
        for ((a, f), out) in who.iter().zip(outputs) {
            let out = out?;
            let t = tally(&text(&out), secret);
            ensure!(
                t.attempts == ATTEMPTS,
                "{} {md:?} {f:?}: the script did not report its {ATTEMPTS} attempts ({}): {}",
                a.name(),
                out.status,
                text(&out)
            );
            eprintln!(
                "containment: metadata {label}: {} {md:?} {f:?}: {} attempts, {} answers, {} \
                 with the secret",
                a.name(),
                t.attempts,
                t.answers,
                t.leaks
            );
            // The raw output rides along in the name, for the message of a failed check.
            all.push((
                format!("{} {md:?} {f:?}; output:\n{}", a.name(), text(&out)),
                t,
            ));
        }
    }
    Ok(all)
}

/// Deletes the rules of the agent's `chain` whose listing contains any of `needles`;
/// returns them as listed.
fn delete_rules(vm: &Vm, chain: &str, needles: &[&str]) -> Result<Vec<String>> {
    let listing = nft(vm, &["-a", "list", "chain", "inet", AGENT_TABLE, chain])?;
    let mut deleted = Vec::new();
    for line in listing.lines() {
        if !needles.iter().any(|n| line.contains(n)) {
            continue;
        }
        let handle = line
            .rsplit_once("# handle ")
            .map(|(_, h)| h.trim().to_string())
            .with_context(|| format!("no handle in: {line}"))?;
        nft(
            vm,
            &[
                "delete",
                "rule",
                "inet",
                AGENT_TABLE,
                chain,
                "handle",
                &handle,
            ],
        )?;
        deleted.push(line.trim().to_string());
    }
    Ok(deleted)
}

fn user_data_requests(requests: &[Recorded]) -> usize {
    requests
        .iter()
        .filter(|r| r.path.ends_with("user-data") || r.path == "/latest/api/token")
        .count()
}

/// A busybox container `name` on Docker network `network`, sleeping.
fn start_container(vm: &Vm, name: &str, network: &str) -> Result<()> {
    vm.docker_ok([
        "run",
        "-d",
        "--name",
        name,
        "--network",
        network,
        BUSYBOX,
        "sleep",
        "3600",
    ])?;
    Ok(())
}

#[test]
fn containers_never_read_the_metadata_service() -> Result<()> {
    require_root()?;
    // Docker's default bridge with IPv6 too, so a container can try fd00:ec2::254.
    let mut daemon_config = Map::new();
    daemon_config.insert("ipv6".into(), json!(true));
    daemon_config.insert("fixed-cidr-v6".into(), json!(CONTAINER_V6));
    let vm = Vm::start(VmOptions {
        daemon_config,
        ..VmOptions::default()
    })?;
    let images = bake_standin(&vm, IMAGE)?;
    vm.import_busybox(BUSYBOX)?;
    let secret = make_secret();
    let mut options = MetadataOptions::gcp("5551212000000000042");
    options.user_data = Some(user_data(&secret));
    let imds = vm.serve_metadata_outside(options)?;
    // Debian's dockerd 20.10 masquerades the containers' IPv4 (their replies come back to the
    // VM's address) but not their IPv6: the outside needs a route back to that subnet.
    vm.outside_route(CONTAINER_V6)?;

    let agent = Agent::with_sections(&vm, &waypoint_section(&images, ""))?;
    let took = agent.up_ok(&vm)?;
    eprintln!("containment: up with the Waypoint stand-in took {took:.2?}");
    let daemon = vm.read_daemon_json()?;
    ensure!(
        daemon["ipv6"] == true,
        "the agent dropped the test's ipv6 key from daemon.json: {daemon}"
    );
    // dockerd turns IPv6 forwarding on for an IPv6 bridge; made sure of, since without it
    // the IPv6 control below would fail for a reason that is not the firewall's.
    let out = vm
        .cmd("sysctl")
        .args(["-w", "net.ipv6.conf.all.forwarding=1"])
        .output()?;
    ensure!(out.status.success(), "sysctl: {}", text(&out));

    // The containers start after `up`, which restarted dockerd.
    let network = vm.docker_ok(["network", "ls", "--format", "{{.Name}}"])?;
    ensure!(
        network.lines().any(|n| n == "pilot"),
        "the agent made no Pilot network: {network}"
    );
    start_container(&vm, "attacker-bridge", "bridge")?;
    start_container(&vm, "attacker-pilot", "pilot")?;
    let v6 = vm.docker_ok([
        "inspect",
        "-f",
        "{{.NetworkSettings.GlobalIPv6Address}}",
        "attacker-bridge",
    ])?;
    ensure!(!v6.is_empty(), "the bridge container has no IPv6 address");
    eprintln!("containment: attacker-bridge has IPv6 {v6}; attacker-pilot is IPv4 only");
    let attackers = [
        (Attacker::Container("attacker-bridge".into()), Family::V4),
        (Attacker::Container("attacker-bridge".into()), Family::V6),
        (Attacker::Container("attacker-pilot".into()), Family::V4),
    ];
    let host = [(Attacker::Host, Family::V4), (Attacker::Host, Family::V6)];

    // 1. The host reads the user-data both ways, over both families.
    phase("host", || {
        for (what, t) in metadata_round(&vm, &imds, "with the table", &host, &secret)? {
            ensure!(
                t.leaks == t.attempts,
                "{what}: the host itself cannot read its user-data: {t:?}"
            );
        }
        Ok(())
    })?;

    // 2. The containers read nothing, and the server never hears of them.
    let protected = |label: &str| -> Result<Tally> {
        imds.clear_requests();
        let mut total = Tally::default();
        for (what, t) in metadata_round(&vm, &imds, label, &attackers, &secret)? {
            ensure!(
                t.answers == 0 && t.leaks == 0,
                "{what}: a container got an answer from the metadata service: {t:?}"
            );
            total.add(t);
        }
        let seen = user_data_requests(&imds.requests());
        ensure!(
            seen == 0,
            "the metadata server saw {seen} request(s) from containers: {:?}",
            imds.requests()
        );
        Ok(total)
    };
    let first = phase("containers, with the table", || protected("with the table"))?;

    // 3. Control: only the agent's forward-chain metadata rules deleted (the rest of its table
    // in place), the same attacks read the secret every time: those two rules are what keeps
    // containers from a metadata service outside the VM.
    let control = phase("control: no metadata rules", || {
        let deleted = delete_rules(&vm, "forward", &["169.254.169.254", "fd00:ec2::254"])?;
        ensure!(
            deleted.len() == 2,
            "expected the two metadata rules in the forward chain, deleted {deleted:?}"
        );
        eprintln!("containment: control: deleted {deleted:?}");
        let mut total = Tally::default();
        for (what, t) in metadata_round(
            &vm,
            &imds,
            "CONTROL without the forward metadata rules",
            &attackers,
            &secret,
        )? {
            ensure!(
                t.leaks == t.attempts,
                "{what}: without the agent's metadata rules a container should read the \
                 user-data (is the harness routing it at all?): {t:?}"
            );
            total.add(t);
        }
        Ok(total)
    })?;

    // 4. `up` puts the table back, and they read nothing again.
    let again = phase("containers, table restored by up", || {
        agent.up_ok(&vm)?;
        protected("after up restored the table")
    })?;
    eprintln!(
        "containment: metadata from containers: with the table {} attempts, {} answers, {} \
         secrets; control without the forward metadata rules {} attempts, {} secrets; after \
         up {} attempts, {} answers",
        first.attempts,
        first.answers,
        first.leaks,
        control.attempts,
        control.leaks,
        again.attempts,
        again.answers
    );
    drop(imds);
    vm.cleanup()
}

// ---------------------------------------------------------------------------------------------
// Allow-lists from outside, and the table restored under `run`

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The TCP handshake completed.
    Connected,
    /// A reset: something answered.
    Refused,
    /// Nothing came back within the time-out (dropped).
    Silent,
}

/// `curl` in the outside namespace from `source` to `VM:port`: a TCP connect bounded by
/// 1.5 s (what follows it does not matter here).
fn spawn_probe(vm: &Vm, source: Ipv4Addr, port: u16) -> Result<Child> {
    vm.outside_cmd("curl")
        .args(["-s", "-o", "/dev/null", "--connect-timeout", "1.5"])
        .args(["--max-time", "3", "-w", "%{time_connect}"])
        .arg("--interface")
        .arg(source.to_string())
        .arg(format!("http://{}:{port}/", vm.addr()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run curl in the outside namespace")
}

fn classify(out: &Output) -> Reach {
    let connect: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    if connect > 0.0 {
        Reach::Connected
    } else if out.status.code() == Some(7) {
        Reach::Refused
    } else {
        Reach::Silent
    }
}

/// `attempts` probes of each of `ports` from `source`, all at once; prints a line per port.
fn probe_ports(
    vm: &Vm,
    label: &str,
    source: Ipv4Addr,
    ports: &[u16],
    attempts: usize,
) -> Result<BTreeMap<u16, Vec<Reach>>> {
    let mut children = Vec::new();
    for &p in ports {
        for _ in 0..attempts {
            children.push((p, spawn_probe(vm, source, p)?));
        }
    }
    let mut by_port: BTreeMap<u16, Vec<Reach>> = BTreeMap::new();
    for (p, c) in children {
        let out = c.wait_with_output()?;
        by_port.entry(p).or_default().push(classify(&out));
    }
    for (p, r) in &by_port {
        let answers = r.iter().filter(|x| **x != Reach::Silent).count();
        eprintln!(
            "containment: {label}: from {source} to {}:{p}: {} attempts, {answers} answers \
             ({r:?})",
            vm.addr(),
            r.len()
        );
    }
    Ok(by_port)
}

/// HTTPS GET from the outside namespace bound to `source`, with `curl_args` (CA, client
/// certificate); returns the HTTP code (000: no answer).
fn https_code(vm: &Vm, source: Ipv4Addr, url: &str, curl_args: &[&str]) -> Result<String> {
    let out = vm
        .outside_cmd("curl")
        .args(["-s", "-o", "/dev/null", "--connect-timeout", "2"])
        .args(["--max-time", "5", "-w", "%{http_code}"])
        .arg("--interface")
        .arg(source.to_string())
        .args(curl_args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("cannot run curl")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The value of `pilot_agent_firewall_restores_total` on `/metrics`, read over the VM's
/// loopback (a source the firewall always admits).
fn restores_total(vm: &Vm, client: &HttpsClient, token: &str) -> Result<u64> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ENDPOINT_PORT));
    let r =
        vm.in_vm_ns(|| client.get_bearer(addr, "/metrics", token, Duration::from_secs(5)))??;
    ensure!(r.code == 200, "/metrics: {} {}", r.code, r.body);
    r.body
        .lines()
        .find_map(|l| {
            l.strip_prefix("pilot_agent_firewall_restores_total")
                .and_then(|rest| rest.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .with_context(|| {
            format!(
                "no pilot_agent_firewall_restores_total in /metrics:\n{}",
                r.body
            )
        })
}

/// One TCP connect from the outside namespace's thread to `addr` (50 ms): whether it
/// got through, `None` for a refusal.
fn plain_open(addr: SocketAddr) -> Option<bool> {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(50)) {
        Ok(_) => Some(true),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Some(false),
        Err(_) => None,
    }
}

/// Polls from outside until 2375 is locked (a connect times out) and the agent's table is
/// listed, up to 10 s.
fn wait_locked(vm: &Vm) -> Result<()> {
    let addr = SocketAddr::from((vm.addr(), PLAIN_PORT));
    poll(Duration::from_secs(10), "2375 locked again", || {
        let locked = vm
            .in_outside_ns(|| plain_open(addr) == Some(false))
            .map_err(|e| format!("{e:#}"))?;
        let listed = nft(vm, &["list", "table", "inet", AGENT_TABLE]).is_ok();
        if locked && listed {
            Ok(Some(()))
        } else {
            Err(format!("locked {locked}, table listed {listed}"))
        }
    })
}

/// One round: `break_it` opens 2375 (it returns once nft has committed), then a scanner in the
/// outside namespace polls 2375 every 10 ms. Returns how long after `break_it` returned the
/// first probe found it locked, and how many probes got in before.
fn restore_round(vm: &Vm, break_it: impl FnOnce() -> Result<()>) -> Result<(Duration, usize)> {
    wait_locked(vm)?;
    break_it()?;
    let broke = Instant::now();
    let addr = SocketAddr::from((vm.addr(), PLAIN_PORT));
    vm.in_outside_ns(move || -> Result<(Duration, usize)> {
        let mut opens = 0;
        loop {
            let start = Instant::now();
            match plain_open(addr) {
                Some(true) => opens += 1,
                Some(false) => return Ok((start.duration_since(broke), opens)),
                None => bail!("2375 refused the scanner: the test's listener is gone"),
            }
            ensure!(
                broke.elapsed() < Duration::from_secs(10),
                "2375 still open 10 s after the ruleset was changed ({opens} probes got in)"
            );
            let next = start + Duration::from_millis(10);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    })?
}

/// The handle and comment of the rule in the agent's input chain that drops 2375.
fn lock_rule(vm: &Vm) -> Result<(String, String)> {
    let listing = nft(vm, &["-a", "list", "chain", "inet", AGENT_TABLE, "input"])?;
    let line = listing
        .lines()
        .find(|l| l.contains("dport") && l.contains("2375") && l.contains(" drop "))
        .with_context(|| format!("no rule dropping 2375 in:\n{listing}"))?;
    let comment = line
        .split_once("comment \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(c, _)| c.to_string())
        .with_context(|| format!("the 2375 rule has no comment: {line}"))?;
    let handle = line
        .rsplit_once("# handle ")
        .map(|(_, h)| h.trim().to_string())
        .with_context(|| format!("no handle in: {line}"))?;
    Ok((handle, comment))
}

/// `took_ms=N` of every restore the agent logged in `log`.
fn logged_restore_times(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains("the ruleset changed under the agent"))
        .filter_map(|l| {
            l.split("took_ms=")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok())
        })
        .map(Duration::from_millis)
        .collect()
}

#[test]
fn allow_lists_hold_from_outside_and_the_table_comes_back_under_run() -> Result<()> {
    require_root()?;
    let vm = Vm::start(VmOptions::default())?;
    let images = bake_standin(&vm, IMAGE)?;
    let token = EndpointToken::generate(&vm)?;
    let listed = vm.outside_alias(1)?;
    let stranger = vm.outside_alias(2)?;
    let sections = waypoint_section(
        &images,
        &format!("\x20 application_sources: [{listed}/32]\n"),
    ) + &format!(
        "endpoint:\n\
         \x20 listen: 0.0.0.0:{ENDPOINT_PORT}\n\
         \x20 token_sha256_file: {hash}\n\
         \x20 sources: [{listed}/32]\n\
         service:\n\
         \x20 interval_secs: 300\n",
        hash = Value::String(token.sha256_file.display().to_string()),
    );
    let agent = Agent::with_sections(&vm, &sections)?;
    let default_sources = format!("docker_api_sources: [{}/32]", vm.outside_addr());
    agent.edit_config(|t| {
        t.replace(
            &default_sources,
            &format!("docker_api_sources: [{listed}/32]"),
        )
    })?;
    ensure!(
        fs::read_to_string(agent.config_path())?.contains(&format!("[{listed}/32]")),
        "docker_api_sources not rewritten"
    );
    // A plain Docker API on 2375, which the table must lock whatever else happens.
    vm.start_socat(
        PLAIN_PORT,
        &format!("UNIX-CONNECT:{}", vm.docker_socket().display()),
    )?;
    let mut run = agent.spawn_run(&vm, &vm.dir().join("agent-run.log"))?;
    agent.wait_first_pass(&mut run, Duration::from_secs(150), "run's first pass")?;
    let endpoint_lo = SocketAddr::from((Ipv4Addr::LOCALHOST, ENDPOINT_PORT));
    poll(Duration::from_secs(30), "the endpoint listening", || {
        let up = vm
            .in_vm_ns(|| {
                TcpStream::connect_timeout(&endpoint_lo, Duration::from_millis(200)).is_ok()
            })
            .map_err(|e| format!("{e:#}"))?;
        Ok(up.then_some(()))
    })?;
    let ports = [PLAIN_PORT, TLS_PORT, ENDPOINT_PORT, GRPC, HTTP];

    // 1. The unlisted source: nothing answers. The listed one: in, on each port.
    phase("allow-lists", || {
        let from_stranger = probe_ports(&vm, "unlisted source", stranger, &ports, ATTEMPTS)?;
        for (p, r) in &from_stranger {
            ensure!(
                r.iter().all(|x| *x == Reach::Silent),
                "port {p} answered an address on no allow-list: {r:?}"
            );
        }
        let from_listed = probe_ports(&vm, "listed source", listed, &ports, ATTEMPTS)?;
        for (p, r) in &from_listed {
            let want = if *p == PLAIN_PORT {
                Reach::Silent
            } else {
                Reach::Connected
            };
            ensure!(
                r.iter().all(|x| *x == want),
                "port {p} from the listed source: {r:?} (want {want:?})"
            );
        }
        let op = agent.operator_dir();
        let (ca, cert, key) = (op.join("ca.pem"), op.join("cert.pem"), op.join("key.pem"));
        let docker_args = [
            "--cacert",
            ca.to_str().context("path")?,
            "--cert",
            cert.to_str().context("path")?,
            "--key",
            key.to_str().context("path")?,
        ];
        let version_url = format!("https://{}:{TLS_PORT}/version", vm.addr());
        let code = https_code(&vm, listed, &version_url, &docker_args)?;
        ensure!(
            code == "200",
            "2376 /version over mutual TLS from the listed source: {code}"
        );
        let stranger_code = https_code(&vm, stranger, &version_url, &docker_args)?;
        ensure!(
            stranger_code == "000",
            "2376 /version with the operator's certificate from the unlisted source: {stranger_code}"
        );
        let agent_ca = agent.ca_cert();
        let ca_args = ["--cacert", agent_ca.to_str().context("path")?];
        let healthz = format!("https://{}:{ENDPOINT_PORT}/healthz", vm.addr());
        let code = https_code(&vm, listed, &healthz, &ca_args)?;
        ensure!(
            code == "200",
            "8443 /healthz from the listed source: {code}"
        );
        eprintln!(
            "containment: listed source: 2376 /version over mutual TLS {code}, 8443 /healthz \
             {code}; unlisted with the operator's certificate: {stranger_code}"
        );
        Ok(())
    })?;

    // 2. Control: the agent frozen and its table gone, the unlisted source gets in everywhere.
    // SIGCONT lets the watcher read the events nft monitor queued meanwhile.
    phase("control: no table", || {
        signal(run.pid(), "STOP");
        let result = (|| {
            nft(&vm, &["delete", "table", "inet", AGENT_TABLE])?;
            let open = probe_ports(&vm, "CONTROL without the table", stranger, &ports, 1)?;
            for (p, r) in &open {
                ensure!(
                    r.iter().all(|x| *x == Reach::Connected),
                    "without the agent's table port {p} should answer anyone (is something \
                     else dropping it?): {r:?}"
                );
            }
            Ok(())
        })();
        signal(run.pid(), "CONT");
        result?;
        let t0 = Instant::now();
        wait_locked(&vm)?;
        eprintln!(
            "containment: control: the resumed agent's watcher restored the table; 2375 locked \
             {:.0?} after SIGCONT",
            t0.elapsed()
        );
        run.ensure_running()
    })?;

    // 3. The table flushed or edited in place: the watcher undoes it, the scanner sees it.
    phase("restores", || {
        let client = HttpsClient::new(&agent.ca_cert())?;
        let before = restores_total(&vm, &client, &token.token)?;
        let log_before = run.log()?.len();
        let mut flush = Vec::new();
        let mut flush_opens = 0;
        for _ in 0..10 {
            let (took, opens) =
                restore_round(&vm, || nft_script(&vm, "flush ruleset\n").map(|_| ()))?;
            flush.push(took);
            flush_opens += opens;
        }
        let mut edit = Vec::new();
        let mut edit_opens = 0;
        for _ in 0..10 {
            let (handle, comment) = lock_rule(&vm)?;
            let (took, opens) = restore_round(&vm, || {
                nft_script(
                    &vm,
                    &format!(
                        "replace rule inet {AGENT_TABLE} input handle {handle} tcp dport \
                         {PLAIN_PORT} accept comment \"{comment}\"\n"
                    ),
                )
                .map(|_| ())
            })?;
            edit.push(took);
            edit_opens += opens;
        }
        wait_locked(&vm)?;
        let after = restores_total(&vm, &client, &token.token)?;
        let logged = logged_restore_times(&run.log()?[log_before..]);
        eprintln!(
            "containment: `nft flush ruleset` x10: 2375 locked again, as the outside scanner \
             saw it, {} after nft returned; {flush_opens} probes got in meanwhile",
            stats(&flush)
        );
        eprintln!(
            "containment: rule edited in place x10: {}; {edit_opens} probes got in meanwhile",
            stats(&edit)
        );
        eprintln!(
            "containment: the agent's own figure (first event to table applied, from its log): \
             {}; /metrics restores {before} -> {after}",
            stats(&logged)
        );
        ensure!(
            after >= before + 20,
            "/metrics counted {} restores for 20 broken tables",
            after - before
        );
        run.ensure_running()
    })?;
    let st = run.terminate(Duration::from_secs(30))?;
    ensure!(st.success(), "run exited {st} after SIGTERM");
    vm.cleanup()
}

// ---------------------------------------------------------------------------------------------
// Booting with a configuration that does not load

/// `PATH:LINE:COL` in `text`, if it names `path` that way.
fn names_location(text: &str, path: &str) -> Option<String> {
    text.match_indices(path).find_map(|(i, _)| {
        let rest = &text[i + path.len()..];
        let mut parts = rest.strip_prefix(':')?.splitn(3, ':');
        let line = parts.next()?;
        let col: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        (!line.is_empty() && line.chars().all(|c| c.is_ascii_digit()) && !col.is_empty())
            .then(|| format!("{path}:{line}:{col}"))
    })
}

#[test]
fn broken_config_boots_fail_closed() -> Result<()> {
    require_root()?;
    let vm = Vm::start(VmOptions::default())?;
    vm.import_busybox(BUSYBOX)?;
    let secret = make_secret();
    let mut options = MetadataOptions::gcp("5551212000000000043");
    options.user_data = Some(user_data(&secret));
    let imds = vm.serve_metadata_outside(options)?;
    let agent = Agent::new(&vm)?;
    let broken = vm.dir().join("agent-broken.yaml");
    // A compact block sequence nested 100,000 deep: it once overflowed the parser's stack.
    fs::write(
        &broken,
        format!("host:\n  extra_names:\n  {}x\n", "- ".repeat(100_000)),
    )?;
    let broken_s = broken.display().to_string();
    let broken_agent = agent.with_config(&broken);

    // What listens at boot: whatever a stale daemon.json or a rogue process put on 2375 and
    // 2376 and the endpoint's port (socat), and the Waypoint server's published ports (a
    // container publishing them, so they go through Docker's DNAT and the forward hook).
    let docker_sock = format!("UNIX-CONNECT:{}", vm.docker_socket().display());
    for p in [PLAIN_PORT, TLS_PORT, ENDPOINT_PORT] {
        vm.start_socat(p, &docker_sock)?;
    }
    vm.docker_ok([
        "run",
        "-d",
        "--name",
        "published",
        "-p",
        &format!("{GRPC}:{GRPC}"),
        "-p",
        &format!("{HTTP}:{HTTP}"),
        BUSYBOX,
        "sh",
        "-c",
        &format!("httpd -p {GRPC} -h /tmp && exec httpd -f -p {HTTP} -h /tmp"),
    ])?;
    vm.docker_ok(["run", "-d", "--name", "attacker", BUSYBOX, "sleep", "3600"])?;
    let ports = [PLAIN_PORT, TLS_PORT, ENDPOINT_PORT, GRPC, HTTP];
    let outside = vm.outside_addr();
    let gateway = vm.container_subnet().trim_end_matches(".0/24").to_string() + ".1";
    let from_container = |port: u16| -> Result<bool> {
        let out = vm.docker([
            "exec",
            "attacker",
            "busybox",
            "timeout",
            "2",
            "busybox",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{gateway}:{port}/_ping"),
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "OK")
    };
    let container_md = [(Attacker::Container("attacker".into()), Family::V4)];

    // Control: before any table, everything answers.
    phase("control: before the table", || {
        wait_published(&vm)?;
        let open = probe_ports(&vm, "CONTROL before the boot table", outside, &ports, 1)?;
        for (p, r) in &open {
            ensure!(
                r.iter().all(|x| *x == Reach::Connected),
                "before any table port {p} should answer: {r:?}"
            );
        }
        ensure!(
            from_container(PLAIN_PORT)?,
            "a container cannot reach 2375 before the table"
        );
        for (what, t) in metadata_round(
            &vm,
            &imds,
            "CONTROL before the boot table",
            &container_md,
            &secret,
        )? {
            ensure!(
                t.leaks == t.attempts,
                "{what}: no leak without a table: {t:?}"
            );
        }
        Ok(())
    })?;

    // The boot unit's command on the broken configuration.
    phase("firewall", || {
        let (out, took) = broken_agent.run(&vm, ["firewall"])?;
        let all = text(&out);
        let at = names_location(&all, &broken_s);
        ensure!(
            out.status.code() == Some(1) && at.is_some(),
            "pilot-agent firewall on a broken configuration: {} (want exit 1 naming \
             {broken_s}:LINE:COL):\n{all}",
            out.status
        );
        let table = nft(&vm, &["list", "table", "inet", AGENT_TABLE])?;
        eprintln!(
            "containment: `pilot-agent firewall` on the broken configuration: exit 1 in \
             {took:.2?}, naming {}; the fail-closed table has {} rules",
            at.unwrap_or_default(),
            table.matches("comment \"pilot-agent").count()
        );
        Ok(())
    })?;

    phase("fail-closed", || {
        let closed = probe_ports(&vm, "fail-closed, from outside", outside, &ports, ATTEMPTS)?;
        for (p, r) in &closed {
            ensure!(
                r.iter().all(|x| *x == Reach::Silent),
                "the fail-closed table let port {p} answer outside: {r:?}"
            );
        }
        // Not closed to the host itself and its containers: loopback reaches 2376 and the
        // endpoint, a container on docker0 reaches 2376 (the runners' path) but not 2375.
        for p in [TLS_PORT, ENDPOINT_PORT] {
            let addr = SocketAddr::from((vm.addr(), p));
            let ok =
                vm.in_vm_ns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())?;
            ensure!(ok, "fail-closed: the host cannot reach its own port {p}");
        }
        ensure!(
            from_container(TLS_PORT)?,
            "fail-closed: a container on docker0 cannot reach 2376"
        );
        ensure!(
            !from_container(PLAIN_PORT)?,
            "fail-closed: a container reached 2375"
        );
        imds.clear_requests();
        for (what, t) in metadata_round(&vm, &imds, "fail-closed", &container_md, &secret)? {
            ensure!(
                t.answers == 0,
                "{what}: the metadata service answered a container under the fail-closed \
                 table: {t:?}"
            );
        }
        ensure!(
            user_data_requests(&imds.requests()) == 0,
            "the metadata server heard from a container: {:?}",
            imds.requests()
        );
        eprintln!(
            "containment: fail-closed: the host reaches 2376 and 8443 over loopback, a \
             container on docker0 reaches 2376 but not 2375"
        );
        Ok(())
    })?;

    phase("status", || {
        let (out, _) = broken_agent.run(&vm, ["status"])?;
        let all = text(&out);
        let at = names_location(&all, &broken_s);
        ensure!(
            out.status.code() == Some(1) && at.is_some(),
            "status --config BROKEN: {} (want exit 1 naming {broken_s}:LINE:COL):\n{all}",
            out.status
        );
        eprintln!(
            "containment: status --config on the broken configuration: exit 1, naming {}",
            at.unwrap_or_default()
        );
        // The boot unit and an operator's `status` use the default path. Give this command
        // alone a /etc/pilot/agent.yaml: an overlay of /etc in a private mount namespace.
        let upper = vm.dir().join("etc-upper");
        let work = vm.dir().join("etc-work");
        fs::create_dir_all(&upper)?;
        fs::create_dir_all(&work)?;
        let script = r#"set -e
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$2,workdir=$3" /etc
mkdir -p /etc/pilot
cp "$1" /etc/pilot/agent.yaml
set +e
"$4" firewall; echo "firewall-exit=$?" >&2
"$4" status; echo "status-exit=$?" >&2
"#;
        let out = vm
            .cmd("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(&broken)
            .arg(&upper)
            .arg(&work)
            .arg(agent.bin())
            .env_remove("PILOT_AGENT_CONFIG")
            .stdin(Stdio::null())
            .output()
            .context("cannot run unshare")?;
        let all = text(&out);
        let default = "/etc/pilot/agent.yaml";
        ensure!(
            all.contains("firewall-exit=1")
                && all.contains("status-exit=1")
                && all.contains("warning")
                && names_location(&all, default).is_some(),
            "firewall and status on the default path: want exit 1 each and a warning naming \
             {default}:LINE:COL:\n{all}"
        );
        let warning = all
            .lines()
            .find(|l| l.contains("warning") && l.contains(default))
            .unwrap_or_default();
        eprintln!("containment: status on the default path: exit 1, {warning}");
        ensure!(
            !Path::new("/etc/pilot/agent.yaml").exists(),
            "the overlay leaked into the machine's /etc"
        );
        Ok(())
    })?;
    drop(imds);
    vm.cleanup()
}

/// Waits until the published ports answer on the VM's address from inside (Docker's proxy
/// and DNAT are set up once the container runs).
fn wait_published(vm: &Vm) -> Result<()> {
    for p in [GRPC, HTTP] {
        let addr = SocketAddr::from((vm.addr(), p));
        poll(
            Duration::from_secs(10),
            &format!("port {p} published"),
            || {
                let ok = vm
                    .in_vm_ns(|| {
                        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                    })
                    .map_err(|e| format!("{e:#}"))?;
                Ok(ok.then_some(()))
            },
        )?;
    }
    Ok(())
}

#[test]
fn the_attack_script_is_counted_as_printed() {
    let out = "BEGIN-ATTEMPT\nHTTP/1.0 200 OK\r\n\r\nsecret-1\nrc=0\nEND-ATTEMPT\n\
               BEGIN-ATTEMPT\nrc=143\nEND-ATTEMPT\n\
               BEGIN-ATTEMPT\nwget: server returned error: HTTP/1.1 403 Forbidden\nrc=1\nEND-ATTEMPT\n";
    assert_eq!(
        tally(out, "secret-1"),
        Tally {
            attempts: 3,
            answers: 2,
            leaks: 1
        }
    );
    assert_eq!(
        names_location("pilot-agent: /x/a.yaml:3:205: too deep", "/x/a.yaml").as_deref(),
        Some("/x/a.yaml:3:205")
    );
    assert_eq!(names_location("/x/a.yaml: cannot read", "/x/a.yaml"), None);
    assert!(attack_script(Md::Aws, Family::V6, 2).contains("busybox nc fd00:ec2::254 80"));
}
