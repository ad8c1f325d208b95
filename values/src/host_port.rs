//! `HOST[:PORT]` addresses and DNS names.

use std::net::{IpAddr, Ipv6Addr};

/// RFC 1123 host name syntax: labels of letters, digits and `-` (not first or last), at most
/// 63 bytes each and 253 in all; one trailing dot allowed.
pub fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// An IP address or a DNS name (`host.extra_names`, `database.host`).
pub fn check_host(s: &str) -> Result<(), String> {
    if s.parse::<IpAddr>().is_ok() || is_dns_name(s) {
        Ok(())
    } else {
        Err(format!("expected a DNS name or an IP address, got \"{s}\""))
    }
}

/// Parses `HOST`, `HOST:PORT`, `IPv6` or `[IPv6]:PORT`; HOST is an IP address or a DNS name.
/// Without a port, `default_port` applies (none: the port is required). An unspecified
/// address (0.0.0.0, ::) is refused: nobody can dial it.
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
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(format!("\"{h}\" is not an IPv6 address"));
        }
        (h.to_string(), port)
    } else if s.parse::<Ipv6Addr>().is_ok() {
        // A bare IPv6 address: its colons are not a port separator.
        (s.to_string(), None)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let port = match port {
        // Digits only: u16's parser would take a leading `+`.
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(bad_port(p)),
        },
        None => default_port.ok_or_else(|| "expected HOST:PORT".to_string())?,
    };
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {
            Err("an unspecified address (0.0.0.0, ::) cannot be dialled".into())
        }
        Ok(_) => Ok((host, port)),
        Err(_) if is_dns_name(&host) => Ok((host, port)),
        Err(_) => Err(format!(
            "\"{host}\" is neither an IP address nor a DNS name"
        )),
    }
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
            "host:+80",
            "bad host",
            "0.0.0.0",
            "[::]:1",
            "[::1",
            "[::1]x",
            "[nothost]:1",
            "",
        ] {
            assert!(parse_host_port(bad, Some(9701)).is_err(), "{bad}");
        }
        assert!(parse_host_port("host", None).is_err());
        assert_eq!(join_host_port("2001:db8::1", 9701), "[2001:db8::1]:9701");
        assert_eq!(join_host_port("h", 1), "h:1");
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_name("pilot.example.com."));
        assert!(is_dns_name("a-1"));
        for bad in ["", ".", "-a", "a-", "a..b", "a_b", "é", &"a".repeat(64)] {
            assert!(!is_dns_name(bad), "{bad}");
        }
        assert!(is_dns_name(&["a".repeat(63), "b".repeat(63)].join(".")));
        assert!(!is_dns_name(&vec!["a".repeat(63); 4].join(".")));
    }
}
