//! The converge engine: named steps, each check-then-act, run in dependency order.
//!
//! A [`Step`] is a name, the steps it runs after, and an async function that checks the host
//! and acts only if needed, answering [`Outcome::Ok`] (nothing to do), [`Outcome::Changed`]
//! or [`Outcome::Degraded`]. The engine starts every step whose dependencies converged, runs
//! independent steps concurrently, and records each transition in the status file:
//!
//! - a step that fails hard is `error`; the steps that depend on it are `skipped`, the others
//!   go on;
//! - a step marked [`Step::fail_open`] waits on something outside the host (the database, a
//!   registry): its failure is `degraded`, never `error`, so one unreachable service does not
//!   fail the host; its dependents are `skipped` until it converges;
//! - a step may carry a timeout, so that `up` always ends.
//!
//! The engine is generic over the context `C` that steps share (the agent's is
//! [`crate::plan::Ctx`]); steps receive it as `Arc<C>` and may run on any tokio worker.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::status_file::{self, Condition, RunStatus, Status, StatusError, StepState};

/// What a step found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Already converged; nothing was changed. The detail says what was checked.
    Ok(String),
    /// Converged by changing something; the detail says what.
    Changed(String),
    /// Not converged because something outside the host is not there yet.
    Degraded(String),
}

/// Why a step failed: its error's message with all its causes, ready for the status file.
///
/// Any `std::error::Error` converts into it (`?` works in steps); build one from text with
/// [`StepError::msg`]. It does not implement `Error` itself, which is what makes the blanket
/// conversion possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError(String);

impl StepError {
    pub fn msg(message: impl Into<String>) -> Self {
        StepError(message.into())
    }

    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for StepError {
    fn from(e: E) -> Self {
        // "outer: inner: innermost", skipping causes the outer message already contains
        // (thiserror's `#[error(transparent)]` and `{source}` in a message both do that).
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        StepError(message)
    }
}

pub type StepResult = Result<Outcome, StepError>;

type StepFuture = Pin<Box<dyn Future<Output = StepResult> + Send>>;
type StepFn<C> = Arc<dyn Fn(Arc<C>) -> StepFuture + Send + Sync>;

/// How a step's failure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// An error: the host is not in the state it should be.
    Hard,
    /// Degraded: the step waits on something outside the host and is retried later.
    FailOpen,
}

/// One converge step.
pub struct Step<C> {
    name: &'static str,
    after: Vec<&'static str>,
    failure: Failure,
    timeout: Option<Duration>,
    run: StepFn<C>,
}

impl<C: Send + Sync + 'static> Step<C> {
    /// A step called `name` (kebab-case, shown in status) that runs `run`.
    pub fn new<F, Fut>(name: &'static str, run: F) -> Self
    where
        F: Fn(Arc<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StepResult> + Send + 'static,
    {
        Step {
            name,
            after: Vec::new(),
            failure: Failure::Hard,
            timeout: None,
            run: Arc::new(move |ctx| Box::pin(run(ctx))),
        }
    }

    /// Runs only after these steps converged (`ok` or `changed`).
    pub fn after(mut self, deps: &[&'static str]) -> Self {
        self.after.extend_from_slice(deps);
        self
    }

    /// Failures count as `degraded`, not `error` (see the module doc).
    pub fn fail_open(mut self) -> Self {
        self.failure = Failure::FailOpen;
        self
    }

    /// Gives up on the step after `limit` (an error, or degraded when failing open).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("two steps are called `{0}`")]
    DuplicateStep(&'static str),
    #[error("step `{step}` runs after `{dependency}`, which is not a step")]
    UnknownDependency {
        step: &'static str,
        dependency: &'static str,
    },
    #[error("steps depend on each other in a cycle: {}", .0.join(", "))]
    Cycle(Vec<&'static str>),
    #[error("cannot write the status file: {0}")]
    Status(#[from] StatusError),
}

/// A checked set of steps, ready to run.
pub struct Engine<C> {
    steps: Vec<Step<C>>,
    command: String,
    status_path: Option<PathBuf>,
    /// Carried into every status this engine writes (`pilot-agent run`).
    run: Option<status_file::RunInfo>,
    /// Copies facts of the context into the status before each write (the host's identity).
    annotate: Option<Annotate<C>>,
}

type Annotate<C> = Arc<dyn Fn(&C, &mut Status) + Send + Sync>;

impl<C: Send + Sync + 'static> Engine<C> {
    /// Checks that names are unique, dependencies exist and there is no cycle. Steps are
    /// listed in the status in the order given here.
    pub fn new(command: &str, steps: Vec<Step<C>>) -> Result<Self, EngineError> {
        let mut names = HashSet::new();
        for s in &steps {
            if !names.insert(s.name) {
                return Err(EngineError::DuplicateStep(s.name));
            }
        }
        for s in &steps {
            for d in &s.after {
                if !names.contains(d) {
                    return Err(EngineError::UnknownDependency {
                        step: s.name,
                        dependency: d,
                    });
                }
            }
        }
        // Kahn's algorithm: whatever cannot be ordered is on (or behind) a cycle.
        let mut done: HashSet<&'static str> = HashSet::new();
        loop {
            let ready: Vec<_> = steps
                .iter()
                .filter(|s| !done.contains(s.name) && s.after.iter().all(|d| done.contains(d)))
                .map(|s| s.name)
                .collect();
            if ready.is_empty() {
                break;
            }
            done.extend(ready);
        }
        if done.len() != steps.len() {
            let stuck = steps
                .iter()
                .map(|s| s.name)
                .filter(|n| !done.contains(n))
                .collect();
            return Err(EngineError::Cycle(stuck));
        }
        Ok(Engine {
            steps,
            command: command.to_string(),
            status_path: None,
            run: None,
            annotate: None,
        })
    }

    /// Records every transition in this file (atomically). Without it, status is only
    /// returned (as for `pilot-agent firewall`, which must not overwrite `up`'s status).
    pub fn with_status_file(mut self, path: PathBuf) -> Self {
        self.status_path = Some(path);
        self
    }

    /// Adds `run`'s counters to every status written (see [`status_file::RunInfo`]).
    pub fn with_run(mut self, run: status_file::RunInfo) -> Self {
        self.run = Some(run);
        self
    }

    /// Calls `f` on the status before every write after a step finished, so that facts the
    /// steps learn (the host's identity) appear in the status file.
    pub fn with_annotation(mut self, f: impl Fn(&C, &mut Status) + Send + Sync + 'static) -> Self {
        self.annotate = Some(Arc::new(f));
        self
    }

    pub fn step_names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|s| s.name).collect()
    }

    /// Runs every step once and returns the final status (also written to the status file).
    ///
    /// Fails only when the status file cannot be written: before any step runs (so nothing
    /// on the host changed) or at the end (after the steps ran, their outcome logged).
    pub async fn run(&self, ctx: Arc<C>) -> Result<Status, EngineError> {
        let mut status =
            Status::start(&self.command, self.steps.iter().map(|s| s.name.to_string()));
        status.run = self.run.clone().map(Box::new);
        self.save(&status)?;
        let mut write_failure: Option<StatusError> = None;

        let index: HashMap<&'static str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name, i))
            .collect();
        let mut tasks = Tasks::default();

        loop {
            // Settle what can be settled without running anything: skip the steps whose
            // dependencies finished without converging (repeat: skips cascade).
            self.skip_blocked(&mut status, &index);

            // Start every pending step whose dependencies all converged.
            if self.start_ready(&ctx, &mut status, &index, &mut tasks) {
                status.condition = status.compute_condition();
                self.save_or_remember(&status, &mut write_failure);
            }

            // Wait for the next step to finish; none running means everything is settled.
            let Some(joined) = tasks.set.join_next_with_id().await else {
                break;
            };
            let (i, result) = match joined {
                Ok((_, (i, result))) => (i, result),
                Err(e) => {
                    // A panicking step must not take the others (or the status) down.
                    let i = tasks.step_of.get(&e.id()).copied().unwrap_or(0);
                    (i, Err(StepError::msg(format!("step panicked: {e}"))))
                }
            };
            self.record(&ctx, &mut status, i, result);
            self.save_or_remember(&status, &mut write_failure);
        }

        status.status = RunStatus::Done;
        status.condition = status.compute_condition();
        status.finished_at = Some(status_file::now());
        self.save(&status)?;
        if let Some(e) = write_failure {
            // The final write worked, so the file is right; still say that it lagged.
            tracing::warn!("the status file could not be updated during the run: {e}");
        }
        Ok(status)
    }

    /// Marks skipped every pending step with a dependency that finished without converging,
    /// until no more change (a skip makes its dependents skip too).
    fn skip_blocked(&self, status: &mut Status, index: &HashMap<&'static str, usize>) {
        let mut progress = true;
        while progress {
            progress = false;
            for (i, step) in self.steps.iter().enumerate() {
                if status.steps[i].state != StepState::Pending {
                    continue;
                }
                let blocker = step.after.iter().find_map(|d| {
                    let dep = &status.steps[index[d]];
                    (dep.state.is_finished() && !dep.state.is_converged()).then_some((d, dep.state))
                });
                if let Some((dep, dep_state)) = blocker {
                    let detail = match dep_state {
                        StepState::Degraded => format!("waiting on `{dep}` (degraded)"),
                        StepState::Skipped => format!("`{dep}` was skipped"),
                        _ => format!("`{dep}` failed"),
                    };
                    tracing::warn!(step = step.name, "skipped: {detail}");
                    let s = &mut status.steps[i];
                    s.state = StepState::Skipped;
                    s.detail = detail;
                    s.finished_at = Some(status_file::now());
                    progress = true;
                }
            }
        }
    }

    /// Starts every pending step whose dependencies all converged; whether any started.
    fn start_ready(
        &self,
        ctx: &Arc<C>,
        status: &mut Status,
        index: &HashMap<&'static str, usize>,
        tasks: &mut Tasks,
    ) -> bool {
        let mut started = false;
        for (i, step) in self.steps.iter().enumerate() {
            if status.steps[i].state != StepState::Pending {
                continue;
            }
            if !step
                .after
                .iter()
                .all(|d| status.steps[index[d]].state.is_converged())
            {
                continue;
            }
            tracing::info!(step = step.name, "step started");
            let s = &mut status.steps[i];
            s.state = StepState::Running;
            s.started_at = Some(status_file::now());
            let fut = (step.run)(ctx.clone());
            let timeout = step.timeout;
            let handle = tasks.set.spawn(async move {
                let result = match timeout {
                    None => fut.await,
                    Some(limit) => match tokio::time::timeout(limit, fut).await {
                        Ok(r) => r,
                        Err(_) => Err(StepError::msg(format!(
                            "did not finish within {}s",
                            limit.as_secs_f64()
                        ))),
                    },
                };
                (i, result)
            });
            tasks.step_of.insert(handle.id(), i);
            started = true;
        }
        started
    }

    /// Records how step `i` ended (its state, detail and finish time) and the condition.
    fn record(&self, ctx: &Arc<C>, status: &mut Status, i: usize, result: StepResult) {
        let step = &self.steps[i];
        let (state, detail) = match result {
            Ok(Outcome::Ok(d)) => (StepState::Ok, d),
            Ok(Outcome::Changed(d)) => (StepState::Changed, d),
            Ok(Outcome::Degraded(d)) => (StepState::Degraded, d),
            Err(e) => match step.failure {
                Failure::Hard => (StepState::Error, e.0),
                Failure::FailOpen => (StepState::Degraded, e.0),
            },
        };
        match state {
            StepState::Error => tracing::error!(step = step.name, "step failed: {detail}"),
            StepState::Degraded => tracing::warn!(step = step.name, "step degraded: {detail}"),
            _ => tracing::info!(step = step.name, state = ?state, "{detail}"),
        }
        let s = &mut status.steps[i];
        s.state = state;
        s.detail = detail;
        s.finished_at = Some(status_file::now());
        status.condition = status.compute_condition();
        if let Some(annotate) = &self.annotate {
            annotate(ctx, status);
        }
    }

    fn save(&self, status: &Status) -> Result<(), EngineError> {
        if let Some(path) = &self.status_path {
            status.write(path)?;
        }
        Ok(())
    }

    /// Intermediate writes: a failure is remembered, not fatal (the steps are doing their
    /// work; the final write decides).
    fn save_or_remember(&self, status: &Status, failure: &mut Option<StatusError>) {
        if let Some(path) = &self.status_path {
            if let Err(e) = status.write(path) {
                failure.get_or_insert(e);
            }
        }
    }
}

/// The exit code of a finished run (see [`Condition::exit_code`]).
pub fn exit_code(status: &Status) -> u8 {
    match status.status {
        RunStatus::Done => status.condition.exit_code(),
        // Not finished (cannot happen after `run`): not healthy either.
        _ => Condition::Error.exit_code(),
    }
}

/// The running steps: their tasks, and which step each task runs (to name a panicked one).
#[derive(Default)]
struct Tasks {
    set: JoinSet<(usize, StepResult)>,
    step_of: HashMap<tokio::task::Id, usize>,
}
