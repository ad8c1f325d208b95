//! What several fuzz targets share: the checks on a configuration (parsed or refused) and the
//! nft listing of a ruleset as `nft -j list table` prints it.

use nftables::schema::Nftables;
use pilot_agent::config::Config;
use pilot_agent::firewall::{self, FirewallSpec, Ruleset};
use serde_json::{Value, json};

/// The command `firewall::parse_listing` names in its errors.
pub const LIST_COMMAND: &str = "nft -j list table inet pilot_agent";

/// Parses `text` as the agent does and checks the answer:
///
/// - refused: at least one diagnostic, each pointing inside the input (its line, and its
///   column within that line);
/// - accepted: the configuration drives the firewall as `up` would: the ruleset is
///   deterministic, and the listing nft would print for it parses and matches it (a host
///   converged with this configuration sees no transaction), and the Docker and Waypoint
///   plans build.
pub fn check_config(text: &str) -> Option<Config> {
    match Config::from_yaml(text) {
        Err(diagnostics) => {
            assert!(!diagnostics.is_empty(), "an error without a diagnostic");
            check_positions(text, &diagnostics);
            None
        }
        Ok(config) => {
            check_accepted(&config);
            Some(config)
        }
    }
}

fn check_positions(text: &str, diagnostics: &[pilot_agent::config::Diagnostic]) {
    // YAML counts a lone CR as a line break too (editors may not): an upper bound.
    let breaks = text.bytes().filter(|b| matches!(b, b'\n' | b'\r')).count();
    for d in diagnostics {
        assert!(
            d.line >= 1 && d.line <= breaks + 2,
            "diagnostic outside the input ({breaks} line breaks): {d}"
        );
        assert!(d.col >= 1, "column 0: {d}");
        if text.contains('\r') {
            continue;
        }
        // The end of a line is a position too (col = chars + 1), and so is the line after
        // the last line break.
        let chars = text
            .split('\n')
            .nth(d.line - 1)
            .map_or(0, |l| l.chars().count());
        assert!(
            d.col <= chars + 1,
            "diagnostic beyond the end of line {} ({chars} characters): {d}",
            d.line
        );
    }
}

fn check_accepted(config: &Config) {
    let spec = FirewallSpec::from_config(config);
    let ruleset = Ruleset::new(&spec);
    assert_eq!(
        ruleset,
        Ruleset::new(&spec),
        "the ruleset is not deterministic"
    );
    let live = firewall::parse_listing(LIST_COMMAND, &listing_json(&ruleset))
        .unwrap_or_else(|e| panic!("the listing of our own ruleset does not parse: {e}"));
    assert!(
        ruleset.matches(&live),
        "the ruleset does not match its own listing"
    );
    let _ = pilot_agent::waypoint::WaypointPlan::from_config(config);
    let _ = pilot_agent::docker::DockerPlan::from_config(config);
    let _ = config.status_path();
    let _ = config.pki_dir();
}

/// What `nft -j list table inet TABLE` prints once `ruleset`'s batch is applied: metainfo,
/// the table, then its chains and rules as list objects, each with a handle (the JSON form of
/// the listing in `agent/src/firewall/ruleset.rs`'s `parses_real_nft_listing`).
pub fn listing_json(ruleset: &Ruleset) -> Vec<u8> {
    let batch: Value = serde_json::to_value(ruleset.batch()).expect("the batch serializes");
    let mut objects = vec![
        json!({"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}),
        json!({"table": {"family": "inet", "name": ruleset.table, "handle": 1}}),
    ];
    let mut handle = 1u64;
    // The first three commands add, delete and add the table itself.
    for cmd in batch["nftables"].as_array().into_iter().flatten().skip(3) {
        let Some(Value::Object(add)) = cmd.get("add") else {
            continue;
        };
        for (kind, obj) in add {
            let mut obj = obj.clone();
            obj["handle"] = json!(handle);
            handle += 1;
            objects.push(json!({ kind: obj }));
        }
    }
    serde_json::to_vec(&json!({ "nftables": objects })).expect("a JSON value serializes")
}

/// Parses `listing` as the agent parses `nft -j list table` output.
pub fn parse_listing(listing: &[u8]) -> Option<Nftables<'static>> {
    firewall::parse_listing(LIST_COMMAND, listing).ok()
}

/// The bearer token of the endpoint targets, and its SHA-256 as the configuration holds it.
pub const ENDPOINT_TOKEN: &[u8] = b"pilot-fuzz-token-0123456789abcdef";
pub const ENDPOINT_TOKEN_SHA256: &str =
    "2d97b86080c7c7564f8364ccc85d5ac63ef7c9e2503849625415b022ca9fa922";

/// What `endpoint::auth::check` must answer for an `Authorization` header, decided without
/// it (RFC 9110: a case-insensitive scheme, then one or more spaces, then the token; the
/// header's own surrounding whitespace is not part of the token).
pub fn expected_auth(
    header: Option<&[u8]>,
) -> Result<(), pilot_agent::endpoint::auth::AuthFailure> {
    use pilot_agent::endpoint::auth::AuthFailure;
    let header = header.ok_or(AuthFailure::Missing)?;
    let Some(space) = header.iter().position(|b| *b == b' ') else {
        return Err(AuthFailure::NotBearer);
    };
    if !header[..space].eq_ignore_ascii_case(b"Bearer") {
        return Err(AuthFailure::NotBearer);
    }
    match header[space..].trim_ascii() {
        [] => Err(AuthFailure::Missing),
        t if t == ENDPOINT_TOKEN => Ok(()),
        _ => Err(AuthFailure::Wrong),
    }
}
