//! How the writer numbers, links, hashes and signs a node's records: a batch after the chain head, and a run of
//! records again after those a recovery took back.

use fedgate_proto::v1::{AuditOperation, AuditRecord};
use prost::Message;
use sha2::{Digest, Sha256};

use super::record_hash;
use crate::grant::{Domain, GrantKey};

/// Which of `records`, chained after record `after`, are written: a chain starts once, so a CHAIN_START is kept
/// only as the first record of an empty chain.
pub(super) fn starts_kept(records: &[AuditRecord], after: u64) -> Vec<bool> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| r.operation != AuditOperation::ChainStart as i32 || (after == 0 && i == 0))
        .collect()
}

/// Drops from `records` what [`starts_kept`] does not keep; returns which were kept.
pub(super) fn starts_once(records: &mut Vec<AuditRecord>, after: u64) -> Vec<bool> {
    let kept = starts_kept(records, after);
    let mut i = 0;
    records.retain(|_| {
        i += 1;
        kept[i - 1]
    });
    kept
}

/// Numbers, links and hashes `records` as the records after `(seq, hash)` of `node`'s chain, without signatures;
/// returns their encoded size.
pub(super) fn chain(
    node: &str,
    records: &mut [AuditRecord],
    after: (u64, &[u8]),
    scratch: &mut Vec<u8>,
) -> usize {
    let (mut seq, mut prev) = (after.0, after.1.to_vec());
    let mut bytes = 0;
    for r in records.iter_mut() {
        seq += 1;
        r.node_code = node.to_owned();
        r.seq = seq;
        r.prev_hash = std::mem::take(&mut prev);
        r.hash.clear();
        r.signature.clear();
        scratch.clear();
        // Encoding into a Vec cannot run out of room; the fallback only keeps this free of panics.
        let hash = match r.encode(scratch) {
            Ok(()) => Sha256::digest(&*scratch).to_vec(),
            Err(_) => record_hash(r).to_vec(),
        };
        bytes += scratch.len();
        prev.clone_from(&hash);
        r.hash = hash;
    }
    bytes
}

/// `old` (this node's records, in chain order) chained again after `(seq, hash)`: signed where they were signed,
/// and at the end of the chain when `last`. A CHAIN_START becomes a KEY_ROTATION announcing the same key (with the
/// same endorsement): the chain it lands in has started before.
pub(super) fn rechained(
    node: &str,
    old: &[AuditRecord],
    after: (u64, &[u8]),
    key: &GrantKey,
    last: bool,
) -> Vec<AuditRecord> {
    let signed: Vec<bool> = old.iter().map(|r| !r.signature.is_empty()).collect();
    let mut records = old.to_vec();
    for r in &mut records {
        if r.operation == AuditOperation::ChainStart as i32 {
            r.operation = AuditOperation::KeyRotation as i32;
        }
    }
    chain(node, &mut records, after, &mut Vec::new());
    let n = records.len();
    for (i, r) in records.iter_mut().enumerate() {
        if signed[i] || (last && i + 1 == n) {
            r.signature = key.sign_bytes(Domain::AuditBatch, &r.hash).to_vec();
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{ChainVerifier, event};

    #[test]
    fn records_chained_again_keep_their_signatures_and_a_chain_start_announces_its_key_again() {
        let key = GrantKey::generate();
        // A chain 350102 started after a total loss: its start, a record, a signed record, an unsigned head.
        let mut old = vec![
            event(AuditOperation::ChainStart, "urn:fedgate:node:350102"),
            event(AuditOperation::CatalogPublish, "a"),
            event(AuditOperation::CatalogPublish, "b"),
            event(AuditOperation::CatalogPublish, "c"),
        ];
        old[0].detail = hex::encode(key.public_key());
        chain("350102", &mut old, (0, &[0; 32]), &mut Vec::new());
        old[2].signature = key.sign_bytes(Domain::AuditBatch, &old[2].hash).to_vec();
        // The parent held records 1-5 of the chain, the last with this hash.
        let mut v =
            ChainVerifier::resume("350102", Some(key.public_key().to_vec()), 5, vec![9; 32]);
        let again = rechained("350102", &old, (5, &[9; 32]), &key, true);
        assert_eq!(
            again.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [6, 7, 8, 9]
        );
        assert_eq!(again[0].operation, AuditOperation::KeyRotation as i32);
        assert_eq!(again[0].detail, old[0].detail);
        let signed: Vec<bool> = again.iter().map(|r| !r.signature.is_empty()).collect();
        assert_eq!(
            signed,
            [false, false, true, true],
            "where they were, and the end"
        );
        for r in &again {
            v.push(r).expect("continues the chain");
        }
        v.finish().expect("ends signed");
        let partial = rechained("350102", &old[..2], (5, &[9; 32]), &key, false);
        assert!(
            partial.iter().all(|r| r.signature.is_empty()),
            "no end, no signature"
        );
    }
}
