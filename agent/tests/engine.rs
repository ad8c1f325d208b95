//! The step engine: dependency order, concurrency, fail-open steps, timeouts and panics,
//! rejected step graphs, and the status file written while it runs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pilot_agent::engine::{Engine, EngineError, Outcome, Step, StepError, exit_code};
use pilot_agent::status_file::{Condition, RunStatus, Status, StepState};

/// What the test steps share: a log of the order in which they ran.
#[derive(Default)]
struct Log(Mutex<Vec<&'static str>>);

impl Log {
    fn push(&self, name: &'static str) {
        self.0.lock().unwrap().push(name);
    }
    fn order(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().clone()
    }
}

fn ok(name: &'static str) -> Step<Log> {
    Step::new(name, move |log: Arc<Log>| async move {
        log.push(name);
        Ok(Outcome::Ok(format!("{name} fine")))
    })
}

fn failing(name: &'static str) -> Step<Log> {
    Step::new(name, move |log: Arc<Log>| async move {
        log.push(name);
        Err(StepError::msg(format!("{name} broke")))
    })
}

fn states(s: &Status) -> Vec<(&str, StepState)> {
    s.steps.iter().map(|x| (x.name.as_str(), x.state)).collect()
}

#[tokio::test]
async fn dependencies_run_first() {
    let engine = Engine::new(
        "up",
        vec![ok("c").after(&["b"]), ok("b").after(&["a"]), ok("a")],
    )
    .unwrap();
    let log = Arc::new(Log::default());
    let s = engine.run(log.clone()).await.unwrap();
    assert_eq!(log.order(), vec!["a", "b", "c"]);
    assert_eq!(s.status, RunStatus::Done);
    assert_eq!(s.condition, Condition::Healthy);
    assert_eq!(exit_code(&s), 0);
    // Listed in the order given, each with times.
    assert_eq!(
        states(&s),
        vec![
            ("c", StepState::Ok),
            ("b", StepState::Ok),
            ("a", StepState::Ok)
        ]
    );
    for step in &s.steps {
        assert!(step.started_at.unwrap() <= step.finished_at.unwrap());
        assert_eq!(step.detail, format!("{} fine", step.name));
    }
    assert!(s.finished_at.is_some());
}

#[tokio::test]
async fn independent_steps_run_concurrently() {
    // Each waits for the other: only concurrent execution finishes.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let step = |name: &'static str, b: Arc<tokio::sync::Barrier>| {
        Step::new(name, move |_: Arc<()>| {
            let b = b.clone();
            async move {
                b.wait().await;
                Ok(Outcome::Changed("met".into()))
            }
        })
        .timeout(Duration::from_secs(5))
    };
    let engine = Engine::new(
        "up",
        vec![step("x", barrier.clone()), step("y", barrier.clone())],
    )
    .unwrap();
    let s = engine.run(Arc::new(())).await.unwrap();
    assert_eq!(
        states(&s),
        vec![("x", StepState::Changed), ("y", StepState::Changed)]
    );
}

#[tokio::test]
async fn hard_error_skips_dependents_only() {
    let engine = Engine::new(
        "up",
        vec![
            ok("firewall"),
            failing("pki"),
            ok("docker-config").after(&["pki", "firewall"]),
            ok("docker-tls").after(&["docker-config"]),
            ok("unrelated").after(&["firewall"]),
        ],
    )
    .unwrap();
    let log = Arc::new(Log::default());
    let s = engine.run(log.clone()).await.unwrap();
    assert_eq!(
        states(&s),
        vec![
            ("firewall", StepState::Ok),
            ("pki", StepState::Error),
            ("docker-config", StepState::Skipped),
            ("docker-tls", StepState::Skipped),
            ("unrelated", StepState::Ok),
        ]
    );
    assert!(!log.order().contains(&"docker-config"));
    assert_eq!(s.step("pki").unwrap().detail, "pki broke");
    assert_eq!(s.step("docker-config").unwrap().detail, "`pki` failed");
    assert_eq!(
        s.step("docker-tls").unwrap().detail,
        "`docker-config` was skipped"
    );
    assert!(s.step("docker-tls").unwrap().started_at.is_none());
    assert_eq!(s.condition, Condition::Error);
    assert_eq!(exit_code(&s), 1);
}

#[tokio::test]
async fn fail_open_step_degrades_without_blocking_others() {
    let engine = Engine::new(
        "up",
        vec![
            failing("database").fail_open(),
            ok("database-grants").after(&["database"]),
            ok("waypoint-server"),
            ok("runners").after(&["waypoint-server"]),
        ],
    )
    .unwrap();
    let log = Arc::new(Log::default());
    let s = engine.run(log.clone()).await.unwrap();
    assert_eq!(
        states(&s),
        vec![
            ("database", StepState::Degraded),
            ("database-grants", StepState::Skipped),
            ("waypoint-server", StepState::Ok),
            ("runners", StepState::Ok),
        ]
    );
    assert_eq!(
        s.step("database-grants").unwrap().detail,
        "waiting on `database` (degraded)"
    );
    assert_eq!(s.condition, Condition::Degraded);
    assert_eq!(exit_code(&s), 2);
}

#[tokio::test]
async fn a_step_may_report_degraded_itself() {
    let engine = Engine::new(
        "up",
        vec![Step::new("db", |_: Arc<()>| async {
            Ok(Outcome::Degraded("database unreachable".into()))
        })],
    )
    .unwrap();
    let s = engine.run(Arc::new(())).await.unwrap();
    assert_eq!(s.condition, Condition::Degraded);
}

#[tokio::test]
async fn error_outranks_degraded() {
    let engine = Engine::new("up", vec![failing("a").fail_open(), failing("b")]).unwrap();
    let s = engine.run(Arc::new(Log::default())).await.unwrap();
    assert_eq!(s.condition, Condition::Error);
}

#[tokio::test]
async fn timeout_and_panic_become_step_errors() {
    let engine = Engine::new(
        "up",
        vec![
            Step::new("slow", |_: Arc<()>| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(Outcome::Ok(String::new()))
            })
            .timeout(Duration::from_millis(50)),
            Step::new("boom", |_: Arc<()>| async {
                if std::hint::black_box(true) {
                    panic!("kaboom");
                }
                Ok(Outcome::Ok(String::new()))
            }),
            Step::new("fine", |_: Arc<()>| async {
                Ok(Outcome::Ok(String::new()))
            }),
        ],
    )
    .unwrap();
    let s = engine.run(Arc::new(())).await.unwrap();
    assert_eq!(s.step("slow").unwrap().state, StepState::Error);
    assert!(s.step("slow").unwrap().detail.contains("within 0.05s"));
    assert_eq!(s.step("boom").unwrap().state, StepState::Error);
    assert!(s.step("boom").unwrap().detail.contains("panicked"));
    assert_eq!(s.step("fine").unwrap().state, StepState::Ok);
}

#[test]
fn bad_step_graphs_are_rejected() {
    let e = Engine::<Log>::new("up", vec![ok("a"), ok("a")])
        .err()
        .unwrap();
    assert!(matches!(e, EngineError::DuplicateStep("a")));
    let e = Engine::<Log>::new("up", vec![ok("a").after(&["nope"])])
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "step `a` runs after `nope`, which is not a step"
    );
    let e = Engine::<Log>::new(
        "up",
        vec![
            ok("a").after(&["c"]),
            ok("b").after(&["a"]),
            ok("c").after(&["b"]),
            ok("d"),
        ],
    )
    .err()
    .unwrap();
    assert_eq!(
        e.to_string(),
        "steps depend on each other in a cycle: a, b, c"
    );
}

#[tokio::test]
async fn status_file_shows_progress_and_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("status.json");
    let seen = Arc::new(Mutex::new(None));
    let (p, seen2) = (path.clone(), seen.clone());
    let engine = Engine::new(
        "up",
        vec![
            ok("first"),
            Step::new("second", move |_: Arc<Log>| {
                let (p, seen) = (p.clone(), seen2.clone());
                async move {
                    // While this step runs, the file says so.
                    *seen.lock().unwrap() = Status::read(&p).unwrap();
                    Ok(Outcome::Changed("did it".into()))
                }
            })
            .after(&["first"]),
        ],
    )
    .unwrap()
    .with_status_file(path.clone());
    let s = engine.run(Arc::new(Log::default())).await.unwrap();
    let during = seen.lock().unwrap().clone().unwrap();
    assert_eq!(during.status, RunStatus::Running);
    assert_eq!(during.step("first").unwrap().state, StepState::Ok);
    assert_eq!(during.step("second").unwrap().state, StepState::Running);
    let on_disk = Status::read(&path).unwrap().unwrap();
    assert_eq!(on_disk, s);
    assert_eq!(on_disk.status, RunStatus::Done);
}

#[tokio::test]
async fn unwritable_status_file_fails_before_any_step() {
    let log = Arc::new(Log::default());
    let engine = Engine::new("up", vec![ok("a")])
        .unwrap()
        .with_status_file(PathBuf::from("/nonexistent-dir/status.json"));
    assert!(engine.run(log.clone()).await.is_err());
    assert!(log.order().is_empty(), "no step may run");
}

#[test]
fn step_error_keeps_the_cause_chain() {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot restart dockerd")]
    struct Outer(#[source] std::io::Error);
    let e = StepError::from(Outer(std::io::Error::other("permission denied")));
    assert_eq!(e.message(), "cannot restart dockerd: permission denied");
}
