//! `waypoint:` — the Waypoint server and runner containers: images, how many runners, the
//! Docker network they share, the server's data volume and published ports.
//!
//! The section's presence turns the Waypoint steps on (`waypoint:` with no value gives every
//! default); without it `up` manages no containers.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};

use super::schema::{self, Node, Walker};

/// Pilot's own Waypoint image: Waypoint 0.11.4 with what Pilot's runners need.
pub const DEFAULT_IMAGE: &str = "pilot/waypoint:0.11.4";
/// Where the VM image bakes `docker save` tarballs of the images.
pub const DEFAULT_IMAGES_DIR: &str = "/var/lib/pilot-agent/images";
/// The most runners one host may run; more is a job for more VMs (runner-only role).
pub const MAX_RUNNERS: i64 = pilot_values::MAX_RUNNERS as i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointConfig {
    /// Image of the `waypoint-server` container.
    pub server_image: String,
    /// Image of the `waypoint-runner-N` containers.
    pub runner_image: String,
    /// Directory of `docker save` tarballs (`*.tar`) the images are loaded from when absent.
    pub images_dir: PathBuf,
    /// How many runner containers to keep (0: the server alone).
    pub runners: u32,
    pub network: NetworkConfig,
    /// Named volume mounted at the server's `/data` (its database).
    pub volume: String,
    /// Host port of the server's gRPC API (container port 9701).
    pub grpc_port: u16,
    /// Host port of the server's HTTPS UI and API (container port 9702).
    pub http_port: u16,
    /// Host address the ports are published on.
    pub publish_address: IpAddr,
    /// How long to wait for the server to answer over HTTPS after it (re)started.
    pub ready_timeout_secs: u64,
    /// The address the server advertises to deployed applications' entrypoints (and that the
    /// credentials name for the Pilot CLI).
    pub advertise: Advertise,
    /// Who may reach the gRPC port besides loopback, the host's container networks and the
    /// operators (`firewall.docker_api_sources`): the networks deployed applications and
    /// runner-only hosts connect from.
    pub application_sources: Vec<IpNet>,
    /// How many runners have their token minted, or their container made, at once
    /// (`start_parallelism`, 1 to 32).
    pub start_parallelism: u32,
}

/// `waypoint.advertise_address`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Advertise {
    /// The host's reachable address: on a cloud its public IPv4 (else private), elsewhere the
    /// address the credentials name; the port is `grpc_port`.
    #[default]
    Auto,
    /// `HOST[:PORT]` as written (the port defaults to `grpc_port`).
    Fixed { host: String, port: u16 },
}

/// The bridge network the server and runners share. Runners reach the host's Docker API at
/// its gateway address, so the gateway is in the Docker server certificate and the subnet is
/// the only container network the firewall admits to the TLS port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        // 172.29/16 is outside Docker's default address pools' first picks (172.17-172.28
        // go to docker0 and the first user networks), so it rarely collides on a fresh host.
        let subnet = Ipv4Net::new(Ipv4Addr::new(172, 29, 0, 0), 24)
            // Invariant: 24 is a valid IPv4 prefix length.
            .unwrap_or_default();
        NetworkConfig {
            name: "pilot".into(),
            gateway: first_host(subnet),
            subnet,
        }
    }
}

impl Default for WaypointConfig {
    fn default() -> Self {
        WaypointConfig {
            server_image: DEFAULT_IMAGE.into(),
            runner_image: DEFAULT_IMAGE.into(),
            images_dir: PathBuf::from(DEFAULT_IMAGES_DIR),
            runners: 1,
            network: NetworkConfig::default(),
            // The name `waypoint install -platform=docker` uses: a host that ran the old Pilot
            // keeps its Waypoint data.
            volume: "waypoint-server".into(),
            grpc_port: 9701,
            http_port: 9702,
            publish_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ready_timeout_secs: 60,
            advertise: Advertise::Auto,
            application_sources: Vec::new(),
            start_parallelism: 8,
        }
    }
}

impl WaypointConfig {
    /// The subnet as a generic network, for the firewall's allow-list.
    pub fn subnet(&self) -> IpNet {
        IpNet::V4(self.network.subnet)
    }
}

fn first_host(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).saturating_add(1))
}

pub fn read(w: &mut Walker, node: &Node<'_>) -> WaypointConfig {
    let mut c = WaypointConfig::default();
    let Some(f) = w.mapping(
        node,
        "waypoint",
        &[
            "server_image",
            "runner_image",
            "images_dir",
            "runners",
            "network",
            "volume",
            "grpc_port",
            "http_port",
            "publish_address",
            "ready_timeout_secs",
            "advertise_address",
            "application_sources",
            "start_parallelism",
        ],
    ) else {
        return c;
    };
    for (key, slot) in [
        ("server_image", &mut c.server_image),
        ("runner_image", &mut c.runner_image),
    ] {
        if let Some(n) = f.get(key) {
            let path = f.path_of(key);
            if let Some(s) = schema::string(w, n, &path) {
                match image_reference_problem(&s) {
                    None => *slot = s,
                    Some(why) => w.error(n, format!("{path}: {why}, got \"{s}\"")),
                }
            }
        }
    }
    if let Some(p) = f.path(w, "images_dir") {
        c.images_dir = p;
    }
    if let Some(n) = f.integer(w, "runners", 0, MAX_RUNNERS) {
        // Range-checked above.
        c.runners = n as u32;
    }
    if let Some(n) = f.get("volume") {
        if let Some(name) = docker_object_name(w, n, "waypoint.volume") {
            c.volume = name;
        }
    }
    if let Some(p) = f.port(w, "grpc_port") {
        c.grpc_port = p;
    }
    if let Some(p) = f.port(w, "http_port") {
        c.http_port = p;
    }
    if c.grpc_port == c.http_port {
        if let Some(n) = f.get("http_port").or_else(|| f.get("grpc_port")) {
            w.error(
                n,
                format!(
                    "waypoint.grpc_port and waypoint.http_port must differ (both {})",
                    c.http_port
                ),
            );
        }
    }
    if let Some(n) = f.get("publish_address") {
        let path = f.path_of("publish_address");
        if let Some(s) = schema::string(w, n, &path) {
            match s.parse::<IpAddr>() {
                Ok(ip) => c.publish_address = ip,
                Err(_) => w.error(
                    n,
                    format!("{path}: expected an IP address (e.g. 0.0.0.0), got \"{s}\""),
                ),
            }
        }
    }
    if let Some(n) = f.integer(w, "start_parallelism", 1, 32) {
        // Range-checked above.
        c.start_parallelism = n as u32;
    }
    if let Some(s) = f.integer(w, "ready_timeout_secs", 1, 3600) {
        // Range-checked above.
        c.ready_timeout_secs = s as u64;
    }
    if let Some(n) = f.get("network") {
        c.network = read_network(w, n);
    }
    if let Some(nets) = f.list(w, "application_sources", schema::cidr) {
        c.application_sources = nets;
    }
    if let Some(n) = f.get("advertise_address") {
        let path = f.path_of("advertise_address");
        if let Some(s) = schema::non_empty_string(w, n, &path) {
            if s == "auto" {
                c.advertise = Advertise::Auto;
            } else {
                match pilot_values::parse_host_port(&s, Some(c.grpc_port)) {
                    Ok((host, port)) => c.advertise = Advertise::Fixed { host, port },
                    Err(why) => w.error(n, format!("{path}: {why}, got \"{s}\"")),
                }
            }
        }
    }
    c
}

impl Advertise {
    /// `HOST:PORT` for a fixed address (IPv6 in brackets).
    pub fn fixed(&self) -> Option<String> {
        match self {
            Advertise::Auto => None,
            Advertise::Fixed { host, port } => Some(pilot_values::join_host_port(host, *port)),
        }
    }
}

fn read_network(w: &mut Walker, node: &Node<'_>) -> NetworkConfig {
    let mut c = NetworkConfig::default();
    let Some(f) = w.mapping(node, "waypoint.network", &["name", "subnet", "gateway"]) else {
        return c;
    };
    if let Some(n) = f.get("name") {
        if let Some(name) = docker_object_name(w, n, "waypoint.network.name") {
            if ["bridge", "host", "none"].contains(&name.as_str()) {
                w.error(
                    n,
                    format!(
                        "waypoint.network.name: \"{name}\" is one of Docker's predefined \
                         networks; the agent needs a network of its own"
                    ),
                );
            } else {
                c.name = name;
            }
        }
    }
    let mut subnet_ok = true;
    if let Some(n) = f.get("subnet") {
        subnet_ok = false;
        match schema::cidr(w, n, "waypoint.network.subnet") {
            Some(IpNet::V4(net)) if net.prefix_len() <= 29 => {
                c.subnet = net;
                c.gateway = first_host(net);
                subnet_ok = true;
            }
            Some(IpNet::V4(net)) => w.error(
                n,
                format!(
                    "waypoint.network.subnet: {net} is too small for a gateway, the server and \
                     runners; use a /29 or larger"
                ),
            ),
            Some(IpNet::V6(net)) => w.error(
                n,
                format!("waypoint.network.subnet: expected an IPv4 network, got {net}"),
            ),
            None => {}
        }
    }
    if let Some(n) = f.get("gateway") {
        let path = "waypoint.network.gateway";
        if let Some(s) = schema::string(w, n, path) {
            match s.parse::<Ipv4Addr>() {
                Ok(ip) if !subnet_ok => c.gateway = ip,
                Ok(ip)
                    if c.subnet.contains(&ip)
                        && ip != c.subnet.network()
                        && ip != c.subnet.broadcast() =>
                {
                    c.gateway = ip
                }
                Ok(ip) => w.error(
                    n,
                    format!(
                        "{path}: {ip} is not a host address of waypoint.network.subnet {}",
                        c.subnet
                    ),
                ),
                Err(_) => w.error(n, format!("{path}: expected an IPv4 address, got \"{s}\"")),
            }
        }
    }
    c
}

/// A Docker network or volume name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, as dockerd checks it.
fn docker_object_name(w: &mut Walker, node: &Node<'_>, path: &str) -> Option<String> {
    let s = schema::string(w, node, path)?;
    let mut chars = s.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && s.len() <= 128;
    if ok {
        Some(s)
    } else {
        w.error(
            node,
            format!(
                "{path}: expected a name of letters, digits, `_`, `.` and `-` starting with a \
                 letter or digit, got \"{s}\""
            ),
        );
        None
    }
}

/// Why `s` is not an image reference Docker accepts (`[registry[:port]/]path[:tag][@digest]`,
/// path components in lowercase), or `None`. Catches the usual mistakes (spaces, capitals, an
/// empty tag) without re-implementing Docker's grammar in full.
pub fn image_reference_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("an image reference must not be empty");
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("an image reference must not contain spaces");
    }
    let (name, digest) = match s.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        if !d.contains(':') {
            return Some("the digest after `@` must be ALGORITHM:HEX");
        }
    }
    // The tag is after the last `:` that follows the last `/` (a registry port comes before).
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (path, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    if let Some(t) = tag {
        let valid = !t.is_empty()
            && t.len() <= 128
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            return Some("the tag after `:` must be 1-128 letters, digits, `_`, `.` or `-`");
        }
    }
    let mut components: Vec<&str> = path.split('/').collect();
    // A first component with a `.` or `:` or equal to `localhost` names a registry.
    if components.len() > 1 && (components[0].contains(['.', ':']) || components[0] == "localhost")
    {
        components.remove(0);
    }
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
            && c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
    };
    if !components.iter().all(|c| component_ok(c)) {
        return Some(
            "the repository must be lowercase letters, digits and `._-`, separated by `/`",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        for ok in [
            "pilot/waypoint:0.11.4",
            "hashicorp/waypoint:latest",
            "waypoint",
            "registry.example.com:5000/team/waypoint:v1",
            "localhost/x",
            "ghcr.io/org/img@sha256:abcd",
        ] {
            assert_eq!(image_reference_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "Pilot/Waypoint",
            "pilot/waypoint:",
            "pilot waypoint",
            "pilot//waypoint",
            "img@nodigest",
        ] {
            assert!(image_reference_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn default_gateway_is_the_first_host() {
        let n = NetworkConfig::default();
        assert_eq!(n.subnet.to_string(), "172.29.0.0/24");
        assert_eq!(n.gateway, Ipv4Addr::new(172, 29, 0, 1));
    }
}
