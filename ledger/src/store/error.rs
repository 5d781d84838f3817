//! The store's errors, one enum for storage and one for chain verification.
//!
//! Each variant's doc says what a caller should do with it, down to the HTTP
//! status the API answers, because the writer turns these into responses for
//! callers that cannot see the database.

use std::path::PathBuf;

use rusqlite::ErrorCode;

use super::ExpectedVersion;

#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// The stream is not at the expected version; nothing was written.
    /// Reload the stream, decide again and retry; answer 409
    /// `version_conflict` only when retries run out.
    #[error("version conflict on stream {stream_id}: expected {expected}, but the stream is at version {actual}")]
    VersionConflict { stream_id: String, expected: ExpectedVersion, actual: u64 },

    /// The file is not a tally event log (not SQLite, or a SQLite database
    /// with someone else's tables). Nothing was changed. An operator error:
    /// fix the configured path; do not retry.
    #[error("{path} is not a tally event log: {reason}")]
    NotALedger { path: PathBuf, reason: String },

    /// The file is a tally event log written by a newer tally. Nothing was
    /// changed. Upgrade this binary; do not retry.
    #[error(
        "{path} has tally schema version {found}, but this build understands only version {supported}; upgrade tally"
    )]
    UnsupportedSchemaVersion { path: PathBuf, found: i64, supported: i64 },

    /// The file could not be opened (missing directory, permissions, a
    /// reader on a file that does not exist). Fix the path or permissions;
    /// retrying will not help.
    #[error("cannot open the event log {path}: {source}")]
    CannotOpen {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// Stored data cannot be decoded (bad UTF-8, a malformed timestamp or
    /// metadata, a wrong-length id) or the schema was altered (triggers
    /// dropped). The log was damaged outside the store: stop writing, run
    /// `tally audit verify`; answer 500.
    #[error("the event log is corrupt: {0}")]
    Corrupt(String),

    /// Another connection held the write lock for longer than the busy
    /// timeout. Nothing was written. Answer 503 and let the client retry.
    #[error("the event log is busy (locked by another connection beyond the busy timeout)")]
    Busy,

    /// The disk is full. Nothing of the failed transaction was written.
    /// Answer 503; an operator must free space.
    #[error("the disk holding the event log is full")]
    Full,

    /// An I/O error outside SQLite (reading a file header). Answer 500.
    #[error("I/O error on the event log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A unique key (an event id, an idempotency key in its scope, a usage
    /// id in its stream) was written twice; the failed append or insert wrote
    /// nothing. The caller must look the key up inside the same batch before
    /// writing it, so this is a caller bug or a replayed import: answer 500
    /// (or 409 for an import).
    #[error("duplicate {what}: {key}")]
    Duplicate { what: &'static str, key: String },

    /// An argument breaks one of the store's limits or rules (the message
    /// names it); nothing was written. A caller bug, since the API validates
    /// first: answer 500, do not retry.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The batch API was used out of order (committing with a command still
    /// open, releasing a command that was never begun). A caller bug: the
    /// batch is rolled back where it must be; answer 500.
    #[error("batch misuse: {0}")]
    Misuse(&'static str),

    /// An earlier failure inside this batch ended its transaction (SQLite
    /// rolls back on some I/O errors), so nothing of the batch will be
    /// written. Drop the batch and retry its commands in a new one; answer
    /// 503 if that fails too.
    #[error("the batch was rolled back by an earlier failure; retry its commands in a new batch")]
    BatchAborted,

    /// An imported event does not fit the log at `position`: it does not
    /// chain from the event before it, the log holds a different event
    /// there, or it would leave a gap. The import wrote nothing (its batch
    /// is rolled back). Fix or re-export the file; retrying will not help.
    #[error("the import does not fit the log at position {position}: {reason}")]
    ImportRefused { position: u64, reason: String },

    /// Any other SQLite error. Answer 500.
    #[error("SQLite error: {0}")]
    Sqlite(#[source] rusqlite::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy,
            Some(ErrorCode::DiskFull) => StoreError::Full,
            Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt(error.to_string()),
            _ => StoreError::Sqlite(error),
        }
    }
}

/// Why [`EventReader::verify_chain`](super::EventReader::verify_chain)
/// rejected the log. Every variant but `Store` names the first bad position,
/// counting in log order.
#[derive(thiserror::Error, Debug)]
pub enum ChainError {
    /// The row at `position` does not hash to its stored hash (its bytes, or
    /// an earlier row's, were changed), or cannot be read as an event.
    #[error("the hash chain breaks at position {position}: {reason}")]
    FirstBadPosition { position: u64, reason: String },

    /// Positions are not gapless: `position` is missing (a row was deleted),
    /// and the next stored row is at `next_position`.
    #[error("position {position} is missing; the next stored row is at position {next_position}")]
    Gap { position: u64, next_position: u64 },

    /// The row at `position` is not the next version of its stream.
    #[error(
        "the row at position {position} has version {found_version} of stream {stream_id}, expected version {expected_version}"
    )]
    VersionGap { position: u64, stream_id: String, expected_version: u64, found_version: u64 },

    /// The log could not be read at all. Not evidence of tampering.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ChainError {
    /// The first bad position, unless the log could not be read.
    pub fn first_bad_position(&self) -> Option<u64> {
        match self {
            ChainError::FirstBadPosition { position, .. }
            | ChainError::Gap { position, .. }
            | ChainError::VersionGap { position, .. } => Some(*position),
            ChainError::Store(_) => None,
        }
    }
}

/// True when `error` is a constraint violation of the given extended kind
/// (`SQLITE_CONSTRAINT_UNIQUE`, `…_PRIMARYKEY`, …).
pub(super) fn is_constraint(error: &rusqlite::Error, extended_code: i32) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(failure, _) if failure.extended_code == extended_code)
}
