//! Every check a node makes of its configuration before it starts, in one place: start-up runs
//! [`NodeConfig::check`] and `fedgate check-config` runs it too (with [`check_storage`]), so they cannot drift.
//! Each problem names its key; all of them are reported, not only the first.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{MIN_RETENTION_DAYS, NodeConfig, PeerNode, StorageConfig};
use crate::calendar::WorkCalendar;
use crate::grant::GrantKey;
use crate::ident::{DivisionCode, Peer, Uscc};
use crate::statement::{NodeSigner, RevokedSerials, StatementVerifier};
use crate::tls::TlsMaterial;

/// One problem of a configuration: the key it is about (`tls.cert`, `children[1].code`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key, as a path into the TOML file.
    pub key: String,
    /// What is wrong with its value.
    pub message: String,
}

impl Problem {
    fn new(key: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self {
            key: key.into(),
            message: message.to_string(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Validators shared with the running node already begin their messages with the key.
        if self.message.starts_with(&self.key) {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// What a configuration that passed its checks yields for start-up.
pub struct Checked {
    /// The node's code.
    pub code: DivisionCode,
    /// The node's CA bundle, certificate, key and revocation lists, checked as a reload checks them.
    pub trust: crate::tls::trust::LoadedTrust,
    /// Where the node's signing key is (or is created).
    pub key_path: PathBuf,
    /// The working-day calendar.
    pub calendar: WorkCalendar,
}

impl NodeConfig {
    /// Checks everything start-up checks without touching storage or the network: the code, listen addresses
    /// (well-formed, resolvable, on ports of their own), TLS files (readable, parseable, the certificate names
    /// this node and chains to the bundle, the key is its key, in force now), the revocation list, the signing
    /// key, limits, calendar, audit retention, revoked serials and the topology (the parent's code is this code's
    /// parent, children's codes its children, agencies' codes valid, no address shared by two neighbours).
    /// Returns every problem found.
    pub fn check(&self) -> Result<Checked, Vec<Problem>> {
        let mut problems = Vec::new();
        let code = match self.code.parse::<DivisionCode>() {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(Problem::new("code", e));
                None
            }
        };
        check_listen("listen", &self.listen, &mut problems);
        if let Some(o) = &self.open_data {
            check_listen("open_data.listen", &o.listen, &mut problems);
        }
        if let Some(c) = &self.console {
            check_listen("console.listen", &c.listen, &mut problems);
            if c.session_secs == 0 {
                problems.push(Problem::new(
                    "console.session_secs",
                    "must be at least 1 second",
                ));
            }
        }
        if let Some(m) = &self.metrics {
            check_listen("metrics.listen", &m.listen, &mut problems);
        }
        check_listeners_apart(self, &mut problems);
        let before_tls = problems.len();
        let tls = check_tls(self, code, &mut problems);
        let tls_clean = problems.len() == before_tls;
        let key_path = check_signing_key(self, &mut problems);
        if self.audit.retention_days < MIN_RETENTION_DAYS {
            problems.push(Problem::new(
                "audit.retention_days",
                format!(
                    "{} is below the legal minimum of {MIN_RETENTION_DAYS} days (three years)",
                    self.audit.retention_days
                ),
            ));
        }
        for (key, message) in self.limits.problems(self.routing.hop_limit) {
            problems.push(Problem::new(key, message));
        }
        let calendar = WorkCalendar::new(&self.calendar)
            .map_err(|e| problems.push(Problem::new(e.key(&self.calendar), e.detail())))
            .ok();
        for (i, s) in self.trust.revoked_serials.iter().enumerate() {
            if let Err(e) = RevokedSerials::parse(std::slice::from_ref(s)) {
                problems.push(Problem::new(format!("trust.revoked_serials[{i}]"), e));
            }
        }
        let crl_clean = match &self.trust.crl {
            Some(path) => crate::tls::trust::read_crl(path)
                .map_err(|e| problems.push(Problem::new(e.key, e.reason)))
                .is_ok(),
            None => true,
        };
        // Each file read and named above; then the whole set as start-up and every reload load it (chain to
        // the bundle, revocation lists).
        let trust = match (code, &tls) {
            (Some(code), Some(_)) if tls_clean && crl_clean => {
                let files = crate::tls::trust::TrustFiles::of(self);
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                crate::tls::trust::load_trust(&files, code, now)
                    .map_err(|e| problems.push(Problem::new(e.key, e.reason)))
                    .ok()
            }
            _ => None,
        };
        check_topology(self, code, &mut problems);
        match (code, trust, key_path, calendar) {
            (Some(code), Some(trust), Some(key_path), Some(calendar)) if problems.is_empty() => {
                Ok(Checked {
                    code,
                    trust,
                    key_path,
                    calendar,
                })
            }
            _ => Err(problems),
        }
    }
}

/// A listen address is `host:port` with a port number (the host is resolved when it is bound).
fn check_listen(key: &str, addr: &str, problems: &mut Vec<Problem>) {
    if !is_host_port(addr) {
        problems.push(Problem::new(
            key,
            format!("{addr:?} is not host:port (e.g. \"0.0.0.0:7400\")"),
        ));
    }
}

/// Whether `addr` is `host:port`.
fn is_host_port(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>().is_ok()
        || addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// A listen address whose host is a name resolves (as binding it would need).
fn check_resolves(key: &str, addr: &str, problems: &mut Vec<Problem>) {
    use std::net::ToSocketAddrs;
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return;
    }
    match addr.to_socket_addrs() {
        Ok(found) if !found.as_slice().is_empty() => {}
        Ok(_) => problems.push(Problem::new(
            key,
            format!("{addr:?}: the host has no address"),
        )),
        Err(e) => problems.push(Problem::new(
            key,
            format!("{addr:?}: cannot resolve the host: {e}"),
        )),
    }
}

/// No two listeners of the node (`listen`, `open_data.listen`, `console.listen`, `metrics.listen`) bind the same
/// port on overlapping addresses (the second bind would fail); port 0 is never a clash.
fn check_listeners_apart(config: &NodeConfig, problems: &mut Vec<Problem>) {
    let mut listeners = vec![("listen", config.listen.as_str())];
    listeners.extend(
        config
            .open_data
            .iter()
            .map(|o| ("open_data.listen", o.listen.as_str())),
    );
    listeners.extend(
        config
            .console
            .iter()
            .map(|c| ("console.listen", c.listen.as_str())),
    );
    listeners.extend(
        config
            .metrics
            .iter()
            .map(|m| ("metrics.listen", m.listen.as_str())),
    );
    // A malformed address is named by `check_listen` already.
    listeners.retain(|(_, addr)| is_host_port(addr));
    let before = problems.len();
    for (key, addr) in &listeners {
        check_resolves(key, addr, problems);
    }
    if problems.len() > before {
        return;
    }
    let bound: Vec<(&str, Vec<std::net::SocketAddr>)> = listeners
        .iter()
        .map(|(key, addr)| {
            use std::net::ToSocketAddrs;
            let addrs = addr
                .to_socket_addrs()
                .map(Iterator::collect)
                .unwrap_or_default();
            (*key, addrs)
        })
        .collect();
    let overlap = |a: &std::net::SocketAddr, b: &std::net::SocketAddr| {
        a.port() != 0
            && a.port() == b.port()
            && a.is_ipv4() == b.is_ipv4()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    for (i, (key, addrs)) in bound.iter().enumerate() {
        if let Some((earlier, _)) = bound[..i]
            .iter()
            .find(|(_, e)| addrs.iter().any(|a| e.iter().any(|b| overlap(a, b))))
        {
            problems.push(Problem::new(
                *key,
                format!(
                    "{:?} takes the port of {earlier} ({:?}); each listener needs its own",
                    listeners[i].1,
                    listeners
                        .iter()
                        .find(|(k, _)| k == earlier)
                        .map_or("", |(_, a)| a)
                ),
            ));
        }
    }
}

/// An address of a peer (node or provider): an `https://` URI with a host (every peer speaks TLS).
fn check_peer_address(key: &str, addr: &str, problems: &mut Vec<Problem>) {
    match addr.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => {}
        Ok(_) => problems.push(Problem::new(
            key,
            format!("{addr:?} is not an https:// address with a host (e.g. \"https://node-350100:7400\")"),
        )),
        Err(e) => problems.push(Problem::new(key, format!("{addr:?}: {e}"))),
    }
}

/// Reads and parses the three TLS files, then checks they belong together and to this node.
fn check_tls(
    config: &NodeConfig,
    code: Option<DivisionCode>,
    problems: &mut Vec<Problem>,
) -> Option<TlsMaterial> {
    let read =
        |key: &str, path: &Path, problems: &mut Vec<Problem>| match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) => {
                problems.push(Problem::new(
                    key,
                    format!("cannot read {}: {e}", path.display()),
                ));
                None
            }
        };
    let certs = |key: &str, path: &Path, pem: &str, problems: &mut Vec<Problem>| {
        match CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>() {
            Ok(c) if !c.is_empty() => Some(c),
            Ok(_) => {
                problems.push(Problem::new(
                    key,
                    format!("{}: no CERTIFICATE block", path.display()),
                ));
                None
            }
            Err(e) => {
                problems.push(Problem::new(
                    key,
                    format!("{}: malformed PEM: {e}", path.display()),
                ));
                None
            }
        }
    };
    let files = &config.tls;
    let ca_pem = read("tls.ca", &files.ca, problems);
    let cert_pem = read("tls.cert", &files.cert, problems);
    let key_pem = read("tls.key", &files.key, problems);
    let ca = ca_pem
        .as_deref()
        .and_then(|p| certs("tls.ca", &files.ca, p, problems));
    let chain = cert_pem
        .as_deref()
        .and_then(|p| certs("tls.cert", &files.cert, p, problems));
    let key = key_pem
        .as_deref()
        .and_then(|p| match PrivateKeyDer::from_pem_slice(p.as_bytes()) {
            Ok(k) => Some(k),
            Err(e) => {
                problems.push(Problem::new(
                    "tls.key",
                    format!("{}: no usable private key: {e}", files.key.display()),
                ));
                None
            }
        });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    for (key, path, der) in ca.iter().flatten().map(|c| ("tls.ca", &files.ca, c)).chain(
        chain
            .iter()
            .flat_map(|c| c.first())
            .map(|c| ("tls.cert", &files.cert, c)),
    ) {
        if let Some(p) = in_force(der, now) {
            problems.push(Problem::new(key, format!("{}: {p}", path.display())));
        }
    }
    let (ca, chain, key) = (ca?, chain?, key?);
    let material = TlsMaterial {
        ca_pem: ca_pem?,
        cert_pem: cert_pem?,
        key_pem: key_pem?,
    };
    let _ = ca;
    match material.own_peer() {
        Ok(Peer::Node(c)) if Some(c) == code || code.is_none() => {}
        Ok(Peer::Node(c)) => problems.push(Problem::new(
            "tls.cert",
            format!(
                "{} is the certificate of node {c}, not of node {}",
                files.cert.display(),
                config.code
            ),
        )),
        Ok(other) => problems.push(Problem::new(
            "tls.cert",
            format!(
                "{} is not a node certificate ({})",
                files.cert.display(),
                other.to_uri()
            ),
        )),
        Err(e) => problems.push(Problem::new("tls.cert", e)),
    }
    match rustls::crypto::ring::sign::any_supported_type(&key) {
        Ok(signing) => {
            let certified = rustls::sign::CertifiedKey::new(chain, signing);
            if let Err(e) = certified.keys_match() {
                problems.push(Problem::new(
                    "tls.key",
                    format!(
                        "{} is not the key of the certificate {}: {e}",
                        files.key.display(),
                        files.cert.display()
                    ),
                ));
            }
        }
        Err(e) => problems.push(Problem::new(
            "tls.key",
            format!("{}: {e}", files.key.display()),
        )),
    }
    if let Err(e) = StatementVerifier::new(&material.ca_pem, RevokedSerials::default()) {
        problems.push(Problem::new("tls.ca", e));
    }
    if let Err(e) = NodeSigner::from_material(&material) {
        problems.push(Problem::new("tls.key", e));
    }
    Some(material)
}

/// Why the certificate `der` is not in force at `now` (Unix seconds), if it is not.
fn in_force(der: &CertificateDer<'_>, now: i64) -> Option<String> {
    let (_, cert) = match X509Certificate::from_der(der) {
        Ok(c) => c,
        Err(e) => return Some(format!("not an X.509 certificate: {e}")),
    };
    let v = cert.validity();
    if now > v.not_after.timestamp() {
        Some(format!("expired on {}", v.not_after))
    } else if now < v.not_before.timestamp() {
        Some(format!("not valid before {}", v.not_before))
    } else {
        None
    }
}

/// The signing key: its path is known, and an existing key file holds a key.
fn check_signing_key(config: &NodeConfig, problems: &mut Vec<Problem>) -> Option<PathBuf> {
    let Some(path) = config.signing_key_path() else {
        problems.push(Problem::new(
            "signing_key",
            "give the path of the node's signing key (required with storage.kind = \"postgres\")",
        ));
        return None;
    };
    let key = if config.signing_key.is_some() {
        "signing_key"
    } else {
        "signing_key (default: beside storage.path)"
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            if let Err(e) = GrantKey::parse_key_file(&path, &text) {
                problems.push(Problem::new(key, e));
            }
        }
        // Beside the database, where it goes is the storage's directory: a problem with that is the storage's
        // (start-up names it when it opens the store, `check_storage` for check-config).
        Err(_) if config.signing_key.is_none() => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Created at the first start: where it goes must allow that.
            if let Some(p) = writable_dir_problem(&path) {
                problems.push(Problem::new(key, p));
            }
        }
        Err(e) => problems.push(Problem::new(
            key,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
    Some(path)
}

/// Why a file could not be created at `path` (its directory, or the nearest one that exists, is not a
/// writable directory), if it could not.
fn writable_dir_problem(path: &Path) -> Option<String> {
    let mut dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    while !dir.exists() {
        dir = dir.parent().filter(|d| !d.as_os_str().is_empty())?;
    }
    if !dir.is_dir() {
        return Some(format!(
            "{} cannot be created: {} is not a directory",
            path.display(),
            dir.display()
        ));
    }
    let trial = dir.join(format!(".fedgate-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&trial)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&trial);
            None
        }
        Err(e) => Some(format!(
            "{} cannot be created: directory {} is not writable: {e}",
            path.display(),
            dir.display()
        )),
    }
}

/// The neighbours and agencies fit this node: codes parse, the parent is this code's parent division, each
/// child is one of its child divisions and is listed once, agencies' codes are valid and listed once, every
/// address is an `https://` URI.
fn check_topology(config: &NodeConfig, code: Option<DivisionCode>, problems: &mut Vec<Problem>) {
    let peer = |key: String, p: &PeerNode, problems: &mut Vec<Problem>| {
        check_peer_address(&format!("{key}.address"), &p.address, problems);
        for (j, r) in p.replicas.iter().enumerate() {
            check_peer_address(&format!("{key}.replicas[{j}]"), r, problems);
        }
        match p.code.parse::<DivisionCode>() {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(Problem::new(format!("{key}.code"), e));
                None
            }
        }
    };
    if let Some(p) = &config.parent
        && let Some(parent) = peer("parent".into(), p, problems)
        && let Some(code) = code
        && !parent.is_parent_of(&code)
    {
        problems.push(Problem::new(
            "parent.code",
            format!("{parent} is not the parent division of node {code}"),
        ));
    }
    check_neighbour_addresses(config, problems);
    let mut seen = HashSet::new();
    for (i, c) in config.children.iter().enumerate() {
        let Some(child) = peer(format!("children[{i}]"), c, problems) else {
            continue;
        };
        if let Some(code) = code
            && !code.is_parent_of(&child)
        {
            problems.push(Problem::new(
                format!("children[{i}].code"),
                format!("{child} is not a child division of node {code}"),
            ));
        }
        if !seen.insert(child) {
            problems.push(Problem::new(
                format!("children[{i}].code"),
                format!("{child} is listed twice"),
            ));
        }
    }
    let mut seen = HashSet::new();
    for (i, a) in config.agencies.iter().enumerate() {
        if let Some(p) = &a.provider {
            check_peer_address(&format!("agencies[{i}].provider"), p, problems);
        }
        match a.uscc.parse::<Uscc>() {
            Ok(u) => {
                if !seen.insert(u.clone()) {
                    problems.push(Problem::new(
                        format!("agencies[{i}].uscc"),
                        format!("{u} is listed twice"),
                    ));
                }
            }
            Err(e) => problems.push(Problem::new(format!("agencies[{i}].uscc"), e)),
        }
    }
}

/// No address is given to two different neighbours: a node answers under one code, so a call that reaches it as
/// the other is refused by the identity check.
fn check_neighbour_addresses(config: &NodeConfig, problems: &mut Vec<Problem>) {
    let mut owner: std::collections::HashMap<String, (String, &str)> =
        std::collections::HashMap::new();
    let neighbours = config
        .parent
        .iter()
        .map(|p| ("parent".to_owned(), p))
        .chain(
            config
                .children
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("children[{i}]"), c)),
        );
    for (key, p) in neighbours {
        let addresses = std::iter::once((format!("{key}.address"), &p.address)).chain(
            p.replicas
                .iter()
                .enumerate()
                .map(|(j, r)| (format!("{key}.replicas[{j}]"), r)),
        );
        for (at, address) in addresses {
            let normal = address.trim_end_matches('/').to_ascii_lowercase();
            match owner.get(&normal) {
                Some((first, code)) if *code != p.code => problems.push(Problem::new(
                    at,
                    format!("{address:?} is also the address of node {code} ({first})"),
                )),
                Some(_) => {}
                None => {
                    owner.insert(normal, (at, p.code.as_str()));
                }
            }
        }
    }
}

/// Whether the configured storage can be used, without changing it: an SQLite file that exists opens and
/// answers, one that does not can be created; a PostgreSQL server accepts a connection within `timeout`.
pub async fn check_storage(storage: &StorageConfig, timeout: Duration) -> Option<Problem> {
    match storage {
        StorageConfig::Sqlite { path, .. } => {
            if !path.exists() {
                return writable_dir_problem(path).map(|p| Problem::new("storage.path", p));
            }
            let opened = tokio::time::timeout(timeout, async {
                let store = crate::store::SqliteStore::open_read_only(path).await?;
                let pinged = crate::store::Store::ping(&store).await;
                store.close().await;
                pinged
            })
            .await;
            match opened {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Problem::new(
                    "storage.path",
                    format!("{}: {e}", path.display()),
                )),
                Err(_) => Some(Problem::new(
                    "storage.path",
                    format!("{} did not open within {timeout:?}", path.display()),
                )),
            }
        }
        StorageConfig::Postgres { url, .. } => {
            match tokio::time::timeout(timeout, crate::store::PgStore::reachable(url)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Problem::new(
                    "storage.url",
                    format!("cannot connect to {}: {e}", storage.describe()),
                )),
                Err(_) => Some(Problem::new(
                    "storage.url",
                    format!("{} did not answer within {timeout:?}", storage.describe()),
                )),
            }
        }
    }
}
