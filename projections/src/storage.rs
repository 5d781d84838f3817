//! The projections file: opening it, its bookkeeping tables, and the
//! creation and dropping of table generations.
//!
//! Bookkeeping:
//!
//! - `projection_file`: one row, the file format and the generation counter.
//!   Generations are numbered from this one counter, so the suffix
//!   `_v{version}_g{generation}` of a table names one generation of one
//!   projector, and anything with such a suffix that no row below refers to
//!   is debris of a crash and can be dropped.
//! - `projection_live`: per projector, the generation readers are served
//!   from, the version that built it, and its checkpoint (the last position
//!   applied, with that event's chain hash, so that a log that is not the
//!   one these read models were built from is noticed at start-up).
//! - `projection_builds`: per projector, a generation being built (first
//!   build, upgrade or rebuild) and its own checkpoint.

use std::path::Path;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::error::ProjectionError;
use crate::projector::{Projector, generation_suffix, physical_name};

/// The format of the bookkeeping tables, in `projection_file`.
pub(crate) const FILE_FORMAT_VERSION: i64 = 1;

/// Statements kept prepared per connection: every projector's templates of
/// the live generation and of one generation being built.
const STATEMENT_CACHE_CAPACITY: usize = 256;

/// Page cache of the write connection, in KiB (SQLite's negative
/// `cache_size`): rebuilds touch every member's rows.
const WRITE_CACHE_KIB: i64 = 64 * 1024;

const CREATE_BOOKKEEPING_SQL: &str = "
CREATE TABLE IF NOT EXISTS projection_file (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    format_version  INTEGER NOT NULL,
    next_generation INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS projection_live (
    projector       TEXT PRIMARY KEY,
    version         INTEGER NOT NULL,
    generation      INTEGER NOT NULL,
    checkpoint      INTEGER NOT NULL,
    checkpoint_hash BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS projection_builds (
    projector       TEXT PRIMARY KEY,
    version         INTEGER NOT NULL,
    generation      INTEGER NOT NULL,
    checkpoint      INTEGER NOT NULL,
    checkpoint_hash BLOB NOT NULL
) STRICT;
INSERT OR IGNORE INTO projection_file (id, format_version, next_generation) VALUES (1, 1, 1);
";

/// Where a generation stands: live or being built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GenerationRow {
    pub projector: String,
    pub version: u32,
    pub generation: u64,
    pub checkpoint: u64,
    pub checkpoint_hash: [u8; 32],
}

/// Which bookkeeping table a [`GenerationRow`] lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Live,
    Build,
}

impl Slot {
    fn table(self) -> &'static str {
        match self {
            Slot::Live => "projection_live",
            Slot::Build => "projection_builds",
        }
    }
}

/// Opens (or creates) the projections file for writing: WAL, so readers
/// never wait for the runner, and `synchronous=NORMAL`, since a read model
/// lost to a power cut is rebuilt from the log (each commit stays atomic).
pub(crate) fn open_for_writing(path: &Path, busy_timeout: Duration) -> Result<Connection, ProjectionError> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(busy_timeout)?;
    // Plans never depend on bound values (query planner stability). Without
    // it SQLite marks any statement whose plan a bound value might change
    // (every lookup of a stream in `events`) to be re-prepared when its
    // bindings are cleared, which rusqlite's statement cache does each time
    // a statement goes back to it: a parse and a plan on every run.
    connection.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    refuse_foreign(&connection, path)?;
    let journal_mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        return Err(ProjectionError::Foreign {
            path: path.to_path_buf(),
            reason: format!("cannot switch to WAL (journal mode is {journal_mode})"),
        });
    }
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.pragma_update(None, "cache_size", -WRITE_CACHE_KIB)?;
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    connection.execute_batch(CREATE_BOOKKEEPING_SQL)?;
    let format_version: i64 =
        connection.query_row("SELECT format_version FROM projection_file WHERE id = 1", [], |row| row.get(0))?;
    if format_version > FILE_FORMAT_VERSION {
        return Err(ProjectionError::Foreign {
            path: path.to_path_buf(),
            reason: format!("its format version {format_version} is newer than this build's {FILE_FORMAT_VERSION}"),
        });
    }
    Ok(connection)
}

/// Opens a connection for queries. It is read-write at the file level (a
/// read-only connection cannot always open a WAL file) but `query_only`.
pub(crate) fn open_for_reading(path: &Path, busy_timeout: Duration) -> Result<Connection, ProjectionError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)?;
    connection.busy_timeout(busy_timeout)?;
    connection.pragma_update(None, "query_only", "ON")?;
    // Statements are planned once (see open_for_writing).
    connection.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(connection)
}

/// A file with tables but no `projection_file` is someone else's database
/// (an event log passed by mistake, say): never write into it.
fn refuse_foreign(connection: &Connection, path: &Path) -> Result<(), ProjectionError> {
    let tables: i64 =
        connection.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |row| row.get(0))?;
    let ours: i64 = connection.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'projection_file'",
        [],
        |row| row.get(0),
    )?;
    if tables > 0 && ours == 0 {
        return Err(ProjectionError::Foreign {
            path: path.to_path_buf(),
            reason: "it has tables but no projection_file table".to_owned(),
        });
    }
    Ok(())
}

fn hash_from_blob(blob: Vec<u8>) -> [u8; 32] {
    // Written only by this module, always 32 bytes; anything else reads as a
    // hash no event has, which makes the generation rebuild.
    <[u8; 32]>::try_from(blob.as_slice()).unwrap_or([0xff; 32])
}

pub(crate) fn to_sql_integer(value: u64) -> i64 {
    i64::try_from(value).expect("positions and generations stay below 2^63")
}

fn from_sql_integer(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(crate) fn read_rows(connection: &Connection, slot: Slot) -> Result<Vec<GenerationRow>, ProjectionError> {
    let mut statement = connection.prepare_cached(&format!(
        "SELECT projector, version, generation, checkpoint, checkpoint_hash FROM {} ORDER BY projector",
        slot.table()
    ))?;
    let rows = statement.query_map([], |row| {
        Ok(GenerationRow {
            projector: row.get(0)?,
            version: row.get(1)?,
            generation: from_sql_integer(row.get(2)?),
            checkpoint: from_sql_integer(row.get(3)?),
            checkpoint_hash: hash_from_blob(row.get(4)?),
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

pub(crate) fn read_row(
    connection: &Connection,
    slot: Slot,
    projector: &str,
) -> Result<Option<GenerationRow>, ProjectionError> {
    Ok(read_rows(connection, slot)?.into_iter().find(|row| row.projector == projector))
}

pub(crate) fn write_row(connection: &Connection, slot: Slot, row: &GenerationRow) -> Result<(), ProjectionError> {
    let mut statement = connection.prepare_cached(&format!(
        "INSERT INTO {} (projector, version, generation, checkpoint, checkpoint_hash) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (projector) DO UPDATE SET version = excluded.version, generation = excluded.generation,
             checkpoint = excluded.checkpoint, checkpoint_hash = excluded.checkpoint_hash",
        slot.table()
    ))?;
    statement.execute(params![
        row.projector,
        row.version,
        to_sql_integer(row.generation),
        to_sql_integer(row.checkpoint),
        row.checkpoint_hash.as_slice()
    ])?;
    Ok(())
}

pub(crate) fn write_checkpoint(
    connection: &Connection,
    slot: Slot,
    projector: &str,
    checkpoint: u64,
    checkpoint_hash: &[u8; 32],
) -> Result<(), ProjectionError> {
    let mut statement = connection.prepare_cached(&format!(
        "UPDATE {} SET checkpoint = ?2, checkpoint_hash = ?3 WHERE projector = ?1",
        slot.table()
    ))?;
    let changed = statement.execute(params![projector, to_sql_integer(checkpoint), checkpoint_hash.as_slice()])?;
    assert_eq!(changed, 1, "a checkpoint is written only for a generation that has a row");
    Ok(())
}

pub(crate) fn delete_row(connection: &Connection, slot: Slot, projector: &str) -> Result<(), ProjectionError> {
    connection.execute(&format!("DELETE FROM {} WHERE projector = ?1", slot.table()), params![projector])?;
    Ok(())
}

/// Takes the next generation number from the file's counter.
pub(crate) fn allocate_generation(connection: &Connection) -> Result<u64, ProjectionError> {
    let generation: i64 = connection.query_row(
        "UPDATE projection_file SET next_generation = next_generation + 1 WHERE id = 1 RETURNING next_generation - 1",
        [],
        |row| row.get(0),
    )?;
    Ok(from_sql_integer(generation))
}

/// Creates the tables (and indexes) of one generation of a projector.
pub(crate) fn create_generation(
    connection: &Connection,
    projector: &dyn Projector,
    generation: u64,
) -> Result<(), ProjectionError> {
    let version = projector.version();
    for table in projector.tables() {
        let name = physical_name(table.name, version, generation);
        connection.execute_batch(&format!("CREATE TABLE \"{name}\" ({}) STRICT, WITHOUT ROWID;", table.columns))?;
        for (suffix, columns) in table.indexes {
            connection.execute_batch(&format!("CREATE INDEX \"{name}_{suffix}\" ON \"{name}\" ({columns});"))?;
        }
    }
    Ok(())
}

/// The tables of the file that belong to some generation, with it.
fn generation_tables(connection: &Connection) -> Result<Vec<(String, u32, u64)>, ProjectionError> {
    let mut statement = connection.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
    let names = statement.query_map([], |row| row.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(names
        .into_iter()
        .filter_map(|name| {
            let (version, generation) = parse_generation_suffix(&name)?;
            Some((name, version, generation))
        })
        .collect())
}

/// `credit_balances_v1_g3` → (1, 3); names without the suffix → None.
pub(crate) fn parse_generation_suffix(name: &str) -> Option<(u32, u64)> {
    let (rest, generation) = name.rsplit_once("_g")?;
    let (_, version) = rest.rsplit_once("_v")?;
    let all_digits = |text: &str| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit());
    if !all_digits(version) || !all_digits(generation) {
        return None;
    }
    Some((version.parse().ok()?, generation.parse().ok()?))
}

/// Drops every table of one generation.
pub(crate) fn drop_generation(connection: &Connection, version: u32, generation: u64) -> Result<(), ProjectionError> {
    let suffix = generation_suffix(version, generation);
    for (name, _, _) in generation_tables(connection)? {
        if name.ends_with(&suffix) {
            connection.execute_batch(&format!("DROP TABLE \"{name}\";"))?;
        }
    }
    Ok(())
}

/// Drops tables of generations no bookkeeping row refers to: what a crash
/// between creating a generation and recording it, or a rebuild that was
/// abandoned, left behind.
pub(crate) fn drop_orphans(connection: &Connection) -> Result<usize, ProjectionError> {
    let mut referenced: Vec<(u32, u64)> = Vec::new();
    for slot in [Slot::Live, Slot::Build] {
        referenced.extend(read_rows(connection, slot)?.iter().map(|row| (row.version, row.generation)));
    }
    let mut dropped = 0;
    for (name, version, generation) in generation_tables(connection)? {
        if !referenced.contains(&(version, generation)) {
            connection.execute_batch(&format!("DROP TABLE \"{name}\";"))?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// The live row of a projector as a reader sees it in its snapshot.
pub(crate) fn live_rows(connection: &Connection) -> Result<Vec<GenerationRow>, ProjectionError> {
    read_rows(connection, Slot::Live)
}

/// Whether the file has been initialised (a reader opened before any owner).
pub(crate) fn is_initialised(connection: &Connection) -> Result<bool, ProjectionError> {
    Ok(connection
        .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'projection_file'", [], |row| {
            row.get::<_, i64>(0)
        })
        .optional()?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_suffixes_parse_only_when_whole() {
        assert_eq!(parse_generation_suffix("credit_balances_v1_g3"), Some((1, 3)));
        assert_eq!(parse_generation_suffix("invoice_lines_v12_g140"), Some((12, 140)));
        assert_eq!(parse_generation_suffix("projection_live"), None);
        assert_eq!(parse_generation_suffix("x_v1_g"), None);
        assert_eq!(parse_generation_suffix("x_va_g1"), None);
    }
}
