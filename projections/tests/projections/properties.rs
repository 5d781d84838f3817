//! Properties over random command sequences run through the real ledger:
//!
//! (a) projecting incrementally (in batches of random size, catching up at
//!     random moments) and building from scratch give the same digests, and
//!     so does a rebuild;
//! (b) `credit_balances` equals the ledger's own member state (available,
//!     held, debt, balance and the conservation totals);
//! (c) a member's `credit_transactions` amounts sum to its balance, and each
//!     row's `balance_after` is the running sum;
//! (d) a runner that dies mid-batch (its transaction dropped), live or while
//!     building, resumes to the same digests.
//!
//! Issued invoices are checked too: their subtotal is the sum of their lines
//! and equals their total.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use tally_ledger::LedgerError;
use tally_ledger::domain::{
    Billing, Credits, GrantCredits, GrantSource, MemberCommand, MemberEvent, MinorUnits, Plan, QueryExecution,
    QueryStatus,
};
use tally_projections::{
    Digest, PageRequest, ProjectionOptions, Projections, Projector, ReadModel, builtin_projectors,
};

use crate::support::*;

const MEMBERS: [&str; 3] = ["m1", "m2", "m3"];
const TIME_ZONES: [&str; 5] = ["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"];
const PLAN_IDS: [&str; 4] = ["free", "starter", "pro", "scale"];
const USAGE_IDS: usize = 6;
const RESERVATION_REFS: usize = 4;

fn plans() -> Vec<Plan> {
    vec![
        plan("free", "Free", 0, 100, None, None),
        plan("starter", "Starter", 1_000, 1_000, Some(500), None),
        plan("pro", "Pro", 5_000, 10_000, Some(2_000), Some((2_000, 2))),
        plan("scale", "Scale", 5_000, 8_000, None, Some((500, 3))),
    ]
}

#[derive(Clone, Copy, Debug)]
enum InvoiceAction {
    Pay,
    Fail,
    Void,
    Uncollectible,
}

#[derive(Clone, Debug)]
enum Command {
    Register {
        time_zone: &'static str,
    },
    Start {
        plan_id: &'static str,
        billing: Billing,
    },
    ChangePlan {
        plan_id: &'static str,
    },
    Cancel {
        at_period_end: bool,
    },
    Grant {
        source: GrantSource,
        amount: i64,
        expires_in_s: Option<i64>,
        effective_in_s: Option<i64>,
        price: Option<i64>,
    },
    Debit {
        amount: i64,
    },
    Usage {
        usage: usize,
        metric: &'static str,
        quantity: i64,
        credits: i64,
        occurred_offset_s: Option<i64>,
    },
    Reverse {
        usage: usize,
    },
    Reserve {
        amount: i64,
        ttl_s: Option<i64>,
    },
    /// Settles the k-th reservation made for the member, charging
    /// `quarters`/4 of it, with a query execution or without.
    Settle {
        reservation: usize,
        quarters: i64,
        query: Option<(bool, i64, i64)>,
    },
    Release {
        reservation: usize,
    },
    Invoice {
        number: u32,
        action: InvoiceAction,
    },
    /// An alert episode opened or closed (as the alert reactor would ask).
    Alert {
        subject: Option<&'static str>,
        episode: u32,
        resolve: bool,
    },
    Sweep,
}

#[derive(Clone, Debug)]
struct Step {
    advance_s: i64,
    member: usize,
    command: Command,
}

fn command() -> impl Strategy<Value = Command> {
    let grant_source =
        prop::sample::select(vec![GrantSource::Purchase, GrantSource::Promotional, GrantSource::Adjustment]);
    prop_oneof![
        2 => prop::sample::select(TIME_ZONES.to_vec()).prop_map(|time_zone| Command::Register { time_zone }),
        3 => (prop::sample::select(PLAN_IDS.to_vec()), prop::bool::weighted(0.2)).prop_map(|(plan_id, stripe)| {
            Command::Start { plan_id, billing: if stripe { Billing::Stripe } else { Billing::Tally } }
        }),
        2 => prop::sample::select(PLAN_IDS.to_vec()).prop_map(|plan_id| Command::ChangePlan { plan_id }),
        1 => any::<bool>().prop_map(|at_period_end| Command::Cancel { at_period_end }),
        4 => (
            grant_source,
            1..5_000i64,
            prop::option::weighted(0.4, 60..40 * 86_400i64),
            prop::option::weighted(0.2, 60..20 * 86_400i64),
            prop::option::weighted(0.5, 0..10_000i64),
        )
            .prop_map(|(source, amount, expires_in_s, effective_in_s, price)| Command::Grant {
                source,
                amount,
                expires_in_s,
                effective_in_s: effective_in_s.filter(|_| source != GrantSource::Adjustment),
                price: price.filter(|_| source == GrantSource::Purchase),
            }),
        1 => (1..2_000i64).prop_map(|amount| Command::Debit { amount }),
        10 => (
            0..USAGE_IDS,
            prop::sample::select(vec!["api.calls", "rows.scanned"]),
            1..100i64,
            1..3_000i64,
            prop::option::weighted(0.3, -6 * 86_400..240i64),
        )
            .prop_map(|(usage, metric, quantity, credits, occurred_offset_s)| Command::Usage {
                usage,
                metric,
                quantity,
                credits,
                occurred_offset_s,
            }),
        2 => (0..USAGE_IDS).prop_map(|usage| Command::Reverse { usage }),
        4 => (1..3_000i64, prop::option::weighted(0.5, 1..7_200i64)).prop_map(|(amount, ttl_s)| Command::Reserve { amount, ttl_s }),
        3 => (0..RESERVATION_REFS, 0..=4i64, prop::option::weighted(0.7, (any::<bool>(), 0..60_000i64, 0..1_000i64)))
            .prop_map(|(reservation, quarters, query)| Command::Settle { reservation, quarters, query }),
        2 => (0..RESERVATION_REFS).prop_map(|reservation| Command::Release { reservation }),
        3 => (1..=4u32, prop::sample::select(vec![InvoiceAction::Pay, InvoiceAction::Fail, InvoiceAction::Void, InvoiceAction::Uncollectible]))
            .prop_map(|(number, action)| Command::Invoice { number, action }),
        2 => (prop::option::of(prop::sample::select(vec!["int1", "inv_1"])), 1..=3u32, any::<bool>())
            .prop_map(|(subject, episode, resolve)| Command::Alert { subject, episode, resolve }),
        1 => Just(Command::Sweep),
    ]
}

fn advance_s() -> impl Strategy<Value = i64> {
    prop_oneof![
        5 => Just(0i64),
        4 => 1..=900i64,
        2 => 901..=3 * 86_400i64,
        1 => 3 * 86_400..=40 * 86_400i64,
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let opening = prop::collection::vec(
        (
            0..MEMBERS.len(),
            prop::sample::select(TIME_ZONES.to_vec()),
            prop::option::of(prop::sample::select(PLAN_IDS.to_vec())),
        ),
        1..=3,
    )
    .prop_map(|members| {
        let mut steps = Vec::new();
        for (member, time_zone, plan_id) in members {
            steps.push(Step { advance_s: 0, member, command: Command::Register { time_zone } });
            if let Some(plan_id) = plan_id {
                steps.push(Step { advance_s: 0, member, command: Command::Start { plan_id, billing: Billing::Tally } });
            }
        }
        steps
    });
    let body = prop::collection::vec((advance_s(), 0..MEMBERS.len(), command()), 1..100).prop_map(|body| {
        body.into_iter().map(|(advance_s, member, command)| Step { advance_s, member, command }).collect::<Vec<_>>()
    });
    (opening, body).prop_map(|(mut opening, body)| {
        opening.extend(body);
        opening
    })
}

fn start_instant() -> impl Strategy<Value = DateTime<Utc>> {
    prop::sample::select(vec![
        instant(2026, 1, 31, 12, 0),
        instant(2024, 2, 29, 0, 0),
        instant(2026, 3, 7, 23, 0),
        instant(2026, 10, 31, 22, 30),
    ])
}

/// What a case remembers of the ledger's answers: reservation ids and
/// amounts per member, oldest first.
#[derive(Default)]
struct Made {
    reservations: BTreeMap<usize, Vec<(String, i64)>>,
}

fn ledger_command(step: &Step, now: DateTime<Utc>, made: &Made) -> Option<MemberCommand> {
    let member = step.member;
    Some(match &step.command {
        Command::Register { time_zone } => register(time_zone),
        Command::Start { plan_id, billing } => MemberCommand::StartSubscription {
            plan_id: (*plan_id).to_owned(),
            billing: *billing,
            stripe_subscription_id: None,
        },
        Command::ChangePlan { plan_id } => MemberCommand::ChangePlan { plan_id: (*plan_id).to_owned() },
        Command::Cancel { at_period_end } => MemberCommand::CancelSubscription { at_period_end: *at_period_end },
        Command::Grant { source, amount, expires_in_s, effective_in_s, price } => {
            let effective_at = effective_in_s.map(|seconds| now + Duration::seconds(seconds));
            let starts_at = effective_at.unwrap_or(now);
            MemberCommand::GrantCredits(GrantCredits {
                expires_at: expires_in_s.map(|seconds| starts_at + Duration::seconds(seconds)),
                effective_at,
                reason: (*source == GrantSource::Adjustment).then(|| "goodwill".to_owned()),
                price: price.map(MinorUnits),
                ..GrantCredits::new(*source, *amount)
            })
        }
        Command::Debit { amount } => {
            MemberCommand::DebitCredits { amount: Credits(*amount), reason: "correction".to_owned() }
        }
        Command::Usage { usage: usage_index, metric, quantity, credits, occurred_offset_s } => usage(
            &format!("u{usage_index}"),
            metric,
            *quantity,
            *credits,
            occurred_offset_s.map(|seconds| now + Duration::seconds(seconds)),
        ),
        Command::Reverse { usage } => MemberCommand::ReverseUsage { usage_id: format!("u{usage}"), reason: None },
        Command::Reserve { amount, ttl_s } => reserve(*amount, *ttl_s),
        Command::Settle { reservation, quarters, query } => {
            let (reservation_id, amount) = made.reservations.get(&member)?.get(*reservation)?.clone();
            MemberCommand::Settle {
                reservation_id,
                amount: Credits(amount * quarters / 4),
                query: query.map(|(failed, duration_ms, rows)| QueryExecution {
                    integration_id: "int1".to_owned(),
                    query_id: if failed { "q_fail".to_owned() } else { "q1".to_owned() },
                    status: if failed { QueryStatus::Failed } else { QueryStatus::Succeeded },
                    duration_ms,
                    rows,
                    bytes: 0,
                    cache_hit: false,
                    error_code: None,
                    api_usage: None,
                }),
            }
        }
        Command::Release { reservation } => {
            let (reservation_id, _) = made.reservations.get(&member)?.get(*reservation)?.clone();
            MemberCommand::Release { reservation_id }
        }
        Command::Invoice { number, action } => {
            let invoice_id = format!("inv_{}_{number}", MEMBERS[member]);
            match action {
                InvoiceAction::Pay => MemberCommand::PayInvoice { invoice_id },
                InvoiceAction::Fail => MemberCommand::RecordPaymentFailed { invoice_id, reason: None },
                InvoiceAction::Void => MemberCommand::VoidInvoice { invoice_id },
                InvoiceAction::Uncollectible => MemberCommand::MarkInvoiceUncollectible { invoice_id },
            }
        }
        Command::Alert { subject, episode, resolve } => {
            let notice = tally_ledger::domain::AlertNotice {
                rule: if subject.is_some() { "integration_failing" } else { "low_balance" }.to_owned(),
                subject: subject.map(str::to_owned),
                episode: *episode,
                figures: serde_json::json!({"available": episode}),
            };
            if *resolve { MemberCommand::ResolveAlert(notice) } else { MemberCommand::RaiseAlert(notice) }
        }
        Command::Sweep => return None,
    })
}

/// Runs the steps through the ledger; `after_step` sees the step index.
fn run(log: &TestLog, start: DateTime<Utc>, steps: &[Step], mut after_step: impl FnMut(usize)) {
    let mut now = start;
    let mut made = Made::default();
    for (index, step) in steps.iter().enumerate() {
        now += Duration::seconds(step.advance_s);
        log.at(now);
        match ledger_command(step, now, &made) {
            None if matches!(step.command, Command::Sweep) => {
                log.ledger.run_due().expect("the sweep runs");
            }
            None => {}
            Some(command) => match log.try_execute(MEMBERS[step.member], command) {
                Ok(executed) => {
                    for event in executed.outcome.member_events() {
                        if let MemberEvent::CreditsReserved { reservation_id, amount, .. } = event {
                            made.reservations.entry(step.member).or_default().push((reservation_id, amount.0));
                        }
                    }
                }
                Err(LedgerError::Rejected(_)) => {}
                Err(error) => panic!("the ledger failed: {error}"),
            },
        }
        after_step(index);
    }
}

fn digests(projections: &Projections) -> Vec<Digest> {
    ReadModel::ALL.iter().map(|read_model| projections.digest(*read_model).expect("a digest")).collect()
}

fn crashing(projector_name: &str, position: u64) -> Vec<Arc<dyn Projector>> {
    projectors_replacing(projector_name, |inner| Arc::new(CrashingAt { inner, position }))
}

fn check_balances_against_the_ledger(log: &TestLog, projections: &Projections) -> Result<(), TestCaseError> {
    for member_id in MEMBERS {
        let state = log.ledger.member_state(member_id).expect("the member's state");
        let balance = projections.balance(member_id).expect("a balance query");
        let Some(balance) = balance else {
            prop_assert!(!state.is_registered(), "{member_id} is registered but has no balance row");
            continue;
        };
        prop_assert_eq!(
            (balance.available, balance.held, balance.debt, balance.balance),
            (state.available().0, state.held().0, state.debt().0, state.balance().0),
            "{} available/held/debt/balance",
            member_id
        );
        let totals = &state.totals;
        prop_assert_eq!(
            (balance.granted, balance.used, balance.debited, balance.expired),
            (totals.granted.0, totals.used.0, totals.debited.0, totals.expired.0),
            "{} granted/used/debited/expired",
            member_id
        );
        prop_assert_eq!(
            (balance.debt_incurred, balance.debt_reduced, balance.debt_billed),
            (totals.debt_incurred.0, totals.debt_reduced.0, totals.debt_billed.0),
            "{} debt totals",
            member_id
        );
        // The read model's grants are the ledger's, figure for figure.
        let grants: Vec<(String, i64, i64, bool)> = projections
            .grants(member_id)
            .expect("grants")
            .into_iter()
            .map(|grant| (grant.grant_id, grant.remaining, grant.held, grant.expired))
            .collect();
        let mut expected: Vec<(String, i64, i64, bool)> = state
            .grants
            .values()
            .map(|grant| (grant.grant_id.clone(), grant.remaining.0, grant.held.0, grant.expired))
            .collect();
        let mut found = grants;
        found.sort();
        expected.sort();
        prop_assert_eq!(found, expected, "{} grants", member_id);
    }
    Ok(())
}

fn check_transactions_sum_to_balances(projections: &Projections) -> Result<(), TestCaseError> {
    for member_id in MEMBERS {
        let Some(balance) = projections.balance(member_id).expect("a balance query") else { continue };
        let mut running = 0i64;
        let mut expected_seq = 1u64;
        let mut page = PageRequest::first(50);
        loop {
            let found = projections.transactions(member_id, &page).expect("transactions");
            for row in &found.items {
                running += row.amount;
                prop_assert_eq!(row.balance_after, running, "{} row {} balance_after", member_id, row.seq);
                prop_assert_eq!(row.seq, expected_seq);
                expected_seq += 1;
            }
            match found.next_cursor {
                Some(cursor) => page = PageRequest::after(cursor, 50, page.order),
                None => break,
            }
        }
        prop_assert_eq!(running, balance.balance, "{} sum of amounts", member_id);
        prop_assert_eq!(expected_seq - 1, balance.transactions);
    }
    Ok(())
}

fn check_invoice_totals(projections: &Projections) -> Result<(), TestCaseError> {
    for member_id in MEMBERS {
        let invoices = projections.invoices(member_id, &PageRequest::first(1_000)).expect("invoices").items;
        for invoice in invoices {
            let sum: i64 = invoice.lines.iter().map(|line| line.amount).sum();
            prop_assert_eq!(invoice.subtotal, sum, "{} subtotal", invoice.invoice_id);
            prop_assert_eq!(invoice.total, sum, "{} total", invoice.invoice_id);
            prop_assert!(["draft", "open", "paid", "void", "uncollectible"].contains(&invoice.status.as_str()));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn projections_agree_with_rebuilds_with_the_ledger_and_after_crashes(
        start in start_instant(),
        steps in steps(),
        batch_events_max in 1..24usize,
        build_batch_events_max in 1..24usize,
        catch_ups in prop::collection::vec(0..3usize, 128),
        crash_step_fraction in 0.0..1.0f64,
        crash_projector in prop::sample::select(vec!["credits", "daily_usage", "invoices", "subscriptions"]),
        crash_fraction in 0.0..1.0f64,
    ) {
        let log = TestLog::with_plans(start, plans());
        let options = ProjectionOptions { batch_events_max, build_batch_events_max, ..ProjectionOptions::default() };
        let incremental = log.projections_with("incremental", options, builtin_projectors());
        let crash_step = ((steps.len() as f64) * crash_step_fraction) as usize;
        run(&log, start, &steps, |index| {
            for _ in 0..catch_ups[index % catch_ups.len()] {
                incremental.run_once().expect("a step of the incremental projections");
            }
            if index == crash_step {
                // A projection that is live up to here, for (d) below.
                let live = log.projections_with("crash_live", options, builtin_projectors());
                live.catch_up().expect("a catch-up");
            }
        });
        let head = log.head();
        incremental.catch_up().expect("the incremental projections catch up");
        let reference = log.caught_up("reference");
        let reference_digests = digests(&reference);
        prop_assert!(reference_digests.iter().all(|digest| digest.position == head));

        // (a) incremental = from scratch = rebuilt.
        prop_assert_eq!(&digests(&incremental), &reference_digests);
        incremental.rebuild(None, |_| {}).expect("a rebuild");
        prop_assert_eq!(&digests(&incremental), &reference_digests);

        // (b) and (c), and invoice totals.
        check_balances_against_the_ledger(&log, &reference)?;
        check_transactions_sum_to_balances(&reference)?;
        check_invoice_totals(&reference)?;

        // (d) A crash mid-batch of a live step…
        let live_checkpoint = {
            let live = log.projections_with("crash_live", options, builtin_projectors());
            live.status().expect("a status").iter().map(|status| status.checkpoint).min().unwrap_or(0)
        };
        let crash_at = live_checkpoint + 1 + ((head.saturating_sub(live_checkpoint) as f64) * crash_fraction) as u64;
        {
            let crashing_live = log.projections_with("crash_live", options, crashing(crash_projector, crash_at));
            let _ = crashing_live.catch_up();
        }
        let resumed = log.projections_with("crash_live", options, builtin_projectors());
        resumed.catch_up().expect("the resumed projections catch up");
        prop_assert_eq!(&digests(&resumed), &reference_digests);

        // …and of a build from scratch.
        let build_crash_at = 1 + ((head as f64) * crash_fraction) as u64;
        {
            let crashing_build = log.projections_with("crash_build", options, crashing(crash_projector, build_crash_at));
            let _ = crashing_build.catch_up();
        }
        let resumed = log.projections_with("crash_build", options, builtin_projectors());
        resumed.catch_up().expect("the resumed build catches up");
        prop_assert_eq!(&digests(&resumed), &reference_digests);
    }
}
