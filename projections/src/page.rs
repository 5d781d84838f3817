//! Cursor pagination shared by the list queries.
//!
//! A cursor names the last row of a page by its key (a per-member sequence
//! number, or a day and a metric), never by an offset, so pages stay
//! stable while rows are appended: the next page starts strictly after the
//! cursor in the requested order. Cursors are opaque to callers.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::error::ProjectionError;
use crate::values::{DAY_FORMAT, day_text};

/// Most rows one page may hold.
pub const PAGE_SIZE_MAX: usize = 1_000;
/// The page size callers should use when the client names none.
pub const PAGE_SIZE_DEFAULT: usize = 100;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Chronological: new rows appear on later pages.
    #[default]
    OldestFirst,
    NewestFirst,
}

/// An opaque position in a list, from [`Page::next_cursor`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(String);

impl Cursor {
    /// Wraps a cursor received from a client; it is checked when used.
    pub fn new(text: impl Into<String>) -> Cursor {
        Cursor(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn from_sequence(sequence: u64) -> Cursor {
        Cursor(sequence.to_string())
    }

    pub(crate) fn sequence(&self) -> Result<u64, ProjectionError> {
        self.0
            .parse::<u64>()
            .ok()
            .filter(|sequence| *sequence > 0 && *sequence <= i64::MAX as u64)
            .ok_or_else(invalid_cursor)
    }

    pub(crate) fn from_day_and_metric(day: NaiveDate, metric: &str) -> Cursor {
        Cursor(format!("{}/{metric}", day_text(day)))
    }

    pub(crate) fn day_and_metric(&self) -> Result<(NaiveDate, &str), ProjectionError> {
        let (day, rest) = self.0.split_at_checked(10).ok_or_else(invalid_cursor)?;
        let metric = rest.strip_prefix('/').filter(|metric| !metric.is_empty()).ok_or_else(invalid_cursor)?;
        let day = NaiveDate::parse_from_str(day, DAY_FORMAT).map_err(|_| invalid_cursor())?;
        Ok((day, metric))
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

fn invalid_cursor() -> ProjectionError {
    ProjectionError::InvalidArgument { field: "cursor", reason: "not a cursor this list returned".to_owned() }
}

/// Which page to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Start strictly after this row; `None` for the first page.
    pub after: Option<Cursor>,
    /// 1..=[`PAGE_SIZE_MAX`].
    pub limit: usize,
    pub order: Order,
}

impl PageRequest {
    /// The first page, oldest first.
    pub fn first(limit: usize) -> PageRequest {
        PageRequest { after: None, limit, order: Order::OldestFirst }
    }

    /// The page after `cursor`, in the same order as the page it came from.
    pub fn after(cursor: Cursor, limit: usize, order: Order) -> PageRequest {
        PageRequest { after: Some(cursor), limit, order }
    }

    pub fn newest_first(mut self) -> PageRequest {
        self.order = Order::NewestFirst;
        self
    }

    pub(crate) fn checked_limit(&self) -> Result<usize, ProjectionError> {
        if self.limit == 0 || self.limit > PAGE_SIZE_MAX {
            return Err(ProjectionError::InvalidArgument {
                field: "limit",
                reason: format!("must be between 1 and {PAGE_SIZE_MAX}"),
            });
        }
        Ok(self.limit)
    }
}

/// One page of a list and the cursor of the next, if there may be one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<Cursor>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows read: the extra row only
    /// tells that a next page exists.
    pub(crate) fn from_rows(mut rows: Vec<T>, limit: usize, cursor_of: impl Fn(&T) -> Cursor) -> Page<T> {
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = if more { rows.last().map(cursor_of) } else { None };
        Page { items: rows, next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_cursors_refuse_anything_else() {
        assert_eq!(Cursor::from_sequence(42).sequence().unwrap(), 42);
        for text in ["", "0", "-1", "abc", "4 2", "9223372036854775808"] {
            assert!(Cursor::new(text).sequence().is_err(), "{text:?}");
        }
    }

    #[test]
    fn day_cursors_keep_metrics_with_slashes() {
        let day = NaiveDate::from_ymd_opt(2028, 2, 29).unwrap();
        let cursor = Cursor::from_day_and_metric(day, "query/int1/q1");
        assert_eq!(cursor.day_and_metric().unwrap(), (day, "query/int1/q1"));
        for text in ["2028-02-29", "2028-02-29/", "2028-02-30/x", "short", "2028-02-29x/y"] {
            assert!(Cursor::new(text).day_and_metric().is_err(), "{text:?}");
        }
    }

    #[test]
    fn a_page_has_a_next_cursor_only_when_rows_remain() {
        let page = Page::from_rows(vec![1u64, 2, 3], 2, |row| Cursor::from_sequence(*row));
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(page.next_cursor, Some(Cursor::from_sequence(2)));
        let last = Page::from_rows(vec![3u64], 2, |row| Cursor::from_sequence(*row));
        assert_eq!(last.next_cursor, None);
    }

    #[test]
    fn limits_are_bounded() {
        assert!(PageRequest::first(0).checked_limit().is_err());
        assert!(PageRequest::first(PAGE_SIZE_MAX + 1).checked_limit().is_err());
        assert_eq!(PageRequest::first(PAGE_SIZE_MAX).checked_limit().unwrap(), PAGE_SIZE_MAX);
    }
}
