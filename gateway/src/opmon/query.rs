//! `Operator.ListOperations`: the request's limits, its filters as a store query, and its paging.

use fedgate_proto::v1::{ListOperationsRequest, ListOperationsResponse};

use crate::error::{Error, Result};
use crate::limits::{Bounded, Limit, LimitsConfig, ident, limit, page};
use crate::store::{OperationQuery, Store};

/// Records of a page when the request asks for none in particular.
const DEFAULT_PAGE: u32 = 100;
/// How a page token begins; the rest is the position of the last record of the previous page.
const TOKEN_PREFIX: &str = "op.";

/// The gRPC code names, by code.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of gRPC code `code` ("PERMISSION_DENIED"); "UNKNOWN" for a number that is not one.
pub fn code_name(code: i32) -> &'static str {
    usize::try_from(code)
        .ok()
        .and_then(|i| CODES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// The gRPC code named `name` (case-insensitive).
pub fn parse_code(name: &str) -> Option<i32> {
    CODES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name))
        .and_then(|i| i32::try_from(i).ok())
}

impl Bounded for ListOperationsRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("method", &self.method, limit!(l, max_id_chars))?;
        ident(
            "resource_id",
            &self.resource_id,
            Limit::new(l.max_resource_id_chars(), "max_local_code_chars"),
        )?;
        ident(
            "consumer_node",
            &self.consumer_node,
            limit!(l, max_id_chars),
        )?;
        ident(
            "consumer_uscc",
            &self.consumer_uscc,
            limit!(l, max_id_chars),
        )?;
        ident("outcome", &self.outcome, limit!(l, max_id_chars))?;
        page("page_size", self.page_size, limit!(l, max_audit_page))?;
        ident(
            "page_token",
            &self.page_token,
            limit!(l, max_page_token_chars),
        )
    }
}

/// One page of the records `req` asks for (already within the limits), oldest first.
pub async fn list_operations(
    store: &dyn Store,
    req: &ListOperationsRequest,
) -> Result<ListOperationsResponse> {
    if req.from_unix_nanos < 0 || req.to_unix_nanos < 0 {
        return Err(Error::InvalidArgument(
            "from_unix_nanos and to_unix_nanos must not be negative".into(),
        ));
    }
    if req.to_unix_nanos > 0 && req.from_unix_nanos > req.to_unix_nanos {
        return Err(Error::InvalidArgument(format!(
            "from_unix_nanos {} is after to_unix_nanos {}",
            req.from_unix_nanos, req.to_unix_nanos
        )));
    }
    let code = match req.outcome.as_str() {
        "" => None,
        name => Some(parse_code(name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "outcome {:?} is not a gRPC code name (OK, NOT_FOUND, PERMISSION_DENIED, ...)",
                crate::limits::excerpt(name)
            ))
        })?),
    };
    let after = match req.page_token.as_str() {
        "" => None,
        token => Some(
            token
                .strip_prefix(TOKEN_PREFIX)
                .and_then(|p| p.parse::<u64>().ok())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "page_token {:?} is not a token this node issued",
                        crate::limits::excerpt(token)
                    ))
                })?,
        ),
    };
    let limit = match req.page_size {
        0 => DEFAULT_PAGE,
        n => n,
    };
    let given = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let query = OperationQuery {
        from_ns: (req.from_unix_nanos > 0).then_some(req.from_unix_nanos),
        to_ns: (req.to_unix_nanos > 0).then_some(req.to_unix_nanos),
        method: given(&req.method),
        resource_id: given(&req.resource_id),
        consumer_node: given(&req.consumer_node),
        consumer_uscc: given(&req.consumer_uscc),
        code,
        after,
        limit,
    };
    let rows = store.ops_query(&query).await?;
    let next_page_token = match rows.last() {
        Some((pos, _)) if rows.len() == limit as usize => format!("{TOKEN_PREFIX}{pos}"),
        _ => String::new(),
    };
    Ok(ListOperationsResponse {
        records: rows.into_iter().map(|(_, r)| r).collect(),
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_and_numbers_agree_with_tonic() {
        for c in 0..17 {
            let code = tonic::Code::from_i32(c);
            assert_eq!(code as i32, c);
            assert_eq!(parse_code(code_name(c)), Some(c));
        }
        assert_eq!(code_name(7), "PERMISSION_DENIED");
        assert_eq!(parse_code("permission_denied"), Some(7));
        assert_eq!(parse_code("DENIED"), None);
        assert_eq!(code_name(99), "UNKNOWN");
    }
}
