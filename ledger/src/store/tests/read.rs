//! Reading: by stream, by position in pages, catch-up, and as of an instant.

use super::{append_many, event, instant, open_store, temp_log};
use crate::store::{ExpectedVersion, READ_PAGE_SIZE_MAX, StoreError};

#[test]
fn read_stream_pages_by_version() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 5);
    append_many(&mut store, "member-b", 2);
    let reader = store.reader().expect("reader");

    let first_page = reader.read_stream("member-a", 1, 2).expect("page 1");
    let second_page = reader.read_stream("member-a", 3, 2).expect("page 2");
    let last_page = reader.read_stream("member-a", 5, 2).expect("page 3");
    let versions =
        |events: &[crate::store::RecordedEvent]| -> Vec<u64> { events.iter().map(|event| event.version).collect() };
    assert_eq!(versions(&first_page), vec![1, 2]);
    assert_eq!(versions(&second_page), vec![3, 4]);
    assert_eq!(versions(&last_page), vec![5]);
    assert!(reader.read_stream("member-a", 6, 2).expect("past the end").is_empty());
    assert!(reader.read_stream("member-z", 1, 2).expect("no stream").is_empty());
    assert!(reader.read_stream("member-b", 1, 10).expect("b").iter().all(|event| event.stream_id == "member-b"));
}

#[test]
fn read_all_pages_by_position() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 4);
    append_many(&mut store, "member-b", 6);
    let reader = store.reader().expect("reader");

    let mut positions = Vec::new();
    let mut after_position = 0;
    loop {
        let page = reader.read_all(after_position, 3).expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        after_position = page.last().map(|event| event.position).unwrap_or(after_position);
        positions.extend(page.into_iter().map(|event| event.position));
    }
    assert_eq!(positions, (1..=10).collect::<Vec<u64>>());
}

#[test]
fn page_sizes_beyond_the_limit_are_refused() {
    let log = temp_log();
    let store = open_store(&log.path);
    let reader = store.reader().expect("reader");
    assert!(matches!(reader.read_all(0, 0), Err(StoreError::InvalidArgument(_))));
    assert!(matches!(reader.read_stream("member-a", 1, READ_PAGE_SIZE_MAX + 1), Err(StoreError::InvalidArgument(_))));
    let mut catch_up = reader.catch_up(0, 0);
    assert!(matches!(catch_up.next(), Some(Err(StoreError::InvalidArgument(_)))) || catch_up.next().is_none());
}

#[test]
fn catch_up_pages_through_to_the_head_it_found() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 7);
    append_many(&mut store, "member-b", 3);
    let reader = store.reader().expect("reader");

    let mut catch_up = reader.catch_up(2, 3);
    let first = catch_up.next().expect("an event").expect("readable");
    assert_eq!(first.position, 3);
    assert_eq!(catch_up.through_position(), Some(10));
    // Events appended after the catch-up started are left for the next one.
    append_many(&mut store, "member-c", 2);
    let rest: Vec<u64> = catch_up.map(|event| event.expect("readable").position).collect();
    assert_eq!(rest, (4..=10).collect::<Vec<u64>>());

    let next: Vec<u64> = reader.catch_up(10, 3).map(|event| event.expect("readable").position).collect();
    assert_eq!(next, vec![11, 12]);
    assert_eq!(reader.catch_up(12, 3).count(), 0);
}

#[test]
fn catch_up_on_an_empty_log_ends_at_once() {
    let log = temp_log();
    let store = open_store(&log.path);
    let reader = store.reader().expect("reader");
    let mut catch_up = reader.catch_up(0, 100);
    assert!(catch_up.next().is_none());
    assert_eq!(catch_up.through_position(), Some(0));
}

#[test]
fn read_stream_until_returns_what_was_recorded_by_then() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    for (seconds, stream_id) in [(10, "member-a"), (20, "member-b"), (20, "member-a"), (30, "member-a")] {
        store.append(stream_id, ExpectedVersion::Any, vec![event("E", "{}")], instant(seconds)).expect("append");
    }
    let reader = store.reader().expect("reader");
    let versions_until = |seconds: i64| -> Vec<u64> {
        reader
            .read_stream_until("member-a", instant(seconds), 1, 100)
            .expect("read")
            .into_iter()
            .map(|event| event.version)
            .collect()
    };
    assert_eq!(versions_until(9), Vec::<u64>::new());
    assert_eq!(versions_until(10), vec![1]);
    assert_eq!(versions_until(19), vec![1]);
    assert_eq!(versions_until(20), vec![1, 2]);
    assert_eq!(versions_until(1_000), vec![1, 2, 3]);

    let paged = reader.read_stream_until("member-a", instant(1_000), 2, 1).expect("a page");
    assert_eq!(paged.iter().map(|event| event.version).collect::<Vec<_>>(), vec![2]);

    // The iterator form pages the same way.
    let as_of: Vec<u64> =
        reader.stream_events("member-a", Some(instant(25)), 1).map(|event| event.expect("readable").version).collect();
    assert_eq!(as_of, vec![1, 2]);
    let all: Vec<u64> =
        reader.stream_events("member-a", None, 2).map(|event| event.expect("readable").version).collect();
    assert_eq!(all, vec![1, 2, 3]);
}

#[test]
fn a_reader_hiding_unsynced_batches_stops_short_of_them_until_they_are_synced() {
    use crate::store::VisibleHead;
    use std::sync::Arc;
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 3);
    let synced_head = store.head();
    let visible = Arc::new(VisibleHead::default());
    let mut reader = store.reader().expect("reader");
    reader.hide_unsynced(Arc::clone(&visible));
    let copy = reader.reopen().expect("reopen");
    let plain = store.reader().expect("plain reader");

    // A batch of positions 4..=5, marked before its commit as the writer does.
    visible.committing(4, 5);
    append_many(&mut store, "member-a", 2);
    for hiding in [&reader, &copy] {
        assert_eq!(hiding.head().expect("head"), synced_head, "the head and its hash stop at 3");
        assert_eq!(hiding.read_all(0, 10).expect("all").len(), 3);
        assert_eq!(hiding.read_stream("member-a", 1, 10).expect("stream").len(), 3);
        assert_eq!(hiding.stream_events("member-a", None, 2).count(), 3);
        assert_eq!(hiding.catch_up(0, 2).count(), 3);
    }
    assert_eq!(plain.head().expect("head").position, 5, "other readers are not limited");

    // A later batch committed before the fsync of the first returns.
    visible.committing(6, 6);
    append_many(&mut store, "member-b", 1);
    visible.synced(5);
    assert_eq!(reader.head().expect("head").position, 5, "6 is still unsynced");
    visible.synced(6);
    assert_eq!(reader.head().expect("head"), store.head());
    visible.synced(5);
    assert_eq!(reader.head().expect("head"), store.head(), "a late report of an older fsync moves nothing back");
    assert_eq!(reader.read_all(0, 10).expect("all").len(), 6);

    // A batch whose commit failed leaves nothing hidden.
    visible.committing(7, 9);
    visible.not_committed(6);
    assert_eq!(visible.limit(), u64::MAX);
}
