//! Console sessions and the proofs handed to pages: [`Signed`] (a live session of an enabled account) and, from
//! it, [`Operating`], [`Auditing`] or [`Reviewing`] (the role a page needs). Sessions live in the node's store
//! under the SHA-256 of their cookie; the cookie is `Secure`, `HttpOnly`, `SameSite=Strict`; every form carries
//! the session's CSRF token, and a form whose `Origin` is another site is refused before it is read.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use fedgate_proto::v1::{AuditOperation, ConsoleRole, ConsoleSession, ConsoleUser};
use prost::Message;
use sha2::{Digest, Sha256};

use super::Console;
use super::i18n::Lang;
use super::view::Failure;
use crate::audit;
use crate::error::Error;
use crate::governance::{Acting, USER_URI_PREFIX};
use crate::ident::Uscc;
use crate::store::{Doc, DocKind};

/// Name of the session cookie (`__Host-`: only over HTTPS, for this host, path `/`).
pub const SESSION_COOKIE: &str = "__Host-fedgate-session";
/// Name of the language cookie.
pub const LANG_COOKIE: &str = "fedgate-lang";

/// Whether a token a client sent is `expected`, compared in constant time.
pub(super) fn same_token(sent: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    sent.len() == expected.len() && bool::from(sent.as_bytes().ct_eq(expected.as_bytes()))
}

/// The SHA-256 (hex) of a session cookie: the session's id in the store.
fn session_id(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A signed-in user: the proof that a request comes with a live session of an enabled account.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The account.
    pub user: ConsoleUser,
    /// The session's CSRF token.
    pub csrf: String,
    /// The user's language.
    pub lang: Lang,
    id: String,
}

impl Signed {
    /// The audit record's actor for this user.
    pub fn actor(&self) -> String {
        format!("{USER_URI_PREFIX}{}", self.user.login)
    }

    /// Checks the CSRF token a form carried; a mismatch is refused and audited.
    pub async fn check_form(
        &self,
        console: &Console,
        token: &str,
        what: &str,
    ) -> Result<(), Failure> {
        if same_token(token, &self.csrf) {
            return Ok(());
        }
        let message = format!("{what}: the form's CSRF token does not belong to this session");
        console.refused(self.actor(), &message).await;
        Err(Failure::new(StatusCode::FORBIDDEN, message, self.lang))
    }
}

/// The proof that an operator is signed in.
#[derive(Debug, Clone)]
pub struct Operating(pub Signed);

/// The proof that an auditor is signed in.
#[derive(Debug, Clone)]
pub struct Auditing(pub Signed);

/// The proof that a reviewer of `agency` is signed in.
#[derive(Debug, Clone)]
pub struct Reviewing {
    /// The session.
    pub signed: Signed,
    /// The agency the reviewer acts for.
    pub agency: Uscc,
}

impl Reviewing {
    /// The reviewer as the acting party of a provider's decision.
    pub fn acting(&self) -> Acting {
        Acting::reviewer(
            self.agency.clone(),
            &self.signed.user.login,
            &self.signed.user.name,
        )
    }
}

/// Why a request has no session: a page is answered with the sign-in form, a form post is refused.
pub enum NoSession {
    /// Show the sign-in page.
    SignIn,
    /// Refused (and audited).
    Refused(Failure),
}

impl IntoResponse for NoSession {
    fn into_response(self) -> Response {
        match self {
            NoSession::SignIn => Redirect::to("/login").into_response(),
            NoSession::Refused(f) => f.into_response(),
        }
    }
}

impl Console {
    /// Refuses `e`, bad input of the signed-in user `s` to `what`, as the gRPC edge refuses a message: audited
    /// where it is refused, answered with the status its code maps to.
    pub(super) async fn invalid(&self, s: &Signed, what: &str, e: Error) -> Failure {
        let r = crate::limits::refusal(s.actor(), &format!("console {what}"), &e);
        if let Err(err) = self.inner.audit.record(r).await {
            tracing::error!(error = %err, "console refusal not audited");
        }
        Failure::of(e, s.lang)
    }

    /// Records a refused console request.
    pub(super) async fn refused(&self, actor: String, detail: &str) {
        let mut r = audit::event(AuditOperation::ConsoleRefused, actor);
        r.outcome = audit::outcome(tonic::Code::PermissionDenied);
        r.detail = crate::limits::excerpt(detail);
        if let Err(e) = self.inner.audit.record(r).await {
            tracing::error!(error = %e, "console refusal not audited");
        }
    }

    /// Starts a session for `user`; answers the cookie to set.
    pub(super) async fn start_session(&self, user: &ConsoleUser) -> Result<Cookie<'static>, Error> {
        let token = hex::encode(rand::random::<[u8; 32]>());
        let now = self.inner.clock.unix();
        let ttl = i64::try_from(self.inner.config.session_secs.max(1)).unwrap_or(i64::MAX);
        let session = ConsoleSession {
            login: user.login.clone(),
            generation: user.generation,
            created_at: now,
            expires_at: now.saturating_add(ttl),
            csrf_token: hex::encode(rand::random::<[u8; 32]>()),
            ended: false,
        };
        self.put_session(&session_id(&token), &session).await?;
        Ok(Cookie::build((SESSION_COOKIE, token))
            .secure(true)
            .http_only(true)
            .same_site(SameSite::Strict)
            .path("/")
            .max_age(time::Duration::seconds(ttl))
            .build())
    }

    async fn put_session(&self, id: &str, s: &ConsoleSession) -> Result<(), Error> {
        self.inner
            .store
            .put_doc(&Doc {
                kind: DocKind::ConsoleSession,
                id: id.to_owned(),
                provider_uscc: String::new(),
                consumer_uscc: s.login.clone(),
                state: i32::from(!s.ended),
                due_at: s.expires_at,
                body: s.encode_to_vec(),
            })
            .await?;
        Ok(())
    }

    /// Ends the session of `s`.
    pub(super) async fn end_session(&self, s: &Signed) -> Result<(), Error> {
        if let Some(doc) = self.inner.store.doc(DocKind::ConsoleSession, &s.id).await?
            && let Ok(mut session) = ConsoleSession::decode(doc.body.as_slice())
        {
            session.ended = true;
            self.put_session(&s.id, &session).await?;
        }
        Ok(())
    }

    /// The signed-in user of a request, if its session cookie names a live session of an enabled account.
    async fn session_of(&self, jar: &CookieJar, lang: Lang) -> Result<Option<Signed>, Error> {
        let Some(token) = jar.get(SESSION_COOKIE).map(|c| c.value().to_owned()) else {
            return Ok(None);
        };
        if token.len() != 64 {
            return Ok(None);
        }
        let id = session_id(&token);
        let Some(doc) = self.inner.store.doc(DocKind::ConsoleSession, &id).await? else {
            return Ok(None);
        };
        let Ok(session) = ConsoleSession::decode(doc.body.as_slice()) else {
            return Ok(None);
        };
        if session.ended {
            return Ok(None);
        }
        if session.expires_at <= self.inner.clock.unix() {
            let mut r = audit::event(
                AuditOperation::ConsoleSignOut,
                format!("{USER_URI_PREFIX}{}", session.login),
            );
            r.detail = "session expired".into();
            let mut ended = session.clone();
            ended.ended = true;
            self.put_session(&id, &ended).await?;
            if let Err(e) = self.inner.audit.record(r).await {
                tracing::error!(error = %e, "console session expiry not audited");
            }
            return Ok(None);
        }
        let Some(user) = self.inner.accounts.get(&session.login).await? else {
            return Ok(None);
        };
        if user.disabled || user.generation != session.generation {
            return Ok(None);
        }
        Ok(Some(Signed {
            user,
            csrf: session.csrf_token,
            lang,
            id,
        }))
    }
}

/// The host a request was addressed to, as its `Host` header (or HTTP/2 authority) names it.
fn host_of(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
}

/// Whether a state-changing request came from another site (its `Origin` names another host).
fn cross_site(parts: &Parts) -> bool {
    let Some(origin) = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    else {
        // Browsers send Origin on every cross-site form post; its absence is a same-site or non-browser client,
        // which still needs the session and the CSRF token.
        return false;
    };
    let Some(host) = host_of(parts) else {
        return true;
    };
    origin != format!("https://{host}")
}

impl FromRequestParts<Console> for Lang {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &Console) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        Ok(Lang::from_cookie(jar.get(LANG_COOKIE).map(|c| c.value())))
    }
}

impl FromRequestParts<Console> for Signed {
    type Rejection = NoSession;

    async fn from_request_parts(parts: &mut Parts, c: &Console) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        let lang = Lang::from_cookie(jar.get(LANG_COOKIE).map(|c| c.value()));
        let posting = parts.method != Method::GET && parts.method != Method::HEAD;
        if posting && cross_site(parts) {
            let message = format!("{}: a form posted from another site", parts.uri.path());
            c.refused("anonymous".into(), &message).await;
            return Err(NoSession::Refused(Failure::new(
                StatusCode::FORBIDDEN,
                message,
                lang,
            )));
        }
        match c.session_of(&jar, lang).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) if posting => {
                let message = format!("{}: not signed in, or the session ended", parts.uri.path());
                c.refused("anonymous".into(), &message).await;
                Err(NoSession::Refused(Failure::new(
                    StatusCode::FORBIDDEN,
                    message,
                    lang,
                )))
            }
            Ok(None) => Err(NoSession::SignIn),
            Err(e) => Err(NoSession::Refused(Failure::of(e, lang))),
        }
    }
}

/// The signed-in user if it has `role`; another role is refused and audited.
async fn with_role(parts: &mut Parts, c: &Console, role: ConsoleRole) -> Result<Signed, NoSession> {
    let s = Signed::from_request_parts(parts, c).await?;
    if s.user.role == role as i32 {
        return Ok(s);
    }
    let message = format!(
        "{}: this page is for the {} role, not {}",
        parts.uri.path(),
        super::accounts::role_name(role as i32),
        super::accounts::role_name(s.user.role)
    );
    c.refused(s.actor(), &message).await;
    Err(NoSession::Refused(Failure::new(
        StatusCode::FORBIDDEN,
        message,
        s.lang,
    )))
}

impl FromRequestParts<Console> for Operating {
    type Rejection = NoSession;

    async fn from_request_parts(parts: &mut Parts, c: &Console) -> Result<Self, Self::Rejection> {
        with_role(parts, c, ConsoleRole::Operator)
            .await
            .map(Operating)
    }
}

impl FromRequestParts<Console> for Auditing {
    type Rejection = NoSession;

    async fn from_request_parts(parts: &mut Parts, c: &Console) -> Result<Self, Self::Rejection> {
        with_role(parts, c, ConsoleRole::Auditor)
            .await
            .map(Auditing)
    }
}

impl FromRequestParts<Console> for Reviewing {
    type Rejection = NoSession;

    async fn from_request_parts(parts: &mut Parts, c: &Console) -> Result<Self, Self::Rejection> {
        let signed = with_role(parts, c, ConsoleRole::Reviewer).await?;
        let agency = signed.user.agency_uscc.parse::<Uscc>().map_err(|e| {
            NoSession::Refused(Failure::new(
                StatusCode::FORBIDDEN,
                format!("the account's agency is not valid: {e}"),
                signed.lang,
            ))
        })?;
        Ok(Reviewing { signed, agency })
    }
}
