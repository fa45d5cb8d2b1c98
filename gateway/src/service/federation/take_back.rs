//! What a parent gives back to a child that recovers, and how it recognises records a child sends again.

use std::collections::HashMap;

use fedgate_proto::v1::{AuditRecord, HeldEntry, Stream, TakeBackRequest, TakeBackResponse};
use prost::Message;

use crate::catalog::parse_resource_id;
use crate::error::{Error, Result};
use crate::ident::DivisionCode;
use crate::store::Store;

/// Records or entries of one page at most.
pub(super) const MAX_PAGE: u32 = 1000;
/// Encoded bytes of one page at most (it always carries one item, whatever its size).
const MAX_PAGE_BYTES: usize = 1 << 20;
/// Records of a chain read at once to recognise records sent again.
const HELD_READ: u32 = 512;

/// The answer to `req` of `child` (named by its certificate): only its own chain and its own entries.
pub(super) async fn answer(
    store: &dyn Store,
    child: DivisionCode,
    req: &TakeBackRequest,
) -> Result<TakeBackResponse> {
    let limit = match req.limit {
        0 => MAX_PAGE,
        n if n > MAX_PAGE => {
            return Err(Error::InvalidArgument(format!(
                "limit: {n} is above the {MAX_PAGE} records or entries a page holds"
            )));
        }
        n => n,
    };
    match Stream::try_from(req.stream) {
        Ok(Stream::Audit) => {
            if !req.after_id.is_empty() {
                return Err(Error::InvalidArgument(
                    "after_id: audit records are paged by after_seq".into(),
                ));
            }
            let rows = store
                .audit_chain(child.as_str(), req.after_seq, limit.saturating_add(1))
                .await?;
            let (records, more) = page(rows, limit);
            Ok(TakeBackResponse {
                records,
                entries: Vec::new(),
                more,
            })
        }
        Ok(Stream::Catalog) => {
            if req.after_seq != 0 {
                return Err(Error::InvalidArgument(
                    "after_seq: catalog entries are paged by after_id".into(),
                ));
            }
            if !req.after_id.is_empty() {
                let id = parse_resource_id("after_id", &req.after_id)?;
                if id.node() != child {
                    return Err(Error::InvalidArgument(format!(
                        "after_id: {} is not an entry of node {child}, which asks",
                        req.after_id
                    )));
                }
            }
            let rows = store
                .own_entries(child.as_str(), &req.after_id, limit.saturating_add(1))
                .await?;
            let held: Vec<HeldEntry> = rows
                .into_iter()
                .map(|e| HeldEntry {
                    entry: Some(e.entry),
                    withdrawn: e.withdrawn,
                })
                .collect();
            let (entries, more) = page(held, limit);
            Ok(TakeBackResponse {
                records: Vec::new(),
                entries,
                more,
            })
        }
        _ => Err(Error::InvalidArgument(format!(
            "stream: {} is neither STREAM_AUDIT nor STREAM_CATALOG",
            req.stream
        ))),
    }
}

/// The leading `limit` items of `items` that fit the byte budget (at least one), and whether more follow.
fn page<T: Message>(mut items: Vec<T>, limit: u32) -> (Vec<T>, bool) {
    let mut bytes = 0;
    let mut keep = 0;
    for item in &items {
        let n = item.encoded_len();
        if keep == limit as usize || (keep > 0 && bytes + n > MAX_PAGE_BYTES) {
            break;
        }
        bytes += n;
        keep += 1;
    }
    let more = items.len() > keep;
    items.truncate(keep);
    (items, more)
}

/// The records held here of the chains a push carries, read as needed, to recognise records a child sends again.
#[derive(Default)]
pub(super) struct Held {
    /// Per chain: the sequence number of its last record held here (0 when none) and hashes read so far.
    chains: HashMap<String, (u64, HashMap<u64, Vec<u8>>)>,
}

impl Held {
    /// Whether this node already holds `record` (same node, sequence number and hash): a record sent again. A
    /// record under a sequence number this node holds otherwise is a fork, refused with DATA_LOSS.
    pub(super) async fn holds(
        &mut self,
        store: &dyn Store,
        child: DivisionCode,
        record: &AuditRecord,
    ) -> Result<bool> {
        let node = record.node_code.as_str();
        if !self.chains.contains_key(node) {
            let head = store.audit_head(node).await?.map_or(0, |h| h.seq);
            self.chains.insert(node.to_owned(), (head, HashMap::new()));
        }
        let Some((head, hashes)) = self.chains.get_mut(node) else {
            return Ok(false);
        };
        if record.seq > *head {
            return Ok(false);
        }
        if !hashes.contains_key(&record.seq) {
            for r in store
                .audit_chain(node, record.seq.saturating_sub(1), HELD_READ)
                .await?
            {
                hashes.insert(r.seq, r.hash);
            }
        }
        match hashes.get(&record.seq) {
            Some(hash) if *hash == record.hash => Ok(true),
            Some(_) => Err(Error::DataLoss(format!(
                "audit record {node}#{} from node {child} refused: this node holds another record under that \
                 sequence number (the chain forks)",
                record.seq
            ))),
            None => Err(Error::DataLoss(format!(
                "audit record {node}#{} from node {child} refused: this node no longer holds the record under that \
                 sequence number (archived) to compare it with",
                record.seq
            ))),
        }
    }
}
