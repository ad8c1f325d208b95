//! Cloud identity through a whole `up` pass against the harness's metadata server (IMDSv2,
//! IMDSv1-only, GCE, slow, absent): the identity step's bound, `status.json`'s `identity`
//! object, the public names in the server certificate, and the clone marker (a state
//! directory copied to another instance gets new keys; the same instance changes nothing).
//!
//! The pass runs in-process with nft pointed at a missing binary: the firewall step fails
//! and the Docker steps are skipped, so nothing on this machine is touched, while the
//! identity and pki steps run for real. `status --long` is checked on the real binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilot_agent::config::Config;
use pilot_agent::config::cloud::ProviderSetting;
use pilot_agent::engine::Engine;
use pilot_agent::firewall::Nft;
use pilot_agent::plan::{self, Ctx, UpOptions};
use pilot_agent::status_file::{Status, StepState};
use pilot_harness::metadata::{Flavor, Imds, MetadataOptions, MetadataServer, absent_url};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

struct Host {
    dir: tempfile::TempDir,
    config: Config,
}

impl Host {
    fn new(provider: ProviderSetting, metadata_url: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            state_dir: dir.path().join("state"),
            ..Config::default()
        };
        config.docker.daemon_config = dir.path().join("daemon.json");
        config.docker.systemd_dropin_dir = dir.path().join("dropin");
        config.host.hostname = Some("pilot-vm".into());
        config.cloud.provider = provider;
        config.cloud.metadata_url = metadata_url.to_string();
        std::fs::create_dir_all(&config.state_dir).unwrap();
        Host { dir, config }
    }

    /// A copy of this host's state directory on another host (same configuration otherwise).
    fn clone_state(&self) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let mut config = self.config.clone();
        config.state_dir = dir.path().join("state");
        config.docker.daemon_config = dir.path().join("daemon.json");
        config.docker.systemd_dropin_dir = dir.path().join("dropin");
        let ok = Command::new("cp")
            .args(["-a"])
            .arg(&self.config.state_dir)
            .arg(&config.state_dir)
            .status()
            .unwrap();
        assert!(ok.success());
        Host { dir, config }
    }

    /// One `up` pass (identity, firewall, pki; Docker steps skipped); returns the status and
    /// how long the identity step took.
    async fn pass(&self) -> (Status, Duration) {
        let mut ctx = Ctx::new(self.config.clone(), UpOptions::default());
        ctx.nft = Nft::with_argv(vec!["/nonexistent/nft".into()]);
        let engine = Engine::new("up", plan::up_steps(&self.config))
            .unwrap()
            .with_status_file(self.config.status_path())
            .with_annotation(plan::annotate_status);
        let status = engine.run(Arc::new(ctx)).await.unwrap();
        let step = status.step(plan::IDENTITY).unwrap();
        let took = (step.finished_at.unwrap() - step.started_at.unwrap())
            .try_into()
            .unwrap();
        // The firewall cannot run here; the pki step must not have waited on identity.
        assert_eq!(status.step(plan::FIREWALL).unwrap().state, StepState::Error);
        let pki = status.step(plan::PKI).unwrap();
        assert!(pki.state.is_converged(), "{pki:?}");
        (status, took)
    }

    fn state(&self) -> &Path {
        &self.config.state_dir
    }

    fn status_json(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.config.status_path()).unwrap()).unwrap()
    }

    fn server_sans(&self) -> Vec<String> {
        let pem = std::fs::read(self.state().join("pki/server/cert.pem")).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = der.parse_x509().unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        sans.value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) if ip.len() == 4 => {
                    std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// SHA-256 of every file under the state directory but the status and the lock.
    fn hashes(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.state().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if !matches!(
                    p.file_name().and_then(|n| n.to_str()),
                    Some("status.json" | "lock")
                ) {
                    let digest = Sha256::digest(std::fs::read(&p).unwrap());
                    let rel = p.strip_prefix(self.state()).unwrap().to_path_buf();
                    out.insert(rel, format!("{digest:x}"));
                }
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_identity_feeds_status_sans_and_marker() {
    let server = MetadataServer::start(MetadataOptions::aws("i-0aaaaaaaaaaaaaaa1")).unwrap();
    let host = Host::new(ProviderSetting::Auto, &server.url());
    let (status, took) = host.pass().await;
    assert!(took < Duration::from_secs(3), "{took:?}");
    let step = status.step(plan::IDENTITY).unwrap();
    assert_eq!(step.state, StepState::Ok, "{}", step.detail);
    assert!(
        step.detail.contains("aws instance i-0aaaaaaaaaaaaaaa1"),
        "{}",
        step.detail
    );

    let v = host.status_json();
    let id = &v["identity"];
    assert_eq!(id["provider"], "aws", "{v:#}");
    assert_eq!(id["configured"], "auto");
    assert_eq!(id["instance_id"], "i-0aaaaaaaaaaaaaaa1");
    assert_eq!(id["region"], "eu-west-1");
    assert_eq!(id["private_ipv4"], "10.0.1.23");
    assert_eq!(id["public_ipv4"], "203.0.113.45");
    assert_eq!(
        id["public_hostname"],
        "ec2-203-0-113-45.eu-west-1.compute.amazonaws.com"
    );
    assert!(id.get("problem").is_none());

    let sans = host.server_sans();
    for want in [
        "203.0.113.45",
        "10.0.1.23",
        "ec2-203-0-113-45.eu-west-1.compute.amazonaws.com",
        "ip-10-0-1-23.eu-west-1.compute.internal",
        "pilot-vm",
    ] {
        assert!(sans.iter().any(|s| s == want), "{want} not in {sans:?}");
    }
    assert_eq!(
        std::fs::read_to_string(host.state().join("instance-id")).unwrap(),
        "aws i-0aaaaaaaaaaaaaaa1\n"
    );

    // `pilot-agent status --long` shows the identity.
    let cfg = host.dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir: {}\ncloud:\n  provider: none\n",
            host.state().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pilot-agent"))
        .args(["--config"])
        .arg(&cfg)
        .args(["status", "--long"])
        .env("COLUMNS", "200")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "identity:",
        "provider         aws (cloud.provider: auto)",
        "instance id      i-0aaaaaaaaaaaaaaa1",
        "region           eu-west-1 (zone eu-west-1b)",
        "public ipv4      203.0.113.45",
        "private ipv4     10.0.1.23",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_identity_in_status() {
    let server = MetadataServer::start(MetadataOptions::gcp("7251938465120984375")).unwrap();
    let host = Host::new(ProviderSetting::Gcp, &server.url());
    let (status, _) = host.pass().await;
    assert_eq!(status.step(plan::IDENTITY).unwrap().state, StepState::Ok);
    let id = &host.status_json()["identity"];
    assert_eq!(id["provider"], "gcp");
    assert_eq!(id["instance_id"], "7251938465120984375");
    assert_eq!(id["region"], "europe-west1");
    assert_eq!(id["public_ipv4"], "198.51.100.77");
    assert!(host.server_sans().iter().any(|s| s == "198.51.100.77"));
}

/// Absent, slow, IMDSv1-only: the step ends within the configured bound, the pass goes on
/// with the host's identity, and status says which provider and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_slow_and_imdsv1_only_metadata_stay_within_the_bound() {
    // Absent, auto: not on a cloud; no problem.
    let host = Host::new(ProviderSetting::Auto, &absent_url().unwrap());
    let (status, took) = host.pass().await;
    assert_eq!(status.step(plan::IDENTITY).unwrap().state, StepState::Ok);
    assert!(took < Duration::from_secs(3), "{took:?}");
    let id = &host.status_json()["identity"];
    assert_eq!(id["provider"], "host");
    assert_eq!(id["hostname"], "pilot-vm");

    // Slow, explicit aws, budget 1 s: degraded, host identity, within the budget.
    let server = MetadataServer::start(MetadataOptions::aws("i-slow")).unwrap();
    server.set_delay(Duration::from_secs(20));
    let mut host = Host::new(ProviderSetting::Aws, &server.url());
    host.config.cloud.timeout = Duration::from_millis(300);
    host.config.cloud.retries = 5;
    host.config.cloud.total_budget = Duration::from_secs(1);
    let started = Instant::now();
    let (status, took) = host.pass().await;
    assert!(took < Duration::from_millis(1300), "identity took {took:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let step = status.step(plan::IDENTITY).unwrap();
    assert_eq!(step.state, StepState::Degraded, "{}", step.detail);
    let id = &host.status_json()["identity"];
    assert_eq!(id["provider"], "host");
    assert_eq!(id["configured"], "aws");
    assert!(
        id["problem"].as_str().unwrap().contains("no answer"),
        "{id}"
    );
    // A stand-in identity writes no marker.
    assert!(!host.state().join("instance-id").exists());
    drop(server);

    // IMDSv1 only: an error that says so; no tokenless GET was sent.
    let mut opts = MetadataOptions::aws("i-v1");
    opts.flavor = Flavor::Aws(Imds::V1Only { put_status: 405 });
    let server = MetadataServer::start(opts).unwrap();
    let host = Host::new(ProviderSetting::Auto, &server.url());
    let (status, _) = host.pass().await;
    let step = status.step(plan::IDENTITY).unwrap();
    assert_eq!(step.state, StepState::Error, "{}", step.detail);
    assert!(step.detail.contains("IMDSv2"), "{}", step.detail);
    assert!(
        server
            .requests()
            .iter()
            .all(|r| !r.path.starts_with("/latest/meta-data")),
        "{:?}",
        server.requests()
    );
    assert_eq!(host.status_json()["identity"]["provider"], "host");
}

/// A state directory copied to a host with another instance id gets a new CA, new keys and
/// certificates and a new marker; the same instance id changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloned_state_gets_new_keys_and_the_same_instance_changes_nothing() {
    let server = MetadataServer::start(MetadataOptions::aws("i-0image000000000a")).unwrap();
    let original = Host::new(ProviderSetting::Auto, &server.url());
    original.pass().await;
    let before = original.hashes();
    assert!(
        before.contains_key(Path::new("pki/ca/ca-key.pem")),
        "{before:?}"
    );

    // Same instance: nothing changes.
    original.pass().await;
    assert_eq!(original.hashes(), before);

    // The state copied to another instance.
    let clone = original.clone_state();
    assert_eq!(clone.hashes(), before);
    server.set_instance_id("i-0clone000000000b");
    let (status, _) = clone.pass().await;
    let pki = status.step(plan::PKI).unwrap();
    assert_eq!(pki.state, StepState::Changed);
    assert!(pki.detail.contains("i-0image000000000a"), "{}", pki.detail);
    let after = clone.hashes();
    for file in [
        "pki/ca/ca-key.pem",
        "pki/ca/ca.pem",
        "pki/server/key.pem",
        "pki/server/cert.pem",
        "pki/runner/key.pem",
        "pki/runner/cert.pem",
        "pki/operator/key.pem",
        "pki/operator/cert.pem",
        "instance-id",
    ] {
        let f = Path::new(file);
        assert_ne!(before.get(f), after.get(f), "{file} must change on a clone");
        assert!(
            after.contains_key(f),
            "{file} missing after the clone's pass"
        );
    }
    assert_eq!(
        std::fs::read_to_string(clone.state().join("instance-id")).unwrap(),
        "aws i-0clone000000000b\n"
    );
    // The clone's next pass (same instance) changes nothing.
    clone.pass().await;
    assert_eq!(clone.hashes(), after);

    // A metadata outage on the clone: the marker is not touched, the keys stay.
    let mut outage = clone.config.clone();
    outage.cloud.metadata_url = absent_url().unwrap();
    let offline = Host {
        dir: tempfile::tempdir().unwrap(),
        config: outage,
    };
    let (status, _) = offline.pass().await;
    let pki = status.step(plan::PKI).unwrap();
    assert!(pki.detail.contains("clone check skipped"), "{}", pki.detail);
    assert_eq!(clone.hashes(), after);
}
