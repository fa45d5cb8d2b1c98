//! The `fedgate` binary's commands: node daemon, demo federation, development PKI.
#![forbid(unsafe_code)]

pub mod audit_cmd;
pub mod backup;
pub mod certs_cmd;
pub mod check_config;
pub mod cli;
pub mod demand_cmd;
pub mod demo;
pub mod devnet;
pub mod exit;
pub mod ops_cmd;
pub mod user_cmd;
