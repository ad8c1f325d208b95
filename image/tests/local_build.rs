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

/// A loopback "mirror" that serves a Release file no apt accepts and nothing else: the
/// build's check passes (the Release file is there), its rootfs step fails inside mmdebstrap,
/// after the temporary directory exists. The listener thread ends with the test process.
fn broken_mirror() -> Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            // Drain the headers.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let response = if path.ends_with("/dists/bookworm/Release") {
                "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nnot a Releas"
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let mut stream = &stream;
            let _ = stream.write_all(response.as_bytes());
        }
    });
    Ok(format!("http://127.0.0.1:{port}/debian"))
}

/// A build that fails after its temporary directory exists: removed by default; with
/// `--on-error=abort` kept under a name the next build's sweep leaves alone, with its logs,
/// and the path printed.
#[test]
fn a_failed_build_is_removed_or_kept_for_inspection() -> Result<()> {
    ensure!(
        unsafe_euid_is_root(),
        "this test needs root (pilot-image build --target local refuses to run without it)"
    );
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let deb = dir.path().join("pilot-agent.deb");
    fs::write(&deb, b"placeholder")?;
    let mirror = broken_mirror()?;
    let cache = dir.path().join("cache");
    let args = |extra: &'static [&'static str]| {
        let mut a = vec![
            "--mirror".to_owned(),
            mirror.clone(),
            "--cache-dir".to_owned(),
            cache.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        build(&a, &out, &deb)
    };

    let o = run(args(&[]));
    let e = stderr(&o);
    ensure!(!o.status.success() && e.contains("[rootfs] FAILED"), "{e}");
    nothing_written(&out)?;

    let o = run(args(&["--on-error", "abort"]));
    let e = stderr(&o);
    ensure!(!o.status.success() && e.contains("[rootfs] FAILED"), "{e}");
    let kept: Vec<_> = fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pilot-image-failed-t-"))
        })
        .collect();
    ensure!(
        kept.len() == 1,
        "expected one kept build in {}: {kept:?}",
        out.display()
    );
    ensure!(
        kept[0].join("logs/rootfs.log").is_file(),
        "the kept build has no rootfs log"
    );
    ensure!(
        e.contains(&format!("rm -rf {}", kept[0].display())),
        "the kept build's path and removal are not printed: {e}"
    );

    // The next build (failing the same way) sweeps stale temporary directories, not this.
    let o = run(args(&[]));
    ensure!(!o.status.success(), "{}", stderr(&o));
    ensure!(kept[0].is_dir(), "a later build removed the kept one");
    Ok(())
}
