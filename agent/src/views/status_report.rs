//! `pilot-agent status [--json] [--long] [--wait [--timeout SECS]]`: what the agent did and
//! whether the host is healthy, read from `STATE_DIR/status.json` (written by `up`/`run`).
//!
//! Exit codes follow `cloud-init status`: 0 done and healthy, 1 error, 2 degraded. Two cases
//! the file alone does not tell, and which this command judges:
//! - no status file: the agent never ran here (`not-started`, exit 1: nothing converged);
//! - `running` but the recorded pid is gone: the agent was killed mid-run (condition `error`,
//!   exit 1), so `--wait` does not wait for a run that will never finish;
//! - `running` written by a live `pilot-agent run` that already finished a pass: it is
//!   re-checking a converged host, so this is reported as `done` with the last pass's condition
//!   ([`Status::between_passes`]), not as a host still converging.
//!
//! It needs no valid configuration to be useful (an operator debugging a broken host runs it
//! first): without one it reads the default state directory and says so. It never prints a
//! secret: the status file holds none, and the extras of `--long` are public files (certificates)
//! and host figures.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{Config, ConfigError, DEFAULT_STATE_DIR, DockerConfig};
use crate::pki::{self, PkiLayout};
use crate::status_file::{Condition, RunStatus, SCHEMA, Status, StatusError};

/// Docker's data root when daemon.json does not set `data-root`.
pub const DEFAULT_DOCKER_DATA_ROOT: &str = "/var/lib/docker";

/// Where the status (and the `--long` extras) are read from.
#[derive(Debug, Clone)]
pub struct Target {
    pub state_dir: PathBuf,
    /// dockerd's daemon.json (for `data-root`).
    pub daemon_config: PathBuf,
    /// Set when the configuration could not be loaded and defaults are used instead: the
    /// host is then in error whatever the status file says (the agent cannot run).
    pub warning: Option<String>,
}

impl Target {
    /// Loads the configuration at `config_path`. When it cannot be loaded and the path was not
    /// chosen explicitly (`--config`, `PILOT_AGENT_CONFIG`), falls back to the defaults with a
    /// warning: status must work on a host whose configuration is broken or gone. An explicit
    /// path that fails is an error: the operator asked about that configuration's host.
    pub fn resolve(config_path: &Path, explicit: bool) -> Result<Target, ConfigError> {
        match Config::load(config_path) {
            Ok(config) => Ok(Target::from_config(&config)),
            Err(e) if explicit => Err(e),
            Err(e) => {
                let why = match &e {
                    ConfigError::Read { .. } => e.to_string(),
                    ConfigError::Invalid { diagnostics, .. } => format!(
                        "configuration {} has {} problem(s) (see `pilot-agent config \
                         validate`), the first {}:{}; the boot firewall unit applies the \
                         fail-closed table",
                        config_path.display(),
                        diagnostics.len(),
                        config_path.display(),
                        diagnostics
                            .first()
                            .map(|d| d.to_string())
                            .unwrap_or_default()
                    ),
                };
                Ok(Target {
                    state_dir: PathBuf::from(DEFAULT_STATE_DIR),
                    daemon_config: DockerConfig::default().daemon_config,
                    warning: Some(format!(
                        "warning: {why}; reading the default state directory {DEFAULT_STATE_DIR}"
                    )),
                })
            }
        }
    }

    pub fn from_config(config: &Config) -> Target {
        Target {
            state_dir: config.state_dir.clone(),
            daemon_config: config.docker.daemon_config.clone(),
            warning: None,
        }
    }

    pub fn status_path(&self) -> PathBuf {
        self.state_dir.join("status.json")
    }

    /// The pass history (`status --history`).
    pub fn history_path(&self) -> PathBuf {
        crate::layout::StateLayout::new(&self.state_dir).history()
    }
}

/// The status file as judged now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// No status file: the agent never ran on this host (with this state directory).
    NotStarted { path: PathBuf },
    /// The file's content; `agent_gone` when it says `running` but its pid is not alive.
    Recorded { status: Status, agent_gone: bool },
}

impl Observation {
    /// Reads the status file and checks the recorded pid of a run that is not done.
    pub fn observe(path: &Path) -> Result<Observation, StatusError> {
        Ok(match Status::read(path)? {
            None => Observation::NotStarted {
                path: path.to_path_buf(),
            },
            Some(status) => {
                let agent_gone = status.status == RunStatus::Running && !pid_alive(status.pid);
                Observation::Recorded { status, agent_gone }
            }
        })
    }

    /// Whether waiting longer cannot change the answer: the run is done (or `run` finished a
    /// pass), or its agent died.
    pub fn is_final(&self) -> bool {
        match self {
            Observation::NotStarted { .. } => false,
            Observation::Recorded { status, agent_gone } => {
                *agent_gone || status.status == RunStatus::Done || status.between_passes().is_some()
            }
        }
    }

    pub fn run_status(&self) -> RunStatus {
        match self {
            Observation::NotStarted { .. } => RunStatus::NotStarted,
            Observation::Recorded {
                status,
                agent_gone: false,
            } if status.between_passes().is_some() => RunStatus::Done,
            Observation::Recorded { status, .. } => status.status,
        }
    }

    /// The condition to report: the file's, unless the agent never ran or died mid-run (both
    /// mean nothing is known to be converged: error, as the exit code says).
    pub fn condition(&self) -> Condition {
        match self {
            Observation::NotStarted { .. } => Condition::Error,
            Observation::Recorded {
                agent_gone: true, ..
            } => Condition::Error,
            Observation::Recorded { status, .. } => {
                status.between_passes().unwrap_or(status.condition)
            }
        }
    }

    /// 0 done and healthy, 1 error (or never ran, or killed), 2 degraded. A run still under
    /// way reports its condition so far (`--wait` is how to get the final answer).
    pub fn exit_code(&self) -> u8 {
        self.condition().exit_code()
    }

    /// The one line that explains a status the file does not hold by itself.
    pub fn detail(&self) -> Option<String> {
        match self {
            Observation::NotStarted { path } => Some(format!(
                "pilot-agent has not run on this host (no {})",
                path.display()
            )),
            Observation::Recorded {
                status,
                agent_gone: true,
            } => Some(format!(
                "agent (pid {}) is not running; last run did not finish",
                status.pid
            )),
            Observation::Recorded { status, .. } => {
                let run = status.run.as_ref()?;
                if let Some(at) = run.stopped_at {
                    return Some(format!(
                        "pilot-agent run (pid {}) stopped at {}; nothing re-converges the host",
                        run.pid,
                        rfc3339(at)
                    ));
                }
                if !pid_alive(run.pid) {
                    return Some(format!(
                        "pilot-agent run (pid {}) is not running (it did not stop cleanly); \
                         this is its last pass",
                        run.pid
                    ));
                }
                status.between_passes().map(|_| {
                    format!(
                        "pass {} under way ({}); condition as of the last pass",
                        run.passes + 1,
                        run.last_trigger
                    )
                })
            }
        }
    }
}

/// Whether process `pid` exists and is not a zombie (a killed agent whose parent has not
/// reaped it yet is as dead as a gone one).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command name, which is in parentheses and
        // may itself contain spaces and parentheses: look after the last ')'.
        Ok(stat) => match stat.rfind(')').map(|i| stat[i + 1..].trim_start()) {
            Some(rest) => !(rest.starts_with('Z') || rest.starts_with('X')),
            None => true,
        },
        Err(_) => false,
    }
}

/// The result of `wait_for`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waited {
    pub observation: Observation,
    /// True when the deadline passed before the run finished.
    pub timed_out: bool,
}

/// Reads the status every `interval` until it is final or `timeout` has passed; always ends.
pub fn wait_for(path: &Path, timeout: Duration, interval: Duration) -> Result<Waited, StatusError> {
    let deadline = Instant::now() + timeout;
    loop {
        let observation = Observation::observe(path)?;
        if observation.is_final() {
            return Ok(Waited {
                observation,
                timed_out: false,
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Waited {
                observation,
                timed_out: true,
            });
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

/// One certificate's expiry, for `--long`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertExpiry {
    /// `ca`, `server`, `runner`, `operator`.
    pub name: String,
    pub path: PathBuf,
    pub not_after: Option<OffsetDateTime>,
    /// Whole days until `not_after` (negative once expired).
    pub days_left: Option<i64>,
    /// Why `not_after` is unknown (absent, unreadable).
    pub problem: Option<String>,
}

/// The agent's certificates under `STATE_DIR/pki`: the CA and every leaf it issues.
pub fn certificates(state_dir: &Path, now: OffsetDateTime) -> Vec<CertExpiry> {
    let layout = PkiLayout::new(state_dir.join("pki"));
    let mut files = vec![("ca".to_string(), layout.ca_cert())];
    files.push((pki::SERVER.to_string(), layout.server().cert));
    for name in pki::CLIENTS {
        files.push((name.to_string(), layout.leaf(name).cert));
    }
    files
        .into_iter()
        .map(|(name, path)| {
            let (not_after, problem) = match read_not_after(&path) {
                Ok(t) => (Some(t), None),
                Err(p) => (None, Some(p)),
            };
            CertExpiry {
                name,
                days_left: not_after.map(|t| (t - now).whole_days()),
                not_after,
                path,
                problem,
            }
        })
        .collect()
}

fn read_not_after(path: &Path) -> Result<OffsetDateTime, String> {
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("absent".into()),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let der = pki::parse_pem_cert(&pem).ok_or("not a PEM certificate")?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|_| "not a valid certificate")?;
    Ok(cert.validity().not_after.to_datetime())
}

/// Host figures for `--long`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostFigures {
    /// 1, 5 and 15 minute load averages.
    pub load_average: [f64; 3],
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub docker_data_root: PathBuf,
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    /// Why the disk figures are missing.
    pub disk_problem: Option<String>,
}

/// Load and memory from sysinfo; the disk of Docker's data root by `statvfs` on that path,
/// which names exactly the filesystem holding it (a mount-table match can pick the wrong one
/// under bind mounts or overlays).
pub fn host_figures(daemon_config: &Path) -> HostFigures {
    use sysinfo::{MemoryRefreshKind, RefreshKind, System};
    let load = System::load_average();
    let system = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let data_root = docker_data_root(daemon_config);
    let (free, total, problem) = match rustix::fs::statvfs(&data_root) {
        Ok(s) => (
            Some(s.f_bavail.saturating_mul(s.f_frsize)),
            Some(s.f_blocks.saturating_mul(s.f_frsize)),
            None,
        ),
        Err(e) => (None, None, Some(std::io::Error::from(e).to_string())),
    };
    HostFigures {
        load_average: [load.one, load.five, load.fifteen],
        memory_used_bytes: system.used_memory(),
        memory_total_bytes: system.total_memory(),
        docker_data_root: data_root,
        disk_free_bytes: free,
        disk_total_bytes: total,
        disk_problem: problem,
    }
}

/// `data-root` of dockerd's daemon.json, or Docker's default when unset or unreadable.
pub fn docker_data_root(daemon_config: &Path) -> PathBuf {
    std::fs::read(daemon_config)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|v| v.get("data-root")?.as_str().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DOCKER_DATA_ROOT))
}

/// The `--long` additions.
#[derive(Debug, Clone, PartialEq)]
pub struct Extras {
    pub certificates: Vec<CertExpiry>,
    pub host: HostFigures,
}

impl Extras {
    pub fn gather(target: &Target) -> Extras {
        Extras {
            certificates: certificates(&target.state_dir, OffsetDateTime::now_utc()),
            host: host_figures(&target.daemon_config),
        }
    }
}

/// The JSON output: the status file's fields as they are, `condition` as judged now (see
/// [`Observation::condition`]), `detail` when there is something to explain, and with
/// `--long` `certificates` and `host`.
pub fn render_json(observation: &Observation, extras: Option<&Extras>) -> Value {
    let mut v = match observation {
        Observation::NotStarted { .. } => json!({
            "schema": SCHEMA,
            "status": RunStatus::NotStarted,
            "steps": [],
        }),
        // Serializing plain structs with string keys cannot fail.
        Observation::Recorded { status, .. } => serde_json::to_value(status).unwrap_or_default(),
    };
    v["status"] = json!(observation.run_status());
    v["condition"] = json!(observation.condition());
    if let Some(detail) = observation.detail() {
        v["detail"] = json!(detail);
    }
    if let Some(extras) = extras {
        v["certificates"] = extras
            .certificates
            .iter()
            .map(|c| {
                let mut e = json!({
                    "name": c.name,
                    "path": c.path,
                    "not_after": c.not_after.map(crate::status_file::millis::format),
                    "days_left": c.days_left,
                });
                if let Some(p) = &c.problem {
                    e["problem"] = json!(p);
                }
                e
            })
            .collect();
        let h = &extras.host;
        let mut host = json!({
            "load_average": h.load_average,
            "memory_used_bytes": h.memory_used_bytes,
            "memory_total_bytes": h.memory_total_bytes,
            "docker_data_root": h.docker_data_root,
            "disk_free_bytes": h.disk_free_bytes,
            "disk_total_bytes": h.disk_total_bytes,
        });
        if let Some(p) = &h.disk_problem {
            host["disk_problem"] = json!(p);
        }
        v["host"] = host;
    }
    v
}

/// The plain output: a header, then one line per step; details are cut to `width` unless
/// `long`, which also adds durations, certificates and host figures.
pub fn render_text(
    observation: &Observation,
    extras: Option<&Extras>,
    width: usize,
    long: bool,
    now: OffsetDateTime,
) -> String {
    let mut out = String::new();
    let condition = json_word(&observation.condition());
    let status = json_word(&observation.run_status());
    // Writing to a String cannot fail.
    let _ = writeln!(out, "status:    {status}");
    let _ = writeln!(out, "condition: {condition}");
    if let Some(detail) = observation.detail() {
        let _ = writeln!(out, "detail:    {detail}");
    }
    if let Observation::Recorded { status, .. } = observation {
        let _ = writeln!(
            out,
            "command:   {} (pid {}, version {})",
            status.command, status.pid, status.version
        );
        if let Some(run) = &status.run {
            let mut line = format!(
                "service:   {} passes, {} repairs, last trigger: {}",
                run.passes,
                run.repairs,
                if run.last_trigger.is_empty() {
                    "-"
                } else {
                    &run.last_trigger
                }
            );
            if let Some(at) = run.last_repair_at {
                line.push_str(&format!(", last repair {}", rfc3339(at)));
            }
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out, "started:   {}", rfc3339(status.started_at));
        match status.finished_at {
            Some(f) => {
                let _ = writeln!(
                    out,
                    "finished:  {} (took {})",
                    rfc3339(f),
                    duration(f - status.started_at)
                );
            }
            None => {
                let _ = writeln!(out, "finished:  -");
            }
        }
        if !status.steps.is_empty() {
            out.push('\n');
            render_steps(&mut out, status, width, long, now);
        }
        if let (true, Some(identity)) = (long, &status.identity) {
            render_identity(&mut out, identity);
        }
    }
    if let Some(extras) = extras {
        render_extras(&mut out, extras);
    }
    out
}

/// `--long`: who the host is and which addresses and names its certificate carries.
fn render_identity(out: &mut String, r: &crate::identity::Report) {
    let i = &r.identity;
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    let mut source = format!("{} (cloud.provider: {})", i.provider, r.configured);
    if r.remembered {
        source.push_str(", read in an earlier pass");
    }
    out.push_str("\nidentity:\n");
    let _ = writeln!(out, "  provider         {source}");
    let _ = writeln!(out, "  instance id      {}", or_dash(i.instance_id.clone()));
    let region = match (&i.region, &i.zone) {
        (Some(r), Some(z)) => format!("{r} (zone {z})"),
        (r, z) => or_dash(r.clone().or_else(|| z.clone())),
    };
    let _ = writeln!(out, "  region           {region}");
    let _ = writeln!(
        out,
        "  private ipv4     {}",
        or_dash(i.private_ipv4.map(|a| a.to_string()))
    );
    let _ = writeln!(
        out,
        "  public ipv4      {}",
        or_dash(i.public_ipv4.map(|a| a.to_string()))
    );
    let _ = writeln!(out, "  hostname         {}", or_dash(i.hostname.clone()));
    let _ = writeln!(
        out,
        "  public hostname  {}",
        or_dash(i.public_hostname.clone())
    );
    let _ = writeln!(out, "  lookup           {} ms", r.elapsed_ms);
    if let Some(p) = &r.problem {
        let _ = writeln!(out, "  problem          {p}");
    }
}

fn render_steps(out: &mut String, status: &Status, width: usize, long: bool, now: OffsetDateTime) {
    let name_w = status
        .steps
        .iter()
        .map(|s| s.name.chars().count())
        .chain([4])
        .max()
        .unwrap_or(4)
        // A width beyond u16::MAX makes `format!` panic; a status file is outside input.
        .min(64);
    // "changed", "degraded": the longest states.
    let state_w = 8;
    let durations: Vec<String> = status
        .steps
        .iter()
        .map(|s| match (s.started_at, s.finished_at) {
            (Some(a), Some(b)) => duration(b - a),
            (Some(a), None) => format!("{}+", duration(now - a)),
            _ => "-".to_string(),
        })
        .collect();
    let dur_w = durations
        .iter()
        .map(|d| d.chars().count())
        .chain([8])
        .max()
        .unwrap_or(8);
    let mut prefix_w = name_w + 2 + state_w + 2;
    if long {
        prefix_w += dur_w + 2;
    }
    // Keep some room for the detail even on a narrow terminal.
    let detail_w = width.saturating_sub(prefix_w).max(20);
    let head = if long {
        format!(
            "{:name_w$}  {:state_w$}  {:dur_w$}  DETAIL",
            "STEP", "STATE", "DURATION"
        )
    } else {
        format!("{:name_w$}  {:state_w$}  DETAIL", "STEP", "STATE")
    };
    let _ = writeln!(out, "{}", head.trim_end());
    for (step, dur) in status.steps.iter().zip(&durations) {
        let state = json_word(&step.state);
        let line = if long {
            // Full detail; continuation lines are indented under the DETAIL column.
            let indent = format!("\n{}", " ".repeat(prefix_w));
            let detail = step.detail.trim_end().replace('\n', &indent);
            format!(
                "{:name_w$}  {state:state_w$}  {dur:dur_w$}  {detail}",
                step.name
            )
        } else {
            let detail = truncate(&step.detail.replace('\n', " "), detail_w);
            format!("{:name_w$}  {state:state_w$}  {detail}", step.name)
        };
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn render_extras(out: &mut String, extras: &Extras) {
    out.push_str("\ncertificates:\n");
    for c in &extras.certificates {
        let _ = match (c.not_after, &c.problem) {
            (Some(t), _) => writeln!(
                out,
                "  {:9} expires {} ({} days left)",
                c.name,
                rfc3339(t),
                c.days_left.unwrap_or_default()
            ),
            (None, problem) => writeln!(
                out,
                "  {:9} {}: {}",
                c.name,
                problem.as_deref().unwrap_or("unknown"),
                c.path.display()
            ),
        };
    }
    let h = &extras.host;
    out.push_str("\nhost:\n");
    let _ = writeln!(
        out,
        "  load:    {:.2} {:.2} {:.2}",
        h.load_average[0], h.load_average[1], h.load_average[2]
    );
    let _ = writeln!(
        out,
        "  memory:  {} used of {}",
        bytes(h.memory_used_bytes),
        bytes(h.memory_total_bytes)
    );
    let _ = match (h.disk_free_bytes, h.disk_total_bytes) {
        (Some(free), Some(total)) => writeln!(
            out,
            "  disk:    {} free of {} ({})",
            bytes(free),
            bytes(total),
            h.docker_data_root.display()
        ),
        _ => writeln!(
            out,
            "  disk:    unknown ({}: {})",
            h.docker_data_root.display(),
            h.disk_problem.as_deref().unwrap_or("no figures")
        ),
    };
}

/// A value's JSON word (`done`, `degraded`, `changed`): the text and JSON outputs use the same.
fn json_word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => String::from("?"),
    }
}

/// The same text status.json holds, so an operator can grep one for the other.
fn rfc3339(t: OffsetDateTime) -> String {
    crate::status_file::millis::format(t)
}

/// A short human duration: `350 ms`, `4.2 s`, `3 min 5 s`, `2 h 3 min`.
pub fn duration(d: time::Duration) -> String {
    let ms = d.whole_milliseconds().max(0);
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{} h {} min", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

fn bytes(n: u64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    const MIB: f64 = 1024.0 * 1024.0;
    let n = n as f64;
    if n >= GIB {
        format!("{:.1} GiB", n / GIB)
    } else {
        format!("{:.0} MiB", n / MIB)
    }
}

/// Cuts `s` to `max` characters, marking the cut with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::status_file::{StepState, now};

    pub(crate) fn sample(state: StepState, run: RunStatus, pid: u32) -> Status {
        let mut s = Status::start(
            "up",
            [
                "firewall".to_string(),
                "pki".to_string(),
                "database".to_string(),
            ],
        );
        s.pid = pid;
        for step in &mut s.steps {
            step.state = StepState::Ok;
            step.detail = "table inet pilot_agent is in place".into();
            step.started_at = Some(s.started_at);
            step.finished_at = Some(s.started_at + time::Duration::milliseconds(1500));
        }
        let db = s.step_mut("database").unwrap();
        db.state = state;
        db.detail = format!("{} {}", "the database is not reachable:", "x".repeat(300));
        s.condition = s.compute_condition();
        s.status = run;
        if run == RunStatus::Done {
            s.finished_at = Some(s.started_at + time::Duration::seconds(3));
        }
        s
    }

    pub(crate) fn write(dir: &Path, s: &Status) -> PathBuf {
        let p = dir.join("status.json");
        s.write(&p).unwrap();
        p
    }

    #[test]
    fn exit_codes_follow_cloud_init() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let cases = [
            (StepState::Ok, RunStatus::Done, me, 0, true),
            (StepState::Degraded, RunStatus::Done, me, 2, true),
            (StepState::Error, RunStatus::Done, me, 1, true),
            // Still running, healthy so far: not final.
            (StepState::Running, RunStatus::Running, me, 0, false),
        ];
        for (state, run, pid, code, fin) in cases {
            let p = write(dir.path(), &sample(state, run, pid));
            let o = Observation::observe(&p).unwrap();
            assert_eq!(o.exit_code(), code, "{state:?} {run:?}");
            assert_eq!(o.is_final(), fin, "{state:?} {run:?}");
            assert_eq!(o.detail(), None);
        }
        let o = Observation::observe(&dir.path().join("nope.json")).unwrap();
        assert_eq!(o.exit_code(), 1);
        assert!(!o.is_final());
        assert!(o.detail().unwrap().contains("has not run on this host"));
    }

    #[test]
    fn a_running_status_of_a_dead_pid_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let p = write(
            dir.path(),
            &sample(StepState::Running, RunStatus::Running, dead),
        );
        let o = Observation::observe(&p).unwrap();
        assert!(o.is_final());
        assert_eq!(o.condition(), Condition::Error);
        assert_eq!(o.exit_code(), 1);
        assert_eq!(
            o.detail().unwrap(),
            format!("agent (pid {dead}) is not running; last run did not finish")
        );
        let v = render_json(&o, None);
        assert_eq!(v["status"], "running");
        assert_eq!(v["condition"], "error");
        assert!(v["detail"].as_str().unwrap().contains("not running"));
        // A done status is not judged by its pid (the agent exits after `up`).
        let p = write(dir.path(), &sample(StepState::Ok, RunStatus::Done, dead));
        assert_eq!(Observation::observe(&p).unwrap().exit_code(), 0);
    }

    /// A pid that is surely not alive: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!pid_alive(pid));
        pid
    }

    #[test]
    fn pid_liveness() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        // A zombie: exited, not yet reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) {
            assert!(Instant::now() < deadline, "child {pid} never exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
    }

    #[test]
    fn wait_ends_at_the_timeout_and_when_the_run_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            &sample(StepState::Running, RunStatus::Running, std::process::id()),
        );
        let t0 = Instant::now();
        let w = wait_for(&p, Duration::from_millis(400), Duration::from_millis(50)).unwrap();
        let took = t0.elapsed();
        assert!(w.timed_out);
        assert_eq!(w.observation.run_status(), RunStatus::Running);
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(2),
            "{took:?}"
        );

        // No status file yet: waits too (the agent may not have started), and still ends.
        let w = wait_for(
            &dir.path().join("absent.json"),
            Duration::from_millis(100),
            Duration::from_millis(20),
        )
        .unwrap();
        assert!(w.timed_out);

        // The run finishes while we wait.
        let writer = {
            let p = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                sample(StepState::Ok, RunStatus::Done, std::process::id())
                    .write(&p)
                    .unwrap();
            })
        };
        let t0 = Instant::now();
        let w = wait_for(&p, Duration::from_secs(10), Duration::from_millis(20)).unwrap();
        writer.join().unwrap();
        assert!(!w.timed_out);
        assert_eq!(w.observation.exit_code(), 0);
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn text_output_has_a_header_and_a_step_table() {
        let s = sample(StepState::Degraded, RunStatus::Done, 42);
        let o = Observation::Recorded {
            status: s.clone(),
            agent_gone: false,
        };
        let text = render_text(&o, None, 80, false, now());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "status:    done");
        assert_eq!(lines[1], "condition: degraded");
        assert!(
            lines[2].starts_with("command:   up (pid 42, version "),
            "{text}"
        );
        assert!(lines[4].contains("(took 3.0 s)"), "{text}");
        assert_eq!(lines[6], "STEP      STATE     DETAIL");
        assert_eq!(
            lines[7],
            "firewall  ok        table inet pilot_agent is in place"
        );
        assert!(lines[9].starts_with("database  degraded  the database is not reachable: xxx"));
        assert!(lines[9].ends_with('…'), "{text}");
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{text}");

        let long = render_text(&o, None, 80, true, now());
        assert!(
            long.contains("STEP      STATE     DURATION  DETAIL"),
            "{long}"
        );
        assert!(
            long.contains("firewall  ok        1.5 s     table inet"),
            "{long}"
        );
        assert!(long.contains(&"x".repeat(300)), "--long keeps full details");

        let ns = Observation::NotStarted {
            path: PathBuf::from("/var/lib/pilot-agent/status.json"),
        };
        assert_eq!(
            render_text(&ns, None, 80, false, now()),
            "status:    not-started\ncondition: error\ndetail:    pilot-agent has not run on \
             this host (no /var/lib/pilot-agent/status.json)\n"
        );
        let v = render_json(&ns, None);
        assert_eq!(v["status"], "not-started");
        assert_eq!(v["condition"], "error");
        assert_eq!(v["schema"], SCHEMA);
    }

    #[test]
    fn json_keeps_the_file_fields_and_adds_long_extras() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample(StepState::Ok, RunStatus::Done, 42);
        let o = Observation::Recorded {
            status: s.clone(),
            agent_gone: false,
        };
        let plain = render_json(&o, None);
        assert_eq!(plain, serde_json::to_value(&s).unwrap());

        // A CA certificate in the PKI layout, and a daemon.json with a data root.
        let layout = PkiLayout::new(dir.path().join("pki"));
        std::fs::create_dir_all(layout.ca_dir()).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.not_after = rcgen::date_time_ymd(2090, 1, 2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(layout.ca_cert(), cert.pem()).unwrap();
        let daemon = dir.path().join("daemon.json");
        std::fs::write(
            &daemon,
            format!(r#"{{"data-root": "{}"}}"#, dir.path().display()),
        )
        .unwrap();
        let target = Target {
            state_dir: dir.path().to_path_buf(),
            daemon_config: daemon,
            warning: None,
        };
        let extras = Extras::gather(&target);
        let v = render_json(&o, Some(&extras));
        let certs = v["certificates"].as_array().unwrap();
        let names: Vec<&str> = certs.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["ca", "server", "runner", "operator"]);
        assert!(
            certs[0]["not_after"]
                .as_str()
                .unwrap()
                .starts_with("2090-01-02T"),
            "{v}"
        );
        assert!(certs[0]["days_left"].as_i64().unwrap() > 20000);
        assert!(certs[1]["not_after"].is_null());
        assert_eq!(certs[1]["problem"], "absent");
        let host = &v["host"];
        assert_eq!(host["docker_data_root"], dir.path().to_str().unwrap());
        assert!(host["disk_total_bytes"].as_u64().unwrap() > 0, "{host}");
        assert!(host["memory_total_bytes"].as_u64().unwrap() > 0, "{host}");
        assert_eq!(host["load_average"].as_array().unwrap().len(), 3);

        let text = render_text(&o, Some(&extras), 100, true, now());
        assert!(text.contains("  ca        expires 2090-01-02T"), "{text}");
        assert!(text.contains("  server    absent: "), "{text}");
        assert!(text.contains("  memory:  "), "{text}");
    }

    #[test]
    fn a_broken_default_config_falls_back_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("agent.yaml");
        let t = Target::resolve(&missing, false).unwrap();
        assert_eq!(t.state_dir, Path::new(DEFAULT_STATE_DIR));
        let w = t.warning.unwrap();
        assert!(w.starts_with("warning: cannot read configuration "), "{w}");
        assert!(w.ends_with("reading the default state directory /var/lib/pilot-agent"));
        assert!(Target::resolve(&missing, true).is_err());

        std::fs::write(&missing, "state_dir: relative\n").unwrap();
        let w = Target::resolve(&missing, false).unwrap().warning.unwrap();
        assert!(w.contains("has 1 problem(s)"), "{w}");
        assert!(
            w.contains(&format!("the first {}:1:", missing.display())),
            "names the first problem at its line: {w}"
        );

        std::fs::write(&missing, format!("state_dir: {}\n", dir.path().display())).unwrap();
        let t = Target::resolve(&missing, true).unwrap();
        assert_eq!(t.state_dir, dir.path());
        assert_eq!(t.warning, None);
    }

    #[test]
    fn data_root_defaults_when_unset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("daemon.json");
        assert_eq!(docker_data_root(&p), Path::new(DEFAULT_DOCKER_DATA_ROOT));
        std::fs::write(&p, r#"{"hosts": []}"#).unwrap();
        assert_eq!(docker_data_root(&p), Path::new(DEFAULT_DOCKER_DATA_ROOT));
        std::fs::write(&p, r#"{"data-root": "/srv/docker"}"#).unwrap();
        assert_eq!(docker_data_root(&p), Path::new("/srv/docker"));
    }

    #[test]
    fn helpers() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(duration(time::Duration::milliseconds(350)), "350 ms");
        assert_eq!(duration(time::Duration::milliseconds(4200)), "4.2 s");
        assert_eq!(duration(time::Duration::seconds(185)), "3 min 5 s");
    }

    /// A live `run` re-checking the host after a finished pass reports `done` with the last
    /// pass's condition; the same file of a dead `run` is an error; the counters show in text.
    #[test]
    fn run_between_passes_is_done_not_running() {
        use crate::status_file::RunInfo;
        let dir = tempfile::tempdir().unwrap();
        let mut s = sample(StepState::Ok, RunStatus::Running, std::process::id());
        s.command = "run".into();
        s.step_mut("database").unwrap().state = StepState::Pending;
        s.condition = s.compute_condition();
        let mut run = RunInfo::new();
        run.last_trigger = "docker-event: waypoint-server die".into();
        // The first pass under way: running, as for `up`.
        s.run = Some(Box::new(run.clone()));
        let o = Observation::observe(&write(dir.path(), &s)).unwrap();
        assert_eq!(o.run_status(), RunStatus::Running);
        assert!(!o.is_final());
        // A later pass: done, with the last pass's condition.
        run.passes = 3;
        run.repairs = 1;
        run.last_pass_condition = Some(Condition::Degraded);
        s.run = Some(Box::new(run.clone()));
        let o = Observation::observe(&write(dir.path(), &s)).unwrap();
        assert_eq!(o.run_status(), RunStatus::Done);
        assert!(o.is_final());
        assert_eq!(o.condition(), Condition::Degraded);
        assert_eq!(o.exit_code(), 2);
        assert!(
            o.detail().unwrap().contains("pass 4 under way"),
            "{:?}",
            o.detail()
        );
        let v = render_json(&o, None);
        assert_eq!(v["status"], "done");
        assert_eq!(v["run"]["passes"], 3);
        assert_eq!(v["run"]["repairs"], 1);
        assert_eq!(v["run"]["mode"], "run");
        let text = render_text(&o, None, 100, false, now());
        assert!(
            text.contains(
                "service:   3 passes, 1 repairs, last trigger: docker-event: waypoint-server die"
            ),
            "{text}"
        );
        // Killed mid-pass: the pid is gone, an error like any unfinished run.
        let dead = dead_pid();
        s.pid = dead;
        s.run.as_mut().unwrap().pid = dead;
        let o = Observation::observe(&write(dir.path(), &s)).unwrap();
        assert_eq!(o.condition(), Condition::Error);
        assert_eq!(o.run_status(), RunStatus::Running);
        // Stopped cleanly after a pass: done, and the detail says nothing watches.
        s.status = RunStatus::Done;
        s.run.as_mut().unwrap().stopped_at = Some(now());
        let o = Observation::observe(&write(dir.path(), &s)).unwrap();
        assert_eq!(o.run_status(), RunStatus::Done);
        assert!(
            o.detail().unwrap().contains("stopped at"),
            "{:?}",
            o.detail()
        );
    }
}
