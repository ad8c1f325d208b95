//! Endpoint tokens: the scopes and names the agent accepts in `endpoint.tokens`, the given
//! `NAME:SCOPE:SHA256` and `NAME:SCOPE` spellings, and the tokens `--generate-endpoint-token`
//! makes.
//!
//! A generated token is 32 bytes from the operating system's random number generator
//! (`getrandom`), encoded base64url without padding (RFC 4648 §5): 43 characters of
//! `A-Z a-z 0-9 - _`, which go unquoted into an `Authorization: Bearer` header, a URL, a file
//! name or a shell word, and the same shape as the `basenc --base64url` recipe of
//! docs/operations.md. The agent compares the SHA-256 of the token's text, so only that hash
//! (64 lowercase hex digits) goes into the user-data; the token itself is printed once by the
//! command (see [`token_lines`]) and kept nowhere.

use std::fmt;

use base64::Engine as _;
use pilot_values::Secret;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Longest token name, as the agent bounds it (it goes into log lines).
pub const MAX_TOKEN_NAME: usize = 64;
/// The name of the token of the single-token form (`--endpoint-token-sha256`).
pub const DEFAULT_TOKEN_NAME: &str = "default";
/// Random bytes in a generated token.
pub const TOKEN_BYTES: usize = 32;

/// What a token may do at the agent's endpoint (`endpoint.tokens[].scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything, the credentials included: operators, the Pilot CLI.
    Admin,
    /// `POST /v1/runner-token` only: what a runner-only host holds for the server VM.
    Runner,
    /// Status and metrics: monitoring.
    Read,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Admin, Scope::Runner, Scope::Read];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Runner => "runner",
            Scope::Read => "read",
        }
    }

    /// Exactly `admin`, `runner` or `read`, as the agent reads `scope`.
    pub fn parse(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("scope: expected one of admin, runner, read, got \"{s}\""))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `s` is a token name by the agent's rule (agent/src/config/endpoint.rs
/// `is_token_name`; image/tests/grammar.rs shows both agree): 1 to [`MAX_TOKEN_NAME`] of
/// `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
pub fn is_token_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.len() <= MAX_TOKEN_NAME
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A token name, or why it is refused.
pub fn check_token_name(s: &str) -> Result<(), String> {
    if is_token_name(s) {
        Ok(())
    } else {
        Err(format!(
            "name: expected 1 to {MAX_TOKEN_NAME} letters, digits, `.`, `_` or `-`, starting \
             with a letter or digit, got \"{s}\""
        ))
    }
}

/// `NAME:SCOPE` of `--generate-endpoint-token`.
pub fn parse_name_scope(s: &str) -> Result<(String, Scope), String> {
    let Some((name, scope)) = s.split_once(':') else {
        return Err(format!(
            "expected NAME:SCOPE (e.g. runners:runner), got \"{s}\""
        ));
    };
    check_token_name(name)?;
    Ok((name.to_owned(), Scope::parse(scope)?))
}

/// One `--endpoint-token` as given: the flag's `NAME:SCOPE:SHA256`, or in a `--from` file
/// either that string or an object `{"name", "scope", "sha256"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenHashInput {
    Spelled(String),
    Fields {
        name: String,
        scope: String,
        sha256: String,
    },
}

impl std::str::FromStr for TokenHashInput {
    type Err = std::convert::Infallible;

    /// Every string: it is checked by [`TokenHashInput::parse`], which names the flag.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(TokenHashInput::Spelled(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for TokenHashInput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            name: String,
            scope: String,
            sha256: String,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TokenHashInput;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"NAME:SCOPE:SHA256\" or an object {\"name\", \"scope\", \"sha256\"}")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(TokenHashInput::Spelled(s.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let f = Fields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(TokenHashInput::Fields {
                    name: f.name,
                    scope: f.scope,
                    sha256: f.sha256,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl TokenHashInput {
    /// The name, scope and lowercase hex hash; the reason never shows the hash.
    pub fn parse(&self) -> Result<(String, Scope, String), String> {
        let (name, scope, sha256) = match self {
            TokenHashInput::Spelled(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                let [name, scope, sha256] = parts[..] else {
                    return Err(format!(
                        "expected NAME:SCOPE:SHA256 (three parts separated by ':'), got {} \
                         part(s)",
                        parts.len()
                    ));
                };
                (name, scope, sha256)
            }
            TokenHashInput::Fields {
                name,
                scope,
                sha256,
            } => (name.as_str(), scope.as_str(), sha256.as_str()),
        };
        check_token_name(name)?;
        let scope = Scope::parse(scope)?;
        let sha256 = check_sha256_hex(sha256).map_err(|why| format!("sha256: {why}"))?;
        Ok((name.to_owned(), scope, sha256))
    }
}

/// One entry of `endpoint.tokens`: its hash is written to [`EndpointTokenSpec::sha256_path`].
#[derive(Clone, PartialEq, Eq)]
pub struct EndpointTokenSpec {
    pub name: String,
    pub scope: Scope,
    /// The token's SHA-256, 64 lowercase hex digits.
    pub sha256: String,
    /// The token itself when this command generated it (printed once, never rendered).
    pub generated: Option<Secret>,
}

impl EndpointTokenSpec {
    /// A new token `name` of `scope` from the operating system's random number generator.
    pub fn generate(name: String, scope: Scope) -> Result<EndpointTokenSpec, getrandom::Error> {
        let mut raw = zeroize::Zeroizing::new([0u8; TOKEN_BYTES]);
        getrandom::fill(raw.as_mut())?;
        let token = Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*raw));
        Ok(EndpointTokenSpec {
            name,
            scope,
            sha256: sha256_hex(token.expose()),
            generated: Some(token),
        })
    }

    /// Where the VM keeps this token's hash (0600), named by `sha256_file`:
    /// `/etc/pilot/endpoint-token-NAME.sha256` (a name is a safe file name, and no other name
    /// gives the same path).
    pub fn sha256_path(&self) -> String {
        format!("/etc/pilot/endpoint-token-{}.sha256", self.name)
    }
}

// By hand so that a `{:?}` never shows the token or its hash (a hash of a weak token can be
// brute-forced; the agent keeps hashes out of its logs too).
impl fmt::Debug for EndpointTokenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointTokenSpec")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("sha256", &"<redacted>")
            .field("generated", &self.generated.is_some())
            .finish()
    }
}

/// SHA-256 of `token`'s text as 64 lowercase hex digits (what `printf %s TOKEN | sha256sum`
/// prints, and what the agent compares).
pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The lines the command prints for the generated tokens, one `NAME SCOPE TOKEN` each, in the
/// order they were asked for (empty when none was generated).
pub fn token_lines(tokens: &[EndpointTokenSpec]) -> String {
    tokens
        .iter()
        .filter_map(|t| {
            t.generated
                .as_ref()
                .map(|g| format!("{} {} {}\n", t.name, t.scope, g.expose()))
        })
        .collect()
}

/// A SHA-256 as 64 hex digits (the endpoint token's hash); returns it in lowercase.
pub fn check_sha256_hex(h: &str) -> Result<String, String> {
    match pilot_values::parse_sha256_hex(h) {
        Some(bytes) => Ok(bytes.iter().map(|b| format!("{b:02x}")).collect()),
        None => Err(format!(
            "expected 64 hex digits (a SHA-256), got {} characters",
            h.trim().len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_43_base64url_characters_and_hash_to_their_sha256() {
        let a = EndpointTokenSpec::generate("a".into(), Scope::Runner).unwrap();
        let b = EndpointTokenSpec::generate("b".into(), Scope::Runner).unwrap();
        let (ta, tb) = (a.generated.as_ref().unwrap(), b.generated.as_ref().unwrap());
        assert_ne!(ta.expose(), tb.expose());
        for t in [ta, tb] {
            assert_eq!(t.expose().len(), 43, "32 bytes, no padding");
            assert!(
                t.expose()
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                "{}",
                t.expose()
            );
            assert!(super::super::validate::check_token(t.expose()).is_ok());
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t.expose())
                .unwrap();
            assert_eq!(raw.len(), TOKEN_BYTES);
        }
        assert_eq!(a.sha256, sha256_hex(ta.expose()));
        assert!(!format!("{a:?}").contains(ta.expose()));
        assert!(!format!("{a:?}").contains(&a.sha256));
        assert_eq!(
            token_lines(&[a.clone(), b.clone()]),
            format!("a runner {}\nb runner {}\n", ta.expose(), tb.expose())
        );
    }

    #[test]
    fn known_sha256() {
        // printf %s test | sha256sum
        assert_eq!(
            sha256_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn name_scope_forms() {
        assert_eq!(
            parse_name_scope("runners:runner"),
            Ok(("runners".into(), Scope::Runner))
        );
        for bad in [
            "runners",
            ":runner",
            "runners:",
            "runners:Runner",
            "runners:root",
            "a b:read",
            "a:b:read",
            "-a:read",
        ] {
            assert!(parse_name_scope(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hash_forms_never_echo_the_hash() {
        let h = "AB".repeat(32);
        let ok = TokenHashInput::Spelled(format!("prom:read:{h}"));
        assert_eq!(
            ok.parse(),
            Ok(("prom".into(), Scope::Read, "ab".repeat(32)))
        );
        let fields = TokenHashInput::Fields {
            name: "prom".into(),
            scope: "read".into(),
            sha256: h.clone(),
        };
        assert_eq!(fields.parse(), ok.parse());
        for bad in [
            format!("prom:read:{}", &h[1..]),
            format!("prom:read:{h}:x"),
            format!("prom:{h}"),
            format!("prom:write:{h}"),
            format!("pr om:read:{h}"),
        ] {
            let e = TokenHashInput::Spelled(bad.clone()).parse().unwrap_err();
            assert!(!e.contains(&h[1..]), "{e}");
        }
    }

    #[test]
    fn token_names_match_the_agents_examples() {
        for ok in ["a", "runner-pool", "ops.1", "A_b", &"x".repeat(64)] {
            assert!(is_token_name(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(!is_token_name(bad), "{bad}");
        }
    }

    #[test]
    fn json_accepts_objects_and_strings() {
        let v: Vec<TokenHashInput> =
            serde_json::from_str(r#"[{"name": "a", "scope": "read", "sha256": "x"}, "b:admin:y"]"#)
                .unwrap();
        assert_eq!(
            v,
            [
                TokenHashInput::Fields {
                    name: "a".into(),
                    scope: "read".into(),
                    sha256: "x".into()
                },
                TokenHashInput::Spelled("b:admin:y".into())
            ]
        );
        let e = serde_json::from_str::<Vec<TokenHashInput>>(
            r#"[{"name": "a", "scope": "read", "sha256_file": "/x"}]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("sha256_file"), "{e}");
        assert!(serde_json::from_str::<Vec<TokenHashInput>>("[1]").is_err());
    }
}
