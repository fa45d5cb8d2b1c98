//! The rows of the share-path benchmark: the topology, the calls each path makes, and one measurement per row.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use fedgate_examples::client::agency_domain_name;
use fedgate_examples::describe_status;
use fedgate_gateway::config::CacheConfig;
use fedgate_gateway::ident::{DivisionCode, Peer, Uscc};
use fedgate_gateway::tls::{TlsMaterial, client_tls};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::provider_client::ProviderClient;
use fedgate_proto::v1::{ApplyRequest, DecideRequest, FetchRequest, Grant, ShareMode, SignedGrant};
use prost::Message;
use tonic::transport::{Channel, Endpoint};

use super::BenchConfig;
use super::calls::{
    CALL_TIMEOUT, HOT_KEYS, HOUSEHOLD_FIELDS, MARRIAGE_FIELDS, PURPOSE, SERVING, check_share,
    hot_key, household, marriage, one_record, share,
};
use super::cpu::{self, MachineSample};
use super::load::{self, Load, Outcome};
use super::nginx::{NginxChain, ProxyTls};
use super::path::{ROWS, SharePath};
use super::provider::{ProviderArgs, ProviderProcess};
use super::report::{Report, RowResult};
use crate::process::{ProcessFederation, audit_counts};
use crate::{code, standard_topology};

/// Keys the cache-hit rows ask for, each cached before they are measured.
const CACHED_KEYS: usize = 16;
/// Time the audit records of one row may take to reach the province.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);

/// The consumer node of the cross-city shares.
const FAR: &str = "350203";
/// Node columns of the report, along the cross-city route from the serving node, then the idle county.
pub(super) const NODE_ORDER: [&str; 6] =
    ["350102", "350100", "350000", "350200", "350203", "350103"];

/// Everything the rows share.
struct Bench {
    config: BenchConfig,
    fed: ProcessFederation,
    keys: Arc<Vec<String>>,
    /// First key no uncached share has used yet.
    next_cold: u64,
    grant: SignedGrant,
    grant_id: String,
    provider_addr: SocketAddr,
    provider_uscc: Uscc,
    /// The serving node's provider, a process of its own.
    provider: Option<ProviderProcess>,
    /// The serving node's certificate, which the provider requires of its callers.
    node_tls: TlsMaterial,
    nginx: Option<(NginxChain, NginxChain)>,
    nginx_note: String,
    /// Files of the provider process and the proxies.
    work: tempfile::TempDir,
}

pub(super) async fn run(config: BenchConfig) -> Result<Report> {
    crate::init();
    let mut bench = Bench::start(config).await?;
    let began = MachineSample::now();
    let ours_before = bench.our_cpu();
    let mut rows = Vec::new();
    let result = async {
        for (path, c) in ROWS {
            if !bench.config.only.is_empty() && !bench.config.only.contains(&path) {
                continue;
            }
            rows.push(bench.row(path, c).await?);
        }
        anyhow::Ok(())
    }
    .await;
    let ours = bench.our_cpu().saturating_sub(ours_before);
    let machine = MachineSample::now().since(&began);
    let nginx_note = bench.nginx_note.clone();
    let config = bench.config.clone();
    let stopped = bench.stop().await;
    result?;
    stopped?;
    Ok(Report::new(
        config,
        cpu::machine_description(),
        nginx_note,
        rows,
        machine,
        ours,
    ))
}

impl Bench {
    async fn start(config: BenchConfig) -> Result<Self> {
        let mut specs = standard_topology()?;
        let mut seed = None;
        for s in &mut specs {
            for a in &mut s.agencies {
                if let Some(p) = a.provider.as_mut()
                    && s.code.as_str() == SERVING
                {
                    p.persons = config.persons;
                    seed = Some(p.seed);
                }
            }
        }
        let seed = seed.ok_or_else(|| anyhow!("the topology has no provider at {SERVING}"))?;
        let provider_bin = crate::process::provider_binary().await?;
        // The serving node calls a provider process of its own, started on this port once the PKI exists.
        let reserved = std::net::TcpListener::bind("127.0.0.1:0")?;
        let provider_addr = reserved.local_addr()?;
        // Only the cross-city consumer's node caches, under the serving node's allowance (the serving node says
        // how long its answers may be cached); every other node's cache is off (the harness default). The load
        // is the benchmark's own: the per-agency and per-neighbour limits are raised above it.
        let far = code(FAR);
        let fed = ProcessFederation::start_configured(specs, &[], &move |c| {
            if c.code == far.as_str() || c.code == SERVING {
                c.cache = CacheConfig {
                    ttl_secs: 3600,
                    capacity: 1_000_000,
                    ..CacheConfig::default()
                };
            }
            c.rate_limits.agency_calls_per_second = 1_000_000;
            c.rate_limits.agency_burst = 1_000_000;
            c.rate_limits.agency_max_in_flight = 4096;
            c.rate_limits.forward_calls_per_second = 1_000_000;
            c.rate_limits.forward_burst = 1_000_000;
            c.rate_limits.forward_max_in_flight = 4096;
            if c.code == SERVING {
                for a in c.agencies.iter_mut().filter(|a| a.provider.is_some()) {
                    a.provider = Some(format!("https://{provider_addr}"));
                }
            }
        })
        .await?;
        let serving = code(SERVING);
        let provider = fed.provider_at(serving)?;
        let provider_uscc = provider.uscc.clone();
        let registry = provider
            .registry
            .clone()
            .ok_or_else(|| anyhow!("the provider at {SERVING} serves no registry"))?;
        let keys: Vec<String> = registry.id_numbers().map(str::to_owned).collect();
        if keys.len() < 2 * HOT_KEYS {
            bail!(
                "the registry at {SERVING} holds only {} residents",
                keys.len()
            );
        }
        let node_config = fed.node_config(serving)?;
        let work = tempfile::Builder::new()
            .prefix("fedgate-bench-")
            .tempdir()?;
        let process = ProviderProcess::start(
            &provider_bin,
            &work.path().join("provider"),
            reserved,
            &ProviderArgs {
                node: SERVING,
                persons: config.persons,
                seed,
                ca: &node_config.tls.ca,
                cert: &provider.cert,
            },
        )
        .await?;
        let node_tls = TlsMaterial::load(
            &node_config.tls.ca,
            &node_config.tls.cert,
            &node_config.tls.key,
        )?;
        let mut bench = Self {
            config,
            fed,
            keys: Arc::new(keys),
            next_cold: HOT_KEYS as u64,
            grant: SignedGrant::default(),
            grant_id: String::new(),
            provider_addr: process.addr(),
            provider_uscc,
            provider: Some(process),
            node_tls,
            nginx: None,
            nginx_note: String::new(),
            work,
        };
        bench.first_shares().await?;
        bench.start_nginx().await?;
        Ok(bench)
    }

    /// Waits until a cross-city share is answered (every node up and joined), then obtains the grant of the
    /// conditional rows.
    async fn first_shares(&mut self) -> Result<()> {
        let far = self.fed.consumer_at(code(FAR))?.uscc.clone();
        let mut client = self.fed.client(&far).await?;
        let began = std::time::Instant::now();
        loop {
            let key = self.cold_key()?;
            match client.share(household(&key)).await {
                Ok(_) => break,
                Err(s) if began.elapsed() < Duration::from_secs(60) => {
                    tracing::debug!(status = %describe_status(&s), "federation not ready yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => bail!(
                    "no cross-city share answered within 60 s: {}",
                    describe_status(&s)
                ),
            }
        }
        let serving = code(SERVING);
        let local = self.fed.consumer_at(serving)?.uscc.clone();
        let mut consumer = self.fed.client(&local).await?;
        let mut provider = self.fed.client(&self.provider_uscc).await?;
        let application = consumer
            .apply(ApplyRequest {
                resource_id: format!("{SERVING}:marriage"),
                purpose: PURPOSE.to_owned(),
                scenario: "measuring the share path".to_owned(),
                fields: MARRIAGE_FIELDS.map(str::to_owned).to_vec(),
                mode: ShareMode::Query as i32,
                requested_expires_at: 0,
            })
            .await
            .map_err(|s| anyhow!("applying for {SERVING}:marriage: {}", describe_status(&s)))?
            .into_inner();
        let approved = provider
            .decide(DecideRequest {
                application_id: application.id.clone(),
                approve: true,
                reason: "benchmark".to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow!("approving {}: {}", application.id, describe_status(&s)))?
            .into_inner();
        let grant = approved.grant.ok_or_else(|| {
            anyhow!(
                "application {} was approved without a grant",
                application.id
            )
        })?;
        self.grant_id = Grant::decode(grant.grant.as_slice())?.id;
        self.grant = grant;
        Ok(())
    }

    /// Starts one proxy and a chain of four in front of the provider, if nginx is at hand.
    async fn start_nginx(&mut self) -> Result<()> {
        let Some(bin) = self.config.nginx.clone() else {
            self.nginx_note =
                "nginx not found (install Debian's nginx-light, or set NGINX): nginx rows skipped"
                    .into();
            return Ok(());
        };
        let dir = self.work.path().join("nginx");
        std::fs::create_dir_all(&dir)?;
        let provider = self.fed.agency(&self.provider_uscc)?;
        let serving = self.fed.node_config(code(SERVING))?;
        let server = fedgate_gateway::pki::write_pem_files(&dir, "proxy", &provider.cert)?;
        let tls = ProxyTls {
            ca: serving.tls.ca.clone(),
            server,
            client: (serving.tls.cert.clone(), serving.tls.key.clone()),
            upstream_name: agency_domain_name(self.provider_uscc.as_str()),
        };
        let one = NginxChain::start(&bin, &dir.join("one"), 1, self.provider_addr, &tls).await?;
        let four = NginxChain::start(&bin, &dir.join("four"), 4, self.provider_addr, &tls).await?;
        let version = tokio::process::Command::new(&bin)
            .arg("-v")
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
            .unwrap_or_default();
        self.nginx_note = format!("{version} ({})", bin.display());
        self.nginx = Some((one, four));
        Ok(())
    }

    fn cold_key(&mut self) -> Result<String> {
        let k = self
            .keys
            .get(usize::try_from(self.next_cold)?)
            .cloned()
            .ok_or_else(|| anyhow!("no unused registry key left: raise SHARE_BENCH_PERSONS"))?;
        self.next_cold += 1;
        Ok(k)
    }

    /// CPU time used so far by every process of the benchmark: nodes, proxies and this one.
    fn our_cpu(&self) -> Duration {
        let mut pids: Vec<u32> = self
            .fed
            .node_codes()
            .into_iter()
            .filter_map(|c| self.fed.pid(c).ok())
            .collect();
        if let Some((one, four)) = &self.nginx {
            pids.extend(one.pids());
            pids.extend(four.pids());
        }
        pids.extend(self.provider.as_ref().and_then(ProviderProcess::pid));
        pids.push(std::process::id());
        cpu::group_cpu(&pids)
    }

    async fn stop(self) -> Result<()> {
        if let Some((one, four)) = self.nginx {
            one.stop().await?;
            four.stop().await?;
        }
        self.fed.shutdown().await?;
        if let Some(p) = self.provider {
            p.stop().await?;
        }
        Ok(())
    }

    async fn provider_clients(
        &self,
        n: usize,
        via: Option<SocketAddr>,
    ) -> Result<Vec<ProviderClient<Channel>>> {
        let addr = via.unwrap_or(self.provider_addr);
        let tls = client_tls(&self.node_tls, &Peer::Agency(self.provider_uscc.clone()));
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let channel = Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(tls.clone())?
                .connect()
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            out.push(ProviderClient::new(channel));
        }
        Ok(out)
    }

    async fn agency_clients(&self, node: &str, n: usize) -> Result<Vec<AgencyClient<Channel>>> {
        let uscc = self.fed.consumer_at(code(node))?.uscc.clone();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.fed.client(&uscc).await?);
        }
        Ok(out)
    }

    /// Measures one row.
    async fn row(&mut self, path: SharePath, c: usize) -> Result<RowResult> {
        if path.needs_nginx() && self.nginx.is_none() {
            return Ok(RowResult::skipped(path, c, "nginx missing"));
        }
        let conns = c.min(self.config.connections).max(1);
        let keys = self.keys.clone();
        match path {
            SharePath::Direct | SharePath::Nginx1 | SharePath::Nginx4 => {
                let via = match (&self.nginx, path) {
                    (Some((one, _)), SharePath::Nginx1) => Some(one.entry()?),
                    (Some((_, four)), SharePath::Nginx4) => Some(four.entry()?),
                    _ => None,
                };
                let clients = self.provider_clients(conns, via).await?;
                let resource = format!("{SERVING}:household");
                let consumer = self.fed.consumer_at(code(SERVING))?.uscc.to_string();
                let call = move |mut client: ProviderClient<Channel>, n: u64| {
                    let req = FetchRequest {
                        request_id: format!("bench-{n}"),
                        resource_id: resource.clone(),
                        key_field: "id_number".to_owned(),
                        key: hot_key(&keys, n),
                        fields: HOUSEHOLD_FIELDS.map(str::to_owned).to_vec(),
                        consumer_uscc: consumer.clone(),
                        consumer_node: SERVING.to_owned(),
                        purpose: PURPOSE.to_owned(),
                    };
                    async move {
                        let mut r = tonic::Request::new(req);
                        r.set_timeout(CALL_TIMEOUT);
                        match client.fetch(r).await {
                            Ok(resp) => one_record(resp.into_inner().records.len()),
                            Err(s) => Err(describe_status(&s)),
                        }
                    }
                };
                self.measure(path, c, &clients, 0, call).await
            }
            SharePath::SameNode | SharePath::Conditional => {
                let clients = self.agency_clients(SERVING, conns).await?;
                let grant = (path == SharePath::Conditional)
                    .then(|| (self.grant.clone(), self.grant_id.clone()));
                let call = move |mut client: AgencyClient<Channel>, n: u64| {
                    let key = hot_key(&keys, n);
                    let (req, expect_grant) = match &grant {
                        Some((g, id)) => (marriage(&key, g), Some(id.clone())),
                        None => (household(&key), None),
                    };
                    async move {
                        let resp = share(&mut client, req).await?;
                        check_share(&resp, false, expect_grant.as_deref())
                    }
                };
                self.measure(path, c, &clients, 0, call).await
            }
            SharePath::CrossCity => {
                let clients = self.agency_clients(FAR, conns).await?;
                let call = move |mut client: AgencyClient<Channel>, n: u64| {
                    let key = usize::try_from(n)
                        .ok()
                        .and_then(|i| keys.get(i))
                        .cloned()
                        .unwrap_or_default();
                    async move {
                        let resp = share(&mut client, household(&key)).await?;
                        check_share(&resp, false, None)
                    }
                };
                let first = self.next_cold;
                self.measure(path, c, &clients, first, call).await
            }
            SharePath::CacheHit => {
                let clients = self.agency_clients(FAR, conns).await?;
                // Fill the cache: one uncached share of each key first.
                let mut first = clients
                    .first()
                    .cloned()
                    .ok_or_else(|| anyhow!("no client"))?;
                for i in 0..CACHED_KEYS {
                    share(&mut first, household(&keys[i]))
                        .await
                        .map_err(|e| anyhow!("{e}"))?;
                }
                let call = move |mut client: AgencyClient<Channel>, n: u64| {
                    let key = keys[usize::try_from(n % CACHED_KEYS as u64).unwrap_or(0)].clone();
                    async move {
                        let resp = share(&mut client, household(&key)).await?;
                        check_share(&resp, true, None)
                    }
                };
                self.measure(path, c, &clients, 0, call).await
            }
        }
    }

    /// Warms up, then measures `call` in a closed loop with `c` callers, reading every process's CPU time
    /// before and after (after the audit trail settled, when configured).
    async fn measure<C, F, Fut>(
        &mut self,
        path: SharePath,
        c: usize,
        clients: &[C],
        first_seq: u64,
        call: F,
    ) -> Result<RowResult>
    where
        C: Clone + Send + 'static,
        F: Fn(C, u64) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let cold = path == SharePath::CrossCity;
        let warm = Load {
            concurrency: c,
            max_requests: self.config.max_requests.max(2 * c as u64),
            duration: self.config.warmup,
        };
        let mut measured = Load {
            concurrency: c,
            // At least two requests per caller, however small the limit.
            max_requests: self.config.max_requests.max(2 * c as u64),
            duration: self.config.duration,
        };
        let mut seq = first_seq;
        if cold {
            // Each uncached share needs a key never asked for: bound both runs by the keys left.
            let left = (self.keys.len() as u64).saturating_sub(seq);
            let warm = Load {
                max_requests: warm.max_requests.min(left / 4),
                ..warm
            };
            let out = load::closed_loop(clients, warm, seq, call.clone()).await;
            fail_on_errors(path, c, "warm-up", &out)?;
            seq += load::seq_span(warm);
            let left = (self.keys.len() as u64).saturating_sub(seq);
            measured.max_requests = measured.max_requests.min(left);
            if measured.max_requests < c as u64 {
                bail!(
                    "too few registry keys left for the uncached row at c={c}: raise SHARE_BENCH_PERSONS"
                );
            }
        } else {
            let out = load::closed_loop(clients, warm, seq, call.clone()).await;
            fail_on_errors(path, c, "warm-up", &out)?;
        }
        self.settle().await?;
        let before = self.snapshot(path).await?;
        let out = load::closed_loop(clients, measured, seq, call).await;
        // The load generator's own time ends with the load; waiting for the audit trail is not its work.
        let generator = cpu::process_cpu(std::process::id()).unwrap_or_default();
        if cold {
            self.next_cold = seq + load::seq_span(measured);
        }
        self.settle().await?;
        let mut after = self.snapshot(path).await?;
        for (name, t) in &mut after.cpu {
            if name == "bench" {
                *t = generator;
            }
        }
        Ok(RowResult::measured(path, c, out, &before, &after))
    }

    async fn settle(&self) -> Result<()> {
        if self.config.settle {
            self.fed.wait_audit_settled(SETTLE_TIMEOUT).await?;
        }
        Ok(())
    }

    async fn snapshot(&self, path: SharePath) -> Result<Snapshot> {
        let mut s = Snapshot::default();
        for node in NODE_ORDER {
            let c: DivisionCode = code(node);
            let pid = self.fed.pid(c)?;
            s.cpu.push((
                node.to_owned(),
                cpu::process_cpu(pid).ok_or_else(|| anyhow!("node {node} (pid {pid}) is gone"))?,
            ));
            s.audit += audit_counts(self.fed.db_path(c)?).await?.of(node);
        }
        let nginx = match (&self.nginx, path) {
            (Some((one, _)), SharePath::Nginx1) => Some(one.pids()),
            (Some((_, four)), SharePath::Nginx4) => Some(four.pids()),
            _ => None,
        };
        if let Some(pids) = nginx {
            s.cpu.push(("nginx".to_owned(), cpu::group_cpu(&pids)));
        }
        if let Some(pid) = self.provider.as_ref().and_then(ProviderProcess::pid) {
            s.cpu.push((
                "provider".to_owned(),
                cpu::process_cpu(pid).ok_or_else(|| anyhow!("the provider (pid {pid}) is gone"))?,
            ));
        }
        s.cpu.push((
            "bench".to_owned(),
            cpu::process_cpu(std::process::id()).unwrap_or_default(),
        ));
        Ok(s)
    }
}

/// CPU time per process and audit records written, at one moment.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    /// CPU time so far by column name.
    pub cpu: Vec<(String, Duration)>,
    /// Records in the nodes' own audit chains, all nodes together.
    pub audit: u64,
}

fn fail_on_errors(path: SharePath, c: usize, phase: &str, out: &Outcome) -> Result<()> {
    match &out.first_error {
        Some(e) => bail!(
            "{} c={c} {phase}: {} of {} requests failed; first: {e}",
            path.name(),
            out.errors,
            out.errors + out.ok
        ),
        None => Ok(()),
    }
}
