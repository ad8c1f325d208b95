//! The agent's table as it should be, built from the configuration with the `nftables`
//! crate's JSON schema, and the check whether the live table already is that.
//!
//! ```text
//! table inet pilot_agent {
//!   chain input {    type filter hook input priority filter; policy accept;
//!     iifname "lo" accept                                  # the host itself, always
//!     ip daddr 169.254.169.254 drop                        # the metadata service, from
//!     ip6 daddr fd00:ec2::254 drop                         #   anything but the host
//!     tcp dport { 2375 } drop                              # lock_ports, from everyone else
//!     tcp dport 2376 ip saddr { API SOURCES } accept        # docker_api_sources, docker networks
//!     tcp dport 2376 ip6 saddr { API SOURCES } accept
//!     tcp dport 2376 drop
//!     # only with endpoint.sources (the HTTPS endpoint of `run`):
//!     tcp dport 8443 ip saddr { ENDPOINT SOURCES } accept
//!     tcp dport 8443 ip6 saddr { ENDPOINT SOURCES } accept
//!     tcp dport 8443 drop
//!   }
//!   chain forward {  type filter hook forward priority filter; policy accept;
//!     ip daddr 169.254.169.254 drop                        # containers to the metadata
//!     ip6 daddr fd00:ec2::254 drop                         #   service (AWS, GCP)
//!     ct status dnat meta l4proto tcp ct original proto-dst 2375 drop   # a published 2375
//!     # with waypoint: or published_port_sources:
//!     ct state established,related accept
//!     # with waypoint: its gRPC and HTTP ports, from application sources, operators,
//!     # container networks
//!     ct status dnat meta l4proto tcp ct original proto-dst 9701 ip saddr { APP SOURCES } accept
//!     ct status dnat meta l4proto tcp ct original proto-dst 9701 drop
//!     ct status dnat meta l4proto tcp ct original proto-dst 9702 ip saddr { APP SOURCES } accept
//!     ct status dnat meta l4proto tcp ct original proto-dst 9702 drop
//!     # only with published_port_sources:
//!     ct status dnat [meta l4proto tcp ct original proto-dst PORT] ip saddr { SOURCES } accept
//!     ct status dnat [...] drop
//!   }
//! }
//! ```
//!
//! Policies are `accept`: the table locks what the agent owns and leaves everything else to
//! the rules Docker and the operator keep in their own tables. Ports Docker publishes are
//! DNATed before the input hook would see them, so they are matched in the forward hook on
//! the connection's original destination port (`ct original proto-dst`). One rule per port
//! there: nft lists a set of `proto-dst` values as "[invalid type]".
//!
//! The metadata service holds the user-data (the database admin password, a runner host's
//! endpoint token) and the instance's cloud credentials. The host reaches it through the
//! output hook, which the table leaves alone; a container's request is forwarded (the
//! service is outside the VM, as on a cloud) or, where the address is local, arrives on the
//! input hook from a bridge: both are dropped, so no container, runner or deployed
//! application reads it, whatever hop limit the instance was launched with.
//!
//! Every rule carries the comment `pilot-agent HASH INDEX`, HASH being a digest of the whole
//! desired table. Whether the live table is the desired one is decided in two parts:
//! [`Ruleset::matches`] checks the chains (type, hook, priority, policy) and that they hold
//! exactly the desired comments in order; [`Listed`] then compares the rules' expressions
//! with the listing nft gave right after the agent applied the table. The second part is
//! what notices a rule changed in place under its comment; it compares against nft's own
//! listing because nft normalises expressions (`{ 10.0.0.5/32 }` comes back as
//! `10.0.0.5`), so the rules as built here never equal the rules as listed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem,
};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Accept, Drop, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use sha2::{Digest, Sha256};

use crate::config::Config;

/// Prefix of every rule comment; identifies rules made by the agent.
pub const COMMENT_PREFIX: &str = "pilot-agent";

/// The inputs of the table, gathered from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSpec {
    pub table: String,
    pub lock_ports: Vec<u16>,
    /// Docker's TLS port.
    pub api_port: u16,
    /// Who may reach `api_port` besides loopback.
    pub api_sources: Vec<IpNet>,
    /// Who may reach published ports; empty: unrestricted.
    pub published_sources: Vec<IpNet>,
    /// Which published ports are restricted; empty: all.
    pub published_ports: Vec<u16>,
    /// The HTTPS endpoint's port and who may reach it besides loopback; `None` when the
    /// endpoint is off or `endpoint.sources` is empty (anyone may).
    pub endpoint: Option<(u16, Vec<IpNet>)>,
    /// The Waypoint server's published ports (gRPC and HTTP: the HTTP port serves the same
    /// API as grpc-web) and who may reach them; `None` without a Waypoint server on this host.
    pub waypoint: Option<(Vec<u16>, Vec<IpNet>)>,
    /// Interfaces admitted wherever sources are (the fail-closed table's container bridges,
    /// whose addresses a broken configuration does not say); `*` ends a prefix, as in nft.
    pub admit_interfaces: Vec<String>,
    /// Drop what anything but the host sends to the metadata service (see the module docs).
    pub block_metadata: bool,
}

/// The metadata service's addresses: IPv4 on AWS, GCP and most clouds; AWS's IPv6 one.
pub const METADATA_V4: &str = "169.254.169.254";
pub const METADATA_V6: &str = "fd00:ec2::254";

/// The bridges Docker makes: the default one and every user-defined network (`br-ID`).
pub const DOCKER_BRIDGES: &[&str] = &["docker0", "br-*"];

impl FirewallSpec {
    pub fn from_config(config: &Config) -> Self {
        let fw = &config.firewall;
        let mut published_sources = fw.published_port_sources.clone();
        if !published_sources.is_empty() {
            // Containers reaching a published port through the host's address (hairpin).
            published_sources.extend(fw.docker_networks.iter().copied());
        }
        FirewallSpec {
            table: fw.table.clone(),
            lock_ports: fw.lock_ports.clone(),
            api_port: config.docker.tls_listen.port(),
            api_sources: config.docker_api_allowed_sources(),
            published_sources,
            published_ports: fw.published_ports.clone(),
            endpoint: config
                .endpoint
                .as_ref()
                .filter(|e| !e.sources.is_empty())
                .map(|e| (e.listen.port(), e.sources.clone())),
            waypoint: config.waypoint_allowed_sources(),
            admit_interfaces: Vec::new(),
            block_metadata: true,
        }
    }

    /// The table as the host stands now: [`FirewallSpec::from_config`], except that a
    /// Waypoint server that is not bootstrapped yet (no bootstrap token stored) is reachable
    /// through its published ports from nobody. Waypoint accepts `server bootstrap` from any
    /// client and only the first one gets the token; the agent bootstraps over the server's
    /// own loopback, so nothing outside the host can be first. The bootstrap step applies the
    /// full table once the token is stored.
    pub fn current(config: &Config) -> Self {
        let mut spec = FirewallSpec::from_config(config);
        if let Some((_, sources)) = &mut spec.waypoint
            && !waypoint_bootstrapped(config)
        {
            sources.clear();
        }
        spec
    }

    /// The table for a host whose configuration does not load (`pilot-agent firewall` at
    /// boot): the default table name, 2375 dropped, the metadata service closed to
    /// containers, and Docker's TLS port, the endpoint and the Waypoint ports (at their
    /// default numbers) reachable from loopback and Docker's bridges only. Never no table:
    /// without one, dockerd and the Waypoint server would listen to the world.
    pub fn fail_closed() -> Self {
        let config = Config::default();
        let waypoint = crate::config::WaypointConfig::default();
        FirewallSpec {
            table: config.firewall.table.clone(),
            lock_ports: config.firewall.lock_ports.clone(),
            api_port: config.docker.tls_listen.port(),
            api_sources: Vec::new(),
            published_sources: Vec::new(),
            published_ports: Vec::new(),
            endpoint: Some((crate::config::endpoint::DEFAULT_LISTEN.port(), Vec::new())),
            waypoint: Some((vec![waypoint.grpc_port, waypoint.http_port], Vec::new())),
            admit_interfaces: DOCKER_BRIDGES.iter().map(|s| s.to_string()).collect(),
            block_metadata: true,
        }
    }
}

/// A base chain of the table and its rules (without comments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub name: &'static str,
    pub hook: NfHook,
    pub rules: Vec<Vec<Statement<'static>>>,
}

/// The desired table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub table: String,
    pub chains: Vec<ChainSpec>,
    /// Digest of everything above; carried in every rule's comment.
    pub hash: String,
}

impl Ruleset {
    pub fn new(spec: &FirewallSpec) -> Ruleset {
        let chains = vec![
            ChainSpec {
                name: "input",
                hook: NfHook::Input,
                rules: input_rules(spec),
            },
            ChainSpec {
                name: "forward",
                hook: NfHook::Forward,
                rules: forward_rules(spec),
            },
        ];
        Ruleset {
            hash: rules_hash(&spec.table, &chains),
            table: spec.table.clone(),
            chains,
        }
    }

    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    /// The comments the rules carry, chain by chain (indices run across the table).
    pub fn comments(&self) -> BTreeMap<&'static str, Vec<String>> {
        let mut i = 0;
        let mut out = BTreeMap::new();
        for c in &self.chains {
            let list = c
                .rules
                .iter()
                .map(|_| {
                    let comment = format!("{COMMENT_PREFIX} {} {i}", self.hash);
                    i += 1;
                    comment
                })
                .collect();
            out.insert(c.name, list);
        }
        out
    }

    /// The one transaction that replaces the table: add it (so that the delete cannot fail
    /// on a host where it does not exist yet), delete it, and add it again with its chains
    /// and rules. nft applies a `-f` batch atomically: packets see the old table or the new.
    pub fn batch(&self) -> Nftables<'static> {
        let table = Table {
            family: NfFamily::INet,
            name: Cow::Owned(self.table.clone()),
            handle: None,
        };
        let mut objects = vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table.clone()))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table.clone()))),
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table))),
        ];
        for c in &self.chains {
            objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(
                Chain {
                    family: NfFamily::INet,
                    table: Cow::Owned(self.table.clone()),
                    name: Cow::Borrowed(c.name),
                    _type: Some(NfChainType::Filter),
                    hook: Some(c.hook),
                    prio: Some(0),
                    policy: Some(NfChainPolicy::Accept),
                    ..Chain::default()
                },
            ))));
        }
        let comments = self.comments();
        for c in &self.chains {
            for (rule, comment) in c.rules.iter().zip(&comments[c.name]) {
                objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
                    family: NfFamily::INet,
                    table: Cow::Owned(self.table.clone()),
                    chain: Cow::Borrowed(c.name),
                    expr: Cow::Owned(rule.clone()),
                    comment: Some(Cow::Owned(comment.clone())),
                    ..Rule::default()
                }))));
            }
        }
        Nftables {
            objects: Cow::Owned(objects),
        }
    }

    /// Whether `live` (the output of `nft -j list table inet TABLE`) is this table.
    pub fn matches(&self, live: &Nftables<'_>) -> bool {
        let mut chains: BTreeMap<&str, (&Chain<'_>, Vec<Option<&str>>)> = BTreeMap::new();
        for obj in live.objects.iter() {
            if let NfObject::ListObject(NfListObject::Chain(c)) = obj {
                if c.table == self.table.as_str() {
                    chains.insert(&c.name, (c, Vec::new()));
                }
            }
        }
        for obj in live.objects.iter() {
            if let NfObject::ListObject(NfListObject::Rule(r)) = obj {
                if r.table != self.table.as_str() {
                    continue;
                }
                match chains.get_mut(r.chain.as_ref()) {
                    Some((_, comments)) => comments.push(r.comment.as_deref()),
                    None => return false,
                }
            }
        }
        if chains.len() != self.chains.len() {
            return false;
        }
        let want = self.comments();
        self.chains.iter().all(|c| {
            let Some((live_chain, live_comments)) = chains.get(c.name) else {
                return false;
            };
            live_chain._type == Some(NfChainType::Filter)
                && live_chain.hook == Some(c.hook)
                && live_chain.prio == Some(0)
                && live_chain.policy == Some(NfChainPolicy::Accept)
                && live_comments
                    .iter()
                    .copied()
                    .eq(want[c.name].iter().map(|s| Some(s.as_str())))
        })
    }
}

/// The rules of the agent's table as nft listed them (chain, comment and expressions, in
/// order; handles left out), taken right after the agent applied the table: what a later
/// listing's expressions are compared with. Kept in the state directory
/// (`StateLayout::firewall_listing`), so that `up`, `run` and the boot unit share it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Listed {
    /// The hash of the desired table the listing was taken of.
    pub hash: String,
    pub rules: Vec<ListedRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListedRule {
    pub chain: String,
    pub comment: Option<String>,
    /// The expressions as nft's JSON has them.
    pub expr: serde_json::Value,
}

impl Listed {
    /// The rules of `table` in `live`, for the desired table of `hash`.
    pub fn of(table: &str, hash: &str, live: &Nftables<'_>) -> Listed {
        let rules = live
            .objects
            .iter()
            .filter_map(|obj| match obj {
                NfObject::ListObject(NfListObject::Rule(r)) if r.table == table => {
                    Some(ListedRule {
                        chain: r.chain.to_string(),
                        comment: r.comment.as_deref().map(str::to_string),
                        // Serializing the crate's schema types cannot fail (plain data).
                        expr: serde_json::to_value(&r.expr).unwrap_or_default(),
                    })
                }
                _ => None,
            })
            .collect();
        Listed {
            hash: hash.to_string(),
            rules,
        }
    }
}

/// The input chain: loopback, the locked ports, then the Docker TLS port and the endpoint
/// each admitted from their sources only.
fn input_rules(spec: &FirewallSpec) -> Vec<Vec<Statement<'static>>> {
    let mut input = vec![vec![eq(meta(MetaKey::Iifname), string("lo")), accept()]];
    if spec.block_metadata {
        input.extend(metadata_drops());
    }
    if !spec.lock_ports.is_empty() {
        input.push(vec![eq(tcp_dport(), port_set(&spec.lock_ports)), drop()]);
    }
    input.extend(admit_only(
        vec![eq(tcp_dport(), port(spec.api_port))],
        &spec.api_sources,
        &spec.admit_interfaces,
    ));
    if let Some((endpoint_port, sources)) = &spec.endpoint {
        input.extend(admit_only(
            vec![eq(tcp_dport(), port(*endpoint_port))],
            sources,
            &spec.admit_interfaces,
        ));
    }
    input
}

/// `ip daddr 169.254.169.254 drop`, `ip6 daddr fd00:ec2::254 drop`.
fn metadata_drops() -> Vec<Vec<Statement<'static>>> {
    vec![
        vec![eq(payload("ip", "daddr"), string(METADATA_V4)), drop()],
        vec![eq(payload("ip6", "daddr"), string(METADATA_V6)), drop()],
    ]
}

/// The forward chain, which sees what Docker publishes (DNAT bypasses the input hook): the
/// locked ports dropped, replies admitted, then the Waypoint gRPC port and the restricted
/// published ports admitted from their sources only.
fn forward_rules(spec: &FirewallSpec) -> Vec<Vec<Statement<'static>>> {
    let mut forward = Vec::new();
    if spec.block_metadata {
        // First: before `established` admits a connection made before the table was.
        forward.extend(metadata_drops());
    }
    for p in &spec.lock_ports {
        // Something may publish a locked port through Docker.
        let mut rule = dnat_to_tcp_port(*p);
        rule.push(drop());
        forward.push(rule);
    }
    if !spec.published_sources.is_empty() || spec.waypoint.is_some() {
        forward.push(vec![
            Statement::Match(Match {
                left: ct("state", None),
                right: Expression::List(vec![string("established"), string("related")]),
                op: Operator::IN,
            }),
            accept(),
        ]);
    }
    if let Some((ports, sources)) = &spec.waypoint {
        for p in ports {
            forward.extend(admit_only(
                dnat_to_tcp_port(*p),
                sources,
                &spec.admit_interfaces,
            ));
        }
    }
    if !spec.published_sources.is_empty() {
        // One group of rules per restricted port, or one for every DNATed connection.
        let selectors: Vec<Vec<Statement<'static>>> = if spec.published_ports.is_empty() {
            vec![vec![dnat()]]
        } else {
            spec.published_ports
                .iter()
                .map(|p| dnat_to_tcp_port(*p))
                .collect()
        };
        for selector in selectors {
            forward.extend(admit_only(
                selector,
                &spec.published_sources,
                &spec.admit_interfaces,
            ));
        }
    }
    forward
}

/// What `selector` matches, accepted from `sources` (one rule per address family that has
/// any) and from `interfaces` (one rule each), and dropped from everyone else.
fn admit_only(
    selector: Vec<Statement<'static>>,
    sources: &[IpNet],
    interfaces: &[String],
) -> Vec<Vec<Statement<'static>>> {
    let (v4, v6) = split_families(sources);
    let mut rules = Vec::new();
    for name in interfaces {
        let mut rule = selector.clone();
        rule.push(eq(meta(MetaKey::Iifname), string(name)));
        rule.push(accept());
        rules.push(rule);
    }
    for (family, nets) in [("ip", v4), ("ip6", v6)] {
        if !nets.is_empty() {
            let mut rule = selector.clone();
            rule.push(eq(payload(family, "saddr"), prefix_set(&nets)));
            rule.push(accept());
            rules.push(rule);
        }
    }
    let mut rule = selector;
    rule.push(drop());
    rules.push(rule);
    rules
}

/// A short hash of the table's name and rules: what the rule comments carry, so a table
/// made from another configuration is told apart.
fn rules_hash(table: &str, chains: &[ChainSpec]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(table.as_bytes());
    for c in chains {
        hasher.update(c.name.as_bytes());
        // Serializing the crate's schema types cannot fail (plain data, string keys).
        hasher.update(serde_json::to_vec(&c.rules).unwrap_or_default());
    }
    hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// IPv4 and IPv6 networks apart, each merged (nft rejects overlapping intervals in a set).
fn split_families(nets: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let merged = IpNet::aggregate(&nets.to_vec());
    merged.into_iter().partition(|n| matches!(n, IpNet::V4(_)))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn accept() -> Statement<'static> {
    Statement::Accept(Some(Accept {}))
}

fn drop() -> Statement<'static> {
    Statement::Drop(Some(Drop {}))
}

fn string(s: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(s.to_string()))
}

fn port(p: u16) -> Expression<'static> {
    Expression::Number(p.into())
}

fn port_set(ports: &[u16]) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        ports.iter().map(|p| SetItem::Element(port(*p))).collect(),
    ))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn tcp_dport() -> Expression<'static> {
    payload("tcp", "dport")
}

fn ct(key: &'static str, dir: Option<nftables::expr::CTDir>) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed(key),
        family: None,
        dir,
    }))
}

/// `ct status dnat`: the connection was destination-NATed, i.e. it goes to a published port.
fn dnat() -> Statement<'static> {
    Statement::Match(Match {
        left: ct("status", None),
        right: string("dnat"),
        op: Operator::IN,
    })
}

/// `ct status dnat meta l4proto tcp ct original proto-dst PORT`: a connection to published
/// TCP port PORT (the port the client asked for, before Docker's DNAT rewrote it).
fn dnat_to_tcp_port(p: u16) -> Vec<Statement<'static>> {
    vec![
        dnat(),
        eq(meta(MetaKey::L4proto), string("tcp")),
        eq(
            ct("proto-dst", Some(nftables::expr::CTDir::Original)),
            port(p),
        ),
    ]
}

fn prefix_set(nets: &[IpNet]) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        nets.iter()
            .map(|n| {
                SetItem::Element(Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(string(&addr_string(n.network()))),
                    len: n.prefix_len().into(),
                })))
            })
            .collect(),
    ))
}

/// Whether the Waypoint server's bootstrap token is stored (see [`FirewallSpec::current`]);
/// an unreadable file counts as stored, so that a permission problem does not close the
/// server to its users (the Waypoint steps report the problem).
pub fn waypoint_bootstrapped(config: &Config) -> bool {
    let token = config.state().waypoint().bootstrap_token();
    match std::fs::metadata(&token) {
        Ok(m) => m.len() > 0,
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

fn addr_string(ip: IpAddr) -> String {
    ip.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FirewallSpec {
        FirewallSpec::from_config(&Config::default())
    }

    fn rules_json(r: &Ruleset) -> serde_json::Value {
        serde_json::to_value(r.batch()).unwrap()
    }

    #[test]
    fn default_table_locks_2375_and_closes_2376_to_all_but_loopback() {
        let r = Ruleset::new(&spec());
        assert_eq!(r.table, "pilot_agent");
        assert_eq!(
            r.chains[0].rules.len(),
            5,
            "lo accept, metadata v4 and v6 drop, 2375 drop, 2376 drop"
        );
        // Metadata from containers, and lock port 2375 published through Docker: dropped in
        // forward too.
        assert_eq!(r.chains[1].rules.len(), 3);
        let v = rules_json(&r);
        let objs = v["nftables"].as_array().unwrap();
        // One transaction: add, delete, add table; chains; rules.
        assert_eq!(objs[0]["add"]["table"]["name"], "pilot_agent");
        assert_eq!(objs[0]["add"]["table"]["family"], "inet");
        assert_eq!(objs[1]["delete"]["table"]["name"], "pilot_agent");
        assert_eq!(objs[2]["add"]["table"]["name"], "pilot_agent");
        assert_eq!(objs[3]["add"]["chain"]["hook"], "input");
        assert_eq!(objs[3]["add"]["chain"]["policy"], "accept");
        assert_eq!(objs[4]["add"]["chain"]["hook"], "forward");
        let first = &objs[5]["add"]["rule"];
        assert_eq!(first["expr"][0]["match"]["left"]["meta"]["key"], "iifname");
        assert_eq!(first["expr"][0]["match"]["right"], "lo");
        assert_eq!(first["comment"], format!("pilot-agent {} 0", r.hash));
        let metadata = &objs[6]["add"]["rule"]["expr"];
        assert_eq!(metadata[0]["match"]["left"]["payload"]["field"], "daddr");
        assert_eq!(metadata[0]["match"]["right"], "169.254.169.254");
        assert_eq!(
            objs[7]["add"]["rule"]["expr"][0]["match"]["right"],
            "fd00:ec2::254"
        );
        assert_eq!(objs[10]["add"]["rule"]["expr"], *metadata);
        let lock = &objs[8]["add"]["rule"]["expr"];
        assert_eq!(lock[0]["match"]["right"]["set"][0], 2375);
        assert!(lock[1].get("drop").is_some());
        let fwd = &objs[12]["add"]["rule"]["expr"];
        assert_eq!(fwd[2]["match"]["left"]["ct"]["key"], "proto-dst");
        assert_eq!(fwd[2]["match"]["left"]["ct"]["dir"], "original");
        assert_eq!(fwd[2]["match"]["right"], 2375);
        // Nothing in the batch touches another table.
        for o in objs {
            let (_, inner) = o.as_object().unwrap().iter().next().unwrap();
            let (_, obj) = inner.as_object().unwrap().iter().next().unwrap();
            let name = obj.get("table").or_else(|| obj.get("name")).unwrap();
            assert_eq!(name, "pilot_agent");
        }
    }

    #[test]
    fn api_sources_are_merged_and_split_by_family() {
        let mut s = spec();
        s.api_sources = vec![
            "10.0.0.0/8".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap(), // inside 10/8: merged away
            "192.168.1.5/32".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ];
        let r = Ruleset::new(&s);
        let input = &r.chains[0].rules;
        assert_eq!(input.len(), 7);
        let v = serde_json::to_value(&input[4]).unwrap();
        assert_eq!(v[1]["match"]["left"]["payload"]["protocol"], "ip");
        let set = v[1]["match"]["right"]["set"].as_array().unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set[0]["prefix"]["addr"], "10.0.0.0");
        assert_eq!(set[0]["prefix"]["len"], 8);
        assert_eq!(set[1]["prefix"]["addr"], "192.168.1.5");
        let v6 = serde_json::to_value(&input[5]).unwrap();
        assert_eq!(v6[1]["match"]["left"]["payload"]["protocol"], "ip6");
        assert!(
            serde_json::to_value(&input[6]).unwrap()[1]
                .get("drop")
                .is_some()
        );
    }

    #[test]
    fn published_ports_restricted_per_port_or_all() {
        let mut s = spec();
        s.lock_ports = vec![];
        s.published_sources = vec!["198.51.100.0/24".parse().unwrap()];
        let r = Ruleset::new(&s);
        // metadata v4 and v6, established, accept sources, drop (every DNATed connection).
        assert_eq!(r.chains[1].rules.len(), 5);
        s.published_ports = vec![9701, 9702];
        let r = Ruleset::new(&s);
        assert_eq!(r.chains[1].rules.len(), 2 + 1 + 2 * 2);
        let v = serde_json::to_value(&r.chains[1].rules[3]).unwrap();
        assert_eq!(v[0]["match"]["left"]["ct"]["key"], "status");
        assert_eq!(v[2]["match"]["right"], 9701);
        assert_eq!(
            v[3]["match"]["right"]["set"][0]["prefix"]["addr"],
            "198.51.100.0"
        );
    }

    #[test]
    fn waypoint_ports_open_only_once_the_server_is_bootstrapped() {
        use crate::config::WaypointConfig;
        let dir = tempfile::tempdir().unwrap();
        let c = Config {
            state_dir: dir.path().to_path_buf(),
            waypoint: Some(WaypointConfig {
                application_sources: vec!["198.51.100.0/24".parse().unwrap()],
                ..WaypointConfig::default()
            }),
            ..Config::default()
        };
        let (ports, sources) = FirewallSpec::current(&c).waypoint.unwrap();
        assert_eq!(ports, vec![9701, 9702]);
        assert!(sources.is_empty(), "open before the bootstrap: {sources:?}");
        let token = c.state().waypoint().bootstrap_token();
        std::fs::create_dir_all(token.parent().unwrap()).unwrap();
        std::fs::write(&token, "").unwrap();
        assert!(FirewallSpec::current(&c).waypoint.unwrap().1.is_empty());
        std::fs::write(&token, "wp24token\n").unwrap();
        assert_eq!(FirewallSpec::current(&c), FirewallSpec::from_config(&c));
        assert!(
            FirewallSpec::current(&c)
                .waypoint
                .unwrap()
                .1
                .contains(&"198.51.100.0/24".parse().unwrap())
        );
    }

    #[test]
    fn endpoint_port_admits_only_its_sources() {
        use crate::config::EndpointConfig;
        let mut c = Config {
            endpoint: Some(EndpointConfig::default()),
            ..Config::default()
        };
        // No sources: anyone may reach the endpoint, the table is the default one.
        let open = Ruleset::new(&FirewallSpec::from_config(&c));
        assert_eq!(open, Ruleset::new(&spec()));
        if let Some(e) = &mut c.endpoint {
            e.listen = "0.0.0.0:9443".parse().unwrap();
            e.sources = vec![
                "203.0.113.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ];
        }
        let r = Ruleset::new(&FirewallSpec::from_config(&c));
        assert_ne!(r.hash, open.hash);
        let input = &r.chains[0].rules;
        // lo, metadata v4 and v6, 2375, 2376 drop, then 9443 from v4, from v6, drop.
        assert_eq!(input.len(), 8);
        let v4 = serde_json::to_value(&input[5]).unwrap();
        assert_eq!(v4[0]["match"]["right"], 9443);
        assert_eq!(v4[1]["match"]["left"]["payload"]["protocol"], "ip");
        assert_eq!(
            v4[1]["match"]["right"]["set"][0]["prefix"]["addr"],
            "203.0.113.0"
        );
        assert!(v4[2].get("accept").is_some());
        let v6 = serde_json::to_value(&input[6]).unwrap();
        assert_eq!(v6[1]["match"]["left"]["payload"]["protocol"], "ip6");
        let last = serde_json::to_value(&input[7]).unwrap();
        assert_eq!(last[0]["match"]["right"], 9443);
        assert!(last[1].get("drop").is_some());
        // Loopback is accepted before any of it.
        assert_eq!(
            serde_json::to_value(&input[0]).unwrap()[0]["match"]["right"],
            "lo"
        );
    }

    #[test]
    fn waypoint_grpc_port_admits_applications_operators_and_containers_only() {
        use crate::config::{ServerLink, WaypointConfig};
        let mut c = Config {
            waypoint: Some(WaypointConfig {
                grpc_port: 19701,
                application_sources: vec!["198.51.100.0/24".parse().unwrap()],
                ..WaypointConfig::default()
            }),
            ..Config::default()
        };
        c.firewall.docker_api_sources = vec!["192.0.2.7/32".parse().unwrap()];
        let r = Ruleset::new(&FirewallSpec::from_config(&c));
        let forward = &r.chains[1].rules;
        // metadata v4 and v6, 2375 DNAT drop, established, then the gRPC port 19701 and the
        // HTTP port 9702 (the same API as grpc-web) each from v4 sources, else dropped.
        assert_eq!(forward.len(), 8, "{forward:?}");
        let established = serde_json::to_value(&forward[3]).unwrap();
        assert_eq!(established[0]["match"]["left"]["ct"]["key"], "state");
        let allow = serde_json::to_value(&forward[4]).unwrap();
        assert_eq!(allow[2]["match"]["right"], 19701);
        let set: Vec<String> = allow[3]["match"]["right"]["set"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| format!("{}/{}", p["prefix"]["addr"], p["prefix"]["len"]))
            .collect();
        // Applications, the operator, the Pilot network (merged and sorted by the builder).
        for want in [
            "\"198.51.100.0\"/24",
            "\"192.0.2.7\"/32",
            "\"172.29.0.0\"/24",
        ] {
            assert!(set.contains(&want.to_string()), "{want} not in {set:?}");
        }
        assert!(allow[4].get("accept").is_some());
        let last = serde_json::to_value(&forward[5]).unwrap();
        assert_eq!(last[2]["match"]["right"], 19701);
        assert!(last[3].get("drop").is_some());
        let http = serde_json::to_value(&forward[6]).unwrap();
        assert_eq!(http[2]["match"]["right"], 9702);
        assert_eq!(http[3], allow[3], "9702 admits exactly 19701's sources");
        let last = serde_json::to_value(&forward[7]).unwrap();
        assert_eq!(last[2]["match"]["right"], 9702);
        assert!(last[3].get("drop").is_some());

        // A runner-only host publishes no Waypoint server: no such rules.
        c.role = crate::config::Role::Runner;
        c.server = Some(ServerLink {
            endpoint: "10.0.0.5".parse().unwrap(),
            token_file: "/t".into(),
            ca_sha256: crate::remote::Fingerprint::of_der(b"ca"),
            waypoint_address: None,
            timeout_secs: 10,
            deregister: Default::default(),
        });
        assert_eq!(
            Ruleset::new(&FirewallSpec::from_config(&c)).chains[1]
                .rules
                .len(),
            3
        );
    }

    #[test]
    fn fail_closed_admits_loopback_and_docker_bridges_only() {
        let r = Ruleset::new(&FirewallSpec::fail_closed());
        let rules: Vec<_> = r.chains.iter().map(|c| &c.rules).collect();
        let text = serde_json::to_string(&rules).unwrap();
        let input = &r.chains[0].rules;
        // lo, metadata v4 and v6, 2375, then 2376 and 8443 each: docker0, br-*, drop.
        assert_eq!(input.len(), 4 + 3 + 3, "{text}");
        for (i, port) in [(4, 2376), (7, 8443)] {
            let v = serde_json::to_value(&input[i..i + 3]).unwrap();
            assert_eq!(v[0][0]["match"]["right"], port);
            assert_eq!(v[0][1]["match"]["right"], "docker0");
            assert_eq!(v[1][1]["match"]["right"], "br-*");
            assert!(v[1][2].get("accept").is_some());
            assert!(v[2][1].get("drop").is_some());
        }
        // forward: metadata, 2375, established, 9701 and 9702 each: docker0, br-*, drop.
        let forward = &r.chains[1].rules;
        assert_eq!(forward.len(), 2 + 1 + 1 + 3 + 3, "{text}");
        assert!(!text.contains("saddr"), "no address is trusted: {text}");
    }

    #[test]
    fn hash_follows_content() {
        let a = Ruleset::new(&spec());
        assert_eq!(a, Ruleset::new(&spec()), "deterministic");
        let mut s = spec();
        s.api_sources = vec!["10.0.0.0/8".parse().unwrap()];
        let b = Ruleset::new(&s);
        assert_ne!(a.hash, b.hash);
        assert_eq!(a.hash.len(), 16);
    }

    /// What `nft -j list table` prints for a table: our batch's objects as list objects,
    /// with handles, as nft would return them.
    fn listing(r: &Ruleset) -> Nftables<'static> {
        let objects = r
            .batch()
            .objects
            .iter()
            .skip(3)
            .map(|o| match o {
                NfObject::CmdObject(NfCmd::Add(obj)) => NfObject::ListObject(obj.clone()),
                other => other.clone(),
            })
            .collect::<Vec<_>>();
        Nftables {
            objects: Cow::Owned(objects),
        }
    }

    #[test]
    fn matches_only_the_exact_table() {
        let r = Ruleset::new(&spec());
        assert!(r.matches(&listing(&r)));

        let mut other_spec = spec();
        other_spec.lock_ports = vec![2375, 2377];
        let other = Ruleset::new(&other_spec);
        assert!(!r.matches(&listing(&other)), "other hash");

        // A rule deleted by hand.
        let mut l = listing(&r);
        l.objects.to_mut().pop();
        assert!(!r.matches(&l));

        // A rule added by hand (no comment).
        let mut l = listing(&r);
        l.objects
            .to_mut()
            .push(NfObject::ListObject(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: "pilot_agent".into(),
                chain: "input".into(),
                expr: Cow::Owned(vec![accept()]),
                ..Rule::default()
            })));
        assert!(!r.matches(&l));

        // Policy flipped by hand.
        let mut l = listing(&r);
        if let NfObject::ListObject(NfListObject::Chain(c)) = &mut l.objects.to_mut()[0] {
            c.policy = Some(NfChainPolicy::Drop);
        }
        assert!(!r.matches(&l));

        // Empty table (exists, no chains).
        assert!(!r.matches(&Nftables {
            objects: Cow::Owned(vec![])
        }));
    }

    #[test]
    fn parses_real_nft_listing() {
        // As printed by nft 1.0.6 for a table like ours (handles, metainfo, normalised sets).
        let r = Ruleset::new(&spec());
        let c = r.comments();
        let text = format!(
            r#"{{"nftables": [{{"metainfo": {{"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}}},
            {{"table": {{"family": "inet", "name": "pilot_agent", "handle": 2}}}},
            {{"chain": {{"family": "inet", "table": "pilot_agent", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}}},
            {{"chain": {{"family": "inet", "table": "pilot_agent", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}},
            {{"rule": {{"family": "inet", "table": "pilot_agent", "chain": "input", "handle": 3, "comment": "{}", "expr": [{{"match": {{"op": "==", "left": {{"meta": {{"key": "iifname"}}}}, "right": "lo"}}}}, {{"accept": null}}]}}}},
            {{"rule": {{"family": "inet", "table": "pilot_agent", "chain": "input", "handle": 7, "comment": "{}", "expr": [{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "ip", "field": "daddr"}}}}, "right": "169.254.169.254"}}}}, {{"drop": null}}]}}}},
            {{"rule": {{"family": "inet", "table": "pilot_agent", "chain": "input", "handle": 8, "comment": "{}", "expr": [{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "ip6", "field": "daddr"}}}}, "right": "fd00:ec2::254"}}}}, {{"drop": null}}]}}}},
            {{"rule": {{"family": "inet", "table": "pilot_agent", "chain": "input", "handle": 4, "comment": "{}", "expr": [{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "tcp", "field": "dport"}}}}, "right": 2375}}}}, {{"drop": null}}]}}}},
            {{"rule": {{"family": "inet", "table": "pilot_agent", "chain": "input", "handle": 5, "comment": "{}", "expr": [{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "tcp", "field": "dport"}}}}, "right": 2376}}}}, {{"drop": null}}]}}}},
            {{"rule": {{"family": "inet", "table": "pilot_agent", "chain": "forward", "handle": 9, "comment": "{}", "expr": [{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "ip", "field": "daddr"}}}}, "right": "169.254.169.254"}}}}, {{"drop": null}}]}}}},
            {{"rule": {{"family": "inet", "table": "pilot_agent", "chain": "forward", "handle": 10, "comment": "{}", "expr": [{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "ip6", "field": "daddr"}}}}, "right": "fd00:ec2::254"}}}}, {{"drop": null}}]}}}},
            {{"rule": {{"family": "inet", "table": "pilot_agent", "chain": "forward", "handle": 6, "comment": "{}", "expr": [{{"match": {{"op": "in", "left": {{"ct": {{"key": "status"}}}}, "right": "dnat"}}}}, {{"match": {{"op": "==", "left": {{"meta": {{"key": "l4proto"}}}}, "right": "tcp"}}}}, {{"match": {{"op": "==", "left": {{"ct": {{"key": "proto-dst", "dir": "original"}}}}, "right": 2375}}}}, {{"drop": null}}]}}}}]}}"#,
            c["input"][0],
            c["input"][1],
            c["input"][2],
            c["input"][3],
            c["input"][4],
            c["forward"][0],
            c["forward"][1],
            c["forward"][2]
        );
        let live: Nftables = serde_json::from_str(&text).unwrap();
        assert!(r.matches(&live));
    }
}
