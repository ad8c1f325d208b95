//! Fuzz target: the credentials a runner host receives from the server VM
//! (`remote::parse_credentials`, on the JSON body of `GET /v1/credentials`). Any body must
//! give credentials or an error, never panic. Each input is checked twice: pinned to the CA
//! the answer itself carries (when its `ca_pem` parses), so that the accepting path is
//! reached, and pinned to another CA. The secrets (`waypoint.token`, `database.password`)
//! are replaced by markers first, which then must appear in no error (`Display` or `Debug`),
//! not in the `Debug` of the credentials, and not in the kept answer (`raw`); accepted
//! credentials carry the token, the pinned CA and an address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_agent::remote::{Fingerprint, parse_credentials};
use serde_json::Value;

const TOKEN_MARKER: &str = "SECRET-WAYPOINT-TOKEN-7f3a9c";
const PASSWORD_MARKER: &str = "SECRET-DB-PASSWORD-52be01";

fn replace(v: &mut Value, section: &str, field: &str, marker: &str) -> bool {
    match v.get_mut(section).and_then(|s| s.get_mut(field)) {
        Some(Value::String(s)) if !s.is_empty() => {
            *s = marker.to_string();
            true
        }
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if text.contains(TOKEN_MARKER) || text.contains(PASSWORD_MARKER) {
        return;
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let token = replace(&mut value, "waypoint", "token", TOKEN_MARKER);
    replace(&mut value, "database", "password", PASSWORD_MARKER);
    let served = value
        .get("ca_pem")
        .and_then(Value::as_str)
        .and_then(|pem| Fingerprint::of_pem(pem).ok());
    let other = Fingerprint::of_der(b"not the served CA");
    for pin in served.iter().chain([&other]) {
        match parse_credentials("server.example:8443", pin, value.clone()) {
            Ok(c) => {
                assert_eq!(
                    Some(pin),
                    served.as_ref(),
                    "accepted with another CA pinned"
                );
                assert_eq!(Fingerprint::of_pem(&c.ca_pem).ok().as_ref(), Some(pin));
                assert!(token, "accepted without a token");
                assert_eq!(c.waypoint_token.expose(), TOKEN_MARKER);
                assert!(!c.waypoint_address.is_empty());
                let debug = format!("{c:?}");
                let raw = c.raw.to_string();
                for marker in [TOKEN_MARKER, PASSWORD_MARKER] {
                    assert!(
                        !debug.contains(marker),
                        "a secret in the credentials' Debug"
                    );
                    assert!(!raw.contains(marker), "a secret kept in raw: {raw}");
                }
            }
            Err(e) => {
                let shown = format!("{e} {e:?}");
                for marker in [TOKEN_MARKER, PASSWORD_MARKER] {
                    assert!(!shown.contains(marker), "a secret in an error: {shown}");
                }
            }
        }
    }
});
