//! The password guard: a thin wrapper over the connection's byte stream (after TLS, when TLS is
//! on) that reads the server's authentication requests before tokio-postgres does, and fails
//! the connection when a server whose identity was not verified asks for the password in a
//! form it could read or crack (cleartext, MD5).
//!
//! tokio-postgres answers whatever method the server asks for, as soon as it has decoded the
//! request; it has no switch to refuse one. The guard sits below its decoder: the bytes of a
//! refused request are never handed up, so tokio-postgres never sees it and never writes the
//! PasswordMessage. One connection, no probe: nothing can change between the check and the
//! answer.
//!
//! It also notes which SASL mechanism tokio-postgres chose (the first message it writes after
//! a SASL request), so that a login can be logged as `SCRAM-SHA-256-PLUS` (bound to the TLS
//! channel) or `SCRAM-SHA-256`.
//!
//! After `AuthenticationOk` it only passes bytes through.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

/// Authentication request codes of the backend's `R` message (PostgreSQL protocol 3.0).
const AUTH_OK: u32 = 0;
const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;

/// How the server had the client log in, as far as the guard saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthMethod {
    /// `AuthenticationOk` straight away: trust, peer, or a client certificate.
    NoPassword,
    Cleartext,
    Md5,
    ScramSha256,
    /// SCRAM bound to the TLS channel (`tls-server-end-point`): a man in the middle that
    /// terminates TLS cannot pass the login on to the real server.
    ScramSha256Plus,
    /// A SASL mechanism tokio-postgres does not know (it refuses it itself).
    OtherSasl,
    /// Kerberos, GSS, SSPI and the like: tokio-postgres refuses them itself.
    Unsupported(u32),
}

impl AuthMethod {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuthMethod::NoPassword => "none (no password asked)",
            AuthMethod::Cleartext => "cleartext password",
            AuthMethod::Md5 => "MD5 password",
            AuthMethod::ScramSha256 => "SCRAM-SHA-256",
            AuthMethod::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
            AuthMethod::OtherSasl => "SASL (unknown mechanism)",
            AuthMethod::Unsupported(_) => "unsupported method",
        }
    }
}

/// What the guard of one connection saw; read by `connect` after tokio-postgres returns.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Seen {
    /// The method of the login (for SASL: the mechanism tokio-postgres chose).
    pub method: Option<AuthMethod>,
    /// The request the guard refused; the connection failed because of it.
    pub refused: Option<AuthMethod>,
}

/// The guard of one connection: the rule and where it reports. Clone it to keep a handle on
/// what it saw ([`Guard::seen`]) before handing it to the connection.
#[derive(Clone)]
pub(crate) struct Guard {
    /// The server's certificate chain was verified against a CA the operator chose; only then
    /// may the password travel in a form the server can read (cleartext) or crack (MD5).
    server_verified: bool,
    seen: Arc<Mutex<Seen>>,
}

impl Guard {
    pub(crate) fn new(server_verified: bool) -> Guard {
        Guard {
            server_verified,
            seen: Arc::default(),
        }
    }

    pub(crate) fn seen(&self) -> Seen {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut self.seen.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Wraps a stream that carries the protocol in the clear (a TCP stream without TLS, or
    /// the TLS stream itself).
    pub(crate) fn wrap<S>(self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            guard: self,
            framing: Framing::default(),
            authenticated: false,
            refused: None,
            sasl_choice: None,
        }
    }
}

/// The error a guarded stream fails with. `connect` reports the refusal from [`Seen`], so this
/// text only shows where tokio-postgres' own error is printed.
#[derive(Debug, thiserror::Error)]
#[error("refused the server's {} request: its certificate was not verified", .0.as_str())]
pub(crate) struct Refused(pub AuthMethod);

fn refused(method: AuthMethod) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, Refused(method))
}

/// The backend message framing (type byte, then a big-endian length that counts itself but not
/// the type byte, then the body), walked byte by byte with at most 9 bytes kept: the header and,
/// for an authentication request (`R`), its code.
#[derive(Default)]
struct Framing {
    head: [u8; 9],
    have: usize,
    /// Body bytes of the current message still to pass over.
    skip: usize,
}

impl Framing {
    fn len(&self) -> u32 {
        u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]])
    }

    /// Header bytes wanted: type and length, plus the code of an `R` that has room for one.
    fn want(&self) -> usize {
        if self.have >= 5 && self.head[0] == b'R' && self.len() >= 8 {
            9
        } else {
            5
        }
    }

    /// Feeds bytes read from the server; `on_auth` gets each authentication request code and
    /// may stop the scan with an error, or with `Ok(true)` once authentication is over.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_auth: impl FnMut(u32) -> io::Result<bool>,
    ) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (self.want() - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            // Still short, or the length just arrived and says an `R` code follows.
            if self.have < self.want() {
                continue;
            }
            let code = (self.have == 9).then(|| {
                u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]])
            });
            // A malformed length (below 4) is tokio-postgres' to report; here it skips nothing.
            self.skip = (self.len() as usize).saturating_sub(4 + (self.have - 5));
            self.have = 0;
            if let Some(code) = code
                && on_auth(code)?
            {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// A stream under a [`Guard`]; see the module documentation.
pub(crate) struct Guarded<S> {
    inner: S,
    guard: Guard,
    framing: Framing,
    /// `AuthenticationOk` went by: nothing more to watch.
    authenticated: bool,
    /// Sticky: once refused, the stream neither reads nor writes again.
    refused: Option<AuthMethod>,
    /// After a SASL request: the first bytes tokio-postgres writes (its SASLInitialResponse,
    /// `p`, length, mechanism name, NUL), until the mechanism name is complete.
    sasl_choice: Option<Vec<u8>>,
}

impl<S> Guarded<S> {
    /// Checks the bytes just read from the server.
    fn check_backend(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Guarded {
            guard,
            framing,
            authenticated,
            refused: refused_slot,
            sasl_choice,
            ..
        } = self;
        framing.feed(bytes, |code| {
            let method = match code {
                AUTH_OK => {
                    *authenticated = true;
                    guard.record(|s| {
                        s.method.get_or_insert(AuthMethod::NoPassword);
                    });
                    return Ok(true);
                }
                AUTH_SASL => {
                    *sasl_choice = Some(Vec::new());
                    AuthMethod::OtherSasl
                }
                AUTH_SASL_CONTINUE | AUTH_SASL_FINAL => return Ok(false),
                AUTH_CLEARTEXT => AuthMethod::Cleartext,
                AUTH_MD5 => AuthMethod::Md5,
                other => AuthMethod::Unsupported(other),
            };
            guard.record(|s| s.method = Some(method));
            if matches!(method, AuthMethod::Cleartext | AuthMethod::Md5) && !guard.server_verified {
                *refused_slot = Some(method);
                guard.record(|s| s.refused = Some(method));
                return Err(refused(method));
            }
            Ok(false)
        })
    }

    /// Notes the SASL mechanism from the bytes tokio-postgres just wrote.
    fn note_sasl_choice(&mut self, written: &[u8]) {
        let Some(buf) = &mut self.sasl_choice else {
            return;
        };
        // `p`, 4 length bytes, then the longest name ("SCRAM-SHA-256-PLUS") and its NUL.
        const ENOUGH: usize = 5 + 32;
        let room = ENOUGH.saturating_sub(buf.len());
        buf.extend_from_slice(&written[..written.len().min(room)]);
        if buf.len() <= 5 {
            return;
        }
        let name = buf[5..]
            .iter()
            .position(|&b| b == 0)
            .map(|end| &buf[5..5 + end]);
        let method = match (buf[0], name) {
            (b'p', Some(b"SCRAM-SHA-256-PLUS")) => Some(AuthMethod::ScramSha256Plus),
            (b'p', Some(b"SCRAM-SHA-256")) => Some(AuthMethod::ScramSha256),
            (b'p', None) if buf.len() < ENOUGH => return,
            _ => None,
        };
        if let Some(method) = method {
            self.guard.record(|s| s.method = Some(method));
        }
        self.sasl_choice = None;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(method) = this.refused {
            return Poll::Ready(Err(refused(method)));
        }
        if this.authenticated {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Err(e) = this.check_backend(&buf.filled()[before..]) {
            // Take the bytes back: the refused request must not reach tokio-postgres.
            buf.set_filled(before);
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(method) = this.refused {
            return Poll::Ready(Err(refused(method)));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.note_sasl_choice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for Guarded<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// A TLS connector whose stream comes out guarded: the guard sees the protocol after TLS.
pub(crate) struct GuardedTls<T> {
    pub tls: T,
    pub guard: Guard,
}

impl<S, T> TlsConnect<S> for GuardedTls<T>
where
    T: TlsConnect<S>,
    T::Future: Send + 'static,
    T::Stream: Send + 'static,
    T::Error: Send + 'static,
{
    type Stream = Guarded<T::Stream>;
    type Error = T::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Stream, T::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let GuardedTls { tls, guard } = self;
        let handshake = tls.connect(stream);
        Box::pin(async move { Ok(guard.wrap(handshake.await?)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&(8 + extra.len() as u32).to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(extra);
        m
    }

    /// Feeds `bytes` in chunks of `chunk`, returning the codes seen and whether it stopped.
    fn codes(bytes: &[u8], chunk: usize) -> Vec<u32> {
        let mut framing = Framing::default();
        let mut seen = Vec::new();
        for part in bytes.chunks(chunk) {
            framing
                .feed(part, |c| {
                    seen.push(c);
                    Ok(false)
                })
                .unwrap();
        }
        seen
    }

    #[test]
    fn framing_finds_every_auth_request_whatever_the_chunking() {
        let mut stream = Vec::new();
        // A notice (not `R`) first, then SASL with its mechanism list, continue, final, ok.
        stream.extend_from_slice(b"N\0\0\0\x09abcde");
        stream.extend(auth(AUTH_SASL, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"));
        stream.extend(auth(AUTH_SASL_CONTINUE, b"r=nonce,s=salt,i=4096"));
        stream.extend(auth(AUTH_SASL_FINAL, b"v=proof"));
        stream.extend(auth(AUTH_OK, b""));
        stream.extend_from_slice(b"S\0\0\0\x05x");
        for chunk in [1, 2, 3, 5, 8, 9, 13, 1000] {
            assert_eq!(codes(&stream, chunk), vec![10, 11, 12, 0,], "chunk {chunk}");
        }
    }

    #[test]
    fn a_short_r_message_has_no_code_and_does_not_derail_the_framing() {
        let mut stream = b"R\0\0\0\x04".to_vec();
        stream.extend(auth(AUTH_MD5, b"salt"));
        for chunk in [1, 4, 100] {
            assert_eq!(codes(&stream, chunk), vec![5], "chunk {chunk}");
        }
    }

    #[tokio::test]
    async fn cleartext_and_md5_are_taken_back_unless_verified() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (code, method) in [
            (AUTH_CLEARTEXT, AuthMethod::Cleartext),
            (AUTH_MD5, AuthMethod::Md5),
        ] {
            for verified in [false, true] {
                let (mut server, client) = tokio::io::duplex(64);
                let guard = Guard::new(verified);
                let mut guarded = guard.clone().wrap(client);
                server
                    .write_all(&auth(code, if code == AUTH_MD5 { b"salt" } else { b"" }))
                    .await
                    .unwrap();
                let mut buf = [0u8; 64];
                let got = guarded.read(&mut buf).await;
                if verified {
                    assert!(got.unwrap() >= 9);
                    assert_eq!(guard.seen().refused, None);
                } else {
                    let err = got.unwrap_err();
                    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
                    assert_eq!(guard.seen().refused, Some(method));
                    // Sticky, both ways.
                    assert!(guarded.read(&mut buf).await.is_err());
                    assert!(guarded.write_all(b"p\0\0\0\x08pw\0").await.is_err());
                }
            }
        }
    }

    #[tokio::test]
    async fn the_chosen_sasl_mechanism_is_noted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (name, method) in [
            (&b"SCRAM-SHA-256-PLUS"[..], AuthMethod::ScramSha256Plus),
            (b"SCRAM-SHA-256", AuthMethod::ScramSha256),
        ] {
            let (mut server, client) = tokio::io::duplex(256);
            let guard = Guard::new(false);
            let mut guarded = guard.clone().wrap(client);
            let request = auth(AUTH_SASL, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
            server.write_all(&request).await.unwrap();
            let mut buf = vec![0u8; request.len()];
            guarded.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, request, "a SASL request passes through");
            let mut msg = vec![b'p', 0, 0, 0, 0];
            msg.extend_from_slice(name);
            msg.extend_from_slice(b"\0\0\0\0\x05n,,n=");
            // Written in two pieces, split inside the name.
            guarded.write_all(&msg[..9]).await.unwrap();
            guarded.write_all(&msg[9..]).await.unwrap();
            assert_eq!(guard.seen().method, Some(method));
            assert_eq!(guard.seen().refused, None);
        }
    }
}
