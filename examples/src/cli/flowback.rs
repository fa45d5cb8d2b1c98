//! `fedgate agency subscribe | subscriptions | read-subscription | unsubscribe`: flow-back subscriptions of an agency.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    ListSubscriptionsRequest, ReadSubscriptionRequest, SubscribeRequest, Subscription,
    SubscriptionEndReason, SubscriptionState, UnsubscribeRequest, subscription_item,
};
use tonic::transport::Channel;

use super::{clean, grant_from, grpc};
use crate::record_json;

/// The flow-back subscription commands.
#[derive(Debug, Clone, Subcommand)]
pub enum FlowbackCommand {
    /// Subscribes, under a grant of mode BULK, to a resource anywhere in the province: its node sends the first
    /// full export and then every change to this agency's node.
    Subscribe {
        /// Full resource id, e.g. 350000:household.
        resource_id: String,
        /// The grant of mode BULK (as saved by `apply`).
        #[arg(long)]
        grant_file: PathBuf,
        /// Fields wanted, comma separated; all the grant allows when omitted.
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
        /// Business purpose; the grant's when omitted.
        #[arg(long, default_value = "")]
        purpose: String,
    },
    /// Lists this agency's subscriptions known at its node, with how far each was received.
    Subscriptions,
    /// Prints what this agency's node received of a subscription, one JSON object per line, and then each item
    /// as it arrives; stops after the subscription's end item (or with --no-follow once caught up).
    ReadSubscription {
        /// Subscription id, e.g. 350000-s-1.
        id: String,
        /// Only items after this sequence number (resume where an earlier read stopped).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Stop once everything received so far was printed.
        #[arg(long)]
        no_follow: bool,
    },
    /// Ends a subscription at the resource's node: nothing more is produced, and its end item follows what was
    /// delivered.
    Unsubscribe {
        /// Subscription id, e.g. 350000-s-1.
        id: String,
        /// Why (kept on the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn print_subscription(s: &Subscription) {
    let state = SubscriptionState::try_from(s.state)
        .map(|s| s.as_str_name().trim_start_matches("SUBSCRIPTION_STATE_"))
        .unwrap_or("?");
    println!(
        "{:<16} {:<22} {:<8} received #{:<8} grant {} fields {}",
        s.id,
        s.resource_id,
        state,
        s.received_seq,
        s.grant_id,
        s.fields.join(",")
    );
    if let Some(end) = &s.end {
        let reason = SubscriptionEndReason::try_from(end.reason)
            .map(|r| r.as_str_name())
            .unwrap_or("?");
        println!("  ended: {reason}: {}", end.detail);
    }
}

/// Carries out one flow-back command.
pub async fn run(c: &mut AgencyClient<Channel>, command: FlowbackCommand) -> Result<()> {
    match command {
        FlowbackCommand::Subscribe {
            resource_id,
            grant_file,
            fields,
            purpose,
        } => {
            let grant = grant_from(Some(&grant_file))?;
            let sub = c
                .subscribe(SubscribeRequest {
                    resource_id,
                    grant,
                    fields: clean(fields),
                    purpose,
                })
                .await
                .map_err(grpc("Subscribe"))?
                .into_inner();
            print_subscription(&sub);
            Ok(())
        }
        FlowbackCommand::Unsubscribe { id, reason } => {
            let sub = c
                .unsubscribe(UnsubscribeRequest {
                    subscription_id: id,
                    reason,
                })
                .await
                .map_err(grpc("Unsubscribe"))?
                .into_inner();
            print_subscription(&sub);
            Ok(())
        }
        FlowbackCommand::Subscriptions => {
            let list = c
                .list_subscriptions(ListSubscriptionsRequest::default())
                .await
                .map_err(grpc("ListSubscriptions"))?
                .into_inner();
            for s in &list.subscriptions {
                print_subscription(s);
            }
            println!("{} subscriptions", list.subscriptions.len());
            Ok(())
        }
        FlowbackCommand::ReadSubscription {
            id,
            after,
            no_follow,
        } => read(c, id, after, no_follow).await,
    }
}

async fn read(
    c: &mut AgencyClient<Channel>,
    id: String,
    after: u64,
    no_follow: bool,
) -> Result<()> {
    let received = if no_follow {
        c.list_subscriptions(ListSubscriptionsRequest::default())
            .await
            .map_err(grpc("ListSubscriptions"))?
            .into_inner()
            .subscriptions
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| s.received_seq)
            .with_context(|| format!("subscription {id} is not known at this node"))?
    } else {
        u64::MAX
    };
    if received <= after {
        return Ok(());
    }
    let mut stream = c
        .read_subscription(ReadSubscriptionRequest {
            subscription_id: id.clone(),
            after_seq: after,
        })
        .await
        .map_err(grpc("ReadSubscription"))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(msg) = stream.message().await.map_err(grpc("ReadSubscription"))? {
        for item in msg.items {
            let line = match &item.body {
                Some(subscription_item::Body::Upsert(r)) => {
                    format!(r#"{{"seq":{},"upsert":{}}}"#, item.seq, record_json(r))
                }
                Some(subscription_item::Body::Deleted(r)) => {
                    format!(r#"{{"seq":{},"deleted":{}}}"#, item.seq, record_json(r))
                }
                Some(subscription_item::Body::End(e)) => format!(
                    r#"{{"seq":{},"end":{}}}"#,
                    item.seq,
                    serde_json::json!({
                        "reason": SubscriptionEndReason::try_from(e.reason)
                            .map(|r| r.as_str_name())
                            .unwrap_or("?"),
                        "detail": e.detail,
                    })
                ),
                _ => continue,
            };
            writeln!(out, "{line}")?;
            if item.seq >= received {
                return Ok(());
            }
        }
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{AgencyArgs, Command};
    use super::FlowbackCommand;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        agency: AgencyArgs,
    }

    #[test]
    fn the_subscription_commands_parse_under_the_agency_command() {
        let cli = Cli::try_parse_from([
            "agency",
            "subscribe",
            "350000:household",
            "--grant-file",
            "g.grant",
            "--fields",
            "id_number, address",
        ])
        .map_err(|e| e.to_string());
        match cli.map(|c| c.agency.command) {
            Ok(Command::Flowback(FlowbackCommand::Subscribe {
                resource_id,
                fields,
                purpose,
                ..
            })) => {
                assert_eq!(resource_id, "350000:household");
                assert_eq!(fields, ["id_number", " address"]);
                assert!(purpose.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let cli =
            Cli::try_parse_from(["agency", "read-subscription", "350000-s-1", "--after", "7"])
                .map_err(|e| e.to_string());
        assert!(matches!(
            cli.map(|c| c.agency.command),
            Ok(Command::Flowback(FlowbackCommand::ReadSubscription {
                after: 7,
                no_follow: false,
                ..
            }))
        ));
        assert!(Cli::try_parse_from(["agency", "subscriptions"]).is_ok());
        assert!(
            Cli::try_parse_from(["agency", "subscribe", "350000:household"]).is_err(),
            "a subscription needs its grant file"
        );
    }
}
