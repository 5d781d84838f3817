//! The read side: pages by stream and by global position, a catch-up
//! iterator for projectors, and the chain verification for audits.
//!
//! Each reader has its own read-only connection, so WAL lets it read beside
//! the writer without blocking it. One SQL statement reads one consistent
//! snapshot; iterators that span pages do not, and do not need to: the log
//! only grows, and they page by position or version, never by offset.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Row, params};

use super::hash::{ChainLink, chain_hash, format_recorded_at};
use super::rows::{self, EVENT_COLUMNS_SQL, check_page_size, to_sql_integer};
use super::schema::open_for_reading;
use super::{ChainError, Head, IdempotencyRecord, RecordedEvent, StoreError, UsageIndexEntry, VisibleHead};

/// How often [`EventReader::verify_chain`] reports progress, in events.
const VERIFY_PROGRESS_INTERVAL_EVENTS: u64 = 1024;

/// A read-only connection to an event log.
pub struct EventReader {
    connection: Connection,
    path: PathBuf,
    /// Set by [`EventReader::hide_unsynced`].
    visible: Option<Arc<VisibleHead>>,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EventReader").field("path", &self.path).finish_non_exhaustive()
    }
}

/// What a successful [`EventReader::verify_chain`] checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainReport {
    pub events_checked: u64,
    /// The recomputed head; record its hash outside the database, since
    /// anyone who can write the file can also recompute a consistent chain.
    pub head: Head,
}

impl EventReader {
    /// No transaction left open: the reader may serve another caller.
    pub fn is_idle(&self) -> bool {
        self.connection.is_autocommit()
    }

    /// Opens an existing log read-only; refuses a file that is not one.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let connection = open_for_reading(path)?;
        Ok(EventReader { connection, path: path.to_path_buf(), visible: None })
    }

    /// From now on the head and every event read stop short of the batches
    /// a writer in this process committed but has not yet fsynced (see
    /// `durability.rs`). Lookups by key (usage ids, idempotency records,
    /// customers, `stream_version`) and `verify_chain` are not limited.
    pub fn hide_unsynced(&mut self, visible: Arc<VisibleHead>) {
        self.visible = Some(visible);
    }

    /// A new connection on the same file, hiding what this one hides.
    pub fn reopen(&self) -> Result<EventReader, StoreError> {
        let mut reader = EventReader::open(&self.path)?;
        reader.visible = self.visible.clone();
        Ok(reader)
    }

    /// The last position reads may return. Taken after the read it limits:
    /// a batch is marked before its commit makes it readable.
    fn limit(&self) -> u64 {
        self.visible.as_ref().map_or(u64::MAX, |visible| visible.limit())
    }

    fn visible(&self, mut events: Vec<RecordedEvent>) -> Vec<RecordedEvent> {
        let limit = self.limit();
        if events.last().is_some_and(|event| event.position > limit) {
            events.retain(|event| event.position <= limit);
        }
        events
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log's last position and hash, as of now.
    pub fn head(&self) -> Result<Head, StoreError> {
        let head = rows::read_tip(&self.connection)?.head;
        let limit = self.limit();
        if head.position <= limit {
            return Ok(head);
        }
        if limit == 0 {
            return Ok(Head::EMPTY);
        }
        match self.read_range(limit - 1, limit, 1)?.first() {
            Some(event) => Ok(Head { position: event.position, hash: event.hash }),
            None => Err(StoreError::Corrupt(format!("position {limit} is missing"))),
        }
    }

    /// The stream's last version; 0 when it has no events.
    pub fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
        rows::stream_version(&self.connection, stream_id)
    }

    /// Up to `limit` events of a stream with versions `>= from_version`, ascending.
    pub fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        Ok(self.visible(rows::read_stream(&self.connection, stream_id, from_version, limit)?))
    }

    /// Like [`EventReader::read_stream`], but only events recorded at or
    /// before `recorded_at_most`: the stream as an audit "as of" that instant
    /// sees it. Since `recorded_at` never decreases along the log, this is a
    /// prefix of the stream.
    pub fn read_stream_until(
        &self,
        stream_id: &str,
        recorded_at_most: DateTime<Utc>,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let limit = check_page_size(limit)?;
        let from_version = to_sql_integer(from_version, "from_version")?;
        let events = rows::query_events(
            &self.connection,
            &format!(
                "SELECT {EVENT_COLUMNS_SQL} FROM events WHERE stream_id = ?1 AND version >= ?2 AND recorded_at <= ?3 ORDER BY version LIMIT ?4"
            ),
            params![stream_id, from_version, format_recorded_at(recorded_at_most), limit],
        )?;
        Ok(self.visible(events))
    }

    /// Every event of a stream in version order, optionally only those
    /// recorded at or before an instant, read `page_size` at a time.
    pub fn stream_events(
        &self,
        stream_id: &str,
        recorded_at_most: Option<DateTime<Utc>>,
        page_size: usize,
    ) -> StreamEvents<'_> {
        StreamEvents {
            reader: self,
            stream_id: stream_id.to_string(),
            recorded_at_most,
            page_size,
            next_version: 1,
            page: Vec::new().into_iter(),
            done: false,
        }
    }

    /// Up to `limit` events with positions `> after_position`, ascending.
    pub fn read_all(&self, after_position: u64, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        let limit = check_page_size(limit)?;
        let after_position = to_sql_integer(after_position, "after_position")?;
        let events = rows::query_events(
            &self.connection,
            &format!("SELECT {EVENT_COLUMNS_SQL} FROM events WHERE position > ?1 ORDER BY position LIMIT ?2"),
            params![after_position, limit],
        )?;
        Ok(self.visible(events))
    }

    /// Events with positions in `(after_position, through_position]`, at most `limit`.
    fn read_range(
        &self,
        after_position: u64,
        through_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let limit = check_page_size(limit)?;
        rows::query_events(
            &self.connection,
            &format!(
                "SELECT {EVENT_COLUMNS_SQL} FROM events WHERE position > ?1 AND position <= ?2 ORDER BY position LIMIT ?3"
            ),
            params![
                to_sql_integer(after_position, "after_position")?,
                to_sql_integer(through_position, "through_position")?,
                limit
            ],
        )
    }

    /// Every event after `after_position` up to the head found when the
    /// iteration starts, `page_size` at a time. A projector catches up with
    /// this, then waits for the writer's signal and catches up again.
    pub fn catch_up(&self, after_position: u64, page_size: usize) -> CatchUp<'_> {
        CatchUp {
            reader: self,
            after_position,
            page_size,
            through_position: None,
            page: Vec::new().into_iter(),
            done: false,
        }
    }

    pub fn usage(&self, stream_id: &str, usage_id: &str) -> Result<Option<UsageIndexEntry>, StoreError> {
        rows::usage(&self.connection, stream_id, usage_id)
    }

    /// The ids of the streams that begin with `prefix`, in order, at most
    /// `limit`, after `after` (a range scan of the stream index). Streams
    /// whose first event is not yet visible here are left out.
    pub fn stream_ids_with_prefix(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        // Every stream id with the prefix sorts between the prefix and the
        // prefix followed by the largest character.
        let upper = format!("{prefix}{}", char::MAX);
        let lower = after.unwrap_or(prefix);
        let mut statement = self.connection.prepare_cached(
            "SELECT stream_id FROM events WHERE stream_id > ?1 AND stream_id < ?2 AND version = 1
               AND position <= ?3 ORDER BY stream_id LIMIT ?4",
        )?;
        let limit_position = i64::try_from(self.limit()).unwrap_or(i64::MAX);
        let rows = statement.query_map(
            rusqlite::params![lower, upper, limit_position, i64::try_from(limit).unwrap_or(i64::MAX)],
            |row| row.get::<_, String>(0),
        )?;
        let ids: Vec<String> = rows.collect::<Result<_, _>>()?;
        Ok(ids.into_iter().filter(|id| id.starts_with(prefix)).collect())
    }

    /// The member stream a Stripe customer is linked to.
    pub fn stripe_customer_stream(&self, customer_id: &str) -> Result<Option<String>, StoreError> {
        use rusqlite::OptionalExtension;
        let mut statement =
            self.connection.prepare_cached("SELECT stream_id FROM stripe_customers WHERE customer_id = ?1")?;
        Ok(statement.query_row([customer_id], |row| row.get(0)).optional()?)
    }

    pub fn idempotency(&self, scope: &str, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        rows::idempotency(&self.connection, scope, key)
    }

    /// Recomputes the hash chain from position 1 and checks that positions
    /// are gapless from 1 and each stream's versions gapless from 1, in one
    /// snapshot. Names the first bad position in log order.
    ///
    /// `progress` is called with the last checked position every
    /// 1024 events and at the end. The snapshot is held for the whole
    /// run, which keeps the WAL from being checkpointed past it meanwhile.
    pub fn verify_chain(&self, mut progress: impl FnMut(u64)) -> Result<ChainReport, ChainError> {
        let snapshot = self.connection.unchecked_transaction().map_err(StoreError::from)?;
        let hash_result = verify_hashes(&snapshot, &mut progress);
        // Versions are only checked before the first hash failure, so that
        // whichever problem comes first in the log is the one named.
        let checked_through = match &hash_result {
            Ok(report) => report.head.position,
            Err(error) => match error.first_bad_position() {
                Some(position) => position.saturating_sub(1),
                None => return hash_result,
            },
        };
        if let Some(version_error) = first_version_gap(&snapshot, checked_through)? {
            return Err(version_error);
        }
        hash_result
    }
}

/// Walks the log in position order, recomputing every hash.
fn verify_hashes(connection: &Connection, progress: &mut impl FnMut(u64)) -> Result<ChainReport, ChainError> {
    let mut statement = connection
        .prepare(&format!("SELECT {EVENT_COLUMNS_SQL} FROM events ORDER BY position"))
        .map_err(StoreError::from)?;
    let mut rows = statement.query([]).map_err(StoreError::from)?;
    let mut head = Head::EMPTY;
    let mut events_checked: u64 = 0;
    let mut events_since_progress: u64 = 0;
    while let Some(row) = rows.next().map_err(StoreError::from)? {
        let expected_position = head.position + 1;
        let stored_position: i64 = row.get(0).map_err(StoreError::from)?;
        if stored_position != expected_position as i64 {
            return Err(match u64::try_from(stored_position) {
                Ok(next_position) if next_position > expected_position => {
                    ChainError::Gap { position: expected_position, next_position }
                }
                _ => ChainError::FirstBadPosition {
                    position: expected_position,
                    reason: format!("a row has position {stored_position}; positions start at 1"),
                },
            });
        }
        let hash = hash_row(row, expected_position, &head.hash)
            .map_err(|reason| ChainError::FirstBadPosition { position: expected_position, reason })?;
        head = Head { position: expected_position, hash };
        events_checked += 1;
        events_since_progress += 1;
        if events_since_progress == VERIFY_PROGRESS_INTERVAL_EVENTS {
            progress(head.position);
            events_since_progress = 0;
        }
    }
    progress(head.position);
    Ok(ChainReport { events_checked, head })
}

/// Recomputes one row's hash from the stored bytes and compares it with the
/// stored hash; returns the hash, or why the row is bad.
fn hash_row(row: &Row<'_>, position: u64, previous_hash: &[u8; 32]) -> Result<[u8; 32], String> {
    let bytes = |index: usize, what: &str| -> Result<&[u8], String> {
        match row.get_ref(index) {
            Ok(ValueRef::Text(bytes)) | Ok(ValueRef::Blob(bytes)) => Ok(bytes),
            Ok(other) => Err(format!("{what} is stored as {:?}, not text or bytes", other.data_type())),
            Err(error) => Err(format!("{what} cannot be read: {error}")),
        }
    };
    let integer = |index: usize, what: &str| -> Result<i64, String> {
        match row.get_ref(index) {
            Ok(ValueRef::Integer(value)) => Ok(value),
            Ok(other) => Err(format!("{what} is stored as {:?}, not an integer", other.data_type())),
            Err(error) => Err(format!("{what} cannot be read: {error}")),
        }
    };
    let stored_version = integer(2, "version")?;
    let version = u64::try_from(stored_version).map_err(|_| format!("version {stored_version} is negative"))?;
    let stored_schema_version = integer(4, "schema_version")?;
    let schema_version = u32::try_from(stored_schema_version)
        .map_err(|_| format!("schema_version {stored_schema_version} is not a u32"))?;
    let event_id_bytes = bytes(5, "event_id")?;
    let event_id = <&[u8; 16]>::try_from(event_id_bytes)
        .map_err(|_| format!("event_id has {} bytes, not 16", event_id_bytes.len()))?;
    let computed = chain_hash(
        previous_hash,
        &ChainLink {
            position,
            stream_id: bytes(1, "stream_id")?,
            version,
            event_type: bytes(3, "event_type")?,
            schema_version,
            event_id,
            payload: bytes(6, "payload")?,
            metadata: bytes(7, "metadata")?,
            recorded_at: bytes(8, "recorded_at")?,
        },
    );
    let stored_hash = bytes(9, "hash")?;
    if stored_hash != computed.as_slice() {
        return Err(format!(
            "the stored hash is {} but the row hashes to {}",
            hex::encode(stored_hash),
            hex::encode(computed)
        ));
    }
    Ok(computed)
}

/// The first row (by position, up to `through_position`) whose version is
/// not one more than the number of earlier rows of its stream.
fn first_version_gap(connection: &Connection, through_position: u64) -> Result<Option<ChainError>, ChainError> {
    let mut statement = connection
        .prepare(
            "SELECT position, stream_id, version, expected_version FROM (
                 SELECT position, stream_id, version,
                        row_number() OVER (PARTITION BY stream_id ORDER BY position) AS expected_version
                 FROM events WHERE position <= ?1
             )
             WHERE version IS NOT expected_version
             ORDER BY position LIMIT 1",
        )
        .map_err(StoreError::from)?;
    let through_position = to_sql_integer(through_position, "through_position")?;
    let mut rows = statement.query(params![through_position]).map_err(StoreError::from)?;
    let Some(row) = rows.next().map_err(StoreError::from)? else {
        return Ok(None);
    };
    let position: i64 = row.get(0).map_err(StoreError::from)?;
    let stream_id = match row.get_ref(1).map_err(StoreError::from)? {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        other => format!("{other:?}"),
    };
    let found_version: i64 = row.get(2).map_err(StoreError::from)?;
    let expected_version: i64 = row.get(3).map_err(StoreError::from)?;
    Ok(Some(ChainError::VersionGap {
        position: u64::try_from(position).unwrap_or(0),
        stream_id,
        expected_version: u64::try_from(expected_version).unwrap_or(0),
        found_version: u64::try_from(found_version).unwrap_or(0),
    }))
}

/// Pages through the log up to the head found on the first call to `next`.
/// Yields each event once, in position order; after an error it ends.
#[derive(Debug)]
pub struct CatchUp<'reader> {
    reader: &'reader EventReader,
    after_position: u64,
    page_size: usize,
    /// The head position this iteration stops at, read on the first `next`.
    through_position: Option<u64>,
    page: std::vec::IntoIter<RecordedEvent>,
    done: bool,
}

impl CatchUp<'_> {
    /// The position this iteration stops at, once known (after the first `next`).
    pub fn through_position(&self) -> Option<u64> {
        self.through_position
    }

    fn next_page(&mut self) -> Result<bool, StoreError> {
        let through_position = match self.through_position {
            Some(position) => position,
            None => {
                let position = self.reader.head()?.position;
                self.through_position = Some(position);
                position
            }
        };
        if self.after_position >= through_position {
            return Ok(false);
        }
        let events = self.reader.read_range(self.after_position, through_position, self.page_size)?;
        if events.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "positions {} to {through_position} are missing",
                self.after_position + 1
            )));
        }
        self.page = events.into_iter();
        Ok(true)
    }
}

impl Iterator for CatchUp<'_> {
    type Item = Result<RecordedEvent, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(event) = self.page.next() {
                self.after_position = event.position;
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            match self.next_page() {
                Ok(true) => {}
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            }
        }
    }
}

/// Pages through one stream in version order. Yields each event once; after
/// an error it ends.
#[derive(Debug)]
pub struct StreamEvents<'reader> {
    reader: &'reader EventReader,
    stream_id: String,
    recorded_at_most: Option<DateTime<Utc>>,
    page_size: usize,
    next_version: u64,
    page: std::vec::IntoIter<RecordedEvent>,
    done: bool,
}

impl Iterator for StreamEvents<'_> {
    type Item = Result<RecordedEvent, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(event) = self.page.next() {
            self.next_version = event.version + 1;
            return Some(Ok(event));
        }
        if self.done {
            return None;
        }
        let page = match self.recorded_at_most {
            Some(instant) => self.reader.read_stream_until(&self.stream_id, instant, self.next_version, self.page_size),
            None => self.reader.read_stream(&self.stream_id, self.next_version, self.page_size),
        };
        match page {
            Ok(events) => {
                // A short page is the stream's end: there is no need for a
                // last, empty query.
                self.done = events.len() < self.page_size;
                self.page = events.into_iter();
                let event = self.page.next()?;
                self.next_version = event.version + 1;
                Some(Ok(event))
            }
            Err(error) => {
                self.done = true;
                Some(Err(error))
            }
        }
    }
}
