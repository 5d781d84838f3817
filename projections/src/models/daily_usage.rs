//! `daily_usage_stats`: per member × day × metric, in the member's time zone.
//!
//! - A day is a calendar day in the member's IANA time zone (from
//!   `MemberRegistered` and `MemberProfileChanged`, UTC by default), so a
//!   day may last 23 or 25 hours around a DST change. A time zone change
//!   applies to events after it; days already counted are not re-bucketed.
//! - `UsageRecorded` counts under its own `metric`, dated by its
//!   `occurred_at`: quantity, credits, one record.
//! - `QueryExecuted` counts under the metric `query/{integration_id}/{query_id}`
//!   (a `/` never appears in a caller's metric, so the two never mix), dated
//!   by the event's `occurred_at`: one query, an error if it failed, its
//!   duration (total and max), its rows as quantity and its credits.
//! - A reversal does not change usage statistics: the usage happened; its
//!   credits come back in `credit_transactions`.
//! - Within a batch the additions to each row are summed in memory and
//!   written once, at the end of the batch.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tally_ledger::domain::{MemberEvent, QueryStatus};

use crate::error::ProjectionError;
use crate::page::{Cursor, Order, Page, PageRequest};
use crate::projector::{BatchState, ProjectedEvent, Projector, ProjectorTx, TableSpec};
use crate::read::Snapshot;
use crate::registry::ReadModel;
use crate::values::{checked, day_at, day_text};

pub const PROJECTOR_NAME: &str = "daily_usage";
pub const PROJECTOR_VERSION: u32 = 1;

/// The longest date range one query may span, in days (a leap year).
pub const DAILY_USAGE_DAYS_MAX: i64 = 366;

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "daily_usage_stats",
        columns: "member_id TEXT NOT NULL,
            day TEXT NOT NULL,
            metric TEXT NOT NULL,
            quantity INTEGER NOT NULL,
            credits INTEGER NOT NULL,
            records INTEGER NOT NULL,
            query_count INTEGER NOT NULL,
            query_errors INTEGER NOT NULL,
            duration_ms_total INTEGER NOT NULL,
            duration_ms_max INTEGER NOT NULL,
            PRIMARY KEY (member_id, day, metric)",
        key: "member_id, day, metric",
        indexes: &[],
        read_model: "daily_usage_stats",
    },
    TableSpec {
        name: "daily_usage_members",
        columns: "member_id TEXT NOT NULL PRIMARY KEY, time_zone TEXT NOT NULL",
        key: "member_id",
        indexes: &[],
        read_model: "daily_usage_stats",
    },
];

const HANDLES: &[&str] = &["MemberRegistered", "MemberProfileChanged", "UsageRecorded", "QueryExecuted"];

const UPSERT_MEMBER: &str = "INSERT INTO {daily_usage_members} (member_id, time_zone) VALUES (?1, ?2)
    ON CONFLICT (member_id) DO UPDATE SET time_zone = excluded.time_zone";
const SELECT_TIME_ZONE: &str = "SELECT time_zone FROM {daily_usage_members} WHERE member_id = ?1";
/// Adds one batch's sums to a row (`?9` the summed durations, `?10` the
/// longest).
const ADD: &str = "INSERT INTO {daily_usage_stats} (member_id, day, metric, quantity, credits, records, query_count,
    query_errors, duration_ms_total, duration_ms_max) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
    ON CONFLICT (member_id, day, metric) DO UPDATE SET
        quantity = quantity + excluded.quantity,
        credits = credits + excluded.credits,
        records = records + excluded.records,
        query_count = query_count + excluded.query_count,
        query_errors = query_errors + excluded.query_errors,
        duration_ms_total = duration_ms_total + excluded.duration_ms_total,
        duration_ms_max = max(duration_ms_max, excluded.duration_ms_max)";

/// The metric a query execution is counted under.
pub fn query_metric(integration_id: &str, query_id: &str) -> String {
    format!("query/{integration_id}/{query_id}")
}

/// The member's calendar day of an instant.
pub fn local_day(instant: DateTime<Utc>, time_zone: Tz) -> NaiveDate {
    instant.with_timezone(&time_zone).date_naive()
}

pub struct DailyUsageProjector;

/// One event's addition to a row.
struct Addition<'event> {
    metric: &'event str,
    quantity: i64,
    credits: i64,
    records: i64,
    query_count: i64,
    query_errors: i64,
    duration_ms: i64,
}

/// What a batch adds to one row: the sums of its additions, and the
/// longest duration among them.
#[derive(Clone, Copy, Debug, Default)]
struct Sums {
    quantity: i64,
    credits: i64,
    records: i64,
    query_count: i64,
    query_errors: i64,
    duration_ms_total: i64,
    duration_ms_max: i64,
}

/// The daily usage projector's batch state: members' time zones read once
/// per batch, and the batch's additions summed per row, so that each row
/// is written once per batch (addition commutes, and so does `max`).
#[derive(Default)]
pub(crate) struct DailyUsageBatch {
    members: HashMap<String, MemberDays>,
}

/// One member's share of a batch.
struct MemberDays {
    time_zone: Tz,
    /// The time zone's name, when the batch set it.
    time_zone_set: Option<String>,
    /// Sums by day and metric.
    days: BTreeMap<NaiveDate, BTreeMap<String, Sums>>,
}

impl BatchState for DailyUsageBatch {
    fn flush(&mut self, tx: &ProjectorTx<'_>) -> Result<(), ProjectionError> {
        // In key order, so that each member's rows go into the same pages
        // one after the other.
        let mut members: Vec<(&String, &MemberDays)> = self.members.iter().collect();
        members.sort_unstable_by_key(|(member_id, _)| *member_id);
        for (member_id, member) in members {
            if let Some(time_zone) = &member.time_zone_set {
                tx.statement(UPSERT_MEMBER)?.execute(params![member_id, time_zone])?;
            }
            let mut add = tx.statement(ADD)?;
            for (day, metrics) in &member.days {
                let day = day_text(*day);
                for (metric, sums) in metrics {
                    add.execute(params![
                        member_id,
                        day,
                        metric,
                        sums.quantity,
                        sums.credits,
                        sums.records,
                        sums.query_count,
                        sums.query_errors,
                        sums.duration_ms_total,
                        sums.duration_ms_max,
                    ])?;
                }
            }
        }
        Ok(())
    }
}

impl DailyUsageBatch {
    fn set_time_zone(&mut self, member_id: &str, time_zone: &str) {
        let parsed = parse_time_zone(Some(time_zone));
        match self.members.get_mut(member_id) {
            Some(member) => {
                member.time_zone = parsed;
                member.time_zone_set = Some(time_zone.to_owned());
            }
            None => {
                let member =
                    MemberDays { time_zone: parsed, time_zone_set: Some(time_zone.to_owned()), days: BTreeMap::new() };
                self.members.insert(member_id.to_owned(), member);
            }
        }
    }

    fn member(&mut self, tx: &ProjectorTx<'_>, member_id: &str) -> Result<&mut MemberDays, ProjectionError> {
        if !self.members.contains_key(member_id) {
            let name: Option<String> =
                tx.statement(SELECT_TIME_ZONE)?.query_row(params![member_id], |row| row.get(0)).optional()?;
            let member =
                MemberDays { time_zone: parse_time_zone(name.as_deref()), time_zone_set: None, days: BTreeMap::new() };
            self.members.insert(member_id.to_owned(), member);
        }
        Ok(self.members.get_mut(member_id).expect("inserted above"))
    }

    fn add(
        &mut self,
        tx: &ProjectorTx<'_>,
        event: &ProjectedEvent<'_>,
        instant: DateTime<Utc>,
        addition: &Addition<'_>,
    ) -> Result<(), ProjectionError> {
        let member = self.member(tx, event.member_id)?;
        let metrics = member.days.entry(local_day(instant, member.time_zone)).or_default();
        let sums = match metrics.get_mut(addition.metric) {
            Some(sums) => sums,
            None => metrics.entry(addition.metric.to_owned()).or_default(),
        };
        let total = |sum: i64, value: i64| checked(sum.checked_add(value), PROJECTOR_NAME, event.position());
        *sums = Sums {
            quantity: total(sums.quantity, addition.quantity)?,
            credits: total(sums.credits, addition.credits)?,
            records: total(sums.records, addition.records)?,
            query_count: total(sums.query_count, addition.query_count)?,
            query_errors: total(sums.query_errors, addition.query_errors)?,
            duration_ms_total: total(sums.duration_ms_total, addition.duration_ms)?,
            duration_ms_max: if sums.records + sums.query_count == 0 {
                addition.duration_ms
            } else {
                sums.duration_ms_max.max(addition.duration_ms)
            },
        };
        Ok(())
    }
}

/// The ledger validated the name with the same chrono-tz; a member whose
/// registration this projector never saw counts in UTC, the default.
fn parse_time_zone(name: Option<&str>) -> Tz {
    name.and_then(|name| name.parse::<Tz>().ok()).unwrap_or(Tz::UTC)
}

impl Projector for DailyUsageProjector {
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
        let mut batch = tx.batch_state::<DailyUsageBatch>();
        match event.event {
            MemberEvent::MemberRegistered { time_zone, .. } | MemberEvent::MemberProfileChanged { time_zone, .. } => {
                batch.set_time_zone(event.member_id, time_zone);
                Ok(())
            }
            MemberEvent::UsageRecorded { metric, quantity, credits, occurred_at, .. } => {
                let addition = Addition {
                    metric,
                    quantity: *quantity,
                    credits: credits.0,
                    records: 1,
                    query_count: 0,
                    query_errors: 0,
                    duration_ms: 0,
                };
                batch.add(tx, event, *occurred_at, &addition)
            }
            MemberEvent::QueryExecuted { execution, credits, .. } => {
                let metric = query_metric(&execution.integration_id, &execution.query_id);
                let addition = Addition {
                    metric: &metric,
                    quantity: execution.rows,
                    credits: credits.0,
                    records: 0,
                    query_count: 1,
                    query_errors: i64::from(execution.status == QueryStatus::Failed),
                    duration_ms: execution.duration_ms,
                };
                batch.add(tx, event, event.occurred_at, &addition)
            }
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

/// One `daily_usage_stats` row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DailyUsage {
    /// A calendar day in the member's time zone.
    pub day: NaiveDate,
    pub metric: String,
    pub quantity: i64,
    pub credits: i64,
    /// Usage records counted.
    pub records: i64,
    pub query_count: i64,
    pub query_errors: i64,
    pub duration_ms_total: i64,
    pub duration_ms_max: i64,
}

pub(crate) fn daily_usage(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    from: NaiveDate,
    to: NaiveDate,
    page: &PageRequest,
) -> Result<Page<DailyUsage>, ProjectionError> {
    let limit = page.checked_limit()?;
    if from > to {
        return Err(ProjectionError::InvalidArgument { field: "from", reason: "must not be after to".to_owned() });
    }
    if (to - from).num_days() + 1 > DAILY_USAGE_DAYS_MAX {
        return Err(ProjectionError::InvalidArgument {
            field: "to",
            reason: format!("a range spans at most {DAILY_USAGE_DAYS_MAX} days"),
        });
    }
    let after = page.after.as_ref().map(Cursor::day_and_metric).transpose()?;
    // Rows strictly after the cursor in the requested order; without one,
    // a bound before (or after) every key of the range.
    let (after_day, after_metric) = match (after, page.order) {
        (Some((day, metric)), _) => (day_text(day), metric.to_owned()),
        (None, Order::OldestFirst) => (String::new(), String::new()),
        (None, Order::NewestFirst) => ("9999-12-31~".to_owned(), String::new()),
    };
    let template = match page.order {
        Order::OldestFirst => {
            "SELECT day, metric, quantity, credits, records, query_count, query_errors, duration_ms_total,
                duration_ms_max FROM {daily_usage_stats}
             WHERE member_id = ?1 AND day >= ?2 AND day <= ?3 AND (day, metric) > (?4, ?5)
             ORDER BY day, metric LIMIT ?6"
        }
        Order::NewestFirst => {
            "SELECT day, metric, quantity, credits, records, query_count, query_errors, duration_ms_total,
                duration_ms_max FROM {daily_usage_stats}
             WHERE member_id = ?1 AND day >= ?2 AND day <= ?3 AND (day, metric) < (?4, ?5)
             ORDER BY day DESC, metric DESC LIMIT ?6"
        }
    };
    let mut statement = snapshot.statement(ReadModel::DailyUsageStats, template)?;
    let rows = statement.query_map(
        params![member_id, day_text(from), day_text(to), after_day, after_metric, (limit + 1) as i64],
        |row| {
            Ok(DailyUsage {
                day: day_at(row, 0)?,
                metric: row.get(1)?,
                quantity: row.get(2)?,
                credits: row.get(3)?,
                records: row.get(4)?,
                query_count: row.get(5)?,
                query_errors: row.get(6)?,
                duration_ms_total: row.get(7)?,
                duration_ms_max: row.get(8)?,
            })
        },
    )?;
    let rows = rows.collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(rows, limit, |usage| Cursor::from_day_and_metric(usage.day, &usage.metric)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn days_follow_the_member_time_zone() {
        let new_york: Tz = "America/New_York".parse().unwrap();
        let late_evening = Utc.with_ymd_and_hms(2026, 3, 9, 3, 59, 0).unwrap();
        assert_eq!(local_day(late_evening, new_york), NaiveDate::from_ymd_opt(2026, 3, 8).unwrap());
        assert_eq!(local_day(late_evening, Tz::UTC), NaiveDate::from_ymd_opt(2026, 3, 9).unwrap());
    }
}
