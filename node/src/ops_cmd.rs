//! `fedgate ops`: lists the operational records of a running node (timestamps, sizes, peers and outcome of the
//! calls it handled) through its Operator service, with the node's own certificate.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fedgate_proto::v1::{ListOperationsRequest, OperationRecord};

/// Arguments of `fedgate ops`.
#[derive(Debug, Args)]
pub struct OpsArgs {
    /// Path of the node's configuration (its TLS files identify the operator).
    #[arg(long, short)]
    config: PathBuf,
    /// Only calls that came in at or after this time (RFC 3339).
    #[arg(long)]
    from: Option<String>,
    /// Only calls that came in before this time (RFC 3339).
    #[arg(long)]
    to: Option<String>,
    /// Only this method, e.g. Agency.Share or Federation.Forward.
    #[arg(long)]
    method: Option<String>,
    /// Only requests for this resource.
    #[arg(long)]
    resource: Option<String>,
    /// Only requests of consumers at this node.
    #[arg(long)]
    consumer_node: Option<String>,
    /// Only requests of this consumer agency (USCC).
    #[arg(long)]
    consumer: Option<String>,
    /// Only calls with this outcome (OK, PERMISSION_DENIED, ...).
    #[arg(long)]
    outcome: Option<String>,
    /// Records to list at most (fetched a page at a time).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

fn nanos(what: &str, t: &Option<String>) -> Result<i64> {
    let Some(s) = t else {
        return Ok(0);
    };
    let at = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("--{what} {s:?} is not an RFC 3339 time"))?;
    Ok(i64::try_from(at.unix_timestamp_nanos()).unwrap_or(i64::MAX))
}

/// Milliseconds from `a` to `b` (both ns), or "-" when either is unknown.
fn span_ms(a: i64, b: i64) -> String {
    if a == 0 || b == 0 {
        return "-".into();
    }
    format!("{:.1}", (b - a) as f64 / 1e6)
}

fn rfc3339(ns: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ns.to_string())
}

fn json(r: &OperationRecord) -> serde_json::Value {
    serde_json::json!({
        "node": r.node_code,
        "request_id": r.request_id,
        "method": r.method,
        "caller": r.caller,
        "next_hop": r.next_hop,
        "resource_id": r.resource_id,
        "consumer_uscc": r.consumer_uscc,
        "consumer_node": r.consumer_node,
        "mode": fedgate_proto::v1::ShareMode::try_from(r.mode).unwrap_or_default().as_str_name(),
        "request_in": rfc3339(r.request_in_unix_nanos),
        "request_in_unix_nanos": r.request_in_unix_nanos,
        "request_out_unix_nanos": r.request_out_unix_nanos,
        "response_in_unix_nanos": r.response_in_unix_nanos,
        "response_out_unix_nanos": r.response_out_unix_nanos,
        "request_bytes": r.request_bytes,
        "response_bytes": r.response_bytes,
        "outcome": fedgate_gateway::opmon::code_name(r.code),
    })
}

/// One line of the table: the columns of a record, or their titles.
fn row(c: [&str; 10]) -> String {
    format!(
        "{:<30} {:<22} {:<20} {:>9} {:>9} {:>8} {:>8}  {:<34} {:<34} {}",
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]
    )
}

/// Lists the records `args` asks for.
pub async fn run(args: OpsArgs) -> Result<()> {
    let (code, mut client) = crate::cli::operator_client(&args.config).await?;
    let mut req = ListOperationsRequest {
        from_unix_nanos: nanos("from", &args.from)?,
        to_unix_nanos: nanos("to", &args.to)?,
        method: args.method.clone().unwrap_or_default(),
        resource_id: args.resource.clone().unwrap_or_default(),
        consumer_node: args.consumer_node.clone().unwrap_or_default(),
        consumer_uscc: args.consumer.clone().unwrap_or_default(),
        outcome: args.outcome.clone().unwrap_or_default(),
        ..Default::default()
    };
    if !args.json {
        println!("operational records of node {code}");
        println!(
            "{}",
            row([
                "request in",
                "method",
                "outcome",
                "here ms",
                "next ms",
                "req B",
                "resp B",
                "caller",
                "next hop",
                "resource",
            ])
        );
    }
    let mut left = args.limit;
    while left > 0 {
        req.page_size = left.min(500);
        let page = client
            .list_operations(req.clone())
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        for r in &page.records {
            if args.json {
                println!("{}", json(r));
            } else {
                let (here, next) = (
                    span_ms(r.request_in_unix_nanos, r.response_out_unix_nanos),
                    span_ms(r.request_out_unix_nanos, r.response_in_unix_nanos),
                );
                let (req_b, resp_b) = (r.request_bytes.to_string(), r.response_bytes.to_string());
                println!(
                    "{}",
                    row([
                        &rfc3339(r.request_in_unix_nanos),
                        &r.method,
                        fedgate_gateway::opmon::code_name(r.code),
                        &here,
                        &next,
                        &req_b,
                        &resp_b,
                        &r.caller,
                        if r.next_hop.is_empty() {
                            "-"
                        } else {
                            &r.next_hop
                        },
                        &r.resource_id,
                    ])
                );
            }
        }
        left = left.saturating_sub(u32::try_from(page.records.len()).unwrap_or(u32::MAX));
        if page.next_page_token.is_empty() || page.records.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    Ok(())
}
