//! Archiving: records older than the retention period, and already acknowledged by the parent, move from the
//! store to a JSON Lines file; `fedgate audit verify --archive` checks the chains across files and store.

use std::io::Write;

use fedgate_proto::v1::Stream;

use super::export::{ExportError, write_jsonl};
use crate::store::{Store, StoreError};

/// Records moved per round.
const ROUND: u32 = 10_000;

/// Why archiving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the archive failed.
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// Moves records written before `before_ns` to `out`; on a node with a parent only those the parent has
/// acknowledged. Each round is written and flushed to the file before it is deleted from the store.
pub async fn archive(
    store: &dyn Store,
    before_ns: i64,
    has_parent: bool,
    mut out: impl Write,
) -> Result<u64, ArchiveError> {
    let max = if has_parent {
        store.uplink_acked(Stream::Audit).await?
    } else {
        u64::MAX
    };
    let mut moved = 0;
    loop {
        let rows = store.audit_archivable(before_ns, max, ROUND).await?;
        if rows.is_empty() {
            return Ok(moved);
        }
        write_jsonl(&mut out, rows.iter().map(|(_, r)| r))?;
        out.flush().map_err(ExportError::from)?;
        let positions: Vec<u64> = rows.iter().map(|(p, _)| *p).collect();
        moved += store.audit_delete(&positions).await?;
    }
}
