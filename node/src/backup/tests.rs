//! The backup archive read back: whole, encrypted, damaged, truncated.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use super::BackupError;
use super::archive::{self, Identities, Manifest, Member, Part, Role, Staging, StoreKind};

/// A store of 200 KiB (more than three age chunks of 64 KiB) and four small key files, staged in `dir`.
fn parts(dir: &Path) -> Result<Vec<Part>> {
    let mut parts = Vec::new();
    for (i, role) in [
        Role::Store,
        Role::SigningKey,
        Role::TlsCa,
        Role::TlsCert,
        Role::TlsKey,
    ]
    .into_iter()
    .enumerate()
    {
        let len = if role == Role::Store { 200 * 1024 } else { 300 };
        // Bytes that differ between members and never repeat within 251, so a damaged copy is never equal.
        let bytes: Vec<u8> = (0..len).map(|j| ((j * 7 + i * 13) % 251) as u8).collect();
        let path = dir.join(format!("part-{i}"));
        std::fs::write(&path, &bytes)?;
        let (size, sha256) = archive::hash_file(&path)?;
        parts.push(Part {
            member: Member {
                name: role.member_name(StoreKind::Sqlite).to_owned(),
                role,
                size,
                sha256,
                mode: 0o600,
                source: path.display().to_string(),
            },
            path,
        });
    }
    Ok(parts)
}

fn manifest(parts: &[Part]) -> Manifest {
    Manifest {
        format: archive::FORMAT.to_owned(),
        node_code: "350102".to_owned(),
        fedgate_version: "test".to_owned(),
        store: StoreKind::Sqlite,
        method: "test".to_owned(),
        started_at: "2026-01-01T00:00:00Z".to_owned(),
        finished_at: "2026-01-01T00:00:01Z".to_owned(),
        signing_public_key: "00".repeat(32),
        members: parts.iter().map(|p| p.member.clone()).collect(),
    }
}

/// A key pair written as `fedgate backup-key` writes it.
fn identity(dir: &Path, name: &str) -> Result<(age::x25519::Recipient, Identities)> {
    let path = dir.join(name);
    super::keygen(super::KeygenArgs { out: path.clone() })?;
    let text = std::fs::read_to_string(&path)?;
    let public = text
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .ok_or_else(|| anyhow::anyhow!("no public key in {text}"))?;
    Ok((
        public.parse().map_err(|e: &str| anyhow::anyhow!("{e}"))?,
        Identities::load(&path)?,
    ))
}

fn archive_bytes(
    parts: &[Part],
    recipients: &[age::x25519::Recipient],
) -> Result<(Manifest, Vec<u8>)> {
    let manifest = manifest(parts);
    let bytes = archive::write(Vec::new(), &manifest, parts, recipients)?;
    Ok((manifest, bytes))
}

/// Reads `bytes` as an archive, staging every member in `dir`.
fn read(dir: &Path, bytes: &[u8], ids: Option<&Identities>) -> Result<(Manifest, Staging)> {
    let path = dir.join("archive");
    std::fs::File::create(&path)?.write_all(bytes)?;
    let staged_in = dir.join("staged");
    std::fs::create_dir_all(&staged_in)?;
    archive::read(std::fs::File::open(&path)?, &path, ids, |m| {
        let mut staging = Staging::new();
        for member in &m.members {
            staging.insert(
                member.name.clone(),
                tempfile::NamedTempFile::new_in(&staged_in)?,
            );
        }
        Ok(staging)
    })
}

/// The reason a read failed, which must be the archive's.
fn bad_archive(result: Result<(Manifest, Staging)>) -> String {
    match result {
        Ok(_) => panic!("a damaged archive was read as whole"),
        Err(e) => match e.downcast_ref::<BackupError>() {
            Some(BackupError::BadArchive(reason)) => reason.clone(),
            _ => panic!("not reported as a bad archive: {e:#}"),
        },
    }
}

fn assert_whole(parts: &[Part], staging: &Staging) -> Result<()> {
    for p in parts {
        let staged = std::fs::read(staging[&p.member.name].path())?;
        assert_eq!(staged, std::fs::read(&p.path)?, "{}", p.member.name);
    }
    Ok(())
}

#[test]
fn an_archive_reads_back_whole_with_its_manifest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let parts = parts(dir.path())?;
    let (manifest, bytes) = archive_bytes(&parts, &[])?;
    let (read_back, staging) = read(dir.path(), &bytes, None)?;
    assert_eq!(read_back.node_code, manifest.node_code);
    assert_eq!(read_back.members.len(), 5);
    assert_whole(&parts, &staging)
}

#[test]
fn an_encrypted_archive_opens_only_with_its_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let parts = parts(dir.path())?;
    let (recipient, mine) = identity(dir.path(), "mine.key")?;
    let (_, other) = identity(dir.path(), "other.key")?;
    let (_, bytes) = archive_bytes(&parts, &[recipient])?;
    assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
    assert!(
        !bytes.windows(6).any(|w| w == b"350102"),
        "the manifest is not in the clear"
    );

    let (_, staging) = read(dir.path(), &bytes, Some(&mine))?;
    assert_whole(&parts, &staging)?;
    let reason = bad_archive(read(dir.path(), &bytes, Some(&other)));
    assert!(reason.contains("no key in"), "{reason}");
    let reason = bad_archive(read(dir.path(), &bytes, None));
    assert!(reason.contains("give --identity"), "{reason}");
    Ok(())
}

#[test]
fn a_damaged_byte_anywhere_in_a_member_header_or_manifest_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let parts = parts(dir.path())?;
    let (_, bytes) = archive_bytes(&parts, &[])?;
    let mut positions = vec![
        // The manifest's tar header (its mode field) and its JSON (inside "350102").
        100,
        find(&bytes, b"350102").map_or(0, |p| p + 3),
    ];
    for p in &parts {
        let content = std::fs::read(&p.path)?;
        let at = find(&bytes, &content[..64]).unwrap_or(0);
        positions.extend([at, at + content.len() / 2, at + content.len() - 1]);
    }
    // The checksum member's content.
    positions.push(bytes.len() - 1024 - 512 + 10);
    for at in positions {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x20;
        let reason = bad_archive(read(dir.path(), &damaged, None));
        assert!(!reason.is_empty(), "byte {at}");
    }
    Ok(())
}

#[test]
fn a_truncated_archive_is_refused_wherever_it_ends() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let parts = parts(dir.path())?;
    let (recipient, key) = identity(dir.path(), "k.key")?;
    let (_, plain) = archive_bytes(&parts, &[])?;
    let (_, encrypted) = archive_bytes(&parts, &[recipient])?;
    // The two zero blocks that end a tar archive carry nothing: cutting them off loses no member.
    let meaningful = plain.len() - 1024;
    for len in (0..meaningful)
        .step_by(4093)
        .chain([511, 512, meaningful - 1])
    {
        let reason = bad_archive(read(dir.path(), &plain[..len], None));
        assert!(!reason.is_empty(), "plain archive cut at {len}");
    }
    // An age file is authenticated up to its last chunk: every cut is noticed, at a chunk boundary too.
    for len in (0..encrypted.len())
        .step_by(4093)
        .chain([64 * 1024, encrypted.len() - 1])
    {
        let reason = bad_archive(read(dir.path(), &encrypted[..len], Some(&key)));
        assert!(!reason.is_empty(), "encrypted archive cut at {len}");
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
