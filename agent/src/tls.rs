//! rustls pieces shared by the agent's TLS clients: the one crypto provider the agent uses, and
//! the server-certificate verifier for peers whose certificate cannot be checked.
//!
//! Two clients need the latter: the Waypoint readiness probe (Waypoint makes a self-signed
//! certificate inside its container, so there is nothing to verify it against) and PostgreSQL
//! in libpq's `sslmode=require` (encrypted, certificate unchecked by definition). Both still
//! verify the handshake signatures, so the peer must hold the key of the certificate it shows
//! and a broken TLS stack fails.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The crypto provider of every TLS connection the agent makes (aws-lc-rs: the one bollard
/// and the AWS SDK use too, so only one is compiled in).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Checks handshake signatures only; any certificate chain is accepted. See the module
/// documentation for where that is right. Other verifiers reuse it for the signature part.
#[derive(Debug, Clone)]
pub struct SignaturesOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl SignaturesOnly {
    pub fn new(provider: &CryptoProvider) -> Self {
        SignaturesOnly {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SignaturesOnly {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
