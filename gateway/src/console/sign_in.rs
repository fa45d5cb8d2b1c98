//! Signing in and out, the language switch and the user's own account page.

use askama::Template;
use axum::Form;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use fedgate_proto::v1::{AuditOperation, ConsoleRole};
use serde::Deserialize;

use super::Console;
use super::accounts::SignInRefused;
use super::i18n::Lang;
use super::session::{LANG_COOKIE, Signed};
use super::view::{Failure, Frame, render};
use crate::accept::Remote;
use crate::audit;
use crate::governance::USER_URI_PREFIX;

/// Client addresses whose sign-in rate is tracked before those that are idle again are dropped.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// Name of the cookie holding the sign-in form's CSRF token (there is no session yet).
const PRE_COOKIE: &str = "__Host-fedgate-pre";

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage<'a> {
    lang: Lang,
    node: &'a str,
    csrf: &'a str,
    error: Option<&'static str>,
    login: &'a str,
}

/// `/`: the home page of the user's role.
pub async fn home(s: Signed) -> Redirect {
    Redirect::to(
        match ConsoleRole::try_from(s.user.role).unwrap_or_default() {
            ConsoleRole::Operator => "/federation",
            ConsoleRole::Auditor => "/audit",
            _ => "/review",
        },
    )
}

fn login_page(
    c: &Console,
    jar: CookieJar,
    lang: Lang,
    (error, login): (Option<&'static str>, &str),
    status: StatusCode,
) -> Response {
    let token = hex::encode(rand::random::<[u8; 32]>());
    let jar = jar.add(
        Cookie::build((PRE_COOKIE, token.clone()))
            .secure(true)
            .http_only(true)
            .same_site(SameSite::Strict)
            .path("/")
            .build(),
    );
    let node = c.inner.node.to_string();
    let page = LoginPage {
        lang,
        node: &node,
        csrf: &token,
        error,
        login,
    };
    match render(&page, lang) {
        Ok(html) => (status, jar, html).into_response(),
        Err(f) => f.into_response(),
    }
}

/// `GET /login`.
pub async fn form(State(c): State<Console>, jar: CookieJar, lang: Lang) -> Response {
    login_page(&c, jar, lang, (None, ""), StatusCode::OK)
}

/// The sign-in form.
#[derive(Deserialize)]
pub struct SignInForm {
    login: String,
    password: String,
    #[serde(default)]
    code: String,
    csrf: String,
}

/// `POST /login`: checks the form's token, the client's rate, then the account; every outcome is audited.
pub async fn submit(
    State(c): State<Console>,
    ConnectInfo(Remote(remote)): ConnectInfo<Remote>,
    jar: CookieJar,
    lang: Lang,
    Form(f): Form<SignInForm>,
) -> Response {
    let login = crate::limits::excerpt(&f.login);
    let actor = format!("{USER_URI_PREFIX}{login}");
    if c.inner.sign_ins.len() > MAX_TRACKED_ADDRESSES {
        // Addresses whose budget is full again are forgotten, so that many sources cannot grow the table.
        c.inner.sign_ins.retain_recent();
        c.inner.sign_ins.shrink_to_fit();
    }
    // The rate first: what is refused beyond it is summarised per source, not written a record each.
    if c.inner.sign_ins.check_key(&remote.ip()).is_err() {
        let message = format!(
            "sign-in as {login}: more than {} attempts a minute from {}",
            c.inner.config.sign_ins_per_minute,
            remote.ip()
        );
        c.inner.refusals.note(crate::refusals::Refusal {
            kind: crate::refusals::RefusalKind::Call,
            actor: format!("tcp:{}", crate::accept::SourceKey::of(remote.ip())),
            reason: "console_sign_in_rate",
            detail: message.clone(),
            consumer_uscc: String::new(),
        });
        return Failure::new(StatusCode::TOO_MANY_REQUESTS, message, lang).into_response();
    }
    let expected = jar.get(PRE_COOKIE).map(|c| c.value().to_owned());
    if f.csrf.len() != 64 || !expected.is_some_and(|e| super::session::same_token(&f.csrf, &e)) {
        let message = "sign-in: the form's CSRF token does not match its cookie";
        c.refused(actor, message).await;
        return Failure::new(StatusCode::FORBIDDEN, message, lang).into_response();
    }
    let outcome = match c
        .inner
        .accounts
        .sign_in(&f.login, &f.password, &f.code)
        .await
    {
        Ok(o) => o,
        Err(e) => return Failure::of(e, lang).into_response(),
    };
    let mut r = audit::event(AuditOperation::ConsoleSignIn, actor);
    r.detail = format!("from {}", remote.ip());
    match outcome {
        Ok(user) => {
            r.provider_uscc = user.agency_uscc.clone();
            r.detail = format!("{} from {}", user.name, remote.ip());
            let cookie = match c.start_session(&user).await {
                Ok(cookie) => cookie,
                Err(e) => return Failure::of(e, lang).into_response(),
            };
            if let Err(e) = c.inner.audit.record(r).await {
                return Failure::of(
                    crate::error::Error::Unavailable(format!("audit: {e}")),
                    lang,
                )
                .into_response();
            }
            let jar = jar.remove(Cookie::build(PRE_COOKIE).path("/")).add(cookie);
            (jar, Redirect::to("/")).into_response()
        }
        Err(refused) => {
            r.outcome = audit::outcome(tonic::Code::Unauthenticated);
            r.detail = format!("{refused}, from {}", remote.ip());
            if let Err(e) = c.inner.audit.record(r).await {
                tracing::error!(error = %e, "refused sign-in not audited");
            }
            let shown = match refused {
                SignInRefused::Locked { .. } => "locked",
                SignInRefused::Disabled => "disabled",
                SignInRefused::WrongCode => "bad_code",
                _ => "bad_sign_in",
            };
            login_page(
                &c,
                jar,
                lang,
                (Some(shown), &login),
                StatusCode::UNAUTHORIZED,
            )
        }
    }
}

/// A form that carries only its CSRF token.
#[derive(Deserialize)]
pub struct TokenForm {
    csrf: String,
}

/// `POST /logout`.
pub async fn sign_out(
    State(c): State<Console>,
    s: Signed,
    jar: CookieJar,
    Form(f): Form<TokenForm>,
) -> Result<Response, Failure> {
    s.check_form(&c, &f.csrf, "sign-out").await?;
    c.end_session(&s)
        .await
        .map_err(|e| Failure::of(e, s.lang))?;
    let mut r = audit::event(AuditOperation::ConsoleSignOut, s.actor());
    r.detail = format!("{} signed out", s.user.name);
    c.inner.audit.record(r).await.map_err(|e| {
        Failure::of(
            crate::error::Error::Unavailable(format!("audit: {e}")),
            s.lang,
        )
    })?;
    let jar = jar.remove(Cookie::build(super::session::SESSION_COOKIE).path("/"));
    Ok((jar, Redirect::to("/login")).into_response())
}

/// The language switch's query.
#[derive(Deserialize)]
pub struct LangQuery {
    to: String,
}

/// `GET /lang?to=en|zh`: remembers the choice and goes home (never to a caller-given address).
pub async fn language(jar: CookieJar, Query(q): Query<LangQuery>) -> impl IntoResponse {
    let lang = Lang::from_cookie(Some(q.to.as_str()));
    let jar = jar.add(
        Cookie::build((LANG_COOKIE, lang.code()))
            .secure(true)
            .same_site(SameSite::Strict)
            .path("/")
            .max_age(time::Duration::days(365))
            .build(),
    );
    (jar, Redirect::to("/"))
}

#[derive(Template)]
#[template(path = "console/account.html")]
struct AccountPage<'a> {
    frame: Frame,
    saved: bool,
    error: Option<&'a str>,
}

/// The account page's query.
#[derive(Deserialize, Default)]
pub struct AccountQuery {
    #[serde(default)]
    saved: bool,
}

/// `GET /account`.
pub async fn account(
    State(c): State<Console>,
    s: Signed,
    Query(q): Query<AccountQuery>,
) -> Result<Html<String>, Failure> {
    let page = AccountPage {
        frame: Frame::of(&s, c.inner.node.as_str(), "/account"),
        saved: q.saved,
        error: None,
    };
    render(&page, s.lang)
}

/// The password form.
#[derive(Deserialize)]
pub struct PasswordForm {
    csrf: String,
    current: String,
    new: String,
}

/// `POST /account/password`.
pub async fn change_password(
    State(c): State<Console>,
    s: Signed,
    Form(f): Form<PasswordForm>,
) -> Result<Response, Failure> {
    s.check_form(&c, &f.csrf, "password change").await?;
    match c
        .inner
        .accounts
        .change_password(&s.user.login, &f.current, &f.new)
        .await
    {
        Ok(()) => {
            let mut r = audit::event(AuditOperation::ConsoleAccount, s.actor());
            r.detail = format!(
                "{} changed the password of console account {}",
                s.user.name, s.user.login
            );
            c.inner.audit.record(r).await.map_err(|e| {
                Failure::of(
                    crate::error::Error::Unavailable(format!("audit: {e}")),
                    s.lang,
                )
            })?;
            Ok(Redirect::to("/account?saved=true").into_response())
        }
        Err(e) => {
            let message = e.to_string();
            let page = AccountPage {
                frame: Frame::of(&s, c.inner.node.as_str(), "/account"),
                saved: false,
                error: Some(&message),
            };
            let status = Failure::of(e, s.lang).status;
            Ok((status, render(&page, s.lang)?).into_response())
        }
    }
}
