//! `fedgate check-config`: every check start-up makes of a node's configuration, without starting it, plus
//! whether its storage can be opened; each problem is printed with its key, all of them at once.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use fedgate_gateway::config::{NodeConfig, check_storage};

use crate::exit::ConfigError;

/// How long the storage may take to answer.
const STORAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks the configuration at `path`: prints what it found, fails with [`ConfigError`] (exit status 78) when
/// there is any problem.
pub async fn run(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read configuration {}: {e}", path.display())))?;
    // A syntax error or an unknown key stops the parse: it is the one problem reported.
    let config: NodeConfig = toml::from_str(&text)
        .map_err(|e| ConfigError(format!("configuration {}: {e}", path.display())))?;
    let mut problems = config.check().err().unwrap_or_default();
    problems.extend(check_storage(&config.storage, STORAGE_TIMEOUT).await);
    if problems.is_empty() {
        println!(
            "{}: the configuration of node {} is valid",
            path.display(),
            config.code
        );
        return Ok(());
    }
    for p in &problems {
        println!("{}: {p}", path.display());
    }
    Err(ConfigError(format!(
        "{} problem{} in {}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        path.display()
    ))
    .into())
}
