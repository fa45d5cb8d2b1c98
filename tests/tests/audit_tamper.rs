//! Tamper evidence: an edited, deleted or reordered audit record is found and named, by the library and by
//! `fedgate audit verify`; agencies read only the records that concern them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use fedgate_gateway::audit::{StoreVerifyError, VerifyError, verify_store};
use fedgate_gateway::store::SqliteStore;
use fedgate_proto::v1::{AuditRecord, QueryAuditRequest};
use fedgate_tests::{Devnet, code, key_at, query, standard};
use prost::Message;
use sqlx::{Connection, Row, SqliteConnection};

/// Runs a few shares so every node has records, then stops the federation keeping its files.
async fn federation_with_records() -> Result<Devnet> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    for consumer in ["350102", "350103", "350203"] {
        let mut c = net.client(&net.consumer_at(code(consumer))?.uscc).await?;
        c.share(query("350102:household", &key, &["name"])).await?;
        let _ = c.share(query("350102:marriage", &key, &[])).await;
    }
    // Wait until the province holds the county's whole chain.
    let county_head = net
        .node(code("350102"))?
        .store()
        .audit_head("350102")
        .await?
        .map(|r| r.seq);
    fedgate_tests::eventually(
        "the county's records reach the province",
        std::time::Duration::from_secs(20),
        || async {
            Ok(net
                .node(code("350000"))?
                .store()
                .audit_head("350102")
                .await?
                .map(|r| r.seq)
                == county_head)
        },
    )
    .await?;
    Ok(net)
}

async fn verify(db: &Path) -> Result<Result<(), VerifyError>> {
    let store = SqliteStore::open_read_only(db).await?;
    let r = verify_store(&store, &HashMap::new(), &HashMap::new()).await;
    store.close().await;
    match r {
        Ok(_) => Ok(Ok(())),
        Err(StoreVerifyError::Chain(e)) => Ok(Err(e)),
        Err(e) => Err(e.into()),
    }
}

fn copy_db(from: &Path, to: &Path) -> Result<PathBuf> {
    std::fs::copy(from, to)?;
    Ok(to.to_owned())
}

async fn open_rw(db: &Path) -> Result<SqliteConnection> {
    Ok(SqliteConnection::connect(&format!("sqlite://{}", db.display())).await?)
}

async fn record(conn: &mut SqliteConnection, node: &str, seq: i64) -> Result<AuditRecord> {
    let row = sqlx::query("SELECT record FROM audit_log WHERE node_code = ? AND seq = ?")
        .bind(node)
        .bind(seq)
        .fetch_one(&mut *conn)
        .await?;
    Ok(AuditRecord::decode(row.get::<&[u8], _>(0))?)
}

#[tokio::test]
async fn edited_deleted_and_reordered_records_are_named() -> Result<()> {
    let net = federation_with_records().await?;
    let dir = net.shutdown_keep().await?;
    let county = dir.path().join("node-350102.db");
    let province = dir.path().join("node-350000.db");
    assert_eq!(verify(&county).await?, Ok(()));
    assert_eq!(
        verify(&province).await?,
        Ok(()),
        "the province holds every chain intact"
    );

    // (a) An edited record.
    let edited = copy_db(&county, &dir.path().join("edited.db"))?;
    let mut conn = open_rw(&edited).await?;
    let mut r = record(&mut conn, "350102", 3).await?;
    r.outcome = "PERMISSION_DENIED".into();
    sqlx::query("UPDATE audit_log SET record = ? WHERE node_code = '350102' AND seq = 3")
        .bind(r.encode_to_vec())
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    assert_eq!(
        verify(&edited).await?,
        Err(VerifyError::Altered {
            node: "350102".into(),
            seq: 3
        })
    );

    // (a') An edit that also recomputes the record's hash still breaks the link to the next record.
    let rehashed = copy_db(&county, &dir.path().join("rehashed.db"))?;
    let mut conn = open_rw(&rehashed).await?;
    let mut r = record(&mut conn, "350102", 3).await?;
    r.resource_id = "350102:forged".into();
    r.hash = fedgate_gateway::audit::record_hash(&r).to_vec();
    sqlx::query("UPDATE audit_log SET record = ? WHERE node_code = '350102' AND seq = 3")
        .bind(r.encode_to_vec())
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let err = verify(&rehashed).await?.expect_err("rehashed edit");
    assert!(
        matches!(
            err,
            VerifyError::BrokenLink { seq: 4, .. } | VerifyError::BadSignature { seq: 3, .. }
        ),
        "{err}"
    );

    // (b) A deleted record.
    let deleted = copy_db(&county, &dir.path().join("deleted.db"))?;
    let mut conn = open_rw(&deleted).await?;
    sqlx::query("DELETE FROM audit_log WHERE node_code = '350102' AND seq = 3")
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    assert_eq!(
        verify(&deleted).await?,
        Err(VerifyError::Sequence {
            node: "350102".into(),
            expected: 3,
            found: 4
        })
    );

    // (c) Two records swapped.
    let swapped = copy_db(&county, &dir.path().join("swapped.db"))?;
    let mut conn = open_rw(&swapped).await?;
    for sql in [
        "UPDATE audit_log SET seq = -1 WHERE node_code = '350102' AND seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE node_code = '350102' AND seq = 4",
        "UPDATE audit_log SET seq = 4 WHERE node_code = '350102' AND seq = -1",
    ] {
        sqlx::query(sql).execute(&mut conn).await?;
    }
    conn.close().await?;
    assert_eq!(
        verify(&swapped).await?,
        Err(VerifyError::Sequence {
            node: "350102".into(),
            expected: 3,
            found: 4
        })
    );

    // The operator's command names the first bad record and fails.
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "run",
            "-q",
            "-p",
            "fedgate-node",
            "--",
            "audit",
            "verify",
            "--db",
        ])
        .arg(&edited)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("FAILED: record 350102#3 was altered"),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "run",
            "-q",
            "-p",
            "fedgate-node",
            "--",
            "audit",
            "verify",
            "--db",
        ])
        .arg(&province)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An export verifies, and a tampered line in it is named.
    let export = dir.path().join("county.jsonl");
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "run",
            "-q",
            "-p",
            "fedgate-node",
            "--",
            "audit",
            "export",
            "--db",
        ])
        .arg(&county)
        .arg("--out")
        .arg(&export)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&export)?;
    let records = fedgate_gateway::audit::export::read_jsonl(text.as_bytes())?;
    assert!(
        fedgate_gateway::audit::verify_records(&records, &HashMap::new(), &HashMap::new(), false)
            .is_ok()
    );
    let tampered: String = text.replacen("\"outcome\":\"OK\"", "\"outcome\":\"NOT_FOUND\"", 2);
    let records = fedgate_gateway::audit::export::read_jsonl(tampered.as_bytes())?;
    let err =
        fedgate_gateway::audit::verify_records(&records, &HashMap::new(), &HashMap::new(), false)
            .expect_err("tampered export");
    assert!(matches!(err, VerifyError::Altered { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn agencies_read_only_the_records_that_concern_them() -> Result<()> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let siming = net.consumer_at(code("350203"))?;
    let mut a = net.client(&siming.uscc).await?;
    let mut req = query("350102:household", &key, &["name"]);
    req.request_id = "siming-1".into();
    a.share(req).await?;
    let _ = a.share(query("350102:marriage", &key, &[])).await;

    let mine = a
        .query_audit(QueryAuditRequest::default())
        .await?
        .into_inner()
        .records;
    assert!(!mine.is_empty());
    assert!(mine.iter().any(|r| r.request_id == "siming-1"));
    let me = siming.uscc.to_string();
    assert!(
        mine.iter()
            .all(|r| r.consumer_uscc == me || r.provider_uscc == me)
    );
    let refused = a
        .query_audit(QueryAuditRequest {
            outcome: "FAILED_PRECONDITION".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .records;
    assert!(!refused.is_empty());
    assert!(refused.iter().all(|r| r.outcome == "FAILED_PRECONDITION"));

    // An unrelated agency sees nothing of it, at its own node or at the provider's.
    let mut b = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let theirs = b
        .query_audit(QueryAuditRequest::default())
        .await?
        .into_inner()
        .records;
    assert!(theirs.iter().all(|r| r.request_id != "siming-1"));
    let mut gulou_consumer = net.client(&net.consumer_at(code("350102"))?.uscc).await?;
    let at_provider_node = gulou_consumer
        .query_audit(QueryAuditRequest::default())
        .await?
        .into_inner()
        .records;
    assert!(at_provider_node.iter().all(|r| r.request_id != "siming-1"));

    // The provider sees the share it served, filtered by counterpart.
    let provider = net.provider_at(code("350102"))?;
    let mut p = net.client(&provider.uscc).await?;
    let served = p
        .query_audit(QueryAuditRequest {
            counterpart_uscc: me.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .records;
    assert!(
        served
            .iter()
            .any(|r| r.request_id == "siming-1" && r.node_code == "350102")
    );
    assert!(served.iter().all(|r| r.consumer_uscc == me));
    net.shutdown().await
}

#[tokio::test]
async fn archived_records_leave_the_store_and_still_verify() -> Result<()> {
    let net = federation_with_records().await?;
    let dir = net.shutdown_keep().await?;
    let config = dir.path().join("node-350102.toml");
    let db = dir.path().join("node-350102.db");
    let archive = dir.path().join("350102-archive.jsonl");
    let held_before = {
        let s = SqliteStore::open_read_only(&db).await?;
        let n = fedgate_gateway::store::Store::audit_count(&s).await?;
        s.close().await;
        n
    };
    let four_years_on = (time::OffsetDateTime::now_utc() + time::Duration::days(4 * 366))
        .format(&time::format_description::well_known::Rfc3339)?;
    let fedgate = |args: &[&std::ffi::OsStr]| -> Result<std::process::Output> {
        Ok(std::process::Command::new(env!("CARGO"))
            .args(["run", "-q", "-p", "fedgate-node", "--"])
            .args(args)
            .output()?)
    };
    // Nothing is old enough today.
    let out = fedgate(&[
        "audit".as_ref(),
        "archive".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--out".as_ref(),
        archive.as_os_str(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0 records archived"));

    let out = fedgate(&[
        "audit".as_ref(),
        "archive".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--out".as_ref(),
        archive.as_os_str(),
        "--now".as_ref(),
        four_years_on.as_ref(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archived = fedgate_gateway::audit::export::read_jsonl(std::fs::read(&archive)?.as_slice())?;
    assert!(!archived.is_empty());
    let held_after = {
        let s = SqliteStore::open_read_only(&db).await?;
        let n = fedgate_gateway::store::Store::audit_count(&s).await?;
        s.close().await;
        n
    };
    assert_eq!(
        held_after + archived.len() as u64,
        held_before,
        "moved, not copied or lost"
    );
    assert!(held_after >= 1, "the chain head stays in the store");

    // Running the archiver again moves nothing twice.
    let out = fedgate(&[
        "audit".as_ref(),
        "archive".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--out".as_ref(),
        archive.as_os_str(),
        "--now".as_ref(),
        four_years_on.as_ref(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0 records archived"));
    let again = fedgate_gateway::audit::export::read_jsonl(std::fs::read(&archive)?.as_slice())?;
    assert_eq!(again.len(), archived.len());

    // The store alone no longer starts at record 1; with the archive the chain verifies end to end.
    assert!(matches!(
        verify(&db).await?,
        Err(VerifyError::Sequence { expected: 1, .. })
    ));
    let out = fedgate(&[
        "audit".as_ref(),
        "verify".as_ref(),
        "--db".as_ref(),
        db.as_os_str(),
        "--archive".as_ref(),
        archive.as_os_str(),
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("OK:"), "{text}");
    Ok(())
}
