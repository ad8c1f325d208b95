//! Fuzz target: the daemon.json merge (`docker::daemon_config::merge`) on any current file
//! content. The file is the operator's (or the image's): anything must give the merged file
//! or an error naming the path, never a panic. A merged file must keep every key the agent
//! does not own with its value, carry exactly the agent's settings in the keys it owns, and be
//! a fixed point (merging it again changes nothing: a converged host does not rewrite it and
//! restart dockerd); "unchanged" must mean the file already says exactly that.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pilot_agent::config::Config;
use pilot_agent::docker::DockerPlan;
use pilot_agent::docker::daemon_config::{OWNED_KEYS, merge};
use serde_json::Value;

const PATH: &str = "/etc/docker/daemon.json";

fuzz_target!(|data: &[u8]| {
    let settings = DockerPlan::from_config(&Config::default()).settings;
    let path = Path::new(PATH);
    let blank = data.iter().all(u8::is_ascii_whitespace);
    match merge(path, Some(data), &settings) {
        Err(e) => {
            assert!(!blank, "an empty file is as absent, not an error: {e}");
            assert!(e.to_string().contains(PATH), "the error names no path: {e}");
        }
        Ok(merged) => {
            let current: Option<Value> = (!blank).then(|| {
                serde_json::from_slice(data).expect("merge accepted a file that is not JSON")
            });
            let Some(out) = merged else {
                // Unchanged: the file holds the agent's settings already.
                let current = current.expect("an absent file must be written");
                assert_owned(&current, &settings);
                return;
            };
            assert!(
                out.ends_with(b"}\n"),
                "the merged file does not end in a newline"
            );
            let written: Value = serde_json::from_slice(&out).expect("the merged file is not JSON");
            let obj = written
                .as_object()
                .expect("the merged file is not an object");
            assert_owned(&written, &settings);
            if let Some(Value::Object(before)) = &current {
                for (k, v) in before {
                    if !OWNED_KEYS.contains(&k.as_str()) {
                        assert_eq!(obj.get(k), Some(v), "key {k:?} not kept as it was");
                    }
                }
                let foreign = before.keys().filter(|k| !OWNED_KEYS.contains(&k.as_str()));
                assert_eq!(
                    obj.len(),
                    foreign.count() + OWNED_KEYS.len(),
                    "keys added or lost"
                );
            }
            match merge(path, Some(&out), &settings) {
                Ok(None) => {}
                other => panic!("the merged file is not a fixed point: {other:?}"),
            }
        }
    }
});

fn assert_owned(v: &Value, s: &pilot_agent::docker::TlsSettings) {
    let hosts: Vec<Value> = s.hosts.iter().cloned().map(Value::String).collect();
    assert_eq!(v["hosts"], Value::Array(hosts));
    assert_eq!(v["tls"], Value::Bool(true));
    assert_eq!(v["tlsverify"], Value::Bool(true));
    assert_eq!(v["tlscacert"], s.ca.to_string_lossy().as_ref());
    assert_eq!(v["tlscert"], s.cert.to_string_lossy().as_ref());
    assert_eq!(v["tlskey"], s.key.to_string_lossy().as_ref());
}
