//! The walker that checks a YAML tree against the configuration schema.
//!
//! serde stops at the first error; operators fixing a configuration over SSH want every
//! problem at once, each with its line and column. So the YAML is loaded with positions
//! (saphyr's `MarkedYaml`) and walked section by section: every reader records a
//! [`Diagnostic`] and returns `None` on a bad value, and the caller falls back to the default
//! so that the walk goes on and finds the next problem. A configuration is accepted only when
//! the walk recorded nothing.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use saphyr::{MarkedYaml, Marker, Scalar, YamlData};

/// One problem in a configuration file, with its 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.col, self.message)
    }
}

/// A node of the loaded YAML document.
pub type Node<'a> = MarkedYaml<'a>;

/// Collects diagnostics during one walk.
#[derive(Debug, Default)]
pub struct Walker {
    pub diagnostics: Vec<Diagnostic>,
}

/// The keys of one mapping, handed out one by one; unknown keys were reported on creation.
pub struct Fields<'n, 'a> {
    path: String,
    entries: Vec<(String, &'n Node<'a>)>,
}

impl Walker {
    /// Records a problem at `marker` (saphyr columns are 0-based; ours are 1-based as in
    /// editors and compilers).
    pub fn error_at(&mut self, marker: &Marker, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            line: marker.line(),
            col: marker.col() + 1,
            message: message.into(),
        });
    }

    pub fn error(&mut self, node: &Node<'_>, message: impl Into<String>) {
        self.error_at(&node.span.start, message);
    }

    /// Opens a mapping whose keys must all be in `allowed`. A null node (a section written
    /// with no content) is an empty mapping. Unknown keys are reported here, with a
    /// suggestion when one of the allowed keys is close.
    pub fn mapping<'n, 'a>(
        &mut self,
        node: &'n Node<'a>,
        path: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n, 'a>> {
        let map = match &node.data {
            YamlData::Mapping(map) => map,
            YamlData::Value(Scalar::Null) => {
                return Some(Fields {
                    path: path.to_string(),
                    entries: Vec::new(),
                });
            }
            _ => {
                let what = if path.is_empty() {
                    "the configuration".to_string()
                } else {
                    path.to_string()
                };
                self.error(
                    node,
                    format!("{what}: expected a mapping, got {}", describe(node)),
                );
                return None;
            }
        };
        let mut entries = Vec::new();
        for (key, value) in map {
            let YamlData::Value(Scalar::String(name)) = &key.data else {
                self.error(
                    key,
                    format!(
                        "{}: keys must be strings, got {}",
                        display_path(path),
                        describe(key)
                    ),
                );
                continue;
            };
            if !allowed.contains(&name.as_ref()) {
                let mut message = if path.is_empty() {
                    format!("unknown key `{name}`")
                } else {
                    format!("unknown key `{name}` in `{path}`")
                };
                match closest(name, allowed) {
                    Some(near) => message.push_str(&format!(" (did you mean `{near}`?)")),
                    None => {
                        message.push_str(&format!(" (expected one of: {})", allowed.join(", ")))
                    }
                }
                self.error(key, message);
                continue;
            }
            entries.push((name.to_string(), value));
        }
        Some(Fields {
            path: path.to_string(),
            entries,
        })
    }
}

impl<'n, 'a> Fields<'n, 'a> {
    /// The value of `key`, if present and not null (null means "use the default").
    pub fn get(&self, key: &str) -> Option<&'n Node<'a>> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .filter(|v| !matches!(v.data, YamlData::Value(Scalar::Null)))
    }

    /// The dotted path of `key`, for messages.
    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn string(&self, w: &mut Walker, key: &str) -> Option<String> {
        self.get(key).and_then(|n| string(w, n, &self.path_of(key)))
    }

    pub fn bool(&self, w: &mut Walker, key: &str) -> Option<bool> {
        let node = self.get(key)?;
        match &node.data {
            YamlData::Value(Scalar::Boolean(b)) => Some(*b),
            _ => {
                w.error(
                    node,
                    format!(
                        "{}: expected true or false, got {}",
                        self.path_of(key),
                        describe(node)
                    ),
                );
                None
            }
        }
    }

    /// An integer within `min..=max`.
    pub fn integer(&self, w: &mut Walker, key: &str, min: i64, max: i64) -> Option<i64> {
        self.get(key)
            .and_then(|n| integer(w, n, &self.path_of(key), min, max))
    }

    pub fn port(&self, w: &mut Walker, key: &str) -> Option<u16> {
        self.get(key).and_then(|n| port(w, n, &self.path_of(key)))
    }

    /// An absolute path.
    pub fn path(&self, w: &mut Walker, key: &str) -> Option<PathBuf> {
        let node = self.get(key)?;
        let path = self.path_of(key);
        let s = string(w, node, &path)?;
        if !s.starts_with('/') {
            w.error(
                node,
                format!("{path}: expected an absolute path, got \"{s}\""),
            );
            return None;
        }
        Some(PathBuf::from(s))
    }

    /// One of `choices`.
    pub fn choice(&self, w: &mut Walker, key: &str, choices: &[&str]) -> Option<String> {
        let node = self.get(key)?;
        let path = self.path_of(key);
        let s = string(w, node, &path)?;
        if choices.contains(&s.as_str()) {
            Some(s)
        } else {
            w.error(
                node,
                format!(
                    "{path}: expected one of {}, got \"{s}\"",
                    choices.join(", ")
                ),
            );
            None
        }
    }

    /// `ADDRESS:PORT` with a literal IP address (`0.0.0.0:2376`, `[::]:2376`).
    pub fn socket_addr(&self, w: &mut Walker, key: &str) -> Option<SocketAddr> {
        let node = self.get(key)?;
        let path = self.path_of(key);
        let s = string(w, node, &path)?;
        match s.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Some(addr),
            _ => {
                w.error(
                    node,
                    format!(
                        "{path}: expected ADDRESS:PORT with an IP address and a port 1-65535 \
                         (e.g. 0.0.0.0:2376), got \"{s}\""
                    ),
                );
                None
            }
        }
    }

    /// A list whose items are read by `item`; bad items are reported and dropped.
    pub fn list<T>(
        &self,
        w: &mut Walker,
        key: &str,
        mut item: impl FnMut(&mut Walker, &Node<'a>, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let node = self.get(key)?;
        let path = self.path_of(key);
        let YamlData::Sequence(items) = &node.data else {
            w.error(
                node,
                format!("{path}: expected a list, got {}", describe(node)),
            );
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, n) in items.iter().enumerate() {
            if let Some(v) = item(w, n, &format!("{path}[{i}]")) {
                out.push(v);
            }
        }
        Some(out)
    }
}

/// A string scalar. Numbers and booleans are not silently turned into strings: `hostname: 1`
/// is more likely a mistake than a name.
pub fn string(w: &mut Walker, node: &Node<'_>, path: &str) -> Option<String> {
    match &node.data {
        YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
        _ => {
            w.error(
                node,
                format!("{path}: expected a string, got {}", describe(node)),
            );
            None
        }
    }
}

/// A non-empty string.
pub fn non_empty_string(w: &mut Walker, node: &Node<'_>, path: &str) -> Option<String> {
    let s = string(w, node, path)?;
    if s.is_empty() {
        w.error(node, format!("{path}: must not be empty"));
        return None;
    }
    Some(s)
}

pub fn integer(w: &mut Walker, node: &Node<'_>, path: &str, min: i64, max: i64) -> Option<i64> {
    match &node.data {
        YamlData::Value(Scalar::Integer(i)) if (min..=max).contains(i) => Some(*i),
        YamlData::Value(Scalar::Integer(i)) => {
            w.error(
                node,
                format!("{path}: must be between {min} and {max}, got {i}"),
            );
            None
        }
        _ => {
            w.error(
                node,
                format!("{path}: expected an integer, got {}", describe(node)),
            );
            None
        }
    }
}

pub fn port(w: &mut Walker, node: &Node<'_>, path: &str) -> Option<u16> {
    match &node.data {
        YamlData::Value(Scalar::Integer(i)) => match u16::try_from(*i) {
            Ok(p) if p != 0 => Some(p),
            _ => {
                w.error(
                    node,
                    format!("{path}: a port must be between 1 and 65535, got {i}"),
                );
                None
            }
        },
        _ => {
            w.error(
                node,
                format!("{path}: expected a port number, got {}", describe(node)),
            );
            None
        }
    }
}

/// A network in CIDR notation, or a single address (taken as /32 or /128). Host bits set
/// after the prefix (`10.0.0.1/8`) are an error: in a firewall rule that is usually a typo.
pub fn cidr(w: &mut Walker, node: &Node<'_>, path: &str) -> Option<IpNet> {
    let s = string(w, node, path)?;
    match pilot_values::parse_cidr(&s) {
        Ok(net) => Some(net),
        Err(why) => {
            w.error(node, format!("{path}: {why}"));
            None
        }
    }
}

/// A DNS name or an IP address, as it can appear in a certificate's subject alternative names.
pub fn san_name(w: &mut Walker, node: &Node<'_>, path: &str) -> Option<String> {
    let s = string(w, node, path)?;
    match pilot_values::check_host(&s) {
        Ok(()) => Some(s),
        Err(why) => {
            w.error(node, format!("{path}: {why}"));
            None
        }
    }
}

pub use pilot_values::is_dns_name;

/// How a node reads in a message ("a string \"x\"", "a list", ...).
pub fn describe(node: &Node<'_>) -> String {
    match &node.data {
        YamlData::Value(Scalar::Null) => "null".into(),
        YamlData::Value(Scalar::Boolean(b)) => format!("the boolean {b}"),
        YamlData::Value(Scalar::Integer(i)) => format!("the integer {i}"),
        YamlData::Value(Scalar::FloatingPoint(f)) => format!("the number {f}"),
        YamlData::Value(Scalar::String(s)) => format!("the string \"{s}\""),
        YamlData::Sequence(_) => "a list".into(),
        YamlData::Mapping(_) => "a mapping".into(),
        YamlData::Tagged(tag, _) => format!("a value tagged {tag}"),
        YamlData::Alias(_) => "an alias".into(),
        YamlData::Representation(s, _, _) => format!("\"{s}\""),
        YamlData::BadValue => "a value that does not match its tag".into(),
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "configuration"
    } else {
        path
    }
}

/// The allowed key nearest to a misspelt one, if it is near enough to be a likely typo.
fn closest<'k>(name: &str, allowed: &[&'k str]) -> Option<&'k str> {
    allowed
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_finds_typos() {
        assert_eq!(edit_distance("tsl_listen", "tls_listen"), 2);
        assert_eq!(
            closest("tsl_listen", &["socket", "tls_listen"]),
            Some("tls_listen")
        );
        assert_eq!(closest("zzz", &["socket", "tls_listen"]), None);
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_name("pilot.example.com"));
        assert!(is_dns_name("localhost"));
        assert!(is_dns_name("a-b.c"));
        assert!(!is_dns_name("-a.b"));
        assert!(!is_dns_name("a..b"));
        assert!(!is_dns_name("under_score.example"));
        assert!(!is_dns_name(""));
    }
}
