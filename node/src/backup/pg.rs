//! `pg_dump` and `pg_restore` of a node's PostgreSQL database (Debian: package `postgresql-client`, of at least
//! the server's major version). The password, if the URL holds one, reaches them through `PGPASSWORD`, never on
//! a command line that other users of the machine can read.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// How the store is copied, for the manifest.
pub const METHOD: &str =
    "pg_dump --format=custom (one transaction on one snapshot: the database as of its start)";

/// Dumps the database at `url` into `out` with `pg_dump --format=custom`.
pub async fn dump(url: &str, out: &Path) -> Result<()> {
    let mut cmd = command("pg_dump", url);
    cmd.arg("--format=custom").arg("--file").arg(out);
    run(cmd, "pg_dump").await
}

/// Restores `dump` into the database at `url` with `pg_restore --clean --if-exists` in one transaction: what the
/// dump holds replaces what the database held, or nothing changes.
pub async fn restore(url: &str, dump: &Path) -> Result<()> {
    let mut cmd = command("pg_restore", url);
    cmd.args([
        "--clean",
        "--if-exists",
        "--no-owner",
        "--no-privileges",
        "--single-transaction",
        "--exit-on-error",
    ])
    .arg(dump);
    run(cmd, "pg_restore").await
}

/// `program` connecting to `url`, its password passed in the environment.
fn command(program: &str, url: &str) -> Command {
    let (url, password) = split_password(url);
    let mut cmd = Command::new(program);
    cmd.arg("--dbname").arg(url);
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

async fn run(mut cmd: Command, program: &str) -> Result<()> {
    let out = match cmd.output().await {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{program} is not installed: a PostgreSQL store is backed up and restored with pg_dump and \
             pg_restore (Debian: apt-get install postgresql-client)"
        ),
        Err(e) => return Err(e).with_context(|| format!("running {program}")),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let tail = &stderr[stderr.floor_char_boundary(stderr.len().saturating_sub(4000))..];
        bail!("{program} failed ({}): {tail}", out.status);
    }
    Ok(())
}

/// `url` without the password of its user information, and the password (percent-decoded) if it had one.
fn split_password(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_owned(), None);
    };
    match userinfo.split_once(':') {
        Some((user, password)) => (
            format!("{scheme}://{user}@{host}{tail}"),
            Some(percent_decode(password)),
        ),
        None => (url.to_owned(), None),
    }
}

/// Decodes `%XX` escapes; anything else is kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_leave_the_url_for_the_environment() {
        assert_eq!(
            split_password("postgres://hub:s3cr%40t@db.example:5432/fedgate?sslmode=require"),
            (
                "postgres://hub@db.example:5432/fedgate?sslmode=require".to_owned(),
                Some("s3cr@t".to_owned())
            )
        );
        assert_eq!(
            split_password("postgres://hub@db.example/fedgate"),
            ("postgres://hub@db.example/fedgate".to_owned(), None)
        );
        assert_eq!(
            split_password("postgresql:///fedgate"),
            ("postgresql:///fedgate".to_owned(), None)
        );
        assert_eq!(percent_decode("a%2fb%zz%4"), "a/b%zz%4");
    }
}
