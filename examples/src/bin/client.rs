//! `agency-client`: searches its node's catalog, shows entries and requests data, printing the route taken.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use fedgate_examples::{connect_agency, describe_status};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    CatalogEntry, GetEntryRequest, MaskRule, SearchCatalogRequest, Sensitivity, ShareMode,
    ShareRequest, ShareType,
};
use tonic::transport::Channel;

/// Largest number of catalog pages `search` follows.
const MAX_PAGES: usize = 100;

/// Command line of the agency client.
#[derive(Debug, Parser)]
#[command(name = "agency-client", version, about)]
struct Args {
    /// Address of the node's Agency service.
    #[arg(long, global = true, default_value = "https://127.0.0.1:7400")]
    node_addr: String,
    /// Division code of the node; its certificate must name CODE.node.fedgate.
    #[arg(long, global = true, default_value = "350102")]
    node_code: String,
    /// Federation CA certificate (PEM).
    #[arg(long, global = true, default_value = "ca.crt")]
    ca: PathBuf,
    /// This agency's certificate (PEM).
    #[arg(long, global = true, default_value = "agency.crt")]
    cert: PathBuf,
    /// This agency's private key (PEM).
    #[arg(long, global = true, default_value = "agency.key")]
    key: PathBuf,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The client's subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Searches the node's subtree catalog.
    Search {
        /// Words that must all occur in the title or summary.
        #[arg(long, default_value = "")]
        text: String,
        /// Only entries held by this node or, for a city or province code, by a node under it.
        #[arg(long, default_value = "")]
        node: String,
    },
    /// Shows one catalog entry in full.
    Get {
        /// Full resource id, e.g. 350102:household.
        resource_id: String,
    },
    /// Requests the records of a resource matching a key, and shows the route the request took.
    Share {
        /// Full resource id, e.g. 350102:household.
        resource_id: String,
        /// Value of the resource's key field, e.g. an ID number.
        key: String,
        /// Fields wanted, comma separated; all the grant allows when omitted.
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
        /// Business purpose of the request.
        #[arg(long, default_value = "")]
        purpose: String,
    },
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} from {}", path.display()))
}

/// Turns a gRPC status into an error naming the call and the code.
fn grpc(call: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow!("{call} failed: {}", describe_status(&s))
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let ca = read(&args.ca, "CA certificate")?;
    let cert = read(&args.cert, "agency certificate")?;
    let key = read(&args.key, "agency key")?;
    let mut client = connect_agency(&args.node_addr, &args.node_code, ca, cert, key)
        .await
        .with_context(|| {
            format!(
                "connecting to node {} at {}",
                args.node_code, args.node_addr
            )
        })?;
    match args.command {
        Command::Search { text, node } => search(&mut client, text, node).await,
        Command::Get { resource_id } => get(&mut client, resource_id).await,
        Command::Share {
            resource_id,
            key,
            fields,
            purpose,
        } => share(&mut client, resource_id, key, fields, purpose).await,
    }
}

async fn search(client: &mut AgencyClient<Channel>, text: String, node: String) -> Result<()> {
    let mut page_token = String::new();
    let mut total = 0usize;
    for _ in 0..MAX_PAGES {
        let response = client
            .search_catalog(SearchCatalogRequest {
                text: text.clone(),
                node_code: node.clone(),
                page_token: page_token.clone(),
                ..SearchCatalogRequest::default()
            })
            .await
            .map_err(grpc("SearchCatalog"))?
            .into_inner();
        for e in &response.entries {
            println!(
                "{:<32} v{:<4} {:<14} {:<18} {}",
                e.id,
                e.version,
                share_type_name(e.share_type),
                e.provider_uscc,
                e.title
            );
        }
        total += response.entries.len();
        if response.next_page_token.is_empty() {
            println!("{total} entries");
            return Ok(());
        }
        page_token = response.next_page_token;
    }
    println!("{total} entries (stopped after {MAX_PAGES} pages)");
    Ok(())
}

async fn get(client: &mut AgencyClient<Channel>, id: String) -> Result<()> {
    let entry = client
        .get_entry(GetEntryRequest { id })
        .await
        .map_err(grpc("GetEntry"))?
        .into_inner();
    print_entry(&entry);
    Ok(())
}

async fn share(
    client: &mut AgencyClient<Channel>,
    resource_id: String,
    key: String,
    fields: Vec<String>,
    purpose: String,
) -> Result<()> {
    let fields = fields
        .into_iter()
        .map(|f| f.trim().to_owned())
        .filter(|f| !f.is_empty())
        .collect();
    let response = client
        .share(ShareRequest {
            resource_id,
            mode: ShareMode::Query as i32,
            key,
            fields,
            purpose,
            ..ShareRequest::default()
        })
        .await
        .map_err(grpc("Share"))?
        .into_inner();
    println!(
        "request {} on {} (entry v{}): {} record(s)",
        response.request_id,
        response.resource_id,
        response.entry_version,
        response.records.len()
    );
    for (i, record) in response.records.iter().enumerate() {
        println!("record {}:", i + 1);
        let mut values: Vec<_> = record.values.iter().collect();
        values.sort();
        for (name, value) in values {
            println!("  {name:<20} {value}");
        }
    }
    println!("route:");
    for (i, hop) in response.route.iter().enumerate() {
        println!(
            "  {:>2}. node {:<6} {:<15} peer {:<40} {:>8} us",
            i + 1,
            hop.node_code,
            hop.action,
            hop.seen_peer,
            hop.elapsed_us
        );
    }
    Ok(())
}

fn share_type_name(value: i32) -> &'static str {
    match ShareType::try_from(value) {
        Ok(ShareType::Unconditional) => "unconditional",
        Ok(ShareType::Conditional) => "conditional",
        Ok(ShareType::NotShared) => "not-shared",
        _ => "unspecified",
    }
}

fn print_entry(e: &CatalogEntry) {
    println!("id:                 {}", e.id);
    println!("title:              {}", e.title);
    println!("summary:            {}", e.summary);
    println!("provider:           {}", e.provider_uscc);
    println!("node:               {}", e.node_code);
    println!("classification:     {}", e.classification.join(" / "));
    println!("format:             {}", e.format);
    println!("share type:         {}", share_type_name(e.share_type));
    let modes: Vec<_> = e
        .share_modes
        .iter()
        .map(|m| {
            ShareMode::try_from(*m)
                .map(|m| m.as_str_name())
                .unwrap_or("?")
        })
        .collect();
    println!("share modes:        {}", modes.join(", "));
    println!("usage requirements: {}", e.usage_requirements);
    println!("open:               {}", e.open);
    println!("update frequency:   {}", e.update_frequency);
    println!("key field:          {}", e.key_field);
    println!("version:            {} ({})", e.version, e.updated_at);
    if !e.related.is_empty() {
        println!("related:            {}", e.related.join(", "));
    }
    println!("fields:");
    for f in &e.fields {
        let sensitivity = Sensitivity::try_from(f.sensitivity)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        let mask = MaskRule::try_from(f.mask)
            .map(|m| m.as_str_name())
            .unwrap_or("?");
        println!(
            "  {:<20} {:<8} {:<22} {:<20} {}",
            f.name, f.data_type, sensitivity, mask, f.description
        );
    }
}
