//! Which steps `pilot-agent up` runs, in which order, and what they share.
//!
//! ```text
//! identity (cloud metadata or host; a fact the pki step awaits, never a blocker)
//! firewall ──────────────┬──> docker-config ──> docker-tls ──┬──> images ──┐
//! pki (CA, certificates) ┘                                    └──> network ─┴──> waypoint-server
//!                                                                               │
//!                              waypoint-runners <── waypoint-bootstrap <────────┘
//!                              waypoint-advertise <─ waypoint-bootstrap
//! database (fail-open, after nothing: an unreachable database holds back no one)
//! ```
//!
//! A runner-only host (`role: runner`) has no server, bootstrap, advertise or database step;
//! `server-link` fetches the server VM's Waypoint address and token from its endpoint
//! (degraded while the server VM cannot be reached: the runners keep running on what was
//! fetched before) and the runners come after it:
//!
//! ```text
//! docker-tls ──> images, network ──┐
//! server-link ─────────────────────┴──> waypoint-runners
//! ```
//!
//! The identity is resolved once per pass and shared ([`Ctx::identity`]): the pki step awaits
//! it without depending on the `identity` step, so a metadata service that is down makes
//! that step degraded (or an error, when it answers wrongly) while the host still converges
//! with its own names.
//!
//! The firewall comes before anything that gives dockerd a TCP listener: `daemon.json` gets
//! its `tcp://` host only once 2375 is locked and 2376 restricted. The Waypoint steps exist
//! only with a `waypoint:` section, the database step only with a `database:` section.
//!
//! Adding steps: write the step's logic in its own module, add a `Step::new(NAME, |ctx| async
//! move { ... })` here with `.after(&[...])` naming what it needs, and put anything later
//! steps need from it in [`Facts`] (set once with `OnceLock::set`).

use std::collections::BTreeSet;
use std::sync::Arc;

use std::time::Duration;

use crate::addresses::{self, San};
use crate::backup;
use crate::config::{Advertise, Config, Role, WaypointConfig};
use crate::database;
use crate::docker::{self, DockerPlan};
use crate::engine::{Outcome, Step, StepError, StepResult};
use crate::firewall::{self, FirewallSpec, Nft};
use crate::fsutil;
use crate::identity::{self, Resolution, marker};
use crate::layout::StateLayout;
use crate::pki::{self, LeafSpec, PkiLayout, Policy};
use crate::waypoint::{self, WaypointPlan};

pub const IDENTITY: &str = "identity";
pub const FIREWALL: &str = "firewall";
pub const PKI: &str = "pki";
pub const DOCKER_CONFIG: &str = "docker-config";
pub const DOCKER_TLS: &str = "docker-tls";
pub const IMAGES: &str = "images";
pub const NETWORK: &str = "network";
pub const WAYPOINT_SERVER: &str = "waypoint-server";
pub const WAYPOINT_BOOTSTRAP: &str = "waypoint-bootstrap";
pub const WAYPOINT_ADVERTISE: &str = "waypoint-advertise";
pub const WAYPOINT_RUNNERS: &str = "waypoint-runners";
pub const SERVER_LINK: &str = "server-link";
pub const DATABASE: &str = "database";
pub const WAYPOINT_BACKUP: &str = "waypoint-backup";

/// How long the database step may take before it reports the server as stalled.
const DATABASE_STEP_LIMIT: Duration = Duration::from_secs(300);

/// Where the application role's password is stored (0600), under the state directory.
pub fn database_password_path(config: &Config) -> std::path::PathBuf {
    config.state().database_password()
}

/// Options of one `up` run.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// Make a new database password and set it on the role (the database step); without a
    /// `database:` section it changes nothing.
    pub rotate_db_password: bool,
}

/// What steps learn and later steps use. Each field is set once; a dependent reads it only
/// after the step that makes it valid converged (the engine guarantees the order).
#[derive(Debug, Default)]
pub struct Facts {
    /// The API client of dockerd's unix socket, connected (and its API version negotiated)
    /// once, by the first Waypoint step, after `docker-tls` restarted dockerd for good.
    docker: tokio::sync::OnceCell<bollard::Docker>,
    /// Who the host is: resolved once per pass, by whichever of the identity and pki steps
    /// asks first.
    identity: tokio::sync::OnceCell<Resolution>,
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
    /// dockerd's API over its unix socket, shared by the Waypoint steps.
    async fn docker(&self) -> Result<&bollard::Docker, StepError> {
        let socket = &self.config.docker.socket;
        Ok(self
            .facts
            .docker
            .get_or_try_init(|| waypoint::connect(socket))
            .await?)
    }

    /// The host's identity for this pass (metadata lookup bounded by
    /// `cloud.total_budget_secs`).
    pub async fn identity(&self) -> &Resolution {
        self.facts
            .identity
            .get_or_init(|| {
                identity::resolve_for_state(
                    &self.config.cloud,
                    self.config.host.hostname.as_deref(),
                    &self.config.state_dir,
                )
            })
            .await
    }

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
        let report = apply_firewall(&ctx).await?;
        Ok(outcome(report.changed, report.summary()))
    })
}

/// Applies the table as the host stands now ([`FirewallSpec::current`]).
async fn apply_firewall(ctx: &Ctx) -> Result<firewall::FirewallReport, firewall::FirewallError> {
    let spec = FirewallSpec::current(&ctx.config);
    let record = StateLayout::new(&ctx.config.state_dir).firewall_listing();
    firewall::converge(&spec, &ctx.nft, Some(&record)).await
}

/// Copies the pass's facts into the status file (register with
/// [`crate::engine::Engine::with_annotation`]): the `identity` object.
pub fn annotate_status(ctx: &Ctx, status: &mut crate::status_file::Status) {
    if let Some(r) = ctx.facts.identity.get() {
        status.identity = Some(Box::new(r.report()));
    }
}

/// The identity step: reports what [`Ctx::identity`] found. Degraded when the configured
/// metadata service did not answer, an error when it answered wrongly (IMDSv1 only, not
/// Google's); in both cases the host's identity stands in and nothing waits on this step.
fn identity_step() -> Step<Ctx> {
    Step::new(IDENTITY, |ctx: Arc<Ctx>| async move {
        let r = ctx.identity().await;
        match &r.problem {
            None => Ok(Outcome::Ok(r.summary())),
            Some(p) if p.severity == identity::Severity::Degraded => {
                Ok(Outcome::Degraded(r.summary()))
            }
            Some(_) => Err(StepError::msg(r.summary())),
        }
    })
}

/// Every step of `up` for this configuration, in the order status lists them.
pub fn up_steps(config: &Config) -> Vec<Step<Ctx>> {
    let mut steps = vec![
        identity_step(),
        firewall_step(),
        Step::new(PKI, |ctx: Arc<Ctx>| async move {
            let resolution = ctx.identity().await.clone();
            // File and key work: off the async thread.
            tokio::task::spawn_blocking(move || pki_step(&ctx.config, &resolution))
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
            for (written, dropin) in [
                (r.dropin_changed, &plan.dropin),
                (r.socket_dropin_changed, &plan.socket_dropin),
            ] {
                if let (true, Some((p, _))) = (written, dropin) {
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
            Ok(outcome(r.restarted.is_some(), r.summary()))
        })
        .after(&[FIREWALL, PKI, DOCKER_CONFIG]),
    ];
    match (config.role, config.waypoint.is_some()) {
        (Role::Server, true) => steps.extend(waypoint_steps()),
        (Role::Server, false) => {}
        (Role::Runner, _) => steps.extend(runner_host_steps()),
    }
    if config.database.is_some() {
        steps.push(database_step());
    }
    if config.backup.is_some() && config.role == Role::Server && config.waypoint.is_some() {
        steps.push(backup_step());
    }
    steps
}

/// The scheduled backup (`backup:`): a backup when the last successful one is
/// `interval_hours` old, then the directory pruned to `keep`. A failed backup (the disk full,
/// the server not answering) is `degraded` with its reason, retried by the next passes, and
/// removes nothing: the earlier backups stay.
fn backup_step() -> Step<Ctx> {
    Step::new(WAYPOINT_BACKUP, |ctx: Arc<Ctx>| async move {
        let Some(settings) = &ctx.config.backup else {
            return Err(StepError::msg("the configuration has no backup section"));
        };
        let plan = waypoint_plan(&ctx)?;
        let record_path = ctx.config.state().backup_record();
        let record = backup::read_record(&record_path);
        let dir = settings.dir_under(&ctx.config.state_dir);
        let now = time::OffsetDateTime::now_utc();
        let last_ok = record.as_ref().and_then(|r| r.last_ok.clone());
        if !backup::due(record.as_ref(), settings.interval(), now) {
            let last = last_ok.as_ref().map_or(String::new(), backup::describe);
            return Ok(Outcome::Ok(format!(
                "last backup {last}; the next is due {:.1}h after it",
                settings.interval_hours
            )));
        }
        let host = addresses::host_name(&ctx.config)?;
        let path = backup::new_path(&dir, std::time::SystemTime::now());
        let taken = match backup::ensure_dir(&dir) {
            Ok(()) => backup::take(ctx.docker().await?, &plan, &host, &path).await,
            Err(e) => Err(e.into()),
        };
        let attempted_at = backup::rfc3339(now);
        match taken {
            Ok(taken) => {
                let removed = backup::prune(&dir, settings.keep)?;
                let kept = backup::list(&dir)?.len() as u32;
                let detail = format!(
                    "backed up to {}; {kept} kept in {}{}",
                    backup::describe(&taken),
                    dir.display(),
                    if removed.is_empty() {
                        String::new()
                    } else {
                        format!(", removed {} older", removed.len())
                    }
                );
                backup::write_record(
                    &record_path,
                    &backup::Record {
                        attempted_at,
                        result: "ok".into(),
                        error: None,
                        last_ok: Some(taken),
                        kept,
                    },
                )?;
                Ok(Outcome::Changed(detail))
            }
            Err(e) => {
                let kept = backup::list(&dir).map(|l| l.len() as u32).unwrap_or(0);
                let error = e.to_string();
                backup::write_record(
                    &record_path,
                    &backup::Record {
                        attempted_at,
                        result: "failed".into(),
                        error: Some(error.clone()),
                        last_ok: last_ok.clone(),
                        kept,
                    },
                )?;
                Ok(Outcome::Degraded(format!(
                    "backup failed: {error}; the {kept} earlier backups in {} stay (last \
                     success: {})",
                    dir.display(),
                    last_ok
                        .as_ref()
                        .map_or("none".to_string(), |t| t.at.clone())
                )))
            }
        }
    })
    .after(&[WAYPOINT_BOOTSTRAP])
}

/// The Waypoint plan of a context whose configuration has a `waypoint:` section (the steps
/// exist only then).
fn waypoint_plan(ctx: &Ctx) -> Result<WaypointPlan, StepError> {
    WaypointPlan::from_config(&ctx.config)
        .ok_or_else(|| StepError::msg("the configuration has no waypoint section"))
}

fn report(r: waypoint::Report) -> Outcome {
    outcome(r.changed, r.detail)
}

/// The Waypoint steps. They talk to dockerd over its unix socket, so they come after
/// `docker-tls` (dockerd restarted with its final configuration and answering); the runners
/// also need the PKI (their client certificate), which `docker-tls` already depends on.
fn waypoint_steps() -> Vec<Step<Ctx>> {
    let mut steps = images_and_network_steps();
    steps.extend([
        Step::new(WAYPOINT_SERVER, |ctx: Arc<Ctx>| async move {
            // A server without a stored token (a first boot, or a new volume whose old
            // tokens the network step just discarded) must not publish its ports to anyone
            // before the bootstrap step has its token: the table says so before it starts.
            if !firewall::waypoint_bootstrapped(&ctx.config) {
                apply_firewall(&ctx).await?;
            }
            let plan = waypoint_plan(&ctx)?;
            let docker = ctx.docker().await?;
            // Another image than the running server's: upgraded under guard (a backup first,
            // rolled back if the new one is not healthy in time).
            match backup::upgrade::plan(docker, &plan).await? {
                backup::upgrade::Plan::Converge => {
                    Ok(report(waypoint::converge_server(docker, &plan).await?))
                }
                backup::upgrade::Plan::Upgrade(pending) => {
                    let host = addresses::host_name(&ctx.config)?;
                    let dir = ctx
                        .config
                        .backup
                        .clone()
                        .unwrap_or_default()
                        .dir_under(&ctx.config.state_dir);
                    backup::ensure_dir(&dir)?;
                    let path = backup::new_path(&dir, std::time::SystemTime::now());
                    let done =
                        backup::upgrade::upgrade(docker, &plan, &host, &path, pending).await?;
                    Ok(Outcome::Changed(done.summary(&plan.config.server_image)))
                }
                backup::upgrade::Plan::KeepPrevious(failed) => {
                    let previous = failed.previous_image_id.clone();
                    Err(backup::upgrade::UpgradeError::Refused {
                        failed,
                        previous,
                        marker: backup::upgrade::marker_path(&plan),
                    }
                    .into())
                }
            }
        })
        .after(&[IMAGES, NETWORK]),
        Step::new(WAYPOINT_BOOTSTRAP, |ctx: Arc<Ctx>| async move {
            let mut r =
                waypoint::converge_bootstrap(ctx.docker().await?, &waypoint_plan(&ctx)?).await?;
            // The server's ports stay closed to everything outside the host until its token
            // is stored (FirewallSpec::current); now they open to their sources. A run killed
            // between the two is finished by the next pass's firewall step.
            if r.changed && apply_firewall(&ctx).await?.changed {
                r.detail.push_str("; its ports opened to their sources");
            }
            Ok(report(r))
        })
        .after(&[WAYPOINT_SERVER]),
        Step::new(WAYPOINT_ADVERTISE, |ctx: Arc<Ctx>| async move {
            let identity = ctx.identity().await.identity.clone();
            // Without the interface list the fallback is the host name: not worth failing.
            let addrs = addresses::interface_addrs().unwrap_or_default();
            let address = waypoint::advertise::wanted_address(&ctx.config, &identity, &addrs);
            Ok(report(
                waypoint::converge_advertise(ctx.docker().await?, &waypoint_plan(&ctx)?, &address)
                    .await?,
            ))
        })
        .after(&[WAYPOINT_BOOTSTRAP]),
        runners_step(&[WAYPOINT_BOOTSTRAP, PKI]),
    ]);
    steps
}

/// The images and the network (and, with a server, its volume): what both roles need once
/// dockerd serves its final configuration.
fn images_and_network_steps() -> Vec<Step<Ctx>> {
    vec![
        Step::new(IMAGES, |ctx: Arc<Ctx>| async move {
            Ok(report(
                waypoint::converge_images(ctx.docker().await?, &waypoint_plan(&ctx)?).await?,
            ))
        })
        .after(&[DOCKER_TLS]),
        Step::new(NETWORK, |ctx: Arc<Ctx>| async move {
            Ok(report(
                waypoint::converge_network(ctx.docker().await?, &waypoint_plan(&ctx)?).await?,
            ))
        })
        .after(&[DOCKER_TLS]),
    ]
}

/// The steps of a runner-only host after `docker-tls`.
fn runner_host_steps() -> Vec<Step<Ctx>> {
    let mut steps = images_and_network_steps();
    steps.extend([
        Step::new(SERVER_LINK, |ctx: Arc<Ctx>| async move {
            let Some(link) = &ctx.config.server else {
                return Err(StepError::msg("role: runner without a server section"));
            };
            use waypoint::link::LinkState;
            let state = match waypoint::link::converge(&waypoint_plan(&ctx)?, link).await {
                Ok(state) => state,
                // Each case's own message, as the step's detail (the Waypoint errors with
                // their causes).
                Err(waypoint::link::LinkError::Waypoint(e)) => return Err(e.into()),
                Err(e) => return Err(StepError::msg(e.to_string())),
            };
            Ok(match state {
                LinkState::Current(detail) => Outcome::Ok(detail),
                LinkState::Changed(detail) => Outcome::Changed(detail),
                LinkState::Unreachable(detail) => Outcome::Degraded(detail),
            })
        }),
        runners_step(&[SERVER_LINK, IMAGES, NETWORK, PKI]),
    ]);
    steps
}

/// The runners step, after `deps`.
fn runners_step(deps: &[&'static str]) -> Step<Ctx> {
    Step::new(WAYPOINT_RUNNERS, |ctx: Arc<Ctx>| async move {
        let plan = waypoint_plan(&ctx)?;
        let hostname = addresses::host_name(&ctx.config)?;
        Ok(report(
            waypoint::converge_runners(ctx.docker().await?, &plan, &hostname).await?,
        ))
    })
    .after(deps)
}

/// The database step: fails open without being marked `fail_open`, because only some of its
/// failures are the outside's: an unreachable or stalled server is `degraded` (the step waits
/// on something outside the host, and holds back nothing); any other failure (a wrong admin
/// password, a database owned by another role) is an `error`, because it needs a person.
fn database_step() -> Step<Ctx> {
    Step::new(DATABASE, |ctx: Arc<Ctx>| async move {
        let Some(settings) = &ctx.config.database else {
            return Err(StepError::msg("the configuration has no database section"));
        };
        let secret_path = database_password_path(&ctx.config);
        if let Some(dir) = secret_path.parent() {
            fsutil::ensure_dir(dir, fsutil::MODE_PRIVATE_DIR)?;
        }
        let target = format!("{}:{}", settings.host, settings.port);
        // Bounded even if the server accepts connections and then stalls between statements;
        // a stall is something outside the host, like an unreachable server: degraded.
        let provisioning =
            database::provision(settings, &secret_path, ctx.options.rotate_db_password);
        let Ok(result) = tokio::time::timeout(DATABASE_STEP_LIMIT, provisioning).await else {
            return Ok(Outcome::Degraded(format!(
                "database {target} did not finish provisioning within {} s",
                DATABASE_STEP_LIMIT.as_secs()
            )));
        };
        match result {
            Ok(p) => {
                let mut did = Vec::new();
                if p.role_created {
                    did.push(format!("created role {}", settings.app_role));
                }
                if p.database_created {
                    did.push(format!("created database {}", settings.app_database));
                }
                if p.password_set && !p.role_created {
                    did.push(format!("set the password of role {}", settings.app_role));
                }
                let login = format!(
                    "role {} logs in to database {} on {target}",
                    settings.app_role, settings.app_database
                );
                Ok(if p.changed || !did.is_empty() {
                    let mut detail = did.join(", ");
                    if detail.is_empty() {
                        detail = "updated the stored password".into();
                    }
                    Outcome::Changed(format!(
                        "{detail}; {login} (password in {})",
                        secret_path.display()
                    ))
                } else {
                    Outcome::Ok(login)
                })
            }
            Err(e) if e.is_transient() => {
                // The reason with its causes, minus the first line (which says the same).
                let cause = StepError::from(e).message().to_string();
                Ok(Outcome::Degraded(format!(
                    "database {target} unreachable: {}",
                    cause
                        .split_once(": ")
                        .map_or(cause.as_str(), |(_, rest)| rest)
                )))
            }
            Err(e) => Err(e.into()),
        }
    })
}

/// The Waypoint server's certificate: every name of the host that dockerd's has (its
/// addresses, names, the cloud's public address, loopback for the agent's own `waypoint`
/// commands in the container, the Pilot network's gateway), the server's name on the Pilot
/// network (how local runners dial it) and a fixed advertise address (how runner-only hosts
/// and the Pilot CLI dial it).
fn waypoint_leaf(w: &WaypointConfig, host_sans: &BTreeSet<San>) -> LeafSpec {
    let mut sans = host_sans.clone();
    sans.insert(San::Dns(crate::waypoint::SERVER_NAME.into()));
    if let Advertise::Fixed { host, .. } = &w.advertise {
        sans.insert(San::parse(host));
    }
    LeafSpec {
        name: pki::WAYPOINT.into(),
        profile: pki::Profile::Server,
        sans,
    }
}

/// The clone check, then the CA and certificates with the identity's names among the SANs,
/// then the new marker (see [`identity::marker`]).
fn pki_step(config: &Config, resolution: &Resolution) -> StepResult {
    let verdict = marker::check(&config.state_dir, resolution)?;
    let mut notes = Vec::new();
    match &verdict {
        marker::Verdict::Cloned { previous, current } => {
            tracing::warn!(%previous, %current, "state directory made by another instance: new CA, keys and certificates");
            marker::discard_pki(&config.pki_dir())?;
            notes.push(format!(
                "state made by instance {previous}, this is {current}: discarded its CA, keys \
                 and certificates"
            ));
        }
        marker::Verdict::Undecided { reason } => {
            notes.push(format!("clone check skipped: {reason}"))
        }
        marker::Verdict::First { .. } | marker::Verdict::Same => {}
    }
    let hostname = match &config.host.hostname {
        Some(h) => h.clone(),
        None => addresses::kernel_hostname()?,
    };
    let addrs = addresses::interface_addrs()?;
    let mut sans = addresses::server_sans(config, &hostname, &addrs);
    if let Some(w) = &config.waypoint {
        // Runners reach dockerd at the Pilot network's gateway. Its bridge is excluded from
        // the discovered addresses (it appears only after dockerd made it), so it is added
        // from the configuration: known before the network exists, stable across runs.
        sans.insert(San::Ip(w.network.gateway.into()));
    }
    // The cloud's addresses and names: a public IPv4 is on no interface (EC2 and GCE NAT
    // it), yet it is what the Pilot CLI connects to.
    sans.extend(resolution.identity.sans());
    let mut leaves = Vec::new();
    if let Some(w) = &config.waypoint
        && config.role == Role::Server
    {
        leaves.push(waypoint_leaf(w, &sans));
    }
    leaves.insert(0, LeafSpec::server(sans));
    leaves.extend(pki::CLIENTS.iter().map(|c| LeafSpec::client(c)));
    let report = pki::ensure(
        &PkiLayout::new(config.pki_dir()),
        &Policy::from(&config.pki),
        &leaves,
        time::OffsetDateTime::now_utc(),
    )?;
    let mut changed = report.files_changed;
    // Written after the new keys exist: a run killed before this point finds the old marker
    // and discards again.
    if let marker::Verdict::First { current } | marker::Verdict::Cloned { current, .. } = &verdict {
        changed |= marker::write(&config.state_dir, current)?;
    }
    let mut detail = report.summary();
    for note in notes {
        detail = format!("{note}; {detail}");
    }
    Ok(outcome(changed, detail))
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
        let steps = up_steps(&Config::default());
        let names: Vec<_> = steps.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            vec![IDENTITY, FIREWALL, PKI, DOCKER_CONFIG, DOCKER_TLS]
        );
        Engine::new("up", steps).unwrap();

        let full =
            Config::from_yaml("waypoint:\ndatabase:\n  host: db\n  admin_user: pilot\n").unwrap();
        let steps = up_steps(&full);
        let names: Vec<_> = steps.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            vec![
                IDENTITY,
                FIREWALL,
                PKI,
                DOCKER_CONFIG,
                DOCKER_TLS,
                IMAGES,
                NETWORK,
                WAYPOINT_SERVER,
                WAYPOINT_BOOTSTRAP,
                WAYPOINT_ADVERTISE,
                WAYPOINT_RUNNERS,
                DATABASE
            ]
        );
        Engine::new("up", steps).unwrap();

        // A runner-only host: no server, bootstrap, advertise or database; waypoint defaults.
        let yaml = format!(
            "role: runner\nserver:\n  endpoint: 10.0.0.5\n  ca_sha256: \"{}\"\n",
            "ab".repeat(32)
        );
        let runner = Config::from_yaml(&yaml).unwrap();
        assert_eq!(runner.server.as_ref().unwrap().endpoint.port, 8443);
        let steps = up_steps(&runner);
        let names: Vec<_> = steps.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            vec![
                IDENTITY,
                FIREWALL,
                PKI,
                DOCKER_CONFIG,
                DOCKER_TLS,
                IMAGES,
                NETWORK,
                SERVER_LINK,
                WAYPOINT_RUNNERS,
            ]
        );
        Engine::new("up", steps).unwrap();
    }

    /// The runners' path to dockerd: the gateway is a SAN of the server certificate, and
    /// the Pilot subnet (nothing wider) may reach the TLS port.
    #[tokio::test]
    async fn waypoint_adds_the_gateway_san_and_the_subnet_to_the_firewall() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::from_yaml(
            "waypoint:\n  network:\n    subnet: 172.31.5.0/24\nhost:\n  hostname: vm\n",
        )
        .unwrap();
        config.state_dir = dir.path().to_path_buf();
        let sources: Vec<String> = config
            .docker_api_allowed_sources()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sources, vec!["172.31.5.0/24"]);
        pki_step(&config, &identity::host_resolution(Some("vm"))).unwrap();
        let pem = std::fs::read_to_string(dir.path().join("pki/server/cert.pem")).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let has_gateway = sans.value.general_names.iter().any(|n| {
            matches!(n, x509_parser::extensions::GeneralName::IPAddress(ip) if *ip == [172, 31, 5, 1])
        });
        assert!(has_gateway, "{:?}", sans.value.general_names);
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
        // No metadata traffic from a unit test (and none is needed here).
        config.cloud.provider = crate::config::cloud::ProviderSetting::None;
        std::fs::create_dir_all(&config.state_dir).unwrap();
        let mut ctx = Ctx::new(config.clone(), UpOptions::default());
        ctx.nft = Nft::with_argv(vec!["/nonexistent/nft".into()]);
        let engine = Engine::new("up", up_steps(&config)).unwrap();
        let s = engine.run(Arc::new(ctx)).await.unwrap();
        let state = |n: &str| s.step(n).unwrap().state;
        use crate::status_file::StepState;
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
