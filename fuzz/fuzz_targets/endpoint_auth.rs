//! Fuzz target: the endpoint's authentication pieces on structured input: `auth::check` on
//! any `Authorization` value (against an independent reading of the header), the token hash
//! file (`auth::parse_hash_file`, against an independent reading: one non-blank line whose
//! first word is 64 hex digits), and the per-source failure limiter (`auth::RateLimiter`)
//! driven by a sequence of attempts from chosen sources at chosen times: its table never
//! exceeds its capacity, a refusal never asks to wait longer than the window, the limit
//! engages exactly at the configured failure count, and IPv6 sources of one /64 (and
//! IPv4-mapped addresses) count as one.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pilot_agent::config::endpoint::{RateLimit, TokenHash};
use pilot_agent::endpoint::auth::{self, Admission, RateLimiter};
use pilot_agent_fuzz::{ENDPOINT_TOKEN, ENDPOINT_TOKEN_SHA256, expected_auth};

#[derive(Arbitrary, Debug)]
enum Header {
    Absent,
    Raw(Vec<u8>),
    /// `SCHEME<spaces>TOKEN<spaces>`, the scheme in any case.
    Bearer {
        scheme: u8,
        before: u8,
        after: u8,
        right_token: bool,
        other: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum Source {
    V4([u8; 4]),
    V6([u16; 8]),
    Mapped([u8; 4]),
    /// One of a few addresses, so that sources repeat.
    Few(u8),
}

#[derive(Arbitrary, Debug)]
struct Attempt {
    source: Source,
    /// Milliseconds after the previous attempt.
    after_ms: u16,
    fail: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<Header>,
    hash_file: String,
    failures: u8,
    window_secs: u8,
    capacity: u8,
    attempts: Vec<Attempt>,
}

fn header_bytes(h: &Header) -> Option<Vec<u8>> {
    match h {
        Header::Absent => None,
        Header::Raw(b) => Some(b.clone()),
        Header::Bearer {
            scheme,
            before,
            after,
            right_token,
            other,
        } => {
            let scheme = ["Bearer", "bearer", "BEARER", "BeArEr", "Basic", "Bearer\t"]
                [usize::from(*scheme) % 6];
            let mut v = scheme.as_bytes().to_vec();
            v.extend(std::iter::repeat_n(b' ', usize::from(before % 4)));
            v.extend_from_slice(if *right_token { ENDPOINT_TOKEN } else { other });
            v.extend(std::iter::repeat_n(b' ', usize::from(after % 3)));
            Some(v)
        }
    }
}

fn ip(s: &Source) -> IpAddr {
    match s {
        Source::V4(a) => IpAddr::V4(Ipv4Addr::from(*a)),
        Source::V6(s) => IpAddr::V6(Ipv6Addr::from(*s)),
        Source::Mapped(a) => IpAddr::V6(Ipv4Addr::from(*a).to_ipv6_mapped()),
        Source::Few(i) => [
            "192.0.2.1",
            "192.0.2.2",
            "::ffff:192.0.2.1",
            "2001:db8:1:2::1",
            "2001:db8:1:2:ffff::9",
            "2001:db8:1:3::1",
        ][usize::from(*i) % 6]
            .parse()
            .unwrap(),
    }
}

fn expected_hash_file(text: &str) -> Option<[u8; 32]> {
    let word = text.split_whitespace().next()?;
    if text.lines().filter(|l| !l.trim().is_empty()).count() != 1 {
        return None;
    }
    if word.len() != 64 || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in word.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fuzz_target!(|input: Input| {
    let hash = TokenHash::from_hex(ENDPOINT_TOKEN_SHA256).unwrap();
    for h in &input.headers {
        let bytes = header_bytes(h);
        let presented = bytes.as_deref();
        assert_eq!(
            auth::check(presented, &hash),
            expected_auth(presented),
            "Authorization: {presented:?}"
        );
    }

    let parsed = auth::parse_hash_file(&input.hash_file);
    assert_eq!(
        parsed.as_ref().map(|h| *h.as_bytes()),
        expected_hash_file(&input.hash_file),
        "hash file {:?}",
        input.hash_file
    );

    let limit = RateLimit {
        failures: u32::from(input.failures % 8) + 1,
        window_secs: u64::from(input.window_secs % 10) + 1,
    };
    let window = Duration::from_secs(limit.window_secs);
    let capacity = usize::from(input.capacity % 8) + 1;
    let limiter = RateLimiter::with_capacity(limit, capacity);
    let mut now = Instant::now();
    for a in &input.attempts {
        now += Duration::from_millis(u64::from(a.after_ms));
        let source = ip(&a.source);
        let key = auth::source_key(source);
        assert_eq!(auth::source_key(key), key, "source_key is not idempotent");
        if let IpAddr::V6(v6) = key {
            assert!(
                v6.to_ipv4_mapped().is_none(),
                "a mapped address kept as IPv6"
            );
            assert_eq!(v6.segments()[4..], [0; 4], "not counted per /64: {v6}");
        }
        match limiter.admit(source, now) {
            Admission::Limited { retry_after } => {
                assert!(
                    retry_after <= window && !retry_after.is_zero(),
                    "{retry_after:?}"
                );
            }
            Admission::Allowed if a.fail => {
                let r = limiter.record_failure(source, now);
                assert!(r.failures >= 1);
                assert_eq!(r.engaged, r.failures == limit.failures);
                if r.failures >= limit.failures {
                    assert!(
                        matches!(limiter.admit(source, now), Admission::Limited { .. }),
                        "not refused after {} failures",
                        r.failures
                    );
                }
            }
            Admission::Allowed => {}
        }
        assert!(
            limiter.tracked() <= capacity,
            "{} sources tracked",
            limiter.tracked()
        );
    }
});
