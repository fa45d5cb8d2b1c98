//! Operational monitoring over real nodes: each node a request passes keeps one record of it with consistent
//! timestamps, sizes, peers and outcome; the operator lists them with filters and pages; the histograms are
//! exported with their labels; the Grafana dashboard queries only metrics a node exports.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fedgate_node::devnet::Devnet;
use fedgate_proto::v1::{
    AuditOperation, ListOperationsRequest, OperationRecord, ShareMode, ShareRequest,
};
use fedgate_tests::{
    code, key_at, metrics_text, operator_client, operator_client_with, own_audit_records, query,
    standard,
};
use tonic::Code;

/// The nodes a share from Siming (350203) to Gulou (350102) passes, in order.
const ROUTE: [&str; 5] = ["350203", "350200", "350000", "350100", "350102"];
const HOUSEHOLD: &str = "350102:household";
const WAIT: Duration = Duration::from_secs(10);

/// Every record at `node` matching `filter`, all pages.
async fn records(
    net: &Devnet,
    node: &str,
    filter: ListOperationsRequest,
) -> Result<Vec<OperationRecord>> {
    let mut op = operator_client(net, node)?;
    let mut req = filter;
    let mut out = Vec::new();
    loop {
        let page = op.list_operations(req.clone()).await?.into_inner();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        req.page_token = page.next_page_token;
    }
}

/// The records at `node` matching `filter` and `keep`, polled until there is one (records are stored
/// asynchronously), failing after [`WAIT`].
async fn stored(
    net: &Devnet,
    node: &str,
    filter: ListOperationsRequest,
    keep: impl Fn(&OperationRecord) -> bool,
) -> Result<Vec<OperationRecord>> {
    let start = std::time::Instant::now();
    loop {
        let found: Vec<_> = records(net, node, filter.clone())
            .await?
            .into_iter()
            .filter(|r| keep(r))
            .collect();
        if !found.is_empty() {
            return Ok(found);
        }
        ensure!(
            start.elapsed() < WAIT,
            "no such record at {node} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The one record of request `id` at `node`, once it is stored.
async fn record_of(net: &Devnet, node: &str, id: &str) -> Result<OperationRecord> {
    let mut found = stored(net, node, ListOperationsRequest::default(), |r| {
        r.request_id == id
    })
    .await?;
    ensure!(
        found.len() == 1,
        "{node} holds {} records of {id}",
        found.len()
    );
    Ok(found.remove(0))
}

fn share(key: &str, id: &str) -> ShareRequest {
    let mut q = query(HOUSEHOLD, key, &["name"]);
    q.request_id = id.to_owned();
    q
}

/// Checks the records of one request along [`ROUTE`]: one per node, each well ordered, nested in the one of
/// the node before, with the peers the route implies and outcome `code`.
async fn check_route(net: &Devnet, id: &str, code_: Code, resource: &str) -> Result<()> {
    let consumer = net.consumer_at(code("350203"))?.uscc.to_string();
    let provider = net.provider_at(code("350102"))?.uscc.to_string();
    let mut at = Vec::new();
    for node in ROUTE {
        at.push(record_of(net, node, id).await?);
    }
    for (i, r) in at.iter().enumerate() {
        let node = ROUTE[i];
        assert_eq!(r.node_code, node);
        assert_eq!(r.code, code_ as i32, "{node}: {r:?}");
        assert_eq!(r.resource_id, resource, "{node}");
        assert_eq!(r.consumer_uscc, consumer, "{node}");
        assert_eq!(r.consumer_node, "350203", "{node}");
        assert_eq!(r.mode, ShareMode::Query as i32, "{node}");
        let (method, caller) = match i {
            0 => ("Agency.Share", format!("urn:fedgate:agency:{consumer}")),
            _ => (
                "Federation.Forward",
                format!("urn:fedgate:node:{}", ROUTE[i - 1]),
            ),
        };
        assert_eq!(r.method, method, "{node}");
        assert_eq!(r.caller, caller, "{node}");
        // A refusal is answered in the headers alone: no response body.
        assert!(r.request_bytes > 0, "{node}: {r:?}");
        assert_eq!(r.response_bytes > 0, code_ == Code::Ok, "{node}: {r:?}");
        assert!(
            r.request_in_unix_nanos <= r.response_out_unix_nanos,
            "{node}: {r:?}"
        );
        if i + 1 < ROUTE.len() {
            assert_eq!(r.next_hop, format!("urn:fedgate:node:{}", ROUTE[i + 1]));
            let next = &at[i + 1];
            assert!(
                r.request_in_unix_nanos <= r.request_out_unix_nanos
                    && r.request_out_unix_nanos <= next.request_in_unix_nanos
                    && next.response_out_unix_nanos <= r.response_in_unix_nanos
                    && r.response_in_unix_nanos <= r.response_out_unix_nanos,
                "{node} and {}: {r:?} {next:?}",
                ROUTE[i + 1]
            );
        }
    }
    let last = &at[ROUTE.len() - 1];
    if code_ == Code::Ok {
        assert_eq!(last.next_hop, format!("urn:fedgate:agency:{provider}"));
        assert!(
            last.request_in_unix_nanos <= last.request_out_unix_nanos
                && last.request_out_unix_nanos <= last.response_in_unix_nanos
                && last.response_in_unix_nanos <= last.response_out_unix_nanos,
            "{last:?}"
        );
    } else {
        // Refused before the provider was called.
        assert_eq!(last.next_hop, "", "{last:?}");
        assert_eq!(last.request_out_unix_nanos, 0, "{last:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_cross_city_share_leaves_one_record_at_each_node_it_passes() -> Result<()> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    siming.share(share(&key, "opmon-share-1")).await?;
    check_route(&net, "opmon-share-1", Code::Ok, HOUSEHOLD).await?;

    // Refused where the resource is held: recorded with its code at every node on the way.
    let mut refused = query("350102:marriage", &key, &[]);
    refused.request_id = "opmon-refused-1".into();
    let err = siming.share(refused).await.expect_err("needs a grant");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    check_route(
        &net,
        "opmon-refused-1",
        Code::FailedPrecondition,
        "350102:marriage",
    )
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn the_operator_filters_and_pages_the_records() -> Result<()> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let before = fedgate_gateway::audit::now_nanos();
    // Five different keys: the same share again would be answered from Siming's cache.
    for i in 0..5 {
        let key = key_at(&net, "350102", i)?;
        siming
            .share(share(&key, &format!("opmon-page-{i}")))
            .await?;
    }
    let mut refused = query("350102:marriage", &key, &[]);
    refused.request_id = "opmon-page-refused".into();
    assert!(siming.share(refused).await.is_err());
    let after = fedgate_gateway::audit::now_nanos();
    record_of(&net, "350102", "opmon-page-refused").await?;

    let forwards = |outcome: &str| ListOperationsRequest {
        method: "Federation.Forward".into(),
        outcome: outcome.into(),
        ..Default::default()
    };
    // Pages of two, in order, each token leading to the next.
    let mut op = operator_client(&net, "350102")?;
    let mut req = ListOperationsRequest {
        page_size: 2,
        ..forwards("OK")
    };
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let page = op.list_operations(req.clone()).await?.into_inner();
        assert!(page.records.len() <= 2);
        pages += 1;
        ids.extend(page.records.into_iter().map(|r| r.request_id));
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    let expected: Vec<String> = (0..5).map(|i| format!("opmon-page-{i}")).collect();
    assert_eq!(ids, expected);
    assert_eq!(pages, 3);

    let ids_of =
        |rs: Vec<OperationRecord>| rs.into_iter().map(|r| r.request_id).collect::<Vec<_>>();
    let refusals = records(&net, "350102", forwards("FAILED_PRECONDITION")).await?;
    assert_eq!(ids_of(refusals), ["opmon-page-refused"]);
    let by_resource = ListOperationsRequest {
        resource_id: "350102:marriage".into(),
        ..Default::default()
    };
    assert_eq!(
        ids_of(records(&net, "350102", by_resource).await?),
        ["opmon-page-refused"]
    );
    let consumer = net.consumer_at(code("350203"))?.uscc.to_string();
    let mine = ListOperationsRequest {
        consumer_node: "350203".into(),
        consumer_uscc: consumer,
        ..forwards("OK")
    };
    assert_eq!(records(&net, "350102", mine).await?.len(), 5);
    let others = ListOperationsRequest {
        consumer_node: "350100".into(),
        ..Default::default()
    };
    assert!(records(&net, "350102", others).await?.is_empty());
    let in_window = ListOperationsRequest {
        from_unix_nanos: before,
        to_unix_nanos: after,
        ..forwards("")
    };
    assert_eq!(records(&net, "350102", in_window).await?.len(), 6);
    let later = ListOperationsRequest {
        from_unix_nanos: after,
        ..forwards("")
    };
    assert!(records(&net, "350102", later).await?.is_empty());

    // Bad requests name what was wrong.
    let bad = async |req: ListOperationsRequest, needle: &str| -> Result<()> {
        let err = operator_client(&net, "350102")?
            .list_operations(req)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(needle), "{}", err.message());
        Ok(())
    };
    bad(
        ListOperationsRequest {
            page_token: "42".into(),
            ..Default::default()
        },
        "page_token",
    )
    .await?;
    bad(forwards("DENIED"), "outcome").await?;
    bad(
        ListOperationsRequest {
            page_size: 100_000,
            ..Default::default()
        },
        "max_audit_page",
    )
    .await?;
    bad(
        ListOperationsRequest {
            from_unix_nanos: after,
            to_unix_nanos: before,
            ..Default::default()
        },
        "from_unix_nanos",
    )
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn only_the_nodes_operator_lists_records_and_a_refusal_is_audited_and_recorded() -> Result<()>
{
    let net = standard().await?;
    let agency = net.consumer_at(code("350200"))?;
    let mut not_operator = operator_client_with(&net, "350200", &agency.cert)?;
    let err = not_operator
        .list_operations(ListOperationsRequest::default())
        .await
        .expect_err("an agency is no operator");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("not an operator"),
        "{}",
        err.message()
    );
    let actor = format!("urn:fedgate:agency:{}", agency.uscc);
    let audited = own_audit_records(&net, "350200")
        .await?
        .into_iter()
        .filter(|r| {
            r.operation == AuditOperation::AuthRefused as i32
                && r.actor == actor
                && r.detail.starts_with("Operator.ListOperations")
                && r.outcome == "PERMISSION_DENIED"
        })
        .count();
    assert_eq!(audited, 1);
    // The refused call is itself an operation of the node.
    let denied = ListOperationsRequest {
        method: "Operator.ListOperations".into(),
        outcome: "PERMISSION_DENIED".into(),
        ..Default::default()
    };
    let found = stored(&net, "350200", denied, |_| true).await?;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].caller, actor);
    assert_eq!(found[0].next_hop, "");
    net.shutdown().await
}

/// The sample `name{labels}` of an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test]
async fn the_histograms_carry_hop_resource_consumer_node_and_outcome() -> Result<()> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    siming.share(share(&key, "opmon-metrics-1")).await?;
    let labels = |method: &str, hop: &str| {
        format!(
            "{{method=\"{method}\",hop=\"{hop}\",resource=\"{HOUSEHOLD}\",consumer_node=\"350203\",outcome=\"OK\"}}"
        )
    };
    for (node, method, hop) in [
        ("350203", "Agency.Share", "forwarded"),
        ("350200", "Federation.Forward", "forwarded"),
        ("350102", "Federation.Forward", "provider"),
    ] {
        let text = metrics_text(&net, node).await?;
        for h in ["fedgate_op_duration_seconds", "fedgate_op_next_hop_seconds"] {
            let series = format!("{h}_count{}", labels(method, hop));
            assert_eq!(
                sample(&text, &series),
                Some(1.0),
                "{node}: {series}\n{text}"
            );
        }
        for h in ["fedgate_op_request_bytes", "fedgate_op_response_bytes"] {
            let series = format!("{h}_count{{method=\"{method}\"}}");
            assert_eq!(sample(&text, &series), Some(1.0), "{node}: {series}");
            let sum = sample(&text, &format!("{h}_sum{{method=\"{method}\"}}"));
            assert!(sum.unwrap_or(0.0) > 0.0, "{node}: {h} sum {sum:?}");
        }
    }
    // A refusal is counted by outcome without naming the resource or the consumer node.
    let mut refused = query("350102:marriage", &key, &[]);
    refused.request_id = "opmon-metrics-refused".into();
    assert!(siming.share(refused).await.is_err());
    let text = metrics_text(&net, "350102").await?;
    let series = "fedgate_op_duration_seconds_count{method=\"Federation.Forward\",hop=\"answered\",resource=\"\",consumer_node=\"\",outcome=\"FAILED_PRECONDITION\"}";
    assert_eq!(sample(&text, series), Some(1.0), "{series}");
    assert!(!text.contains("350102:marriage"), "{text}");
    net.shutdown().await
}

/// Metric names a PromQL expression uses (`fedgate_...`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("fedgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_dashboard_queries_only_metrics_a_node_exports() -> Result<()> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/fedgate.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    ensure!(all.len() >= 6, "the dashboard has {} queries", all.len());

    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    siming.share(share(&key, "opmon-dashboard-1")).await?;
    // A connection that is no TLS handshake: the refusal counters get their first sample.
    {
        use tokio::io::AsyncWriteExt;
        let mut raw = tokio::net::TcpStream::connect(net.node(code("350000"))?.addr()).await?;
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut sink).await;
    }
    let refused = "fedgate_connections_refused_total{listener=\"backbone\"";
    let start = std::time::Instant::now();
    while !metrics_text(&net, "350000").await?.contains(refused) {
        ensure!(
            start.elapsed() < WAIT,
            "the refused connection is not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut exported = String::new();
    for node in ROUTE {
        exported.push_str(&metrics_text(&net, node).await?);
    }
    // Every series name a node exposes, and the names of the families it declares (a family with no sample
    // yet, such as refusals before any refusal, is exported all the same).
    let mut names = std::collections::BTreeSet::new();
    for line in exported.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split(' ');
            let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
        } else if let Some(name) = line
            .split(['{', ' '])
            .next()
            .filter(|n| !n.starts_with('#'))
        {
            names.insert(name.to_owned());
        }
    }
    for expr in &all {
        let used = metric_names(expr);
        ensure!(!used.is_empty(), "query {expr:?} names no fedgate metric");
        for name in used {
            assert!(
                names.contains(&name),
                "the dashboard queries {name}, which no node exports ({expr})"
            );
        }
    }
    net.shutdown().await
}
