//! `peer-cqrs-es`: the cqrs-es 0.5 + sqlite-es 0.5 peer of `tally-bench`'s
//! tally run (`crates/bench`). Same workload: one aggregate per member
//! (a credit account), each funded with a large promotional grant, the log
//! pre-filled with usage commands, then durable `RecordUsage` commands (two
//! events each) from 1 and 64 concurrent submitters, WAL +
//! `synchronous=FULL`, snapshots on.
//!
//! Its own Cargo project and lockfile: sqlx pins a `libsqlite3-sys` that
//! cannot share a lockfile with tally's rusqlite. Run it with
//! `benches/peers/run.sh`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{SecondsFormat, Utc};
use clap::Parser;
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, CqrsFramework, DomainEvent, EventStore};
use serde::{Deserialize, Serialize};
use sqlite_es::SqliteEventRepository;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite};
use tokio::task::JoinSet;
use uuid::Uuid;

/// sqlite-es 0.5.0's own schema, copied verbatim from the crate
/// (`migrations/20221114171845_init.sql`). It also creates the crate's
/// `test_view` table and one `Customer` event; neither is touched here.
const SCHEMA_SQL: &str = include_str!("../sqlite-es-0.5.0-init.sql");

/// Tasks used for setup (grants and prefill), as tally-bench's 8 threads.
const SETUP_TASKS: usize = 8;

#[derive(Parser, Debug)]
#[command(name = "peer-cqrs-es", about = "tally-bench's durable usage workload on cqrs-es 0.5 + sqlite-es 0.5")]
struct Args {
    /// Seconds each measured case runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Members (one aggregate each), each pre-funded with a large promotional grant.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// Events in the log before measuring, grants included (as tally-bench's
    /// --prefill): the rest is filled with usage commands, 2 events each.
    #[arg(long, default_value_t = 100_000)]
    prefill: usize,
    /// Where the database goes (a fresh subdirectory is made and removed).
    /// Defaults to tally's target directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Tiny sizes (~1 s in all; snapshots every 10 events at most, so the
    /// snapshot path runs and is checked).
    #[arg(long)]
    smoke: bool,
    /// Concurrent submitters (tokio tasks), one measured case each.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    submitters: Vec<usize>,
    /// Snapshot every this many events per aggregate
    /// (`PersistedEventStore::new_snapshot_store`).
    #[arg(long, default_value_t = 100)]
    snapshot_every: usize,
    /// sqlx pool size (sqlite-es's `default_sqlite_pool` uses 10).
    #[arg(long, default_value_t = 10)]
    pool: u32,
}

// ---------------------------------------------------------------- the domain

#[derive(Debug, Clone)]
enum CreditCommand {
    Grant { amount: i64 },
    RecordUsage { usage_id: String, metric: String, quantity: i64, credits: i64 },
}

/// Payloads shaped like tally's (internally tagged, same fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
enum CreditEvent {
    CreditsGranted { grant_id: String, source: String, amount: i64, expires_at: Option<String> },
    UsageRecorded { usage_id: String, metric: String, quantity: i64, credits: i64, occurred_at: String },
    CreditsDeducted { usage_id: String, amount: i64, parts: Vec<Part> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Part {
    grant_id: String,
    amount: i64,
}

impl DomainEvent for CreditEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CreditsGranted { .. } => "CreditsGranted",
            Self::UsageRecorded { .. } => "UsageRecorded",
            Self::CreditsDeducted { .. } => "CreditsDeducted",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug)]
enum CreditError {
    NotPositive,
    InsufficientCredits { balance: i64, requested: i64 },
}

impl fmt::Display for CreditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotPositive => write!(f, "amount must be positive"),
            Self::InsufficientCredits { balance, requested } => {
                write!(f, "insufficient credits: balance {balance}, requested {requested}")
            }
        }
    }
}

impl std::error::Error for CreditError {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GrantLot {
    grant_id: String,
    remaining: i64,
}

/// One member's credit account. `usage_ids` makes `RecordUsage` idempotent
/// by usage id within the aggregate (it is part of every snapshot).
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct CreditAccount {
    balance: i64,
    grants: Vec<GrantLot>,
    usage_ids: HashSet<String>,
}

impl Aggregate for CreditAccount {
    const TYPE: &'static str = "CreditAccount";
    type Command = CreditCommand;
    type Event = CreditEvent;
    type Error = CreditError;
    type Services = ();

    async fn handle(&mut self, command: CreditCommand, _: &(), sink: &EventSink<Self>) -> Result<(), CreditError> {
        match command {
            CreditCommand::Grant { amount } => {
                if amount <= 0 {
                    return Err(CreditError::NotPositive);
                }
                let event = CreditEvent::CreditsGranted {
                    grant_id: Uuid::now_v7().to_string(),
                    source: "promotional".to_owned(),
                    amount,
                    expires_at: None,
                };
                sink.write(event, self).await;
            }
            CreditCommand::RecordUsage { usage_id, metric, quantity, credits } => {
                if self.usage_ids.contains(&usage_id) {
                    // Already recorded: an idempotent success, no new events.
                    return Ok(());
                }
                if credits <= 0 {
                    return Err(CreditError::NotPositive);
                }
                if credits > self.balance {
                    return Err(CreditError::InsufficientCredits { balance: self.balance, requested: credits });
                }
                let mut parts = Vec::new();
                let mut left = credits;
                for lot in &self.grants {
                    if left == 0 {
                        break;
                    }
                    let take = lot.remaining.min(left);
                    if take > 0 {
                        parts.push(Part { grant_id: lot.grant_id.clone(), amount: take });
                        left -= take;
                    }
                }
                let occurred_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
                let recorded =
                    CreditEvent::UsageRecorded { usage_id: usage_id.clone(), metric, quantity, credits, occurred_at };
                sink.write(recorded, self).await;
                sink.write(CreditEvent::CreditsDeducted { usage_id, amount: credits, parts }, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: CreditEvent) {
        match event {
            CreditEvent::CreditsGranted { grant_id, amount, .. } => {
                self.balance += amount;
                self.grants.push(GrantLot { grant_id, remaining: amount });
            }
            CreditEvent::UsageRecorded { usage_id, .. } => {
                self.usage_ids.insert(usage_id);
            }
            CreditEvent::CreditsDeducted { amount, parts, .. } => {
                self.balance -= amount;
                for part in parts {
                    if let Some(lot) = self.grants.iter_mut().find(|lot| lot.grant_id == part.grant_id) {
                        lot.remaining -= part.amount;
                    }
                }
                self.grants.retain(|lot| lot.remaining > 0);
            }
        }
    }
}

// ------------------------------------------------------------- the framework

type Store = PersistedEventStore<SqliteEventRepository, CreditAccount>;
type Cqrs = CqrsFramework<CreditAccount, Store>;

/// sqlite-es's `default_sqlite_pool`, with `synchronous` chosen by the caller.
async fn open_pool(path: &Path, synchronous: SqliteSynchronous, size: u32) -> Result<Pool<Sqlite>> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .foreign_keys(true);
    Ok(SqlitePoolOptions::new().max_connections(size).connect_with(options).await?)
}

fn framework(pool: Pool<Sqlite>, snapshot_every: usize) -> Cqrs {
    let store = PersistedEventStore::new_snapshot_store(SqliteEventRepository::new(pool), snapshot_every);
    CqrsFramework::new(store, vec![], ())
}

fn member_id(index: usize) -> String {
    format!("m{index:06}")
}

fn usage_command() -> CreditCommand {
    CreditCommand::RecordUsage {
        usage_id: Uuid::now_v7().to_string(),
        metric: "api_calls".to_owned(),
        quantity: 1,
        credits: 1,
    }
}

/// Metadata shaped like tally's.
fn metadata(actor: &str) -> HashMap<String, String> {
    HashMap::from([
        ("command_id".to_owned(), Uuid::now_v7().to_string()),
        ("actor".to_owned(), actor.to_owned()),
        ("correlation_id".to_owned(), Uuid::now_v7().to_string()),
    ])
}

/// Execute one command, retrying on optimistic-concurrency conflicts (two
/// submitters on the same member). Returns the number of retries.
async fn submit(cqrs: &Cqrs, member: &str, command: CreditCommand, actor: &str) -> Result<u64, AggregateError<CreditError>> {
    let metadata = metadata(actor);
    let mut conflicts = 0;
    loop {
        match cqrs.execute_with_metadata(member, command.clone(), metadata.clone()).await {
            Ok(()) => return Ok(conflicts),
            Err(AggregateError::AggregateConflict) => conflicts += 1,
            Err(error) => return Err(error),
        }
    }
}

async fn count_events(pool: &Pool<Sqlite>, member: Option<&str>) -> Result<usize> {
    let count: i64 = match member {
        None => {
            sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = ?")
                .bind(CreditAccount::TYPE)
                .fetch_one(pool)
                .await?
        }
        Some(member) => {
            sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = ? AND aggregate_id = ?")
                .bind(CreditAccount::TYPE)
                .bind(member)
                .fetch_one(pool)
                .await?
        }
    };
    Ok(count as usize)
}

// ---------------------------------------------------------------- the bench

struct Row {
    name: String,
    commands_per_s: f64,
    latency: Option<Latency>,
    note: String,
}

#[derive(Clone, Copy)]
struct Latency {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// SplitMix64: members at random, reproducible per submitter.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.seconds = 0.2;
        args.members = 20;
        args.prefill = 400;
        // Small enough that the snapshot path runs (and is checked).
        args.snapshot_every = args.snapshot_every.min(10);
    }
    if args.members == 0 || args.seconds <= 0.0 || args.snapshot_every == 0 || args.pool == 0 {
        bail!("--members, --seconds, --snapshot-every and --pool must be positive");
    }
    if args.submitters.is_empty() || args.submitters.contains(&0) {
        bail!("--submitters must list positive counts");
    }
    let base = args.dir.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../target"));
    let dir = base.join(format!("peer-cqrs-es-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let duration = Duration::from_secs_f64(args.seconds);
    println!(
        "peer-cqrs-es (cqrs-es 0.5 + sqlite-es 0.5): {} s per case, {} members, {} prefilled events, snapshot every {} events, pool {}, dir {}",
        args.seconds,
        args.members,
        args.prefill,
        args.snapshot_every,
        args.pool,
        dir.display()
    );

    let result = run(&args, &dir.join("peer.db"), duration).await;
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    print_table(&rows);
    Ok(())
}

async fn run(args: &Args, path: &Path, duration: Duration) -> Result<Vec<Row>> {
    setup(args, path).await?;

    // Measured: synchronous=FULL.
    let pool = open_pool(path, SqliteSynchronous::Full, args.pool).await?;
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&pool).await?;
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&pool).await?;
    if synchronous != 2 || !journal.eq_ignore_ascii_case("wal") {
        bail!("pool is not WAL + FULL (synchronous={synchronous}, journal_mode={journal})");
    }
    let cqrs = Arc::new(framework(pool.clone(), args.snapshot_every));
    let mut rows = Vec::new();
    for &submitters in &args.submitters {
        let started = Instant::now();
        let (mut latencies, conflicts) = drive(&cqrs, submitters, args.members, duration).await?;
        let elapsed = started.elapsed().as_secs_f64();
        rows.push(Row {
            name: format!("cqrs-es + sqlite-es, {submitters} submitter(s)"),
            commands_per_s: latencies.len() as f64 / elapsed,
            latency: Some(percentiles(&mut latencies)),
            note: format!(
                "1 tx/command{}",
                if conflicts > 0 { format!(", {conflicts} conflicts retried") } else { String::new() }
            ),
        });
        eprintln!("  done: {}", rows.last().expect("row").name);
    }
    drop(cqrs);
    report_log(&pool, args.members).await?;
    pool.close().await;
    Ok(rows)
}

/// Fund every member, then fill the log with usage commands, through the
/// framework itself with synchronous=NORMAL (as tally-bench does), and check
/// idempotency and refusal once.
async fn setup(args: &Args, path: &Path) -> Result<()> {
    let started = Instant::now();
    let pool = open_pool(path, SqliteSynchronous::Normal, args.pool).await?;
    sqlx::raw_sql(SCHEMA_SQL).execute(&pool).await.context("sqlite-es schema")?;
    let cqrs = Arc::new(framework(pool.clone(), args.snapshot_every));

    let mut tasks = JoinSet::new();
    for task in 0..SETUP_TASKS {
        let cqrs = Arc::clone(&cqrs);
        let members = args.members;
        tasks.spawn(async move {
            for index in (task..members).step_by(SETUP_TASKS) {
                let member = member_id(index);
                submit(&cqrs, &member, CreditCommand::Grant { amount: 1_000_000_000 }, "admin")
                    .await
                    .with_context(|| format!("funding {member}"))?;
            }
            anyhow::Ok(())
        });
    }
    join_all(tasks).await?;

    let mut events = count_events(&pool, None).await?;
    while events < args.prefill {
        let remaining = (args.prefill - events).div_ceil(2);
        let per_task = remaining.div_ceil(SETUP_TASKS).max(1);
        let mut tasks = JoinSet::new();
        for task in 0..SETUP_TASKS {
            let cqrs = Arc::clone(&cqrs);
            let members = args.members;
            tasks.spawn(async move {
                for step in 0..per_task {
                    let member = member_id((task * per_task + step) % members);
                    submit(&cqrs, &member, usage_command(), &format!("member_key:{member}"))
                        .await
                        .with_context(|| format!("prefill usage for {member}"))?;
                }
                anyhow::Ok(())
            });
        }
        join_all(tasks).await?;
        events = count_events(&pool, None).await?;
    }

    // The command semantics, once: a repeated usage id adds nothing, an
    // overdraft is refused.
    let member = member_id(0);
    let before = count_events(&pool, Some(&member)).await?;
    let command = usage_command();
    submit(&cqrs, &member, command.clone(), "check").await?;
    submit(&cqrs, &member, command, "check").await?;
    let after = count_events(&pool, Some(&member)).await?;
    if after != before + 2 {
        bail!("a repeated usage id was not idempotent: {before} -> {after} events");
    }
    let overdraft = CreditCommand::RecordUsage {
        usage_id: Uuid::now_v7().to_string(),
        metric: "api_calls".to_owned(),
        quantity: 1,
        credits: 10_000_000_000,
    };
    match submit(&cqrs, &member, overdraft, "check").await {
        Err(AggregateError::UserError(CreditError::InsufficientCredits { .. })) => {}
        other => bail!("an overdraft was not refused: {other:?}"),
    }
    drop(cqrs);
    pool.close().await;
    eprintln!("  setup: {events} events in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Submit usage commands from `submitters` tasks until the deadline, each to
/// a member drawn at random. Returns the latencies and the conflicts retried.
async fn drive(cqrs: &Arc<Cqrs>, submitters: usize, members: usize, duration: Duration) -> Result<(Vec<Duration>, u64)> {
    let deadline = Instant::now() + duration;
    let mut tasks = JoinSet::new();
    for submitter in 0..submitters {
        let cqrs = Arc::clone(cqrs);
        tasks.spawn(async move {
            let mut rng = SplitMix(0x7A11_u64.wrapping_mul(submitter as u64 + 1));
            let mut latencies = Vec::new();
            let mut conflicts = 0;
            while Instant::now() < deadline {
                let member = member_id((rng.next() % members as u64) as usize);
                let begun = Instant::now();
                conflicts += submit(&cqrs, &member, usage_command(), &format!("member_key:{member}"))
                    .await
                    .with_context(|| format!("usage for {member}"))?;
                latencies.push(begun.elapsed());
            }
            anyhow::Ok((latencies, conflicts))
        });
    }
    let mut all = Vec::new();
    let mut conflicts = 0;
    for (latencies, task_conflicts) in join_all(tasks).await? {
        all.extend(latencies);
        conflicts += task_conflicts;
    }
    Ok((all, conflicts))
}

async fn join_all<T: 'static>(mut tasks: JoinSet<Result<T>>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        out.push(joined.context("task panicked")??);
    }
    Ok(out)
}

/// What the peer wrote, for comparison with tally's row sizes, and a check
/// that snapshot + tail replay gives the same state as a full replay.
async fn report_log(pool: &Pool<Sqlite>, members: usize) -> Result<()> {
    let events = count_events(pool, None).await?;
    let snapshots: i64 = sqlx::query_scalar("SELECT count(*) FROM snapshots WHERE aggregate_type = ?")
        .bind(CreditAccount::TYPE)
        .fetch_one(pool)
        .await?;
    let (payload, metadata): (f64, f64) = sqlx::query_as(
        "SELECT avg(length(payload)), avg(length(metadata)) FROM (SELECT payload, metadata FROM events ORDER BY rowid DESC LIMIT 1000)",
    )
    .fetch_one(pool)
    .await?;
    let snapshot_size: Option<f64> = sqlx::query_scalar("SELECT avg(length(payload)) FROM snapshots WHERE aggregate_type = ?")
        .bind(CreditAccount::TYPE)
        .fetch_one(pool)
        .await?;
    println!(
        "row sizes (bytes): event payload avg {payload:.0}, metadata {metadata:.0}, snapshot payload {:.0}",
        snapshot_size.unwrap_or(0.0)
    );
    println!("log at the end: {events} events, {snapshots} members with a snapshot");

    let with_snapshots: Store = PersistedEventStore::new_snapshot_store(SqliteEventRepository::new(pool.clone()), 1);
    let replay_all: Store = PersistedEventStore::new_event_store(SqliteEventRepository::new(pool.clone()));
    let snapshotted: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM snapshots WHERE aggregate_type = ? ORDER BY aggregate_id LIMIT 200",
    )
    .bind(CreditAccount::TYPE)
    .fetch_all(pool)
    .await?;
    let mut checked = 0;
    let mut differ = Vec::new();
    for member in snapshotted.iter().cloned().chain((0..members.min(20)).map(member_id)) {
        let a = with_snapshots.load_aggregate(&member).await?.aggregate;
        let b = replay_all.load_aggregate(&member).await?.aggregate;
        checked += 1;
        if a != b {
            differ.push(format!("{member}: snapshot+tail balance {} / full replay {}", a.balance, b.balance));
        }
    }
    if differ.is_empty() {
        println!("state check: snapshot + tail equals full replay for {checked} members");
    } else {
        println!(
            "state check: snapshot + tail DIFFERS from full replay for {} of {checked} members, e.g. {}",
            differ.len(),
            differ[0]
        );
    }
    Ok(())
}

fn percentiles(latencies: &mut [Duration]) -> Latency {
    if latencies.is_empty() {
        return Latency { p50: Duration::ZERO, p99: Duration::ZERO, max: Duration::ZERO };
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Latency { p50: at(0.50), p99: at(0.99), max: latencies[latencies.len() - 1] }
}

fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1_000.0)
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| case | commands/s | p50 ms | p99 ms | max ms | note |");
    println!("|---|---:|---:|---:|---:|---|");
    for row in rows {
        let (p50, p99, max) = match row.latency {
            Some(latency) => (ms(latency.p50), ms(latency.p99), ms(latency.max)),
            None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
        };
        println!("| {} | {:.0} | {p50} | {p99} | {max} | {} |", row.name, row.commands_per_s, row.note);
    }
}
