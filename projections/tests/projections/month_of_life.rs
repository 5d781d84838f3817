//! A month of one member's life, projected, with every expected row written
//! out. The member, alice (time zone Europe/Paris), lives through:
//!
//! | version | when (UTC) | what |
//! | --- | --- | --- |
//! | 1–3 | 03-01 09:00 | registers, starts Starter (1,000 credits, grant g3) |
//! | 4–5 | 03-02 10:00 | usage u1: 100 credits |
//! | 6 | 03-05 08:00 | buys 500 credits for 2,500 (g6) |
//! | 7–9 | 03-10 14:00 | reserves 200 (rsv_7), settles 150 with a query |
//! | 10–12 | 03-10 14:05 | reserves 100 (rsv_10), settles 0 with a failed query |
//! | 13–14 | 03-16 00:00 | upgrades to Pro: 4,754 prorated credits (g14), 2,112 on the invoice |
//! | 15 | 03-18 12:00 | reserves 5,000 (rsv_15: g3 750, g14 4,250) |
//! | 16–17 | 03-18 12:10 | usage u2 (at 03-17 23:30): 1,100 credits, 96 of them overage |
//! | 18–19 | 03-18 12:20 | reverses u1: 96 debt cut, 4 refunded (g19) |
//! | 20–21 | 03-18 12:30 | usage u3: 50 credits, 46 of them overage |
//! | 22 | 03-18 12:40 | releases rsv_15 |
//! | 23–27 | 04-01 09:00 | renewal: 2,000 roll over (g23), 3,000 expire, inv_alice_1 (5,704) issued, 10,000 allocated (g27) |
//! | 28–29 | 04-02 10:00 | the payment fails: past due |
//! | 30–31 | 04-03 10:00 | paid: active again |
//!
//! Two plans are published first (positions 1 and 2), so alice's event of
//! version v is at position v + 2.

use chrono::{DateTime, NaiveDate, Utc};
use tally_ledger::domain::{MemberCommand, QueryStatus};
use tally_projections::{
    Balance, CreditTransaction, DailyUsage, Invoice, InvoiceLineView, NextExpiry, PageRequest, Projections,
    Subscription,
};

use crate::support::*;

const ALICE: &str = "alice";

/// The scenario, run stage by stage so that tests can look in between.
struct Month {
    log: TestLog,
}

impl Month {
    fn new() -> Month {
        Month { log: TestLog::with_plans(instant(2026, 3, 1, 9, 0), standard_plans()) }
    }

    fn start(&self) {
        self.log.execute(ALICE, register("Europe/Paris"));
        self.log.execute(ALICE, start("starter"));
    }

    fn first_weeks(&self) {
        self.log.at(instant(2026, 3, 2, 10, 0));
        self.log.execute(ALICE, usage("u1", "api.calls", 10, 100, None));
        self.log.at(instant(2026, 3, 5, 8, 0));
        self.log.execute(ALICE, purchase(500, 2_500));
        self.log.at(instant(2026, 3, 10, 14, 0));
        self.log.execute(ALICE, reserve(200, None));
        self.log.at(instant(2026, 3, 10, 14, 1));
        self.log.execute(ALICE, settle_with_query("rsv_7", 150, QueryStatus::Succeeded, 1_200, 42));
        self.log.at(instant(2026, 3, 10, 14, 5));
        self.log.execute(ALICE, reserve(100, None));
        self.log.at(instant(2026, 3, 10, 14, 6));
        self.log.execute(ALICE, settle_with_query("rsv_10", 0, QueryStatus::Failed, 30_000, 0));
    }

    fn upgrade_and_overage(&self) {
        self.log.at(instant(2026, 3, 16, 0, 0));
        self.log.execute(ALICE, MemberCommand::ChangePlan { plan_id: "pro".to_owned() });
        self.log.at(instant(2026, 3, 18, 12, 0));
        self.log.execute(ALICE, reserve(5_000, Some(3_600)));
        self.log.at(instant(2026, 3, 18, 12, 10));
        self.log.execute(ALICE, usage("u2", "api.calls", 11, 1_100, Some(instant(2026, 3, 17, 23, 30))));
        self.log.at(instant(2026, 3, 18, 12, 20));
        self.log.execute(
            ALICE,
            MemberCommand::ReverseUsage { usage_id: "u1".to_owned(), reason: Some("duplicate".to_owned()) },
        );
        self.log.at(instant(2026, 3, 18, 12, 30));
        self.log.execute(ALICE, usage("u3", "api.calls", 5, 50, None));
        self.log.at(instant(2026, 3, 18, 12, 40));
        self.log.execute(ALICE, MemberCommand::Release { reservation_id: "rsv_15".to_owned() });
    }

    fn renewal(&self) {
        self.log.at(instant(2026, 4, 1, 9, 0));
        let sweep = self.log.ledger.run_due().expect("the sweep runs");
        assert_eq!(sweep.events, 5, "rollover, expiry, invoice, renewal, allocation");
    }

    fn payment_failed(&self) {
        self.log.at(instant(2026, 4, 2, 10, 0));
        self.log.execute(
            ALICE,
            MemberCommand::RecordPaymentFailed {
                invoice_id: "inv_alice_1".to_owned(),
                reason: Some("card_declined".to_owned()),
            },
        );
    }

    fn paid(&self) {
        self.log.at(instant(2026, 4, 3, 10, 0));
        self.log.execute(ALICE, MemberCommand::PayInvoice { invoice_id: "inv_alice_1".to_owned() });
    }

    fn whole(&self) {
        self.start();
        self.first_weeks();
        self.upgrade_and_overage();
        self.renewal();
        self.payment_failed();
        self.paid();
    }

    fn projections(&self) -> Projections {
        self.log.caught_up("month")
    }
}

fn at(year: i32, month: u32, day: u32, hour: u32, minute: u32) -> DateTime<Utc> {
    instant(year, month, day, hour, minute)
}

fn all_transactions(projections: &Projections, member_id: &str) -> Vec<CreditTransaction> {
    let mut rows = Vec::new();
    let mut page = PageRequest::first(4);
    loop {
        let found = projections.transactions(member_id, &page).expect("transactions");
        rows.extend(found.items);
        match found.next_cursor {
            Some(cursor) => page = PageRequest::after(cursor, 4, page.order),
            None => return rows,
        }
    }
}

/// (seq, position, type, amount, credits, balance_after, grant, usage,
/// reservation, invoice, reason, occurred_at)
type Row = (
    u64,
    u64,
    &'static str,
    i64,
    i64,
    i64,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    DateTime<Utc>,
);

fn transaction(row: Row) -> CreditTransaction {
    let (
        seq,
        position,
        kind,
        amount,
        credits,
        balance_after,
        grant_id,
        usage_id,
        reservation_id,
        invoice_id,
        reason,
        occurred_at,
    ) = row;
    CreditTransaction {
        seq,
        position,
        kind: kind.to_owned(),
        amount,
        credits,
        balance_after,
        grant_id: grant_id.map(str::to_owned),
        usage_id: usage_id.map(str::to_owned),
        reservation_id: reservation_id.map(str::to_owned),
        invoice_id: invoice_id.map(str::to_owned),
        reason: reason.map(str::to_owned),
        occurred_at,
    }
}

#[test]
fn credit_transactions_follow_every_credit_event_and_sum_to_the_balance() {
    let month = Month::new();
    month.whole();
    let projections = month.projections();

    #[rustfmt::skip]
    let expected: Vec<CreditTransaction> = [
        (1, 5, "monthly_allocation", 1_000, 1_000, 1_000, Some("g3"), None, None, None, None, at(2026, 3, 1, 9, 0)),
        (2, 7, "usage_deduction", -100, 100, 900, None, Some("u1"), None, None, None, at(2026, 3, 2, 10, 0)),
        (3, 8, "purchase", 500, 500, 1_400, Some("g6"), None, None, None, None, at(2026, 3, 5, 8, 0)),
        (4, 9, "reservation", 0, 200, 1_400, None, None, Some("rsv_7"), None, None, at(2026, 3, 10, 14, 0)),
        (5, 10, "reservation_settlement", -150, 150, 1_250, None, None, Some("rsv_7"), None, None, at(2026, 3, 10, 14, 1)),
        (6, 12, "reservation", 0, 100, 1_250, None, None, Some("rsv_10"), None, None, at(2026, 3, 10, 14, 5)),
        (7, 13, "reservation_settlement", 0, 0, 1_250, None, None, Some("rsv_10"), None, None, at(2026, 3, 10, 14, 6)),
        (8, 16, "monthly_allocation", 4_754, 4_754, 6_004, Some("g14"), None, None, None, None, at(2026, 3, 16, 0, 0)),
        (9, 17, "reservation", 0, 5_000, 6_004, None, None, Some("rsv_15"), None, None, at(2026, 3, 18, 12, 0)),
        (10, 19, "usage_deduction", -1_100, 1_100, 4_904, None, Some("u2"), None, None, None, at(2026, 3, 18, 12, 10)),
        (11, 20, "usage_reversal", 96, 100, 5_000, None, Some("u1"), None, None, Some("duplicate"), at(2026, 3, 18, 12, 20)),
        (12, 21, "refund", 4, 4, 5_004, Some("g19"), Some("u1"), None, None, None, at(2026, 3, 18, 12, 20)),
        (13, 23, "usage_deduction", -50, 50, 4_954, None, Some("u3"), None, None, None, at(2026, 3, 18, 12, 30)),
        (14, 24, "reservation_release", 0, 5_000, 4_954, None, None, Some("rsv_15"), None, Some("released"), at(2026, 3, 18, 12, 40)),
        (15, 25, "rollover", 0, 2_000, 4_954, Some("g23"), None, None, None, None, at(2026, 4, 1, 9, 0)),
        (16, 26, "expiration", -3_000, 3_000, 1_954, Some("g14"), None, None, None, None, at(2026, 4, 1, 9, 0)),
        (17, 27, "overage_billed", 46, 46, 2_000, None, None, None, Some("inv_alice_1"), None, at(2026, 4, 1, 9, 0)),
        (18, 29, "monthly_allocation", 10_000, 10_000, 12_000, Some("g27"), None, None, None, None, at(2026, 4, 1, 9, 0)),
    ]
    .into_iter()
    .map(transaction)
    .collect();
    let found = all_transactions(&projections, ALICE);
    assert_eq!(found, expected);
    assert_eq!(found.iter().map(|row| row.amount).sum::<i64>(), 12_000);

    let newest_first = projections.transactions(ALICE, &PageRequest::first(2).newest_first()).expect("a page");
    assert_eq!(newest_first.items.iter().map(|row| row.seq).collect::<Vec<_>>(), vec![18, 17]);
}

#[test]
fn credit_balances_at_the_overage_and_after_the_renewal() {
    let month = Month::new();
    month.start();
    month.first_weeks();
    month.upgrade_and_overage();
    let projections = month.projections();
    let during_overage = Balance {
        member_id: ALICE.to_owned(),
        balance: 4_954,
        available: 5_000,
        held: 0,
        debt: 46,
        granted: 1_000 + 500 + 4_754 + 4,
        used: 100 + 150 + 1_100 + 50,
        debited: 0,
        expired: 0,
        debt_incurred: 96 + 46,
        debt_reduced: 96,
        debt_billed: 0,
        next_expiry: Some(NextExpiry { at: at(2026, 4, 1, 9, 0), amount: 5_000 }),
        transactions: 14,
        last_position: 24,
        updated_at: at(2026, 3, 18, 12, 40),
    };
    assert_eq!(projections.balance(ALICE).unwrap(), Some(during_overage));
    drop(projections);

    month.renewal();
    month.payment_failed();
    month.paid();
    let projections = month.projections();
    let after_renewal = Balance {
        member_id: ALICE.to_owned(),
        balance: 12_000,
        available: 12_000,
        held: 0,
        debt: 0,
        granted: 1_000 + 500 + 4_754 + 4 + 10_000,
        used: 1_400,
        debited: 0,
        expired: 3_000,
        debt_incurred: 142,
        debt_reduced: 96,
        debt_billed: 46,
        next_expiry: Some(NextExpiry { at: at(2026, 5, 1, 9, 0), amount: 12_000 }),
        transactions: 18,
        last_position: 29,
        updated_at: at(2026, 4, 1, 9, 0),
    };
    assert_eq!(projections.balance(ALICE).unwrap(), Some(after_renewal));
    assert_eq!(projections.balance("bob").unwrap(), None);

    let grants = projections.grants(ALICE).unwrap();
    type GrantSummary<'grant> = (&'grant str, &'grant str, u8, i64, i64, Option<DateTime<Utc>>);
    let summary: Vec<GrantSummary<'_>> = grants
        .iter()
        .map(|grant| {
            (
                grant.grant_id.as_str(),
                grant.source.as_str(),
                grant.priority,
                grant.remaining,
                grant.held,
                grant.expires_at,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("g23", "rollover", 10, 2_000, 0, Some(at(2026, 5, 1, 9, 0))),
            ("g27", "monthly_allocation", 20, 10_000, 0, Some(at(2026, 5, 1, 9, 0))),
        ]
    );

    // The same figures as the ledger's own state.
    let state = month.log.ledger.member_state(ALICE).unwrap();
    assert_eq!((state.balance().0, state.available().0, state.held().0, state.debt().0), (12_000, 12_000, 0, 0));
    assert_eq!(
        (state.totals.granted.0, state.totals.used.0, state.totals.expired.0, state.totals.debt_incurred.0),
        (16_258, 1_400, 3_000, 142)
    );
}

#[test]
fn credit_balances_count_held_credits_while_a_reservation_is_open() {
    let month = Month::new();
    month.start();
    month.first_weeks();
    month.log.at(instant(2026, 3, 16, 0, 0));
    month.log.execute(ALICE, MemberCommand::ChangePlan { plan_id: "pro".to_owned() });
    month.log.at(instant(2026, 3, 18, 12, 0));
    month.log.execute(ALICE, reserve(5_000, Some(3_600)));
    let projections = month.projections();
    let balance = projections.balance(ALICE).unwrap().expect("alice has a balance");
    assert_eq!((balance.balance, balance.available, balance.held, balance.debt), (6_004, 1_004, 5_000, 0));
    // Held credits do not lapse as spendable ones: only g14's unheld 504 does.
    assert_eq!(balance.next_expiry, Some(NextExpiry { at: at(2026, 4, 1, 9, 0), amount: 504 }));
}

fn line(line_no: u32, kind: &str, description: &str, quantity: i64, unit_amount: i64) -> InvoiceLineView {
    InvoiceLineView {
        line_no,
        kind: kind.to_owned(),
        description: description.to_owned(),
        quantity,
        unit_amount,
        amount: quantity * unit_amount,
    }
}

fn march_lines() -> Vec<InvoiceLineView> {
    vec![
        line(1, "fee", "Starter subscription", 1, 1_000),
        line(2, "purchase", "Purchase of 500 credits", 1, 2_500),
        line(3, "proration", "Upgrade to Pro (prorated)", 1, 2_112),
        line(4, "overage", "Overage: 46 credits", 46, 2),
    ]
}

fn draft(
    invoice_id: &str,
    seq: u64,
    period: (DateTime<Utc>, DateTime<Utc>),
    lines: Vec<InvoiceLineView>,
    position: u64,
) -> Invoice {
    let total = lines.iter().map(|line| line.amount).sum();
    Invoice {
        invoice_id: invoice_id.to_owned(),
        member_id: ALICE.to_owned(),
        seq,
        status: "draft".to_owned(),
        period_start: Some(period.0),
        period_end: Some(period.1),
        currency: "USD".to_owned(),
        lines,
        subtotal: total,
        total,
        amount_paid: 0,
        debt_cleared: 0,
        stripe_invoice_id: None,
        issued_at: None,
        paid_at: None,
        voided_at: None,
        uncollectible_at: None,
        payment_failures: 0,
        last_payment_failure: None,
        refunded_amount: 0,
        updated_position: position,
    }
}

#[test]
fn invoices_go_from_draft_to_open_to_paid_with_lines_summing_to_the_total() {
    let month = Month::new();
    let march = (at(2026, 3, 1, 9, 0), at(2026, 4, 1, 9, 0));
    let april = (at(2026, 4, 1, 9, 0), at(2026, 5, 1, 9, 0));

    month.start();
    let projections = month.projections();
    let opening_draft = draft("inv_alice_1", 1, march, vec![line(1, "fee", "Starter subscription", 1, 1_000)], 4);
    assert_eq!(projections.invoice(ALICE, "inv_alice_1").unwrap(), Some(opening_draft));
    drop(projections);

    month.first_weeks();
    month.upgrade_and_overage();
    let projections = month.projections();
    // The draft previews exactly what will be issued.
    let full_draft = draft("inv_alice_1", 1, march, march_lines(), 23);
    assert_eq!(projections.invoice(ALICE, "inv_alice_1").unwrap(), Some(full_draft));
    drop(projections);

    month.renewal();
    let projections = month.projections();
    let issued = Invoice {
        status: "open".to_owned(),
        period_end: Some(at(2026, 4, 1, 9, 0)),
        debt_cleared: 46,
        issued_at: Some(at(2026, 4, 1, 9, 0)),
        updated_position: 27,
        ..draft("inv_alice_1", 1, march, march_lines(), 27)
    };
    assert_eq!(issued.total, 5_704);
    assert_eq!(projections.invoice(ALICE, "inv_alice_1").unwrap(), Some(issued.clone()));
    let next_draft = draft("inv_alice_2", 2, april, vec![line(1, "fee", "Pro subscription", 1, 5_000)], 28);
    assert_eq!(projections.invoice(ALICE, "inv_alice_2").unwrap(), Some(next_draft.clone()));
    drop(projections);

    month.payment_failed();
    let projections = month.projections();
    let failed = Invoice {
        payment_failures: 1,
        last_payment_failure: Some("card_declined".to_owned()),
        refunded_amount: 0,
        updated_position: 30,
        ..issued.clone()
    };
    assert_eq!(projections.invoice(ALICE, "inv_alice_1").unwrap(), Some(failed.clone()));
    drop(projections);

    month.paid();
    let projections = month.projections();
    let paid = Invoice {
        status: "paid".to_owned(),
        amount_paid: 5_704,
        paid_at: Some(at(2026, 4, 3, 10, 0)),
        updated_position: 32,
        ..failed
    };
    let page = projections.invoices(ALICE, &PageRequest::first(10)).unwrap();
    assert_eq!(page.items, vec![paid.clone(), next_draft.clone()]);
    assert_eq!(page.next_cursor, None);
    let newest_first = projections.invoices(ALICE, &PageRequest::first(1).newest_first()).unwrap();
    assert_eq!(newest_first.items, vec![next_draft]);
    let older = projections
        .invoices(
            ALICE,
            &PageRequest::after(
                newest_first.next_cursor.expect("a next page"),
                1,
                tally_projections::Order::NewestFirst,
            ),
        )
        .unwrap();
    assert_eq!(older.items, vec![paid.clone()]);
    assert_eq!(paid.lines.iter().map(|line| line.amount).sum::<i64>(), paid.total);
    assert_eq!(projections.invoice("bob", "inv_alice_1").unwrap(), None, "another member's invoice is not found");
}

fn subscription(
    status: &str,
    plan: (&str, &str, i64, i64),
    period: (DateTime<Utc>, DateTime<Utc>),
    position: u64,
) -> Subscription {
    let (plan_id, plan_name, price, monthly_credits) = plan;
    let pro = plan_id == "pro";
    Subscription {
        member_id: ALICE.to_owned(),
        plan_id: plan_id.to_owned(),
        plan_name: plan_name.to_owned(),
        plan_version: 1,
        price,
        currency: "USD".to_owned(),
        monthly_credits,
        rollover_enabled: true,
        rollover_max_credits: if pro { 2_000 } else { 500 },
        overage_allowed: pro,
        overage_limit_credits: if pro { 2_000 } else { 0 },
        overage_unit_price: if pro { 2 } else { 0 },
        status: status.to_owned(),
        billing: "tally".to_owned(),
        started_at: at(2026, 3, 1, 9, 0),
        period_start: period.0,
        period_end: period.1,
        period_closed: false,
        cancel_at_period_end: false,
        cancel_at: None,
        canceled_at: None,
        scheduled_plan_id: None,
        scheduled_change_at: None,
        past_due_invoice_id: None,
        stripe_subscription_id: None,
        stripe_customer_id: None,
        updated_position: position,
    }
}

#[test]
fn subscriptions_follow_start_upgrade_renewal_past_due_and_payment() {
    let month = Month::new();
    let march = (at(2026, 3, 1, 9, 0), at(2026, 4, 1, 9, 0));
    let april = (at(2026, 4, 1, 9, 0), at(2026, 5, 1, 9, 0));
    let starter = ("starter", "Starter", 1_000, 1_000);
    let pro = ("pro", "Pro", 5_000, 10_000);

    month.start();
    let projections = month.projections();
    assert_eq!(projections.subscription(ALICE).unwrap(), Some(subscription("active", starter, march, 4)));
    drop(projections);

    month.first_weeks();
    month.upgrade_and_overage();
    let projections = month.projections();
    assert_eq!(projections.subscription(ALICE).unwrap(), Some(subscription("active", pro, march, 15)));
    drop(projections);

    month.renewal();
    month.payment_failed();
    let projections = month.projections();
    let past_due = Subscription {
        past_due_invoice_id: Some("inv_alice_1".to_owned()),
        ..subscription("past_due", pro, april, 31)
    };
    assert_eq!(projections.subscription(ALICE).unwrap(), Some(past_due));
    drop(projections);

    month.paid();
    let projections = month.projections();
    assert_eq!(projections.subscription(ALICE).unwrap(), Some(subscription("active", pro, april, 33)));
    assert_eq!(projections.subscription("bob").unwrap(), None);
}

fn day(year: i32, month: u32, day: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(year, month, day).expect("a valid day")
}

#[allow(clippy::too_many_arguments)]
fn usage_row(
    on: NaiveDate,
    metric: &str,
    quantity: i64,
    credits: i64,
    records: i64,
    query_count: i64,
    query_errors: i64,
    durations: (i64, i64),
) -> DailyUsage {
    DailyUsage {
        day: on,
        metric: metric.to_owned(),
        quantity,
        credits,
        records,
        query_count,
        query_errors,
        duration_ms_total: durations.0,
        duration_ms_max: durations.1,
    }
}

#[test]
fn daily_usage_stats_count_usage_and_queries_by_paris_days() {
    let month = Month::new();
    month.whole();
    let projections = month.projections();
    let page = projections.daily_usage(ALICE, day(2026, 3, 1), day(2026, 3, 31), &PageRequest::first(100)).unwrap();
    assert_eq!(
        page.items,
        vec![
            usage_row(day(2026, 3, 2), "api.calls", 10, 100, 1, 0, 0, (0, 0)),
            usage_row(day(2026, 3, 10), "query/int1/q1", 42, 150, 0, 2, 1, (31_200, 30_000)),
            // u2 happened at 23:30 UTC on the 17th: 00:30 on the 18th in Paris.
            usage_row(day(2026, 3, 18), "api.calls", 16, 1_150, 2, 0, 0, (0, 0)),
        ]
    );
    assert_eq!(page.next_cursor, None);
    let only_the_tenth =
        projections.daily_usage(ALICE, day(2026, 3, 10), day(2026, 3, 10), &PageRequest::first(100)).unwrap();
    assert_eq!(only_the_tenth.items.len(), 1);
}
