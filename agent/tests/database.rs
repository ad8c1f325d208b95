//! Database provisioning against a real PostgreSQL 15 (a throwaway cluster per test, on
//! 127.0.0.1: the harness's loopback `Postgres`, see support/pg.rs). Needs root: the cluster
//! runs as the `postgres` user.

mod support;

mod database {
    use std::error::Error;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use pilot_agent::database::{
        DatabaseError, DatabaseSettings, Provisioned, Secret, TlsMode, provision, read_password,
    };
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
}
