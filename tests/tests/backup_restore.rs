//! Backup and restore over real `fedgate` processes (issue 11, "Backup and restore").
//!
//! - A county is backed up with `fedgate backup` while its provider keeps publishing and its data keeps being
//!   shared; it is stopped, restored with `fedgate restore` into a fresh directory and started again: the backup
//!   is the store as of one instant (its audit chain a prefix of the original's, every entry acknowledged before
//!   the backup began in it, none published after it ended), the key material is the node's own, the node serves
//!   its catalog and shares, and `fedgate audit verify` accepts its chain.
//! - An encrypted backup opens only with its key; a restore over an existing store without `--force`, under a
//!   running node, with the wrong key, or from a damaged or truncated file is refused with its exit status and
//!   changes no file.
//! - The same on PostgreSQL (`pg_dump`/`pg_restore`) when `FEDGATE_TEST_POSTGRES` names a server.
//! - Back up, run more traffic, restore the older backup, restart: the province holds each record once and the
//!   catalogs match. This needs the recovery a restored node performs at Join (see the test).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_gateway::config::DEFAULT_BUSY_TIMEOUT_MS;
use fedgate_gateway::config::{StorageConfig, TlsFiles};
use fedgate_gateway::store::{PgStore, SqliteStore, Store};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    AuditRecord, CatalogEntry, PublishEntryRequest, SearchCatalogRequest, ShareType,
};
use fedgate_tests::postgres::scratch_database;
use fedgate_tests::process::{AuditDump, ProcessFederation};
use fedgate_tests::{DivisionCode, NodeSpec, code, query, registry};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The tests start node processes; one at a time keeps two cores enough.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Deadline of every wait for progress.
const WAIT: Duration = Duration::from_secs(30);
/// Deadline of audit forwarding settling.
const SETTLE: Duration = Duration::from_secs(60);
/// Interval between two steps of the traffic (a publish and a share each).
const PACE: Duration = Duration::from_millis(40);

const PROVINCE: &str = "350000";
const CITY: &str = "350100";
const COUNTY: &str = "350102";

fn federation() -> Result<Vec<NodeSpec>> {
    Ok(vec![
        NodeSpec::new(PROVINCE)?.consumer(1, "province consumer")?,
        NodeSpec::new(CITY)?.consumer(1, "Fuzhou consumer")?,
        county()?,
    ])
}

fn county() -> Result<NodeSpec> {
    NodeSpec::new(COUNTY)?
        .consumer(1, "Gulou consumer")?
        .provider(
            2,
            "Gulou provider",
            registry(ShareType::Unconditional, ShareType::Conditional, 1),
        )
}

/// An entry the traffic published, with when its publication began and was answered.
#[derive(Debug, Clone)]
struct Published {
    id: String,
    version: u64,
    started: Instant,
    answered: Instant,
}

#[derive(Debug, Default)]
struct TrafficState {
    stop: AtomicBool,
    published: Mutex<Vec<Published>>,
    shares: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// The county's provider publishing a new entry, and a consumer sharing the county's household data, in turn,
/// until stopped.
struct Traffic {
    state: Arc<TrafficState>,
    task: JoinHandle<()>,
}

impl Traffic {
    async fn start(
        fed: &ProcessFederation,
        consumer_node: &str,
        tag: &'static str,
    ) -> Result<Self> {
        let county = code(COUNTY);
        let provider = fed.provider_at(county)?;
        let template = provider
            .published
            .first()
            .cloned()
            .context("the county's provider published its catalog")?;
        let mut publisher = fed.client(&provider.uscc).await?;
        let mut consumer = fed
            .client(&fed.consumer_at(code(consumer_node))?.uscc)
            .await?;
        let key = fed.key_at(county, 0)?;
        let state = Arc::new(TrafficState::default());
        let s = state.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PACE);
            for i in 0u64.. {
                tick.tick().await;
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut entry = template.clone();
                entry.id = format!("{tag}-{i:05}");
                entry.title = format!("backup traffic {tag} {i}");
                let started = Instant::now();
                match publisher
                    .publish_entry(PublishEntryRequest { entry: Some(entry) })
                    .await
                {
                    Ok(resp) => match resp.into_inner().entry {
                        Some(e) => lock(&s.published).push(Published {
                            id: e.id,
                            version: e.version,
                            started,
                            answered: Instant::now(),
                        }),
                        None => lock(&s.failures).push("publish answered no entry".into()),
                    },
                    Err(status) => lock(&s.failures).push(format!("publish: {status:?}")),
                }
                match consumer
                    .share(query(&format!("{COUNTY}:household"), &key, &["name"]))
                    .await
                {
                    Ok(resp) if resp.get_ref().records.len() == 1 => {
                        s.shares.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(resp) => lock(&s.failures).push(format!("share: {:?}", resp.into_inner())),
                    Err(status) => lock(&s.failures).push(format!("share: {status:?}")),
                }
            }
        });
        Ok(Self { state, task })
    }

    fn published(&self) -> Vec<Published> {
        lock(&self.state.published).clone()
    }

    /// Waits until `n` more entries were published and `n` more shares answered than when it was called.
    async fn wait_more(&self, n: usize) -> Result<()> {
        let (p0, s0) = (
            self.published().len(),
            self.state.shares.load(Ordering::SeqCst),
        );
        let began = Instant::now();
        loop {
            let (p, s) = (
                self.published().len(),
                self.state.shares.load(Ordering::SeqCst),
            );
            if p >= p0 + n && s >= s0 + n as u64 {
                return Ok(());
            }
            if began.elapsed() > WAIT || self.task.is_finished() {
                bail!(
                    "traffic: {p} published and {s} shared, wanted {n} more than {p0} and {s0}; failures {:?}",
                    lock(&self.state.failures)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the traffic; every publish and share must have succeeded. Returns what was published.
    async fn stop(self) -> Result<Vec<Published>> {
        self.state.stop.store(true, Ordering::SeqCst);
        self.task.await?;
        let failures = lock(&self.state.failures).clone();
        if !failures.is_empty() {
            bail!("the traffic failed: {failures:?}");
        }
        Ok(std::mem::take(&mut *lock(&self.state.published)))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a backup must hold, judged by when each publication happened.
#[derive(Debug)]
struct PointInTime {
    /// Answered before the backup began: in the backup.
    before: Vec<Published>,
    /// Begun after the backup had ended: not in it.
    after: Vec<Published>,
}

impl PointInTime {
    fn of(published: &[Published], began: Instant, ended: Instant) -> Self {
        Self {
            before: published
                .iter()
                .filter(|p| p.answered < began)
                .cloned()
                .collect(),
            after: published
                .iter()
                .filter(|p| p.started > ended)
                .cloned()
                .collect(),
        }
    }

    /// Checks a restored store: every entry of `before` at its version, none of `after`.
    async fn check(&self, store: &dyn Store) -> Result<()> {
        if self.before.is_empty() || self.after.is_empty() {
            bail!("the traffic published nothing before or after the backup: {self:?}");
        }
        for p in &self.before {
            let stored = store
                .entry(&p.id)
                .await?
                .with_context(|| format!("{} was published before the backup began", p.id))?;
            assert_eq!(stored.entry.version, p.version, "{}", p.id);
        }
        for p in &self.after {
            if store.entry(&p.id).await?.is_some() {
                bail!("{} was published after the backup ended but is in it", p.id);
            }
        }
        Ok(())
    }
}

/// Every entry a node's catalog search returns for `node_code`, by id.
async fn search_all(
    client: &mut AgencyClient<Channel>,
    node_code: &str,
) -> Result<BTreeMap<String, CatalogEntry>> {
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = client
            .search_catalog(SearchCatalogRequest {
                node_code: node_code.to_owned(),
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.entries.into_iter().map(|e| (e.id.clone(), e)));
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// Every file under `dir` (but the logs and backups) and its bytes.
fn files(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name == "logs" || name == "backups" {
                continue;
            }
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p)?);
            }
        }
    }
    Ok(out)
}

/// The node's configuration file, as an argument.
fn config_arg(fed: &ProcessFederation, node: DivisionCode) -> Result<String> {
    Ok(fed.config_path(node)?.display().to_string())
}

/// A new directory for backups in the federation's directory.
fn backups(fed: &ProcessFederation) -> Result<PathBuf> {
    let dir = fed.dir().join("backups");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test]
async fn a_node_backed_up_under_traffic_comes_back_from_its_backup_in_a_fresh_directory()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    back_up_under_traffic_and_restore("fresh", false).await
}

// After the restore the county's head is behind what the city already holds of its streams; at Join it takes
// the city's records and items back and continues its chain after them (the uplink's recovery).
#[tokio::test]
async fn after_restoring_an_older_backup_the_province_holds_each_record_once() -> Result<()> {
    let _serial = SERIAL.lock().await;
    back_up_under_traffic_and_restore("older", true).await
}

/// Backs the county up under traffic, runs more traffic, stops it, restores into a fresh directory and starts
/// it; with `federation_checks`, then waits for forwarding to settle and compares the province's copy of the
/// county's chain and catalog with the county's own.
async fn back_up_under_traffic_and_restore(
    tag: &'static str,
    federation_checks: bool,
) -> Result<()> {
    let mut fed = ProcessFederation::start(federation()?, &[]).await?;
    let county = code(COUNTY);
    let original = fed.node_config(county)?.clone();
    let archive = backups(&fed)?.join("node-350102.tar");

    let traffic = Traffic::start(&fed, CITY, tag).await?;
    traffic.wait_more(15).await?;
    let began = Instant::now();
    let out = fed
        .fedgate([
            "backup",
            "--config",
            &config_arg(&fed, county)?,
            "--out",
            &archive.display().to_string(),
        ])
        .await?;
    out.expect_success()?;
    let ended = Instant::now();
    println!(
        "{}(backup under traffic took {:?})",
        out.stdout,
        ended - began
    );
    traffic.wait_more(15).await?;
    let published = traffic.stop().await?;
    let point = PointInTime::of(&published, began, ended);
    // Everything written after the backup reaches the city: a restore from the backup loses nothing the
    // federation does not hold.
    fed.wait_uplink_lag(county, 0, WAIT).await?;
    fed.terminate(county).await?;
    let before_restore = AuditDump::read(fed.db_path(county)?).await?;

    let fresh = fed.dir().join("restored-350102");
    fed.reconfigure(county, |c| {
        c.storage = StorageConfig::Sqlite {
            path: fresh.join("state/node-350102.db"),
            busy_timeout_ms: DEFAULT_BUSY_TIMEOUT_MS,
        };
        c.signing_key = None;
        c.tls = TlsFiles {
            ca: fresh.join("pki/ca.crt"),
            cert: fresh.join("pki/node.crt"),
            key: fresh.join("pki/node.key"),
        };
    })?;
    let out = fed
        .fedgate([
            "restore",
            "--config",
            &config_arg(&fed, county)?,
            "--in",
            &archive.display().to_string(),
        ])
        .await?;
    out.expect_success()?;
    println!("{}", out.stdout);

    // The node's own key material came back.
    let restored = fed.node_config(county)?.clone();
    for (was, now) in [
        (original.signing_key_path(), restored.signing_key_path()),
        (Some(original.tls.ca.clone()), Some(restored.tls.ca.clone())),
        (
            Some(original.tls.cert.clone()),
            Some(restored.tls.cert.clone()),
        ),
        (
            Some(original.tls.key.clone()),
            Some(restored.tls.key.clone()),
        ),
    ] {
        let (was, now) = (
            was.context("a signing key path")?,
            now.context("a signing key path")?,
        );
        assert_eq!(
            std::fs::read(&was)?,
            std::fs::read(&now)?,
            "{}",
            now.display()
        );
    }
    // The store as of one instant: the chain a prefix of the original's, the catalog between the two times.
    let db = fed.db_path(county)?.to_path_buf();
    let out = fed
        .fedgate([
            "audit",
            "verify",
            "--db",
            &db.display().to_string(),
            "--live",
            COUNTY,
        ])
        .await?;
    out.expect_success()?;
    let store = SqliteStore::open_read_only(&db).await?;
    point.check(&store).await?;
    store.close().await;
    let snapshot = AuditDump::read(&db).await?;
    let (chain, full) = (snapshot.chain(COUNTY), before_restore.chain(COUNTY));
    assert!(
        !chain.is_empty() && chain.len() < full.len(),
        "the backup holds {} of the {} records written",
        chain.len(),
        full.len()
    );
    // A record the backup holds unsigned may have been signed after it (a node signs its head every 100 ms).
    let same = |backed_up: &AuditRecord, written: &AuditRecord| {
        backed_up == written
            || (backed_up.signature.is_empty()
                && *backed_up
                    == AuditRecord {
                        signature: Vec::new(),
                        ..written.clone()
                    })
    };
    if let Some(i) = (0..chain.len()).find(|&i| !same(&chain[i], &full[i])) {
        bail!(
            "the backup's chain is not a prefix of the original's at seq {}:\n{:?}\n{:?}",
            chain[i].seq,
            chain[i],
            full[i]
        );
    }

    // The restored node serves its catalog and its data.
    fed.start_node(county).await?;
    let mut gulou = fed.client(&fed.consumer_at(county)?.uscc).await?;
    let served = search_all(&mut gulou, COUNTY).await?;
    for p in &point.before {
        let e = served
            .get(&p.id)
            .with_context(|| format!("the restored node does not serve {}", p.id))?;
        assert_eq!(e.version, p.version, "{}", p.id);
    }
    let key = fed.key_at(county, 0)?;
    for agency in [fed.consumer_at(county)?, fed.consumer_at(code(CITY))?] {
        let resp = fed
            .client(&agency.uscc)
            .await?
            .share(query(&format!("{COUNTY}:household"), &key, &["name"]))
            .await?
            .into_inner();
        assert_eq!(resp.records.len(), 1);
    }

    if federation_checks {
        let settled = fed.wait_audit_settled(SETTLE).await?;
        println!("forwarding settled in {:?}", settled.elapsed);
    }
    fed.stop_all().await?;
    let out = fed
        .fedgate(["audit", "verify", "--db", &db.display().to_string()])
        .await?;
    out.expect_success()?;
    println!("{}", out.stdout);

    if federation_checks {
        let own = AuditDump::read(&db).await?;
        let at_province = AuditDump::read(fed.db_path(code(PROVINCE))?).await?;
        // Nothing written before the restore was given a second meaning: the chain continues the original. A
        // record may be signed in one copy and not in another (a node signs its head late, and a restored node
        // signs the head its backup left unsigned); its hash, which the chain links, is the same.
        let unsigned = |rs: &[AuditRecord]| -> Vec<AuditRecord> {
            rs.iter()
                .map(|r| AuditRecord {
                    signature: Vec::new(),
                    ..r.clone()
                })
                .collect()
        };
        assert_eq!(unsigned(&own.chain(COUNTY)[..full.len()]), unsigned(full));
        assert_eq!(
            unsigned(at_province.chain(COUNTY)),
            unsigned(own.chain(COUNTY))
        );
        at_province.verify(COUNTY, None)?;
        // Every entry published, also after the backup, is at the county and at the province, at its version.
        let county_store = SqliteStore::open_read_only(&db).await?;
        let province_store = SqliteStore::open_read_only(fed.db_path(code(PROVINCE))?).await?;
        for p in &published {
            for (name, store) in [("county", &county_store), ("province", &province_store)] {
                let e = store
                    .entry(&p.id)
                    .await?
                    .with_context(|| format!("the {name} lacks {}", p.id))?;
                assert_eq!(e.entry.version, p.version, "{} at the {name}", p.id);
            }
        }
        county_store.close().await;
        province_store.close().await;
    }
    fed.shutdown().await
}

#[tokio::test]
async fn an_encrypted_backup_opens_only_with_its_key_and_a_refused_restore_changes_nothing()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut fed = ProcessFederation::start(vec![county()?], &[]).await?;
    let county = code(COUNTY);
    let cfg = config_arg(&fed, county)?;
    let dir = backups(&fed)?;
    let (key, other) = (dir.join("backup.key"), dir.join("other.key"));
    let mut recipients = Vec::new();
    for k in [&key, &other] {
        let out = fed
            .fedgate(["backup-key", "--out", &k.display().to_string()])
            .await?;
        recipients.push(out.expect_success()?.stdout.trim().to_owned());
    }
    assert!(recipients[0].starts_with("age1"), "{recipients:?}");
    let out = fed
        .fedgate(["backup-key", "--out", &key.display().to_string()])
        .await?;
    out.expect_code(73)?;

    let traffic = Traffic::start(&fed, COUNTY, "enc").await?;
    traffic.wait_more(5).await?;
    let archive = dir.join("node-350102.age");
    let began = Instant::now();
    fed.fedgate([
        "backup",
        "--config",
        &cfg,
        "--out",
        &archive.display().to_string(),
        "--recipient",
        &recipients[0],
    ])
    .await?
    .expect_success()?;
    let ended = Instant::now();
    let bytes = std::fs::read(&archive)?;
    assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
    // A backup never replaces a file.
    fed.fedgate([
        "backup",
        "--config",
        &cfg,
        "--out",
        &archive.display().to_string(),
    ])
    .await?
    .expect_code(73)?;
    assert_eq!(std::fs::read(&archive)?, bytes);
    traffic.wait_more(5).await?;
    let point = PointInTime::of(&traffic.stop().await?, began, ended);

    let restore = |input: &Path, extra: &[&str]| {
        let mut args = vec![
            "restore".to_owned(),
            "--config".to_owned(),
            cfg.clone(),
            "--in".to_owned(),
            input.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    };
    let key_arg = key.display().to_string();
    let other_arg = other.display().to_string();
    // Not under a running node, even with --force.
    let out = fed
        .fedgate(restore(&archive, &["--identity", &key_arg, "--force"]))
        .await?;
    out.expect_code(73)?;
    assert!(out.stderr.contains("is in use"), "{}", out.stderr);
    fed.terminate(county).await?;

    let damaged = dir.join("damaged.age");
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(&damaged, &flipped)?;
    let truncated = dir.join("truncated.age");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100])?;
    let untouched = files(fed.dir())?;
    let db = fed.db_path(county)?.display().to_string();
    let refusals: [(Vec<String>, i32, &str); 5] = [
        (
            restore(&archive, &["--identity", &key_arg]),
            73,
            db.as_str(),
        ),
        (
            restore(&archive, &["--identity", &other_arg, "--force"]),
            65,
            "no key in",
        ),
        (restore(&archive, &["--force"]), 65, "encrypted"),
        (
            restore(&damaged, &["--identity", &key_arg, "--force"]),
            65,
            "damaged.age",
        ),
        (
            restore(&truncated, &["--identity", &key_arg, "--force"]),
            65,
            "truncated.age",
        ),
    ];
    for (args, status, says) in refusals {
        let out = fed.fedgate(&args).await?;
        out.expect_code(status)?;
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
        if files(fed.dir())? != untouched {
            bail!(
                "{args:?} changed files: {:?}",
                changed(&untouched, &files(fed.dir())?)
            );
        }
    }
    fed.fedgate(restore(&archive, &["--identity", &key_arg, "--check"]))
        .await?
        .expect_success()?;
    assert!(files(fed.dir())? == untouched, "--check changed files");

    let out = fed
        .fedgate(restore(&archive, &["--identity", &key_arg, "--force"]))
        .await?;
    out.expect_success()?;
    let store = SqliteStore::open_read_only(fed.db_path(county)?).await?;
    point.check(&store).await?;
    store.close().await;
    fed.start_node(county).await?;
    let mut gulou = fed.client(&fed.consumer_at(county)?.uscc).await?;
    let served = search_all(&mut gulou, COUNTY).await?;
    assert!(point.before.iter().all(|p| served.contains_key(&p.id)));
    fed.terminate(county).await?;
    fed.fedgate(["audit", "verify", "--db", &db])
        .await?
        .expect_success()?;
    fed.shutdown().await
}

/// The files that differ between two listings.
fn changed(a: &BTreeMap<PathBuf, Vec<u8>>, b: &BTreeMap<PathBuf, Vec<u8>>) -> Vec<PathBuf> {
    let keys: BTreeSet<&PathBuf> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_node_on_postgresql_is_backed_up_with_pg_dump_and_restored_into_another_database()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(first) = scratch_database().await? else {
        return Ok(());
    };
    let Some(second) = scratch_database().await? else {
        return Ok(());
    };
    let url = first.url.clone();
    let result = postgres_round_trip(&url, &second.url).await;
    first.drop_database().await?;
    second.drop_database().await?;
    result
}

async fn postgres_round_trip(first: &str, second: &str) -> Result<()> {
    let first_url = first.to_owned();
    let mut fed = ProcessFederation::start_configured(vec![county()?], &[], &move |c| {
        c.storage = StorageConfig::Postgres {
            url: first_url.clone(),
            busy_timeout_ms: DEFAULT_BUSY_TIMEOUT_MS,
        };
        c.signing_key = Some(PathBuf::from("node-350102.key"));
    })
    .await?;
    let county = code(COUNTY);
    let cfg = config_arg(&fed, county)?;
    let archive = backups(&fed)?.join("node-350102.pg.tar");
    let traffic = Traffic::start(&fed, COUNTY, "pg").await?;
    traffic.wait_more(10).await?;
    let began = Instant::now();
    let out = fed
        .fedgate([
            "backup",
            "--config",
            &cfg,
            "--out",
            &archive.display().to_string(),
        ])
        .await?;
    out.expect_success()?;
    let ended = Instant::now();
    assert!(out.stdout.contains("postgres"), "{}", out.stdout);
    traffic.wait_more(10).await?;
    let point = PointInTime::of(&traffic.stop().await?, began, ended);
    fed.terminate(county).await?;

    // The database the node ran on holds a store: not replaced without --force.
    let out = fed
        .fedgate([
            "restore",
            "--config",
            &cfg,
            "--in",
            &archive.display().to_string(),
        ])
        .await?;
    out.expect_code(73)?;
    assert!(out.stderr.contains("a store exists"), "{}", out.stderr);
    // Nor while anything else (a replica on another machine) is connected to the database, even with --force.
    let replica = PgStore::connect_existing(first).await?;
    let out = fed
        .fedgate([
            "restore",
            "--config",
            &cfg,
            "--in",
            &archive.display().to_string(),
            "--force",
        ])
        .await?;
    replica.close().await;
    out.expect_code(73)?;
    assert!(out.stderr.contains("other session"), "{}", out.stderr);

    let second_url = second.to_owned();
    fed.reconfigure(county, |c| {
        c.storage = StorageConfig::Postgres {
            url: second_url,
            busy_timeout_ms: DEFAULT_BUSY_TIMEOUT_MS,
        };
        c.signing_key = Some(PathBuf::from("restored/node-350102.key"));
    })?;
    let out = fed
        .fedgate([
            "restore",
            "--config",
            &cfg,
            "--in",
            &archive.display().to_string(),
        ])
        .await?;
    out.expect_success()?;
    println!("{}", out.stdout);
    assert_eq!(
        std::fs::read(fed.dir().join("restored/node-350102.key"))?,
        std::fs::read(fed.dir().join("node-350102.key"))?
    );
    let store = PgStore::connect_existing(second).await?;
    point.check(&store).await?;
    store.close().await;

    fed.start_node(county).await?;
    let mut gulou = fed.client(&fed.consumer_at(county)?.uscc).await?;
    let served = search_all(&mut gulou, COUNTY).await?;
    assert!(point.before.iter().all(|p| served.contains_key(&p.id)));
    fed.terminate(county).await?;
    fed.fedgate(["audit", "verify", "--db", second])
        .await?
        .expect_success()?;
    fed.shutdown().await
}

/// `deploy/systemd/fedgate-backup`, which the scheduled unit runs.
fn backup_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/fedgate-backup")
}

/// Runs the shipped backup script with `action` for the county, with `env` besides the harness's binary and
/// configuration.
async fn run_script(
    fed: &ProcessFederation,
    action: &str,
    env: &[(&str, String)],
) -> Result<std::process::Output> {
    let county = code(COUNTY);
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg(backup_script())
        .args([action, COUNTY])
        .current_dir(fed.dir())
        .env(
            "FEDGATE_BIN",
            fedgate_tests::process::fedgate_binary().await?,
        )
        .env("FEDGATE_CONFIG", fed.config_path(county)?)
        .env_remove("FEDGATE_BACKUP_RECIPIENT")
        .env_remove("FEDGATE_BACKUP_COPY")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output().await?)
}

#[tokio::test]
async fn the_scheduled_backup_script_keeps_the_newest_encrypted_backups_and_copies_them_away()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut fed = ProcessFederation::start(vec![county()?], &[]).await?;
    let county = code(COUNTY);
    let local = fed.dir().join("backups/local");
    let remote = fed.dir().join("backups/remote");
    std::fs::create_dir_all(&remote)?;
    let key = fed.dir().join("backups/backup.key");
    let out = fed
        .fedgate(["backup-key", "--out", &key.display().to_string()])
        .await?;
    let recipient = out.expect_success()?.stdout.trim().to_owned();

    // Without a recipient nothing is written: backups leave the host, so they are encrypted.
    let out = run_script(
        &fed,
        "take",
        &[("FEDGATE_BACKUP_DIR", local.display().to_string())],
    )
    .await?;
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(!local.exists());

    let env = [
        ("FEDGATE_BACKUP_DIR", local.display().to_string()),
        ("FEDGATE_BACKUP_RECIPIENT", recipient),
        ("FEDGATE_BACKUP_KEEP", "2".to_owned()),
        (
            "FEDGATE_BACKUP_COPY",
            format!(
                "cp \"$FEDGATE_BACKUP_FILE\" '{}/'\"$FEDGATE_NODE\"-copy.tar.age",
                remote.display()
            ),
        ),
    ];
    let traffic = Traffic::start(&fed, COUNTY, "cron").await?;
    let mut taken = Vec::new();
    for _ in 0..3 {
        traffic.wait_more(3).await?;
        let out = run_script(&fed, "take", &env).await?;
        if !out.status.success() {
            bail!("take failed: {out:?}");
        }
        let latest = std::fs::read_link(local.join("node-350102-latest.tar.age"))?;
        taken.push(latest);
    }
    traffic.stop().await?;
    let kept: BTreeSet<PathBuf> = std::fs::read_dir(&local)?
        .map(|e| e.map(|e| PathBuf::from(e.file_name())))
        .collect::<std::io::Result<_>>()?;
    let expected: BTreeSet<PathBuf> = taken[1..]
        .iter()
        .cloned()
        .chain([PathBuf::from("node-350102-latest.tar.age")])
        .collect();
    assert_eq!(kept, expected, "the two newest and the link to the latest");

    let out = run_script(&fed, "copy", &env).await?;
    if !out.status.success() {
        bail!("copy failed: {out:?}");
    }
    let copied = remote.join("350102-copy.tar.age");
    assert_eq!(
        std::fs::read(&copied)?,
        std::fs::read(local.join(&taken[2]))?
    );
    fed.terminate(county).await?;
    let out = fed
        .fedgate([
            "restore",
            "--config",
            &config_arg(&fed, county)?,
            "--in",
            &copied.display().to_string(),
            "--identity",
            &key.display().to_string(),
            "--check",
        ])
        .await?;
    out.expect_success()?;
    fed.shutdown().await
}
