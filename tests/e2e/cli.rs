//! The operator and auditor commands through the real binary: export and
//! import, audit verify on a sound and on a tampered log, audit replay
//! against the reference model, rebuilds beside a serving server, renew, and
//! bad input.

use crate::support::*;
use chrono::{DateTime, TimeZone, Utc};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tally_ledger::domain::*;
use tally_ledger::{Ledger, LedgerOptions, ManualClock, Request};
use tally_testkit::strategies::{self, RETIRED_PLAN_IDS, Scenario};
use tally_testkit::{Model, resolve_reservation_ref};
use tempfile::TempDir;

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `tally --data-dir DIR ARGS…` without an admin key in its environment.
fn tally(data_dir: &Path, args: &[&str]) -> Run {
    tally_with(data_dir, args, &[], None)
}

fn tally_with(data_dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Run {
    let mut command = Command::new(tally_binary());
    command.arg("--data-dir").arg(data_dir).args(args).env_remove("TALLY_ADMIN_KEY").env_remove("TALLY_LOG");
    for (name, value) in env {
        command.env(name, value);
    }
    command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("tally starts");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    }
    let output = child.wait_with_output().expect("tally runs");
    Run {
        code: output.status.code().expect("an exit code"),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

/// The last line of stderr, which must be the only `error:` line.
fn one_line_error(run: &Run) -> &str {
    let errors: Vec<&str> = run.stderr.lines().filter(|line| line.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line in {:?}", run.stderr);
    errors[0]
}

fn model() -> Model {
    let mut model = Model::new(strategies::plans());
    for plan_id in RETIRED_PLAN_IDS {
        model.retire_plan(plan_id);
    }
    model
}

/// A generated scenario (fixed seed) long enough to renew and expire things.
fn scenario() -> Scenario {
    let mut runner = TestRunner::deterministic();
    loop {
        let scenario = strategies::scenario().new_tree(&mut runner).expect("a scenario").current();
        let span = scenario.timeline().last().map(|(at, _)| *at - scenario.start).unwrap_or_default();
        if scenario.steps.len() >= 40 && span.num_days() >= 35 {
            return scenario;
        }
    }
}

/// A moment of the history: its instant and the model's books then.
struct Moment {
    at: DateTime<Utc>,
    model: Model,
}

/// Writes `scenario` into `<dir>/events.db` through the ledger on a manual
/// clock, with the reference model beside it, and keeps the model as it was
/// at every instant no later step shares. The scheduler never runs, so the
/// log lacks the effects of time that fell due between commands: a replay
/// has to decide them itself.
fn write_history(dir: &Path, scenario: &Scenario) -> Vec<Moment> {
    let clock = Arc::new(ManualClock::new(scenario.start));
    let mut options = LedgerOptions::default();
    options.store.synchronous_full = false;
    let ledger = Ledger::open(&dir.join("events.db"), options, clock.clone()).expect("ledger opens");
    for plan in strategies::plans() {
        ledger.execute_catalog(Request::new(CatalogCommand::PublishPlan(plan), "admin")).expect("plan");
    }
    for plan_id in RETIRED_PLAN_IDS {
        let retire = CatalogCommand::RetirePlan { plan_id: plan_id.to_string() };
        ledger.execute_catalog(Request::new(retire, "admin")).expect("retire");
    }
    let mut model = model();
    let mut made: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let timeline = scenario.timeline();
    let mut moments = Vec::new();
    for (index, (now, step)) in timeline.iter().enumerate() {
        clock.advance_to(*now);
        let expected = model.apply(&step.member, &step.command, *now);
        let reservations = made.get(&step.member).map(Vec::as_slice).unwrap_or(&[]);
        let command = resolve_reservation_ref(&step.command, reservations);
        let executed = ledger.execute(&step.member, Request::new(command, "admin"));
        assert_eq!(executed.is_ok(), expected.is_ok(), "step {index}: ledger {executed:?}, model {expected:?}");
        if let Ok(executed) = executed {
            for event in executed.outcome.member_events() {
                if let MemberEvent::CreditsReserved { reservation_id, .. } = event {
                    made.entry(step.member.clone()).or_default().push(reservation_id);
                }
            }
        }
        let last_at_this_instant = timeline.get(index + 1).is_none_or(|(next, _)| next > now);
        if last_at_this_instant {
            let mut then = model.clone();
            then.advance(*now);
            moments.push(Moment { at: *now, model: then });
        }
    }
    ledger.shutdown();
    moments
}

/// The data dir of a written history, with its read models built.
fn history_dir() -> (TempDir, Vec<Moment>) {
    let dir = TempDir::new().expect("temp dir");
    let moments = write_history(dir.path(), &scenario());
    let built = tally(dir.path(), &["projections", "rebuild", "--all"]);
    assert_eq!(built.code, 0, "{}", built.stderr);
    (dir, moments)
}

/// Every read model's digest from `projections status --format json`.
fn digests(data_dir: &Path) -> BTreeMap<String, (u64, String)> {
    let status = tally(data_dir, &["projections", "status", "--format", "json"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
    let status: Value = serde_json::from_str(&status.stdout).expect("status is JSON");
    let mut digests = BTreeMap::new();
    for projector in status["projectors"].as_array().expect("projectors") {
        assert_eq!(projector["lag"], 0, "{projector}");
        for read_model in projector["read_models"].as_array().expect("read models") {
            digests.insert(
                read_model["name"].as_str().expect("name").to_owned(),
                (
                    read_model["position"].as_u64().expect("position"),
                    read_model["sha256"].as_str().expect("sha").to_owned(),
                ),
            );
        }
    }
    digests
}

#[test]
fn an_export_imported_into_a_fresh_dir_verifies_and_builds_the_same_read_models() {
    let (source, _) = history_dir();
    let verified = tally(source.path(), &["audit", "verify"]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    let head_line = verified.stdout.lines().find(|line| line.starts_with("head: position")).expect("a head line");

    let export = tally(source.path(), &["events", "export"]);
    assert_eq!(export.code, 0, "{}", export.stderr);
    let lines: Vec<Value> = export.stdout.lines().map(|line| serde_json::from_str(line).expect("NDJSON")).collect();
    assert!(lines.len() > 50, "a real history: {} events", lines.len());
    assert_eq!(lines[0]["position"], 1);
    assert!(
        lines
            .iter()
            .all(|line| line["payload"].is_string() && line["metadata"].is_string() && line["hash"].is_string())
    );
    let file = source.path().join("log.ndjson");
    std::fs::write(&file, &export.stdout).expect("write the export");

    let target = TempDir::new().expect("temp dir");
    let fresh = target.path().join("copy");
    let imported = tally(&fresh, &["events", "import", file.to_str().expect("utf-8 path")]);
    assert_eq!(imported.code, 0, "{}", imported.stderr);
    assert!(
        imported.stdout.starts_with(&format!("imported {} events (0 already present)", lines.len())),
        "{}",
        imported.stdout
    );
    // The same file again, through stdin: everything is already there.
    let again = tally_with(&fresh, &["events", "import", "-"], &[], Some(export.stdout.as_bytes()));
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stdout.starts_with(&format!("imported 0 events ({} already present)", lines.len())),
        "{}",
        again.stdout
    );

    let built = tally(&fresh, &["projections", "rebuild", "--all"]);
    assert_eq!(built.code, 0, "{}", built.stderr);
    let verified_copy = tally(&fresh, &["audit", "verify"]);
    assert_eq!(verified_copy.code, 0, "{}{}", verified_copy.stdout, verified_copy.stderr);
    assert!(verified_copy.stdout.contains(head_line), "the same head hash:\n{}", verified_copy.stdout);
    assert!(verified_copy.stdout.contains("audit verify: ok"));
    assert_eq!(digests(&fresh), digests(source.path()), "the imported log builds the same read models");

    // Export is byte-exact: exporting the copy gives the same file.
    let export_of_copy = tally(&fresh, &["events", "export"]);
    assert_eq!(export_of_copy.stdout, export.stdout);
    let tail = tally(source.path(), &["events", "export", "--after", "10", "--stream", "member-m1"]);
    assert_eq!(tail.code, 0, "{}", tail.stderr);
    for line in tail.stdout.lines() {
        let event: Value = serde_json::from_str(line).expect("NDJSON");
        assert_eq!(event["stream_id"], "member-m1");
        assert!(event["position"].as_u64().unwrap() > 10);
    }
}

#[test]
fn a_row_changed_behind_the_stores_back_fails_the_audit_naming_its_position() {
    let (dir, _) = history_dir();
    let events = dir.path().join("events.db");
    let database = rusqlite::Connection::open(&events).expect("raw connection");
    let head: i64 = database.query_row("SELECT max(position) FROM events", [], |row| row.get(0)).expect("head");
    let tampered = head / 2;
    database.execute_batch("DROP TRIGGER events_no_update").expect("drop the trigger");
    let changed = database
        .execute("UPDATE events SET payload = replace(payload, ':', ': ') WHERE position = ?1", [tampered])
        .expect("tamper");
    assert_eq!(changed, 1);
    drop(database);

    let verified = tally(dir.path(), &["audit", "verify"]);
    assert_eq!(verified.code, 3, "{}{}", verified.stdout, verified.stderr);
    let error = one_line_error(&verified);
    assert!(error.contains(&format!("breaks at position {tampered}:")), "{error}");
    assert!(verified.stdout.contains(&format!("FAILED: the hash chain breaks at position {tampered}")));

    // An export carries the tampered row as it is, and an import refuses it.
    let export = tally(dir.path(), &["events", "export"]);
    assert_eq!(export.code, 0);
    let target = TempDir::new().expect("temp dir");
    let fresh = target.path().join("copy");
    let imported = tally_with(&fresh, &["events", "import", "-"], &[], Some(export.stdout.as_bytes()));
    assert_eq!(imported.code, 1);
    let error = one_line_error(&imported);
    assert!(
        error.contains(&format!("line {tampered}: the import does not fit the log at position {tampered}")),
        "{error}"
    );
    assert!(!fresh.exists(), "a refused import leaves nothing behind");

    // A deleted row: the gap is named.
    let database = rusqlite::Connection::open(&events).expect("raw connection");
    database.execute_batch("DROP TRIGGER events_no_delete").expect("drop the trigger");
    database.execute("DELETE FROM events WHERE position = 3", []).expect("delete");
    drop(database);
    let verified = tally(dir.path(), &["audit", "verify"]);
    assert_eq!(verified.code, 3);
    assert!(one_line_error(&verified).contains("position 3 is missing"), "{}", verified.stderr);
}

#[test]
fn a_read_model_changed_behind_the_runners_back_fails_the_audit_naming_it() {
    let (dir, _) = history_dir();
    let projections = rusqlite::Connection::open(dir.path().join("projections.db")).expect("raw connection");
    let table: String = projections
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'subscriptions_v%' ORDER BY name LIMIT 1",
            [],
            |row| row.get(0),
        )
        .expect("the subscriptions table");
    let key: String = projections
        .query_row("SELECT name FROM pragma_table_info(?1) ORDER BY pk DESC, cid LIMIT 1", [&table], |row| row.get(0))
        .expect("a key column");
    let deleted = projections
        .execute(&format!("DELETE FROM {table} WHERE {key} = (SELECT min({key}) FROM {table})"), [])
        .expect("delete");
    assert_eq!(deleted, 1);
    drop(projections);
    let verified = tally(dir.path(), &["audit", "verify"]);
    assert_eq!(verified.code, 3, "{}{}", verified.stdout, verified.stderr);
    assert!(one_line_error(&verified).contains("read model subscriptions differs"), "{}", verified.stderr);
    // A rebuild puts it right.
    assert_eq!(tally(dir.path(), &["projections", "rebuild", "subscriptions"]).code, 0);
    assert_eq!(tally(dir.path(), &["audit", "verify"]).code, 0);
}

#[test]
fn replay_as_of_three_moments_equals_the_reference_model() {
    let dir = TempDir::new().expect("temp dir");
    let moments = write_history(dir.path(), &scenario());
    let chosen = [&moments[moments.len() / 3], &moments[2 * moments.len() / 3], &moments[moments.len() - 1]];
    let mut compared = 0;
    let mut pending = 0;
    for moment in chosen {
        let at = moment.at.to_rfc3339();
        for member in strategies::MEMBER_IDS {
            let replay =
                tally(dir.path(), &["audit", "replay", "--member", member, "--as-of", &at, "--format", "json"]);
            let Some(expected) = moment.model.balance(member) else {
                assert_eq!(replay.code, 1, "{member} does not exist at {at}: {}", replay.stdout);
                assert!(one_line_error(&replay).contains(member));
                continue;
            };
            assert_eq!(replay.code, 0, "{member} at {at}: {}", replay.stderr);
            let replayed: Value = serde_json::from_str(&replay.stdout).expect("JSON");
            let figures = json!({
                "balance": expected.balance, "available": expected.available, "held": expected.held, "debt": expected.debt,
                "granted": expected.granted, "used": expected.used, "debited": expected.debited, "expired": expected.expired,
            });
            let actual = json!({
                "balance": replayed["balance"], "available": replayed["available"], "held": replayed["held"],
                "debt": replayed["debt"], "granted": replayed["totals"]["granted"], "used": replayed["totals"]["used"],
                "debited": replayed["totals"]["debited"], "expired": replayed["totals"]["expired"],
            });
            assert_eq!(actual, figures, "{member} at {at}");

            let mut expected_grants: Vec<(String, i64, i64, Option<String>)> = moment
                .model
                .grants(member)
                .into_iter()
                .filter(|grant| !grant.expired && grant.remaining > 0)
                .map(|grant| {
                    (
                        grant.source.as_str().to_owned(),
                        grant.remaining,
                        grant.held,
                        grant.expires_at.map(|at| at.to_rfc3339()),
                    )
                })
                .collect();
            let mut actual_grants: Vec<(String, i64, i64, Option<String>)> = replayed["grants"]
                .as_array()
                .expect("grants")
                .iter()
                .map(|grant| {
                    let expires_at = grant["expires_at"].as_str().map(|at| {
                        DateTime::parse_from_rfc3339(at).expect("an instant").with_timezone(&Utc).to_rfc3339()
                    });
                    (
                        grant["source"].as_str().expect("source").to_owned(),
                        grant["remaining"].as_i64().expect("remaining"),
                        grant["held"].as_i64().expect("held"),
                        expires_at,
                    )
                })
                .collect();
            expected_grants.sort();
            actual_grants.sort();
            assert_eq!(actual_grants, expected_grants, "live grants of {member} at {at}");

            assert_eq!(
                replayed["subscription"]["status"].as_str(),
                moment.model.subscription_status(member),
                "subscription of {member} at {at}"
            );
            assert_eq!(replayed["subscription"]["plan_id"].as_str(), moment.model.subscription_plan(member));
            let transactions = replayed["transactions"].as_array().expect("transactions");
            let last_balance =
                transactions.last().map_or(0, |transaction| transaction["balance_after"].as_i64().unwrap());
            assert_eq!(last_balance, expected.balance, "the transactions lead to the balance");
            pending += replayed["pending_time_effects"].as_u64().expect("a count");
            compared += 1;
        }
    }
    assert!(compared >= 4, "enough members existed to compare: {compared}");
    assert!(pending > 0, "some effects of time were due and not recorded, so the replay decided them");

    // The table form is for people: the figures, the grants, the trail.
    let last = moments.last().expect("a moment").at.to_rfc3339();
    let table = tally(dir.path(), &["audit", "replay", "--member", "m1", "--as-of", &last]);
    assert_eq!(table.code, 0, "{}", table.stderr);
    for heading in ["Member m1, as of", "Balance", "Subscription:", "Transactions, oldest first:"] {
        assert!(table.stdout.contains(heading), "{heading} in\n{}", table.stdout);
    }
}

#[test]
fn rebuilds_run_in_the_server_while_it_serves_reads() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    assert_eq!(server.admin_post("/v1/plans", plan("pro", 5_000, 100_000, 5_000, None)).0, 201);
    assert_eq!(server.admin_post("/v1/members/m1/subscription", json!({"plan_id": "pro"})).0, 201);
    for index in 0..150 {
        let usage = json!({"usage_id": format!("u{index}"), "metric": "api_calls", "credits": 10});
        assert_eq!(server.admin_post("/v1/members/m1/usage", usage).0, 201);
    }
    server.sync("m1");
    // The usage is a spike: the alert reactor's append lands before the digests.
    server.head_position();
    server.sync("m1");
    let data_dir = server.data_dir.path().to_owned();
    let before = digests(&data_dir);

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = Arc::clone(&stop);
        let client = server.client.clone();
        let url = server.url("/v1/members/m1/balance");
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::SeqCst) || reads == 0 {
                let response = client.get(&url).bearer_auth(ADMIN_KEY).send().expect("a read");
                assert_eq!(response.status(), 200, "reads are served during the rebuild");
                let balance: Value = response.json().expect("JSON");
                assert_eq!(balance["available"], 100_000 - 1_500, "{balance}");
                reads += 1;
            }
            reads
        })
    };
    let refused = tally(&data_dir, &["projections", "rebuild", "--all"]);
    assert_eq!(refused.code, 1);
    assert!(one_line_error(&refused).contains("TALLY_ADMIN_KEY"), "{}", refused.stderr);
    let rebuilt = tally_with(&data_dir, &["projections", "rebuild", "--all"], &[("TALLY_ADMIN_KEY", ADMIN_KEY)], None);
    let one =
        tally_with(&data_dir, &["projections", "rebuild", "credit_balances"], &[("TALLY_ADMIN_KEY", ADMIN_KEY)], None);
    stop.store(true, Ordering::SeqCst);
    let reads = reader.join().expect("the reader thread");
    assert_eq!(rebuilt.code, 0, "{}", rebuilt.stderr);
    assert!(
        rebuilt.stdout.contains(
            "rebuilt credits, daily_usage, invoices, subscriptions, integrations, alerts, analytics (by the server"
        ),
        "{}",
        rebuilt.stdout
    );
    assert_eq!(one.code, 0, "{}", one.stderr);
    assert!(one.stdout.starts_with("rebuilt credits (by the server"), "{}", one.stdout);
    assert!(reads > 0);
    assert_eq!(digests(&data_dir), before, "a rebuild changes no figure");

    // Beside the running server, the audit compares its live read models too.
    let verified = tally(&data_dir, &["audit", "verify"]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    assert!(verified.stdout.contains("audit verify: ok"));
    let (status, balance) = server.admin_get("/v1/members/m1/balance");
    assert_eq!((status, balance["available"].as_i64()), (200, Some(100_000 - 1_500)));

    // A server killed outright leaves its address file behind but releases
    // the projections: the CLI rebuilds them itself.
    let data_dir = server.kill();
    assert!(data_dir.path().join("server.json").exists());
    let rebuilt = tally(data_dir.path(), &["projections", "rebuild", "--all"]);
    assert_eq!(rebuilt.code, 0, "{}", rebuilt.stderr);
    assert!(
        rebuilt
            .stdout
            .starts_with("rebuilt credits, daily_usage, invoices, subscriptions, integrations, alerts, analytics: "),
        "{}",
        rebuilt.stdout
    );
    assert_eq!(digests(data_dir.path()), before);
}

#[test]
fn renew_runs_what_fell_due_up_to_a_past_instant_and_refuses_the_future() {
    let dir = TempDir::new().expect("temp dir");
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let clock = Arc::new(ManualClock::new(start));
    let ledger = Ledger::open(&dir.path().join("events.db"), LedgerOptions::default(), clock).expect("ledger");
    for plan in strategies::plans() {
        ledger.execute_catalog(Request::new(CatalogCommand::PublishPlan(plan), "admin")).expect("plan");
    }
    let start_pro = MemberCommand::StartSubscription {
        plan_id: "pro".into(),
        billing: Billing::Tally,
        stripe_subscription_id: None,
    };
    ledger.execute("m1", Request::new(start_pro, "admin")).expect("subscribe");
    ledger.shutdown();

    let future = tally(dir.path(), &["renew", "--at", "2999-01-01T00:00:00Z"]);
    assert_eq!(future.code, 1);
    assert!(one_line_error(&future).contains("later than now"), "{}", future.stderr);
    let unparsable = tally(dir.path(), &["renew", "--at", "next tuesday"]);
    assert_eq!(unparsable.code, 2, "{}", unparsable.stderr);

    let renewed = tally(dir.path(), &["renew", "--at", "2026-02-01T00:00:00Z"]);
    assert_eq!(renewed.code, 0, "{}", renewed.stderr);
    assert!(renewed.stdout.starts_with("ran what fell due up to 2026-02-01T00:00:00Z:"), "{}", renewed.stdout);
    assert!(renewed.stdout.contains("for 1 members"), "{}", renewed.stdout);
    let again = tally(dir.path(), &["renew", "--at", "2026-02-01T00:00:00Z"]);
    assert!(again.stdout.contains(": 0 events for 0 members"), "nothing is due twice: {}", again.stdout);

    let replay = tally(
        dir.path(),
        &["audit", "replay", "--member", "m1", "--as-of", "2026-02-01T00:00:00Z", "--format", "json"],
    );
    let replayed: Value = serde_json::from_str(&replay.stdout).expect("JSON");
    assert_eq!(replayed["pending_time_effects"], 0, "the renewal is in the log");
    assert_eq!(replayed["subscription"]["period_start"], "2026-02-01T00:00:00Z");
    let renewal = replayed["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|transaction| transaction["event_type"] == "SubscriptionRenewed")
        .expect("a renewal was recorded");
    assert!(renewal["position"].is_u64());
}

#[test]
fn bad_input_is_a_one_line_error_and_changes_nothing() {
    let dir = TempDir::new().expect("temp dir");
    let missing = dir.path().join("missing");
    for args in [
        vec!["audit", "verify"],
        vec!["events", "export"],
        vec!["projections", "status"],
        vec!["projections", "rebuild", "--all"],
        vec!["audit", "replay", "--member", "m1"],
        vec!["renew"],
    ] {
        let run = tally(&missing, &args);
        assert_eq!(run.code, 1, "{args:?}");
        assert!(one_line_error(&run).contains("does not exist"), "{args:?}: {}", run.stderr);
        assert!(!missing.exists(), "{args:?} created the data dir");
    }

    let not_sqlite = dir.path().join("not-sqlite");
    std::fs::create_dir(&not_sqlite).unwrap();
    std::fs::write(not_sqlite.join("events.db"), "hello, not a database").unwrap();
    let run = tally(&not_sqlite, &["audit", "verify"]);
    assert_eq!(run.code, 1);
    assert!(one_line_error(&run).contains("not a SQLite database"), "{}", run.stderr);
    assert_eq!(std::fs::read(not_sqlite.join("events.db")).unwrap(), b"hello, not a database");

    let (history, _) = history_dir();
    let head_before = tally(history.path(), &["events", "export"]).stdout;
    let unknown = tally(history.path(), &["audit", "replay", "--member", "nobody"]);
    assert_eq!(unknown.code, 1);
    assert!(one_line_error(&unknown).contains("unknown member nobody"), "{}", unknown.stderr);
    let bad_date = tally(history.path(), &["audit", "replay", "--member", "m1", "--as-of", "31/01/2026"]);
    assert_eq!(bad_date.code, 2);
    assert!(bad_date.stderr.lines().next().unwrap().contains("--as-of"), "{}", bad_date.stderr);
    let unknown_projector = tally(history.path(), &["projections", "rebuild", "balances"]);
    assert_eq!(unknown_projector.code, 1);
    assert!(one_line_error(&unknown_projector).contains("no projector or read model is named \"balances\""));

    // A line that is not an event, into a log that exists: named, nothing written.
    let mut file = head_before.lines().take(3).map(|line| format!("{line}\n")).collect::<String>();
    file.push_str("{\"position\": 4, \"note\": \"not an event\"}\n");
    let import = tally_with(history.path(), &["events", "import", "-"], &[], Some(file.as_bytes()));
    assert_eq!(import.code, 1);
    assert!(one_line_error(&import).contains("stdin line 4: not an event"), "{}", import.stderr);
    assert_eq!(tally(history.path(), &["events", "export"]).stdout, head_before, "nothing was written");
    let missing_file = tally(history.path(), &["events", "import", "/nonexistent/log.ndjson"]);
    assert_eq!(missing_file.code, 1);
    assert!(one_line_error(&missing_file).contains("cannot open /nonexistent/log.ndjson"));
}

/// The scheduler and the outbox pause between rounds (5 s, 1 s); a SIGTERM
/// must not wait the pause out. Before the stop signal a shutdown right
/// after start-up took the scheduler's whole 5 s pause.
#[test]
fn serve_stops_promptly_on_sigterm_without_waiting_out_the_scheduler_pause() {
    let server = Server::start(&[]);
    // actix installs its signal handlers just after it starts answering;
    // a SIGTERM in that instant would meet the default action instead.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    let _data_dir = server.terminate();
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_millis(4_000), "SIGTERM to exit took {took:?}");
}
