//! Fault injection on real SQLite files: a full disk (the log's byte budget,
//! SQLite's own `SQLITE_FULL`), a second writer holding the lock
//! (`SQLITE_BUSY`), an I/O error on commit and a failed fsync beside the
//! writer (the store's fault points, feature `fault-injection`). Each time:
//! the failing commands get an error, nothing partial is written, reads go
//! on, and the ledger recovers when the fault clears (after a failed fsync:
//! when it restarts).

use chrono::{TimeZone, Utc};
use std::sync::Arc;
use tally_ledger::domain::*;
use tally_ledger::service::Idempotency;
use tally_ledger::store::{EventReader, StoreError, StoreOptions, faults};
use tally_ledger::{Ledger, LedgerError, LedgerOptions, ManualClock, Request};
use tempfile::TempDir;

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()))
}

fn options(store: StoreOptions) -> LedgerOptions {
    LedgerOptions { store, ..LedgerOptions::default() }
}

fn usage(usage_id: &str, credits: i64) -> MemberCommand {
    MemberCommand::RecordUsage(RecordUsage {
        usage_id: usage_id.into(),
        metric: "api_calls".into(),
        quantity: 1,
        credits: Credits(credits),
        occurred_at: None,
        integration_id: None,
        query_id: None,
    })
}

fn fingerprint(key: &str) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes[..key.len().min(32)].copy_from_slice(&key.as_bytes()[..key.len().min(32)]);
    bytes
}

fn keyed(command: MemberCommand, key: &str) -> Request<MemberCommand> {
    Request::new(command, "admin").with_idempotency(Idempotency {
        scope: "admin/m/usage".into(),
        key: key.into(),
        fingerprint: fingerprint(key),
        status: 201,
    })
}

fn grant(amount: i64) -> Request<MemberCommand> {
    Request::new(MemberCommand::GrantCredits(GrantCredits::new(GrantSource::Promotional, amount)), "admin")
}

fn head(path: &std::path::Path) -> u64 {
    EventReader::open(path).unwrap().head().unwrap().position
}

fn is_full(error: &LedgerError) -> bool {
    matches!(error, LedgerError::Store(StoreError::Full))
}

#[test]
fn a_full_log_refuses_writes_whole_keeps_reads_and_recovers_when_space_is_freed() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("events.db");
    let budget = StoreOptions { max_log_bytes: Some(256 * 1024), ..StoreOptions::default() };
    let ledger = Ledger::open(&path, options(budget), clock()).unwrap();
    ledger.execute("m", grant(1_000_000)).unwrap();

    // Fill the budget with usage until the disk is "full".
    let mut accepted = 0;
    let failure = loop {
        match ledger.execute("m", keyed(usage(&format!("u{accepted}"), 1), &format!("k{accepted}"))) {
            Ok(_) => accepted += 1,
            Err(error) => break error,
        }
        assert!(accepted < 100_000, "the budget never filled");
    };
    assert!(is_full(&failure), "{failure:?}");
    assert!(accepted > 100, "{accepted}");
    let head_when_full = head(&path);

    // Nothing partial: the refused command left no event, no usage id, no key.
    let state = ledger.member_state("m").unwrap();
    assert_eq!(state.available(), Credits(1_000_000 - accepted));
    for _ in 0..3 {
        let again = ledger.execute("m", keyed(usage(&format!("u{accepted}"), 1), &format!("k{accepted}")));
        assert!(again.as_ref().is_err_and(is_full), "{again:?}");
    }
    assert_eq!(head(&path), head_when_full);
    // Reads go on: the log, the chain, the member's state.
    let reader = EventReader::open(&path).unwrap();
    assert_eq!(reader.verify_chain(|_| {}).unwrap().events_checked, head_when_full);
    ledger.shutdown();

    // The operator frees space (here: a larger budget) and restarts.
    let roomy = StoreOptions { max_log_bytes: Some(64 * 1024 * 1024), ..StoreOptions::default() };
    let ledger = Ledger::open(&path, options(roomy), clock()).unwrap();
    let retried = ledger.execute("m", keyed(usage(&format!("u{accepted}"), 1), &format!("k{accepted}"))).unwrap();
    assert!(!retried.replayed, "the refused command was never recorded, so its retry applies now");
    assert_eq!(ledger.member_state("m").unwrap().available(), Credits(1_000_000 - accepted - 1));
    // And the accepted ones stay exactly once.
    let replay = ledger.execute("m", keyed(usage("u0", 1), "k0")).unwrap();
    assert!(replay.replayed);
}

#[test]
fn a_second_writer_holding_the_lock_gets_busy_answers_and_the_ledger_recovers() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("events.db");
    let quick = StoreOptions { busy_timeout_ms: 100, ..StoreOptions::default() };
    let ledger = Ledger::open(&path, options(quick), clock()).unwrap();
    ledger.execute("m", grant(100)).unwrap();
    let before = head(&path);

    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let busy = ledger.execute("m", keyed(usage("u1", 5), "busy-1"));
    assert!(matches!(busy, Err(LedgerError::Store(StoreError::Busy))), "{busy:?}");
    // A reader is not blocked by a writer's lock (WAL).
    assert_eq!(head(&path), before);
    assert_eq!(EventReader::open(&path).unwrap().read_all(0, 10).unwrap().len() as u64, before);
    other.execute_batch("ROLLBACK").unwrap();

    let executed = ledger.execute("m", keyed(usage("u1", 5), "busy-1")).unwrap();
    assert!(!executed.replayed);
    assert_eq!(ledger.member_state("m").unwrap().available(), Credits(95));
    assert_eq!(head(&path), before + 2);
}

#[test]
fn a_failed_commit_fails_its_whole_batch_and_retries_apply_exactly_once() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("events.db");
    let ledger = Arc::new(Ledger::open(&path, LedgerOptions::default(), clock()).unwrap());
    for member in ["a", "b", "c", "d"] {
        ledger.execute(member, grant(1_000)).unwrap();
    }
    let before = head(&path);

    // Several submitters while the next commits fail with an I/O error.
    faults::fail_next_commits(&path, 3);
    let submit = |round: &str| {
        let handles: Vec<_> = ["a", "b", "c", "d"]
            .into_iter()
            .map(|member| {
                let ledger = ledger.clone();
                let key = format!("{member}-{round}");
                std::thread::spawn(move || ledger.execute(member, keyed(usage(&key, 10), &key)))
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().unwrap()).collect::<Vec<_>>()
    };
    let mut failed = 0;
    for round in 0..3 {
        for result in submit(&round.to_string()) {
            match result {
                Ok(executed) => assert!(!executed.replayed),
                Err(error) => {
                    assert!(error.is_storage_failure(), "{error:?}");
                    failed += 1;
                }
            }
        }
    }
    assert!(failed >= 3, "three commits failed, each failing at least one command: {failed}");
    let accepted = 12 - failed;
    assert_eq!(head(&path), before + 2 * accepted as u64, "a failed batch left nothing behind");

    // The writer goes on; every command retried with its key applies once.
    for round in 0..3 {
        for result in submit(&round.to_string()) {
            result.unwrap();
        }
    }
    assert_eq!(head(&path), before + 2 * 12);
    for member in ["a", "b", "c", "d"] {
        assert_eq!(ledger.member_state(member).unwrap().available(), Credits(970), "{member}");
    }
    // The cache agrees with a cold replay of the log.
    Arc::try_unwrap(ledger).ok().unwrap().shutdown();
    let reopened = Ledger::open(&path, LedgerOptions::default(), clock()).unwrap();
    for member in ["a", "b", "c", "d"] {
        assert_eq!(reopened.member_state(member).unwrap().available(), Credits(970), "{member}");
    }
    assert_eq!(EventReader::open(&path).unwrap().verify_chain(|_| {}).unwrap().events_checked, before + 24);
}

#[test]
fn a_command_that_fails_after_writing_is_undone_alone_by_replaying_its_batch_with_savepoints() {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    let dir = TempDir::new().unwrap();
    let path = dir.path().join("events.db");
    let ledger = Arc::new(Ledger::open(&path, LedgerOptions::default(), clock()).unwrap());
    let members = ["a", "b", "c", "d", "e", "f", "g", "h"];
    for member in members {
        ledger.execute(member, grant(1_000)).unwrap();
    }
    let before = head(&path);

    // All eight usages in one batch: another connection holds the write
    // lock while the writer waits in its first batch (a grant to "z") and
    // the usages queue behind it.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let batches_before = ledger.stats().batches.load(Relaxed);
    let warm_up = {
        let ledger = ledger.clone();
        std::thread::spawn(move || ledger.execute("z", grant(1)))
    };
    std::thread::sleep(Duration::from_millis(500));
    // The first usage index write fails: its command has appended its
    // events by then. It fails again when its batch is replayed with a
    // savepoint per command, which undoes that command alone.
    faults::fail_next_usage_index_writes(&path, 2);
    let handles: Vec<_> = members
        .into_iter()
        .map(|member| {
            let ledger = ledger.clone();
            std::thread::spawn(move || ledger.execute(member, keyed(usage(&format!("u-{member}"), 10), member)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1_000));
    other.execute_batch("ROLLBACK").unwrap();
    let warm_up_events = warm_up.join().unwrap().unwrap().outcome.events_appended;
    let results: Vec<_> = handles.into_iter().map(|handle| handle.join().unwrap()).collect();
    assert_eq!(ledger.stats().batches.load(Relaxed) - batches_before, 2, "the grant, then the eight usages");
    let failed: Vec<_> = results.iter().filter(|result| result.is_err()).collect();
    assert_eq!(failed.len(), 1, "{results:?}");
    assert!(failed[0].as_ref().is_err_and(|error| error.is_storage_failure()), "{failed:?}");
    assert_eq!(ledger.stats().replayed_batches.load(Relaxed), 1);
    assert_eq!(head(&path), before + warm_up_events + 2 * 7, "seven usages, and nothing of the failed one");

    // Every member's state agrees with the log, and the failed command's
    // key and usage id were not recorded: its retry applies now.
    let mut available: Vec<i64> =
        members.iter().map(|member| ledger.member_state(member).unwrap().available().0).collect();
    available.sort_unstable();
    assert_eq!(available, vec![990, 990, 990, 990, 990, 990, 990, 1_000]);
    let failed_member = members[results.iter().position(|result| result.is_err()).unwrap()];
    let retried =
        ledger.execute(failed_member, keyed(usage(&format!("u-{failed_member}"), 10), failed_member)).unwrap();
    assert!(!retried.replayed);
    Arc::try_unwrap(ledger).ok().unwrap().shutdown();
    let reopened = Ledger::open(&path, LedgerOptions::default(), clock()).unwrap();
    for member in members {
        assert_eq!(reopened.member_state(member).unwrap().available(), Credits(990), "{member}");
    }
    assert_eq!(
        EventReader::open(&path).unwrap().verify_chain(|_| {}).unwrap().events_checked,
        before + warm_up_events + 16
    );
}

#[test]
fn a_failed_fsync_fails_its_callers_and_stops_the_writer_until_a_restart() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("events.db");
    let ledger = Ledger::open(&path, options(StoreOptions::default()), clock()).unwrap();
    ledger.execute("m", grant(1_000)).unwrap();
    let warm_up = head(&path);
    ledger.execute("m", keyed(usage("u0", 5), "k0")).unwrap();
    let before = head(&path);
    let per_usage = before - warm_up;

    faults::fail_next_wal_syncs(&path, 1);
    let failed = ledger.execute("m", keyed(usage("u1", 5), "k1")).unwrap_err();
    assert!(failed.is_storage_failure());
    assert!(failed.to_string().contains("fsync"), "{failed}");
    // The batch was committed (its frames are in the OS's cache), but
    // nothing after a failed fsync is trusted: every later command is
    // refused without being written, even though the fault has cleared.
    let refused = ledger.execute("m", keyed(usage("u2", 5), "k2")).unwrap_err();
    assert!(refused.to_string().contains("the writer has stopped"), "{refused}");
    assert!(ledger.member_state("m").is_err());
    assert_eq!(head(&path), before + per_usage, "u1 committed, u2 never written");
    // This process's readers (the API's, the projection runner's) never
    // see the batch whose fsync failed.
    let reader = ledger.reader().unwrap();
    assert_eq!(reader.head().unwrap().position, before);
    assert!(reader.read_all(before, 100).unwrap().is_empty());
    drop(ledger);

    // A restart recovers from the file; the retry of k1 gets its original
    // answer, k2 runs now, and the books add up.
    let ledger = Ledger::open(&path, options(StoreOptions::default()), clock()).unwrap();
    let retried = ledger.execute("m", keyed(usage("u1", 5), "k1")).unwrap();
    assert!(retried.replayed);
    assert!(!ledger.execute("m", keyed(usage("u2", 5), "k2")).unwrap().replayed);
    assert_eq!(ledger.member_state("m").unwrap().balance(), Credits(985));
    drop(ledger);
    assert_eq!(EventReader::open(&path).unwrap().verify_chain(|_| {}).unwrap().events_checked, before + 2 * per_usage);
}

#[test]
fn a_retry_is_not_answered_from_a_record_whose_fsync_failed_even_if_its_command_wrote_no_event() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("events.db");
    let ledger = Ledger::open(&path, options(StoreOptions::default()), clock()).unwrap();
    let register = || MemberCommand::Register(MemberProfile::default());
    ledger.execute("m", keyed(register(), "k0")).unwrap();

    // An identical registration writes no event, only its idempotency record
    // (at the head's position, which the last fsync already covered).
    faults::fail_next_wal_syncs(&path, 1);
    assert!(ledger.execute("m", keyed(register(), "k1")).is_err());
    let record = EventReader::open(&path).unwrap().idempotency("admin/m/usage", "k1").unwrap();
    assert!(record.is_some(), "the record was committed");
    assert!(ledger.durable_position() >= record.unwrap().position);
    // Its fsync failed, so the record may not be on disk: no retry is
    // answered from it.
    let retried = ledger.recorded(&Idempotency {
        scope: "admin/m/usage".into(),
        key: "k1".into(),
        fingerprint: fingerprint("k1"),
        status: 201,
    });
    assert!(retried.is_err(), "{retried:?}");
}

#[test]
fn a_catalog_change_whose_fsync_failed_is_never_published() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("events.db");
    let ledger = Ledger::open(&path, options(StoreOptions::default()), clock()).unwrap();
    let mut plans = tally_testkit::strategies::plans().into_iter();
    let publish = |plan| Request::new(CatalogCommand::PublishPlan(plan), "admin");
    let first = plans.next().unwrap();
    ledger.execute_catalog(publish(first.clone())).unwrap();
    assert!(ledger.catalog().plan(&first.plan_id).is_some(), "published once durable");

    faults::fail_next_wal_syncs(&path, 1);
    let second = plans.next().unwrap();
    assert!(ledger.execute_catalog(publish(second.clone())).is_err());
    assert!(ledger.catalog().plan(&second.plan_id).is_none(), "a change that may not be on disk is not served");
}
