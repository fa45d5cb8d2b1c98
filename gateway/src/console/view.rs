//! What every page shares: the frame around it (navigation by role, language switch, sign-out), rendering,
//! security headers, and the one place an error becomes an HTTP status and a page.

use askama::Template;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use fedgate_proto::v1::ConsoleRole;

use super::i18n::Lang;
use super::session::Signed;
use crate::error::Error;

/// The frame of a signed-in page.
pub struct Frame {
    /// The language of the page.
    pub lang: Lang,
    /// This node's code.
    pub node: String,
    /// Who is signed in, as shown.
    pub user: String,
    /// The user's role, as shown.
    pub role: &'static str,
    /// Navigation: path and text key, for the user's role.
    pub nav: Vec<(&'static str, &'static str)>,
    /// The path of the page shown (its navigation entry is marked).
    pub here: &'static str,
    /// The session's CSRF token, for the sign-out form and every other form.
    pub csrf: String,
}

impl Frame {
    /// The frame of `here` for `s`.
    pub fn of(s: &Signed, node: &str, here: &'static str) -> Self {
        let role = ConsoleRole::try_from(s.user.role).unwrap_or_default();
        let nav: Vec<(&'static str, &'static str)> = match role {
            ConsoleRole::Operator => vec![
                ("/federation", "federation"),
                ("/catalog", "catalog"),
                ("/reports", "reports"),
                ("/stats", "statistics"),
            ],
            ConsoleRole::Auditor => vec![("/audit", "audit")],
            ConsoleRole::Reviewer => vec![
                ("/review", "review"),
                ("/grants", "grants"),
                ("/objections", "objections"),
                ("/catalog", "catalog"),
            ],
            ConsoleRole::Unspecified => Vec::new(),
        };
        let role_key = match role {
            ConsoleRole::Operator => "role_operator",
            ConsoleRole::Auditor => "role_auditor",
            _ => "role_reviewer",
        };
        let user = if s.user.agency_uscc.is_empty() {
            format!("{} ({})", s.user.name, s.user.login)
        } else {
            format!(
                "{} ({}), {} {}",
                s.user.name,
                s.user.login,
                s.lang.tr("acting_for"),
                s.user.agency_uscc
            )
        };
        Self {
            lang: s.lang,
            node: node.to_owned(),
            user,
            role: s.lang.tr(role_key),
            nav,
            here,
            csrf: s.csrf.clone(),
        }
    }

    /// The text under `key` in the page's language.
    pub fn tr(&self, key: &str) -> &'static str {
        self.lang.tr(key)
    }
}

/// A refused or failed request, shown as a page with its status.
#[derive(Debug)]
pub struct Failure {
    /// The HTTP status.
    pub status: StatusCode,
    /// What was wrong, in words a user can act on.
    pub message: String,
    /// The language of the page.
    pub lang: Lang,
}

impl Failure {
    /// `status` with `message`.
    pub fn new(status: StatusCode, message: impl Into<String>, lang: Lang) -> Self {
        Self {
            status,
            message: message.into(),
            lang,
        }
    }

    /// The page for a node error: the status its gRPC code corresponds to.
    pub fn of(e: Error, lang: Lang) -> Self {
        let status = match e.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
            tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => StatusCode::CONFLICT,
            tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string(), lang)
    }
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage<'a> {
    lang: Lang,
    status: u16,
    message: &'a str,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let page = ErrorPage {
            lang: self.lang,
            status: self.status.as_u16(),
            message: &self.message,
        };
        match page.render() {
            Ok(html) => (self.status, Html(html)).into_response(),
            Err(_) => (self.status, self.message).into_response(),
        }
    }
}

/// A rendered page, or a failure to render it (a broken build, not a client's mistake).
pub fn render<T: Template>(page: &T, lang: Lang) -> Result<Html<String>, Failure> {
    page.render().map(Html).map_err(|e| {
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("page: {e}"),
            lang,
        )
    })
}

/// Headers of every answer: no caching, no framing, no sniffing, no referrer to other sites (a form post then
/// carries its own origin, which [`super::session`] checks), only this origin's resources.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=31536000; includeSubDomains",
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    res
}

/// The console's one stylesheet.
pub async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../templates/console/console.css"),
    )
}

/// Any other path.
pub async fn not_found(lang: Lang) -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "no such page", lang)
}

/// A time (seconds since the epoch) as the calendar's local date and time, for tables.
pub fn when(unix: i64, offset: time::UtcOffset) -> String {
    if unix <= 0 {
        return "—".into();
    }
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| t.to_offset(offset))
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| "—".into())
}

/// A share mode's name as pages show it (QUERY when none is given, as governance reads it).
pub fn mode_name(m: i32) -> &'static str {
    use fedgate_proto::v1::ShareMode;
    match ShareMode::try_from(m).unwrap_or_default() {
        ShareMode::Query | ShareMode::Unspecified => "QUERY",
        ShareMode::Verify => "VERIFY",
        ShareMode::Statistics => "STATISTICS",
        ShareMode::Bulk => "BULK",
    }
}

/// The query of a page about one document (`?id=…`).
#[derive(serde::Deserialize)]
pub struct IdQuery {
    /// The document's id.
    pub id: String,
}
