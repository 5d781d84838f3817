//! `credit_balances` against the testkit's independent reference model: for
//! random scenarios of valid and invalid commands run through the real
//! ledger, once the scheduler has written what fell due, every member's
//! balance row equals the model's books, and its transactions sum to it.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use tally_ledger::domain::{CatalogCommand, MemberEvent};
use tally_ledger::{Ledger, LedgerOptions, ManualClock, Request};
use tally_projections::{PageRequest, Projections};
use tally_testkit::strategies::{self, RETIRED_PLAN_IDS};
use tally_testkit::{Model, resolve_reservation_ref};

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn credit_balances_equal_the_reference_model(scenario in strategies::scenario()) {
        let dir = tempfile::TempDir::new().unwrap();
        let events_path = dir.path().join("events.db");
        let clock = Arc::new(ManualClock::new(scenario.start));
        let mut options = LedgerOptions::default();
        options.store.synchronous_full = false;
        let ledger = Ledger::open(&events_path, options, clock.clone()).unwrap();
        let mut model = Model::new(strategies::plans());
        for plan in strategies::plans() {
            ledger.execute_catalog(Request::new(CatalogCommand::PublishPlan(plan), "admin")).unwrap();
        }
        for plan_id in RETIRED_PLAN_IDS {
            ledger.execute_catalog(Request::new(CatalogCommand::RetirePlan { plan_id: plan_id.to_string() }, "admin")).unwrap();
            model.retire_plan(plan_id);
        }
        let mut made: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut end = scenario.start;
        for (now, step) in scenario.timeline() {
            clock.advance_to(now);
            end = now;
            let _ = model.apply(&step.member, &step.command, now);
            let command = resolve_reservation_ref(&step.command, made.get(&step.member).map(Vec::as_slice).unwrap_or(&[]));
            if let Ok(executed) = ledger.execute(&step.member, Request::new(command, "admin")) {
                for event in executed.outcome.member_events() {
                    if let MemberEvent::CreditsReserved { reservation_id, .. } = event {
                        made.entry(step.member.clone()).or_default().push(reservation_id);
                    }
                }
            }
        }
        // Write what fell due up to the end, so the log (and so the read
        // models) and the model see the same instant.
        ledger.run_due().unwrap();
        model.advance(end);
        let projections = Projections::open(&dir.path().join("projections.db"), &events_path).unwrap();
        projections.catch_up().unwrap();
        for member in model.member_ids() {
            let expected = model.balance(member).unwrap();
            let row = projections.balance(member).unwrap().expect("a balance row for every registered member");
            prop_assert_eq!(
                (row.available, row.held, row.debt, row.balance, row.granted, row.used, row.debited, row.expired, row.debt_incurred),
                (expected.available, expected.held, expected.debt, expected.balance, expected.granted, expected.used,
                 expected.debited, expected.expired, expected.debt_incurred),
                "balance row of {}", member
            );
            let transactions = projections.transactions(member, &PageRequest::first(1_000)).unwrap();
            prop_assert!(transactions.next_cursor.is_none());
            prop_assert_eq!(transactions.items.iter().map(|row| row.amount).sum::<i64>(), row.balance, "transactions of {}", member);
        }
    }
}
