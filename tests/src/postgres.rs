//! A fresh database per test on the PostgreSQL server named by `FEDGATE_TEST_POSTGRES` (`.ci/postgres` starts
//! one and prints its URL).

use anyhow::{Context, Result, bail};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// Environment variable holding the URL of the test server's maintenance database.
pub const SERVER_VAR: &str = "FEDGATE_TEST_POSTGRES";
/// Environment variable that, set to 1, makes a missing server a failure instead of a skipped backend.
pub const REQUIRED_VAR: &str = "FEDGATE_REQUIRE_POSTGRES";

/// An empty database created for one test and dropped when the test is done with it.
#[derive(Debug)]
pub struct ScratchDb {
    /// URL of the new database.
    pub url: String,
    server: String,
    name: String,
}

/// A new, empty database on the test server; `None` when no server is configured and none is required.
pub async fn scratch_database() -> Result<Option<ScratchDb>> {
    let server = match std::env::var(SERVER_VAR) {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var(REQUIRED_VAR).as_deref() == Ok("1") => {
            bail!("{REQUIRED_VAR}=1 but {SERVER_VAR} is not set (start a server with .ci/postgres)")
        }
        _ => {
            eprintln!(
                "{SERVER_VAR} is not set: the PostgreSQL backend is not exercised by this run"
            );
            return Ok(None);
        }
    };
    let name = format!("fedgate_{}", random_suffix());
    let mut admin = PgConnection::connect(&server)
        .await
        .with_context(|| format!("connecting to the test server {server}"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
    admin.close().await?;
    let url = match server.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => bail!("{SERVER_VAR}={server} does not end in a database name"),
    };
    Ok(Some(ScratchDb { url, server, name }))
}

impl ScratchDb {
    /// Drops the database (closing any connections still open to it).
    pub async fn drop_database(self) -> Result<()> {
        let mut admin = PgConnection::connect(&self.server).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        Ok(())
    }
}

/// Sixteen hex digits that differ between calls and processes.
fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}
