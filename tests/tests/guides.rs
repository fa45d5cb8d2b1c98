//! The commands README.md and the sample topology's guide show run as written: each block is run by bash in a
//! scratch checkout whose `target/release/` holds this workspace's binaries, the guides' fixed loopback ports
//! moved to free ones.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate_tests::guide::{self, Block, PortMap, Scratch, workspace};

/// Longest one block may run (a node or provider starting takes well under a second).
const BLOCK: Duration = Duration::from_secs(120);
/// Longest the catalog may take to reach the province.
const CONVERGE: Duration = Duration::from_secs(60);

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(workspace().join(path)).with_context(|| format!("reading {path}"))
}

/// The one `sh` block under `heading` whose text contains `needle`.
fn block<'a>(blocks: &'a [Block], heading: &str, needle: &str) -> Result<&'a Block> {
    let found: Vec<_> = guide::under(blocks, heading, "sh")
        .into_iter()
        .filter(|b| b.text.contains(needle))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => bail!(
            "{} sh blocks under {heading:?} contain {needle:?}",
            found.len()
        ),
    }
}

/// The workspace's package names, from `cargo metadata`.
fn packages() -> Result<Vec<String>> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace())
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["packages"]
        .as_array()
        .context("packages")?
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect())
}

/// A `cargo build` line is not run (the binaries are this workspace's own); every package it names exists.
fn check_build_line(line: &str, packages: &[String]) {
    let words: Vec<&str> = line.split_whitespace().collect();
    for pair in words.windows(2).filter(|w| w[0] == "-p") {
        assert!(
            packages.iter().any(|p| p == pair[1]),
            "{line}: no package {}",
            pair[1]
        );
    }
}

/// The block's lines, a `cargo build` line checked and dropped.
fn without_build(block: &Block, packages: &[String]) -> String {
    block
        .text
        .lines()
        .filter(|l| {
            let build = l.trim_start().starts_with("cargo build");
            if build {
                check_build_line(l, packages);
            }
            !build
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_readme_commands_run_as_written() -> Result<()> {
    let readme = read("README.md")?;
    let blocks = guide::blocks(&readme);
    let sh: Vec<&Block> = blocks.iter().filter(|b| b.lang == "sh").collect();
    // The two commands for a fresh machine come first; CI runs the second exactly.
    assert_eq!(
        sh.first().map(|b| b.text.trim()),
        Some("cargo run --release -p fedgate-node -- demo")
    );
    assert_eq!(
        sh.get(1).map(|b| b.text.trim()),
        Some("cargo test --workspace --locked")
    );
    assert!(read(".ci/run")?.contains("\ncargo test --workspace --locked\n"));
    // Every benchmark the README names is a bench target of the tests crate.
    let manifest: toml::Table = toml::from_str(&read("tests/Cargo.toml")?)?;
    let benches: Vec<&str> = manifest["bench"]
        .as_array()
        .context("[[bench]]")?
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    for b in sh.iter().filter(|b| b.text.contains("cargo bench")) {
        let line = b.text.trim();
        let name = line
            .split_whitespace()
            .skip_while(|w| *w != "--bench")
            .nth(1)
            .with_context(|| format!("{line}: no --bench"))?;
        let crate_name = line
            .split_whitespace()
            .skip_while(|w| *w != "-p")
            .nth(1)
            .unwrap_or_default();
        match crate_name {
            "fedgate-tests" => assert!(benches.contains(&name), "{line}: no bench {name}"),
            "fedgate-gateway" => assert!(
                workspace()
                    .join(format!("gateway/benches/{name}.rs"))
                    .exists(),
                "{line}: no bench {name}"
            ),
            other => bail!("{line}: bench of unexpected package {other}"),
        }
    }

    // The compose commands (no container engine here): the folder, profiles and services they name exist.
    let compose = read("deploy/compose/compose.yaml")?;
    for b in sh.iter().filter(|b| b.text.contains("docker compose")) {
        for line in b.text.lines().map(str::trim) {
            if let Some(dir) = line.strip_prefix("cd ") {
                assert!(
                    workspace().join(dir).join("compose.yaml").exists(),
                    "{line}"
                );
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            for pair in words.windows(2) {
                match pair[0] {
                    "--profile" => assert!(
                        compose.contains(&format!("profiles: [{}]", pair[1])),
                        "{line}: no profile {}",
                        pair[1]
                    ),
                    "--rm" => assert!(
                        compose.contains(&format!("\n  {}:\n", pair[1])),
                        "{line}: no service {}",
                        pair[1]
                    ),
                    _ => {}
                }
            }
        }
    }

    let scratch = Scratch::new().await?;
    let root = scratch.root().to_path_buf();
    // The demo, as the first command runs it (built by this test's profile).
    let demo = scratch
        .run_ok(&root, "./target/release/fedgate demo", BLOCK)
        .await?;
    assert!(
        demo.stdout.contains("demo ok:"),
        "{}\n{}",
        demo.stdout,
        demo.stderr
    );

    // "Running nodes yourself": the certificates, then the node with the configuration the README shows.
    let packages = packages()?;
    let run = block(&blocks, "Running nodes yourself", "fedgate node")?;
    let config = guide::under(&blocks, "Running nodes yourself", "toml")
        .into_iter()
        .find(|b| b.text.contains("code = \"350100\""))
        .context("the README's node configuration")?;
    let ports = PortMap::new(&[7400, 7401, 7402, 7443, 7501, 8443, 9464])?;
    std::fs::write(root.join("node-350100.toml"), ports.apply(&config.text))?;
    let mut script = without_build(run, &packages);
    let node_line = script
        .lines()
        .find(|l| l.contains("fedgate node"))
        .context("the node command")?
        .to_owned();
    script = script.replace(
        &node_line,
        &format!("{node_line} > node.log 2>&1 &\necho $! > node.pid"),
    );
    scratch.run_ok(&root, &script, BLOCK).await?;
    scratch
        .run_ok(
            &root,
            "until grep -q 'listening on' node.log; do sleep 0.1; done",
            BLOCK,
        )
        .await?;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], ports.get(9464)?));
    let (status, scraped) = fedgate_tests::probe::http_get(metrics, "/metrics").await?;
    assert_eq!(status, 200, "{scraped}");
    assert!(scraped.contains("fedgate_"), "{scraped}");
    // Operating it from another shell: the report, its operational records (the report's own Operator call
    // among them), and one more certificate from the existing CA, which the running node moves to.
    let operate = block(&blocks, "Running nodes yourself", "fedgate ops")?;
    scratch
        .run_ok(&root, &without_build(operate, &packages), BLOCK)
        .await?;
    // Records are stored a moment after each call: asked again until the report's is there.
    scratch
        .run_ok(
            &root,
            "until ./target/release/fedgate ops --config node-350100.toml | grep -q 'Operator\\.'; do sleep 0.2; done",
            BLOCK,
        )
        .await?;
    scratch
        .run_ok(
            &root,
            "until grep -q 'certificates reloaded' node.log; do sleep 0.1; done",
            BLOCK,
        )
        .await?;
    // SIGTERM drains and stops it with status 0.
    let stopped = scratch
        .run(
            &root,
            "pid=$(cat node.pid); kill $pid; while kill -0 $pid 2>/dev/null; do sleep 0.1; done; \
             grep -q 'node stopped' node.log",
            BLOCK,
        )
        .await?;
    assert_eq!(
        stopped.code,
        Some(0),
        "{}",
        read_log(&root.join("node.log"))
    );
    Ok(())
}

#[tokio::test]
async fn the_sample_topology_guide_runs_as_written() -> Result<()> {
    let guide_text = read("examples/topology/README.md")?;
    let blocks = guide::blocks(&guide_text);
    let ports = PortMap::new(&[7400, 7401, 7402, 7403, 7404, 7405, 7502, 7503])?;
    let scratch = Scratch::new().await?;
    let root = scratch.root().to_path_buf();
    let topology = scratch.copy_folder("examples/topology", |t| ports.apply(t))?;
    let packages = packages()?;
    let step = |heading: &str, needle: &str| -> Result<String> {
        Ok(ports.apply(&without_build(block(&blocks, heading, needle)?, &packages)))
    };

    // 1. Build: the PATH line and the cd, from the root.
    let build = step("1. Build", "cd examples/topology")?;
    let ran = scratch
        .run_ok(&root, &format!("{build}\ncommand -v fedgate; pwd"), BLOCK)
        .await?;
    assert!(
        ran.stdout.contains("target/release/fedgate")
            && ran.stdout.trim_end().ends_with("topology"),
        "{}",
        ran.stdout
    );
    // 2.–4. Certificates, six nodes, two providers.
    scratch
        .run_ok(&topology, &step("2. Certificates", "fedgate certs")?, BLOCK)
        .await?;
    let nodes = scratch
        .run_ok(&topology, &step("3. Start", "fedgate node")?, BLOCK)
        .await?;
    assert_eq!(
        nodes.stdout.matches("listening on").count(),
        6,
        "{}",
        nodes.stdout
    );
    let providers = scratch
        .run_ok(
            &topology,
            &step("4. Start the two", "civil-registry-provider")?,
            BLOCK,
        )
        .await?;
    for sample in ["350102195707115225", "350203199204072999"] {
        assert!(providers.stdout.contains(sample), "{}", providers.stdout);
    }
    assert_eq!(
        providers.stdout.matches("published ").count(),
        4,
        "{}",
        providers.stdout
    );

    // 5. The whole catalog reaches the province (it propagates up: asked again until it has).
    let search = step("5. Query", "search")?;
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let ran = scratch.run_ok(&topology, &search, BLOCK).await?;
        let listed = [
            "350102:household",
            "350102:marriage",
            "350203:household",
            "350203:marriage",
        ]
        .iter()
        .all(|id| ran.stdout.contains(id));
        if listed {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the province's catalog lacks entries after {CONVERGE:?}:\n{}",
                ran.stdout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Across cities: the record and the five hops the guide prints.
    let across = scratch
        .run_ok(&topology, &step("5. Query", "verify residence")?, BLOCK)
        .await?;
    for expected in [
        "1 record(s)",
        "350102********5225",
        "node 350203 forwarded-up",
        "node 350200 forwarded-up",
        "node 350000 forwarded-down",
        "node 350100 forwarded-down",
        "node 350102 served",
    ] {
        assert!(
            across.stdout.contains(expected),
            "{expected}:\n{}",
            across.stdout
        );
    }
    // More to try: two shares answer, the conditional one without a grant is refused (status 1).
    let more = scratch
        .run(
            &topology,
            &step("5. Query", "--fields name,address")?,
            BLOCK,
        )
        .await?;
    assert_eq!(more.code, Some(1), "{}\n{}", more.stdout, more.stderr);
    assert_eq!(
        more.stdout.matches("1 record(s)").count(),
        2,
        "{}",
        more.stdout
    );
    assert!(
        more.stderr.contains("FailedPrecondition"),
        "{}",
        more.stderr
    );

    // The restore drill of docs/operations.md, on this topology, as written.
    let ops_blocks = guide::blocks(&read("docs/operations.md")?);
    let drill = ports.apply(&block(&ops_blocks, "Restore drill", "fedgate restore")?.text);
    let drilled = scratch.run_ok(&topology, &drill, BLOCK).await?;
    for expected in ["exit status 65", "nothing was restored", "1 record(s)"] {
        assert!(
            drilled.stdout.contains(expected),
            "{expected}:\n{}\n{}",
            drilled.stdout,
            drilled.stderr
        );
    }
    assert!(!topology.join("lost").exists(), "the drill cleans up");

    // 6. Stop: every process exits.
    scratch
        .run_ok(&topology, &step("6. Stop", "kill")?, BLOCK)
        .await?;
    scratch
        .run_ok(
            &topology,
            "for f in logs/*.pid; do while kill -0 $(cat $f) 2>/dev/null; do sleep 0.1; done; done",
            BLOCK,
        )
        .await?;
    for code in ["350000", "350100", "350102", "350103", "350200", "350203"] {
        let log = read_log(&topology.join(format!("logs/node-{code}.log")));
        assert!(log.contains("node stopped"), "node {code}:\n{log}");
    }
    Ok(())
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()))
}

/// The operator guides: every `sh` block of these runs in a test or is marked [`guide::NOT_RUN`].
const OPERATOR_GUIDES: &[&str] = &[
    "docs/operations.md",
    "docs/architecture.md",
    "docs/benchmarks.md",
    "docs/security.md",
    "deploy/README.md",
    "deploy/compose/README.md",
    "deploy/kubernetes/README.md",
    "deploy/systemd/README.md",
];

/// The blocks of the operator guides a test runs: guide, heading, a text the block contains, and the test.
const RUN: &[(&str, &str, &str, &str)] = &[
    (
        "docs/operations.md",
        "Restore drill",
        "fedgate restore",
        "the_sample_topology_guide_runs_as_written",
    ),
    (
        "deploy/kubernetes/README.md",
        "2. TLS Secrets",
        "fedgate certs",
        "every_operator_guide_block_runs_or_is_marked",
    ),
];

#[tokio::test]
async fn every_operator_guide_block_runs_or_is_marked() -> Result<()> {
    // Every guide under docs/ and deploy/ is in the list.
    let mut found = Vec::new();
    for dir in [
        "docs",
        "deploy",
        "deploy/compose",
        "deploy/kubernetes",
        "deploy/systemd",
    ] {
        for entry in std::fs::read_dir(workspace().join(dir))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".md") {
                found.push(format!("{dir}/{name}"));
            }
        }
    }
    for f in &found {
        assert!(
            OPERATOR_GUIDES.contains(&f.as_str()),
            "{f} is not in OPERATOR_GUIDES"
        );
    }
    let manifest: toml::Table = toml::from_str(&read("tests/Cargo.toml")?)?;
    let benches: Vec<String> = manifest["bench"]
        .as_array()
        .context("[[bench]]")?
        .iter()
        .filter_map(|b| b["name"].as_str().map(str::to_owned))
        .collect();
    let scratch = Scratch::new().await?;
    let root = scratch.root().to_path_buf();
    let mut unmarked = Vec::new();
    let mut checked = 0;
    for guide_path in OPERATOR_GUIDES
        .iter()
        .filter(|g| found.iter().any(|f| f == *g))
    {
        let blocks = guide::blocks(&read(guide_path)?);
        for b in blocks.iter().filter(|b| b.lang == "sh") {
            let run = RUN.iter().any(|(g, heading, needle, _)| {
                g == guide_path && b.heading.contains(heading) && b.text.contains(needle)
            });
            if run {
                continue;
            }
            if guide::not_run(b).is_none() {
                unmarked.push(format!("{guide_path} under {:?}", b.heading));
                continue;
            }
            // A marked block: each fedgate and agency-client command parses (subcommand, flags, typed values).
            for line in guide::command_lines(&b.text) {
                if let Some(inv) = guide::invocation(&line) {
                    let args = guide::filled_in(&inv);
                    let ran = scratch.run(&root, &format!("{args} --help"), BLOCK).await?;
                    assert_eq!(
                        ran.code,
                        Some(0),
                        "{guide_path} under {:?}: {line}\n{}",
                        b.heading,
                        ran.stderr
                    );
                    checked += 1;
                }
                if line.starts_with("cargo bench") || line.contains(" cargo bench ") {
                    let name = line
                        .split_whitespace()
                        .skip_while(|w| *w != "--bench")
                        .nth(1)
                        .with_context(|| format!("{line}: no --bench"))?;
                    assert!(benches.iter().any(|n| n == name), "{line}: no bench {name}");
                }
            }
        }
    }
    assert!(
        unmarked.is_empty(),
        "sh blocks neither run by a test nor marked {:?}:\n{}",
        guide::NOT_RUN,
        unmarked.join("\n")
    );
    assert!(checked >= 20, "only {checked} commands checked");

    // The compose file the marked blocks use is valid, where a container engine is at hand.
    let docker = std::process::Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if docker {
        let compose = workspace().join("deploy/compose/compose.yaml");
        scratch
            .run_ok(
                &root,
                &format!(
                    "docker compose -f {} --profile demo config -q",
                    compose.display()
                ),
                BLOCK,
            )
            .await?;
    }

    // The Kubernetes guide's PKI, as written: every node's and agency's files.
    let k8s = guide::blocks(&read("deploy/kubernetes/README.md")?);
    let certs = block(&k8s, "2. TLS Secrets", "fedgate certs")?;
    scratch.run_ok(&root, &certs.text, BLOCK).await?;
    for line in guide::command_lines(&certs.text) {
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            let name = match pair[0] {
                "--node" => format!("node-{}", pair[1]),
                "--agency" => format!("agency-{}", pair[1]),
                _ => continue,
            };
            for ext in ["crt", "key"] {
                let file = root.join("pki").join(format!("{name}.{ext}"));
                assert!(file.exists(), "{} was not written", file.display());
            }
        }
    }
    Ok(())
}
