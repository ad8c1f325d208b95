//! `waypoint`: the Waypoint STAND-IN binary (see the library docs). Thin edge: all logic is in
//! the library so the tests can use it.

fn main() {
    let mut argv = std::env::args();
    // argv[0] picks the personality: `waypoint-entrypoint` is the entrypoint.
    let program = argv.next().unwrap_or_default();
    let args: Vec<String> = argv.collect();
    std::process::exit(waypoint_standin::cli::main_with_program(&program, args));
}
