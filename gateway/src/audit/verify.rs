//! Verification of a node's audit chain: sequence, links, hashes and signatures.
//!
//! A node signs its chain head per interval or per N records, so most records carry no signature of their own:
//! each signature covers every record before it through the hash chain. What no signature covers yet is the
//! unsigned tail, which only the last records of a running node's own chain may be (it signs them within its
//! signing interval, and at shutdown or the next start); a node ships only signed prefixes upward, so every
//! chain a parent holds ends with a signature, and so does every chain a push carries.

use fedgate_proto::v1::{AuditOperation, AuditRecord};

use super::{GENESIS_HASH, record_hash};
use crate::grant::{Domain, verify_signature};

/// The first problem found in a chain, naming the record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A record of another node appeared in this chain.
    #[error("record {node}#{seq} does not belong to the chain of node {expected}")]
    WrongNode {
        /// Node named by the record.
        node: String,
        /// Its sequence number.
        seq: u64,
        /// The chain being checked.
        expected: String,
    },
    /// A sequence number was skipped or repeated: a record was deleted, inserted or moved.
    #[error(
        "chain of node {node}: expected record {expected} but found {found} (a record was removed, added or reordered)"
    )]
    Sequence {
        /// The chain.
        node: String,
        /// Sequence number expected.
        expected: u64,
        /// Sequence number found.
        found: u64,
    },
    /// A record's recorded hash does not match its content: it was altered.
    #[error("record {node}#{seq} was altered: its content does not match its hash")]
    Altered {
        /// The chain.
        node: String,
        /// The record.
        seq: u64,
    },
    /// A record does not link to its predecessor.
    #[error("record {node}#{seq} does not link to record {prev}: the chain was cut or spliced")]
    BrokenLink {
        /// The chain.
        node: String,
        /// The record.
        seq: u64,
        /// Its predecessor.
        prev: u64,
    },
    /// A batch signature does not verify.
    #[error("record {node}#{seq} carries a signature that does not verify with the node's key")]
    BadSignature {
        /// The chain.
        node: String,
        /// The record.
        seq: u64,
    },
    /// The chain does not start with the node's key announcement, or announces an unexpected key.
    #[error("chain of node {node} starts with an invalid key announcement: {reason}")]
    BadStart {
        /// The chain.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// Records after the last signature: the end of the chain is not covered by a signature (allowed only at the
    /// end of a running node's own chain, never in what is shipped or held above it).
    #[error("chain of node {node} ends at record {seq}, which no signature covers")]
    UnsignedTail {
        /// The chain.
        node: String,
        /// Last record.
        seq: u64,
    },
}

/// Checks one node's records in chain order.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    node: String,
    next: u64,
    prev: Vec<u8>,
    key: Option<Vec<u8>>,
    /// The key the chain must end with (pinned), when known; it may have rotated to it along the way.
    expect: Option<Vec<u8>>,
    last_signed: u64,
    checked: u64,
}

impl ChainVerifier {
    /// A verifier for `node`'s chain from its first record; `key` pins the key the chain must end with (its first
    /// record announces the first key; KEY_ROTATION records change it).
    pub fn new(node: &str, key: Option<Vec<u8>>) -> Self {
        Self {
            node: node.to_owned(),
            next: 1,
            prev: GENESIS_HASH.to_vec(),
            key: None,
            expect: key,
            last_signed: 0,
            checked: 0,
        }
    }

    /// A verifier that continues after record `seq` whose hash is `hash` (archived segments, forwarded batches).
    pub fn resume(node: &str, key: Option<Vec<u8>>, seq: u64, hash: Vec<u8>) -> Self {
        Self {
            node: node.to_owned(),
            next: seq + 1,
            prev: hash,
            key,
            expect: None,
            last_signed: seq,
            checked: 0,
        }
    }

    /// The public key in force (pinned or announced by the chain).
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The node whose chain this is.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Records checked so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// Checks the next record.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), VerifyError> {
        let node = self.node.clone();
        if r.node_code != node {
            return Err(VerifyError::WrongNode {
                node: r.node_code.clone(),
                seq: r.seq,
                expected: node,
            });
        }
        if r.seq != self.next {
            return Err(VerifyError::Sequence {
                node,
                expected: self.next,
                found: r.seq,
            });
        }
        if record_hash(r).as_slice() != r.hash.as_slice() {
            return Err(VerifyError::Altered { node, seq: r.seq });
        }
        if r.prev_hash != self.prev {
            return Err(VerifyError::BrokenLink {
                node,
                seq: r.seq,
                prev: r.seq.saturating_sub(1),
            });
        }
        if r.seq == 1 {
            self.check_start(r)?;
        } else if r.operation == AuditOperation::KeyRotation as i32 {
            self.key = Some(announced_key(r).map_err(|reason| VerifyError::BadStart {
                node: node.clone(),
                reason: format!("record {} rotates to an invalid key: {reason}", r.seq),
            })?);
        }
        if !r.signature.is_empty() {
            let key = self.key.as_deref().ok_or_else(|| VerifyError::BadStart {
                node: node.clone(),
                reason: "no key is known for this node".into(),
            })?;
            verify_signature(Domain::AuditBatch, key, &r.hash, &r.signature)
                .map_err(|_| VerifyError::BadSignature { node, seq: r.seq })?;
            self.last_signed = r.seq;
        }
        self.prev = r.hash.clone();
        self.next += 1;
        self.checked += 1;
        Ok(())
    }

    fn check_start(&mut self, r: &AuditRecord) -> Result<(), VerifyError> {
        let bad = |reason: String| VerifyError::BadStart {
            node: self.node.clone(),
            reason,
        };
        if r.operation != AuditOperation::ChainStart as i32 {
            return Err(bad("record 1 is not a CHAIN_START record".into()));
        }
        let announced = announced_key(r).map_err(bad)?;
        match &self.key {
            Some(k) if *k != announced => {
                Err(bad("the announced key differs from the pinned key".into()))
            }
            _ => {
                self.key = Some(announced);
                Ok(())
            }
        }
    }

    /// Records checked after the last signature (0 when the last record checked is signed).
    pub fn unsigned_tail(&self) -> u64 {
        (self.next - 1).saturating_sub(self.last_signed)
    }

    /// Ends the check: the last record must be covered by a signature, and the chain must end with the pinned
    /// key.
    pub fn finish(&self) -> Result<(), VerifyError> {
        self.finish_open(false)
    }

    /// [`ChainVerifier::finish`], except that with `open` the chain may end with records no signature covers
    /// yet (a running node's own chain; [`ChainVerifier::unsigned_tail`] says how many).
    pub fn finish_open(&self, open: bool) -> Result<(), VerifyError> {
        if let Some(expected) = &self.expect
            && self.key.as_ref() != Some(expected)
        {
            return Err(VerifyError::BadStart {
                node: self.node.clone(),
                reason: "the chain's key differs from the pinned key".into(),
            });
        }
        let last = self.next - 1;
        if !open && last > self.last_signed {
            return Err(VerifyError::UnsignedTail {
                node: self.node.clone(),
                seq: last,
            });
        }
        Ok(())
    }

    /// Sequence number and hash of the last record checked.
    pub fn head(&self) -> (u64, &[u8]) {
        (self.next - 1, &self.prev)
    }
}

/// What a verification found for one node's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// The node.
    pub node: String,
    /// Records checked.
    pub records: u64,
    /// Sequence number of the last record.
    pub head: u64,
    /// Hash of the last record.
    pub head_hash: Vec<u8>,
    /// The node's public key, as pinned or announced.
    pub key: Option<Vec<u8>>,
    /// Records at the end that no signature covers yet (only ever in a running node's own chain).
    pub unsigned: u64,
}

impl ChainSummary {
    fn of(v: &ChainVerifier) -> Self {
        Self {
            node: v.node().to_owned(),
            records: v.checked(),
            head: v.head().0,
            head_hash: v.head().1.to_vec(),
            key: v.key().map(<[u8]>::to_vec),
            unsigned: v.unsigned_tail(),
        }
    }

    /// Where verification of later records of this chain resumes: (sequence number, hash, key).
    pub fn resume_point(&self) -> Option<(u64, Vec<u8>, Vec<u8>)> {
        self.key
            .clone()
            .map(|k| (self.head, self.head_hash.clone(), k))
    }
}

/// Verifies records given in chain order per node (interleaving between nodes is allowed), with keys pinned
/// for some nodes; each chain must start at record 1 unless `resume` gives where an archive left off.
///
/// With `segment`, the records are an archived beginning of the chains: their end need not be signed, since the
/// signatures of the records that follow cover them through the chain.
pub fn verify_records<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    pinned: &std::collections::HashMap<String, Vec<u8>>,
    resume: &std::collections::HashMap<String, (u64, Vec<u8>, Vec<u8>)>,
    segment: bool,
) -> Result<Vec<ChainSummary>, VerifyError> {
    let mut chains: std::collections::BTreeMap<String, ChainVerifier> = Default::default();
    for r in records {
        let v =
            chains
                .entry(r.node_code.clone())
                .or_insert_with(|| match resume.get(&r.node_code) {
                    Some((seq, hash, key)) => {
                        ChainVerifier::resume(&r.node_code, Some(key.clone()), *seq, hash.clone())
                    }
                    None => ChainVerifier::new(&r.node_code, pinned.get(&r.node_code).cloned()),
                });
        v.push(r)?;
    }
    chains
        .values()
        .map(|v| {
            if !segment {
                v.finish()?;
            }
            Ok(ChainSummary::of(v))
        })
        .collect()
}

/// Why a store could not be verified.
#[derive(Debug, thiserror::Error)]
pub enum StoreVerifyError {
    /// A chain is broken; names the first bad record.
    #[error(transparent)]
    Chain(#[from] VerifyError),
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Verifies every node chain held in a store, page by page; `resume` continues chains whose beginning was
/// archived (sequence number, hash and key of the last archived record). Every chain must end with a signature:
/// the store of a stopped node, or of a parent; see [`verify_live_store`] for a running node's own store.
pub async fn verify_store(
    store: &dyn crate::store::Store,
    pinned: &std::collections::HashMap<String, Vec<u8>>,
    resume: &std::collections::HashMap<String, (u64, Vec<u8>, Vec<u8>)>,
) -> Result<Vec<ChainSummary>, StoreVerifyError> {
    verify_live_store(store, pinned, resume, None).await
}

/// [`verify_store`] on the store of running node `live`, whose own chain may end with records it has not signed
/// yet (reported in [`ChainSummary::unsigned`]); every other chain must still end with a signature.
pub async fn verify_live_store(
    store: &dyn crate::store::Store,
    pinned: &std::collections::HashMap<String, Vec<u8>>,
    resume: &std::collections::HashMap<String, (u64, Vec<u8>, Vec<u8>)>,
    live: Option<&str>,
) -> Result<Vec<ChainSummary>, StoreVerifyError> {
    const PAGE: u32 = 10_000;
    let mut out = Vec::new();
    for node in store.audit_nodes().await? {
        let key = match pinned.get(&node) {
            Some(k) => Some(k.clone()),
            None => store.node_key(&node).await?,
        };
        let mut v = match resume.get(&node) {
            Some((seq, hash, key)) => {
                ChainVerifier::resume(&node, Some(key.clone()), *seq, hash.clone())
            }
            None => ChainVerifier::new(&node, key),
        };
        let mut after = v.head().0;
        loop {
            let page = store.audit_chain(&node, after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for r in &page {
                v.push(r)?;
            }
        }
        v.finish_open(live == Some(node.as_str()))?;
        out.push(ChainSummary::of(&v));
    }
    Ok(out)
}

/// The key a CHAIN_START or KEY_ROTATION record announces in its detail.
fn announced_key(r: &AuditRecord) -> Result<Vec<u8>, String> {
    let key = hex::decode(&r.detail).map_err(|e| format!("key is not hex: {e}"))?;
    if key.len() != 32 {
        return Err(format!("key has {} bytes, not 32", key.len()));
    }
    Ok(key)
}
