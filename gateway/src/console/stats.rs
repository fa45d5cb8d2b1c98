//! Statistics for operators, drawn on the server as inline SVG: shares per day by resource, consumer and
//! outcome from this node's own audit chain, and approval times against the working-day deadline.

use std::collections::BTreeMap;
use std::fmt::Write;

use askama::Template;
use axum::extract::{Query, State};
use axum::response::Html;
use fedgate_proto::v1::{Application, AuditOperation};
use prost::Message;
use serde::Deserialize;

use super::Console;
use super::session::Operating;
use super::view::{Failure, Frame, render};
use crate::store::{AuditQuery, DocKind, DocQuery};

/// Share records read at most for one page of statistics.
const MAX_RECORDS: usize = 50_000;
/// Applications read at most.
const MAX_APPLICATIONS: u32 = 5_000;
/// Bars of a ranking.
const TOP: usize = 10;

/// The page's query.
#[derive(Deserialize, Default)]
pub struct StatsQuery {
    #[serde(default)]
    days: Option<u32>,
}

#[derive(Template)]
#[template(path = "console/stats.html")]
struct StatsPage {
    frame: Frame,
    days: u32,
    total: u64,
    truncated: bool,
    per_day: String,
    by_resource: String,
    by_consumer: String,
    by_outcome: String,
    approvals: String,
    decided: usize,
    late: usize,
    deadline: u32,
}

fn is_share(op: i32) -> bool {
    matches!(
        AuditOperation::try_from(op),
        Ok(AuditOperation::ShareQuery
            | AuditOperation::ShareVerify
            | AuditOperation::ShareStatistics
            | AuditOperation::ShareBulk
            | AuditOperation::CacheHit)
    )
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A vertical bar chart of `bars` (label, value); bars past `limit` on the value axis are drawn as late.
fn columns(bars: &[(String, u64)], limit: Option<usize>, caption: &str) -> String {
    let (w, h, pad) = (720.0_f64, 200.0_f64, 28.0_f64);
    let max = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64;
    let n = bars.len().max(1) as f64;
    let step = (w - pad) / n;
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {}\" width=\"100%\" role=\"img\" aria-label=\"{}\" class=\"chart\">",
        h + 34.0,
        esc(caption)
    );
    let _ = write!(
        svg,
        "<line x1=\"{pad}\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" stroke=\"#999\"/><text x=\"0\" y=\"12\">{}</text>",
        max as u64
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let bh = (*v as f64 / max) * (h - 16.0);
        let x = pad + i as f64 * step + step * 0.1;
        let class = if limit.is_some_and(|l| i > l) {
            "late"
        } else {
            "bar"
        };
        let _ = write!(
            svg,
            "<rect class=\"{class}\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\"><title>{}: {v}</title></rect>",
            h - bh,
            step * 0.8,
            esc(label)
        );
        if bars.len() <= 16 || i % (bars.len() / 8).max(1) == 0 {
            let _ = write!(
                svg,
                "<text x=\"{x:.1}\" y=\"{}\">{}</text>",
                h + 14.0,
                esc(label)
            );
        }
    }
    if let Some(l) = limit {
        let x = pad + (l as f64 + 1.0) * step;
        let _ = write!(
            svg,
            "<line class=\"limit\" x1=\"{x:.1}\" y1=\"0\" x2=\"{x:.1}\" y2=\"{h}\"/>"
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A horizontal bar chart of the largest `bars`.
fn ranking(counts: &BTreeMap<String, u64>, caption: &str) -> String {
    let mut bars: Vec<(&String, &u64)> = counts.iter().collect();
    bars.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    bars.truncate(TOP);
    let (w, row) = (360.0_f64, 20.0_f64);
    let max = bars.first().map_or(1, |b| *b.1).max(1) as f64;
    let mut svg = format!(
        "<svg viewBox=\"0 0 {} {}\" width=\"100%\" role=\"img\" aria-label=\"{}\" class=\"chart\">",
        w + 200.0,
        row * bars.len().max(1) as f64,
        esc(caption)
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = i as f64 * row;
        let bw = (**v as f64 / max) * (w - 40.0);
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{:.1}\">{}</text><rect class=\"bar\" x=\"200\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\"/><text x=\"{:.1}\" y=\"{:.1}\">{v}</text>",
            y + 14.0,
            esc(&crate::limits::clamp(label, 30)),
            y + 3.0,
            row - 6.0,
            204.0 + bw,
            y + 14.0
        );
    }
    svg.push_str("</svg>");
    svg
}

/// `GET /stats?days=N` (7 to 90; 14 by default).
pub async fn page(
    State(c): State<Console>,
    Operating(s): Operating,
    Query(q): Query<StatsQuery>,
) -> Result<Html<String>, Failure> {
    let lang = s.lang;
    let days = q.days.unwrap_or(14).clamp(7, 90);
    let g = c.inner.router.governance();
    let cal = g.calendar();
    let offset = cal.utc_offset();
    let now = c.inner.clock.unix();
    let today = cal.local_date(
        time::OffsetDateTime::from_unix_timestamp(now).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    );
    let first = today - time::Duration::days(i64::from(days) - 1);
    let from_ns = i64::try_from(
        first
            .midnight()
            .assume_offset(offset)
            .unix_timestamp_nanos(),
    )
    .unwrap_or(0);
    let mut per_day: BTreeMap<time::Date, u64> = (0..days)
        .map(|i| (first + time::Duration::days(i64::from(i)), 0))
        .collect();
    let (mut by_resource, mut by_consumer, mut by_outcome) =
        (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut total = 0u64;
    let mut seen = 0usize;
    let mut after = None;
    let node = c.inner.node.to_string();
    loop {
        let page = c
            .inner
            .store
            .audit_query(&AuditQuery {
                node_prefix: Some(node.clone()),
                from_ns: Some(from_ns),
                after_fwd_seq: after,
                limit: 5000,
                ..Default::default()
            })
            .await
            .map_err(|e| Failure::of(e.into(), lang))?;
        let full = page.len() == 5000;
        after = page.last().map(|(seq, _)| *seq);
        seen += page.len();
        for (_, r) in page.iter().filter(|(_, r)| is_share(r.operation)) {
            total += 1;
            let day =
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.time_unix_nanos))
                    .map(|t| t.to_offset(offset).date())
                    .unwrap_or(first);
            *per_day.entry(day).or_default() += 1;
            *by_resource.entry(r.resource_id.clone()).or_default() += 1;
            *by_consumer.entry(r.consumer_uscc.clone()).or_default() += 1;
            *by_outcome.entry(r.outcome.clone()).or_default() += 1;
        }
        if !full || seen >= MAX_RECORDS {
            break;
        }
    }
    let day_bars: Vec<(String, u64)> = per_day
        .iter()
        .map(|(d, n)| (format!("{:02}-{:02}", u8::from(d.month()), d.day()), *n))
        .collect();
    // Approval times in working days, against the deadline.
    let docs = c
        .inner
        .store
        .docs(
            DocKind::Application,
            &DocQuery {
                limit: Some(MAX_APPLICATIONS),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Failure::of(e.into(), lang))?;
    let deadline = cal.approval_days();
    let mut taken: BTreeMap<u32, u64> = (0..=deadline + 3).map(|d| (d, 0)).collect();
    let (mut decided, mut late) = (0, 0);
    for d in docs {
        let Ok(a) = Application::decode(d.body.as_slice()) else {
            continue;
        };
        if a.decided_at <= 0 {
            continue;
        }
        let (Ok(filed), Ok(done)) = (
            time::OffsetDateTime::from_unix_timestamp(a.filed_at),
            time::OffsetDateTime::from_unix_timestamp(a.decided_at),
        ) else {
            continue;
        };
        let n = cal.working_days_between(cal.local_date(filed), cal.local_date(done));
        decided += 1;
        if a.due_at > 0 && a.decided_at >= a.due_at {
            late += 1;
        }
        *taken.entry(n.min(deadline + 3)).or_default() += 1;
    }
    let approval_bars: Vec<(String, u64)> = taken
        .iter()
        .map(|(d, n)| {
            let label = if *d == deadline + 3 {
                format!("{d}+")
            } else {
                d.to_string()
            };
            (label, *n)
        })
        .collect();
    let page = StatsPage {
        frame: Frame::of(&s, c.inner.node.as_str(), "/stats"),
        days,
        total,
        truncated: seen >= MAX_RECORDS,
        per_day: columns(&day_bars, None, lang.tr("shares_per_day")),
        by_resource: ranking(&by_resource, lang.tr("by_resource")),
        by_consumer: ranking(&by_consumer, lang.tr("by_consumer")),
        by_outcome: ranking(&by_outcome, lang.tr("by_outcome")),
        approvals: columns(
            &approval_bars,
            Some(deadline as usize),
            lang.tr("approval_times"),
        ),
        decided,
        late,
        deadline,
    };
    render(&page, lang)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_in_the_svg() {
        let svg = columns(&[("<script>".into(), 3)], None, "x\"y");
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains("x&quot;y"));
    }

    #[test]
    fn rankings_keep_the_largest() {
        let counts: BTreeMap<String, u64> = (0..20).map(|i| (format!("r{i:02}"), i)).collect();
        let svg = ranking(&counts, "top");
        assert!(svg.contains(">r19<") && !svg.contains(">r00<"), "{svg}");
    }
}
