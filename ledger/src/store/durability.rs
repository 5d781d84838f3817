//! The commit's fsync, taken off the writer's thread.
//!
//! With `synchronous=FULL` SQLite writes a commit's frames to the WAL and
//! then fsyncs it, inside `COMMIT`: the writer thread sleeps through every
//! fsync, and the next batch waits for it. [`WalSync`] splits the two. The
//! write connection runs with `synchronous=NORMAL`, so `COMMIT` only writes
//! the frames (to the page cache), and the WAL is fsynced through a file
//! handle of its own before anyone is answered: by the ledger's syncer
//! thread while the writer decides, encodes, hashes and writes the next
//! batch (the pipeline of the write path), or by the writer itself when
//! nothing else is waiting (see `service.rs`). One fsync covers every batch
//! committed before it began.
//!
//! What stays true, and why:
//!
//! - **An answered command is on disk.** Answers leave only after an fsync
//!   that began after their batch's commit. Linux's `fdatasync` flushes the
//!   file's data and size whichever descriptor it is called on.
//! - **A crash recovers a prefix of the batches.** WAL frames carry
//!   cumulative checksums, so recovery stops at the first frame that did not
//!   reach the disk, and a later frame is never used without the earlier
//!   ones. `synchronous=NORMAL` still fsyncs the WAL before every checkpoint
//!   copies it into the database file, and the WAL's header when the WAL is
//!   rewound, exactly as `FULL` does.
//! - **Readers of this process see only durable batches.** The writer
//!   marks a batch in [`VisibleHead`] before its `COMMIT` makes it readable
//!   and the syncer clears the mark after the fsync; the ledger's readers
//!   (`Ledger::reader`, the API's) and the projection runner stop short of a
//!   marked batch, and `Ledger::recorded`, which answers idempotent retries
//!   from the file, waits for the fsync. What is not the same as `FULL`: a
//!   reader in *another* process (a CLI audit beside the server) can see a
//!   batch up to one fsync (about a millisecond) before it is durable. Only
//!   a power loss or kernel crash in that window loses such a batch, and
//!   never an answered one.
//! - **A failed fsync stops the writer.** After a failed `fdatasync` Linux
//!   may have dropped the dirty pages and a later fsync may still succeed, so
//!   nothing written since can be trusted to be on disk: the callers of
//!   every batch it covered are told so, the ledger refuses further commands,
//!   and a restart recovers from what the disk holds (as PostgreSQL does).
//!
//! A store opened with `synchronous=NORMAL` (tests, bulk loads) promised no
//! fsync per commit, and gets none here either.

use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::StoreError;

/// Makes the write connection's commits durable from another thread. See
/// the module docs.
#[derive(Debug)]
pub struct WalSync {
    /// The WAL, opened by us: `None` when the store promised no fsync.
    wal: Option<File>,
    path: PathBuf,
}

impl WalSync {
    /// Switches `connection` (the store's write connection on `path`) from
    /// `synchronous=FULL` to `NORMAL` and opens its WAL for [`WalSync::sync`].
    pub(super) fn start(connection: &Connection, path: &Path) -> Result<WalSync, StoreError> {
        let wal_path = wal_path(path);
        let synchronous: i64 = connection.query_row("PRAGMA synchronous", [], |row| row.get(0))?;
        if synchronous < 2 {
            return Ok(WalSync { wal: None, path: wal_path });
        }
        let io = |source| StoreError::Io { path: wal_path.clone(), source };
        // SQLite created the WAL when the store first read the log in WAL
        // mode, and does not remove it while this connection is open.
        let wal = File::options().read(true).write(true).open(&wal_path).map_err(io)?;
        // The WAL's directory entry, once: a new WAL must survive a crash
        // before its frames can.
        let directory = match wal_path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&directory).and_then(|directory| directory.sync_all()).map_err(io)?;
        wal.sync_data().map_err(io)?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(WalSync { wal: Some(wal), path: wal_path })
    }

    /// A `WalSync` that never fsyncs: the connection's `COMMIT` does.
    pub(super) fn in_commit(path: &Path) -> WalSync {
        WalSync { wal: None, path: wal_path(path) }
    }

    /// Makes every commit that returned before this call durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        #[cfg(feature = "fault-injection")]
        if let Some(source) = super::faults::wal_sync_fault(&self.path) {
            return Err(StoreError::Io { path: self.path.clone(), source });
        }
        match &self.wal {
            Some(wal) => wal.sync_data().map_err(|source| StoreError::Io { path: self.path.clone(), source }),
            None => Ok(()),
        }
    }

    /// True when [`WalSync::sync`] fsyncs (the store was opened with
    /// `synchronous=FULL`).
    pub fn fsyncs(&self) -> bool {
        self.wal.is_some()
    }

    /// The WAL's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The WAL beside the log at `path`.
pub(super) fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// How far readers may read the log: short of any batch this process
/// committed but has not yet fsynced. The writer marks a batch before its
/// `COMMIT` makes it visible to other connections, and the syncer unmarks
/// it after the fsync, so a reader that checks the mark after its read
/// never returns an event that is not durable. Readers opened with
/// [`EventReader::hide_unsynced`](super::EventReader::hide_unsynced) apply
/// it to the head and to every event read.
#[derive(Debug, Default)]
pub struct VisibleHead {
    marks: std::sync::Mutex<Marks>,
}

#[derive(Debug, Default)]
struct Marks {
    /// The first position of the earliest batch committed (or being
    /// committed) and not yet fsynced.
    first_unsynced: Option<u64>,
    /// The last position of the latest batch committed or being committed.
    last_committed: u64,
    /// The highest head an fsync has covered so far.
    synced_through: u64,
}

impl VisibleHead {
    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Before the `COMMIT` of a batch that wrote positions `first..=last`.
    pub fn committing(&self, first: u64, last: u64) {
        let mut marks = self.marks();
        marks.first_unsynced.get_or_insert(first);
        marks.last_committed = marks.last_committed.max(last);
    }

    /// After a `COMMIT` failed: the log's head is `head` again.
    pub fn not_committed(&self, head: u64) {
        let mut marks = self.marks();
        marks.last_committed = head;
        if marks.first_unsynced.is_some_and(|first| first > head) {
            marks.first_unsynced = None;
        }
    }

    /// After an fsync that covered every batch committed up to `durable`.
    /// Two threads may report fsyncs out of order: an older report moves
    /// nothing back.
    pub fn synced(&self, durable: u64) {
        let mut marks = self.marks();
        let durable = durable.max(marks.synced_through);
        marks.synced_through = durable;
        marks.first_unsynced = (marks.last_committed > durable).then_some(durable + 1);
    }

    /// The highest head an fsync has covered so far.
    pub fn synced_through(&self) -> u64 {
        self.marks().synced_through
    }

    /// The last position a reader may return (`u64::MAX`: all of them).
    pub fn limit(&self) -> u64 {
        self.marks().first_unsynced.map_or(u64::MAX, |first| first - 1)
    }
}
