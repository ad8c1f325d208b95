//! TLS for the stand-in: the server's self-signed certificate (made once, kept in the data dir,
//! like Waypoint's own), the server's rustls config, and the client configs used to reach the
//! server (`-server-tls-skip-verify` or system roots) and Docker (CA and client certificate from
//! `DOCKER_CERT_PATH`, as the Docker client does).
//!
//! Every config is built with an explicit aws-lc-rs provider, so the binary never depends on
//! which rustls crypto features other crates in the build happen to enable.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::write_atomic;

/// File names of the generated server certificate and key inside the data dir.
pub const CERT_FILE: &str = "standin-tls-cert.pem";
pub const KEY_FILE: &str = "standin-tls-key.pem";

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

/// Loads the server certificate from `dir`, or makes a self-signed one on first start.
///
/// Kept across restarts like Waypoint's, so clients that pinned it keep working. `names` are
/// extra subject alternative names (the advertise host); localhost and loopback are always in.
pub fn load_or_create_server_identity(dir: &Path, names: &[String]) -> Result<(Identity, bool)> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        return Ok((load_identity(&cert_path, &key_path)?, false));
    }
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for name in names {
        if !sans.contains(name) {
            sans.push(name.clone());
        }
    }
    let certified = rcgen::generate_simple_self_signed(sans)?;
    // Key first: a crash between the two writes leaves no certificate without its key, and the
    // next start (which needs both) simply makes a new pair.
    write_atomic(
        &key_path,
        certified.signing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(&cert_path, certified.cert.pem().as_bytes(), 0o644)?;
    Ok((load_identity(&cert_path, &key_path)?, true))
}

/// The rustls server config for both listeners.
pub fn server_config(identity: Identity) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("failed to set tls versions"))?
        .with_no_client_auth()
        .with_single_cert(identity.certs, identity.key)
        .map_err(tls_err("failed to use the server certificate"))?;
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
    fn server_identity_is_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) =
            load_or_create_server_identity(dir.path(), &["pilot.example".into()]).unwrap();
        assert!(created);
        let (second, created) = load_or_create_server_identity(dir.path(), &[]).unwrap();
        assert!(!created);
        assert_eq!(first.certs, second.certs);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        server_config(second).unwrap();
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
