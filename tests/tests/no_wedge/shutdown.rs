//! A stopping node stops accepting, lets calls finish within its grace, and cuts off the rest.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_proto::v1::{ShareResponse, ShareType};
use fedgate_tests::process::{AuditDump, ProcessFederation};
use fedgate_tests::{NodeSpec, code, init, query, registry};
use tonic::Code;

use super::{SERIAL, WAIT};

/// A single-node federation whose provider answers each call after `latency`, stopping with `grace`.
async fn slow_single_node(latency: Duration, grace_secs: u64) -> Result<ProcessFederation> {
    use ShareType::{Conditional, Unconditional};
    let specs = vec![
        NodeSpec::new("350100")?
            .consumer(1, "Fuzhou consumer")?
            .provider(
                2,
                "Fuzhou provider",
                registry(Unconditional, Conditional, 3),
            )?
            .provider_latency(latency),
    ];
    ProcessFederation::start_configured(specs, &[], &move |c| {
        c.shutdown_grace_secs = grace_secs;
    })
    .await
}

/// Starts a share of the node's own registry and waits until its provider has it.
async fn share_in_flight(
    fed: &ProcessFederation,
    request_id: &str,
) -> Result<tokio::task::JoinHandle<Result<tonic::Response<ShareResponse>, tonic::Status>>> {
    let city = code("350100");
    let provider = fed
        .provider_at(city)?
        .provider
        .clone()
        .context("the provider serves a registry")?;
    let mut consumer = fed.client(&fed.consumer_at(city)?.uscc).await?;
    let mut share = query("350100:household", &fed.key_at(city, 0)?, &["name"]);
    share.request_id = request_id.to_owned();
    let call = tokio::spawn(async move { consumer.share(share).await });
    let began = Instant::now();
    while provider.received() == 0 {
        if began.elapsed() > WAIT {
            bail!("the share never reached the provider");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(call)
}

/// Connects to `addr` until a connection is refused; returns when that happened.
fn refused_from(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<Instant> {
    tokio::spawn(async move {
        loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return Instant::now(),
            }
        }
    })
}

#[tokio::test]
async fn a_stopping_node_stops_accepting_and_lets_a_call_within_its_grace_finish() -> Result<()> {
    let _serial = SERIAL.lock().await;
    init();
    let city = code("350100");
    let latency = Duration::from_secs(2);
    let mut fed = slow_single_node(latency, 10).await?;
    let addr: std::net::SocketAddr = fed.node_config(city)?.listen.parse()?;
    let call = share_in_flight(&fed, "finishes-during-shutdown").await?;
    let refused = refused_from(addr);
    let stopped = fed.terminate(city).await?;
    eprintln!("exited {stopped:?} after SIGTERM, its call of {latency:?} in flight");
    let answered = call.await?;
    let answer = answered.map_err(|s| anyhow::anyhow!("the call in flight failed: {s:?}"))?;
    assert_eq!(
        answer.into_inner().records.len(),
        1,
        "it was answered in full"
    );
    let refused_at = refused.await?;
    assert!(
        stopped < Duration::from_secs(10),
        "the node exited once its call was done, well within its grace: {stopped:?}"
    );
    assert!(
        refused_at.elapsed() + Duration::from_millis(200) >= latency / 2,
        "new connections were refused while the call was still running"
    );
    let dump = AuditDump::read(fed.db_path(city)?).await?;
    let chain = dump.chain("350100");
    let served: Vec<&str> = chain
        .iter()
        .filter(|r| r.request_id == "finishes-during-shutdown")
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(served, ["OK"]);
    assert!(
        chain.last().is_some_and(|r| !r.signature.is_empty()),
        "the chain's head was signed before the node exited"
    );
    dump.verify("350100", None)?;
    fed.shutdown().await
}

#[tokio::test]
async fn a_stopping_node_cuts_off_calls_that_outlast_its_grace_and_exits_in_time() -> Result<()> {
    let _serial = SERIAL.lock().await;
    init();
    let city = code("350100");
    let mut fed = slow_single_node(Duration::from_secs(60), 1).await?;
    let call = share_in_flight(&fed, "outlasts-the-grace").await?;
    let stopped = fed.terminate(city).await?;
    eprintln!("exited {stopped:?} after SIGTERM with a grace of 1 s");
    assert!(
        stopped >= Duration::from_secs(1) && stopped < Duration::from_secs(1 + 5),
        "the node exited within its grace and a margin: {stopped:?}"
    );
    let status = call.await?.expect_err("the call was cut off");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let dump = AuditDump::read(fed.db_path(city)?).await?;
    let chain = dump.chain("350100");
    let cut: Vec<&str> = chain
        .iter()
        .filter(|r| r.request_id == "outlasts-the-grace")
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(cut, ["CANCELLED"], "the cut-off call is recorded");
    assert!(
        chain.last().is_some_and(|r| !r.signature.is_empty()),
        "the chain's head was signed before the node exited"
    );
    dump.verify("350100", None)?;
    fed.shutdown().await
}
