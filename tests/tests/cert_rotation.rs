//! Certificates changed while nodes run, over real nodes and real TLS: a node's certificate rotated (by the
//! file watch in process, by SIGHUP for a node process) under live traffic that sees no failed call; a broken
//! file that leaves the old certificate in use; a CA bundle rotation; a serial revoked at run time (new
//! handshakes refused, open connections and streams closed); one more certificate issued by
//! `fedgate certs --ca-existing` that joins the federation; the expiry gauge.

use std::time::Duration;

use anyhow::{Context, Result};
use fedgate_gateway::config::NodeConfig;
use fedgate_gateway::ident::Peer;
use fedgate_gateway::pki::DevCa;
use fedgate_proto::v1::{AuditOperation, SearchCatalogRequest};
use fedgate_tests::certs::{Traffic, presented_serial, replace_file, replace_pair, serial_of};
use fedgate_tests::process::ProcessFederation;
use fedgate_tests::{Devnet, code, eventually, key_at, own_audit_records, query, standard};

const DEADLINE: Duration = Duration::from_secs(30);

fn node(c: &str) -> Peer {
    Peer::Node(code(c))
}

/// Shares from the consumer at 350103 of 350102's household data (350103 → 350100 → 350102) and searches of
/// the whole province from 350103 (asked up through 350100), one after the other until stopped.
async fn traffic_across_350100(net: &Devnet) -> Result<Traffic> {
    let client = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let key = key_at(net, "350102", 0)?;
    Ok(Traffic::start(move || {
        let mut c = client.clone();
        let key = key.clone();
        async move {
            let share = c
                .share(query("350102:household", &key, &["name"]))
                .await
                .context("share")?
                .into_inner();
            anyhow::ensure!(share.records.len() == 1, "share answered {share:?}");
            let found = c
                .search_catalog(SearchCatalogRequest {
                    node_code: "350000".into(),
                    page_size: 50,
                    ..Default::default()
                })
                .await
                .context("search")?
                .into_inner();
            anyhow::ensure!(found.entries.len() >= 6, "search found {found:?}");
            Ok(())
        }
    }))
}

/// The serial `of` presents to a client holding a fresh certificate of `client`.
async fn serial_presented_by(net: &Devnet, ca_pem: &str, of: &str, client: &str) -> Result<String> {
    let cert = net.ca().issue(&node(client), &[])?;
    presented_serial(
        [127, 0, 0, 1],
        net.node(code(of))?.addr(),
        ca_pem,
        &node(of),
        &cert,
    )
    .await
}

/// Reload outcomes counted by `at`.
fn reloads(net: &Devnet, at: &str, outcome: &'static str) -> Result<u64> {
    Ok(net
        .node(code(at))?
        .metrics()
        .certificates
        .reloads
        .get_or_create(&[("outcome", outcome)])
        .get())
}

/// Writes `at`'s configuration to a file it then follows, and changes it there as an operator would (its
/// `[tls]` and `[trust]` are reloaded on change).
fn change_config_file(net: &Devnet, at: &str, change: impl FnOnce(&mut NodeConfig)) -> Result<()> {
    let mut config = net.node_config(code(at))?.clone();
    let path = net.dir().join(format!("node-{at}.toml"));
    replace_file(&path, &toml::to_string(&config)?)?;
    net.node(code(at))?.certificates().watch_config_file(&path);
    change(&mut config);
    replace_file(&path, &toml::to_string(&config)?)
}

#[tokio::test]
async fn a_rotated_certificate_is_taken_up_by_the_file_watch_while_traffic_flows() -> Result<()> {
    let net = standard().await?;
    let ca_pem = net.ca().ca_pem();
    let rotated = net.node_config(code("350100"))?.clone();
    let old = fedgate_gateway::pki::IssuedCert {
        cert_pem: std::fs::read_to_string(&rotated.tls.cert)?,
        key_pem: std::fs::read_to_string(&rotated.tls.key)?,
    };
    let old_serial = serial_of(&old.cert_pem)?;
    assert_eq!(
        serial_presented_by(&net, &ca_pem, "350100", "350102").await?,
        old_serial
    );

    let traffic = traffic_across_350100(&net).await?;
    traffic.wait_more(5, DEADLINE).await?;

    // A broken certificate file: the reload fails and the node keeps serving with the old one.
    replace_file(
        &rotated.tls.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )?;
    eventually("the failed reload is counted", DEADLINE, || async {
        Ok(reloads(&net, "350100", "failed")? >= 1)
    })
    .await?;
    traffic.wait_more(5, DEADLINE).await?;
    assert_eq!(
        serial_presented_by(&net, &ca_pem, "350100", "350102").await?,
        old_serial
    );
    assert_eq!(
        net.node(code("350100"))?
            .certificates()
            .certificate()
            .serial,
        old_serial
    );

    // A certificate of another node is refused too.
    let foreign = net.ca().issue(&node("350200"), &[])?;
    let failed = reloads(&net, "350100", "failed")?;
    replace_pair(&rotated.tls.cert, &rotated.tls.key, &foreign)?;
    eventually("the foreign certificate is refused", DEADLINE, || async {
        Ok(reloads(&net, "350100", "failed")? > failed)
    })
    .await?;
    let err = net
        .node(code("350100"))?
        .certificates()
        .reload()
        .expect_err("a certificate of 350200 is not 350100's");
    assert_eq!(err.key, "tls.cert");
    assert!(err.reason.contains("350200"), "{err}");

    // The new certificate from the same CA, written over the files.
    let new = net.ca().issue(&node("350100"), &[])?;
    let new_serial = serial_of(&new.cert_pem)?;
    replace_pair(&rotated.tls.cert, &rotated.tls.key, &new)?;
    eventually("the new certificate is in use", DEADLINE, || async {
        Ok(net
            .node(code("350100"))?
            .certificates()
            .certificate()
            .serial
            == new_serial)
    })
    .await?;
    traffic.wait_more(20, DEADLINE).await?;
    assert_eq!(
        serial_presented_by(&net, &ca_pem, "350100", "350102").await?,
        new_serial
    );

    // Its outgoing connections present the new certificate: with the old one revoked at the child, the
    // traffic through 350100 still flows, and the old certificate's handshake is refused there.
    change_config_file(&net, "350102", |c| {
        c.trust.revoked_serials = vec![old_serial.clone()]
    })?;
    eventually("the child took up the revoked serial", DEADLINE, || async {
        Ok(reloads(&net, "350102", "ok")? >= 1)
    })
    .await?;
    traffic.wait_more(20, DEADLINE).await?;
    let (ok, failures) = traffic.stop().await?;
    assert!(
        failures.is_empty(),
        "{} of {} calls failed: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
    let child_addr = net.node(code("350102"))?.addr();
    let refused =
        presented_serial([127, 0, 0, 31], child_addr, &ca_pem, &node("350102"), &old).await;
    assert!(refused.is_err(), "the revoked certificate still got in");
    eventually("the refusal is audited", DEADLINE, || async {
        Ok(own_audit_records(&net, "350102").await?.iter().any(|r| {
            r.operation == AuditOperation::TlsRefused as i32
                && r.actor == "tcp:127.0.0.31"
                && r.detail.contains(&format!("{old_serial} is revoked"))
        }))
    })
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn a_serial_revoked_at_run_time_refuses_that_peers_next_handshake_and_it_is_audited()
-> Result<()> {
    let net = standard().await?;
    let ca_pem = net.ca().ca_pem();
    // An operator certificate of 350102's own identity, accepted at first.
    let peer_cert = net.ca().issue(&node("350102"), &[])?;
    let serial = serial_of(&peer_cert.cert_pem)?;
    let addr = net.node(code("350100"))?.addr();
    presented_serial([127, 0, 0, 23], addr, &ca_pem, &node("350100"), &peer_cert).await?;

    change_config_file(&net, "350100", |c| {
        c.trust.revoked_serials = vec![serial.clone()]
    })?;
    eventually("the revoked serial is taken up", DEADLINE, || async {
        Ok(reloads(&net, "350100", "ok")? >= 1)
    })
    .await?;
    let refused =
        presented_serial([127, 0, 0, 23], addr, &ca_pem, &node("350100"), &peer_cert).await;
    assert!(refused.is_err(), "the revoked certificate still got in");
    eventually("the refusal is audited", DEADLINE, || async {
        Ok(own_audit_records(&net, "350100").await?.iter().any(|r| {
            r.operation == AuditOperation::TlsRefused as i32
                && r.actor == "tcp:127.0.0.23"
                && r.detail.contains(&format!("{serial} is revoked"))
        }))
    })
    .await?;
    // The node's own traffic is not affected: the real 350102 holds another certificate.
    let key = key_at(&net, "350102", 0)?;
    net.client(&net.consumer_at(code("350103"))?.uscc)
        .await?
        .share(query("350102:household", &key, &["name"]))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_serial_revoked_at_run_time_closes_that_peers_open_connection_and_stream_and_it_is_audited()
-> Result<()> {
    use fedgate_proto::v1::WatchNoticesRequest;
    use fedgate_proto::v1::agency_client::AgencyClient;
    let net = standard().await?;
    let county = code("350103");
    let uscc = net.consumer_at(county)?.uscc.clone();
    // A second certificate of the county's consumer, with a connection open and a notice stream following.
    let cert = net.ca().issue_agency(&uscc, county, &[])?;
    let serial = serial_of(&cert.cert_pem)?;
    let mut agency = AgencyClient::new(fedgate_tests::channel_to(&net, "350103", &cert)?);
    agency
        .search_catalog(SearchCatalogRequest {
            node_code: "350103".into(),
            page_size: 10,
            ..Default::default()
        })
        .await?;
    let mut notices = agency
        .watch_notices(WatchNoticesRequest { after_seq: 0 })
        .await?
        .into_inner();
    while let Ok(next) = tokio::time::timeout(Duration::from_millis(300), notices.message()).await {
        anyhow::ensure!(
            next?.is_some(),
            "the notice stream ended before the revocation"
        );
    }

    change_config_file(&net, "350103", |c| {
        c.trust.revoked_serials = vec![serial.clone()]
    })?;
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match notices.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .context("the open stream was closed after the revocation")?;
    assert!(ended.is_err(), "the stream was cut, not ended as complete");
    // Calls that follow fail: the connection is gone and each new handshake is refused.
    for _ in 0..3 {
        agency
            .search_catalog(SearchCatalogRequest {
                node_code: "350103".into(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .expect_err("the revoked certificate gets no further call");
    }
    eventually("the closing is audited", DEADLINE, || async {
        Ok(own_audit_records(&net, "350103").await?.iter().any(|r| {
            r.operation == AuditOperation::TlsRefused as i32
                && r.actor == Peer::Agency(uscc.clone()).to_uri()
                && r.consumer_uscc == uscc.as_str()
                && r.detail.contains("closed the open connection")
                && r.detail.contains(&format!("{serial} is revoked"))
        }))
    })
    .await?;
    // The consumer's own certificate is another: its calls go on.
    let key = key_at(&net, "350102", 0)?;
    net.client(&uscc)
        .await?
        .share(query("350102:household", &key, &["name"]))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_ca_bundle_rotation_adds_the_new_ca_then_moves_a_node_to_it() -> Result<()> {
    let net = standard().await?;
    let traffic = traffic_across_350100(&net).await?;
    traffic.wait_more(5, DEADLINE).await?;
    let next_ca = DevCa::generate("fedgate next root")?;
    let county = net.node_config(code("350102"))?.clone();
    let moved = next_ca.issue(&node("350102"), &[])?;

    // Before the bundle holds the new CA, a certificate it issued is refused: the node keeps the old one.
    replace_pair(&county.tls.cert, &county.tls.key, &moved)?;
    eventually(
        "the certificate of an unknown CA is refused",
        DEADLINE,
        || async { Ok(reloads(&net, "350102", "failed")? >= 1) },
    )
    .await?;
    let err = net
        .node(code("350102"))?
        .certificates()
        .reload()
        .expect_err("not under the bundle");
    assert_eq!(err.key, "tls.cert", "{err}");

    // Every node trusts both CAs (one shared bundle file here, as one secret would be).
    let bundle = format!("{}{}", net.ca().ca_pem(), next_ca.ca_pem());
    replace_file(&net.ca_path(), &bundle)?;
    for at in net.node_codes() {
        let at = at.to_string();
        eventually("every node took up the bundle", DEADLINE, || async {
            Ok(reloads(&net, &at, "ok")? >= 1)
        })
        .await?;
    }
    // 350102 now runs on the new CA's certificate (its files already held it); the rest on the old CA's.
    assert_eq!(
        net.node(code("350102"))?
            .certificates()
            .certificate()
            .serial,
        serial_of(&moved.cert_pem)?
    );
    traffic.wait_more(20, DEADLINE).await?;
    let client = net.ca().issue(&node("350100"), &[])?;
    assert_eq!(
        presented_serial(
            [127, 0, 0, 1],
            net.node(code("350102"))?.addr(),
            &bundle,
            &node("350102"),
            &client
        )
        .await?,
        serial_of(&moved.cert_pem)?
    );
    let (ok, failures) = traffic.stop().await?;
    assert!(
        failures.is_empty(),
        "{} of {} calls failed: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
    net.shutdown().await
}

#[tokio::test]
async fn the_expiry_gauge_counts_the_seconds_left_on_the_node_certificate() -> Result<()> {
    let net = standard().await?;
    let pem = std::fs::read_to_string(&net.node_config(code("350000"))?.tls.cert)?;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())?;
    let not_after = fedgate_gateway::tls::trust::certificate_info(&der)?.not_after;
    let gauge = net
        .node(code("350000"))?
        .metrics()
        .certificates
        .expiry_seconds
        .get_or_create(&[("kind", "node")])
        .get();
    let expected = not_after - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (expected - gauge).abs() <= 120,
        "gauge {gauge}, certificate expires in {expected} s"
    );
    let text = net.node(code("350000"))?.metrics().encode()?;
    assert!(
        text.contains("fedgate_certificate_expiry_seconds{kind=\"node\"} "),
        "{text}"
    );
    Ok(())
}

use rustls::pki_types::pem::PemObject;

#[tokio::test]
async fn a_node_process_rotates_its_certificate_on_sighup_under_live_traffic() -> Result<()> {
    let fed = ProcessFederation::start(fedgate_tests::standard_topology()?, &[]).await?;
    let ca_pem = fed.ca().ca_pem();
    let config = fed.node_config(code("350100"))?.clone();
    let addr: std::net::SocketAddr = config.listen.parse()?;
    let client_cert = fed.ca().issue(&node("350102"), &[])?;
    let old_serial = serial_of(&std::fs::read_to_string(&config.tls.cert)?)?;

    let consumer = fed.consumer_at(code("350103"))?.uscc.clone();
    let client = fed.client(&consumer).await?;
    let key = fed.key_at(code("350102"), 0)?;
    let traffic = Traffic::start(move || {
        let mut c = client.clone();
        let key = key.clone();
        async move {
            c.share(query("350102:household", &key, &["name"]))
                .await
                .context("share")?;
            Ok(())
        }
    });
    traffic.wait_more(5, DEADLINE).await?;

    // A broken key file and SIGHUP: the node keeps serving with the old certificate.
    let good_key = std::fs::read_to_string(&config.tls.key)?;
    replace_file(
        &config.tls.key,
        "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
    )?;
    fed.hangup(code("350100")).await?;
    eventually("the failed reload is logged", DEADLINE, || async {
        let logs = fed.log_files(code("350100"));
        Ok(logs.iter().any(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .contains("certificate reload failed")
        }))
    })
    .await?;
    assert!(fed.is_running(code("350100")));
    traffic.wait_more(5, DEADLINE).await?;
    assert_eq!(
        presented_serial([127, 0, 0, 1], addr, &ca_pem, &node("350100"), &client_cert).await?,
        old_serial
    );
    replace_file(&config.tls.key, &good_key)?;

    // The new certificate from the same CA over the files, then SIGHUP.
    let new = fed.ca().issue(&node("350100"), &[])?;
    let new_serial = serial_of(&new.cert_pem)?;
    replace_pair(&config.tls.cert, &config.tls.key, &new)?;
    fed.hangup(code("350100")).await?;
    eventually(
        "new handshakes present the new serial",
        DEADLINE,
        || async {
            Ok(
                presented_serial([127, 0, 0, 1], addr, &ca_pem, &node("350100"), &client_cert)
                    .await?
                    == new_serial,
            )
        },
    )
    .await?;
    traffic.wait_more(20, DEADLINE).await?;
    let (ok, failures) = traffic.stop().await?;
    assert!(
        failures.is_empty(),
        "{} of {} calls failed: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
    fed.shutdown().await
}

#[tokio::test]
async fn fedgate_certs_issues_one_more_certificate_from_the_existing_ca_and_it_joins() -> Result<()>
{
    let mut fed = ProcessFederation::start(fedgate_tests::standard_topology()?, &[]).await?;
    let pki = fed.dir().join("pki");
    std::fs::write(pki.join("ca.key"), fed.ca().ca_key_pem())?;
    let ca_before = std::fs::read(pki.join("ca.crt"))?;
    let out = pki.to_string_lossy().into_owned();

    // Without --ca-existing the CA in the directory is never replaced.
    fed.fedgate(["certs", "--out", &out, "--node", "350103"])
        .await?
        .expect_code(78)?;
    // A bad division code and a bad USCC check character are refused with their reason.
    let bad = fed
        .fedgate(["certs", "--out", &out, "--ca-existing", "--node", "350001"])
        .await?;
    bad.expect_code(78)?;
    let valid = fed.consumer_at(code("350103"))?.uscc.to_string();
    let last = valid.chars().last().unwrap_or('0');
    let wrong = if last == '0' { '1' } else { '0' };
    let bad_uscc = format!("{}{wrong}", &valid[..17]);
    let bad = fed
        .fedgate([
            "certs",
            "--out",
            &out,
            "--ca-existing",
            "--agency",
            &bad_uscc,
        ])
        .await?;
    bad.expect_code(78)?;
    assert_eq!(std::fs::read(pki.join("ca.crt"))?, ca_before);

    // 350103 gets a new certificate from the existing CA and starts on it.
    fed.terminate(code("350103")).await?;
    let old = std::fs::read_to_string(pki.join("node-350103.crt"))?;
    fed.fedgate(["certs", "--out", &out, "--ca-existing", "--node", "350103"])
        .await?
        .expect_success()?;
    assert_eq!(std::fs::read(pki.join("ca.crt"))?, ca_before);
    let issued = std::fs::read_to_string(pki.join("node-350103.crt"))?;
    assert_ne!(serial_of(&issued)?, serial_of(&old)?);
    fed.start_node(code("350103")).await?;
    let consumer = fed.consumer_at(code("350103"))?.uscc.clone();
    let key = fed.key_at(code("350102"), 0)?;
    let mut client = fed.client(&consumer).await?;
    client
        .share(query("350102:household", &key, &["name"]))
        .await?;
    let addr: std::net::SocketAddr = fed.node_config(code("350103"))?.listen.parse()?;
    let cert = fed.ca().issue(&node("350100"), &[])?;
    assert_eq!(
        presented_serial(
            [127, 0, 0, 1],
            addr,
            &fed.ca().ca_pem(),
            &node("350103"),
            &cert
        )
        .await?,
        serial_of(&issued)?
    );
    fed.shutdown().await
}

#[tokio::test]
async fn the_expiry_warning_names_a_certs_command_that_renews_the_certificate() -> Result<()> {
    let fed = ProcessFederation::start_configured(
        vec![fedgate_node::devnet::NodeSpec::new("350000")?],
        &[],
        &|c: &mut NodeConfig| c.trust.cert_expiry_warning_days = 100_000,
    )
    .await?;
    let pki = fed.dir().join("pki");
    std::fs::write(pki.join("ca.key"), fed.ca().ca_key_pem())?;
    let log = || -> String {
        fed.log_files(code("350000"))
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap_or_default())
            .collect()
    };
    eventually("the expiry warning is logged", DEADLINE, || async {
        Ok(log().contains("certificate expires soon"))
    })
    .await?;
    let text = log();
    let line = text
        .lines()
        .find(|l| l.contains("certificate expires soon"))
        .context("warning line")?;
    let command = line
        .split('`')
        .nth(1)
        .with_context(|| format!("no command in {line:?}"))?;
    assert_eq!(
        command,
        format!(
            "fedgate certs --ca-existing --out {} --node 350000",
            pki.display()
        ),
        "{line}"
    );
    let cert = &fed.node_config(code("350000"))?.tls.cert;
    let old = serial_of(&std::fs::read_to_string(cert)?)?;
    // Run as written, by a shell, with `fedgate` being the binary under test.
    let bin = fedgate_tests::process::fedgate_binary().await?;
    let run = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command.replacen("fedgate", &bin.display().to_string(), 1))
        .output()
        .await?;
    assert!(
        run.status.success(),
        "{command}: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let new = serial_of(&std::fs::read_to_string(cert)?)?;
    assert_ne!(
        new, old,
        "the command wrote a new certificate over the one in use"
    );
    eventually("the node reloads the new certificate", DEADLINE, || async {
        Ok(log().contains("certificates reloaded"))
    })
    .await?;
    fed.shutdown().await
}
