//! Opening a file as an event log: refusing anything that is not one, and
//! creating the schema in a file that is new.
//!
//! A mistyped `--data-dir` must never turn someone else's database into a
//! tally log, so every check that can refuse a file runs before the first
//! write to it (even `journal_mode=WAL` rewrites the header).

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// The tally schema version, kept in `PRAGMA user_version`. Version 1 keyed
/// `idempotency` by (scope, key) and `usages` by (stream_id, usage_id); a
/// writer opening a version 1 log migrates it (see [`migrate_from_v1`]).
pub const SCHEMA_VERSION: i64 = 2;

/// The write connection's page cache, in KiB (SQLite's default is 2 MiB).
pub const WRITER_CACHE_KIB: i64 = 64 * 1024;

/// The oldest schema version this build still opens.
const SCHEMA_VERSION_OLDEST: i64 = 1;

/// `idempotency` and `usages` are looked up by both key columns at once, so
/// either order serves the lookups; the key that grows comes first. Keys and
/// usage ids made from UUID v7 (as tally's own clients and tests make them)
/// then insert at the right edge of the B-tree instead of at a random page
/// per command: with the member first, every command dirtied one more
/// random page per table, which the commit writes whole to the WAL.
macro_rules! idempotency_table {
    ($name:literal) => {
        concat!(
            "CREATE TABLE ",
            $name,
            " (
    scope       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint BLOB    NOT NULL CHECK (length(fingerprint) = 32),
    status      INTEGER NOT NULL,
    response    TEXT    NOT NULL,
    position    INTEGER NOT NULL,
    recorded_at TEXT    NOT NULL,
    PRIMARY KEY (key, scope)
) WITHOUT ROWID, STRICT;
"
        )
    };
}

macro_rules! usages_table {
    ($name:literal) => {
        concat!(
            "CREATE TABLE ",
            $name,
            " (
    stream_id         TEXT    NOT NULL,
    usage_id          TEXT    NOT NULL,
    position          INTEGER NOT NULL,
    credits           INTEGER NOT NULL,
    reversed_position INTEGER,
    PRIMARY KEY (usage_id, stream_id)
) WITHOUT ROWID, STRICT;
"
        )
    };
}

macro_rules! idempotency_index {
    () => {
        "CREATE INDEX idempotency_by_recorded_at ON idempotency (recorded_at);\n"
    };
}

/// Every SQLite 3 database file starts with these 16 bytes.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// The tables a tally log has; a file with other tables and not these is foreign.
const LEDGER_TABLES: [&str; 4] = ["events", "idempotency", "schedule", "usages"];

/// The columns of `events`, in order, as created below.
const EVENT_COLUMNS: [&str; 10] = [
    "position",
    "stream_id",
    "version",
    "event_type",
    "schema_version",
    "event_id",
    "payload",
    "metadata",
    "recorded_at",
    "hash",
];

/// The triggers that make `events` append-only. The writer refuses a log
/// without them: someone removed them, and the log may have been altered.
const APPEND_ONLY_TRIGGERS: [&str; 3] = ["events_append_at_head", "events_no_delete", "events_no_update"];

/// The DDL of a tally event log (the current schema version), public so that
/// a benchmark writing "the same rows" uses exactly this layout. Tables are
/// STRICT so that a value of the wrong type is refused rather than stored
/// (the hash covers stored bytes, and a silently coerced value would be a
/// second source of truth).
pub const CREATE_SCHEMA_SQL: &str = concat!(
    "
CREATE TABLE events (
    position       INTEGER PRIMARY KEY,
    stream_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    event_id       BLOB    NOT NULL UNIQUE CHECK (length(event_id) = 16),
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    recorded_at    TEXT    NOT NULL,
    hash           BLOB    NOT NULL CHECK (length(hash) = 32),
    UNIQUE (stream_id, version)
) STRICT;

-- Positions and versions are gapless because the database refuses any other
-- insert, not only because the store computes them right.
CREATE TRIGGER events_append_at_head BEFORE INSERT ON events
WHEN NEW.position IS NOT (SELECT coalesce(max(position), 0) + 1 FROM events)
  OR NEW.version IS NOT (SELECT coalesce(max(version), 0) + 1 FROM events WHERE stream_id = NEW.stream_id)
BEGIN
    SELECT RAISE(ABORT, 'events are appended at the next position and the next version of their stream');
END;

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

",
    idempotency_table!("idempotency"),
    idempotency_index!(),
    usages_table!("usages"),
    "
-- When each stream next has time-driven work (an expiry, a renewal, a
-- reservation timeout), so that a sweep finds due members without loading
-- them all. Derived from the events, and written in the same transaction.
CREATE TABLE schedule (
    stream_id TEXT NOT NULL PRIMARY KEY,
    due_at    TEXT NOT NULL
) WITHOUT ROWID, STRICT;

CREATE INDEX schedule_by_due_at ON schedule (due_at, stream_id);

-- Which member a Stripe customer belongs to (the last link written wins),
-- so that a webhook finds its member. Derived from the member events.
CREATE TABLE stripe_customers (
    customer_id TEXT NOT NULL PRIMARY KEY,
    stream_id   TEXT NOT NULL
) WITHOUT ROWID, STRICT;

PRAGMA user_version = 2;
"
);

/// Snapshots of stream states (see `Snapshot`): a cache beside the log,
/// keyed to the hash of the event they were taken at. Made by any writer
/// that opens a log without it.
const SNAPSHOTS_SQL: &str = "CREATE TABLE IF NOT EXISTS snapshots (
    stream_id TEXT    NOT NULL PRIMARY KEY,
    version   INTEGER NOT NULL,
    format    INTEGER NOT NULL,
    hash      BLOB    NOT NULL,
    state     TEXT    NOT NULL
) STRICT;";

const STRIPE_CUSTOMERS_SQL: &str = "CREATE TABLE IF NOT EXISTS stripe_customers (customer_id TEXT NOT NULL PRIMARY KEY, stream_id TEXT NOT NULL) WITHOUT ROWID, STRICT;";

/// The customer index came after the first logs were written: a file
/// without it gets it built from its member events (the last link written
/// wins, as when the writer keeps it).
fn add_stripe_customers(connection: &Connection) -> Result<(), StoreError> {
    let exists: bool = connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'stripe_customers')",
        [],
        |row| row.get(0),
    )?;
    if exists {
        return Ok(());
    }
    connection.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         {STRIPE_CUSTOMERS_SQL}
         INSERT OR REPLACE INTO stripe_customers (customer_id, stream_id)
             SELECT json_extract(payload, '$.stripe_customer_id'), stream_id FROM events
             WHERE event_type IN ('MemberRegistered', 'MemberProfileChanged')
               AND json_extract(payload, '$.stripe_customer_id') IS NOT NULL
             ORDER BY position;
         COMMIT;"
    ))?;
    Ok(())
}

/// Version 1 → 2: `idempotency` and `usages` get their growing key first.
/// One transaction, under the write lock, so a crash leaves version 1 whole
/// and a second process finds the work done.
const MIGRATE_FROM_V1_SQL: &str = concat!(
    idempotency_table!("idempotency_v2"),
    "INSERT INTO idempotency_v2 (scope, key, fingerprint, status, response, position, recorded_at)
     SELECT scope, key, fingerprint, status, response, position, recorded_at FROM idempotency;
DROP TABLE idempotency;
ALTER TABLE idempotency_v2 RENAME TO idempotency;
",
    idempotency_index!(),
    usages_table!("usages_v2"),
    "INSERT INTO usages_v2 (stream_id, usage_id, position, credits, reversed_position)
     SELECT stream_id, usage_id, position, credits, reversed_position FROM usages;
DROP TABLE usages;
ALTER TABLE usages_v2 RENAME TO usages;
PRAGMA user_version = 2;
"
);

fn add_snapshots(connection: &Connection) -> Result<(), StoreError> {
    let exists: bool = connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'snapshots')",
        [],
        |row| row.get(0),
    )?;
    if !exists {
        connection.execute_batch(SNAPSHOTS_SQL)?;
    }
    Ok(())
}

/// What a SQLite file holds, as far as tally is concerned.
#[derive(Debug, PartialEq, Eq)]
enum Contents {
    /// No tables and no user version: a new file, or an empty database.
    Empty,
    /// A tally log of a schema version this build opens.
    Ledger { schema_version: i64 },
}

/// Opens (creating if needed) the log for writing: WAL, the configured
/// `synchronous`, the busy timeout, and the schema in a new file.
pub(super) fn open_for_writing(
    path: &Path,
    synchronous_full: bool,
    busy_timeout_ms: u32,
) -> Result<Connection, StoreError> {
    refuse_non_sqlite_file(path)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)
        .map_err(|source| StoreError::CannotOpen { path: path.to_path_buf(), source })?;
    connection.busy_timeout(Duration::from_millis(u64::from(busy_timeout_ms)))?;
    // Plans never depend on bound values (query planner stability). Without
    // it SQLite marks any statement whose plan a bound value might change
    // (every lookup of a stream in `events`) to be re-prepared when its
    // bindings are cleared, which rusqlite's statement cache does each time
    // a statement goes back to it: a parse and a plan on every run.
    connection.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // Checked before the first write: a foreign database stays untouched.
    let contents = inspect_in_one_snapshot(&connection, path)?;

    switch_to_wal(&connection, path, busy_timeout_ms)?;
    let synchronous = if synchronous_full { "FULL" } else { "NORMAL" };
    connection.pragma_update(None, "synchronous", synchronous)?;
    connection.set_prepared_statement_cache_capacity(32);
    // The writer reads the stream, usage and idempotency index pages a
    // command touches; SQLite's default 2 MiB cache holds few of them once
    // the log has millions of events.
    connection.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;

    match contents {
        Contents::Empty => create_schema(&connection, path)?,
        Contents::Ledger { schema_version: 1 } => {
            // A tampered log is refused before anything rewrites it.
            refuse_missing_triggers(&connection)?;
            migrate_from_v1(&connection, path)?;
        }
        Contents::Ledger { .. } => {}
    }
    add_stripe_customers(&connection)?;
    add_snapshots(&connection)?;
    refuse_missing_triggers(&connection)?;
    // Each command's SAVEPOINT journals the pages it changes; past 64 KiB a
    // batch's sub-journal spills to a temporary file, written through the
    // kernel for nothing (it dies with the transaction). Keep it in memory.
    // Only after the migration and backfills above: their sorts and journals
    // grow with the log and may spill to disk.
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(connection)
}

/// Puts the file in WAL mode (a persistent setting), unless it already is.
///
/// The switch needs an exclusive lock and SQLite answers `SQLITE_BUSY` at once
/// rather than through the busy handler, so two processes opening a new file
/// together would fail; the switch is retried until the busy timeout instead.
fn switch_to_wal(connection: &Connection, path: &Path, busy_timeout_ms: u32) -> Result<(), StoreError> {
    const RETRY_PAUSE_MS: u64 = 5;
    let journal_mode = |sql: &str| -> rusqlite::Result<String> { connection.query_row(sql, [], |row| row.get(0)) };
    if journal_mode("PRAGMA journal_mode")?.eq_ignore_ascii_case("wal") {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_millis(u64::from(busy_timeout_ms));
    let mode = loop {
        match journal_mode("PRAGMA journal_mode = WAL") {
            Ok(mode) => break mode,
            Err(error)
                if error.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(RETRY_PAUSE_MS));
            }
            Err(error) => return Err(error.into()),
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NotALedger {
            path: path.to_path_buf(),
            reason: format!("SQLite refused WAL mode (journal mode is {mode})"),
        });
    }
    Ok(())
}

/// Opens the log read-only. Never creates a file.
pub(super) fn open_for_reading(path: &Path) -> Result<Connection, StoreError> {
    refuse_non_sqlite_file(path)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)
        .map_err(|source| StoreError::CannotOpen { path: path.to_path_buf(), source })?;
    // Readers rarely wait (WAL), but they do while a crashed writer's WAL is
    // recovered.
    connection.busy_timeout(Duration::from_secs(5))?;
    // As for the writer: statements are planned once (see open_for_writing).
    connection.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    connection.set_prepared_statement_cache_capacity(32);
    match inspect_in_one_snapshot(&connection, path)? {
        // A reader of a version 1 log reads it as it is: its tables have the
        // same columns, and the lookups name both key columns.
        Contents::Ledger { .. } => Ok(connection),
        Contents::Empty => Err(StoreError::NotALedger {
            path: path.to_path_buf(),
            reason: "the database is empty (no tally schema yet)".to_string(),
        }),
    }
}

/// Refuses a non-empty file that does not start with the SQLite header,
/// before SQLite opens it at all. A missing or empty file passes: SQLite
/// treats both as a new database.
fn refuse_non_sqlite_file(path: &Path) -> Result<(), StoreError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io { path: path.to_path_buf(), source });
        }
    };
    let mut header = Vec::with_capacity(SQLITE_HEADER.len());
    file.by_ref()
        .take(SQLITE_HEADER.len() as u64)
        .read_to_end(&mut header)
        .map_err(|source| StoreError::Io { path: path.to_path_buf(), source })?;
    if header.is_empty() || header == SQLITE_HEADER {
        return Ok(());
    }
    Err(StoreError::NotALedger {
        path: path.to_path_buf(),
        reason: "the file is not a SQLite database (its header is not \"SQLite format 3\")".to_string(),
    })
}

/// Classifies the database from one read snapshot. Its checks are several
/// statements, and a process creating the schema at the same moment must not
/// commit between two of them (tables seen, `user_version` not yet).
fn inspect_in_one_snapshot(connection: &Connection, path: &Path) -> Result<Contents, StoreError> {
    let snapshot = connection.unchecked_transaction()?;
    let contents = inspect_contents(&snapshot, path);
    // A read-only transaction: ending it cannot lose anything.
    drop(snapshot);
    contents
}

/// Classifies an open database without writing to it. The caller holds a
/// transaction, so that every check sees the same state.
fn inspect_contents(connection: &Connection, path: &Path) -> Result<Contents, StoreError> {
    let not_a_ledger = |reason: String| StoreError::NotALedger { path: path.to_path_buf(), reason };
    let unreadable = |error: rusqlite::Error| match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            not_a_ledger(format!("SQLite cannot read it as a database ({error})"))
        }
        _ => StoreError::from(error),
    };

    let user_version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(unreadable)?;
    let tables = table_names(connection).map_err(unreadable)?;

    if user_version == 0 && tables.is_empty() {
        return Ok(Contents::Empty);
    }
    let has_ledger_tables = LEDGER_TABLES.iter().all(|table| tables.iter().any(|name| name == table));
    if !has_ledger_tables {
        return Err(not_a_ledger(format!(
            "it is a SQLite database with other tables ({}) and no tally schema",
            if tables.is_empty() { "none".to_string() } else { tables.join(", ") }
        )));
    }
    if user_version > SCHEMA_VERSION {
        return Err(StoreError::UnsupportedSchemaVersion {
            path: path.to_path_buf(),
            found: user_version,
            supported: SCHEMA_VERSION,
        });
    }
    if user_version < SCHEMA_VERSION_OLDEST {
        return Err(not_a_ledger(format!(
            "it has tally's table names but user_version {user_version}, not {SCHEMA_VERSION_OLDEST}..={SCHEMA_VERSION}"
        )));
    }
    let columns = event_column_names(connection).map_err(unreadable)?;
    if columns != EVENT_COLUMNS {
        return Err(not_a_ledger(format!(
            "its events table has columns ({}), not tally's ({})",
            columns.join(", "),
            EVENT_COLUMNS.join(", ")
        )));
    }
    Ok(Contents::Ledger { schema_version: user_version })
}

fn table_names(connection: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = connection.prepare(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
    )?;
    let names = statement.query_map([], |row| row.get(0))?;
    names.collect()
}

fn event_column_names(connection: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = connection.prepare("SELECT name FROM pragma_table_info('events') ORDER BY cid")?;
    let names = statement.query_map([], |row| row.get(0))?;
    names.collect()
}

/// Creates the schema in an empty file. Two processes may open a new file at
/// once, so the emptiness is checked again under the write lock.
fn create_schema(connection: &Connection, path: &Path) -> Result<(), StoreError> {
    connection.execute_batch("BEGIN IMMEDIATE")?;
    let created = inspect_contents(connection, path).and_then(|contents| {
        if contents == Contents::Empty {
            connection.execute_batch(CREATE_SCHEMA_SQL)?;
        }
        Ok(())
    });
    match created {
        Ok(()) => {
            if let Err(error) = connection.execute_batch("COMMIT") {
                rollback_quietly(connection);
                return Err(error.into());
            }
            tracing::info!(path = %path.display(), "created a new tally event log");
            Ok(())
        }
        Err(error) => {
            rollback_quietly(connection);
            Err(error)
        }
    }
}

/// Migrates a version 1 log to the current schema in one transaction; the
/// version is checked again under the write lock (another process may have
/// migrated it meanwhile). The events table is not touched, so the chain and
/// its hashes are as they were.
fn migrate_from_v1(connection: &Connection, path: &Path) -> Result<(), StoreError> {
    connection.execute_batch("BEGIN IMMEDIATE")?;
    let migrated = inspect_contents(connection, path).and_then(|contents| {
        if contents == (Contents::Ledger { schema_version: 1 }) {
            connection.execute_batch(MIGRATE_FROM_V1_SQL)?;
            tracing::info!(path = %path.display(), "migrating the event log from schema version 1 to {SCHEMA_VERSION}");
        }
        Ok(())
    });
    match migrated.and_then(|()| connection.execute_batch("COMMIT").map_err(StoreError::from)) {
        Ok(()) => Ok(()),
        Err(error) => {
            rollback_quietly(connection);
            Err(error)
        }
    }
}

fn refuse_missing_triggers(connection: &Connection) -> Result<(), StoreError> {
    let mut statement = connection
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = 'events' ORDER BY name")?;
    let names = statement.query_map([], |row| row.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
    let missing: Vec<&str> =
        APPEND_ONLY_TRIGGERS.iter().copied().filter(|trigger| !names.iter().any(|name| name == trigger)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(StoreError::Corrupt(format!(
        "the append-only triggers {} on events are missing, so the log may have been altered; run `tally audit verify`",
        missing.join(", ")
    )))
}

/// Rolls back an open transaction, logging (not returning) a failure: it is
/// only called on a path that already returns an error.
pub(super) fn rollback_quietly(connection: &Connection) {
    if connection.is_autocommit() {
        return;
    }
    if let Err(error) = connection.execute_batch("ROLLBACK") {
        tracing::error!(%error, "rolling back the event log transaction failed");
    }
}
