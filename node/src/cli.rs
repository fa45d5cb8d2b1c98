//! Command-line interface: parses arguments and runs one subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedgate_gateway::config::NodeConfig;
use fedgate_gateway::ident::Peer;
use fedgate_gateway::telemetry::{self, LogFormat, Telemetry};

use crate::exit::{ConfigError, Software, start_failure};

/// fedgate: the data-exchange backbone of a province, its cities and their counties.
#[derive(Debug, Parser)]
#[command(name = "fedgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node from a TOML configuration file.
    Node {
        /// Path of the node's configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// How log lines are written on standard error: `text` or `json` (one object per line). Lines written
        /// inside a trace carry its trace id.
        #[arg(long, value_name = "FORMAT", default_value = "text")]
        log_format: LogFormat,
    },
    /// Start a whole federation on loopback, exercise it, and report.
    Demo {
        /// Leave the federation running after the checks and print how to call it.
        #[arg(long)]
        keep_running: bool,
    },
    /// Print a node's governance report: overdue applications, objections and demands, stale catalog entries.
    Report {
        /// Path of the node's configuration (its TLS files identify the operator).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print how far a node's upward streams (catalog, audit) are acknowledged by its parent.
    Status {
        /// Path of the node's configuration (its TLS files identify the operator).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List a node's operational records: timings, sizes, peers and outcome of the calls it handled.
    Ops(crate::ops_cmd::OpsArgs),
    /// At the province: list, show and assign data demands (supply–demand matching).
    Demand {
        #[command(subcommand)]
        cmd: crate::demand_cmd::DemandCmd,
    },
    /// Manage the real-name accounts of a node's web console (add, disable, reset, list).
    User {
        #[command(subcommand)]
        cmd: crate::user_cmd::UserCmd,
    },
    /// Verify, export or query a node's audit trail.
    Audit {
        #[command(subcommand)]
        cmd: crate::audit_cmd::AuditCmd,
    },
    /// Create a development PKI: a root CA and certificates bound to node and agency codes; with
    /// --ca-existing, issue more certificates from the CA already in the directory (it is never replaced).
    Certs {
        /// Directory to write the PEM files into.
        #[arg(long, short, default_value = "fedgate-pki")]
        out: PathBuf,
        /// Node division codes to issue certificates for.
        #[arg(long = "node", value_name = "CODE")]
        nodes: Vec<String>,
        /// Agencies to issue certificates for, each as USCC@NODE: its unified social credit code and the node it
        /// is registered at (the certificate names that node). Without @NODE, the registering division in the
        /// code is taken as the node.
        #[arg(long = "agency", value_name = "USCC[@NODE]")]
        agencies: Vec<String>,
        /// Issue the certificates from the CA in the directory (its ca.crt and ca.key) instead of creating one.
        #[arg(long)]
        ca_existing: bool,
    },
    /// Act as an agency at its node (catalog, shares, applications, grants, objections).
    Agency(fedgate_examples::cli::AgencyArgs),
    /// Back up a running node's store, signing key and TLS files into one file, consistent as of one instant.
    Backup(crate::backup::BackupArgs),
    /// Put a node's store, signing key and TLS files back from a backup; the node must be stopped.
    Restore(crate::backup::RestoreArgs),
    /// Create an age key pair for encrypting backups: writes the secret key, prints the public key.
    BackupKey(crate::backup::KeygenArgs),
    /// Check a node's configuration as start-up would, without starting it; names each problem by its key
    /// (exit status 78 when there is any).
    CheckConfig {
        /// Path of the node's configuration.
        config: PathBuf,
    },
}

impl Cli {
    /// Runs the chosen command and turns its outcome into an exit code.
    pub fn run(self) -> ExitCode {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("fedgate: cannot start the async runtime: {e}");
                return ExitCode::from(crate::exit::EXIT_SOFTWARE);
            }
        };
        let telemetry = match runtime.block_on(async { init_tracing(&self.command) }) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("fedgate: {e}");
                return ExitCode::from(crate::exit::EXIT_CONFIG);
            }
        };
        let result = runtime.block_on(async {
            match self.command {
                Command::Node { config, .. } => run_node(config).await,
                Command::Demo { keep_running } => crate::demo::run(keep_running).await,
                Command::Report { config } => report(config).await,
                Command::Status { config } => status(config).await,
                Command::Audit { cmd } => crate::audit_cmd::run(cmd).await,
                Command::Demand { cmd } => crate::demand_cmd::run(cmd).await,
                Command::Ops(args) => crate::ops_cmd::run(args).await,
                Command::User { cmd } => crate::user_cmd::run(cmd).await,
                Command::Certs {
                    out,
                    nodes,
                    agencies,
                    ca_existing,
                } => crate::certs_cmd::run(crate::certs_cmd::CertsRequest {
                    out,
                    nodes,
                    agencies,
                    ca_existing,
                }),
                Command::Agency(args) => fedgate_examples::cli::run(args).await,
                Command::Backup(args) => crate::backup::backup(args).await,
                Command::Restore(args) => crate::backup::restore(args).await,
                Command::BackupKey(args) => crate::backup::keygen(args),
                Command::CheckConfig { config } => crate::check_config::run(&config).await,
            }
        });
        // Spans still buffered are exported while the runtime their exporter runs on is alive.
        if let Some(t) = telemetry {
            t.shutdown();
        }
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fedgate: {e:#}");
                match e.downcast_ref::<crate::backup::BackupError>() {
                    Some(b) => ExitCode::from(b.exit_code()),
                    None => crate::exit::status_of(&e),
                }
            }
        }
    }
}

/// Installs logging (`RUST_LOG`, default `info`) and, for `fedgate node` with the standard
/// `OTEL_EXPORTER_OTLP_*` variables set, span export as `fedgate-<code>`; runs inside the runtime the exporter
/// uses. A node whose configuration cannot be read exports nothing (start-up then says what is wrong).
fn init_tracing(command: &Command) -> Result<Option<Telemetry>> {
    let (service, format) = match command {
        Command::Node { config, log_format } => (
            load_config(config)
                .ok()
                .and_then(|c| c.code.parse().ok())
                .map(telemetry::service_name),
            *log_format,
        ),
        _ => (None, LogFormat::Text),
    };
    match telemetry::install(service.as_deref(), format, "info") {
        Ok(t) => {
            if let Some(service) = &service {
                if t.exporting() {
                    tracing::info!(%service, "traces exported over OTLP/gRPC");
                } else {
                    tracing::info!("traces not exported: OTEL_EXPORTER_OTLP_ENDPOINT is not set");
                }
            }
            Ok(Some(t))
        }
        Err(e @ telemetry::TelemetryError::Installed(_)) => {
            eprintln!("fedgate: {e}");
            Ok(None)
        }
        Err(e) => Err(ConfigError(e.to_string()).into()),
    }
}

async fn run_node(path: PathBuf) -> Result<()> {
    let config = load_config(&path)?;
    let node = fedgate_gateway::node::start(config)
        .await
        .map_err(|e| start_failure(format!("cannot start node from {}", path.display()), e))?;
    println!("fedgate node {} listening on {}", node.code(), node.addr());
    node.certificates().watch_config_file(&path);
    let hangup = tokio::spawn(crate::certs_cmd::reload_on_hangup(
        node.certificates().clone(),
    ));
    let stopped_by_itself = tokio::select! {
        () = shutdown_signal() => false,
        () = server_stopped(&node) => true,
    };
    if stopped_by_itself {
        let cause = match node.shutdown().await {
            Ok(()) => "it stopped serving".to_owned(),
            Err(e) => e.to_string(),
        };
        return Err(Software(format!("node stopped by itself: {cause}")).into());
    }
    hangup.abort();
    tracing::info!("shutdown requested; draining");
    node.shutdown()
        .await
        .map_err(|e| Software(format!("stopping the node: {e}")))?;
    Ok(())
}

/// Resolves once the node's server has stopped without being asked to.
async fn server_stopped(node: &fedgate_gateway::node::NodeHandle) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    while !node.is_finished() {
        tick.tick().await;
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Reads a node's configuration; a file that does not parse is a [`ConfigError`] (exit status 78).
pub(crate) fn load_config(path: &std::path::Path) -> Result<NodeConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read configuration {}: {e}", path.display())))?;
    Ok(toml::from_str(&text)
        .map_err(|e| ConfigError(format!("configuration {}: {e}", path.display())))?)
}

/// A client of the Operator service of the node configured in `path`, using the node's own certificate.
pub(crate) async fn operator_client(
    path: &std::path::Path,
) -> Result<(
    fedgate_gateway::ident::DivisionCode,
    fedgate_proto::v1::operator_client::OperatorClient<tonic::transport::Channel>,
)> {
    let config = load_config(path)?;
    let code: fedgate_gateway::ident::DivisionCode = config
        .code
        .parse()
        .map_err(|e| ConfigError(format!("code: {e}")))?;
    let tls =
        fedgate_gateway::tls::TlsMaterial::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let addr = config.listen.replace("0.0.0.0", "127.0.0.1");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(fedgate_gateway::tls::client_tls(&tls, &Peer::Node(code)))?
        .connect()
        .await
        .with_context(|| format!("cannot reach node {code} at {addr}"))?;
    Ok((
        code,
        fedgate_proto::v1::operator_client::OperatorClient::new(channel),
    ))
}

async fn status(path: PathBuf) -> Result<()> {
    let (code, mut client) = operator_client(&path).await?;
    let s = client
        .uplink_status(fedgate_proto::v1::UplinkStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    println!("node {code}: {} audit records held", s.audit_records);
    if s.streams.is_empty() {
        println!("no parent: nothing is forwarded");
    }
    for st in &s.streams {
        println!(
            "  {:<16} head {:>10}  acked {:>10}  lag {:>8}  {}",
            fedgate_proto::v1::Stream::try_from(st.stream)
                .unwrap_or_default()
                .as_str_name(),
            st.head,
            st.acked,
            st.lag,
            if st.connected {
                "connected"
            } else {
                "disconnected"
            }
        );
    }
    Ok(())
}

async fn report(path: PathBuf) -> Result<()> {
    let (code, mut client) = operator_client(&path).await?;
    let r = client
        .report(fedgate_proto::v1::ReportRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    println!("governance report of node {code}");
    println!("overdue applications: {}", r.overdue_applications.len());
    for a in &r.overdue_applications {
        println!(
            "  {}  {}  consumer {}  state {}  due {}",
            a.id,
            a.resource_id,
            a.consumer_uscc,
            fedgate_proto::v1::ApplicationState::try_from(a.state)
                .unwrap_or_default()
                .as_str_name(),
            a.due_at
        );
    }
    println!("overdue objections: {}", r.overdue_objections.len());
    for o in &r.overdue_objections {
        println!(
            "  {}  {}  by {}  due {}",
            o.id, o.resource_id, o.consumer_uscc, o.due_at
        );
    }
    println!("overdue demands: {}", r.overdue_demands.len());
    for o in &r.overdue_demands {
        let d = o.demand.clone().unwrap_or_default();
        println!(
            "  {}  by {}@{}  provider {}  {}  due {}",
            d.id,
            d.consumer_uscc,
            d.consumer_node,
            if d.provider_uscc.is_empty() {
                "-"
            } else {
                d.provider_uscc.as_str()
            },
            o.reason,
            o.due_at
        );
    }
    println!("stale catalog entries: {}", r.stale_count);
    for s in &r.stale_entries {
        let id = s.entry.as_ref().map(|e| e.id.as_str()).unwrap_or("");
        println!("  {id}  {}", s.reason);
    }
    if r.stale_count > r.stale_entries.len() as u64 {
        println!(
            "  … and {} more",
            r.stale_count - r.stale_entries.len() as u64
        );
    }
    println!("{}", crate::certs_cmd::expiry_line(&load_config(&path)?));
    Ok(())
}
