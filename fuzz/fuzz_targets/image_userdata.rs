//! Fuzz target: `pilot-image user-data`'s `--from FILE` input (`UserDataInput::from_json`),
//! validated (`UserDataInput::validate`) and rendered (`userdata::render`). The input is the
//! JSON file, then after a NUL byte the content of the database admin password file, then
//! after another the server token file (the JSON's `db_admin_password_file` and
//! `server_token_file` are pointed at those; no other file is read). Any input must give
//! user-data or an error naming a flag or the file, never panic. A validated input must give
//! an agent configuration the agent accepts (`Config::from_yaml`) with the same values, which
//! does not depend on the secrets (agent.yaml carries none); rendered user-data is at most
//! 16 KiB of valid YAML whose `write_files` hold that configuration and each secret exactly.
//! No error shows a secret.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pilot_agent::config::{Config, Role};
use pilot_image::userdata::{
    AGENT_CONFIG_PATH, DB_ADMIN_PASSWORD_PATH, SERVER_TOKEN_PATH, USER_DATA_LIMIT, UserDataError,
    UserDataInput, UserDataSpec, agent_config, render,
};
use saphyr::LoadableYamlNode;

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("pilot-fuzz-userdata-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a scratch directory");
        d
    })
}

/// A secret that may be looked for in other text without matching by chance.
fn distinctive(secret: &str, json: &str) -> bool {
    secret.trim().len() >= 12
        && !json.contains(secret.trim())
        && !dir().to_string_lossy().contains(secret.trim())
}

fn check_spec(spec: &UserDataSpec) {
    let agent = agent_config(spec);
    let config = Config::from_yaml(&agent).unwrap_or_else(|d| {
        panic!("the agent refuses the configuration the image wrote: {d:?}\n{agent}")
    });
    let w = config.waypoint.as_ref().expect("a waypoint section");
    assert_eq!(w.runners, spec.runners);
    assert_eq!(config.host.extra_names.len(), spec.extra_names.len());
    let sources: Vec<String> = w
        .application_sources
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(sources, spec.application_sources);
    assert_eq!(config.role == Role::Runner, spec.server.is_some());
    assert_eq!(config.server.is_some(), spec.server.is_some());
    assert_eq!(
        config.endpoint.is_some(),
        spec.endpoint_token_sha256.is_some() || !spec.endpoint_tokens.is_empty()
    );
    match (&config.database, &spec.database) {
        (Some(c), Some(s)) => {
            assert!(
                c.host.eq_ignore_ascii_case(&s.host),
                "{} / {}",
                c.host,
                s.host
            );
            assert_eq!(c.port, s.port);
            assert_eq!(c.admin_user, s.admin_user);
            assert_eq!(c.admin_password_file.is_some(), s.admin_password.is_some());
            assert!(
                c.admin_password.is_none(),
                "a password inline in agent.yaml"
            );
        }
        (None, None) => {}
        (c, s) => panic!("database {:?} from {s:?}", c.is_some()),
    }
    // agent.yaml carries no secret: other secrets give the same file.
    let mut other = spec.clone();
    if let Some(db) = &mut other.database {
        db.admin_password = db.admin_password.as_ref().map(|p| format!("{p}-other"));
    }
    if let Some(s) = &mut other.server {
        s.token = format!("{}-other", s.token);
    }
    assert_eq!(
        agent_config(&other),
        agent,
        "agent.yaml depends on a secret"
    );
    // Nor does the spec's Debug: compared with other secrets rather than searched for the
    // secret's text, which may equal any text at all (a field name, for one).
    assert_eq!(
        format!("{other:?}"),
        format!("{spec:?}"),
        "the spec's Debug depends on a secret"
    );

    let text = match render(spec) {
        Ok(text) => text,
        Err(UserDataError::TooLarge { size, limit }) => {
            assert!(size > limit);
            return;
        }
        Err(e) => panic!("a validated input does not render: {e}"),
    };
    assert!(text.len() <= USER_DATA_LIMIT);
    assert!(text.starts_with("#cloud-config\n"));
    let docs = saphyr::Yaml::load_from_str(&text)
        .unwrap_or_else(|e| panic!("the user-data is not YAML: {e}\n{text}"));
    assert_eq!(docs.len(), 1);
    let files = docs[0]["write_files"].as_vec().expect("write_files");
    let content = |path: &str| {
        files
            .iter()
            .find(|f| f["path"].as_str() == Some(path))
            .and_then(|f| f["content"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(content(AGENT_CONFIG_PATH).as_deref(), Some(agent.as_str()));
    let db_password = spec
        .database
        .as_ref()
        .and_then(|d| d.admin_password.clone());
    assert_eq!(
        content(DB_ADMIN_PASSWORD_PATH),
        db_password.map(|p| format!("{p}\n"))
    );
    let server_token = spec.server.as_ref().map(|s| format!("{}\n", s.token));
    assert_eq!(content(SERVER_TOKEN_PATH), server_token);
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let json = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let password = parts.next().unwrap_or(b"pilot-admin-pw-0123456789\n");
    let token = parts.next().unwrap_or(b"srv-t0ken-0123456789abcdef\n");
    let from = Path::new("/etc/pilot/user-data-input.json");
    let Ok(mut input) = UserDataInput::from_json(&json, from) else {
        return;
    };
    let (password_file, token_file) = (dir().join("db-admin-password"), dir().join("server-token"));
    if input.db_admin_password_file.is_some() {
        std::fs::write(&password_file, password).unwrap();
        input.db_admin_password_file = Some(password_file);
    }
    if input.server_token_file.is_some() {
        std::fs::write(&token_file, token).unwrap();
        input.server_token_file = Some(token_file);
    }
    // Only what the input made the image read is a secret of this run: bytes never read may
    // equal any text at all (a field name in a Debug output, for one: a kept crash had
    // "agent_deb_url:" as its unread password).
    let password = if input.db_admin_password_file.is_some() {
        String::from_utf8_lossy(password).into_owned()
    } else {
        String::new()
    };
    let token = if input.server_token_file.is_some() {
        String::from_utf8_lossy(token).into_owned()
    } else {
        String::new()
    };
    match input.validate() {
        Ok(spec) => check_spec(&spec),
        Err(e) => {
            let shown = format!("{e} / {e:?}");
            assert!(shown.starts_with("--"), "an error naming no flag: {shown}");
            for secret in [&password, &token] {
                if distinctive(secret, &json) {
                    assert!(
                        !shown.contains(secret.trim()),
                        "a secret in an error: {shown}"
                    );
                }
            }
        }
    }
});
