//! The benchmark's catalog: 111 nodes (the province, ten cities, ten counties under each), five provider agencies
//! per node, and entries whose words, Chinese words, classification and share type are chosen by their number, so
//! every run holds the same catalog.

use anyhow::Result;
use fedgate_gateway::ident::{DivisionCode, Uscc};
use fedgate_node::devnet::agency_code;
use fedgate_proto::v1::{CatalogEntry, Field, ShareType};

/// Provider agencies per node.
pub const PROVIDERS_PER_NODE: u32 = 5;
/// One entry in this many carries a rare word.
pub const RARE_EVERY: usize = 997;
/// Distinct rare words.
pub const RARE_WORDS: usize = 50;

/// Common words of titles and summaries.
const WORDS: [&str; 40] = [
    "register",
    "records",
    "licence",
    "permit",
    "certificate",
    "household",
    "marriage",
    "birth",
    "death",
    "pension",
    "insurance",
    "medical",
    "school",
    "student",
    "teacher",
    "vehicle",
    "driver",
    "road",
    "housing",
    "property",
    "enterprise",
    "business",
    "tax",
    "invoice",
    "customs",
    "water",
    "power",
    "grid",
    "forest",
    "land",
    "survey",
    "census",
    "resident",
    "worker",
    "employment",
    "social",
    "welfare",
    "disability",
    "veteran",
    "archive",
];
/// Two-character Chinese words of titles and summaries.
pub const CHINESE: [&str; 24] = [
    "户籍", "婚姻", "登记", "人口", "社保", "医疗", "教育", "税务", "交通", "住房", "企业", "营业",
    "执照", "出生", "死亡", "养老", "就业", "公安", "民政", "卫生", "土地", "水利", "环境", "档案",
];
/// Top-level classifications.
pub const DOMAINS: [&str; 12] = [
    "civil-affairs",
    "public-security",
    "health",
    "education",
    "transport",
    "housing",
    "market",
    "tax",
    "resources",
    "environment",
    "labour",
    "archives",
];

/// The 111 node codes, the province first, each city before its counties.
pub fn nodes() -> Result<Vec<DivisionCode>> {
    nodes_of(10, 10)
}

/// The province, `cities` cities and `counties` counties under each.
pub fn nodes_of(cities: u32, counties: u32) -> Result<Vec<DivisionCode>> {
    let mut out = vec!["350000".parse()?];
    for c in 1..=cities {
        out.push(format!("35{c:02}00").parse()?);
        for k in 1..=counties {
            out.push(format!("35{c:02}{k:02}").parse()?);
        }
    }
    Ok(out)
}

/// The `n`-th provider agency of `node` (1-based).
pub fn provider(node: DivisionCode, n: u32) -> Result<Uscc> {
    agency_code(node, n)
}

/// The rare word of rare group `k`.
pub fn rare_word(k: usize) -> String {
    format!("quasar{}", char::from(b'a' + (k % 26) as u8)) + &"z".repeat(k / 26 + 1)
}

fn pick<'a>(list: &[&'a str], i: usize, salt: usize) -> &'a str {
    list[(i
        .wrapping_mul(2_654_435_761)
        .wrapping_add(salt.wrapping_mul(40_503)))
        % list.len()]
}

/// Entry number `i` of a catalog spread over `nodes`, as the node holding it stores it (version 1).
pub fn entry(i: usize, nodes: &[DivisionCode]) -> Result<CatalogEntry> {
    let node = nodes[i % nodes.len()];
    let provider = provider(node, 1 + ((i / nodes.len()) as u32 % PROVIDERS_PER_NODE))?;
    let mut title = format!(
        "{} {} {} {}{}",
        pick(&WORDS, i, 1),
        pick(&WORDS, i, 2),
        pick(&WORDS, i, 3),
        pick(&CHINESE, i, 4),
        pick(&CHINESE, i, 5),
    );
    if i.is_multiple_of(RARE_EVERY) {
        title.push(' ');
        title.push_str(&rare_word((i / RARE_EVERY) % RARE_WORDS));
    }
    let summary = (6..16)
        .map(|s| pick(&WORDS, i, s))
        .chain([pick(&CHINESE, i, 17), pick(&CHINESE, i, 18)])
        .collect::<Vec<_>>()
        .join(" ");
    let domain = DOMAINS[i % DOMAINS.len()];
    Ok(CatalogEntry {
        id: format!("{node}:e{i}"),
        node_code: node.to_string(),
        provider_uscc: provider.to_string(),
        title,
        summary,
        classification: vec![domain.to_owned(), format!("{domain}-{}", i % 8)],
        share_type: [
            ShareType::Unconditional,
            ShareType::Conditional,
            ShareType::NotShared,
        ][i % 3] as i32,
        format: "table".into(),
        update_frequency: "monthly".into(),
        fields: vec![
            Field {
                name: "id_number".into(),
                data_type: "string".into(),
                description: "citizen id".into(),
                ..Default::default()
            },
            Field {
                name: "name".into(),
                data_type: "string".into(),
                description: "full name".into(),
                ..Default::default()
            },
        ],
        key_field: "id_number".into(),
        version: 1,
        updated_at: "2026-12-01T00:00:00Z".into(),
        ..Default::default()
    })
}
