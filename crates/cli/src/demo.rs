//! `serve --demo`: a plan catalog and a month of history for a few members,
//! written through the ledger itself (with a clock that walks the month), so
//! a new user sees real balances, usage, rollovers and invoices at once.

use anyhow::{Context, Result};
use chrono::{DateTime, Duration, DurationRound, Utc};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tally_ledger::domain::*;
use tally_ledger::{Ledger, LedgerError, LedgerOptions, ManualClock, Request};

const PLANS: &str = include_str!("../../../fixtures/plans.json");
const MEMBERS: &str = include_str!("../../../fixtures/demo-members.json");
/// How far back the demo history starts.
const HISTORY_DAYS: i64 = 35;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoMember {
    member_id: String,
    time_zone: String,
    plan_id: String,
    daily_credits: [i64; 2],
    purchase: Option<Purchase>,
    upgrade: Option<Upgrade>,
    promotional: Option<Promotional>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Purchase {
    day: i64,
    credits: i64,
    price: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Upgrade {
    day: i64,
    plan_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Promotional {
    day: i64,
    credits: i64,
    expires_in_days: i64,
}

pub fn plans() -> Result<Vec<Plan>> {
    serde_json::from_str(PLANS).context("fixtures/plans.json")
}

/// A small deterministic generator, so every demo shows the same numbers.
struct Lcg(u64);

impl Lcg {
    fn next_in(&mut self, low: i64, high: i64) -> i64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        low + ((self.0 >> 33) as i64).rem_euclid(high - low + 1)
    }
}

fn accepted(result: Result<tally_ledger::Executed, LedgerError>) -> Result<()> {
    match result {
        Ok(_) => Ok(()),
        // Demo usage that would overspend is simply not recorded.
        Err(LedgerError::Rejected(DomainError::InsufficientCredits { .. })) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Load the demo into an empty log at `events_path`. Returns false (and
/// writes nothing) if the log already has events.
pub fn load(events_path: &Path, now: DateTime<Utc>) -> Result<bool> {
    let start = (now - Duration::days(HISTORY_DAYS)).duration_trunc(Duration::days(1)).context("demo start")?;
    let clock = Arc::new(ManualClock::new(start));
    let ledger = Ledger::open(events_path, LedgerOptions::default(), clock.clone())?;
    if ledger.reader()?.head()?.position > 0 {
        return Ok(false);
    }
    for plan in plans()? {
        ledger.execute_catalog(Request::new(CatalogCommand::PublishPlan(plan), "admin"))?;
    }
    let admin = |command| Request::new(command, "admin");
    let members: Vec<DemoMember> = serde_json::from_str(MEMBERS).context("fixtures/demo-members.json")?;
    for (index, member) in members.iter().enumerate() {
        clock.advance_to(start + Duration::minutes(10 * index as i64));
        let profile = MemberProfile { time_zone: member.time_zone.clone(), ..MemberProfile::default() };
        ledger.execute(&member.member_id, admin(MemberCommand::Register(profile)))?;
        let start_subscription = MemberCommand::StartSubscription {
            plan_id: member.plan_id.clone(),
            billing: Billing::Tally,
            stripe_subscription_id: None,
        };
        ledger.execute(&member.member_id, admin(start_subscription))?;
    }
    let mut random = Lcg(0x7a11);
    for day in 0..HISTORY_DAYS {
        for hour in [9, 13, 17] {
            let instant = start + Duration::days(day) + Duration::hours(hour);
            if instant > now {
                break;
            }
            clock.advance_to(instant);
            ledger.run_due()?;
            for member in &members {
                let credits = random.next_in(member.daily_credits[0], member.daily_credits[1]) / 3;
                let usage = RecordUsage {
                    usage_id: format!("demo-{day}-{hour}"),
                    metric: if hour == 13 { "queries".to_owned() } else { "api_calls".to_owned() },
                    quantity: random.next_in(1, 40),
                    credits: Credits(credits.max(1)),
                    occurred_at: None,
                    integration_id: None,
                    query_id: None,
                };
                accepted(ledger.execute(&member.member_id, admin(MemberCommand::RecordUsage(usage))))?;
                if hour != 9 {
                    continue;
                }
                if let Some(purchase) = member.purchase.as_ref().filter(|purchase| purchase.day == day) {
                    let mut grant = GrantCredits::new(GrantSource::Purchase, purchase.credits);
                    grant.price = Some(MinorUnits(purchase.price));
                    ledger.execute(&member.member_id, admin(MemberCommand::GrantCredits(grant)))?;
                }
                if let Some(promotional) = member.promotional.as_ref().filter(|promotional| promotional.day == day) {
                    let mut grant = GrantCredits::new(GrantSource::Promotional, promotional.credits);
                    grant.expires_at = Some(instant + Duration::days(promotional.expires_in_days));
                    ledger.execute(&member.member_id, admin(MemberCommand::GrantCredits(grant)))?;
                }
                if let Some(upgrade) = member.upgrade.as_ref().filter(|upgrade| upgrade.day == day) {
                    ledger.execute(
                        &member.member_id,
                        admin(MemberCommand::ChangePlan { plan_id: upgrade.plan_id.clone() }),
                    )?;
                }
            }
        }
    }
    clock.advance_to(now);
    ledger.run_due()?;
    // The first period's invoices: acme paid, globex's payment failed.
    accepted(ledger.execute("acme", admin(MemberCommand::PayInvoice { invoice_id: "inv_acme_1".to_owned() })))?;
    let failed = MemberCommand::RecordPaymentFailed {
        invoice_id: "inv_globex_1".to_owned(),
        reason: Some("card_declined".to_owned()),
    };
    accepted(ledger.execute("globex", admin(failed)))?;
    ledger.shutdown();
    Ok(true)
}
