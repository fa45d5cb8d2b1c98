//! Agency programs for fedgate, built only on the generated `fedgate.v1` stubs and tonic/rustls.
//!
//! A civil-affairs agency (民政局) attached to a county node provides two resources from a synthetic registry:
//! household registration (户籍登记, local code `household`) and marriage registration (婚姻登记, local code
//! `marriage`), both keyed by the resident ID number.
//!
//! - [`registry`]: the deterministic synthetic dataset, with valid GB 11643 ID numbers;
//! - [`catalog`]: the catalog entries the agency publishes for it;
//! - [`provider`]: the `fedgate.v1.Provider` service its node fetches records from, over mutual TLS;
//! - [`client`]: connecting to the node's `fedgate.v1.Agency` service and publishing entries.
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
pub mod client;
pub mod provider;
pub mod registry;

pub use catalog::civil_affairs_entries;
pub use client::{connect_agency, describe_status, publish_all};
pub use provider::{ProviderTls, RegistryProvider, serve_provider};
pub use registry::{Person, Registry, RegistryError, Resource, is_valid_id_number};

#[cfg(test)]
mod test_pki;
