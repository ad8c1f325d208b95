//! Pilot's Waypoint image (`images/waypoint/Dockerfile`, built by
//! `scripts/build-waypoint-image`) against what the agent assumes of the image it defaults to.
//! The image cannot be built here (no registry); these checks keep its definition and the agent
//! from drifting apart: the tag, the base, the entrypoint the agent's commands rely on, the user,
//! where Waypoint 0.11.4 looks for plugins, and checked downloads.

use std::path::PathBuf;

use pilot_agent::config::waypoint::DEFAULT_IMAGE;

fn repo_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The Dockerfile's instructions, continuation lines joined and comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (kw, rest) = cur
            .split_once(char::is_whitespace)
            .unwrap_or((cur.as_str(), ""));
        out.push((kw.to_ascii_uppercase(), rest.trim().to_string()));
        cur.clear();
    }
    assert!(cur.is_empty(), "dangling continuation line");
    out
}

fn dockerfile() -> Vec<(String, String)> {
    instructions(&repo_file("images/waypoint/Dockerfile"))
}

fn default_tag() -> &'static str {
    DEFAULT_IMAGE
        .rsplit_once(':')
        .map(|(_, t)| t)
        .expect("tagged default")
}

#[test]
fn base_is_waypoint_at_the_default_images_version() {
    let ins = dockerfile();
    let arg = ins
        .iter()
        .find(|(k, v)| k == "ARG" && v.starts_with("WAYPOINT_VERSION="))
        .expect("ARG WAYPOINT_VERSION");
    assert_eq!(arg.1, format!("WAYPOINT_VERSION={}", default_tag()));
    let froms: Vec<_> = ins.iter().filter(|(k, _)| k == "FROM").collect();
    assert_eq!(froms.len(), 1, "one stage: {froms:?}");
    assert_eq!(froms[0].1, "hashicorp/waypoint:${WAYPOINT_VERSION}");
}

#[test]
fn build_script_tags_the_default_image() {
    let script = repo_file("scripts/build-waypoint-image");
    assert!(
        script.contains(&format!("\ntag={DEFAULT_IMAGE}\n")),
        "scripts/build-waypoint-image must default to {DEFAULT_IMAGE}"
    );
    assert!(script.contains("images/waypoint/Dockerfile"));
    let ok = std::process::Command::new("bash")
        .arg("-n")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-waypoint-image"))
        .status()
        .expect("bash");
    assert!(ok.success(), "bash -n scripts/build-waypoint-image");
}

#[test]
fn entrypoint_stays_waypoints() {
    // The agent's containers set only Cmd (`server run ...`, `runner agent ...`).
    let ins = dockerfile();
    let eps: Vec<_> = ins.iter().filter(|(k, _)| k == "ENTRYPOINT").collect();
    for (_, v) in &eps {
        assert_eq!(v, r#"["/usr/bin/waypoint"]"#);
    }
    assert!(
        !ins.iter().any(|(k, _)| k == "CMD"),
        "a CMD would be replaced anyway: none"
    );
}

#[test]
fn runs_as_root_as_the_stand_in_root_variant_does() {
    let ins = dockerfile();
    let last_user = ins.iter().rfind(|(k, _)| k == "USER").expect("a USER");
    assert_eq!(last_user.1, "root");
}

#[test]
fn plugins_go_where_waypoint_looks() {
    // internal/plugin/discover.go (v0.11.4): $HOME/.config/waypoint/plugins; the base image's HOME
    // is /home/waypoint and this image does not change it.
    let ins = dockerfile();
    assert!(
        !ins.iter().any(|(k, v)| k == "ENV" && v.contains("HOME=")),
        "HOME is the base's"
    );
    let copy = ins
        .iter()
        .find(|(k, v)| k == "COPY" && v.starts_with("plugins/"))
        .expect("COPY");
    assert_eq!(copy.1, "plugins/ /home/waypoint/.config/waypoint/plugins/");
}

#[test]
fn every_download_is_checksummed_and_nothing_floats() {
    let ins = dockerfile();
    for (k, v) in &ins {
        assert_ne!(k, "ADD", "ADD fetches unchecked: use curl and sha256sum -c");
        assert!(!v.contains(":latest"), "{k} {v}");
        if k == "RUN" && v.contains("://") {
            assert!(
                v.contains("sha256sum -c"),
                "a download without a checksum: {v}"
            );
        }
    }
}

#[test]
fn parser_joins_continuations_and_drops_comments() {
    let ins = instructions("# c\nFROM a\nRUN x \\\n  y\n\nUSER root\n");
    assert_eq!(
        ins,
        vec![
            ("FROM".into(), "a".into()),
            ("RUN".into(), "x  y".into()),
            ("USER".into(), "root".into())
        ]
    );
}
