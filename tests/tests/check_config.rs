//! `fedgate check-config` (the real binary) on good and broken files: each problem is named by its key, all
//! of them in one run, exit status 0 when the file is fine and 78 when it is not.

use std::path::{Path, PathBuf};

use anyhow::Result;
use fedgate_gateway::ident::Peer;
use fedgate_gateway::pki::{DevCa, write_pem_files};
use fedgate_node::devnet::agency_code;
use fedgate_tests::code;
use fedgate_tests::process::fedgate_binary;

/// A scratch directory with a CA and the certificates of nodes 350100 and 350200.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = DevCa::generate("check-config test root")?;
        std::fs::write(dir.path().join("ca.crt"), ca.ca_pem())?;
        for node in ["350100", "350200"] {
            let cert = ca.issue(&Peer::Node(code(node)), &[])?;
            write_pem_files(dir.path(), &format!("node-{node}"), &cert)?;
        }
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A valid configuration of node 350100 with its files in the scratch directory.
    fn good(&self) -> Result<String> {
        let p = |n: &str| self.path(n).display().to_string();
        Ok(format!(
            r#"code = "350100"
listen = "127.0.0.1:0"
signing_key = "{key}"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{tlskey}"

[storage]
kind = "sqlite"
path = "{db}"

[parent]
code = "350000"
address = "https://127.0.0.1:7401"

[[children]]
code = "350102"
address = "https://127.0.0.1:7410"

[[agencies]]
uscc = "{uscc}"
name = "Civil affairs"
provider = "https://127.0.0.1:7420"

[metrics]
listen = "127.0.0.1:0"
"#,
            key = p("node.key"),
            ca = p("ca.crt"),
            cert = p("node-350100.crt"),
            tlskey = p("node-350100.key"),
            db = p("data/node.db"),
            uscc = agency_code(code("350100"), 1)?,
        ))
    }

    /// Runs `fedgate check-config` on `text`: exit status and everything it printed.
    async fn check(&self, text: &str) -> Result<(Option<i32>, String)> {
        let file = self.path("node.toml");
        std::fs::write(&file, text)?;
        run(&file).await
    }
}

async fn run(file: &Path) -> Result<(Option<i32>, String)> {
    let out = tokio::process::Command::new(fedgate_binary().await?)
        .arg("check-config")
        .arg(file)
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code(), text))
}

#[tokio::test]
async fn a_good_file_passes() -> Result<()> {
    let s = Scratch::new()?;
    let (status, out) = s.check(&s.good()?).await?;
    assert_eq!(status, Some(0), "{out}");
    assert!(
        out.contains("the configuration of node 350100 is valid"),
        "{out}"
    );
    // Nothing was created: the check touches no storage and no key.
    assert!(!s.path("data").exists() && !s.path("node.key").exists());
    Ok(())
}

/// Replaces `from` (which must occur) by `to` in `text`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in the file");
    text.replacen(from, to, 1)
}

#[tokio::test]
async fn each_broken_key_is_named() -> Result<()> {
    let s = Scratch::new()?;
    let good = s.good()?;
    let other_cert = s.path("node-350200.crt").display().to_string();
    let own_cert = s.path("node-350100.crt").display().to_string();
    let own_key = s.path("node-350100.key").display().to_string();
    let other_key = s.path("node-350200.key").display().to_string();
    let file_as_dir = format!("{}/node.db", s.path("ca.crt").display());
    std::fs::write(s.path("garbage.key"), "not a signing key\n")?;
    let p = |n: &str| s.path(n).display().to_string();
    let signing_key = format!("signing_key = \"{}\"", p("node.key"));
    let metrics = "[metrics]\nlisten = \"127.0.0.1:0\"";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "code",
            edit(&good, r#"code = "350100""#, r#"code = "35010X""#),
            "code: ",
        ),
        (
            "listen",
            edit(
                &good,
                r#"listen = "127.0.0.1:0""#,
                r#"listen = "127.0.0.1""#,
            ),
            "listen: ",
        ),
        (
            "tls.cert of another node",
            edit(&good, &own_cert, &other_cert),
            "tls.cert: ",
        ),
        (
            "tls.key of another certificate",
            edit(&good, &own_key, &other_key),
            "tls.key: ",
        ),
        (
            "tls.ca missing",
            edit(&good, "ca.crt", "missing-ca.crt"),
            "tls.ca: cannot read",
        ),
        (
            "tls.cert not PEM",
            edit(&good, &own_cert, &s.path("node.toml").display().to_string()),
            "tls.cert: ",
        ),
        (
            "parent",
            edit(&good, r#"code = "350000""#, r#"code = "350200""#),
            "parent.code: 350200 is not the parent division of node 350100",
        ),
        (
            "child",
            edit(&good, r#"code = "350102""#, r#"code = "350201""#),
            "children[0].code: 350201 is not a child division of node 350100",
        ),
        (
            "child address",
            edit(&good, "https://127.0.0.1:7410", "127.0.0.1:7410"),
            "children[0].address: ",
        ),
        (
            "agency",
            edit(
                &good,
                &agency_code(code("350100"), 1)?.to_string(),
                "11350100000000001",
            ),
            "agencies[0].uscc: ",
        ),
        (
            "retention",
            format!("{good}\n[audit]\nretention_days = 30\n"),
            "audit.retention_days: 30 is below the legal minimum",
        ),
        (
            "limits",
            format!("{good}\n[limits]\nmax_fields = 0\n"),
            "limits.max_fields: must be at least 1",
        ),
        (
            "calendar",
            format!("{good}\n[calendar]\nmakeup_workdays = [\"2026-11-28\", \"2026-12-02\"]\n"),
            "calendar.makeup_workdays[1]: \"2026-12-02\" is a Wednesday",
        ),
        (
            "calendar holiday",
            format!(
                "{good}\n[calendar]\nholidays = [\"2026-10-01..2026-10-07\", \"2026-13-01\"]\n"
            ),
            "calendar.holidays[1]: \"2026-13-01\" is not a valid date",
        ),
        (
            "calendar setting",
            format!("{good}\n[calendar]\napproval_days = 0\n"),
            "calendar.approval_days: 0 is out of range",
        ),
        (
            "revocation list missing",
            format!("{good}\n[trust]\ncrl = \"{}\"\n", p("missing.crl")),
            "trust.crl: cannot read",
        ),
        (
            "revocation list not a CRL",
            format!("{good}\n[trust]\ncrl = \"{}\"\n", p("ca.crt")),
            "trust.crl: ",
        ),
        (
            "signing key not a key",
            edit(
                &good,
                &signing_key,
                &format!("signing_key = \"{}\"", p("garbage.key")),
            ),
            "signing_key: ",
        ),
        (
            "signing key cannot be created",
            edit(
                &good,
                &signing_key,
                &format!("signing_key = \"{}/node.key\"", p("ca.crt")),
            ),
            "signing_key: ",
        ),
        (
            "open data listen",
            format!("{good}\n[open_data]\nlisten = \"open-data\"\n"),
            "open_data.listen: ",
        ),
        (
            "console listen",
            format!("{good}\n[console]\nlisten = \"7443\"\n"),
            "console.listen: ",
        ),
        (
            "metrics listen",
            edit(&good, metrics, "[metrics]\nlisten = \"127.0.0.1:99999\""),
            "metrics.listen: ",
        ),
        (
            "listener on another's port",
            edit(
                &edit(
                    &good,
                    r#"listen = "127.0.0.1:0""#,
                    r#"listen = "127.0.0.1:7400""#,
                ),
                metrics,
                "[metrics]\nlisten = \"0.0.0.0:7400\"",
            ),
            "metrics.listen: \"0.0.0.0:7400\" takes the port of listen",
        ),
        (
            "listen host unknown",
            edit(
                &good,
                r#"listen = "127.0.0.1:0""#,
                r#"listen = "no-such-host.invalid:7400""#,
            ),
            "listen: \"no-such-host.invalid:7400\": ",
        ),
        (
            "parent address",
            edit(&good, "https://127.0.0.1:7401", "http://127.0.0.1:7401"),
            "parent.address: ",
        ),
        (
            "child at the parent's address",
            edit(&good, "https://127.0.0.1:7410", "https://127.0.0.1:7401"),
            "children[0].address: \"https://127.0.0.1:7401\" is also the address of node 350000 (parent.address)",
        ),
        (
            "duplicate child",
            format!(
                "{good}\n[[children]]\ncode = \"350102\"\naddress = \"https://127.0.0.1:7411\"\n"
            ),
            "children[1].code: 350102 is listed twice",
        ),
        (
            "revoked serial",
            format!("{good}\n[trust]\nrevoked_serials = [\"0a\", \"zz\"]\n"),
            "trust.revoked_serials[1]: ",
        ),
        (
            "storage",
            edit(
                &good,
                &s.path("data/node.db").display().to_string(),
                &file_as_dir,
            ),
            "storage.path: ",
        ),
        (
            "unknown key",
            edit(
                &good,
                "listen = \"127.0.0.1:0\"\nsigning_key",
                "listne = \"127.0.0.1:0\"\nsigning_key",
            ),
            "unknown field `listne`",
        ),
    ];
    for (what, text, named) in cases {
        let (status, out) = s.check(&text).await?;
        assert_eq!(status, Some(78), "{what}: {out}");
        assert!(out.contains(named), "{what}: expected {named:?} in\n{out}");
    }
    Ok(())
}

#[tokio::test]
async fn several_problems_are_reported_together() -> Result<()> {
    let s = Scratch::new()?;
    let good = s.good()?;
    let broken = edit(
        &edit(
            &edit(
                &good,
                &s.path("node-350100.crt").display().to_string(),
                &s.path("node-350200.crt").display().to_string(),
            ),
            r#"code = "350102""#,
            r#"code = "350201""#,
        ),
        r#"code = "350000""#,
        r#"code = "3501""#,
    );
    let broken = format!(
        "{broken}\n[[children]]\ncode = \"350102\"\naddress = \"https://127.0.0.1:7411\"\n\n[[children]]\ncode = \"350102\"\naddress = \"https://127.0.0.1:7412\"\n\n[audit]\nretention_days = 1\n"
    );
    let (status, out) = s.check(&broken).await?;
    assert_eq!(status, Some(78), "{out}");
    for named in [
        "tls.cert: ",
        "tls.key: ",
        "parent.code: ",
        "children[0].code: 350201 is not a child",
        "children[2].code: 350102 is listed twice",
        "audit.retention_days: ",
        "6 problems in ",
    ] {
        assert!(out.contains(named), "expected {named:?} in\n{out}");
    }
    Ok(())
}

#[tokio::test]
async fn a_missing_file_is_named() -> Result<()> {
    let s = Scratch::new()?;
    let (status, out) = run(&s.path("absent.toml")).await?;
    assert_eq!(status, Some(78), "{out}");
    assert!(out.contains("cannot read configuration"), "{out}");
    Ok(())
}
