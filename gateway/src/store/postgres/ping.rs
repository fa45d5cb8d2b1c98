//! Whether a PostgreSQL server named in a configuration accepts the node, without changing its database.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::PgStore;
use crate::store::StoreError;

impl PgStore {
    /// Opens one connection to `url` and runs a round trip on it; migrates nothing.
    pub async fn reachable(url: &str) -> Result<(), StoreError> {
        let mut conn = PgConnectOptions::from_str(url)?.connect().await?;
        sqlx::query("SELECT 1").execute(&mut conn).await?;
        let _ = conn.close().await;
        Ok(())
    }
}
