//! `pilot-image user-data` end to end: the real binary renders, the real `cloud-init schema`
//! (installed by scripts/setup.sh) checks the shipped templates and every rendering, and the
//! real `pilot-agent config validate` checks the agent configuration embedded in write_files.
//! Missing tools fail these tests; they never skip.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use saphyr::{LoadableYamlNode, Yaml};

mod support;

use support::{BIN, agent_bin};

const TOKEN_SHA256: &str = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
/// The server VM's CA pin as `openssl x509 -fingerprint -sha256` prints it, lowercased.
const CA_PIN: &str = "3f:9a:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:\
                      ee:ff:01:23:45:67:89:ab:cd:ef:10:32:54:76:98:ba";
const SERVER_TOKEN: &str = "pilot-server-token-Zm9vYmFy";
/// `--endpoint-token` of a `read` token whose SHA-256 is that of "test".
const PROM_TOKEN_ARG: &str =
    "prom:read:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// The `NAME SCOPE TOKEN` lines of generated endpoint tokens on stderr (the command's own
/// messages start with `pilot-image`).
fn token_lines(stderr: &str) -> Vec<(String, String, String)> {
    stderr
        .lines()
        .filter(|l| !l.starts_with("pilot-image"))
        .filter_map(|l| match l.split(' ').collect::<Vec<_>>()[..] {
            [name, scope, token] => Some((name.into(), scope.into(), token.into())),
            _ => None,
        })
        .collect()
}

/// `printf %s TOKEN | sha256sum`.
fn sha256_hex(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// `cloud-init schema --config-file FILE`: Ok on exit 0, Err(output) otherwise.
fn cloud_init_schema(file: &Path) -> Result<(), String> {
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cloud-init (scripts/setup.sh installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("user-data")
        .args(args)
        .output()
        .expect("run pilot-image")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A full set of deployment flags for `flavour`, with the password in `dir/pw`.
fn full_args(dir: &Path, flavour: &str) -> Vec<String> {
    let pw = dir.join("pw");
    std::fs::write(&pw, "p@ss\"w\\ord é: #x\n").unwrap();
    let mut args: Vec<String> = [
        "--flavour",
        flavour,
        "--db-host",
        "pilot-db.example.internal",
        "--db-port",
        "6432",
        "--db-admin-user",
        "pilot_admin",
        "--db-admin-password-file",
        pw.to_str().unwrap(),
        "--db-tls",
        "verify-full",
        "--endpoint-token-sha256",
        TOKEN_SHA256,
        "--runners",
        "3",
        "--extra-names",
        "pilot.example.com,203.0.113.10",
        "--extra-names",
        "2001:db8::1",
        "--advertise-address",
        "pilot.example.com:19701",
        "--application-sources",
        "198.51.100.0/24,203.0.113.7",
        "--application-sources",
        "2001:db8::/32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if flavour == "stock" {
        args.push("--agent-deb-url".into());
        args.push("https://downloads.example.com/pilot-agent_0.1.0_amd64.deb".into());
    }
    args
}

fn render_to_file(dir: &Path, flavour: &str) -> PathBuf {
    let out = dir.join(format!("{flavour}.user-data"));
    let mut args = full_args(dir, flavour);
    args.push("-o".into());
    args.push(out.to_str().unwrap().into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args);
    assert!(o.status.success(), "{flavour}: {}", stderr(&o));
    out
}

/// Flags of a runner-only host for `flavour`, with the server VM's token in `dir/server-token`.
fn runner_args(dir: &Path, flavour: &str) -> Vec<String> {
    let token = dir.join("server-token");
    std::fs::write(&token, format!("{SERVER_TOKEN}\n")).unwrap();
    let mut args: Vec<String> = [
        "--flavour",
        flavour,
        "--role",
        "runner",
        "--server-endpoint",
        "[2001:db8::5]:8443",
        "--server-ca-sha256",
        CA_PIN,
        "--server-token-file",
        token.to_str().unwrap(),
        "--endpoint-token-sha256",
        TOKEN_SHA256,
        "--runners",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if flavour == "stock" {
        args.push("--agent-deb-url".into());
        args.push("https://downloads.example.com/pilot-agent_0.1.0_amd64.deb".into());
    }
    args
}

/// `pilot-agent config validate FILE`, panicking with the agent's output if it refuses.
fn agent_validate(agent: &Path, file: &Path, what: &str) {
    let o = Command::new(agent)
        .args(["config", "validate"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{what}: pilot-agent config validate rejected\n{}\n{}{}",
        std::fs::read_to_string(file).unwrap_or_default(),
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}

/// The `content` of the write_files entry for `path`.
fn embedded_file(user_data: &str, path: &str) -> String {
    let docs = Yaml::load_from_str(user_data).expect("rendered user-data is YAML");
    let files = docs[0]["write_files"].as_vec().expect("write_files list");
    let entry = files
        .iter()
        .find(|e| e["path"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("no write_files entry for {path}"));
    assert_eq!(entry["permissions"].as_str(), Some("0600"), "{path}");
    entry["content"].as_str().unwrap().to_owned()
}

#[test]
fn shipped_templates_pass_cloud_init_schema() {
    let dir = repo().join("cloud-init");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Err(e) = cloud_init_schema(&path) {
                panic!("{}: {e}", path.display());
            }
            seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    seen.sort();
    assert_eq!(seen, ["aws.yaml", "gcp.yaml", "stock.yaml"]);
}

#[test]
fn schema_check_can_fail() {
    let dir = tempfile::tempdir().unwrap();
    // A schema error (an unquoted octal mode is an integer) and an unknown write_files key.
    let schema_bad = dir.path().join("schema-bad.yaml");
    std::fs::write(
        &schema_bad,
        "#cloud-config\nwrite_files:\n  - path: /etc/x\n    permissions: 0600\n    bogus: 1\n",
    )
    .unwrap();
    let err = cloud_init_schema(&schema_bad).expect_err("schema error must fail");
    assert!(err.contains("write_files"), "{err}");
    // A YAML syntax error.
    let syntax_bad = dir.path().join("syntax-bad.yaml");
    std::fs::write(&syntax_bad, "#cloud-config\nruncmd: [a, b\n").unwrap();
    cloud_init_schema(&syntax_bad).expect_err("syntax error must fail");
}

#[test]
fn every_flavour_renders_valid_cloud_config_0600() {
    let dir = tempfile::tempdir().unwrap();
    for flavour in ["aws", "gcp", "stock"] {
        let out = render_to_file(dir.path(), flavour);
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{flavour}");
        if let Err(e) = cloud_init_schema(&out) {
            panic!("{flavour}: {e}");
        }
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.len() <= 16384);
        assert_eq!(
            embedded_file(&text, "/etc/pilot/db-admin-password"),
            "p@ss\"w\\ord é: #x\n"
        );
        assert_eq!(
            embedded_file(&text, "/etc/pilot/endpoint-token.sha256"),
            format!("{TOKEN_SHA256}\n")
        );
    }
}

#[test]
fn minimal_render_to_stdout_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    for flavour in ["aws", "gcp"] {
        let o = run(&["--flavour", flavour]);
        assert!(o.status.success(), "{}", stderr(&o));
        let file = dir.path().join(flavour);
        std::fs::write(&file, &o.stdout).unwrap();
        cloud_init_schema(&file).unwrap_or_else(|e| panic!("{flavour}: {e}"));
        let text = String::from_utf8(o.stdout).unwrap();
        // No database, no token: only agent.yaml is written.
        let docs = Yaml::load_from_str(&text).unwrap();
        assert_eq!(docs[0]["write_files"].as_vec().unwrap().len(), 1);
    }
}

#[test]
fn embedded_agent_config_passes_the_real_agent_validate() {
    let agent = agent_bin();
    let dir = tempfile::tempdir().unwrap();
    for flavour in ["aws", "gcp", "stock"] {
        let text = std::fs::read_to_string(render_to_file(dir.path(), flavour)).unwrap();
        let config = embedded_file(&text, "/etc/pilot/agent.yaml");
        assert!(config.contains("admin_password_file: /etc/pilot/db-admin-password"));
        // The endpoint is on, its token's hash in its own file (not in agent.yaml).
        assert!(
            config.contains("endpoint:\n  token_sha256_file: /etc/pilot/endpoint-token.sha256\n"),
            "{config}"
        );
        let hash = embedded_file(&text, "/etc/pilot/endpoint-token.sha256");
        assert!(
            !config.contains(hash.trim()),
            "agent.yaml must not carry the hash"
        );
        assert!(
            !config.contains("p@ss"),
            "agent.yaml must not carry the password"
        );
        let file = dir.path().join(format!("{flavour}-agent.yaml"));
        std::fs::write(&file, &config).unwrap();
        let o = Command::new(&agent)
            .args(["config", "validate"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{flavour}: pilot-agent config validate rejected\n{config}\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        );
        // The same check fails on a config the agent rejects (here: an unknown section).
        let bad = dir.path().join(format!("{flavour}-bad.yaml"));
        std::fs::write(&bad, format!("{config}no_such_section:\n  key: x\n")).unwrap();
        let o = Command::new(&agent)
            .args(["config", "validate"])
            .arg(&bad)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{flavour}: an unknown key must fail");
    }
}

#[test]
fn runner_rendering_passes_cloud_init_and_the_real_agent() {
    let agent = agent_bin();
    let dir = tempfile::tempdir().unwrap();
    for flavour in ["aws", "gcp", "stock"] {
        let out = dir.path().join(format!("{flavour}-runner.user-data"));
        let mut args = runner_args(dir.path(), flavour);
        args.extend(["-o".into(), out.to_str().unwrap().into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&args);
        assert!(o.status.success(), "{flavour}: {}", stderr(&o));
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{flavour}");
        cloud_init_schema(&out).unwrap_or_else(|e| panic!("{flavour}: {e}"));
        let text = std::fs::read_to_string(&out).unwrap();

        // The token: its own 0600 entry (embedded_file checks the mode), never in agent.yaml.
        assert_eq!(
            embedded_file(&text, "/etc/pilot/server-token"),
            format!("{SERVER_TOKEN}\n")
        );
        let config = embedded_file(&text, "/etc/pilot/agent.yaml");
        assert!(!config.contains(SERVER_TOKEN), "{config}");
        assert!(!config.contains(TOKEN_SHA256), "{config}");

        let y = &Yaml::load_from_str(&config).unwrap()[0];
        assert_eq!(y["role"].as_str(), Some("runner"), "{config}");
        assert_eq!(y["server"]["endpoint"].as_str(), Some("[2001:db8::5]:8443"));
        assert_eq!(
            y["server"]["token_file"].as_str(),
            Some("/etc/pilot/server-token")
        );
        // Normalised to the uppercase colon form.
        assert_eq!(
            y["server"]["ca_sha256"].as_str(),
            Some(CA_PIN.to_uppercase().as_str())
        );
        assert!(y.as_mapping_get("database").is_none(), "{config}");
        assert_eq!(y["waypoint"]["runners"].as_integer(), Some(4));
        // The runner host's own endpoint stays available (status).
        assert_eq!(
            y["endpoint"]["token_sha256_file"].as_str(),
            Some("/etc/pilot/endpoint-token.sha256")
        );
        let docs = Yaml::load_from_str(&text).unwrap();
        let paths: Vec<_> = docs[0]["write_files"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap())
            .collect();
        assert!(
            !paths.contains(&"/etc/pilot/db-admin-password"),
            "{paths:?}"
        );

        let file = dir.path().join(format!("{flavour}-runner-agent.yaml"));
        std::fs::write(&file, &config).unwrap();
        agent_validate(&agent, &file, flavour);
        // The agent would refuse this rendering with a database: what --role runner refuses.
        let bad = dir.path().join(format!("{flavour}-runner-db.yaml"));
        std::fs::write(
            &bad,
            format!("{config}database:\n  host: db\n  admin_user: a\n"),
        )
        .unwrap();
        let o = Command::new(&agent)
            .args(["config", "validate"])
            .arg(&bad)
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "{flavour}: runner + database must fail"
        );
    }
}

#[test]
fn server_waypoint_flags_reach_agent_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(render_to_file(dir.path(), "aws")).unwrap();
    let config = embedded_file(&text, "/etc/pilot/agent.yaml");
    let y = &Yaml::load_from_str(&config).unwrap()[0];
    assert!(y.as_mapping_get("role").is_none(), "{config}");
    assert!(y.as_mapping_get("server").is_none(), "{config}");
    assert_eq!(
        y["waypoint"]["advertise_address"].as_str(),
        Some("pilot.example.com:19701")
    );
    let sources: Vec<_> = y["waypoint"]["application_sources"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    // Comma-separated and repeated; a bare address becomes its /32.
    assert_eq!(
        sources,
        ["198.51.100.0/24", "203.0.113.7/32", "2001:db8::/32"]
    );
    // `auto` passes through as the agent's keyword.
    let o = run(&["--advertise-address", "auto"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config = embedded_file(
        &String::from_utf8(o.stdout).unwrap(),
        "/etc/pilot/agent.yaml",
    );
    assert!(
        config.contains("  advertise_address: \"auto\"\n"),
        "{config}"
    );
}

#[test]
fn oversized_render_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("user-data");
    // Through a big password file...
    let pw = dir.path().join("big-pw");
    std::fs::write(&pw, "x".repeat(20_000)).unwrap();
    let o = run(&[
        "--db-host",
        "db",
        "--db-admin-user",
        "admin",
        "--db-admin-password-file",
        pw.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("16384"), "{err}");
    // The size: the password plus the rest of the template.
    let size: usize = err
        .split_whitespace()
        .find_map(|w| w.parse().ok().filter(|&n: &usize| n > 20_000))
        .unwrap_or_else(|| panic!("no size in: {err}"));
    assert!(size > 16384, "{err}");
    assert!(!out.exists(), "nothing may be written");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left"
    );

    // ...and through a long --extra-names list; an existing output stays as it was.
    std::fs::write(&out, "previous").unwrap();
    let names: Vec<String> = (0..1500).map(|i| format!("n{i}.example.com")).collect();
    let names = names.join(",");
    let o = run(&["--extra-names", &names, "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bytes, over EC2's user-data limit of 16384 bytes"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous");
}

#[test]
fn bad_flags_are_named_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("user-data");
    let o_arg = out.to_str().unwrap().to_owned();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--endpoint-token-sha256", "abc"],
            "--endpoint-token-sha256",
        ),
        (
            &["--db-host", "db", "--db-admin-user", "a", "--db-port", "0"],
            "--db-port",
        ),
        (
            &[
                "--db-host",
                "db",
                "--db-admin-user",
                "a",
                "--db-port",
                "70000",
            ],
            "--db-port",
        ),
        (&["--db-host", "", "--db-admin-user", "a"], "--db-host"),
        (&["--db-admin-user", "a"], "--db-host"),
        (&["--db-host", "db"], "--db-admin-user"),
        (&["--flavour", "stock"], "--agent-deb-url"),
        (
            &["--flavour", "stock", "--agent-deb-url", "http://x/a.deb"],
            "--agent-deb-url",
        ),
        (&["--agent-deb-url", "https://x/a.deb"], "--agent-deb-url"),
        (&["--runners", "99"], "--runners"),
        (&["--extra-names", "bad name"], "--extra-names"),
        (
            &[
                "--db-host",
                "db",
                "--db-admin-user",
                "a",
                "--db-admin-password-file",
                "/nonexistent/pw",
            ],
            "--db-admin-password-file",
        ),
        (&["--flavour", "azure"], "--flavour"),
        (&["--db-port", "abc"], "--db-port"),
        (&["--role", "worker"], "--role"),
        (
            &["--application-sources", "10.0.0.1/8"],
            "--application-sources",
        ),
        (
            &["--application-sources", "10.0.0.0/33"],
            "--application-sources",
        ),
        (
            &["--application-sources", "example.com"],
            "--application-sources",
        ),
        (&["--advertise-address", "host:0"], "--advertise-address"),
        // Runner-only flags with the (default) server role.
        (&["--server-endpoint", "10.0.1.5"], "--server-endpoint"),
        (
            &["--role", "server", "--server-ca-sha256", CA_PIN],
            "--server-ca-sha256",
        ),
        (
            &["--server-token-file", "/etc/hostname"],
            "--server-token-file",
        ),
        (
            &["--generate-endpoint-token", "runners"],
            "--generate-endpoint-token",
        ),
        (
            &["--generate-endpoint-token", "runners:superuser"],
            "--generate-endpoint-token",
        ),
        (
            &["--generate-endpoint-token", "bad name:read"],
            "--generate-endpoint-token",
        ),
        (
            &[
                "--generate-endpoint-token",
                "ops:admin",
                "--generate-endpoint-token",
                "ops:read",
            ],
            "--generate-endpoint-token",
        ),
        (
            &[
                "--endpoint-token-sha256",
                TOKEN_SHA256,
                "--generate-endpoint-token",
                "default:admin",
            ],
            "--generate-endpoint-token",
        ),
        (&["--endpoint-token", "prom:read"], "--endpoint-token"),
        (
            &[
                "--endpoint-token",
                &PROM_TOKEN_ARG.replace(":read:", ":write:"),
            ],
            "--endpoint-token",
        ),
        (
            &[
                "--endpoint-token-sha256",
                TOKEN_SHA256,
                "--endpoint-token",
                &format!("ops:admin:{TOKEN_SHA256}"),
            ],
            "--endpoint-token",
        ),
        (&["--endpoint-sources", "10.0.0.0/8"], "--endpoint-sources"),
        (
            &[
                "--endpoint-token-sha256",
                TOKEN_SHA256,
                "--endpoint-sources",
                "10.0.0.1/8",
            ],
            "--endpoint-sources",
        ),
        // A bad flag next to a token to generate: refused before any token is made.
        (
            &["--generate-endpoint-token", "ops:admin", "--runners", "99"],
            "--runners",
        ),
    ];
    for (args, flag) in cases {
        let mut all = args.to_vec();
        all.extend(["-o", &o_arg]);
        let o = run(&all);
        assert!(!o.status.success(), "{args:?} must fail");
        let err = stderr(&o);
        assert!(
            err.contains(flag),
            "{args:?}: error does not name {flag}: {err}"
        );
        assert!(
            token_lines(&err).is_empty(),
            "{args:?}: a token printed: {err}"
        );
        assert!(!out.exists(), "{args:?} wrote output");
    }
}

#[test]
fn bad_runner_flags_are_named_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("user-data");
    let o_arg = out.to_str().unwrap().to_owned();
    let base = runner_args(dir.path(), "aws");
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let spaced = dir.path().join("spaced-token");
    std::fs::write(&spaced, "two words\n").unwrap();
    // Each case: drop the flag named first (with its value) if given, then add the rest.
    let cases: &[(Option<&str>, &[&str], &str)] = &[
        (Some("--server-endpoint"), &[], "--server-endpoint"),
        (Some("--server-ca-sha256"), &[], "--server-ca-sha256"),
        (Some("--server-token-file"), &[], "--server-token-file"),
        (
            Some("--server-endpoint"),
            &["--server-endpoint", "bad host:8443"],
            "--server-endpoint",
        ),
        (
            Some("--server-endpoint"),
            &["--server-endpoint", "10.0.1.5:0"],
            "--server-endpoint",
        ),
        (
            Some("--server-ca-sha256"),
            &["--server-ca-sha256", "3F:9A:00"],
            "--server-ca-sha256",
        ),
        (
            Some("--server-ca-sha256"),
            &[
                "--server-ca-sha256",
                "zz9a00112233445566778899aabbccddeeff0123456789abcdef1032547698ba",
            ],
            "--server-ca-sha256",
        ),
        (
            Some("--server-token-file"),
            &["--server-token-file", "/nonexistent/token"],
            "--server-token-file",
        ),
        (
            Some("--server-token-file"),
            &["--server-token-file", empty.to_str().unwrap()],
            "--server-token-file",
        ),
        (
            Some("--server-token-file"),
            &["--server-token-file", spaced.to_str().unwrap()],
            "--server-token-file",
        ),
        (None, &["--db-host", "db"], "--db-host"),
        (None, &["--db-admin-user", "pilot_admin"], "--db-admin-user"),
        (None, &["--db-port", "5432"], "--db-port"),
        (None, &["--db-tls", "disable"], "--db-tls"),
        (
            None,
            &["--db-admin-password-file", "/etc/hostname"],
            "--db-admin-password-file",
        ),
        (
            None,
            &["--application-sources", "10.0.0.0/8"],
            "--application-sources",
        ),
        (
            None,
            &["--advertise-address", "auto"],
            "--advertise-address",
        ),
        (Some("--runners"), &["--runners", "0"], "--runners"),
    ];
    for (drop, extra, flag) in cases {
        let mut all: Vec<&str> = Vec::new();
        let mut it = base.iter().map(String::as_str);
        while let Some(a) = it.next() {
            if Some(a) == *drop {
                it.next();
            } else {
                all.push(a);
            }
        }
        all.extend_from_slice(extra);
        all.extend(["-o", &o_arg]);
        let o = run(&all);
        assert!(!o.status.success(), "{all:?} must fail");
        let err = stderr(&o);
        assert!(
            err.contains(flag),
            "{all:?}: error does not name {flag}: {err}"
        );
        assert!(
            !err.contains(SERVER_TOKEN),
            "{all:?}: the error shows the token"
        );
        assert!(!out.exists(), "{all:?} wrote output");
    }
}

#[test]
fn from_file_with_flag_override() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    let from = dir.path().join("deploy.json");
    let json = serde_json::json!({
        "flavour": "stock",
        "db_host": "file-db.example.internal",
        "db_admin_user": "pilot_admin",
        "db_admin_password_file": pw,
        "endpoint_token_sha256": TOKEN_SHA256.to_uppercase(),
        "agent_deb_url": "https://example.com/pilot-agent.deb",
        "extra_names": ["pilot.example.com"],
    });
    std::fs::write(&from, json.to_string()).unwrap();
    let o = run(&[
        "--from",
        from.to_str().unwrap(),
        "--db-host",
        "flag-db.example.internal",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let config = embedded_file(&text, "/etc/pilot/agent.yaml");
    assert!(
        config.contains("host: \"flag-db.example.internal\""),
        "{config}"
    );
    assert!(config.contains("\"pilot.example.com\""), "{config}");
    // The hash is normalised to lowercase.
    assert_eq!(
        embedded_file(&text, "/etc/pilot/endpoint-token.sha256"),
        format!("{TOKEN_SHA256}\n")
    );
    let file = dir.path().join("ud");
    std::fs::write(&file, &text).unwrap();
    cloud_init_schema(&file).unwrap();

    // An unknown key in the file is an error naming --from.
    std::fs::write(&from, r#"{"db_hots": "x"}"#).unwrap();
    let o = run(&["--from", from.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--from"), "{}", stderr(&o));
    assert!(stderr(&o).contains("db_hots"), "{}", stderr(&o));

    // The runner keys, with a flag overriding the endpoint.
    let token = dir.path().join("server-token");
    std::fs::write(&token, SERVER_TOKEN).unwrap();
    let json = serde_json::json!({
        "role": "runner",
        "server_endpoint": "file-server.example.internal",
        "server_ca_sha256": CA_PIN.replace(':', ""),
        "server_token_file": token,
        "runners": 2,
    });
    std::fs::write(&from, json.to_string()).unwrap();
    let o = run(&[
        "--from",
        from.to_str().unwrap(),
        "--server-endpoint",
        "10.0.1.5:9443",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let config = embedded_file(&text, "/etc/pilot/agent.yaml");
    assert!(config.contains("role: runner\n"), "{config}");
    assert!(
        config.contains("  endpoint: \"10.0.1.5:9443\"\n"),
        "{config}"
    );
    assert!(
        config.contains(&format!("  ca_sha256: \"{}\"\n", CA_PIN.to_uppercase())),
        "{config}"
    );
    assert_eq!(
        embedded_file(&text, "/etc/pilot/server-token"),
        format!("{SERVER_TOKEN}\n")
    );
    // The server keys in a file.
    let json = serde_json::json!({
        "advertise_address": "[2001:db8::7]:9701",
        "application_sources": ["198.51.100.0/24"],
    });
    std::fs::write(&from, json.to_string()).unwrap();
    let o = run(&["--from", from.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config = embedded_file(
        &String::from_utf8(o.stdout).unwrap(),
        "/etc/pilot/agent.yaml",
    );
    assert!(
        config.contains("  advertise_address: \"[2001:db8::7]:9701\"\n"),
        "{config}"
    );
    assert!(config.contains("    - \"198.51.100.0/24\"\n"), "{config}");
}

#[test]
fn generated_tokens_are_printed_once_and_only_their_hashes_land() {
    let agent = agent_bin();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("server.user-data");
    let mut args = full_args(dir.path(), "aws");
    args.extend(
        [
            "--generate-endpoint-token",
            "ops:admin",
            "--generate-endpoint-token",
            "runners:runner",
            "--endpoint-token",
            PROM_TOKEN_ARG,
            "--endpoint-sources",
            "10.0.1.0/24,203.0.113.7",
            "--endpoint-sources",
            "2001:db8::/32",
            "-o",
            out.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(o.stdout.is_empty(), "with -o nothing goes to stdout");
    let tokens = token_lines(&err);
    let shape: Vec<_> = tokens
        .iter()
        .map(|(n, s, _)| (n.as_str(), s.as_str()))
        .collect();
    assert_eq!(shape, [("ops", "admin"), ("runners", "runner")], "{err}");
    // The pairing: the runner token is named for the runner hosts' --server-token-file.
    assert!(
        err.lines().any(|l| l
            .starts_with("pilot-image user-data: endpoint token runners (scope runner)")
            && l.contains("--server-token-file")),
        "{err}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    cloud_init_schema(&out).unwrap_or_else(|e| panic!("{e}"));
    for (name, _, token) in &tokens {
        assert_eq!(token.len(), 43, "{token}");
        assert!(
            token
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{token}"
        );
        assert!(
            !text.contains(token.as_str()),
            "the token {name} is in the user-data"
        );
        assert_eq!(
            embedded_file(&text, &format!("/etc/pilot/endpoint-token-{name}.sha256")),
            format!("{}\n", sha256_hex(token))
        );
    }
    assert_eq!(
        embedded_file(&text, "/etc/pilot/endpoint-token-prom.sha256"),
        format!("{}\n", sha256_hex("test"))
    );
    // The legacy single token keeps its file.
    assert_eq!(
        embedded_file(&text, "/etc/pilot/endpoint-token.sha256"),
        format!("{TOKEN_SHA256}\n")
    );
    let config = embedded_file(&text, "/etc/pilot/agent.yaml");
    let y = &Yaml::load_from_str(&config).unwrap()[0];
    let listed: Vec<_> = y["endpoint"]["tokens"]
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
        listed,
        [
            ("prom", "read", "/etc/pilot/endpoint-token-prom.sha256"),
            ("ops", "admin", "/etc/pilot/endpoint-token-ops.sha256"),
            (
                "runners",
                "runner",
                "/etc/pilot/endpoint-token-runners.sha256"
            ),
        ]
    );
    let sources: Vec<_> = y["endpoint"]["sources"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(sources, ["10.0.1.0/24", "203.0.113.7/32", "2001:db8::/32"]);
    assert!(!config.contains(&sha256_hex(&tokens[0].2)), "{config}");
    let file = dir.path().join("server-agent.yaml");
    std::fs::write(&file, &config).unwrap();
    agent_validate(&agent, &file, "server with scoped tokens");

    // The runner token is what a runner-only host's user-data takes.
    let server_token = dir.path().join("runners.token");
    std::fs::write(&server_token, format!("{}\n", tokens[1].2)).unwrap();
    let mut args = runner_args(dir.path(), "aws");
    let i = args
        .iter()
        .position(|a| a == "--server-token-file")
        .unwrap();
    args[i + 1] = server_token.to_str().unwrap().into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let runner_text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        embedded_file(&runner_text, "/etc/pilot/server-token"),
        format!("{}\n", tokens[1].2)
    );

    // Every run makes new tokens; to stdout, the user-data alone is on stdout.
    let o = run(&["--generate-endpoint-token", "ops:admin"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let again = token_lines(&stderr(&o));
    assert_eq!(again.len(), 1);
    assert_ne!(again[0].2, tokens[0].2);
    // No hint for a token without the runner scope.
    assert!(!stderr(&o).contains("runner-only"), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(!text.contains(&again[0].2));
    assert_eq!(
        embedded_file(&text, "/etc/pilot/endpoint-token-ops.sha256"),
        format!("{}\n", sha256_hex(&again[0].2))
    );
}

#[test]
fn from_file_takes_scoped_tokens_and_sources() {
    let dir = tempfile::tempdir().unwrap();
    let from = dir.path().join("deploy.json");
    let json = serde_json::json!({
        "endpoint_tokens": [
            {"name": "prom", "scope": "read", "sha256": sha256_hex("test").to_uppercase()},
            format!("ops:admin:{TOKEN_SHA256}"),
        ],
        "generate_endpoint_tokens": ["runners:runner"],
        "endpoint_sources": ["10.0.1.0/24"],
    });
    std::fs::write(&from, json.to_string()).unwrap();
    let o = run(&["--from", from.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let tokens = token_lines(&stderr(&o));
    assert_eq!(tokens.len(), 1);
    assert_eq!((&tokens[0].0[..], &tokens[0].1[..]), ("runners", "runner"));
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        embedded_file(&text, "/etc/pilot/endpoint-token-prom.sha256"),
        format!("{}\n", sha256_hex("test"))
    );
    assert_eq!(
        embedded_file(&text, "/etc/pilot/endpoint-token-ops.sha256"),
        format!("{TOKEN_SHA256}\n")
    );
    let config = embedded_file(&text, "/etc/pilot/agent.yaml");
    assert!(
        config.contains("  sources:\n    - \"10.0.1.0/24\"\n"),
        "{config}"
    );
    assert!(!config.contains("token_sha256_file"), "{config}");
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, &config).unwrap();
    agent_validate(&agent_bin(), &file, "--from scoped tokens");
    // A flag replaces the file's list; an unknown key of a token object is refused.
    let o = run(&[
        "--from",
        from.to_str().unwrap(),
        "--endpoint-sources",
        "192.0.2.0/24",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config = embedded_file(
        &String::from_utf8(o.stdout).unwrap(),
        "/etc/pilot/agent.yaml",
    );
    assert!(
        config.contains("  sources:\n    - \"192.0.2.0/24\"\n"),
        "{config}"
    );
    std::fs::write(
        &from,
        r#"{"endpoint_tokens": [{"name": "a", "scope": "read", "sha256_file": "/x"}]}"#,
    )
    .unwrap();
    let o = run(&["--from", from.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("sha256_file"), "{}", stderr(&o));
}
