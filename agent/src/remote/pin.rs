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

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::tls::SignaturesOnly;

/// The SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    #[error(
        "expected a SHA-256 fingerprint: 64 hex digits, either all together or in 32 pairs \
         separated by ':' (as `openssl x509 -fingerprint -sha256` prints it)"
    )]
    Format,
    #[error("no certificate in the PEM text: {0}")]
    Pem(String),
}

/// What `openssl x509 -fingerprint -sha256` prints before the digits; accepted so that its
/// whole output line can be pasted.
const OPENSSL_PREFIX: &str = "sha256 fingerprint=";

impl Fingerprint {
    pub fn of_der(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// The fingerprint of the first certificate in `pem`.
    pub fn of_pem(pem: &str) -> Result<Fingerprint, FingerprintError> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| FingerprintError::Pem(e.to_string()))?;
        Ok(Fingerprint::of_der(&der))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut s = s.trim();
        if s.len() >= OPENSSL_PREFIX.len()
            && s.is_char_boundary(OPENSSL_PREFIX.len())
            && s[..OPENSSL_PREFIX.len()].eq_ignore_ascii_case(OPENSSL_PREFIX)
        {
            s = &s[OPENSSL_PREFIX.len()..];
        }
        let digits: Vec<u8> = if s.contains(':') {
            // Separated: exactly 32 pairs, so a digit lost in copying is caught, not shifted.
            let pairs: Vec<&str> = s.split(':').collect();
            if pairs.len() != 32 || pairs.iter().any(|p| p.len() != 2) {
                return Err(FingerprintError::Format);
            }
            pairs.concat().into_bytes()
        } else {
            s.as_bytes().to_vec()
        };
        if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(FingerprintError::Format);
        }
        let mut out = [0u8; 32];
        for (slot, pair) in out.iter_mut().zip(digits.chunks(2)) {
            let hex = |d: u8| match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                // Only A-F remain: every digit was checked to be hex above.
                _ => d - b'A' + 10,
            };
            *slot = hex(pair[0]) << 4 | hex(pair[1]);
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    /// Upper-case pairs separated by ':', as `openssl x509 -fingerprint -sha256` prints them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

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
