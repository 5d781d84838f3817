//! The hash chain formula and the timestamp encoding it depends on.
//!
//! Both are public because an audit tool outside this crate must be able to
//! recompute a chain from an export without trusting this store: the formula
//! is the contract, so it lives in one small function with no I/O.

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use sha2::{Digest, Sha256};

/// `h_0`: the hash before the first event.
pub const CHAIN_HASH_ZERO: [u8; 32] = [0; 32];

/// How `recorded_at` is stored: RFC 3339 in UTC with exactly six fractional
/// digits and a `Z`, e.g. `2025-01-31T23:59:59.000001Z`. One fixed width
/// makes the stored bytes (which the chain hashes) a function of the instant
/// alone, and makes text order the same as time order for range queries.
pub const RECORDED_AT_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// Formats an instant as stored ([`RECORDED_AT_FORMAT`]), truncating to microseconds.
pub fn format_recorded_at(recorded_at: DateTime<Utc>) -> String {
    recorded_at.trunc_subsecs(6).format(RECORDED_AT_FORMAT).to_string()
}

/// Parses a stored `recorded_at`, accepting only the canonical form, so that
/// formatting the result gives back exactly the stored bytes.
pub(crate) fn parse_recorded_at(text: &str) -> Option<DateTime<Utc>> {
    let instant = NaiveDateTime::parse_from_str(text, RECORDED_AT_FORMAT).ok()?.and_utc();
    (format_recorded_at(instant) == text).then_some(instant)
}

/// The stored bytes of one event that its chain hash covers.
///
/// Fields are bytes rather than `&str` so that a verifier can hash a row
/// exactly as stored even when tampering left it invalid UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainLink<'bytes> {
    pub position: u64,
    pub stream_id: &'bytes [u8],
    pub version: u64,
    pub event_type: &'bytes [u8],
    pub schema_version: u32,
    pub event_id: &'bytes [u8; 16],
    pub payload: &'bytes [u8],
    pub metadata: &'bytes [u8],
    pub recorded_at: &'bytes [u8],
}

/// `h_n = SHA-256(h_{n−1} ‖ u64be position ‖ lp stream_id ‖ u64be version ‖
/// lp event_type ‖ u32be schema_version ‖ event_id (16 bytes) ‖ lp payload ‖
/// lp metadata ‖ lp recorded_at)`, where lp is a u32be length followed by
/// the bytes.
///
/// # Panics
///
/// If a field is 4 GiB or longer, which its u32 length prefix cannot express.
/// SQLite caps a value at 1 GB and the store's limits are far below that, so
/// this is a caller bug, never stored data.
pub fn chain_hash(previous: &[u8; 32], link: &ChainLink<'_>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(link.position.to_be_bytes());
    update_length_prefixed(&mut hasher, link.stream_id);
    hasher.update(link.version.to_be_bytes());
    update_length_prefixed(&mut hasher, link.event_type);
    hasher.update(link.schema_version.to_be_bytes());
    hasher.update(link.event_id);
    update_length_prefixed(&mut hasher, link.payload);
    update_length_prefixed(&mut hasher, link.metadata);
    update_length_prefixed(&mut hasher, link.recorded_at);
    hasher.finalize().into()
}

fn update_length_prefixed(hasher: &mut Sha256, bytes: &[u8]) {
    let length = u32::try_from(bytes.len()).expect("a hashed field is shorter than 4 GiB (SQLite caps values at 1 GB)");
    hasher.update(length.to_be_bytes());
    hasher.update(bytes);
}
