//! The write side: one connection, and batches that group many commands into
//! one transaction (one fsync).
//!
//! Nothing here trusts a cache across transactions. The head and every
//! stream version are read from the file after `BEGIN IMMEDIATE` has taken
//! SQLite's write lock, so that another process appending to the same file
//! between two batches (the CLI beside a running server) is seen, not
//! overwritten. Inside one batch the head is carried in memory from append to
//! append, and restored when a command's savepoint is rolled back.
//!
//! A batch comes in two kinds. [`EventStore::begin_batch`] gives every
//! command a SAVEPOINT, so that a command that fails part-way is undone on
//! its own. [`EventStore::begin_optimistic_batch`] gives commands no
//! savepoint at all: a command that is refused before it writes (a business
//! rejection, a version conflict, a duplicate key found by its lookup) has
//! nothing to undo, and one that fails after writing marks the batch as
//! needing a replay ([`Batch::needs_replay_with_savepoints`]): the caller
//! drops it, which rolls all of it back, and runs the same commands again in
//! a batch with savepoints. Savepoints are not free: each one journals the
//! first change to every page it touches (a 4 KiB copy per page and command)
//! and costs two statements, which was a fifth of the writer's time.
//!
//! A batch must never fall back to autocommit: SQLite ends a transaction by
//! itself on some errors (a full disk, an I/O error), after which each
//! further statement would commit on its own. Every batch operation checks
//! that the transaction is still open and otherwise refuses with
//! [`StoreError::BatchAborted`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Datelike, SubsecRound, TimeDelta, Utc};
use rusqlite::{Connection, OptionalExtension, ffi, params};

use super::checkpoint::{BackgroundCheckpoints, CheckpointOptions, CheckpointStats};
use super::durability::WalSync;
use super::error::is_constraint;
use super::hash::{ChainLink, chain_hash, format_recorded_at};
use super::rows::{self, Tip, to_sql_integer};
use super::schema::{open_for_writing, rollback_quietly};
use super::{
    APPEND_EVENTS_MAX, AppendOutcome, EVENT_PAYLOAD_BYTES_MAX, EVENT_TYPE_BYTES_MAX, EventMetadata, EventReader,
    ExpectedVersion, Head, IDEMPOTENCY_RESPONSE_BYTES_MAX, IdempotencyRecord, Imported, KEY_BYTES_MAX, NewEvent,
    RecordedEvent, STREAM_ID_BYTES_MAX, Snapshot, StoreError, StoreOptions, UsageIndexEntry,
};

/// Idempotency records are kept at least this long, so that a client
/// retrying within a week always gets the original answer.
pub const IDEMPOTENCY_RETENTION_MIN_DAYS: i64 = 7;

/// Largest serialised metadata, in bytes. Metadata is a few ids and a key.
const EVENT_METADATA_BYTES_MAX: usize = 16 * 1024;

const INSERT_EVENT_SQL: &str = "INSERT INTO events (position, stream_id, version, event_type, schema_version, event_id, payload, metadata, recorded_at, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// Owns the single write connection to one event log file.
pub struct EventStore {
    /// Declared before `connection` so that it is dropped first: its thread
    /// closes its own connection before the writer's closes.
    checkpoints: Option<BackgroundCheckpoints>,
    pub(super) connection: Connection,
    path: PathBuf,
    /// The head after the last committed batch (or as reloaded after a
    /// failed one). A hint for callers; appends re-read it from the file.
    tip: Tip,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EventStore")
            .field("path", &self.path)
            .field("head", &self.tip.head)
            .finish_non_exhaustive()
    }
}

impl EventStore {
    /// Opens the log at `path`, creating the file and its schema if it does
    /// not exist. A file that is not a tally log is refused, unchanged.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let connection = open_for_writing(path, options.synchronous_full, options.busy_timeout_ms)?;
        if let Some(bytes) = options.max_log_bytes {
            let page_size: i64 = connection.query_row("PRAGMA page_size", [], |row| row.get(0))?;
            // SQLite keeps the current size if the budget is below it.
            let pages = (bytes / page_size.max(1) as u64).clamp(1, i64::MAX as u64);
            let _: i64 = connection.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |row| row.get(0))?;
        }
        let tip = rows::read_tip(&connection)?;
        Ok(EventStore { checkpoints: None, connection, path: path.to_path_buf(), tip })
    }

    /// Takes WAL checkpoints off the commit path: a thread of the store's
    /// own copies the WAL into the database file beside the writer, and the
    /// writer rewinds the WAL between batches (see `checkpoint.rs`). Without
    /// this, SQLite checkpoints inside the commit that crosses 1,000 pages.
    pub fn checkpoint_in_background(&mut self, options: CheckpointOptions) -> Result<Arc<CheckpointStats>, StoreError> {
        if let Some(running) = &self.checkpoints {
            return Ok(running.stats());
        }
        let checkpoints = BackgroundCheckpoints::start(&mut self.connection, &self.path, options)?;
        let stats = checkpoints.stats();
        self.checkpoints = Some(checkpoints);
        Ok(stats)
    }

    /// Takes the WAL's fsync out of `COMMIT`: from now on a commit only
    /// writes its frames, and is durable once the returned [`WalSync`] has
    /// synced after it. The caller must not report a commit as durable
    /// before then (see `durability.rs`). A store opened with
    /// `synchronous=NORMAL` is left as it is, and its `WalSync` never
    /// fsyncs.
    pub fn sync_wal_beside(&mut self) -> Result<WalSync, StoreError> {
        WalSync::start(&self.connection, &self.path)
    }

    /// Leaves the fsync in `COMMIT` (as the store was opened): the returned
    /// [`WalSync`] never fsyncs, so that a caller written for
    /// [`EventStore::sync_wal_beside`] runs unchanged on the plain path.
    pub fn sync_wal_in_commit(&self) -> WalSync {
        WalSync::in_commit(&self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The head as of this store's last commit (or reload). Another process
    /// may have appended since; [`EventReader::head`] reads the file.
    pub fn head(&self) -> Head {
        self.tip.head
    }

    /// A separate read-only connection on the same file.
    pub fn reader(&self) -> Result<EventReader, StoreError> {
        EventReader::open(&self.path)
    }

    /// Appends `events` to `stream_id` in a transaction of its own.
    pub fn append(
        &mut self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        recorded_at: DateTime<Utc>,
    ) -> Result<AppendOutcome, StoreError> {
        let mut batch = self.begin_batch()?;
        let outcome = batch.append(stream_id, expected, events, recorded_at)?;
        batch.commit()?;
        Ok(outcome)
    }

    /// Starts a group commit whose commands each run in a SAVEPOINT:
    /// `BEGIN IMMEDIATE` (waiting up to the busy timeout for another
    /// writer), then re-reads the head from the file.
    pub fn begin_batch(&mut self) -> Result<Batch<'_>, StoreError> {
        self.begin(CommandUndo::Savepoint)
    }

    /// Starts a group commit whose commands run without savepoints (see the
    /// module's documentation): the caller must check
    /// [`Batch::needs_replay_with_savepoints`] and, when it says so, drop
    /// the batch and run its commands again in [`EventStore::begin_batch`].
    pub fn begin_optimistic_batch(&mut self) -> Result<Batch<'_>, StoreError> {
        self.begin(CommandUndo::NothingWritten)
    }

    fn begin(&mut self, undo: CommandUndo) -> Result<Batch<'_>, StoreError> {
        if !self.connection.is_autocommit() {
            // Only reachable if a rollback failed earlier; never build on it.
            tracing::warn!("a transaction was left open on the event log; rolling it back");
            rollback_quietly(&self.connection);
        }
        if let Some(checkpoints) = &mut self.checkpoints {
            checkpoints.before_batch(&self.connection);
        }
        self.connection.execute_batch("BEGIN IMMEDIATE")?;
        let tip = match rows::read_tip(&self.connection) {
            Ok(tip) => tip,
            Err(error) => {
                rollback_quietly(&self.connection);
                return Err(error);
            }
        };
        self.tip = tip;
        Ok(Batch {
            store: self,
            tip,
            undo,
            writes: 0,
            needs_replay: false,
            commands: Vec::new(),
            import_cursor: None,
            aborted: false,
            abort_cause: None,
            finished: false,
        })
    }

    /// Deletes idempotency records accepted before `now - retention`, and
    /// returns how many. `retention` must be at least
    /// [`IDEMPOTENCY_RETENTION_MIN_DAYS`].
    pub fn purge_idempotency(&mut self, now: DateTime<Utc>, retention: TimeDelta) -> Result<usize, StoreError> {
        if retention < TimeDelta::days(IDEMPOTENCY_RETENTION_MIN_DAYS) {
            return Err(StoreError::InvalidArgument(format!(
                "idempotency records are kept at least {IDEMPOTENCY_RETENTION_MIN_DAYS} days, not {retention}"
            )));
        }
        let cutoff = now
            .checked_sub_signed(retention)
            .ok_or_else(|| StoreError::InvalidArgument(format!("{now} minus {retention} is out of range")))?;
        let mut statement = self.connection.prepare_cached("DELETE FROM idempotency WHERE recorded_at < ?1")?;
        Ok(statement.execute(params![format_recorded_at(cutoff)])?)
    }

    /// Rolls back whatever transaction is open and reloads the head from the
    /// file, after a batch failed or was dropped.
    fn rollback_and_reload(&mut self) {
        rollback_quietly(&self.connection);
        match rows::read_tip(&self.connection) {
            Ok(tip) => self.tip = tip,
            // The next batch re-reads the head anyway; this only leaves the hint stale.
            Err(error) => tracing::warn!(%error, "reloading the event log head failed"),
        }
    }
}

/// One transaction holding several commands, each in its own savepoint.
///
/// Dropping a batch without [`Batch::commit`] rolls all of it back.
pub struct Batch<'store> {
    store: &'store mut EventStore,
    /// The head including this batch's appends so far.
    tip: Tip,
    /// How a command is undone.
    undo: CommandUndo,
    /// Write statements run in this batch so far (attempted ones included:
    /// a failed statement may still have ended the transaction).
    writes: u64,
    /// A command of an optimistic batch failed after it wrote: the batch
    /// cannot undo it, refuses to commit, and must be run again with
    /// savepoints.
    needs_replay: bool,
    /// Each open command, innermost last: the head and the write count when
    /// it began.
    commands: Vec<CommandMark>,
    /// The last event [`Batch::import_event`] checked, whether it was
    /// already in the log or appended: the next one must follow it.
    import_cursor: Option<Head>,
    /// SQLite ended the transaction on its own; nothing more may run.
    aborted: bool,
    /// Why, when it was a full disk or a lock: the commit reports that kind
    /// (503, retry later) rather than a generic abort.
    abort_cause: Option<AbortCause>,
    /// Committed or rolled back already; `Drop` has nothing to do.
    finished: bool,
}

/// How a batch undoes a command that fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommandUndo {
    /// Each command runs in a SAVEPOINT and is rolled back to it.
    Savepoint,
    /// No savepoint: only a command that wrote nothing can be undone.
    NothingWritten,
}

#[derive(Clone, Copy, Debug)]
struct CommandMark {
    tip: Tip,
    writes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AbortCause {
    Full,
    Busy,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Batch")
            .field("head", &self.tip.head)
            .field("open_commands", &self.commands.len())
            .field("undo", &self.undo)
            .field("aborted", &self.aborted)
            .finish_non_exhaustive()
    }
}

impl Batch<'_> {
    /// The head including this batch's appends so far.
    pub fn head(&self) -> Head {
        self.tip.head
    }

    /// Starts a command: a savepoint that [`Batch::rollback_command`] can
    /// return to without touching the batch's other commands (in an
    /// optimistic batch, only a mark of what the batch had written).
    pub fn begin_command(&mut self) -> Result<(), StoreError> {
        self.ensure_open()?;
        if self.undo == CommandUndo::Savepoint {
            let result = run_cached(self.connection(), "SAVEPOINT command");
            self.after(result)?;
        }
        self.commands.push(CommandMark { tip: self.tip, writes: self.writes });
        Ok(())
    }

    /// Keeps the current command's writes in the batch.
    pub fn commit_command(&mut self) -> Result<(), StoreError> {
        self.ensure_open()?;
        if self.commands.is_empty() {
            return Err(StoreError::Misuse("commit_command without begin_command"));
        }
        if self.undo == CommandUndo::Savepoint {
            let result = run_cached(self.connection(), "RELEASE command");
            self.after(result)?;
        }
        self.commands.pop();
        Ok(())
    }

    /// Undoes the current command's writes, and its appends to the head.
    ///
    /// In an optimistic batch a command that wrote cannot be undone: the
    /// batch is then marked for a replay with savepoints, refuses every
    /// further statement and its commit, and this returns
    /// [`StoreError::BatchAborted`].
    pub fn rollback_command(&mut self) -> Result<(), StoreError> {
        self.ensure_open()?;
        let Some(command) = self.commands.pop() else {
            return Err(StoreError::Misuse("rollback_command without begin_command"));
        };
        if self.undo == CommandUndo::NothingWritten {
            if self.writes != command.writes {
                self.needs_replay = true;
                self.aborted = true;
                return Err(StoreError::BatchAborted);
            }
            return Ok(());
        }
        let result = self.connection().execute_batch("ROLLBACK TO command; RELEASE command");
        if let Err(error) = result {
            // The savepoint's state is unknown now; only a full rollback is safe.
            self.aborted = true;
            return Err(error.into());
        }
        self.tip = command.tip;
        Ok(())
    }

    /// True when a command of this optimistic batch failed after writing:
    /// drop the batch (which rolls it all back) and run its commands again
    /// in a batch with savepoints. Its commit would fail.
    pub fn needs_replay_with_savepoints(&self) -> bool {
        self.needs_replay
    }

    /// The stream's current version, including this batch's appends (0 = no stream).
    pub fn stream_version(&mut self, stream_id: &str) -> Result<u64, StoreError> {
        self.ensure_open()?;
        let result = rows::stream_version(self.connection(), stream_id);
        self.after(result)
    }

    /// Appends `events` to `stream_id` after checking `expected` against the
    /// stream's version in this transaction. All or nothing: on any error
    /// none of the events is written and the head is unchanged.
    ///
    /// An expected version (`Exact`, `NoStream`) is checked by the log's own
    /// trigger, which refuses an event that is not at the next version of
    /// its stream (the store refuses to open a log without it): the events
    /// are inserted at the versions that follow the expected one, and the
    /// stream's version is read only when the first insert is refused, to
    /// tell a [`StoreError::VersionConflict`] from another refusal. That
    /// read before every append was 7 % of the writer's time. `Any` reads
    /// the version first.
    ///
    /// `recorded_at` is truncated to microseconds and raised to the last
    /// event's `recorded_at` if it is earlier, so that `recorded_at` never
    /// decreases along the log and an as-of read is a prefix of a stream.
    pub fn append(
        &mut self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        recorded_at: DateTime<Utc>,
    ) -> Result<AppendOutcome, StoreError> {
        self.ensure_open()?;
        validate_append(stream_id, &events, recorded_at)?;
        let assumed = match expected {
            ExpectedVersion::Exact(version) => version,
            ExpectedVersion::NoStream => 0,
            ExpectedVersion::Any => self.after(rows::stream_version(self.connection(), stream_id))?,
        };
        let recorded_at = match self.tip.recorded_at {
            Some(last) => recorded_at.trunc_subsecs(6).max(last),
            None => recorded_at.trunc_subsecs(6),
        };

        let first_position = self.tip.head.position + 1;
        // An optimistic batch needs no savepoint here: if the inserts fail
        // part-way, the command fails after writing and the batch is
        // replayed with savepoints.
        let savepoint = self.undo == CommandUndo::Savepoint;
        if savepoint {
            self.after(run_cached(self.connection(), "SAVEPOINT append"))?;
        }
        self.will_write();
        let inserted = match insert_events(self.connection(), self.tip.head, stream_id, assumed, &events, recorded_at) {
            Ok(head) => Ok(head),
            // Some events are in and no savepoint can take them out: the
            // batch must not go on or commit (all or nothing, here too).
            Err(failure) if !savepoint && failure.inserted > 0 => {
                self.needs_replay = true;
                self.aborted = true;
                Err(failure.error)
            }
            Err(failure) => Err(self.explain_refusal(failure, stream_id, expected)),
        };
        match inserted {
            Ok(head) => {
                if savepoint {
                    self.after(run_cached(self.connection(), "RELEASE append"))?;
                }
                self.tip = Tip { head, recorded_at: Some(recorded_at) };
                Ok(AppendOutcome {
                    first_position,
                    last_position: head.position,
                    last_version: assumed + events.len() as u64,
                    recorded_at,
                })
            }
            Err(error) if !savepoint => {
                if self.store.connection.is_autocommit() {
                    self.abort(&error);
                }
                Err(error)
            }
            Err(error) => {
                let undone = self.connection().execute_batch("ROLLBACK TO append; RELEASE append");
                if undone.is_err() || self.store.connection.is_autocommit() {
                    self.abort(&error);
                }
                Err(error)
            }
        }
    }

    /// The error of a failed append. When the log's trigger refused the
    /// first event (nothing was written), the stream's version says whether
    /// the expectation was wrong: then it is a version conflict, and the
    /// write that was counted for it is taken back, so that an optimistic
    /// batch can still undo the command (it wrote nothing).
    fn explain_refusal(&mut self, failure: InsertFailure, stream_id: &str, expected: ExpectedVersion) -> StoreError {
        if failure.inserted > 0 || !failure.refused_by_trigger {
            return failure.error;
        }
        match rows::stream_version(self.connection(), stream_id) {
            Ok(actual) if !expected.accepts(actual) => {
                self.writes -= 1;
                StoreError::VersionConflict { stream_id: stream_id.to_string(), expected, actual }
            }
            Ok(_) => failure.error,
            Err(error) => error,
        }
    }

    /// Imports one event of an exported log, exactly as it was stored there:
    /// its position, version, `recorded_at`, payload and metadata bytes, and
    /// hash. Events are given in position order; the first may start
    /// anywhere up to the head + 1, each later one must follow the one
    /// before.
    ///
    /// An event must hash, from the event before it (in the file, or in the
    /// log for the first), to the hash it carries. Where the log already has
    /// the position, the stored event must be the same one (same hash):
    /// [`Imported::AlreadyPresent`], nothing written. Beyond the head it is
    /// appended, at the next version of its stream and with a `recorded_at`
    /// no earlier than the last one. Anything else is
    /// [`StoreError::ImportRefused`] naming the position; drop the batch so
    /// that none of the import is written.
    ///
    /// The store's side indexes (usage ids, due instants) are the caller's:
    /// they derive from what the payloads mean.
    pub fn import_event(&mut self, event: &RecordedEvent) -> Result<Imported, StoreError> {
        self.ensure_open()?;
        let refuse = |reason: String| StoreError::ImportRefused { position: event.position, reason };
        let head_position = self.tip.head.position;
        let previous_hash = match self.import_cursor {
            Some(last) if event.position != last.position + 1 => {
                return Err(refuse(format!("it follows position {}; positions must be gapless", last.position)));
            }
            Some(last) => last.hash,
            None if event.position == 0 => return Err(refuse("positions start at 1".to_owned())),
            None if event.position > head_position + 1 => {
                return Err(refuse(format!(
                    "the log ends at position {head_position}, so an import must start at or before position {}",
                    head_position + 1
                )));
            }
            None => {
                let found = rows::hash_at(self.connection(), event.position - 1);
                self.after(found)?.ok_or_else(|| refuse(format!("position {} is missing", event.position - 1)))?
            }
        };
        let computed = event.expected_hash(&previous_hash);
        if computed != event.hash {
            return Err(refuse(format!(
                "its hash does not chain: the file says {} but the event hashes to {}",
                hex::encode(event.hash),
                hex::encode(computed)
            )));
        }
        let imported = if event.position <= head_position {
            let stored = self.after(rows::hash_at(self.connection(), event.position))?;
            if stored != Some(event.hash) {
                return Err(refuse("the log already holds a different event at this position".to_owned()));
            }
            Imported::AlreadyPresent
        } else {
            self.append_imported(event).map_err(|error| match error {
                StoreError::InvalidArgument(reason) => refuse(reason),
                other => other,
            })?;
            Imported::Appended
        };
        self.import_cursor = Some(Head { position: event.position, hash: event.hash });
        Ok(imported)
    }

    /// Writes one imported event after the head, after checking what the
    /// log's triggers would refuse, so that the refusal can say why.
    fn append_imported(&mut self, event: &RecordedEvent) -> Result<(), StoreError> {
        validate_imported(event)?;
        self.will_write();
        let stream_version = self.after(rows::stream_version(self.connection(), &event.stream_id))?;
        if event.version != stream_version + 1 {
            return Err(StoreError::InvalidArgument(format!(
                "it is version {} of stream {}, but the stream is at version {stream_version}",
                event.version, event.stream_id
            )));
        }
        if let Some(last) = self.tip.recorded_at
            && event.recorded_at < last
        {
            return Err(StoreError::InvalidArgument(format!(
                "its recorded_at {} is earlier than the last event's {}",
                format_recorded_at(event.recorded_at),
                format_recorded_at(last)
            )));
        }
        let mut statement = self.connection().prepare_cached(INSERT_EVENT_SQL)?;
        let inserted = statement.execute(params![
            to_sql_integer(event.position, "position")?,
            event.stream_id,
            to_sql_integer(event.version, "version")?,
            event.event_type,
            event.schema_version,
            event.event_id.as_bytes().as_slice(),
            event.payload,
            event.metadata_json,
            format_recorded_at(event.recorded_at),
            event.hash.as_slice(),
        ]);
        drop(statement);
        match inserted {
            Ok(_) => {}
            Err(error) if is_constraint(&error, ffi::SQLITE_CONSTRAINT_UNIQUE) => {
                return Err(StoreError::Duplicate { what: "event id", key: event.event_id.to_string() });
            }
            Err(error) => return self.after(Err(error)),
        }
        self.tip =
            Tip { head: Head { position: event.position, hash: event.hash }, recorded_at: Some(event.recorded_at) };
        Ok(())
    }

    /// The stored result of an earlier command with this key in this scope.
    pub fn idempotency(&mut self, scope: &str, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.ensure_open()?;
        let result = rows::idempotency(self.connection(), scope, key);
        self.after(result)
    }

    /// Records an accepted command's result under its key. A key already
    /// recorded in this scope is [`StoreError::Duplicate`]: look it up first.
    pub fn record_idempotency(&mut self, scope: &str, key: &str, record: &IdempotencyRecord) -> Result<(), StoreError> {
        self.ensure_open()?;
        check_key("idempotency scope", scope)?;
        check_key("idempotency key", key)?;
        if record.response.len() > IDEMPOTENCY_RESPONSE_BYTES_MAX {
            return Err(StoreError::InvalidArgument(format!(
                "an idempotent response of {} bytes exceeds {IDEMPOTENCY_RESPONSE_BYTES_MAX} bytes",
                record.response.len()
            )));
        }
        let position = to_sql_integer(record.position, "position")?;
        self.will_write();
        let mut statement = self.connection().prepare_cached(
            "INSERT INTO idempotency (scope, key, fingerprint, status, response, position, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let inserted = statement.execute(params![
            scope,
            key,
            record.fingerprint.as_slice(),
            record.status,
            record.response,
            position,
            format_recorded_at(record.recorded_at),
        ]);
        drop(statement);
        match inserted {
            Ok(_) => Ok(()),
            Err(error) if is_constraint(&error, ffi::SQLITE_CONSTRAINT_PRIMARYKEY) => {
                Err(StoreError::Duplicate { what: "idempotency key", key: format!("{scope}/{key}") })
            }
            Err(error) => self.after(Err(error)),
        }
    }

    /// The usage index entry for `usage_id` in `stream_id`, if recorded.
    pub fn usage(&mut self, stream_id: &str, usage_id: &str) -> Result<Option<UsageIndexEntry>, StoreError> {
        self.ensure_open()?;
        let result = rows::usage(self.connection(), stream_id, usage_id);
        self.after(result)
    }

    /// The stored snapshot of a stream's state, if one matches the log: the
    /// event at its version must still be there with the hash it had when
    /// the snapshot was taken (a log restored from an older copy, or
    /// rewritten by an import, invalidates it).
    pub fn snapshot(&mut self, stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        self.ensure_open()?;
        let result = self
            .connection()
            .prepare_cached(
                "SELECT s.version, s.format, s.state FROM snapshots s
                 JOIN events e ON e.stream_id = s.stream_id AND e.version = s.version AND e.hash = s.hash
                 WHERE s.stream_id = ?1",
            )
            .and_then(|mut statement| {
                statement
                    .query_row([stream_id], |row| {
                        Ok(Snapshot { version: row.get::<_, i64>(0)? as u64, format: row.get(1)?, state: row.get(2)? })
                    })
                    .optional()
            });
        self.after(result)
    }

    /// Stores (replaces) the snapshot of a stream's state at `version`, an
    /// event of this stream already appended (in this batch or before).
    pub fn save_snapshot(&mut self, stream_id: &str, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.ensure_open()?;
        // Not counted as a command's write: a snapshot is of the stream as
        // this transaction holds it, so it commits or rolls back with the
        // events it describes, and a command refused after saving one has
        // nothing to undo.
        let version = to_sql_integer(snapshot.version, "version")?;
        let result = self
            .connection()
            .prepare_cached(
                "INSERT INTO snapshots (stream_id, version, format, hash, state)
                 SELECT ?1, ?2, ?3, hash, ?4 FROM events WHERE stream_id = ?1 AND version = ?2
                 ON CONFLICT (stream_id) DO UPDATE
                 SET version = excluded.version, format = excluded.format, hash = excluded.hash, state = excluded.state",
            )
            .and_then(|mut statement| statement.execute(params![stream_id, version, snapshot.format, snapshot.state]));
        match self.after(result)? {
            1 => Ok(()),
            _ => Err(StoreError::InvalidArgument(format!(
                "no event at version {} of stream {stream_id} to snapshot",
                snapshot.version
            ))),
        }
    }

    /// Drops a customer's link to a stream whose profile no longer names it.
    pub fn unlink_stripe_customer(&mut self, customer_id: &str, stream_id: &str) -> Result<(), StoreError> {
        self.ensure_open()?;
        self.will_write();
        let result = self
            .connection()
            .prepare_cached("DELETE FROM stripe_customers WHERE customer_id = ?1 AND stream_id = ?2")
            .and_then(|mut statement| statement.execute(params![customer_id, stream_id]))
            .map(drop);
        self.after(result)
    }

    /// Links a Stripe customer to a member stream (the last link wins).
    pub fn link_stripe_customer(&mut self, customer_id: &str, stream_id: &str) -> Result<(), StoreError> {
        self.ensure_open()?;
        check_key("stripe customer id", customer_id)?;
        self.will_write();
        let result = self
            .connection()
            .prepare_cached(
                "INSERT INTO stripe_customers (customer_id, stream_id) VALUES (?1, ?2)
                 ON CONFLICT (customer_id) DO UPDATE SET stream_id = excluded.stream_id",
            )
            .and_then(|mut statement| statement.execute(params![customer_id, stream_id]))
            .map(drop);
        self.after(result)
    }

    /// Indexes a usage id; a usage id already recorded in the stream is
    /// [`StoreError::Duplicate`] (usage ids are unique per member for ever).
    pub fn record_usage(
        &mut self,
        stream_id: &str,
        usage_id: &str,
        position: u64,
        credits: i64,
    ) -> Result<(), StoreError> {
        self.ensure_open()?;
        check_key("usage id", usage_id)?;
        self.will_write();
        #[cfg(feature = "fault-injection")]
        if let Some(error) = super::faults::usage_index_fault(&self.store.path) {
            return Err(error);
        }
        let position = to_sql_integer(position, "position")?;
        let mut statement = self.connection().prepare_cached(
            "INSERT INTO usages (stream_id, usage_id, position, credits, reversed_position) VALUES (?1, ?2, ?3, ?4, NULL)",
        )?;
        let inserted = statement.execute(params![stream_id, usage_id, position, credits]);
        drop(statement);
        match inserted {
            Ok(_) => Ok(()),
            Err(error) if is_constraint(&error, ffi::SQLITE_CONSTRAINT_PRIMARYKEY) => {
                Err(StoreError::Duplicate { what: "usage id", key: format!("{stream_id}/{usage_id}") })
            }
            Err(error) => self.after(Err(error)),
        }
    }

    /// Marks a recorded usage as reversed by the event at `position`. An
    /// unknown or already reversed usage is refused: the caller checks first.
    pub fn mark_usage_reversed(&mut self, stream_id: &str, usage_id: &str, position: u64) -> Result<(), StoreError> {
        self.ensure_open()?;
        let position = to_sql_integer(position, "position")?;
        self.will_write();
        let mut statement = self.connection().prepare_cached(
            "UPDATE usages SET reversed_position = ?3 WHERE stream_id = ?1 AND usage_id = ?2 AND reversed_position IS NULL",
        )?;
        let updated = statement.execute(params![stream_id, usage_id, position]);
        drop(statement);
        match self.after(updated)? {
            1 => Ok(()),
            _ => Err(StoreError::InvalidArgument(format!(
                "usage {usage_id} of stream {stream_id} is unknown or already reversed"
            ))),
        }
    }

    /// Up to `limit` events of a stream with versions `>= from_version`,
    /// ascending, including this batch's uncommitted appends: how the writer
    /// loads a member's state inside the transaction it decides in.
    pub fn read_stream(
        &mut self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.ensure_open()?;
        let result = rows::read_stream(self.connection(), stream_id, from_version, limit);
        self.after(result)
    }

    /// Sets when `stream_id` next has time-driven work; `None` removes it
    /// from the schedule. A row that already holds `due_at` is left as it is
    /// (the upsert's `WHERE`): no page is dirtied for the commit to write.
    pub fn set_due(&mut self, stream_id: &str, due_at: Option<DateTime<Utc>>) -> Result<(), StoreError> {
        self.ensure_open()?;
        if let Some(due_at) = due_at {
            check_year(due_at, "due_at")?;
        }
        self.will_write();
        let result = match due_at {
            Some(due_at) => {
                self.connection()
                    .prepare_cached(
                        "INSERT INTO schedule (stream_id, due_at) VALUES (?1, ?2) ON CONFLICT (stream_id) DO UPDATE SET due_at = excluded.due_at WHERE due_at IS NOT excluded.due_at",
                    )
                    .and_then(|mut statement| {
                        statement.execute(params![stream_id, format_recorded_at(due_at)])
                    })
            }
            None => self
                .connection()
                .prepare_cached("DELETE FROM schedule WHERE stream_id = ?1")
                .and_then(|mut statement| statement.execute(params![stream_id])),
        };
        self.after(result).map(|_| ())
    }

    /// Up to `streams_max` streams whose work is due at `now` (due_at <= now),
    /// the longest overdue first.
    pub fn due_streams(&mut self, now: DateTime<Utc>, streams_max: usize) -> Result<Vec<String>, StoreError> {
        self.ensure_open()?;
        let limit = rows::check_page_size(streams_max)?;
        let result = self
            .connection()
            .prepare_cached("SELECT stream_id FROM schedule WHERE due_at <= ?1 ORDER BY due_at, stream_id LIMIT ?2")
            .and_then(|mut statement| {
                statement
                    .query_map(params![format_recorded_at(now), limit], |row| row.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()
            });
        self.after(result)
    }

    /// Commits the batch. On failure the whole batch is rolled back, the
    /// store's head is reloaded from the file, and none of its commands may
    /// be acknowledged.
    pub fn commit(mut self) -> Result<(), StoreError> {
        self.finished = true;
        if self.aborted || self.store.connection.is_autocommit() {
            self.store.rollback_and_reload();
            return Err(match self.abort_cause {
                Some(AbortCause::Full) => StoreError::Full,
                Some(AbortCause::Busy) => StoreError::Busy,
                None => StoreError::BatchAborted,
            });
        }
        if !self.commands.is_empty() {
            self.store.rollback_and_reload();
            return Err(StoreError::Misuse("commit with a command still open (the batch was rolled back)"));
        }
        #[cfg(feature = "fault-injection")]
        if let Some(error) = super::faults::commit_fault(&self.store.path) {
            self.store.rollback_and_reload();
            return Err(error);
        }
        match self.store.connection.execute_batch("COMMIT") {
            Ok(()) => {
                self.store.tip = self.tip;
                if let Some(checkpoints) = &mut self.store.checkpoints {
                    checkpoints.after_commit();
                }
                Ok(())
            }
            Err(error) => {
                self.store.rollback_and_reload();
                Err(error.into())
            }
        }
    }

    fn connection(&self) -> &Connection {
        &self.store.connection
    }

    /// Counts a write statement about to run, so that an optimistic batch
    /// knows whether a failing command left anything to undo.
    fn will_write(&mut self) {
        self.writes += 1;
    }

    /// Refuses to run anything once the transaction is gone.
    fn ensure_open(&mut self) -> Result<(), StoreError> {
        if self.aborted || self.finished {
            return Err(StoreError::BatchAborted);
        }
        if self.store.connection.is_autocommit() {
            self.aborted = true;
            return Err(StoreError::BatchAborted);
        }
        Ok(())
    }

    /// Passes a result through, noting whether an error ended the transaction.
    fn after<T, E>(&mut self, result: Result<T, E>) -> Result<T, StoreError>
    where
        StoreError: From<E>,
    {
        let result = result.map_err(StoreError::from);
        if let Err(error) = &result
            && self.store.connection.is_autocommit()
        {
            self.abort(error);
        }
        result
    }

    /// SQLite ended the transaction (it may, on a full disk or an I/O
    /// error): remember it, and why.
    fn abort(&mut self, error: &StoreError) {
        self.aborted = true;
        self.abort_cause = self.abort_cause.or(match error {
            StoreError::Full => Some(AbortCause::Full),
            StoreError::Busy => Some(AbortCause::Busy),
            _ => None,
        });
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.store.rollback_and_reload();
        }
    }
}

/// Why [`insert_events`] stopped.
struct InsertFailure {
    error: StoreError,
    /// Events inserted before the failing one.
    inserted: usize,
    /// The log's `BEFORE INSERT` trigger refused the event: not at the next
    /// position, or not at the next version of its stream.
    refused_by_trigger: bool,
}

/// Inserts the events after `head`, at the versions after `stream_version`,
/// returning the new head. The caller undoes everything if this fails
/// part-way (a savepoint, or the batch replayed with savepoints).
fn insert_events(
    connection: &Connection,
    head: Head,
    stream_id: &str,
    stream_version: u64,
    events: &[NewEvent],
    recorded_at: DateTime<Utc>,
) -> Result<Head, InsertFailure> {
    let recorded_at_text = format_recorded_at(recorded_at);
    let refused = |error: StoreError, inserted: usize| {
        let refused_by_trigger =
            matches!(&error, StoreError::Sqlite(sqlite) if is_constraint(sqlite, ffi::SQLITE_CONSTRAINT_TRIGGER));
        InsertFailure { error, inserted, refused_by_trigger }
    };
    let mut statement = connection.prepare_cached(INSERT_EVENT_SQL).map_err(|error| refused(error.into(), 0))?;
    let mut head = head;
    for (index, event) in events.iter().enumerate() {
        let version = stream_version + index as u64 + 1;
        head = insert_event(&mut statement, head, stream_id, version, event, &recorded_at_text)
            .map_err(|error| refused(error, index))?;
    }
    Ok(head)
}

/// Inserts one event after `head` at `version`, returning the new head.
fn insert_event(
    statement: &mut rusqlite::CachedStatement<'_>,
    head: Head,
    stream_id: &str,
    version: u64,
    event: &NewEvent,
    recorded_at_text: &str,
) -> Result<Head, StoreError> {
    let position = head.position + 1;
    let metadata_json = serde_json::to_string(&event.metadata)
        .map_err(|error| StoreError::InvalidArgument(format!("metadata cannot be serialised: {error}")))?;
    if metadata_json.len() > EVENT_METADATA_BYTES_MAX {
        return Err(StoreError::InvalidArgument(format!(
            "metadata of {} bytes exceeds {EVENT_METADATA_BYTES_MAX} bytes",
            metadata_json.len()
        )));
    }
    let hash = chain_hash(
        &head.hash,
        &ChainLink {
            position,
            stream_id: stream_id.as_bytes(),
            version,
            event_type: event.event_type.as_bytes(),
            schema_version: event.schema_version,
            event_id: event.event_id.as_bytes(),
            payload: event.payload.as_bytes(),
            metadata: metadata_json.as_bytes(),
            recorded_at: recorded_at_text.as_bytes(),
        },
    );
    let inserted = statement.execute(params![
        to_sql_integer(position, "position")?,
        stream_id,
        to_sql_integer(version, "version")?,
        event.event_type,
        event.schema_version,
        event.event_id.as_bytes().as_slice(),
        event.payload,
        metadata_json,
        recorded_at_text,
        hash.as_slice(),
    ]);
    match inserted {
        Ok(_) => Ok(Head { position, hash }),
        Err(error) if is_constraint(&error, ffi::SQLITE_CONSTRAINT_UNIQUE) => {
            Err(StoreError::Duplicate { what: "event id", key: event.event_id.to_string() })
        }
        Err(error) => Err(error.into()),
    }
}

/// Checks an append against the store's limits before anything is written.
fn validate_append(stream_id: &str, events: &[NewEvent], recorded_at: DateTime<Utc>) -> Result<(), StoreError> {
    let invalid = |message: String| Err(StoreError::InvalidArgument(message));
    if stream_id.is_empty() || stream_id.len() > STREAM_ID_BYTES_MAX {
        return invalid(format!("a stream id must have 1 to {STREAM_ID_BYTES_MAX} bytes, not {}", stream_id.len()));
    }
    if events.is_empty() || events.len() > APPEND_EVENTS_MAX {
        return invalid(format!("an append must carry 1 to {APPEND_EVENTS_MAX} events, not {}", events.len()));
    }
    check_year(recorded_at, "recorded_at")?;
    for event in events {
        if event.event_type.is_empty() || event.event_type.len() > EVENT_TYPE_BYTES_MAX {
            return invalid(format!(
                "an event type must have 1 to {EVENT_TYPE_BYTES_MAX} bytes, not {}",
                event.event_type.len()
            ));
        }
        if event.payload.len() > EVENT_PAYLOAD_BYTES_MAX {
            return invalid(format!(
                "the payload of event {} has {} bytes, more than {EVENT_PAYLOAD_BYTES_MAX}",
                event.event_id,
                event.payload.len()
            ));
        }
    }
    Ok(())
}

/// Checks an imported event against the limits an append enforces, and
/// that its metadata reads back (readers decode it on every read).
fn validate_imported(event: &RecordedEvent) -> Result<(), StoreError> {
    let invalid = |message: String| Err(StoreError::InvalidArgument(message));
    if event.stream_id.is_empty() || event.stream_id.len() > STREAM_ID_BYTES_MAX {
        return invalid(format!("a stream id must have 1 to {STREAM_ID_BYTES_MAX} bytes"));
    }
    if event.event_type.is_empty() || event.event_type.len() > EVENT_TYPE_BYTES_MAX {
        return invalid(format!("an event type must have 1 to {EVENT_TYPE_BYTES_MAX} bytes"));
    }
    if event.payload.len() > EVENT_PAYLOAD_BYTES_MAX {
        return invalid(format!("its payload has more than {EVENT_PAYLOAD_BYTES_MAX} bytes"));
    }
    if event.metadata_json.len() > EVENT_METADATA_BYTES_MAX {
        return invalid(format!("its metadata has more than {EVENT_METADATA_BYTES_MAX} bytes"));
    }
    if let Err(error) = serde_json::from_str::<EventMetadata>(&event.metadata_json) {
        return invalid(format!("its metadata does not decode: {error}"));
    }
    check_year(event.recorded_at, "recorded_at")
}

/// Four-digit years keep stored instants fixed-width, so that their byte
/// order is time order.
fn check_year(instant: DateTime<Utc>, what: &str) -> Result<(), StoreError> {
    if !(1..=9999).contains(&instant.year()) {
        return Err(StoreError::InvalidArgument(format!("{what} {instant} is outside years 1 to 9999")));
    }
    Ok(())
}

fn check_key(what: &str, key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return Err(StoreError::InvalidArgument(format!(
            "{what} must have 1 to {KEY_BYTES_MAX} bytes, not {}",
            key.len()
        )));
    }
    Ok(())
}

/// Runs a statement without parameters through the statement cache: the
/// savepoints around every command and append are parsed once, not per use.
fn run_cached(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection.prepare_cached(sql)?.execute([]).map(drop)
}
