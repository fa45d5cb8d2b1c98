//! The exchange patterns beyond single shares that the demo shows: a county searching the whole province's
//! catalog, a flow-back subscription delivering a first export and then a change, a data demand answered, and
//! the web console with an account to sign in with.

use std::time::Duration;

use super::{FUZHOU, GULOU, PROVINCE, SIMING, TAIJIANG, code};
use crate::devnet::Devnet;
use anyhow::{Result, anyhow, bail};
use fedgate_proto::v1::{
    AnswerDemandRequest, ApplyRequest, AssignDemandRequest, DemandState, FileDemandRequest,
    GetDemandRequest, GetEntryRequest, PublishEntryRequest, ReadSubscriptionRequest,
    SearchCatalogRequest, ShareMode, ShareType, SubscribeRequest, SubscriptionItem,
    subscription_item,
};

/// Longest the demo waits for a subscription's items to arrive.
const DELIVERY_WAIT: Duration = Duration::from_secs(30);

/// A county agency searches the whole province's catalog in Chinese and reads an entry of another city.
pub async fn discovery(net: &Devnet) -> Result<()> {
    let consumer = net.consumer_at(code(SIMING)?)?;
    println!();
    println!(
        "discovery: {} ({}) searches the province's catalog for 婚姻 (marriage)",
        consumer.name, consumer.node
    );
    let mut client = net.client(&consumer.uscc).await?;
    let found = client
        .search_catalog(SearchCatalogRequest {
            text: "婚姻".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    for e in &found.entries {
        println!(
            "    {:<18} {:<40} {:?}",
            e.id,
            e.title,
            ShareType::try_from(e.share_type).unwrap_or_default()
        );
    }
    if !found
        .entries
        .iter()
        .any(|e| !e.node_code.starts_with(&SIMING[..4]))
    {
        bail!("a search from {SIMING} found no entry outside its own city");
    }
    let id = format!("{GULOU}:marriage");
    let entry = client
        .get_entry(GetEntryRequest { id: id.clone() })
        .await?
        .into_inner();
    println!(
        "    read {id} from {SIMING}: version {}, fields {}",
        entry.version,
        entry
            .fields
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// A county agency subscribes to a city's register under a bulk grant: the first export arrives, then a change
/// the provider makes.
pub async fn flow_back(net: &Devnet) -> Result<()> {
    let consumer = net.consumer_at(code(TAIJIANG)?)?;
    let provider = net.provider_at(code(FUZHOU)?)?;
    let resource = format!("{FUZHOU}:household");
    println!();
    println!(
        "flow-back: {} ({}) subscribes to {resource}",
        consumer.name, consumer.node
    );
    let mut client = net.client(&consumer.uscc).await?;
    let fields: Vec<String> = ["id_number", "address", "household_no"]
        .map(String::from)
        .into();
    let application = client
        .apply(ApplyRequest {
            resource_id: resource.clone(),
            purpose: "demo: keep a local copy of residents' addresses".into(),
            scenario: "flow-back of household data".into(),
            fields: fields.clone(),
            mode: ShareMode::Bulk as i32,
            requested_expires_at: 0,
        })
        .await?
        .into_inner();
    let grant = application
        .grant
        .ok_or_else(|| anyhow!("application {} was not granted", application.id))?;
    let sub = client
        .subscribe(SubscribeRequest {
            resource_id: resource.clone(),
            grant: Some(grant),
            fields,
            purpose: String::new(),
        })
        .await?
        .into_inner();
    let persons = provider.registry.as_ref().map_or(0, |r| r.persons().len());
    let first = read_items(net, &consumer.uscc, &sub.id, 0, persons).await?;
    let sample = first.iter().find_map(|i| match &i.body {
        Some(subscription_item::Body::Upsert(r)) => Some(r),
        _ => None,
    });
    println!(
        "    subscription {}: first export of {} records delivered to {TAIJIANG}",
        sub.id,
        first.len()
    );
    if let Some(r) = sample {
        println!("    record: {}", show(r));
    }
    let key = provider
        .registry
        .as_ref()
        .and_then(|r| r.sample_id(7).map(str::to_owned))
        .ok_or_else(|| anyhow!("provider {} has no records", provider.uscc))?;
    let service = provider
        .provider
        .as_ref()
        .ok_or_else(|| anyhow!("{} serves no registry", provider.uscc))?;
    if !service.edit(&key, |p| p.household_no = format!("{FUZHOU}-moved-7")) {
        bail!("no resident {key} to change");
    }
    println!("    the provider changes one resident's household number");
    let last = first.last().map_or(0, |i| i.seq);
    let change = read_items(net, &consumer.uscc, &sub.id, last, 1).await?;
    for i in &change {
        if let Some(subscription_item::Body::Upsert(r)) = &i.body {
            println!("    change {} delivered: {}", i.seq, show(r));
        }
    }
    Ok(())
}

/// Reads `count` items of subscription `id` after `after` at the subscriber's node.
async fn read_items(
    net: &Devnet,
    uscc: &fedgate_gateway::ident::Uscc,
    id: &str,
    after: u64,
    count: usize,
) -> Result<Vec<SubscriptionItem>> {
    let mut client = net.client(uscc).await?;
    let mut stream = client
        .read_subscription(ReadSubscriptionRequest {
            subscription_id: id.to_owned(),
            after_seq: after,
        })
        .await?
        .into_inner();
    let mut items = Vec::new();
    let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
    while items.len() < count {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(batch))) => items.extend(batch.items),
            Ok(Err(status)) => bail!("subscription {id}: {status}"),
            Ok(Ok(None)) => bail!("subscription {id} ended after {} items", items.len()),
            Err(_) => bail!(
                "subscription {id}: {} of {count} items within {DELIVERY_WAIT:?}",
                items.len()
            ),
        }
    }
    Ok(items)
}

fn show(r: &fedgate_proto::v1::Record) -> String {
    let mut fields: Vec<_> = r.values.iter().collect();
    fields.sort();
    fields
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A county agency files a data demand; the province's operator assigns it to a district's civil affairs
/// bureau, which publishes an entry for it and answers with it.
pub async fn demand(net: &Devnet) -> Result<()> {
    let consumer = net.consumer_at(code(SIMING)?)?;
    let provider = net.provider_at(code(GULOU)?)?;
    println!();
    println!(
        "demand: {} ({}) asks for data no catalog entry offers yet",
        consumer.name, consumer.node
    );
    let mut client = net.client(&consumer.uscc).await?;
    let filed = client
        .file_demand(FileDemandRequest {
            title: "Household members by address (户籍地址)".into(),
            description: "Registered residents per address, to plan housing inspections".into(),
            purpose: "demo: housing safety inspections".into(),
            legal_basis: "Urban Housing Safety Regulations, art. 8".into(),
            fields: ["address", "household_no"].map(String::from).into(),
            share_type: ShareType::Conditional as i32,
        })
        .await?
        .into_inner();
    println!(
        "    filed {} at the province, to be assigned by {}",
        filed.id,
        when(filed.assign_due_at)
    );
    let (_, mut operator) =
        crate::cli::operator_client(&net.dir().join(format!("node-{PROVINCE}.toml"))).await?;
    let assigned = operator
        .assign_demand(AssignDemandRequest {
            demand_id: filed.id.clone(),
            provider_uscc: provider.uscc.to_string(),
            provider_node: provider.node.to_string(),
            note: "the district keeps the household register".into(),
        })
        .await?
        .into_inner();
    println!(
        "    the province's operator assigns it to {} ({})",
        provider.name, assigned.provider_node
    );
    let mut entry = provider
        .published
        .iter()
        .find(|e| e.id.ends_with(":household"))
        .cloned()
        .ok_or_else(|| anyhow!("{} published no household entry", provider.uscc))?;
    entry.id = "household-by-address".into();
    entry.title = "Household members by address (户籍地址)".into();
    entry.node_code.clear();
    entry.version = 0;
    entry.updated_at.clear();
    let expected = net.catalog_size(code(PROVINCE)?).await? + 1;
    let mut provider_client = net.client(&provider.uscc).await?;
    let published = provider_client
        .publish_entry(PublishEntryRequest { entry: Some(entry) })
        .await?
        .into_inner()
        .entry
        .ok_or_else(|| anyhow!("the node answered no entry"))?;
    net.wait_for_catalog(code(PROVINCE)?, expected, Duration::from_secs(10))
        .await?;
    let answered = provider_client
        .answer_demand(AnswerDemandRequest {
            demand_id: filed.id.clone(),
            resource_id: published.id.clone(),
            refusal: String::new(),
            note: "published for this demand".into(),
        })
        .await?
        .into_inner();
    let seen = client
        .get_demand(GetDemandRequest { id: answered.id })
        .await?
        .into_inner();
    if seen.state != DemandState::Answered as i32 {
        bail!("demand {} is {:?}, not answered", seen.id, seen.state());
    }
    println!(
        "    the provider publishes {} and answers with it; {} sees it {:?}",
        published.id,
        consumer.name,
        seen.state()
    );
    Ok(())
}

fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Makes a reviewer account for the provider at Gulou and an operator account at the province, and prints where
/// their consoles are and how to sign in.
pub async fn console(net: &Devnet) -> Result<()> {
    use fedgate_gateway::ident::Peer;
    use fedgate_proto::v1::{AddUserRequest, ConsoleRole};
    println!();
    println!("console: each node serves its web console over TLS with its federation certificate");
    let provider = net.provider_at(code(GULOU)?)?;
    let accounts = [
        (
            GULOU,
            "350102-rv-001",
            "林晓",
            ConsoleRole::Reviewer,
            provider.uscc.to_string(),
        ),
        (
            PROVINCE,
            "350000-op-001",
            "陈伟",
            ConsoleRole::Operator,
            String::new(),
        ),
    ];
    for (node, login, name, role, agency) in accounts {
        let c = code(node)?;
        let handle = net.node(c)?;
        let addr = handle
            .console_addr()
            .ok_or_else(|| anyhow!("node {node} serves no console"))?;
        let creds = handle
            .console()
            .accounts()
            .add(
                AddUserRequest {
                    login: login.into(),
                    name: name.into(),
                    role: role as i32,
                    agency_uscc: agency.clone(),
                    totp: false,
                },
                &Peer::Node(c),
            )
            .await?;
        println!(
            "    node {node}: https://{addr}/  sign in as {login} ({name}, {}{}) with password {}",
            fedgate_gateway::console::accounts::role_name(role as i32),
            if agency.is_empty() {
                String::new()
            } else {
                format!(" for {agency}")
            },
            creds.password
        );
    }
    println!(
        "    the certificate is issued for <code>.node.fedgate by the demo's CA ({}): trust it, or accept it once",
        net.ca_path().display()
    );
    Ok(())
}
