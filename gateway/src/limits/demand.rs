//! The limits of the demand messages (supply–demand matching), checked at the edge like every other message.

use fedgate_proto::v1::{
    AnswerDemandRequest, AssignDemandRequest, FileDemandRequest, GetDemandRequest,
    ListDemandsRequest, OperatorListDemandsRequest,
};

use super::{Bounded, Limit, LimitsConfig, ident, idents, limit, page, text};
use crate::error::Result;

impl Bounded for FileDemandRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        text("title", &self.title, limit!(l, max_title_chars))?;
        text("description", &self.description, limit!(l, max_text_chars))?;
        text("purpose", &self.purpose, limit!(l, max_text_chars))?;
        text("legal_basis", &self.legal_basis, limit!(l, max_text_chars))?;
        idents(
            "fields",
            &self.fields,
            limit!(l, max_fields),
            limit!(l, max_field_name_chars),
        )
    }
}

impl Bounded for GetDemandRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("id", &self.id, limit!(l, max_id_chars))
    }
}

impl Bounded for ListDemandsRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        page("page_size", self.page_size, limit!(l, max_demand_page))?;
        ident("page_token", &self.page_token, limit!(l, max_id_chars))
    }
}

impl Bounded for AnswerDemandRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("demand_id", &self.demand_id, limit!(l, max_id_chars))?;
        ident(
            "resource_id",
            &self.resource_id,
            Limit::new(l.max_resource_id_chars(), "max_local_code_chars"),
        )?;
        text("refusal", &self.refusal, limit!(l, max_text_chars))?;
        text("note", &self.note, limit!(l, max_text_chars))
    }
}

impl Bounded for AssignDemandRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("demand_id", &self.demand_id, limit!(l, max_id_chars))?;
        ident(
            "provider_uscc",
            &self.provider_uscc,
            limit!(l, max_id_chars),
        )?;
        ident(
            "provider_node",
            &self.provider_node,
            limit!(l, max_id_chars),
        )?;
        text("note", &self.note, limit!(l, max_text_chars))
    }
}

impl Bounded for OperatorListDemandsRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("agency", &self.agency, limit!(l, max_id_chars))?;
        page("page_size", self.page_size, limit!(l, max_demand_page))?;
        ident("page_token", &self.page_token, limit!(l, max_id_chars))
    }
}
