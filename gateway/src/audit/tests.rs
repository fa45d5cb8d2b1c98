//! The writer's signing: durable at once, signed per interval or per N records, at shutdown and at the next
//! start, and before a child's records are stored after its own.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::{AuditOperation, AuditRecord};
use prost::Message;
use sha2::{Digest, Sha256};

use super::{AuditLog, ChainVerifier, SignPolicy, event, record_hash};
use crate::grant::{Domain, GrantKey};
use crate::ident::DivisionCode;
use crate::metrics::NodeMetrics;
use crate::store::{SqliteStore, Store};
use crate::uplink::Uplink;
use faulty::{Fault, Faulty};

mod faulty;

const NODE: &str = "350102";

fn node() -> DivisionCode {
    NODE.parse().expect("code")
}

async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    Arc::new(
        SqliteStore::open(&dir.path().join("audit.db"))
            .await
            .expect("store"),
    )
}

async fn start(
    policy: SignPolicy,
    store: &Arc<dyn Store>,
    key: &Arc<GrantKey>,
) -> (AuditLog, tokio::task::JoinHandle<()>) {
    AuditLog::start_with(
        policy,
        node(),
        store.clone(),
        (key.clone(), None),
        Uplink::new(),
        Arc::new(NodeMetrics::new()),
    )
    .await
    .expect("writer")
}

/// Signing only by count (the interval never comes).
fn by_count(records: u64) -> SignPolicy {
    SignPolicy {
        every: Duration::from_secs(3600),
        records,
        bytes: usize::MAX,
    }
}

async fn chain(store: &Arc<dyn Store>) -> Vec<AuditRecord> {
    store.audit_chain(NODE, 0, u32::MAX).await.expect("chain")
}

fn signed(records: &[AuditRecord]) -> Vec<u64> {
    records
        .iter()
        .filter(|r| !r.signature.is_empty())
        .map(|r| r.seq)
        .collect()
}

fn verified(records: &[AuditRecord], open: bool) -> ChainVerifier {
    let mut v = ChainVerifier::new(NODE, None);
    for r in records {
        v.push(r).expect("record verifies");
    }
    v.finish_open(open).expect("chain verifies");
    v
}

async fn wait_signed(store: &Arc<dyn Store>, seq: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !signed(&chain(store).await).contains(&seq) {
        assert!(
            std::time::Instant::now() < deadline,
            "record {seq} never signed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn record_hash_is_the_hash_of_the_record_with_hash_and_signature_emptied() {
    let mut r = event(AuditOperation::ShareQuery, "urn:fedgate:agency:x");
    r.node_code = NODE.into();
    r.seq = 7;
    r.route = vec!["350203".into(), "350102".into()];
    r.prev_hash = vec![1; 32];
    r.consumer_node = "350203".into();
    r.mode = "SHARE_MODE_QUERY".into();
    let mut cleared = r.clone();
    r.hash = vec![2; 32];
    r.signature = vec![3; 64];
    cleared.hash.clear();
    cleared.signature.clear();
    let expected: [u8; 32] = Sha256::digest(cleared.encode_to_vec()).into();
    assert_eq!(record_hash(&r), expected);
    assert_eq!(record_hash(&cleared), expected);
    // Every other field counts.
    r.mode = "SHARE_MODE_VERIFY".into();
    assert_ne!(record_hash(&r), expected);
}

#[tokio::test]
async fn records_are_durable_at_once_and_signed_every_n_records() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir).await;
    let key = Arc::new(GrantKey::generate());
    let (log, writer) = start(by_count(3), &store, &key).await;
    // Record 1 is the chain start; each record below is answered only once stored.
    for i in 2..=5 {
        let seq = log
            .record(event(AuditOperation::CatalogPublish, "a"))
            .await
            .expect("record");
        assert_eq!(seq, i);
        assert_eq!(chain(&store).await.len() as u64, i, "durable when answered");
    }
    let records = chain(&store).await;
    assert_eq!(signed(&records), [3], "signed once per three records");
    let v = verified(&records, true);
    assert_eq!(v.unsigned_tail(), 2);
    assert!(
        verified(&records, true).finish().is_err(),
        "a closed check refuses the unsigned tail"
    );
    drop(log);
    writer.await.expect("writer");
    let records = chain(&store).await;
    assert_eq!(signed(&records), [3, 5], "shutdown signs the tail");
    assert_eq!(verified(&records, false).unsigned_tail(), 0);
}

#[tokio::test]
async fn the_head_is_signed_within_the_interval() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir).await;
    let key = Arc::new(GrantKey::generate());
    let policy = SignPolicy {
        every: Duration::from_millis(30),
        records: u64::MAX,
        bytes: usize::MAX,
    };
    let (log, writer) = start(policy, &store, &key).await;
    let seq = log
        .record(event(AuditOperation::CatalogPublish, "a"))
        .await
        .expect("record");
    wait_signed(&store, seq).await;
    let records = chain(&store).await;
    verified(&records, false);
    let last = records.last().expect("record");
    crate::grant::verify_signature(
        Domain::AuditBatch,
        &key.public_key(),
        &last.hash,
        &last.signature,
    )
    .expect("signed with the node's key");
    drop(log);
    writer.await.expect("writer");
}

#[tokio::test]
async fn a_tail_left_unsigned_by_a_kill_is_signed_at_the_next_start() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir).await;
    let key = Arc::new(GrantKey::generate());
    let (log, writer) = start(by_count(1000), &store, &key).await;
    for _ in 0..3 {
        log.record(event(AuditOperation::CatalogPublish, "a"))
            .await
            .expect("record");
    }
    // Killed: the writer stops without signing.
    writer.abort();
    let _ = writer.await;
    drop(log);
    assert!(signed(&chain(&store).await).is_empty());
    let (log, writer) = start(by_count(1000), &store, &key).await;
    let records = chain(&store).await;
    assert_eq!(
        signed(&records),
        [4],
        "signed before the writer takes a record"
    );
    verified(&records, false);
    drop(log);
    writer.await.expect("writer");
}

#[tokio::test]
async fn a_tail_of_a_replaced_key_is_covered_by_the_rotation() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir).await;
    let old = Arc::new(GrantKey::generate());
    let (log, writer) = start(by_count(1000), &store, &old).await;
    log.record(event(AuditOperation::CatalogPublish, "a"))
        .await
        .expect("record");
    writer.abort();
    let _ = writer.await;
    drop(log);
    let new = Arc::new(GrantKey::generate());
    let (log, writer) = start(by_count(1000), &store, &new).await;
    drop(log);
    writer.await.expect("writer");
    let records = chain(&store).await;
    assert_eq!(
        records.iter().map(|r| r.operation).collect::<Vec<_>>(),
        [
            AuditOperation::ChainStart as i32,
            AuditOperation::CatalogPublish as i32,
            AuditOperation::KeyRotation as i32
        ]
    );
    assert_eq!(signed(&records), [3], "only the new key signs");
    let v = verified(&records, false);
    assert_eq!(v.key(), Some(new.public_key().as_slice()));
}

#[tokio::test]
async fn a_childs_records_follow_a_signed_head() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir).await;
    let key = Arc::new(GrantKey::generate());
    let (log, writer) = start(by_count(1000), &store, &key).await;
    let seq = log
        .record(event(AuditOperation::CatalogPublish, "a"))
        .await
        .expect("record");
    assert!(signed(&chain(&store).await).is_empty());
    // A child's chain (already checked by the caller), ending signed.
    let child = Arc::new(GrantKey::generate());
    let mut r = event(AuditOperation::ChainStart, "urn:fedgate:node:350121");
    r.node_code = "350121".to_owned();
    r.seq = 1;
    r.prev_hash = super::GENESIS_HASH.to_vec();
    r.detail = hex::encode(child.public_key());
    r.hash = record_hash(&r).to_vec();
    r.signature = child.sign_bytes(Domain::AuditBatch, &r.hash).to_vec();
    let applied = log
        .apply_child("350121", vec![(1, Some(r))])
        .await
        .expect("applied");
    assert_eq!(applied, 1);
    assert_eq!(
        signed(&chain(&store).await),
        [seq],
        "own head signed before the child's records"
    );
    let outbox = store
        .outbox_after(fedgate_proto::v1::Stream::Audit, 0, 100)
        .await
        .expect("outbox");
    let nodes: Vec<String> = outbox
        .iter()
        .map(|i| {
            AuditRecord::decode(i.payload.as_slice())
                .expect("record")
                .node_code
        })
        .collect();
    assert_eq!(nodes, [NODE, NODE, "350121"]);
    drop(log);
    writer.await.expect("writer");
}

#[tokio::test]
async fn only_the_running_nodes_own_chain_may_end_unsigned() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir).await;
    let key = Arc::new(GrantKey::generate());
    let (log, writer) = start(by_count(1000), &store, &key).await;
    log.record(event(AuditOperation::CatalogPublish, "a"))
        .await
        .expect("record");
    let none = std::collections::HashMap::new();
    let resume = std::collections::HashMap::new();
    let strict = super::verify_store(store.as_ref(), &none, &resume).await;
    assert!(
        matches!(
            strict,
            Err(super::StoreVerifyError::Chain(
                super::VerifyError::UnsignedTail { seq: 2, .. }
            ))
        ),
        "{strict:?}"
    );
    let live = super::verify_live_store(store.as_ref(), &none, &resume, Some(NODE))
        .await
        .expect("a running node's own unsigned tail");
    assert_eq!(live[0].unsigned, 2);
    let other = super::verify_live_store(store.as_ref(), &none, &resume, Some("350103")).await;
    assert!(other.is_err(), "another node's chain may not end unsigned");
    drop(log);
    writer.await.expect("writer");
    let closed = super::verify_store(store.as_ref(), &none, &resume)
        .await
        .expect("signed at shutdown");
    assert_eq!(closed[0].unsigned, 0);
}

/// Records `n` records, each answered; returns their sequence numbers.
async fn record_n(log: &AuditLog, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    for _ in 0..n {
        seqs.push(
            log.record(event(AuditOperation::CatalogPublish, "a"))
                .await
                .expect("record"),
        );
    }
    seqs
}

#[tokio::test]
async fn a_commit_reported_failed_that_took_effect_does_not_wedge_the_writer() {
    let dir = tempfile::tempdir().expect("dir");
    let faulty = Arc::new(Faulty::new(store(&dir).await));
    let store: Arc<dyn Store> = faulty.clone();
    let key = Arc::new(GrantKey::generate());
    let (log, writer) = start(by_count(4), &store, &key).await;
    assert_eq!(record_n(&log, 2).await, [2, 3]);
    faulty.fail_next(Fault::CommittedButFailed);
    assert!(
        log.record(event(AuditOperation::CatalogPublish, "lost answer"))
            .await
            .is_err(),
        "the caller is told the commit failed"
    );
    // The record is in the chain all the same: the writer continues after it.
    assert_eq!(record_n(&log, 5).await, [5, 6, 7, 8, 9]);
    drop(log);
    writer.await.expect("writer");
    let records = chain(&store).await;
    assert_eq!(records.len(), 9);
    assert_eq!(records[3].actor, "lost answer");
    verified(&records, false);
}

#[tokio::test]
async fn a_commit_that_failed_leaves_no_gap_in_the_chain() {
    let dir = tempfile::tempdir().expect("dir");
    let faulty = Arc::new(Faulty::new(store(&dir).await));
    let store: Arc<dyn Store> = faulty.clone();
    let key = Arc::new(GrantKey::generate());
    let (log, writer) = start(by_count(4), &store, &key).await;
    assert_eq!(record_n(&log, 2).await, [2, 3]);
    faulty.fail_next(Fault::Lost);
    assert!(
        log.record(event(AuditOperation::CatalogPublish, "lost"))
            .await
            .is_err()
    );
    assert_eq!(record_n(&log, 3).await, [4, 5, 6]);
    drop(log);
    writer.await.expect("writer");
    let records = chain(&store).await;
    assert!(records.iter().all(|r| r.actor != "lost"));
    verified(&records, false);
}

#[tokio::test]
async fn a_signature_that_failed_is_made_again() {
    let dir = tempfile::tempdir().expect("dir");
    let faulty = Arc::new(Faulty::new(store(&dir).await));
    let store: Arc<dyn Store> = faulty.clone();
    let key = Arc::new(GrantKey::generate());
    let policy = SignPolicy {
        every: Duration::from_millis(30),
        records: u64::MAX,
        bytes: usize::MAX,
    };
    let (log, writer) = start(policy, &store, &key).await;
    wait_signed(&store, 1).await;
    faulty.fail_next(Fault::SealLost);
    let seq = record_n(&log, 1).await[0];
    wait_signed(&store, seq).await;
    assert_eq!(record_n(&log, 1).await, [seq + 1]);
    drop(log);
    writer.await.expect("writer");
    verified(&chain(&store).await, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_one_chain_interleave_and_start_it_once() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir).await;
    let key = Arc::new(GrantKey::generate());
    // Both find the chain empty.
    let ((a, wa), (b, wb)) = tokio::join!(
        start(by_count(16), &store, &key),
        start(by_count(16), &store, &key)
    );
    let per_writer = 150;
    let (sa, sb) = tokio::join!(
        tokio::spawn({
            let a = a.clone();
            async move { record_n(&a, per_writer).await }
        }),
        tokio::spawn({
            let b = b.clone();
            async move { record_n(&b, per_writer).await }
        })
    );
    let (sa, sb) = (sa.expect("writer a"), sb.expect("writer b"));
    let mut all: Vec<u64> = sa.iter().chain(&sb).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        2 * per_writer,
        "no sequence number answered twice"
    );
    drop((a, b));
    wa.await.expect("writer a");
    wb.await.expect("writer b");
    let records = chain(&store).await;
    assert_eq!(records.len(), 2 * per_writer + 1);
    let starts = records
        .iter()
        .filter(|r| r.operation == AuditOperation::ChainStart as i32)
        .count();
    assert_eq!(starts, 1, "the chain is started once");
    verified(&records, false);
}
