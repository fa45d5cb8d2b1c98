//! The Agency calls of an agency's own view: its applications, its grants and its notices, at its own node.

use fedgate_proto::v1::{
    Application, ApplicationState, GrantStatus, ListGrantsRequest, ListGrantsResponse,
    ListMyApplicationsRequest, ListMyApplicationsResponse, ListNoticesRequest, ListNoticesResponse,
    Notice, WatchNoticesRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::AgencyService;
use crate::error::{Error, Result};
use crate::ident::Uscc;
use crate::limits::{Bounded, LimitsConfig, ident, limit, page};

/// Default page of the own-view listings.
const DEFAULT_PAGE: u32 = 50;

impl Bounded for ListMyApplicationsRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        page("page_size", self.page_size, limit!(l, max_search_page))?;
        ident("page_token", &self.page_token, limit!(l, max_id_chars))
    }
}

impl Bounded for ListGrantsRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        page("page_size", self.page_size, limit!(l, max_search_page))?;
        ident("page_token", &self.page_token, limit!(l, max_id_chars))
    }
}

impl Bounded for ListNoticesRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        page("page_size", self.page_size, limit!(l, max_search_page))
    }
}

impl Bounded for WatchNoticesRequest {
    fn check_limits(&self, _: &LimitsConfig) -> Result<()> {
        Ok(())
    }
}

fn page_size(n: u32) -> u32 {
    if n == 0 { DEFAULT_PAGE } else { n }
}

fn token(t: String) -> Option<String> {
    (!t.is_empty()).then_some(t)
}

impl AgencyService {
    /// Keeps the applicant's copy of an application answer passing through; a failure to keep it does not fail
    /// the answer (the next refresh keeps it).
    pub(super) async fn keep_seen(&self, uscc: &Uscc, app: &Application) {
        let certificate = self.certificates.get(uscc).map(|c| c.value().clone());
        if let Err(e) = self.own_view.application_seen(uscc, certificate, app).await {
            tracing::warn!(application = %app.id, error = %e, "applicant's copy not kept");
        }
    }

    pub(super) async fn my_applications(
        &self,
        req: Request<ListMyApplicationsRequest>,
    ) -> Result<Response<ListMyApplicationsResponse>, Status> {
        let uscc = self.admitted(&req, "ListMyApplications").await?;
        let r = req.into_inner();
        let state = ApplicationState::try_from(r.state)
            .map_err(|_| Error::InvalidArgument(format!("state {} is unknown", r.state)))?;
        let (applications, next_page_token) = self
            .own_view
            .applications(
                uscc.as_str(),
                state,
                token(r.page_token),
                page_size(r.page_size),
            )
            .await?;
        Ok(Response::new(ListMyApplicationsResponse {
            applications,
            next_page_token,
        }))
    }

    pub(super) async fn my_grants(
        &self,
        req: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let uscc = self.admitted(&req, "ListGrants").await?;
        let r = req.into_inner();
        let status = GrantStatus::try_from(r.status)
            .map_err(|_| Error::InvalidArgument(format!("status {} is unknown", r.status)))?;
        let (grants, next_page_token) = self
            .own_view
            .grants(
                uscc.as_str(),
                status,
                token(r.page_token),
                page_size(r.page_size),
            )
            .await?;
        Ok(Response::new(ListGrantsResponse {
            grants,
            next_page_token,
        }))
    }

    pub(super) async fn my_notices(
        &self,
        req: Request<ListNoticesRequest>,
    ) -> Result<Response<ListNoticesResponse>, Status> {
        let uscc = self.admitted(&req, "ListNotices").await?;
        let r = req.into_inner();
        let (notices, more) = self
            .own_view
            .notices(uscc.as_str(), r.after_seq, page_size(r.page_size))
            .await?;
        Ok(Response::new(ListNoticesResponse { notices, more }))
    }

    pub(super) async fn watch_my_notices(
        &self,
        req: Request<WatchNoticesRequest>,
    ) -> Result<Response<ReceiverStream<Result<Notice, Status>>>, Status> {
        let uscc = self.admitted(&req, "WatchNotices").await?;
        Ok(Response::new(
            self.own_view
                .watch(uscc.to_string(), req.get_ref().after_seq),
        ))
    }
}
