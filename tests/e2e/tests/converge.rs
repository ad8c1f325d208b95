//! The converge core end to end, in a simulated VM whose dockerd also
//! has a plain, unauthenticated Docker API on 2375: a socat listener in front of its unix
//! socket, started before the agent runs, which the agent's firewall must lock.
//!
//! - `up_locks_2375_serves_mutual_tls_and_changes_nothing_twice` (one VM, in order):
//!   1. before `up`, 2375 answers `/_ping` from the outside namespace (the probe can fail);
//!      after `up` (exit 0) it gives no answer from outside but still answers on loopback
//!      inside the VM; 2376 without a client certificate gets no API answer (the TLS
//!      handshake is refused, although TCP connects); from an address outside
//!      `docker_api_sources` 2376 does not even connect; the operator's `docker version`
//!      works over mutual TLS at the VM's veth address against the agent's CA, and fails
//!      with a foreign CA (so the server really is verified).
//!   2. an outside scanner polls 2375 and 2376 (plain HTTP, and TLS without a certificate)
//!      throughout the first `up`: 2376 never answers; 2375, whose listener predates the
//!      agent, never answers a probe started after the agent's table was committed (as seen
//!      by `nft monitor`); dockerd accepts TCP on 2376 only after that commit; the agent sent
//!      exactly one nft transaction, touching only its own table.
//!   3. a second `up` exits 0, restarts nothing (dockerd's PID), rewrites no file (content,
//!      mtime, inode and mode of every file under the state dir but status.json and
//!      history.jsonl, which record the pass, and of daemon.json) and sends no nft
//!      transaction (the monitor, shown to catch transactions by marks of our own and by
//!      step 6, prints nothing between two marks around it).
//!   6. the operator's table `inet operator_owned` (made before `up`) is identical, handles
//!      included, after `up`, after `up` repairs a drifted agent table and after
//!      `pilot-agent firewall` re-creates a deleted one; the agent's table comes back
//!      identical each time.
//!   5. a configuration with four errors (unknown key, bad CIDR, bad port, wrong type) gets
//!      each reported at its exact line:col by `config validate` and by `up` (exit 1), and
//!      daemon.json, the ruleset (`nft -s list ruleset`: counters of Docker's own rules
//!      aside) and the state dir (status.json included) stay byte-identical, mtimes too.
//! - `sigkill_at_random_points_then_up_converges` (a second VM): `up` from a cold host is
//!   SIGKILLed at PILOT_E2E_KILLS (default 12) random points spread over a measured cold
//!   converge (half uniform, half log-uniform: dense where files are written) (seed printed; PILOT_E2E_SEED replays it), then `up` runs again: it always
//!   exits 0, the certificates chain to the CA and match their keys, every JSON and PEM file
//!   parses, no temporary file is left, every key and certificate the killed run left is
//!   kept (no regenerated secrets), and the operator's `docker version` works. Between
//!   iterations the VM is reset to cold (state dir removed, the original daemon.json back,
//!   dockerd restarted, the agent's table deleted).
//!
//! Needs root and a machine prepared by scripts/setup.sh; without them every test FAILS.
//! Run: `cargo build --release --workspace && cargo test --release -p pilot-e2e --test converge`
//! (`-- --nocapture` shows the figures).

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_e2e::agent::{
    AGENT_TABLE, Agent, NftMonitor, PLAIN_PORT, TLS_PORT, dockerd_pid, nft, nft_script, snapshot,
    snapshot_diff,
};
use pilot_e2e::crash::{Sigkill, reset_cold};
use pilot_e2e::{foreign_ca, phase};
use pilot_harness::Vm;
use serde_json::Value;

/// A table the operator owns in the VM; the agent must never touch it.
const OPERATOR_TABLE: &str = "table inet operator_owned {\n\
    \tchain input {\n\
    \t\ttype filter hook input priority filter + 10; policy accept;\n\
    \t\ttcp dport 9999 ip saddr 192.0.2.0/24 accept comment \"the operator's rule\"\n\
    \t}\n\
    }\n";

fn start_vm() -> Result<Vm> {
    pilot_e2e::start_vm("converge")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every step's state in status.json, as "name=state".
fn step_states(status: &Value) -> Vec<String> {
    status["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| format!("{}={}", s["name"], s["state"]).replace('"', ""))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Probes

/// One probe of a port from the outside namespace.
#[derive(Debug, Clone)]
struct Probe {
    started: Instant,
    port: u16,
    kind: ProbeKind,
    /// TCP connected.
    connected: bool,
    /// A Docker API answer, if one came back.
    answer: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    /// `GET /_ping` in plain HTTP.
    Plain,
    /// `GET /_ping` over TLS without a client certificate (curl -k: the attacker does not
    /// care who the server is).
    TlsNoCert,
}

/// `GET /_ping` in plain HTTP; returns whether TCP connected and the bytes that came back
/// within `read_timeout` (None when nothing did).
fn plain_ping(
    addr: SocketAddr,
    connect_timeout: Duration,
    read_timeout: Duration,
) -> (bool, Option<String>) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, connect_timeout) else {
        return (false, None);
    };
    let _ = s.set_read_timeout(Some(read_timeout));
    let _ = s.set_write_timeout(Some(read_timeout));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return (true, None);
    }
    let mut buf = Vec::new();
    // Until EOF or the timeout; what arrived before an error is kept in `buf`.
    let _ = s.read_to_end(&mut buf);
    if buf.is_empty() {
        (true, None)
    } else {
        (true, Some(String::from_utf8_lossy(&buf).into_owned()))
    }
}

/// Whether plain-HTTP bytes from `port` are a Docker API answer. On 2375 (socat straight
/// to dockerd's socket) any byte is. On 2376 dockerd speaks TLS; Go answers a plain request
/// there with a bare "400 ... HTTPS server" that carries no API header, which is not one.
fn is_docker_answer(port: u16, text: &str) -> bool {
    port == PLAIN_PORT || text.to_ascii_lowercase().contains("api-version:")
}

fn plain_probe(addr: SocketAddr, port: u16, connect_timeout: Duration) -> Probe {
    let started = Instant::now();
    let (connected, text) = plain_ping(
        SocketAddr::new(addr.ip(), port),
        connect_timeout,
        Duration::from_millis(500),
    );
    Probe {
        started,
        port,
        kind: ProbeKind::Plain,
        connected,
        answer: text.filter(|t| is_docker_answer(port, t)),
    }
}

/// curl from the outside namespace to `https://VM:2376/_ping` without a client certificate,
/// optionally from `source`; returns the probe and curl's exit code.
fn tls_no_cert_probe(vm: &Vm, source: Option<Ipv4Addr>, connect_timeout: &str) -> (Probe, i32) {
    let started = Instant::now();
    let mut c = vm.outside_cmd("curl");
    c.args([
        "-sk",
        "--connect-timeout",
        connect_timeout,
        "--max-time",
        "2",
    ]);
    if let Some(src) = source {
        c.arg("--interface").arg(src.to_string());
    }
    let out = c
        .args(["-w", "\n%{http_code} %{time_connect}"])
        .arg(format!("https://{}:{TLS_PORT}/_ping", vm.addr()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let (code, text) = match out {
        Ok(o) => (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(e) => (-1, format!("\n000 0 (cannot run curl: {e})")),
    };
    let last = text.lines().last().unwrap_or_default().to_string();
    let mut fields = last.split_whitespace();
    let http = fields.next().unwrap_or("000");
    let connected = fields
        .next()
        .and_then(|t| t.parse::<f64>().ok())
        .is_some_and(|t| t > 0.0);
    let probe = Probe {
        started,
        port: TLS_PORT,
        kind: ProbeKind::TlsNoCert,
        connected,
        answer: (http != "000").then(|| text.clone()),
    };
    (probe, code)
}

/// What the scanner saw around one run of `up`.
struct Scan {
    probes: Vec<Probe>,
    up: Output,
    up_took: Duration,
    up_start: Instant,
    up_end: Instant,
}

/// Runs `pilot-agent up` while an outside scanner polls 2375 and 2376 (plain HTTP from one
/// thread, TLS without a certificate from another). The scan starts before `up` and goes on
/// until, after `up` exited, each kind of probe ran again and 2376 accepted TCP.
fn up_under_scan(vm: &Vm, agent: &Agent) -> Result<Scan> {
    let probes: Mutex<Vec<Probe>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let addr = SocketAddr::from((vm.addr(), 0));
    let record = |p: Probe| {
        if let Ok(mut v) = probes.lock() {
            v.push(p);
        }
    };
    let seen = |pred: &dyn Fn(&Probe) -> bool| -> Vec<(u16, ProbeKind)> {
        probes
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|p| pred(p))
                    .map(|p| (p.port, p.kind))
                    .collect()
            })
            .unwrap_or_default()
    };
    let kinds = [
        (PLAIN_PORT, ProbeKind::Plain),
        (TLS_PORT, ProbeKind::Plain),
        (TLS_PORT, ProbeKind::TlsNoCert),
    ];
    let wait_for = |what: &str, pred: &dyn Fn(&Probe) -> bool, need_connect: bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let have = seen(pred);
            let connected_2376 = seen(&|p: &Probe| pred(p) && p.port == TLS_PORT && p.connected);
            if kinds.iter().all(|k| have.contains(k))
                && (!need_connect || !connected_2376.is_empty())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the scanner did not {what} within 15 s (probes: {have:?})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    std::thread::scope(|s| {
        let plain = s.spawn(|| {
            vm.in_outside_ns(|| {
                while !stop.load(Ordering::Relaxed) {
                    for port in [PLAIN_PORT, TLS_PORT] {
                        record(plain_probe(addr, port, Duration::from_millis(250)));
                    }
                }
            })
        });
        let tls = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                record(tls_no_cert_probe(vm, None, "0.25").0);
            }
        });
        // Nothing between the spawns and `stop` may return early: the scope would wait on
        // scanner threads that never stop.
        let result = (|| -> Result<Scan> {
            wait_for("probe every port before `up`", &|_| true, false)?;
            let up_start = Instant::now();
            let (up, up_took) = agent.run(vm, ["up"])?;
            let up_end = Instant::now();
            // After a failed `up` 2376 may never open; the caller reports the failure.
            if up.status.success() {
                wait_for(
                    "probe every port again after `up` (2376 accepting TCP)",
                    &|p| p.started > up_end,
                    true,
                )?;
            }
            Ok(Scan {
                probes: Vec::new(),
                up,
                up_took,
                up_start,
                up_end,
            })
        })();
        stop.store(true, Ordering::Relaxed);
        let plain = plain
            .join()
            .map_err(|_| anyhow::anyhow!("plain scanner panicked"))
            .and_then(|r| r);
        let tls = tls
            .join()
            .map_err(|_| anyhow::anyhow!("TLS scanner panicked"));
        let mut scan = result?;
        plain?;
        tls?;
        scan.probes = std::mem::take(
            &mut *probes
                .lock()
                .map_err(|_| anyhow::anyhow!("probe list poisoned"))?,
        );
        Ok(scan)
    })
}

// ---------------------------------------------------------------------------------------------
// nft transactions

/// One transaction in `nft monitor`'s stream: its event lines, then
/// `# new generation N by process PID (NAME)`.
struct Transaction {
    process: String,
    lines: Vec<String>,
    /// When its first line was read.
    at: Instant,
}

fn transactions(events: &[(Instant, String)]) -> Vec<Transaction> {
    let mut out = Vec::new();
    let mut lines = Vec::new();
    let mut first = None;
    for (t, l) in events {
        if l.starts_with("# new generation") {
            // "... by process PID (NAME)"
            let process = l
                .rsplit_once('(')
                .map(|(_, n)| n.trim_end_matches(')').to_string())
                .unwrap_or_default();
            out.push(Transaction {
                process,
                lines: std::mem::take(&mut lines),
                at: first.take().unwrap_or(*t),
            });
        } else {
            first.get_or_insert(*t);
            lines.push(l.clone());
        }
    }
    out
}

/// The agent (the only `nft` process besides our marks) sent exactly one transaction, and
/// it touched only its own table; returns when its first event was read. dockerd's own
/// iptables transactions (on restart) are its business.
fn only_agent_transaction(
    what: &str,
    events: &[(Instant, String)],
    table_ref: &str,
) -> Result<Instant> {
    let all = transactions(events);
    let by_nft: Vec<&Transaction> = all.iter().filter(|t| t.process == "nft").collect();
    let show = || {
        events
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    ensure!(
        by_nft.len() == 1,
        "{what}: expected exactly one nft transaction (the agent's), the monitor saw {}:\n{}",
        by_nft.len(),
        show()
    );
    let t = by_nft[0];
    let foreign: Vec<&String> = t.lines.iter().filter(|l| !l.contains(table_ref)).collect();
    ensure!(
        foreign.is_empty(),
        "{what}: the agent's transaction touched other tables: {foreign:?}"
    );
    Ok(t.at)
}

// ---------------------------------------------------------------------------------------------
// Configuration errors

/// (line, col), 1-based, of the first `token` on the first line containing `line_has`.
fn position(text: &str, line_has: &str, token: &str) -> Result<(usize, usize)> {
    text.lines()
        .enumerate()
        .find(|(_, l)| l.contains(line_has))
        .and_then(|(i, l)| l.find(token).map(|c| (i + 1, c + 1)))
        .with_context(|| format!("no {token:?} on a line with {line_has:?}"))
}

/// Checks that `lines` (one `FILE:LINE:COL: message` per problem) are exactly `expected`
/// (position and a word the message must contain), in file order.
fn check_diagnostics(
    what: &str,
    file: &Path,
    lines: &[&str],
    expected: &[((usize, usize), &str)],
) -> Result<()> {
    ensure!(
        lines.len() == expected.len(),
        "{what}: {} problem(s) reported, {} expected:\n{}",
        lines.len(),
        expected.len(),
        lines.join("\n")
    );
    for (line, ((l, c), word)) in lines.iter().zip(expected) {
        let prefix = format!("{}:{l}:{c}: ", file.display());
        ensure!(
            line.starts_with(&prefix) && line.contains(word),
            "{what}: expected `{prefix}...{word}...`, got `{line}`"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The first VM: lock, mutual TLS, idempotence, other tables, bad configuration

#[test]
fn up_locks_2375_serves_mutual_tls_and_changes_nothing_twice() -> Result<()> {
    let t_test = Instant::now();
    let c = phase("setup", setup_first_vm)?;
    phase("2375 answers before up", || plain_api_answers_before_up(&c))?;
    let first = phase("first up under scan", || first_up_under_scan(&c))?;
    phase("no answer after the lock", || {
        check_scan(&first.scan, first.t_lock)
    })?;
    phase("2375 locked from outside", || plain_api_locked_after_up(&c))?;
    phase("2376 mutual TLS only", || tls_api_needs_a_certificate(&c))?;
    let kept = phase("second up changes nothing", || {
        second_up_changes_nothing(&c)
    })?;
    phase("drift repaired, table re-created", || {
        firewall_repairs_leave_other_tables(&c, &kept)
    })?;
    phase("bad configuration changes nothing", || {
        bad_configuration_changes_nothing(&c)
    })?;
    let FirstVm { vm, monitor, .. } = c;
    drop(monitor);
    vm.cleanup()?;
    eprintln!("converge: first VM's checks took {:?}", t_test.elapsed());
    Ok(())
}

/// The first VM with a plain Docker API on 2375 (socat to dockerd's socket, predating the
/// agent), the operator's table, and `nft monitor` watching every transaction.
struct FirstVm {
    agent: Agent,
    /// The operator's table (`nft -a list`, handles included) before any `up`.
    operator_before: String,
    /// `inet pilot_agent`, as nft names the agent's table in its events.
    table_ref: String,
    /// Dropped before `vm`: it runs in the VM's namespace.
    monitor: NftMonitor,
    vm: Vm,
}

impl FirstVm {
    /// `port` at the VM's address.
    fn at(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.vm.addr(), port))
    }

    fn operator_table(&self) -> Result<String> {
        nft(&self.vm, &["-a", "list", "table", "inet", "operator_owned"])
    }

    fn agent_table(&self) -> Result<String> {
        nft(&self.vm, &["list", "table", "inet", AGENT_TABLE])
    }
}

fn setup_first_vm() -> Result<FirstVm> {
    let vm = start_vm()?;
    let agent = Agent::new(&vm)?;
    // The plain Docker API that must be locked, and the operator's own table.
    vm.start_socat(
        PLAIN_PORT,
        &format!("UNIX-CONNECT:{}", vm.docker_socket().display()),
    )?;
    nft_script(&vm, OPERATOR_TABLE)?;
    let (monitor, _) = NftMonitor::start(&vm)?;
    let mut c = FirstVm {
        agent,
        operator_before: String::new(),
        table_ref: format!("inet {AGENT_TABLE}"),
        monitor,
        vm,
    };
    c.operator_before = c.operator_table()?;
    Ok(c)
}

/// (1) Before `up` the probe gets an answer: it can fail.
fn plain_api_answers_before_up(c: &FirstVm) -> Result<()> {
    let (_, before) = c.vm.in_outside_ns(|| {
        plain_ping(
            c.at(PLAIN_PORT),
            Duration::from_secs(1),
            Duration::from_secs(2),
        )
    })?;
    let before = before.unwrap_or_default();
    ensure!(
        before.contains("OK") && before.to_ascii_lowercase().contains("api-version:"),
        "before `up`, plain /_ping on {}:2375 from outside should answer; got {before:?}",
        c.vm.addr()
    );
    eprintln!("converge: before up, 2375 answered /_ping from outside (socat -> dockerd)");
    Ok(())
}

/// The first `up` and what the scanner and the monitor saw of it.
struct FirstUp {
    scan: Scan,
    /// When the monitor read the first event of the agent's one transaction (the lock).
    t_lock: Instant,
}

/// (2) The first `up`, under an outside scanner and nft monitor: exit 0, done and healthy, one
/// nft transaction, on the agent's table only.
fn first_up_under_scan(c: &FirstVm) -> Result<FirstUp> {
    let (vm, agent, monitor) = (&c.vm, &c.agent, &c.monitor);
    let m0 = monitor.mark(vm)?;
    let scan = up_under_scan(vm, agent)?;
    let m1 = monitor.mark(vm)?;
    ensure!(
        scan.up.status.success(),
        "first `up` exited {}:\n{}",
        scan.up.status,
        stderr(&scan.up)
    );
    let status = agent.status_json()?;
    ensure!(
        status["status"] == "done" && status["condition"] == "healthy",
        "status after the first up: {status}"
    );
    eprintln!(
        "converge: first up exit 0 in {:?}; steps {:?}",
        scan.up_took,
        step_states(&status)
    );
    let first_events = monitor.between(&m0, &m1)?;
    let t_lock = only_agent_transaction("the first up", &first_events, &c.table_ref)?;
    Ok(FirstUp { scan, t_lock })
}

/// (2) What the scanner saw: each port probed during `up`; 2376 never answered; 2375 never
/// answered a probe started after the lock; dockerd accepted TCP on 2376 only after it.
fn check_scan(scan: &Scan, t_lock: Instant) -> Result<()> {
    let during = |p: &&Probe| p.started >= scan.up_start && p.started <= scan.up_end;
    let count = |port, kind| {
        scan.probes
            .iter()
            .filter(during)
            .filter(|p| p.port == port && p.kind == kind)
            .count()
    };
    let (n2375, n2376, n2376tls) = (
        count(PLAIN_PORT, ProbeKind::Plain),
        count(TLS_PORT, ProbeKind::Plain),
        count(TLS_PORT, ProbeKind::TlsNoCert),
    );
    let after_lock_2375 = scan
        .probes
        .iter()
        .filter(|p| p.port == PLAIN_PORT && p.started > t_lock)
        .count();
    let answered_before_lock = scan
        .probes
        .iter()
        .filter(|p| p.port == PLAIN_PORT && p.started <= t_lock && p.answer.is_some())
        .count();
    eprintln!(
        "converge: scanner during the first up ({:?}): {n2375} probes of 2375, {n2376} plain and \
         {n2376tls} TLS-without-certificate probes of 2376; {} probes in all; the agent's table \
         was committed {:?} after up started; {after_lock_2375} probes of 2375 started after \
         that; {answered_before_lock} answers on 2375 before it (its listener predates the \
         agent)",
        scan.up_took,
        scan.probes.len(),
        t_lock.saturating_duration_since(scan.up_start),
    );
    ensure!(
        n2375 > 0 && n2376 > 0 && n2376tls > 0,
        "the scanner must probe each port during up (2375: {n2375}, 2376 plain: {n2376}, 2376 \
         TLS: {n2376tls})"
    );
    ensure!(
        after_lock_2375 > 0,
        "no probe of 2375 after the lock: nothing was tested"
    );
    if let Some(p) = scan
        .probes
        .iter()
        .find(|p| p.port == TLS_PORT && p.answer.is_some())
    {
        bail!(
            "a probe of 2376 without a certificate got a Docker API answer ({:?} after up \
             started, {:?}): {:?}",
            p.started.saturating_duration_since(scan.up_start),
            p.kind,
            p.answer
        );
    }
    if let Some(p) = scan
        .probes
        .iter()
        .find(|p| p.port == PLAIN_PORT && p.started > t_lock && p.answer.is_some())
    {
        bail!(
            "2375 answered a probe started {:?} after the agent's table was committed: {:?}",
            p.started.saturating_duration_since(t_lock),
            p.answer
        );
    }
    let first_2376 = scan
        .probes
        .iter()
        .filter(|p| p.port == TLS_PORT && p.connected)
        .map(|p| p.started)
        .min()
        .context("2376 never accepted TCP during the scan")?;
    ensure!(
        first_2376 > t_lock,
        "dockerd accepted TCP on 2376 ({:?} after up started) before the firewall's commit \
         ({:?})",
        first_2376.saturating_duration_since(scan.up_start),
        t_lock.saturating_duration_since(scan.up_start)
    );
    Ok(())
}

/// (1) After `up`: 2375 locked from outside, open on loopback inside.
fn plain_api_locked_after_up(c: &FirstVm) -> Result<()> {
    let vm = &c.vm;
    let (outside_connected, outside) = vm.in_outside_ns(|| {
        plain_ping(
            c.at(PLAIN_PORT),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
    })?;
    ensure!(
        outside.is_none(),
        "after up, 2375 still answers from outside: {outside:?}"
    );
    ensure!(
        !outside_connected,
        "after up, 2375 accepted TCP from outside (expected the drop to time out)"
    );
    for inside_addr in [Ipv4Addr::LOCALHOST, vm.addr()] {
        let (_, inside) = vm.in_vm_ns(|| {
            plain_ping(
                SocketAddr::from((inside_addr, PLAIN_PORT)),
                Duration::from_secs(1),
                Duration::from_secs(2),
            )
        })?;
        ensure!(
            inside.as_deref().is_some_and(|t| t.contains("OK")),
            "inside the VM, {inside_addr}:2375 (loopback) should still answer; got {inside:?}"
        );
    }
    Ok(())
}

/// (1) 2376: no API answer without a certificate, none from a source outside
/// `docker_api_sources`; the operator's mutual TLS works and does verify the server.
fn tls_api_needs_a_certificate(c: &FirstVm) -> Result<()> {
    let (vm, agent) = (&c.vm, &c.agent);
    // 2376 without a certificate: TCP connects (the outside address is an allowed source),
    // the TLS handshake is refused.
    let (no_cert, curl_code) = tls_no_cert_probe(vm, None, "2");
    ensure!(
        no_cert.connected && no_cert.answer.is_none() && curl_code != 0,
        "2376 without a client certificate: connected {}, curl exit {curl_code}, answer {:?}",
        no_cert.connected,
        no_cert.answer
    );
    // The same curl with the operator's certificate gets the answer: the probe can succeed,
    // and the server certificate verifies against the agent's CA at the veth address.
    let op = agent.operator_dir();
    let with_cert = vm
        .outside_cmd("curl")
        .args(["-s", "--max-time", "5", "--cacert"])
        .arg(op.join("ca.pem"))
        .arg("--cert")
        .arg(op.join("cert.pem"))
        .arg("--key")
        .arg(op.join("key.pem"))
        .arg(format!("https://{}:{TLS_PORT}/_ping", vm.addr()))
        .output()?;
    ensure!(
        String::from_utf8_lossy(&with_cert.stdout) == "OK",
        "2376 with the operator certificate: curl {} {:?} {}",
        with_cert.status,
        String::from_utf8_lossy(&with_cert.stdout),
        stderr(&with_cert)
    );
    // From an address that is not in docker_api_sources, 2376 does not even connect.
    let octets = vm.outside_addr().octets();
    let stranger = Ipv4Addr::new(octets[0], octets[1], octets[2], 3);
    let status = Command::new("ip")
        .args(["-n", &vm.outside_ns(), "addr", "add"])
        .arg(format!("{stranger}/24"))
        .args(["dev", &format!("{}-vm", vm.name())])
        .status()?;
    ensure!(
        status.success(),
        "cannot add {stranger} to the outside namespace"
    );
    let (from_stranger, code) = tls_no_cert_probe(vm, Some(stranger), "1");
    ensure!(
        !from_stranger.connected && from_stranger.answer.is_none(),
        "2376 accepted TCP from {stranger}, which is not in docker_api_sources (curl exit \
         {code})"
    );

    // The operator's docker CLI over mutual TLS, verifying the server at the veth address.
    let version = agent.operator_docker_version(vm)?;
    eprintln!(
        "converge: operator `docker version` over mutual TLS at {}:{TLS_PORT}: {version}; \
         without a certificate: curl exit {curl_code}; from {stranger}: no TCP (curl exit {code})",
        vm.addr()
    );
    // ... and it does verify: a CA that did not sign dockerd's certificate is refused.
    let foreign = foreign_ca(&vm.dir().join("foreign-ca"))?;
    let refused = agent.docker_with(vm, &foreign, &op, ["version"]).output()?;
    ensure!(
        !refused.status.success() && stderr(&refused).contains("certificate"),
        "docker trusting a foreign CA should refuse dockerd's certificate: {} {}",
        refused.status,
        stderr(&refused)
    );
    Ok(())
}

/// What the later phases compare against: dockerd's PID and the agent's table after the
/// first `up`.
struct Converged {
    dockerd_pid: u32,
    agent_table: String,
}

/// (3) A second `up` changes nothing: no nft transaction, no dockerd restart, no file
/// rewritten (status.json and history.jsonl, the records of the pass, aside), every step `ok`.
fn second_up_changes_nothing(c: &FirstVm) -> Result<Converged> {
    let (vm, agent, monitor) = (&c.vm, &c.agent, &c.monitor);
    let watched = [vm.daemon_json()];
    let status_path = agent.status_path();
    let history_path = agent.state_dir().join("history.jsonl");
    let without_status = |mut s: std::collections::BTreeMap<PathBuf, _>| {
        s.remove(&status_path);
        s.remove(&history_path);
        s
    };
    let files_before = without_status(snapshot(agent.state_dir(), &watched)?);
    let pid_before = dockerd_pid(vm)?;
    let agent_table_before = c.agent_table()?;
    let m2 = monitor.mark(vm)?;
    let (second, second_took) = agent.run(vm, ["up"])?;
    let m3 = monitor.mark(vm)?;
    ensure!(
        second.status.success(),
        "second up exited {}:\n{}",
        second.status,
        stderr(&second)
    );
    let events = monitor.between(&m2, &m3)?;
    ensure!(
        events.is_empty(),
        "the second up sent nft transactions:\n{}",
        events
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let pid_after = dockerd_pid(vm)?;
    ensure!(
        pid_before == pid_after,
        "the second up restarted dockerd (pid {pid_before} -> {pid_after})"
    );
    let diff = snapshot_diff(
        &files_before,
        &without_status(snapshot(agent.state_dir(), &watched)?),
    );
    ensure!(
        diff.is_empty(),
        "the second up rewrote files:\n{}",
        diff.join("\n")
    );
    let status = agent.status_json()?;
    let states = step_states(&status);
    ensure!(
        status["condition"] == "healthy" && states.iter().all(|s| s.ends_with("=ok")),
        "after the second up every step should be `ok`: {states:?}"
    );
    eprintln!(
        "converge: second up exit 0 in {second_took:?}: dockerd pid {pid_after} kept, {} files \
         unchanged, no nft transaction",
        files_before.len()
    );
    Ok(Converged {
        dockerd_pid: pid_before,
        agent_table: agent_table_before,
    })
}

/// (6) Drift in the agent's table is repaired by `up`; a deleted table is re-created by
/// `pilot-agent firewall`; each time in one transaction that touches only the agent's
/// table, and the operator's table stays as it was (handles included).
fn firewall_repairs_leave_other_tables(c: &FirstVm, kept: &Converged) -> Result<()> {
    let (vm, agent, monitor) = (&c.vm, &c.agent, &c.monitor);
    let table_ref = &c.table_ref;
    nft(
        vm,
        &[
            "add",
            "rule",
            "inet",
            AGENT_TABLE,
            "input",
            "tcp",
            "dport",
            "9",
            "accept",
        ],
    )?;
    let m4 = monitor.mark(vm)?;
    let (repair, _) = agent.run(vm, ["up"])?;
    let m5 = monitor.mark(vm)?;
    ensure!(
        repair.status.success(),
        "up after drift: {}",
        stderr(&repair)
    );
    nft(vm, &["delete", "table", "inet", AGENT_TABLE])?;
    let m6 = monitor.mark(vm)?;
    let (reapply, _) = agent.run(vm, ["firewall"])?;
    let m7 = monitor.mark(vm)?;
    ensure!(
        reapply.status.success(),
        "pilot-agent firewall: {}",
        stderr(&reapply)
    );
    for (what, a, b) in [
        ("up after drift", m4, m5),
        ("firewall after deletion", m6, m7),
    ] {
        let events = monitor.between(&a, &b)?;
        only_agent_transaction(what, &events, table_ref)?;
        ensure!(
            events
                .iter()
                .any(|(_, l)| l.starts_with(&format!("add table {table_ref}"))),
            "{what}: the agent's transaction did not add its table"
        );
        eprintln!(
            "converge: {what}: the monitor saw one nft transaction, on the agent's table only"
        );
    }
    ensure!(
        c.agent_table()? == kept.agent_table,
        "the agent's table differs after repair and re-creation:\nbefore:\n{}\nafter:\n{}",
        kept.agent_table,
        c.agent_table()?
    );
    let operator_after = c.operator_table()?;
    ensure!(
        operator_after == c.operator_before,
        "the operator's table changed:\nbefore:\n{}\nafter:\n{operator_after}",
        c.operator_before
    );
    ensure!(
        dockerd_pid(vm)? == kept.dockerd_pid,
        "repairing the firewall restarted dockerd"
    );
    Ok(())
}

/// (5) A configuration with several errors changes nothing and names every error.
fn bad_configuration_changes_nothing(c: &FirstVm) -> Result<()> {
    let (vm, agent) = (&c.vm, &c.agent);
    let watched = [vm.daemon_json()];
    let bad = vm.dir().join("bad-agent.yaml");
    let bad_text = format!(
        "# four deliberate errors (converge suite)\n\
         state_dir: {state}\n\
         docker:\n\
         \x20 socket: {sock}\n\
         \x20 daemon_config: {daemon}\n\
         \x20 service:\n\
         \x20   manager: command\n\
         \x20   restart_command: [{ctl}, restart]\n\
         \x20 ready_timeout_secs: soon\n\
         firewall:\n\
         \x20 lock_ports: [2375, 70000]\n\
         \x20 docker_api_sources: [{outside}/32, 10.250.0.0/33]\n\
         \x20 tabel: pilot_agent\n",
        state = agent.state_dir().display(),
        sock = vm.docker_socket().display(),
        daemon = vm.daemon_json().display(),
        ctl = vm.dockerd_ctl().display(),
        outside = vm.outside_addr(),
    );
    fs::write(&bad, &bad_text)?;
    let expected = [
        (
            position(&bad_text, "ready_timeout_secs", "soon")?,
            "ready_timeout_secs",
        ),
        (position(&bad_text, "lock_ports", "70000")?, "70000"),
        (
            position(&bad_text, "docker_api_sources", "10.250.0.0/33")?,
            "10.250.0.0/33",
        ),
        (position(&bad_text, "tabel", "tabel")?, "tabel"),
    ];
    let ruleset = || nft(vm, &["-s", "list", "ruleset"]);
    let ruleset_before = ruleset()?;
    let all_before = snapshot(agent.state_dir(), &watched)?;

    let (validate, _) = agent.run(
        vm,
        [
            OsStr::new("config"),
            OsStr::new("validate"),
            bad.as_os_str(),
        ],
    )?;
    ensure!(
        validate.status.code() == Some(1),
        "config validate of a bad file exited {}",
        validate.status
    );
    let stdout = String::from_utf8_lossy(&validate.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    check_diagnostics("config validate", &bad, &lines, &expected)?;

    let bad_agent = agent.with_config(&bad);
    let (bad_up, _) = bad_agent.run(vm, ["up"])?;
    ensure!(
        bad_up.status.code() == Some(1),
        "up with a bad configuration exited {}:\n{}",
        bad_up.status,
        stderr(&bad_up)
    );
    let up_err = stderr(&bad_up);
    let file_prefix = format!("{}:", bad.display());
    let up_lines: Vec<&str> = up_err
        .lines()
        .filter(|l| l.starts_with(&file_prefix))
        .collect();
    check_diagnostics("up", &bad, &up_lines, &expected)?;

    let diff = snapshot_diff(&all_before, &snapshot(agent.state_dir(), &watched)?);
    ensure!(
        diff.is_empty(),
        "a bad configuration changed files:\n{}",
        diff.join("\n")
    );
    ensure!(
        ruleset()? == ruleset_before,
        "a bad configuration changed the ruleset"
    );
    eprintln!(
        "converge: bad configuration: validate and up (exit 1) both reported:\n  {}\n  \
         daemon.json, ruleset and {} state files unchanged",
        lines.join("\n  "),
        all_before.len() - 1
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The second VM: SIGKILL at random points

#[test]
fn sigkill_at_random_points_then_up_converges() -> Result<()> {
    let vm = start_vm()?;
    let agent = Agent::new(&vm)?;
    Sigkill {
        label: "converge",
        vm: &vm,
        agent: &agent,
        args: &["up"],
        seed_var: "PILOT_E2E_SEED",
        count_var: "PILOT_E2E_KILLS",
        default_count: 12,
        part: 0,
        parts: 1,
        // Every key and certificate the killed run left is good and must be kept.
        kept: &["pki"],
        check: &|| Ok(()),
        reset: &|original| reset_cold(&vm, &agent, original),
    }
    .run()?;
    vm.cleanup()
}
