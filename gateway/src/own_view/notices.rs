//! Notices to an agency: made once, numbered by one counter of the node, read after a sequence number or
//! watched as they come.

use std::time::Duration;

use fedgate_proto::v1::{ApplicationState, Notice, NoticeKind};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{OwnView, decode};
use crate::error::Result;
use crate::store::{Doc, DocKind, DocQuery};

/// How often a watcher reads again with nothing announced here (notices made by another replica of the node).
const WATCH_POLL: Duration = Duration::from_secs(1);
/// Notices a watcher reads at once.
const WATCH_PAGE: u32 = 100;

/// A notice to make.
#[derive(Debug, Clone)]
pub struct NoticeDraft {
    /// The agency told.
    pub agency: String,
    /// What it tells.
    pub kind: NoticeKind,
    /// The grant concerned.
    pub grant_id: String,
    /// The application concerned.
    pub application_id: String,
    /// The resource concerned.
    pub resource_id: String,
    /// The grant's expiry.
    pub expires_at: i64,
    /// The application's state.
    pub state: ApplicationState,
    /// A sentence for people.
    pub detail: String,
}

/// The document id of notice `seq`: fixed width, so that ids sort as sequence numbers do.
fn notice_id(seq: u64) -> String {
    format!("{seq:020}")
}

impl OwnView {
    /// Makes a notice and wakes the watchers.
    pub(super) async fn notify(&self, d: NoticeDraft) -> Result<()> {
        let seq = self.store.next_id("notice").await?;
        let notice = Notice {
            seq,
            kind: d.kind as i32,
            created_at: self.now(),
            grant_id: d.grant_id,
            application_id: d.application_id,
            resource_id: d.resource_id,
            expires_at: d.expires_at,
            state: d.state as i32,
            detail: crate::limits::clamp(&d.detail, 1024),
        };
        self.store
            .put_doc(&Doc {
                kind: DocKind::Notice,
                id: notice_id(seq),
                provider_uscc: String::new(),
                consumer_uscc: d.agency.clone(),
                state: d.kind as i32,
                due_at: 0,
                body: notice.encode_to_vec(),
            })
            .await?;
        tracing::debug!(agency = %d.agency, seq, kind = d.kind.as_str_name(), "notice made");
        self.latest.send_if_modified(|l| {
            let moved = seq > *l;
            *l = (*l).max(seq);
            moved
        });
        Ok(())
    }

    /// Notices of `agency` after `after`, oldest first, at most `limit`; and whether more follow.
    pub async fn notices(
        &self,
        agency: &str,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<Notice>, bool)> {
        let limit = limit.max(1);
        let docs = self
            .store
            .docs(
                DocKind::Notice,
                &DocQuery {
                    consumer_uscc: Some(agency.to_owned()),
                    after_id: Some(notice_id(after)),
                    limit: Some(limit + 1),
                    ..Default::default()
                },
            )
            .await?;
        let more = docs.len() > limit as usize;
        let notices = docs
            .iter()
            .take(limit as usize)
            .map(|d| decode::<Notice>("notice", &d.body))
            .collect::<Result<Vec<_>>>()?;
        Ok((notices, more))
    }

    /// Streams the notices of `agency` after `after`, then each new one, until the receiver goes away or the
    /// node stops (UNAVAILABLE, naming the sequence number to resume after).
    pub fn watch(&self, agency: String, mut after: u64) -> ReceiverStream<Result<Notice, Status>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let view = self.clone();
        let mut latest = self.latest.subscribe();
        let mut stopped = self.stopped.subscribe();
        tokio::spawn(async move {
            loop {
                latest.mark_unchanged();
                match view.notices(&agency, after, WATCH_PAGE).await {
                    Ok((page, more)) => {
                        for n in page {
                            after = n.seq;
                            if tx.send(Ok(n)).await.is_err() {
                                return;
                            }
                        }
                        if more {
                            continue;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
                let stopping = tokio::select! {
                    _ = tx.closed() => return,
                    r = stopped.wait_for(|s| *s) => r.is_ok(),
                    _ = latest.changed() => false,
                    _ = tokio::time::sleep(WATCH_POLL) => false,
                };
                if stopping {
                    let node = view.node;
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "node {node} is stopping; watch again after sequence number {after}"
                        ))))
                        .await;
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}
