//! Plain nginx `grpc_pass` proxies with mutual TLS on both sides, the baseline a fedgate hop is compared with.
//!
//! Each proxy is an nginx master process (this process's child) with its own configuration in a directory of
//! the benchmark, listening on a loopback port picked by binding `127.0.0.1:0`; its workers are the master's
//! children. A chain of `n` proxies ends at one upstream (the provider); every link is HTTP/2 over TLS 1.3 with
//! client certificates, and each proxy keeps idle upstream connections open for reuse.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::process::{Child, Command};

use super::cpu;

/// How long a proxy may take to accept connections and start its workers.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The nginx binary: `$NGINX` if set (`none` disables the baselines), else `nginx` on `PATH` or in `/usr/sbin`.
pub fn find_nginx() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("NGINX") {
        return (bin != "none").then(|| PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// Certificates a proxy presents and trusts, as files.
#[derive(Debug, Clone)]
pub struct ProxyTls {
    /// CA that signs every certificate of the federation; clients and upstreams must chain to it.
    pub ca: PathBuf,
    /// Certificate and key the proxy presents to its clients.
    pub server: (PathBuf, PathBuf),
    /// Certificate and key the proxy presents to its upstream.
    pub client: (PathBuf, PathBuf),
    /// Name the upstream's certificate must carry (and that every proxy's own certificate carries).
    pub upstream_name: String,
}

/// One running nginx master and its workers.
#[derive(Debug)]
struct Proxy {
    child: Child,
    addr: SocketAddr,
    workers: Vec<u32>,
}

/// A chain of nginx proxies in front of one upstream. Dropping it stops them (SIGTERM to each master).
#[derive(Debug)]
pub struct NginxChain {
    proxies: Vec<Proxy>,
}

impl NginxChain {
    /// Starts `len` proxies in `dir`, the first taking clients and the last forwarding to `upstream`; retries
    /// with new ports if another process takes one before nginx binds it.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        len: usize,
        upstream: SocketAddr,
        tls: &ProxyTls,
    ) -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(bin, dir, len, upstream, tls).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                    tracing::warn!(error = %e, "starting the nginx chain again with new ports");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(
        bin: &Path,
        dir: &Path,
        len: usize,
        upstream: SocketAddr,
        tls: &ProxyTls,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut reserved = Vec::with_capacity(len);
        for _ in 0..len {
            reserved.push(TcpListener::bind("127.0.0.1:0")?);
        }
        let addrs: Vec<SocketAddr> = reserved
            .iter()
            .map(TcpListener::local_addr)
            .collect::<std::io::Result<_>>()?;
        drop(reserved);
        let mut chain = Self {
            proxies: Vec::with_capacity(len),
        };
        for (i, addr) in addrs.iter().enumerate() {
            let next = addrs.get(i + 1).copied().unwrap_or(upstream);
            let pdir = dir.join(format!("proxy-{i}"));
            std::fs::create_dir_all(&pdir)?;
            let conf = pdir.join("nginx.conf");
            std::fs::write(&conf, config(&pdir, *addr, next, tls))?;
            let child = Command::new(bin)
                .arg("-p")
                .arg(&pdir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(pdir.join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            chain.proxies.push(Proxy {
                child,
                addr: *addr,
                workers: Vec::new(),
            });
        }
        for (i, p) in chain.proxies.iter_mut().enumerate() {
            p.wait_ready(&dir.join(format!("proxy-{i}")))
                .await
                .with_context(|| format!("nginx proxy {i} of {len}"))?;
        }
        Ok(chain)
    }

    /// Where clients connect: the first proxy.
    pub fn entry(&self) -> Result<SocketAddr> {
        self.proxies
            .first()
            .map(|p| p.addr)
            .ok_or_else(|| anyhow!("empty nginx chain"))
    }

    /// Every process of the chain: masters and workers.
    pub fn pids(&self) -> Vec<u32> {
        self.proxies
            .iter()
            .flat_map(|p| p.child.id().into_iter().chain(p.workers.iter().copied()))
            .collect()
    }

    /// Stops every proxy (SIGTERM: the master stops its workers) and waits for the masters to exit.
    pub async fn stop(mut self) -> Result<()> {
        for p in &mut self.proxies {
            if let Some(pid) = p.child.id() {
                terminate(pid);
                if tokio::time::timeout(Duration::from_secs(10), p.child.wait())
                    .await
                    .is_err()
                {
                    let _ = p.child.start_kill();
                    bail!("nginx {pid} did not stop within 10 s of SIGTERM; killed it");
                }
            }
        }
        Ok(())
    }
}

impl Drop for NginxChain {
    fn drop(&mut self) {
        for p in &self.proxies {
            if let Some(pid) = p.child.id() {
                terminate(pid);
            }
        }
    }
}

/// Sends SIGTERM to one process.
pub(super) fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Proxy {
    /// Waits until the proxy accepts connections and all its workers run.
    async fn wait_ready(&mut self, dir: &Path) -> Result<()> {
        let began = Instant::now();
        let want = workers();
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited with {status} before serving:\n{log}");
            }
            if let Some(pid) = self.child.id() {
                let workers = cpu::children_of(pid);
                if workers.len() >= want && tokio::net::TcpStream::connect(self.addr).await.is_ok()
                {
                    self.workers = workers;
                    return Ok(());
                }
            }
            if began.elapsed() > START_TIMEOUT {
                bail!(
                    "nginx did not serve on {} within {START_TIMEOUT:?}",
                    self.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Worker processes per proxy: one per CPU, what `worker_processes auto` gives.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The configuration of one proxy listening on `listen` and forwarding to `upstream`.
fn config(dir: &Path, listen: SocketAddr, upstream: SocketAddr, tls: &ProxyTls) -> String {
    let d = dir.display();
    let ca = tls.ca.display();
    let (scert, skey) = (tls.server.0.display(), tls.server.1.display());
    let (ccert, ckey) = (tls.client.0.display(), tls.client.1.display());
    let name = &tls.upstream_name;
    let workers = workers();
    format!(
        r#"# Written by the fedgate share-path benchmark.
daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 1024;

    upstream next {{
        server {upstream};
        keepalive 512;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen {listen} ssl http2 reuseport;
        ssl_protocols TLSv1.3;
        ssl_certificate {scert};
        ssl_certificate_key {skey};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_verify_depth 2;

        location / {{
            grpc_pass grpcs://next;
            grpc_ssl_protocols TLSv1.3;
            grpc_ssl_certificate {ccert};
            grpc_ssl_certificate_key {ckey};
            grpc_ssl_trusted_certificate {ca};
            grpc_ssl_verify on;
            grpc_ssl_verify_depth 2;
            grpc_ssl_name {name};
            grpc_ssl_server_name on;
            grpc_ssl_session_reuse on;
            grpc_read_timeout 30s;
        }}
    }}
}}
"#
    )
}
