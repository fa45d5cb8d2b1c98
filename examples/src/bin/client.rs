//! `agency-client`: an agency's command line to its node.
//!
//! The commands live in [`fedgate_examples::cli`], shared with `fedgate agency`; this program only parses them
//! and runs them.

use std::process::ExitCode;

use clap::Parser;
use fedgate_examples::cli::{self, AgencyArgs};

/// Command line of the agency client.
#[derive(Debug, Parser)]
#[command(name = "agency-client", version, about)]
struct Args {
    #[command(flatten)]
    agency: AgencyArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    match cli::run(args.agency).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Args::command().debug_assert();
    }
}
