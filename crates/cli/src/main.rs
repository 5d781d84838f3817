//! `tally`: the binary. `serve` runs the HTTP API over a data directory;
//! the operator and auditor commands work on the same directory, beside a
//! running server or without one.
//!
//! # Layout
//!
//! - `serve`, `demo`: the server, and the demo data `serve --demo` loads.
//! - `projections`: `projections status | rebuild` (a rebuild is asked of
//!   the running server when one owns the read models).
//! - `audit`, `replay`: `audit verify` (hash chain and read model digests)
//!   and `audit replay` (a member's books as of an instant).
//! - `events`: `events export | import`, the log as NDJSON.
//! - `renew`: run what has fallen due, through the ledger's writer.
//! - `data_dir`, `progress`, `table`: the data directory's files and the
//!   checks that keep commands from creating them by mistake; progress bars;
//!   tables for people.
//!
//! Exit codes: 0 success, 1 failure (a one-line error names the problem),
//! 2 bad usage (clap), 3 an audit found a problem.

mod audit;
mod data_dir;
mod demo;
mod demo_upstream;
mod events;
mod progress;
mod projections;
mod renew;
mod replay;
mod serve;
mod stripe;
mod table;
mod vault;

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// The exit code of an audit that found a problem (a broken chain, a read
/// model that differs), as opposed to one that could not run (1).
pub const AUDIT_FAILED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "An event-sourced credits ledger",
    after_help = "Exit codes:\n  0  ok\n  1  error: a one-line message on stderr names the problem; nothing was changed\n  2  bad usage (an unknown flag, a value that does not parse)\n  3  the audit found a problem: a broken hash chain (the first bad position is named) or a read model that differs from a rebuild"
)]
struct Cli {
    /// Where the event log, read models and keys live.
    #[arg(long, global = true, env = "TALLY_DATA_DIR", default_value = "./tally-data")]
    data_dir: PathBuf,
    /// How log records are written to stderr.
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

/// How a command prints its result on stdout.
#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Table,
    /// For machines.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API.
    Serve(serve::ServeArgs),
    /// The read models: where they stand, and rebuilds.
    #[command(subcommand)]
    Projections(projections::ProjectionsCommand),
    /// Verify the log and the read models; replay a member's books.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Export the log as NDJSON, or import such an export.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Run what has fallen due: renewals, allocations, rollovers, expiries,
    /// reservation timeouts.
    Renew(renew::RenewArgs),
    /// Stripe: replay kept events through the running server.
    #[command(subcommand)]
    Stripe(stripe::StripeCommand),
    /// The credential vault: re-seal it under a new key.
    #[command(subcommand)]
    Vault(vault::VaultCommand),
}

/// Parses an RFC 3339 instant for `--as-of` and `--at`.
pub fn parse_instant(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|instant| instant.with_timezone(&Utc))
        .map_err(|error| format!("{error}; expected an RFC 3339 instant such as 2026-01-31T23:59:59Z"))
}

/// The server logs its work; a one-shot command only warnings, so that its
/// output stays its result. `TALLY_LOG` overrides both. Logs go to stderr,
/// coloured only when both stdout and stderr are terminals and `NO_COLOR`
/// is unset: `tally serve > log 2>&1` (or a pipe) gets plain text.
fn init_logging(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| default_filter.into());
    let colours = std::io::stdout().is_terminal()
        && std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colours);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let data_dir = cli.data_dir;
    match cli.command {
        Command::Serve(args) => serve::run(&data_dir, args).map(|()| ExitCode::SUCCESS),
        Command::Projections(command) => projections::run(&data_dir, command).map(|()| ExitCode::SUCCESS),
        Command::Audit(command) => audit::run(&data_dir, command),
        Command::Events(command) => events::run(&data_dir, command).map(|()| ExitCode::SUCCESS),
        Command::Renew(args) => renew::run(&data_dir, args).map(|()| ExitCode::SUCCESS),
        Command::Stripe(command) => stripe::run(&data_dir, command).map(|()| ExitCode::SUCCESS),
        Command::Vault(command) => vault::run(&data_dir, command).map(|()| ExitCode::SUCCESS),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    init_logging(cli.log_format, default_filter);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            // One line: the error and its causes, outermost first.
            let message = format!("{error:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
