//! Listings of an agency's held applications and grants, a page at a time by id.

use fedgate_proto::v1::{ApplicationState, GrantStatus, HeldApplication, HeldGrant};

use super::{GRANT_REVOKED, HeldApplicationDoc, OwnView, decode};
use crate::error::Result;
use crate::governance::SCAN_PAGE;
use crate::store::{Doc, DocKind, DocQuery};

/// A page of a listing and the token of the next one (empty on the last page).
pub type Page<T> = (Vec<T>, String);

impl OwnView {
    /// Reads documents of `agency` after `after` in id order, keeping those `keep` maps to a value, until
    /// `limit` are kept or none are left.
    async fn page_of<T>(
        &self,
        (kind, agency, state): (DocKind, &str, Option<i32>),
        after: Option<String>,
        limit: u32,
        mut keep: impl FnMut(&Doc) -> Result<Option<T>>,
    ) -> Result<Page<T>> {
        let limit = limit.max(1) as usize;
        let mut out = Vec::new();
        let mut after = after;
        loop {
            let docs = self
                .store
                .docs(
                    kind,
                    &DocQuery {
                        consumer_uscc: Some(agency.to_owned()),
                        state,
                        after_id: after.clone(),
                        limit: Some(SCAN_PAGE),
                        ..Default::default()
                    },
                )
                .await?;
            let full = docs.len() >= SCAN_PAGE as usize;
            for d in &docs {
                after = Some(d.id.clone());
                if let Some(v) = keep(d)? {
                    out.push(v);
                    if out.len() == limit {
                        return Ok((out, d.id.clone()));
                    }
                }
            }
            if !full {
                return Ok((out, String::new()));
            }
        }
    }

    /// The applications `agency` filed through this node, in `state` (all when UNSPECIFIED).
    pub async fn applications(
        &self,
        agency: &str,
        state: ApplicationState,
        after: Option<String>,
        limit: u32,
    ) -> Result<Page<HeldApplication>> {
        let state = (state != ApplicationState::Unspecified).then_some(state as i32);
        let now = self.now();
        self.page_of(
            (DocKind::HeldApplication, agency, state),
            after,
            limit,
            |d| {
                let doc: HeldApplicationDoc = decode("held application", &d.body)?;
                Ok(doc.held.map(|mut h| {
                    if let Some(a) = h.application.as_mut() {
                        a.overdue = a.state == ApplicationState::Pending as i32
                            && a.due_at > 0
                            && now >= a.due_at;
                    }
                    h
                }))
            },
        )
        .await
    }

    /// The grants `agency` holds through this node, of `status` (all when UNSPECIFIED).
    pub async fn grants(
        &self,
        agency: &str,
        status: GrantStatus,
        after: Option<String>,
        limit: u32,
    ) -> Result<Page<HeldGrant>> {
        let state = (status == GrantStatus::Revoked).then_some(GRANT_REVOKED);
        self.page_of((DocKind::HeldGrant, agency, state), after, limit, |d| {
            let g = self.held_grant(d)?;
            Ok((status == GrantStatus::Unspecified || g.status == status as i32).then_some(g))
        })
        .await
    }
}
