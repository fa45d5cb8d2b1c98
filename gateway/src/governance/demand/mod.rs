//! Supply–demand matching (seed 004 供需对接) at the province: an agency files a demand for data no catalog entry
//! offers yet, the province's operator assigns it to a provider agency, and the provider answers it with an entry
//! it published (which the province finds in its catalog and links) or refuses with its reason. Each step has a
//! deadline in working days; closed demands never change; every step, refused or not, is audited here.

use fedgate_proto::v1::{
    AnswerDemandRequest, AssignDemandRequest, AuditOperation, AuditRecord, Demand, DemandState,
    DemandStep, FileDemandRequest, GetDemandRequest, ListDemandsRequest, RequestKind, ShareType,
};
use prost::Message;

use super::{Governance, SCAN_PAGE, decode, text};
use crate::assertion::Vouched;
use crate::audit;
use crate::catalog::parse_resource_id;
use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Level, Peer, Uscc};
use crate::limits::excerpt;
use crate::store::{Doc, DocKind, DocQuery};

mod view;

pub use view::{DEFAULT_DEMAND_PAGE, DemandListing, DemandReader};

fn state_name(state: i32) -> &'static str {
    DemandState::try_from(state)
        .unwrap_or_default()
        .as_str_name()
}

fn agency_uri(uscc: &str) -> String {
    format!("urn:fedgate:agency:{uscc}")
}

/// The requesting agency of a vouched caller: never the public.
fn agency_of(caller: &Vouched) -> Result<&str> {
    if caller.uscc().is_empty() {
        return Err(Error::PermissionDenied(
            "demands are filed and answered by agencies only".into(),
        ));
    }
    Ok(caller.uscc())
}

/// The province above `node` (or `node` itself): where demands are held.
pub fn province_of(node: DivisionCode) -> DivisionCode {
    let mut at = node;
    while let Some(up) = at.parent() {
        at = up;
    }
    at
}

impl Governance {
    /// Serves a demand request addressed to this node (the province): decodes it by its kind and runs it for the
    /// vouched `caller`; returns the encoded answer.
    pub async fn serve_demand(
        &self,
        kind: RequestKind,
        caller: &Vouched,
        request: &[u8],
    ) -> Result<Vec<u8>> {
        let bad = |what: &str, e: prost::DecodeError| {
            Error::InvalidArgument(format!("request: not an encoded {what}: {e}"))
        };
        Ok(match kind {
            RequestKind::FileDemand => {
                let req =
                    FileDemandRequest::decode(request).map_err(|e| bad("FileDemandRequest", e))?;
                self.file_demand(caller, req).await?.encode_to_vec()
            }
            RequestKind::GetDemand => {
                let req =
                    GetDemandRequest::decode(request).map_err(|e| bad("GetDemandRequest", e))?;
                self.demand(Some(caller), &req.id).await?.encode_to_vec()
            }
            RequestKind::ListDemands => {
                let req = ListDemandsRequest::decode(request)
                    .map_err(|e| bad("ListDemandsRequest", e))?;
                let listing =
                    DemandListing::new(req.state, req.overdue_only, req.page_size, req.page_token)?;
                self.list_demands(&DemandReader::Agency(caller.clone()), listing)
                    .await?
                    .encode_to_vec()
            }
            RequestKind::AnswerDemand => {
                let req = AnswerDemandRequest::decode(request)
                    .map_err(|e| bad("AnswerDemandRequest", e))?;
                self.answer_demand(caller, req).await?.encode_to_vec()
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a demand request",
                    other.as_str_name()
                )));
            }
        })
    }

    /// Refuses demand work at a node other than the province, which alone holds demands.
    fn holds_demands(&self) -> Result<()> {
        if self.node.level() != Level::Province {
            return Err(Error::FailedPrecondition(format!(
                "node {} holds no demands: demands are filed at and assigned by the province {}",
                self.node,
                province_of(self.node)
            )));
        }
        Ok(())
    }

    async fn save_demand(&self, d: &Demand) -> Result<()> {
        let due_at = match DemandState::try_from(d.state) {
            Ok(DemandState::Filed) => d.assign_due_at,
            Ok(DemandState::Assigned) => d.answer_due_at,
            _ => 0,
        };
        self.store
            .put_doc(&Doc {
                kind: DocKind::Demand,
                id: d.id.clone(),
                provider_uscc: d.provider_uscc.clone(),
                consumer_uscc: d.consumer_uscc.clone(),
                state: d.state,
                due_at,
                body: d.encode_to_vec(),
            })
            .await?;
        Ok(())
    }

    /// The demand stored under `id`, with its overdue flag as of now.
    async fn held_demand(&self, id: &str) -> Result<Demand> {
        self.holds_demands()?;
        let doc = self.held_doc(DocKind::Demand, id).await?;
        let mut d: Demand = decode("demand", &doc.body)?;
        d.overdue = self.demand_lateness(&d).is_some();
        Ok(d)
    }

    /// Writes the record of a demand step, its outcome taken from `result`.
    async fn record_demand_step(
        &self,
        mut record: AuditRecord,
        result: &Result<Demand>,
        detail: impl FnOnce(&Demand) -> String,
    ) -> Result<()> {
        match result {
            Ok(d) => {
                record.consumer_uscc = d.consumer_uscc.clone();
                record.consumer_node = d.consumer_node.clone();
                record.provider_uscc = d.provider_uscc.clone();
                record.resource_id = d.resource_id.clone();
                record.purpose = d.purpose.clone();
                record.detail = detail(d);
            }
            Err(e) => {
                record.outcome = audit::outcome(e.code());
                record.detail = if record.detail.is_empty() {
                    e.to_string()
                } else {
                    format!("{}: {e}", record.detail)
                };
            }
        }
        self.write(record).await
    }

    /// Files a demand for `caller`: checked, numbered, given its assignment deadline, stored, audited.
    pub async fn file_demand(&self, caller: &Vouched, req: FileDemandRequest) -> Result<Demand> {
        let mut record = audit::event(AuditOperation::DemandFiled, agency_uri(caller.uscc()));
        record.consumer_uscc = caller.uscc().to_owned();
        record.consumer_node = caller.node().to_string();
        record.purpose = req.purpose.clone();
        let result = self.file_demand_inner(caller, req).await;
        self.record_demand_step(record, &result, |d| {
            format!("demand {} filed: {}", d.id, d.title)
        })
        .await?;
        result
    }

    async fn file_demand_inner(&self, caller: &Vouched, req: FileDemandRequest) -> Result<Demand> {
        self.holds_demands()?;
        let uscc = agency_of(caller)?;
        text("title", &req.title, true)?;
        text("description", &req.description, true)?;
        text("purpose", &req.purpose, true)?;
        text("legal_basis", &req.legal_basis, true)?;
        if req.fields.is_empty() {
            return Err(Error::InvalidArgument(
                "fields: name at least one field wanted".into(),
            ));
        }
        for (i, f) in req.fields.iter().enumerate() {
            if f.trim().is_empty() {
                return Err(Error::InvalidArgument(format!("fields[{i}] is empty")));
            }
            if req.fields[..i].contains(f) {
                return Err(Error::InvalidArgument(format!(
                    "fields[{i}]: {:?} is named twice",
                    excerpt(f)
                )));
            }
        }
        let share_type = ShareType::try_from(req.share_type).map_err(|_| {
            Error::InvalidArgument(format!("share_type {} is unknown", req.share_type))
        })?;
        if share_type == ShareType::NotShared {
            return Err(Error::InvalidArgument(
                "share_type: a demand asks for data to be shared; NOT_SHARED cannot be wanted"
                    .into(),
            ));
        }
        let open = self.open_demands_of(uscc, caller.node()).await?;
        if open >= self.max_open_demands {
            return Err(Error::ResourceExhausted(format!(
                "agency {uscc} has {open} demands open at the province, the most allowed \
                 (limits.max_open_demands {}); wait for one to be answered",
                self.max_open_demands
            )));
        }
        let now = self.clock.now();
        let n = self.store.next_id("demand").await?;
        let assign_due_at = self
            .calendar
            .demand_assignment_deadline(now)
            .unix_timestamp();
        let d = Demand {
            id: format!("{}-d-{n}", self.node),
            consumer_uscc: uscc.to_owned(),
            consumer_node: caller.node().to_string(),
            title: req.title,
            description: req.description,
            purpose: req.purpose,
            legal_basis: req.legal_basis,
            fields: req.fields,
            share_type: share_type as i32,
            state: DemandState::Filed as i32,
            filed_at: now.unix_timestamp(),
            assign_due_at,
            history: vec![DemandStep {
                state: DemandState::Filed as i32,
                at: now.unix_timestamp(),
                actor: agency_uri(uscc),
                note: String::new(),
                due_at: assign_due_at,
            }],
            ..Default::default()
        };
        self.save_demand(&d).await?;
        Ok(d)
    }

    /// How many demands `uscc` at `node` has open (filed or assigned).
    async fn open_demands_of(&self, uscc: &str, node: DivisionCode) -> Result<usize> {
        let mut open = 0;
        for state in [DemandState::Filed, DemandState::Assigned] {
            let query = DocQuery {
                consumer_uscc: Some(uscc.to_owned()),
                state: Some(state as i32),
                ..Default::default()
            };
            self.each_doc_page(DocKind::Demand, query, SCAN_PAGE, |docs| {
                for d in docs {
                    let d: Demand = decode("demand", &d.body)?;
                    open += usize::from(d.consumer_node == node.as_str());
                }
                Ok(())
            })
            .await?;
        }
        Ok(open)
    }

    /// Assigns a filed demand to a provider agency, for the province's operator `operator` (this node, by its
    /// certificate): starts the answer deadline.
    pub async fn assign_demand(
        &self,
        operator: DivisionCode,
        req: AssignDemandRequest,
    ) -> Result<Demand> {
        let mut record = audit::event(
            AuditOperation::DemandAssigned,
            Peer::Node(operator).to_uri(),
        );
        record.provider_uscc = req.provider_uscc.clone();
        record.detail = format!("demand {}", excerpt(&req.demand_id));
        let result = self.assign_demand_inner(operator, req).await;
        self.record_demand_step(record, &result, |d| {
            format!(
                "demand {} assigned to {} at node {}, due {}",
                d.id, d.provider_uscc, d.provider_node, d.answer_due_at
            )
        })
        .await?;
        result
    }

    async fn assign_demand_inner(
        &self,
        operator: DivisionCode,
        req: AssignDemandRequest,
    ) -> Result<Demand> {
        self.holds_demands()?;
        text("note", &req.note, false)?;
        let provider: Uscc = req
            .provider_uscc
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("provider_uscc: {e}")))?;
        let node: DivisionCode = req
            .provider_node
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("provider_node: {e}")))?;
        if !self.node.contains(&node) {
            return Err(Error::InvalidArgument(format!(
                "provider_node {node} is outside the province {}",
                self.node
            )));
        }
        let mut d = self.held_demand(&req.demand_id).await?;
        if d.state != DemandState::Filed as i32 {
            return Err(Error::FailedPrecondition(format!(
                "demand {} is {}: only a FILED demand is assigned",
                d.id,
                state_name(d.state)
            )));
        }
        if provider.as_str() == d.consumer_uscc && node.as_str() == d.consumer_node {
            return Err(Error::InvalidArgument(format!(
                "demand {} was filed by {provider}; it is assigned to another agency to answer",
                d.id
            )));
        }
        let now = self.clock.now();
        d.state = DemandState::Assigned as i32;
        d.provider_uscc = provider.to_string();
        d.provider_node = node.to_string();
        d.assigned_at = now.unix_timestamp();
        d.answer_due_at = self.calendar.demand_answer_deadline(now).unix_timestamp();
        d.assignment_note = req.note.clone();
        d.history.push(DemandStep {
            state: d.state,
            at: d.assigned_at,
            actor: Peer::Node(operator).to_uri(),
            note: format!(
                "assigned to {provider} at node {node}{}",
                if req.note.is_empty() {
                    String::new()
                } else {
                    format!(": {}", req.note)
                }
            ),
            due_at: d.answer_due_at,
        });
        d.overdue = self.demand_lateness(&d).is_some();
        self.save_demand(&d).await?;
        Ok(d)
    }

    /// The assigned provider's answer: an entry it published that the province's catalog holds, or a refusal
    /// with its reason.
    pub async fn answer_demand(
        &self,
        caller: &Vouched,
        req: AnswerDemandRequest,
    ) -> Result<Demand> {
        let refusing = !req.refusal.trim().is_empty();
        let mut record = audit::event(
            if refusing {
                AuditOperation::DemandRefused
            } else {
                AuditOperation::DemandAnswered
            },
            agency_uri(caller.uscc()),
        );
        record.provider_uscc = caller.uscc().to_owned();
        record.resource_id = req.resource_id.clone();
        record.detail = format!("demand {}", excerpt(&req.demand_id));
        let result = self.answer_demand_inner(caller, req).await;
        self.record_demand_step(record, &result, |d| match DemandState::try_from(d.state) {
            Ok(DemandState::Refused) => format!("demand {} refused: {}", d.id, d.reason),
            _ => format!("demand {} answered with {}", d.id, d.resource_id),
        })
        .await?;
        result
    }

    async fn answer_demand_inner(
        &self,
        caller: &Vouched,
        req: AnswerDemandRequest,
    ) -> Result<Demand> {
        self.holds_demands()?;
        let uscc = agency_of(caller)?;
        let refusal = req.refusal.trim();
        match (req.resource_id.is_empty(), refusal.is_empty()) {
            (true, true) => {
                return Err(Error::InvalidArgument(
                    "answer with resource_id (an entry you published) or refuse with a refusal (its reason)"
                        .into(),
                ));
            }
            (false, false) => {
                return Err(Error::InvalidArgument(
                    "resource_id and refusal exclude each other: answer or refuse".into(),
                ));
            }
            _ => {}
        }
        text("refusal", &req.refusal, false)?;
        text("note", &req.note, false)?;
        let mut d = self.held_demand(&req.demand_id).await?;
        if d.provider_uscc != uscc || d.provider_node != caller.node().as_str() {
            return Err(Error::PermissionDenied(format!(
                "demand {} is answered only by the provider agency assigned to it; not by {} at node {}",
                d.id,
                excerpt(uscc),
                caller.node()
            )));
        }
        if d.state != DemandState::Assigned as i32 {
            return Err(Error::FailedPrecondition(format!(
                "demand {} is {}: only an ASSIGNED demand is answered",
                d.id,
                state_name(d.state)
            )));
        }
        let now = self.clock.unix();
        let note = if refusal.is_empty() {
            let rid = parse_resource_id("resource_id", &req.resource_id)?;
            let entry = self
                .store
                .entry(&rid.to_string())
                .await?
                .filter(|s| !s.withdrawn)
                .map(|s| s.entry)
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "resource {rid} is not in the catalog of the province {}: publish it at your node \
                         and answer once it has reached the province",
                        self.node
                    ))
                })?;
            if entry.provider_uscc != uscc || entry.node_code != caller.node().as_str() {
                return Err(Error::PermissionDenied(format!(
                    "resource {rid} is provided by agency {} at node {}; a demand is answered with an entry \
                     of the assigned provider's own",
                    entry.provider_uscc, entry.node_code
                )));
            }
            d.state = DemandState::Answered as i32;
            d.resource_id = entry.id.clone();
            d.entry = Some(entry.clone());
            d.reason = req.note.clone();
            if req.note.is_empty() {
                format!("answered with {}", entry.id)
            } else {
                format!("answered with {}: {}", entry.id, req.note)
            }
        } else {
            d.state = DemandState::Refused as i32;
            d.reason = refusal.to_owned();
            refusal.to_owned()
        };
        d.answered_at = now;
        d.history.push(DemandStep {
            state: d.state,
            at: now,
            actor: agency_uri(uscc),
            note,
            due_at: 0,
        });
        d.overdue = self.demand_lateness(&d).is_some();
        if d.overdue {
            tracing::warn!(demand = %d.id, "demand answered after its deadline");
        }
        // The entry is read from the catalog whenever the demand is: the stored demand keeps its id only.
        let entry = d.entry.take();
        self.save_demand(&d).await?;
        d.entry = entry;
        Ok(d)
    }
}

/// Whether `c` is the agency that filed `d` or the provider agency assigned to it, each through its own node.
fn is_party(d: &Demand, c: &Vouched) -> bool {
    let (uscc, node) = (c.uscc(), c.node());
    if uscc.is_empty() {
        return false;
    }
    (d.consumer_uscc == uscc && d.consumer_node == node.as_str())
        || (d.provider_uscc == uscc && d.provider_node == node.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_province_of_any_node_is_its_root() {
        let county: DivisionCode = "350203".parse().expect("code");
        let city: DivisionCode = "350200".parse().expect("code");
        let province: DivisionCode = "350000".parse().expect("code");
        assert_eq!(province_of(county), province);
        assert_eq!(province_of(city), province);
        assert_eq!(province_of(province), province);
    }
}
