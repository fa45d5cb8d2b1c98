//! The benchmark's results: one row per path and concurrency, the ratios issue 10 asks for, and the table.

use std::fmt;
use std::time::Duration;

use super::BenchConfig;
use super::cpu::MachineLoad;
use super::load::Outcome;
use super::path::SharePath;
use super::rows::{NODE_ORDER, Snapshot};

/// One measured (or skipped) row.
#[derive(Debug, Clone)]
pub struct RowResult {
    /// The path.
    pub path: SharePath,
    /// Callers at once.
    pub concurrency: usize,
    /// What the load generator saw; `None` when the row was skipped.
    pub outcome: Option<Outcome>,
    /// Why the row was skipped.
    pub skipped: Option<String>,
    /// CPU microseconds per answered request, by process column (nodes by code, `nginx`, `bench`).
    pub cpu_us: Vec<(String, f64)>,
    /// Audit records written per answered request, all nodes' own chains together.
    pub audit_per_request: f64,
}

impl RowResult {
    pub(super) fn skipped(path: SharePath, concurrency: usize, why: &str) -> Self {
        Self {
            path,
            concurrency,
            outcome: None,
            skipped: Some(why.to_owned()),
            cpu_us: Vec::new(),
            audit_per_request: 0.0,
        }
    }

    pub(super) fn measured(
        path: SharePath,
        concurrency: usize,
        outcome: Outcome,
        before: &Snapshot,
        after: &Snapshot,
    ) -> Self {
        let n = outcome.ok.max(1) as f64;
        let cpu_us = after
            .cpu
            .iter()
            .map(|(name, t)| {
                let t0 = before
                    .cpu
                    .iter()
                    .find(|(b, _)| b == name)
                    .map_or(Duration::ZERO, |(_, t0)| *t0);
                (name.clone(), t.saturating_sub(t0).as_secs_f64() * 1e6 / n)
            })
            .collect();
        Self {
            path,
            concurrency,
            audit_per_request: after.audit.saturating_sub(before.audit) as f64 / n,
            outcome: Some(outcome),
            skipped: None,
            cpu_us,
        }
    }

    /// CPU microseconds per request of one process column, if measured.
    pub fn cpu_of(&self, column: &str) -> Option<f64> {
        self.cpu_us
            .iter()
            .find(|(c, _)| c == column)
            .map(|(_, v)| *v)
    }

    fn p50_us(&self) -> Option<f64> {
        self.outcome.as_ref()?.percentile_us(0.5).map(f64::from)
    }

    fn throughput(&self) -> Option<f64> {
        self.outcome.as_ref().map(Outcome::throughput)
    }
}

/// The five ratios of issue 10, each from rows of the same run (`None` where a row is missing).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ratios {
    /// Same-node share p50 over direct call p50, at c=1.
    pub same_node_over_direct_p50: Option<f64>,
    /// (cross-city p50 - same-node p50) / 4 extra hops, at c=1, microseconds.
    pub per_hop_added_us: Option<f64>,
    /// (four nginx p50 - one nginx p50) / 3 extra proxies, at c=1, microseconds.
    pub nginx_per_hop_us: Option<f64>,
    /// Cache hit p50 over direct call p50, at c=1.
    pub cache_hit_over_direct_p50: Option<f64>,
    /// Same-node share throughput over one nginx proxy's, at c=64.
    pub same_node_over_nginx1_throughput: Option<f64>,
    /// Cross-city (4-hop) share throughput over four nginx proxies', at c=64.
    pub four_hop_over_nginx4_throughput: Option<f64>,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// How it ran.
    pub config: BenchConfig,
    /// Processor and kernel.
    pub machine: String,
    /// The nginx version used, or why there was none.
    pub nginx: String,
    /// Every row, in order.
    pub rows: Vec<RowResult>,
    /// How busy the machine was from start to end.
    pub load: MachineLoad,
    /// CPU time this benchmark's processes used while the rows ran.
    pub ours: Duration,
}

impl Report {
    pub(super) fn new(
        config: BenchConfig,
        machine: String,
        nginx: String,
        rows: Vec<RowResult>,
        load: MachineLoad,
        ours: Duration,
    ) -> Self {
        Self {
            config,
            machine,
            nginx,
            rows,
            load,
            ours,
        }
    }

    /// The row of `path` at concurrency `c`, if it was measured.
    pub fn row(&self, path: SharePath, c: usize) -> Option<&RowResult> {
        self.rows
            .iter()
            .find(|r| r.path == path && r.concurrency == c && r.outcome.is_some())
    }

    /// The ratios of issue 10.
    pub fn ratios(&self) -> Ratios {
        let p50 = |p| self.row(p, 1).and_then(RowResult::p50_us);
        let tput = |p| self.row(p, 64).and_then(RowResult::throughput);
        let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        use SharePath::*;
        Ratios {
            same_node_over_direct_p50: div(p50(SameNode), p50(Direct)),
            per_hop_added_us: p50(CrossCity)
                .zip(p50(SameNode))
                .map(|(x, s)| (x - s) / 4.0),
            nginx_per_hop_us: p50(Nginx4).zip(p50(Nginx1)).map(|(x, s)| (x - s) / 3.0),
            cache_hit_over_direct_p50: div(p50(CacheHit), p50(Direct)),
            same_node_over_nginx1_throughput: div(tput(SameNode), tput(Nginx1)),
            four_hop_over_nginx4_throughput: div(tput(CrossCity), tput(Nginx4)),
        }
    }

    /// The parent's CPU per forwarded audit record while `row` ran: (records written at the serving node per
    /// request, CPU-µs per record at its city, at the province).
    pub fn parent_cost(&self, row: &RowResult) -> Option<(f64, f64, f64)> {
        let per_req = row.audit_per_request;
        if per_req <= 0.0 {
            return None;
        }
        Some((
            per_req,
            row.cpu_of("350100")? / per_req,
            row.cpu_of("350000")? / per_req,
        ))
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(f, "share path benchmark on {}", self.machine)?;
        writeln!(f, "nginx: {}", self.nginx)?;
        writeln!(
            f,
            "each row: {:.1} s warm-up, then up to {:.1} s or {} requests; at most {} client connections; CPU \
             {}",
            c.warmup.as_secs_f64(),
            c.duration.as_secs_f64(),
            c.max_requests,
            c.connections,
            if c.settle {
                "counted until every audit record of the row reached the province"
            } else {
                "counted while the load ran (audit forwarding not awaited)"
            }
        )?;
        writeln!(f)?;
        for p in SharePath::ALL {
            writeln!(f, "  {:<12} {}", p.name(), p.describe())?;
        }
        writeln!(f)?;
        write!(
            f,
            "| path | c | answered | errors | req/s | p50 ms | p99 ms |"
        )?;
        for n in NODE_ORDER {
            write!(f, " {n} |")?;
        }
        writeln!(f, " nginx | provider | bench | total | audit rec/req |")?;
        write!(f, "|---|--:|--:|--:|--:|--:|--:|")?;
        for _ in NODE_ORDER {
            write!(f, "--:|")?;
        }
        writeln!(f, "--:|--:|--:|--:|--:|")?;
        for r in &self.rows {
            write!(f, "| {} | {} |", r.path.name(), r.concurrency)?;
            let Some(o) = &r.outcome else {
                writeln!(
                    f,
                    " skipped: {} |",
                    r.skipped.as_deref().unwrap_or("not run")
                )?;
                continue;
            };
            let ms = |q| opt(o.percentile_us(q).map(|u| f64::from(u) / 1000.0), 2);
            write!(
                f,
                " {} | {} | {:.0} | {} | {} |",
                o.ok,
                o.errors,
                o.throughput(),
                ms(0.5),
                ms(0.99)
            )?;
            for n in NODE_ORDER
                .iter()
                .copied()
                .chain(["nginx", "provider", "bench"])
            {
                write!(
                    f,
                    " {} |",
                    r.cpu_of(n)
                        .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
                )?;
            }
            let total: f64 = r.cpu_us.iter().map(|(_, v)| v).sum();
            writeln!(f, " {total:.0} | {:.1} |", r.audit_per_request)?;
        }
        writeln!(
            f,
            "CPU columns: CPU-µs per answered request of each node process, of the nginx processes of the row, \
             of the provider process behind 350102, and of this process (the load generator)."
        )?;
        for r in &self.rows {
            if let Some(e) = r.outcome.as_ref().and_then(|o| o.first_error.as_ref()) {
                writeln!(f, "{} c={}: first error: {e}", r.path.name(), r.concurrency)?;
            }
        }
        writeln!(f)?;
        let x = self.ratios();
        writeln!(
            f,
            "share-path: same-node/direct p50 = {}",
            opt(x.same_node_over_direct_p50, 2)
        )?;
        writeln!(
            f,
            "share-path: per-hop p50 added = {} us (nginx {} us)",
            opt(x.per_hop_added_us, 0),
            opt(x.nginx_per_hop_us, 0)
        )?;
        writeln!(
            f,
            "share-path: cache-hit/direct p50 = {}",
            opt(x.cache_hit_over_direct_p50, 2)
        )?;
        writeln!(
            f,
            "share-path: same-node/nginx1 throughput = {}",
            opt(x.same_node_over_nginx1_throughput, 2)
        )?;
        writeln!(
            f,
            "share-path: 4-hop/nginx4 throughput = {}",
            opt(x.four_hop_over_nginx4_throughput, 2)
        )?;
        writeln!(f)?;
        writeln!(f, "targets (issue 10):")?;
        let target =
            |f: &mut fmt::Formatter<'_>, what: &str, v: Option<f64>, goal: f64, low: bool| {
                let verdict = match v {
                    None => "not measured".to_owned(),
                    Some(v) if (low && v <= goal) || (!low && v >= goal) => "met".to_owned(),
                    Some(v) if low => format!("missed: {:.1}x the target", v / goal),
                    Some(v) => format!("missed: {:.1}x short", goal / v.max(1e-9)),
                };
                writeln!(
                    f,
                    "  {what} {} {goal}: {} -> {verdict}",
                    if low { "<=" } else { ">=" },
                    opt(v, 2)
                )
            };
        target(
            f,
            "same-node/direct p50",
            x.same_node_over_direct_p50,
            2.0,
            true,
        )?;
        target(f, "per-hop added p50 (us)", x.per_hop_added_us, 150.0, true)?;
        target(
            f,
            "cache-hit/direct p50",
            x.cache_hit_over_direct_p50,
            1.2,
            true,
        )?;
        target(
            f,
            "same-node/nginx1 throughput",
            x.same_node_over_nginx1_throughput,
            1.0,
            false,
        )?;
        target(
            f,
            "4-hop/nginx4 throughput",
            x.four_hop_over_nginx4_throughput,
            1.0,
            false,
        )?;
        for c in [1, 64] {
            if let Some((recs, city, province)) = self
                .row(SharePath::SameNode, c)
                .and_then(|r| self.parent_cost(r))
            {
                target(
                    f,
                    &format!(
                        "parent CPU-us per forwarded audit record, same-node c={c} ({recs:.1} records per share), city"
                    ),
                    Some(city),
                    10.0,
                    true,
                )?;
                target(
                    f,
                    &format!("parent CPU-us per forwarded audit record, same-node c={c}, province"),
                    Some(province),
                    10.0,
                    true,
                )?;
            }
        }
        writeln!(f)?;
        let l = &self.load;
        let secs = l.wall.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "machine during the run ({:.0} s): {:.2} CPUs busy on average, {:.2} of them this benchmark's \
             processes; CPU pressure (some) {}",
            secs,
            l.busy_cpus,
            self.ours.as_secs_f64() / secs,
            l.pressure_some.map_or_else(
                || "not reported".to_owned(),
                |p| format!("{:.0} %", p * 100.0)
            )
        )
    }
}
