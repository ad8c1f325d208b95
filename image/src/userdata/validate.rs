//! The checks on single values, each a small pure function: the value in, the value to use (or
//! nothing) out, or the reason it is refused, without the flag (the caller, [`super::spec`],
//! names the flag). The rules are the agent's own, from `pilot-values`: a value is valid here
//! exactly when the agent accepts it for the same key (`image/tests/grammar.rs`).

use super::input::Role;

/// The agent's own bound on `waypoint.runners`.
pub use pilot_values::MAX_RUNNERS;

/// Flags that only one role uses: a runner-only host has no database (the server VM
/// provisions it) and no Waypoint server (nothing to advertise or admit); a server VM has no
/// server VM to reach. `given` lists every role-specific flag of `role`'s other role with
/// whether it was given; the first given one is refused, as `(flag, reason)`.
pub fn check_role_flags(
    role: Role,
    given: &[(&'static str, bool)],
) -> Result<(), (&'static str, &'static str)> {
    match (role, given.iter().find(|(_, g)| *g)) {
        (_, None) => Ok(()),
        (Role::Runner, Some((flag, _))) if flag.starts_with("--db-") => Err((
            *flag,
            "not used with --role runner: the server VM provisions the database",
        )),
        (Role::Runner, Some((flag, _))) => Err((
            *flag,
            "not used with --role runner: a runner-only host runs no Waypoint server \
             (set it on the server VM)",
        )),
        (Role::Server, Some((flag, _))) => Err((
            *flag,
            "used only with --role runner (the server VM a runner-only host registers with)",
        )),
    }
}

/// `waypoint.runners`: 0 to [`MAX_RUNNERS`], and at least 1 on a runner-only host.
pub fn check_runners(runners: u32, role: Role) -> Result<(), String> {
    if runners > MAX_RUNNERS {
        return Err(format!("must be 0 to {MAX_RUNNERS}, got {runners}"));
    }
    if runners == 0 && role == Role::Runner {
        return Err(
            "must be 1 or more with --role runner (a runner-only host without runners does nothing)"
                .into(),
        );
    }
    Ok(())
}

/// A host of `host.extra_names` or `database.host`: an IP address or a DNS name.
pub fn check_dns_name_or_ip(s: &str) -> Result<(), String> {
    pilot_values::check_host(s)
}

/// `database.port`: 1 to 65535.
pub fn check_port(port: u32) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("must be 1 to 65535, got {port}")),
    }
}

/// `database.admin_user`: a PostgreSQL role name that is not truncated, without control
/// characters.
pub fn check_pg_name(name: &str) -> Result<(), String> {
    pilot_values::pg_role_name(name)
}

/// The agent package's URL: HTTPS only (the package runs as root, so a tampered download
/// would own the VM), with a host, without spaces or control characters.
pub fn check_https_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!("expected an https:// URL, got {url:?}"));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("no host in {url:?}"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "must not contain spaces or control characters: {url:?}"
        ));
    }
    Ok(())
}

/// `waypoint.advertise_address`: `auto` (the agent's default) or `HOST[:PORT]`.
pub fn check_advertise_address(s: &str) -> Result<(), String> {
    if s == "auto" {
        return Ok(());
    }
    check_host_port(s)
}

/// `server.ca_sha256`: a SHA-256 fingerprint (see [`normalize_fingerprint`]), in the form
/// `openssl x509 -fingerprint -sha256` prints.
pub fn check_fingerprint(s: &str) -> Result<String, String> {
    normalize_fingerprint(s).ok_or_else(|| {
        format!(
            "expected a SHA-256 fingerprint: 64 hex digits, together or in 32 pairs \
             separated by ':', got {s:?}"
        )
    })
}

/// The content of a one-line secret file, by the agent's rule for them
/// ([`pilot_values::secret::secret_from_line`]). The reason completes "<file> ...".
pub fn one_line(bytes: Vec<u8>) -> Result<String, &'static str> {
    use pilot_values::secret::{SecretLineError, secret_from_line};
    match secret_from_line(&bytes) {
        Ok(secret) => Ok(secret.expose().to_owned()),
        Err(SecretLineError::NotUtf8) => Err("is not UTF-8"),
        Err(SecretLineError::Empty) => Err("is empty"),
        Err(SecretLineError::NulOrNewline) => Err("must hold one line without NUL"),
    }
}

/// The server VM's endpoint token: it travels in an HTTP Authorization header and the agent
/// trims what it reads, so only visible ASCII survives both unchanged. The reason completes
/// "<file> ...".
pub fn check_token(token: &str) -> Result<(), &'static str> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must hold a token of visible ASCII characters without spaces");
    }
    Ok(())
}

/// RFC 1123 host name syntax, as the agent checks `host.extra_names`.
pub fn is_dns_name(s: &str) -> bool {
    pilot_values::is_dns_name(s)
}

/// `HOST`, `HOST:PORT`, `IPV6` or `[IPV6]:PORT`, HOST an IP address or a DNS name, as
/// `waypoint.advertise_address` takes it (with a default port).
pub fn check_host_port(s: &str) -> Result<(), String> {
    pilot_values::parse_host_port(s, Some(pilot_values::DEFAULT_ENDPOINT_PORT)).map(|_| ())
}

/// `server.endpoint`: a `HOST[:PORT]` whose host is also the name the endpoint's certificate
/// is checked against.
pub fn check_server_endpoint(s: &str) -> Result<(), String> {
    s.parse::<pilot_values::ServerEndpoint>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A SHA-256 fingerprint as the agent reads `server.ca_sha256`. Returns the uppercase colon
/// form `openssl x509 -fingerprint` prints.
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    s.parse::<pilot_values::Fingerprint>()
        .ok()
        .map(|f| f.to_string())
}

/// A network as the agent reads `waypoint.application_sources`: `ADDR/LEN` with no bits set
/// after the prefix, or a bare address (one host). Returns the canonical `ADDR/LEN`, so the
/// agent's parser never sees a spelling it might read differently.
pub fn parse_cidr(s: &str) -> Result<String, String> {
    pilot_values::parse_cidr(s)
        .map(|net| net.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        for ok in [
            "10.0.1.5",
            "10.0.1.5:8443",
            "pilot.example.com:1",
            "pilot.example.com.",
            "2001:db8::1",
            "[2001:db8::1]",
            "[2001:db8::1]:8443",
        ] {
            assert_eq!(check_host_port(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ":8443",
            "host:0",
            "host:65536",
            "host:",
            "host:x",
            "bad host",
            "0.0.0.0",
            "[::]:1",
            "[::1",
            "[::1]x",
            "[nothost]:1",
            "a:b:c",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fingerprint_forms() {
        let upper = ["AB"; 32].join(":");
        for ok in [
            "ab".repeat(32),
            "AB".repeat(32),
            ["ab"; 32].join(":"),
            format!("SHA256 Fingerprint={}", ["Ab"; 32].join(":")),
        ] {
            assert_eq!(
                normalize_fingerprint(&ok).as_deref(),
                Some(upper.as_str()),
                "{ok}"
            );
        }
        for bad in [
            String::new(),
            "ab".repeat(31),
            "ab".repeat(33),
            "gg".repeat(32),
            ["ab"; 31].join(":"),
            format!("{}:a:b", ["ab"; 31].join(":")),
            format!("{}:", "ab".repeat(32)),
        ] {
            assert_eq!(normalize_fingerprint(&bad), None, "{bad}");
        }
        // The agent trims what surrounds a pasted fingerprint; so does the image now.
        let padded = " ".to_owned() + &"ab".repeat(32) + "\n";
        assert_eq!(
            normalize_fingerprint(&padded).as_deref(),
            Some(upper.as_str())
        );
    }

    #[test]
    fn cidr_forms() {
        for (input, want) in [
            ("198.51.100.0/24", "198.51.100.0/24"),
            ("203.0.113.7", "203.0.113.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("2001:0db8:0::/48", "2001:db8::/48"),
            ("::1", "::1/128"),
        ] {
            assert_eq!(parse_cidr(input).as_deref(), Ok(want), "{input}");
        }
        for bad in [
            "",
            "/24",
            "198.51.100.0/",
            "198.51.100.0/33",
            "198.51.100.1/24",
            "198.51.100.0/+24",
            "198.51.100.0/ 24",
            "198.51.100.0/24/1",
            "2001:db8::/129",
            "2001:db8::1/64",
            "300.1.1.0/24",
            "example.com/24",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert!(
            parse_cidr("198.51.100.1/24")
                .unwrap_err()
                .contains("198.51.100.0/24")
        );
    }
}
