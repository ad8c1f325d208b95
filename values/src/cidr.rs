//! Networks in CIDR notation (`10.0.0.0/8`), or one address (taken as /32 or /128).

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("expected a network in CIDR notation (e.g. 10.0.0.0/8) or an IP address, got \"{0}\"")]
    Syntax(String),
    /// Host bits set after the prefix (`10.0.0.1/8`): in a firewall rule that is usually a typo.
    #[error("\"{given}\" has bits set after the prefix length; did you mean \"{network}\"?")]
    HostBits { given: String, network: IpNet },
}

/// Parses a network or a single address. Host bits after the prefix are refused.
pub fn parse_cidr(s: &str) -> Result<IpNet, CidrError> {
    let net = match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => s
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| CidrError::Syntax(s.to_string()))?,
    };
    if net.trunc() != net {
        return Err(CidrError::HostBits {
            given: s.to_string(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(
            parse_cidr("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert!(matches!(
            parse_cidr("10.0.0.1/8"),
            Err(CidrError::HostBits { .. })
        ));
        for bad in ["", "10.0.0.0/33", "10.0.0/8", "x", "10.0.0.0/"] {
            assert!(
                matches!(parse_cidr(bad), Err(CidrError::Syntax(_))),
                "{bad}"
            );
        }
    }
}
