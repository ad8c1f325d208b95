//! Database provisioning against a real PostgreSQL 15 (a throwaway cluster per test, on
//! 127.0.0.1: the harness's loopback `Postgres`, see support/pg.rs). Needs root: the cluster
//! runs as the `postgres` user.

mod support;

mod database {
    use std::error::Error;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use pilot_agent::database::{
        DatabaseError, DatabaseSettings, Provisioned, Secret, TlsMode, provision, read_password,
    };
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio_postgres::error::SqlState;

    use crate::support::pg::{self, PostgresOptions, SUPERUSER, TestCluster};

    const ROLE: &str = "pilot_app";
    const DB: &str = "pilot";

    fn settings(c: &TestCluster) -> DatabaseSettings {
        let mut s = DatabaseSettings::new(pg::HOST, SUPERUSER);
        s.port = c.port();
        s.admin_password = Some(Secret::new(c.password()));
        s.tls = TlsMode::Disable;
        s
    }

    /// The agent's state directory (made by provision itself) and the password file in it.
    struct State {
        _dir: tempfile::TempDir,
        secret: PathBuf,
    }

    fn state() -> State {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("state/database-password");
        State { _dir: dir, secret }
    }

    fn pending(secret: &Path) -> PathBuf {
        PathBuf::from(format!("{}.pending", secret.display()))
    }

    /// Every message of the error chain plus the Debug form: what any log line could show.
    fn everything_printed(e: &DatabaseError) -> String {
        let mut out = format!("{e:?}\n");
        let mut cur: Option<&dyn Error> = Some(e);
        while let Some(err) = cur {
            out.push_str(&format!("{err}\n"));
            cur = err.source();
        }
        out
    }

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    async fn app_creates_a_table(c: &TestCluster, password: &str) {
        let app = c
            .connect(ROLE, password, DB)
            .await
            .expect("app role logs in");
        app.batch_execute(
            "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text);
             INSERT INTO notes (body) VALUES ('hello');",
        )
        .await
        .expect("app role creates a table in its database");
        let n: i64 = app
            .query_one("SELECT count(*) FROM notes", &[])
            .await
            .unwrap()
            .get(0);
        assert!(n >= 1);
    }

    async fn assert_wrong_password(c: &TestCluster, password: &str) {
        let err = c
            .connect(ROLE, password, DB)
            .await
            .expect_err("login with this password must fail");
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
    }

    /// A run killed during `CREATE DATABASE` leaves its backend finishing the statement; the
    /// next run must wait for it (advisory lock) instead of colliding with it. Simulated by a
    /// session that holds the provisioning lock while it creates role and database itself:
    /// provision stays blocked until the lock is released, then adopts what it finds.
    #[tokio::test]
    async fn provision_waits_for_a_concurrent_provisioning_session() {
        let c = TestCluster::start().unwrap();
        let st = state();
        let other = c.superuser().await.unwrap();
        other
            .batch_execute(&format!(
                "SELECT pg_advisory_lock(hashtext('pilot-agent provision {ROLE}'))"
            ))
            .await
            .unwrap();
        let settings = settings(&c);
        let secret = st.secret.clone();
        let run = tokio::spawn(async move { provision(&settings, &secret, false).await });
        // Observed, not assumed: the server shows provision's session waiting on the lock.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(!run.is_finished(), "provision did not wait for the lock");
            let waiting: i64 = other
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "provision never queued on the lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Separate statements: CREATE DATABASE cannot share an (implicit) transaction.
        for statement in [
            format!("CREATE ROLE {ROLE} LOGIN"),
            format!("CREATE DATABASE {DB} OWNER {ROLE}"),
        ] {
            other.batch_execute(&statement).await.unwrap();
        }
        other
            .batch_execute(&format!(
                "SELECT pg_advisory_unlock(hashtext('pilot-agent provision {ROLE}'))"
            ))
            .await
            .unwrap();
        let out = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("provision still blocked after the lock was released")
            .unwrap()
            .unwrap();
        assert!(!out.role_created && !out.database_created, "{out:?}");
        assert!(
            out.password_set,
            "the adopted role gets the stored password: {out:?}"
        );
    }

    #[tokio::test]
    async fn first_provision_creates_role_and_database_usable_by_the_app() {
        let c = TestCluster::start().unwrap();
        eprintln!("timing: cluster start {:?}", c.start_duration());
        let st = state();
        let t = Instant::now();
        let out = provision(&settings(&c), &st.secret, false).await.unwrap();
        eprintln!("timing: first provision {:?}", t.elapsed());
        assert_eq!(
            out,
            Provisioned {
                changed: true,
                role_created: true,
                database_created: true,
                password_set: true
            }
        );

        let password = read_password(&st.secret).unwrap();
        assert_eq!(password.expose().len(), 43);
        assert_eq!(mode(&st.secret), 0o600);
        assert_eq!(mode(st.secret.parent().unwrap()), 0o700);
        assert!(!pending(&st.secret).exists());
        app_creates_a_table(&c, password.expose()).await;

        // The role has LOGIN and nothing more, and owns its database.
        let admin = c.superuser().await.unwrap();
        let row = admin
            .query_one(
                "SELECT rolsuper, rolcreatedb, rolcreaterole, rolcanlogin, \
                 (SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $2) \
                 FROM pg_roles WHERE rolname = $1",
                &[&ROLE, &DB],
            )
            .await
            .unwrap();
        assert!(!row.get::<_, bool>(0) && !row.get::<_, bool>(1) && !row.get::<_, bool>(2));
        assert!(row.get::<_, bool>(3));
        assert_eq!(row.get::<_, String>(4), ROLE);

        // Other roles on the server cannot open the application's database.
        admin
            .batch_execute("CREATE ROLE other LOGIN PASSWORD 'other-pw'")
            .await
            .unwrap();
        let err = c.connect("other", "other-pw", DB).await.err().unwrap();
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{err:?}"
        );

        // Only a SCRAM verifier reached the server: the plain text is not in its log.
        let log = c.log_text();
        assert!(log.contains("SCRAM-SHA-256$4096:"), "statements are logged");
        assert!(
            !log.contains(password.expose()),
            "plain-text password in the server log"
        );
    }

    #[tokio::test]
    async fn second_provision_changes_nothing() {
        let c = TestCluster::start().unwrap();
        let st = state();
        let s = settings(&c);
        provision(&s, &st.secret, false).await.unwrap();
        let before = std::fs::metadata(&st.secret).unwrap();
        let password = read_password(&st.secret).unwrap();
        let log_before = c.log_text();

        let t = Instant::now();
        let out = provision(&s, &st.secret, false).await.unwrap();
        eprintln!("timing: converged provision {:?}", t.elapsed());
        assert_eq!(out, Provisioned::default(), "nothing to do");

        let after = std::fs::metadata(&st.secret).unwrap();
        assert_eq!((after.ino(), after.mtime()), (before.ino(), before.mtime()));
        assert_eq!(
            read_password(&st.secret).unwrap().expose(),
            password.expose()
        );
        let log = c.log_text();
        for statement in [
            "ALTER ROLE",
            "CREATE ROLE",
            "CREATE DATABASE",
            "REVOKE",
            "GRANT",
        ] {
            assert_eq!(
                count(&log, statement),
                count(&log_before, statement),
                "a converged run must not run {statement}"
            );
        }
        app_creates_a_table(&c, password.expose()).await;
    }

    #[tokio::test]
    async fn rotation_replaces_the_password_on_server_and_disk() {
        let c = TestCluster::start().unwrap();
        let st = state();
        let s = settings(&c);
        provision(&s, &st.secret, false).await.unwrap();
        let old = read_password(&st.secret).unwrap();
        app_creates_a_table(&c, old.expose()).await;

        let t = Instant::now();
        let out = provision(&s, &st.secret, true).await.unwrap();
        eprintln!("timing: rotation {:?}", t.elapsed());
        assert_eq!(
            out,
            Provisioned {
                changed: true,
                role_created: false,
                database_created: false,
                password_set: true
            }
        );
        let new = read_password(&st.secret).unwrap();
        assert_ne!(new.expose(), old.expose());
        assert_eq!(mode(&st.secret), 0o600);
        assert!(!pending(&st.secret).exists(), "pending file promoted");
        app_creates_a_table(&c, new.expose()).await;
        assert_wrong_password(&c, old.expose()).await;

        // And it stays put afterwards.
        let out = provision(&s, &st.secret, false).await.unwrap();
        assert!(!out.changed);
        assert_eq!(read_password(&st.secret).unwrap().expose(), new.expose());
    }

    /// Recovery behaviour: the stored file is the source of truth. When it is lost while the
    /// role exists, a new password is made and the role is set to it.
    #[tokio::test]
    async fn lost_password_file_is_regenerated_and_the_role_reset() {
        let c = TestCluster::start().unwrap();
        let st = state();
        let s = settings(&c);
        provision(&s, &st.secret, false).await.unwrap();
        let old = read_password(&st.secret).unwrap();
        app_creates_a_table(&c, old.expose()).await;

        std::fs::remove_file(&st.secret).unwrap();
        let out = provision(&s, &st.secret, false).await.unwrap();
        assert_eq!(
            out,
            Provisioned {
                changed: true,
                role_created: false,
                database_created: false,
                password_set: true
            }
        );
        let new = read_password(&st.secret).unwrap();
        assert_ne!(new.expose(), old.expose());
        assert_eq!(mode(&st.secret), 0o600);
        app_creates_a_table(&c, new.expose()).await; // the table made before is still there
        assert_wrong_password(&c, old.expose()).await;
    }

    /// A run killed after storing the password and before CREATE/ALTER ROLE, or a password
    /// changed behind the agent's back: the next run makes the role match the file.
    #[tokio::test]
    async fn role_password_differing_from_the_file_is_healed() {
        let c = TestCluster::start().unwrap();
        let st = state();
        let s = settings(&c);

        // Killed before CREATE ROLE: the file exists (here pre-seeded), the role does not.
        std::fs::create_dir_all(st.secret.parent().unwrap()).unwrap();
        std::fs::write(&st.secret, "seeded-by-an-earlier-run\n").unwrap();
        let out = provision(&s, &st.secret, false).await.unwrap();
        assert!(out.role_created && out.password_set);
        assert_eq!(
            read_password(&st.secret).unwrap().expose(),
            "seeded-by-an-earlier-run",
            "an existing file is never regenerated"
        );
        app_creates_a_table(&c, "seeded-by-an-earlier-run").await;

        // Killed before ALTER ROLE: the role has another password than the file.
        let admin = c.superuser().await.unwrap();
        admin
            .batch_execute("ALTER ROLE pilot_app PASSWORD 'not-the-stored-one'")
            .await
            .unwrap();
        let out = provision(&s, &st.secret, false).await.unwrap();
        assert_eq!(
            out,
            Provisioned {
                changed: true,
                role_created: false,
                database_created: false,
                password_set: true
            }
        );
        app_creates_a_table(&c, "seeded-by-an-earlier-run").await;
        assert_wrong_password(&c, "not-the-stored-one").await;

        // A role that lost LOGIN gets it back.
        admin
            .batch_execute("ALTER ROLE pilot_app NOLOGIN")
            .await
            .unwrap();
        let out = provision(&s, &st.secret, false).await.unwrap();
        assert!(out.changed && !out.password_set);
        app_creates_a_table(&c, "seeded-by-an-earlier-run").await;
    }

    /// A rotation killed between writing the pending password and promoting it: the next run
    /// (without --rotate) asks the server which password the role has.
    #[tokio::test]
    async fn interrupted_rotation_settles_by_asking_the_server() {
        let c = TestCluster::start().unwrap();
        let st = state();
        let s = settings(&c);
        provision(&s, &st.secret, false).await.unwrap();
        let stored = read_password(&st.secret).unwrap();

        // Killed before ALTER ROLE: the pending password never reached the server.
        std::fs::write(pending(&st.secret), "pending-never-applied\n").unwrap();
        let log_before = c.log_text();
        let out = provision(&s, &st.secret, false).await.unwrap();
        assert!(!out.password_set, "{out:?}");
        assert_eq!(read_password(&st.secret).unwrap().expose(), stored.expose());
        assert!(
            !pending(&st.secret).exists(),
            "stale pending file discarded"
        );
        assert_eq!(
            count(&c.log_text(), "ALTER ROLE"),
            count(&log_before, "ALTER ROLE")
        );
        app_creates_a_table(&c, stored.expose()).await;

        // Killed after ALTER ROLE committed, before the rename: the rotation is finished.
        std::fs::write(pending(&st.secret), "pending-applied\n").unwrap();
        let admin = c.superuser().await.unwrap();
        admin
            .batch_execute("ALTER ROLE pilot_app PASSWORD 'pending-applied'")
            .await
            .unwrap();
        let log_before = c.log_text();
        let out = provision(&s, &st.secret, false).await.unwrap();
        assert!(out.changed && !out.password_set, "{out:?}");
        assert_eq!(
            read_password(&st.secret).unwrap().expose(),
            "pending-applied"
        );
        assert!(!pending(&st.secret).exists());
        assert_eq!(
            count(&c.log_text(), "ALTER ROLE"),
            count(&log_before, "ALTER ROLE")
        );
        app_creates_a_table(&c, "pending-applied").await;
        assert_wrong_password(&c, stored.expose()).await;
    }

    #[tokio::test]
    async fn unreachable_server_fails_fast_and_is_transient() {
        let st = state();

        // Nothing listens: refused at once.
        let mut s = DatabaseSettings::new(pg::HOST, SUPERUSER);
        s.port = pg::free_port().unwrap();
        s.tls = TlsMode::Disable;
        s.admin_password = Some(Secret::new("admin-secret-xyz"));
        s.connect_timeout_secs = 2;
        let t = Instant::now();
        let err = provision(&s, &st.secret, false).await.unwrap_err();
        eprintln!("timing: refused {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(
            matches!(&err, DatabaseError::Unreachable { port, .. } if *port == s.port),
            "{err:?}"
        );
        assert!(err.is_transient());
        let printed = everything_printed(&err);
        assert!(!printed.contains("admin-secret-xyz"), "{printed}");
        // The password was stored first (it is persisted before the server is used) and is
        // not in the error either.
        let stored = read_password(&st.secret).unwrap();
        assert!(!printed.contains(stored.expose()), "{printed}");

        // A server that accepts and never answers: bounded by connect_timeout_secs.
        let listener = tokio::net::TcpListener::bind((pg::HOST, 0)).await.unwrap();
        s.port = listener.local_addr().unwrap().port();
        s.connect_timeout_secs = 1;
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let t = Instant::now();
        let err = provision(&s, &st.secret, false).await.unwrap_err();
        let took = t.elapsed();
        eprintln!("timing: silent server {took:?}");
        silent.abort();
        assert!(matches!(err, DatabaseError::Unreachable { .. }), "{err:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(1900),
            "{took:?}"
        );
        assert!(everything_printed(&err).contains("within 1s"), "{err:?}");
        assert_eq!(
            read_password(&st.secret).unwrap().expose(),
            stored.expose(),
            "failed runs never regenerate the password"
        );

        // Bad settings are refused before any connection, naming the field.
        s.app_role = "Bad-Name".into();
        let err = provision(&s, &st.secret, false).await.unwrap_err();
        assert!(
            matches!(
                err,
                DatabaseError::InvalidSetting {
                    field: "app_role",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("app_role"), "{err}");

        // Settings are safe to log.
        assert!(!format!("{s:?}").contains("admin-secret-xyz"));
    }

    #[tokio::test]
    async fn bad_admin_password_is_an_auth_error_and_a_password_file_works() {
        let c = TestCluster::start().unwrap();
        let st = state();
        let mut s = settings(&c);
        s.admin_password = Some(Secret::new("wrong-admin-password"));
        let err = provision(&s, &st.secret, false).await.unwrap_err();
        assert!(
            matches!(&err, DatabaseError::Auth { user, .. } if user == SUPERUSER),
            "{err:?}"
        );
        assert!(!err.is_transient());
        let printed = everything_printed(&err);
        assert!(
            printed.contains("password authentication failed"),
            "{printed}"
        );
        assert!(!printed.contains("wrong-admin-password"), "{printed}");
        assert!(!printed.contains(c.password()), "{printed}");
        let stored = read_password(&st.secret).unwrap();
        assert!(!printed.contains(stored.expose()), "{printed}");

        // The admin password from a file (as written by `echo`: one trailing newline).
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-password");
        std::fs::write(&file, format!("{}\n", c.password())).unwrap();
        s.admin_password = None;
        s.admin_password_file = Some(file.clone());
        let out = provision(&s, &st.secret, false).await.unwrap();
        assert!(out.role_created && out.database_created);
        app_creates_a_table(&c, stored.expose()).await;

        // A missing password file is a Secret error naming the file.
        s.admin_password_file = Some(dir.path().join("missing"));
        let err = provision(&s, &st.secret, false).await.unwrap_err();
        assert!(matches!(err, DatabaseError::Secret { .. }), "{err:?}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    /// An admin that is not a superuser, like the RDS master user (CREATEROLE CREATEDB).
    #[tokio::test]
    async fn works_with_a_non_superuser_admin_like_rds() {
        let c = TestCluster::start().unwrap();
        let admin = c.superuser().await.unwrap();
        admin
            .batch_execute("CREATE ROLE rds_admin LOGIN CREATEROLE CREATEDB PASSWORD 'rds-pw'")
            .await
            .unwrap();
        let st = state();
        let mut s = settings(&c);
        s.admin_user = "rds_admin".into();
        s.admin_password = Some(Secret::new("rds-pw"));
        let out = provision(&s, &st.secret, false).await.unwrap();
        assert!(out.role_created && out.database_created && out.password_set);
        let password = read_password(&st.secret).unwrap();
        app_creates_a_table(&c, password.expose()).await;
        assert!(!provision(&s, &st.secret, false).await.unwrap().changed);
        let out = provision(&s, &st.secret, true).await.unwrap();
        assert!(out.password_set);
        app_creates_a_table(&c, read_password(&st.secret).unwrap().expose()).await;
    }

    #[tokio::test]
    async fn database_owned_by_another_role_is_a_conflict() {
        let c = TestCluster::start().unwrap();
        let admin = c.superuser().await.unwrap();
        admin.batch_execute("CREATE DATABASE pilot").await.unwrap();
        let st = state();
        let err = provision(&settings(&c), &st.secret, false)
            .await
            .unwrap_err();
        assert!(matches!(err, DatabaseError::Conflict(_)), "{err:?}");
        assert!(
            err.to_string().contains("owned by role \"postgres\""),
            "{err}"
        );
        let owner: String = admin
            .query_one(
                "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = 'pilot'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(owner, "postgres", "never taken over");
    }

    struct TestPki {
        ca_pem: String,
        other_ca_pem: String,
        server_cert_pem: String,
        server_key_pem: String,
    }

    /// A CA and a server certificate for `localhost` only (no IP address in it), plus an
    /// unrelated CA.
    fn test_pki() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let (ca1, ca2) = (ca("test db ca"), ca("unrelated ca"));
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca1).unwrap();
        TestPki {
            ca_pem: ca1.pem(),
            other_ca_pem: ca2.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        }
    }

    #[tokio::test]
    async fn tls_modes_against_a_tls_server() {
        let pki = test_pki();
        let c = TestCluster::start_with(PostgresOptions {
            tls: Some((pki.server_cert_pem.clone(), pki.server_key_pem.clone())),
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        let other_ca_file = dir.path().join("other-ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        std::fs::write(&other_ca_file, &pki.other_ca_pem).unwrap();

        // Each case provisions its own role and database, so every case really connects.
        let cases: [(&str, TlsMode, Option<&Path>, &str, bool); 6] = [
            ("require, no CA", TlsMode::Require, None, "127.0.0.1", true),
            (
                "require + CA (verify-ca), IP not in cert",
                TlsMode::Require,
                Some(&ca_file),
                "127.0.0.1",
                true,
            ),
            (
                "require + unrelated CA",
                TlsMode::Require,
                Some(&other_ca_file),
                "127.0.0.1",
                false,
            ),
            (
                "verify-full, name in cert",
                TlsMode::VerifyFull,
                Some(&ca_file),
                "localhost",
                true,
            ),
            (
                "verify-full, IP not in cert",
                TlsMode::VerifyFull,
                Some(&ca_file),
                "127.0.0.1",
                false,
            ),
            (
                "verify-full, unrelated CA",
                TlsMode::VerifyFull,
                Some(&other_ca_file),
                "localhost",
                false,
            ),
        ];
        for (i, (name, mode, ca, host, ok)) in cases.into_iter().enumerate() {
            let st = state();
            let mut s = settings(&c);
            s.tls = mode;
            s.ca_file = ca.map(Path::to_path_buf);
            s.host = host.into();
            s.app_role = format!("app_{i}");
            s.app_database = format!("db_{i}");
            let t = Instant::now();
            let result = provision(&s, &st.secret, false).await;
            eprintln!("timing: tls case {name:?} {:?}", t.elapsed());
            match (result, ok) {
                (Ok(out), true) => assert!(out.role_created, "{name}"),
                (Err(DatabaseError::Tls { .. }), false) => {}
                (other, _) => panic!("{name}: unexpected {other:?}"),
            }
        }
        // The app logins really used TLS.
        let log = c.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("user=app_3 database=db_3") && l.contains("SSL enabled")),
            "no TLS login of app_3 in the server log"
        );
    }

    #[tokio::test]
    async fn tls_required_but_server_without_tls_is_a_tls_error() {
        let c = TestCluster::start().unwrap();
        let st = state();
        let mut s = settings(&c);
        s.tls = TlsMode::Require;
        let err = provision(&s, &st.secret, false).await.unwrap_err();
        assert!(matches!(err, DatabaseError::Tls { .. }), "{err:?}");
        assert!(!err.is_transient());

        // A CA file that is not PEM is refused before any connection.
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("ca.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        s.tls = TlsMode::VerifyFull;
        s.ca_file = Some(bad);
        let err = provision(&s, &st.secret, false).await.unwrap_err();
        assert!(matches!(err, DatabaseError::Tls { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    // ---- The password guard: no password to a server whose identity was not verified ----

    /// A password that must never leave the agent in these tests.
    const ADMIN_PW: &str = "admin-pw-Qx7-never-on-the-wire";

    /// AuthenticationCleartextPassword and AuthenticationMD5Password (with a salt).
    const ASK_CLEARTEXT: &[u8] = b"R\0\0\0\x08\0\0\0\x03";
    const ASK_MD5: &[u8] = b"R\0\0\0\x0c\0\0\0\x05salt";

    /// A fake PostgreSQL server for one connection: answers an SSLRequest with `S` and a TLS
    /// handshake (certificate self-signed for a name nobody configured) when `tls` is given,
    /// reads the StartupMessage, sends `ask`, and records everything the client sends after
    /// TLS until it hangs up. The recording is the join handle's result.
    async fn fake_server(
        tls: Option<Arc<rustls::ServerConfig>>,
        ask: &'static [u8],
    ) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind((pg::HOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 8];
            tcp.read_exact(&mut first).await.unwrap();
            // SSLRequest: length 8, code 80877103.
            let ssl_request = first == [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
            match (ssl_request, tls) {
                (true, Some(config)) => {
                    tcp.write_all(b"S").await.unwrap();
                    let tls = tokio_rustls::TlsAcceptor::from(config)
                        .accept(tcp)
                        .await
                        .unwrap();
                    serve(tls, Vec::new(), ask).await
                }
                (true, None) => {
                    tcp.write_all(b"N").await.unwrap();
                    serve(tcp, Vec::new(), ask).await
                }
                // No SSLRequest (`tls: disable`): these 8 bytes began the StartupMessage.
                (false, _) => serve(tcp, first.to_vec(), ask).await,
            }
        });
        (port, served)
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        mut seen: Vec<u8>,
        ask: &[u8],
    ) -> Vec<u8> {
        while seen.len() < 4 {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            seen.push(b[0]);
        }
        let len = u32::from_be_bytes(seen[..4].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; len - seen.len()];
        s.read_exact(&mut rest).await.unwrap();
        seen.extend(rest);
        s.write_all(ask).await.unwrap();
        s.flush().await.unwrap();
        // Whatever comes next, until the client hangs up (or 5 s: then it is still waiting,
        // which the test reports as a failure of provision, not here).
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    }

    /// A TLS server configuration whose certificate is self-signed for `elsewhere.invalid`:
    /// it verifies for no configured name and no CA.
    fn unverifiable_tls() -> Arc<rustls::ServerConfig> {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["elsewhere.invalid".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
        Arc::new(config)
    }

    /// The typed frontend messages after the StartupMessage (type byte, length, body).
    fn frontend_types_after_startup(seen: &[u8]) -> Vec<u8> {
        let startup = u32::from_be_bytes(seen[..4].try_into().unwrap()) as usize;
        let mut rest = &seen[startup..];
        let mut types = Vec::new();
        while rest.len() >= 5 {
            types.push(rest[0]);
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            rest = &rest[(1 + len).min(rest.len())..];
        }
        types
    }

    /// The fake server asked for the admin password in a readable form; the agent must have
    /// refused with UnverifiedServer and sent nothing but its StartupMessage.
    async fn assert_refused_and_nothing_sent(
        s: &DatabaseSettings,
        served: tokio::task::JoinHandle<Vec<u8>>,
        method: &str,
        reason: &str,
    ) {
        let st = state();
        let err = tokio::time::timeout(Duration::from_secs(10), provision(s, &st.secret, false))
            .await
            .expect("provision hung on the fake server")
            .unwrap_err();
        let seen = served.await.unwrap();
        // The recording is real: the fake server got the decrypted StartupMessage.
        assert!(
            seen.windows(13).any(|w| w == b"user\0postgres"),
            "no StartupMessage recorded: {seen:?}"
        );
        assert!(
            !seen
                .windows(ADMIN_PW.len())
                .any(|w| w == ADMIN_PW.as_bytes()),
            "the password reached the fake server"
        );
        assert_eq!(
            frontend_types_after_startup(&seen),
            Vec::<u8>::new(),
            "the agent answered the {method} request"
        );
        match &err {
            DatabaseError::UnverifiedServer {
                host,
                port,
                user,
                method: m,
                reason: r,
            } => {
                assert_eq!((host.as_str(), *port), (pg::HOST, s.port));
                assert_eq!((user.as_str(), *m, *r), (SUPERUSER, method, reason));
            }
            other => panic!("expected UnverifiedServer, got {other:?}"),
        }
        assert!(!err.is_transient());
        let printed = everything_printed(&err);
        for part in [
            format!("{}:{}", pg::HOST, s.port),
            method.to_string(),
            "tls: verify-full".to_string(),
            "ca_file".to_string(),
            "scram-sha-256".to_string(),
            "sent no password".to_string(),
        ] {
            assert!(printed.contains(&part), "{part:?} missing from: {printed}");
        }
        assert!(!printed.contains(ADMIN_PW), "{printed}");
    }

    fn fake_settings(port: u16, tls: TlsMode) -> DatabaseSettings {
        let mut s = DatabaseSettings::new(pg::HOST, SUPERUSER);
        s.port = port;
        s.tls = tls;
        s.admin_password = Some(Secret::new(ADMIN_PW));
        s.connect_timeout_secs = 5;
        s
    }

    /// The case: `tls: require` (the default) accepts any certificate, so whoever
    /// answers on the path can ask for the password in clear or as MD5. Refused, unsent.
    #[tokio::test]
    async fn unverified_tls_server_asking_for_cleartext_or_md5_gets_no_password() {
        assert_eq!(TlsMode::default(), TlsMode::Require);
        for (ask, method) in [
            (ASK_CLEARTEXT, "cleartext password"),
            (ASK_MD5, "MD5 password"),
        ] {
            let (port, served) = fake_server(Some(unverifiable_tls()), ask).await;
            let s = fake_settings(port, TlsMode::Require);
            assert_refused_and_nothing_sent(
                &s,
                served,
                method,
                "tls: require without ca_file checks no certificate",
            )
            .await;
        }
    }

    /// Without TLS nobody is verified either: the same rule (SCRAM still works there, see
    /// `scram_logins_use_channel_binding_when_tls_is_on`).
    #[tokio::test]
    async fn plaintext_server_asking_for_cleartext_or_md5_gets_no_password() {
        for (ask, method) in [
            (ASK_CLEARTEXT, "cleartext password"),
            (ASK_MD5, "MD5 password"),
        ] {
            let (port, served) = fake_server(None, ask).await;
            let s = fake_settings(port, TlsMode::Disable);
            assert_refused_and_nothing_sent(&s, served, method, "tls: disable, no TLS at all")
                .await;
        }
    }

    /// A TLS cluster whose pg_hba.conf asks every TCP client for a cleartext password.
    async fn cluster_asking_for_cleartext(pki: &TestPki) -> TestCluster {
        let c = TestCluster::start_with(PostgresOptions {
            tls: Some((pki.server_cert_pem.clone(), pki.server_key_pem.clone())),
        })
        .unwrap();
        let hba = c.data_dir().join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).unwrap();
        // First match wins: this line comes before initdb's scram-sha-256 ones.
        std::fs::write(&hba, format!("host all all 127.0.0.1/32 password\n{text}")).unwrap();
        let admin = c.superuser().await.unwrap();
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
        // Observed, not assumed: a new connection is asked for a cleartext password (the
        // postmaster reloads the rules on SIGHUP, asynchronously).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c
            .log_text()
            .contains("identity=\"postgres\" method=password")
        {
            assert!(Instant::now() < deadline, "pg_hba.conf not reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(c.superuser().await.unwrap());
        }
        c
    }

    /// A real server asking for a cleartext password gets it once its certificate verified
    /// (verify-full, or require with the CA), and not otherwise.
    #[tokio::test]
    async fn cleartext_password_goes_only_to_a_verified_server() {
        let pki = test_pki();
        let c = cluster_asking_for_cleartext(&pki).await;
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        let cases = [
            (
                "verify-full",
                TlsMode::VerifyFull,
                Some(&ca_file),
                "localhost",
                None,
            ),
            (
                "require + CA",
                TlsMode::Require,
                Some(&ca_file),
                "127.0.0.1",
                None,
            ),
            (
                "require, no CA",
                TlsMode::Require,
                None,
                "127.0.0.1",
                Some("tls: require without ca_file checks no certificate"),
            ),
            (
                "disable",
                TlsMode::Disable,
                None,
                "127.0.0.1",
                Some("tls: disable, no TLS at all"),
            ),
        ];
        for (i, (name, mode, ca, host, refused)) in cases.into_iter().enumerate() {
            let st = state();
            let mut s = settings(&c);
            s.tls = mode;
            s.ca_file = ca.cloned();
            s.host = host.into();
            s.app_role = format!("app_{i}");
            s.app_database = format!("db_{i}");
            let result = provision(&s, &st.secret, false).await;
            match (result, refused) {
                (Ok(out), None) => assert!(out.role_created, "{name}"),
                (Err(DatabaseError::UnverifiedServer { method, reason, .. }), Some(why)) => {
                    assert_eq!((method, reason), ("cleartext password", why), "{name}");
                }
                (other, _) => panic!("{name}: unexpected {other:?}"),
            }
        }
        // The server really asked for (and got) cleartext passwords, over TLS.
        let log = c.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("user=app_0 database=db_0") && l.contains("SSL enabled")),
            "no TLS login of app_0: {log}"
        );
        for role in ["app_0", "app_1"] {
            assert!(
                log.contains(&format!("identity=\"{role}\" method=password")),
                "no cleartext password login of {role} in the server log"
            );
        }
    }

    /// Log lines of the agent, captured (the tests run on one thread: `#[tokio::test]`).
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    /// The logins' methods as the agent logged them: `(user, method)`.
    fn logins(log: &str) -> Vec<(String, String)> {
        log.lines()
            .filter(|l| l.contains("logged in to the database server"))
            .map(|l| {
                let field = |k: &str| {
                    let at = l.find(&format!(" {k}=")).expect(k) + k.len() + 2;
                    let v = &l[at..];
                    let v = v.strip_prefix('"').map_or_else(
                        || v.split(' ').next().unwrap(),
                        |q| q.split('"').next().unwrap(),
                    );
                    v.to_string()
                };
                (field("user"), field("method"))
            })
            .collect()
    }

    /// SCRAM is answered in every mode (it never shows the password); with TLS on, the agent
    /// binds it to the channel (SCRAM-SHA-256-PLUS), observed on the wire by the guard.
    #[tokio::test]
    async fn scram_logins_use_channel_binding_when_tls_is_on() {
        let cap = Capture::default();
        let writer = cap.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // With a single scoped subscriber, tracing caches a callsite's interest from whichever
        // thread hits it first: another test's thread (no subscriber) would switch the agent's
        // debug line off for this one. A second registered dispatcher makes every callsite
        // ask the current thread's subscriber.
        let _second = tracing::Dispatch::new(tracing_subscriber::registry());
        tracing::callsite::rebuild_interest_cache();

        let pki = test_pki();
        let c = TestCluster::start_with(PostgresOptions {
            tls: Some((pki.server_cert_pem.clone(), pki.server_key_pem.clone())),
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        let cases = [
            (
                TlsMode::VerifyFull,
                Some(&ca_file),
                "localhost",
                "SCRAM-SHA-256-PLUS",
            ),
            (TlsMode::Require, None, "127.0.0.1", "SCRAM-SHA-256-PLUS"),
            (TlsMode::Disable, None, "127.0.0.1", "SCRAM-SHA-256"),
        ];
        for (i, (mode, ca, host, want)) in cases.into_iter().enumerate() {
            let st = state();
            let mut s = settings(&c);
            s.tls = mode;
            s.ca_file = ca.cloned();
            s.host = host.into();
            s.app_role = format!("app_{i}");
            s.app_database = format!("db_{i}");
            provision(&s, &st.secret, false).await.unwrap();
            let log = cap.take();
            let seen = logins(&log);
            // The admin, then the new role twice (the password check, then CREATE access).
            assert!(seen.len() >= 2, "{mode}: {log}");
            assert!(seen.iter().any(|(u, _)| u == SUPERUSER), "{mode}: {log}");
            assert!(seen.iter().any(|(u, _)| *u == s.app_role), "{mode}: {log}");
            for (user, method) in &seen {
                assert_eq!(method, want, "{mode}, {user}: {log}");
            }
            assert!(!log.contains(c.password()), "admin password in the log");
            let stored = read_password(&st.secret).unwrap();
            assert!(!log.contains(stored.expose()), "app password in the log");
        }
    }

    /// Relays a TLS connection: terminates the client's TLS with `front` (any certificate will
    /// do under `tls: require`), opens its own TLS to the real server (verified with the
    /// fixture's CA) and copies the protocol both ways: a man in the middle on the path.
    async fn tls_relay(front: Arc<rustls::ServerConfig>, server_port: u16, ca_pem: &str) -> u16 {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let back = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let listener = tokio::net::TcpListener::bind((pg::HOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (front, back) = (front.clone(), back.clone());
                tokio::spawn(async move {
                    let mut ssl_request = [0u8; 8];
                    client.read_exact(&mut ssl_request).await?;
                    client.write_all(b"S").await?;
                    let mut client = tokio_rustls::TlsAcceptor::from(front)
                        .accept(client)
                        .await?;
                    let mut server =
                        tokio::net::TcpStream::connect((pg::HOST, server_port)).await?;
                    server.write_all(&ssl_request).await?;
                    let mut answer = [0u8; 1];
                    server.read_exact(&mut answer).await?;
                    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                    let mut server = tokio_rustls::TlsConnector::from(back)
                        .connect(name, server)
                        .await?;
                    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
                    Ok::<_, std::io::Error>(())
                });
            }
        });
        port
    }

    /// Channel binding, observed at the server: under `tls: require` (no certificate check) a
    /// relay that terminates TLS can put itself on the path, but the SCRAM-SHA-256-PLUS login
    /// the agent makes is bound to the relay's certificate, so the real server refuses to let
    /// it through. The same relay passes an unbound login (the control), so the relay works
    /// and channel binding is what stopped it.
    #[tokio::test]
    async fn a_tls_relay_cannot_pass_the_scram_login_on() {
        let pki = test_pki();
        let c = TestCluster::start_with(PostgresOptions {
            tls: Some((pki.server_cert_pem.clone(), pki.server_key_pem.clone())),
        })
        .unwrap();
        let relay = tls_relay(unverifiable_tls(), c.port(), &pki.ca_pem).await;

        // Control: tokio-postgres without channel binding logs in through the relay.
        let provider = pilot_agent::tls::provider();
        let any_cert = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(pilot_agent::tls::SignaturesOnly::new(
                &provider,
            )))
            .with_no_client_auth();
        let mut config = tokio_postgres::Config::new();
        config
            .host(pg::HOST)
            .port(relay)
            .user(SUPERUSER)
            .password(c.password())
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .channel_binding(tokio_postgres::config::ChannelBinding::Disable);
        let (client, connection) = config
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(any_cert))
            .await
            .expect("an unbound login passes through the relay");
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await.unwrap();
        drop(client);

        // The agent, with the default `tls: require`, through the same relay.
        let st = state();
        let mut s = settings(&c);
        s.port = relay;
        s.tls = TlsMode::Require;
        let err = provision(&s, &st.secret, false).await.unwrap_err();
        assert!(
            matches!(&err, DatabaseError::Auth { user, .. } if user == SUPERUSER),
            "{err:?}"
        );
        let printed = everything_printed(&err);
        assert!(printed.contains("channel binding"), "{printed}");
        assert!(!printed.contains(c.password()), "{printed}");
        assert!(
            c.log_text().contains("SCRAM channel binding check failed"),
            "the server did not see a bound login"
        );
    }
}
