//! The auditor's pages: audit search by agency, resource, time and outcome over the chains this node holds (its
//! own and its subtree's), the chains' verification, and one request's records at every node it passed.

use askama::Template;
use axum::extract::{Query, State};
use axum::response::Html;
use fedgate_proto::v1::{AuditOperation, AuditRecord, OperatorAuditRequest, QueryAuditRequest};
use serde::Deserialize;

use super::Console;
use super::session::Auditing;
use super::view::{Failure, Frame, render};
use crate::limits::Bounded;
use crate::store::AuditQuery;

/// Records one page shows.
const PAGE: u32 = 100;
/// Nanoseconds of a day.
const DAY_NS: i64 = 24 * 3600 * 1_000_000_000;
/// How far around a record's time its request's other records are looked for.
const ROUTE_WINDOW_NS: i64 = 10 * 60 * 1_000_000_000;

/// The search form.
#[derive(Deserialize, Default)]
pub struct AuditForm {
    #[serde(default)]
    agency: String,
    #[serde(default)]
    resource: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    after: String,
    #[serde(default)]
    verify: String,
}

/// One record as a row.
pub struct RecordRow {
    node: String,
    seq: u64,
    time: String,
    time_ns: i64,
    operation: String,
    actor: String,
    consumer: String,
    provider: String,
    resource: String,
    outcome: String,
    detail: String,
    request_id: String,
    route: String,
}

fn row(r: &AuditRecord, offset: time::UtcOffset) -> RecordRow {
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.time_unix_nanos))
        .map(|t| t.to_offset(offset))
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_default();
    RecordRow {
        node: r.node_code.clone(),
        seq: r.seq,
        time,
        time_ns: r.time_unix_nanos,
        operation: AuditOperation::try_from(r.operation)
            .map(|o| {
                o.as_str_name()
                    .trim_start_matches("AUDIT_OPERATION_")
                    .to_owned()
            })
            .unwrap_or_else(|_| r.operation.to_string()),
        actor: r.actor.clone(),
        consumer: r.consumer_uscc.clone(),
        provider: r.provider_uscc.clone(),
        resource: r.resource_id.clone(),
        outcome: r.outcome.clone(),
        detail: r.detail.clone(),
        request_id: r.request_id.clone(),
        route: r.route.join(" → "),
    }
}

/// One chain's verification.
struct ChainRow {
    node: String,
    records: u64,
    head: u64,
    unsigned: u64,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage {
    frame: Frame,
    form: AuditForm,
    records: Vec<RecordRow>,
    next: Option<String>,
    verified: Option<Result<Vec<ChainRow>, String>>,
}

/// Nanoseconds since the epoch at the start of local day `date` ("YYYY-MM-DD"), or `None` for an empty one.
fn day_start(
    date: &str,
    offset: time::UtcOffset,
    field: &str,
) -> crate::error::Result<Option<i64>> {
    if date.is_empty() {
        return Ok(None);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(date, &format).map_err(|e| {
        crate::error::Error::InvalidArgument(format!(
            "{field} {:?}: {e}",
            crate::limits::excerpt(date)
        ))
    })?;
    let ns = day.midnight().assume_offset(offset).unix_timestamp_nanos();
    Ok(Some(i64::try_from(ns).unwrap_or(i64::MAX)))
}

/// The operator's audit request a search form asks for: the same filters `Operator.QueryAudit` takes.
fn audit_request(
    form: &AuditForm,
    offset: time::UtcOffset,
) -> crate::error::Result<OperatorAuditRequest> {
    let ns = |day: Option<i64>| day.unwrap_or(0);
    let from = day_start(&form.from, offset, "from")?;
    let to = day_start(&form.to, offset, "to")?.map(|t| t.saturating_add(DAY_NS));
    Ok(OperatorAuditRequest {
        query: Some(QueryAuditRequest {
            from_unix_nanos: ns(from),
            to_unix_nanos: ns(to),
            resource_id: form.resource.trim().to_owned(),
            outcome: form.outcome.trim().to_owned(),
            page_size: PAGE,
            page_token: form.after.clone(),
            ..Default::default()
        }),
        agency: form.agency.trim().to_owned(),
        node_code: form.node.trim().to_owned(),
    })
}

/// `GET /audit`.
pub async fn search(
    State(c): State<Console>,
    Auditing(s): Auditing,
    Query(form): Query<AuditForm>,
) -> Result<Html<String>, Failure> {
    let lang = s.lang;
    let offset = c.inner.router.governance().calendar().utc_offset();
    let req = match audit_request(&form, offset) {
        Ok(req) => req,
        Err(e) => return Err(c.invalid(&s, "GET /audit", e).await),
    };
    if let Err(e) = req.check_limits(&c.inner.limits) {
        return Err(c.invalid(&s, "GET /audit", e).await);
    }
    let found =
        match crate::service::subtree_audit(c.inner.node, c.inner.store.as_ref(), &req).await {
            Ok(found) => found,
            Err(e @ crate::error::Error::InvalidArgument(_)) => {
                return Err(c.invalid(&s, "GET /audit", e).await);
            }
            Err(e) => return Err(Failure::of(e, lang)),
        };
    let next = (!found.next_page_token.is_empty()).then_some(found.next_page_token);
    let verified = if form.verify.is_empty() {
        None
    } else {
        let me = c.inner.node.to_string();
        let (pinned, resume) = (Default::default(), Default::default());
        Some(
            crate::audit::verify::verify_live_store(
                c.inner.store.as_ref(),
                &pinned,
                &resume,
                Some(&me),
            )
            .await
            .map(|chains| {
                chains
                    .into_iter()
                    .map(|ch| ChainRow {
                        node: ch.node,
                        records: ch.records,
                        head: ch.head,
                        unsigned: ch.unsigned,
                    })
                    .collect()
            })
            .map_err(|e| e.to_string()),
        )
    };
    let page = AuditPage {
        frame: Frame::of(&s, c.inner.node.as_str(), "/audit"),
        records: found.records.iter().map(|r| row(r, offset)).collect(),
        next,
        verified,
        form,
    };
    render(&page, lang)
}

/// The request page's query: the request, and the resource and time of one of its records.
#[derive(Deserialize)]
pub struct RequestQuery {
    id: String,
    #[serde(default)]
    resource: String,
    at: i64,
}

#[derive(Template)]
#[template(path = "console/request.html")]
struct RequestPage {
    frame: Frame,
    id: String,
    records: Vec<RecordRow>,
}

/// `GET /audit/request`: every record of one request that this node holds, in the order it passed the nodes.
pub async fn request(
    State(c): State<Console>,
    Auditing(s): Auditing,
    Query(q): Query<RequestQuery>,
) -> Result<Html<String>, Failure> {
    let lang = s.lang;
    if q.id.is_empty() || q.id.len() > 128 || q.resource.len() > 256 {
        let e = crate::error::Error::InvalidArgument(
            "id: a request id of at most 128 characters is required, resource at most 256".into(),
        );
        return Err(c.invalid(&s, "GET /audit/request", e).await);
    }
    let offset = c.inner.router.governance().calendar().utc_offset();
    let mut records = Vec::new();
    let mut after = None;
    // Records of the request lie within the window around the one the auditor came from.
    loop {
        let page = c
            .inner
            .store
            .audit_query(&AuditQuery {
                resource_id: (!q.resource.is_empty()).then(|| q.resource.clone()),
                from_ns: Some(q.at.saturating_sub(ROUTE_WINDOW_NS)),
                to_ns: Some(q.at.saturating_add(ROUTE_WINDOW_NS)),
                after_fwd_seq: after,
                limit: 1000,
                ..Default::default()
            })
            .await
            .map_err(|e| Failure::of(e.into(), lang))?;
        let full = page.len() == 1000;
        after = page.last().map(|(seq, _)| *seq);
        records.extend(
            page.iter()
                .filter(|(_, r)| r.request_id == q.id)
                .map(|(_, r)| row(r, offset)),
        );
        if !full || records.len() >= 1000 {
            break;
        }
    }
    records.sort_by_key(|r| r.time_ns);
    let page = RequestPage {
        frame: Frame::of(&s, c.inner.node.as_str(), "/audit"),
        id: q.id,
        records,
    };
    render(&page, lang)
}
