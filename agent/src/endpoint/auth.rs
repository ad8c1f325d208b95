//! Bearer-token authentication, the scoped token set, and the per-source limit on failed
//! attempts.
//!
//! The configuration holds the SHA-256 of each token, not the token: a request's token is
//! hashed and the digest compared in constant time (`subtle`) with every accepted digest (all
//! of them, whatever matched, so the timing tells nothing about which), so neither the compare
//! nor the configuration reveals it. Nothing here logs or formats a token or a digest; a
//! token is known in logs by its configured name.
//!
//! Token hash files are re-read when they change ([`TokenSet::refresh`], which the endpoint
//! runs every [`TOKEN_REFRESH_INTERVAL`]): a file emptied or removed revokes its token at the
//! next refresh, without a restart; a file that cannot be parsed disables its token (fails
//! closed) and is logged by path.
//!
//! Failed attempts are counted per source in a fixed window that opens at the first failure;
//! at `failures` the source is refused (429) until the window has passed, even with the right
//! token. IPv6 sources are counted per /64 (one host commonly holds the whole /64) and
//! IPv4-mapped IPv6 addresses as the IPv4 address. The table is bounded: when full, expired
//! entries are dropped and then the oldest window.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::EndpointError;
use crate::config::endpoint::{EndpointToken, RateLimit, Scope, TokenHash, TokenSource};

/// How often the endpoint looks at the token hash files for a change (a `stat` each; a file
/// is read only when it changed). Bounds how long a revoked file token keeps working.
pub const TOKEN_REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// Sources tracked at most; one entry is a few dozen bytes, so the table stays well under a
/// megabyte however many addresses an attacker uses.
pub const MAX_TRACKED_SOURCES: usize = 4096;

/// Why a request was not authenticated (what the log line says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    NotBearer,
    Wrong,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "no Authorization header",
            AuthFailure::NotBearer => "Authorization is not a Bearer token",
            AuthFailure::Wrong => "wrong token",
        }
    }
}

/// Reads the token's hash from the configuration, or its file. A file readable by group or
/// others is accepted with a warning: the hash is not the token, but a weak token's hash can
/// be brute-forced.
pub fn load_token_hash(source: &TokenSource) -> Result<TokenHash, EndpointError> {
    let path = match source {
        TokenSource::Inline(hash) => return Ok(hash.clone()),
        TokenSource::File(path) => path,
    };
    match load_file(path)? {
        FileHash::Hash(h, _) => Ok(h),
        FileHash::Absent(_) => Err(EndpointError::TokenFile {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "no token hash in the file"),
        }),
    }
}

/// The first word of the file: 64 hex digits (so `sha256sum` output, `HASH  -`, works too).
/// Public for the fuzz targets and tests.
pub fn parse_hash_file(text: &str) -> Option<TokenHash> {
    let word = text.split_whitespace().next()?;
    if text.lines().filter(|l| !l.trim().is_empty()).count() != 1 {
        return None;
    }
    TokenHash::from_hex(word)
}

/// Checks an `Authorization` header value against the expected hash.
pub fn check(header: Option<&[u8]>, expected: &TokenHash) -> Result<(), AuthFailure> {
    let digest = bearer_digest(header)?;
    if bool::from(digest.as_slice().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(AuthFailure::Wrong)
    }
}

/// The SHA-256 of the bearer token in an `Authorization` header value.
fn bearer_digest(header: Option<&[u8]>) -> Result<[u8; 32], AuthFailure> {
    let header = header.ok_or(AuthFailure::Missing)?;
    // RFC 9110: the scheme is case-insensitive; one or more spaces before the credentials.
    let (scheme, rest) = match header.iter().position(|b| *b == b' ') {
        Some(i) => (&header[..i], &header[i..]),
        None => return Err(AuthFailure::NotBearer),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(AuthFailure::NotBearer);
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return Err(AuthFailure::Missing);
    }
    Ok(Sha256::digest(token).into())
}

/// Who a request authenticated as: the token's configured name and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub scope: Scope,
}

/// A token whose hash file changed at a [`TokenSet::refresh`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenChange {
    pub name: String,
    pub path: PathBuf,
    /// Whether the token is accepted now.
    pub accepted: bool,
    /// Why the file cannot be used (names the path, never the content).
    pub error: Option<String>,
}

/// What identifies a version of a hash file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    scope: Scope,
    file: Option<PathBuf>,
    /// `None`: revoked or unusable (its file is missing, empty or malformed).
    hash: Option<TokenHash>,
    /// The file's version last read; `None` before the first read or when it was missing.
    stamp: Option<Stamp>,
}

/// The tokens the endpoint accepts now (see the module documentation).
#[derive(Debug, Clone)]
pub struct TokenSet {
    entries: Vec<Entry>,
}

/// What loading one hash file gave.
enum FileHash {
    Hash(TokenHash, Stamp),
    /// Missing or empty: no token (revoked).
    Absent(Option<Stamp>),
}

fn load_file(path: &Path) -> Result<FileHash, EndpointError> {
    let read_err = |source: io::Error| EndpointError::TokenFile {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(FileHash::Absent(None)),
        Err(e) => return Err(read_err(e)),
    };
    let stamp = Stamp::of(&meta);
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", mode & 0o777),
            "endpoint: the token hash file is readable by group or others; make it 0600"
        );
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(read_err)?);
    if text.trim().is_empty() {
        return Ok(FileHash::Absent(Some(stamp)));
    }
    match parse_hash_file(&text) {
        Some(h) => Ok(FileHash::Hash(h, stamp)),
        None => Err(EndpointError::TokenFileFormat {
            path: path.to_path_buf(),
        }),
    }
}

impl TokenSet {
    /// Loads every token. A hash file that exists but cannot be read or parsed is an error
    /// (a typo should not start an endpoint that silently refuses a token); a missing or
    /// empty file is a revoked token, with a warning, unless no token at all is usable.
    pub fn load(tokens: &[EndpointToken]) -> Result<TokenSet, EndpointError> {
        let mut entries = Vec::with_capacity(tokens.len());
        let mut first_absent = None;
        for t in tokens {
            let (file, hash, stamp) = match &t.source {
                TokenSource::Inline(h) => (None, Some(h.clone()), None),
                TokenSource::File(path) => match load_file(path)? {
                    FileHash::Hash(h, stamp) => (Some(path.clone()), Some(h), Some(stamp)),
                    FileHash::Absent(stamp) => {
                        tracing::warn!(
                            token = %t.name,
                            path = %path.display(),
                            "endpoint: the token's hash file is missing or empty: the token                              is not accepted until the file holds a hash"
                        );
                        first_absent.get_or_insert_with(|| path.clone());
                        (Some(path.clone()), None, stamp)
                    }
                },
            };
            entries.push(Entry {
                name: t.name.clone(),
                scope: t.scope,
                file,
                hash,
                stamp,
            });
        }
        if entries.iter().all(|e| e.hash.is_none()) {
            if let Some(path) = first_absent {
                return Err(EndpointError::TokenFile {
                    path,
                    source: io::Error::new(io::ErrorKind::NotFound, "no token hash in the file"),
                });
            }
        }
        Ok(TokenSet { entries })
    }

    /// Re-reads the hash files that changed since they were last read; a change that cannot
    /// be read disables its token (fails closed). Returns what changed, for the caller to
    /// log (it runs on the blocking pool, where a test's thread-local subscriber is not).
    pub fn refresh(&mut self) -> Vec<TokenChange> {
        let mut changed = Vec::new();
        for e in &mut self.entries {
            let Some(path) = e.file.clone() else {
                continue;
            };
            let now = std::fs::metadata(&path).ok().map(|m| Stamp::of(&m));
            // Both `None`: missing before and now, already refused.
            if now == e.stamp {
                continue;
            }
            let (hash, stamp, error) = match load_file(&path) {
                Ok(FileHash::Hash(h, s)) => (Some(h), Some(s), None),
                Ok(FileHash::Absent(s)) => (None, s, None),
                // Stamped, so that one bad file is reported once, not at every refresh.
                Err(err) => (None, now, Some(err.to_string())),
            };
            if hash != e.hash || error.is_some() {
                changed.push(TokenChange {
                    name: e.name.clone(),
                    path,
                    accepted: hash.is_some(),
                    error,
                });
            }
            e.hash = hash;
            e.stamp = stamp;
        }
        changed
    }

    /// The token an `Authorization` header carries, if it is one of the set. Every digest
    /// is compared, whatever matched.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Principal, AuthFailure> {
        let digest = bearer_digest(header)?;
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            let Some(h) = &e.hash else {
                continue;
            };
            let hit: Choice = digest.as_slice().ct_eq(h.as_bytes());
            if bool::from(hit) && found.is_none() {
                found = Some(e);
            }
        }
        found
            .map(|e| Principal {
                name: e.name.clone(),
                scope: e.scope,
            })
            .ok_or(AuthFailure::Wrong)
    }

    /// Tokens accepted now.
    pub fn active(&self) -> usize {
        self.entries.iter().filter(|e| e.hash.is_some()).count()
    }
}

/// The key a source is counted under.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    opened: Instant,
    failures: u32,
}

/// What to do with a request from a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Refused for this long yet.
    Limited {
        retry_after: Duration,
    },
}

/// What a recorded failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureRecord {
    pub failures: u32,
    /// This failure reached the limit: the source is refused from now on.
    pub engaged: bool,
}

#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    capacity: usize,
    table: Mutex<HashMap<IpAddr, Window>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self::with_capacity(limit, MAX_TRACKED_SOURCES)
    }

    pub fn with_capacity(limit: RateLimit, capacity: usize) -> Self {
        RateLimiter {
            limit,
            capacity: capacity.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.limit.window_secs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Window>> {
        // A poisoned lock means a panic mid-update of plain counters: still usable.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `source` may try to authenticate now.
    pub fn admit(&self, source: IpAddr, now: Instant) -> Admission {
        let key = source_key(source);
        let mut table = self.lock();
        let Some(w) = table.get(&key).copied() else {
            return Admission::Allowed;
        };
        let elapsed = now.saturating_duration_since(w.opened);
        if elapsed >= self.window() {
            table.remove(&key);
            return Admission::Allowed;
        }
        if w.failures >= self.limit.failures {
            Admission::Limited {
                retry_after: self.window() - elapsed,
            }
        } else {
            Admission::Allowed
        }
    }

    /// Counts a failed attempt from `source`.
    pub fn record_failure(&self, source: IpAddr, now: Instant) -> FailureRecord {
        let key = source_key(source);
        let window = self.window();
        let mut table = self.lock();
        if !table.contains_key(&key) && table.len() >= self.capacity {
            table.retain(|_, w| now.saturating_duration_since(w.opened) < window);
            if table.len() >= self.capacity {
                if let Some(oldest) = table.iter().min_by_key(|(_, w)| w.opened).map(|(k, _)| *k) {
                    table.remove(&oldest);
                }
            }
        }
        let w = table.entry(key).or_insert(Window {
            opened: now,
            failures: 0,
        });
        if now.saturating_duration_since(w.opened) >= window {
            *w = Window {
                opened: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
        FailureRecord {
            failures: w.failures,
            engaged: w.failures == self.limit.failures,
        }
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256("test")
    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn hash() -> TokenHash {
        TokenHash::from_hex(HASH).unwrap()
    }

    #[test]
    fn bearer_check() {
        assert_eq!(check(Some(b"Bearer test"), &hash()), Ok(()));
        assert_eq!(check(Some(b"bearer   test "), &hash()), Ok(()));
        assert_eq!(check(None, &hash()), Err(AuthFailure::Missing));
        assert_eq!(check(Some(b"Bearer "), &hash()), Err(AuthFailure::Missing));
        assert_eq!(
            check(Some(b"Basic dGVzdA=="), &hash()),
            Err(AuthFailure::NotBearer)
        );
        assert_eq!(
            check(Some(b"Bearertest"), &hash()),
            Err(AuthFailure::NotBearer)
        );
        assert_eq!(
            check(Some(b"Bearer tesT"), &hash()),
            Err(AuthFailure::Wrong)
        );
        // The hash itself is not the token.
        let h = format!("Bearer {HASH}");
        assert_eq!(check(Some(h.as_bytes()), &hash()), Err(AuthFailure::Wrong));
    }

    #[test]
    fn hash_file_formats() {
        assert!(parse_hash_file(&format!("{HASH}\n")).is_some());
        assert!(parse_hash_file(&format!("{HASH}  -\n")).is_some());
        assert!(parse_hash_file("").is_none());
        assert!(parse_hash_file(&format!("{HASH}\n{HASH}\n")).is_none());
        assert!(parse_hash_file(&HASH[..60]).is_none());
    }

    #[test]
    fn token_file_loaded_and_errors_name_the_path_not_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hash");
        std::fs::write(&path, format!("{HASH}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let got = load_token_hash(&TokenSource::File(path.clone())).unwrap();
        assert_eq!(got, hash());
        std::fs::write(&path, "not-a-hash-secret\n").unwrap();
        let e = load_token_hash(&TokenSource::File(path.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(!e.contains("not-a-hash-secret"), "{e}");
        let e = load_token_hash(&TokenSource::File(dir.path().join("absent")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent"), "{e}");
    }

    #[test]
    fn limiter_engages_at_the_limit_and_releases_after_the_window() {
        let l = RateLimiter::new(RateLimit {
            failures: 3,
            window_secs: 10,
        });
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        for i in 1..=3u32 {
            assert_eq!(l.admit(ip, t0), Admission::Allowed);
            let r = l.record_failure(ip, t0);
            assert_eq!(r.failures, i);
            assert_eq!(r.engaged, i == 3);
        }
        assert_eq!(
            l.admit(ip, t0 + Duration::from_secs(4)),
            Admission::Limited {
                retry_after: Duration::from_secs(6)
            }
        );
        // Another source is not affected.
        assert_eq!(
            l.admit("192.0.2.8".parse().unwrap(), t0),
            Admission::Allowed
        );
        assert_eq!(
            l.admit(ip, t0 + Duration::from_secs(10)),
            Admission::Allowed
        );
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn ipv6_counted_per_64_and_mapped_v4_as_v4() {
        let l = RateLimiter::new(RateLimit {
            failures: 2,
            window_secs: 60,
        });
        let t0 = Instant::now();
        l.record_failure("2001:db8:1:2::1".parse().unwrap(), t0);
        l.record_failure("2001:db8:1:2::ffff".parse().unwrap(), t0);
        assert!(matches!(
            l.admit("2001:db8:1:2:abcd::9".parse().unwrap(), t0),
            Admission::Limited { .. }
        ));
        assert_eq!(
            l.admit("2001:db8:1:3::1".parse().unwrap(), t0),
            Admission::Allowed
        );
        l.record_failure("::ffff:192.0.2.1".parse().unwrap(), t0);
        l.record_failure("192.0.2.1".parse().unwrap(), t0);
        assert!(matches!(
            l.admit("192.0.2.1".parse().unwrap(), t0),
            Admission::Limited { .. }
        ));
    }

    #[test]
    fn table_is_bounded_and_evicts_the_oldest() {
        let l = RateLimiter::with_capacity(
            RateLimit {
                failures: 1,
                window_secs: 60,
            },
            8,
        );
        let t0 = Instant::now();
        for i in 0..100u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.record_failure(ip, t0 + Duration::from_millis(u64::from(i)));
            assert!(l.tracked() <= 8);
        }
        // The newest are kept, the oldest gone.
        let newest = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + 99));
        let oldest = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000));
        let t = t0 + Duration::from_millis(100);
        assert!(matches!(l.admit(newest, t), Admission::Limited { .. }));
        assert_eq!(l.admit(oldest, t), Admission::Allowed);
    }
}
