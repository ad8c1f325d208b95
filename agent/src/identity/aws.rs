//! EC2 instance metadata, IMDSv2 only: `PUT /latest/api/token` with
//! `X-aws-ec2-metadata-token-ttl-seconds` for a session token, then GETs under
//! `/latest/meta-data/` carrying it in `X-aws-ec2-metadata-token`
//! (<https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html>).
//!
//! A service that refuses the PUT (403, 405: IMDSv1 only, or IMDS turned off) is an error that
//! says so; the agent never retries the GETs without a token. A 404 on `public-ipv4` or
//! `public-hostname` means the instance has none.

use hyper::{Method, StatusCode};

use super::http::{Answer, MetadataClient};
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
    identity(
        &client.url(""),
        Answers {
            instance_id,
            region,
            zone,
            local_ipv4,
            public_ipv4,
            local_hostname,
            public_hostname,
        },
    )
}

/// What the GETs of [`fetch`] gave, one per metadata key: a value, `None` (404 or an empty
/// answer: the instance has no such thing), or why there is no answer.
#[derive(Debug, Clone)]
pub struct Answers {
    pub instance_id: Result<Option<String>, ProviderError>,
    pub region: Result<Option<String>, ProviderError>,
    pub zone: Result<Option<String>, ProviderError>,
    pub local_ipv4: Result<Option<String>, ProviderError>,
    pub public_ipv4: Result<Option<String>, ProviderError>,
    pub local_hostname: Result<Option<String>, ProviderError>,
    pub public_hostname: Result<Option<String>, ProviderError>,
}

/// The identity the answers make, every value checked (instance id and region required), or
/// the first error in the order of [`Answers`]' fields. `base` is the metadata service's URL
/// (errors name the key's URL under it). Pure: public for the fuzz targets and tests.
pub fn identity(base: &str, answers: Answers) -> Result<Identity, ProviderError> {
    let Answers {
        instance_id,
        region,
        zone,
        local_ipv4,
        public_ipv4,
        local_hostname,
        public_hostname,
    } = answers;
    let url = |key: &str| format!("{base}{META}{key}");
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
    token_answer(&client.url(TOKEN_PATH), &answer)
}

/// What the answer to the token request (`PUT url`) means: the session token, or why there
/// is none. No error carries the answer's body. Pure: public for the fuzz targets and tests.
pub fn token_answer(url: &str, answer: &Answer) -> Result<String, ProviderError> {
    match answer.status {
        StatusCode::OK => {
            let token = answer.text();
            if token.is_empty() {
                Err(ProviderError::Invalid {
                    provider: Provider::Aws,
                    url: url.to_string(),
                    reason: "empty token".into(),
                })
            } else {
                Ok(token)
            }
        }
        StatusCode::FORBIDDEN | StatusCode::METHOD_NOT_ALLOWED => Err(ProviderError::ImdsV1Only {
            url: url.to_string(),
            status: answer.status.as_u16(),
        }),
        other => Err(ProviderError::Status {
            provider: Provider::Aws,
            url: url.to_string(),
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
    value_answer(&client.url(&path), &answer)
}

/// What the answer to `GET url` means: its value (trimmed), `None` on 404 or an empty body,
/// or why it is refused. Pure: public for the fuzz targets and tests.
pub fn value_answer(url: &str, answer: &Answer) -> Result<Option<String>, ProviderError> {
    match answer.status {
        StatusCode::OK => {
            let text = answer.text();
            Ok((!text.is_empty()).then_some(text))
        }
        StatusCode::NOT_FOUND => Ok(None),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(ProviderError::TokenRefused {
            url: url.to_string(),
            status: answer.status.as_u16(),
        }),
        other => Err(ProviderError::Status {
            provider: Provider::Aws,
            url: url.to_string(),
            status: other.as_u16(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hyper::header::HeaderMap;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn answers_are_read_without_showing_the_token() {
        let url = "http://imds/latest/api/token";
        assert_eq!(token_answer(url, &answer(200, " tok\n")).unwrap(), "tok");
        for status in [200, 403, 405, 500] {
            let body = if status == 200 { "  " } else { "secret-token" };
            let e = token_answer(url, &answer(status, body)).unwrap_err();
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        assert_eq!(value_answer(url, &answer(404, "x")).unwrap(), None);
        assert_eq!(value_answer(url, &answer(200, "")).unwrap(), None);
        assert!(matches!(
            value_answer(url, &answer(401, "")),
            Err(ProviderError::TokenRefused { .. })
        ));
    }

    #[test]
    fn identity_needs_an_id_and_a_region_and_checks_every_value() {
        let some = |v: &str| Ok(Some(v.to_string()));
        let answers = || Answers {
            instance_id: some("i-0123456789abcdef0"),
            region: some("eu-west-1"),
            zone: Ok(None),
            local_ipv4: some("10.0.0.5"),
            public_ipv4: Ok(None),
            local_hostname: some("IP-10-0-0-5.eu-west-1.compute.internal."),
            public_hostname: Ok(None),
        };
        let i = identity("http://imds", answers()).unwrap();
        assert_eq!(
            i.hostname.as_deref(),
            Some("ip-10-0-0-5.eu-west-1.compute.internal")
        );
        let mut a = answers();
        a.region = Ok(None);
        let e = identity("http://imds", a).unwrap_err();
        assert!(e.to_string().contains("placement/region"), "{e}");
        let mut a = answers();
        a.local_ipv4 = some("10.0.0.256");
        assert!(matches!(
            identity("http://imds", a),
            Err(ProviderError::Invalid { .. })
        ));
    }
}
