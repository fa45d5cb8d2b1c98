//! Fault tests of the audit trail with real node processes (issue 4, "How it is checked").
//!
//! A consumer at county 350103 runs a steady share load over four routes — its own county, the neighbouring
//! county 350102 through the city, the city 350100 itself, and the other city 350200 through the province —
//! while (a) the province is stopped with SIGTERM and restarted, (b) the city is killed with SIGKILL and
//! restarted, (c) the city's link to the province is cut, also in the middle of a forwarded batch, (d) the
//! province and the city each run as two replicas on one PostgreSQL database and one replica after the other is
//! killed with SIGKILL and restarted, while agencies keep publishing catalog entries. Afterwards,
//! with every node up, forwarding must settle; then, with every node stopped, each node's database is read:
//!
//! - every ancestor (the province above all) holds exactly the records each node of its subtree wrote: the same
//!   records, compared whole, as many, and nothing else;
//! - every chain verifies from its first record, in its own node and in every copy;
//! - every share answered OK has an OK record at the consumer's node, the provider's node and every node on its
//!   route.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use fedgate_gateway::config::StorageConfig;
use fedgate_gateway::store::{PgStore, Store};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{AuditRecord, ShareMode, ShareRequest, ShareType};
use fedgate_tests::postgres::{ScratchDb, scratch_database};
use fedgate_tests::process::{
    CutPoint, Member, ProcessFederation, Settled, fedgate_binary, subtree_problems, verify_chain,
};
use fedgate_tests::{DivisionCode, NodeSpec, code, registry};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The tests start five node processes each; they run one at a time so that two cores suffice.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Deadline of every wait for progress.
const WAIT: Duration = Duration::from_secs(30);
/// Bound of a whole test.
const TEST_BOUND: Duration = Duration::from_secs(180);
/// Deadline of forwarding settling after the load.
const SETTLE: Duration = Duration::from_secs(60);
/// Concurrent requests of the load.
const WORKERS: usize = 3;
/// Interval between two requests of one worker: the load is `WORKERS` requests per this interval (8 per
/// second). Debug builds verify only about 90 signed records per second per core (unoptimized ed25519), and each
/// share adds about two records to the city's uplink; the load stays well below that so that forwarding keeps
/// up on a busy machine too.
const PACE: Duration = Duration::from_millis(375);
/// Requests of the load at most.
const MAX_REQUESTS: u64 = 5_000;

const PROVINCE: &str = "350000";
const CITY: &str = "350100";
const CONSUMER_NODE: &str = "350103";

/// Resources the load asks for, in turn.
const MIX: [&str; 4] = [
    "350103:household", // same county
    "350102:household", // the other county, through the city
    "350100:household", // the city itself
    "350200:household", // the other city, through the province
];
const SAME_COUNTY: usize = 0;
const CROSS_COUNTY: usize = 1;
const CROSS_CITY: usize = 3;

fn topology() -> Result<Vec<NodeSpec>> {
    use ShareType::{Conditional, Unconditional};
    Ok(vec![
        NodeSpec::new(PROVINCE)?.consumer(1, "province consumer")?,
        NodeSpec::new(CITY)?
            .consumer(1, "Fuzhou consumer")?
            .provider(
                2,
                "Fuzhou provider",
                registry(Unconditional, Conditional, 3),
            )?,
        NodeSpec::new("350102")?
            .consumer(1, "Gulou consumer")?
            .provider(2, "Gulou provider", registry(Unconditional, Conditional, 1))?,
        NodeSpec::new(CONSUMER_NODE)?
            .consumer(1, "Taijiang consumer")?
            .provider(
                2,
                "Taijiang provider",
                registry(Unconditional, Conditional, 4),
            )?,
        NodeSpec::new("350200")?
            .consumer(1, "Xiamen consumer")?
            .provider(
                2,
                "Xiamen provider",
                registry(Unconditional, Conditional, 5),
            )?,
    ])
}

fn node_of(resource: &str) -> DivisionCode {
    code(resource.split(':').next().unwrap_or_default())
}

/// A share that returned OK.
#[derive(Debug, Clone)]
struct Answer {
    request_id: String,
    resource: &'static str,
    route: Vec<String>,
}

#[derive(Debug, Default)]
struct LoadState {
    issued: AtomicU64,
    ok: AtomicU64,
    ok_by_resource: [AtomicU64; MIX.len()],
    answers: Mutex<Vec<Answer>>,
    failures: Mutex<BTreeMap<String, u64>>,
    stop: AtomicBool,
    paused: AtomicBool,
}

/// A steady share load from the consumer at 350103.
struct Load {
    state: Arc<LoadState>,
    workers: Vec<JoinHandle<()>>,
}

/// What a load did.
#[derive(Debug)]
struct LoadReport {
    issued: u64,
    answers: Vec<Answer>,
    failures: BTreeMap<String, u64>,
}

impl Load {
    fn start(client: AgencyClient<Channel>, keys: Vec<String>, tag: &'static str) -> Self {
        let state = Arc::new(LoadState::default());
        let workers = (0..WORKERS)
            .map(|w| {
                let mut client = client.clone();
                let keys = keys.clone();
                let state = state.clone();
                tokio::spawn(async move {
                    // Workers start spread over one interval.
                    let first = tokio::time::Instant::now() + PACE * (w as u32) / (WORKERS as u32);
                    let mut tick = tokio::time::interval_at(first, PACE);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        if state.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        if state.paused.load(Ordering::SeqCst) {
                            continue;
                        }
                        let i = state.issued.fetch_add(1, Ordering::SeqCst);
                        if i >= MAX_REQUESTS {
                            break;
                        }
                        let r = usize::try_from(i).unwrap_or(0) % MIX.len();
                        let request_id = format!("{tag}-{i:06}");
                        let mut req = tonic::Request::new(ShareRequest {
                            request_id: request_id.clone(),
                            resource_id: MIX[r].to_owned(),
                            mode: ShareMode::Query as i32,
                            key: keys[r].clone(),
                            fields: vec!["name".to_owned()],
                            purpose: "audit fault test".to_owned(),
                            ..Default::default()
                        });
                        req.set_timeout(Duration::from_secs(5));
                        match client.share(req).await {
                            Ok(resp) => {
                                let resp = resp.into_inner();
                                if resp.request_id != request_id
                                    || resp.records.len() != 1
                                    || resp.from_cache
                                {
                                    *lock(&state.failures)
                                        .entry(format!("bad answer to {request_id}: {resp:?}"))
                                        .or_default() += 1;
                                    continue;
                                }
                                lock(&state.answers).push(Answer {
                                    request_id,
                                    resource: MIX[r],
                                    route: resp.route.into_iter().map(|h| h.node_code).collect(),
                                });
                                state.ok_by_resource[r].fetch_add(1, Ordering::SeqCst);
                                state.ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(status) => {
                                *lock(&state.failures)
                                    .entry(format!("{:?}", status.code()))
                                    .or_default() += 1;
                            }
                        }
                    }
                })
            })
            .collect();
        Self { state, workers }
    }

    /// Stops issuing requests until [`Load::resume`]; requests under way finish.
    fn pause(&self) {
        self.state.paused.store(true, Ordering::SeqCst);
    }

    fn resume(&self) {
        self.state.paused.store(false, Ordering::SeqCst);
    }

    fn ok(&self) -> u64 {
        self.state.ok.load(Ordering::SeqCst)
    }

    fn ok_of(&self, resource: usize) -> u64 {
        self.state.ok_by_resource[resource].load(Ordering::SeqCst)
    }

    /// Waits until at least `n` shares returned OK.
    async fn wait_ok(&self, n: u64) -> Result<()> {
        self.wait(&format!("{n} OK shares"), || self.ok() >= n)
            .await
    }

    /// Waits until at least `n` shares of `MIX[resource]` returned OK.
    async fn wait_ok_of(&self, resource: usize, n: u64) -> Result<()> {
        self.wait(&format!("{n} OK shares of {}", MIX[resource]), || {
            self.ok_of(resource) >= n
        })
        .await
    }

    async fn wait(&self, what: &str, done: impl Fn() -> bool) -> Result<()> {
        let began = Instant::now();
        while !done() {
            if began.elapsed() > WAIT {
                bail!(
                    "load: {what} not reached within {WAIT:?} (ok {}, issued {}, failures {:?})",
                    self.ok(),
                    self.state.issued.load(Ordering::SeqCst),
                    lock(&self.state.failures)
                );
            }
            if self.workers.iter().all(JoinHandle::is_finished) {
                bail!("load: {what} not reached; the load ended");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn stop(self) -> Result<LoadReport> {
        self.state.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            w.await?;
        }
        let issued = self.state.issued.load(Ordering::SeqCst).min(MAX_REQUESTS);
        Ok(LoadReport {
            issued,
            answers: std::mem::take(&mut *lock(&self.state.answers)),
            failures: std::mem::take(&mut *lock(&self.state.failures)),
        })
    }
}

/// Nodes whose provider agencies keep publishing new catalog entries during the replica faults: a county under
/// the replicated city, and the other city.
const PUBLISHING: [&str; 2] = ["350102", "350200"];

/// Agencies publishing a new entry every [`PACE`] each while the faults happen.
struct Publishers {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Result<Tally>>>,
    /// Entries published before they started, at every node.
    before: u64,
}

/// Publications one publisher got acknowledged, and its failures by code.
type Tally = (u64, BTreeMap<String, u64>);

/// What the publishers did.
struct Published {
    ok: u64,
    failures: BTreeMap<String, u64>,
    before: u64,
}

impl Publishers {
    async fn start(fed: &ProcessFederation) -> Result<Self> {
        let mut before = 0;
        for n in fed.node_codes() {
            if let Ok(p) = fed.provider_at(n) {
                before += p.published.len() as u64;
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for node in PUBLISHING {
            let provider = fed.provider_at(code(node))?;
            let mut client = fed.client(&provider.uscc).await?;
            let stop = stop.clone();
            workers.push(tokio::spawn(async move {
                let (mut ok, mut failures) = (0, BTreeMap::<String, u64>::new());
                let mut tick = tokio::time::interval(PACE);
                for i in 0.. {
                    tick.tick().await;
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut entry = fedgate_examples::civil_affairs_entries(
                        ShareType::Unconditional,
                        ShareType::Unconditional,
                    )
                    .remove(0);
                    entry.id = format!("extra-{i:04}");
                    let mut req = tonic::Request::new(fedgate_proto::v1::PublishEntryRequest {
                        entry: Some(entry),
                    });
                    req.set_timeout(Duration::from_secs(5));
                    match client.publish_entry(req).await {
                        Ok(_) => ok += 1,
                        Err(status) => {
                            *failures.entry(format!("{:?}", status.code())).or_default() += 1;
                        }
                    }
                }
                Ok((ok, failures))
            }));
        }
        Ok(Self {
            stop,
            workers,
            before,
        })
    }

    async fn stop(self) -> Result<Published> {
        self.stop.store(true, Ordering::SeqCst);
        let mut published = Published {
            ok: 0,
            failures: BTreeMap::new(),
            before: self.before,
        };
        for w in self.workers {
            let (ok, failures) = w.await??;
            published.ok += ok;
            for (k, n) in failures {
                *published.failures.entry(k).or_default() += n;
            }
        }
        Ok(published)
    }
}

impl Published {
    /// Every acknowledged entry reaches the province, and nothing else: its catalog counts exactly.
    async fn check(&self, fed: &ProcessFederation) -> Result<String> {
        if let Some(code) = self.failures.keys().find(|k| k.as_str() != "Unavailable") {
            bail!(
                "a publication failed with {code} (failures {:?})",
                self.failures
            );
        }
        if self.ok == 0 {
            bail!("no publication succeeded during the faults");
        }
        let StorageConfig::Postgres { url, .. } = &fed.node_config(code(PROVINCE))?.storage else {
            bail!("the province is not on PostgreSQL");
        };
        let store = PgStore::connect_existing(url).await?;
        let expected = self.before + self.ok;
        let began = Instant::now();
        let result = loop {
            let held = store.count_entries().await?;
            if held == expected {
                break Ok(format!(
                    "catalog: {} entries published during the faults ({:?} refused); the province holds {held}",
                    self.ok, self.failures
                ));
            }
            if began.elapsed() > WAIT {
                break Err(anyhow!(
                    "the province holds {held} catalog entries; {} were published before the faults and {}                      during them",
                    self.before,
                    self.ok
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        store.close().await;
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// (a) The province is stopped with SIGTERM and restarted, twice.
    ProvinceRestart,
    /// (b) The city is killed with SIGKILL and restarted, twice.
    CityKill,
    /// (c) The city's link to the province is cut: at once, in the middle of a batch, and as it is acknowledged.
    LinkCuts,
    /// (d) Province and city run as two replicas each on PostgreSQL; each province replica, then the city replica
    /// shipping the city's streams, is killed with SIGKILL and restarted.
    ReplicaKill,
}

/// Timings and notes of one run, printed at the end (`--nocapture` shows them).
#[derive(Debug, Default)]
struct Timings {
    binary: Duration,
    federation_up: Duration,
    faults: Duration,
    settled: Duration,
    verified: Duration,
    notes: Vec<String>,
}

#[tokio::test]
async fn province_stopped_and_restarted_under_load_loses_and_duplicates_no_record() -> Result<()> {
    fault_test(Fault::ProvinceRestart, "prov").await
}

#[tokio::test]
async fn city_killed_with_sigkill_under_load_loses_and_duplicates_no_record() -> Result<()> {
    fault_test(Fault::CityKill, "kill").await
}

#[tokio::test]
async fn forwarding_link_cut_mid_batch_loses_and_duplicates_no_record() -> Result<()> {
    fault_test(Fault::LinkCuts, "cut").await
}

/// Needs a PostgreSQL server (`FEDGATE_TEST_POSTGRES`); passes without doing anything when none is configured,
/// unless `FEDGATE_REQUIRE_POSTGRES=1`.
#[tokio::test]
async fn replicas_killed_with_sigkill_under_load_lose_and_duplicate_nothing() -> Result<()> {
    fault_test(Fault::ReplicaKill, "repl").await
}

async fn fault_test(fault: Fault, tag: &'static str) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let began = Instant::now();
    let mut timings = Timings::default();
    fedgate_binary().await?;
    timings.binary = began.elapsed();
    let relayed = match fault {
        Fault::LinkCuts => vec![code(CITY)],
        _ => Vec::new(),
    };
    let mut databases: Vec<ScratchDb> = Vec::new();
    let mut fed = if fault == Fault::ReplicaKill {
        let (Some(province_db), Some(city_db)) =
            (scratch_database().await?, scratch_database().await?)
        else {
            return Ok(());
        };
        let urls = [
            (PROVINCE, province_db.url.clone()),
            (CITY, city_db.url.clone()),
        ];
        databases.extend([province_db, city_db]);
        // Replicas of a node share its database and its signing key.
        let configure = move |c: &mut fedgate_gateway::config::NodeConfig| {
            if let Some((node, url)) = urls.iter().find(|(n, _)| *n == c.code) {
                c.storage = StorageConfig::Postgres {
                    url: url.clone(),
                    busy_timeout_ms: fedgate_gateway::config::DEFAULT_BUSY_TIMEOUT_MS,
                };
                c.signing_key = Some(format!("node-{node}-signing.key").into());
            }
        };
        let replicas = BTreeMap::from([(code(PROVINCE), 1), (code(CITY), 1)]);
        ProcessFederation::start_replicated(topology()?, &relayed, &configure, &replicas).await?
    } else {
        ProcessFederation::start(topology()?, &relayed).await?
    };
    timings.federation_up = began.elapsed() - timings.binary;
    let outcome = tokio::time::timeout(TEST_BOUND, exercise(&mut fed, fault, tag, &mut timings))
        .await
        .unwrap_or_else(|_| Err(anyhow!("the test did not finish within {TEST_BOUND:?}")));
    let passed = format!(
        "after {:.1?} (binary {:.1?}, federation up {:.1?}, load and faults {:.1?}, settled {:.1?}, \
         verified {:.1?})",
        began.elapsed(),
        timings.binary,
        timings.federation_up,
        timings.faults,
        timings.settled,
        timings.verified
    );
    fed.conclude(&format!("{fault:?}"), outcome, &timings.notes, passed)
        .await
        .and(drop_all(databases).await)
}

async fn drop_all(databases: Vec<ScratchDb>) -> Result<()> {
    for db in databases {
        db.drop_database().await?;
    }
    Ok(())
}

/// The replica of `node` that holds the lease of its upward audit stream.
async fn stream_holder(fed: &ProcessFederation, node: DivisionCode) -> Result<Member> {
    let StorageConfig::Postgres { url, .. } = &fed.node_config(node)?.storage else {
        bail!("node {node} is not on PostgreSQL");
    };
    let began = Instant::now();
    loop {
        let store = PgStore::connect_existing(url).await?;
        let holder = store.lease_holder("uplink:audit").await?;
        store.close().await;
        // A holder is named host/pid/nonce.
        let pid = holder.as_deref().and_then(|h| h.split('/').nth(1));
        let holders: Vec<Member> = (0..2)
            .map(|r| Member::replica(node, r))
            .filter(|m| fed.is_running(*m))
            .filter(|m| {
                fed.pid(*m)
                    .is_ok_and(|p| pid == Some(p.to_string().as_str()))
            })
            .collect();
        if let [one] = holders.as_slice() {
            return Ok(*one);
        }
        if began.elapsed() > WAIT {
            bail!("no running replica of {node} holds its audit stream's lease");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn exercise(
    fed: &mut ProcessFederation,
    fault: Fault,
    tag: &'static str,
    timings: &mut Timings,
) -> Result<String> {
    let began = Instant::now();
    let consumer = fed.consumer_at(code(CONSUMER_NODE))?.uscc.clone();
    let client = fed.client(&consumer).await?;
    let keys = MIX
        .iter()
        .enumerate()
        .map(|(i, r)| fed.key_at(node_of(r), i))
        .collect::<Result<Vec<_>>>()?;
    let load = Load::start(client, keys, tag);
    // Every route answers before any fault.
    for r in 0..MIX.len() {
        load.wait_ok_of(r, 2).await?;
    }
    load.wait_ok(20).await?;
    let province = code(PROVINCE);
    let city = code(CITY);
    let publishers = if fault == Fault::ReplicaKill {
        Some(Publishers::start(fed).await?)
    } else {
        None
    };

    match fault {
        Fault::ProvinceRestart => {
            for round in 1..=2 {
                let took = fed.terminate(province).await?;
                let cross = load.ok_of(CROSS_CITY);
                load.wait_ok(load.ok() + 15).await?;
                let during = load.ok_of(CROSS_CITY) - cross;
                if during > WORKERS as u64 {
                    bail!("{during} cross-city shares returned OK while the province was down");
                }
                let up = fed.start_node(province).await?;
                timings.notes.push(format!(
                    "round {round}: province exited {took:.1?} after SIGTERM, listened {up:.1?} after restart"
                ));
                load.wait_ok_of(CROSS_CITY, load.ok_of(CROSS_CITY) + 4)
                    .await?;
                load.wait_ok(load.ok() + 12).await?;
            }
        }
        Fault::CityKill => {
            for round in 1..=2 {
                fed.kill9(city).await?;
                let cross = load.ok_of(CROSS_COUNTY);
                let same = load.ok_of(SAME_COUNTY);
                load.wait_ok_of(SAME_COUNTY, same + 6).await?;
                let during = load.ok_of(CROSS_COUNTY) - cross;
                if during > WORKERS as u64 {
                    bail!("{during} cross-county shares returned OK while the city was dead");
                }
                let up = fed.start_node(city).await?;
                timings.notes.push(format!(
                    "round {round}: city killed, listened {up:.1?} after restart"
                ));
                load.wait_ok_of(CROSS_COUNTY, load.ok_of(CROSS_COUNTY) + 4)
                    .await?;
                load.wait_ok_of(CROSS_CITY, load.ok_of(CROSS_CITY) + 4)
                    .await?;
                load.wait_ok(load.ok() + 12).await?;
            }
        }
        Fault::LinkCuts => {
            let relay = fed.relay(city)?;
            for _ in 0..3 {
                load.wait_ok(load.ok() + 8).await?;
                relay.cut();
            }
            // A backlog of about 16 shares is some 40 records (over 14 KiB) in one batch.
            for point in [
                CutPoint::MidUpload { after_bytes: 4096 },
                CutPoint::AckLost { after_bytes: 4096 },
                CutPoint::MidUpload { after_bytes: 8192 },
                CutPoint::AckLost { after_bytes: 8192 },
            ] {
                // The link is down while a backlog builds up at the city, then the batch carrying it is cut.
                relay.block();
                load.wait_ok(load.ok() + 16).await?;
                relay.unblock();
                let began = Instant::now();
                let how = relay.cut_at(point, WAIT).await?;
                let sprang = began.elapsed();
                // The city catches up (the load paused) before the next round, so that each round's batch is
                // about one backlog, however slow this machine is.
                load.pause();
                let caught_up = fed.wait_uplink_lag(city, 0, WAIT).await?;
                load.resume();
                timings.notes.push(format!(
                    "{point:?} sprang {sprang:.1?} after unblocking: {how}; the city caught up {caught_up:.1?} later"
                ));
                load.wait_ok(load.ok() + 8).await?;
            }
            load.wait_ok_of(CROSS_CITY, load.ok_of(CROSS_CITY) + 4)
                .await?;
            let s = relay.stats();
            timings.notes.push(format!(
                "relay: {} connections relayed, {} cut, {} refused, {} traps sprung, {} KiB up, {} KiB down",
                s.relayed.load(Ordering::Relaxed),
                s.cut.load(Ordering::Relaxed),
                s.refused.load(Ordering::Relaxed),
                s.sprung.load(Ordering::Relaxed),
                s.bytes_up.load(Ordering::Relaxed) / 1024,
                s.bytes_down.load(Ordering::Relaxed) / 1024,
            ));
        }
        Fault::ReplicaKill => {
            // Each province replica in turn: shares keep crossing the province through the other one.
            for r in 0..2 {
                let replica = Member::replica(province, r);
                fed.kill9(replica).await?;
                load.wait_ok_of(CROSS_CITY, load.ok_of(CROSS_CITY) + 4)
                    .await?;
                let up = fed.start_node(replica).await?;
                timings.notes.push(format!(
                    "province replica {r} killed; shares crossed the other; listened {up:.1?} after restart"
                ));
                load.wait_ok(load.ok() + 8).await?;
            }
            // The city replica shipping the city's streams: the other one takes them over.
            for round in 1..=2 {
                let holder = stream_holder(fed, city).await?;
                fed.kill9(holder).await?;
                let killed = Instant::now();
                let successor = stream_holder(fed, city).await?;
                let took_over = killed.elapsed();
                load.wait_ok_of(CROSS_COUNTY, load.ok_of(CROSS_COUNTY) + 4)
                    .await?;
                let up = fed.start_node(holder).await?;
                timings.notes.push(format!(
                    "round {round}: city replica {holder} killed while shipping; {successor} took the streams over {took_over:.1?} later; {holder} listened {up:.1?} after restart"
                ));
                load.wait_ok(load.ok() + 8).await?;
            }
        }
    }

    let published = match publishers {
        Some(p) => Some(p.stop().await?),
        None => None,
    };
    let report = load.stop().await?;
    timings.faults = began.elapsed();
    timings.notes.push(format!(
        "load: {} requests, {} OK, failures {:?}",
        report.issued,
        report.answers.len(),
        report.failures
    ));
    if let Some(bad) = report.failures.keys().find(|k| k.starts_with("bad answer")) {
        bail!("{bad}");
    }
    // A share that fails because a node or link is down says so, and may be retried; nothing else may come back.
    if let Some(code) = report
        .failures
        .keys()
        .find(|k| !matches!(k.as_str(), "Unavailable" | "DeadlineExceeded"))
    {
        bail!(
            "a share failed with {code} during the faults (failures {:?})",
            report.failures
        );
    }

    let settled = fed.wait_audit_settled(SETTLE).await;
    if let Some(published) = &published {
        let note = published.check(fed).await?;
        timings.notes.push(note);
    }
    fed.stop_all().await?;
    let began = Instant::now();
    match settled {
        Ok(settled) => {
            timings.settled = settled.elapsed;
            let summary = verify(fed, &report, Some(&settled)).await?;
            timings.verified = began.elapsed();
            Ok(summary)
        }
        // Say what is missing or extra, not only that forwarding did not settle.
        Err(e) => match verify(fed, &report, None).await {
            Ok(_) => Err(e),
            Err(problems) => Err(e.context(format!("{problems:#}"))),
        },
    }
}

/// The first difference between `held` (a copy at `holder`) and `own` (the chain in its node), if any.
fn compare_chain(
    node: DivisionCode,
    holder: DivisionCode,
    held: &[AuditRecord],
    own: &[AuditRecord],
) -> Option<String> {
    let ids = |rs: &[AuditRecord]| -> BTreeSet<(u64, Vec<u8>)> {
        rs.iter().map(|r| (r.seq, r.hash.clone())).collect()
    };
    let (h, o) = (ids(held), ids(own));
    if held.len() == own.len() && h == o && held == own {
        return None;
    }
    let missing: Vec<u64> = o.difference(&h).map(|(s, _)| *s).take(10).collect();
    let extra: Vec<u64> = h.difference(&o).map(|(s, _)| *s).take(10).collect();
    let differing = held.iter().zip(own).find(|(a, b)| a != b).map(|(a, b)| {
        format!(
            "first differing record: {}#{} vs {}#{}",
            a.node_code, a.seq, b.node_code, b.seq
        )
    });
    Some(format!(
        "node {holder} holds {} records of node {node}, which wrote {}; missing seqs (first 10) {missing:?}, \
         extra or altered seqs (first 10) {extra:?}; {}",
        held.len(),
        own.len(),
        differing.unwrap_or_default()
    ))
}

/// One chain to verify: where it is held, whose it is, its records and the key pinned for it there.
struct VerifyJob {
    place: String,
    node: String,
    records: Vec<AuditRecord>,
    key: Option<Vec<u8>>,
}

/// Verifies chains on blocking threads, all at once (debug builds check signatures slowly); returns each
/// job's place and node with the key its chain announces.
async fn verify_all(jobs: Vec<VerifyJob>) -> Result<Vec<(String, String, Result<Vec<u8>>)>> {
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|j| {
            tokio::task::spawn_blocking(move || {
                let r = verify_chain(&j.node, &j.records, j.key);
                (j.place, j.node, r)
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await?);
    }
    Ok(out)
}

/// Checks the databases of the stopped federation against each other and against the load's answers;
/// `settled` is what forwarding had reached with every node up, if it settled.
async fn verify(
    fed: &ProcessFederation,
    load: &LoadReport,
    settled: Option<&Settled>,
) -> Result<String> {
    let root = fed.root()?;
    let mut dumps = BTreeMap::new();
    for c in fed.node_codes() {
        dumps.insert(c, fed.audit_dump(c).await?);
    }
    let mut problems = Vec::new();

    // Every chain verifies from its first record: in its own node, and the root's copy with the key the root
    // pinned. Copies held between them are compared record by record with the verified chain.
    let mut jobs = Vec::new();
    for (c, dump) in &dumps {
        jobs.push(VerifyJob {
            place: format!("node {c}'s own store"),
            node: c.to_string(),
            records: dump.chain(c.as_str()).to_vec(),
            key: None,
        });
        if *c != root {
            let pinned = dumps[&root].keys.get(c.as_str()).cloned();
            if pinned.is_none() {
                problems.push(format!("node {root} pinned no key for node {c}"));
            }
            jobs.push(VerifyJob {
                place: format!("node {root}'s copy"),
                node: c.to_string(),
                records: dumps[&root].chain(c.as_str()).to_vec(),
                key: pinned,
            });
        }
    }
    let mut keys = BTreeMap::new();
    for (place, node, result) in verify_all(jobs).await? {
        match result {
            Ok(key) => {
                if place.contains("own store") {
                    keys.insert(node, key);
                }
            }
            Err(e) => problems.push(format!("in {place}: {e:#}")),
        }
    }

    for (c, dump) in &dumps {
        let own = dump.chain(c.as_str());
        // Nothing a node wrote after forwarding settled was left unforwarded. The root forwards nothing: it may
        // still record what it sees as its neighbours stop (for instance a connection cut mid-handshake, in the
        // summary it writes at its own stop); the checks below cover its chain as it ended.
        if *c != root
            && let Some(had) = settled.map(|s| s.chains[c])
            && own.len() as u64 != had
        {
            problems.push(format!(
                "node {c} wrote {} records but had {had} when forwarding settled",
                own.len(),
            ));
        }
        // Every node holds exactly the records of its subtree: the same records, as many, and nothing else.
        problems.extend(subtree_problems(fed, &dumps, *c));
        let subtree = fed.subtree(*c);
        for n in subtree.iter().filter(|n| *n != c) {
            if let Some(p) =
                compare_chain(*n, *c, dump.chain(n.as_str()), dumps[n].chain(n.as_str()))
            {
                problems.push(p);
            }
            if dump.keys.get(n.as_str()) != keys.get(n.as_str()) {
                problems.push(format!(
                    "node {c} pinned another key for node {n} than the one its chain announces"
                ));
            }
        }
    }

    // Every share answered OK is recorded OK at its consumer's node and its provider's node, and as forwarded at
    // every node between them.
    let mut index: HashMap<DivisionCode, HashMap<&str, Vec<&str>>> = HashMap::new();
    for (c, dump) in &dumps {
        let by_id = index.entry(*c).or_default();
        for r in dump.chain(c.as_str()) {
            if !r.request_id.is_empty() {
                by_id
                    .entry(r.request_id.as_str())
                    .or_default()
                    .push(r.outcome.as_str());
            }
        }
    }
    let consumer = code(CONSUMER_NODE);
    let mut unrecorded = Vec::new();
    for a in &load.answers {
        let ends: BTreeSet<DivisionCode> = [consumer, node_of(a.resource)].into();
        let mut nodes = ends.clone();
        for hop in &a.route {
            nodes.insert(code(hop));
        }
        for n in nodes {
            let expected = if ends.contains(&n) {
                "OK"
            } else {
                fedgate_gateway::audit::FORWARDED
            };
            let ok = index
                .get(&n)
                .and_then(|m| m.get(a.request_id.as_str()))
                .is_some_and(|outcomes| outcomes.contains(&expected));
            if !ok {
                unrecorded.push(format!("{} ({}) at node {n}", a.request_id, a.resource));
            }
        }
    }
    if !unrecorded.is_empty() {
        problems.push(format!(
            "{} OK shares lack their record (OK at either end, FORWARDED between), e.g. {:?}",
            unrecorded.len(),
            &unrecorded[..unrecorded.len().min(10)]
        ));
    }

    if !problems.is_empty() {
        bail!("the audit trail is wrong:\n- {}", problems.join("\n- "));
    }
    Ok(format!(
        "province holds {} records = {}; {} OK shares all recorded",
        dumps[&root].count,
        dumps
            .iter()
            .map(|(c, d)| format!("{c}:{}", d.chain(c.as_str()).len()))
            .collect::<Vec<_>>()
            .join(" + "),
        load.answers.len()
    ))
}
