//! The hash chain: its formula, and that verification names the first row
//! changed, removed or forged behind the store's back.

use sha2::{Digest, Sha256};

use super::{append_many, event, instant, open_store, raw, temp_log};
use crate::store::{
    CHAIN_HASH_ZERO, ChainError, ChainLink, EventReader, ExpectedVersion, Head, chain_hash, format_recorded_at,
};

/// The formula of DESIGN.md §4 spelled out independently of `chain_hash`.
fn reference_hash(previous: &[u8; 32], link: &ChainLink<'_>) -> [u8; 32] {
    fn length_prefixed(bytes: &[u8]) -> Vec<u8> {
        let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }
    let mut message = previous.to_vec();
    message.extend(link.position.to_be_bytes());
    message.extend(length_prefixed(link.stream_id));
    message.extend(link.version.to_be_bytes());
    message.extend(length_prefixed(link.event_type));
    message.extend(link.schema_version.to_be_bytes());
    message.extend(link.event_id);
    message.extend(length_prefixed(link.payload));
    message.extend(length_prefixed(link.metadata));
    message.extend(length_prefixed(link.recorded_at));
    Sha256::digest(&message).into()
}

#[test]
fn chain_hash_is_the_documented_formula() {
    let link = ChainLink {
        position: 42,
        stream_id: b"member-7",
        version: 3,
        event_type: b"CreditsGranted",
        schema_version: 2,
        event_id: &[0xab; 16],
        payload: br#"{"credits":100}"#,
        metadata: br#"{"actor":"admin"}"#,
        recorded_at: b"2025-01-01T00:00:00.000000Z",
    };
    let previous = [0x11; 32];
    assert_eq!(chain_hash(&previous, &link), reference_hash(&previous, &link));
    // Moving a byte from one field to the next changes the hash: that is
    // what the length prefixes are for.
    let shifted = ChainLink { stream_id: b"member-", event_type: b"7CreditsGranted", ..link };
    assert_ne!(chain_hash(&previous, &link), chain_hash(&previous, &shifted));
}

#[test]
fn recorded_at_is_stored_with_six_fractional_digits() {
    assert_eq!(format_recorded_at(instant(0)), "2025-01-01T00:00:00.000000Z");
}

#[test]
fn an_empty_log_verifies_with_the_zero_head() {
    let log = temp_log();
    let store = open_store(&log.path);
    let report = store.reader().expect("reader").verify_chain(|_| {}).expect("valid");
    assert_eq!(report.events_checked, 0);
    assert_eq!(report.head, Head::EMPTY);
    assert_eq!(report.head.hash, CHAIN_HASH_ZERO);
}

#[test]
fn stored_hashes_follow_the_formula_from_h0() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 3);
    append_many(&mut store, "member-b", 2);
    let reader = store.reader().expect("reader");

    let mut previous = CHAIN_HASH_ZERO;
    for recorded in reader.read_all(0, 100).expect("read") {
        let recorded_at = format_recorded_at(recorded.recorded_at);
        let expected = reference_hash(&previous, &recorded.chain_link(&recorded_at));
        assert_eq!(recorded.hash, expected, "position {}", recorded.position);
        previous = expected;
    }
    let mut progress = Vec::new();
    let report = reader.verify_chain(|position| progress.push(position)).expect("valid");
    assert_eq!(report.events_checked, 5);
    assert_eq!(report.head, Head { position: 5, hash: previous });
    assert_eq!(report.head, reader.head().expect("head"));
    assert_eq!(progress.last(), Some(&5));
}

/// Drops the append-only triggers, as someone editing the file would.
fn tamper(reader_path: &std::path::Path, sql: &str) {
    let connection = raw(reader_path);
    connection
        .execute_batch(&format!(
            "DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete; DROP TRIGGER events_append_at_head; {sql}"
        ))
        .expect("tamper with the file");
}

#[test]
fn a_payload_changed_behind_the_store_is_named() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 12);
    tamper(&log.path, "UPDATE events SET payload = '{\"index\":999}' WHERE position = 7");

    let error = EventReader::open(&log.path).expect("reader").verify_chain(|_| {}).expect_err("tampered");
    assert!(matches!(error, ChainError::FirstBadPosition { position: 7, .. }), "{error:?}");
    assert_eq!(error.first_bad_position(), Some(7));
}

#[test]
fn metadata_changed_behind_the_store_is_named() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 5);
    tamper(&log.path, "UPDATE events SET metadata = '{\"actor\":\"stripe\"}' WHERE position = 3");
    let error = EventReader::open(&log.path).expect("reader").verify_chain(|_| {}).expect_err("tampered");
    assert_eq!(error.first_bad_position(), Some(3), "{error:?}");
}

#[test]
fn a_deleted_row_is_named_as_a_gap() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 8);
    tamper(&log.path, "DELETE FROM events WHERE position = 5");

    let error = EventReader::open(&log.path).expect("reader").verify_chain(|_| {}).expect_err("a gap");
    assert!(matches!(error, ChainError::Gap { position: 5, next_position: 6 }), "{error:?}");
}

#[test]
fn a_truncated_tail_is_only_visible_against_a_recorded_head() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 4);
    let recorded_head = store.head();
    tamper(&log.path, "DELETE FROM events WHERE position = 4");

    // The chain of the remaining rows is intact, so verification passes; the
    // loss shows only as a head different from the one recorded outside.
    let report = EventReader::open(&log.path).expect("reader").verify_chain(|_| {}).expect("an intact prefix");
    assert_eq!(report.head.position, 3);
    assert_ne!(report.head, recorded_head);
}

#[test]
fn a_forged_row_with_a_consistent_hash_but_a_skipped_version_is_named() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 2);
    append_many(&mut store, "member-b", 1);
    let head = store.head();
    drop(store);

    // A forger who knows the formula appends version 4 of member-a (skipping
    // 3) with a correct hash; only the version check can see it.
    let event_id = [0x5a; 16];
    let recorded_at = format_recorded_at(instant(10));
    let hash = chain_hash(
        &head.hash,
        &ChainLink {
            position: 4,
            stream_id: b"member-a",
            version: 4,
            event_type: b"Forged",
            schema_version: 1,
            event_id: &event_id,
            payload: b"{}",
            metadata: b"{}",
            recorded_at: recorded_at.as_bytes(),
        },
    );
    let connection = raw(&log.path);
    connection.execute_batch("DROP TRIGGER events_append_at_head").expect("drop the insert trigger");
    connection
        .execute(
            "INSERT INTO events (position, stream_id, version, event_type, schema_version, event_id, payload, metadata, recorded_at, hash)
             VALUES (4, 'member-a', 4, 'Forged', 1, ?1, '{}', '{}', ?2, ?3)",
            rusqlite::params![event_id.as_slice(), recorded_at, hash.as_slice()],
        )
        .expect("forge a row");

    let error = EventReader::open(&log.path).expect("reader").verify_chain(|_| {}).expect_err("a version gap");
    match error {
        ChainError::VersionGap { position, stream_id, expected_version, found_version } => {
            assert_eq!(position, 4);
            assert_eq!(stream_id, "member-a");
            assert_eq!((expected_version, found_version), (3, 4));
        }
        other => panic!("expected a version gap, got {other:?}"),
    }
}

#[test]
fn the_earliest_problem_is_named_when_there_are_several() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    for index in 0..6 {
        store
            .append("member-a", ExpectedVersion::Any, vec![event("E", &format!("{{\"i\":{index}}}"))], instant(index))
            .expect("append");
    }
    tamper(&log.path, "UPDATE events SET payload = '{}' WHERE position = 5; DELETE FROM events WHERE position = 2;");
    let error = EventReader::open(&log.path).expect("reader").verify_chain(|_| {}).expect_err("tampered");
    assert!(matches!(error, ChainError::Gap { position: 2, .. }), "{error:?}");
}
