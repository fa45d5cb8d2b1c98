//! `fedgate backup`, `fedgate restore` and `fedgate backup-key`: an online, consistent copy of a node's store and
//! key material in one file (see [`archive`] for its format), and putting it back.
//!
//! A backup copies the store as of one instant while the node keeps serving — SQLite with `VACUUM INTO` in one
//! read transaction, PostgreSQL with `pg_dump` on one snapshot — and the signing key and TLS files the
//! configuration names. A restore reads and checks the whole archive before it changes anything, then puts the
//! store and each file back where the configuration names them.

pub mod archive;
mod pg;
mod restore;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use fedgate_gateway::config::{NodeConfig, StorageConfig};
use fedgate_gateway::grant::GrantKey;
use fedgate_gateway::store::SqliteStore;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use archive::{Manifest, Member, Part, Role, StoreKind};

/// Largest key or certificate file taken into a backup.
const MAX_KEY_FILE_BYTES: u64 = 1 << 20;
/// How an SQLite store is copied, for the manifest.
const SQLITE_METHOD: &str =
    "SQLite VACUUM INTO (one read transaction: the database as of its start)";

/// A failure of backup or restore with an exit status of its own.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The backup file cannot be read, fails a check, or is not this node's: exit status 65 (EX_DATAERR).
    #[error("{0}")]
    BadArchive(String),
    /// Going on would overwrite something that exists, or the node is running: exit status 73 (EX_CANTCREAT).
    #[error("{0}")]
    Refused(String),
}

impl BackupError {
    /// The process exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            BackupError::BadArchive(_) => 65,
            BackupError::Refused(_) => 73,
        }
    }
}

/// Arguments of `fedgate backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Path of the node's configuration: its store, signing key and TLS files are backed up.
    #[arg(long, short)]
    config: PathBuf,
    /// The backup file to write; refused if it exists.
    #[arg(long, short)]
    out: PathBuf,
    /// Encrypt the backup to this age public key (`age1…`, from `fedgate backup-key` or `age-keygen`); repeat
    /// for several recipients, any of whom can restore it.
    #[arg(long = "recipient", value_name = "AGE_PUBLIC_KEY")]
    recipients: Vec<String>,
}

/// Arguments of `fedgate restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Path of the node's configuration: where the store, signing key and TLS files are put back.
    #[arg(long, short)]
    config: PathBuf,
    /// The backup file.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// The age identity file holding the key the backup was encrypted to.
    #[arg(long, value_name = "KEYFILE")]
    identity: Option<PathBuf>,
    /// Replace an existing store, and key or TLS files that differ from the backup's.
    #[arg(long)]
    force: bool,
    /// Leave the TLS files as they are (they are managed elsewhere, or were renewed since the backup).
    #[arg(long)]
    skip_tls: bool,
    /// Read and check the whole backup (decryption, manifest, every member's hash, the SQLite database's
    /// structure) and restore nothing.
    #[arg(long)]
    check: bool,
}

/// Arguments of `fedgate backup-key`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The identity file to write (the secret key, mode 0600); refused if it exists.
    #[arg(long, short)]
    out: PathBuf,
}

/// A file of the node's key material and where the configuration keeps it.
struct KeyFile {
    role: Role,
    path: PathBuf,
}

fn key_files(config: &NodeConfig) -> Result<Vec<KeyFile>> {
    let signing = config.signing_key_path().ok_or_else(|| {
        anyhow!(
            "signing_key: the configuration names no signing key (required with a PostgreSQL store)"
        )
    })?;
    Ok(vec![
        KeyFile {
            role: Role::SigningKey,
            path: signing,
        },
        KeyFile {
            role: Role::TlsCa,
            path: config.tls.ca.clone(),
        },
        KeyFile {
            role: Role::TlsCert,
            path: config.tls.cert.clone(),
        },
        KeyFile {
            role: Role::TlsKey,
            path: config.tls.key.clone(),
        },
    ])
}

fn store_kind(storage: &StorageConfig) -> StoreKind {
    match storage {
        StorageConfig::Sqlite { .. } => StoreKind::Sqlite,
        StorageConfig::Postgres { .. } => StoreKind::Postgres,
    }
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Unix permission bits of a file.
fn mode_of(meta: &std::fs::Metadata) -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o777
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        0o600
    }
}

/// The directory `path` is in ("." for a bare file name).
fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Syncs a directory, so that a rename into it survives a crash.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Runs `fedgate backup`.
pub async fn backup(args: BackupArgs) -> Result<()> {
    let config = crate::cli::load_config(&args.config)?;
    let recipients = args
        .recipients
        .iter()
        .map(|r| {
            age::x25519::Recipient::from_str(r)
                .map_err(|e| anyhow!("--recipient {r}: not an age public key (age1…): {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if args.out.exists() {
        return Err(BackupError::Refused(format!(
            "{} exists: a backup never replaces a file; choose another name",
            args.out.display()
        ))
        .into());
    }
    let out_dir = dir_of(&args.out);
    // Private (0700), beside the output so the finished archive is renamed into place.
    let staging = tempfile::Builder::new()
        .prefix(".fedgate-backup-")
        .tempdir_in(&out_dir)
        .with_context(|| format!("creating a staging directory in {}", out_dir.display()))?;
    let kind = store_kind(&config.storage);

    let keys = key_files(&config)?;
    let signing = keys
        .iter()
        .find(|k| k.role == Role::SigningKey)
        .map(|k| k.path.clone())
        .unwrap_or_default();
    let signing_text = std::fs::read_to_string(&signing).with_context(|| {
        format!(
            "reading the signing key {} (a node creates it on first start)",
            signing.display()
        )
    })?;
    let public_key = GrantKey::parse_key_file(&signing, &signing_text)?.public_key_hex();

    let started_at = now();
    let store_copy = staging.path().join("store");
    let (method, store_mode, store_source) = match &config.storage {
        StorageConfig::Sqlite { path, .. } => {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("no SQLite database at {}", path.display()))?;
            let store = SqliteStore::open_read_only(path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let copied = store.backup_to(&store_copy).await;
            store.close().await;
            copied.with_context(|| format!("copying {}", path.display()))?;
            (SQLITE_METHOD, mode_of(&meta), path.display().to_string())
        }
        StorageConfig::Postgres { url, .. } => {
            pg::dump(url, &store_copy).await?;
            (pg::METHOD, 0o600, config.storage.describe())
        }
    };
    let finished_at = now();

    let mut parts = vec![Part {
        member: member(Role::Store, kind, &store_copy, store_mode, store_source)?,
        path: store_copy,
    }];
    for key in &keys {
        let copy = staging
            .path()
            .join(key.role.member_name(kind).replace('/', "-"));
        let mode = copy_key_file(&key.path, &copy, key.role)?;
        parts.push(Part {
            member: member(key.role, kind, &copy, mode, key.path.display().to_string())?,
            path: copy,
        });
    }
    let manifest = Manifest {
        format: archive::FORMAT.to_owned(),
        node_code: config.code.clone(),
        fedgate_version: env!("CARGO_PKG_VERSION").to_owned(),
        store: kind,
        method: method.to_owned(),
        started_at,
        finished_at,
        signing_public_key: public_key,
        members: parts.iter().map(|p| p.member.clone()).collect(),
    };

    let out = tempfile::Builder::new()
        .prefix(".fedgate-backup-")
        .suffix(".partial")
        .tempfile_in(&out_dir)
        .with_context(|| format!("creating a file in {}", out_dir.display()))?;
    let manifest_for_writer = manifest.clone();
    let n_recipients = recipients.len();
    let out = tokio::task::spawn_blocking(move || -> Result<tempfile::NamedTempFile> {
        let mut out = archive::write(
            std::io::BufWriter::new(out),
            &manifest_for_writer,
            &parts,
            &recipients,
        )?
        .into_inner()
        .map_err(|e| e.into_error())
        .context("writing the backup")?;
        out.as_file_mut().sync_all().context("syncing the backup")?;
        Ok(out)
    })
    .await??;
    let (size, sha256) = archive::hash_file(out.path()).context("hashing the backup")?;
    out.persist_noclobber(&args.out).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::Error::from(BackupError::Refused(format!(
                "{} appeared while the backup was written; it was left alone",
                args.out.display()
            )))
        } else {
            anyhow::Error::from(e.error).context(format!("writing {}", args.out.display()))
        }
    })?;
    sync_dir(&out_dir)?;
    drop(staging);
    let store_size = manifest.member(Role::Store).map_or(0, |m| m.size);
    println!(
        "backup of node {} written to {} ({size} bytes, SHA-256 {sha256})",
        manifest.node_code,
        args.out.display()
    );
    println!(
        "  store: {}, {store_size} bytes, as of one instant between {} and {}",
        manifest.store, manifest.started_at, manifest.finished_at
    );
    println!(
        "  signing key {}, TLS CA, certificate and key",
        manifest.signing_public_key
    );
    match n_recipients {
        0 => println!(
            "  not encrypted: it holds the node's private keys; keep it as secret as they are"
        ),
        n => println!("  encrypted to {n} age recipient(s)"),
    }
    Ok(())
}

/// The manifest entry of a staged file.
fn member(role: Role, kind: StoreKind, staged: &Path, mode: u32, source: String) -> Result<Member> {
    let (size, sha256) =
        archive::hash_file(staged).with_context(|| format!("hashing {}", staged.display()))?;
    Ok(Member {
        name: role.member_name(kind).to_owned(),
        role,
        size,
        sha256,
        mode,
        source,
    })
}

/// Copies a key or certificate file into the private staging directory; returns its permission bits.
fn copy_key_file(from: &Path, to: &Path, role: Role) -> Result<u32> {
    let meta = std::fs::metadata(from)
        .with_context(|| format!("reading the {} {}", role.describe(), from.display()))?;
    if meta.len() > MAX_KEY_FILE_BYTES {
        bail!(
            "the {} {} has {} bytes, more than any key or certificate file",
            role.describe(),
            from.display(),
            meta.len()
        );
    }
    let bytes = std::fs::read(from)
        .with_context(|| format!("reading the {} {}", role.describe(), from.display()))?;
    std::fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    Ok(mode_of(&meta))
}

/// Runs `fedgate backup-key`.
pub fn keygen(args: KeygenArgs) -> Result<()> {
    use age::secrecy::ExposeSecret;
    use std::io::Write;
    let identity = age::x25519::Identity::generate();
    let public = identity.to_public().to_string();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&args.out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::Error::from(BackupError::Refused(format!(
                "{} exists: a key file is never replaced",
                args.out.display()
            )))
        } else {
            anyhow::Error::from(e).context(format!("creating {}", args.out.display()))
        }
    })?;
    let secret = identity.to_string();
    let written = writeln!(
        file,
        "# created: {}\n# public key: {public}\n{}",
        now(),
        secret.expose_secret()
    )
    .and_then(|()| file.sync_all());
    written.with_context(|| format!("writing {}", args.out.display()))?;
    println!("{public}");
    Ok(())
}

/// Runs `fedgate restore`.
pub async fn restore(args: RestoreArgs) -> Result<()> {
    restore::run(args).await
}

#[cfg(test)]
mod tests;
