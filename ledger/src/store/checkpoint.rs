//! WAL checkpoints off the writer's commit path.
//!
//! A commit appends the batch's pages to the WAL; a checkpoint copies them
//! into the database file and fsyncs it. SQLite's automatic checkpoint does
//! that inside the COMMIT that crosses 1,000 WAL pages, while that batch's
//! callers wait, and at 64 submitters it was a third of the writer's time
//! (BENCHMARKS.md, run 4).
//!
//! [`BackgroundCheckpoints`] turns the automatic checkpoint off on the write
//! connection (its WAL hook only records the WAL's size after each commit)
//! and gives checkpointing a thread with a connection of its own. Each time
//! the WAL has grown by [`CheckpointOptions::background_pages`], the writer
//! asks that thread for a PASSIVE checkpoint, which copies the committed
//! frames while the writer decides and writes the next batches: SQLite lets
//! a checkpoint run beside a write transaction, and it never copies a frame
//! that is not committed. A page written by many commits in between is
//! copied once.
//!
//! A checkpoint alone never lets the WAL start over: SQLite rewinds the WAL
//! only in a write transaction that began when every frame had been copied,
//! which a checkpoint running beside a busy writer never sees. So once the
//! WAL holds [`CheckpointOptions::rewind_pages`], the writer stops asking
//! for background checkpoints and, before its next batch and only when the
//! thread is idle, checkpoints the few frames committed since the last one
//! itself; its next commit then writes from the start of the WAL again. If
//! the thread is still busy the writer goes on and looks again before the
//! next batch; past twice the threshold it waits for the thread. Readers
//! holding old snapshots can delay the rewind, as with SQLite's own
//! checkpoints.
//!
//! Durability is untouched: every batch's WAL frames are still fsynced
//! before anyone is answered (by the syncer beside the writer, see
//! `durability.rs`), a checkpoint fsyncs the WAL before it copies it, and
//! after a crash SQLite recovers from the WAL whatever was not copied yet.

use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// When checkpoints run, in WAL pages (4 KiB each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// The WAL growth, in pages, after which the background thread copies
    /// it into the database file. Larger: fewer copies of pages that many
    /// commits rewrite; smaller: less left for the writer at a rewind.
    pub background_pages: u32,
    /// The WAL size, in pages, at which the writer rewinds it. The WAL file
    /// stays near this size (plus one background step) on disk.
    pub rewind_pages: u32,
}

impl Default for CheckpointOptions {
    /// A step of 1,024 pages (4 MiB), a rewind at 32,768 pages (128 MiB):
    /// measured in BENCHMARKS.md (run 4) against SQLite's automatic
    /// checkpoint and other steps. A rewind holds the writer for the copy of
    /// up to one step and the fsync of the database file, so it should be
    /// rare; the steps run beside the writer and cost it little.
    fn default() -> Self {
        CheckpointOptions { background_pages: 1_024, rewind_pages: 32_768 }
    }
}

impl CheckpointOptions {
    pub(super) fn check(&self) -> Result<(), StoreError> {
        if self.background_pages == 0 || self.rewind_pages < self.background_pages {
            return Err(StoreError::InvalidArgument(format!(
                "checkpoints need 0 < background_pages <= rewind_pages, not {} and {}",
                self.background_pages, self.rewind_pages
            )));
        }
        Ok(())
    }
}

/// What the checkpoints did, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct CheckpointStats {
    /// Checkpoints the background thread ran.
    pub background: AtomicU64,
    /// Checkpoints the writer ran itself before a rewind that copied the
    /// whole WAL, so that its next commit could start it over.
    pub rewinds: AtomicU64,
    /// Background or rewind checkpoints that failed (logged; retried at the
    /// next step).
    pub failures: AtomicU64,
}

/// The writer's side: the WAL's size, the background thread, and the
/// decisions of the module's documentation. [`EventStore`](super::EventStore)
/// uses one; it is public so that a benchmark's plain rusqlite writer can
/// checkpoint the same way: call [`BackgroundCheckpoints::before_batch`]
/// before each `BEGIN` and [`BackgroundCheckpoints::after_commit`] after
/// each `COMMIT`.
pub struct BackgroundCheckpoints {
    options: CheckpointOptions,
    /// The WAL's size in pages after the last commit (the WAL hook's count).
    wal_pages: Arc<AtomicU32>,
    /// The WAL's size when the last background checkpoint was asked for;
    /// a smaller size since means the WAL was rewound.
    requested_at: u32,
    /// The WAL's size when the writer last copied all of it before a
    /// rewind: until a commit changes the size, there is nothing more to
    /// copy (batches that only read do not checkpoint again).
    caught_up_at: Option<u32>,
    requests: Option<SyncSender<()>>,
    /// Held by whoever is checkpointing: the thread, or the writer before a
    /// rewind.
    checkpointing: Arc<Mutex<()>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<CheckpointStats>,
}

impl BackgroundCheckpoints {
    /// Takes over checkpointing for `writer`, the write connection of the
    /// database at `path` (in WAL mode).
    pub fn start(
        writer: &mut Connection,
        path: &Path,
        options: CheckpointOptions,
    ) -> Result<BackgroundCheckpoints, StoreError> {
        options.check()?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(path, flags)
            .map_err(|source| StoreError::CannotOpen { path: path.to_path_buf(), source })?;
        let wal_pages = Arc::new(AtomicU32::new(0));
        let (requests, received) = sync_channel(1);
        let checkpointing = Arc::new(Mutex::new(()));
        let stats = Arc::new(CheckpointStats::default());
        let thread = {
            let checkpointing = Arc::clone(&checkpointing);
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name("tally-checkpoint".to_owned())
                .spawn(move || run_background(&connection, &received, &checkpointing, &stats))
                .map_err(|error| StoreError::Corrupt(format!("cannot start the checkpoint thread: {error}")))?
        };
        // Only once the thread runs: the hook replaces (and so turns off)
        // SQLite's automatic checkpoint.
        let recorded = Arc::clone(&wal_pages);
        writer.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
            recorded.store(u32::try_from(pages).unwrap_or(0), Ordering::Relaxed);
            Ok(())
        }))?;
        Ok(BackgroundCheckpoints {
            options,
            wal_pages,
            requested_at: 0,
            caught_up_at: None,
            requests: Some(requests),
            checkpointing,
            thread: Some(thread),
            stats,
        })
    }

    pub fn stats(&self) -> Arc<CheckpointStats> {
        Arc::clone(&self.stats)
    }

    /// After a commit: ask for a background checkpoint once the WAL has
    /// grown a step since the last one, unless a rewind is due.
    pub fn after_commit(&mut self) {
        let pages = self.wal_pages.load(Ordering::Relaxed);
        if pages < self.requested_at {
            self.requested_at = 0;
        }
        if pages >= self.options.rewind_pages || pages < self.requested_at + self.options.background_pages {
            return;
        }
        if let Some(requests) = &self.requests {
            match requests.try_send(()) {
                // Full: a request is pending already, which covers this one.
                Ok(()) | Err(TrySendError::Full(())) => self.requested_at = pages,
                Err(TrySendError::Disconnected(())) => tracing::warn!("the checkpoint thread is gone"),
            }
        }
    }

    /// Before a batch: when a rewind is due, copy what the background
    /// thread has not yet, so that this batch's commit rewinds the WAL.
    pub fn before_batch(&mut self, writer: &Connection) {
        let pages = self.wal_pages.load(Ordering::Relaxed);
        if pages < self.options.rewind_pages || self.caught_up_at == Some(pages) {
            return;
        }
        let idle = match self.checkpointing.try_lock() {
            Ok(idle) => idle,
            // A panic in the thread poisons the lock; the lock itself still
            // works, and the thread is gone or idle.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Far past the threshold: wait for the thread rather than let
            // the WAL grow on (readers can still hold the rewind back).
            Err(TryLockError::WouldBlock) if pages >= self.options.rewind_pages.saturating_mul(2) => {
                self.checkpointing.lock().unwrap_or_else(PoisonError::into_inner)
            }
            Err(TryLockError::WouldBlock) => return,
        };
        match checkpoint(writer) {
            Ok(Copied::All) => {
                self.caught_up_at = Some(pages);
                self.stats.rewinds.fetch_add(1, Ordering::Relaxed);
            }
            // A reader still needs some frames: try again before the next batch.
            Ok(Copied::Part) => {}
            Err(error) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "a WAL checkpoint before a rewind failed; retrying before the next batch");
            }
        }
        drop(idle);
    }
}

impl Drop for BackgroundCheckpoints {
    fn drop(&mut self) {
        // The thread ends when its channel closes; its connection must be
        // closed before the writer's, whose close checkpoints what is left.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_background(
    connection: &Connection,
    requests: &Receiver<()>,
    checkpointing: &Mutex<()>,
    stats: &CheckpointStats,
) {
    while requests.recv().is_ok() {
        let _checkpointing = checkpointing.lock().unwrap_or_else(PoisonError::into_inner);
        match checkpoint(connection) {
            Ok(_) => drop(stats.background.fetch_add(1, Ordering::Relaxed)),
            Err(error) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "a background WAL checkpoint failed; retrying at the next step");
            }
        }
    }
}

/// What a checkpoint copied of the WAL.
enum Copied {
    /// Every frame: the next write transaction can start the WAL over.
    All,
    /// Not every frame: a reader still needed some, or another process was
    /// checkpointing.
    Part,
}

/// A PASSIVE checkpoint: copies every committed frame that no reader still
/// needs, waiting for no lock. Another process checkpointing the same file
/// (SQLITE_BUSY) is not an error: that one copies the frames.
fn checkpoint(connection: &Connection) -> Result<Copied, StoreError> {
    // The pragma answers (busy, frames in the WAL, frames copied).
    let answer = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    match answer {
        Ok((0, frames, copied)) if copied == frames => Ok(Copied::All),
        Ok(_) => Ok(Copied::Part),
        Err(error) if error.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => Ok(Copied::Part),
        Err(error) => Err(error.into()),
    }
}
