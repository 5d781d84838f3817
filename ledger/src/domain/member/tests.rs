//! Decider tests: given a member's life so far, when a command arrives at an
//! instant, then these events (or this rejection). One helper, [`Life`],
//! runs commands through `decide` and folds their events, as the shell does.

use super::*;
use crate::domain::amount::{Credits, MinorUnits};
use crate::domain::catalog::{Catalog, CatalogCommand, Interval, Overage, Plan, Rollover};
use crate::domain::error::DomainError;
use chrono::{DateTime, Duration, TimeZone, Utc};
use std::collections::BTreeMap;

const MEMBER: &str = "m1";

fn at(year: i32, month: u32, day: u32) -> Timestamp {
    Utc.with_ymd_and_hms(year, month, day, 0, 0, 0).unwrap()
}

fn plan(plan_id: &str, price: i64, monthly_credits: i64) -> Plan {
    Plan {
        plan_id: plan_id.to_owned(),
        name: plan_id.to_uppercase(),
        price: MinorUnits(price),
        currency: "USD".to_owned(),
        interval: Interval::Month,
        monthly_credits: Credits(monthly_credits),
        rollover: Rollover { enabled: false, max_credits: Credits(0) },
        overage: Overage { allowed: false, limit_credits: Credits(0), unit_price: MinorUnits(0) },
        rate_limit_per_minute: 60,
        stripe_price_id: None,
    }
}

/// free: 100 credits; starter: $10, 1,000 credits, rollover up to 500;
/// pro: $50, 10,000 credits, rollover up to 5,000, overage up to 2,000 at 2¢;
/// euro: priced in EUR.
fn catalog() -> Catalog {
    let mut starter = plan("starter", 1_000, 1_000);
    starter.rollover = Rollover { enabled: true, max_credits: Credits(500) };
    let mut pro = plan("pro", 5_000, 10_000);
    pro.rollover = Rollover { enabled: true, max_credits: Credits(5_000) };
    pro.overage = Overage { allowed: true, limit_credits: Credits(2_000), unit_price: MinorUnits(2) };
    let mut euro = plan("euro", 900, 900);
    euro.currency = "EUR".to_owned();
    let mut catalog = Catalog::default();
    for plan in [plan("free", 0, 100), starter, pro, euro, plan("legacy", 300, 300)] {
        for event in catalog.decide(&CatalogCommand::PublishPlan(plan)).unwrap() {
            catalog.apply(&event);
        }
    }
    for event in catalog.decide(&CatalogCommand::RetirePlan { plan_id: "legacy".to_owned() }).unwrap() {
        catalog.apply(&event);
    }
    catalog
}

/// A member's life: commands decided and folded in order, as the shell does.
struct Life {
    catalog: Catalog,
    state: MemberState,
    now: Timestamp,
    usages: BTreeMap<String, UsageFacts>,
    history: Vec<Occurred<MemberEvent>>,
}

impl Life {
    fn new(now: Timestamp) -> Life {
        Life { catalog: catalog(), state: MemberState::default(), now, usages: BTreeMap::new(), history: Vec::new() }
    }

    fn at(&mut self, now: Timestamp) -> &mut Life {
        self.now = now;
        self
    }

    fn when(&mut self, command: MemberCommand) -> Result<Vec<MemberEvent>, DomainError> {
        let usage_id = match &command {
            MemberCommand::RecordUsage(usage) => Some(usage.usage_id.clone()),
            MemberCommand::ReverseUsage { usage_id, .. } => Some(usage_id.clone()),
            _ => None,
        };
        let context = Context {
            member_id: MEMBER,
            now: self.now,
            catalog: &self.catalog,
            usage: usage_id.as_ref().and_then(|id| self.usages.get(id).copied()),
        };
        let decision = decide(&self.state, &command, &context)?;
        for occurred in &decision {
            self.state.apply(&occurred.event);
            match &occurred.event {
                MemberEvent::UsageRecorded { usage_id, credits, .. } => {
                    self.usages.insert(usage_id.clone(), UsageFacts { credits: *credits, reversed: false });
                }
                MemberEvent::UsageReversed { usage_id, .. } => {
                    self.usages.get_mut(usage_id).unwrap().reversed = true;
                }
                _ => {}
            }
        }
        self.history.extend(decision.iter().cloned());
        Ok(decision.into_iter().map(|occurred| occurred.event).collect())
    }

    /// Run a command that must succeed.
    fn run(&mut self, command: MemberCommand) -> Vec<MemberEvent> {
        self.when(command.clone()).unwrap_or_else(|error| panic!("{command:?} was refused: {error}"))
    }

    fn rejection(&mut self, command: MemberCommand) -> DomainError {
        let before = self.state.clone();
        let error = self.when(command).expect_err("the command should be refused");
        assert_eq!(self.state, before, "a rejection changes nothing");
        error
    }

    fn check_invariants(&self) {
        let totals = self.state.totals;
        assert_eq!(
            totals.granted.plus(totals.debt_incurred),
            totals.used.plus(totals.debited).plus(totals.expired).plus(self.state.remaining()),
            "conservation"
        );
        assert!(self.state.available() >= Credits::ZERO);
        let replayed =
            self.history.iter().fold(MemberState::default(), |state, occurred| state.evolve(&occurred.event));
        assert_eq!(replayed, self.state, "replay equals live state");
    }
}

fn start(plan_id: &str) -> MemberCommand {
    MemberCommand::StartSubscription {
        plan_id: plan_id.to_owned(),
        billing: Billing::Tally,
        stripe_subscription_id: None,
    }
}

fn usage(usage_id: &str, credits: i64) -> MemberCommand {
    MemberCommand::RecordUsage(RecordUsage {
        usage_id: usage_id.to_owned(),
        metric: "api_calls".to_owned(),
        quantity: 1,
        credits: Credits(credits),
        occurred_at: None,
        integration_id: None,
        query_id: None,
    })
}

fn grant(source: GrantSource, amount: i64) -> MemberCommand {
    MemberCommand::GrantCredits(GrantCredits::new(source, amount))
}

fn grant_with(source: GrantSource, amount: i64, edit: impl FnOnce(&mut GrantCredits)) -> MemberCommand {
    let mut command = GrantCredits::new(source, amount);
    edit(&mut command);
    MemberCommand::GrantCredits(command)
}

fn part(grant_id: &str, amount: i64) -> GrantPart {
    GrantPart { grant_id: grant_id.to_owned(), amount: Credits(amount) }
}

fn code(error: DomainError) -> &'static str {
    error.code()
}

fn field(error: DomainError) -> Option<&'static str> {
    error.field()
}

// --- registration ---------------------------------------------------------

#[test]
fn commands_other_than_start_grant_and_register_need_an_existing_member() {
    let mut life = Life::new(at(2026, 1, 1));
    let not_found = DomainError::MemberNotFound { member_id: MEMBER.to_owned() };
    assert_eq!(life.rejection(usage("u1", 1)), not_found);
    assert_eq!(life.rejection(MemberCommand::Reserve { amount: Credits(1), ttl_s: None }), not_found);
    assert_eq!(life.rejection(MemberCommand::AdvanceTime), not_found);
    assert_eq!(not_found.to_string(), format!("member `{MEMBER}` not found"));
}

#[test]
fn a_first_grant_registers_the_member_with_defaults_in_the_same_append() {
    let mut life = Life::new(at(2026, 1, 1));
    let events = life.run(grant(GrantSource::Promotional, 50));
    assert_eq!(
        events[0],
        MemberEvent::MemberRegistered {
            member_id: MEMBER.to_owned(),
            time_zone: "UTC".to_owned(),
            currency: "USD".to_owned(),
            stripe_customer_id: None
        }
    );
    assert!(matches!(&events[1], MemberEvent::CreditsGranted { grant_id, .. } if grant_id == "g2"));
}

#[test]
fn register_validates_the_profile_and_an_unchanged_profile_writes_nothing() {
    let mut life = Life::new(at(2026, 1, 1));
    let profile = MemberProfile { time_zone: "Mars/Olympus".to_owned(), ..MemberProfile::default() };
    assert_eq!(field(life.rejection(MemberCommand::Register(profile))), Some("time_zone"));
    let profile = MemberProfile { currency: "usd".to_owned(), ..MemberProfile::default() };
    assert_eq!(field(life.rejection(MemberCommand::Register(profile))), Some("currency"));

    let profile = MemberProfile { time_zone: "Europe/Paris".to_owned(), ..MemberProfile::default() };
    assert_eq!(life.run(MemberCommand::Register(profile.clone())).len(), 1);
    assert_eq!(life.run(MemberCommand::Register(profile.clone())), vec![]);
    let changed = MemberProfile { stripe_customer_id: Some("cus_123".to_owned()), ..profile };
    assert!(matches!(life.run(MemberCommand::Register(changed))[..], [MemberEvent::MemberProfileChanged { .. }]));
}

#[test]
fn currency_cannot_change_under_a_live_subscription() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("starter"));
    let profile = MemberProfile { currency: "EUR".to_owned(), ..MemberProfile::default() };
    assert_eq!(field(life.rejection(MemberCommand::Register(profile))), Some("currency"));
}

// --- grants and burn-down ---------------------------------------------------

#[test]
fn grants_take_default_priority_and_category_per_source() {
    let mut life = Life::new(at(2026, 1, 1));
    let events = life.run(grant(GrantSource::Promotional, 10));
    let MemberEvent::CreditsGranted { terms, .. } = &events[1] else { panic!() };
    assert_eq!((terms.priority, terms.category), (30, GrantCategory::Promotional));
    let events = life.run(grant_with(GrantSource::Purchase, 10, |g| g.price = Some(MinorUnits(0))));
    let MemberEvent::CreditsGranted { terms, .. } = &events[0] else { panic!() };
    assert_eq!((terms.priority, terms.category), (50, GrantCategory::Paid));
    let events = life.run(grant_with(GrantSource::Adjustment, 10, |g| {
        g.reason = Some("goodwill".to_owned());
        g.category = Some(GrantCategory::Promotional);
    }));
    let MemberEvent::CreditsGranted { terms, .. } = &events[0] else { panic!() };
    assert_eq!((terms.priority, terms.category), (40, GrantCategory::Promotional));
}

#[test]
fn grant_rejections_name_their_field() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(grant(GrantSource::Promotional, 1));
    let now = life.now;
    let cases: Vec<(MemberCommand, &str)> = vec![
        (grant(GrantSource::Promotional, 0), "amount"),
        (grant(GrantSource::Promotional, -5), "amount"),
        (grant(GrantSource::Promotional, 1_000_000_001), "amount"),
        (grant(GrantSource::MonthlyAllocation, 5), "source"),
        (grant(GrantSource::Refund, 5), "source"),
        (grant(GrantSource::Rollover, 5), "source"),
        (grant_with(GrantSource::Promotional, 5, |g| g.priority = Some(101)), "priority"),
        (grant_with(GrantSource::Promotional, 5, |g| g.category = Some(GrantCategory::Paid)), "category"),
        (grant(GrantSource::Adjustment, 5), "reason"),
        (grant_with(GrantSource::Adjustment, 5, |g| g.reason = Some("  ".to_owned())), "reason"),
        (grant_with(GrantSource::Promotional, 5, |g| g.price = Some(MinorUnits(10))), "price"),
        (grant_with(GrantSource::Purchase, 5, |g| g.price = Some(MinorUnits(-1))), "price"),
        (grant_with(GrantSource::Promotional, 5, |g| g.expires_at = Some(now)), "expires_at"),
        (
            grant_with(GrantSource::Promotional, 5, |g| g.expires_at = Some(now + Duration::days(365 * 101))),
            "expires_at",
        ),
        (
            grant_with(GrantSource::Promotional, 5, |g| g.effective_at = Some(now + Duration::days(365 * 101))),
            "effective_at",
        ),
        (
            grant_with(GrantSource::Promotional, 5, |g| {
                g.effective_at = Some(now + Duration::days(3));
                g.expires_at = Some(now + Duration::days(2));
            }),
            "expires_at",
        ),
    ];
    for (command, expected_field) in cases {
        let error = life.rejection(command.clone());
        assert_eq!((error.code(), error.field()), ("validation_failed", Some(expected_field)), "{command:?}");
    }
}

#[test]
fn deductions_burn_lowest_priority_then_soonest_expiry_then_promotional_then_oldest() {
    let now = at(2026, 1, 1);
    let mut life = Life::new(now);
    life.run(grant(GrantSource::Purchase, 10)); // g2: priority 50, no expiry
    life.run(grant_with(GrantSource::Adjustment, 10, |g| g.reason = Some("r".into()))); // g3: 40, paid, no expiry
    life.run(grant_with(GrantSource::Adjustment, 10, |g| {
        g.reason = Some("r".into());
        g.category = Some(GrantCategory::Promotional);
    })); // g4: 40, promotional, no expiry
    life.run(grant_with(GrantSource::Adjustment, 10, |g| {
        g.reason = Some("r".into());
        g.expires_at = Some(now + Duration::days(30));
    })); // g5: 40, expires in 30 days
    life.run(grant_with(GrantSource::Adjustment, 10, |g| {
        g.reason = Some("r".into());
        g.expires_at = Some(now + Duration::days(10));
    })); // g6: 40, expires in 10 days
    life.run(grant(GrantSource::Promotional, 10)); // g7: priority 30
    life.run(grant_with(GrantSource::Adjustment, 10, |g| g.reason = Some("r".into()))); // g8: 40, paid, newer than g3

    let events = life.run(usage("u1", 65));
    assert_eq!(
        events[1],
        MemberEvent::CreditsDeducted {
            usage_id: "u1".to_owned(),
            amount: Credits(65),
            parts: vec![
                part("g7", 10),
                part("g6", 10),
                part("g5", 10),
                part("g4", 10),
                part("g3", 10),
                part("g8", 10),
                part("g2", 5)
            ],
            debt: Credits(0),
            unit_price: MinorUnits(0),
        }
    );
    life.check_invariants();
}

#[test]
fn a_scheduled_grant_is_granted_when_it_falls_due() {
    let now = at(2026, 1, 1);
    let mut life = Life::new(now);
    let events = life.run(grant_with(GrantSource::Promotional, 40, |g| g.effective_at = Some(now + Duration::days(2))));
    assert!(matches!(&events[1], MemberEvent::CreditsGrantScheduled { schedule_id, .. } if schedule_id == "sg2"));
    assert_eq!(life.state.available(), Credits(0));
    life.at(now + Duration::days(2) - Duration::seconds(1));
    assert_eq!(life.run(MemberCommand::AdvanceTime), vec![]);
    life.at(now + Duration::days(2));
    let events = life.run(MemberCommand::AdvanceTime);
    assert!(matches!(&events[..], [MemberEvent::CreditsGranted { terms, .. }] if terms.amount == Credits(40)));
    assert_eq!(life.history.last().unwrap().occurred_at, now + Duration::days(2));
    // Granted once: later decisions do not grant it again.
    life.at(now + Duration::days(3));
    assert_eq!(life.run(MemberCommand::AdvanceTime), vec![]);
    assert_eq!(life.state.available(), Credits(40));
    life.check_invariants();
}

#[test]
fn a_grant_is_spendable_until_just_before_it_expires() {
    let now = at(2026, 1, 1);
    let mut life = Life::new(now);
    life.run(grant_with(GrantSource::Promotional, 40, |g| g.expires_at = Some(now + Duration::hours(1))));
    life.at(now + Duration::hours(1) - Duration::seconds(1));
    life.run(usage("u1", 15));
    life.at(now + Duration::hours(1));
    assert_eq!(
        life.rejection(usage("u2", 1)),
        DomainError::InsufficientCredits { requested: Credits(1), available: Credits(0) }
    );
    let events = life.run(MemberCommand::AdvanceTime);
    assert_eq!(events, vec![MemberEvent::CreditsExpired { grant_id: "g2".to_owned(), amount: Credits(25) }]);
    assert_eq!(life.state.totals.expired, Credits(25));
    life.check_invariants();
}

// --- usage, overage, debit, reversal ------------------------------------

#[test]
fn usage_is_recorded_with_its_deduction_in_one_decision() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(grant(GrantSource::Purchase, 100));
    let events = life.run(usage("u1", 30));
    assert_eq!(events.len(), 2);
    assert!(
        matches!(&events[0], MemberEvent::UsageRecorded { usage_id, credits, .. } if usage_id == "u1" && *credits == Credits(30))
    );
    assert!(matches!(&events[1], MemberEvent::CreditsDeducted { parts, .. } if *parts == vec![part("g2", 30)]));
    assert_eq!(life.state.balance(), Credits(70));
}

#[test]
fn usage_beyond_available_is_refused_without_overage() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("starter"));
    assert_eq!(
        life.rejection(usage("u1", 1_001)),
        DomainError::InsufficientCredits { requested: Credits(1_001), available: Credits(1_000) }
    );
    assert_eq!(code(life.rejection(usage("u1", 1_001))), "insufficient_credits");
}

#[test]
fn overage_becomes_debt_up_to_the_plan_limit() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("pro"));
    let events = life.run(usage("u1", 11_500));
    assert!(
        matches!(&events[1], MemberEvent::CreditsDeducted { debt, unit_price, .. } if *debt == Credits(1_500) && *unit_price == MinorUnits(2))
    );
    assert_eq!(
        (life.state.available(), life.state.debt(), life.state.balance()),
        (Credits(0), Credits(1_500), Credits(-1_500))
    );
    // 500 more fits the 2,000 limit exactly; one more does not.
    assert_eq!(
        life.rejection(usage("u2", 501)),
        DomainError::InsufficientCredits { requested: Credits(501), available: Credits(0) }
    );
    life.run(usage("u2", 500));
    assert_eq!(life.state.debt(), Credits(2_000));
    // A later grant does not repay debt.
    life.run(grant(GrantSource::Promotional, 300));
    assert_eq!((life.state.available(), life.state.debt()), (Credits(300), Credits(2_000)));
    life.check_invariants();
}

#[test]
fn past_due_members_may_spend_but_not_into_overage() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("pro"));
    life.run(usage("u1", 10_100));
    life.at(at(2026, 2, 1));
    life.run(MemberCommand::AdvanceTime);
    life.run(MemberCommand::RecordPaymentFailed { invoice_id: "inv_m1_1".into(), reason: None });
    assert_eq!(life.state.subscription.as_ref().unwrap().status, SubscriptionStatus::PastDue);
    life.run(usage("u2", 10_000));
    assert_eq!(code(life.rejection(usage("u3", 1))), "insufficient_credits");
    life.run(MemberCommand::PayInvoice { invoice_id: "inv_m1_1".into() });
    assert_eq!(life.state.subscription.as_ref().unwrap().status, SubscriptionStatus::Active);
    life.run(usage("u3", 1));
    assert_eq!(life.state.debt(), Credits(1));
    life.check_invariants();
}

#[test]
fn usage_rejections_name_their_field() {
    let now = at(2026, 1, 10);
    let mut life = Life::new(now);
    life.run(grant(GrantSource::Purchase, 100));
    life.run(usage("u1", 1));
    let with = |edit: fn(&mut RecordUsage)| {
        let MemberCommand::RecordUsage(mut record) = usage("u2", 1) else { unreachable!() };
        edit(&mut record);
        MemberCommand::RecordUsage(record)
    };
    let mut cases: Vec<(MemberCommand, &str)> = vec![
        (usage("u1", 1), "usage_id"),
        (usage("u2", 0), "credits"),
        (usage("u2", 1_000_000_001), "credits"),
        (usage("", 1), "usage_id"),
        (usage("has space", 1), "usage_id"),
        (usage(&"x".repeat(129), 1), "usage_id"),
        (with(|r| r.metric = String::new()), "metric"),
        (with(|r| r.quantity = 0), "quantity"),
        (with(|r| r.quantity = 1_000_000_001), "quantity"),
        (with(|r| r.integration_id = Some("bad id".into())), "integration_id"),
    ];
    let MemberCommand::RecordUsage(mut old) = usage("u2", 1) else { unreachable!() };
    old.occurred_at = Some(now - Duration::days(7) - Duration::seconds(1));
    cases.push((MemberCommand::RecordUsage(old.clone()), "occurred_at"));
    old.occurred_at = Some(now + Duration::minutes(5) + Duration::seconds(1));
    cases.push((MemberCommand::RecordUsage(old.clone()), "occurred_at"));
    for (command, expected_field) in cases {
        let error = life.rejection(command.clone());
        assert_eq!((error.code(), error.field()), ("validation_failed", Some(expected_field)), "{command:?}");
    }
    old.occurred_at = Some(now - Duration::days(7));
    life.run(MemberCommand::RecordUsage(old));
}

#[test]
fn admin_debit_takes_in_burn_order_and_never_into_debt() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("pro"));
    life.run(grant(GrantSource::Purchase, 50));
    assert_eq!(
        life.rejection(MemberCommand::DebitCredits { amount: Credits(10_051), reason: "fraud".into() }),
        DomainError::InsufficientCredits { requested: Credits(10_051), available: Credits(10_050) }
    );
    assert_eq!(
        field(life.rejection(MemberCommand::DebitCredits { amount: Credits(5), reason: String::new() })),
        Some("reason")
    );
    let events = life.run(MemberCommand::DebitCredits { amount: Credits(10_010), reason: "fraud".into() });
    assert_eq!(
        events,
        vec![MemberEvent::CreditsDebited {
            amount: Credits(10_010),
            parts: vec![part("g3", 10_000), part("g4", 10)],
            reason: "fraud".into()
        }]
    );
    life.check_invariants();
}

#[test]
fn reversal_cuts_debt_first_then_refunds_the_rest() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("pro"));
    life.run(usage("u1", 9_000));
    life.run(usage("u2", 1_600)); // 1,000 from the allocation, 600 debt
    let events = life.run(MemberCommand::ReverseUsage { usage_id: "u1".into(), reason: Some("bug".into()) });
    assert_eq!(
        events[0],
        MemberEvent::UsageReversed {
            usage_id: "u1".into(),
            credits: Credits(9_000),
            debt_reduced: Credits(600),
            refunded: Credits(8_400),
            reason: Some("bug".into())
        }
    );
    let MemberEvent::CreditsGranted { terms, usage_id, .. } = &events[1] else { panic!("{events:?}") };
    assert_eq!(
        (terms.source, terms.category, terms.amount, terms.expires_at, usage_id.as_deref()),
        (GrantSource::Refund, GrantCategory::Paid, Credits(8_400), None, Some("u1"))
    );
    assert_eq!(
        (life.state.debt(), life.state.available(), life.state.totals.used),
        (Credits(0), Credits(8_400), Credits(10_600))
    );
    assert_eq!(
        field(life.rejection(MemberCommand::ReverseUsage { usage_id: "u1".into(), reason: None })),
        Some("usage_id")
    );
    assert_eq!(
        life.rejection(MemberCommand::ReverseUsage { usage_id: "nope".into(), reason: None }),
        DomainError::UsageNotFound { usage_id: "nope".into() }
    );
    life.check_invariants();
}

// --- reservations -------------------------------------------------------

#[test]
fn reservations_hold_in_burn_order_and_settle_part_releasing_the_rest() {
    let now = at(2026, 1, 1);
    let mut life = Life::new(now);
    life.run(grant(GrantSource::Promotional, 30));
    life.run(grant(GrantSource::Purchase, 100));
    let events = life.run(MemberCommand::Reserve { amount: Credits(50), ttl_s: Some(60) });
    assert_eq!(
        events,
        vec![MemberEvent::CreditsReserved {
            reservation_id: "rsv_4".into(),
            amount: Credits(50),
            holds: vec![part("g2", 30), part("g3", 20)],
            deadline: now + Duration::seconds(60)
        }]
    );
    assert_eq!(
        (life.state.available(), life.state.held(), life.state.balance()),
        (Credits(80), Credits(50), Credits(130))
    );
    assert_eq!(code(life.rejection(usage("u1", 81))), "insufficient_credits");

    let query = QueryExecution {
        integration_id: "int1".into(),
        query_id: "q1".into(),
        status: QueryStatus::Succeeded,
        duration_ms: 120,
        rows: 7,
        bytes: 0,
        cache_hit: false,
        error_code: None,
        api_usage: None,
    };
    let events = life.run(MemberCommand::Settle {
        reservation_id: "rsv_4".into(),
        amount: Credits(35),
        query: Some(query.clone()),
    });
    assert_eq!(
        events,
        vec![
            MemberEvent::ReservationSettled {
                reservation_id: "rsv_4".into(),
                charged: Credits(35),
                parts: vec![part("g2", 30), part("g3", 5)],
                released: Credits(15),
                released_parts: vec![part("g3", 15)]
            },
            MemberEvent::QueryExecuted { reservation_id: "rsv_4".into(), execution: query, credits: Credits(35) },
        ]
    );
    assert_eq!((life.state.available(), life.state.held()), (Credits(95), Credits(0)));
    // The same settle again is answered without change; another amount is refused.
    assert_eq!(
        life.run(MemberCommand::Settle { reservation_id: "rsv_4".into(), amount: Credits(35), query: None }),
        vec![]
    );
    assert_eq!(
        field(life.rejection(MemberCommand::Settle {
            reservation_id: "rsv_4".into(),
            amount: Credits(36),
            query: None
        })),
        Some("amount")
    );
    assert_eq!(
        field(life.rejection(MemberCommand::Release { reservation_id: "rsv_4".into() })),
        Some("reservation_id")
    );
    life.check_invariants();
}

#[test]
fn reservation_rules_and_rejections() {
    let now = at(2026, 1, 1);
    let mut life = Life::new(now);
    life.run(start("pro"));
    // Never into overage, even on a plan that allows it.
    assert_eq!(
        code(life.rejection(MemberCommand::Reserve { amount: Credits(10_001), ttl_s: None })),
        "insufficient_credits"
    );
    assert_eq!(field(life.rejection(MemberCommand::Reserve { amount: Credits(0), ttl_s: None })), Some("amount"));
    assert_eq!(field(life.rejection(MemberCommand::Reserve { amount: Credits(5), ttl_s: Some(0) })), Some("ttl_s"));
    assert_eq!(
        field(life.rejection(MemberCommand::Reserve { amount: Credits(5), ttl_s: Some(86_401) })),
        Some("ttl_s")
    );
    assert_eq!(code(life.rejection(MemberCommand::Release { reservation_id: "rsv_99".into() })), "not_found");

    let events = life.run(MemberCommand::Reserve { amount: Credits(100), ttl_s: None });
    let MemberEvent::CreditsReserved { reservation_id, deadline, .. } = &events[0] else { panic!() };
    assert_eq!(*deadline, now + Duration::seconds(600));
    let reservation_id = reservation_id.clone();
    assert_eq!(
        field(life.rejection(MemberCommand::Settle {
            reservation_id: reservation_id.clone(),
            amount: Credits(101),
            query: None
        })),
        Some("amount")
    );
    life.run(MemberCommand::Release { reservation_id: reservation_id.clone() });
    assert_eq!(life.run(MemberCommand::Release { reservation_id: reservation_id.clone() }), vec![]);
    assert_eq!(life.state.available(), Credits(10_000));
    life.check_invariants();
}

#[test]
fn a_reservation_times_out_at_its_deadline_and_late_settles_are_expired() {
    let now = at(2026, 1, 1);
    let mut life = Life::new(now);
    life.run(grant(GrantSource::Purchase, 100));
    life.run(MemberCommand::Reserve { amount: Credits(40), ttl_s: Some(30) });
    life.at(now + Duration::seconds(30));
    assert_eq!(
        life.rejection(MemberCommand::Settle { reservation_id: "rsv_3".into(), amount: Credits(10), query: None }),
        DomainError::ReservationExpired { reservation_id: "rsv_3".into() }
    );
    let events = life.run(MemberCommand::AdvanceTime);
    assert_eq!(
        events,
        vec![MemberEvent::ReservationReleased {
            reservation_id: "rsv_3".into(),
            reason: ReleaseReason::Expired,
            released: Credits(40),
            released_parts: vec![part("g2", 40)]
        }]
    );
    assert_eq!(code(life.rejection(MemberCommand::Release { reservation_id: "rsv_3".into() })), "reservation_expired");
    assert_eq!(life.state.available(), Credits(100));
}

#[test]
fn a_held_part_outlives_its_grants_expiry_and_expires_when_released() {
    let now = at(2026, 1, 1);
    let mut life = Life::new(now);
    life.run(grant_with(GrantSource::Promotional, 100, |g| g.expires_at = Some(now + Duration::seconds(100))));
    life.run(MemberCommand::Reserve { amount: Credits(60), ttl_s: Some(600) });
    life.at(now + Duration::seconds(100));
    let events = life.run(MemberCommand::AdvanceTime);
    assert_eq!(events, vec![MemberEvent::CreditsExpired { grant_id: "g2".into(), amount: Credits(40) }]);
    assert_eq!((life.state.available(), life.state.held()), (Credits(0), Credits(60)));
    // Settle 25 of the 60 held: charged from the expired grant, the rest expires.
    let events = life.run(MemberCommand::Settle { reservation_id: "rsv_3".into(), amount: Credits(25), query: None });
    assert_eq!(events[1], MemberEvent::CreditsExpired { grant_id: "g2".into(), amount: Credits(35) });
    assert_eq!(
        (life.state.available(), life.state.held(), life.state.totals.expired),
        (Credits(0), Credits(0), Credits(75))
    );
    assert!(life.state.grants.is_empty());
    life.check_invariants();
}

// --- subscriptions ----------------------------------------------------------

#[test]
fn starting_a_subscription_grants_the_monthly_allocation_until_period_end() {
    let now = at(2026, 1, 31);
    let mut life = Life::new(now);
    let events = life.run(start("starter"));
    assert!(matches!(&events[0], MemberEvent::MemberRegistered { .. }));
    let MemberEvent::SubscriptionStarted { period_start, period_end, status, .. } = &events[1] else { panic!() };
    assert_eq!((*period_start, *period_end, *status), (now, at(2026, 2, 28), SubscriptionStatus::Active));
    let MemberEvent::CreditsGranted { terms, .. } = &events[2] else { panic!() };
    assert_eq!(
        (terms.source, terms.amount, terms.expires_at, terms.priority),
        (GrantSource::MonthlyAllocation, Credits(1_000), Some(at(2026, 2, 28)), 20)
    );
}

#[test]
fn periods_are_calendar_months_from_the_anchor_with_the_day_clamped() {
    let anchor = at(2026, 1, 31);
    let ends: Vec<Timestamp> = (0..4).map(|index| period_end(anchor, index)).collect();
    assert_eq!(ends, vec![at(2026, 2, 28), at(2026, 3, 31), at(2026, 4, 30), at(2026, 5, 31)]);
    let leap: Vec<Timestamp> = (0..2).map(|index| period_end(at(2028, 1, 30), index)).collect();
    assert_eq!(leap, vec![at(2028, 2, 29), at(2028, 3, 30)]);
}

#[test]
fn subscription_rejections() {
    let mut life = Life::new(at(2026, 1, 1));
    assert_eq!(code(life.rejection(start("nope"))), "not_found");
    assert_eq!(field(life.rejection(start("legacy"))), Some("plan_id"));
    life.run(start("starter"));
    assert_eq!(field(life.rejection(start("pro"))), Some("plan_id"));
    assert_eq!(field(life.rejection(MemberCommand::ChangePlan { plan_id: "starter".into() })), Some("plan_id"));
    assert_eq!(field(life.rejection(MemberCommand::ChangePlan { plan_id: "euro".into() })), Some("plan_id"));
    assert_eq!(code(life.rejection(MemberCommand::ChangePlan { plan_id: "gold".into() })), "not_found");
    life.run(MemberCommand::CancelSubscription { at_period_end: false });
    let no_subscription = DomainError::SubscriptionNotFound { member_id: MEMBER.to_owned() };
    assert_eq!(life.rejection(MemberCommand::ChangePlan { plan_id: "pro".into() }), no_subscription);
    assert_eq!(life.rejection(MemberCommand::CancelSubscription { at_period_end: true }), no_subscription);

    let mut life = Life::new(at(2026, 1, 1));
    life.run(MemberCommand::Register(MemberProfile::default()));
    assert_eq!(field(life.rejection(start("euro"))), Some("plan_id"));
}

#[test]
fn an_upgrade_takes_effect_at_once_with_prorated_credits_and_price() {
    let mut life = Life::new(at(2026, 4, 1)); // April: 30 days
    life.run(start("starter"));
    life.run(MemberCommand::ChangePlan { plan_id: "free".into() }); // a downgrade, scheduled
    life.at(at(2026, 4, 21)); // 10 of 30 days remain
    let events = life.run(MemberCommand::ChangePlan { plan_id: "pro".into() });
    let MemberEvent::SubscriptionPlanChanged {
        proration_credits,
        proration_amount,
        remaining_seconds,
        period_seconds,
        ..
    } = &events[0]
    else {
        panic!("{events:?}")
    };
    assert_eq!((*remaining_seconds, *period_seconds), (864_000, 2_592_000));
    assert_eq!(*proration_credits, Credits(3_000)); // (10,000 − 1,000) × 1/3
    assert_eq!(*proration_amount, MinorUnits(1_333)); // (5,000 − 1,000) × 1/3, floored
    let MemberEvent::CreditsGranted { terms, .. } = &events[1] else { panic!() };
    assert_eq!(
        (terms.source, terms.amount, terms.expires_at),
        (GrantSource::MonthlyAllocation, Credits(3_000), Some(at(2026, 5, 1)))
    );
    let subscription = life.state.subscription.as_ref().unwrap();
    assert_eq!((subscription.terms.plan.plan_id.as_str(), subscription.scheduled_change.is_none()), ("pro", true));
    assert_eq!(subscription.period_end, at(2026, 5, 1), "an upgrade keeps the anchor");
    life.at(at(2026, 5, 1));
    life.run(MemberCommand::AdvanceTime);
    let invoice = life.history.iter().find_map(|occurred| match &occurred.event {
        MemberEvent::InvoiceIssued { lines, .. } => Some(lines.clone()),
        _ => None,
    });
    let lines = invoice.expect("the April invoice");
    assert_eq!(
        (lines[0].description.as_str(), lines[0].amount),
        ("STARTER subscription", MinorUnits(1_000)),
        "the fee of the plan at period start"
    );
    assert_eq!((lines[1].kind, lines[1].amount), (InvoiceLineKind::Proration, MinorUnits(1_333)));
    life.check_invariants();
}

#[test]
fn an_upgrade_to_fewer_credits_grants_none() {
    let mut cheap_many = plan("cheap_many", 100, 5_000);
    cheap_many.rollover.enabled = false;
    let mut life = Life::new(at(2026, 4, 1));
    for event in life.catalog.decide(&CatalogCommand::PublishPlan(cheap_many)).unwrap() {
        life.catalog.apply(&event);
    }
    life.run(start("cheap_many"));
    let events = life.run(MemberCommand::ChangePlan { plan_id: "starter".into() });
    assert_eq!(events.len(), 1);
    assert!(
        matches!(&events[0], MemberEvent::SubscriptionPlanChanged { proration_credits, .. } if proration_credits.is_zero())
    );
}

#[test]
fn a_downgrade_waits_for_renewal_and_a_later_change_replaces_it() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("pro"));
    let events = life.run(MemberCommand::ChangePlan { plan_id: "free".into() });
    assert!(
        matches!(&events[..], [MemberEvent::SubscriptionDowngradeScheduled { effective_at, .. }] if *effective_at == at(2026, 2, 1))
    );
    life.run(MemberCommand::ChangePlan { plan_id: "starter".into() });
    assert_eq!(life.state.subscription.as_ref().unwrap().terms.plan.plan_id, "pro");
    life.at(at(2026, 2, 1));
    life.run(MemberCommand::AdvanceTime);
    let subscription = life.state.subscription.as_ref().unwrap();
    assert_eq!(
        (subscription.terms.plan.plan_id.as_str(), subscription.period_start, subscription.period_end),
        ("starter", at(2026, 2, 1), at(2026, 3, 1))
    );
    assert_eq!(subscription.period_price, MinorUnits(1_000));
    life.check_invariants();
}

#[test]
fn renewal_rolls_over_up_to_the_cap_expires_the_rest_invoices_and_allocates() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("starter"));
    life.run(usage("u1", 300)); // 700 left of the allocation
    life.run(grant(GrantSource::Promotional, 50)); // no expiry: untouched by renewal
    life.at(at(2026, 2, 1));
    let events = life.run(MemberCommand::AdvanceTime);
    let expected = [
        MemberEvent::CreditsGranted {
            grant_id: "g7".into(),
            terms: GrantTerms {
                source: GrantSource::Rollover,
                category: GrantCategory::Paid,
                amount: Credits(500),
                priority: 10,
                expires_at: Some(at(2026, 3, 1)),
                reason: None,
                price: None,
            },
            transferred_from: vec![part("g3", 500)],
            usage_id: None,
            schedule_id: None,
            stripe_period_start: None,
            stripe_checkout_session_id: None,
            stripe_invoice_item: false,
            stripe_payment: None,
        },
        MemberEvent::CreditsExpired { grant_id: "g3".into(), amount: Credits(200) },
    ];
    assert_eq!(events[..2], expected[..]);
    let MemberEvent::InvoiceIssued { invoice_id, lines, total, period_start, period_end, .. } = &events[2] else {
        panic!("{events:?}")
    };
    assert_eq!(
        (invoice_id.as_str(), *total, *period_start, *period_end),
        ("inv_m1_1", MinorUnits(1_000), Some(at(2026, 1, 1)), Some(at(2026, 2, 1)))
    );
    assert_eq!(lines.len(), 1);
    assert!(
        matches!(&events[3], MemberEvent::SubscriptionRenewed { period_start, period_end, .. } if *period_start == at(2026, 2, 1) && *period_end == at(2026, 3, 1))
    );
    assert!(
        matches!(&events[4], MemberEvent::CreditsGranted { terms, .. } if terms.source == GrantSource::MonthlyAllocation && terms.amount == Credits(1_000))
    );
    assert_eq!(events.len(), 5);
    assert_eq!(life.state.available(), Credits(1_550));
    assert!(life.history.iter().rev().take(5).all(|occurred| occurred.occurred_at == at(2026, 2, 1)));

    // A month later the rollover grant expires with the period: it never rolls again.
    life.run(usage("u2", 100)); // burns the rollover first (priority 10)
    life.at(at(2026, 3, 1));
    let events = life.run(MemberCommand::AdvanceTime);
    assert!(events.contains(&MemberEvent::CreditsExpired { grant_id: "g7".into(), amount: Credits(400) }));
    assert!(events.iter().any(|event| matches!(event, MemberEvent::CreditsGranted { terms, transferred_from, .. } if terms.source == GrantSource::Rollover && transferred_from == &vec![part("g11", 500)])));
    life.check_invariants();
}

#[test]
fn an_idle_member_catches_up_on_every_period_in_order() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("free"));
    life.at(at(2026, 4, 15));
    life.run(MemberCommand::AdvanceTime);
    let renewals: Vec<Timestamp> = life
        .history
        .iter()
        .filter_map(|occurred| match &occurred.event {
            MemberEvent::SubscriptionRenewed { period_start, .. } => Some(*period_start),
            _ => None,
        })
        .collect();
    assert_eq!(renewals, vec![at(2026, 2, 1), at(2026, 3, 1), at(2026, 4, 1)]);
    assert_eq!(life.state.invoices_issued, 3);
    assert_eq!(
        life.state.invoices.get("inv_m1_1").unwrap().status,
        InvoiceStatus::Paid,
        "a zero invoice is issued paid"
    );
    assert_eq!(life.state.available(), Credits(100));
    life.check_invariants();
}

#[test]
fn overage_is_billed_at_period_close_one_line_per_unit_price() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("pro"));
    life.run(usage("u1", 10_300));
    let mut revised = life.catalog.plan("pro").unwrap().terms.plan.clone();
    revised.overage.unit_price = MinorUnits(3);
    for event in life.catalog.decide(&CatalogCommand::RevisePlan(revised)).unwrap() {
        life.catalog.apply(&event);
    }
    life.at(at(2026, 2, 1));
    life.run(MemberCommand::AdvanceTime);
    // The revision reaches the subscriber at renewal; this period's debt is at 2¢.
    let subscription = life.state.subscription.as_ref().unwrap();
    assert_eq!((subscription.terms.plan_version, subscription.terms.plan.overage.unit_price), (2, MinorUnits(3)));
    life.run(usage("u2", 10_200));
    life.at(at(2026, 3, 1));
    life.run(MemberCommand::AdvanceTime);
    let invoices: Vec<(MinorUnits, Vec<InvoiceLine>, Credits)> = life
        .history
        .iter()
        .filter_map(|occurred| match &occurred.event {
            MemberEvent::InvoiceIssued { total, lines, debt_cleared, .. } => {
                Some((*total, lines.clone(), *debt_cleared))
            }
            _ => None,
        })
        .collect();
    assert_eq!(invoices[0].0, MinorUnits(5_000 + 600));
    assert_eq!(invoices[0].2, Credits(300));
    assert_eq!(invoices[0].1[1].kind, InvoiceLineKind::Overage);
    assert_eq!(
        (invoices[0].1[1].quantity, invoices[0].1[1].unit_amount, invoices[0].1[1].amount),
        (300, MinorUnits(2), MinorUnits(600))
    );
    assert_eq!(invoices[1].0, MinorUnits(5_000 + 600), "200 × 3¢");
    assert_eq!(life.state.debt(), Credits(0));
    life.check_invariants();
}

#[test]
fn cancel_now_closes_the_period_and_expires_allocation_and_rollover_only() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("pro"));
    life.run(grant(GrantSource::Purchase, 70));
    life.run(usage("u1", 10_100)); // 10,000 allocation + 70 purchase + 30 debt
    life.run(grant(GrantSource::Promotional, 20));
    life.at(at(2026, 1, 11));
    let events = life.run(MemberCommand::CancelSubscription { at_period_end: false });
    let MemberEvent::InvoiceIssued { total, debt_cleared, .. } = &events[events.len() - 2] else {
        panic!("{events:?}")
    };
    assert_eq!((*total, *debt_cleared), (MinorUnits(5_000 + 60), Credits(30)));
    assert!(matches!(events.last(), Some(MemberEvent::SubscriptionCanceled { immediately: true, .. })));
    assert_eq!((life.state.available(), life.state.debt()), (Credits(20), Credits(0)));
    // Still spendable, without overage.
    assert_eq!(code(life.rejection(usage("u2", 21))), "insufficient_credits");
    life.run(usage("u2", 20));
    // A canceled subscription never renews.
    life.at(at(2026, 3, 1));
    assert_eq!(life.run(MemberCommand::AdvanceTime), vec![]);
    life.check_invariants();
}

#[test]
fn cancel_at_period_end_skips_rollover_and_renewal() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("starter"));
    let events = life.run(MemberCommand::CancelSubscription { at_period_end: true });
    assert_eq!(events, vec![MemberEvent::SubscriptionCancelScheduled { effective_at: at(2026, 2, 1) }]);
    // A second cancel at period end is what the caller wants already: no event.
    assert_eq!(life.run(MemberCommand::CancelSubscription { at_period_end: true }), vec![]);
    // A plan change keeps the pending cancel.
    life.run(MemberCommand::ChangePlan { plan_id: "pro".into() });
    assert!(life.state.subscription.as_ref().unwrap().cancel_at_period_end);
    life.at(at(2026, 2, 1));
    let events = life.run(MemberCommand::AdvanceTime);
    assert!(!events.iter().any(|event| matches!(event, MemberEvent::CreditsGranted { .. })), "{events:?}");
    assert!(matches!(events.last(), Some(MemberEvent::SubscriptionCanceled { immediately: false, .. })));
    let ended = life.state.subscription.as_ref().unwrap();
    assert_eq!(ended.status, SubscriptionStatus::Canceled);
    assert!(ended.cancel_at_period_end, "the canceled record says it ended at its period's end, as asked");
    assert_eq!(life.state.available(), Credits(0));
    // A new subscription may start after a cancel.
    life.run(start("starter"));
    life.check_invariants();
}

// --- invoices and payments ---------------------------------------------

#[test]
fn a_purchase_goes_on_the_period_invoice_or_on_a_one_off_invoice() {
    let mut life = Life::new(at(2026, 1, 1));
    let events = life.run(grant_with(GrantSource::Purchase, 500, |g| g.price = Some(MinorUnits(499))));
    let MemberEvent::InvoiceIssued { invoice_id, total, period_start, .. } = &events[2] else { panic!("{events:?}") };
    assert_eq!((invoice_id.as_str(), *total, *period_start), ("inv_m1_1", MinorUnits(499), None));

    life.run(start("starter"));
    life.run(grant_with(GrantSource::Purchase, 500, |g| g.price = Some(MinorUnits(450))));
    life.at(at(2026, 2, 1));
    life.run(MemberCommand::AdvanceTime);
    let MemberEvent::InvoiceIssued { invoice_id, total, lines, .. } = life
        .history
        .iter()
        .rev()
        .map(|occurred| &occurred.event)
        .find(|event| matches!(event, MemberEvent::InvoiceIssued { .. }))
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!((invoice_id.as_str(), *total, lines.len()), ("inv_m1_2", MinorUnits(1_450), 2));
    assert_eq!(lines.iter().map(|line| line.amount).sum::<MinorUnits>(), *total);
}

#[test]
fn invoice_status_transitions() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(grant_with(GrantSource::Purchase, 5, |g| g.price = Some(MinorUnits(5))));
    life.run(grant_with(GrantSource::Purchase, 5, |g| g.price = Some(MinorUnits(5))));
    life.run(grant_with(GrantSource::Purchase, 5, |g| g.price = Some(MinorUnits(5))));
    assert_eq!(code(life.rejection(MemberCommand::PayInvoice { invoice_id: "inv_m1_9".into() })), "not_found");
    life.run(MemberCommand::PayInvoice { invoice_id: "inv_m1_1".into() });
    assert_eq!(field(life.rejection(MemberCommand::PayInvoice { invoice_id: "inv_m1_1".into() })), Some("invoice_id"));
    assert_eq!(field(life.rejection(MemberCommand::VoidInvoice { invoice_id: "inv_m1_1".into() })), Some("invoice_id"));
    life.run(MemberCommand::VoidInvoice { invoice_id: "inv_m1_2".into() });
    assert_eq!(
        field(life.rejection(MemberCommand::MarkInvoiceUncollectible { invoice_id: "inv_m1_2".into() })),
        Some("invoice_id")
    );
    life.run(MemberCommand::MarkInvoiceUncollectible { invoice_id: "inv_m1_3".into() });
    life.run(MemberCommand::PayInvoice { invoice_id: "inv_m1_3".into() });
    let statuses: Vec<InvoiceStatus> = life.state.invoices.values().map(|invoice| invoice.status).collect();
    assert_eq!(statuses, vec![InvoiceStatus::Paid, InvoiceStatus::Void, InvoiceStatus::Paid]);
}

#[test]
fn check_answers_without_writing() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("pro"));
    let context = Context { member_id: MEMBER, now: life.now, catalog: &life.catalog, usage: None };
    let outcome = |allowed, requested, would_incur_debt, refusal| CheckOutcome {
        allowed,
        requested: Credits(requested),
        available: Credits(10_000),
        overage_room: Credits(2_000),
        would_incur_debt: Credits(would_incur_debt),
        refusal,
    };
    assert_eq!(check(&life.state, Credits(10_500), &context), Ok(outcome(true, 10_500, 500, None)));
    assert_eq!(
        check(&life.state, Credits(12_001), &context),
        Ok(outcome(false, 12_001, 0, Some(CheckRefusal::OverageLimitReached)))
    );
    let later = Context { now: at(2026, 2, 1), ..context };
    let outcome = check(&life.state, Credits(1), &later).unwrap();
    assert_eq!(outcome.available, Credits(15_000), "check sees the renewal due at its instant");
    assert_eq!(
        check(&MemberState::default(), Credits(1), &context),
        Err(DomainError::MemberNotFound { member_id: MEMBER.to_owned() })
    );
}

#[test]
fn a_refused_check_says_why() {
    let refusal = |life: &Life, credits: i64| {
        let context = Context { member_id: MEMBER, now: life.now, catalog: &life.catalog, usage: None };
        let outcome = check(&life.state, Credits(credits), &context).unwrap();
        assert_eq!(outcome.allowed, outcome.refusal.is_none(), "{outcome:?}");
        (outcome.refusal.map(CheckRefusal::code), outcome.overage_room)
    };
    // No overage on the plan: short means insufficient.
    let mut starter = Life::new(at(2026, 1, 1));
    starter.run(start("starter"));
    assert_eq!(refusal(&starter, 1_000), (None, Credits(0)));
    assert_eq!(refusal(&starter, 1_001), (Some("insufficient_credits"), Credits(0)));
    // Overage on the plan, past due: the same shortfall is refused for that.
    let mut pro = Life::new(at(2026, 1, 1));
    pro.run(start("pro"));
    pro.run(usage("u1", 10_100));
    assert_eq!(refusal(&pro, 1_900), (None, Credits(1_900)));
    assert_eq!(refusal(&pro, 1_901), (Some("overage_limit_reached"), Credits(1_900)));
    pro.at(at(2026, 2, 1));
    pro.run(MemberCommand::AdvanceTime);
    pro.run(MemberCommand::RecordPaymentFailed { invoice_id: "inv_m1_1".into(), reason: None });
    assert_eq!(refusal(&pro, 10_001), (Some("past_due_no_overage"), Credits(0)));
    assert_eq!(refusal(&pro, 10_000), (None, Credits(0)));
}

#[test]
fn events_round_trip_through_json() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(start("pro"));
    life.run(MemberCommand::Reserve { amount: Credits(10), ttl_s: None });
    life.run(usage("u1", 10_100));
    life.at(at(2026, 2, 1));
    life.run(MemberCommand::AdvanceTime);
    for occurred in &life.history {
        let json = serde_json::to_string(&occurred.event).unwrap();
        let back: MemberEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, occurred.event, "{json}");
        assert!(json.starts_with(&format!("{{\"type\":\"{}\"", occurred.event.event_type())), "{json}");
    }
    let _: DateTime<Utc> = life.now;
}

// ---------------------------------------------------------------------------
// Stripe-managed members
// ---------------------------------------------------------------------------

mod stripe_managed {
    use super::*;

    /// The usual catalog with Stripe prices on starter and pro.
    fn stripe_life(now: Timestamp) -> Life {
        let mut life = Life::new(now);
        for (plan_id, price_id) in [("starter", "price_starter"), ("pro", "price_pro")] {
            let mut plan = life.catalog.plan(plan_id).unwrap().terms.plan.clone();
            plan.stripe_price_id = Some(price_id.to_owned());
            for event in life.catalog.decide(&CatalogCommand::RevisePlan(plan)).unwrap() {
                life.catalog.apply(&event);
            }
        }
        life.run(MemberCommand::Register(MemberProfile::default()));
        life
    }

    fn event(event_id: &str, event_type: &str, created: Timestamp) -> StripeEventRef {
        StripeEventRef {
            event_id: event_id.to_owned(),
            event_type: event_type.to_owned(),
            created,
            customer_id: Some("cus_1".to_owned()),
            refund_policy: RefundPolicy::default(),
        }
    }

    fn snapshot(status: &str, price_id: &str, period: (Timestamp, Timestamp)) -> StripeSubscription {
        StripeSubscription {
            subscription_id: "sub_1".to_owned(),
            status: status.to_owned(),
            price_ids: vec![price_id.to_owned()],
            period_start: period.0,
            period_end: period.1,
            cancel_at_period_end: false,
            ended_at: None,
            deleted: false,
        }
    }

    #[test]
    fn the_item_priced_by_a_catalog_plan_is_the_subscriptions_plan() {
        let mut life = stripe_life(at(2026, 1, 1));
        let mut several = snapshot("active", "price_addon", january());
        several.price_ids.push("price_starter".into());
        let events = life.run(subscription_event("evt_1", at(2026, 1, 1), several.clone()));
        assert!(
            matches!(&events[2], MemberEvent::SubscriptionStarted { terms, .. } if terms.plan.plan_id == "starter")
        );
        // Two items priced by catalog plans: refused for good (not the price field Stripe's retry could fix).
        several.price_ids.push("price_pro".into());
        assert_eq!(field(life.rejection(subscription_event("evt_2", at(2026, 1, 2), several))), Some("items"));
        let unknown = snapshot("active", "price_addon", january());
        assert_eq!(
            field(life.rejection(subscription_event("evt_3", at(2026, 1, 2), unknown))),
            Some("stripe_price_id")
        );
    }

    #[test]
    fn a_subscription_ended_by_stripe_is_canceled_at_stripes_instant() {
        let mut life = stripe_life(at(2026, 1, 10));
        life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        let mut ended = snapshot("canceled", "price_starter", january());
        ended.deleted = true;
        ended.ended_at = Some(at(2026, 1, 9));
        let events = life.run(subscription_event("evt_2", at(2026, 1, 9), ended));
        let canceled = events.iter().find_map(|event| match event {
            MemberEvent::SubscriptionCanceled { canceled_at, .. } => Some(*canceled_at),
            _ => None,
        });
        assert_eq!(canceled, Some(at(2026, 1, 9)), "Stripe's ended_at, not tally's clock (Jan 10): {events:?}");
    }

    fn subscription_event(event_id: &str, created: Timestamp, subscription: StripeSubscription) -> MemberCommand {
        let event_type =
            if subscription.deleted { "customer.subscription.deleted" } else { "customer.subscription.updated" };
        MemberCommand::Stripe(StripeCommand::Subscription { event: event(event_id, event_type, created), subscription })
    }

    fn invoice(
        invoice_id: &str,
        reason: &str,
        price_id: &str,
        period: (Timestamp, Timestamp),
        amount: i64,
    ) -> StripeInvoice {
        StripeInvoice {
            invoice_id: invoice_id.to_owned(),
            subscription_id: Some("sub_1".to_owned()),
            billing_reason: Some(reason.to_owned()),
            currency: "usd".to_owned(),
            total: MinorUnits(amount),
            lines: vec![StripeInvoiceLine {
                amount: MinorUnits(amount),
                description: Some("1 × Starter".to_owned()),
                price_id: Some(price_id.to_owned()),
                period_start: Some(period.0),
                period_end: Some(period.1),
                proration: false,
            }],
        }
    }

    fn invoice_event(
        event_id: &str,
        created: Timestamp,
        outcome: StripeInvoiceOutcome,
        invoice: StripeInvoice,
    ) -> MemberCommand {
        let event_type = match outcome {
            StripeInvoiceOutcome::Finalized => "invoice.finalized",
            StripeInvoiceOutcome::Paid => "invoice.paid",
            StripeInvoiceOutcome::PaymentFailed => "invoice.payment_failed",
            StripeInvoiceOutcome::Voided => "invoice.voided",
            StripeInvoiceOutcome::MarkedUncollectible => "invoice.marked_uncollectible",
        };
        MemberCommand::Stripe(StripeCommand::Invoice { event: event(event_id, event_type, created), invoice, outcome })
    }

    fn types(events: &[MemberEvent]) -> Vec<&'static str> {
        events.iter().map(MemberEvent::event_type).collect()
    }

    const JAN: (i32, u32, u32) = (2026, 1, 1);

    fn january() -> (Timestamp, Timestamp) {
        (at(JAN.0, JAN.1, JAN.2), at(2026, 2, 1))
    }

    #[test]
    fn a_created_subscription_starts_without_credits_and_links_the_customer() {
        let mut life = stripe_life(at(2026, 1, 1));
        let events =
            life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        assert_eq!(types(&events), ["StripeEventApplied", "MemberProfileChanged", "SubscriptionStarted"]);
        let subscription = life.state.subscription.as_ref().unwrap();
        assert_eq!(subscription.billing, Billing::Stripe);
        assert_eq!(subscription.stripe_subscription_id.as_deref(), Some("sub_1"));
        assert_eq!((subscription.period_start, subscription.period_end), january());
        assert_eq!(life.state.profile.stripe_customer_id.as_deref(), Some("cus_1"));
        assert_eq!(life.state.available(), Credits(0), "credits come with the paid invoice");
    }

    #[test]
    fn a_paid_subscription_invoice_is_recorded_paid_and_allocates_once_per_period() {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        let paid = invoice("in_1", "subscription_create", "price_starter", january(), 1_000);
        let events = life.run(invoice_event("evt_2", at(2026, 1, 1), StripeInvoiceOutcome::Paid, paid.clone()));
        assert_eq!(types(&events), ["StripeEventApplied", "InvoiceIssued", "PaymentSucceeded", "CreditsGranted"]);
        let MemberEvent::InvoiceIssued { invoice_id, total, lines, stripe_invoice_id, .. } = &events[1] else {
            unreachable!()
        };
        assert_eq!(
            (invoice_id.as_str(), *total, stripe_invoice_id.as_deref()),
            ("inv_m1_1", MinorUnits(1_000), Some("in_1"))
        );
        assert_eq!(lines.iter().map(|line| line.amount.0).sum::<i64>(), 1_000);
        let MemberEvent::CreditsGranted { terms, stripe_period_start, .. } = &events[3] else { unreachable!() };
        assert_eq!(
            (terms.source, terms.amount, terms.expires_at),
            (GrantSource::MonthlyAllocation, Credits(1_000), Some(at(2026, 2, 1)))
        );
        assert_eq!(*stripe_period_start, Some(at(2026, 1, 1)));
        assert_eq!(life.state.invoices["inv_m1_1"].status, InvoiceStatus::Paid);

        // The same invoice paid again under another event id (Stripe sends
        // invoice.paid and, say, a retried one): nothing more.
        let again = life.run(invoice_event("evt_3", at(2026, 1, 1), StripeInvoiceOutcome::Paid, paid));
        assert_eq!(types(&again), ["StripeEventApplied"]);
        assert_eq!(life.state.available(), Credits(1_000));
    }

    /// A failure of an invoice no longer open decides no status, so a
    /// snapshot Stripe made before it, delivered after it, still does.
    #[test]
    fn a_failure_that_is_only_history_moves_no_status_watermark() {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        let bill = invoice("in_1", "subscription_create", "price_starter", january(), 1_000);
        life.run(invoice_event("evt_2", at(2026, 1, 1), StripeInvoiceOutcome::Paid, bill.clone()));
        let late = life.run(invoice_event("evt_3", at(2026, 1, 20), StripeInvoiceOutcome::PaymentFailed, bill));
        assert_eq!(types(&late), ["StripeEventApplied", "PaymentFailed"]);
        // Stripe's snapshot of Jan 10, delivered now: past due, as Stripe said then.
        let snapshot_of_jan_10 = snapshot("past_due", "price_starter", january());
        let events = life.run(subscription_event("evt_4", at(2026, 1, 10), snapshot_of_jan_10));
        assert!(types(&events).contains(&"SubscriptionPastDue"), "{events:?}");
    }

    /// Invoice statuses move forward whatever the delivery order: open →
    /// uncollectible → paid or void, paid and void final.
    #[test]
    fn voided_and_uncollectible_stripe_invoices_mirror_in_any_order() {
        use StripeInvoiceOutcome::*;
        let cases: Vec<(&str, Vec<StripeInvoiceOutcome>, InvoiceStatus)> = vec![
            ("finalized, voided", vec![Finalized, Voided], InvoiceStatus::Void),
            ("voided before finalized", vec![Voided, Finalized], InvoiceStatus::Void),
            ("uncollectible", vec![Finalized, MarkedUncollectible], InvoiceStatus::Uncollectible),
            ("uncollectible, then paid", vec![MarkedUncollectible, Paid], InvoiceStatus::Paid),
            ("paid, then a late uncollectible", vec![Paid, MarkedUncollectible], InvoiceStatus::Paid),
            ("uncollectible, then voided", vec![MarkedUncollectible, Voided], InvoiceStatus::Void),
            ("voided, then a late uncollectible", vec![Voided, MarkedUncollectible], InvoiceStatus::Void),
        ];
        for (name, outcomes, expected) in cases {
            let mut life = stripe_life(at(2026, 1, 1));
            let one_off = invoice("in_9", "manual", "price_starter", january(), 500);
            for (index, outcome) in outcomes.into_iter().enumerate() {
                life.run(invoice_event(&format!("evt_{index}"), at(2026, 1, 1), outcome, one_off.clone()));
            }
            assert_eq!(life.state.invoices.len(), 1, "{name}: recorded once");
            assert_eq!(life.state.invoices["inv_m1_1"].status, expected, "{name}");
            life.check_invariants();
        }
    }

    #[test]
    fn a_cycle_invoice_renews_to_its_period_closing_the_old_one_with_rollover() {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        life.run(invoice_event(
            "evt_2",
            at(2026, 1, 1),
            StripeInvoiceOutcome::Paid,
            invoice("in_1", "subscription_create", "price_starter", january(), 1_000),
        ));
        life.run(usage("u1", 300));
        // Stripe renews a few seconds ahead of tally's clock.
        let february = (at(2026, 2, 1), at(2026, 3, 1));
        life.at(at(2026, 2, 1) - Duration::seconds(5));
        let events = life.run(invoice_event(
            "evt_3",
            at(2026, 2, 1),
            StripeInvoiceOutcome::Paid,
            invoice("in_2", "subscription_cycle", "price_starter", february, 1_000),
        ));
        assert_eq!(
            types(&events),
            [
                "StripeEventApplied",
                "InvoiceIssued",
                "PaymentSucceeded",
                "CreditsGranted",
                "CreditsExpired",
                "SubscriptionPeriodClosed",
                "SubscriptionRenewed",
                "CreditsGranted"
            ]
        );
        let subscription = life.state.subscription.as_ref().unwrap();
        assert_eq!((subscription.period_start, subscription.period_end), february);
        // 700 left: 500 rolled over (the cap), 200 expired, 1,000 new.
        assert_eq!(life.state.available(), Credits(1_500));
        life.check_invariants();
    }

    #[test]
    fn an_older_snapshot_changes_nothing_and_a_canceled_subscription_stays_canceled() {
        let mut life = stripe_life(at(2026, 1, 10));
        life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        life.run(subscription_event("evt_3", at(2026, 1, 9), snapshot("past_due", "price_starter", january())));
        let stale =
            life.run(subscription_event("evt_2", at(2026, 1, 5), snapshot("active", "price_starter", january())));
        assert_eq!(
            stale,
            [MemberEvent::StripeEventApplied {
                stripe_event_id: "evt_2".into(),
                event_type: "customer.subscription.updated".into(),
                created: at(2026, 1, 5),
                stale: true,
                synced: None,
            }]
        );
        assert_eq!(life.state.subscription.as_ref().unwrap().status, SubscriptionStatus::PastDue);

        let mut deleted = snapshot("canceled", "price_starter", january());
        deleted.deleted = true;
        let events = life.run(subscription_event("evt_4", at(2026, 1, 10), deleted));
        assert_eq!(types(&events), ["StripeEventApplied", "SubscriptionPeriodClosed", "SubscriptionCanceled"]);
        // Even with a later `created`, Stripe never revives a canceled subscription.
        let revived =
            life.run(subscription_event("evt_5", at(2026, 1, 11), snapshot("active", "price_starter", january())));
        assert_eq!(types(&revived), ["StripeEventApplied"]);
        assert_eq!(life.state.subscription.as_ref().unwrap().status, SubscriptionStatus::Canceled);
    }

    #[test]
    fn price_and_cancel_flag_changes_follow_the_snapshot_without_proration() {
        let mut life = stripe_life(at(2026, 1, 15));
        life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        let mut upgraded = snapshot("active", "price_pro", january());
        upgraded.cancel_at_period_end = true;
        let events = life.run(subscription_event("evt_2", at(2026, 1, 15), upgraded.clone()));
        assert_eq!(types(&events), ["StripeEventApplied", "SubscriptionPlanChanged", "SubscriptionCancelScheduled"]);
        let MemberEvent::SubscriptionPlanChanged { proration_credits, proration_amount, .. } = &events[1] else {
            unreachable!()
        };
        assert_eq!((*proration_credits, *proration_amount), (Credits(0), MinorUnits(0)), "Stripe owns proration");
        upgraded.cancel_at_period_end = false;
        let events = life.run(subscription_event("evt_3", at(2026, 1, 16), upgraded));
        assert_eq!(types(&events), ["StripeEventApplied", "SubscriptionCancelRevoked"]);
        assert!(!life.state.subscription.as_ref().unwrap().cancel_at_period_end);
    }

    #[test]
    fn a_failed_payment_makes_past_due_and_a_failure_after_payment_is_history() {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        let first = invoice("in_1", "subscription_create", "price_starter", january(), 1_000);
        let failed =
            life.run(invoice_event("evt_2", at(2026, 1, 1), StripeInvoiceOutcome::PaymentFailed, first.clone()));
        assert_eq!(types(&failed), ["StripeEventApplied", "InvoiceIssued", "PaymentFailed", "SubscriptionPastDue"]);
        let paid = life.run(invoice_event("evt_3", at(2026, 1, 2), StripeInvoiceOutcome::Paid, first.clone()));
        assert_eq!(
            types(&paid),
            ["StripeEventApplied", "PaymentSucceeded", "SubscriptionReactivated", "CreditsGranted"]
        );
        // A failure delivered after the payment is history: recorded on the
        // invoice, no past due.
        let late = life.run(invoice_event("evt_4", at(2026, 1, 3), StripeInvoiceOutcome::PaymentFailed, first.clone()));
        assert_eq!(types(&late), ["StripeEventApplied", "PaymentFailed"]);
        assert_eq!(life.state.subscription.as_ref().unwrap().status, SubscriptionStatus::Active);
        assert_eq!(life.state.invoices["inv_m1_1"].status, InvoiceStatus::Paid);

        // Delivered the other way round (paid first, then the earlier
        // failure): the same invoice history and the same status.
        let mut reversed = stripe_life(at(2026, 1, 1));
        reversed.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        reversed.run(invoice_event("evt_3", at(2026, 1, 2), StripeInvoiceOutcome::Paid, first.clone()));
        let failed = reversed.run(invoice_event("evt_2", at(2026, 1, 1), StripeInvoiceOutcome::PaymentFailed, first));
        assert_eq!(types(&failed), ["StripeEventApplied", "PaymentFailed"]);
        assert_eq!(reversed.state.subscription.as_ref().unwrap().status, SubscriptionStatus::Active);
        assert_eq!(reversed.state.available(), life.state.available());
    }

    #[test]
    fn an_invoice_total_beyond_its_lines_gets_an_adjustment_line() {
        let mut life = stripe_life(at(2026, 1, 1));
        let mut taxed = invoice("in_9", "manual", "price_starter", january(), 1_000);
        taxed.total = MinorUnits(1_190);
        let events = life.run(invoice_event("evt_1", at(2026, 1, 1), StripeInvoiceOutcome::Finalized, taxed));
        let MemberEvent::InvoiceIssued { lines, total, .. } = &events[2] else { panic!("{events:?}") };
        assert_eq!(lines.last().unwrap().kind, InvoiceLineKind::Adjustment);
        assert_eq!(lines.iter().map(|line| line.amount.0).sum::<i64>(), total.0);
        assert_eq!(life.state.available(), Credits(0), "a manual invoice brings no allocation");
    }

    #[test]
    fn refusals_write_nothing() {
        let mut life = stripe_life(at(2026, 1, 1));
        let unknown_price = subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_nope", january()));
        assert_eq!(field(life.rejection(unknown_price)), Some("stripe_price_id"));
        let backwards = subscription_event(
            "evt_1",
            at(2026, 1, 1),
            snapshot("active", "price_starter", (at(2026, 2, 1), at(2026, 1, 1))),
        );
        assert_eq!(field(life.rejection(backwards)), Some("current_period_end"));
        life.run(start("free"));
        let second = subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january()));
        assert_eq!(field(life.rejection(second)), Some("stripe_subscription_id"));
        let purchase = MemberCommand::Stripe(StripeCommand::Purchase {
            event: event("evt_2", "checkout.session.completed", at(2026, 1, 1)),
            session_id: "cs_1".into(),
            payment_intent: None,
            credits: Credits(500),
            price: MinorUnits(999),
            currency: "eur".into(),
        });
        assert_eq!(field(life.rejection(purchase)), Some("currency"));
        let mut other_customer = stripe_life(at(2026, 1, 1));
        other_customer.run(MemberCommand::Register(MemberProfile {
            stripe_customer_id: Some("cus_other".into()),
            ..MemberProfile::default()
        }));
        let linked_elsewhere = invoice_event(
            "evt_3",
            at(2026, 1, 1),
            StripeInvoiceOutcome::Finalized,
            invoice("in_1", "manual", "price_starter", january(), 10),
        );
        assert_eq!(field(other_customer.rejection(linked_elsewhere)), Some("customer"));
    }

    #[test]
    fn a_checkout_purchase_grants_paid_credits_on_no_tally_invoice() {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(start("starter"));
        let events = life.run(MemberCommand::Stripe(StripeCommand::Purchase {
            event: event("evt_1", "checkout.session.completed", at(2026, 1, 1)),
            session_id: "cs_1".into(),
            payment_intent: Some("pi_1".into()),
            credits: Credits(500),
            price: MinorUnits(999),
            currency: "usd".into(),
        }));
        assert_eq!(types(&events), ["StripeEventApplied", "MemberProfileChanged", "CreditsGranted"]);
        assert!(life.state.period_lines.is_empty(), "Stripe collected the price: no line on tally's invoice");
        assert_eq!(life.state.available(), Credits(1_500));
    }

    fn purchase(event_id: &str, event_type: &str, session_id: &str) -> MemberCommand {
        MemberCommand::Stripe(StripeCommand::Purchase {
            event: event(event_id, event_type, at(2026, 1, 1)),
            session_id: session_id.into(),
            payment_intent: Some(format!("pi_{session_id}")),
            credits: Credits(500),
            price: MinorUnits(999),
            currency: "usd".into(),
        })
    }

    fn refund(
        event_id: &str,
        payment: &str,
        amount_refunded: Option<i64>,
        refunds: &[(&str, i64)],
        policy: RefundPolicy,
    ) -> MemberCommand {
        let mut event = event(event_id, "charge.refunded", at(2026, 1, 1));
        event.refund_policy = policy;
        MemberCommand::Stripe(StripeCommand::Refund {
            event,
            payment: payment.into(),
            amount_refunded: amount_refunded.map(MinorUnits),
            refunds: refunds
                .iter()
                .map(|(refund_id, amount)| StripeRefundPart {
                    refund_id: (*refund_id).into(),
                    amount: MinorUnits(*amount),
                })
                .collect(),
            currency: "usd".into(),
        })
    }

    const DEBT: RefundPolicy = RefundPolicy { spent: SpentRefund::Debt, subscription_credits: false };
    const WRITE_OFF: RefundPolicy = RefundPolicy { spent: SpentRefund::WriteOff, subscription_credits: false };

    /// A member with only a purchase of 500 credits for 999, half spent.
    fn half_spent_purchase() -> Life {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(purchase("evt_p", "checkout.session.completed", "cs_1"));
        life.run(usage("u1", 250));
        assert_eq!(life.state.available(), Credits(250));
        life
    }

    #[test]
    fn a_full_refund_of_a_half_spent_purchase_takes_the_rest_back_and_bills_the_spent_half_as_debt() {
        let mut life = half_spent_purchase();
        let events = life.run(refund("evt_r", "pi_cs_1", Some(999), &[], DEBT));
        assert_eq!(types(&events), ["StripeEventApplied", "StripeRefundRecorded"]);
        let MemberEvent::StripeRefundRecorded { refunded, parts, debt, unit_price, written_off, .. } = &events[1]
        else {
            unreachable!()
        };
        assert_eq!((*refunded, parts.iter().map(|part| part.amount).sum::<Credits>()), (MinorUnits(999), Credits(250)));
        assert_eq!((*debt, *unit_price, *written_off), (Credits(250), MinorUnits(1), Credits(0)));
        assert_eq!(
            (life.state.available(), life.state.debt(), life.state.balance()),
            (Credits(0), Credits(250), Credits(-250))
        );
        life.check_invariants();
        // Told again, or told less (an older charge event): nothing moves.
        assert_eq!(types(&life.run(refund("evt_r2", "pi_cs_1", Some(999), &[], DEBT))), ["StripeEventApplied"]);
        assert_eq!(types(&life.run(refund("evt_r3", "pi_cs_1", Some(400), &[], DEBT))), ["StripeEventApplied"]);
        assert_eq!(life.state.debt(), Credits(250));
    }

    #[test]
    fn written_off_the_spent_half_is_recorded_and_not_billed() {
        let mut life = half_spent_purchase();
        let events = life.run(refund("evt_r", "pi_cs_1", Some(999), &[], WRITE_OFF));
        let MemberEvent::StripeRefundRecorded { debt, written_off, .. } = &events[1] else { unreachable!() };
        assert_eq!((*debt, *written_off), (Credits(0), Credits(250)));
        assert_eq!(
            (life.state.available(), life.state.debt(), life.state.balance()),
            (Credits(0), Credits(0), Credits(0))
        );
        life.check_invariants();
    }

    #[test]
    fn a_partial_refund_takes_its_share_from_the_unspent_rest_first() {
        let mut life = half_spent_purchase();
        // Two refunds by id, then the charge's total that covers both.
        life.run(refund("evt_r1", "pi_cs_1", None, &[("re_1", 300)], DEBT));
        assert_eq!(life.state.available(), Credits(100), "300/999 of 500 credits, rounded down: 150");
        life.run(refund("evt_r2", "pi_cs_1", None, &[("re_2", 200)], DEBT));
        assert_eq!(life.state.available(), Credits(0), "500/999 of 500: 250");
        assert_eq!(life.state.debt(), Credits(0));
        let events = life.run(refund("evt_r3", "pi_cs_1", Some(500), &[], DEBT));
        assert!(
            matches!(&events[1], MemberEvent::StripeRefundRecorded { refunded: MinorUnits(500), parts, debt: Credits(0), .. } if parts.is_empty())
        );
        assert_eq!(life.state.stripe_refunds["pi_cs_1"].taken_back, Credits(250));
        life.check_invariants();
    }

    #[test]
    fn refund_facts_in_any_order_give_the_same_books() {
        let commands = [
            purchase("evt_p", "checkout.session.completed", "cs_1"),
            refund("evt_r1", "pi_cs_1", None, &[("re_1", 300)], DEBT),
            refund("evt_r2", "pi_cs_1", Some(300), &[], DEBT),
            refund("evt_r3", "pi_cs_1", Some(800), &[], DEBT),
            refund("evt_r4", "pi_cs_1", None, &[("re_2", 500)], DEBT),
        ];
        let books = |order: &[usize]| {
            let mut life = stripe_life(at(2026, 1, 1));
            for &index in order {
                life.run(commands[index].clone());
            }
            life.check_invariants();
            (life.state.available(), life.state.debt(), life.state.totals, life.state.stripe_refunds["pi_cs_1"].clone())
        };
        let forward = books(&[0, 1, 2, 3, 4]);
        assert_eq!(forward.0, Credits(500 - 500 * 800 / 999));
        for order in [[4, 3, 2, 1, 0], [1, 0, 3, 2, 4], [2, 4, 0, 1, 3]] {
            assert_eq!(books(&order), forward, "{order:?}");
        }
    }

    #[test]
    fn an_invoice_refund_is_recorded_on_the_invoice_and_takes_credits_only_when_the_operator_says_so() {
        for (take_back, available) in [(false, 1_000), (true, 500)] {
            let mut life = stripe_life(at(2026, 1, 1));
            life.run(subscription_event("evt_s", at(2026, 1, 1), snapshot("active", "price_starter", january())));
            let paid = invoice("in_1", "subscription_create", "price_starter", january(), 1_000);
            life.run(invoice_event("evt_i", at(2026, 1, 1), StripeInvoiceOutcome::Paid, paid));
            assert_eq!(life.state.available(), Credits(1_000));
            let policy = RefundPolicy { spent: SpentRefund::Debt, subscription_credits: take_back };
            let events = life.run(refund("evt_cn", "in_1", None, &[("re_1", 500)], policy));
            let MemberEvent::StripeRefundRecorded { refunded, invoice_id, .. } = &events[1] else { unreachable!() };
            assert_eq!((*refunded, invoice_id.is_some()), (MinorUnits(500), true));
            assert_eq!(life.state.available(), Credits(available), "take back: {take_back}");
            life.check_invariants();
        }
    }

    #[test]
    fn a_refund_delivered_before_its_purchase_takes_back_when_the_purchase_comes() {
        let mut life = stripe_life(at(2026, 1, 1));
        let events = life.run(refund("evt_r", "pi_cs_1", Some(999), &[], DEBT));
        assert!(matches!(&events[..], [_, _, MemberEvent::StripeRefundRecorded { grant_id: None, .. }]));
        let events = life.run(purchase("evt_p", "checkout.session.completed", "cs_1"));
        assert_eq!(types(&events), ["StripeEventApplied", "CreditsGranted", "StripeRefundRecorded"]);
        assert_eq!((life.state.available(), life.state.debt()), (Credits(0), Credits(0)));
        life.check_invariants();
    }

    #[test]
    fn a_sessions_credits_are_granted_once_whichever_event_brings_them() {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(start("starter"));
        life.run(purchase("evt_1", "checkout.session.async_payment_succeeded", "cs_1"));
        assert_eq!(life.state.available(), Credits(1_500));
        // Another event for the same session (a completed one, say): recorded, nothing granted.
        let events = life.run(purchase("evt_2", "checkout.session.completed", "cs_1"));
        assert_eq!(types(&events), ["StripeEventApplied"]);
        assert!(matches!(events[0], MemberEvent::StripeEventApplied { stale: true, .. }));
        assert_eq!(life.state.available(), Credits(1_500));
        // Spent to nothing, the grant is gone from the state; the session is still known.
        life.run(usage("u1", 1_500));
        assert_eq!(types(&life.run(purchase("evt_3", "checkout.session.completed", "cs_1"))), ["StripeEventApplied"]);
        assert_eq!(life.state.available(), Credits(0));
        life.run(purchase("evt_4", "checkout.session.completed", "cs_2"));
        assert_eq!(life.state.available(), Credits(500));
    }

    #[test]
    fn a_failed_delayed_payment_is_recorded_and_grants_nothing() {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(start("starter"));
        let events = life.run(MemberCommand::Stripe(StripeCommand::CheckoutPaymentFailed {
            event: event("evt_1", "checkout.session.async_payment_failed", at(2026, 1, 1)),
            session_id: "cs_1".into(),
            credits: Credits(500),
            price: MinorUnits(999),
        }));
        assert_eq!(types(&events), ["StripeEventApplied", "MemberProfileChanged", "CheckoutPaymentFailed"]);
        assert_eq!(life.state.available(), Credits(1_000));
        life.check_invariants();
    }

    #[test]
    fn an_invoice_arriving_before_its_subscription_does_not_make_the_subscription_stale() {
        let mut life = stripe_life(at(2026, 1, 2));
        let paid = invoice("in_1", "subscription_create", "price_starter", january(), 1_000);
        life.run(invoice_event("evt_2", at(2026, 1, 1), StripeInvoiceOutcome::Paid, paid));
        let created = MemberCommand::Stripe(StripeCommand::Subscription {
            event: event("evt_1", "customer.subscription.created", at(2026, 1, 1) - Duration::seconds(5)),
            subscription: snapshot("active", "price_starter", january()),
        });
        let events = life.run(created.clone());
        assert_eq!(types(&events), ["StripeEventApplied", "SubscriptionStarted"]);
        assert_eq!(life.state.available(), Credits(1_000));
        // A `created` of a subscription tally already has changes nothing.
        assert_eq!(types(&life.run(created)), ["StripeEventApplied"]);
    }

    #[test]
    fn a_paid_invoice_after_the_end_grants_nothing_and_only_the_failed_invoice_reactivates() {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        let failed = invoice("in_1", "subscription_create", "price_starter", january(), 1_000);
        life.run(invoice_event("evt_2", at(2026, 1, 1), StripeInvoiceOutcome::PaymentFailed, failed.clone()));
        let other = invoice("in_other", "manual", "price_starter", january(), 50);
        let events = life.run(invoice_event("evt_3", at(2026, 1, 2), StripeInvoiceOutcome::Paid, other));
        assert!(!types(&events).contains(&"SubscriptionReactivated"), "another invoice's payment: {events:?}");
        let mut deleted = snapshot("canceled", "price_starter", january());
        deleted.deleted = true;
        life.run(subscription_event("evt_4", at(2026, 1, 3), deleted));
        let events = life.run(invoice_event("evt_5", at(2026, 1, 4), StripeInvoiceOutcome::Paid, failed));
        assert_eq!(types(&events), ["StripeEventApplied", "PaymentSucceeded"]);
        assert_eq!(life.state.available(), Credits(0), "no credits for a subscription that ended");
    }

    #[test]
    fn hostile_amounts_instants_and_unknown_prices_are_refused() {
        let mut life = stripe_life(at(2026, 1, 1));
        let mut huge = invoice("in_1", "manual", "price_starter", january(), 1_000);
        huge.total = MinorUnits(i64::MAX);
        let refused = life.rejection(invoice_event("evt_1", at(2026, 1, 1), StripeInvoiceOutcome::Finalized, huge));
        assert_eq!(field(refused), Some("total"));
        let mut lines = invoice("in_1", "manual", "price_starter", january(), 1_000);
        lines.lines[0].amount = MinorUnits(i64::MIN);
        let refused = life.rejection(invoice_event("evt_1", at(2026, 1, 1), StripeInvoiceOutcome::Finalized, lines));
        assert_eq!(field(refused), Some("lines.amount"));
        let unknown = invoice("in_1", "subscription_cycle", "price_nope", january(), 1_000);
        let refused = life.rejection(invoice_event("evt_1", at(2026, 1, 1), StripeInvoiceOutcome::Paid, unknown));
        assert_eq!(field(refused), Some("stripe_price_id"));
        let far = (at(2026, 1, 1), Utc.with_ymd_and_hms(9999, 1, 1, 0, 0, 0).unwrap());
        let refused =
            life.rejection(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", far)));
        assert_eq!(field(refused), Some("current_period_end"));
    }

    #[test]
    fn a_priced_purchase_of_a_stripe_managed_member_goes_to_stripe_not_to_a_tally_invoice() {
        let mut life = stripe_life(at(2026, 1, 1));
        life.run(subscription_event("evt_1", at(2026, 1, 1), snapshot("active", "price_starter", january())));
        let events = life.run(grant_with(GrantSource::Purchase, 500, |grant| grant.price = Some(MinorUnits(990))));
        assert_eq!(types(&events), ["CreditsGranted"]);
        let MemberEvent::CreditsGranted { stripe_invoice_item, terms, .. } = &events[0] else { unreachable!() };
        assert!(*stripe_invoice_item);
        assert_eq!(terms.price, Some(MinorUnits(990)));
        assert!(life.state.invoices.is_empty());
    }
}

fn notice(rule: &str, subject: Option<&str>, episode: u32) -> AlertNotice {
    AlertNotice {
        rule: rule.to_owned(),
        subject: subject.map(str::to_owned),
        episode,
        figures: serde_json::json!({"available": 40}),
    }
}

#[test]
fn an_alert_episode_opens_once_and_closes_once() {
    let mut life = Life::new(at(2026, 1, 1));
    assert_eq!(code(life.when(MemberCommand::RaiseAlert(notice("low_balance", None, 1))).unwrap_err()), "not_found");
    life.run(grant(GrantSource::Purchase, 50));
    let raised = life.when(MemberCommand::RaiseAlert(notice("low_balance", None, 1))).unwrap();
    assert!(matches!(&raised[..], [MemberEvent::AlertTriggered { alert_id, .. }] if alert_id == "low_balance:1"));
    assert!(life.when(MemberCommand::RaiseAlert(notice("low_balance", None, 1))).unwrap().is_empty());
    assert_eq!(life.state.open_alerts.len(), 1);
    let resolved = life.when(MemberCommand::ResolveAlert(notice("low_balance", None, 1))).unwrap();
    assert!(matches!(&resolved[..], [MemberEvent::AlertResolved { alert_id, .. }] if alert_id == "low_balance:1"));
    assert!(life.when(MemberCommand::ResolveAlert(notice("low_balance", None, 1))).unwrap().is_empty());
    // A closed episode never opens again; the next one does.
    assert!(life.when(MemberCommand::RaiseAlert(notice("low_balance", None, 1))).unwrap().is_empty());
    assert_eq!(life.when(MemberCommand::RaiseAlert(notice("low_balance", None, 2))).unwrap().len(), 1);
    // Subjects have episodes of their own.
    let subject = life.when(MemberCommand::RaiseAlert(notice("integration_failing", Some("crm"), 1))).unwrap();
    assert!(
        matches!(&subject[..], [MemberEvent::AlertTriggered { alert_id, .. }] if alert_id == "integration_failing:crm:1")
    );
    assert_eq!(life.state.open_alerts.keys().collect::<Vec<_>>(), ["integration_failing:crm:1", "low_balance:2"]);
}

#[test]
fn alert_notices_and_rule_overrides_are_checked() {
    let mut life = Life::new(at(2026, 1, 1));
    life.run(grant(GrantSource::Purchase, 50));
    let mut bad = notice("low_balance", None, 0);
    assert_eq!(field(life.when(MemberCommand::RaiseAlert(bad.clone())).unwrap_err()), Some("episode"));
    bad.episode = 1;
    bad.figures = serde_json::json!([1]);
    assert_eq!(field(life.when(MemberCommand::RaiseAlert(bad.clone())).unwrap_err()), Some("figures"));
    bad.figures = serde_json::json!({"note": "x".repeat(5_000)});
    assert_eq!(field(life.when(MemberCommand::RaiseAlert(bad)).unwrap_err()), Some("figures"));
    let rules = |overrides| MemberCommand::SetAlertRules { overrides };
    assert_eq!(field(life.when(rules(serde_json::json!("all"))).unwrap_err()), Some("overrides"));
    assert!(life.when(rules(serde_json::json!({}))).unwrap().is_empty(), "the defaults already");
    let set = serde_json::json!({"low_balance": {"below_credits": 500}});
    assert_eq!(life.when(rules(set.clone())).unwrap().len(), 1);
    assert_eq!(life.state.alert_rules, Some(set.clone()));
    assert!(life.when(rules(set)).unwrap().is_empty(), "unchanged");
    assert_eq!(life.when(rules(serde_json::json!({}))).unwrap().len(), 1);
    assert_eq!(life.state.alert_rules, None);
}
