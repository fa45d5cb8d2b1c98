//! Agency programs for fedgate, built only on the generated `fedgate.v1` stubs and tonic/rustls.
//!
//! A civil-affairs agency (民政局) attached to a county node provides two resources from a synthetic registry:
//! household registration (户籍登记, local code `household`) and marriage registration (婚姻登记, local code
//! `marriage`), both keyed by the resident ID number.
//!
//! - [`registry`]: the deterministic synthetic dataset, with valid GB 11643 ID numbers;
//! - [`catalog`]: the catalog entries the agency publishes for it;
//! - [`changelog`]: changes to the registry after generation and the change log `Provider.Changes` answers;
//! - [`provider`]: the `fedgate.v1.Provider` service its node fetches records, counts and export pages from,
//!   over mutual TLS;
//! - [`provider_tls`]: the provider's TLS endpoint, whose certificate and CA bundle reload while it serves;
//! - [`client`]: connecting to the node's `fedgate.v1.Agency` service, publishing entries, and the grant files
//!   and JSON lines a consumer keeps;
//! - [`cli`]: the agency command line (catalog, shares, applications, grants, objections), shared by the
//!   `agency-client` binary and `fedgate agency`.
//!
//! The binaries `civil-registry-provider` and `agency-client` put these together.
//!
//! **rustls crypto provider.** Every TLS function here relies on rustls' process-wide crypto provider. Programs
//! using this library must install the ring provider once at start, before any connection:
//!
//! ```
//! let _ = rustls::crypto::ring::default_provider().install_default();
//! ```

pub mod catalog;
pub mod changelog;
pub mod cli;
pub mod client;
pub mod provider;
pub mod provider_tls;
pub mod registry;

pub use catalog::{MIN_GROUP_SIZE, civil_affairs_entries, share_modes, statistics_dimensions};
pub use client::{
    connect_agency, decode_grant, describe_status, publish_all, read_signed_grant, record_json,
    write_signed_grant,
};
pub use provider::{
    DEFAULT_EXPORT_PAGE_SIZE, MAX_EXPORT_PAGE_SIZE, ProviderTls, RegistryProvider, serve_provider,
};
pub use provider_tls::{serve_provider_reloading, server_config};
pub use registry::{Person, Registry, RegistryError, Resource, is_valid_id_number};

#[cfg(test)]
mod test_pki;
