//! The `waypoint-server` container and its readiness.
//!
//! It runs Waypoint's documented server command line
//! (`server run -accept-tos -url-enabled=false -db=/data/data.db -listen-grpc=0.0.0.0:9701
//! -listen-http=0.0.0.0:9702 -tls-cert-file=... -tls-key-file=...`)
//! with the data volume at `/data`, the certificate the agent's CA issued it mounted read-only
//! (see [`super::tls`]), both ports published, on the Pilot network (where runners find it by
//! its name), restarted by dockerd unless stopped by hand. Readiness is the HTTPS
//! port answering at the container's address on the Pilot network: that is the path runners
//! take, and it does not depend on the published ports or on who the firewall lets reach them.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bollard::Docker;

use super::containers::{self, Action};
use super::spec::{ContainerSpec, Publish};
use super::tls::{self, SERVER_TLS_PATH};
use super::{GRPC_PORT, HTTP_PORT, Role, SERVER_NAME, WaypointError, WaypointPlan, images, ready};

/// The variable that carries the served certificate's SHA-256 into the spec (and so its
/// hash): Waypoint reads its certificate once, at start, so a new one must replace the
/// container.
pub const CERT_HASH_ENV: &str = "PILOT_WAYPOINT_CERT_SHA256";

/// The server's spec for the image with ID `image_id`, serving the certificate whose SHA-256
/// is `cert_sha256` from [`WaypointPlan::server_tls_dir`].
pub fn spec(plan: &WaypointPlan, image_id: &str, cert_sha256: &str) -> ContainerSpec {
    let c = &plan.config;
    ContainerSpec {
        name: SERVER_NAME.into(),
        role: Role::Server,
        image: c.server_image.clone(),
        image_id: image_id.to_string(),
        cmd: vec![
            "server".into(),
            "run".into(),
            "-accept-tos".into(),
            // Waypoint's URL service (hashicorp's hosted `api.waypoint.run`) is on by
            // default and dialled at start, before the listeners open; the project was
            // archived in January 2024 and nothing in Pilot uses the service.
            "-url-enabled=false".into(),
            "-db=/data/data.db".into(),
            format!("-listen-grpc=0.0.0.0:{GRPC_PORT}"),
            format!("-listen-http=0.0.0.0:{HTTP_PORT}"),
            // Without these, each listener serves a new self-signed certificate at every
            // start, which no client can verify.
            format!("-tls-cert-file={SERVER_TLS_PATH}/cert.pem"),
            format!("-tls-key-file={SERVER_TLS_PATH}/key.pem"),
        ],
        env: vec![format!("{CERT_HASH_ENV}={cert_sha256}")],
        binds: vec![
            format!("{}:/data", c.volume),
            format!("{}:{SERVER_TLS_PATH}:ro", plan.server_tls_dir().display()),
        ],
        publish: vec![
            Publish {
                container_port: GRPC_PORT,
                host_ip: c.publish_address,
                host_port: c.grpc_port,
            },
            Publish {
                container_port: HTTP_PORT,
                host_ip: c.publish_address,
                host_port: c.http_port,
            },
        ],
        network_mode: c.network.name.clone(),
        restart_unless_stopped: true,
        user: None,
    }
}

/// What [`ensure`] found and did.
#[derive(Debug, Clone)]
pub struct ServerReport {
    pub action: Action,
    pub id: String,
    /// Where readiness was probed.
    pub addr: SocketAddr,
    /// How long the server took to answer after the container was in place.
    pub ready_after: Duration,
}

impl ServerReport {
    pub fn summary(&self) -> String {
        let short = &self.id[..self.id.len().min(12)];
        format!(
            "{SERVER_NAME} {} ({short}); answers at https://{} (ready after {:.2}s)",
            self.action,
            self.addr,
            self.ready_after.as_secs_f64()
        )
    }
}

/// Converges the server container and waits until it answers over HTTPS.
pub async fn ensure(docker: &Docker, plan: &WaypointPlan) -> Result<ServerReport, WaypointError> {
    let image_id = wanted_image_id(docker, plan).await?;
    ensure_image(docker, plan, &image_id).await
}

/// The ID of the configured server image, which the images step made present.
pub async fn wanted_image_id(
    docker: &Docker,
    plan: &WaypointPlan,
) -> Result<String, WaypointError> {
    let c = &plan.config;
    images::image_id(docker, &c.server_image)
        .await?
        .ok_or_else(|| {
            WaypointError::Conflict(format!(
                "image {} is not present (the images step makes it present)",
                c.server_image
            ))
        })
}

/// [`ensure`] with the image `image_id`. A guarded upgrade rolls back to the previous image
/// with it: when `image_id` is not the configured image's, the container names the ID itself
/// (the configured reference is the image that failed).
pub async fn ensure_image(
    docker: &Docker,
    plan: &WaypointPlan,
    image_id: &str,
) -> Result<ServerReport, WaypointError> {
    let c = &plan.config;
    let by_id = images::image_id(docker, &c.server_image).await?.as_deref() != Some(image_id);
    let image_id = image_id.to_string();
    let served =
        tls::ensure_server_files(docker, &plan.server_leaf, &plan.server_tls_dir(), &image_id)
            .await?;
    if served.changed {
        tracing::info!(
            uid = served.owner.uid,
            gid = served.owner.gid,
            "the Waypoint server's certificate is in place for the user its image runs as"
        );
    }
    let mut wanted = spec(plan, &image_id, &served.cert_sha256);
    if by_id {
        wanted.image = image_id.clone();
    }
    let ensured = containers::ensure(docker, &wanted).await?;
    // A container that dockerd is restarting (it exited: a crash at start) has no address
    // until it runs again; that is a server not ready yet, bounded by the same deadline.
    let timeout = Duration::from_secs(c.ready_timeout_secs);
    let started = std::time::Instant::now();
    let mut inspect = ensured.inspect.clone();
    let ip: IpAddr = loop {
        if let Some(ip) =
            containers::address_on(&inspect, &c.network.name).and_then(|ip| ip.parse().ok())
        {
            break ip;
        }
        if started.elapsed() >= timeout {
            return Err(WaypointError::Conflict(format!(
                "{SERVER_NAME} got no address on network {} within {}s (is it restarting? \
                 see `docker logs {SERVER_NAME}`)",
                c.network.name,
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        inspect = containers::inspect(docker, SERVER_NAME)
            .await?
            .ok_or_else(|| WaypointError::Conflict(format!("{SERVER_NAME} disappeared")))?;
    };
    let addr = SocketAddr::new(ip, HTTP_PORT);
    let left = timeout.saturating_sub(started.elapsed());
    let ready_after = ready::wait_ready(addr, left.max(Duration::from_secs(1))).await?;
    Ok(ServerReport {
        action: ensured.action,
        id: ensured.id,
        addr,
        ready_after,
    })
}
