//! `alerts`: every episode of every member's alerts (DESIGN.md §11), open
//! or resolved, from `AlertTriggered` and `AlertResolved`. The alert
//! reactor decides; this only records what it appended.

use chrono::{DateTime, Utc};
use rusqlite::params;
use serde::Serialize;
use tally_ledger::domain::MemberEvent;

use crate::error::ProjectionError;
use crate::page::{Cursor, Order, Page, PageRequest};
use crate::projector::{ProjectedEvent, Projector, ProjectorTx, TableSpec};
use crate::read::Snapshot;
use crate::registry::ReadModel;
use crate::storage::to_sql_integer;
use crate::values::{instant_at, instant_text, optional_instant_at, u64_at};

pub const PROJECTOR_NAME: &str = "alerts";
pub const PROJECTOR_VERSION: u32 = 1;

const TABLES: &[TableSpec] = &[TableSpec {
    name: "alerts",
    columns: "member_id TEXT NOT NULL,
        alert_id TEXT NOT NULL,
        rule TEXT NOT NULL,
        subject TEXT,
        episode INTEGER NOT NULL,
        state TEXT NOT NULL,
        figures TEXT NOT NULL,
        resolved_figures TEXT,
        triggered_at TEXT NOT NULL,
        resolved_at TEXT,
        position INTEGER NOT NULL,
        PRIMARY KEY (member_id, alert_id)",
    key: "member_id, alert_id",
    indexes: &[("position", "position"), ("member_position", "member_id, position")],
    read_model: "alerts",
}];

const HANDLES: &[&str] = &["AlertTriggered", "AlertResolved"];

const TRIGGER: &str = "INSERT INTO {alerts} (member_id, alert_id, rule, subject, episode, state, figures,
    triggered_at, position) VALUES (?1, ?2, ?3, ?4, ?5, 'open', ?6, ?7, ?8)";
const RESOLVE: &str = "UPDATE {alerts} SET state = 'resolved', resolved_figures = ?3, resolved_at = ?4
    WHERE member_id = ?1 AND alert_id = ?2 AND state = 'open'";

pub struct AlertsProjector;

impl Projector for AlertsProjector {
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
        match event.event {
            MemberEvent::AlertTriggered { alert_id, notice } => {
                tx.statement(TRIGGER)?.execute(params![
                    event.member_id,
                    alert_id,
                    notice.rule,
                    notice.subject,
                    notice.episode,
                    notice.figures.to_string(),
                    instant_text(event.occurred_at),
                    to_sql_integer(event.position()),
                ])?;
            }
            MemberEvent::AlertResolved { alert_id, notice } => {
                let changed = tx.statement(RESOLVE)?.execute(params![
                    event.member_id,
                    alert_id,
                    notice.figures.to_string(),
                    instant_text(event.occurred_at),
                ])?;
                if changed != 1 {
                    return Err(event.inconsistent(PROJECTOR_NAME, format!("{alert_id} resolved but not open")));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AlertRow {
    pub member_id: String,
    /// `rule:episode`, or `rule:subject:episode`.
    pub alert_id: String,
    pub rule: String,
    /// The integration, invoice, grant or endpoint it is about, if any.
    pub subject: Option<String>,
    pub episode: u32,
    /// `open` or `resolved`.
    pub state: String,
    /// The figures that made the condition true.
    pub figures: serde_json::Value,
    /// The figures when it cleared.
    pub resolved_figures: Option<serde_json::Value>,
    pub triggered_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// The log position of its `AlertTriggered`.
    pub position: u64,
}

/// Which alerts a list holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlertFilter {
    /// One member's, or every member's (operators).
    pub member_id: Option<String>,
    /// `open` or `resolved`.
    pub state: Option<String>,
    pub rule: Option<String>,
}

/// How many episodes each rule opened, and how many are open: one row a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AlertCount {
    pub rule: String,
    pub triggered: u64,
    pub open: u64,
}

fn json_at(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Option<serde_json::Value>> {
    let text: Option<String> = row.get(index)?;
    text.map(|text| {
        serde_json::from_str(&text).map_err(|error| {
            rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(error))
        })
    })
    .transpose()
}

pub(crate) fn alerts(
    snapshot: &Snapshot<'_>,
    filter: &AlertFilter,
    page: &PageRequest,
) -> Result<Page<AlertRow>, ProjectionError> {
    let limit = page.checked_limit()?;
    let after = page.after.as_ref().map(Cursor::sequence).transpose()?;
    let bound = match (page.order, after) {
        (_, Some(position)) => to_sql_integer(position),
        (Order::OldestFirst, None) => 0,
        (Order::NewestFirst, None) => i64::MAX,
    };
    let template = match page.order {
        Order::OldestFirst => {
            "SELECT member_id, alert_id, rule, subject, episode, state, figures, resolved_figures, triggered_at,
                resolved_at, position FROM {alerts} WHERE (?1 IS NULL OR member_id = ?1) AND position > ?2
                AND (?3 IS NULL OR state = ?3) AND (?4 IS NULL OR rule = ?4) ORDER BY position LIMIT ?5"
        }
        Order::NewestFirst => {
            "SELECT member_id, alert_id, rule, subject, episode, state, figures, resolved_figures, triggered_at,
                resolved_at, position FROM {alerts} WHERE (?1 IS NULL OR member_id = ?1) AND position < ?2
                AND (?3 IS NULL OR state = ?3) AND (?4 IS NULL OR rule = ?4) ORDER BY position DESC LIMIT ?5"
        }
    };
    let mut statement = snapshot.statement(ReadModel::Alerts, template)?;
    let rows = statement.query_map(
        params![filter.member_id, bound, filter.state, filter.rule, (limit + 1) as i64],
        |row| {
            Ok(AlertRow {
                member_id: row.get(0)?,
                alert_id: row.get(1)?,
                rule: row.get(2)?,
                subject: row.get(3)?,
                episode: row.get(4)?,
                state: row.get(5)?,
                figures: json_at(row, 6)?.unwrap_or_default(),
                resolved_figures: json_at(row, 7)?,
                triggered_at: instant_at(row, 8)?,
                resolved_at: optional_instant_at(row, 9)?,
                position: u64_at(row, 10)?,
            })
        },
    )?;
    let rows = rows.collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(rows, limit, |alert| Cursor::from_sequence(alert.position)))
}

pub(crate) fn counts(snapshot: &Snapshot<'_>) -> Result<Vec<AlertCount>, ProjectionError> {
    let mut statement = snapshot.statement(
        ReadModel::Alerts,
        "SELECT rule, count(*), sum(state = 'open') FROM {alerts} GROUP BY rule ORDER BY rule",
    )?;
    let rows = statement
        .query_map([], |row| Ok(AlertCount { rule: row.get(0)?, triggered: u64_at(row, 1)?, open: u64_at(row, 2)? }))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}
