//! The example civil-registry provider as a process of its own, so that a call to it crosses processes as a
//! node's does and its CPU time is read apart from the load generator's.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_gateway::pki::{IssuedCert, write_pem_files};
use tokio::process::{Child, Command};

/// How long the provider may take to generate its registry and listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What the provider serves and to whom.
#[derive(Debug, Clone)]
pub struct ProviderArgs<'a> {
    /// Division code of its node (the only caller it accepts, and the area of its residents).
    pub node: &'a str,
    /// Residents generated.
    pub persons: usize,
    /// Generator seed: the same node, seed and count give the same residents as the in-process registry.
    pub seed: u64,
    /// The federation CA certificate file.
    pub ca: &'a Path,
    /// The provider agency's certificate and key.
    pub cert: &'a IssuedCert,
}

/// A running `civil-registry-provider` process; dropping it kills it.
#[derive(Debug)]
pub struct ProviderProcess {
    child: Child,
    addr: SocketAddr,
}

impl ProviderProcess {
    /// Starts `bin` on `listener`'s address (the listener is released just before) with its files in `dir`,
    /// and waits until it accepts connections.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        listener: std::net::TcpListener,
        args: &ProviderArgs<'_>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (cert, key) = write_pem_files(dir, "provider", args.cert)?;
        let addr = listener.local_addr()?;
        let log = std::fs::File::create(dir.join("provider.log"))?;
        drop(listener);
        let child = Command::new(bin)
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--node-code", args.node])
            .arg("--ca")
            .arg(args.ca)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["--count", &args.persons.to_string()])
            .args(["--seed", &args.seed.to_string()])
            .args(["--samples", "0"])
            // The example logs every fetch at info; a provider under load would not.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut p = Self { child, addr };
        let began = Instant::now();
        loop {
            if let Some(status) = p.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("provider.log")).unwrap_or_default();
                bail!("the provider exited with {status} before serving:\n{log}");
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(p);
            }
            if began.elapsed() > START_TIMEOUT {
                bail!("the provider did not listen on {addr} within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where it serves.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops it with SIGTERM and waits for it to exit.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            super::nginx::terminate(pid);
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.start_kill();
                bail!("the provider did not stop within 10 s of SIGTERM; killed it");
            }
        }
        Ok(())
    }
}
