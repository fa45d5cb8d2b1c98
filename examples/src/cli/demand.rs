//! `agency demand …`: supply–demand matching from an agency's side. As a consumer an agency files a demand for
//! data no catalog entry offers, lists its demands and follows one through its steps; as the provider the
//! province assigned a demand to, it answers with an entry it published or refuses with its reason. Every call
//! goes to the agency's own node, which forwards it to the province.

use anyhow::{Result, anyhow};
use clap::{Subcommand, ValueEnum};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    AnswerDemandRequest, Demand, DemandState, FileDemandRequest, GetDemandRequest,
    ListDemandsRequest, ShareType,
};
use tonic::transport::Channel;

use super::{clean, utc};
use crate::describe_status;

/// Largest number of pages `demand list` follows.
const MAX_PAGES: usize = 100;

/// Share type a demand may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Wanted {
    /// Shared with every agency without conditions.
    Unconditional,
    /// Shared under an approved application.
    Conditional,
}

/// A demand state as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum State {
    /// Waiting for the province to assign it.
    Filed,
    /// Waiting for the provider's answer.
    Assigned,
    /// Answered with a catalog entry.
    Answered,
    /// Refused by the provider.
    Refused,
}

/// What an agency does with demands.
#[derive(Debug, Clone, Subcommand)]
pub enum DemandCommand {
    /// Files a demand for data no catalog entry offers yet; it travels to the province.
    File {
        /// What data is needed, in a line.
        #[arg(long)]
        title: String,
        /// What data is needed, in full.
        #[arg(long)]
        description: String,
        /// The business purpose it would serve.
        #[arg(long)]
        purpose: String,
        /// The legal basis of the duty it is needed for.
        #[arg(long)]
        legal_basis: String,
        /// Fields wanted, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        fields: Vec<String>,
        /// Share type wanted; any when omitted.
        #[arg(long, value_enum)]
        share_type: Option<Wanted>,
    },
    /// Lists the demands this agency filed or is assigned to answer.
    List {
        /// Only demands in this state.
        #[arg(long, value_enum)]
        state: Option<State>,
        /// Only demands past a deadline.
        #[arg(long)]
        overdue: bool,
    },
    /// Shows one demand with every step it went through (and the entry that answers it).
    Show {
        /// Demand id, e.g. 350000-d-1.
        id: String,
    },
    /// Answers a demand assigned to this agency with a catalog entry it published.
    Answer {
        /// Demand id, e.g. 350000-d-1.
        id: String,
        /// The entry's full resource id, e.g. 350100:elderly-care.
        #[arg(long)]
        resource: String,
        /// A note for the demanding agency.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Refuses a demand assigned to this agency, giving the reason (its legal grounds).
    Refuse {
        /// Demand id, e.g. 350000-d-1.
        id: String,
        /// Why it is refused.
        #[arg(long)]
        reason: String,
    },
}

fn grpc(call: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| anyhow!("{call} failed: {}", describe_status(&s))
}

/// Carries out one demand subcommand at the agency's node.
pub async fn run(c: &mut AgencyClient<Channel>, command: DemandCommand) -> Result<()> {
    match command {
        DemandCommand::File {
            title,
            description,
            purpose,
            legal_basis,
            fields,
            share_type,
        } => {
            let d = c
                .file_demand(FileDemandRequest {
                    title,
                    description,
                    purpose,
                    legal_basis,
                    fields: clean(fields),
                    share_type: match share_type {
                        None => ShareType::Unspecified,
                        Some(Wanted::Unconditional) => ShareType::Unconditional,
                        Some(Wanted::Conditional) => ShareType::Conditional,
                    } as i32,
                })
                .await
                .map_err(grpc("FileDemand"))?
                .into_inner();
            print_demand(&d);
        }
        DemandCommand::List { state, overdue } => {
            let state = match state {
                None => DemandState::Unspecified,
                Some(State::Filed) => DemandState::Filed,
                Some(State::Assigned) => DemandState::Assigned,
                Some(State::Answered) => DemandState::Answered,
                Some(State::Refused) => DemandState::Refused,
            };
            let mut page_token = String::new();
            let mut n = 0usize;
            for _ in 0..MAX_PAGES {
                let page = c
                    .list_demands(ListDemandsRequest {
                        state: state as i32,
                        overdue_only: overdue,
                        page_size: 0,
                        page_token,
                    })
                    .await
                    .map_err(grpc("ListDemands"))?
                    .into_inner();
                for d in &page.demands {
                    println!(
                        "{:<16} {:<9}{:<8} {:<20} {:<26} filed {}  {}",
                        d.id,
                        state_name(d.state),
                        if d.overdue { " OVERDUE" } else { "" },
                        d.consumer_uscc,
                        if d.resource_id.is_empty() {
                            "-"
                        } else {
                            d.resource_id.as_str()
                        },
                        utc(d.filed_at),
                        d.title
                    );
                    n += 1;
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            println!("{n} demand(s)");
        }
        DemandCommand::Show { id } => {
            let d = c
                .get_demand(GetDemandRequest { id })
                .await
                .map_err(grpc("GetDemand"))?
                .into_inner();
            print_demand(&d);
        }
        DemandCommand::Answer { id, resource, note } => {
            let d = c
                .answer_demand(AnswerDemandRequest {
                    demand_id: id,
                    resource_id: resource,
                    refusal: String::new(),
                    note,
                })
                .await
                .map_err(grpc("AnswerDemand"))?
                .into_inner();
            print_demand(&d);
        }
        DemandCommand::Refuse { id, reason } => {
            let d = c
                .answer_demand(AnswerDemandRequest {
                    demand_id: id,
                    resource_id: String::new(),
                    refusal: reason,
                    note: String::new(),
                })
                .await
                .map_err(grpc("AnswerDemand"))?
                .into_inner();
            print_demand(&d);
        }
    }
    Ok(())
}

/// The name of a demand state as the command lines print it.
pub fn state_name(value: i32) -> &'static str {
    match DemandState::try_from(value) {
        Ok(DemandState::Filed) => "FILED",
        Ok(DemandState::Assigned) => "ASSIGNED",
        Ok(DemandState::Answered) => "ANSWERED",
        Ok(DemandState::Refused) => "REFUSED",
        _ => "UNSPECIFIED",
    }
}

/// A demand in full with its linked entry and its history, as the command lines print it.
pub fn print_demand(d: &Demand) {
    let overdue = if d.overdue { " (OVERDUE)" } else { "" };
    println!("demand {}", d.id);
    println!("  state:       {}{overdue}", state_name(d.state));
    println!("  title:       {}", d.title);
    println!("  description: {}", d.description);
    println!("  purpose:     {}", d.purpose);
    println!("  legal basis: {}", d.legal_basis);
    println!("  fields:      {}", d.fields.join(", "));
    println!(
        "  filed by:    {} at node {}",
        d.consumer_uscc, d.consumer_node
    );
    println!("  filed:       {}", utc(d.filed_at));
    println!("  assign by:   {}", utc(d.assign_due_at));
    if !d.provider_uscc.is_empty() {
        println!(
            "  provider:    {} at node {}",
            d.provider_uscc, d.provider_node
        );
        println!("  answer by:   {}", utc(d.answer_due_at));
    }
    if !d.resource_id.is_empty() {
        println!("  answered with: {}", d.resource_id);
    }
    if let Some(e) = &d.entry {
        println!("    entry:     {} (version {})", e.title, e.version);
    }
    if !d.reason.is_empty() {
        println!("  reason:      {}", d.reason);
    }
    println!("  history:");
    for s in &d.history {
        println!(
            "    {}  {:<9} {}  {}",
            utc(s.at),
            state_name(s.state),
            s.actor,
            s.note
        );
    }
}
