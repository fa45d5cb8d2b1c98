//! A hop whose caller goes away while the provider works still records the request, at every hop.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_proto::v1::ShareType;
use fedgate_tests::{
    Devnet, NodeSpec, code, eventually, init, key_at, own_audit_records, query, registry,
};

use super::WAIT;

#[tokio::test]
async fn a_share_cancelled_while_its_provider_works_is_recorded_at_every_hop() -> Result<()> {
    use ShareType::{Conditional, Unconditional};
    init();
    let specs = vec![
        NodeSpec::new("350100")?,
        NodeSpec::new("350102")?
            .provider(2, "Gulou provider", registry(Unconditional, Conditional, 1))?
            .provider_latency(Duration::from_secs(5)),
        NodeSpec::new("350103")?.consumer(1, "Taijiang consumer")?,
    ];
    let net = Devnet::start(specs).await?;
    let gulou = net.provider_at(code("350102"))?;
    let provider = gulou.provider.clone().context("Gulou serves a registry")?;
    let key = key_at(&net, "350102", 0)?;
    let mut consumer = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let mut share = query("350102:household", &key, &["name"]);
    share.request_id = "cancelled-while-served".into();

    // The share travels 350103 → 350100 → 350102; the agency gives up once the provider has the request.
    let call = tokio::spawn(async move { consumer.share(share).await });
    let began = Instant::now();
    while provider.received() == 0 {
        if began.elapsed() > WAIT {
            bail!("the share never reached the provider");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call.abort();
    assert!(call.await.is_err(), "the share was cancelled, not answered");

    // Every hop holds a record of it with its outcome, written when the hop's caller went away.
    let outcomes = |node: &'static str| {
        let net = &net;
        async move {
            Ok::<_, anyhow::Error>(
                own_audit_records(net, node)
                    .await?
                    .into_iter()
                    .filter(|r| r.request_id == "cancelled-while-served")
                    .map(|r| (r.outcome, r.provider_uscc))
                    .collect::<Vec<_>>(),
            )
        }
    };
    eventually("every hop recorded the cancelled share", WAIT, || async {
        Ok(!outcomes("350103").await?.is_empty()
            && outcomes("350100").await?.len() >= 2
            && !outcomes("350102").await?.is_empty())
    })
    .await?;
    let cancelled = "CANCELLED".to_owned();
    assert_eq!(
        outcomes("350103").await?,
        [(cancelled.clone(), String::new())],
        "the consumer's node"
    );
    assert_eq!(
        outcomes("350100").await?,
        [
            ("FORWARDED".to_owned(), String::new()),
            (cancelled.clone(), String::new())
        ],
        "the relay"
    );
    assert_eq!(
        outcomes("350102").await?,
        [(cancelled, gulou.uscc.to_string())],
        "the serving node, which had called its provider"
    );
    net.shutdown().await
}
