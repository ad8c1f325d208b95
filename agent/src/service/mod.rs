//! `pilot-agent run`: converge, serve the HTTPS endpoint, and keep converging until told to
//! stop.
//!
//! The run loop owns everything; nothing else starts a pass, so two passes never overlap:
//!
//! ```text
//!  signals (SIGTERM/SIGINT) ─┐
//!  docker_events (watcher) ──┤      ┌─> pass task: Engine::run over plan::up_steps, status.json
//!  schedule (timers) ────────┼─> loop ┤
//!  pass finished ────────────┘      └─> endpoint start / reload_tls, sd_notify, telemetry
//!  watchdog task <── Health (the loop's pulse)
//! ```
//!
//! Beside the loop, after the first pass, [`firewall::watch`] follows `nft monitor` and puts
//! the firewall table back within tens of milliseconds of an outside change (a `flush ruleset`, a
//! rule edited in place), without waiting for a pass.
//!
//! A pass is `up`'s converge with a fresh [`Ctx`] (so a Docker client made before a dockerd
//! restart is never reused), under the same state lock as `up` (taken per pass, so that an
//! operator's `pilot-agent up --rotate-db-password` can run between passes). Why passes happen
//! is [`schedule`]'s business. The endpoint starts after the first pass whose pki step
//! converged (it serves the server certificate that step makes) and re-reads its certificate
//! after every pass that changed it.
//!
//! Shutdown (the `shutdown` future resolves): no new pass; a pass under way may finish for
//! [`ShutdownOptions::pass_grace`], then it is aborted (the engine writes files atomically and
//! every step is idempotent, so the next start finishes its work); the endpoint stops; the
//! status of the last finished pass is written with `run.stopped_at`.

pub mod docker_events;
pub mod notify;
pub mod schedule;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{Config, Deregister};
use crate::endpoint::{Endpoint, Telemetry};
use crate::engine::{Engine, EngineError};
use crate::firewall::{self, FirewallSpec, Nft};
use crate::fsutil::{self, FsError, MODE_PRIVATE_DIR};
use crate::history_file::{self, PassClock};
use crate::plan::{self, Ctx, UpOptions};
use crate::status_file::{self, Condition, RunInfo, RunStatus, Status, StatusError, StepState};
use crate::waypoint;

use docker_events::Signal;
use notify::Health;
use schedule::{Schedule, Trigger};

/// How long a pass under way at shutdown may go on before it is aborted. Below systemd's
/// `TimeoutStopSec=30` in the unit, leaving time for the endpoint and the status.
pub const PASS_GRACE: Duration = Duration::from_secs(20);

/// How often the loop turns at least without a watchdog (its pulse for [`Health`]).
const DEFAULT_BEAT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Status(#[from] StatusError),
}

/// Why a pass could not run.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("another pilot-agent is converging this host (it holds {0})")]
    Locked(std::path::PathBuf),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the pass failed: {0}")]
    Task(String),
}

/// Tunables of shutdown (tests shorten them).
#[derive(Debug, Clone)]
pub struct ShutdownOptions {
    pub pass_grace: Duration,
}

impl Default for ShutdownOptions {
    fn default() -> Self {
        ShutdownOptions {
            pass_grace: PASS_GRACE,
        }
    }
}

/// What `run` did, returned when it stopped.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run: RunInfo,
    /// The signal (or reason) that stopped it.
    pub stopped_by: String,
    /// A pass was under way at shutdown and was aborted after the grace period.
    pub aborted_pass: bool,
}

struct RunningPass {
    handle: JoinHandle<Result<Status, PassError>>,
    trigger: Trigger,
    started: Instant,
}

/// Runs the service until `shutdown` resolves (with the name of what stopped it).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = String>,
    options: ShutdownOptions,
) -> Result<RunSummary, ServiceError> {
    fsutil::ensure_dir(&config.state_dir, MODE_PRIVATE_DIR)?;
    let config = Arc::new(config);
    let telemetry = Arc::new(Telemetry::default());
    let watchdog = notify::watchdog_period();
    // The loop turns at least twice per watchdog period, so one late turn is not a failure.
    let beat = watchdog
        .map(|p| p / 2)
        .unwrap_or(DEFAULT_BEAT)
        .max(Duration::from_millis(50));
    let health = Arc::new(Health::new(beat));
    health.beat(Instant::now());
    let watchdog_task = watchdog.map(|period| {
        tracing::info!(
            "systemd watchdog enabled: pinging every {} ms",
            period.as_millis()
        );
        tokio::spawn(notify::watchdog(health.clone(), period))
    });

    let mut service = Service {
        config: config.clone(),
        telemetry: telemetry.clone(),
        schedule: Schedule::new(&config.service, Instant::now()),
        run: RunInfo::new(),
        last_status: None,
        endpoint: None,
        ready: false,
    };
    let (stopped_by, pass, watcher) = service.serve(&health, beat, shutdown).await;
    let aborted_pass = service
        .stop(&stopped_by, &health, pass, watcher, &options)
        .await;
    service.write_final(aborted_pass)?;
    if let Some(w) = watchdog_task {
        w.abort();
    }
    Ok(RunSummary {
        run: service.run,
        stopped_by,
        aborted_pass,
    })
}

/// The run loop's state outside the loop's own variables.
struct Service {
    config: Arc<Config>,
    telemetry: Arc<Telemetry>,
    schedule: Schedule,
    run: RunInfo,
    /// The status of the last finished pass.
    last_status: Option<Status>,
    endpoint: Option<Endpoint>,
    /// READY=1 was sent.
    ready: bool,
}

impl Service {
    /// The loop: passes on their schedule and on Docker events, until `shutdown` resolves.
    /// Returns why it stopped, the pass still under way and the Docker event watcher.
    async fn serve(
        &mut self,
        health: &Health,
        beat: Duration,
        shutdown: impl Future<Output = String>,
    ) -> (String, Option<RunningPass>, Option<JoinHandle<()>>) {
        let config = self.config.clone();
        let telemetry = self.telemetry.clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<Signal>();
        let mut watcher: Option<JoinHandle<()>> = None;
        let mut firewall_watcher: Option<JoinHandle<()>> = None;
        let mut tx = Some(tx);
        let mut pass: Option<RunningPass> = None;
        let mut heartbeat = tokio::time::interval(beat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        notify::status_line("first pass: converging");

        tokio::pin!(shutdown);
        let stopped_by = loop {
            let now = Instant::now();
            health.beat(now);
            if pass.is_none() {
                if let Some(trigger) = self.schedule.take(now) {
                    pass = Some(self.start_pass(trigger, now, health));
                }
            }
            let (due, _) = self.schedule.next();
            let idle = pass.is_none();
            let pass_done = async {
                match pass.as_mut() {
                    Some(p) => (&mut p.handle).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                why = &mut shutdown => break why,
                joined = pass_done => {
                    // `pass` is Some: only then does `pass_done` resolve.
                    let Some(done) = pass.take() else { continue };
                    health.pass_ended();
                    let result = joined.unwrap_or_else(|e| Err(PassError::Task(e.to_string())));
                    self.pass_finished(done, result).await;
                    if watcher.is_none() {
                        // After the first pass (which may restart dockerd and has applied
                        // the table), never before.
                        if let Some(tx) = tx.take() {
                            watcher = Some(tokio::spawn(docker_events::watch(
                                config.docker.socket.clone(),
                                tx,
                                telemetry.clone(),
                            )));
                            firewall_watcher = Some(self.watch_firewall());
                        }
                    }
                }
                Some(signal) = rx.recv() => {
                    let now = Instant::now();
                    match signal {
                        Signal::Event(what) => self.schedule.docker_event(now, what),
                        Signal::Reconnected => self.schedule.docker_reconnected(now),
                    }
                }
                _ = tokio::time::sleep_until(due.into()), if idle => {}
                _ = heartbeat.tick() => {}
            }
        };
        if let Some(w) = firewall_watcher {
            w.abort();
        }
        (stopped_by, pass, watcher)
    }

    /// Puts the firewall table back whenever the ruleset changes ([`firewall::watch`]).
    fn watch_firewall(&self) -> JoinHandle<()> {
        let telemetry = self.telemetry.clone();
        let config = self.config.clone();
        tokio::spawn(firewall::watch::watch(
            move || FirewallSpec::current(&config),
            Nft::default(),
            self.config.state().firewall_listing(),
            move |_| telemetry.record_firewall_restore(),
        ))
    }

    /// Stops: the watcher, the pass under way (given `options.pass_grace` to finish), the
    /// endpoint. Whether the pass had to be aborted.
    async fn stop(
        &mut self,
        stopped_by: &str,
        health: &Health,
        mut pass: Option<RunningPass>,
        mut watcher: Option<JoinHandle<()>>,
        options: &ShutdownOptions,
    ) -> bool {
        tracing::info!("{stopped_by}: stopping");
        health.stopping();
        notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        if let Some(w) = watcher.take() {
            w.abort();
        }
        let mut aborted_pass = false;
        if let Some(mut p) = pass.take() {
            tracing::info!(
                "letting the pass under way ({}) finish, at most {} s",
                p.trigger,
                options.pass_grace.as_secs()
            );
            match tokio::time::timeout(options.pass_grace, &mut p.handle).await {
                Ok(joined) => {
                    health.pass_ended();
                    let result = joined.unwrap_or_else(|e| Err(PassError::Task(e.to_string())));
                    self.pass_finished(p, result).await;
                }
                Err(_) => {
                    tracing::warn!("the pass did not finish in time; aborting it");
                    p.handle.abort();
                    // Wait for the abort to land, so nothing writes the status after us.
                    let _ = p.handle.await;
                    aborted_pass = true;
                }
            }
        }
        self.deregister_runners().await;
        if let Some(endpoint) = self.endpoint.take() {
            endpoint.shutdown().await;
        }
        aborted_pass
    }

    /// A runner-only host whose `server.deregister` says so, stopping, removes its runners and
    /// has the server VM forget them ([`waypoint::link::deregister`]): how a host of an
    /// autoscaling group leaves nothing behind on the server when it is terminated. Failures
    /// are logged; they do not hold the stop.
    async fn deregister_runners(&self) {
        let Some(link) = self.config.server.as_ref() else {
            return;
        };
        if self.config.role != crate::config::Role::Runner {
            return;
        }
        let now = match link.deregister {
            Deregister::Never => false,
            Deregister::Stop => true,
            Deregister::Shutdown => system_shutting_down().await,
        };
        if !now {
            return;
        }
        let Some(plan) = waypoint::WaypointPlan::from_config(&self.config) else {
            return;
        };
        let prefix = match crate::addresses::host_name(&self.config) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot deregister the runners: no host name");
                return;
            }
        };
        let done = match waypoint::connect(&plan.socket).await {
            Ok(docker) => waypoint::link::deregister(&docker, &plan, &prefix).await,
            Err(e) => Err(e.into()),
        };
        match done {
            Ok(d) => tracing::info!(
                forgotten = ?d.forgotten,
                failed = ?d.failed,
                "removed this host's runners and had the server VM forget them"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot deregister this host's runners"),
        }
    }

    fn start_pass(&mut self, trigger: Trigger, now: Instant, health: &Health) -> RunningPass {
        self.run.last_trigger = trigger.to_string();
        let number = self.run.passes + 1;
        tracing::info!("pass {number} started ({trigger})");
        if self.ready {
            notify::status_line(&format!("pass {number}: converging ({trigger})"));
        }
        health.pass_started(now);
        let handle = tokio::spawn(converge(self.config.clone(), self.run.clone()));
        RunningPass {
            handle,
            trigger,
            started: now,
        }
    }

    async fn pass_finished(&mut self, pass: RunningPass, result: Result<Status, PassError>) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(pass.started);
        let mut status = match result {
            Ok(status) => status,
            Err(e) => {
                tracing::warn!(
                    "pass ({}) could not run: {e}; trying again in {} s",
                    pass.trigger,
                    schedule::RETRY_SOON.as_secs()
                );
                self.schedule.pass_not_run(now, &pass.trigger);
                if !self.ready {
                    notify::status_line(&format!("first pass could not run: {e}"));
                }
                return;
            }
        };
        let changed = status
            .steps
            .iter()
            .filter(|s| s.state == StepState::Changed)
            .count();
        let degraded: Vec<&str> = status
            .steps
            .iter()
            .filter(|s| s.state == StepState::Degraded)
            .map(|s| s.name.as_str())
            .collect();
        let degraded = (!degraded.is_empty()).then(|| degraded.join(", "));
        let first = self.run.passes == 0;
        self.run.passes += 1;
        // The one definition of a repair (status.json and /metrics both take it from here).
        let repair = !first && changed > 0;
        if repair {
            self.run.repairs += 1;
            self.run.last_repair_at = Some(status_file::now());
        }
        self.run.last_pass_condition = Some(status.condition);
        self.run.last_pass_finished_at = status.finished_at;
        status.run = Some(Box::new(self.run.clone()));
        // The engine wrote this pass's status with the counters of the pass before; this
        // write adds the pass itself (a failed write is retried by the next pass).
        if let Err(e) = status.write(&self.config.status_path()) {
            tracing::warn!("cannot record the pass in the status file: {e}");
        }
        self.telemetry
            .record_pass(&pass.trigger.to_string(), elapsed, changed, repair);
        self.schedule.pass_finished(now, degraded);
        tracing::info!(
            condition = ?status.condition,
            changed,
            "pass {} finished in {} ms ({})",
            self.run.passes,
            elapsed.as_millis(),
            pass.trigger
        );

        self.after_pki(&status).await;
        let line = self.status_line(&status, now);
        if !self.ready {
            // Ready once the host was converged as far as it goes and the endpoint (if any,
            // and if it could) started: a dependent unit may now use both.
            self.ready = true;
            notify::notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
        } else {
            notify::status_line(&line);
        }
        self.last_status = Some(status);
    }

    /// Starts the endpoint once the pki step converged, and makes it re-read its
    /// certificate when the pki step changed it.
    async fn after_pki(&mut self, status: &Status) {
        if self.config.endpoint.is_none() {
            return;
        }
        let pki = status.step(plan::PKI).map(|s| s.state);
        match (&self.endpoint, pki) {
            (None, Some(state)) if state.is_converged() => {
                match Endpoint::start(self.config.clone(), self.telemetry.clone()).await {
                    Ok(endpoint) => {
                        tracing::info!("endpoint listening on https://{}", endpoint.local_addr());
                        self.endpoint = Some(endpoint);
                    }
                    Err(e) => {
                        tracing::error!(
                            "cannot start the endpoint (retried after the next pass): {e}"
                        )
                    }
                }
            }
            (None, _) => {
                tracing::warn!("the endpoint waits for the pki step to converge");
            }
            (Some(endpoint), Some(StepState::Changed)) => match endpoint.reload_tls() {
                Ok(()) => tracing::info!("endpoint certificate reloaded"),
                Err(e) => tracing::error!("cannot reload the endpoint certificate: {e}"),
            },
            (Some(_), _) => {}
        }
    }

    fn status_line(&self, status: &Status, now: Instant) -> String {
        let word = match status.condition {
            Condition::Healthy => "healthy",
            Condition::Degraded => "degraded",
            Condition::Error => "error",
        };
        let mut line = format!(
            "{word} after pass {} ({}); {} repairs",
            self.run.passes, self.run.last_trigger, self.run.repairs
        );
        if let Some(bad) = status
            .steps
            .iter()
            .find(|s| matches!(s.state, StepState::Error | StepState::Degraded))
        {
            line.push_str(&format!(
                "; {} {}",
                bad.name,
                serde_json::to_value(bad.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ));
        }
        if let Some(retry) = self.schedule.degraded_retry_in(now) {
            line.push_str(&format!("; retry in {} s", retry.as_secs()));
        }
        if self.config.endpoint.is_some() && self.endpoint.is_none() {
            line.push_str("; endpoint not serving");
        }
        line
    }

    /// The status at exit: the last finished pass's with `run.stopped_at`. When no pass
    /// finished, the file as the engine left it gets `run.stopped_at` (its `running` and dead
    /// pid then say, correctly, that the run did not finish).
    fn write_final(&mut self, aborted_pass: bool) -> Result<(), ServiceError> {
        let path = self.config.status_path();
        self.run.stopped_at = Some(status_file::now());
        let base = match self.last_status.take() {
            Some(s) => Some(s),
            None => Status::read(&path)?,
        };
        let Some(mut status) = base else {
            return Ok(());
        };
        if aborted_pass && status.status == RunStatus::Done {
            tracing::info!("the status file shows the last finished pass");
        }
        status.run = Some(Box::new(self.run.clone()));
        status.write(&path)?;
        Ok(())
    }
}

/// One pass: `up`'s steps under the state lock, status written as they go, the finished pass
/// recorded in the history with its trigger.
async fn converge(config: Arc<Config>, run: RunInfo) -> Result<Status, PassError> {
    let lock_path = config.state().lock();
    let Some(_lock) = fsutil::try_lock(&lock_path)? else {
        return Err(PassError::Locked(lock_path));
    };
    let trigger = run.last_trigger.clone();
    let engine = Engine::new("run", plan::up_steps(&config))?
        .with_status_file(config.status_path())
        .with_run(run)
        .with_annotation(plan::annotate_status);
    let ctx = Ctx::new((*config).clone(), UpOptions::default());
    let clock = PassClock::start();
    let status = engine.run(Arc::new(ctx)).await?;
    // Under the lock, as `up` does; a pass aborted at shutdown never gets here (no record).
    history_file::record(&config.state().history(), &status, Some(&trigger), &clock);
    Ok(status)
}

/// Whether the machine is shutting down: `systemctl is-system-running` answers `stopping`
/// once systemd has begun to stop everything (a power-off, a reboot, an instance being
/// terminated), and something else for a service merely restarted. No systemd: not.
async fn system_shutting_down() -> bool {
    let asked = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::process::Command::new("systemctl")
            .arg("is-system-running")
            .output(),
    )
    .await;
    matches!(asked, Ok(Ok(out)) if String::from_utf8_lossy(&out.stdout).trim() == "stopping")
}
