//! How values are stored in read-model tables, and read back.
//!
//! Instants are text in the event store's own format (UTC, microseconds,
//! `2026-03-01T09:00:00.000000Z`), which sorts as time does; days are
//! `YYYY-MM-DD`; credits and money are integers.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use rusqlite::Row;
use rusqlite::types::Type;
use tally_ledger::store::{RECORDED_AT_FORMAT, format_recorded_at};

use crate::error::ProjectionError;

pub(crate) const DAY_FORMAT: &str = "%Y-%m-%d";

pub(crate) fn instant_text(instant: DateTime<Utc>) -> String {
    format_recorded_at(instant)
}

pub(crate) fn day_text(day: NaiveDate) -> String {
    day.format(DAY_FORMAT).to_string()
}

fn conversion_error(index: usize, reason: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, Type::Text, reason.into())
}

pub(crate) fn instant_at(row: &Row<'_>, index: usize) -> rusqlite::Result<DateTime<Utc>> {
    let text: String = row.get(index)?;
    parse_instant(&text).ok_or_else(|| conversion_error(index, format!("{text:?} is not a stored instant")))
}

pub(crate) fn optional_instant_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    let text: Option<String> = row.get(index)?;
    text.map(|text| parse_instant(&text).ok_or_else(|| conversion_error(index, format!("{text:?} is not an instant"))))
        .transpose()
}

pub(crate) fn day_at(row: &Row<'_>, index: usize) -> rusqlite::Result<NaiveDate> {
    let text: String = row.get(index)?;
    NaiveDate::parse_from_str(&text, DAY_FORMAT).map_err(|error| conversion_error(index, error.to_string()))
}

pub(crate) fn u64_at(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(index)?;
    u64::try_from(value).map_err(|_| conversion_error(index, format!("{value} is negative")))
}

fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, RECORDED_AT_FORMAT).ok().map(|naive| naive.and_utc())
}

/// Checked arithmetic on stored figures: an overflow means the log and the
/// read model disagree, which stops the batch.
pub(crate) fn checked(value: Option<i64>, projector: &'static str, position: u64) -> Result<i64, ProjectionError> {
    value.ok_or_else(|| ProjectionError::Inconsistent {
        projector,
        position,
        reason: "a figure overflowed 64 bits".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn instants_round_trip_and_sort_as_text() {
        let earlier = Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap();
        let later = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        assert_eq!(parse_instant(&instant_text(earlier)), Some(earlier));
        assert!(instant_text(earlier) < instant_text(later));
    }
}
