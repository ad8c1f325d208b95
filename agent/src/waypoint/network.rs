//! The Pilot bridge network and the server's data volume.
//!
//! The network has a fixed subnet and gateway (`waypoint.network`), because the gateway
//! address is where runners reach the host's Docker API (`DOCKER_HOST=tcp://GATEWAY:2376`):
//! it is in the Docker server certificate, and the subnet is the one container network the
//! firewall admits to the TLS port. A network of that name with another subnet is rebuilt
//! when only the agent's containers are on it (they are re-created by the later steps), and
//! is an error otherwise: the agent does not cut off containers it does not own.
//!
//! The volume holds Waypoint's database. It is created when missing and never removed by the
//! agent, whatever happens to the containers.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest, VolumeCreateRequest};

use super::{LABEL_MANAGED, WaypointError, containers, is_not_found};
use crate::config::waypoint::NetworkConfig;

/// What [`ensure_network`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkAction {
    Unchanged,
    Created,
    /// Re-created with the configured subnet; these containers of the agent were removed.
    Rebuilt {
        removed: Vec<String>,
    },
}

/// Makes the bridge network `spec.name` exist with `spec.subnet` and `spec.gateway`.
pub async fn ensure_network(
    docker: &Docker,
    spec: &NetworkConfig,
) -> Result<NetworkAction, WaypointError> {
    let existing = match docker
        .inspect_network(
            &spec.name,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
    {
        Ok(n) => Some(n),
        Err(e) if is_not_found(&e) => None,
        Err(e) => {
            return Err(WaypointError::docker(
                format!("inspect network {}", spec.name),
                e,
            ));
        }
    };
    let Some(net) = existing else {
        create_network(docker, spec).await?;
        return Ok(NetworkAction::Created);
    };

    let driver = net.driver.clone().unwrap_or_default();
    let configs = net
        .ipam
        .as_ref()
        .and_then(|i| i.config.clone())
        .unwrap_or_default();
    let subnet = spec.subnet.to_string();
    let gateway = spec.gateway.to_string();
    let matches = driver == "bridge"
        && configs.iter().any(|c| {
            c.subnet.as_deref() == Some(subnet.as_str())
                && c.gateway.as_deref() == Some(gateway.as_str())
        });
    if matches {
        return Ok(NetworkAction::Unchanged);
    }

    let found = format!(
        "driver {driver}, subnets {}",
        configs
            .iter()
            .map(|c| format!(
                "{} gateway {}",
                c.subnet.as_deref().unwrap_or("?"),
                c.gateway.as_deref().unwrap_or("?")
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Who is attached? The agent's containers can be re-created; anyone else's cannot.
    let mut ours = Vec::new();
    let mut foreign = Vec::new();
    for endpoint in net.containers.clone().unwrap_or_default().into_values() {
        let name = endpoint.name.unwrap_or_default();
        let managed = match containers::inspect(docker, &name).await? {
            Some(c) => c
                .config
                .and_then(|c| c.labels)
                .is_some_and(|l| l.get(LABEL_MANAGED).map(String::as_str) == Some("true")),
            None => true, // gone in the meantime
        };
        if managed {
            ours.push(name);
        } else {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        return Err(WaypointError::Conflict(format!(
            "docker network {} exists with {found}, not the configured bridge {subnet} gateway \
             {gateway}, and containers the agent does not manage use it ({}); move them off it \
             or change waypoint.network",
            spec.name,
            foreign.join(", ")
        )));
    }
    tracing::info!(
        network = spec.name,
        found,
        "rebuilding the network with the configured subnet"
    );
    for name in &ours {
        containers::remove(docker, name).await?;
    }
    docker
        .remove_network(&spec.name)
        .await
        .map_err(|e| WaypointError::docker(format!("remove network {}", spec.name), e))?;
    create_network(docker, spec).await?;
    Ok(NetworkAction::Rebuilt { removed: ours })
}

async fn create_network(docker: &Docker, spec: &NetworkConfig) -> Result<(), WaypointError> {
    let request = NetworkCreateRequest {
        name: spec.name.clone(),
        driver: Some("bridge".into()),
        ipam: Some(Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(spec.subnet.to_string()),
                gateway: Some(spec.gateway.to_string()),
                ..Default::default()
            }]),
            options: None,
        }),
        labels: Some(HashMap::from([(
            LABEL_MANAGED.to_string(),
            "true".to_string(),
        )])),
        ..Default::default()
    };
    docker
        .create_network(request)
        .await
        .map_err(|e| WaypointError::docker(format!("create network {}", spec.name), e))?;
    tracing::info!(network = spec.name, subnet = %spec.subnet, "created network");
    Ok(())
}

/// Whether the named volume exists.
pub async fn volume_exists(docker: &Docker, name: &str) -> Result<bool, WaypointError> {
    match docker.inspect_volume(name).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(WaypointError::docker(format!("inspect volume {name}"), e)),
    }
}

/// Makes the named volume exist; returns whether it was created.
pub async fn ensure_volume(docker: &Docker, name: &str) -> Result<bool, WaypointError> {
    if volume_exists(docker, name).await? {
        return Ok(false);
    }
    // Creating a named volume that exists returns it: a race here is harmless.
    docker
        .create_volume(VolumeCreateRequest {
            name: Some(name.to_string()),
            labels: Some(HashMap::from([(
                LABEL_MANAGED.to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        })
        .await
        .map_err(|e| WaypointError::docker(format!("create volume {name}"), e))?;
    tracing::info!(volume = name, "created volume");
    Ok(true)
}
