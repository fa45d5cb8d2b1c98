//! `fedgate.v1.Operator`: reports for the node's own operators, who call with the node's certificate.

use std::sync::Arc;

use fedgate_proto::v1::operator_server::Operator;
use fedgate_proto::v1::{
    AddUserRequest, ConsoleUserInfo, DisableUserRequest, ListUsersRequest, ListUsersResponse,
    ResetUserRequest, UserCredentials,
};
use fedgate_proto::v1::{
    AssignDemandRequest, Demand, GetDemandRequest, ListDemandsResponse, OperatorListDemandsRequest,
};
use fedgate_proto::v1::{
    AuditOperation, GovernanceReport, OperatorAuditRequest, QueryAuditResponse, ReportRequest,
    Stream, StreamStatus, UplinkStatusRequest, UplinkStatusResponse,
};
use fedgate_proto::v1::{ListOperationsRequest, ListOperationsResponse};
use tonic::{Request, Response, Status};

use super::{audit_query, caller};
use crate::audit::{self, AuditLog};
use crate::catalog::subtree_prefix;
use crate::error::Error;
use crate::governance::Governance;
use crate::governance::demand::{DemandListing, DemandReader};
use crate::ident::{DivisionCode, Peer, Uscc};
use crate::limits::{Bounded, LimitsConfig};
use crate::store::Store;
use crate::uplink::Uplink;

/// The audit records of `node`'s subtree that an operator's request (already within the limits) asks for: the
/// one query behind `Operator.QueryAudit` and the console's audit search.
pub async fn subtree_audit(
    node: DivisionCode,
    store: &dyn Store,
    r: &OperatorAuditRequest,
) -> crate::error::Result<QueryAuditResponse> {
    let party = if r.agency.is_empty() {
        None
    } else {
        Some(
            r.agency
                .parse::<Uscc>()
                .map_err(|e| Error::InvalidArgument(format!("agency: {e}")))?
                .to_string(),
        )
    };
    let node_prefix = if r.node_code.is_empty() {
        None
    } else {
        let code: DivisionCode = r
            .node_code
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("node_code: {e}")))?;
        if !node.contains(&code) {
            return Err(Error::InvalidArgument(format!(
                "node_code {code} is outside the subtree of node {node}"
            )));
        }
        Some(subtree_prefix(code))
    };
    let q = r.query.clone().unwrap_or_default();
    audit_query(store, &q, party, None, node_prefix).await
}

/// The Operator service of one node.
#[derive(Clone)]
pub struct OperatorService {
    node: DivisionCode,
    governance: Governance,
    store: Arc<dyn Store>,
    uplink: Option<Uplink>,
    audit: AuditLog,
    limits: LimitsConfig,
    accounts: Option<crate::console::Accounts>,
}

impl OperatorService {
    /// A service for `node`; `uplink` is `None` on the province.
    pub fn new(
        node: DivisionCode,
        governance: Governance,
        store: Arc<dyn Store>,
        uplink: Option<Uplink>,
        audit: AuditLog,
    ) -> Self {
        Self {
            node,
            governance,
            store,
            uplink,
            audit,
            limits: LimitsConfig::default(),
            accounts: None,
        }
    }

    /// The service managing the console accounts in `accounts`.
    pub fn with_accounts(mut self, accounts: crate::console::Accounts) -> Self {
        self.accounts = Some(accounts);
        self
    }

    fn accounts(&self) -> Result<&crate::console::Accounts, Status> {
        self.accounts.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!("node {} keeps no console accounts", self.node))
        })
    }

    /// The service with `limits` on what operators send instead of the defaults.
    pub fn with_limits(mut self, limits: LimitsConfig) -> Self {
        self.limits = limits;
        self
    }

    /// The operator, with a message within the limits; a refusal is audited.
    async fn admitted<T: Bounded>(&self, req: &Request<T>, rpc: &str) -> Result<(), Status> {
        self.operator(req, rpc).await?;
        if let Err(e) = req.get_ref().check_limits(&self.limits) {
            let r = crate::limits::refusal(
                Peer::Node(self.node).to_uri(),
                &format!("Operator.{rpc}"),
                &e,
            );
            if let Err(err) = self.audit.record(r).await {
                tracing::error!(error = %err, "refusal not audited");
            }
            return Err(e.into());
        }
        Ok(())
    }

    async fn operator<T>(&self, req: &Request<T>, rpc: &str) -> Result<(), Status> {
        let (actor, err) = match caller(req) {
            Ok(Peer::Node(code)) if code == self.node => return Ok(()),
            Ok(other) => (
                other.to_uri(),
                Error::PermissionDenied(format!(
                    "{other} is not an operator of node {}: operators call with the node's own certificate",
                    self.node
                )),
            ),
            Err(e) => (String::new(), e),
        };
        let mut r = audit::event(AuditOperation::AuthRefused, actor);
        r.outcome = audit::outcome(err.code());
        r.detail = format!("Operator.{rpc}: {err}");
        if let Err(e) = self.audit.record(r).await {
            tracing::error!(error = %e, "refusal not audited");
        }
        Err(err.into())
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<GovernanceReport>, Status> {
        self.operator(&req, "Report").await?;
        let (overdue_applications, overdue_objections) = self.governance.overdue().await?;
        let (stale_entries, stale_count) = self.governance.stale_entries().await?;
        Ok(Response::new(GovernanceReport {
            overdue_applications,
            overdue_objections,
            stale_entries,
            generated_at: self.governance.clock().unix(),
            stale_count,
            overdue_demands: self.governance.overdue_demands().await?,
        }))
    }

    async fn uplink_status(
        &self,
        req: Request<UplinkStatusRequest>,
    ) -> Result<Response<UplinkStatusResponse>, Status> {
        self.operator(&req, "UplinkStatus").await?;
        let mut streams = Vec::new();
        if let Some(uplink) = &self.uplink {
            for stream in [Stream::Catalog, Stream::Audit] {
                let p = uplink
                    .progress(stream, self.store.as_ref())
                    .await
                    .map_err(Error::from)?;
                streams.push(StreamStatus {
                    stream: stream as i32,
                    head: p.head,
                    acked: p.acked,
                    lag: p.lag(),
                    connected: p.connected,
                });
            }
        }
        Ok(Response::new(UplinkStatusResponse {
            streams,
            audit_records: self.store.audit_count().await.map_err(Error::from)?,
        }))
    }

    async fn query_audit(
        &self,
        req: Request<OperatorAuditRequest>,
    ) -> Result<Response<QueryAuditResponse>, Status> {
        self.operator(&req, "QueryAudit").await?;
        if let Err(e) = req.get_ref().check_limits(&self.limits) {
            let r =
                crate::limits::refusal(Peer::Node(self.node).to_uri(), "Operator.QueryAudit", &e);
            if let Err(err) = self.audit.record(r).await {
                tracing::error!(error = %err, "refusal not audited");
            }
            return Err(e.into());
        }
        Ok(Response::new(
            subtree_audit(self.node, self.store.as_ref(), &req.into_inner()).await?,
        ))
    }

    async fn assign_demand(
        &self,
        req: Request<AssignDemandRequest>,
    ) -> Result<Response<Demand>, Status> {
        self.admitted(&req, "AssignDemand").await?;
        Ok(Response::new(
            self.governance
                .assign_demand(self.node, req.into_inner())
                .await?,
        ))
    }

    async fn list_demands(
        &self,
        req: Request<OperatorListDemandsRequest>,
    ) -> Result<Response<ListDemandsResponse>, Status> {
        self.admitted(&req, "ListDemands").await?;
        let r = req.into_inner();
        let agency = if r.agency.is_empty() {
            None
        } else {
            Some(
                r.agency
                    .parse::<Uscc>()
                    .map_err(|e| Error::InvalidArgument(format!("agency: {e}")))?,
            )
        };
        let listing = DemandListing::new(r.state, r.overdue_only, r.page_size, r.page_token)?;
        Ok(Response::new(
            self.governance
                .list_demands(&DemandReader::Operator(agency), listing)
                .await?,
        ))
    }

    async fn get_demand(&self, req: Request<GetDemandRequest>) -> Result<Response<Demand>, Status> {
        self.admitted(&req, "GetDemand").await?;
        Ok(Response::new(
            self.governance.demand(None, &req.get_ref().id).await?,
        ))
    }

    async fn list_operations(
        &self,
        req: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        self.admitted(&req, "ListOperations").await?;
        let page = crate::opmon::list_operations(self.store.as_ref(), req.get_ref()).await?;
        Ok(Response::new(page))
    }

    async fn add_user(
        &self,
        req: Request<AddUserRequest>,
    ) -> Result<Response<UserCredentials>, Status> {
        self.admitted(&req, "AddUser").await?;
        Ok(Response::new(
            self.accounts()?
                .add(req.into_inner(), &Peer::Node(self.node))
                .await?,
        ))
    }

    async fn disable_user(
        &self,
        req: Request<DisableUserRequest>,
    ) -> Result<Response<ConsoleUserInfo>, Status> {
        self.admitted(&req, "DisableUser").await?;
        Ok(Response::new(
            self.accounts()?
                .disable(&req.get_ref().login, &Peer::Node(self.node))
                .await?,
        ))
    }

    async fn reset_user(
        &self,
        req: Request<ResetUserRequest>,
    ) -> Result<Response<UserCredentials>, Status> {
        self.admitted(&req, "ResetUser").await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.accounts()?
                .reset(&r.login, r.totp, &Peer::Node(self.node))
                .await?,
        ))
    }

    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        self.admitted(&req, "ListUsers").await?;
        let users = self.accounts()?.list().await?;
        Ok(Response::new(ListUsersResponse {
            users: users.iter().map(crate::console::accounts::info).collect(),
        }))
    }
}
