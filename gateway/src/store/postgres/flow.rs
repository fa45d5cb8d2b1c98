//! Flow-back subscriptions in PostgreSQL: each subscription's items (outbox at the resource's node, inbox at the
//! subscriber's) and the snapshot of digests of a diffed provider. Writers of one subscription's items are
//! serialized by an advisory lock on its id, so replicas never number two items alike.

use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::store::{Doc, FlowSide, SnapshotChange, StoreError, to_i64, to_u64};

/// Takes the advisory lock of subscription `id`'s items on `side` for the rest of the transaction, and reads
/// their head.
async fn locked_head(
    tx: &mut Transaction<'static, Postgres>,
    side: FlowSide,
    id: &str,
) -> Result<u64, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, $2))")
        .bind(id)
        .bind(side.as_i64())
        .execute(&mut **tx)
        .await?;
    let head: Option<i64> =
        sqlx::query_scalar("SELECT MAX(seq) FROM flow_item WHERE side = $1 AND sub_id = $2")
            .bind(side_i16(side))
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
    Ok(head.map_or(0, to_u64))
}

fn side_i16(side: FlowSide) -> i16 {
    match side {
        FlowSide::Outbox => 1,
        FlowSide::Inbox => 2,
    }
}

pub(super) async fn append(
    pool: &PgPool,
    doc: &Doc,
    expected: u64,
    items: &[Vec<u8>],
    snapshot: &[SnapshotChange],
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let head = locked_head(&mut tx, FlowSide::Outbox, &doc.id).await?;
    if head != expected {
        return Err(StoreError::FlowMoved {
            id: doc.id.clone(),
            head,
        });
    }
    super::put_doc_in(&mut tx, doc).await?;
    let seqs: Vec<i64> = (1..=items.len() as u64).map(|i| to_i64(head + i)).collect();
    if !items.is_empty() {
        sqlx::query(
            "INSERT INTO flow_item (side, sub_id, seq, body) \
             SELECT $1, $2, s, b FROM UNNEST($3::bigint[], $4::bytea[]) AS t(s, b)",
        )
        .bind(side_i16(FlowSide::Outbox))
        .bind(&doc.id)
        .bind(&seqs)
        .bind(items)
        .execute(&mut *tx)
        .await?;
    }
    for (key, digest) in snapshot {
        match digest {
            Some(d) => {
                sqlx::query(
                    "INSERT INTO flow_snapshot (sub_id, key, digest) VALUES ($1, $2, $3) \
                     ON CONFLICT (sub_id, key) DO UPDATE SET digest = excluded.digest",
                )
                .bind(&doc.id)
                .bind(key)
                .bind(d)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM flow_snapshot WHERE sub_id = $1 AND key = $2")
                    .bind(&doc.id)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    tx.commit().await?;
    Ok(head + items.len() as u64)
}

pub(super) async fn items(
    pool: &PgPool,
    side: FlowSide,
    id: &str,
    after: u64,
    limit: u32,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq, body FROM flow_item WHERE side = $1 AND sub_id = $2 AND seq > $3 \
         ORDER BY seq LIMIT $4",
    )
    .bind(side_i16(side))
    .bind(id)
    .bind(to_i64(after))
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| Ok((to_u64(r.try_get(0)?), r.try_get(1)?)))
        .collect()
}

pub(super) async fn head(pool: &PgPool, side: FlowSide, id: &str) -> Result<u64, StoreError> {
    let head: Option<i64> =
        sqlx::query_scalar("SELECT MAX(seq) FROM flow_item WHERE side = $1 AND sub_id = $2")
            .bind(side_i16(side))
            .bind(id)
            .fetch_one(pool)
            .await?;
    Ok(head.map_or(0, to_u64))
}

pub(super) async fn receive(
    pool: &PgPool,
    id: &str,
    items: &[(u64, Vec<u8>)],
    doc: Option<&Doc>,
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let start = locked_head(&mut tx, FlowSide::Inbox, id).await?;
    let mut head = start;
    let (mut seqs, mut bodies) = (Vec::new(), Vec::new());
    for (seq, body) in items {
        if *seq <= head {
            continue;
        }
        if *seq != head + 1 {
            break;
        }
        seqs.push(to_i64(*seq));
        bodies.push(body.as_slice());
        head = *seq;
    }
    if !seqs.is_empty() {
        sqlx::query(
            "INSERT INTO flow_item (side, sub_id, seq, body) \
             SELECT $1, $2, s, b FROM UNNEST($3::bigint[], $4::bytea[]) AS t(s, b)",
        )
        .bind(side_i16(FlowSide::Inbox))
        .bind(id)
        .bind(&seqs)
        .bind(&bodies)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(doc) = doc {
        super::put_doc_in(&mut tx, doc).await?;
    }
    tx.commit().await?;
    Ok(head)
}

pub(super) async fn snapshot(
    pool: &PgPool,
    id: &str,
    after_key: &str,
    limit: u32,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let rows = sqlx::query(
        "SELECT key, digest FROM flow_snapshot WHERE sub_id = $1 AND key > $2 ORDER BY key LIMIT $3",
    )
    .bind(id)
    .bind(after_key)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}
