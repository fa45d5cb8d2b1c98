//! A node's configuration as plain data, read from TOML by the binary and built directly by tests.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod check;
pub use check::{Checked, Problem, check_storage};

/// Everything one node needs to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's 6-digit administrative division code.
    pub code: String,
    /// Address the gRPC listener binds, e.g. "127.0.0.1:7400".
    pub listen: String,
    /// TLS files of this node.
    pub tls: TlsFiles,
    /// Storage backend.
    pub storage: StorageConfig,
    /// The parent node; absent on the province.
    #[serde(default)]
    pub parent: Option<PeerNode>,
    /// Child nodes this node accepts and forwards to.
    #[serde(default)]
    pub children: Vec<PeerNode>,
    /// Agencies registered on this node.
    #[serde(default)]
    pub agencies: Vec<AgencyConfig>,
    /// Routing limits.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Path of the node's Ed25519 signing key (audit batches, grants); created on first start.
    /// Defaults to the storage path with the extension `.key`.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Audit trail settings.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Working-day calendar and governance deadlines.
    #[serde(default)]
    pub calendar: crate::calendar::CalendarConfig,
    /// Cache of authorized answers at this node.
    #[serde(default)]
    pub cache: CacheConfig,
    /// The public open-data endpoint, usually only on the province.
    #[serde(default)]
    pub open_data: Option<OpenDataConfig>,
    /// The metrics endpoint; none when absent.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// How statements of other nodes are checked.
    #[serde(default)]
    pub trust: TrustConfig,
    /// Handshake timeouts, connection caps, HTTP/2 keepalive and idle timeouts of every listener.
    #[serde(default)]
    pub connections: crate::accept::ConnectionsConfig,
    /// Per-agency and per-neighbour rate and concurrency limits.
    #[serde(default)]
    pub rate_limits: crate::admission::RateLimitsConfig,
    /// Limits on every string, list and message this node accepts (see `docs/security.md`).
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// Flow-back subscriptions.
    #[serde(default)]
    pub flowback: crate::flowback::FlowbackConfig,
    /// Seconds a stopping node lets calls in flight finish after it stopped accepting; the rest are then cut off
    /// (and recorded as cancelled) before the audit chain's head is signed.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// What this node keeps of its agencies' applications and grants, and when it tells them.
    #[serde(default)]
    pub own_view: crate::own_view::OwnViewConfig,
    /// Operational monitoring: per-call records and their retention.
    #[serde(default)]
    pub op_monitoring: crate::opmon::OpMonitoringConfig,
    /// The web console for operators, auditors and agency reviewers; none when absent.
    #[serde(default)]
    pub console: Option<crate::console::ConsoleConfig>,
}

/// Default of `shutdown_grace_secs`.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;

fn default_shutdown_grace_secs() -> u64 {
    DEFAULT_SHUTDOWN_GRACE_SECS
}

/// How this node checks what other nodes sign.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// How far a consumer assertion's signing time may lie from this node's clock, in seconds; assertions
    /// outside the window are refused, and inside it each is accepted once.
    pub assertion_window_secs: u64,
    /// Serial numbers (hex) of federation certificates revoked by the CA; statements they signed are refused.
    pub revoked_serials: Vec<String>,
    /// How often revocations still owed to a neighbour are offered to it again, in milliseconds.
    pub revocation_retry_ms: u64,
    /// A certificate revocation list (PEM or DER) signed by a CA of the bundle; the certificates it names are
    /// refused at every listener, on every outgoing connection and for every statement. Reloaded with the
    /// certificates.
    pub crl: Option<PathBuf>,
    /// Days before the node's own certificate expires from which a warning is logged once a day.
    pub cert_expiry_warning_days: u64,
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            assertion_window_secs: 120,
            revoked_serials: Vec::new(),
            revocation_retry_ms: 2_000,
            crl: None,
            cert_expiry_warning_days: 30,
        }
    }
}

/// The public open-data endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenDataConfig {
    /// Address it listens on (TLS with the node's certificate, no client certificate).
    pub listen: String,
    /// Calls each client address may make per minute.
    #[serde(default = "default_open_rate")]
    pub requests_per_minute: u32,
    /// Pages one `Download` call streams at most; its last page carries the token to continue from.
    #[serde(default = "default_pages_per_call")]
    pub max_pages_per_call: u32,
}

fn default_open_rate() -> u32 {
    60
}

fn default_pages_per_call() -> u32 {
    100
}

/// The plain-HTTP metrics endpoint (`GET /metrics`, OpenMetrics text).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to listen on, e.g. "127.0.0.1:9464"; keep it on a management network.
    pub listen: String,
}

/// Cache of authorized answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Seconds an answer may be served from the cache; 0 disables caching.
    pub ttl_secs: u64,
    /// Answers kept at most.
    pub capacity: u64,
    /// Bytes of answers kept at most.
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl_secs: 60,
            capacity: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Least retention of audit records: three years (seed 002 art. 41).
pub const MIN_RETENTION_DAYS: u32 = 1096;

/// Audit trail settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Days records are kept in the node's store before they may be archived; at least three years.
    pub retention_days: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: MIN_RETENTION_DAYS,
        }
    }
}

impl NodeConfig {
    /// Path of the node's signing key: explicit, or beside an SQLite database; `None` for a PostgreSQL store
    /// without `signing_key`.
    pub fn signing_key_path(&self) -> Option<PathBuf> {
        self.signing_key.clone().or_else(|| match &self.storage {
            StorageConfig::Sqlite { path, .. } => Some(path.with_extension("key")),
            StorageConfig::Postgres { .. } => None,
        })
    }
}

/// Paths of the PEM files that make up a node's TLS identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate(s) that issue every node and agency certificate of the province.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// Where a node keeps its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// An embedded SQLite file.
    Sqlite {
        /// Path of the database file.
        path: PathBuf,
        /// Longest one store operation waits for the database's write lock, retries included, before the call
        /// is answered UNAVAILABLE, in milliseconds.
        #[serde(default = "default_busy_timeout_ms")]
        busy_timeout_ms: u64,
    },
    /// A PostgreSQL database (for a hub whose audit trail outgrows one file, or that runs on managed storage).
    Postgres {
        /// Connection URL, e.g. "postgres://fedgate@db.example:5432/fedgate?sslmode=verify-full"; a password
        /// may come from the URL or from `PGPASSWORD`.
        url: String,
        /// Longest one store operation waits for locks (`lock_timeout`), retries of serialization failures and
        /// deadlocks included, before the call is answered UNAVAILABLE, in milliseconds.
        #[serde(default = "default_busy_timeout_ms")]
        busy_timeout_ms: u64,
    },
}

/// Default of `[storage] busy_timeout_ms`: 10 s.
pub const DEFAULT_BUSY_TIMEOUT_MS: u64 = 10_000;

fn default_busy_timeout_ms() -> u64 {
    DEFAULT_BUSY_TIMEOUT_MS
}

impl StorageConfig {
    /// An SQLite file at `path` with the default busy timeout.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Self::Sqlite {
            path: path.into(),
            busy_timeout_ms: DEFAULT_BUSY_TIMEOUT_MS,
        }
    }

    /// A PostgreSQL database at `url` with the default busy timeout.
    pub fn postgres(url: impl Into<String>) -> Self {
        Self::Postgres {
            url: url.into(),
            busy_timeout_ms: DEFAULT_BUSY_TIMEOUT_MS,
        }
    }

    /// How long one store operation may wait for locks before it gives up (at least 1 ms).
    pub fn busy_timeout(&self) -> std::time::Duration {
        let ms = match self {
            StorageConfig::Sqlite {
                busy_timeout_ms, ..
            }
            | StorageConfig::Postgres {
                busy_timeout_ms, ..
            } => *busy_timeout_ms,
        };
        std::time::Duration::from_millis(ms.max(1))
    }

    /// Where the store is, for messages: the file path, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StorageConfig::Sqlite { path, .. } => path.display().to_string(),
            StorageConfig::Postgres { url, .. } => redact_password(url),
        }
    }
}

/// `url` with any password replaced by "***".
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// A neighbouring node: its code and the address to reach it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerNode {
    /// Its division code.
    pub code: String,
    /// Its gRPC address, e.g. "https://127.0.0.1:7400".
    pub address: String,
    /// Addresses of its other replicas, if it runs several: calls are spread over every address and fail over
    /// to the others when one is down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
}

/// An agency registered on a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgencyConfig {
    /// Unified social credit code.
    pub uscc: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Address of the agency's Provider service, if it provides data.
    #[serde(default)]
    pub provider: Option<String>,
}

/// Limits on forwarding.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Hops a share may take before it is refused.
    pub hop_limit: u32,
    /// Deadline of a share whose caller set none, in milliseconds.
    pub default_timeout_ms: u64,
    /// Time a node keeps for itself when it forwards, in milliseconds.
    pub hop_margin_ms: u64,
    /// Timeout of opening a connection to a neighbour or provider, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Deadline of each call of the uplink to the parent (`Join`, `Push`), in milliseconds; a parent that has not
    /// answered by then is dropped and reached again on a new connection. Keep it above the parent's
    /// `[storage] busy_timeout_ms`.
    pub uplink_call_timeout_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            hop_limit: 8,
            default_timeout_ms: 10_000,
            hop_margin_ms: 20,
            connect_timeout_ms: 2_000,
            uplink_call_timeout_ms: 20_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_are_described_without_their_password() {
        let describe = |url: &str| StorageConfig::postgres(url).describe();
        assert_eq!(
            describe("postgres://hub:s3cr@t@db.example:5432/fedgate?sslmode=require"),
            "postgres://hub:***@db.example:5432/fedgate?sslmode=require"
        );
        assert_eq!(
            describe("postgres://hub@db.example/fedgate"),
            "postgres://hub@db.example/fedgate"
        );
        assert_eq!(describe("postgres:///fedgate"), "postgres:///fedgate");
    }
}
