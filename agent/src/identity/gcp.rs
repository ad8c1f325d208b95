//! GCE instance metadata: GETs under `/computeMetadata/v1/instance/` with
//! `Metadata-Flavor: Google`, whose answers must carry the same header
//! (<https://cloud.google.com/compute/docs/metadata/querying-metadata>): a server that does not
//! send it is not Google's metadata server, and its values are not trusted.

use hyper::{Method, StatusCode};

use super::http::MetadataClient;
use super::{Identity, Provider, ProviderError, dns_value, ipv4_value, plain_value};

pub const FLAVOR_HEADER: &str = "Metadata-Flavor";
pub const FLAVOR: &str = "Google";
const INSTANCE: &str = "/computeMetadata/v1/instance/";

/// Reads the instance's identity from the metadata server.
pub async fn fetch(client: &MetadataClient) -> Result<Identity, ProviderError> {
    // The id first, alone: in `auto` on another cloud it is the one request that fails.
    let id = get(client, "id").await?;
    let url = |key: &str| client.url(&format!("{INSTANCE}{key}"));
    let Some(id) = id else {
        return Err(ProviderError::Status {
            provider: Provider::Gcp,
            url: url("id"),
            status: StatusCode::NOT_FOUND.as_u16(),
        });
    };
    let instance_id = plain_value(Provider::Gcp, &url("id"), id)?;
    let (zone, hostname, ip, external_ip) = tokio::join!(
        get(client, "zone"),
        get(client, "hostname"),
        get(client, "network-interfaces/0/ip"),
        get(client, "network-interfaces/0/access-configs/0/external-ip"),
    );
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
    let url = client.url(&path);
    if answer.status != StatusCode::OK {
        return match answer.status {
            StatusCode::NOT_FOUND if is_google(&answer) => Ok(None),
            status => Err(ProviderError::Status {
                provider: Provider::Gcp,
                url,
                status: status.as_u16(),
            }),
        };
    }
    if !is_google(&answer) {
        return Err(ProviderError::NotGoogle { url });
    }
    let text = answer.text();
    Ok((!text.is_empty()).then_some(text))
}

fn is_google(answer: &super::http::Answer) -> bool {
    answer
        .headers
        .get(FLAVOR_HEADER)
        .is_some_and(|v| v.as_bytes() == FLAVOR.as_bytes())
}
