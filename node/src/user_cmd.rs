//! `fedgate user`: the real-name accounts of a node's console — add, disable, reset, list. Calls the node's
//! Operator service with the node's own certificate; each change is audited there.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use fedgate_proto::v1::{
    AddUserRequest, ConsoleRole, ConsoleUserInfo, DisableUserRequest, ListUsersRequest,
    ResetUserRequest, UserCredentials,
};

/// A console role named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Federation and node state, catalog, reports, statistics.
    Operator,
    /// Audit search and verification, read-only.
    Auditor,
    /// One agency's applications, decisions, grants and objections (needs --agency).
    Reviewer,
}

impl From<Role> for ConsoleRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Operator => ConsoleRole::Operator,
            Role::Auditor => ConsoleRole::Auditor,
            Role::Reviewer => ConsoleRole::Reviewer,
        }
    }
}

/// Subcommands of `fedgate user`.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add an account; prints its generated password (and TOTP URI) once.
    Add {
        /// Path of the node's configuration (its TLS files identify the operator).
        #[arg(long, short)]
        config: PathBuf,
        /// The user's ID or staff number: the login.
        #[arg(long)]
        login: String,
        /// The user's real name.
        #[arg(long)]
        name: String,
        /// What the user may see and do.
        #[arg(long, value_enum)]
        role: Role,
        /// For a reviewer: the USCC of the agency of this node it acts for.
        #[arg(long)]
        agency: Option<String>,
        /// Ask for a TOTP code at sign-in too.
        #[arg(long)]
        totp: bool,
    },
    /// Disable an account and end its sessions.
    Disable {
        /// Path of the node's configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// The account's login.
        login: String,
    },
    /// Give an account a new password (and with --totp a new TOTP secret), unlock and enable it.
    Reset {
        /// Path of the node's configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// The account's login.
        login: String,
        /// Also give it a new TOTP secret.
        #[arg(long)]
        totp: bool,
    },
    /// List the accounts.
    List {
        /// Path of the node's configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn role(r: i32) -> &'static str {
    fedgate_gateway::console::accounts::role_name(r)
}

fn line(u: &ConsoleUserInfo) -> String {
    format!(
        "{:<20} {:<12} {:<9} {:<18} {}{}{}",
        u.login,
        u.name,
        role(u.role),
        if u.agency_uscc.is_empty() {
            "-"
        } else {
            &u.agency_uscc
        },
        if u.disabled { "disabled" } else { "enabled" },
        if u.totp { ", totp" } else { "" },
        if u.locked_until > 0 { ", locked" } else { "" },
    )
}

fn print_credentials(c: &UserCredentials) {
    if let Some(u) = &c.user {
        println!("{}", line(u));
    }
    println!("password: {}", c.password);
    if !c.totp_uri.is_empty() {
        println!("totp: {}", c.totp_uri);
    }
    println!("(shown once: hand it to the user, who signs in and may change it under Account)");
}

/// Runs one `fedgate user` subcommand.
pub async fn run(cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::Add {
            config,
            login,
            name,
            role,
            agency,
            totp,
        } => {
            let (_, mut client) = crate::cli::operator_client(&config).await?;
            let c = client
                .add_user(AddUserRequest {
                    login,
                    name,
                    role: ConsoleRole::from(role) as i32,
                    agency_uscc: agency.unwrap_or_default(),
                    totp,
                })
                .await?
                .into_inner();
            print_credentials(&c);
        }
        UserCmd::Disable { config, login } => {
            let (_, mut client) = crate::cli::operator_client(&config).await?;
            let u = client
                .disable_user(DisableUserRequest { login })
                .await?
                .into_inner();
            println!("{}", line(&u));
        }
        UserCmd::Reset {
            config,
            login,
            totp,
        } => {
            let (_, mut client) = crate::cli::operator_client(&config).await?;
            let c = client
                .reset_user(ResetUserRequest { login, totp })
                .await?
                .into_inner();
            print_credentials(&c);
        }
        UserCmd::List { config } => {
            let (code, mut client) = crate::cli::operator_client(&config).await?;
            let users = client
                .list_users(ListUsersRequest {})
                .await?
                .into_inner()
                .users;
            println!("console accounts of node {code}: {}", users.len());
            for u in &users {
                println!("{}", line(u));
            }
        }
    }
    Ok(())
}
