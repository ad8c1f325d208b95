use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::*;

/// The problems `yaml` is refused with, rendered (`LINE:COL: message`); the section tests
/// share it.
pub(crate) fn errors(yaml: &str) -> Vec<String> {
    Config::from_yaml(yaml)
        .expect_err("configuration should be rejected")
        .iter()
        .map(|d| d.to_string())
        .collect()
}

#[test]
fn empty_file_gives_defaults() {
    let c = Config::from_yaml("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/pilot-agent"));
    assert_eq!(
        c.docker.tls_listen,
        "0.0.0.0:2376".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        c.docker.daemon_config,
        PathBuf::from("/etc/docker/daemon.json")
    );
    assert_eq!(
        c.docker.service,
        ServiceConfig::Systemd {
            unit: "docker.service".into()
        }
    );
    assert_eq!(c.docker.ready_timeout_secs, 60);
    assert_eq!(c.pki.ca_validity_days, 3650);
    assert_eq!(c.pki.cert_validity_days, 397);
    assert_eq!(c.pki.renew_before_days, 30);
    assert_eq!(c.firewall.table, "pilot_agent");
    assert_eq!(c.firewall.lock_ports, vec![2375]);
    assert!(c.firewall.published_port_sources.is_empty());
    assert_eq!(c.host.exclude_interfaces, vec!["docker0", "br-*", "veth*"]);
    assert_eq!(c.host.hostname, None);
    assert_eq!(
        c.status_path(),
        PathBuf::from("/var/lib/pilot-agent/status.json")
    );
}

#[test]
fn comments_only_and_null_sections_give_defaults() {
    let c = Config::from_yaml("# nothing\nhost:\ndocker:\n  service:\n").unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn example_config_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agent.yaml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.host.hostname.as_deref(), Some("pilot-vm"));
    assert_eq!(
        c.host.extra_names,
        vec!["pilot.example.com", "203.0.113.10"]
    );
    assert_eq!(c.firewall.published_ports, vec![9701, 9702]);
    assert_eq!(c.firewall.published_port_sources.len(), 2);
    // Apart from the marked examples, the example documents the defaults.
    let defaults = Config::default();
    assert_eq!(c.state_dir, defaults.state_dir);
    assert_eq!(c.pki, defaults.pki);
    assert_eq!(c.docker, defaults.docker);
    assert_eq!(c.firewall.table, defaults.firewall.table);
    assert_eq!(c.firewall.lock_ports, defaults.firewall.lock_ports);
    assert_eq!(c.host.exclude_interfaces, defaults.host.exclude_interfaces);
    assert_eq!(c.role, Role::Server);
    assert_eq!(
        c.waypoint,
        Some(WaypointConfig {
            application_sources: vec!["198.51.100.0/24".parse().unwrap()],
            ..WaypointConfig::default()
        })
    );
    let db = c.database.expect("the example has a database section");
    let db_defaults =
        crate::database::DatabaseSettings::new(db.host.clone(), db.admin_user.clone());
    assert_eq!(db.port, db_defaults.port);
    assert_eq!(db.app_role, db_defaults.app_role);
    assert_eq!(db.app_database, db_defaults.app_database);
    assert_eq!(db.tls, db_defaults.tls);
    assert_eq!(db.connect_timeout_secs, db_defaults.connect_timeout_secs);
    assert_eq!(
        db.statement_timeout_secs,
        db_defaults.statement_timeout_secs
    );
    assert_eq!(
        db.admin_password_file,
        Some(PathBuf::from("/etc/pilot/db-admin-password"))
    );
    // The endpoint's defaults, but for the example source.
    let endpoint = c.endpoint.expect("the example has an endpoint section");
    assert_eq!(
        endpoint,
        EndpointConfig {
            sources: vec!["198.51.100.0/24".parse().unwrap()],
            ..EndpointConfig::default()
        }
    );
}

#[test]
fn waypoint_and_database_sections_are_optional_and_their_presence_counts() {
    let c = Config::from_yaml("state_dir: /x\n").unwrap();
    assert_eq!(c.waypoint, None);
    assert_eq!(c.database, None);
    let c = Config::from_yaml("waypoint:\n").unwrap();
    assert_eq!(c.waypoint, Some(WaypointConfig::default()));
    let c = Config::from_yaml(
        "waypoint:\n  runners: 3\n  images_dir: /srv/images\n  network:\n    subnet: 10.77.0.0/16\n\
         database:\n  host: 10.0.0.9\n  admin_user: root\n  admin_password: hunter22\n  tls: disable\n",
    )
    .unwrap();
    let w = c.waypoint.unwrap();
    assert_eq!(w.runners, 3);
    assert_eq!(w.images_dir, PathBuf::from("/srv/images"));
    assert_eq!(w.network.gateway.to_string(), "10.77.0.1");
    let d = c.database.unwrap();
    assert_eq!(d.host, "10.0.0.9");
    assert_eq!(d.tls, crate::database::TlsMode::Disable);
    assert_eq!(
        d.admin_password.as_ref().map(|p| p.expose()),
        Some("hunter22")
    );
    // Debug output (logs) never shows the inline password.
    assert!(!format!("{d:?}").contains("hunter22"));
}

#[test]
fn waypoint_and_database_errors_have_line_and_column() {
    let yaml = "\
waypoint:
  server_image: Pilot/Waypoint
  runners: 99
  http_port: 2376
  network:
    name: host
    subnet: 172.29.0.0/30
  volume: \"my volume\"
database:
  port: 5432
  app_role: Bad-Name
  tls: maybe
";
    let errs = errors(yaml);
    let expected = [
        "2:17: waypoint.server_image: the repository must be lowercase",
        "3:12: waypoint.runners: must be between 0 and 32, got 99",
        "4:14: waypoint.http_port: 2376 is docker.tls_listen's port",
        "6:11: waypoint.network.name: \"host\" is one of Docker's predefined networks",
        "7:13: waypoint.network.subnet: 172.29.0.0/30 is too small",
        "8:11: waypoint.volume: expected a name of letters",
        "10:3: database.host is required",
        "10:3: database.admin_user is required",
        "12:8: database.tls: expected one of disable, require, verify-full, got \"maybe\"",
    ];
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    for (got, want) in errs.iter().zip(expected) {
        assert!(got.starts_with(want), "got  {got}\nwant {want}…");
    }

    // Field rules of the provisioning module come back with the key's position.
    let errs = errors("database:\n  host: db\n  admin_user: pilot\n  app_role: Bad-Name\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("4:13: database.app_role: \"Bad-Name\" is not a valid name"),
        "{errs:#?}"
    );
    let errs = errors(
        "database:\n  host: db\n  admin_user: pilot\n  admin_password: x\n  admin_password_file: /p\n",
    );
    assert!(
        errs[0].starts_with("5:24: database.admin_password_file: set either"),
        "{errs:#?}"
    );
}

#[test]
fn harness_style_config() {
    let c = Config::from_yaml(
        "state_dir: /tmp/vm1/state\n\
         docker:\n  socket: /tmp/vm1/docker.sock\n  daemon_config: /tmp/vm1/daemon.json\n\
         \x20 service:\n    manager: command\n    restart_command: [/bin/restart, vm1]\n\
         firewall:\n  docker_api_sources: [10.99.0.0/24, 10.98.0.7, \"fd00::/8\"]\n",
    )
    .unwrap();
    assert_eq!(
        c.docker.service,
        ServiceConfig::Command {
            restart_command: vec!["/bin/restart".into(), "vm1".into()]
        }
    );
    assert_eq!(c.docker.socket, PathBuf::from("/tmp/vm1/docker.sock"));
    let sources: Vec<String> = c
        .firewall
        .docker_api_sources
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(sources, vec!["10.99.0.0/24", "10.98.0.7/32", "fd00::/8"]);
}

#[test]
fn every_error_is_reported_with_line_and_column() {
    let yaml = "\
state_dir: relative/dir
host:
  hostname: 42
  extra_names: [ok.example, \"not a name\"]
pki:
  cert_validity_days: ten
docker:
  tsl_listen: 0.0.0.0:2376
  tls_listen: 0.0.0.0
  service:
    manager: upstart
firewall:
  lock_ports: [2375, 70000]
  docker_api_sources: [10.0.0.1/8, banana]
bogus: 1
";
    let errs = errors(yaml);
    let expected = [
        "1:12: state_dir: expected an absolute path, got \"relative/dir\"",
        "3:13: host.hostname: expected a string, got the integer 42",
        "4:29: host.extra_names[1]: expected a DNS name or an IP address, got \"not a name\"",
        "6:23: pki.cert_validity_days: expected an integer, got the string \"ten\"",
        "8:3: unknown key `tsl_listen` in `docker` (did you mean `tls_listen`?)",
        "9:15: docker.tls_listen: expected ADDRESS:PORT",
        "11:14: docker.service.manager: expected one of systemd, command, got \"upstart\"",
        "13:22: firewall.lock_ports[1]: a port must be between 1 and 65535, got 70000",
        "14:24: firewall.docker_api_sources[0]: \"10.0.0.1/8\" has bits set after the prefix \
         length; did you mean \"10.0.0.0/8\"?",
        "14:36: firewall.docker_api_sources[1]: expected a network in CIDR notation",
        "15:1: unknown key `bogus`",
    ];
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    for (got, want) in errs.iter().zip(expected) {
        assert!(got.starts_with(want), "got  {got}\nwant {want}…");
    }
}

#[test]
fn load_prefixes_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("agent.yaml");
    std::fs::write(&p, "pki:\n  renew_before_days: -1\nfoo: 1\n").unwrap();
    let err = Config::load(&p).unwrap_err();
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with(&format!("{}:2:22: pki.renew_before_days", p.display())),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&format!("{}:3:1: unknown key `foo`", p.display())),
        "{text}"
    );
}

#[test]
fn yaml_syntax_error_has_position() {
    let errs = errors("docker:\n  socket: [unclosed\nfirewall: {}\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("invalid YAML"), "{errs:?}");
    let line: usize = errs[0].split(':').next().unwrap().parse().unwrap();
    assert!(line >= 2, "{errs:?}");
}

#[test]
fn duplicate_keys_are_rejected() {
    let errs = errors("state_dir: /a\nstate_dir: /b\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("2:1:"), "{errs:?}");
    assert!(errs[0].contains("duplicated key"), "{errs:?}");
}

#[test]
fn wrong_shapes() {
    let errs = errors("- a\n- b\n");
    assert_eq!(
        errs,
        vec!["1:1: the configuration: expected a mapping, got a list"]
    );
    let errs = errors("docker: 5\nfirewall:\n  lock_ports: 2375\n");
    assert_eq!(
        errs,
        vec![
            "1:9: docker: expected a mapping, got the integer 5",
            "3:15: firewall.lock_ports: expected a list, got the integer 2375",
        ]
    );
    let errs = errors("a: 1\n---\nb: 2\n");
    assert!(
        errs.iter().any(|e| e.contains("single YAML document")),
        "{errs:?}"
    );
}

#[test]
fn service_manager_rules() {
    let errs = errors("docker:\n  service:\n    manager: command\n");
    assert_eq!(
        errs,
        vec!["3:14: docker.service.restart_command is required with `manager: command`"]
    );
    let errs = errors("docker:\n  service:\n    restart_command: [x]\n");
    assert_eq!(
        errs,
        vec!["3:22: docker.service.restart_command is used only with `manager: command`"]
    );
    let errs = errors("docker:\n  service:\n    manager: command\n    restart_command: []\n");
    assert_eq!(
        errs,
        vec!["4:22: docker.service.restart_command must not be empty"]
    );
}

#[test]
fn cross_field_checks() {
    let errs = errors("docker:\n  tls_listen: 0.0.0.0:2375\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("2:15: firewall.lock_ports must not contain"),
        "{errs:?}"
    );

    let errs = errors("pki:\n  cert_validity_days: 20\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("2:23: pki.renew_before_days (30) must be less"),
        "{errs:?}"
    );

    let errs = errors("firewall:\n  published_ports: [9702]\n");
    assert!(errs[0].contains("no effect without"), "{errs:?}");

    let errs = errors("firewall:\n  table: 9bad-name\n");
    assert!(errs[0].starts_with("2:10: firewall.table"), "{errs:?}");
}

#[test]
fn values_are_not_coerced() {
    // YAML 1.2: `yes` is a string, "2375" is a string; neither is silently converted.
    let errs = errors("firewall:\n  lock_ports: [\"2375\"]\n");
    assert_eq!(
        errs,
        vec!["2:16: firewall.lock_ports[0]: expected a port number, got the string \"2375\""]
    );
}

#[test]
fn api_sources_include_docker_networks() {
    let c = Config::from_yaml(
        "firewall:\n  docker_api_sources: [198.51.100.0/24]\n  docker_networks: [172.30.0.0/24]\n",
    )
    .unwrap();
    let all: Vec<String> = c
        .docker_api_allowed_sources()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(all, vec!["198.51.100.0/24", "172.30.0.0/24"]);
}

#[test]
fn runner_role_needs_a_server_section_and_no_database() {
    let pin = "AB:".repeat(31) + "AB";
    let ok = Config::from_yaml(&format!(
        "role: runner\nserver:\n  endpoint: \"[2001:db8::5]:9443\"\n  ca_sha256: \"{pin}\"\n  \
         token_file: /run/t\n  waypoint_address: pilot.internal:9701\nwaypoint:\n  runners: 3\n"
    ))
    .unwrap();
    assert_eq!(ok.role, Role::Runner);
    let link = ok.server.as_ref().unwrap();
    assert_eq!(link.endpoint.to_string(), "[2001:db8::5]:9443");
    assert_eq!(link.ca_sha256.to_string(), pin);
    assert_eq!(link.token_file, PathBuf::from("/run/t"));
    assert_eq!(
        link.waypoint_address.as_deref(),
        Some("pilot.internal:9701")
    );
    assert_eq!(ok.waypoint.as_ref().unwrap().runners, 3);
    assert_eq!(link.deregister, super::Deregister::Shutdown);
    for (written, want) in [
        ("stop", super::Deregister::Stop),
        ("never", super::Deregister::Never),
        ("shutdown", super::Deregister::Shutdown),
    ] {
        let c = Config::from_yaml(&format!(
            "role: runner\nserver:\n  endpoint: a\n  ca_sha256: \"{pin}\"\n  deregister: {written}\n"
        ))
        .unwrap();
        assert_eq!(c.server.unwrap().deregister, want);
    }
    let e = errors(&format!(
        "role: runner\nserver:\n  endpoint: a\n  ca_sha256: \"{pin}\"\n  deregister: always\n"
    ));
    assert_eq!(
        e,
        vec!["5:15: server.deregister: expected shutdown, stop or never, got \"always\""]
    );
    // Runner hosts run no Waypoint server, so the firewall restricts no gRPC port.
    assert_eq!(ok.waypoint_allowed_sources(), None);

    let e = errors("role: runner\n");
    assert!(e[0].contains("needs a `server:` section"), "{e:?}");
    let e = errors("role: worker\n");
    assert!(e[0].contains("expected `server` or `runner`"), "{e:?}");
    let e = errors("server:\n  endpoint: a\n");
    assert!(e[0].contains("add `role: runner`"), "{e:?}");
    let e = errors("role: runner\nserver:\n  endpoint: a\n");
    assert!(
        e.iter().any(|m| m.contains("server.ca_sha256 is required")),
        "{e:?}"
    );
    let e = errors("role: runner\nserver:\n  ca_sha256: xyz\n  endpoint: 'bad host:1'\n");
    assert!(
        e.iter()
            .any(|m| m.contains("server.ca_sha256: expected 64 hex digits")),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.contains("server.endpoint:")), "{e:?}");
    let e = errors(&format!(
        "role: runner\nserver:\n  endpoint: a\n  ca_sha256: \"{pin}\"\ndatabase:\n  host: db\n"
    ));
    assert!(
        e.iter().any(|m| m.contains("provisioned by the server VM")),
        "{e:?}"
    );
}

#[test]
fn waypoint_advertise_address_and_application_sources() {
    use super::waypoint::Advertise;
    let c = Config::from_yaml(
        "waypoint:\n  advertise_address: pilot.example.com\n  grpc_port: 19701\n  \
         application_sources: [198.51.100.0/24]\nfirewall:\n  docker_api_sources: \
         [192.0.2.7/32]\n",
    )
    .unwrap();
    let w = c.waypoint.as_ref().unwrap();
    assert_eq!(
        w.advertise,
        Advertise::Fixed {
            host: "pilot.example.com".into(),
            port: 19701
        }
    );
    let (ports, sources) = c.waypoint_allowed_sources().unwrap();
    assert_eq!(ports, [19701, 9702]);
    let sources: Vec<String> = sources.iter().map(|n| n.to_string()).collect();
    // Applications, operators, and the Pilot network's subnet (hairpin from containers).
    assert_eq!(
        sources,
        ["198.51.100.0/24", "192.0.2.7/32", "172.29.0.0/24"]
    );
    assert_eq!(
        Config::from_yaml("waypoint:\n  advertise_address: auto\n")
            .unwrap()
            .waypoint
            .unwrap()
            .advertise,
        Advertise::Auto
    );
    let e = errors("waypoint:\n  advertise_address: 'x y:1'\n");
    assert!(e[0].contains("waypoint.advertise_address:"), "{e:?}");
    let e = errors("waypoint:\n  advertise_address: 0.0.0.0\n");
    assert!(e[0].contains("cannot be dialled"), "{e:?}");
    let e = errors("waypoint:\n  application_sources: [nonsense]\n");
    assert!(e[0].contains("waypoint.application_sources"), "{e:?}");
}
