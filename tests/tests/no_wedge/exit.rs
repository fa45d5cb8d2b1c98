//! The exit status of `fedgate node` tells a configuration error from an unavailable resource.

use std::time::Duration;

use anyhow::{Context, Result};
use fedgate_gateway::ident::Peer;
use fedgate_tests::process::fedgate_binary;
use fedgate_tests::{code, init};

use super::WAIT;

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
