//! Fuzz target: the cloud metadata services' answers, AWS IMDSv2 and GCP, as the agent reads
//! them (`identity::aws::{token_answer, value_answer, identity}`,
//! `identity::gcp::{value_answer, identity}`): each answer a status, headers and a body
//! chosen by the fuzzer (plausible values among them, so that whole identities are built).
//! Any answers must give an identity or an error, never panic. An accepted identity holds
//! only checked values (ids, regions and zones of `[A-Za-z0-9._-]`, at most 255 bytes; DNS
//! names lower-cased without a final dot; GCP's region is its zone without the last `-x`),
//! yields its certificate names, and survives `STATE_DIR/identity.json` (serialized and read
//! back equal). The IMDSv2 session token is never in an error.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use pilot_agent::identity::http::Answer;
use pilot_agent::identity::{Identity, ProviderError, aws, gcp};

const BASE: &str = "http://169.254.169.254";
const TOKEN_MARKER: &str = "AQAEAFuzzSessionToken==7f3a9c";

/// Bodies a metadata service gives, and near misses.
const VALUES: &[&str] = &[
    "i-0123456789abcdef0",
    "eu-west-1",
    "eu-west-1a",
    "10.0.0.5",
    "203.0.113.7",
    "ip-10-0-0-5.eu-west-1.compute.internal",
    "ec2-203-0-113-7.eu-west-1.compute.amazonaws.com",
    "ec2-203-0-113-7.EU-WEST-1.compute.amazonaws.com.",
    "1234567890123456789",
    "projects/123456789/zones/europe-west1-b",
    "zones/europe-west1",
    "projects/1/zones/",
    "pilot-vm.c.project.internal",
    "10.0.0.256",
    "::1",
    "-bad-.example",
    "",
    " \n",
];

#[derive(Arbitrary, Debug)]
enum Status {
    Ok,
    NotFound,
    Unauthorized,
    Forbidden,
    MethodNotAllowed,
    Other(u16),
}

#[derive(Arbitrary, Debug)]
enum Flavor {
    None,
    Google,
    Other(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Known(u8),
    /// A known value with whitespace around it.
    Padded(u8, u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Reply {
    status: Status,
    flavor: Flavor,
    body: Body,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Aws { token: Reply, values: [Reply; 7] },
    Gcp { id: Reply, values: [Reply; 4] },
}

fn answer(r: &Reply) -> Answer {
    let status = match r.status {
        Status::Ok => StatusCode::OK,
        Status::NotFound => StatusCode::NOT_FOUND,
        Status::Unauthorized => StatusCode::UNAUTHORIZED,
        Status::Forbidden => StatusCode::FORBIDDEN,
        Status::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Status::Other(n) => StatusCode::from_u16(n).unwrap_or(StatusCode::IM_A_TEAPOT),
    };
    let mut headers = HeaderMap::new();
    let flavor = match &r.flavor {
        Flavor::None => None,
        Flavor::Google => Some(HeaderValue::from_static("Google")),
        Flavor::Other(v) => HeaderValue::from_bytes(v).ok(),
    };
    if let Some(v) = flavor {
        headers.insert(gcp::FLAVOR_HEADER, v);
    }
    let body = match &r.body {
        Body::Known(i) => VALUES[usize::from(*i) % VALUES.len()].as_bytes().to_vec(),
        Body::Padded(i, ws) => {
            let pad = [" ", "\n", "\r\n", "\t"][usize::from(*ws) % 4];
            format!("{pad}{}{pad}", VALUES[usize::from(*i) % VALUES.len()]).into_bytes()
        }
        Body::Raw(b) => b.clone(),
    };
    Answer {
        status,
        headers,
        body: Bytes::from(body),
    }
}

fn check_value(url: &str, a: &Answer, v: &Result<Option<String>, ProviderError>) {
    if let Ok(Some(text)) = v {
        assert_eq!(text, &a.text(), "{url}: a value is not the trimmed body");
        assert!(!text.is_empty());
    }
}

fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn dns(s: &str) -> bool {
    pilot_values::is_dns_name(s) && !s.ends_with('.') && s == s.to_ascii_lowercase()
}

fn check_identity(i: &Identity) {
    for v in [&i.instance_id, &i.region, &i.zone].into_iter().flatten() {
        assert!(plain(v), "unchecked value {v:?}");
    }
    for v in [&i.hostname, &i.public_hostname].into_iter().flatten() {
        assert!(dns(v), "unchecked DNS name {v:?}");
    }
    let sans = i.sans();
    assert!(sans.len() <= 4);
    let json = serde_json::to_vec(i).expect("an identity serializes");
    let back: Identity = serde_json::from_slice(&json).expect("identity.json reads back");
    assert_eq!(&back, i, "identity.json does not round-trip");
}

fuzz_target!(|input: Input| {
    match input {
        Input::Aws { token, values } => {
            let token_url = format!("{BASE}{}", aws::TOKEN_PATH);
            let mut t = answer(&token);
            // Whatever the body, the token inside it must never reach an error.
            let mut body = t.body.to_vec();
            body.extend_from_slice(TOKEN_MARKER.as_bytes());
            t.body = Bytes::from(body);
            match aws::token_answer(&token_url, &t) {
                Ok(session) => {
                    assert_eq!(t.status, StatusCode::OK);
                    assert_eq!(session, t.text());
                }
                Err(e) => assert!(
                    !format!("{e} {e:?}").contains(TOKEN_MARKER),
                    "the session token in an error: {e}"
                ),
            }
            let keys = [
                "instance-id",
                "placement/region",
                "placement/availability-zone",
                "local-ipv4",
                "public-ipv4",
                "local-hostname",
                "public-hostname",
            ];
            let got: Vec<_> = values
                .iter()
                .zip(keys)
                .map(|(r, key)| {
                    let url = format!("{BASE}/latest/meta-data/{key}");
                    let a = answer(r);
                    let v = aws::value_answer(&url, &a);
                    check_value(&url, &a, &v);
                    v
                })
                .collect();
            let [
                instance_id,
                region,
                zone,
                local_ipv4,
                public_ipv4,
                local_hostname,
                public_hostname,
            ] = <[_; 7]>::try_from(got).unwrap();
            let answers = aws::Answers {
                instance_id,
                region,
                zone,
                local_ipv4,
                public_ipv4,
                local_hostname,
                public_hostname,
            };
            if let Ok(i) = aws::identity(BASE, answers) {
                assert!(i.instance_id.is_some() && i.region.is_some());
                check_identity(&i);
            }
        }
        Input::Gcp { id, values } => {
            let base = format!("{BASE}/computeMetadata/v1/instance/");
            let id_answer = answer(&id);
            let Ok(Some(id)) = gcp::value_answer(&format!("{base}id"), &id_answer) else {
                return;
            };
            let keys = [
                "zone",
                "hostname",
                "network-interfaces/0/ip",
                "network-interfaces/0/access-configs/0/external-ip",
            ];
            let got: Vec<_> = values
                .iter()
                .zip(keys)
                .map(|(r, key)| {
                    let url = format!("{base}{key}");
                    let a = answer(r);
                    let v = gcp::value_answer(&url, &a);
                    if v.is_ok() {
                        // Only Google's answers are trusted (a 404 too).
                        let google = a
                            .headers
                            .get(gcp::FLAVOR_HEADER)
                            .is_some_and(|v| v == "Google");
                        assert!(google, "{url}: an answer without Metadata-Flavor trusted");
                    }
                    check_value(&url, &a, &v);
                    v
                })
                .collect();
            let [zone, hostname, ip, external_ip] = <[_; 4]>::try_from(got).unwrap();
            if let Ok(i) = gcp::identity(
                BASE,
                gcp::Answers {
                    id,
                    zone,
                    hostname,
                    ip,
                    external_ip,
                },
            ) {
                check_identity(&i);
                assert!(i.public_hostname.is_none());
                if let (Some(zone), Some(region)) = (&i.zone, &i.region) {
                    assert!(!zone.contains('/'));
                    assert!(
                        zone.starts_with(region.as_str()) && zone[region.len()..].starts_with('-')
                    );
                }
            }
        }
    }
});
