//! The credential vault (DESIGN.md §9, "Credentials"): secrets live here,
//! in a SQLite file of their own (`vault.db`), never in the event log.
//!
//! Envelope encryption with AES-256-GCM (RustCrypto's `aes-gcm`):
//! - each credential version is sealed with a fresh random data key (DEK);
//!   the associated data binds the ciphertext to its row's (member,
//!   integration, credential id, version), so rows cannot be swapped;
//! - the DEK is sealed with the key-encryption key (KEK, 32 bytes from
//!   `TALLY_VAULT_KEY` or a key file), bound to the same row and the KEK's
//!   id, so a wrong KEK or a swapped DEK fails closed;
//! - fingerprints are HMAC-SHA256 under a random fingerprint key kept in
//!   the vault sealed by the KEK (stable across KEK rotations), never a
//!   plain hash that would let anyone holding the log guess short secrets.
//!
//! Rotation of a credential adds a version; [`Vault::rotate_kek`] re-seals
//! every DEK (and the fingerprint key) under a new KEK in batches, resumable
//! after an interruption, never writing a plaintext. Removal deletes the
//! rows with `secure_delete` on and truncates the WAL: crypto-shredding,
//! since a DEK is nowhere else. What the KEK does not protect (a process
//! memory dump while a secret is in use, backups together with their KEK)
//! is in ARCHITECTURE.md.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rusqlite::{Connection, OptionalExtension, params};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Mutex;

const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;
/// Secrets shorter than this show no hint at all.
pub const HINT_MIN_CHARS: usize = 16;
/// The largest secret the vault takes (a PEM service-account key fits).
pub const SECRET_BYTES_MAX: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(
        "no vault key: set TALLY_VAULT_KEY (32 bytes, base64) or pass --vault-key-file; integrations with credentials are refused without one"
    )]
    NoKey,
    #[error("the vault key is not valid: {0}")]
    BadKey(String),
    #[error("the vault was sealed with another key (key id {stored}, given {given}): pass the key it was made with")]
    WrongKey { stored: String, given: String },
    #[error(
        "a sealed credential failed authentication (member {member_id}, integration {integration_id}, version {version}): tampered, moved or sealed under another key"
    )]
    Tampered { member_id: String, integration_id: String, version: i64 },
    #[error("credential version {version} of integration {integration_id} is not in the vault")]
    Missing { integration_id: String, version: i64 },
    #[error("the secret is larger than {SECRET_BYTES_MAX} bytes")]
    TooLarge,
    #[error("vault storage: {0}")]
    Storage(#[from] rusqlite::Error),
}

/// A key-encryption key and its id (derived from the key: the same key has
/// the same id wherever it is loaded).
pub struct Kek {
    id: String,
    key: SecretBox<[u8; KEY_BYTES]>,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Kek {
    pub fn from_bytes(bytes: &[u8]) -> Result<Kek, VaultError> {
        let key: [u8; KEY_BYTES] = bytes
            .try_into()
            .map_err(|_| VaultError::BadKey(format!("it has {} bytes, not {KEY_BYTES}", bytes.len())))?;
        let digest = Sha256::new().chain_update(b"tally-vault/kek-id\0").chain_update(key).finalize();
        Ok(Kek { id: hex::encode(&digest[..8]), key: SecretBox::new(Box::new(key)) })
    }

    /// `TALLY_VAULT_KEY`: 32 bytes in standard base64.
    pub fn from_base64(text: &str) -> Result<Kek, VaultError> {
        use base64::Engine;
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|error| VaultError::BadKey(format!("not base64: {error}")))?;
        let kek = Kek::from_bytes(&bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        kek
    }

    /// A key file holds the base64 key; it must not be readable by others.
    pub fn from_file(path: &Path) -> Result<Kek, VaultError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|error| VaultError::BadKey(format!("{}: {error}", path.display())))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(VaultError::BadKey(format!(
                    "{} is readable by others (mode {:o}): chmod 600 it",
                    path.display(),
                    mode & 0o777
                )));
            }
        }
        let text = SecretString::from(
            std::fs::read_to_string(path)
                .map_err(|error| VaultError::BadKey(format!("{}: {error}", path.display())))?,
        );
        Kek::from_base64(text.expose_secret())
    }

    /// A fresh random key, written to `path` (mode 0600) as base64: what
    /// `serve --demo` does when no key is given.
    pub fn generate_file(path: &Path) -> Result<Kek, VaultError> {
        use base64::Engine;
        let key = random::<KEY_BYTES>();
        let text = SecretString::from(base64::engine::general_purpose::STANDARD.encode(key.expose_secret()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file =
            options.open(path).map_err(|error| VaultError::BadKey(format!("{}: {error}", path.display())))?;
        std::io::Write::write_all(&mut file, text.expose_secret().as_bytes())
            .map_err(|error| VaultError::BadKey(format!("{}: {error}", path.display())))?;
        Kek::from_bytes(key.expose_secret())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.key.expose_secret().into())
    }
}

/// The keys a vault opens with: the active one seals; the others (being
/// rotated away from) only open what they sealed.
#[derive(Debug)]
pub struct Keyring {
    pub active: Kek,
    pub retired: Vec<Kek>,
}

impl Keyring {
    pub fn single(active: Kek) -> Keyring {
        Keyring { active, retired: Vec::new() }
    }

    fn key(&self, id: &str) -> Option<&Kek> {
        std::iter::once(&self.active).chain(&self.retired).find(|kek| kek.id == id)
    }

    fn ids(&self) -> String {
        std::iter::once(&self.active).chain(&self.retired).map(|kek| kek.id.as_str()).collect::<Vec<_>>().join(", ")
    }
}

fn random<const N: usize>() -> SecretBox<[u8; N]> {
    let mut bytes = Box::new([0u8; N]);
    getrandom::fill(bytes.as_mut()).expect("the operating system's random source works");
    SecretBox::new(bytes)
}

/// Where a credential version belongs: what its ciphertext is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub member_id: String,
    pub integration_id: String,
    pub credential_id: String,
    pub version: i64,
}

impl Slot {
    fn associated_data(&self, purpose: &str, kek_id: &str) -> Vec<u8> {
        let parts =
            [purpose, &self.member_id, &self.integration_id, &self.credential_id, &self.version.to_string(), kek_id];
        parts.join("\0").into_bytes()
    }
}

/// What the vault says of a stored credential, safe to show and to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub credential_id: String,
    pub version: i64,
    /// The first 8 bytes of HMAC-SHA256 under the vault's fingerprint key, in hex.
    pub fingerprint: String,
}

/// A row's key id, DEK nonce, wrapped DEK, nonce and ciphertext.
type SealedRow = (String, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

/// Progress of [`Vault::rotate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotateProgress {
    pub done: u64,
    pub total: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vault_meta (
    name TEXT NOT NULL PRIMARY KEY,
    kek_id TEXT NOT NULL,
    nonce BLOB NOT NULL,
    sealed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS credentials (
    member_id TEXT NOT NULL,
    integration_id TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    kek_id TEXT NOT NULL,
    dek_nonce BLOB NOT NULL,
    wrapped_dek BLOB NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (member_id, integration_id, credential_id, version)
);
CREATE INDEX IF NOT EXISTS credentials_by_kek ON credentials (kek_id);
";

/// The vault file and its keys. Cheap to share behind an `Arc`; calls are
/// short and serialised on one connection.
pub struct Vault {
    conn: Mutex<Connection>,
    keys: Keyring,
    fingerprint_key: SecretBox<[u8; KEY_BYTES]>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("keys", &self.keys).finish_non_exhaustive()
    }
}

impl Vault {
    /// Opens (or creates) the vault at `path` with one key. A vault made
    /// with another key is refused (`WrongKey`), before anything is read.
    pub fn open(path: &Path, kek: Kek) -> Result<Vault, VaultError> {
        Vault::open_with(path, Keyring::single(kek))
    }

    /// Opens the vault with a keyring (during a key rotation).
    pub fn open_with(path: &Path, keys: Keyring) -> Result<Vault, VaultError> {
        let conn = Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA secure_delete=ON; PRAGMA busy_timeout=5000;")?;
        conn.execute_batch(SCHEMA)?;
        let stored: Option<(String, Vec<u8>, Vec<u8>)> = conn
            .query_row("SELECT kek_id, nonce, sealed FROM vault_meta WHERE name = 'fingerprint_key'", [], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()?;
        let fingerprint_key = match stored {
            Some((kek_id, nonce, sealed)) => {
                let Some(kek) = keys.key(&kek_id) else {
                    return Err(VaultError::WrongKey { stored: kek_id, given: keys.ids() });
                };
                open_meta(kek, &nonce, &sealed)?
            }
            None => {
                let key = random::<KEY_BYTES>();
                let (nonce, sealed) = seal_meta(&keys.active, key.expose_secret());
                conn.execute(
                    "INSERT INTO vault_meta (name, kek_id, nonce, sealed) VALUES ('fingerprint_key', ?1, ?2, ?3)",
                    params![keys.active.id, nonce, sealed],
                )?;
                key
            }
        };
        Ok(Vault { conn: Mutex::new(conn), keys, fingerprint_key })
    }

    pub fn kek_id(&self) -> &str {
        &self.keys.active.id
    }

    /// The keyed fingerprint of a secret.
    pub fn fingerprint(&self, secret: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(self.fingerprint_key.expose_secret())
            .expect("HMAC takes any key length");
        mac.update(secret);
        hex::encode(&mac.finalize().into_bytes()[..8])
    }

    /// Seals `secret` into `slot` (a new version: never overwritten).
    pub fn put(&self, slot: &Slot, secret: &SecretString) -> Result<Sealed, VaultError> {
        let plaintext = secret.expose_secret().as_bytes();
        if plaintext.len() > SECRET_BYTES_MAX {
            return Err(VaultError::TooLarge);
        }
        let dek = random::<KEY_BYTES>();
        let nonce = random_nonce();
        let ciphertext = Aes256Gcm::new(dek.expose_secret().into())
            .encrypt(&nonce_of(&nonce), Payload { msg: plaintext, aad: &slot.associated_data("tally-vault/v1", "") })
            .expect("AES-GCM seals any message under its size limit");
        let (dek_nonce, wrapped_dek) = wrap_dek(&self.keys.active, slot, dek.expose_secret());
        // A row left at this version by a put the log never recorded (a
        // crash between the two) names no event: it is replaced.
        self.conn.lock().expect("vault lock").execute(
            "INSERT OR REPLACE INTO credentials (member_id, integration_id, credential_id, version, kek_id, dek_nonce,
             wrapped_dek, nonce, ciphertext, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                slot.member_id,
                slot.integration_id,
                slot.credential_id,
                slot.version,
                self.keys.active.id,
                dek_nonce.to_vec(),
                wrapped_dek,
                nonce.to_vec(),
                ciphertext,
                chrono::Utc::now().to_rfc3339(),
            ],
        )?;
        Ok(Sealed {
            credential_id: slot.credential_id.clone(),
            version: slot.version,
            fingerprint: self.fingerprint(plaintext),
        })
    }

    /// The plaintext of `slot`, or a clear error when it was tampered with,
    /// moved or sealed under another key.
    pub fn get(&self, slot: &Slot) -> Result<SecretString, VaultError> {
        let row: Option<SealedRow> = self
            .conn
            .lock()
            .expect("vault lock")
            .query_row(
                "SELECT kek_id, dek_nonce, wrapped_dek, nonce, ciphertext FROM credentials
                 WHERE member_id = ?1 AND integration_id = ?2 AND credential_id = ?3 AND version = ?4",
                params![slot.member_id, slot.integration_id, slot.credential_id, slot.version],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
            )
            .optional()?;
        let Some((kek_id, dek_nonce, wrapped_dek, nonce, ciphertext)) = row else {
            return Err(VaultError::Missing { integration_id: slot.integration_id.clone(), version: slot.version });
        };
        let tampered = || VaultError::Tampered {
            member_id: slot.member_id.clone(),
            integration_id: slot.integration_id.clone(),
            version: slot.version,
        };
        let kek = self.keys.key(&kek_id).ok_or_else(tampered)?;
        let dek = unwrap_dek(kek, slot, &dek_nonce, &wrapped_dek).ok_or_else(tampered)?;
        if nonce.len() != NONCE_BYTES {
            return Err(tampered());
        }
        let mut plaintext = Aes256Gcm::new(dek.expose_secret().into())
            .decrypt(&nonce_of(&nonce), Payload { msg: &ciphertext, aad: &slot.associated_data("tally-vault/v1", "") })
            .map_err(|_| tampered())?;
        let text = String::from_utf8(std::mem::take(&mut plaintext)).map_err(|error| {
            let mut bytes = error.into_bytes();
            zeroize::Zeroize::zeroize(&mut bytes);
            tampered()
        })?;
        Ok(SecretString::from(text))
    }

    /// Shreds one version (after a rotation, once no execution uses it).
    pub fn shred_version(&self, slot: &Slot) -> Result<u64, VaultError> {
        let conn = self.conn.lock().expect("vault lock");
        let deleted = conn.execute(
            "DELETE FROM credentials WHERE member_id = ?1 AND integration_id = ?2 AND credential_id = ?3 AND version = ?4",
            params![slot.member_id, slot.integration_id, slot.credential_id, slot.version],
        )?;
        truncate_wal(&conn)?;
        Ok(deleted as u64)
    }

    /// Shreds every version of an integration's credentials (its removal).
    pub fn shred_integration(&self, member_id: &str, integration_id: &str) -> Result<u64, VaultError> {
        let conn = self.conn.lock().expect("vault lock");
        let deleted = conn.execute(
            "DELETE FROM credentials WHERE member_id = ?1 AND integration_id = ?2",
            params![member_id, integration_id],
        )?;
        truncate_wal(&conn)?;
        Ok(deleted as u64)
    }

    /// Re-seals every DEK not under the active key (and the fingerprint
    /// key) under it, in transactions of `batch` rows; `progress` hears
    /// after each and may stop the rotation (`ControlFlow::Break`).
    /// Resumable: rows already under the active key are left alone, so an
    /// interrupted rotation, run again with the same keyring, finishes the
    /// rest. Never writes a plaintext. Returns where it stopped.
    pub fn rotate(
        &self,
        batch: usize,
        mut progress: impl FnMut(RotateProgress) -> ControlFlow<()>,
    ) -> Result<RotateProgress, VaultError> {
        let batch = batch.max(1);
        let active = &self.keys.active;
        let conn = self.conn.lock().expect("vault lock");
        // The fingerprint key first: from here the vault opens with the
        // active key (and the retired ones, until the rows are done).
        let (nonce, sealed) = seal_meta(active, self.fingerprint_key.expose_secret());
        conn.execute(
            "UPDATE vault_meta SET kek_id = ?1, nonce = ?2, sealed = ?3 WHERE name = 'fingerprint_key'",
            params![active.id, nonce, sealed],
        )?;
        let total: i64 = conn.query_row("SELECT count(*) FROM credentials", [], |row| row.get(0))?;
        loop {
            let done: i64 =
                conn.query_row("SELECT count(*) FROM credentials WHERE kek_id = ?1", params![active.id], |row| {
                    row.get(0)
                })?;
            let now = RotateProgress { done: done as u64, total: total as u64 };
            if done >= total || progress(now).is_break() {
                truncate_wal(&conn)?;
                return Ok(now);
            }
            let rows: Vec<(Slot, String, Vec<u8>, Vec<u8>)> = {
                let mut statement = conn.prepare(
                    "SELECT member_id, integration_id, credential_id, version, kek_id, dek_nonce, wrapped_dek
                     FROM credentials WHERE kek_id <> ?1 LIMIT ?2",
                )?;
                statement
                    .query_map(params![active.id, batch as i64], |row| {
                        let slot = Slot {
                            member_id: row.get(0)?,
                            integration_id: row.get(1)?,
                            credential_id: row.get(2)?,
                            version: row.get(3)?,
                        };
                        Ok((slot, row.get(4)?, row.get(5)?, row.get(6)?))
                    })?
                    .collect::<Result<_, _>>()?
            };
            let transaction = conn.unchecked_transaction()?;
            for (slot, kek_id, dek_nonce, wrapped_dek) in rows {
                let Some(kek) = self.keys.key(&kek_id) else {
                    return Err(VaultError::WrongKey { stored: kek_id, given: self.keys.ids() });
                };
                let dek = unwrap_dek(kek, &slot, &dek_nonce, &wrapped_dek).ok_or_else(|| VaultError::Tampered {
                    member_id: slot.member_id.clone(),
                    integration_id: slot.integration_id.clone(),
                    version: slot.version,
                })?;
                let (dek_nonce, wrapped_dek) = wrap_dek(active, &slot, dek.expose_secret());
                transaction.execute(
                    "UPDATE credentials SET kek_id = ?5, dek_nonce = ?6, wrapped_dek = ?7
                     WHERE member_id = ?1 AND integration_id = ?2 AND credential_id = ?3 AND version = ?4",
                    params![
                        slot.member_id,
                        slot.integration_id,
                        slot.credential_id,
                        slot.version,
                        active.id,
                        dek_nonce.to_vec(),
                        wrapped_dek
                    ],
                )?;
            }
            transaction.commit()?;
        }
    }

    /// How many credential rows each key id seals (for status and tests).
    pub fn rows_by_kek(&self) -> Result<Vec<(String, u64)>, VaultError> {
        let conn = self.conn.lock().expect("vault lock");
        let mut statement = conn.prepare("SELECT kek_id, count(*) FROM credentials GROUP BY kek_id ORDER BY kek_id")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The masked hint of a secret: its last four characters when it has at
/// least [`HINT_MIN_CHARS`], nothing otherwise.
pub fn hint(secret: &str) -> Option<String> {
    let count = secret.chars().count();
    (count >= HINT_MIN_CHARS).then(|| {
        let tail: String = secret.chars().skip(count - 4).collect();
        format!("…{tail}")
    })
}

/// A 12-byte nonce; callers check the length of a stored one first.
fn nonce_of(bytes: &[u8]) -> Nonce<aes_gcm::aead::consts::U12> {
    Nonce::try_from(bytes).expect("a 12-byte nonce")
}

fn random_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).expect("the operating system's random source works");
    nonce
}

fn wrap_dek(kek: &Kek, slot: &Slot, dek: &[u8; KEY_BYTES]) -> ([u8; NONCE_BYTES], Vec<u8>) {
    let nonce = random_nonce();
    let wrapped = kek
        .cipher()
        .encrypt(&nonce_of(&nonce), Payload { msg: dek, aad: &slot.associated_data("tally-vault/dek/v1", &kek.id) })
        .expect("AES-GCM seals 32 bytes");
    (nonce, wrapped)
}

fn unwrap_dek(kek: &Kek, slot: &Slot, nonce: &[u8], wrapped: &[u8]) -> Option<SecretBox<[u8; KEY_BYTES]>> {
    if nonce.len() != NONCE_BYTES {
        return None;
    }
    let aad = slot.associated_data("tally-vault/dek/v1", &kek.id);
    let mut plain = kek.cipher().decrypt(&nonce_of(nonce), Payload { msg: wrapped, aad: &aad }).ok()?;
    let key: Option<[u8; KEY_BYTES]> = plain.as_slice().try_into().ok();
    zeroize::Zeroize::zeroize(&mut plain);
    key.map(|key| SecretBox::new(Box::new(key)))
}

fn seal_meta(kek: &Kek, key: &[u8; KEY_BYTES]) -> (Vec<u8>, Vec<u8>) {
    let nonce = random_nonce();
    let aad = format!("tally-vault/fingerprint-key/v1\0{}", kek.id);
    let sealed = kek
        .cipher()
        .encrypt(&nonce_of(&nonce), Payload { msg: key, aad: aad.as_bytes() })
        .expect("AES-GCM seals 32 bytes");
    (nonce.to_vec(), sealed)
}

fn open_meta(kek: &Kek, nonce: &[u8], sealed: &[u8]) -> Result<SecretBox<[u8; KEY_BYTES]>, VaultError> {
    let wrong = || VaultError::BadKey("the vault's fingerprint key does not open with this key".into());
    if nonce.len() != NONCE_BYTES {
        return Err(wrong());
    }
    let aad = format!("tally-vault/fingerprint-key/v1\0{}", kek.id);
    let mut plain =
        kek.cipher().decrypt(&nonce_of(nonce), Payload { msg: sealed, aad: aad.as_bytes() }).map_err(|_| wrong())?;
    let key: Option<[u8; KEY_BYTES]> = plain.as_slice().try_into().ok();
    zeroize::Zeroize::zeroize(&mut plain);
    key.map(|key| SecretBox::new(Box::new(key))).ok_or_else(wrong)
}

/// Deleted pages are zeroed by `secure_delete`; the WAL may still hold the
/// old frames until it is checkpointed and truncated.
fn truncate_wal(conn: &Connection) -> Result<(), VaultError> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Kek {
        Kek::from_bytes(&[byte; KEY_BYTES]).unwrap()
    }

    fn slot(member: &str, integration: &str, version: i64) -> Slot {
        Slot { member_id: member.into(), integration_id: integration.into(), credential_id: "c1".into(), version }
    }

    fn secret(text: &str) -> SecretString {
        SecretString::from(text.to_owned())
    }

    #[test]
    fn a_sealed_secret_reads_back_and_never_lies_in_the_file_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.db");
        let vault = Vault::open(&path, key(1)).unwrap();
        let sealed = vault.put(&slot("acme", "weather", 1), &secret("tok_live_0123456789abcdef")).unwrap();
        assert_eq!(sealed.fingerprint.len(), 16);
        assert_eq!(sealed.fingerprint, vault.fingerprint(b"tok_live_0123456789abcdef"));
        assert_ne!(
            sealed.fingerprint,
            hex::encode(&Sha256::digest(b"tok_live_0123456789abcdef")[..8]),
            "keyed, not a plain hash"
        );
        assert_eq!(vault.get(&slot("acme", "weather", 1)).unwrap().expose_secret(), "tok_live_0123456789abcdef");
        drop(vault);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!bytes.windows(8).any(|window| window == b"tok_live"), "plaintext in a vault file");
        }
        // Reopened with the same key, the fingerprint key is the same.
        let vault = Vault::open(&path, key(1)).unwrap();
        assert_eq!(vault.fingerprint(b"tok_live_0123456789abcdef"), sealed.fingerprint);
    }

    #[test]
    fn a_wrong_key_tampered_ciphertext_and_swapped_rows_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.db");
        let vault = Vault::open(&path, key(1)).unwrap();
        vault.put(&slot("acme", "weather", 1), &secret("secret-of-acme-000000")).unwrap();
        vault.put(&slot("globex", "weather", 1), &secret("secret-of-globex-00000")).unwrap();
        drop(vault);
        assert!(matches!(Vault::open(&path, key(2)), Err(VaultError::WrongKey { .. })));

        let conn = Connection::open(&path).unwrap();
        // Swap the two members' sealed columns: each row now holds the
        // other's ciphertext, bound to the other's slot.
        conn.execute_batch(
            "CREATE TEMP TABLE a AS SELECT * FROM credentials WHERE member_id = 'acme';
             UPDATE credentials SET dek_nonce = (SELECT dek_nonce FROM credentials c WHERE c.member_id = 'globex'),
                 wrapped_dek = (SELECT wrapped_dek FROM credentials c WHERE c.member_id = 'globex'),
                 nonce = (SELECT nonce FROM credentials c WHERE c.member_id = 'globex'),
                 ciphertext = (SELECT ciphertext FROM credentials c WHERE c.member_id = 'globex')
               WHERE member_id = 'acme';",
        )
        .unwrap();
        drop(conn);
        let vault = Vault::open(&path, key(1)).unwrap();
        let error = vault.get(&slot("acme", "weather", 1)).unwrap_err();
        assert!(matches!(error, VaultError::Tampered { .. }), "{error}");
        assert!(error.to_string().contains("tampered"), "{error}");
        // One flipped bit of a ciphertext.
        let conn = Connection::open(&path).unwrap();
        let mut ciphertext: Vec<u8> = conn
            .query_row("SELECT ciphertext FROM credentials WHERE member_id = 'globex'", [], |row| row.get(0))
            .unwrap();
        ciphertext[0] ^= 1;
        conn.execute("UPDATE credentials SET ciphertext = ?1 WHERE member_id = 'globex'", params![ciphertext]).unwrap();
        assert!(matches!(vault.get(&slot("globex", "weather", 1)), Err(VaultError::Tampered { .. })));
        assert!(matches!(vault.get(&slot("globex", "weather", 2)), Err(VaultError::Missing { .. })));
    }

    #[test]
    fn shredding_removes_every_version_and_the_bytes_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.db");
        let vault = Vault::open(&path, key(1)).unwrap();
        vault.put(&slot("acme", "weather", 1), &secret("first-secret-value-01")).unwrap();
        vault.put(&slot("acme", "weather", 2), &secret("second-secret-value-2")).unwrap();
        vault.put(&slot("acme", "other", 1), &secret("kept-secret-value-003")).unwrap();
        assert_eq!(vault.shred_version(&slot("acme", "weather", 1)).unwrap(), 1);
        assert!(matches!(vault.get(&slot("acme", "weather", 1)), Err(VaultError::Missing { .. })));
        assert_eq!(vault.shred_integration("acme", "weather").unwrap(), 1);
        assert!(vault.get(&slot("acme", "other", 1)).is_ok());
        assert_eq!(vault.rows_by_kek().unwrap(), vec![(key(1).id().to_owned(), 1)]);
    }

    #[test]
    fn hints_show_four_characters_of_long_secrets_only() {
        assert_eq!(hint("sk_live_0123456789abcd").as_deref(), Some("…abcd"));
        assert_eq!(hint("short-password"), None);
        assert_eq!(hint("ééééééééééééééé1234").as_deref(), Some("…1234"));
        let debug = format!("{:?}", key(1));
        assert!(debug.contains(key(1).id()) && !debug.contains("1, 1"), "a key's Debug shows its id only: {debug}");
    }
}
