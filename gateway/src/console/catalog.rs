//! The catalog as operators (the node's whole subtree) and reviewers (their own agency's entries) see it: a
//! search with the gRPC search's filters, and an entry's page with its fields, their masking, and the grants held.

use askama::Template;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Html;
use fedgate_proto::v1::{
    CatalogEntry, ConsoleRole, MaskRule, SearchCatalogRequest, Sensitivity, ShareType,
};
use serde::Deserialize;

use super::Console;
use super::session::{NoSession, Signed};
use super::view::{Failure, Frame, IdQuery, mode_name, render, when};
use crate::catalog::{finish_page, search_query};

/// Who may read the catalog here: an operator (everything this node holds) or a reviewer (its agency's).
pub struct CatalogViewer {
    signed: Signed,
    /// The agency a reviewer is limited to.
    only: Option<String>,
}

impl FromRequestParts<Console> for CatalogViewer {
    type Rejection = NoSession;

    async fn from_request_parts(parts: &mut Parts, c: &Console) -> Result<Self, Self::Rejection> {
        let signed = Signed::from_request_parts(parts, c).await?;
        match ConsoleRole::try_from(signed.user.role).unwrap_or_default() {
            ConsoleRole::Operator => Ok(Self { signed, only: None }),
            ConsoleRole::Reviewer => Ok(Self {
                only: Some(signed.user.agency_uscc.clone()),
                signed,
            }),
            _ => {
                let message = format!(
                    "{}: the catalog is for operators and reviewers, not {}",
                    parts.uri.path(),
                    super::accounts::role_name(signed.user.role)
                );
                c.refused(signed.actor(), &message).await;
                Err(NoSession::Refused(Failure::new(
                    StatusCode::FORBIDDEN,
                    message,
                    signed.lang,
                )))
            }
        }
    }
}

/// The search form.
#[derive(Deserialize, Default)]
pub struct SearchForm {
    #[serde(default)]
    text: String,
    #[serde(default)]
    provider: String,
    #[serde(default)]
    share_type: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    page: String,
}

/// One hit.
struct Hit {
    id: String,
    title: String,
    provider: String,
    share_type: &'static str,
    node: String,
}

#[derive(Template)]
#[template(path = "console/catalog.html")]
struct CatalogPage {
    frame: Frame,
    form: SearchForm,
    reviewer: bool,
    hits: Vec<Hit>,
    next: Option<String>,
}

fn share_type_name(t: i32) -> &'static str {
    match ShareType::try_from(t).unwrap_or_default() {
        ShareType::Unconditional => "UNCONDITIONAL",
        ShareType::Conditional => "CONDITIONAL",
        ShareType::NotShared => "NOT_SHARED",
        ShareType::Unspecified => "—",
    }
}

/// The store query a search form asks for, within the limits of `Agency.SearchCatalog`; a reviewer's is
/// limited to its agency.
fn search_of(
    c: &Console,
    v: &CatalogViewer,
    form: &SearchForm,
) -> crate::error::Result<crate::store::CatalogQuery> {
    let share_type = match form.share_type.as_str() {
        "" => ShareType::Unspecified,
        name => ShareType::from_str_name(&format!("SHARE_TYPE_{name}")).ok_or_else(|| {
            crate::error::Error::InvalidArgument(format!(
                "share type {:?} is unknown",
                crate::limits::excerpt(name)
            ))
        })?,
    };
    let req = SearchCatalogRequest {
        text: form.text.clone(),
        provider_uscc: v.only.clone().unwrap_or_else(|| form.provider.clone()),
        share_type: share_type as i32,
        node_code: form.node.clone(),
        page_size: 50,
        page_token: form.page.clone(),
        ..Default::default()
    };
    search_query(c.inner.node, &req, &c.inner.limits)
}

/// `GET /catalog`.
pub async fn search(
    State(c): State<Console>,
    v: CatalogViewer,
    Query(form): Query<SearchForm>,
) -> Result<Html<String>, Failure> {
    let lang = v.signed.lang;
    let query = match search_of(&c, &v, &form) {
        Ok(q) => q,
        Err(e) => return Err(c.invalid(&v.signed, "GET /catalog", e).await),
    };
    let found = c
        .inner
        .store
        .search(&query)
        .await
        .map_err(|e| Failure::of(e.into(), lang))?;
    let (entries, next) = finish_page(found, &query);
    let page = CatalogPage {
        frame: Frame::of(&v.signed, c.inner.node.as_str(), "/catalog"),
        reviewer: v.only.is_some(),
        hits: entries
            .into_iter()
            .map(|e| Hit {
                share_type: share_type_name(e.share_type),
                id: e.id,
                title: e.title,
                provider: e.provider_uscc,
                node: e.node_code,
            })
            .collect(),
        next: (!next.is_empty()).then_some(next),
        form,
    };
    render(&page, lang)
}

/// One field of an entry.
struct FieldRow {
    name: String,
    data_type: String,
    description: String,
    sensitivity: &'static str,
    mask: &'static str,
}

/// One grant for the entry.
struct HolderRow {
    id: String,
    consumer: String,
    node: String,
    mode: &'static str,
    fields: String,
    expires: String,
    revoked: bool,
}

#[derive(Template)]
#[template(path = "console/entry.html")]
struct EntryPage {
    frame: Frame,
    entry: CatalogEntry,
    share_type: &'static str,
    modes: String,
    fields: Vec<FieldRow>,
    holders: Vec<HolderRow>,
}

/// `GET /catalog/entry?id=…`.
pub async fn entry(
    State(c): State<Console>,
    v: CatalogViewer,
    Query(q): Query<IdQuery>,
) -> Result<Html<String>, Failure> {
    let lang = v.signed.lang;
    if let Err(e) = crate::catalog::parse_resource_id("id", &q.id) {
        return Err(c.invalid(&v.signed, "GET /catalog/entry", e).await);
    }
    let stored = c
        .inner
        .store
        .entry(&q.id)
        .await
        .map_err(|e| Failure::of(e.into(), lang))?
        .filter(|s| !s.withdrawn);
    let entry = match stored {
        Some(s) if v.only.as_deref().is_none_or(|a| a == s.entry.provider_uscc) => s.entry,
        Some(_) => {
            let message = format!("resource {} is not an entry of your agency", q.id);
            c.refused(v.signed.actor(), &message).await;
            return Err(Failure::new(StatusCode::FORBIDDEN, message, lang));
        }
        None => {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                format!(
                    "resource {} is not in the catalog of node {}",
                    q.id, c.inner.node
                ),
                lang,
            ));
        }
    };
    let g = c.inner.router.governance();
    let offset = g.calendar().utc_offset();
    let provider = entry
        .provider_uscc
        .parse::<crate::ident::Uscc>()
        .map_err(|e| {
            Failure::of(
                crate::error::Error::DataLoss(format!("entry {}: provider: {e}", entry.id)),
                lang,
            )
        })?;
    let holders = g
        .provided_grants(&provider)
        .await
        .map_err(|e| Failure::of(e, lang))?
        .into_iter()
        .filter(|(grant, _)| grant.resource_id == entry.id)
        .map(|(grant, revoked)| HolderRow {
            revoked,
            id: grant.id,
            consumer: grant.consumer_uscc,
            node: grant.consumer_node,
            mode: mode_name(grant.mode),
            fields: grant.fields.join(", "),
            expires: when(grant.expires_at, offset),
        })
        .collect();
    let fields = entry
        .fields
        .iter()
        .map(|f| FieldRow {
            name: f.name.clone(),
            data_type: f.data_type.clone(),
            description: f.description.clone(),
            sensitivity: match Sensitivity::try_from(f.sensitivity).unwrap_or_default() {
                Sensitivity::Public => "PUBLIC",
                Sensitivity::Internal => "INTERNAL",
                Sensitivity::Sensitive => "SENSITIVE",
                Sensitivity::Restricted => "RESTRICTED",
                Sensitivity::Unspecified => "—",
            },
            mask: match MaskRule::try_from(f.mask).unwrap_or_default() {
                MaskRule::IdNumber => "ID_NUMBER",
                MaskRule::Phone => "PHONE",
                MaskRule::Name => "NAME",
                MaskRule::Address => "ADDRESS",
                MaskRule::BankCard => "BANK_CARD",
                MaskRule::FreeText => "FREE_TEXT",
                MaskRule::None | MaskRule::Unspecified => "",
            },
        })
        .collect();
    let page = EntryPage {
        frame: Frame::of(&v.signed, c.inner.node.as_str(), "/catalog"),
        share_type: share_type_name(entry.share_type),
        modes: entry
            .share_modes
            .iter()
            .map(|m| mode_name(*m))
            .collect::<Vec<_>>()
            .join(", "),
        fields,
        holders,
        entry,
    };
    render(&page, lang)
}
