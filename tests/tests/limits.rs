//! Bounded input: oversized values are refused at the edge with INVALID_ARGUMENT naming the field and the limit,
//! the refusal is audited, and no stream jams.

use std::time::Duration;

use anyhow::{Result, bail};
use fedgate_gateway::store::AuditQuery;
use fedgate_proto::v1::{AuditOperation, PublishEntryRequest};
use fedgate_tests::{Devnet, code, eventually, key_at, query, standard};
use tonic::Code;

/// A purpose this long still fits in a share request under a node's default 4 MiB message limit, but an audit
/// record carrying it does not fit in any push.
const NEARLY_4_MIB: usize = 4 * 1024 * 1024 - 100;
/// A summary this long still fits in a publish request under the default message limit.
const SUMMARY_4_MIB: usize = 4 * 1024 * 1024 - 2048;

/// Whether `node` holds a record written by `origin` about `request_id`.
async fn holds_record(net: &Devnet, node: &str, origin: &str, request_id: &str) -> Result<bool> {
    let rows = net
        .node(code(node))?
        .store()
        .audit_query(&AuditQuery {
            node_prefix: Some(origin.to_owned()),
            limit: 100_000,
            ..Default::default()
        })
        .await?;
    Ok(rows.iter().any(|(_, r)| r.request_id == request_id))
}

/// The refusal records `node` wrote for calls of `rpc` (AUTH_REFUSED, INVALID_ARGUMENT).
async fn refusals(net: &Devnet, node: &str, rpc: &str) -> Result<Vec<String>> {
    let rows = net
        .node(code(node))?
        .store()
        .audit_query(&AuditQuery {
            node_prefix: Some(node.to_owned()),
            outcome: Some("INVALID_ARGUMENT".into()),
            limit: 100_000,
            ..Default::default()
        })
        .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, r)| {
            r.operation == AuditOperation::AuthRefused as i32 && r.detail.starts_with(rpc)
        })
        .map(|(_, r)| r.detail)
        .collect())
}

/// The start of a status message, for assertion output.
fn head(s: &str) -> String {
    s.chars().take(300).collect()
}

#[tokio::test]
async fn an_oversized_purpose_or_summary_is_refused_and_the_streams_keep_flowing() -> Result<()> {
    let net = standard().await?;
    let gulou = code("350102");
    let consumer = net.consumer_at(gulou)?.uscc.clone();
    let mut client = net.client(&consumer).await?;
    let key = key_at(&net, "350102", 0)?;

    let mut big = query("350102:household", &key, &[]);
    big.request_id = "jam-purpose".into();
    big.purpose = "p".repeat(NEARLY_4_MIB);
    let err = match client.share(big).await {
        Ok(_) => bail!("a share with a 4 MiB purpose was served"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{}", head(err.message()));
    assert!(
        err.message().contains("purpose") && err.message().contains("limits.max_text_chars"),
        "{}",
        head(err.message())
    );
    assert!(err.message().len() < 512, "{}", head(err.message()));
    let refused = refusals(&net, "350102", "Agency.Share").await?;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("limits.max_text_chars"), "{refused:?}");

    let provider = net.provider_at(gulou)?;
    let mut entry = provider.published[0].clone();
    entry.id = "jam-summary".into();
    entry.version = 0;
    entry.summary = "s".repeat(SUMMARY_4_MIB);
    let mut publisher = net.client(&provider.uscc).await?;
    let err = match publisher
        .publish_entry(PublishEntryRequest {
            entry: Some(entry.clone()),
        })
        .await
    {
        Ok(_) => bail!("an entry with a 4 MiB summary was published"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{}", head(err.message()));
    assert!(
        err.message().contains("entry.summary")
            && err.message().contains("limits.max_summary_chars"),
        "{}",
        head(err.message())
    );
    assert_eq!(
        refusals(&net, "350102", "Agency.PublishEntry").await?.len(),
        1
    );

    // Both streams still reach the province.
    let mut after = query("350102:household", &key, &[]);
    after.request_id = "after-jam".into();
    client.share(after).await?;
    entry.id = "after-jam".into();
    entry.summary = "published after the refused one".into();
    publisher
        .publish_entry(PublishEntryRequest { entry: Some(entry) })
        .await?;
    eventually(
        "the province holds the record of the share after the refused one",
        Duration::from_secs(20),
        || holds_record(&net, "350000", "350102", "after-jam"),
    )
    .await?;
    net.wait_for_catalog(code("350000"), 7, Duration::from_secs(20))
        .await?;
    net.shutdown().await
}
