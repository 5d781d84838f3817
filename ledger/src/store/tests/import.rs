//! Importing an exported log: rows arrive with their positions, hashes and
//! stored bytes, and are written only if they chain and fit the log.

use super::{append_many, event, instant, open_store, raw, temp_log};
use crate::store::{EventStore, ExpectedVersion, Imported, RecordedEvent, StoreError};

/// Every event of the log at `store`'s path, as an export would carry them.
fn export(store: &EventStore) -> Vec<RecordedEvent> {
    store.reader().expect("reader").read_all(0, 1_000).expect("read")
}

/// Imports `events` in one batch, committing only if every one was accepted.
fn import(store: &mut EventStore, events: &[RecordedEvent]) -> Result<Vec<Imported>, StoreError> {
    let mut batch = store.begin_batch()?;
    let mut outcomes = Vec::new();
    for event in events {
        outcomes.push(batch.import_event(event)?);
    }
    batch.commit()?;
    Ok(outcomes)
}

/// Recomputes every hash after a test changed an event on purpose.
fn rehash(events: &mut [RecordedEvent]) {
    let mut previous = crate::store::CHAIN_HASH_ZERO;
    for event in events.iter_mut() {
        event.hash = event.expected_hash(&previous);
        previous = event.hash;
    }
}

/// A source log of five events on two streams.
fn source_log() -> (super::TempLog, Vec<RecordedEvent>) {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 3);
    append_many(&mut store, "member-b", 2);
    let events = export(&store);
    (log, events)
}

#[test]
fn an_export_imported_into_an_empty_log_reproduces_it_byte_for_byte() {
    let (_source, mut events) = source_log();
    // Metadata spelled as serde would not write it: the bytes are kept.
    events[0].metadata_json = r#"{ "actor" : "admin" }"#.to_string();
    rehash(&mut events);
    let target = temp_log();
    let mut store = open_store(&target.path);
    let outcomes = import(&mut store, &events).expect("the import is accepted");
    assert!(outcomes.iter().all(|outcome| *outcome == Imported::Appended));
    assert_eq!(export(&store), events);
    let report = store.reader().expect("reader").verify_chain(|_| {}).expect("the chain verifies");
    assert_eq!(report.head.hash, events.last().expect("events").hash);
    assert_eq!(store.head(), report.head, "the store's head follows the import");

    // The store keeps appending after an import, on the same chain.
    store.append("member-a", ExpectedVersion::Exact(3), vec![event("After", "{}")], instant(100)).expect("append");
    store.reader().expect("reader").verify_chain(|_| {}).expect("the chain still verifies");
}

#[test]
fn a_log_holding_a_prefix_gets_only_the_rest_and_a_second_import_writes_nothing() {
    let (_source, events) = source_log();
    let target = temp_log();
    let mut store = open_store(&target.path);
    import(&mut store, &events[..2]).expect("the prefix");
    let outcomes = import(&mut store, &events).expect("the whole file");
    assert_eq!(outcomes[..2], [Imported::AlreadyPresent, Imported::AlreadyPresent]);
    assert_eq!(outcomes[2..], [Imported::Appended, Imported::Appended, Imported::Appended]);
    let outcomes = import(&mut store, &events).expect("again");
    assert!(outcomes.iter().all(|outcome| *outcome == Imported::AlreadyPresent));
    assert_eq!(export(&store), events);

    // A file exported with `--after 3` continues the log from position 4.
    let fresh = temp_log();
    let mut store = open_store(&fresh.path);
    import(&mut store, &events[..3]).expect("the first three");
    import(&mut store, &events[3..]).expect("the rest, on its own");
    assert_eq!(export(&store), events);
}

#[test]
fn a_changed_payload_is_refused_at_its_position_and_nothing_is_written() {
    let (_source, mut events) = source_log();
    events[3].payload = r#"{"index":99}"#.to_string();
    let target = temp_log();
    let mut store = open_store(&target.path);
    let error = import(&mut store, &events).expect_err("a file that does not chain");
    assert!(matches!(error, StoreError::ImportRefused { position: 4, .. }), "{error}");
    assert!(error.to_string().contains("does not chain"), "{error}");
    assert_eq!(store.reader().expect("reader").head().expect("head").position, 0, "nothing was written");
}

#[test]
fn a_file_that_does_not_fit_the_log_is_refused() {
    let (_source, events) = source_log();
    let target = temp_log();
    let mut store = open_store(&target.path);

    let error = import(&mut store, &events[2..]).expect_err("a gap before the file");
    assert!(matches!(error, StoreError::ImportRefused { position: 3, .. }), "{error}");

    let mut skipping = events.clone();
    skipping.remove(2);
    let error = import(&mut store, &skipping).expect_err("a gap inside the file");
    assert!(matches!(error, StoreError::ImportRefused { position: 4, .. }), "{error}");

    // Another log of the same length: the positions exist, the events differ.
    append_many(&mut store, "member-z", 5);
    let error = import(&mut store, &events).expect_err("another log");
    assert!(matches!(error, StoreError::ImportRefused { position: 1, .. }), "{error}");
    assert!(error.to_string().contains("different event"), "{error}");
    assert_eq!(store.reader().expect("reader").head().expect("head").position, 5);
}

#[test]
fn an_event_at_the_wrong_version_or_going_back_in_time_is_refused() {
    let (_source, events) = source_log();
    let target = temp_log();
    let mut store = open_store(&target.path);

    let mut wrong_version = events.clone();
    wrong_version[1].version = 5;
    rehash(&mut wrong_version);
    let error = import(&mut store, &wrong_version).expect_err("a version gap");
    assert!(matches!(error, StoreError::ImportRefused { position: 2, .. }), "{error}");
    assert!(error.to_string().contains("version 5 of stream member-a"), "{error}");

    let mut going_back = events.clone();
    going_back[2].recorded_at = instant(-10);
    rehash(&mut going_back);
    let error = import(&mut store, &going_back).expect_err("recorded_at going back");
    assert!(matches!(error, StoreError::ImportRefused { position: 3, .. }), "{error}");
    assert_eq!(store.reader().expect("reader").head().expect("head").position, 0);
}

#[test]
fn a_duplicate_event_id_is_refused() {
    let (_source, events) = source_log();
    let target = temp_log();
    let mut store = open_store(&target.path);
    let mut duplicated = events.clone();
    duplicated[4].event_id = duplicated[0].event_id;
    rehash(&mut duplicated);
    let error = import(&mut store, &duplicated).expect_err("a duplicate event id");
    assert!(matches!(error, StoreError::Duplicate { what: "event id", .. }), "{error}");
    let rows: i64 = raw(&target.path).query_row("SELECT count(*) FROM events", [], |row| row.get(0)).expect("count");
    assert_eq!(rows, 0);
}
