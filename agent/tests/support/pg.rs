//! The agent tests' PostgreSQL: the harness's loopback cluster
//! ([`pilot_harness::Postgres::start_loopback`]: initdb as `postgres`, 127.0.0.1 and a free
//! port, every statement and connection logged, TLS on request, stopped on drop and found by
//! `scripts/harness-clean` after a crash) plus tokio-postgres connections to it.

use std::ops::Deref;
use std::time::Duration;

use anyhow::{Context, Result};
use pilot_harness::Postgres;

pub use pilot_harness::free_loopback_port as free_port;
pub use pilot_harness::postgres::{PostgresOptions, SUPERUSER};

/// Where the cluster listens.
pub const HOST: &str = "127.0.0.1";

/// A loopback cluster; everything of [`Postgres`] through `Deref`, plus clients.
pub struct TestCluster(Postgres);

impl TestCluster {
    pub fn start() -> Result<TestCluster> {
        TestCluster::start_with(PostgresOptions::default())
    }

    pub fn start_with(options: PostgresOptions) -> Result<TestCluster> {
        Postgres::start_loopback(&options).map(TestCluster)
    }

    /// Connects without TLS as `user`.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(HOST)
            .port(self.port())
            .user(user)
            .password(password)
            .dbname(database)
            .connect_timeout(Duration::from_secs(5));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A superuser connection to the `postgres` database (this shadows
    /// [`Postgres::superuser`], the superuser's name: [`SUPERUSER`]).
    pub async fn superuser(&self) -> Result<tokio_postgres::Client> {
        self.connect(SUPERUSER, self.password(), "postgres")
            .await
            .context("cannot connect as the test cluster's superuser")
    }
}

impl Deref for TestCluster {
    type Target = Postgres;
    fn deref(&self) -> &Postgres {
        &self.0
    }
}
