use fedgate_proto::v1::{
    AuditRecord, CatalogEntry, Envelope, Field, Hop, SearchCatalogRequest, ShareRequest,
};
use prost::Message;

use super::*;

#[test]
fn excerpts_quote_a_short_prefix() {
    assert_eq!(excerpt("short"), "short");
    let long = "x".repeat(1 << 20);
    let e = excerpt(&long);
    assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
    assert!(e.ends_with('…'));
    assert_eq!(excerpt(&"界".repeat(40)).chars().count(), EXCERPT_CHARS + 1);
    assert_eq!(clamp("abcdef", 4), "abc…");
    assert_eq!(clamp("abcd", 4), "abcd");
    assert_eq!(clamp("abc", 0), "");
}

#[test]
fn refusals_name_the_field_and_the_limit() {
    let l = LimitsConfig::default();
    let share = ShareRequest {
        purpose: "p".repeat(1 << 20),
        ..Default::default()
    };
    let e = share.check_limits(&l).expect_err("purpose over the limit");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        e.to_string(),
        "purpose has 1048576 characters, above the limit of 2000 (limits.max_text_chars)"
    );

    let share = ShareRequest {
        key: "350102\u{0}".into(),
        ..Default::default()
    };
    let e = share.check_limits(&l).expect_err("NUL in a key");
    assert_eq!(
        e.to_string(),
        "key contains the control character U+0000 at character 7"
    );

    let share = ShareRequest {
        group_by: vec!["a".into(); 9],
        ..Default::default()
    };
    let e = share.check_limits(&l).expect_err("too many dimensions");
    assert_eq!(
        e.to_string(),
        "group_by has 9 entries, above the limit of 8 (limits.max_group_by)"
    );

    let search = SearchCatalogRequest {
        text: "w ".repeat(9),
        ..Default::default()
    };
    let e = search.check_limits(&l).expect_err("too many words");
    assert!(e.to_string().contains("limits.max_search_words"), "{e}");
    let search = SearchCatalogRequest {
        page_size: 501,
        ..Default::default()
    };
    let e = search.check_limits(&l).expect_err("page too large");
    assert_eq!(
        e.to_string(),
        "page_size 501 is above the limit of 500 (limits.max_search_page)"
    );

    let entry = CatalogEntry {
        id: "x".into(),
        fields: vec![
            Field {
                name: "n".into(),
                description: "d".repeat(10_000),
                ..Default::default()
            };
            2
        ],
        ..Default::default()
    };
    let e = entry.check_limits(&l).expect_err("long description");
    assert!(
        e.to_string()
            .starts_with("entry.fields[0].description has 10000 characters"),
        "{e}"
    );

    let env = Envelope {
        route: vec![Hop::default(); 17],
        ..Default::default()
    };
    let e = env.check_limits(&l).expect_err("long route");
    assert!(e.to_string().contains("limits.max_route_hops"), "{e}");
}

#[test]
fn text_allows_line_breaks_and_identifiers_do_not() {
    let l = LimitsConfig::default();
    let share = ShareRequest {
        purpose: "line one\nline two\ttab".into(),
        ..Default::default()
    };
    share.check_limits(&l).expect("line breaks are text");
    let share = ShareRequest {
        request_id: "a\nb".into(),
        ..Default::default()
    };
    assert!(share.check_limits(&l).is_err());
}

#[test]
fn the_largest_record_fits_in_a_push() {
    // Four-byte characters everywhere, far past every bound.
    let wide = "😀".repeat(100_000);
    let mut r = AuditRecord {
        node_code: wide.clone(),
        seq: u64::MAX,
        time_unix_nanos: i64::MIN,
        operation: i32::MIN,
        actor: wide.clone(),
        consumer_uscc: wide.clone(),
        provider_uscc: wide.clone(),
        resource_id: wide.clone(),
        grant_id: wide.clone(),
        purpose: wide.clone(),
        request_id: wide.clone(),
        route: vec![wide.clone(); 1000],
        outcome: wide.clone(),
        detail: wide.clone(),
        response_digest: vec![1; 10_000],
        prev_hash: vec![2; 10_000],
        hash: vec![3; 10_000],
        signature: vec![4; 10_000],
        consumer_node: wide.clone(),
        key_endorsement: Some(fedgate_proto::v1::SignedStatement {
            kind: wide.clone(),
            body: vec![5; 100_000],
            certificate: vec![6; 100_000],
            scheme: wide.clone(),
            signature: vec![7; 100_000],
        }),
        mode: wide,
    };
    bound_record(&mut r);
    let n = r.encoded_len();
    assert!(n <= MAX_RECORD_BYTES, "{n} bytes");
    assert!(r.purpose.ends_with('…'));
    assert_eq!(r.route.len(), RECORD_ROUTE);
}

#[test]
fn configurations_that_could_jam_a_stream_are_refused() {
    let ok = LimitsConfig::default();
    ok.validate(8).expect("defaults are consistent");
    let text = LimitsConfig {
        max_text_chars: RECORD_TEXT_CHARS + 1,
        ..ok
    };
    assert!(text.validate(8).is_err());
    let entry = LimitsConfig {
        max_entry_bytes: MAX_ENTRY_CEILING + 1,
        ..ok
    };
    assert!(entry.validate(8).is_err());
    let small = LimitsConfig {
        max_message_bytes: 64 * 1024,
        ..ok
    };
    assert!(small.validate(8).is_err());
    let hops = LimitsConfig {
        max_route_hops: 8,
        ..ok
    };
    assert!(hops.validate(8).is_err());
    let several = LimitsConfig {
        max_fields: 0,
        max_route_hops: 8,
        ..ok
    };
    let keys: Vec<String> = several.problems(8).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["limits.max_fields", "limits.max_route_hops"]);
    let parsed: LimitsConfig = toml::from_str("max_grant_days = 30").expect("partial section");
    assert_eq!(parsed.max_grant_days, 30);
    assert_eq!(parsed.max_text_chars, ok.max_text_chars);
    assert!(toml::from_str::<LimitsConfig>("max_bogus = 1").is_err());
}
