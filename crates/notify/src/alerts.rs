//! When the alert rules' conditions hold (DESIGN.md §11), as a pure
//! function of a member's state, what the reactor saw of it, and `now`.
//!
//! The reactor ([`crate::reactor`]) keeps a [`Watch`] per member and calls
//! [`evaluate`] after each of the member's appends and when time alone may
//! change a condition ([`next_due`]). [`Watch::step`] turns the conditions
//! into episodes: a condition that becomes true opens the next episode of
//! its `(rule, subject)`, one that stops holding closes it, and nothing
//! else happens, so an alert fires once per episode.
//!
//! Days are the member's local days. "Credits used" counts usage and
//! settled reservations when they took effect (a reversal gives credits
//! back but does not undo use), as the ledger's `used` total does.

use crate::rules::RuleSet;
use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use tally_ledger::domain::{AlertNotice, InvoiceStatus, MemberState, alert_key};

/// The days before today a trailing mean covers.
pub const TRAILING_DAYS: u64 = 7;

/// What the reactor knows of a member beyond its ledger state: use per
/// local day, the facts of other streams, and the episodes it decided.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    /// Credits used per local day, for today and the trailing days only.
    #[serde(default)]
    pub daily: BTreeMap<NaiveDate, i64>,
    /// Invoices whose payment failed and that were open then.
    #[serde(default)]
    pub failed_invoices: BTreeSet<String>,
    /// Integrations whose status is `failing`.
    #[serde(default)]
    pub failing_integrations: BTreeSet<String>,
    /// Open episodes by `rule` or `rule:subject`.
    #[serde(default)]
    pub open: BTreeMap<String, AlertNotice>,
    /// The last episode opened per `rule` or `rule:subject`.
    #[serde(default)]
    pub episodes: BTreeMap<String, u32>,
}

/// A condition that holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub rule: &'static str,
    pub subject: Option<String>,
    pub figures: Value,
}

/// What an evaluation decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Transition {
    Raise { notice: AlertNotice },
    Resolve { notice: AlertNotice },
}

impl Transition {
    pub fn notice(&self) -> &AlertNotice {
        match self {
            Transition::Raise { notice } | Transition::Resolve { notice } => notice,
        }
    }
}

/// The member's local day of an instant (UTC for an unknown zone, which the
/// ledger never lets in).
pub fn local_day(state: &MemberState, instant: DateTime<Utc>) -> NaiveDate {
    let zone: Tz = state.profile.time_zone.parse().unwrap_or(Tz::UTC);
    instant.with_timezone(&zone).date_naive()
}

/// The first instant of the local day after `instant`'s.
fn next_local_midnight(state: &MemberState, instant: DateTime<Utc>) -> DateTime<Utc> {
    let zone: Tz = state.profile.time_zone.parse().unwrap_or(Tz::UTC);
    let tomorrow = local_day(state, instant) + Days::new(1);
    // A midnight a DST change skips begins the day at the first instant
    // that exists; the search is bounded to a few hours.
    (0..=180)
        .find_map(|minutes| {
            let time = tomorrow.and_hms_opt(0, 0, 0)? + chrono::Duration::minutes(minutes);
            zone.from_local_datetime(&time).earliest()
        })
        .map_or(instant + chrono::Duration::days(1), |local| local.with_timezone(&Utc))
}

impl Watch {
    /// A watch for a member first seen with this state: the stream's open
    /// alerts and last episodes.
    pub fn seeded(state: &MemberState) -> Watch {
        Watch {
            open: state.open_alerts.values().map(|notice| (notice.key(), notice.clone())).collect(),
            episodes: state.alert_episodes.clone(),
            ..Watch::default()
        }
    }

    /// Count `credits` used on `day`; days before the trailing window of
    /// `today` are forgotten.
    pub fn add_use(&mut self, day: NaiveDate, credits: i64, today: NaiveDate) {
        if credits != 0 {
            *self.daily.entry(day).or_default() += credits;
        }
        self.forget_before(today);
    }

    fn forget_before(&mut self, today: NaiveDate) {
        let first = today - Days::new(TRAILING_DAYS);
        self.daily.retain(|day, _| *day >= first);
    }

    /// Today's use and the sum of the trailing days before it.
    fn use_around(&self, today: NaiveDate) -> (i64, i64) {
        let first = today - Days::new(TRAILING_DAYS);
        let trailing = self.daily.range(first..today).map(|(_, credits)| credits).sum();
        (self.daily.get(&today).copied().unwrap_or(0), trailing)
    }

    /// Episodes from what holds now: opens the next episode of each new
    /// finding, closes each open one no longer found.
    pub fn step(&mut self, findings: Vec<Finding>, state: &MemberState, now: DateTime<Utc>) -> Vec<Transition> {
        let mut found: BTreeMap<String, Finding> = BTreeMap::new();
        for finding in findings {
            found.insert(alert_key(finding.rule, finding.subject.as_deref()), finding);
        }
        let mut transitions = Vec::new();
        let closed: Vec<String> = self.open.keys().filter(|key| !found.contains_key(*key)).cloned().collect();
        for key in closed {
            let mut notice = self.open.remove(&key).expect("an open episode");
            notice.figures = cleared_figures(&notice, state, self, now);
            transitions.push(Transition::Resolve { notice });
        }
        for (key, finding) in found {
            if self.open.contains_key(&key) {
                continue;
            }
            let episode = self.episodes.get(&key).copied().unwrap_or(0) + 1;
            self.episodes.insert(key.clone(), episode);
            let notice = AlertNotice {
                rule: finding.rule.to_owned(),
                subject: finding.subject,
                episode,
                figures: finding.figures,
            };
            self.open.insert(key, notice.clone());
            transitions.push(Transition::Raise { notice });
        }
        self.failed_invoices.retain(|invoice_id| {
            state.invoices.get(invoice_id).is_some_and(|invoice| invoice.status == InvoiceStatus::Open)
        });
        transitions
    }
}

/// What the member's figures are when an episode closes.
fn cleared_figures(notice: &AlertNotice, state: &MemberState, watch: &Watch, now: DateTime<Utc>) -> Value {
    match notice.rule.as_str() {
        "low_balance" => json!({"available": state.available().0}),
        "usage_spike" => json!({"today_credits": watch.use_around(local_day(state, now)).0}),
        "overage_started" => json!({"debt": state.debt().0}),
        _ => json!({}),
    }
}

/// The conditions that hold for a member at `now`.
pub fn evaluate(rules: &RuleSet, state: &MemberState, watch: &Watch, now: DateTime<Utc>) -> Vec<Finding> {
    let mut findings = Vec::new();
    if !state.is_registered() {
        return findings;
    }
    let today = local_day(state, now);
    let (today_credits, trailing) = watch.use_around(today);
    let burn_per_day = trailing / TRAILING_DAYS as i64;
    let available = state.available().0;

    let low = &rules.low_balance;
    if low.enabled && state.totals.granted.is_positive() {
        let by_credits = low.below_credits.is_some_and(|floor| available < floor);
        let by_days = low.below_days.is_some_and(|days| burn_per_day > 0 && available < burn_per_day * i64::from(days));
        if by_credits || by_days {
            findings.push(Finding {
                rule: "low_balance",
                subject: None,
                figures: json!({"available": available, "below_credits": low.below_credits,
                    "below_days": low.below_days, "burn_rate_per_day": burn_per_day}),
            });
        }
    }

    let spike = &rules.usage_spike;
    if spike.enabled
        && today_credits > spike.floor_credits
        && i128::from(today_credits) * 10 * i128::from(TRAILING_DAYS as i64)
            > i128::from(spike.factor_tenths) * i128::from(trailing)
    {
        findings.push(Finding {
            rule: "usage_spike",
            subject: None,
            figures: json!({"today_credits": today_credits, "trailing_mean_per_day": burn_per_day,
                "factor": f64::from(spike.factor_tenths) / 10.0, "floor_credits": spike.floor_credits}),
        });
    }

    if rules.integration_failing {
        for integration_id in &watch.failing_integrations {
            findings.push(Finding {
                rule: "integration_failing",
                subject: Some(integration_id.clone()),
                figures: json!({"integration_id": integration_id}),
            });
        }
    }

    if rules.payment_failed {
        for invoice_id in &watch.failed_invoices {
            if let Some(invoice) =
                state.invoices.get(invoice_id).filter(|invoice| invoice.status == InvoiceStatus::Open)
            {
                findings.push(Finding {
                    rule: "payment_failed",
                    subject: Some(invoice_id.clone()),
                    figures: json!({"invoice_id": invoice_id, "total": invoice.total.0}),
                });
            }
        }
    }

    let expiring = &rules.credits_expiring;
    if expiring.enabled {
        let horizon = now + chrono::Duration::days(i64::from(expiring.within_days));
        for grant in state.grants.values() {
            let credits = grant.spendable().0;
            if let Some(expires_at) = grant.expires_at.filter(|at| *at > now && *at <= horizon)
                && credits > 0
            {
                findings.push(Finding {
                    rule: "credits_expiring",
                    subject: Some(grant.grant_id.clone()),
                    figures: json!({"grant_id": grant.grant_id, "credits": credits, "expires_at": expires_at}),
                });
            }
        }
    }

    if rules.webhook_endpoint_failing {
        for (endpoint_id, endpoint) in &state.webhook_endpoints {
            if let Some(reason) = &endpoint.disabled_reason {
                findings.push(Finding {
                    rule: "webhook_endpoint_failing",
                    subject: Some(endpoint_id.clone()),
                    // The URL's host only: a path may hold a token.
                    figures: json!({"endpoint_id": endpoint_id, "host": host_of(&endpoint.config.url), "reason": reason}),
                });
            }
        }
    }

    let debt = state.debt().0;
    if rules.overage_started && debt > 0 {
        findings.push(Finding { rule: "overage_started", subject: None, figures: json!({"debt": debt}) });
    }
    findings
}

/// The host of a URL (`https://hooks.example.com:8443/x?token=…` →
/// `hooks.example.com:8443`), nothing of its path or query.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    authority.rsplit_once('@').map_or(authority, |(_, host)| host)
}

/// The next instant after `now` at which time alone may change what
/// [`evaluate`] finds: a local midnight while use is in the trailing
/// window, a grant entering its expiry window or expiring.
pub fn next_due(rules: &RuleSet, state: &MemberState, watch: &Watch, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut due: Option<DateTime<Utc>> = None;
    let mut consider = |instant: DateTime<Utc>| {
        if instant > now {
            due = Some(due.map_or(instant, |due| due.min(instant)));
        }
    };
    if !state.is_registered() {
        return None;
    }
    if watch.daily.values().any(|credits| *credits != 0) {
        consider(next_local_midnight(state, now));
    }
    if rules.credits_expiring.enabled {
        let window = chrono::Duration::days(i64::from(rules.credits_expiring.within_days));
        for grant in state.grants.values().filter(|grant| grant.spendable().is_positive()) {
            if let Some(expires_at) = grant.expires_at {
                consider(expires_at - window);
                consider(expires_at);
            }
        }
    }
    due
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use tally_ledger::domain::{Credits, Grant, GrantCategory, GrantSource};

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, day, hour, 0, 0).unwrap()
    }

    fn member(available: i64) -> MemberState {
        let mut state = MemberState { member_id: Some("acme".to_owned()), ..MemberState::default() };
        state.totals.granted = Credits(1_000);
        state.grants.insert(
            "g1".to_owned(),
            Grant {
                grant_id: "g1".to_owned(),
                source: GrantSource::Purchase,
                category: GrantCategory::Paid,
                priority: 50,
                amount: Credits(1_000),
                remaining: Credits(available),
                held: Credits(0),
                expires_at: None,
                expired: false,
                granted_version: 1,
            },
        );
        state
    }

    fn rules(of: &[Finding]) -> Vec<&'static str> {
        of.iter().map(|finding| finding.rule).collect()
    }

    #[test]
    fn low_balance_by_credits_and_by_days_of_burn() {
        let defaults = RuleSet::default();
        let mut watch = Watch::default();
        assert_eq!(rules(&evaluate(&defaults, &member(99), &watch, at(10, 12))), ["low_balance"]);
        assert!(evaluate(&defaults, &member(100), &watch, at(10, 12)).is_empty());
        // 70 credits a day over the last 7 days: 3 days of burn is 210.
        for day in 3..10 {
            watch.add_use(at(day, 12).date_naive(), 70, at(10, 0).date_naive());
        }
        let found = evaluate(&defaults, &member(209), &watch, at(10, 12));
        assert_eq!(rules(&found), ["low_balance"]);
        assert_eq!(found[0].figures["burn_rate_per_day"], 70);
        assert!(evaluate(&defaults, &member(210), &watch, at(10, 12)).is_empty());
        // A member that never had credits is not "low".
        let mut fresh = member(0);
        fresh.totals.granted = Credits(0);
        assert!(evaluate(&defaults, &fresh, &Watch::default(), at(10, 12)).is_empty());
    }

    #[test]
    fn a_spike_is_today_above_factor_times_the_trailing_mean_and_the_floor() {
        let defaults = RuleSet::default();
        let today = at(10, 0).date_naive();
        let mut watch = Watch::default();
        for day in 3..10 {
            watch.add_use(at(day, 12).date_naive(), 50, today);
        }
        watch.add_use(today, 150, today);
        assert!(evaluate(&defaults, &member(10_000), &watch, at(10, 12)).is_empty(), "3 × 50 is not above 150");
        watch.add_use(today, 1, today);
        assert_eq!(rules(&evaluate(&defaults, &member(10_000), &watch, at(10, 12))), ["usage_spike"]);
        // Under the floor, however steep.
        let mut quiet = Watch::default();
        quiet.add_use(today, 100, today);
        assert!(evaluate(&defaults, &member(10_000), &quiet, at(10, 12)).is_empty());
        // The next local day starts afresh.
        assert!(evaluate(&defaults, &member(10_000), &watch, at(11, 12)).is_empty());
        assert_eq!(next_due(&defaults, &member(10_000), &watch, at(10, 12)), Some(at(11, 0)));
    }

    #[test]
    fn episodes_open_once_close_once_and_count_up() {
        let defaults = RuleSet::default();
        let mut watch = Watch::default();
        let low = member(10);
        let raised = watch.step(evaluate(&defaults, &low, &watch, at(10, 0)), &low, at(10, 0));
        assert!(matches!(&raised[..], [Transition::Raise { notice }] if notice.alert_id() == "low_balance:1"));
        assert!(watch.step(evaluate(&defaults, &low, &watch, at(10, 1)), &low, at(10, 1)).is_empty());
        let fine = member(500);
        let resolved = watch.step(evaluate(&defaults, &fine, &watch, at(10, 2)), &fine, at(10, 2));
        assert!(matches!(&resolved[..], [Transition::Resolve { notice }]
            if notice.alert_id() == "low_balance:1" && notice.figures["available"] == 500));
        let again = watch.step(evaluate(&defaults, &low, &watch, at(10, 3)), &low, at(10, 3));
        assert!(matches!(&again[..], [Transition::Raise { notice }] if notice.alert_id() == "low_balance:2"));
    }

    #[test]
    fn only_a_urls_host_goes_into_figures() {
        assert_eq!(host_of("https://hooks.example.com/t/SECRET?x=1"), "hooks.example.com");
        assert_eq!(host_of("http://user:pw@127.0.0.1:9000/hook"), "127.0.0.1:9000");
        assert_eq!(host_of("hooks.example.com"), "hooks.example.com");
    }

    #[test]
    fn credits_expiring_within_the_window_and_when_it_comes_due() {
        let defaults = RuleSet::default();
        let mut state = member(500);
        state.grants.get_mut("g1").unwrap().expires_at = Some(at(20, 0));
        let watch = Watch::default();
        assert!(evaluate(&defaults, &state, &watch, at(12, 23)).is_empty());
        assert_eq!(next_due(&defaults, &state, &watch, at(12, 23)), Some(at(13, 0)));
        let found = evaluate(&defaults, &state, &watch, at(13, 0));
        assert_eq!(rules(&found), ["credits_expiring"]);
        assert_eq!(found[0].subject.as_deref(), Some("g1"));
        assert_eq!(next_due(&defaults, &state, &watch, at(13, 0)), Some(at(20, 0)));
        assert!(evaluate(&defaults, &state, &watch, at(20, 0)).is_empty());
    }
}
