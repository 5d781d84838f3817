//! Measures how fast the projections rebuild from a large event log.
//!
//! ```text
//! cargo run --release -p tally-projections --example rebuild_throughput -- [--events N] [--dir DIR] [--build-batch N]
//! ```
//!
//! The first run writes a log of at least N events (default 1,000,000)
//! through the real ledger into `DIR/events.db` (default
//! `target/rebuild-throughput`): members on Pro with usage every few hours,
//! reservations settled with query executions, purchases, renewals with
//! rollover, expiry and invoices. Later runs reuse it. Then it builds the
//! read models from scratch (a first start) and rebuilds them all (the
//! operator's `tally projections rebuild`), printing events per second for
//! both.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, TimeZone, Utc};
use tally_ledger::domain::{
    Billing, CatalogCommand, Credits, GrantCredits, GrantSource, Interval, MemberCommand, MemberProfile, MinorUnits,
    Overage, Plan, QueryExecution, QueryStatus, RecordUsage, Rollover,
};
use tally_ledger::store::{EventReader, StoreOptions};
use tally_ledger::{Ledger, LedgerError, LedgerOptions, ManualClock, Request};
use tally_projections::{ProjectionOptions, Projections, builtin_projectors};

/// Members in the generated log; each gets one usage per round.
const MEMBERS: usize = 2_000;
/// Threads submitting commands, so that the ledger's group commit batches them.
const SUBMITTERS: usize = 8;
/// Simulated time between rounds.
const ROUND_HOURS: i64 = 6;

struct Arguments {
    events: u64,
    directory: PathBuf,
    build_batch_events_max: usize,
}

fn arguments() -> Arguments {
    let mut parsed = Arguments {
        events: 1_000_000,
        directory: PathBuf::from("target/rebuild-throughput"),
        build_batch_events_max: tally_projections::BUILD_BATCH_EVENTS_MAX_DEFAULT,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => parsed.events = value.parse().expect("--events is a number"),
            "--dir" => parsed.directory = PathBuf::from(value),
            "--build-batch" => parsed.build_batch_events_max = value.parse().expect("--build-batch is a number"),
            other => panic!("unknown flag {other}; use --events, --dir or --build-batch"),
        }
    }
    parsed
}

fn pro_plan() -> Plan {
    Plan {
        plan_id: "pro".to_owned(),
        name: "Pro".to_owned(),
        price: MinorUnits(5_000),
        currency: "USD".to_owned(),
        interval: Interval::Month,
        monthly_credits: Credits(10_000),
        rollover: Rollover { enabled: true, max_credits: Credits(2_000) },
        overage: Overage { allowed: true, limit_credits: Credits(2_000), unit_price: MinorUnits(2) },
        rate_limit_per_minute: 6_000,
        stripe_price_id: None,
    }
}

fn head(events_path: &Path) -> u64 {
    if !events_path.exists() {
        return 0;
    }
    EventReader::open(events_path).and_then(|reader| reader.head()).map_or(0, |head| head.position)
}

fn accept(result: Result<tally_ledger::Executed, LedgerError>) {
    match result {
        Ok(_) | Err(LedgerError::Rejected(_)) => {}
        Err(error) => panic!("the ledger failed: {error}"),
    }
}

/// One member's commands in one round: usage always, sometimes a reserved
/// and settled query, sometimes a purchase.
fn member_round(ledger: &Ledger, member: usize, round: u64) {
    let member_id = format!("member{member}");
    let usage = RecordUsage {
        usage_id: format!("u{round}"),
        metric: if round.is_multiple_of(3) { "rows.scanned".to_owned() } else { "api.calls".to_owned() },
        quantity: 1 + (round % 7) as i64,
        credits: Credits(20 + ((round * 31 + member as u64 * 17) % 180) as i64),
        occurred_at: None,
        integration_id: None,
        query_id: None,
    };
    accept(ledger.execute(&member_id, Request::new(MemberCommand::RecordUsage(usage), "bench")));
    if (round + member as u64).is_multiple_of(10) {
        let reserved = ledger
            .execute(&member_id, Request::new(MemberCommand::Reserve { amount: Credits(50), ttl_s: None }, "bench"));
        if let Ok(executed) = reserved {
            let reservation_id = executed.outcome.member_events().into_iter().find_map(|event| match event {
                tally_ledger::domain::MemberEvent::CreditsReserved { reservation_id, .. } => Some(reservation_id),
                _ => None,
            });
            if let Some(reservation_id) = reservation_id {
                let query = QueryExecution {
                    integration_id: "warehouse".to_owned(),
                    query_id: format!("q{}", round % 4),
                    status: if round.is_multiple_of(13) { QueryStatus::Failed } else { QueryStatus::Succeeded },
                    duration_ms: 100 + (round % 900) as i64,
                    rows: (round % 50) as i64,
                    bytes: 0,
                    cache_hit: false,
                    error_code: None,
                    api_usage: None,
                };
                let settle = MemberCommand::Settle { reservation_id, amount: Credits(30), query: Some(query) };
                accept(ledger.execute(&member_id, Request::new(settle, "bench")));
            }
        }
    }
    if (round + member as u64).is_multiple_of(97) {
        let purchase = GrantCredits { price: Some(MinorUnits(1_000)), ..GrantCredits::new(GrantSource::Purchase, 500) };
        accept(ledger.execute(&member_id, Request::new(MemberCommand::GrantCredits(purchase), "bench")));
    }
}

fn generate(events_path: &Path, events_wanted: u64) {
    let start: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().expect("a start");
    let mut now = start;
    let clock = Arc::new(ManualClock::new(now));
    let options = LedgerOptions {
        store: StoreOptions { synchronous_full: false, ..StoreOptions::default() },
        ..LedgerOptions::default()
    };
    let ledger = Ledger::open(events_path, options, clock.clone()).expect("the ledger opens");
    accept(ledger.execute_catalog(Request::new(CatalogCommand::PublishPlan(pro_plan()), "bench")));
    let time_zones = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"];
    for member in 0..MEMBERS {
        let member_id = format!("member{member}");
        let profile = MemberProfile {
            time_zone: time_zones[member % time_zones.len()].to_owned(),
            currency: "USD".to_owned(),
            stripe_customer_id: None,
        };
        accept(ledger.execute(&member_id, Request::new(MemberCommand::Register(profile), "bench")));
        let start_pro = MemberCommand::StartSubscription {
            plan_id: "pro".to_owned(),
            billing: Billing::Tally,
            stripe_subscription_id: None,
        };
        accept(ledger.execute(&member_id, Request::new(start_pro, "bench")));
    }
    let started = Instant::now();
    let mut round = 0u64;
    while head(events_path) < events_wanted {
        now += Duration::hours(ROUND_HOURS);
        clock.advance_to(now);
        ledger.run_due().expect("the sweep runs");
        std::thread::scope(|scope| {
            for submitter in 0..SUBMITTERS {
                let ledger = &ledger;
                scope.spawn(move || {
                    for member in (submitter..MEMBERS).step_by(SUBMITTERS) {
                        member_round(ledger, member, round);
                    }
                });
            }
        });
        round += 1;
        if round.is_multiple_of(20) {
            let written = head(events_path);
            println!(
                "  generated {written} events ({:.0} events/s), simulated time {now}",
                written as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    ledger.shutdown();
}

fn measure(label: &str, run: impl FnOnce() -> u64) {
    let started = Instant::now();
    let events = run();
    let elapsed_s = started.elapsed().as_secs_f64();
    println!("{label}: {events} events in {elapsed_s:.1} s = {:.0} events/s", events as f64 / elapsed_s);
}

fn main() {
    let arguments = arguments();
    std::fs::create_dir_all(&arguments.directory).expect("the directory can be created");
    let events_path = arguments.directory.join("events.db");
    if head(&events_path) < arguments.events {
        println!("writing a log of at least {} events to {}", arguments.events, events_path.display());
        generate(&events_path, arguments.events);
    }
    let events = head(&events_path);
    println!("log: {events} events in {}", events_path.display());

    let projections_path = arguments.directory.join("projections.db");
    for suffix in ["", "-wal", "-shm"] {
        let mut name = projections_path.clone().into_os_string();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
    let options =
        ProjectionOptions { build_batch_events_max: arguments.build_batch_events_max, ..ProjectionOptions::default() };
    let projections = Projections::open_with(&projections_path, &events_path, options, builtin_projectors())
        .expect("projections open");
    measure("first build (catch_up from an empty projections file)", || {
        projections.catch_up().expect("the first build").events_applied
    });
    let mut next_report = 0.0;
    measure("rebuild of all read models (beside the live ones, then swap)", || {
        let report = projections
            .rebuild(None, |progress| {
                let done = progress.events_done as f64 / progress.events_total.max(1) as f64;
                if done >= next_report {
                    println!(
                        "  {:>3.0}% {}/{} events, {:.0} events/s",
                        done * 100.0,
                        progress.events_done,
                        progress.events_total,
                        progress.events_per_s
                    );
                    next_report += 0.1;
                }
            })
            .expect("the rebuild");
        report.events
    });
    for digest in projections.status_with_digests().expect("digests").iter().flat_map(|status| status.digests.clone()) {
        println!("  {:<20} {:>9} rows  sha256 {}", digest.read_model, digest.rows, digest.sha256);
    }
}
