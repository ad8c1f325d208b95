//! End-to-end suites live in tests/; helpers they share (and the benchmarks in src/bin/) here.

pub mod agent;
pub mod crash;
pub mod floor;
pub mod stack;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use pilot_harness::{Postgres, Vm};
use serde_json::Value;

/// Polls `check` every 100 ms until it yields `Some`, or fails after `timeout` naming `what`
/// and the last error `check` reported (an `Err` means "not yet, and this is why").
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Bakes the Waypoint stand-in into `vm` the way a Pilot image does: a `docker save` tarball
/// tagged `tag` in `VM_DIR/images/`, and the image absent from dockerd, so the agent must load
/// it. Returns the images directory.
pub fn bake_standin(vm: &Vm, tag: &str) -> anyhow::Result<PathBuf> {
    let images = vm.dir().join("images");
    fs::create_dir_all(&images)?;
    vm.import_standin(tag)?;
    vm.save_image(tag, &images.join("waypoint.tar"))?;
    vm.docker_ok(["rmi", tag])?;
    Ok(images)
}

/// Writes the PostgreSQL superuser's password to `VM_DIR/pg-admin-password` (0600), the file
/// the agent's `database.admin_password_file` names; returns its path.
pub fn write_admin_password(vm: &Vm, pg: &Postgres) -> anyhow::Result<PathBuf> {
    let path = vm.dir().join("pg-admin-password");
    fs::write(&path, format!("{}\n", pg.password()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// The Waypoint stand-in server's persisted state (its `-db` file in the volume of the
/// `waypoint-server` container of `vm`): tokens, advertise address, registered runners.
pub fn standin_server_state(vm: &Vm) -> anyhow::Result<Value> {
    let text = vm.docker_ok(["exec", "waypoint-server", "cat", "/data/data.db"])?;
    serde_json::from_str(&text).context("the stand-in server's state")
}

/// The bootstrap tokens a stand-in server's state says it ever issued.
pub fn bootstrap_tokens(state: &Value) -> Vec<String> {
    state["tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| t["kind"] == "bootstrap")
                .filter_map(|t| t["secret"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The status file the stand-in runner container `name` of `vm` keeps.
pub fn standin_runner_status(vm: &Vm, name: &str) -> anyhow::Result<Value> {
    let text = vm.docker_ok(["exec", name, "cat", "/tmp/waypoint-runner-status.json"])?;
    serde_json::from_str(&text).with_context(|| format!("the status of {name}"))
}
