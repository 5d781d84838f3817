//! A reference evaluator of the alert rules (DESIGN.md §11) with the
//! installation defaults, written from the design's words over the
//! reference [`Model`](crate::Model), without the reactor's code: it says
//! which episodes a history calls for, for a property test to compare with
//! what the reactor appended.
//!
//! The defaults: `low_balance` below 100 credits or below 3 days of the
//! trailing 7-day daily mean; `usage_spike` above 3× that mean and above
//! 100 credits; `integration_failing` after 3 failed tests in a row until
//! a success; `payment_failed` while an invoice whose payment failed is
//! open; `credits_expiring` for a grant with spendable credits expiring
//! within 7 days; `overage_started` while there is debt.
//!
//! Grants have no ids in the model: a grant's subject is `#k`, the k-th
//! grant made to the member (from 1).

use crate::model::{Model, invoice_id};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use chrono_tz::Tz;
use std::collections::{BTreeMap, BTreeSet};

/// An episode's opening or closing: (member, alert id, `raised` or
/// `resolved`).
pub type Fired = (String, String, &'static str);

#[derive(Clone, Debug, Default)]
struct Member {
    zone: Option<Tz>,
    used: i64,
    daily: BTreeMap<NaiveDate, i64>,
    failed_invoices: BTreeSet<usize>,
    failures_in_a_row: u32,
    failing: bool,
    /// Open episodes: key → episode.
    open: BTreeMap<String, u32>,
    last_episode: BTreeMap<String, u32>,
}

#[derive(Clone, Debug, Default)]
pub struct AlertReference {
    members: BTreeMap<String, Member>,
    fired: Vec<Fired>,
}

impl AlertReference {
    pub fn new() -> AlertReference {
        AlertReference::default()
    }

    pub fn set_zone(&mut self, member_id: &str, zone: Tz) {
        self.members.entry(member_id.to_owned()).or_default().zone = Some(zone);
    }

    /// After the model took a command at `now`: counts its use.
    pub fn observe(&mut self, model: &Model, member_id: &str, now: DateTime<Utc>) {
        let Some(balance) = model.balance(member_id) else { return };
        let member = self.members.entry(member_id.to_owned()).or_default();
        let zone = member.zone.unwrap_or(Tz::UTC);
        let used = balance.used - member.used;
        member.used = balance.used;
        if used != 0 {
            *member.daily.entry(now.with_timezone(&zone).date_naive()).or_default() += used;
        }
    }

    /// A payment of the member's `number`-th invoice failed (the model
    /// accepted it).
    pub fn payment_failed(&mut self, member_id: &str, number: usize) {
        self.members.entry(member_id.to_owned()).or_default().failed_invoices.insert(number);
    }

    /// A test of the member's integration passed or failed.
    pub fn tested(&mut self, member_id: &str, ok: bool) {
        let member = self.members.entry(member_id.to_owned()).or_default();
        member.failures_in_a_row = if ok { 0 } else { member.failures_in_a_row + 1 };
        if ok {
            member.failing = false;
        } else if member.failures_in_a_row >= 3 {
            member.failing = true;
        }
    }

    /// What holds for the member at `now`: key → the key itself, for rules
    /// with subjects `rule:subject`.
    fn conditions(&self, model: &Model, member_id: &str, now: DateTime<Utc>) -> BTreeSet<String> {
        let mut holds = BTreeSet::new();
        let (Some(balance), Some(member)) = (model.balance(member_id), self.members.get(member_id)) else {
            return holds;
        };
        let zone = member.zone.unwrap_or(Tz::UTC);
        let today = now.with_timezone(&zone).date_naive();
        let today_used = member.daily.get(&today).copied().unwrap_or(0);
        let week: i64 =
            (1..=7).map(|back| member.daily.get(&(today - Duration::days(back))).copied().unwrap_or(0)).sum();
        let mean = week / 7;
        if balance.granted > 0 && (balance.available < 100 || (mean > 0 && balance.available < 3 * mean)) {
            holds.insert("low_balance".to_owned());
        }
        // today > 3 × week / 7, in integers.
        if today_used > 100 && today_used * 7 > 3 * week {
            holds.insert("usage_spike".to_owned());
        }
        if member.failing {
            holds.insert("integration_failing:crm".to_owned());
        }
        let invoices = model.invoices(member_id);
        for number in &member.failed_invoices {
            if invoices.get(number - 1).is_some_and(|invoice| invoice.status == "open") {
                holds.insert(format!("payment_failed:{}", invoice_id(member_id, *number)));
            }
        }
        for (index, grant) in model.grants(member_id).iter().enumerate() {
            let spendable = grant.remaining - grant.held;
            if let Some(expires_at) = grant.expires_at
                && !grant.expired
                && spendable > 0
                && expires_at > now
                && expires_at <= now + Duration::days(7)
            {
                holds.insert(format!("credits_expiring:#{}", index + 1));
            }
        }
        if balance.debt > 0 {
            holds.insert("overage_started".to_owned());
        }
        holds
    }

    /// Evaluates the member at `now`: episodes open for conditions that
    /// began to hold and close for those that stopped.
    pub fn evaluate(&mut self, model: &Model, member_id: &str, now: DateTime<Utc>) {
        let holds = self.conditions(model, member_id, now);
        let member = self.members.entry(member_id.to_owned()).or_default();
        let ended: Vec<String> = member.open.keys().filter(|key| !holds.contains(*key)).cloned().collect();
        for key in ended {
            let episode = member.open.remove(&key).expect("open");
            self.fired.push((member_id.to_owned(), format!("{key}:{episode}"), "resolved"));
        }
        for key in holds {
            if member.open.contains_key(&key) {
                continue;
            }
            let episode = member.last_episode.get(&key).copied().unwrap_or(0) + 1;
            member.last_episode.insert(key.clone(), episode);
            member.open.insert(key.clone(), episode);
            self.fired.push((member_id.to_owned(), format!("{key}:{episode}"), "raised"));
        }
    }

    /// Every opening and closing so far, in order.
    pub fn fired(&self) -> &[Fired] {
        &self.fired
    }
}
