//! The host's identity as clients see it: its name and its addresses, which become the Docker
//! server certificate's subject alternative names.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read the host name from /proc/sys/kernel/hostname: {0}")]
    Hostname(#[source] std::io::Error),
    #[error("cannot list the host's network interfaces: {0}")]
    Interfaces(#[source] std::io::Error),
}

/// A subject alternative name. Ordered so that a set of them compares and prints stably.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum San {
    Dns(String),
    Ip(IpAddr),
}

impl San {
    /// Parses a configured name: an IP address or a DNS name (lower-cased, as DNS compares).
    pub fn parse(s: &str) -> San {
        match s.parse::<IpAddr>() {
            Ok(ip) => San::Ip(ip),
            Err(_) => San::Dns(s.trim_end_matches('.').to_ascii_lowercase()),
        }
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(name) => f.write_str(name),
            San::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// An interface address, as listed by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub interface: String,
    pub ip: IpAddr,
}

/// The host's current network addresses.
pub fn interface_addrs() -> Result<Vec<InterfaceAddr>, HostError> {
    Ok(if_addrs::get_if_addrs()
        .map_err(HostError::Interfaces)?
        .into_iter()
        .map(|i| InterfaceAddr {
            ip: i.ip(),
            interface: i.name,
        })
        .collect())
}

/// The kernel's host name (of this UTS namespace, which is what a simulated VM changes).
pub fn kernel_hostname() -> Result<String, HostError> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(HostError::Hostname)?;
    Ok(name.trim().to_string())
}

/// The subject alternative names the Docker server certificate must carry: every address a
/// client may use to reach the host, its names, and loopback.
pub fn server_sans(config: &Config, hostname: &str, addrs: &[InterfaceAddr]) -> BTreeSet<San> {
    let mut sans = BTreeSet::new();
    for a in addrs {
        if a.ip.is_loopback() || is_link_local(&a.ip) {
            // Loopback is added below once; link-local addresses need a zone to be used and
            // are not how anyone reaches a Docker API.
            continue;
        }
        if config
            .host
            .exclude_interfaces
            .iter()
            .any(|p| glob_match(p, &a.interface))
        {
            continue;
        }
        sans.insert(San::Ip(a.ip));
    }
    if !hostname.is_empty() {
        sans.insert(San::parse(hostname));
    }
    for name in &config.host.extra_names {
        sans.insert(San::parse(name));
    }
    // dockerd may listen on one specific address; the readiness probe connects there.
    let listen = config.docker.tls_listen.ip();
    if !listen.is_unspecified() {
        sans.insert(San::Ip(listen));
    }
    sans.insert(San::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    sans.insert(San::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    sans.insert(San::Dns("localhost".into()));
    sans
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Shell-style matching with `*` only (interface names have no other wildcard needs).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    // `split` always yields at least one part.
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*` at all: exact match
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Parses `HOST`, `HOST:PORT`, `IPv6` or `[IPv6]:PORT`; HOST is an IP address or a DNS name.
/// Without a port, `default_port` applies (none: the port is required).
pub fn parse_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad_port = |p: &str| format!("\"{p}\" is not a port (1-65535)");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .ok_or_else(|| "an IPv6 address in brackets needs the closing `]`".to_string())?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p),
            None if tail.is_empty() => None,
            None => return Err("expected `:PORT` after `]`".into()),
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("\"{h}\" is not an IPv6 address"));
        }
        (h.to_string(), port)
    } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
        (s.to_string(), None)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(bad_port(p)),
        },
        None => default_port.ok_or_else(|| "expected HOST:PORT".to_string())?,
    };
    let is_ip = host.parse::<IpAddr>().is_ok();
    if !is_ip && !crate::config::schema::is_dns_name(&host) {
        return Err(format!(
            "\"{host}\" is neither an IP address nor a DNS name"
        ));
    }
    if is_ip && host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        return Err("an unspecified address (0.0.0.0, ::) cannot be dialled".into());
    }
    Ok((host, port))
}

/// `HOST:PORT`, with an IPv6 address in brackets.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("pilot.example.com", Some(9701)),
            Ok(("pilot.example.com".into(), 9701))
        );
        assert_eq!(
            parse_host_port("203.0.113.7:19701", Some(9701)),
            Ok(("203.0.113.7".into(), 19701))
        );
        assert_eq!(
            parse_host_port("[2001:db8::1]:9701", None),
            Ok(("2001:db8::1".into(), 9701))
        );
        assert_eq!(
            parse_host_port("2001:db8::1", Some(1)),
            Ok(("2001:db8::1".into(), 1))
        );
        for bad in [
            "host:0",
            "host:x",
            "bad host",
            "0.0.0.0",
            "[::1",
            "[::1]x",
            "[nothost]:1",
        ] {
            assert!(parse_host_port(bad, Some(9701)).is_err(), "{bad}");
        }
        assert!(parse_host_port("host", None).is_err());
        assert_eq!(join_host_port("2001:db8::1", 9701), "[2001:db8::1]:9701");
    }

    fn addr(interface: &str, ip: &str) -> InterfaceAddr {
        InterfaceAddr {
            interface: interface.into(),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn glob() {
        assert!(glob_match("docker0", "docker0"));
        assert!(!glob_match("docker0", "docker01"));
        assert!(glob_match("br-*", "br-1234abcd"));
        assert!(!glob_match("br-*", "xbr-1"));
        assert!(glob_match("veth*", "veth"));
        assert!(glob_match("*", "eth0"));
        assert!(glob_match("e*h*0", "eth0"));
        assert!(!glob_match("e*h*1", "eth0"));
    }

    #[test]
    fn sans_cover_host_addresses_names_and_loopback_only() {
        let mut config = Config::default();
        config.host.extra_names = vec!["Pilot.Example.com".into(), "203.0.113.9".into()];
        let addrs = [
            addr("lo", "127.0.0.1"),
            addr("lo", "::1"),
            addr("eth0", "10.0.0.5"),
            addr("eth0", "fe80::1"),
            addr("eth0", "2001:db8::5"),
            addr("docker0", "172.17.0.1"),
            addr("br-0a1b2c", "172.30.0.1"),
            addr("veth12ab", "169.254.1.1"),
        ];
        let sans: Vec<String> = server_sans(&config, "pilot-vm", &addrs)
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            sans,
            vec![
                "localhost",
                "pilot-vm",
                "pilot.example.com",
                "10.0.0.5",
                "127.0.0.1",
                "203.0.113.9",
                "::1",
                "2001:db8::5",
            ]
        );
    }

    #[test]
    fn specific_listen_address_is_a_san() {
        let mut config = Config::default();
        config.docker.tls_listen = "10.1.2.3:2376".parse().unwrap();
        let sans = server_sans(&config, "h", &[]);
        assert!(sans.contains(&San::Ip("10.1.2.3".parse().unwrap())));
    }

    #[test]
    fn kernel_hostname_is_readable() {
        assert!(!kernel_hostname().unwrap().is_empty());
    }
}
