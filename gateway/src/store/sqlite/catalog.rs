//! The catalog in SQLite: rows by position, the FTS5 index of the tokens the node computes for each live entry,
//! and the catalog outbox.

use std::collections::HashMap;

use fedgate_proto::v1::{CatalogChange, CatalogEntry, Stream, Withdrawal, catalog_change};
use futures::TryStreamExt;
use prost::Message;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool, Transaction};

use super::{begin, read_cursor, write_cursor};
use crate::catalog::{self, TOKENIZER_VERSION};
use crate::store::{
    ApplyStep, CatalogHit, CatalogQuery, Page, StoreError, StoredEntry, Upstream, apply_steps,
    decode_entry, fresh_items, own_id_range, to_i64, to_u64,
};

/// Rows of one multi-row catalog upsert (7 binds each).
const UPSERT_ROWS: usize = 500;
/// Rows of one multi-row outbox or index insert, and ids of one `IN` list.
const ROWS: usize = 1000;
/// Most indexed words a long prefix is looked up as; a prefix that more words start with is left to FTS5.
const PREFIX_WORDS: usize = 64;

/// Rebuilds the search index unless it was built by this tokenizer version (after the migration that created
/// it, or a tokenizer change).
pub(super) async fn ensure_index(writer: &SqlitePool) -> Result<(), StoreError> {
    let built: Option<i64> = sqlx::query_scalar("SELECT tokenizer FROM catalog_index")
        .fetch_optional(writer)
        .await?;
    if built == Some(TOKENIZER_VERSION) {
        return Ok(());
    }
    let mut tx = begin(writer).await?;
    sqlx::query("INSERT INTO catalog_fts (catalog_fts) VALUES ('delete-all')")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM catalog_words")
        .execute(&mut *tx)
        .await?;
    let mut after = 0i64;
    loop {
        let rows = sqlx::query(
            "SELECT pos, id, entry FROM catalog WHERE withdrawn = 0 AND pos > ? ORDER BY pos LIMIT ?",
        )
        .bind(after)
        .bind(ROWS as i64)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        let mut indexed = Vec::with_capacity(rows.len());
        for r in &rows {
            let entry = decode_entry(r.get::<&str, _>(1), r.get::<&[u8], _>(2))?;
            indexed.push((r.get::<i64, _>(0), tokens(&entry)));
        }
        index_rows(&mut tx, &indexed).await?;
    }
    sqlx::query("DELETE FROM catalog_index")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO catalog_index (tokenizer) VALUES (?)")
        .bind(TOKENIZER_VERSION)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The index document of an entry: its tokens separated by spaces (FTS5's `ascii` tokenizer splits there and
/// nowhere inside a token, which holds no ASCII character but letters and digits).
fn tokens(entry: &CatalogEntry) -> String {
    catalog::entry_tokens(entry).join(" ")
}

/// The FTS5 expression requiring every token of `query`; `None` when the query has none.
///
/// FTS5 answers a prefix of up to `INDEXED_PREFIX_CHARS` characters from a prefix list it can step through, but
/// merges the lists of every term starting with a longer prefix in memory, at a cost in proportion to the entries
/// holding them whatever the page. So a longer prefix becomes the indexed words starting with it (from
/// `catalog_words`), any of which an entry must hold, and FTS5 steps through their lists like exact tokens.
async fn fts_expression(
    reader: &SqlitePool,
    query: &CatalogQuery,
) -> Result<Option<String>, StoreError> {
    let tokens = catalog::query_tokens(query);
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut terms = Vec::with_capacity(tokens.len());
    for t in &tokens {
        if !t.prefix {
            terms.push(format!("\"{}\"", t.token));
            continue;
        }
        let words = if catalog::is_long_word(&t.token) {
            words_starting_with(reader, &t.token).await?
        } else {
            Vec::new()
        };
        if words.is_empty() || words.len() > PREFIX_WORDS {
            terms.push(format!("\"{}\" *", t.token));
        } else {
            let any: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
            terms.push(format!("({})", any.join(" OR ")));
        }
    }
    Ok(Some(terms.join(" AND ")))
}

/// Up to `PREFIX_WORDS + 1` indexed words starting with `prefix`, read as one range of `catalog_words`.
async fn words_starting_with(reader: &SqlitePool, prefix: &str) -> Result<Vec<String>, StoreError> {
    // Every word starting with `prefix` sorts below it followed by the greatest character, which no word holds.
    let end = format!("{prefix}{}", char::MAX);
    Ok(sqlx::query_scalar(
        "SELECT word FROM catalog_words WHERE word >= ? AND word < ? ORDER BY word LIMIT ?",
    )
    .bind(prefix)
    .bind(end)
    .bind((PREFIX_WORDS + 1) as i64)
    .fetch_all(reader)
    .await?)
}

async fn index_rows(
    tx: &mut Transaction<'_, Sqlite>,
    rows: &[(i64, String)],
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROWS) {
        let mut b: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT OR REPLACE INTO catalog_fts (rowid, tokens) ");
        b.push_values(chunk, |mut row, (pos, tokens)| {
            row.push_bind(*pos).push_bind(tokens.as_str());
        });
        b.build().execute(&mut **tx).await?;
    }
    // The long words, so that a prefix can be looked up as them. A word stays when its last entry goes: it then
    // stands for no entry, which costs a prefix lookup one empty list.
    let mut words: Vec<&str> = rows
        .iter()
        .flat_map(|(_, tokens)| tokens.split(' '))
        .filter(|t| catalog::is_long_word(t))
        .collect();
    words.sort_unstable();
    words.dedup();
    for chunk in words.chunks(ROWS) {
        let mut b: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT OR IGNORE INTO catalog_words (word) ");
        b.push_values(chunk, |mut row, w| {
            row.push_bind(*w);
        });
        b.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Live entries matching `q`, in position order: candidates from the index (or every row when the query has no
/// token), each checked exactly.
pub(super) async fn search(
    reader: &SqlitePool,
    q: &CatalogQuery,
) -> Result<Vec<CatalogHit>, StoreError> {
    let expression = fts_expression(reader, q).await?;
    let mut page = Page::new(q);
    loop {
        let wanted = page.wanted();
        if wanted == 0 {
            break;
        }
        let after = page.after.map_or(0, to_i64);
        let query = match &expression {
            Some(e) => sqlx::query(
                "SELECT c.pos, c.id, c.entry FROM catalog_fts JOIN catalog c ON c.pos = catalog_fts.rowid \
                 WHERE catalog_fts MATCH ? AND catalog_fts.rowid > ? AND c.withdrawn = 0 \
                 ORDER BY catalog_fts.rowid LIMIT ?",
            )
            .bind(e.as_str()),
            None => sqlx::query(
                "SELECT pos, id, entry FROM catalog WHERE pos > ? AND withdrawn = 0 ORDER BY pos LIMIT ?",
            ),
        };
        let mut rows = query.bind(after).bind(i64::from(wanted)).fetch(reader);
        let mut got = 0usize;
        while let Some(r) = rows.try_next().await? {
            got += 1;
            let position = to_u64(r.get::<i64, _>(0));
            if !page.offer(position, r.get::<&str, _>(1), r.get::<&[u8], _>(2))? {
                break;
            }
        }
        drop(rows);
        page.read(wanted, got);
    }
    Ok(page.hits)
}

/// The rows with these ids.
pub(super) async fn entries(
    reader: &SqlitePool,
    ids: &[String],
) -> Result<Vec<StoredEntry>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS) {
        let mut b: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT id, entry, withdrawn FROM catalog WHERE id IN (");
        let mut list = b.separated(", ");
        for id in chunk {
            list.push_bind(id.as_str());
        }
        b.push(")");
        for r in b.build().fetch_all(reader).await? {
            out.push(StoredEntry {
                entry: decode_entry(r.get::<&str, _>(0), r.get::<&[u8], _>(1))?,
                withdrawn: r.get::<i64, _>(2) != 0,
            });
        }
    }
    Ok(out)
}

/// Stored versions of these ids.
async fn versions(
    tx: &mut Transaction<'_, Sqlite>,
    ids: &[&str],
) -> Result<HashMap<String, u64>, StoreError> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS) {
        let mut b: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT id, version FROM catalog WHERE id IN (");
        let mut list = b.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        b.push(")");
        for r in b.build().fetch_all(&mut **tx).await? {
            out.insert(r.get::<String, _>(0), to_u64(r.get::<i64, _>(1)));
        }
    }
    Ok(out)
}

/// Writes upserts of distinct ids, each only if newer than what is stored, and indexes those written.
pub(super) async fn upsert_rows(
    tx: &mut Transaction<'_, Sqlite>,
    entries: &[&CatalogEntry],
) -> Result<(), StoreError> {
    for chunk in entries.chunks(UPSERT_ROWS) {
        let mut b: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO catalog (id, node_code, provider_uscc, share_type, version, withdrawn, entry) ",
        );
        b.push_values(chunk, |mut row, e| {
            row.push_bind(e.id.as_str())
                .push_bind(e.node_code.as_str())
                .push_bind(e.provider_uscc.as_str())
                .push_bind(e.share_type)
                .push_bind(to_i64(e.version))
                .push_bind(0i64)
                .push_bind(e.encode_to_vec());
        });
        b.push(
            " ON CONFLICT(id) DO UPDATE SET node_code = excluded.node_code, \
             provider_uscc = excluded.provider_uscc, share_type = excluded.share_type, \
             version = excluded.version, withdrawn = 0, entry = excluded.entry \
             WHERE excluded.version > catalog.version RETURNING pos, id",
        );
        let written = b.build().fetch_all(&mut **tx).await?;
        let by_id: HashMap<&str, &CatalogEntry> =
            chunk.iter().map(|e| (e.id.as_str(), *e)).collect();
        let mut indexed = Vec::with_capacity(written.len());
        for r in &written {
            let id: &str = r.get(1);
            if let Some(e) = by_id.get(id) {
                indexed.push((r.get::<i64, _>(0), tokens(e)));
            }
        }
        index_rows(tx, &indexed).await?;
    }
    Ok(())
}

/// Marks an entry withdrawn if the withdrawal is newer than what is stored, and drops it from the index.
pub(super) async fn withdraw(
    tx: &mut Transaction<'_, Sqlite>,
    id: &str,
    version: u64,
) -> Result<(), StoreError> {
    let pos: Option<i64> = sqlx::query_scalar(
        "UPDATE catalog SET withdrawn = 1, version = ? WHERE id = ? AND version < ? RETURNING pos",
    )
    .bind(to_i64(version))
    .bind(id)
    .bind(to_i64(version))
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(pos) = pos {
        sqlx::query("DELETE FROM catalog_fts WHERE rowid = ?")
            .bind(pos)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Applies changes in order (see [`apply_steps`]).
async fn apply_changes(
    tx: &mut Transaction<'_, Sqlite>,
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

/// Appends payloads to the catalog outbox under the next positions, in order: after the outbox's head, or after
/// the parent's acknowledgement when that is higher (after a recovery, positions continue after the parent's
/// cursor even when nothing is queued above it).
pub(super) async fn append_outbox(
    tx: &mut Transaction<'_, Sqlite>,
    payloads: &[Vec<u8>],
) -> Result<(), StoreError> {
    let head: i64 = sqlx::query_scalar(
        "SELECT MAX(COALESCE((SELECT MAX(seq) FROM outbox WHERE stream = ?1), 0), \
         COALESCE((SELECT seq FROM uplink_ack WHERE stream = ?1), 0))",
    )
    .bind(Stream::Catalog as i32)
    .fetch_one(&mut **tx)
    .await?;
    let mut seq = head;
    for chunk in payloads.chunks(ROWS) {
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

/// Under a parent, appends the changes to the outbox.
async fn forward(
    tx: &mut Transaction<'_, Sqlite>,
    changes: &[&CatalogChange],
    upstream: Upstream,
) -> Result<(), StoreError> {
    if upstream == Upstream::Parent && !changes.is_empty() {
        let payloads: Vec<Vec<u8>> = changes.iter().map(|c| c.encode_to_vec()).collect();
        append_outbox(tx, &payloads).await?;
    }
    Ok(())
}

/// Stores local entries under their next versions in one transaction.
pub(super) async fn publish(
    writer: &SqlitePool,
    mut entries: Vec<CatalogEntry>,
    upstream: Upstream,
) -> Result<Vec<CatalogEntry>, StoreError> {
    let mut tx = begin(writer).await?;
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    let mut stored = versions(&mut tx, &ids).await?;
    for e in &mut entries {
        let v = stored.entry(e.id.clone()).or_insert(0);
        *v += 1;
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
    tx.commit().await?;
    Ok(entries)
}

/// Withdraws a local entry under its next version.
pub(super) async fn withdraw_local(
    writer: &SqlitePool,
    id: &str,
    upstream: Upstream,
) -> Result<Option<u64>, StoreError> {
    let mut tx = begin(writer).await?;
    let Some(old) = versions(&mut tx, &[id]).await?.get(id).copied() else {
        return Ok(None);
    };
    let version = old + 1;
    withdraw(&mut tx, id, version).await?;
    let change = CatalogChange {
        change: Some(catalog_change::Change::Withdraw(Withdrawal {
            id: id.to_owned(),
            version,
        })),
    };
    forward(&mut tx, &[&change], upstream).await?;
    tx.commit().await?;
    Ok(Some(version))
}

/// Stores a withdrawn entry this node has no row of, as its parent holds it (a recovery taking it back), so that
/// versions keep growing from there.
pub(super) async fn insert_withdrawn(
    tx: &mut Transaction<'_, Sqlite>,
    entry: &CatalogEntry,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO catalog (id, node_code, provider_uscc, share_type, version, withdrawn, entry) \
         VALUES (?, ?, ?, ?, ?, 1, ?) ON CONFLICT(id) DO NOTHING",
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
    tx: &mut Transaction<'_, Sqlite>,
    ids: &[&str],
) -> Result<HashMap<String, StoredEntry>, StoreError> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS) {
        let mut b: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT id, entry, withdrawn, version FROM catalog WHERE id IN (");
        let mut list = b.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        b.push(")");
        for r in b.build().fetch_all(&mut **tx).await? {
            let id: String = r.get(0);
            let entry = versioned(&r)?;
            out.insert(
                id,
                StoredEntry {
                    entry,
                    withdrawn: r.get::<i64, _>(2) != 0,
                },
            );
        }
    }
    Ok(out)
}

/// The entry of a row of (id, entry, withdrawn, version) at the row's version (a withdrawal keeps the entry it
/// withdrew under its own, later, version).
fn versioned(r: &sqlx::sqlite::SqliteRow) -> Result<CatalogEntry, StoreError> {
    let mut entry = decode_entry(r.get::<&str, _>(0), r.get::<&[u8], _>(1))?;
    entry.version = to_u64(r.get::<i64, _>(3));
    Ok(entry)
}

/// The rows of `node`'s own entries with ids after `after_id`, by id, each at its row's version.
pub(super) async fn own_entries(
    reader: &SqlitePool,
    node: &str,
    after_id: &str,
    limit: u32,
) -> Result<Vec<StoredEntry>, StoreError> {
    let (above, below) = own_id_range(node, after_id);
    let rows = sqlx::query(
        "SELECT id, entry, withdrawn, version FROM catalog WHERE id > ? AND id < ? ORDER BY id LIMIT ?",
    )
    .bind(above)
    .bind(below)
    .bind(i64::from(limit))
    .fetch_all(reader)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StoredEntry {
                entry: versioned(r)?,
                withdrawn: r.get::<i64, _>(2) != 0,
            })
        })
        .collect()
}

/// Applies a child's items above its cursor and advances the cursor.
pub(super) async fn apply_child(
    writer: &SqlitePool,
    child: &str,
    items: &[(u64, CatalogChange)],
    upstream: Upstream,
) -> Result<u64, StoreError> {
    let mut tx = begin(writer).await?;
    let applied = read_cursor(&mut tx, child, Stream::Catalog).await?;
    let (fresh, applied) = fresh_items(child, applied, items)?;
    apply_changes(&mut tx, &fresh).await?;
    forward(&mut tx, &fresh, upstream).await?;
    write_cursor(&mut tx, child, Stream::Catalog, applied).await?;
    tx.commit().await?;
    Ok(applied)
}
