//! Fuzz target: the configuration parser on structured input. The fuzzer's bytes choose a
//! tree of sections, keys (the configuration's own, mostly) and values (plausible ones:
//! ports, CIDRs, paths, choices, hashes; and arbitrary strings in every quoting style), with
//! anchors, aliases, tags, block scalars and flow collections, and nesting far beyond
//! `bounds::MAX_DEPTH` in every style (block mappings, block sequences, compact `- - -`,
//! flow `[[[` and `{a: {a:`). The tree is rendered as YAML text and checked as config_yaml
//! checks raw text (`pilot_agent_fuzz::check_config`); a document nested deeper than the
//! bound must be refused.
#![no_main]

use std::fmt::Write;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pilot_agent::config::TOP_LEVEL_KEYS;
use pilot_agent::config::bounds::MAX_DEPTH;

/// Keys of the sections (and their subsections), as agent/examples/agent.yaml documents them.
const KEYS: &[&str] = &[
    "state_dir",
    "role",
    "server",
    "endpoint",
    "token_file",
    "ca_sha256",
    "waypoint_address",
    "timeout_secs",
    "hostname",
    "extra_names",
    "exclude_interfaces",
    "provider",
    "metadata_url",
    "timeout_ms",
    "retries",
    "total_budget_secs",
    "ca_validity_days",
    "cert_validity_days",
    "renew_before_days",
    "socket",
    "daemon_config",
    "systemd_dropin_dir",
    "dockerd_path",
    "tls_listen",
    "service",
    "manager",
    "unit",
    "restart_command",
    "ready_timeout_secs",
    "table",
    "lock_ports",
    "docker_api_sources",
    "docker_networks",
    "published_port_sources",
    "published_ports",
    "server_image",
    "runner_image",
    "images_dir",
    "runners",
    "network",
    "name",
    "subnet",
    "gateway",
    "volume",
    "grpc_port",
    "http_port",
    "publish_address",
    "advertise_address",
    "application_sources",
    "host",
    "port",
    "admin_user",
    "admin_password",
    "admin_password_file",
    "admin_database",
    "tls",
    "ca_file",
    "app_role",
    "app_database",
    "connect_timeout_secs",
    "statement_timeout_secs",
    "interval_secs",
    "database_retry_max_secs",
    "listen",
    "token_sha256",
    "token_sha256_file",
    "sources",
    "rate_limit",
    "failures",
    "window_secs",
];

/// Values the configuration accepts somewhere, and near misses.
const VALUES: &[&str] = &[
    "/var/lib/pilot-agent",
    "server",
    "runner",
    "auto",
    "aws",
    "gcp",
    "none",
    "systemd",
    "command",
    "disable",
    "require",
    "verify-full",
    "http://169.254.169.254",
    "http://[fd00:ec2::254]",
    "0.0.0.0:2376",
    "[::]:2376",
    "127.0.0.1:8443",
    "10.0.1.5:8443",
    "10.0.1.5",
    "pilot-db.example.internal",
    "pilot.example.com",
    "203.0.113.10",
    "198.51.100.0/24",
    "2001:db8::/32",
    "172.29.0.0/24",
    "172.29.0.1",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/33",
    "pilot/waypoint:0.11.4",
    "pilot_agent",
    "pilot",
    "waypoint-server",
    "docker.service",
    "/usr/sbin/dockerd",
    "/etc/docker/daemon.json",
    "/var/run/docker.sock",
    "/etc/pilot/endpoint-token.sha256",
    "/etc/pilot/server-token",
    "docker0",
    "br-*",
    "veth*",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "3F:9A:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD",
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "relative/path",
    "",
    "~",
    "null",
    "true",
    "false",
    "yes",
    "0",
    "-1",
    "65535",
    "65536",
    "0x10",
    "0o17",
    "1e3",
    ".inf",
    "-.nan",
    "2375",
    "9701",
    "18446744073709551616",
    "systemctl restart docker",
    "é",
    "\u{200b}",
    "a: b",
    "- x",
    "#",
    "&a",
    "*a",
    "!!str",
];

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Top(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Quote {
    Plain,
    Single,
    Double,
}

#[derive(Arbitrary, Debug)]
enum Scalar {
    Known(u8),
    KnownQuoted(u8),
    Int(i64),
    Port(u16),
    Bool(bool),
    Null,
    Float(f64),
    Cidr([u8; 4], u8),
    Cidr6(u16, u16, u8),
    Addr([u8; 4], u16),
    Str(Quote, String),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Deep {
    BlockMap,
    BlockSeq,
    CompactSeq,
    FlowSeq,
    FlowMap,
    /// Block mappings, then flow sequences inside.
    Mixed,
}

#[derive(Arbitrary, Debug)]
enum Tag {
    Str,
    Int,
    Bool,
    Null,
    Binary,
    Custom(String),
}

#[derive(Arbitrary, Debug)]
enum Chomp {
    Clip,
    Strip,
    Keep,
}

#[derive(Debug)]
enum Node {
    Scalar(Scalar),
    Map(Vec<(Key, Node)>),
    Seq(Vec<Node>),
    FlowSeq(Vec<Scalar>),
    FlowMap(Vec<(Key, Scalar)>),
    /// `depth` levels of one style around a leaf: past the bound when depth > 64.
    Deep(u8, Deep, Scalar),
    Anchored(u8, Box<Node>),
    Alias(u8),
    Tagged(Tag, Scalar),
    Block(bool, Chomp, Vec<String>),
}

/// Trees deeper than this come only from `Node::Deep` (rendered iteratively): the
/// generator's own recursion stays shallow.
const TREE_DEPTH: usize = 8;

fn node(u: &mut Unstructured, depth: usize) -> Result<Node> {
    let choice = if depth >= TREE_DEPTH {
        u.int_in_range(0..=2)?
    } else {
        u.int_in_range(0..=9)?
    };
    Ok(match choice {
        0 => Node::Scalar(u.arbitrary()?),
        1 => Node::Deep(u.arbitrary()?, u.arbitrary()?, u.arbitrary()?),
        2 => Node::Alias(u.arbitrary()?),
        3 => Node::FlowSeq(u.arbitrary()?),
        4 => Node::FlowMap(u.arbitrary()?),
        5 => Node::Tagged(u.arbitrary()?, u.arbitrary()?),
        6 => Node::Block(u.arbitrary()?, u.arbitrary()?, u.arbitrary()?),
        7 => Node::Anchored(u.arbitrary()?, Box::new(node(u, depth + 1)?)),
        8 => {
            let mut items = Vec::new();
            u.arbitrary_loop(None, Some(16), |u| {
                items.push(node(u, depth + 1)?);
                Ok(std::ops::ControlFlow::Continue(()))
            })?;
            Node::Seq(items)
        }
        _ => Node::Map(entries(u, depth + 1)?),
    })
}

fn entries(u: &mut Unstructured, depth: usize) -> Result<Vec<(Key, Node)>> {
    let mut entries = Vec::new();
    u.arbitrary_loop(None, Some(24), |u| {
        entries.push((u.arbitrary()?, node(u, depth)?));
        Ok(std::ops::ControlFlow::Continue(()))
    })?;
    Ok(entries)
}

/// The document: top-level sections (mostly the configuration's own), and what may follow.
#[derive(Debug)]
struct Doc {
    start_marker: bool,
    sections: Vec<(Key, Node)>,
    tail: Option<String>,
    second_document: bool,
}

impl<'a> Arbitrary<'a> for Doc {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Doc {
            start_marker: u.arbitrary()?,
            sections: entries(u, 1)?,
            tail: u.arbitrary()?,
            second_document: u.arbitrary()?,
        })
    }
}

fn pick<'s>(list: &[&'s str], i: u8) -> &'s str {
    list[usize::from(i) % list.len()]
}

fn key_text(k: &Key) -> String {
    match k {
        Key::Known(i) => pick(KEYS, *i).to_string(),
        Key::Top(i) => pick(TOP_LEVEL_KEYS, *i).to_string(),
        Key::Other(s) => quoted(s),
    }
}

fn quoted(s: &str) -> String {
    // A JSON string is a valid YAML double-quoted scalar.
    serde_json::to_string(s).unwrap_or_default()
}

fn scalar_text(s: &Scalar) -> String {
    match s {
        Scalar::Known(i) => pick(VALUES, *i).to_string(),
        Scalar::KnownQuoted(i) => quoted(pick(VALUES, *i)),
        Scalar::Int(n) => n.to_string(),
        Scalar::Port(p) => p.to_string(),
        Scalar::Bool(b) => b.to_string(),
        Scalar::Null => "null".into(),
        Scalar::Float(f) => format!("{f:?}"),
        Scalar::Cidr(a, len) => format!("{}.{}.{}.{}/{}", a[0], a[1], a[2], a[3], len % 40),
        Scalar::Cidr6(a, b, len) => format!("{a:x}:{b:x}::/{}", len % 140),
        Scalar::Addr(a, port) => format!("{}.{}.{}.{}:{port}", a[0], a[1], a[2], a[3]),
        Scalar::Str(Quote::Plain, s) => s.clone(),
        Scalar::Str(Quote::Single, s) => format!("'{}'", s.replace('\'', "''")),
        Scalar::Str(Quote::Double, s) => quoted(s),
    }
}

/// Renders YAML text and records the deepest nesting of collections it wrote.
#[derive(Default)]
struct Render {
    out: String,
    depth: usize,
}

impl Render {
    fn note(&mut self, depth: usize) {
        self.depth = self.depth.max(depth);
    }

    fn indent(&mut self, n: usize) {
        self.out.extend(std::iter::repeat_n(' ', n));
    }

    /// `node` as the value after `key:` (or `-`), the collection it opens being level
    /// `level`.
    fn value(&mut self, node: &Node, indent: usize, level: usize) {
        match node {
            Node::Scalar(s) => {
                let _ = writeln!(self.out, " {}", scalar_text(s));
            }
            Node::Alias(a) => {
                let _ = writeln!(self.out, " *a{a}");
            }
            Node::Tagged(tag, s) => {
                let tag = match tag {
                    Tag::Str => "!!str".to_string(),
                    Tag::Int => "!!int".into(),
                    Tag::Bool => "!!bool".into(),
                    Tag::Null => "!!null".into(),
                    Tag::Binary => "!!binary".into(),
                    Tag::Custom(t) => format!("!{}", t.replace([' ', '\n'], "")),
                };
                let _ = writeln!(self.out, " {tag} {}", scalar_text(s));
            }
            Node::Block(folded, chomp, lines) => {
                let indicator = if *folded { '>' } else { '|' };
                let chomp = match chomp {
                    Chomp::Clip => "",
                    Chomp::Strip => "-",
                    Chomp::Keep => "+",
                };
                let _ = writeln!(self.out, " {indicator}{chomp}");
                for l in lines {
                    self.indent(indent + 2);
                    let _ = writeln!(self.out, "{}", l.replace('\n', " "));
                }
            }
            Node::FlowSeq(items) => {
                self.note(level);
                let items: Vec<String> = items.iter().map(scalar_text).collect();
                let _ = writeln!(self.out, " [{}]", items.join(", "));
            }
            Node::FlowMap(entries) => {
                self.note(level);
                let entries: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| format!("{}: {}", key_text(k), scalar_text(v)))
                    .collect();
                let _ = writeln!(self.out, " {{{}}}", entries.join(", "));
            }
            Node::Anchored(a, inner) => {
                let _ = write!(self.out, " &a{a}");
                self.value(inner, indent, level);
            }
            Node::Map(entries) if entries.is_empty() => {
                self.note(level);
                self.out.push_str(" {}\n");
            }
            Node::Map(entries) => {
                self.out.push('\n');
                self.mapping(entries, indent + 2, level);
            }
            Node::Seq(items) if items.is_empty() => {
                self.note(level);
                self.out.push_str(" []\n");
            }
            Node::Seq(items) => {
                self.note(level);
                self.out.push('\n');
                for item in items {
                    self.indent(indent + 2);
                    self.out.push('-');
                    self.value(item, indent + 2, level + 1);
                }
            }
            Node::Deep(n, style, leaf) => self.deep(usize::from(*n), *style, leaf, indent, level),
        }
    }

    fn mapping(&mut self, entries: &[(Key, Node)], indent: usize, level: usize) {
        self.note(level);
        for (k, v) in entries {
            self.indent(indent);
            let _ = write!(self.out, "{}:", key_text(k));
            self.value(v, indent, level + 1);
        }
    }

    /// `n` levels of `style` around `leaf`, written without recursion.
    fn deep(&mut self, n: usize, style: Deep, leaf: &Scalar, indent: usize, level: usize) {
        let leaf = scalar_text(leaf);
        if n == 0 {
            let _ = writeln!(self.out, " {leaf}");
            return;
        }
        self.note(level + n - 1);
        match style {
            Deep::BlockMap | Deep::Mixed => {
                let block = if matches!(style, Deep::Mixed) {
                    n / 2
                } else {
                    n
                };
                let flow = n - block;
                for i in 0..block {
                    self.out.push('\n');
                    self.indent(indent + 2 * (i + 1));
                    self.out.push_str("a:");
                }
                let _ = writeln!(self.out, " {}{leaf}{}", "[".repeat(flow), "]".repeat(flow));
            }
            Deep::BlockSeq => {
                for i in 0..n {
                    self.out.push('\n');
                    self.indent(indent + 2 * (i + 1));
                    self.out.push('-');
                }
                let _ = writeln!(self.out, " {leaf}");
            }
            Deep::CompactSeq => {
                self.out.push('\n');
                self.indent(indent + 2);
                let _ = writeln!(self.out, "{}{leaf}", "- ".repeat(n));
            }
            Deep::FlowSeq => {
                let _ = writeln!(self.out, " {}{leaf}{}", "[".repeat(n), "]".repeat(n));
            }
            Deep::FlowMap => {
                let _ = writeln!(self.out, " {}{leaf}{}", "{a: ".repeat(n), "}".repeat(n));
            }
        }
    }
}

fuzz_target!(|doc: Doc| {
    let mut r = Render::default();
    if doc.start_marker {
        r.out.push_str("---\n");
    }
    // The root mapping is level 1.
    if !doc.sections.is_empty() {
        r.mapping(&doc.sections, 0, 1);
    }
    if let Some(tail) = &doc.tail {
        r.out.push_str(tail);
    }
    if doc.second_document {
        r.out.push_str("\n---\nstate_dir: /tmp\n");
    }
    let accepted = pilot_agent_fuzz::check_config(&r.out).is_some();
    // One level of slack: the tail (arbitrary text) may open or close a level itself.
    if r.depth > MAX_DEPTH + 1 && doc.tail.is_none() {
        assert!(
            !accepted,
            "a document {} levels deep was accepted (bound {MAX_DEPTH})",
            r.depth
        );
    }
});
