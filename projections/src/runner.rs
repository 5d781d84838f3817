//! The owner of a projections file: it applies the log to the read models,
//! builds and swaps generations, and lets callers wait for a position.
//!
//! One write connection, behind one mutex, does all writing. Work comes in
//! steps, each one transaction of at most `batch_events_max` events
//! (`build_batch_events_max` for builds):
//!
//! - a **live step** reads the events after the lowest live checkpoint and
//!   applies each to every live projector that has not seen it, then moves
//!   their checkpoints, all in one transaction: a crash (or any error)
//!   before the commit leaves rows and checkpoints as they were, so every
//!   event takes effect exactly once;
//! - a **build step** does the same for a generation being built (first
//!   build, upgrade, rebuild) into its own tables with its own checkpoint.
//!   When a build step reads less than a full batch it has reached the
//!   head, and in the same transaction the generation becomes live and the
//!   old one is dropped.
//!
//! Inside a step each projector works in its own savepoint. A projector
//! that fails (a log that contradicts its rows, a bug) has its rows and
//! checkpoint rolled back and is retried after [`ERROR_BACKOFF_MS`]; the
//! others commit and go on, so one broken read model does not stop the
//! rest. Its error shows in [`ProjectorStatus::last_error`], and waits for
//! it end in [`ProjectionError::Lagging`].
//!
//! Readers never take this mutex and never wait for a step (WAL), so
//! neither projecting nor rebuilding blocks a query, and since the event
//! log is another file, neither blocks the ledger's writer. The runner
//! thread, [`Projections::catch_up`], [`Projections::rebuild`] and an
//! inline [`Projections::wait_for`] all take steps; whoever holds the mutex
//! advances everyone's work, so they cooperate rather than race.

use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use rusqlite::{Connection, TransactionBehavior};
use serde::Serialize;
use tally_ledger::domain::integration::parse_integration_stream;
use tally_ledger::store::{CHAIN_HASH_ZERO, EventReader, READ_PAGE_SIZE_MAX, RecordedEvent};

use crate::digest::Digest;
use crate::error::ProjectionError;
use crate::models::alerts::{AlertCount, AlertFilter, AlertRow};
use crate::models::analytics::{AnalyticsTotals, DayRow, MemberAnalytics, UsageRow};
use crate::models::credits::{Balance, CreditTransaction, Grant};
use crate::models::daily_usage::DailyUsage;
use crate::models::integrations::{
    ApiUsageRow, ExecutionFilter, ExecutionRow, FailingIntegration, ProbeCandidate, QueryStats,
};
use crate::models::invoices::Invoice;
use crate::models::subscriptions::PlanCount;
use crate::models::subscriptions::Subscription;
use crate::page::{Page, PageRequest};
use crate::projector::{IntegrationProjected, ProjectedEvent, Projector, ProjectorTx, RenderedSql};
use crate::read::ReadModels;
use crate::read_ahead::{self, Decoded, EventBatch, MEMBER_STREAM_PREFIX, ReadAhead};
use crate::registry::{ReadModel, Registry, builtin_projectors};
use crate::storage::{self, GenerationRow, Slot};

/// Events one transaction of the live read models applies, by default:
/// large enough that commits are a small share of catching up, small enough
/// that a step holds the writer for a few tens of milliseconds (a
/// read-your-writes wait may sit behind one).
pub const BATCH_EVENTS_MAX_DEFAULT: usize = 2_000;
/// Events one transaction of a build (first build, upgrade, rebuild)
/// applies, by default. A build batch touches the rows of most members, and
/// each batch writes each of those rows (and the pages holding them) once:
/// larger batches write them fewer times. On the million-event log of the
/// `rebuild_throughput` example, 50,000 rebuilds about twice as fast as
/// 10,000 (and 2.5 times as fast as 20,000). The price: a build step holds
/// the writer for a few hundred milliseconds (live steps and inline
/// `wait_for` wait behind it), and a build holds two batches in memory
/// (about 45 MB at 50,000 events).
pub const BUILD_BATCH_EVENTS_MAX_DEFAULT: usize = 50_000;
/// The most `build_batch_events_max` may be: a build reads its batch in
/// pages of the log's [`READ_PAGE_SIZE_MAX`], and holds two batches in
/// memory (read and decoded, about 900 bytes an event).
pub const BUILD_BATCH_EVENTS_MAX_LIMIT: usize = 100_000;
/// How long a write waits for SQLite's lock (another process, a checkpoint).
pub const BUSY_TIMEOUT_DEFAULT_MS: u64 = 5_000;
/// How often the runner looks at the log when nobody wakes it. Callers that
/// wait for a position wake it at once.
pub const POLL_INTERVAL_DEFAULT_MS: u64 = 50;
/// How long the runner pauses after a failed step before trying again.
pub const ERROR_BACKOFF_MS: u64 = 1_000;
/// The longest a read waits for `min_position` (DESIGN.md §5).
pub const WAIT_FOR_POSITION_DEFAULT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectionOptions {
    /// Most events the live read models apply in one transaction,
    /// 1..=10,000 (the log's page).
    pub batch_events_max: usize,
    /// Most events a build applies in one transaction,
    /// 1..=[`BUILD_BATCH_EVENTS_MAX_LIMIT`].
    pub build_batch_events_max: usize,
    /// Milliseconds the runner sleeps when the log has nothing new.
    pub poll_interval_ms: u64,
    /// Milliseconds a connection waits for SQLite's locks.
    pub busy_timeout_ms: u64,
}

impl Default for ProjectionOptions {
    fn default() -> Self {
        ProjectionOptions {
            batch_events_max: BATCH_EVENTS_MAX_DEFAULT,
            build_batch_events_max: BUILD_BATCH_EVENTS_MAX_DEFAULT,
            poll_interval_ms: POLL_INTERVAL_DEFAULT_MS,
            busy_timeout_ms: BUSY_TIMEOUT_DEFAULT_MS,
        }
    }
}

/// Rebuild progress, reported after every step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Progress {
    /// Events replayed into the new generation (positions are gapless, so
    /// this is its checkpoint).
    pub events_done: u64,
    /// The log's head now; it grows while the ledger writes.
    pub events_total: u64,
    /// Since the rebuild started.
    pub events_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RebuildReport {
    pub projectors: Vec<&'static str>,
    /// The checkpoint the new generations went live at.
    pub position: u64,
    pub events: u64,
    pub elapsed_s: f64,
    pub events_per_s: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CatchUpReport {
    /// Events read and applied (live and builds alike).
    pub events_applied: u64,
    /// The lowest live checkpoint afterwards.
    pub position: u64,
}

/// A generation being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BuildStatus {
    pub generation: u64,
    pub checkpoint: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProjectorStatus {
    pub name: &'static str,
    pub version: u32,
    pub read_models: Vec<&'static str>,
    /// Whether queries are served: a generation built by this version is live.
    pub serving: bool,
    /// The live generation, if any (possibly of an older version).
    pub generation: Option<u64>,
    /// The live checkpoint (0 when nothing is served).
    pub checkpoint: u64,
    /// Events between the checkpoint and the log's head.
    pub lag: u64,
    pub build: Option<BuildStatus>,
    /// The last failure of the runner, until a step succeeds again.
    pub last_error: Option<String>,
    /// Filled by [`Projections::status_with_digests`] only.
    pub digests: Vec<Digest>,
}

/// The owner of a projections file. Share it with `Arc`.
pub struct Projections {
    shared: Arc<Shared>,
}

struct Shared {
    projections_path: PathBuf,
    options: ProjectionOptions,
    registry: Arc<Registry>,
    read_models: ReadModels,
    writer: Mutex<Writer>,
    progress: Mutex<ProgressState>,
    progressed: Condvar,
    wake: Mutex<bool>,
    woken: Condvar,
    head_reader: Mutex<EventReader>,
    /// Held for the owner's lifetime: one process owns the projections.
    _lock: File,
}

#[derive(Default)]
struct ProgressState {
    /// Live checkpoints of projectors served at their current version.
    live: HashMap<&'static str, u64>,
    /// The last failure of each projector, until it applies a batch again.
    errors: HashMap<&'static str, String>,
    /// The last failure of a whole step (the log or the file unreadable).
    step_error: Option<String>,
    runner_running: bool,
}

struct Writer {
    connection: Connection,
    events: EventReader,
    jobs: Vec<BuildJob>,
    next_job_id: u64,
    rendered: HashMap<(usize, u64), RenderedSql>,
    /// Projectors whose last batch failed, and when to try them again; the
    /// others go on meanwhile.
    retry_at: HashMap<usize, Instant>,
}

struct BuildJob {
    id: u64,
    /// (projector index, generation being built).
    members: Vec<(usize, u64)>,
    checkpoint: u64,
    checkpoint_hash: [u8; 32],
    /// A first build or an upgrade: nothing is served until it ends, so the
    /// runner and `catch_up` drive it, and a failure is retried. A rebuild
    /// asked for (a live generation exists) is driven by its caller and
    /// dropped if it fails.
    needed: bool,
    /// The thread reading the job's next batches, once a step started it.
    read_ahead: Option<ReadAhead>,
}

/// One projector's share of a step.
#[derive(Clone, Copy)]
struct Target {
    index: usize,
    generation: u64,
    checkpoint: u64,
}

/// What a step did.
#[derive(Default)]
struct StepOutcome {
    /// Events read and applied.
    events: u64,
    /// A generation went live.
    swapped: bool,
    /// Projectors that applied their batch.
    succeeded: Vec<usize>,
    /// Projectors whose batch was rolled back, with why.
    failures: Vec<(usize, ProjectionError)>,
}

impl StepOutcome {
    fn merge(&mut self, other: StepOutcome) {
        self.events += other.events;
        self.swapped |= other.swapped;
        self.succeeded.extend(other.succeeded);
        self.failures.extend(other.failures);
    }
}

/// Stops the runner thread when dropped (or by [`RunnerHandle::stop`]).
pub struct RunnerHandle {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl RunnerHandle {
    /// Asks the thread to stop after its current step and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shared.wake_runner();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.shared.progress().runner_running = false;
    }
}

impl Drop for RunnerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn lock_path(projections_path: &Path) -> PathBuf {
    let mut name = projections_path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn take_lock(projections_path: &Path) -> Result<File, ProjectionError> {
    let path = lock_path(projections_path);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ProjectionError::Io { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(ProjectionError::Locked { path: projections_path.to_path_buf() }),
        Err(TryLockError::Error(source)) => Err(ProjectionError::Io { path, source }),
    }
}

/// The chain hash of the event at `position` (the zero hash for 0), or
/// `None` when the log has no such event.
fn hash_at(events: &EventReader, position: u64) -> Result<Option<[u8; 32]>, ProjectionError> {
    if position == 0 {
        return Ok(Some(CHAIN_HASH_ZERO));
    }
    let found = events.read_all(position - 1, 1)?;
    Ok(found.first().filter(|event| event.position == position).map(|event| event.hash))
}

impl Projections {
    /// Opens (or creates) the projections file beside an existing event log,
    /// with the built-in projectors and default options.
    pub fn open(projections_path: &Path, events_path: &Path) -> Result<Projections, ProjectionError> {
        Projections::open_with(projections_path, events_path, ProjectionOptions::default(), builtin_projectors())
    }

    /// Opens with chosen options and projectors. Projectors whose version
    /// changed, that were never built, or whose checkpoint does not match
    /// the log (another log, or a log restored from an older backup) get a
    /// build job: their old tables (if any) stay until the new generation
    /// is live, and are not served meanwhile; other read models are served
    /// as usual.
    pub fn open_with(
        projections_path: &Path,
        events_path: &Path,
        options: ProjectionOptions,
        projectors: Vec<Arc<dyn Projector>>,
    ) -> Result<Projections, ProjectionError> {
        for (field, value, most) in [
            ("batch_events_max", options.batch_events_max, READ_PAGE_SIZE_MAX),
            ("build_batch_events_max", options.build_batch_events_max, BUILD_BATCH_EVENTS_MAX_LIMIT),
        ] {
            if value == 0 || value > most {
                return Err(ProjectionError::InvalidArgument {
                    field,
                    reason: format!("must be between 1 and {most}"),
                });
            }
        }
        let lock = take_lock(projections_path)?;
        let busy_timeout = Duration::from_millis(options.busy_timeout_ms);
        let connection = storage::open_for_writing(projections_path, busy_timeout)?;
        let events = EventReader::open(events_path)?;
        let head_reader = EventReader::open(events_path)?;
        let registry = Arc::new(Registry::new(projectors));
        let mut writer = Writer {
            connection,
            events,
            jobs: Vec::new(),
            next_job_id: 1,
            rendered: HashMap::new(),
            retry_at: HashMap::new(),
        };
        let live = writer.prepare_generations(&registry)?;
        let read_models = ReadModels::new(projections_path, busy_timeout, registry.clone());
        let shared = Arc::new(Shared {
            projections_path: projections_path.to_path_buf(),
            options,
            registry,
            read_models,
            writer: Mutex::new(writer),
            progress: Mutex::new(ProgressState { live, ..ProgressState::default() }),
            progressed: Condvar::new(),
            wake: Mutex::new(false),
            woken: Condvar::new(),
            head_reader: Mutex::new(head_reader),
            _lock: lock,
        });
        Ok(Projections { shared })
    }

    pub fn path(&self) -> &Path {
        &self.shared.projections_path
    }

    pub fn options(&self) -> ProjectionOptions {
        self.shared.options
    }

    /// Read models never apply an event of a batch the ledger in this
    /// process committed but has not yet fsynced (`Ledger::visible_head`):
    /// what they serve is on disk. Call it before `start_runner`, a
    /// catch-up or a rebuild: a build already reading ahead keeps its reader.
    pub fn hide_unsynced(&self, visible: Arc<tally_ledger::store::VisibleHead>) {
        self.shared.writer().events.hide_unsynced(Arc::clone(&visible));
        self.shared.head_reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).hide_unsynced(visible);
    }

    /// The query side, to hand to code that only reads.
    pub fn read_models(&self) -> &ReadModels {
        &self.shared.read_models
    }

    /// Starts the background thread that keeps the read models caught up
    /// (and finishes pending builds). It stops when the handle is dropped.
    pub fn start_runner(&self) -> Result<RunnerHandle, ProjectionError> {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::clone(&self.shared);
        let thread_stop = Arc::clone(&stop);
        {
            let mut progress = self.shared.progress();
            if progress.runner_running {
                return Err(ProjectionError::Runner("a runner is already running".to_owned()));
            }
            progress.runner_running = true;
        }
        let thread = std::thread::Builder::new()
            .name("tally-projections".to_owned())
            .spawn(move || shared.run(&thread_stop))
            .map_err(|error| {
                self.shared.progress().runner_running = false;
                ProjectionError::Runner(format!("cannot start the runner thread: {error}"))
            })?;
        Ok(RunnerHandle { stop, shared: Arc::clone(&self.shared), thread: Some(thread) })
    }

    /// Wakes the runner now rather than at its next poll: call it after a
    /// write whose effect a reader is about to ask for.
    pub fn notify(&self) {
        self.shared.wake_runner();
    }

    /// One step: at most one batch for the live read models and one for
    /// each build. Returns the events applied; a projector's failure is
    /// returned after the others' work was committed.
    pub fn run_once(&self) -> Result<u64, ProjectionError> {
        let outcome = self.shared.step_all()?;
        match outcome.failures.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(outcome.events),
        }
    }

    /// Applies everything up to the log's head as found now, first builds
    /// and upgrades included, in batches. Stops at the first projector
    /// failure (the others keep what they applied).
    pub fn catch_up(&self) -> Result<CatchUpReport, ProjectionError> {
        let target = self.shared.head()?;
        let mut report = CatchUpReport::default();
        loop {
            let outcome = self.shared.step_all()?;
            if let Some((_, error)) = outcome.failures.into_iter().next() {
                return Err(error);
            }
            report.events_applied += outcome.events;
            let builds_pending = self.shared.writer().jobs.iter().any(|job| job.needed);
            let reached = self.shared.lowest_live_checkpoint(&[]);
            report.position = reached;
            let idle = outcome.events == 0 && !outcome.swapped;
            if !builds_pending && (reached >= target || idle) {
                return Ok(report);
            }
        }
    }

    /// Waits until every read model has applied the log up to `position`;
    /// see [`Projections::wait_for`].
    pub fn wait_for_position(&self, position: u64, timeout: Duration) -> Result<(), ProjectionError> {
        self.wait_for(&ReadModel::ALL, position, timeout)
    }

    /// Read-your-writes: waits (at most `timeout`) until the projectors of
    /// these read models have checkpoints at or past `position`. A
    /// checkpoint moves past every event, including those a projector
    /// ignores, so the position of any write answer works. Without a runner
    /// thread the waiting caller applies the events itself.
    pub fn wait_for(&self, read_models: &[ReadModel], position: u64, timeout: Duration) -> Result<(), ProjectionError> {
        let projectors: Vec<&'static str> = read_models.iter().map(|read_model| read_model.projector()).collect();
        if self.shared.lowest_live_checkpoint(&projectors) >= position {
            return Ok(());
        }
        let head = self.shared.head()?;
        if position > head {
            return Err(ProjectionError::PositionBeyondHead { position, head });
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.shared.progress().runner_running {
                self.shared.wake_runner();
                self.shared.wait_progress(deadline);
            } else {
                let outcome = self.shared.step_all()?;
                if outcome.events == 0 && !outcome.swapped {
                    // Nothing to apply yet (a failed projector waits for its
                    // retry): do not spin.
                    std::thread::sleep(
                        Duration::from_millis(self.shared.options.poll_interval_ms)
                            .min(deadline.saturating_duration_since(Instant::now())),
                    );
                }
            }
            let reached = self.shared.lowest_live_checkpoint(&projectors);
            if reached >= position {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ProjectionError::Lagging { position, reached });
            }
        }
    }

    /// Replays the whole log into new generations of one projector (named
    /// directly or by one of its read models) or of all, beside the live
    /// ones, and swaps them in once they reached the head. Queries keep
    /// being served from the old generation meanwhile, and the live
    /// generation keeps being updated (by the runner thread, if started).
    /// `progress` is called after every batch. A projector whose first build
    /// or upgrade is under way is not restarted: this call waits for that
    /// build. On failure the new generations are dropped and the live ones
    /// stay.
    pub fn rebuild(
        &self,
        name: Option<&str>,
        mut progress: impl FnMut(Progress),
    ) -> Result<RebuildReport, ProjectionError> {
        let registry = &self.shared.registry;
        let indexes: Vec<usize> = match name {
            Some(name) => vec![registry.resolve(name)?],
            None => (0..registry.projectors().len()).collect(),
        };
        let names: Vec<&'static str> = indexes.iter().map(|index| registry.projectors()[*index].name()).collect();
        let started = Instant::now();
        let job_ids = self.shared.writer().start_build(registry, &indexes)?;
        let started_checkpoint = self.shared.writer().lowest_job_checkpoint(&job_ids).unwrap_or(0);
        let result = (|| loop {
            let (remaining, events_total) = {
                let mut writer = self.shared.writer();
                // The served read models move on between build steps, in
                // the same hold of the writer: however long a rebuild runs
                // (and however unfair the mutex), they lag by one build
                // step at most.
                match writer.step_live(registry, self.shared.options.batch_events_max) {
                    Ok(outcome) => self.shared.record(&writer, &outcome)?,
                    Err(error) => tracing::warn!(%error, "a live step during a rebuild failed; the runner retries it"),
                }
                for job_id in &job_ids {
                    if writer.jobs.iter().any(|job| job.id == *job_id) {
                        let outcome =
                            writer.step_build(registry, *job_id, self.shared.options.build_batch_events_max)?;
                        self.shared.record(&writer, &outcome)?;
                        if let Some((_, error)) = outcome.failures.into_iter().next() {
                            return Err(error);
                        }
                    }
                }
                (writer.lowest_job_checkpoint(&job_ids), writer.events.head()?.position)
            };
            let events_done = remaining.unwrap_or(events_total);
            let elapsed_s = started.elapsed().as_secs_f64();
            let events_per_s = rate(events_done.saturating_sub(started_checkpoint), elapsed_s);
            progress(Progress { events_done, events_total, events_per_s });
            if remaining.is_none() {
                let position = self.shared.lowest_live_checkpoint(&names);
                return Ok(RebuildReport {
                    projectors: names.clone(),
                    position,
                    events: position.saturating_sub(started_checkpoint),
                    elapsed_s,
                    events_per_s,
                });
            }
        })();
        if result.is_err() {
            let mut writer = self.shared.writer();
            if let Err(error) = writer.abandon_optional_jobs(registry, &job_ids) {
                tracing::error!(%error, "cannot drop the generations of a failed rebuild; they go at the next start");
            }
        }
        result
    }

    /// Where each projector stands, cheaply (no digests).
    pub fn status(&self) -> Result<Vec<ProjectorStatus>, ProjectionError> {
        let head = self.shared.head()?;
        let (errors, step_error) = {
            let progress = self.shared.progress();
            (progress.errors.clone(), progress.step_error.clone())
        };
        let mut statuses = status_of(&self.shared.read_models, head)?;
        for status in &mut statuses {
            status.last_error = errors.get(status.name).cloned().or_else(|| step_error.clone());
        }
        Ok(statuses)
    }

    /// [`Projections::status`] with every served read model's digest (reads
    /// every row: for the CLI and audits, not for health checks).
    pub fn status_with_digests(&self) -> Result<Vec<ProjectorStatus>, ProjectionError> {
        let mut statuses = self.status()?;
        for status in &mut statuses {
            if status.serving {
                status.digests = self.shared.read_models.digests_of_projector(status.name)?;
            }
        }
        Ok(statuses)
    }

    pub fn digest(&self, read_model: ReadModel) -> Result<Digest, ProjectionError> {
        self.shared.read_models.digest(read_model)
    }

    pub fn balance(&self, member_id: &str) -> Result<Option<Balance>, ProjectionError> {
        self.shared.read_models.balance(member_id)
    }

    pub fn grants(&self, member_id: &str) -> Result<Vec<Grant>, ProjectionError> {
        self.shared.read_models.grants(member_id)
    }

    pub fn transactions(
        &self,
        member_id: &str,
        page: &PageRequest,
    ) -> Result<Page<CreditTransaction>, ProjectionError> {
        self.shared.read_models.transactions(member_id, page)
    }

    pub fn daily_usage(
        &self,
        member_id: &str,
        from: NaiveDate,
        to: NaiveDate,
        page: &PageRequest,
    ) -> Result<Page<DailyUsage>, ProjectionError> {
        self.shared.read_models.daily_usage(member_id, from, to, page)
    }

    pub fn invoices(&self, member_id: &str, page: &PageRequest) -> Result<Page<Invoice>, ProjectionError> {
        self.shared.read_models.invoices(member_id, page)
    }

    pub fn invoice(&self, member_id: &str, invoice_id: &str) -> Result<Option<Invoice>, ProjectionError> {
        self.shared.read_models.invoice(member_id, invoice_id)
    }

    pub fn subscription(&self, member_id: &str) -> Result<Option<Subscription>, ProjectionError> {
        self.shared.read_models.subscription(member_id)
    }

    pub fn alerts(&self, filter: &AlertFilter, page: &PageRequest) -> Result<Page<AlertRow>, ProjectionError> {
        self.shared.read_models.alerts(filter, page)
    }

    pub fn alert_counts(&self) -> Result<Vec<AlertCount>, ProjectionError> {
        self.shared.read_models.alert_counts()
    }

    pub fn analytics_usage(
        &self,
        member_id: &str,
        dimension: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<UsageRow>, ProjectionError> {
        self.shared.read_models.analytics_usage(member_id, dimension, from, to)
    }

    pub fn analytics_breakdown(
        &self,
        member_id: &str,
        dimension: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<(String, i64, i64, i64)>, ProjectionError> {
        self.shared.read_models.analytics_breakdown(member_id, dimension, from, to)
    }

    pub fn analytics_days(
        &self,
        member_id: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DayRow>, ProjectionError> {
        self.shared.read_models.analytics_days(member_id, from, to)
    }

    pub fn analytics_member(&self, member_id: &str) -> Result<Option<MemberAnalytics>, ProjectionError> {
        self.shared.read_models.analytics_member(member_id)
    }

    pub fn analytics_totals(&self) -> Result<AnalyticsTotals, ProjectionError> {
        self.shared.read_models.analytics_totals()
    }

    pub fn query_performance(
        &self,
        member_id: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<QueryStats>, ProjectionError> {
        self.shared.read_models.query_performance(member_id, from, to)
    }

    pub fn failing_integrations(&self, limit: usize) -> Result<(u64, Vec<FailingIntegration>), ProjectionError> {
        self.shared.read_models.failing_integrations(limit)
    }

    pub fn plan_counts(&self) -> Result<Vec<PlanCount>, ProjectionError> {
        self.shared.read_models.plan_counts()
    }

    pub fn executions(
        &self,
        member_id: &str,
        filter: &ExecutionFilter,
        page: &PageRequest,
    ) -> Result<Page<ExecutionRow>, ProjectionError> {
        self.shared.read_models.executions(member_id, filter, page)
    }

    pub fn query_stats(&self, member_id: &str, integration_id: &str) -> Result<Vec<QueryStats>, ProjectionError> {
        self.shared.read_models.query_stats(member_id, integration_id)
    }

    pub fn api_usage(&self, member_id: &str, integration_id: &str) -> Result<Option<ApiUsageRow>, ProjectionError> {
        self.shared.read_models.api_usage(member_id, integration_id)
    }

    pub fn probe_candidates(&self, limit: usize) -> Result<Vec<ProbeCandidate>, ProjectionError> {
        self.shared.read_models.probe_candidates(limit)
    }
}

fn rate(events: u64, elapsed_s: f64) -> f64 {
    if elapsed_s > 0.0 { events as f64 / elapsed_s } else { 0.0 }
}

/// Status rows from the bookkeeping tables, in one snapshot.
pub(crate) fn status_of(read_models: &ReadModels, head: u64) -> Result<Vec<ProjectorStatus>, ProjectionError> {
    let (live_rows, build_rows) = read_models.with_connection(|connection| {
        let transaction = connection.unchecked_transaction()?;
        let rows = (storage::read_rows(&transaction, Slot::Live)?, storage::read_rows(&transaction, Slot::Build)?);
        transaction.commit()?;
        Ok(rows)
    })?;
    Ok(read_models
        .registry()
        .projectors()
        .iter()
        .map(|projector| {
            let live = live_rows.iter().find(|row| row.projector == projector.name());
            let serving = live.is_some_and(|row| row.version == projector.version());
            let checkpoint = live.filter(|_| serving).map_or(0, |row| row.checkpoint);
            let build = build_rows
                .iter()
                .find(|row| row.projector == projector.name())
                .map(|row| BuildStatus { generation: row.generation, checkpoint: row.checkpoint });
            ProjectorStatus {
                name: projector.name(),
                version: projector.version(),
                read_models: projector.read_models(),
                serving,
                generation: live.map(|row| row.generation),
                checkpoint,
                lag: head.saturating_sub(checkpoint),
                build,
                last_error: None,
                digests: Vec::new(),
            }
        })
        .collect())
}

impl Shared {
    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the writer (a broken invariant) poisons it;
        // the SQLite transaction was rolled back by then, so the state the
        // mutex guards is still the committed one.
        self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn progress(&self) -> MutexGuard<'_, ProgressState> {
        self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn head(&self) -> Result<u64, ProjectionError> {
        let reader = self.head_reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(reader.head()?.position)
    }

    fn wake_runner(&self) {
        *self.wake.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
        self.woken.notify_all();
    }

    /// Sleeps until woken or `timeout` passed.
    fn sleep_until_woken(&self, timeout: Duration) {
        let guard = self.wake.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut guard, _) = self
            .woken
            .wait_timeout_while(guard, timeout, |woken| !*woken)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = false;
    }

    /// Sleeps until some checkpoint moved or `deadline` came.
    fn wait_progress(&self, deadline: Instant) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return;
        }
        let guard = self.progress();
        let _ =
            self.progressed.wait_timeout(guard, remaining.min(Duration::from_millis(self.options.poll_interval_ms)));
    }

    /// The lowest live checkpoint among `projectors` (all registered ones
    /// when empty); 0 for a projector not served yet.
    fn lowest_live_checkpoint(&self, projectors: &[&'static str]) -> u64 {
        let progress = self.progress();
        let names: Vec<&'static str> = if projectors.is_empty() {
            self.registry.projectors().iter().map(|projector| projector.name()).collect()
        } else {
            projectors.to_vec()
        };
        names.iter().map(|name| progress.live.get(name).copied().unwrap_or(0)).min().unwrap_or(0)
    }

    /// Publishes what a step did: live checkpoints (waking waiters) and
    /// per-projector errors.
    fn record(&self, writer: &Writer, outcome: &StepOutcome) -> Result<(), ProjectionError> {
        let live = if outcome.events > 0 || outcome.swapped {
            Some(live_checkpoints(&writer.connection, &self.registry)?)
        } else {
            None
        };
        let mut progress = self.progress();
        if let Some(live) = live {
            progress.live = live;
        }
        progress.step_error = None;
        for index in &outcome.succeeded {
            progress.errors.remove(self.registry.projectors()[*index].name());
        }
        for (index, error) in &outcome.failures {
            let name = self.registry.projectors()[*index].name();
            tracing::error!(projector = name, %error, "a projector failed; it is retried, the others go on");
            progress.errors.insert(name, error.to_string());
        }
        drop(progress);
        self.progressed.notify_all();
        Ok(())
    }

    /// One batch for the live read models and one for each first build or
    /// upgrade that is not waiting for a retry.
    fn step_all(&self) -> Result<StepOutcome, ProjectionError> {
        let mut writer = self.writer();
        let batch_events_max = self.options.batch_events_max;
        let mut outcome = writer.step_live(&self.registry, batch_events_max)?;
        let now = Instant::now();
        let job_ids: Vec<u64> = writer
            .jobs
            .iter()
            .filter(|job| job.needed && !job.members.iter().all(|(index, _)| writer.waiting_for_retry(*index, now)))
            .map(|job| job.id)
            .collect();
        for job_id in job_ids {
            outcome.merge(writer.step_build(&self.registry, job_id, self.options.build_batch_events_max)?);
        }
        self.record(&writer, &outcome)?;
        Ok(outcome)
    }

    fn run(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            match self.step_all() {
                Ok(outcome) if outcome.events == 0 && !outcome.swapped => {
                    self.sleep_until_woken(Duration::from_millis(self.options.poll_interval_ms));
                }
                // Let a rebuild or a waiting reader take the writer.
                Ok(_) => std::thread::yield_now(),
                Err(error) => {
                    tracing::error!(%error, "projection step failed; retrying");
                    self.progress().step_error = Some(error.to_string());
                    self.sleep_until_woken(Duration::from_millis(ERROR_BACKOFF_MS));
                }
            }
        }
    }
}

fn live_checkpoints(
    connection: &Connection,
    registry: &Registry,
) -> Result<HashMap<&'static str, u64>, ProjectionError> {
    let rows = storage::read_rows(connection, Slot::Live)?;
    Ok(registry
        .projectors()
        .iter()
        .filter_map(|projector| {
            let row =
                rows.iter().find(|row| row.projector == projector.name() && row.version == projector.version())?;
            Some((projector.name(), row.checkpoint))
        })
        .collect())
}

impl Writer {
    /// Decides, once at start-up, which projectors are live and which need
    /// a build, creates the generations to build, and drops debris.
    fn prepare_generations(&mut self, registry: &Registry) -> Result<HashMap<&'static str, u64>, ProjectionError> {
        let transaction = self.connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let live_rows = storage::read_rows(&transaction, Slot::Live)?;
        let build_rows = storage::read_rows(&transaction, Slot::Build)?;
        let mut fresh: Vec<(usize, u64)> = Vec::new();
        let mut resumed: Vec<(usize, GenerationRow)> = Vec::new();
        for (index, projector) in registry.projectors().iter().enumerate() {
            let name = projector.name();
            let live = live_rows.iter().find(|row| row.projector == name);
            let live_current = live.filter(|row| row.version == projector.version());
            if let Some(row) = live_current {
                if hash_at(&self.events, row.checkpoint)? == Some(row.checkpoint_hash) {
                    // Served as it is; a build left by an interrupted
                    // rebuild is not needed any more.
                    storage::delete_row(&transaction, Slot::Build, name)?;
                    continue;
                }
                tracing::warn!(
                    projector = name,
                    checkpoint = row.checkpoint,
                    "the read model was built from another log; rebuilding it"
                );
                storage::delete_row(&transaction, Slot::Live, name)?;
            }
            let build = build_rows.iter().find(|row| row.projector == name);
            if let Some(row) = build.filter(|row| row.version == projector.version())
                && hash_at(&self.events, row.checkpoint)? == Some(row.checkpoint_hash)
            {
                resumed.push((index, row.clone()));
                continue;
            }
            storage::delete_row(&transaction, Slot::Build, name)?;
            let generation = storage::allocate_generation(&transaction)?;
            storage::create_generation(&transaction, projector.as_ref(), generation)?;
            storage::write_row(
                &transaction,
                Slot::Build,
                &GenerationRow {
                    projector: name.to_owned(),
                    version: projector.version(),
                    generation,
                    checkpoint: 0,
                    checkpoint_hash: CHAIN_HASH_ZERO,
                },
            )?;
            fresh.push((index, generation));
        }
        let dropped = storage::drop_orphans(&transaction)?;
        if dropped > 0 {
            tracing::info!(tables = dropped, "dropped tables no generation refers to");
        }
        let live = live_checkpoints(&transaction, registry)?;
        transaction.commit()?;

        if !fresh.is_empty() {
            self.push_job(fresh, 0, CHAIN_HASH_ZERO, true);
        }
        // Resumed builds that stopped at the same position continue as one.
        resumed.sort_by_key(|(_, row)| row.checkpoint);
        for (index, row) in resumed {
            match self.jobs.iter_mut().find(|job| job.checkpoint == row.checkpoint) {
                Some(job) => job.members.push((index, row.generation)),
                None => {
                    self.push_job(vec![(index, row.generation)], row.checkpoint, row.checkpoint_hash, true);
                }
            }
        }
        Ok(live)
    }

    fn push_job(
        &mut self,
        members: Vec<(usize, u64)>,
        checkpoint: u64,
        checkpoint_hash: [u8; 32],
        needed: bool,
    ) -> u64 {
        let id = self.next_job_id;
        self.next_job_id += 1;
        self.jobs.push(BuildJob { id, members, checkpoint, checkpoint_hash, needed, read_ahead: None });
        id
    }

    fn waiting_for_retry(&self, index: usize, now: Instant) -> bool {
        self.retry_at.get(&index).is_some_and(|retry_at| *retry_at > now)
    }

    /// Drops the optional builds among `job_ids` (a failed rebuild): their
    /// tables and rows go, the live generations stay.
    fn abandon_optional_jobs(&mut self, registry: &Registry, job_ids: &[u64]) -> Result<(), ProjectionError> {
        let abandoned: Vec<(usize, u64)> = self
            .jobs
            .iter()
            .filter(|job| !job.needed && job_ids.contains(&job.id))
            .flat_map(|job| job.members.iter().copied())
            .collect();
        self.jobs.retain(|job| job.needed || !job_ids.contains(&job.id));
        self.drop_builds(registry, &abandoned)
    }

    fn drop_builds(&mut self, registry: &Registry, builds: &[(usize, u64)]) -> Result<(), ProjectionError> {
        if builds.is_empty() {
            return Ok(());
        }
        let transaction = self.connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (index, generation) in builds {
            let projector = &registry.projectors()[*index];
            storage::delete_row(&transaction, Slot::Build, projector.name())?;
            storage::drop_generation(&transaction, projector.version(), *generation)?;
        }
        transaction.commit()?;
        self.rendered.retain(|(_, generation), _| !builds.iter().any(|(_, dropped)| dropped == generation));
        Ok(())
    }

    /// Starts building a new generation of each projector in `indexes` that
    /// is not being built already; returns the jobs covering them all.
    fn start_build(&mut self, registry: &Registry, indexes: &[usize]) -> Result<Vec<u64>, ProjectionError> {
        let mut job_ids: Vec<u64> = Vec::new();
        let mut new_indexes: Vec<usize> = Vec::new();
        for index in indexes {
            match self.jobs.iter().find(|job| job.members.iter().any(|(member, _)| member == index)) {
                Some(job) => {
                    if !job_ids.contains(&job.id) {
                        job_ids.push(job.id);
                    }
                }
                None => new_indexes.push(*index),
            }
        }
        if new_indexes.is_empty() {
            return Ok(job_ids);
        }
        let transaction = self.connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut members = Vec::new();
        for index in new_indexes {
            let projector = &registry.projectors()[index];
            let generation = storage::allocate_generation(&transaction)?;
            storage::create_generation(&transaction, projector.as_ref(), generation)?;
            storage::write_row(
                &transaction,
                Slot::Build,
                &GenerationRow {
                    projector: projector.name().to_owned(),
                    version: projector.version(),
                    generation,
                    checkpoint: 0,
                    checkpoint_hash: CHAIN_HASH_ZERO,
                },
            )?;
            members.push((index, generation));
        }
        transaction.commit()?;
        job_ids.push(self.push_job(members, 0, CHAIN_HASH_ZERO, false));
        Ok(job_ids)
    }

    /// The next batch of a build, from the job's read-ahead thread (started
    /// here, or again when the job's checkpoint is not where it reads).
    fn read_build_batch(
        &mut self,
        registry: &Registry,
        job_index: usize,
        after_position: u64,
        batch_events_max: usize,
    ) -> Result<EventBatch, ProjectionError> {
        let job = &mut self.jobs[job_index];
        let reads_it =
            job.read_ahead.as_ref().is_some_and(|read_ahead| read_ahead.reads(after_position, batch_events_max));
        if !reads_it {
            let mut decoded_types: Vec<&'static str> = Vec::new();
            for (index, _) in &job.members {
                decoded_types.extend(registry.projectors()[*index].handles());
            }
            job.read_ahead = None;
            job.read_ahead = Some(ReadAhead::start(&self.events, after_position, batch_events_max, decoded_types)?);
        }
        job.read_ahead.as_mut().expect("started above").next()
    }

    fn lowest_job_checkpoint(&self, job_ids: &[u64]) -> Option<u64> {
        self.jobs.iter().filter(|job| job_ids.contains(&job.id)).map(|job| job.checkpoint).min()
    }

    /// One batch for every projector served at its current version (but
    /// those waiting to retry a failure).
    fn step_live(&mut self, registry: &Registry, batch_events_max: usize) -> Result<StepOutcome, ProjectionError> {
        let now = Instant::now();
        let waiting: Vec<usize> = self.retry_at.iter().filter(|(_, at)| **at > now).map(|(index, _)| *index).collect();
        let Writer { connection, events, rendered, .. } = self;
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rows = storage::read_rows(&transaction, Slot::Live)?;
        let targets: Vec<Target> = registry
            .projectors()
            .iter()
            .enumerate()
            .filter(|(index, _)| !waiting.contains(index))
            .filter_map(|(index, projector)| {
                let row =
                    rows.iter().find(|row| row.projector == projector.name() && row.version == projector.version())?;
                Some(Target { index, generation: row.generation, checkpoint: row.checkpoint })
            })
            .collect();
        let Some(from) = targets.iter().map(|target| target.checkpoint).min() else {
            return Ok(StepOutcome::default());
        };
        let mut batch = EventBatch::undecoded(events.read_all(from, batch_events_max)?);
        let Some(last) = batch.events.last() else { return Ok(StepOutcome::default()) };
        let (last_position, last_hash) = (last.position, last.hash);
        ensure_rendered(rendered, &targets);
        let failures = apply_batch(&transaction, registry, &targets, &mut batch, rendered)?;
        let mut succeeded = Vec::new();
        for target in targets.iter().filter(|target| !failures.iter().any(|(index, _)| *index == target.index)) {
            if target.checkpoint < last_position {
                let name = registry.projectors()[target.index].name();
                storage::write_checkpoint(&transaction, Slot::Live, name, last_position, &last_hash)?;
                succeeded.push(target.index);
            }
        }
        transaction.commit()?;
        let outcome = StepOutcome { events: batch.events.len() as u64, swapped: false, succeeded, failures };
        self.note_retries(&outcome);
        Ok(outcome)
    }

    fn note_retries(&mut self, outcome: &StepOutcome) {
        for index in &outcome.succeeded {
            self.retry_at.remove(index);
        }
        let retry_at = Instant::now() + Duration::from_millis(ERROR_BACKOFF_MS);
        for (index, _) in &outcome.failures {
            self.retry_at.insert(*index, retry_at);
        }
    }

    /// One batch of a build; at the head, the swap. A member that fails
    /// keeps its checkpoint: split off to retry later if the build is
    /// needed, dropped otherwise.
    fn step_build(
        &mut self,
        registry: &Registry,
        job_id: u64,
        batch_events_max: usize,
    ) -> Result<StepOutcome, ProjectionError> {
        let job_index = self.jobs.iter().position(|job| job.id == job_id).expect("a job that exists");
        let job = &self.jobs[job_index];
        let (checkpoint, old_hash, needed) = (job.checkpoint, job.checkpoint_hash, job.needed);
        let targets: Vec<Target> = job
            .members
            .iter()
            .map(|(index, generation)| Target { index: *index, generation: *generation, checkpoint })
            .collect();
        let mut batch = self.read_build_batch(registry, job_index, checkpoint, batch_events_max)?;
        ensure_rendered(&mut self.rendered, &targets);
        let transaction = self.connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let failures = apply_batch(&transaction, registry, &targets, &mut batch, &self.rendered)?;
        let events_read = batch.events.len();
        let last_read = batch.events.last().map(|last| (last.position, last.hash));
        let healthy: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|target| !failures.iter().any(|(index, _)| *index == target.index))
            .collect();
        let (new_checkpoint, new_hash) = last_read.unwrap_or((checkpoint, old_hash));
        if new_checkpoint != checkpoint {
            for target in &healthy {
                let name = registry.projectors()[target.index].name();
                storage::write_checkpoint(&transaction, Slot::Build, name, new_checkpoint, &new_hash)?;
            }
        }
        // A short batch says the head was reached when the batch was read,
        // which with the read-ahead was a step ago: the log (and the live
        // generation, which moves between build steps) may be further on.
        // Swapping behind the live generation would move the served read
        // models back, so the head is read again here.
        let at_head = events_read < batch_events_max && self.events.head()?.position <= new_checkpoint;
        let finished = at_head && !healthy.is_empty();
        let mut dropped_generations = Vec::new();
        if finished {
            for target in &healthy {
                let projector = &registry.projectors()[target.index];
                let old = storage::read_row(&transaction, Slot::Live, projector.name())?;
                storage::write_row(
                    &transaction,
                    Slot::Live,
                    &GenerationRow {
                        projector: projector.name().to_owned(),
                        version: projector.version(),
                        generation: target.generation,
                        checkpoint: new_checkpoint,
                        checkpoint_hash: new_hash,
                    },
                )?;
                storage::delete_row(&transaction, Slot::Build, projector.name())?;
                if let Some(old) = old {
                    storage::drop_generation(&transaction, old.version, old.generation)?;
                    dropped_generations.push(old.generation);
                }
            }
        }
        transaction.commit()?;

        let failed_members: Vec<(usize, u64)> = targets
            .iter()
            .filter(|target| !healthy.iter().any(|healthy| healthy.index == target.index))
            .map(|target| (target.index, target.generation))
            .collect();
        let job = &mut self.jobs[job_index];
        if let Some(read_ahead) = &job.read_ahead {
            read_ahead.free(batch);
        }
        job.members.retain(|member| !failed_members.contains(member));
        job.checkpoint = new_checkpoint;
        job.checkpoint_hash = new_hash;
        if finished || job.members.is_empty() {
            self.jobs.remove(job_index);
        }
        self.rendered.retain(|(_, generation), _| !dropped_generations.contains(generation));
        if needed && !failed_members.is_empty() {
            self.push_job(failed_members, checkpoint, old_hash, true);
        } else {
            self.drop_builds(registry, &failed_members)?;
        }
        let outcome = StepOutcome {
            events: events_read as u64,
            swapped: finished,
            succeeded: healthy.iter().map(|target| target.index).collect(),
            failures,
        };
        self.note_retries(&outcome);
        Ok(outcome)
    }
}

fn ensure_rendered(rendered: &mut HashMap<(usize, u64), RenderedSql>, targets: &[Target]) {
    for target in targets {
        rendered.entry((target.index, target.generation)).or_default();
    }
}

/// The decoded event at `index` of a batch, decoded on first use (unless
/// the read-ahead did) and kept for the other projectors.
fn decoded<'cache>(
    cache: &'cache mut [Option<Option<Decoded>>],
    index: usize,
    recorded: &RecordedEvent,
) -> Result<&'cache Decoded, ProjectionError> {
    if cache[index].is_none() {
        cache[index] = Some(read_ahead::decode(recorded).ok());
    }
    match &cache[index] {
        Some(Some(event)) => Ok(event),
        // Decode again for the error itself (rare: the log is damaged).
        _ => Err(read_ahead::decode(recorded).err().map_or_else(
            || ProjectionError::Runner(format!("event {} decodes only sometimes", recorded.position)),
            ProjectionError::from,
        )),
    }
}

/// Applies a batch to each target, each inside its own savepoint, so that
/// one projector's failure rolls back its rows only. Returns the failures.
fn apply_batch(
    connection: &Connection,
    registry: &Registry,
    targets: &[Target],
    batch: &mut EventBatch,
    rendered: &HashMap<(usize, u64), RenderedSql>,
) -> Result<Vec<(usize, ProjectionError)>, ProjectionError> {
    let EventBatch { events, decoded: cache } = batch;
    // Event types are few and repeat: look each event's up once, then ask
    // each projector once per type rather than once per event.
    let mut types: Vec<&str> = Vec::new();
    let mut type_indexes: HashMap<&str, usize> = HashMap::new();
    let event_types: Vec<usize> = events
        .iter()
        .map(|recorded| {
            *type_indexes.entry(recorded.event_type.as_str()).or_insert_with(|| {
                types.push(recorded.event_type.as_str());
                types.len() - 1
            })
        })
        .collect();
    let mut failures = Vec::new();
    for target in targets {
        let projector = &registry.projectors()[target.index];
        let handled: Vec<bool> = types.iter().map(|event_type| projector.handles().contains(event_type)).collect();
        let tx = ProjectorTx::new(
            connection,
            projector.tables(),
            projector.version(),
            target.generation,
            &rendered[&(target.index, target.generation)],
        );
        connection.execute_batch("SAVEPOINT projector")?;
        let mut apply_all = || -> Result<(), ProjectionError> {
            for (index, recorded) in events.iter().enumerate() {
                if recorded.position <= target.checkpoint || !handled[event_types[index]] {
                    continue;
                }
                if !read_ahead::projected_stream(&recorded.stream_id) {
                    continue;
                }
                let occurred_at = recorded.metadata.occurred_at.unwrap_or(recorded.recorded_at);
                match decoded(cache, index, recorded)? {
                    Decoded::Member(event) => {
                        let member_id = recorded.stream_id.strip_prefix(MEMBER_STREAM_PREFIX).unwrap_or_default();
                        projector.apply(&tx, &ProjectedEvent { recorded, member_id, event, occurred_at })?;
                    }
                    Decoded::Integration(event) => {
                        let Some((member_id, integration_id)) = parse_integration_stream(&recorded.stream_id) else {
                            continue;
                        };
                        let projected =
                            IntegrationProjected { recorded, member_id, integration_id, event, occurred_at };
                        projector.apply_integration(&tx, &projected)?;
                    }
                }
            }
            tx.finish()
        };
        match apply_all() {
            Ok(()) => connection.execute_batch("RELEASE projector")?,
            Err(error) => {
                connection.execute_batch("ROLLBACK TO projector; RELEASE projector")?;
                failures.push((target.index, error));
            }
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shareable<T: Send + Sync>() {}

    #[test]
    fn the_owner_and_the_query_side_are_shared_between_threads() {
        shareable::<Projections>();
        shareable::<ReadModels>();
        shareable::<RunnerHandle>();
    }

    #[test]
    fn the_lock_file_sits_beside_the_projections_file() {
        assert_eq!(lock_path(Path::new("/data/projections.db")), PathBuf::from("/data/projections.db.lock"));
    }
}
