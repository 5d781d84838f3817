//! `serve --demo`: a plan catalog and a month of history for a few members,
//! written through the ledger itself (with a clock that walks the month), so
//! a new user sees real balances, usage, rollovers and invoices at once;
//! and for acme two integrations (REST `weather`, GraphQL `catalog`) on the
//! demo upstream ([`crate::demo_upstream`]), with saved queries and a week
//! of charged executions, and a third (`legacy-crm`) whose checks fail. So
//! that the alerts and analytics show something at once, the history ends
//! with a usage spike for acme today, initech below the low-balance floor
//! its own alert rules set, globex's failed payment and the failing
//! integration.

use anyhow::{Context, Result};
use chrono::{DateTime, Duration, DurationRound, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use tally_ledger::domain::*;
use tally_ledger::{Ledger, LedgerError, LedgerOptions, ManualClock, Request};

const PLANS: &str = include_str!("../../../fixtures/plans.json");
const MEMBERS: &str = include_str!("../../../fixtures/demo-members.json");
/// How far back the demo history starts.
const HISTORY_DAYS: i64 = 35;
/// How many days of query executions the demo has.
const EXECUTION_DAYS: i64 = 7;
/// The member whose integrations the demo sets up.
pub const INTEGRATIONS_MEMBER: &str = "acme";

/// The demo's integrations: (id, provider, name, config on the upstream
/// at `base`).
fn demo_integrations(base: &str) -> [(&'static str, &'static str, &'static str, Value); 3] {
    [
        (
            "weather",
            "rest",
            "Weather (demo)",
            json!({"base_url": base, "auth": {"type": "none"}, "health_path": "/health"}),
        ),
        (
            "catalog",
            "graphql",
            "Product catalog (demo)",
            json!({"endpoint": format!("{base}/graphql"), "auth": {"type": "none"}}),
        ),
        (
            "legacy-crm",
            "rest",
            "Legacy CRM (demo, failing)",
            // Port 9 (discard) on loopback: nothing listens, every check fails.
            json!({"base_url": "http://127.0.0.1:9", "auth": {"type": "none"}, "health_path": "/health"}),
        ),
    ]
}

/// The demo integration whose checks fail (its upstream path is gone).
const FAILING_INTEGRATION: &str = "legacy-crm";
/// Acme's usage spike on the demo's last day, in credits.
const SPIKE_CREDITS: i64 = 2_500;

/// The demo's saved queries: (integration, query, spec).
fn demo_queries() -> Result<Vec<(&'static str, &'static str, Value)>> {
    let specs = [
        (
            "weather",
            "forecast",
            json!({"kind": "request", "name": "7-day forecast", "request": {"method": "GET", "path": "/forecast/{{city}}"},
                "params": {"city": {"type": "string"}}, "rows_pointer": "/items", "cache_ttl_s": 60,
                "credits_base": 5, "credits_per_1k_rows": 1, "max_rows": 1000}),
        ),
        (
            "catalog",
            "products",
            json!({"kind": "graphql", "name": "Products by category",
                "graphql": {"query": "query($category: String) { products(category: $category) { sku name category price } }"},
                "params": {"category": {"type": "string", "default": "software"}}, "rows_pointer": "/products",
                "cache_ttl_s": 300, "credits_base": 3, "credits_per_1k_rows": 1, "max_rows": 1000}),
        ),
    ];
    specs
        .into_iter()
        .map(|(integration, query, spec)| {
            // Saved as the API saves them: parsed, then written back whole.
            let parsed: tally_integrations::query::QuerySpec =
                serde_json::from_value(spec).with_context(|| format!("demo query {integration}/{query}"))?;
            Ok((integration, query, serde_json::to_value(&parsed)?))
        })
        .collect()
}

/// Points the demo's integrations at the demo upstream of this run (its
/// port changes from run to run). Does nothing to integrations a user
/// removed.
pub fn point_integrations(ledger: &Ledger, base: &str) -> Result<()> {
    for (integration_id, provider, name, config) in demo_integrations(base) {
        let state = ledger.integration_state(INTEGRATIONS_MEMBER, integration_id)?;
        if !state.live || state.config == config {
            continue;
        }
        let put =
            IntegrationCommand::Put { provider: provider.to_owned(), name: name.to_owned(), config, credential: None };
        ledger.execute_integration(INTEGRATIONS_MEMBER, integration_id, Request::new(put, "demo"))?;
    }
    Ok(())
}

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

/// Registers the demo's integrations (checked once) and saves their queries.
fn register_integrations(ledger: &Ledger, base: &str) -> Result<()> {
    let admin = |command| Request::new(command, "admin");
    for (integration_id, provider, name, config) in demo_integrations(base) {
        let put =
            IntegrationCommand::Put { provider: provider.to_owned(), name: name.to_owned(), config, credential: None };
        ledger.execute_integration(INTEGRATIONS_MEMBER, integration_id, admin(put))?;
        let failing = integration_id == FAILING_INTEGRATION;
        // Checked once; the failing one three times, which makes it `failing`.
        for _ in 0..if failing { tally_ledger::domain::integration::FAILING_AFTER } else { 1 } {
            let test = IntegrationCommand::RecordTest {
                ok: !failing,
                latency_ms: 12,
                api_usage: None,
                error_code: failing.then(|| "integration_query_failed".to_owned()),
                source: TestSource::Probe,
            };
            ledger.execute_integration(INTEGRATIONS_MEMBER, integration_id, admin(test))?;
        }
    }
    for (integration_id, query_id, spec) in demo_queries()? {
        let save = IntegrationCommand::SaveQuery { query_id: query_id.to_owned(), spec };
        ledger.execute_integration(INTEGRATIONS_MEMBER, integration_id, admin(save))?;
    }
    Ok(())
}

/// One execution of a demo query, reserved and settled as a real one is
/// (`QueryExecuted` in the settlement): one in twelve times the source
/// timed out (nothing charged), one in four the answer came from the cache.
fn execute_demo_query(ledger: &Ledger, random: &mut Lcg, slot: usize) -> Result<()> {
    let admin = |command| Request::new(command, "admin");
    let (integration_id, query_id, base_credits, rows) =
        [("weather", "forecast", 5, 7), ("catalog", "products", 3, 3)][slot % 2];
    let reserve = MemberCommand::Reserve { amount: Credits(base_credits + 1), ttl_s: Some(60) };
    let reserved = match ledger.execute(INTEGRATIONS_MEMBER, admin(reserve)) {
        Ok(reserved) => reserved,
        Err(LedgerError::Rejected(DomainError::InsufficientCredits { .. })) => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    let reservation_id = reserved
        .outcome
        .events
        .iter()
        .find_map(|appended| appended.event["reservation_id"].as_str().map(str::to_owned))
        .context("a reservation has an id")?;
    let roll = random.next_in(0, 11);
    let cache_hit = roll % 4 == 1;
    let (execution, credits) = if roll == 0 {
        let failed = QueryExecution {
            integration_id: integration_id.to_owned(),
            query_id: query_id.to_owned(),
            status: QueryStatus::Failed,
            duration_ms: 10_000,
            rows: 0,
            bytes: 0,
            cache_hit: false,
            error_code: Some("integration_timeout".to_owned()),
            api_usage: None,
        };
        (failed, 0)
    } else {
        let done = QueryExecution {
            integration_id: integration_id.to_owned(),
            query_id: query_id.to_owned(),
            status: QueryStatus::Succeeded,
            duration_ms: if cache_hit { random.next_in(0, 2) } else { random.next_in(15, 240) },
            rows,
            bytes: rows * 64,
            cache_hit,
            error_code: None,
            api_usage: None,
        };
        (done, if cache_hit { base_credits } else { base_credits + 1 })
    };
    let settle = MemberCommand::Settle { reservation_id, amount: Credits(credits), query: Some(execution) };
    ledger.execute(INTEGRATIONS_MEMBER, admin(settle))?;
    Ok(())
}

/// Load the demo into an empty log at `events_path`. Returns false (and
/// writes nothing) if the log already has events.
pub fn load(events_path: &Path, now: DateTime<Utc>, upstream_base: &str) -> Result<bool> {
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
    let mut random_queries = Lcg(0x9e3);
    let mut demo_executions = 0;
    for day in 0..HISTORY_DAYS {
        for hour in [9, 13, 17] {
            let instant = start + Duration::days(day) + Duration::hours(hour);
            if instant > now {
                break;
            }
            clock.advance_to(instant);
            ledger.run_due()?;
            if day == HISTORY_DAYS - EXECUTION_DAYS - 1 && hour == 9 {
                register_integrations(&ledger, upstream_base)?;
            }
            if day >= HISTORY_DAYS - EXECUTION_DAYS {
                execute_demo_query(&ledger, &mut random_queries, demo_executions)?;
                demo_executions += 1;
            }
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
    // Initech's own alert rules: a low balance below 1,000 credits.
    let rules = MemberCommand::SetAlertRules { overrides: json!({"low_balance": {"below_credits": 1_000}}) };
    ledger.execute("initech", admin(rules))?;
    // A spike: acme uses several days' worth of credits today.
    let spike = RecordUsage {
        usage_id: "demo-spike".to_owned(),
        metric: "exports".to_owned(),
        quantity: 50,
        credits: Credits(SPIKE_CREDITS),
        occurred_at: None,
        integration_id: None,
        query_id: None,
    };
    accepted(ledger.execute(INTEGRATIONS_MEMBER, admin(MemberCommand::RecordUsage(spike))))?;
    ledger.shutdown();
    Ok(true)
}
