//! Database provisioning: the application role and its database on the Pilot PostgreSQL
//! server (RDS, Cloud SQL, or any PostgreSQL 12+), and the role's password on this host.
//!
//! [`provision`] converges, idempotently and crash-safely:
//! 1. a strong random password, made once and kept in a 0600 file in the agent's state
//!    directory ([`read_password`] reads it for the credentials output), never regenerated
//!    unless rotation is asked for;
//! 2. over an admin connection: the role (`LOGIN`, password sent as a SCRAM-SHA-256 verifier
//!    made here, so the plain text never reaches the server or its logs), the database owned
//!    by the role (so it can create tables: since PostgreSQL 15 the `public` schema belongs to
//!    `pg_database_owner`), `CONNECT` taken from `PUBLIC` so other roles on a shared server
//!    cannot open it;
//! 3. a login as the role into its database, which both detects a role whose password differs
//!    from the stored one (then `ALTER ROLE` sets it) and proves that the result works.
//!
//! Every step checks before it acts, so a converged server sees only reads and one login.
//!
//! Recovery behaviour, by design:
//! - The stored password file is the source of truth. If it is lost while the role exists, a
//!   new password is generated, stored, and the role's password is set to it (applications
//!   must then fetch the new credentials). An operator may also pre-seed the file with a
//!   password of their choice: the role is set to it.
//! - A database of the configured name owned by another role is never taken over: that is a
//!   [`DatabaseError::Conflict`] for an operator to resolve.

mod connect;
mod error;
mod guard;
mod secret;
mod sql;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use connect::{ConnectFailure, Login, Tls};
use secret::SecretStore;

pub use error::{BoxError, DatabaseError};
pub use secret::{Secret, read_password};

pub use crate::config::database::{
    DEFAULT_ADMIN_DATABASE, DEFAULT_APP_DATABASE, DEFAULT_APP_ROLE, DEFAULT_CONNECT_TIMEOUT_SECS,
    DEFAULT_PORT, DEFAULT_STATEMENT_TIMEOUT_SECS, DatabaseSettings,
};
pub use pilot_values::TlsMode;

impl DatabaseSettings {
    fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }

    fn statement_timeout(&self) -> Duration {
        Duration::from_secs(self.statement_timeout_secs)
    }

    /// The admin password from the inline value or the file; `None` when neither is set
    /// (a server that trusts the admin by other means).
    fn admin_password(&self) -> Result<Option<Secret>, DatabaseError> {
        if let Some(secret) = &self.admin_password {
            return Ok(Some(secret.clone()));
        }
        let Some(path) = &self.admin_password_file else {
            return Ok(None);
        };
        match secret::read_secret_file(path)? {
            Some(secret) => Ok(Some(secret)),
            None => Err(DatabaseError::secret(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "admin_password_file is missing",
                ),
            )),
        }
    }
}

/// What [`provision`] did. Carries no secret.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provisioned {
    /// Anything changed, on the server or in the stored password files.
    pub changed: bool,
    pub role_created: bool,
    pub database_created: bool,
    /// The role's password was set on the server (new role, rotation, or healed mismatch).
    pub password_set: bool,
}

/// Converges the application role, its database and its stored password; see the module
/// documentation. `secret_path` is the 0600 password file in the agent's state directory;
/// `rotate` asks for a new password (applied to the role and the file) even if one exists.
///
/// Errors: [`DatabaseError::Unreachable`] is the transient, fail-open case
/// ([`DatabaseError::is_transient`]); the others need a configuration or operator change.
pub async fn provision(
    settings: &DatabaseSettings,
    secret_path: &Path,
    rotate: bool,
) -> Result<Provisioned, DatabaseError> {
    settings.validate()?;
    let tls = Tls::from_settings(settings)?;
    let admin_password = settings.admin_password()?;
    let store = SecretStore::new(secret_path);
    let mut out = Provisioned::default();

    // Step 1, local: decide the password before touching the server, and persist it first.
    let passwords = decide_password(&store, rotate, &mut out)?;

    // Step 2: the role and its database, over the admin connection.
    let admin_login = Login {
        user: &settings.admin_user,
        password: admin_password.as_ref(),
        database: &settings.admin_database,
    };
    let admin = connect::connect(settings, &tls, &admin_login)
        .await
        .map_err(|f| f.into_error(settings, &admin_login))?;
    let admin = Session {
        client: admin,
        settings,
    };
    let role = settings.app_role.as_str();

    // One provisioning at a time per role, across agents and across runs: a run killed during
    // `CREATE DATABASE` leaves its backend finishing the statement after the client is gone, and
    // the next run would otherwise see no database yet and collide with it ("duplicate key
    // value violates unique constraint pg_database_datname_index"). A session-level advisory
    // lock is held by that orphaned backend until it has finished and noticed the closed
    // connection, so waiting for it here makes the next run see what the killed one did. It is
    // released when this session ends.
    admin
        .query_opt(
            "wait for other provisioning runs of this role",
            "SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtext('pilot-agent provision ' || $1))",
            &[&role],
        )
        .await?;

    ensure_role(&admin, passwords.target(), &mut out).await?;
    ensure_database(&admin, &mut out).await?;
    revoke_public_access(&admin, &mut out).await?;

    // Step 3: make the role's password match the stored one, proven by logging in with it.
    let app_client = converge_password(&admin, &tls, &store, &passwords, &mut out).await?;
    ensure_schema_access(settings, &admin_login, &tls, app_client, &mut out).await?;

    out.changed |= out.role_created || out.database_created || out.password_set;
    Ok(out)
}

/// The passwords of a run: the stored one, a pending one (a rotation's, maybe left by a
/// killed run) and whether this run rotates.
struct Passwords {
    stored: Secret,
    pending: Option<Secret>,
    rotating: bool,
}

impl Passwords {
    /// The password the run converges to. A new role gets it, so that step 3 has nothing
    /// left to set.
    fn target(&self) -> &Secret {
        match (&self.pending, self.rotating) {
            (Some(p), true) => p,
            _ => &self.stored,
        }
    }
}

/// Step 1: decides the password before touching the server, and persists it first.
///
/// A new password is stored *before* the server hears of it; whatever the server then has,
/// step 3 makes the role match the file. So a run killed at any point leaves a file that
/// the next run enforces, and an existing file is never replaced without `rotate`.
///
/// Rotation cannot work that way: until ALTER ROLE commits, the credentials output must
/// keep serving the password the role still has. So the new password goes to a sibling
/// `.pending` file (atomically, 0600), then ALTER ROLE, then the pending file is promoted
/// over the stored one. A run killed in between leaves a pending file, which the next run
/// settles by asking the server: if the role accepts the pending password, ALTER ROLE had
/// committed and the rotation is finished by promoting it; if not, it never reached the
/// server and is discarded. Either way, after the next successful run the stored file
/// holds exactly the password the role has, which the final login proves.
fn decide_password(
    store: &SecretStore,
    rotate: bool,
    out: &mut Provisioned,
) -> Result<Passwords, DatabaseError> {
    let (stored, pending, rotating) = match (store.read_current()?, store.read_pending()?) {
        (None, leftover) => {
            // No stored password (first run, or the file was lost). A pending one left by a
            // killed rotation is as good as a fresh one; either way the role is made to match.
            let fresh = match leftover {
                Some(p) => p,
                None => secret::generate_password()
                    .map_err(|e| DatabaseError::secret(store.current_path(), e))?,
            };
            store.write_current(&fresh)?;
            store.discard_pending()?;
            tracing::info!(path = %store.current_path().display(), "stored a new database password");
            out.changed = true;
            (fresh, None, false)
        }
        (Some(current), _) if rotate => {
            let fresh = secret::generate_password()
                .map_err(|e| DatabaseError::secret(store.current_path(), e))?;
            store.write_pending(&fresh)?;
            (current, Some(fresh), true)
        }
        (Some(current), leftover) => (current, leftover, false),
    };

    Ok(Passwords {
        stored,
        pending,
        rotating,
    })
}

/// The application role exists and may log in; a new one gets `target` as its password.
async fn ensure_role(
    admin: &Session<'_>,
    target: &Secret,
    out: &mut Provisioned,
) -> Result<(), DatabaseError> {
    let role = admin.settings.app_role.as_str();
    let can_login: Option<bool> = admin
        .query_opt(
            "look up the application role",
            "SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await?
        .map(|row| column(&row, 0, "look up the application role"))
        .transpose()?;
    match can_login {
        None => {
            admin
                .execute(
                    &format!("create role {role:?}"),
                    &sql::role_statement("CREATE", role, target),
                )
                .await?;
            tracing::info!(role, "created the application role");
            out.role_created = true;
            out.password_set = true;
        }
        Some(false) => {
            admin
                .execute(
                    &format!("allow role {role:?} to log in"),
                    &format!("ALTER ROLE {} LOGIN", sql::quote_ident(role)),
                )
                .await?;
            tracing::info!(role, "allowed the application role to log in");
            out.changed = true;
        }
        Some(true) => {}
    }
    Ok(())
}

/// The application database exists and is owned by the role (never taken over).
async fn ensure_database(admin: &Session<'_>, out: &mut Provisioned) -> Result<(), DatabaseError> {
    let role = admin.settings.app_role.as_str();
    let database = admin.settings.app_database.as_str();
    let owner: Option<String> = admin
        .query_opt(
            "look up the application database",
            "SELECT pg_catalog.pg_get_userbyid(datdba)::text FROM pg_catalog.pg_database \
             WHERE datname = $1",
            &[&database],
        )
        .await?
        .map(|row| column(&row, 0, "look up the application database"))
        .transpose()?;
    match owner.as_deref() {
        None => {
            admin.ensure_can_act_as(role).await?;
            // CREATE DATABASE cannot run in a transaction block: a single-statement simple
            // query is not one. Ownership is the grant: the owner may connect, create schemas,
            // and (PostgreSQL 15+) create tables in `public`, which `pg_database_owner` owns.
            admin
                .execute(
                    &format!("create database {database:?}"),
                    &format!(
                        "CREATE DATABASE {} OWNER {}",
                        sql::quote_ident(database),
                        sql::quote_ident(role)
                    ),
                )
                .await?;
            tracing::info!(database, role, "created the application database");
            out.database_created = true;
        }
        Some(owner) if owner == role => {}
        Some(owner) => {
            return Err(DatabaseError::Conflict(format!(
                "database {database:?} exists and is owned by role {owner:?}, not by {role:?}; \
                 the agent does not take over a database it did not create: set another \
                 app_database, or run `ALTER DATABASE {database} OWNER TO {role}` if it is meant \
                 for this role"
            )));
        }
    }
    Ok(())
}

/// New databases let PUBLIC connect; on a shared server that means every other role.
async fn revoke_public_access(
    admin: &Session<'_>,
    out: &mut Provisioned,
) -> Result<(), DatabaseError> {
    let role = admin.settings.app_role.as_str();
    let database = admin.settings.app_database.as_str();
    let public_has_access: bool = column(
        &admin
            .query_one(
                "read the privileges of the application database",
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database d, \
             pg_catalog.aclexplode(coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) a \
             WHERE d.datname = $1 AND a.grantee = 0)",
                &[&database],
            )
            .await?,
        0,
        "read the privileges of the application database",
    )?;
    if public_has_access {
        admin.ensure_can_act_as(role).await?;
        admin
            .execute(
                &format!("revoke PUBLIC's privileges on database {database:?}"),
                &format!(
                    "REVOKE ALL ON DATABASE {} FROM PUBLIC",
                    sql::quote_ident(database)
                ),
            )
            .await?;
        tracing::info!(
            database,
            "revoked PUBLIC's privileges on the application database"
        );
        out.changed = true;
    }
    Ok(())
}

/// Step 3: the role's password matches the stored one (or the rotation's), proven by logging
/// in with it; returns that login.
async fn converge_password(
    admin: &Session<'_>,
    tls: &Tls,
    store: &SecretStore,
    passwords: &Passwords,
    out: &mut Provisioned,
) -> Result<Client, DatabaseError> {
    let settings = admin.settings;
    let role = settings.app_role.as_str();
    let target = passwords.target();
    let stored = &passwords.stored;
    Ok(if passwords.rotating {
        // `target` is the pending password here; a role created above already has it.
        if !out.role_created {
            admin
                .execute(
                    &format!("set the password of role {role:?}"),
                    &sql::role_statement("ALTER", role, target),
                )
                .await?;
            out.password_set = true;
        }
        store.promote_pending(target)?;
        tracing::info!(role, "rotated the application role's password");
        login_as_app(settings, tls, target).await?
    } else {
        let mut client = None;
        if let Some(leftover) = &passwords.pending {
            match try_login_as_app(settings, tls, leftover).await {
                Ok(c) => {
                    store.promote_pending(leftover)?;
                    tracing::info!(role, "finished a password rotation that was interrupted");
                    out.changed = true;
                    client = Some(c);
                }
                Err(f) if f.is_wrong_password() => {
                    store.discard_pending()?;
                    tracing::info!(
                        role,
                        "discarded the password of an interrupted rotation that never reached the server"
                    );
                }
                Err(f) => return Err(f.into_error(settings, &app_login(settings, leftover))),
            }
        }
        match client {
            Some(c) => c,
            None => match try_login_as_app(settings, tls, stored).await {
                Ok(c) => c,
                Err(f) if f.is_wrong_password() => {
                    // The role exists with another password: the stored file was lost and
                    // regenerated, a run was killed between storing and CREATE/ALTER, or
                    // someone changed it. The file wins.
                    admin
                        .execute(
                            &format!("set the password of role {role:?}"),
                            &sql::role_statement("ALTER", role, stored),
                        )
                        .await?;
                    tracing::info!(
                        role,
                        "set the application role's password to the stored one"
                    );
                    out.password_set = true;
                    login_as_app(settings, tls, stored).await?
                }
                Err(f) => return Err(f.into_error(settings, &app_login(settings, stored))),
            },
        }
    })
}

/// The role may create tables in `public` of its database (granted where the schema's owner
/// does not allow it by default).
async fn ensure_schema_access(
    settings: &DatabaseSettings,
    admin_login: &Login<'_>,
    tls: &Tls,
    app_client: Client,
    out: &mut Provisioned,
) -> Result<(), DatabaseError> {
    let role = settings.app_role.as_str();
    let database = settings.app_database.as_str();
    let app = Session {
        client: app_client,
        settings,
    };
    if !app.can_create_tables().await? {
        // A database whose `public` schema the owner does not control: PostgreSQL 14 or older
        // with a template hardened by `REVOKE CREATE ON SCHEMA public FROM PUBLIC`.
        grant_public_schema(settings, tls, admin_login, role).await?;
        out.changed = true;
        if !app.can_create_tables().await? {
            return Err(DatabaseError::Conflict(format!(
                "role {role:?} still cannot create tables in schema public of database \
                 {database:?} after GRANT; check the schema's owner and privileges"
            )));
        }
    }
    Ok(())
}

fn app_login<'a>(settings: &'a DatabaseSettings, password: &'a Secret) -> Login<'a> {
    Login {
        user: &settings.app_role,
        password: Some(password),
        database: &settings.app_database,
    }
}

async fn try_login_as_app(
    settings: &DatabaseSettings,
    tls: &Tls,
    password: &Secret,
) -> Result<Client, ConnectFailure> {
    connect::connect(settings, tls, &app_login(settings, password)).await
}

async fn login_as_app(
    settings: &DatabaseSettings,
    tls: &Tls,
    password: &Secret,
) -> Result<Client, DatabaseError> {
    try_login_as_app(settings, tls, password)
        .await
        .map_err(|f| f.into_error(settings, &app_login(settings, password)))
}

/// `GRANT USAGE, CREATE ON SCHEMA public` from an admin connection to the application
/// database (a schema grant is made inside the database that holds the schema).
async fn grant_public_schema(
    settings: &DatabaseSettings,
    tls: &Tls,
    admin_login: &Login<'_>,
    role: &str,
) -> Result<(), DatabaseError> {
    let login = Login {
        database: &settings.app_database,
        ..*admin_login
    };
    let client = connect::connect(settings, tls, &login)
        .await
        .map_err(|f| f.into_error(settings, &login))?;
    let session = Session { client, settings };
    session
        .execute(
            &format!("grant role {role:?} the use of schema public"),
            &format!(
                "GRANT USAGE, CREATE ON SCHEMA public TO {}",
                sql::quote_ident(role)
            ),
        )
        .await?;
    tracing::info!(role, "granted the application role CREATE on schema public");
    Ok(())
}

/// A connection plus the per-statement deadline and error mapping.
struct Session<'a> {
    client: Client,
    settings: &'a DatabaseSettings,
}

impl Session<'_> {
    async fn query_opt(
        &self,
        context: &str,
        query: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, DatabaseError> {
        self.timed(context, self.client.query_opt(query, params))
            .await
    }

    async fn query_one(
        &self,
        context: &str,
        query: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, DatabaseError> {
        self.timed(context, self.client.query_one(query, params))
            .await
    }

    /// Runs one utility statement through the simple-query protocol (no parameters: the
    /// text was built with [`sql::quote_ident`] and [`sql::quote_literal`]). The statement
    /// is never logged: it may carry a password verifier.
    async fn execute(&self, context: &str, statement: &str) -> Result<(), DatabaseError> {
        self.timed(context, self.client.batch_execute(statement))
            .await
    }

    async fn timed<T>(
        &self,
        context: &str,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DatabaseError> {
        let deadline = self.settings.statement_timeout();
        match tokio::time::timeout(deadline, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.code().is_none() && lost_connection(&e) => {
                // The server went away mid-run: as transient as not reaching it at all.
                Err(DatabaseError::Unreachable {
                    host: self.settings.host.clone(),
                    port: self.settings.port,
                    source: Box::new(e),
                })
            }
            Ok(Err(e)) => Err(DatabaseError::query(context, e)),
            Err(_) => Err(DatabaseError::query(
                context,
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {}s", deadline.as_secs()),
                ),
            )),
        }
    }

    /// If the admin is not a superuser (an RDS master user is not), `CREATE DATABASE … OWNER`
    /// and changing the database's privileges need it to be able to act as the owner role.
    /// Since PostgreSQL 16 that means the SET option of a membership, which the creator of a
    /// role does not get by default; before 16, plain membership.
    async fn ensure_can_act_as(&self, role: &str) -> Result<(), DatabaseError> {
        let row = self
            .query_one(
                "check the admin's privileges",
                "SELECT r.rolsuper, pg_catalog.current_setting('server_version_num')::int \
                 FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await?;
        let context = "check the admin's privileges";
        let superuser: bool = column(&row, 0, context)?;
        let version: i32 = column(&row, 1, context)?;
        if superuser {
            return Ok(());
        }
        let privilege = if version >= 160000 { "SET" } else { "MEMBER" };
        let context = "check the admin's membership in the application role";
        let can: bool = column(
            &self
                .query_one(
                    context,
                    "SELECT pg_catalog.pg_has_role($1, $2)",
                    &[&role, &privilege],
                )
                .await?,
            0,
            context,
        )?;
        if !can {
            self.execute(
                &format!("grant role {role:?} to the admin"),
                &format!("GRANT {} TO CURRENT_USER", sql::quote_ident(role)),
            )
            .await?;
            tracing::info!(role, "granted the application role to the admin user");
        }
        Ok(())
    }

    /// Whether the connected role may create tables in `public` of the current database.
    async fn can_create_tables(&self) -> Result<bool, DatabaseError> {
        let row = self
            .query_one(
                "check the application role's privileges",
                // Two calls: a comma list in has_schema_privilege means "any of".
                "SELECT coalesce((SELECT pg_catalog.has_schema_privilege(n.oid, 'USAGE') \
                 AND pg_catalog.has_schema_privilege(n.oid, 'CREATE') \
                 FROM pg_catalog.pg_namespace n WHERE n.nspname = 'public'), false)",
                &[],
            )
            .await?;
        column(&row, 0, "check the application role's privileges")
    }
}

/// A typed column; a type mismatch is reported, not a panic (`Row::get` would panic).
fn column<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r tokio_postgres::Row,
    index: usize,
    context: &str,
) -> Result<T, DatabaseError> {
    row.try_get(index)
        .map_err(|e| DatabaseError::query(context, e))
}

fn lost_connection(err: &tokio_postgres::Error) -> bool {
    // See connect.rs: the error kind is only visible through its fixed Display text.
    err.is_closed()
        || err
            .to_string()
            .starts_with("error communicating with the server")
}
