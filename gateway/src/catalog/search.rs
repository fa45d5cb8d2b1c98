//! Catalog search: the one tokenizer that both indexing and querying use, the exact match that every candidate
//! an index returns is checked against, and the translation of a request into a store query.
//!
//! Text is read as words and CJK runs. A word is a run of letters and digits outside the CJK scripts, folded to
//! lower case; a CJK run is a run of Han, kana or Hangul characters, which carry no spaces between words. An entry
//! is indexed under each of its words, each character of its CJK runs and each pair of adjacent characters
//! (unigrams and bigrams), and under tags for its provider, share type, node code prefixes and classification
//! path prefixes. A completed query word (any but the last of the text, or the last when the text ends with a
//! space or punctuation) matches an entry having that very word; the last word, still being typed, matches an
//! entry having a word that starts with it (so a word matches as it is typed); a query CJK run matches an entry whose CJK text holds it, character for character: one or two
//! characters are one index token, longer runs are looked up by their bigrams and the candidates checked.

use fedgate_proto::v1::{CatalogEntry, SearchCatalogRequest, ShareType};
use prost::Message;

use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Uscc};
use crate::limits::{Bounded, LimitsConfig};
use crate::store::{CatalogHit, CatalogQuery};

/// Default page of a search.
const DEFAULT_PAGE: u32 = 50;
/// Version of the tokenizer: a store whose index was built by another version rebuilds it when it opens.
pub const TOKENIZER_VERSION: i64 = 1;
/// Lengths of the node code prefixes an entry is tagged with: a province's, a city's, a county's (any other
/// prefix is matched by checking every candidate).
const NODE_TAG_LENGTHS: [usize; 3] = [2, 4, 6];
/// First character of every tag token; never part of a text token (it is neither a letter nor a digit).
const TAG: char = '§';
/// Longest prefix an index answers from its own prefix lists (SQLite FTS5 `prefix = '1 2 3'`); a longer prefix
/// is looked up as the indexed words that start with it.
pub const INDEXED_PREFIX_CHARS: usize = 3;

/// Whether the index token `token` is a word that a prefix longer than `INDEXED_PREFIX_CHARS` may stand for
/// (CJK grams are shorter, tags start with a mark no word holds).
pub fn is_long_word(token: &str) -> bool {
    !token.starts_with(TAG) && token.chars().count() > INDEXED_PREFIX_CHARS
}

/// One term of a search text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// A completed lower-cased word: matches an entry that has this word.
    Word(String),
    /// The lower-cased word the text ends in, still being typed: matches an entry that has a word starting with it.
    Prefix(String),
    /// A run of CJK characters: matches an entry whose CJK text holds it.
    Cjk(String),
}

/// A token an index must hold for an entry to match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexToken {
    /// The token.
    pub token: String,
    /// Whether any token starting with it matches (a word as it is typed).
    pub prefix: bool,
}

/// Whether `c` belongs to a script written without spaces between words: Han, kana, Hangul.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF        // Hiragana, Katakana
        | 0x3400..=0x4DBF      // CJK Extension A
        | 0x4E00..=0x9FFF      // CJK Unified Ideographs
        | 0xAC00..=0xD7AF      // Hangul syllables
        | 0xF900..=0xFAFF      // CJK Compatibility Ideographs
        | 0x20000..=0x3134F    // CJK Extensions B-G and Compatibility Supplement
    )
}

/// The words and CJK runs of `text`, in order; a word the text ends in (nothing after it) is a `Prefix`.
fn segments(text: &str) -> Vec<Term> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut cjk = String::new();
    for c in text.chars() {
        if is_cjk(c) {
            if !word.is_empty() {
                out.push(Term::Word(std::mem::take(&mut word)));
            }
            cjk.push(c);
        } else if c.is_alphanumeric() {
            if !cjk.is_empty() {
                out.push(Term::Cjk(std::mem::take(&mut cjk)));
            }
            word.extend(c.to_lowercase());
        } else {
            if !word.is_empty() {
                out.push(Term::Word(std::mem::take(&mut word)));
            }
            if !cjk.is_empty() {
                out.push(Term::Cjk(std::mem::take(&mut cjk)));
            }
        }
    }
    if !word.is_empty() {
        out.push(Term::Prefix(word));
    }
    if !cjk.is_empty() {
        out.push(Term::Cjk(cjk));
    }
    out
}

/// The terms of a search text (duplicates removed).
pub fn terms(text: &str) -> Vec<Term> {
    let mut out: Vec<Term> = Vec::new();
    for t in segments(text) {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// Unigrams and bigrams of a CJK run.
fn grams(run: &str, out: &mut Vec<String>) {
    let chars: Vec<char> = run.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        out.push(c.to_string());
        if let Some(next) = chars.get(i + 1) {
            out.push([*c, *next].iter().collect());
        }
    }
}

/// The searched text of an entry: its title and summary.
fn searched_text(entry: &CatalogEntry) -> String {
    format!("{} {}", entry.title, entry.summary)
}

fn tag(kind: char, value: &str) -> String {
    let mut t = String::with_capacity(value.len() + 3);
    t.push(TAG);
    t.push(kind);
    t.push_str(value);
    t
}

fn provider_tag(uscc: &str) -> String {
    tag('p', uscc)
}

fn share_tag(share_type: i32) -> String {
    tag('s', &share_type.to_string())
}

fn node_tag(prefix: &str) -> String {
    tag('n', prefix)
}

fn class_tag(path: &str) -> String {
    tag('c', &hex::encode(path.as_bytes()))
}

/// Every token an entry is indexed under: its text's words, CJK unigrams and bigrams, and its tags; sorted,
/// without duplicates.
pub fn entry_tokens(entry: &CatalogEntry) -> Vec<String> {
    let mut out = Vec::new();
    for t in segments(&searched_text(entry)) {
        match t {
            Term::Word(w) | Term::Prefix(w) => out.push(w),
            Term::Cjk(run) => grams(&run, &mut out),
        }
    }
    out.push(provider_tag(&entry.provider_uscc));
    out.push(share_tag(entry.share_type));
    for end in NODE_TAG_LENGTHS {
        if let Some(prefix) = entry.node_code.get(..end) {
            out.push(node_tag(prefix));
        }
    }
    let path = entry.classification.join("/");
    if !path.is_empty() {
        for (i, _) in path.match_indices('/') {
            out.push(class_tag(&path[..i]));
        }
        out.push(class_tag(&path));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The tokens an entry must be indexed under to match `query` (none: every entry is a candidate).
pub fn query_tokens(query: &CatalogQuery) -> Vec<IndexToken> {
    let mut out = Vec::new();
    let exact = |token: String| IndexToken {
        token,
        prefix: false,
    };
    for t in &query.terms {
        match t {
            Term::Word(w) => out.push(exact(w.clone())),
            Term::Prefix(w) => out.push(IndexToken {
                token: w.clone(),
                prefix: true,
            }),
            Term::Cjk(run) if run.chars().count() <= 2 => out.push(exact(run.clone())),
            Term::Cjk(run) => {
                let chars: Vec<char> = run.chars().collect();
                for pair in chars.windows(2) {
                    out.push(exact(pair.iter().collect()));
                }
            }
        }
    }
    if let Some(p) = &query.provider_uscc {
        out.push(exact(provider_tag(p)));
    }
    if let Some(s) = query.share_type {
        out.push(exact(share_tag(s as i32)));
    }
    if let Some(p) = query
        .node_prefix
        .as_deref()
        .filter(|p| NODE_TAG_LENGTHS.contains(&p.len()))
    {
        out.push(exact(node_tag(p)));
    }
    if !query.classification.is_empty() {
        out.push(exact(class_tag(&query.classification.join("/"))));
    }
    out.dedup();
    out
}

/// Whether `entry` matches every filter of `query` exactly: the check every candidate of an index passes.
pub fn matches(query: &CatalogQuery, entry: &CatalogEntry) -> bool {
    if query
        .provider_uscc
        .as_ref()
        .is_some_and(|p| *p != entry.provider_uscc)
    {
        return false;
    }
    if query
        .share_type
        .is_some_and(|s| s as i32 != entry.share_type)
    {
        return false;
    }
    if query
        .node_prefix
        .as_ref()
        .is_some_and(|p| !entry.node_code.starts_with(p.as_str()))
    {
        return false;
    }
    if !query.classification.is_empty() {
        let want = query.classification.join("/");
        let have = entry.classification.join("/");
        let below = have
            .strip_prefix(want.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if !below {
            return false;
        }
    }
    if query.terms.is_empty() {
        return true;
    }
    let text = segments(&searched_text(entry));
    query.terms.iter().all(|term| match term {
        Term::Word(w) => text
            .iter()
            .any(|t| matches!(t, Term::Word(have) | Term::Prefix(have) if have == w)),
        Term::Prefix(w) => text.iter().any(
            |t| matches!(t, Term::Word(have) | Term::Prefix(have) if have.starts_with(w.as_str())),
        ),
        Term::Cjk(run) => text
            .iter()
            .any(|t| matches!(t, Term::Cjk(have) if have.contains(run.as_str()))),
    })
}

/// Translates a search request at `node` into a store query over the node's subtree, within `limits`: the
/// text's length and words, the page's entries and bytes.
pub fn search_query(
    node: DivisionCode,
    req: &SearchCatalogRequest,
    limits: &LimitsConfig,
) -> Result<CatalogQuery> {
    req.check_limits(limits)?;
    let mut node_prefix = Some(subtree_prefix(node));
    if !req.node_code.is_empty() {
        let filter: DivisionCode = req
            .node_code
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("node_code: {e}")))?;
        if !node.contains(&filter) && !filter.contains(&node) {
            return Err(Error::InvalidArgument(format!(
                "node_code {filter} is outside the subtree of node {node}"
            )));
        }
        if node.contains(&filter) {
            node_prefix = Some(subtree_prefix(filter));
        }
    }
    let provider_uscc = if req.provider_uscc.is_empty() {
        None
    } else {
        Some(
            req.provider_uscc
                .parse::<Uscc>()
                .map_err(|e| Error::InvalidArgument(format!("provider_uscc: {e}")))?
                .to_string(),
        )
    };
    let share_type = match ShareType::try_from(req.share_type) {
        Ok(ShareType::Unspecified) => None,
        Ok(t) => Some(t),
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "share_type {} is not a known share type",
                req.share_type
            )));
        }
    };
    let terms = terms(&req.text);
    if terms.is_empty() && !req.text.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "text holds no letters or digits to search for".into(),
        ));
    }
    let after = if req.page_token.is_empty() {
        None
    } else {
        Some(req.page_token.parse::<u64>().map_err(|_| {
            Error::InvalidArgument(
                "page_token is not one this node handed out (pass next_page_token as it came)"
                    .into(),
            )
        })?)
    };
    let limit = match req.page_size {
        0 => DEFAULT_PAGE.min(limits.max_search_page),
        n => n,
    };
    Ok(CatalogQuery {
        terms,
        provider_uscc,
        classification: req.classification.clone(),
        share_type,
        node_prefix,
        after,
        limit,
        max_bytes: Some(limits.max_page_bytes),
    })
}

/// Finishes a search page as the store returned it for `query`: the entries that fit in the query's byte budget
/// and the token for the next page (empty on the last page).
pub fn finish_page(mut hits: Vec<CatalogHit>, query: &CatalogQuery) -> (Vec<CatalogEntry>, String) {
    let budget = query.max_bytes.unwrap_or(usize::MAX);
    let mut total = 0usize;
    let mut cut = None;
    for (i, h) in hits.iter().enumerate() {
        total = total.saturating_add(h.entry.encoded_len());
        // The first entry is always answered, so that a page never comes back empty while more remain.
        if total > budget && i > 0 {
            cut = Some(i);
            break;
        }
    }
    let more = match cut {
        Some(i) => {
            hits.truncate(i);
            true
        }
        None => hits.len() == query.limit as usize,
    };
    let token = match hits.last() {
        Some(h) if more => h.position.to_string(),
        _ => String::new(),
    };
    (hits.into_iter().map(|h| h.entry).collect(), token)
}

/// The code prefix shared by every node in the subtree of `node`.
pub fn subtree_prefix(node: DivisionCode) -> String {
    let s = node.to_string();
    let keep = match node.level() {
        crate::ident::Level::Province => 2,
        crate::ident::Level::City => 4,
        crate::ident::Level::County => 6,
    };
    s[..keep].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(title: &str, summary: &str) -> CatalogEntry {
        CatalogEntry {
            id: "350102:x".into(),
            node_code: "350102".into(),
            provider_uscc: "P1".into(),
            title: title.into(),
            summary: summary.into(),
            classification: vec!["civil".into(), "户籍".into()],
            share_type: ShareType::Conditional as i32,
            ..Default::default()
        }
    }

    fn text(q: &str) -> CatalogQuery {
        CatalogQuery {
            terms: terms(q),
            ..Default::default()
        }
    }

    #[test]
    fn text_is_read_as_words_and_cjk_runs() {
        assert_eq!(
            terms("户籍Register, 婚姻登记 ÄRZTE a-b 户籍"),
            [
                Term::Cjk("户籍".into()),
                Term::Word("register".into()),
                Term::Cjk("婚姻登记".into()),
                Term::Word("ärzte".into()),
                Term::Word("a".into()),
                Term::Word("b".into()),
            ]
        );
        assert!(terms(" !? ").is_empty());
    }

    #[test]
    fn only_the_word_being_typed_is_a_prefix() {
        let w = |s: &str| Term::Word(s.into());
        let p = |s: &str| Term::Prefix(s.into());
        assert_eq!(terms("Health insur"), [w("health"), p("insur")]);
        assert_eq!(terms("health insurance "), [w("health"), w("insurance")]);
        assert_eq!(terms("health insurance,"), [w("health"), w("insurance")]);
        assert_eq!(
            terms("insurance户籍"),
            [w("insurance"), Term::Cjk("户籍".into())]
        );
        assert_eq!(terms("reg reg"), [w("reg"), p("reg")]);
    }

    #[test]
    fn entries_are_indexed_under_words_cjk_grams_and_tags() {
        let tokens = entry_tokens(&entry("户籍人口 Register", "x"));
        for t in [
            "户", "籍", "人", "口", "户籍", "籍人", "人口", "register", "x",
        ] {
            assert!(tokens.contains(&t.to_owned()), "{t} in {tokens:?}");
        }
        assert!(!tokens.contains(&"户籍人".to_owned()));
        assert!(!tokens.contains(&"§n3".to_owned()));
        for t in ["§pP1", "§s2", "§n35", "§n3501", "§n350102"] {
            assert!(tokens.contains(&t.to_owned()), "{t} in {tokens:?}");
        }
        let civil = class_tag("civil");
        assert!(tokens.contains(&civil));
        assert!(tokens.contains(&class_tag("civil/户籍")));
        assert!(!tokens.contains(&class_tag("civ")));
    }

    #[test]
    fn every_query_token_is_held_by_a_matching_entry() {
        let e = entry("户籍人口信息 Household register", "常住");
        let tokens = entry_tokens(&e);
        for q in [
            "户",
            "户籍",
            "人口信息",
            "籍人口",
            "house",
            "常住 reg",
            "register 常住",
            "household 户籍人口信",
        ] {
            let query = text(q);
            assert!(matches(&query, &e), "{q}");
            for t in query_tokens(&query) {
                assert!(
                    tokens.iter().any(|have| if t.prefix {
                        have.starts_with(&t.token)
                    } else {
                        *have == t.token
                    }),
                    "{q}: {t:?}"
                );
            }
        }
    }

    #[test]
    fn candidates_that_only_share_grams_do_not_match() {
        // Holds the bigrams 户籍 and 籍人 but not the run 户籍人.
        let e = entry("户籍 籍人", "");
        assert!(!matches(&text("户籍人"), &e));
        assert!(matches(&text("户籍"), &e));
        assert!(!matches(&text("ouse"), &entry("household", "")));
        assert!(!matches(&text("户籍 marriage"), &e));
        let e = entry("Household register", "");
        assert!(matches(&text("household reg"), &e));
        assert!(
            !matches(&text("house register"), &e),
            "a completed word is whole"
        );
        assert!(!matches(&text("household reg "), &e));
        assert!(matches(&text("register household "), &e));
    }

    #[test]
    fn filters_match_exactly() {
        let e = entry("t", "");
        let q = |f: fn(&mut CatalogQuery)| {
            let mut q = CatalogQuery::default();
            f(&mut q);
            matches(&q, &e)
        };
        assert!(q(|q| q.provider_uscc = Some("P1".into())));
        assert!(!q(|q| q.provider_uscc = Some("p1".into())));
        assert!(q(|q| q.classification = vec!["civil".into()]));
        assert!(!q(|q| q.classification = vec!["civ".into()]));
        assert!(q(|q| q.node_prefix = Some("3501".into())));
        assert!(!q(|q| q.node_prefix = Some("3502".into())));
        assert!(q(|q| q.share_type = Some(ShareType::Conditional)));
        assert!(!q(|q| q.share_type = Some(ShareType::NotShared)));
    }

    #[test]
    fn subtree_prefixes_follow_levels() {
        let p = |s: &str| subtree_prefix(s.parse().expect("code"));
        assert_eq!(p("350000"), "35");
        assert_eq!(p("350100"), "3501");
        assert_eq!(p("350102"), "350102");
    }
}
