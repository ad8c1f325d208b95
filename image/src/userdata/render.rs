//! The cloud-config text of a [`UserDataSpec`]: the flavour's template (embedded from
//! `cloud-init/`) with its placeholders filled (see the [module doc](super)), refused above
//! [`USER_DATA_LIMIT`], and written atomically.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::error::UserDataError;
use super::input::Flavour;
use super::spec::UserDataSpec;

/// EC2's limit on raw (not base64-encoded) user-data. GCE allows more, but one limit keeps a
/// rendered user-data usable on either cloud.
pub const USER_DATA_LIMIT: usize = 16 * 1024;
/// Where the agent reads its configuration by default.
pub const AGENT_CONFIG_PATH: &str = "/etc/pilot/agent.yaml";
/// The database admin password, named by `database.admin_password_file`.
pub const DB_ADMIN_PASSWORD_PATH: &str = "/etc/pilot/db-admin-password";
/// The SHA-256 (hex) of the single-token form's `admin` token (`--endpoint-token-sha256`),
/// named by `endpoint.token_sha256_file`. The tokens of `endpoint.tokens` have a file each,
/// [`EndpointTokenSpec::sha256_path`](super::token::EndpointTokenSpec::sha256_path).
pub const ENDPOINT_TOKEN_SHA256_PATH: &str = "/etc/pilot/endpoint-token.sha256";
/// The server VM's endpoint token on a runner-only host, named by `server.token_file`
/// (the agent's default, agent/src/config/server.rs DEFAULT_TOKEN_FILE).
pub const SERVER_TOKEN_PATH: &str = "/etc/pilot/server-token";

const AWS_TEMPLATE: &str = include_str!("../../../cloud-init/aws.yaml");
const GCP_TEMPLATE: &str = include_str!("../../../cloud-init/gcp.yaml");
const STOCK_TEMPLATE: &str = include_str!("../../../cloud-init/stock.yaml");

impl Flavour {
    /// The template text (the file `cloud-init/<name>.yaml`, embedded).
    pub fn template(self) -> &'static str {
        match self {
            Flavour::Aws => AWS_TEMPLATE,
            Flavour::Gcp => GCP_TEMPLATE,
            Flavour::Stock => STOCK_TEMPLATE,
        }
    }

    /// The template's path relative to the repository root.
    pub fn template_file(self) -> String {
        format!("cloud-init/{}.yaml", self.name())
    }
}

/// A YAML double-quoted scalar holding exactly `s`, in printable ASCII only: everything else
/// is escaped (`\n`, `\xXX`, `\uXXXX`, `\UXXXXXXXX`), so no input can end the scalar, start
/// a new key, or carry a character that cloud-init's YAML 1.1 reader rejects.
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        // `write!` into a String cannot fail.
        let _ = match c {
            '"' => out.write_str("\\\""),
            '\\' => out.write_str("\\\\"),
            '\n' => out.write_str("\\n"),
            '\t' => out.write_str("\\t"),
            ' '..='~' => out.write_char(c),
            c if u32::from(c) <= 0xff => write!(out, "\\x{:02x}", u32::from(c)),
            c if u32::from(c) <= 0xffff => write!(out, "\\u{:04x}", u32::from(c)),
            c => write!(out, "\\U{:08x}", u32::from(c)),
        };
    }
    out.push('"');
    out
}

/// The text of `/etc/pilot/agent.yaml`: only what the deployment decides; every other key keeps
/// the agent's default. Every string from the input is quoted by [`yaml_quote`].
pub fn agent_config(spec: &UserDataSpec) -> String {
    let mut s = format!(
        "# Written by cloud-init from `pilot-image user-data --flavour {}`.\n\
         # Keys not set here keep the agent's defaults; check with `pilot-agent config validate`.\n",
        spec.flavour
    );
    if spec.server.is_some() {
        s.push_str("role: runner\n");
    }
    if !spec.extra_names.is_empty() {
        s.push_str("host:\n  extra_names:\n");
        for name in &spec.extra_names {
            s.push_str(&format!("    - {}\n", yaml_quote(name)));
        }
    }
    s.push_str(&format!("waypoint:\n  runners: {}\n", spec.runners));
    if let Some(address) = &spec.advertise_address {
        s.push_str(&format!("  advertise_address: {}\n", yaml_quote(address)));
    }
    if !spec.application_sources.is_empty() {
        s.push_str("  application_sources:\n");
        for net in &spec.application_sources {
            s.push_str(&format!("    - {}\n", yaml_quote(net)));
        }
    }
    if let Some(db) = &spec.database {
        s.push_str(&format!(
            "database:\n  host: {}\n  port: {}\n  admin_user: {}\n",
            yaml_quote(&db.host),
            db.port,
            yaml_quote(&db.admin_user)
        ));
        if db.admin_password.is_some() {
            s.push_str(&format!(
                "  admin_password_file: {DB_ADMIN_PASSWORD_PATH}\n"
            ));
        }
        s.push_str(&format!("  tls: {}\n", db.tls.name()));
    }
    if let Some(server) = &spec.server {
        // The token in its own 0600 file (see `secret_files`), like the database password.
        s.push_str(&format!(
            "server:\n  endpoint: {}\n  token_file: {SERVER_TOKEN_PATH}\n  ca_sha256: {}\n",
            yaml_quote(&server.endpoint),
            yaml_quote(&server.ca_sha256)
        ));
    }
    s.push_str(&endpoint_section(spec));
    s
}

/// `endpoint:`, when there is a token (the section turns the endpoint on). Every hash is in
/// its own 0600 file (see `secret_files`), not inline: agent.yaml stays free of anything that
/// helps an attacker, and emptying a token's file revokes that token without a restart.
fn endpoint_section(spec: &UserDataSpec) -> String {
    if spec.endpoint_token_sha256.is_none() && spec.endpoint_tokens.is_empty() {
        return String::new();
    }
    let mut s = String::from("endpoint:\n");
    if spec.endpoint_token_sha256.is_some() {
        s.push_str(&format!(
            "  token_sha256_file: {ENDPOINT_TOKEN_SHA256_PATH}\n"
        ));
    }
    if !spec.endpoint_tokens.is_empty() {
        s.push_str("  tokens:\n");
        for t in &spec.endpoint_tokens {
            s.push_str(&format!(
                "    - name: {}\n      scope: {}\n      sha256_file: {}\n",
                yaml_quote(&t.name),
                t.scope,
                yaml_quote(&t.sha256_path())
            ));
        }
    }
    if !spec.endpoint_sources.is_empty() {
        s.push_str("  sources:\n");
        for net in &spec.endpoint_sources {
            s.push_str(&format!("    - {}\n", yaml_quote(net)));
        }
    }
    s
}

/// The `write_files` entries for the secrets (empty when there are none).
fn secret_files(spec: &UserDataSpec) -> String {
    let entry = |path: &str, content: &str| {
        format!(
            "- path: {}\n  owner: root:root\n  permissions: '0600'\n  content: {}\n",
            yaml_quote(path),
            yaml_quote(&format!("{content}\n"))
        )
    };
    let mut s = String::new();
    if let Some(password) = spec
        .database
        .as_ref()
        .and_then(|d| d.admin_password.as_deref())
    {
        s.push_str(&entry(DB_ADMIN_PASSWORD_PATH, password));
    }
    if let Some(server) = &spec.server {
        s.push_str(&entry(SERVER_TOKEN_PATH, &server.token));
    }
    if let Some(hash) = &spec.endpoint_token_sha256 {
        s.push_str(&entry(ENDPOINT_TOKEN_SHA256_PATH, hash));
    }
    for t in &spec.endpoint_tokens {
        // The hash only: a generated token is printed by the command, never written here.
        s.push_str(&entry(&t.sha256_path(), &t.sha256));
    }
    s
}

/// Renders the user-data for `spec`, refusing it above [`USER_DATA_LIMIT`] bytes.
pub fn render(spec: &UserDataSpec) -> Result<String, UserDataError> {
    let blocks = [
        ("AGENT_CONFIG", agent_config(spec)),
        ("SECRET_FILES", secret_files(spec)),
    ];
    let scalars: Vec<(&str, String)> = spec
        .agent_deb_url
        .iter()
        .map(|url| ("AGENT_DEB_URL", yaml_quote(url)))
        .collect();
    let text = fill(spec.flavour, &blocks, &scalars)?;
    if text.len() > USER_DATA_LIMIT {
        return Err(UserDataError::TooLarge {
            size: text.len(),
            limit: USER_DATA_LIMIT,
        });
    }
    Ok(text)
}

/// One pass over the template (see the module doc); every placeholder asked for must be there
/// exactly once.
fn fill(
    flavour: Flavour,
    blocks: &[(&str, String)],
    scalars: &[(&str, String)],
) -> Result<String, UserDataError> {
    let template = flavour.template();
    let block_markers: Vec<String> = blocks.iter().map(|(n, _)| format!("# @@{n}@@")).collect();
    let scalar_markers: Vec<String> = scalars
        .iter()
        .map(|(n, _)| format!("\"@@{n}@@\""))
        .collect();
    let mut uses = vec![0usize; blocks.len() + scalars.len()];
    let mut out = String::with_capacity(template.len() + 1024);
    for line in template.lines() {
        let text = line.trim_start();
        let indent = &line[..line.len() - text.len()];
        if let Some(i) = block_markers.iter().position(|m| text == m) {
            uses[i] += 1;
            for l in blocks[i].1.lines() {
                if !l.is_empty() {
                    out.push_str(indent);
                    out.push_str(l);
                }
                out.push('\n');
            }
            continue;
        }
        let mut line = line.to_owned();
        if let Some(j) = scalar_markers
            .iter()
            .position(|m| line.contains(m.as_str()))
        {
            uses[blocks.len() + j] += line.matches(scalar_markers[j].as_str()).count();
            line = line.replace(scalar_markers[j].as_str(), &scalars[j].1);
        }
        out.push_str(&line);
        out.push('\n');
    }
    let names = blocks.iter().chain(scalars).map(|(n, _)| *n);
    for (name, used) in names.zip(uses) {
        if used != 1 {
            return Err(UserDataError::Template {
                template: flavour.template_file(),
                placeholder: name.to_owned(),
            });
        }
    }
    Ok(out)
}

/// Writes `text` to `path` atomically (temp file in the same directory, fsync, rename, fsync
/// of the directory), mode 0600: a crash leaves the old file or the new one, never half of it.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), UserDataError> {
    let err = |source| UserDataError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".user-data.")
        .tempfile_in(dir)
        .map_err(err)?;
    // tempfile already makes it 0600; say so explicitly, the file carries secrets.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    tmp.write_all(text.as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::super::spec::fixtures::{runner_spec, spec};
    use super::*;

    fn parse(text: &str) -> saphyr::Yaml<'_> {
        use saphyr::LoadableYamlNode;
        let mut docs = saphyr::Yaml::load_from_str(text).expect("valid YAML");
        assert_eq!(docs.len(), 1);
        docs.remove(0)
    }

    #[test]
    fn yaml_quote_round_trips_hostile_strings() {
        for s in [
            "",
            "plain",
            "quote\" back\\slash",
            "new\nline\ttab\r",
            "# @@SECRET_FILES@@",
            "key: value\n- item",
            "\u{0}\u{7f}\u{85}\u{a0}é\u{feff}€𝄞",
            "'single' {flow} [seq] &anchor *alias !tag %dir @at `tick`",
        ] {
            let q = yaml_quote(s);
            assert!(q.bytes().all(|b| (b' '..=b'~').contains(&b)), "{q}");
            let doc = format!("k: {q}\n");
            let y = parse(&doc);
            assert_eq!(y["k"].as_str(), Some(s), "round trip of {s:?} via {q}");
        }
    }

    #[test]
    fn every_flavour_fills_all_placeholders() {
        for f in Flavour::ALL {
            let text = render(&spec(f)).unwrap();
            assert!(text.starts_with("#cloud-config\n"), "{f}");
            for left in ["@@AGENT_CONFIG@@", "@@SECRET_FILES@@", "@@AGENT_DEB_URL@@"] {
                assert!(!text.contains(left), "{f}: {left} left:\n{text}");
            }
            let y = parse(&text);
            let files = y["write_files"].as_vec().unwrap();
            let paths: Vec<_> = files.iter().map(|e| e["path"].as_str().unwrap()).collect();
            assert_eq!(
                paths,
                [
                    AGENT_CONFIG_PATH,
                    DB_ADMIN_PASSWORD_PATH,
                    ENDPOINT_TOKEN_SHA256_PATH
                ]
            );
            for e in files {
                assert_eq!(e["permissions"].as_str(), Some("0600"));
            }
            assert_eq!(files[1]["content"].as_str(), Some("s3cret\n"));
            assert_eq!(
                files[0]["content"].as_str(),
                Some(agent_config(&spec(f)).as_str())
            );
        }
    }

    #[test]
    fn optional_parts_disappear() {
        let mut s = spec(Flavour::Aws);
        s.database = None;
        s.endpoint_token_sha256 = None;
        s.extra_names.clear();
        let text = render(&s).unwrap();
        let y = parse(&text);
        assert_eq!(y["write_files"].as_vec().unwrap().len(), 1);
        let config = agent_config(&s);
        assert!(!config.contains("database:") && !config.contains("host:"));
    }

    #[test]
    fn endpoint_section_names_the_hash_file_only_when_a_hash_is_given() {
        let s = spec(Flavour::Gcp);
        let config = agent_config(&s);
        let y = parse(&config);
        assert_eq!(
            y["endpoint"]["token_sha256_file"].as_str(),
            Some(ENDPOINT_TOKEN_SHA256_PATH)
        );
        // The hash itself stays in its 0600 file, out of agent.yaml.
        assert!(!config.contains(&"ab".repeat(32)), "{config}");
        let mut s = spec(Flavour::Gcp);
        s.endpoint_token_sha256 = None;
        assert!(!agent_config(&s).contains("endpoint"));
    }

    fn with_scoped_tokens(flavour: Flavour) -> UserDataSpec {
        use super::super::token::{EndpointTokenSpec, Scope};
        let mut s = spec(flavour);
        s.endpoint_tokens = vec![
            EndpointTokenSpec {
                name: "prom".into(),
                scope: Scope::Read,
                sha256: "cd".repeat(32),
                generated: None,
            },
            EndpointTokenSpec::generate("runners".into(), Scope::Runner).unwrap(),
        ];
        s.endpoint_sources = vec!["10.0.1.0/24".into(), "2001:db8::/32".into()];
        s
    }

    #[test]
    fn scoped_tokens_render_a_hash_file_each_and_sources() {
        for f in Flavour::ALL {
            let s = with_scoped_tokens(f);
            let text = render(&s).unwrap();
            let y = parse(&text);
            let files = y["write_files"].as_vec().unwrap();
            let paths: Vec<_> = files.iter().map(|e| e["path"].as_str().unwrap()).collect();
            assert_eq!(
                paths,
                [
                    AGENT_CONFIG_PATH,
                    DB_ADMIN_PASSWORD_PATH,
                    ENDPOINT_TOKEN_SHA256_PATH,
                    "/etc/pilot/endpoint-token-prom.sha256",
                    "/etc/pilot/endpoint-token-runners.sha256",
                ]
            );
            for e in files {
                assert_eq!(e["permissions"].as_str(), Some("0600"));
            }
            let cd = format!("{}\n", "cd".repeat(32));
            assert_eq!(files[3]["content"].as_str(), Some(cd.as_str()));
            let config = agent_config(&s);
            let c = parse(&config);
            let e = &c["endpoint"];
            assert_eq!(
                e["token_sha256_file"].as_str(),
                Some(ENDPOINT_TOKEN_SHA256_PATH)
            );
            let tokens: Vec<_> = e["tokens"]
                .as_vec()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["name"].as_str().unwrap(),
                        t["scope"].as_str().unwrap(),
                        t["sha256_file"].as_str().unwrap(),
                    )
                })
                .collect();
            assert_eq!(
                tokens,
                [
                    ("prom", "read", "/etc/pilot/endpoint-token-prom.sha256"),
                    (
                        "runners",
                        "runner",
                        "/etc/pilot/endpoint-token-runners.sha256"
                    )
                ]
            );
            let sources: Vec<_> = e["sources"]
                .as_vec()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            assert_eq!(sources, ["10.0.1.0/24", "2001:db8::/32"]);
            // No hash in agent.yaml.
            for t in &s.endpoint_tokens {
                assert!(!config.contains(&t.sha256), "{config}");
            }
        }
    }

    #[test]
    fn a_generated_token_lands_as_its_sha256_only() {
        let s = with_scoped_tokens(Flavour::Aws);
        let t = &s.endpoint_tokens[1];
        let token = t.generated.as_ref().unwrap().expose();
        let text = render(&s).unwrap();
        assert!(
            !text.contains(token),
            "the token itself is in the user-data"
        );
        let y = parse(&text);
        let entry = y["write_files"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|e| e["path"].as_str() == Some("/etc/pilot/endpoint-token-runners.sha256"))
            .unwrap();
        let want = format!("{}\n", super::super::token::sha256_hex(token));
        assert_eq!(entry["content"].as_str(), Some(want.as_str()));
        // agent.yaml does not depend on the token (another one gives the same file).
        let again = with_scoped_tokens(Flavour::Aws);
        assert_eq!(agent_config(&again), agent_config(&s));
    }

    #[test]
    fn scoped_tokens_alone_turn_the_endpoint_on() {
        let mut s = with_scoped_tokens(Flavour::Gcp);
        s.endpoint_token_sha256 = None;
        let config = agent_config(&s);
        let c = parse(&config);
        assert!(c["endpoint"].as_mapping_get("token_sha256_file").is_none());
        assert_eq!(c["endpoint"]["tokens"].as_vec().unwrap().len(), 2);
    }

    #[test]
    fn stock_url_is_quoted_into_runcmd() {
        let mut s = spec(Flavour::Stock);
        s.agent_deb_url = Some("https://example.com/a deb?x=\"1\"".into());
        let text = render(&s).unwrap();
        let y = parse(&text);
        let curl = &y["runcmd"].as_vec().unwrap()[0];
        let args = curl.as_vec().unwrap();
        assert_eq!(args.last().unwrap().as_str(), s.agent_deb_url.as_deref());
    }

    #[test]
    fn a_password_that_looks_like_a_placeholder_stays_data() {
        let mut s = spec(Flavour::Stock);
        if let Some(d) = s.database.as_mut() {
            d.admin_password = Some("# @@SECRET_FILES@@ \"@@AGENT_DEB_URL@@\"".into());
        }
        let text = render(&s).unwrap();
        let y = parse(&text);
        assert_eq!(
            y["write_files"][1]["content"].as_str(),
            Some("# @@SECRET_FILES@@ \"@@AGENT_DEB_URL@@\"\n")
        );
    }

    #[test]
    fn size_limit_is_inclusive_at_16384() {
        let mut s = spec(Flavour::Aws);
        let base = render(&s).unwrap().len();
        let pad = USER_DATA_LIMIT - base;
        if let Some(d) = s.database.as_mut() {
            d.admin_password = Some(format!("s3cret{}", "x".repeat(pad)));
        }
        assert_eq!(render(&s).unwrap().len(), USER_DATA_LIMIT);
        if let Some(d) = s.database.as_mut() {
            d.admin_password.as_mut().unwrap().push('x');
        }
        match render(&s) {
            Err(UserDataError::TooLarge { size, limit }) => {
                assert_eq!((size, limit), (USER_DATA_LIMIT + 1, USER_DATA_LIMIT));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn runner_renders_role_server_and_token_file_without_database() {
        for f in Flavour::ALL {
            let s = runner_spec(f);
            let text = render(&s).unwrap();
            let y = parse(&text);
            let files = y["write_files"].as_vec().unwrap();
            let paths: Vec<_> = files.iter().map(|e| e["path"].as_str().unwrap()).collect();
            assert_eq!(
                paths,
                [
                    AGENT_CONFIG_PATH,
                    SERVER_TOKEN_PATH,
                    ENDPOINT_TOKEN_SHA256_PATH
                ]
            );
            assert_eq!(files[1]["permissions"].as_str(), Some("0600"));
            assert_eq!(files[1]["content"].as_str(), Some("srv-t0ken\n"));
            let config = agent_config(&s);
            assert!(!config.contains("srv-t0ken"), "{config}");
            let c = parse(&config);
            assert_eq!(c["role"].as_str(), Some("runner"));
            assert_eq!(c["server"]["endpoint"].as_str(), Some("10.0.1.5:8443"));
            assert_eq!(c["server"]["token_file"].as_str(), Some(SERVER_TOKEN_PATH));
            let pin = ["3F"; 32].join(":");
            assert_eq!(c["server"]["ca_sha256"].as_str(), Some(pin.as_str()));
            assert!(c.as_mapping_get("database").is_none(), "{config}");
            assert_eq!(c["waypoint"]["runners"].as_integer(), Some(2));
            assert!(
                !config.contains("advertise_address") && !config.contains("application_sources")
            );
        }
    }

    #[test]
    fn server_renders_advertise_address_and_sources() {
        let config = agent_config(&spec(Flavour::Aws));
        let c = parse(&config);
        assert!(
            c.as_mapping_get("role").is_none() && c.as_mapping_get("server").is_none(),
            "{config}"
        );
        assert_eq!(
            c["waypoint"]["advertise_address"].as_str(),
            Some("pilot.example.com:19701")
        );
        let sources: Vec<_> = c["waypoint"]["application_sources"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(sources, ["198.51.100.0/24", "2001:db8::/32"]);
    }

    #[test]
    fn atomic_write_is_0600_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("user-data");
        std::fs::write(&out, "old").unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&out, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "new");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
