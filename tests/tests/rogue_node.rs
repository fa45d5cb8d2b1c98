//! A node holding a valid node certificate that lies: it claims other nodes' agencies, replays and alters
//! assertions, forges revocations, collects other agencies' applications, routes requests the wrong way and
//! starts audit chains in other nodes' names. Each attempt is refused with its exact status and recorded
//! where it is refused; honest traffic keeps working.

use anyhow::{Result, bail};
use fedgate_gateway::ident::Peer;
use fedgate_gateway::pki::DevCa;
use fedgate_gateway::statement::NodeSigner;
use fedgate_gateway::tls::TlsMaterial;
use fedgate_proto::v1::{
    Application, ApplyRequest, AuditOperation, AuditRecord, DecideRequest, GetApplicationRequest,
    Grant, KeyEndorsement, PushRequest, RequestKind, Revocation, RevocationNotice, ShareMode,
    ShareRequest, SignedGrant, Stream, StreamItem, stream_item,
};
use fedgate_tests::rogue::{RogueNode, assert_audited, now_ms};
use fedgate_tests::{Devnet, code, key_at, query, standard};
use prost::Message;
use tonic::Code;

const PURPOSE: &str = "marriage registration check";

/// Files an application of the consumer agency at 350203 for 350102's conditional marriage records and has the
/// provider approve it; returns the consumer's code, its application and the grant.
async fn granted(net: &Devnet) -> Result<(String, Application, SignedGrant, Grant)> {
    let consumer = net.consumer_at(code("350203"))?.uscc.to_string();
    let mut a = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let mut provider = net.client(&net.provider_at(code("350102"))?.uscc).await?;
    let application = a
        .apply(ApplyRequest {
            resource_id: "350102:marriage".into(),
            purpose: PURPOSE.into(),
            scenario: "civil affairs service".into(),
            fields: vec!["name".into(), "marital_status".into()],
            mode: ShareMode::Query as i32,
            requested_expires_at: 0,
        })
        .await?
        .into_inner();
    let approved = provider
        .decide(DecideRequest {
            application_id: application.id.clone(),
            approve: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let Some(signed) = approved.grant.clone() else {
        bail!("approval carries no grant")
    };
    let grant = Grant::decode(signed.grant.as_slice())?;
    Ok((consumer, application, signed, grant))
}

fn share_under(net: &Devnet, signed: &SignedGrant) -> Result<ShareRequest> {
    let mut req = query(
        "350102:marriage",
        &key_at(net, "350102", 3)?,
        &["name", "marital_status"],
    );
    req.purpose = PURPOSE.into();
    req.grant = Some(signed.clone());
    Ok(req)
}

fn expect(err: tonic::Status, code: Code, needle: &str) -> Result<()> {
    if err.code() != code || !err.message().contains(needle) {
        bail!(
            "expected {code:?} mentioning {needle:?}, got {:?}: {}",
            err.code(),
            err.message()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_node_cannot_speak_for_another_nodes_agency_or_use_its_grant() -> Result<()> {
    let net = standard().await?;
    let (consumer, _, signed, grant) = granted(&net).await?;
    let mut honest = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    honest.share(share_under(&net, &signed)?).await?;

    // Xiamen (350200) lies about a request of Siming's agency (350203, its own child), whose certificate it
    // has seen (certificates are public).
    let rogue = RogueNode::new(&net, "350200")?
        .presenting(&net.consumer_at(code("350203"))?.cert.cert_pem)?;
    let mut province = rogue.federation(&net, "350000").await?;
    let req = share_under(&net, &signed)?;
    let envelope = |id: &str, consumer_node: &str| {
        let mut env = rogue.envelope(
            id,
            ("350102:marriage", "350102"),
            (&consumer, consumer_node),
        );
        env.grant_id = grant.id.clone();
        env.purpose = PURPOSE.into();
        env
    };

    // No assertion at all: the provider's node refuses to serve.
    let env = envelope("rogue-unsigned", "350203");
    let err = province
        .forward(RogueNode::forward(env, &req))
        .await
        .expect_err("served without an assertion");
    expect(err, Code::PermissionDenied, "carries no signed statement")?;
    assert_audited(
        &net,
        "350102",
        "PERMISSION_DENIED",
        "carries no signed statement",
    )
    .await?;

    // An assertion in its own name that claims Siming's node.
    let mut env = envelope("rogue-claims-siming", "350203");
    env.assertion = Some(rogue.assert(&env, &req.encode_to_vec(), now_ms(&net))?);
    let err = province
        .forward(RogueNode::forward(env, &req))
        .await
        .expect_err("served under an assertion for another node");
    expect(
        err,
        Code::PermissionDenied,
        "names consumer node \"350203\" but is signed by node 350200",
    )?;
    assert_audited(
        &net,
        "350102",
        "PERMISSION_DENIED",
        "is signed by node 350200",
    )
    .await?;

    // Honestly signed as itself, claiming Siming's agency is its own and presenting the grant it holds.
    let mut env = envelope("rogue-borrowed-grant", "350200");
    env.assertion = Some(rogue.assert(&env, &req.encode_to_vec(), now_ms(&net))?);
    let err = province
        .forward(RogueNode::forward(env, &req))
        .await
        .expect_err("served for an agency registered at another node");
    expect(
        err,
        Code::PermissionDenied,
        "is registered at node 350203, not at node 350200, which vouched for it",
    )?;
    assert_audited(
        &net,
        "350102",
        "PERMISSION_DENIED",
        "not at node 350200, which vouched for it",
    )
    .await?;

    // Without the agency's certificate at all.
    let bare = RogueNode::new(&net, "350200")?;
    let mut env = envelope("rogue-no-agency-certificate", "350200");
    env.assertion = Some(bare.assert(&env, &req.encode_to_vec(), now_ms(&net))?);
    let err = province
        .forward(RogueNode::forward(env, &req))
        .await
        .expect_err("served without the agency's certificate");
    expect(
        err,
        Code::PermissionDenied,
        "carries no certificate of agency",
    )?;

    // A widened grant that skipped the consumer's node check is refused by the issuer's node itself.
    let mut widened = grant.clone();
    widened.fields.push("spouse_id_number".into());
    let mut forged_req = share_under(&net, &signed)?;
    forged_req.grant = Some(SignedGrant {
        grant: widened.encode_to_vec(),
        ..signed.clone()
    });
    let siming = RogueNode::new(&net, "350203")?
        .presenting(&net.consumer_at(code("350203"))?.cert.cert_pem)?;
    let mut env = siming.envelope(
        "rogue-widened-grant",
        ("350102:marriage", "350102"),
        (&consumer, "350203"),
    );
    env.grant_id = grant.id.clone();
    env.purpose = PURPOSE.into();
    env.assertion = Some(siming.assert(&env, &forged_req.encode_to_vec(), now_ms(&net))?);
    let err = siming
        .federation(&net, "350200")
        .await?
        .forward(RogueNode::forward(env, &forged_req))
        .await
        .expect_err("a widened grant was served");
    expect(err, Code::PermissionDenied, "altered or forged")?;
    assert_audited(&net, "350102", "PERMISSION_DENIED", "altered or forged").await?;

    // The honest grantee is still served.
    honest.share(share_under(&net, &signed)?).await?;
    net.shutdown().await
}

#[tokio::test]
async fn replayed_stale_altered_and_foreign_assertions_are_refused() -> Result<()> {
    let net = standard().await?;
    let rogue = RogueNode::new(&net, "350200")?
        .presenting(&net.consumer_at(code("350200"))?.cert.cert_pem)?;
    let mut province = rogue.federation(&net, "350000").await?;
    let own = net.consumer_at(code("350200"))?.uscc.to_string();
    let key = key_at(&net, "350102", 1)?;
    let req = query("350102:household", &key, &["name"]);
    let env = |id: &str| rogue.envelope(id, ("350102:household", "350102"), (&own, "350200"));

    // A valid assertion is served once ...
    let mut signed = env("rogue-once");
    signed.purpose = req.purpose.clone();
    signed.assertion = Some(rogue.assert(&signed, &req.encode_to_vec(), now_ms(&net))?);
    province
        .forward(RogueNode::forward(signed.clone(), &req))
        .await?;
    // ... and refused when replayed.
    let err = province
        .forward(RogueNode::forward(signed.clone(), &req))
        .await
        .expect_err("replay served");
    expect(err, Code::PermissionDenied, "a replay")?;
    assert_audited(&net, "350102", "PERMISSION_DENIED", "a replay").await?;

    // Signed ten minutes ago.
    let mut stale = env("rogue-stale");
    stale.purpose = req.purpose.clone();
    stale.assertion = Some(rogue.assert(&stale, &req.encode_to_vec(), now_ms(&net) - 600_000)?);
    let err = province
        .forward(RogueNode::forward(stale, &req))
        .await
        .expect_err("stale assertion served");
    expect(err, Code::PermissionDenied, "outside the freshness window")?;
    assert_audited(&net, "350102", "PERMISSION_DENIED", "freshness window").await?;

    // Other request bytes than the ones signed.
    let mut swapped = env("rogue-swapped");
    swapped.purpose = req.purpose.clone();
    swapped.assertion = Some(rogue.assert(&swapped, &req.encode_to_vec(), now_ms(&net))?);
    let other = query("350102:household", &key_at(&net, "350102", 2)?, &["name"]);
    let err = province
        .forward(RogueNode::forward(swapped, &other))
        .await
        .expect_err("other request bytes served");
    expect(
        err,
        Code::PermissionDenied,
        "are not the ones node 350200 signed",
    )?;
    assert_audited(
        &net,
        "350102",
        "PERMISSION_DENIED",
        "not the ones node 350200 signed",
    )
    .await?;

    // An envelope altered after signing.
    let mut altered = env("rogue-altered");
    altered.purpose = req.purpose.clone();
    altered.assertion = Some(rogue.assert(&altered, &req.encode_to_vec(), now_ms(&net))?);
    altered.mode = ShareMode::Verify as i32;
    let err = province
        .forward(RogueNode::forward(altered, &req))
        .await
        .expect_err("altered envelope served");
    expect(err, Code::PermissionDenied, "envelope.mode differs")?;
    assert_audited(&net, "350102", "PERMISSION_DENIED", "envelope.mode differs").await?;

    // Signed under a certificate of another CA.
    let foreign = DevCa::generate("foreign")?;
    let cert = foreign.issue(&Peer::Node(code("350200")), &[])?;
    let outsider = NodeSigner::from_material(&TlsMaterial {
        ca_pem: foreign.ca_pem(),
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
    })?;
    let mut foreign_env = env("rogue-foreign-ca");
    foreign_env.purpose = req.purpose.clone();
    let mut assertion = rogue.assert(&foreign_env, &req.encode_to_vec(), now_ms(&net))?;
    let resigned = outsider.sign(&fedgate_proto::v1::ConsumerAssertion::decode(
        assertion.body.as_slice(),
    )?)?;
    assertion.certificate = resigned.certificate;
    assertion.signature = resigned.signature;
    foreign_env.assertion = Some(assertion);
    let err = province
        .forward(RogueNode::forward(foreign_env, &req))
        .await
        .expect_err("foreign certificate served");
    expect(
        err,
        Code::PermissionDenied,
        "not a valid federation certificate",
    )?;
    net.shutdown().await
}

#[tokio::test]
async fn only_the_issuing_node_revokes_a_grant_and_every_relay_checks() -> Result<()> {
    let net = standard().await?;
    let (_, _, signed, grant) = granted(&net).await?;
    let rogue = RogueNode::new(&net, "350200")?;
    let mut siming = rogue.federation(&net, "350203").await?;

    // A notice without a signed revocation (the old form: any issuer code, an empty signature).
    let err = siming
        .revoke(RevocationNotice {
            revocation: None,
            route: vec![
                "350102".into(),
                "350100".into(),
                "350000".into(),
                "350200".into(),
            ],
        })
        .await
        .expect_err("unsigned revocation accepted");
    expect(err, Code::PermissionDenied, "carries no signed statement")?;
    assert_audited(
        &net,
        "350203",
        "PERMISSION_DENIED",
        "Federation.Revoke: revocation notice carries no signed statement",
    )
    .await?;

    // Signed by the rogue, in the issuer's name.
    let forged = Revocation {
        grant_id: grant.id.clone(),
        issuer_node: "350102".into(),
        consumer_node: "350203".into(),
        revoked_at: now_ms(&net) / 1000,
        reason: "forged".into(),
    };
    let err = siming
        .revoke(RevocationNotice {
            revocation: Some(rogue.signer().sign(&forged)?),
            route: vec!["350102".into(), "350200".into()],
        })
        .await
        .expect_err("revocation by a node other than the issuer accepted");
    expect(
        err,
        Code::PermissionDenied,
        "was issued by node 350102; node 350200 may not revoke it",
    )?;
    assert_audited(&net, "350203", "PERMISSION_DENIED", "may not revoke it").await?;
    assert!(
        !net.node(code("350203"))?
            .governance()
            .is_revoked(&grant.id)
            .await?
    );

    // The grant still serves its grantee across the whole route.
    let mut honest = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    honest.share(share_under(&net, &signed)?).await?;
    net.shutdown().await
}

#[tokio::test]
async fn applications_are_answered_only_to_their_applicant_through_its_node() -> Result<()> {
    let net = standard().await?;
    let (consumer, application, _, _) = granted(&net).await?;
    let rogue = RogueNode::new(&net, "350200")?
        .presenting(&net.consumer_at(code("350203"))?.cert.cert_pem)?;
    let mut province = rogue.federation(&net, "350000").await?;
    let read = GetApplicationRequest {
        id: application.id.clone(),
    };

    // The rogue signs honestly as itself but claims to ask for Siming's agency.
    let mut env = rogue.envelope("rogue-collect", ("", "350102"), (&consumer, "350200"));
    env.kind = RequestKind::GetApplication as i32;
    env.mode = 0;
    env.assertion = Some(rogue.assert(&env, &read.encode_to_vec(), now_ms(&net))?);
    let err = province
        .forward(RogueNode::forward(env, &read))
        .await
        .expect_err("application answered to another node");
    expect(
        err,
        Code::PermissionDenied,
        "is registered at node 350203, not at node 350200",
    )?;
    assert_audited(&net, "350102", "PERMISSION_DENIED", "not at node 350200").await?;

    // Another agency asking through its own node is refused too.
    let mut other = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let err = other
        .get_application(read.clone())
        .await
        .expect_err("another agency read the application");
    expect(
        err,
        Code::PermissionDenied,
        "answered only to the agency that filed it, through its own node",
    )?;
    assert_audited(
        &net,
        "350102",
        "PERMISSION_DENIED",
        "answered only to the agency",
    )
    .await?;

    // The applicant and the provider read it.
    let mut applicant = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    assert_eq!(
        applicant
            .get_application(read.clone())
            .await?
            .into_inner()
            .id,
        application.id
    );
    let mut provider = net.client(&net.provider_at(code("350102"))?.uscc).await?;
    assert_eq!(
        provider.get_application(read).await?.into_inner().id,
        application.id
    );
    net.shutdown().await
}

#[tokio::test]
async fn requests_routed_the_wrong_way_are_refused_and_recorded() -> Result<()> {
    let net = standard().await?;
    let rogue = RogueNode::new(&net, "350200")?;
    let siming_agency = net.consumer_at(code("350203"))?.uscc.to_string();
    let req = query("350203:household", &key_at(&net, "350203", 1)?, &["name"]);

    // A parent may not send down a request that claims to come from inside the subtree.
    let mut down = rogue.federation(&net, "350203").await?;
    let env = rogue.envelope(
        "rogue-down",
        ("350203:household", "350203"),
        (&siming_agency, "350203"),
    );
    let err = down
        .forward(RogueNode::forward(env, &req))
        .await
        .expect_err("a request from inside the subtree sent down");
    expect(err, Code::PermissionDenied, "may only send down requests")?;
    assert_audited(
        &net,
        "350203",
        "PERMISSION_DENIED",
        "Federation.Forward: parent 350200 may only send down",
    )
    .await?;

    // A route that does not start at the consumer's node.
    let mut up = rogue.federation(&net, "350000").await?;
    let mut env = rogue.envelope(
        "rogue-route",
        ("350102:household", "350102"),
        (&siming_agency, "350203"),
    );
    env.route.remove(0);
    let err = up
        .forward(RogueNode::forward(env, &req))
        .await
        .expect_err("a route without its consumer's node");
    expect(
        err,
        Code::PermissionDenied,
        "does not start at the consumer's node",
    )?;
    assert_audited(
        &net,
        "350000",
        "PERMISSION_DENIED",
        "does not start at the consumer's node",
    )
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn a_node_cannot_start_an_audit_chain_in_another_nodes_name() -> Result<()> {
    let net = standard().await?;
    let rogue = RogueNode::new(&net, "350200")?;
    let mut province = rogue.federation(&net, "350000").await?;
    // A chain for Haicang (350205), a county no one has heard from, with a key the rogue chose and endorsed.
    let key = vec![9u8; 32];
    let mut start = AuditRecord {
        node_code: "350205".into(),
        seq: 1,
        time_unix_nanos: now_ms(&net) * 1_000_000,
        operation: AuditOperation::ChainStart as i32,
        actor: "urn:fedgate:node:350205".into(),
        detail: hex::encode(&key),
        ..Default::default()
    };
    start.key_endorsement = Some(rogue.signer().sign(&KeyEndorsement {
        node_code: "350205".into(),
        public_key: key,
        issued_at: now_ms(&net) / 1000,
    })?);
    let err = province
        .push(PushRequest {
            stream: Stream::Audit as i32,
            items: vec![StreamItem {
                seq: 1 << 40,
                body: Some(stream_item::Body::Audit(start)),
            }],
        })
        .await
        .expect_err("a chain started in another node's name");
    expect(
        err,
        Code::PermissionDenied,
        "its certificate does not endorse",
    )?;
    assert_audited(
        &net,
        "350000",
        "PERMISSION_DENIED",
        "Federation.Push: the audit chain of node 350205",
    )
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn a_push_may_not_end_a_chain_with_records_no_signature_covers() -> Result<()> {
    let net = standard().await?;
    // The province holds the chain of Xiamen (350200) up to its signed head.
    fedgate_tests::eventually(
        "the city's chain start reaches the province",
        std::time::Duration::from_secs(20),
        || async {
            Ok(net
                .node(code("350000"))?
                .store()
                .audit_head("350200")
                .await?
                .is_some())
        },
    )
    .await?;
    let head = net
        .node(code("350000"))?
        .store()
        .audit_head("350200")
        .await?
        .ok_or_else(|| anyhow::anyhow!("no head"))?;
    let rogue = RogueNode::new(&net, "350200")?;
    let mut province = rogue.federation(&net, "350000").await?;
    // The next record of the chain, correctly hashed and linked, but shipped before any signature covers it.
    let mut next = AuditRecord {
        node_code: "350200".into(),
        seq: head.seq + 1,
        time_unix_nanos: now_ms(&net) * 1_000_000,
        operation: AuditOperation::CatalogPublish as i32,
        actor: "urn:fedgate:agency:x".into(),
        outcome: "OK".into(),
        prev_hash: head.hash.clone(),
        ..Default::default()
    };
    next.hash = fedgate_gateway::audit::record_hash(&next).to_vec();
    let err = province
        .push(PushRequest {
            stream: Stream::Audit as i32,
            items: vec![StreamItem {
                seq: 1 << 40,
                body: Some(stream_item::Body::Audit(next)),
            }],
        })
        .await
        .expect_err("an unsigned chain end was accepted");
    expect(
        err,
        Code::InvalidArgument,
        &format!(
            "ends the chain of node 350200 at record {}, which no signature covers",
            head.seq + 1
        ),
    )?;
    assert_audited(
        &net,
        "350000",
        "INVALID_ARGUMENT",
        "Federation.Push: items: the push ends the chain of node 350200",
    )
    .await?;
    assert_eq!(
        net.node(code("350000"))?
            .store()
            .audit_head("350200")
            .await?
            .map(|r| r.seq),
        Some(head.seq),
        "nothing of the push was stored"
    );
    net.shutdown().await
}

/// The serial number of a PEM certificate, hex.
fn serial(cert_pem: &str) -> Result<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())?;
    let (_, x509) = x509_parser::prelude::X509Certificate::from_der(&der)?;
    Ok(hex::encode(x509.raw_serial()))
}

#[tokio::test]
async fn revoked_certificates_are_refused_at_the_handshake_and_in_statements() -> Result<()> {
    let mut net = standard().await?;
    let rogue = RogueNode::new(&net, "350200")?
        .presenting(&net.consumer_at(code("350200"))?.cert.cert_pem)?;
    let agency = net.consumer_at(code("350102"))?;
    let uscc = agency.uscc.clone();
    let revoked = vec![
        serial(&agency.cert.cert_pem)?,
        serial(rogue.certificate_pem())?,
    ];
    // The operator of Gulou (350102) lists both certificates as revoked and restarts the node.
    net.stop_node(code("350102")).await?;
    net.reconfigure_node(code("350102"), |c| c.trust.revoked_serials = revoked)?;
    net.restart_node(code("350102")).await?;

    let mut client = net.client(&uscc).await?;
    let err = client
        .search_catalog(fedgate_proto::v1::SearchCatalogRequest::default())
        .await
        .expect_err("a revoked agency certificate was accepted");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unknown),
        "{err:?}"
    );
    let node = net.node(code("350102"))?;
    fedgate_tests::eventually(
        "the refused handshake is recorded",
        std::time::Duration::from_secs(10),
        || async {
            let rows = node
                .store()
                .audit_query(&fedgate_gateway::store::AuditQuery {
                    limit: 10_000,
                    ..Default::default()
                })
                .await?;
            Ok(rows.iter().any(|(_, r)| r.detail.contains("is revoked")))
        },
    )
    .await?;

    // A statement signed with the revoked node certificate is refused where it is checked.
    let own = net.consumer_at(code("350200"))?.uscc.to_string();
    let req = query("350102:household", &key_at(&net, "350102", 1)?, &["name"]);
    let mut env = rogue.envelope(
        "revoked-signer",
        ("350102:household", "350102"),
        (&own, "350200"),
    );
    env.purpose = req.purpose.clone();
    env.assertion = Some(rogue.assert(&env, &req.encode_to_vec(), now_ms(&net))?);
    let err = rogue
        .federation(&net, "350000")
        .await?
        .forward(RogueNode::forward(env, &req))
        .await
        .expect_err("a statement of a revoked certificate was accepted");
    expect(err, Code::PermissionDenied, "is revoked")?;
    net.shutdown().await
}

#[tokio::test]
async fn an_agency_certificate_registered_at_another_node_is_refused_at_the_consumers_node()
-> Result<()> {
    let net = standard().await?;
    // Taijiang's agency, with a certificate that registers it at Gulou.
    let taijiang = net.consumer_at(code("350103"))?.uscc.clone();
    let misplaced = net.ca().issue_agency(&taijiang, code("350102"), &[])?;
    let mut client = net.client_with(code("350103"), &misplaced).await?;
    let err = client
        .search_catalog(fedgate_proto::v1::SearchCatalogRequest::default())
        .await
        .expect_err("an agency certificate of another node was accepted");
    expect(
        err,
        Code::PermissionDenied,
        "registers it at node 350102, not at node 350103",
    )?;
    assert_audited(
        &net,
        "350103",
        "PERMISSION_DENIED",
        "registers it at node 350102",
    )
    .await?;
    net.shutdown().await
}
