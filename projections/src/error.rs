//! The one error enum of the projections layer. Each variant's doc says how
//! a caller handles it, down to the HTTP answer the API gives.

use std::path::PathBuf;

use tally_ledger::codec::CodecError;
use tally_ledger::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The projections database failed (disk full, I/O error, a busy lock
    /// held past the timeout). 503; the runner retries on its own.
    #[error("projections database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Reading the event log failed. 503; the runner retries on its own.
    #[error("event log: {0}")]
    Store(#[from] StoreError),
    /// A stored event does not decode. 500; run `tally audit verify`, and
    /// upgrade tally if the log was written by a newer version.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The log contradicts what a read model already holds (a part taken
    /// from a grant it never saw, an invoice it does not know). The runner
    /// stops that batch rather than write a wrong figure. 500; verify the
    /// log, then rebuild the projector.
    #[error("{projector} cannot apply the event at position {position}: {reason}")]
    Inconsistent { projector: &'static str, position: u64, reason: String },
    /// A projector failed on purpose or for a reason of its own (used by
    /// wrapping projectors, for instance to simulate a crash in tests). 500.
    #[error("{projector} failed at position {position}: {reason}")]
    ProjectorFailed { projector: String, position: u64, reason: String },
    /// The read models did not reach `position` within the wait. 503
    /// `projection_lagging`; the client may retry.
    #[error("the read models reached position {reached}, not {position}, within the wait")]
    Lagging { position: u64, reached: u64 },
    /// `min_position` is beyond the log's head: no write ever answered with
    /// it. 422 `validation_failed`.
    #[error("position {position} is beyond the log's head ({head})")]
    PositionBeyondHead { position: u64, head: u64 },
    /// The read model is being built for the first time or for a new
    /// projector version; its old tables are not served. 503
    /// `projection_lagging`.
    #[error("the read model {read_model} is being built and not served yet")]
    NotReady { read_model: String },
    /// A query argument is out of range or malformed (a cursor, a page size,
    /// a date range). 422 `validation_failed` naming `field`.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// No projector or read model has this name. 404 (or a CLI usage error).
    #[error("no projector or read model is named {name:?}")]
    UnknownProjector { name: String },
    /// Another process owns these projections (a running server). The CLI
    /// should ask that server instead.
    #[error("another process owns the projections at {path}")]
    Locked { path: PathBuf },
    /// The projections file or its lock file cannot be opened.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The projections file was written by a newer tally, or is not a
    /// projections file. Upgrade, or point to another file.
    #[error("{path} is not a projections database this build understands: {reason}")]
    Foreign { path: PathBuf, reason: String },
    /// The runner thread could not be started or stopped. 500.
    #[error("the projections runner: {0}")]
    Runner(String),
}

impl ProjectionError {
    /// Whether a client may simply retry later (the read models are behind
    /// or busy), as opposed to a request error or a broken log.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProjectionError::Lagging { .. }
                | ProjectionError::NotReady { .. }
                | ProjectionError::Sqlite(_)
                | ProjectionError::Store(_)
        )
    }
}
