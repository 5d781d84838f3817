//! The command path: a single writer with group commit.
//!
//! One thread owns the write connection. It drains the queued commands,
//! decides each against the member's in-memory state, appends every
//! accepted command's events in one transaction and commits once. The WAL
//! is then fsynced (one fsync for every batch committed since the last) and
//! only then are the batch's callers answered: by a second thread, the
//! syncer, while the writer goes on with the next batch, when more work is
//! waiting and the syncer is idle; by the writer itself otherwise (see
//! `Writer::answer_when_durable` and `store/durability.rs`). A rejected
//! command writes nothing: it is refused before it writes. A batch runs
//! without savepoints; if a command fails after it wrote, the batch is
//! rolled back and run again with a SAVEPOINT per command, which undoes
//! that command alone (see `Writer::run_batch`).
//!
//! The in-memory states are a cache: every append still names the stream's
//! expected version, so a second process writing the same file (the CLI
//! beside a running server) makes the append conflict, and the writer
//! reloads that member and decides again.

use crate::codec::{self, CodecError};
use crate::domain::*;
use crate::store::{
    Batch, CheckpointOptions, CheckpointStats, EventMetadata, EventReader, EventStore, ExpectedVersion,
    IdempotencyRecord, NewEvent, Snapshot, StoreError, StoreOptions, VisibleHead, WalSync,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError, channel, sync_channel};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;
use uuid::Uuid;

/// The source of `now` for the writer. Pure code never reads a clock; the
/// shell asks this one, so tests and `--test-clock` can drive time.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to: tests and `serve --test-clock`.
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock { now: Mutex::new(start) }
    }

    /// Move the clock to `to`; refused (returns false) if that is earlier.
    pub fn advance_to(&self, to: DateTime<Utc>) -> bool {
        let mut now = self.now.lock().expect("clock lock");
        if to < *now {
            return false;
        }
        *now = to;
        true
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("clock lock")
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LedgerOptions {
    pub store: StoreOptions,
    /// The most commands one transaction (one fsync) carries.
    pub batch_commands_max: usize,
    /// Commands waiting for the writer before submitters get `Overloaded`.
    pub queue_commands_max: usize,
    /// Member states kept in memory; beyond it, states are evicted and
    /// reloaded from the log when next needed.
    pub member_cache_max: usize,
    /// Reload-and-decide-again attempts after a version conflict.
    pub conflict_retries_max: u32,
    /// A member's state is snapshotted every this many events (and when a
    /// load had to replay at least this many), so that loading a member reads
    /// at most about this many events past its snapshot. 0: no snapshots are
    /// read or written (every load replays the whole stream).
    pub snapshot_every: u64,
    /// WAL checkpoints beside the writer (see `store/checkpoint.rs`), or
    /// `None` for SQLite's automatic checkpoint inside the commits.
    pub checkpoints: Option<CheckpointOptions>,
    /// Fsync the WAL on the syncer thread, beside the writer, instead of
    /// inside each `COMMIT` (see `store/durability.rs`). Either way a
    /// command is answered only once its batch is durable; `false` is the
    /// plain `synchronous=FULL` path, kept for comparison in benchmarks.
    pub sync_beside_writer: bool,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            store: StoreOptions::default(),
            batch_commands_max: 512,
            queue_commands_max: 16_384,
            member_cache_max: 100_000,
            conflict_retries_max: 8,
            snapshot_every: 1_000,
            checkpoints: Some(CheckpointOptions::default()),
            sync_beside_writer: true,
        }
    }
}

/// How a command's idempotency key is kept: scoped to (principal, member,
/// route) by the caller, with a fingerprint of the request.
#[derive(Clone, Debug)]
pub struct Idempotency {
    pub scope: String,
    pub key: String,
    pub fingerprint: [u8; 32],
    /// The status the caller answers on success, stored for replays.
    pub status: u16,
}

#[derive(Clone, Debug)]
pub struct Request<C> {
    pub command: C,
    /// `admin`, `member_key:<id>`, `stripe`, `scheduler`.
    pub actor: String,
    pub idempotency: Option<Idempotency>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
}

impl<C> Request<C> {
    pub fn new(command: C, actor: &str) -> Request<C> {
        Request { command, actor: actor.to_owned(), idempotency: None, correlation_id: None, causation_id: None }
    }

    pub fn with_idempotency(mut self, idempotency: Idempotency) -> Request<C> {
        self.idempotency = Some(idempotency);
        self
    }
}

/// A member's money position, as the writer sees it right after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceView {
    pub balance: Credits,
    pub available: Credits,
    pub held: Credits,
    pub debt: Credits,
}

impl BalanceView {
    pub fn of(state: &MemberState) -> BalanceView {
        BalanceView { balance: state.balance(), available: state.available(), held: state.held(), debt: state.debt() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendedEvent {
    pub position: u64,
    pub event: serde_json::Value,
}

/// What an accepted command did. Stored whole as the idempotency record's
/// response, so a retry gets exactly the original answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    pub stream_id: String,
    /// The position of the command's last event, or the log's head when it
    /// wrote none: a read with `min_position` this value sees its effect.
    pub position: u64,
    /// How many events the command appended, time effects included.
    #[serde(default)]
    pub events_appended: u64,
    /// The command's own events (not the time effects run before it).
    pub events: Vec<AppendedEvent>,
    /// For member commands: the balance right after the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<BalanceView>,
}

impl CommandOutcome {
    /// The member events of this outcome, decoded.
    pub fn member_events(&self) -> Vec<MemberEvent> {
        self.events.iter().filter_map(|appended| serde_json::from_value(appended.event.clone()).ok()).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    pub outcome: CommandOutcome,
    /// True when the idempotency key had been used with the same request:
    /// nothing new was written and `outcome` is the original one.
    pub replayed: bool,
    pub status: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A business rule refused the command; nothing was written. Map with
    /// [`DomainError::code`].
    #[error(transparent)]
    Rejected(#[from] DomainError),
    /// The idempotency key was used before with a different request. 409/422
    /// `idempotency_key_reused`; use a new key for a new request.
    #[error("the idempotency key was already used with a different request")]
    IdempotencyKeyReused,
    /// Another writer kept changing the member faster than we could retry.
    /// 409 `version_conflict`; the client may retry.
    #[error("version conflict on {stream_id} after {attempts} attempts")]
    VersionConflict { stream_id: String, attempts: u32 },
    /// The queue is full. 503; retry with backoff.
    #[error("the ledger is overloaded: {queued} commands queued")]
    Overloaded { queued: usize },
    /// The writer stopped (shutdown or a fatal error). 503.
    #[error("the ledger writer is not running")]
    Unavailable,
    /// Storage failed; nothing of the command was committed. 503 for busy
    /// or full disks, 500 otherwise.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored event does not decode. 500; run `tally audit verify`.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl LedgerError {
    /// Errors from the storage layer (not the request): the caller should
    /// answer 5xx and may retry.
    pub fn is_storage_failure(&self) -> bool {
        matches!(
            self,
            LedgerError::Store(_) | LedgerError::Codec(_) | LedgerError::Unavailable | LedgerError::Overloaded { .. }
        )
    }
}

/// What a sweep of due work did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    pub members: u64,
    /// Members whose due work failed this round (logged, retried later).
    #[serde(default)]
    pub failures: u64,
    pub events: u64,
    /// The log's head after the sweep.
    pub position: u64,
}

type Reply<T> = SyncSender<Result<T, LedgerError>>;

/// A queued job. `Sync` does nothing but is answered, like every job, only
/// once everything committed before it is durable.
enum Job {
    Member {
        member_id: String,
        request: Request<MemberCommand>,
        reply: Reply<Executed>,
    },
    Catalog {
        request: Request<CatalogCommand>,
        reply: Reply<Executed>,
    },
    Intake {
        request: Request<IntakeEvent>,
        reply: Reply<Executed>,
    },
    Integration {
        member_id: String,
        integration_id: String,
        request: Request<IntegrationCommand>,
        reply: Reply<Executed>,
    },
    Check {
        member_id: String,
        credits: Credits,
        reply: Reply<CheckOutcome>,
    },
    State {
        member_id: String,
        reply: Reply<MemberState>,
    },
    Sweep {
        members_max: usize,
        reply: Reply<SweepReport>,
    },
    Sync {
        reply: Reply<()>,
    },
}

/// The embedded ledger: submit commands from any thread; one writer thread
/// applies them.
pub struct Ledger {
    jobs: Option<SyncSender<Job>>,
    writer: Option<JoinHandle<()>>,
    catalog: Arc<RwLock<Arc<Catalog>>>,
    clock: Arc<dyn Clock>,
    path: PathBuf,
    stats: Arc<WriterStats>,
    checkpoint_stats: Option<Arc<CheckpointStats>>,
    durable: Arc<Durable>,
    visible: Arc<VisibleHead>,
    /// Readers kept for reuse: opening a connection costs more than most
    /// reads do (a query execution reads twice before it reserves).
    readers: Arc<Mutex<Vec<EventReader>>>,
}

/// Idle readers a [`Ledger`] keeps.
const READERS_IDLE_MAX: usize = 16;

/// A reader of the log, returned to its ledger's pool when dropped.
pub struct PooledReader {
    reader: Option<EventReader>,
    pool: Arc<Mutex<Vec<EventReader>>>,
}

impl std::ops::Deref for PooledReader {
    type Target = EventReader;

    fn deref(&self) -> &EventReader {
        self.reader.as_ref().expect("a reader until dropped")
    }
}

impl std::ops::DerefMut for PooledReader {
    fn deref_mut(&mut self) -> &mut EventReader {
        self.reader.as_mut().expect("a reader until dropped")
    }
}

impl Drop for PooledReader {
    fn drop(&mut self) {
        let Some(reader) = self.reader.take() else { return };
        // One left inside a transaction (a read that failed midway) is not reused.
        if reader.is_idle() {
            let mut idle = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if idle.len() < READERS_IDLE_MAX {
                idle.push(reader);
            }
        }
    }
}

/// Counters of the writer's work, for metrics: how well group commit batches.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub jobs: AtomicU64,
    pub failed_commits: AtomicU64,
    /// The size of the last batch, in jobs.
    pub last_batch_jobs: AtomicU64,
    /// Time spent running batches (deciding, appending, indexing, committing),
    /// and the part of it spent in `COMMIT`, in nanoseconds. `COMMIT` writes
    /// the WAL; its fsync is the syncer's (`sync_nanos`), beside the writer.
    pub batch_nanos: AtomicU64,
    pub commit_nanos: AtomicU64,
    /// Batches run a second time with a savepoint per command, because a
    /// command failed after writing in the first, savepoint-free run.
    pub replayed_batches: AtomicU64,
    /// Syncer rounds, each one fsync of the WAL covering every batch
    /// committed before it began (no fsync when the store promised none, or
    /// when `COMMIT` fsyncs itself), and the time they took, in nanoseconds.
    pub syncs: AtomicU64,
    pub sync_nanos: AtomicU64,
}

/// What the syncer has made durable, shared with the ledger's callers.
#[derive(Debug, Default)]
struct Durable {
    /// Batches sent to `COMMIT` (counted before it), and how many of them
    /// the last fsync covered: equal when nothing this ledger committed is
    /// waiting for an fsync.
    commits: AtomicU64,
    synced_commits: AtomicU64,
    /// Set once an fsync failed: the writer refuses every batch after it.
    failure: Mutex<Option<String>>,
}

impl Durable {
    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn fail(&self, message: String) {
        self.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get_or_insert(message);
    }

    /// True while a batch this ledger committed waits for its fsync.
    fn unsynced(&self) -> bool {
        self.commits.load(Ordering::SeqCst) > self.synced_commits.load(Ordering::SeqCst)
    }
}

/// The error every command gets once an fsync failed: it may or may not
/// have been written, and nothing after it will be.
fn sync_failure(message: &str) -> LedgerError {
    LedgerError::Store(StoreError::Corrupt(format!(
        "an fsync of the event log failed, so its last commits may not be on disk; the writer has stopped: \
         restart tally, then retry with the same idempotency key ({message})"
    )))
}

impl Ledger {
    pub fn open(path: &Path, options: LedgerOptions, clock: Arc<dyn Clock>) -> Result<Ledger, LedgerError> {
        let mut store = EventStore::open(path, options.store)?;
        let checkpoint_stats =
            options.checkpoints.map(|checkpoints| store.checkpoint_in_background(checkpoints)).transpose()?;
        let wal_sync = if options.sync_beside_writer { store.sync_wal_beside()? } else { store.sync_wal_in_commit() };
        let reader = store.reader()?;
        let catalog = load_catalog(&reader)?;
        let last_now =
            reader.read_all(reader.head()?.position.saturating_sub(1), 1)?.first().map(|event| event.recorded_at);
        let catalog = Arc::new(RwLock::new(Arc::new(catalog)));
        let (jobs, queue) = sync_channel(options.queue_commands_max);
        let stats = Arc::new(WriterStats::default());
        let durable = Arc::new(Durable::default());
        let visible = Arc::new(VisibleHead::default());
        // What is in the file at open is durable (SQLite recovered it).
        visible.synced(store.head().position);
        let (committed, batches) = channel();
        let sync = Arc::new(Syncer {
            busy: std::sync::atomic::AtomicBool::new(false),
            wal: wal_sync,
            durable: durable.clone(),
            visible: visible.clone(),
            stats: stats.clone(),
            published_catalog: catalog.clone(),
        });
        let syncer = std::thread::Builder::new()
            .name("tally-sync".to_owned())
            .spawn({
                let sync = Arc::clone(&sync);
                move || sync.run(batches)
            })
            .map_err(|error| StoreError::Corrupt(format!("cannot start the syncer thread: {error}")))?;
        let mut writer = Writer {
            stats: stats.clone(),
            durable: durable.clone(),
            visible: visible.clone(),
            sync,
            syncer: Some((committed, syncer)),
            next_job: None,
            store,
            options,
            clock: clock.clone(),
            last_now: last_now.unwrap_or(DateTime::<Utc>::MIN_UTC),
            members: HashMap::new(),
            catalog: Arc::clone(&catalog.read().expect("catalog lock")),
            handed_catalog: Arc::clone(&catalog.read().expect("catalog lock")),
        };
        let writer = std::thread::Builder::new()
            .name("tally-writer".to_owned())
            .spawn(move || writer.run(queue))
            .map_err(|error| StoreError::Corrupt(format!("cannot start the writer thread: {error}")))?;
        Ok(Ledger {
            jobs: Some(jobs),
            writer: Some(writer),
            catalog,
            clock,
            path: path.to_owned(),
            stats,
            checkpoint_stats,
            durable,
            visible,
            readers: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// What the background WAL checkpoints did (`None` when SQLite's
    /// automatic checkpoint runs instead).
    pub fn checkpoint_stats(&self) -> Option<&CheckpointStats> {
        self.checkpoint_stats.as_deref()
    }

    /// The log's head as of the last fsync: every command this
    /// ledger answered is at or below it.
    pub fn durable_position(&self) -> u64 {
        self.visible.synced_through()
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// A read connection on the log, an idle one of the pool or a new one;
    /// back to the pool when dropped (unless left inside a transaction). It
    /// never returns an event of a batch this ledger committed but has not
    /// yet fsynced. Each read is its own snapshot of the log (autocommit),
    /// as on a new connection.
    pub fn reader(&self) -> Result<PooledReader, LedgerError> {
        let idle = self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let reader = match idle {
            Some(reader) => reader,
            None => {
                let mut reader = EventReader::open(&self.path)?;
                reader.hide_unsynced(self.visible_head());
                reader
            }
        };
        Ok(PooledReader { reader: Some(reader), pool: Arc::clone(&self.readers) })
    }

    /// How far readers of this process may read the log: hand it to
    /// [`EventReader::hide_unsynced`] (the projection runner does).
    pub fn visible_head(&self) -> Arc<VisibleHead> {
        Arc::clone(&self.visible)
    }

    /// The catalog as of the last committed batch.
    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog.read().expect("catalog lock"))
    }

    fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, LedgerError> {
        let (reply, answer) = sync_channel(1);
        let jobs = self.jobs.as_ref().ok_or(LedgerError::Unavailable)?;
        match jobs.try_send(make(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(LedgerError::Overloaded { queued: 0 }),
            Err(TrySendError::Disconnected(_)) => return Err(LedgerError::Unavailable),
        }
        answer.recv().map_err(|_| LedgerError::Unavailable)?
    }

    /// Decide and durably append a member command. Returns once its batch
    /// is committed and the WAL fsynced after it.
    pub fn execute(&self, member_id: &str, request: Request<MemberCommand>) -> Result<Executed, LedgerError> {
        self.submit(|reply| Job::Member { member_id: member_id.to_owned(), request, reply })
    }

    /// Decide and durably append many member commands, each on its own:
    /// one refused command refuses only itself. All are queued before any
    /// answer is awaited, so they ride the writer's group commits together
    /// (at most `batch_commands_max` to a commit). Answers come in the
    /// order of `commands`; a command the full queue could not take is
    /// `Overloaded` and was not run.
    pub fn execute_many(&self, commands: Vec<(String, Request<MemberCommand>)>) -> Vec<Result<Executed, LedgerError>> {
        let Some(jobs) = self.jobs.as_ref() else {
            return commands.iter().map(|_| Err(LedgerError::Unavailable)).collect();
        };
        let answers: Vec<Result<Receiver<Result<Executed, LedgerError>>, LedgerError>> = commands
            .into_iter()
            .map(|(member_id, request)| {
                let (reply, answer) = sync_channel(1);
                match jobs.try_send(Job::Member { member_id, request, reply }) {
                    Ok(()) => Ok(answer),
                    Err(TrySendError::Full(_)) => Err(LedgerError::Overloaded { queued: 0 }),
                    Err(TrySendError::Disconnected(_)) => Err(LedgerError::Unavailable),
                }
            })
            .collect();
        answers
            .into_iter()
            .map(|answer| answer.and_then(|answer| answer.recv().map_err(|_| LedgerError::Unavailable)?))
            .collect()
    }

    pub fn execute_catalog(&self, request: Request<CatalogCommand>) -> Result<Executed, LedgerError> {
        self.submit(|reply| Job::Catalog { request, reply })
    }

    /// Decide and durably append an integration command (its own stream,
    /// `integration-{member}/{integration}`).
    pub fn execute_integration(
        &self,
        member_id: &str,
        integration_id: &str,
        request: Request<IntegrationCommand>,
    ) -> Result<Executed, LedgerError> {
        self.submit(|reply| Job::Integration {
            member_id: member_id.to_owned(),
            integration_id: integration_id.to_owned(),
            request,
            reply,
        })
    }

    /// An integration's state, folded from its stream as durably written
    /// (read from the file, not through the writer).
    pub fn integration_state(&self, member_id: &str, integration_id: &str) -> Result<IntegrationState, LedgerError> {
        fold_integration(&*self.reader()?, &integration_stream(member_id, integration_id))
    }

    /// A member's integrations in id order, at most `limit` after `after`
    /// (removed ones included: their streams remain), through one reader.
    pub fn integrations_of(
        &self,
        member_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, IntegrationState)>, LedgerError> {
        let reader = self.reader()?;
        let prefix = integration_stream(member_id, "");
        let after = after.map(|integration_id| integration_stream(member_id, integration_id));
        let streams = reader.stream_ids_with_prefix(&prefix, after.as_deref(), limit)?;
        streams
            .into_iter()
            .map(|stream| Ok((stream[prefix.len()..].to_owned(), fold_integration(&reader, &stream)?)))
            .collect()
    }

    /// Record a Stripe event that changed no member on the `stripe-intake`
    /// stream (idempotent by the request's key, like a command).
    pub fn record_intake(&self, request: Request<IntakeEvent>) -> Result<Executed, LedgerError> {
        self.submit(|reply| Job::Intake { request, reply })
    }

    /// The recorded answer to a request with this idempotency key, if one
    /// was recorded (`IdempotencyKeyReused` for another body): for callers
    /// that must not start outside work (a call to Stripe) for a retry.
    /// Read from the file, not through the writer.
    /// A record this ledger committed but has not yet fsynced is answered
    /// only after the fsync, like the original command.
    pub fn recorded(&self, idempotency: &Idempotency) -> Result<Option<Executed>, LedgerError> {
        match self.reader()?.idempotency(&idempotency.scope, &idempotency.key)? {
            Some(record) => {
                // The record may be in a batch still waiting for its fsync
                // (one with no events has no position beyond the durable
                // one): then wait for the next fsync.
                if self.durable.unsynced() || record.position > self.durable_position() {
                    self.submit(|reply| Job::Sync { reply })?;
                }
                replayed(idempotency, record).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Would a deduction of `credits` be allowed now? Answered from the
    /// writer's state, never from a read model; writes nothing.
    pub fn check(&self, member_id: &str, credits: Credits) -> Result<CheckOutcome, LedgerError> {
        self.submit(|reply| Job::Check { member_id: member_id.to_owned(), credits, reply })
    }

    /// The member's state as the writer holds it (as of its last event).
    pub fn member_state(&self, member_id: &str) -> Result<MemberState, LedgerError> {
        self.submit(|reply| Job::State { member_id: member_id.to_owned(), reply })
    }

    /// Run what fell due up to now for every member with due work: renewals,
    /// allocations, rollovers, expiries, reservation timeouts. Loops until
    /// nothing is due, each round one batch of at most `members_max` members.
    pub fn run_due(&self) -> Result<SweepReport, LedgerError> {
        let mut total = SweepReport::default();
        loop {
            let round = self.submit(|reply| Job::Sweep { members_max: 256, reply })?;
            total.members += round.members;
            total.events += round.events;
            total.failures += round.failures;
            total.position = round.position;
            if round.members == 0 {
                return Ok(total);
            }
        }
    }

    /// Stop accepting commands, let the writer finish what is queued, and
    /// wait for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.stop();
    }
}

fn load_catalog(reader: &EventReader) -> Result<Catalog, LedgerError> {
    let mut catalog = Catalog::default();
    for recorded in reader.stream_events(CATALOG_STREAM, None, 1_000) {
        catalog.apply(&codec::decode_catalog(&recorded?)?);
    }
    Ok(catalog)
}

struct Writer {
    stats: Arc<WriterStats>,
    durable: Arc<Durable>,
    /// Marks each batch before its commit, until the syncer's fsync.
    visible: Arc<VisibleHead>,
    /// What completes a committed batch: the writer's own, when nothing
    /// else is waiting, and the syncer thread's otherwise.
    sync: Arc<Syncer>,
    /// Where committed batches wait for their fsync, and the thread that
    /// takes them there (joined when the writer stops).
    syncer: Option<(Sender<Committed>, JoinHandle<()>)>,
    /// A job taken from the queue to see whether more work was waiting: the
    /// first of the next batch.
    next_job: Option<Job>,
    store: EventStore,
    options: LedgerOptions,
    clock: Arc<dyn Clock>,
    /// `now` never goes back: a clock that steps back never rejects commands.
    last_now: DateTime<Utc>,
    members: HashMap<String, MemberState>,
    catalog: Arc<Catalog>,
    /// The catalog last handed to the syncer, which publishes it (for
    /// `Ledger::catalog`) once its batch is durable.
    handed_catalog: Arc<Catalog>,
}

/// An answer to send once the batch's fate is known.
enum Pending {
    Executed(Reply<Executed>, Box<Result<Executed, LedgerError>>),
    Checked(Reply<CheckOutcome>, Result<CheckOutcome, LedgerError>),
    State(Reply<MemberState>, Result<Box<MemberState>, LedgerError>),
    Swept(Reply<SweepReport>, Result<SweepReport, LedgerError>),
    Synced(Reply<()>, Result<(), LedgerError>),
}

impl Pending {
    fn send(self) {
        // A caller that gave up waiting is not an error of the ledger, so
        // failed sends are ignored.
        match self {
            Pending::Executed(reply, result) => drop(reply.send(*result)),
            Pending::Checked(reply, result) => drop(reply.send(result)),
            Pending::State(reply, result) => drop(reply.send(result.map(|state| *state))),
            Pending::Swept(reply, result) => drop(reply.send(result)),
            Pending::Synced(reply, result) => drop(reply.send(result)),
        }
    }

    /// The same answer slot, now carrying the batch's storage failure.
    fn failed(self, error: &StoreError) -> Pending {
        self.failed_with(|| LedgerError::Store(same_kind(error)))
    }

    fn failed_with(self, failure: impl Fn() -> LedgerError) -> Pending {
        match self {
            Pending::Executed(reply, _) => Pending::Executed(reply, Box::new(Err(failure()))),
            Pending::Checked(reply, _) => Pending::Checked(reply, Err(failure())),
            Pending::State(reply, _) => Pending::State(reply, Err(failure())),
            Pending::Swept(reply, _) => Pending::Swept(reply, Err(failure())),
            Pending::Synced(reply, _) => Pending::Synced(reply, Err(failure())),
        }
    }
}

/// A committed batch on its way to the syncer: its answers, the head after
/// it, the count of commits so far, and the catalog it changed (if it did).
struct Committed {
    answers: Vec<Pending>,
    head: u64,
    commits: u64,
    catalog: Option<Arc<Catalog>>,
}

/// Makes committed batches durable and only then lets anyone see them: one
/// fsync of the WAL for all of them, then it unmarks them for readers,
/// publishes their catalog and answers their callers. After a failed fsync
/// nothing is answered as durable again. Its thread takes every batch
/// committed so far while the writer goes on; the writer completes a batch
/// itself when no other job is waiting, which saves the hand-over.
struct Syncer {
    /// True from a hand-over until the thread has completed it.
    busy: std::sync::atomic::AtomicBool,
    wal: WalSync,
    durable: Arc<Durable>,
    visible: Arc<VisibleHead>,
    stats: Arc<WriterStats>,
    published_catalog: Arc<RwLock<Arc<Catalog>>>,
}

impl Syncer {
    fn run(&self, committed: Receiver<Committed>) {
        while let Ok(first) = committed.recv() {
            let mut batches = vec![first];
            batches.extend(committed.try_iter());
            self.complete(batches);
            self.busy.store(false, Ordering::Release);
        }
    }

    /// Both threads may complete batches at once: every mark below only
    /// moves forward.
    fn complete(&self, batches: Vec<Committed>) {
        let started = Instant::now();
        let synced = match self.durable.failure() {
            Some(message) => Err(message),
            None => self.wal.sync().map_err(|error| error.to_string()),
        };
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.stats.sync_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match synced {
            Ok(()) => {
                let head = batches.iter().map(|batch| batch.head).max().unwrap_or(0);
                let commits = batches.iter().map(|batch| batch.commits).max().unwrap_or(0);
                self.durable.synced_commits.fetch_max(commits, Ordering::SeqCst);
                self.visible.synced(head);
                if let Some(catalog) =
                    batches.iter().filter_map(|batch| batch.catalog.as_ref()).max_by_key(|c| c.version)
                {
                    let mut published = self.published_catalog.write().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if catalog.version > published.version {
                        *published = Arc::clone(catalog);
                    }
                }
                batches.into_iter().flat_map(|batch| batch.answers).for_each(Pending::send);
            }
            Err(message) => {
                tracing::error!(%message, "an fsync of the event log failed; the writer stops");
                self.durable.fail(message.clone());
                for answer in batches.into_iter().flat_map(|batch| batch.answers) {
                    answer.failed_with(|| sync_failure(&message)).send();
                }
            }
        }
    }
}

/// A copy of a storage error for every caller of a failed batch: busy and
/// full stay what they are (503, retry), the rest is reported by message.
fn same_kind(error: &StoreError) -> StoreError {
    match error {
        StoreError::Busy => StoreError::Busy,
        StoreError::Full => StoreError::Full,
        other => StoreError::Corrupt(format!("the batch was not committed: {other}")),
    }
}

/// The answer to a job that could not run: every kind of job gets `error`.
fn failed_job(job: &Job, error: LedgerError) -> Pending {
    match job {
        Job::Member { reply, .. }
        | Job::Catalog { reply, .. }
        | Job::Intake { reply, .. }
        | Job::Integration { reply, .. } => Pending::Executed(reply.clone(), Box::new(Err(error))),
        Job::Check { reply, .. } => Pending::Checked(reply.clone(), Err(error)),
        Job::State { reply, .. } => Pending::State(reply.clone(), Err(error)),
        Job::Sweep { reply, .. } => Pending::Swept(reply.clone(), Err(error)),
        Job::Sync { reply } => Pending::Synced(reply.clone(), Err(error)),
    }
}

/// Whether a batch gives its commands savepoints (see [`Writer::run_batch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BatchUndo {
    Optimistic,
    Savepoints,
}

impl Writer {
    fn run(&mut self, queue: Receiver<Job>) {
        loop {
            let first = match self.next_job.take() {
                Some(job) => job,
                None => match queue.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            let mut jobs = vec![first];
            while jobs.len() < self.options.batch_commands_max {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.run_batch(jobs, &queue);
        }
        // The last answers are sent once their fsync is done.
        if let Some((committed, syncer)) = self.syncer.take() {
            drop(committed);
            let _ = syncer.join();
        }
    }

    /// Answers a batch's callers once it is durable. When another job is
    /// waiting, the batch goes to the syncer thread and the writer starts
    /// the next batch during the fsync (the pipeline); when none is, the
    /// writer fsyncs and answers itself, which spares the hand-over's
    /// wake-up on an idle ledger.
    fn answer_when_durable(&mut self, answers: Vec<Pending>, queue: &Receiver<Job>) {
        let head = self.store.head().position;
        let commits = self.durable.commits.load(Ordering::SeqCst);
        let catalog = (!Arc::ptr_eq(&self.catalog, &self.handed_catalog)).then(|| {
            self.handed_catalog = Arc::clone(&self.catalog);
            Arc::clone(&self.catalog)
        });
        let batch = Committed { answers, head, commits, catalog };
        if self.next_job.is_none() {
            self.next_job = queue.try_recv().ok();
        }
        // Hand over only to an idle syncer: with its fsync still running,
        // the writer's own fsync lets the next batch gather the commands
        // that arrive meanwhile, so that a busy ledger makes fewer, larger
        // commits (at most two batches are ever waiting for an fsync).
        let hand_over = self.next_job.is_some()
            && self.sync.busy.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if !hand_over {
            self.sync.complete(vec![batch]);
            return;
        }
        let Some((committed, _)) = &self.syncer else {
            batch.answers.into_iter().for_each(|answer| answer.failed_with(|| LedgerError::Unavailable).send());
            return;
        };
        if let Err(unsent) = committed.send(batch) {
            // The syncer is gone (it panicked): nothing can be made durable,
            // so the writer stops as after a failed fsync.
            tracing::error!("the syncer thread stopped; the writer stops");
            self.durable.fail("the syncer thread stopped".to_owned());
            unsent.0.answers.into_iter().for_each(|answer| answer.failed_with(|| LedgerError::Unavailable).send());
        }
    }

    fn now(&mut self) -> DateTime<Utc> {
        self.last_now = self.last_now.max(self.clock.now());
        self.last_now
    }

    /// Runs one batch and answers its callers. The batch first runs without
    /// savepoints: nearly every command either writes and succeeds, or is
    /// refused before it writes, and neither needs one. Only when a command
    /// fails after writing (a full disk part-way, a broken invariant caught
    /// by a panic after an append) is the whole batch rolled back and run
    /// again with a savepoint per command, which undoes that command alone;
    /// its answers are then the only ones sent.
    fn run_batch(&mut self, jobs: Vec<Job>, queue: &Receiver<Job>) {
        if let Some(message) = self.durable.failure() {
            jobs.iter().for_each(|job| failed_job(job, sync_failure(&message)).send());
            return;
        }
        let started = Instant::now();
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.jobs.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        self.stats.last_batch_jobs.store(jobs.len() as u64, Ordering::Relaxed);
        if jobs.iter().all(|job| matches!(job, Job::Sync { .. })) {
            // Nothing to write: the answers only wait for the next fsync.
            let answers = jobs
                .iter()
                .filter_map(|job| match job {
                    Job::Sync { reply } => Some(Pending::Synced(reply.clone(), Ok(()))),
                    _ => None,
                })
                .collect();
            self.answer_when_durable(answers, queue);
            return;
        }
        let now = self.now();
        let answers = match self.try_batch(&jobs, now, BatchUndo::Optimistic) {
            Some(answers) => answers,
            None => {
                self.stats.replayed_batches.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    jobs = jobs.len(),
                    "a command failed after writing; replaying its batch with savepoints"
                );
                self.try_batch(&jobs, now, BatchUndo::Savepoints)
                    .expect("a batch with savepoints undoes each command and never asks for a replay")
            }
        };
        self.answer_when_durable(answers, queue);
        self.evict_if_needed();
        self.stats.batch_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Runs `jobs` in one transaction and commits it. Returns the answers
    /// to send, or `None` when an optimistic batch had a command fail after
    /// writing: nothing of it was committed, the states it touched are
    /// dropped from the cache, and no caller has been answered.
    fn try_batch(&mut self, jobs: &[Job], now: DateTime<Utc>, undo: BatchUndo) -> Option<Vec<Pending>> {
        let begin: for<'s> fn(&'s mut EventStore) -> Result<Batch<'s>, StoreError> = match undo {
            BatchUndo::Optimistic => EventStore::begin_optimistic_batch,
            BatchUndo::Savepoints => EventStore::begin_batch,
        };
        let mut batch = match begin(&mut self.store) {
            Ok(batch) => batch,
            Err(error) => {
                return Some(jobs.iter().map(|job| failed_job(job, LedgerError::Store(same_kind(&error)))).collect());
            }
        };
        // As `begin` read it from the file: another process may have
        // appended since our last batch.
        let head_before = batch.head().position;
        let mut touched: HashSet<String> = HashSet::new();
        let mut pending = Vec::with_capacity(jobs.len());
        let mut catalog = Arc::clone(&self.catalog);
        let members = &mut self.members;
        let options = &self.options;
        let catalog_ok = refresh_catalog(&mut batch, &mut catalog);
        for job in jobs {
            if let Err(error) = &catalog_ok {
                pending.push(failed_job(job, LedgerError::Store(StoreError::Corrupt(error.to_string()))));
                continue;
            }
            let mut shell = Shell { batch: &mut batch, members, catalog: &mut catalog, options, now };
            pending.push(shell.run_guarded(job, &mut touched));
            if batch.needs_replay_with_savepoints() {
                break;
            }
        }
        if batch.needs_replay_with_savepoints() {
            drop(batch);
            // What we folded into the cache was rolled back with the batch.
            for member_id in &touched {
                self.members.remove(member_id);
            }
            return None;
        }
        let committing = Instant::now();
        let last = batch.head().position;
        if last > head_before {
            // Hidden from this process's readers until its fsync.
            self.visible.committing(head_before + 1, last);
        }
        self.durable.commits.fetch_add(1, Ordering::SeqCst);
        let committed = batch.commit();
        self.stats.commit_nanos.fetch_add(committing.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match committed {
            Ok(()) => {
                // Published by the syncer once durable (`answer_when_durable`).
                self.catalog = catalog;
                Some(pending)
            }
            Err(error) => {
                self.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
                self.visible.not_committed(self.store.head().position);
                // What we folded into the cache never reached the disk.
                for member_id in &touched {
                    self.members.remove(member_id);
                }
                tracing::error!(%error, "batch commit failed; its commands were answered with an error");
                Some(pending.into_iter().map(|answer| answer.failed(&error)).collect())
            }
        }
    }

    fn evict_if_needed(&mut self) {
        if self.members.len() > self.options.member_cache_max {
            let excess = self.members.len() - self.options.member_cache_max / 2;
            let victims: Vec<String> = self.members.keys().take(excess).cloned().collect();
            for member_id in victims {
                self.members.remove(&member_id);
            }
        }
    }
}

/// An integration's state, folded from its stream as the reader sees it.
fn fold_integration(reader: &EventReader, stream_id: &str) -> Result<IntegrationState, LedgerError> {
    let mut state = IntegrationState::default();
    for recorded in reader.stream_events(stream_id, None, STREAM_PAGE_SIZE) {
        let recorded = recorded?;
        state.apply(&codec::decode_integration(&recorded)?, recorded.recorded_at);
    }
    Ok(state)
}

/// The catalog may have been changed by another process: compare versions.
fn refresh_catalog(batch: &mut Batch<'_>, catalog: &mut Arc<Catalog>) -> Result<(), LedgerError> {
    if batch.stream_version(CATALOG_STREAM)? == catalog.version {
        return Ok(());
    }
    let mut fresh = Catalog::default();
    loop {
        let page = batch.read_stream(CATALOG_STREAM, fresh.version + 1, STREAM_PAGE_SIZE)?;
        for recorded in &page {
            fresh.apply(&codec::decode_catalog(recorded)?);
        }
        if page.len() < STREAM_PAGE_SIZE {
            *catalog = Arc::new(fresh);
            return Ok(());
        }
    }
}

/// One batch's view for deciding commands: its transaction, the member
/// cache and the catalog.
struct Shell<'batch, 'store> {
    batch: &'batch mut Batch<'store>,
    members: &'batch mut HashMap<String, MemberState>,
    catalog: &'batch mut Arc<Catalog>,
    options: &'batch LedgerOptions,
    now: DateTime<Utc>,
}

const STREAM_PAGE_SIZE: usize = 1_000;

/// The serialisation of [`MemberState`] in snapshots (serde JSON of the
/// struct). Bump it with any change to `MemberState` or the types inside
/// it, and with any change to what a fold of the events yields (`apply`,
/// upcasting): snapshots of another format are then passed over and
/// rewritten. The test `a_member_snapshot_has_the_pinned_shape_and_reads_back_equal`
/// pins the shape and the bytes of the current format (2 added
/// `stripe_checkout_sessions`, 3 the refund records `stripe_paid_grants`
/// and `stripe_refunds`).
pub const MEMBER_SNAPSHOT_FORMAT: u32 = 3;

impl Shell<'_, '_> {
    /// Run one job. A panic (a broken ledger invariant, which `assert!`s
    /// stop rather than write a wrong balance) fails only this job: its
    /// savepoint is rolled back, its member's cached state dropped, and the
    /// writer goes on serving everyone else.
    fn run_guarded(&mut self, job: &Job, touched: &mut HashSet<String>) -> Pending {
        match job {
            Job::Member { member_id, request, reply } => {
                touched.insert(member_id.clone());
                let result = self.guard(Some(member_id), |shell| {
                    shell.in_savepoint(|shell| shell.member_command(member_id, request))
                });
                Pending::Executed(reply.clone(), Box::new(result))
            }
            Job::Catalog { request, reply } => {
                let result = self.guard(None, |shell| shell.in_savepoint(|shell| shell.catalog_command(request)));
                Pending::Executed(reply.clone(), Box::new(result))
            }
            Job::Intake { request, reply } => {
                let result = self.guard(None, |shell| shell.in_savepoint(|shell| shell.intake(request)));
                Pending::Executed(reply.clone(), Box::new(result))
            }
            Job::Integration { member_id, integration_id, request, reply } => {
                let result = self.guard(None, |shell| {
                    shell.in_savepoint(|shell| shell.integration_command(member_id, integration_id, request))
                });
                Pending::Executed(reply.clone(), Box::new(result))
            }
            Job::Check { member_id, credits, reply } => {
                Pending::Checked(reply.clone(), self.guard(Some(member_id), |shell| shell.check(member_id, *credits)))
            }
            Job::State { member_id, reply } => {
                let result = self
                    .guard(Some(member_id), |shell| shell.fresh_state(member_id).map(|state| Box::new(state.clone())));
                Pending::State(reply.clone(), result)
            }
            Job::Sweep { members_max, reply } => {
                Pending::Swept(reply.clone(), self.guard(None, |shell| shell.sweep(*members_max, touched)))
            }
            Job::Sync { reply } => Pending::Synced(reply.clone(), Ok(())),
        }
    }

    fn guard<T>(
        &mut self,
        member_id: Option<&str>,
        run: impl FnOnce(&mut Self) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(self))) {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                    .unwrap_or_else(|| "a panic".to_owned());
                tracing::error!(%message, "a job panicked; its savepoint is rolled back");
                // Only a command still inside its savepoint has one to roll back.
                let _ = self.batch.rollback_command();
                match member_id {
                    Some(member_id) => drop(self.members.remove(member_id)),
                    None => self.members.clear(),
                }
                Err(LedgerError::Store(StoreError::Corrupt(format!("internal error: {message}"))))
            }
        }
    }

    /// Run one command inside its own savepoint (in an optimistic batch, a
    /// mark): kept on success, undone on any error so that a rejection
    /// writes nothing.
    fn in_savepoint<T>(&mut self, run: impl FnOnce(&mut Self) -> Result<T, LedgerError>) -> Result<T, LedgerError> {
        self.batch.begin_command()?;
        match run(self) {
            Ok(value) => {
                self.batch.commit_command()?;
                Ok(value)
            }
            Err(error) => {
                // A rollback that fails means SQLite ended the whole
                // transaction (a full disk, say): the commit will fail too,
                // and this command's own error is the one to answer. In a
                // batch without savepoints it means the command wrote before
                // failing: the batch is replayed with savepoints, and this
                // answer is never sent.
                if let Err(rollback) = self.batch.rollback_command()
                    && !self.batch.needs_replay_with_savepoints()
                {
                    tracing::warn!(%rollback, %error, "a command's savepoint could not be rolled back");
                }
                Err(error)
            }
        }
    }

    /// A member's state: its snapshot (if any, and usable) and the events
    /// after it. A load that replayed many events leaves a snapshot behind.
    fn load_member(&mut self, member_id: &str) -> Result<MemberState, LedgerError> {
        let stream_id = member_stream(member_id);
        let mut state = self.snapshot(&stream_id)?.unwrap_or_default();
        let from = state.version;
        loop {
            let page = self.batch.read_stream(&stream_id, state.version + 1, STREAM_PAGE_SIZE)?;
            for recorded in &page {
                state.apply(&codec::decode_member(recorded)?);
            }
            if page.len() < STREAM_PAGE_SIZE {
                break;
            }
        }
        let every = self.options.snapshot_every;
        if every > 0 && state.version - from >= every {
            self.save_snapshot(&stream_id, &state);
        }
        Ok(state)
    }

    /// The stored snapshot of a member, if snapshots are on and it is one
    /// this build wrote. One that no longer reads is logged and passed over:
    /// a snapshot is a cache, and the log still has every event.
    fn snapshot(&mut self, stream_id: &str) -> Result<Option<MemberState>, LedgerError> {
        if self.options.snapshot_every == 0 {
            return Ok(None);
        }
        let Some(snapshot) = self.batch.snapshot(stream_id)? else { return Ok(None) };
        if snapshot.format != MEMBER_SNAPSHOT_FORMAT {
            return Ok(None);
        }
        match serde_json::from_str::<MemberState>(&snapshot.state) {
            Ok(state) if state.version == snapshot.version => Ok(Some(state)),
            Ok(state) => {
                tracing::warn!(%stream_id, snapshot.version, state.version, "a snapshot disagrees with its own version; replaying the stream");
                Ok(None)
            }
            Err(error) => {
                tracing::warn!(%stream_id, %error, "a snapshot does not read; replaying the stream");
                Ok(None)
            }
        }
    }

    /// Stores a snapshot, best effort: a snapshot is a cache, and failing to
    /// write one must not fail the command (or the check) that made it. An
    /// error that ended the transaction still fails the batch, through the
    /// next statement of the batch.
    fn save_snapshot(&mut self, stream_id: &str, state: &MemberState) {
        let state_json = serde_json::to_string(state).expect("member state serialises");
        let snapshot = Snapshot { version: state.version, format: MEMBER_SNAPSHOT_FORMAT, state: state_json };
        if let Err(error) = self.batch.save_snapshot(stream_id, &snapshot) {
            tracing::warn!(%stream_id, %error, "a member snapshot was not saved; loads replay more of the stream");
        }
    }

    fn state(&mut self, member_id: &str) -> Result<&MemberState, LedgerError> {
        validate::identifier("member_id", member_id)?;
        if !self.members.contains_key(member_id) {
            let state = self.load_member(member_id)?;
            self.members.insert(member_id.to_owned(), state);
        }
        Ok(&self.members[member_id])
    }

    /// The member's state, reloaded if another process appended since it
    /// was cached: for answers that no append will double-check.
    fn fresh_state(&mut self, member_id: &str) -> Result<&MemberState, LedgerError> {
        let version = self.state(member_id)?.version;
        if self.batch.stream_version(&member_stream(member_id))? != version {
            self.members.remove(member_id);
        }
        self.state(member_id)
    }

    fn check(&mut self, member_id: &str, credits: Credits) -> Result<CheckOutcome, LedgerError> {
        let now = self.now;
        let catalog = Arc::clone(self.catalog);
        let state = self.fresh_state(member_id)?;
        Ok(check(state, credits, &Context { member_id, now, catalog: &catalog, usage: None })?)
    }

    fn usage_facts(&mut self, stream_id: &str, command: &MemberCommand) -> Result<Option<UsageFacts>, LedgerError> {
        let usage_id = match command {
            MemberCommand::RecordUsage(usage) => &usage.usage_id,
            MemberCommand::ReverseUsage { usage_id, .. } => usage_id,
            _ => return Ok(None),
        };
        Ok(self
            .batch
            .usage(stream_id, usage_id)?
            .map(|entry| UsageFacts { credits: Credits(entry.credits), reversed: entry.reversed_position.is_some() }))
    }

    fn member_command(&mut self, member_id: &str, request: &Request<MemberCommand>) -> Result<Executed, LedgerError> {
        validate::identifier("member_id", member_id)?;
        if let Some(idempotency) = &request.idempotency
            && let Some(record) = self.batch.idempotency(&idempotency.scope, &idempotency.key)?
        {
            return replayed(idempotency, record);
        }
        let stream_id = member_stream(member_id);
        for _attempt in 0..=self.options.conflict_retries_max {
            let state = self.state(member_id)?.clone();
            let usage = self.usage_facts(&stream_id, &request.command)?;
            let catalog = Arc::clone(self.catalog);
            let context = Context { member_id, now: self.now, catalog: &catalog, usage };
            let decision = match decide(&state, &request.command, &context) {
                Ok(decision) => decision,
                // A rejection must not come from a stale cache either: the
                // append's version check cannot catch it, so compare here.
                Err(rejection) if self.batch.stream_version(&stream_id)? != state.version => {
                    tracing::debug!(%stream_id, %rejection, "cached state was stale; reloading");
                    self.members.remove(member_id);
                    continue;
                }
                Err(rejection) => return Err(rejection.into()),
            };
            match self.append_member(&stream_id, &state, &decision, request) {
                Ok(positions) => {
                    // Only a profile event can move the customer index: no
                    // clone on the usage path.
                    let profile_changes = decision.iter().any(|occurred| {
                        matches!(
                            occurred.event,
                            MemberEvent::MemberRegistered { .. } | MemberEvent::MemberProfileChanged { .. }
                        )
                    });
                    let previous_customer = profile_changes.then(|| state.profile.stripe_customer_id.clone()).flatten();
                    let version_before = state.version;
                    let mut state = state;
                    // The cached copy goes first, so that the parts the two
                    // share (closed reservations) are changed in place.
                    self.members.remove(member_id);
                    for occurred in &decision {
                        state.apply(&occurred.event);
                    }
                    let every = self.options.snapshot_every;
                    if every > 0 && state.version / every != version_before / every {
                        self.save_snapshot(&stream_id, &state);
                    }
                    self.index_member(&stream_id, &state, &decision, &positions, previous_customer.as_deref())?;
                    let outcome = self.outcome(&stream_id, &decision, &positions, Some(BalanceView::of(&state)));
                    let executed = self.finish(request, outcome)?;
                    self.members.insert(member_id.to_owned(), state);
                    return Ok(executed);
                }
                Err(LedgerError::Store(StoreError::VersionConflict { .. })) => {
                    self.members.remove(member_id);
                }
                Err(error) => return Err(error),
            }
        }
        Err(LedgerError::VersionConflict { stream_id, attempts: self.options.conflict_retries_max + 1 })
    }

    /// Append a decision's events; returns each event's position.
    fn append_member<C>(
        &mut self,
        stream_id: &str,
        state: &MemberState,
        decision: &Decision,
        request: &Request<C>,
    ) -> Result<Vec<u64>, LedgerError> {
        if decision.is_empty() {
            return Ok(Vec::new());
        }
        let events = decision
            .iter()
            .map(|occurred| {
                let encoded = codec::encode_member(&occurred.event);
                let actor = if occurred.by_time { "scheduler" } else { request.actor.as_str() };
                new_event(encoded, metadata(request, actor, Some(occurred.occurred_at)))
            })
            .collect();
        let appended = self.batch.append(stream_id, ExpectedVersion::Exact(state.version), events, self.now)?;
        Ok((appended.first_position..=appended.last_position).collect())
    }

    /// Keep the store's indexes in step with the events: usage ids (unique
    /// for ever) and each member's next due instant (for the scheduler).
    /// The store leaves a due row that already holds the instant untouched
    /// (`Batch::set_due`): most commands (a usage, a check-and-charge) do
    /// not move it, and rewriting it would dirty a page for the commit.
    fn index_member(
        &mut self,
        stream_id: &str,
        state: &MemberState,
        decision: &Decision,
        positions: &[u64],
        previous_customer: Option<&str>,
    ) -> Result<(), LedgerError> {
        let mut customer = previous_customer.map(str::to_owned);
        for (occurred, position) in decision.iter().zip(positions) {
            match &occurred.event {
                MemberEvent::UsageRecorded { usage_id, credits, .. } => {
                    self.batch.record_usage(stream_id, usage_id, *position, credits.0)?;
                }
                MemberEvent::UsageReversed { usage_id, .. } => {
                    self.batch.mark_usage_reversed(stream_id, usage_id, *position)?;
                }
                MemberEvent::MemberRegistered { stripe_customer_id, .. }
                | MemberEvent::MemberProfileChanged { stripe_customer_id, .. } => {
                    relink_stripe_customer(self.batch, stream_id, &mut customer, stripe_customer_id.as_deref())?;
                }
                _ => {}
            }
        }
        if !decision.is_empty() {
            self.batch.set_due(stream_id, next_due(state))?;
        }
        Ok(())
    }

    fn outcome(
        &self,
        stream_id: &str,
        decision: &Decision,
        positions: &[u64],
        balance: Option<BalanceView>,
    ) -> CommandOutcome {
        // Time effects a decision ran first are written with it but not
        // echoed: after a long idle spell they can be many, and the answer
        // is stored whole for idempotent retries.
        let events = decision
            .iter()
            .zip(positions)
            .filter(|(occurred, _)| !occurred.by_time)
            .map(|(occurred, position)| AppendedEvent {
                position: *position,
                event: serde_json::to_value(&occurred.event).expect("events serialise"),
            })
            .collect();
        CommandOutcome {
            stream_id: stream_id.to_owned(),
            position: positions.last().copied().unwrap_or(self.batch.head().position),
            events_appended: positions.len() as u64,
            events,
            balance,
        }
    }

    /// The outcome of a command on a stream with no balance (the catalog,
    /// an integration): every event echoed with its position.
    fn plain_outcome<E: Serialize>(&self, stream_id: &str, events: &[E], positions: &[u64]) -> CommandOutcome {
        CommandOutcome {
            stream_id: stream_id.to_owned(),
            position: positions.last().copied().unwrap_or(self.batch.head().position),
            events_appended: positions.len() as u64,
            events: events
                .iter()
                .zip(positions)
                .map(|(event, position)| AppendedEvent {
                    position: *position,
                    event: serde_json::to_value(event).expect("events serialise"),
                })
                .collect(),
            balance: None,
        }
    }

    fn finish<C>(&mut self, request: &Request<C>, outcome: CommandOutcome) -> Result<Executed, LedgerError> {
        let status = request.idempotency.as_ref().map_or(200, |idempotency| idempotency.status);
        if let Some(idempotency) = &request.idempotency {
            let record = IdempotencyRecord {
                fingerprint: idempotency.fingerprint,
                status,
                response: serde_json::to_string(&outcome).expect("outcomes serialise"),
                position: outcome.position,
                recorded_at: self.now,
            };
            self.batch.record_idempotency(&idempotency.scope, &idempotency.key, &record)?;
        }
        Ok(Executed { outcome, replayed: false, status })
    }

    fn catalog_command(&mut self, request: &Request<CatalogCommand>) -> Result<Executed, LedgerError> {
        if let Some(idempotency) = &request.idempotency
            && let Some(record) = self.batch.idempotency(&idempotency.scope, &idempotency.key)?
        {
            return replayed(idempotency, record);
        }
        let mut attempts = 0;
        let (events, appended) = loop {
            let events = self.catalog.decide(&request.command)?;
            let new_events = events
                .iter()
                .map(|event| new_event(codec::encode_catalog(event), metadata(request, &request.actor, Some(self.now))))
                .collect();
            match self.batch.append(CATALOG_STREAM, ExpectedVersion::Exact(self.catalog.version), new_events, self.now)
            {
                Ok(appended) => break (events, appended),
                // Another process changed the catalog: reload it and decide again.
                Err(StoreError::VersionConflict { .. }) if attempts < self.options.conflict_retries_max => {
                    attempts += 1;
                    refresh_catalog(self.batch, self.catalog)?;
                }
                Err(StoreError::VersionConflict { .. }) => {
                    return Err(LedgerError::VersionConflict {
                        stream_id: CATALOG_STREAM.to_owned(),
                        attempts: attempts + 1,
                    });
                }
                Err(error) => return Err(error.into()),
            }
        };
        let mut catalog = (**self.catalog).clone();
        for event in &events {
            catalog.apply(event);
        }
        *self.catalog = Arc::new(catalog);
        let positions: Vec<u64> = (appended.first_position..=appended.last_position).collect();
        let outcome = self.plain_outcome(CATALOG_STREAM, &events, &positions);
        self.finish(request, outcome)
    }

    fn intake(&mut self, request: &Request<IntakeEvent>) -> Result<Executed, LedgerError> {
        if let Some(idempotency) = &request.idempotency
            && let Some(record) = self.batch.idempotency(&idempotency.scope, &idempotency.key)?
        {
            return replayed(idempotency, record);
        }
        let event =
            new_event(codec::encode_intake(&request.command), metadata(request, &request.actor, Some(self.now)));
        let appended = self.batch.append(STRIPE_INTAKE_STREAM, ExpectedVersion::Any, vec![event], self.now)?;
        let outcome =
            self.plain_outcome(STRIPE_INTAKE_STREAM, std::slice::from_ref(&request.command), &[appended.last_position]);
        self.finish(request, outcome)
    }

    fn integration_command(
        &mut self,
        member_id: &str,
        integration_id: &str,
        request: &Request<IntegrationCommand>,
    ) -> Result<Executed, LedgerError> {
        validate::identifier("member_id", member_id)?;
        crate::domain::integration::short_identifier("integration_id", integration_id)?;
        if let Some(idempotency) = &request.idempotency
            && let Some(record) = self.batch.idempotency(&idempotency.scope, &idempotency.key)?
        {
            return replayed(idempotency, record);
        }
        let stream_id = integration_stream(member_id, integration_id);
        // Integration streams are short and their commands rare: folded
        // from the batch's view each time, no cache to keep coherent.
        let mut state = IntegrationState::default();
        loop {
            let page = self.batch.read_stream(&stream_id, state.version + 1, STREAM_PAGE_SIZE)?;
            for recorded in &page {
                state.apply(&codec::decode_integration(recorded)?, recorded.recorded_at);
            }
            if page.len() < STREAM_PAGE_SIZE {
                break;
            }
        }
        let member_registered = match request.command {
            IntegrationCommand::Put { .. } => self.fresh_state(member_id)?.is_registered(),
            _ => true,
        };
        let context = crate::domain::integration::IntegrationContext { member_id, integration_id, member_registered };
        let events = crate::domain::integration::decide_integration(&state, &request.command, &context)?;
        let positions: Vec<u64> = if events.is_empty() {
            Vec::new()
        } else {
            let new_events = events
                .iter()
                .map(|event| {
                    new_event(codec::encode_integration(event), metadata(request, &request.actor, Some(self.now)))
                })
                .collect();
            let appended =
                self.batch.append(&stream_id, ExpectedVersion::Exact(state.version), new_events, self.now)?;
            (appended.first_position..=appended.last_position).collect()
        };
        let outcome = self.plain_outcome(&stream_id, &events, &positions);
        self.finish(request, outcome)
    }

    /// Run due work for up to `members_max` members whose next due instant
    /// has come. Each member's time effects go in its own savepoint.
    fn sweep(&mut self, members_max: usize, touched: &mut HashSet<String>) -> Result<SweepReport, LedgerError> {
        let due = self.batch.due_streams(self.now, members_max)?;
        let mut report = SweepReport::default();
        for stream_id in due {
            let Some(member_id) = stream_id.strip_prefix("member-") else { continue };
            touched.insert(member_id.to_owned());
            let request = Request::new(MemberCommand::AdvanceTime, "scheduler");
            let executed = match self
                .guard(Some(member_id), |shell| shell.in_savepoint(|shell| shell.member_command(member_id, &request)))
            {
                Ok(executed) => executed,
                Err(error) => {
                    // One member's failure must not stop everyone's renewals:
                    // log it, look again in an hour, and go on.
                    tracing::error!(%stream_id, %error, "due work failed for a member; retrying in an hour");
                    self.members.remove(member_id);
                    self.batch.set_due(&stream_id, Some(self.now + chrono::Duration::hours(1)))?;
                    report.failures += 1;
                    continue;
                }
            };
            report.members += 1;
            report.events += executed.outcome.events_appended;
            if executed.outcome.events_appended == 0 {
                // Nothing was due after all (a stale index entry): refresh it.
                let state = self.state(member_id)?.clone();
                self.batch.set_due(&stream_id, next_due(&state))?;
            }
        }
        report.position = self.batch.head().position;
        Ok(report)
    }
}

/// A stored answer for a retried request: the same key must come with the
/// same request.
fn replayed(idempotency: &Idempotency, record: IdempotencyRecord) -> Result<Executed, LedgerError> {
    if record.fingerprint != idempotency.fingerprint {
        return Err(LedgerError::IdempotencyKeyReused);
    }
    let outcome = serde_json::from_str(&record.response)
        .map_err(|error| StoreError::Corrupt(format!("stored idempotent response does not decode: {error}")))?;
    Ok(Executed { outcome, replayed: true, status: record.status })
}

/// Keep the customer index in step with a member's profile: the customer it
/// names now points here; one it named before and no longer does, no more.
pub(crate) fn relink_stripe_customer(
    batch: &mut Batch<'_>,
    stream_id: &str,
    current: &mut Option<String>,
    named: Option<&str>,
) -> Result<(), StoreError> {
    if let Some(previous) = current.as_deref()
        && Some(previous) != named
    {
        batch.unlink_stripe_customer(previous, stream_id)?;
    }
    if let Some(customer_id) = named {
        batch.link_stripe_customer(customer_id, stream_id)?;
    }
    *current = named.map(str::to_owned);
    Ok(())
}

fn metadata<C>(request: &Request<C>, actor: &str, occurred_at: Option<DateTime<Utc>>) -> EventMetadata {
    EventMetadata {
        occurred_at,
        causation_id: request.causation_id,
        correlation_id: request.correlation_id,
        actor: actor.to_owned(),
        idempotency_key: request.idempotency.as_ref().map(|idempotency| idempotency.key.clone()),
    }
}

fn new_event(encoded: codec::Encoded, metadata: EventMetadata) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: encoded.event_type.to_owned(),
        schema_version: encoded.schema_version,
        payload: encoded.payload,
        metadata,
    }
}
