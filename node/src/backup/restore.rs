//! `fedgate restore`: reads and checks the whole backup before it changes anything, then puts the store and each
//! file back where the configuration names them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedgate_gateway::config::{NodeConfig, StorageConfig};
use fedgate_gateway::store::{PgStore, SqliteStore, Store};
use fedgate_proto::v1::Stream;

use super::archive::{self, Identities, Manifest, Member, Role, Staging, StoreKind};
use super::{BackupError, KeyFile, RestoreArgs, dir_of, key_files, pg, store_kind, sync_dir};

/// Where a restore puts one member, decided before anything is read past the manifest.
#[derive(Debug)]
enum Target {
    /// Into the configured SQLite file.
    SqliteFile(PathBuf),
    /// Into the configured PostgreSQL database, through `pg_restore`.
    Database(String),
    /// Into the file at this path.
    File(PathBuf),
    /// Nowhere: the file there already holds these bytes, or the TLS files are left alone.
    Keep(PathBuf, &'static str),
}

/// Runs `fedgate restore`.
pub(super) async fn run(args: RestoreArgs) -> Result<()> {
    let config = crate::cli::load_config(&args.config)?;
    let kind = store_kind(&config.storage);
    let identities = args.identity.as_deref().map(Identities::load).transpose()?;
    let keys = key_files(&config)?;
    if !args.check {
        refuse_if_running(&config).await?;
        refuse_existing_store(&config.storage, args.force).await?;
    }
    let input = std::fs::File::open(&args.input)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let check_dir = scratch_dir(&config, args.check)?;

    let opts = (args.force, args.skip_tls, args.check);
    let code = config.code.clone();
    let storage = config.storage.clone();
    let scratch = check_dir.path().to_path_buf();
    let what = args.input.clone();
    let (manifest, staging, targets) = tokio::task::spawn_blocking(move || {
        let mut targets = Vec::new();
        let (manifest, staging) = archive::read(input, &what, identities.as_ref(), |manifest| {
            targets = plan(manifest, &code, &storage, &keys, opts)?;
            stage(&targets, &scratch, opts.2)
        })?;
        Ok::<_, anyhow::Error>((manifest, staging, targets))
    })
    .await??;

    let staged_store = staging
        .get(Role::Store.member_name(kind))
        .map(|f| f.path().to_path_buf())
        .context("the backup holds no store")?;
    if kind == StoreKind::Sqlite {
        let store = SqliteStore::open_read_only(&staged_store).await?;
        let checked = store.quick_check().await;
        store.close().await;
        checked.map_err(|e| {
            BackupError::BadArchive(format!(
                "{}: its database fails SQLite's check: {e}",
                args.input.display()
            ))
        })?;
    }
    println!(
        "backup of node {} ({} store as of {}..{}, written by fedgate {}): every member checked",
        manifest.node_code,
        manifest.store,
        manifest.started_at,
        manifest.finished_at,
        manifest.fedgate_version
    );
    if args.check {
        if kind == StoreKind::Sqlite {
            let store = SqliteStore::open_read_only(&staged_store).await?;
            let summary = summarize(&store, &manifest.node_code).await;
            store.close().await;
            println!("  {}", summary?);
        }
        println!("  --check: nothing was restored");
        return Ok(());
    }
    place(staging, &targets).await?;
    let summary = match &config.storage {
        StorageConfig::Sqlite { path, .. } => {
            let store = SqliteStore::open_read_only(path).await?;
            let s = summarize(&store, &manifest.node_code).await;
            store.close().await;
            s?
        }
        StorageConfig::Postgres { url, .. } => {
            let store = PgStore::connect_existing(url).await?;
            let s = summarize(&store, &manifest.node_code).await;
            store.close().await;
            s?
        }
    };
    println!("  restored: {summary}");
    println!(
        "  signing key {}; start the node to serve from the restored store",
        manifest.signing_public_key
    );
    Ok(())
}

/// A private directory for members that are checked but not placed, and for a PostgreSQL dump: for an SQLite store
/// in its directory (which has room for the store, and is writable where the root file system may not be); for
/// `--check` and a PostgreSQL store in the system's temporary directory (`TMPDIR`).
fn scratch_dir(config: &NodeConfig, check: bool) -> Result<tempfile::TempDir> {
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix(".fedgate-restore-");
        b
    };
    match &config.storage {
        StorageConfig::Sqlite { path, .. } if !check => {
            let state = dir_of(path);
            std::fs::create_dir_all(&state)
                .with_context(|| format!("creating directory {}", state.display()))?;
            builder
                .tempdir_in(&state)
                .with_context(|| format!("creating a staging directory in {}", state.display()))
        }
        _ => builder
            .tempdir()
            .context("creating a staging directory in the temporary directory (TMPDIR)"),
    }
}

/// How long the sessions of a node that has just stopped (and of the checks just before) may take to leave its
/// PostgreSQL database: a server under load ends a backend some time after its client closed the connection.
const SESSIONS_END_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Refuses to restore under a running node: its listen address must be free, and no other session may be
/// connected to its PostgreSQL database (replicas elsewhere).
async fn refuse_if_running(config: &NodeConfig) -> Result<()> {
    match std::net::TcpListener::bind(&config.listen) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(BackupError::Refused(format!(
                "{} is in use: stop node {} before restoring its store",
                config.listen, config.code
            ))
            .into());
        }
        // Free, or not an address of this machine (restoring elsewhere): nothing runs here.
        _ => {}
    }
    if let StorageConfig::Postgres { url, .. } = &config.storage {
        // The sessions of a node that has just stopped end moments after it: look again for a few seconds.
        let deadline = tokio::time::Instant::now() + SESSIONS_END_WITHIN;
        let mut sessions;
        loop {
            sessions = PgStore::other_sessions(url)
                .await
                .with_context(|| format!("connecting to {}", config.storage.describe()))?;
            if sessions == 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        if sessions > 0 {
            return Err(BackupError::Refused(format!(
                "{sessions} other session(s) are connected to {}: stop every replica of node {} (and anything \
                 else using the database) before restoring its store",
                config.storage.describe(),
                config.code
            ))
            .into());
        }
    }
    Ok(())
}

/// Refuses to replace an existing store unless `force`.
async fn refuse_existing_store(storage: &StorageConfig, force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    let exists = match storage {
        StorageConfig::Sqlite { path, .. } => sqlite_files(path).iter().any(|p| p.exists()),
        StorageConfig::Postgres { url, .. } => PgStore::holds_tables(url)
            .await
            .with_context(|| format!("connecting to {}", storage.describe()))?,
    };
    if exists {
        return Err(BackupError::Refused(format!(
            "a store exists at {}: restore with --force to replace it",
            storage.describe()
        ))
        .into());
    }
    Ok(())
}

/// The SQLite database file and its WAL and shared-memory files.
fn sqlite_files(path: &Path) -> [PathBuf; 3] {
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    [path.to_path_buf(), with("-wal"), with("-shm")]
}

/// Decides where each member of `manifest` goes, refusing a backup of another node or store kind, and files
/// that differ from the backup's unless `force`.
fn plan(
    manifest: &Manifest,
    code: &str,
    storage: &StorageConfig,
    keys: &[KeyFile],
    (force, skip_tls, check): (bool, bool, bool),
) -> Result<Vec<(Member, Target)>> {
    if manifest.node_code != code {
        return Err(BackupError::BadArchive(format!(
            "the backup is of node {}, the configuration is node {code}",
            manifest.node_code
        ))
        .into());
    }
    if manifest.store != store_kind(storage) {
        return Err(BackupError::BadArchive(format!(
            "the backup holds a {} store, the configuration uses {}",
            manifest.store,
            store_kind(storage)
        ))
        .into());
    }
    let mut targets = Vec::new();
    let mut differing = Vec::new();
    for m in &manifest.members {
        let target = match m.role {
            Role::Store => match storage {
                StorageConfig::Sqlite { path, .. } => Target::SqliteFile(path.clone()),
                StorageConfig::Postgres { url, .. } => Target::Database(url.clone()),
            },
            role => {
                let path = keys
                    .iter()
                    .find(|k| k.role == role)
                    .map(|k| k.path.clone())
                    .context("no configured path for a key file")?;
                if role.is_tls() && skip_tls {
                    Target::Keep(path, "left alone (--skip-tls)")
                } else {
                    match archive::hash_file(&path) {
                        Ok((_, hash)) if hash == m.sha256 => Target::Keep(path, "already in place"),
                        Ok(_) => {
                            if !force {
                                differing.push(format!("{} {}", role.describe(), path.display()));
                            }
                            Target::File(path)
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Target::File(path),
                        Err(e) => {
                            return Err(anyhow::Error::from(e)
                                .context(format!("reading {}", path.display())));
                        }
                    }
                }
            }
        };
        targets.push((m.clone(), target));
    }
    for role in [
        Role::Store,
        Role::SigningKey,
        Role::TlsCa,
        Role::TlsCert,
        Role::TlsKey,
    ] {
        if manifest.member(role).is_none() {
            return Err(BackupError::BadArchive(format!(
                "the backup holds no {}",
                role.describe()
            ))
            .into());
        }
    }
    if !differing.is_empty() && !check {
        return Err(BackupError::Refused(format!(
            "these files differ from the backup's: {}; restore with --force to replace them{}",
            differing.join(", "),
            if skip_tls {
                ""
            } else {
                " (or --skip-tls to leave the TLS files as they are)"
            }
        ))
        .into());
    }
    Ok(targets)
}

/// A staged file for every member: beside its destination (so that placing it is a rename), or in `scratch`
/// when it is not placed or everything is only checked (`scratch` is where a PostgreSQL dump waits anyway).
fn stage(targets: &[(Member, Target)], scratch: &Path, check: bool) -> Result<Staging> {
    let mut staging = Staging::new();
    for (member, target) in targets {
        let dir = match target {
            Target::SqliteFile(path) | Target::File(path) if !check => {
                let dir = dir_of(path);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating directory {}", dir.display()))?;
                dir
            }
            _ => scratch.to_path_buf(),
        };
        let file = tempfile::Builder::new()
            .prefix(".fedgate-restore-")
            .tempfile_in(&dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        staging.insert(member.name.clone(), file);
    }
    Ok(staging)
}

/// Puts every checked member in place: the store first (a PostgreSQL restore is one transaction that may still
/// fail), then the key files.
async fn place(mut staging: Staging, targets: &[(Member, Target)]) -> Result<()> {
    let mut order: Vec<&(Member, Target)> = targets.iter().collect();
    order.sort_by_key(|(m, _)| m.role != Role::Store);
    for (member, target) in order {
        let staged = staging
            .remove(&member.name)
            .with_context(|| format!("member {} was not staged", member.name))?;
        match target {
            Target::Database(url) => {
                pg::restore(url, staged.path()).await.with_context(|| {
                    format!(
                        "restoring {} into {}",
                        member.name,
                        StorageConfig::Postgres {
                            url: url.clone(),
                            busy_timeout_ms: 0,
                        }
                        .describe()
                    )
                })?;
                println!("  store: pg_restore into the configured database");
            }
            Target::SqliteFile(path) => {
                // A WAL left by the replaced database would be replayed into the restored one.
                for stale in &sqlite_files(path)[1..] {
                    match std::fs::remove_file(stale) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(anyhow::Error::from(e)
                                .context(format!("removing {}", stale.display())));
                        }
                        _ => {}
                    }
                }
                put(staged, path, member.mode)?;
                println!("  store: {}", path.display());
            }
            Target::File(path) => {
                put(staged, path, member.mode)?;
                println!("  {}: {}", member.role.describe(), path.display());
            }
            Target::Keep(path, why) => {
                println!("  {}: {} {why}", member.role.describe(), path.display());
            }
        }
    }
    Ok(())
}

/// Renames a staged file to `path` with permission bits `mode`; run as root, it takes the owner and group of
/// the directory it is put in (the node's user, for its state directory).
fn put(staged: tempfile::NamedTempFile, path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let file = staged.as_file();
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        let dir = dir_of(path);
        let mine = file.metadata()?;
        let theirs = std::fs::metadata(&dir)?;
        if mine.uid() == 0 && (theirs.uid(), theirs.gid()) != (mine.uid(), mine.gid()) {
            std::os::unix::fs::chown(staged.path(), Some(theirs.uid()), Some(theirs.gid()))
                .with_context(|| format!("giving {} to its directory's owner", path.display()))?;
        }
    }
    staged
        .persist(path)
        .map_err(|e| anyhow::Error::from(e.error).context(format!("writing {}", path.display())))?;
    sync_dir(&dir_of(path))
}

/// What a store holds of the node `code`, for the operator.
async fn summarize(store: &dyn Store, code: &str) -> Result<String> {
    let head = store.audit_head(code).await?.map_or(0, |r| r.seq);
    Ok(format!(
        "audit chain of {code} to seq {head}, {} audit records, {} catalog entries, catalog outbox to {}",
        store.audit_count().await?,
        store.count_entries().await?,
        store.outbox_head(Stream::Catalog).await?
    ))
}
