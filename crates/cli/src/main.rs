//! `tally`: the binary. `serve` runs the HTTP API over a data directory;
//! the operator and auditor commands work on the same directory.
//!
//! Exit codes: 0 success, 1 failure (a one-line error names the problem),
//! 2 bad usage (clap), 3 an audit found a problem.

mod demo;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "An event-sourced credits ledger",
    after_help = "Exit codes: 0 ok, 1 error, 2 bad usage, 3 audit failed."
)]
struct Cli {
    /// Where the event log, read models and keys live.
    #[arg(long, global = true, env = "TALLY_DATA_DIR", default_value = "./tally-data")]
    data_dir: PathBuf,
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API.
    Serve(serve::ServeArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(&cli.data_dir, args).map(|()| ExitCode::SUCCESS),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
