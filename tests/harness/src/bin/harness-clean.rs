//! `harness-clean`: removes what killed test runs of the harness left behind (run it through
//! `scripts/harness-clean`, which builds it first). Only argument parsing lives here; the
//! work is `pilot_harness::clean`.

use std::process::ExitCode;

use pilot_harness::clean::{self, Options};

const USAGE: &str = "\
Removes what killed or crashed test runs of the pilot-harness (tests/harness) left behind:
processes, mounts, cgroups, network namespaces (and with them their veths), host links and
directories. It touches only harness-named things:
  - names: pv<N> (a simulated VM), pv<N>-o / pv<N>-db / pv<N>-uts (its outside namespace,
    database host, hostname holder), pvm<PORT> (a moto server), pvp<PORT> (a PostgreSQL on
    127.0.0.1);
  - processes carrying PILOT_HARNESS_OWNER=<name> in their environment, a harness path
    (/run/pilot-harness/<name>/) or name (pilot-harness-<name>) in their command line or
    cgroup, living in a harness network namespace, or recorded in /run/pilot-harness/<name>/record
    (killed only if their command line still contains the recorded marker);
  - mounts below /run/pilot-harness/<name>/, cgroups named pilot-harness-<name>, namespaces
    /run/netns/<name>, links named <name> in the host namespace, /run/pilot-harness/<name>/.
Objects whose owning test process still runs (per their record) are left alone unless --all.

Usage: scripts/harness-clean [--all] [--check [--skip-live]] [-q]
  --check      only report leftovers (of any owner); exit 1 if there are some
  --skip-live  with --check: ignore objects whose owner still runs
  --all        also remove objects whose owner still runs (never while a suite is running)
  -q           quiet: print only what was removed or is left
Idempotent; needs root. Exit 0 when nothing harness-named is left (of the objects considered).
";

fn main() -> ExitCode {
    let mut options = Options::default();
    for arg in std::env::args_os().skip(1) {
        let arg = arg.to_string_lossy();
        match arg.as_ref() {
            "--check" => options.check = true,
            "--all" => options.all = true,
            "--skip-live" => options.skip_live = true,
            "-q" => options.quiet = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("harness-clean: unknown argument {arg} (see --help)");
                return ExitCode::from(2);
            }
        }
    }
    ExitCode::from(clean::run(&options))
}
