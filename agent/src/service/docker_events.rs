//! Watches dockerd's event stream for the containers the agent manages, and dockerd itself.
//!
//! One task holds `GET /events` open, filtered on `type=container`,
//! `label=io.pilot.managed=true` and the actions that mean a container is gone or going
//! (`die`, `stop`, `kill`, `destroy`, `oom`), and forwards each as a [`Signal::Event`]. When
//! the stream ends or fails (dockerd stopped, restarted, crashed), it reconnects with backoff
//! (1 s doubling to 30 s) and, once dockerd answers, sends [`Signal::Reconnected`]: events of
//! the downtime are lost, so the run loop makes a full pass instead.
//!
//! Every (re)connection makes a new client: a client whose pooled connections died with the
//! old dockerd is never reused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptionsBuilder;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::endpoint::Telemetry;
use crate::waypoint;

/// Actions of a managed container that call for a pass.
pub const ACTIONS: &[&str] = &["die", "stop", "kill", "destroy", "oom"];

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A stream that lived this long was a working connection: the next loss starts the backoff
/// afresh.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// What the watcher tells the run loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// `waypoint-server die`.
    Event(String),
    /// dockerd answers again after it was lost (or after it did not answer at first).
    Reconnected,
}

/// The event filter: managed containers, the actions above.
pub fn filters() -> HashMap<&'static str, Vec<String>> {
    HashMap::from([
        ("type", vec!["container".to_string()]),
        ("label", vec![format!("{}=true", waypoint::LABEL_MANAGED)]),
        ("event", ACTIONS.iter().map(|a| a.to_string()).collect()),
    ])
}

/// `NAME ACTION` of an event (the container's id when it has no name attribute).
pub fn describe(event: &EventMessage) -> String {
    let actor = event.actor.as_ref();
    let name = actor
        .and_then(|a| a.attributes.as_ref())
        .and_then(|attrs| attrs.get("name").cloned())
        .or_else(|| actor.and_then(|a| a.id.clone()))
        .unwrap_or_else(|| "container".into());
    let action = event.action.clone().unwrap_or_else(|| "event".into());
    format!("{name} {action}")
}

/// Runs until the receiver is dropped.
pub async fn watch(socket: PathBuf, tx: mpsc::UnboundedSender<Signal>, telemetry: Arc<Telemetry>) {
    let mut delay = BACKOFF_MIN;
    // Whether dockerd was unreachable (or its stream lost) since the last connection: a
    // (re)connection then asks for a pass. The first connection right after the first pass
    // does not.
    let mut lost = false;
    let mut reported = false;
    loop {
        if tx.is_closed() {
            return;
        }
        match waypoint::connect(&socket).await {
            Ok(docker) => {
                let options = EventsOptionsBuilder::new().filters(&filters()).build();
                let mut stream = docker.events(Some(options));
                if lost {
                    tracing::info!("dockerd answers again; re-converging");
                    if tx.send(Signal::Reconnected).is_err() {
                        return;
                    }
                }
                let since = Instant::now();
                let why = loop {
                    match stream.next().await {
                        Some(Ok(event)) => {
                            telemetry.record_docker_event();
                            let what = describe(&event);
                            tracing::info!("docker event: {what}");
                            if tx.send(Signal::Event(what)).is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => break format!("failed: {e}"),
                        None => break "ended".to_string(),
                    }
                };
                tracing::warn!(
                    "dockerd's event stream {why}; reconnecting to {}",
                    socket.display()
                );
                lost = true;
                reported = true;
                if since.elapsed() >= STABLE_AFTER {
                    delay = BACKOFF_MIN;
                }
            }
            Err(e) => {
                if !reported {
                    tracing::warn!("cannot watch dockerd's events (retrying with backoff): {e}");
                    reported = true;
                } else {
                    tracing::debug!("dockerd still unreachable: {e}");
                }
                lost = true;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    #[test]
    fn events_are_named_by_container_and_action() {
        let event = EventMessage {
            action: Some("die".into()),
            actor: Some(EventActor {
                id: Some("abc123".into()),
                attributes: Some(HashMap::from([(
                    "name".to_string(),
                    "waypoint-server".to_string(),
                )])),
            }),
            ..Default::default()
        };
        assert_eq!(describe(&event), "waypoint-server die");
        let event = EventMessage {
            action: Some("oom".into()),
            actor: Some(EventActor {
                id: Some("abc123".into()),
                attributes: None,
            }),
            ..Default::default()
        };
        assert_eq!(describe(&event), "abc123 oom");
        let f = filters();
        assert_eq!(f["label"], ["io.pilot.managed=true"]);
        assert_eq!(f["event"], ["die", "stop", "kill", "destroy", "oom"]);
    }
}
