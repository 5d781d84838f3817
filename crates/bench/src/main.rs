//! `tally-bench`: one process, one run, one disk. Durable usage writes through
//! tally's `Ledger` beside the physical limit (plain rusqlite writing the
//! same rows, batched) and a naive one-transaction-per-command CRUD ledger.
//! WAL + `synchronous=FULL` everywhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use clap::Parser;
use rusqlite::{Connection, params};
use sha2::{Digest, Sha256};
use tally_ledger::domain::{Credits, GrantCredits, GrantSource, MemberCommand, RecordUsage};
use tally_ledger::store::{BackgroundCheckpoints, CheckpointOptions, format_recorded_at};
use tally_ledger::{Idempotency, Ledger, LedgerError, LedgerOptions, Request, SystemClock};
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(name = "tally-bench", about = "Durable write throughput: tally beside the physical limit and naive CRUD")]
struct Args {
    /// Seconds each measured case runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Members, each pre-funded with a large promotional grant.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// Events in the log before tally is measured.
    #[arg(long, default_value_t = 1_000_000)]
    prefill: usize,
    /// Where the databases go (a fresh subdirectory is made and removed).
    /// Defaults to the workspace's target directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Tiny sizes (~2 s in all), for CI.
    #[arg(long)]
    smoke: bool,
    /// Which cases to run (all by default): physical, naive, tally.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Case>,
    /// A tally log prefilled by an earlier run (`--keep-tally-log`): copied
    /// and used instead of prefilling a new one.
    #[arg(long)]
    tally_log: Option<PathBuf>,
    /// Keep the prefilled tally log (before the measured cases) at this path.
    #[arg(long)]
    keep_tally_log: Option<PathBuf>,
    /// tally's WAL checkpoints, in pages: "STEP,REWIND" (background
    /// checkpoint every STEP pages, rewind at REWIND), or "sqlite" for
    /// SQLite's automatic checkpoint in the commit. Default: tally's default.
    #[arg(long)]
    checkpoints: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Physical,
    Naive,
    Tally,
}

/// The statements below write tally's rows into tally's own schema
/// (`tally_ledger::store::CREATE_SCHEMA_SQL`), so the layouts cannot drift.
const INSERT_EVENT: &str = "INSERT INTO events (position, stream_id, version, event_type, schema_version, event_id, payload, metadata, recorded_at, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";
const INSERT_IDEMPOTENCY: &str = "INSERT INTO idempotency (scope, key, fingerprint, status, response, position, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
const INSERT_USAGE: &str =
    "INSERT INTO usages (stream_id, usage_id, position, credits, reversed_position) VALUES (?1, ?2, ?3, ?4, NULL)";

/// Prefill submitters: enough for large group-commit batches.
const PREFILL_THREADS: usize = 64;

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

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.seconds = 0.2;
        args.members = 20;
        args.prefill = 400;
    }
    if args.members == 0 || args.seconds <= 0.0 {
        bail!("--members and --seconds must be positive");
    }
    let base = args.dir.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = base.join(format!("tally-bench-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let duration = Duration::from_secs_f64(args.seconds);
    println!(
        "tally-bench: {} s per case, {} members, {} prefilled events, dir {}",
        args.seconds,
        args.members,
        args.prefill,
        dir.display()
    );

    let result = run_all(&args, &dir, duration);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    print_table(&rows);
    Ok(())
}

fn run_all(args: &Args, dir: &Path, duration: Duration) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let runs = |case: Case| args.only.is_empty() || args.only.contains(&case);
    if runs(Case::Physical) {
        rows.extend(physical_limits(args, dir, duration)?);
    }
    if runs(Case::Naive) {
        rows.extend(naive_cruds(args, dir, duration)?);
    }
    if runs(Case::Tally) {
        rows.extend(tally(&dir.join("tally.db"), args, duration)?);
    }
    Ok(rows)
}

fn physical_limits(args: &Args, dir: &Path, duration: Duration) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    // Each layout at two batch sizes, with SQLite's automatic checkpoint (in
    // the commit) and with tally's checkpoints beside the writer, so that
    // the limit tally is held to gets the same I/O policy as tally.
    let checkpoint_policies = [("SQLite checkpoint", None), ("tally checkpoints", Some(CheckpointOptions::default()))];
    for (tally_rows, layout, rows_per_command) in [(true, "tally rows", 4.0), (false, "reference layout", 3.0)] {
        for (policy, checkpoints) in checkpoint_policies {
            for batch in [64, 512] {
                let file = format!("phys-{}-{}-{batch}.db", tally_rows, checkpoints.is_some());
                let case = PhysicalCase { batch, members: args.members, tally_rows, checkpoints };
                let rate = physical(&dir.join(file), &case, duration)?;
                rows.push(Row {
                    name: format!("physical limit ({layout}), batch {batch}, {policy}"),
                    commands_per_s: rate,
                    latency: None,
                    note: format!("{rows_per_command} rows/cmd ({:.0} rows/s)", rate * rows_per_command),
                });
                eprintln!("  done: {}", rows.last().expect("row").name);
            }
        }
    }
    Ok(rows)
}

fn naive_cruds(args: &Args, dir: &Path, duration: Duration) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for submitters in [1, 64] {
        let (rate, latency, busy) =
            naive_crud(&dir.join(format!("naive-{submitters}.db")), args.members, submitters, duration)?;
        rows.push(Row {
            name: format!("naive CRUD, 1 tx/command, {submitters} submitter(s)"),
            commands_per_s: rate,
            latency: Some(latency),
            note: format!(
                "read + UPDATE + INSERT{}",
                if busy > 0 { format!(", {busy} busy retries") } else { String::new() }
            ),
        });
        eprintln!("  done: {}", rows.last().expect("row").name);
    }
    Ok(rows)
}

fn open_full(path: &Path) -> Result<Connection> {
    let connection = Connection::open(path)?;
    let mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("SQLite refused WAL mode ({mode})");
    }
    connection.pragma_update(None, "synchronous", "FULL")?;
    // The same page cache as tally's writer connection.
    connection.pragma_update(None, "cache_size", -tally_ledger::store::WRITER_CACHE_KIB)?;
    Ok(connection)
}

/// Payloads shaped and sized like tally's own (checked against the tally run,
/// whose measured sizes are printed at the end).
struct Shapes {
    usage_payload: String,
    deducted_payload: String,
    metadata: String,
    response: String,
}

fn shapes(member: &str, usage_id: &str, now: &str) -> Shapes {
    let grant_id = Uuid::now_v7().to_string();
    let usage_payload = serde_json::json!({
        "type": "UsageRecorded", "usage_id": usage_id, "metric": "api_calls", "quantity": 1,
        "credits": 1, "occurred_at": now
    })
    .to_string();
    let deducted_payload = serde_json::json!({
        "type": "CreditsDeducted", "usage_id": usage_id, "amount": 1,
        "parts": [{"grant_id": grant_id, "amount": 1}]
    })
    .to_string();
    let metadata = serde_json::json!({
        "command_id": Uuid::now_v7().to_string(), "actor": format!("member_key:{member}"),
        "correlation_id": Uuid::now_v7().to_string()
    })
    .to_string();
    let response = serde_json::json!({
        "member_id": member, "usage_id": usage_id, "replayed": false,
        "events": [
            {"position": 1, "stream_id": format!("member-{member}"), "version": 1, "event_type": "UsageRecorded", "event_id": Uuid::now_v7().to_string(), "recorded_at": now},
            {"position": 2, "stream_id": format!("member-{member}"), "version": 2, "event_type": "CreditsDeducted", "event_id": Uuid::now_v7().to_string(), "recorded_at": now}
        ],
        "balance": {"balance": 999_999, "available": 999_999, "held": 0, "debt": 0}
    })
    .to_string();
    Shapes { usage_payload, deducted_payload, metadata, response }
}

#[derive(Clone, Copy)]
struct PhysicalCase {
    batch: usize,
    members: usize,
    /// tally's rows per usage command, or the reference layout (2 events +
    /// 1 idempotency row).
    tally_rows: bool,
    /// tally's checkpoints beside the writer, or SQLite's in the commit.
    checkpoints: Option<CheckpointOptions>,
}

/// Plain rusqlite writing a usage command's rows, `batch` commands per
/// transaction, for `duration`. Returns commands/s.
fn physical(path: &Path, case: &PhysicalCase, duration: Duration) -> Result<f64> {
    let PhysicalCase { batch, members, tally_rows, checkpoints } = *case;
    let mut connection = open_full(path)?;
    connection.execute_batch(tally_ledger::store::CREATE_SCHEMA_SQL)?;
    let mut checkpoints =
        checkpoints.map(|options| BackgroundCheckpoints::start(&mut connection, path, options)).transpose()?;
    let mut versions = vec![0_i64; members];
    let mut position = 0_i64;
    let mut previous_hash = [0_u8; 32];
    let mut member_cursor = 0_usize;
    let mut commands = 0_u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        if let Some(checkpoints) = &mut checkpoints {
            checkpoints.before_batch(&connection);
        }
        connection.execute_batch("BEGIN IMMEDIATE")?;
        {
            let mut insert_event = connection.prepare_cached(INSERT_EVENT)?;
            let mut insert_idempotency = connection.prepare_cached(INSERT_IDEMPOTENCY)?;
            let mut insert_usage = connection.prepare_cached(INSERT_USAGE)?;
            for _ in 0..batch {
                let member_index = member_cursor % members;
                member_cursor = member_cursor.wrapping_add(7919);
                let member = format!("m{member_index:06}");
                let stream = format!("member-{member}");
                let usage_id = Uuid::now_v7().to_string();
                let now = format_recorded_at(Utc::now());
                let shape = shapes(&member, &usage_id, &now);
                for (event_type, payload) in
                    [("UsageRecorded", &shape.usage_payload), ("CreditsDeducted", &shape.deducted_payload)]
                {
                    position += 1;
                    versions[member_index] += 1;
                    let mut hasher = Sha256::new();
                    hasher.update(previous_hash);
                    hasher.update(stream.as_bytes());
                    hasher.update(payload.as_bytes());
                    hasher.update(shape.metadata.as_bytes());
                    previous_hash.copy_from_slice(&hasher.finalize());
                    insert_event.execute(params![
                        position,
                        stream,
                        versions[member_index],
                        event_type,
                        1_i64,
                        Uuid::now_v7().as_bytes().as_slice(),
                        payload,
                        shape.metadata,
                        now,
                        previous_hash.as_slice(),
                    ])?;
                }
                if tally_rows {
                    insert_usage.execute(params![stream, usage_id, position - 1, 1_i64])?;
                }
                let key = Uuid::now_v7().to_string();
                let fingerprint = Sha256::digest(key.as_bytes());
                insert_idempotency.execute(params![
                    format!("member_key:{member}:{member}:usage"),
                    key,
                    fingerprint.as_slice(),
                    201_i64,
                    shape.response,
                    position - 1,
                    now,
                ])?;
                commands += 1;
            }
        }
        connection.execute_batch("COMMIT")?;
        if let Some(checkpoints) = &mut checkpoints {
            checkpoints.after_commit();
        }
    }
    Ok(commands as f64 / started.elapsed().as_secs_f64())
}

/// One transaction per command: read the balance, UPDATE it, INSERT a
/// transaction row; `submitters` threads, each with its own connection, as a
/// web service with a connection pool would run it. Returns (commands/s,
/// latencies, commands that met a busy lock and were retried).
fn naive_crud(path: &Path, members: usize, submitters: usize, duration: Duration) -> Result<(f64, Latency, u64)> {
    let connection = open_full(path)?;
    connection.execute_batch(
        "CREATE TABLE accounts (id TEXT PRIMARY KEY, balance INTEGER NOT NULL) STRICT;
         CREATE TABLE transactions (
             id INTEGER PRIMARY KEY, account_id TEXT NOT NULL, amount INTEGER NOT NULL,
             usage_id TEXT NOT NULL UNIQUE, metric TEXT NOT NULL, created_at TEXT NOT NULL
         ) STRICT;",
    )?;
    connection.execute_batch("BEGIN")?;
    for index in 0..members {
        connection.execute(
            "INSERT INTO accounts (id, balance) VALUES (?1, ?2)",
            params![member_id(index), 1_000_000_000_i64],
        )?;
    }
    connection.execute_batch("COMMIT")?;
    drop(connection);
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let handles: Vec<_> = (0..submitters)
        .map(|thread| {
            let path = path.to_owned();
            std::thread::spawn(move || -> Result<(Vec<Duration>, u64)> {
                let connection = open_full(&path)?;
                connection.busy_timeout(Duration::from_secs(10))?;
                let mut latencies = Vec::new();
                let mut busy = 0_u64;
                let mut cursor = thread.wrapping_mul(104_729);
                while Instant::now() < deadline {
                    let begun = Instant::now();
                    let member = member_id(cursor % members);
                    cursor = cursor.wrapping_add(7919);
                    loop {
                        match naive_usage(&connection, &member) {
                            Ok(()) => break,
                            Err(rusqlite::Error::SqliteFailure(error, _))
                                if error.code == rusqlite::ErrorCode::DatabaseBusy =>
                            {
                                let _ = connection.execute_batch("ROLLBACK");
                                busy += 1;
                            }
                            Err(error) => return Err(error.into()),
                        }
                    }
                    latencies.push(begun.elapsed());
                }
                Ok((latencies, busy))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut busy = 0;
    for handle in handles {
        let (thread_latencies, thread_busy) = handle.join().expect("naive submitter thread")?;
        latencies.extend(thread_latencies);
        busy += thread_busy;
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, percentiles(&mut latencies), busy))
}

fn naive_usage(connection: &Connection, member: &str) -> rusqlite::Result<()> {
    connection.execute_batch("BEGIN IMMEDIATE")?;
    let balance: i64 = connection
        .prepare_cached("SELECT balance FROM accounts WHERE id = ?1")?
        .query_row([member], |row| row.get(0))?;
    if balance < 1 {
        connection.execute_batch("ROLLBACK")?;
        return Err(rusqlite::Error::QueryReturnedNoRows);
    }
    connection
        .prepare_cached("UPDATE accounts SET balance = ?2 WHERE id = ?1")?
        .execute(params![member, balance - 1])?;
    connection
        .prepare_cached(
            "INSERT INTO transactions (account_id, amount, usage_id, metric, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![member, -1_i64, Uuid::now_v7().to_string(), "api_calls", format_recorded_at(Utc::now())])?;
    connection.execute_batch("COMMIT")
}

fn member_id(index: usize) -> String {
    format!("m{index:06}")
}

fn usage_request(member: &str) -> Request<MemberCommand> {
    let command = MemberCommand::RecordUsage(RecordUsage {
        usage_id: Uuid::now_v7().to_string(),
        metric: "api_calls".to_owned(),
        quantity: 1,
        credits: Credits(1),
        occurred_at: None,
        integration_id: None,
        query_id: None,
    });
    let key = Uuid::now_v7().to_string();
    let fingerprint: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    Request::new(command, &format!("member_key:{member}")).with_idempotency(Idempotency {
        scope: format!("member_key:{member}:{member}:usage"),
        key,
        fingerprint,
        status: 201,
    })
}

/// Submit usage commands from `threads` threads until the deadline.
/// Returns (commands done, latencies, overloaded/failed count).
fn checkpoint_options(args: &Args) -> Result<Option<CheckpointOptions>> {
    match args.checkpoints.as_deref() {
        None => Ok(LedgerOptions::default().checkpoints),
        Some("sqlite") => Ok(None),
        Some(pages) => {
            let (step, rewind) = pages.split_once(',').context("--checkpoints takes STEP,REWIND or sqlite")?;
            Ok(Some(CheckpointOptions { background_pages: step.parse()?, rewind_pages: rewind.parse()? }))
        }
    }
}

/// (background checkpoints, WAL rewinds) so far, when the ledger
/// checkpoints beside its writer.
fn checkpoint_counts(ledger: &Ledger) -> Option<(u64, u64)> {
    ledger.checkpoint_stats().map(|stats| (stats.background.load(Relaxed), stats.rewinds.load(Relaxed)))
}

/// Loads every member's state into the writer's cache (a `check`, which
/// writes nothing), 8 at a time, so that the measured cases that follow see
/// warm states, as a running server does; reports the cold loads' rate (each
/// replays the member's ~100 events: no snapshot below 1,000 events).
fn load_members(ledger: &Arc<Ledger>, members: usize) -> Result<Row> {
    const LOADERS: usize = 8;
    let started = Instant::now();
    let handles: Vec<_> = (0..LOADERS)
        .map(|loader| {
            let ledger = Arc::clone(ledger);
            std::thread::spawn(move || -> Result<(), LedgerError> {
                for index in (loader..members).step_by(LOADERS) {
                    ledger.check(&member_id(index), Credits(1))?;
                }
                Ok(())
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("loader thread")?;
    }
    let rate = members as f64 / started.elapsed().as_secs_f64();
    Ok(Row {
        name: "tally member loads, cold cache (check)".to_owned(),
        commands_per_s: rate,
        latency: None,
        note: format!("{members} members read from the log into the writer's cache, 8 at a time"),
    })
}

fn drive(ledger: &Arc<Ledger>, threads: usize, members: usize, duration: Duration) -> (u64, Vec<Duration>, u64) {
    let deadline = Instant::now() + duration;
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let ledger = Arc::clone(ledger);
            std::thread::spawn(move || -> (Vec<Duration>, u64) {
                let mut latencies = Vec::new();
                let mut failed = 0_u64;
                let mut cursor = thread.wrapping_mul(104_729);
                while Instant::now() < deadline {
                    let member = member_id(cursor % members);
                    cursor = cursor.wrapping_add(7919);
                    let begun = Instant::now();
                    match ledger.execute(&member, usage_request(&member)) {
                        Ok(_) => latencies.push(begun.elapsed()),
                        Err(LedgerError::Overloaded { .. }) => {
                            failed += 1;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(error) => panic!("usage for {member} failed: {error}"),
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failed = 0;
    for handle in handles {
        let (latencies, thread_failed) = handle.join().expect("submitter thread");
        all.extend(latencies);
        failed += thread_failed;
    }
    (all.len() as u64, all, failed)
}

fn tally(path: &Path, args: &Args, duration: Duration) -> Result<Vec<Row>> {
    // Setup, fast: the ledger itself with synchronous=NORMAL.
    let setup_started = Instant::now();
    if let Some(prefilled) = &args.tally_log {
        std::fs::copy(prefilled, path).with_context(|| format!("copying {}", prefilled.display()))?;
    }
    let mut fast = LedgerOptions::default();
    fast.store.synchronous_full = false;
    let ledger = Arc::new(Ledger::open(path, fast, Arc::new(SystemClock))?);
    // A prefilled log (`--tally-log`) is funded already.
    if ledger.reader()?.head()?.position == 0 {
        for index in 0..args.members {
            let member = member_id(index);
            let grant = MemberCommand::GrantCredits(GrantCredits::new(GrantSource::Promotional, 1_000_000_000));
            ledger.execute(&member, Request::new(grant, "admin")).with_context(|| format!("funding {member}"))?;
        }
    }
    let mut events = ledger.reader()?.head()?.position;
    while (events as usize) < args.prefill {
        let remaining = (args.prefill - events as usize).div_ceil(2);
        let per_thread = remaining.div_ceil(PREFILL_THREADS).max(1);
        let handles: Vec<_> = (0..PREFILL_THREADS)
            .map(|thread| {
                let ledger = Arc::clone(&ledger);
                let members = args.members;
                std::thread::spawn(move || -> Result<(), LedgerError> {
                    for step in 0..per_thread {
                        let member = member_id((thread * per_thread + step) % members);
                        ledger.execute(&member, usage_request(&member))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("prefill thread")?;
        }
        events = ledger.reader()?.head()?.position;
    }
    Arc::into_inner(ledger).context("ledger still shared after prefill")?.shutdown();
    eprintln!("  tally setup: {events} events in {:.1} s", setup_started.elapsed().as_secs_f64());
    if let Some(keep) = &args.keep_tally_log {
        std::fs::copy(path, keep).with_context(|| format!("keeping the prefilled log at {}", keep.display()))?;
    }

    // Measured: default options (synchronous=FULL, its fsync beside the writer).
    let measured = LedgerOptions { checkpoints: checkpoint_options(args)?, ..LedgerOptions::default() };
    let ledger = Arc::new(Ledger::open(path, measured, Arc::new(SystemClock))?);
    let mut rows = vec![load_members(&ledger, args.members)?];
    eprintln!("  done: {}", rows.last().expect("row").name);
    for threads in [1, 8, 64] {
        rows.push(measure_tally(&ledger, &format!("tally Ledger, {threads} submitter(s)"), threads, args, duration));
        eprintln!("  done: {}", rows.last().expect("row").name);
    }
    // The same ledger with the fsync inside each COMMIT (no pipeline): what
    // syncing beside the writer wins, side by side.
    Arc::into_inner(ledger).context("ledger still shared")?.shutdown();
    let plain = LedgerOptions { sync_beside_writer: false, ..measured };
    let ledger = Arc::new(Ledger::open(path, plain, Arc::new(SystemClock))?);
    load_members(&ledger, args.members)?;
    for threads in [8, 64] {
        let name = format!("tally Ledger, fsync inside COMMIT, {threads} submitter(s)");
        rows.push(measure_tally(&ledger, &name, threads, args, duration));
        eprintln!("  done: {}", rows.last().expect("row").name);
    }
    let head = ledger.reader()?.head()?.position;
    Arc::into_inner(ledger).context("ledger still shared")?.shutdown();

    // What tally actually wrote, to check the physical limit's row sizes.
    let connection = Connection::open(path)?;
    let (payload, metadata): (f64, f64) = connection.query_row(
        "SELECT avg(length(payload)), avg(length(metadata)) FROM events WHERE position > ?1",
        [head.saturating_sub(1_000) as i64],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let response: f64 = connection.query_row(
        "SELECT avg(length(response)) FROM (SELECT response FROM idempotency ORDER BY recorded_at DESC LIMIT 500)",
        [],
        |row| row.get(0),
    )?;
    let sample = shapes("m000001", &Uuid::now_v7().to_string(), &format_recorded_at(Utc::now()));
    println!(
        "row sizes (bytes): tally payload avg {payload:.0} / bench {:.0}; metadata {metadata:.0} / {}; idempotency response {response:.0} / {}",
        (sample.usage_payload.len() + sample.deducted_payload.len()) as f64 / 2.0,
        sample.metadata.len(),
        sample.response.len()
    );
    println!("tally log at the end: {head} events");
    Ok(rows)
}

/// One measured case on an open ledger: `threads` submitters for `duration`.
fn measure_tally(ledger: &Arc<Ledger>, name: &str, threads: usize, args: &Args, duration: Duration) -> Row {
    let stats = ledger.stats();
    let batches_before = stats.batches.load(Relaxed);
    let replays_before = stats.replayed_batches.load(Relaxed);
    let syncs_before = stats.syncs.load(Relaxed);
    let checkpoints_before = checkpoint_counts(ledger);
    let (batch_before, commit_before) = (stats.batch_nanos.load(Relaxed), stats.commit_nanos.load(Relaxed));
    let sched_before = writer_schedstat();
    let started = Instant::now();
    let (done, mut latencies, failed) = drive(ledger, threads, args.members, duration);
    let elapsed = started.elapsed().as_secs_f64();
    let batches = stats.batches.load(Relaxed) - batches_before;
    let replays = stats.replayed_batches.load(Relaxed) - replays_before;
    let syncs = stats.syncs.load(Relaxed) - syncs_before;
    let checkpoints = checkpoint_counts(ledger);
    let batch_nanos = stats.batch_nanos.load(Relaxed) - batch_before;
    let commit_nanos = stats.commit_nanos.load(Relaxed) - commit_before;
    let on_cpu = match (sched_before, writer_schedstat()) {
        (Some(before), Some(after)) => format!(
            "; writer on CPU {:.0} µs/cmd, waiting for a CPU {:.0} µs/cmd",
            (after.0 - before.0) as f64 / 1e3 / done.max(1) as f64,
            (after.1 - before.1) as f64 / 1e3 / done.max(1) as f64
        ),
        _ => String::new(),
    };
    let rate = done as f64 / elapsed;
    Row {
        name: name.to_owned(),
        commands_per_s: rate,
        latency: Some(percentiles(&mut latencies)),
        note: format!(
            "{:.1} cmds/commit, {:.1} cmds/syncer round, writer busy {:.0} %, commit {:.0} % of it, {:.0} µs/cmd in the writer{}{}{}{}",
            done as f64 / batches.max(1) as f64,
            done as f64 / syncs.max(1) as f64,
            batch_nanos as f64 / 1e7 / elapsed,
            commit_nanos as f64 * 100.0 / batch_nanos.max(1) as f64,
            batch_nanos as f64 / 1e3 / done.max(1) as f64,
            on_cpu,
            if failed > 0 { format!(", {failed} overloaded") } else { String::new() },
            if replays > 0 { format!(", {replays} batches replayed with savepoints") } else { String::new() },
            match (checkpoints_before, checkpoints) {
                (Some(before), Some(after)) => {
                    format!(", {} background checkpoints, {} WAL rewinds", after.0 - before.0, after.1 - before.1)
                }
                _ => ", SQLite's automatic checkpoint".to_owned(),
            },
        ),
    }
}

/// The writer thread's (time on a CPU, time runnable but waiting for one),
/// in nanoseconds, from Linux's `/proc/self/task/*/schedstat`; `None`
/// elsewhere. What is left of its busy time is blocked time: fsync, I/O.
fn writer_schedstat() -> Option<(u64, u64)> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "tally-writer" {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let mut fields = stat.split_whitespace().map(|field| field.parse::<u64>().ok());
            return Some((fields.next()??, fields.next()??));
        }
    }
    None
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
    let find = |prefix: &str| rows.iter().find(|row| row.name.starts_with(prefix)).map(|row| row.commands_per_s);
    let best = |prefix: &str| {
        rows.iter().filter(|row| row.name.starts_with(prefix)).map(|row| row.commands_per_s).fold(0.0_f64, f64::max)
    };
    let Some(tally64) = find("tally Ledger, 64") else { return };
    println!();
    for (limit, what) in [
        (best("physical limit (tally rows)"), "physical limit (tally rows, best batch and checkpoint)"),
        (best("physical limit (reference layout)"), "physical limit (reference layout, best batch and checkpoint)"),
        (
            best("physical limit (tally rows), batch 512, SQLite"),
            "physical limit (tally rows, batch 512, SQLite checkpoint)",
        ),
        (best("naive CRUD, 1 tx/command, 1 "), "naive CRUD, 1 submitter"),
        (best("naive CRUD, 1 tx/command, 64 "), "naive CRUD, 64 submitters"),
    ] {
        if limit > 0.0 {
            println!("tally 64 submitters / {what}: {:.2}", tally64 / limit);
        }
    }
}
