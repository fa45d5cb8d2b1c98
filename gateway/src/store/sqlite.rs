//! The embedded SQLite store: one file per node, WAL, one writer connection and a small reader pool.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fedgate_proto::v1::OperationRecord;
use fedgate_proto::v1::{AuditRecord, CatalogChange, CatalogEntry, Stream};
use prost::Message;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::OperationQuery;
use super::{
    AuditQuery, AuditRecovery, CatalogHit, CatalogQuery, CatalogRecovery, ChainAt, Doc, DocKind,
    DocQuery, FlowSide, OutboxItem, Rechain, Recovered, SnapshotChange, Staged, Store, StoreError,
    StoredEntry, UplinkMark, Upstream, chain_conflict, decode_audit, decode_entry, fresh_items,
    to_i64, to_u64, unsealed,
};

mod catalog;
mod flow;
mod ops;
mod ping;
mod recover;

/// Page cache of the writer connection (negative: KiB), 32 MiB.
const WRITER_CACHE_KIB: &str = "-32768";
/// How often the checkpointer copies the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// Longest a restarting checkpoint waits for readers (and so holds the writer back).
const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(250);
/// WAL frames (4 KiB pages) beyond which the checkpointer briefly holds writers back so the WAL starts over
/// (64 MiB); below it, checkpoints never block the writer.
const WAL_RESTART_FRAMES: i64 = 16_000;
/// Prepared statements the writer keeps: every multi-row audit insert shape up to [`AUDIT_ROWS_PER_INSERT`] rows,
/// plus the other writes.
const WRITER_STATEMENT_CACHE: usize = AUDIT_ROWS_PER_INSERT + 64;

/// How long a statement waits for a lock another connection holds, unless the store is opened with another bound.
pub const DEFAULT_BUSY_TIMEOUT: Duration =
    Duration::from_millis(crate::config::DEFAULT_BUSY_TIMEOUT_MS);

/// Begins a write transaction holding the write lock from its start (waiting for it up to the busy timeout). A
/// deferred one would read first and then ask for the lock, which SQLite refuses at once, without waiting,
/// whenever another connection (the checkpointer restarting the WAL, another process) holds it meanwhile.
async fn begin(writer: &SqlitePool) -> Result<Transaction<'static, Sqlite>, StoreError> {
    Ok(writer.begin_with("BEGIN IMMEDIATE").await?)
}

/// Stores a governance document inside a write transaction.
async fn put_doc_in(tx: &mut Transaction<'static, Sqlite>, d: &Doc) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO governance_doc (kind, id, provider_uscc, consumer_uscc, state, due_at, body) \
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(kind, id) DO UPDATE SET \
         provider_uscc = excluded.provider_uscc, consumer_uscc = excluded.consumer_uscc, \
         state = excluded.state, due_at = excluded.due_at, body = excluded.body",
    )
    .bind(d.kind.as_str())
    .bind(&d.id)
    .bind(&d.provider_uscc)
    .bind(&d.consumer_uscc)
    .bind(d.state)
    .bind(d.due_at)
    .bind(&d.body)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A [`Store`] in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Absent on a read-only store.
    checkpointer: Option<Arc<Checkpointer>>,
}

/// The task that moves WAL frames into the database file on a connection of its own, so the writer's commits
/// never pay for checkpoints (SQLite would otherwise run them inside the commit that crosses the threshold).
#[derive(Debug)]
struct Checkpointer {
    stop: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Checkpointer {
    fn start(pool: SqlitePool) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(checkpoint_loop(pool, stop.clone()));
        Self {
            stop,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Every [`CHECKPOINT_EVERY`], a passive checkpoint (concurrent with the writer); when the WAL has grown past
/// [`WAL_RESTART_FRAMES`] because the writer never paused long enough for it to be reset, a restarting one.
async fn checkpoint_loop(pool: SqlitePool, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while stop.run_until_cancelled(tick.tick()).await.is_some() {
        let frames = match checkpoint(&pool, "PRAGMA wal_checkpoint(PASSIVE)").await {
            Ok(frames) => frames,
            Err(e) => {
                tracing::warn!(error = %e, "WAL checkpoint failed");
                continue;
            }
        };
        if frames > WAL_RESTART_FRAMES
            && let Err(e) = checkpoint(&pool, "PRAGMA wal_checkpoint(RESTART)").await
        {
            tracing::warn!(error = %e, "restarting WAL checkpoint failed");
        }
    }
    pool.close().await;
}

/// Runs one checkpoint `pragma`; returns the WAL's size in frames.
async fn checkpoint(pool: &SqlitePool, pragma: &'static str) -> Result<i64, sqlx::Error> {
    let row = sqlx::query(pragma).fetch_one(pool).await?;
    row.try_get(1)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations; a statement waits up to
    /// [`DEFAULT_BUSY_TIMEOUT`] for the database's lock.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, DEFAULT_BUSY_TIMEOUT).await
    }

    /// Opens (creating if needed) the database at `path` and applies migrations; a statement waits up to `busy`
    /// for a lock another connection holds (SQLite's busy timeout) before it fails as busy.
    pub async fn open_with(path: &Path, busy: Duration) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|error| StoreError::Io {
                path: format!("database directory {}", dir.display()),
                error,
            })?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(busy)
            .foreign_keys(true);
        // The single writer connection: a larger page cache keeps the audit indexes' hot pages in memory, the
        // checkpointer rather than its commits checkpoints the WAL, more statement shapes stay prepared, and no
        // ping precedes each use (an embedded connection has no link to test).
        let writer_options = options
            .clone()
            .pragma("cache_size", WRITER_CACHE_KIB)
            .pragma("wal_autocheckpoint", "0")
            .pragma("temp_store", "MEMORY")
            .statement_cache_capacity(WRITER_STATEMENT_CACHE);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(writer_options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        catalog::ensure_index(&writer).await?;
        // A restarting checkpoint holds writers back while it waits for readers; its short busy timeout bounds
        // that wait (it gives up and tries again on a later tick).
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().busy_timeout(CHECKPOINT_BUSY_TIMEOUT))
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            writer,
            reader,
            checkpointer: Some(Arc::new(Checkpointer::start(checkpointer))),
        })
    }

    /// Opens an existing database for reading only (verification and export of a stopped or running node).
    pub async fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Io {
                path: path.display().to_string(),
                error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such database"),
            });
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .read_only(true)
            .busy_timeout(Duration::from_secs(10));
        let reader = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        Ok(Self {
            writer: reader.clone(),
            reader,
            checkpointer: None,
        })
    }

    /// Writes a transactionally consistent copy of the whole database to `dest`, which must not exist, while the
    /// node keeps reading and writing (`VACUUM INTO` in one read transaction, which in WAL mode blocks no writer),
    /// and syncs the copy to disk (SQLite does not).
    pub async fn backup_to(&self, dest: &Path) -> Result<(), StoreError> {
        let io = |error| StoreError::Io {
            path: dest.display().to_string(),
            error,
        };
        let target = dest.to_str().ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the backup path is not valid UTF-8",
            ))
        })?;
        sqlx::query("VACUUM INTO ?")
            .bind(target)
            .execute(&self.reader)
            .await?;
        let copy = tokio::fs::File::open(dest).await.map_err(io)?;
        copy.sync_all().await.map_err(io)?;
        Ok(())
    }

    /// Checks the database's structure (`PRAGMA quick_check`: pages, records, index sizes); fails naming the first
    /// problems found.
    pub async fn quick_check(&self) -> Result<(), StoreError> {
        let problems: Vec<String> = sqlx::query_scalar("PRAGMA quick_check(10)")
            .fetch_all(&self.reader)
            .await?;
        match problems.as_slice() {
            [ok] if ok == "ok" => Ok(()),
            _ => Err(StoreError::Corrupt {
                what: "database".to_owned(),
                error: problems.join("; "),
            }),
        }
    }

    /// Stops the checkpointer and closes both pools, waiting for connections to finish; the last connection to
    /// close checkpoints the whole WAL.
    pub async fn close(&self) {
        if let Some(c) = &self.checkpointer {
            c.stop().await;
        }
        self.reader.close().await;
        self.writer.close().await;
    }
}

/// Where a child's stream was applied up to, inside a transaction.
async fn read_cursor(
    tx: &mut Transaction<'_, Sqlite>,
    child: &str,
    stream: Stream,
) -> Result<u64, StoreError> {
    let row = sqlx::query("SELECT applied FROM stream_cursor WHERE child = ? AND stream = ?")
        .bind(child)
        .bind(stream as i32)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row.map(|r| to_u64(r.get::<i64, _>(0))).unwrap_or(0))
}

/// Records how far a child's stream is applied, inside the transaction that applied it.
async fn write_cursor(
    tx: &mut Transaction<'_, Sqlite>,
    child: &str,
    stream: Stream,
    applied: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO stream_cursor (child, stream, applied) VALUES (?, ?, ?) \
         ON CONFLICT(child, stream) DO UPDATE SET applied = excluded.applied",
    )
    .bind(child)
    .bind(stream as i32)
    .bind(to_i64(applied))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn entry(&self, id: &str) -> Result<Option<StoredEntry>, StoreError> {
        let row = sqlx::query("SELECT entry, withdrawn FROM catalog WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| {
            Ok(StoredEntry {
                entry: decode_entry(id, r.get::<&[u8], _>(0))?,
                withdrawn: r.get::<i64, _>(1) != 0,
            })
        })
        .transpose()
    }

    async fn search(&self, q: &CatalogQuery) -> Result<Vec<CatalogHit>, StoreError> {
        catalog::search(&self.reader, q).await
    }

    async fn entries(&self, ids: &[String]) -> Result<Vec<StoredEntry>, StoreError> {
        catalog::entries(&self.reader, ids).await
    }

    async fn count_entries(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM catalog WHERE withdrawn = 0")
            .fetch_one(&self.reader)
            .await?;
        Ok(to_u64(row.get::<i64, _>(0)))
    }

    async fn publish_local_batch(
        &self,
        entries: Vec<CatalogEntry>,
        upstream: Upstream,
    ) -> Result<Vec<CatalogEntry>, StoreError> {
        catalog::publish(&self.writer, entries, upstream).await
    }

    async fn withdraw_local(
        &self,
        id: &str,
        upstream: Upstream,
    ) -> Result<Option<u64>, StoreError> {
        catalog::withdraw_local(&self.writer, id, upstream).await
    }

    async fn apply_child_catalog(
        &self,
        child: &str,
        items: &[(u64, CatalogChange)],
        upstream: Upstream,
    ) -> Result<u64, StoreError> {
        catalog::apply_child(&self.writer, child, items, upstream).await
    }

    async fn clear_outbox(&self, stream: Stream) -> Result<u64, StoreError> {
        if stream == Stream::Audit {
            // The audit log is its own outbox: its records are kept for their retention, whoever ships them.
            return Ok(0);
        }
        let done = sqlx::query("DELETE FROM outbox WHERE stream = ?")
            .bind(stream as i32)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn cursor(&self, child: &str, stream: Stream) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT applied FROM stream_cursor WHERE child = ? AND stream = ?")
            .bind(child)
            .bind(stream as i32)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.map(|r| to_u64(r.get::<i64, _>(0))).unwrap_or(0))
    }

    async fn outbox_after(
        &self,
        stream: Stream,
        after: u64,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        if stream == Stream::Audit {
            let rows = sqlx::query(
                "SELECT fwd_seq, record FROM audit_log WHERE fwd_seq > ? ORDER BY fwd_seq LIMIT ?",
            )
            .bind(to_i64(after))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            return Ok(rows
                .iter()
                .map(|r| OutboxItem {
                    seq: to_u64(r.get::<i64, _>(0)),
                    payload: r.get::<Vec<u8>, _>(1),
                })
                .collect());
        }
        let rows = sqlx::query(
            "SELECT seq, payload FROM outbox WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(stream as i32)
        .bind(to_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| OutboxItem {
                seq: to_u64(r.get::<i64, _>(0)),
                payload: r.get::<Vec<u8>, _>(1),
            })
            .collect())
    }

    async fn outbox_head(&self, stream: Stream) -> Result<u64, StoreError> {
        if stream == Stream::Audit {
            let row = sqlx::query("SELECT COALESCE(MAX(fwd_seq), 0) FROM audit_log")
                .fetch_one(&self.reader)
                .await?;
            return Ok(to_u64(row.get::<i64, _>(0)));
        }
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE stream = ?")
            .bind(stream as i32)
            .fetch_one(&self.reader)
            .await?;
        Ok(to_u64(row.get::<i64, _>(0)))
    }

    async fn next_id(&self, name: &str) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO id_counter (name, value) VALUES (?, 1) \
             ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
        )
        .bind(name)
        .fetch_one(&self.writer)
        .await?;
        Ok(to_u64(row.get::<i64, _>(0)))
    }

    async fn put_doc(&self, d: &Doc) -> Result<(), StoreError> {
        let mut tx = begin(&self.writer).await?;
        put_doc_in(&mut tx, d).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn doc(&self, kind: DocKind, id: &str) -> Result<Option<Doc>, StoreError> {
        let row = sqlx::query(
            "SELECT id, provider_uscc, consumer_uscc, state, due_at, body FROM governance_doc \
             WHERE kind = ? AND id = ?",
        )
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(|r| doc_from_row(kind, &r)))
    }

    async fn docs(&self, kind: DocKind, q: &DocQuery) -> Result<Vec<Doc>, StoreError> {
        let mut b: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT id, provider_uscc, consumer_uscc, state, due_at, body FROM governance_doc WHERE kind = ",
        );
        b.push_bind(kind.as_str());
        if let Some(p) = &q.provider_uscc {
            b.push(" AND provider_uscc = ").push_bind(p.clone());
        }
        if let Some(c) = &q.consumer_uscc {
            b.push(" AND consumer_uscc = ").push_bind(c.clone());
        }
        if let Some(s) = q.state {
            b.push(" AND state = ").push_bind(s);
        }
        if let Some(t) = q.due_before {
            b.push(" AND due_at > 0 AND due_at < ").push_bind(t);
        }
        if let Some(a) = &q.after_id {
            b.push(" AND id > ").push_bind(a.clone());
        }
        b.push(" ORDER BY id");
        if let Some(n) = q.limit {
            b.push(" LIMIT ").push_bind(i64::from(n));
        }
        let rows = b.build().fetch_all(&self.reader).await?;
        Ok(rows.iter().map(|r| doc_from_row(kind, r)).collect())
    }

    async fn set_uplink_acked(&self, stream: Stream, seq: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO uplink_ack (stream, seq) VALUES (?, ?) \
             ON CONFLICT(stream) DO UPDATE SET seq = MAX(seq, excluded.seq)",
        )
        .bind(stream as i32)
        .bind(to_i64(seq))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn uplink_acked(&self, stream: Stream) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT seq FROM uplink_ack WHERE stream = ?")
            .bind(stream as i32)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.map(|r| to_u64(r.get::<i64, _>(0))).unwrap_or(0))
    }

    async fn audit_append(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let records: Vec<&AuditRecord> = records.iter().collect();
        let written = if records.len() <= AUDIT_ROWS_PER_INSERT {
            // One statement is atomic on its own: a single round trip to the connection instead of four.
            audit_insert(&self.writer, &records).await
        } else {
            async {
                let mut tx = begin(&self.writer).await?;
                insert_audit(&mut tx, &records).await?;
                tx.commit().await?;
                Ok(())
            }
            .await
        };
        written.map_err(|e| chain_conflict(e, first))
    }

    async fn audit_append_at_head(
        &self,
        node: &str,
        chain: &ChainAt<'_>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        // The write lock from the start: no other connection (of this process or another) writes between the
        // head read here and the commit.
        let mut tx = begin(&self.writer).await?;
        let head = sqlx::query(
            "SELECT record FROM audit_log WHERE node_code = ? ORDER BY seq DESC LIMIT 1",
        )
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| decode_audit(r.get::<&[u8], _>(0)))
        .transpose()?;
        let records = chain(head.as_ref());
        let refs: Vec<&AuditRecord> = records.iter().collect();
        insert_audit(&mut tx, &refs).await?;
        tx.commit().await?;
        Ok(records)
    }

    async fn audit_seal(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let mut tx = begin(&self.writer).await?;
        let row =
            sqlx::query("SELECT fwd_seq, record FROM audit_log WHERE node_code = ? AND seq = ?")
                .bind(&record.node_code)
                .bind(to_i64(record.seq))
                .fetch_optional(&mut *tx)
                .await?;
        let Some(row) = row else {
            return Err(unsealed(record));
        };
        if decode_audit(row.get::<&[u8], _>(1))?.hash != record.hash {
            return Err(StoreError::HeadConflict {
                node: record.node_code.clone(),
                seq: record.seq,
            });
        }
        // A record after it may already have been forwarded with this one unsigned: a copy elsewhere must stay
        // equal to the chain, so only the head is sealed late.
        let later = sqlx::query("SELECT 1 FROM audit_log WHERE node_code = ? AND seq > ? LIMIT 1")
            .bind(&record.node_code)
            .bind(to_i64(record.seq))
            .fetch_optional(&mut *tx)
            .await?;
        if later.is_some() {
            return Err(StoreError::HeadConflict {
                node: record.node_code.clone(),
                seq: record.seq,
            });
        }
        sqlx::query("UPDATE audit_log SET record = ? WHERE fwd_seq = ?")
            .bind(record.encode_to_vec())
            .bind(row.get::<i64, _>(0))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_head(&self, node: &str) -> Result<Option<AuditRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT record FROM audit_log WHERE node_code = ? ORDER BY seq DESC LIMIT 1",
        )
        .bind(node)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| decode_audit(r.get::<&[u8], _>(0))).transpose()
    }

    async fn apply_child_audit(
        &self,
        child: &str,
        items: &[(u64, Option<AuditRecord>)],
    ) -> Result<u64, StoreError> {
        let mut tx = begin(&self.writer).await?;
        let applied = read_cursor(&mut tx, child, Stream::Audit).await?;
        let (fresh, applied) = fresh_items(child, applied, items)?;
        let fresh: Vec<&AuditRecord> = fresh.into_iter().flatten().collect();
        insert_audit(&mut tx, &fresh).await?;
        write_cursor(&mut tx, child, Stream::Audit, applied).await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn audit_query(&self, q: &AuditQuery) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        let mut b: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT fwd_seq, record FROM audit_log WHERE 1 = 1");
        if let Some(p) = &q.party {
            b.push(" AND (consumer_uscc = ")
                .push_bind(p.clone())
                .push(" OR provider_uscc = ")
                .push_bind(p.clone())
                .push(")");
            if let Some(c) = &q.counterpart {
                b.push(" AND (consumer_uscc = ")
                    .push_bind(c.clone())
                    .push(" OR provider_uscc = ")
                    .push_bind(c.clone())
                    .push(")");
            }
        }
        if let Some(p) = &q.node_prefix {
            b.push(" AND substr(node_code, 1, ")
                .push_bind(i64::try_from(p.chars().count()).unwrap_or(i64::MAX))
                .push(") = ")
                .push_bind(p.clone());
        }
        if let Some(t) = q.from_ns {
            b.push(" AND time_ns >= ").push_bind(t);
        }
        if let Some(t) = q.to_ns {
            b.push(" AND time_ns < ").push_bind(t);
        }
        if let Some(r) = &q.resource_id {
            b.push(" AND resource_id = ").push_bind(r.clone());
        }
        if let Some(o) = &q.outcome {
            b.push(" AND outcome = ").push_bind(o.clone());
        }
        if let Some(a) = q.after_fwd_seq {
            b.push(" AND fwd_seq > ").push_bind(to_i64(a));
        }
        b.push(" ORDER BY fwd_seq LIMIT ")
            .push_bind(i64::from(q.limit));
        let rows = b.build().fetch_all(&self.reader).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    to_u64(r.get::<i64, _>(0)),
                    decode_audit(r.get::<&[u8], _>(1))?,
                ))
            })
            .collect()
    }

    async fn audit_chain(
        &self,
        node: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT record FROM audit_log WHERE node_code = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(node)
        .bind(to_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| decode_audit(r.get::<&[u8], _>(0)))
            .collect()
    }

    async fn audit_nodes(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT node_code FROM audit_log ORDER BY node_code")
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
    }

    async fn audit_archivable(
        &self,
        before_ns: i64,
        max_fwd_seq: u64,
        limit: u32,
    ) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        let rows = sqlx::query(
            "SELECT fwd_seq, record FROM audit_log a WHERE a.fwd_seq <= ? \
             AND a.seq < (SELECT MAX(h.seq) FROM audit_log h WHERE h.node_code = a.node_code) \
             AND a.seq < COALESCE((SELECT MIN(n.seq) FROM audit_log n \
                 WHERE n.node_code = a.node_code AND n.time_ns >= ?), 9223372036854775807) \
             ORDER BY a.fwd_seq LIMIT ?",
        )
        .bind(to_i64(max_fwd_seq))
        .bind(before_ns)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    to_u64(r.get::<i64, _>(0)),
                    decode_audit(r.get::<&[u8], _>(1))?,
                ))
            })
            .collect()
    }

    async fn audit_delete(&self, fwd_seqs: &[u64]) -> Result<u64, StoreError> {
        let mut tx = begin(&self.writer).await?;
        let mut n = 0;
        for chunk in fwd_seqs.chunks(500) {
            let mut b: QueryBuilder<Sqlite> =
                QueryBuilder::new("DELETE FROM audit_log WHERE fwd_seq IN (");
            let mut list = b.separated(", ");
            for s in chunk {
                list.push_bind(to_i64(*s));
            }
            b.push(")");
            n += b.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn audit_delete_chain_upto(&self, node: &str, seq: u64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM audit_log WHERE node_code = ? AND seq <= ? \
             AND seq < (SELECT MAX(h.seq) FROM audit_log h WHERE h.node_code = ?)",
        )
        .bind(node)
        .bind(to_i64(seq))
        .bind(node)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn audit_count(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM audit_log")
            .fetch_one(&self.reader)
            .await?;
        Ok(to_u64(row.get::<i64, _>(0)))
    }

    async fn note_served(
        &self,
        resource_id: &str,
        node: &str,
        until_unix: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO cache_served (resource_id, consumer_node, until_unix) VALUES (?, ?, ?) \
             ON CONFLICT (resource_id, consumer_node) DO UPDATE SET until_unix = MAX(until_unix, excluded.until_unix)",
        )
        .bind(resource_id)
        .bind(node)
        .bind(until_unix)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn served_nodes(
        &self,
        resource_id: &str,
        now_unix: i64,
    ) -> Result<Vec<String>, StoreError> {
        let nodes = sqlx::query_scalar(
            "SELECT consumer_node FROM cache_served WHERE resource_id = ? AND until_unix >= ? \
             ORDER BY consumer_node",
        )
        .bind(resource_id)
        .bind(now_unix)
        .fetch_all(&self.reader)
        .await?;
        Ok(nodes)
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = unix_ms();
        let taken = sqlx::query(
            "INSERT INTO leases (name, holder, until_ms) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
             WHERE leases.holder = excluded.holder OR leases.until_ms < ?",
        )
        .bind(name)
        .bind(holder)
        .bind(now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)))
        .bind(now)
        .execute(&self.writer)
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<String>, StoreError> {
        let holder =
            sqlx::query_scalar("SELECT holder FROM leases WHERE name = ? AND until_ms >= ?")
                .bind(name)
                .bind(unix_ms())
                .fetch_optional(&self.reader)
                .await?;
        Ok(holder)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE name = ? AND holder = ?")
            .bind(name)
            .bind(holder)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn change_feed(&self) -> Result<Option<Box<dyn super::ChangeFeed>>, StoreError> {
        Ok(None)
    }

    async fn node_key(&self, node: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT public_key FROM node_key WHERE node_code = ?")
            .bind(node)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.map(|r| r.get::<Vec<u8>, _>(0)))
    }

    async fn replace_node_key(&self, node: &str, key: &[u8]) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO node_key (node_code, public_key) VALUES (?, ?) \
             ON CONFLICT (node_code) DO UPDATE SET public_key = excluded.public_key",
        )
        .bind(node)
        .bind(key)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn pin_node_key(&self, node: &str, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut tx = begin(&self.writer).await?;
        sqlx::query(
            "INSERT INTO node_key (node_code, public_key) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(node)
        .bind(key)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query("SELECT public_key FROM node_key WHERE node_code = ?")
            .bind(node)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row.get::<Vec<u8>, _>(0))
    }

    async fn mark_unconfirmed(&self, node: &str) -> Result<(), StoreError> {
        recover::mark_unconfirmed(&self.writer, node).await
    }

    async fn uplink_mark(&self, stream: Stream) -> Result<Option<UplinkMark>, StoreError> {
        recover::uplink_mark(&self.reader, stream).await
    }

    async fn confirm_uplink(&self, stream: Stream) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM uplink_mark WHERE stream = ?")
            .bind(stream as i32)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn stage_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        recover::stage_audit(&self.writer, records).await
    }

    async fn stage_catalog(&self, entries: &[StoredEntry]) -> Result<(), StoreError> {
        recover::stage_catalog(&self.writer, entries).await
    }

    async fn staged(&self, stream: Stream) -> Result<Staged, StoreError> {
        recover::staged(&self.reader, stream).await
    }

    async fn clear_staged(&self, stream: Stream) -> Result<(), StoreError> {
        recover::clear_staged(&self.writer, stream).await
    }

    async fn recover_audit(
        &self,
        plan: &AuditRecovery,
        rechain: &Rechain<'_>,
    ) -> Result<Recovered, StoreError> {
        recover::recover_audit(&self.writer, plan, rechain).await
    }

    async fn recover_catalog(&self, plan: &CatalogRecovery) -> Result<Recovered, StoreError> {
        recover::recover_catalog(&self.writer, plan).await
    }

    async fn close_up(&self, stream: Stream, after: u64) -> Result<u64, StoreError> {
        recover::close_up(&self.writer, stream, after).await
    }

    async fn count_after(&self, stream: Stream, after: u64) -> Result<u64, StoreError> {
        recover::count_after(&self.reader, stream, after).await
    }

    async fn own_entries(
        &self,
        node: &str,
        after_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        catalog::own_entries(&self.reader, node, after_id, limit).await
    }

    async fn flow_append(
        &self,
        doc: &Doc,
        head: u64,
        items: &[Vec<u8>],
        snapshot: &[SnapshotChange],
    ) -> Result<u64, StoreError> {
        flow::append(&self.writer, doc, head, items, snapshot).await
    }

    async fn flow_items(
        &self,
        side: FlowSide,
        id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        flow::items(&self.reader, side, id, after, limit).await
    }

    async fn flow_head(&self, side: FlowSide, id: &str) -> Result<u64, StoreError> {
        flow::head(&self.reader, side, id).await
    }

    async fn flow_receive(
        &self,
        id: &str,
        items: &[(u64, Vec<u8>)],
        doc: Option<&Doc>,
    ) -> Result<u64, StoreError> {
        flow::receive(&self.writer, id, items, doc).await
    }

    async fn flow_snapshot(
        &self,
        id: &str,
        after_key: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        flow::snapshot(&self.reader, id, after_key, limit).await
    }

    async fn ops_append(&self, records: &[OperationRecord]) -> Result<(), StoreError> {
        ops::append(&self.writer, records).await
    }

    async fn ops_query(
        &self,
        query: &OperationQuery,
    ) -> Result<Vec<(u64, OperationRecord)>, StoreError> {
        ops::query(&self.reader, query).await
    }

    async fn ops_purge(&self, before_ns: i64) -> Result<u64, StoreError> {
        ops::purge(&self.writer, before_ns).await
    }

    async fn ops_trim(&self, keep: u64) -> Result<u64, StoreError> {
        ops::trim(&self.writer, keep).await
    }

    async fn close(&self) {
        SqliteStore::close(self).await;
    }

    async fn ping(&self) -> Result<(), StoreError> {
        ping::ping(&self.reader).await
    }
}

fn doc_from_row(kind: DocKind, r: &sqlx::sqlite::SqliteRow) -> Doc {
    Doc {
        kind,
        id: r.get(0),
        provider_uscc: r.get(1),
        consumer_uscc: r.get(2),
        state: r.get(3),
        due_at: r.get(4),
        body: r.get(5),
    }
}

/// Rows per INSERT statement (9 binds each, well under SQLite's parameter limit).
const AUDIT_ROWS_PER_INSERT: usize = 256;

/// Runs one multi-row INSERT of `records` (at most [`AUDIT_ROWS_PER_INSERT`]) on `e`.
async fn audit_insert<'e, E>(e: E, records: &[&AuditRecord]) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let mut b: QueryBuilder<Sqlite> = QueryBuilder::new(
        "INSERT INTO audit_log (node_code, seq, time_ns, operation, consumer_uscc, provider_uscc, \
         resource_id, outcome, record) ",
    );
    b.push_values(records, |mut row, r| {
        row.push_bind(r.node_code.clone())
            .push_bind(to_i64(r.seq))
            .push_bind(r.time_unix_nanos)
            .push_bind(r.operation)
            .push_bind(r.consumer_uscc.clone())
            .push_bind(r.provider_uscc.clone())
            .push_bind(r.resource_id.clone())
            .push_bind(r.outcome.clone())
            .push_bind(r.encode_to_vec());
    });
    b.build().execute(e).await?;
    Ok(())
}

/// Appends `records` under the next stream positions, in order, inside a transaction.
async fn insert_audit(
    tx: &mut Transaction<'_, Sqlite>,
    records: &[&AuditRecord],
) -> Result<(), StoreError> {
    for chunk in records.chunks(AUDIT_ROWS_PER_INSERT) {
        audit_insert(&mut **tx, chunk).await?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch by this machine's clock (0 before it).
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, time_ns: i64) -> AuditRecord {
        AuditRecord {
            node_code: "350102".into(),
            seq,
            time_unix_nanos: time_ns,
            outcome: "OK".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn archivable_records_are_a_prefix_of_each_chain_and_keep_its_head() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("n.db"))
            .await
            .expect("open");
        // Written in chain order, stamped when their requests started: times are not monotonic.
        let times = [10, 5, 20, 3, 30];
        let records: Vec<_> = times
            .iter()
            .enumerate()
            .map(|(i, t)| record(i as u64 + 1, *t))
            .collect();
        store.audit_append(&records).await.expect("append");
        let seqs =
            |rows: Vec<(u64, AuditRecord)>| rows.iter().map(|(_, r)| r.seq).collect::<Vec<_>>();
        assert!(seqs(store.audit_archivable(8, u64::MAX, 100).await.expect("q")).is_empty());
        assert_eq!(
            seqs(store.audit_archivable(25, u64::MAX, 100).await.expect("q")),
            vec![1, 2, 3, 4]
        );
        assert_eq!(
            seqs(store.audit_archivable(25, 2, 100).await.expect("q")),
            vec![1, 2]
        );
        assert_eq!(
            seqs(
                store
                    .audit_archivable(i64::MAX, u64::MAX, 100)
                    .await
                    .expect("q")
            ),
            vec![1, 2, 3, 4],
            "the head stays"
        );
        assert_eq!(
            store
                .audit_delete_chain_upto("350102", 9)
                .await
                .expect("delete"),
            4
        );
        assert_eq!(store.audit_count().await.expect("count"), 1);
    }

    #[tokio::test]
    async fn the_checkpointer_moves_committed_pages_into_the_database_file_while_the_store_is_open()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n.db");
        let store = SqliteStore::open(&path).await.expect("open");
        let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let before = size();
        let records: Vec<_> = (1..=2000)
            .map(|seq| AuditRecord {
                detail: "x".repeat(200),
                ..record(seq, 1)
            })
            .collect();
        store.audit_append(&records).await.expect("append");
        // Commits go to the WAL only; the database file grows once a checkpoint has copied them.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while size() < before + 400_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "database file still {} bytes (was {before})",
                size()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.audit_count().await.expect("count"), 2000);
        store.close().await;
    }
}
