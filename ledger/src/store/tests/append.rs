//! Appends: positions, versions, expected versions, limits, recorded_at.

use chrono::TimeDelta;
use uuid::Uuid;

use super::{event, instant, open_store, temp_log};
use crate::store::{AppendOutcome, EventMetadata, ExpectedVersion, Head, STREAM_ID_BYTES_MAX, StoreError};

#[test]
fn positions_are_global_and_versions_per_stream() {
    let log = temp_log();
    let mut store = open_store(&log.path);

    let first = store
        .append(
            "member-a",
            ExpectedVersion::NoStream,
            vec![event("Registered", "{}"), event("Granted", "{}")],
            instant(0),
        )
        .expect("append to a");
    let second = store
        .append("member-b", ExpectedVersion::NoStream, vec![event("Registered", "{}")], instant(1))
        .expect("append to b");
    let third = store
        .append("member-a", ExpectedVersion::Exact(2), vec![event("Deducted", "{}")], instant(2))
        .expect("append to a again");

    assert_eq!((first.first_position, first.last_position, first.last_version), (1, 2, 2));
    assert_eq!((second.first_position, second.last_position, second.last_version), (3, 3, 1));
    assert_eq!((third.first_position, third.last_position, third.last_version), (4, 4, 3));
    assert_eq!(store.head().position, 4);

    let reader = store.reader().expect("reader");
    let stream_a = reader.read_stream("member-a", 1, 100).expect("read a");
    let positions_and_versions: Vec<(u64, u64)> =
        stream_a.iter().map(|event| (event.position, event.version)).collect();
    assert_eq!(positions_and_versions, vec![(1, 1), (2, 2), (4, 3)]);
    assert_eq!(reader.head().expect("head"), store.head());
}

#[test]
fn a_wrong_exact_version_is_a_conflict_that_writes_nothing() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    store
        .append(
            "member-a",
            ExpectedVersion::NoStream,
            vec![event("Registered", "{}"), event("Granted", "{}")],
            instant(0),
        )
        .expect("append");
    let head_before = store.head();

    let error = store
        .append("member-a", ExpectedVersion::Exact(1), vec![event("Deducted", "{}")], instant(1))
        .expect_err("stale version");
    match error {
        StoreError::VersionConflict { stream_id, expected, actual } => {
            assert_eq!(stream_id, "member-a");
            assert_eq!(expected, ExpectedVersion::Exact(1));
            assert_eq!(actual, 2);
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }

    let reader = store.reader().expect("reader");
    assert_eq!(reader.head().expect("head"), head_before);
    assert_eq!(store.head(), head_before);
    assert_eq!(reader.stream_version("member-a").expect("version"), 2);

    // The caller reloads and retries with the right version; the chain continues.
    let outcome =
        store.append("member-a", ExpectedVersion::Exact(2), vec![event("Deducted", "{}")], instant(1)).expect("retry");
    assert_eq!((outcome.last_position, outcome.last_version), (3, 3));
    reader.verify_chain(|_| {}).expect("a valid chain");
}

#[test]
fn no_stream_on_an_existing_stream_is_a_conflict_that_writes_nothing() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    store
        .append("member-a", ExpectedVersion::NoStream, vec![event("Registered", "{}")], instant(0))
        .expect("first append");

    let error = store
        .append("member-a", ExpectedVersion::NoStream, vec![event("Registered", "{}")], instant(1))
        .expect_err("the stream exists");
    assert!(matches!(error, StoreError::VersionConflict { actual: 1, .. }), "{error:?}");
    assert_eq!(store.reader().expect("reader").head().expect("head").position, 1);
    let message = error.to_string();
    assert!(message.contains("member-a") && message.contains("no stream"), "{message}");
}

#[test]
fn exact_zero_means_no_stream_and_any_appends_after_whatever_is_there() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    store
        .append("member-a", ExpectedVersion::Exact(0), vec![event("Registered", "{}")], instant(0))
        .expect("exact 0 on a new stream");
    let outcome =
        store.append("member-a", ExpectedVersion::Any, vec![event("Granted", "{}")], instant(1)).expect("any");
    assert_eq!(outcome.last_version, 2);
    assert!(matches!(
        store.append("member-b", ExpectedVersion::Exact(1), vec![event("Granted", "{}")], instant(2)),
        Err(StoreError::VersionConflict { actual: 0, .. })
    ));
}

#[test]
fn a_duplicate_event_id_fails_the_whole_append() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let registered = event("Registered", "{}");
    store.append("member-a", ExpectedVersion::Any, vec![registered.clone()], instant(0)).expect("first append");

    let fresh = event("Granted", "{}");
    let error = store
        .append("member-a", ExpectedVersion::Any, vec![fresh, registered.clone()], instant(1))
        .expect_err("the second event reuses an id");
    assert!(
        matches!(&error, StoreError::Duplicate { what: "event id", key } if *key == registered.event_id.to_string()),
        "{error:?}"
    );
    let reader = store.reader().expect("reader");
    assert_eq!(reader.head().expect("head").position, 1, "the fresh event was not kept");
    store
        .append("member-a", ExpectedVersion::Exact(1), vec![event("Granted", "{}")], instant(2))
        .expect("the store goes on");
    reader.verify_chain(|_| {}).expect("a valid chain");
}

#[test]
fn arguments_beyond_the_limits_are_refused() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let refused = |result: Result<AppendOutcome, StoreError>| {
        assert!(matches!(result, Err(StoreError::InvalidArgument(_))), "{result:?}");
    };
    refused(store.append("member-a", ExpectedVersion::Any, vec![], instant(0)));
    refused(store.append("", ExpectedVersion::Any, vec![event("E", "{}")], instant(0)));
    refused(store.append(
        &"m".repeat(STREAM_ID_BYTES_MAX + 1),
        ExpectedVersion::Any,
        vec![event("E", "{}")],
        instant(0),
    ));
    refused(store.append("member-a", ExpectedVersion::Any, vec![event("", "{}")], instant(0)));
    assert_eq!(store.head(), Head::EMPTY);
}

#[test]
fn recorded_at_is_truncated_to_microseconds_and_never_goes_back() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let later = instant(100) + TimeDelta::nanoseconds(123_456_789);
    let first = store.append("member-a", ExpectedVersion::Any, vec![event("E", "{}")], later).expect("append");
    assert_eq!(first.recorded_at, instant(100) + TimeDelta::microseconds(123_456));

    // A second process whose clock is behind: its events are recorded at the
    // last recorded_at, not before it.
    let second = store
        .append("member-b", ExpectedVersion::Any, vec![event("E", "{}")], instant(50))
        .expect("append with an earlier clock");
    assert_eq!(second.recorded_at, first.recorded_at);

    let events = store.reader().expect("reader").read_all(0, 10).expect("read");
    assert_eq!(events[0].recorded_at, first.recorded_at);
    assert_eq!(events[1].recorded_at, first.recorded_at);
}

#[test]
fn events_read_back_exactly_as_appended() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let metadata = EventMetadata {
        occurred_at: Some(instant(-30)),
        causation_id: Some(Uuid::now_v7()),
        correlation_id: Some(Uuid::now_v7()),
        actor: "member_key:k_123".to_string(),
        idempotency_key: Some("key-1".to_string()),
    };
    let appended = crate::store::NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "UsageRecorded".to_string(),
        schema_version: 3,
        payload: r#"{"type":"UsageRecorded","credits":5,"note":"é ✓"}"#.to_string(),
        metadata: metadata.clone(),
    };
    store.append("member-a", ExpectedVersion::Any, vec![appended.clone()], instant(0)).expect("append");

    let recorded = store.reader().expect("reader").read_stream("member-a", 1, 1).expect("read").remove(0);
    assert_eq!(recorded.position, 1);
    assert_eq!(recorded.version, 1);
    assert_eq!(recorded.stream_id, "member-a");
    assert_eq!(recorded.event_id, appended.event_id);
    assert_eq!(recorded.event_type, appended.event_type);
    assert_eq!(recorded.schema_version, 3);
    assert_eq!(recorded.payload, appended.payload);
    assert_eq!(recorded.metadata, metadata);
    assert_eq!(recorded.recorded_at, instant(0));
    assert_eq!(recorded.hash, store.head().hash);
    assert_eq!(recorded.expected_hash(&[0; 32]), recorded.hash);
}

#[test]
fn metadata_leaves_out_absent_fields() {
    let metadata = EventMetadata { actor: "scheduler".to_string(), ..EventMetadata::default() };
    let json = serde_json::to_string(&metadata).expect("serialise");
    assert_eq!(json, r#"{"actor":"scheduler"}"#);
    let parsed: EventMetadata = serde_json::from_str(r#"{"actor":"stripe","added_later":1}"#).expect("parse");
    assert_eq!(parsed.actor, "stripe");
}

#[test]
fn a_second_store_on_the_same_file_continues_the_chain() {
    let log = temp_log();
    let mut first = open_store(&log.path);
    let mut second = open_store(&log.path);
    for round in 0..3 {
        first.append("member-a", ExpectedVersion::Any, vec![event("E", "{}")], instant(round)).expect("first store");
        // The second store's cached head is stale here; the batch re-reads it.
        second.append("member-a", ExpectedVersion::Any, vec![event("E", "{}")], instant(round)).expect("second store");
    }
    let reader = first.reader().expect("reader");
    let report = reader.verify_chain(|_| {}).expect("a valid chain");
    assert_eq!(report.events_checked, 6);
    assert_eq!(report.head, second.head());
    assert_eq!(reader.stream_version("member-a").expect("version"), 6);
}
