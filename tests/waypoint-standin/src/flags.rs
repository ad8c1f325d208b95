//! Go-style flag parsing, as Waypoint's CLI does it: one Go `flag.FlagSet` per command (the
//! global set, optionally the connection set, then the command's own set), `ContinueOnError`,
//! output discarded, so every error is the Go standard library's text:
//!
//! - `flag provided but not defined: -NAME`
//! - `flag needs an argument: -NAME`
//! - `invalid boolean value "X" for -NAME: strconv.ParseBool: parsing "X": invalid syntax`
//! - `invalid value "X" for flag -NAME: ERROR` (durations, integers, `k=v` maps)
//! - `bad flag syntax: X`
//!
//! Go's rules: `-flag=value`, `-flag value`, `--flag`; a boolean flag never takes the next
//! argument (`-flag`, `-flag=false`; `-flag false` leaves `false` as a positional); `--` ends
//! the flags; parsing stops at the first positional (a lone `-` is one). Waypoint then refuses
//! a known flag name found among the positionals ([`check_flags_after_args`]).

use std::collections::BTreeMap;
use std::time::Duration;

/// What a flag holds, with its default.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A Go bool flag (`IsBoolFlag`): `-name` or `-name=BOOL`.
    Bool(bool),
    /// A string.
    Str(&'static str),
    /// A `time.Duration`, with Waypoint's rule that a number without unit means seconds.
    Duration(Duration),
    /// An `int`, parsed as `strconv.ParseInt(s, 0, 64)`.
    Int(i64),
    /// A repeatable `k=v` map.
    Map,
    /// A repeatable string.
    Slice,
}

/// One flag a command accepts.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    /// Other names registered for the same value (`-a` for `-app`).
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    /// Not listed in help (Waypoint's hidden flags).
    pub hidden: bool,
    /// Accepted like Waypoint does, but not acted upon by the stand-in; using it logs a note.
    pub ignored: bool,
    /// An environment variable that supplies the default when set (Waypoint's `EnvVar`).
    pub env: Option<&'static str>,
    pub help: &'static str,
}

impl Spec {
    pub const fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Spec {
            name,
            aliases: &[],
            kind,
            hidden: false,
            ignored: false,
            env: None,
            help,
        }
    }
    pub const fn boolean(name: &'static str, default: bool, help: &'static str) -> Self {
        Spec::new(name, Kind::Bool(default), help)
    }
    pub const fn string(name: &'static str, default: &'static str, help: &'static str) -> Self {
        Spec::new(name, Kind::Str(default), help)
    }
    pub const fn aliases(mut self, aliases: &'static [&'static str]) -> Self {
        self.aliases = aliases;
        self
    }
    pub const fn hidden(mut self) -> Self {
        self.hidden = true;
        self
    }
    /// Marks a real Waypoint flag the stand-in accepts without modelling it.
    pub const fn ignored(mut self) -> Self {
        self.ignored = true;
        self
    }
    pub const fn env(mut self, var: &'static str) -> Self {
        self.env = Some(var);
        self
    }
    fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.contains(&name)
    }
}

/// A parsed flag value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Bool(bool),
    Str(String),
    Duration(Duration),
    Int(i64),
    Map(BTreeMap<String, String>),
    Slice(Vec<String>),
}

/// The parsed command line of one command.
#[derive(Debug, Default, Clone)]
pub struct Parsed {
    values: BTreeMap<&'static str, Value>,
    defaults: BTreeMap<&'static str, Value>,
    /// Duration flags given a negative value (Go allows them; Waypoint treats them as none).
    negative: Vec<String>,
    /// Names of given flags that the stand-in does not model.
    pub ignored: Vec<&'static str>,
    /// Arguments after the flags.
    pub positional: Vec<String>,
}

impl Parsed {
    fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name).or_else(|| self.defaults.get(name))
    }

    /// Whether the flag was given on the command line.
    pub fn is_set(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// A bool flag's value (given, else its default; false for unknown names).
    pub fn bool(&self, name: &str) -> bool {
        matches!(self.get(name), Some(Value::Bool(true)))
    }

    /// A string flag's value (given, else its default; empty for unknown names).
    pub fn str(&self, name: &str) -> &str {
        match self.get(name) {
            Some(Value::Str(s)) => s,
            _ => "",
        }
    }

    /// A duration flag's value.
    pub fn duration(&self, name: &str) -> Duration {
        match self.get(name) {
            Some(Value::Duration(d)) => *d,
            _ => Duration::ZERO,
        }
    }

    /// A negative duration given on the command line (`-expires-in=-5m`), which Go allows.
    pub fn duration_is_negative(&self, name: &str) -> bool {
        self.negative.iter().any(|n| n == name)
    }

    /// An int flag's value.
    pub fn int(&self, name: &str) -> i64 {
        match self.get(name) {
            Some(Value::Int(i)) => *i,
            _ => 0,
        }
    }

    /// A map flag's value.
    pub fn map(&self, name: &str) -> BTreeMap<String, String> {
        match self.get(name) {
            Some(Value::Map(m)) => m.clone(),
            _ => BTreeMap::new(),
        }
    }
}

/// Go's `strconv.Quote`, as `%q` prints strings in flag errors.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `strconv.ParseBool`; the error is Go's text.
pub fn go_parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!(
            "strconv.ParseBool: parsing {}: invalid syntax",
            go_quote(text)
        )),
    }
}

/// The accepted spellings of [`go_parse_bool`], for callers that only need yes or no.
pub fn parse_bool(text: &str) -> Option<bool> {
    go_parse_bool(text).ok()
}

/// Go's `strconv.ParseInt(s, 0, 64)`: sign, `0x`/`0o`/`0b`/leading-`0` bases, underscores
/// between digits when a base prefix is used.
pub fn go_parse_int(text: &str) -> Result<i64, String> {
    let syntax = || {
        format!(
            "strconv.ParseInt: parsing {}: invalid syntax",
            go_quote(text)
        )
    };
    let range = || {
        format!(
            "strconv.ParseInt: parsing {}: value out of range",
            go_quote(text)
        )
    };
    let (neg, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if body.is_empty() {
        return Err(syntax());
    }
    let lower = body.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(rest) = lower.strip_prefix("0x") {
        (16, rest.to_string(), true)
    } else if let Some(rest) = lower.strip_prefix("0o") {
        (8, rest.to_string(), true)
    } else if let Some(rest) = lower.strip_prefix("0b") {
        (2, rest.to_string(), true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string(), true)
    } else {
        (10, lower.clone(), false)
    };
    let digits = if prefixed {
        if digits.starts_with('_') && radix != 8 {
            // "0x_1" is allowed by Go; a trailing or doubled underscore is not.
        }
        if digits.ends_with('_') || digits.contains("__") {
            return Err(syntax());
        }
        digits.replace('_', "")
    } else {
        if digits.contains('_') {
            return Err(syntax());
        }
        digits
    };
    if digits.is_empty() {
        return Err(syntax());
    }
    let mut value: u128 = 0;
    for c in digits.chars() {
        let d = c.to_digit(radix).ok_or_else(syntax)?;
        value = value * u128::from(radix) + u128::from(d);
        if value > u128::from(u64::MAX) {
            return Err(range());
        }
    }
    if neg {
        if value > (i64::MAX as u128) + 1 {
            return Err(range());
        }
        Ok((value as i128).wrapping_neg() as i64)
    } else if value > i64::MAX as u128 {
        Err(range())
    } else {
        Ok(value as i64)
    }
}

/// A parsed Go duration: its magnitude and whether it was negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration {
    pub magnitude: Duration,
    pub negative: bool,
}

/// Go's `time.ParseDuration`; errors are Go's texts.
pub fn go_parse_duration(orig: &str) -> Result<GoDuration, String> {
    let invalid = || format!("time: invalid duration {}", go_quote(orig));
    let mut s = orig;
    let mut negative = false;
    if s.starts_with('-') || s.starts_with('+') {
        negative = s.starts_with('-');
        s = &s[1..];
    }
    if s == "0" {
        return Ok(GoDuration {
            magnitude: Duration::ZERO,
            negative: false,
        });
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let b = s.as_bytes()[0];
        if !(b == b'.' || b.is_ascii_digit()) {
            return Err(invalid());
        }
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(invalid());
            }
        } else if int_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(s.len(), |(i, _)| i);
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        if unit.is_empty() {
            return Err(format!("time: missing unit in duration {}", go_quote(orig)));
        }
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            _ => {
                return Err(format!(
                    "time: unknown unit {} in duration {}",
                    go_quote(unit),
                    go_quote(orig)
                ));
            }
        };
        let int_value: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut part = int_value.checked_mul(nanos_per).ok_or_else(invalid)?;
        if !frac_part.is_empty() {
            let mut scale: u128 = 1;
            let mut frac: u128 = 0;
            for d in frac_part.bytes().take(30) {
                frac = frac * 10 + u128::from(d - b'0');
                scale *= 10;
            }
            part += frac * nanos_per / scale;
        }
        total = total.checked_add(part).ok_or_else(invalid)?;
        if total > i64::MAX as u128 {
            return Err(invalid());
        }
    }
    Ok(GoDuration {
        magnitude: Duration::from_nanos(total as u64),
        negative,
    })
}

/// Waypoint's duration flags: a value without an `s`, `m` or `h` suffix gets `s` appended
/// before Go parses it (so `5` is five seconds and `5d` is the unknown unit `ds`).
pub fn waypoint_duration(text: &str) -> Result<GoDuration, String> {
    if text.ends_with('s') || text.ends_with('m') || text.ends_with('h') {
        go_parse_duration(text)
    } else {
        go_parse_duration(&format!("{text}s"))
    }
}

/// Why parsing stopped without a result: the Go error text.
pub type FlagError = String;

/// Parses `args` (the arguments after the command words) against `specs` (env looks up a
/// variable, for flags with an environment default).
pub fn parse_with_env(
    args: &[String],
    specs: &[Spec],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Parsed, FlagError> {
    let mut parsed = Parsed::default();
    for spec in specs {
        let default = match spec.kind {
            Kind::Bool(b) => Value::Bool(b),
            Kind::Str(s) => Value::Str(spec.env.and_then(env).unwrap_or_else(|| s.to_string())),
            Kind::Duration(d) => Value::Duration(d),
            Kind::Int(i) => Value::Int(i),
            Kind::Map => Value::Map(BTreeMap::new()),
            Kind::Slice => Value::Slice(Vec::new()),
        };
        parsed.defaults.insert(spec.name, default);
    }
    let mut i = 0;
    while i < args.len() {
        let s = args[i].as_str();
        if s.len() < 2 || !s.starts_with('-') {
            break;
        }
        let mut minuses = 1;
        if s.as_bytes()[1] == b'-' {
            minuses = 2;
            if s.len() == 2 {
                i += 1;
                break;
            }
        }
        let name_part = &s[minuses..];
        if name_part.is_empty() || name_part.starts_with('-') || name_part.starts_with('=') {
            return Err(format!("bad flag syntax: {s}"));
        }
        i += 1;
        let (name, inline) = match name_part[1..].find('=') {
            Some(idx) => (&name_part[..idx + 1], Some(&name_part[idx + 2..])),
            None => (name_part, None),
        };
        let Some(spec) = specs.iter().find(|sp| sp.answers_to(name)) else {
            return Err(format!("flag provided but not defined: -{name}"));
        };
        let value = match spec.kind {
            Kind::Bool(_) => match inline {
                None => Value::Bool(true),
                Some(text) => Value::Bool(go_parse_bool(text).map_err(|e| {
                    format!("invalid boolean value {} for -{name}: {e}", go_quote(text))
                })?),
            },
            _ => {
                let text = match inline {
                    Some(t) => t.to_string(),
                    None => match args.get(i) {
                        Some(next) => {
                            i += 1;
                            next.clone()
                        }
                        None => return Err(format!("flag needs an argument: -{name}")),
                    },
                };
                let invalid =
                    |e: String| format!("invalid value {} for flag -{name}: {e}", go_quote(&text));
                match spec.kind {
                    Kind::Str(_) => Value::Str(text.clone()),
                    Kind::Duration(_) => {
                        let d = waypoint_duration(&text).map_err(invalid)?;
                        if d.negative {
                            parsed.negative.push(spec.name.to_string());
                        } else {
                            parsed.negative.retain(|n| n != spec.name);
                        }
                        Value::Duration(d.magnitude)
                    }
                    Kind::Int(_) => Value::Int(go_parse_int(&text).map_err(invalid)?),
                    Kind::Map => {
                        let Some((k, v)) = text.split_once('=') else {
                            return Err(invalid(format!(
                                "missing = in KV pair: {}",
                                go_quote(&text)
                            )));
                        };
                        let mut map = match parsed.values.get(spec.name) {
                            Some(Value::Map(m)) => m.clone(),
                            _ => BTreeMap::new(),
                        };
                        map.insert(k.to_string(), v.to_string());
                        Value::Map(map)
                    }
                    Kind::Slice => {
                        let mut list = match parsed.values.get(spec.name) {
                            Some(Value::Slice(l)) => l.clone(),
                            _ => Vec::new(),
                        };
                        list.push(text.clone());
                        Value::Slice(list)
                    }
                    Kind::Bool(_) => unreachable!("handled above"),
                }
            }
        };
        parsed.values.insert(spec.name, value);
        if spec.ignored && !parsed.ignored.contains(&spec.name) {
            parsed.ignored.push(spec.name);
        }
    }
    parsed.positional = args[i..].to_vec();
    Ok(parsed)
}

/// [`parse_with_env`] with the process environment.
pub fn parse(args: &[String], specs: &[Spec]) -> Result<Parsed, FlagError> {
    parse_with_env(args, specs, &|k| std::env::var(k).ok())
}

/// Waypoint's `checkFlagsAfterArgs`: a positional (before any `--`) that names a flag of the
/// command (its canonical name, not an alias) is refused with this multi-line error.
pub fn check_flags_after_args(positional: &[String], specs: &[Spec]) -> Result<(), FlagError> {
    let mut named = Vec::new();
    for v in positional {
        if v == "--" {
            break;
        }
        if v.len() < 2 || !v.starts_with('-') {
            continue;
        }
        let mut v = v.as_str();
        if v.as_bytes()[1] == b'-' {
            v = &v[1..];
        }
        if v.as_bytes().get(1) == Some(&b'-') {
            continue;
        }
        let v = v.split_once('=').map_or(v, |(n, _)| n);
        named.push(v[1..].to_string());
    }
    if specs.iter().any(|s| named.iter().any(|n| n == s.name)) {
        return Err(FLAGS_AFTER_ARGS.to_string());
    }
    Ok(())
}

/// The gist of Waypoint's error for flags after positional arguments (multi-line, like it).
pub const FLAGS_AFTER_ARGS: &str = "\
Flags must be specified before positional arguments in the CLI command.
For example \"waypoint up -example project\" not \"waypoint up project -example\".
Please reorder your arguments and try again.";

/// Renders the flag list for a command's help text (hidden flags left out).
pub fn help(specs: &[Spec]) -> String {
    let mut out = String::new();
    for spec in specs.iter().filter(|s| !s.hidden) {
        let shape = match spec.kind {
            Kind::Bool(_) => format!("-{}", spec.name),
            Kind::Str(_) => format!("-{}=<string>", spec.name),
            Kind::Duration(_) => format!("-{}=<duration>", spec.name),
            Kind::Int(_) => format!("-{}=<int>", spec.name),
            Kind::Map => format!("-{}=<key=value>", spec.name),
            Kind::Slice => format!("-{}=<string>", spec.name),
        };
        let default = match spec.kind {
            Kind::Bool(true) => " (default: true)".to_string(),
            Kind::Str(s) if !s.is_empty() => format!(" (default: {s})"),
            Kind::Duration(d) if !d.is_zero() => format!(" (default: {}s)", d.as_secs()),
            _ => String::new(),
        };
        let aliases: String = spec.aliases.iter().map(|a| format!(", -{a}")).collect();
        out.push_str(&format!(
            "  {shape}{aliases}\n      {}{default}\n",
            spec.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[Spec] = &[
        Spec::boolean("accept-tos", false, ""),
        Spec::string("db", "", ""),
        Spec::string("listen-grpc", "127.0.0.1:9701", ""),
        Spec::boolean("server-tls", true, ""),
        Spec::string("app", "", "").aliases(&["a"]),
        Spec::new(
            "expires-in",
            Kind::Duration(Duration::from_secs(720 * 3600)),
            "",
        ),
        Spec::new("concurrency", Kind::Int(0), ""),
        Spec::new("label", Kind::Map, ""),
        Spec::boolean("url-enabled", true, "").ignored(),
        Spec::string("cookie", "", "").env("WAYPOINT_SERVER_COOKIE"),
    ];

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn p(list: &[&str]) -> Result<Parsed, FlagError> {
        parse_with_env(&args(list), SPECS, &|_| None)
    }

    #[test]
    fn accepts_all_go_spellings_and_defaults() {
        let v = p(&["-accept-tos", "--db", "/data/data.db", "-a=web"]).unwrap();
        assert!(v.bool("accept-tos"));
        assert_eq!(v.str("db"), "/data/data.db");
        assert_eq!(v.str("listen-grpc"), "127.0.0.1:9701", "the default");
        assert!(v.bool("server-tls"), "bool default true");
        assert_eq!(v.str("app"), "web", "through the alias");
        assert_eq!(v.duration("expires-in"), Duration::from_secs(720 * 3600));
        let v = p(&[
            "-server-tls=false",
            "-expires-in=90",
            "-label",
            "a=b",
            "-label=c=d=e",
        ])
        .unwrap();
        assert!(!v.bool("server-tls"));
        assert_eq!(
            v.duration("expires-in"),
            Duration::from_secs(90),
            "no unit: seconds"
        );
        let m = v.map("label");
        assert_eq!(m["a"], "b");
        assert_eq!(m["c"], "d=e");
        let v = parse_with_env(&args(&[]), SPECS, &|k| {
            (k == "WAYPOINT_SERVER_COOKIE").then(|| "c00kie".to_string())
        })
        .unwrap();
        assert_eq!(v.str("cookie"), "c00kie");
    }

    #[test]
    fn bool_flags_never_take_the_next_argument() {
        let v = p(&["-accept-tos", "false"]).unwrap();
        assert!(v.bool("accept-tos"));
        assert_eq!(v.positional, args(&["false"]));
    }

    #[test]
    fn stops_at_first_positional_lone_dash_and_double_dash() {
        let v = p(&["-db", "x", "pos", "-accept-tos"]).unwrap();
        assert_eq!(v.positional, args(&["pos", "-accept-tos"]));
        assert!(!v.bool("accept-tos"));
        let v = p(&["--", "-db"]).unwrap();
        assert_eq!(v.positional, args(&["-db"]));
        let v = p(&["-", "x"]).unwrap();
        assert_eq!(v.positional, args(&["-", "x"]));
        // A value flag takes the next argument even if it looks like a flag.
        let v = p(&["-db", "-accept-tos"]).unwrap();
        assert_eq!(v.str("db"), "-accept-tos");
    }

    #[test]
    fn go_error_texts() {
        assert_eq!(
            p(&["-nope"]).unwrap_err(),
            "flag provided but not defined: -nope"
        );
        assert_eq!(
            p(&["--nope=1"]).unwrap_err(),
            "flag provided but not defined: -nope"
        );
        assert_eq!(p(&["-db"]).unwrap_err(), "flag needs an argument: -db");
        assert_eq!(
            p(&["-accept-tos=maybe"]).unwrap_err(),
            "invalid boolean value \"maybe\" for -accept-tos: strconv.ParseBool: parsing \"maybe\": invalid syntax"
        );
        assert_eq!(p(&["---db"]).unwrap_err(), "bad flag syntax: ---db");
        assert_eq!(p(&["-=x"]).unwrap_err(), "bad flag syntax: -=x");
        assert_eq!(
            p(&["-expires-in=5d"]).unwrap_err(),
            "invalid value \"5d\" for flag -expires-in: time: unknown unit \"ds\" in duration \"5ds\""
        );
        assert_eq!(
            p(&["-expires-in=abc"]).unwrap_err(),
            "invalid value \"abc\" for flag -expires-in: time: invalid duration \"abcs\""
        );
        assert_eq!(
            p(&["-concurrency=x"]).unwrap_err(),
            "invalid value \"x\" for flag -concurrency: strconv.ParseInt: parsing \"x\": invalid syntax"
        );
        assert_eq!(
            p(&["-label=nokey"]).unwrap_err(),
            "invalid value \"nokey\" for flag -label: missing = in KV pair: \"nokey\""
        );
        // Help flags are not defined flags here: the dispatcher handles them before parsing.
        assert_eq!(p(&["-h"]).unwrap_err(), "flag provided but not defined: -h");
    }

    #[test]
    fn flags_after_positionals_are_refused_when_known() {
        assert!(check_flags_after_args(&args(&["id", "-db=x"]), SPECS).is_err());
        assert!(check_flags_after_args(&args(&["id", "--accept-tos"]), SPECS).is_err());
        assert!(check_flags_after_args(&args(&["id", "-unknown"]), SPECS).is_ok());
        assert!(
            check_flags_after_args(&args(&["id", "-a"]), SPECS).is_ok(),
            "aliases are not checked"
        );
        assert!(check_flags_after_args(&args(&["id", "--", "-db"]), SPECS).is_ok());
    }

    #[test]
    fn go_durations_ints_and_quotes() {
        let d = |s| go_parse_duration(s).map(|d| d.magnitude);
        assert_eq!(d("720h").unwrap(), Duration::from_secs(720 * 3600));
        assert_eq!(d("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(d("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(d("0").unwrap(), Duration::ZERO);
        assert_eq!(d("10ms").unwrap(), Duration::from_millis(10));
        assert!(go_parse_duration("-5m").unwrap().negative);
        assert_eq!(d("5").unwrap_err(), "time: missing unit in duration \"5\"");
        assert_eq!(d("").unwrap_err(), "time: invalid duration \"\"");
        assert_eq!(waypoint_duration("0").unwrap().magnitude, Duration::ZERO);
        assert_eq!(go_parse_int("0x10").unwrap(), 16);
        assert_eq!(go_parse_int("010").unwrap(), 8);
        assert_eq!(go_parse_int("-7").unwrap(), -7);
        assert!(
            go_parse_int("99999999999999999999")
                .unwrap_err()
                .contains("out of range")
        );
        assert_eq!(go_quote("a\"b\\\n"), "\"a\\\"b\\\\\\n\"");
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        assert_eq!(parse_bool("yes"), None);
    }
}
