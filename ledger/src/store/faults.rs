//! Fault points for tests (feature `fault-injection`), on a real file:
//!
//! - the next commits of the log at a given path fail as an fsync I/O
//!   error would, after the batch's statements ran, so that the writer's
//!   handling of a failed commit (roll back, answer every caller with an
//!   error, drop cached state, go on) is exercised;
//! - the next writes of the usage index fail as an I/O error would, after
//!   the command's events were appended: a command that fails after it
//!   wrote, which a batch without savepoints cannot undo alone;
//! - the next fsyncs of the log's WAL beside the writer fail, after their
//!   batches committed (see `durability.rs`).
//!
//! Keyed by path, so tests running in parallel do not see each other's
//! faults.

use super::StoreError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

type Faults = Mutex<Option<HashMap<PathBuf, u32>>>;

static COMMIT_FAULTS: Faults = Mutex::new(None);
static USAGE_INDEX_FAULTS: Faults = Mutex::new(None);
static WAL_SYNC_FAULTS: Faults = Mutex::new(None);

/// The next `count` commits of the log at `path` fail.
pub fn fail_next_commits(path: &Path, count: u32) {
    arm(&COMMIT_FAULTS, path, count);
}

/// The next `count` usage index writes to the log at `path` fail.
pub fn fail_next_usage_index_writes(path: &Path, count: u32) {
    arm(&USAGE_INDEX_FAULTS, path, count);
}

/// The next `count` fsyncs of the WAL of the log at `path` fail.
pub fn fail_next_wal_syncs(path: &Path, count: u32) {
    arm(&WAL_SYNC_FAULTS, &super::durability::wal_path(path), count);
}

pub(super) fn commit_fault(path: &Path) -> Option<StoreError> {
    take(&COMMIT_FAULTS, path, rusqlite::ffi::SQLITE_IOERR_FSYNC, "injected: fsync failed on commit")
}

pub(super) fn usage_index_fault(path: &Path) -> Option<StoreError> {
    take(&USAGE_INDEX_FAULTS, path, rusqlite::ffi::SQLITE_IOERR_WRITE, "injected: the usage index write failed")
}

/// Keyed by the WAL's path.
pub(super) fn wal_sync_fault(wal_path: &Path) -> Option<std::io::Error> {
    take(&WAL_SYNC_FAULTS, wal_path, 0, "").map(|_| std::io::Error::other("injected: fdatasync of the WAL failed"))
}

fn arm(faults: &Faults, path: &Path, count: u32) {
    let mut faults = faults.lock().expect("faults lock");
    faults.get_or_insert_with(HashMap::new).insert(path.to_path_buf(), count);
}

fn take(faults: &Faults, path: &Path, code: std::ffi::c_int, message: &str) -> Option<StoreError> {
    let mut faults = faults.lock().expect("faults lock");
    let remaining = faults.as_mut()?.get_mut(path)?;
    if *remaining == 0 {
        return None;
    }
    *remaining -= 1;
    let code = rusqlite::ffi::Error::new(code);
    Some(StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, Some(message.to_owned()))))
}
