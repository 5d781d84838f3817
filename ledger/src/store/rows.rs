//! Decoding stored rows and the few look-ups both the writer (inside its
//! transaction) and readers (on their snapshots) need.
//!
//! Decoding is strict: a value that does not round-trip to the bytes the
//! store would have written is reported as [`StoreError::Corrupt`] naming the
//! row, because a lenient read would hide tampering that the hash chain is
//! there to expose.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use super::hash::parse_recorded_at;
use super::{
    CHAIN_HASH_ZERO, EventMetadata, Head, IdempotencyRecord, READ_PAGE_SIZE_MAX, RecordedEvent, StoreError,
    UsageIndexEntry,
};

/// The columns of `events` in the order [`decode_event`] reads them.
pub(super) const EVENT_COLUMNS_SQL: &str =
    "position, stream_id, version, event_type, schema_version, event_id, payload, metadata, recorded_at, hash";

/// The head and the last `recorded_at`: what an append continues from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tip {
    pub(super) head: Head,
    /// `None` for an empty log.
    pub(super) recorded_at: Option<DateTime<Utc>>,
}

impl Tip {
    pub(super) const EMPTY: Tip = Tip { head: Head { position: 0, hash: CHAIN_HASH_ZERO }, recorded_at: None };
}

fn corrupt(what: &str, position: u64, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what} of the event at position {position}: {detail}"))
}

/// Converts a count or position for SQLite, which stores signed 64-bit integers.
pub(super) fn to_sql_integer(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::InvalidArgument(format!("{what} {value} is beyond 2^63 - 1")))
}

/// Converts a stored integer that must not be negative.
fn stored_unsigned(value: i64, what: &str, position: u64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(what, position, format!("negative value {value}")))
}

fn stored_hash(bytes: Vec<u8>, what: &str, position: u64) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| corrupt(what, position, format!("{} bytes, not 32", bytes.len())))
}

/// Decodes a row selected with [`EVENT_COLUMNS_SQL`].
pub(super) fn decode_event(row: &Row<'_>) -> Result<RecordedEvent, StoreError> {
    let stored_position: i64 = row.get(0)?;
    let position = u64::try_from(stored_position)
        .map_err(|_| StoreError::Corrupt(format!("an event has the negative position {stored_position}")))?;
    let column_text = |index: usize, what: &str| -> Result<String, StoreError> {
        row.get::<_, String>(index).map_err(|error| corrupt(what, position, error))
    };
    let column_integer = |index: usize, what: &str| -> Result<i64, StoreError> {
        row.get::<_, i64>(index).map_err(|error| corrupt(what, position, error))
    };
    let column_blob = |index: usize, what: &str| -> Result<Vec<u8>, StoreError> {
        row.get::<_, Vec<u8>>(index).map_err(|error| corrupt(what, position, error))
    };

    let stream_id = column_text(1, "stream_id")?;
    let version = stored_unsigned(column_integer(2, "version")?, "version", position)?;
    let event_type = column_text(3, "event_type")?;
    let stored_schema_version = column_integer(4, "schema_version")?;
    let schema_version = u32::try_from(stored_schema_version)
        .map_err(|_| corrupt("schema_version", position, format!("{stored_schema_version} is not a u32")))?;
    let event_id_bytes = column_blob(5, "event_id")?;
    let event_id = Uuid::from_slice(&event_id_bytes).map_err(|error| corrupt("event_id", position, error))?;
    let payload = column_text(6, "payload")?;
    let metadata_json = column_text(7, "metadata")?;
    let metadata: EventMetadata =
        serde_json::from_str(&metadata_json).map_err(|error| corrupt("metadata", position, error))?;
    let recorded_at_text = column_text(8, "recorded_at")?;
    let recorded_at = parse_recorded_at(&recorded_at_text)
        .ok_or_else(|| corrupt("recorded_at", position, format!("{recorded_at_text:?} is not in the stored format")))?;
    let hash = stored_hash(column_blob(9, "hash")?, "hash", position)?;

    Ok(RecordedEvent {
        position,
        stream_id,
        version,
        event_type,
        schema_version,
        event_id,
        payload,
        metadata,
        metadata_json,
        recorded_at,
        hash,
    })
}

/// Runs a prepared event query and decodes every row.
pub(super) fn query_events(
    connection: &Connection,
    sql: &str,
    parameters: impl rusqlite::Params,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut statement = connection.prepare_cached(sql)?;
    let mut rows = statement.query(parameters)?;
    let mut events = Vec::new();
    while let Some(row) = rows.next()? {
        events.push(decode_event(row)?);
    }
    Ok(events)
}

/// Checks a read's page size against [`READ_PAGE_SIZE_MAX`] and converts it for SQL.
pub(super) fn check_page_size(limit: usize) -> Result<i64, StoreError> {
    if limit == 0 || limit > READ_PAGE_SIZE_MAX {
        return Err(StoreError::InvalidArgument(format!("a page holds 1 to {READ_PAGE_SIZE_MAX} rows, not {limit}")));
    }
    // READ_PAGE_SIZE_MAX is far below i64::MAX.
    Ok(limit as i64)
}

/// Up to `limit` events of a stream with versions `>= from_version`, ascending.
pub(super) fn read_stream(
    connection: &Connection,
    stream_id: &str,
    from_version: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let limit = check_page_size(limit)?;
    let from_version = to_sql_integer(from_version, "from_version")?;
    query_events(
        connection,
        &format!(
            "SELECT {EVENT_COLUMNS_SQL} FROM events WHERE stream_id = ?1 AND version >= ?2 ORDER BY version LIMIT ?3"
        ),
        params![stream_id, from_version, limit],
    )
}

/// The last event's position, hash and `recorded_at`.
pub(super) fn read_tip(connection: &Connection) -> Result<Tip, StoreError> {
    let mut statement =
        connection.prepare_cached("SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1")?;
    let last = statement
        .query_row([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?, row.get::<_, String>(2)?)))
        .optional()?;
    let Some((stored_position, hash, recorded_at_text)) = last else {
        return Ok(Tip::EMPTY);
    };
    let position = u64::try_from(stored_position)
        .map_err(|_| StoreError::Corrupt(format!("the last event has the negative position {stored_position}")))?;
    let hash = stored_hash(hash, "hash", position)?;
    let recorded_at = parse_recorded_at(&recorded_at_text)
        .ok_or_else(|| corrupt("recorded_at", position, format!("{recorded_at_text:?} is not in the stored format")))?;
    Ok(Tip { head: Head { position, hash }, recorded_at: Some(recorded_at) })
}

/// The stored hash of the event at `position` ([`CHAIN_HASH_ZERO`] for
/// position 0), or `None` when the log has no such event.
pub(super) fn hash_at(connection: &Connection, position: u64) -> Result<Option<[u8; 32]>, StoreError> {
    if position == 0 {
        return Ok(Some(CHAIN_HASH_ZERO));
    }
    let mut statement = connection.prepare_cached("SELECT hash FROM events WHERE position = ?1")?;
    let stored = statement
        .query_row(params![to_sql_integer(position, "position")?], |row| row.get::<_, Vec<u8>>(0))
        .optional()?;
    stored.map(|bytes| stored_hash(bytes, "hash", position)).transpose()
}

/// The stream's last version; 0 when it has no events.
pub(super) fn stream_version(connection: &Connection, stream_id: &str) -> Result<u64, StoreError> {
    let mut statement = connection.prepare_cached("SELECT max(version) FROM events WHERE stream_id = ?1")?;
    let version: Option<i64> = statement.query_row(params![stream_id], |row| row.get(0))?;
    match version {
        None => Ok(0),
        Some(version) => u64::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("stream {stream_id} has the negative version {version}"))),
    }
}

pub(super) fn idempotency(
    connection: &Connection,
    scope: &str,
    key: &str,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT fingerprint, status, response, position, recorded_at FROM idempotency WHERE scope = ?1 AND key = ?2",
    )?;
    let stored = statement
        .query_row(params![scope, key], |row| {
            Ok((
                row.get::<_, Vec<u8>>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
            ))
        })
        .optional()?;
    let Some((fingerprint, status, response, position, recorded_at_text)) = stored else {
        return Ok(None);
    };
    let bad = |detail: String| StoreError::Corrupt(format!("idempotency record {scope}/{key}: {detail}"));
    let fingerprint = <[u8; 32]>::try_from(fingerprint.as_slice())
        .map_err(|_| bad(format!("fingerprint of {} bytes", fingerprint.len())))?;
    let status = u16::try_from(status).map_err(|_| bad(format!("status {status}")))?;
    let position = u64::try_from(position).map_err(|_| bad(format!("position {position}")))?;
    let recorded_at =
        parse_recorded_at(&recorded_at_text).ok_or_else(|| bad(format!("recorded_at {recorded_at_text:?}")))?;
    Ok(Some(IdempotencyRecord { fingerprint, status, response, position, recorded_at }))
}

pub(super) fn usage(
    connection: &Connection,
    stream_id: &str,
    usage_id: &str,
) -> Result<Option<UsageIndexEntry>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT position, credits, reversed_position FROM usages WHERE stream_id = ?1 AND usage_id = ?2",
    )?;
    let stored = statement
        .query_row(params![stream_id, usage_id], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, Option<i64>>(2)?))
        })
        .optional()?;
    let Some((position, credits, reversed_position)) = stored else {
        return Ok(None);
    };
    let bad = |value: i64| {
        StoreError::Corrupt(format!("usage {usage_id} of stream {stream_id} has the negative position {value}"))
    };
    Ok(Some(UsageIndexEntry {
        position: u64::try_from(position).map_err(|_| bad(position))?,
        credits,
        reversed_position: reversed_position.map(|value| u64::try_from(value).map_err(|_| bad(value))).transpose()?,
    }))
}
