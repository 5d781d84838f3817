//! The writer's statements are planned once and then only run. SQLite
//! re-prepares a statement whose plan a bound value might change each time
//! its bindings are cleared (rusqlite's statement cache clears them when a
//! statement goes back to it), unless the connection asks for query planner
//! stability: every lookup of a stream in `events` was parsed and planned
//! again on every run.

use rusqlite::ffi;

use super::{event, instant, open_store, temp_log};
use crate::store::{EventStore, ExpectedVersion, IdempotencyRecord, Snapshot};

/// (SQL, runs, re-prepares) of every statement the connection holds.
fn statement_counts(store: &EventStore) -> Vec<(String, i32, i32)> {
    let mut counts = Vec::new();
    // SAFETY: the connection outlives this loop, statements are only
    // inspected (no step, no finalize), and nothing else uses the
    // connection meanwhile (`store` is borrowed).
    unsafe {
        let db = store.connection.handle();
        let mut statement = ffi::sqlite3_next_stmt(db, std::ptr::null_mut());
        while !statement.is_null() {
            let sql = std::ffi::CStr::from_ptr(ffi::sqlite3_sql(statement)).to_string_lossy().into_owned();
            let runs = ffi::sqlite3_stmt_status(statement, ffi::SQLITE_STMTSTATUS_RUN, 0);
            let reprepares = ffi::sqlite3_stmt_status(statement, ffi::SQLITE_STMTSTATUS_REPREPARE, 0);
            counts.push((sql, runs, reprepares));
            statement = ffi::sqlite3_next_stmt(db, statement);
        }
    }
    counts
}

#[test]
fn commands_on_many_streams_reprepare_none_of_the_writers_statements() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let members = 8_u64;
    for round in 0..4_u64 {
        let mut batch = store.begin_optimistic_batch().expect("batch");
        for member in 0..members {
            let stream_id = format!("member-m{member}");
            let key = format!("key-{round}-{member}");
            batch.begin_command().expect("command");
            assert_eq!(batch.idempotency("scope", &key).expect("idempotency lookup"), None);
            assert_eq!(batch.usage(&stream_id, &key).expect("usage lookup"), None);
            batch.snapshot(&stream_id).expect("snapshot lookup");
            assert_eq!(batch.read_stream(&stream_id, 1, 10).expect("stream read").len() as u64, round * 2);
            assert_eq!(batch.stream_version(&stream_id).expect("version"), round * 2);
            let appended = batch
                .append(
                    &stream_id,
                    ExpectedVersion::Exact(round * 2),
                    vec![event("UsageRecorded", "{}"), event("CreditsDeducted", "{}")],
                    instant(round as i64),
                )
                .expect("append");
            batch.record_usage(&stream_id, &key, appended.first_position, 5).expect("usage index");
            batch.set_due(&stream_id, Some(instant(86_400 + round as i64))).expect("due");
            let snapshot = Snapshot { version: appended.last_version, format: 1, state: "{}".to_owned() };
            batch.save_snapshot(&stream_id, &snapshot).expect("snapshot");
            let record = IdempotencyRecord {
                fingerprint: [1; 32],
                status: 201,
                response: "{}".to_owned(),
                position: appended.last_position,
                recorded_at: instant(round as i64),
            };
            batch.record_idempotency("scope", &key, &record).expect("idempotency record");
            batch.commit_command().expect("keep");
        }
        batch.commit().expect("commit");
    }
    let counts = statement_counts(&store);
    let busy: Vec<_> = counts.iter().filter(|(_, runs, _)| *runs as u64 >= 4 * members).collect();
    assert!(busy.len() >= 9, "the commands ran through cached statements: {counts:#?}");
    let reprepared: Vec<_> = counts.iter().filter(|(_, _, reprepares)| *reprepares > 0).collect();
    assert!(reprepared.is_empty(), "statements re-prepared on their runs: {reprepared:#?}");
}
