//! The catalog in PostgreSQL: rows by position, a GIN index over the tokens the node computes for each live
//! entry, and the catalog outbox (written under the catalog stream's advisory lock).

use std::collections::HashMap;

use fedgate_proto::v1::{CatalogChange, CatalogEntry, Stream, Withdrawal, catalog_change};
use futures::TryStreamExt;
use prost::Message;
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::{lock_stream, read_cursor, write_cursor};
use crate::catalog::{self, TOKENIZER_VERSION};
use crate::store::{
    ApplyStep, CatalogHit, CatalogQuery, Page, StoreChange, StoreError, StoredEntry, Upstream,
    apply_steps, decode_entry, fresh_items, own_id_range, to_i64, to_u64,
};

/// Rows of one multi-row statement, and ids of one `= ANY` list.
const ROWS: usize = 1000;

/// Rebuilds the search index unless it was built by this tokenizer version.
pub(super) async fn ensure_index(pool: &PgPool) -> Result<(), StoreError> {
    let built: Option<i32> = sqlx::query_scalar("SELECT tokenizer FROM catalog_index")
        .fetch_optional(pool)
        .await?;
    if built == Some(TOKENIZER_VERSION as i32) {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    lock_stream(&mut tx, Stream::Catalog).await?;
    let mut after = 0i64;
    loop {
        let rows = sqlx::query(
            "SELECT pos, id, entry FROM catalog WHERE NOT withdrawn AND pos > $1 ORDER BY pos LIMIT $2",
        )
        .bind(after)
        .bind(ROWS as i64)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.try_get(0)?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut tokens = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get(1)?;
            let entry = decode_entry(&id, r.try_get::<&[u8], _>(2)?)?;
            tokens.push(token_list(&entry));
            ids.push(id);
        }
        sqlx::query(
            "UPDATE catalog c SET tokens = array_to_tsvector(string_to_array(t.tokens, ' ')) \
             FROM UNNEST($1::text[], $2::text[]) AS t(id, tokens) WHERE c.id = t.id",
        )
        .bind(&ids)
        .bind(&tokens)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM catalog_index")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO catalog_index (tokenizer) VALUES ($1)")
        .bind(TOKENIZER_VERSION as i32)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// An entry's tokens separated by spaces (no token holds one).
fn token_list(entry: &CatalogEntry) -> String {
    catalog::entry_tokens(entry).join(" ")
}

/// The tsquery requiring every token of `query`, its lexemes quoted verbatim; `None` when the query has none.
fn tsquery(query: &CatalogQuery) -> Option<String> {
    let tokens = catalog::query_tokens(query);
    if tokens.is_empty() {
        return None;
    }
    let terms: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.prefix {
                format!("'{}':*", t.token)
            } else {
                format!("'{}'", t.token)
            }
        })
        .collect();
    Some(terms.join(" & "))
}

/// Live entries matching `q`, in position order, each candidate checked exactly.
pub(super) async fn search(pool: &PgPool, q: &CatalogQuery) -> Result<Vec<CatalogHit>, StoreError> {
    let expression = tsquery(q);
    let mut page = Page::new(q);
    loop {
        let wanted = page.wanted();
        if wanted == 0 {
            break;
        }
        let after = page.after.map_or(0, to_i64);
        let query = match &expression {
            Some(e) => sqlx::query(
                "SELECT pos, id, entry FROM catalog WHERE tokens @@ $1::tsquery AND pos > $2 \
                 AND NOT withdrawn ORDER BY pos LIMIT $3",
            )
            .bind(e.as_str()),
            None => sqlx::query(
                "SELECT pos, id, entry FROM catalog WHERE pos > $1 AND NOT withdrawn ORDER BY pos LIMIT $2",
            ),
        };
        let mut rows = query.bind(after).bind(i64::from(wanted)).fetch(pool);
        let mut got = 0usize;
        while let Some(r) = rows.try_next().await? {
            got += 1;
            let position = to_u64(r.try_get::<i64, _>(0)?);
            if !page.offer(
                position,
                r.try_get::<&str, _>(1)?,
                r.try_get::<&[u8], _>(2)?,
            )? {
                break;
            }
        }
        drop(rows);
        page.read(wanted, got);
    }
    Ok(page.hits)
}

/// The rows with these ids.
pub(super) async fn entries(pool: &PgPool, ids: &[String]) -> Result<Vec<StoredEntry>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS) {
        let rows = sqlx::query("SELECT id, entry, withdrawn FROM catalog WHERE id = ANY($1)")
            .bind(chunk)
            .fetch_all(pool)
            .await?;
        for r in rows {
            out.push(StoredEntry {
                entry: decode_entry(r.try_get::<&str, _>(0)?, r.try_get::<&[u8], _>(1)?)?,
                withdrawn: r.try_get::<bool, _>(2)?,
            });
        }
    }
    Ok(out)
}

async fn versions(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[String],
) -> Result<HashMap<String, u64>, StoreError> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS) {
        let rows = sqlx::query("SELECT id, version FROM catalog WHERE id = ANY($1)")
            .bind(chunk)
            .fetch_all(&mut **tx)
            .await?;
        for r in rows {
            out.insert(r.try_get::<String, _>(0)?, to_u64(r.try_get::<i64, _>(1)?));
        }
    }
    Ok(out)
}

/// Writes upserts of distinct ids with their tokens, each only if newer than what is stored.
pub(super) async fn upsert_rows(
    tx: &mut Transaction<'_, Postgres>,
    entries: &[&CatalogEntry],
) -> Result<(), StoreError> {
    for chunk in entries.chunks(ROWS) {
        let ids: Vec<&str> = chunk.iter().map(|e| e.id.as_str()).collect();
        let nodes: Vec<&str> = chunk.iter().map(|e| e.node_code.as_str()).collect();
        let providers: Vec<&str> = chunk.iter().map(|e| e.provider_uscc.as_str()).collect();
        let share_types: Vec<i32> = chunk.iter().map(|e| e.share_type).collect();
        let versions: Vec<i64> = chunk.iter().map(|e| to_i64(e.version)).collect();
        let bodies: Vec<Vec<u8>> = chunk.iter().map(|e| e.encode_to_vec()).collect();
        let tokens: Vec<String> = chunk.iter().map(|e| token_list(e)).collect();
        sqlx::query(
            "INSERT INTO catalog (id, node_code, provider_uscc, share_type, version, withdrawn, entry, tokens) \
             SELECT id, node_code, provider_uscc, share_type, version, FALSE, entry, \
             array_to_tsvector(string_to_array(tokens, ' ')) \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::bytea[], $7::text[]) \
             AS t(id, node_code, provider_uscc, share_type, version, entry, tokens) \
             ON CONFLICT (id) DO UPDATE SET node_code = excluded.node_code, \
             provider_uscc = excluded.provider_uscc, share_type = excluded.share_type, \
             version = excluded.version, withdrawn = FALSE, entry = excluded.entry, tokens = excluded.tokens \
             WHERE excluded.version > catalog.version",
        )
        .bind(&ids)
        .bind(&nodes)
        .bind(&providers)
        .bind(&share_types)
        .bind(&versions)
        .bind(&bodies)
        .bind(&tokens)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Marks an entry withdrawn if the withdrawal is newer than what is stored, and drops its tokens.
pub(super) async fn withdraw(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
    version: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE catalog SET withdrawn = TRUE, tokens = NULL, version = $1 WHERE id = $2 AND version < $1",
    )
    .bind(to_i64(version))
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Applies changes in order (see [`apply_steps`]).
async fn apply_changes(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[&CatalogChange],
) -> Result<(), StoreError> {
    for step in apply_steps(changes) {
        match step {
            ApplyStep::Upserts(run) => upsert_rows(tx, &run).await?,
            ApplyStep::Withdraw(id, version) => withdraw(tx, id, version).await?,
        }
    }
    Ok(())
}

/// Under a parent, appends the changes to the catalog outbox under the next positions (after the outbox's head,
/// or after the parent's acknowledgement when that is higher, as after a recovery); the caller holds the catalog
/// stream's lock.
pub(super) async fn forward(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[&CatalogChange],
    upstream: Upstream,
) -> Result<(), StoreError> {
    if upstream != Upstream::Parent || changes.is_empty() {
        return Ok(());
    }
    let head: i64 = sqlx::query_scalar(
        "SELECT GREATEST(COALESCE((SELECT MAX(seq) FROM outbox WHERE stream = $1), 0), \
         COALESCE((SELECT seq FROM uplink_ack WHERE stream = $1), 0))",
    )
    .bind(Stream::Catalog as i32)
    .fetch_one(&mut **tx)
    .await?;
    for (n, chunk) in changes.chunks(ROWS).enumerate() {
        let first = head + (n * ROWS) as i64 + 1;
        let payloads: Vec<Vec<u8>> = chunk.iter().map(|c| c.encode_to_vec()).collect();
        sqlx::query(
            "INSERT INTO outbox (stream, seq, payload) \
             SELECT $1, $2 + t.n - 1, t.payload FROM UNNEST($3::bytea[]) WITH ORDINALITY AS t(payload, n)",
        )
        .bind(Stream::Catalog as i32)
        .bind(first)
        .bind(&payloads)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Stores a withdrawn entry this node has no row of, as its parent holds it (a recovery taking it back), so that
/// versions keep growing from there.
pub(super) async fn insert_withdrawn(
    tx: &mut Transaction<'_, Postgres>,
    entry: &CatalogEntry,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO catalog (id, node_code, provider_uscc, share_type, version, withdrawn, entry) \
         VALUES ($1, $2, $3, $4, $5, TRUE, $6) ON CONFLICT (id) DO NOTHING",
    )
    .bind(entry.id.as_str())
    .bind(entry.node_code.as_str())
    .bind(entry.provider_uscc.as_str())
    .bind(entry.share_type)
    .bind(to_i64(entry.version))
    .bind(entry.encode_to_vec())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The rows with these ids, inside a transaction, each at its row's version.
pub(super) async fn rows_in(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[String],
) -> Result<HashMap<String, StoredEntry>, StoreError> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS) {
        let rows =
            sqlx::query("SELECT id, entry, withdrawn, version FROM catalog WHERE id = ANY($1)")
                .bind(chunk)
                .fetch_all(&mut **tx)
                .await?;
        for r in rows {
            let id: String = r.try_get(0)?;
            let entry = versioned(&r)?;
            out.insert(
                id,
                StoredEntry {
                    entry,
                    withdrawn: r.try_get::<bool, _>(2)?,
                },
            );
        }
    }
    Ok(out)
}

/// The entry of a row of (id, entry, withdrawn, version) at the row's version (a withdrawal keeps the entry it
/// withdrew under its own, later, version).
fn versioned(r: &sqlx::postgres::PgRow) -> Result<CatalogEntry, StoreError> {
    let mut entry = decode_entry(r.try_get::<&str, _>(0)?, r.try_get::<&[u8], _>(1)?)?;
    entry.version = to_u64(r.try_get::<i64, _>(3)?);
    Ok(entry)
}

/// The rows of `node`'s own entries with ids after `after_id`, by id, each at its row's version.
pub(super) async fn own_entries(
    pool: &PgPool,
    node: &str,
    after_id: &str,
    limit: u32,
) -> Result<Vec<StoredEntry>, StoreError> {
    let (above, below) = own_id_range(node, after_id);
    let rows = sqlx::query(
        "SELECT id, entry, withdrawn, version FROM catalog WHERE id > $1 AND id < $2 ORDER BY id LIMIT $3",
    )
    .bind(above)
    .bind(below)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StoredEntry {
                entry: versioned(r)?,
                withdrawn: r.try_get::<bool, _>(2)?,
            })
        })
        .collect()
}

/// Stores local entries under their next versions in one transaction.
pub(super) async fn publish(
    pool: &PgPool,
    mut entries: Vec<CatalogEntry>,
    upstream: Upstream,
) -> Result<Vec<CatalogEntry>, StoreError> {
    let mut tx = pool.begin().await?;
    // Before reading the versions too: concurrent publications of one id get consecutive versions.
    lock_stream(&mut tx, Stream::Catalog).await?;
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let mut stored = versions(&mut tx, &ids).await?;
    for e in &mut entries {
        let v = stored.entry(e.id.clone()).or_insert(0);
        *v = v.saturating_add(1);
        e.version = *v;
    }
    let changes: Vec<CatalogChange> = entries
        .iter()
        .map(|e| CatalogChange {
            change: Some(catalog_change::Change::Upsert(e.clone())),
        })
        .collect();
    let refs: Vec<&CatalogChange> = changes.iter().collect();
    apply_changes(&mut tx, &refs).await?;
    forward(&mut tx, &refs, upstream).await?;
    let changed: Vec<StoreChange> = entries
        .iter()
        .map(|e| StoreChange::Entry(e.id.clone()))
        .collect();
    super::notify(&mut tx, &changed).await?;
    tx.commit().await?;
    Ok(entries)
}

/// Withdraws a local entry under its next version.
pub(super) async fn withdraw_local(
    pool: &PgPool,
    id: &str,
    upstream: Upstream,
) -> Result<Option<u64>, StoreError> {
    let mut tx = pool.begin().await?;
    lock_stream(&mut tx, Stream::Catalog).await?;
    let Some(old) = versions(&mut tx, &[id.to_owned()]).await?.get(id).copied() else {
        return Ok(None);
    };
    let version = old.saturating_add(1);
    withdraw(&mut tx, id, version).await?;
    let change = CatalogChange {
        change: Some(catalog_change::Change::Withdraw(Withdrawal {
            id: id.to_owned(),
            version,
        })),
    };
    forward(&mut tx, &[&change], upstream).await?;
    super::notify(&mut tx, &[StoreChange::Entry(id.to_owned())]).await?;
    tx.commit().await?;
    Ok(Some(version))
}

/// Applies a child's items above its cursor and advances the cursor.
pub(super) async fn apply_child(
    pool: &PgPool,
    child: &str,
    items: &[(u64, CatalogChange)],
    upstream: Upstream,
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    // Also makes reading and advancing the child's cursor atomic against a concurrent push of the same child.
    lock_stream(&mut tx, Stream::Catalog).await?;
    let applied = read_cursor(&mut tx, child, Stream::Catalog).await?;
    let (fresh, applied) = fresh_items(child, applied, items)?;
    apply_changes(&mut tx, &fresh).await?;
    forward(&mut tx, &fresh, upstream).await?;
    write_cursor(&mut tx, child, Stream::Catalog, applied).await?;
    tx.commit().await?;
    Ok(applied)
}
