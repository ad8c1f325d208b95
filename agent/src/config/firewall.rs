//! `firewall:` — what the agent's nftables table locks and whom it lets through.

use ipnet::IpNet;

use super::schema::{self, Node, Walker};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    /// Name of the agent's own table (family `inet`); no other table is ever touched.
    pub table: String,
    /// TCP ports dropped from every source but loopback, even if something listens on them
    /// (the plain Docker API port).
    pub lock_ports: Vec<u16>,
    /// Networks allowed to reach Docker's TLS port besides loopback and `docker_networks`
    /// (the operators' addresses).
    pub docker_api_sources: Vec<IpNet>,
    /// Subnets of the Docker networks whose containers use the Docker API over TLS.
    pub docker_networks: Vec<IpNet>,
    /// Sources allowed to reach ports Docker publishes; empty: unrestricted.
    pub published_port_sources: Vec<IpNet>,
    /// Which published ports `published_port_sources` restricts; empty: all of them.
    pub published_ports: Vec<u16>,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        FirewallConfig {
            table: "pilot_agent".into(),
            lock_ports: vec![2375],
            docker_api_sources: Vec::new(),
            docker_networks: Vec::new(),
            published_port_sources: Vec::new(),
            published_ports: Vec::new(),
        }
    }
}

pub fn read(w: &mut Walker, node: &Node<'_>) -> FirewallConfig {
    let mut c = FirewallConfig::default();
    let Some(f) = w.mapping(
        node,
        "firewall",
        &[
            "table",
            "lock_ports",
            "docker_api_sources",
            "docker_networks",
            "published_port_sources",
            "published_ports",
        ],
    ) else {
        return c;
    };
    if let Some(n) = f.get("table") {
        if let Some(name) = schema::string(w, n, "firewall.table") {
            if is_nft_identifier(&name) {
                c.table = name;
            } else {
                w.error(
                    n,
                    format!(
                        "firewall.table: expected a name of letters, digits and `_` starting \
                         with a letter (at most 64 characters), got \"{name}\""
                    ),
                );
            }
        }
    }
    if let Some(ports) = f.list(w, "lock_ports", schema::port) {
        c.lock_ports = sorted(ports);
    }
    if let Some(nets) = f.list(w, "docker_api_sources", schema::cidr) {
        c.docker_api_sources = nets;
    }
    if let Some(nets) = f.list(w, "docker_networks", schema::cidr) {
        c.docker_networks = nets;
    }
    if let Some(nets) = f.list(w, "published_port_sources", schema::cidr) {
        c.published_port_sources = nets;
    }
    if let Some(ports) = f.list(w, "published_ports", schema::port) {
        c.published_ports = sorted(ports);
        if c.published_port_sources.is_empty() && !c.published_ports.is_empty() {
            if let Some(n) = f.get("published_ports") {
                w.error(
                    n,
                    "firewall.published_ports has no effect without \
                     firewall.published_port_sources",
                );
            }
        }
    }
    c
}

fn sorted(mut ports: Vec<u16>) -> Vec<u16> {
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// nft table names: a letter, then letters, digits and underscores. (nft keywords such as
/// `fwd` are not caught here; the default name is not one.)
fn is_nft_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}
