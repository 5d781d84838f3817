//! The `Ledger` service on real SQLite files: group commit, answers only
//! after the fsync beside the writer, idempotency, rejections that write
//! nothing, a second writer on the same file, the scheduler sweep, and
//! restarts.

use chrono::{DateTime, Duration, TimeZone, Utc};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tally_ledger::domain::*;
use tally_ledger::service::{BalanceView, Idempotency};
use tally_ledger::store::EventReader;
use tally_ledger::{Ledger, LedgerError, LedgerOptions, ManualClock, Request};
use tempfile::TempDir;

fn start_instant() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

fn open(dir: &TempDir, clock: &Arc<ManualClock>) -> Ledger {
    Ledger::open(&dir.path().join("events.db"), LedgerOptions::default(), clock.clone()).unwrap()
}

fn starter_plan() -> Plan {
    Plan {
        plan_id: "starter".into(),
        name: "Starter".into(),
        price: MinorUnits(1_000),
        currency: "USD".into(),
        interval: Interval::Month,
        monthly_credits: Credits(1_000),
        rollover: Rollover { enabled: true, max_credits: Credits(500) },
        overage: Overage { allowed: false, limit_credits: Credits(0), unit_price: MinorUnits(0) },
        rate_limit_per_minute: 600,
        stripe_price_id: None,
    }
}

fn admin<C>(command: C) -> Request<C> {
    Request::new(command, "admin")
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

fn promo(amount: i64) -> MemberCommand {
    MemberCommand::GrantCredits(GrantCredits::new(GrantSource::Promotional, amount))
}

fn head(ledger: &Ledger) -> u64 {
    ledger.reader().unwrap().head().unwrap().position
}

fn key(scope: &str, key: &str, fingerprint: u8) -> Idempotency {
    Idempotency { scope: scope.into(), key: key.into(), fingerprint: [fingerprint; 32], status: 201 }
}

#[test]
fn concurrent_submitters_share_batches_and_every_command_lands_once() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = Arc::new(open(&dir, &clock));
    for member in 0..8 {
        ledger.execute(&format!("m{member}"), admin(promo(10_000))).unwrap();
    }
    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let ledger = Arc::clone(&ledger);
            std::thread::spawn(move || {
                for index in 0..100 {
                    let member = format!("m{}", (thread + index) % 8);
                    ledger.execute(&member, admin(usage(&format!("t{thread}-{index}"), 3))).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // 8 members × (registration + grant) + 800 usages × 2 events.
    assert_eq!(head(&ledger), 16 + 1_600);
    let total: i64 = (0..8).map(|member| ledger.member_state(&format!("m{member}")).unwrap().balance().0).sum();
    assert_eq!(total, 8 * 10_000 - 800 * 3);
    let report = ledger.reader().unwrap().verify_chain(|_| {}).unwrap();
    assert_eq!(report.events_checked, 1_616);
}

#[test]
fn a_rejection_writes_nothing_and_names_its_code() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &clock);
    ledger.execute("m1", admin(promo(10))).unwrap();
    let before = head(&ledger);
    let error = ledger.execute("m1", admin(usage("u1", 11))).unwrap_err();
    assert!(
        matches!(&error, LedgerError::Rejected(DomainError::InsufficientCredits { requested, available }) if *requested == Credits(11) && *available == Credits(10)),
        "{error:?}"
    );
    let error = ledger.execute("nobody", admin(usage("u1", 1))).unwrap_err();
    assert!(matches!(error, LedgerError::Rejected(DomainError::MemberNotFound { .. })));
    let error = ledger.execute("bad id!", admin(promo(1))).unwrap_err();
    assert!(matches!(error, LedgerError::Rejected(DomainError::Validation { field: "member_id", .. })));
    assert_eq!(head(&ledger), before);
}

#[test]
fn a_rejected_command_does_not_write_the_time_effects_its_decision_ran() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &clock);
    let mut grant = GrantCredits::new(GrantSource::Promotional, 10);
    grant.expires_at = Some(start_instant() + Duration::hours(1));
    ledger.execute("m1", admin(MemberCommand::GrantCredits(grant))).unwrap();
    let before = head(&ledger);
    clock.advance_to(start_instant() + Duration::hours(2));
    assert!(ledger.execute("m1", admin(usage("u1", 5))).is_err());
    assert_eq!(head(&ledger), before, "the expiry is written by the next accepted command or sweep");
    let report = ledger.run_due().unwrap();
    assert_eq!((report.members, report.events), (1, 1));
    assert_eq!(head(&ledger), before + 1);
}

#[test]
fn idempotent_retries_return_the_original_outcome_and_reuse_is_refused() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &clock);
    ledger.execute("m1", admin(promo(100))).unwrap();
    let first = ledger.execute("m1", admin(usage("u1", 7)).with_idempotency(key("admin/m1/usage", "k1", 1))).unwrap();
    assert!(!first.replayed);
    assert_eq!(first.status, 201);
    let position = head(&ledger);
    let again = ledger.execute("m1", admin(usage("u1", 7)).with_idempotency(key("admin/m1/usage", "k1", 1))).unwrap();
    assert!(again.replayed);
    assert_eq!(again.outcome, first.outcome);
    assert_eq!(head(&ledger), position);
    let error =
        ledger.execute("m1", admin(usage("u2", 8)).with_idempotency(key("admin/m1/usage", "k1", 2))).unwrap_err();
    assert!(matches!(error, LedgerError::IdempotencyKeyReused));
    // The same key in another scope is another key.
    let other = ledger.execute("m1", admin(usage("u3", 1)).with_idempotency(key("admin/m1/check", "k1", 2))).unwrap();
    assert!(!other.replayed);
    assert_eq!(
        other.outcome.balance,
        Some(BalanceView { balance: Credits(92), available: Credits(92), held: Credits(0), debt: Credits(0) })
    );
    // A rejection records nothing, so the key can succeed later.
    assert!(ledger.execute("m1", admin(usage("u4", 1_000)).with_idempotency(key("s", "k9", 3))).is_err());
    ledger.execute("m1", admin(promo(1_000))).unwrap();
    assert!(!ledger.execute("m1", admin(usage("u4", 1_000)).with_idempotency(key("s", "k9", 3))).unwrap().replayed);
}

#[test]
fn usage_ids_are_unique_for_ever_through_the_store_index() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &clock);
    ledger.execute("m1", admin(promo(100))).unwrap();
    ledger.execute("m1", admin(usage("u1", 5))).unwrap();
    drop(ledger);
    let ledger = open(&dir, &clock);
    let error = ledger.execute("m1", admin(usage("u1", 5))).unwrap_err();
    assert!(matches!(error, LedgerError::Rejected(DomainError::Validation { field: "usage_id", .. })));
    ledger.execute("m1", admin(MemberCommand::ReverseUsage { usage_id: "u1".into(), reason: None })).unwrap();
    let error =
        ledger.execute("m1", admin(MemberCommand::ReverseUsage { usage_id: "u1".into(), reason: None })).unwrap_err();
    assert!(matches!(error, LedgerError::Rejected(DomainError::Validation { field: "usage_id", .. })));
    // Another member may use the same id.
    ledger.execute("m2", admin(promo(10))).unwrap();
    ledger.execute("m2", admin(usage("u1", 5))).unwrap();
}

#[test]
fn a_second_writer_on_the_same_file_makes_the_first_reload_instead_of_deciding_on_stale_state() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let server = open(&dir, &clock);
    let cli = open(&dir, &clock);
    server.execute("m1", admin(promo(100))).unwrap();
    server.execute("m1", admin(usage("u1", 10))).unwrap(); // the server caches m1 at 90
    cli.execute("m1", admin(MemberCommand::DebitCredits { amount: Credits(85), reason: "refund issued".into() }))
        .unwrap();
    // The server's cache says 90 available; the log says 5.
    let error = server.execute("m1", admin(usage("u2", 10))).unwrap_err();
    assert!(
        matches!(error, LedgerError::Rejected(DomainError::InsufficientCredits { available, .. }) if available == Credits(5)),
        "{error:?}"
    );
    server.execute("m1", admin(usage("u3", 5))).unwrap();
    assert_eq!(cli.member_state("m1").unwrap().balance(), Credits(0));
    // And a rejection is never decided on stale state: the server's cache
    // says 0 available, the CLI has just granted 100.
    cli.execute("m1", admin(promo(100))).unwrap();
    server.execute("m1", admin(usage("u4", 60))).unwrap();
    assert!(server.check("m1", Credits(40)).unwrap().allowed);
    assert!(server.reader().unwrap().verify_chain(|_| {}).is_ok());
}

#[test]
fn the_sweep_renews_every_due_member_and_restarts_see_the_same_state() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &clock);
    ledger.execute_catalog(admin(CatalogCommand::PublishPlan(starter_plan()))).unwrap();
    for member in ["a", "b", "c"] {
        ledger
            .execute(
                member,
                admin(MemberCommand::StartSubscription {
                    plan_id: "starter".into(),
                    billing: Billing::Tally,
                    stripe_subscription_id: None,
                }),
            )
            .unwrap();
    }
    ledger.execute("a", admin(usage("u1", 800))).unwrap();
    assert_eq!(ledger.run_due().unwrap().members, 0);
    clock.advance_to(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap());
    let report = ledger.run_due().unwrap();
    assert_eq!(report.members, 3);
    assert_eq!(ledger.member_state("a").unwrap().available(), Credits(1_200), "200 rolled over + 1,000 new");
    assert_eq!(ledger.member_state("b").unwrap().available(), Credits(1_500), "500 rolled over (the cap) + 1,000 new");
    assert_eq!(ledger.run_due().unwrap().members, 0, "nothing is due twice");
    let states: Vec<MemberState> = ["a", "b", "c"].iter().map(|member| ledger.member_state(member).unwrap()).collect();
    drop(ledger);

    let reopened = open(&dir, &clock);
    let replayed: Vec<MemberState> =
        ["a", "b", "c"].iter().map(|member| reopened.member_state(member).unwrap()).collect();
    assert_eq!(replayed, states);
    assert_eq!(reopened.catalog().plan("starter").unwrap().terms.plan, starter_plan());
    let events = EventReader::open(&dir.path().join("events.db")).unwrap().read_all(0, 100).unwrap();
    let renewal = events.iter().find(|event| event.event_type == "SubscriptionRenewed").unwrap();
    assert_eq!(renewal.metadata.actor, "scheduler");
    assert_eq!(renewal.metadata.occurred_at, Some(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap()));
}

#[test]
fn a_clock_that_steps_back_never_rejects_commands() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant() + Duration::days(10)));
    let ledger = open(&dir, &clock);
    let mut grant = GrantCredits::new(GrantSource::Promotional, 10);
    grant.expires_at = Some(start_instant() + Duration::days(10) + Duration::hours(1));
    ledger.execute("m1", admin(MemberCommand::GrantCredits(grant))).unwrap();
    drop(ledger);
    // A restart with a clock behind the log's last `now` still decides at the later instant.
    let behind = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &behind);
    ledger.execute("m1", admin(usage("u1", 3))).unwrap();
    let events = ledger.reader().unwrap().read_all(0, 10).unwrap();
    assert!(events.windows(2).all(|pair| pair[0].recorded_at <= pair[1].recorded_at));
    assert_eq!(events.last().unwrap().metadata.occurred_at, Some(start_instant() + Duration::days(10)));
}

#[test]
fn check_answers_from_the_writer_and_writes_nothing() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &clock);
    ledger.execute("m1", admin(promo(50))).unwrap();
    let before = head(&ledger);
    let outcome = ledger.check("m1", Credits(60)).unwrap();
    assert_eq!((outcome.allowed, outcome.available), (false, Credits(50)));
    assert!(ledger.check("m1", Credits(50)).unwrap().allowed);
    assert!(matches!(ledger.check("m2", Credits(1)), Err(LedgerError::Rejected(DomainError::MemberNotFound { .. }))));
    assert_eq!(head(&ledger), before);
}

#[test]
fn a_catalog_changed_by_another_process_is_reloaded_before_deciding() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let server = open(&dir, &clock);
    let cli = open(&dir, &clock);
    server.execute_catalog(admin(CatalogCommand::PublishPlan(starter_plan()))).unwrap();
    let mut pro = starter_plan();
    pro.plan_id = "pro".into();
    cli.execute_catalog(admin(CatalogCommand::PublishPlan(pro.clone()))).unwrap();
    // The server's catalog is stale: it must see "pro" and refuse a second publish.
    let error = server.execute_catalog(admin(CatalogCommand::PublishPlan(pro))).unwrap_err();
    assert!(matches!(error, LedgerError::Rejected(DomainError::PlanAlreadyExists { .. })), "{error:?}");
    let mut team = starter_plan();
    team.plan_id = "team".into();
    server.execute_catalog(admin(CatalogCommand::PublishPlan(team))).unwrap();
    assert_eq!(server.catalog().plans.len(), 3);
}

#[test]
fn catalog_commands_are_decided_and_published_to_readers() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &clock);
    ledger.execute_catalog(admin(CatalogCommand::PublishPlan(starter_plan()))).unwrap();
    let error = ledger.execute_catalog(admin(CatalogCommand::PublishPlan(starter_plan()))).unwrap_err();
    assert!(matches!(error, LedgerError::Rejected(DomainError::PlanAlreadyExists { .. })));
    let mut revised = starter_plan();
    revised.monthly_credits = Credits(1_200);
    ledger.execute_catalog(admin(CatalogCommand::RevisePlan(revised))).unwrap();
    let entry = ledger.catalog().plan("starter").cloned().unwrap();
    assert_eq!((entry.terms.plan_version, entry.terms.plan.monthly_credits), (2, Credits(1_200)));
    let mut bad = starter_plan();
    bad.plan_id = "cheap".into();
    bad.price = MinorUnits(-1);
    let error = ledger.execute_catalog(admin(CatalogCommand::PublishPlan(bad))).unwrap_err();
    assert!(matches!(error, LedgerError::Rejected(DomainError::Validation { field: "price", .. })));
}

#[test]
fn an_imported_log_keeps_usage_ids_unique_and_renews_on_time() {
    let source = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&source, &clock);
    ledger.execute_catalog(admin(CatalogCommand::PublishPlan(starter_plan()))).unwrap();
    let start = MemberCommand::StartSubscription {
        plan_id: "starter".into(),
        billing: Billing::Tally,
        stripe_subscription_id: None,
    };
    ledger.execute("a", admin(start)).unwrap();
    ledger.execute("a", admin(usage("u1", 100))).unwrap();
    ledger.execute("a", admin(usage("u2", 50))).unwrap();
    ledger.execute("a", admin(MemberCommand::ReverseUsage { usage_id: "u2".into(), reason: None })).unwrap();
    let exported = ledger.reader().unwrap().read_all(0, 100).unwrap();
    drop(ledger);

    let target = TempDir::new().unwrap();
    let mut store =
        tally_ledger::store::EventStore::open(&target.path().join("events.db"), Default::default()).unwrap();
    let mut import = tally_ledger::import::Import::begin(&mut store).unwrap();
    for event in &exported {
        import.add(event).unwrap();
    }
    let report = import.commit().unwrap();
    assert_eq!((report.appended, report.already_present), (exported.len() as u64, 0));
    assert_eq!(report.head.hash, exported.last().unwrap().hash);
    drop(store);

    let imported = open(&target, &clock);
    let error = imported.execute("a", admin(usage("u1", 5))).unwrap_err();
    assert!(matches!(error, LedgerError::Rejected(DomainError::Validation { field: "usage_id", .. })), "{error:?}");
    let error =
        imported.execute("a", admin(MemberCommand::ReverseUsage { usage_id: "u2".into(), reason: None })).unwrap_err();
    assert!(matches!(error, LedgerError::Rejected(DomainError::Validation { field: "usage_id", .. })), "{error:?}");
    clock.advance_to(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap());
    assert_eq!(imported.run_due().unwrap().members, 1, "the imported member is on the schedule");
    assert_eq!(
        imported.member_state("a").unwrap().available(),
        Credits(1_550),
        "rolled 500 (the cap) + 1,000 new + the 50 refunded"
    );
}

fn snapshot_row(path: &std::path::Path) -> Option<(u64, String)> {
    let connection = rusqlite::Connection::open(path).unwrap();
    connection
        .query_row("SELECT version, state FROM snapshots WHERE stream_id = 'member-m'", [], |row| {
            Ok((row.get::<_, i64>(0)? as u64, row.get(1)?))
        })
        .ok()
}

fn raw_execute(path: &std::path::Path, sql: &str) {
    rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap();
}

#[test]
fn a_member_loads_from_its_snapshot_and_a_snapshot_that_does_not_fit_the_log_is_passed_over() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("events.db");
    let clock = Arc::new(ManualClock::new(start_instant()));
    let options = LedgerOptions { snapshot_every: 10, ..LedgerOptions::default() };
    let ledger = Ledger::open(&path, options, clock.clone()).unwrap();
    ledger.execute("m", admin(promo(1_000))).unwrap();
    for index in 0..12 {
        ledger.execute("m", admin(usage(&format!("u{index}"), 1))).unwrap();
    }
    let live = ledger.member_state("m").unwrap();
    drop(ledger);
    let (version, _) = snapshot_row(&path).expect("a snapshot was taken on the way");
    assert!(version >= 20 && version <= live.version, "snapshot at {version}, stream at {}", live.version);

    let reopen = |options: LedgerOptions| {
        let ledger = Ledger::open(&path, options, clock.clone()).unwrap();
        let state = ledger.member_state("m").unwrap();
        drop(ledger);
        state
    };
    assert_eq!(reopen(options), live, "snapshot + the events after it");

    // The snapshot is what a load starts from (a cache trusted while it
    // fits the log): an edited one shows through ...
    raw_execute(&path, "UPDATE snapshots SET state = json_set(state, '$.invoices_issued', 77)");
    assert_eq!(reopen(options).invoices_issued, 77);
    // ... until it no longer matches the hash of the event it was taken at,
    raw_execute(&path, "UPDATE snapshots SET hash = zeroblob(32)");
    assert_eq!(reopen(options), live, "a snapshot whose event hash differs is passed over");
    // or does not read, or is of another format;
    raw_execute(
        &path,
        "UPDATE snapshots SET hash = (SELECT hash FROM events e WHERE e.stream_id = snapshots.stream_id AND e.version = snapshots.version), state = 'not json'",
    );
    assert_eq!(reopen(options), live, "a snapshot that does not read is passed over");
    raw_execute(&path, "UPDATE snapshots SET format = 999");
    assert_eq!(reopen(options), live, "a snapshot of another format is passed over");
    // and with snapshots off the whole stream is replayed.
    raw_execute(&path, "UPDATE snapshots SET format = 1, state = json_set(state, '$.invoices_issued', 77)");
    assert_eq!(reopen(LedgerOptions { snapshot_every: 0, ..options }), live);

    // A load that replayed at least `snapshot_every` events leaves one behind.
    raw_execute(&path, "DELETE FROM snapshots");
    assert_eq!(reopen(options), live);
    let (version, state) = snapshot_row(&path).expect("the load took a snapshot");
    assert_eq!(version, live.version);
    assert_eq!(serde_json::from_str::<MemberState>(&state).unwrap(), live);
}

#[test]
fn a_due_row_that_went_missing_is_written_again_by_the_members_next_command() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("events.db");
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &clock);
    let mut grant = GrantCredits::new(GrantSource::Promotional, 100);
    grant.expires_at = Some(start_instant() + Duration::days(30));
    ledger.execute("m", admin(MemberCommand::GrantCredits(grant))).unwrap();
    let due = |path: &std::path::Path| -> Option<String> {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("SELECT due_at FROM schedule WHERE stream_id = 'member-m'", [], |row| row.get(0))
            .ok()
    };
    let expected = due(&path).expect("the grant's expiry is scheduled");
    raw_execute(&path, "DELETE FROM schedule");

    // The usage does not move the due instant; the row comes back all the same.
    ledger.execute("m", admin(usage("u1", 1))).unwrap();
    assert_eq!(due(&path), Some(expected));
}

#[test]
fn every_answer_arrives_after_an_fsync_that_covers_it() {
    let dir = TempDir::new().unwrap();
    // Default options: synchronous=FULL, so the syncer really fsyncs.
    let ledger = Arc::new(open(&dir, &Arc::new(ManualClock::new(start_instant()))));
    let threads: Vec<_> = (0..16)
        .map(|thread| {
            let ledger = Arc::clone(&ledger);
            std::thread::spawn(move || {
                let member = format!("m{}", thread % 4);
                ledger.execute(&member, admin(promo(1_000))).unwrap();
                for step in 0..40 {
                    let executed = ledger.execute(&member, admin(usage(&format!("u{thread}.{step}"), 1))).unwrap();
                    let durable = ledger.durable_position();
                    assert!(
                        executed.outcome.position <= durable,
                        "answered position {} before the fsync reached it ({durable})",
                        executed.outcome.position
                    );
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|thread| thread.join().unwrap());
    let stats = ledger.stats();
    let (syncs, batches) = (stats.syncs.load(Relaxed), stats.batches.load(Relaxed));
    assert!(syncs >= 1 && syncs <= batches, "{syncs} fsyncs for {batches} batches");
    let in_the_file = EventReader::open(&dir.path().join("events.db")).unwrap().head().unwrap().position;
    assert_eq!(ledger.durable_position(), in_the_file);
}

#[test]
fn an_idempotent_retry_read_from_the_file_waits_for_the_fsync_of_a_commit_it_did_not_sync() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    // `reading` serves retries from the file; `writing` (a second process's
    // ledger, as the CLI beside a server) commits the original after
    // `reading` opened, so `reading` has not synced it.
    let reading = open(&dir, &clock);
    let writing = open(&dir, &clock);
    writing.execute("m", admin(promo(100))).unwrap();
    let keyed = key("admin/m/usage", "k1", 1);
    let original = writing.execute("m", admin(usage("u1", 7)).with_idempotency(keyed.clone())).unwrap();
    assert!(original.outcome.position > reading.durable_position());
    let syncs_before = reading.stats().syncs.load(Relaxed);

    let retried = reading.recorded(&keyed).unwrap().expect("the record is found");
    assert!(retried.replayed);
    assert_eq!(retried.outcome, original.outcome);
    assert_eq!(reading.stats().syncs.load(Relaxed), syncs_before + 1, "the retry waited for an fsync");
    assert!(reading.recorded(&key("admin/m/usage", "k2", 1)).unwrap().is_none());
}

#[test]
fn an_integration_lives_in_its_own_stream_and_its_commands_are_idempotent() {
    let dir = TempDir::new().unwrap();
    let clock = Arc::new(ManualClock::new(start_instant()));
    let ledger = open(&dir, &clock);
    let put = || IntegrationCommand::Put {
        provider: "rest".into(),
        name: "Weather".into(),
        config: serde_json::json!({"base_url": "https://api.example.com"}),
        credential: Some(CredentialRef {
            credential_id: "c1".into(),
            version: 1,
            fingerprint: "00112233aabbccdd".into(),
            hint: None,
        }),
    };
    // No member, no integration: refused, nothing written.
    let before = head(&ledger);
    let refused = ledger.execute_integration("acme", "weather", admin(put())).unwrap_err();
    assert!(matches!(refused, LedgerError::Rejected(DomainError::MemberNotFound { .. })), "{refused}");
    assert_eq!(head(&ledger), before);

    ledger.execute("acme", admin(MemberCommand::Register(MemberProfile::default()))).unwrap();
    let member_version = ledger.member_state("acme").unwrap().version;
    let request = || admin(put()).with_idempotency(key("acme/integrations.put", "k1", 1));
    let first = ledger.execute_integration("acme", "weather", request()).unwrap();
    assert_eq!(first.outcome.stream_id, "integration-acme/weather");
    assert_eq!(first.outcome.events_appended, 1);
    let again = ledger.execute_integration("acme", "weather", request()).unwrap();
    assert!(again.replayed);
    assert_eq!(again.outcome.position, first.outcome.position);
    // Unchanged: no event. The member stream is untouched throughout.
    assert_eq!(ledger.execute_integration("acme", "weather", admin(put())).unwrap().outcome.events_appended, 0);
    assert_eq!(ledger.member_state("acme").unwrap().version, member_version);

    let state = ledger.integration_state("acme", "weather").unwrap();
    assert!(state.live);
    assert_eq!((state.provider.as_str(), state.credential.as_ref().map(|c| c.version)), ("rest", Some(1)));
    ledger
        .execute_integration(
            "acme",
            "weather",
            admin(IntegrationCommand::SaveQuery {
                query_id: "forecast".into(),
                spec: serde_json::json!({"kind": "request"}),
            }),
        )
        .unwrap();
    let missing = ledger.execute_integration("acme", "other", admin(IntegrationCommand::Remove)).unwrap_err();
    assert_eq!(missing.to_string(), "integration `other` of member `acme` not found");
    assert_eq!(ledger.integration_state("acme", "weather").unwrap().queries.len(), 1);
}
