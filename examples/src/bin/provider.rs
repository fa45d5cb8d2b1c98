//! `civil-registry-provider`: a civil-affairs agency serving its synthetic registry to its node.
//!
//! Generates the registry, optionally publishes the catalog entries of its two resources (`household`,
//! `marriage`) to the node's Agency service, then serves `fedgate.v1.Provider` over mutual TLS until Ctrl-C.
//! On SIGHUP it reads its certificate, key and CA bundle again and serves new connections with them (a broken
//! file is reported and the material in use kept).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use fedgate_examples::registry::MaritalStatus;
use fedgate_examples::{
    ProviderTls, Registry, RegistryProvider, civil_affairs_entries, connect_agency,
    describe_status, publish_all, serve_provider_reloading, server_config,
};
use fedgate_proto::v1::ShareType;

/// Command line of the civil-registry provider.
#[derive(Debug, Parser)]
#[command(name = "civil-registry-provider", version, about)]
struct Args {
    /// Address to serve the Provider service on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Division code of this agency's node: the only caller accepted, and the node published to.
    #[arg(long, value_parser = parse_code)]
    node_code: String,
    /// Address of the node's Agency service, used with --publish.
    #[arg(long, default_value = "https://127.0.0.1:7400")]
    node_addr: String,
    /// Federation CA certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// This agency's certificate (PEM), URI SAN urn:fedgate:agency:USCC.
    #[arg(long)]
    cert: PathBuf,
    /// This agency's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Division code the residents' ID numbers start with (defaults to --node-code).
    #[arg(long, value_parser = parse_code)]
    area: Option<String>,
    /// Number of residents to generate.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Seed of the generator; the same seed gives the same residents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Publish the catalog entries to the node before serving.
    #[arg(long)]
    publish: bool,
    /// Answer every call this many milliseconds after it arrived (a slow registry, to try deadlines and
    /// cancellation).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share type of the household resource.
    #[arg(long, value_enum, default_value_t = Share::Unconditional)]
    household_share: Share,
    /// Share type of the marriage resource.
    #[arg(long, value_enum, default_value_t = Share::Conditional)]
    marriage_share: Share,
    /// How many sample ID numbers to print.
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// An edits file in JSON Lines, read again every second: `{"upsert": {"id_number": "…", "address": "…"}}`
    /// changes a resident, `{"delete": "<id number>"}` deletes one; the node follows them with Changes.
    #[arg(long)]
    edits: Option<PathBuf>,
    /// Keep no change log: Changes is answered UNIMPLEMENTED, so the node diffs full exports instead.
    #[arg(long)]
    no_change_log: bool,
}

/// Share type as given on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Share {
    /// Any agency may use it (无条件共享).
    Unconditional,
    /// Only under an approved grant (附条件共享).
    Conditional,
    /// Listed, never served (不予共享).
    NotShared,
}

impl From<Share> for ShareType {
    fn from(s: Share) -> Self {
        match s {
            Share::Unconditional => ShareType::Unconditional,
            Share::Conditional => ShareType::Conditional,
            Share::NotShared => ShareType::NotShared,
        }
    }
}

fn parse_code(s: &str) -> Result<String, String> {
    if s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a 6-digit division code"))
    }
}

fn read_tls(args: &Args) -> Result<ProviderTls> {
    Ok(ProviderTls {
        ca_pem: read(&args.ca, "CA certificate")?,
        cert_pem: read(&args.cert, "agency certificate")?,
        key_pem: read(&args.key, "agency key")?,
    })
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} from {}", path.display()))
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();

    let tls = read_tls(&args)?;
    let (reload, current) = tokio::sync::watch::channel(server_config(&tls)?);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
        let (ca, cert, key) = (args.ca.clone(), args.cert.clone(), args.key.clone());
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let again = ProviderTls {
                    ca_pem: std::fs::read(&ca).unwrap_or_default(),
                    cert_pem: std::fs::read(&cert).unwrap_or_default(),
                    key_pem: std::fs::read(&key).unwrap_or_default(),
                };
                match server_config(&again) {
                    Ok(config) => {
                        let _ = reload.send(config);
                        println!("certificates reloaded");
                    }
                    Err(e) => eprintln!("certificates not reloaded, the ones in use kept: {e}"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop(reload);
    let area = args.area.clone().unwrap_or_else(|| args.node_code.clone());
    let registry =
        Registry::generate(&area, args.seed, args.count).context("generating the registry")?;
    println!(
        "registry: {} residents of {area} (seed {})",
        registry.len(),
        args.seed
    );
    print_samples(&registry, args.samples);

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;

    if args.publish {
        let mut client = connect_agency(
            &args.node_addr,
            &args.node_code,
            &tls.ca_pem,
            &tls.cert_pem,
            &tls.key_pem,
        )
        .await
        .with_context(|| {
            format!(
                "connecting to node {} at {}",
                args.node_code, args.node_addr
            )
        })?;
        let entries =
            civil_affairs_entries(args.household_share.into(), args.marriage_share.into());
        let stored = publish_all(&mut client, entries)
            .await
            .map_err(|s| anyhow::anyhow!("publishing the catalog: {}", describe_status(&s)))?;
        for e in &stored {
            let share = ShareType::try_from(e.share_type)
                .map(|t| t.as_str_name())
                .unwrap_or("?");
            println!("published {} v{} ({share}): {}", e.id, e.version, e.title);
        }
    }

    let provider = RegistryProvider::new(registry, args.node_code.clone())
        .with_latency(std::time::Duration::from_millis(args.latency_ms));
    provider.changes().set_enabled(!args.no_change_log);
    if let Some(path) = args.edits.clone() {
        println!("following edits in {}", path.display());
        tokio::spawn(fedgate_examples::changelog::follow_edits(
            provider.changes().clone(),
            provider.shared_registry(),
            path,
        ));
    }
    println!(
        "serving fedgate.v1.Provider on {} for node {} (Ctrl-C to stop)",
        args.listen, args.node_code
    );
    serve_provider_reloading(listener, current, provider, async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .context("serving the Provider service")?;
    println!("stopped");
    Ok(())
}

/// Prints a few ID numbers to query, and one married resident for the marriage resource.
fn print_samples(registry: &Registry, n: usize) {
    if registry.is_empty() || n == 0 {
        return;
    }
    println!("sample ID numbers:");
    for p in registry.persons().iter().take(n) {
        println!(
            "  {}  {}  {}  {}",
            p.id_number,
            p.name,
            p.birth_date,
            p.marital_status.as_str()
        );
    }
    if let Some(p) = registry.persons().iter().find(|p| {
        p.marital_status == MaritalStatus::Married && registry.find(&p.spouse_id_number).is_some()
    }) {
        println!(
            "  married couple: {} ({}) and {}",
            p.id_number, p.name, p.spouse_id_number
        );
    }
}
