//! Cost analysis and projection (DESIGN.md §11): a pure function of
//! figures the read models hold, in integers.
//!
//! # The method
//!
//! - **Burn rate**: the credits used (usage deducted and reservations
//!   settled) over the 7 (and 30) whole local days before today, divided by
//!   7 (30), rounded down. Today's own use is not in it: a day is counted
//!   once it is over.
//! - **From now on** use goes on at the 7-day rate, pro rata by the second
//!   (a rate of 100 a day is 50 over the next 12 hours).
//! - **Which credits pay**: grants that expire pay first, the soonest
//!   expiring first (as burn order mostly does: allocations and rollovers
//!   before purchases); a grant's rest lapses at its expiry; credits that
//!   do not expire pay last. Future grants (the next period's allocation,
//!   purchases to come) are not counted.
//! - **Exhaustion date**: the member's local day on which, at that rate,
//!   the available credits no longer cover the use; `null` when nothing is
//!   used, or when they last beyond a year.
//! - **Period** (with a subscription): use so far is the credits used on the
//!   local days from the period's start to today; projected use adds the
//!   rate over the time left. What the credits cannot cover becomes debt
//!   (overage) up to the plan's overage limit, the rest would be refused;
//!   without overage it is all refused. The next invoice, issued at the
//!   period's end, is its draft so far (the fee, prorations, purchases and
//!   the overage already incurred) plus the projected new overage at the
//!   plan's unit price.
//! - **Money value** of the last 30 days' credits: at the plan's overage
//!   unit price when it has one, else at the member's average purchase
//!   price (what its priced purchases cost per credit), else none; the
//!   answer says which.

use std::collections::BTreeMap;

use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Serialize;

/// How far ahead an exhaustion date is looked for.
pub const HORIZON_DAYS: u64 = 366;
const DAY_S: i64 = 86_400;

/// The method, as the answer states it.
pub const METHOD: &str = "Burn rate: credits used over the 7 (30) whole local days before today, divided by 7 (30), \
rounded down. Projection: use goes on at the 7-day rate from now, pro rata by the second; grants that expire pay first, \
soonest first, and lapse at their expiry; credits that do not expire pay last; future grants are not counted. \
Exhaustion date: the first local day the available credits no longer cover that use (null: no use, or not within a \
year). Period: use so far plus the rate over the time left; what credits cannot cover becomes overage up to the \
plan's limit (the rest would be refused). Next invoice: its draft so far plus the projected new overage at the plan's \
unit price, issued at the period's end. Money value: at the plan's overage unit price, else the member's average \
purchase price, else none.";

/// The subscription's open period and its draft invoice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodInputs {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// The fee line of the draft (the plan's price at period start).
    pub fee: i64,
    /// The draft's other lines: prorations of an upgrade, priced purchases.
    pub other_lines: i64,
    /// The draft's overage lines so far (the debt below, priced).
    pub overage_amount: i64,
    pub overage_allowed: bool,
    /// The most debt the plan allows, in credits.
    pub overage_limit: i64,
    /// The price of one credit of overage, in minor units.
    pub unit_price: i64,
    pub currency: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CostInputs {
    pub now: DateTime<Utc>,
    pub time_zone: Tz,
    /// Credits used per local day.
    pub used_by_day: BTreeMap<NaiveDate, i64>,
    pub available: i64,
    /// Unbilled overage, in credits.
    pub debt: i64,
    /// Spendable credits of grants that expire, with their expiry.
    pub expiring: Vec<(DateTime<Utc>, i64)>,
    pub period: Option<PeriodInputs>,
    /// Priced purchases: credits bought and what they cost in all.
    pub purchased_credits: i64,
    pub purchase_price: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BurnRate {
    pub d7: i64,
    pub d30: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Value30 {
    pub credits_used: i64,
    /// In minor units; `None` without a basis.
    pub value: Option<i64>,
    /// `overage_unit_price`, `average_purchase_price` or `none`.
    pub basis: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InvoiceEstimate {
    pub currency: String,
    pub fee: i64,
    pub other_lines: i64,
    pub overage_credits: i64,
    pub overage_amount: i64,
    pub total: i64,
    /// When it is issued: the period's end.
    pub issued_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CostProjection {
    pub burn_rate_per_day: BurnRate,
    pub exhaustion_date: Option<NaiveDate>,
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
    pub period_use_so_far: Option<i64>,
    pub projected_period_use: Option<i64>,
    /// Debt at the period's end, in credits (what is already owed included).
    pub projected_overage: Option<i64>,
    /// Use the credits and the overage limit cannot cover before the period ends.
    pub projected_refused: Option<i64>,
    pub next_invoice_estimate: Option<InvoiceEstimate>,
    pub last_30_days: Value30,
    pub method: &'static str,
}

fn local_day(instant: DateTime<Utc>, zone: Tz) -> NaiveDate {
    instant.with_timezone(&zone).date_naive()
}

/// The first instant of a local day (the first that exists, around a DST gap).
fn day_start(day: NaiveDate, zone: Tz) -> DateTime<Utc> {
    (0..=180)
        .find_map(|minutes| {
            let time = day.and_hms_opt(0, 0, 0)? + chrono::Duration::minutes(minutes);
            zone.from_local_datetime(&time).earliest()
        })
        .map_or_else(
            || Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight")),
            |at| at.with_timezone(&Utc),
        )
}

fn trailing(used: &BTreeMap<NaiveDate, i64>, today: NaiveDate, days: u64) -> i64 {
    used.range(today - Days::new(days)..today).map(|(_, credits)| *credits).sum()
}

/// What a simulation of use from `now` until `until` found.
struct Simulation {
    /// Use the credits could not cover.
    shortfall: i64,
    /// The local day the first shortfall fell on.
    first_short_day: Option<NaiveDate>,
}

/// Use at `rate` a day from `now` to `until`, day by day, paid by the
/// soonest-expiring credits first.
fn simulate(inputs: &CostInputs, rate: i64, until: DateTime<Utc>) -> Simulation {
    let zone = inputs.time_zone;
    let expiring_total: i64 = inputs.expiring.iter().map(|(_, credits)| *credits).sum();
    let mut lasting = (inputs.available - expiring_total).max(0);
    let mut pools: Vec<(DateTime<Utc>, i64)> =
        inputs.expiring.iter().filter(|(at, _)| *at > inputs.now).copied().collect();
    pools.sort();
    let mut simulation = Simulation { shortfall: 0, first_short_day: None };
    let mut day = local_day(inputs.now, zone);
    let mut from = inputs.now;
    while from < until {
        let next = day_start(day + Days::new(1), zone).min(until);
        let seconds = (next - from).num_seconds().max(0);
        let mut need = i64::try_from(i128::from(rate) * i128::from(seconds) / i128::from(DAY_S)).unwrap_or(i64::MAX);
        // Pools that lapse before this stretch ends pay only for use before
        // their expiry (their share pro rata), then lapse.
        for (expires_at, credits) in pools.iter_mut() {
            if need == 0 {
                break;
            }
            let usable_seconds = (*expires_at - from).num_seconds().clamp(0, seconds);
            let reachable = if usable_seconds == seconds {
                need
            } else {
                i64::try_from(i128::from(rate) * i128::from(usable_seconds) / i128::from(DAY_S)).unwrap_or(i64::MAX)
            };
            let take = (*credits).min(need).min(reachable);
            *credits -= take;
            need -= take;
        }
        pools.retain(|(expires_at, _)| *expires_at > next);
        let take = lasting.min(need);
        lasting -= take;
        need -= take;
        if need > 0 {
            simulation.shortfall += need;
            simulation.first_short_day.get_or_insert(day);
        }
        from = next;
        day = day + Days::new(1);
    }
    simulation
}

/// The cost analysis and projection of [`METHOD`].
pub fn project(inputs: &CostInputs) -> CostProjection {
    let zone = inputs.time_zone;
    let today = local_day(inputs.now, zone);
    let used_30 = trailing(&inputs.used_by_day, today, 30);
    let rate = BurnRate { d7: trailing(&inputs.used_by_day, today, 7) / 7, d30: used_30 / 30 };
    let exhaustion_date = match rate.d7 {
        0 => None,
        rate => {
            let horizon = day_start(today + Days::new(HORIZON_DAYS), zone);
            simulate(inputs, rate, horizon).first_short_day
        }
    };
    let mut projection = CostProjection {
        burn_rate_per_day: rate,
        exhaustion_date,
        period_start: None,
        period_end: None,
        period_use_so_far: None,
        projected_period_use: None,
        projected_overage: None,
        projected_refused: None,
        next_invoice_estimate: None,
        last_30_days: Value30 { credits_used: used_30, value: None, basis: "none" },
        method: METHOD,
    };
    if let Some(period) = &inputs.period {
        let so_far: i64 =
            inputs.used_by_day.range(local_day(period.start, zone)..=today).map(|(_, credits)| *credits).sum();
        let left_s = (period.end - inputs.now).num_seconds().max(0);
        let rest = i64::try_from(i128::from(rate.d7) * i128::from(left_s) / i128::from(DAY_S)).unwrap_or(i64::MAX);
        let shortfall = simulate(inputs, rate.d7, period.end).shortfall;
        let new_debt = match period.overage_allowed {
            true => shortfall.min((period.overage_limit - inputs.debt).max(0)),
            false => 0,
        };
        let overage_amount = period.overage_amount + new_debt * period.unit_price;
        projection.period_start = Some(period.start);
        projection.period_end = Some(period.end);
        projection.period_use_so_far = Some(so_far);
        projection.projected_period_use = Some(so_far + rest);
        projection.projected_overage = Some(inputs.debt + new_debt);
        projection.projected_refused = Some(shortfall - new_debt);
        projection.next_invoice_estimate = Some(InvoiceEstimate {
            currency: period.currency.clone(),
            fee: period.fee,
            other_lines: period.other_lines,
            overage_credits: inputs.debt + new_debt,
            overage_amount,
            total: period.fee + period.other_lines + overage_amount,
            issued_at: period.end,
        });
        if period.unit_price > 0 {
            projection.last_30_days.value = Some(used_30 * period.unit_price);
            projection.last_30_days.basis = "overage_unit_price";
        }
    }
    if projection.last_30_days.value.is_none() && inputs.purchased_credits > 0 {
        let value = i128::from(used_30) * i128::from(inputs.purchase_price) / i128::from(inputs.purchased_credits);
        projection.last_30_days.value = Some(i64::try_from(value).unwrap_or(i64::MAX));
        projection.last_30_days.basis = "average_purchase_price";
    }
    projection
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(month: u32, day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, month, day, hour, 0, 0).unwrap()
    }

    fn date(month: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, month, day).unwrap()
    }

    /// `per_day` credits on each of the `days` days before `today`.
    fn steady(today: NaiveDate, days: u64, per_day: i64) -> BTreeMap<NaiveDate, i64> {
        (1..=days).map(|back| (today - Days::new(back), per_day)).collect()
    }

    /// A $50 plan, overage up to 2,000 credits at 2¢, in its March period.
    fn march(fee: i64, other_lines: i64, overage_amount: i64) -> PeriodInputs {
        PeriodInputs {
            start: at(3, 1, 0),
            end: at(4, 1, 0),
            fee,
            other_lines,
            overage_amount,
            overage_allowed: true,
            overage_limit: 2_000,
            unit_price: 2,
            currency: "USD".to_owned(),
        }
    }

    fn inputs(now: DateTime<Utc>) -> CostInputs {
        CostInputs {
            now,
            time_zone: Tz::UTC,
            used_by_day: BTreeMap::new(),
            available: 0,
            debt: 0,
            expiring: Vec::new(),
            period: None,
            purchased_credits: 0,
            purchase_price: 0,
        }
    }

    #[test]
    fn a_member_with_no_usage_burns_nothing_and_owes_the_fee() {
        let mut member = inputs(at(3, 22, 0));
        member.available = 10_000;
        member.period = Some(march(5_000, 0, 0));
        let projection = project(&member);
        assert_eq!(projection.burn_rate_per_day, BurnRate { d7: 0, d30: 0 });
        assert_eq!(projection.exhaustion_date, None);
        assert_eq!(projection.projected_period_use, Some(0));
        assert_eq!(projection.projected_overage, Some(0));
        let invoice = projection.next_invoice_estimate.unwrap();
        assert_eq!((invoice.total, invoice.issued_at), (5_000, at(4, 1, 0)));
        assert_eq!(projection.last_30_days, Value30 { credits_used: 0, value: Some(0), basis: "overage_unit_price" });
    }

    #[test]
    fn a_member_in_overage_owes_the_projected_overage_up_to_the_limit() {
        // March 22, midnight: 100 credits a day for the last 30 days, none
        // left, 500 credits of debt already (1,000 on the draft). Ten days
        // to go: 1,000 more credits, all overage (limit 2,000: room 1,500).
        let now = at(3, 22, 0);
        let mut member = inputs(now);
        member.used_by_day = steady(date(3, 22), 30, 100);
        member.debt = 500;
        member.period = Some(march(5_000, 0, 1_000));
        let projection = project(&member);
        assert_eq!(projection.burn_rate_per_day, BurnRate { d7: 100, d30: 100 });
        assert_eq!(projection.exhaustion_date, Some(date(3, 22)), "nothing is left today");
        // March 1–21: 21 days × 100 used so far, 10 days × 100 to come.
        assert_eq!(projection.period_use_so_far, Some(2_100));
        assert_eq!(projection.projected_period_use, Some(3_100));
        assert_eq!(projection.projected_overage, Some(1_500));
        assert_eq!(projection.projected_refused, Some(0));
        let invoice = projection.next_invoice_estimate.unwrap();
        assert_eq!((invoice.overage_amount, invoice.total), (3_000, 8_000));
        assert_eq!(projection.last_30_days.value, Some(6_000));
        // A tighter limit: the rest would be refused.
        member.period.as_mut().unwrap().overage_limit = 800;
        let projection = project(&member);
        assert_eq!((projection.projected_overage, projection.projected_refused), (Some(800), Some(700)));
    }

    #[test]
    fn credits_that_expire_first_run_out_sooner() {
        // 1,000 available, 800 of them expiring in 3 days; 100 a day.
        // Days 0–2 use 300 of the 800; 500 lapse; the lasting 200 cover
        // days 3 and 4; day 5 is short.
        let now = at(3, 10, 0);
        let mut member = inputs(now);
        member.used_by_day = steady(date(3, 10), 7, 100);
        member.available = 1_000;
        member.expiring = vec![(at(3, 13, 0), 800)];
        assert_eq!(project(&member).exhaustion_date, Some(date(3, 15)));
        // Without the expiry, ten days.
        member.expiring.clear();
        assert_eq!(project(&member).exhaustion_date, Some(date(3, 20)));
        // Midday: the rest of today uses 50.
        let mut midday = member.clone();
        midday.now = at(3, 10, 12);
        midday.available = 50;
        assert_eq!(project(&midday).exhaustion_date, Some(date(3, 11)));
    }

    #[test]
    fn a_mid_period_upgrade_is_on_the_next_invoice_with_its_new_price() {
        // Upgraded on March 16: the draft has the old fee (1,000) and the
        // proration (2,000); the new plan's overage is 3¢ a credit.
        let now = at(3, 16, 0);
        let mut member = inputs(now);
        member.used_by_day = steady(date(3, 16), 7, 70);
        member.available = 500;
        let mut period = march(1_000, 2_000, 0);
        period.unit_price = 3;
        member.period = Some(period);
        let projection = project(&member);
        // 16 days × 70 = 1,120 to come; 500 available: 620 of overage.
        assert_eq!(projection.projected_overage, Some(620));
        let invoice = projection.next_invoice_estimate.unwrap();
        assert_eq!(
            (invoice.fee, invoice.other_lines, invoice.overage_amount, invoice.total),
            (1_000, 2_000, 1_860, 4_860)
        );
        assert_eq!(projection.last_30_days.basis, "overage_unit_price");
    }

    #[test]
    fn without_a_plan_the_value_is_at_the_average_purchase_price() {
        let mut member = inputs(at(3, 10, 0));
        member.used_by_day = steady(date(3, 10), 30, 10);
        member.available = 1_000;
        member.purchased_credits = 2_000;
        member.purchase_price = 3_000;
        let projection = project(&member);
        assert_eq!(
            projection.last_30_days,
            Value30 { credits_used: 300, value: Some(450), basis: "average_purchase_price" }
        );
        assert_eq!(projection.projected_overage, None);
        assert_eq!(projection.exhaustion_date, Some(date(6, 18)), "1,000 at 10 a day: 100 days from March 10");
    }
}
