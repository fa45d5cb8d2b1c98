//! The Agency service's demand calls (supply–demand matching): each travels to the province, which holds demands.

use std::time::Duration;

use fedgate_proto::v1::RequestKind;
use prost::Message;
use tonic::Status;

use super::AgencyService;
use crate::error::{Error, Result};
use crate::governance::demand::province_of;
use crate::ident::Uscc;

impl AgencyService {
    /// Sends a demand request of `kind` from agency `uscc` to the province and decodes its answer.
    pub(super) async fn to_province<M: Message + Default>(
        &self,
        uscc: &Uscc,
        kind: RequestKind,
        request: Vec<u8>,
    ) -> Result<M> {
        let province = province_of(self.topology.code);
        let deadline = std::time::Instant::now()
            + Duration::from_millis(self.router.limits().default_timeout_ms);
        let out = self
            .route_to(uscc, (kind, province, ""), None, request, deadline)
            .await?;
        M::decode(out.response.as_slice()).map_err(|e| {
            Error::Upstream(Status::internal(format!(
                "the province {province} answered an undecodable {}: {e}",
                kind.as_str_name()
            )))
        })
    }
}
