//! Command dispatch: Waypoint's command words and flags, mapped onto the stand-in's modules.
//! Exit codes follow Waypoint: 0 on success, 1 on any error (including usage errors).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use hyper::Method;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use crate::conn::{self, CONNECTION_FLAGS, ServerConn};
use crate::entrypoint;
use crate::error::{Error, IoContext, Result};
use crate::flags::{self, FlagError, Kind, Parsed, Spec};
use crate::runner::{self, RunnerOptions};
use crate::server::{self, Server, ServerOptions};
use crate::state::{Advertise, new_token};
use crate::{LOG_PREFIX, VERSION_LINE, log};

const USAGE: &str = "\
Usage: waypoint <command> [options]

This is a STAND-IN for HashiCorp Waypoint, built for pilot-agent's tests. It speaks the
command line, ports and bootstrap-once rule that the agent relies on; it is not Waypoint.

Commands:
  server run          run the stand-in server (HTTPS JSON API on the gRPC and HTTP ports)
  server bootstrap    bootstrap the server (only once) and print the token
  server config-set   set the address the server advertises
  token new           create a new token (aliases: user token; runner token makes a runner token)
  runner agent        run a stand-in runner: register with the server, check the Docker API
  entrypoint [--] CMD try the server for at most 5 s, print one JSON line, then exec CMD
                      (also when run as waypoint-entrypoint)
  version             print the version
";

const DEFAULT_DB: &str = "data.db";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

const VERBOSITY_FLAGS: [Spec; 3] = [
    Spec::boolean("v", "verbose logs"),
    Spec::boolean("vv", "more verbose logs"),
    Spec::boolean("vvv", "most verbose logs"),
];

/// Runs the command line `args` as program `program` (argv\[0\]): as the entrypoint when its
/// file name is `waypoint-entrypoint`, as Waypoint's CLI otherwise; returns the exit code.
pub fn main_with_program(program: &str, args: Vec<String>) -> i32 {
    let name = std::path::Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    if name == entrypoint::PROGRAM_NAME {
        entrypoint::main(args)
    } else {
        main_with_args(args)
    }
}

/// Runs the command line `args` (without the program name); returns the exit code.
pub fn main_with_args(args: Vec<String>) -> i32 {
    let words: Vec<&str> = args.iter().take(2).map(String::as_str).collect();
    match words.as_slice() {
        // Before the flag-parsing commands: everything after `entrypoint` is the application's.
        ["entrypoint", ..] => entrypoint::main(args[1..].to_vec()),
        [] => {
            eprint!("{USAGE}");
            1
        }
        ["-h" | "-help" | "--help" | "help", ..] => {
            print!("{USAGE}");
            0
        }
        ["version" | "-version" | "--version" | "-v", ..] => {
            println!("{VERSION_LINE}");
            0
        }
        ["server", "run", ..] => command(&args[2..], "server run", &server_run_specs(), server_run),
        ["server", "bootstrap", ..] => command(
            &args[2..],
            "server bootstrap",
            &client_specs(&[]),
            server_bootstrap,
        ),
        ["server", "config-set", ..] => command(
            &args[2..],
            "server config-set",
            &config_set_specs(),
            config_set,
        ),
        ["token", "new", ..] | ["user", "token", ..] => {
            command(&args[2..], "token new", &client_specs(&[]), |p| {
                new_token_command(p, "login")
            })
        }
        ["runner", "token", ..] => command(&args[2..], "runner token", &client_specs(&[]), |p| {
            new_token_command(p, "runner")
        }),
        ["runner", "agent", ..] => command(
            &args[2..],
            "runner agent",
            &runner_agent_specs(),
            runner_agent,
        ),
        _ => {
            eprintln!("{LOG_PREFIX} unknown command: {}", args.join(" "));
            eprint!("{USAGE}");
            1
        }
    }
}

fn client_specs(extra: &[Spec]) -> Vec<Spec> {
    let mut specs: Vec<Spec> = CONNECTION_FLAGS.to_vec();
    specs.extend_from_slice(extra);
    specs.extend_from_slice(&VERBOSITY_FLAGS);
    specs
}

fn server_run_specs() -> Vec<Spec> {
    let mut specs = vec![
        Spec::boolean(
            "accept-tos",
            "accept the Waypoint URL service terms (required unless -url-enabled=false)",
        ),
        Spec::value(
            "db",
            "path of the state file; its directory is the data dir (default data.db)",
        ),
        Spec::value(
            "listen-grpc",
            "address for the API port, Waypoint's gRPC port (default 127.0.0.1:9701)",
        ),
        Spec::value(
            "listen-http",
            "address for the HTTPS port (default 127.0.0.1:9702)",
        ),
        Spec::value("advertise-addr", "address the server advertises, HOST:PORT"),
        Spec::boolean(
            "advertise-tls",
            "the advertised address speaks tls (default true)",
        ),
        Spec::boolean(
            "advertise-tls-skip-verify",
            "clients of the advertised address skip verification",
        ),
        Spec::value(
            "tls-cert-file",
            "PEM certificate to serve instead of the self-signed one",
        ),
        Spec::value("tls-key-file", "PEM key for -tls-cert-file"),
        Spec::boolean(
            "url-enabled",
            "use the Waypoint URL service (default true; needs -accept-tos)",
        ),
        Spec::ignored("listen-http-insecure", Kind::Value),
        Spec::ignored("disable-ui", Kind::Bool),
        Spec::ignored("url-api-addr", Kind::Value),
        Spec::ignored("url-api-insecure", Kind::Bool),
        Spec::ignored("url-control-addr", Kind::Value),
        Spec::ignored("url-control-token", Kind::Value),
        Spec::ignored("url-auto-app-hostname", Kind::Bool),
        Spec::ignored("telemetry-opencensus-agent-addr", Kind::Value),
        Spec::ignored("telemetry-opencensus-agent-insecure", Kind::Bool),
        Spec::ignored("telemetry-opencensus-zpages-addr", Kind::Value),
        Spec::ignored("telemetry-datadog-trace-addr", Kind::Value),
    ];
    specs.extend_from_slice(&VERBOSITY_FLAGS);
    specs
}

fn config_set_specs() -> Vec<Spec> {
    client_specs(&[
        Spec::value(
            "advertise-addr",
            "address to advertise, HOST:PORT (required)",
        ),
        Spec::boolean(
            "advertise-tls",
            "the advertised address speaks tls (default true)",
        ),
        Spec::boolean(
            "advertise-tls-skip-verify",
            "clients of the advertised address skip verification",
        ),
    ])
}

fn runner_agent_specs() -> Vec<Spec> {
    client_specs(&[
        Spec::value("id", "runner id (default: random)"),
        Spec::value(
            "liveness-tcp-addr",
            "open a TCP listener here for liveness probes",
        ),
        Spec::ignored("cookie", Kind::Value),
        Spec::ignored("enable-dynamic-config", Kind::Bool),
        Spec::ignored("odr", Kind::Bool),
        Spec::ignored("odr-profile-id", Kind::Value),
        Spec::ignored("label", Kind::Value),
        Spec::ignored("state-dir", Kind::Value),
    ])
}

/// Parses flags, handles help and usage errors, then runs `body` in a tokio runtime.
fn command<F, Fut>(args: &[String], name: &str, specs: &[Spec], body: F) -> i32
where
    F: FnOnce(Parsed) -> Fut,
    Fut: Future<Output = Result<i32>>,
{
    let help = || {
        format!(
            "Usage: waypoint {name} [options]   (waypoint STAND-IN)\n\nOptions:\n{}",
            flags::help(specs)
        )
    };
    let parsed = match flags::parse(args, specs) {
        Ok(p) => p,
        Err(FlagError::Help) => {
            print!("{}", help());
            return 0;
        }
        Err(FlagError::Invalid(message)) => {
            eprintln!("{LOG_PREFIX} {message}");
            eprint!("{}", help());
            return 1;
        }
    };
    if !parsed.positional.is_empty() {
        eprintln!(
            "{LOG_PREFIX} unexpected arguments: {}",
            parsed.positional.join(" ")
        );
        eprint!("{}", help());
        return 1;
    }
    let level = if parsed.bool_or("vvv", false) {
        3
    } else if parsed.bool_or("vv", false) {
        2
    } else {
        u8::from(parsed.bool_or("v", false))
    };
    crate::set_verbosity(level);
    for flag in &parsed.ignored {
        log!("{name}: ignoring -{flag} (accepted for compatibility, not modelled by the stand-in)");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{LOG_PREFIX} error: failed to start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(body(parsed)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{LOG_PREFIX} error: {e}");
            1
        }
    }
}

/// Resolves when SIGTERM or SIGINT arrives. Matters most as PID 1 in a container, where the
/// kernel drops SIGTERM unless the process handles it.
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
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

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn advertise_from(parsed: &Parsed) -> Option<Advertise> {
    parsed
        .value("advertise-addr")
        .filter(|a| !a.is_empty())
        .map(|addr| Advertise {
            addr: addr.to_string(),
            tls: parsed.bool_or("advertise-tls", true),
            tls_skip_verify: parsed.bool_or("advertise-tls-skip-verify", false),
        })
}

async fn server_run(parsed: Parsed) -> Result<i32> {
    if parsed.bool_or("url-enabled", true) && !parsed.bool_or("accept-tos", false) {
        // Waypoint refuses to start the URL service without accepted terms; so does the stand-in.
        return Err(Error::Usage(
            "the \"-accept-tos\" flag must be provided to use the Waypoint URL service \
             (or disable it with -url-enabled=false); refusing to start, as Waypoint does"
                .into(),
        ));
    }
    let tls_files = match (parsed.value("tls-cert-file"), parsed.value("tls-key-file")) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        _ => {
            return Err(Error::Usage(
                "-tls-cert-file and -tls-key-file must be given together".into(),
            ));
        }
    };
    let opts = ServerOptions {
        db_path: PathBuf::from(parsed.value("db").unwrap_or(DEFAULT_DB)),
        listen_grpc: parsed
            .value("listen-grpc")
            .unwrap_or("127.0.0.1:9701")
            .to_string(),
        listen_http: parsed
            .value("listen-http")
            .unwrap_or("127.0.0.1:9702")
            .to_string(),
        advertise: advertise_from(&parsed),
        tls_files,
    };
    let shutdown = shutdown_signal()?;
    let server = Server::bind(&opts).await?;
    let grpc = server.grpc_addr()?;
    log!(
        "server: this is a stand-in for Waypoint, not Waypoint; state in {}",
        opts.db_path.display()
    );
    log!("server: grpc listening on {grpc} (tls)");
    log!("server: http listening on {} (tls)", server.http_addr()?);
    if !server.bootstrapped().await {
        log!(
            "server: requires bootstrapping: waypoint server bootstrap -server-addr=127.0.0.1:{} -server-tls-skip-verify",
            grpc.port()
        );
    }
    server.serve(shutdown).await;
    log!("server: stopping on signal");
    Ok(0)
}

fn connect(parsed: &Parsed) -> Result<(ServerConn, crate::client::HttpClient)> {
    let conn = conn::resolve(parsed, &process_env)?;
    let client = conn.client(CLIENT_TIMEOUT)?;
    Ok((conn, client))
}

async fn server_bootstrap(parsed: Parsed) -> Result<i32> {
    let (_conn, client) = connect(&parsed)?;
    let reply = client
        .send(Method::POST, "/v1/bootstrap", None, None)
        .await?;
    match reply.status {
        200 => {
            let token = token_from(&reply.body)?;
            // Only the token on stdout: callers capture it as is.
            println!("{token}");
            Ok(0)
        }
        409 => {
            eprintln!(
                "{LOG_PREFIX} Error bootstrapping the server: {}",
                server::ALREADY_BOOTSTRAPPED
            );
            Ok(1)
        }
        status => {
            eprintln!(
                "{LOG_PREFIX} Error bootstrapping the server: server answered {status}: {}",
                reply.text()
            );
            Ok(1)
        }
    }
}

fn token_from(body: &[u8]) -> Result<String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|source| Error::Json {
        context: "the server's answer is not json".into(),
        source,
    })?;
    value["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Server {
            status: 200,
            message: "the answer carries no token".into(),
        })
}

fn rejected(what: &str, status: u16, text: &str) -> i32 {
    if status == 401 {
        eprintln!(
            "{LOG_PREFIX} Error {what}: the server rejected the token (401 unauthorized): {text}; \
             check WAYPOINT_SERVER_TOKEN or -server-auth-token"
        );
    } else {
        eprintln!("{LOG_PREFIX} Error {what}: server answered {status}: {text}");
    }
    1
}

async fn new_token_command(parsed: Parsed, kind: &str) -> Result<i32> {
    let (conn, client) = connect(&parsed)?;
    let token = conn.require_token()?;
    let body = json!({ "kind": kind }).to_string().into_bytes();
    let reply = client
        .send(Method::POST, "/v1/tokens", Some(token), Some(body))
        .await?;
    if reply.status != 200 {
        return Ok(rejected("creating a token", reply.status, &reply.text()));
    }
    println!("{}", token_from(&reply.body)?);
    Ok(0)
}

async fn config_set(parsed: Parsed) -> Result<i32> {
    let advertise = advertise_from(&parsed)
        .ok_or_else(|| Error::Usage("-advertise-addr=HOST:PORT is required".into()))?;
    let (conn, client) = connect(&parsed)?;
    let token = conn.require_token()?;
    let body = json!({
        "advertise_addr": advertise.addr,
        "advertise_tls": advertise.tls,
        "advertise_tls_skip_verify": advertise.tls_skip_verify,
    });
    let reply = client
        .send(
            Method::POST,
            "/v1/config",
            Some(token),
            Some(body.to_string().into_bytes()),
        )
        .await?;
    if reply.status != 200 {
        return Ok(rejected(
            "setting the server configuration",
            reply.status,
            &reply.text(),
        ));
    }
    println!("Server configuration set!");
    Ok(0)
}

async fn runner_agent(parsed: Parsed) -> Result<i32> {
    let id = match parsed.value("id").filter(|v| !v.is_empty()) {
        Some(id) => id.to_string(),
        None => format!("standin-runner-{}", &new_token()?[..12]),
    };
    if let Some(addr) = parsed.value("liveness-tcp-addr") {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .io_context(|| format!("failed to start the liveness listener on {addr}"))?;
        // As in Waypoint: a connection that opens is the whole probe; close it at once.
        tokio::spawn(async move {
            loop {
                if listener.accept().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
    let opts = RunnerOptions {
        id,
        server: conn::resolve(&parsed, &process_env).map_err(|e| e.to_string()),
        docker_env: runner::docker_env_from_process(),
        status_file: PathBuf::from(
            process_env(runner::ENV_STATUS_FILE)
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| runner::DEFAULT_STATUS_FILE.to_string()),
        ),
    };
    let shutdown = shutdown_signal()?;
    runner::run(opts, shutdown).await?;
    Ok(0)
}
