//! `waypoint`: the Waypoint STAND-IN binary (see the library docs). Thin edge: all logic is in
//! the library so the tests can use it.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(waypoint_standin::cli::main_with_args(args));
}
