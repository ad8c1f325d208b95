//! `pilot-image build --target local` refuses bad inputs before making anything, with errors
//! that say what is wrong, and leaves nothing at the output path. (The full build and boot:
//! local_boot.rs.)

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Result, ensure};

fn build(args: &[&str], out_dir: &Path, agent_deb: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pilot-image"))
        .args(["build", "--target", "local", "--name", "t"])
        .arg("--output-dir")
        .arg(out_dir)
        .arg("--agent-deb")
        .arg(agent_deb)
        .args(args)
        .output()
        .expect("cannot run pilot-image")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn nothing_written(out_dir: &Path) -> Result<()> {
    if let Ok(rd) = fs::read_dir(out_dir) {
        let names: Vec<_> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ensure!(names.is_empty(), "left in the output directory: {names:?}");
    }
    Ok(())
}

#[test]
fn bad_inputs_get_clear_errors_and_no_output() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let deb = dir.path().join("pilot-agent.deb");
    fs::write(&deb, b"placeholder")?;

    // Unknown format, on the command line and in a definition file (with its line).
    let o = build(&["--format", "vmdk"], &out, &deb);
    ensure!(
        !o.status.success() && stderr(&o).contains("vmdk"),
        "{}",
        stderr(&o)
    );
    let def = dir.path().join("def.yaml");
    fs::write(&def, "suite: bookworm\nformats: [qcow2, vmdk]\n")?;
    let o = build(&["--file", def.to_str().unwrap_or_default()], &out, &deb);
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("vmdk") && e.contains("line 2"),
        "{e}"
    );

    // A missing agent package.
    let o = build(&["--dry-run"], &out, &dir.path().join("absent.deb"));
    ensure!(
        stderr(&o).contains("agent package not found"),
        "{}",
        stderr(&o)
    );

    // Not a docker-save archive.
    let bogus = dir.path().join("bogus.tar");
    fs::write(&bogus, vec![0u8; 2048])?;
    let o = build(
        &["--dry-run", "--image", bogus.to_str().unwrap_or_default()],
        &out,
        &deb,
    );
    ensure!(stderr(&o).contains("manifest.json"), "{}", stderr(&o));

    // An unreachable mirror (loopback port with nothing listening), with an empty cache so
    // the mirror is needed.
    let cache = dir.path().join("cache");
    let o = build(
        &[
            "--mirror",
            "http://127.0.0.1:9/debian",
            "--cache-dir",
            cache.to_str().unwrap_or_default(),
        ],
        &out,
        &deb,
    );
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("mirror http://127.0.0.1:9/debian is unusable"),
        "{e}"
    );
    nothing_written(&out)?;
    Ok(())
}

/// Too little free space: the output directory on a 64 MiB tmpfs, mounted in a private mount
/// namespace of the command (gone with it).
#[test]
fn not_enough_free_space_is_refused_before_starting() -> Result<()> {
    ensure!(
        unsafe_euid_is_root(),
        "this test needs root (a tmpfs in a private mount namespace)"
    );
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("small");
    fs::create_dir_all(&out)?;
    let deb = dir.path().join("pilot-agent.deb");
    fs::write(&deb, b"placeholder")?;
    let script = format!(
        "mount -t tmpfs -o size=64m tmpfs {out} && exec {bin} build --target local --name t \
         --output-dir {out} --agent-deb {deb}",
        out = out.display(),
        bin = env!("CARGO_BIN_EXE_pilot-image"),
        deb = deb.display()
    );
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()?;
    let e = stderr(&o);
    ensure!(
        !o.status.success() && e.contains("not enough free space in") && e.contains("MiB"),
        "{e}"
    );
    nothing_written(&out)?;
    Ok(())
}

fn unsafe_euid_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
