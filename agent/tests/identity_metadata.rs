//! Identity lookups against the harness's metadata server (tests/harness/src/metadata.rs),
//! which follows the IMDSv2 and GCE protocols: the requests are recorded, so the token flow,
//! the headers and the retries are asserted, not assumed.

use std::net::Ipv4Addr;
use std::time::Duration;

use pilot_harness::metadata::{Flavor, Imds, MetadataOptions, MetadataServer, absent_url, count};

use pilot_agent::config::CloudConfig;
use pilot_agent::config::cloud::ProviderSetting;
use pilot_agent::identity::{Provider, Severity, host_resolution, resolve, resolve_for_state};

fn cloud(provider: ProviderSetting, url: &str) -> CloudConfig {
    CloudConfig {
        provider,
        metadata_url: url.to_string(),
        ..CloudConfig::default()
    }
}

#[tokio::test]
async fn aws_imdsv2_token_flow_gives_the_whole_identity() {
    let server = MetadataServer::start(MetadataOptions::aws("i-0123456789abcdef0")).unwrap();
    let r = resolve(&cloud(ProviderSetting::Aws, &server.url()), None).await;
    assert_eq!(r.problem, None, "{}", r.summary());
    let i = &r.identity;
    assert_eq!(i.provider, Provider::Aws);
    assert_eq!(i.instance_id.as_deref(), Some("i-0123456789abcdef0"));
    assert_eq!(i.region.as_deref(), Some("eu-west-1"));
    assert_eq!(i.zone.as_deref(), Some("eu-west-1b"));
    assert_eq!(i.private_ipv4, Some(Ipv4Addr::new(10, 0, 1, 23)));
    assert_eq!(i.public_ipv4, Some(Ipv4Addr::new(203, 0, 113, 45)));
    assert_eq!(
        i.public_hostname.as_deref(),
        Some("ec2-203-0-113-45.eu-west-1.compute.amazonaws.com")
    );
    let reqs = server.requests();
    assert_eq!(reqs[0].method, "PUT");
    assert_eq!(reqs[0].path, "/latest/api/token");
    assert_eq!(count(&reqs, "/latest/api/token"), 1, "one token per lookup");
    let gets: Vec<_> = reqs.iter().filter(|r| r.method == "GET").collect();
    assert_eq!(gets.len(), 7, "{reqs:?}");
    assert!(
        gets.iter().all(|r| r.valid_token && r.status == 200),
        "{gets:?}"
    );
    assert!(r.is_authoritative());
}

#[tokio::test]
async fn aws_without_public_address_has_none() {
    let mut opts = MetadataOptions::aws("i-1");
    opts.instance.public_ipv4 = None;
    opts.instance.public_hostname = None;
    let server = MetadataServer::start(opts).unwrap();
    let r = resolve(&cloud(ProviderSetting::Aws, &server.url()), None).await;
    assert_eq!(r.problem, None);
    assert_eq!(r.identity.public_ipv4, None);
    assert_eq!(r.identity.public_hostname, None);
    assert_eq!(r.identity.sans().len(), 2, "{:?}", r.identity.sans());
}

/// An IMDSv1-only service refuses the token PUT: an error that says so, and not one GET is
/// sent without a token.
#[tokio::test]
async fn imdsv1_only_is_an_error_never_a_silent_fallback() {
    for put_status in [403, 405] {
        let mut opts = MetadataOptions::aws("i-1");
        opts.flavor = Flavor::Aws(Imds::V1Only { put_status });
        let server = MetadataServer::start(opts).unwrap();
        for provider in [ProviderSetting::Aws, ProviderSetting::Auto] {
            server.clear_requests();
            let r = resolve(&cloud(provider, &server.url()), Some("h")).await;
            let p = r.problem.clone().expect("a problem");
            assert_eq!(p.severity, Severity::Error, "{provider:?}");
            assert!(p.message.contains("IMDSv2"), "{}", p.message);
            assert!(
                p.message.contains(&format!("HTTP {put_status}")),
                "{}",
                p.message
            );
            assert_eq!(r.identity.provider, Provider::Host);
            assert!(!r.is_authoritative());
            let aws_gets = server
                .requests()
                .into_iter()
                .filter(|q| q.path.starts_with("/latest/meta-data"))
                .count();
            assert_eq!(aws_gets, 0, "no IMDSv1 GETs");
        }
    }
}

#[tokio::test]
async fn gcp_metadata_with_the_flavor_header() {
    let server = MetadataServer::start(MetadataOptions::gcp("4520135459208423211")).unwrap();
    let r = resolve(&cloud(ProviderSetting::Gcp, &server.url()), None).await;
    assert_eq!(r.problem, None, "{}", r.summary());
    let i = &r.identity;
    assert_eq!(i.provider, Provider::Gcp);
    assert_eq!(i.instance_id.as_deref(), Some("4520135459208423211"));
    assert_eq!(i.zone.as_deref(), Some("europe-west1-c"));
    assert_eq!(i.region.as_deref(), Some("europe-west1"));
    assert_eq!(i.private_ipv4, Some(Ipv4Addr::new(10, 132, 0, 7)));
    assert_eq!(i.public_ipv4, Some(Ipv4Addr::new(198, 51, 100, 77)));
    assert_eq!(i.public_hostname, None);
    // Every request carried the header (none was refused with 403).
    assert!(server.requests().iter().all(|q| q.status == 200));
}

#[tokio::test]
async fn a_server_without_the_google_header_is_not_trusted() {
    let mut opts = MetadataOptions::gcp("42");
    opts.impostor = true;
    let server = MetadataServer::start(opts).unwrap();
    let r = resolve(&cloud(ProviderSetting::Gcp, &server.url()), None).await;
    let p = r.problem.expect("a problem");
    assert_eq!(p.severity, Severity::Error);
    assert!(p.message.contains("Metadata-Flavor"), "{}", p.message);
    assert_eq!(r.identity.provider, Provider::Host);
}

#[tokio::test]
async fn auto_detects_either_cloud() {
    let aws = MetadataServer::start(MetadataOptions::aws("i-9")).unwrap();
    let r = resolve(&cloud(ProviderSetting::Auto, &aws.url()), None).await;
    assert_eq!((r.identity.provider, r.problem), (Provider::Aws, None));
    let gcp = MetadataServer::start(MetadataOptions::gcp("9")).unwrap();
    let r = resolve(&cloud(ProviderSetting::Auto, &gcp.url()), None).await;
    assert_eq!((r.identity.provider, r.problem), (Provider::Gcp, None));
}

#[tokio::test]
async fn auto_without_a_metadata_service_is_the_host_quickly() {
    let url = absent_url().unwrap();
    let r = resolve(&cloud(ProviderSetting::Auto, &url), Some("pilot-vm")).await;
    assert_eq!(r.problem, None);
    assert_eq!(r.identity.provider, Provider::Host);
    assert_eq!(r.identity.hostname.as_deref(), Some("pilot-vm"));
    assert_eq!(r.absent.len(), 2, "{:?}", r.absent);
    // Refused connections: three attempts each with short pauses, far below the budget.
    assert!(r.elapsed < Duration::from_secs(1), "{:?}", r.elapsed);
    // An explicit provider that is absent is degraded, not an error.
    let r = resolve(&cloud(ProviderSetting::Aws, &url), None).await;
    assert_eq!(r.problem.map(|p| p.severity), Some(Severity::Degraded));
}

/// A service that accepts but answers too late: each attempt is cut at `timeout_ms`, there
/// are `retries` more, and the whole lookup ends within the budget.
#[tokio::test]
async fn slow_metadata_costs_at_most_the_budget() {
    let server = MetadataServer::start(MetadataOptions::aws("i-1")).unwrap();
    server.set_delay(Duration::from_secs(30));
    let mut c = cloud(ProviderSetting::Aws, &server.url());
    c.timeout = Duration::from_millis(150);
    c.retries = 2;
    c.total_budget = Duration::from_secs(2);
    let r = resolve(&c, None).await;
    assert!(r.elapsed < Duration::from_secs(1), "{:?}", r.elapsed);
    let p = r.problem.expect("a problem");
    assert_eq!(p.severity, Severity::Degraded);
    assert!(p.message.contains("3 attempt(s)"), "{}", p.message);
    assert_eq!(count(&server.requests(), "/latest/api/token"), 3);

    // More retries than the budget allows: the budget wins.
    c.retries = 10;
    c.total_budget = Duration::from_secs(1);
    let r = resolve(&c, None).await;
    assert!(
        r.elapsed < Duration::from_millis(1200),
        "budget 1 s, took {:?}",
        r.elapsed
    );
    assert_eq!(r.identity.provider, Provider::Host);
}

/// A metadata outage after a good lookup keeps the earlier identity (and its public names in
/// the certificate), marked as remembered and never authoritative for the clone marker.
#[tokio::test]
async fn an_outage_keeps_the_identity_read_earlier() {
    let state = tempfile::tempdir().unwrap();
    let server = MetadataServer::start(MetadataOptions::aws("i-7")).unwrap();
    let c = cloud(ProviderSetting::Auto, &server.url());
    let first = resolve_for_state(&c, None, state.path()).await;
    assert!(first.is_authoritative());
    drop(server);
    let c = cloud(ProviderSetting::Auto, &absent_url().unwrap());
    let later = resolve_for_state(&c, None, state.path()).await;
    assert!(later.remembered);
    assert!(!later.is_authoritative());
    assert_eq!(later.identity, first.identity);
    assert!(later.report().remembered);
    // `none` asks for the host, whatever was read before.
    let none = cloud(ProviderSetting::None, "http://127.0.0.1:1");
    let host = resolve_for_state(&none, Some("h"), state.path()).await;
    assert_eq!(host.identity.provider, Provider::Host);
    assert!(!host.remembered);
}

#[test]
fn report_json_shape() {
    let r = host_resolution(Some("pilot-vm"));
    let v = serde_json::to_value(r.report()).unwrap();
    assert_eq!(v["provider"], "host");
    assert_eq!(v["configured"], "none");
    assert_eq!(v["hostname"], "pilot-vm");
    assert!(v.get("problem").is_none());
    assert!(v.get("remembered").is_none());
    assert!(v["elapsed_ms"].is_u64());
}
