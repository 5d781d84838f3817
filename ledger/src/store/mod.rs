//! The append-only SQLite event store: the ledger's single source of truth.
//!
//! Every balance, invoice and statistic tally shows is a fold over the rows of
//! one SQLite table, `events`, so this module is built to make that table
//! trustworthy rather than fast to change:
//!
//! - **Append-only is the database's rule, not ours.** Triggers abort every
//!   `UPDATE` and `DELETE` on `events`, and a `BEFORE INSERT` trigger refuses a
//!   row that is not at the next global position and the next version of its
//!   stream, so a second program writing the file (or a bug here) cannot leave
//!   a gap.
//! - **Tamper evidence.** Each row stores `h_n = SHA-256(h_{n-1} ‖ fields)`
//!   over the bytes exactly as stored ([`chain_hash`]). Anyone who can write
//!   the file can drop the triggers, so [`EventReader::verify_chain`]
//!   recomputes the chain from position 1 and names the first bad row; the
//!   head hash it returns is meant to be recorded outside the database.
//! - **Optimistic concurrency per stream.** A stream (one member, the
//!   catalog, …) is the consistency boundary: [`ExpectedVersion`] is checked
//!   inside the write transaction against the file, never against a cache, so
//!   a second process appending to the same file gets a
//!   [`StoreError::VersionConflict`] instead of a decision on stale state.
//! - **Group commit.** One [`EventStore`] owns the write connection. A
//!   [`Batch`] is one `BEGIN IMMEDIATE … COMMIT` holding several commands,
//!   each in its own `SAVEPOINT`, so that one fsync acknowledges many
//!   commands and one failing command does not fail the others. The head
//!   (position, hash) is cached in memory but re-read from the file at the
//!   start of every batch, which is what keeps two processes on one file
//!   correct.
//! - **Side indexes in the same transaction.** Idempotency records and the
//!   usage-id index are ordinary tables written by the same batch as the
//!   events they describe, so they can never disagree with the log after a
//!   crash.
//!
//! - **Imports keep the chain.** [`Batch::import_event`] writes an exported
//!   event back with its own position, `recorded_at`, bytes and hash, only
//!   if it hashes from the event before it and fits the log (the same event
//!   where the log already has one, the next position and version beyond).
//!
//! Readers ([`EventReader`]) open their own read-only connections; WAL lets
//! them read a consistent snapshot beside the writer. The store's owner may
//! move WAL checkpoints off the commit path onto a thread of their own
//! ([`EventStore::checkpoint_in_background`], `checkpoint.rs`).
//!
//! Layout: `schema` opens files and refuses foreign ones, `hash` holds the
//! chain formula and the timestamp encoding, `writer` the write connection
//! and its batches, `checkpoint` WAL checkpoints beside the writer, `reader` the read side and chain verification, `error`
//! the error enums.

mod checkpoint;
mod durability;
mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
mod hash;
mod reader;
mod rows;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use checkpoint::{BackgroundCheckpoints, CheckpointOptions, CheckpointStats};
pub use durability::{VisibleHead, WalSync};
pub use error::{ChainError, StoreError};
pub use hash::{CHAIN_HASH_ZERO, ChainLink, RECORDED_AT_FORMAT, chain_hash, format_recorded_at};
pub use reader::{CatchUp, ChainReport, EventReader, StreamEvents};
pub use schema::{CREATE_SCHEMA_SQL, SCHEMA_VERSION, WRITER_CACHE_KIB};
pub use writer::{Batch, EventStore, IDEMPOTENCY_RETENTION_MIN_DAYS};

/// Most events one append may carry. A command produces a handful of events;
/// even a renewal with rollover, expiries and an invoice stays far below this,
/// so reaching it means a runaway caller, not a busy member.
pub const APPEND_EVENTS_MAX: usize = 1_000;
/// Longest stream id, in bytes (`member-{id}` with a generous id).
pub const STREAM_ID_BYTES_MAX: usize = 256;
/// Longest event type name, in bytes.
pub const EVENT_TYPE_BYTES_MAX: usize = 128;
/// Largest event payload, in bytes. Events are facts, not documents; the
/// largest (an issued invoice with its lines) is a few kilobytes.
pub const EVENT_PAYLOAD_BYTES_MAX: usize = 1024 * 1024;
/// Longest idempotency scope, idempotency key or usage id, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;
/// Largest stored idempotent response body, in bytes.
pub const IDEMPOTENCY_RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// Most events one read returns; callers page with positions or versions.
pub const READ_PAGE_SIZE_MAX: usize = 10_000;

/// What the caller believes the stream's current version is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append after whatever is there (no concurrency check).
    Any,
    /// The stream must not exist yet (its version is 0).
    NoStream,
    /// The stream's last event must have exactly this version (0 = no stream).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `actual` satisfies this expectation.
    pub fn accepts(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(expected) => actual == expected,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => write!(formatter, "any version"),
            ExpectedVersion::NoStream => write!(formatter, "no stream"),
            ExpectedVersion::Exact(version) => write!(formatter, "version {version}"),
        }
    }
}

/// Metadata stored as JSON in the `metadata` column.
///
/// Absent options are left out of the JSON, and unknown fields are ignored
/// when reading, so that a later version may add fields without rewriting
/// stored bytes (which the hash chain covers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct EventMetadata {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// Who caused the event: `admin`, `member_key:<id>`, `stripe`, `scheduler`.
    pub actor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// An event about to be appended. The payload is already-serialised JSON:
/// the domain owns the encoding and the store keeps its bytes as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// A UUID v7 made by the caller; unique across the whole log.
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: String,
    pub metadata: EventMetadata,
}

/// An event as stored, with its place in the log and its chain hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedEvent {
    /// Global position, gapless from 1.
    pub position: u64,
    pub stream_id: String,
    /// Version within the stream, gapless from 1.
    pub version: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub event_id: Uuid,
    pub payload: String,
    pub metadata: EventMetadata,
    /// The metadata exactly as stored. The hash covers these bytes, and an
    /// export must carry them unchanged for an import to reproduce the chain.
    pub metadata_json: String,
    /// Microsecond precision; stored as [`RECORDED_AT_FORMAT`].
    pub recorded_at: DateTime<Utc>,
    pub hash: [u8; 32],
}

impl RecordedEvent {
    /// The stored bytes this event's chain hash covers. `recorded_at` is
    /// passed in because the stored text is derived, not kept: use
    /// [`format_recorded_at`]`(self.recorded_at)`.
    pub fn chain_link<'event>(&'event self, recorded_at_text: &'event str) -> ChainLink<'event> {
        ChainLink {
            position: self.position,
            stream_id: self.stream_id.as_bytes(),
            version: self.version,
            event_type: self.event_type.as_bytes(),
            schema_version: self.schema_version,
            event_id: self.event_id.as_bytes(),
            payload: self.payload.as_bytes(),
            metadata: self.metadata_json.as_bytes(),
            recorded_at: recorded_at_text.as_bytes(),
        }
    }

    /// Recomputes this event's hash from the previous event's hash.
    pub fn expected_hash(&self, previous_hash: &[u8; 32]) -> [u8; 32] {
        let recorded_at_text = format_recorded_at(self.recorded_at);
        chain_hash(previous_hash, &self.chain_link(&recorded_at_text))
    }
}

/// Where an append landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    pub first_position: u64,
    pub last_position: u64,
    /// The stream's version after the append.
    pub last_version: u64,
    /// The `recorded_at` actually stored: the one asked for, truncated to
    /// microseconds and raised to the previous event's if the caller's clock
    /// was behind (so `recorded_at` never decreases along the log).
    pub recorded_at: DateTime<Utc>,
}

/// What [`Batch::import_event`] did with one event of an exported log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imported {
    /// The log already held this very event (same position and hash).
    AlreadyPresent,
    /// It was appended after the head.
    Appended,
}

/// The last event of the log: its position (0 = empty log) and hash
/// ([`CHAIN_HASH_ZERO`] for an empty log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub position: u64,
    pub hash: [u8; 32],
}

impl Head {
    /// The head of an empty log.
    pub const EMPTY: Head = Head { position: 0, hash: CHAIN_HASH_ZERO };

    /// The hash as lowercase hex, for printing and recording outside the database.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }
}

/// The stored outcome of an accepted command, replayed when the same
/// idempotency key comes again with the same fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// SHA-256 of method, path and canonical body.
    pub fingerprint: [u8; 32],
    /// The HTTP status originally answered.
    pub status: u16,
    /// The JSON body originally answered.
    pub response: String,
    /// The position of the command's last event.
    pub position: u64,
    /// When the command was accepted; records are purged by this, after at
    /// least [`IDEMPOTENCY_RETENTION_MIN_DAYS`].
    pub recorded_at: DateTime<Utc>,
}

/// A stream's state folded up to `version`, serialised by its owner (the
/// service): a cache that bounds how much of a long stream is read when the
/// stream is first needed, never a source of truth. `format` names the
/// serialisation; a snapshot of another format is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub version: u64,
    pub format: u32,
    pub state: String,
}

/// One entry of the per-stream usage-id index, which makes a `usage_id`
/// unique for ever without keeping a set of ids in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageIndexEntry {
    /// Position of the `UsageRecorded` event.
    pub position: u64,
    /// Credits the usage charged.
    pub credits: i64,
    /// Position of the `UsageReversed` event, once reversed.
    pub reversed_position: Option<u64>,
}

/// How the write connection is tuned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// `synchronous=FULL` (the default) fsyncs the WAL on every commit, so an
    /// acknowledged command survives a power cut. `false` means
    /// `synchronous=NORMAL`: still crash-safe for the process, but the last
    /// commits may be lost on power failure. Only for tests and benchmarks.
    pub synchronous_full: bool,
    /// How long a write waits for another process's write lock before
    /// [`StoreError::Busy`], in milliseconds.
    pub busy_timeout_ms: u32,
    /// A budget for the log file: past it an append fails with
    /// [`StoreError::Full`] exactly as on a full disk (SQLite's
    /// `max_page_count`), writing nothing; reads go on. `None`: no limit
    /// but the disk's.
    pub max_log_bytes: Option<u64>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { synchronous_full: true, busy_timeout_ms: 5_000, max_log_bytes: None }
    }
}
