//! The auditor's pages: audit search by agency, resource, time and outcome over the chains this node holds (its
//! own and its subtree's), the chains' verification, and one request's records at every node it passed.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Html;
use fedgate_proto::v1::{AuditOperation, AuditRecord};
use serde::Deserialize;

use super::Console;
use super::session::Auditing;
use super::view::{Failure, Frame, render};
use crate::ident::{DivisionCode, Uscc};
use crate::store::AuditQuery;

/// Records one page shows.
const PAGE: u32 = 100;
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
    next: Option<u64>,
    verified: Option<Result<Vec<ChainRow>, String>>,
}

/// Nanoseconds since the epoch at the start of local day `date` ("YYYY-MM-DD"), or `None` for an empty one.
fn day_start(date: &str, offset: time::UtcOffset, field: &str) -> Result<Option<i64>, String> {
    if date.is_empty() {
        return Ok(None);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(date, &format).map_err(|e| format!("{field} {date:?}: {e}"))?;
    let ns = day.midnight().assume_offset(offset).unix_timestamp_nanos();
    Ok(Some(i64::try_from(ns).unwrap_or(i64::MAX)))
}

/// `GET /audit`.
pub async fn search(
    State(c): State<Console>,
    Auditing(s): Auditing,
    Query(form): Query<AuditForm>,
) -> Result<Html<String>, Failure> {
    let lang = s.lang;
    let bad = |m: String| Failure::new(StatusCode::BAD_REQUEST, m, lang);
    let offset = c.inner.router.governance().calendar().utc_offset();
    let party = match form.agency.trim() {
        "" => None,
        a => Some(
            a.parse::<Uscc>()
                .map_err(|e| bad(format!("agency: {e}")))?
                .to_string(),
        ),
    };
    let node_prefix = match form.node.trim() {
        "" => None,
        n => {
            let code: DivisionCode = n.parse().map_err(|e| bad(format!("node: {e}")))?;
            Some(crate::catalog::subtree_prefix(code))
        }
    };
    let from_ns = day_start(&form.from, offset, "from").map_err(bad)?;
    let to_ns = day_start(&form.to, offset, "to")
        .map_err(bad)?
        .map(|t| t.saturating_add(24 * 3600 * 1_000_000_000));
    let after_fwd_seq = match form.after.as_str() {
        "" => None,
        a => Some(a.parse::<u64>().map_err(|e| bad(format!("after: {e}")))?),
    };
    let text = |v: &str, field: &str, max: usize| {
        let v = v.trim();
        if v.chars().count() > max {
            return Err(bad(format!("{field}: at most {max} characters")));
        }
        Ok((!v.is_empty()).then(|| v.to_owned()))
    };
    let query = AuditQuery {
        party,
        node_prefix,
        from_ns,
        to_ns,
        resource_id: text(&form.resource, "resource", 256)?,
        outcome: text(&form.outcome, "outcome", 64)?,
        after_fwd_seq,
        limit: PAGE,
        ..Default::default()
    };
    let found = c
        .inner
        .store
        .audit_query(&query)
        .await
        .map_err(|e| Failure::of(e.into(), lang))?;
    let next = (found.len() == PAGE as usize)
        .then(|| found.last().map(|(seq, _)| *seq))
        .flatten();
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
        records: found.iter().map(|(_, r)| row(r, offset)).collect(),
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
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "id: a request id of at most 128 characters is required",
            lang,
        ));
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
