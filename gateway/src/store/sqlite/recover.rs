//! Recovery of what a node lost after forwarding it, in SQLite: the marks of unconfirmed runs, what is staged of
//! what the parent holds, and the transactions that apply it (see `crate::uplink` for the whole procedure).

use std::collections::HashMap;

use fedgate_proto::v1::{AuditRecord, CatalogChange, CatalogEntry, Stream};
use prost::Message;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool, Transaction};

use super::begin;
use super::catalog::{append_outbox, insert_withdrawn, rows_in, upsert_rows, withdraw};
use crate::store::{
    AuditRecovery, CatalogRecovery, EntryFix, Rechain, Recovered, Staged, StoreError, StoredEntry,
    UplinkMark, change_of, decode_audit, decode_entry, entry_fix, own_ids_changed, to_i64, to_u64,
};

/// Rows read or written at once.
const PAGE: usize = 1000;
/// Rows of one multi-row insert into `takeback_audit` (8 binds each).
const STAGE_ROWS: usize = 500;

/// The stream's highest position: the outbox head, or the parent's acknowledgement when that is higher.
async fn stream_end(tx: &mut Transaction<'_, Sqlite>, stream: Stream) -> Result<u64, StoreError> {
    let head: i64 = match stream {
        Stream::Audit => {
            sqlx::query_scalar("SELECT COALESCE(MAX(fwd_seq), 0) FROM audit_log")
                .fetch_one(&mut **tx)
                .await?
        }
        _ => {
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE stream = ?")
                .bind(stream as i32)
                .fetch_one(&mut **tx)
                .await?
        }
    };
    let acked: Option<i64> = sqlx::query_scalar("SELECT seq FROM uplink_ack WHERE stream = ?")
        .bind(stream as i32)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(to_u64(head.max(acked.unwrap_or(0))))
}

pub(super) async fn mark_unconfirmed(writer: &SqlitePool, node: &str) -> Result<(), StoreError> {
    let mut tx = begin(writer).await?;
    for stream in [Stream::Catalog, Stream::Audit] {
        let head = stream_end(&mut tx, stream).await?;
        let own: i64 = if stream == Stream::Audit {
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM audit_log WHERE node_code = ?")
                .bind(node)
                .fetch_one(&mut *tx)
                .await?
        } else {
            0
        };
        sqlx::query("INSERT INTO uplink_mark (stream, head, own_seq) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
            .bind(stream as i32)
            .bind(to_i64(head))
            .bind(own)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn uplink_mark(
    reader: &SqlitePool,
    stream: Stream,
) -> Result<Option<UplinkMark>, StoreError> {
    let row = sqlx::query("SELECT head, own_seq FROM uplink_mark WHERE stream = ?")
        .bind(stream as i32)
        .fetch_optional(reader)
        .await?;
    Ok(row.map(|r| UplinkMark {
        head: to_u64(r.get(0)),
        own_seq: to_u64(r.get(1)),
    }))
}

pub(super) async fn stage_audit(
    writer: &SqlitePool,
    records: &[AuditRecord],
) -> Result<(), StoreError> {
    let mut tx = begin(writer).await?;
    for chunk in records.chunks(STAGE_ROWS) {
        let mut b: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO takeback_audit (seq, time_ns, operation, consumer_uscc, provider_uscc, resource_id, \
             outcome, record) ",
        );
        b.push_values(chunk, |mut row, r| {
            row.push_bind(to_i64(r.seq))
                .push_bind(r.time_unix_nanos)
                .push_bind(r.operation)
                .push_bind(r.consumer_uscc.clone())
                .push_bind(r.provider_uscc.clone())
                .push_bind(r.resource_id.clone())
                .push_bind(r.outcome.clone())
                .push_bind(r.encode_to_vec());
        });
        b.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn stage_catalog(
    writer: &SqlitePool,
    entries: &[StoredEntry],
) -> Result<(), StoreError> {
    let mut tx = begin(writer).await?;
    for chunk in entries.chunks(PAGE) {
        let mut b: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT OR REPLACE INTO takeback_catalog (id, withdrawn, entry) ");
        b.push_values(chunk, |mut row, e| {
            row.push_bind(e.entry.id.clone())
                .push_bind(i64::from(e.withdrawn))
                .push_bind(e.entry.encode_to_vec());
        });
        b.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn staged(reader: &SqlitePool, stream: Stream) -> Result<Staged, StoreError> {
    if stream == Stream::Audit {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM takeback_audit")
            .fetch_one(reader)
            .await?;
        let last: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT record FROM takeback_audit ORDER BY seq DESC LIMIT 1")
                .fetch_optional(reader)
                .await?;
        return Ok(Staged {
            count: to_u64(count),
            last_record: last.map(|b| decode_audit(&b)).transpose()?,
            last_id: None,
        });
    }
    let row = sqlx::query("SELECT COUNT(*), MAX(id) FROM takeback_catalog")
        .fetch_one(reader)
        .await?;
    Ok(Staged {
        count: to_u64(row.get(0)),
        last_record: None,
        last_id: row.get(1),
    })
}

pub(super) async fn clear_staged(writer: &SqlitePool, stream: Stream) -> Result<(), StoreError> {
    let table = if stream == Stream::Audit {
        "DELETE FROM takeback_audit"
    } else {
        "DELETE FROM takeback_catalog"
    };
    sqlx::query(table).execute(writer).await?;
    Ok(())
}

/// Moves the items of `stream` at positions above `after` to consecutive positions from `base + 1`, keeping
/// their order; returns how many moved. Positions go through negative values, so no two rows ever share one.
async fn renumber(
    tx: &mut Transaction<'_, Sqlite>,
    stream: Stream,
    after: u64,
    base: u64,
) -> Result<u64, StoreError> {
    let moved = if stream == Stream::Audit {
        let done = sqlx::query(
            "UPDATE audit_log SET fwd_seq = -(?1 + r.rn) FROM (SELECT fwd_seq AS f, \
             ROW_NUMBER() OVER (ORDER BY fwd_seq) AS rn FROM audit_log WHERE fwd_seq > ?2) AS r \
             WHERE audit_log.fwd_seq = r.f",
        )
        .bind(to_i64(base))
        .bind(to_i64(after))
        .execute(&mut **tx)
        .await?;
        sqlx::query("UPDATE audit_log SET fwd_seq = -fwd_seq WHERE fwd_seq < 0")
            .execute(&mut **tx)
            .await?;
        done.rows_affected()
    } else {
        let done = sqlx::query(
            "UPDATE outbox SET seq = -(?1 + r.rn) FROM (SELECT seq AS s, \
             ROW_NUMBER() OVER (ORDER BY seq) AS rn FROM outbox WHERE stream = ?3 AND seq > ?2) AS r \
             WHERE outbox.stream = ?3 AND outbox.seq = r.s",
        )
        .bind(to_i64(base))
        .bind(to_i64(after))
        .bind(stream as i32)
        .execute(&mut **tx)
        .await?;
        sqlx::query("UPDATE outbox SET seq = -seq WHERE stream = ? AND seq < 0")
            .bind(stream as i32)
            .execute(&mut **tx)
            .await?;
        done.rows_affected()
    };
    Ok(moved)
}

/// Makes `seq` the parent's acknowledgement of `stream` (also below what was recorded).
async fn set_acked(
    tx: &mut Transaction<'_, Sqlite>,
    stream: Stream,
    seq: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO uplink_ack (stream, seq) VALUES (?, ?) ON CONFLICT(stream) DO UPDATE SET seq = excluded.seq",
    )
    .bind(stream as i32)
    .bind(to_i64(seq))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Makes the next audit position the one after `last` or after the highest held, whichever is higher.
async fn continue_audit_after(
    tx: &mut Transaction<'_, Sqlite>,
    last: u64,
) -> Result<(), StoreError> {
    let held: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(fwd_seq), 0) FROM audit_log")
        .fetch_one(&mut **tx)
        .await?;
    let next_after = held.max(to_i64(last));
    // AUTOINCREMENT continues after the larger of this and the highest rowid.
    let done = sqlx::query("UPDATE sqlite_sequence SET seq = ? WHERE name = 'audit_log'")
        .bind(next_after)
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() == 0 {
        sqlx::query("INSERT INTO sqlite_sequence (name, seq) VALUES ('audit_log', ?)")
            .bind(next_after)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Ends a recovery of `stream`: the parent's cursor is the acknowledged position, the mark and what was staged
/// are gone.
async fn finish(
    tx: &mut Transaction<'_, Sqlite>,
    stream: Stream,
    cursor: u64,
) -> Result<(), StoreError> {
    set_acked(tx, stream, cursor).await?;
    sqlx::query("DELETE FROM uplink_mark WHERE stream = ?")
        .bind(stream as i32)
        .execute(&mut **tx)
        .await?;
    let staged = if stream == Stream::Audit {
        "DELETE FROM takeback_audit"
    } else {
        "DELETE FROM takeback_catalog"
    };
    sqlx::query(staged).execute(&mut **tx).await?;
    Ok(())
}

pub(super) async fn recover_audit(
    writer: &SqlitePool,
    plan: &AuditRecovery,
    rechain: &Rechain<'_>,
) -> Result<Recovered, StoreError> {
    let mut tx = begin(writer).await?;
    let node = plan.node.as_str();
    let staged = sqlx::query(
        "SELECT COUNT(*), COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM takeback_audit",
    )
    .fetch_one(&mut *tx)
    .await?;
    let (k, first, last) = (
        to_u64(staged.get(0)),
        to_u64(staged.get(1)),
        to_u64(staged.get(2)),
    );
    if k > 0 && (first != plan.common + 1 || last != plan.common + k) {
        return Err(StoreError::Unrecoverable(format!(
            "the records taken back ({first}..{last}, {k} of them) do not follow record {} without a gap",
            plan.common
        )));
    }
    let after: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE node_code = ? AND seq > ?")
            .bind(node)
            .bind(to_i64(plan.common))
            .fetch_one(&mut *tx)
            .await?;
    let after = to_u64(after);
    if k > 0 && after > 0 {
        let early: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM audit_log WHERE node_code = ? AND seq > ? AND fwd_seq <= ?",
        )
        .bind(node)
        .bind(to_i64(plan.common))
        .bind(to_i64(plan.mark))
        .fetch_one(&mut *tx)
        .await?;
        if early > 0 {
            return Err(StoreError::Unrecoverable(format!(
                "{early} of this node's records after #{} were written before the run that has not compared its \
                 history with the parent's; the parent's copy of this chain forks earlier",
                plan.common
            )));
        }
    }
    let base = plan.cursor.max(plan.mark + k);
    let moved = renumber(&mut tx, Stream::Audit, plan.mark, base).await?;
    let mut redone = 0;
    if k > 0 && after > 0 {
        let head_hash = sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT record FROM takeback_audit ORDER BY seq DESC LIMIT 1",
        )
        .fetch_one(&mut *tx)
        .await
        .map(|b| decode_audit(&b))??
        .hash;
        // Out of the way of the sequence numbers they take next.
        sqlx::query("UPDATE audit_log SET seq = -seq WHERE node_code = ? AND seq > ?")
            .bind(node)
            .bind(to_i64(plan.common))
            .execute(&mut *tx)
            .await?;
        let mut prev = (last, head_hash);
        while redone < after {
            let rows = sqlx::query(
                "SELECT fwd_seq, record FROM audit_log WHERE node_code = ? AND seq < 0 ORDER BY seq DESC LIMIT ?",
            )
            .bind(node)
            .bind(PAGE as i64)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                break;
            }
            let mut positions = Vec::with_capacity(rows.len());
            let mut old = Vec::with_capacity(rows.len());
            for r in &rows {
                positions.push(r.get::<i64, _>(0));
                old.push(decode_audit(r.get::<&[u8], _>(1))?);
            }
            redone += old.len() as u64;
            let new = rechain(&old, (prev.0, &prev.1), redone >= after);
            for (pos, r) in positions.iter().zip(&new) {
                sqlx::query(
                    "UPDATE audit_log SET seq = ?, operation = ?, record = ? WHERE fwd_seq = ?",
                )
                .bind(to_i64(r.seq))
                .bind(r.operation)
                .bind(r.encode_to_vec())
                .bind(pos)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(r) = new.last() {
                prev = (r.seq, r.hash.clone());
            }
        }
    }
    if k > 0 {
        // Where the parent's cursor already counts them as applied, so they are not shipped again.
        sqlx::query(
            "INSERT INTO audit_log (fwd_seq, node_code, seq, time_ns, operation, consumer_uscc, provider_uscc, \
             resource_id, outcome, record) SELECT ?1 + ROW_NUMBER() OVER (ORDER BY seq), ?2, seq, time_ns, \
             operation, consumer_uscc, provider_uscc, resource_id, outcome, record FROM takeback_audit \
             ORDER BY seq",
        )
        .bind(to_i64(plan.mark))
        .bind(node)
        .execute(&mut *tx)
        .await?;
    }
    continue_audit_after(&mut tx, base).await?;
    finish(&mut tx, Stream::Audit, plan.cursor).await?;
    tx.commit().await?;
    Ok(Recovered {
        taken_back: k,
        redone,
        moved,
    })
}

pub(super) async fn recover_catalog(
    writer: &SqlitePool,
    plan: &CatalogRecovery,
) -> Result<Recovered, StoreError> {
    let mut tx = begin(writer).await?;
    // The entries of this node changed here since the mark: the items after it.
    let mut changed = std::collections::HashSet::new();
    let mut after = to_i64(plan.mark);
    loop {
        let rows = sqlx::query(
            "SELECT seq, payload FROM outbox WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(Stream::Catalog as i32)
        .bind(after)
        .bind(PAGE as i64)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        changed.extend(own_ids_changed(
            &plan.node,
            rows.iter().map(|r| r.get::<&[u8], _>(1)),
        )?);
    }
    // Out of the way of the entries taken back, which take the positions after the mark.
    let moved = sqlx::query("UPDATE outbox SET seq = -seq WHERE stream = ? AND seq > ?")
        .bind(Stream::Catalog as i32)
        .bind(to_i64(plan.mark))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let mut done = Recovered {
        moved,
        ..Recovered::default()
    };
    let mut republished: Vec<CatalogChange> = Vec::new();
    let mut next = plan.mark;
    let mut after_id = String::new();
    loop {
        let rows = sqlx::query(
            "SELECT id, withdrawn, entry FROM takeback_catalog WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(&after_id)
        .bind(PAGE as i64)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else { break };
        after_id = last.get(0);
        let mut held = Vec::with_capacity(rows.len());
        for r in &rows {
            held.push(StoredEntry {
                entry: decode_entry(r.get::<&str, _>(0), r.get::<&[u8], _>(2))?,
                withdrawn: r.get::<i64, _>(1) != 0,
            });
        }
        let ids: Vec<&str> = held.iter().map(|e| e.entry.id.as_str()).collect();
        let local: HashMap<String, StoredEntry> = rows_in(&mut tx, &ids).await?;
        let mut upserts: Vec<CatalogEntry> = Vec::new();
        let mut taken: Vec<Vec<u8>> = Vec::new();
        for parent in &held {
            let mine = local.get(&parent.entry.id);
            match entry_fix(parent, mine, changed.contains(&parent.entry.id)) {
                EntryFix::Keep => {}
                EntryFix::TakeBack => {
                    done.taken_back += 1;
                    taken.push(change_of(parent).encode_to_vec());
                    match (parent.withdrawn, mine) {
                        (false, _) => upserts.push(parent.entry.clone()),
                        (true, Some(_)) => {
                            withdraw(&mut tx, &parent.entry.id, parent.entry.version).await?
                        }
                        (true, None) => insert_withdrawn(&mut tx, &parent.entry).await?,
                    }
                }
                EntryFix::Republish(version) => {
                    let Some(mine) = mine else { continue };
                    done.redone += 1;
                    let mut again = mine.clone();
                    again.entry.version = version;
                    if again.withdrawn {
                        withdraw(&mut tx, &again.entry.id, version).await?;
                    } else {
                        upserts.push(again.entry.clone());
                    }
                    republished.push(change_of(&again));
                }
            }
        }
        let refs: Vec<&CatalogEntry> = upserts.iter().collect();
        upsert_rows(&mut tx, &refs).await?;
        // In the stream too, where the parent already counts them applied: not shipped again, but there to
        // ship if the parent loses them in turn.
        insert_outbox_at(&mut tx, next, &taken).await?;
        next += taken.len() as u64;
    }
    // What was written since the mark, after the parent's cursor (and after what was taken back).
    let base = plan.cursor.max(next);
    sqlx::query(
        "UPDATE outbox SET seq = ?1 + r.rn FROM (SELECT seq AS s, ROW_NUMBER() OVER (ORDER BY seq DESC) AS rn \
         FROM outbox WHERE stream = ?2 AND seq < 0) AS r WHERE outbox.stream = ?2 AND outbox.seq = r.s",
    )
    .bind(to_i64(base))
    .bind(Stream::Catalog as i32)
    .execute(&mut *tx)
    .await?;
    // Positions continue after the parent's cursor from here (the outbox appends after the acknowledgement).
    set_acked(&mut tx, Stream::Catalog, plan.cursor).await?;
    let payloads: Vec<Vec<u8>> = republished.iter().map(|c| c.encode_to_vec()).collect();
    if !payloads.is_empty() {
        append_outbox(&mut tx, &payloads).await?;
    }
    finish(&mut tx, Stream::Catalog, plan.cursor).await?;
    tx.commit().await?;
    Ok(done)
}

/// Stores catalog changes at positions `after + 1`, `after + 2`, ... of the catalog outbox.
async fn insert_outbox_at(
    tx: &mut Transaction<'_, Sqlite>,
    after: u64,
    payloads: &[Vec<u8>],
) -> Result<(), StoreError> {
    let mut seq = to_i64(after);
    for chunk in payloads.chunks(PAGE) {
        let mut b: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO outbox (stream, seq, payload) ");
        b.push_values(chunk, |mut row, payload| {
            seq += 1;
            row.push_bind(Stream::Catalog as i32)
                .push_bind(seq)
                .push_bind(payload.as_slice());
        });
        b.build().execute(&mut **tx).await?;
    }
    Ok(())
}

pub(super) async fn close_up(
    writer: &SqlitePool,
    stream: Stream,
    after: u64,
) -> Result<u64, StoreError> {
    let mut tx = begin(writer).await?;
    let moved = renumber(&mut tx, stream, after, after).await?;
    set_acked(&mut tx, stream, after).await?;
    if stream == Stream::Audit {
        let held: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(fwd_seq), 0) FROM audit_log")
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("UPDATE sqlite_sequence SET seq = ? WHERE name = 'audit_log'")
            .bind(held.max(to_i64(after)))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(moved)
}

pub(super) async fn count_after(
    reader: &SqlitePool,
    stream: Stream,
    after: u64,
) -> Result<u64, StoreError> {
    let n: i64 = if stream == Stream::Audit {
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE fwd_seq > ?")
            .bind(to_i64(after))
            .fetch_one(reader)
            .await?
    } else {
        sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE stream = ? AND seq > ?")
            .bind(stream as i32)
            .bind(to_i64(after))
            .fetch_one(reader)
            .await?
    };
    Ok(to_u64(n))
}
