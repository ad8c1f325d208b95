//! GCE instance metadata: GETs under `/computeMetadata/v1/instance/` with
//! `Metadata-Flavor: Google`, whose answers must carry the same header
//! (<https://cloud.google.com/compute/docs/metadata/querying-metadata>): a server that does not
//! send it is not Google's metadata server, and its values are not trusted.

use hyper::{Method, StatusCode};

use super::http::{Answer, MetadataClient};
use super::{Identity, Provider, ProviderError, dns_value, ipv4_value, plain_value};

pub const FLAVOR_HEADER: &str = "Metadata-Flavor";
pub const FLAVOR: &str = "Google";
const INSTANCE: &str = "/computeMetadata/v1/instance/";

/// Reads the instance's identity from the metadata server.
pub async fn fetch(client: &MetadataClient) -> Result<Identity, ProviderError> {
    // The id first, alone: in `auto` on another cloud it is the one request that fails.
    let id = get(client, "id").await?;
    let id_url = client.url(&format!("{INSTANCE}id"));
    let Some(id) = id else {
        return Err(ProviderError::Status {
            provider: Provider::Gcp,
            url: id_url,
            status: StatusCode::NOT_FOUND.as_u16(),
        });
    };
    // Checked before the other requests are sent ([`identity`] checks it again).
    let id = plain_value(Provider::Gcp, &id_url, id)?;
    let (zone, hostname, ip, external_ip) = tokio::join!(
        get(client, "zone"),
        get(client, "hostname"),
        get(client, "network-interfaces/0/ip"),
        get(client, "network-interfaces/0/access-configs/0/external-ip"),
    );
    identity(
        &client.url(""),
        Answers {
            id,
            zone,
            hostname,
            ip,
            external_ip,
        },
    )
}

/// What [`fetch`] read: the instance id (its first request, required), then the answers of
/// the other GETs, one per metadata key: a value, `None` (404 or an empty answer), or why
/// there is no answer.
#[derive(Debug, Clone)]
pub struct Answers {
    pub id: String,
    pub zone: Result<Option<String>, ProviderError>,
    pub hostname: Result<Option<String>, ProviderError>,
    /// `network-interfaces/0/ip`.
    pub ip: Result<Option<String>, ProviderError>,
    /// `network-interfaces/0/access-configs/0/external-ip`.
    pub external_ip: Result<Option<String>, ProviderError>,
}

/// The identity the answers make, every value checked, or the first error in the order of
/// [`Answers`]' fields. `base` is the metadata server's URL (errors name the key's URL under
/// it). Pure: public for the fuzz targets and tests.
pub fn identity(base: &str, answers: Answers) -> Result<Identity, ProviderError> {
    let Answers {
        id,
        zone,
        hostname,
        ip,
        external_ip,
    } = answers;
    let url = |key: &str| format!("{base}{INSTANCE}{key}");
    let instance_id = plain_value(Provider::Gcp, &url("id"), id)?;
    // `projects/123456789/zones/europe-west1-b`: the zone is the last part, its region the
    // zone without the final `-b`.
    let zone = zone?
        .map(|z| {
            let last = z.rsplit('/').next().unwrap_or_default().to_string();
            plain_value(Provider::Gcp, &url("zone"), last)
        })
        .transpose()?;
    let region = zone
        .as_deref()
        .and_then(|z| z.rsplit_once('-'))
        .map(|(region, _)| region.to_string());
    let hostname = hostname?
        .map(|h| dns_value(Provider::Gcp, &url("hostname"), h))
        .transpose()?;
    let private_ipv4 = ip?
        .map(|v| ipv4_value(Provider::Gcp, &url("network-interfaces/0/ip"), &v))
        .transpose()?;
    let public_ipv4 = external_ip?
        .map(|v| {
            ipv4_value(
                Provider::Gcp,
                &url("network-interfaces/0/access-configs/0/external-ip"),
                &v,
            )
        })
        .transpose()?;
    Ok(Identity {
        provider: Provider::Gcp,
        instance_id: Some(instance_id),
        region,
        zone,
        private_ipv4,
        public_ipv4,
        hostname,
        public_hostname: None,
    })
}

/// One metadata value; `None` on 404 or an empty answer (no external IP).
async fn get(client: &MetadataClient, key: &str) -> Result<Option<String>, ProviderError> {
    let path = format!("{INSTANCE}{key}");
    let answer = client
        .send(Method::GET, &path, &[(FLAVOR_HEADER, FLAVOR)])
        .await?;
    value_answer(&client.url(&path), &answer)
}

/// What the answer to `GET url` means: its value (trimmed), `None` on a 404 from Google or
/// an empty body, or why it is refused (an answer without `Metadata-Flavor: Google` is not
/// trusted). Pure: public for the fuzz targets and tests.
pub fn value_answer(url: &str, answer: &Answer) -> Result<Option<String>, ProviderError> {
    let url = url.to_string();
    if answer.status != StatusCode::OK {
        return match answer.status {
            StatusCode::NOT_FOUND if is_google(answer) => Ok(None),
            status => Err(ProviderError::Status {
                provider: Provider::Gcp,
                url,
                status: status.as_u16(),
            }),
        };
    }
    if !is_google(answer) {
        return Err(ProviderError::NotGoogle { url });
    }
    let text = answer.text();
    Ok((!text.is_empty()).then_some(text))
}

fn is_google(answer: &Answer) -> bool {
    answer
        .headers
        .get(FLAVOR_HEADER)
        .is_some_and(|v| v.as_bytes() == FLAVOR.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hyper::header::{HeaderMap, HeaderValue};

    fn answer(status: u16, google: bool, body: &str) -> Answer {
        let mut headers = HeaderMap::new();
        if google {
            headers.insert(FLAVOR_HEADER, HeaderValue::from_static(FLAVOR));
        }
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn only_googles_answers_are_trusted() {
        let url = "http://md/computeMetadata/v1/instance/id";
        assert_eq!(
            value_answer(url, &answer(200, true, "123\n")).unwrap(),
            Some("123".into())
        );
        assert!(matches!(
            value_answer(url, &answer(200, false, "123")),
            Err(ProviderError::NotGoogle { .. })
        ));
        assert_eq!(value_answer(url, &answer(404, true, "")).unwrap(), None);
        assert!(matches!(
            value_answer(url, &answer(404, false, "")),
            Err(ProviderError::Status { .. })
        ));
    }

    #[test]
    fn zone_and_region_from_the_zone_path() {
        let i = identity(
            "http://md",
            Answers {
                id: "1234567890".into(),
                zone: Ok(Some("projects/1/zones/europe-west1-b".into())),
                hostname: Ok(None),
                ip: Ok(None),
                external_ip: Ok(None),
            },
        )
        .unwrap();
        assert_eq!(i.zone.as_deref(), Some("europe-west1-b"));
        assert_eq!(i.region.as_deref(), Some("europe-west1"));
        assert!(
            identity(
                "http://md",
                Answers {
                    id: "12/34".into(),
                    zone: Ok(None),
                    hostname: Ok(None),
                    ip: Ok(None),
                    external_ip: Ok(None),
                },
            )
            .is_err()
        );
    }
}
