//! A provider's revocation as every entry point runs it: recorded and audited here, subscriptions under the
//! grant woken to end, the signed notice relayed toward the grantee.

use super::Router;
use crate::error::Result;
use crate::governance::Acting;

impl Router {
    /// Revokes grant `grant_id` for `by`; answers the nodes the notice reached.
    pub async fn revoke(&self, by: &Acting, grant_id: &str, reason: &str) -> Result<Vec<String>> {
        let (checked, notice) = self.governance().revoke(by, grant_id, reason).await?;
        if let Ok(flowback) = self.flowback() {
            // Subscriptions under the grant end now, not at their next poll.
            flowback.wake();
        }
        self.downlink().relay_revocation(&checked, notice).await
    }
}
