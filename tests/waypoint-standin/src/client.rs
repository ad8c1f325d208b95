//! A minimal HTTP/1.1 client over TCP, TLS-over-TCP or a unix socket: one connection per
//! request, a deadline on the whole exchange. Used by the CLI commands and the runner to reach
//! the stand-in server, and by the runner to reach the Docker API.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

/// Answers larger than this are cut off: the stand-in only exchanges small JSON documents.
const MAX_BODY: usize = 1 << 20;

/// Where to connect.
#[derive(Debug, Clone)]
pub enum Target {
    /// `host:port`; `host` may be a name, an IPv4 address or a bracketed IPv6 address.
    Tcp { host: String, port: u16 },
    /// A unix socket (`unix:///var/run/docker.sock`).
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Failures below HTTP. Messages name the peer and keep the cause (e.g. the certificate
/// verification error), so the runner's status file says what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("tls handshake with {target} failed: {source}")]
    Handshake {
        target: String,
        source: std::io::Error,
    },
    #[error("http exchange with {target} failed: {source}")]
    Http {
        target: String,
        source: hyper::Error,
    },
    #[error("no answer from {target} within {secs} s")]
    Timeout { target: String, secs: u64 },
    #[error("failed to build a request for {target}: {message}")]
    Request { target: String, message: String },
    #[error("failed to read the answer from {target}: {message}")]
    Body { target: String, message: String },
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    /// The body as text (lossy), trimmed.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

/// A client for one peer.
#[derive(Clone)]
pub struct HttpClient {
    target: Target,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    timeout: Duration,
    /// Source address to bind TCP connections to (test hook; `None`: the kernel picks).
    source: Option<IpAddr>,
}

impl HttpClient {
    /// A client for `target`, speaking TLS when `tls` is given.
    pub fn new(
        target: Target,
        tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
        timeout: Duration,
    ) -> Self {
        HttpClient {
            target,
            tls,
            timeout,
            source: None,
        }
    }

    /// Binds TCP connections to the source address `ip`, so a peer sees that address (tests
    /// use it to be one of several sources in a namespace). Unix sockets ignore it.
    pub fn with_source_addr(mut self, ip: IpAddr) -> Self {
        self.source = Some(ip);
        self
    }

    /// Whether this client speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The peer, for messages.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Sends one request and reads the whole answer, within the client's deadline.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        json_body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let target = self.target.to_string();
        let secs = self.timeout.as_secs();
        tokio::time::timeout(
            self.timeout,
            self.send_inner(method, path, bearer, json_body),
        )
        .await
        .map_err(|_| ClientError::Timeout { target, secs })?
    }

    /// Sends one request and returns the status and the body as it streams in (no deadline
    /// once the headers arrived; the connection lives as long as the returned stream).
    pub async fn stream(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        json_body: Option<Vec<u8>>,
    ) -> Result<StreamReply, ClientError> {
        let target = self.target.to_string();
        let secs = self.timeout.as_secs();
        tokio::time::timeout(self.timeout, async {
            let (request, target) = self.request(method, path, bearer, json_body)?;
            match &self.target {
                Target::Unix(_) => Err(ClientError::Request {
                    target,
                    message: "streams are only for tcp".into(),
                }),
                Target::Tcp { host, port } => {
                    let tcp = self.tcp(host, *port, &target).await?;
                    match &self.tls {
                        None => open_stream(tcp, request, &target).await,
                        Some((config, name)) => {
                            let tls = TlsConnector::from(config.clone())
                                .connect(name.clone(), tcp)
                                .await
                                .map_err(|source| ClientError::Handshake {
                                    target: target.clone(),
                                    source,
                                })?;
                            open_stream(tls, request, &target).await
                        }
                    }
                }
            }
        })
        .await
        .map_err(|_| ClientError::Timeout { target, secs })?
    }

    async fn tcp(&self, host: &str, port: u16, target: &str) -> Result<TcpStream, ClientError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        connect_tcp(bare, port, self.source)
            .await
            .map_err(|source| ClientError::Connect {
                target: target.to_string(),
                source,
            })
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        json_body: Option<Vec<u8>>,
    ) -> Result<(Request<Full<Bytes>>, String), ClientError> {
        let target = self.target.to_string();
        let host_header = match &self.target {
            Target::Tcp { host, port } => format!("{host}:{port}"),
            // Docker ignores the Host of unix-socket requests; any valid value will do.
            Target::Unix(_) => "docker".to_string(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host_header)
            .header(hyper::header::USER_AGENT, "waypoint-standin");
        if let Some(token) = bearer {
            // As Waypoint's gRPC metadata carries it: the bare token, no scheme.
            builder = builder.header(hyper::header::AUTHORIZATION, token);
        }
        let body = match json_body {
            Some(bytes) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder.body(body).map_err(|e| ClientError::Request {
            target: target.clone(),
            // The error text never contains header values, so no token can leak through it.
            message: e.to_string(),
        })?;
        Ok((request, target))
    }

    async fn send_inner(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        json_body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let (request, target) = self.request(method, path, bearer, json_body)?;
        match &self.target {
            Target::Unix(path) => {
                let stream =
                    UnixStream::connect(path)
                        .await
                        .map_err(|source| ClientError::Connect {
                            target: target.clone(),
                            source,
                        })?;
                exchange(stream, request, &target).await
            }
            Target::Tcp { host, port } => {
                let tcp = self.tcp(host, *port, &target).await?;
                match &self.tls {
                    None => exchange(tcp, request, &target).await,
                    Some((config, name)) => {
                        let tls = TlsConnector::from(config.clone())
                            .connect(name.clone(), tcp)
                            .await
                            .map_err(|source| ClientError::Handshake {
                                target: target.clone(),
                                source,
                            })?;
                        exchange(tls, request, &target).await
                    }
                }
            }
        }
    }
}

/// Connects to `host:port`, from `source` when given (then only to addresses of its family).
async fn connect_tcp(host: &str, port: u16, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect((host, port)).await;
    };
    let mut last = None;
    for peer in tokio::net::lookup_host((host, port)).await? {
        if peer.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let socket = if source.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(peer).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{host} has no address of the source address {source}'s family"),
        )
    }))
}

/// A streaming answer: the status and the body frames as they arrive.
pub struct StreamReply {
    pub status: u16,
    pub body: hyper::body::Incoming,
    driver: tokio::task::JoinHandle<()>,
}

impl StreamReply {
    /// The next chunk of the body; `Ok(None)` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

impl Drop for StreamReply {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn open_stream<S>(
    stream: S,
    request: Request<Full<Bytes>>,
    target: &str,
) -> Result<StreamReply, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http_err = |source| ClientError::Http {
        target: target.to_string(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await.map_err(http_err)?;
    Ok(StreamReply {
        status: response.status().as_u16(),
        body: response.into_body(),
        driver,
    })
}

async fn exchange<S>(
    stream: S,
    request: Request<Full<Bytes>>,
    target: &str,
) -> Result<Reply, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http_err = |source| ClientError::Http {
        target: target.to_string(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    // The connection task ends by itself once `sender` is dropped at the end of this function.
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(http_err)?;
    let status = response.status().as_u16();
    let collected = Limited::new(response.into_body(), MAX_BODY).collect().await;
    drop(sender);
    driver.abort();
    let body = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(ClientError::Body {
                target: target.to_string(),
                message: e.to_string(),
            });
        }
    };
    Ok(Reply { status, body })
}
