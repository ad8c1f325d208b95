//! EC2 instance metadata, IMDSv2 only: `PUT /latest/api/token` with
//! `X-aws-ec2-metadata-token-ttl-seconds` for a session token, then GETs under
//! `/latest/meta-data/` carrying it in `X-aws-ec2-metadata-token`
//! (<https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html>).
//!
//! A service that refuses the PUT (403, 405: IMDSv1 only, or IMDS turned off) is an error that
//! says so; the agent never retries the GETs without a token. A 404 on `public-ipv4` or
//! `public-hostname` means the instance has none.

use hyper::{Method, StatusCode};

use super::http::MetadataClient;
use super::{Identity, Provider, ProviderError, dns_value, ipv4_value, plain_value};

pub const TOKEN_PATH: &str = "/latest/api/token";
pub const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
const META: &str = "/latest/meta-data/";
/// The token only has to outlive one lookup; a short life limits what a leaked one is worth.
const TOKEN_TTL_SECS: &str = "60";

/// Reads the instance's identity from IMDSv2.
pub async fn fetch(client: &MetadataClient) -> Result<Identity, ProviderError> {
    let token = token(client).await?;
    let (instance_id, region, zone, local_ipv4, public_ipv4, local_hostname, public_hostname) = tokio::join!(
        get(client, &token, "instance-id"),
        get(client, &token, "placement/region"),
        get(client, &token, "placement/availability-zone"),
        get(client, &token, "local-ipv4"),
        get(client, &token, "public-ipv4"),
        get(client, &token, "local-hostname"),
        get(client, &token, "public-hostname"),
    );
    let url = |key: &str| client.url(&format!("{META}{key}"));
    let required = |r: Result<Option<String>, ProviderError>, key: &str| {
        r?.ok_or_else(|| ProviderError::Status {
            provider: Provider::Aws,
            url: url(key),
            status: StatusCode::NOT_FOUND.as_u16(),
        })
    };
    let instance_id = plain_value(
        Provider::Aws,
        &url("instance-id"),
        required(instance_id, "instance-id")?,
    )?;
    let region = plain_value(
        Provider::Aws,
        &url("placement/region"),
        required(region, "placement/region")?,
    )?;
    let zone = zone?
        .map(|z| plain_value(Provider::Aws, &url("placement/availability-zone"), z))
        .transpose()?;
    let private_ipv4 = local_ipv4?
        .map(|v| ipv4_value(Provider::Aws, &url("local-ipv4"), &v))
        .transpose()?;
    let public_ipv4 = public_ipv4?
        .map(|v| ipv4_value(Provider::Aws, &url("public-ipv4"), &v))
        .transpose()?;
    let hostname = local_hostname?
        .map(|v| dns_value(Provider::Aws, &url("local-hostname"), v))
        .transpose()?;
    let public_hostname = public_hostname?
        .map(|v| dns_value(Provider::Aws, &url("public-hostname"), v))
        .transpose()?;
    Ok(Identity {
        provider: Provider::Aws,
        instance_id: Some(instance_id),
        region: Some(region),
        zone,
        private_ipv4,
        public_ipv4,
        hostname,
        public_hostname,
    })
}

/// The session token. Never logged: with it, anyone on the host reads the instance's role
/// credentials.
async fn token(client: &MetadataClient) -> Result<String, ProviderError> {
    let answer = client
        .send(Method::PUT, TOKEN_PATH, &[(TTL_HEADER, TOKEN_TTL_SECS)])
        .await?;
    match answer.status {
        StatusCode::OK => {
            let token = answer.text();
            if token.is_empty() {
                Err(ProviderError::Invalid {
                    provider: Provider::Aws,
                    url: client.url(TOKEN_PATH),
                    reason: "empty token".into(),
                })
            } else {
                Ok(token)
            }
        }
        StatusCode::FORBIDDEN | StatusCode::METHOD_NOT_ALLOWED => Err(ProviderError::ImdsV1Only {
            url: client.url(TOKEN_PATH),
            status: answer.status.as_u16(),
        }),
        other => Err(ProviderError::Status {
            provider: Provider::Aws,
            url: client.url(TOKEN_PATH),
            status: other.as_u16(),
        }),
    }
}

/// One metadata value; `None` on 404 (the instance has no such thing).
async fn get(
    client: &MetadataClient,
    token: &str,
    key: &str,
) -> Result<Option<String>, ProviderError> {
    let path = format!("{META}{key}");
    let answer = client
        .send(Method::GET, &path, &[(TOKEN_HEADER, token)])
        .await?;
    match answer.status {
        StatusCode::OK => {
            let text = answer.text();
            Ok((!text.is_empty()).then_some(text))
        }
        StatusCode::NOT_FOUND => Ok(None),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(ProviderError::TokenRefused {
            url: client.url(&path),
            status: answer.status.as_u16(),
        }),
        other => Err(ProviderError::Status {
            provider: Provider::Aws,
            url: client.url(&path),
            status: other.as_u16(),
        }),
    }
}
