//! One grammar for configuration values: for every key that `pilot-image user-data` writes
//! into the agent's configuration, a value is accepted by the image exactly when the real
//! `pilot-agent config validate` accepts it at that key. Both binaries run over one table of
//! good, bad and borderline spellings; a disagreement names the key, the value and both
//! verdicts. (Both programs take the rules from `pilot-values`; this shows it holds end to
//! end, through clap, the YAML the image renders and the agent's loader.)

use std::path::Path;
use std::process::Command;

mod support;

use support::{BIN, agent_bin};

const TOKEN_SHA256: &str = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
const CA_PIN: &str = "3F:9A:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:01:23:45:67:89:AB:CD:EF:10:32:54:76:98:BA";

/// A key of the agent's configuration and the `pilot-image user-data` flag that sets it.
struct Key {
    flag: &'static str,
    /// The flag's value holding `{}` (the value under test): `{}` for a flag that is the key,
    /// e.g. `{}:runner` for the name part of `--generate-endpoint-token NAME:SCOPE`.
    arg: &'static str,
    /// The agent configuration holding `{}` (a YAML scalar) at the key.
    yaml: &'static str,
    /// The other flags of a rendering that is valid apart from this one.
    runner_host: bool,
}

/// Whether `pilot-image user-data` accepts `value` for `key` (with valid other flags).
fn image_accepts(dir: &Path, key: &Key, value: &str) -> bool {
    let pw = dir.join("pw");
    let token = dir.join("server-token");
    std::fs::write(&pw, "secret\n").unwrap();
    std::fs::write(&token, "pilot-server-token\n").unwrap();
    let mut args: Vec<String> = if key.runner_host {
        vec![
            "--role=runner".into(),
            "--server-endpoint=10.0.0.5:8443".into(),
            format!("--server-ca-sha256={CA_PIN}"),
            format!("--server-token-file={}", token.display()),
            "--runners=1".into(),
        ]
    } else {
        vec![
            "--db-host=db.example.com".into(),
            "--db-admin-user=pilot_admin".into(),
            format!("--db-admin-password-file={}", pw.display()),
            "--runners=2".into(),
        ]
    };
    args.push("--flavour=aws".into());
    args.push(format!("--endpoint-token-sha256={TOKEN_SHA256}"));
    // The flag under test replaces its default from above.
    args.retain(|a| !a.starts_with(&format!("{}=", key.flag)));
    args.push(format!("{}={}", key.flag, key.arg.replace("{}", value)));
    let out = Command::new(BIN)
        .arg("user-data")
        .args(&args)
        .arg("-o")
        .arg(dir.join("user-data"))
        .output()
        .expect("run pilot-image");
    let refused_by_clap = String::from_utf8_lossy(&out.stderr).contains("Usage:");
    assert!(
        !refused_by_clap,
        "{} {value:?}: clap refused the spelling itself; pick values that reach the check: {}",
        key.flag,
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

/// Whether `pilot-agent config validate` accepts `value` at `key`.
fn agent_accepts(dir: &Path, key: &Key, value: &str) -> bool {
    // A JSON string is a YAML double-quoted scalar with the same escapes.
    let scalar = serde_json::to_string(value).unwrap();
    let scalar = if key.flag == "--runners" {
        value.to_string()
    } else {
        scalar
    };
    let file = dir.join("agent.yaml");
    std::fs::write(&file, key.yaml.replace("{}", &scalar)).unwrap();
    let out = Command::new(agent_bin())
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run pilot-agent");
    out.status.success()
}

const HOSTS: &[&str] = &[
    "pilot.example.com",
    "pilot.example.com.",
    "localhost",
    "203.0.113.9",
    "2001:db8::1",
    "0.0.0.0",
    "-bad.example",
    "bad-.example",
    "bad_host",
    "a..b",
    "ex ample",
    "é.example",
    "[::1]",
    "",
];

const HOST_PORTS: &[&str] = &[
    "pilot.example.com",
    "Pilot.Example.com.",
    "pilot.example.com:19701",
    "203.0.113.7:9701",
    "[2001:db8::1]:9701",
    "[2001:db8::1]",
    "2001:db8::1",
    "host:0",
    "host:65536",
    "host:+80",
    "host:",
    "0.0.0.0",
    "[::]:1",
    "[::1",
    "[::1]x",
    "[nothost]:1",
    "bad host:1",
    "bad_host:1",
];

const CIDRS: &[&str] = &[
    "198.51.100.0/24",
    "203.0.113.7",
    "2001:db8::/32",
    "::/0",
    "0.0.0.0/0",
    "10.0.0.1/8",
    "10.0.0.0/33",
    "10.0.0.0/",
    "10.0.0.0/+8",
    "10.0.0.0/08",
    "10.0.0/8",
    "x",
];

/// `endpoint.sources` with the token every rendering above has.
const ENDPOINT_SOURCES_YAML: &str = "endpoint:\n  token_sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n  sources: [{}]\n";

/// Token names (`endpoint.tokens[].name`); `default` is taken by the single-token form.
const TOKEN_NAMES: &[&str] = &[
    "runners",
    "runner-pool",
    "ops.1",
    "A_b",
    "9lives",
    "Default",
    "default",
    "",
    "-a",
    ".a",
    "_a",
    "a b",
    "a/b",
    "a:b",
    "a,b",
    "é",
    "a\tb",
];

fn long_names() -> [String; 2] {
    ["x".repeat(64), "x".repeat(65)]
}

/// Scopes (`endpoint.tokens[].scope`).
const SCOPES: &[&str] = &[
    "admin", "runner", "read", "Admin", "RUNNER", "root", "write", "", " read", "read ",
];

#[test]
fn image_and_agent_accept_the_same_values() {
    let dir = tempfile::tempdir().unwrap();
    let long_label = format!("{}.example", "a".repeat(64));
    let hex = "ab".repeat(32);
    let pairs = ["ab"; 32].join(":");
    let table: Vec<(Key, Vec<String>)> = vec![
        (
            Key {
                flag: "--extra-names",
                arg: "{}",
                yaml: "host:\n  extra_names: [{}]\n",
                runner_host: false,
            },
            HOSTS
                .iter()
                .filter(|h| !h.is_empty())
                .map(|s| s.to_string())
                .chain([long_label.clone()])
                .collect(),
        ),
        (
            Key {
                flag: "--db-host",
                arg: "{}",
                yaml: "database:\n  host: {}\n  admin_user: pilot_admin\n",
                runner_host: false,
            },
            HOSTS
                .iter()
                .map(|s| s.to_string())
                .chain([long_label])
                .collect(),
        ),
        (
            Key {
                flag: "--advertise-address",
                arg: "{}",
                yaml: "waypoint:\n  advertise_address: {}\n",
                runner_host: false,
            },
            HOST_PORTS
                .iter()
                .map(|s| s.to_string())
                .chain(["auto".to_string()])
                .collect(),
        ),
        (
            Key {
                flag: "--server-endpoint",
                arg: "{}",
                yaml: "role: runner\nserver:\n  endpoint: {}\n  ca_sha256: \"3f9a00112233445566778899aabbccddeeff0123456789abcdef1032547698ba\"\nwaypoint:\n  runners: 1\n",
                runner_host: true,
            },
            HOST_PORTS.iter().map(|s| s.to_string()).collect(),
        ),
        (
            Key {
                flag: "--application-sources",
                arg: "{}",
                yaml: "waypoint:\n  application_sources: [{}]\n",
                runner_host: false,
            },
            CIDRS.iter().map(|s| s.to_string()).collect(),
        ),
        (
            Key {
                flag: "--server-ca-sha256",
                arg: "{}",
                yaml: "role: runner\nserver:\n  endpoint: 10.0.0.5\n  ca_sha256: {}\nwaypoint:\n  runners: 1\n",
                runner_host: true,
            },
            vec![
                hex.clone(),
                hex.to_uppercase(),
                pairs.clone(),
                format!("sha256 Fingerprint={pairs}"),
                format!("SHA256 Fingerprint={}", pairs.to_uppercase()),
                format!(" {hex} "),
                hex[1..].to_string(),
                format!("{hex}a"),
                "zz".repeat(32),
                ["ab"; 31].join(":"),
                format!("{pairs}:"),
                format!("{}:a:b", ["ab"; 31].join(":")),
            ],
        ),
        (
            Key {
                flag: "--db-admin-user",
                arg: "{}",
                yaml: "database:\n  host: db.example.com\n  admin_user: {}\n",
                runner_host: false,
            },
            vec![
                "pilot_admin".into(),
                "Admin-User".into(),
                "postgres".into(),
                "a".repeat(63),
                "a".repeat(64),
                "a\tb".into(),
                "é".into(),
            ],
        ),
        (
            Key {
                flag: "--runners",
                arg: "{}",
                yaml: "waypoint:\n  runners: {}\n",
                runner_host: false,
            },
            ["0", "1", "32", "33", "1000"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        (
            Key {
                flag: "--endpoint-token-sha256",
                arg: "{}",
                yaml: "endpoint:\n  token_sha256: {}\n",
                runner_host: false,
            },
            vec![
                TOKEN_SHA256.into(),
                TOKEN_SHA256.to_uppercase(),
                TOKEN_SHA256[1..].into(),
                format!("{TOKEN_SHA256}0"),
                "g".repeat(64),
            ],
        ),
        (
            Key {
                flag: "--endpoint-sources",
                arg: "{}",
                yaml: ENDPOINT_SOURCES_YAML,
                runner_host: false,
            },
            CIDRS.iter().map(|s| s.to_string()).collect(),
        ),
        (
            Key {
                flag: "--endpoint-sources",
                arg: "{}",
                yaml: ENDPOINT_SOURCES_YAML,
                runner_host: true,
            },
            ["10.0.1.0/24", "10.0.1.1/24", "2001:db8::5"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        // The token of --endpoint-token-sha256 (always given above) is `default` in both.
        (
            Key {
                flag: "--generate-endpoint-token",
                arg: "{}:runner",
                yaml: "endpoint:\n  token_sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n  tokens: [{ name: {}, scope: runner, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }]\n",
                runner_host: false,
            },
            TOKEN_NAMES
                .iter()
                .map(|s| s.to_string())
                .chain(long_names())
                .collect(),
        ),
        (
            Key {
                flag: "--generate-endpoint-token",
                arg: "ops:{}",
                yaml: "endpoint:\n  token_sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n  tokens: [{ name: ops, scope: {}, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }]\n",
                runner_host: true,
            },
            SCOPES.iter().map(|s| s.to_string()).collect(),
        ),
        (
            Key {
                flag: "--endpoint-token",
                arg: "{}:read:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                yaml: "endpoint:\n  token_sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n  tokens: [{ name: {}, scope: read, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }]\n",
                runner_host: false,
            },
            TOKEN_NAMES
                .iter()
                .map(|s| s.to_string())
                .chain(long_names())
                .collect(),
        ),
        (
            Key {
                flag: "--endpoint-token",
                arg: "prom:{}:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                yaml: "endpoint:\n  token_sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n  tokens: [{ name: prom, scope: {}, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }]\n",
                runner_host: false,
            },
            SCOPES.iter().map(|s| s.to_string()).collect(),
        ),
        (
            Key {
                flag: "--endpoint-token",
                arg: "prom:read:{}",
                yaml: "endpoint:\n  token_sha256: 2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n  tokens: [{ name: prom, scope: read, sha256: {} }]\n",
                runner_host: true,
            },
            vec![
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08".into(),
                " 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 ".into(),
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0".into(),
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a080".into(),
                "g".repeat(64),
                // The hash of --endpoint-token-sha256's token: one hash, two scopes.
                TOKEN_SHA256.into(),
                TOKEN_SHA256.to_uppercase(),
                String::new(),
            ],
        ),
    ];
    let mut disagreements = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for (key, values) in &table {
        for value in values {
            let image = image_accepts(dir.path(), key, value);
            let agent = agent_accepts(dir.path(), key, value);
            if image != agent {
                disagreements.push(format!(
                    "{} {value:?}: image {}, agent {}",
                    key.flag,
                    if image { "accepts" } else { "refuses" },
                    if agent { "accepts" } else { "refuses" },
                ));
            } else if image {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "the image and the agent disagree:\n{}",
        disagreements.join("\n")
    );
    // Both verdicts occur for every key's table, so the comparison is not vacuous.
    assert!(
        accepted >= 20 && refused >= 30,
        "{accepted} accepted, {refused} refused"
    );
}
