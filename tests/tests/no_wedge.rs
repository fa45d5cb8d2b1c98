//! No wedges, no spurious failures (issue 11), over real nodes: storage contention is waited for and answered
//! UNAVAILABLE only past its bound, never INTERNAL; periodic scans read the store a page at a time; a parent
//! that stops answering is dropped and reached again; a hop whose caller goes away still records the request; a
//! stopping node drains within its grace; the exit status tells a configuration error from a runtime failure.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_gateway::config::{NodeConfig, RoutingConfig, StorageConfig};
use fedgate_gateway::ident::Peer;
use fedgate_proto::v1::{
    AuditOperation, CatalogChange, CatalogEntry, PublishBatchRequest, PublishEntryRequest,
    PushRequest, ShareResponse, ShareType, Stream, StreamItem, catalog_change, stream_item,
};
use fedgate_tests::db_lock::WriteLock;
use fedgate_tests::process::{AuditDump, ProcessFederation, catalog_count, fedgate_binary};
use fedgate_tests::{
    Devnet, NodeSpec, code, eventually, federation_client, init, key_at, own_audit_records, query,
    registry,
};
use tonic::Code;

/// Deadline of every wait for progress.
const WAIT: Duration = Duration::from_secs(30);

/// `[storage] busy_timeout_ms` of the contention test's nodes.
const BUSY_MS: u64 = 800;

fn with_busy_timeout(mut config: NodeConfig) -> NodeConfig {
    if let StorageConfig::Sqlite {
        busy_timeout_ms, ..
    } = &mut config.storage
    {
        *busy_timeout_ms = BUSY_MS;
    }
    config
}

/// A new entry of the agency that published `template`, under the local code `local`.
fn new_entry(template: &CatalogEntry, local: &str) -> CatalogEntry {
    CatalogEntry {
        id: local.to_owned(),
        title: format!("Register {local}"),
        version: 0,
        ..template.clone()
    }
}

#[tokio::test]
async fn a_locked_database_is_waited_for_then_answered_unavailable_and_nothing_is_lost()
-> Result<()> {
    use ShareType::{Conditional, Unconditional};
    init();
    let province = code("350000");
    let city = code("350100");
    let specs = vec![
        NodeSpec::new("350000")?.provider(
            2,
            "province provider",
            registry(Unconditional, Conditional, 5),
        )?,
        NodeSpec::new("350100")?.provider(
            2,
            "Fuzhou provider",
            registry(Unconditional, Conditional, 3),
        )?,
    ];
    let net = Devnet::start_configured(specs, RoutingConfig::default(), with_busy_timeout).await?;
    net.wait_for_catalog(province, 4, WAIT).await?;
    let db = match &net.node_config(province)?.storage {
        StorageConfig::Sqlite { path, .. } => path.clone(),
        other => bail!("the province is not on SQLite: {other:?}"),
    };
    let here = net.provider_at(province)?;
    let template = here.published[0].clone();
    let mut publisher = net.client(&here.uscc).await?;
    let fuzhou = net.provider_at(city)?;
    let mut city_publisher = net.client(&fuzhou.uscc).await?;
    let publish = |local: &str| PublishEntryRequest {
        entry: Some(new_entry(&template, local)),
    };

    // Another connection holds the province's write lock for longer than the node waits.
    let lock = WriteLock::take(&db).await?;
    let began = Instant::now();
    let refused = publisher
        .publish_entry(publish("while-locked"))
        .await
        .expect_err("a publish against a locked database cannot succeed");
    let took = began.elapsed();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("node 350000") && refused.message().contains("retry"),
        "the answer names the node and says to retry: {}",
        refused.message()
    );
    assert!(
        took >= Duration::from_millis(BUSY_MS),
        "the node waited for the lock first: answered after {took:?}"
    );
    // A push from the city (one it already delivered, so applying it again changes nothing) meets the same lock,
    // and is told the same: the uplink retries it like any other interruption.
    let city_cert = net.ca().issue(&Peer::Node(city), &[])?;
    let mut as_city = federation_client(&net, "350000", &city_cert).await?;
    let replayed = as_city
        .push(PushRequest {
            stream: Stream::Catalog as i32,
            items: vec![StreamItem {
                seq: 1,
                body: Some(stream_item::Body::Catalog(CatalogChange {
                    change: Some(catalog_change::Change::Upsert(fuzhou.published[0].clone())),
                })),
            }],
        })
        .await
        .expect_err("a push against a locked database cannot succeed");
    assert_eq!(replayed.code(), Code::Unavailable, "{replayed:?}");
    assert!(
        replayed.message().contains("node 350000") && replayed.message().contains("retry"),
        "{}",
        replayed.message()
    );
    // The city's change waits in its outbox while the province cannot store it.
    let city_entry = city_publisher
        .publish_entry(PublishEntryRequest {
            entry: Some(new_entry(&fuzhou.published[0], "during-lock")),
        })
        .await?
        .into_inner()
        .entry
        .context("stored entry")?;
    let province_store = net.node(province)?.store().clone();
    tokio::time::sleep(Duration::from_millis(2 * BUSY_MS)).await;
    assert!(
        province_store.entry(&city_entry.id).await?.is_none(),
        "the locked province stored nothing"
    );
    lock.release().await?;

    // Once the lock is gone the same publish succeeds and the city's change arrives: nothing was lost.
    let stored = publisher
        .publish_entry(publish("while-locked"))
        .await?
        .into_inner()
        .entry
        .context("stored entry")?;
    assert_eq!(
        (stored.id.as_str(), stored.version),
        ("350000:while-locked", 1),
        "the refused attempt stored nothing"
    );
    net.wait_for_catalog(province, 6, WAIT).await?;
    let arrived = province_store
        .entry(&city_entry.id)
        .await?
        .context("the city's change reached the province")?;
    assert_eq!(arrived.entry.version, 1);
    let published: Vec<_> = own_audit_records(&net, "350000")
        .await?
        .into_iter()
        .filter(|r| {
            r.operation == AuditOperation::CatalogPublish as i32
                && r.resource_id == "350000:while-locked"
        })
        .map(|r| r.outcome)
        .collect();
    assert_eq!(published, ["OK"], "the successful publish is recorded once");

    // A lock held for less than the node waits costs only time.
    let lock = WriteLock::take(&db).await?;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(BUSY_MS / 4)).await;
        lock.release().await
    });
    let began = Instant::now();
    let stored = publisher
        .publish_entry(publish("brief-lock"))
        .await?
        .into_inner()
        .entry
        .context("stored entry")?;
    assert_eq!(stored.version, 1);
    assert!(
        began.elapsed() >= Duration::from_millis(BUSY_MS / 4),
        "the publish waited for the lock"
    );
    release.await??;
    net.shutdown().await
}

#[tokio::test]
async fn the_stale_scan_reads_only_the_nodes_own_entries_a_page_at_a_time() -> Result<()> {
    use ShareType::{Conditional, Unconditional};
    init();
    let city = code("350100");
    let specs = vec![
        NodeSpec::new("350100")?.provider(
            2,
            "Fuzhou provider",
            registry(Unconditional, Conditional, 3),
        )?,
        NodeSpec::new("350102")?.provider(
            2,
            "Gulou provider",
            registry(Unconditional, Conditional, 1),
        )?,
    ];
    let net = Devnet::start(specs).await?;
    // Besides its two daily registers, the city's provider lists 30 daily and 15 yearly ones; the county's two
    // daily registers are held at the city too, but they are the county's to report.
    let provider = net.provider_at(city)?;
    let entries: Vec<CatalogEntry> = (0..45)
        .map(|i| CatalogEntry {
            update_frequency: if i % 3 == 2 { "yearly" } else { "daily" }.to_owned(),
            ..new_entry(&provider.published[0], &format!("register-{i:02}"))
        })
        .collect();
    net.client(&provider.uscc)
        .await?
        .publish_batch(PublishBatchRequest { entries })
        .await?;
    net.wait_for_catalog(city, 2 + 45 + 2, WAIT).await?;
    net.advance_clock(2 * 24 * 3600);

    let governance = net.node(city)?.governance();
    let scan = |page: u32| async move {
        let mut pages = Vec::new();
        let stale = governance
            .scan_stale(page, |found| {
                pages.push(
                    found
                        .iter()
                        .filter_map(|s| s.entry.as_ref().map(|e| e.id.clone()))
                        .collect::<Vec<_>>(),
                );
            })
            .await?;
        Ok::<_, anyhow::Error>((stale, pages))
    };
    let (stale, pages) = scan(10_000).await?;
    let whole: Vec<String> = pages.concat();
    assert_eq!(
        stale, 32,
        "the 2 + 30 daily registers of the city: {whole:?}"
    );
    assert_eq!(whole.len(), 32);
    assert!(
        whole.iter().all(|id| id.starts_with("350100:")),
        "{whole:?}"
    );
    for page in [1u32, 3, 7, 64] {
        let (n, pages) = scan(page).await?;
        assert_eq!(n, stale, "pages of {page}");
        assert!(
            pages
                .iter()
                .all(|p| !p.is_empty() && p.len() <= page as usize),
            "pages of {page}: {:?}",
            pages.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(
            pages.concat(),
            whole,
            "the same entries in the same order, in pages of {page}"
        );
    }
    let (listed, count) = governance.stale_entries().await?;
    assert_eq!(count, 32);
    assert_eq!(
        listed
            .iter()
            .filter_map(|s| s.entry.as_ref().map(|e| e.id.clone()))
            .collect::<Vec<_>>(),
        whole
    );
    net.shutdown().await
}

/// The process tests start node processes; they run one at a time so that two cores suffice.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `[routing] uplink_call_timeout_ms` of the stalled-parent test's nodes.
const UPLINK_TIMEOUT_MS: u64 = 1000;

#[tokio::test]
async fn a_parent_that_stops_answering_is_dropped_and_both_streams_resume_without_loss()
-> Result<()> {
    use ShareType::{Conditional, Unconditional};
    let _serial = SERIAL.lock().await;
    init();
    let province = code("350000");
    let city = code("350100");
    let specs = vec![
        NodeSpec::new("350000")?.consumer(1, "province consumer")?,
        NodeSpec::new("350100")?.provider(
            2,
            "Fuzhou provider",
            registry(Unconditional, Conditional, 3),
        )?,
    ];
    let fed = ProcessFederation::start_configured(specs, &[city], &|c| {
        c.routing.uplink_call_timeout_ms = UPLINK_TIMEOUT_MS;
    })
    .await?;
    let root_db = fed.db_path(province)?.to_path_buf();
    wait_catalog(&root_db, 2).await?;
    fed.wait_audit_settled(WAIT).await?;

    // The province stops answering on the connection the city's streams use, and on every new one.
    let relay = fed.relay(city)?;
    assert!(relay.stall() >= 1, "the city's link was open");
    // The city goes on working: its provider publishes, which the city must ship up.
    let provider = fed.provider_at(city)?;
    let entries: Vec<CatalogEntry> = (0..20)
        .map(|i| new_entry(&provider.published[0], &format!("stalled-{i:02}")))
        .collect();
    fed.client(&provider.uscc)
        .await?
        .publish_batch(PublishBatchRequest { entries })
        .await?;
    // The pushes on the silent connection run into their deadline: the uplink drops the connection and tries
    // a new one (which the stalled parent accepts and never serves either). Without a deadline it would wait
    // for HTTP/2 keepalive, 20 to 30 s.
    let began = Instant::now();
    while relay.stats().stalled.load(Ordering::Relaxed) == 0 {
        if began.elapsed() > Duration::from_secs(10) {
            bail!(
                "the city kept waiting on the silent connection for {:?}",
                began.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        catalog_count(&root_db).await?,
        2,
        "nothing reached the stalled province"
    );

    // The province answers again on new connections: both streams resume; nothing is lost or duplicated.
    relay.resume();
    let resumed = Instant::now();
    wait_catalog(&root_db, 22).await?;
    let settled = fed.wait_audit_settled(WAIT).await?;
    eprintln!(
        "streams resumed: catalog after {:?}, audit after {:?}",
        resumed.elapsed(),
        settled.elapsed
    );
    assert_eq!(catalog_count(&root_db).await?, 22);
    // The frozen connections are still open at the province; close them before stopping it.
    relay.cut();
    let mut fed = fed;
    fed.stop_all().await?;
    let root = AuditDump::read(&root_db).await?;
    let own = AuditDump::read(fed.db_path(city)?).await?;
    assert_eq!(
        root.chain("350100"),
        own.chain("350100"),
        "the province holds the city's records exactly once"
    );
    root.verify("350100", None)?;
    fed.shutdown().await
}

/// Waits until the database at `db` holds `n` live catalog entries.
async fn wait_catalog(db: &std::path::Path, n: u64) -> Result<()> {
    let began = Instant::now();
    loop {
        let have = catalog_count(db).await?;
        if have == n {
            return Ok(());
        }
        if have > n || began.elapsed() > WAIT {
            bail!(
                "{} holds {have} catalog entries, expected {n}",
                db.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_share_cancelled_while_its_provider_works_is_recorded_at_every_hop() -> Result<()> {
    use ShareType::{Conditional, Unconditional};
    init();
    let specs = vec![
        NodeSpec::new("350100")?,
        NodeSpec::new("350102")?
            .provider(2, "Gulou provider", registry(Unconditional, Conditional, 1))?
            .provider_latency(Duration::from_secs(5)),
        NodeSpec::new("350103")?.consumer(1, "Taijiang consumer")?,
    ];
    let net = Devnet::start(specs).await?;
    let gulou = net.provider_at(code("350102"))?;
    let provider = gulou.provider.clone().context("Gulou serves a registry")?;
    let key = key_at(&net, "350102", 0)?;
    let mut consumer = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let mut share = query("350102:household", &key, &["name"]);
    share.request_id = "cancelled-while-served".into();

    // The share travels 350103 → 350100 → 350102; the agency gives up once the provider has the request.
    let call = tokio::spawn(async move { consumer.share(share).await });
    let began = Instant::now();
    while provider.received() == 0 {
        if began.elapsed() > WAIT {
            bail!("the share never reached the provider");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call.abort();
    assert!(call.await.is_err(), "the share was cancelled, not answered");

    // Every hop holds a record of it with its outcome, written when the hop's caller went away.
    let outcomes = |node: &'static str| {
        let net = &net;
        async move {
            Ok::<_, anyhow::Error>(
                own_audit_records(net, node)
                    .await?
                    .into_iter()
                    .filter(|r| r.request_id == "cancelled-while-served")
                    .map(|r| (r.outcome, r.provider_uscc))
                    .collect::<Vec<_>>(),
            )
        }
    };
    eventually("every hop recorded the cancelled share", WAIT, || async {
        Ok(!outcomes("350103").await?.is_empty()
            && outcomes("350100").await?.len() >= 2
            && !outcomes("350102").await?.is_empty())
    })
    .await?;
    let cancelled = "CANCELLED".to_owned();
    assert_eq!(
        outcomes("350103").await?,
        [(cancelled.clone(), String::new())],
        "the consumer's node"
    );
    assert_eq!(
        outcomes("350100").await?,
        [
            ("FORWARDED".to_owned(), String::new()),
            (cancelled.clone(), String::new())
        ],
        "the relay"
    );
    assert_eq!(
        outcomes("350102").await?,
        [(cancelled, gulou.uscc.to_string())],
        "the serving node, which had called its provider"
    );
    net.shutdown().await
}

/// A single-node federation whose provider answers each call after `latency`, stopping with `grace`.
async fn slow_single_node(latency: Duration, grace_secs: u64) -> Result<ProcessFederation> {
    use ShareType::{Conditional, Unconditional};
    let specs = vec![
        NodeSpec::new("350100")?
            .consumer(1, "Fuzhou consumer")?
            .provider(
                2,
                "Fuzhou provider",
                registry(Unconditional, Conditional, 3),
            )?
            .provider_latency(latency),
    ];
    ProcessFederation::start_configured(specs, &[], &move |c| {
        c.shutdown_grace_secs = grace_secs;
    })
    .await
}

/// Starts a share of the node's own registry and waits until its provider has it.
async fn share_in_flight(
    fed: &ProcessFederation,
    request_id: &str,
) -> Result<tokio::task::JoinHandle<Result<tonic::Response<ShareResponse>, tonic::Status>>> {
    let city = code("350100");
    let provider = fed
        .provider_at(city)?
        .provider
        .clone()
        .context("the provider serves a registry")?;
    let mut consumer = fed.client(&fed.consumer_at(city)?.uscc).await?;
    let mut share = query("350100:household", &fed.key_at(city, 0)?, &["name"]);
    share.request_id = request_id.to_owned();
    let call = tokio::spawn(async move { consumer.share(share).await });
    let began = Instant::now();
    while provider.received() == 0 {
        if began.elapsed() > WAIT {
            bail!("the share never reached the provider");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(call)
}

/// Connects to `addr` until a connection is refused; returns when that happened.
fn refused_from(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<Instant> {
    tokio::spawn(async move {
        loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return Instant::now(),
            }
        }
    })
}

#[tokio::test]
async fn a_stopping_node_stops_accepting_and_lets_a_call_within_its_grace_finish() -> Result<()> {
    let _serial = SERIAL.lock().await;
    init();
    let city = code("350100");
    let latency = Duration::from_secs(2);
    let mut fed = slow_single_node(latency, 10).await?;
    let addr: std::net::SocketAddr = fed.node_config(city)?.listen.parse()?;
    let call = share_in_flight(&fed, "finishes-during-shutdown").await?;
    let refused = refused_from(addr);
    let stopped = fed.terminate(city).await?;
    eprintln!("exited {stopped:?} after SIGTERM, its call of {latency:?} in flight");
    let answered = call.await?;
    let answer = answered.map_err(|s| anyhow::anyhow!("the call in flight failed: {s:?}"))?;
    assert_eq!(
        answer.into_inner().records.len(),
        1,
        "it was answered in full"
    );
    let refused_at = refused.await?;
    assert!(
        stopped < Duration::from_secs(10),
        "the node exited once its call was done, well within its grace: {stopped:?}"
    );
    assert!(
        refused_at.elapsed() + Duration::from_millis(200) >= latency / 2,
        "new connections were refused while the call was still running"
    );
    let dump = AuditDump::read(fed.db_path(city)?).await?;
    let chain = dump.chain("350100");
    let served: Vec<&str> = chain
        .iter()
        .filter(|r| r.request_id == "finishes-during-shutdown")
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(served, ["OK"]);
    assert!(
        chain.last().is_some_and(|r| !r.signature.is_empty()),
        "the chain's head was signed before the node exited"
    );
    dump.verify("350100", None)?;
    fed.shutdown().await
}

#[tokio::test]
async fn a_stopping_node_cuts_off_calls_that_outlast_its_grace_and_exits_in_time() -> Result<()> {
    let _serial = SERIAL.lock().await;
    init();
    let city = code("350100");
    let mut fed = slow_single_node(Duration::from_secs(60), 1).await?;
    let call = share_in_flight(&fed, "outlasts-the-grace").await?;
    let stopped = fed.terminate(city).await?;
    eprintln!("exited {stopped:?} after SIGTERM with a grace of 1 s");
    assert!(
        stopped >= Duration::from_secs(1) && stopped < Duration::from_secs(1 + 5),
        "the node exited within its grace and a margin: {stopped:?}"
    );
    let status = call.await?.expect_err("the call was cut off");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let dump = AuditDump::read(fed.db_path(city)?).await?;
    let chain = dump.chain("350100");
    let cut: Vec<&str> = chain
        .iter()
        .filter(|r| r.request_id == "outlasts-the-grace")
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(cut, ["CANCELLED"], "the cut-off call is recorded");
    assert!(
        chain.last().is_some_and(|r| !r.signature.is_empty()),
        "the chain's head was signed before the node exited"
    );
    dump.verify("350100", None)?;
    fed.shutdown().await
}

/// Runs `fedgate node --config config` until it exits (at most 30 s): its exit code and what it printed on
/// stderr.
async fn node_exit(config: &std::path::Path) -> Result<(Option<i32>, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(fedgate_binary().await?)
            .arg("node")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the node did not exit")??;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn the_exit_status_tells_a_configuration_error_from_an_unavailable_resource() -> Result<()> {
    use fedgate_gateway::pki::{DevCa, write_pem_files};
    init();
    let dir = tempfile::tempdir()?;
    let at = |name: &str| dir.path().join(name);
    let ca = DevCa::generate("exit status test root")?;
    std::fs::write(at("ca.crt"), ca.ca_pem())?;
    let (cert, key) = write_pem_files(
        dir.path(),
        "node-350100",
        &ca.issue(&Peer::Node(code("350100")), &[])?,
    )?;
    let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = |code: &str, listen: &str, db: &std::path::Path, extra: &str| {
        format!(
            "code = \"{code}\"\nlisten = \"{listen}\"\nshutdown_grace_secs = 1\n{extra}\n\
             [tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [storage]\nkind = \"sqlite\"\npath = {db:?}\n",
            at("ca.crt")
        )
    };
    let write = |name: &str, text: String| -> Result<std::path::PathBuf> {
        let path = at(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let db = at("node.db");
    let cases = [
        ("a missing file", at("absent.toml"), 78, "absent.toml"),
        (
            "an unknown key",
            write(
                "unknown.toml",
                config("350100", &free.to_string(), &db, "colour = \"red\""),
            )?,
            78,
            "unknown field",
        ),
        (
            "an invalid value",
            write("invalid.toml", config("3501", &free.to_string(), &db, ""))?,
            78,
            "code",
        ),
        (
            "a missing TLS file",
            write(
                "tls.toml",
                config("350100", &free.to_string(), &db, "")
                    .replace(&format!("{cert:?}"), &format!("{:?}", at("absent.crt"))),
            )?,
            78,
            "absent.crt",
        ),
    ];
    for (what, path, want, mentions) in cases {
        let (status, stderr) = node_exit(&path).await?;
        assert_eq!(status, Some(want), "{what}: {stderr}");
        assert!(stderr.contains(mentions), "{what} is named: {stderr}");
    }

    // The address is taken by another process.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let path = write(
        "taken.toml",
        config("350100", &taken.local_addr()?.to_string(), &db, ""),
    )?;
    let (status, stderr) = node_exit(&path).await?;
    assert_eq!(status, Some(69), "address in use: {stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    drop(taken);

    // The database cannot be opened: its directory is a file.
    std::fs::write(at("not-a-directory"), b"")?;
    let path = write(
        "store.toml",
        config(
            "350100",
            &free.to_string(),
            &at("not-a-directory").join("node.db"),
            "",
        ),
    )?;
    let (status, stderr) = node_exit(&path).await?;
    assert_eq!(status, Some(69), "database unavailable: {stderr}");
    assert!(stderr.contains("cannot open storage"), "{stderr}");

    // A good configuration runs until SIGTERM and exits 0.
    let path = write("good.toml", config("350100", &free.to_string(), &db, ""))?;
    let mut node = tokio::process::Command::new(fedgate_binary().await?)
        .arg("node")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = tokio::io::BufReader::new(node.stdout.take().context("stdout")?);
    let mut line = String::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
    )
    .await
    .context("the node did not start")??;
    assert!(line.contains("listening on"), "{line}");
    let pid = node.id().context("pid")?;
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    assert!(sent.success());
    let status = tokio::time::timeout(WAIT, node.wait()).await??;
    assert_eq!(status.code(), Some(0));
    Ok(())
}
