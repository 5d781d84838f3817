//! The model's own specification: one table-like test per rule, given
//! commands, when one more, then a result and the state it leaves. Every
//! step checks the conservation invariant, and every rejection checks that
//! nothing changed.

use super::*;
use crate::strategies::{self, RETIRED_PLAN_IDS};
use chrono::Duration;
use proptest::prelude::*;
use tally_ledger::domain::{Credits, MinorUnits};

const MEMBER: &str = "m";
const DAY_S: i64 = 86_400;

/// 2026-03-01T00:00:00Z: the first period of a subscription started here
/// ends on April 1st, 31 days later.
fn t0() -> Timestamp {
    instant("2026-03-01T00:00:00Z")
}

fn instant(text: &str) -> Timestamp {
    text.parse().expect("an RFC 3339 instant")
}

fn after_s(seconds: i64) -> Timestamp {
    t0() + Duration::seconds(seconds)
}

fn april_1() -> Timestamp {
    instant("2026-04-01T00:00:00Z")
}

/// The strategies' catalog plus plans a few rules need: a pricier plan with
/// the same credits as pro, one with a small overage limit, one in EUR.
fn test_plans() -> Vec<Plan> {
    let mut plans = strategies::plans();
    plans.push(strategies::plan("max", 9_000, 10_000, None, Some((5_000, 5))));
    plans.push(strategies::plan("premium", 20_000, 10_000, None, Some((100, 1))));
    let mut euro = strategies::plan("euro", 900, 500, None, None);
    euro.currency = "EUR".to_owned();
    plans.push(euro);
    plans
}

fn model() -> Model {
    let mut model = Model::new(test_plans());
    for plan_id in RETIRED_PLAN_IDS {
        model.retire_plan(plan_id);
    }
    model
}

/// A model where `commands` were all accepted for [`MEMBER`].
#[track_caller]
fn given(commands: &[(Timestamp, MemberCommand)]) -> Model {
    let mut model = model();
    for (now, command) in commands {
        if let Err(code) = when(&mut model, command.clone(), *now) {
            panic!("given {command:?} at {now}: rejected with {code}");
        }
    }
    model
}

/// Applies one command for [`MEMBER`], then checks every invariant, and for a
/// rejection that the member is as it was.
#[track_caller]
fn when(model: &mut Model, command: MemberCommand, now: Timestamp) -> Result<(), Rejection> {
    when_for(model, MEMBER, command, now)
}

#[track_caller]
fn when_for(model: &mut Model, member_id: &str, command: MemberCommand, now: Timestamp) -> Result<(), Rejection> {
    model.advance(now);
    let before = snapshot(model, member_id);
    let result = model.apply(member_id, &command, now);
    if result.is_err() {
        assert_eq!(before, snapshot(model, member_id), "the rejected {command:?} changed the member");
    }
    for member_id in model.member_ids().map(str::to_owned).collect::<Vec<_>>() {
        model.check_invariants(&member_id).unwrap();
    }
    result
}

fn snapshot(model: &Model, member_id: &str) -> String {
    format!(
        "{:?}",
        (
            model.balance(member_id),
            model.grants(member_id),
            model.invoices(member_id),
            model.subscription_status(member_id),
            model.subscription_plan(member_id),
            model.subscription_period(member_id),
        )
    )
}

fn balance(model: &Model) -> ModelBalance {
    model.balance(MEMBER).expect("the member exists")
}

fn remainders(model: &Model) -> Vec<i64> {
    model.grants(MEMBER).iter().map(|grant| grant.remaining).collect()
}

fn invoice_summary(model: &Model) -> Vec<(String, i64, &'static str)> {
    model.invoices(MEMBER).into_iter().map(|invoice| (invoice.invoice_id, invoice.total, invoice.status)).collect()
}

// ---- command builders ------------------------------------------------------

fn grant_of(source: GrantSource, amount: i64) -> GrantCredits {
    let mut grant = GrantCredits::new(source, amount);
    if source == GrantSource::Adjustment {
        grant.reason = Some("goodwill".to_owned());
    }
    grant
}

fn purchase(amount: i64) -> MemberCommand {
    MemberCommand::GrantCredits(grant_of(GrantSource::Purchase, amount))
}

fn priced_purchase(amount: i64, price: i64) -> MemberCommand {
    MemberCommand::GrantCredits(GrantCredits {
        price: Some(MinorUnits(price)),
        ..grant_of(GrantSource::Purchase, amount)
    })
}

fn promotional(amount: i64) -> MemberCommand {
    MemberCommand::GrantCredits(grant_of(GrantSource::Promotional, amount))
}

fn expiring(source: GrantSource, amount: i64, expires_at: Timestamp) -> MemberCommand {
    MemberCommand::GrantCredits(GrantCredits { expires_at: Some(expires_at), ..grant_of(source, amount) })
}

fn usage(usage_id: &str, credits: i64) -> MemberCommand {
    MemberCommand::RecordUsage(usage_record(usage_id, credits))
}

fn usage_record(usage_id: &str, credits: i64) -> RecordUsage {
    RecordUsage {
        usage_id: usage_id.to_owned(),
        metric: "api.calls".to_owned(),
        quantity: 1,
        credits: Credits(credits),
        occurred_at: None,
        integration_id: None,
        query_id: None,
    }
}

fn debit(amount: i64) -> MemberCommand {
    MemberCommand::DebitCredits { amount: Credits(amount), reason: "chargeback".to_owned() }
}

fn reverse(usage_id: &str) -> MemberCommand {
    MemberCommand::ReverseUsage { usage_id: usage_id.to_owned(), reason: None }
}

fn reserve(amount: i64, ttl_s: Option<i64>) -> MemberCommand {
    MemberCommand::Reserve { amount: Credits(amount), ttl_s }
}

fn settle(reservation_id: &str, amount: i64) -> MemberCommand {
    MemberCommand::Settle { reservation_id: reservation_id.to_owned(), amount: Credits(amount), query: None }
}

fn release(reservation_id: &str) -> MemberCommand {
    MemberCommand::Release { reservation_id: reservation_id.to_owned() }
}

fn start(plan_id: &str) -> MemberCommand {
    MemberCommand::StartSubscription {
        plan_id: plan_id.to_owned(),
        billing: Billing::Tally,
        stripe_subscription_id: None,
    }
}

fn change(plan_id: &str) -> MemberCommand {
    MemberCommand::ChangePlan { plan_id: plan_id.to_owned() }
}

fn cancel_now() -> MemberCommand {
    MemberCommand::CancelSubscription { at_period_end: false }
}

fn cancel_at_period_end() -> MemberCommand {
    MemberCommand::CancelSubscription { at_period_end: true }
}

fn pay(invoice_id: &str) -> MemberCommand {
    MemberCommand::PayInvoice { invoice_id: invoice_id.to_owned() }
}

fn payment_failed(invoice_id: &str) -> MemberCommand {
    MemberCommand::RecordPaymentFailed { invoice_id: invoice_id.to_owned(), reason: None }
}

fn void(invoice_id: &str) -> MemberCommand {
    MemberCommand::VoidInvoice { invoice_id: invoice_id.to_owned() }
}

fn uncollectible(invoice_id: &str) -> MemberCommand {
    MemberCommand::MarkInvoiceUncollectible { invoice_id: invoice_id.to_owned() }
}

fn register(time_zone: &str, currency: &str) -> MemberCommand {
    MemberCommand::Register(MemberProfile {
        time_zone: time_zone.to_owned(),
        currency: currency.to_owned(),
        stripe_customer_id: None,
    })
}

// ---- registration ----------------------------------------------------------

#[test]
fn only_register_start_and_grant_create_a_member() {
    let table: Vec<(MemberCommand, Result<(), Rejection>)> = vec![
        (register("UTC", "USD"), Ok(())),
        (register("Europe/Paris", "EUR"), Ok(())),
        (start("free"), Ok(())),
        (purchase(10), Ok(())),
        (usage("u1", 1), Err(NOT_FOUND)),
        (debit(1), Err(NOT_FOUND)),
        (reverse("u1"), Err(NOT_FOUND)),
        (reserve(1, None), Err(NOT_FOUND)),
        (settle("#1", 1), Err(NOT_FOUND)),
        (release("#1"), Err(NOT_FOUND)),
        (change("pro"), Err(NOT_FOUND)),
        (cancel_now(), Err(NOT_FOUND)),
        (pay("inv_m_1"), Err(NOT_FOUND)),
        (payment_failed("inv_m_1"), Err(NOT_FOUND)),
        (MemberCommand::AdvanceTime, Err(NOT_FOUND)),
        // A rejected implicit registration registers nothing.
        (purchase(0), Err(VALIDATION_FAILED)),
        (start(strategies::UNKNOWN_PLAN_ID), Err(NOT_FOUND)),
        (start("legacy"), Err(VALIDATION_FAILED)),
        (register("Mars/Olympus_Mons", "USD"), Err(VALIDATION_FAILED)),
        (register("UTC", "usd"), Err(VALIDATION_FAILED)),
    ];
    for (command, expected) in table {
        let mut model = model();
        let result = when(&mut model, command.clone(), t0());
        assert_eq!(result, expected, "{command:?}");
        assert_eq!(model.balance(MEMBER).is_some(), expected.is_ok(), "{command:?} registers iff accepted");
    }
}

#[test]
fn a_subscription_is_priced_in_the_members_currency() {
    // (given, when, then)
    let table: Vec<(Vec<MemberCommand>, MemberCommand, Result<(), Rejection>)> = vec![
        (vec![register("UTC", "EUR")], start("pro"), Err(VALIDATION_FAILED)),
        (vec![register("UTC", "EUR")], start("euro"), Ok(())),
        (vec![], start("euro"), Ok(())),
        // A first start registers the member in the plan's currency.
        (vec![start("euro"), cancel_now()], start("pro"), Err(VALIDATION_FAILED)),
        (vec![purchase(10)], start("euro"), Err(VALIDATION_FAILED)),
        // The currency cannot change under a live subscription.
        (vec![start("pro")], register("UTC", "EUR"), Err(VALIDATION_FAILED)),
        (vec![start("pro")], register("Asia/Tokyo", "USD"), Ok(())),
        (vec![start("pro"), cancel_now()], register("UTC", "EUR"), Ok(())),
    ];
    for (history, command, expected) in table {
        let history: Vec<_> = history.into_iter().map(|command| (t0(), command)).collect();
        let mut model = given(&history);
        assert_eq!(when(&mut model, command.clone(), t0()), expected, "{history:?} then {command:?}");
    }
}

// ---- grants ----------------------------------------------------------------

#[test]
fn grant_validation() {
    let now = t0();
    let with = |change: &dyn Fn(&mut GrantCredits), source| {
        let mut grant = grant_of(source, 100);
        change(&mut grant);
        MemberCommand::GrantCredits(grant)
    };
    use GrantSource::*;
    let table: Vec<(&str, MemberCommand, Result<(), Rejection>)> = vec![
        ("purchase", with(&|_| {}, Purchase), Ok(())),
        ("promotional", with(&|_| {}, Promotional), Ok(())),
        ("adjustment", with(&|_| {}, Adjustment), Ok(())),
        ("monthly_allocation is the ledger's", with(&|_| {}, MonthlyAllocation), Err(VALIDATION_FAILED)),
        ("rollover is the ledger's", with(&|_| {}, Rollover), Err(VALIDATION_FAILED)),
        ("refund is the ledger's", with(&|_| {}, Refund), Err(VALIDATION_FAILED)),
        ("amount 1", with(&|grant| grant.amount = Credits(1), Purchase), Ok(())),
        ("amount 10^9", with(&|grant| grant.amount = Credits(1_000_000_000), Purchase), Ok(())),
        ("amount 0", with(&|grant| grant.amount = Credits(0), Purchase), Err(VALIDATION_FAILED)),
        ("amount -5", with(&|grant| grant.amount = Credits(-5), Purchase), Err(VALIDATION_FAILED)),
        ("amount 10^9+1", with(&|grant| grant.amount = Credits(1_000_000_001), Purchase), Err(VALIDATION_FAILED)),
        ("priority 0", with(&|grant| grant.priority = Some(0), Purchase), Ok(())),
        ("priority 100", with(&|grant| grant.priority = Some(100), Purchase), Ok(())),
        ("priority 101", with(&|grant| grant.priority = Some(101), Purchase), Err(VALIDATION_FAILED)),
        (
            "category on an adjustment",
            with(&|grant| grant.category = Some(GrantCategory::Promotional), Adjustment),
            Ok(()),
        ),
        (
            "category on a purchase",
            with(&|grant| grant.category = Some(GrantCategory::Paid), Purchase),
            Err(VALIDATION_FAILED),
        ),
        (
            "category on a promotional grant",
            with(&|grant| grant.category = Some(GrantCategory::Promotional), Promotional),
            Err(VALIDATION_FAILED),
        ),
        ("adjustment without reason", with(&|grant| grant.reason = None, Adjustment), Err(VALIDATION_FAILED)),
        (
            "adjustment with a blank reason",
            with(&|grant| grant.reason = Some("  ".to_owned()), Adjustment),
            Err(VALIDATION_FAILED),
        ),
        ("price 0 on a purchase", with(&|grant| grant.price = Some(MinorUnits(0)), Purchase), Ok(())),
        (
            "price 10^12 on a purchase",
            with(&|grant| grant.price = Some(MinorUnits(1_000_000_000_000)), Purchase),
            Ok(()),
        ),
        (
            "price 10^12+1",
            with(&|grant| grant.price = Some(MinorUnits(1_000_000_000_001)), Purchase),
            Err(VALIDATION_FAILED),
        ),
        ("price -1", with(&|grant| grant.price = Some(MinorUnits(-1)), Purchase), Err(VALIDATION_FAILED)),
        (
            "price on a promotional grant",
            with(&|grant| grant.price = Some(MinorUnits(10)), Promotional),
            Err(VALIDATION_FAILED),
        ),
        ("expires 1 s from now", with(&|grant| grant.expires_at = Some(now + Duration::seconds(1)), Purchase), Ok(())),
        ("expires now", with(&|grant| grant.expires_at = Some(now), Purchase), Err(VALIDATION_FAILED)),
        (
            "expired already",
            with(&|grant| grant.expires_at = Some(now - Duration::seconds(1)), Purchase),
            Err(VALIDATION_FAILED),
        ),
        (
            "expires when it takes effect",
            with(
                &|grant| {
                    grant.effective_at = Some(now + Duration::days(2));
                    grant.expires_at = Some(now + Duration::days(2));
                },
                Purchase,
            ),
            Err(VALIDATION_FAILED),
        ),
        (
            "expires 1 s after it takes effect",
            with(
                &|grant| {
                    grant.effective_at = Some(now + Duration::days(2));
                    grant.expires_at = Some(now + Duration::days(2) + Duration::seconds(1));
                },
                Purchase,
            ),
            Ok(()),
        ),
        (
            "effective in the past, expires after now",
            with(
                &|grant| {
                    grant.effective_at = Some(now - Duration::days(2));
                    grant.expires_at = Some(now + Duration::seconds(1));
                },
                Purchase,
            ),
            Ok(()),
        ),
        (
            "effective in the past, expires before now",
            with(
                &|grant| {
                    grant.effective_at = Some(now - Duration::days(2));
                    grant.expires_at = Some(now - Duration::days(1));
                },
                Purchase,
            ),
            Err(VALIDATION_FAILED),
        ),
    ];
    for (name, command, expected) in table {
        let mut model = given(&[(now, register("UTC", "USD"))]);
        assert_eq!(when(&mut model, command, now), expected, "{name}");
    }
}

#[test]
fn grants_take_their_sources_defaults() {
    let named_category = MemberCommand::GrantCredits(GrantCredits {
        category: Some(GrantCategory::Promotional),
        priority: Some(7),
        ..grant_of(GrantSource::Adjustment, 1)
    });
    let model = given(&[
        (t0(), purchase(1)),
        (t0(), promotional(1)),
        (t0(), MemberCommand::GrantCredits(grant_of(GrantSource::Adjustment, 1))),
        (t0(), named_category),
        (t0(), start("starter")),
    ]);
    let defaults: Vec<_> =
        model.grants(MEMBER).iter().map(|grant| (grant.source, grant.priority, grant.category)).collect();
    let (paid, promotional) = (GrantCategory::Paid, GrantCategory::Promotional);
    assert_eq!(
        defaults,
        vec![
            (GrantSource::Purchase, 50, paid),
            (GrantSource::Promotional, 30, promotional),
            (GrantSource::Adjustment, 40, paid),
            (GrantSource::Adjustment, 7, promotional),
            (GrantSource::MonthlyAllocation, 20, paid),
        ]
    );
}

#[test]
fn scheduled_grants_arrive_at_their_effective_instant() {
    let effective_at = after_s(DAY_S);
    let scheduled = MemberCommand::GrantCredits(GrantCredits {
        effective_at: Some(effective_at),
        expires_at: Some(effective_at + Duration::days(1)),
        ..grant_of(GrantSource::Promotional, 70)
    });
    let mut model = given(&[(t0(), purchase(10)), (t0(), scheduled)]);
    // (instant, available, granted, expired)
    let table = [
        (t0(), 10, 10, 0),
        (effective_at - Duration::seconds(1), 10, 10, 0),
        (effective_at, 80, 80, 0),
        (effective_at + Duration::days(1), 10, 80, 70),
    ];
    for (now, available, granted, expired) in table {
        model.advance(now);
        let balance = balance(&model);
        assert_eq!((balance.available, balance.granted, balance.expired), (available, granted, expired), "at {now}");
    }
    let in_the_past =
        MemberCommand::GrantCredits(GrantCredits { effective_at: Some(t0()), ..grant_of(GrantSource::Purchase, 5) });
    assert_eq!(when(&mut model, in_the_past, effective_at + Duration::days(2)), Ok(()));
    assert_eq!(balance(&model).available, 15, "an effective_at not after now grants at once");
}

#[test]
fn a_grant_is_spendable_while_now_is_before_its_expiry() {
    let expires_at = after_s(100);
    let mut model = given(&[(t0(), expiring(GrantSource::Purchase, 100, expires_at))]);
    assert_eq!(when(&mut model, usage("u1", 10), expires_at - Duration::seconds(1)), Ok(()));
    assert_eq!(when(&mut model, usage("u2", 1), expires_at), Err(INSUFFICIENT_CREDITS));
    let balance = balance(&model);
    assert_eq!((balance.available, balance.expired, balance.used), (0, 90, 10));
}

// ---- burn-down order ---------------------------------------------------------

#[test]
fn burn_order_is_priority_then_expiry_then_promotional_then_age() {
    let soon = after_s(5 * DAY_S);
    let later = after_s(10 * DAY_S);
    let paid_adjustment_at_30 = MemberCommand::GrantCredits(GrantCredits {
        priority: Some(30),
        category: Some(GrantCategory::Paid),
        ..grant_of(GrantSource::Adjustment, 100)
    });
    let purchase_at_10 =
        MemberCommand::GrantCredits(GrantCredits { priority: Some(10), ..grant_of(GrantSource::Purchase, 100) });
    // (rule, grants in order, usage, remainders after)
    let table: Vec<(&str, Vec<MemberCommand>, i64, Vec<i64>)> = vec![
        ("lower priority number first", vec![purchase(100), promotional(100)], 150, vec![50, 0]),
        (
            "soonest expiry first, no expiry last",
            vec![
                purchase(100),
                expiring(GrantSource::Purchase, 100, later),
                expiring(GrantSource::Purchase, 100, soon),
            ],
            150,
            vec![100, 50, 0],
        ),
        ("promotional before paid", vec![paid_adjustment_at_30, promotional(100)], 50, vec![100, 50]),
        ("oldest first", vec![purchase(100), purchase(100)], 50, vec![50, 100]),
        (
            "priority before expiry",
            vec![purchase_at_10, expiring(GrantSource::Promotional, 100, soon)],
            50,
            vec![50, 100],
        ),
        ("across grants", vec![promotional(30), purchase(30), promotional(30)], 70, vec![0, 20, 0]),
    ];
    for (rule, grants, credits, expected) in table {
        let history: Vec<_> = grants.into_iter().map(|command| (t0(), command)).collect();
        let mut model = given(&history);
        assert_eq!(when(&mut model, usage("u1", credits), t0()), Ok(()), "{rule}");
        assert_eq!(remainders(&model), expected, "{rule}");
    }
}

// ---- usage -------------------------------------------------------------------

#[test]
fn usage_validation() {
    let now = t0();
    let with = |change: &dyn Fn(&mut RecordUsage)| {
        let mut record = usage_record("u1", 10);
        change(&mut record);
        MemberCommand::RecordUsage(record)
    };
    let table: Vec<(&str, MemberCommand, Result<(), Rejection>)> = vec![
        ("valid", with(&|_| {}), Ok(())),
        ("usage id with every allowed character", with(&|record| record.usage_id = "a:B.9-_z".to_owned()), Ok(())),
        ("usage id of 128 characters", with(&|record| record.usage_id = "u".repeat(128)), Ok(())),
        ("usage id of 129 characters", with(&|record| record.usage_id = "u".repeat(129)), Err(VALIDATION_FAILED)),
        ("empty usage id", with(&|record| record.usage_id = String::new()), Err(VALIDATION_FAILED)),
        ("usage id with a space", with(&|record| record.usage_id = "u 1".to_owned()), Err(VALIDATION_FAILED)),
        ("empty metric", with(&|record| record.metric = String::new()), Err(VALIDATION_FAILED)),
        ("metric with a slash", with(&|record| record.metric = "api/calls".to_owned()), Err(VALIDATION_FAILED)),
        ("quantity 0", with(&|record| record.quantity = 0), Err(VALIDATION_FAILED)),
        ("quantity 10^9", with(&|record| record.quantity = 1_000_000_000), Ok(())),
        ("quantity 10^9+1", with(&|record| record.quantity = 1_000_000_001), Err(VALIDATION_FAILED)),
        ("credits 0", with(&|record| record.credits = Credits(0)), Err(VALIDATION_FAILED)),
        ("credits -1", with(&|record| record.credits = Credits(-1)), Err(VALIDATION_FAILED)),
        ("credits 10^9+1", with(&|record| record.credits = Credits(1_000_000_001)), Err(VALIDATION_FAILED)),
        ("occurred 7 days ago", with(&|record| record.occurred_at = Some(now - Duration::days(7))), Ok(())),
        (
            "occurred 7 days and 1 s ago",
            with(&|record| record.occurred_at = Some(now - Duration::days(7) - Duration::seconds(1))),
            Err(VALIDATION_FAILED),
        ),
        ("occurs in 5 minutes", with(&|record| record.occurred_at = Some(now + Duration::minutes(5))), Ok(())),
        (
            "occurs in 5 minutes and 1 s",
            with(&|record| record.occurred_at = Some(now + Duration::minutes(5) + Duration::seconds(1))),
            Err(VALIDATION_FAILED),
        ),
    ];
    for (name, command, expected) in table {
        let mut model = given(&[(now, purchase(1_000))]);
        assert_eq!(when(&mut model, command, now), expected, "{name}");
    }
}

#[test]
fn a_usage_id_is_used_once_per_member() {
    let mut model = given(&[(t0(), purchase(100)), (t0(), usage("u1", 10))]);
    assert_eq!(when(&mut model, usage("u1", 10), after_s(40 * DAY_S)), Err(VALIDATION_FAILED));
    assert_eq!(when(&mut model, reverse("u1"), after_s(40 * DAY_S)), Ok(()));
    assert_eq!(when(&mut model, usage("u1", 10), after_s(40 * DAY_S)), Err(VALIDATION_FAILED), "even reversed");
    // Another member has its own usage ids.
    assert_eq!(when_for(&mut model, "other", purchase(10), t0() + Duration::days(40)), Ok(()));
    assert_eq!(when_for(&mut model, "other", usage("u1", 10), t0() + Duration::days(40)), Ok(()));
    // A refused usage does not take its id.
    let mut model = given(&[(t0(), purchase(5))]);
    assert_eq!(when(&mut model, usage("u1", 10), t0()), Err(INSUFFICIENT_CREDITS));
    assert_eq!(when(&mut model, usage("u1", 5), t0()), Ok(()));
}

#[test]
fn a_shortfall_becomes_debt_only_on_an_active_plan_with_overage_room() {
    let into_past_due =
        vec![(t0(), start("pro")), (april_1(), MemberCommand::AdvanceTime), (april_1(), payment_failed("inv_m_1"))];
    // After the April renewal pro holds 5000 rolled + 10000 new credits.
    let pro_at_april = 15_000;
    // (case, given, usage credits at April 1st, result, debt after, available after)
    type Row = (&'static str, Vec<(Timestamp, MemberCommand)>, i64, Result<(), Rejection>, i64, i64);
    let table: Vec<Row> = vec![
        ("no subscription", vec![(t0(), purchase(100))], 150, Err(INSUFFICIENT_CREDITS), 0, 100),
        ("exactly available", vec![(t0(), purchase(100))], 100, Ok(()), 0, 0),
        ("plan without overage", vec![(april_1(), start("free"))], 101, Err(INSUFFICIENT_CREDITS), 0, 100),
        ("pro, within the limit", vec![(april_1(), start("pro"))], 10_500, Ok(()), 500, 0),
        ("pro, up to the limit", vec![(april_1(), start("pro"))], 12_000, Ok(()), 2_000, 0),
        ("pro, past the limit", vec![(april_1(), start("pro"))], 12_001, Err(INSUFFICIENT_CREDITS), 0, 10_000),
        (
            "pro, debt already 1500, 500 more",
            vec![(april_1(), start("pro")), (april_1(), usage("u0", 11_500))],
            500,
            Ok(()),
            2_000,
            0,
        ),
        (
            "pro, debt already 1500, 501 more",
            vec![(april_1(), start("pro")), (april_1(), usage("u0", 11_500))],
            501,
            Err(INSUFFICIENT_CREDITS),
            1_500,
            0,
        ),
        ("past_due spends what it has", into_past_due.clone(), pro_at_april, Ok(()), 0, 0),
        ("past_due has no overage", into_past_due, pro_at_april + 1, Err(INSUFFICIENT_CREDITS), 0, pro_at_april),
        (
            "canceled has no overage",
            vec![(april_1(), start("pro")), (april_1(), cancel_now()), (april_1(), purchase(100))],
            101,
            Err(INSUFFICIENT_CREDITS),
            0,
            100,
        ),
        (
            "a smaller limit after an upgrade keeps the debt and allows no more",
            vec![(april_1(), start("pro")), (april_1(), usage("u0", 11_500)), (april_1(), change("premium"))],
            1,
            Err(INSUFFICIENT_CREDITS),
            1_500,
            0,
        ),
    ];
    for (case, history, credits, expected, debt, available) in table {
        let mut model = given(&history);
        assert_eq!(when(&mut model, usage("u1", credits), april_1()), expected, "{case}");
        let balance = balance(&model);
        assert_eq!((balance.debt, balance.available), (debt, available), "{case}");
        assert_eq!(balance.balance, balance.available + balance.held - balance.debt, "{case}");
    }
}

#[test]
fn grants_never_repay_debt() {
    let mut model = given(&[(t0(), start("pro")), (t0(), usage("u1", 10_500))]);
    assert_eq!(when(&mut model, purchase(1_000), t0()), Ok(()));
    let balance = balance(&model);
    assert_eq!((balance.available, balance.debt, balance.balance), (1_000, 500, 500));
    assert_eq!((balance.used, balance.debt_incurred, balance.granted), (10_500, 500, 11_000));
}

// ---- admin debit ---------------------------------------------------------------

#[test]
fn a_debit_takes_credits_back_in_burn_order_never_into_debt() {
    let reasonless = MemberCommand::DebitCredits { amount: Credits(1), reason: " ".to_owned() };
    // (case, given, debit, result, remainders after)
    type Row = (&'static str, Vec<MemberCommand>, MemberCommand, Result<(), Rejection>, Vec<i64>);
    let table: Vec<Row> = vec![
        ("all of it", vec![purchase(100)], debit(100), Ok(()), vec![0]),
        ("more than available", vec![purchase(100)], debit(101), Err(INSUFFICIENT_CREDITS), vec![100]),
        ("burn order", vec![purchase(100), promotional(50)], debit(80), Ok(()), vec![70, 0]),
        ("amount 0", vec![purchase(100)], debit(0), Err(VALIDATION_FAILED), vec![100]),
        ("amount 10^9+1", vec![purchase(100)], debit(1_000_000_001), Err(VALIDATION_FAILED), vec![100]),
        ("blank reason", vec![purchase(100)], reasonless, Err(VALIDATION_FAILED), vec![100]),
        ("no overage even on pro", vec![start("pro")], debit(10_001), Err(INSUFFICIENT_CREDITS), vec![10_000]),
    ];
    for (case, history, command, expected, after) in table {
        let history: Vec<_> = history.into_iter().map(|command| (t0(), command)).collect();
        let mut model = given(&history);
        assert_eq!(when(&mut model, command, t0()), expected, "{case}");
        assert_eq!(remainders(&model), after, "{case}");
        assert_eq!(balance(&model).debt, 0, "{case}");
    }
    let model = given(&[(t0(), purchase(100)), (t0(), debit(30))]);
    assert_eq!((balance(&model).debited, balance(&model).used), (30, 0));
}

// ---- reversal --------------------------------------------------------------------

#[test]
fn a_reversal_cuts_debt_first_then_refunds() {
    // (case, given, reversed usage, result, debt after, refund grant)
    type Row = (&'static str, Vec<MemberCommand>, &'static str, Result<(), Rejection>, i64, Option<i64>);
    let table: Vec<Row> = vec![
        ("no debt: all refunded", vec![purchase(100), usage("u1", 60)], "u1", Ok(()), 0, Some(60)),
        ("all into debt", vec![start("pro"), usage("u0", 10_000), usage("u1", 700)], "u1", Ok(()), 0, None),
        ("debt first, rest refunded", vec![start("pro"), usage("u1", 10_300)], "u1", Ok(()), 0, Some(10_000)),
        (
            "more debt than the usage",
            vec![start("pro"), usage("u0", 10_500), usage("u1", 200)],
            "u1",
            Ok(()),
            500,
            None,
        ),
        ("unknown usage", vec![purchase(100)], "u9", Err(NOT_FOUND), 0, None),
        ("twice", vec![purchase(100), usage("u1", 60), reverse("u1")], "u1", Err(VALIDATION_FAILED), 0, Some(60)),
    ];
    for (case, history, usage_id, expected, debt, refund) in table {
        let history: Vec<_> = history.into_iter().map(|command| (t0(), command)).collect();
        let mut model = given(&history);
        let used_before = balance(&model).used;
        assert_eq!(when(&mut model, reverse(usage_id), t0()), expected, "{case}");
        assert_eq!(balance(&model).debt, debt, "{case}");
        assert_eq!(balance(&model).used, used_before, "{case}: a reversal never reduces used");
        let refunds: Vec<_> =
            model.grants(MEMBER).into_iter().filter(|grant| grant.source == GrantSource::Refund).collect();
        assert_eq!(refunds.first().map(|grant| grant.remaining), refund, "{case}");
        for grant in refunds {
            assert_eq!((grant.category, grant.priority, grant.expires_at), (GrantCategory::Paid, 40, None));
        }
    }
}

#[test]
fn a_reversal_cuts_the_newest_debt_first() {
    // Debt at pro's unit price 2, then at max's unit price 5 after an upgrade.
    let mut model = given(&[
        (t0(), start("pro")),
        (t0(), usage("u1", 10_300)),
        (t0(), change("max")),
        (t0(), usage("u2", 200)),
        (t0(), usage("u3", 100)),
        (t0(), reverse("u3")),
    ]);
    assert_eq!(balance(&model).debt, 500);
    model.advance(april_1());
    // Fee 5000 (pro at period start) + proration 4000 over the whole period
    // + overage 300 × 2 + 200 × 5: the 100 cut came off the newest debt.
    assert_eq!(invoice_summary(&model), vec![("inv_m_1".to_owned(), 5_000 + 4_000 + 600 + 1_000, "open")]);
    assert_eq!(balance(&model).debt, 0);
}

// ---- reservations ------------------------------------------------------------------

#[test]
fn reservation_validation() {
    // (case, reserve, result, available after)
    let table: Vec<(&str, MemberCommand, Result<(), Rejection>, i64)> = vec![
        ("default timeout", reserve(60, None), Ok(()), 40),
        ("all of it", reserve(100, Some(1)), Ok(()), 0),
        ("longest timeout", reserve(60, Some(86_400)), Ok(()), 40),
        ("more than available", reserve(101, None), Err(INSUFFICIENT_CREDITS), 100),
        ("amount 0", reserve(0, None), Err(VALIDATION_FAILED), 100),
        ("amount 10^9+1", reserve(1_000_000_001, None), Err(VALIDATION_FAILED), 100),
        ("timeout 0", reserve(1, Some(0)), Err(VALIDATION_FAILED), 100),
        ("timeout 86401", reserve(1, Some(86_401)), Err(VALIDATION_FAILED), 100),
    ];
    for (case, command, expected, available) in table {
        let mut model = given(&[(t0(), purchase(100))]);
        assert_eq!(when(&mut model, command, t0()), expected, "{case}");
        assert_eq!(balance(&model).available, available, "{case}");
        assert_eq!(balance(&model).held, 100 - available, "{case}");
    }
    let mut model = given(&[(t0(), start("pro"))]);
    assert_eq!(when(&mut model, reserve(10_001, None), t0()), Err(INSUFFICIENT_CREDITS), "never overage");
}

#[test]
fn held_credits_are_not_spendable() {
    let mut model = given(&[(t0(), purchase(100)), (t0(), reserve(60, None))]);
    assert_eq!(when(&mut model, usage("u1", 41), t0()), Err(INSUFFICIENT_CREDITS));
    assert_eq!(when(&mut model, debit(41), t0()), Err(INSUFFICIENT_CREDITS));
    assert_eq!(when(&mut model, reserve(41, None), t0()), Err(INSUFFICIENT_CREDITS));
    assert_eq!(when(&mut model, usage("u1", 40), t0()), Ok(()));
    let balance = balance(&model);
    assert_eq!((balance.available, balance.held, balance.balance), (0, 60, 60));
}

#[test]
fn settle_and_release_lifecycle() {
    // (case, commands after reserving 60 of 100 at t0, each with its expected result,
    //  then available, held, used)
    type Row = (&'static str, Vec<(i64, MemberCommand, Result<(), Rejection>)>, (i64, i64, i64));
    let table: Vec<Row> = vec![
        ("settle part", vec![(0, settle("#1", 40), Ok(()))], (60, 0, 40)),
        ("settle all", vec![(0, settle("#1", 60), Ok(()))], (40, 0, 60)),
        ("settle 0 releases all", vec![(0, settle("#1", 0), Ok(()))], (100, 0, 0)),
        ("settle more than reserved", vec![(0, settle("#1", 61), Err(VALIDATION_FAILED))], (40, 60, 0)),
        ("settle a negative amount", vec![(0, settle("#1", -1), Err(VALIDATION_FAILED))], (40, 60, 0)),
        ("release", vec![(0, release("#1"), Ok(()))], (100, 0, 0)),
        ("unknown", vec![(0, settle("#2", 1), Err(NOT_FOUND)), (0, release("rsv_x"), Err(NOT_FOUND))], (40, 60, 0)),
        (
            "settle retried with the same amount",
            vec![(0, settle("#1", 40), Ok(())), (10, settle("#1", 40), Ok(()))],
            (60, 0, 40),
        ),
        (
            "settle retried after the deadline",
            vec![(0, settle("#1", 40), Ok(())), (DAY_S, settle("#1", 40), Ok(()))],
            (60, 0, 40),
        ),
        (
            "settle again with another amount",
            vec![(0, settle("#1", 40), Ok(())), (0, settle("#1", 30), Err(VALIDATION_FAILED))],
            (60, 0, 40),
        ),
        (
            "release after settle",
            vec![(0, settle("#1", 40), Ok(())), (0, release("#1"), Err(VALIDATION_FAILED))],
            (60, 0, 40),
        ),
        ("release twice", vec![(0, release("#1"), Ok(())), (0, release("#1"), Ok(()))], (100, 0, 0)),
        (
            "settle after release",
            vec![(0, release("#1"), Ok(())), (0, settle("#1", 0), Err(VALIDATION_FAILED))],
            (100, 0, 0),
        ),
        ("settle 1 s before the deadline", vec![(599, settle("#1", 10), Ok(()))], (90, 0, 10)),
        ("settle at the deadline", vec![(600, settle("#1", 10), Err(RESERVATION_EXPIRED))], (100, 0, 0)),
        ("release after the deadline", vec![(DAY_S, release("#1"), Err(RESERVATION_EXPIRED))], (100, 0, 0)),
        (
            "settle more than reserved after the deadline",
            vec![(600, settle("#1", 61), Err(RESERVATION_EXPIRED))],
            (100, 0, 0),
        ),
    ];
    for (case, steps, (available, held, used)) in table {
        let mut model = given(&[(t0(), purchase(100)), (t0(), reserve(60, None))]);
        for (offset_s, command, expected) in steps {
            assert_eq!(when(&mut model, command.clone(), after_s(offset_s)), expected, "{case}: {command:?}");
        }
        let balance = balance(&model);
        assert_eq!((balance.available, balance.held, balance.used), (available, held, used), "{case}");
    }
}

#[test]
fn a_reservation_holds_and_settles_in_burn_order() {
    let mut model = given(&[(t0(), purchase(100)), (t0(), promotional(50)), (t0(), reserve(80, None))]);
    let held: Vec<_> = model.grants(MEMBER).iter().map(|grant| grant.held).collect();
    assert_eq!(held, vec![30, 50]);
    assert_eq!(when(&mut model, settle("#1", 60), t0()), Ok(()));
    assert_eq!(remainders(&model), vec![90, 0], "charged 50 from the promotional grant, then 10");
    assert_eq!(balance(&model).held, 0);
}

#[test]
fn a_held_part_outlives_its_grants_expiry_then_expires() {
    let expires_at = after_s(100);
    let given_history = [(t0(), expiring(GrantSource::Promotional, 100, expires_at)), (t0(), reserve(60, None))];
    // (case, command at t0 + 200 s, expired after, used after)
    let table = [("released", release("#1"), 100, 0), ("settled in part", settle("#1", 30), 70, 30)];
    for (case, command, expired, used) in table {
        let mut model = given(&given_history);
        model.advance(expires_at);
        let at_expiry = balance(&model);
        assert_eq!((at_expiry.available, at_expiry.held, at_expiry.expired), (0, 60, 40), "{case}");
        assert_eq!(when(&mut model, command, after_s(200)), Ok(()), "{case}");
        let balance = balance(&model);
        assert_eq!((balance.available, balance.held, balance.expired, balance.used), (0, 0, expired, used), "{case}");
    }
    // A timeout on an expired grant expires the held part too.
    let mut model = given(&given_history);
    model.advance(after_s(600));
    assert_eq!((balance(&model).expired, balance(&model).held), (100, 0));
}

// ---- subscriptions: periods, renewal, rollover ---------------------------------------

#[test]
fn periods_are_calendar_months_from_the_anchor_with_the_day_clamped() {
    // (anchor, the period ends that follow)
    let table = [
        (
            "2026-01-31T12:00:00Z",
            vec!["2026-02-28T12:00:00Z", "2026-03-31T12:00:00Z", "2026-04-30T12:00:00Z", "2026-05-31T12:00:00Z"],
        ),
        ("2024-01-31T00:00:00Z", vec!["2024-02-29T00:00:00Z", "2024-03-31T00:00:00Z"]),
        ("2025-12-31T23:59:59Z", vec!["2026-01-31T23:59:59Z", "2026-02-28T23:59:59Z", "2026-03-31T23:59:59Z"]),
    ];
    for (anchor, ends) in table {
        let mut model = given(&[(instant(anchor), start("starter"))]);
        let mut period_start = instant(anchor);
        for end in ends {
            let end = instant(end);
            assert_eq!(model.subscription_period(MEMBER), Some((period_start, end)), "anchor {anchor}");
            model.advance(end - Duration::seconds(1));
            assert_eq!(model.subscription_period(MEMBER), Some((period_start, end)), "1 s before {end}");
            model.advance(end);
            period_start = end;
        }
    }
}

#[test]
fn renewal_rolls_over_the_unused_allocation_up_to_the_cap() {
    // (case, plan, usage in March, [rolled-in available, expired, granted] after April 1st)
    let table = [
        ("starter, 700 left, cap 500", "starter", 300, (500 + 1_000, 200, 2_000)),
        ("starter, 400 left, under the cap", "starter", 600, (400 + 1_000, 0, 2_000)),
        ("pro, cap 5000", "pro", 0, (5_000 + 10_000, 5_000, 20_000)),
        ("free: no rollover", "free", 40, (100, 60, 200)),
    ];
    for (case, plan_id, used, (available, expired, granted)) in table {
        let mut history = vec![(t0(), start(plan_id))];
        if used > 0 {
            history.push((t0(), usage("u1", used)));
        }
        let mut model = given(&history);
        model.advance(april_1());
        let balance = balance(&model);
        assert_eq!((balance.available, balance.expired, balance.granted), (available, expired, granted), "{case}");
        assert_eq!(model.subscription_period(MEMBER), Some((april_1(), instant("2026-05-01T00:00:00Z"))));
    }
}

#[test]
fn rolled_credit_never_rolls_again() {
    let mut model = given(&[(t0(), start("starter"))]);
    model.advance(april_1());
    let rollover = model.grants(MEMBER)[1].clone();
    assert_eq!((rollover.source, rollover.priority, rollover.remaining), (GrantSource::Rollover, 10, 500));
    assert_eq!(rollover.expires_at, Some(instant("2026-05-01T00:00:00Z")));
    // May 1st: 500 of April's allocation rolls, 500 expires, and April's
    // rollover expires whole. Three periods' books: 3000 granted.
    model.advance(instant("2026-05-01T00:00:00Z"));
    let balance = balance(&model);
    assert_eq!((balance.available, balance.expired, balance.granted), (1_500, 1_500, 3_000));
}

#[test]
fn missed_periods_are_caught_up_one_by_one() {
    let mut model = given(&[(t0(), start("starter"))]);
    model.advance(instant("2026-06-15T00:00:00Z"));
    assert_eq!(
        invoice_summary(&model),
        vec![
            ("inv_m_1".to_owned(), 1_000, "open"),
            ("inv_m_2".to_owned(), 1_000, "open"),
            ("inv_m_3".to_owned(), 1_000, "open"),
        ]
    );
    let balance = balance(&model);
    assert_eq!((balance.available, balance.expired, balance.granted), (1_500, 2_500, 4_000));
    assert_eq!(
        model.subscription_period(MEMBER),
        Some((instant("2026-06-01T00:00:00Z"), instant("2026-07-01T00:00:00Z")))
    );
}

#[test]
fn at_one_instant_timeouts_come_before_the_period_close() {
    // Reserved 300 of the allocation; the reservation's deadline is the
    // period end itself, so it is released before the rollover is counted.
    let deadline_at_period_end = [(t0(), start("starter")), (april_1() - Duration::seconds(600), reserve(300, None))];
    let mut model = given(&deadline_at_period_end);
    model.advance(april_1());
    let balance = balance(&model);
    assert_eq!((balance.available, balance.held, balance.expired), (1_500, 0, 500));

    // A reservation that outlives the close keeps its hold on the expired
    // allocation; the held part expires when the reservation ends.
    let mut model = given(&[(t0(), start("starter")), (april_1() - Duration::hours(1), reserve(300, Some(86_400)))]);
    model.advance(april_1());
    let at_close = self::balance(&model);
    assert_eq!((at_close.available, at_close.held, at_close.expired), (500 + 1_000, 300, 200));
    assert_eq!(when(&mut model, release("#1"), april_1() + Duration::hours(1)), Ok(()));
    let after = self::balance(&model);
    assert_eq!((after.available, after.held, after.expired), (1_500, 0, 500));
}

#[test]
fn the_period_close_bills_and_clears_the_debt() {
    let mut model = given(&[(t0(), start("pro")), (t0(), usage("u1", 10_500))]);
    model.advance(april_1());
    assert_eq!(invoice_summary(&model), vec![("inv_m_1".to_owned(), 5_000 + 500 * 2, "open")]);
    let balance = balance(&model);
    assert_eq!((balance.debt, balance.debt_incurred, balance.available), (0, 500, 10_000));
}

#[test]
fn a_past_due_subscription_still_renews() {
    let mut model = given(&[(t0(), start("starter")), (april_1(), payment_failed("inv_m_1"))]);
    model.advance(instant("2026-05-01T00:00:00Z"));
    assert_eq!(model.subscription_status(MEMBER), Some("past_due"));
    assert_eq!(model.invoices(MEMBER).len(), 2);
    assert_eq!(balance(&model).available, 1_500);
}

// ---- subscriptions: start, change, cancel ----------------------------------------------

#[test]
fn start_subscription_rules() {
    // (case, given, start, result, available after)
    type Row = (&'static str, Vec<MemberCommand>, MemberCommand, Result<(), Rejection>, i64);
    let table: Vec<Row> = vec![
        ("grants the allocation at once", vec![], start("starter"), Ok(()), 1_000),
        ("unknown plan", vec![register("UTC", "USD")], start("enterprise"), Err(NOT_FOUND), 0),
        ("retired plan", vec![register("UTC", "USD")], start("legacy"), Err(VALIDATION_FAILED), 0),
        ("already active", vec![start("free")], start("pro"), Err(VALIDATION_FAILED), 100),
        ("already active, same plan", vec![start("free")], start("free"), Err(VALIDATION_FAILED), 100),
        (
            "already past_due",
            vec![start("free"), priced_purchase(10, 300), cancel_now(), start("starter"), payment_failed("inv_m_1")],
            start("pro"),
            Err(VALIDATION_FAILED),
            1_010,
        ),
        ("again after a cancel", vec![start("free"), cancel_now()], start("pro"), Ok(()), 10_000),
    ];
    for (case, history, command, expected, available) in table {
        let history: Vec<_> = history.into_iter().map(|command| (t0(), command)).collect();
        let mut model = given(&history);
        assert_eq!(when(&mut model, command, t0()), expected, "{case}");
        assert_eq!(balance(&model).available, available, "{case}");
    }
}

#[test]
fn an_upgrade_takes_effect_at_once_with_prorated_credits() {
    // Ten days into a 31-day period: 21/31 of the differences remain.
    let upgraded_at = after_s(10 * DAY_S);
    let mut model = given(&[(t0(), start("starter")), (upgraded_at, change("pro"))]);
    assert_eq!(model.subscription_plan(MEMBER), Some("pro"));
    let proration = model.grants(MEMBER)[1].clone();
    assert_eq!(proration.source, GrantSource::MonthlyAllocation);
    assert_eq!(proration.remaining, 9_000 * 21 / 31);
    assert_eq!(proration.remaining, 6_096);
    assert_eq!(proration.expires_at, Some(april_1()));
    model.advance(april_1());
    // Fee of starter at period start + 4000 × 21/31 floored; pro's cap rolls.
    assert_eq!(invoice_summary(&model), vec![("inv_m_1".to_owned(), 1_000 + 2_709, "open")]);
    let balance = balance(&model);
    assert_eq!((balance.available, balance.expired), (5_000 + 10_000, 7_096 - 5_000));
}

#[test]
fn plan_change_rules() {
    let may_1 = instant("2026-05-01T00:00:00Z");
    // (case, given at t0, change at t0 + 1 day, result, plan the day after,
    //  plan after April 1st, available after April 1st)
    type Row = (
        &'static str,
        Vec<MemberCommand>,
        MemberCommand,
        Result<(), Rejection>,
        Option<&'static str>,
        Option<&'static str>,
        i64,
    );
    let table: Vec<Row> = vec![
        (
            "downgrade at renewal",
            vec![start("pro")],
            change("starter"),
            Ok(()),
            Some("pro"),
            Some("starter"),
            5_000 + 1_000,
        ),
        (
            "equal price is scheduled",
            vec![start("pro")],
            change("scale"),
            Ok(()),
            Some("pro"),
            Some("scale"),
            5_000 + 8_000,
        ),
        (
            "a later change replaces",
            vec![start("pro"), change("starter")],
            change("free"),
            Ok(()),
            Some("pro"),
            Some("free"),
            5_000 + 100,
        ),
        (
            "an upgrade drops a downgrade",
            vec![start("pro"), change("starter")],
            change("max"),
            Ok(()),
            Some("max"),
            Some("max"),
            10_000,
        ),
        (
            "an upgrade to no more credits grants none",
            vec![start("pro")],
            change("max"),
            Ok(()),
            Some("max"),
            Some("max"),
            10_000,
        ),
        (
            "an upgrade keeps a pending cancel",
            vec![start("starter"), cancel_at_period_end()],
            change("pro"),
            Ok(()),
            Some("pro"),
            Some("pro"),
            0,
        ),
        ("same plan", vec![start("pro")], change("pro"), Err(VALIDATION_FAILED), Some("pro"), Some("pro"), 15_000),
        ("unknown plan", vec![start("pro")], change("enterprise"), Err(NOT_FOUND), Some("pro"), Some("pro"), 15_000),
        (
            "retired plan",
            vec![start("pro")],
            change("legacy"),
            Err(VALIDATION_FAILED),
            Some("pro"),
            Some("pro"),
            15_000,
        ),
        (
            "another currency",
            vec![start("pro")],
            change("euro"),
            Err(VALIDATION_FAILED),
            Some("pro"),
            Some("pro"),
            15_000,
        ),
        ("no subscription", vec![purchase(1)], change("pro"), Err(NOT_FOUND), None, None, 1),
        ("canceled", vec![start("free"), cancel_now()], change("pro"), Err(NOT_FOUND), Some("free"), Some("free"), 0),
    ];
    for (case, history, command, expected, plan_next_day, plan_in_april, available) in table {
        let history: Vec<_> = history.into_iter().map(|command| (t0(), command)).collect();
        let mut model = given(&history);
        assert_eq!(when(&mut model, command, after_s(DAY_S)), expected, "{case}");
        assert_eq!(model.subscription_plan(MEMBER), plan_next_day, "{case}");
        model.advance(april_1());
        assert_eq!(model.subscription_plan(MEMBER), plan_in_april, "{case}");
        assert_eq!(balance(&model).available, available, "{case}");
    }
    // A downgrade's fee is billed from its first period on.
    let mut model = given(&[(t0(), start("pro")), (t0(), change("starter"))]);
    model.advance(may_1);
    assert_eq!(
        invoice_summary(&model),
        vec![("inv_m_1".to_owned(), 5_000, "open"), ("inv_m_2".to_owned(), 1_000, "open")]
    );
}

#[test]
fn cancel_rules() {
    // (case, given, cancel, result, status after, available after, expired after)
    type Row = (&'static str, Vec<MemberCommand>, MemberCommand, Result<(), Rejection>, Option<&'static str>, i64, i64);
    let table: Vec<Row> = vec![
        (
            "now: the allocation expires",
            vec![start("pro"), purchase(100), usage("u1", 200)],
            cancel_now(),
            Ok(()),
            Some("canceled"),
            100,
            9_800,
        ),
        ("at period end: stays active", vec![start("pro")], cancel_at_period_end(), Ok(()), Some("active"), 10_000, 0),
        (
            "at period end twice: the intent already holds",
            vec![start("pro"), cancel_at_period_end()],
            cancel_at_period_end(),
            Ok(()),
            Some("active"),
            10_000,
            0,
        ),
        (
            "now after at period end",
            vec![start("pro"), cancel_at_period_end()],
            cancel_now(),
            Ok(()),
            Some("canceled"),
            0,
            10_000,
        ),
        (
            "now, when canceled",
            vec![start("pro"), cancel_now()],
            cancel_now(),
            Err(NOT_FOUND),
            Some("canceled"),
            0,
            10_000,
        ),
        ("no subscription", vec![purchase(5)], cancel_at_period_end(), Err(NOT_FOUND), None, 5, 0),
    ];
    for (case, history, command, expected, status, available, expired) in table {
        let history: Vec<_> = history.into_iter().map(|command| (t0(), command)).collect();
        let mut model = given(&history);
        assert_eq!(when(&mut model, command, t0()), expected, "{case}");
        assert_eq!(model.subscription_status(MEMBER), status, "{case}");
        assert_eq!((balance(&model).available, balance(&model).expired), (available, expired), "{case}");
    }
}

#[test]
fn cancel_now_expires_rollover_and_bills_the_period() {
    let mut model = given(&[(t0(), start("starter")), (april_1(), priced_purchase(10, 300))]);
    assert_eq!(when(&mut model, cancel_now(), april_1()), Ok(()));
    // April's rollover 500 and allocation 1000 expire; the purchase stays.
    let balance = balance(&model);
    assert_eq!((balance.available, balance.expired), (10, 500 + 1_500));
    assert_eq!(
        invoice_summary(&model),
        vec![("inv_m_1".to_owned(), 1_000, "open"), ("inv_m_2".to_owned(), 1_000 + 300, "open")]
    );
    model.advance(instant("2026-09-01T00:00:00Z"));
    assert_eq!(model.invoices(MEMBER).len(), 2, "a canceled subscription never renews");
}

#[test]
fn cancel_at_period_end_ends_without_rollover_or_renewal() {
    let mut model = given(&[(t0(), start("starter")), (t0(), usage("u1", 300)), (t0(), cancel_at_period_end())]);
    model.advance(april_1() - Duration::seconds(1));
    assert_eq!(model.subscription_status(MEMBER), Some("active"));
    model.advance(april_1());
    assert_eq!(model.subscription_status(MEMBER), Some("canceled"));
    let balance = balance(&model);
    assert_eq!((balance.available, balance.expired, balance.granted), (0, 700, 1_000));
    assert_eq!(invoice_summary(&model), vec![("inv_m_1".to_owned(), 1_000, "open")]);
}

#[test]
fn cancel_now_bills_and_clears_the_debt() {
    let mut model = given(&[(t0(), start("pro")), (t0(), usage("u1", 10_500))]);
    assert_eq!(when(&mut model, cancel_now(), t0()), Ok(()));
    assert_eq!(invoice_summary(&model), vec![("inv_m_1".to_owned(), 5_000 + 1_000, "open")]);
    assert_eq!(balance(&model).debt, 0);
}

// ---- invoices ------------------------------------------------------------------------

#[test]
fn purchases_are_invoiced_once_or_on_the_period() {
    // (case, given at t0, invoices right after, invoices after April 1st)
    type Invoices = Vec<(String, i64, &'static str)>;
    let invoice = |number: usize, total: i64, status: &'static str| (invoice_id(MEMBER, number), total, status);
    let table: Vec<(&str, Vec<MemberCommand>, Invoices, Invoices)> = vec![
        (
            "one-off without a subscription",
            vec![priced_purchase(10, 500)],
            vec![invoice(1, 500, "open")],
            vec![invoice(1, 500, "open")],
        ),
        ("price 0 issues nothing", vec![priced_purchase(10, 0)], vec![], vec![]),
        ("no price issues nothing", vec![purchase(10)], vec![], vec![]),
        (
            "on the period's invoice",
            vec![start("starter"), priced_purchase(10, 300)],
            vec![],
            vec![invoice(1, 1_300, "open")],
        ),
        (
            "one numbering for both",
            vec![priced_purchase(10, 500), start("starter")],
            vec![invoice(1, 500, "open")],
            vec![invoice(1, 500, "open"), invoice(2, 1_000, "open")],
        ),
        ("a zero total is paid", vec![start("free")], vec![], vec![invoice(1, 0, "paid")]),
        (
            "after a cancel, one-off again",
            vec![start("free"), cancel_now(), priced_purchase(10, 200)],
            vec![invoice(1, 0, "paid"), invoice(2, 200, "open")],
            vec![invoice(1, 0, "paid"), invoice(2, 200, "open")],
        ),
    ];
    for (case, history, now, in_april) in table {
        let history: Vec<_> = history.into_iter().map(|command| (t0(), command)).collect();
        let mut model = given(&history);
        assert_eq!(invoice_summary(&model), now, "{case}");
        model.advance(april_1());
        assert_eq!(invoice_summary(&model), in_april, "{case}");
    }
}

#[test]
fn invoice_lifecycle() {
    // Every row starts from an open one-off invoice inv_m_1 (1000) and the
    // free plan's first period invoice inv_m_2, issued paid (total 0).
    let history = [(t0(), priced_purchase(10, 1_000)), (t0(), start("free")), (april_1(), MemberCommand::AdvanceTime)];
    let april_2 = instant("2026-04-02T00:00:00Z");
    // (case, commands, each result, then inv_m_1's status, subscription status)
    type Row = (&'static str, Vec<(MemberCommand, Result<(), Rejection>)>, &'static str, &'static str);
    let table: Vec<Row> = vec![
        ("pay", vec![(pay("inv_m_1"), Ok(()))], "paid", "active"),
        ("pay twice", vec![(pay("inv_m_1"), Ok(())), (pay("inv_m_1"), Err(VALIDATION_FAILED))], "paid", "active"),
        ("pay a zero invoice", vec![(pay("inv_m_2"), Err(VALIDATION_FAILED))], "open", "active"),
        ("unknown invoice", vec![(pay("inv_m_9"), Err(NOT_FOUND))], "open", "active"),
        ("another member's invoice", vec![(pay("inv_other_1"), Err(NOT_FOUND))], "open", "active"),
        ("payment failed", vec![(payment_failed("inv_m_1"), Ok(()))], "open", "past_due"),
        (
            "payment failed twice",
            vec![(payment_failed("inv_m_1"), Ok(())), (payment_failed("inv_m_1"), Ok(()))],
            "open",
            "past_due",
        ),
        ("paid after failing", vec![(payment_failed("inv_m_1"), Ok(())), (pay("inv_m_1"), Ok(()))], "paid", "active"),
        (
            "payment failed on a paid invoice",
            vec![(payment_failed("inv_m_2"), Err(VALIDATION_FAILED))],
            "open",
            "active",
        ),
        ("uncollectible", vec![(uncollectible("inv_m_1"), Ok(()))], "uncollectible", "active"),
        (
            "uncollectible twice",
            vec![(uncollectible("inv_m_1"), Ok(())), (uncollectible("inv_m_1"), Err(VALIDATION_FAILED))],
            "uncollectible",
            "active",
        ),
        (
            "uncollectible, then paid",
            vec![(uncollectible("inv_m_1"), Ok(())), (pay("inv_m_1"), Ok(()))],
            "paid",
            "active",
        ),
        ("uncollectible when paid", vec![(uncollectible("inv_m_2"), Err(VALIDATION_FAILED))], "open", "active"),
        ("void", vec![(void("inv_m_1"), Ok(()))], "void", "active"),
        ("void, then pay", vec![(void("inv_m_1"), Ok(())), (pay("inv_m_1"), Err(VALIDATION_FAILED))], "void", "active"),
        ("void twice", vec![(void("inv_m_1"), Ok(())), (void("inv_m_1"), Err(VALIDATION_FAILED))], "void", "active"),
        ("void a paid invoice", vec![(void("inv_m_2"), Err(VALIDATION_FAILED))], "open", "active"),
        (
            "payment failed after a cancel",
            vec![(cancel_now(), Ok(())), (payment_failed("inv_m_1"), Ok(()))],
            "open",
            "canceled",
        ),
    ];
    for (case, commands, invoice_status, subscription_status) in table {
        let mut model = given(&history);
        assert_eq!(
            invoice_summary(&model)[..2],
            [("inv_m_1".to_owned(), 1_000, "open"), ("inv_m_2".to_owned(), 0, "paid")]
        );
        for (command, expected) in commands {
            assert_eq!(when(&mut model, command.clone(), april_2), expected, "{case}: {command:?}");
        }
        assert_eq!(model.invoices(MEMBER)[0].status, invoice_status, "{case}");
        assert_eq!(model.subscription_status(MEMBER), Some(subscription_status), "{case}");
    }
}

// ---- the model on generated scenarios ----------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The model never panics on generated scenarios and keeps its books
    /// balanced after every step.
    #[test]
    fn generated_scenarios_keep_the_books_balanced(scenario in strategies::scenario()) {
        let mut model = model();
        for (now, step) in scenario.timeline() {
            let _ = model.apply(&step.member, &step.command, now);
            let balance = model.balance(&step.member);
            if let Some(balance) = balance {
                prop_assert!(balance.available >= 0 && balance.held >= 0 && balance.debt >= 0);
            }
            prop_assert_eq!(model.check_invariants(&step.member), Ok(()));
        }
    }
}
