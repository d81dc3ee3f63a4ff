//! `stratactl`: parses the command line and hands it to `strata_api::cli::run`.

use std::process::ExitCode;

use clap::Parser;
use strata_api::cli::{self, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    cli::run(Cli::parse()).await
}
