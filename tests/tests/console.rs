//! The web console over real nodes and real TLS: a reviewer approves in a headless browser and the consumer's
//! share then succeeds over gRPC; one agency's reviewer can neither see nor act on another's applications, not
//! even by forging the forms; CSRF tokens, cross-site posts, session expiry, lockout and TOTP are enforced; every
//! action and refusal is in the node's audit chain under the real-name user.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    Application, ApplicationState, ApplyRequest, AuditOperation, AuditRecord, ConsoleRole,
    DisableUserRequest, GetApplicationRequest, ShareMode, ShareType,
};
use fedgate_tests::console::{Browser, ConsoleClient, add_user, console_addr, federation};
use fedgate_tests::{
    Devnet, NodeSpec, code, eventually, key_at, own_audit_records, query, registry,
};
use tonic::Code;
use tonic::transport::Channel;

/// The city whose provider is reviewed, the province whose consumer applies.
const CITY: &str = "350100";

fn specs() -> Result<Vec<NodeSpec>> {
    use ShareType::{Conditional, Unconditional};
    Ok(vec![
        NodeSpec::new("350000")?.consumer(1, "province consumer")?,
        NodeSpec::new(CITY)?
            .consumer(1, "Fuzhou consumer")?
            .provider(
                2,
                "Fuzhou civil affairs",
                registry(Unconditional, Conditional, 3),
            )?,
    ])
}

async fn apply(consumer: &mut AgencyClient<Channel>) -> Result<Application> {
    Ok(consumer
        .apply(ApplyRequest {
            resource_id: format!("{CITY}:marriage"),
            purpose: "最低生活保障资格核查".into(),
            scenario: "低保申请".into(),
            fields: vec![
                "name".into(),
                "marital_status".into(),
                "registration_office".into(),
            ],
            mode: ShareMode::Query as i32,
            requested_expires_at: 0,
        })
        .await?
        .into_inner())
}

/// The element `at` finds once the page shows it (pages load after a click).
/// When it does not, the page shown is kept as `failed.png` and `failed.html` beside the screenshots.
async fn el(
    b: &fantoccini::Client,
    at: fantoccini::Locator<'_>,
) -> Result<fantoccini::elements::Element> {
    match b
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(at)
        .await
    {
        Ok(e) => Ok(e),
        Err(e) => {
            let dir = fedgate_tests::console::screenshot_dir();
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("failed.png"), b.screenshot().await?)?;
            std::fs::write(dir.join("failed.html"), b.source().await?)?;
            bail!("{e} (the page is kept in {})", dir.display())
        }
    }
}

/// A federation with consoles, a reviewer account at the city acting for the city's provider (or, with
/// `for_consumer`, for the city's consumer agency), and an application of the province's consumer waiting there.
struct Waiting {
    net: Devnet,
    reviewer: fedgate_proto::v1::UserCredentials,
    consumer: AgencyClient<Channel>,
    app: Application,
}

async fn waiting(
    (session_secs, lockout_after): (u64, u32),
    (login, name): (&str, &str),
    for_consumer: bool,
) -> Result<Waiting> {
    let net = federation(specs()?, session_secs, lockout_after).await?;
    let agency = if for_consumer {
        net.consumer_at(code(CITY))?.uscc.to_string()
    } else {
        net.provider_at(code(CITY))?.uscc.to_string()
    };
    let reviewer = add_user(
        &net,
        CITY,
        (login, name),
        ConsoleRole::Reviewer,
        &agency,
        false,
    )
    .await?;
    let mut consumer = net.client(&net.consumer_at(code("350000"))?.uscc).await?;
    let app = apply(&mut consumer).await?;
    Ok(Waiting {
        net,
        reviewer,
        consumer,
        app,
    })
}

/// Fills in the sign-in form shown and sends it.
async fn sign_in(b: &fantoccini::Client, login: &str, password: &str) -> Result<()> {
    el(b, fantoccini::Locator::Id("login"))
        .await?
        .send_keys(login)
        .await?;
    el(b, fantoccini::Locator::Id("password"))
        .await?
        .send_keys(password)
        .await?;
    el(b, fantoccini::Locator::Id("sign-in"))
        .await?
        .click()
        .await?;
    Ok(())
}

/// The city's audit records of `op` whose actor is `actor`.
async fn records_of(net: &Devnet, op: AuditOperation, actor: &str) -> Result<Vec<AuditRecord>> {
    Ok(own_audit_records(net, CITY)
        .await?
        .into_iter()
        .filter(|r| r.operation == op as i32 && r.actor == actor)
        .collect())
}

async fn application_state(net: &Devnet, id: &str) -> Result<i32> {
    let mut consumer = net.client(&net.consumer_at(code("350000"))?.uscc).await?;
    Ok(consumer
        .get_application(GetApplicationRequest { id: id.into() })
        .await?
        .into_inner()
        .state)
}

#[tokio::test]
async fn a_reviewer_approves_in_the_browser_and_the_consumer_then_shares() -> Result<()> {
    fedgate_tests::init();
    let Some(browser) = Browser::start().await? else {
        return Ok(());
    };
    let net = federation(specs()?, 3600, 5).await?;
    let provider = net.provider_at(code(CITY))?.uscc.to_string();
    let reviewer = add_user(
        &net,
        CITY,
        ("350102198001011234", "张敏"),
        ConsoleRole::Reviewer,
        &provider,
        false,
    )
    .await?;
    let operator = add_user(
        &net,
        CITY,
        ("op-0001", "李强"),
        ConsoleRole::Operator,
        "",
        false,
    )
    .await?;
    let auditor = add_user(
        &net,
        CITY,
        ("au-0001", "王芳"),
        ConsoleRole::Auditor,
        "",
        false,
    )
    .await?;

    let mut consumer = net.client(&net.consumer_at(code("350000"))?.uscc).await?;
    let key = key_at(&net, CITY, 3)?;
    let app = apply(&mut consumer).await?;
    let before = consumer
        .share(query(&format!("{CITY}:marriage"), &key, &[]))
        .await
        .expect_err("no grant yet");
    assert_eq!(
        before.code(),
        Code::FailedPrecondition,
        "{}",
        before.message()
    );

    let base = format!("https://{}", console_addr(&net, CITY)?);
    let b = &browser.client;
    b.goto(&format!("{base}/login")).await?;
    browser.screenshot("01-login").await?;
    sign_in(b, "350102198001011234", &reviewer.password).await?;
    let queue = el(b, fantoccini::Locator::Id("queue"))
        .await?
        .text()
        .await?;
    ensure!(
        queue.contains(&app.id),
        "the queue lists the application: {queue}"
    );
    browser.screenshot("02-review-queue").await?;
    el(b, fantoccini::Locator::LinkText(&app.id))
        .await?
        .click()
        .await?;
    browser.screenshot("03-application").await?;
    // Narrow the grant: no registration office.
    el(
        b,
        fantoccini::Locator::Css("input[name=field][value=registration_office]"),
    )
    .await?
    .click()
    .await?;
    el(b, fantoccini::Locator::Id("approve"))
        .await?
        .click()
        .await?;
    // The decided application's page is the one with its grant.
    el(b, fantoccini::Locator::Id("grant")).await?;
    browser.screenshot("04-approved").await?;
    let state = el(b, fantoccini::Locator::Id("state"))
        .await?
        .text()
        .await?;
    assert_eq!(state, "APPROVED");
    browser.screenshot("04-approved").await?;
    b.goto(&format!("{base}/grants")).await?;
    browser.screenshot("05-grants").await?;
    b.goto(&format!("{base}/catalog")).await?;
    browser.screenshot("06-catalog").await?;
    b.goto(&format!("{base}/catalog/entry?id={CITY}:marriage"))
        .await?;
    let holders = el(b, fantoccini::Locator::Id("holders"))
        .await?
        .text()
        .await?;
    ensure!(
        holders.contains(&net.consumer_at(code("350000"))?.uscc.to_string()),
        "{holders}"
    );
    browser.screenshot("07-entry").await?;

    // The consumer's share now succeeds, with the fields the reviewer granted.
    let granted = consumer
        .get_application(GetApplicationRequest { id: app.id.clone() })
        .await?
        .into_inner();
    assert_eq!(granted.state, ApplicationState::Approved as i32);
    let mut req = query(&format!("{CITY}:marriage"), &key, &[]);
    req.grant = granted.grant.clone();
    req.purpose.clear();
    let answer = consumer.share(req).await?.into_inner();
    let values = &answer.records[0].values;
    assert_eq!(values.len(), 2, "name and marital status only: {values:?}");
    // Audited under the real-name user, in the node's chain.
    let approvals = records_of(
        &net,
        AuditOperation::Approval,
        "urn:fedgate:user:350102198001011234",
    )
    .await?;
    assert_eq!(approvals.len(), 1, "{approvals:?}");
    assert_eq!(approvals[0].provider_uscc, provider);
    assert!(
        approvals[0].detail.contains("张敏"),
        "{}",
        approvals[0].detail
    );

    // The operator's and the auditor's pages, in English this time.
    el(b, fantoccini::Locator::Id("sign-out"))
        .await?
        .click()
        .await?;
    // Signed out (a navigation started before would cancel the form's post).
    el(b, fantoccini::Locator::Id("login-form")).await?;
    b.goto(&format!("{base}/lang?to=en")).await?;
    sign_in(b, "op-0001", &operator.password).await?;
    let parent = el(b, fantoccini::Locator::Id("parent"))
        .await?
        .text()
        .await?;
    ensure!(parent.contains("350000"), "{parent}");
    browser.screenshot("08-federation").await?;
    b.goto(&format!("{base}/reports")).await?;
    browser.screenshot("09-reports").await?;
    b.goto(&format!("{base}/stats")).await?;
    let total = el(b, fantoccini::Locator::Id("share-total"))
        .await?
        .text()
        .await?;
    ensure!(
        total.parse::<u64>().unwrap_or(0) >= 1,
        "shares counted: {total}"
    );
    browser.screenshot("10-statistics").await?;
    el(b, fantoccini::Locator::Id("sign-out"))
        .await?
        .click()
        .await?;
    sign_in(b, "au-0001", &auditor.password).await?;
    // Signed in: the auditor's home is the audit search.
    el(b, fantoccini::Locator::Id("audit-form")).await?;
    b.goto(&format!("{base}/audit?resource={CITY}:marriage&verify=1"))
        .await?;
    let verification = el(b, fantoccini::Locator::Id("verification"))
        .await?
        .text()
        .await?;
    ensure!(verification.contains("verified"), "{verification}");
    let records = el(b, fantoccini::Locator::Id("records"))
        .await?
        .text()
        .await?;
    ensure!(records.contains("APPROVAL"), "{records}");
    browser.screenshot("11-audit").await?;
    el(b, fantoccini::Locator::Css("#records td a"))
        .await?
        .click()
        .await?;
    let route = el(b, fantoccini::Locator::Id("route"))
        .await?
        .text()
        .await?;
    ensure!(route.contains(CITY), "{route}");
    browser.screenshot("12-request-route").await?;
    browser.close().await?;
    net.shutdown().await
}

#[tokio::test]
async fn a_reviewer_sees_and_acts_only_for_its_own_agency() -> Result<()> {
    fedgate_tests::init();
    let Waiting {
        net,
        reviewer: creds,
        consumer: _,
        app,
    } = waiting((3600, 5), ("350102198502024321", "赵磊"), true).await?;

    let mut c = ConsoleClient::new(&net, CITY)?;
    let signed = c.sign_in("350102198502024321", &creds.password, "").await?;
    assert_eq!(signed.status, 303, "{}", signed.body);
    let queue = c.get("/review").await?;
    assert_eq!(queue.status, 200);
    assert!(
        !queue.body.contains(&app.id),
        "another agency's application is not listed"
    );
    let csrf = queue.csrf()?;
    let peek = c.get(&format!("/review/application?id={}", app.id)).await?;
    assert_eq!(peek.status, 403, "{}", peek.body);
    // Forged: a valid session and token, another agency's application.
    let forged = c
        .post(
            "/review/decide",
            &[("csrf", &csrf), ("id", &app.id), ("decision", "approve")],
            None,
        )
        .await?;
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert_eq!(
        application_state(&net, &app.id).await?,
        ApplicationState::Pending as i32
    );
    // Pages of other roles.
    assert_eq!(c.get("/federation").await?.status, 403);
    assert_eq!(c.get("/audit").await?.status, 403);

    let actor = "urn:fedgate:user:350102198502024321";
    let refused = records_of(&net, AuditOperation::ConsoleRefused, actor).await?;
    assert!(
        refused.iter().any(|r| r.detail.contains(&app.id))
            && refused.iter().any(|r| r.detail.contains("/federation")),
        "{refused:?}"
    );
    let decisions = records_of(&net, AuditOperation::Approval, actor).await?;
    assert!(
        decisions.len() == 1 && decisions[0].outcome == "PERMISSION_DENIED",
        "{decisions:?}"
    );
    net.shutdown().await
}

#[tokio::test]
async fn tokens_origins_sessions_lockout_and_second_factor_are_enforced() -> Result<()> {
    fedgate_tests::init();
    let Waiting {
        net,
        reviewer: creds,
        consumer: _,
        app,
    } = waiting((600, 3), ("rev-01", "陈静"), false).await?;

    // No session: the form is refused, and a page sends the browser to sign in.
    let mut anon = ConsoleClient::new(&net, CITY)?;
    let no_session = anon
        .post(
            "/review/decide",
            &[("csrf", "x"), ("id", &app.id), ("decision", "approve")],
            None,
        )
        .await?;
    assert_eq!(no_session.status, 403);
    let page = anon.get("/review").await?;
    assert_eq!((page.status, page.location()), (303, Some("/login")));
    // A sign-in form without its cookie's token.
    let no_token = anon
        .post(
            "/login",
            &[
                ("csrf", &"0".repeat(64)),
                ("login", "rev-01"),
                ("password", &creds.password),
            ],
            None,
        )
        .await?;
    assert_eq!(no_token.status, 403);

    let mut c = ConsoleClient::new(&net, CITY)?;
    assert_eq!(c.sign_in("rev-01", &creds.password, "").await?.status, 303);
    let session = c
        .cookies
        .get("__Host-fedgate-session")
        .cloned()
        .unwrap_or_default();
    ensure!(session.len() == 64, "a session cookie was set");
    let queue = c.get("/review").await?;
    // Filed just now: the whole approval period is left, in working days.
    let approval_days = fedgate_gateway::calendar::CalendarConfig::default().approval_days;
    assert!(
        queue
            .body
            .contains(&format!("<td class=\"num\">{approval_days}</td>")),
        "{} working days left: {}",
        approval_days,
        queue.body
    );
    let csrf = queue.csrf()?;
    // Wrong token, then a cross-site post with the right one.
    let wrong = c
        .post(
            "/review/decide",
            &[
                ("csrf", &"f".repeat(64)),
                ("id", &app.id),
                ("decision", "approve"),
            ],
            None,
        )
        .await?;
    assert_eq!(wrong.status, 403, "{}", wrong.body);
    let cross = c
        .post(
            "/review/decide",
            &[("csrf", &csrf), ("id", &app.id), ("decision", "approve")],
            Some("https://evil.example"),
        )
        .await?;
    assert_eq!(cross.status, 403, "{}", cross.body);
    assert_eq!(
        application_state(&net, &app.id).await?,
        ApplicationState::Pending as i32
    );
    let refused = records_of(
        &net,
        AuditOperation::ConsoleRefused,
        "urn:fedgate:user:rev-01",
    )
    .await?;
    assert!(
        refused.iter().any(|r| r.detail.contains("CSRF")),
        "{refused:?}"
    );
    // A decision the form cannot ask for: a clear 400, audited where it is refused.
    let odd = c
        .post(
            "/review/decide",
            &[("csrf", &csrf), ("id", &app.id), ("decision", "maybe")],
            None,
        )
        .await?;
    assert_eq!(odd.status, 400, "{}", odd.body);
    eventually(
        "the bad form is audited",
        Duration::from_secs(10),
        || async {
            Ok(
                records_of(&net, AuditOperation::AuthRefused, "urn:fedgate:user:rev-01")
                    .await?
                    .iter()
                    .any(|r| {
                        r.outcome == "INVALID_ARGUMENT"
                            && r.detail.contains("console POST /review/decide")
                            && r.detail.contains("maybe")
                    }),
            )
        },
    )
    .await?;
    // A reject needs a reason: a clear 400, nothing decided.
    let no_reason = c
        .post(
            "/review/decide",
            &[("csrf", &csrf), ("id", &app.id), ("decision", "reject")],
            None,
        )
        .await?;
    assert_eq!(no_reason.status, 400, "{}", no_reason.body);
    assert!(
        no_reason.body.contains("reason is required"),
        "{}",
        no_reason.body
    );

    // The session expires on the node's clock.
    net.advance_clock(601);
    let expired = c.get("/review").await?;
    assert_eq!((expired.status, expired.location()), (303, Some("/login")));
    let ended = records_of(
        &net,
        AuditOperation::ConsoleSignOut,
        "urn:fedgate:user:rev-01",
    )
    .await?;
    assert!(
        ended.iter().any(|r| r.detail == "session expired"),
        "{ended:?}"
    );

    // Three wrong passwords lock the account; the right one is then refused too.
    let mut guesser = ConsoleClient::new(&net, CITY)?;
    for _ in 0..3 {
        assert_eq!(
            guesser
                .sign_in("rev-01", "not the password", "")
                .await?
                .status,
            401
        );
    }
    let locked = guesser.sign_in("rev-01", &creds.password, "").await?;
    assert_eq!(locked.status, 401);
    assert!(
        locked.body.contains("锁定"),
        "the page says the account is locked"
    );
    let sign_ins = records_of(
        &net,
        AuditOperation::ConsoleSignIn,
        "urn:fedgate:user:rev-01",
    )
    .await?;
    assert!(
        sign_ins.iter().any(|r| r.detail.contains("locked")),
        "{sign_ins:?}"
    );
    net.advance_clock(15 * 60 + 1);

    // A second factor: the code is asked for, and each code is accepted once.
    let provider = net.provider_at(code(CITY))?.uscc.to_string();
    let with_totp = add_user(
        &net,
        CITY,
        ("rev-02", "周洁"),
        ConsoleRole::Reviewer,
        &provider,
        true,
    )
    .await?;
    let totp = totp_rs::Totp::from_url(&with_totp.totp_uri)?;
    let mut d = ConsoleClient::new(&net, CITY)?;
    assert_eq!(
        d.sign_in("rev-02", &with_totp.password, "").await?.status,
        401
    );
    let now = u64::try_from(fedgate_gateway::clock::Clock::unix(net.clock()))?;
    let code_now = totp.generate(now).to_string();
    assert_eq!(
        d.sign_in("rev-02", &with_totp.password, &code_now)
            .await?
            .status,
        303
    );
    let mut e = ConsoleClient::new(&net, CITY)?;
    assert_eq!(
        e.sign_in("rev-02", &with_totp.password, &code_now)
            .await?
            .status,
        401,
        "a code is accepted once"
    );
    // Disabling the account ends its session at once.
    assert_eq!(d.get("/review").await?.status, 200);
    let mut op = fedgate_tests::operator_client(&net, CITY)?;
    op.disable_user(DisableUserRequest {
        login: "rev-02".into(),
    })
    .await?;
    let after = d.get("/review").await?;
    assert_eq!((after.status, after.location()), (303, Some("/login")));
    let accounts = own_audit_records(&net, CITY)
        .await?
        .into_iter()
        .filter(|r| r.operation == AuditOperation::ConsoleAccount as i32)
        .count();
    assert_eq!(accounts, 3, "two accounts added, one disabled");
    net.shutdown().await
}

#[tokio::test]
async fn accounts_are_checked_before_they_are_made() -> Result<()> {
    fedgate_tests::init();
    let net = federation(specs()?, 600, 3).await?;
    let provider = net.provider_at(code(CITY))?.uscc.to_string();
    let cases: [(&str, ConsoleRole, &str, Code); 5] = [
        ("ab", ConsoleRole::Operator, "", Code::InvalidArgument),
        ("rev-x", ConsoleRole::Reviewer, "", Code::InvalidArgument),
        (
            "op-x",
            ConsoleRole::Operator,
            provider.as_str(),
            Code::InvalidArgument,
        ),
        (
            "rev-y",
            ConsoleRole::Reviewer,
            "91350100MA2Y0000XX",
            Code::InvalidArgument,
        ),
        ("rev-z", ConsoleRole::Unspecified, "", Code::InvalidArgument),
    ];
    for (login, role, agency, expect) in cases {
        let err = match add_user(&net, CITY, (login, "测试"), role, agency, false).await {
            Ok(c) => bail!("{login} was added: {c:?}"),
            Err(e) => e,
        };
        let status = err
            .downcast_ref::<tonic::Status>()
            .map(|s| s.code())
            .unwrap_or(Code::Unknown);
        assert_eq!(status, expect, "{login}: {err}");
    }
    // An agency of another node.
    let elsewhere = net.consumer_at(code("350000"))?.uscc.to_string();
    let err = add_user(
        &net,
        CITY,
        ("rev-w", "测试"),
        ConsoleRole::Reviewer,
        &elsewhere,
        false,
    )
    .await
    .expect_err("not an agency of this node");
    let got = err.downcast_ref::<tonic::Status>().map(|s| s.code());
    assert_eq!(got, Some(Code::FailedPrecondition), "{err}");
    add_user(
        &net,
        CITY,
        ("op-1", "测试"),
        ConsoleRole::Operator,
        "",
        false,
    )
    .await?;
    let dup = add_user(
        &net,
        CITY,
        ("op-1", "测试"),
        ConsoleRole::Operator,
        "",
        false,
    )
    .await
    .expect_err("taken");
    assert_eq!(
        dup.downcast_ref::<tonic::Status>().map(|s| s.code()),
        Some(Code::FailedPrecondition)
    );
    // Only the node's own certificate manages accounts.
    let agency = net.consumer_at(code(CITY))?.uscc.clone();
    let cert = net
        .ca()
        .issue(&fedgate_gateway::ident::Peer::Agency(agency), &[])?;
    let mut as_agency = fedgate_tests::operator_client_with(&net, CITY, &cert)?;
    let err = as_agency
        .list_users(fedgate_proto::v1::ListUsersRequest {})
        .await
        .expect_err("an agency is no operator");
    assert_eq!(err.code(), Code::PermissionDenied);
    eventually(
        "the refusal is audited",
        Duration::from_secs(10),
        || async {
            Ok(own_audit_records(&net, CITY).await?.iter().any(|r| {
                r.operation == AuditOperation::AuthRefused as i32 && r.detail.contains("ListUsers")
            }))
        },
    )
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn a_reviewer_revokes_and_resolves_objections_in_the_console() -> Result<()> {
    fedgate_tests::init();
    let Waiting {
        net,
        reviewer: creds,
        mut consumer,
        app,
    } = waiting((3600, 5), ("rev-09", "黄丽"), false).await?;
    let key = key_at(&net, CITY, 5)?;
    let mut c = ConsoleClient::new(&net, CITY)?;
    assert_eq!(c.sign_in("rev-09", &creds.password, "").await?.status, 303);
    let csrf = c.get("/review").await?.csrf()?;
    let approved = c
        .post(
            "/review/decide",
            &[
                ("csrf", &csrf),
                ("id", &app.id),
                ("decision", "approve"),
                ("field", "name"),
            ],
            None,
        )
        .await?;
    assert_eq!(approved.status, 303, "{}", approved.body);
    let granted = consumer
        .get_application(GetApplicationRequest { id: app.id.clone() })
        .await?
        .into_inner();
    let mut req = query(&format!("{CITY}:marriage"), &key, &[]);
    req.grant = granted.grant.clone();
    req.purpose.clear();
    let answer = consumer.share(req.clone()).await?.into_inner();
    assert_eq!(
        answer.records[0].values.len(),
        1,
        "only the name was granted"
    );
    let grant_id = answer.grant_id.clone();

    // Revoked in the console: the consumer's next share under it is refused.
    let grants = c.get("/grants").await?;
    assert!(grants.body.contains(&grant_id), "{}", grants.body);
    let revoked = c
        .post(
            "/grants/revoke",
            &[("csrf", &csrf), ("id", &grant_id), ("reason", "用途已结束")],
            None,
        )
        .await?;
    assert_eq!(revoked.status, 303, "{}", revoked.body);
    eventually(
        "the revocation reaches the consumer's node",
        Duration::from_secs(20),
        || {
            let mut consumer = consumer.clone();
            let req = req.clone();
            async move {
                Ok(match consumer.share(req).await {
                    Ok(_) => false,
                    Err(e) => e.code() == Code::PermissionDenied,
                })
            }
        },
    )
    .await?;
    let revocations =
        records_of(&net, AuditOperation::Revocation, "urn:fedgate:user:rev-09").await?;
    assert!(
        revocations.len() == 1 && revocations[0].grant_id == grant_id,
        "{revocations:?}"
    );

    // An objection resolved in the console, as the objector sees it.
    let o = consumer
        .file_objection(fedgate_proto::v1::FileObjectionRequest {
            resource_id: format!("{CITY}:marriage"),
            key: key.clone(),
            description: "婚姻状况登记有误".into(),
            evidence: "离婚证 2026-05-01".into(),
        })
        .await?
        .into_inner();
    let page = c.get("/objections").await?;
    assert!(page.body.contains(&o.id), "{}", page.body);
    let resolved = c
        .post(
            "/objections/resolve",
            &[
                ("csrf", &csrf),
                ("id", &o.id),
                ("outcome", "corrected"),
                ("resolution", "已更正"),
            ],
            None,
        )
        .await?;
    assert_eq!(resolved.status, 303, "{}", resolved.body);
    let seen = consumer
        .get_objection(fedgate_proto::v1::GetObjectionRequest { id: o.id.clone() })
        .await?
        .into_inner();
    assert_eq!(
        seen.state,
        fedgate_proto::v1::ObjectionState::Corrected as i32
    );
    let again = c
        .post(
            "/objections/resolve",
            &[
                ("csrf", &csrf),
                ("id", &o.id),
                ("outcome", "confirmed"),
                ("resolution", "再次"),
            ],
            None,
        )
        .await?;
    assert_eq!(again.status, 409, "already resolved: {}", again.body);
    net.shutdown().await
}

#[tokio::test]
async fn sign_ins_over_the_rate_are_refused_and_summarised() -> Result<()> {
    fedgate_tests::init();
    let console = fedgate_gateway::console::ConsoleConfig {
        sign_ins_per_minute: 3,
        ..Default::default()
    };
    let net = fedgate_tests::console::federation_with(specs()?, console).await?;
    let mut c = ConsoleClient::new(&net, CITY)?;
    for _ in 0..3 {
        assert_eq!(
            c.sign_in("nobody-1", "wrong password", "").await?.status,
            401
        );
    }
    for _ in 0..5 {
        let over = c.sign_in("nobody-1", "wrong password", "").await?;
        assert_eq!(over.status, 429, "{}", over.body);
    }
    // The first refusal of the source is written at once; the rest go into its summary.
    eventually(
        "the refusal is audited",
        Duration::from_secs(10),
        || async {
            Ok(own_audit_records(&net, CITY).await?.iter().any(|r| {
                r.operation == AuditOperation::LimitRefused as i32
                    && r.actor.starts_with("tcp:127.0.0.1")
                    && r.detail.contains("sign-in as nobody-1")
            }))
        },
    )
    .await?;
    let refused_sign_ins = records_of(
        &net,
        AuditOperation::ConsoleSignIn,
        "urn:fedgate:user:nobody-1",
    )
    .await?
    .len();
    assert_eq!(
        refused_sign_ins, 3,
        "only the attempts within the rate reach the accounts"
    );
    net.shutdown().await
}
