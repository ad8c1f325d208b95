//! Step `waypoint-advertise`: the address the Waypoint server tells deployed applications'
//! entrypoints to call back to.
//!
//! Every application Waypoint deploys runs its entrypoint, which connects to the server's
//! advertised address for configuration, logs, exec and the URL service, and starts the
//! application without them after a few seconds if it cannot. `waypoint install` on Docker
//! advertises the container's internal name, which no application outside that Docker network
//! can resolve. So the agent sets it, with Waypoint's documented
//! `waypoint server config-set -advertise-addr=HOST:PORT -advertise-tls=true
//! -advertise-tls-skip-verify=true` (the server's certificate is self-signed), run in the
//! server container against its loopback.
//!
//! Waypoint keeps the setting in its database, and its CLI has no way to read it back, so the
//! address last set is kept in `STATE_DIR/waypoint/advertise-address`: a pass sets it again
//! only when the wanted address differs (the host got a new public address, the operator
//! changed the configuration) or the server's volume was re-created (the marker is discarded
//! with the old server's tokens).

use std::time::Duration;

use bollard::Docker;

use super::{Report, WaypointError, WaypointPlan, read_token, write_token};
use crate::addresses::InterfaceAddr;
use crate::config::Config;
use crate::identity::{Identity, Provider};
use pilot_values::join_host_port;

/// How long `waypoint server config-set` may take.
const CONFIG_SET_LIMIT: Duration = Duration::from_secs(30);

/// The `HOST:PORT` the server should advertise: `waypoint.advertise_address` when set; on a
/// cloud the instance's public IPv4, else its public host name, else its private IPv4;
/// elsewhere the host the credentials name (see [`crate::addresses::waypoint_host`]).
/// The port is `waypoint.grpc_port`, the port published on the host.
pub fn wanted_address(config: &Config, identity: &Identity, addrs: &[InterfaceAddr]) -> String {
    let Some(w) = &config.waypoint else {
        return String::new();
    };
    if let Some(fixed) = w.advertise.fixed() {
        return fixed;
    }
    let cloud = matches!(identity.provider, Provider::Aws | Provider::Gcp);
    let host = if cloud {
        identity
            .public_ipv4
            .map(|ip| ip.to_string())
            .or_else(|| identity.public_hostname.clone())
            .or_else(|| identity.private_ipv4.map(|ip| ip.to_string()))
    } else {
        None
    };
    let host = host.unwrap_or_else(|| crate::addresses::waypoint_host(config, addrs));
    join_host_port(&host, w.grpc_port)
}

/// Sets the advertise address to `address` unless it was set to it already.
pub async fn ensure(
    docker: &Docker,
    plan: &WaypointPlan,
    address: &str,
) -> Result<Report, WaypointError> {
    let marker = plan.advertise_marker_path();
    if read_token(&marker)?.as_deref() == Some(address) {
        return Ok(Report {
            changed: false,
            detail: format!("the server advertises {address} to applications"),
        });
    }
    let flag = format!("-advertise-addr={address}");
    let args = [
        "server",
        "config-set",
        flag.as_str(),
        "-advertise-tls=true",
        "-advertise-tls-skip-verify=true",
    ];
    let out = super::server_cli(docker, plan, &args, CONFIG_SET_LIMIT).await?;
    if out.exit_code != Some(0) {
        // config-set prints no secret: its output can be shown.
        return Err(out.failure(super::SERVER_NAME, "waypoint server config-set"));
    }
    // Not a secret, but it lives with the tokens it is discarded with; 0600 does no harm.
    write_token(&marker, address)?;
    tracing::info!(address, "the waypoint server advertises a new address");
    Ok(Report {
        changed: true,
        detail: format!("set the server's advertise address to {address}"),
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::WaypointConfig;
    use crate::config::waypoint::Advertise;

    fn identity(provider: Provider) -> Identity {
        Identity {
            provider,
            instance_id: None,
            region: None,
            zone: None,
            private_ipv4: Some(Ipv4Addr::new(10, 0, 1, 5)),
            public_ipv4: Some(Ipv4Addr::new(203, 0, 113, 7)),
            hostname: Some("ip-10-0-1-5.internal".into()),
            public_hostname: Some("ec2-203-0-113-7.compute.amazonaws.com".into()),
        }
    }

    fn config(advertise: Advertise) -> Config {
        Config {
            waypoint: Some(WaypointConfig {
                advertise,
                grpc_port: 19701,
                ..WaypointConfig::default()
            }),
            ..Config::default()
        }
    }

    #[test]
    fn public_address_on_clouds_and_the_fixed_one_when_set() {
        let addrs = [InterfaceAddr {
            interface: "eth0".into(),
            ip: "192.168.1.9".parse().unwrap(),
        }];
        let auto = config(Advertise::Auto);
        assert_eq!(
            wanted_address(&auto, &identity(Provider::Aws), &addrs),
            "203.0.113.7:19701"
        );
        let mut private_only = identity(Provider::Gcp);
        private_only.public_ipv4 = None;
        private_only.public_hostname = None;
        assert_eq!(
            wanted_address(&auto, &private_only, &addrs),
            "10.0.1.5:19701"
        );
        // Off a cloud: what the credentials name (here the first interface address).
        assert_eq!(
            wanted_address(&auto, &identity(Provider::Host), &addrs),
            "192.168.1.9:19701"
        );
        let fixed = config(Advertise::Fixed {
            host: "pilot.example.com".into(),
            port: 443,
        });
        assert_eq!(
            wanted_address(&fixed, &identity(Provider::Aws), &addrs),
            "pilot.example.com:443"
        );
    }
}
