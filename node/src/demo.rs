//! `fedgate demo`: a province, two cities and three counties on loopback, exercised end to end: shares across
//! the tree, then discovery, a flow-back subscription and a data demand ([`patterns`]).

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use fedgate_gateway::ident::DivisionCode;
use fedgate_proto::v1::{ShareMode, ShareRequest, ShareType};
use tonic::Code;

use crate::devnet::{Devnet, NodeSpec, ProviderSpec};

mod patterns;

const PROVINCE: &str = "350000";
const FUZHOU: &str = "350100";
const XIAMEN: &str = "350200";
const GULOU: &str = "350102";
const TAIJIANG: &str = "350103";
const SIMING: &str = "350203";

fn code(s: &str) -> Result<DivisionCode> {
    s.parse().map_err(|e| anyhow!("{s}: {e}"))
}

fn registry(household: ShareType, marriage: ShareType, seed: u64) -> ProviderSpec {
    ProviderSpec {
        household,
        marriage,
        persons: 2_000,
        seed,
    }
}

/// The demo federation: Fujian province, Fuzhou and Xiamen, and three of their districts.
pub fn topology() -> Result<Vec<NodeSpec>> {
    use ShareType::{Conditional, NotShared, Unconditional};
    Ok(vec![
        NodeSpec::new(PROVINCE)?.consumer(1, "Fujian Provincial Public Security Department")?,
        NodeSpec::new(FUZHOU)?
            .consumer(1, "Fuzhou Health Commission")?
            .provider(
                2,
                "Fuzhou Civil Affairs Bureau",
                registry(Unconditional, Conditional, 3),
            )?,
        NodeSpec::new(XIAMEN)?.consumer(1, "Xiamen Market Regulation Administration")?,
        NodeSpec::new(GULOU)?
            .consumer(1, "Gulou Public Security Sub-bureau")?
            .provider(
                2,
                "Gulou Civil Affairs Bureau",
                registry(Unconditional, Conditional, 1),
            )?,
        NodeSpec::new(TAIJIANG)?.consumer(1, "Taijiang Social Security Bureau")?,
        NodeSpec::new(SIMING)?
            .consumer(1, "Siming Housing Bureau")?
            .provider(
                2,
                "Siming Civil Affairs Bureau",
                registry(Unconditional, NotShared, 2),
            )?,
    ])
}

/// One share the demo performs and what it expects.
struct Case {
    title: &'static str,
    consumer: &'static str,
    provider: &'static str,
    resource: &'static str,
    fields: &'static [&'static str],
    expect: Code,
}

const CASES: &[Case] = &[
    Case {
        title: "within a county",
        consumer: GULOU,
        provider: GULOU,
        resource: "household",
        fields: &["id_number", "name", "gender", "household_no"],
        expect: Code::Ok,
    },
    Case {
        title: "across counties of one city",
        consumer: TAIJIANG,
        provider: GULOU,
        resource: "household",
        fields: &["name", "birth_date", "address"],
        expect: Code::Ok,
    },
    Case {
        title: "across cities, county to county through the province",
        consumer: SIMING,
        provider: GULOU,
        resource: "household",
        fields: &["id_number", "name", "phone"],
        expect: Code::Ok,
    },
    Case {
        title: "province down to a county",
        consumer: PROVINCE,
        provider: SIMING,
        resource: "household",
        fields: &["name", "address"],
        expect: Code::Ok,
    },
    Case {
        title: "county up to a city",
        consumer: TAIJIANG,
        provider: FUZHOU,
        resource: "household",
        fields: &["name", "gender"],
        expect: Code::Ok,
    },
    Case {
        title: "conditional resource without approval",
        consumer: TAIJIANG,
        provider: GULOU,
        resource: "marriage",
        fields: &[],
        expect: Code::FailedPrecondition,
    },
    Case {
        title: "resource that is not shared",
        consumer: GULOU,
        provider: SIMING,
        resource: "marriage",
        fields: &[],
        expect: Code::PermissionDenied,
    },
];

/// Runs the demo and, with `keep_running`, leaves the federation up until Ctrl-C.
pub async fn run(keep_running: bool) -> Result<()> {
    // Every node serves its console on a loopback port of its own.
    let net = Devnet::start_configured(topology()?, Default::default(), |mut c| {
        c.console = Some(fedgate_gateway::console::ConsoleConfig {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        });
        c
    })
    .await?;
    println!(
        "federation up: {} nodes on loopback, data in {}",
        net.node_codes().len(),
        net.dir().display()
    );
    for c in net.node_codes() {
        let parent = net
            .node_config(c)?
            .parent
            .as_ref()
            .map(|p| p.code.clone())
            .unwrap_or_else(|| "-".into());
        println!("  node {c}  {}  parent {parent}", net.node_url(c)?);
    }
    let province = code(PROVINCE)?;
    let expected = net.published_entries() as u64;
    let took = net
        .wait_for_catalog(province, expected, Duration::from_secs(10))
        .await?;
    println!(
        "catalog: {expected} entries published by {} providers reached the province in {} ms",
        net.agencies().filter(|a| a.registry.is_some()).count(),
        took.as_millis()
    );

    let mut shares = 0;
    for (i, case) in CASES.iter().enumerate() {
        let consumer = net.consumer_at(code(case.consumer)?)?;
        let provider = net.provider_at(code(case.provider)?)?;
        let key = provider
            .registry
            .as_ref()
            .and_then(|r| r.sample_id(i).map(str::to_owned))
            .ok_or_else(|| anyhow!("provider {} has no records", provider.uscc))?;
        let resource = format!("{}:{}", case.provider, case.resource);
        println!();
        println!(
            "share {}: {} — {} ({}) asks for {resource}",
            i + 1,
            case.title,
            consumer.name,
            consumer.node
        );
        let mut client = net.client(&consumer.uscc).await?;
        let result = client
            .share(ShareRequest {
                request_id: String::new(),
                resource_id: resource.clone(),
                mode: ShareMode::Query as i32,
                key,
                fields: case.fields.iter().map(|f| (*f).to_owned()).collect(),
                purpose: "demo: verify residence for a service application".into(),
                ..Default::default()
            })
            .await;
        match result {
            Ok(resp) => {
                let resp = resp.into_inner();
                for hop in &resp.route {
                    println!(
                        "    {}  {:<15} peer {:<45} {:>7} µs",
                        hop.node_code, hop.action, hop.seen_peer, hop.elapsed_us
                    );
                }
                for r in &resp.records {
                    let mut fields: Vec<_> = r.values.iter().collect();
                    fields.sort();
                    let text: Vec<String> =
                        fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("    record: {}", text.join(", "));
                }
                if case.expect != Code::Ok {
                    bail!(
                        "share {} succeeded but {:?} was expected",
                        i + 1,
                        case.expect
                    );
                }
                shares += 1;
            }
            Err(status) => {
                println!("    refused: {:?}: {}", status.code(), status.message());
                if status.code() != case.expect {
                    bail!(
                        "share {} answered {:?} but {:?} was expected",
                        i + 1,
                        status.code(),
                        case.expect
                    );
                }
            }
        }
    }

    patterns::discovery(&net).await?;
    patterns::flow_back(&net).await?;
    patterns::demand(&net).await?;
    patterns::console(&net).await?;

    let at_province = net.catalog_size(province).await?;
    let nodes = net.node_codes().len();
    println!();
    if keep_running {
        print_usage(&net)?;
        crate::cli::shutdown_signal().await;
    }
    net.shutdown().await?;
    println!(
        "demo ok: {shares} shares, {nodes} nodes, {at_province} catalog entries at the province"
    );
    Ok(())
}

fn print_usage(net: &Devnet) -> Result<()> {
    let pki = net.dir().join("pki");
    println!("The federation keeps running; press Ctrl-C to stop it.");
    println!("CA certificate: {}", net.ca_path().display());
    for a in net.agencies() {
        println!(
            "  agency {} at node {} ({}): {}",
            a.uscc,
            a.node,
            a.name,
            if a.registry.is_some() {
                "provider"
            } else {
                "consumer"
            }
        );
    }
    let consumer = net.consumer_at(code(SIMING)?)?;
    let provider = net.provider_at(code(GULOU)?)?;
    let key = provider
        .registry
        .as_ref()
        .and_then(|r| r.sample_id(0).map(str::to_owned))
        .unwrap_or_default();
    println!(
        "Node configurations (for `fedgate status|report --config`): {}/node-<code>.toml",
        net.dir().display()
    );
    println!("Try, from another terminal:");
    println!(
        "  cargo run --release -p fedgate-node -- agency --node-addr {} --node-code {} --ca {} \\\n    --cert {} --key {} \\\n    share {GULOU}:household {key}",
        net.node_url(consumer.node)?,
        consumer.node,
        net.ca_path().display(),
        pki.join(format!("agency-{}.crt", consumer.uscc)).display(),
        pki.join(format!("agency-{}.key", consumer.uscc)).display(),
    );
    Ok(())
}
