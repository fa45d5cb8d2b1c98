//! Federations of real `fedgate node` processes on loopback, for fault tests: each node is the `fedgate` binary
//! started from a TOML configuration, which a test can stop with SIGTERM, kill with SIGKILL and start again on
//! the same port and database. Provider agencies run inside the test process. A [`Relay`] can sit on a child's
//! link to its parent and cut it.
//!
//! **Ports.** A node's port is picked by binding `127.0.0.1:0` and keeping that listener until just before the
//! node is spawned, when it is dropped so the node can bind the same port. In the short window between the two,
//! another process could take the port (other tests binding ephemeral ports on the same machine); the node then
//! exits with "address in use" and the harness spawns it again on the same port for a few seconds. If the port
//! stays taken, [`ProcessFederation::start`] starts the whole federation again with new ports; a restarted node
//! (which must keep its port) fails with [`PortTaken`]. Relays and providers keep their listeners, so they have no
//! such window.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fedgate_examples::{civil_affairs_entries, connect_agency, publish_all};
use fedgate_gateway::audit::ChainVerifier;
use fedgate_gateway::config::{
    AgencyConfig, CacheConfig, NodeConfig, PeerNode, RoutingConfig, StorageConfig, TlsFiles,
};
use fedgate_gateway::ident::{DivisionCode, Peer, Uscc};
use fedgate_gateway::pki::{DevCa, write_pem_files};
use fedgate_gateway::store::{SqliteStore, Store};
use fedgate_node::devnet::{Agencies, DevAgency, NodeSpec, start_agency};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{AuditRecord, Stream};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, OnceCell, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tonic::transport::Channel;

/// How long a node may take to print that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM.
const TERM_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a node is respawned on its port while something else holds it.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// Poll interval of every wait here.
const POLL: Duration = Duration::from_millis(20);

static BINARY: OnceCell<PathBuf> = OnceCell::const_new();
static PROVIDER_BINARY: OnceCell<PathBuf> = OnceCell::const_new();
static AGENCY_CLIENT_BINARY: OnceCell<PathBuf> = OnceCell::const_new();

/// The `fedgate` binary of this workspace, built once per test process with the test's own profile.
///
/// `FEDGATE_BIN` names a prebuilt binary instead. Otherwise `cargo build -p fedgate-node --bin fedgate` runs once
/// (quick when it is up to date) and the binary is taken from the target directory the test runs from
/// (`target/<profile>/deps/<test>` → `target/<profile>/fedgate`), which follows `CARGO_TARGET_DIR`.
pub async fn fedgate_binary() -> Result<PathBuf> {
    BINARY
        .get_or_try_init(|| workspace_binary("FEDGATE_BIN", "fedgate-node", "fedgate"))
        .await
        .cloned()
}

/// The example `civil-registry-provider` binary, built and found like [`fedgate_binary`]
/// (`FEDGATE_PROVIDER_BIN` names a prebuilt one).
pub async fn provider_binary() -> Result<PathBuf> {
    PROVIDER_BINARY
        .get_or_try_init(|| {
            workspace_binary(
                "FEDGATE_PROVIDER_BIN",
                "fedgate-examples",
                "civil-registry-provider",
            )
        })
        .await
        .cloned()
}

/// The example `agency-client` binary, built and found like [`fedgate_binary`] (`FEDGATE_AGENCY_CLIENT_BIN`
/// names a prebuilt one).
pub async fn agency_client_binary() -> Result<PathBuf> {
    AGENCY_CLIENT_BINARY
        .get_or_try_init(|| {
            workspace_binary(
                "FEDGATE_AGENCY_CLIENT_BIN",
                "fedgate-examples",
                "agency-client",
            )
        })
        .await
        .cloned()
}

/// Builds binary `bin` of workspace package `package` with the running test's profile (unless the variable
/// `env` names a prebuilt one) and returns its path.
async fn workspace_binary(env: &str, package: &str, bin: &str) -> Result<PathBuf> {
    if let Some(prebuilt) = std::env::var_os(env) {
        return Ok(PathBuf::from(prebuilt));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("debug")))
        .ok_or_else(|| anyhow!("cannot derive the target directory from {}", exe.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("Cargo.toml");
    let mut cmd = Command::new(env!("CARGO"));
    // Variables cargo set for this test describe the test's package; build scripts that track them (ring
    // tracks CARGO_MANIFEST_DIR) would otherwise rebuild everything on every run.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k == "CARGO_MANIFEST_DIR"
            || k == "CARGO_MANIFEST_PATH"
            || k == "CARGO_CRATE_NAME"
            || k == "CARGO_PRIMARY_PACKAGE"
            || k == "CARGO_TARGET_TMPDIR"
            || k == "OUT_DIR"
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.arg("build")
        .arg("-q")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", package, "--bin", bin]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running cargo build for {bin}"))?;
    if !out.status.success() {
        bail!(
            "cargo build of {bin} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!("built {bin} but found no binary at {}", path.display());
    }
    Ok(path)
}

/// A node could not bind its port: another process holds it.
#[derive(Debug)]
pub struct PortTaken {
    /// The node.
    pub code: DivisionCode,
    /// Its address.
    pub addr: SocketAddr,
}

impl std::fmt::Display for PortTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {} cannot bind {}: another process holds the port",
            self.code, self.addr
        )
    }
}

impl std::error::Error for PortTaken {}

/// One process of a federation: a node (replica 0) or another replica of a node sharing its database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// The node.
    pub code: DivisionCode,
    /// Which of its processes: 0 for the node as first started, 1.. for the replicas added to it.
    pub replica: usize,
}

impl Member {
    /// The first (or only) process of `code`.
    pub fn of(code: DivisionCode) -> Self {
        Self { code, replica: 0 }
    }

    /// Replica `replica` of `code`.
    pub fn replica(code: DivisionCode, replica: usize) -> Self {
        Self { code, replica }
    }
}

impl From<DivisionCode> for Member {
    fn from(code: DivisionCode) -> Self {
        Self::of(code)
    }
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.replica {
            0 => write!(f, "{}", self.code),
            r => write!(f, "{}#{r}", self.code),
        }
    }
}

/// One node process and everything needed to start it again.
struct ProcNode {
    config: NodeConfig,
    config_path: PathBuf,
    db_path: PathBuf,
    addr: SocketAddr,
    /// The listener that reserves the port until the first start.
    reserved: Option<std::net::TcpListener>,
    child: Option<Child>,
    /// Number of times the node was started; names the log files.
    starts: u32,
    /// Arguments after `node --config <file>`, and environment variables, of its next starts.
    launch: (Vec<String>, Vec<(String, String)>),
}

/// A running federation of node processes; see the module documentation.
///
/// Dropping it kills every node (SIGKILL) and stops the providers and relays; [`ProcessFederation::shutdown`]
/// stops the nodes gracefully instead.
pub struct ProcessFederation {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    ca: DevCa,
    bin: PathBuf,
    nodes: BTreeMap<Member, ProcNode>,
    agencies: Agencies,
    relays: BTreeMap<DivisionCode, Relay>,
    stop_providers: watch::Sender<bool>,
}

impl std::fmt::Debug for ProcessFederation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessFederation")
            .field("dir", &self.path)
            .field("nodes", &self.nodes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Nearest ancestor of `code` among `codes`.
fn parent_in(code: DivisionCode, codes: &[DivisionCode]) -> Option<DivisionCode> {
    let mut p = code.parent();
    while let Some(c) = p {
        if codes.contains(&c) {
            return Some(c);
        }
        p = c.parent();
    }
    None
}

impl ProcessFederation {
    /// Starts every node of `specs` as a process and every provider in this process, puts a [`Relay`] on the
    /// parent link of each node in `relayed`, waits until every node listens and publishes the providers'
    /// catalogs.
    ///
    /// If another process takes a node's port before the node binds it and keeps it, the federation is started
    /// again from scratch with new ports (up to three times).
    pub async fn start(specs: Vec<NodeSpec>, relayed: &[DivisionCode]) -> Result<Self> {
        Self::start_configured(specs, relayed, &|_| {}).await
    }

    /// Like [`ProcessFederation::start`], letting `configure` change each node's configuration before it is
    /// written (the harness's defaults: no cache, no metrics, no open data).
    pub async fn start_configured(
        specs: Vec<NodeSpec>,
        relayed: &[DivisionCode],
        configure: &(dyn Fn(&mut NodeConfig) + Sync),
    ) -> Result<Self> {
        Self::start_replicated(specs, relayed, configure, &BTreeMap::new()).await
    }

    /// Like [`ProcessFederation::start_configured`], starting `replicas[code]` more processes of each node named
    /// there, with the same configuration but their own ports (their storage must be one they can share:
    /// PostgreSQL, set by `configure`); every neighbour lists all of a node's addresses.
    pub async fn start_replicated(
        specs: Vec<NodeSpec>,
        relayed: &[DivisionCode],
        configure: &(dyn Fn(&mut NodeConfig) + Sync),
        replicas: &BTreeMap<DivisionCode, usize>,
    ) -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(specs.clone(), relayed, configure, replicas).await {
                Err(e) if attempt < 3 && e.downcast_ref::<PortTaken>().is_some() => {
                    tracing::warn!(error = %e, "starting the federation again with new ports");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(
        specs: Vec<NodeSpec>,
        relayed: &[DivisionCode],
        configure: &(dyn Fn(&mut NodeConfig) + Sync),
        replicas: &BTreeMap<DivisionCode, usize>,
    ) -> Result<Self> {
        crate::init();
        let bin = fedgate_binary().await?;
        let dir = tempfile::Builder::new().prefix("fedgate-proc-").tempdir()?;
        let path = dir.path().to_path_buf();
        let pki = path.join("pki");
        std::fs::create_dir_all(&pki)?;
        std::fs::create_dir_all(path.join("logs"))?;
        let ca = DevCa::generate("fedgate process federation root")?;
        let ca_path = pki.join("ca.crt");
        std::fs::write(&ca_path, ca.ca_pem())?;

        let codes: Vec<DivisionCode> = specs.iter().map(|s| s.code).collect();
        let mut reserved = BTreeMap::new();
        for s in &specs {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            if reserved.insert(s.code, l).is_some() {
                bail!("node {} is listed twice", s.code);
            }
        }
        let addrs: BTreeMap<DivisionCode, SocketAddr> = reserved
            .iter()
            .map(|(c, l)| Ok((*c, l.local_addr()?)))
            .collect::<Result<_>>()?;
        let mut replica_ports: BTreeMap<DivisionCode, Vec<std::net::TcpListener>> = BTreeMap::new();
        for (code, n) in replicas {
            if !codes.contains(code) {
                bail!("replicas of node {code}, which is not in the federation");
            }
            for _ in 0..*n {
                replica_ports
                    .entry(*code)
                    .or_default()
                    .push(std::net::TcpListener::bind("127.0.0.1:0")?);
            }
        }
        // The addresses of each node's other processes, as its neighbours list them.
        let others: BTreeMap<DivisionCode, Vec<String>> = replica_ports
            .iter()
            .map(|(c, ls)| {
                let addrs = ls
                    .iter()
                    .map(|l| Ok(format!("https://{}", l.local_addr()?)))
                    .collect::<Result<Vec<_>>>()?;
                Ok((*c, addrs))
            })
            .collect::<Result<_>>()?;
        let others_of = |c: &DivisionCode| others.get(c).cloned().unwrap_or_default();

        let mut relays = BTreeMap::new();
        for child in relayed {
            let parent = parent_in(*child, &codes)
                .ok_or_else(|| anyhow!("node {child} has no parent to relay to"))?;
            relays.insert(*child, Relay::start(addrs[&parent]).await?);
        }

        let (stop_providers, stop_rx) = watch::channel(false);
        let mut agencies = Agencies::default();
        let mut agency_configs: BTreeMap<DivisionCode, Vec<AgencyConfig>> = BTreeMap::new();
        for s in &specs {
            for a in &s.agencies {
                let (config, agency) = start_agency(&ca, &pki, s.code, a, stop_rx.clone()).await?;
                agency_configs.entry(s.code).or_default().push(config);
                agencies.insert(a.uscc.clone(), agency);
            }
        }

        let mut nodes = BTreeMap::new();
        for s in &specs {
            let cert = ca.issue(&Peer::Node(s.code), &[])?;
            let (cert_path, key_path) = write_pem_files(&pki, &format!("node-{}", s.code), &cert)?;
            let parent = parent_in(s.code, &codes).map(|p| PeerNode {
                code: p.to_string(),
                address: match relays.get(&s.code) {
                    Some(r) => format!("https://{}", r.addr()),
                    None => format!("https://{}", addrs[&p]),
                },
                replicas: others_of(&p),
            });
            let children = codes
                .iter()
                .filter(|c| parent_in(**c, &codes) == Some(s.code))
                .map(|c| PeerNode {
                    code: c.to_string(),
                    address: format!("https://{}", addrs[c]),
                    replicas: others_of(c),
                })
                .collect();
            let db_path = path.join(format!("node-{}.db", s.code));
            let mut config = NodeConfig {
                code: s.code.to_string(),
                listen: addrs[&s.code].to_string(),
                tls: TlsFiles {
                    ca: ca_path.clone(),
                    cert: cert_path,
                    key: key_path,
                },
                storage: StorageConfig::sqlite(db_path.clone()),
                parent,
                children,
                agencies: agency_configs.remove(&s.code).unwrap_or_default(),
                routing: RoutingConfig::default(),
                signing_key: None,
                audit: Default::default(),
                calendar: Default::default(),
                // Every share travels its whole route: no answer comes from the consumer node's cache.
                cache: CacheConfig {
                    ttl_secs: 0,
                    ..CacheConfig::default()
                },
                open_data: None,
                metrics: None,
                trust: Default::default(),
                connections: Default::default(),
                rate_limits: Default::default(),
                limits: Default::default(),
                flowback: Default::default(),
                shutdown_grace_secs: fedgate_gateway::config::DEFAULT_SHUTDOWN_GRACE_SECS,
                own_view: Default::default(),
                op_monitoring: Default::default(),
                console: None,
            };
            configure(&mut config);
            let config_path = path.join(format!("node-{}.toml", s.code));
            std::fs::write(
                &config_path,
                toml::to_string(&config).context("writing a node configuration")?,
            )?;
            for (r, listener) in replica_ports
                .remove(&s.code)
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                let addr = listener.local_addr()?;
                let mut config = config.clone();
                config.listen = addr.to_string();
                let config_path = path.join(format!("node-{}-r{}.toml", s.code, r + 1));
                std::fs::write(
                    &config_path,
                    toml::to_string(&config).context("writing a node configuration")?,
                )?;
                nodes.insert(
                    Member::replica(s.code, r + 1),
                    ProcNode {
                        config,
                        config_path,
                        db_path: db_path.clone(),
                        addr,
                        reserved: Some(listener),
                        child: None,
                        starts: 0,
                        launch: Default::default(),
                    },
                );
            }
            nodes.insert(
                Member::of(s.code),
                ProcNode {
                    config,
                    config_path,
                    db_path,
                    addr: addrs[&s.code],
                    reserved: reserved.remove(&s.code),
                    child: None,
                    starts: 0,
                    launch: Default::default(),
                },
            );
        }

        let mut fed = Self {
            dir: Some(dir),
            path,
            ca,
            bin,
            nodes,
            agencies,
            relays,
            stop_providers,
        };
        let started = async {
            // Spawn every node first, then wait for all: they start in parallel.
            let codes: Vec<Member> = fed.nodes.keys().copied().collect();
            for c in &codes {
                fed.spawn(*c)?;
            }
            for c in &codes {
                fed.wait_listening(*c).await?;
            }
            fed.publish_catalogs(&specs).await
        }
        .await;
        if let Err(e) = started {
            fed.print_logs();
            return Err(e);
        }
        Ok(fed)
    }

    async fn publish_catalogs(&mut self, specs: &[NodeSpec]) -> Result<()> {
        for s in specs {
            for a in &s.agencies {
                let Some(p) = a.provider else { continue };
                let mut client = self.client(&a.uscc).await?;
                let stored =
                    publish_all(&mut client, civil_affairs_entries(p.household, p.marriage))
                        .await
                        .map_err(|e| anyhow!("publishing the catalog of {}: {e}", a.uscc))?;
                if let Some(agency) = self.agencies.get_mut(&a.uscc) {
                    agency.published = stored;
                }
            }
        }
        Ok(())
    }

    fn proc_node(&self, code: impl Into<Member>) -> Result<&ProcNode> {
        let m = code.into();
        self.nodes
            .get(&m)
            .ok_or_else(|| anyhow!("no node {m} in this federation"))
    }

    fn proc_node_mut(&mut self, code: impl Into<Member>) -> Result<&mut ProcNode> {
        let m = code.into();
        self.nodes
            .get_mut(&m)
            .ok_or_else(|| anyhow!("no node {m} in this federation"))
    }

    fn log_paths(&self, code: Member, start: u32) -> (PathBuf, PathBuf) {
        let logs = self.path.join("logs");
        let name = match code.replica {
            0 => format!("node-{}", code.code),
            r => format!("node-{}-r{r}", code.code),
        };
        (
            logs.join(format!("{name}.{start}.out")),
            logs.join(format!("{name}.{start}.err")),
        )
    }

    /// Spawns the node process (its port reservation, if any, is released first).
    fn spawn(&mut self, code: Member) -> Result<()> {
        let bin = self.bin.clone();
        let cwd = self.path.clone();
        let start = self.proc_node(code)?.starts + 1;
        let (out, err) = self.log_paths(code, start);
        let n = self.proc_node_mut(code)?;
        if n.child.is_some() {
            bail!("node {code} is running");
        }
        let stdout = std::fs::File::create(&out)?;
        let stderr = std::fs::File::create(&err)?;
        let log_filter = std::env::var("FEDGATE_NODE_LOG").unwrap_or_else(|_| "info".to_owned());
        // The port is free from here until the node binds it.
        n.reserved = None;
        let child = Command::new(&bin)
            .arg("node")
            .arg("--config")
            .arg(&n.config_path)
            .current_dir(&cwd)
            .args(&n.launch.0)
            .env("RUST_LOG", log_filter)
            .envs(n.launch.1.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {} for node {code}", bin.display()))?;
        n.child = Some(child);
        n.starts = start;
        Ok(())
    }

    /// Waits until the node's current process prints that it listens; respawns it while its port is taken.
    async fn wait_listening(&mut self, code: Member) -> Result<Duration> {
        let began = Instant::now();
        loop {
            let start = self.proc_node(code)?.starts;
            let (out, err) = self.log_paths(code, start);
            let n = self.proc_node_mut(code)?;
            let child = n
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("node {code} is not running"))?;
            if std::fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("listening on")
            {
                return Ok(began.elapsed());
            }
            if let Some(status) = child.try_wait()? {
                n.child = None;
                let stderr = std::fs::read_to_string(&err).unwrap_or_default();
                let in_use =
                    stderr.contains("Address already in use") || stderr.contains("os error 98");
                if in_use && began.elapsed() < BIND_RETRY {
                    tracing::warn!(node = %code, "port taken; spawning the node again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.spawn(code)?;
                    continue;
                }
                if in_use {
                    return Err(PortTaken {
                        code: code.code,
                        addr: self.proc_node(code)?.addr,
                    }
                    .into());
                }
                bail!("node {code} exited with {status} before listening:\n{stderr}");
            }
            if began.elapsed() > START_TIMEOUT {
                bail!("node {code} did not listen within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs node `code` from its next start with `args` after `node --config <file>` and with `env` set
    /// (`RUST_LOG` in it overrides the default filter).
    pub fn set_launch(
        &mut self,
        code: impl Into<Member>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let n = self.proc_node_mut(code.into())?;
        n.launch = (
            args.iter().map(|a| (*a).to_owned()).collect(),
            env.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        Ok(())
    }

    /// Starts a stopped node on its old port with its old database; returns how long it took to listen.
    pub async fn start_node(&mut self, code: impl Into<Member>) -> Result<Duration> {
        let code: Member = code.into();
        self.spawn(code)?;
        self.wait_listening(code).await
    }

    /// Stops a node with SIGTERM and waits for it to exit; it must exit successfully. Returns how long it took.
    pub async fn terminate(&mut self, code: impl Into<Member>) -> Result<Duration> {
        let code: Member = code.into();
        let began = Instant::now();
        let n = self.proc_node_mut(code)?;
        let mut child = n
            .child
            .take()
            .ok_or_else(|| anyhow!("node {code} is not running"))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("node {code} has already exited"))?;
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .context("running kill -TERM")?;
        if !sent.success() {
            bail!("kill -TERM {pid} (node {code}) failed: {sent}");
        }
        match tokio::time::timeout(TERM_TIMEOUT, child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("node {code} exited with {status} after SIGTERM");
                }
                Ok(began.elapsed())
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!("node {code} did not exit within {TERM_TIMEOUT:?} of SIGTERM; killed it")
            }
        }
    }

    /// Kills a node with SIGKILL and reaps it.
    pub async fn kill9(&mut self, code: impl Into<Member>) -> Result<()> {
        let code: Member = code.into();
        let n = self.proc_node_mut(code)?;
        let mut child = n
            .child
            .take()
            .ok_or_else(|| anyhow!("node {code} is not running"))?;
        child.start_kill()?;
        child.wait().await?;
        Ok(())
    }

    /// Sends SIGHUP to the node's process (it reloads its certificates and revocation lists).
    pub async fn hangup(&self, code: impl Into<Member>) -> Result<()> {
        let pid = self.pid(code)?;
        signal(&pid.to_string(), "-HUP").await
    }

    /// Whether the node's process is running.
    pub fn is_running(&self, code: impl Into<Member>) -> bool {
        self.nodes
            .get(&code.into())
            .is_some_and(|n| n.child.is_some())
    }

    /// The directory holding the PKI, configurations, databases and logs.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The development CA.
    pub fn ca(&self) -> &DevCa {
        &self.ca
    }

    /// The codes of all nodes, in code order (the province first).
    pub fn node_codes(&self) -> Vec<DivisionCode> {
        self.nodes
            .keys()
            .filter(|m| m.replica == 0)
            .map(|m| m.code)
            .collect()
    }

    /// The root of the federation (the node without a listed ancestor).
    pub fn root(&self) -> Result<DivisionCode> {
        let codes = self.node_codes();
        codes
            .iter()
            .copied()
            .find(|c| parent_in(*c, &codes).is_none())
            .ok_or_else(|| anyhow!("the federation has no root"))
    }

    /// The nodes of `code`'s subtree held by the federation, `code` included.
    pub fn subtree(&self, code: DivisionCode) -> Vec<DivisionCode> {
        self.node_codes()
            .into_iter()
            .filter(|c| code.contains(c))
            .collect()
    }

    /// The node's `https://` address.
    pub fn node_url(&self, code: impl Into<Member>) -> Result<String> {
        let code: Member = code.into();
        Ok(format!("https://{}", self.proc_node(code)?.addr))
    }

    /// The configuration the node runs with.
    pub fn node_config(&self, code: impl Into<Member>) -> Result<&NodeConfig> {
        let code: Member = code.into();
        Ok(&self.proc_node(code)?.config)
    }

    /// The process id of the node's running process.
    pub fn pid(&self, code: impl Into<Member>) -> Result<u32> {
        let code: Member = code.into();
        self.proc_node(code)?
            .child
            .as_ref()
            .and_then(Child::id)
            .ok_or_else(|| anyhow!("node {code} is not running"))
    }

    /// The node's SQLite database file.
    pub fn db_path(&self, code: impl Into<Member>) -> Result<&Path> {
        let code: Member = code.into();
        Ok(&self.proc_node(code)?.db_path)
    }

    /// The node's configuration file.
    pub fn config_path(&self, code: DivisionCode) -> Result<&Path> {
        Ok(&self.proc_node(code)?.config_path)
    }

    /// Changes a stopped node's configuration with `change` (for instance to move its state to another
    /// directory) and rewrites its configuration file; the node keeps its port.
    pub fn reconfigure(
        &mut self,
        code: DivisionCode,
        change: impl FnOnce(&mut NodeConfig),
    ) -> Result<()> {
        let n = self.proc_node_mut(code)?;
        if n.child.is_some() {
            bail!("node {code} is running: stop it before changing its configuration");
        }
        change(&mut n.config);
        if let StorageConfig::Sqlite { path, .. } = &n.config.storage {
            n.db_path = path.clone();
        }
        std::fs::write(
            &n.config_path,
            toml::to_string(&n.config).context("writing a node configuration")?,
        )?;
        Ok(())
    }

    /// Runs the `fedgate` binary with `args` in the federation's directory and waits for it to exit.
    pub async fn fedgate<I, S>(&self, args: I) -> Result<CommandOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = Command::new(&self.bin)
            .args(&args)
            .current_dir(&self.path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running fedgate {args:?}"))?;
        Ok(CommandOutput {
            args: args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Copies a stopped node's SQLite files (the database and its WAL, if any) under `name` in the federation's
    /// directory: a backup as a copy of the files makes it.
    pub fn copy_store(&self, code: DivisionCode, name: &str) -> Result<StoreCopy> {
        if self.is_running(code) {
            bail!("node {code} is running; stop it (or use copy_store_frozen) first");
        }
        self.copy_files(code, name)
    }

    /// Copies a running node's SQLite files while its process is frozen (SIGSTOP, then SIGCONT): what the disk
    /// holds at that instant, as a crash there would leave it — commits still in the WAL, the chain's head perhaps
    /// unsigned, a write in progress torn. Putting it back later loses every commit made after it, as a power cut
    /// loses the last commits of a node in `synchronous=NORMAL`.
    pub async fn copy_store_frozen(&self, code: DivisionCode, name: &str) -> Result<StoreCopy> {
        let pid = self.pid(code)?.to_string();
        signal(&pid, "-STOP").await?;
        let copied = self.copy_files(code, name);
        signal(&pid, "-CONT").await?;
        copied
    }

    fn copy_files(&self, code: DivisionCode, name: &str) -> Result<StoreCopy> {
        let db = self.db_path(code)?;
        let dir = self.path.join("copies").join(name);
        std::fs::create_dir_all(&dir)?;
        let mut files = Vec::new();
        for suffix in STORE_FILES {
            let from = sidecar(db, suffix);
            if from.exists() {
                std::fs::copy(&from, dir.join(format!("store{suffix}")))
                    .with_context(|| format!("copying {}", from.display()))?;
                files.push(suffix);
            }
        }
        if !files.contains(&"") {
            bail!("node {code} has no database at {}", db.display());
        }
        Ok(StoreCopy { code, dir, files })
    }

    /// Puts `copy` back in place of a stopped node's SQLite files (its shared-memory index is removed, as after a
    /// reboot: SQLite rebuilds it from the WAL).
    pub fn restore_store(&self, copy: &StoreCopy) -> Result<()> {
        let code = copy.code;
        if self.is_running(code) {
            bail!("node {code} is running; stop it first");
        }
        let db = self.db_path(code)?;
        for suffix in STORE_FILES.iter().chain(&["-shm"]) {
            let to = sidecar(db, suffix);
            if to.exists() {
                std::fs::remove_file(&to).with_context(|| format!("removing {}", to.display()))?;
            }
        }
        for suffix in &copy.files {
            std::fs::copy(copy.dir.join(format!("store{suffix}")), sidecar(db, suffix))?;
        }
        Ok(())
    }

    /// The relay on `child`'s link to its parent.
    pub fn relay(&self, child: DivisionCode) -> Result<&Relay> {
        self.relays
            .get(&child)
            .ok_or_else(|| anyhow!("no relay on the parent link of node {child}"))
    }

    /// One agency.
    pub fn agency(&self, uscc: &Uscc) -> Result<&DevAgency> {
        self.agencies.agency(uscc)
    }

    /// The first agency at `node` that serves a registry.
    pub fn provider_at(&self, node: DivisionCode) -> Result<&DevAgency> {
        self.agencies.provider_at(node)
    }

    /// The first consumer (non-provider) agency at `node`.
    pub fn consumer_at(&self, node: DivisionCode) -> Result<&DevAgency> {
        self.agencies.consumer_at(node)
    }

    /// A valid ID number held by the provider agency at `node`.
    pub fn key_at(&self, node: DivisionCode, i: usize) -> Result<String> {
        let p = self.provider_at(node)?;
        p.registry
            .as_ref()
            .and_then(|r| r.sample_id(i))
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("provider at {node} has no record {i}"))
    }

    /// A client of an agency's node, authenticated with the agency's certificate.
    pub async fn client(&self, uscc: &Uscc) -> Result<AgencyClient<Channel>> {
        let a = self.agency(uscc)?;
        Ok(connect_agency(
            &self.node_url(a.node)?,
            a.node.as_str(),
            self.ca.ca_pem(),
            &a.cert.cert_pem,
            &a.cert.key_pem,
        )
        .await?)
    }

    /// The log files of every start of a node, oldest first.
    pub fn log_files(&self, code: impl Into<Member>) -> Vec<PathBuf> {
        let code = code.into();
        let starts = self.nodes.get(&code).map_or(0, |n| n.starts);
        (1..=starts)
            .flat_map(|s| {
                let (o, e) = self.log_paths(code, s);
                [o, e]
            })
            .collect()
    }

    /// Prints the tail of every node's logs to stderr (captured by the test harness, shown on failure).
    pub fn print_logs(&self) {
        eprintln!("==== fedgate node logs under {} ====", self.path.display());
        for code in self.nodes.keys() {
            for f in self.log_files(*code) {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(60);
                eprintln!(
                    "---- {} ({} lines, last {}) ----",
                    f.display(),
                    lines.len(),
                    lines.len() - from
                );
                for l in &lines[from..] {
                    eprintln!("{l}");
                }
            }
        }
    }

    /// Keeps the temporary directory after the federation is dropped and returns its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(d) = self.dir.take() {
            let _ = d.keep();
        }
        self.path.clone()
    }

    /// Ends a fault test: on success shuts the federation down and prints `passed` with the test's notes and the
    /// outcome's summary; on failure prints the notes and the nodes' logs, keeps the files for inspection, and
    /// returns the error.
    pub async fn conclude(
        mut self,
        label: &str,
        outcome: Result<String>,
        notes: &[String],
        passed: impl std::fmt::Display,
    ) -> Result<()> {
        match outcome {
            Ok(summary) => {
                self.shutdown().await?;
                println!("{label}: passed {passed}");
                for n in notes {
                    println!("  {n}");
                }
                println!("  {summary}");
                Ok(())
            }
            Err(e) => {
                eprintln!("{label}: failed ({passed})");
                for n in notes {
                    eprintln!("  {n}");
                }
                self.print_logs();
                let path = self.keep_dir();
                eprintln!("kept the federation's files in {}", path.display());
                let _ = self.shutdown().await;
                Err(e)
            }
        }
    }

    /// Stops every running node with SIGTERM, leaves first, then the providers and relays.
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop_all().await?;
        let _ = self.stop_providers.send(true);
        Ok(())
    }

    /// Stops every running node with SIGTERM, leaves first; the federation stays usable (nodes can start again).
    pub async fn stop_all(&mut self) -> Result<()> {
        let mut codes: Vec<Member> = self.nodes.keys().copied().collect();
        codes.sort_by_key(|c| std::cmp::Reverse(c.code.level()));
        let mut failures = Vec::new();
        for c in codes {
            if self.is_running(c)
                && let Err(e) = self.terminate(c).await
            {
                failures.push(format!("{e:#}"));
            }
        }
        if !failures.is_empty() {
            bail!("stopping the federation: {}", failures.join("; "));
        }
        Ok(())
    }
}

impl Drop for ProcessFederation {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        if std::env::var_os("FEDGATE_KEEP").is_some() {
            let path = self.keep_dir();
            eprintln!("kept the process federation's files in {}", path.display());
        }
        let _ = self.stop_providers.send(true);
        // Child processes are killed by `kill_on_drop`; relays abort their tasks when dropped.
    }
}

/// How a `fedgate` command run by [`ProcessFederation::fedgate`] ended and what it printed.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// Its arguments.
    pub args: Vec<String>,
    /// Its exit status; `None` if a signal ended it.
    pub code: Option<i32>,
    /// What it printed on standard output.
    pub stdout: String,
    /// What it printed on standard error.
    pub stderr: String,
}

impl CommandOutput {
    /// Fails unless the command exited with status `code`; returns the output.
    pub fn expect_code(&self, code: i32) -> Result<&Self> {
        if self.code != Some(code) {
            bail!(
                "fedgate {} exited with {:?}, expected {code}\nstdout:\n{}\nstderr:\n{}",
                self.args.join(" "),
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Fails unless the command succeeded; returns the output.
    pub fn expect_success(&self) -> Result<&Self> {
        self.expect_code(0)
    }
}

/// Sends `sig` (as `kill` names it) to process `pid`.
async fn signal(pid: &str, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([sig, pid])
        .status()
        .await
        .with_context(|| format!("running kill {sig}"))?;
    if !status.success() {
        bail!("kill {sig} {pid} failed: {status}");
    }
    Ok(())
}

/// The files of a node's SQLite store that a copy takes: the database and its write-ahead log.
const STORE_FILES: [&str; 2] = ["", "-wal"];

/// `db` with `suffix` appended to its file name (`node.db-wal`).
fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A copy of a node's SQLite files, to put back with [`ProcessFederation::restore_store`].
#[derive(Debug, Clone)]
pub struct StoreCopy {
    code: DivisionCode,
    dir: PathBuf,
    files: Vec<&'static str>,
}

/// Audit records per writing node in one database, and how far its uplink is acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditCounts {
    /// Records held per writing node.
    pub per_node: BTreeMap<String, u64>,
    /// Highest position in this node's upward audit stream.
    pub outbox_head: u64,
    /// Position the parent has acknowledged, as last persisted.
    pub uplink_acked: u64,
}

impl AuditCounts {
    /// Records of `node` held here.
    pub fn of(&self, node: &str) -> u64 {
        self.per_node.get(node).copied().unwrap_or(0)
    }

    /// Items written here but not acknowledged by the parent.
    pub fn lag(&self) -> u64 {
        self.outbox_head.saturating_sub(self.uplink_acked)
    }
}

/// Live catalog entries in a node's database, read through a read-only connection (also while the node runs).
pub async fn catalog_count(db: &Path) -> Result<u64> {
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("opening {} read-only", db.display()))?;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM catalog WHERE withdrawn = 0")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Reads a node's audit counts through a read-only connection, also while the node runs (WAL allows it).
pub async fn audit_counts(db: &Path) -> Result<AuditCounts> {
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("opening {} read-only", db.display()))?;
    let mut counts = AuditCounts::default();
    let rows = sqlx::query("SELECT node_code, COUNT(*) FROM audit_log GROUP BY node_code")
        .fetch_all(&mut conn)
        .await?;
    for r in rows {
        counts.per_node.insert(
            r.get::<String, _>(0),
            u64::try_from(r.get::<i64, _>(1)).unwrap_or(0),
        );
    }
    let head = sqlx::query("SELECT COALESCE(MAX(fwd_seq), 0) FROM audit_log")
        .fetch_one(&mut conn)
        .await?;
    counts.outbox_head = u64::try_from(head.get::<i64, _>(0)).unwrap_or(0);
    let acked = sqlx::query("SELECT seq FROM uplink_ack WHERE stream = ?")
        .bind(Stream::Audit as i32)
        .fetch_optional(&mut conn)
        .await?;
    counts.uplink_acked = acked.map_or(0, |r| u64::try_from(r.get::<i64, _>(0)).unwrap_or(0));
    conn.close().await?;
    Ok(counts)
}

/// Reads the audit counts of a PostgreSQL node's database, also while its replicas run.
pub async fn audit_counts_pg(url: &str) -> Result<AuditCounts> {
    let mut conn = sqlx::postgres::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut counts = AuditCounts::default();
    let rows = sqlx::query("SELECT node_code, COUNT(*) FROM audit_log GROUP BY node_code")
        .fetch_all(&mut conn)
        .await?;
    for r in rows {
        counts.per_node.insert(
            r.get::<String, _>(0),
            u64::try_from(r.get::<i64, _>(1)).unwrap_or(0),
        );
    }
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(fwd_seq), 0) FROM audit_log")
        .fetch_one(&mut conn)
        .await?;
    counts.outbox_head = u64::try_from(head).unwrap_or(0);
    let acked: Option<i64> = sqlx::query_scalar("SELECT seq FROM uplink_ack WHERE stream = $1")
        .bind(Stream::Audit as i32)
        .fetch_optional(&mut conn)
        .await?;
    counts.uplink_acked = acked.map_or(0, |a| u64::try_from(a).unwrap_or(0));
    conn.close().await?;
    Ok(counts)
}

/// What [`ProcessFederation::wait_audit_settled`] observed when forwarding had caught up.
#[derive(Debug, Clone)]
pub struct Settled {
    /// How long it took.
    pub elapsed: Duration,
    /// Length of each node's own chain.
    pub chains: BTreeMap<DivisionCode, u64>,
}

impl ProcessFederation {
    /// A node's audit counts, read from its database (SQLite or PostgreSQL), also while it runs.
    pub async fn audit_counts(&self, code: DivisionCode) -> Result<AuditCounts> {
        match &self.proc_node(code)?.config.storage {
            StorageConfig::Postgres { url, .. } => audit_counts_pg(url).await,
            _ => audit_counts(self.db_path(code)?).await,
        }
    }

    /// Every audit record a node's database holds; the node (every replica of it) must be stopped.
    pub async fn audit_dump(&self, code: DivisionCode) -> Result<AuditDump> {
        match &self.proc_node(code)?.config.storage {
            StorageConfig::Postgres { url, .. } => {
                let store = fedgate_gateway::store::PgStore::connect_existing(url).await?;
                let dump = AuditDump::of_store(&store).await;
                store.close().await;
                dump
            }
            _ => AuditDump::read(self.db_path(code)?).await,
        }
    }

    /// Waits until at most `max` audit items written at `code` (its own and its children's) are not yet
    /// acknowledged by its parent, as the node last persisted; returns how long it took.
    pub async fn wait_uplink_lag(
        &self,
        code: DivisionCode,
        max: u64,
        timeout: Duration,
    ) -> Result<Duration> {
        let began = Instant::now();
        loop {
            let lag = self.audit_counts(code).await?.lag();
            if lag <= max {
                return Ok(began.elapsed());
            }
            if began.elapsed() > timeout {
                bail!("node {code} still has audit uplink lag {lag} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until forwarding has caught up everywhere: the root holds as many records of every node as that
    /// node's own chain has, and every non-root node's uplink lag is 0. Every node must be running.
    pub async fn wait_audit_settled(&self, timeout: Duration) -> Result<Settled> {
        let began = Instant::now();
        let root = self.root()?;
        loop {
            let mut counts = BTreeMap::new();
            for c in self.node_codes() {
                counts.insert(c, self.audit_counts(c).await?);
            }
            let mut behind = Vec::new();
            let mut chains = BTreeMap::new();
            for (c, own) in &counts {
                let len = own.of(c.as_str());
                chains.insert(*c, len);
                let at_root = counts[&root].of(c.as_str());
                if at_root != len {
                    behind.push(format!("root holds {at_root} of {len} records of {c}"));
                }
                if *c != root && own.lag() != 0 {
                    behind.push(format!("node {c} has uplink lag {}", own.lag()));
                }
            }
            if behind.is_empty() {
                return Ok(Settled {
                    elapsed: began.elapsed(),
                    chains,
                });
            }
            if began.elapsed() > timeout {
                bail!(
                    "audit forwarding did not settle within {timeout:?}: {}",
                    behind.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every audit record a stopped node's database holds, per writing node in chain order, and the pinned keys.
#[derive(Debug, Clone, Default)]
pub struct AuditDump {
    /// Records per writing node, ordered by sequence number.
    pub chains: BTreeMap<String, Vec<AuditRecord>>,
    /// Rows in the audit table.
    pub count: u64,
    /// Public keys pinned per node.
    pub keys: BTreeMap<String, Vec<u8>>,
}

impl AuditDump {
    /// Reads a database through the product's store; the node must be stopped.
    pub async fn read(db: &Path) -> Result<Self> {
        let store = SqliteStore::open(db)
            .await
            .with_context(|| format!("opening {}", db.display()))?;
        let dump = Self::of_store(&store).await;
        store.close().await;
        dump
    }

    /// Reads every record a store holds, through the product's store.
    pub async fn of_store(store: &dyn Store) -> Result<Self> {
        let mut dump = Self {
            count: store.audit_count().await?,
            ..Self::default()
        };
        for node in store.audit_nodes().await? {
            let records = store.audit_chain(&node, 0, u32::MAX).await?;
            if let Some(k) = store.node_key(&node).await? {
                dump.keys.insert(node.clone(), k);
            }
            dump.chains.insert(node, records);
        }
        Ok(dump)
    }

    /// The records of `node`'s chain held here.
    pub fn chain(&self, node: &str) -> &[AuditRecord] {
        self.chains.get(node).map_or(&[], Vec::as_slice)
    }

    /// Verifies `node`'s chain as held here; see [`verify_chain`].
    pub fn verify(&self, node: &str, key: Option<Vec<u8>>) -> Result<Vec<u8>> {
        verify_chain(node, self.chain(node), key)
    }
}

/// What is wrong with the records `node`'s store holds, against what every node of its subtree wrote
/// (`dumps` holds every node's store): a count other than the sum of the subtree's chains, or records of a node
/// outside the subtree.
pub fn subtree_problems(
    fed: &ProcessFederation,
    dumps: &BTreeMap<DivisionCode, AuditDump>,
    node: DivisionCode,
) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(dump) = dumps.get(&node) else {
        return vec![format!("no dump of node {node}")];
    };
    let subtree = fed.subtree(node);
    let expected: u64 = subtree
        .iter()
        .map(|n| dumps.get(n).map_or(0, |d| d.chain(n.as_str()).len() as u64))
        .sum();
    if dump.count != expected {
        problems.push(format!(
            "node {node} holds {} records; its subtree {subtree:?} wrote {expected}",
            dump.count
        ));
    }
    for held in dump.chains.keys() {
        if !subtree.iter().any(|n| n.as_str() == held) {
            problems.push(format!(
                "node {node} holds records of node {held}, outside its subtree"
            ));
        }
    }
    problems
}

/// Verifies `records` as `node`'s whole chain from its first record to its end with [`ChainVerifier`] (with the
/// pinned `key` if one is given) and returns the node's public key.
pub fn verify_chain(node: &str, records: &[AuditRecord], key: Option<Vec<u8>>) -> Result<Vec<u8>> {
    let mut v = ChainVerifier::new(node, key);
    for r in records {
        v.push(r)
            .map_err(|e| anyhow!("chain of {node} does not verify: {e}"))?;
    }
    v.finish()
        .map_err(|e| anyhow!("chain of {node} does not verify: {e}"))?;
    v.key()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| anyhow!("chain of {node} is empty"))
}

/// Where a [`Relay`] trap cuts the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutPoint {
    /// In the middle of an upward (child → parent) chunk of at least 1 KiB, once at least `after_bytes` went up
    /// since the trap was set: only half of that chunk is delivered, so a batch arrives truncated.
    MidUpload {
        /// Upward bytes to let through first.
        after_bytes: u64,
    },
    /// At the first small downward (parent → child) chunk — at most 128 bytes, the size of a push's answer
    /// (shares' answers carry records and are larger; the trailers right after one are skipped) — once at least
    /// `after_bytes` went up since the trap was set, including a chunk of at least 1 KiB (part of a batch; joins
    /// and shares are smaller), and nothing went up for 3 ms: a batch was delivered whole, the parent applied
    /// it, and the acknowledgement is dropped with the connection.
    AckLost {
        /// Upward bytes to let through first.
        after_bytes: u64,
    },
}

#[derive(Debug)]
struct Trap {
    point: CutPoint,
    up: u64,
    last_up: Instant,
    /// When a downward chunk too large to be a push's answer last passed (its trailers may follow it).
    last_large_down: Option<Instant>,
    /// Whether an upward chunk large enough to be part of a batch passed.
    batch_up: bool,
}

/// Counters of a relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Connections accepted and relayed.
    pub relayed: AtomicU64,
    /// Connections refused while blocked or because the upstream was unreachable.
    pub refused: AtomicU64,
    /// Connections accepted while stalled, and never answered.
    pub stalled: AtomicU64,
    /// Connections cut.
    pub cut: AtomicU64,
    /// Traps sprung.
    pub sprung: AtomicU64,
    /// Bytes relayed upward.
    pub bytes_up: AtomicU64,
    /// Bytes relayed downward.
    pub bytes_down: AtomicU64,
}

#[derive(Debug, Default)]
struct RelayState {
    conns: Mutex<Vec<AbortHandle>>,
    blocked: AtomicBool,
    /// New connections are accepted and then never served.
    stalled: AtomicBool,
    /// One flag per relayed connection: once set, it carries nothing more, either way, and stays open.
    frozen: Mutex<Vec<Arc<AtomicBool>>>,
    trap: Mutex<Option<Trap>>,
    sprung: Notify,
    sprung_how: Mutex<Option<String>>,
    stats: RelayStats,
}

impl RelayState {
    fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|p| p.into_inner()));
        let live = conns.iter().filter(|h| !h.is_finished()).count();
        for h in &conns {
            h.abort();
        }
        // Two tasks (one per direction) make one connection.
        let cut = live.div_ceil(2);
        self.stats.cut.fetch_add(cut as u64, Ordering::Relaxed);
        cut
    }

    fn trap(&self) -> std::sync::MutexGuard<'_, Option<Trap>> {
        self.trap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accounts an upward chunk; describes the trap if it springs in it.
    fn upward(&self, n: usize) -> Option<String> {
        self.stats.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
        let mut trap = self.trap();
        let t = trap.as_mut()?;
        t.up += n as u64;
        t.last_up = Instant::now();
        t.batch_up |= n >= 1024;
        match t.point {
            CutPoint::MidUpload { after_bytes } if t.up >= after_bytes && n >= 1024 => {
                let what = format!(
                    "cut {} bytes up after arming, half-way through a {n}-byte upward chunk",
                    t.up
                );
                *trap = None;
                Some(what)
            }
            _ => None,
        }
    }

    /// Accounts a downward chunk; describes the trap if it springs in it.
    fn downward(&self, n: usize) -> Option<String> {
        self.stats.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        let mut trap = self.trap();
        let t = trap.as_mut()?;
        if n > 128 {
            t.last_large_down = Some(Instant::now());
            return None;
        }
        let tail = t
            .last_large_down
            .is_some_and(|d| d.elapsed() < Duration::from_millis(5));
        match t.point {
            CutPoint::AckLost { after_bytes }
                if !tail
                    && t.batch_up
                    && t.up >= after_bytes
                    && t.last_up.elapsed() >= Duration::from_millis(3) =>
            {
                let what = format!(
                    "cut {} bytes up after arming, {:.1?} after the last upward chunk, dropping a {n}-byte \
                     downward chunk",
                    t.up,
                    t.last_up.elapsed()
                );
                *trap = None;
                Some(what)
            }
            _ => None,
        }
    }

    fn spring(&self, what: String) {
        self.stats.sprung.fetch_add(1, Ordering::Relaxed);
        self.cut();
        *self.sprung_how.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
        self.sprung.notify_waiters();
    }
}

/// A TCP relay in the test process between a child node and its parent: the child's `parent.address` points
/// here, and every connection is copied to the parent until the test cuts it. Dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    state: Arc<RelayState>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on an ephemeral loopback port and relays to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(RelayState::default());
        let s = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let down = match listener.accept().await {
                    Ok((down, _)) => down,
                    Err(_) => {
                        // Out of descriptors or similar: wait instead of spinning.
                        tokio::time::sleep(POLL).await;
                        continue;
                    }
                };
                if s.blocked.load(Ordering::SeqCst) {
                    s.stats.refused.fetch_add(1, Ordering::Relaxed);
                    drop(down);
                    continue;
                }
                if s.stalled.load(Ordering::SeqCst) {
                    // Accepted, then never read from nor written to: the client's handshake waits forever.
                    s.stats.stalled.fetch_add(1, Ordering::Relaxed);
                    let held = tokio::spawn(async move {
                        let _down = down;
                        std::future::pending::<()>().await;
                    });
                    s.conns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(held.abort_handle());
                    continue;
                }
                let up = match TcpStream::connect(upstream).await {
                    Ok(up) => up,
                    Err(_) => {
                        s.stats.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let (down_r, down_w) = down.into_split();
                let (up_r, up_w) = up.into_split();
                let frozen = Arc::new(AtomicBool::new(false));
                {
                    let mut all = s.frozen.lock().unwrap_or_else(|p| p.into_inner());
                    all.retain(|f| Arc::strong_count(f) > 1);
                    all.push(frozen.clone());
                }
                let t1 = tokio::spawn(pump(down_r, up_w, s.clone(), true, frozen.clone()));
                let t2 = tokio::spawn(pump(up_r, down_w, s.clone(), false, frozen));
                s.stats.relayed.fetch_add(1, Ordering::Relaxed);
                let mut conns = s.conns.lock().unwrap_or_else(|p| p.into_inner());
                conns.retain(|h| !h.is_finished());
                conns.push(t1.abort_handle());
                conns.push(t2.abort_handle());
            }
        });
        Ok(Self {
            addr,
            state,
            accept,
        })
    }

    /// The address children connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every current connection at once (both sockets), staying open for new ones; returns how many.
    pub fn cut(&self) -> usize {
        self.state.cut()
    }

    /// Refuses new connections (accepting and closing them at once) and cuts the current ones: the link is down.
    pub fn block(&self) -> usize {
        self.state.blocked.store(true, Ordering::SeqCst);
        self.state.cut()
    }

    /// Relays new connections again.
    pub fn unblock(&self) {
        self.state.blocked.store(false, Ordering::SeqCst);
    }

    /// The parent stops answering without closing anything: every current connection stays open but carries
    /// nothing more in either direction, ever (until [`Relay::cut`] or the relay's end), and new connections are
    /// accepted and never served. Returns how many connections froze.
    pub fn stall(&self) -> usize {
        self.state.stalled.store(true, Ordering::SeqCst);
        let all = std::mem::take(&mut *self.state.frozen.lock().unwrap_or_else(|p| p.into_inner()));
        for f in &all {
            f.store(true, Ordering::SeqCst);
        }
        all.iter().filter(|f| Arc::strong_count(f) > 1).count()
    }

    /// New connections are relayed again; the connections frozen by [`Relay::stall`] stay frozen.
    pub fn resume(&self) {
        self.state.stalled.store(false, Ordering::SeqCst);
    }

    /// Sets a trap at `point` and waits until it springs (the link is then cut), failing after `timeout`;
    /// returns how it sprang.
    pub async fn cut_at(&self, point: CutPoint, timeout: Duration) -> Result<String> {
        let sprung = self.state.sprung.notified();
        tokio::pin!(sprung);
        sprung.as_mut().enable();
        *self.state.trap() = Some(Trap {
            point,
            up: 0,
            last_up: Instant::now(),
            last_large_down: None,
            batch_up: false,
        });
        if tokio::time::timeout(timeout, sprung).await.is_err() {
            *self.state.trap() = None;
            bail!("relay trap {point:?} did not spring within {timeout:?}");
        }
        Ok(self
            .state
            .sprung_how
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default())
    }

    /// The relay's counters.
    pub fn stats(&self) -> &RelayStats {
        &self.state.stats
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.state.cut();
    }
}

/// Copies one direction of a relayed connection until EOF, an error, or a trap; once `frozen`, swallows what
/// comes and holds both halves open.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    state: Arc<RelayState>,
    up: bool,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) if frozen.load(Ordering::SeqCst) => {
                let _halves = (from, to);
                std::future::pending::<()>().await;
                return;
            }
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            continue;
        }
        let sprung = if up {
            state.upward(n)
        } else {
            state.downward(n)
        };
        if let Some(what) = sprung {
            if up {
                // Deliver half of the chunk: the receiver sees a truncated message, then the cut.
                let _ = to.write_all(&buf[..n / 2]).await;
                let _ = to.flush().await;
            }
            state.spring(what);
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
