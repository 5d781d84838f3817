//! How values are stored in read-model tables, and read back.
//!
//! Instants are text in the event store's own format (UTC, microseconds,
//! `2026-03-01T09:00:00.000000Z`), which sorts as time does; days are
//! `YYYY-MM-DD`; credits and money are integers.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Timelike, Utc};
use rusqlite::Row;
use rusqlite::types::Type;
use tally_ledger::store::{RECORDED_AT_FORMAT, format_recorded_at};

use crate::error::ProjectionError;

pub(crate) const DAY_FORMAT: &str = "%Y-%m-%d";

/// The stored text of an instant: exactly [`format_recorded_at`], written
/// digit by digit for the years 0–9999 (chrono's formatter interprets its
/// format string on every call, and projections format several instants
/// per event); anything else goes through `format_recorded_at` itself.
pub(crate) fn instant_text(instant: DateTime<Utc>) -> String {
    let year = instant.year();
    let nanosecond = instant.nanosecond();
    if !(0..=9_999).contains(&year) || nanosecond >= 1_000_000_000 {
        return format_recorded_at(instant);
    }
    let mut text = String::with_capacity(27);
    push_digits(&mut text, year as u32, 4);
    text.push('-');
    push_digits(&mut text, instant.month(), 2);
    text.push('-');
    push_digits(&mut text, instant.day(), 2);
    text.push('T');
    push_digits(&mut text, instant.hour(), 2);
    text.push(':');
    push_digits(&mut text, instant.minute(), 2);
    text.push(':');
    push_digits(&mut text, instant.second(), 2);
    text.push('.');
    push_digits(&mut text, nanosecond / 1_000, 6);
    text.push('Z');
    text
}

/// Appends the `width` lowest decimal digits of `value`, zero-padded.
fn push_digits(text: &mut String, value: u32, width: u32) {
    let mut divisor = 10u32.pow(width - 1);
    while divisor > 0 {
        text.push(char::from(b'0' + ((value / divisor) % 10) as u8));
        divisor /= 10;
    }
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
    fn instant_text_is_the_stored_format() {
        let mut instants = vec![
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9_999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 1, 12, 0, 0).unwrap(),
            DateTime::from_timestamp(1_700_000_000, 999_999_999).unwrap(),
            DateTime::from_timestamp(1_700_000_000, 1_000).unwrap(),
        ];
        // A spread of instants with every sub-second digit in play.
        let mut seconds: i64 = -62_000_000_000;
        let mut nanoseconds: u32 = 1;
        while seconds < 253_000_000_000 {
            instants.push(DateTime::from_timestamp(seconds, nanoseconds).unwrap());
            seconds += 987_654_321;
            nanoseconds = (nanoseconds.wrapping_mul(7_919) + 104_729) % 1_000_000_000;
        }
        for instant in instants {
            assert_eq!(instant_text(instant), format_recorded_at(instant), "{instant:?}");
        }
    }

    #[test]
    fn instants_round_trip_and_sort_as_text() {
        let earlier = Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap();
        let later = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        assert_eq!(parse_instant(&instant_text(earlier)), Some(earlier));
        assert!(instant_text(earlier) < instant_text(later));
    }
}
