//! Every node configuration shipped in `deploy/` and `examples/` is one the node accepts: it parses as
//! `NodeConfig` (unknown keys are refused) and names the node its file is for.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedgate_gateway::config::NodeConfig;

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
