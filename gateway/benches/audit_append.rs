//! Audit append throughput of one node: the full path (concurrent producers, hash chain, chain-head signature
//! per 256 records or 100 ms, durable group commit) against a baseline of raw inserts of the same record blobs, measured in one run.
//!
//! `cargo bench -p fedgate-gateway --bench audit_append`. Environment: `AUDIT_BENCH_RECORDS` (records per run,
//! default 500000), `AUDIT_BENCH_TASKS` (comma-separated producer counts, default "64,256,1024"),
//! `AUDIT_BENCH_BASELINE=0` (skip the baseline, to profile the full path alone), `AUDIT_BENCH_POSTGRES=<url of a
//! server's maintenance database>` (also run the full path into PostgreSQL, a fresh database per run).
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedgate_gateway::audit::{self, AuditLog, ChainVerifier, GENESIS_HASH, record_hash};
use fedgate_gateway::grant::GrantKey;
use fedgate_gateway::ident::DivisionCode;
use fedgate_gateway::metrics::NodeMetrics;
use fedgate_gateway::store::{PgStore, SqliteStore, Store};
use fedgate_gateway::uplink::Uplink;
use fedgate_proto::v1::{AuditOperation, AuditRecord};
use sqlx::Connection;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Records per transaction in the baseline (the writer's largest batch).
const BASELINE_BATCH: usize = 8192;
/// The node whose chain is written.
const NODE: &str = "350102";

/// A record shaped like a query share served at a county node.
fn share_event(i: u64) -> AuditRecord {
    let mut r = audit::event(AuditOperation::ShareQuery, "urn:fedgate:node:350100");
    r.consumer_uscc = "11350203000000001X".to_owned();
    r.provider_uscc = "113501020000000024".to_owned();
    r.consumer_node = "350203".to_owned();
    r.resource_id = "350102:household".to_owned();
    r.purpose = "benchmark: residence check for a housing subsidy".to_owned();
    r.request_id = format!("{:032x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15);
    r.mode = "SHARE_MODE_QUERY".to_owned();
    r.route = ["350203", "350200", "350000", "350100", "350102"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    r.response_digest = audit::digest(&i.to_le_bytes());
    r
}

/// `n` records chained, one signature per transaction, built before the clock starts.
fn prebuilt(n: u64, key: &GrantKey) -> Vec<AuditRecord> {
    let mut prev = GENESIS_HASH.to_vec();
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for i in 1..=n {
        let mut r = share_event(i);
        r.node_code = NODE.to_owned();
        r.seq = i;
        r.prev_hash = prev;
        r.hash = record_hash(&r).to_vec();
        prev = r.hash.clone();
        if i % BASELINE_BATCH as u64 == 0 || i == n {
            r.signature = key
                .sign_bytes(fedgate_gateway::grant::Domain::AuditBatch, &r.hash)
                .to_vec();
        }
        out.push(r);
    }
    out
}

/// CPU time this process has used (user + system), where the platform reports it (Linux).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Reported in clock ticks of 1/100 s (USER_HZ).
    Some(Duration::from_millis(ticks * 10))
}

/// One measured run.
struct Run {
    records: u64,
    wall: Duration,
    cpu: Option<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.records as f64 / self.wall.as_secs_f64()
    }

    fn describe(&self) -> String {
        let cpu = match self.cpu {
            Some(c) => format!(
                "{:.1} CPU-µs/record",
                c.as_secs_f64() * 1e6 / self.records as f64
            ),
            None => "CPU time n/a".to_owned(),
        };
        format!(
            "{:>8.0} records/s  ({} in {:.2?}, {cpu})",
            self.rate(),
            self.records,
            self.wall
        )
    }
}

/// Measures `f`, which handles `records` records.
async fn measure<F: std::future::Future<Output = Result<()>>>(records: u64, f: F) -> Result<Run> {
    let cpu0 = cpu_time();
    let start = Instant::now();
    f.await?;
    let wall = start.elapsed();
    let cpu = cpu0.zip(cpu_time()).map(|(a, b)| b.saturating_sub(a));
    Ok(Run { records, wall, cpu })
}

async fn open(dir: &tempfile::TempDir, name: &str) -> Result<Arc<SqliteStore>> {
    Ok(Arc::new(SqliteStore::open(&dir.path().join(name)).await?))
}

/// Raw inserts: the store's own `audit_append` of ready records, one transaction per 8192, one task.
async fn baseline(dir: &tempfile::TempDir, n: u64, key: &GrantKey) -> Result<Run> {
    let store = open(dir, "baseline.db").await?;
    let records = prebuilt(n, key);
    let run = measure(n, async {
        for chunk in records.chunks(BASELINE_BATCH) {
            store.audit_append(chunk).await?;
        }
        Ok(())
    })
    .await?;
    assert_eq!(store.audit_count().await?, n);
    store.close().await;
    Ok(run)
}

/// The full path: `tasks` producers, each awaiting `AuditLog::record` (answered once durable) in turn.
async fn full(store: Arc<dyn Store>, n: u64, tasks: u64, key: GrantKey) -> Result<Run> {
    let node: DivisionCode = NODE.parse()?;
    let metrics = Arc::new(NodeMetrics::default());
    let (log, writer) = AuditLog::start(
        node,
        store.clone(),
        (Arc::new(key), None),
        Uplink::new(),
        metrics,
    )
    .await?;
    let per_task = n / tasks;
    let run = measure(per_task * tasks, async {
        let mut producers = Vec::new();
        for t in 0..tasks {
            let log = log.clone();
            producers.push(tokio::spawn(async move {
                for i in 0..per_task {
                    log.record(share_event(t * per_task + i)).await?;
                }
                Ok::<_, audit::AuditError>(())
            }));
        }
        for p in producers {
            p.await??;
        }
        Ok(())
    })
    .await?;
    drop(log);
    writer.await?;
    assert_eq!(store.audit_count().await?, per_task * tasks + 1);
    Ok(run)
}

/// Checks the whole chain the full path wrote (so the benchmark cannot pass by skipping work); returns the
/// records checked and the number of signatures.
async fn verify(store: &dyn Store) -> Result<(u64, u64)> {
    let mut v = ChainVerifier::new(NODE, None);
    let mut signatures = 0;
    loop {
        let page = store.audit_chain(NODE, v.head().0, 50_000).await?;
        if page.is_empty() {
            break;
        }
        for r in &page {
            v.push(r)?;
            signatures += u64::from(!r.signature.is_empty());
        }
    }
    v.finish()?;
    Ok((v.checked(), signatures))
}

/// Prints one full-path run and checks the chain it wrote; closes the store.
async fn report<F: std::future::Future<Output = Result<Run>>>(
    label: &str,
    tasks: u64,
    base: Option<f64>,
    store: &dyn Store,
    run: F,
) -> Result<()> {
    let run = run.await?;
    let (checked, signatures) = verify(store).await?;
    store.close().await;
    let ratio = base.map_or_else(|| "n/a".to_owned(), |b| format!("{:.2}", run.rate() / b));
    println!(
        "{label} chain+sign+durable commit, {tasks:>4} producers: {}",
        run.describe()
    );
    println!(
        "           ratio to baseline {ratio}; {signatures} signatures, one per {:.1} records on average; \
         chain of {checked} records verified",
        checked as f64 / signatures.max(1) as f64
    );
    Ok(())
}

/// Creates database `name` on the server whose maintenance database `server` names; returns its URL.
async fn scratch_database(server: &str, name: &str) -> Result<String> {
    let mut admin = sqlx::postgres::PgConnection::connect(server).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    let base = server.rsplit_once('/').map_or(server, |(b, _)| b);
    Ok(format!("{base}/{name}"))
}

async fn drop_database(server: &str, name: &str) -> Result<()> {
    let mut admin = sqlx::postgres::PgConnection::connect(server).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    Ok(())
}

fn main() -> Result<()> {
    let n: u64 = std::env::var("AUDIT_BENCH_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500_000);
    let task_counts: Vec<u64> = std::env::var("AUDIT_BENCH_TASKS")
        .unwrap_or_else(|_| "64,256,1024".to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let key = GrantKey::generate();
        println!(
            "audit append into SQLite (WAL, synchronous=NORMAL), {n} records per run, {} CPU(s)",
            std::thread::available_parallelism().map_or(0, |p| p.get())
        );
        let base = if std::env::var("AUDIT_BENCH_BASELINE").as_deref() == Ok("0") {
            None
        } else {
            let run = baseline(&dir, n, &key).await?;
            println!(
                "baseline   raw inserts, pre-chained, {BASELINE_BATCH}/txn, 1 task:    {}",
                run.describe()
            );
            Some(run.rate())
        };
        for &tasks in &task_counts {
            let store = open(&dir, &format!("full-{tasks}.db")).await?;
            let run = full(store.clone(), n, tasks, key.clone());
            report("full path ", tasks, base, store.as_ref(), run).await?;
        }
        if let Ok(server) = std::env::var("AUDIT_BENCH_POSTGRES") {
            println!("the same full path into PostgreSQL at {server}, a fresh database per run");
            for &tasks in &task_counts {
                let name = format!("fedgate_bench_{tasks}_{}", std::process::id());
                let url = scratch_database(&server, &name).await?;
                let store = Arc::new(PgStore::connect(&url).await?);
                let run = full(store.clone(), n, tasks, key.clone());
                report("postgres  ", tasks, base, store.as_ref(), run).await?;
                drop_database(&server, &name).await?;
            }
        }
        Ok(())
    })
}
