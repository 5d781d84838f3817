//! Digests of read models: SHA-256 over every row of the read model's
//! tables in primary-key order, so that two builds of the same log (one
//! incremental, one rebuilt; one here, one on another machine) can be
//! compared with one string.
//!
//! The hash covers, per table in declaration order: its name without the
//! generation suffix, its column names, then each row's values with a type
//! tag (NULL, integer as 8 bytes big-endian, text and blobs length-prefixed).
//! Generation numbers are not covered, so a rebuild digests like the build
//! it replaces.

use rusqlite::types::ValueRef;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::error::ProjectionError;
use crate::projector::Projector;
use crate::read::Snapshot;

/// The digest of one read model at one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Digest {
    pub read_model: String,
    /// The checkpoint of the generation digested: two digests are
    /// comparable only at the same position.
    pub position: u64,
    pub rows: u64,
    /// Lowercase hex.
    pub sha256: String,
}

fn update_length_prefixed(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

pub(crate) fn digest_read_model(
    snapshot: &Snapshot<'_>,
    projector: &dyn Projector,
    read_model: &str,
) -> Result<Digest, ProjectionError> {
    let not_ready = || ProjectionError::NotReady { read_model: read_model.to_owned() };
    let live = snapshot.live(projector.name()).ok_or_else(not_ready)?;
    let position = live.checkpoint;
    let mut hasher = Sha256::new();
    let mut rows_count: u64 = 0;
    for table in projector.tables().iter().filter(|table| table.read_model == read_model) {
        update_length_prefixed(&mut hasher, table.name.as_bytes());
        let template = format!("SELECT * FROM {{{}}} ORDER BY {}", table.name, table.key);
        let sql = snapshot.render(projector.name(), read_model, &template)?;
        let mut statement = snapshot.connection().prepare(&sql)?;
        for column in statement.column_names() {
            update_length_prefixed(&mut hasher, column.as_bytes());
        }
        let columns = statement.column_count();
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            rows_count += 1;
            hasher.update(b"R");
            for index in 0..columns {
                match row.get_ref(index)? {
                    ValueRef::Null => hasher.update([0u8]),
                    ValueRef::Integer(value) => {
                        hasher.update([1u8]);
                        hasher.update(value.to_be_bytes());
                    }
                    ValueRef::Real(value) => {
                        hasher.update([2u8]);
                        hasher.update(value.to_bits().to_be_bytes());
                    }
                    ValueRef::Text(bytes) => {
                        hasher.update([3u8]);
                        update_length_prefixed(&mut hasher, bytes);
                    }
                    ValueRef::Blob(bytes) => {
                        hasher.update([4u8]);
                        update_length_prefixed(&mut hasher, bytes);
                    }
                }
            }
        }
    }
    Ok(Digest { read_model: read_model.to_owned(), position, rows: rows_count, sha256: hex::encode(hasher.finalize()) })
}
