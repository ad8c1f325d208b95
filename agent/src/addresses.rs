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

/// The host's name as the agent uses it: `host.hostname`, else the kernel's. Waypoint runner
/// IDs carry it (`HOST-runner-N`), so that the runners of several hosts differ.
pub fn host_name(config: &Config) -> Result<String, HostError> {
    match &config.host.hostname {
        Some(h) => Ok(h.clone()),
        None => kernel_hostname(),
    }
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

/// The host name or address the Pilot CLI and applications should dial when nothing more
/// specific is known: the first `host.extra_names` entry (the name clients are told to use),
/// `waypoint.publish_address` when it is a specific address, `host.hostname`, the first
/// non-loopback, non-link-local address of an interface that `host.exclude_interfaces` does
/// not exclude (IPv4 first), the kernel's host name.
pub fn waypoint_host(config: &Config, addrs: &[InterfaceAddr]) -> String {
    if let Some(name) = config.host.extra_names.first() {
        return name.clone();
    }
    if let Some(w) = &config.waypoint
        && !w.publish_address.is_unspecified()
    {
        return w.publish_address.to_string();
    }
    if let Some(name) = &config.host.hostname {
        return name.clone();
    }
    let usable = |a: &&InterfaceAddr| {
        !a.ip.is_loopback()
            && !is_link_local(&a.ip)
            && !config
                .host
                .exclude_interfaces
                .iter()
                .any(|p| glob_match(p, &a.interface))
    };
    let first = addrs
        .iter()
        .filter(usable)
        .find(|a| a.ip.is_ipv4())
        .or_else(|| addrs.iter().find(usable));
    if let Some(a) = first {
        return a.ip.to_string();
    }
    kernel_hostname().unwrap_or_else(|_| "localhost".into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WaypointConfig;

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

    #[test]
    fn waypoint_host_order() {
        let addrs = [
            addr("lo", "127.0.0.1"),
            addr("docker0", "172.17.0.1"),
            addr("eth0", "fe80::1"),
            addr("eth0", "2001:db8::5"),
            addr("eth0", "192.0.2.10"),
        ];
        let mut config = Config {
            waypoint: Some(WaypointConfig::default()),
            ..Config::default()
        };
        assert_eq!(waypoint_host(&config, &addrs), "192.0.2.10");
        assert_eq!(waypoint_host(&config, &addrs[..4]), "2001:db8::5");
        config.host.hostname = Some("vm1".into());
        assert_eq!(waypoint_host(&config, &addrs), "vm1");
        config.waypoint.as_mut().unwrap().publish_address = "192.0.2.77".parse().unwrap();
        assert_eq!(waypoint_host(&config, &addrs), "192.0.2.77");
        config.host.extra_names = vec!["pilot.example.com".into(), "x".into()];
        assert_eq!(waypoint_host(&config, &addrs), "pilot.example.com");
    }
}
