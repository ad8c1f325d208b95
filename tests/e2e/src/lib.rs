//! End-to-end suites live in tests/; helpers they share (and the benchmarks in src/bin/) here.

pub mod agent;
pub mod crash;
pub mod floor;
pub mod stack;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pilot_harness::{Postgres, Vm};

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
