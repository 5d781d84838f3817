//! `tally renew [--at T]`: run what has fallen due — renewals, allocations,
//! rollovers, expiries, reservation timeouts — through the same `Ledger`
//! (and so the same version checks and conflict retries) as a running
//! server, which may be writing the same log meanwhile.
//!
//! `T` may not be later than now: running the future early would write
//! events dated before they happen. An earlier `T` runs only what was due
//! by then (the writer never goes back before the log's last event).

use crate::data_dir::DataDir;
use anyhow::{Result, bail};
use chrono::{DateTime, Utc};
use clap::Args;
use std::path::Path;
use std::sync::Arc;
use tally_ledger::{Clock, Ledger, LedgerOptions, ManualClock, SystemClock};

#[derive(Args)]
pub struct RenewArgs {
    /// Run what fell due up to this RFC 3339 instant (not later than now).
    #[arg(long, value_name = "T", value_parser = crate::parse_instant)]
    at: Option<DateTime<Utc>>,
}

pub fn run(data_dir: &Path, args: RenewArgs) -> Result<()> {
    let data_dir = DataDir::existing(data_dir)?;
    let now = Utc::now();
    let clock: Arc<dyn Clock> = match args.at {
        Some(at) if at > now => {
            bail!(
                "--at {} is later than now ({}); renew only runs what has fallen due",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        }
        Some(at) => Arc::new(ManualClock::new(at)),
        None => Arc::new(SystemClock),
    };
    let until = args.at.unwrap_or(now);
    let ledger = Ledger::open(&data_dir.events(), LedgerOptions::default(), clock)?;
    let report = ledger.run_due()?;
    ledger.shutdown();
    println!(
        "ran what fell due up to {}: {} events for {} members; the log's head is position {}",
        until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        report.events,
        report.members,
        report.position
    );
    Ok(())
}
