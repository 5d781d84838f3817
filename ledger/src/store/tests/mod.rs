//! Tests of the event store on real SQLite files in temporary directories.
//!
//! Faults are injected through the database itself (raw rusqlite on the same
//! file: dropped triggers, edited rows, a deferred constraint that fails at
//! COMMIT, a page limit that fills the "disk"), so that each test exercises
//! the path a real failure would take.

mod append;
mod append_only;
mod batch;
mod chain;
mod concurrency;
mod idempotency;
mod import;
mod open;
mod read;
mod statements;

use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use tempfile::TempDir;
use uuid::Uuid;

use super::{EventMetadata, EventStore, NewEvent, StoreOptions};

/// A directory that lives as long as the test, and the log path inside it.
pub(super) struct TempLog {
    _directory: TempDir,
    pub(super) path: PathBuf,
}

pub(super) fn temp_log() -> TempLog {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let path = directory.path().join("events.sqlite");
    TempLog { _directory: directory, path }
}

pub(super) fn open_store(path: &Path) -> EventStore {
    EventStore::open(path, StoreOptions::default()).expect("the store opens")
}

/// A fixed instant `seconds` after 2025-01-01T00:00:00Z, so tests never read the clock.
pub(super) fn instant(seconds: i64) -> DateTime<Utc> {
    let base = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).single().expect("a valid instant");
    base + TimeDelta::seconds(seconds)
}

pub(super) fn event(event_type: &str, payload: &str) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.to_string(),
        schema_version: 1,
        payload: payload.to_string(),
        metadata: EventMetadata { actor: "admin".to_string(), ..EventMetadata::default() },
    }
}

/// Appends `count` events to `stream_id`, one append each, with `Any`.
pub(super) fn append_many(store: &mut EventStore, stream_id: &str, count: usize) {
    for index in 0..count {
        store
            .append(
                stream_id,
                super::ExpectedVersion::Any,
                vec![event("Tested", &format!("{{\"index\":{index}}}"))],
                instant(index as i64),
            )
            .expect("append");
    }
}

/// A raw connection on the log, bypassing the store, to tamper or inspect.
pub(super) fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("a raw connection")
}
