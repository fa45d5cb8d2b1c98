//! `fedgate.v1.Operator`: reports for the node's own operators, who call with the node's certificate.

use fedgate_proto::v1::operator_server::Operator;
use fedgate_proto::v1::{GovernanceReport, ReportRequest};
use tonic::{Request, Response, Status};

use super::caller;
use crate::error::Error;
use crate::governance::Governance;
use crate::ident::{DivisionCode, Peer};

/// The Operator service of one node.
#[derive(Clone)]
pub struct OperatorService {
    node: DivisionCode,
    governance: Governance,
}

impl OperatorService {
    /// A service for `node`.
    pub fn new(node: DivisionCode, governance: Governance) -> Self {
        Self { node, governance }
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<GovernanceReport>, Status> {
        match caller(&req)? {
            Peer::Node(code) if code == self.node => {}
            other => {
                return Err(Error::PermissionDenied(format!(
                    "{other} is not an operator of node {}: operators call with the node's own certificate",
                    self.node
                ))
                .into());
            }
        }
        let (overdue_applications, overdue_objections) = self.governance.overdue().await?;
        let stale_entries = self.governance.stale_entries().await?;
        Ok(Response::new(GovernanceReport {
            overdue_applications,
            overdue_objections,
            stale_entries,
            generated_at: self.governance.clock().unix(),
        }))
    }
}
