//! Every node configuration shipped in `deploy/` and `examples/` is one the node accepts: it parses as
//! `NodeConfig` (unknown keys are refused) and names the node its file is for.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedgate_gateway::config::{NodeConfig, StorageConfig};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Files in `dir` whose names start with `node-` and end with `ext`, by name.
fn node_files(dir: &str, ext: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace().join(dir))
        .with_context(|| format!("reading {dir}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("node-") && n.ends_with(ext))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The TOML embedded in a Kubernetes manifest under `node.toml: |`.
fn embedded_toml(yaml: &str) -> Option<String> {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "node.toml: |");
    lines.next()?;
    let body: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    Some(body.join("\n"))
}

fn check(path: &Path, text: &str) -> Result<()> {
    let config: NodeConfig =
        toml::from_str(text).with_context(|| format!("{} does not parse", path.display()))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if !name.contains(&format!("node-{}.", config.code)) {
        bail!("{} configures node {}", path.display(), config.code);
    }
    Ok(())
}

#[test]
fn shipped_node_configurations_are_accepted() -> Result<()> {
    let mut checked = 0;
    for dir in ["deploy/compose/config", "examples/topology"] {
        for path in node_files(dir, ".toml")? {
            check(&path, &std::fs::read_to_string(&path)?)?;
            checked += 1;
        }
    }
    for path in node_files("deploy/kubernetes", ".yaml")? {
        let yaml = std::fs::read_to_string(&path)?;
        let toml = embedded_toml(&yaml)
            .with_context(|| format!("{} holds no node.toml", path.display()))?;
        check(&path, &toml)?;
        checked += 1;
    }
    assert_eq!(
        checked, 18,
        "six nodes in each of compose, examples and Kubernetes"
    );
    Ok(())
}

/// The Kubernetes province runs as two replicas on PostgreSQL, and its children list both.
#[test]
fn the_kubernetes_province_is_replicated_and_its_children_reach_both_replicas() -> Result<()> {
    use fedgate_gateway::config::StorageConfig;

    let dir = workspace().join("deploy/kubernetes");
    let read = |name: &str| -> Result<(String, NodeConfig)> {
        let yaml = std::fs::read_to_string(dir.join(name))?;
        let toml = embedded_toml(&yaml).with_context(|| format!("{name} holds no node.toml"))?;
        Ok((yaml, toml::from_str(&toml)?))
    };
    let (yaml, province) = read("node-350000.yaml")?;
    assert!(
        matches!(province.storage, StorageConfig::Postgres { .. }),
        "replicas share a PostgreSQL database"
    );
    assert!(province.signing_key.is_some(), "and one signing key");
    assert!(yaml.contains("replicas: 2"), "two replicas");
    assert!(yaml.contains("kind: PodDisruptionBudget") && yaml.contains("minAvailable: 1"));
    for city in ["node-350100.yaml", "node-350200.yaml"] {
        let (_, config) = read(city)?;
        let parent = config.parent.context("a city has a parent")?;
        let all: Vec<String> = std::iter::once(parent.address)
            .chain(parent.replicas)
            .collect();
        assert_eq!(
            all,
            [
                "https://node-350000-0.node-350000-pods:7400",
                "https://node-350000-1.node-350000-pods:7400"
            ],
            "{city} lists both replicas"
        );
    }
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml"))?;
    assert!(kustomization.contains("postgres-350000.yaml"));
    Ok(())
}

/// The lines of `text` from the first one whose trimmed form starts with `start` up to the next one at the same
/// or a smaller indentation.
fn yaml_block<'a>(text: &'a str, start: &str) -> Option<Vec<&'a str>> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(start));
    let first = lines.next()?;
    let indent = first.len() - first.trim_start().len();
    let mut block = vec![first];
    block.extend(
        lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent),
    );
    Some(block)
}

/// The arguments of a shell command line as `sh` would split them, for lines without nested quotes.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            (_, c) => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[test]
fn the_backup_cronjob_backs_up_the_node_it_names_with_arguments_fedgate_accepts() -> Result<()> {
    use clap::Parser;
    let dir = workspace().join("deploy/kubernetes");
    let cronjob = std::fs::read_to_string(dir.join("backup-350000.yaml"))?;
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml"))?;
    assert!(
        kustomization.contains("- backup-350000.yaml"),
        "the kustomization applies the CronJob"
    );
    assert!(cronjob.contains("kind: CronJob") && cronjob.contains("concurrencyPolicy: Forbid"));

    // The command the backup container runs is one fedgate parses, with the binary the init container copies.
    let backup = yaml_block(&cronjob, "- name: backup").context("no backup container")?;
    let backup_text = backup.join("\n");
    let folded = yaml_block(&backup_text, "- >-").context("no folded command")?;
    let command = folded[1..]
        .iter()
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join(" ");
    let words = shell_words(&command);
    assert_eq!(words[..2], ["exec", "/tools/fedgate"], "{command}");
    assert!(
        cronjob.contains(r#"command: ["/bin/cp", "/usr/local/bin/fedgate", "/tools/fedgate"]"#)
    );
    fedgate_node::cli::Cli::try_parse_from(words[1..].iter())
        .with_context(|| format!("fedgate does not accept {command}"))?;
    let config_path = words
        .iter()
        .position(|w| w == "--config")
        .and_then(|i| words.get(i + 1))
        .context("no --config")?;

    // It reads the node's own configuration and every file that configuration names, from the node's own
    // ConfigMap and Secrets.
    let node_yaml = std::fs::read_to_string(dir.join("node-350000.yaml"))?;
    let config: NodeConfig = toml::from_str(&embedded_toml(&node_yaml).context("no node.toml")?)?;
    let mounts: Vec<&str> = backup
        .iter()
        .filter_map(|l| l.trim().strip_prefix("mountPath: "))
        .collect();
    let mut needed = vec![
        PathBuf::from(config_path),
        config.tls.ca.clone(),
        config.tls.cert.clone(),
        config.tls.key.clone(),
    ];
    needed.extend(config.signing_key_path());
    match &config.storage {
        StorageConfig::Sqlite { path, .. } => {
            needed.push(path.clone());
            assert!(
                cronjob.contains("podAffinity"),
                "a backup of an SQLite node runs beside its pod"
            );
        }
        StorageConfig::Postgres { .. } => {
            // pg_dump of the server's own version, with the password the node uses.
            let server = std::fs::read_to_string(dir.join("postgres-350000.yaml"))?;
            let image = server
                .lines()
                .find_map(|l| l.trim().strip_prefix("image: postgres:"))
                .context("no server image")?;
            assert!(
                backup_text.contains(&format!("image: postgres:{image}")),
                "the backup runs in the server's image postgres:{image}"
            );
            assert!(backup_text.contains("name: PGPASSWORD"));
            let secret = yaml_block(&node_yaml, "- name: PGPASSWORD")
                .and_then(|b| {
                    b.iter()
                        .find_map(|l| l.trim().strip_prefix("name: ").map(str::to_owned))
                })
                .context("the node takes PGPASSWORD from a Secret")?;
            assert!(backup_text.contains(&format!("name: {secret}")), "{secret}");
        }
    }
    for path in &needed {
        assert!(
            mounts.iter().any(|m| path.starts_with(m)),
            "{} is on no volume the backup mounts ({mounts:?})",
            path.display()
        );
    }
    for line in node_yaml.lines().map(str::trim) {
        if line.starts_with("secretName: ") || line == "name: node-350000-config" {
            assert!(cronjob.contains(line), "the CronJob lacks {line}");
        }
    }

    // With kubectl at hand, the kustomization builds with the CronJob in it.
    match std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(&dir)
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "kubectl kustomize: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let built = String::from_utf8_lossy(&out.stdout);
            assert!(built.contains("kind: CronJob") && built.contains("name: backup-node-350000"));
        }
        Err(e) => {
            eprintln!("kubectl is not available ({e}): the kustomization build is not checked")
        }
    }
    Ok(())
}

/// `key=value` settings of one section of a systemd unit, in order.
fn unit_section(unit: &str, section: &str) -> Vec<(String, String)> {
    unit.lines()
        .skip_while(|l| l.trim() != format!("[{section}]"))
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn the_backup_timer_runs_the_backup_service_daily_and_systemd_accepts_both() -> Result<()> {
    let dir = workspace().join("deploy/systemd");
    let service = std::fs::read_to_string(dir.join("fedgate-backup@.service"))?;
    let timer = std::fs::read_to_string(dir.join("fedgate-backup@.timer"))?;
    let readme = std::fs::read_to_string(dir.join("README.md"))?;
    let env_example = std::fs::read_to_string(dir.join("backup.env.example"))?;
    let script = std::fs::read_to_string(dir.join("fedgate-backup"))?;

    let t = unit_section(&timer, "Timer");
    for setting in [("OnCalendar", "daily"), ("Persistent", "true")] {
        assert!(
            t.contains(&(setting.0.to_owned(), setting.1.to_owned())),
            "timer lacks {setting:?}"
        );
    }
    let s = unit_section(&service, "Service");
    let get = |k: &str| {
        s.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("Type"), ["oneshot"]);
    assert_eq!(
        get("ExecStart"),
        ["/usr/local/lib/fedgate/fedgate-backup take %i"]
    );
    assert_eq!(
        get("ExecStartPost"),
        ["/usr/local/lib/fedgate/fedgate-backup copy %i"]
    );
    // The README installs the script where the unit runs it, and the settings file the unit reads.
    assert!(readme.contains("deploy/systemd/fedgate-backup /usr/local/lib/fedgate/fedgate-backup"));
    assert!(get("EnvironmentFile").contains(&"/etc/fedgate/backup.env".to_owned()));
    assert!(readme.contains("/etc/fedgate/backup.env"));
    // Every setting of the example file is one the script reads.
    for line in env_example
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
    {
        let key = line.split('=').next().unwrap_or_default();
        assert!(
            script.contains(&format!("${{{key}")),
            "the script ignores {key}"
        );
    }

    // systemd itself parses both units (and the node's), against a scratch root holding the script.
    let Ok(version) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze is not available: the units are not verified by systemd");
        return Ok(());
    };
    assert!(version.status.success());
    let root = tempfile::tempdir()?;
    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units)?;
    std::fs::create_dir_all(root.path().join("usr/lib/systemd"))?;
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(root.path().join("usr/lib/systemd/"))
        .status()?;
    assert!(copied.success(), "copying the system's units");
    for f in [
        "fedgate-node@.service",
        "fedgate-backup@.service",
        "fedgate-backup@.timer",
    ] {
        std::fs::copy(dir.join(f), units.join(f))?;
    }
    for (path, from) in [
        (
            "usr/local/lib/fedgate/fedgate-backup",
            dir.join("fedgate-backup"),
        ),
        ("usr/local/bin/fedgate", dir.join("fedgate-backup")),
    ] {
        let to = root.path().join(path);
        std::fs::create_dir_all(to.parent().context("a parent")?)?;
        std::fs::copy(from, &to)?;
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .args([
            "fedgate-node@350102.service",
            "fedgate-backup@350102.service",
            "fedgate-backup@350102.timer",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    Ok(())
}

/// The port of a `host:port` listen address.
fn port_of(listen: &str) -> Option<u16> {
    listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// Kubernetes probes the metrics port over plain HTTP (`/livez`, `/readyz`), never the TLS port, whose every
/// probe would be a refused handshake.
#[test]
fn kubernetes_probes_ask_livez_and_readyz_on_the_metrics_port() -> Result<()> {
    let files = node_files("deploy/kubernetes", ".yaml")?;
    assert_eq!(files.len(), 6);
    for path in files {
        let yaml = std::fs::read_to_string(&path)?;
        let name = path.display();
        assert!(!yaml.contains("tcpSocket"), "{name} still probes TCP");
        let config: NodeConfig = toml::from_str(&embedded_toml(&yaml).context("no node.toml")?)?;
        let metrics = config.metrics.context("the node serves metrics")?;
        let port = port_of(&metrics.listen).context("a metrics port")?;
        let ports = yaml_block(&yaml, "- name: metrics").context("a metrics container port")?;
        assert!(
            ports
                .iter()
                .any(|l| l.trim() == format!("containerPort: {port}")),
            "{name}: the port named metrics is {port}"
        );
        for (probe, want) in [
            ("startupProbe:", "/livez"),
            ("livenessProbe:", "/livez"),
            ("readinessProbe:", "/readyz"),
        ] {
            let block = yaml_block(&yaml, probe).with_context(|| format!("{name}: {probe}"))?;
            let lines: Vec<&str> = block.iter().map(|l| l.trim()).collect();
            assert!(lines.contains(&"httpGet:"), "{name}: {probe} {lines:?}");
            assert!(
                lines.contains(&format!("path: {want}").as_str()),
                "{name}: {probe}"
            );
            assert!(lines.contains(&"port: metrics"), "{name}: {probe}");
        }
    }
    Ok(())
}

/// The healthcheck command of compose's nodes, as the container runs it (compose's `$$` is a `$`).
fn compose_healthcheck() -> Result<Vec<String>> {
    let compose = std::fs::read_to_string(workspace().join("deploy/compose/compose.yaml"))?;
    let node = yaml_block(&compose, "x-node:").context("no x-node")?;
    let line = node
        .iter()
        .find_map(|l| l.trim().strip_prefix("test: "))
        .context("the nodes have no healthcheck")?;
    // A flow sequence of double-quoted strings is JSON.
    let test: Vec<String> = serde_json::from_str(line).context("healthcheck test")?;
    Ok(test.into_iter().map(|w| w.replace("$$", "$")).collect())
}

/// Compose's healthcheck reads `/readyz` on the metrics port every node configures, and succeeds against a
/// ready node, fails against none.
#[tokio::test]
async fn the_compose_healthcheck_reads_readyz_and_passes_only_on_a_ready_node() -> Result<()> {
    let test = compose_healthcheck()?;
    assert_eq!(test[..3], ["CMD", "bash", "-c"], "{test:?}");
    let script = &test[3];
    assert!(script.contains("GET /readyz "), "{script}");
    let mut configured = std::collections::BTreeSet::new();
    for path in node_files("deploy/compose/config", ".toml")? {
        let config: NodeConfig = toml::from_str(&std::fs::read_to_string(&path)?)?;
        let listen = config
            .metrics
            .context("compose nodes serve metrics")?
            .listen;
        configured.insert(port_of(&listen).context("a port")?);
    }
    assert_eq!(configured.len(), 1, "one metrics port in every container");
    let port = configured.first().copied().unwrap_or_default();
    let target = format!("/dev/tcp/127.0.0.1/{port}");
    assert!(script.contains(&target), "{script} asks port {port}");

    let run = |addr: std::net::SocketAddr| {
        let script = script.replace(&target, &format!("/dev/tcp/{}/{}", addr.ip(), addr.port()));
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("bash")
                .args(["-c", &script])
                .status()
        })
    };
    fedgate_tests::init();
    let net =
        fedgate_node::devnet::Devnet::start(vec![fedgate_node::devnet::NodeSpec::new("350000")?])
            .await?;
    let addr = net
        .node(fedgate_tests::code("350000"))?
        .metrics_addr()
        .context("metrics")?;
    assert!(run(addr).await??.success(), "healthy while ready");
    net.shutdown().await?;
    let gone = run(addr).await??;
    assert!(!gone.success(), "unhealthy once the node is gone");
    Ok(())
}

/// The value of `key: value` among `lines`, unquoted; `None` when no line sets it.
fn yaml_value(lines: &[&str], key: &str) -> Option<String> {
    lines.iter().find_map(|l| {
        let (k, v) = l.trim().split_once(':')?;
        (k.trim_matches(|c| c == '"' || c == '-' || c == ' ') == key)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// The block of compose service `name`.
fn service<'a>(compose: &'a str, name: &str) -> Option<Vec<&'a str>> {
    let at = compose.find(&format!("\n  {name}:\n"))?;
    yaml_block(&compose[at + 1..], &format!("{name}:"))
}

#[test]
fn compose_nodes_export_traces_to_the_collector_which_feeds_jaeger_on_loopback() -> Result<()> {
    let dir = workspace().join("deploy/compose");
    let compose = std::fs::read_to_string(dir.join("compose.yaml"))?;
    let node = yaml_block(&compose, "x-node:").context("the x-node template")?;
    let endpoint = yaml_value(&node, "OTEL_EXPORTER_OTLP_ENDPOINT")
        .context("nodes are given OTEL_EXPORTER_OTLP_ENDPOINT")?;
    assert_eq!(endpoint, "http://otel-collector:4317");
    let nodes = compose
        .lines()
        .filter(|l| l.starts_with("  node-") && l.trim_end().ends_with(':'))
        .count();
    let anchored = compose.matches("<<: *node").count();
    assert_eq!(
        (nodes, anchored),
        (6, 6),
        "every node takes the x-node template"
    );

    let collector = service(&compose, "otel-collector").context("an otel-collector service")?;
    let mount = collector
        .iter()
        .find_map(|l| l.trim().strip_prefix("- ./config/otel-collector.yaml:"))
        .context("the collector's configuration is mounted")?;
    let mounted_at = mount.trim_end_matches(":ro");
    let command = yaml_value(&collector, "command").context("collector command")?;
    assert!(
        command.contains(&format!("--config={mounted_at}")),
        "the collector reads the mounted file: {command}"
    );

    let config = std::fs::read_to_string(dir.join("config/otel-collector.yaml"))?;
    let receiver = yaml_block(&config, "otlp:").context("an OTLP receiver")?;
    let listen = yaml_value(&receiver, "endpoint").context("the receiver's endpoint")?;
    assert_eq!(
        listen, "0.0.0.0:4317",
        "the collector listens where the nodes send"
    );
    let exporter = yaml_block(&config, "otlp/jaeger:").context("an OTLP exporter to Jaeger")?;
    assert_eq!(
        yaml_value(&exporter, "endpoint").as_deref(),
        Some("jaeger:4317")
    );
    let pipeline = yaml_block(&config, "traces:").context("a traces pipeline")?;
    assert_eq!(
        yaml_value(&pipeline, "receivers").as_deref(),
        Some("[otlp]")
    );
    assert!(
        yaml_value(&pipeline, "exporters").is_some_and(|e| e.contains("otlp/jaeger")),
        "the pipeline exports to Jaeger"
    );

    let jaeger = service(&compose, "jaeger").context("a jaeger service")?;
    assert_eq!(
        yaml_value(&jaeger, "COLLECTOR_OTLP_ENABLED").as_deref(),
        Some("true")
    );
    let ports = yaml_value(&jaeger, "ports").context("Jaeger's ports")?;
    assert_eq!(
        ports, "[\"127.0.0.1:16686:16686\"]",
        "the Jaeger UI is published on loopback only"
    );
    Ok(())
}

/// Each compose node serves its console, and compose publishes it on the host's loopback only.
#[test]
fn compose_consoles_are_published_on_loopback_only() -> Result<()> {
    let compose = std::fs::read_to_string(workspace().join("deploy/compose/compose.yaml"))?;
    for path in node_files("deploy/compose/config", ".toml")? {
        let config: fedgate_gateway::config::NodeConfig =
            toml::from_str(&std::fs::read_to_string(&path)?)?;
        let console = config
            .console
            .with_context(|| format!("{} serves no console", path.display()))?;
        let port = port_of(&console.listen).context("the console's port")?;
        let node = service(&compose, &format!("node-{}", config.code))
            .with_context(|| format!("no compose service for node {}", config.code))?;
        let ports = yaml_value(&node, "ports").context("the node's published ports")?;
        let published: Vec<&str> = ports
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|p| p.trim().trim_matches('"'))
            .filter(|p| p.ends_with(&format!(":{port}")))
            .collect();
        assert_eq!(published.len(), 1, "node {}: {ports}", config.code);
        assert!(
            published[0].starts_with("127.0.0.1:"),
            "node {}: the console is published on {}",
            config.code,
            published[0]
        );
    }
    Ok(())
}
