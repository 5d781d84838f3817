//! Bearer keys. The admin key comes from `TALLY_ADMIN_KEY` or is generated on
//! first start (printed once, stored hashed). Member keys are issued by an
//! admin; only their SHA-256 is stored, and they are shown masked. Keys live
//! in their own SQLite file, never in the event log, which cannot forget.

use crate::error::ApiError;
use chrono::Utc;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Mutex;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Member { member_id: String, key_id: String },
}

impl Principal {
    /// The actor recorded in event metadata: never the secret.
    pub fn actor(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::Member { key_id, .. } => format!("member_key:{key_id}"),
        }
    }

    /// A member key may act on its own member only; admin on any.
    pub fn require_member(&self, member_id: &str) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Member { member_id: own, .. } if own == member_id => Ok(()),
            Principal::Member { .. } => Err(ApiError::Forbidden),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Member { .. } => Err(ApiError::Forbidden),
        }
    }
}

/// A key as shown after issue: the secret appears only here, once.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct IssuedKey {
    pub key_id: String,
    pub member_id: String,
    /// The whole key; store it now, it cannot be shown again.
    pub secret: String,
    pub masked: String,
    pub created_at: chrono::DateTime<Utc>,
}

#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    pub key_id: String,
    pub member_id: String,
    pub masked: String,
    pub created_at: chrono::DateTime<Utc>,
}

pub struct KeyStore {
    connection: Mutex<Connection>,
    admin_hash: [u8; 32],
}

const KEY_PREFIX: &str = "tk";
/// Longest bearer token accepted, so a huge header costs nothing to reject.
pub const BEARER_BYTES_MAX: usize = 256;

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).expect("the operating system's random source");
    hex::encode(buffer)
}

fn mask(key_id: &str, secret_tail: &str) -> String {
    format!("{KEY_PREFIX}_{key_id}_…{secret_tail}")
}

fn constant_time_eq(left: &[u8; 32], right: &[u8; 32]) -> bool {
    left.iter().zip(right).fold(0u8, |difference, (a, b)| difference | (a ^ b)) == 0
}

impl KeyStore {
    /// Open the key file. Returns the admin key too when it was generated
    /// now, so the caller can print it once.
    pub fn open(path: &Path, admin_key: Option<&str>) -> Result<(KeyStore, Option<String>), rusqlite::Error> {
        let connection = Connection::open(path)?;
        connection.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS admin_key (id INTEGER PRIMARY KEY CHECK (id = 1), hash BLOB NOT NULL) STRICT;
             CREATE TABLE IF NOT EXISTS member_keys (
                 key_id TEXT PRIMARY KEY, member_id TEXT NOT NULL, hash BLOB NOT NULL,
                 masked TEXT NOT NULL, created_at TEXT NOT NULL) STRICT;
             CREATE INDEX IF NOT EXISTS member_keys_by_member ON member_keys (member_id, created_at);",
        )?;
        let mut generated = None;
        let admin_hash = match admin_key {
            Some(key) => sha256(key),
            None => {
                let stored: Option<Vec<u8>> =
                    connection.query_row("SELECT hash FROM admin_key WHERE id = 1", [], |row| row.get(0)).optional()?;
                match stored.and_then(|hash| <[u8; 32]>::try_from(hash).ok()) {
                    Some(hash) => hash,
                    None => {
                        let key = format!("{KEY_PREFIX}_admin_{}", random_hex(24));
                        let hash = sha256(&key);
                        connection
                            .execute("INSERT OR REPLACE INTO admin_key (id, hash) VALUES (1, ?1)", [&hash[..]])?;
                        generated = Some(key);
                        hash
                    }
                }
            }
        };
        Ok((KeyStore { connection: Mutex::new(connection), admin_hash }, generated))
    }

    pub fn authenticate(&self, bearer: &str) -> Option<Principal> {
        if bearer.len() > BEARER_BYTES_MAX {
            return None;
        }
        let hash = sha256(bearer);
        if constant_time_eq(&hash, &self.admin_hash) {
            return Some(Principal::Admin);
        }
        let mut parts = bearer.splitn(3, '_');
        let (Some(KEY_PREFIX), Some(key_id), Some(_secret)) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let connection = self.connection.lock().expect("key store lock");
        let row: Option<(String, Vec<u8>)> = connection
            .query_row("SELECT member_id, hash FROM member_keys WHERE key_id = ?1", [key_id], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
            .ok()
            .flatten();
        let (member_id, stored) = row?;
        let stored = <[u8; 32]>::try_from(stored).ok()?;
        constant_time_eq(&hash, &stored).then(|| Principal::Member { member_id, key_id: key_id.to_owned() })
    }

    pub fn issue(&self, member_id: &str) -> Result<IssuedKey, rusqlite::Error> {
        let key_id = random_hex(6);
        let secret_part = random_hex(20);
        let secret = format!("{KEY_PREFIX}_{key_id}_{secret_part}");
        let masked = mask(&key_id, &secret_part[secret_part.len() - 4..]);
        let created_at = Utc::now();
        self.connection.lock().expect("key store lock").execute(
            "INSERT INTO member_keys (key_id, member_id, hash, masked, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key_id, member_id, &sha256(&secret)[..], masked, created_at.to_rfc3339()],
        )?;
        Ok(IssuedKey { key_id, member_id: member_id.to_owned(), secret, masked, created_at })
    }

    pub fn list(&self, member_id: &str) -> Result<Vec<KeyInfo>, rusqlite::Error> {
        let connection = self.connection.lock().expect("key store lock");
        let mut statement = connection.prepare(
            "SELECT key_id, masked, created_at FROM member_keys WHERE member_id = ?1 ORDER BY created_at, key_id",
        )?;
        let rows = statement.query_map([member_id], |row| {
            let created_at: String = row.get(2)?;
            Ok(KeyInfo {
                key_id: row.get(0)?,
                member_id: member_id.to_owned(),
                masked: row.get(1)?,
                created_at: chrono::DateTime::parse_from_rfc3339(&created_at)
                    .map(|at| at.with_timezone(&Utc))
                    .unwrap_or_default(),
            })
        })?;
        rows.collect()
    }
}
