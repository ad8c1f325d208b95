//! The agent's private CA and the certificates it signs (rcgen), under `STATE_DIR/pki`:
//!
//! ```text
//! pki/ca/ca.pem, ca-key.pem          the CA (key 0600, directory 0700)
//! pki/server/{ca,cert,key}.pem       dockerd's TLS identity (serverAuth, host SANs)
//! pki/runner/{ca,cert,key}.pem       client certificates (clientAuth) in the docker CLI's
//! pki/operator/{ca,cert,key}.pem     layout: DOCKER_CERT_PATH=pki/operator
//! pki/waypoint/{ca,cert,key}.pem     the Waypoint server's TLS identity (serverAuth, host
//!                                    SANs, `waypoint-server`, the advertise address)
//! ```
//!
//! [`ensure`] checks every file before it acts, and re-issues a certificate only when it is
//! missing or unreadable, expires within `renew_before_days` (or is not valid yet), was not
//! signed by the current CA, has the wrong purpose, carries other SANs than wanted, or does
//! not match its key. That last rule heals a run killed between writing a key and its
//! certificate. A CA certificate is re-made from the same key and subject, so certificates
//! already handed out stay valid; a lost CA key makes a new CA and re-issues everything, and
//! an unreadable one is an error (the agent never silently replaces a trust root).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::addresses::San;
use crate::config::PkiConfig;
use crate::fsutil::{self, FsError, MODE_PRIVATE_DIR, MODE_PUBLIC, MODE_SECRET};

/// The client certificates every host gets.
pub const CLIENTS: &[&str] = &["runner", "operator"];

/// Certificates are back-dated this much so that a client whose clock is slightly behind
/// accepts a certificate made a moment ago.
const BACKDATE: Duration = Duration::hours(1);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "the CA key {path} cannot be read ({source}); move it away to make a new CA \
         (every certificate will then be re-issued and must be fetched again)"
    )]
    CaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot make {what} for {path}: {source}")]
    Generate {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot make a random serial number: {0}")]
    Random(String),
}

pub use crate::layout::{LeafPaths, PkiLayout, SERVER_LEAF as SERVER, WAYPOINT_LEAF as WAYPOINT};

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// TLS server (extended key usage serverAuth), with subject alternative names.
    Server,
    /// TLS client (clientAuth).
    Client,
}

/// A certificate the CA must keep issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    pub name: String,
    pub profile: Profile,
    pub sans: BTreeSet<San>,
}

impl LeafSpec {
    pub fn server(sans: BTreeSet<San>) -> Self {
        LeafSpec {
            name: SERVER.into(),
            profile: Profile::Server,
            sans,
        }
    }

    pub fn client(name: &str) -> Self {
        LeafSpec {
            name: name.into(),
            profile: Profile::Client,
            sans: BTreeSet::new(),
        }
    }
}

/// Why a certificate was (re-)issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Missing,
    Unreadable,
    KeyMismatch,
    NotIssuedByCa,
    WrongProfile,
    SansChanged,
    Expiring,
    NotYetValid,
    NewKey,
}

impl Reason {
    fn as_str(&self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Unreadable => "unreadable",
            Reason::KeyMismatch => "did not match its key",
            Reason::NotIssuedByCa => "not signed by the current CA",
            Reason::WrongProfile => "wrong purpose",
            Reason::SansChanged => "host names or addresses changed",
            Reason::Expiring => "expiring",
            Reason::NotYetValid => "not valid yet",
            Reason::NewKey => "new key",
        }
    }
}

/// What [`ensure`] did for one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertAction {
    Kept,
    Issued(Reason),
}

/// The outcome of [`ensure`].
#[derive(Debug, Clone)]
pub struct PkiReport {
    pub ca: CertAction,
    pub leaves: Vec<(String, CertAction)>,
    /// Whether any file under the PKI directory was written (content or mode).
    pub files_changed: bool,
    /// The earliest expiry among the CA and the certificates after the run.
    pub earliest_expiry: OffsetDateTime,
}

impl PkiReport {
    pub fn issued_any(&self) -> bool {
        self.ca != CertAction::Kept || self.leaves.iter().any(|(_, a)| *a != CertAction::Kept)
    }

    /// One line for the status file.
    pub fn summary(&self) -> String {
        let mut issued = Vec::new();
        if let CertAction::Issued(r) = &self.ca {
            issued.push(format!("ca ({})", r.as_str()));
        }
        for (name, action) in &self.leaves {
            if let CertAction::Issued(r) = action {
                issued.push(format!("{name} ({})", r.as_str()));
            }
        }
        let expiry = self.earliest_expiry.date();
        if issued.is_empty() {
            format!(
                "CA and {} certificates valid; earliest expiry {expiry}",
                self.leaves.len()
            )
        } else {
            format!("issued {}; earliest expiry {expiry}", issued.join(", "))
        }
    }
}

/// Lifetimes, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub ca_validity: Duration,
    pub cert_validity: Duration,
    pub renew_before: Duration,
}

impl From<&PkiConfig> for Policy {
    fn from(c: &PkiConfig) -> Self {
        Policy {
            ca_validity: Duration::days(c.ca_validity_days.into()),
            cert_validity: Duration::days(c.cert_validity_days.into()),
            renew_before: Duration::days(c.renew_before_days.into()),
        }
    }
}

/// Brings the CA and `leaves` to a valid state (see the module doc), as of `now`.
pub fn ensure(
    layout: &PkiLayout,
    policy: &Policy,
    leaves: &[LeafSpec],
    now: OffsetDateTime,
) -> Result<PkiReport, PkiError> {
    let mut changed = fsutil::ensure_dir(layout.root(), MODE_PRIVATE_DIR)?;
    changed |= fsutil::ensure_dir(&layout.ca_dir(), MODE_PRIVATE_DIR)?;

    let ca = ensure_ca(layout, policy, now, &mut changed)?;
    let mut earliest = ca.not_after;
    let mut report_leaves = Vec::new();
    for spec in leaves {
        let (action, not_after) = ensure_leaf(layout, policy, &ca, spec, now, &mut changed)?;
        earliest = earliest.min(not_after);
        report_leaves.push((spec.name.clone(), action));
    }
    Ok(PkiReport {
        ca: ca.action,
        leaves: report_leaves,
        files_changed: changed,
        earliest_expiry: earliest,
    })
}

/// The CA as loaded or made in this run.
struct Ca {
    key: KeyPair,
    params: CertificateParams,
    cert_pem: String,
    cert_der: Vec<u8>,
    not_after: OffsetDateTime,
    action: CertAction,
}

fn ensure_ca(
    layout: &PkiLayout,
    policy: &Policy,
    now: OffsetDateTime,
    changed: &mut bool,
) -> Result<Ca, PkiError> {
    let key_path = layout.ca_key();
    let cert_path = layout.ca_cert();
    let (key, new_key) = match fsutil::read_optional(&key_path)? {
        Some(bytes) => {
            let pem = String::from_utf8_lossy(&bytes);
            let key = KeyPair::from_pem(&pem).map_err(|source| PkiError::CaKey {
                path: key_path.clone(),
                source,
            })?;
            // Keep the mode right even if someone loosened it.
            *changed |= fsutil::write_atomic(&key_path, &bytes, MODE_SECRET)?.changed();
            (key, false)
        }
        None => {
            let key = generate_key(&key_path)?;
            fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), MODE_SECRET)?;
            *changed = true;
            (key, true)
        }
    };

    // The subject is derived from the key alone, so a CA certificate re-made from the same
    // key has the same subject and key identifier: certificates signed earlier still chain.
    let spki = key.subject_public_key_info();
    let subject = ca_subject(&spki);

    let verdict = match fsutil::read_optional(&cert_path)? {
        _ if new_key => Err(Reason::NewKey),
        None => Err(Reason::Missing),
        Some(bytes) => match parse_pem_cert(&bytes) {
            None => Err(Reason::Unreadable),
            Some(der) => check_ca_cert(&der, &spki, &subject, policy, now)
                .map(|not_after| (bytes, der, not_after)),
        },
    };
    match verdict {
        Ok((bytes, der, not_after)) => {
            // Rewriting the same bytes only corrects the mode if someone changed it.
            *changed |= fsutil::write_atomic(&cert_path, &bytes, MODE_PUBLIC)?.changed();
            let cert_pem = String::from_utf8_lossy(&bytes).into_owned();
            let params = ca_params(subject, now, policy);
            Ok(Ca {
                key,
                params,
                cert_pem,
                cert_der: der,
                not_after,
                action: CertAction::Kept,
            })
        }
        Err(reason) => {
            let mut params = ca_params(subject, now, policy);
            params.serial_number = Some(random_serial()?);
            let cert = params
                .self_signed(&key)
                .map_err(|source| PkiError::Generate {
                    what: "the CA certificate",
                    path: cert_path.clone(),
                    source,
                })?;
            let cert_pem = cert.pem();
            fsutil::write_atomic(&cert_path, cert_pem.as_bytes(), MODE_PUBLIC)?;
            *changed = true;
            tracing::info!(reason = reason.as_str(), "made the CA certificate");
            Ok(Ca {
                not_after: params.not_after,
                key,
                params,
                cert_der: cert.der().to_vec(),
                cert_pem,
                action: CertAction::Issued(reason),
            })
        }
    }
}

fn ca_subject(spki: &[u8]) -> DistinguishedName {
    let digest = Sha256::digest(spki);
    let id: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pilot");
    dn.push(DnType::CommonName, format!("pilot-agent CA {id}"));
    dn
}

fn ca_params(
    subject: DistinguishedName,
    now: OffsetDateTime,
    policy: &Policy,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + policy.ca_validity;
    params
}

/// Checks an existing CA certificate; returns its expiry when it can stay.
fn check_ca_cert(
    der: &[u8],
    spki: &[u8],
    subject: &DistinguishedName,
    policy: &Policy,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, Reason> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| Reason::Unreadable)?;
    if cert.public_key().raw != spki {
        return Err(Reason::KeyMismatch);
    }
    if !cert.is_ca() {
        return Err(Reason::WrongProfile);
    }
    let want_cn = subject
        .get(&DnType::CommonName)
        .and_then(|v| match v {
            rcgen::DnValue::Utf8String(s) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or_default();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok());
    if cn != Some(want_cn) {
        return Err(Reason::WrongProfile);
    }
    check_validity(&cert, policy, now)
}

fn check_validity(
    cert: &X509Certificate<'_>,
    policy: &Policy,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, Reason> {
    let not_before = cert.validity().not_before.to_datetime();
    let not_after = cert.validity().not_after.to_datetime();
    if not_before > now {
        return Err(Reason::NotYetValid);
    }
    if not_after - now < policy.renew_before {
        return Err(Reason::Expiring);
    }
    Ok(not_after)
}

fn ensure_leaf(
    layout: &PkiLayout,
    policy: &Policy,
    ca: &Ca,
    spec: &LeafSpec,
    now: OffsetDateTime,
    changed: &mut bool,
) -> Result<(CertAction, OffsetDateTime), PkiError> {
    let paths = layout.leaf(&spec.name);
    *changed |= fsutil::ensure_dir(&paths.dir, MODE_PRIVATE_DIR)?;
    // The CA copy first: a client directory is usable as soon as cert and key match.
    *changed |= fsutil::write_atomic(&paths.ca, ca.cert_pem.as_bytes(), MODE_PUBLIC)?.changed();

    let key_bytes = fsutil::read_optional(&paths.key)?;
    let key = key_bytes
        .as_ref()
        .and_then(|b| KeyPair::from_pem(&String::from_utf8_lossy(b)).ok());
    if let (Some(_), Some(bytes)) = (&key, &key_bytes) {
        *changed |= fsutil::write_atomic(&paths.key, bytes, MODE_SECRET)?.changed();
    }

    let verdict = match (&key, fsutil::read_optional(&paths.cert)?) {
        (None, _) => Err(Reason::NewKey),
        (Some(_), None) => Err(Reason::Missing),
        (Some(key), Some(pem)) => match parse_pem_cert(&pem) {
            None => Err(Reason::Unreadable),
            Some(der) => check_leaf(&der, key, ca, spec, policy, now),
        },
    };
    let reason = match verdict {
        Ok(not_after) => return Ok((CertAction::Kept, not_after)),
        Err(reason) => reason,
    };

    // A key that matches nothing (a run killed between key and certificate) is still a good
    // key: certify it. Otherwise start over with a fresh key, key file first.
    let key = match (key, &reason) {
        (Some(key), Reason::KeyMismatch | Reason::Missing) => key,
        _ => {
            let key = generate_key(&paths.key)?;
            fsutil::write_atomic(&paths.key, key.serialize_pem().as_bytes(), MODE_SECRET)?;
            key
        }
    };
    let params = leaf_params(spec, now, policy)?;
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Generate {
            what: "a certificate",
            path: paths.cert.clone(),
            source,
        })?;
    fsutil::write_atomic(&paths.cert, cert.pem().as_bytes(), MODE_PUBLIC)?;
    *changed = true;
    tracing::info!(
        certificate = spec.name,
        reason = reason.as_str(),
        "issued certificate"
    );
    Ok((CertAction::Issued(reason), params.not_after))
}

fn check_leaf(
    der: &[u8],
    key: &KeyPair,
    ca: &Ca,
    spec: &LeafSpec,
    policy: &Policy,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, Reason> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| Reason::Unreadable)?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(Reason::KeyMismatch);
    }
    let (_, ca_cert) = X509Certificate::from_der(&ca.cert_der).map_err(|_| Reason::Unreadable)?;
    if cert.issuer().as_raw() != ca_cert.subject().as_raw()
        || cert.verify_signature(Some(ca_cert.public_key())).is_err()
    {
        return Err(Reason::NotIssuedByCa);
    }
    let eku = cert
        .extended_key_usage()
        .ok()
        .flatten()
        .map(|e| (e.value.server_auth, e.value.client_auth));
    let purpose_ok = match spec.profile {
        Profile::Server => eku == Some((true, false)),
        Profile::Client => eku == Some((false, true)),
    };
    if !purpose_ok {
        return Err(Reason::WrongProfile);
    }
    if cert_sans(&cert) != spec.sans {
        return Err(Reason::SansChanged);
    }
    check_validity(&cert, policy, now)
}

/// The subject alternative names a certificate carries.
pub fn cert_sans(cert: &X509Certificate<'_>) -> BTreeSet<San> {
    let mut sans = BTreeSet::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => {
                    sans.insert(San::Dns(d.to_ascii_lowercase()));
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.insert(San::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }
    sans
}

fn leaf_params(
    spec: &LeafSpec,
    now: OffsetDateTime,
    policy: &Policy,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pilot");
    dn.push(DnType::CommonName, format!("pilot-agent {}", spec.name));
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match spec.profile {
        Profile::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Profile::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = now + policy.cert_validity;
    params.serial_number = Some(random_serial()?);
    for san in &spec.sans {
        params.subject_alt_names.push(match san {
            San::Ip(ip) => SanType::IpAddress(*ip),
            San::Dns(name) => {
                SanType::DnsName(
                    name.as_str()
                        .try_into()
                        .map_err(|source| PkiError::Generate {
                            what: "a subject alternative name",
                            path: PathBuf::from(name),
                            source,
                        })?,
                )
            }
        });
    }
    Ok(params)
}

fn generate_key(path: &Path) -> Result<KeyPair, PkiError> {
    // ECDSA P-256: small, fast, and accepted by Docker's Go TLS stack and every client.
    KeyPair::generate().map_err(|source| PkiError::Generate {
        what: "a key",
        path: path.to_path_buf(),
        source,
    })
}

/// A random positive 127-bit serial: unique per certificate, as RFC 5280 asks, even when the
/// same key is certified again.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| PkiError::Random(e.to_string()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The DER of the first certificate in a PEM file.
pub fn parse_pem_cert(pem: &[u8]) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    (pem.label == "CERTIFICATE").then_some(pem.contents)
}
