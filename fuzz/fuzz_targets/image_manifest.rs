//! Fuzz target: the Docker image tarballs the agent reads (`waypoint::images::repo_tags_from`,
//! the `manifest.json` of a `docker save` archive, found by seeking over the layers), on
//! archives read from memory. The fuzzer's bytes are taken two ways: as a whole archive
//! (headers and all), and as the content of a `manifest.json` put into a well-formed archive
//! after a layer. Any archive must give its tags or an error naming the file, never panic; a
//! manifest that is a JSON list of objects gives exactly the `RepoTags` it lists; every tag
//! normalises (`images::normalize`) to a reference with a tag or a digest.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pilot_agent::waypoint::images::{normalize, repo_tags_from};
use serde_json::Value;

const PATH: &str = "/var/lib/pilot-agent/images/waypoint.tar";

fn archive(manifest: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let layer = [7u8; 600];
    let mut h = tar::Header::new_gnu();
    h.set_size(layer.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "abc/layer.tar", &layer[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(manifest.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "manifest.json", manifest).unwrap();
    b.into_inner().unwrap()
}

fn check_tags(tags: &[String]) {
    for t in tags {
        let n = normalize(t);
        let last = n.rsplit('/').next().unwrap_or_default();
        assert!(
            n.contains('@') || last.contains(':'),
            "{t:?} normalised to {n:?}"
        );
    }
}

/// Any JSON value in which no object gives a key twice (keys compared as decoded).
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<NoDuplicateKeys, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<NoDuplicateKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key) {
                return Err(serde::de::Error::custom("a key given twice"));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(NoDuplicateKeys)
    }
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new(PATH);
    match repo_tags_from(Cursor::new(data), path) {
        Ok(tags) => check_tags(&tags),
        Err(e) => assert!(e.to_string().contains(PATH), "the error names no file: {e}"),
    }

    let result = repo_tags_from(Cursor::new(archive(data)), path);
    // What `docker save` writes: a list of objects, `RepoTags` a list of strings or null.
    // Only for JSON without a key given twice in an object: there serde_json's Value keeps
    // the last value while the agent's typed reader may stop at the first (a kept crash had
    // `"RepoTags"` as a number, then as null); what docker writes has no such keys.
    let expected: Option<Vec<String>> = std::str::from_utf8(data)
        .ok()
        .filter(|t| serde_json::from_str::<NoDuplicateKeys>(t).is_ok())
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .and_then(|v| {
            let mut tags = Vec::new();
            for item in v.as_array()? {
                match item.as_object()?.get("RepoTags") {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(list)) => {
                        for t in list {
                            tags.push(t.as_str()?.to_string());
                        }
                    }
                    Some(_) => return None,
                }
            }
            Some(tags)
        });
    match (&result, &expected) {
        (Ok(tags), Some(want)) => assert_eq!(tags, want),
        // Other shapes serde accepts too (a struct from a JSON array): no oracle.
        (Ok(_), None) => {}
        (Err(e), Some(want)) => {
            // A key given twice: serde refuses it, serde_json's Value keeps the last.
            let cause = std::error::Error::source(e)
                .map(|c| c.to_string())
                .unwrap_or_default();
            assert!(
                cause.contains("duplicate field"),
                "a docker save manifest ({want:?}) refused: {e}: {cause}"
            );
        }
        (Err(e), None) => assert!(e.to_string().contains(PATH), "the error names no file: {e}"),
    }
    if let Ok(tags) = &result {
        check_tags(tags);
    }
});
