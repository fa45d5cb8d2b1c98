//! Share governance over real nodes: applications, approvals, grants, modes, revocation, objections, deadlines.
//! Every refusal is checked for its exact status and for its audit record at the node that refused it.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, bail};
use fedgate_gateway::clock::Clock;
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    Application, ApplicationState, ApplyRequest, DecideRequest, FileObjectionRequest,
    GetApplicationRequest, GetObjectionRequest, Grant, ListApplicationsRequest,
    ListObjectionsRequest, ObjectionState, ResolveObjectionRequest, RevokeRequest, ShareMode,
    ShareRequest, ShareType, SignedGrant, VerifyResult,
};
use fedgate_tests::{
    Devnet, NodeSpec, code, eventually, key_at, own_audit_records, query, registry, standard,
};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

const DAY: i64 = 24 * 3600;

fn apply(resource: &str, mode: ShareMode, fields: &[&str]) -> ApplyRequest {
    ApplyRequest {
        resource_id: resource.into(),
        purpose: "social assistance eligibility check".into(),
        scenario: "minimum living allowance application".into(),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        mode: mode as i32,
        requested_expires_at: 0,
    }
}

/// The request under `grant`, stating no purpose of its own: the consumer's node takes the grant's.
fn with_grant(mut req: ShareRequest, grant: &SignedGrant) -> ShareRequest {
    req.grant = Some(grant.clone());
    req.purpose.clear();
    req
}

fn grant_of(a: &Application) -> Result<(SignedGrant, Grant)> {
    let Some(signed) = a.grant.clone() else {
        bail!("application {} carries no grant", a.id)
    };
    let g = Grant::decode(signed.grant.as_slice())?;
    Ok((signed, g))
}

/// Asserts that `node` recorded a refusal of `request_id` with `outcome`.
async fn assert_recorded(net: &Devnet, node: &str, request_id: &str, outcome: &str) -> Result<()> {
    let rows = own_audit_records(net, node).await?;
    if !rows
        .iter()
        .any(|r| r.outcome == outcome && r.request_id == request_id)
    {
        bail!("node {node} holds no {outcome} record of request {request_id}");
    }
    Ok(())
}

/// Sends a share that must be refused with `code`; checks the message and the audit record at `node`.
async fn refused(
    net: &Devnet,
    client: &mut AgencyClient<Channel>,
    mut req: ShareRequest,
    expect: Code,
    needle: &str,
    node: &str,
) -> Result<()> {
    req.request_id = format!("deny-{}", rand_id());
    let id = req.request_id.clone();
    let err = match client.share(req).await {
        Ok(r) => bail!("request {id} was served: {:?}", r.into_inner()),
        Err(e) => e,
    };
    assert_eq!(err.code(), expect, "{}", err.message());
    assert!(
        err.message().contains(needle),
        "{:?} should mention {needle:?}",
        err.message()
    );
    let outcome = match expect {
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        other => bail!("unexpected code {other:?}"),
    };
    assert_recorded(net, node, &id, outcome).await
}

fn rand_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

struct Parties {
    a: AgencyClient<Channel>,
    b: AgencyClient<Channel>,
    provider: AgencyClient<Channel>,
    key: String,
}

async fn parties(net: &Devnet) -> Result<Parties> {
    Ok(Parties {
        a: net.client(&net.consumer_at(code("350203"))?.uscc).await?,
        b: net.client(&net.consumer_at(code("350103"))?.uscc).await?,
        provider: net.client(&net.provider_at(code("350102"))?.uscc).await?,
        key: key_at(net, "350102", 3)?,
    })
}

#[tokio::test]
async fn unconditional_resources_are_granted_at_once_and_verify_without_revealing_values()
-> Result<()> {
    let net = standard().await?;
    let mut p = parties(&net).await?;
    let person = net
        .provider_at(code("350102"))?
        .registry
        .as_ref()
        .and_then(|r| r.find(&p.key).cloned())
        .expect("person");

    let a =
        p.a.apply(apply(
            "350102:household",
            ShareMode::Verify,
            &["name", "gender"],
        ))
        .await?
        .into_inner();
    assert_eq!(a.state, ApplicationState::Approved as i32);
    let (grant, g) = grant_of(&a)?;
    assert_eq!(g.mode, ShareMode::Verify as i32);
    assert_eq!(g.issuer_node, "350102");

    let mut req = query("350102:household", &p.key, &[]);
    req.mode = ShareMode::Verify as i32;
    req.verify_values = HashMap::from([
        ("name".to_owned(), person.name.clone()),
        ("gender".to_owned(), "nonsense".to_owned()),
    ]);
    let resp =
        p.a.share(with_grant(req.clone(), &grant))
            .await?
            .into_inner();
    assert!(
        resp.records.is_empty(),
        "verify never returns stored values"
    );
    let checks: HashMap<_, _> = resp
        .checks
        .iter()
        .map(|c| (c.field.as_str(), c.result))
        .collect();
    assert_eq!(checks["name"], VerifyResult::Match as i32);
    assert_eq!(checks["gender"], VerifyResult::Mismatch as i32);

    let mut unknown = req.clone();
    unknown.key = key_at(&net, "350203", 0)?;
    let resp = p.a.share(with_grant(unknown, &grant)).await?.into_inner();
    assert!(
        resp.checks
            .iter()
            .all(|c| c.result == VerifyResult::NoRecord as i32)
    );

    // Verify needs the grant; a query under a verify-only grant is refused.
    refused(
        &net,
        &mut p.a,
        req.clone(),
        Code::FailedPrecondition,
        "needs a grant",
        "350102",
    )
    .await?;
    refused(
        &net,
        &mut p.a,
        with_grant(query("350102:household", &p.key, &["name"]), &grant),
        Code::PermissionDenied,
        "SHARE_MODE_VERIFY only",
        "350102",
    )
    .await?;
    // A malformed ID number is refused naming the key.
    let mut bad = req.clone();
    bad.key = "35010219900101123X".into();
    refused(
        &net,
        &mut p.a,
        with_grant(bad, &grant),
        Code::InvalidArgument,
        "key",
        "350102",
    )
    .await?;
    // Applications for a resource that is not shared are refused.
    let err =
        p.b.apply(apply("350203:marriage", ShareMode::Query, &[]))
            .await
            .expect_err("not shared");
    assert_eq!(err.code(), Code::PermissionDenied);
    net.shutdown().await
}

#[tokio::test]
async fn conditional_resources_wait_for_approval_which_may_narrow_or_reject() -> Result<()> {
    let net = standard().await?;
    let mut p = parties(&net).await?;
    let fields = ["name", "marital_status", "spouse_id_number"];
    let a =
        p.a.apply(apply("350102:marriage", ShareMode::Query, &fields))
            .await?
            .into_inner();
    assert_eq!(a.state, ApplicationState::Pending as i32);
    assert!(a.grant.is_none());
    assert!(a.due_at > a.filed_at + 4 * DAY, "five working days");

    // Without the grant the resource answers "approval required".
    refused(
        &net,
        &mut p.a,
        query("350102:marriage", &p.key, &[]),
        Code::FailedPrecondition,
        "approval required",
        "350102",
    )
    .await?;

    let pending = p
        .provider
        .list_applications(ListApplicationsRequest {
            state: ApplicationState::Pending as i32,
            overdue_only: false,
        })
        .await?
        .into_inner();
    assert_eq!(pending.applications.len(), 1);

    // Only the provider decides.
    let mut gulou_consumer = net.client(&net.consumer_at(code("350102"))?.uscc).await?;
    let err = gulou_consumer
        .decide(DecideRequest {
            application_id: a.id.clone(),
            approve: true,
            ..Default::default()
        })
        .await
        .expect_err("not the provider");
    assert_eq!(err.code(), Code::PermissionDenied);

    let approved = p
        .provider
        .decide(DecideRequest {
            application_id: a.id.clone(),
            approve: true,
            fields: vec!["name".into(), "marital_status".into()],
            reason: "spouse data not needed for this scenario".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(approved.state, ApplicationState::Approved as i32);
    let (grant, g) = grant_of(&approved)?;
    assert_eq!(g.fields, vec!["name", "marital_status"]);

    // The applicant reads the decision from its own node.
    let fetched =
        p.a.get_application(GetApplicationRequest { id: a.id.clone() })
            .await?
            .into_inner();
    assert_eq!(fetched.state, ApplicationState::Approved as i32);
    assert_eq!(fetched.grant, Some(grant.clone()));
    let err =
        p.b.get_application(GetApplicationRequest { id: a.id.clone() })
            .await
            .expect_err("someone else's application");
    assert_eq!(err.code(), Code::PermissionDenied);

    let resp =
        p.a.share(with_grant(query("350102:marriage", &p.key, &[]), &grant))
            .await?
            .into_inner();
    assert_eq!(resp.grant_id, g.id);
    let r = &resp.records[0].values;
    assert_eq!(r.len(), 2, "only the granted fields: {r:?}");
    assert!(r["name"].chars().skip(1).all(|c| c == '*'));

    refused(
        &net,
        &mut p.a,
        with_grant(
            query("350102:marriage", &p.key, &["spouse_id_number"]),
            &grant,
        ),
        Code::PermissionDenied,
        "spouse_id_number",
        "350102",
    )
    .await?;
    refused(
        &net,
        &mut p.b,
        with_grant(query("350102:marriage", &p.key, &[]), &grant),
        Code::PermissionDenied,
        "was issued to",
        "350102",
    )
    .await?;

    // A second application is rejected; a decided application cannot be decided again.
    let second =
        p.b.apply(apply("350102:marriage", ShareMode::Query, &[]))
            .await?
            .into_inner();
    let err = p
        .provider
        .decide(DecideRequest {
            application_id: second.id.clone(),
            approve: false,
            ..Default::default()
        })
        .await
        .expect_err("a rejection needs a reason");
    assert_eq!(err.code(), Code::InvalidArgument);
    let rejected = p
        .provider
        .decide(DecideRequest {
            application_id: second.id.clone(),
            approve: false,
            reason: "purpose does not match the resource".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(rejected.state, ApplicationState::Rejected as i32);
    let err = p
        .provider
        .decide(DecideRequest {
            application_id: second.id,
            approve: true,
            ..Default::default()
        })
        .await
        .expect_err("already decided");
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A grant that allows clear values returns them unmasked.
    let clear_app =
        p.a.apply(apply("350102:marriage", ShareMode::Query, &["name"]))
            .await?
            .into_inner();
    let clear = p
        .provider
        .decide(DecideRequest {
            application_id: clear_app.id,
            approve: true,
            clear_fields: vec!["name".into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    let (clear_grant, _) = grant_of(&clear)?;
    let resp =
        p.a.share(with_grant(
            query("350102:marriage", &p.key, &["name"]),
            &clear_grant,
        ))
        .await?
        .into_inner();
    let person = net
        .provider_at(code("350102"))?
        .registry
        .as_ref()
        .and_then(|r| r.find(&p.key).cloned())
        .expect("person");
    assert_eq!(resp.records[0].values["name"], person.name);
    net.shutdown().await
}

#[tokio::test]
async fn forged_expired_and_revoked_grants_are_refused() -> Result<()> {
    let net = standard().await?;
    let mut p = parties(&net).await?;
    let a =
        p.a.apply(apply(
            "350102:marriage",
            ShareMode::Query,
            &["name", "marital_status"],
        ))
        .await?
        .into_inner();
    let approved = p
        .provider
        .decide(DecideRequest {
            application_id: a.id,
            approve: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let (grant, g) = grant_of(&approved)?;
    let req = with_grant(query("350102:marriage", &p.key, &["name"]), &grant);
    let first = p.a.share(req.clone()).await?.into_inner();
    assert!(!first.from_cache);
    let second = p.a.share(req.clone()).await?.into_inner();
    assert!(
        second.from_cache,
        "the repeated request is answered by the consumer's node"
    );
    assert_eq!(second.records, first.records);
    assert_eq!(second.route.len(), 1);

    // Altered grant: widen its fields but keep the signature. The consumer's node checks the grant with the
    // issuer's endorsed key before the request leaves it.
    let mut widened = g.clone();
    widened.fields.push("spouse_id_number".into());
    let forged = SignedGrant {
        grant: widened.encode_to_vec(),
        ..grant.clone()
    };
    refused(
        &net,
        &mut p.a,
        with_grant(
            query("350102:marriage", &p.key, &["spouse_id_number"]),
            &forged,
        ),
        Code::PermissionDenied,
        "altered or forged",
        "350203",
    )
    .await?;
    // A grant signed by some other key, with no endorsement, or with the issuer's endorsement of its own key.
    let mut rogue = fedgate_gateway::grant::GrantKey::generate().sign(&g);
    refused(
        &net,
        &mut p.a,
        with_grant(query("350102:marriage", &p.key, &["name"]), &rogue),
        Code::PermissionDenied,
        "grant 350102-g-1: grant carries no signed statement",
        "350203",
    )
    .await?;
    rogue.key_endorsement = grant.key_endorsement.clone();
    refused(
        &net,
        &mut p.a,
        with_grant(query("350102:marriage", &p.key, &["name"]), &rogue),
        Code::PermissionDenied,
        "is not signed with a key that node 350102 endorsed",
        "350203",
    )
    .await?;

    // Revocation reaches every node on the route and beats the cache.
    let revoked = p
        .provider
        .revoke(RevokeRequest {
            grant_id: g.id.clone(),
            reason: "purpose fulfilled".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        revoked.notified_nodes,
        vec!["350102", "350100", "350000", "350200", "350203"]
    );
    refused(
        &net,
        &mut p.a,
        req.clone(),
        Code::PermissionDenied,
        "revoked",
        "350203",
    )
    .await?;
    // At the provider's node too, even for a request that bypasses the consumer's node check.
    assert!(
        net.node(code("350102"))?
            .governance()
            .is_revoked(&g.id)
            .await?
    );

    // Expiry.
    let soon = net.clock().unix() + 3600;
    let mut short = apply("350102:household", ShareMode::Query, &["name"]);
    short.requested_expires_at = soon;
    let short = p.a.apply(short).await?.into_inner();
    let (short_grant, _) = grant_of(&short)?;
    p.a.share(with_grant(
        query("350102:household", &p.key, &["name"]),
        &short_grant,
    ))
    .await?;
    net.advance_clock(2 * 3600);
    let fresh = with_grant(query("350102:household", &p.key, &["name"]), &short_grant);
    refused(
        &net,
        &mut p.a,
        fresh,
        Code::PermissionDenied,
        "expired",
        "350102",
    )
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn an_application_decided_after_its_deadline_works_but_is_reported_overdue() -> Result<()> {
    let net = standard().await?;
    let mut p = parties(&net).await?;
    let a =
        p.a.apply(apply("350102:marriage", ShareMode::Query, &["name"]))
            .await?
            .into_inner();
    let none = p
        .provider
        .list_applications(ListApplicationsRequest {
            overdue_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(none.applications.is_empty());
    net.advance_clock(10 * DAY);
    let overdue = p
        .provider
        .list_applications(ListApplicationsRequest {
            overdue_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(overdue.applications.len(), 1);
    assert_eq!(overdue.applications[0].id, a.id);
    assert!(overdue.applications[0].overdue);
    let (late_apps, _) = net.node(code("350102"))?.governance().overdue().await?;
    assert_eq!(late_apps.len(), 1);
    let (open_late, _) = net
        .node(code("350102"))?
        .governance()
        .open_overdue(1)
        .await?;
    assert_eq!(open_late.len(), 1, "still waiting for a decision");

    let approved = p
        .provider
        .decide(DecideRequest {
            application_id: a.id,
            approve: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(approved.overdue, "decided after the deadline");
    let (grant, _) = grant_of(&approved)?;
    let resp =
        p.a.share(with_grant(
            query("350102:marriage", &p.key, &["name"]),
            &grant,
        ))
        .await?
        .into_inner();
    assert_eq!(resp.records.len(), 1);
    net.shutdown().await
}

#[tokio::test]
async fn objections_are_answered_within_their_deadline_or_reported() -> Result<()> {
    let net = standard().await?;
    let mut p = parties(&net).await?;
    let o =
        p.a.file_objection(FileObjectionRequest {
            resource_id: "350102:household".into(),
            key: p.key.clone(),
            description: "address is out of date".into(),
            evidence: "residence permit issued 2026-03-01".into(),
        })
        .await?
        .into_inner();
    assert_eq!(o.state, ObjectionState::Open as i32);
    assert!(o.id.starts_with("350102-o-"));
    let second =
        p.b.file_objection(FileObjectionRequest {
            resource_id: "350102:household".into(),
            key: p.key.clone(),
            description: "name misspelled".into(),
            evidence: String::new(),
        })
        .await?
        .into_inner();
    let resolved = p
        .provider
        .resolve_objection(ResolveObjectionRequest {
            objection_id: o.id.clone(),
            corrected: true,
            resolution: "address updated".into(),
        })
        .await?
        .into_inner();
    assert_eq!(resolved.state, ObjectionState::Corrected as i32);
    assert!(!resolved.overdue);
    let seen =
        p.a.get_objection(GetObjectionRequest { id: o.id.clone() })
            .await?
            .into_inner();
    assert_eq!(seen.state, ObjectionState::Corrected as i32);
    let err =
        p.b.get_objection(GetObjectionRequest { id: o.id })
            .await
            .expect_err("not the filer");
    assert_eq!(err.code(), Code::PermissionDenied);

    net.advance_clock(9 * DAY);
    let overdue = p
        .provider
        .list_objections(ListObjectionsRequest {
            overdue_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(overdue.objections.len(), 1);
    assert_eq!(overdue.objections[0].id, second.id);
    net.shutdown().await
}

#[tokio::test]
async fn statistics_refuse_groups_below_the_minimum() -> Result<()> {
    fedgate_tests::init();
    use ShareType::{Conditional, Unconditional};
    let net = Devnet::start(vec![
        NodeSpec::new("350000")?.consumer(1, "province consumer")?,
        NodeSpec::new("350100")?
            .consumer(1, "Fuzhou consumer")?
            .provider(
                2,
                "Fuzhou provider (large)",
                registry(Unconditional, Conditional, 3),
            )?,
        NodeSpec::new("350102")?.provider(
            2,
            "Gulou provider (tiny)",
            fedgate_node::devnet::ProviderSpec {
                household: Unconditional,
                marriage: Conditional,
                persons: 6,
                seed: 9,
            },
        )?,
    ])
    .await?;
    net.wait_for_catalog(code("350000"), 4, Duration::from_secs(20))
        .await?;
    let mut c = net.client(&net.consumer_at(code("350000"))?.uscc).await?;
    let stats = |resource: &str| {
        let mut r = query(resource, "", &[]);
        r.mode = ShareMode::Statistics as i32;
        r.group_by = vec!["gender".into()];
        r
    };
    let large = c
        .apply(apply(
            "350100:household",
            ShareMode::Statistics,
            &["gender"],
        ))
        .await?
        .into_inner();
    let (large_grant, _) = grant_of(&large)?;
    let resp = c
        .share(with_grant(stats("350100:household"), &large_grant))
        .await?
        .into_inner();
    assert!(resp.records.is_empty());
    assert_eq!(resp.groups.iter().map(|g| g.count).sum::<u64>(), 200);

    let tiny = c
        .apply(apply(
            "350102:household",
            ShareMode::Statistics,
            &["gender"],
        ))
        .await?
        .into_inner();
    let (tiny_grant, _) = grant_of(&tiny)?;
    refused(
        &net,
        &mut c,
        with_grant(stats("350102:household"), &tiny_grant),
        Code::FailedPrecondition,
        "below the minimum",
        "350102",
    )
    .await?;
    let mut bad_dim = with_grant(stats("350100:household"), &large_grant);
    bad_dim.group_by = vec!["name".into()];
    refused(
        &net,
        &mut c,
        bad_dim,
        Code::PermissionDenied,
        "name",
        "350100",
    )
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn bulk_streams_a_hundred_thousand_records_page_by_page_and_resumes() -> Result<()> {
    fedgate_tests::init();
    use ShareType::{Conditional, Unconditional};
    const PERSONS: usize = 100_000;
    let net = Devnet::start(vec![
        NodeSpec::new("350000")?.consumer(1, "province consumer")?,
        NodeSpec::new("350100")?,
        NodeSpec::new("350102")?.provider(
            2,
            "Gulou provider",
            fedgate_node::devnet::ProviderSpec {
                household: Unconditional,
                marriage: Conditional,
                persons: PERSONS,
                seed: 5,
            },
        )?,
    ])
    .await?;
    net.wait_for_catalog(code("350000"), 2, Duration::from_secs(20))
        .await?;
    let mut c = net.client(&net.consumer_at(code("350000"))?.uscc).await?;
    let app = c
        .apply(apply(
            "350102:household",
            ShareMode::Bulk,
            &["id_number", "gender"],
        ))
        .await?
        .into_inner();
    let (grant, _) = grant_of(&app)?;
    let mut req = query("350102:household", "", &[]);
    req.mode = ShareMode::Bulk as i32;
    req.page_size = 5000;
    let req = with_grant(req, &grant);

    let mut stream = c.bulk(req.clone()).await?.into_inner();
    let (mut total, mut pages, mut largest) = (0usize, 0usize, 0usize);
    let mut tokens = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while let Some(page) = stream.message().await? {
        pages += 1;
        largest = largest.max(page.records.len());
        total += page.records.len();
        for r in &page.records {
            assert_eq!(r.values.len(), 2, "only the granted fields");
            assert!(r.values["id_number"].contains("********"), "masked");
            seen.insert(r.values["id_number"].clone());
        }
        tokens.push(page.next_page_token.clone());
    }
    assert_eq!(total, PERSONS);
    assert_eq!(pages, PERSONS / 5000);
    assert!(largest <= 5000, "pages are bounded, so memory is too");
    assert_eq!(tokens.last().map(String::as_str), Some(""));

    // Resuming from a page token yields exactly the rest.
    let mut resume = req.clone();
    resume.page_token = tokens[9].clone();
    let mut stream = c.bulk(resume).await?.into_inner();
    let mut rest = 0;
    while let Some(page) = stream.message().await? {
        rest += page.records.len();
    }
    assert_eq!(rest, PERSONS - 10 * 5000);

    // Bulk without a grant is refused.
    let mut no_grant = req.clone();
    no_grant.grant = None;
    let mut stream = c.bulk(no_grant).await?.into_inner();
    let err = stream.message().await.expect_err("needs a grant");
    assert_eq!(err.code(), Code::FailedPrecondition);
    net.shutdown().await
}

#[tokio::test]
async fn operators_see_overdue_items_and_stale_entries_with_the_nodes_certificate() -> Result<()> {
    use fedgate_gateway::ident::Peer;
    use fedgate_gateway::tls::{TlsMaterial, client_tls};
    use fedgate_proto::v1::ReportRequest;
    use fedgate_proto::v1::operator_client::OperatorClient;

    let net = standard().await?;
    let mut p = parties(&net).await?;
    let operator = |cert: fedgate_gateway::pki::IssuedCert| -> Result<OperatorClient<Channel>> {
        let tls = TlsMaterial {
            ca_pem: net.ca().ca_pem(),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
        };
        let channel = tonic::transport::Endpoint::from_shared(net.node_url(code("350102"))?)?
            .tls_config(client_tls(&tls, &Peer::Node(code("350102"))))?
            .connect_lazy();
        Ok(OperatorClient::new(channel))
    };
    let mut op = operator(net.ca().issue(&Peer::Node(code("350102")), &[])?)?;
    let fresh = op.report(ReportRequest {}).await?.into_inner();
    assert!(fresh.overdue_applications.is_empty());
    assert!(fresh.stale_entries.is_empty());

    let a =
        p.a.apply(apply("350102:marriage", ShareMode::Query, &["name"]))
            .await?
            .into_inner();
    net.advance_clock(10 * DAY);
    let late = op.report(ReportRequest {}).await?.into_inner();
    assert_eq!(late.overdue_applications.len(), 1);
    assert_eq!(late.overdue_applications[0].id, a.id);
    // The registry's entries declare a daily update frequency.
    assert_eq!(late.stale_entries.len(), 2);
    assert_eq!(late.stale_count, 2);
    assert!(late.stale_entries[0].reason.contains("update frequency"));

    // Another node's certificate, or an agency's, is not an operator of 350102.
    let mut other = operator(net.ca().issue(&Peer::Node(code("350100")), &[])?)?;
    let err = other
        .report(ReportRequest {})
        .await
        .expect_err("not this node");
    assert_eq!(err.code(), Code::PermissionDenied);
    let provider = net.provider_at(code("350102"))?;
    let mut agency = operator(provider.cert.clone())?;
    let err = agency
        .report(ReportRequest {})
        .await
        .expect_err("an agency");
    assert_eq!(err.code(), Code::PermissionDenied);
    net.shutdown().await
}

#[tokio::test]
async fn a_revocation_reaches_a_node_that_was_down_when_it_was_issued() -> Result<()> {
    let mut net = standard().await?;
    let mut p = parties(&net).await?;
    let a =
        p.a.apply(apply("350102:marriage", ShareMode::Query, &["name"]))
            .await?
            .into_inner();
    let approved = p
        .provider
        .decide(DecideRequest {
            application_id: a.id,
            approve: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let (_, g) = grant_of(&approved)?;

    // Xiamen, on the way to the grantee's node, is down when the provider revokes.
    net.stop_node(code("350200")).await?;
    let revoked = p
        .provider
        .revoke(RevokeRequest {
            grant_id: g.id.clone(),
            reason: "purpose fulfilled".into(),
        })
        .await?
        .into_inner();
    assert_eq!(revoked.notified_nodes, vec!["350102", "350100", "350000"]);
    assert!(
        !net.node(code("350203"))?
            .governance()
            .is_revoked(&g.id)
            .await?
    );

    // The province keeps it pending and hands it on once Xiamen is back; Xiamen hands it to Siming.
    net.restart_node(code("350200")).await?;
    let siming = net.node(code("350203"))?;
    eventually(
        "the revocation reaches the grantee's node",
        Duration::from_secs(30),
        || async { Ok(siming.governance().is_revoked(&g.id).await?) },
    )
    .await?;
    assert!(
        net.node(code("350200"))?
            .governance()
            .is_revoked(&g.id)
            .await?
    );
    let province = net.node(code("350000"))?;
    eventually(
        "nothing stays pending at the province",
        Duration::from_secs(10),
        || async {
            Ok(province
                .governance()
                .pending_revocations(None, 1)
                .await?
                .is_empty())
        },
    )
    .await?;
    net.shutdown().await
}
