//! Daily usage statistics in members' time zones: days of 23 and 25 hours
//! around DST changes, a leap day, a time zone change, and paging.

use chrono::{DateTime, NaiveDate, Utc};
use tally_ledger::domain::{GrantCredits, GrantSource, MemberCommand};
use tally_projections::{Cursor, DailyUsage, Order, PageRequest, ProjectionError, Projections};

use crate::support::*;

fn day(year: i32, month: u32, day: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(year, month, day).expect("a valid day")
}

fn promotional(amount: i64) -> MemberCommand {
    MemberCommand::GrantCredits(GrantCredits::new(GrantSource::Promotional, amount))
}

/// Records one usage of `credits` credits (quantity 1) at each instant.
fn use_at(log: &TestLog, member_id: &str, metric: &str, instants: &[(DateTime<Utc>, i64)]) {
    for (index, (now, credits)) in instants.iter().enumerate() {
        log.at(*now);
        let usage_id = format!("{member_id}-{metric}-{index}");
        log.execute(member_id, usage(&usage_id, metric, 1, *credits, None));
    }
}

/// (day, records, credits) of one metric over a range.
fn days_of(projections: &Projections, member_id: &str, from: NaiveDate, to: NaiveDate) -> Vec<(NaiveDate, i64, i64)> {
    let page = projections.daily_usage(member_id, from, to, &PageRequest::first(1_000)).expect("daily usage");
    page.items.iter().map(|row| (row.day, row.records, row.credits)).collect()
}

#[test]
fn days_of_23_and_25_hours_around_new_york_dst_changes() {
    let log = TestLog::new(instant(2026, 3, 7, 12, 0));
    log.execute("nyc", register("America/New_York"));
    log.execute("nyc", promotional(1_000_000));
    // Spring forward: 2026-03-08 02:00 EST becomes 03:00 EDT (07:00 UTC), so
    // the 8th runs from 05:00 UTC to 04:00 UTC the next day.
    use_at(
        &log,
        "nyc",
        "api.calls",
        &[
            (instant(2026, 3, 8, 4, 59), 1),  // 23:59 EST on the 7th
            (instant(2026, 3, 8, 5, 0), 10),  // midnight EST: the 8th
            (instant(2026, 3, 8, 7, 30), 10), // 03:30 EDT
            (instant(2026, 3, 9, 3, 59), 10), // 23:59 EDT, still the 8th
            (instant(2026, 3, 9, 4, 0), 100), // midnight EDT: the 9th
        ],
    );
    // Fall back: 2026-11-01 02:00 EDT becomes 01:00 EST (06:00 UTC), so the
    // 1st runs from 04:00 UTC to 05:00 UTC the next day.
    use_at(
        &log,
        "nyc",
        "rows",
        &[
            (instant(2026, 11, 1, 4, 0), 1),   // midnight EDT: the 1st
            (instant(2026, 11, 2, 4, 30), 1),  // 23:30 EST, still the 1st
            (instant(2026, 11, 2, 5, 0), 100), // midnight EST: the 2nd
        ],
    );
    let projections = log.caught_up("dst");
    assert_eq!(
        days_of(&projections, "nyc", day(2026, 3, 7), day(2026, 3, 9)),
        vec![(day(2026, 3, 7), 1, 1), (day(2026, 3, 8), 3, 30), (day(2026, 3, 9), 1, 100)]
    );
    assert_eq!(
        days_of(&projections, "nyc", day(2026, 10, 31), day(2026, 11, 2)),
        vec![(day(2026, 11, 1), 2, 2), (day(2026, 11, 2), 1, 100)]
    );
}

#[test]
fn a_leap_day_in_tokyo_and_in_utc() {
    let log = TestLog::new(instant(2028, 2, 27, 0, 0));
    for (member_id, time_zone) in [("tokyo", "Asia/Tokyo"), ("london_utc", "UTC")] {
        log.execute(member_id, register(time_zone));
        log.execute(member_id, promotional(1_000));
    }
    for (now, credits) in [
        (instant(2028, 2, 28, 14, 59), 1),
        (instant(2028, 2, 28, 15, 0), 2),
        (instant(2028, 2, 29, 14, 59), 4),
        (instant(2028, 2, 29, 15, 0), 8),
    ] {
        log.at(now);
        for member_id in ["tokyo", "london_utc"] {
            let usage_id = format!("u{credits}");
            log.execute(member_id, usage(&usage_id, "api.calls", 1, credits, None));
        }
    }
    let projections = log.caught_up("leap");
    let (from, to) = (day(2028, 2, 28), day(2028, 3, 1));
    assert_eq!(
        days_of(&projections, "tokyo", from, to),
        vec![(day(2028, 2, 28), 1, 1), (day(2028, 2, 29), 2, 6), (day(2028, 3, 1), 1, 8)]
    );
    assert_eq!(
        days_of(&projections, "london_utc", from, to),
        vec![(day(2028, 2, 28), 2, 3), (day(2028, 2, 29), 2, 12)]
    );
    assert_eq!(days_of(&projections, "tokyo", day(2028, 2, 29), day(2028, 2, 29)), vec![(day(2028, 2, 29), 2, 6)]);
}

#[test]
fn a_time_zone_change_dates_later_usage_only() {
    let log = TestLog::new(instant(2026, 6, 1, 20, 0));
    log.execute("mover", register("UTC"));
    log.execute("mover", promotional(1_000));
    log.execute("mover", usage("before", "api.calls", 1, 1, None));
    log.execute("mover", register("Asia/Tokyo"));
    log.execute("mover", usage("after", "api.calls", 1, 2, None));
    let projections = log.caught_up("moved");
    // 20:00 UTC on June 1st is 05:00 on June 2nd in Tokyo.
    assert_eq!(
        days_of(&projections, "mover", day(2026, 6, 1), day(2026, 6, 2)),
        vec![(day(2026, 6, 1), 1, 1), (day(2026, 6, 2), 1, 2)]
    );
}

#[test]
fn usage_pages_by_day_and_metric_in_both_orders() {
    let log = TestLog::new(instant(2026, 5, 1, 12, 0));
    log.execute("pager", register("UTC"));
    log.execute("pager", promotional(10_000));
    for day_of_month in 1..=3 {
        log.at(instant(2026, 5, day_of_month, 12, 0));
        for metric in ["a.metric", "b.metric"] {
            log.execute("pager", usage(&format!("{metric}-{day_of_month}"), metric, 1, 1, None));
        }
    }
    let projections = log.caught_up("pages");
    let (from, to) = (day(2026, 5, 1), day(2026, 5, 31));
    for order in [Order::OldestFirst, Order::NewestFirst] {
        let mut page = PageRequest { after: None, limit: 4, order };
        let mut keys: Vec<(NaiveDate, String)> = Vec::new();
        let mut pages = 0;
        loop {
            let found = projections.daily_usage("pager", from, to, &page).unwrap();
            pages += 1;
            keys.extend(found.items.iter().map(|row: &DailyUsage| (row.day, row.metric.clone())));
            match found.next_cursor {
                Some(cursor) => page = PageRequest::after(cursor, 4, order),
                None => break,
            }
        }
        let mut expected: Vec<(NaiveDate, String)> = (1..=3)
            .flat_map(|day_of_month| {
                ["a.metric", "b.metric"].map(|metric| (day(2026, 5, day_of_month), metric.to_owned()))
            })
            .collect();
        if order == Order::NewestFirst {
            expected.reverse();
        }
        assert_eq!(keys, expected, "{order:?}");
        assert_eq!(pages, 2);
    }
}

fn field_of<T: std::fmt::Debug>(result: Result<T, ProjectionError>) -> &'static str {
    match result {
        Err(ProjectionError::InvalidArgument { field, .. }) => field,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn bad_ranges_cursors_and_limits_are_refused() {
    let log = TestLog::new(instant(2026, 5, 1, 12, 0));
    log.execute("pager", register("UTC"));
    let projections = log.caught_up("refusals");
    let first = PageRequest::first(10);
    assert_eq!(field_of(projections.daily_usage("pager", day(2026, 5, 2), day(2026, 5, 1), &first)), "from");
    assert_eq!(field_of(projections.daily_usage("pager", day(2025, 1, 1), day(2026, 1, 2), &first)), "to");
    assert!(projections.daily_usage("pager", day(2024, 1, 1), day(2024, 12, 31), &first).is_ok(), "a leap year fits");
    let bad_cursor = PageRequest::after(Cursor::new("yesterday"), 10, Order::OldestFirst);
    assert_eq!(field_of(projections.daily_usage("pager", day(2026, 5, 1), day(2026, 5, 2), &bad_cursor)), "cursor");
    assert_eq!(field_of(projections.transactions("pager", &bad_cursor)), "cursor");
    assert_eq!(field_of(projections.invoices("pager", &bad_cursor)), "cursor");
    assert_eq!(field_of(projections.transactions("pager", &PageRequest::first(0))), "limit");
    assert_eq!(field_of(projections.transactions("pager", &PageRequest::first(1_001))), "limit");
}
