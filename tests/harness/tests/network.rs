//! The harness's network extras against real namespaces: a direct link between two VMs (traffic
//! across it, cut, restore, clean-up), a second source address in the outside namespace, and
//! the metadata server at 169.254.169.254 inside a VM. Needs root; fails (never skips) without.
//! No dockerd is started: these VMs need only their namespaces.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_harness::metadata::{MetadataOptions, Recorded};
use pilot_harness::{Vm, VmOptions, leftovers};

fn vm() -> Result<Vm> {
    Vm::start(VmOptions {
        start_dockerd: false,
        ..VmOptions::default()
    })
}

/// Polls `check` every 25 ms until it is true or `timeout` passes.
fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

/// Whether the link named `iface` exists inside namespace `ns`.
fn link_exists(ns: &str, iface: &str) -> Result<bool> {
    let out = Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", iface])
        .output()
        .context("run ip link show")?;
    Ok(out.status.success())
}

fn ok(out: Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One TCP connect from inside `from` to `to`, with `timeout`.
fn connect_in(from: &Vm, to: SocketAddr, timeout: Duration) -> Result<std::io::Result<TcpStream>> {
    from.in_vm_ns(|| TcpStream::connect_timeout(&to, timeout))
}

#[test]
fn linked_vms_talk_until_cut_and_again_after_restore() -> Result<()> {
    pilot_harness::require_root()?;
    let a = vm()?;
    let b = vm()?;
    let names = [a.name().to_string(), b.name().to_string()];
    let link = a.link(&b)?;
    let (a_addr, b_addr) = (link.addr_of(&a), link.addr_of(&b));
    assert_ne!(a_addr, b_addr);
    for addr in [a_addr, b_addr] {
        assert_eq!(
            addr.octets()[..2],
            [10, 251],
            "{addr}: outside the slots' 10.250/16"
        );
    }
    let (a_if, b_if) = (link.iface_of(&a), link.iface_of(&b));
    assert!(link_exists(a.name(), &a_if)? && link_exists(b.name(), &b_if)?);
    // Nothing of the link in the host's namespace.
    assert!(!std::path::Path::new("/sys/class/net").join(&a_if).exists());
    assert!(a.link(&b).is_err(), "a second link between the same VMs");

    // A listener in B on its link address; the kernel completes handshakes from its backlog.
    let listener = b.in_vm_ns(|| TcpListener::bind((b_addr, 0)))??;
    let target = listener.local_addr()?;
    let mut conn = connect_in(&a, target, Duration::from_secs(2))?
        .context("connect from A to B across the link")?;
    let (mut served, peer) = listener.accept()?;
    assert_eq!(peer.ip(), a_addr, "B sees A's link address");
    conn.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    served.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    // B reaches A too.
    let back = a.in_vm_ns(|| TcpListener::bind((a_addr, 0)))??;
    connect_in(&b, back.local_addr()?, Duration::from_secs(2))?
        .context("connect from B to A across the link")?;

    link.cut()?;
    let t0 = Instant::now();
    let cut = connect_in(&a, target, Duration::from_secs(1))?;
    let took = t0.elapsed();
    assert!(cut.is_err(), "a connect across a cut link succeeded");
    assert!(
        took < Duration::from_secs(2),
        "a failed connect took {took:?}"
    );
    eprintln!("connect across the cut link failed after {took:?}: {cut:?}");
    // The connection made before the cut cannot deliver either.
    conn.write_all(b"lost")?;
    served.set_read_timeout(Some(Duration::from_millis(300)))?;
    assert!(served.read(&mut buf).is_err(), "data crossed a cut link");

    link.restore()?;
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "the restored link to carry a connect",
        || {
            matches!(
                connect_in(&a, target, Duration::from_millis(500)),
                Ok(Ok(_))
            )
        },
    )?;
    eprintln!(
        "the restored link carried a connect after {:?}",
        t0.elapsed()
    );
    // The link survives cut/restore with its addresses.
    assert_eq!(link.addr_of(&a), a_addr);

    drop(link);
    assert!(
        !link_exists(a.name(), &a_if)?,
        "{a_if} survived the link's drop"
    );
    assert!(
        !link_exists(b.name(), &b_if)?,
        "{b_if} survived the link's drop"
    );
    drop((listener, back, conn, served));
    a.cleanup()?;
    b.cleanup()?;
    let left = leftovers(&names);
    assert!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

#[test]
fn a_link_goes_with_a_dropped_vm_and_its_drop_then_does_no_harm() -> Result<()> {
    pilot_harness::require_root()?;
    let a = vm()?;
    let b = vm()?;
    let names = [a.name().to_string(), b.name().to_string()];
    let link = b.link(&a)?;
    let b_if = link.iface_of(&b);
    a.cleanup()?;
    // A's namespace takes the veth pair along, B's end included; the kernel dismantles a
    // deleted namespace asynchronously, so this may take a moment.
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(10),
        &format!("{b_if} to go with VM A"),
        || matches!(link_exists(b.name(), &b_if), Ok(false)),
    )?;
    eprintln!("{b_if} went {:?} after VM A's clean-up", t0.elapsed());
    link.cleanup()?;
    b.cleanup()?;
    let left = leftovers(&names);
    assert!(left.is_empty(), "left behind: {left:#?}");
    Ok(())
}

#[test]
fn an_outside_alias_is_a_second_source_the_vm_sees() -> Result<()> {
    pilot_harness::require_root()?;
    let vm = vm()?;
    let alias = vm.outside_alias(1)?;
    assert_eq!(vm.outside_alias(1)?, alias, "idempotent");
    assert!(vm.outside_alias(0).is_err());
    assert_ne!(alias, vm.outside_addr());
    assert_ne!(alias, vm.addr());

    let listener = vm.in_vm_ns(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))??;
    let port = listener.local_addr()?.port();
    let target = format!("TCP:{}:{port}", vm.addr());
    let peer_of = |bind: Option<Ipv4Addr>| -> Result<Ipv4Addr> {
        let mut client = vm.outside_cmd("socat");
        let to = match bind {
            Some(ip) => format!("{target},bind={ip},connect-timeout=2"),
            None => format!("{target},connect-timeout=2"),
        };
        client.args(["-u", "OPEN:/dev/null"]).arg(&to);
        ok(client.output()?, "socat from the outside namespace")?;
        let (_, peer) = listener.accept()?;
        match peer.ip() {
            std::net::IpAddr::V4(ip) => Ok(ip),
            other => bail!("peer {other} is not IPv4"),
        }
    };
    assert_eq!(peer_of(None)?, vm.outside_addr(), "default source");
    assert_eq!(peer_of(Some(alias))?, alias, "the alias as source");
    let second = vm.outside_alias(2)?;
    assert_eq!(peer_of(Some(second))?, second);
    Ok(())
}

#[test]
fn the_metadata_server_answers_imdsv2_at_the_link_local_address_inside_the_vm() -> Result<()> {
    pilot_harness::require_root()?;
    let vm = vm()?;
    let mut options = MetadataOptions::aws("i-0123456789abcdef0");
    options.instance.private_ipv4 = vm.addr();
    options.instance.public_ipv4 = None;
    options.instance.hostname = "pilot-inside".into();
    let server = vm.serve_metadata(options)?;
    assert_eq!(server.url(), "http://169.254.169.254:80");

    let curl = |args: &[&str]| -> Result<String> {
        let out = vm
            .cmd("curl")
            // --noproxy: a proxy from the environment must not see (or answer) these requests.
            .args(["-sS", "--fail", "--max-time", "5", "--noproxy", "*"])
            .args(args)
            .output()?;
        ok(out, &format!("curl {}", args.join(" ")))
    };
    let token = curl(&[
        "-X",
        "PUT",
        "-H",
        "X-aws-ec2-metadata-token-ttl-seconds: 60",
        "http://169.254.169.254/latest/api/token",
    ])?;
    assert!(!token.is_empty());
    let header = format!("X-aws-ec2-metadata-token: {token}");
    let get = |key: &str| {
        curl(&[
            "-H",
            &header,
            &format!("http://169.254.169.254/latest/meta-data/{key}"),
        ])
    };
    assert_eq!(get("instance-id")?, "i-0123456789abcdef0");
    assert_eq!(get("local-ipv4")?, vm.addr().to_string());
    assert_eq!(get("local-hostname")?, "pilot-inside");
    assert!(get("public-ipv4").is_err(), "no public address: 404");
    // IMDSv2 required: no token, no answer.
    assert!(curl(&["http://169.254.169.254/latest/meta-data/instance-id"]).is_err());

    let requests = server.requests();
    let put = Recorded {
        method: "PUT".into(),
        path: "/latest/api/token".into(),
        valid_token: false,
        status: 200,
    };
    assert_eq!(requests.first(), Some(&put), "{requests:#?}");
    assert_eq!(
        requests.last().map(|r| r.status),
        Some(401),
        "{requests:#?}"
    );

    // Serving again after a stop re-uses the address (adding it is idempotent).
    drop(server);
    let again = vm.serve_metadata(MetadataOptions::gcp("1234"))?;
    let out = curl(&[
        "-H",
        "Metadata-Flavor: Google",
        "http://169.254.169.254/computeMetadata/v1/instance/id",
    ])?;
    assert_eq!(out, "1234");
    drop(again);
    Ok(())
}
