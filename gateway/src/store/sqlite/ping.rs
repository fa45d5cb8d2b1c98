//! The SQLite store's probe: a fresh connection to the database file, so that a file or directory that went
//! away (a volume unmounted, permissions changed) is reported although the pooled connections still hold it open.

use sqlx::sqlite::SqlitePool;
use sqlx::{ConnectOptions, Connection};

use crate::store::StoreError;

/// Opens the pool's database file anew, read only and without creating it, and reads its schema.
pub(super) async fn ping(pool: &SqlitePool) -> Result<(), StoreError> {
    let options = (*pool.connect_options())
        .clone()
        .read_only(true)
        .create_if_missing(false);
    let mut conn = options.connect().await?;
    let read = sqlx::query("SELECT count(*) FROM sqlite_master")
        .fetch_one(&mut conn)
        .await;
    let _ = conn.close().await;
    read?;
    Ok(())
}
