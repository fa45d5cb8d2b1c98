//! The limits of each message a node accepts, checked at the edge before any work.

use fedgate_proto::v1::{
    AnswerDemandRequest, FileDemandRequest, GetDemandRequest, ListDemandsRequest,
};
use fedgate_proto::v1::{
    ApplyRequest, AuditOperation, AuditRecord, CatalogEntry, DecideRequest, DownloadRequest,
    Envelope, FileObjectionRequest, ForwardRequest, GetApplicationRequest, GetEntryRequest,
    GetObjectionRequest, InvalidationNotice, JoinRequest, ListDatasetsRequest,
    OperatorAuditRequest, PublishBatchRequest, PublishEntryRequest, PushRequest, QueryAuditRequest,
    RequestKind, ResolveObjectionRequest, RevocationNotice, RevokeRequest, SearchCatalogRequest,
    ShareRequest, TakeBackRequest, WithdrawEntryRequest, stream_item,
};
use prost::Message;

use super::{
    Limit, LimitsConfig, MAX_ENTRY_CEILING, MAX_RECORD_BYTES, bytes, count, ident, idents, limit,
    page, text,
};
use crate::audit;
use crate::error::{Error, Result};

/// Characters a bulk page appends to a request id ("-p" and a page number).
const PAGE_SUFFIX_CHARS: usize = 22;
/// Bytes of a grant signature or public key presented at most.
const MAX_KEY_BYTES: usize = 128;
/// Characters of a hop's action.
const MAX_ACTION_CHARS: usize = 32;

/// A message whose every string and list is checked against the node's limits.
pub trait Bounded {
    /// Refuses the message with INVALID_ARGUMENT naming the first field over its limit.
    fn check_limits(&self, limits: &LimitsConfig) -> Result<()>;
}

/// The audit record of a call refused at the edge: `actor` called `rpc` ("Agency.Share") and was refused.
pub fn refusal(actor: String, rpc: &str, err: &Error) -> AuditRecord {
    let mut r = audit::event(AuditOperation::AuthRefused, actor);
    r.outcome = audit::outcome(err.code());
    r.detail = format!("{rpc}: {err}");
    r
}

fn resource_id(field: &str, value: &str, l: &LimitsConfig) -> Result<()> {
    ident(
        field,
        value,
        Limit::new(l.max_resource_id_chars(), "max_local_code_chars"),
    )
}

fn fields(field: &str, values: &[String], l: &LimitsConfig) -> Result<()> {
    idents(
        field,
        values,
        limit!(l, max_fields),
        limit!(l, max_field_name_chars),
    )
}

fn classification(field: &str, values: &[String], l: &LimitsConfig) -> Result<()> {
    count(field, values.len(), limit!(l, max_classification_depth))?;
    for (i, v) in values.iter().enumerate() {
        text(
            format_args!("{field}[{i}]"),
            v,
            limit!(l, max_classification_chars),
        )?;
    }
    Ok(())
}

/// Checks a search text: its length, its words and their length.
pub(crate) fn search_text(field: &str, value: &str, l: &LimitsConfig) -> Result<()> {
    text(field, value, limit!(l, max_search_chars))?;
    count(
        format_args!("{field} (words)"),
        value.split_whitespace().count(),
        limit!(l, max_search_words),
    )?;
    for (i, w) in value.split_whitespace().enumerate() {
        ident(
            format_args!("{field} word {}", i + 1),
            w,
            limit!(l, max_search_word_chars),
        )?;
    }
    Ok(())
}

impl Bounded for CatalogEntry {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        resource_id("entry.id", &self.id, l)?;
        text("entry.title", &self.title, limit!(l, max_title_chars))?;
        text("entry.summary", &self.summary, limit!(l, max_summary_chars))?;
        ident(
            "entry.provider_uscc",
            &self.provider_uscc,
            limit!(l, max_id_chars),
        )?;
        ident("entry.node_code", &self.node_code, limit!(l, max_id_chars))?;
        classification("entry.classification", &self.classification, l)?;
        text(
            "entry.format",
            &self.format,
            limit!(l, max_entry_text_chars),
        )?;
        count("entry.fields", self.fields.len(), limit!(l, max_fields))?;
        for (i, f) in self.fields.iter().enumerate() {
            ident(
                format_args!("entry.fields[{i}].name"),
                &f.name,
                limit!(l, max_field_name_chars),
            )?;
            text(
                format_args!("entry.fields[{i}].data_type"),
                &f.data_type,
                limit!(l, max_entry_text_chars),
            )?;
            text(
                format_args!("entry.fields[{i}].description"),
                &f.description,
                limit!(l, max_entry_text_chars),
            )?;
        }
        text(
            "entry.update_frequency",
            &self.update_frequency,
            limit!(l, max_entry_text_chars),
        )?;
        count(
            "entry.share_modes",
            self.share_modes.len(),
            limit!(l, max_fields),
        )?;
        text(
            "entry.usage_requirements",
            &self.usage_requirements,
            limit!(l, max_text_chars),
        )?;
        ident(
            "entry.updated_at",
            &self.updated_at,
            limit!(l, max_id_chars),
        )?;
        ident(
            "entry.key_field",
            &self.key_field,
            limit!(l, max_field_name_chars),
        )?;
        count("entry.related", self.related.len(), limit!(l, max_related))?;
        for (i, r) in self.related.iter().enumerate() {
            resource_id(&format!("entry.related[{i}]"), r, l)?;
        }
        fields(
            "entry.statistics_dimensions",
            &self.statistics_dimensions,
            l,
        )?;
        bytes("entry", self.encoded_len(), limit!(l, max_entry_bytes))
    }
}

impl Bounded for PublishEntryRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        match &self.entry {
            Some(e) => e.check_limits(l),
            None => Ok(()),
        }
    }
}

impl Bounded for PublishBatchRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        count("entries", self.entries.len(), limit!(l, max_batch_entries))?;
        for (i, e) in self.entries.iter().enumerate() {
            e.check_limits(l)
                .map_err(|err| err.within(&format!("entries[{i}]")))?;
        }
        Ok(())
    }
}

impl Bounded for WithdrawEntryRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        resource_id("id", &self.id, l)
    }
}

impl Bounded for GetEntryRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        resource_id("id", &self.id, l)
    }
}

impl Bounded for SearchCatalogRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        search_text("text", &self.text, l)?;
        ident(
            "provider_uscc",
            &self.provider_uscc,
            limit!(l, max_id_chars),
        )?;
        classification("classification", &self.classification, l)?;
        ident("node_code", &self.node_code, limit!(l, max_id_chars))?;
        page("page_size", self.page_size, limit!(l, max_search_page))?;
        resource_id("page_token", &self.page_token, l)
    }
}

impl Bounded for ShareRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident(
            "request_id",
            &self.request_id,
            limit!(l, max_request_id_chars),
        )?;
        resource_id("resource_id", &self.resource_id, l)?;
        ident("key", &self.key, limit!(l, max_key_chars))?;
        fields("fields", &self.fields, l)?;
        text("purpose", &self.purpose, limit!(l, max_text_chars))?;
        if let Some(g) = &self.grant {
            signed_grant(g, l)?;
        }
        count(
            "verify_values",
            self.verify_values.len(),
            limit!(l, max_verify_values),
        )?;
        for (name, value) in &self.verify_values {
            ident(
                "verify_values (field name)",
                name,
                limit!(l, max_field_name_chars),
            )?;
            text(
                format_args!("verify_values[{}]", super::excerpt(name)),
                value,
                limit!(l, max_verify_value_chars),
            )?;
        }
        idents(
            "group_by",
            &self.group_by,
            limit!(l, max_group_by),
            limit!(l, max_field_name_chars),
        )?;
        ident(
            "page_token",
            &self.page_token,
            limit!(l, max_page_token_chars),
        )?;
        page("page_size", self.page_size, limit!(l, max_bulk_page))
    }
}

impl Bounded for QueryAuditRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        resource_id("resource_id", &self.resource_id, l)?;
        ident(
            "counterpart_uscc",
            &self.counterpart_uscc,
            limit!(l, max_id_chars),
        )?;
        ident("outcome", &self.outcome, limit!(l, max_id_chars))?;
        page("page_size", self.page_size, limit!(l, max_audit_page))?;
        ident("page_token", &self.page_token, limit!(l, max_id_chars))
    }
}

impl Bounded for ApplyRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        resource_id("resource_id", &self.resource_id, l)?;
        text("purpose", &self.purpose, limit!(l, max_text_chars))?;
        text("scenario", &self.scenario, limit!(l, max_text_chars))?;
        fields("fields", &self.fields, l)
    }
}

impl Bounded for GetApplicationRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("id", &self.id, limit!(l, max_id_chars))
    }
}

impl Bounded for DecideRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident(
            "application_id",
            &self.application_id,
            limit!(l, max_id_chars),
        )?;
        fields("fields", &self.fields, l)?;
        text("reason", &self.reason, limit!(l, max_text_chars))?;
        fields("clear_fields", &self.clear_fields, l)
    }
}

impl Bounded for RevokeRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("grant_id", &self.grant_id, limit!(l, max_id_chars))?;
        text("reason", &self.reason, limit!(l, max_text_chars))
    }
}

impl Bounded for FileObjectionRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        resource_id("resource_id", &self.resource_id, l)?;
        ident("key", &self.key, limit!(l, max_key_chars))?;
        text("description", &self.description, limit!(l, max_text_chars))?;
        text("evidence", &self.evidence, limit!(l, max_text_chars))
    }
}

impl Bounded for GetObjectionRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("id", &self.id, limit!(l, max_id_chars))
    }
}

impl Bounded for ResolveObjectionRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("objection_id", &self.objection_id, limit!(l, max_id_chars))?;
        text("resolution", &self.resolution, limit!(l, max_text_chars))
    }
}

impl Bounded for JoinRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("node_code", &self.node_code, limit!(l, max_id_chars))?;
        text(
            "software_version",
            &self.software_version,
            limit!(l, max_id_chars),
        )?;
        bytes(
            "audit_public_key",
            self.audit_public_key.len(),
            Limit::new(MAX_KEY_BYTES, "max_grant_bytes"),
        )
    }
}

impl Bounded for TakeBackRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident("after_id", &self.after_id, limit!(l, max_id_chars))
    }
}

impl Bounded for PushRequest {
    fn check_limits(&self, _: &LimitsConfig) -> Result<()> {
        for item in &self.items {
            let (what, max) = match &item.body {
                Some(stream_item::Body::Audit(_)) => ("audit record", MAX_RECORD_BYTES),
                _ => ("catalog change", MAX_ENTRY_CEILING + 1024),
            };
            let n = item.encoded_len();
            if n > max {
                return Err(Error::InvalidArgument(format!(
                    "items[seq={}]: the {what} has {n} bytes, above the {max} bytes a stream item may carry",
                    item.seq
                )));
            }
        }
        Ok(())
    }
}

impl Bounded for Envelope {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident(
            "envelope.request_id",
            &self.request_id,
            Limit::new(
                l.max_request_id_chars.max(36) + PAGE_SUFFIX_CHARS,
                "max_request_id_chars",
            ),
        )?;
        resource_id("envelope.resource_id", &self.resource_id, l)?;
        ident(
            "envelope.target_node",
            &self.target_node,
            limit!(l, max_id_chars),
        )?;
        ident(
            "envelope.consumer_uscc",
            &self.consumer_uscc,
            limit!(l, max_id_chars),
        )?;
        ident(
            "envelope.consumer_node",
            &self.consumer_node,
            limit!(l, max_id_chars),
        )?;
        count(
            "envelope.route",
            self.route.len(),
            limit!(l, max_route_hops),
        )?;
        for (i, hop) in self.route.iter().enumerate() {
            ident(
                format_args!("envelope.route[{i}].node_code"),
                &hop.node_code,
                limit!(l, max_id_chars),
            )?;
            ident(
                format_args!("envelope.route[{i}].seen_peer"),
                &hop.seen_peer,
                limit!(l, max_id_chars),
            )?;
            ident(
                format_args!("envelope.route[{i}].action"),
                &hop.action,
                Limit::new(MAX_ACTION_CHARS, "max_id_chars"),
            )?;
        }
        text("envelope.purpose", &self.purpose, limit!(l, max_text_chars))?;
        ident("envelope.grant_id", &self.grant_id, limit!(l, max_id_chars))
    }
}

impl Bounded for RevocationNotice {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        // The signed revocation is bounded where it is checked (`statement::MAX_BODY` and its siblings).
        idents(
            "route",
            &self.route,
            limit!(l, max_route_hops),
            limit!(l, max_id_chars),
        )
    }
}

impl Bounded for InvalidationNotice {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        idents(
            "route",
            &self.route,
            limit!(l, max_route_hops),
            limit!(l, max_id_chars),
        )
    }
}

impl Bounded for OperatorAuditRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        if let Some(q) = &self.query {
            q.check_limits(l)?;
        }
        ident("agency", &self.agency, limit!(l, max_id_chars))?;
        ident("node_code", &self.node_code, limit!(l, max_id_chars))
    }
}

impl Bounded for ListDatasetsRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        search_text("text", &self.text, l)
    }
}

impl Bounded for DownloadRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        resource_id("resource_id", &self.resource_id, l)?;
        fields("fields", &self.fields, l)?;
        ident(
            "page_token",
            &self.page_token,
            limit!(l, max_page_token_chars),
        )?;
        page("page_size", self.page_size, limit!(l, max_bulk_page))
    }
}

/// Checks a forwarded request: its envelope always and, at the node that serves it (`target_here`), the request
/// it carries, decoded by its kind, as the consumer's node checked it.
pub fn check_forward(req: &ForwardRequest, l: &LimitsConfig, target_here: bool) -> Result<()> {
    let Some(env) = &req.envelope else {
        return Ok(());
    };
    env.check_limits(l)?;
    if !target_here {
        return Ok(());
    }
    fn inner<M: Message + Default + Bounded>(bytes: &[u8], l: &LimitsConfig) -> Result<()> {
        match M::decode(bytes) {
            Ok(m) => m.check_limits(l),
            // The serving step names the decoding failure itself.
            Err(_) => Ok(()),
        }
    }
    match RequestKind::try_from(env.kind) {
        Ok(RequestKind::Share) => inner::<ShareRequest>(&req.request, l),
        Ok(RequestKind::Apply) => inner::<ApplyRequest>(&req.request, l),
        Ok(RequestKind::GetApplication) => inner::<GetApplicationRequest>(&req.request, l),
        Ok(RequestKind::Objection) => inner::<FileObjectionRequest>(&req.request, l),
        Ok(RequestKind::GetObjection) => inner::<GetObjectionRequest>(&req.request, l),
        Ok(RequestKind::FileDemand) => inner::<FileDemandRequest>(&req.request, l),
        Ok(RequestKind::GetDemand) => inner::<GetDemandRequest>(&req.request, l),
        Ok(RequestKind::ListDemands) => inner::<ListDemandsRequest>(&req.request, l),
        Ok(RequestKind::AnswerDemand) => inner::<AnswerDemandRequest>(&req.request, l),
        Ok(RequestKind::Subscribe) => inner::<fedgate_proto::v1::SubscribeRequest>(&req.request, l),
        Ok(RequestKind::Unsubscribe) => {
            inner::<fedgate_proto::v1::UnsubscribeRequest>(&req.request, l)
        }
        Err(_) => Ok(()),
    }
    .map_err(|e| match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("request: {m}")),
        other => other,
    })
}

/// Bounds a grant a request carries: its encoding, signature and key.
fn signed_grant(g: &fedgate_proto::v1::SignedGrant, l: &LimitsConfig) -> Result<()> {
    bytes("grant.grant", g.grant.len(), limit!(l, max_grant_bytes))?;
    bytes(
        "grant.signature",
        g.signature.len(),
        Limit::new(MAX_KEY_BYTES, "max_grant_bytes"),
    )?;
    bytes(
        "grant.public_key",
        g.public_key.len(),
        Limit::new(MAX_KEY_BYTES, "max_grant_bytes"),
    )
}

impl Bounded for fedgate_proto::v1::SubscribeRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        resource_id("resource_id", &self.resource_id, l)?;
        fields("fields", &self.fields, l)?;
        text("purpose", &self.purpose, limit!(l, max_text_chars))?;
        if let Some(g) = &self.grant {
            signed_grant(g, l)?;
        }
        Ok(())
    }
}

impl Bounded for fedgate_proto::v1::UnsubscribeRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident(
            "subscription_id",
            &self.subscription_id,
            limit!(l, max_id_chars),
        )?;
        text("reason", &self.reason, limit!(l, max_text_chars))
    }
}

impl Bounded for fedgate_proto::v1::ReadSubscriptionRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        ident(
            "subscription_id",
            &self.subscription_id,
            limit!(l, max_id_chars),
        )
    }
}

impl Bounded for fedgate_proto::v1::ListSubscriptionsRequest {
    fn check_limits(&self, _: &LimitsConfig) -> Result<()> {
        Ok(())
    }
}

impl Bounded for fedgate_proto::v1::DeliverRequest {
    fn check_limits(&self, l: &LimitsConfig) -> Result<()> {
        // The signed batch is bounded where it is checked (`statement::MAX_BODY` and its siblings), its items by
        // the node's message limit and `flowback` batch limits.
        idents(
            "route",
            &self.route,
            limit!(l, max_route_hops),
            limit!(l, max_id_chars),
        )
    }
}
