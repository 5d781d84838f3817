//! Alert properties: over generated histories (spending, grants that
//! expire, a plan with overage, payments failing and recovering, an
//! integration failing and healing, time passing, the reactor restarted
//! with and without decisions left unsent), the episodes the reactor
//! appends equal those of the reference evaluator in `tally-testkit`,
//! each once.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use tally_ledger::domain::{
    Billing, CatalogCommand, Credits, GrantCredits, GrantSource, IntegrationCommand, Interval, MemberCommand,
    MemberProfile, MinorUnits, Overage, Plan, RecordUsage, Rollover, TestSource,
};
use tally_ledger::store::StoreOptions;
use tally_ledger::{Idempotency, Ledger, LedgerOptions, ManualClock, Request};
use tally_notify::reactor::AlertReactor;
use tally_notify::rules::RuleSet;
use tally_testkit::Model;
use tally_testkit::alerts::{AlertReference, Fired};
use tally_testkit::model::invoice_id;

const MEMBERS: [(&str, &str); 3] = [("m1", "UTC"), ("m2", "America/New_York"), ("m3", "Asia/Tokyo")];

/// 300 credits a month for $10, up to 200 credits of overage at 2¢.
fn small_plan() -> Plan {
    Plan {
        plan_id: "small".to_owned(),
        name: "Small".to_owned(),
        price: MinorUnits(1_000),
        currency: "USD".to_owned(),
        interval: Interval::Month,
        monthly_credits: Credits(300),
        rollover: Rollover { enabled: false, max_credits: Credits(0) },
        overage: Overage { allowed: true, limit_credits: Credits(200), unit_price: MinorUnits(2) },
        rate_limit_per_minute: 600,
        stripe_price_id: None,
    }
}

#[derive(Clone, Debug)]
enum Act {
    Grant {
        member: usize,
        amount: i64,
        expires_in_days: Option<i64>,
    },
    Use {
        member: usize,
        credits: i64,
    },
    Subscribe {
        member: usize,
    },
    FailPayment {
        member: usize,
        invoice: usize,
    },
    Pay {
        member: usize,
        invoice: usize,
    },
    Test {
        member: usize,
        ok: bool,
    },
    /// Hours pass; what fell due runs, the reactor catches up and sweeps.
    Time {
        hours: i64,
    },
    /// The reactor catches up.
    React,
    /// The reactor stops and starts again from its file; with `unsent`,
    /// after committing decisions it never sent.
    Restart {
        unsent: bool,
    },
}

fn act() -> impl Strategy<Value = Act> {
    let member = 0..MEMBERS.len();
    prop_oneof![
        3 => (member.clone(), 10..400i64, proptest::option::of(1..20i64))
            .prop_map(|(member, amount, expires_in_days)| Act::Grant { member, amount, expires_in_days }),
        6 => (member.clone(), 1..250i64).prop_map(|(member, credits)| Act::Use { member, credits }),
        1 => member.clone().prop_map(|member| Act::Subscribe { member }),
        1 => (member.clone(), 1..3usize).prop_map(|(member, invoice)| Act::FailPayment { member, invoice }),
        1 => (member.clone(), 1..3usize).prop_map(|(member, invoice)| Act::Pay { member, invoice }),
        2 => (member, any::<bool>()).prop_map(|(member, ok)| Act::Test { member, ok }),
        3 => (1..60i64).prop_map(|hours| Act::Time { hours }),
        1 => Just(Act::React),
        1 => any::<bool>().prop_map(|unsent| Act::Restart { unsent }),
    ]
}

struct World {
    directory: tempfile::TempDir,
    clock: Arc<ManualClock>,
    now: DateTime<Utc>,
    ledger: Ledger,
    model: Model,
    reference: AlertReference,
    reactor: Option<AlertReactor>,
    keys: u64,
}

impl World {
    fn new() -> World {
        let directory = tempfile::tempdir().unwrap();
        let now = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
        let clock = Arc::new(ManualClock::new(now));
        let options = LedgerOptions {
            store: StoreOptions { synchronous_full: false, ..StoreOptions::default() },
            ..LedgerOptions::default()
        };
        let ledger = Ledger::open(&directory.path().join("events.db"), options, clock.clone()).unwrap();
        ledger.execute_catalog(Request::new(CatalogCommand::PublishPlan(small_plan()), "admin")).unwrap();
        let reactor = AlertReactor::open(&directory.path().join("alerts.sqlite"), RuleSet::default()).unwrap();
        let mut world = World {
            directory,
            clock,
            now,
            ledger,
            model: Model::new(vec![small_plan()]),
            reference: AlertReference::new(),
            reactor: Some(reactor),
            keys: 0,
        };
        for (member, zone) in MEMBERS {
            world.reference.set_zone(member, zone.parse().unwrap());
            let profile =
                MemberProfile { time_zone: zone.to_owned(), currency: "USD".to_owned(), stripe_customer_id: None };
            world.member(member, MemberCommand::Register(profile));
            let put = IntegrationCommand::Put {
                provider: "rest".to_owned(),
                name: "CRM".to_owned(),
                config: serde_json::json!({"base_url": "https://crm.example.com"}),
                credential: None,
            };
            world.ledger.execute_integration(member, "crm", Request::new(put, "admin")).unwrap();
        }
        world
    }

    fn keyed<C>(&mut self, command: C) -> Request<C> {
        self.keys += 1;
        let key = format!("k{}", self.keys);
        Request::new(command, "admin").with_idempotency(Idempotency {
            scope: "test".to_owned(),
            key,
            fingerprint: [0; 32],
            status: 200,
        })
    }

    /// One command on both sides; the reference evaluates after an append.
    fn member(&mut self, member: &str, command: MemberCommand) {
        let request = self.keyed(command.clone());
        let ledger = self.ledger.execute(member, request);
        let model = self.model.apply(member, &command, self.now);
        assert_eq!(ledger.is_ok(), model.is_ok(), "{command:?}: ledger {ledger:?}, model {model:?}");
        if let Ok(executed) = ledger {
            self.reference.observe(&self.model, member, self.now);
            if executed.outcome.events_appended > 0 {
                self.reference.evaluate(&self.model, member, self.now);
            }
        }
    }

    fn act(&mut self, act: &Act) {
        let name = |member: usize| MEMBERS[member].0;
        match act {
            Act::Grant { member, amount, expires_in_days } => {
                let mut grant = GrantCredits::new(GrantSource::Promotional, *amount);
                grant.expires_at = expires_in_days.map(|days| self.now + Duration::days(days));
                self.member(name(*member), MemberCommand::GrantCredits(grant));
            }
            Act::Use { member, credits } => {
                self.keys += 1;
                let usage = RecordUsage {
                    usage_id: format!("u{}", self.keys),
                    metric: "calls".to_owned(),
                    quantity: 1,
                    credits: Credits(*credits),
                    occurred_at: None,
                    integration_id: None,
                    query_id: None,
                };
                self.member(name(*member), MemberCommand::RecordUsage(usage));
            }
            Act::Subscribe { member } => self.member(
                name(*member),
                MemberCommand::StartSubscription {
                    plan_id: "small".to_owned(),
                    billing: Billing::Tally,
                    stripe_subscription_id: None,
                },
            ),
            Act::FailPayment { member, invoice } => {
                let member = name(*member);
                let command =
                    MemberCommand::RecordPaymentFailed { invoice_id: invoice_id(member, *invoice), reason: None };
                let accepted = self.model.clone().apply(member, &command, self.now).is_ok();
                self.member(member, command);
                if accepted {
                    self.reference.payment_failed(member, *invoice);
                    self.reference.evaluate(&self.model, member, self.now);
                }
            }
            Act::Pay { member, invoice } => {
                let member = name(*member);
                self.member(member, MemberCommand::PayInvoice { invoice_id: invoice_id(member, *invoice) });
            }
            Act::Test { member, ok } => {
                let member = name(*member);
                let test = IntegrationCommand::RecordTest {
                    ok: *ok,
                    latency_ms: 5,
                    error_code: (!ok).then(|| "integration_timeout".to_owned()),
                    source: TestSource::Probe,
                    api_usage: None,
                };
                let request = self.keyed(test);
                self.ledger.execute_integration(member, "crm", request).unwrap();
                self.reference.tested(member, *ok);
                self.reference.evaluate(&self.model, member, self.now);
            }
            Act::Time { hours } => {
                self.now += Duration::hours(*hours);
                assert!(self.clock.advance_to(self.now));
                for (member, _) in MEMBERS {
                    self.member(member, MemberCommand::AdvanceTime);
                }
                let now = self.now;
                let ledger = &self.ledger;
                let reactor = self.reactor.as_mut().expect("a reactor");
                reactor.run_once(ledger).unwrap();
                reactor.sweep(ledger, now).unwrap();
                for (member, _) in MEMBERS {
                    self.reference.evaluate(&self.model, member, now);
                }
            }
            Act::React => {
                let ledger = &self.ledger;
                self.reactor.as_mut().expect("a reactor").run_once(ledger).unwrap();
            }
            Act::Restart { unsent } => {
                if *unsent {
                    let ledger = &self.ledger;
                    self.reactor.as_mut().expect("a reactor").evaluate_only(ledger).unwrap();
                }
                self.reactor = None;
                let path = self.directory.path().join("alerts.sqlite");
                self.reactor = Some(AlertReactor::open(&path, RuleSet::default()).unwrap());
            }
        }
    }

    /// The episodes in the log, with grant ids named `#k` as the
    /// reference names them.
    fn fired(&self) -> Vec<Fired> {
        let reader = self.ledger.reader().unwrap();
        let events = reader.read_all(0, 10_000).unwrap();
        let mut grants: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        let mut fired = Vec::new();
        for recorded in &events {
            let Some(member) = recorded.stream_id.strip_prefix("member-") else { continue };
            let payload: serde_json::Value = serde_json::from_str(&recorded.payload).unwrap();
            let kind = match recorded.event_type.as_str() {
                "CreditsGranted" => {
                    let of_member = grants.entry(member.to_owned()).or_default();
                    let ordinal = of_member.len() + 1;
                    of_member.insert(payload["grant_id"].as_str().unwrap().to_owned(), ordinal);
                    continue;
                }
                "AlertTriggered" => "raised",
                "AlertResolved" => "resolved",
                _ => continue,
            };
            let mut alert_id = payload["alert_id"].as_str().unwrap().to_owned();
            if let Some(grant_id) = payload["subject"].as_str()
                && payload["rule"] == "credits_expiring"
            {
                alert_id = alert_id.replace(grant_id, &format!("#{}", grants[member][grant_id]));
            }
            fired.push((member.to_owned(), alert_id, kind));
        }
        fired
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_reactor_fires_what_the_reference_does_once_per_episode(acts in proptest::collection::vec(act(), 1..50)) {
        let mut world = World::new();
        for act in &acts {
            world.act(act);
        }
        world.act(&Act::Restart { unsent: false });
        world.act(&Act::React);
        let mut seen = world.fired();
        let mut expected = world.reference.fired().to_vec();
        seen.sort();
        expected.sort();
        prop_assert_eq!(seen, expected);
    }
}

/// A long history with every rule firing, so that the property above is
/// not vacuous: the reference and the reactor agree, and each rule of the
/// history opened and closed episodes.
#[test]
fn a_known_history_fires_every_rule_it_touches() {
    let mut world = World::new();
    let script = [
        Act::Grant { member: 0, amount: 150, expires_in_days: Some(5) },
        Act::Use { member: 0, credits: 120 },
        Act::Test { member: 1, ok: false },
        Act::Test { member: 1, ok: false },
        Act::Test { member: 1, ok: false },
        Act::Restart { unsent: true },
        Act::Subscribe { member: 2 },
        Act::Use { member: 2, credits: 249 },
        Act::Use { member: 2, credits: 150 },
        Act::Time { hours: 24 * 31 },
        Act::FailPayment { member: 2, invoice: 1 },
        Act::React,
        Act::Test { member: 1, ok: true },
        Act::Pay { member: 2, invoice: 1 },
        Act::Time { hours: 30 },
    ];
    for act in &script {
        world.act(act);
    }
    world.act(&Act::React);
    let mut seen = world.fired();
    let mut expected = world.reference.fired().to_vec();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);
    let rules: std::collections::BTreeSet<String> =
        seen.iter().map(|(_, alert_id, _)| alert_id.split(':').next().unwrap().to_owned()).collect();
    for rule in
        ["low_balance", "usage_spike", "integration_failing", "payment_failed", "credits_expiring", "overage_started"]
    {
        assert!(rules.contains(rule), "{rule} never fired: {seen:?}");
    }
    assert!(seen.iter().any(|(_, _, kind)| *kind == "resolved"));
}
