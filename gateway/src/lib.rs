//! The fedgate gateway: everything a node of the province's data-exchange federation does.
//!
//! One module per concern: identities ([`ident`]), TLS and the development PKI ([`tls`], [`pki`]), the tree
//! ([`topology`]), the catalog ([`catalog`]), upward streams ([`uplink`]), share policy ([`policy`]), routing
//! ([`route`]), storage ([`store`]), the gRPC services ([`service`]) and their assembly ([`node`]).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod accept;
pub mod admission;
pub mod assertion;
pub mod audit;
pub mod cache;
pub mod calendar;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod console;
pub mod downlink;
pub mod entries;
pub mod error;
pub mod flowback;
pub mod governance;
pub mod grant;
pub mod ident;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod opmon;
pub mod own_view;
pub mod pki;
pub mod policy;
pub mod probe;
pub mod refusals;
pub mod route;
pub mod service;
pub mod ship;
pub mod statement;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod uplink;
