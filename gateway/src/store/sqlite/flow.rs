//! Flow-back subscriptions in SQLite: each subscription's items (outbox at the resource's node, inbox at the
//! subscriber's) and the snapshot of digests of a diffed provider.

use sqlx::{Row, Sqlite, SqlitePool, Transaction};

use super::begin;
use crate::store::{Doc, FlowSide, SnapshotChange, StoreError, to_i64, to_u64};

async fn head_in(
    tx: &mut Transaction<'static, Sqlite>,
    side: FlowSide,
    id: &str,
) -> Result<u64, StoreError> {
    let head: Option<i64> =
        sqlx::query_scalar("SELECT MAX(seq) FROM flow_item WHERE side = ? AND sub_id = ?")
            .bind(side.as_i64())
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
    Ok(head.map_or(0, to_u64))
}

pub(super) async fn append(
    writer: &SqlitePool,
    doc: &Doc,
    expected: u64,
    items: &[Vec<u8>],
    snapshot: &[SnapshotChange],
) -> Result<u64, StoreError> {
    let mut tx = begin(writer).await?;
    let head = head_in(&mut tx, FlowSide::Outbox, &doc.id).await?;
    if head != expected {
        return Err(StoreError::FlowMoved {
            id: doc.id.clone(),
            head,
        });
    }
    super::put_doc_in(&mut tx, doc).await?;
    let mut seq = head;
    for body in items {
        seq += 1;
        sqlx::query("INSERT INTO flow_item (side, sub_id, seq, body) VALUES (?, ?, ?, ?)")
            .bind(FlowSide::Outbox.as_i64())
            .bind(&doc.id)
            .bind(to_i64(seq))
            .bind(body)
            .execute(&mut *tx)
            .await?;
    }
    for (key, digest) in snapshot {
        match digest {
            Some(d) => {
                sqlx::query(
                    "INSERT INTO flow_snapshot (sub_id, key, digest) VALUES (?, ?, ?) \
                     ON CONFLICT(sub_id, key) DO UPDATE SET digest = excluded.digest",
                )
                .bind(&doc.id)
                .bind(key)
                .bind(d)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM flow_snapshot WHERE sub_id = ? AND key = ?")
                    .bind(&doc.id)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    tx.commit().await?;
    Ok(seq)
}

pub(super) async fn items(
    reader: &SqlitePool,
    side: FlowSide,
    id: &str,
    after: u64,
    limit: u32,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq, body FROM flow_item WHERE side = ? AND sub_id = ? AND seq > ? ORDER BY seq LIMIT ?",
    )
    .bind(side.as_i64())
    .bind(id)
    .bind(to_i64(after))
    .bind(i64::from(limit))
    .fetch_all(reader)
    .await?;
    rows.iter()
        .map(|r| Ok((to_u64(r.try_get(0)?), r.try_get(1)?)))
        .collect()
}

pub(super) async fn head(reader: &SqlitePool, side: FlowSide, id: &str) -> Result<u64, StoreError> {
    let head: Option<i64> =
        sqlx::query_scalar("SELECT MAX(seq) FROM flow_item WHERE side = ? AND sub_id = ?")
            .bind(side.as_i64())
            .bind(id)
            .fetch_one(reader)
            .await?;
    Ok(head.map_or(0, to_u64))
}

pub(super) async fn receive(
    writer: &SqlitePool,
    id: &str,
    items: &[(u64, Vec<u8>)],
    doc: Option<&Doc>,
) -> Result<u64, StoreError> {
    let mut tx = begin(writer).await?;
    let mut head = head_in(&mut tx, FlowSide::Inbox, id).await?;
    for (seq, body) in items {
        if *seq <= head {
            continue;
        }
        if *seq != head + 1 {
            break;
        }
        sqlx::query("INSERT INTO flow_item (side, sub_id, seq, body) VALUES (?, ?, ?, ?)")
            .bind(FlowSide::Inbox.as_i64())
            .bind(id)
            .bind(to_i64(*seq))
            .bind(body)
            .execute(&mut *tx)
            .await?;
        head = *seq;
    }
    if let Some(doc) = doc {
        super::put_doc_in(&mut tx, doc).await?;
    }
    tx.commit().await?;
    Ok(head)
}

pub(super) async fn snapshot(
    reader: &SqlitePool,
    id: &str,
    after_key: &str,
    limit: u32,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let rows = sqlx::query(
        "SELECT key, digest FROM flow_snapshot WHERE sub_id = ? AND key > ? ORDER BY key LIMIT ?",
    )
    .bind(id)
    .bind(after_key)
    .bind(i64::from(limit))
    .fetch_all(reader)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}
