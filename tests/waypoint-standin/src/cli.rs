//! Command dispatch, as Waypoint 0.11.4's CLI (mitchellh/cli plus Waypoint's base command)
//! does it, mapped onto the stand-in's modules.
//!
//! - `-v`, `-vv`, `-vvv` are removed from anywhere before `--` and set the log level;
//!   `waypoint -v` alone is the version.
//! - `-h`, `-help`, `--help` anywhere before `--`: the command's help on STDERR, exit 0.
//!   An unknown command: the command list on stderr, exit 127. An unknown word under a known
//!   parent (`waypoint server bogus`): the parent's help, exit 1. Flags before the subcommand:
//!   refused, exit 1.
//! - Each command has exactly Waypoint's flags: the global ones (`-plain`, `-app`/`-a`,
//!   `-project`/`-p`, `-workspace`/`-w`), the connection ones only where Waypoint has them,
//!   then its own. Errors are Go's texts, printed in the error style on STDOUT, exit 1.
//! - Every command then makes sure the CLI directory exists (`$HOME/.config/waypoint`) and
//!   fails otherwise.
//! - Client commands connect like Waypoint (context, environment, flags; a blocking 10 s dial);
//!   those that Waypoint lets spin up an in-memory local server when nothing is configured
//!   (`token new`, `server config-set`, `runner list`, `runner forget`, `server snapshot`,
//!   `server restore`, `project apply`, `project list`, `project inspect`) use a local state
//!   file `data.db` in the working directory instead of failing, as Waypoint does.
//! - Waypoint's deprecation checks run for every command after the flags: a first argument
//!   shaped `project/app`, and `-remote` where the operation flags define it, are refused.
//!
//! The stand-in's own diagnostics stay on stderr, prefixed `waypoint stand-in:`.

use std::future::Future;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

use crate::client::HttpClient;
use crate::conn::{self, CONNECTION_FLAGS, Resolved, ServerConn};
use crate::context::{self, Storage};
use crate::entrypoint;
use crate::error::IoContext;
use crate::flags::{self, Kind, Parsed, Spec};
use crate::project::{self, ApplyOptions, Project};
use crate::runner::{self, RunnerOptions};
use crate::server::{self, Server, ServerOptions, Shared, UrlOptions};
use crate::service::{Code, RpcError};
use crate::state::{Advertise, OpenError};
use crate::{LOG_PREFIX, VERSION_LINE, log, ui};

/// Deadline of one API call once connected (Waypoint sets none; the tarpit is 5 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The URL service control address whose use needs `-accept-tos`.
pub const DEFAULT_URL_CONTROL_ADDR: &str = "https://control.hzn.network";

const GLOBAL_FLAGS: [Spec; 4] = [
    Spec::boolean("plain", false, "Plain output: no colors, no animation."),
    Spec::string("app", "", "App to target.").aliases(&["a"]),
    Spec::string("project", "", "Project to target.").aliases(&["p"]),
    Spec::string("workspace", "", "Workspace to operate in.").aliases(&["w"]),
];

const OPERATION_FLAGS: [Spec; 6] = [
    Spec::new("label", Kind::Map, "Labels to set for this operation.").ignored(),
    Spec::boolean("remote", false, "True to use a remote runner.")
        .hidden()
        .ignored(),
    Spec::boolean("local", false, "True to use a local runner.").ignored(),
    Spec::new(
        "remote-source",
        Kind::Map,
        "Override remote runner data sources.",
    )
    .ignored(),
    Spec::new(
        "var",
        Kind::Map,
        "Variable value to set for this operation.",
    )
    .ignored(),
    Spec::new(
        "var-file",
        Kind::Slice,
        "HCL or JSON file with variable values.",
    )
    .ignored(),
];

fn specs(connection: bool, own: &[Spec]) -> Vec<Spec> {
    let mut all = GLOBAL_FLAGS.to_vec();
    if connection {
        all.extend_from_slice(&CONNECTION_FLAGS);
    }
    all.extend_from_slice(own);
    all
}

/// One command of the table: its words, its flags, its runner.
struct Command {
    key: &'static str,
    synopsis: &'static str,
    usage: &'static str,
    hidden: bool,
    specs: fn() -> Vec<Spec>,
    run: fn(&[String], Parsed, Init) -> i32,
}

fn commands() -> Vec<Command> {
    vec![
        Command {
            key: "server run",
            synopsis: "Run the (stand-in) server",
            usage: "waypoint server run [options]",
            hidden: false,
            specs: server_run_specs,
            run: server_run,
        },
        Command {
            key: "server bootstrap",
            synopsis: "Bootstrap the server and retrieve the initial auth token",
            usage: "waypoint server bootstrap [options]",
            hidden: false,
            specs: || specs(true, &BOOTSTRAP_FLAGS),
            run: server_bootstrap,
        },
        Command {
            key: "server config-set",
            synopsis: "Set the server online configuration",
            usage: "waypoint server config-set [options]",
            hidden: false,
            specs: || specs(false, &CONFIG_SET_FLAGS),
            run: config_set,
        },
        Command {
            key: "server snapshot",
            synopsis: "Write a backup of the server data",
            usage: "waypoint server snapshot [<filename>]",
            hidden: false,
            specs: || specs(false, &[]),
            run: server_snapshot,
        },
        Command {
            key: "server restore",
            synopsis: "Stage a snapshot on the current server for data restoration",
            usage: "waypoint server restore [-exit] [<filename>]",
            hidden: false,
            specs: || specs(false, &RESTORE_FLAGS),
            run: server_restore,
        },
        Command {
            key: "token new",
            synopsis: "Request a new token to access the server (deprecated)",
            usage: "waypoint token new [options]",
            hidden: true,
            specs: || specs(false, &[]),
            run: token_new,
        },
        Command {
            key: "user token",
            synopsis: "Request a new token to access the server",
            usage: "waypoint user token [options]",
            hidden: false,
            specs: || specs(false, &USER_TOKEN_FLAGS),
            run: user_token,
        },
        Command {
            key: "runner token",
            synopsis: "Create a new runner token",
            usage: "waypoint runner token [options]",
            hidden: false,
            specs: || specs(false, &RUNNER_TOKEN_FLAGS),
            run: runner_token,
        },
        Command {
            key: "runner agent",
            synopsis: "Run a runner for executing remote operations",
            usage: "waypoint runner agent [options]",
            hidden: false,
            specs: || specs(false, &RUNNER_AGENT_FLAGS),
            run: runner_agent,
        },
        Command {
            key: "runner list",
            synopsis: "List registered runners",
            usage: "waypoint runner list [options]",
            hidden: false,
            specs: || {
                let mut s = specs(false, &OPERATION_FLAGS);
                s.extend_from_slice(&RUNNER_LIST_FLAGS);
                s
            },
            run: runner_list,
        },
        Command {
            key: "runner forget",
            synopsis: "Forget a previously registered runner",
            usage: "waypoint runner forget [options] ID",
            hidden: false,
            specs: || specs(false, &[]),
            run: runner_forget,
        },
        Command {
            key: "project apply",
            synopsis: "Create or update a project",
            usage: "waypoint project apply [options] NAME",
            hidden: false,
            specs: || specs(false, &PROJECT_APPLY_FLAGS),
            run: project_apply,
        },
        Command {
            key: "project list",
            synopsis: "List all registered projects",
            usage: "waypoint project list",
            hidden: false,
            specs: || {
                let mut s = specs(false, &OPERATION_FLAGS);
                s.extend_from_slice(&PROJECT_LIST_FLAGS);
                s
            },
            run: project_list,
        },
        Command {
            key: "project inspect",
            synopsis: "Inspect the details of a project",
            usage: "waypoint project inspect [project-name]",
            hidden: false,
            specs: || specs(false, &PROJECT_INSPECT_FLAGS),
            run: project_inspect,
        },
        Command {
            key: "version",
            synopsis: "Prints the version of this Waypoint CLI",
            usage: "waypoint version",
            hidden: false,
            specs: || specs(false, &[]),
            run: |_, _, _| {
                println!("{VERSION_LINE}");
                0
            },
        },
    ]
}

/// Parents that only show their subcommands (mitchellh/cli makes them for nested commands).
const PARENTS: &[&str] = &["server", "token", "user", "runner", "project"];

/// Waypoint 0.11.4 commands the stand-in does not model: refused with a clear message
/// (exit 1) rather than the 127 of a command Waypoint does not have.
const UNMODELLED: &[&str] = &[
    "artifact",
    "auth-method",
    "build",
    "config",
    "context",
    "deploy",
    "destroy",
    "docs",
    "exec",
    "fmt",
    "hostname",
    "init",
    "install",
    "job",
    "k8s",
    "login",
    "logs",
    "pipeline",
    "plugin",
    "project destroy",
    "release",
    "status",
    "task",
    "ui",
    "uninstall",
    "up",
    "upgrade",
    "workspace",
    "server install",
    "server uninstall",
    "server upgrade",
    "server config",
    "server config get",
    "runner adopt",
    "runner reject",
    "runner install",
    "runner uninstall",
    "runner inspect",
    "runner profile",
    "runner on-demand",
    "user inspect",
    "user invite",
    "user modify",
    "token exchange",
    "token invite",
];

const USAGE: &str = "\
Usage: waypoint [-version] [-help] [-autocomplete-(un)install] <command> [args]

This is a STAND-IN for HashiCorp Waypoint 0.11.4, built for pilot-agent's tests. It speaks the
command line, ports, tokens and rules that the agent relies on; it is not Waypoint.

Commands modelled:
  server run          run the stand-in server (HTTPS JSON API on the gRPC and HTTP ports)
  server bootstrap    bootstrap the server (once) and print the token
  server config-set   set the address the server advertises
  server snapshot     write a snapshot of the server data
  server restore      stage a snapshot, applied at the next start
  user token          create a login token (token new: the deprecated spelling)
  runner token        create a runner token
  runner agent        run a stand-in runner
  runner list         list the runners the server knows
  runner forget       forget a runner
  project apply       create or update a project (git or local data source)
  project list        list the projects, one name a line
  project inspect     show a project (0.11.4 wants -project/-p even with a NAME)
  entrypoint [--] CMD try the server for at most 5 s, print one JSON line, then exec CMD
                      (also when run as waypoint-entrypoint)
  version             print the version
";

/// Runs the command line `args` as program `program` (argv\[0\]): as the entrypoint when its
/// file name is `waypoint-entrypoint`, as Waypoint's CLI otherwise; returns the exit code.
pub fn main_with_program(program: &str, args: Vec<String>) -> i32 {
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    if name == entrypoint::PROGRAM_NAME {
        entrypoint::main(args)
    } else {
        main_with_args(args)
    }
}

/// Waypoint's `logger()`: removes `-v`, `-vv`, `-vvv` before `--`; returns the level.
pub fn strip_verbosity(args: &[String]) -> (Vec<String>, u8) {
    let mut out = Vec::with_capacity(args.len());
    let mut level = 0u8;
    for (i, arg) in args.iter().enumerate() {
        if arg == "--" {
            out.extend_from_slice(&args[i..]);
            break;
        }
        match arg.as_str() {
            "-v" => level = level.max(1),
            "-vv" => level = level.max(2),
            "-vvv" => level = level.max(3),
            _ => out.push(arg.clone()),
        }
    }
    (out, level)
}

/// mitchellh/cli's reading of the arguments.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dispatch {
    pub help: bool,
    pub version: bool,
    pub subcommand: String,
    pub args: Vec<String>,
    pub top_flags: Vec<String>,
}

/// Finds the help and version flags, the (longest known) subcommand and its arguments.
pub fn dispatch(args: &[String], keys: &[&str]) -> Dispatch {
    let mut d = Dispatch::default();
    let mut found = false;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            break;
        }
        if arg == "-h" || arg == "-help" || arg == "--help" {
            d.help = true;
            i += 1;
            continue;
        }
        if arg == "-autocomplete-install"
            || arg == "--autocomplete-install"
            || arg == "-autocomplete-uninstall"
            || arg == "--autocomplete-uninstall"
        {
            i += 1;
            continue;
        }
        if !found {
            if arg == "-v" || arg == "-version" || arg == "--version" {
                d.version = true;
                i += 1;
                continue;
            }
            if arg.starts_with('-') {
                d.top_flags.push(arg.clone());
            }
        }
        if !found && !arg.is_empty() && !arg.starts_with('-') {
            found = true;
            d.subcommand = arg.clone();
            let search = args[i..].join(" ");
            let best = keys
                .iter()
                .filter(|k| search == **k || search.starts_with(&format!("{k} ")))
                .max_by_key(|k| k.len());
            let mut end = i;
            if let Some(k) = best {
                d.subcommand = k.to_string();
                end = i + k.matches(' ').count();
            }
            d.args = args[(end + 1).min(args.len())..].to_vec();
        }
        i += 1;
    }
    d
}

fn command_help(cmd: &Command) -> String {
    format!(
        "Usage: {}   (waypoint STAND-IN)\n\n  {}.\n\n{}",
        cmd.usage,
        cmd.synopsis,
        flags::help(&(cmd.specs)())
    )
}

fn parent_help(parent: &str, cmds: &[Command]) -> String {
    let mut out = format!(
        "Usage: waypoint {parent} <subcommand> [options] [args]   (waypoint STAND-IN)\n\n  \
         This command is accessed by using one of the subcommands below.\n\nSubcommands:\n"
    );
    for c in cmds.iter().filter(|c| !c.hidden) {
        if let Some(rest) = c.key.strip_prefix(&format!("{parent} ")) {
            out.push_str(&format!("    {rest:<14} {}\n", c.synopsis));
        }
    }
    out
}

/// Runs the command line `args` (without the program name); returns the exit code.
pub fn main_with_args(args: Vec<String>) -> i32 {
    // Before anything else: everything after `entrypoint` is the application's.
    if args.first().map(String::as_str) == Some("entrypoint") {
        return entrypoint::main(args[1..].to_vec());
    }
    let args = if args.len() == 1 && args[0] == "-v" {
        vec!["-version".to_string()]
    } else {
        args
    };
    let (args, level) = strip_verbosity(&args);
    crate::set_verbosity(level);
    let cmds = commands();
    let mut keys: Vec<&str> = cmds.iter().map(|c| c.key).collect();
    keys.extend_from_slice(PARENTS);
    keys.extend_from_slice(UNMODELLED);
    let d = dispatch(&args, &keys);
    if d.version {
        println!("{VERSION_LINE}");
        return 0;
    }
    if d.help && d.subcommand.is_empty() {
        eprint!("{USAGE}");
        return 0;
    }
    let cmd = cmds.iter().find(|c| c.key == d.subcommand);
    let known = cmd.is_some()
        || PARENTS.contains(&d.subcommand.as_str())
        || UNMODELLED.contains(&d.subcommand.as_str());
    if !known {
        eprint!("{USAGE}");
        return 127;
    }
    let help_text = match cmd {
        Some(c) => command_help(c),
        None if PARENTS.contains(&d.subcommand.as_str()) => parent_help(&d.subcommand, &cmds),
        None => format!(
            "`waypoint {}` exists in Waypoint 0.11.4 but is not modelled by the stand-in.\n",
            d.subcommand
        ),
    };
    if d.help {
        eprint!("{help_text}");
        return 0;
    }
    if !d.top_flags.is_empty() {
        eprint!(
            "Invalid flags before the subcommand. If these flags are for\nthe subcommand, \
             please put them after the subcommand.\n\n{help_text}"
        );
        return 1;
    }
    let Some(cmd) = cmd else {
        if !PARENTS.contains(&d.subcommand.as_str()) {
            eprintln!(
                "{LOG_PREFIX} `waypoint {}` exists in Waypoint 0.11.4 but is not modelled by the stand-in",
                d.subcommand
            );
        }
        eprint!("{help_text}");
        return 1;
    };
    let specs = (cmd.specs)();
    let Some((parsed, init)) = init(&d.args, &specs) else {
        return 1;
    };
    (cmd.run)(&d.args, parsed, init)
}

/// What every command's initialisation established.
pub struct Init {
    pub storage: Storage,
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Waypoint's `baseCommand.Init` before the client: flags, flags after positionals, the CLI
/// directory, the workspace from the default context. Prints its errors.
fn init(args: &[String], specs: &[Spec]) -> Option<(Parsed, Init)> {
    let parsed = match flags::parse(args, specs) {
        Ok(p) => p,
        Err(e) => {
            ui::error(&ui::humanize(&e));
            return None;
        }
    };
    if let Err(e) = flags::check_flags_after_args(&parsed.positional, specs) {
        ui::error(&ui::humanize(&e));
        return None;
    }
    if let Err(e) = check_deprecated(&parsed, specs) {
        ui::error(&ui::humanize(&e));
        return None;
    }
    let dir = context::config_dir(&process_env);
    if let Err(e) = context::ensure_config_dir(&dir) {
        ui::error(&ui::humanize(&e));
        return None;
    }
    let storage = Storage::new(&dir);
    if parsed.str("workspace").is_empty()
        && process_env("WAYPOINT_WORKSPACE").is_none_or(|w| w.is_empty())
    {
        let loaded =
            storage
                .default_name()
                .and_then(|n| match n.filter(|n| !n.is_empty() && n != "-") {
                    Some(n) => storage.load(&n).map(|_| ()),
                    None => Ok(()),
                });
        if let Err(e) = loaded {
            ui::error(&ui::humanize(&e));
            return None;
        }
    }
    for flag in &parsed.ignored {
        log!("ignoring -{flag} (accepted as Waypoint does, not modelled by the stand-in)");
    }
    Some((parsed, Init { storage }))
}

/// Waypoint's `errDeprecatedProjectAppArg`.
pub const DEPRECATED_PROJECT_APP_ARG: &str = "\
The project/app argument has been deprecated. Instead, use -project and -app flags, or their
short notation -p and -a.";

/// Waypoint's `checkDeprecatedFlags`: a first positional argument shaped `project/app`
/// (`^[-0-9A-Za-z_]+/[-0-9A-Za-z_]+$`) and a given `-remote` are refused.
pub fn check_deprecated(parsed: &Parsed, specs: &[Spec]) -> Result<(), String> {
    let part = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if let Some((p, a)) = parsed.positional.first().and_then(|a| a.split_once('/'))
        && part(p)
        && part(a)
    {
        return Err(DEPRECATED_PROJECT_APP_ARG.to_string());
    }
    if specs.iter().any(|s| s.name == "remote") && parsed.is_set("remote") {
        return Err(format!(
            "The -remote flag has been deprecated. Use -local={} instead",
            !parsed.bool("remote")
        ));
    }
    Ok(())
}

/// Runs `body` in a tokio runtime.
fn block_on<F: Future<Output = i32>>(body: F) -> i32 {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(body),
        Err(e) => {
            eprintln!("{LOG_PREFIX} error: failed to start the async runtime: {e}");
            1
        }
    }
}

/// Resolves when SIGTERM or SIGINT arrives. Matters most as PID 1 in a container, where the
/// kernel drops SIGTERM unless the process handles it.
fn shutdown_signal() -> crate::error::Result<impl Future<Output = ()>> {
    let mut term =
        signal(SignalKind::terminate()).io_context(|| "failed to handle SIGTERM".into())?;
    let mut int =
        signal(SignalKind::interrupt()).io_context(|| "failed to handle SIGINT".into())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Where a client command's calls go.
enum Backend {
    Remote {
        client: HttpClient,
        token: Option<String>,
    },
    /// Waypoint's in-memory local server (on `data.db` in the working directory).
    Local(Box<Shared>),
}

/// What a call answered.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn error(&self) -> Option<RpcError> {
        (self.status != 200).then(|| runner::rpc_error(self.status, &self.body))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl Backend {
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, RpcError> {
        match self {
            Backend::Remote { client, token } => {
                let target = if query.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}?{query}")
                };
                let reply = client
                    .send(method, &target, token.as_deref(), body)
                    .await
                    .map_err(|e| {
                        RpcError::new(
                            Code::Unavailable,
                            format!("connection error: desc = \"transport: {e}\""),
                        )
                    })?;
                Ok(Answer {
                    status: reply.status,
                    body: reply.body.to_vec(),
                })
            }
            Backend::Local(shared) => {
                let reply = server::route(
                    shared,
                    &method,
                    path,
                    query,
                    None,
                    body.as_deref().unwrap_or_default(),
                )
                .await;
                Ok(Answer {
                    status: reply.status.as_u16(),
                    body: reply.body,
                })
            }
        }
    }
}

/// How a command connects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Local {
    /// No configuration: Waypoint's in-memory local server.
    Allowed,
    /// `WithNoLocalServer`: no configuration is an error.
    Refused,
}

/// The connection part of Waypoint's Init (`initClient`), errors printed as
/// `failed to create client: ...`. Also returns what was resolved (for the bootstrap's
/// context).
async fn connect(
    init: &Init,
    connection_flags: Option<&Parsed>,
    local: Local,
) -> Option<(Backend, Resolved)> {
    let fail = |e: &str| {
        ui::error(&format!("failed to create client: {e}"));
        None
    };
    let resolved = match conn::resolve(Some(&init.storage), &process_env, connection_flags) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if resolved.addr.is_empty() {
        if local == Local::Refused {
            return fail("no server connection configuration found");
        }
        let path = Path::new("data.db");
        log!("no server configured: using an in-memory local server on data.db, as Waypoint does");
        return match Shared::open_local(path) {
            Ok(shared) => Some((Backend::Local(Box::new(shared)), resolved)),
            Err(e) => fail(&format!(
                "failed opening boltdb path data.db. Is another server already running against this db?: {e}"
            )),
        };
    }
    let token = match resolved.token(&process_env) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    if let Err(e) = conn::dial(&resolved.addr, &resolved, conn::DIAL_TIMEOUT).await {
        return fail(&e);
    }
    let client = match ServerConn::new(&resolved, None).and_then(|c| c.client(CALL_TIMEOUT)) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    Some((Backend::Remote { client, token }, resolved))
}

fn server_run_specs() -> Vec<Spec> {
    specs(
        false,
        &[
            Spec::string("db", "", "Path to the database file."),
            Spec::string(
                "listen-grpc",
                "127.0.0.1:9701",
                "Address to bind to for gRPC connections.",
            ),
            Spec::string(
                "listen-http",
                "127.0.0.1:9702",
                "Address to bind to for HTTP connections.",
            ),
            Spec::string(
                "listen-http-insecure",
                "",
                "Address to bind to for plain HTTP connections.",
            )
            .ignored(),
            Spec::string(
                "tls-cert-file",
                "",
                "Path to a PEM-encoded certificate file for TLS.",
            ),
            Spec::string(
                "tls-key-file",
                "",
                "Path to a PEM-encoded private key file for TLS.",
            ),
            Spec::boolean("disable-ui", false, "Disable the embedded web interface."),
            Spec::boolean("url-enabled", true, "Enable the URL service."),
            Spec::boolean("url-inmem", false, "Run an in-memory URL service.")
                .hidden()
                .ignored(),
            Spec::string(
                "url-api-addr",
                "api.waypoint.run:443",
                "Address to the URL service API.",
            ),
            Spec::boolean(
                "url-api-insecure",
                false,
                "True if the URL service API is plaintext.",
            ),
            Spec::string(
                "url-control-addr",
                DEFAULT_URL_CONTROL_ADDR,
                "Address to the URL service control API.",
            ),
            Spec::string(
                "url-control-token",
                "",
                "Token for the URL service control API.",
            ),
            Spec::boolean(
                "url-auto-app-hostname",
                true,
                "Automatically generate hostnames.",
            )
            .ignored(),
            Spec::string("advertise-addr", "", "Address to advertise for the server."),
            Spec::boolean(
                "advertise-tls",
                true,
                "If true, the advertised address speaks TLS.",
            ),
            Spec::boolean(
                "advertise-tls-skip-verify",
                false,
                "Do not verify the advertised TLS certificate.",
            ),
            Spec::boolean(
                "accept-tos",
                false,
                "Pass to accept the URL service terms of service.",
            ),
            Spec::string("telemetry-oc-agent-addr", "", "OpenCensus agent address.").ignored(),
            Spec::boolean(
                "telemetry-oc-agent-insecure",
                false,
                "Plaintext OpenCensus agent.",
            )
            .ignored(),
            Spec::string("telemetry-dd-trace-addr", "", "Datadog trace address.").ignored(),
            Spec::string("telemetry-oc-zpages-addr", "", "OpenCensus zPages address.").ignored(),
        ],
    )
}

fn server_run(_args: &[String], parsed: Parsed, _init: Init) -> i32 {
    let url_enabled = parsed.bool("url-enabled");
    if url_enabled
        && parsed.str("url-control-addr") == DEFAULT_URL_CONTROL_ADDR
        && !parsed.bool("accept-tos")
    {
        ui::error(&ui::wrap(
            "The \"-accept-tos\" flag must be provided to use the Waypoint URL service.\n\
             (waypoint stand-in: Waypoint refuses to start here because the URL service is \
             enabled with its default control address; pass -accept-tos, or disable the URL \
             service with -url-enabled=false.)",
            78,
        ));
        return 1;
    }
    block_on(async move {
        let mut db = parsed.str("db").to_string();
        if db.is_empty() {
            ui::warning(
                "no -db path given: the database is data.db in the current directory \
                 (waypoint stand-in)",
            );
            db = "data.db".into();
        }
        let db_path = PathBuf::from(&db);
        log!("server: this is a stand-in for Waypoint, not Waypoint; state in {db}");
        let shared = match Shared::open(&db_path) {
            Ok(s) => s,
            Err(e) => {
                if let OpenError::Invalid(detail) = &e {
                    log!("server: {detail}");
                }
                ui::error(&format!("Error opening database: {e}"));
                return 1;
            }
        };
        let advertise_addr = parsed.str("advertise-addr");
        if !advertise_addr.is_empty() {
            let adv = Advertise {
                addr: advertise_addr.to_string(),
                tls: parsed.bool("advertise-tls"),
                tls_skip_verify: parsed.bool("advertise-tls-skip-verify"),
            };
            if let Err(e) = shared.set_advertise(adv).await {
                ui::error(&format!("Error initializing server: {e}"));
                return 1;
            }
        }
        let url = UrlOptions {
            enabled: url_enabled,
            api_addr: parsed.str("url-api-addr").to_string(),
            api_insecure: parsed.bool("url-api-insecure"),
        };
        let held = server::init_url_service(&url).await;
        if !held.is_zero() {
            log!(
                "server: the URL service start held the listeners back for {} ms",
                held.as_millis()
            );
        }
        let tls_files = match (parsed.str("tls-cert-file"), parsed.str("tls-key-file")) {
            ("", _) => None,
            (cert, key) => Some((PathBuf::from(cert), PathBuf::from(key))),
        };
        let opts = ServerOptions {
            db_path,
            listen_grpc: parsed.str("listen-grpc").to_string(),
            listen_http: parsed.str("listen-http").to_string(),
            advertise: None,
            tls_files,
            disable_ui: parsed.bool("disable-ui"),
        };
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                ui::error(&format!("Error initializing server: {e}"));
                return 1;
            }
        };
        let server = match Server::bind(shared, &opts).await {
            Ok(s) => s,
            Err(e) => {
                ui::error(&format!("Error starting listener: {e}"));
                return 1;
            }
        };
        let (grpc, http) = match (server.grpc_addr(), server.http_addr()) {
            (Ok(g), Ok(h)) => (g, h),
            _ => {
                ui::error("Error starting listener: cannot read the bound addresses");
                return 1;
            }
        };
        ui::header("Server configuration:");
        ui::output("");
        let url_value = if url.enabled {
            let account = if parsed.str("url-control-token").is_empty() {
                "guest"
            } else {
                "token"
            };
            format!("{} (account: {account})", url.api_addr)
        } else {
            "disabled".to_string()
        };
        ui::named_values(&[
            ("DB Path", db.clone()),
            ("gRPC Address", grpc.to_string()),
            ("HTTP Address", http.to_string()),
            ("Auth Required", "yes".into()),
            (
                "Browser UI Enabled",
                if opts.disable_ui {
                    String::new()
                } else {
                    "yes".into()
                },
            ),
            ("URL Service", url_value),
        ]);
        if !server.bootstrapped().await {
            ui::header("Server requires bootstrapping!");
            ui::output("");
            ui::output(&format!(
                "  A new server must be bootstrapped once to get its first auth token.\n  \
                 Once the server is up, run:\n\n    waypoint server bootstrap \
                 -server-addr={grpc} -server-tls-skip-verify\n"
            ));
            log!(
                "server: requires bootstrapping: waypoint server bootstrap -server-addr=127.0.0.1:{} -server-tls-skip-verify",
                grpc.port()
            );
        }
        ui::header("Server logs:");
        ui::output("");
        log!("server: grpc listening on {grpc} (tls)");
        log!("server: http listening on {http} (tls)");
        let code = server.serve(shutdown).await;
        if code == 0 {
            log!("server: stopping on signal");
        }
        code
    })
}

const BOOTSTRAP_FLAGS: [Spec; 2] = [
    Spec::string(
        "context-create",
        "bootstrap-timestamp",
        "Create a CLI context for this bootstrapped server, named by this value (empty: none).",
    ),
    Spec::boolean(
        "context-set-default",
        true,
        "Set the newly bootstrapped server as the default CLI context.",
    ),
];

const BOOTSTRAP_CONTEXT_FAILED: &str = "The Waypoint server successfully bootstrapped, but creating the context failed.\n\n\
     (waypoint stand-in: the token printed above is the bootstrap token and cannot be had\n\
     again; the CLI context was not written.)";

fn server_bootstrap(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, resolved)) = connect(&init, Some(&parsed), Local::Refused).await else {
            return 1;
        };
        let answer = match backend.call(Method::POST, "/v1/bootstrap", "", None).await {
            Ok(a) => a,
            Err(e) => {
                ui::error(&format!(
                    "Error bootstrapping the server: {}",
                    ui::humanize(&e.message)
                ));
                return 1;
            }
        };
        if let Some(e) = answer.error() {
            ui::error(&format!(
                "Error bootstrapping the server: {}",
                ui::humanize(&e.message)
            ));
            return 1;
        }
        let Some(token) = answer.json()["token"].as_str().map(str::to_string) else {
            ui::error("Error bootstrapping the server: the answer carries no token");
            return 1;
        };
        ui::output(&token);
        let mut name = parsed.str("context-create").to_string();
        if name.is_empty() {
            return 0;
        }
        if name == "bootstrap-timestamp" {
            name = format!(
                "bootstrap-{}",
                time::OffsetDateTime::now_utc().unix_timestamp()
            );
        }
        let cfg = resolved.context_with_token(&token);
        let mut result = init.storage.set(&name, &cfg);
        if result.is_ok() && parsed.bool("context-set-default") {
            result = init.storage.set_default(&name);
        }
        match result {
            Ok(()) => 0,
            Err(e) => {
                ui::error(&format!(
                    "Error setting the CLI context: {}\n\n{BOOTSTRAP_CONTEXT_FAILED}",
                    ui::humanize(&e)
                ));
                1
            }
        }
    })
}

/// A token mint: prints Waypoint's humanized error or returns the token.
async fn mint(backend: &Backend, body: Value) -> Option<String> {
    let answer = match backend
        .call(
            Method::POST,
            "/v1/tokens",
            "",
            Some(body.to_string().into_bytes()),
        )
        .await
    {
        Ok(a) => a,
        Err(e) => {
            ui::error(&ui::humanize(&e.message));
            return None;
        }
    };
    if let Some(e) = answer.error() {
        ui::error(&ui::humanize(&e.message));
        return None;
    }
    match answer.json()["token"].as_str() {
        Some(t) => Some(t.to_string()),
        None => {
            ui::error("the answer carries no token");
            None
        }
    }
}

fn token_new(_args: &[String], _parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Allowed).await else {
            return 1;
        };
        let Some(token) = mint(&backend, json!({ "kind": "login" })).await else {
            return 1;
        };
        eprint!(
            "The \"waypoint token\" commands are deprecated; \"waypoint user token\" replaces \
             \"waypoint token new\". (waypoint stand-in)\n\n"
        );
        println!("{token}");
        0
    })
}

fn duration_ns(parsed: &Parsed, name: &str) -> u64 {
    if parsed.duration_is_negative(name) {
        // Go allows a negative duration; Waypoint then sets no expiry at all.
        return 0;
    }
    u64::try_from(parsed.duration(name).as_nanos()).unwrap_or(u64::MAX)
}

const USER_TOKEN_FLAGS: [Spec; 3] = [
    Spec::new(
        "expires-in",
        Kind::Duration(Duration::from_secs(720 * 3600)),
        "The duration until the token expires. i.e. '5m'.",
    ),
    Spec::string("username", "", "Username to generate the login token for."),
    Spec::boolean("trigger-url-token", false, "Generate a trigger URL token."),
];

fn user_token(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Refused).await else {
            return 1;
        };
        let body = json!({
            "kind": "login",
            "duration_ns": duration_ns(&parsed, "expires-in"),
            "username": parsed.str("username"),
            "trigger": parsed.bool("trigger-url-token"),
        });
        let Some(token) = mint(&backend, body).await else {
            return 1;
        };
        println!("{token}");
        0
    })
}

const RUNNER_TOKEN_FLAGS: [Spec; 3] = [
    Spec::new(
        "expires-in",
        Kind::Duration(Duration::from_secs(720 * 3600)),
        "The duration until the token expires. i.e. '5m'.",
    ),
    Spec::string(
        "id",
        "",
        "Id to restrict this token to. If empty, all runner IDs are valid.",
    ),
    Spec::new(
        "label",
        Kind::Map,
        "Labels that must match the runner (k=v, repeatable).",
    ),
];

fn runner_token(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Refused).await else {
            return 1;
        };
        let body = json!({
            "kind": "runner",
            "duration_ns": duration_ns(&parsed, "expires-in"),
            "id": parsed.str("id"),
            "labels": parsed.map("label"),
        });
        let Some(token) = mint(&backend, body).await else {
            return 1;
        };
        println!("{token}");
        0
    })
}

const CONFIG_SET_FLAGS: [Spec; 3] = [
    Spec::string("advertise-addr", "", "Address to advertise for the server."),
    Spec::boolean(
        "advertise-tls",
        true,
        "If true, the advertised address should be connected to with TLS.",
    ),
    Spec::boolean(
        "advertise-tls-skip-verify",
        false,
        "Do not verify the TLS certificate presented by the server.",
    ),
];

fn config_set(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Allowed).await else {
            return 1;
        };
        ui::header("Modifying server configuration with the following settings:");
        let addr = parsed.str("advertise-addr");
        ui::named_values(&[
            (
                "advertise-addr",
                if addr.is_empty() {
                    "<empty>".into()
                } else {
                    addr.to_string()
                },
            ),
            ("advertise-tls", parsed.bool("advertise-tls").to_string()),
            (
                "advertise-tls-skip-verify",
                parsed.bool("advertise-tls-skip-verify").to_string(),
            ),
        ]);
        let body = json!({
            "advertise_addr": addr,
            "advertise_tls": parsed.bool("advertise-tls"),
            "advertise_tls_skip_verify": parsed.bool("advertise-tls-skip-verify"),
        });
        match backend
            .call(
                Method::POST,
                "/v1/config",
                "",
                Some(body.to_string().into_bytes()),
            )
            .await
        {
            Ok(a) if a.error().is_none() => {
                ui::output("Server configuration set!");
                0
            }
            Ok(a) => {
                ui::error(&ui::humanize(
                    &a.error().map(|e| e.message).unwrap_or_default(),
                ));
                1
            }
            Err(e) => {
                ui::error(&ui::humanize(&e.message));
                1
            }
        }
    })
}

const RUNNER_AGENT_FLAGS: [Spec; 9] = [
    Spec::boolean(
        "enable-dynamic-config",
        false,
        "Allow dynamic config to be created.",
    )
    .ignored(),
    Spec::string(
        "liveness-tcp-addr",
        "",
        "Open a TCP listener here for liveness probes.",
    ),
    Spec::string("id", "", "If this is set, the runner will use this ID."),
    Spec::boolean("odr", false, "Run as an on-demand runner.")
        .hidden()
        .ignored(),
    Spec::string("odr-profile-id", "", "The on-demand runner profile id.")
        .hidden()
        .ignored(),
    Spec::string(
        "cookie",
        "",
        "The cookie value of the server to validate API requests.",
    )
    .env(conn::ENV_COOKIE)
    .ignored(),
    Spec::string("state-dir", "", "Directory to store state.").ignored(),
    Spec::new(
        "label",
        Kind::Map,
        "Labels to set for this runner (k=v, repeatable).",
    ),
    Spec::new(
        "concurrency",
        Kind::Int(0),
        "The number of concurrent jobs that can be running.",
    ),
];

fn new_runner_id() -> String {
    // Waypoint generates a ULID: 26 characters of Crockford base32.
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let bytes = crate::token::random_bytes::<26>().unwrap_or([7; 26]);
    bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % 32] as char)
        .collect()
}

fn runner_agent(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((_, resolved)) = connect(&init, None, Local::Refused).await else {
            return 1;
        };
        let token = match resolved.token(&process_env) {
            Ok(t) => t,
            Err(e) => {
                ui::error(&format!("Error connecting to the Waypoint server: {e}"));
                return 1;
            }
        };
        let server = match ServerConn::new(&resolved, token) {
            Ok(s) => s,
            Err(e) => {
                ui::error(&format!("Error connecting to the Waypoint server: {e}"));
                return 1;
            }
        };
        let mut concurrency = parsed.int("concurrency");
        if concurrency == 0 {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            concurrency = (cpus * 3) as i64;
        }
        if concurrency < 1 {
            log!("runner: concurrency flag less than 1 has no effect, using 1");
        }
        ui::header("Runner configuration:");
        ui::named_values(&[
            ("Server address", resolved.addr.clone()),
            ("Type", "remote".into()),
        ]);
        ui::header("Runner logs:");
        ui::output("");
        let liveness = parsed.str("liveness-tcp-addr");
        if !liveness.is_empty() {
            let listener = match tokio::net::TcpListener::bind(liveness).await {
                Ok(l) => l,
                Err(e) => {
                    ui::error(&format!(
                        "Error starting liveness server: {}",
                        server_listen_error(liveness, &e)
                    ));
                    return 1;
                }
            };
            // As in Waypoint: a connection that opens is the whole probe; close it at once.
            tokio::spawn(async move {
                loop {
                    if listener.accept().await.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
        }
        let id = match parsed.str("id") {
            "" => new_runner_id(),
            id => id.to_string(),
        };
        let opts = RunnerOptions {
            id,
            labels: parsed.map("label").into_iter().collect(),
            server,
            docker_env: runner::docker_env_from_process(),
            status_file: PathBuf::from(
                process_env(runner::ENV_STATUS_FILE)
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| runner::DEFAULT_STATUS_FILE.to_string()),
            ),
        };
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                log!("runner: {e}");
                return 1;
            }
        };
        match runner::run(opts, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                log!("runner: error starting runner: {e}");
                1
            }
        }
    })
}

fn server_listen_error(addr: &str, e: &std::io::Error) -> String {
    format!("listen tcp {addr}: bind: {}", context::go_errno_text(e))
}

const RUNNER_LIST_FLAGS: [Spec; 2] = [
    Spec::boolean("pending", false, "List only runners pending adoption."),
    Spec::boolean(
        "json",
        false,
        "Output runner configuration list information as JSON.",
    ),
];

fn ago(rfc3339: &str) -> String {
    let Ok(t) =
        time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
    else {
        return String::new();
    };
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match secs {
        0 => "now".into(),
        1 => "1 second ago".into(),
        s if s < 60 => format!("{s} seconds ago"),
        s if s < 120 => "1 minute ago".into(),
        s if s < 3600 => format!("{} minutes ago", s / 60),
        s if s < 7200 => "1 hour ago".into(),
        s => format!("{} hours ago", s / 3600),
    }
}

fn runner_list(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Allowed).await else {
            return 1;
        };
        let answer = match backend.call(Method::GET, "/v1/runners", "", None).await {
            Ok(a) => a,
            Err(e) => {
                ui::error(&ui::humanize(&e.message));
                return 1;
            }
        };
        if let Some(e) = answer.error() {
            ui::error(&ui::humanize(&e.message));
            return 1;
        }
        let runners = answer.json()["runners"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if runners.is_empty() {
            ui::output("No runners found");
            return 0;
        }
        if parsed.bool("json") {
            for r in &runners {
                let doc = json!({
                    "id": r["id"],
                    "kind": { "remote": {} },
                    "labels": r["labels"],
                    "firstSeen": r["first_seen"],
                    "lastSeen": r["last_seen"],
                    "adoptionState": r["adoption_state"].as_str().unwrap_or_default().to_uppercase(),
                    "online": r["online"],
                });
                let mut out = Vec::new();
                let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
                let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
                if serde::Serialize::serialize(&doc, &mut ser).is_ok() {
                    println!("{}", String::from_utf8_lossy(&out));
                }
            }
            return 0;
        }
        let mut rows = vec![[
            "ID".to_string(),
            "STATE".into(),
            "KIND".into(),
            "LABELS".into(),
            "LAST REGISTERED".into(),
        ]];
        for r in &runners {
            let labels: String = r["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}:{} ", v.as_str().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            rows.push([
                r["id"].as_str().unwrap_or_default().to_string(),
                r["adoption_state"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_string(),
                "remote".into(),
                labels,
                ago(r["last_seen"].as_str().unwrap_or_default()),
            ]);
        }
        let widths: Vec<usize> = (0..5)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (n, row) in rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!(" {c:<w$} "))
                .collect();
            out.push_str(cells.join("|").trim_end());
            out.push('\n');
            if n == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(w + 2)).collect();
                out.push_str(&rule.join("+"));
                out.push('\n');
            }
        }
        print!("{out}");
        0
    })
}

fn runner_forget(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Allowed).await else {
            return 1;
        };
        if parsed.positional.len() != 1 {
            let cmd = commands().into_iter().find(|c| c.key == "runner forget");
            ui::error(&cmd.map(|c| command_help(&c)).unwrap_or_default());
            return 1;
        }
        let id = parsed.positional[0].clone();
        let body = json!({ "id": id }).to_string().into_bytes();
        match backend
            .call(Method::POST, "/v1/runners/forget", "", Some(body))
            .await
        {
            Ok(a) if a.error().is_none() => {
                ui::output(&format!("Runner {} forgotten.", flags::go_quote(&id)));
                0
            }
            Ok(a) => {
                ui::error(&ui::humanize(
                    &a.error().map(|e| e.message).unwrap_or_default(),
                ));
                1
            }
            Err(e) => {
                ui::error(&ui::humanize(&e.message));
                1
            }
        }
    })
}

/// The help of the command `key`, as Waypoint appends it to some errors.
fn help_of(key: &str) -> String {
    commands()
        .into_iter()
        .find(|c| c.key == key)
        .map(|c| command_help(&c))
        .unwrap_or_default()
}

/// One API call whose refusal (the gRPC status) becomes the error.
async fn call_ok(
    backend: &Backend,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Answer, RpcError> {
    let answer = backend
        .call(method, path, "", body.map(|b| b.to_string().into_bytes()))
        .await?;
    match answer.error() {
        Some(e) => Err(e),
        None => Ok(answer),
    }
}

/// `GetProject`: the project and the names of its workspaces.
async fn fetch_project(backend: &Backend, name: &str) -> Result<(Project, Vec<String>), RpcError> {
    let answer = call_ok(
        backend,
        Method::POST,
        "/v1/projects/get",
        Some(json!({ "project": name })),
    )
    .await?;
    let doc = answer.json();
    let project = serde_json::from_value::<Project>(doc["project"].clone()).map_err(|e| {
        RpcError::new(
            Code::Internal,
            format!("waypoint stand-in: the server's project is unreadable: {e}"),
        )
    })?;
    let workspaces = doc["workspaces"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|w| w["workspace"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok((project, workspaces))
}

const PROJECT_APPLY_FLAGS: [Spec; 16] = [
    Spec::string(
        "from-waypoint-hcl",
        "",
        "waypoint.hcl file to load settings from (refused: the stand-in reads no waypoint.hcl).",
    ),
    Spec::string(
        "waypoint-hcl",
        "",
        "Path to a waypoint.hcl (.hcl or .json) to store with the project.",
    ),
    Spec::string(
        "data-source",
        "",
        "The data source type to use: 'git' or 'local'.",
    ),
    Spec::string("git-url", "", "URL of the Git repository to clone."),
    Spec::string(
        "git-path",
        "",
        "Subdirectory of the repository that holds the project's configuration.",
    ),
    Spec::string("git-ref", "", "Git ref (branch, tag, commit) to clone."),
    Spec::string(
        "git-auth-type",
        "",
        "Authentication type for Git: 'basic' or 'ssh'.",
    ),
    Spec::string(
        "git-username",
        "",
        "Username for 'basic' Git authentication.",
    ),
    Spec::string(
        "git-password",
        "",
        "Password for 'basic' Git authentication.",
    ),
    Spec::string(
        "git-private-key-path",
        "",
        "Path to a PEM-encoded private key for 'ssh' Git authentication.",
    ),
    Spec::string(
        "git-private-key-password",
        "",
        "Password of the private key, if it has one.",
    ),
    Spec::new(
        "git-recurse-submodules",
        Kind::Int(0),
        "Maximum depth of recursive submodule clones (0: none).",
    ),
    Spec::boolean(
        "poll",
        false,
        "Enable polling of the Git data source (stored; not acted upon by the stand-in).",
    ),
    Spec::string("poll-interval", "30s", "Interval between polls."),
    Spec::boolean(
        "app-status-poll",
        false,
        "Enable application status polling (stored; not acted upon by the stand-in).",
    ),
    Spec::string(
        "app-status-poll-interval",
        "5m",
        "Interval between application status polls.",
    ),
];

/// A `*bool` flag: None unless given.
fn bool_ptr(parsed: &Parsed, name: &str) -> Option<bool> {
    parsed.is_set(name).then(|| parsed.bool(name))
}

/// `project apply [options] NAME` (Waypoint's `ProjectApplyCommand`): looks the project up,
/// merges the flags into it (or into a new one) and upserts it, printing its steps as
/// `-> ...` lines. Errors are printed in the error style and exit 1, except an unknown
/// `-data-source` or `-git-auth-type` value, which Waypoint 0.11.4 prints and then goes on.
fn project_apply(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Allowed).await else {
            return 1;
        };
        if parsed.positional.len() != 1 {
            ui::error(&format!(
                "Single argument required.\n\n{}",
                help_of("project apply")
            ));
            return 1;
        }
        let name = parsed.positional[0].clone();
        ui::step(&format!("Checking for an existing project named: {name}"));
        let existing = match fetch_project(&backend, &name).await {
            Ok((p, _)) => Some(p),
            Err(e) if e.code == Code::NotFound => None,
            Err(e) => {
                ui::error(&format!(
                    "Error checking for project: {}",
                    ui::humanize(&e.human_text())
                ));
                return 1;
            }
        };
        let quoted = flags::go_quote(&name);
        let updated = existing.is_some();
        let mut proj = match existing {
            Some(p) => {
                ui::step(&format!("Updating project {quoted}..."));
                p
            }
            None => {
                ui::step(&format!("Creating project {quoted}..."));
                Project {
                    name: name.clone(),
                    ..Project::default()
                }
            }
        };
        let from_hcl = parsed.str("from-waypoint-hcl");
        if !from_hcl.is_empty() {
            ui::error(&format!(
                "Error loading HCL file specified with the -from-waypoint-hcl flag: {}",
                ui::humanize(&format!(
                    "waypoint stand-in: loading {from_hcl} is not modelled (the stand-in reads \
                     no waypoint.hcl; use -data-source and the -git-* flags)"
                ))
            ));
            return 1;
        }
        let opts = ApplyOptions {
            data_source: parsed.str("data-source").to_string(),
            git_url: parsed.str("git-url").to_string(),
            git_path: parsed.str("git-path").to_string(),
            git_ref: parsed.str("git-ref").to_string(),
            git_auth_type: parsed.str("git-auth-type").to_string(),
            git_username: parsed.str("git-username").to_string(),
            git_password: parsed.str("git-password").to_string(),
            git_private_key_path: parsed.str("git-private-key-path").to_string(),
            git_private_key_password: parsed.str("git-private-key-password").to_string(),
            git_recurse_submodules: parsed.int("git-recurse-submodules"),
            poll: bool_ptr(&parsed, "poll"),
            poll_interval: parsed.str("poll-interval").to_string(),
            app_status_poll: bool_ptr(&parsed, "app-status-poll"),
            app_status_poll_interval: parsed.str("app-status-poll-interval").to_string(),
        };
        match project::apply_data_source(&mut proj, &opts, &project::read_file_go) {
            Ok(printed) => {
                for line in printed {
                    ui::error(&line);
                }
            }
            Err(e) => {
                ui::error(&e);
                return 1;
            }
        }
        let hcl = parsed.str("waypoint-hcl");
        if !hcl.is_empty() {
            match project::load_waypoint_hcl(hcl) {
                Ok((bytes, format)) => {
                    if format == project::HclFormat::Hcl {
                        log!("project apply: {hcl} stored without an HCL syntax check");
                    }
                    proj.waypoint_hcl = bytes;
                    proj.waypoint_hcl_format = format;
                }
                Err(e) => {
                    ui::error(&e);
                    return 1;
                }
            }
        }
        let upsert = call_ok(
            &backend,
            Method::POST,
            "/v1/projects",
            Some(json!({ "project": proj })),
        )
        .await;
        if let Err(e) = upsert {
            ui::error(&format!(
                "Error upserting project: {}",
                ui::humanize(&e.human_text())
            ));
            return 1;
        }
        ui::step(&format!(
            "Project {quoted} {}",
            if updated { "updated" } else { "created" }
        ));
        0
    })
}

const PROJECT_LIST_FLAGS: [Spec; 1] = [Spec::boolean(
    "json",
    false,
    "Output the project names as JSON.",
)];

/// `project list` (Waypoint's `ProjectListCommand`): one project a line, sorted, plain on
/// stdout (no table: 0.11.4 prints each name with `ui.Output`), or `No projects found.`.
/// The names are the server's ids, i.e. lower case (`project apply MyApp` lists `myapp`).
/// With `-json`, one tab-indented `{"project": "NAME"}` document per project.
fn project_list(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Allowed).await else {
            return 1;
        };
        let answer = match call_ok(&backend, Method::GET, "/v1/projects", None).await {
            Ok(a) => a,
            Err(e) => {
                ui::error(&ui::humanize(&e.human_text()));
                return 1;
            }
        };
        let mut names: Vec<String> = answer.json()["projects"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|p| p["project"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if parsed.bool("json") {
            for name in &names {
                ui::output(&project::tab_indented_json(&json!({ "project": name })));
            }
            return 0;
        }
        if names.is_empty() {
            ui::output("No projects found.");
            return 0;
        }
        names.sort();
        for name in &names {
            ui::output(name);
        }
        0
    })
}

const PROJECT_INSPECT_FLAGS: [Spec; 1] = [Spec::boolean(
    "json",
    false,
    "Output project information as JSON.",
)];

/// Waypoint's `configpkg.FindPath("", "", true)`: `waypoint.hcl` or `waypoint.hcl.json` in
/// `start` or a parent directory.
fn find_waypoint_hcl(start: &Path) -> Option<PathBuf> {
    start.ancestors().find_map(|dir| {
        ["waypoint.hcl", "waypoint.hcl.json"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
    })
}

/// `project inspect [project-name]` (Waypoint's `ProjectInspectCommand`). Its Init wants a
/// project target, from a waypoint.hcl or `-project`, BEFORE it looks at the argument: in
/// 0.11.4 `project inspect NAME` alone fails with `No project specified, and no waypoint.hcl
/// found.`; `-p NAME` (or `-p X NAME`) works. The stand-in reads no waypoint.hcl and refuses
/// to go on where Waypoint would load one.
fn project_inspect(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    if let Some(found) = find_waypoint_hcl(&cwd) {
        ui::error(&ui::humanize(&format!(
            "waypoint stand-in: Waypoint would load {} here; the stand-in reads no waypoint.hcl",
            found.display()
        )));
        return 1;
    }
    let flag_project = parsed.str("project").to_string();
    if flag_project.is_empty() {
        ui::error("No project specified, and no waypoint.hcl found.");
        return 1;
    }
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Allowed).await else {
            return 1;
        };
        let target = match parsed.positional.as_slice() {
            [] => flag_project,
            [one] => one.clone(),
            _ => {
                ui::error(&format!(
                    "No more than 1 argument required.\n\n{}",
                    help_of("project inspect")
                ));
                return 1;
            }
        };
        let (proj, workspaces) = match fetch_project(&backend, &target).await {
            Ok(x) => x,
            Err(e) => {
                ui::error(&format!(
                    "Failed to format project: {}",
                    ui::humanize(&e.human_text())
                ));
                return 1;
            }
        };
        if parsed.bool("json") {
            ui::output(&project::protojson(&proj));
            return 0;
        }
        ui::header("Project Info:");
        ui::named_values(&project::inspect_rows(&proj, &workspaces));
        0
    })
}

fn stderr_no_newline(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

/// `server snapshot [FILE|-]`. Like Waypoint 0.11.4 it looks at the raw arguments (flags
/// included) for the target, and a FILE is created (exclusively, 0600) but opened without
/// write access, so the first write fails: only stdout works.
fn server_snapshot(args: &[String], _parsed: Parsed, init: Init) -> i32 {
    enum Out {
        Stdout,
        File(String),
    }
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Allowed).await else {
            return 1;
        };
        let out = match args.first() {
            Some(a) if a == "-" => Out::Stdout,
            Some(name) => {
                use std::os::unix::fs::OpenOptionsExt;
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(name)
                {
                    Ok(_) => Out::File(name.clone()),
                    Err(e) => {
                        stderr_no_newline(&format!(
                            "failed to open output: {}",
                            context::go_path_error("open", Path::new(name), &e)
                        ));
                        return 1;
                    }
                }
            }
            None if std::io::stdout().is_terminal() => {
                stderr_no_newline(
                    "failed to open output: stdout is a terminal, refusing to pollute (use '-' to force)",
                );
                return 1;
            }
            None => Out::Stdout,
        };
        let answer = match backend.call(Method::GET, "/v1/snapshot", "", None).await {
            Ok(a) => a,
            Err(e) => {
                stderr_no_newline(&format!(
                    "Error generating Snapshot: failed to generate snapshot: {}",
                    e.go_text()
                ));
                return 1;
            }
        };
        if let Some(e) = answer.error() {
            let inner = format!("failed to receive snapshot start message: {}", e.go_text());
            stderr_no_newline(&format!(
                "Error generating Snapshot: {}",
                RpcError::new(e.code, inner).go_text()
            ));
            return 1;
        }
        match out {
            Out::Stdout => {
                let mut stdout = std::io::stdout().lock();
                if let Err(e) = stdout.write_all(&answer.body).and_then(|()| stdout.flush()) {
                    stderr_no_newline(&format!(
                        "Error generating Snapshot: {}",
                        RpcError::new(
                            Code::Unknown,
                            format!(
                                "error writing snapshot data: write /dev/stdout: {}",
                                context::go_errno_text(&e)
                            )
                        )
                        .go_text()
                    ));
                    return 1;
                }
                0
            }
            Out::File(name) => {
                stderr_no_newline(&format!(
                    "Error generating Snapshot: {}",
                    RpcError::new(
                        Code::Unknown,
                        format!("error writing snapshot data: write {name}: bad file descriptor")
                    )
                    .go_text()
                ));
                1
            }
        }
    })
}

const RESTORE_FLAGS: [Spec; 1] = [Spec::boolean(
    "exit",
    false,
    "After restoring, the server should exit so it can be restarted.",
)];

fn server_restore(_args: &[String], parsed: Parsed, init: Init) -> i32 {
    block_on(async move {
        let Some((backend, _)) = connect(&init, None, Local::Allowed).await else {
            return 1;
        };
        let exit = parsed.bool("exit");
        let (data, from) = match parsed.positional.first() {
            Some(a) if a == "-" => (read_stdin(), None),
            Some(name) => match std::fs::read(name) {
                Ok(d) => (Ok(d), Some(name.clone())),
                Err(e) => {
                    stderr_no_newline(&format!(
                        "failed to open output: {}",
                        context::go_path_error("open", Path::new(name), &e)
                    ));
                    return 1;
                }
            },
            None if std::io::stdin().is_terminal() => {
                stderr_no_newline(
                    "failed to open output: stdin is a terminal, refusing to use (use '-' to force)",
                );
                return 1;
            }
            None => (read_stdin(), None),
        };
        let data = match data {
            Ok(d) => d,
            Err(e) => {
                stderr_no_newline(&format!("Error restoring Snapshot: {e}"));
                return 1;
            }
        };
        let query = if exit { "exit=true" } else { "" };
        let outcome = backend
            .call(Method::POST, "/v1/restore", query, Some(data))
            .await
            .and_then(|a| a.error().map_or(Ok(()), Err));
        if let Err(e) = outcome {
            // With -exit, Waypoint's CLI ignores the error of the closing answer.
            if !exit {
                let inner = format!("failed to receive snapshot close message: {}", e.go_text());
                stderr_no_newline(&format!(
                    "Error restoring Snapshot: {}",
                    RpcError::new(e.code, inner).go_text()
                ));
                return 1;
            }
        }
        match from {
            None => ui::output("Server data restored."),
            Some(name) => ui::output(&format!("Server data restored from '{name}'.")),
        }
        0
    })
}

fn read_stdin() -> Result<Vec<u8>, String> {
    let mut data = Vec::new();
    std::io::stdin()
        .read_to_end(&mut data)
        .map(|_| data)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn verbosity_is_stripped_before_double_dash_only() {
        let (args, level) = strip_verbosity(&v(&["-vv", "runner", "agent", "-v", "--", "-vvv"]));
        assert_eq!(args, v(&["runner", "agent", "--", "-vvv"]));
        assert_eq!(level, 2);
    }

    #[test]
    fn dispatch_finds_the_longest_command_help_version_and_top_flags() {
        let keys = ["server", "server run", "runner", "runner token", "version"];
        let d = dispatch(&v(&["server", "run", "-db=x"]), &keys);
        assert_eq!(
            (d.subcommand.as_str(), d.args.clone()),
            ("server run", v(&["-db=x"]))
        );
        let d = dispatch(&v(&["server", "runx"]), &keys);
        assert_eq!(
            (d.subcommand.as_str(), d.args.clone()),
            ("server", v(&["runx"]))
        );
        let d = dispatch(&v(&["runner", "token", "-id", "-h"]), &keys);
        assert!(d.help);
        let d = dispatch(&v(&["-plain", "runner", "token"]), &keys);
        assert_eq!(d.top_flags, v(&["-plain"]));
        assert!(dispatch(&v(&["-version"]), &keys).version);
        let d = dispatch(&v(&["runner", "token", "--", "-h"]), &keys);
        assert!(!d.help, "after -- nothing is a help flag");
        assert_eq!(
            dispatch(&v(&["frobnicate"]), &keys).subcommand,
            "frobnicate"
        );
    }

    fn spec_names(key: &str) -> Vec<&'static str> {
        let cmd = commands().into_iter().find(|c| c.key == key).unwrap();
        (cmd.specs)().iter().map(|s| s.name).collect()
    }

    #[test]
    fn project_commands_have_waypoints_flag_sets() {
        let global = ["plain", "app", "project", "workspace"];
        let mut apply: Vec<&str> = global.to_vec();
        apply.extend([
            "from-waypoint-hcl",
            "waypoint-hcl",
            "data-source",
            "git-url",
            "git-path",
            "git-ref",
            "git-auth-type",
            "git-username",
            "git-password",
            "git-private-key-path",
            "git-private-key-password",
            "git-recurse-submodules",
            "poll",
            "poll-interval",
            "app-status-poll",
            "app-status-poll-interval",
        ]);
        assert_eq!(spec_names("project apply"), apply);
        let mut list: Vec<&str> = global.to_vec();
        list.extend([
            "label",
            "remote",
            "local",
            "remote-source",
            "var",
            "var-file",
            "json",
        ]);
        assert_eq!(spec_names("project list"), list);
        let mut inspect: Vec<&str> = global.to_vec();
        inspect.push("json");
        assert_eq!(spec_names("project inspect"), inspect);
        assert!(PARENTS.contains(&"project"));
        assert!(!UNMODELLED.contains(&"project"));
        assert!(UNMODELLED.contains(&"project destroy"));
    }

    #[test]
    fn deprecated_project_app_arguments_and_remote_are_refused() {
        let specs = specs(false, &OPERATION_FLAGS);
        let p = |list: &[&str]| flags::parse_with_env(&v(list), &specs, &|_| None).unwrap();
        assert_eq!(
            check_deprecated(&p(&["web/app"]), &specs),
            Err(DEPRECATED_PROJECT_APP_ARG.to_string())
        );
        for fine in [
            &["web"][..],
            &["a/b/c"],
            &["a/"],
            &["a.b/c"],
            &["x", "a/b"],
            &[],
        ] {
            assert_eq!(check_deprecated(&p(fine), &specs), Ok(()), "{fine:?}");
        }
        assert_eq!(
            check_deprecated(&p(&["-remote"]), &specs).unwrap_err(),
            "The -remote flag has been deprecated. Use -local=false instead"
        );
        assert_eq!(
            check_deprecated(&p(&["-remote=false"]), &specs).unwrap_err(),
            "The -remote flag has been deprecated. Use -local=true instead"
        );
        assert_eq!(check_deprecated(&p(&["-local"]), &specs), Ok(()));
    }

    #[test]
    fn finds_waypoint_hcl_in_parents_like_waypoint() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        assert_eq!(find_waypoint_hcl(&sub), None);
        std::fs::write(dir.path().join("a/waypoint.hcl.json"), b"{}").unwrap();
        assert_eq!(
            find_waypoint_hcl(&sub),
            Some(dir.path().join("a/waypoint.hcl.json"))
        );
    }

    #[test]
    fn every_command_has_the_global_flags_and_connection_flags_only_on_bootstrap() {
        for cmd in commands() {
            let specs = (cmd.specs)();
            for name in ["plain", "app", "project", "workspace"] {
                assert!(
                    specs.iter().any(|s| s.name == name),
                    "{} lacks -{name}",
                    cmd.key
                );
            }
            let has_conn = specs.iter().any(|s| s.name == "server-addr");
            assert_eq!(has_conn, cmd.key == "server bootstrap", "{}", cmd.key);
            for absent in ["server-auth-token", "server-require-auth"] {
                assert!(
                    !specs.iter().any(|s| s.name == absent),
                    "{} has -{absent}",
                    cmd.key
                );
            }
        }
    }
}
