//! The server VM's endpoint address, as a runner-only host dials it (`server.endpoint`).

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::ServerName;

use crate::host_port::parse_host_port;

/// The endpoint's port when the address names none (the server's default `endpoint.listen`).
pub const DEFAULT_ENDPOINT_PORT: u16 = 8443;

/// Where the server VM's endpoint is: the host dialled (and checked against the certificate's
/// SANs) and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEndpoint {
    /// An IP address (IPv6 without brackets) or a DNS name, lower-cased without a final dot.
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "expected HOST, HOST:PORT, [IPV6] or [IPV6]:PORT for the server endpoint (HOST an IP \
     address or a DNS name; the port defaults to {DEFAULT_ENDPOINT_PORT}): {0}"
)]
pub struct EndpointParseError(pub String);

impl FromStr for ServerEndpoint {
    type Err = EndpointParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) =
            parse_host_port(s.trim(), Some(DEFAULT_ENDPOINT_PORT)).map_err(EndpointParseError)?;
        // The host is also the name the certificate is checked against: it must be one.
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if ServerName::try_from(host.as_str()).is_err() {
            return Err(EndpointParseError(
                "the host is neither an IP address nor a valid DNS name".into(),
            ));
        }
        Ok(ServerEndpoint { host, port })
    }
}

impl fmt::Display for ServerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::host_port::join_host_port(&self.host, self.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let e: ServerEndpoint = "Pilot.Example.com.".parse().unwrap();
        assert_eq!((e.host.as_str(), e.port), ("pilot.example.com", 8443));
        let e: ServerEndpoint = "[2001:db8::1]:9443".parse().unwrap();
        assert_eq!(e.to_string(), "[2001:db8::1]:9443");
        for bad in ["", "0.0.0.0", "a b", "h:0", "[::1"] {
            assert!(bad.parse::<ServerEndpoint>().is_err(), "{bad}");
        }
    }
}
