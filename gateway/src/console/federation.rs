//! The operator's view of the federation (this node's links and the chains it holds, as a tree) and of what is
//! overdue or stale.

use askama::Template;
use axum::extract::State;
use axum::response::Html;
use fedgate_proto::v1::Stream;

use super::Console;
use super::session::Operating;
use super::view::{Failure, Frame, render, when};
use crate::ident::DivisionCode;

/// One upward stream's state, as the page shows it.
struct StreamRow {
    name: &'static str,
    head: u64,
    acked: u64,
    lag: u64,
    connected: bool,
    shipping: bool,
}

/// One child link.
struct ChildRow {
    code: String,
    address: String,
    catalog: u64,
    audit: u64,
    last: String,
}

/// One node in the tree of chains this node holds.
struct TreeRow {
    code: String,
    depth: usize,
    seq: u64,
    last: String,
    me: bool,
}

#[derive(Template)]
#[template(path = "console/federation.html")]
struct FederationPage {
    frame: Frame,
    parent: Option<(String, String)>,
    streams: Vec<StreamRow>,
    children: Vec<ChildRow>,
    tree: Vec<TreeRow>,
}

/// `GET /federation`.
pub async fn page(
    State(c): State<Console>,
    Operating(s): Operating,
) -> Result<Html<String>, Failure> {
    let lang = s.lang;
    let fail = |e: crate::store::StoreError| Failure::of(e.into(), lang);
    let inner = &c.inner;
    let topology = inner.router.topology();
    let offset = inner.router.governance().calendar().utc_offset();
    let mut streams = Vec::new();
    if let Some(up) = &inner.uplink {
        for (stream, name) in [(Stream::Catalog, "catalog"), (Stream::Audit, "audit")] {
            let p = up
                .progress(stream, inner.store.as_ref())
                .await
                .map_err(fail)?;
            streams.push(StreamRow {
                name,
                head: p.head,
                acked: p.acked,
                lag: p.lag(),
                connected: p.connected,
                shipping: p.shipping,
            });
        }
    }
    let mut nodes: Vec<String> = inner.store.audit_nodes().await.map_err(fail)?;
    nodes.sort();
    let me = inner.node;
    let mut tree = Vec::new();
    for code in nodes {
        let Ok(d) = code.parse::<DivisionCode>() else {
            continue;
        };
        let head = inner.store.audit_head(&code).await.map_err(fail)?;
        // Depth below this node: a county under a city under the province.
        let mut depth = 0;
        let mut up = d;
        while up != me {
            match up.parent() {
                Some(p) => {
                    depth += 1;
                    up = p;
                }
                None => break,
            }
        }
        tree.push(TreeRow {
            me: d == me,
            code,
            depth: depth.min(3),
            seq: head.as_ref().map_or(0, |r| r.seq),
            last: head.map_or_else(
                || "—".into(),
                |r| when(r.time_unix_nanos / 1_000_000_000, offset),
            ),
        });
    }
    let mut children = Vec::new();
    let mut codes: Vec<&DivisionCode> = topology.children.keys().collect();
    codes.sort();
    for code in codes {
        let n = &topology.children[code];
        children.push(ChildRow {
            code: code.to_string(),
            address: n.address.clone(),
            catalog: inner
                .store
                .cursor(code.as_str(), Stream::Catalog)
                .await
                .map_err(fail)?,
            audit: inner
                .store
                .cursor(code.as_str(), Stream::Audit)
                .await
                .map_err(fail)?,
            // A child's chain is among those held once it has shipped a record.
            last: tree
                .iter()
                .find(|t| t.code == code.as_str())
                .map_or_else(|| "—".into(), |t| t.last.clone()),
        });
    }
    let page = FederationPage {
        frame: Frame::of(&s, me.as_str(), "/federation"),
        parent: topology
            .parent
            .as_ref()
            .map(|p| (p.code.to_string(), p.address.clone())),
        streams,
        children,
        tree,
    };
    render(&page, lang)
}

/// One overdue or stale item.
struct Late {
    what: String,
    who: String,
    due: String,
    note: String,
}

#[derive(Template)]
#[template(path = "console/reports.html")]
struct ReportsPage {
    frame: Frame,
    sections: Vec<Section>,
}

/// One list of the report: its title's key, how many there are, and those listed.
struct Section {
    key: &'static str,
    count: u64,
    rows: Vec<Late>,
}

/// `GET /reports`: what `fedgate report` prints, as a page.
pub async fn reports(
    State(c): State<Console>,
    Operating(s): Operating,
) -> Result<Html<String>, Failure> {
    let lang = s.lang;
    let g = c.inner.router.governance();
    let offset = g.calendar().utc_offset();
    let (apps, objections) = g.overdue().await.map_err(|e| Failure::of(e, lang))?;
    let (stale, stale_count) = g.stale_entries().await.map_err(|e| Failure::of(e, lang))?;
    let demands = g
        .overdue_demands()
        .await
        .map_err(|e| Failure::of(e, lang))?;
    let section = |key, rows: Vec<Late>| Section {
        key,
        count: rows.len() as u64,
        rows,
    };
    let applications: Vec<Late> = apps
        .into_iter()
        .map(|a| Late {
            what: format!("{} · {}", a.id, a.resource_id),
            who: a.consumer_uscc,
            due: when(a.due_at, offset),
            note: a.purpose,
        })
        .collect();
    let objections: Vec<Late> = objections
        .into_iter()
        .map(|o| Late {
            what: format!("{} · {}", o.id, o.resource_id),
            who: o.consumer_uscc,
            due: when(o.due_at, offset),
            note: o.description,
        })
        .collect();
    let stale: Vec<Late> = stale
        .into_iter()
        .map(|e| {
            let entry = e.entry.unwrap_or_default();
            Late {
                what: format!("{} · {}", entry.id, entry.title),
                who: entry.provider_uscc,
                due: when(e.due_at, offset),
                note: e.reason,
            }
        })
        .collect();
    let demands: Vec<Late> = demands
        .into_iter()
        .map(|d| {
            let demand = d.demand.unwrap_or_default();
            Late {
                what: format!("{} · {}", demand.id, demand.title),
                who: demand.consumer_uscc,
                due: when(d.due_at, offset),
                note: d.reason,
            }
        })
        .collect();
    let mut stale = section("stale_entries", stale);
    stale.count = stale_count;
    let page = ReportsPage {
        frame: Frame::of(&s, c.inner.node.as_str(), "/reports"),
        sections: vec![
            section("overdue_applications", applications),
            section("overdue_objections", objections),
            stale,
            section("overdue_demands", demands),
        ],
    };
    render(&page, lang)
}
