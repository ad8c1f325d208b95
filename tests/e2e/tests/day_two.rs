//! Day two on a Pilot VM, with the real `pilot-agent` in simulated VMs against the Waypoint
//! STAND-IN (its `server snapshot`/`server restore` and signing key behave as Waypoint 0.11.4's):
//!
//! - `backup_restores_onto_a_new_vm_and_a_tampered_file_changes_nothing`: a server with two
//!   runners and 100 projects is backed up; the VM is destroyed; a new VM (same host name, as a
//!   replacement VM from the same template) refuses a tampered copy without changing anything,
//!   then restores the real one: the project is back, the runners run with their old tokens
//!   and reconnect, the token `credentials` prints works and the new VM's own bootstrap token
//!   no longer does.
//! - `scheduled_backups_are_pruned_and_a_full_disk_is_degraded`: `run` with `backup:` takes
//!   backups on time, keeps `keep`, and on a full disk reports `degraded` with the reason while
//!   the earlier backups stay; freeing the disk recovers.
//! - `upgrades_under_guard_and_rolls_back_an_image_that_never_answers`: a new server image
//!   replaces the server with a backup first and never two servers at once; an image that never
//!   answers is rolled back within the deadline with the data intact, the step in `error`
//!   naming the image, and is not tried again until the configuration changes.
//!
//! Needs root and a machine prepared by scripts/setup.sh; without them every test FAILS.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pilot_e2e::agent::{Agent, waypoint_section};
use pilot_e2e::{bake_standin, poll, standin_runner_status};
use pilot_harness::{Vm, VmOptions, require_root};
use serde_json::Value;

const IMAGE: &str = "pilot/waypoint:0.11.4";
const HOST: &str = "pilot-day2";

/// A VM named [`HOST`] with the stand-in baked and the agent configured with `runners`
/// runners and `extra` sections.
fn vm_with_agent(runners: u32, extra: impl Fn(&Vm) -> String) -> Result<(Vm, Agent)> {
    require_root()?;
    let vm = Vm::start(VmOptions {
        hostname: Some(HOST.into()),
        ..VmOptions::default()
    })?;
    let images = bake_standin(&vm, IMAGE)?;
    let sections = waypoint_section(IMAGE, IMAGE, &images, runners)
        + &format!("host:\n  hostname: {HOST}\n")
        + &extra(&vm);
    let agent = Agent::with_sections(&vm, &sections)?;
    Ok((vm, agent))
}

fn token(agent: &Agent, name: &str) -> Result<String> {
    let p = agent.state_dir().join("waypoint").join(name);
    Ok(fs::read_to_string(&p)
        .with_context(|| format!("read {}", p.display()))?
        .trim()
        .to_string())
}

/// `waypoint ARGS` run in the server container against its loopback with `token`, verifying
/// the server with the agent's CA (as the agent's own commands do).
fn wp(vm: &Vm, token: &str, args: &[&str]) -> Result<std::process::Output> {
    let mut all: Vec<String> = [
        "exec",
        "-e",
        "WAYPOINT_SERVER_ADDR=127.0.0.1:9701",
        "-e",
        "WAYPOINT_SERVER_TLS=true",
        "-e",
        "WAYPOINT_SERVER_TLS_SKIP_VERIFY=false",
        "-e",
        "SSL_CERT_FILE=/pilot-tls/ca.pem",
        "-e",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.push(format!("WAYPOINT_SERVER_TOKEN={token}"));
    all.extend(["waypoint-server", "/bin/waypoint"].map(String::from));
    all.extend(args.iter().map(|s| s.to_string()));
    vm.docker(&all)
}

fn wp_ok(vm: &Vm, token: &str, args: &[&str]) -> Result<String> {
    let out = wp(vm, token, args)?;
    ensure!(
        out.status.success(),
        "waypoint {args:?} exited {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn agent_out(agent: &Agent, vm: &Vm, args: &[&str]) -> Result<(i32, String, String)> {
    let (out, _) = agent.run(vm, args)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn tar_list(file: &Path) -> Result<Vec<String>> {
    let out = Command::new("tar").arg("-tf").arg(file).output()?;
    ensure!(out.status.success(), "tar -tf {}", file.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// A copy of the backup `src` at `dst` with one byte of member `member`'s data flipped (the
/// manifest left as it was).
fn tamper(src: &Path, dst: &Path, member: &str) -> Result<()> {
    let bytes = fs::read(src)?;
    let mut out = bytes.clone();
    // Walk the tar headers: 512-byte header, data padded to 512.
    let mut off = 0usize;
    while off + 512 <= bytes.len() && bytes[off] != 0 {
        let name = String::from_utf8_lossy(&bytes[off..off + 100])
            .trim_end_matches('\0')
            .to_string();
        let size_field = String::from_utf8_lossy(&bytes[off + 124..off + 136]);
        let size =
            usize::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)?;
        if name == member {
            ensure!(size > 0, "{member} is empty");
            out[off + 512 + size / 2] ^= 0x01;
            fs::write(dst, out)?;
            return Ok(());
        }
        off += 512 + size.div_ceil(512) * 512;
    }
    bail!("no member {member} in {}", src.display())
}

#[test]
fn backup_restores_onto_a_new_vm_and_a_tampered_file_changes_nothing() -> Result<()> {
    let keep = KeptDir::new()?;
    let saved = keep.0.join("backup.tar");
    let (a_bootstrap, a_runner_tokens);
    {
        let (vm, agent) = vm_with_agent(2, |_| String::new())?;
        agent.up_ok(&vm)?;
        a_bootstrap = token(&agent, "bootstrap-token")?;
        a_runner_tokens = [
            token(&agent, "runner-1-token")?,
            token(&agent, "runner-2-token")?,
        ];
        wp_ok(&vm, &a_bootstrap, &["project", "apply", "demoapp"])?;
        // 100 projects in all, for the size and time figures.
        for i in 1..100 {
            wp_ok(
                &vm,
                &a_bootstrap,
                &["project", "apply", &format!("app{i:03}")],
            )?;
        }
        let listed = wp_ok(&vm, &a_bootstrap, &["project", "list"])?;
        ensure!(
            listed.contains("demoapp") && listed.lines().count() == 100,
            "{listed}"
        );

        let t0 = Instant::now();
        let (code, stdout, stderr) = agent_out(&agent, &vm, &["backup"])?;
        let took = t0.elapsed();
        ensure!(code == 0, "backup exited {code}: {stderr}");
        let file = PathBuf::from(stdout.trim());
        ensure!(
            file.starts_with(agent.state_dir().join("backups")),
            "default directory: {}",
            file.display()
        );
        let mode = fs::metadata(&file)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "backup mode {mode:o}");
        let members = tar_list(&file)?;
        ensure!(
            members
                == [
                    "manifest.json",
                    "waypoint.snapshot",
                    "tokens/bootstrap-token",
                    "tokens/runner-1-token",
                    "tokens/runner-2-token",
                    "advertise-address"
                ],
            "members: {members:?}"
        );
        for secret in std::iter::once(&a_bootstrap).chain(a_runner_tokens.iter()) {
            ensure!(!stderr.contains(secret.as_str()) && !stdout.contains(secret.as_str()));
        }
        eprintln!(
            "day-two: backup of 2 runners and 100 projects: {} bytes in {took:.2?}",
            fs::metadata(&file)?.len()
        );
        // --output into an operator's directory: the file 0600, the directory's mode kept.
        let out_dir = vm.dir().join("operator-out");
        fs::create_dir_all(&out_dir)?;
        fs::set_permissions(&out_dir, fs::Permissions::from_mode(0o755))?;
        let out = out_dir.join("b.tar");
        let (code, stdout, stderr) = agent_out(
            &agent,
            &vm,
            &["backup", "--output", out.to_str().unwrap_or("")],
        )?;
        ensure!(
            code == 0 && stdout.trim() == out.to_str().unwrap_or(""),
            "{stderr}"
        );
        ensure!(fs::metadata(&out)?.permissions().mode() & 0o777 == 0o600);
        ensure!(
            fs::metadata(&out_dir)?.permissions().mode() & 0o777 == 0o755,
            "backup --output changed the mode of the operator's directory"
        );
        fs::copy(&file, &saved)?;
        // The VM is destroyed here (namespace, dockerd, its volume and state).
    }

    let (vm, agent) = vm_with_agent(2, |_| String::new())?;
    agent.up_ok(&vm)?;
    let b_bootstrap = token(&agent, "bootstrap-token")?;
    ensure!(b_bootstrap != a_bootstrap, "a new server has its own token");
    ensure!(!wp_ok(&vm, &b_bootstrap, &["project", "list"])?.contains("demoapp"));

    // A tampered copy is refused and changes nothing.
    let tampered = keep.0.join("tampered.tar");
    tamper(&saved, &tampered, "waypoint.snapshot")?;
    let state_before = fs::read(agent.state_dir().join("waypoint/bootstrap-token"))?;
    let server_before =
        vm.docker_ok(["inspect", "-f", "{{.State.StartedAt}}", "waypoint-server"])?;
    let (code, _, stderr) = agent_out(&agent, &vm, &["restore", tampered.to_str().unwrap_or("")])?;
    ensure!(code == 1, "tampered restore exited {code}: {stderr}");
    ensure!(
        stderr.contains("waypoint.snapshot") && stderr.contains("nothing was restored"),
        "{stderr}"
    );
    ensure!(fs::read(agent.state_dir().join("waypoint/bootstrap-token"))? == state_before);
    ensure!(
        vm.docker_ok(["inspect", "-f", "{{.State.StartedAt}}", "waypoint-server"])?
            == server_before,
        "the server was restarted by a refused restore"
    );
    ensure!(
        wp(&vm, &b_bootstrap, &["project", "list"])?
            .status
            .success()
    );

    // The real one.
    let t0 = Instant::now();
    let (code, stdout, stderr) =
        agent_out(&agent, &vm, &["restore", saved.to_str().unwrap_or("")])?;
    let took = t0.elapsed();
    ensure!(code == 0, "restore exited {code}:\n{stdout}\n{stderr}");
    eprintln!("day-two: restore took {took:.2?}:\n{stdout}");
    ensure!(stdout.contains("bootstrap-token"), "{stdout}");
    for secret in [&a_bootstrap, &b_bootstrap]
        .into_iter()
        .chain(a_runner_tokens.iter())
    {
        ensure!(
            !stdout.contains(secret.as_str()) && !stderr.contains(secret.as_str()),
            "a token in restore's output"
        );
    }
    ensure!(token(&agent, "bootstrap-token")? == a_bootstrap);
    ensure!(token(&agent, "runner-1-token")? == a_runner_tokens[0]);
    ensure!(token(&agent, "runner-2-token")? == a_runner_tokens[1]);

    // The Pilot CLI's token from `credentials` works, and sees the project.
    let (code, creds, _) = agent_out(&agent, &vm, &["credentials", "--json"])?;
    ensure!(code == 0);
    let creds: Value = serde_json::from_str(&creds)?;
    let cli_token = creds["waypoint"]["token"]
        .as_str()
        .context("credentials: waypoint.token")?
        .to_string();
    ensure!(
        cli_token == a_bootstrap,
        "credentials hands out the restored token"
    );
    let listed = wp_ok(&vm, &cli_token, &["project", "list"])?;
    ensure!(
        listed.contains("demoapp") && listed.lines().count() == 100,
        "{listed}"
    );
    // The new VM's own token was signed with the key the restore replaced.
    let refused = wp(&vm, &b_bootstrap, &["project", "list"])?;
    ensure!(!refused.status.success(), "the replaced token still works");

    // Both runners run with their old tokens and are connected to the restored server.
    for (i, name) in ["waypoint-runner-1", "waypoint-runner-2"]
        .iter()
        .enumerate()
    {
        let env = vm.docker_ok(["inspect", "-f", "{{json .Config.Env}}", name])?;
        ensure!(
            env.contains(&format!("WAYPOINT_SERVER_TOKEN={}", a_runner_tokens[i])),
            "{name} runs without its restored token"
        );
        poll(
            Duration::from_secs(30),
            &format!("{name} connected"),
            || {
                let s = standin_runner_status(&vm, name).map_err(|e| e.to_string())?;
                Ok((s["server_ok"] == true).then_some(()))
            },
        )?;
    }
    let listed = wp_ok(&vm, &cli_token, &["runner", "list", "-json"])?;
    for i in 1..=2 {
        ensure!(listed.contains(&format!("{HOST}-runner-{i}")), "{listed}");
    }
    let status = agent.status_json()?;
    ensure!(status["condition"] == "healthy", "{status}");
    Ok(())
}

/// A directory outside every VM (the backup outlives the VM it came from), removed when
/// dropped.
struct KeptDir(PathBuf);

impl KeptDir {
    fn new() -> Result<KeptDir> {
        let p = std::env::temp_dir().join(format!("pilot-day-two-{}", std::process::id()));
        fs::create_dir_all(&p)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700))?;
        Ok(KeptDir(p))
    }
}

impl Drop for KeptDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn backups_in(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pilot-backup-") && n.ends_with(".tar"))
        .collect();
    v.sort();
    Ok(v)
}

#[test]
fn scheduled_backups_are_pruned_and_a_full_disk_is_degraded() -> Result<()> {
    require_root()?;
    let (vm, agent) = vm_with_agent(1, |vm| {
        format!(
            "backup:\n  interval_hours: 0.002\n  keep: 2\n  dir: {}\n\
             service:\n  interval_secs: 10\n  database_retry_max_secs: 10\n",
            vm.dir().join("backups").display()
        )
    })?;
    // A small disk of its own for the backups (a stand-in backup is a few kB).
    let dir = vm.dir().join("backups");
    let _tmpfs = pilot_e2e::TmpfsMount::new(&dir, "4m")?;
    let log = vm.dir().join("run.log");
    let mut run = agent.spawn_run(&vm, &log)?;
    let record_path = agent.state_dir().join("backup-last.json");
    let record = || -> Result<Value> { Ok(serde_json::from_slice(&fs::read(&record_path)?)?) };

    // Three backups on the schedule (7.2 s apart, passes at least every 10 s): two kept.
    let mut seen = Vec::new();
    poll(Duration::from_secs(90), "three scheduled backups", || {
        run.ensure_running().map_err(|e| e.to_string())?;
        if let Ok(r) = record()
            && let Some(f) = r["last_ok"]["file"].as_str()
            && seen.last().map(String::as_str) != Some(f)
        {
            seen.push(f.to_string());
        }
        Ok((seen.len() >= 3).then_some(()))
    })?;
    let kept = backups_in(&dir)?;
    ensure!(kept.len() == 2, "kept {kept:?} of {seen:?}");
    let newest = Path::new(&seen[seen.len() - 1])
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    ensure!(
        kept.contains(&newest),
        "the newest backup {newest} is kept: {kept:?}"
    );
    let status = agent.status_json()?;
    let step = status["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "waypoint-backup"))
        .context("a waypoint-backup step")?
        .clone();
    ensure!(
        step["state"] == "ok" || step["state"] == "changed",
        "{step}"
    );

    // Fill the disk: the next backup fails, degraded with the reason; the kept ones stay.
    let filler = dir.join("filler");
    pilot_e2e::fill(&dir)?;
    let degraded = poll(Duration::from_secs(60), "a degraded backup step", || {
        run.ensure_running().map_err(|e| e.to_string())?;
        let s = agent.status_json().map_err(|e| e.to_string())?;
        let step = s["steps"]
            .as_array()
            .and_then(|st| st.iter().find(|x| x["name"] == "waypoint-backup"))
            .cloned()
            .unwrap_or(Value::Null);
        Ok((step["state"] == "degraded").then_some((s, step)))
    })?;
    let detail = degraded.1["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        detail.contains("No space left on device") && detail.contains("earlier backups"),
        "{detail}"
    );
    ensure!(degraded.0["condition"] == "degraded", "{}", degraded.0);
    ensure!(record()?["result"] == "failed");
    ensure!(
        backups_in(&dir)? == kept,
        "a failed backup changed the kept ones"
    );
    let leftovers: Vec<_> = fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "filler" && !n.starts_with("pilot-backup-"))
        .collect();
    ensure!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    eprintln!("day-two: full disk: {detail}");

    // Room again: the next pass backs up and the step recovers.
    fs::remove_file(&filler)?;
    poll(
        Duration::from_secs(60),
        "a backup after the disk was freed",
        || {
            run.ensure_running().map_err(|e| e.to_string())?;
            let r = record().map_err(|e| e.to_string())?;
            Ok((r["result"] == "ok").then_some(()))
        },
    )?;
    ensure!(backups_in(&dir)?.len() == 2);
    let code = run.terminate(Duration::from_secs(30))?;
    ensure!(code.success(), "run exited {code}");
    Ok(())
}

/// The image ID of the running `waypoint-server`.
fn server_image_id(vm: &Vm) -> Result<String> {
    vm.docker_ok(["inspect", "-f", "{{.Image}}", "waypoint-server"])
}

fn step(agent: &Agent, name: &str) -> Result<Value> {
    let s = agent.status_json()?;
    s["steps"]
        .as_array()
        .and_then(|st| st.iter().find(|x| x["name"] == name))
        .cloned()
        .with_context(|| format!("no step {name} in {s}"))
}

/// Counts the running server containers every 50 ms while it lives; `max()` is the most seen
/// at once.
struct ServerCounter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<usize>>,
}

impl ServerCounter {
    fn start(vm: &Vm) -> ServerCounter {
        let host = vm.docker_host();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut max = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(out) = Command::new("docker")
                    .args([
                        "-H",
                        &host,
                        "ps",
                        "-q",
                        "--filter",
                        "label=io.pilot.role=server",
                    ])
                    .output()
                {
                    max = max.max(String::from_utf8_lossy(&out.stdout).lines().count());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        });
        ServerCounter {
            stop,
            handle: Some(handle),
        }
    }

    fn max(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or(usize::MAX)
    }
}

impl Drop for ServerCounter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn set_server_image(agent: &Agent, from: &str, to: &str) -> Result<()> {
    let path = agent.config_path();
    let text = fs::read_to_string(path)?;
    let old = format!("server_image: \"{from}\"");
    ensure!(text.contains(&old), "no `{old}` in the configuration");
    fs::write(
        path,
        text.replacen(&old, &format!("server_image: \"{to}\""), 1),
    )?;
    Ok(())
}

fn runners_online(vm: &Vm, token: &str) -> Result<()> {
    poll(Duration::from_secs(30), "both runners online", || {
        let out = wp_ok(vm, token, &["runner", "list", "-json"]).map_err(|e| e.to_string())?;
        let docs: Vec<Value> = serde_json::Deserializer::from_str(&out)
            .into_iter::<Value>()
            .map_while(Result::ok)
            .collect();
        let online = docs.iter().filter(|d| d["online"] == true).count();
        Ok((online == 2).then_some(()))
    })
}

#[test]
fn upgrades_under_guard_and_rolls_back_an_image_that_never_answers() -> Result<()> {
    let (vm, agent) = vm_with_agent(2, |_| String::new())?;
    agent.up_ok(&vm)?;
    let token = token(&agent, "bootstrap-token")?;
    wp_ok(&vm, &token, &["project", "apply", "demoapp"])?;
    // The next version: the same stand-in under another image ID; and a broken one whose
    // entrypoint never serves (it runs `waypoint version` and exits, restarted forever).
    let tar = vm.dir().join("next-rootfs.tar");
    pilot_harness::standin::write_standin_rootfs_tar(&tar)?;
    vm.import_rootfs(
        &tar,
        "pilot/waypoint:0.11.5",
        &[
            r#"ENTRYPOINT ["/bin/waypoint"]"#,
            "LABEL io.pilot.test=next",
        ],
    )?;
    vm.import_rootfs(
        &tar,
        "pilot/waypoint:broken",
        &[r#"ENTRYPOINT ["/bin/waypoint", "version"]"#],
    )?;
    let first_id = server_image_id(&vm)?;
    let next_id = vm.docker_ok(["image", "inspect", "-f", "{{.Id}}", "pilot/waypoint:0.11.5"])?;
    ensure!(first_id != next_id);

    // A good image: same data, new image, one server throughout.
    set_server_image(&agent, IMAGE, "pilot/waypoint:0.11.5")?;
    let counter = ServerCounter::start(&vm);
    let took = agent.up_ok(&vm)?;
    ensure!(counter.max() == 1, "two servers at once during the upgrade");
    ensure!(
        server_image_id(&vm)? == next_id,
        "the server runs the new image"
    );
    let detail = step(&agent, "waypoint-server")?["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(detail.contains("upgraded the Waypoint server"), "{detail}");
    eprintln!("day-two: good upgrade, `up` {took:.2?}: {detail}");
    ensure!(wp_ok(&vm, &token, &["project", "list"])?.contains("demoapp"));
    runners_online(&vm, &token)?;
    let backups = fs::read_dir(agent.state_dir().join("backups"))?.count();
    ensure!(backups == 1, "a backup before the upgrade: {backups}");

    // An image that never answers: rolled back within the deadline, data intact, error
    // naming the image.
    set_server_image(&agent, "pilot/waypoint:0.11.5", "pilot/waypoint:broken")?;
    let counter = ServerCounter::start(&vm);
    let (out, took) = agent.run(&vm, ["up"])?;
    ensure!(
        counter.max() == 1,
        "two servers at once during the rollback"
    );
    ensure!(
        out.status.code() == Some(1),
        "up after a failed upgrade: {}",
        out.status
    );
    let st = step(&agent, "waypoint-server")?;
    let detail = st["detail"].as_str().unwrap_or_default().to_string();
    ensure!(st["state"] == "error", "{st}");
    ensure!(
        detail.contains("pilot/waypoint:broken") && detail.contains("rolled back"),
        "{detail}"
    );
    ensure!(agent.status_json()?["condition"] == "error");
    eprintln!("day-two: broken upgrade rolled back, `up` {took:.2?}: {detail}");
    if server_image_id(&vm)? != next_id {
        eprintln!(
            "ps: {:?}\nlogs: {:?}\nagent: {}",
            vm.docker_ok(["ps", "-a", "--no-trunc"]),
            vm.docker(["logs", "--tail", "30", "waypoint-server"]),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ensure!(
        server_image_id(&vm)? == next_id,
        "the previous image runs again"
    );
    ensure!(wp_ok(&vm, &token, &["project", "list"])?.contains("demoapp"));
    runners_online(&vm, &token)?;

    // The next pass keeps the previous server and says why; it does not try again.
    let started = vm.docker_ok(["inspect", "-f", "{{.State.StartedAt}}", "waypoint-server"])?;
    let (out, _) = agent.run(&vm, ["up"])?;
    ensure!(out.status.code() == Some(1));
    let detail = step(&agent, "waypoint-server")?["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        detail.contains("stays on") && detail.contains("upgrade-failed"),
        "{detail}"
    );
    ensure!(
        vm.docker_ok(["inspect", "-f", "{{.State.StartedAt}}", "waypoint-server"])? == started,
        "the server was touched again"
    );

    // Back to the good image: healthy, the marker gone.
    set_server_image(&agent, "pilot/waypoint:broken", "pilot/waypoint:0.11.5")?;
    agent.up_ok(&vm)?;
    ensure!(!agent.state_dir().join("waypoint/upgrade-failed").exists());
    Ok(())
}

/// Probes `url` from inside the VM every 50 ms while it lives (curl with the agent's CA);
/// `stop()` returns the longest run of failed probes as a duration and the failure count.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(Duration, usize, usize)>>,
}

impl Prober {
    fn start(vm: &Vm, ca: &Path, resolve: &str, url: &str) -> Prober {
        let template = vm.cmd("curl");
        let program = template.get_program().to_owned();
        let mut args: Vec<std::ffi::OsString> = template.get_args().map(|a| a.to_owned()).collect();
        for a in [
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "0.5",
        ] {
            args.push(a.into());
        }
        args.push("--cacert".into());
        args.push(ca.into());
        args.push("--resolve".into());
        args.push(resolve.into());
        args.push(url.into());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut longest, mut failures, mut probes) = (Duration::ZERO, 0, 0);
            let mut down_since: Option<Instant> = None;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = Command::new(&program)
                    .args(&args)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).starts_with('2'))
                    .unwrap_or(false);
                probes += 1;
                let now = Instant::now();
                match (ok, down_since) {
                    (false, None) => {
                        failures += 1;
                        down_since = Some(now);
                    }
                    (false, Some(_)) => failures += 1,
                    (true, Some(t)) => {
                        longest = longest.max(now - t);
                        down_since = None;
                    }
                    (true, None) => {}
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some(t) = down_since {
                longest = longest.max(t.elapsed());
            }
            (longest, failures, probes)
        });
        Prober {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> (Duration, usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or((Duration::MAX, usize::MAX, 0))
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a rotation did to the Waypoint server.
struct Rotation {
    restarted: bool,
    /// Probes of the container's address on the Pilot network (the runners' path): longest
    /// outage, failures, probes.
    direct: (Duration, usize, usize),
    /// Probes of the published port on the host's loopback (dockerd's proxy).
    published: (Duration, usize, usize),
}

/// Rotates dockerd's certificate (the pki step issues a new one, docker-tls restarts dockerd)
/// while probing the Waypoint server two ways.
fn rotate_and_probe(vm: &Vm, agent: &Agent) -> Result<Rotation> {
    let started = || vm.docker_ok(["inspect", "-f", "{{.State.StartedAt}}", "waypoint-server"]);
    let before = started()?;
    let pid = pilot_e2e::agent::dockerd_pid(vm)?;
    let ip = vm.docker_ok([
        "inspect",
        "-f",
        "{{(index .NetworkSettings.Networks \"pilot\").IPAddress}}",
        "waypoint-server",
    ])?;
    // The certificate names the server `waypoint-server` (how runners dial it) and loopback.
    let direct = Prober::start(
        vm,
        &agent.ca_cert(),
        &format!("waypoint-server:9702:{ip}"),
        "https://waypoint-server:9702/",
    );
    let published = Prober::start(
        vm,
        &agent.ca_cert(),
        "localhost:9702:127.0.0.1",
        "https://127.0.0.1:9702/",
    );
    std::thread::sleep(Duration::from_millis(300));
    fs::remove_file(agent.pki_dir().join("server/cert.pem"))?;
    agent.up_ok(vm)?;
    // The published port answers again (or never stopped) before the outage is measured.
    poll(Duration::from_secs(30), "the server answering", || {
        let out = vm
            .cmd("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "1",
            ])
            .arg("--cacert")
            .arg(agent.ca_cert())
            .arg("https://127.0.0.1:9702/")
            .output()
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .starts_with('2')
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let (direct, published) = (direct.stop(), published.stop());
    ensure!(
        pilot_e2e::agent::dockerd_pid(vm)? != pid,
        "the rotation did not restart dockerd"
    );
    Ok(Rotation {
        restarted: started()? != before,
        direct,
        published,
    })
}

fn report(what: &str, r: &Rotation) {
    eprintln!(
        "day-two: rotation {what}: server container restarted {}; its Pilot-network address: \
         longest outage {:.2?} ({} of {} probes failed); the published port on loopback: \
         longest outage {:.2?} ({} of {} failed)",
        r.restarted,
        r.direct.0,
        r.direct.1,
        r.direct.2,
        r.published.0,
        r.published.1,
        r.published.2
    );
}

#[test]
fn live_restore_keeps_waypoint_running_through_a_certificate_rotation() -> Result<()> {
    let (vm, agent) = vm_with_agent(1, |_| String::new())?;
    agent.up_ok(&vm)?;
    let daemon: Value = serde_json::from_slice(&fs::read(vm.daemon_json())?)?;
    ensure!(daemon["live-restore"] == true, "{daemon}");
    let runner_before =
        vm.docker_ok(["inspect", "-f", "{{.State.StartedAt}}", "waypoint-runner-1"])?;

    let r = rotate_and_probe(&vm, &agent)?;
    report("with live-restore", &r);
    ensure!(
        !r.restarted,
        "with live-restore the server container was restarted"
    );
    ensure!(
        vm.docker_ok(["inspect", "-f", "{{.State.StartedAt}}", "waypoint-runner-1"])?
            == runner_before,
        "with live-restore the runner was restarted"
    );
    // The runners' path never stops; dockerd's userland proxy for the published port on
    // loopback restarts with dockerd (reported, not asserted).
    ensure!(
        r.direct.1 == 0,
        "the server stopped answering on its address during the restart"
    );

    // The control: live-restore off, the same rotation stops and starts the containers.
    agent.edit_config(|t| {
        t.replacen(
            "  ready_timeout_secs: 30\nfirewall:",
            "  ready_timeout_secs: 30\n  live_restore: false\nfirewall:",
            1,
        )
    })?;
    agent.up_ok(&vm)?;
    let daemon: Value = serde_json::from_slice(&fs::read(vm.daemon_json())?)?;
    ensure!(daemon["live-restore"] == false, "{daemon}");
    let r = rotate_and_probe(&vm, &agent)?;
    report("without live-restore", &r);
    ensure!(
        r.restarted,
        "without live-restore the server kept running (the control failed)"
    );
    Ok(())
}
