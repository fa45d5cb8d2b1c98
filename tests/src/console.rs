//! Driving a node's web console in tests: a federation whose nodes serve it, accounts made through the Operator
//! service, a plain HTTPS client (to forge what a browser would not send), and a headless Chromium over WebDriver.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use fedgate_gateway::console::ConsoleConfig;
use fedgate_gateway::ident::{DivisionCode, Peer};
use fedgate_node::devnet::{Devnet, NodeSpec};
use fedgate_proto::v1::{AddUserRequest, ConsoleRole, UserCredentials};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts `specs` with the console on every node, sessions lasting `session_secs`, locked after `lockout_after`.
pub async fn federation(
    specs: Vec<NodeSpec>,
    session_secs: u64,
    lockout_after: u32,
) -> Result<Devnet> {
    federation_with(
        specs,
        ConsoleConfig {
            session_secs,
            lockout_after,
            ..Default::default()
        },
    )
    .await
}

/// Starts `specs` with the console configured as `console` on every node, on a free loopback port.
pub async fn federation_with(specs: Vec<NodeSpec>, console: ConsoleConfig) -> Result<Devnet> {
    Devnet::start_configured(specs, Default::default(), move |mut c| {
        c.console = Some(ConsoleConfig {
            listen: "127.0.0.1:0".into(),
            ..console.clone()
        });
        c
    })
    .await
}

/// The console's address at `node`.
pub fn console_addr(net: &Devnet, node: &str) -> Result<SocketAddr> {
    net.node(crate::code(node))?
        .console_addr()
        .ok_or_else(|| anyhow!("node {node} serves no console"))
}

/// Adds a console account at `node` through its Operator service.
pub async fn add_user(
    net: &Devnet,
    node: &str,
    (login, name): (&str, &str),
    role: ConsoleRole,
    agency: &str,
    totp: bool,
) -> Result<UserCredentials> {
    let mut op = crate::operator_client(net, node)?;
    Ok(op
        .add_user(AddUserRequest {
            login: login.into(),
            name: name.into(),
            role: role as i32,
            agency_uscc: agency.into(),
            totp,
        })
        .await?
        .into_inner())
}

/// An answer of the console.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Headers, names in lower case (the last of each name).
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The `Location` header, if any.
    pub fn location(&self) -> Option<&str> {
        self.headers.get("location").map(String::as_str)
    }

    /// The first CSRF token in the page's forms.
    pub fn csrf(&self) -> Result<String> {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .ok_or_else(|| anyhow!("no CSRF token in the page: {}", self.body))?;
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        Ok(rest.split('"').next().unwrap_or_default().to_owned())
    }
}

/// An HTTPS client of one node's console that keeps the cookies it is given, as a browser would, and sends
/// whatever it is told to, as a forger would.
pub struct ConsoleClient {
    addr: SocketAddr,
    server: rustls_pki_types::ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    /// Cookies held, by name.
    pub cookies: BTreeMap<String, String>,
}

impl ConsoleClient {
    /// A client of the console of `node`, trusting the federation's CA and checking the node's server name.
    pub fn new(net: &Devnet, node: &str) -> Result<Self> {
        let code: DivisionCode = node.parse()?;
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(net.ca_path())?;
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(c?)?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            addr: console_addr(net, node)?,
            server: rustls_pki_types::ServerName::try_from(fedgate_gateway::pki::server_name(
                &Peer::Node(code),
            ))?,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            cookies: BTreeMap::new(),
        })
    }

    async fn send(&mut self, head: String, body: &str) -> Result<Answer> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let mut tls = self.tls.connect(self.server.clone(), tcp).await?;
        let cookies = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut req = head;
        if !cookies.is_empty() {
            req.push_str(&format!("Cookie: {cookies}\r\n"));
        }
        req.push_str(&format!(
            "Host: {}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        ));
        tls.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut raw))
            .await
            .context("the console did not answer within 30 s")?
            .or_else(|e| {
                // A server that closes without close_notify still said everything.
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Ok(0)
                } else {
                    Err(e)
                }
            })?;
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("not an HTTP answer: {raw:?}"))?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no status in {head:?}"))?;
        let mut headers = BTreeMap::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
                if k == "set-cookie" {
                    let pair = v.split(';').next().unwrap_or_default();
                    if let Some((name, value)) = pair.split_once('=') {
                        if value.is_empty() || v.contains("Max-Age=0") {
                            self.cookies.remove(name);
                        } else {
                            self.cookies.insert(name.to_owned(), value.to_owned());
                        }
                    }
                }
                headers.insert(k, v);
            }
        }
        Ok(Answer {
            status,
            headers,
            body: body.to_owned(),
        })
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Result<Answer> {
        self.send(format!("GET {path} HTTP/1.1\r\n"), "").await
    }

    /// `POST path` with a form, from `origin` when given (browsers send their own).
    pub async fn post(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
        origin: Option<&str>,
    ) -> Result<Answer> {
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut head =
            format!("POST {path} HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n");
        if let Some(o) = origin {
            head.push_str(&format!("Origin: {o}\r\n"));
        }
        self.send(head, &body).await
    }

    /// Signs in; answers the sign-in's answer (303 to `/` on success).
    pub async fn sign_in(&mut self, login: &str, password: &str, code: &str) -> Result<Answer> {
        let form = self.get("/login").await?;
        let csrf = form.csrf()?;
        self.post(
            "/login",
            &[
                ("csrf", &csrf),
                ("login", login),
                ("password", password),
                ("code", code),
            ],
            None,
        )
        .await
    }
}

/// Percent-encodes a form value.
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A headless Chromium driven over WebDriver by its chromedriver, stopped on drop.
pub struct Browser {
    /// The WebDriver session.
    pub client: fantoccini::Client,
    driver: tokio::process::Child,
}

/// Where the console tests write their screenshots.
pub fn screenshot_dir() -> PathBuf {
    std::env::var_os("FEDGATE_ARTEFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/artefacts"))
        })
        .join("console")
}

fn find_driver() -> Option<PathBuf> {
    let candidates = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("chromedriver"))
                    .find(|p| p.exists())
            })
        })
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium session that accepts the federation's
    /// certificates (issued for node names, not for 127.0.0.1). `None` when no chromedriver is installed, unless
    /// `FEDGATE_REQUIRE_BROWSER` is set (as CI sets it), when that is an error.
    pub async fn start() -> Result<Option<Self>> {
        let Some(driver) = find_driver() else {
            if std::env::var_os("FEDGATE_REQUIRE_BROWSER").is_some() {
                bail!("FEDGATE_REQUIRE_BROWSER is set but no chromedriver is installed");
            }
            eprintln!("no chromedriver installed: skipping the browser test");
            return Ok(None);
        };
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let child = tokio::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", driver.display()))?;
        let mut caps = serde_json::Map::new();
        caps.insert("acceptInsecureCerts".into(), serde_json::Value::Bool(true));
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1366,900", "--lang=zh-CN"]
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let began = std::time::Instant::now();
        let client = loop {
            let mut builder = fantoccini::ClientBuilder::new(
                hyper_util::client::legacy::connect::HttpConnector::new(),
            );
            builder.capabilities(caps.clone());
            match builder.connect(&url).await {
                Ok(c) => break c,
                Err(e) if began.elapsed() < Duration::from_secs(30) => {
                    tracing::debug!(error = %e, "chromedriver not ready yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => bail!("no WebDriver session within 30 s: {e}"),
            }
        };
        Ok(Some(Self {
            client,
            driver: child,
        }))
    }

    /// Writes a screenshot of the page shown to the artefacts directory as `<name>.png`.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let png = self.client.screenshot().await?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) -> Result<()> {
        let closed = self.client.clone().close().await;
        let _ = self.driver.kill().await;
        closed.map_err(Into::into)
    }
}
