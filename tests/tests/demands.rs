//! Supply–demand matching over real nodes: a demand filed at a county travels to the province, the province's
//! operator assigns it to a provider agency of another city, the provider answers with an entry it published or
//! refuses with its reason; deadlines in working days reach `fedgate report`. Refusals are checked for their exact
//! status and for their audit record at the province.

use std::time::Duration;

use anyhow::{Result, bail};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::operator_client::OperatorClient;
use fedgate_proto::v1::{
    AnswerDemandRequest, ApplicationState, ApplyRequest, AssignDemandRequest, AuditOperation,
    AuditRecord, Demand, DemandState, FileDemandRequest, GetDemandRequest, ListDemandsRequest,
    OperatorListDemandsRequest, PublishEntryRequest, ReportRequest, ShareMode, ShareType,
};
use fedgate_tests::{
    Devnet, code, eventually, operator_client, operator_client_with, own_audit_records, standard,
    standard_topology,
};
use tonic::Code;
use tonic::transport::Channel;

const DAY: i64 = 24 * 3600;
const PROVINCE: &str = "350000";

fn demand(title: &str) -> FileDemandRequest {
    FileDemandRequest {
        title: title.into(),
        description:
            "Recipients of the elderly care subsidy, by resident, for the county's home-care visits"
                .into(),
        purpose: "home-care visits to subsidy recipients".into(),
        legal_basis: "Regulations on Elderly Care Services, art. 12".into(),
        fields: vec!["id_number".into(), "name".into(), "subsidy_level".into()],
        share_type: ShareType::Conditional as i32,
    }
}

fn assign(id: &str, provider: &str, node: &str) -> AssignDemandRequest {
    AssignDemandRequest {
        demand_id: id.into(),
        provider_uscc: provider.into(),
        provider_node: node.into(),
        note: "the civil affairs bureau keeps the subsidy register".into(),
    }
}

fn answer(id: &str, resource: &str) -> AnswerDemandRequest {
    AnswerDemandRequest {
        demand_id: id.into(),
        resource_id: resource.into(),
        ..Default::default()
    }
}

fn refuse(id: &str, reason: &str) -> AnswerDemandRequest {
    AnswerDemandRequest {
        demand_id: id.into(),
        refusal: reason.into(),
        ..Default::default()
    }
}

async fn get(client: &mut AgencyClient<Channel>, id: &str) -> Result<Demand> {
    Ok(client
        .get_demand(GetDemandRequest { id: id.into() })
        .await?
        .into_inner())
}

/// Asserts that `result` failed with `expect` and a message mentioning `needle`.
fn refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    expect: Code,
    needle: &str,
) -> Result<()> {
    match result {
        Ok(v) => bail!("expected {expect:?}, got {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), expect, "{}", e.message());
            assert!(
                e.message().contains(needle),
                "{:?} should mention {needle:?}",
                e.message()
            );
            Ok(())
        }
    }
}

/// The province's records matching `pred`.
async fn province_records(
    net: &Devnet,
    pred: impl Fn(&AuditRecord) -> bool,
) -> Result<Vec<AuditRecord>> {
    Ok(own_audit_records(net, PROVINCE)
        .await?
        .into_iter()
        .filter(|r| pred(r))
        .collect())
}

fn state(d: &Demand) -> DemandState {
    DemandState::try_from(d.state).unwrap_or_default()
}

fn operator(net: &Devnet) -> Result<OperatorClient<Channel>> {
    operator_client(net, PROVINCE)
}

#[tokio::test]
async fn a_county_demand_is_assigned_to_another_city_and_answered_with_a_published_entry()
-> Result<()> {
    let net = standard().await?;
    let county = net.consumer_at(code("350203"))?.uscc.to_string();
    let fuzhou = net.provider_at(code("350100"))?;
    let provider_uscc = fuzhou.uscc.to_string();
    let mut c = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let mut p = net.client(&fuzhou.uscc).await?;
    let mut op = operator(&net)?;

    // Filed at the county, held at the province.
    let filed = c
        .file_demand(demand("Elderly care subsidy recipients (养老服务补贴)"))
        .await?
        .into_inner();
    assert!(filed.id.starts_with("350000-d-"), "{}", filed.id);
    assert_eq!(state(&filed), DemandState::Filed);
    assert_eq!(filed.consumer_uscc, county);
    assert_eq!(filed.consumer_node, "350203");
    assert!(filed.assign_due_at > filed.filed_at);
    assert_eq!(filed.history.len(), 1);
    assert!(
        net.node(code(PROVINCE))?
            .store()
            .doc(fedgate_gateway::store::DocKind::Demand, &filed.id)
            .await?
            .is_some()
    );
    assert!(
        net.node(code("350203"))?
            .store()
            .doc(fedgate_gateway::store::DocKind::Demand, &filed.id)
            .await?
            .is_none(),
        "the county forwards demands; it holds none"
    );

    // The province's operator sees it waiting and assigns it to Fuzhou's provider agency.
    let waiting = op
        .list_demands(OperatorListDemandsRequest {
            state: DemandState::Filed as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(waiting.demands.len(), 1);
    let assigned = op
        .assign_demand(assign(&filed.id, &provider_uscc, "350100"))
        .await?
        .into_inner();
    assert_eq!(state(&assigned), DemandState::Assigned);
    assert_eq!(assigned.provider_uscc, provider_uscc);
    assert!(assigned.answer_due_at > assigned.assigned_at);

    // The provider finds it among the demands assigned to it; the filer sees the step.
    let mine = p
        .list_demands(ListDemandsRequest::default())
        .await?
        .into_inner();
    assert_eq!(
        mine.demands.iter().map(|d| &d.id).collect::<Vec<_>>(),
        [&filed.id]
    );
    let seen = get(&mut c, &filed.id).await?;
    assert_eq!(state(&seen), DemandState::Assigned);
    assert_eq!(seen.history.len(), 2);

    // The provider publishes a new entry at its node and answers once the province's catalog holds it.
    let mut entry = fuzhou
        .published
        .iter()
        .find(|e| e.id.ends_with(":household"))
        .cloned()
        .expect("household entry");
    entry.id = "elderly-care".into();
    entry.title = "Elderly care subsidy register (养老服务补贴)".into();
    entry.share_type = ShareType::Unconditional as i32;
    let published = p
        .publish_entry(PublishEntryRequest { entry: Some(entry) })
        .await?
        .into_inner()
        .entry
        .expect("stored entry");
    assert_eq!(published.id, "350100:elderly-care");
    let province = net.node(code(PROVINCE))?;
    eventually(
        "the new entry reaches the province",
        Duration::from_secs(20),
        || async { Ok(province.store().entry(&published.id).await?.is_some()) },
    )
    .await?;
    let answered = p
        .answer_demand(answer(&filed.id, &published.id))
        .await?
        .into_inner();
    assert_eq!(state(&answered), DemandState::Answered);
    assert_eq!(answered.resource_id, published.id);

    // The demanding agency sees it answered, with every step, and reads the entry through it.
    let done = get(&mut c, &filed.id).await?;
    assert_eq!(state(&done), DemandState::Answered);
    assert_eq!(done.resource_id, "350100:elderly-care");
    assert!(!done.overdue);
    let steps: Vec<DemandState> = done
        .history
        .iter()
        .map(|s| DemandState::try_from(s.state).unwrap_or_default())
        .collect();
    assert_eq!(
        steps,
        [
            DemandState::Filed,
            DemandState::Assigned,
            DemandState::Answered
        ]
    );
    assert_eq!(
        done.history[0].actor,
        format!("urn:fedgate:agency:{county}")
    );
    assert_eq!(done.history[1].actor, "urn:fedgate:node:350000");
    assert_eq!(
        done.history[2].actor,
        format!("urn:fedgate:agency:{provider_uscc}")
    );
    let read = done.entry.expect("the linked entry");
    assert_eq!(read.title, "Elderly care subsidy register (养老服务补贴)");
    assert_eq!(read.provider_uscc, provider_uscc);
    // The entry answers: an application for it is granted at once.
    let application = c
        .apply(ApplyRequest {
            resource_id: done.resource_id.clone(),
            purpose: done.purpose.clone(),
            scenario: "home-care visits".into(),
            fields: vec!["name".into()],
            mode: ShareMode::Query as i32,
            requested_expires_at: 0,
        })
        .await?
        .into_inner();
    assert_eq!(application.state, ApplicationState::Approved as i32);

    // Closed: no step changes it again.
    refused(
        p.answer_demand(refuse(&filed.id, "changed our mind")).await,
        Code::FailedPrecondition,
        "ANSWERED",
    )?;
    refused(
        op.assign_demand(assign(&filed.id, &provider_uscc, "350100"))
            .await,
        Code::FailedPrecondition,
        "ANSWERED",
    )?;

    // Every step is on the province's record.
    for (op, who) in [
        (AuditOperation::DemandFiled, county.as_str()),
        (AuditOperation::DemandAssigned, provider_uscc.as_str()),
        (AuditOperation::DemandAnswered, provider_uscc.as_str()),
    ] {
        let rows = province_records(&net, |r| {
            r.operation == op as i32
                && r.outcome == "OK"
                && r.detail.contains(&filed.id)
                && (r.consumer_uscc == who || r.provider_uscc == who)
        })
        .await?;
        assert_eq!(rows.len(), 1, "{op:?}");
    }
    let answered_record = province_records(&net, |r| {
        r.operation == AuditOperation::DemandAnswered as i32 && r.outcome == "OK"
    })
    .await?;
    assert_eq!(answered_record[0].resource_id, "350100:elderly-care");
    assert_eq!(answered_record[0].consumer_uscc, county);
    net.shutdown().await
}

#[tokio::test]
async fn a_provider_refuses_with_a_reason_and_nobody_else_reads_or_answers() -> Result<()> {
    let net = standard().await?;
    let mut c = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let gulou = net.provider_at(code("350102"))?.uscc.to_string();
    let mut p = net.client(&net.provider_at(code("350102"))?.uscc).await?;
    let intruder_uscc = net.consumer_at(code("350103"))?.uscc.to_string();
    let mut intruder = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let mut op = operator(&net)?;

    let d = c
        .file_demand(demand("Marriage records for the subsidy"))
        .await?
        .into_inner();
    // Before its assignment nobody may answer it.
    refused(
        p.answer_demand(refuse(&d.id, "not ours")).await,
        Code::PermissionDenied,
        "assigned",
    )?;
    op.assign_demand(assign(&d.id, &gulou, "350102")).await?;

    // Another agency reads or answers someone else's demand: refused, and recorded at the province.
    refused(
        intruder
            .get_demand(GetDemandRequest { id: d.id.clone() })
            .await,
        Code::PermissionDenied,
        "shown only",
    )?;
    let read_denied = province_records(&net, |r| {
        r.consumer_uscc == intruder_uscc
            && r.outcome == "PERMISSION_DENIED"
            && r.detail.contains(&d.id)
    })
    .await?;
    assert_eq!(read_denied.len(), 1, "the refused read is on record");
    refused(
        intruder.answer_demand(refuse(&d.id, "no")).await,
        Code::PermissionDenied,
        "answered only by the provider agency assigned",
    )?;
    let answer_denied = province_records(&net, |r| {
        r.operation == AuditOperation::DemandRefused as i32
            && r.actor == format!("urn:fedgate:agency:{intruder_uscc}")
            && r.outcome == "PERMISSION_DENIED"
            && r.detail.contains(&d.id)
    })
    .await?;
    assert_eq!(answer_denied.len(), 1);
    let listed = intruder
        .list_demands(ListDemandsRequest::default())
        .await?
        .into_inner();
    assert!(listed.demands.is_empty(), "{:?}", listed.demands);

    // The assigned provider answers with an entry that is not its own, one that does not exist, or nothing.
    refused(
        p.answer_demand(answer(&d.id, "350100:household")).await,
        Code::PermissionDenied,
        "provided by agency",
    )?;
    let wrong_entry = province_records(&net, |r| {
        r.operation == AuditOperation::DemandAnswered as i32
            && r.provider_uscc == gulou
            && r.outcome == "PERMISSION_DENIED"
    })
    .await?;
    assert_eq!(wrong_entry.len(), 1);
    refused(
        p.answer_demand(answer(&d.id, "350102:no-such-entry")).await,
        Code::NotFound,
        "not in the catalog",
    )?;
    refused(
        p.answer_demand(refuse(&d.id, "   ")).await,
        Code::InvalidArgument,
        "refusal",
    )?;
    refused(
        p.answer_demand(AnswerDemandRequest {
            demand_id: d.id.clone(),
            resource_id: "350102:household".into(),
            refusal: "both".into(),
            note: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "exclude each other",
    )?;
    assert_eq!(state(&get(&mut c, &d.id).await?), DemandState::Assigned);

    // A refusal with its legal grounds closes it; the filer reads why.
    let reason =
        "the register holds no subsidy levels: Regulations art. 7 assign them to the county";
    let closed = p.answer_demand(refuse(&d.id, reason)).await?.into_inner();
    assert_eq!(state(&closed), DemandState::Refused);
    let seen = get(&mut c, &d.id).await?;
    assert_eq!(state(&seen), DemandState::Refused);
    assert_eq!(seen.reason, reason);
    assert_eq!(seen.history.len(), 3);
    assert_eq!(seen.history[2].note, reason);
    assert!(seen.entry.is_none());
    refused(
        p.answer_demand(answer(&d.id, "350102:household")).await,
        Code::FailedPrecondition,
        "REFUSED",
    )?;
    let recorded = province_records(&net, |r| {
        r.operation == AuditOperation::DemandRefused as i32
            && r.outcome == "OK"
            && r.detail.contains(reason)
    })
    .await?;
    assert_eq!(recorded.len(), 1);

    // Only the province's own certificate is its operator.
    let city = net
        .ca()
        .issue(&fedgate_gateway::ident::Peer::Node(code("350100")), &[])?;
    let mut other = operator_client_with(&net, PROVINCE, &city)?;
    refused(
        other.assign_demand(assign(&d.id, &gulou, "350102")).await,
        Code::PermissionDenied,
        "not an operator",
    )?;
    let mut agency_op =
        operator_client_with(&net, PROVINCE, &net.consumer_at(code(PROVINCE))?.cert)?;
    refused(
        agency_op
            .list_demands(OperatorListDemandsRequest::default())
            .await,
        Code::PermissionDenied,
        "not an operator",
    )?;
    let auth = province_records(&net, |r| {
        r.operation == AuditOperation::AuthRefused as i32
            && r.detail.starts_with("Operator.AssignDemand")
            && r.actor == "urn:fedgate:node:350100"
    })
    .await?;
    assert_eq!(auth.len(), 1);
    net.shutdown().await
}

#[tokio::test]
async fn demands_past_their_deadlines_are_reported_overdue() -> Result<()> {
    let net = standard().await?;
    let mut county = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    // The province's own agency files too: served at the province without a hop.
    let mut local = net.client(&net.consumer_at(code(PROVINCE))?.uscc).await?;
    let gulou = net.provider_at(code("350102"))?.uscc.to_string();
    let mut op = operator(&net)?;

    let fresh = op.report(ReportRequest {}).await?.into_inner();
    assert!(fresh.overdue_demands.is_empty());

    let unassigned = local
        .file_demand(demand("Province-wide subsidy statistics"))
        .await?
        .into_inner();
    let unanswered = county
        .file_demand(demand("Subsidy recipients of Siming"))
        .await?
        .into_inner();
    let unanswered = op
        .assign_demand(assign(&unanswered.id, &gulou, "350102"))
        .await?
        .into_inner();
    let on_time = op.report(ReportRequest {}).await?.into_inner();
    assert!(on_time.overdue_demands.is_empty());

    // Ten days on: more than five working days since the filing, fewer than ten since the assignment.
    net.advance_clock(10 * DAY);
    let late = op.report(ReportRequest {}).await?.into_inner();
    assert_eq!(late.overdue_demands.len(), 1, "{:?}", late.overdue_demands);
    let o = &late.overdue_demands[0];
    assert_eq!(
        o.demand.as_ref().map(|d| d.id.as_str()),
        Some(unassigned.id.as_str())
    );
    assert!(
        o.reason.contains("not assigned within 5 working days"),
        "{}",
        o.reason
    );
    assert_eq!(o.due_at, unassigned.assign_due_at);
    let mine = local
        .list_demands(ListDemandsRequest {
            overdue_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(mine.demands.len(), 1);
    assert!(mine.demands[0].overdue);
    assert!(
        county
            .list_demands(ListDemandsRequest {
                overdue_only: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .demands
            .is_empty()
    );

    // Twenty days on, the assigned demand is past its answer deadline too.
    net.advance_clock(10 * DAY);
    let later = op.report(ReportRequest {}).await?.into_inner();
    let reported: Vec<(&str, &str, i64)> = later
        .overdue_demands
        .iter()
        .map(|o| {
            (
                o.demand.as_ref().map_or("", |d| d.id.as_str()),
                o.reason.as_str(),
                o.due_at,
            )
        })
        .collect();
    assert_eq!(reported.len(), 2, "{reported:?}");
    let answer_late = reported
        .iter()
        .find(|(id, _, _)| *id == unanswered.id)
        .expect("the unanswered demand is reported");
    assert!(
        answer_late
            .1
            .contains("not answered within 10 working days")
    );
    assert_eq!(answer_late.2, unanswered.answer_due_at);
    let open = net
        .node(code(PROVINCE))?
        .governance()
        .open_overdue_demands(1)
        .await?;
    assert_eq!(open.len(), 2);

    // Assigned late, the first stays reported (assigned after its deadline) once answered on time.
    let late_assigned = op
        .assign_demand(assign(&unassigned.id, &gulou, "350102"))
        .await?
        .into_inner();
    assert!(late_assigned.overdue);
    let mut p = net.client(&net.provider_at(code("350102"))?.uscc).await?;
    p.answer_demand(answer(&unassigned.id, "350102:household"))
        .await?;
    let last = op.report(ReportRequest {}).await?.into_inner();
    let first = last
        .overdue_demands
        .iter()
        .find(|o| o.demand.as_ref().is_some_and(|d| d.id == unassigned.id))
        .expect("still reported");
    assert_eq!(first.reason, "assigned after its deadline");
    net.shutdown().await
}

#[tokio::test]
async fn demand_inputs_are_bounded_with_exact_codes() -> Result<()> {
    fedgate_tests::init();
    let mut specs = standard_topology()?;
    let province = specs
        .remove(0)
        .limits(fedgate_gateway::limits::LimitsConfig {
            max_open_demands: 2,
            ..Default::default()
        });
    specs.insert(0, province);
    let net = Devnet::start(specs).await?;
    net.wait_for_catalog(code(PROVINCE), 6, Duration::from_secs(20))
        .await?;
    let mut c = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let mut op = operator(&net)?;

    // Checked at the county's edge.
    let mut long = demand("x");
    long.title = "题".repeat(201);
    refused(
        c.file_demand(long).await,
        Code::InvalidArgument,
        "title has 201 characters",
    )?;
    refused(
        c.list_demands(ListDemandsRequest {
            page_size: 201,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "max_demand_page",
    )?;
    // Checked at the province.
    let mut nothing = demand("no fields");
    nothing.fields.clear();
    refused(
        c.file_demand(nothing).await,
        Code::InvalidArgument,
        "fields",
    )?;
    let mut basis = demand("no basis");
    basis.legal_basis.clear();
    refused(
        c.file_demand(basis).await,
        Code::InvalidArgument,
        "legal_basis is required",
    )?;
    let mut unshared = demand("unshared");
    unshared.share_type = ShareType::NotShared as i32;
    refused(
        c.file_demand(unshared).await,
        Code::InvalidArgument,
        "NOT_SHARED",
    )?;
    refused(
        c.list_demands(ListDemandsRequest {
            state: 9,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "not a demand state",
    )?;

    // At most two open at once for one agency; the third is refused until one closes.
    let first = c.file_demand(demand("one")).await?.into_inner();
    c.file_demand(demand("two")).await?;
    refused(
        c.file_demand(demand("three")).await,
        Code::ResourceExhausted,
        "max_open_demands",
    )?;
    let exhausted = province_records(&net, |r| {
        r.operation == AuditOperation::DemandFiled as i32 && r.outcome == "RESOURCE_EXHAUSTED"
    })
    .await?;
    assert_eq!(exhausted.len(), 1);
    let gulou = net.provider_at(code("350102"))?.uscc.to_string();
    op.assign_demand(assign(&first.id, &gulou, "350102"))
        .await?;
    net.client(&net.provider_at(code("350102"))?.uscc)
        .await?
        .answer_demand(refuse(&first.id, "outside our duties"))
        .await?;
    c.file_demand(demand("three")).await?;

    // Operator mistakes.
    refused(
        op.assign_demand(assign("350000-d-999", &gulou, "350102"))
            .await,
        Code::NotFound,
        "350000-d-999",
    )?;
    refused(
        op.assign_demand(assign(&first.id, "not-a-uscc", "350102"))
            .await,
        Code::InvalidArgument,
        "provider_uscc",
    )?;
    refused(
        op.assign_demand(assign(&first.id, &gulou, "360100")).await,
        Code::InvalidArgument,
        "outside the province",
    )?;

    // Pages: one demand at a time, in id order, until the token runs out.
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_demands(ListDemandsRequest {
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.extend(page.demands.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(ids.len() <= 3, "paging does not end: {ids:?}");
    }
    assert_eq!(ids.len(), 3, "{ids:?}");
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    net.shutdown().await
}

/// The command lines an agency and the province's operator use, against `fedgate` node processes.
#[tokio::test]
async fn the_command_lines_file_assign_answer_and_report_a_demand() -> Result<()> {
    use fedgate_tests::process::ProcessFederation;

    let net = ProcessFederation::start(standard_topology()?, &[]).await?;
    let county = net.consumer_at(code("350203"))?.uscc.to_string();
    let provider = net.provider_at(code("350102"))?.uscc.to_string();
    let agency = |uscc: &str, node: &str| -> Result<Vec<String>> {
        Ok(vec![
            "agency".into(),
            "--node-addr".into(),
            net.node_url(code(node))?,
            "--node-code".into(),
            node.into(),
            "--ca".into(),
            "pki/ca.crt".into(),
            "--cert".into(),
            format!("pki/agency-{uscc}.crt"),
            "--key".into(),
            format!("pki/agency-{uscc}.key"),
            "demand".into(),
        ])
    };
    let with = |mut base: Vec<String>, more: &[&str]| {
        base.extend(more.iter().map(|s| (*s).to_owned()));
        base
    };
    let province = net.config_path(code(PROVINCE))?.display().to_string();

    let filed = net
        .fedgate(with(
            agency(&county, "350203")?,
            &[
                "file",
                "--title",
                "Elderly care subsidy recipients",
                "--description",
                "recipients by resident",
                "--purpose",
                "home-care visits",
                "--legal-basis",
                "Regulations on Elderly Care Services, art. 12",
                "--fields",
                "id_number,name",
            ],
        ))
        .await?;
    filed.expect_success()?;
    assert!(
        filed.stdout.contains("demand 350000-d-1"),
        "{}",
        filed.stdout
    );
    assert!(filed.stdout.contains("FILED"), "{}", filed.stdout);

    let listed = net
        .fedgate(["demand", "list", "--config", &province, "--state", "filed"])
        .await?;
    listed.expect_success()?;
    assert!(listed.stdout.contains("350000-d-1"), "{}", listed.stdout);

    net.fedgate([
        "demand",
        "assign",
        "--config",
        &province,
        "350000-d-1",
        "--provider",
        &provider,
        "--node",
        "350102",
    ])
    .await?
    .expect_success()?;

    // Someone else's demand: the agency command exits with the refusal named.
    let other = net
        .fedgate(with(
            agency(&county, "350203")?,
            &["answer", "350000-d-1", "--resource", "350102:household"],
        ))
        .await?;
    assert_ne!(other.code, Some(0));
    assert!(
        other.stderr.contains("PermissionDenied"),
        "{}",
        other.stderr
    );

    net.fedgate(with(
        agency(&provider, "350102")?,
        &["answer", "350000-d-1", "--resource", "350102:household"],
    ))
    .await?
    .expect_success()?;
    let shown = net
        .fedgate(with(agency(&county, "350203")?, &["show", "350000-d-1"]))
        .await?;
    shown.expect_success()?;
    assert!(shown.stdout.contains("ANSWERED"), "{}", shown.stdout);
    assert!(
        shown.stdout.contains("answered with: 350102:household"),
        "{}",
        shown.stdout
    );

    let report = net.fedgate(["report", "--config", &province]).await?;
    report.expect_success()?;
    assert!(
        report.stdout.contains("overdue demands: 0"),
        "{}",
        report.stdout
    );
    net.shutdown().await
}

/// A node cannot answer for another node's agency: the province takes the answering agency only from the
/// consumer assertion, which must carry that agency's certificate registered at the signing node.
#[tokio::test]
async fn a_node_cannot_answer_a_demand_for_another_nodes_agency() -> Result<()> {
    use fedgate_tests::rogue::{RogueNode, assert_audited, now_ms};

    let net = standard().await?;
    let mut c = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let gulou = net.provider_at(code("350102"))?;
    let d = c
        .file_demand(demand("Marriage records"))
        .await?
        .into_inner();
    operator(&net)?
        .assign_demand(assign(&d.id, gulou.uscc.as_str(), "350102"))
        .await?;

    // Siming's node (350203) lies: it vouches in its own name for Gulou's provider agency, presenting that
    // agency's (public) certificate, and answers with Gulou's entry.
    let rogue = RogueNode::new(&net, "350203")?.presenting(&gulou.cert.cert_pem)?;
    let mut xiamen = rogue.federation(&net, "350200").await?;
    let req = answer(&d.id, "350102:household");
    let mut env = rogue.envelope(
        "rogue-answer",
        ("", PROVINCE),
        (gulou.uscc.as_str(), "350203"),
    );
    env.kind = fedgate_proto::v1::RequestKind::AnswerDemand as i32;
    env.mode = 0;
    env.assertion = Some(rogue.assert(&env, &prost::Message::encode_to_vec(&req), now_ms(&net))?);
    refused(
        xiamen.forward(RogueNode::forward(env, &req)).await,
        Code::PermissionDenied,
        "registered at node 350102, not at node 350203",
    )?;
    assert_audited(
        &net,
        PROVINCE,
        "PERMISSION_DENIED",
        "registered at node 350102, not at node 350203",
    )
    .await?;

    // Signed honestly as its own agency, it is still not the assigned provider.
    let own = net.consumer_at(code("350203"))?;
    let rogue = RogueNode::new(&net, "350203")?.presenting(&own.cert.cert_pem)?;
    let mut env = rogue.envelope("rogue-own", ("", PROVINCE), (own.uscc.as_str(), "350203"));
    env.kind = fedgate_proto::v1::RequestKind::AnswerDemand as i32;
    env.mode = 0;
    env.assertion = Some(rogue.assert(&env, &prost::Message::encode_to_vec(&req), now_ms(&net))?);
    refused(
        xiamen.forward(RogueNode::forward(env, &req)).await,
        Code::PermissionDenied,
        "answered only by the provider agency assigned",
    )?;
    assert_eq!(state(&get(&mut c, &d.id).await?), DemandState::Assigned);
    net.shutdown().await
}
