//! Operational records in Sqlite: appended in batches by the monitor's writer, queried by operators, purged
//! after their retention or beyond their cap.

use fedgate_proto::v1::OperationRecord;
use prost::Message;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::super::{OperationQuery, StoreError, decode_operation, to_i64, to_u64};

/// Inserts `records` in one statement.
pub(super) async fn append(
    writer: &sqlx::SqlitePool,
    records: &[OperationRecord],
) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let mut b: QueryBuilder<Sqlite> = QueryBuilder::new(
        "INSERT INTO op_record (request_in_ns, method, resource_id, consumer_node, consumer_uscc, code, record) ",
    );
    b.push_values(records, |mut row, r| {
        row.push_bind(r.request_in_unix_nanos)
            .push_bind(r.method.clone())
            .push_bind(r.resource_id.clone())
            .push_bind(r.consumer_node.clone())
            .push_bind(r.consumer_uscc.clone())
            .push_bind(r.code)
            .push_bind(r.encode_to_vec());
    });
    b.build().execute(writer).await?;
    Ok(())
}

/// The records matching `q`, by position.
pub(super) async fn query(
    reader: &sqlx::SqlitePool,
    q: &OperationQuery,
) -> Result<Vec<(u64, OperationRecord)>, StoreError> {
    let mut b: QueryBuilder<Sqlite> =
        QueryBuilder::new("SELECT pos, record FROM op_record WHERE 1 = 1");
    if let Some(t) = q.from_ns {
        b.push(" AND request_in_ns >= ").push_bind(t);
    }
    if let Some(t) = q.to_ns {
        b.push(" AND request_in_ns < ").push_bind(t);
    }
    for (column, value) in [
        ("method", &q.method),
        ("resource_id", &q.resource_id),
        ("consumer_node", &q.consumer_node),
        ("consumer_uscc", &q.consumer_uscc),
    ] {
        if let Some(v) = value {
            b.push(format!(" AND {column} = ")).push_bind(v.clone());
        }
    }
    if let Some(c) = q.code {
        b.push(" AND code = ").push_bind(c);
    }
    if let Some(a) = q.after {
        b.push(" AND pos > ").push_bind(to_i64(a));
    }
    b.push(" ORDER BY pos LIMIT ").push_bind(i64::from(q.limit));
    let rows = b.build().fetch_all(reader).await?;
    rows.iter()
        .map(|r| {
            Ok((
                to_u64(r.get::<i64, _>(0)),
                decode_operation(r.get::<&[u8], _>(1))?,
            ))
        })
        .collect()
}

/// Deletes the records of calls that came in before `before_ns`.
pub(super) async fn purge(writer: &sqlx::SqlitePool, before_ns: i64) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM op_record WHERE request_in_ns < ?")
        .bind(before_ns)
        .execute(writer)
        .await?;
    Ok(done.rows_affected())
}

/// Deletes the records beyond the newest `keep` (positions only grow, so those are the oldest).
pub(super) async fn trim(writer: &sqlx::SqlitePool, keep: u64) -> Result<u64, StoreError> {
    let done =
        sqlx::query("DELETE FROM op_record WHERE pos <= (SELECT MAX(pos) FROM op_record) - ?")
            .bind(to_i64(keep))
            .execute(writer)
            .await?;
    Ok(done.rows_affected())
}
