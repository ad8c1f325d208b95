//! The runner's view of Docker: `DOCKER_HOST`, `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH` (and
//! `DOCKER_TLS`) read with the Docker client's rules, and one call, `GET /version`, to prove the
//! daemon answers. Waypoint's runner builds and pushes images through exactly this API.
//!
//! TLS rules, as in Docker's Go client (which Waypoint's runner uses):
//! - any non-empty `DOCKER_TLS_VERIFY` turns on verification: the daemon's certificate must
//!   chain to `DOCKER_CERT_PATH/ca.pem` and name the host of `DOCKER_HOST` (IP SANs included);
//! - TLS is on when verifying, when `DOCKER_TLS` is set, or when `DOCKER_CERT_PATH` is set;
//! - with `DOCKER_CERT_PATH`, `cert.pem`/`key.pem` are presented as the client certificate.
//!
//! The stand-in is stricter in one place: `DOCKER_TLS_VERIFY` without `DOCKER_CERT_PATH` is an
//! error rather than a silent fall back, so a misconfigured runner shows up in the status file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use serde::Deserialize;

use crate::client::{HttpClient, Target};
use crate::error::{Error, Result};
use crate::tls;

pub const ENV_HOST: &str = "DOCKER_HOST";
pub const ENV_TLS_VERIFY: &str = "DOCKER_TLS_VERIFY";
pub const ENV_CERT_PATH: &str = "DOCKER_CERT_PATH";
pub const ENV_TLS: &str = "DOCKER_TLS";

const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// How to reach the Docker API, resolved from the environment.
#[derive(Clone)]
pub struct Docker {
    client: HttpClient,
    /// TLS is used.
    pub tls: bool,
    /// The daemon's certificate is verified against `ca.pem`.
    pub verified: bool,
    /// `tcp://10.0.0.5:2376 (mutual tls, verified against /certs/ca.pem)`, for logs.
    pub description: String,
}

#[derive(Deserialize)]
struct VersionReply {
    #[serde(rename = "Version")]
    version: String,
}

fn non_empty(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty())
}

/// Parses `DOCKER_HOST` into a target and whether its scheme demands TLS.
pub fn parse_host(value: &str) -> Result<(Target, bool)> {
    let bad = |why: &str| Error::Config(format!("{ENV_HOST}={value:?} is not usable: {why}"));
    if let Some(path) = value.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(bad("no socket path"));
        }
        return Ok((Target::Unix(PathBuf::from(path)), false));
    }
    let (rest, scheme_tls) = if let Some(rest) = value.strip_prefix("tcp://") {
        (rest, false)
    } else if let Some(rest) = value.strip_prefix("https://") {
        (rest, true)
    } else if let Some(rest) = value.strip_prefix("http://") {
        (rest, false)
    } else {
        return Err(bad("expected unix://, tcp://, http:// or https://"));
    };
    // Drop a trailing path ("tcp://host:2376/"), which Docker allows as a base path.
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.starts_with('[')) => (
            h.to_string(),
            Some(p.parse::<u16>().map_err(|_| bad("bad port"))?),
        ),
        _ if authority.contains(':') && !authority.starts_with('[') => {
            return Err(bad("bad address"));
        }
        _ => (authority.to_string(), None),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    // Port 0 stands for "the default", filled in by the caller once TLS is known.
    Ok((
        Target::Tcp {
            host,
            port: port.unwrap_or(0),
        },
        scheme_tls,
    ))
}

impl Docker {
    /// Resolves the Docker API endpoint from the environment (`env` looks a variable up).
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>, timeout: Duration) -> Result<Docker> {
        let host_value =
            non_empty(env, ENV_HOST).unwrap_or_else(|| format!("unix://{DEFAULT_SOCKET}"));
        let (mut target, scheme_tls) = parse_host(&host_value)?;
        let verify = non_empty(env, ENV_TLS_VERIFY).is_some();
        let cert_path = non_empty(env, ENV_CERT_PATH).map(PathBuf::from);

        let Target::Tcp { host, port } = &mut target else {
            // Docker ignores the TLS settings for unix sockets; so does the stand-in.
            let description = format!("{host_value} (unix socket)");
            return Ok(Docker {
                client: HttpClient::new(target, None, timeout),
                tls: false,
                verified: false,
                description,
            });
        };
        let use_tls =
            verify || scheme_tls || non_empty(env, ENV_TLS).is_some() || cert_path.is_some();
        if *port == 0 {
            *port = if use_tls { 2376 } else { 2375 };
        }
        if !use_tls {
            let description = format!("tcp://{host}:{port} (plain http, no tls)");
            return Ok(Docker {
                client: HttpClient::new(target, None, timeout),
                tls: false,
                verified: false,
                description,
            });
        }
        let name = tls::server_name(host)?;
        let identity = match &cert_path {
            Some(dir) => Some(load_client_identity(dir)?),
            None if verify => {
                return Err(Error::Config(format!(
                    "{ENV_TLS_VERIFY} is set but {ENV_CERT_PATH} is not: cannot verify the daemon"
                )));
            }
            None => None,
        };
        let has_client_cert = identity.is_some();
        let (config, verified, how) = match (&cert_path, verify) {
            (Some(dir), true) => {
                let ca = dir.join("ca.pem");
                let config = tls::client_config_with_ca(&ca, identity)?;
                (config, true, format!("verified against {}", ca.display()))
            }
            _ => (
                tls::client_config_skip_verify(identity)?,
                false,
                "daemon certificate NOT verified".to_string(),
            ),
        };
        let kind = if has_client_cert { "mutual tls" } else { "tls" };
        let description = format!("tcp://{host}:{port} ({kind}, {how})");
        Ok(Docker {
            client: HttpClient::new(target, Some((config, name)), timeout),
            tls: true,
            verified,
            description,
        })
    }

    /// `GET /version`: the daemon's version, or why it could not be had.
    pub async fn version(&self) -> Result<String> {
        // Unversioned path: every daemon answers it, whatever API versions it supports.
        let reply = self
            .client
            .send(Method::GET, "/version", None, None)
            .await?;
        if reply.status != 200 {
            return Err(Error::Server {
                status: reply.status,
                message: truncate(&reply.text(), 200),
            });
        }
        let parsed: VersionReply =
            serde_json::from_slice(&reply.body).map_err(|source| Error::Json {
                context: "docker's /version answer has no Version".into(),
                source,
            })?;
        Ok(parsed.version)
    }
}

fn load_client_identity(dir: &Path) -> Result<tls::Identity> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    for file in [&cert, &key] {
        if !file.exists() {
            return Err(Error::Config(format!(
                "{} is missing ({ENV_CERT_PATH})",
                file.display()
            )));
        }
    }
    tls::load_identity(&cert, &key)
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn docker_with(vars: &[(&str, &str)]) -> Result<Docker> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Docker::from_env(&|k| vars.get(k).cloned(), Duration::from_secs(1))
    }

    fn write_certs(dir: &Path) {
        let ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), ca.signing_key.serialize_pem()).unwrap();
    }

    #[test]
    fn parses_docker_hosts() {
        assert!(
            matches!(parse_host("unix:///run/docker.sock").unwrap(), (Target::Unix(p), false) if p == Path::new("/run/docker.sock"))
        );
        assert!(
            matches!(parse_host("tcp://10.0.0.5:2376").unwrap(), (Target::Tcp { host, port: 2376 }, false) if host == "10.0.0.5")
        );
        assert!(
            matches!(parse_host("tcp://[fd00::5]:2376/").unwrap(), (Target::Tcp { host, port: 2376 }, false) if host == "[fd00::5]")
        );
        assert!(matches!(
            parse_host("https://docker.local").unwrap(),
            (Target::Tcp { port: 0, .. }, true)
        ));
        assert!(parse_host("ssh://host").is_err());
        assert!(parse_host("tcp://host:notaport").is_err());
        assert!(parse_host("tcp://").is_err());
        assert!(parse_host("unix://").is_err());
    }

    #[test]
    fn default_is_the_local_socket() {
        let d = docker_with(&[]).unwrap();
        assert!(!d.tls);
        assert!(d.description.contains("/var/run/docker.sock"));
    }

    #[test]
    fn verify_needs_cert_path_and_files() {
        let err = docker_with(&[(ENV_HOST, "tcp://127.0.0.1:2376"), (ENV_TLS_VERIFY, "1")])
            .err()
            .unwrap();
        assert!(err.to_string().contains(ENV_CERT_PATH), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let dir = empty.path().to_str().unwrap();
        let err = docker_with(&[
            (ENV_HOST, "tcp://127.0.0.1:2376"),
            (ENV_TLS_VERIFY, "1"),
            (ENV_CERT_PATH, dir),
        ])
        .err()
        .unwrap();
        assert!(err.to_string().contains("cert.pem is missing"), "{err}");
    }

    #[test]
    fn verify_with_certs_is_mutual_and_verified() {
        let certs = tempfile::tempdir().unwrap();
        write_certs(certs.path());
        let dir = certs.path().to_str().unwrap();
        let d = docker_with(&[
            (ENV_HOST, "tcp://127.0.0.1"),
            (ENV_TLS_VERIFY, "1"),
            (ENV_CERT_PATH, dir),
        ])
        .unwrap();
        assert!(d.tls && d.verified);
        assert!(
            d.description
                .starts_with("tcp://127.0.0.1:2376 (mutual tls, verified against"),
            "{}",
            d.description
        );
        // Cert path without verify: TLS with the client certificate, daemon unverified (Go client).
        let d = docker_with(&[(ENV_HOST, "tcp://127.0.0.1"), (ENV_CERT_PATH, dir)]).unwrap();
        assert!(d.tls && !d.verified);
        // Nothing TLS-related: plain, default port 2375.
        let d = docker_with(&[(ENV_HOST, "tcp://127.0.0.1")]).unwrap();
        assert!(!d.tls);
        assert!(d.description.contains(":2375"));
    }
}
