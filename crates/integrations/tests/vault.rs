//! `rotate` on a vault of 10,000 credentials, interrupted and resumed: no
//! row is lost or left under the old key, every secret reads back the same,
//! fingerprints do not change, and the old key alone no longer opens it.

use secrecy::{ExposeSecret, SecretString};
use std::ops::ControlFlow;
use tally_integrations::vault::{Kek, Keyring, Slot, Vault, VaultError};

const CREDENTIALS: usize = 10_000;

fn kek(byte: u8) -> Kek {
    Kek::from_bytes(&[byte; 32]).unwrap()
}

fn slot(index: usize) -> Slot {
    Slot {
        member_id: format!("m{}", index % 97),
        integration_id: format!("i{index}"),
        credential_id: "c1".into(),
        version: 1,
    }
}

fn secret(index: usize) -> String {
    format!("secret-value-{index:08}-xyz")
}

#[test]
fn a_rotation_of_ten_thousand_credentials_interrupted_and_resumed_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.db");
    let vault = Vault::open(&path, kek(1)).unwrap();
    let fingerprint = vault.fingerprint(secret(42).as_bytes());
    for index in 0..CREDENTIALS {
        vault.put(&slot(index), &SecretString::from(secret(index))).unwrap();
    }
    drop(vault);

    // Stopped after three batches of 1,000.
    let rotating = Vault::open_with(&path, Keyring { active: kek(2), retired: vec![kek(1)] }).unwrap();
    let mut heard = Vec::new();
    let stopped = rotating
        .rotate(1_000, |progress| {
            heard.push(progress.done);
            if heard.len() > 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })
        .unwrap();
    assert_eq!((stopped.done, stopped.total), (3_000, CREDENTIALS as u64));
    assert_eq!(heard, [0, 1_000, 2_000, 3_000]);
    // Half-rotated, every secret still reads through the keyring.
    assert_eq!(rotating.get(&slot(9_999)).unwrap().expose_secret(), secret(9_999));
    drop(rotating);

    // Resumed: the rest, from where it stopped.
    let resumed = Vault::open_with(&path, Keyring { active: kek(2), retired: vec![kek(1)] }).unwrap();
    let mut first = None;
    let done = resumed.rotate(1_000, |progress| {
        first.get_or_insert(progress.done);
        ControlFlow::Continue(())
    });
    assert_eq!(done.unwrap().done, CREDENTIALS as u64);
    assert_eq!(first, Some(3_000), "resumed where it stopped");
    assert_eq!(resumed.rows_by_kek().unwrap(), vec![(kek(2).id().to_owned(), CREDENTIALS as u64)]);
    drop(resumed);

    // The new key alone opens everything; the old one alone nothing.
    let rotated = Vault::open(&path, kek(2)).unwrap();
    for index in (0..CREDENTIALS).step_by(997) {
        assert_eq!(rotated.get(&slot(index)).unwrap().expose_secret(), secret(index));
    }
    assert_eq!(rotated.fingerprint(secret(42).as_bytes()), fingerprint, "fingerprints survive a rotation");
    drop(rotated);
    assert!(matches!(Vault::open(&path, kek(1)), Err(VaultError::WrongKey { .. })));
}
