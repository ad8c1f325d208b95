//! Go-style flag parsing, as Waypoint's CLI (Go's `flag` package) does it: `-flag=value`,
//! `-flag value`, `--flag`, boolean flags that never take the next argument (`-flag` or
//! `-flag=false`), `--` ends the flags, and parsing stops at the first non-flag argument.

use std::collections::HashMap;

/// Whether a flag is a switch or takes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `-name` or `-name=BOOL`; never consumes the next argument.
    Bool,
    /// `-name=VALUE` or `-name VALUE`.
    Value,
}

/// One flag a command accepts.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub kind: Kind,
    /// Real Waypoint flags the stand-in accepts but does not model; using one logs a note.
    pub ignored: bool,
    pub help: &'static str,
}

impl Spec {
    pub const fn boolean(name: &'static str, help: &'static str) -> Self {
        Spec {
            name,
            kind: Kind::Bool,
            ignored: false,
            help,
        }
    }
    pub const fn value(name: &'static str, help: &'static str) -> Self {
        Spec {
            name,
            kind: Kind::Value,
            ignored: false,
            help,
        }
    }
    /// A flag that real Waypoint has and the stand-in accepts without acting on it.
    pub const fn ignored(name: &'static str, kind: Kind) -> Self {
        Spec {
            name,
            kind,
            ignored: true,
            help: "accepted for compatibility; not modelled by the stand-in",
        }
    }
}

/// Why parsing stopped without a result.
#[derive(Debug, PartialEq, Eq)]
pub enum FlagError {
    /// `-h`, `-help` or `--help` was given.
    Help,
    /// Anything else; the message names the flag.
    Invalid(String),
}

/// The parsed command line of one command.
#[derive(Debug, Default)]
pub struct Parsed {
    values: HashMap<&'static str, String>,
    bools: HashMap<&'static str, bool>,
    /// Names of given flags that the stand-in does not model.
    pub ignored: Vec<&'static str>,
    /// Arguments after the flags.
    pub positional: Vec<String>,
}

impl Parsed {
    /// The value of a value flag, if given (the last one wins, as in Go).
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The value of a boolean flag, if given.
    pub fn bool(&self, name: &str) -> Option<bool> {
        self.bools.get(name).copied()
    }

    /// The value of a boolean flag, or `default` when it was not given.
    pub fn bool_or(&self, name: &str, default: bool) -> bool {
        self.bool(name).unwrap_or(default)
    }
}

/// Parses Go's `strconv.ParseBool` spellings.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Parses `args` (the arguments after the command words) against `specs`.
pub fn parse(args: &[String], specs: &[Spec]) -> Result<Parsed, FlagError> {
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            parsed.positional.extend(args[i + 1..].iter().cloned());
            return Ok(parsed);
        }
        let Some(stripped) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            // Go stops at the first non-flag argument.
            parsed.positional.extend(args[i..].iter().cloned());
            return Ok(parsed);
        };
        if stripped.is_empty() || stripped.starts_with('-') {
            // A lone "-" is an argument; "---x" is a malformed flag.
            if arg == "-" {
                parsed.positional.extend(args[i..].iter().cloned());
                return Ok(parsed);
            }
            return Err(FlagError::Invalid(format!("bad flag syntax: {arg}")));
        }
        let (name, inline) = match stripped.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (stripped, None),
        };
        if matches!(name, "h" | "help") {
            return Err(FlagError::Help);
        }
        let spec = specs
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| FlagError::Invalid(format!("flag provided but not defined: -{name}")))?;
        match spec.kind {
            Kind::Bool => {
                let value = match inline {
                    None => true,
                    Some(text) => parse_bool(text).ok_or_else(|| {
                        FlagError::Invalid(format!("invalid boolean value {text:?} for -{name}"))
                    })?,
                };
                parsed.bools.insert(spec.name, value);
            }
            Kind::Value => {
                let value = match inline {
                    Some(text) => text.to_string(),
                    None => {
                        i += 1;
                        args.get(i).cloned().ok_or_else(|| {
                            FlagError::Invalid(format!("flag needs an argument: -{name}"))
                        })?
                    }
                };
                parsed.values.insert(spec.name, value);
            }
        }
        if spec.ignored && !parsed.ignored.contains(&spec.name) {
            parsed.ignored.push(spec.name);
        }
        i += 1;
    }
    Ok(parsed)
}

/// Renders the flag list for a command's help text.
pub fn help(specs: &[Spec]) -> String {
    let mut out = String::new();
    for spec in specs {
        let shape = match spec.kind {
            Kind::Bool => format!("-{}", spec.name),
            Kind::Value => format!("-{}=VALUE", spec.name),
        };
        out.push_str(&format!("  {shape:<34} {}\n", spec.help));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[Spec] = &[
        Spec::boolean("accept-tos", ""),
        Spec::value("db", ""),
        Spec::value("listen-grpc", ""),
        Spec::boolean("vv", ""),
        Spec::ignored("url-enabled", Kind::Bool),
    ];

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accepts_all_go_spellings() {
        let p = parse(
            &args(&[
                "-accept-tos",
                "--db",
                "/data/data.db",
                "-listen-grpc=0.0.0.0:9701",
                "-vv",
            ]),
            SPECS,
        )
        .unwrap();
        assert_eq!(p.bool("accept-tos"), Some(true));
        assert_eq!(p.value("db"), Some("/data/data.db"));
        assert_eq!(p.value("listen-grpc"), Some("0.0.0.0:9701"));
        assert_eq!(p.bool("vv"), Some(true));
        assert!(p.positional.is_empty());
        let p = parse(&args(&["--db=/x", "--accept-tos=false"]), SPECS).unwrap();
        assert_eq!(p.value("db"), Some("/x"));
        assert_eq!(p.bool("accept-tos"), Some(false));
    }

    #[test]
    fn bool_flags_never_take_the_next_argument() {
        let p = parse(&args(&["-accept-tos", "true"]), SPECS).unwrap();
        assert_eq!(p.bool("accept-tos"), Some(true));
        assert_eq!(p.positional, vec!["true".to_string()]);
    }

    #[test]
    fn stops_at_first_positional_and_at_double_dash() {
        let p = parse(&args(&["-db", "x", "pos", "-accept-tos"]), SPECS).unwrap();
        assert_eq!(p.positional, args(&["pos", "-accept-tos"]));
        assert_eq!(p.bool("accept-tos"), None);
        let p = parse(&args(&["--", "-db"]), SPECS).unwrap();
        assert_eq!(p.positional, args(&["-db"]));
    }

    #[test]
    fn rejects_unknown_flags_missing_values_and_bad_bools() {
        assert_eq!(
            parse(&args(&["-nope"]), SPECS).unwrap_err(),
            FlagError::Invalid("flag provided but not defined: -nope".into())
        );
        assert_eq!(
            parse(&args(&["-db"]), SPECS).unwrap_err(),
            FlagError::Invalid("flag needs an argument: -db".into())
        );
        assert!(matches!(
            parse(&args(&["-accept-tos=maybe"]), SPECS),
            Err(FlagError::Invalid(_))
        ));
        assert!(matches!(
            parse(&args(&["---db"]), SPECS),
            Err(FlagError::Invalid(_))
        ));
    }

    #[test]
    fn help_flags_and_ignored_flags() {
        assert_eq!(parse(&args(&["-h"]), SPECS).unwrap_err(), FlagError::Help);
        assert_eq!(
            parse(&args(&["--help"]), SPECS).unwrap_err(),
            FlagError::Help
        );
        let p = parse(&args(&["-url-enabled=false", "-url-enabled"]), SPECS).unwrap();
        assert_eq!(p.ignored, vec!["url-enabled"]);
        assert_eq!(
            p.bool("url-enabled"),
            Some(true),
            "the last one wins, as in Go"
        );
    }

    #[test]
    fn parses_go_bool_spellings() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        assert_eq!(parse_bool("yes"), None);
    }
}
