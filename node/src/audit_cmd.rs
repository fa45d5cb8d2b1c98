//! `fedgate audit`: verify, export and query a node's audit trail from its database or an export file.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use fedgate_gateway::audit::export::{read_jsonl, write_jsonl};
use fedgate_gateway::audit::{ChainSummary, verify_live_store, verify_records};
use fedgate_gateway::config::StorageConfig;
use fedgate_gateway::store::{AuditQuery, PgStore, SqliteStore, Store};
use fedgate_proto::v1::{AuditOperation, AuditRecord};

/// `fedgate audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check every hash chain in a node's database or an export file; names the first bad record.
    Verify {
        /// The node's database: its SQLite file, or a postgres:// URL.
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        db: Option<Database>,
        /// A JSON Lines export.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Expected public key of a node, as `<code>=<hex>`; a chain announcing another key fails.
        #[arg(long = "key", value_name = "CODE=HEX")]
        keys: Vec<String>,
        /// Archive files holding the beginning of the chains, oldest first.
        #[arg(long = "archive", value_name = "FILE")]
        archives: Vec<PathBuf>,
        /// The code of the running node whose database this is: its own chain may end with records it has not
        /// signed yet (it signs its chain head at least every 100 ms, and when it stops).
        #[arg(long, value_name = "CODE", requires = "db")]
        live: Option<String>,
    },
    /// Move records older than the retention period (and already forwarded) to an archive file.
    Archive {
        /// The node's configuration (storage path, retention, whether it has a parent).
        #[arg(long)]
        config: PathBuf,
        /// The archive file to write.
        #[arg(long)]
        out: PathBuf,
        /// The time to count the retention period back from (RFC 3339); now when absent.
        #[arg(long)]
        now: Option<String>,
    },
    /// Write records as JSON Lines.
    Export {
        /// The node's database: its SQLite file, or a postgres:// URL.
        #[arg(long)]
        db: Database,
        /// Which records.
        #[command(flatten)]
        filter: Filter,
        /// Output file; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print records as a table.
    Query {
        /// The node's database: its SQLite file, or a postgres:// URL.
        #[arg(long)]
        db: Database,
        /// Which records.
        #[command(flatten)]
        filter: Filter,
        /// Rows at most.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// A node's database named on the command line: an SQLite file, or a PostgreSQL URL.
#[derive(Debug, Clone)]
pub enum Database {
    /// The node's SQLite file, opened read-only.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL; the database is not migrated.
    Postgres(String),
}

impl std::str::FromStr for Database {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(
            if s.starts_with("postgres://") || s.starts_with("postgresql://") {
                Database::Postgres(s.to_owned())
            } else {
                Database::Sqlite(PathBuf::from(s))
            },
        )
    }
}

impl Database {
    /// Opens the database for reading.
    async fn open(&self) -> Result<Arc<dyn Store>> {
        let (store, at): (Result<Arc<dyn Store>, _>, String) = match self {
            Database::Sqlite(path) => (
                SqliteStore::open_read_only(path)
                    .await
                    .map(|s| Arc::new(s) as Arc<dyn Store>),
                path.display().to_string(),
            ),
            Database::Postgres(url) => (
                PgStore::connect_existing(url)
                    .await
                    .map(|s| Arc::new(s) as Arc<dyn Store>),
                StorageConfig::postgres(url.clone()).describe(),
            ),
        };
        store.with_context(|| format!("opening {at}"))
    }
}

/// Filters shared by export and query.
#[derive(Debug, Args)]
pub struct Filter {
    /// Only records written by this node or the nodes under it.
    #[arg(long)]
    node: Option<String>,
    /// Only records where this agency is the consumer or the provider.
    #[arg(long)]
    agency: Option<String>,
    /// Only records at or after this time (RFC 3339).
    #[arg(long)]
    from: Option<String>,
    /// Only records before this time (RFC 3339).
    #[arg(long)]
    to: Option<String>,
    /// Only records about this resource.
    #[arg(long)]
    resource: Option<String>,
    /// Only records with this outcome (OK, PERMISSION_DENIED, ...).
    #[arg(long)]
    outcome: Option<String>,
}

fn nanos(what: &str, t: &Option<String>) -> Result<Option<i64>> {
    t.as_ref()
        .map(|s| {
            let at = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("--{what} {s:?} is not an RFC 3339 time"))?;
            Ok(i64::try_from(at.unix_timestamp_nanos()).unwrap_or(i64::MAX))
        })
        .transpose()
}

impl Filter {
    fn query(&self, limit: u32) -> Result<AuditQuery> {
        let node_prefix = match &self.node {
            Some(n) => {
                let code: fedgate_gateway::ident::DivisionCode =
                    n.parse().map_err(|e| anyhow::anyhow!("--node: {e}"))?;
                Some(fedgate_gateway::catalog::subtree_prefix(code))
            }
            None => None,
        };
        let party = match &self.agency {
            Some(a) => Some(
                a.parse::<fedgate_gateway::ident::Uscc>()
                    .map_err(|e| anyhow::anyhow!("--agency: {e}"))?
                    .to_string(),
            ),
            None => None,
        };
        Ok(AuditQuery {
            party,
            node_prefix,
            from_ns: nanos("from", &self.from)?,
            to_ns: nanos("to", &self.to)?,
            resource_id: self.resource.clone(),
            outcome: self.outcome.clone(),
            limit,
            ..Default::default()
        })
    }
}

/// Runs one audit subcommand.
pub async fn run(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::Verify {
            db,
            file,
            keys,
            archives,
            live,
        } => verify((db, live), file, keys, archives).await,
        AuditCmd::Archive { config, out, now } => archive(config, out, now).await,
        AuditCmd::Export { db, filter, out } => export(db, filter, out).await,
        AuditCmd::Query { db, filter, limit } => query(db, filter, limit).await,
    }
}

fn print_summary(chains: &[ChainSummary]) {
    for c in chains {
        println!(
            "  node {}: {} records verified, head #{}",
            c.node, c.records, c.head
        );
        if c.unsigned > 0 {
            println!(
                "    its last {} records are not signed yet (the running node signs them shortly)",
                c.unsigned
            );
        }
    }
}

async fn verify(
    (db, live): (Option<Database>, Option<String>),
    file: Option<PathBuf>,
    keys: Vec<String>,
    archives: Vec<PathBuf>,
) -> Result<()> {
    let mut pinned = HashMap::new();
    for k in &keys {
        let Some((node, hex_key)) = k.split_once('=') else {
            bail!("--key {k:?} must be <code>=<hex public key>");
        };
        pinned.insert(
            node.to_owned(),
            hex::decode(hex_key).with_context(|| format!("--key {k:?}: not hex"))?,
        );
    }
    let mut archived: Vec<AuditRecord> = Vec::new();
    for a in &archives {
        let f = std::fs::File::open(a).with_context(|| format!("opening {}", a.display()))?;
        archived.extend(
            read_jsonl(BufReader::new(f)).with_context(|| format!("reading {}", a.display()))?,
        );
    }
    let resume: HashMap<String, (u64, Vec<u8>, Vec<u8>)> = if archived.is_empty() {
        HashMap::new()
    } else {
        let chains = verify_records(&archived, &pinned, &HashMap::new(), true)
            .map_err(|e| anyhow::anyhow!("FAILED in the archives: {e}"))?;
        println!("archives: {} chains verified", chains.len());
        print_summary(&chains);
        chains
            .iter()
            .filter_map(|c| c.resume_point().map(|p| (c.node.clone(), p)))
            .collect()
    };
    let result = match (db, file) {
        (Some(db), _) => {
            let store = db.open().await?;
            let r = verify_live_store(store.as_ref(), &pinned, &resume, live.as_deref())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"));
            store.close().await;
            r
        }
        (None, Some(file)) => {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let records = read_jsonl(BufReader::new(f))
                .with_context(|| format!("reading {}", file.display()))?;
            verify_records(&records, &pinned, &resume, false).map_err(|e| anyhow::anyhow!("{e}"))
        }
        (None, None) => bail!("give --db or --file"),
    };
    match result {
        Ok(chains) => {
            println!("OK: {} chains verified", chains.len());
            print_summary(&chains);
            Ok(())
        }
        Err(e) => bail!("FAILED: {e}"),
    }
}

async fn records(db: &Database, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
    let store = db.open().await?;
    let mut out = Vec::new();
    let mut q = q.clone();
    let want = q.limit;
    q.limit = want.min(10_000);
    loop {
        let page = store.audit_query(&q).await?;
        let Some((last, _)) = page.last() else { break };
        q.after_fwd_seq = Some(*last);
        out.extend(page.into_iter().map(|(_, r)| r));
        if out.len() >= want as usize {
            out.truncate(want as usize);
            break;
        }
    }
    store.close().await;
    Ok(out)
}

async fn export(db: Database, filter: Filter, out: Option<PathBuf>) -> Result<()> {
    let records = records(&db, &filter.query(u32::MAX)?).await?;
    let n = match out {
        Some(path) => {
            let f = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            write_jsonl(std::io::BufWriter::new(f), &records)?
        }
        None => write_jsonl(std::io::stdout().lock(), &records)?,
    };
    eprintln!("{n} records exported");
    Ok(())
}

async fn query(db: Database, filter: Filter, limit: u32) -> Result<()> {
    let records = records(&db, &filter.query(limit)?).await?;
    let mut out = std::io::stdout().lock();
    for r in &records {
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.time_unix_nanos))
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        let op = AuditOperation::try_from(r.operation)
            .map(|o| {
                o.as_str_name()
                    .trim_start_matches("AUDIT_OPERATION_")
                    .to_owned()
            })
            .unwrap_or_default();
        writeln!(
            out,
            "{}#{:<6} {at} {op:<18} {:<19} consumer {:<18} provider {:<18} {} {}",
            r.node_code,
            r.seq,
            r.outcome,
            r.consumer_uscc,
            r.provider_uscc,
            r.resource_id,
            r.request_id
        )?;
    }
    Ok(())
}

async fn archive(config: PathBuf, out: PathBuf, now: Option<String>) -> Result<()> {
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("cannot read configuration {}", config.display()))?;
    let cfg: fedgate_gateway::config::NodeConfig =
        toml::from_str(&text).with_context(|| format!("configuration {}", config.display()))?;
    let now_ns = match nanos("now", &now)? {
        Some(n) => n,
        None => fedgate_gateway::audit::now_nanos(),
    };
    let retention = i64::from(
        cfg.audit
            .retention_days
            .max(fedgate_gateway::config::MIN_RETENTION_DAYS),
    );
    let before = now_ns.saturating_sub(retention * 24 * 3600 * 1_000_000_000);
    let store = fedgate_gateway::node::open_store(&cfg.storage).await?;
    let moved = fedgate_gateway::audit::archive::archive(
        store.as_ref(),
        before,
        cfg.parent.is_some(),
        &out,
    )
    .await;
    store.close().await;
    println!("{} records archived to {}", moved?, out.display());
    Ok(())
}
