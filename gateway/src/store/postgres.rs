//! The PostgreSQL store: the same tables and the same behaviour as [`super::sqlite`], for nodes whose state lives
//! on a database server (and whose writers may run concurrently, which SQLite never allows).
//!
//! Concurrency: every transaction that assigns positions in an upward stream (the catalog outbox, the audit log)
//! first takes a transaction-level advisory lock of that stream, so positions are committed in the order they are
//! assigned; see `lock_stream`.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use fedgate_proto::v1::OperationRecord;
use fedgate_proto::v1::{AuditRecord, CatalogChange, CatalogEntry, Stream};
use prost::Message;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row, Transaction};

use super::OperationQuery;
use super::{
    AuditQuery, AuditRecovery, CatalogHit, CatalogQuery, CatalogRecovery, ChainAt, ChangeFeed, Doc,
    DocKind, DocQuery, FlowSide, OutboxItem, Rechain, Recovered, SnapshotChange, Staged, Store,
    StoreChange, StoreError, StoredEntry, UplinkMark, Upstream, chain_conflict, decode_audit,
    decode_entry, fresh_items, to_i64, to_u64, unsealed,
};

mod catalog;
mod flow;
mod ops;
mod ping;
mod recover;

/// Connections of the pool.
const MAX_CONNECTIONS: u32 = 16;
/// Longest a caller waits for a free connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Audit rows per INSERT: each statement binds ten arrays whatever its size (no bind-parameter limit applies);
/// chunking only bounds the size of one message to the server.
const AUDIT_ROWS_PER_INSERT: usize = 4096;
/// Keys of the advisory locks serializing writers of each upward stream ("fedgat" and the stream number).
/// Advisory locks are scoped to the database, so nodes in other databases of the same server never contend.
const STREAM_LOCK_BASE: i64 = 0x6665_6467_6174_0000;

/// A [`Store`] in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL) and applies migrations; a statement waits up to
    /// SQLite's [`super::sqlite::DEFAULT_BUSY_TIMEOUT`] for a lock.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, super::sqlite::DEFAULT_BUSY_TIMEOUT).await
    }

    /// Connects to the database at `url` and applies migrations; a statement waits up to `busy` for a lock
    /// (PostgreSQL's `lock_timeout`) before it fails as busy.
    pub async fn connect_with(url: &str, busy: Duration) -> Result<Self, StoreError> {
        let pool = Self::pool(url, busy).await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        catalog::ensure_index(&pool).await?;
        Ok(Self { pool })
    }

    /// Connects to a node's existing database without changing it (for the audit tools); fails if it holds no
    /// fedgate tables or tables older than this build's.
    pub async fn connect_existing(url: &str) -> Result<Self, StoreError> {
        let pool = Self::pool(url, super::sqlite::DEFAULT_BUSY_TIMEOUT).await?;
        let latest = sqlx::migrate!("./migrations/postgres")
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        let migrated: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&pool)
                .await?;
        let applied: i64 = if migrated {
            sqlx::query_scalar(
                "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success",
            )
            .fetch_one(&pool)
            .await?
        } else {
            0
        };
        if applied < latest {
            pool.close().await;
            return Err(StoreError::Schema(if applied == 0 {
                "the database holds no fedgate tables (is it a node's database?)".to_owned()
            } else {
                format!(
                    "the database's tables are at migration {applied}, this build reads {latest}: start the \
                     node once to migrate them"
                )
            }));
        }
        Ok(Self { pool })
    }

    /// Whether the database at `url` holds fedgate tables (a node's store, which a restore would replace).
    pub async fn holds_tables(url: &str) -> Result<bool, StoreError> {
        let pool = Self::pool(url, super::sqlite::DEFAULT_BUSY_TIMEOUT).await?;
        let held = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&pool)
            .await;
        pool.close().await;
        Ok(held?)
    }

    /// How many other sessions are connected to the database at `url` (a node's replicas, while they run).
    pub async fn other_sessions(url: &str) -> Result<u64, StoreError> {
        let pool = Self::pool(url, super::sqlite::DEFAULT_BUSY_TIMEOUT).await?;
        let n: Result<i64, _> = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
        .fetch_one(&pool)
        .await;
        pool.close().await;
        Ok(to_u64(n?))
    }

    /// A pool on a UTF-8 database whose statements wait up to `busy` for a lock.
    async fn pool(url: &str, busy: Duration) -> Result<PgPool, StoreError> {
        // A writer waiting for a stream's lock (or any row lock) gives up as SQLite's busy timeout does, rather
        // than holding a share's answer indefinitely behind a stuck transaction.
        let lock_timeout = format!("{}ms", busy.as_millis().max(1));
        let options =
            PgConnectOptions::from_str(url)?.options([("lock_timeout", lock_timeout.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        // Prefix filters compare `substr` (in characters) as SQLite does on UTF-8 text; any other server encoding
        // would make them count something else, and could not hold every agency's names anyway.
        let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
            .fetch_one(&pool)
            .await?;
        if encoding != "UTF8" {
            pool.close().await;
            return Err(StoreError::Database(sqlx::Error::Configuration(
                format!("database encoding is {encoding}; fedgate needs UTF8").into(),
            )));
        }
        Ok(pool)
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A string length as the `int4` that `substr` takes.
fn len_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The channel on which transactions announce the changes other replicas hold copies of.
const CHANGES_CHANNEL: &str = "fedgate_changes";

/// Announces `changes` to every replica's [`ChangeFeed`] when the transaction commits (and never if it does not).
async fn notify(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[StoreChange],
) -> Result<(), StoreError> {
    let payloads: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            StoreChange::Revoked(id) => Some(format!("revoked:{id}")),
            StoreChange::Entry(id) => Some(format!("entry:{id}")),
            StoreChange::Missed => None,
        })
        .collect();
    if !payloads.is_empty() {
        sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS t(p)")
            .bind(CHANGES_CHANNEL)
            .bind(&payloads)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The changes every replica commits, as PostgreSQL notifies them.
struct PgChangeFeed {
    listener: PgListener,
}

#[async_trait]
impl ChangeFeed for PgChangeFeed {
    async fn next(&mut self) -> Result<StoreChange, StoreError> {
        loop {
            // `None`: the connection was lost and is opened again on the next call; what was sent meanwhile is
            // gone.
            let Some(n) = self.listener.try_recv().await? else {
                return Ok(StoreChange::Missed);
            };
            match n.payload().split_once(':') {
                Some(("revoked", id)) => return Ok(StoreChange::Revoked(id.to_owned())),
                Some(("entry", id)) => return Ok(StoreChange::Entry(id.to_owned())),
                _ => tracing::warn!(payload = n.payload(), "unknown change notification ignored"),
            }
        }
    }
}

/// Serializes the writers of `stream`'s positions until the transaction ends.
///
/// A position (`MAX(seq) + 1` in the outbox, the next `fwd_seq` of the audit log) is chosen inside a transaction
/// but only becomes visible when it commits. Uplinks read a stream by position (`WHERE seq > acked ORDER BY seq`)
/// and then acknowledge the highest position they saw; if two writers could commit out of order, a reader could
/// see position 8 before 7 was committed, acknowledge 8, and skip 7 forever. Holding this lock from the start of
/// every transaction that appends to the stream (and reads a child's cursor for it) makes each writer wait for
/// the previous one's commit, so positions are assigned, and committed, one transaction after the other, as
/// SQLite's single writer does. The lock is released when the transaction commits or rolls back, after its rows
/// became visible.
async fn lock_stream(tx: &mut Transaction<'_, Postgres>, stream: Stream) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(STREAM_LOCK_BASE + i64::from(stream as i32))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Where a child's stream was applied up to, inside a transaction.
async fn read_cursor(
    tx: &mut Transaction<'_, Postgres>,
    child: &str,
    stream: Stream,
) -> Result<u64, StoreError> {
    let row = sqlx::query("SELECT applied FROM stream_cursor WHERE child = $1 AND stream = $2")
        .bind(child)
        .bind(stream as i32)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(match row {
        Some(r) => to_u64(r.try_get::<i64, _>(0)?),
        None => 0,
    })
}

/// Records how far a child's stream is applied, inside the transaction that applied it.
async fn write_cursor(
    tx: &mut Transaction<'_, Postgres>,
    child: &str,
    stream: Stream,
    applied: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO stream_cursor (child, stream, applied) VALUES ($1, $2, $3) \
         ON CONFLICT (child, stream) DO UPDATE SET applied = excluded.applied",
    )
    .bind(child)
    .bind(stream as i32)
    .bind(to_i64(applied))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Appends audit records under the next stream positions, in order; the caller holds [`lock_stream`] for the
/// audit stream.
///
/// Positions come from `audit_position`, updated in the same transaction: like SQLite's AUTOINCREMENT they are
/// never reused after deletions, and a transaction that fails gives its positions back (a sequence would leave a
/// gap, which the parent refuses).
async fn insert_audit(
    tx: &mut Transaction<'_, Postgres>,
    records: &[&AuditRecord],
) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let count = i64::try_from(records.len()).unwrap_or(i64::MAX);
    let last: i64 = sqlx::query_scalar("UPDATE audit_position SET last = last + $1 RETURNING last")
        .bind(count)
        .fetch_one(&mut **tx)
        .await?;
    let mut next = last - count + 1;
    for chunk in records.chunks(AUDIT_ROWS_PER_INSERT) {
        let mut fwd_seq = Vec::with_capacity(chunk.len());
        let mut node_code = Vec::with_capacity(chunk.len());
        let mut seq = Vec::with_capacity(chunk.len());
        let mut time_ns = Vec::with_capacity(chunk.len());
        let mut operation = Vec::with_capacity(chunk.len());
        let mut consumer = Vec::with_capacity(chunk.len());
        let mut provider = Vec::with_capacity(chunk.len());
        let mut resource = Vec::with_capacity(chunk.len());
        let mut outcome = Vec::with_capacity(chunk.len());
        let mut record = Vec::with_capacity(chunk.len());
        for r in chunk {
            fwd_seq.push(next);
            next += 1;
            node_code.push(r.node_code.as_str());
            seq.push(to_i64(r.seq));
            time_ns.push(r.time_unix_nanos);
            operation.push(r.operation);
            consumer.push(r.consumer_uscc.as_str());
            provider.push(r.provider_uscc.as_str());
            resource.push(r.resource_id.as_str());
            outcome.push(r.outcome.as_str());
            record.push(r.encode_to_vec());
        }
        sqlx::query(
            "INSERT INTO audit_log (fwd_seq, node_code, seq, time_ns, operation, consumer_uscc, \
             provider_uscc, resource_id, outcome, record) \
             SELECT * FROM UNNEST($1::int8[], $2::text[], $3::int8[], $4::int8[], $5::int4[], $6::text[], \
             $7::text[], $8::text[], $9::text[], $10::bytea[])",
        )
        .bind(fwd_seq)
        .bind(node_code)
        .bind(seq)
        .bind(time_ns)
        .bind(operation)
        .bind(consumer)
        .bind(provider)
        .bind(resource)
        .bind(outcome)
        .bind(record)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn outbox_items(rows: &[PgRow]) -> Result<Vec<OutboxItem>, StoreError> {
    rows.iter()
        .map(|r| {
            Ok(OutboxItem {
                seq: to_u64(r.try_get::<i64, _>(0)?),
                payload: r.try_get::<Vec<u8>, _>(1)?,
            })
        })
        .collect()
}

fn positioned_audit(rows: &[PgRow]) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
    rows.iter()
        .map(|r| {
            Ok((
                to_u64(r.try_get::<i64, _>(0)?),
                decode_audit(r.try_get::<&[u8], _>(1)?)?,
            ))
        })
        .collect()
}

fn doc_from_row(kind: DocKind, r: &PgRow) -> Result<Doc, StoreError> {
    Ok(Doc {
        kind,
        id: r.try_get(0)?,
        provider_uscc: r.try_get(1)?,
        consumer_uscc: r.try_get(2)?,
        state: r.try_get(3)?,
        due_at: r.try_get(4)?,
        body: r.try_get(5)?,
    })
}

#[async_trait]
impl Store for PgStore {
    async fn entry(&self, id: &str) -> Result<Option<StoredEntry>, StoreError> {
        let row = sqlx::query("SELECT entry, withdrawn FROM catalog WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(StoredEntry {
                entry: decode_entry(id, r.try_get::<&[u8], _>(0)?)?,
                withdrawn: r.try_get::<bool, _>(1)?,
            })
        })
        .transpose()
    }

    async fn search(&self, q: &CatalogQuery) -> Result<Vec<CatalogHit>, StoreError> {
        catalog::search(&self.pool, q).await
    }

    async fn entries(&self, ids: &[String]) -> Result<Vec<StoredEntry>, StoreError> {
        catalog::entries(&self.pool, ids).await
    }

    async fn count_entries(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM catalog WHERE NOT withdrawn")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(n))
    }

    async fn publish_local_batch(
        &self,
        entries: Vec<CatalogEntry>,
        upstream: Upstream,
    ) -> Result<Vec<CatalogEntry>, StoreError> {
        catalog::publish(&self.pool, entries, upstream).await
    }

    async fn withdraw_local(
        &self,
        id: &str,
        upstream: Upstream,
    ) -> Result<Option<u64>, StoreError> {
        catalog::withdraw_local(&self.pool, id, upstream).await
    }

    async fn apply_child_catalog(
        &self,
        child: &str,
        items: &[(u64, CatalogChange)],
        upstream: Upstream,
    ) -> Result<u64, StoreError> {
        catalog::apply_child(&self.pool, child, items, upstream).await
    }

    async fn clear_outbox(&self, stream: Stream) -> Result<u64, StoreError> {
        if stream == Stream::Audit {
            // The audit log is its own outbox: its records are kept for their retention, whoever ships them.
            return Ok(0);
        }
        let done = sqlx::query("DELETE FROM outbox WHERE stream = $1")
            .bind(stream as i32)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn cursor(&self, child: &str, stream: Stream) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT applied FROM stream_cursor WHERE child = $1 AND stream = $2")
            .bind(child)
            .bind(stream as i32)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => to_u64(r.try_get::<i64, _>(0)?),
            None => 0,
        })
    }

    async fn outbox_after(
        &self,
        stream: Stream,
        after: u64,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let rows = if stream == Stream::Audit {
            sqlx::query(
                "SELECT fwd_seq, record FROM audit_log WHERE fwd_seq > $1 ORDER BY fwd_seq LIMIT $2",
            )
            .bind(to_i64(after))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
        } else {
            sqlx::query(
                "SELECT seq, payload FROM outbox WHERE stream = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .bind(stream as i32)
            .bind(to_i64(after))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
        };
        outbox_items(&rows)
    }

    async fn outbox_head(&self, stream: Stream) -> Result<u64, StoreError> {
        let head: i64 = if stream == Stream::Audit {
            sqlx::query_scalar("SELECT COALESCE(MAX(fwd_seq), 0) FROM audit_log")
                .fetch_one(&self.pool)
                .await?
        } else {
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE stream = $1")
                .bind(stream as i32)
                .fetch_one(&self.pool)
                .await?
        };
        Ok(to_u64(head))
    }

    async fn next_id(&self, name: &str) -> Result<u64, StoreError> {
        // One statement: the counter's row lock, held until it commits, is the per-counter lock, so values are
        // committed in the order they are handed out (a second caller waits for the first one's commit and then
        // increments what it wrote); a concurrent first use of a name is resolved by ON CONFLICT.
        let value: i64 = sqlx::query_scalar(
            "INSERT INTO id_counter (name, value) VALUES ($1, 1) \
             ON CONFLICT (name) DO UPDATE SET value = id_counter.value + 1 RETURNING value",
        )
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        Ok(to_u64(value))
    }

    async fn put_doc(&self, d: &Doc) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        put_doc_in(&mut tx, d).await?;
        if d.kind == DocKind::Revocation {
            notify(&mut tx, &[StoreChange::Revoked(d.id.clone())]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn doc(&self, kind: DocKind, id: &str) -> Result<Option<Doc>, StoreError> {
        let row = sqlx::query(
            "SELECT id, provider_uscc, consumer_uscc, state, due_at, body FROM governance_doc \
             WHERE kind = $1 AND id = $2",
        )
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| doc_from_row(kind, &r)).transpose()
    }

    async fn docs(&self, kind: DocKind, q: &DocQuery) -> Result<Vec<Doc>, StoreError> {
        let mut b: QueryBuilder<Postgres> = QueryBuilder::new(
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
        let rows = b.build().fetch_all(&self.pool).await?;
        rows.iter().map(|r| doc_from_row(kind, r)).collect()
    }

    async fn set_uplink_acked(&self, stream: Stream, seq: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO uplink_ack (stream, seq) VALUES ($1, $2) \
             ON CONFLICT (stream) DO UPDATE SET seq = GREATEST(uplink_ack.seq, excluded.seq)",
        )
        .bind(stream as i32)
        .bind(to_i64(seq))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn uplink_acked(&self, stream: Stream) -> Result<u64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM uplink_ack WHERE stream = $1")
            .bind(stream as i32)
            .fetch_optional(&self.pool)
            .await?;
        Ok(seq.map(to_u64).unwrap_or(0))
    }

    async fn audit_append(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let records: Vec<&AuditRecord> = records.iter().collect();
        async {
            let mut tx = self.pool.begin().await?;
            lock_stream(&mut tx, Stream::Audit).await?;
            insert_audit(&mut tx, &records).await?;
            tx.commit().await?;
            Ok(())
        }
        .await
        .map_err(|e| chain_conflict(e, first))
    }

    async fn audit_append_at_head(
        &self,
        node: &str,
        chain: &ChainAt<'_>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Every writer of the audit stream takes this lock first, so the head read here stays the head until
        // the commit.
        lock_stream(&mut tx, Stream::Audit).await?;
        let head = sqlx::query(
            "SELECT record FROM audit_log WHERE node_code = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get::<Vec<u8>, _>(0))
        .transpose()?
        .map(|b| decode_audit(&b))
        .transpose()?;
        let records = chain(head.as_ref());
        let refs: Vec<&AuditRecord> = records.iter().collect();
        insert_audit(&mut tx, &refs).await?;
        tx.commit().await?;
        Ok(records)
    }

    async fn audit_seal(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Under the audit stream's lock no record can follow this one while it is sealed.
        lock_stream(&mut tx, Stream::Audit).await?;
        let row = sqlx::query(
            "SELECT fwd_seq, record FROM audit_log WHERE node_code = $1 AND seq = $2 FOR UPDATE",
        )
        .bind(&record.node_code)
        .bind(to_i64(record.seq))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(unsealed(record));
        };
        if decode_audit(row.try_get::<&[u8], _>(1)?)?.hash != record.hash {
            return Err(StoreError::HeadConflict {
                node: record.node_code.clone(),
                seq: record.seq,
            });
        }
        // A record after it may already have been forwarded with this one unsigned: a copy elsewhere must stay
        // equal to the chain, so only the head is sealed late.
        let later =
            sqlx::query("SELECT 1 FROM audit_log WHERE node_code = $1 AND seq > $2 LIMIT 1")
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
        sqlx::query("UPDATE audit_log SET record = $1 WHERE fwd_seq = $2")
            .bind(record.encode_to_vec())
            .bind(row.try_get::<i64, _>(0)?)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_head(&self, node: &str) -> Result<Option<AuditRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT record FROM audit_log WHERE node_code = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(node)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| decode_audit(r.try_get::<&[u8], _>(0)?))
            .transpose()
    }

    async fn apply_child_audit(
        &self,
        child: &str,
        items: &[(u64, Option<AuditRecord>)],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Also makes reading and advancing the child's cursor atomic against a concurrent push of the same child.
        lock_stream(&mut tx, Stream::Audit).await?;
        let applied = read_cursor(&mut tx, child, Stream::Audit).await?;
        let (fresh, applied) = fresh_items(child, applied, items)?;
        let fresh: Vec<&AuditRecord> = fresh.into_iter().flatten().collect();
        insert_audit(&mut tx, &fresh).await?;
        write_cursor(&mut tx, child, Stream::Audit, applied).await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn audit_query(&self, q: &AuditQuery) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        let mut b: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT fwd_seq, record FROM audit_log WHERE TRUE");
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
                .push_bind(len_i32(p.chars().count()))
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
        let rows = b.build().fetch_all(&self.pool).await?;
        positioned_audit(&rows)
    }

    async fn audit_chain(
        &self,
        node: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT record FROM audit_log WHERE node_code = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(node)
        .bind(to_i64(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| decode_audit(r.try_get::<&[u8], _>(0)?))
            .collect()
    }

    async fn audit_nodes(&self) -> Result<Vec<String>, StoreError> {
        let nodes =
            sqlx::query_scalar("SELECT DISTINCT node_code FROM audit_log ORDER BY node_code")
                .fetch_all(&self.pool)
                .await?;
        Ok(nodes)
    }

    async fn audit_archivable(
        &self,
        before_ns: i64,
        max_fwd_seq: u64,
        limit: u32,
    ) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        let rows = sqlx::query(
            "SELECT fwd_seq, record FROM audit_log a WHERE a.fwd_seq <= $1 \
             AND a.seq < (SELECT MAX(h.seq) FROM audit_log h WHERE h.node_code = a.node_code) \
             AND a.seq < COALESCE((SELECT MIN(n.seq) FROM audit_log n \
                 WHERE n.node_code = a.node_code AND n.time_ns >= $2), 9223372036854775807) \
             ORDER BY a.fwd_seq LIMIT $3",
        )
        .bind(to_i64(max_fwd_seq))
        .bind(before_ns)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        positioned_audit(&rows)
    }

    async fn audit_delete(&self, fwd_seqs: &[u64]) -> Result<u64, StoreError> {
        if fwd_seqs.is_empty() {
            return Ok(0);
        }
        let positions: Vec<i64> = fwd_seqs.iter().map(|s| to_i64(*s)).collect();
        let done = sqlx::query("DELETE FROM audit_log WHERE fwd_seq = ANY($1)")
            .bind(positions)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn audit_delete_chain_upto(&self, node: &str, seq: u64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM audit_log WHERE node_code = $1 AND seq <= $2 \
             AND seq < (SELECT MAX(h.seq) FROM audit_log h WHERE h.node_code = $1)",
        )
        .bind(node)
        .bind(to_i64(seq))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn audit_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(n))
    }

    async fn note_served(
        &self,
        resource_id: &str,
        node: &str,
        until_unix: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO cache_served (resource_id, consumer_node, until_unix) VALUES ($1, $2, $3) \
             ON CONFLICT (resource_id, consumer_node) DO UPDATE SET \
             until_unix = GREATEST(cache_served.until_unix, excluded.until_unix)",
        )
        .bind(resource_id)
        .bind(node)
        .bind(until_unix)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn served_nodes(
        &self,
        resource_id: &str,
        now_unix: i64,
    ) -> Result<Vec<String>, StoreError> {
        let nodes = sqlx::query_scalar(
            "SELECT consumer_node FROM cache_served WHERE resource_id = $1 AND until_unix >= $2 \
             ORDER BY consumer_node",
        )
        .bind(resource_id)
        .bind(now_unix)
        .fetch_all(&self.pool)
        .await?;
        Ok(nodes)
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let taken = sqlx::query(
            "INSERT INTO leases (name, holder, until_at) \
             VALUES ($1, $2, clock_timestamp() + $3 * interval '1 millisecond') \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_at = excluded.until_at \
             WHERE leases.holder = excluded.holder OR leases.until_at < clock_timestamp()",
        )
        .bind(name)
        .bind(holder)
        .bind(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<String>, StoreError> {
        let holder = sqlx::query_scalar(
            "SELECT holder FROM leases WHERE name = $1 AND until_at >= clock_timestamp()",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(holder)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn change_feed(&self) -> Result<Option<Box<dyn ChangeFeed>>, StoreError> {
        // A connection of its own, outside the store's pool: closing the store never waits for the feed.
        let own = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*self.pool.connect_options()).clone());
        let mut listener = PgListener::connect_with(&own).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        Ok(Some(Box::new(PgChangeFeed { listener })))
    }

    async fn node_key(&self, node: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = sqlx::query_scalar("SELECT public_key FROM node_key WHERE node_code = $1")
            .bind(node)
            .fetch_optional(&self.pool)
            .await?;
        Ok(key)
    }

    async fn replace_node_key(&self, node: &str, key: &[u8]) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO node_key (node_code, public_key) VALUES ($1, $2) \
             ON CONFLICT (node_code) DO UPDATE SET public_key = excluded.public_key",
        )
        .bind(node)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn pin_node_key(&self, node: &str, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO node_key (node_code, public_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(node)
        .bind(key)
        .execute(&mut *tx)
        .await?;
        // A new statement sees a concurrent pin that won the insert, committed by now (ON CONFLICT waited for it).
        let pinned = sqlx::query_scalar("SELECT public_key FROM node_key WHERE node_code = $1")
            .bind(node)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(pinned)
    }

    async fn mark_unconfirmed(&self, node: &str) -> Result<(), StoreError> {
        recover::mark_unconfirmed(&self.pool, node).await
    }

    async fn uplink_mark(&self, stream: Stream) -> Result<Option<UplinkMark>, StoreError> {
        recover::uplink_mark(&self.pool, stream).await
    }

    async fn confirm_uplink(&self, stream: Stream) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM uplink_mark WHERE stream = $1")
            .bind(stream as i32)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn stage_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        recover::stage_audit(&self.pool, records).await
    }

    async fn stage_catalog(&self, entries: &[StoredEntry]) -> Result<(), StoreError> {
        recover::stage_catalog(&self.pool, entries).await
    }

    async fn staged(&self, stream: Stream) -> Result<Staged, StoreError> {
        recover::staged(&self.pool, stream).await
    }

    async fn clear_staged(&self, stream: Stream) -> Result<(), StoreError> {
        recover::clear_staged(&self.pool, stream).await
    }

    async fn recover_audit(
        &self,
        plan: &AuditRecovery,
        rechain: &Rechain<'_>,
    ) -> Result<Recovered, StoreError> {
        recover::recover_audit(&self.pool, plan, rechain).await
    }

    async fn recover_catalog(&self, plan: &CatalogRecovery) -> Result<Recovered, StoreError> {
        recover::recover_catalog(&self.pool, plan).await
    }

    async fn close_up(&self, stream: Stream, after: u64) -> Result<u64, StoreError> {
        recover::close_up(&self.pool, stream, after).await
    }

    async fn count_after(&self, stream: Stream, after: u64) -> Result<u64, StoreError> {
        recover::count_after(&self.pool, stream, after).await
    }

    async fn own_entries(
        &self,
        node: &str,
        after_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        catalog::own_entries(&self.pool, node, after_id, limit).await
    }

    async fn flow_append(
        &self,
        doc: &Doc,
        head: u64,
        items: &[Vec<u8>],
        snapshot: &[SnapshotChange],
    ) -> Result<u64, StoreError> {
        flow::append(&self.pool, doc, head, items, snapshot).await
    }

    async fn flow_items(
        &self,
        side: FlowSide,
        id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        flow::items(&self.pool, side, id, after, limit).await
    }

    async fn flow_head(&self, side: FlowSide, id: &str) -> Result<u64, StoreError> {
        flow::head(&self.pool, side, id).await
    }

    async fn flow_receive(
        &self,
        id: &str,
        items: &[(u64, Vec<u8>)],
        doc: Option<&Doc>,
    ) -> Result<u64, StoreError> {
        flow::receive(&self.pool, id, items, doc).await
    }

    async fn flow_snapshot(
        &self,
        id: &str,
        after_key: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        flow::snapshot(&self.pool, id, after_key, limit).await
    }

    async fn ops_append(&self, records: &[OperationRecord]) -> Result<(), StoreError> {
        ops::append(&self.pool, records).await
    }

    async fn ops_query(
        &self,
        query: &OperationQuery,
    ) -> Result<Vec<(u64, OperationRecord)>, StoreError> {
        ops::query(&self.pool, query).await
    }

    async fn ops_purge(&self, before_ns: i64) -> Result<u64, StoreError> {
        ops::purge(&self.pool, before_ns).await
    }

    async fn ops_trim(&self, keep: u64) -> Result<u64, StoreError> {
        ops::trim(&self.pool, keep).await
    }

    async fn close(&self) {
        PgStore::close(self).await;
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Stores a governance document inside a transaction.
async fn put_doc_in(tx: &mut Transaction<'static, Postgres>, d: &Doc) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO governance_doc (kind, id, provider_uscc, consumer_uscc, state, due_at, body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (kind, id) DO UPDATE SET \
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
