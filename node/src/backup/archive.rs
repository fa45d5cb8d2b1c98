//! The backup file: a tar archive whose first member, `manifest.json`, names the node, its store and how it was
//! copied, and every other member with its size and SHA-256; its last member, `manifest.sha256`, is the SHA-256
//! of the manifest, so a damaged manifest is noticed too. With recipients, the whole archive is an age file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BackupError;

/// The format this build writes and reads.
pub const FORMAT: &str = "fedgate-backup/1";
/// Name of the first member.
const MANIFEST: &str = "manifest.json";
/// Name of the last member.
const MANIFEST_SUM: &str = "manifest.sha256";
/// Largest manifest read.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// How a binary age file begins.
const AGE_BINARY: &[u8] = b"age-encryption.org/";
/// How an armored age file begins.
const AGE_ARMORED: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";
/// Copy buffer size.
const CHUNK: usize = 64 * 1024;

/// What a member of the archive is, which decides where a restore puts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The store: an SQLite database, or a `pg_dump` archive of the PostgreSQL database.
    Store,
    /// The node's Ed25519 signing key (audit chain, grants).
    SigningKey,
    /// The federation's CA certificate(s).
    TlsCa,
    /// The node's certificate.
    TlsCert,
    /// The node's TLS private key.
    TlsKey,
}

impl Role {
    /// The member's name in the archive.
    pub fn member_name(self, store: StoreKind) -> &'static str {
        match (self, store) {
            (Role::Store, StoreKind::Sqlite) => "store/node.db",
            (Role::Store, StoreKind::Postgres) => "store/node.pgdump",
            (Role::SigningKey, _) => "keys/signing.key",
            (Role::TlsCa, _) => "tls/ca.crt",
            (Role::TlsCert, _) => "tls/node.crt",
            (Role::TlsKey, _) => "tls/node.key",
        }
    }

    /// Whether the member is one of the node's TLS files.
    pub fn is_tls(self) -> bool {
        matches!(self, Role::TlsCa | Role::TlsCert | Role::TlsKey)
    }

    /// What the member is, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Role::Store => "store",
            Role::SigningKey => "signing key",
            Role::TlsCa => "TLS CA certificate",
            Role::TlsCert => "TLS certificate",
            Role::TlsKey => "TLS key",
        }
    }
}

/// The store backend a backup was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// An SQLite file, copied with `VACUUM INTO`.
    Sqlite,
    /// A PostgreSQL database, dumped with `pg_dump --format=custom`.
    Postgres,
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        })
    }
}

/// One member of the archive as the manifest describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    /// Its name in the archive.
    pub name: String,
    /// What it is.
    pub role: Role,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// Unix permission bits of the file it was read from, given back on restore.
    pub mode: u32,
    /// Where it was read from: a path, or the database's URL without its password.
    pub source: String,
}

/// What a backup holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The node's division code.
    pub node_code: String,
    /// Version of the fedgate that wrote it.
    pub fedgate_version: String,
    /// The store backend.
    pub store: StoreKind,
    /// How the store was copied.
    pub method: String,
    /// When the copy of the store began (RFC 3339, UTC).
    pub started_at: String,
    /// When it was complete; the store is as it was at one instant in between.
    pub finished_at: String,
    /// The node's signing public key (hex): the key its audit chain announces.
    pub signing_public_key: String,
    /// Every member but the manifest and its checksum, in archive order.
    pub members: Vec<Member>,
}

impl Manifest {
    /// The member with `role`.
    pub fn member(&self, role: Role) -> Option<&Member> {
        self.members.iter().find(|m| m.role == role)
    }
}

/// A member to write: its manifest entry and the file holding its bytes.
#[derive(Debug)]
pub struct Part {
    /// Its entry in the manifest.
    pub member: Member,
    /// The file to copy into the archive.
    pub path: PathBuf,
}

/// The size and SHA-256 (hex) of a file.
pub fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Writes the archive of `manifest` and `parts` to `out`, encrypted to `recipients` unless there are none, and
/// returns `out`.
pub fn write<W: Write>(
    out: W,
    manifest: &Manifest,
    parts: &[Part],
    recipients: &[age::x25519::Recipient],
) -> Result<W> {
    if recipients.is_empty() {
        return write_tar(out, manifest, parts);
    }
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .context("encrypting the backup")?;
    let encrypted = encryptor
        .wrap_output(out)
        .context("writing the backup's age header")?;
    let encrypted = write_tar(encrypted, manifest, parts)?;
    encrypted
        .finish()
        .context("finishing the backup's encryption")
}

fn write_tar<W: Write>(out: W, manifest: &Manifest, parts: &[Part]) -> Result<W> {
    let json = serde_json::to_vec_pretty(manifest).context("encoding the manifest")?;
    let mut tar = tar::Builder::new(out);
    append(
        &mut tar,
        MANIFEST,
        json.len() as u64,
        0o600,
        json.as_slice(),
    )?;
    for part in parts {
        let file =
            File::open(&part.path).with_context(|| format!("reading {}", part.path.display()))?;
        append(
            &mut tar,
            &part.member.name,
            part.member.size,
            part.member.mode,
            file,
        )?;
    }
    let sum = format!("{}\n", hex::encode(Sha256::digest(&json)));
    append(
        &mut tar,
        MANIFEST_SUM,
        sum.len() as u64,
        0o600,
        sum.as_bytes(),
    )?;
    tar.into_inner().context("finishing the archive")
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    mode: u32,
    data: impl Read,
) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(mode & 0o777);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    tar.append_data(&mut header, name, data)
        .with_context(|| format!("writing {name} into the backup"))
}

/// The age identities a restore may decrypt with, read from one identity file.
pub struct Identities {
    path: PathBuf,
    keys: Vec<Box<dyn age::Identity + Send + Sync>>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("path", &self.path)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Identities {
    /// Reads an age identity file (`fedgate backup-key`, `age-keygen`).
    pub fn load(path: &Path) -> Result<Self> {
        let name = path.to_string_lossy().into_owned();
        let keys = age::IdentityFile::from_file(name)
            .and_then(|f| f.into_identities().map_err(io::Error::other))
            .with_context(|| format!("--identity {}: not an age identity file", path.display()))?;
        if keys.is_empty() {
            anyhow::bail!("--identity {}: the file holds no key", path.display());
        }
        Ok(Self {
            path: path.to_path_buf(),
            keys,
        })
    }
}

/// The staged copies of an archive's members, by member name: files the caller places once every check passed.
pub type Staging = BTreeMap<String, tempfile::NamedTempFile>;

/// Reads the whole archive `input` (called `what` in messages): decrypts it with `identities` if it is an age
/// file, parses the manifest and hands it to `plan`, which returns a staged file for every member; copies each
/// member into its file while hashing it; and checks that every member arrived whole with the size and hash of
/// the manifest, that the manifest matches its checksum, and that the file ends where the archive does. Any
/// problem with the archive is a [`BackupError::BadArchive`]; nothing but the staged files is written.
pub fn read(
    input: File,
    what: &Path,
    identities: Option<&Identities>,
    plan: impl FnOnce(&Manifest) -> Result<Staging>,
) -> Result<(Manifest, Staging)> {
    let bad = |reason: String| BackupError::BadArchive(format!("{}: {reason}", what.display()));
    let mut buffered = BufReader::new(input);
    let head = buffered
        .fill_buf()
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    let encrypted = head.starts_with(AGE_BINARY) || head.starts_with(AGE_ARMORED);
    let plain: Box<dyn Read> = if encrypted {
        let ids = identities.ok_or_else(|| {
            bad("the backup is encrypted: give --identity with the key it was encrypted to".into())
        })?;
        let decryptor = age::Decryptor::new(age::armor::ArmoredReader::new(buffered))
            .map_err(|e| bad(format!("not a readable age file: {e}")))?;
        let reader = decryptor
            .decrypt(ids.keys.iter().map(|k| k.as_ref() as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => bad(format!(
                    "no key in {} opens it: it was encrypted to other recipients",
                    ids.path.display()
                )),
                other => bad(format!("cannot decrypt: {other}")),
            })?;
        Box::new(reader)
    } else {
        Box::new(buffered)
    };
    let mut archive = tar::Archive::new(plain);
    let mut entries = archive
        .entries()
        .map_err(|e| bad(format!("not a backup archive: {e}")))?;
    let damaged = |e: io::Error| bad(format!("damaged or truncated: {e}"));

    let mut first = entries
        .next()
        .ok_or_else(|| bad("empty: it holds no manifest".into()))?
        .map_err(damaged)?;
    if first.path_bytes().as_ref() != MANIFEST.as_bytes() {
        return Err(bad(format!(
            "not a fedgate backup: it begins with {:?}, not {MANIFEST}",
            String::from_utf8_lossy(&first.path_bytes())
        ))
        .into());
    }
    let json = read_small(&mut first, MAX_MANIFEST_BYTES).map_err(damaged)?;
    drop(first);
    let manifest: Manifest = serde_json::from_slice(&json)
        .map_err(|e| bad(format!("its manifest does not parse: {e}")))?;
    if manifest.format != FORMAT {
        return Err(bad(format!(
            "format {:?}; this fedgate reads {FORMAT:?}",
            manifest.format
        ))
        .into());
    }
    let mut staging = plan(&manifest)?;
    let mut seen = BTreeMap::new();
    let mut sum = None;
    for entry in entries.by_ref() {
        let mut entry = entry.map_err(damaged)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if name == MANIFEST_SUM {
            sum = Some(read_small(&mut entry, 1024).map_err(damaged)?);
            break;
        }
        let member = manifest
            .members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| bad(format!("member {name:?} is not in its manifest")))?;
        if seen.insert(name.clone(), ()).is_some() {
            return Err(bad(format!("member {name} appears twice")).into());
        }
        let staged = staging
            .get_mut(&name)
            .with_context(|| format!("no place was chosen for member {name}"))?;
        let (size, hash) = copy_hashed(&mut entry, staged.as_file_mut(), &bad)?;
        if size != member.size || hash != member.sha256 {
            return Err(bad(format!(
                "member {name} is damaged: {size} bytes with SHA-256 {hash}, the manifest says {} bytes with \
                 SHA-256 {}",
                member.size, member.sha256
            ))
            .into());
        }
    }
    if let Some(missing) = manifest
        .members
        .iter()
        .find(|m| !seen.contains_key(&m.name))
    {
        return Err(bad(format!(
            "truncated: it ends before member {} ({})",
            missing.name,
            missing.role.describe()
        ))
        .into());
    }
    let sum = sum.ok_or_else(|| bad(format!("truncated: it ends before {MANIFEST_SUM}")))?;
    let expected = hex::encode(Sha256::digest(&json));
    if String::from_utf8_lossy(&sum).trim() != expected {
        return Err(
            bad("its manifest is damaged (it does not match manifest.sha256)".into()).into(),
        );
    }
    if let Some(extra) = entries.next() {
        let name = extra
            .map(|e| String::from_utf8_lossy(&e.path_bytes()).into_owned())
            .unwrap_or_default();
        return Err(bad(format!("member {name:?} follows {MANIFEST_SUM}")).into());
    }
    // Read to the end: an encrypted file is only authenticated once its last chunk has been read.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(damaged)?;
    for file in staging.values() {
        file.as_file()
            .sync_all()
            .context("syncing a restored file")?;
    }
    Ok((manifest, staging))
}

/// Reads a whole entry of at most `limit` bytes.
fn read_small(entry: &mut impl Read, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    entry.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("member larger than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// Copies `from` into `to`, returning the bytes copied and their SHA-256; failures to read are the archive's.
fn copy_hashed(
    from: &mut impl Read,
    to: &mut File,
    bad: &impl Fn(String) -> BackupError,
) -> Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = from
            .read(&mut buf)
            .map_err(|e| bad(format!("damaged or truncated: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).context("writing a restored file")?;
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}
