//! The real `pilot-agent` binary: the command-line contract (output format, exit codes) of the
//! commands that need no daemon.

use std::path::Path;
use std::process::{Command, Output};

fn agent(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pilot-agent"));
    cmd.args(args).env_remove("PILOT_AGENT_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run pilot-agent")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn validate_accepts_the_example() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agent.yaml");
    let out = agent(&["config", "validate", example.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}: ok\n", example.display()));
}

#[test]
fn validate_lists_every_problem_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(
        &file,
        "state_dir: relative\nhost:\n  hostnme: x\ndocker:\n  ready_timeout_secs: 0\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let out = agent(&["config", "validate", f], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("{f}:1:12: state_dir:")),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{f}:3:3: unknown key `hostnme` in `host` (did you mean `hostname`?)"
        )),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with(&format!("{f}:5:23: docker.ready_timeout_secs")),
        "{stdout}"
    );

    let out = agent(&["config", "validate", "/nonexistent/agent.yaml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("cannot read"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn up_and_firewall_with_a_bad_config_change_nothing_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = dir.path().join("agent.yaml");
    std::fs::write(
        &file,
        format!(
            "state_dir: {}\nfirewall:\n  lock_ports: [0]\n",
            state.display()
        ),
    )
    .unwrap();
    let out = agent(&["--config", file.to_str().unwrap(), "up"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(":3:16: firewall.lock_ports[0]"), "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert!(!state.exists(), "the state directory must not be created");

    // The configuration also comes from PILOT_AGENT_CONFIG.
    let out = agent(&["firewall"], &[("PILOT_AGENT_CONFIG", &file)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("firewall.lock_ports[0]"));
}

#[test]
fn missing_config_is_a_clear_error() {
    let out = agent(&["--config", "/nonexistent/agent.yaml", "up"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot read configuration /nonexistent/agent.yaml"),
        "{stderr}"
    );
}
