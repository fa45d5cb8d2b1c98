//! An agency's own view at its node: the applications it filed, the grants it holds, and the notices it is
//! told (revocation, expiry near, decision), over a real federation.

use std::time::Duration;

use anyhow::{Result, bail};
use fedgate_gateway::clock::Clock;
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    Application, ApplicationState, ApplyRequest, DecideRequest, Grant, GrantStatus, HeldGrant,
    ListGrantsRequest, ListMyApplicationsRequest, ListNoticesRequest, Notice, NoticeKind,
    RevokeRequest, ShareMode, WatchNoticesRequest,
};
use fedgate_tests::{Devnet, code, eventually, init, standard_topology};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

const DAY: i64 = 24 * 3600;
const WAIT: Duration = Duration::from_secs(20);

/// The standard federation, whose nodes refresh their agencies' own view every 100 ms.
async fn federation() -> Result<Devnet> {
    init();
    let net = Devnet::start_configured(standard_topology()?, Default::default(), |mut c| {
        c.own_view.refresh_ms = 100;
        c
    })
    .await?;
    net.wait_for_catalog(code("350000"), 6, WAIT).await?;
    Ok(net)
}

fn apply(resource: &str, expires_at: i64) -> ApplyRequest {
    ApplyRequest {
        resource_id: resource.into(),
        purpose: "social assistance eligibility check".into(),
        scenario: "minimum living allowance application".into(),
        fields: vec!["name".into()],
        mode: ShareMode::Query as i32,
        requested_expires_at: expires_at,
    }
}

fn grant_id(a: &Application) -> Result<String> {
    match &a.grant {
        Some(g) => Ok(Grant::decode(g.grant.as_slice())?.id),
        None => bail!("application {} carries no grant", a.id),
    }
}

async fn applications(
    c: &mut AgencyClient<Channel>,
    state: ApplicationState,
) -> Result<Vec<Application>> {
    Ok(c.list_my_applications(ListMyApplicationsRequest {
        state: state as i32,
        ..Default::default()
    })
    .await?
    .into_inner()
    .applications
    .into_iter()
    .filter_map(|h| h.application)
    .collect())
}

async fn grants(c: &mut AgencyClient<Channel>, status: GrantStatus) -> Result<Vec<HeldGrant>> {
    Ok(c.list_grants(ListGrantsRequest {
        status: status as i32,
        ..Default::default()
    })
    .await?
    .into_inner()
    .grants)
}

async fn notices(c: &mut AgencyClient<Channel>, after: u64) -> Result<Vec<Notice>> {
    Ok(c.list_notices(ListNoticesRequest {
        after_seq: after,
        page_size: 0,
    })
    .await?
    .into_inner()
    .notices)
}

#[tokio::test]
async fn an_agency_sees_its_applications_and_grants_and_is_told_of_decisions_and_revocations()
-> Result<()> {
    let net = federation().await?;
    let siming = net.consumer_at(code("350203"))?.uscc.clone();
    let mut a = net.client(&siming).await?;
    let mut gulou = net.client(&net.provider_at(code("350102"))?.uscc).await?;
    let mut fuzhou = net.client(&net.provider_at(code("350100"))?.uscc).await?;

    let pending = a.apply(apply("350102:marriage", 0)).await?.into_inner();
    assert_eq!(pending.state, ApplicationState::Pending as i32);
    let granted = a.apply(apply("350102:household", 0)).await?.into_inner();
    assert_eq!(granted.state, ApplicationState::Approved as i32);
    let household_grant = grant_id(&granted)?;

    // Both are listed at Siming's own node, though they live at Gulou's.
    let all = applications(&mut a, ApplicationState::Unspecified).await?;
    let mut ids: Vec<&str> = all.iter().map(|x| x.id.as_str()).collect();
    ids.sort();
    let mut want = vec![pending.id.as_str(), granted.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    let only_pending = applications(&mut a, ApplicationState::Pending).await?;
    assert_eq!(only_pending.len(), 1);
    assert_eq!(only_pending[0].id, pending.id);
    assert!(only_pending[0].due_at > 0, "the deadline is shown");
    let held = grants(&mut a, GrantStatus::Active).await?;
    assert_eq!(held.len(), 1);
    let now = net.clock().unix();
    assert_eq!(held[0].grant_id, household_grant);
    assert_eq!(held[0].resource_id, "350102:household");
    assert!(held[0].expires_at > now);
    assert!(
        held[0].remaining_secs > 360 * DAY
            && held[0].remaining_secs <= held[0].expires_at - now + 1,
        "{}",
        held[0].remaining_secs
    );
    assert!(held[0].grant.is_some(), "the signed grant, to present");

    // Approved at Gulou; Siming never asks, its node refreshes the pending copy.
    gulou
        .decide(DecideRequest {
            application_id: pending.id.clone(),
            approve: true,
            reason: "approved for the allowance check".into(),
            ..Default::default()
        })
        .await?;
    eventually("the decision reaches the applicant's copy", WAIT, || {
        let mut a = a.clone();
        async move {
            Ok(applications(&mut a, ApplicationState::Pending)
                .await?
                .is_empty())
        }
    })
    .await?;
    assert_eq!(
        applications(&mut a, ApplicationState::Approved)
            .await?
            .len(),
        2
    );
    assert_eq!(grants(&mut a, GrantStatus::Active).await?.len(), 2);
    let told = notices(&mut a, 0).await?;
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].kind, NoticeKind::ApplicationDecided as i32);
    assert_eq!(told[0].application_id, pending.id);
    assert_eq!(told[0].state, ApplicationState::Approved as i32);

    // A watcher gets what is there, then what comes.
    let mut watch = a
        .watch_notices(WatchNoticesRequest { after_seq: 0 })
        .await?
        .into_inner();
    let first = watch.message().await?.expect("a notice");
    assert_eq!(first.seq, told[0].seq);

    // Revoked at Gulou: the held grant is marked and Siming is told.
    gulou
        .revoke(RevokeRequest {
            grant_id: household_grant.clone(),
            reason: "purpose fulfilled".into(),
        })
        .await?;
    let revoked = tokio::time::timeout(WAIT, watch.message())
        .await??
        .expect("a notice");
    assert_eq!(revoked.kind, NoticeKind::GrantRevoked as i32);
    assert_eq!(revoked.grant_id, household_grant);
    assert!(
        revoked.detail.contains("purpose fulfilled"),
        "{}",
        revoked.detail
    );
    assert!(revoked.seq > first.seq);
    let marked = grants(&mut a, GrantStatus::Revoked).await?;
    assert_eq!(marked.len(), 1);
    assert_eq!(marked[0].grant_id, household_grant);
    assert_eq!(marked[0].remaining_secs, 0);
    assert_eq!(marked[0].revoke_reason, "purpose fulfilled");
    assert!(marked[0].revoked_at > 0);
    assert_eq!(grants(&mut a, GrantStatus::Active).await?.len(), 1);

    // A rejection at another node's provider comes down the stream as well.
    let other = a.apply(apply("350100:marriage", 0)).await?.into_inner();
    fuzhou
        .decide(DecideRequest {
            application_id: other.id.clone(),
            approve: false,
            reason: "no legal basis stated".into(),
            ..Default::default()
        })
        .await?;
    let rejected = tokio::time::timeout(WAIT, watch.message())
        .await??
        .expect("a notice");
    assert_eq!(rejected.kind, NoticeKind::ApplicationDecided as i32);
    assert_eq!(rejected.state, ApplicationState::Rejected as i32);
    assert!(
        rejected.detail.contains("no legal basis"),
        "{}",
        rejected.detail
    );

    // Resumable by sequence number; each change told once.
    let after_first = notices(&mut a, first.seq).await?;
    let seqs: Vec<u64> = after_first.iter().map(|n| n.seq).collect();
    assert_eq!(seqs, vec![revoked.seq, rejected.seq]);
    net.node(code("350203"))?.own_view().scan().await?;
    assert_eq!(notices(&mut a, 0).await?.len(), 3);

    // Paging.
    let page = a
        .list_my_applications(ListMyApplicationsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(page.applications.len(), 2);
    assert!(!page.next_page_token.is_empty());
    let rest = a
        .list_my_applications(ListMyApplicationsRequest {
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(rest.applications.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // Another agency sees none of it; bad input is named.
    let mut b = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    assert!(
        applications(&mut b, ApplicationState::Unspecified)
            .await?
            .is_empty()
    );
    assert!(grants(&mut b, GrantStatus::Unspecified).await?.is_empty());
    assert!(notices(&mut b, 0).await?.is_empty());
    let err = a
        .list_grants(ListGrantsRequest {
            status: 42,
            ..Default::default()
        })
        .await
        .expect_err("unknown status");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = a
        .list_notices(ListNoticesRequest {
            after_seq: 0,
            page_size: 100_000,
        })
        .await
        .expect_err("page too large");
    assert_eq!(err.code(), Code::InvalidArgument);
    net.shutdown().await
}

#[tokio::test]
async fn a_grant_about_to_expire_is_told_once() -> Result<()> {
    let net = federation().await?;
    let siming = net.consumer_at(code("350203"))?.uscc.clone();
    let mut a = net.client(&siming).await?;
    let now = net.clock().unix();
    let short = a
        .apply(apply("350102:household", now + 10 * DAY))
        .await?
        .into_inner();
    let short_grant = grant_id(&short)?;
    let long = a.apply(apply("350100:household", 0)).await?.into_inner();
    let view = net.node(code("350203"))?.own_view().clone();
    view.scan().await?;
    assert!(
        notices(&mut a, 0).await?.is_empty(),
        "ten days left: not yet"
    );

    // Four days later six are left, within the notice period of seven.
    net.advance_clock(4 * DAY);
    eventually("the expiry notice", WAIT, || {
        let mut a = a.clone();
        async move { Ok(!notices(&mut a, 0).await?.is_empty()) }
    })
    .await?;
    for _ in 0..3 {
        view.scan().await?;
    }
    net.advance_clock(DAY);
    view.scan().await?;
    let told = notices(&mut a, 0).await?;
    assert_eq!(told.len(), 1, "once per grant: {told:?}");
    assert_eq!(told[0].kind, NoticeKind::GrantExpiring as i32);
    assert_eq!(told[0].grant_id, short_grant);
    assert_eq!(told[0].expires_at, now + 10 * DAY);
    let active = grants(&mut a, GrantStatus::Active).await?;
    assert_eq!(active.len(), 2);
    let left = active
        .iter()
        .find(|g| g.grant_id == short_grant)
        .map(|g| g.remaining_secs)
        .unwrap_or_default();
    assert!(left > 4 * DAY && left <= 5 * DAY, "{left}");
    assert!(
        active.iter().any(|g| g.application_id == long.id),
        "the long grant is held and not told"
    );

    // Past its expiry it is listed as expired, with no validity left.
    net.advance_clock(6 * DAY);
    let expired = grants(&mut a, GrantStatus::Expired).await?;
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].grant_id, short_grant);
    assert_eq!(expired[0].remaining_secs, 0);
    net.shutdown().await
}
