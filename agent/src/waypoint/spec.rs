//! What a managed container should be, as data: [`ContainerSpec`], its Docker create body, and
//! the hash of its canonical form that goes into the `io.pilot.spec-hash` label.
//!
//! Drift is decided by comparing hashes, not by reading back dockerd's view of a container
//! (which adds defaults, image environment and normalised forms). The hash covers everything
//! the agent sets, the image's ID included, so a new image loaded under the same tag replaces
//! the container too.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use bollard::models::{
    ContainerCreateBody, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{LABEL_MANAGED, LABEL_ROLE, LABEL_SPEC_HASH, Role};

/// A port of the container published on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Publish {
    pub container_port: u16,
    pub host_ip: IpAddr,
    pub host_port: u16,
}

/// A managed container, as the agent wants it.
///
/// `Debug` leaves out environment values: a runner's carries its Waypoint token.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct ContainerSpec {
    pub name: String,
    #[serde(serialize_with = "serialize_role")]
    pub role: Role,
    /// The image reference as configured.
    pub image: String,
    /// The image's ID (`sha256:...`) when the spec was made; part of the hash.
    pub image_id: String,
    /// Arguments after the image's entrypoint.
    pub cmd: Vec<String>,
    /// `NAME=VALUE`, in this order.
    pub env: Vec<String>,
    /// `SOURCE:TARGET[:OPTIONS]`: a named volume or a host path.
    pub binds: Vec<String>,
    pub publish: Vec<Publish>,
    /// A network name, or `container:NAME` to share another container's network namespace.
    pub network_mode: String,
    /// Restarted by dockerd (also after a dockerd or host restart) unless stopped by hand.
    pub restart_unless_stopped: bool,
    /// The user the container runs as; `None`: the image's own (`USER`). Left out of the
    /// hash when `None`, so that specs made before the field existed keep their hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

fn serialize_role<S: serde::Serializer>(role: &Role, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(role.as_str())
}

impl fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_names: Vec<&str> = self
            .env
            .iter()
            .map(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k))
            .collect();
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("image", &self.image)
            .field("image_id", &self.image_id)
            .field("cmd", &self.cmd)
            .field("env", &env_names)
            .field("binds", &self.binds)
            .field("publish", &self.publish)
            .field("network_mode", &self.network_mode)
            .field("restart_unless_stopped", &self.restart_unless_stopped)
            .field("user", &self.user)
            .finish()
    }
}

impl ContainerSpec {
    /// SHA-256 (hex) of the spec's canonical JSON: serde writes struct fields in declaration
    /// order, so the same spec always gives the same bytes.
    pub fn hash(&self) -> String {
        // Serialising plain strings, numbers and addresses cannot fail.
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_ROLE.to_string(), self.role.as_str().to_string()),
            (LABEL_SPEC_HASH.to_string(), self.hash()),
        ])
    }

    /// The body of `POST /containers/create`.
    pub fn create_body(&self) -> ContainerCreateBody {
        let exposed: Vec<String> = self
            .publish
            .iter()
            .map(|p| format!("{}/tcp", p.container_port))
            .collect();
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for p in &self.publish {
            bindings
                .entry(format!("{}/tcp", p.container_port))
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: Some(p.host_ip.to_string()),
                    host_port: Some(p.host_port.to_string()),
                });
        }
        let restart = if self.restart_unless_stopped {
            RestartPolicyNameEnum::UNLESS_STOPPED
        } else {
            RestartPolicyNameEnum::NO
        };
        ContainerCreateBody {
            // The reference, so that `docker ps` shows what operators configured. Should the
            // tag move between the hash and this create, the next run sees the mismatch
            // (the hash has the old ID) and replaces the container.
            image: Some(self.image.clone()),
            cmd: Some(self.cmd.clone()),
            env: (!self.env.is_empty()).then(|| self.env.clone()),
            user: self.user.clone(),
            labels: Some(self.labels()),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            host_config: Some(HostConfig {
                binds: (!self.binds.is_empty()).then(|| self.binds.clone()),
                port_bindings: (!bindings.is_empty()).then_some(bindings),
                network_mode: Some(self.network_mode.clone()),
                restart_policy: Some(RestartPolicy {
                    name: Some(restart),
                    maximum_retry_count: None,
                }),
                // Spelled out, so that nobody mistakes the defaults for an oversight: the
                // runners reach Docker over TLS, never through a mounted socket or privilege.
                privileged: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "waypoint-runner-1".into(),
            role: Role::Runner,
            image: "pilot/waypoint:0.11.4".into(),
            image_id: "sha256:aaaa".into(),
            cmd: vec!["runner".into(), "agent".into()],
            env: vec![
                "WAYPOINT_SERVER_TOKEN=secret-token".into(),
                "DOCKER_TLS_VERIFY=1".into(),
            ],
            binds: vec!["/state/pki/runner:/certs:ro".into()],
            publish: vec![],
            network_mode: "pilot".into(),
            restart_unless_stopped: true,
            user: None,
        }
    }

    #[test]
    fn hash_is_stable_and_follows_every_field() {
        let a = spec();
        assert_eq!(a.hash(), spec().hash());
        assert_eq!(a.hash().len(), 64);
        let mut b = spec();
        b.image_id = "sha256:bbbb".into();
        assert_ne!(a.hash(), b.hash());
        let mut c = spec();
        c.env[0] = "WAYPOINT_SERVER_TOKEN=other".into();
        assert_ne!(a.hash(), c.hash());
        let mut d = spec();
        d.binds.clear();
        assert_ne!(a.hash(), d.hash());
        let mut e = spec();
        e.user = Some("root".into());
        assert_ne!(a.hash(), e.hash());
        assert!(
            !String::from_utf8(serde_json::to_vec(&a).unwrap())
                .unwrap()
                .contains("user"),
            "no user: the field is left out of the canonical form"
        );
    }

    #[test]
    fn debug_hides_environment_values() {
        let text = format!("{:?}", spec());
        assert!(!text.contains("secret-token"), "{text}");
        assert!(text.contains("WAYPOINT_SERVER_TOKEN"), "{text}");
    }

    #[test]
    fn create_body_publishes_ports_and_never_privileges() {
        let mut s = spec();
        s.role = Role::Server;
        s.publish = vec![Publish {
            container_port: 9702,
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: 19702,
        }];
        let body = serde_json::to_value(s.create_body()).unwrap();
        assert_eq!(body["Image"], "pilot/waypoint:0.11.4");
        assert_eq!(body["ExposedPorts"], serde_json::json!({"9702/tcp": {}}));
        let hc = &body["HostConfig"];
        assert_eq!(
            hc["PortBindings"]["9702/tcp"],
            serde_json::json!([{"HostIp": "0.0.0.0", "HostPort": "19702"}])
        );
        assert_eq!(hc["RestartPolicy"]["Name"], "unless-stopped");
        assert_eq!(hc["Privileged"], false);
        assert_eq!(hc["NetworkMode"], "pilot");
        assert_eq!(body["Labels"][LABEL_ROLE], "server");
        assert_eq!(body["Labels"][LABEL_SPEC_HASH], s.hash());
        let binds = hc["Binds"].as_array().unwrap();
        assert!(
            binds
                .iter()
                .all(|b| !b.as_str().unwrap().contains("docker.sock")),
            "{binds:?}"
        );
    }
}
