//! `fedgate agency my-applications | grants | notices`: an agency's own view at its node — the applications it
//! filed, the grants it holds, and what it has been told about them.

use anyhow::Result;
use clap::{Args, ValueEnum};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    ApplicationState, GrantStatus, ListGrantsRequest, ListMyApplicationsRequest,
    ListNoticesRequest, Notice, NoticeKind, WatchNoticesRequest,
};
use tonic::transport::Channel;

use super::{DAY, MAX_PAGES, application_state_name, grpc, utc};

/// Which applications `my-applications` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateFilter {
    /// Every application.
    All,
    /// Waiting for the provider's decision.
    Pending,
    /// Approved.
    Approved,
    /// Rejected.
    Rejected,
}

/// Which grants `grants` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    /// Every grant.
    All,
    /// Neither expired nor revoked.
    Active,
    /// Past their expiry.
    Expired,
    /// Revoked by their provider.
    Revoked,
}

/// Arguments of `my-applications`.
#[derive(Debug, Clone, Args)]
pub struct MyApplicationsArgs {
    /// Only applications in this state.
    #[arg(long, value_enum, default_value_t = StateFilter::All)]
    pub state: StateFilter,
}

/// Arguments of `grants`.
#[derive(Debug, Clone, Args)]
pub struct GrantsArgs {
    /// Only grants of this status.
    #[arg(long, value_enum, default_value_t = StatusFilter::All)]
    pub status: StatusFilter,
}

/// Arguments of `notices`.
#[derive(Debug, Clone, Args)]
pub struct NoticesArgs {
    /// Only notices after this sequence number (the last one seen).
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Keep watching: print each new notice as it is made, until interrupted.
    #[arg(long)]
    pub follow: bool,
}

/// Lists the applications this agency filed through its node.
pub async fn my_applications(c: &mut AgencyClient<Channel>, a: MyApplicationsArgs) -> Result<()> {
    let state = match a.state {
        StateFilter::All => ApplicationState::Unspecified,
        StateFilter::Pending => ApplicationState::Pending,
        StateFilter::Approved => ApplicationState::Approved,
        StateFilter::Rejected => ApplicationState::Rejected,
    };
    let mut page_token = String::new();
    let mut total = 0usize;
    for _ in 0..MAX_PAGES {
        let page = c
            .list_my_applications(ListMyApplicationsRequest {
                state: state as i32,
                page_size: 0,
                page_token,
            })
            .await
            .map_err(grpc("ListMyApplications"))?
            .into_inner();
        for h in &page.applications {
            let Some(app) = &h.application else { continue };
            let due = if app.state == ApplicationState::Pending as i32 {
                format!(
                    "due {}{}",
                    utc(app.due_at),
                    if app.overdue { " (OVERDUE)" } else { "" }
                )
            } else {
                format!("decided {}", utc(app.decided_at))
            };
            let stale = if h.refresh_error.is_empty() {
                String::new()
            } else {
                format!("  [as of {}: {}]", utc(h.refreshed_at), h.refresh_error)
            };
            println!(
                "{:<18} {:<9} {:<28} {due}{stale}",
                app.id,
                application_state_name(app.state),
                app.resource_id
            );
        }
        total += page.applications.len();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    println!("{total} applications");
    Ok(())
}

fn status_name(value: i32) -> &'static str {
    match GrantStatus::try_from(value) {
        Ok(GrantStatus::Active) => "ACTIVE",
        Ok(GrantStatus::Expired) => "EXPIRED",
        Ok(GrantStatus::Revoked) => "REVOKED",
        _ => "UNKNOWN",
    }
}

/// Lists the grants this agency holds through its node.
pub async fn grants(c: &mut AgencyClient<Channel>, a: GrantsArgs) -> Result<()> {
    let status = match a.status {
        StatusFilter::All => GrantStatus::Unspecified,
        StatusFilter::Active => GrantStatus::Active,
        StatusFilter::Expired => GrantStatus::Expired,
        StatusFilter::Revoked => GrantStatus::Revoked,
    };
    let mut page_token = String::new();
    let mut total = 0usize;
    for _ in 0..MAX_PAGES {
        let page = c
            .list_grants(ListGrantsRequest {
                status: status as i32,
                page_size: 0,
                page_token,
            })
            .await
            .map_err(grpc("ListGrants"))?
            .into_inner();
        for g in &page.grants {
            let state = if g.status == GrantStatus::Revoked as i32 {
                format!("revoked {}: {}", utc(g.revoked_at), g.revoke_reason)
            } else {
                format!(
                    "expires {} ({} days left)",
                    utc(g.expires_at),
                    g.remaining_secs / DAY
                )
            };
            println!(
                "{:<18} {:<8} {:<28} {state}",
                g.grant_id,
                status_name(g.status),
                g.resource_id
            );
        }
        total += page.grants.len();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    println!("{total} grants");
    Ok(())
}

fn print_notice(n: &Notice) {
    let kind = match NoticeKind::try_from(n.kind) {
        Ok(NoticeKind::GrantRevoked) => "grant revoked",
        Ok(NoticeKind::GrantExpiring) => "grant expiring",
        Ok(NoticeKind::ApplicationDecided) => "application decided",
        _ => "notice",
    };
    println!(
        "#{:<6} {} {kind:<20} {}",
        n.seq,
        utc(n.created_at),
        n.detail
    );
}

/// Prints this agency's notices after `--after`, and with `--follow` each new one as it comes.
pub async fn notices(c: &mut AgencyClient<Channel>, a: NoticesArgs) -> Result<()> {
    if a.follow {
        let mut stream = c
            .watch_notices(WatchNoticesRequest { after_seq: a.after })
            .await
            .map_err(grpc("WatchNotices"))?
            .into_inner();
        while let Some(n) = stream.message().await.map_err(grpc("WatchNotices"))? {
            print_notice(&n);
        }
        return Ok(());
    }
    let mut after = a.after;
    let mut total = 0usize;
    for _ in 0..MAX_PAGES {
        let page = c
            .list_notices(ListNoticesRequest {
                after_seq: after,
                page_size: 0,
            })
            .await
            .map_err(grpc("ListNotices"))?
            .into_inner();
        for n in &page.notices {
            print_notice(n);
            after = n.seq;
        }
        total += page.notices.len();
        if !page.more {
            break;
        }
    }
    println!("{total} notices (resume with --after {after})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{AgencyArgs, Command};
    use super::*;

    #[derive(Debug, Parser)]
    struct Line {
        #[command(flatten)]
        args: AgencyArgs,
    }

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["agency-client"];
        argv.extend_from_slice(args);
        Line::try_parse_from(argv).map(|l| l.args.command)
    }

    #[test]
    fn own_view_commands_parse() {
        match parse(&["my-applications", "--state", "pending"]) {
            Ok(Command::MyApplications(a)) => assert_eq!(a.state, StateFilter::Pending),
            other => panic!("{other:?}"),
        }
        match parse(&["grants", "--status", "revoked"]) {
            Ok(Command::Grants(a)) => assert_eq!(a.status, StatusFilter::Revoked),
            other => panic!("{other:?}"),
        }
        match parse(&["notices", "--after", "7", "--follow"]) {
            Ok(Command::Notices(a)) => assert!(a.after == 7 && a.follow),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["grants", "--status", "lost"]).is_err());
    }
}
