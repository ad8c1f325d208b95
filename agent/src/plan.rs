//! Which steps `pilot-agent up` runs, in which order, and what they share.
//!
//! ```text
//! firewall ──────────────┬──> docker-config ──> docker-tls
//! pki (CA, certificates) ┘                       (after firewall, pki, docker-config)
//! ```
//!
//! The firewall comes before anything that gives dockerd a TCP listener: `daemon.json` gets
//! its `tcp://` host only once 2375 is locked and 2376 restricted.
//!
//! Adding steps (issue 4): write the step's logic in its own module (`waypoint/`,
//! `database/`), add a `Step::new(NAME, |ctx| async move { ... })` here with `.after(&[...])`
//! naming what it needs (e.g. `waypoint-server` after [`DOCKER_TLS`]; the database step
//! `.fail_open()` and after nothing, so an unreachable database holds back no one), and put
//! anything later steps need from it in [`Facts`] (set once with `OnceLock::set`).

use std::sync::{Arc, OnceLock};

use crate::config::Config;
use crate::docker::{self, DaemonInfo, DockerPlan};
use crate::engine::{Outcome, Step, StepError, StepResult};
use crate::firewall::{self, FirewallSpec, Nft};
use crate::host;
use crate::pki::{self, LeafSpec, PkiLayout, Policy};

pub const FIREWALL: &str = "firewall";
pub const PKI: &str = "pki";
pub const DOCKER_CONFIG: &str = "docker-config";
pub const DOCKER_TLS: &str = "docker-tls";

/// Options of one `up` run.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// Make a new database password and set it on the role. Accepted now, used by the
    /// database step (issue 4); without a database step it changes nothing.
    pub rotate_db_password: bool,
}

/// What steps learn and later steps use. Each field is set once, by the step that owns it;
/// a dependent reads it only after that step converged (the engine guarantees the order).
#[derive(Debug, Default)]
pub struct Facts {
    /// dockerd's version as it answered over TLS (`docker-tls`).
    pub docker: OnceLock<DaemonInfo>,
}

/// The context every step of `up` receives.
#[derive(Debug)]
pub struct Ctx {
    pub config: Config,
    pub options: UpOptions,
    /// How nft is run (plain `nft` on a host).
    pub nft: Nft,
    pub facts: Facts,
}

impl Ctx {
    pub fn new(config: Config, options: UpOptions) -> Self {
        Ctx {
            config,
            options,
            nft: Nft::default(),
            facts: Facts::default(),
        }
    }
}

/// The firewall step alone (also what `pilot-agent firewall` runs).
pub fn firewall_step() -> Step<Ctx> {
    Step::new(FIREWALL, |ctx: Arc<Ctx>| async move {
        let spec = FirewallSpec::from_config(&ctx.config);
        let report = firewall::converge(&spec, &ctx.nft).await?;
        Ok(outcome(report.changed, report.summary()))
    })
}

/// Every step of `up`, in the order status lists them.
pub fn up_steps() -> Vec<Step<Ctx>> {
    vec![
        firewall_step(),
        Step::new(PKI, |ctx: Arc<Ctx>| async move {
            // File and key work: off the async thread.
            tokio::task::spawn_blocking(move || pki_step(&ctx.config))
                .await
                .map_err(|e| StepError::msg(format!("pki step panicked: {e}")))?
        }),
        Step::new(DOCKER_CONFIG, |ctx: Arc<Ctx>| async move {
            let plan = DockerPlan::from_config(&ctx.config);
            let r = docker::ensure_config(&plan)?;
            let mut changed = Vec::new();
            if r.daemon_config_changed {
                changed.push(plan.daemon_config.display().to_string());
            }
            if r.dropin_changed {
                if let Some((p, _)) = &plan.dropin {
                    changed.push(p.display().to_string());
                }
            }
            Ok(if changed.is_empty() {
                Outcome::Ok(format!(
                    "{} already configures mutual TLS",
                    plan.daemon_config.display()
                ))
            } else {
                Outcome::Changed(format!("wrote {}", changed.join(", ")))
            })
        })
        .after(&[FIREWALL, PKI]),
        Step::new(DOCKER_TLS, |ctx: Arc<Ctx>| async move {
            let plan = DockerPlan::from_config(&ctx.config);
            let r = docker::ensure_serving(&plan).await?;
            let _ = ctx.facts.docker.set(r.info.clone());
            Ok(outcome(r.restarted.is_some(), r.summary()))
        })
        .after(&[FIREWALL, PKI, DOCKER_CONFIG]),
    ]
}

fn pki_step(config: &Config) -> StepResult {
    let hostname = match &config.host.hostname {
        Some(h) => h.clone(),
        None => host::kernel_hostname()?,
    };
    let addrs = host::interface_addrs()?;
    let mut leaves = vec![LeafSpec::server(host::server_sans(
        config, &hostname, &addrs,
    ))];
    leaves.extend(pki::CLIENTS.iter().map(|c| LeafSpec::client(c)));
    let report = pki::ensure(
        &PkiLayout::new(config.pki_dir()),
        &Policy::from(&config.pki),
        &leaves,
        time::OffsetDateTime::now_utc(),
    )?;
    Ok(outcome(report.files_changed, report.summary()))
}

fn outcome(changed: bool, detail: String) -> Outcome {
    if changed {
        Outcome::Changed(detail)
    } else {
        Outcome::Ok(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;

    #[test]
    fn up_steps_form_a_valid_graph_with_the_firewall_first() {
        let steps = up_steps();
        let names: Vec<_> = steps.iter().map(|s| s.name()).collect();
        assert_eq!(names, vec![FIREWALL, PKI, DOCKER_CONFIG, DOCKER_TLS]);
        Engine::new("up", steps).unwrap();
    }

    /// Firewall and dockerd fail here (no nft in a fake namespace, no dockerd), but the PKI
    /// converges and the Docker steps are skipped: nothing writes daemon.json before the
    /// firewall is in place.
    #[tokio::test]
    async fn docker_config_waits_for_the_firewall() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            state_dir: dir.path().join("state"),
            ..Config::default()
        };
        config.docker.daemon_config = dir.path().join("daemon.json");
        config.docker.systemd_dropin_dir = dir.path().join("dropin");
        std::fs::create_dir_all(&config.state_dir).unwrap();
        let mut ctx = Ctx::new(config.clone(), UpOptions::default());
        ctx.nft = Nft::with_argv(vec!["/nonexistent/nft".into()]);
        let engine = Engine::new("up", up_steps()).unwrap();
        let s = engine.run(Arc::new(ctx)).await.unwrap();
        let state = |n: &str| s.step(n).unwrap().state;
        use crate::status::StepState;
        assert_eq!(state(FIREWALL), StepState::Error);
        assert!(
            s.step(FIREWALL)
                .unwrap()
                .detail
                .contains("/nonexistent/nft")
        );
        assert_eq!(state(PKI), StepState::Changed);
        assert_eq!(state(DOCKER_CONFIG), StepState::Skipped);
        assert_eq!(state(DOCKER_TLS), StepState::Skipped);
        assert!(!config.docker.daemon_config.exists());
    }
}
