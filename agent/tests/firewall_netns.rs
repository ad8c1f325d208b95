//! The real `nft`, inside network namespaces these tests create (`pa-unit-*`) and always
//! delete; the machine's own ruleset is never touched. Needs root: without it the tests fail
//! (they do not skip).

use std::path::PathBuf;
use std::process::{Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use pilot_agent::config::Config;
use pilot_agent::firewall::{FirewallError, FirewallReport, FirewallSpec, Nft, converge};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace deleted on drop (with the veth ends inside it), and a directory for
/// the firewall record of the agent that works in it.
struct Netns {
    name: String,
    dir: tempfile::TempDir,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (it creates network namespaces and runs nft inside them)"
        );
        let name = format!(
            "pa-unit-{}-{tag}{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name,
            dir: tempfile::tempdir().unwrap(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = ["ip", "netns", "exec", &self.name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    fn exec(&self, args: &[&str]) -> String {
        let argv = self.argv(args);
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        run(&refs)
    }

    fn nft(&self) -> Nft {
        Nft::with_argv(self.argv(&["nft"]))
    }

    /// The record of the last apply (`StateLayout::firewall_listing` on a host).
    fn record(&self) -> PathBuf {
        self.dir.path().join("firewall.json")
    }

    async fn converge(&self, spec: &FirewallSpec) -> Result<FirewallReport, FirewallError> {
        converge(spec, &self.nft(), Some(&self.record())).await
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = StdCommand::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(argv: &[&str]) -> String {
    let out = StdCommand::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spec_with(f: impl FnOnce(&mut Config)) -> FirewallSpec {
    let mut c = Config::default();
    f(&mut c);
    FirewallSpec::from_config(&c)
}

/// The table's handle: a new transaction that recreates the table gives it a new one.
fn table_handle(ns: &Netns) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ns.exec(&["nft", "-j", "list", "table", "inet", "pilot_agent"]))
            .unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("table").map(|t| t["handle"].to_string()))
        .unwrap()
}

#[tokio::test]
async fn applies_once_then_sends_nothing_and_leaves_other_tables_alone() {
    let ns = Netns::new("idem");
    // Someone else's table, as Docker or an operator would have.
    ns.exec(&[
        "nft",
        "add table inet other; add chain inet other c { type filter hook input priority 10; }; \
         add rule inet other c tcp dport 22 accept comment \"theirs\"",
    ]);
    let other_before = ns.exec(&["nft", "-j", "list", "table", "inet", "other"]);

    let nft = ns.nft();
    let spec = spec_with(|c| {
        c.firewall.docker_api_sources =
            vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        c.firewall.published_port_sources = vec!["198.51.100.0/24".parse().unwrap()];
        c.firewall.published_ports = vec![9701, 9702];
    });
    assert_eq!(nft.list_table("pilot_agent").await.unwrap(), None);
    let first = ns.converge(&spec).await.unwrap();
    assert!(first.changed);
    let handle = table_handle(&ns);

    let second = ns.converge(&spec).await.unwrap();
    assert!(!second.changed, "converged table must not be re-applied");
    assert_eq!(table_handle(&ns), handle, "no transaction was sent");
    assert_eq!(first.hash, second.hash);

    let listing = ns.exec(&["nft", "list", "table", "inet", "pilot_agent"]);
    assert!(listing.contains("tcp dport 2375 drop"), "{listing}");
    assert!(listing.contains("ct original proto-dst 9701"), "{listing}");
    assert!(!listing.contains("invalid"), "{listing}");
    assert_eq!(
        ns.exec(&["nft", "-j", "list", "table", "inet", "other"]),
        other_before,
        "another table was touched"
    );

    // Drift (a rule deleted by hand) is repaired, then quiet again.
    let v: serde_json::Value = serde_json::from_str(&ns.exec(&[
        "nft",
        "-j",
        "-a",
        "list",
        "chain",
        "inet",
        "pilot_agent",
        "input",
    ]))
    .unwrap();
    let rule_handle = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .nth(1)
        .unwrap()["handle"]
        .to_string();
    ns.exec(&[
        "nft",
        "delete",
        "rule",
        "inet",
        "pilot_agent",
        "input",
        "handle",
        &rule_handle,
    ]);
    assert!(ns.converge(&spec).await.unwrap().changed);
    assert!(!ns.converge(&spec).await.unwrap().changed);

    // A changed configuration replaces the table as a whole.
    let narrower = spec_with(|c| c.firewall.docker_api_sources = vec![]);
    assert!(ns.converge(&narrower).await.unwrap().changed);
    let listing = ns.exec(&["nft", "list", "table", "inet", "pilot_agent"]);
    assert!(!listing.contains("10.0.0.0/8"), "{listing}");
    assert_eq!(
        ns.exec(&["nft", "-j", "list", "table", "inet", "other"]),
        other_before
    );
}

#[tokio::test]
async fn nft_errors_carry_stderr() {
    let ns = Netns::new("err");
    let mut spec = spec_with(|_| {});
    // A name the nft command line cannot take: the listing fails with a syntax error.
    spec.table = "pilot agent".into();
    let err = ns.converge(&spec).await.unwrap_err();
    assert!(matches!(err, FirewallError::Nft { .. }), "{err}");
    assert!(err.to_string().contains("failed"), "{err}");
}

/// A listener in the "VM" namespace; killed on drop.
struct Listener(Child);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn listen(ns: &Netns, port: u16) -> Listener {
    let argv = ns.argv(&[
        "socat",
        &format!("TCP-LISTEN:{port},reuseaddr,fork"),
        "SYSTEM:echo hi",
    ]);
    Listener(
        Command::new(&argv[0])
            .args(&argv[1..])
            .kill_on_drop(true)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Whether a TCP client in `from` gets the listener's answer within a short timeout. A
/// dropped SYN shows as no answer (the client times out).
fn answers(from: &Netns, addr: &str, port: u16) -> bool {
    let argv = from.argv(&[
        "socat",
        "-T2",
        "-u",
        &format!("TCP:{addr}:{port},connect-timeout=1"),
        "-",
    ]);
    let out = StdCommand::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    out.stdout == b"hi\n"
}

fn wait_listening(ns: &Netns, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answers(ns, "127.0.0.1", port) {
        assert!(
            Instant::now() < deadline,
            "listener on {port} did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn packets_are_locked_as_configured() {
    let vm = Netns::new("vm");
    let outside = Netns::new("out");
    // A veth pair between the two namespaces (named after the pid: unique, and gone with
    // the namespaces).
    let (a, b) = (
        format!(
            "pa{}a{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ),
        format!("pa{}b", std::process::id() % 100_000),
    );
    vm.exec(&[
        "ip",
        "link",
        "add",
        &a,
        "type",
        "veth",
        "peer",
        "name",
        &b,
        "netns",
        &outside.name,
    ]);
    vm.exec(&["ip", "addr", "add", "10.250.0.1/30", "dev", &a]);
    vm.exec(&["ip", "link", "set", &a, "up"]);
    outside.exec(&["ip", "addr", "add", "10.250.0.2/30", "dev", &b]);
    outside.exec(&["ip", "link", "set", &b, "up"]);

    let _l2375 = listen(&vm, 2375);
    let _l2376 = listen(&vm, 2376);
    wait_listening(&vm, 2375);
    wait_listening(&vm, 2376);
    // Before: both open from outside.
    assert!(answers(&outside, "10.250.0.1", 2375));

    let allow_outside = spec_with(|c| {
        c.firewall.docker_api_sources = vec!["10.250.0.2/32".parse().unwrap()];
    });
    vm.converge(&allow_outside).await.unwrap();
    assert!(
        !answers(&outside, "10.250.0.1", 2375),
        "2375 must be locked from outside"
    );
    assert!(
        answers(&outside, "10.250.0.1", 2376),
        "2376 open to a configured source"
    );
    // The host itself: its own veth address arrives on lo.
    assert!(answers(&vm, "10.250.0.1", 2375), "loopback keeps 2375");

    let deny_outside = spec_with(|_| {});
    vm.converge(&deny_outside).await.unwrap();
    assert!(
        !answers(&outside, "10.250.0.1", 2376),
        "2376 closed to others"
    );
    assert!(answers(&vm, "127.0.0.1", 2376));
}

/// A veth pair: `a` in `ns_a` with `addr_a`, its peer `b` in `ns_b` with `addr_b`, both up.
/// IPv6 addresses are added without duplicate address detection (usable at once).
fn link(ns_a: &Netns, a: &str, addr_a: &[&str], ns_b: &Netns, b: &str, addr_b: &[&str]) {
    ns_a.exec(&[
        "ip", "link", "add", a, "type", "veth", "peer", "name", b, "netns", &ns_b.name,
    ]);
    for (ns, dev, addrs) in [(ns_a, a, addr_a), (ns_b, b, addr_b)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.exec(&["ip", "addr", "add", addr, "dev", dev, "nodad"]);
            } else {
                ns.exec(&["ip", "addr", "add", addr, "dev", dev]);
            }
        }
        ns.exec(&["ip", "link", "set", dev, "up"]);
    }
}

/// A unique interface name (at most 15 bytes) for the peer ends.
fn ifname(tag: &str) -> String {
    format!(
        "pa{}{tag}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether `f` holds within 10 s (tried every 100 ms).
fn eventually(f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A listener on IPv4 and IPv6.
fn listen6(ns: &Netns, port: u16) -> Listener {
    let argv = ns.argv(&[
        "socat",
        &format!("TCP6-LISTEN:{port},reuseaddr,fork,ipv6only=0"),
        "SYSTEM:echo hi",
    ]);
    Listener(
        Command::new(&argv[0])
            .args(&argv[1..])
            .kill_on_drop(true)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A VM namespace between a "container" namespace behind a bridge named `docker0` (Docker's
/// default bridge: 172.17.0.0/24, fd17::/64) and an "outside" namespace (10.251.0.0/30,
/// fd12::/64) that holds the metadata service's addresses, routed through it as on a cloud.
struct Cloud {
    container: Netns,
    vm: Netns,
    outside: Netns,
}

fn cloud() -> Cloud {
    let container = Netns::new("ctr");
    let vm = Netns::new("vm");
    let outside = Netns::new("out");
    link(
        &vm,
        "docker0",
        &["172.17.0.1/24", "fd17::1/64"],
        &container,
        &ifname("c"),
        &["172.17.0.2/24", "fd17::2/64"],
    );
    let out_dev = ifname("o");
    link(
        &vm,
        &ifname("v"),
        &["10.251.0.1/30", "fd12::1/64"],
        &outside,
        &out_dev,
        &["10.251.0.2/30", "fd12::2/64"],
    );
    container.exec(&["ip", "route", "add", "default", "via", "172.17.0.1"]);
    container.exec(&["ip", "-6", "route", "add", "default", "via", "fd17::1"]);
    for addr in ["169.254.169.254/32", "fd00:ec2::254/128"] {
        outside.exec(&["ip", "addr", "add", addr, "dev", "lo"]);
    }
    outside.exec(&["ip", "route", "add", "172.17.0.0/24", "via", "10.251.0.1"]);
    outside.exec(&["ip", "-6", "route", "add", "fd17::/64", "via", "fd12::1"]);
    vm.exec(&[
        "ip",
        "route",
        "add",
        "169.254.169.254/32",
        "via",
        "10.251.0.2",
    ]);
    vm.exec(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd00:ec2::254/128",
        "via",
        "fd12::2",
    ]);
    vm.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    vm.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    Cloud {
        container,
        vm,
        outside,
    }
}

/// Attacker: a container that asks the cloud's metadata service for the user-data (which
/// holds the database admin password). The host keeps its access.
#[tokio::test]
async fn containers_cannot_reach_the_metadata_service_the_host_can() {
    let c = cloud();
    let _md = listen6(&c.outside, 80);
    wait_listening(&c.outside, 80);
    let v4 = "169.254.169.254";
    let v6 = "[fd00:ec2::254]";
    // The path works before the table: the test can fail. (Neighbour discovery and the
    // first routes take a moment in fresh namespaces.)
    for addr in [v4, v6] {
        assert!(
            eventually(|| answers(&c.container, addr, 80)),
            "container to {addr} before"
        );
        assert!(
            eventually(|| answers(&c.vm, addr, 80)),
            "host to {addr} before"
        );
    }
    c.vm.converge(&spec_with(|_| {})).await.unwrap();
    let mut attempts = 0;
    for addr in [v4, v6] {
        for _ in 0..3 {
            attempts += 1;
            assert!(
                !answers(&c.container, addr, 80),
                "a container reached the metadata service at {addr}"
            );
        }
        assert!(
            eventually(|| answers(&c.vm, addr, 80)),
            "the host lost the metadata service at {addr}"
        );
    }
    eprintln!("metadata: {attempts} attempts from a container, 0 answers; the host answered");
}

/// The table that `pilot-agent firewall` applies when the configuration does not load, with
/// the real binary and the 100,000-deep compact sequence that once overflowed its stack.
#[tokio::test]
async fn a_broken_configuration_still_gets_the_fail_closed_table() {
    let c = cloud();
    let ports = [2375u16, 2376, 8443];
    let _listeners: Vec<Listener> = ports.iter().map(|p| listen6(&c.vm, *p)).collect();
    for p in ports {
        wait_listening(&c.vm, p);
        assert!(answers(&c.outside, "10.251.0.1", p), "{p} open before");
    }
    let bad = c.vm.dir.path().join("agent.yaml");
    std::fs::write(
        &bad,
        format!("host:\n  extra_names:\n  {}x\n", "- ".repeat(100_000)),
    )
    .unwrap();
    let argv = c.vm.argv(&[
        env!("CARGO_BIN_EXE_pilot-agent"),
        "--config",
        bad.to_str().unwrap(),
        "firewall",
    ]);
    let out = StdCommand::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:3:", bad.display())) && stderr.contains("deeper than 64"),
        "the error names the file, line and bound: {stderr}"
    );
    assert!(stderr.contains("fail-closed"), "{stderr}");

    let listing = c.vm.exec(&["nft", "list", "table", "inet", "pilot_agent"]);
    for p in ports {
        assert!(
            !answers(&c.outside, "10.251.0.1", p),
            "{p} answers an outside source under the fail-closed table:\n{listing}"
        );
        assert!(answers(&c.vm, "127.0.0.1", p), "{p} closed to loopback");
    }
    // Containers (on Docker's bridge) still reach Docker's TLS port and the endpoint.
    assert!(!answers(&c.container, "172.17.0.1", 2375));
    assert!(answers(&c.container, "172.17.0.1", 2376));
    assert!(answers(&c.container, "172.17.0.1", 8443));
    assert!(
        listing.contains("ip daddr 169.254.169.254 drop"),
        "{listing}"
    );
}

/// Attacker (root on the VM, or a package's `nftables.service`): a rule changed in place
/// under its own comment. The record of the last apply notices; comments alone would not.
#[tokio::test]
async fn a_rule_changed_in_place_is_replaced() {
    let ns = Netns::new("edit");
    let spec = spec_with(|_| {});
    assert!(ns.converge(&spec).await.unwrap().changed);
    assert!(!ns.converge(&spec).await.unwrap().changed);
    replace_lock_rule(&ns);
    let edited = ns.exec(&["nft", "list", "table", "inet", "pilot_agent"]);
    assert!(edited.contains("tcp dport 2375 accept"), "{edited}");
    // Comments alone (no record) see nothing: what the record is for.
    assert!(!converge(&spec, &ns.nft(), None).await.unwrap().changed);
    assert!(
        ns.converge(&spec).await.unwrap().changed,
        "the edit was not noticed"
    );
    let listing = ns.exec(&["nft", "list", "table", "inet", "pilot_agent"]);
    assert!(!listing.contains("tcp dport 2375 accept"), "{listing}");
    assert!(!ns.converge(&spec).await.unwrap().changed);
}

/// Replaces the rule that drops 2375 with one that accepts it, keeping its comment.
fn replace_lock_rule(ns: &Netns) {
    let v: serde_json::Value = serde_json::from_str(&ns.exec(&[
        "nft",
        "-j",
        "-a",
        "list",
        "chain",
        "inet",
        "pilot_agent",
        "input",
    ]))
    .unwrap();
    let rule = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .find(|r| r["expr"].to_string().contains("2375"))
        .unwrap()
        .clone();
    let comment = rule["comment"].as_str().unwrap();
    ns.exec(&[
        "nft",
        &format!(
            "replace rule inet pilot_agent input handle {} tcp dport 2375 accept comment \"{comment}\"",
            rule["handle"]
        ),
    ]);
}

/// Attacker: `nft flush ruleset` (as Debian's nftables.service does at start) and an
/// in-place edit, under the watcher `run` keeps. Prints how long each took to be undone.
#[tokio::test]
async fn the_watcher_puts_the_table_back_after_a_flush_or_an_edit() {
    let c = cloud();
    let _l = listen6(&c.vm, 2375);
    wait_listening(&c.vm, 2375);
    let spec = spec_with(|_| {});
    c.vm.converge(&spec).await.unwrap();
    assert!(!answers(&c.outside, "10.251.0.1", 2375));

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watched = spec.clone();
    let watcher = tokio::spawn(pilot_agent::firewall::watch::watch(
        move || watched.clone(),
        c.vm.nft(),
        c.vm.record(),
        move |r| {
            let _ = tx.send(r.took);
        },
    ));
    // The watcher's first check finds the table in place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.try_recv().is_err(),
        "the watcher replaced a table in place"
    );

    let mut times = Vec::new();
    for round in 0..20 {
        let started = Instant::now();
        if round % 2 == 0 {
            c.vm.exec(&["nft", "flush", "ruleset"]);
        } else {
            replace_lock_rule(&c.vm);
        }
        let _watcher_took = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the table was not put back in 10 s"))
            .unwrap();
        times.push(started.elapsed());
        assert!(
            !answers(&c.outside, "10.251.0.1", 2375),
            "round {round}: 2375 open after the watcher's repair"
        );
    }
    watcher.abort();
    let show = |mut t: Vec<Duration>| {
        t.sort();
        format!(
            "min {:?} median {:?} p90 {:?} max {:?}",
            t[0],
            t[t.len() / 2],
            t[t.len() * 9 / 10],
            t[t.len() - 1]
        )
    };
    let flushes: Vec<Duration> = times.iter().step_by(2).copied().collect();
    let edits: Vec<Duration> = times.iter().skip(1).step_by(2).copied().collect();
    eprintln!(
        "firewall watcher: from the change command's start to the table back: 10 flushes: {}; \
         10 in-place edits: {}",
        show(flushes),
        show(edits)
    );
}
