//! Running the commands a guide shows, as written: its fenced blocks, a scratch directory holding the
//! workspace's binaries where the guide expects them, the guide's fixed loopback ports moved to free ones, and
//! each block run by bash with a deadline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::process::{agency_client_binary, fedgate_binary, provider_binary};

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One fenced block of a Markdown guide.
#[derive(Debug, Clone)]
pub struct Block {
    /// The info string after the opening fence (`sh`, `toml`, or empty).
    pub lang: String,
    /// The text between the fences.
    pub text: String,
    /// The nearest heading above the block.
    pub heading: String,
}

/// The fenced blocks of `markdown`, in order.
pub fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut open: Option<Block> = None;
    for line in markdown.lines() {
        let fence = line.trim_start().starts_with("```");
        if let Some(mut block) = open.take() {
            if fence {
                out.push(block);
            } else {
                block.text.push_str(line);
                block.text.push('\n');
                open = Some(block);
            }
        } else if fence {
            open = Some(Block {
                lang: line.trim_start().trim_start_matches('`').trim().to_owned(),
                text: String::new(),
                heading: heading.clone(),
            });
        } else if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_owned();
        }
    }
    out
}

/// The blocks of language `lang` under a heading that contains `heading`.
pub fn under<'a>(blocks: &'a [Block], heading: &str, lang: &str) -> Vec<&'a Block> {
    blocks
        .iter()
        .filter(|b| b.lang == lang && b.heading.contains(heading))
        .collect()
}

/// The guide's fixed ports, each moved to a port that was free when the map was made.
#[derive(Debug, Default)]
pub struct PortMap {
    moved: BTreeMap<u16, u16>,
}

impl PortMap {
    /// A free loopback port for each of `ports`.
    pub fn new(ports: &[u16]) -> Result<PortMap> {
        // Every listener is held until all are chosen, so no two ports alike.
        let held = ports
            .iter()
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut moved = BTreeMap::new();
        for (port, l) in ports.iter().zip(&held) {
            moved.insert(*port, l.local_addr()?.port());
        }
        Ok(PortMap { moved })
    }

    /// `text` with every `127.0.0.1:<port>` and `0.0.0.0:<port>` of the map on its free loopback port.
    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (from, to) in &self.moved {
            for host in ["127.0.0.1", "0.0.0.0"] {
                out = out.replace(&format!("{host}:{from}"), &format!("127.0.0.1:{to}"));
            }
        }
        out
    }

    /// The free port `port` was moved to.
    pub fn get(&self, port: u16) -> Result<u16> {
        self.moved
            .get(&port)
            .copied()
            .ok_or_else(|| anyhow!("port {port} is not in the map"))
    }
}

/// A scratch directory laid out as a checkout after `cargo build --release -p fedgate-node -p
/// fedgate-examples`: the workspace's binaries (of the test's own profile) in `target/release/`. Processes
/// whose pid a command wrote to a `*.pid` file below it are killed when it is dropped.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// Builds (if needed) and links the `fedgate`, `civil-registry-provider` and `agency-client` binaries.
    pub async fn new() -> Result<Scratch> {
        let dir = tempfile::tempdir()?;
        let bin = dir.path().join("target/release");
        std::fs::create_dir_all(&bin)?;
        for (name, path) in [
            ("fedgate", fedgate_binary().await?),
            ("civil-registry-provider", provider_binary().await?),
            ("agency-client", agency_client_binary().await?),
        ] {
            std::os::unix::fs::symlink(&path, bin.join(name))
                .with_context(|| format!("linking {}", path.display()))?;
        }
        Ok(Scratch { dir })
    }

    /// The scratch checkout's root.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Copies the files of workspace folder `folder` (not its subfolders) into the same place below the root,
    /// each through `edit`.
    pub fn copy_folder(&self, folder: &str, edit: impl Fn(&str) -> String) -> Result<PathBuf> {
        let from = workspace().join(folder);
        let to = self.root().join(folder);
        std::fs::create_dir_all(&to)?;
        for entry in std::fs::read_dir(&from)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                let text = std::fs::read_to_string(entry.path())
                    .with_context(|| format!("reading {}", entry.path().display()))?;
                std::fs::write(to.join(entry.file_name()), edit(&text))?;
            }
        }
        Ok(to)
    }

    /// Runs `script` with bash (`-e`: it stops at the first failing command) in `cwd`, the release binaries
    /// first on `PATH`, failing after `deadline`.
    pub async fn run(&self, cwd: &Path, script: &str, deadline: Duration) -> Result<Ran> {
        let path = format!(
            "{}:{}",
            self.root().join("target/release").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = tokio::process::Command::new("bash")
            .arg("-e")
            .arg("-c")
            .arg(script)
            .current_dir(cwd)
            .env("PATH", path)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let out = tokio::time::timeout(deadline, child.wait_with_output())
            .await
            .map_err(|_| anyhow!("not done after {deadline:?}:\n{script}"))??;
        Ok(Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `script` as [`Scratch::run`] does and fails unless it exits 0.
    pub async fn run_ok(&self, cwd: &Path, script: &str, deadline: Duration) -> Result<Ran> {
        let ran = self.run(cwd, script, deadline).await?;
        if ran.code != Some(0) {
            bail!(
                "{script}\nexited {:?}\n{}\n{}",
                ran.code,
                ran.stdout,
                ran.stderr
            );
        }
        Ok(ran)
    }

    /// Pids written to `*.pid` files anywhere below the root.
    fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        let mut dirs = vec![self.root().to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() && !path.is_symlink() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "pid") {
                    pids.extend(
                        std::fs::read_to_string(&path)
                            .ok()
                            .and_then(|s| s.trim().parse::<i32>().ok()),
                    );
                }
            }
        }
        pids
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let pids = self.pids();
        if !pids.is_empty() {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .args(pids.iter().map(i32::to_string))
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What a block printed and how it exited.
#[derive(Debug)]
pub struct Ran {
    /// Exit status (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// The first line of a block a guide shows but the docs test does not run (it needs a cluster, root, a container
/// engine, or values only the reader has); the test checks its commands' subcommands and flags instead.
pub const NOT_RUN: &str = "# Not run by the docs test:";

/// Why `block` is not run, if its first line says so (see [`NOT_RUN`]).
pub fn not_run(block: &Block) -> Option<&str> {
    block
        .text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(NOT_RUN))
        .map(str::trim)
}

/// `line` up to a `#` comment that is outside quotes.
fn without_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

/// The shell command lines of `text`: continuations joined, comments and here-document bodies dropped.
pub fn command_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut heredoc: Option<String> = None;
    for line in text.lines() {
        if let Some(end) = &heredoc {
            if line.trim() == end {
                heredoc = None;
            }
            continue;
        }
        let code = without_comment(line).trim_end();
        if let Some(part) = code.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(code);
        if let Some((_, tag)) = current.split_once("<<") {
            heredoc = Some(tag.trim().trim_matches(['\'', '"', '-']).to_owned());
        }
        let done = std::mem::take(&mut current);
        if !done.trim().is_empty() {
            out.push(done.trim().to_owned());
        }
    }
    out
}

/// The `fedgate` or `agency-client` invocation in a command line, from the program's name to a redirection,
/// pipe or list operator: the first word after any `VAR=value`, `sudo` or `kubectl exec … --`; `None` for other
/// programs.
pub fn invocation(line: &str) -> Option<String> {
    let line = line.split_once(" -- ").map_or(line, |(_, rest)| rest);
    let words: Vec<&str> = line.split_whitespace().collect();
    let start = words
        .iter()
        .position(|w| (w.starts_with('-') || !w.contains('=')) && *w != "sudo")?;
    let end = words[start..]
        .iter()
        .position(|w| w.starts_with(['>', '|', ';', '&']) || w.starts_with("2>"))
        .map_or(words.len(), |n| start + n);
    let words = &words[..end];
    let program = words[start].rsplit('/').next()?;
    if program == "fedgate" || program == "agency-client" {
        Some(
            std::iter::once(program)
                .chain(words[start + 1..].iter().copied())
                .collect::<Vec<_>>()
                .join(" "),
        )
    } else {
        None
    }
}

/// `invocation` with the guide's placeholders (`<provider USCC>`, `…`, `age1...`) given the value `1` and
/// optional parts (`[--state pending]`) included, so that the real command line parser can check it.
pub fn filled_in(invocation: &str) -> String {
    let mut out = String::new();
    let mut rest = invocation;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        match rest[open..].find('>') {
            Some(close) => {
                out.push('1');
                rest = &rest[open + close + 1..];
            }
            None => {
                rest = &rest[open..];
                break;
            }
        }
    }
    out.push_str(rest);
    out.replace("age1...", "1")
        .replace('…', "1")
        .replace(['[', ']'], "")
}
