//! The runner: rebuilds under concurrent reads, upgrades on start-up,
//! read-your-writes, a log that changed under the read models, ownership.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;
use tally_projections::{
    Balance, Digest, Invoice, PageRequest, ProjectionError, Projections, ReadModel, ReadModels, Subscription,
    builtin_projectors,
};

use crate::support::*;

const MEMBERS: [&str; 3] = ["ann", "ben", "cat"];

/// Three members on Pro for two months, with usage every few hours: a
/// thousand or so events, renewals, rollovers and invoices included.
fn busy_log() -> TestLog {
    let log = TestLog::with_plans(instant(2026, 1, 10, 0, 0), standard_plans());
    for member_id in MEMBERS {
        log.execute(member_id, register("Europe/Paris"));
        log.execute(member_id, start("pro"));
    }
    let mut now = instant(2026, 1, 10, 0, 0);
    for round in 0..180 {
        now += chrono::Duration::hours(8);
        log.at(now);
        for (index, member_id) in MEMBERS.iter().enumerate() {
            let credits = 20 + (round * 7 + index as i64 * 13) % 90;
            log.execute(member_id, usage(&format!("u{round}"), "api.calls", 1 + round % 5, credits, None));
        }
    }
    log
}

fn digests(projections: &Projections) -> Vec<Digest> {
    ReadModel::ALL.iter().map(|read_model| projections.digest(*read_model).expect("a digest")).collect()
}

/// Everything a reader looks at for one member.
#[derive(Clone, Debug, PartialEq)]
struct MemberView {
    balance: Option<Balance>,
    transactions: Vec<i64>,
    usage_days: usize,
    invoices: Vec<Invoice>,
    subscription: Option<Subscription>,
}

fn view(read_models: &ReadModels, member_id: &str) -> Result<MemberView, ProjectionError> {
    let page = PageRequest::first(1_000);
    let from = NaiveDate::from_ymd_opt(2026, 1, 1).expect("a day");
    let to = NaiveDate::from_ymd_opt(2026, 12, 31).expect("a day");
    Ok(MemberView {
        balance: read_models.balance(member_id)?,
        transactions: read_models.transactions(member_id, &page)?.items.iter().map(|row| row.amount).collect(),
        usage_days: read_models.daily_usage(member_id, from, to, &page)?.items.len(),
        invoices: read_models.invoices(member_id, &page)?.items,
        subscription: read_models.subscription(member_id)?,
    })
}

#[test]
fn a_reader_never_sees_an_error_or_a_partial_table_while_rebuilds_swap_generations() {
    let log = busy_log();
    let projections = log.projections_with(
        "rebuilt",
        tally_projections::ProjectionOptions { batch_events_max: 50, build_batch_events_max: 50, ..Default::default() },
        builtin_projectors(),
    );
    projections.catch_up().unwrap();
    let read_models = projections.read_models().clone();
    let expected: Vec<MemberView> = MEMBERS.iter().map(|member_id| view(&read_models, member_id).unwrap()).collect();
    assert!(expected.iter().all(|view| view.transactions.len() > 150 && view.invoices.len() >= 2));
    let digests_before = digests(&projections);
    let generations_before: Vec<Option<u64>> =
        projections.status().unwrap().iter().map(|status| status.generation).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = Arc::clone(&stop);
        let expected = expected.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            let mut problems: Vec<String> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for (member_id, expected) in MEMBERS.iter().zip(&expected) {
                    match view(&read_models, member_id) {
                        Ok(found) if found == *expected => reads += 1,
                        Ok(found) => problems.push(format!("{member_id}: {found:?}")),
                        Err(error) => problems.push(format!("{member_id}: {error}")),
                    }
                }
            }
            (reads, problems)
        })
    };

    let progress_seen = Mutex::new(Vec::new());
    for target in [None, Some("credit_transactions"), Some("invoices"), None] {
        let report = projections
            .rebuild(target, |progress| progress_seen.lock().unwrap().push(progress))
            .expect("the rebuild completes");
        assert_eq!(report.position, log.head());
    }
    stop.store(true, Ordering::SeqCst);
    let (reads, problems) = reader.join().expect("the reader thread");
    assert_eq!(problems, Vec::<String>::new());
    assert!(reads > 0);

    let progress_seen = progress_seen.into_inner().unwrap();
    assert!(progress_seen.len() > 10, "a progress report per batch");
    assert!(progress_seen.iter().all(|progress| progress.events_done <= progress.events_total));
    assert_eq!(progress_seen.last().map(|progress| progress.events_done), Some(log.head()));
    assert_eq!(digests(&projections), digests_before);
    let generations_after: Vec<Option<u64>> =
        projections.status().unwrap().iter().map(|status| status.generation).collect();
    assert!(generations_before.iter().zip(&generations_after).all(|(before, after)| before != after));
}

#[test]
fn rebuilding_beside_the_runner_while_the_ledger_writes_loses_and_repeats_nothing() {
    let log = Arc::new(busy_log());
    let projections = Arc::new(log.projections_with(
        "live",
        tally_projections::ProjectionOptions { batch_events_max: 40, build_batch_events_max: 60, ..Default::default() },
        builtin_projectors(),
    ));
    projections.catch_up().unwrap();
    let runner = projections.start_runner().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut written = 0;
            while !stop.load(Ordering::SeqCst) || written < 50 {
                let member_id = MEMBERS[written % MEMBERS.len()];
                log.execute(member_id, usage(&format!("late{written}"), "rows", 1, 1, None));
                written += 1;
            }
            written
        })
    };
    let reader = {
        let (read_models, stop) = (projections.read_models().clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut seen = [0u64; 3];
            let mut problems = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for (index, member_id) in MEMBERS.iter().enumerate() {
                    match read_models.balance(member_id) {
                        // Rows only ever grow: a smaller count would be a
                        // partial table.
                        Ok(Some(balance)) if balance.transactions >= seen[index] => seen[index] = balance.transactions,
                        other => problems.push(format!("{member_id}: {other:?}")),
                    }
                }
            }
            problems
        })
    };
    projections.rebuild(None, |_| {}).expect("a rebuild beside the runner");
    projections.rebuild(Some("daily_usage"), |_| {}).expect("a second rebuild");
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    assert_eq!(reader.join().unwrap(), Vec::<String>::new());
    assert!(written >= 50);
    projections.wait_for_position(log.head(), Duration::from_secs(10)).expect("the runner catches up");
    runner.stop();
    let reference = log.caught_up("reference");
    assert_eq!(digests(&projections), digests(&reference));
}

#[test]
fn a_new_projector_version_is_rebuilt_on_start_up_while_other_read_models_are_served() {
    let log = busy_log();
    let (digests_v1, balance_v1) = {
        let projections = log.caught_up("upgraded");
        (digests(&projections), projections.balance("ann").unwrap())
    };
    let projectors = projectors_replacing("credits", |inner| Arc::new(Reversioned { inner, version: 2 }));
    let projections = log.projections_with("upgraded", small_batches(), projectors);
    let credits = projections.status().unwrap().into_iter().find(|status| status.name == "credits").unwrap();
    assert_eq!((credits.version, credits.serving), (2, false));
    assert!(credits.build.is_some());
    assert!(matches!(projections.balance("ann"), Err(ProjectionError::NotReady { .. })));
    assert!(matches!(
        projections.wait_for(&[ReadModel::CreditBalances], log.head(), Duration::from_millis(1)),
        Err(ProjectionError::Lagging { .. }) | Ok(())
    ));
    assert!(projections.subscription("ann").unwrap().is_some(), "other read models are served meanwhile");

    let runner = projections.start_runner().unwrap();
    projections.wait_for(&[ReadModel::CreditBalances], log.head(), Duration::from_secs(20)).expect("the upgrade ends");
    runner.stop();
    assert_eq!(projections.balance("ann").unwrap(), balance_v1);
    assert_eq!(digests(&projections), digests_v1);
    let credits = projections.status().unwrap().into_iter().find(|status| status.name == "credits").unwrap();
    assert_eq!((credits.version, credits.serving, credits.build), (2, true, None));
}

#[test]
fn read_models_never_apply_a_batch_whose_fsync_failed() {
    use tally_ledger::store::{EventReader, faults};
    let log = TestLog::with_plans(instant(2026, 2, 1, 0, 0), standard_plans());
    log.execute("ann", register("UTC"));
    log.execute("ann", start("starter"));
    let projections = log.projections("durable");
    projections.hide_unsynced(log.ledger.visible_head());
    assert_eq!(projections.catch_up().unwrap().position, log.head());
    let durable = log.head();
    let balance = projections.balance("ann").unwrap();

    // The batch commits (other connections can read it) but its fsync fails.
    faults::fail_next_wal_syncs(&log.events_path(), 1);
    assert!(log.try_execute("ann", usage("u1", "api.calls", 1, 10, None)).is_err());
    let in_the_file = EventReader::open(&log.events_path()).unwrap().head().unwrap().position;
    assert!(in_the_file > durable);
    assert_eq!(log.head(), durable, "the ledger's own readers hide it");

    assert_eq!(projections.catch_up().unwrap().position, durable);
    assert_eq!(projections.balance("ann").unwrap(), balance, "nothing of the batch was applied");
    // Read models of another process (no visible head) do read it.
    let elsewhere = log.caught_up("elsewhere");
    assert_ne!(elsewhere.balance("ann").unwrap(), balance);
}

#[test]
fn read_your_writes_waits_for_the_position_of_a_write() {
    let log = TestLog::with_plans(instant(2026, 2, 1, 0, 0), standard_plans());
    log.execute("ann", register("UTC"));
    let projections = log.projections("ryw");

    // Without a runner, the waiting caller applies the events itself.
    let executed = log.execute("ann", start("starter"));
    projections.wait_for_position(executed.outcome.position, Duration::from_secs(2)).unwrap();
    assert_eq!(projections.balance("ann").unwrap().map(|balance| balance.available), Some(1_000));

    let runner = projections.start_runner().unwrap();
    for round in 0..20 {
        let executed = log.execute("ann", usage(&format!("u{round}"), "api.calls", 1, 10, None));
        projections.notify();
        projections.wait_for_position(executed.outcome.position, tally_projections::WAIT_FOR_POSITION_DEFAULT).unwrap();
        assert_eq!(projections.balance("ann").unwrap().map(|balance| balance.available), Some(990 - round * 10));
    }
    assert!(matches!(
        projections.wait_for_position(log.head() + 1, Duration::from_secs(2)),
        Err(ProjectionError::PositionBeyondHead { position, head }) if position == head + 1
    ));
    runner.stop();
}

#[test]
fn a_read_model_that_cannot_progress_answers_lagging_and_the_others_keep_up() {
    let log = TestLog::with_plans(instant(2026, 2, 1, 0, 0), standard_plans());
    log.execute("ann", register("UTC"));
    log.execute("ann", start("starter"));
    let projectors = projectors_replacing("credits", |inner| Arc::new(CrashingAt { inner, position: 1 }));
    let projections = log.projections_with("stuck", small_batches(), projectors);
    let runner = projections.start_runner().unwrap();
    let head = log.head();
    let lagging = projections.wait_for(&[ReadModel::CreditBalances], head, Duration::from_millis(300));
    assert!(
        matches!(lagging, Err(ProjectionError::Lagging { position, reached: 0 }) if position == head),
        "{lagging:?}"
    );
    projections
        .wait_for(
            &[ReadModel::Subscriptions, ReadModel::Invoices, ReadModel::DailyUsageStats],
            head,
            Duration::from_secs(2),
        )
        .expect("the other read models are not held back");
    assert!(projections.subscription("ann").unwrap().is_some());
    for status in projections.status().unwrap() {
        if status.name == "credits" {
            assert!(!status.serving);
            assert!(status.last_error.is_some_and(|error| error.contains("simulated crash")));
        } else {
            assert!(status.serving && status.last_error.is_none(), "{status:?}");
        }
    }
    runner.stop();
    drop(projections);

    let fixed = log.projections("stuck");
    fixed.wait_for_position(head, Duration::from_secs(2)).unwrap();
    assert!(fixed.balance("ann").unwrap().is_some());
}

#[test]
fn read_models_built_from_another_log_are_rebuilt_at_start_up() {
    let first = busy_log();
    let second = TestLog::with_plans(instant(2026, 1, 10, 0, 0), standard_plans());
    second.execute("zed", register("UTC"));
    second.execute("zed", start("starter"));
    let shared_path = first.projections_path("moved");
    {
        let projections = first.caught_up("moved");
        assert!(projections.balance("ann").unwrap().is_some());
    }
    let projections =
        Projections::open_with(&shared_path, &second.events_path(), small_batches(), builtin_projectors()).unwrap();
    assert!(projections.status().unwrap().iter().all(|status| !status.serving));
    projections.catch_up().unwrap();
    assert_eq!(projections.balance("ann").unwrap(), None);
    assert!(projections.balance("zed").unwrap().is_some());
    assert_eq!(digests(&projections), digests(&second.caught_up("reference")));
}

#[test]
fn a_failed_rebuild_is_dropped_and_the_live_generation_kept() {
    let log = busy_log();
    let head = log.head();
    let before = {
        let projections = log.caught_up("failed_rebuild");
        digests(&projections)
    };
    let projectors = projectors_replacing("invoices", |inner| Arc::new(CrashingAt { inner, position: head / 2 }));
    let crashing = log.projections_with("failed_rebuild", small_batches(), projectors);
    let failure = crashing.rebuild(Some("invoices"), |_| {});
    assert!(matches!(failure, Err(ProjectionError::ProjectorFailed { .. })), "{failure:?}");
    let status = crashing.status().unwrap();
    assert!(status.iter().all(|status| status.build.is_none() && status.serving), "{status:?}");
    assert_eq!(digests(&crashing), before, "the live generations are untouched");
}

#[test]
fn a_rebuild_cut_short_by_a_crash_is_dropped_at_the_next_start() {
    let log = busy_log();
    let head = log.head();
    let before = {
        let projections = log.caught_up("cut_short");
        digests(&projections)
    };
    let projectors = projectors_replacing("credits", |inner| Arc::new(PanickingAt { inner, position: head / 2 }));
    let panicking = log.projections_with("cut_short", small_batches(), projectors);
    let crash = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| panicking.rebuild(None, |_| {})));
    assert!(crash.is_err(), "the rebuild died mid-batch");
    drop(panicking);

    let reopened = log.projections("cut_short");
    let status = reopened.status().unwrap();
    assert!(status.iter().all(|status| status.build.is_none() && status.serving), "{status:?}");
    assert_eq!(digests(&reopened), before);
    reopened.rebuild(None, |_| {}).unwrap();
    assert_eq!(digests(&reopened), before);
}

#[test]
fn one_process_owns_a_projections_file_and_others_may_read_it() {
    let log = TestLog::with_plans(instant(2026, 2, 1, 0, 0), standard_plans());
    log.execute("ann", register("UTC"));
    let owner = log.caught_up("owned");
    let second = Projections::open(&log.projections_path("owned"), &log.events_path());
    assert!(matches!(second, Err(ProjectionError::Locked { .. })));
    let reader = ReadModels::open(&log.projections_path("owned")).unwrap();
    assert_eq!(reader.balance("ann").unwrap(), owner.balance("ann").unwrap());
    assert_eq!(reader.status().unwrap().len(), builtin_projectors().len());
    assert!(matches!(owner.rebuild(Some("nope"), |_| {}), Err(ProjectionError::UnknownProjector { .. })));

    let foreign = Projections::open(&log.events_path(), &log.events_path());
    assert!(matches!(foreign, Err(ProjectionError::Foreign { .. })), "an event log is not a projections file");
}

#[test]
fn transaction_cursors_stay_valid_while_rows_are_appended() {
    let log = TestLog::with_plans(instant(2026, 2, 1, 0, 0), standard_plans());
    log.execute("ann", register("UTC"));
    log.execute("ann", start("pro"));
    for round in 0..4 {
        log.execute("ann", usage(&format!("u{round}"), "api.calls", 1, 1, None));
    }
    let projections = log.caught_up("cursors");
    let first = projections.transactions("ann", &PageRequest::first(3)).unwrap();
    let cursor = first.next_cursor.clone().expect("more rows");
    for round in 4..8 {
        log.execute("ann", usage(&format!("u{round}"), "api.calls", 1, 1, None));
    }
    projections.catch_up().unwrap();
    let rest = projections
        .transactions("ann", &PageRequest::after(cursor, 100, tally_projections::Order::OldestFirst))
        .unwrap();
    let sequences: Vec<u64> = first.items.iter().chain(&rest.items).map(|row| row.seq).collect();
    assert_eq!(sequences, (1..=9).collect::<Vec<u64>>());
    assert_eq!(rest.next_cursor, None);
}
