//! Opening files: a new log gets the schema, anything else is refused untouched.

use super::{append_many, open_store, raw, temp_log};
use crate::store::{EventReader, EventStore, Head, SCHEMA_VERSION, StoreError, StoreOptions};

#[test]
fn a_new_file_gets_the_schema_in_wal_mode() {
    let log = temp_log();
    let store = open_store(&log.path);
    assert_eq!(store.head(), Head::EMPTY);
    assert_eq!(store.path(), log.path.as_path());

    let connection = raw(&log.path);
    let user_version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0)).expect("user_version");
    let journal_mode: String = connection.query_row("PRAGMA journal_mode", [], |row| row.get(0)).expect("journal_mode");
    assert_eq!(user_version, SCHEMA_VERSION);
    assert_eq!(journal_mode, "wal");
}

#[test]
fn the_write_connection_uses_synchronous_full_by_default_and_normal_when_asked() {
    let log = temp_log();
    let store = open_store(&log.path);
    let synchronous: i64 = store.connection.query_row("PRAGMA synchronous", [], |row| row.get(0)).expect("synchronous");
    assert_eq!(synchronous, 2, "FULL");
    drop(store);

    let options = StoreOptions { synchronous_full: false, busy_timeout_ms: 100, max_log_bytes: None };
    let store = EventStore::open(&log.path, options).expect("open");
    let synchronous: i64 = store.connection.query_row("PRAGMA synchronous", [], |row| row.get(0)).expect("synchronous");
    assert_eq!(synchronous, 1, "NORMAL");
}

#[test]
fn syncing_the_wal_beside_the_writer_takes_the_fsync_out_of_commit_only_for_a_full_store() {
    let synchronous = |store: &EventStore| -> i64 {
        store.connection.query_row("PRAGMA synchronous", [], |row| row.get(0)).expect("synchronous")
    };
    let log = temp_log();
    let mut store = open_store(&log.path);
    let wal = store.sync_wal_beside().expect("sync beside");
    assert!(wal.fsyncs());
    assert_eq!(synchronous(&store), 1, "COMMIT no longer fsyncs");
    assert!(wal.path().to_string_lossy().ends_with("events.sqlite-wal"), "{}", wal.path().display());
    append_many(&mut store, "member-1", 3);
    wal.sync().expect("fsync the WAL");
    drop(store);
    assert_eq!(EventReader::open(&log.path).expect("reader").head().expect("head").position, 3);

    let options = StoreOptions { synchronous_full: false, busy_timeout_ms: 100, max_log_bytes: None };
    let mut store = EventStore::open(&log.path, options).expect("open");
    let wal = store.sync_wal_beside().expect("sync beside");
    assert!(!wal.fsyncs(), "a NORMAL store promised no fsync per commit");
    assert_eq!(synchronous(&store), 1);
    wal.sync().expect("a no-op");
}

#[test]
fn reopening_a_log_loads_its_head() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-1", 3);
    let head = store.head();
    assert_eq!(head.position, 3);
    drop(store);

    let store = open_store(&log.path);
    assert_eq!(store.head(), head);
}

#[test]
fn an_empty_file_is_a_new_log() {
    let log = temp_log();
    std::fs::write(&log.path, b"").expect("an empty file");
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-1", 1);
    assert_eq!(store.head().position, 1);
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_and_left_unchanged() {
    let log = temp_log();
    // Deterministic noise: a linear congruential generator, not the clock.
    let mut state: u32 = 0x2545_f491;
    let noise: Vec<u8> = (0..8192)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect();
    std::fs::write(&log.path, &noise).expect("the noise file");

    let writer_error = EventStore::open(&log.path, StoreOptions::default()).expect_err("noise is not a log");
    let reader_error = EventReader::open(&log.path).expect_err("noise is not a log");

    for error in [&writer_error, &reader_error] {
        assert!(matches!(error, StoreError::NotALedger { .. }), "unexpected error: {error:?}");
        let message = error.to_string();
        assert!(message.contains(&log.path.display().to_string()), "{message}");
        assert!(message.contains("not a SQLite database"), "{message}");
    }
    assert_eq!(std::fs::read(&log.path).expect("read back"), noise);
    assert!(!log.path.with_extension("sqlite-wal").exists());
    assert!(!log.path.with_extension("sqlite-shm").exists());
}

#[test]
fn a_foreign_sqlite_database_is_refused_and_left_unchanged() {
    let log = temp_log();
    {
        let connection = raw(&log.path);
        connection
            .execute_batch(
                "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);
                 INSERT INTO customers (name) VALUES ('Ada');",
            )
            .expect("a foreign database");
    }
    let before = std::fs::read(&log.path).expect("read");

    let error = EventStore::open(&log.path, StoreOptions::default()).expect_err("a foreign database is not a log");
    let message = error.to_string();
    assert!(matches!(error, StoreError::NotALedger { .. }), "{error:?}");
    assert!(message.contains(&log.path.display().to_string()), "{message}");
    assert!(message.contains("customers"), "{message}");
    assert!(matches!(EventReader::open(&log.path), Err(StoreError::NotALedger { .. })));

    assert_eq!(std::fs::read(&log.path).expect("read back"), before);
    let journal_mode: String =
        raw(&log.path).query_row("PRAGMA journal_mode", [], |row| row.get(0)).expect("journal_mode");
    assert_eq!(journal_mode, "delete", "the foreign file was not switched to WAL");
}

#[test]
fn a_log_from_a_newer_schema_is_refused() {
    let log = temp_log();
    drop(open_store(&log.path));
    raw(&log.path).execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1)).expect("bump the version");

    let error = EventStore::open(&log.path, StoreOptions::default()).expect_err("a newer schema");
    assert!(
        matches!(error, StoreError::UnsupportedSchemaVersion { found, supported: SCHEMA_VERSION, .. } if found == SCHEMA_VERSION + 1),
        "{error:?}"
    );
}

/// A log written by a build of schema version 1: the same tables, with the
/// member-scoped column first in the keys of `idempotency` and `usages`.
fn downgrade_to_v1(path: &std::path::Path) {
    raw(path)
        .execute_batch(
            "BEGIN;
             CREATE TABLE idempotency_v1 (
                 scope TEXT NOT NULL, key TEXT NOT NULL,
                 fingerprint BLOB NOT NULL CHECK (length(fingerprint) = 32), status INTEGER NOT NULL,
                 response TEXT NOT NULL, position INTEGER NOT NULL, recorded_at TEXT NOT NULL,
                 PRIMARY KEY (scope, key)
             ) WITHOUT ROWID, STRICT;
             INSERT INTO idempotency_v1 SELECT scope, key, fingerprint, status, response, position, recorded_at FROM idempotency;
             DROP TABLE idempotency;
             ALTER TABLE idempotency_v1 RENAME TO idempotency;
             CREATE INDEX idempotency_by_recorded_at ON idempotency (recorded_at);
             CREATE TABLE usages_v1 (
                 stream_id TEXT NOT NULL, usage_id TEXT NOT NULL, position INTEGER NOT NULL,
                 credits INTEGER NOT NULL, reversed_position INTEGER,
                 PRIMARY KEY (stream_id, usage_id)
             ) WITHOUT ROWID, STRICT;
             INSERT INTO usages_v1 SELECT stream_id, usage_id, position, credits, reversed_position FROM usages;
             DROP TABLE usages;
             ALTER TABLE usages_v1 RENAME TO usages;
             PRAGMA user_version = 1;
             COMMIT;",
        )
        .expect("rewrite as version 1");
}

fn table_sql(path: &std::path::Path, table: &str) -> String {
    raw(path)
        .query_row("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1", [table], |row| row.get(0))
        .expect("the table's DDL")
}

#[test]
fn a_version_1_log_is_read_as_it_is_and_migrated_by_the_writer_with_every_row_kept() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 3);
    let head = store.head();
    drop(store);
    raw(&log.path)
        .execute_batch(
            "INSERT INTO idempotency VALUES ('admin:a:usage', 'k1', zeroblob(32), 201, '{}', 1, '2025-01-01T00:00:00.000000Z');
             INSERT INTO usages VALUES ('member-a', 'u1', 2, 7, NULL);
             INSERT INTO usages VALUES ('member-a', 'u2', 3, 9, 3);",
        )
        .expect("index rows");
    downgrade_to_v1(&log.path);
    assert!(table_sql(&log.path, "idempotency").contains("PRIMARY KEY (scope, key)"));

    // A reader does not write: it reads version 1 as it is.
    let reader = EventReader::open(&log.path).expect("a version 1 log opens for reading");
    assert_eq!(reader.idempotency("admin:a:usage", "k1").expect("lookup").map(|record| record.position), Some(1));
    assert_eq!(reader.usage("member-a", "u1").expect("lookup").map(|entry| entry.credits), Some(7));
    drop(reader);
    let user_version: i64 = raw(&log.path).query_row("PRAGMA user_version", [], |row| row.get(0)).expect("version");
    assert_eq!(user_version, 1);

    let store = open_store(&log.path);
    assert_eq!(store.head(), head, "the events are untouched");
    drop(store);
    let user_version: i64 = raw(&log.path).query_row("PRAGMA user_version", [], |row| row.get(0)).expect("version");
    assert_eq!(user_version, SCHEMA_VERSION);
    assert!(table_sql(&log.path, "idempotency").contains("PRIMARY KEY (key, scope)"));
    assert!(table_sql(&log.path, "usages").contains("PRIMARY KEY (usage_id, stream_id)"));
    let reader = EventReader::open(&log.path).expect("reader");
    let record = reader.idempotency("admin:a:usage", "k1").expect("lookup").expect("kept");
    assert_eq!((record.status, record.position), (201, 1));
    assert_eq!(reader.usage("member-a", "u1").expect("lookup").map(|entry| entry.credits), Some(7));
    assert_eq!(reader.usage("member-a", "u2").expect("lookup").and_then(|entry| entry.reversed_position), Some(3));
    let index_count: i64 = raw(&log.path)
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name = 'idempotency_by_recorded_at'",
            [],
            |row| row.get(0),
        )
        .expect("index");
    assert_eq!(index_count, 1);
    reader.verify_chain(|_| {}).expect("the chain still verifies");
}

#[test]
fn a_reader_does_not_create_a_missing_file() {
    let log = temp_log();
    let error = EventReader::open(&log.path).expect_err("no file");
    assert!(matches!(error, StoreError::CannotOpen { .. }), "{error:?}");
    assert!(!log.path.exists());
}

#[test]
fn a_reader_refuses_an_empty_database() {
    let log = temp_log();
    std::fs::write(&log.path, b"").expect("an empty file");
    let error = EventReader::open(&log.path).expect_err("no schema yet");
    assert!(matches!(error, StoreError::NotALedger { .. }), "{error:?}");
}

#[test]
fn the_writer_refuses_a_log_whose_triggers_were_dropped() {
    let log = temp_log();
    drop(open_store(&log.path));
    raw(&log.path).execute_batch("DROP TRIGGER events_no_update").expect("drop a trigger");

    let error = EventStore::open(&log.path, StoreOptions::default()).expect_err("missing trigger");
    assert!(matches!(error, StoreError::Corrupt(_)), "{error:?}");
    assert!(error.to_string().contains("events_no_update"), "{error}");
    // Reading (to audit it) is still allowed.
    EventReader::open(&log.path).expect("a reader opens a damaged log");
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let log = temp_log();
    let path = log.path.with_file_name("missing").join("events.sqlite");
    let error = EventStore::open(&path, StoreOptions::default()).expect_err("no directory");
    assert!(matches!(error, StoreError::CannotOpen { .. }), "{error:?}");
    assert!(error.to_string().contains(&path.display().to_string()));
}
