//! `host:` — how the host names itself in the Docker server certificate.

use super::schema::{self, Node, Walker};

/// Interfaces whose addresses are not the host's own. Docker's bridges and container veths
/// appear only after dockerd starts; counting them would change the server certificate's
/// SANs after the first run (and a container's gateway address is no way to reach the host).
pub const DEFAULT_EXCLUDE_INTERFACES: &[&str] = &["docker0", "br-*", "veth*"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The host name in the server certificate; `None`: the kernel's host name at run time.
    pub hostname: Option<String>,
    /// More DNS names or IP addresses for the server certificate (a public IP behind NAT, a
    /// DNS name pointing at the VM).
    pub extra_names: Vec<String>,
    /// Interface name patterns (`*` matches any run of characters) whose addresses are left
    /// out of the server certificate.
    pub exclude_interfaces: Vec<String>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            hostname: None,
            extra_names: Vec::new(),
            exclude_interfaces: DEFAULT_EXCLUDE_INTERFACES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

pub fn read(w: &mut Walker, node: &Node<'_>) -> HostConfig {
    let mut c = HostConfig::default();
    let Some(f) = w.mapping(
        node,
        "host",
        &["hostname", "extra_names", "exclude_interfaces"],
    ) else {
        return c;
    };
    if let Some(n) = f.get("hostname") {
        let path = f.path_of("hostname");
        if let Some(name) = schema::string(w, n, &path) {
            if schema::is_dns_name(&name) {
                c.hostname = Some(name);
            } else {
                w.error(n, format!("{path}: expected a host name, got \"{name}\""));
            }
        }
    }
    if let Some(names) = f.list(w, "extra_names", schema::san_name) {
        c.extra_names = names;
    }
    if let Some(patterns) = f.list(w, "exclude_interfaces", schema::non_empty_string) {
        c.exclude_interfaces = patterns;
    }
    c
}
