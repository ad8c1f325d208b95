//! Fuzz target: the Waypoint output the agent parses: the bootstrap container's exit code and
//! logs (`waypoint::bootstrap::outcome`), `waypoint runner token`'s (`waypoint::runners::
//! mint_outcome`, on a server VM and on a runner-only host) and the token reader behind both
//! (`waypoint::token_from_output`). Any output must give a token or an error, never panic. A
//! token is the last non-blank line, trimmed, at least 16 bytes, without whitespace, from a
//! command that exited 0 (a failed bootstrap keeps a token it printed before failing, never
//! one from an "already bootstrapped" answer); when such a command printed no recognisable
//! token, its error is the same whatever it printed (its output may hold a token and is never
//! shown); "already bootstrapped" is the lost-token error; a token Waypoint rejects (its own texts:
//! `pkg/server/auth.go`) is reported as such, and other words are a plain failure.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pilot_agent::config::{Config, Role, WaypointConfig};
use pilot_agent::waypoint::bootstrap::{self, Outcome};
use pilot_agent::waypoint::containers::ExecOutput;
use pilot_agent::waypoint::runners::mint_outcome;
use pilot_agent::waypoint::{WaypointError, WaypointPlan, token_from_output};

#[derive(Arbitrary, Debug)]
enum Line {
    Token,
    ShortToken,
    Banner,
    Already,
    /// Waypoint 0.11.4's own authentication failures (pkg/server/auth.go).
    NoToken,
    InvalidToken,
    /// Words that are not Waypoint's (the agent once looked for them): a plain failure.
    Unauthorized,
    Blank(u8),
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct Output {
    lines: Vec<Line>,
    crlf: bool,
    trailing_newline: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    exit_code: Option<i64>,
    exit_zero: bool,
    stdout: Output,
    stderr: Output,
    runner_host: bool,
}

fn text(o: &Output) -> String {
    let lines: Vec<String> = o
        .lines
        .iter()
        .map(|l| match l {
            Line::Token => "  s.b4d8e0f1a2c3d4e5f60718293a4b5c6d7e8f9  ".into(),
            Line::ShortToken => "tok_0123456789".into(),
            Line::Banner => "Bootstrapping the server...".into(),
            Line::Already => "! server is already bootstrapped".into(),
            Line::NoToken => "! Authorization token is not supplied".into(),
            Line::InvalidToken => "! bad token signature: invalid authentication token".into(),
            Line::Unauthorized => {
                "Error: rpc error: code = Unauthenticated desc = 401 Unauthorized".into()
            }
            Line::Blank(n) => " \t".repeat(usize::from(n % 3)),
            Line::Text(s) => s.clone(),
        })
        .collect();
    let mut t = lines.join(if o.crlf { "\r\n" } else { "\n" });
    if o.trailing_newline {
        t.push('\n');
    }
    t
}

fn plan(runner_host: bool) -> WaypointPlan {
    let config = Config {
        role: if runner_host {
            Role::Runner
        } else {
            Role::Server
        },
        waypoint: Some(WaypointConfig::default()),
        ..Config::default()
    };
    WaypointPlan::from_config(&config).expect("a plan with a waypoint section")
}

fn shown(e: &WaypointError) -> String {
    format!("{e} / {e:?}")
}

fuzz_target!(|input: Input| {
    let stdout = text(&input.stdout);
    let stderr = text(&input.stderr);
    let exit_code = if input.exit_zero {
        Some(0)
    } else {
        input.exit_code
    };
    let plan = plan(input.runner_host);

    let token = token_from_output(&stdout);
    if let Some(t) = &token {
        assert!(
            t.len() >= 16 && !t.contains(char::is_whitespace),
            "token {t:?}"
        );
        let last = stdout.lines().map(str::trim).rfind(|l| !l.is_empty());
        assert_eq!(Some(t.as_str()), last, "not the last non-blank line");
    }

    // The bootstrap (only on a server VM).
    let silent = |code| match bootstrap::outcome(&plan, code, "", "") {
        Outcome::Unrecognised(e) | Outcome::Failed(e) => shown(&e),
        Outcome::Token(t) => panic!("a token from no output: {t:?}"),
    };
    match bootstrap::outcome(&plan, exit_code, &stdout, &stderr) {
        Outcome::Token(t) if exit_code == Some(0) => assert_eq!(Some(t), token),
        Outcome::Token(t) => {
            // Waypoint prints the token, then may fail writing its CLI context (exit 1): the
            // token printed is kept, as the server is bootstrapped and this is its only copy.
            // Never from an "already bootstrapped" answer, and only a line it printed.
            assert!(
                !stdout.contains(bootstrap::ALREADY_BOOTSTRAPPED)
                    && !stderr.contains(bootstrap::ALREADY_BOOTSTRAPPED),
                "a token from an already bootstrapped server"
            );
            assert!(
                t.len() >= 16 && stdout.lines().any(|l| l.trim() == t),
                "kept {t:?}, which is not a line of its output"
            );
        }
        Outcome::Unrecognised(e) => {
            assert_eq!(exit_code, Some(0));
            assert!(token.is_none());
            assert_eq!(shown(&e), silent(Some(0)), "the error shows the output");
        }
        Outcome::Failed(e) => {
            assert_ne!(exit_code, Some(0));
            let already = stdout.contains(bootstrap::ALREADY_BOOTSTRAPPED)
                || stderr.contains(bootstrap::ALREADY_BOOTSTRAPPED);
            assert_eq!(matches!(e, WaypointError::TokenLost { .. }), already, "{e}");
            if let WaypointError::Command { output, .. } = &e {
                // The last lines, joined: one line in the step's status.
                assert!(!output.contains('\n'), "{output:?}");
            }
        }
    }

    // Minting a runner token.
    let out = ExecOutput {
        exit_code,
        stdout: stdout.clone(),
        stderr: stderr.clone(),
    };
    let quiet = ExecOutput {
        exit_code,
        stdout: String::new(),
        stderr: String::new(),
    };
    match mint_outcome(&plan, &out) {
        Ok(t) => {
            assert_eq!(exit_code, Some(0), "a token from a failed command");
            assert_eq!(Some(t), token);
        }
        Err(e) if exit_code == Some(0) => {
            assert!(token.is_none());
            let silent = mint_outcome(&plan, &quiet).expect_err("a token from no output");
            assert_eq!(shown(&e), shown(&silent), "the error shows the output");
        }
        Err(e) => {
            // Waypoint's texts for a missing or bad token, as it prints them (mixed case).
            let all = format!("{} {}", stdout.trim(), stderr.trim());
            let rejected = [
                "Authorization token is not supplied",
                "invalid authentication token",
                "failed to base58 decode token",
                "Failed to decode authentication token",
            ]
            .iter()
            .any(|w| all.contains(w));
            assert_eq!(
                matches!(e, WaypointError::TokenRejected { .. }),
                rejected,
                "{e}"
            );
        }
    }
});
