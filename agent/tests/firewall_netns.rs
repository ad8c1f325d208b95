//! The real `nft`, inside network namespaces these tests create (`pa-unit-*`) and always
//! delete; the machine's own ruleset is never touched. Needs root: without it the tests fail
//! (they do not skip).

use std::process::{Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use pilot_agent::config::Config;
use pilot_agent::firewall::{FirewallError, FirewallSpec, Nft, converge};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace deleted on drop (with the veth ends inside it).
struct Netns {
    name: String,
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
        let ns = Netns { name };
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
    let first = converge(&spec, &nft).await.unwrap();
    assert!(first.changed);
    let handle = table_handle(&ns);

    let second = converge(&spec, &nft).await.unwrap();
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
    assert!(converge(&spec, &nft).await.unwrap().changed);
    assert!(!converge(&spec, &nft).await.unwrap().changed);

    // A changed configuration replaces the table as a whole.
    let narrower = spec_with(|c| c.firewall.docker_api_sources = vec![]);
    assert!(converge(&narrower, &nft).await.unwrap().changed);
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
    let nft = ns.nft();
    let mut spec = spec_with(|_| {});
    // A name the nft command line cannot take: the listing fails with a syntax error.
    spec.table = "pilot agent".into();
    let err = converge(&spec, &nft).await.unwrap_err();
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

    let nft = vm.nft();
    let allow_outside = spec_with(|c| {
        c.firewall.docker_api_sources = vec!["10.250.0.2/32".parse().unwrap()];
    });
    converge(&allow_outside, &nft).await.unwrap();
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
    converge(&deny_outside, &nft).await.unwrap();
    assert!(
        !answers(&outside, "10.250.0.1", 2376),
        "2376 closed to others"
    );
    assert!(answers(&vm, "127.0.0.1", 2376));
}
