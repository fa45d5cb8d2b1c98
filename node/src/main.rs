//! `fedgate`: runs a node, a demo federation, or an operator command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    fedgate_node::cli::Cli::parse().run()
}
