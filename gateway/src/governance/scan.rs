//! Scans over everything governance holds — stale catalog entries, overdue applications and objections, pending
//! revocations — read from the store a page at a time (keyset pages of at most [`SCAN_PAGE`] rows), so that a
//! periodic scan of a node holding a million entries keeps one page in memory, not the catalog.

use std::collections::HashMap;

use fedgate_proto::v1::{
    Application, ApplicationState, CatalogEntry, Objection, ObjectionState, RevocationNotice,
    StaleEntry,
};

use super::{Governance, REVOCATION_PENDING, decode};
use crate::error::Result;
use crate::store::{CatalogQuery, Doc, DocKind, DocQuery};

/// Rows a periodic scan reads at once.
pub const SCAN_PAGE: u32 = 256;

/// Stale entries an operator's report lists at most (it counts them all).
pub const REPORT_STALE_ENTRIES: usize = 1000;

/// Seconds a declared update frequency allows between updates; `None` for frequencies without a period.
pub fn update_period(frequency: &str) -> Option<i64> {
    let day = 24 * 3600;
    match frequency.trim().to_ascii_lowercase().as_str() {
        "realtime" | "real-time" | "hourly" | "daily" => Some(day),
        "weekly" => Some(7 * day),
        "monthly" => Some(31 * day),
        "quarterly" => Some(92 * day),
        "half-yearly" | "semiannual" => Some(183 * day),
        "yearly" | "annual" | "annually" => Some(366 * day),
        _ => None,
    }
}

/// An objection that led its provider to correct the data: what the stale scan needs of it.
struct Correction {
    id: String,
    resolved_at: i64,
}

impl Governance {
    /// Entries of this node's own catalog that are stale — not updated within their declared frequency, or not
    /// revised within the configured working days after an objection led their provider to correct the data —
    /// handed to `visit` a page at a time, in catalog order, reading at most `page` entries at once. Returns how
    /// many were stale.
    pub async fn scan_stale(
        &self,
        page: u32,
        mut visit: impl FnMut(Vec<StaleEntry>),
    ) -> Result<u64> {
        let page = page.max(1);
        let now = self.clock.unix();
        let corrections = self.corrections(page).await?;
        let mut after = None;
        let mut stale = 0u64;
        loop {
            let hits = self
                .store
                .search(&CatalogQuery {
                    node_prefix: Some(self.node.to_string()),
                    after,
                    limit: page,
                    ..Default::default()
                })
                .await?;
            let Some(last) = hits.last() else { break };
            after = Some(last.position);
            let full = hits.len() >= page as usize;
            let found: Vec<StaleEntry> = hits
                .into_iter()
                .filter_map(|hit| self.staleness(hit.entry, now, &corrections))
                .collect();
            stale += found.len() as u64;
            if !found.is_empty() {
                visit(found);
            }
            if !full {
                break;
            }
        }
        Ok(stale)
    }

    /// The stale entries of this node for an operator: the first [`REPORT_STALE_ENTRIES`] in catalog order, and
    /// how many there are in all.
    pub async fn stale_entries(&self) -> Result<(Vec<StaleEntry>, u64)> {
        let mut listed = Vec::new();
        let total = self
            .scan_stale(SCAN_PAGE, |found| {
                let room = REPORT_STALE_ENTRIES.saturating_sub(listed.len());
                listed.extend(found.into_iter().take(room));
            })
            .await?;
        Ok((listed, total))
    }

    /// Why `e` is stale at `now`, if it is.
    fn staleness(
        &self,
        e: CatalogEntry,
        now: i64,
        corrections: &HashMap<String, Vec<Correction>>,
    ) -> Option<StaleEntry> {
        let updated = time::OffsetDateTime::parse(
            &e.updated_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map(|t| t.unix_timestamp())
        .unwrap_or(0);
        if let Some(period) = update_period(&e.update_frequency) {
            let due = updated + period;
            if now >= due {
                return Some(StaleEntry {
                    reason: format!(
                        "not updated within its declared update frequency ({})",
                        e.update_frequency
                    ),
                    due_at: due,
                    entry: Some(e),
                });
            }
        }
        let corrected = corrections.get(&e.id).map_or(&[][..], Vec::as_slice);
        for o in corrected.iter().filter(|o| o.resolved_at > updated) {
            let at = time::OffsetDateTime::from_unix_timestamp(o.resolved_at)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let due = self.calendar.catalog_revision_deadline(at).unix_timestamp();
            if now >= due {
                return Some(StaleEntry {
                    reason: format!(
                        "data corrected after objection {} but the catalog entry was not revised within {} \
                         working days",
                        o.id,
                        self.calendar.catalog_revision_days()
                    ),
                    due_at: due,
                    entry: Some(e),
                });
            }
        }
        None
    }

    /// The objections that led to a correction, by resource, in id order.
    async fn corrections(&self, page: u32) -> Result<HashMap<String, Vec<Correction>>> {
        let mut out: HashMap<String, Vec<Correction>> = HashMap::new();
        let query = DocQuery {
            state: Some(ObjectionState::Corrected as i32),
            ..Default::default()
        };
        self.each_doc_page(DocKind::Objection, query, page, |docs| {
            for d in docs {
                let o: Objection = decode("objection", &d.body)?;
                out.entry(o.resource_id).or_default().push(Correction {
                    id: o.id,
                    resolved_at: o.resolved_at,
                });
            }
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Every application and objection at this node that is or was late (decided or resolved after its
    /// deadline, or still open past it), read a page at a time.
    pub async fn overdue(&self) -> Result<(Vec<Application>, Vec<Objection>)> {
        self.scan_overdue(DocQuery::default(), DocQuery::default(), SCAN_PAGE)
            .await
    }

    /// The applications still waiting for a decision and the objections still open past their deadlines, read a
    /// page of `page` at a time: what the node warns about.
    pub async fn open_overdue(&self, page: u32) -> Result<(Vec<Application>, Vec<Objection>)> {
        // Due before the next second: overdue from the instant of the deadline on.
        let now = Some(self.clock.unix().saturating_add(1));
        self.scan_overdue(
            DocQuery {
                state: Some(ApplicationState::Pending as i32),
                due_before: now,
                ..Default::default()
            },
            DocQuery {
                state: Some(ObjectionState::Open as i32),
                due_before: now,
                ..Default::default()
            },
            page,
        )
        .await
    }

    async fn scan_overdue(
        &self,
        applications: DocQuery,
        objections: DocQuery,
        page: u32,
    ) -> Result<(Vec<Application>, Vec<Objection>)> {
        let mut apps = Vec::new();
        self.each_doc_page(DocKind::Application, applications, page, |docs| {
            for d in docs {
                let mut a: Application = decode("application", &d.body)?;
                a.overdue = self.is_overdue(a.due_at, a.decided_at);
                if a.overdue {
                    apps.push(a);
                }
            }
            Ok(())
        })
        .await?;
        let mut late = Vec::new();
        self.each_doc_page(DocKind::Objection, objections, page, |docs| {
            for d in docs {
                let mut o: Objection = decode("objection", &d.body)?;
                o.overdue = self.is_overdue(o.due_at, o.resolved_at);
                if o.overdue {
                    late.push(o);
                }
            }
            Ok(())
        })
        .await?;
        Ok((apps, late))
    }

    /// Up to `limit` revocations this node recorded but has not yet handed to the next node toward their
    /// grantee, of grants whose ids sort after `after`, by grant id: the next page to deliver.
    pub async fn pending_revocations(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<(String, RevocationNotice)>> {
        self.store
            .docs(
                DocKind::Revocation,
                &DocQuery {
                    state: Some(REVOCATION_PENDING),
                    after_id: after,
                    limit: Some(limit.max(1)),
                    ..Default::default()
                },
            )
            .await?
            .into_iter()
            .map(|d| Ok((d.id, decode::<RevocationNotice>("revocation", &d.body)?)))
            .collect()
    }

    /// Reads the documents of `kind` matching `query` in id order, `page` at a time, handing each page to
    /// `visit`.
    pub(super) async fn each_doc_page(
        &self,
        kind: DocKind,
        mut query: DocQuery,
        page: u32,
        mut visit: impl FnMut(Vec<Doc>) -> Result<()>,
    ) -> Result<()> {
        let page = page.max(1);
        query.limit = Some(page);
        loop {
            let docs = self.store.docs(kind, &query).await?;
            let full = docs.len() >= page as usize;
            let Some(last) = docs.last() else { break };
            query.after_id = Some(last.id.clone());
            visit(docs)?;
            if !full {
                break;
            }
        }
        Ok(())
    }
}
