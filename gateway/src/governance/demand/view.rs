//! Reading demands at the province: one demand for its parties, listings a keyset page at a time, and the
//! overdue scans behind the report and the warnings.

use fedgate_proto::v1::{Demand, DemandState, ListDemandsResponse, OverdueDemand};

use super::{agency_of, is_party};
use crate::assertion::Vouched;
use crate::error::{Error, Result};
use crate::governance::{Governance, SCAN_PAGE, decode};
use crate::ident::Uscc;
use crate::limits::excerpt;
use crate::store::{Doc, DocKind, DocQuery};

/// Demands a listing page holds when the caller asks for no size.
pub const DEFAULT_DEMAND_PAGE: u32 = 50;

/// Who lists demands: an agency (its own and those assigned to it), or the province's operator (optionally
/// narrowed to one agency's).
#[derive(Debug, Clone)]
pub enum DemandReader {
    /// An agency, vouched for by its node.
    Agency(Vouched),
    /// The province's operator, optionally looking at one agency's demands only.
    Operator(Option<Uscc>),
}

/// Filters and page of a demand listing.
#[derive(Debug, Clone, Default)]
pub struct DemandListing {
    /// Only this state; `Unspecified` for all.
    pub state: DemandState,
    /// Only overdue demands.
    pub overdue_only: bool,
    /// Demands per page; 0 for [`DEFAULT_DEMAND_PAGE`].
    pub page_size: u32,
    /// The last id of the previous page; empty for the first.
    pub page_token: String,
}

impl DemandListing {
    /// A listing from a request's values; refuses a state that is not a demand state.
    pub fn new(state: i32, overdue_only: bool, page_size: u32, page_token: String) -> Result<Self> {
        Ok(Self {
            state: DemandState::try_from(state).map_err(|_| {
                Error::InvalidArgument(format!("state {state} is not a demand state"))
            })?,
            overdue_only,
            page_size,
            page_token,
        })
    }
}

impl Governance {
    /// Why a demand is or was late, and that step's deadline: the answer (given after, or still awaited past,
    /// its deadline), else the assignment.
    pub(super) fn demand_lateness(&self, d: &Demand) -> Option<(String, i64)> {
        let now = self.clock.unix();
        if d.assigned_at == 0 {
            return (d.assign_due_at > 0 && now >= d.assign_due_at).then(|| {
                (
                    format!(
                        "not assigned within {} working days of its filing",
                        self.calendar.demand_assignment_days()
                    ),
                    d.assign_due_at,
                )
            });
        }
        let answered = if d.answered_at > 0 {
            d.answered_at
        } else {
            now
        };
        if d.answer_due_at > 0 && answered >= d.answer_due_at {
            let reason = if d.answered_at > 0 {
                "answered after its deadline".to_owned()
            } else {
                format!(
                    "not answered within {} working days of its assignment",
                    self.calendar.demand_answer_days()
                )
            };
            return Some((reason, d.answer_due_at));
        }
        (d.assign_due_at > 0 && d.assigned_at >= d.assign_due_at)
            .then(|| ("assigned after its deadline".to_owned(), d.assign_due_at))
    }

    /// One demand with its history: for the agency that filed it (through its node), the provider agency it is
    /// assigned to (through its node), or — `caller` absent — the province's operator.
    pub async fn demand(&self, caller: Option<&Vouched>, id: &str) -> Result<Demand> {
        let mut d = self.held_demand(id).await?;
        if let Some(c) = caller
            && !is_party(&d, c)
        {
            return Err(Error::PermissionDenied(format!(
                "demand {id} is shown only to the agency that filed it, the provider agency assigned to it \
                 and the province's operator; not to {} at node {}",
                excerpt(c.uscc()),
                c.node()
            )));
        }
        if !d.resource_id.is_empty() {
            d.entry = self
                .store
                .entry(&d.resource_id)
                .await?
                .filter(|s| !s.withdrawn)
                .map(|s| s.entry);
        }
        Ok(d)
    }

    /// A page of demands for `reader`, in id order.
    pub async fn list_demands(
        &self,
        reader: &DemandReader,
        listing: DemandListing,
    ) -> Result<ListDemandsResponse> {
        self.holds_demands()?;
        let limit = match listing.page_size {
            0 => DEFAULT_DEMAND_PAGE,
            n => n,
        };
        let state = (listing.state != DemandState::Unspecified).then_some(listing.state as i32);
        let after_id = (!listing.page_token.is_empty()).then(|| listing.page_token.clone());
        let base = DocQuery {
            state,
            after_id,
            limit: Some(limit),
            ..Default::default()
        };
        let by = |consumer: bool, uscc: &str| DocQuery {
            consumer_uscc: consumer.then(|| uscc.to_owned()),
            provider_uscc: (!consumer).then(|| uscc.to_owned()),
            ..base.clone()
        };
        let queries = match reader {
            DemandReader::Agency(c) => {
                let uscc = agency_of(c)?;
                vec![by(true, uscc), by(false, uscc)]
            }
            DemandReader::Operator(Some(uscc)) => {
                vec![by(true, uscc.as_str()), by(false, uscc.as_str())]
            }
            DemandReader::Operator(None) => vec![base.clone()],
        };
        let mut seen = std::collections::BTreeMap::new();
        // Ids up to the last of the shortest-reaching full page are complete: each query holds every id up to
        // its own last one.
        let mut cutoff: Option<String> = None;
        for q in &queries {
            let docs = self.store.docs(DocKind::Demand, q).await?;
            if docs.len() >= limit as usize
                && let Some(last) = docs.last()
                && cutoff.as_ref().is_none_or(|c| last.id < *c)
            {
                cutoff = Some(last.id.clone());
            }
            for d in docs {
                seen.insert(d.id.clone(), d);
            }
        }
        let considered: Vec<Doc> = seen
            .into_values()
            .filter(|d| cutoff.as_ref().is_none_or(|c| d.id <= *c))
            .take(limit as usize)
            .collect();
        let next_page_token = match considered.last() {
            Some(last) if cutoff.is_some() || considered.len() >= limit as usize => last.id.clone(),
            _ => String::new(),
        };
        let mut demands = Vec::new();
        for doc in considered {
            let mut d: Demand = decode("demand", &doc.body)?;
            if let DemandReader::Agency(c) = reader
                && !is_party(&d, c)
            {
                continue;
            }
            d.overdue = self.demand_lateness(&d).is_some();
            if !listing.overdue_only || d.overdue {
                demands.push(d);
            }
        }
        Ok(ListDemandsResponse {
            demands,
            next_page_token,
        })
    }

    /// Every demand held here that is or was late — assigned or answered after its deadline, or still waiting
    /// past it — with the late step and its deadline, read a page at a time.
    pub async fn overdue_demands(&self) -> Result<Vec<OverdueDemand>> {
        let mut out = Vec::new();
        self.each_doc_page(DocKind::Demand, DocQuery::default(), SCAN_PAGE, |docs| {
            for doc in docs {
                let mut d: Demand = decode("demand", &doc.body)?;
                if let Some((reason, due_at)) = self.demand_lateness(&d) {
                    d.overdue = true;
                    out.push(OverdueDemand {
                        demand: Some(d),
                        reason,
                        due_at,
                    });
                }
            }
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// The demands still waiting for their assignment or answer past its deadline, `page` at a time: what the
    /// province warns about.
    pub async fn open_overdue_demands(&self, page: u32) -> Result<Vec<Demand>> {
        let now = Some(self.clock.unix().saturating_add(1));
        let mut out = Vec::new();
        for state in [DemandState::Filed, DemandState::Assigned] {
            let query = DocQuery {
                state: Some(state as i32),
                due_before: now,
                ..Default::default()
            };
            self.each_doc_page(DocKind::Demand, query, page, |docs| {
                for doc in docs {
                    let mut d: Demand = decode("demand", &doc.body)?;
                    d.overdue = true;
                    out.push(d);
                }
                Ok(())
            })
            .await?;
        }
        Ok(out)
    }
}
