//! Measures projection lag under a sustained write load: how long after a
//! command is answered the read models cover it.
//!
//! ```text
//! cargo run --release -p tally-projections --example projection_lag -- [--rate N] [--seconds S] [--members M] [--dir DIR]
//! ```
//!
//! The ledger and the projections run as `tally serve` runs them: a
//! `Ledger` with default options (WAL, `synchronous=FULL`, every answer
//! durable) and `Projections` with the runner thread started, woken after
//! each command as the API does. Writer threads submit `RecordUsage`
//! commands with idempotency keys at a steady rate (default 2,000 a second
//! for 10 s, the n-th command due at n / rate) over a fresh log; an
//! observer thread takes each answer's position and waits for every read
//! model's checkpoint to cover it ([`Projections::wait_for`], which returns
//! as soon as the runner publishes a checkpoint at or past it). Lag = that
//! moment − the answer.
//!
//! Two phases on the same log: writes alone, then writes while the read
//! models are rebuilt again and again (an operator's `tally projections
//! rebuild`): build steps hold the projections' writer, and live steps wait
//! behind them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tally_ledger::domain::{
    Billing, CatalogCommand, Credits, GrantCredits, GrantSource, Interval, MemberCommand, MemberProfile, MinorUnits,
    Overage, Plan, RecordUsage, Rollover,
};
use tally_ledger::{Idempotency, Ledger, LedgerError, LedgerOptions, Request, SystemClock};
use tally_projections::{Projections, ReadModel};

/// How long the observer waits for one position before calling it lost.
const COVER_WAIT_MAX: Duration = Duration::from_secs(30);
/// Threads sharing the writes, as concurrent API requests would: one alone
/// waits for each commit's fsync before it can send the next command, and
/// could not hold 2,000 commands a second on every disk.
const SUBMITTERS: u64 = 4;

struct Arguments {
    rate_per_s: u64,
    seconds: u64,
    members: usize,
    directory: PathBuf,
}

fn arguments() -> Arguments {
    let mut parsed =
        Arguments { rate_per_s: 2_000, seconds: 10, members: 200, directory: PathBuf::from("target/projection-lag") };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--rate" => parsed.rate_per_s = value.parse().expect("--rate is a number"),
            "--seconds" => parsed.seconds = value.parse().expect("--seconds is a number"),
            "--members" => parsed.members = value.parse().expect("--members is a number"),
            "--dir" => parsed.directory = PathBuf::from(value),
            other => panic!("unknown flag {other}; use --rate, --seconds, --members or --dir"),
        }
    }
    assert!(parsed.rate_per_s > 0 && parsed.seconds > 0 && parsed.members > 0, "rate, seconds and members are > 0");
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

fn accept(result: Result<tally_ledger::Executed, LedgerError>) {
    match result {
        Ok(_) | Err(LedgerError::Rejected(_)) => {}
        Err(error) => panic!("the ledger failed: {error}"),
    }
}

fn remove_database(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

/// Members on Pro with a large promotional grant, so that usage is never
/// refused.
fn set_up(ledger: &Ledger, members: usize) {
    accept(ledger.execute_catalog(Request::new(CatalogCommand::PublishPlan(pro_plan()), "bench")));
    for member in 0..members {
        let member_id = format!("member{member}");
        let profile = MemberProfile {
            time_zone: "Europe/Paris".to_owned(),
            currency: "USD".to_owned(),
            stripe_customer_id: None,
        };
        accept(ledger.execute(&member_id, Request::new(MemberCommand::Register(profile), "bench")));
        let start = MemberCommand::StartSubscription {
            plan_id: "pro".to_owned(),
            billing: Billing::Tally,
            stripe_subscription_id: None,
        };
        accept(ledger.execute(&member_id, Request::new(start, "bench")));
        let grant = GrantCredits::new(GrantSource::Promotional, 100_000_000);
        accept(ledger.execute(&member_id, Request::new(MemberCommand::GrantCredits(grant), "bench")));
    }
}

/// A command's answer: its position and when it came.
struct Answer {
    position: u64,
    answered_at: Instant,
}

/// Submits `RecordUsage` commands at a steady rate from [`SUBMITTERS`]
/// threads (the n-th command is due at start + n / rate; a submitter
/// behind schedule sends at once) and sends each answer to the observer.
/// Returns the commands submitted.
fn write_steadily(
    ledger: &Ledger,
    projections: &Projections,
    arguments: &Arguments,
    phase: &str,
    answers: Sender<Answer>,
) -> u64 {
    let commands = arguments.rate_per_s * arguments.seconds;
    let interval_s = 1.0 / arguments.rate_per_s as f64;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for submitter in 0..SUBMITTERS {
            let answers = answers.clone();
            scope.spawn(move || {
                for index in (submitter..commands).step_by(SUBMITTERS as usize) {
                    let due = started + Duration::from_secs_f64(interval_s * index as f64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let answer = record_usage(ledger, arguments, phase, index);
                    projections.notify();
                    if answers.send(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    commands
}

fn record_usage(ledger: &Ledger, arguments: &Arguments, phase: &str, index: u64) -> Answer {
    let member_id = format!("member{}", index as usize % arguments.members);
    let usage_id = format!("{phase}-{index}");
    let usage = RecordUsage {
        usage_id: usage_id.clone(),
        metric: "api.calls".to_owned(),
        quantity: 1,
        credits: Credits(1 + (index % 5) as i64),
        occurred_at: None,
        integration_id: None,
        query_id: None,
    };
    // As the API sends it: with an idempotency key and the request's
    // fingerprint.
    let idempotency = Idempotency {
        scope: format!("bench/{member_id}/usage"),
        key: usage_id.clone(),
        fingerprint: Sha256::digest(usage_id.as_bytes()).into(),
        status: 201,
    };
    let request = Request::new(MemberCommand::RecordUsage(usage), "bench").with_idempotency(idempotency);
    let executed = ledger.execute(&member_id, request).expect("a durable answer");
    Answer { position: executed.outcome.position, answered_at: Instant::now() }
}

/// Waits for each answer's position to be covered by every read model, in
/// order; returns the lags.
fn observe(projections: &Projections, answers: Receiver<Answer>) -> Vec<Duration> {
    let mut lags = Vec::new();
    for answer in answers {
        projections.wait_for(&ReadModel::ALL, answer.position, COVER_WAIT_MAX).expect("the read models catch up");
        lags.push(answer.answered_at.elapsed());
    }
    lags
}

struct PhaseResult {
    label: &'static str,
    commands: u64,
    elapsed_s: f64,
    events_applied: u64,
    rebuilds: u64,
    lags: Vec<Duration>,
}

fn checkpoint(projections: &Projections) -> u64 {
    let statuses = projections.status().expect("a status");
    statuses.iter().map(|status| status.checkpoint).min().unwrap_or(0)
}

fn run_phase(
    label: &'static str,
    ledger: &Ledger,
    projections: &Projections,
    arguments: &Arguments,
    rebuild_meanwhile: bool,
) -> PhaseResult {
    let checkpoint_before = checkpoint(projections);
    let stop_rebuilding = AtomicBool::new(false);
    let started = Instant::now();
    let (commands, lags, rebuilds) = std::thread::scope(|scope| {
        let (sender, receiver) = channel();
        let observer = scope.spawn(|| observe(projections, receiver));
        let rebuilder = scope.spawn(|| {
            let mut rebuilds = 0u64;
            while rebuild_meanwhile && !stop_rebuilding.load(Ordering::SeqCst) {
                projections.rebuild(None, |_| {}).expect("a rebuild");
                rebuilds += 1;
            }
            rebuilds
        });
        let commands = write_steadily(ledger, projections, arguments, label, sender);
        let lags = observer.join().expect("the observer");
        stop_rebuilding.store(true, Ordering::SeqCst);
        (commands, lags, rebuilder.join().expect("the rebuilder"))
    });
    let elapsed_s = started.elapsed().as_secs_f64();
    let events_applied = checkpoint(projections) - checkpoint_before;
    PhaseResult { label, commands, elapsed_s, events_applied, rebuilds, lags }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn main() {
    let arguments = arguments();
    std::fs::create_dir_all(&arguments.directory).expect("the directory can be created");
    let events_path = arguments.directory.join("events.db");
    let projections_path = arguments.directory.join("projections.db");
    remove_database(&events_path);
    remove_database(&projections_path);

    let ledger = Ledger::open(&events_path, LedgerOptions::default(), Arc::new(SystemClock)).expect("the ledger opens");
    set_up(&ledger, arguments.members);
    let projections = Projections::open(&projections_path, &events_path).expect("projections open");
    projections.catch_up().expect("the first build");
    let runner = projections.start_runner().expect("the runner starts");
    println!(
        "{} members, {} commands/s for {} s per phase, log in {}",
        arguments.members,
        arguments.rate_per_s,
        arguments.seconds,
        events_path.display()
    );

    let results = [
        run_phase("writes", &ledger, &projections, &arguments, false),
        run_phase("writes_and_rebuilds", &ledger, &projections, &arguments, true),
    ];
    runner.stop();
    ledger.shutdown();

    println!();
    println!("| phase | commands/s | events applied/s | rebuilds | lag p50 ms | lag p99 ms | lag max ms | commands |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for result in results {
        let mut lags = result.lags;
        lags.sort_unstable();
        println!(
            "| {} | {:.0} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {} |",
            result.label,
            result.commands as f64 / result.elapsed_s,
            result.events_applied as f64 / result.elapsed_s,
            result.rebuilds,
            millis(percentile(&lags, 0.50)),
            millis(percentile(&lags, 0.99)),
            millis(*lags.last().expect("some lags")),
            result.commands,
        );
    }
}
