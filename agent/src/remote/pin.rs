//! The pinned CA: its SHA-256 fingerprint (the DER of the certificate, as `openssl x509
//! -fingerprint -sha256` prints it) and the rustls verifier that trusts exactly the CA whose
//! fingerprint is pinned.
//!
//! The runner host holds no copy of the server VM's CA, only the pin. So the verifier looks for
//! the pinned CA among the certificates the server presents, makes it the only trust anchor,
//! and then runs rustls' ordinary webpki verification of the leaf against it (signature,
//! validity, serverAuth, the dialled name among the SANs). A server that does not present the
//! CA in its chain cannot be verified and is refused: presenting it costs the server one more
//! certificate in the handshake, and TLS explicitly allows sending the root.
//!
//! What went wrong is recorded in the verifier ([`PinnedCaVerifier::failure`]) because rustls
//! reduces a verifier's error to an alert and a generic message; the client turns the record
//! into an error that names the expected and the presented fingerprints.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::tls::SignaturesOnly;

pub use pilot_values::{Fingerprint, FingerprintError};

/// Why the verifier refused the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainFailure {
    /// None of the presented certificates is the pinned CA; their fingerprints, leaf first.
    CaNotPresented { presented: Vec<Fingerprint> },
    /// The pinned CA was presented but the leaf does not verify against it.
    Invalid { reason: String },
}

/// Trusts exactly the CA whose fingerprint is pinned (see the module documentation). One per
/// connection: it keeps the failure of its handshake.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
    signatures: SignaturesOnly,
    failure: Mutex<Option<ChainFailure>>,
}

impl PinnedCaVerifier {
    pub fn new(pin: Fingerprint, provider: Arc<CryptoProvider>) -> Self {
        PinnedCaVerifier {
            pin,
            signatures: SignaturesOnly::new(&provider),
            provider,
            failure: Mutex::new(None),
        }
    }

    /// Why the last verification failed, if it did.
    pub fn failure(&self) -> Option<ChainFailure> {
        // A poisoned lock still holds a complete value (each write is one assignment).
        self.failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn fail(&self, failure: ChainFailure, error: rustls::Error) -> rustls::Error {
        *self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(failure);
        error
    }

    fn invalid(&self, error: rustls::Error) -> rustls::Error {
        self.fail(
            ChainFailure::Invalid {
                reason: error.to_string(),
            },
            error,
        )
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The leaf itself is never the anchor: a pinned CA must sign a separate leaf.
        let Some(ca) = intermediates
            .iter()
            .find(|c| Fingerprint::of_der(c) == self.pin)
        else {
            let presented = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| Fingerprint::of_der(c))
                .collect();
            return Err(self.fail(
                ChainFailure::CaNotPresented { presented },
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| self.invalid(e))?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| self.invalid(rustls::Error::General(e.to_string())))?;
        webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| self.invalid(e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}
