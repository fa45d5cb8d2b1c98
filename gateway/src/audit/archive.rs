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

/// Moves records written before `before_ns` to the archive file `out` (appending); on a node with a parent
/// only those the parent has acknowledged. Each round is written and synced to disk before it is deleted from
/// the store, and records an interrupted run already archived are deleted first, so a re-run never writes a
/// record twice.
pub async fn archive(
    store: &dyn Store,
    before_ns: i64,
    has_parent: bool,
    out: &std::path::Path,
) -> Result<u64, ArchiveError> {
    let mut archived_heads: std::collections::HashMap<String, u64> = Default::default();
    if out.exists() {
        let f = std::fs::File::open(out).map_err(ExportError::from)?;
        for r in super::export::read_jsonl(std::io::BufReader::new(f))? {
            let head = archived_heads.entry(r.node_code.clone()).or_default();
            *head = (*head).max(r.seq);
        }
    }
    for (node, seq) in &archived_heads {
        store.audit_delete_chain_upto(node, *seq).await?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(ExportError::from)?;
    let mut out = std::io::BufWriter::new(file);
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
        out.get_ref().sync_data().map_err(ExportError::from)?;
        let positions: Vec<u64> = rows.iter().map(|(p, _)| *p).collect();
        moved += store.audit_delete(&positions).await?;
    }
}
