//! The agency command line: catalog, shares in every mode, applications, grants, objections and data demands.
//!
//! [`AgencyArgs`] holds the connection flags and the subcommand; [`run`] connects to the node's
//! `fedgate.v1.Agency` service and carries the subcommand out. The `agency-client` binary and `fedgate agency`
//! both parse [`AgencyArgs`] and call [`run`], so the two behave alike.
//!
//! As a consumer an agency searches the catalog, shows entries, requests data in every share mode (query,
//! verify, statistics, bulk), applies for grants and files objections; as a provider it lists, approves and
//! rejects applications, revokes grants and answers objections; `demand …` files, follows and answers data
//! demands (see [`DemandCommand`]). Grants are kept in files holding the prost encoding of a `SignedGrant`:
//! `apply`/`application --grant-out` write them, `--grant-file` sends one with a request.
//!
//! Like every TLS function of this crate, [`run`] needs the rustls ring provider installed (see the crate
//! documentation).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{
    connect_agency, decode_grant, describe_status, read_signed_grant, record_json,
    write_signed_grant,
};
use anyhow::{Context, Result, anyhow, bail};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    Application, ApplicationState, ApplyRequest, CatalogEntry, DecideRequest, FileObjectionRequest,
    GetApplicationRequest, GetEntryRequest, GetObjectionRequest, Hop, ListApplicationsRequest,
    ListObjectionsRequest, MaskRule, Objection, ObjectionState, ResolveObjectionRequest,
    RevokeRequest, SearchCatalogRequest, Sensitivity, ShareMode, ShareRequest, ShareResponse,
    ShareType, SignedGrant, VerifyResult,
};
use tonic::transport::Channel;

mod demand;
mod flowback;
mod own_view;

pub use demand::{DemandCommand, print_demand, state_name};
pub use flowback::FlowbackCommand;

/// Largest number of catalog pages `search` follows.
const MAX_PAGES: usize = 100;

/// Seconds in a day, for `--days`.
const DAY: i64 = 86_400;

/// Command line of an agency: how to reach its node, and what to do there.
///
/// The connection flags are global, so they may be given before or after the subcommand.
#[derive(Debug, Clone, Args)]
pub struct AgencyArgs {
    /// Address of the node's Agency service; for a node running as replicas, their addresses separated by commas.
    #[arg(long, global = true, default_value = "https://127.0.0.1:7400")]
    pub node_addr: String,
    /// Division code of the node; its certificate must name CODE.node.fedgate.
    #[arg(long, global = true, default_value = "350102")]
    pub node_code: String,
    /// Federation CA certificate (PEM).
    #[arg(long, global = true, default_value = "ca.crt")]
    pub ca: PathBuf,
    /// This agency's certificate (PEM).
    #[arg(long, global = true, default_value = "agency.crt")]
    pub cert: PathBuf,
    /// This agency's private key (PEM).
    // Its own id: the subcommands' positional `key` (a record key) would otherwise collide with this global.
    #[arg(
        long = "key",
        id = "key_file",
        value_name = "KEY_FILE",
        global = true,
        default_value = "agency.key"
    )]
    pub key: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Share mode as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Records matching a key.
    Query,
    /// Per-field comparison of supplied values; stored values never leave.
    Verify,
    /// Counts over the provider's statistics dimensions.
    Statistics,
    /// A paged export of a granted slice.
    Bulk,
}

impl From<Mode> for ShareMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Query => ShareMode::Query,
            Mode::Verify => ShareMode::Verify,
            Mode::Statistics => ShareMode::Statistics,
            Mode::Bulk => ShareMode::Bulk,
        }
    }
}

/// What an agency can do at its node.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Flow-back subscriptions (subscribe, subscriptions, read-subscription).
    #[command(flatten)]
    Flowback(FlowbackCommand),
    /// Searches the province's catalog (answered by the lowest node whose subtree covers the search).
    Search {
        /// Words that must all occur in the title or summary.
        #[arg(long, default_value = "")]
        text: String,
        /// Only entries held by this node or, for a city or province code, by a node under it.
        #[arg(long, default_value = "")]
        node: String,
    },
    /// Lists the applications this agency filed through its node, with their state and deadline.
    MyApplications(own_view::MyApplicationsArgs),
    /// Lists the grants this agency holds, with expiry, remaining validity and revocation.
    Grants(own_view::GrantsArgs),
    /// Shows what this agency was told: grants revoked or about to expire, applications decided.
    Notices(own_view::NoticesArgs),
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
        /// Grant to request under: a file written by `apply` or `application --grant-out`.
        #[arg(long)]
        grant_file: Option<PathBuf>,
    },
    /// Checks supplied values against the record of a key; prints MATCH, MISMATCH or NO_RECORD per field.
    Verify {
        /// Full resource id, e.g. 350102:household.
        resource_id: String,
        /// Value of the resource's key field, e.g. an ID number.
        key: String,
        /// A value to check, FIELD=VALUE; repeat for several fields.
        #[arg(long = "value", value_name = "FIELD=VALUE", required = true, value_parser = parse_field_value)]
        values: Vec<(String, String)>,
        /// Business purpose of the request.
        #[arg(long, default_value = "")]
        purpose: String,
        /// Grant to request under (verify needs one).
        #[arg(long)]
        grant_file: Option<PathBuf>,
    },
    /// Counts the records of a resource, grouped by some of its statistics dimensions.
    Stats {
        /// Full resource id, e.g. 350102:marriage.
        resource_id: String,
        /// Dimensions to group by, comma separated; one total when omitted.
        #[arg(long, value_delimiter = ',')]
        group_by: Vec<String>,
        /// Business purpose of the request.
        #[arg(long, default_value = "")]
        purpose: String,
        /// Grant to request under (statistics needs one).
        #[arg(long)]
        grant_file: Option<PathBuf>,
    },
    /// Exports a granted slice page by page as JSON lines; prints the token to resume from.
    Bulk {
        /// Full resource id, e.g. 350102:household.
        resource_id: String,
        /// Fields wanted, comma separated; all the grant allows when omitted.
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
        /// Records per page, at most 5000; the node's default (1000) when omitted.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=5000))]
        page_size: Option<u32>,
        /// Page token to resume from, as printed by an interrupted export; --out is then appended to.
        #[arg(long, default_value = "")]
        from_token: String,
        /// Business purpose of the request.
        #[arg(long, default_value = "")]
        purpose: String,
        /// Grant to request under (bulk needs one).
        #[arg(long)]
        grant_file: Option<PathBuf>,
        /// File to write the records to, one JSON object per line; standard output when omitted.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Applies for a grant on a resource; prints the application and saves the grant if approved at once.
    Apply {
        /// Full resource id, e.g. 350102:marriage.
        resource_id: String,
        /// Business purpose the data will be used for.
        #[arg(long)]
        purpose: String,
        /// Business scenario the data serves.
        #[arg(long)]
        scenario: String,
        /// Fields wanted, comma separated; all the mode uses when omitted.
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
        /// Mode wanted.
        #[arg(long, value_enum, default_value_t = Mode::Query)]
        mode: Mode,
        /// Validity wanted, in days from now; the provider's default (one year) when omitted.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: Option<u32>,
        /// File to write the signed grant to when the application is approved at once.
        #[arg(long)]
        grant_out: Option<PathBuf>,
    },
    /// Shows one application; saves its grant if it was approved.
    Application {
        /// Application id, e.g. 350102-a-1.
        id: String,
        /// File to write the signed grant to, if the application was approved.
        #[arg(long)]
        grant_out: Option<PathBuf>,
    },
    /// Lists the applications at the node for resources this agency provides, or filed by it there.
    Applications {
        /// Only applications still waiting for a decision.
        #[arg(long)]
        pending: bool,
        /// Only applications past their deadline.
        #[arg(long)]
        overdue: bool,
    },
    /// Approves or rejects an application for a resource this agency provides.
    #[command(group(ArgGroup::new("decision").required(true).args(["approve", "reject"])))]
    Decide {
        /// Application id, e.g. 350102-a-1.
        id: String,
        /// Approve the application.
        #[arg(long)]
        approve: bool,
        /// Reject the application (needs --reason).
        #[arg(long)]
        reject: bool,
        /// On approval: fields granted, comma separated, a subset of those asked; all asked when omitted.
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
        /// On approval: mode granted; the one asked when omitted.
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// On approval: validity in days from now, not beyond what was asked; as asked when omitted.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: Option<u32>,
        /// Reason of a rejection, or note of an approval.
        #[arg(long, default_value = "")]
        reason: String,
        /// On approval: fields whose clear value is allowed despite their masking rule, comma separated.
        #[arg(long, value_delimiter = ',')]
        clear: Vec<String>,
    },
    /// Revokes a grant this agency's resource was shared under.
    Revoke {
        /// Grant id, e.g. 350102-g-1.
        grant_id: String,
        /// Why it is revoked.
        #[arg(long)]
        reason: String,
    },
    /// Files an objection against a record of a resource.
    Object {
        /// Full resource id, e.g. 350102:household.
        resource_id: String,
        /// Key of the record objected to.
        key: String,
        /// What is wrong.
        #[arg(long)]
        description: String,
        /// Evidence offered.
        #[arg(long, default_value = "")]
        evidence: String,
    },
    /// Shows one objection.
    Objection {
        /// Objection id, e.g. 350102-o-1.
        id: String,
    },
    /// Lists the objections at the node against resources this agency provides.
    Objections {
        /// Only objections past their deadline.
        #[arg(long)]
        overdue: bool,
    },
    /// Answers an objection against a resource this agency provides.
    #[command(group(ArgGroup::new("outcome").required(true).args(["corrected", "confirmed"])))]
    Resolve {
        /// Objection id, e.g. 350102-o-1.
        id: String,
        /// The record was wrong and has been corrected.
        #[arg(long)]
        corrected: bool,
        /// The record was checked and is right.
        #[arg(long)]
        confirmed: bool,
        /// The answer to the objector.
        #[arg(long)]
        resolution: String,
    },
    /// Data demands (supply–demand matching): file, list, show, answer, refuse.
    Demand {
        /// What to do.
        #[command(subcommand)]
        command: DemandCommand,
    },
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} from {}", path.display()))
}

/// Turns a gRPC status into an error naming the call and the code.
fn grpc(call: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow!("{call} failed: {}", describe_status(&s))
}

/// Parses `FIELD=VALUE` (the value may be empty or contain `=`).
fn parse_field_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((field, value)) if !field.trim().is_empty() => {
            Ok((field.trim().to_owned(), value.to_owned()))
        }
        Some(_) => Err(format!("{s:?} has no field name before '='")),
        None => Err(format!("{s:?} is not FIELD=VALUE")),
    }
}

/// The non-empty, trimmed items of a comma-separated list.
fn clean(list: Vec<String>) -> Vec<String> {
    list.into_iter()
        .map(|f| f.trim().to_owned())
        .filter(|f| !f.is_empty())
        .collect()
}

/// Reads the grant file given with `--grant-file`, if any.
fn grant_from(path: Option<&Path>) -> Result<Option<SignedGrant>> {
    path.map(|p| {
        read_signed_grant(p).with_context(|| format!("reading the grant from {}", p.display()))
    })
    .transpose()
}

/// Seconds since the Unix epoch.
fn now() -> Result<i64> {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    i64::try_from(elapsed.as_secs()).context("the system clock is out of range")
}

/// `days` days from now, in seconds since the Unix epoch; 0 (the default) when not given.
fn expiry(days: Option<u32>) -> Result<i64> {
    match days {
        Some(d) => Ok(now()? + i64::from(d) * DAY),
        None => Ok(0),
    }
}

/// Connects to the node named by `args` and carries out its subcommand, printing the outcome.
///
/// Results go to standard output (a bulk export to standard output sends its progress to standard error).
///
/// # Errors
///
/// When a certificate or key file cannot be read, the node cannot be reached, the node refuses the call (the
/// error names the call and the gRPC code), or a file cannot be read or written.
pub async fn run(args: AgencyArgs) -> Result<()> {
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
    let c = &mut client;
    match args.command {
        Command::Flowback(command) => flowback::run(c, command).await,
        Command::Search { text, node } => search(c, text, node).await,
        Command::Get { resource_id } => get(c, resource_id).await,
        Command::MyApplications(a) => own_view::my_applications(c, a).await,
        Command::Grants(a) => own_view::grants(c, a).await,
        Command::Notices(a) => own_view::notices(c, a).await,
        Command::Share {
            resource_id,
            key,
            fields,
            purpose,
            grant_file,
        } => {
            let request = ShareRequest {
                resource_id,
                mode: ShareMode::Query as i32,
                key,
                fields: clean(fields),
                purpose,
                grant: grant_from(grant_file.as_deref())?,
                ..ShareRequest::default()
            };
            share(c, request).await
        }
        Command::Verify {
            resource_id,
            key,
            values,
            purpose,
            grant_file,
        } => {
            let mut verify_values = HashMap::new();
            for (field, value) in values {
                if verify_values.insert(field.clone(), value).is_some() {
                    bail!("--value {field}=... is given twice");
                }
            }
            let request = ShareRequest {
                resource_id,
                mode: ShareMode::Verify as i32,
                key,
                purpose,
                grant: grant_from(grant_file.as_deref())?,
                verify_values,
                ..ShareRequest::default()
            };
            verify(c, request).await
        }
        Command::Stats {
            resource_id,
            group_by,
            purpose,
            grant_file,
        } => {
            let request = ShareRequest {
                resource_id,
                mode: ShareMode::Statistics as i32,
                purpose,
                grant: grant_from(grant_file.as_deref())?,
                group_by: clean(group_by),
                ..ShareRequest::default()
            };
            stats(c, request).await
        }
        Command::Bulk {
            resource_id,
            fields,
            page_size,
            from_token,
            purpose,
            grant_file,
            out,
        } => {
            let request = ShareRequest {
                resource_id,
                mode: ShareMode::Bulk as i32,
                fields: clean(fields),
                purpose,
                grant: grant_from(grant_file.as_deref())?,
                page_token: from_token.trim().to_owned(),
                page_size: page_size.unwrap_or(0),
                ..ShareRequest::default()
            };
            bulk(c, request, out.as_deref()).await
        }
        Command::Apply {
            resource_id,
            purpose,
            scenario,
            fields,
            mode,
            days,
            grant_out,
        } => {
            let request = ApplyRequest {
                resource_id,
                purpose,
                scenario,
                fields: clean(fields),
                mode: ShareMode::from(mode) as i32,
                requested_expires_at: expiry(days)?,
            };
            let application = c.apply(request).await.map_err(grpc("Apply"))?.into_inner();
            print_application(&application);
            save_grant(&application, grant_out.as_deref())
        }
        Command::Application { id, grant_out } => {
            let application = c
                .get_application(GetApplicationRequest { id })
                .await
                .map_err(grpc("GetApplication"))?
                .into_inner();
            print_application(&application);
            save_grant(&application, grant_out.as_deref())
        }
        Command::Applications { pending, overdue } => {
            let state = if pending {
                ApplicationState::Pending
            } else {
                ApplicationState::Unspecified
            };
            let list = c
                .list_applications(ListApplicationsRequest {
                    state: state as i32,
                    overdue_only: overdue,
                })
                .await
                .map_err(grpc("ListApplications"))?
                .into_inner()
                .applications;
            for a in &list {
                println!(
                    "{:<18} {:<8}{:<8} {:<26} {:<10} {:<18} filed {} due {}",
                    a.id,
                    application_state_name(a.state),
                    if a.overdue { " OVERDUE" } else { "" },
                    a.resource_id,
                    mode_name(a.mode),
                    a.consumer_uscc,
                    utc(a.filed_at),
                    utc(a.due_at),
                );
            }
            println!("{} application(s)", list.len());
            Ok(())
        }
        Command::Decide {
            id,
            approve,
            reject: _,
            fields,
            mode,
            days,
            reason,
            clear,
        } => {
            if !approve && reason.trim().is_empty() {
                bail!("--reject needs --reason: the applicant is told why");
            }
            let request = DecideRequest {
                application_id: id,
                approve,
                fields: clean(fields),
                mode: mode.map_or(ShareMode::Unspecified, ShareMode::from) as i32,
                expires_at: expiry(days)?,
                reason,
                clear_fields: clean(clear),
            };
            let application = c
                .decide(request)
                .await
                .map_err(grpc("Decide"))?
                .into_inner();
            print_application(&application);
            Ok(())
        }
        Command::Revoke { grant_id, reason } => {
            let response = c
                .revoke(RevokeRequest {
                    grant_id: grant_id.clone(),
                    reason,
                })
                .await
                .map_err(grpc("Revoke"))?
                .into_inner();
            println!("grant {grant_id} revoked");
            if response.notified_nodes.is_empty() {
                println!("no other node acknowledged the revocation");
            } else {
                println!(
                    "acknowledged by nodes: {}",
                    response.notified_nodes.join(", ")
                );
            }
            Ok(())
        }
        Command::Object {
            resource_id,
            key,
            description,
            evidence,
        } => {
            let objection = c
                .file_objection(FileObjectionRequest {
                    resource_id,
                    key,
                    description,
                    evidence,
                })
                .await
                .map_err(grpc("FileObjection"))?
                .into_inner();
            print_objection(&objection);
            Ok(())
        }
        Command::Objection { id } => {
            let objection = c
                .get_objection(GetObjectionRequest { id })
                .await
                .map_err(grpc("GetObjection"))?
                .into_inner();
            print_objection(&objection);
            Ok(())
        }
        Command::Objections { overdue } => {
            let list = c
                .list_objections(ListObjectionsRequest {
                    state: ObjectionState::Unspecified as i32,
                    overdue_only: overdue,
                })
                .await
                .map_err(grpc("ListObjections"))?
                .into_inner()
                .objections;
            for o in &list {
                println!(
                    "{:<18} {:<9}{:<8} {:<26} {:<20} {:<18} filed {} due {}",
                    o.id,
                    objection_state_name(o.state),
                    if o.overdue { " OVERDUE" } else { "" },
                    o.resource_id,
                    o.key,
                    o.consumer_uscc,
                    utc(o.filed_at),
                    utc(o.due_at),
                );
            }
            println!("{} objection(s)", list.len());
            Ok(())
        }
        Command::Resolve {
            id,
            corrected,
            confirmed: _,
            resolution,
        } => {
            let objection = c
                .resolve_objection(ResolveObjectionRequest {
                    objection_id: id,
                    corrected,
                    resolution,
                })
                .await
                .map_err(grpc("ResolveObjection"))?
                .into_inner();
            print_objection(&objection);
            Ok(())
        }
        Command::Demand { command } => demand::run(c, command).await,
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
            println!(
                "{total} entries (answered by node {})",
                response.answered_by
            );
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

/// The first line of every share answer: request id, resource, entry version, grant and cache.
fn print_header(response: &ShareResponse, what: &str) {
    let grant = if response.grant_id.is_empty() {
        String::new()
    } else {
        format!(", grant {}", response.grant_id)
    };
    let cached = if response.from_cache {
        ", from the node's cache"
    } else {
        ""
    };
    println!(
        "request {} on {} (entry v{}{grant}{cached}): {what}",
        response.request_id, response.resource_id, response.entry_version,
    );
}

fn print_route(route: &[Hop]) {
    println!("route:");
    for (i, hop) in route.iter().enumerate() {
        println!(
            "  {:>2}. node {:<6} {:<15} peer {:<40} {:>8} us",
            i + 1,
            hop.node_code,
            hop.action,
            hop.seen_peer,
            hop.elapsed_us
        );
    }
}

async fn share(client: &mut AgencyClient<Channel>, request: ShareRequest) -> Result<()> {
    let response = client
        .share(request)
        .await
        .map_err(grpc("Share"))?
        .into_inner();
    print_header(&response, &format!("{} record(s)", response.records.len()));
    for (i, record) in response.records.iter().enumerate() {
        println!("record {}:", i + 1);
        let mut values: Vec<_> = record.values.iter().collect();
        values.sort();
        for (name, value) in values {
            println!("  {name:<20} {value}");
        }
    }
    print_route(&response.route);
    Ok(())
}

async fn verify(client: &mut AgencyClient<Channel>, request: ShareRequest) -> Result<()> {
    let response = client
        .share(request)
        .await
        .map_err(grpc("Share (verify)"))?
        .into_inner();
    print_header(&response, &format!("{} check(s)", response.checks.len()));
    for check in &response.checks {
        println!("  {:<20} {}", check.field, verify_result_name(check.result));
    }
    print_route(&response.route);
    Ok(())
}

async fn stats(client: &mut AgencyClient<Channel>, request: ShareRequest) -> Result<()> {
    let response = client
        .share(request)
        .await
        .map_err(grpc("Share (statistics)"))?
        .into_inner();
    let total: u64 = response.groups.iter().map(|g| g.count).sum();
    print_header(
        &response,
        &format!("{} group(s), {total} record(s)", response.groups.len()),
    );
    for group in &response.groups {
        let dims: Vec<_> = group
            .dimensions
            .iter()
            .map(|d| format!("{}={}", d.field, d.value))
            .collect();
        let label = if dims.is_empty() {
            "(all)".to_owned()
        } else {
            dims.join("  ")
        };
        println!("  {:>10}  {label}", group.count);
    }
    print_route(&response.route);
    Ok(())
}

/// Streams a bulk export into `out` (standard output when `None`), page by page.
///
/// Each page is written and flushed before the next is read, so after any failure the printed token resumes
/// exactly after the last record written. Progress and the summary go to standard error when the records go to
/// standard output.
async fn bulk(
    client: &mut AgencyClient<Channel>,
    request: ShareRequest,
    out: Option<&Path>,
) -> Result<()> {
    let resuming = !request.page_token.is_empty();
    let mut sink: Box<dyn Write> = match out {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .append(resuming)
                .truncate(!resuming)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            Box::new(BufWriter::new(file))
        }
        None => Box::new(BufWriter::new(io::stdout().lock())),
    };
    let report = |line: String| {
        if out.is_some() {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    };
    let mut resume = request.page_token.clone();
    let mut records = 0u64;
    let mut pages = 0u64;
    let outcome = export_pages(
        client,
        request,
        &mut sink,
        &mut resume,
        &mut records,
        &mut pages,
    )
    .await;
    let done = outcome.is_ok() && resume.is_empty();
    report(format!(
        "{records} record(s) in {pages} page(s){}",
        out.map(|p| format!(" written to {}", p.display()))
            .unwrap_or_default()
    ));
    if done {
        report("export complete: last page token is empty".to_owned());
        return Ok(());
    }
    if pages == 0 {
        report("no page received: nothing was written".to_owned());
    } else {
        report(format!(
            "last page token: {resume:?}; resume with --from-token {resume}"
        ));
    }
    match outcome {
        Err(e) => Err(e),
        Ok(()) => Err(anyhow!(
            "the node ended the export before the last page; resume with --from-token {resume}"
        )),
    }
}

/// Reads pages from the Bulk stream into `sink`, keeping `resume` at the token after the last page written.
async fn export_pages(
    client: &mut AgencyClient<Channel>,
    request: ShareRequest,
    sink: &mut dyn Write,
    resume: &mut String,
    records: &mut u64,
    pages: &mut u64,
) -> Result<()> {
    let mut stream = client
        .bulk(request)
        .await
        .map_err(grpc("Bulk"))?
        .into_inner();
    while let Some(page) = stream.message().await.map_err(grpc("Bulk"))? {
        for record in &page.records {
            writeln!(sink, "{}", record_json(record)).context("writing the records")?;
        }
        sink.flush().context("writing the records")?;
        *records += page.records.len() as u64;
        *pages += 1;
        *resume = page.next_page_token;
        eprintln!(
            "page {pages}: {} record(s), next page token {resume:?}",
            page.records.len()
        );
        if resume.is_empty() {
            break;
        }
    }
    Ok(())
}

/// Writes the grant of an approved application to `path`, when both are there; says what happened.
fn save_grant(application: &Application, path: Option<&Path>) -> Result<()> {
    let grant = application.grant.as_ref().filter(|g| !g.grant.is_empty());
    match (grant, path) {
        (Some(grant), Some(path)) => {
            write_signed_grant(path, grant)
                .with_context(|| format!("writing the grant to {}", path.display()))?;
            println!(
                "grant written to {}; use it with --grant-file {}",
                path.display(),
                path.display()
            );
        }
        (Some(_), None) => println!(
            "save the grant with the subcommand: application {} --grant-out FILE",
            application.id
        ),
        (None, Some(_)) if application.state == ApplicationState::Pending as i32 => println!(
            "no grant yet: the application waits for the provider; fetch it later with the \
             subcommand: application {} --grant-out FILE",
            application.id
        ),
        (None, Some(_)) => println!("no grant to write: the application was not approved"),
        (None, None) => {}
    }
    Ok(())
}

fn print_application(a: &Application) {
    let overdue = if a.overdue { " (OVERDUE)" } else { "" };
    println!("application {}", a.id);
    println!(
        "  state:       {}{overdue}",
        application_state_name(a.state)
    );
    println!("  resource:    {}", a.resource_id);
    println!(
        "  applicant:   {} at node {}",
        a.consumer_uscc, a.consumer_node
    );
    println!("  purpose:     {}", a.purpose);
    println!("  scenario:    {}", a.scenario);
    println!("  mode:        {}", mode_name(a.mode));
    println!(
        "  fields:      {}",
        list_or(&a.fields, "(all the mode uses)")
    );
    println!("  expiry:      {}", expiry_text(a.requested_expires_at));
    println!("  filed:       {}", utc(a.filed_at));
    println!("  due:         {}", utc(a.due_at));
    if a.decided_at != 0 {
        println!("  decided:     {}", utc(a.decided_at));
    }
    if !a.reason.is_empty() {
        println!("  reason:      {}", a.reason);
    }
    if let Some(signed) = a.grant.as_ref().filter(|g| !g.grant.is_empty()) {
        match decode_grant(signed) {
            Ok(g) => {
                println!("  grant:       {} issued by node {}", g.id, g.issuer_node);
                println!(
                    "    to:        {} at node {}",
                    g.consumer_uscc, g.consumer_node
                );
                println!("    mode:      {}", mode_name(g.mode));
                println!("    fields:    {}", list_or(&g.fields, "(none)"));
                if !g.clear_fields.is_empty() {
                    println!("    clear:     {}", g.clear_fields.join(", "));
                }
                println!(
                    "    valid:     {} to {}",
                    utc(g.issued_at),
                    utc(g.expires_at)
                );
            }
            Err(e) => println!("  grant:       (does not decode: {e})"),
        }
    }
}

fn print_objection(o: &Objection) {
    let overdue = if o.overdue { " (OVERDUE)" } else { "" };
    println!("objection {}", o.id);
    println!("  state:       {}{overdue}", objection_state_name(o.state));
    println!("  resource:    {}", o.resource_id);
    println!("  key:         {}", o.key);
    println!(
        "  filed by:    {} at node {}",
        o.consumer_uscc, o.consumer_node
    );
    println!("  description: {}", o.description);
    if !o.evidence.is_empty() {
        println!("  evidence:    {}", o.evidence);
    }
    println!("  filed:       {}", utc(o.filed_at));
    println!("  due:         {}", utc(o.due_at));
    if o.resolved_at != 0 {
        println!("  resolved:    {}", utc(o.resolved_at));
    }
    if !o.resolution.is_empty() {
        println!("  resolution:  {}", o.resolution);
    }
}

/// The items joined with commas, or `empty` when there are none.
fn list_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_owned()
    } else {
        items.join(", ")
    }
}

fn expiry_text(unix: i64) -> String {
    if unix == 0 {
        "provider's default".to_owned()
    } else {
        utc(unix)
    }
}

/// An instant (seconds since the Unix epoch) as RFC 3339 UTC text; `-` for 0.
fn utc(unix: i64) -> String {
    if unix == 0 {
        return "-".to_owned();
    }
    let days = unix.div_euclid(DAY);
    let secs = unix.rem_euclid(DAY);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn mode_name(value: i32) -> &'static str {
    match ShareMode::try_from(value) {
        Ok(ShareMode::Query) => "query",
        Ok(ShareMode::Verify) => "verify",
        Ok(ShareMode::Statistics) => "statistics",
        Ok(ShareMode::Bulk) => "bulk",
        _ => "unspecified",
    }
}

fn application_state_name(value: i32) -> &'static str {
    match ApplicationState::try_from(value) {
        Ok(ApplicationState::Pending) => "PENDING",
        Ok(ApplicationState::Approved) => "APPROVED",
        Ok(ApplicationState::Rejected) => "REJECTED",
        _ => "UNKNOWN",
    }
}

fn objection_state_name(value: i32) -> &'static str {
    match ObjectionState::try_from(value) {
        Ok(ObjectionState::Open) => "OPEN",
        Ok(ObjectionState::Confirmed) => "CONFIRMED",
        Ok(ObjectionState::Corrected) => "CORRECTED",
        _ => "UNKNOWN",
    }
}

fn verify_result_name(value: i32) -> &'static str {
    match VerifyResult::try_from(value) {
        Ok(VerifyResult::Match) => "MATCH",
        Ok(VerifyResult::Mismatch) => "MISMATCH",
        Ok(VerifyResult::NoRecord) => "NO_RECORD",
        _ => "UNKNOWN",
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A program whose whole command line is [`AgencyArgs`], as `agency-client`.
    #[derive(Debug, Parser)]
    #[command(name = "agency-client")]
    struct TopLevel {
        #[command(flatten)]
        args: AgencyArgs,
    }

    /// A program with [`AgencyArgs`] under a subcommand, as `fedgate agency`.
    #[derive(Debug, Parser)]
    #[command(name = "fedgate")]
    struct Nested {
        #[command(subcommand)]
        command: NestedCommand,
    }

    #[derive(Debug, Subcommand)]
    enum NestedCommand {
        Agency(AgencyArgs),
    }

    #[test]
    fn command_line_is_consistent() {
        TopLevel::command().debug_assert();
        Nested::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["agency-client"];
        argv.extend_from_slice(args);
        TopLevel::try_parse_from(argv).map(|t| t.args.command)
    }

    #[test]
    fn parses_under_a_subcommand_with_flags_on_either_side() {
        let parsed = Nested::try_parse_from([
            "fedgate",
            "agency",
            "--node-code",
            "350203",
            "--ca",
            "pki/ca.crt",
            "share",
            "350102:household",
            "350102195707115225",
            "--key",
            "a.key",
            "--cert",
            "a.crt",
        ]);
        match parsed {
            Ok(Nested {
                command: NestedCommand::Agency(a),
            }) => {
                assert_eq!(a.node_code, "350203");
                assert_eq!(a.node_addr, "https://127.0.0.1:7400");
                assert_eq!(a.ca, PathBuf::from("pki/ca.crt"));
                assert_eq!(a.cert, PathBuf::from("a.crt"));
                assert_eq!(a.key, PathBuf::from("a.key"));
                match a.command {
                    Command::Share {
                        resource_id, key, ..
                    } => {
                        assert_eq!(resource_id, "350102:household");
                        assert_eq!(key, "350102195707115225");
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Nested::try_parse_from(["fedgate", "agency"]).is_err(),
            "a subcommand is required"
        );
    }

    #[test]
    fn parses_the_new_subcommands() {
        let verify = parse(&[
            "verify",
            "350102:household",
            "350102199001011234",
            "--value",
            "name=张三",
            "--value",
            "note=a=b",
            "--grant-file",
            "g.bin",
        ]);
        match verify {
            Ok(Command::Verify {
                values, grant_file, ..
            }) => {
                assert_eq!(
                    values,
                    [
                        ("name".to_owned(), "张三".to_owned()),
                        ("note".to_owned(), "a=b".to_owned())
                    ]
                );
                assert_eq!(grant_file, Some(PathBuf::from("g.bin")));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["verify", "r", "k"]).is_err(), "--value is required");
        assert!(parse(&["verify", "r", "k", "--value", "name"]).is_err());
        assert!(parse(&["verify", "r", "k", "--value", "=x"]).is_err());

        match parse(&[
            "stats",
            "350102:marriage",
            "--group-by",
            "marital_status,registration_office",
        ]) {
            Ok(Command::Stats { group_by, .. }) => {
                assert_eq!(group_by, ["marital_status", "registration_office"]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&[
            "bulk",
            "350102:household",
            "--page-size",
            "500",
            "--from-token",
            "1000",
            "--out",
            "x.jsonl",
        ]) {
            Ok(Command::Bulk {
                page_size,
                from_token,
                out,
                ..
            }) => {
                assert_eq!(page_size, Some(500));
                assert_eq!(from_token, "1000");
                assert_eq!(out, Some(PathBuf::from("x.jsonl")));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["bulk", "r", "--page-size", "5001"]).is_err());
        assert!(parse(&["bulk", "r", "--page-size", "0"]).is_err());

        match parse(&[
            "apply",
            "350102:marriage",
            "--purpose",
            "p",
            "--scenario",
            "s",
            "--mode",
            "statistics",
            "--days",
            "30",
        ]) {
            Ok(Command::Apply { mode, days, .. }) => {
                assert_eq!((mode, days), (Mode::Statistics, Some(30)));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            parse(&["apply", "r", "--purpose", "p"]).is_err(),
            "--scenario is required"
        );

        assert!(
            parse(&["decide", "350102-a-1"]).is_err(),
            "a decision is required"
        );
        assert!(parse(&["decide", "350102-a-1", "--approve", "--reject"]).is_err());
        match parse(&[
            "decide",
            "350102-a-1",
            "--approve",
            "--fields",
            "name",
            "--clear",
            "name,phone",
            "--mode",
            "verify",
        ]) {
            Ok(Command::Decide {
                approve,
                clear,
                mode,
                ..
            }) => {
                assert!(approve);
                assert_eq!(clear, ["name", "phone"]);
                assert_eq!(mode, Some(Mode::Verify));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["resolve", "350102-o-1", "--resolution", "r"]).is_err());
        assert!(
            parse(&[
                "resolve",
                "350102-o-1",
                "--corrected",
                "--confirmed",
                "--resolution",
                "r"
            ])
            .is_err()
        );
        assert!(matches!(
            parse(&[
                "resolve",
                "350102-o-1",
                "--confirmed",
                "--resolution",
                "checked"
            ]),
            Ok(Command::Resolve {
                corrected: false,
                ..
            })
        ));
        assert!(matches!(
            parse(&["applications", "--pending", "--overdue"]),
            Ok(Command::Applications {
                pending: true,
                overdue: true
            })
        ));
        assert!(matches!(
            parse(&["share", "r", "k", "--grant-file", "g"]),
            Ok(Command::Share {
                grant_file: Some(_),
                ..
            })
        ));
        assert!(
            parse(&["revoke", "350102-g-1"]).is_err(),
            "--reason is required"
        );
        assert!(
            parse(&["object", "r", "k"]).is_err(),
            "--description is required"
        );
    }

    #[test]
    fn formats_instants_as_utc() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1), "1970-01-01T00:00:01Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(utc(1_735_689_600), "2025-01-01T00:00:00Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn cleans_lists() {
        let list = vec![" name".to_owned(), String::new(), "phone ".to_owned()];
        assert_eq!(clean(list), ["name", "phone"]);
        assert_eq!(
            parse_field_value("a = b"),
            Ok(("a".to_owned(), " b".to_owned()))
        );
    }
}
