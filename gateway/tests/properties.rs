//! Property tests of every decoder and validator of input: identifiers, resource ids, catalog entries, search
//! queries and the limits. Whatever the input: no panic, refusals are INVALID_ARGUMENT (or PERMISSION_DENIED
//! where a caller claims another's identity), and errors quote at most a short excerpt of the value.

use fedgate_gateway::catalog::{
    ResourceId, finish_page, parse_resource_id, prepare_publish, search_query,
};
use fedgate_gateway::error::Error;
use fedgate_gateway::ident::{DivisionCode, IdNumber, Peer, Uscc};
use fedgate_gateway::limits::{
    Bounded, EXCERPT_CHARS, LimitsConfig, MAX_RECORD_BYTES, bound_record, clamp, excerpt,
};
use fedgate_proto::v1::{
    ApplyRequest, AuditRecord, CatalogEntry, DecideRequest, Envelope, Field, ForwardRequest,
    PushRequest, RevocationNotice, SearchCatalogRequest, ShareMode, ShareRequest, ShareType,
};
use proptest::prelude::*;
use prost::Message;
use tonic::Code;

/// Longest error message any refusal may carry: its own words plus a few short excerpts, each at most 33
/// characters that escaping may widen to 10 (`\u{10ffff}`).
const MAX_MESSAGE: usize = 1200;

/// Any text, often long, sometimes digits or code-like, sometimes with control characters.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[0-9]{0,20}",
        "[0-9A-Z]{16,20}",
        "[0-9]{6}:[a-z.\\-_]{0,70}",
        "\\PC{0,300}",
        (0usize..5000).prop_map(|n| "界".repeat(n)),
        "[\\x00-\\x1f a]{0,20}",
    ]
}

fn node() -> DivisionCode {
    DivisionCode::parse("350102").expect("valid code")
}

fn uscc() -> Uscc {
    Uscc::with_check("11350102000000002").expect("valid code")
}

fn assert_refusal(e: &Error, allowed: &[Code]) {
    assert!(allowed.contains(&e.code()), "{:?}: {e}", e.code());
    let n = e.to_string().chars().count();
    assert!(n <= MAX_MESSAGE, "{n} characters: {e}");
}

fn entry_strategy() -> impl Strategy<Value = CatalogEntry> {
    (
        any_text(),
        any_text(),
        any_text(),
        prop::collection::vec(any_text(), 0..12),
        prop::collection::vec((any_text(), any_text()), 0..6),
        any_text(),
        prop::collection::vec(-2i32..6, 0..5),
        prop::collection::vec(any_text(), 0..4),
        -1i32..5,
        any_text(),
    )
        .prop_map(
            |(id, title, summary, classification, fields, key_field, modes, related, st, prov)| {
                CatalogEntry {
                    id,
                    title,
                    summary,
                    provider_uscc: prov,
                    classification,
                    fields: fields
                        .into_iter()
                        .map(|(name, description)| Field {
                            name,
                            description,
                            ..Default::default()
                        })
                        .collect(),
                    key_field,
                    share_modes: modes,
                    related,
                    share_type: st,
                    ..Default::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn identifiers_never_panic_and_quote_short_excerpts(s in any_text()) {
        for e in [
            DivisionCode::parse(&s).err(),
            Uscc::parse(&s).err(),
            Uscc::with_check(&s).err(),
            IdNumber::parse(&s).err(),
            IdNumber::with_check(&s).err(),
            Peer::from_uri(&s).err(),
            Peer::from_uri(&format!("urn:fedgate:node:{s}")).err(),
            Peer::from_uri(&format!("urn:fedgate:agency:{s}")).err(),
        ]
        .into_iter()
        .flatten()
        {
            let err = Error::from(e);
            assert_refusal(&err, &[Code::InvalidArgument]);
        }
        if let Ok(c) = DivisionCode::parse(&s) {
            prop_assert_eq!(c.as_str(), s.as_str());
            prop_assert_eq!(DivisionCode::parse(c.as_str()), Ok(c));
        }
        if let Ok(u) = Uscc::parse(&s) {
            prop_assert_eq!(Uscc::with_check(&s[..17]), Ok(u));
        }
        if let Ok(id) = IdNumber::parse(&s) {
            prop_assert_eq!(IdNumber::parse(id.as_str()), Ok(id));
        }
    }

    #[test]
    fn valid_codes_round_trip(first17 in "[0-9A-HJ-NP-RTUW-Y]{17}", digits in "[0-9]{17}") {
        let u = Uscc::with_check(&first17).expect("17 alphabet characters take a check character");
        prop_assert_eq!(Uscc::parse(u.as_str()), Ok(u.clone()));
        if let Ok(id) = IdNumber::with_check(&digits) {
            prop_assert_eq!(IdNumber::parse(id.as_str()), Ok(id.clone()));
            prop_assert_eq!(id.masked().chars().count(), 18);
        }
    }

    #[test]
    fn resource_ids_never_panic(s in any_text()) {
        match s.parse::<ResourceId>() {
            Ok(id) => prop_assert_eq!(id.to_string(), s.clone()),
            Err(e) => assert_refusal(&e, &[Code::InvalidArgument]),
        }
        if let Err(e) = parse_resource_id("resource_id", &s) {
            assert_refusal(&e, &[Code::InvalidArgument]);
        }
    }

    #[test]
    fn published_entries_are_validated_within_the_limits(entry in entry_strategy()) {
        let limits = LimitsConfig::default();
        match prepare_publish(node(), &uscc(), entry, "2026-01-01T00:00:00Z".into(), &limits) {
            Ok(e) => {
                prop_assert!(e.encoded_len() <= limits.max_entry_bytes + 256);
                prop_assert!(e.title.chars().count() <= limits.max_title_chars);
                prop_assert!(e.id.starts_with("350102:"));
                prop_assert!(ShareType::try_from(e.share_type).is_ok());
            }
            Err(e) => assert_refusal(&e, &[Code::InvalidArgument, Code::PermissionDenied]),
        }
    }

    #[test]
    fn search_queries_are_bounded(
        text in any_text(),
        classification in prop::collection::vec(any_text(), 0..10),
        node_code in any_text(),
        provider in any_text(),
        page_size in 0u32..2000,
        page_token in any_text(),
        share_type in -1i32..5,
    ) {
        let limits = LimitsConfig::default();
        let req = SearchCatalogRequest {
            text,
            provider_uscc: provider,
            classification,
            share_type,
            node_code,
            page_size,
            page_token,
        };
        match search_query(node(), &req, &limits) {
            Ok(q) => {
                // A whitespace-separated word may hold several terms (a CJK run and a word), never longer than it.
                prop_assert!(q.terms.len() <= limits.max_search_chars);
                let bounded = q.terms.iter().all(|t| {
                    let (fedgate_gateway::catalog::Term::Word(w)
                    | fedgate_gateway::catalog::Term::Prefix(w)
                    | fedgate_gateway::catalog::Term::Cjk(w)) = t;
                    !w.is_empty() && w.chars().count() <= 3 * limits.max_search_word_chars
                });
                prop_assert!(bounded);
                prop_assert!(q.limit >= 1 && q.limit <= limits.max_search_page);
                prop_assert_eq!(q.max_bytes, Some(limits.max_page_bytes));
            }
            Err(e) => assert_refusal(&e, &[Code::InvalidArgument]),
        }
    }

    #[test]
    fn search_pages_fit_their_byte_budget(sizes in prop::collection::vec(0usize..5000, 0..40), limit in 1u32..50, budget in 1usize..40_000) {
        let entries: Vec<fedgate_gateway::store::CatalogHit> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| fedgate_gateway::store::CatalogHit {
                position: i as u64 + 1,
                entry: CatalogEntry { id: format!("350102:e{i:03}"), summary: "s".repeat(*n), ..Default::default() },
            })
            .take(limit as usize)
            .collect();
        let query = fedgate_gateway::store::CatalogQuery { limit, max_bytes: Some(budget), ..Default::default() };
        let count = entries.len();
        let (page, token) = finish_page(entries, &query);
        let total: usize = page.iter().map(Message::encoded_len).sum();
        prop_assert!(page.len() <= 1 || total <= budget, "{total} > {budget}");
        if page.len() < count {
            prop_assert_eq!(token, page.len().to_string());
        }
        prop_assert!(count == 0 || !page.is_empty());
    }

    #[test]
    fn decoded_messages_are_checked_without_panics(bytes in prop::collection::vec(any::<u8>(), 0..400), text in any_text()) {
        let limits = LimitsConfig::default();
        let check = |r: fedgate_gateway::error::Result<()>| {
            if let Err(e) = r {
                assert_refusal(&e, &[Code::InvalidArgument]);
            }
        };
        if let Ok(m) = ShareRequest::decode(bytes.as_slice()) { check(m.check_limits(&limits)); }
        if let Ok(m) = ApplyRequest::decode(bytes.as_slice()) { check(m.check_limits(&limits)); }
        if let Ok(m) = DecideRequest::decode(bytes.as_slice()) { check(m.check_limits(&limits)); }
        if let Ok(m) = Envelope::decode(bytes.as_slice()) { check(m.check_limits(&limits)); }
        if let Ok(m) = RevocationNotice::decode(bytes.as_slice()) { check(m.check_limits(&limits)); }
        if let Ok(m) = PushRequest::decode(bytes.as_slice()) { check(m.check_limits(&limits)); }
        if let Ok(m) = ForwardRequest::decode(bytes.as_slice()) {
            check(fedgate_gateway::limits::check_forward(&m, &limits, true));
        }
        let share = ShareRequest {
            request_id: text.clone(),
            resource_id: text.clone(),
            key: text.clone(),
            purpose: text.clone(),
            fields: vec![text.clone(); 3],
            verify_values: [(text.clone(), text.clone())].into_iter().collect(),
            mode: ShareMode::Verify as i32,
            ..Default::default()
        };
        match share.check_limits(&limits) {
            Ok(()) => {
                prop_assert!(share.purpose.chars().count() <= limits.max_text_chars);
                prop_assert!(share.key.chars().count() <= limits.max_key_chars);
                prop_assert!(!share.key.chars().any(char::is_control));
            }
            Err(e) => assert_refusal(&e, &[Code::InvalidArgument]),
        }
    }

    #[test]
    fn records_and_excerpts_stay_bounded(text in any_text(), n in 0usize..100, max in 0usize..50) {
        let e = excerpt(&text);
        prop_assert!(e.chars().count() <= EXCERPT_CHARS + 1);
        prop_assert!(text.starts_with(e.trim_end_matches('…')));
        prop_assert!(clamp(&text, max).chars().count() <= max);
        let mut r = AuditRecord {
            purpose: text.repeat(n),
            detail: text.repeat(n),
            actor: text.repeat(n),
            route: vec![text.clone(); n * 2],
            ..Default::default()
        };
        bound_record(&mut r);
        prop_assert!(r.encoded_len() <= MAX_RECORD_BYTES);
    }
}
