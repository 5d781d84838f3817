//! `tally-startup`: how long `tally serve` takes to start, and how much
//! memory it holds, over a large log: by default 10,000,000 events of
//! 100,000 members.
//!
//! # Layout
//!
//! 1. **Generation** (skipped when `--dir` already holds a log of at least
//!    `--events` events): the log is written through the library itself,
//!    `Ledger::open` with `synchronous=NORMAL` (setup speed only), from
//!    `--submitters` threads so that group commit makes large batches. Every
//!    member first gets one promotional grant (with an idempotency key, so a
//!    resumed generation does not grant twice), then `RecordUsage` commands
//!    with idempotency keys go round-robin over the members until the head
//!    reaches `--events`. Member `m000000` also gets one command in every
//!    few, so that its stream holds about `--long-stream-events` events: the
//!    cost of loading one long stream is measured on it. The files are laid
//!    out as `tally serve --data-dir` expects them (`events.db`; `serve`
//!    makes `projections.db` and `keys.db`).
//! 2. **Read models**, built once before anything is measured, by the real
//!    binary: `tally --data-dir DIR projections rebuild --all` (when the log
//!    was just generated, when `projections.db` is missing, or with
//!    `--rebuild`), timed.
//! 3. **Measures**, on the real binary: start-up = spawn → first `200` from
//!    `GET /readyz` (polled every 5 ms); `VmRSS`/`VmHWM` from
//!    `/proc/PID/status` right after; one `POST /v1/members/{id}/usage` per
//!    member for `--touch` members (the first command of a member loads its
//!    stream from the log into the writer's cache), first one member alone,
//!    then the long-stream member alone, then the rest from `--clients`
//!    threads; a second command for some of them (cached state, for
//!    comparison); RSS again; SIGTERM; a second start (warm page cache). A
//!    start on an empty data directory is the reference for "work
//!    proportional to the log".
//!
//! The first start is not cold in the OS's sense: the files were just
//! written or read, so much of them is in the page cache. Dropping the page
//! cache needs root and slows everything else on a shared machine, so this
//! tool does not.
//!
//! # Running
//!
//! ```sh
//! cargo build --release -p tally-cli -p tally-bench
//! target/release/tally-startup --dir target/startup-10m
//! target/release/tally-startup --dir target/startup-small --events 200000 --members 1000   # about 15 s
//! ```
//!
//! The markdown table goes to stdout, progress to stderr; each server's log
//! is kept in the data directory (`startup-serve-*.log`).

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tally_bench::thousands;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use reqwest::StatusCode;
use reqwest::blocking::Client;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};
use tally_ledger::domain::limits::COMMAND_CREDITS_MAX;
use tally_ledger::domain::{Credits, GrantCredits, GrantSource, MemberCommand, RecordUsage, member_stream};
use tally_ledger::store::EventReader;
use tally_ledger::{Idempotency, Ledger, LedgerError, LedgerOptions, Request, SystemClock};
use uuid::Uuid;

/// The file names `tally serve --data-dir` uses (crates/cli/src/data_dir.rs).
const EVENTS_FILE: &str = "events.db";
const PROJECTIONS_FILE: &str = "projections.db";
/// Upper bounds on the flags: a typo must not fill the disk.
const EVENTS_MAX: u64 = 100_000_000;
const MEMBERS_MAX: usize = 1_000_000;
const SUBMITTERS_MAX: u64 = 256;
const CLIENTS_MAX: u64 = 64;
/// How often generation reports its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How often the generator's main thread looks whether the submitters are done.
const JOIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A submitter told `Overloaded` waits this long before it tries again.
const OVERLOADED_BACKOFF: Duration = Duration::from_millis(1);
/// How often readiness is polled while a server starts.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// A start-up longer than this is a failure (generous: start-up work may be
/// proportional to the log, which is what this tool looks for).
const READY_TIMEOUT: Duration = Duration::from_secs(900);
/// One readiness poll waits at most this long for its answer.
const READY_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A usage command with no answer after this long fails the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Second commands (cached state) sent for comparison, at most.
const CACHED_COMMANDS_MAX: usize = 10_000;
/// Each member's one grant: far more than the usage it will record.
const FUNDING_CREDITS: i64 = COMMAND_CREDITS_MAX;
/// The member whose stream is made long.
const LONG_STREAM_MEMBER_INDEX: usize = 0;
/// Each `RecordUsage` appends `UsageRecorded` and `CreditsDeducted`.
const EVENTS_PER_USAGE: u64 = 2;
const USAGE_METRIC: &str = "api_calls";

#[derive(Parser, Debug)]
#[command(
    name = "tally-startup",
    about = "Start-up time and resident memory of `tally serve` over a large generated log"
)]
struct Args {
    /// The data directory: generated into when it holds fewer than `--events` events, kept afterwards.
    #[arg(long, default_value = "target/startup-10m")]
    dir: PathBuf,
    /// Events the log holds at least.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..=EVENTS_MAX))]
    events: u64,
    /// Members, `m000000` …, each funded with one promotional grant.
    #[arg(long, default_value_t = 100_000, value_parser = parse_members)]
    members: usize,
    /// Members sent one first command each after the first start; all by default.
    #[arg(long)]
    touch: Option<usize>,
    /// Events of member `m000000`'s stream, about, made during generation (0: a stream like the others).
    #[arg(long, default_value_t = 100_000)]
    long_stream_events: u64,
    /// The tally binary (`cargo build --release -p tally-cli`).
    #[arg(long, default_value = "target/release/tally")]
    tally: PathBuf,
    /// Loopback port the measured servers listen on.
    #[arg(long, default_value_t = 18_383)]
    port: u16,
    /// Admin key given to the server and sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "TALLY_ADMIN_KEY", hide_env_values = true, default_value = "startup-admin-key")]
    admin_key: String,
    /// Generation's submitter threads: enough for large group-commit batches.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=SUBMITTERS_MAX))]
    submitters: u64,
    /// Concurrent HTTP clients (one thread and one keep-alive connection each) sending first commands.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=CLIENTS_MAX))]
    clients: u64,
    /// Rebuild the read models even when the log was reused and `projections.db` exists.
    #[arg(long)]
    rebuild: bool,
}

fn parse_members(text: &str) -> Result<usize, String> {
    let members: usize = text.parse().map_err(|error| format!("{error}"))?;
    // Two members at least: one is measured alone as the first command after start, one has the long stream.
    if !(2..=MEMBERS_MAX).contains(&members) {
        return Err(format!("must be 2 to {MEMBERS_MAX}"));
    }
    Ok(members)
}

fn member_id(index: usize) -> String {
    format!("m{index:06}")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let touch = args.touch.unwrap_or(args.members);
    ensure!((2..=args.members).contains(&touch), "--touch must be 2 to --members ({})", args.members);
    ensure!(args.tally.is_file(), "{} does not exist: cargo build --release -p tally-cli", args.tally.display());
    let dir = args.dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut table = Table::default();

    let generation = generate(&args, &dir)?;
    let rebuild = if generation.generated || args.rebuild || !dir.join(PROJECTIONS_FILE).exists() {
        Some(rebuild_read_models(&args.tally, &dir)?)
    } else {
        eprintln!("read models exist and the log was reused: no rebuild (pass --rebuild to force one)");
        None
    };
    let log = LogFacts::read(&dir, args.members)?;
    table.log_rows(&args, &log, &generation, rebuild.as_ref());

    let reference = measure_empty_start(&args)?;
    table.row("start-up, empty data directory (reference)", reference.describe());

    let admin = AdminClient::new(&args)?;
    let server = Server::start(&args, &dir, "first")?;
    table.row("start-up 1 (first start after generation and rebuild)", server.start_up.describe());
    let after_start = server.memory()?;
    table.row("RSS right after start-up 1", after_start.describe());

    let touched = touch_members(&admin, &args, touch)?;
    let after_touch = server.memory()?;
    table.touch_rows(&args, &log, &touched);
    table.row(&format!("RSS after touching {} members", thousands(touch as u64)), after_touch.describe());
    table.row(
        "RSS growth per touched member (SQLite page caches filling included)",
        format!(
            "{:.1} KiB",
            after_touch.rss_kib.saturating_sub(after_start.rss_kib) as f64 / touched.first_commands.len() as f64
        ),
    );
    let stopped = server.stop()?;
    table.row("stop 1 (SIGTERM → exit)", milliseconds(stopped));

    let server = Server::start(&args, &dir, "second")?;
    table.row("start-up 2 (warm page cache)", server.start_up.describe());
    table.row("RSS right after start-up 2", server.memory()?.describe());
    let stopped = server.stop()?;
    table.row("stop 2 (SIGTERM → exit)", milliseconds(stopped));
    table.row(
        "member cache bound",
        format!(
            "{} states (`LedgerOptions::default().member_cache_max`; `tally serve` has no flag for it)",
            thousands(LedgerOptions::default().member_cache_max as u64)
        ),
    );
    table.print();
    Ok(())
}

/// What generation did: nothing when the log was already large enough.
struct Generation {
    generated: bool,
    events_before: u64,
    events_after: u64,
    elapsed: Duration,
}

fn generate(args: &Args, dir: &Path) -> Result<Generation> {
    let events_path = dir.join(EVENTS_FILE);
    let events_before = if events_path.exists() { EventReader::open(&events_path)?.head()?.position } else { 0 };
    if events_before >= args.events {
        eprintln!("{} holds {} events: generation skipped", events_path.display(), thousands(events_before));
        return Ok(Generation {
            generated: false,
            events_before,
            events_after: events_before,
            elapsed: Duration::ZERO,
        });
    }
    eprintln!(
        "generating {} events of {} members into {} ({} already there)",
        thousands(args.events),
        thousands(args.members as u64),
        events_path.display(),
        thousands(events_before)
    );
    let started = Instant::now();
    let mut options = LedgerOptions::default();
    options.store.synchronous_full = false;
    let ledger = Arc::new(Ledger::open(&events_path, options, Arc::new(SystemClock))?);
    let reader = ledger.reader()?;

    let members = args.members;
    let next_member = AtomicUsize::new(0);
    run_submitters(args.submitters, &reader, args.events, "funding", || {
        loop {
            let index = next_member.fetch_add(1, Ordering::Relaxed);
            if index >= members {
                return Ok(());
            }
            let member = member_id(index);
            execute(&ledger, &member, grant_request(&member)).with_context(|| format!("funding {member}"))?;
        }
    })?;

    let head = reader.head()?.position;
    let usages_needed = args.events.saturating_sub(head).div_ceil(EVENTS_PER_USAGE);
    let long_stream_every = long_stream_every(usages_needed, args.long_stream_events);
    let next_usage = AtomicU64::new(0);
    run_submitters(args.submitters, &reader, args.events, "usage", || {
        loop {
            let usage_index = next_usage.fetch_add(1, Ordering::Relaxed);
            if usage_index >= usages_needed {
                return Ok(());
            }
            let member = member_id(usage_member(usage_index, members, long_stream_every));
            execute(&ledger, &member, usage_request(&member)).with_context(|| format!("usage for {member}"))?;
        }
    })?;
    drop(reader);
    Arc::into_inner(ledger).context("the ledger is still shared after generation")?.shutdown();

    let events_after = EventReader::open(&events_path)?.head()?.position;
    let elapsed = started.elapsed();
    eprintln!(
        "generated {} events in {:.1} s ({} events/s)",
        thousands(events_after - events_before),
        elapsed.as_secs_f64(),
        thousands(per_second(events_after - events_before, elapsed))
    );
    Ok(Generation { generated: true, events_before, events_after, elapsed })
}

/// One usage command in `every` goes to the long-stream member, so that its
/// stream gets about `long_stream_events` events; `None` when none should.
fn long_stream_every(usages_needed: u64, long_stream_events: u64) -> Option<u64> {
    let long_stream_usages = long_stream_events / EVENTS_PER_USAGE;
    if long_stream_usages == 0 {
        return None;
    }
    Some((usages_needed / long_stream_usages).max(1))
}

fn usage_member(usage_index: u64, members: usize, long_stream_every: Option<u64>) -> usize {
    match long_stream_every {
        Some(every) if usage_index.is_multiple_of(every) => LONG_STREAM_MEMBER_INDEX,
        _ => (usage_index % members as u64) as usize,
    }
}

/// Runs `submit` on `submitters` threads and reports the log's head every
/// few seconds until they all return.
fn run_submitters(
    submitters: u64,
    reader: &EventReader,
    events_target: u64,
    phase: &str,
    submit: impl Fn() -> Result<()> + Sync,
) -> Result<()> {
    let phase_started = Instant::now();
    let head_at_start = reader.head()?.position;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..submitters).map(|_| scope.spawn(&submit)).collect();
        let mut last_report = (Instant::now(), head_at_start);
        while !handles.iter().all(|handle| handle.is_finished()) {
            std::thread::sleep(JOIN_POLL_INTERVAL);
            if last_report.0.elapsed() >= PROGRESS_INTERVAL {
                let head = reader.head()?.position;
                let since_last = last_report.0.elapsed();
                eprintln!(
                    "  {phase}: {} / {} events, {} events/s now, {} events/s since the phase began",
                    thousands(head),
                    thousands(events_target),
                    thousands(per_second(head - last_report.1, since_last)),
                    thousands(per_second(head - head_at_start, phase_started.elapsed()))
                );
                last_report = (Instant::now(), head);
            }
        }
        for handle in handles {
            handle.join().map_err(|_| anyhow::anyhow!("a {phase} submitter panicked"))??;
        }
        Ok(())
    })
}

/// Executes, waiting and trying again while the writer's queue is full.
fn execute(ledger: &Ledger, member: &str, request: Request<MemberCommand>) -> Result<()> {
    loop {
        match ledger.execute(member, request.clone()) {
            Ok(_) => return Ok(()),
            Err(LedgerError::Overloaded { .. }) => std::thread::sleep(OVERLOADED_BACKOFF),
            Err(error) => return Err(error.into()),
        }
    }
}

/// The idempotency record the HTTP API would write: scope
/// `principal/member/route`; the fingerprint only has to be stable per key.
fn idempotency(member: &str, route: &str, key: String) -> Idempotency {
    let fingerprint: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    Idempotency { scope: format!("admin/{member}/{route}"), key, fingerprint, status: 201 }
}

fn grant_request(member: &str) -> Request<MemberCommand> {
    let command = MemberCommand::GrantCredits(GrantCredits::new(GrantSource::Promotional, FUNDING_CREDITS));
    Request::new(command, "admin").with_idempotency(idempotency(member, "credits.grant", format!("fund-{member}")))
}

fn usage_request(member: &str) -> Request<MemberCommand> {
    let usage_id = Uuid::now_v7().to_string();
    let command = MemberCommand::RecordUsage(RecordUsage {
        usage_id: usage_id.clone(),
        metric: USAGE_METRIC.to_owned(),
        quantity: 1,
        credits: Credits(1),
        occurred_at: None,
        integration_id: None,
        query_id: None,
    });
    Request::new(command, "admin").with_idempotency(idempotency(member, "usage", usage_id))
}

struct Rebuild {
    elapsed: Duration,
    events: u64,
    /// What `tally projections rebuild` printed.
    summary: String,
}

fn rebuild_read_models(tally: &Path, dir: &Path) -> Result<Rebuild> {
    let events = EventReader::open(&dir.join(EVENTS_FILE))?.head()?.position;
    eprintln!("building the read models: tally --data-dir {} projections rebuild --all", dir.display());
    let started = Instant::now();
    let output = Command::new(tally)
        .arg("--data-dir")
        .arg(dir)
        .args(["projections", "rebuild", "--all"])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", tally.display()))?;
    let elapsed = started.elapsed();
    let summary = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    ensure!(output.status.success(), "the rebuild failed ({}): {summary}", output.status);
    eprintln!("{summary}");
    Ok(Rebuild { elapsed, events, summary })
}

/// The log as the measured servers find it.
struct LogFacts {
    events: u64,
    members: usize,
    long_stream_version: u64,
    /// Rows of the `snapshots` table, if the log has one.
    snapshots: Option<u64>,
    events_bytes: u64,
    projections_bytes: u64,
}

impl LogFacts {
    fn read(dir: &Path, members: usize) -> Result<LogFacts> {
        let events_path = dir.join(EVENTS_FILE);
        let connection = Connection::open_with_flags(&events_path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let events = count(&connection, "SELECT coalesce(max(position), 0) FROM events", [])?;
        let long_stream_version = count(
            &connection,
            "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = ?1",
            [member_stream(&member_id(LONG_STREAM_MEMBER_INDEX))],
        )?;
        let has_snapshots = count(
            &connection,
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'snapshots')",
            [],
        )? == 1;
        let snapshots =
            if has_snapshots { Some(count(&connection, "SELECT count(*) FROM snapshots", [])?) } else { None };
        Ok(LogFacts {
            events,
            members,
            long_stream_version,
            snapshots,
            events_bytes: database_bytes(&events_path),
            projections_bytes: database_bytes(&dir.join(PROJECTIONS_FILE)),
        })
    }
}

/// A query answering one non-negative integer.
fn count(connection: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<u64> {
    let value: i64 = connection.query_row(sql, params, |row| row.get(0))?;
    u64::try_from(value).with_context(|| format!("{sql} answered {value}"))
}

/// A SQLite file with its write-ahead log.
fn database_bytes(path: &Path) -> u64 {
    let size = |path: &Path| std::fs::metadata(path).map(|metadata| metadata.len()).unwrap_or(0);
    size(path) + size(&PathBuf::from(format!("{}-wal", path.display())))
}

struct StartUp {
    /// Spawn → the first HTTP answer of any status (the server listens).
    first_answer: Duration,
    /// Spawn → the first `200` from `/readyz`.
    ready: Duration,
}

impl StartUp {
    fn describe(&self) -> String {
        format!("{} (listening after {})", milliseconds(self.ready), milliseconds(self.first_answer))
    }
}

struct Server {
    child: Child,
    start_up: StartUp,
}

impl Server {
    fn start(args: &Args, dir: &Path, label: &str) -> Result<Server> {
        let address = SocketAddr::from(([127, 0, 0, 1], args.port));
        // A server left over on the port would answer for this one.
        drop(TcpListener::bind(address).with_context(|| format!("port {} is in use", args.port))?);
        let log_path = dir.join(format!("startup-serve-{label}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let poller = Client::builder().timeout(READY_REQUEST_TIMEOUT).no_proxy().build()?;
        let ready_url = format!("http://{address}/readyz");
        eprintln!("starting tally serve on {} ({label})", dir.display());
        let started = Instant::now();
        let mut child = Command::new(&args.tally)
            .arg("--data-dir")
            .arg(dir)
            .args(["serve", "--addr", &address.to_string()])
            .env("TALLY_ADMIN_KEY", &args.admin_key)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", args.tally.display()))?;
        let mut first_answer = None;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("tally serve exited during start-up ({status}); see {}", log_path.display());
            }
            if started.elapsed() > READY_TIMEOUT {
                let _ = child.kill();
                bail!("tally serve was not ready after {READY_TIMEOUT:?}; see {}", log_path.display());
            }
            if let Ok(response) = poller.get(&ready_url).send() {
                first_answer.get_or_insert_with(|| started.elapsed());
                if response.status() == StatusCode::OK {
                    let ready = started.elapsed();
                    let first_answer = first_answer.unwrap_or(ready);
                    return Ok(Server { child, start_up: StartUp { first_answer, ready } });
                }
            }
            std::thread::sleep(READY_POLL_INTERVAL);
        }
    }

    fn memory(&self) -> Result<Memory> {
        Memory::of(self.child.id())
    }

    /// SIGTERM, then waits for the exit; how long that took.
    fn stop(mut self) -> Result<Duration> {
        let started = Instant::now();
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        ensure!(sent.success(), "kill -TERM {} failed", self.child.id());
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "tally serve exited with {status} after SIGTERM");
                return Ok(started.elapsed());
            }
            if started.elapsed() > STOP_TIMEOUT {
                self.child.kill()?;
                self.child.wait()?;
                bail!("tally serve did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed");
            }
            std::thread::sleep(READY_POLL_INTERVAL);
        }
    }
}

impl Drop for Server {
    /// A failed run must not leave a server holding the port and the read models' lock.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A start on an empty data directory, removed afterwards: start-up work
/// that does not depend on the log.
fn measure_empty_start(args: &Args) -> Result<StartUp> {
    let dir = args.dir.with_file_name(format!("tally-startup-empty-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let server = Server::start(args, &dir, "empty");
    let result = server.and_then(|server| {
        let start_up = StartUp { first_answer: server.start_up.first_answer, ready: server.start_up.ready };
        server.stop()?;
        Ok(start_up)
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// From `/proc/PID/status`, in KiB.
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> Result<u64> {
            let line = status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .with_context(|| format!("{path} has no {name}"))?;
            let kib = line.trim().trim_end_matches("kB").trim();
            kib.parse().with_context(|| format!("{path}: {name} is {line:?}"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS")?,
            hwm_kib: field("VmHWM")?,
            anon_kib: field("RssAnon")?,
            file_kib: field("RssFile")?,
        })
    }

    fn describe(&self) -> String {
        format!(
            "VmRSS {} (anon {}, file {}), VmHWM {}",
            mebibytes(self.rss_kib * 1_024),
            mebibytes(self.anon_kib * 1_024),
            mebibytes(self.file_kib * 1_024),
            mebibytes(self.hwm_kib * 1_024)
        )
    }
}

/// Blocking HTTP clients with the admin key, one per thread.
struct AdminClient {
    headers: HeaderMap,
    base: String,
    /// Unique per run, so usage ids and idempotency keys never repeat on a reused log.
    run_id: String,
}

impl AdminClient {
    fn new(args: &Args) -> Result<AdminClient> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", args.admin_key))
            .context("the admin key must be printable ASCII without line breaks")?;
        authorization.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, authorization);
        let base = format!("http://127.0.0.1:{}", args.port);
        Ok(AdminClient { headers, base, run_id: Uuid::now_v7().simple().to_string() })
    }

    fn client(&self) -> Result<Client> {
        Ok(Client::builder()
            .default_headers(self.headers.clone())
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .no_proxy()
            .build()?)
    }

    /// One `POST /v1/members/{id}/usage`; its latency. Anything but 201 fails the run.
    fn record_usage(&self, client: &Client, member: &str, pass: &str) -> Result<Duration> {
        let usage_id = format!("{}-{pass}-{member}", self.run_id);
        // The id holds only hex digits, letters of the member id and '-': no JSON escaping needed.
        let body = format!(r#"{{"usage_id":"{usage_id}","metric":"{USAGE_METRIC}","quantity":1,"credits":1}}"#);
        let url = format!("{}/v1/members/{member}/usage", self.base);
        let started = Instant::now();
        let response = client
            .post(&url)
            .header("Idempotency-Key", &usage_id)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let answer = response.text().with_context(|| format!("reading the answer of POST {url}"))?;
        let latency = started.elapsed();
        ensure!(status == StatusCode::CREATED, "POST {url} answered {status}: {answer}");
        Ok(latency)
    }

    /// Sends one command to each member from `clients` threads; the latencies
    /// and the elapsed time.
    fn record_usage_each(&self, members: &[usize], clients: u64, pass: &str) -> Result<(Vec<Duration>, Duration)> {
        let next = AtomicUsize::new(0);
        let started = Instant::now();
        let latencies = std::thread::scope(|scope| -> Result<Vec<Duration>> {
            let handles: Vec<_> = (0..clients)
                .map(|_| {
                    scope.spawn(|| -> Result<Vec<Duration>> {
                        let client = self.client()?;
                        let mut latencies = Vec::new();
                        loop {
                            let Some(member) = members.get(next.fetch_add(1, Ordering::Relaxed)) else {
                                return Ok(latencies);
                            };
                            latencies.push(self.record_usage(&client, &member_id(*member), pass)?);
                        }
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(members.len());
            for handle in handles {
                all.extend(handle.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??);
            }
            Ok(all)
        })?;
        Ok((latencies, started.elapsed()))
    }
}

struct Touched {
    /// The first command after start-up, alone (member `m000001`).
    first_after_start: Duration,
    /// The long-stream member's first command, alone.
    long_stream_first: Duration,
    /// Every other touched member's first command, from concurrent clients.
    first_commands: Vec<Duration>,
    first_commands_elapsed: Duration,
    /// Second commands of some of those members (their state is cached).
    cached_commands: Vec<Duration>,
    cached_commands_elapsed: Duration,
}

fn touch_members(admin: &AdminClient, args: &Args, touch: usize) -> Result<Touched> {
    let client = admin.client()?;
    let first_after_start = admin.record_usage(&client, &member_id(1), "first")?;
    let long_stream_first = admin.record_usage(&client, &member_id(LONG_STREAM_MEMBER_INDEX), "first")?;
    let rest: Vec<usize> = (2..touch).collect();
    eprintln!("first command of {} more members from {} clients …", thousands(rest.len() as u64), args.clients);
    let (first_commands, first_commands_elapsed) = admin.record_usage_each(&rest, args.clients, "first")?;
    let again = &rest[..rest.len().min(CACHED_COMMANDS_MAX)];
    let (cached_commands, cached_commands_elapsed) = admin.record_usage_each(again, args.clients, "second")?;
    Ok(Touched {
        first_after_start,
        long_stream_first,
        first_commands,
        first_commands_elapsed,
        cached_commands,
        cached_commands_elapsed,
    })
}

/// Nearest-rank percentiles, as in tally-load.
fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[index.clamp(1, sorted.len()) - 1]
}

fn latency_summary(latencies: &[Duration], elapsed: Duration, clients: u64) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    format!(
        "p50 {} ms, p99 {} ms, max {} ms ({} commands, {} clients, {} commands/s)",
        milliseconds_bare(percentile(&sorted, 0.50)),
        milliseconds_bare(percentile(&sorted, 0.99)),
        milliseconds_bare(sorted.last().copied().unwrap_or_default()),
        thousands(sorted.len() as u64),
        clients,
        thousands(per_second(sorted.len() as u64, elapsed))
    )
}

#[derive(Default)]
struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    fn row(&mut self, measure: &str, value: String) {
        eprintln!("  {measure}: {value}");
        self.rows.push((measure.to_owned(), value));
    }

    fn log_rows(&mut self, args: &Args, log: &LogFacts, generation: &Generation, rebuild: Option<&Rebuild>) {
        self.row("log events (head position)", thousands(log.events));
        self.row("members", thousands(log.members as u64));
        self.row(
            "long-stream member m000000",
            format!("{} events in its stream (others: ~{} each)", thousands(log.long_stream_version), {
                let others = log.events.saturating_sub(log.long_stream_version);
                thousands(others / log.members.saturating_sub(1).max(1) as u64)
            }),
        );
        self.row(
            "member snapshots in the log",
            match log.snapshots {
                Some(count) => thousands(count),
                None => "no snapshots table".to_owned(),
            },
        );
        self.row("events.db (+ WAL)", mebibytes(log.events_bytes));
        self.row("projections.db (+ WAL)", mebibytes(log.projections_bytes));
        let generated = generation.events_after - generation.events_before;
        self.row(
            "generation (Ledger, synchronous=NORMAL)",
            if generation.generated {
                format!(
                    "{} events in {:.1} s ({} events/s, {} submitters)",
                    thousands(generated),
                    generation.elapsed.as_secs_f64(),
                    thousands(per_second(generated, generation.elapsed)),
                    args.submitters
                )
            } else {
                "skipped (log reused)".to_owned()
            },
        );
        self.row(
            "projection rebuild (`tally projections rebuild --all`)",
            match rebuild {
                Some(rebuild) => format!(
                    "{} events in {:.1} s ({} events/s, wall clock of the command); it printed: {}",
                    thousands(rebuild.events),
                    rebuild.elapsed.as_secs_f64(),
                    thousands(per_second(rebuild.events, rebuild.elapsed)),
                    rebuild.summary.replace('|', "/")
                ),
                None => "skipped (read models existed)".to_owned(),
            },
        );
    }

    fn touch_rows(&mut self, args: &Args, log: &LogFacts, touched: &Touched) {
        self.row("first command after start-up (m000001, alone)", milliseconds(touched.first_after_start));
        self.row(
            &format!("first command, long-stream member ({} events, alone)", thousands(log.long_stream_version)),
            milliseconds(touched.long_stream_first),
        );
        self.row(
            "first command per member (stream loaded from the log)",
            latency_summary(&touched.first_commands, touched.first_commands_elapsed, args.clients),
        );
        self.row(
            "second command per member (state cached)",
            latency_summary(&touched.cached_commands, touched.cached_commands_elapsed, args.clients),
        );
    }

    fn print(&self) {
        println!();
        println!("| measure | value |");
        println!("|---|---|");
        for (measure, value) in &self.rows {
            println!("| {measure} | {value} |");
        }
        let _ = std::io::stdout().flush();
    }
}

fn per_second(count: u64, elapsed: Duration) -> u64 {
    (count as f64 / elapsed.as_secs_f64().max(1e-9)).round() as u64
}

fn milliseconds_bare(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1_000.0)
}

fn milliseconds(duration: Duration) -> String {
    format!("{} ms", milliseconds_bare(duration))
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1_024.0 * 1_024.0))
}
