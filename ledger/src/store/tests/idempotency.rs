//! Idempotency records and the usage-id index: side tables written in the
//! same transaction as the events.

use chrono::TimeDelta;

use super::{event, instant, open_store, temp_log};
use crate::store::{ExpectedVersion, IdempotencyRecord, StoreError, UsageIndexEntry};

fn record(fingerprint_byte: u8, position: u64, recorded_at_s: i64) -> IdempotencyRecord {
    IdempotencyRecord {
        fingerprint: [fingerprint_byte; 32],
        status: 201,
        response: r#"{"position":1,"balance":95}"#.to_string(),
        position,
        recorded_at: instant(recorded_at_s),
    }
}

#[test]
fn an_idempotency_record_round_trips_and_scopes_are_distinct() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let stored = record(1, 1, 0);
    let scope = "member_key:k1/member-a/POST /usage";
    let other_scope = "member_key:k2/member-b/POST /usage";

    let mut batch = store.begin_batch().expect("batch");
    batch.append("member-a", ExpectedVersion::Any, vec![event("E", "{}")], instant(0)).expect("append");
    assert_eq!(batch.idempotency(scope, "key-1").expect("lookup"), None);
    batch.record_idempotency(scope, "key-1", &stored).expect("record");
    assert_eq!(batch.idempotency(scope, "key-1").expect("lookup"), Some(stored.clone()));
    assert_eq!(batch.idempotency(other_scope, "key-1").expect("lookup"), None);
    batch
        .record_idempotency(other_scope, "key-1", &record(2, 1, 0))
        .expect("the same key in another scope is another record");
    let duplicate = batch.record_idempotency(scope, "key-1", &record(3, 1, 0));
    assert!(matches!(duplicate, Err(StoreError::Duplicate { what: "idempotency key", .. })), "{duplicate:?}");
    batch.commit().expect("commit");

    let reader = store.reader().expect("reader");
    assert_eq!(reader.idempotency(scope, "key-1").expect("lookup"), Some(stored));
    assert_eq!(
        reader.idempotency(other_scope, "key-1").expect("lookup").map(|record| record.fingerprint),
        Some([2; 32])
    );
}

#[test]
fn purging_keeps_records_for_at_least_seven_days() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let day_s = 86_400;
    let mut batch = store.begin_batch().expect("batch");
    batch.record_idempotency("s", "old", &record(1, 1, 0)).expect("old");
    batch.record_idempotency("s", "recent", &record(1, 1, 5 * day_s)).expect("recent");
    batch.commit().expect("commit");

    let now = instant(10 * day_s);
    let too_short = store.purge_idempotency(now, TimeDelta::days(6));
    assert!(matches!(too_short, Err(StoreError::InvalidArgument(_))), "{too_short:?}");

    let purged = store.purge_idempotency(now, TimeDelta::days(7)).expect("purge");
    assert_eq!(purged, 1);
    let reader = store.reader().expect("reader");
    assert_eq!(reader.idempotency("s", "old").expect("lookup"), None);
    assert!(reader.idempotency("s", "recent").expect("lookup").is_some());
}

#[test]
fn the_usage_index_records_looks_up_and_marks_reversals() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let mut batch = store.begin_batch().expect("batch");
    assert_eq!(batch.usage("member-a", "u1").expect("lookup"), None);
    batch.record_usage("member-a", "u1", 4, 25).expect("record");
    batch.record_usage("member-b", "u1", 5, 10).expect("the same usage id on another member");
    let duplicate = batch.record_usage("member-a", "u1", 6, 25);
    assert!(matches!(duplicate, Err(StoreError::Duplicate { what: "usage id", .. })), "{duplicate:?}");
    batch.mark_usage_reversed("member-a", "u1", 9).expect("reverse");
    let twice = batch.mark_usage_reversed("member-a", "u1", 10);
    assert!(matches!(twice, Err(StoreError::InvalidArgument(_))), "{twice:?}");
    let unknown = batch.mark_usage_reversed("member-a", "nope", 10);
    assert!(matches!(unknown, Err(StoreError::InvalidArgument(_))), "{unknown:?}");
    batch.commit().expect("commit");

    let reader = store.reader().expect("reader");
    assert_eq!(
        reader.usage("member-a", "u1").expect("lookup"),
        Some(UsageIndexEntry { position: 4, credits: 25, reversed_position: Some(9) })
    );
    assert_eq!(
        reader.usage("member-b", "u1").expect("lookup"),
        Some(UsageIndexEntry { position: 5, credits: 10, reversed_position: None })
    );
}
