//! TLS for the stand-in: the server's certificates, the server's rustls config, and the client
//! configs used to reach the server (`-server-tls-skip-verify` or system roots) and Docker (CA
//! and client certificate from `DOCKER_CERT_PATH`, as the Docker client does).
//!
//! Server certificates follow `waypoint server run`: without `-tls-cert-file`/`-tls-key-file`
//! EACH listener gets its own self-signed certificate, made fresh at every start and kept in
//! memory only (ECDSA P-384, subject `O=Waypoint`, serial = Unix time, ten years, server-auth
//! usage, no DNS or IP subject alternative names). Nothing is written to the data dir, so a
//! client that pins or verifies the certificate breaks at the next restart, as with Waypoint.
//! With the two flags, the files are used and re-read when they change.
//!
//! Every config is built with an explicit aws-lc-rs provider, so the binary never depends on
//! which rustls crypto features other crates in the build happen to enable.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::error::{Error, IoContext, Result};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn tls_err(context: &str) -> impl FnOnce(rustls::Error) -> Error + '_ {
    move |source| Error::Tls {
        context: context.to_string(),
        source,
    }
}

/// A certificate chain and its key.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Reads a PEM certificate chain and key.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::Config(format!(
                "failed to read certificates from {}: {e}",
                cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "no certificate found in {}",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        Error::Config(format!(
            "failed to read private key from {}: {e}",
            key.display()
        ))
    })?;
    Ok(Identity { certs, key })
}

/// A fresh self-signed server certificate shaped like the one `waypoint server run` makes for
/// each listener (see the module docs). Never written anywhere.
pub fn self_signed_identity() -> Result<Identity> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "Waypoint");
    params.distinguished_name = dn;
    params.subject_alt_names = Vec::new();
    let now = time::OffsetDateTime::now_utc();
    let serial = now.unix_timestamp().max(1) as u64;
    let serial_bytes: Vec<u8> = serial
        .to_be_bytes()
        .iter()
        .copied()
        .skip_while(|b| *b == 0)
        .collect();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial_bytes));
    params.not_before = now;
    params.not_after = now + time::Duration::days(365 * 10);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyEncipherment,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let cert = params.self_signed(&key)?;
    Ok(Identity {
        certs: vec![cert.der().clone()],
        key: PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| Error::Config(format!("failed to use the generated key: {e}")))?,
    })
}

fn certified_key(identity: Identity) -> Result<Arc<CertifiedKey>> {
    let signer = provider()
        .key_provider
        .load_private_key(identity.key)
        .map_err(tls_err("failed to use the server key"))?;
    Ok(Arc::new(CertifiedKey::new(identity.certs, signer)))
}

/// Serves the certificate and key files given to `server run`, re-reading them when their
/// modification time or size changes (Waypoint watches them too). A broken new pair is logged
/// and the previous one kept.
#[derive(Debug)]
pub struct FileCertResolver {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Option<FileStamp>, Arc<CertifiedKey>)>,
}

type FileStamp = (Option<SystemTime>, u64, Option<SystemTime>, u64);

fn stamp(cert: &Path, key: &Path) -> Option<FileStamp> {
    let c = std::fs::metadata(cert).ok()?;
    let k = std::fs::metadata(key).ok()?;
    Some((c.modified().ok(), c.len(), k.modified().ok(), k.len()))
}

impl FileCertResolver {
    /// Loads the pair now; errors are what `server run` reports before serving.
    pub fn new(cert: &Path, key: &Path) -> Result<FileCertResolver> {
        let loaded = certified_key(load_identity(cert, key)?)?;
        Ok(FileCertResolver {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: Mutex::new((stamp(cert, key), loaded)),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut guard = match self.current.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = stamp(&self.cert, &self.key);
        if now.is_some() && now != guard.0 {
            match load_identity(&self.cert, &self.key).and_then(certified_key) {
                Ok(key) => {
                    crate::log!(
                        "server: reloaded the tls certificate from {}",
                        self.cert.display()
                    );
                    *guard = (now, key);
                }
                Err(e) => {
                    crate::log!("server: keeping the previous tls certificate: {e}");
                    guard.0 = now;
                }
            }
        }
        guard.1.clone()
    }
}

impl ResolvesServerCert for FileCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A fixed certificate (the per-listener self-signed one).
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Where a listener's certificate comes from.
pub enum ServerCert {
    /// A fresh self-signed certificate for this listener.
    SelfSigned,
    /// The `-tls-cert-file`/`-tls-key-file` pair (shared by the listeners).
    Files(Arc<FileCertResolver>),
}

/// The rustls server config for one listener.
pub fn server_config(cert: &ServerCert) -> Result<Arc<ServerConfig>> {
    let resolver: Arc<dyn ResolvesServerCert> = match cert {
        ServerCert::SelfSigned => Arc::new(FixedCert(certified_key(self_signed_identity()?)?)),
        ServerCert::Files(r) => r.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("failed to set tls versions"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client config that accepts any server certificate, like Go's `InsecureSkipVerify`
/// (`-server-tls-skip-verify`). Handshake signatures are still checked.
pub fn client_config_skip_verify(client_identity: Option<Identity>) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("failed to set tls versions"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SkipVerify(provider)));
    let config = match client_identity {
        Some(id) => builder
            .with_client_auth_cert(id.certs, id.key)
            .map_err(tls_err("failed to use the client certificate"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A client config that verifies the server against the CA certificates in `ca_file`.
pub fn client_config_with_ca(
    ca_file: &Path,
    client_identity: Option<Identity>,
) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(ca_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::Config(format!(
                "failed to read ca certificates from {}: {e}",
                ca_file.display()
            ))
        })?;
    let (added, _ignored) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(Error::Config(format!(
            "no usable ca certificate in {}",
            ca_file.display()
        )));
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("failed to set tls versions"))?
        .with_root_certificates(roots);
    let config = match client_identity {
        Some(id) => builder
            .with_client_auth_cert(id.certs, id.key)
            .map_err(tls_err("failed to use the client certificate"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A client config that verifies against the system's CA bundle (Go's default when TLS is on
/// and verification is not skipped). `SSL_CERT_FILE` overrides the bundle path, as in Go.
pub fn client_config_system_roots() -> Result<Arc<ClientConfig>> {
    let bundle = std::env::var("SSL_CERT_FILE")
        .unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".into());
    std::fs::metadata(&bundle).io_context(|| {
        format!("cannot verify the server certificate: no ca bundle at {bundle} (set SSL_CERT_FILE or use -server-tls-skip-verify)")
    })?;
    client_config_with_ca(Path::new(&bundle), None)
}

/// The server name to check the certificate against: an IP address SAN for IPs, else DNS.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string())
        .map_err(|e| Error::Config(format!("{host:?} is not a valid tls server name: {e}")))
}

/// Accepts any certificate; see [`client_config_skip_verify`].
#[derive(Debug)]
struct SkipVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificates_are_fresh_and_have_no_names() {
        let a = self_signed_identity().unwrap();
        let b = self_signed_identity().unwrap();
        assert_ne!(a.certs, b.certs, "one per listener and start");
        let der = a.certs[0].as_ref();
        // O=Waypoint is in, and no subjectAltName extension (OID 2.5.29.17) at all.
        assert!(der.windows(8).any(|w| w == b"Waypoint"));
        assert!(!der.windows(3).any(|w| w == [0x55, 0x1d, 0x11]), "no SANs");
        server_config(&ServerCert::SelfSigned).unwrap();
    }

    #[test]
    fn file_certificates_are_reloaded_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str| {
            let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
            std::fs::write(dir.path().join("cert.pem"), c.cert.pem()).unwrap();
            std::fs::write(dir.path().join("key.pem"), c.signing_key.serialize_pem()).unwrap();
            c.cert.der().clone()
        };
        let first = write("one.example");
        let r = FileCertResolver::new(&dir.path().join("cert.pem"), &dir.path().join("key.pem"))
            .unwrap();
        assert_eq!(r.current().cert[0], first);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = write("second.example.org");
        assert_eq!(r.current().cert[0], second);
        std::fs::write(dir.path().join("cert.pem"), b"garbage that is longer").unwrap();
        assert_eq!(
            r.current().cert[0],
            second,
            "a broken pair keeps the old one"
        );
        assert!(
            FileCertResolver::new(&dir.path().join("nope"), &dir.path().join("key.pem")).is_err()
        );
    }

    #[test]
    fn server_names_accept_ips_and_dns() {
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("docker.local").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("not a name").is_err());
    }
}
