//! The own view's periodic work: pending applications refreshed from their providers' nodes (a bounded number
//! at once), held grants checked against the revocations recorded here and against their expiry, and
//! revocations taken as they reach this node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedgate_proto::v1::{
    Application, ApplicationState, Envelope, GetApplicationRequest, Hop, RequestKind,
};
use futures::StreamExt;
use prost::Message;
use tokio::sync::{broadcast, watch};

use super::{GRANT_EXPIRY_TOLD, GRANT_HELD, HeldApplicationDoc, OwnView, decode};
use crate::assertion::Vouched;
use crate::error::{Error, Result};
use crate::governance::SCAN_PAGE;
use crate::ident::{DivisionCode, Peer, Uscc};
use crate::route::action;
use crate::store::{Doc, DocKind, DocQuery};

/// What one scan did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanReport {
    /// Pending applications asked of their providers' nodes.
    pub refreshed: usize,
    /// Of those, the ones whose refresh failed (kept as they were).
    pub failed: usize,
    /// Grants found revoked.
    pub revoked: usize,
    /// Expiry notices given.
    pub expiring: usize,
}

impl OwnView {
    /// Runs until `shutdown`: a scan every `refresh_ms`, and each revocation as it reaches this node.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut arrivals = Some(self.router.downlink().arrivals());
        let mut tick = tokio::time::interval(self.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let arrival = async {
                match arrivals.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => {
                    self.stopped.send_replace(true);
                    return;
                }
                r = arrival => match r {
                    Ok(revocation) => {
                        if let Err(e) = self.grant_revoked(&revocation).await {
                            tracing::warn!(grant = %revocation.grant_id, error = %e,
                                "held grant not marked revoked yet; the next scan does it");
                        }
                    }
                    // Missed some: the next scan finds them among the recorded revocations.
                    Err(broadcast::error::RecvError::Lagged(_)) => tick.reset_immediately(),
                    Err(broadcast::error::RecvError::Closed) => arrivals = None,
                },
                _ = tick.tick() => {
                    match self.scan().await {
                        Ok(r) if r != ScanReport::default() => tracing::debug!(?r, "own view scanned"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "own view scan failed"),
                    }
                }
            }
        }
    }

    /// Refreshes every pending held application and checks every held grant once.
    pub async fn scan(&self) -> Result<ScanReport> {
        let mut report = ScanReport::default();
        self.refresh_pending(&mut report).await?;
        self.check_grants(&mut report).await?;
        Ok(report)
    }

    async fn refresh_pending(&self, report: &mut ScanReport) -> Result<()> {
        let mut after = None;
        loop {
            let page = self
                .store
                .docs(
                    DocKind::HeldApplication,
                    &DocQuery {
                        state: Some(ApplicationState::Pending as i32),
                        after_id: after.take(),
                        limit: Some(SCAN_PAGE),
                        ..Default::default()
                    },
                )
                .await?;
            let full = page.len() >= SCAN_PAGE as usize;
            after = page.last().map(|d| d.id.clone());
            let results: Vec<(String, Result<()>)> = futures::stream::iter(page)
                .map(|d| async move { (d.id.clone(), self.refresh(&d).await) })
                .buffer_unordered(self.config.refresh_concurrency.max(1))
                .collect()
                .await;
            for (id, r) in results {
                report.refreshed += 1;
                if let Err(e) = r {
                    report.failed += 1;
                    tracing::debug!(application = %id, error = %e, "held application not refreshed");
                    self.refresh_failed(&id, &e).await?;
                }
            }
            if !full || after.is_none() {
                return Ok(());
            }
        }
    }

    /// Asks the provider's node for one held application with the routed GetApplication, vouching for the
    /// agency that filed it with the certificate it filed it with.
    async fn refresh(&self, doc: &Doc) -> Result<()> {
        let held: HeldApplicationDoc = decode("held application", &doc.body)?;
        let agency: Uscc = doc
            .consumer_uscc
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("held application {}: {e}", doc.id)))?;
        let target: DivisionCode = doc
            .id
            .split_once('-')
            .and_then(|(n, _)| n.parse().ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("application id {} names no node", doc.id))
            })?;
        let me = self.node;
        let request = GetApplicationRequest { id: doc.id.clone() }.encode_to_vec();
        let env = Envelope {
            request_id: uuid::Uuid::new_v4().to_string(),
            target_node: target.to_string(),
            consumer_uscc: agency.to_string(),
            consumer_node: me.to_string(),
            route: vec![Hop {
                node_code: me.to_string(),
                seen_peer: Peer::Agency(agency.clone()).to_uri(),
                action: action::RECEIVED.to_owned(),
                elapsed_us: 0,
            }],
            hops_left: self.router.limits().hop_limit,
            kind: RequestKind::GetApplication as i32,
            ..Default::default()
        };
        let certificate: Option<Arc<[u8]>> =
            (!held.agency_certificate.is_empty()).then(|| held.agency_certificate.into());
        let consumer = Vouched::local(&agency, me, "", certificate);
        let deadline =
            Instant::now() + Duration::from_millis(self.router.limits().default_timeout_ms);
        let out = self
            .router
            .originate(env, request, deadline, consumer)
            .await?;
        let app = Application::decode(out.response.as_slice()).map_err(|e| {
            Error::DataLoss(format!(
                "node {target} answered an undecodable application: {e}"
            ))
        })?;
        if app.id != doc.id {
            return Err(Error::DataLoss(format!(
                "node {target} answered application {} for {}",
                app.id, doc.id
            )));
        }
        self.application_seen(&agency, None, &app).await
    }

    async fn check_grants(&self, report: &mut ScanReport) -> Result<()> {
        let horizon = self.now().saturating_add(self.notice_period());
        for state in [GRANT_HELD, GRANT_EXPIRY_TOLD] {
            let mut after = None;
            loop {
                let page = self
                    .store
                    .docs(
                        DocKind::HeldGrant,
                        &DocQuery {
                            state: Some(state),
                            after_id: after.take(),
                            limit: Some(SCAN_PAGE),
                            ..Default::default()
                        },
                    )
                    .await?;
                let full = page.len() >= SCAN_PAGE as usize;
                after = page.last().map(|d| d.id.clone());
                for d in &page {
                    if self.router.governance().is_revoked(&d.id).await? {
                        let how = self.recorded_revocation(&d.id).await?;
                        let _one = self.changes.lock().await;
                        self.mark_revoked(&d.id, how).await?;
                        report.revoked += 1;
                    } else if state == GRANT_HELD && d.due_at <= horizon {
                        self.expiry_near(d).await?;
                        report.expiring += 1;
                    }
                }
                if !full || after.is_none() {
                    break;
                }
            }
        }
        Ok(())
    }
}
