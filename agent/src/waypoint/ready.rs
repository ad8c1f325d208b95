//! Readiness of the Waypoint server, observed instead of assumed: a TLS handshake with its
//! HTTPS port and an HTTP answer to `GET /`, polled with a deadline.
//!
//! The server's certificate is not verified: Waypoint makes a self-signed one inside its
//! container at first start, so there is nothing to verify it against, and the probe sends
//! nothing secret. (Handshake signatures are still checked, so a broken TLS stack fails.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::WaypointError;

fn connector() -> Result<TlsConnector, String> {
    let provider = crate::tls::provider();
    let verifier = Arc::new(crate::tls::SignaturesOnly::new(&provider));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up tls: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// One attempt: TLS handshake, `GET /`, an HTTP status line back. Returns the status line.
pub async fn probe_once(addr: SocketAddr, limit: Duration) -> Result<String, String> {
    let attempt = async {
        let tls = connector()?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls handshake: {e}"))?;
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: pilot-agent\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send request: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read answer: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&head);
        let line = text.lines().next().unwrap_or_default().to_string();
        if line.starts_with("HTTP/1.") {
            Ok(line)
        } else {
            Err(format!("no HTTP answer (got {line:?})"))
        }
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}s", limit.as_secs_f64())),
    }
}

/// Polls until the server answers over HTTPS at `addr`, or `timeout` passes; returns how
/// long it took. Intervals start at 20 ms (the server is usually up within a second of its
/// start) and grow to 500 ms.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<Duration, WaypointError> {
    let start = Instant::now();
    let mut interval = Duration::from_millis(20);
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let limit = left
            .min(Duration::from_secs(5))
            .max(Duration::from_millis(200));
        match probe_once(addr, limit).await {
            Ok(_) => return Ok(start.elapsed()),
            Err(last_error) => {
                if start.elapsed() >= timeout {
                    return Err(WaypointError::NotReady {
                        addr: format!("https://{addr}"),
                        waited: start.elapsed(),
                        last_error,
                    });
                }
                tracing::debug!(%addr, "waypoint server not ready yet: {last_error}");
            }
        }
        tokio::time::sleep(interval.min(timeout.saturating_sub(start.elapsed()))).await;
        interval = (interval * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS server made here (rcgen, self-signed) answers; the probe sees its status line.
    #[tokio::test]
    async fn answers_from_a_self_signed_https_server() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["waypoint".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tls.read(&mut buf).await.unwrap();
            tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            tls.shutdown().await.unwrap();
        });
        let waited = wait_ready(addr, Duration::from_secs(5)).await.unwrap();
        assert!(waited < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_plain_tcp_port_is_not_ready_and_the_error_says_why() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts (the kernel's backlog does) but never speaks TLS.
        let start = Instant::now();
        let err = wait_ready(addr, Duration::from_millis(600))
            .await
            .unwrap_err()
            .to_string();
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(err.contains("last error"), "{err}");
        drop(listener);
    }
}
