//! Recovery of a node that lost what it had forwarded, over real node processes with SQLite stores (issue 11).
//!
//! The city 350100, between the province 350000 and the county 350102, is put back to an older copy of its store:
//!
//! - (a) a backup: its files copied while it was stopped; it runs on (shares, publications, the county's records
//!   passing through), is stopped and the copy put back; the restored city first serves while its link to the
//!   province is down (shares, publications that change entries it lost, the county sending again what the old
//!   copy lacks), then joins;
//! - (b) lost last commits: its files copied while its process is frozen under traffic; it runs on, is killed
//!   with SIGKILL and the image put back, so it loses every commit after that instant, as a node in SQLite's
//!   `synchronous=NORMAL` loses its last commits in a power cut; it joins at once.
//!
//! Afterwards, with every node stopped: every database passes `fedgate audit verify` and every chain verifies from
//! its first record; the province (and the city for its subtree) holds each record of the federation exactly once
//! — as many records of each node as that node's chain has, the same records, nothing else; the city's chain
//! records its recovery; the catalog at the city and the province is the entries as last published, including
//! those published after the restore; and the streams kept flowing: what happened after the recovery reached the
//! province.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use fedgate_gateway::store::{SqliteStore, Store};
use fedgate_proto::v1::{AuditOperation, AuditRecord, PublishEntryRequest, ShareType};
use fedgate_tests::process::{
    AuditDump, ProcessFederation, fedgate_binary, subtree_problems, verify_chain,
};
use fedgate_tests::{DivisionCode, NodeSpec, code, query, registry};

/// The tests start three node processes each; they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound of a whole test.
const TEST_BOUND: Duration = Duration::from_secs(300);
/// Deadline of forwarding settling.
const SETTLE: Duration = Duration::from_secs(90);
/// Shares per direction in each phase.
const SHARES: usize = 4;

const PROVINCE: &str = "350000";
const CITY: &str = "350100";
const COUNTY: &str = "350102";

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
        NodeSpec::new(COUNTY)?
            .consumer(1, "Gulou consumer")?
            .provider(2, "Gulou provider", registry(Unconditional, Conditional, 1))?,
    ])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// (a) Restored from a backup taken while it was stopped; serves cut off from its parent before it joins.
    Backup,
    /// (b) Put back to an image of its files frozen while it ran, after a SIGKILL; joins at once.
    LastCommits,
    /// (a), and then the province too is put back to an older image of its files, taken before the city's copy:
    /// the city sends again everything after the province's old cursor, positions its recovery left empty
    /// closed up.
    BackupThenParent,
}

#[tokio::test]
async fn a_province_restored_after_its_city_recovered_gets_everything_again() -> Result<()> {
    run(Loss::BackupThenParent).await
}

#[tokio::test]
async fn a_city_restored_from_a_backup_recovers_when_it_joins() -> Result<()> {
    run(Loss::Backup).await
}

#[tokio::test]
async fn a_city_that_lost_its_last_commits_recovers_when_it_joins() -> Result<()> {
    run(Loss::LastCommits).await
}

async fn run(loss: Loss) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let began = Instant::now();
    fedgate_binary().await?;
    let mut fed = ProcessFederation::start(topology()?, &[code(CITY)]).await?;
    let mut world = World::new(&fed);
    let outcome = tokio::time::timeout(TEST_BOUND, exercise(&mut fed, &mut world, loss))
        .await
        .unwrap_or_else(|_| Err(anyhow!("the test did not finish within {TEST_BOUND:?}")));
    fed.conclude(
        &format!("{loss:?}"),
        outcome,
        &world.notes,
        format_args!("after {:.1?}", began.elapsed()),
    )
    .await
}

/// What the test did, to check the federation against.
struct World {
    /// The live entries of the city and the county as last published: id → title.
    catalog: BTreeMap<String, String>,
    /// Requests made so far, to number them.
    requests: usize,
    notes: Vec<String>,
}

impl World {
    fn new(fed: &ProcessFederation) -> Self {
        let mut catalog = BTreeMap::new();
        for node in [CITY, COUNTY] {
            if let Ok(p) = fed.provider_at(code(node)) {
                for e in &p.published {
                    catalog.insert(e.id.clone(), e.title.clone());
                }
            }
        }
        Self {
            catalog,
            requests: 0,
            notes: Vec::new(),
        }
    }

    /// Publishes (or updates) `local` at `node` with `title`; returns its stored version.
    async fn publish(
        &mut self,
        fed: &ProcessFederation,
        node: &str,
        local: &str,
        title: &str,
    ) -> Result<u64> {
        let provider = fed.provider_at(code(node))?;
        let mut entry = provider
            .published
            .first()
            .context("the provider published an entry")?
            .clone();
        entry.id = local.to_owned();
        entry.title = title.to_owned();
        entry.version = 0;
        let stored = fed
            .client(&provider.uscc)
            .await?
            .publish_entry(PublishEntryRequest { entry: Some(entry) })
            .await
            .with_context(|| format!("publishing {node}:{local}"))?
            .into_inner()
            .entry
            .context("the stored entry")?;
        self.catalog.insert(stored.id.clone(), title.to_owned());
        Ok(stored.version)
    }

    /// Shares between the county and the city both ways, and from the province down to the county when its link
    /// is up: records at every node, the county's passing through the city.
    async fn shares(&mut self, fed: &ProcessFederation, province_up: bool) -> Result<()> {
        let mut routes = vec![(COUNTY, CITY), (CITY, COUNTY)];
        if province_up {
            routes.push((PROVINCE, COUNTY));
        }
        for (from, to) in routes {
            let consumer = fed.consumer_at(code(from))?.uscc.clone();
            let mut client = fed.client(&consumer).await?;
            for i in 0..SHARES {
                self.requests += 1;
                let key = fed.key_at(code(to), i)?;
                let mut req = query(&format!("{to}:household"), &key, &["name"]);
                req.request_id = format!("r-{:04}", self.requests);
                let mut req = tonic::Request::new(req);
                req.set_timeout(Duration::from_secs(10));
                let resp = client
                    .share(req)
                    .await
                    .with_context(|| format!("share {from} -> {to}"))?
                    .into_inner();
                ensure!(resp.records.len() == 1, "share {from} -> {to}: {resp:?}");
            }
        }
        Ok(())
    }

    /// Waits until forwarding has caught up (audit and catalog) with every node up.
    async fn settle(&mut self, fed: &ProcessFederation, what: &str) -> Result<()> {
        let settled = fed.wait_audit_settled(SETTLE).await?;
        let began = Instant::now();
        loop {
            let held = live_entries(fed.db_path(code(PROVINCE))?).await?;
            if held == self.catalog {
                break;
            }
            if began.elapsed() > SETTLE {
                bail!(
                    "{what}: the province's catalog did not come to the entries as published: holds {held:?}, \
                     published {:?}",
                    self.catalog
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.notes.push(format!(
            "{what}: settled in {:.1?} (chains {:?})",
            settled.elapsed, settled.chains
        ));
        Ok(())
    }
}

/// The live entries of the city and the county in a node's database (also while the node runs): id → title.
async fn live_entries(db: &Path) -> Result<BTreeMap<String, String>> {
    let store = SqliteStore::open_read_only(db).await?;
    let mut out = BTreeMap::new();
    for node in [CITY, COUNTY] {
        for e in store.own_entries(node, "", 10_000).await? {
            if !e.withdrawn {
                out.insert(e.entry.id, e.entry.title);
            }
        }
    }
    store.close().await;
    Ok(out)
}

async fn exercise(fed: &mut ProcessFederation, w: &mut World, loss: Loss) -> Result<String> {
    let (city, county) = (code(CITY), code(COUNTY));
    w.shares(fed, true).await?;
    w.publish(fed, CITY, "kept", "kept (before the copy)")
        .await?;
    w.publish(fed, CITY, "changed", "changed, first version")
        .await?;
    w.publish(fed, CITY, "updated", "updated, first version")
        .await?;
    w.settle(fed, "before the copy").await?;

    let province_copy = if loss == Loss::BackupThenParent {
        Some(fed.copy_store_frozen(code(PROVINCE), "province").await?)
    } else {
        None
    };
    let copy = match loss {
        Loss::Backup | Loss::BackupThenParent => {
            fed.terminate(city).await?;
            let copy = fed.copy_store(city, "backup")?;
            fed.start_node(city).await?;
            copy
        }
        Loss::LastCommits => {
            // Traffic the province may or may not have got when the image is taken.
            w.shares(fed, true).await?;
            w.publish(fed, CITY, "imaged", "published just before the image")
                .await?;
            fed.copy_store_frozen(city, "image").await?
        }
    };

    // What the city then loses: shares (its own records, and the county's it forwards), new entries and new
    // versions, the county's publication passing through.
    w.shares(fed, true).await?;
    w.publish(fed, CITY, "lost-new", "published after the copy")
        .await?;
    w.publish(fed, CITY, "changed", "changed after the copy")
        .await?;
    // Lost by the city and not changed there again: taken back from the province.
    w.publish(fed, CITY, "updated", "updated after the copy")
        .await?;
    w.publish(fed, CITY, "lost-only", "published after the copy, only")
        .await?;
    w.publish(fed, COUNTY, "county-new", "the county's, after the copy")
        .await?;
    w.shares(fed, true).await?;
    w.settle(fed, "before the loss").await?;
    let lost_chain = AuditCountsAt::read(fed, city).await?;

    match loss {
        Loss::Backup | Loss::BackupThenParent => {
            fed.terminate(city).await?;
        }
        Loss::LastCommits => fed.kill9(city).await?,
    }
    fed.restore_store(&copy)?;
    match loss {
        Loss::Backup | Loss::BackupThenParent => {
            // Restored, and cut off from the province: it serves, and writes over what it lost.
            fed.relay(city)?.block();
            fed.start_node(city).await?;
            w.shares(fed, false).await?;
            w.publish(fed, CITY, "while-cut", "published while cut off")
                .await?;
            // Entries it lost, changed here again: the province holds newer versions of them.
            w.publish(fed, CITY, "changed", "changed while cut off")
                .await?;
            w.publish(fed, CITY, "lost-new", "published again while cut off")
                .await?;
            w.publish(
                fed,
                COUNTY,
                "county-cut",
                "the county's, while the city is cut off",
            )
            .await?;
            w.shares(fed, false).await?;
            let restored = AuditCountsAt::read(fed, city).await?;
            w.notes.push(format!(
                "the city held {} records of its own before the loss, {} restored and written while cut off",
                lost_chain.own, restored.own
            ));
            fed.relay(city)?.unblock();
        }
        Loss::LastCommits => {
            fed.start_node(city).await?;
        }
    }
    w.settle(fed, "after the recovery").await?;

    // The streams go on.
    w.shares(fed, true).await?;
    w.publish(fed, CITY, "after", "published after the recovery")
        .await?;
    w.publish(fed, CITY, "lost-new", "changed after the recovery")
        .await?;
    w.publish(
        fed,
        COUNTY,
        "county-after",
        "the county's, after the recovery",
    )
    .await?;
    w.settle(fed, "after the recovery, more traffic").await?;

    if let Some(copy) = province_copy {
        // The province loses what it got since its image: its own records (nobody above holds them), and what the
        // city and the county had forwarded, which they send again.
        let province = code(PROVINCE);
        fed.kill9(province).await?;
        fed.restore_store(&copy)?;
        fed.start_node(province).await?;
        w.settle(fed, "after the province's loss").await?;
        let closed = fed.log_files(city).iter().any(|f| {
            std::fs::read_to_string(f)
                .is_ok_and(|t| t.contains("positions after its cursor closed up"))
        });
        ensure!(
            closed,
            "the city did not close up the positions its recovery left empty"
        );
        w.shares(fed, true).await?;
        w.publish(fed, CITY, "last", "published after the province's loss")
            .await?;
        w.settle(fed, "after the province's loss, more traffic")
            .await?;
    }

    fed.stop_all().await?;
    for c in fed.node_codes() {
        let catalog = live_entries(fed.db_path(c)?).await?;
        if c != county {
            ensure!(
                catalog == w.catalog,
                "node {c}'s catalog {catalog:?} is not the entries as last published {:?}",
                w.catalog
            );
        }
    }
    verify(fed).await
}

/// How many records of its own a node's database holds (also while it runs).
struct AuditCountsAt {
    own: u64,
}

impl AuditCountsAt {
    async fn read(fed: &ProcessFederation, node: DivisionCode) -> Result<Self> {
        let counts = fedgate_tests::process::audit_counts(fed.db_path(node)?).await?;
        Ok(Self {
            own: counts.of(node.as_str()),
        })
    }
}

/// Checks the databases of the stopped federation: every one passes `fedgate audit verify`, every chain verifies
/// from its first record where it was written and in every copy, every node holds exactly the records of its
/// subtree, and the city's chain records its recovery.
async fn verify(fed: &ProcessFederation) -> Result<String> {
    let bin = fedgate_binary().await?;
    let mut dumps = BTreeMap::new();
    for c in fed.node_codes() {
        let db = fed.db_path(c)?;
        let out = tokio::process::Command::new(&bin)
            .arg("audit")
            .arg("verify")
            .arg("--db")
            .arg(db)
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains("OK:"),
            "fedgate audit verify --db {}: {text}{}",
            db.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        dumps.insert(c, AuditDump::read(db).await?);
    }
    let mut problems = Vec::new();
    for (c, dump) in &dumps {
        let own = dump.chain(c.as_str());
        if let Err(e) = verify_chain(c.as_str(), own, None) {
            problems.push(format!("node {c}'s own chain: {e:#}"));
        }
        problems.extend(subtree_problems(fed, &dumps, *c));
        let subtree = fed.subtree(*c);
        for n in subtree.iter().filter(|n| *n != c) {
            let copy = dump.chain(n.as_str());
            let original = dumps[n].chain(n.as_str());
            // The same records: everything but the signature, which a node may add to a record later (a restored
            // node signs its unsigned head again at start; the copy above may hold it covered by a later one).
            let unsigned = |rs: &[AuditRecord]| -> Vec<AuditRecord> {
                rs.iter()
                    .map(|r| AuditRecord {
                        signature: Vec::new(),
                        ..r.clone()
                    })
                    .collect()
            };
            let (a, b) = (unsigned(copy), unsigned(original));
            if a != b {
                let first = a
                    .iter()
                    .zip(&b)
                    .position(|(x, y)| x != y)
                    .unwrap_or(a.len().min(b.len()));
                problems.push(format!(
                    "node {c} holds {} records of {n}, which wrote {}; they differ from record {}",
                    copy.len(),
                    original.len(),
                    first + 1
                ));
            }
            if let Err(e) = verify_chain(n.as_str(), copy, dump.keys.get(n.as_str()).cloned()) {
                problems.push(format!("node {c}'s copy of {n}: {e:#}"));
            }
        }
    }
    let city = dumps[&code(CITY)].chain(CITY);
    let recoveries: Vec<&str> = city
        .iter()
        .filter(|r| r.operation == AuditOperation::Recovery as i32)
        .map(|r| r.detail.as_str())
        .collect();
    if !recoveries.iter().any(|d| d.contains("records"))
        || !recoveries.iter().any(|d| d.contains("catalog"))
    {
        problems.push(format!(
            "the city's chain does not record the recovery of both streams: {recoveries:?}"
        ));
    }
    if !problems.is_empty() {
        bail!("after the recovery:\n- {}", problems.join("\n- "));
    }
    Ok(format!(
        "province holds {} records = {}; the city recorded: {}",
        dumps[&code(PROVINCE)].count,
        dumps
            .iter()
            .map(|(c, d)| format!("{c}:{}", d.chain(c.as_str()).len()))
            .collect::<Vec<_>>()
            .join(" + "),
        recoveries.join(" | ")
    ))
}
