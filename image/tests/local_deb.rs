//! The agent's Debian package as scripts/build-deb makes it (cargo-deb): its files, control
//! fields and maintainer scripts, read back with dpkg-deb.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn agent_package_has_binary_units_example_man_pages_and_dependencies() -> Result<()> {
    let out = tempfile::tempdir()?;
    let printed = run(
        Command::new(repo().join("scripts/build-deb"))
            .arg(out.path())
            // The test build (CI compiles it anyway); the shipped `dist` build is the same code.
            .env("PILOT_DEB_PROFILE", "release"),
        "scripts/build-deb (needs cargo-deb: scripts/setup.sh)",
    )?;
    let deb = PathBuf::from(printed.lines().last().unwrap_or_default().trim());
    ensure!(
        deb.is_file(),
        "build-deb printed {printed:?}, not a package"
    );
    ensure!(
        out.path().join("pilot-agent.deb").is_file(),
        "no stable pilot-agent.deb link"
    );

    let files = run(Command::new("dpkg-deb").arg("-c").arg(&deb), "dpkg-deb -c")?;
    let has = |path: &str| files.lines().any(|l| l.ends_with(path));
    for path in [
        "./usr/bin/pilot-agent",
        "/lib/systemd/system/pilot-agent.service",
        "/lib/systemd/system/pilot-agent-firewall.service",
        "./usr/share/doc/pilot-agent/examples/agent.yaml",
        "./usr/share/doc/pilot-agent/copyright",
        "./usr/share/man/man8/pilot-agent.8.gz",
        "./usr/share/man/man8/pilot-agent-status.8.gz",
        "./usr/share/man/man8/pilot-agent-run.8.gz",
    ] {
        ensure!(has(path), "{path} missing from the package:\n{files}");
    }
    ensure!(
        !files.contains("pilot-agent-man.8"),
        "the hidden man subcommand got a page"
    );
    let bin = files
        .lines()
        .find(|l| l.ends_with("./usr/bin/pilot-agent"))
        .unwrap_or_default();
    ensure!(
        bin.starts_with("-rwxr-xr-x root/root") || bin.starts_with("-rwxr-xr-x 0/0"),
        "{bin}"
    );

    let field = |name: &str| -> Result<String> {
        Ok(run(
            Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name),
            "dpkg-deb -f",
        )?
        .trim()
        .to_owned())
    };
    ensure!(field("Package")? == "pilot-agent");
    ensure!(field("Architecture")? == "amd64");
    let depends = field("Depends")?;
    for dep in ["docker.io", "nftables", "ca-certificates", "libc6"] {
        ensure!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }
    ensure!(field("Section")? == "admin");

    // Maintainer scripts: the units are enabled on installation, never started by it.
    let ctl = tempfile::tempdir()?;
    run(
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(ctl.path()),
        "dpkg-deb -e",
    )?;
    let postinst = std::fs::read_to_string(ctl.path().join("postinst"))?;
    for unit in ["pilot-agent.service", "pilot-agent-firewall.service"] {
        ensure!(
            postinst.contains(&format!("deb-systemd-helper enable {unit}")),
            "postinst does not enable {unit}:\n{postinst}"
        );
        ensure!(
            !postinst.contains(&format!("deb-systemd-invoke start {unit}"))
                && !postinst.contains(&format!("deb-systemd-invoke $_dh_action {unit}")),
            "postinst starts {unit}:\n{postinst}"
        );
    }
    ensure!(!postinst.contains("#DEBHELPER#"), "token left in postinst");

    // The man page is the clap definition's (gzip, section 8).
    let page = run(
        Command::new("sh").arg("-c").arg(format!(
            "dpkg-deb --fsys-tarfile {} | tar -xOf - ./usr/share/man/man8/pilot-agent.8.gz | gzip -dc",
            deb.display()
        )),
        "extracting the man page",
    )?;
    ensure!(page.contains(".TH PILOT-AGENT 8"), "{page}");
    ensure!(page.contains("status"), "subcommands missing:\n{page}");
    Ok(())
}
