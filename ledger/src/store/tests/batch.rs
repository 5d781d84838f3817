//! Group commit: a batch is all or nothing, a command inside it is its own
//! all or nothing, and the head follows both.

use super::{event, instant, open_store, raw, temp_log};
use crate::store::{ExpectedVersion, Head, IdempotencyRecord, StoreError};

fn record(position: u64) -> IdempotencyRecord {
    IdempotencyRecord {
        fingerprint: [7; 32],
        status: 201,
        response: "{}".to_string(),
        position,
        recorded_at: instant(0),
    }
}

#[test]
fn a_rolled_back_command_leaves_nothing_and_the_next_continues_the_chain() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let mut batch = store.begin_batch().expect("batch");

    batch.begin_command().expect("command 1");
    batch.append("member-a", ExpectedVersion::NoStream, vec![event("A", "{}")], instant(0)).expect("append a");
    batch.commit_command().expect("keep command 1");

    batch.begin_command().expect("command 2");
    let rolled_back = batch
        .append("member-b", ExpectedVersion::NoStream, vec![event("B1", "{}"), event("B2", "{}")], instant(1))
        .expect("append b");
    assert_eq!(rolled_back.last_position, 3);
    batch.record_idempotency("scope", "key-b", &record(3)).expect("record");
    batch.record_usage("member-b", "usage-b", 3, 5).expect("usage");
    assert_eq!(batch.stream_version("member-b").expect("version"), 2);
    batch.rollback_command().expect("undo command 2");
    assert_eq!(batch.head().position, 1, "the head is restored");
    assert_eq!(batch.stream_version("member-b").expect("version"), 0);
    assert_eq!(batch.idempotency("scope", "key-b").expect("lookup"), None);
    assert_eq!(batch.usage("member-b", "usage-b").expect("lookup"), None);

    batch.begin_command().expect("command 3");
    let outcome =
        batch.append("member-c", ExpectedVersion::NoStream, vec![event("C", "{}")], instant(2)).expect("append c");
    assert_eq!(outcome.first_position, 2, "no gap where command 2 was");
    batch.commit_command().expect("keep command 3");
    batch.commit().expect("commit");

    assert_eq!(store.head().position, 2);
    let reader = store.reader().expect("reader");
    assert_eq!(logged_types(&reader), vec!["A", "C"]);
    assert_eq!(reader.stream_version("member-b").expect("version"), 0);
    assert_eq!(reader.idempotency("scope", "key-b").expect("lookup"), None);
    let report = reader.verify_chain(|_| {}).expect("a valid chain");
    assert_eq!(report.head, store.head());
}

#[test]
fn stream_version_in_a_batch_sees_its_own_uncommitted_appends() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let reader = store.reader().expect("reader");
    let mut batch = store.begin_batch().expect("batch");
    batch.append("member-a", ExpectedVersion::Any, vec![event("A", "{}")], instant(0)).expect("append");
    assert_eq!(batch.stream_version("member-a").expect("version"), 1);
    batch
        .append("member-a", ExpectedVersion::Exact(1), vec![event("A", "{}")], instant(0))
        .expect("append on top of the uncommitted one");
    assert_eq!(reader.stream_version("member-a").expect("version"), 0, "readers do not see an uncommitted batch");
    batch.commit().expect("commit");
    assert_eq!(reader.stream_version("member-a").expect("version"), 2);
}

#[test]
fn a_batch_dropped_without_commit_leaves_nothing() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    store.append("member-a", ExpectedVersion::Any, vec![event("A", "{}")], instant(0)).expect("append");
    let head_before = store.head();
    {
        let mut batch = store.begin_batch().expect("batch");
        batch.begin_command().expect("command");
        batch.append("member-a", ExpectedVersion::Exact(1), vec![event("B", "{}")], instant(1)).expect("append");
        batch.record_idempotency("scope", "key", &record(2)).expect("record");
        batch.commit_command().expect("keep command");
        assert_eq!(batch.head().position, 2);
    }
    assert_eq!(store.head(), head_before, "the head is reloaded");
    let reader = store.reader().expect("reader");
    assert_eq!(reader.head().expect("head"), head_before);
    assert_eq!(reader.idempotency("scope", "key").expect("lookup"), None);

    let outcome = store
        .append("member-a", ExpectedVersion::Exact(1), vec![event("B", "{}")], instant(1))
        .expect("the next batch starts from the file's head");
    assert_eq!(outcome.first_position, 2);
    reader.verify_chain(|_| {}).expect("a valid chain");
}

#[test]
fn a_commit_that_fails_rolls_back_everything_and_reloads_the_head() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    store.append("member-a", ExpectedVersion::Any, vec![event("A", "{}")], instant(0)).expect("append");
    let head_before = store.head();

    // A deferred foreign key is checked only at COMMIT, so this makes the
    // COMMIT itself fail (and SQLite keeps the transaction open after it).
    raw(&log.path)
        .execute_batch(
            "CREATE TABLE commit_guard_parent (id INTEGER PRIMARY KEY);
             CREATE TABLE commit_guard (parent INTEGER REFERENCES commit_guard_parent (id) DEFERRABLE INITIALLY DEFERRED);
             CREATE TRIGGER commit_guard_on_insert AFTER INSERT ON events
             BEGIN INSERT INTO commit_guard (parent) VALUES (1); END;",
        )
        .expect("install the commit guard");
    store.connection.execute_batch("PRAGMA foreign_keys = ON").expect("foreign keys on");

    let mut batch = store.begin_batch().expect("batch");
    batch.begin_command().expect("command");
    batch
        .append("member-a", ExpectedVersion::Exact(1), vec![event("B", "{}")], instant(1))
        .expect("the append itself succeeds");
    batch.record_usage("member-a", "usage-1", 2, 3).expect("usage");
    batch.commit_command().expect("keep command");
    let error = batch.commit().expect_err("the deferred constraint fails the commit");
    assert!(error.to_string().contains("FOREIGN KEY"), "{error:?}");

    assert_eq!(store.head(), head_before, "the head is reloaded");
    let reader = store.reader().expect("reader");
    assert_eq!(reader.head().expect("head"), head_before);
    assert_eq!(reader.usage("member-a", "usage-1").expect("lookup"), None);

    raw(&log.path).execute_batch("DROP TRIGGER commit_guard_on_insert").expect("remove the guard");
    let outcome = store
        .append("member-a", ExpectedVersion::Exact(1), vec![event("B", "{}")], instant(1))
        .expect("the store works after a failed commit");
    assert_eq!(outcome.first_position, 2);
    reader.verify_chain(|_| {}).expect("a valid chain");
}

#[test]
fn a_full_disk_fails_the_append_and_the_batch_stays_all_or_nothing() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    store.append("member-a", ExpectedVersion::Any, vec![event("A", "{}")], instant(0)).expect("append");
    let head_before = store.head();
    // A page limit just above the current size stands in for a full disk.
    let page_count: i64 = store.connection.query_row("PRAGMA page_count", [], |row| row.get(0)).expect("page_count");
    store.connection.execute_batch(&format!("PRAGMA max_page_count = {}", page_count + 4)).expect("limit the file");

    let mut batch = store.begin_batch().expect("batch");
    batch
        .append("member-a", ExpectedVersion::Exact(1), vec![event("B", "{}")], instant(1))
        .expect("a small append fits");
    let big_payload = format!("\"{}\"", "x".repeat(512 * 1024));
    let error = batch
        .append("member-a", ExpectedVersion::Exact(2), vec![event("C", &big_payload)], instant(2))
        .expect_err("the disk is full");
    assert!(matches!(error, StoreError::Full), "{error:?}");
    // Whether SQLite kept the transaction or ended it, the batch's state is
    // never half-written: either it commits what succeeded, or nothing.
    let committed = batch.commit();

    let reader = store.reader().expect("reader");
    let head_after = reader.head().expect("head");
    match committed {
        Ok(()) => assert_eq!(head_after.position, 2),
        Err(StoreError::BatchAborted) => assert_eq!(head_after, head_before),
        Err(other) => panic!("unexpected commit error {other:?}"),
    }
    assert_eq!(store.head(), head_after);
    reader.verify_chain(|_| {}).expect("a valid chain");
}

#[test]
fn commit_with_an_open_command_is_refused_and_rolled_back() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let mut batch = store.begin_batch().expect("batch");
    batch.begin_command().expect("command");
    batch.append("member-a", ExpectedVersion::Any, vec![event("A", "{}")], instant(0)).expect("append");
    let error = batch.commit().expect_err("a command is still open");
    assert!(matches!(error, StoreError::Misuse(_)), "{error:?}");
    assert_eq!(store.head(), Head::EMPTY);
    assert_eq!(store.reader().expect("reader").head().expect("head"), Head::EMPTY);
}

#[test]
fn releasing_a_command_that_was_never_begun_is_misuse() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let mut batch = store.begin_batch().expect("batch");
    assert!(matches!(batch.commit_command(), Err(StoreError::Misuse(_))));
    assert!(matches!(batch.rollback_command(), Err(StoreError::Misuse(_))));
    batch.commit().expect("an empty batch commits");
}

#[test]
fn a_version_conflict_inside_a_batch_leaves_the_other_commands() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let mut batch = store.begin_batch().expect("batch");
    batch.begin_command().expect("command 1");
    batch.append("member-a", ExpectedVersion::NoStream, vec![event("A", "{}")], instant(0)).expect("append");
    batch.commit_command().expect("keep");
    batch.begin_command().expect("command 2");
    let conflict = batch.append("member-a", ExpectedVersion::NoStream, vec![event("A", "{}")], instant(0));
    assert!(matches!(conflict, Err(StoreError::VersionConflict { actual: 1, .. })));
    batch.rollback_command().expect("undo command 2");
    batch.commit().expect("commit");
    assert_eq!(store.head().position, 1);
}

#[test]
fn read_stream_in_a_batch_sees_its_own_uncommitted_appends() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    store.append("member-a", ExpectedVersion::Any, vec![event("A", "{}")], instant(0)).expect("append");
    let mut batch = store.begin_batch().expect("batch");
    batch.append("member-a", ExpectedVersion::Exact(1), vec![event("B", "{}")], instant(1)).expect("append");
    let types: Vec<String> =
        batch.read_stream("member-a", 1, 10).expect("read").into_iter().map(|event| event.event_type).collect();
    assert_eq!(types, vec!["A", "B"]);
    assert!(matches!(
        batch.read_stream("member-a", 1, crate::store::READ_PAGE_SIZE_MAX + 1),
        Err(StoreError::InvalidArgument(_))
    ));
}

#[test]
fn the_schedule_finds_due_streams_and_follows_savepoints() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let mut batch = store.begin_batch().expect("batch");
    batch.set_due("member-late", Some(instant(10))).expect("set");
    batch.set_due("member-early", Some(instant(5))).expect("set");
    batch.set_due("member-future", Some(instant(100))).expect("set");
    batch.set_due("member-gone", Some(instant(1))).expect("set");
    batch.set_due("member-gone", None).expect("unset");
    batch.set_due("member-late", Some(instant(20))).expect("move a due instant");

    assert_eq!(
        batch.due_streams(instant(20), 10).expect("due"),
        vec!["member-early", "member-late"],
        "the longest overdue first, and nothing not yet due"
    );
    assert_eq!(batch.due_streams(instant(20), 1).expect("due"), vec!["member-early"]);
    assert!(batch.due_streams(instant(4), 10).expect("due").is_empty());

    batch.begin_command().expect("command");
    batch.set_due("member-early", None).expect("unset");
    batch.rollback_command().expect("undo");
    assert_eq!(batch.due_streams(instant(5), 10).expect("due"), vec!["member-early"]);
    batch.commit().expect("commit");

    let mut batch = store.begin_batch().expect("a second batch");
    assert_eq!(
        batch.due_streams(instant(1_000), 10).expect("due"),
        vec!["member-early", "member-late", "member-future"]
    );
}

#[test]
fn an_optimistic_batch_undoes_a_command_that_wrote_nothing_and_commits_the_rest() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    let mut batch = store.begin_optimistic_batch().expect("batch");
    batch.begin_command().expect("command 1");
    batch.append("member-a", ExpectedVersion::NoStream, vec![event("A", "{}")], instant(0)).expect("append");
    batch.record_idempotency("scope", "key-a", &record(1)).expect("record");
    batch.commit_command().expect("keep");
    // Refused before writing (a version conflict): nothing to undo.
    batch.begin_command().expect("command 2");
    assert_eq!(batch.idempotency("scope", "key-b").expect("lookup"), None);
    let conflict = batch.append("member-a", ExpectedVersion::NoStream, vec![event("B", "{}")], instant(0));
    assert!(matches!(conflict, Err(StoreError::VersionConflict { actual: 1, .. })), "{conflict:?}");
    batch.rollback_command().expect("a command that wrote nothing is undone");
    assert!(!batch.needs_replay_with_savepoints());
    batch.begin_command().expect("command 3");
    let outcome = batch.append("member-c", ExpectedVersion::NoStream, vec![event("C", "{}")], instant(1)).expect("c");
    assert_eq!(outcome.first_position, 2);
    batch.commit_command().expect("keep");
    batch.commit().expect("commit");

    let reader = store.reader().expect("reader");
    assert_eq!(logged_types(&reader), vec!["A", "C"]);
    reader.verify_chain(|_| {}).expect("a valid chain");
}

#[test]
fn an_optimistic_batch_cannot_undo_a_command_that_wrote_and_commits_nothing() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    store.append("member-a", ExpectedVersion::NoStream, vec![event("A", "{}")], instant(0)).expect("seed");
    let head_before = store.head();

    let mut batch = store.begin_optimistic_batch().expect("batch");
    batch.begin_command().expect("command 1");
    batch.append("member-b", ExpectedVersion::NoStream, vec![event("B", "{}")], instant(1)).expect("append b");
    batch.commit_command().expect("keep");
    // Fails after its append wrote: the usage id is already indexed.
    batch.begin_command().expect("command 2");
    batch.append("member-c", ExpectedVersion::NoStream, vec![event("C", "{}")], instant(1)).expect("append c");
    batch.record_usage("member-c", "u1", 3, 5).expect("usage");
    let duplicate = batch.record_usage("member-c", "u1", 3, 5);
    assert!(matches!(duplicate, Err(StoreError::Duplicate { what: "usage id", .. })), "{duplicate:?}");
    let undone = batch.rollback_command();
    assert!(matches!(undone, Err(StoreError::BatchAborted)), "{undone:?}");
    assert!(batch.needs_replay_with_savepoints());
    // Nothing more runs in it, and it does not commit.
    assert!(matches!(batch.stream_version("member-b"), Err(StoreError::BatchAborted)));
    assert!(matches!(batch.commit(), Err(StoreError::BatchAborted)));

    assert_eq!(store.head(), head_before);
    let reader = store.reader().expect("reader");
    assert_eq!(reader.head().expect("head"), head_before, "none of the batch reached the file");
    assert_eq!(reader.stream_version("member-b").expect("version"), 0);
    // The same commands in a batch with savepoints: the failing one alone is undone.
    let mut batch = store.begin_batch().expect("batch");
    batch.begin_command().expect("command 1");
    batch.append("member-b", ExpectedVersion::NoStream, vec![event("B", "{}")], instant(1)).expect("append b");
    batch.commit_command().expect("keep");
    batch.begin_command().expect("command 2");
    batch.append("member-c", ExpectedVersion::NoStream, vec![event("C", "{}")], instant(1)).expect("append c");
    batch.record_usage("member-c", "u1", 3, 5).expect("usage");
    assert!(batch.record_usage("member-c", "u1", 3, 5).is_err());
    batch.rollback_command().expect("a savepoint undoes it");
    batch.commit().expect("commit");
    assert_eq!(reader.stream_version("member-b").expect("version"), 1);
    assert_eq!(reader.stream_version("member-c").expect("version"), 0);
    assert_eq!(reader.usage("member-c", "u1").expect("lookup"), None);
}

#[test]
fn background_checkpoints_copy_the_wal_and_rewinds_keep_it_bounded() {
    use crate::store::CheckpointOptions;
    use std::sync::atomic::Ordering::Relaxed;

    let log = temp_log();
    let mut store = open_store(&log.path);
    let options = CheckpointOptions { background_pages: 8, rewind_pages: 64 };
    let stats = store.checkpoint_in_background(options).expect("checkpoints start");
    let page_bytes: i64 = store.connection.query_row("PRAGMA page_size", [], |row| row.get(0)).expect("page size");
    let page_bytes = page_bytes as u64;
    let wal = log.path.with_file_name("events.sqlite-wal");
    let payload = format!("{{\"padding\":\"{}\"}}", "x".repeat(3_000));
    let mut wal_bytes_max = 0;
    for round in 0..400_u64 {
        let mut batch = store.begin_optimistic_batch().expect("batch");
        for member in 0..4_u64 {
            batch.begin_command().expect("command");
            batch
                .append(
                    &format!("member-{member}"),
                    ExpectedVersion::Any,
                    vec![event("E", &payload)],
                    instant(round as i64),
                )
                .expect("append");
            batch.commit_command().expect("keep");
        }
        batch.commit().expect("commit");
        wal_bytes_max = wal_bytes_max.max(std::fs::metadata(&wal).expect("the WAL").len());
    }
    assert!(stats.background.load(Relaxed) > 10, "background checkpoints ran: {stats:?}");
    assert!(stats.rewinds.load(Relaxed) > 2, "the WAL was rewound: {stats:?}");
    assert_eq!(stats.failures.load(Relaxed), 0, "{stats:?}");
    // Each event is about one page: a batch adds about 4 pages and 4
    // interior and index pages; the rewind comes at 64 pages, or at the
    // latest at twice that.
    let bound = (2 * u64::from(options.rewind_pages) + 64) * (page_bytes + 24);
    assert!(wal_bytes_max <= bound, "the WAL grew to {wal_bytes_max} bytes, more than {bound}");

    // Everything committed is in the file, checkpointed or not, and the
    // chain holds; a reopened store (the WAL recovered) sees the same.
    let reader = store.reader().expect("reader");
    assert_eq!(reader.verify_chain(|_| {}).expect("a valid chain").events_checked, 1_600);
    drop(reader);
    let head = store.head();
    drop(store);
    let reopened = open_store(&log.path);
    assert_eq!(reopened.head(), head);
    assert_eq!(reopened.reader().expect("reader").read_all(0, 2_000).expect("read").len(), 1_600);
}

/// The event types of the log, in order (at most 10).
fn logged_types(reader: &crate::store::EventReader) -> Vec<String> {
    reader.read_all(0, 10).expect("read").into_iter().map(|event| event.event_type).collect()
}
