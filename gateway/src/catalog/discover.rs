//! Discovery from anywhere: a catalog search or entry lookup that this node's subtree catalog does not cover is
//! asked of the parent (`Federation.Discover`), which answers from its own subtree catalog when that covers it
//! and otherwise asks its own parent; the province covers every question.
//!
//! A node covers a search when it has no parent, or when the search's `node_code` names a node of its subtree;
//! it covers an entry when it has no parent or the entry's node is in its subtree. The same question therefore
//! always reaches the same node, whose page tokens pass back unchanged. Nothing is kept for it: a node holds only
//! its subtree's catalog, as before.

use std::time::{Duration, Instant};

use fedgate_proto::v1::federation_client::FederationClient;
use fedgate_proto::v1::{
    CatalogEntry, DiscoverRequest, DiscoverResponse, GetEntryRequest, SearchCatalogRequest,
    SearchCatalogResponse, discover_request, discover_response,
};

use crate::config::RoutingConfig;
use crate::error::{Error, Result};
use crate::ident::DivisionCode;
use crate::limits::{Bounded, LimitsConfig, count, excerpt, ident, limit};
use crate::store::Store;
use crate::topology::Topology;

use super::{finish_page, parse_resource_id, search_query};

/// What discovery needs of a node, borrowed from the service that asks.
pub struct Discovery<'a> {
    /// Where this node sits.
    pub topology: &'a Topology,
    /// Its store (its subtree catalog).
    pub store: &'a dyn Store,
    /// Input limits, applied to every question as the agency call applies them.
    pub limits: &'a LimitsConfig,
    /// Hop limit, default timeout and per-hop margin.
    pub routing: &'a RoutingConfig,
}

impl Bounded for DiscoverRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        match &self.question {
            Some(discover_request::Question::Search(s)) => {
                s.check_limits(l).map_err(|e| e.within("search"))?
            }
            Some(discover_request::Question::EntryId(id)) => GetEntryRequest { id: id.clone() }
                .check_limits(l)
                .map_err(|e| e.within("entry_id"))?,
            None => {}
        }
        count("route", self.route.len(), limit!(l, max_route_hops))?;
        for (i, n) in self.route.iter().enumerate() {
            ident(format_args!("route[{i}]"), n, limit!(l, max_id_chars))?;
        }
        Ok(())
    }
}

/// The province of `node`: the top of its tree.
fn province_of(node: DivisionCode) -> DivisionCode {
    let mut top = node;
    while let Some(p) = top.parent() {
        top = p;
    }
    top
}

impl Discovery<'_> {
    fn me(&self) -> DivisionCode {
        self.topology.code
    }

    /// Whether this node answers `req` from its own subtree catalog.
    fn covers_search(&self, req: &SearchCatalogRequest) -> Result<bool> {
        if self.topology.parent.is_none() {
            return Ok(true);
        }
        if req.node_code.is_empty() {
            return Ok(false);
        }
        let filter: DivisionCode = req
            .node_code
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("node_code: {e}")))?;
        Ok(self.me().contains(&filter))
    }

    /// Answers a search of an agency of this node's subtree (`route` holds the nodes that asked before this
    /// one): from this node's subtree catalog when it covers it, else from the parent's answer.
    pub async fn search(
        &self,
        req: SearchCatalogRequest,
        route: Vec<String>,
        deadline: Instant,
    ) -> Result<SearchCatalogResponse> {
        // Everything but the node that answers is checked here, before any hop: the same refusal wherever asked.
        search_query(province_of(self.me()), &req, self.limits)?;
        if self.covers_search(&req)? {
            let query = search_query(self.me(), &req, self.limits)?;
            let hits = self.store.search(&query).await?;
            let (entries, next_page_token) = finish_page(hits, &query);
            return Ok(SearchCatalogResponse {
                entries,
                next_page_token,
                answered_by: self.me().to_string(),
            });
        }
        let answer = self
            .ask_parent(discover_request::Question::Search(req), route, deadline)
            .await?;
        match answer.answer {
            Some(discover_response::Answer::Search(mut s)) => {
                s.answered_by = answer.answered_by;
                Ok(s)
            }
            _ => Err(self.odd_answer("a search")),
        }
    }

    /// Answers an entry lookup of an agency of this node's subtree: a live entry of this node's subtree catalog,
    /// or the parent's answer for an entry outside it; with the node that answered.
    pub async fn entry(
        &self,
        id: &str,
        route: Vec<String>,
        deadline: Instant,
    ) -> Result<(CatalogEntry, DivisionCode)> {
        let rid = parse_resource_id("id", id)?;
        let me = self.me();
        if self.topology.parent.is_none() || me.contains(&rid.node()) {
            if !me.contains(&rid.node()) {
                return Err(Error::NotFound(format!(
                    "resource {id} is held by node {}, outside the federation of node {me}",
                    rid.node()
                )));
            }
            return self
                .store
                .entry(id)
                .await?
                .filter(|s| !s.withdrawn)
                .map(|s| (s.entry, me))
                .ok_or_else(|| {
                    Error::NotFound(format!("resource {id} is not in the catalog of node {me}"))
                });
        }
        let answer = self
            .ask_parent(
                discover_request::Question::EntryId(rid.to_string()),
                route,
                deadline,
            )
            .await?;
        match answer.answer {
            Some(discover_response::Answer::Entry(e)) if e.id == rid.to_string() => {
                Ok((e, answer.answered_by.parse().unwrap_or(me)))
            }
            _ => Err(self.odd_answer("an entry lookup")),
        }
    }

    fn odd_answer(&self, what: &str) -> Error {
        let parent = self
            .topology
            .parent
            .as_ref()
            .map_or_else(String::new, |p| p.code.to_string());
        Error::DataLoss(format!(
            "parent node {parent} answered {what} with something else"
        ))
    }

    /// Checks a child's question before it is answered: the route names only nodes of the child's subtree and
    /// ends at the child, and a question is asked.
    pub fn admit(&self, child: DivisionCode, req: &DiscoverRequest) -> Result<()> {
        if req.question.is_none() {
            return Err(Error::InvalidArgument(
                "question is required: a search or an entry id".into(),
            ));
        }
        if req.route.last().map(String::as_str) != Some(child.as_str()) {
            return Err(Error::PermissionDenied(format!(
                "route ends at {:?} but the asking certificate is for node {child}",
                req.route.last().map(|n| excerpt(n)).unwrap_or_default()
            )));
        }
        for n in &req.route {
            let code: DivisionCode = n
                .parse()
                .map_err(|e| Error::InvalidArgument(format!("route: {e}")))?;
            if !child.contains(&code) {
                return Err(Error::PermissionDenied(format!(
                    "route names node {code}, outside the subtree of node {child} that asked"
                )));
            }
        }
        Ok(())
    }

    /// Asks the parent, within the hop limit and what is left of `deadline`.
    async fn ask_parent(
        &self,
        question: discover_request::Question,
        mut route: Vec<String>,
        deadline: Instant,
    ) -> Result<DiscoverResponse> {
        let me = self.me();
        let parent = self
            .topology
            .parent
            .as_ref()
            .ok_or_else(|| Error::NotFound(format!("node {me} has no parent to ask")))?;
        route.push(me.to_string());
        if route.len() > self.routing.hop_limit as usize {
            return Err(Error::FailedPrecondition(format!(
                "the catalog question reached the hop limit at node {me}"
            )));
        }
        if route.iter().any(|n| n == parent.code.as_str()) {
            return Err(Error::FailedPrecondition(format!(
                "the catalog question would loop: parent {} already asked it",
                parent.code
            )));
        }
        let margin = Duration::from_millis(self.routing.hop_margin_ms);
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .and_then(|d| d.checked_sub(margin))
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Error::DeadlineExceeded(format!(
                    "deadline of the catalog question ran out at node {me}"
                ))
            })?;
        let mut req = crate::telemetry::traced(DiscoverRequest {
            question: Some(question),
            route,
        });
        req.set_timeout(remaining);
        let mut client = FederationClient::new(parent.channel());
        let who = format!("parent node {} at {}", parent.code, parent.address);
        let answer = match tokio::time::timeout(remaining, client.discover(req)).await {
            Err(_) => {
                return Err(Error::DeadlineExceeded(format!(
                    "deadline ran out waiting for {who}"
                )));
            }
            Ok(Err(status)) => return Err(crate::route::call_error(status, &who)),
            Ok(Ok(resp)) => resp.into_inner(),
        };
        let by: DivisionCode = answer
            .answered_by
            .parse()
            .map_err(|e| Error::DataLoss(format!("{who} named no node that answered: {e}")))?;
        if by == me || !by.contains(&me) {
            return Err(Error::DataLoss(format!(
                "{who} says node {by} answered, which is not an ancestor of node {me}"
            )));
        }
        Ok(answer)
    }
}
