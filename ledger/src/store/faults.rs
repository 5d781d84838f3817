//! Fault points for tests (feature `fault-injection`): make the next commits
//! of the log at a given path fail as an fsync I/O error would, after the
//! batch's statements ran, so that the writer's handling of a failed commit
//! (roll back, answer every caller with an error, drop cached state, go on)
//! is exercised on a real file. Keyed by path, so tests running in
//! parallel do not see each other's faults.

use super::StoreError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static COMMIT_FAULTS: Mutex<Option<HashMap<PathBuf, u32>>> = Mutex::new(None);

/// The next `count` commits of the log at `path` fail.
pub fn fail_next_commits(path: &Path, count: u32) {
    let mut faults = COMMIT_FAULTS.lock().expect("faults lock");
    faults.get_or_insert_with(HashMap::new).insert(path.to_path_buf(), count);
}

pub(super) fn commit_fault(path: &Path) -> Option<StoreError> {
    let mut faults = COMMIT_FAULTS.lock().expect("faults lock");
    let remaining = faults.as_mut()?.get_mut(path)?;
    if *remaining == 0 {
        return None;
    }
    *remaining -= 1;
    let code = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC);
    Some(StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, Some("injected: fsync failed on commit".to_owned()))))
}
