//! Redaction of the diagnostics archive: every secret the agent knows, and every text that
//! has the shape of one, is replaced by `[REDACTED:KIND]` before a byte is written.
//!
//! Two sorts of rules find what to hide:
//! - **values** the agent knows ([`Redactor::add_value`]): the Waypoint tokens, the database
//!   and admin passwords, a runner host's endpoint token, the lines of its private keys.
//!   Each is also looked for JSON-escaped and percent-encoded, and across line breaks (a log
//!   that wrapped a token over two lines still shows neither half);
//! - **shapes**: PEM `PRIVATE KEY` blocks (to their END line, or a bounded stretch when it is
//!   missing), the value of `WAYPOINT_SERVER_TOKEN=`, the value after `Bearer `, and any word
//!   whose SHA-256 is one of the endpoint's token hashes ([`Redactor::add_token_hash`]: the
//!   server VM knows its endpoint tokens only by their hashes).
//!
//! All matches are found on the original text first and replaced once: overlapping matches
//! (one secret a substring of another, two that overlap, a shape around a value) become one
//! marker, labelled by the longest match, so no tail of a longer secret is left behind by a
//! shorter one replaced first. The counts are the markers written, per kind.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use sha2::{Digest, Sha256};

/// What a redacted text was. The archive's MANIFEST counts markers by this name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SecretKind {
    /// `STATE_DIR/waypoint/bootstrap-token` (and a runner host's leftover `server-token`).
    BootstrapToken,
    /// `STATE_DIR/waypoint/runner-N-token`.
    RunnerToken,
    /// Any other `STATE_DIR/waypoint/*-token`.
    WaypointToken,
    /// `STATE_DIR/database/password` (and its rotation's `.pending`).
    DatabasePassword,
    /// `database.admin_password` or the content of `database.admin_password_file`.
    AdminPassword,
    /// A bearer token of the endpoint: a runner host's `server.token_file`, or a word whose
    /// SHA-256 is a configured token hash.
    EndpointToken,
    /// A configured endpoint token hash itself (a weak token's hash can be brute-forced).
    EndpointTokenHash,
    /// A PEM private key block, or a line of one of the agent's keys.
    PrivateKey,
    /// The value of `WAYPOINT_SERVER_TOKEN=` (a runner's environment).
    WaypointServerToken,
    /// The value after `Bearer ` (an `Authorization` header).
    BearerToken,
}

impl SecretKind {
    pub const ALL: [SecretKind; 10] = [
        SecretKind::BootstrapToken,
        SecretKind::RunnerToken,
        SecretKind::WaypointToken,
        SecretKind::DatabasePassword,
        SecretKind::AdminPassword,
        SecretKind::EndpointToken,
        SecretKind::EndpointTokenHash,
        SecretKind::PrivateKey,
        SecretKind::WaypointServerToken,
        SecretKind::BearerToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::BootstrapToken => "bootstrap-token",
            SecretKind::RunnerToken => "runner-token",
            SecretKind::WaypointToken => "waypoint-token",
            SecretKind::DatabasePassword => "database-password",
            SecretKind::AdminPassword => "admin-password",
            SecretKind::EndpointToken => "endpoint-token",
            SecretKind::EndpointTokenHash => "endpoint-token-sha256",
            SecretKind::PrivateKey => "private-key",
            SecretKind::WaypointServerToken => "waypoint-server-token",
            SecretKind::BearerToken => "bearer-token",
        }
    }

    /// The marker that replaces a secret of this kind.
    pub fn marker(self) -> String {
        format!("[REDACTED:{}]", self.as_str())
    }
}

impl fmt::Display for SecretKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many markers of each kind one text (or a whole archive) got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<SecretKind, usize>);

impl Counts {
    pub fn total(&self) -> usize {
        self.0.values().sum()
    }

    pub fn get(&self, kind: SecretKind) -> usize {
        self.0.get(&kind).copied().unwrap_or(0)
    }

    pub fn add(&mut self, other: &Counts) {
        for (k, n) in &other.0 {
            *self.0.entry(*k).or_default() += n;
        }
    }
}

/// A text after redaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted {
    pub text: String,
    pub counts: Counts,
}

/// Longest text a PEM private key block without its END line is taken to run on for (a
/// 4096-bit RSA key in PEM is about 3.3 KiB).
const PEM_WITHOUT_END: usize = 16 * 1024;
/// Word lengths checked against the endpoint token hashes.
const HASHED_WORD_MIN: usize = 16;
const HASHED_WORD_MAX: usize = 512;
/// Shortest value after `Bearer ` that is taken for a token.
const BEARER_MIN: usize = 8;

/// The secrets to hide and the rules that find them; [`Redactor::redact`] applies them.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Distinct values without line breaks, with their kind (the first kind given wins).
    values: Vec<(String, SecretKind)>,
    token_hashes: BTreeSet<[u8; 32]>,
}

// Hand-written: the values are secrets.
impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("values", &self.values.len())
            .field("token_hashes", &self.token_hashes.len())
            .finish()
    }
}

/// One found occurrence, in byte offsets of the original text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Match {
    start: usize,
    end: usize,
    kind: SecretKind,
    /// Found by a known value (not by a shape): preferred as the label at equal length.
    value: bool,
}

impl Match {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

impl Redactor {
    pub fn new() -> Self {
        Redactor::default()
    }

    /// Hides `value` (surrounding whitespace dropped; line breaks inside are ignored, as they
    /// are in the text searched), and its JSON-escaped and percent-encoded forms. An empty
    /// value is ignored.
    pub fn add_value(&mut self, kind: SecretKind, value: &str) {
        let value = value.trim();
        let plain: String = value
            .chars()
            .filter(|c| !matches!(c, '\n' | '\r'))
            .collect();
        if plain.is_empty() {
            return;
        }
        let json = serde_json::to_string(&plain)
            .ok()
            .and_then(|s| Some(s.strip_prefix('"')?.strip_suffix('"')?.to_string()));
        let percent = percent_encode(&plain);
        for v in [Some(plain), json, Some(percent)].into_iter().flatten() {
            if !self.values.iter().any(|(known, _)| *known == v) {
                self.values.push((v, kind));
            }
        }
    }

    /// Hides every word whose SHA-256 is `hash` (as [`SecretKind::EndpointToken`]), and the
    /// hash itself in hex (as [`SecretKind::EndpointTokenHash`]).
    pub fn add_token_hash(&mut self, hash: [u8; 32]) {
        if self.token_hashes.insert(hash) {
            let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
            self.add_value(SecretKind::EndpointTokenHash, &hex);
            self.add_value(SecretKind::EndpointTokenHash, &hex.to_ascii_uppercase());
        }
    }

    /// How many distinct values (with their variants) and hashes are known.
    pub fn known(&self) -> (usize, usize) {
        (self.values.len(), self.token_hashes.len())
    }

    /// `bytes` as text (invalid UTF-8 replaced), redacted.
    pub fn redact_bytes(&self, bytes: &[u8]) -> Redacted {
        self.redact(&String::from_utf8_lossy(bytes))
    }

    /// Replaces every secret in `text` by its marker.
    pub fn redact(&self, text: &str) -> Redacted {
        self.redact_log(text, None)
    }

    /// [`Redactor::redact`] for a log whose lines start with a prefix of their own (a
    /// timestamp, a stream name): `prefix` gives its length in a line. A known value split
    /// over two lines is then found although the second half follows the next line's prefix.
    pub fn redact_log(&self, text: &str, prefix: Option<LinePrefix>) -> Redacted {
        let mut matches = Vec::new();
        if !self.values.is_empty() {
            self.find_values(text, &line_breaks(text), &mut matches);
            if let Some(prefix) = prefix {
                self.find_values(text, &line_breaks_and_prefixes(text, prefix), &mut matches);
            }
        }
        find_pem_keys(text, &mut matches);
        find_after(
            text,
            "WAYPOINT_SERVER_TOKEN",
            SecretKind::WaypointServerToken,
            1,
            &mut matches,
        );
        find_bearer(text, &mut matches);
        if !self.token_hashes.is_empty() {
            self.find_hashed_words(text, &mut matches);
        }
        replace(text, matches)
    }

    /// Known values, also where a line break splits them: they are searched for in the text
    /// with the `removed` stretches (`(start, len)`, ascending, apart) taken out, and each
    /// hit is mapped back to the original offsets.
    fn find_values(&self, text: &str, removed: &[(usize, usize)], out: &mut Vec<Match>) {
        let joined;
        let haystack: &str = if removed.is_empty() {
            text
        } else {
            let mut j = String::with_capacity(text.len());
            let mut at = 0;
            for (start, len) in removed {
                j.push_str(&text[at..*start]);
                at = start + len;
            }
            j.push_str(&text[at..]);
            joined = j;
            &joined
        };
        // Where each removed stretch sat in the joined text (never decreasing), and how many
        // bytes were removed up to and including it: the original offset of joined offset
        // `s` is `s` plus the bytes removed at or before it.
        let mut keys = Vec::with_capacity(removed.len());
        let mut removed_so_far = Vec::with_capacity(removed.len() + 1);
        removed_so_far.push(0usize);
        let mut total = 0;
        for (start, len) in removed {
            keys.push(start - total);
            total += len;
            removed_so_far.push(total);
        }
        let original =
            |s: usize| -> usize { s + removed_so_far[keys.partition_point(|k| *k <= s)] };
        for (value, kind) in &self.values {
            for (s, _) in haystack.match_indices(value.as_str()) {
                let e = s + value.len();
                out.push(Match {
                    start: original(s),
                    end: original(e - 1) + 1,
                    kind: *kind,
                    value: true,
                });
            }
        }
    }

    /// Words (two ways of cutting the text into them: base64url runs, and runs that also take
    /// `+ / = . ~`) whose SHA-256 is an endpoint token's hash.
    fn find_hashed_words(&self, text: &str, out: &mut Vec<Match>) {
        let narrow = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-');
        let wide = |b: u8| narrow(b) || matches!(b, b'+' | b'/' | b'=' | b'.' | b'~');
        for in_word in [&narrow as &dyn Fn(u8) -> bool, &wide] {
            for (start, end) in runs(text.as_bytes(), in_word) {
                let len = end - start;
                if !(HASHED_WORD_MIN..=HASHED_WORD_MAX).contains(&len) {
                    continue;
                }
                let digest: [u8; 32] = Sha256::digest(&text.as_bytes()[start..end]).into();
                if self.token_hashes.contains(&digest) {
                    out.push(Match {
                        start,
                        end,
                        kind: SecretKind::EndpointToken,
                        value: true,
                    });
                }
            }
        }
    }
}

/// Maximal runs of bytes for which `in_word` holds, as `(start, end)`.
fn runs(bytes: &[u8], in_word: &dyn Fn(u8) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, b) in bytes.iter().enumerate() {
        match (in_word(*b), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, bytes.len()));
    }
    out
}

/// The length of a log line's own prefix (timestamp, stream, unit), at a char boundary.
pub type LinePrefix = fn(&str) -> usize;

/// The line breaks of `text` (`\n`, `\r` and runs of them) as `(start, len)`.
fn line_breaks(text: &str) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, b) in text.bytes().enumerate() {
        if matches!(b, b'\n' | b'\r') {
            match out.last_mut() {
                Some((start, len)) if *start + *len == i => *len += 1,
                _ => out.push((i, 1)),
            }
        }
    }
    out
}

/// [`line_breaks`], each with the prefix of the line after it (and the first line's prefix).
fn line_breaks_and_prefixes(text: &str, prefix: LinePrefix) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut line_start = 0;
    let push = |start: usize, len: usize, out: &mut Vec<(usize, usize)>| match out.last_mut() {
        Some((s, l)) if *s + *l == start => *l += len,
        _ if len > 0 => out.push((start, len)),
        _ => {}
    };
    loop {
        let line_end = text[line_start..]
            .find('\n')
            .map_or(text.len(), |i| line_start + i);
        let line = text[line_start..line_end].trim_end_matches('\r');
        let p = floor_char_boundary(line, prefix(line));
        push(line_start, p, &mut out);
        if line_end == text.len() {
            break;
        }
        let cr = line_start + line.len();
        push(cr, line_end + 1 - cr, &mut out);
        line_start = line_end + 1;
    }
    out
}

/// Every byte but `A-Z a-z 0-9 - _ . ~` as `%XX` (RFC 3986 unreserved characters kept).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// PEM blocks whose label ends in `PRIVATE KEY`, from their BEGIN line to their END line, or
/// [`PEM_WITHOUT_END`] bytes (the end of the text at most) when the END line is missing.
fn find_pem_keys(text: &str, out: &mut Vec<Match>) {
    const BEGIN: &str = "-----BEGIN ";
    const END: &str = "-----END ";
    const DASHES: &str = "-----";
    let mut from = 0;
    while let Some(at) = text[from..].find(BEGIN).map(|i| from + i) {
        let label_start = at + BEGIN.len();
        let label_end = text[label_start..]
            .char_indices()
            .take(64)
            .find(|(_, c)| !(c.is_ascii_uppercase() || c.is_ascii_digit() || *c == ' '))
            .map(|(i, _)| label_start + i);
        let is_key = label_end.is_some_and(|e| {
            text[label_start..e].ends_with("PRIVATE KEY") && text[e..].starts_with(DASHES)
        });
        let Some(label_end) = label_end.filter(|_| is_key) else {
            from = label_start;
            continue;
        };
        let body = label_end + DASHES.len();
        let limit = floor_char_boundary(text, body.saturating_add(PEM_WITHOUT_END));
        let end = text[body..limit]
            .find(END)
            .and_then(|i| {
                let end_label = body + i + END.len();
                let close = text[end_label..].find(DASHES)? + end_label;
                (close - end_label <= 64 && text[end_label..close].ends_with("PRIVATE KEY"))
                    .then_some(close + DASHES.len())
            })
            .unwrap_or(limit);
        out.push(Match {
            start: at,
            end,
            kind: SecretKind::PrivateKey,
            value: false,
        });
        from = end.max(label_start);
    }
}

/// The largest char boundary of `text` at or below `i` (the text's end at most).
fn floor_char_boundary(text: &str, i: usize) -> usize {
    let mut i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Whether `b` ends a token value written after a name (`NAME=VALUE`, `"NAME=VALUE"`).
fn ends_value(b: u8) -> bool {
    b.is_ascii_whitespace()
        || matches!(
            b,
            b'"' | b'\'' | b'\\' | b',' | b';' | b'}' | b')' | b']' | b'&' | b'<' | b'>'
        )
}

/// The value after `name` followed by `=` or `:` (spaces and one quote allowed around):
/// `NAME=VALUE`, `NAME: VALUE`, `"NAME": "VALUE"`. At least `min` bytes.
fn find_after(text: &str, name: &str, kind: SecretKind, min: usize, out: &mut Vec<Match>) {
    let bytes = text.as_bytes();
    for (at, _) in text.match_indices(name) {
        let mut i = at + name.len();
        // `"NAME": "VALUE"`: the quote closing the name.
        if bytes.get(i).is_some_and(|b| matches!(b, b'"' | b'\'')) {
            i += 1;
        }
        while bytes.get(i).is_some_and(|b| *b == b' ' || *b == b'\t') {
            i += 1;
        }
        if !bytes.get(i).is_some_and(|b| matches!(b, b'=' | b':')) {
            continue;
        }
        i += 1;
        while bytes.get(i).is_some_and(|b| *b == b' ' || *b == b'\t') {
            i += 1;
        }
        if bytes.get(i).is_some_and(|b| matches!(b, b'"' | b'\'')) {
            i += 1;
        }
        let start = i;
        while bytes.get(i).is_some_and(|b| !ends_value(*b)) {
            i += 1;
        }
        if i - start >= min {
            out.push(Match {
                start,
                end: i,
                kind,
                value: false,
            });
        }
    }
}

/// The token after `Bearer ` (any case), at least [`BEARER_MIN`] bytes of the RFC 6750
/// token alphabet.
fn find_bearer(text: &str, out: &mut Vec<Match>) {
    let bytes = text.as_bytes();
    let lower = text.to_ascii_lowercase();
    for (at, _) in lower.match_indices("bearer") {
        let mut i = at + "bearer".len();
        let spaces = i;
        while bytes.get(i).is_some_and(|b| *b == b' ' || *b == b'\t') {
            i += 1;
        }
        if i == spaces {
            continue;
        }
        let start = i;
        while bytes
            .get(i)
            .is_some_and(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(b))
        {
            i += 1;
        }
        if i - start >= BEARER_MIN {
            out.push(Match {
                start,
                end: i,
                kind: SecretKind::BearerToken,
                value: false,
            });
        }
    }
}

/// Writes `text` with every match replaced: overlapping matches merge into one marker,
/// labelled by the longest of them (a known value before a shape at equal length). The line
/// breaks a replaced stretch held are kept after its marker (but those of a PEM block), so
/// the lines of a log stay where they were.
fn replace(text: &str, mut matches: Vec<Match>) -> Redacted {
    matches.sort_by_key(|m| (m.start, std::cmp::Reverse(m.end)));
    let mut out = String::with_capacity(text.len());
    let mut counts = Counts::default();
    let mut copied = 0;
    let mut i = 0;
    while i < matches.len() {
        let mut region_end = matches[i].end;
        let mut best = matches[i];
        let mut j = i + 1;
        while j < matches.len() && matches[j].start < region_end {
            let m = matches[j];
            region_end = region_end.max(m.end);
            if (m.len(), m.value) > (best.len(), best.value) {
                best = m;
            }
            j += 1;
        }
        let start = matches[i].start;
        out.push_str(&text[copied..start]);
        out.push_str(&best.kind.marker());
        if best.kind != SecretKind::PrivateKey {
            for _ in text[start..region_end].matches('\n') {
                out.push('\n');
            }
        }
        *counts.0.entry(best.kind).or_default() += 1;
        copied = region_end;
        i = j;
    }
    out.push_str(&text[copied..]);
    Redacted { text: out, counts }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "bootstrap-9f3KxQ2vLmP8wZ7rT1yB";
    const RUNNER: &str = "runnertok-Hq4nX8cV2bN6mK0pL5sD";

    fn redactor() -> Redactor {
        let mut r = Redactor::new();
        r.add_value(SecretKind::BootstrapToken, BOOT);
        r.add_value(SecretKind::RunnerToken, &format!("{RUNNER}\n"));
        r
    }

    fn count(r: &Redacted, kind: SecretKind) -> usize {
        r.counts.get(kind)
    }

    #[test]
    fn known_values_are_replaced_and_counted() {
        let r = redactor().redact(&format!("token {BOOT} and {RUNNER}, again {BOOT}.\n"));
        assert_eq!(
            r.text,
            "token [REDACTED:bootstrap-token] and [REDACTED:runner-token], again \
             [REDACTED:bootstrap-token].\n"
        );
        assert_eq!(count(&r, SecretKind::BootstrapToken), 2);
        assert_eq!(count(&r, SecretKind::RunnerToken), 1);
        assert_eq!(r.counts.total(), 3);
    }

    #[test]
    fn a_secret_split_across_lines_is_found_and_the_lines_kept() {
        let (a, b) = BOOT.split_at(11);
        let text = format!("line one {a}\n{b} line two\nthree\r\n");
        let r = redactor().redact(&text);
        assert_eq!(
            r.text,
            "line one [REDACTED:bootstrap-token]\n line two\nthree\r\n"
        );
        assert!(!r.text.contains(a) && !r.text.contains(b), "{}", r.text);
        // Split by CRLF and more than once.
        let (c, rest) = RUNNER.split_at(5);
        let (d, e) = rest.split_at(9);
        let r = redactor().redact(&format!("{c}\r\n{d}\n{e}"));
        assert_eq!(r.text, "[REDACTED:runner-token]\n\n");
        assert_eq!(count(&r, SecretKind::RunnerToken), 1);
    }

    #[test]
    fn overlapping_secrets_leave_nothing_of_either() {
        let mut r = Redactor::new();
        r.add_value(SecretKind::DatabasePassword, "abcdefghij-0123");
        r.add_value(SecretKind::AdminPassword, "0123-klmnopqrst");
        // The two overlap on "0123".
        let out = r.redact("x abcdefghij-0123-klmnopqrst y");
        assert_eq!(out.text, "x [REDACTED:database-password] y");
        assert_eq!(out.counts.total(), 1, "one marker for the merged stretch");
        for piece in ["abcdefghij", "klmnopqrst", "0123"] {
            assert!(!out.text.contains(piece), "{piece} left in {}", out.text);
        }
        // Each one alone.
        let out = r.redact("abcdefghij-0123 | 0123-klmnopqrst");
        assert_eq!(
            out.text,
            "[REDACTED:database-password] | [REDACTED:admin-password]"
        );
    }

    #[test]
    fn a_secret_inside_a_longer_one_does_not_leave_the_longer_ones_tail() {
        let mut r = Redactor::new();
        // The short one first: replacing it first would leave "-tail-of-the-long-one".
        r.add_value(SecretKind::RunnerToken, "sharedprefix1234");
        r.add_value(
            SecretKind::BootstrapToken,
            "sharedprefix1234-tail-of-the-long-one",
        );
        let out = r.redact("a sharedprefix1234-tail-of-the-long-one b sharedprefix1234 c");
        assert_eq!(
            out.text,
            "a [REDACTED:bootstrap-token] b [REDACTED:runner-token] c"
        );
        assert_eq!(out.counts.get(SecretKind::BootstrapToken), 1);
        assert_eq!(out.counts.get(SecretKind::RunnerToken), 1);
        // The same value under two kinds: the first kind given wins, one marker.
        r.add_value(SecretKind::AdminPassword, "sharedprefix1234");
        assert_eq!(r.redact("sharedprefix1234").text, "[REDACTED:runner-token]");
    }

    #[test]
    fn escaped_forms_of_a_value_are_hidden_too() {
        let mut r = Redactor::new();
        r.add_value(SecretKind::AdminPassword, r#"p"a\ss w/rd"#);
        let json = serde_json::json!({ "detail": r#"login with p"a\ss w/rd failed"# });
        let out = r.redact(&json.to_string());
        assert_eq!(
            out.text,
            r#"{"detail":"login with [REDACTED:admin-password] failed"}"#
        );
        let out = r.redact("postgres://admin:p%22a%5Css%20w%2Frd@db/postgres");
        assert_eq!(
            out.text,
            "postgres://admin:[REDACTED:admin-password]@db/postgres"
        );
    }

    #[test]
    fn pem_private_keys_are_removed_whole() {
        let key = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\nAbCd\n-----END PRIVATE KEY-----";
        let ec = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIK\n-----END EC PRIVATE KEY-----";
        let cert = "-----BEGIN CERTIFICATE-----\nMIIBcert\n-----END CERTIFICATE-----";
        let text = format!("before\n{key}\nmiddle {ec} {cert}\nafter");
        let out = Redactor::new().redact(&text);
        assert_eq!(
            out.text,
            format!("before\n[REDACTED:private-key]\nmiddle [REDACTED:private-key] {cert}\nafter")
        );
        assert_eq!(out.counts.get(SecretKind::PrivateKey), 2);
        // JSON-escaped (a container's inspect output): still one block.
        let escaped = serde_json::to_string(key).unwrap();
        let out = Redactor::new().redact(&format!("{{\"k\":{escaped}}}"));
        assert_eq!(out.text, "{\"k\":\"[REDACTED:private-key]\"}");
        // Cut before its END line: the rest is hidden (bounded), nothing of it shows.
        let cut = "log: -----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAKC";
        let out = Redactor::new().redact(cut);
        assert_eq!(out.text, "log: [REDACTED:private-key]");
        // A BEGIN line that is not a key is left alone.
        assert_eq!(
            Redactor::new().redact("-----BEGIN PUBLIC KEY-----x").text,
            "-----BEGIN PUBLIC KEY-----x"
        );
    }

    #[test]
    fn waypoint_server_token_values_and_bearer_tokens_are_hidden_by_shape() {
        let r = Redactor::new();
        let out = r.redact(
            "Env: [\"WAYPOINT_SERVER_TOKEN=unknownTok3n\", \"A=b\"]\n\
             export WAYPOINT_SERVER_TOKEN = 'quoted-tok'\n\
             {\"WAYPOINT_SERVER_TOKEN\": \"json-tok\"}\n\
             Authorization: Bearer abcdefgh12345678\n\
             WWW-Authenticate: Bearer realm=\"pilot\"",
        );
        assert_eq!(
            out.text,
            "Env: [\"WAYPOINT_SERVER_TOKEN=[REDACTED:waypoint-server-token]\", \"A=b\"]\n\
             export WAYPOINT_SERVER_TOKEN = '[REDACTED:waypoint-server-token]'\n\
             {\"WAYPOINT_SERVER_TOKEN\": \"[REDACTED:waypoint-server-token]\"}\n\
             Authorization: Bearer [REDACTED:bearer-token]\n\
             WWW-Authenticate: Bearer realm=\"pilot\""
        );
        assert_eq!(out.counts.get(SecretKind::WaypointServerToken), 3);
        assert_eq!(out.counts.get(SecretKind::BearerToken), 1);
        // A known token in that place is labelled by its value.
        let out = redactor().redact(&format!("WAYPOINT_SERVER_TOKEN={RUNNER}"));
        assert_eq!(out.text, "WAYPOINT_SERVER_TOKEN=[REDACTED:runner-token]");
    }

    #[test]
    fn endpoint_tokens_known_by_hash_are_found_and_the_hash_too() {
        let token = "Zm9vYmFyLWVuZHBvaW50LXRva2VuLTEyMzQ1Njc4";
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let mut r = Redactor::new();
        r.add_token_hash(hash);
        let out = r.redact(&format!(
            "curl -H 'X-Token: {token}' ; token={token}&x=1 ; sha {hex} ; other \
             Zm9vYmFyLWVuZHBvaW50LXRva2VuLTEyMzQ1Njc5"
        ));
        assert_eq!(
            out.text,
            "curl -H 'X-Token: [REDACTED:endpoint-token]' ; token=[REDACTED:endpoint-token]&x=1 \
             ; sha [REDACTED:endpoint-token-sha256] ; other \
             Zm9vYmFyLWVuZHBvaW50LXRva2VuLTEyMzQ1Njc5"
        );
        assert_eq!(out.counts.get(SecretKind::EndpointToken), 2);
        assert_eq!(out.counts.get(SecretKind::EndpointTokenHash), 1);
    }

    #[test]
    fn empty_values_are_ignored_and_text_without_secrets_is_unchanged() {
        let mut r = Redactor::new();
        r.add_value(SecretKind::AdminPassword, "  \n");
        assert_eq!(r.known(), (0, 0));
        let text = "nothing secret here: ünïcödé, tabs\tand\nlines\n";
        let out = redactor().redact(text);
        assert_eq!(out.text, text);
        assert_eq!(out.counts.total(), 0);
        // Multi-byte characters around a secret split by a line break.
        let (a, b) = BOOT.split_at(3);
        let out = redactor().redact(&format!("é{a}\n{b}ü"));
        assert_eq!(out.text, "é[REDACTED:bootstrap-token]\nü");
    }
}
