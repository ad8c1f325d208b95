//! The checked input ([`UserDataSpec`]), made from [`UserDataInput`] by
//! [`UserDataInput::validate`]: which values are required or refused together (per flavour,
//! per role), each value checked by [`super::validate`], the password and token files read,
//! the endpoint tokens asked for generated ([`super::token`]).

use std::fmt;
use std::path::Path;

use super::error::{UserDataError, invalid};
use super::input::{DbTls, Flavour, Role, UserDataInput};
use super::token::{self, DEFAULT_TOKEN_NAME, EndpointTokenSpec};
use super::validate;

impl UserDataInput {
    /// Checks every value (naming the flag of the first bad one), reads the password and
    /// token files, and generates the endpoint tokens of `--generate-endpoint-token`.
    pub fn validate(self) -> Result<UserDataSpec, UserDataError> {
        let flavour = self.flavour.unwrap_or(Flavour::Aws);
        let role = self.role.unwrap_or_default();
        self.refuse_other_roles_flags(role)?;
        let database = self.database()?;
        let server = match role {
            Role::Server => None,
            Role::Runner => Some(self.server_link()?),
        };
        let advertise_address = self
            .advertise_address
            .as_deref()
            .map(|a| {
                validate::check_advertise_address(a)
                    .map(|()| a.to_owned())
                    .or_else(|why| invalid("--advertise-address", format!("{why}, got {a:?}")))
            })
            .transpose()?;
        let application_sources = self
            .application_sources
            .iter()
            .map(|s| validate::parse_cidr(s).or_else(|why| invalid("--application-sources", why)))
            .collect::<Result<Vec<_>, _>>()?;
        let endpoint_token_sha256 = self
            .endpoint_token_sha256
            .as_deref()
            .map(|h| {
                token::check_sha256_hex(h).or_else(|why| invalid("--endpoint-token-sha256", why))
            })
            .transpose()?;
        let endpoint_tokens = self.endpoint_tokens(endpoint_token_sha256.as_deref())?;
        let endpoint_sources = self
            .endpoint_sources
            .iter()
            .map(|s| validate::parse_cidr(s).or_else(|why| invalid("--endpoint-sources", why)))
            .collect::<Result<Vec<_>, _>>()?;
        if !endpoint_sources.is_empty()
            && endpoint_token_sha256.is_none()
            && endpoint_tokens.is_empty()
        {
            return invalid(
                "--endpoint-sources",
                "needs an endpoint token (--endpoint-token-sha256, --endpoint-token or \
                 --generate-endpoint-token): without one the endpoint is off",
            );
        }
        let agent_deb_url = match (flavour, self.agent_deb_url) {
            (Flavour::Stock, None) => {
                return invalid("--agent-deb-url", "required with --flavour stock");
            }
            (Flavour::Stock, Some(url)) => match validate::check_https_url(&url) {
                Ok(()) => Some(url),
                Err(why) => return invalid("--agent-deb-url", why),
            },
            (other, Some(_)) => {
                return invalid(
                    "--agent-deb-url",
                    format!(
                        "used only with --flavour stock (a {other} image is baked with the agent)"
                    ),
                );
            }
            (_, None) => None,
        };
        let runners = self.runners.unwrap_or(1);
        if let Err(why) = validate::check_runners(runners, role) {
            return invalid("--runners", why);
        }
        for name in &self.extra_names {
            if let Err(why) = validate::check_dns_name_or_ip(name) {
                return invalid("--extra-names", why);
            }
        }
        Ok(UserDataSpec {
            flavour,
            database,
            endpoint_token_sha256,
            endpoint_tokens,
            endpoint_sources,
            agent_deb_url,
            runners,
            extra_names: self.extra_names,
            server,
            advertise_address,
            application_sources,
        })
    }

    /// `endpoint.tokens`: the given hashes (`--endpoint-token`), then the generated tokens,
    /// each in the order given. Names are unique (`default` is the single-token form's when
    /// `legacy` is given), and so are hashes (two tokens with one hash would make its scope
    /// ambiguous); the agent refuses either. Generation comes last, after every check.
    fn endpoint_tokens(
        &self,
        legacy: Option<&str>,
    ) -> Result<Vec<EndpointTokenSpec>, UserDataError> {
        let mut names: Vec<String> = legacy
            .map(|_| DEFAULT_TOKEN_NAME.to_owned())
            .into_iter()
            .collect();
        let mut unique_name = |flag: &'static str, name: &str| {
            if names.iter().any(|n| n == name) {
                let by = if legacy.is_some() && name == DEFAULT_TOKEN_NAME {
                    "the token of --endpoint-token-sha256"
                } else {
                    "another endpoint token"
                };
                return invalid(flag, format!("name \"{name}\" is taken by {by}"));
            }
            names.push(name.to_owned());
            Ok(())
        };
        let mut tokens = Vec::new();
        for given in &self.endpoint_token {
            let (name, scope, sha256) = given
                .parse()
                .or_else(|why| invalid("--endpoint-token", why))?;
            unique_name("--endpoint-token", &name)?;
            let same = legacy
                .filter(|h| *h == sha256)
                .map(|_| "--endpoint-token-sha256".to_owned())
                .or_else(|| {
                    tokens
                        .iter()
                        .find(|t: &&EndpointTokenSpec| t.sha256 == sha256)
                        .map(|t| format!("token \"{}\"", t.name))
                });
            if let Some(other) = same {
                return invalid(
                    "--endpoint-token",
                    format!("\"{name}\" has the same hash as {other}"),
                );
            }
            tokens.push(EndpointTokenSpec {
                name,
                scope,
                sha256,
                generated: None,
            });
        }
        let mut asked = Vec::new();
        for spelled in &self.generate_endpoint_token {
            let (name, scope) = token::parse_name_scope(spelled)
                .or_else(|why| invalid("--generate-endpoint-token", why))?;
            unique_name("--generate-endpoint-token", &name)?;
            asked.push((name, scope));
        }
        for (name, scope) in asked {
            let t =
                EndpointTokenSpec::generate(name, scope).map_err(|e| UserDataError::Random {
                    flag: "--generate-endpoint-token",
                    reason: e.to_string(),
                })?;
            tokens.push(t);
        }
        Ok(tokens)
    }

    /// The flags of the other role, refused (see [`validate::check_role_flags`]).
    fn refuse_other_roles_flags(&self, role: Role) -> Result<(), UserDataError> {
        let given: &[(&'static str, bool)] = match role {
            Role::Runner => &[
                ("--db-host", self.db_host.is_some()),
                ("--db-port", self.db_port.is_some()),
                ("--db-admin-user", self.db_admin_user.is_some()),
                (
                    "--db-admin-password-file",
                    self.db_admin_password_file.is_some(),
                ),
                ("--db-tls", self.db_tls.is_some()),
                ("--advertise-address", self.advertise_address.is_some()),
                (
                    "--application-sources",
                    !self.application_sources.is_empty(),
                ),
            ],
            Role::Server => &[
                ("--server-endpoint", self.server_endpoint.is_some()),
                ("--server-ca-sha256", self.server_ca_sha256.is_some()),
                ("--server-token-file", self.server_token_file.is_some()),
            ],
        };
        validate::check_role_flags(role, given).or_else(|(flag, why)| invalid(flag, why))
    }

    /// `server:` of a runner-only host; every part is required.
    fn server_link(&self) -> Result<ServerLinkSpec, UserDataError> {
        let Some(endpoint) = &self.server_endpoint else {
            return invalid(
                "--server-endpoint",
                "required with --role runner: the server VM's pilot-agent endpoint, HOST[:PORT]",
            );
        };
        if let Err(why) = validate::check_server_endpoint(endpoint) {
            return invalid("--server-endpoint", format!("{why}, got {endpoint:?}"));
        }
        let Some(pin) = &self.server_ca_sha256 else {
            return invalid(
                "--server-ca-sha256",
                "required with --role runner: the SHA-256 fingerprint of the server VM's CA \
                 (`pilot-agent credentials` on the server VM prints it)",
            );
        };
        let ca_sha256 =
            validate::check_fingerprint(pin).or_else(|why| invalid("--server-ca-sha256", why))?;
        let Some(token_file) = &self.server_token_file else {
            return invalid(
                "--server-token-file",
                "required with --role runner: a file holding the server VM's endpoint token",
            );
        };
        let token = read_one_line_file("--server-token-file", token_file)?;
        if let Err(why) = validate::check_token(&token) {
            return invalid(
                "--server-token-file",
                format!("{} {why}", token_file.display()),
            );
        }
        Ok(ServerLinkSpec {
            endpoint: endpoint.clone(),
            ca_sha256,
            token,
        })
    }

    fn database(&self) -> Result<Option<DatabaseSpec>, UserDataError> {
        let Some(host) = &self.db_host else {
            if self.db_port.is_some()
                || self.db_admin_user.is_some()
                || self.db_admin_password_file.is_some()
                || self.db_tls.is_some()
            {
                return invalid("--db-host", "required when another --db-* flag is given");
            }
            return Ok(None);
        };
        if let Err(why) = validate::check_dns_name_or_ip(host) {
            return invalid("--db-host", why);
        }
        let port = validate::check_port(self.db_port.unwrap_or(5432))
            .or_else(|why| invalid("--db-port", why))?;
        let Some(admin_user) = &self.db_admin_user else {
            return invalid("--db-admin-user", "required with --db-host");
        };
        if let Err(why) = validate::check_pg_name(admin_user) {
            return invalid("--db-admin-user", why);
        }
        let admin_password = self
            .db_admin_password_file
            .as_deref()
            .map(read_password_file)
            .transpose()?;
        Ok(Some(DatabaseSpec {
            host: host.clone(),
            port,
            admin_user: admin_user.clone(),
            admin_password,
            tls: self.db_tls.unwrap_or_default(),
        }))
    }
}

/// A checked input, ready to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDataSpec {
    pub flavour: Flavour,
    pub database: Option<DatabaseSpec>,
    /// The single-token form (`endpoint.token_sha256_file`, an `admin` token named
    /// `default`): lowercase hex.
    pub endpoint_token_sha256: Option<String>,
    /// `endpoint.tokens`, each hash in its own file; generated ones hold their token.
    pub endpoint_tokens: Vec<EndpointTokenSpec>,
    /// `endpoint.sources`, in canonical `ADDR/LEN` form; only with a token above.
    pub endpoint_sources: Vec<String>,
    /// Only for [`Flavour::Stock`].
    pub agent_deb_url: Option<String>,
    pub runners: u32,
    pub extra_names: Vec<String>,
    /// `Some` exactly for a runner-only host (`role: runner`).
    pub server: Option<ServerLinkSpec>,
    /// `waypoint.advertise_address` (server only): `auto` or `HOST[:PORT]` as given.
    pub advertise_address: Option<String>,
    /// `waypoint.application_sources` (server only), in canonical `ADDR/LEN` form.
    pub application_sources: Vec<String>,
}

/// The `server:` section of a runner-only host and the server VM's endpoint token.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerLinkSpec {
    /// `HOST[:PORT]` as given.
    pub endpoint: String,
    /// Uppercase hex pairs separated by `:`, as `openssl x509 -fingerprint -sha256` prints.
    pub ca_sha256: String,
    /// One line of visible ASCII.
    pub token: String,
}

// By hand so that a `{:?}` never shows the token.
impl fmt::Debug for ServerLinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerLinkSpec")
            .field("endpoint", &self.endpoint)
            .field("ca_sha256", &self.ca_sha256)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The `database:` section and the admin password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseSpec {
    pub host: String,
    pub port: u16,
    pub admin_user: String,
    /// One line, no newline or NUL (what the agent's password file reader accepts).
    pub admin_password: Option<String>,
    pub tls: DbTls,
}

// By hand so that a `{:?}` in a log or a panic message never shows the password.
impl fmt::Debug for DatabaseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSpec")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("admin_user", &self.admin_user)
            .field(
                "admin_password",
                &self.admin_password.as_ref().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

fn read_password_file(path: &Path) -> Result<String, UserDataError> {
    read_one_line_file("--db-admin-password-file", path)
}

/// A one-line secret file (see [`validate::one_line`]).
fn read_one_line_file(flag: &'static str, path: &Path) -> Result<String, UserDataError> {
    let bytes = std::fs::read(path).map_err(|source| UserDataError::ReadFlagFile {
        flag,
        path: path.to_owned(),
        source,
    })?;
    validate::one_line(bytes).or_else(|why| invalid(flag, format!("{} {why}", path.display())))
}

/// Specs for the tests of this module and of [`super::render`].
#[cfg(test)]
pub(super) mod fixtures {
    use super::*;

    pub fn spec(flavour: Flavour) -> UserDataSpec {
        UserDataSpec {
            flavour,
            database: Some(DatabaseSpec {
                host: "db.example.internal".into(),
                port: 5432,
                admin_user: "pilot_admin".into(),
                admin_password: Some("s3cret".into()),
                tls: DbTls::Require,
            }),
            endpoint_token_sha256: Some("ab".repeat(32)),
            endpoint_tokens: Vec::new(),
            endpoint_sources: Vec::new(),
            agent_deb_url: (flavour == Flavour::Stock)
                .then(|| "https://example.com/pilot-agent.deb".into()),
            runners: 2,
            extra_names: vec!["pilot.example.com".into()],
            server: None,
            advertise_address: Some("pilot.example.com:19701".into()),
            application_sources: vec!["198.51.100.0/24".into(), "2001:db8::/32".into()],
        }
    }

    pub fn runner_spec(flavour: Flavour) -> UserDataSpec {
        UserDataSpec {
            database: None,
            server: Some(ServerLinkSpec {
                endpoint: "10.0.1.5:8443".into(),
                ca_sha256: validate::normalize_fingerprint(&"3f".repeat(32)).unwrap(),
                token: "srv-t0ken".into(),
            }),
            advertise_address: None,
            application_sources: Vec::new(),
            ..spec(flavour)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::spec;
    use super::*;

    fn input() -> UserDataInput {
        UserDataInput {
            db_host: Some("10.0.0.5".into()),
            db_admin_user: Some("pilot_admin".into()),
            ..Default::default()
        }
    }

    fn flag_of(r: Result<UserDataSpec, UserDataError>) -> &'static str {
        match r {
            Err(UserDataError::Invalid { flag, .. }) => flag,
            Err(UserDataError::ReadFlagFile { flag, .. }) => flag,
            other => panic!("expected an invalid flag, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: Vec<(UserDataInput, &str)> = vec![
            (
                UserDataInput {
                    db_port: Some(0),
                    ..input()
                },
                "--db-port",
            ),
            (
                UserDataInput {
                    db_port: Some(65536),
                    ..input()
                },
                "--db-port",
            ),
            (
                UserDataInput {
                    db_host: Some(String::new()),
                    ..input()
                },
                "--db-host",
            ),
            (
                UserDataInput {
                    db_host: None,
                    ..input()
                },
                "--db-host",
            ),
            (
                UserDataInput {
                    db_admin_user: None,
                    ..input()
                },
                "--db-admin-user",
            ),
            (
                UserDataInput {
                    endpoint_token_sha256: Some("abc".into()),
                    ..input()
                },
                "--endpoint-token-sha256",
            ),
            (
                UserDataInput {
                    endpoint_token_sha256: Some("g".repeat(64)),
                    ..input()
                },
                "--endpoint-token-sha256",
            ),
            (
                UserDataInput {
                    flavour: Some(Flavour::Stock),
                    ..input()
                },
                "--agent-deb-url",
            ),
            (
                UserDataInput {
                    flavour: Some(Flavour::Stock),
                    agent_deb_url: Some("http://example.com/a.deb".into()),
                    ..input()
                },
                "--agent-deb-url",
            ),
            (
                UserDataInput {
                    agent_deb_url: Some("https://example.com/a.deb".into()),
                    ..input()
                },
                "--agent-deb-url",
            ),
            (
                UserDataInput {
                    runners: Some(33),
                    ..input()
                },
                "--runners",
            ),
            (
                UserDataInput {
                    extra_names: vec!["not a name".into()],
                    ..input()
                },
                "--extra-names",
            ),
            (
                UserDataInput {
                    db_admin_password_file: Some("/nonexistent/pw".into()),
                    ..input()
                },
                "--db-admin-password-file",
            ),
        ];
        for (i, want) in cases {
            let shown = format!("{i:?}");
            assert_eq!(flag_of(i.validate()), want, "{shown}");
        }
    }

    fn runner_input(dir: &Path) -> UserDataInput {
        let token = dir.join("token");
        std::fs::write(&token, "srv-t0ken\n").unwrap();
        UserDataInput {
            role: Some(Role::Runner),
            server_endpoint: Some("10.0.1.5".into()),
            server_ca_sha256: Some("3f".repeat(32)),
            server_token_file: Some(token),
            ..Default::default()
        }
    }

    #[test]
    fn runner_input_validates() {
        let dir = tempfile::tempdir().unwrap();
        let s = runner_input(dir.path()).validate().unwrap();
        let server = s.server.as_ref().unwrap();
        assert_eq!(server.token, "srv-t0ken");
        assert_eq!(server.ca_sha256, ["3F"; 32].join(":"));
        assert!(s.database.is_none());
        assert!(!format!("{s:?}").contains("srv-t0ken"));
    }

    #[test]
    fn role_flags_name_their_flag() {
        let dir = tempfile::tempdir().unwrap();
        let r = || runner_input(dir.path());
        let bad_token = dir.path().join("bad-token");
        std::fs::write(&bad_token, "two words\n").unwrap();
        let cases: Vec<(UserDataInput, &str)> = vec![
            (
                UserDataInput {
                    server_endpoint: None,
                    ..r()
                },
                "--server-endpoint",
            ),
            (
                UserDataInput {
                    server_endpoint: Some("0.0.0.0:8443".into()),
                    ..r()
                },
                "--server-endpoint",
            ),
            (
                UserDataInput {
                    server_ca_sha256: None,
                    ..r()
                },
                "--server-ca-sha256",
            ),
            (
                UserDataInput {
                    server_ca_sha256: Some("3f".repeat(31)),
                    ..r()
                },
                "--server-ca-sha256",
            ),
            (
                UserDataInput {
                    server_token_file: None,
                    ..r()
                },
                "--server-token-file",
            ),
            (
                UserDataInput {
                    server_token_file: Some("/nonexistent/t".into()),
                    ..r()
                },
                "--server-token-file",
            ),
            (
                UserDataInput {
                    server_token_file: Some(bad_token.clone()),
                    ..r()
                },
                "--server-token-file",
            ),
            (
                UserDataInput {
                    db_host: Some("db".into()),
                    ..r()
                },
                "--db-host",
            ),
            (
                UserDataInput {
                    db_tls: Some(DbTls::Disable),
                    ..r()
                },
                "--db-tls",
            ),
            (
                UserDataInput {
                    db_admin_password_file: Some("/x".into()),
                    ..r()
                },
                "--db-admin-password-file",
            ),
            (
                UserDataInput {
                    advertise_address: Some("auto".into()),
                    ..r()
                },
                "--advertise-address",
            ),
            (
                UserDataInput {
                    application_sources: vec!["10.0.0.0/8".into()],
                    ..r()
                },
                "--application-sources",
            ),
            (
                UserDataInput {
                    runners: Some(0),
                    ..r()
                },
                "--runners",
            ),
            (
                UserDataInput {
                    server_endpoint: Some("10.0.1.5".into()),
                    ..input()
                },
                "--server-endpoint",
            ),
            (
                UserDataInput {
                    server_ca_sha256: Some("3f".repeat(32)),
                    ..input()
                },
                "--server-ca-sha256",
            ),
            (
                UserDataInput {
                    server_token_file: Some(bad_token),
                    ..input()
                },
                "--server-token-file",
            ),
            (
                UserDataInput {
                    advertise_address: Some("0.0.0.0".into()),
                    ..input()
                },
                "--advertise-address",
            ),
            (
                UserDataInput {
                    application_sources: vec!["10.0.0.0/8".into(), "10.0.0.1/8".into()],
                    ..input()
                },
                "--application-sources",
            ),
        ];
        for (i, want) in cases {
            let shown = format!("{i:?}");
            assert_eq!(flag_of(i.validate()), want, "{shown}");
        }
        // Allowed: a runner host's own endpoint; a server's advertise `auto`.
        let ok = UserDataInput {
            endpoint_token_sha256: Some("ab".repeat(32)),
            ..r()
        };
        assert!(ok.validate().is_ok());
        let ok = UserDataInput {
            advertise_address: Some("auto".into()),
            application_sources: vec!["203.0.113.7".into()],
            ..input()
        };
        let s = ok.validate().unwrap();
        assert_eq!(s.application_sources, ["203.0.113.7/32"]);
    }

    #[test]
    fn endpoint_token_flags_name_their_flag() {
        let h = "cd".repeat(32);
        let legacy = || UserDataInput {
            endpoint_token_sha256: Some("ab".repeat(32)),
            ..input()
        };
        let cases: Vec<(UserDataInput, &str)> = vec![
            (
                UserDataInput {
                    endpoint_token: vec![format!("bad name:read:{h}").parse().unwrap()],
                    ..input()
                },
                "--endpoint-token",
            ),
            (
                UserDataInput {
                    endpoint_token: vec![format!("prom:write:{h}").parse().unwrap()],
                    ..input()
                },
                "--endpoint-token",
            ),
            (
                UserDataInput {
                    endpoint_token: vec!["prom:read:abc".parse().unwrap()],
                    ..input()
                },
                "--endpoint-token",
            ),
            (
                UserDataInput {
                    endpoint_token: vec![format!("default:admin:{h}").parse().unwrap()],
                    ..legacy()
                },
                "--endpoint-token",
            ),
            (
                UserDataInput {
                    endpoint_token: vec![format!("ops:admin:{}", "AB".repeat(32)).parse().unwrap()],
                    ..legacy()
                },
                "--endpoint-token",
            ),
            (
                UserDataInput {
                    endpoint_token: vec![
                        format!("a:admin:{h}").parse().unwrap(),
                        format!("b:read:{h}").parse().unwrap(),
                    ],
                    ..input()
                },
                "--endpoint-token",
            ),
            (
                UserDataInput {
                    generate_endpoint_token: vec!["runners".into()],
                    ..input()
                },
                "--generate-endpoint-token",
            ),
            (
                UserDataInput {
                    generate_endpoint_token: vec!["runners:Runner".into()],
                    ..input()
                },
                "--generate-endpoint-token",
            ),
            (
                UserDataInput {
                    endpoint_token: vec![format!("runners:read:{h}").parse().unwrap()],
                    generate_endpoint_token: vec!["runners:runner".into()],
                    ..input()
                },
                "--generate-endpoint-token",
            ),
            (
                UserDataInput {
                    generate_endpoint_token: vec!["default:admin".into()],
                    ..legacy()
                },
                "--generate-endpoint-token",
            ),
            (
                UserDataInput {
                    endpoint_sources: vec!["10.0.0.0/8".into()],
                    ..input()
                },
                "--endpoint-sources",
            ),
            (
                UserDataInput {
                    endpoint_sources: vec!["10.0.0.1/8".into()],
                    ..legacy()
                },
                "--endpoint-sources",
            ),
        ];
        for (i, want) in cases {
            let shown = format!("{i:?}");
            let r = i.validate();
            if let Err(e) = &r {
                assert!(!e.to_string().contains(&h), "{e}");
            }
            assert_eq!(flag_of(r), want, "{shown}");
        }
    }

    #[test]
    fn endpoint_tokens_given_then_generated_with_sources() {
        let h = "CD".repeat(32);
        let s = UserDataInput {
            endpoint_token_sha256: Some("ab".repeat(32)),
            endpoint_token: vec![format!("prom:read:{h}").parse().unwrap()],
            generate_endpoint_token: vec!["ops:admin".into(), "runners:runner".into()],
            endpoint_sources: vec!["10.0.1.0/24".into(), "2001:db8::1".into()],
            ..input()
        }
        .validate()
        .unwrap();
        let got: Vec<_> = s
            .endpoint_tokens
            .iter()
            .map(|t| (t.name.as_str(), t.scope, t.generated.is_some()))
            .collect();
        assert_eq!(
            got,
            [
                ("prom", token::Scope::Read, false),
                ("ops", token::Scope::Admin, true),
                ("runners", token::Scope::Runner, true)
            ]
        );
        assert_eq!(s.endpoint_tokens[0].sha256, h.to_lowercase());
        for t in &s.endpoint_tokens[1..] {
            let g = t.generated.as_ref().unwrap();
            assert_eq!(t.sha256, token::sha256_hex(g.expose()));
            assert!(!format!("{s:?}").contains(g.expose()));
        }
        assert_eq!(s.endpoint_sources, ["10.0.1.0/24", "2001:db8::1/128"]);
        // A name is free without the single-token form, `default` included; sources with a
        // scoped token alone.
        let s = UserDataInput {
            generate_endpoint_token: vec!["default:read".into()],
            endpoint_sources: vec!["10.0.0.0/8".into()],
            ..input()
        }
        .validate()
        .unwrap();
        assert_eq!(s.endpoint_tokens[0].name, "default");
    }

    #[test]
    fn password_file_follows_the_agents_rules() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        for (content, ok) in [
            (&b"pw\n"[..], Some("pw")),
            (b"pw\r\n", Some("pw")),
            (b"pw", Some("pw")),
            (b"\n", None),
            (b"", None),
            (b"a\nb\n", None),
            (b"a\0b", None),
            (b"\xff\xfe", None),
        ] {
            std::fs::write(&file, content).unwrap();
            let r = read_password_file(&file);
            assert_eq!(r.as_deref().ok(), ok, "{content:?}");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let s = spec(Flavour::Aws);
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
