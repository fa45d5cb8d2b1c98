//! A reviewer's work for its agency: the queue of applications with the working days left, the decision form
//! (approve narrowing fields, mode and expiry, or reject with a reason), grants with revocation, objections with
//! their resolution. Each action runs the same governance operation as the gRPC call, as the reviewer.

use askama::Template;
use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum_extra::extract::Form;
use fedgate_proto::v1::{
    Application, ApplicationState, DecideRequest, Grant, Objection, ObjectionState,
    ResolveObjectionRequest, RevokeRequest, ShareMode,
};
use serde::Deserialize;

use super::Console;
use super::i18n::Lang;
use super::session::Reviewing;
use super::view::{Failure, Frame, IdQuery, mode_name, render, when};
use crate::error::Error;
use crate::limits::Bounded;

/// An application as a row of the queue.
struct AppRow {
    id: String,
    consumer: String,
    node: String,
    resource: String,
    purpose: String,
    mode: &'static str,
    filed: String,
    due: String,
    days_left: i64,
    overdue: bool,
    state: &'static str,
}

fn state_name(s: i32) -> &'static str {
    match ApplicationState::try_from(s).unwrap_or_default() {
        ApplicationState::Pending => "PENDING",
        ApplicationState::Approved => "APPROVED",
        ApplicationState::Rejected => "REJECTED",
        ApplicationState::Unspecified => "—",
    }
}

impl Console {
    /// Working days from today until `due` (negative once it passed), on the node's calendar.
    fn working_days_left(&self, due: i64) -> i64 {
        let cal = self.inner.router.governance().calendar();
        let (Ok(now), Ok(due_at)) = (
            time::OffsetDateTime::from_unix_timestamp(self.inner.clock.unix()),
            // A deadline falls at the end of its last day: that day is the last one left.
            time::OffsetDateTime::from_unix_timestamp(due.saturating_sub(1)),
        ) else {
            return 0;
        };
        let (today, due_day) = (cal.local_date(now), cal.local_date(due_at));
        if due_day >= today {
            i64::from(cal.working_days_between(today, due_day))
        } else {
            -i64::from(cal.working_days_between(due_day, today))
        }
    }

    fn app_row(&self, a: &Application) -> AppRow {
        let offset = self.inner.router.governance().calendar().utc_offset();
        AppRow {
            id: a.id.clone(),
            consumer: a.consumer_uscc.clone(),
            node: a.consumer_node.clone(),
            resource: a.resource_id.clone(),
            purpose: a.purpose.clone(),
            mode: mode_name(a.mode),
            filed: when(a.filed_at, offset),
            due: when(a.due_at, offset),
            days_left: self.working_days_left(a.due_at),
            overdue: a.overdue,
            state: state_name(a.state),
        }
    }
}

#[derive(Template)]
#[template(path = "console/review.html")]
struct QueuePage {
    frame: Frame,
    pending: Vec<AppRow>,
    decided: Vec<AppRow>,
}

fn fail(lang: Lang) -> impl Fn(Error) -> Failure {
    move |e| Failure::of(e, lang)
}

/// `GET /review`: the agency's pending applications, most urgent first, and the latest decided.
pub async fn queue(State(c): State<Console>, r: Reviewing) -> Result<Html<String>, Failure> {
    let lang = r.signed.lang;
    let all = c
        .inner
        .router
        .governance()
        .provided_applications(&r.agency, ApplicationState::Unspecified)
        .await
        .map_err(fail(lang))?;
    let (pending, decided): (Vec<_>, Vec<_>) = all
        .iter()
        .partition(|a| a.state == ApplicationState::Pending as i32);
    let mut pending: Vec<AppRow> = pending.into_iter().map(|a| c.app_row(a)).collect();
    pending.sort_by_key(|a| a.days_left);
    let decided: Vec<AppRow> = decided
        .into_iter()
        .rev()
        .take(50)
        .map(|a| c.app_row(a))
        .collect();
    let page = QueuePage {
        frame: Frame::of(&r.signed, c.inner.node.as_str(), "/review"),
        pending,
        decided,
    };
    render(&page, lang)
}

#[derive(Template)]
#[template(path = "console/application.html")]
struct ApplicationPage {
    frame: Frame,
    app: AppRow,
    fields: Vec<String>,
    can_verify: bool,
    latest_expiry: String,
    pending: bool,
    reason: String,
    grant: Option<Grant>,
}

/// `GET /review/application?id=…`; another agency's application is refused and audited.
pub async fn application(
    State(c): State<Console>,
    r: Reviewing,
    Query(q): Query<IdQuery>,
) -> Result<Html<String>, Failure> {
    let lang = r.signed.lang;
    let bounded = fedgate_proto::v1::GetApplicationRequest { id: q.id.clone() };
    if let Err(e) = bounded.check_limits(&c.inner.limits) {
        return Err(c.invalid(&r.signed, "GET /review/application", e).await);
    }
    let a = match c
        .inner
        .router
        .governance()
        .provided_application(&r.agency, &q.id)
        .await
    {
        Ok(a) => a,
        Err(e @ Error::PermissionDenied(_)) => {
            c.refused(r.signed.actor(), &e.to_string()).await;
            return Err(Failure::of(e, lang));
        }
        Err(e) => return Err(Failure::of(e, lang)),
    };
    let expiry_day = time::OffsetDateTime::from_unix_timestamp(a.requested_expires_at)
        .ok()
        .map(|t| {
            let offset = c.inner.router.governance().calendar().utc_offset();
            t.to_offset(offset).date().to_string()
        })
        .unwrap_or_default();
    let grant = a
        .grant
        .as_ref()
        .and_then(|g| <Grant as prost::Message>::decode(g.grant.as_slice()).ok());
    let page = ApplicationPage {
        frame: Frame::of(&r.signed, c.inner.node.as_str(), "/review"),
        fields: a.fields.clone(),
        can_verify: a.mode == ShareMode::Query as i32,
        latest_expiry: expiry_day,
        pending: a.state == ApplicationState::Pending as i32,
        reason: a.reason.clone(),
        grant,
        app: c.app_row(&a),
    };
    render(&page, lang)
}

/// The decision form.
#[derive(Deserialize)]
pub struct DecideForm {
    csrf: String,
    id: String,
    decision: String,
    #[serde(default)]
    field: Vec<String>,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    expires: String,
    #[serde(default)]
    reason: String,
}

/// The end of local day `date` ("YYYY-MM-DD") on the node's calendar, seconds since the epoch; 0 for none.
fn end_of_day(c: &Console, date: &str) -> Result<i64, Error> {
    if date.is_empty() {
        return Ok(0);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(date, &format).map_err(|e| {
        Error::InvalidArgument(format!("expires {:?}: {e}", crate::limits::excerpt(date)))
    })?;
    let offset = c.inner.router.governance().calendar().utc_offset();
    Ok(day
        .with_time(time::Time::from_hms(23, 59, 59).unwrap_or(time::Time::MIDNIGHT))
        .assume_offset(offset)
        .unix_timestamp())
}

/// `POST /review/decide`.
pub async fn decide(
    State(c): State<Console>,
    r: Reviewing,
    Form(f): Form<DecideForm>,
) -> Result<Response, Failure> {
    let lang = r.signed.lang;
    r.signed.check_form(&c, &f.csrf, "decision").await?;
    let id = f.id.clone();
    let req = match decide_request(&c, f) {
        Ok(req) => req,
        Err(e) => return Err(c.invalid(&r.signed, "POST /review/decide", e).await),
    };
    c.inner
        .router
        .governance()
        .decide(&r.acting(), req)
        .await
        .map_err(fail(lang))?;
    let id = percent_encoding::utf8_percent_encode(&id, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("/review/application?id={id}")).into_response())
}

/// The decision a form asks for, within the limits of `Agency.Decide`.
fn decide_request(c: &Console, f: DecideForm) -> Result<DecideRequest, Error> {
    let approve = match f.decision.as_str() {
        "approve" => true,
        "reject" => false,
        other => {
            return Err(Error::InvalidArgument(format!(
                "decision {:?}: approve or reject",
                crate::limits::excerpt(other)
            )));
        }
    };
    let mode = match f.mode.as_str() {
        "" => ShareMode::Unspecified,
        other => ShareMode::from_str_name(&format!("SHARE_MODE_{other}")).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "mode {:?} is unknown",
                crate::limits::excerpt(other)
            ))
        })?,
    };
    let req = DecideRequest {
        application_id: f.id,
        approve,
        fields: if approve { f.field } else { Vec::new() },
        mode: if approve { mode as i32 } else { 0 },
        expires_at: if approve {
            end_of_day(c, &f.expires)?
        } else {
            0
        },
        reason: f.reason,
        ..Default::default()
    };
    req.check_limits(&c.inner.limits)?;
    Ok(req)
}

/// A grant as a row.
struct GrantRow {
    id: String,
    consumer: String,
    node: String,
    resource: String,
    mode: &'static str,
    fields: String,
    expires: String,
    revoked: bool,
    expired: bool,
}

#[derive(Template)]
#[template(path = "console/grants.html")]
struct GrantsPage {
    frame: Frame,
    grants: Vec<GrantRow>,
}

/// `GET /grants`: the grants issued for the agency's resources.
pub async fn grants(State(c): State<Console>, r: Reviewing) -> Result<Html<String>, Failure> {
    let lang = r.signed.lang;
    let offset = c.inner.router.governance().calendar().utc_offset();
    let now = c.inner.clock.unix();
    let grants = c
        .inner
        .router
        .governance()
        .provided_grants(&r.agency)
        .await
        .map_err(fail(lang))?
        .into_iter()
        .map(|(g, revoked)| GrantRow {
            expired: g.expires_at <= now,
            id: g.id,
            consumer: g.consumer_uscc,
            node: g.consumer_node,
            resource: g.resource_id,
            mode: mode_name(g.mode),
            fields: g.fields.join(", "),
            expires: when(g.expires_at, offset),
            revoked,
        })
        .collect();
    let page = GrantsPage {
        frame: Frame::of(&r.signed, c.inner.node.as_str(), "/grants"),
        grants,
    };
    render(&page, lang)
}

/// The revocation form.
#[derive(Deserialize)]
pub struct RevokeForm {
    csrf: String,
    id: String,
    reason: String,
}

/// `POST /grants/revoke`: the same revocation as `Agency.Revoke`, relayed toward the grantee.
pub async fn revoke(
    State(c): State<Console>,
    r: Reviewing,
    Form(f): Form<RevokeForm>,
) -> Result<Response, Failure> {
    let lang = r.signed.lang;
    r.signed.check_form(&c, &f.csrf, "revocation").await?;
    let req = RevokeRequest {
        grant_id: f.id,
        reason: f.reason,
    };
    if let Err(e) = req.check_limits(&c.inner.limits) {
        return Err(c.invalid(&r.signed, "POST /grants/revoke", e).await);
    }
    c.inner
        .router
        .revoke(&r.acting(), &req.grant_id, &req.reason)
        .await
        .map_err(fail(lang))?;
    Ok(Redirect::to("/grants").into_response())
}

/// An objection as a row.
struct ObjectionRow {
    id: String,
    consumer: String,
    resource: String,
    key: String,
    description: String,
    due: String,
    days_left: i64,
    overdue: bool,
    open: bool,
    resolution: String,
}

#[derive(Template)]
#[template(path = "console/objections.html")]
struct ObjectionsPage {
    frame: Frame,
    objections: Vec<ObjectionRow>,
}

/// `GET /objections`: objections about the agency's resources, open ones first.
pub async fn objections(State(c): State<Console>, r: Reviewing) -> Result<Html<String>, Failure> {
    let lang = r.signed.lang;
    let offset = c.inner.router.governance().calendar().utc_offset();
    let mut all: Vec<Objection> = c
        .inner
        .router
        .governance()
        .objections(r.agency.as_str(), ObjectionState::Unspecified, false)
        .await
        .map_err(fail(lang))?;
    all.sort_by_key(|o| (o.state != ObjectionState::Open as i32, o.due_at));
    let objections = all
        .into_iter()
        .map(|o| ObjectionRow {
            days_left: c.working_days_left(o.due_at),
            open: o.state == ObjectionState::Open as i32,
            due: when(o.due_at, offset),
            id: o.id,
            consumer: o.consumer_uscc,
            resource: o.resource_id,
            key: o.key,
            description: o.description,
            overdue: o.overdue,
            resolution: o.resolution,
        })
        .collect();
    let page = ObjectionsPage {
        frame: Frame::of(&r.signed, c.inner.node.as_str(), "/objections"),
        objections,
    };
    render(&page, lang)
}

/// The resolution form.
#[derive(Deserialize)]
pub struct ResolveForm {
    csrf: String,
    id: String,
    outcome: String,
    resolution: String,
}

/// `POST /objections/resolve`.
pub async fn resolve(
    State(c): State<Console>,
    r: Reviewing,
    Form(f): Form<ResolveForm>,
) -> Result<Response, Failure> {
    let lang = r.signed.lang;
    r.signed
        .check_form(&c, &f.csrf, "objection resolution")
        .await?;
    let req = ResolveObjectionRequest {
        objection_id: f.id,
        corrected: f.outcome == "corrected",
        resolution: f.resolution,
    };
    if let Err(e) = req.check_limits(&c.inner.limits) {
        return Err(c.invalid(&r.signed, "POST /objections/resolve", e).await);
    }
    c.inner
        .router
        .governance()
        .resolve_objection(&r.acting(), req)
        .await
        .map_err(fail(lang))?;
    Ok(Redirect::to("/objections").into_response())
}
