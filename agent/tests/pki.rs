//! The CA and the certificates on a temporary directory: issue, keep, renew, heal, modes,
//! and a mutual-TLS handshake with the result.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use pilot_agent::addresses::San;
use pilot_agent::config::PkiConfig;
use pilot_agent::pki::{
    CLIENTS, CertAction, LeafSpec, PkiError, PkiLayout, PkiReport, Policy, Reason, SERVER,
    cert_sans, ensure, parse_pem_cert,
};
use rcgen::{KeyPair, PublicKeyData};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

struct Fixture {
    _dir: tempfile::TempDir,
    layout: PkiLayout,
    policy: Policy,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let layout = PkiLayout::new(dir.path().join("pki"));
    Fixture {
        _dir: dir,
        layout,
        policy: Policy::from(&PkiConfig::default()),
    }
}

fn sans(names: &[&str]) -> BTreeSet<San> {
    names.iter().map(|n| San::parse(n)).collect()
}

fn leaves(server_sans: &[&str]) -> Vec<LeafSpec> {
    let mut v = vec![LeafSpec::server(sans(server_sans))];
    v.extend(CLIENTS.iter().map(|c| LeafSpec::client(c)));
    v
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p).unwrap().modified().unwrap()
}

fn all_files(layout: &PkiLayout) -> Vec<PathBuf> {
    let mut v = vec![layout.ca_cert(), layout.ca_key()];
    for name in [SERVER, "runner", "operator"] {
        let p = layout.leaf(name);
        v.extend([p.ca, p.cert, p.key]);
    }
    v
}

fn read_cert(p: &Path) -> Vec<u8> {
    parse_pem_cert(&fs::read(p).unwrap()).unwrap()
}

fn actions(r: &PkiReport) -> Vec<(String, CertAction)> {
    let mut v = vec![("ca".to_string(), r.ca.clone())];
    v.extend(r.leaves.iter().cloned());
    v
}

fn kept_all(r: &PkiReport) -> bool {
    actions(r).iter().all(|(_, a)| *a == CertAction::Kept)
}

#[test]
fn fresh_host_gets_ca_server_and_clients_with_safe_modes() {
    let f = fixture();
    let r = ensure(
        &f.layout,
        &f.policy,
        &leaves(&["10.0.0.5", "pilot-vm", "localhost", "127.0.0.1"]),
        now(),
    )
    .unwrap();
    assert!(r.files_changed);
    assert_eq!(r.ca, CertAction::Issued(Reason::NewKey));
    for (_, a) in &r.leaves {
        assert_eq!(*a, CertAction::Issued(Reason::NewKey));
    }
    assert_eq!(mode(f.layout.root()), 0o700);
    assert_eq!(mode(&f.layout.ca_dir()), 0o700);
    assert_eq!(mode(&f.layout.ca_key()), 0o600);
    assert_eq!(mode(&f.layout.ca_cert()), 0o644);
    for name in [SERVER, "runner", "operator"] {
        let p = f.layout.leaf(name);
        assert_eq!(mode(&p.dir), 0o700, "{name}");
        assert_eq!(mode(&p.key), 0o600, "{name}");
        assert_eq!(mode(&p.cert), 0o644, "{name}");
        assert_eq!(
            fs::read(&p.ca).unwrap(),
            fs::read(f.layout.ca_cert()).unwrap()
        );
    }

    let der = read_cert(&f.layout.server().cert);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert_sans(&cert),
        sans(&["10.0.0.5", "pilot-vm", "localhost", "127.0.0.1"])
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let ca_der = read_cert(&f.layout.ca_cert());
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(ca.is_ca());
    cert.verify_signature(Some(ca.public_key())).unwrap();

    let der = read_cert(&f.layout.leaf("operator").cert);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(cert_sans(&cert).is_empty());
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(cn, "pilot-agent operator");
    let days = (cert.validity().not_after.to_datetime() - now()).whole_days();
    assert!((395..=397).contains(&days), "{days}");
}

#[test]
fn second_run_touches_nothing() {
    let f = fixture();
    let specs = leaves(&["10.0.0.5", "localhost"]);
    ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    let before: Vec<_> = all_files(&f.layout)
        .iter()
        .map(|p| {
            (
                fs::read(p).unwrap(),
                mtime(p),
                fs::metadata(p).unwrap().ino(),
            )
        })
        .collect();
    let r = ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    assert!(kept_all(&r), "{:?}", actions(&r));
    assert!(!r.files_changed);
    let after: Vec<_> = all_files(&f.layout)
        .iter()
        .map(|p| {
            (
                fs::read(p).unwrap(),
                mtime(p),
                fs::metadata(p).unwrap().ino(),
            )
        })
        .collect();
    assert_eq!(before, after);
    assert!(
        r.summary().starts_with("CA and 3 certificates valid"),
        "{}",
        r.summary()
    );
}

#[test]
fn changed_addresses_reissue_only_the_server_certificate() {
    let f = fixture();
    ensure(&f.layout, &f.policy, &leaves(&["10.0.0.5"]), now()).unwrap();
    let runner_cert = fs::read(f.layout.leaf("runner").cert).unwrap();
    let r = ensure(
        &f.layout,
        &f.policy,
        &leaves(&["10.0.0.5", "10.0.0.6"]),
        now(),
    )
    .unwrap();
    assert_eq!(r.ca, CertAction::Kept);
    assert_eq!(
        r.leaves[0],
        (SERVER.into(), CertAction::Issued(Reason::SansChanged))
    );
    assert_eq!(r.leaves[1].1, CertAction::Kept);
    assert_eq!(r.leaves[2].1, CertAction::Kept);
    assert_eq!(fs::read(f.layout.leaf("runner").cert).unwrap(), runner_cert);
    let der = read_cert(&f.layout.server().cert);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(cert_sans(&cert), sans(&["10.0.0.5", "10.0.0.6"]));
    assert!(
        r.summary()
            .contains("server (host names or addresses changed)"),
        "{}",
        r.summary()
    );
}

#[test]
fn certificates_near_expiry_are_renewed_and_ca_kept() {
    let f = fixture();
    let specs = leaves(&["10.0.0.5"]);
    ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    // 20 days before the 397-day certificates expire: inside the 30-day window.
    let later = now() + Duration::days(377);
    let r = ensure(&f.layout, &f.policy, &specs, later).unwrap();
    assert_eq!(r.ca, CertAction::Kept);
    for (_, a) in &r.leaves {
        assert_eq!(*a, CertAction::Issued(Reason::Expiring));
    }
    // 40 days before: outside the window, nothing happens.
    let f2 = fixture();
    ensure(&f2.layout, &f2.policy, &specs, now()).unwrap();
    let r = ensure(&f2.layout, &f2.policy, &specs, now() + Duration::days(357)).unwrap();
    assert!(kept_all(&r));
}

#[test]
fn remade_ca_certificate_keeps_existing_certificates_valid() {
    let f = fixture();
    let specs = leaves(&["127.0.0.1"]);
    ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    let ca_key = fs::read(f.layout.ca_key()).unwrap();
    let server_cert = fs::read(f.layout.server().cert).unwrap();
    let old_ca = fs::read(f.layout.ca_cert()).unwrap();

    fs::remove_file(f.layout.ca_cert()).unwrap();
    let r = ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    assert_eq!(r.ca, CertAction::Issued(Reason::Missing));
    assert!(
        r.leaves.iter().all(|(_, a)| *a == CertAction::Kept),
        "{:?}",
        r.leaves
    );
    assert_eq!(fs::read(f.layout.ca_key()).unwrap(), ca_key);
    assert_eq!(fs::read(f.layout.server().cert).unwrap(), server_cert);
    let new_ca = fs::read(f.layout.ca_cert()).unwrap();
    assert_ne!(new_ca, old_ca);
    // Every copy of the CA follows.
    assert_eq!(fs::read(f.layout.leaf("operator").ca).unwrap(), new_ca);

    // The CA near its own expiry is re-made the same way.
    let r = ensure(&f.layout, &f.policy, &specs, now() + Duration::days(3630)).unwrap();
    assert_eq!(r.ca, CertAction::Issued(Reason::Expiring));
    assert_eq!(fs::read(f.layout.ca_key()).unwrap(), ca_key);
}

#[test]
fn key_written_but_certificate_not_heals_by_certifying_the_key() {
    let f = fixture();
    let specs = leaves(&["127.0.0.1"]);
    ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    // A run killed after writing a new key and before its certificate.
    let server = f.layout.server();
    let new_key = KeyPair::generate().unwrap();
    fs::write(&server.key, new_key.serialize_pem()).unwrap();
    let r = ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    assert_eq!(r.leaves[0].1, CertAction::Issued(Reason::KeyMismatch));
    assert_eq!(
        fs::read_to_string(&server.key).unwrap(),
        new_key.serialize_pem()
    );
    let der = read_cert(&server.cert);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert.public_key().raw,
        new_key.subject_public_key_info().as_slice()
    );
    // And the next run is quiet.
    assert!(kept_all(
        &ensure(&f.layout, &f.policy, &specs, now()).unwrap()
    ));

    // Certificate missing next to a good key: same healing.
    fs::remove_file(&server.cert).unwrap();
    let r = ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    assert_eq!(r.leaves[0].1, CertAction::Issued(Reason::Missing));
    assert_eq!(
        fs::read_to_string(&server.key).unwrap(),
        new_key.serialize_pem()
    );
}

#[test]
fn lost_ca_key_makes_a_new_ca_and_reissues_everything() {
    let f = fixture();
    let specs = leaves(&["127.0.0.1"]);
    ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    fs::remove_file(f.layout.ca_key()).unwrap();
    let r = ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    assert_eq!(r.ca, CertAction::Issued(Reason::NewKey));
    for (_, a) in &r.leaves {
        assert_eq!(*a, CertAction::Issued(Reason::NotIssuedByCa));
    }
}

#[test]
fn unreadable_ca_key_is_an_error_and_nothing_is_replaced() {
    let f = fixture();
    let specs = leaves(&["127.0.0.1"]);
    ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    fs::write(f.layout.ca_key(), "garbage").unwrap();
    let ca_cert = fs::read(f.layout.ca_cert()).unwrap();
    let err = ensure(&f.layout, &f.policy, &specs, now()).unwrap_err();
    assert!(matches!(err, PkiError::CaKey { .. }), "{err}");
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
    assert_eq!(fs::read(f.layout.ca_cert()).unwrap(), ca_cert);
    assert_eq!(fs::read(f.layout.ca_key()).unwrap(), b"garbage");
}

#[test]
fn unreadable_or_foreign_certificates_are_replaced() {
    let f = fixture();
    let specs = leaves(&["127.0.0.1"]);
    ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    fs::write(f.layout.leaf("runner").cert, "not a certificate").unwrap();
    // Swap: the operator directory gets the server's certificate and key.
    let server = f.layout.server();
    let operator = f.layout.leaf("operator");
    fs::copy(&server.cert, &operator.cert).unwrap();
    fs::copy(&server.key, &operator.key).unwrap();
    let r = ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    assert_eq!(r.leaves[0].1, CertAction::Kept);
    assert_eq!(r.leaves[1].1, CertAction::Issued(Reason::Unreadable));
    assert_eq!(r.leaves[2].1, CertAction::Issued(Reason::WrongProfile));
}

#[test]
fn loosened_key_modes_are_tightened() {
    let f = fixture();
    let specs = leaves(&["127.0.0.1"]);
    ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    fs::set_permissions(f.layout.ca_key(), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(
        f.layout.leaf("runner").key,
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    fs::set_permissions(
        f.layout.leaf("runner").dir,
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let r = ensure(&f.layout, &f.policy, &specs, now()).unwrap();
    assert!(kept_all(&r));
    assert!(r.files_changed);
    assert_eq!(mode(&f.layout.ca_key()), 0o600);
    assert_eq!(mode(&f.layout.leaf("runner").key), 0o600);
    assert_eq!(mode(&f.layout.leaf("runner").dir), 0o700);
}

/// The certificates work for what they are for: a mutual-TLS handshake with rustls (the
/// same verifier family as bollard's client), with the server verified at 127.0.0.1, and a
/// client without a certificate refused.
#[tokio::test]
async fn certificates_complete_a_mutual_tls_handshake() {
    let f = fixture();
    ensure(
        &f.layout,
        &f.policy,
        &leaves(&["127.0.0.1", "localhost"]),
        now(),
    )
    .unwrap();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let server = f.layout.server();
    let operator = f.layout.leaf("operator");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&server.ca).unwrap())
        .unwrap();
    let roots = Arc::new(roots);
    let client_verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone())
        .build()
        .unwrap();
    let server_config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_file(&server.cert).unwrap()],
            PrivateKeyDer::from_pem_file(&server.key).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            match acceptor.accept(tcp).await {
                Ok(mut tls) => {
                    tls.write_all(b"ok").await.unwrap();
                    tls.shutdown().await.ok();
                    results.push(true);
                }
                Err(_) => results.push(false),
            }
        }
        results
    });

    let with_cert = rustls::ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(&operator.cert).unwrap()],
            PrivateKeyDer::from_pem_file(&operator.key).unwrap(),
        )
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(with_cert));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.unwrap();
    assert_eq!(buf, b"ok");

    let without_cert = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(without_cert));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let refused = match connector.connect(name, tcp).await {
        Err(_) => true,
        // TLS 1.3: the client finishes first; the refusal arrives on the first read.
        Ok(mut tls) => tls.read_to_end(&mut Vec::new()).await.is_err(),
    };
    assert!(refused, "a client without a certificate must be refused");
    assert_eq!(server_task.await.unwrap(), vec![true, false]);
}
