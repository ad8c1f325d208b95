//! Connections to the PostgreSQL server: TLS set-up (rustls with the aws-lc-rs provider),
//! connecting with a deadline under the password guard ([`super::guard`]), and sorting
//! connection failures into the error kinds the engine acts on (unreachable = fail open; auth,
//! TLS and an unverified server asking for a readable password = configuration errors).
//!
//! What "verified" means, per `tls` mode (it decides whether a cleartext or MD5 password
//! request may be answered; SCRAM is answered in every mode, as it never shows the password):
//!
//! | `tls` | certificate check | verified |
//! |---|---|---|
//! | `disable` | none (no TLS) | no |
//! | `require` | handshake signatures only | no |
//! | `require` + `ca_file` | chain to `ca_file`, any name (libpq's `verify-ca`) | yes |
//! | `verify-full` | chain to `ca_file` or the system roots, and the `host` name | yes |

use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_postgres::config::{ChannelBinding, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::error::{BoxError, DatabaseError};
use super::guard::{AuthMethod, Guard, GuardedTls};
use super::secret::Secret;
use super::{DatabaseSettings, TlsMode};
use crate::tls::SignaturesOnly;

/// How connections are secured, built once per provisioning run from the settings.
pub(crate) struct Tls {
    /// `None` with `tls: disable`.
    rustls: Option<MakeRustlsConnect>,
    /// The server's certificate is checked against a CA the operator chose (see the table in
    /// the module documentation); only then may a password go out as cleartext or MD5.
    server_verified: bool,
}

impl Tls {
    pub(crate) fn from_settings(settings: &DatabaseSettings) -> Result<Tls, DatabaseError> {
        let provider = crate::tls::provider();
        let server_verified = match settings.tls {
            TlsMode::Disable => false,
            TlsMode::Require => settings.ca_file.is_some(),
            TlsMode::VerifyFull => true,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match settings.tls {
            TlsMode::Disable => {
                return Ok(Tls {
                    rustls: None,
                    server_verified: false,
                });
            }
            // libpq's rule: `require` checks nothing, unless a root CA is given; then the
            // chain is verified but not the name (libpq's verify-ca).
            TlsMode::Require => match &settings.ca_file {
                None => Arc::new(SignaturesOnly::new(&provider)),
                Some(ca) => Arc::new(ChainOnly {
                    roots: Arc::new(load_ca_file(ca)?),
                    provider: provider.clone(),
                    signatures: SignaturesOnly::new(&provider),
                }),
            },
            // The server name (host name or IP address as configured in `host`) must match the
            // certificate, which must chain to the CA file or, without one, to the system roots
            // (/etc/ssl/certs; add the RDS or Cloud SQL CA there or give it as `ca_file`).
            TlsMode::VerifyFull => {
                let roots = match &settings.ca_file {
                    Some(ca) => load_ca_file(ca)?,
                    None => system_roots()?,
                };
                webpki_verifier(roots, &provider)?
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("set up rustls", e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Tls {
            rustls: Some(MakeRustlsConnect::new(config)),
            server_verified,
        })
    }

    /// Why the server is not verified, for the error; `None` when it is.
    fn unverified_reason(&self) -> Option<&'static str> {
        match (&self.rustls, self.server_verified) {
            (_, true) => None,
            (None, false) => Some("tls: disable, no TLS at all"),
            (Some(_), false) => Some("tls: require without ca_file checks no certificate"),
        }
    }
}

/// Who connects where.
pub(crate) struct Login<'a> {
    pub user: &'a str,
    pub password: Option<&'a Secret>,
    pub database: &'a str,
}

/// Why a connection failed, kept raw so that callers can ask "was it the password?" before
/// turning it into a [`DatabaseError`] with [`ConnectFailure::into_error`].
pub(crate) enum ConnectFailure {
    /// The whole connect (TCP, TLS, startup, authentication) ran past the deadline.
    TimedOut(Duration),
    /// No TCP connection (name not found, refused, no route).
    Tcp(std::io::Error),
    /// The password guard dropped the connection on this request (see [`super::guard`]).
    Refused {
        method: AuthMethod,
        reason: &'static str,
    },
    Postgres(tokio_postgres::Error),
}

impl ConnectFailure {
    /// The server said the password is wrong (SQLSTATE 28P01). Also what PostgreSQL answers
    /// for a role that does not exist, so that probing cannot tell the two apart.
    pub(crate) fn is_wrong_password(&self) -> bool {
        matches!(self, ConnectFailure::Postgres(e) if e.code() == Some(&SqlState::INVALID_PASSWORD))
    }

    pub(crate) fn into_error(
        self,
        settings: &DatabaseSettings,
        login: &Login<'_>,
    ) -> DatabaseError {
        let unreachable = |source: BoxError| DatabaseError::Unreachable {
            host: settings.host.clone(),
            port: settings.port,
            source,
        };
        let err = match self {
            ConnectFailure::TimedOut(after) => {
                return unreachable(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {}s", after.as_secs_f32()),
                )));
            }
            ConnectFailure::Tcp(err) => return unreachable(Box::new(err)),
            ConnectFailure::Refused { method, reason } => {
                return DatabaseError::UnverifiedServer {
                    host: settings.host.clone(),
                    port: settings.port,
                    user: login.user.to_owned(),
                    method: method.as_str(),
                    reason,
                };
            }
            ConnectFailure::Postgres(err) => err,
        };
        if let Some(code) = err.code() {
            return if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            {
                DatabaseError::Auth {
                    user: login.user.to_owned(),
                    source: Box::new(err),
                }
            } else if *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
            {
                // Starting up, shutting down, or full: it will take connections again later.
                unreachable(Box::new(err))
            } else {
                DatabaseError::query(
                    format!(
                        "connect as {:?} to database {:?}",
                        login.user, login.database
                    ),
                    err,
                )
            };
        }
        // tokio-postgres does not expose its error kind; its Display is the kind's fixed text
        // (tokio-postgres src/error/mod.rs), and the cause chain holds rustls' error.
        let text = err.to_string();
        if text.starts_with("error performing TLS handshake") || has_rustls_cause(&err) {
            DatabaseError::Tls {
                context: format!("handshake with {}:{}", settings.host, settings.port),
                source: Box::new(err),
            }
        } else if text.starts_with("authentication error")
            || text.starts_with("invalid configuration")
        {
            // SCRAM exchange failed, or the server asked for a password we do not have.
            DatabaseError::Auth {
                user: login.user.to_owned(),
                source: Box::new(err),
            }
        } else {
            // Connect, I/O, timeout, closed: the network or the server is not there.
            unreachable(Box::new(err))
        }
    }
}

fn has_rustls_cause(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = err.source();
    while let Some(c) = cause {
        if c.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Connects with one deadline for everything (TCP, TLS, startup and authentication):
/// tokio-postgres' own `connect_timeout` covers only the TCP connect, and a server that
/// accepts and then says nothing must not hold the step.
///
/// The TCP connection is made here and handed to `connect_raw`, so that the password guard
/// can sit on the protocol stream in both cases: over the TLS stream (through [`GuardedTls`])
/// or over the plain socket with `tls: disable` (tokio-postgres' own `connect` would give no
/// hook for the latter).
pub(crate) async fn connect(
    settings: &DatabaseSettings,
    tls: &Tls,
    login: &Login<'_>,
) -> Result<Client, ConnectFailure> {
    let timeout = settings.connect_timeout();
    let mut config = tokio_postgres::Config::new();
    config
        .user(login.user)
        .dbname(login.database)
        .application_name("pilot-agent")
        .ssl_mode(match tls.rustls {
            None => SslMode::Disable,
            Some(_) => SslMode::Require,
        })
        // The default, stated: SCRAM-SHA-256-PLUS whenever TLS is on and the server offers it,
        // which ties the login to the certificate this connection saw, so a relay that
        // terminates TLS cannot pass it on. Not `Require`: that also refuses servers without
        // SCRAM (a verified server asking for a password) and poolers without channel binding.
        .channel_binding(ChannelBinding::Prefer);
    if let Some(password) = login.password {
        config.password(password.expose());
    }
    let guard = Guard::new(tls.server_verified);
    let connecting = async {
        let tcp = TcpStream::connect((settings.host.as_str(), settings.port))
            .await
            .map_err(ConnectFailure::Tcp)?;
        // As tokio-postgres does for its own sockets: the protocol is small request/response.
        // (Its TCP keepalive, 2 h idle, is not missed: every statement has its own deadline.)
        tcp.set_nodelay(true).map_err(ConnectFailure::Tcp)?;
        let client = match &tls.rustls {
            None => {
                let (client, connection) = config
                    .connect_raw(guard.clone().wrap(tcp), NoTls)
                    .await
                    .map_err(ConnectFailure::Postgres)?;
                tokio::spawn(drive(connection));
                client
            }
            Some(make) => {
                let connector = MakeTlsConnect::<TcpStream>::make_tls_connect(
                    &mut make.clone(),
                    &settings.host,
                )
                .unwrap_or_else(|never| match never {});
                let guarded = GuardedTls {
                    tls: connector,
                    guard: guard.clone(),
                };
                let (client, connection) = config
                    .connect_raw(tcp, guarded)
                    .await
                    .map_err(ConnectFailure::Postgres)?;
                tokio::spawn(drive(connection));
                client
            }
        };
        Ok::<_, ConnectFailure>(client)
    };
    let result = match tokio::time::timeout(timeout, connecting).await {
        Ok(result) => result,
        Err(_) => Err(ConnectFailure::TimedOut(timeout)),
    };
    let seen = guard.seen();
    match (result, seen.refused, tls.unverified_reason()) {
        // The guard's refusal explains tokio-postgres' I/O error.
        (Err(_), Some(method), Some(reason)) => Err(ConnectFailure::Refused { method, reason }),
        (Ok(client), _, _) => {
            tracing::debug!(
                host = %settings.host,
                port = settings.port,
                user = login.user,
                database = login.database,
                tls = %settings.tls,
                method = seen.method.map(AuthMethod::as_str).unwrap_or("unknown"),
                "logged in to the database server"
            );
            Ok(client)
        }
        (Err(failure), _, _) => Err(failure),
    }
}

/// Runs a connection's I/O until its client is dropped. Errors here also reach the client's
/// next call, where they are reported with context; this log line is only for debugging.
async fn drive<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "database connection ended with an error");
    }
}

fn tls_error(context: impl Into<String>, source: impl Into<BoxError>) -> DatabaseError {
    DatabaseError::Tls {
        context: context.into(),
        source: source.into(),
    }
}

fn load_ca_file(path: &std::path::Path) -> Result<RootCertStore, DatabaseError> {
    let context = || format!("read ca_file {}", path.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(context(), e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(context(), e))?;
    if certs.is_empty() {
        return Err(tls_error(context(), "no PEM certificate in the file"));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| tls_error(context(), e))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, DatabaseError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let reason = found
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "the system store is empty".to_owned());
        return Err(tls_error(
            "load the system root certificates (set ca_file instead)",
            reason,
        ));
    }
    Ok(roots)
}

fn webpki_verifier(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, DatabaseError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| tls_error("build the certificate verifier", e))
}

/// `require` with a CA: the chain must lead to the CA, the name is not checked (libpq's
/// `verify-ca`), for servers reached by an address their certificate does not list.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    signatures: SignaturesOnly,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The same chain check WebPkiServerVerifier makes, without its name check.
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
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
