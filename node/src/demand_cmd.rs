//! `fedgate demand`: the province operator's side of supply–demand matching — list demands, show one with its
//! history, assign one to a provider agency. Calls the province's Operator service with the node's certificate.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use fedgate_examples::cli::{print_demand, state_name};
use fedgate_proto::v1::{
    AssignDemandRequest, Demand, DemandState, GetDemandRequest, OperatorListDemandsRequest,
};

/// Largest number of pages `fedgate demand list` follows.
const MAX_PAGES: usize = 100;

/// A demand state named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum State {
    /// Waiting for assignment.
    Filed,
    /// Waiting for the provider's answer.
    Assigned,
    /// Answered with a catalog entry.
    Answered,
    /// Refused by the provider.
    Refused,
}

impl From<State> for DemandState {
    fn from(s: State) -> Self {
        match s {
            State::Filed => DemandState::Filed,
            State::Assigned => DemandState::Assigned,
            State::Answered => DemandState::Answered,
            State::Refused => DemandState::Refused,
        }
    }
}

/// `fedgate demand` subcommands, run at the province with its configuration.
#[derive(Debug, Subcommand)]
pub enum DemandCmd {
    /// List the demands held at the province, oldest id first.
    List {
        /// Path of the province node's configuration (its TLS files identify the operator).
        #[arg(long, short)]
        config: PathBuf,
        /// Only demands in this state.
        #[arg(long, value_enum)]
        state: Option<State>,
        /// Only demands past a deadline.
        #[arg(long)]
        overdue: bool,
        /// Only demands this agency (USCC) filed or is assigned.
        #[arg(long, default_value = "")]
        agency: String,
    },
    /// Show one demand with every step it went through.
    Show {
        /// Path of the province node's configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Demand id, e.g. 350000-d-1.
        id: String,
    },
    /// Assign a filed demand to a provider agency; its answer deadline starts now.
    Assign {
        /// Path of the province node's configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Demand id, e.g. 350000-d-1.
        id: String,
        /// The provider agency's unified social credit code.
        #[arg(long)]
        provider: String,
        /// The node the provider agency is registered at.
        #[arg(long)]
        node: String,
        /// A note for the provider.
        #[arg(long, default_value = "")]
        note: String,
    },
}

fn grpc(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Runs one `fedgate demand` subcommand.
pub async fn run(cmd: DemandCmd) -> Result<()> {
    match cmd {
        DemandCmd::List {
            config,
            state,
            overdue,
            agency,
        } => {
            let (_, mut client) = crate::cli::operator_client(&config).await?;
            let mut token = String::new();
            let mut n = 0usize;
            for _ in 0..MAX_PAGES {
                let page = client
                    .list_demands(OperatorListDemandsRequest {
                        state: state.map_or(DemandState::Unspecified, DemandState::from) as i32,
                        overdue_only: overdue,
                        agency: agency.clone(),
                        page_size: 0,
                        page_token: token,
                    })
                    .await
                    .map_err(grpc)?
                    .into_inner();
                for d in &page.demands {
                    print_line(d);
                    n += 1;
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            println!("{n} demands");
            Ok(())
        }
        DemandCmd::Show { config, id } => {
            let (_, mut client) = crate::cli::operator_client(&config).await?;
            let d = client
                .get_demand(GetDemandRequest { id })
                .await
                .map_err(grpc)?
                .into_inner();
            print_demand(&d);
            Ok(())
        }
        DemandCmd::Assign {
            config,
            id,
            provider,
            node,
            note,
        } => {
            let (_, mut client) = crate::cli::operator_client(&config).await?;
            let d = client
                .assign_demand(AssignDemandRequest {
                    demand_id: id,
                    provider_uscc: provider,
                    provider_node: node,
                    note,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            print_demand(&d);
            Ok(())
        }
    }
}

/// One line of a listing: id, state, who filed it, who answers it, the deadline in force.
fn print_line(d: &Demand) {
    let due = match DemandState::try_from(d.state) {
        Ok(DemandState::Filed) => d.assign_due_at,
        Ok(DemandState::Assigned) => d.answer_due_at,
        _ => 0,
    };
    println!(
        "  {}  {:<8}{}  by {}@{}  provider {}  due {}  {}",
        d.id,
        state_name(d.state),
        if d.overdue { " OVERDUE" } else { "" },
        d.consumer_uscc,
        d.consumer_node,
        if d.provider_uscc.is_empty() {
            "-".to_owned()
        } else {
            format!("{}@{}", d.provider_uscc, d.provider_node)
        },
        if due == 0 {
            "-".to_owned()
        } else {
            due.to_string()
        },
        d.title
    );
}
