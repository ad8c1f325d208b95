//! A whole Pilot host for the reliability suite and the benchmark: a simulated VM with the
//! Waypoint STAND-IN baked as a `docker save` tarball (absent from dockerd, so the agent must
//! load it), optionally PostgreSQL on its own database host, and the agent configured for the
//! converge core plus `waypoint:` (and `database:`). Also what such a host is asked afterwards
//! (containers by role, the server's bootstrap tokens, the application role's login) and the
//! reset to a cold host between SIGKILL iterations. [`RunHost`]: the same host with PostgreSQL
//! and the `endpoint:` and `service:` sections, for `pilot-agent run` (the service suite and
//! bench-service).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use pilot_harness::{Postgres, Vm, VmOptions, require_root};

use crate::agent::{
    Agent, EndpointToken, RateLimit, database_section, run_sections, waypoint_section,
};
use crate::{bake_standin, write_admin_password};

/// The image reference the agent's configuration names (Pilot's image name; the content is
/// the Waypoint stand-in).
pub const IMAGE: &str = "pilot/waypoint:0.11.4";

/// A VM, its agent (Waypoint on), and PostgreSQL when asked for.
pub struct Stack {
    pub agent: Agent,
    pub images: PathBuf,
    pub runners: u32,
    /// Dropped before `vm` (fields drop in order): its link lives in the VM's namespace.
    pub pg: Option<Postgres>,
    pub vm: Vm,
}

impl Stack {
    /// Starts the VM (and PostgreSQL if `database`), bakes the stand-in, writes the agent's
    /// configuration with `runners` Waypoint runners.
    pub fn start(database: bool, runners: u32) -> Result<Stack> {
        require_root()?;
        let vm = Vm::start(VmOptions::default())?;
        let pg = if database {
            Some(Postgres::start(&vm)?)
        } else {
            None
        };
        let images = bake_standin(&vm, IMAGE)?;
        let mut sections = waypoint_section(IMAGE, IMAGE, &images, runners);
        if let Some(pg) = &pg {
            let pw = write_admin_password(&vm, pg)?;
            sections += &database_section(pg, &pw);
        }
        let agent = Agent::with_sections(&vm, &sections)?;
        Ok(Stack {
            agent,
            images,
            runners,
            pg,
            vm,
        })
    }

    /// IDs of the agent's containers (label io.pilot.managed=true), running or not, with
    /// `extra` filters (e.g. `label=io.pilot.role=server`).
    pub fn managed(&self, extra: &[&str]) -> Result<Vec<String>> {
        let mut args = vec!["ps", "-aq", "--filter", "label=io.pilot.managed=true"];
        for f in extra {
            args.extend(["--filter", f]);
        }
        let out = self.vm.docker_ok(args)?;
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// How many of the agent's containers have role `role`.
    pub fn role_count(&self, role: &str) -> Result<usize> {
        Ok(self
            .managed(&[&format!("label=io.pilot.role={role}")])?
            .len())
    }

    /// Exactly one server and `runners` runners, all running, no bootstrap container left,
    /// nothing else labelled as the agent's: no duplicates.
    pub fn check_containers(&self) -> Result<()> {
        let server = self.role_count("server")?;
        let runner = self.role_count("runner")?;
        let boot = self.role_count("bootstrap")?;
        let all = self.managed(&[])?.len();
        let running = self.managed(&["status=running"])?.len();
        ensure!(
            server == 1
                && runner == self.runners as usize
                && boot == 0
                && all == 1 + self.runners as usize
                && running == all,
            "containers: {server} server(s), {runner} runner(s) (want {}), {boot} bootstrap, \
             {all} managed in all, {running} running",
            self.runners
        );
        Ok(())
    }

    /// The bootstrap tokens the stand-in server ever issued (its state in the volume).
    pub fn bootstrap_tokens(&self) -> Result<Vec<String>> {
        Ok(crate::bootstrap_tokens(&crate::standin_server_state(
            &self.vm,
        )?))
    }

    /// A secret file of the state dir (must be 0600), trimmed.
    pub fn read_secret(&self, rel: &str) -> Result<String> {
        use std::os::unix::fs::PermissionsExt;
        let p = self.agent.state_dir().join(rel);
        let mode = std::fs::metadata(&p)
            .with_context(|| format!("{} missing", p.display()))?
            .permissions()
            .mode()
            & 0o777;
        ensure!(mode == 0o600, "{} has mode {mode:o}, want 600", p.display());
        Ok(std::fs::read_to_string(&p)?.trim().to_string())
    }

    /// The application role logs in to its database with the stored password.
    pub fn app_login(&self) -> Result<()> {
        let pg = self.pg.as_ref().context("no database in this stack")?;
        let password = self.read_secret("database/password")?;
        let out = self
            .vm
            .cmd("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &pg.addr().to_string(), "-p", &pg.port().to_string()])
            .args(["-U", "pilot_app", "-d", "pilot", "-c", "SELECT 7"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains('7'),
            "the application role cannot log in with the stored password: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Removes the agent's containers (force).
    fn remove_managed(&self) -> Result<()> {
        let ids = self.managed(&[])?;
        if !ids.is_empty() {
            let mut args = vec!["rm".to_string(), "-f".to_string()];
            args.extend(ids);
            self.vm.docker_ok(args)?;
        }
        Ok(())
    }

    /// Back to a cold host: the converge core's reset ([`crate::crash::reset_cold`]: table,
    /// state dir, original daemon.json, dockerd restarted) and nothing of Waypoint or the
    /// database: no managed container, volume, network or loaded image, no application role
    /// or database. Containers are removed before the restart (which then need not stop them)
    /// and again after it, in case a request of the killed run was still in flight.
    pub fn reset_cold(&self, original_daemon_json: &[u8]) -> Result<()> {
        self.remove_managed()?;
        crate::crash::reset_cold(&self.vm, &self.agent, original_daemon_json)?;
        self.remove_managed()?;
        let _ = self.vm.docker(["volume", "rm", "-f", "waypoint-server"])?;
        let _ = self.vm.docker(["network", "rm", "pilot"])?;
        let _ = self.vm.docker(["rmi", IMAGE])?;
        if let Some(pg) = &self.pg {
            pg.psql("DROP DATABASE IF EXISTS pilot WITH (FORCE)")?;
            pg.psql("DROP ROLE IF EXISTS pilot_app")?;
        }
        let left = self.vm.docker_ok(["volume", "ls", "-q"])?;
        ensure!(
            !left.lines().any(|l| l == "waypoint-server"),
            "the server's volume survived the reset"
        );
        Ok(())
    }

    /// Polls until the agent's server container answers `GET /` over HTTPS from inside the
    /// VM at its published port.
    pub fn wait_server(&self, timeout: Duration) -> Result<()> {
        crate::wait_https_200(
            || self.vm.cmd("curl"),
            "https://127.0.0.1:9702/",
            "1",
            timeout,
            "the Waypoint server to answer",
        )
    }

    /// Stops PostgreSQL (if any) and removes the VM, reporting what could not be removed.
    pub fn cleanup(self) -> Result<()> {
        if let Some(pg) = self.pg {
            pg.cleanup()?;
        }
        self.vm.cleanup()
    }
}

/// A full Pilot host for `pilot-agent run` (tests/service.rs, bench-service): a VM, PostgreSQL,
/// the stand-in baked, an endpoint token, and the agent configured with [`run_sections`].
pub struct RunHost {
    pub token: EndpointToken,
    pub agent: Agent,
    /// Dropped before `vm` (fields drop in order): its link lives in the VM's namespace.
    pub pg: Postgres,
    pub vm: Vm,
}

impl RunHost {
    /// Starts the VM and PostgreSQL, bakes the stand-in, writes the admin password, the
    /// endpoint token and the configuration (`rate_limit` for the endpoint).
    pub fn start(rate_limit: RateLimit) -> Result<RunHost> {
        require_root()?;
        let vm = Vm::start(VmOptions::default())?;
        let pg = Postgres::start(&vm)?;
        let images = bake_standin(&vm, IMAGE)?;
        let pw = write_admin_password(&vm, &pg)?;
        let token = EndpointToken::generate(&vm)?;
        let sections = run_sections(IMAGE, &images, &pg, &pw, &token, rate_limit);
        let agent = Agent::with_sections(&vm, &sections)?;
        Ok(RunHost {
            token,
            agent,
            pg,
            vm,
        })
    }
}
