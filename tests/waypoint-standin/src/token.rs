//! The stand-in's tokens, shaped like Waypoint's: base58 (Bitcoin alphabet) of the magic
//! `wp24` followed by a body and an HMAC-SHA256 signature made with the server's signing key
//! (key id `k1`). Like Waypoint's they are stateless: the server verifies the signature and the
//! expiry and reads kind, user or runner id from the token itself, so a token survives a
//! restart, and a server whose key was replaced (`server restore` of another server's
//! snapshot) rejects it with `bad token signature: invalid authentication token`.
//!
//! The body is NOT Waypoint's protobuf `TokenTransport`; it is the stand-in's own compact
//! binary layout. What matters to callers is the outside: about 110 base58 characters, no
//! readable prefix, and the decoding errors Waypoint gives for hex strings, foreign tokens and
//! tampered ones.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::tls13::OkmBlock;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// The magic string every token starts with (before base58).
pub const MAGIC: &[u8; 4] = b"wp24";
/// The only signing key id Waypoint 0.11 uses.
pub const KEY_ID: &str = "k1";
/// The user `server bootstrap` creates, whose login tokens it hands out.
pub const DEFAULT_USER_ID: &str = "00000000000000000000000001";
/// Layout version of the stand-in's token body.
const BODY_VERSION: u8 = 1;
const TAG_LEN: usize = 32;

const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Encodes bytes as base58 (Bitcoin alphabet; leading zero bytes become `1`s).
pub fn base58_encode(data: &[u8]) -> String {
    let zeros = data.iter().take_while(|&&b| b == 0).count();
    let mut digits: Vec<u8> = Vec::with_capacity(data.len() * 138 / 100 + 1);
    for &byte in &data[zeros..] {
        let mut carry = u32::from(byte);
        for d in digits.iter_mut() {
            carry += u32::from(*d) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let mut out = String::with_capacity(zeros + digits.len());
    out.extend(std::iter::repeat_n('1', zeros));
    out.extend(digits.iter().rev().map(|&d| ALPHABET[d as usize] as char));
    out
}

/// Decodes base58; the error is the text of the Go library Waypoint uses
/// (`Invalid base58 digit ('0')`).
pub fn base58_decode(text: &str) -> std::result::Result<Vec<u8>, String> {
    if text.is_empty() {
        return Err("zero length string".into());
    }
    for c in text.chars() {
        if (c as u32) > 127 {
            return Err("High-bit set on invalid digit".into());
        }
        if !ALPHABET.contains(&(c as u8)) {
            return Err(format!("Invalid base58 digit ('{c}')"));
        }
    }
    let zeros = text.bytes().take_while(|&b| b == b'1').count();
    let mut bytes: Vec<u8> = Vec::with_capacity(text.len());
    for c in text.bytes().skip(zeros) {
        let mut carry = ALPHABET.iter().position(|&a| a == c).unwrap_or(0) as u32;
        for b in bytes.iter_mut() {
            carry += u32::from(*b) * 58;
            *b = (carry & 0xff) as u8;
            carry >>= 8;
        }
        while carry > 0 {
            bytes.push((carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    let mut out = vec![0u8; zeros];
    out.extend(bytes.iter().rev());
    Ok(out)
}

/// HMAC-SHA256 through the rustls (aws-lc-rs) crypto provider, so the stand-in needs no
/// further crypto crate.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let tls13 = suite
        .tls13()
        .expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite");
    tls13
        .hkdf_provider
        .hmac_sign(&OkmBlock::new(key), message)
        .as_ref()
        .to_vec()
}

/// SHA-256 through the rustls crypto provider.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let tls13 = suite
        .tls13()
        .expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite");
    tls13.common.hash_provider.hash(data).as_ref().to_vec()
}

/// Random bytes from the OS.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
    Ok(bytes)
}

/// A new signing key (32 random bytes, hex) as the state stores it.
pub fn new_key_hex() -> Result<String> {
    Ok(hex(&random_bytes::<32>()?))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `token new`, `user token`, the bootstrap token: acts as a user.
    Login,
    /// `runner token`: only for runners (optionally one runner id and label set).
    Runner,
    /// `user token -trigger-url-token`: only for trigger URLs, refused on every API call.
    Trigger,
}

/// The decoded content of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    pub kind: Kind,
    /// Login: the user id. Runner: the runner id it is bound to, or empty for any runner.
    pub subject: String,
    /// Hash of the labels a runner must have (runner tokens with `-label`), 0 for none.
    pub label_hash: u64,
    /// Unix time (seconds, nanoseconds) after which the token is refused, if any.
    pub valid_until: Option<(i64, u32)>,
    pub issued_at: i64,
}

impl Body {
    /// A login token for `user`, expiring after `ttl` (none: never).
    pub fn login(user: &str, ttl: Option<Duration>) -> Body {
        Body::new(Kind::Login, user, 0, ttl)
    }

    /// A trigger-URL token made by `user`.
    pub fn trigger(user: &str, ttl: Option<Duration>) -> Body {
        Body::new(Kind::Trigger, user, 0, ttl)
    }

    /// A runner token for `runner_id` (empty: any runner), expiring after `ttl`.
    pub fn runner(runner_id: &str, label_hash: u64, ttl: Option<Duration>) -> Body {
        Body::new(Kind::Runner, runner_id, label_hash, ttl)
    }

    fn new(kind: Kind, subject: &str, label_hash: u64, ttl: Option<Duration>) -> Body {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let valid_until = ttl.filter(|d| !d.is_zero()).map(|d| {
            let until = now + d;
            (until.as_secs() as i64, until.subsec_nanos())
        });
        Body {
            kind,
            subject: subject.to_string(),
            label_hash,
            valid_until,
            issued_at: now.as_secs() as i64,
        }
    }
}

/// Encodes and signs `body` with `key` (id [`KEY_ID`]).
pub fn encode(body: &Body, key: &[u8]) -> Result<String> {
    let accessor = random_bytes::<16>()?;
    let mut signed = vec![BODY_VERSION, KEY_ID.len() as u8];
    signed.extend_from_slice(KEY_ID.as_bytes());
    signed.push(match body.kind {
        Kind::Login => 1,
        Kind::Runner => 2,
        Kind::Trigger => 3,
    });
    let (secs, nanos) = body.valid_until.unwrap_or((0, 0));
    signed.extend_from_slice(&secs.to_be_bytes());
    signed.extend_from_slice(&nanos.to_be_bytes());
    signed.extend_from_slice(&body.issued_at.to_be_bytes());
    signed.extend_from_slice(&accessor);
    let subject = body.subject.as_bytes();
    let subject = &subject[..subject.len().min(255)];
    signed.push(subject.len() as u8);
    signed.extend_from_slice(subject);
    signed.extend_from_slice(&body.label_hash.to_be_bytes());
    let tag = hmac_sha256(key, &signed);
    let mut all = MAGIC.to_vec();
    all.extend_from_slice(&signed);
    all.extend_from_slice(&tag);
    Ok(base58_encode(&all))
}

/// Why a token was refused: the message Waypoint's server gives (the gRPC status message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

const INVALID: &str = "invalid authentication token";

/// Decodes and verifies `token` against the signing keys (`key_of` looks an id up).
pub fn decode(
    token: &str,
    key_of: &dyn Fn(&str) -> Option<Vec<u8>>,
) -> std::result::Result<Body, Refused> {
    let data =
        base58_decode(token).map_err(|e| Refused(format!("failed to base58 decode token: {e}")))?;
    if data.len() < MAGIC.len() || !bool::from(data[..MAGIC.len()].ct_eq(MAGIC)) {
        return Err(Refused(
            "Failed to decode authentication token. The magic string embedded in the token \
             does not match what was expected. This is likely due to the token string being \
             an invalid auth token."
                .into(),
        ));
    }
    let rest = &data[MAGIC.len()..];
    let malformed = || Refused("failed to proto unmarshal token: unexpected EOF".into());
    if rest.len() < TAG_LEN + 2 {
        return Err(malformed());
    }
    let (signed, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut r = Reader(signed);
    let version = r.u8().ok_or_else(malformed)?;
    if version != BODY_VERSION {
        return Err(malformed());
    }
    let key_id_len = r.u8().ok_or_else(malformed)? as usize;
    let key_id = String::from_utf8_lossy(r.take(key_id_len).ok_or_else(malformed)?).to_string();
    let Some(key) = key_of(&key_id) else {
        return Err(Refused(format!("unknown key id {key_id:?}: {INVALID}")));
    };
    let expected = hmac_sha256(&key, signed);
    if !bool::from(expected.as_slice().ct_eq(tag)) {
        return Err(Refused(format!("bad token signature: {INVALID}")));
    }
    let kind = match r.u8().ok_or_else(malformed)? {
        1 => Kind::Login,
        2 => Kind::Runner,
        3 => Kind::Trigger,
        _ => return Err(Refused(INVALID.into())),
    };
    let secs = i64::from_be_bytes(r.array().ok_or_else(malformed)?);
    let nanos = u32::from_be_bytes(r.array().ok_or_else(malformed)?);
    let issued_at = i64::from_be_bytes(r.array().ok_or_else(malformed)?);
    r.take(16).ok_or_else(malformed)?;
    let subject_len = r.u8().ok_or_else(malformed)? as usize;
    let subject = String::from_utf8_lossy(r.take(subject_len).ok_or_else(malformed)?).to_string();
    let label_hash = u64::from_be_bytes(r.array().ok_or_else(malformed)?);
    let valid_until = (secs != 0 || nanos != 0).then_some((secs, nanos));
    if let Some((secs, nanos)) = valid_until {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let until = Duration::new(secs.max(0) as u64, nanos);
        if until < now {
            return Err(Refused(format!(
                "Token has expired. The token was valid until: {}. Please reauthenticate to \
                 continue accessing Waypoint.: {INVALID}",
                go_time_string(secs, nanos)
            )));
        }
    }
    Ok(Body {
        kind,
        subject,
        label_hash,
        valid_until,
        issued_at,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|b| b.try_into().ok())
    }
}

/// Go's `time.Time.String()` of a Unix time in UTC: `2006-01-02 15:04:05.999999999 +0000 UTC`
/// (the fraction without trailing zeros, left out when zero).
pub fn go_time_string(secs: i64, nanos: u32) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        + Duration::from_nanos(u64::from(nanos));
    let mut frac = String::new();
    if nanos != 0 {
        frac = format!(".{nanos:09}");
        while frac.ends_with('0') {
            frac.pop();
        }
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}{frac} +0000 UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The label hash a runner token with `-label` carries (the stand-in's own: SHA-256 of the
/// sorted `k=v` lines, first 8 bytes), 0 for no labels.
pub fn label_hash(labels: &std::collections::BTreeMap<String, String>) -> u64 {
    if labels.is_empty() {
        return 0;
    }
    let text: String = labels.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let digest = sha256(text.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8])).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn keys(id: &str) -> Option<Vec<u8>> {
        (id == KEY_ID).then(|| KEY.to_vec())
    }

    #[test]
    fn base58_round_trips_and_reports_go_errors() {
        for data in [&b""[..], b"\0\0abc", b"wp24 hello", &[255u8; 40]] {
            let text = base58_encode(data);
            if !data.is_empty() {
                assert_eq!(base58_decode(&text).unwrap(), data);
            }
        }
        assert_eq!(base58_encode(b"hello world"), "StV1DL6CwTryKyV");
        assert_eq!(
            base58_decode("ab0c").unwrap_err(),
            "Invalid base58 digit ('0')"
        );
        assert_eq!(
            base58_decode("not-a-token").unwrap_err(),
            "Invalid base58 digit ('-')"
        );
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 test case 2.
        let tag = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn tokens_look_like_waypoints_and_verify() {
        let token = encode(&Body::login(DEFAULT_USER_ID, None), KEY).unwrap();
        assert!(token.len() > 100, "{token}");
        assert!(token.chars().all(|c| ALPHABET.contains(&(c as u8))));
        assert!(
            !token.chars().all(|c| c.is_ascii_hexdigit()),
            "never hex: {token}"
        );
        assert!(base58_decode(&token).unwrap().starts_with(b"wp24"));
        let body = decode(&token, &keys).unwrap();
        assert_eq!(body.kind, Kind::Login);
        assert_eq!(body.subject, DEFAULT_USER_ID);
        assert_eq!(body.valid_until, None);

        let runner = encode(
            &Body::runner("host-runner-1", 0, Some(Duration::from_secs(60))),
            KEY,
        )
        .unwrap();
        let body = decode(&runner, &keys).unwrap();
        assert_eq!(
            (body.kind, body.subject.as_str()),
            (Kind::Runner, "host-runner-1")
        );
        assert!(body.valid_until.is_some());
    }

    #[test]
    fn refusals_carry_waypoints_texts() {
        let token = encode(&Body::login(DEFAULT_USER_ID, None), KEY).unwrap();
        let other = |id: &str| (id == KEY_ID).then(|| b"another key entirely, 32 bytes!!".to_vec());
        assert_eq!(
            decode(&token, &other).unwrap_err().0,
            "bad token signature: invalid authentication token"
        );
        assert_eq!(
            decode(&token, &|_| None).unwrap_err().0,
            "unknown key id \"k1\": invalid authentication token"
        );
        let hex_token = hex(&[7u8; 32]);
        assert!(
            decode(&hex_token, &keys)
                .unwrap_err()
                .0
                .starts_with("failed to base58 decode token: Invalid base58 digit")
        );
        assert!(
            decode("StV1DL6CwTryKyV", &keys)
                .unwrap_err()
                .0
                .contains("magic string")
        );
        let expired = Body {
            valid_until: Some((1_700_000_000, 500_000_000)),
            ..Body::runner("r", 0, None)
        };
        let err = decode(&encode(&expired, KEY).unwrap(), &keys)
            .unwrap_err()
            .0;
        assert_eq!(
            err,
            "Token has expired. The token was valid until: 2023-11-14 22:13:20.5 +0000 UTC. \
             Please reauthenticate to continue accessing Waypoint.: invalid authentication token"
        );
    }

    #[test]
    fn label_hashes_depend_on_every_label() {
        let mut a = std::collections::BTreeMap::new();
        assert_eq!(label_hash(&a), 0);
        a.insert("env".to_string(), "prod".to_string());
        let h1 = label_hash(&a);
        a.insert("zone".to_string(), "b".to_string());
        assert_ne!(h1, label_hash(&a));
        assert_ne!(h1, 0);
    }
}
