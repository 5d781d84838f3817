//! The analytics read models (DESIGN.md §11), per member and local day:
//!
//! - `analytics_usage`: credits, quantity and records by dimension
//!   (`metric`, `integration`, `query`) and key. `UsageRecorded` counts under
//!   its metric, its integration and its `integration/query` (or `-` when it
//!   names none); `QueryExecuted` under the metric `query/{integration}/{query}`
//!   (as `daily_usage_stats` does), its integration and `integration/query`,
//!   its rows as quantity.
//! - `analytics_days`: credits used (usage deducted and reservations
//!   settled: the ledger's `used`), granted (rollover transfers excluded),
//!   expired, and debt incurred, per day.
//! - `analytics_members`: the member's time zone, what it bought
//!   (credits and price of priced purchases, for an average purchase
//!   price) and how many payments failed.
//!
//! Days are the member's calendar days, dated by each event's
//! `occurred_at`. A batch's additions are summed in memory and each row
//! written once at the end of the batch.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tally_ledger::domain::{GrantSource, MemberEvent};

use crate::error::ProjectionError;
use crate::projector::{BatchState, ProjectedEvent, Projector, ProjectorTx, TableSpec};
use crate::read::Snapshot;
use crate::registry::ReadModel;
use crate::values::{checked, day_at, day_text};

pub const PROJECTOR_NAME: &str = "analytics";
pub const PROJECTOR_VERSION: u32 = 1;

/// The dimensions usage is grouped by.
pub const DIMENSIONS: [&str; 3] = ["metric", "integration", "query"];
/// The key of usage that names no integration (or no query).
pub const NONE_KEY: &str = "-";

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "analytics_usage",
        columns: "member_id TEXT NOT NULL,
            day TEXT NOT NULL,
            dimension TEXT NOT NULL,
            key TEXT NOT NULL,
            credits INTEGER NOT NULL,
            quantity INTEGER NOT NULL,
            records INTEGER NOT NULL,
            PRIMARY KEY (member_id, dimension, day, key)",
        key: "member_id, dimension, day, key",
        indexes: &[],
        read_model: "analytics",
    },
    TableSpec {
        name: "analytics_days",
        columns: "member_id TEXT NOT NULL,
            day TEXT NOT NULL,
            used INTEGER NOT NULL,
            granted INTEGER NOT NULL,
            expired INTEGER NOT NULL,
            debt_incurred INTEGER NOT NULL,
            PRIMARY KEY (member_id, day)",
        key: "member_id, day",
        indexes: &[],
        read_model: "analytics",
    },
    TableSpec {
        name: "analytics_members",
        columns: "member_id TEXT NOT NULL PRIMARY KEY,
            time_zone TEXT NOT NULL,
            purchased_credits INTEGER NOT NULL,
            purchase_price INTEGER NOT NULL,
            payment_failures INTEGER NOT NULL",
        key: "member_id",
        indexes: &[],
        read_model: "analytics",
    },
];

const HANDLES: &[&str] = &[
    "MemberRegistered",
    "MemberProfileChanged",
    "UsageRecorded",
    "QueryExecuted",
    "CreditsDeducted",
    "ReservationSettled",
    "CreditsGranted",
    "CreditsExpired",
    "PaymentFailed",
    "StripeRefundRecorded",
];

const SELECT_MEMBER: &str = "SELECT time_zone, purchased_credits, purchase_price, payment_failures
    FROM {analytics_members} WHERE member_id = ?1";
const UPSERT_MEMBER: &str = "INSERT INTO {analytics_members} (member_id, time_zone, purchased_credits, purchase_price,
    payment_failures) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (member_id) DO UPDATE SET
    time_zone = excluded.time_zone, purchased_credits = excluded.purchased_credits,
    purchase_price = excluded.purchase_price, payment_failures = excluded.payment_failures";
const ADD_USAGE: &str = "INSERT INTO {analytics_usage} (member_id, day, dimension, key, credits, quantity, records)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (member_id, dimension, day, key) DO UPDATE SET
    credits = credits + excluded.credits, quantity = quantity + excluded.quantity,
    records = records + excluded.records";
const ADD_DAY: &str = "INSERT INTO {analytics_days} (member_id, day, used, granted, expired, debt_incurred)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (member_id, day) DO UPDATE SET
    used = used + excluded.used, granted = granted + excluded.granted, expired = expired + excluded.expired,
    debt_incurred = debt_incurred + excluded.debt_incurred";

#[derive(Clone, Copy, Debug, Default)]
struct UsageSums {
    credits: i64,
    quantity: i64,
    records: i64,
}

#[derive(Clone, Copy, Debug, Default)]
struct DaySums {
    used: i64,
    granted: i64,
    expired: i64,
    debt_incurred: i64,
}

/// A member's share of a batch.
struct MemberBatch {
    time_zone: Tz,
    time_zone_name: String,
    purchased_credits: i64,
    purchase_price: i64,
    payment_failures: i64,
    /// Whether the member's row changed.
    dirty: bool,
    usage: BTreeMap<(&'static str, NaiveDate, String), UsageSums>,
    days: BTreeMap<NaiveDate, DaySums>,
}

#[derive(Default)]
pub(crate) struct AnalyticsBatch {
    members: HashMap<String, MemberBatch>,
}

impl BatchState for AnalyticsBatch {
    fn flush(&mut self, tx: &ProjectorTx<'_>) -> Result<(), ProjectionError> {
        let mut members: Vec<(&String, &MemberBatch)> = self.members.iter().collect();
        members.sort_unstable_by_key(|(member_id, _)| *member_id);
        for (member_id, member) in members {
            if member.dirty {
                tx.statement(UPSERT_MEMBER)?.execute(params![
                    member_id,
                    member.time_zone_name,
                    member.purchased_credits,
                    member.purchase_price,
                    member.payment_failures
                ])?;
            }
            let mut add = tx.statement(ADD_USAGE)?;
            for ((dimension, day, key), sums) in &member.usage {
                add.execute(params![
                    member_id,
                    day_text(*day),
                    dimension,
                    key,
                    sums.credits,
                    sums.quantity,
                    sums.records
                ])?;
            }
            let mut add = tx.statement(ADD_DAY)?;
            for (day, sums) in &member.days {
                add.execute(params![
                    member_id,
                    day_text(*day),
                    sums.used,
                    sums.granted,
                    sums.expired,
                    sums.debt_incurred
                ])?;
            }
        }
        Ok(())
    }
}

impl AnalyticsBatch {
    fn member(&mut self, tx: &ProjectorTx<'_>, member_id: &str) -> Result<&mut MemberBatch, ProjectionError> {
        if !self.members.contains_key(member_id) {
            let row: Option<(String, i64, i64, i64)> = tx
                .statement(SELECT_MEMBER)?
                .query_row(params![member_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))
                .optional()?;
            let (name, purchased_credits, purchase_price, payment_failures) =
                row.unwrap_or_else(|| ("UTC".to_owned(), 0, 0, 0));
            self.members.insert(
                member_id.to_owned(),
                MemberBatch {
                    time_zone: name.parse().unwrap_or(Tz::UTC),
                    time_zone_name: name,
                    purchased_credits,
                    purchase_price,
                    payment_failures,
                    dirty: false,
                    usage: BTreeMap::new(),
                    days: BTreeMap::new(),
                },
            );
        }
        Ok(self.members.get_mut(member_id).expect("inserted above"))
    }
}

impl MemberBatch {
    fn day(&self, instant: DateTime<Utc>) -> NaiveDate {
        instant.with_timezone(&self.time_zone).date_naive()
    }

    fn add_usage(
        &mut self,
        day: NaiveDate,
        keys: [String; 3],
        credits: i64,
        quantity: i64,
        position: u64,
    ) -> Result<(), ProjectionError> {
        for (dimension, key) in DIMENSIONS.into_iter().zip(keys) {
            let sums = self.usage.entry((dimension, day, key)).or_default();
            sums.credits = checked(sums.credits.checked_add(credits), PROJECTOR_NAME, position)?;
            sums.quantity = checked(sums.quantity.checked_add(quantity), PROJECTOR_NAME, position)?;
            sums.records += 1;
        }
        Ok(())
    }

    fn add_day(
        &mut self,
        day: NaiveDate,
        position: u64,
        edit: impl FnOnce(&mut DaySums) -> Option<()>,
    ) -> Result<(), ProjectionError> {
        let sums = self.days.entry(day).or_default();
        edit(sums).ok_or(ProjectionError::Inconsistent {
            projector: PROJECTOR_NAME,
            position,
            reason: "a daily sum overflowed".to_owned(),
        })
    }
}

pub struct AnalyticsProjector;

impl Projector for AnalyticsProjector {
    fn name(&self) -> &'static str {
        PROJECTOR_NAME
    }

    fn version(&self) -> u32 {
        PROJECTOR_VERSION
    }

    fn handles(&self) -> &'static [&'static str] {
        HANDLES
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    fn apply(&self, tx: &ProjectorTx<'_>, event: &ProjectedEvent<'_>) -> Result<(), ProjectionError> {
        let mut batch = tx.batch_state::<AnalyticsBatch>();
        let member = batch.member(tx, event.member_id)?;
        let position = event.position();
        let day = member.day(event.occurred_at);
        match event.event {
            MemberEvent::MemberRegistered { time_zone, .. } | MemberEvent::MemberProfileChanged { time_zone, .. } => {
                member.time_zone = time_zone.parse().unwrap_or(Tz::UTC);
                member.time_zone_name = time_zone.clone();
                member.dirty = true;
            }
            MemberEvent::UsageRecorded { metric, quantity, credits, occurred_at, integration_id, query_id, .. } => {
                let day = member.day(*occurred_at);
                let integration = integration_id.clone().unwrap_or_else(|| NONE_KEY.to_owned());
                let query = match (integration_id, query_id) {
                    (Some(integration), Some(query)) => format!("{integration}/{query}"),
                    (None, Some(query)) => format!("{NONE_KEY}/{query}"),
                    _ => NONE_KEY.to_owned(),
                };
                member.add_usage(day, [metric.clone(), integration, query], credits.0, *quantity, position)?;
            }
            MemberEvent::QueryExecuted { execution, credits, .. } => {
                let keys = [
                    super::daily_usage::query_metric(&execution.integration_id, &execution.query_id),
                    execution.integration_id.clone(),
                    format!("{}/{}", execution.integration_id, execution.query_id),
                ];
                member.add_usage(day, keys, credits.0, execution.rows, position)?;
            }
            MemberEvent::CreditsDeducted { amount, debt, .. } => {
                member.add_day(day, position, |sums| {
                    sums.used = sums.used.checked_add(amount.0)?;
                    sums.debt_incurred = sums.debt_incurred.checked_add(debt.0)?;
                    Some(())
                })?;
            }
            MemberEvent::ReservationSettled { charged, .. } => {
                member.add_day(day, position, |sums| {
                    sums.used = sums.used.checked_add(charged.0)?;
                    Some(())
                })?;
            }
            MemberEvent::CreditsGranted { terms, transferred_from, .. } => {
                if transferred_from.is_empty() {
                    member.add_day(day, position, |sums| {
                        sums.granted = sums.granted.checked_add(terms.amount.0)?;
                        Some(())
                    })?;
                }
                if terms.source == GrantSource::Purchase
                    && let Some(price) = terms.price.filter(|price| price.0 > 0)
                {
                    member.purchased_credits =
                        checked(member.purchased_credits.checked_add(terms.amount.0), PROJECTOR_NAME, position)?;
                    member.purchase_price =
                        checked(member.purchase_price.checked_add(price.0), PROJECTOR_NAME, position)?;
                    member.dirty = true;
                }
            }
            MemberEvent::CreditsExpired { amount, .. } => {
                member.add_day(day, position, |sums| {
                    sums.expired = sums.expired.checked_add(amount.0)?;
                    Some(())
                })?;
            }
            MemberEvent::StripeRefundRecorded { debt, .. } if debt.is_positive() => {
                member.add_day(day, position, |sums| {
                    sums.debt_incurred = sums.debt_incurred.checked_add(debt.0)?;
                    Some(())
                })?;
            }
            MemberEvent::PaymentFailed { .. } => {
                member.payment_failures += 1;
                member.dirty = true;
            }
            _ => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

/// Usage of one key on one day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub day: NaiveDate,
    pub key: String,
    pub credits: i64,
    pub quantity: i64,
    pub records: i64,
}

/// One member-day of the credit flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DayRow {
    pub day: NaiveDate,
    pub used: i64,
    pub granted: i64,
    pub expired: i64,
    pub debt_incurred: i64,
}

/// What the analytics know of a member beyond its days.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberAnalytics {
    pub time_zone: String,
    pub purchased_credits: i64,
    /// What those purchases cost, in minor units of the member's currency.
    pub purchase_price: i64,
    pub payment_failures: i64,
}

/// Every member's totals, for operators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AnalyticsTotals {
    pub members: u64,
    pub credits_granted: i64,
    pub credits_used: i64,
    pub credits_expired: i64,
    pub payment_failures: i64,
}

fn check_dimension(dimension: &str) -> Result<(), ProjectionError> {
    if DIMENSIONS.contains(&dimension) {
        Ok(())
    } else {
        Err(ProjectionError::InvalidArgument {
            field: "group_by",
            reason: "must be metric, integration or query".into(),
        })
    }
}

/// A member's usage by `dimension` over `[from, to]`, by day then key.
pub(crate) fn usage(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    dimension: &str,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<UsageRow>, ProjectionError> {
    check_dimension(dimension)?;
    let mut statement = snapshot.statement(
        ReadModel::Analytics,
        "SELECT day, key, credits, quantity, records FROM {analytics_usage}
         WHERE member_id = ?1 AND dimension = ?2 AND day >= ?3 AND day <= ?4 ORDER BY day, key",
    )?;
    let rows = statement.query_map(params![member_id, dimension, day_text(from), day_text(to)], |row| {
        Ok(UsageRow {
            day: day_at(row, 0)?,
            key: row.get(1)?,
            credits: row.get(2)?,
            quantity: row.get(3)?,
            records: row.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A member's usage by `dimension` over `[from, to]` summed per key, the
/// most credits first.
pub(crate) fn breakdown(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    dimension: &str,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<(String, i64, i64, i64)>, ProjectionError> {
    check_dimension(dimension)?;
    let mut statement = snapshot.statement(
        ReadModel::Analytics,
        "SELECT key, sum(credits), sum(quantity), sum(records) FROM {analytics_usage}
         WHERE member_id = ?1 AND dimension = ?2 AND day >= ?3 AND day <= ?4
         GROUP BY key ORDER BY sum(credits) DESC, key",
    )?;
    let rows = statement.query_map(params![member_id, dimension, day_text(from), day_text(to)], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A member's days over `[from, to]`; days without a row are absent.
pub(crate) fn days(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<DayRow>, ProjectionError> {
    let mut statement = snapshot.statement(
        ReadModel::Analytics,
        "SELECT day, used, granted, expired, debt_incurred FROM {analytics_days}
         WHERE member_id = ?1 AND day >= ?2 AND day <= ?3 ORDER BY day",
    )?;
    let rows = statement.query_map(params![member_id, day_text(from), day_text(to)], |row| {
        Ok(DayRow {
            day: day_at(row, 0)?,
            used: row.get(1)?,
            granted: row.get(2)?,
            expired: row.get(3)?,
            debt_incurred: row.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(crate) fn member(snapshot: &Snapshot<'_>, member_id: &str) -> Result<Option<MemberAnalytics>, ProjectionError> {
    let mut statement = snapshot.statement(
        ReadModel::Analytics,
        "SELECT time_zone, purchased_credits, purchase_price, payment_failures FROM {analytics_members}
         WHERE member_id = ?1",
    )?;
    Ok(statement
        .query_row(params![member_id], |row| {
            Ok(MemberAnalytics {
                time_zone: row.get(0)?,
                purchased_credits: row.get(1)?,
                purchase_price: row.get(2)?,
                payment_failures: row.get(3)?,
            })
        })
        .optional()?)
}

pub(crate) fn totals(snapshot: &Snapshot<'_>) -> Result<AnalyticsTotals, ProjectionError> {
    let mut members = snapshot.statement(
        ReadModel::Analytics,
        "SELECT count(*), coalesce(sum(payment_failures), 0) FROM {analytics_members}",
    )?;
    let (count, payment_failures): (i64, i64) = members.query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let mut days = snapshot.statement(
        ReadModel::Analytics,
        "SELECT coalesce(sum(granted), 0), coalesce(sum(used), 0), coalesce(sum(expired), 0) FROM {analytics_days}",
    )?;
    let (credits_granted, credits_used, credits_expired) =
        days.query_row([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    Ok(AnalyticsTotals { members: count as u64, credits_granted, credits_used, credits_expired, payment_failures })
}
