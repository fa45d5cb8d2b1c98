//! Another process's hold on a node's SQLite database: a second connection that takes the write lock and keeps
//! it until released, as a backup tool, an operator's `sqlite3` shell or a stuck writer would.

use std::path::Path;

use anyhow::{Context, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};

/// A write lock held on a database file by a connection of its own.
#[derive(Debug)]
pub struct WriteLock {
    conn: SqliteConnection,
}

impl WriteLock {
    /// Opens `db` and takes its write lock (`BEGIN IMMEDIATE`), waiting up to 5 s for it.
    pub async fn take(db: &Path) -> Result<Self> {
        let mut conn = SqliteConnectOptions::new()
            .filename(db)
            .busy_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("opening {}", db.display()))?;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .with_context(|| format!("taking the write lock of {}", db.display()))?;
        Ok(Self { conn })
    }

    /// Ends the transaction (it wrote nothing) and closes the connection.
    pub async fn release(mut self) -> Result<()> {
        sqlx::query("ROLLBACK").execute(&mut self.conn).await?;
        self.conn.close().await?;
        Ok(())
    }
}
