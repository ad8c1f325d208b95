//! SHA-256 certificate fingerprints: the DER of the certificate, as `openssl x509
//! -fingerprint -sha256` prints it (`server.ca_sha256`, `credentials`' `ca_sha256`).

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

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

/// Parses a SHA-256 written as 64 hex digits (either case), surrounding whitespace ignored:
/// the endpoint token's hash (`endpoint.token_sha256`, its file).
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, slot) in out.iter_mut().enumerate() {
        // Checked above: 64 ASCII hex digits, so every pair parses.
        *slot = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex() {
        assert_eq!(
            parse_sha256_hex(&format!(" {} ", "Ab".repeat(32))),
            Some([0xab; 32])
        );
        assert_eq!(parse_sha256_hex(&"a".repeat(63)), None);
        assert_eq!(parse_sha256_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn forms() {
        let hex = "3f".repeat(32);
        let fp: Fingerprint = hex.parse().unwrap();
        let colons = fp.to_string();
        assert_eq!(colons.len(), 95);
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            format!("SHA256 Fingerprint={colons}")
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        for bad in [&hex[1..], &colons[1..], "zz".repeat(32).as_str(), "", "é"] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }
}
