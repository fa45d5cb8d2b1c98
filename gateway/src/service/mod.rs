//! The tonic services of a node: thin adapters that read the caller's identity from its certificate,
//! validate the message into typed values and call the gateway's modules.

mod agency;
mod federation;
mod open_data;
mod operator;
pub mod reflect;
pub mod scrape;

pub use agency::AgencyService;
pub use federation::FederationService;
pub use open_data::OpenDataService;
pub use operator::{OperatorService, subtree_audit};

use std::time::{Duration, Instant};

use tonic::Request;

use crate::error::{Error, Result};
use crate::ident::Peer;
use crate::tls::peer_info;

/// The authenticated identity of the caller of `req`, from its TLS certificate.
fn caller<T>(req: &Request<T>) -> Result<Peer> {
    peer_info(req).map(|p| p.peer.clone()).ok_or_else(|| {
        Error::PermissionDenied("the connection carries no verified client certificate".into())
    })
}

/// Default page of an audit query.
const AUDIT_PAGE: u32 = 100;

/// Runs an audit query from its request (already within the limits), restricted to `party` and `node_prefix`
/// where given.
async fn audit_query(
    store: &dyn crate::store::Store,
    q: &fedgate_proto::v1::QueryAuditRequest,
    party: Option<String>,
    counterpart: Option<String>,
    node_prefix: Option<String>,
) -> Result<fedgate_proto::v1::QueryAuditResponse> {
    let limit = match q.page_size {
        0 => AUDIT_PAGE,
        n => n,
    };
    let after = if q.page_token.is_empty() {
        None
    } else {
        Some(q.page_token.parse::<u64>().map_err(|_| {
            Error::InvalidArgument(format!(
                "page_token {:?} is not a token this node issued",
                crate::limits::excerpt(&q.page_token)
            ))
        })?)
    };
    if q.from_unix_nanos < 0 || q.to_unix_nanos < 0 {
        return Err(Error::InvalidArgument(
            "from_unix_nanos and to_unix_nanos must not be negative".into(),
        ));
    }
    let query = crate::store::AuditQuery {
        party,
        counterpart,
        node_prefix,
        from_ns: (q.from_unix_nanos > 0).then_some(q.from_unix_nanos),
        to_ns: (q.to_unix_nanos > 0).then_some(q.to_unix_nanos),
        resource_id: (!q.resource_id.is_empty()).then(|| q.resource_id.clone()),
        outcome: (!q.outcome.is_empty()).then(|| q.outcome.clone()),
        after_fwd_seq: after,
        limit,
    };
    let rows = store.audit_query(&query).await?;
    let next_page_token = match rows.last() {
        Some((pos, _)) if rows.len() == limit as usize => pos.to_string(),
        _ => String::new(),
    };
    Ok(fedgate_proto::v1::QueryAuditResponse {
        records: rows.into_iter().map(|(_, r)| r).collect(),
        next_page_token,
    })
}

/// The deadline of a call: the caller's `grpc-timeout`, capped by `default`.
fn deadline<T>(req: &Request<T>, default: Duration) -> Instant {
    let asked = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    Instant::now() + asked.map_or(default, |a| a.min(default))
}

/// Parses a `grpc-timeout` header value ("100m", "5S", ...).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("10q"), None);
    }
}
