//! A node's audit and grant key can be replaced: its chain records the rotation under the node certificate's
//! endorsement of the new key, its parent accepts the new key at `Join`, every level keeps verifying the chain,
//! and grants signed with the old key still serve.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, bail};
use fedgate_gateway::audit::verify::verify_store;
use fedgate_gateway::store::AuditQuery;
use fedgate_proto::v1::{ApplyRequest, AuditOperation, DecideRequest, ShareMode};
use fedgate_tests::{code, eventually, key_at, query, standard};

#[tokio::test]
async fn a_rotated_key_continues_the_chain_and_old_grants_still_serve() -> Result<()> {
    let mut net = standard().await?;
    let siming = net.consumer_at(code("350203"))?.uscc.clone();
    let provider = net.provider_at(code("350102"))?.uscc.clone();
    let mut a = net.client(&siming).await?;
    let application = a
        .apply(ApplyRequest {
            resource_id: "350102:marriage".into(),
            purpose: "marriage registration check".into(),
            scenario: "civil affairs service".into(),
            fields: vec!["name".into()],
            mode: ShareMode::Query as i32,
            requested_expires_at: 0,
        })
        .await?
        .into_inner();
    let approved = net
        .client(&provider)
        .await?
        .decide(DecideRequest {
            application_id: application.id,
            approve: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let Some(grant) = approved.grant else {
        bail!("no grant")
    };
    let key = key_at(&net, "350102", 3)?;
    let mut share = query("350102:marriage", &key, &["name"]);
    share.purpose.clear();
    share.grant = Some(grant);
    a.share(share.clone()).await?;

    // Gulou's operator replaces the node's key: the file is gone, the node makes a new one at start.
    let old = net.node(code("350102"))?.audit().map(|l| l.public_key());
    net.stop_node(code("350102")).await?;
    let key_file = net
        .node_config(code("350102"))?
        .signing_key
        .clone()
        .expect("devnet nodes name their key file");
    std::fs::remove_file(&key_file)?;
    net.restart_node(code("350102")).await?;
    let new = net.node(code("350102"))?.audit().map(|l| l.public_key());
    assert_ne!(old, new, "a new key");

    // The grant signed with the old key still serves, and more records follow under the new key.
    let mut a = net.client(&siming).await?;
    a.share(share).await?;
    let gulou = net.node(code("350102"))?;
    let head = gulou
        .store()
        .audit_head("350102")
        .await?
        .map(|h| h.seq)
        .unwrap_or(0);
    let province = net.node(code("350000"))?;
    eventually(
        "the province holds Gulou's chain up to its head",
        Duration::from_secs(30),
        || async {
            Ok(province
                .store()
                .audit_head("350102")
                .await?
                .is_some_and(|h| h.seq >= head))
        },
    )
    .await?;
    let rotations = province
        .store()
        .audit_query(&AuditQuery {
            node_prefix: Some("350102".into()),
            limit: 10_000,
            ..Default::default()
        })
        .await?
        .into_iter()
        .filter(|(_, r)| {
            r.operation == AuditOperation::KeyRotation as i32 && r.node_code == "350102"
        })
        .count();
    assert_eq!(rotations, 1, "one rotation record reached the province");

    // Every chain verifies, at the province and at Gulou, from its first record.
    for node in ["350000", "350100", "350102"] {
        let summaries = verify_store(
            net.node(code(node))?.store().as_ref(),
            &HashMap::new(),
            &HashMap::new(),
        )
        .await?;
        assert!(
            summaries.iter().any(|s| s.node == "350102"),
            "node {node} verified Gulou's chain"
        );
    }
    net.shutdown().await
}
