//! `Federation.Discover`: a child's catalog question answered here or asked further up.

use std::time::Instant;

use fedgate_proto::v1::{DiscoverRequest, DiscoverResponse, discover_request, discover_response};

use crate::catalog::discover::Discovery;
use crate::error::{Error, Result};

/// Answers an admitted question of a child.
pub(super) async fn answer(
    discovery: &Discovery<'_>,
    req: DiscoverRequest,
    deadline: Instant,
) -> Result<DiscoverResponse> {
    let route = req.route;
    match req.question {
        Some(discover_request::Question::Search(s)) => {
            let page = discovery.search(s, route, deadline).await?;
            Ok(DiscoverResponse {
                answered_by: page.answered_by.clone(),
                answer: Some(discover_response::Answer::Search(page)),
            })
        }
        Some(discover_request::Question::EntryId(id)) => {
            let (entry, by) = discovery.entry(&id, route, deadline).await?;
            Ok(DiscoverResponse {
                answered_by: by.to_string(),
                answer: Some(discover_response::Answer::Entry(entry)),
            })
        }
        None => Err(Error::InvalidArgument(
            "question is required: a search or an entry id".into(),
        )),
    }
}
