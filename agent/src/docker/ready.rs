//! Readiness of dockerd's TLS listener, observed instead of assumed: a mutual-TLS handshake
//! with the operator certificate, the server verified against the agent's CA at the address
//! probed, and an answer to `/version` (bollard, API version negotiated: Debian's dockerd
//! 20.10 speaks API 1.41 at most).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bollard::{API_DEFAULT_VERSION, Docker};

use super::DockerError;

/// Where and as whom to probe.
#[derive(Debug, Clone)]
pub struct TlsProbe {
    pub addr: SocketAddr,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsProbe {
    /// The address to connect to for a listener on `listen`: loopback when it listens on
    /// every address, else the address itself.
    pub fn connect_addr(listen: SocketAddr) -> SocketAddr {
        let ip = match listen.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            // A `[::]` listener takes IPv4 too on Linux by default, but ::1 needs no such luck.
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, listen.port())
    }
}

/// What dockerd said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    pub version: String,
    pub api_version: String,
}

/// One attempt, bounded by `limit`.
pub async fn probe_once(probe: &TlsProbe, limit: Duration) -> Result<DaemonInfo, String> {
    // The rustls provider bollard's client uses; installing is a no-op once done.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let secs = limit.as_secs().max(1);
    let client = Docker::connect_with_ssl(
        &format!("https://{}", probe.addr),
        &probe.key,
        &probe.cert,
        &probe.ca,
        secs,
        API_DEFAULT_VERSION,
    )
    .map_err(|e| format!("cannot set up the TLS client: {e}"))?;
    let attempt = async {
        let client = client
            .negotiate_version()
            .await
            .map_err(|e| e.to_string())?;
        let v = client.version().await.map_err(|e| e.to_string())?;
        Ok(DaemonInfo {
            version: v.version.unwrap_or_default(),
            api_version: v.api_version.unwrap_or_default(),
        })
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}s", limit.as_secs_f64())),
    }
}

/// Polls until dockerd answers over mutual TLS, or `timeout` passes. The poll interval
/// starts short (a namespaced dockerd is up in well under a second) and grows to 500 ms.
pub async fn wait_ready(
    probe: &TlsProbe,
    timeout: Duration,
) -> Result<(DaemonInfo, Duration), DockerError> {
    let start = Instant::now();
    let mut interval = Duration::from_millis(25);
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let attempt_limit = left
            .min(Duration::from_secs(5))
            .max(Duration::from_millis(100));
        match probe_once(probe, attempt_limit).await {
            Ok(info) => return Ok((info, start.elapsed())),
            Err(last_error) => {
                if start.elapsed() >= timeout {
                    return Err(DockerError::NotReady {
                        addr: probe.addr,
                        last_error,
                        waited: start.elapsed(),
                    });
                }
                tracing::debug!(addr = %probe.addr, "dockerd not ready yet: {last_error}");
            }
        }
        // The last attempt falls on the deadline.
        tokio::time::sleep(interval.min(timeout.saturating_sub(start.elapsed()))).await;
        interval = (interval * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_address() {
        assert_eq!(
            TlsProbe::connect_addr("0.0.0.0:2376".parse().unwrap()),
            "127.0.0.1:2376".parse().unwrap()
        );
        assert_eq!(
            TlsProbe::connect_addr("[::]:2376".parse().unwrap()),
            "[::1]:2376".parse().unwrap()
        );
        assert_eq!(
            TlsProbe::connect_addr("10.0.0.5:2376".parse().unwrap()),
            "10.0.0.5:2376".parse().unwrap()
        );
    }

    #[tokio::test]
    async fn nothing_listening_gives_a_clear_error_after_the_deadline() {
        let pki_dir = tempfile::tempdir().unwrap();
        let layout = crate::pki::PkiLayout::new(pki_dir.path().join("pki"));
        crate::pki::ensure(
            &layout,
            &crate::pki::Policy::from(&crate::config::PkiConfig::default()),
            &[crate::pki::LeafSpec::client("operator")],
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        // A port nothing listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let op = layout.leaf("operator");
        let probe = TlsProbe {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            ca: op.ca,
            cert: op.cert,
            key: op.key,
        };
        let start = Instant::now();
        let err = wait_ready(&probe, Duration::from_millis(800))
            .await
            .unwrap_err();
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        let text = err.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(text.contains("last error"), "{text}");
    }
}
