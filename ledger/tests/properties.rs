//! Property tests: the ledger against the independent reference model of
//! `tally-testkit`, on random sequences of valid and invalid commands.
//!
//! - `decider_agrees_with_the_reference_model` (pure, in memory, 3,000
//!   cases): every answer (accepted, or its rejection code) and every
//!   member's balance after every step equal the model's; credits are
//!   conserved, `available` is never negative, debt stays within the plan's
//!   limit, and the fold of the decided events equals the live state.
//! - `the_stored_ledger_replays_retries_and_rejects_cleanly` (real SQLite
//!   files, 1,000 cases): through `Ledger`, every command is sent twice with
//!   the same idempotency key and the retry changes nothing; a rejection
//!   writes nothing; a fresh `Ledger` replaying the file reproduces every
//!   member's state; the hash chain verifies.
//!
//! A failing case prints its seed and the shrunk scenario (proptest).

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use tally_ledger::domain::*;
use tally_ledger::service::Idempotency;
use tally_ledger::{Ledger, LedgerError, LedgerOptions, ManualClock, Request};
use tally_testkit::strategies::{self, RETIRED_PLAN_IDS};
use tally_testkit::{Model, ModelBalance, resolve_reservation_ref};

fn catalog() -> Catalog {
    let mut catalog = Catalog::default();
    for plan in strategies::plans() {
        for event in catalog.decide(&CatalogCommand::PublishPlan(plan)).unwrap() {
            catalog.apply(&event);
        }
    }
    for plan_id in RETIRED_PLAN_IDS {
        for event in catalog.decide(&CatalogCommand::RetirePlan { plan_id: plan_id.to_string() }).unwrap() {
            catalog.apply(&event);
        }
    }
    catalog
}

fn model() -> Model {
    let mut model = Model::new(strategies::plans());
    for plan_id in RETIRED_PLAN_IDS {
        model.retire_plan(plan_id);
    }
    model
}

fn ledger_balance(state: &MemberState) -> ModelBalance {
    let totals = state.totals;
    ModelBalance {
        available: state.available().0,
        held: state.held().0,
        debt: state.debt().0,
        balance: state.balance().0,
        granted: totals.granted.0,
        used: totals.used.0,
        debited: totals.debited.0,
        expired: totals.expired.0,
        debt_incurred: totals.debt_incurred.0,
    }
}

fn usage_id(command: &MemberCommand) -> Option<&str> {
    match command {
        MemberCommand::RecordUsage(usage) => Some(&usage.usage_id),
        MemberCommand::ReverseUsage { usage_id, .. } => Some(usage_id),
        _ => None,
    }
}

/// The shell's job, in memory: fold, keep the usage index, remember the
/// reservation ids the ledger made.
#[derive(Default)]
struct MemoryLedger {
    states: BTreeMap<String, MemberState>,
    usages: BTreeMap<(String, String), UsageFacts>,
    history: BTreeMap<String, Vec<MemberEvent>>,
    reservations: BTreeMap<String, Vec<String>>,
}

impl MemoryLedger {
    fn execute(
        &mut self,
        member: &str,
        command: &MemberCommand,
        now: DateTime<Utc>,
        catalog: &Catalog,
    ) -> Result<(), &'static str> {
        let state = self.states.get(member).cloned().unwrap_or_default();
        let usage = usage_id(command).and_then(|id| self.usages.get(&(member.to_owned(), id.to_owned())).copied());
        let context = Context { member_id: member, now, catalog, usage };
        let decision = decide(&state, command, &context).map_err(|error| error.code())?;
        let mut state = state;
        for occurred in decision {
            state.apply(&occurred.event);
            match &occurred.event {
                MemberEvent::UsageRecorded { usage_id, credits, .. } => {
                    self.usages.insert(
                        (member.to_owned(), usage_id.clone()),
                        UsageFacts { credits: *credits, reversed: false },
                    );
                }
                MemberEvent::UsageReversed { usage_id, .. } => {
                    self.usages
                        .get_mut(&(member.to_owned(), usage_id.clone()))
                        .expect("reversed usage exists")
                        .reversed = true;
                }
                MemberEvent::CreditsReserved { reservation_id, .. } => {
                    self.reservations.entry(member.to_owned()).or_default().push(reservation_id.clone());
                }
                _ => {}
            }
            self.history.entry(member.to_owned()).or_default().push(occurred.event);
        }
        self.states.insert(member.to_owned(), state);
        Ok(())
    }
}

fn check_ledger_invariants(member: &str, state: &MemberState) -> Result<(), TestCaseError> {
    let totals = state.totals;
    prop_assert_eq!(
        totals.granted.plus(totals.debt_incurred),
        totals.used.plus(totals.debited).plus(totals.expired).plus(state.remaining()),
        "credits are conserved for {}",
        member
    );
    prop_assert!(state.available() >= Credits::ZERO, "available is never negative for {}", member);
    for grant in state.grants.values() {
        prop_assert!(grant.held <= grant.remaining && grant.remaining <= grant.amount, "grant bounds {:?}", grant);
    }
    // Debt never exceeds the largest overage limit of any plan (a change to
    // a smaller limit may leave an older debt above the new one), and a
    // member that never subscribed has none.
    let limit_max = strategies::plans().iter().map(|plan| plan.overage.limit_credits).max().unwrap_or(Credits::ZERO);
    prop_assert!(state.debt() <= limit_max, "debt {} above every limit", state.debt());
    if state.subscription.is_none() {
        prop_assert_eq!(state.debt(), Credits::ZERO, "no subscription, no overage");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn decider_agrees_with_the_reference_model(scenario in strategies::scenario()) {
        let catalog = catalog();
        let mut model = model();
        let mut ledger = MemoryLedger::default();
        for (index, (now, step)) in scenario.timeline().into_iter().enumerate() {
            let expected = model.apply(&step.member, &step.command, now);
            let made = ledger.reservations.get(&step.member).cloned().unwrap_or_default();
            let command = resolve_reservation_ref(&step.command, &made);
            let actual = ledger.execute(&step.member, &command, now, &catalog);
            prop_assert_eq!(actual, expected, "step {} at {}: {} {:?}", index, now, step.member, command);
            // Compare the books as of now on both sides: what fell due is
            // a function of time, written whenever the member is next touched.
            model.advance(now);
            for (member, state) in &ledger.states {
                let as_of_now = state_at(state, now, &catalog);
                prop_assert_eq!(Some(ledger_balance(&as_of_now)), model.balance(member), "balances of {} after step {}", member, index);
                check_ledger_invariants(member, state)?;
                check_ledger_invariants(member, &as_of_now)?;
                if let Some(status) = model.subscription_status(member) {
                    let ledger_status = as_of_now.subscription.as_ref().map(|subscription| subscription.status);
                    let expected_status = match status {
                        "active" => SubscriptionStatus::Active,
                        "past_due" => SubscriptionStatus::PastDue,
                        _ => SubscriptionStatus::Canceled,
                    };
                    prop_assert_eq!(ledger_status, Some(expected_status), "subscription of {}", member);
                }
            }
        }
        for (member, events) in &ledger.history {
            let replayed = events.iter().fold(MemberState::default(), |state, event| state.evolve(event));
            prop_assert_eq!(&replayed, &ledger.states[member], "replay equals live state for {}", member);
        }
    }
}

fn admin(command: MemberCommand) -> Request<MemberCommand> {
    Request::new(command, "admin")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    #[test]
    fn the_stored_ledger_replays_retries_and_rejects_cleanly(scenario in strategies::scenario()) {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("events.db");
        let clock = Arc::new(ManualClock::new(scenario.start));
        let mut options = LedgerOptions::default();
        // Durability is not what this property is about; fsyncs would only slow it.
        options.store.synchronous_full = false;
        // Snapshots every few events, so that scenarios take and use many.
        options.snapshot_every = 3;
        let ledger = Ledger::open(&path, options, clock.clone()).unwrap();
        for plan in strategies::plans() {
            ledger.execute_catalog(Request::new(CatalogCommand::PublishPlan(plan), "admin")).unwrap();
        }
        for plan_id in RETIRED_PLAN_IDS {
            ledger.execute_catalog(Request::new(CatalogCommand::RetirePlan { plan_id: plan_id.to_string() }, "admin")).unwrap();
        }
        let mut model = model();
        let mut made: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let head = |ledger: &Ledger| ledger.reader().unwrap().head().unwrap().position;
        for (index, (now, step)) in scenario.timeline().into_iter().enumerate() {
            clock.advance_to(now);
            let expected = model.apply(&step.member, &step.command, now);
            let command = resolve_reservation_ref(&step.command, made.get(&step.member).map(Vec::as_slice).unwrap_or(&[]));
            let idempotency = Idempotency { scope: format!("admin/{}", step.member), key: format!("step-{index}"), fingerprint: [7; 32], status: 200 };
            let before = head(&ledger);
            let first = ledger.execute(&step.member, admin(command.clone()).with_idempotency(idempotency.clone()));
            let after = head(&ledger);
            match &first {
                Ok(executed) => {
                    prop_assert!(expected.is_ok(), "step {}: ledger accepted {:?}, model said {:?}", index, command, expected);
                    for event in executed.outcome.member_events() {
                        if let MemberEvent::CreditsReserved { reservation_id, .. } = event {
                            made.entry(step.member.clone()).or_default().push(reservation_id);
                        }
                    }
                    let retry = ledger.execute(&step.member, admin(command.clone()).with_idempotency(idempotency)).unwrap();
                    prop_assert!(retry.replayed);
                    prop_assert_eq!(&retry.outcome, &executed.outcome);
                    prop_assert_eq!(head(&ledger), after, "a retry writes nothing");
                }
                Err(LedgerError::Rejected(error)) => {
                    prop_assert_eq!(Err(error.code()), expected, "step {}: {:?}", index, command);
                    prop_assert_eq!(after, before, "a rejection writes nothing");
                }
                Err(other) => prop_assert!(false, "storage failure {}", other),
            }
        }
        let live: BTreeMap<String, MemberState> =
            model.member_ids().map(|member| (member.to_owned(), ledger.member_state(member).unwrap())).collect();
        let end = scenario.timeline().last().map(|(now, _)| *now).unwrap_or(scenario.start);
        model.advance(end);
        let catalog = catalog();
        for (member, state) in &live {
            let as_of_end = state_at(state, end, &catalog);
            prop_assert_eq!(Some(ledger_balance(&as_of_end)), model.balance(member), "balances of {}", member);
        }
        let report = ledger.reader().unwrap().verify_chain(|_| {}).unwrap();
        prop_assert_eq!(report.head.position, head(&ledger));
        drop(ledger);
        // Loaded from a snapshot and the events after it ...
        let reopened = Ledger::open(&path, options, clock.clone()).unwrap();
        for (member, state) in &live {
            prop_assert_eq!(&reopened.member_state(member).unwrap(), state, "snapshot + tail of {}", member);
        }
        drop(reopened);
        // ... and from the whole stream.
        let replayed = Ledger::open(&path, LedgerOptions { snapshot_every: 0, ..options }, clock).unwrap();
        for (member, state) in &live {
            prop_assert_eq!(&replayed.member_state(member).unwrap(), state, "replay of the stored stream of {}", member);
        }
    }
}
