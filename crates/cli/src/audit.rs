//! `tally audit verify | replay`.
//!
//! `verify` trusts nothing it did not recompute: the hash chain from
//! position 1 (positions and versions gapless), then every read model,
//! rebuilt from the log into a temporary file and compared digest by digest
//! with the live one at the same position. It prints the head hash, which is
//! worth recording outside the database: whoever can write the file can
//! also recompute a consistent chain.

use crate::data_dir::{DataDir, PROJECTIONS_FILE};
use crate::progress::Progress;
use crate::projections::LiveReadModels;
use crate::replay;
use crate::table::{Align, Table, grouped};
use crate::{AUDIT_FAILED, OutputFormat};
use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use tally_ledger::store::{ChainError, EventReader};
use tally_projections::{Digest, Projections, ReadModels, builtin_projectors};

/// Attempts at finding the live and the rebuilt read models at the same
/// position while a server keeps writing, and the pause between them.
const COMPARE_ATTEMPTS_MAX: u32 = 50;
const COMPARE_RETRY_PAUSE: Duration = Duration::from_millis(100);

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute the whole hash chain, check that positions and versions are
    /// gapless, and compare each read model with a fresh rebuild from the
    /// log. Prints the head hash. Exits 3 naming the first bad position or
    /// the read model that differs.
    Verify,
    /// A member's books as of an instant, from a replay of the events
    /// recorded up to then: balance, grants, subscription, transactions.
    Replay(ReplayArgs),
}

#[derive(Args)]
pub struct ReplayArgs {
    /// The member id.
    #[arg(long)]
    member: String,
    /// An RFC 3339 instant, e.g. 2026-01-31T23:59:59Z; now by default.
    #[arg(long, value_name = "T", value_parser = crate::parse_instant)]
    as_of: Option<DateTime<Utc>>,
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
}

pub fn run(data_dir: &Path, command: AuditCommand) -> Result<ExitCode> {
    let data_dir = DataDir::existing(data_dir)?;
    match command {
        AuditCommand::Verify => verify(&data_dir),
        AuditCommand::Replay(args) => {
            let reader = EventReader::open(&data_dir.events())?;
            let as_of = args.as_of.unwrap_or_else(Utc::now);
            let replayed = replay::replay(&reader, &args.member, as_of)?;
            match args.format {
                OutputFormat::Json => {
                    println!("{}", serde_json::to_string_pretty(&replayed).expect("a replay serialises"));
                }
                OutputFormat::Table => print!("{}", replay::render_table(&replayed)),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn verify(data_dir: &DataDir) -> Result<ExitCode> {
    let reader = EventReader::open(&data_dir.events())?;
    let head_at_start = reader.head()?.position;
    let mut progress = Progress::start("verifying the hash chain", head_at_start);
    let chain = reader.verify_chain(|position| progress.update(position, head_at_start.max(position)));
    progress.finish();
    let report = match chain {
        Ok(report) => report,
        Err(ChainError::Store(error)) => return Err(error.into()),
        Err(error) => {
            println!("hash chain: FAILED: {error}");
            eprintln!("error: the audit failed: {error}");
            return Ok(ExitCode::from(AUDIT_FAILED));
        }
    };
    println!("hash chain: ok, {} events, positions and versions gapless", grouped(report.events_checked as i64));
    println!("head: position {}, hash {}", report.head.position, report.head.hash_hex());
    println!("(record the head hash outside the database: whoever can write the file can recompute a chain)");

    if !data_dir.projections().exists() {
        println!(
            "read models: none built yet ({} does not exist); nothing to compare",
            data_dir.projections().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let comparison = compare_read_models(data_dir, head_at_start)?;
    let mut table = Table::new(&[
        ("READ MODEL", Align::Left),
        ("ROWS", Align::Right),
        ("DIGEST (SHA-256)", Align::Left),
        ("RESULT", Align::Left),
    ]);
    let mut first_difference = None;
    for (live, rebuilt) in &comparison.pairs {
        let same = live.sha256 == rebuilt.sha256 && live.rows == rebuilt.rows;
        table.row(vec![
            live.read_model.clone(),
            grouped(live.rows as i64),
            live.sha256.clone(),
            if same { "ok".to_owned() } else { format!("DIFFERS: rebuilt {} rows, {}", rebuilt.rows, rebuilt.sha256) },
        ]);
        if !same && first_difference.is_none() {
            first_difference = Some((live, rebuilt));
        }
    }
    println!("read models, compared with a fresh rebuild from the log at position {}:", comparison.position);
    print!("{}", table.render(2));
    if let Some((live, rebuilt)) = first_difference {
        eprintln!(
            "error: the audit failed: read model {} differs from a fresh rebuild at position {} (live {} rows, sha256 {}; rebuilt {} rows, sha256 {}); `tally projections rebuild {}` replaces it",
            live.read_model, comparison.position, live.rows, live.sha256, rebuilt.rows, rebuilt.sha256, live.read_model
        );
        return Ok(ExitCode::from(AUDIT_FAILED));
    }
    println!("audit verify: ok");
    Ok(ExitCode::SUCCESS)
}

struct Comparison {
    position: u64,
    /// (live, rebuilt) digests of each read model, at `position`.
    pairs: Vec<(Digest, Digest)>,
}

/// Builds fresh read models from the log in a temporary directory, then
/// finds the live ones at the same position (bringing them there when this
/// process owns them, waiting for the server otherwise) and pairs the digests.
fn compare_read_models(data_dir: &DataDir, head: u64) -> Result<Comparison> {
    let temporary = tempfile::TempDir::new().context("cannot make a temporary directory for the rebuild")?;
    let fresh = Projections::open(&temporary.path().join(PROJECTIONS_FILE), &data_dir.events())?;
    let mut progress = Progress::start("rebuilding the read models in a temporary file", head);
    let rebuilt = fresh.rebuild(None, |step| progress.update(step.events_done, step.events_total));
    progress.finish();
    rebuilt?;
    let live = LiveReadModels::open(data_dir)?;
    live.catch_up()?;
    for _attempt in 0..COMPARE_ATTEMPTS_MAX {
        let rebuilt = digests(fresh.read_models())?;
        let current = match digests(live.read_models()) {
            Ok(current) => current,
            // A read model the server is still building has no digest yet.
            Err(_) if matches!(live, LiveReadModels::Shared(_)) => {
                std::thread::sleep(COMPARE_RETRY_PAUSE);
                continue;
            }
            Err(error) => return Err(error),
        };
        let fresh_position = rebuilt.values().map(|digest| digest.position).max().unwrap_or(0);
        let live_lowest = current.values().map(|digest| digest.position).min().unwrap_or(0);
        let live_highest = current.values().map(|digest| digest.position).max().unwrap_or(0);
        if live_lowest == fresh_position && live_highest == fresh_position {
            let pairs = current
                .into_iter()
                .map(|(name, live_digest)| {
                    let rebuilt_digest = rebuilt.get(&name).cloned().expect("both sides have every read model");
                    (live_digest, rebuilt_digest)
                })
                .collect();
            return Ok(Comparison { position: fresh_position, pairs });
        }
        if live_highest > fresh_position {
            fresh.catch_up()?;
        }
        if live_lowest < fresh_position {
            match &live {
                LiveReadModels::Owned(_) => live.catch_up()?,
                LiveReadModels::Shared(_) => std::thread::sleep(COMPARE_RETRY_PAUSE),
            }
        }
    }
    bail!(
        "could not compare the read models: the server kept moving them (or kept building them) for {} attempts; run `tally audit verify` again",
        COMPARE_ATTEMPTS_MAX
    )
}

/// Every read model's digest, by name.
fn digests(read_models: &ReadModels) -> Result<BTreeMap<String, Digest>> {
    let mut all = BTreeMap::new();
    for projector in builtin_projectors() {
        for digest in read_models.digests_of_projector(projector.name())? {
            all.insert(digest.read_model.clone(), digest);
        }
    }
    Ok(all)
}
