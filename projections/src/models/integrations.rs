//! `integrations`, `query_executions` and `query_stats` (DESIGN.md §9): one
//! projector, three read models.
//!
//! - `integrations`: per member × integration, from its own stream
//!   (`integration-{member}/{integration}`): provider, name, config (which
//!   never holds a secret: credentials live in the vault), status, the
//!   credential's version and hint, the last health check, its saved
//!   queries (internal table `integration_queries`), and the counts of its
//!   executions, errors and credits. Status follows the
//!   ledger's rule, event by event: `untested` after a registration, a
//!   change of config or credential, or an enable; `healthy` after a
//!   passing check; `failing` after [`FAILING_AFTER`] failed ones in a row;
//!   `disabled` until enabled; `removed` for good.
//! - `query_executions`: one row per `QueryExecuted` (a member event, in
//!   the same append as the settlement that charged it), newest first by
//!   log position.
//! - `query_stats`: per member × integration × query × day (UTC, of the
//!   execution's `occurred_at`), sums of the executions and a histogram of
//!   their durations in fixed buckets ([`DURATION_BUCKETS_MS`]), so that
//!   percentiles can be read without keeping every duration.

use chrono::{DateTime, NaiveDate, Utc};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tally_ledger::domain::integration::FAILING_AFTER;
use tally_ledger::domain::{IntegrationEvent, MemberEvent, QueryStatus};

use crate::error::ProjectionError;
use crate::page::{Cursor, Order, Page, PageRequest};
use crate::projector::{IntegrationProjected, ProjectedEvent, Projector, ProjectorTx, TableSpec};
use crate::read::Snapshot;
use crate::registry::ReadModel;
use crate::storage::to_sql_integer;
use crate::values::{day_text, instant_at, instant_text, u64_at};

pub const PROJECTOR_NAME: &str = "integrations";
/// 2: the source's API usage (`api_usage_*`).
pub const PROJECTOR_VERSION: u32 = 2;

/// The upper bounds (inclusive, milliseconds) of the duration histogram's
/// buckets; a last bucket holds everything slower.
pub const DURATION_BUCKETS_MS: [i64; 10] = [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000];

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "integrations",
        columns: "member_id TEXT NOT NULL,
            integration_id TEXT NOT NULL,
            provider TEXT NOT NULL,
            name TEXT NOT NULL,
            config TEXT NOT NULL,
            status TEXT NOT NULL,
            credential_version INTEGER,
            credential_hint TEXT,
            consecutive_failures INTEGER NOT NULL,
            last_test_at TEXT,
            last_test_ok INTEGER,
            last_test_latency_ms INTEGER,
            last_test_error TEXT,
            executions INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            credits INTEGER NOT NULL,
            api_usage_used INTEGER,
            api_usage_limit INTEGER,
            api_usage_at TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            updated_position INTEGER NOT NULL,
            PRIMARY KEY (member_id, integration_id)",
        key: "member_id, integration_id",
        indexes: &[],
        read_model: "integrations",
    },
    TableSpec {
        name: "integration_queries",
        columns: "member_id TEXT NOT NULL,
            integration_id TEXT NOT NULL,
            query_id TEXT NOT NULL,
            saved_at TEXT NOT NULL,
            PRIMARY KEY (member_id, integration_id, query_id)",
        key: "member_id, integration_id, query_id",
        indexes: &[],
        read_model: "integrations",
    },
    TableSpec {
        name: "query_executions",
        columns: "member_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            execution_id TEXT NOT NULL,
            integration_id TEXT NOT NULL,
            query_id TEXT NOT NULL,
            status TEXT NOT NULL,
            rows INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            duration_ms INTEGER NOT NULL,
            cache_hit INTEGER NOT NULL,
            credits INTEGER NOT NULL,
            error_code TEXT,
            executed_at TEXT NOT NULL,
            PRIMARY KEY (member_id, position)",
        key: "member_id, position",
        indexes: &[("by_query", "member_id, integration_id, query_id, position")],
        read_model: "query_executions",
    },
    TableSpec {
        name: "query_stats",
        columns: "member_id TEXT NOT NULL,
            integration_id TEXT NOT NULL,
            query_id TEXT NOT NULL,
            day TEXT NOT NULL,
            executions INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            timeouts INTEGER NOT NULL,
            cache_hits INTEGER NOT NULL,
            rows INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            credits INTEGER NOT NULL,
            duration_ms_total INTEGER NOT NULL,
            duration_ms_max INTEGER NOT NULL,
            buckets TEXT NOT NULL,
            last_executed_at TEXT NOT NULL,
            PRIMARY KEY (member_id, integration_id, query_id, day)",
        key: "member_id, integration_id, query_id, day",
        indexes: &[],
        read_model: "query_stats",
    },
];

const HANDLES: &[&str] = &[
    "IntegrationRegistered",
    "IntegrationConfigChanged",
    "IntegrationCredentialRotated",
    "IntegrationTested",
    "IntegrationDisabled",
    "IntegrationEnabled",
    "IntegrationRemoved",
    "QuerySaved",
    "QueryRemoved",
    "QueryExecuted",
];

const REGISTER: &str = "INSERT OR REPLACE INTO {integrations} (member_id, integration_id, provider, name, config,
    status, credential_version, credential_hint, consecutive_failures, last_test_at, last_test_ok,
    last_test_latency_ms, last_test_error, executions, errors, credits, created_at, updated_at, updated_position)
    VALUES (?1, ?2, ?3, ?4, ?5, 'untested', ?6, ?7, 0, NULL, NULL, NULL, NULL, 0, 0, 0, ?8, ?8, ?9)";
/// A re-registration after a removal starts a new life with the old counts.
const SELECT_COUNTS: &str =
    "SELECT executions, errors, credits FROM {integrations} WHERE member_id = ?1 AND integration_id = ?2";
const SET_COUNTS: &str = "UPDATE {integrations} SET executions = ?3, errors = ?4, credits = ?5
    WHERE member_id = ?1 AND integration_id = ?2";
const COUNT_EXECUTION: &str = "UPDATE {integrations} SET executions = executions + 1, errors = errors + ?3,
    credits = credits + ?4 WHERE member_id = ?1 AND integration_id = ?2";
/// Back to `untested` unless disabled (a change of config or credential).
const CHANGE_CONFIG: &str = "UPDATE {integrations} SET name = ?3, config = ?4,
    status = CASE status WHEN 'disabled' THEN 'disabled' ELSE 'untested' END, consecutive_failures = 0,
    updated_at = ?5, updated_position = ?6 WHERE member_id = ?1 AND integration_id = ?2";
const ROTATE: &str = "UPDATE {integrations} SET credential_version = ?3, credential_hint = ?4,
    status = CASE status WHEN 'disabled' THEN 'disabled' ELSE 'untested' END, consecutive_failures = 0,
    updated_at = ?5, updated_position = ?6 WHERE member_id = ?1 AND integration_id = ?2";
/// The source's last word on its API allowance.
const API_USAGE: &str = "UPDATE {integrations} SET api_usage_used = ?3, api_usage_limit = ?4, api_usage_at = ?5
    WHERE member_id = ?1 AND integration_id = ?2";
const SELECT_HEALTH: &str =
    "SELECT status, consecutive_failures FROM {integrations} WHERE member_id = ?1 AND integration_id = ?2";
const TESTED: &str = "UPDATE {integrations} SET status = ?3, consecutive_failures = ?4, last_test_at = ?5,
    last_test_ok = ?6, last_test_latency_ms = ?7, last_test_error = ?8, updated_at = ?5, updated_position = ?9
    WHERE member_id = ?1 AND integration_id = ?2";
/// Enabled: `untested`, failures forgotten.
const ENABLE: &str = "UPDATE {integrations} SET status = 'untested', consecutive_failures = 0, updated_at = ?3,
    updated_position = ?4 WHERE member_id = ?1 AND integration_id = ?2";
/// Disabled: the failure count stays, as the ledger keeps it.
const DISABLE: &str = "UPDATE {integrations} SET status = 'disabled', updated_at = ?3, updated_position = ?4
    WHERE member_id = ?1 AND integration_id = ?2";
const REMOVE: &str = "UPDATE {integrations} SET status = 'removed', credential_version = NULL,
    credential_hint = NULL, consecutive_failures = 0, updated_at = ?3, updated_position = ?4
    WHERE member_id = ?1 AND integration_id = ?2";
const SAVE_QUERY: &str = "INSERT INTO {integration_queries} (member_id, integration_id, query_id, saved_at)
    VALUES (?1, ?2, ?3, ?4) ON CONFLICT (member_id, integration_id, query_id) DO UPDATE SET saved_at = excluded.saved_at";
const REMOVE_QUERY: &str =
    "DELETE FROM {integration_queries} WHERE member_id = ?1 AND integration_id = ?2 AND query_id = ?3";
const REMOVE_QUERIES: &str = "DELETE FROM {integration_queries} WHERE member_id = ?1 AND integration_id = ?2";
const INSERT_EXECUTION: &str = "INSERT INTO {query_executions} (member_id, position, execution_id, integration_id,
    query_id, status, rows, bytes, duration_ms, cache_hit, credits, error_code, executed_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";
const SELECT_STATS: &str = "SELECT executions, errors, timeouts, cache_hits, rows, bytes, credits, duration_ms_total,
    duration_ms_max, buckets FROM {query_stats}
    WHERE member_id = ?1 AND integration_id = ?2 AND query_id = ?3 AND day = ?4";
const UPSERT_STATS: &str = "INSERT OR REPLACE INTO {query_stats} (member_id, integration_id, query_id, day,
    executions, errors, timeouts, cache_hits, rows, bytes, credits, duration_ms_total, duration_ms_max, buckets,
    last_executed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)";

/// The status an execution is listed with: `ok`, `timeout` (the source did
/// not answer within the query's timeout) or `error`.
pub fn execution_status(status: QueryStatus, error_code: Option<&str>) -> &'static str {
    match (status, error_code) {
        (QueryStatus::Succeeded, _) => "ok",
        (_, Some("integration_timeout")) => "timeout",
        _ => "error",
    }
}

/// A source's count as an SQLite integer: the ledger bounds it, and a
/// count past `i64` (from a log written before it did) reads as the
/// largest, never a panic of the projector.
fn saturating(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// The histogram bucket of a duration.
pub fn duration_bucket(duration_ms: i64) -> usize {
    DURATION_BUCKETS_MS.iter().position(|bound| duration_ms <= *bound).unwrap_or(DURATION_BUCKETS_MS.len())
}

pub struct IntegrationsProjector;

impl Projector for IntegrationsProjector {
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
        let MemberEvent::QueryExecuted { reservation_id, execution, credits } = event.event else {
            return Ok(());
        };
        let member_id = event.member_id;
        let status = execution_status(execution.status, execution.error_code.as_deref());
        let executed_at = instant_text(event.occurred_at);
        tx.statement(INSERT_EXECUTION)?.execute(params![
            member_id,
            to_sql_integer(event.position()),
            reservation_id,
            execution.integration_id,
            execution.query_id,
            status,
            execution.rows,
            execution.bytes,
            execution.duration_ms,
            execution.cache_hit,
            credits.0,
            execution.error_code,
            executed_at,
        ])?;

        tx.statement(COUNT_EXECUTION)?.execute(params![
            member_id,
            execution.integration_id,
            i64::from(status != "ok"),
            credits.0
        ])?;
        if let Some(usage) = execution.api_usage {
            tx.statement(API_USAGE)?.execute(params![
                member_id,
                execution.integration_id,
                saturating(usage.used),
                saturating(usage.limit),
                executed_at,
            ])?;
        }

        let day = day_text(event.occurred_at.date_naive());
        let key = params![member_id, execution.integration_id, execution.query_id, day];
        let mut stats = tx
            .statement(SELECT_STATS)?
            .query_row(key, |row| {
                Ok(Sums {
                    executions: row.get(0)?,
                    errors: row.get(1)?,
                    timeouts: row.get(2)?,
                    cache_hits: row.get(3)?,
                    rows: row.get(4)?,
                    bytes: row.get(5)?,
                    credits: row.get(6)?,
                    duration_ms_total: row.get(7)?,
                    duration_ms_max: row.get(8)?,
                    buckets: row.get::<_, String>(9)?,
                })
            })
            .optional()?
            .unwrap_or_default();
        let mut buckets = parse_buckets(&stats.buckets)
            .ok_or_else(|| event.inconsistent(PROJECTOR_NAME, "a query's duration histogram is damaged"))?;
        buckets[duration_bucket(execution.duration_ms)] += 1;
        stats.executions += 1;
        stats.errors += i64::from(status == "error");
        stats.timeouts += i64::from(status == "timeout");
        stats.cache_hits += i64::from(execution.cache_hit);
        stats.rows = stats.rows.saturating_add(execution.rows);
        stats.bytes = stats.bytes.saturating_add(execution.bytes);
        stats.credits = stats.credits.saturating_add(credits.0);
        stats.duration_ms_total = stats.duration_ms_total.saturating_add(execution.duration_ms);
        stats.duration_ms_max = stats.duration_ms_max.max(execution.duration_ms);
        tx.statement(UPSERT_STATS)?.execute(params![
            member_id,
            execution.integration_id,
            execution.query_id,
            day,
            stats.executions,
            stats.errors,
            stats.timeouts,
            stats.cache_hits,
            stats.rows,
            stats.bytes,
            stats.credits,
            stats.duration_ms_total,
            stats.duration_ms_max,
            buckets_text(&buckets),
            executed_at,
        ])?;
        Ok(())
    }

    fn apply_integration(&self, tx: &ProjectorTx<'_>, event: &IntegrationProjected<'_>) -> Result<(), ProjectionError> {
        let (member_id, integration_id) = (event.member_id, event.integration_id);
        let at = instant_text(event.occurred_at);
        let position = to_sql_integer(event.position());
        match event.event {
            IntegrationEvent::IntegrationRegistered { provider, name, config, credential, .. } => {
                tx.statement(REMOVE_QUERIES)?.execute(params![member_id, integration_id])?;
                let counts: Option<(i64, i64, i64)> = tx
                    .statement(SELECT_COUNTS)?
                    .query_row(params![member_id, integration_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                    .optional()?;
                tx.statement(REGISTER)?.execute(params![
                    member_id,
                    integration_id,
                    provider,
                    name,
                    config.to_string(),
                    credential.as_ref().map(|credential| credential.version),
                    credential.as_ref().and_then(|credential| credential.hint.clone()),
                    at,
                    position,
                ])?;
                if let Some((executions, errors, credits)) = counts {
                    tx.statement(SET_COUNTS)?.execute(params![
                        member_id,
                        integration_id,
                        executions,
                        errors,
                        credits
                    ])?;
                }
            }
            IntegrationEvent::IntegrationConfigChanged { name, config } => {
                tx.statement(CHANGE_CONFIG)?.execute(params![
                    member_id,
                    integration_id,
                    name,
                    config.to_string(),
                    at,
                    position
                ])?;
            }
            IntegrationEvent::IntegrationCredentialRotated { credential } => {
                tx.statement(ROTATE)?.execute(params![
                    member_id,
                    integration_id,
                    credential.version,
                    credential.hint,
                    at,
                    position
                ])?;
            }
            IntegrationEvent::IntegrationTested { ok, latency_ms, error_code, api_usage, .. } => {
                if let Some(usage) = api_usage {
                    tx.statement(API_USAGE)?.execute(params![
                        member_id,
                        integration_id,
                        saturating(usage.used),
                        saturating(usage.limit),
                        at,
                    ])?;
                }
                let (status, failures): (String, i64) = tx
                    .statement(SELECT_HEALTH)?
                    .query_row(params![member_id, integration_id], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()?
                    .ok_or_else(|| event_inconsistent(event, "a health check of an integration never registered"))?;
                let failures = if *ok { 0 } else { failures + 1 };
                let status = match status.as_str() {
                    "disabled" | "removed" => status.as_str(),
                    _ if *ok => "healthy",
                    _ if failures >= i64::from(FAILING_AFTER) => "failing",
                    other => other,
                };
                tx.statement(TESTED)?.execute(params![
                    member_id,
                    integration_id,
                    status,
                    failures,
                    at,
                    ok,
                    latency_ms,
                    error_code,
                    position
                ])?;
            }
            IntegrationEvent::IntegrationDisabled { .. } => {
                tx.statement(DISABLE)?.execute(params![member_id, integration_id, at, position])?;
            }
            IntegrationEvent::IntegrationEnabled {} => {
                tx.statement(ENABLE)?.execute(params![member_id, integration_id, at, position])?;
            }
            IntegrationEvent::IntegrationRemoved {} => {
                tx.statement(REMOVE_QUERIES)?.execute(params![member_id, integration_id])?;
                tx.statement(REMOVE)?.execute(params![member_id, integration_id, at, position])?;
            }
            IntegrationEvent::QuerySaved { query_id, .. } => {
                tx.statement(SAVE_QUERY)?.execute(params![member_id, integration_id, query_id, at])?;
            }
            IntegrationEvent::QueryRemoved { query_id } => {
                tx.statement(REMOVE_QUERY)?.execute(params![member_id, integration_id, query_id])?;
            }
        }
        Ok(())
    }
}

fn event_inconsistent(event: &IntegrationProjected<'_>, reason: &str) -> ProjectionError {
    ProjectionError::Inconsistent { projector: PROJECTOR_NAME, position: event.position(), reason: reason.to_owned() }
}

/// A `query_stats` row's sums while it is being moved.
#[derive(Default)]
struct Sums {
    executions: i64,
    errors: i64,
    timeouts: i64,
    cache_hits: i64,
    rows: i64,
    bytes: i64,
    credits: i64,
    duration_ms_total: i64,
    duration_ms_max: i64,
    buckets: String,
}

type Buckets = [i64; DURATION_BUCKETS_MS.len() + 1];

/// The histogram as stored: counts separated by commas, one per bucket.
fn buckets_text(buckets: &Buckets) -> String {
    buckets.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

fn parse_buckets(text: &str) -> Option<Buckets> {
    let mut buckets = Buckets::default();
    if text.is_empty() {
        return Some(buckets);
    }
    let counts: Vec<i64> = text.split(',').map(str::parse).collect::<Result<_, _>>().ok()?;
    if counts.len() != buckets.len() {
        return None;
    }
    buckets.copy_from_slice(&counts);
    Some(buckets)
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

/// One execution of a query, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExecutionRow {
    /// The reservation that paid for it.
    pub execution_id: String,
    pub integration_id: String,
    pub query_id: String,
    /// `ok`, `error` or `timeout`.
    pub status: String,
    pub rows: i64,
    pub bytes: i64,
    pub duration_ms: i64,
    pub cache_hit: bool,
    pub credits: i64,
    pub error_code: Option<String>,
    pub executed_at: DateTime<Utc>,
    /// The log position of its `QueryExecuted`.
    pub position: u64,
}

/// Which executions to list; `None` matches all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecutionFilter {
    pub integration_id: Option<String>,
    pub query_id: Option<String>,
    pub status: Option<String>,
}

/// One query's statistics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueryStats {
    pub integration_id: String,
    pub query_id: String,
    pub executions: i64,
    pub errors: i64,
    pub timeouts: i64,
    pub cache_hits: i64,
    pub rows: i64,
    pub bytes: i64,
    pub credits: i64,
    pub duration_ms_total: i64,
    pub duration_ms_max: i64,
    /// Executions per duration bucket: `le_ms` is the bucket's inclusive
    /// upper bound, `None` for the last (slower than every bound).
    pub duration_histogram: Vec<HistogramBucket>,
    pub last_executed_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistogramBucket {
    pub le_ms: Option<i64>,
    pub count: i64,
}

impl QueryStats {
    /// The statistics of several queries together (an integration's), with
    /// `query_id` `*`; `None` for none.
    pub fn combined(stats: &[QueryStats]) -> Option<QueryStats> {
        let first = stats.first()?;
        let mut all = QueryStats { query_id: "*".to_owned(), ..first.clone() };
        for query in &stats[1..] {
            all.executions += query.executions;
            all.errors += query.errors;
            all.timeouts += query.timeouts;
            all.cache_hits += query.cache_hits;
            all.rows = all.rows.saturating_add(query.rows);
            all.bytes = all.bytes.saturating_add(query.bytes);
            all.credits = all.credits.saturating_add(query.credits);
            all.duration_ms_total = all.duration_ms_total.saturating_add(query.duration_ms_total);
            all.duration_ms_max = all.duration_ms_max.max(query.duration_ms_max);
            all.last_executed_at = all.last_executed_at.max(query.last_executed_at);
            for (sum, bucket) in all.duration_histogram.iter_mut().zip(&query.duration_histogram) {
                sum.count += bucket.count;
            }
        }
        Some(all)
    }

    /// The upper bound of the bucket holding the `quantile` (0–1) of
    /// durations; `None` when it falls in the last, unbounded bucket.
    pub fn duration_quantile_ms(&self, quantile: f64) -> Option<i64> {
        let total: i64 = self.duration_histogram.iter().map(|bucket| bucket.count).sum();
        let rank = ((total as f64) * quantile).ceil().max(1.0) as i64;
        let mut seen = 0;
        for bucket in &self.duration_histogram {
            seen += bucket.count;
            if seen >= rank {
                return bucket.le_ms;
            }
        }
        None
    }
}

const EXECUTION_COLUMNS: &str = "execution_id, integration_id, query_id, status, rows, bytes, duration_ms,
    cache_hit, credits, error_code, executed_at, position";

pub(crate) fn executions(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    filter: &ExecutionFilter,
    page: &PageRequest,
) -> Result<Page<ExecutionRow>, ProjectionError> {
    let limit = page.checked_limit()?;
    let after = page.after.as_ref().map(Cursor::sequence).transpose()?;
    let bound = match (page.order, after) {
        (_, Some(position)) => to_sql_integer(position),
        (Order::OldestFirst, None) => 0,
        (Order::NewestFirst, None) => i64::MAX,
    };
    let template = match page.order {
        Order::OldestFirst => {
            "SELECT {columns} FROM {query_executions} WHERE member_id = ?1 AND position > ?2
                AND (?3 IS NULL OR integration_id = ?3) AND (?4 IS NULL OR query_id = ?4)
                AND (?5 IS NULL OR status = ?5) ORDER BY position LIMIT ?6"
        }
        Order::NewestFirst => {
            "SELECT {columns} FROM {query_executions} WHERE member_id = ?1 AND position < ?2
                AND (?3 IS NULL OR integration_id = ?3) AND (?4 IS NULL OR query_id = ?4)
                AND (?5 IS NULL OR status = ?5) ORDER BY position DESC LIMIT ?6"
        }
    };
    let sql = template.replace("{columns}", EXECUTION_COLUMNS);
    let sql = snapshot.render(PROJECTOR_NAME, ReadModel::QueryExecutions.name(), &sql)?;
    let mut statement = snapshot.connection().prepare_cached(&sql)?;
    let rows = statement.query_map(
        params![member_id, bound, filter.integration_id, filter.query_id, filter.status, (limit + 1) as i64],
        |row| {
            Ok(ExecutionRow {
                execution_id: row.get(0)?,
                integration_id: row.get(1)?,
                query_id: row.get(2)?,
                status: row.get(3)?,
                rows: row.get(4)?,
                bytes: row.get(5)?,
                duration_ms: row.get(6)?,
                cache_hit: row.get(7)?,
                credits: row.get(8)?,
                error_code: row.get(9)?,
                executed_at: instant_at(row, 10)?,
                position: u64_at(row, 11)?,
            })
        },
    )?;
    let rows = rows.collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(rows, limit, |execution| Cursor::from_sequence(execution.position)))
}

/// The statistics of a member's queries of one integration, by query id,
/// all days together.
pub(crate) fn query_stats(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    integration_id: &str,
) -> Result<Vec<QueryStats>, ProjectionError> {
    let template = "SELECT integration_id, query_id, executions, errors, timeouts, cache_hits, rows, bytes, credits,
        duration_ms_total, duration_ms_max, buckets, last_executed_at FROM {query_stats}
        WHERE member_id = ?1 AND integration_id = ?2 ORDER BY query_id, day";
    let mut statement = snapshot.statement(ReadModel::QueryStats, template)?;
    stats_of(&mut statement, params![member_id, integration_id])
}

/// The statistics of all a member's queries over the (UTC) days
/// `[from, to]`, by integration and query.
pub(crate) fn query_performance(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<QueryStats>, ProjectionError> {
    let template = "SELECT integration_id, query_id, executions, errors, timeouts, cache_hits, rows, bytes, credits,
        duration_ms_total, duration_ms_max, buckets, last_executed_at FROM {query_stats}
        WHERE member_id = ?1 AND day >= ?2 AND day <= ?3 ORDER BY integration_id, query_id, day";
    let mut statement = snapshot.statement(ReadModel::QueryStats, template)?;
    stats_of(&mut statement, params![member_id, day_text(from), day_text(to)])
}

/// Rows of `query_stats` ordered by (integration, query, day), summed per
/// (integration, query).
fn stats_of(
    statement: &mut rusqlite::CachedStatement<'_>,
    parameters: impl rusqlite::Params,
) -> Result<Vec<QueryStats>, ProjectionError> {
    let rows = statement.query_map(parameters, |row| {
        let buckets: String = row.get(11)?;
        Ok((
            QueryStats {
                integration_id: row.get(0)?,
                query_id: row.get(1)?,
                executions: row.get(2)?,
                errors: row.get(3)?,
                timeouts: row.get(4)?,
                cache_hits: row.get(5)?,
                rows: row.get(6)?,
                bytes: row.get(7)?,
                credits: row.get(8)?,
                duration_ms_total: row.get(9)?,
                duration_ms_max: row.get(10)?,
                duration_histogram: Vec::new(),
                last_executed_at: instant_at(row, 12)?,
            },
            buckets,
        ))
    })?;
    let mut stats: Vec<QueryStats> = Vec::new();
    for row in rows {
        let (mut query, buckets) = row?;
        let buckets = parse_buckets(&buckets).ok_or_else(|| ProjectionError::Inconsistent {
            projector: PROJECTOR_NAME,
            position: 0,
            reason: format!("the duration histogram of query `{}` is damaged", query.query_id),
        })?;
        query.duration_histogram = buckets
            .iter()
            .enumerate()
            .map(|(index, count)| HistogramBucket { le_ms: DURATION_BUCKETS_MS.get(index).copied(), count: *count })
            .collect();
        match stats.last_mut() {
            Some(last) if last.query_id == query.query_id && last.integration_id == query.integration_id => {
                let query_id = query.query_id.clone();
                *last = QueryStats { query_id, ..QueryStats::combined(&[last.clone(), query]).expect("two rows") };
            }
            _ => stats.push(query),
        }
    }
    Ok(stats)
}

/// An integration whose status is `failing`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailingIntegration {
    pub member_id: String,
    pub integration_id: String,
    pub name: String,
    pub provider: String,
}

/// How many integrations are failing, and the first `limit` of them.
pub(crate) fn failing(
    snapshot: &Snapshot<'_>,
    limit: usize,
) -> Result<(u64, Vec<FailingIntegration>), ProjectionError> {
    let mut count =
        snapshot.statement(ReadModel::Integrations, "SELECT count(*) FROM {integrations} WHERE status = 'failing'")?;
    let total: i64 = count.query_row([], |row| row.get(0))?;
    let mut statement = snapshot.statement(
        ReadModel::Integrations,
        "SELECT member_id, integration_id, name, provider FROM {integrations} WHERE status = 'failing'
         ORDER BY member_id, integration_id LIMIT ?1",
    )?;
    let rows = statement.query_map(params![limit as i64], |row| {
        Ok(FailingIntegration {
            member_id: row.get(0)?,
            integration_id: row.get(1)?,
            name: row.get(2)?,
            provider: row.get(3)?,
        })
    })?;
    Ok((total as u64, rows.collect::<Result<_, _>>()?))
}

/// A source's last report of its API usage: calls used, the allowance,
/// and when it said so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApiUsageRow {
    pub used: u64,
    pub limit: u64,
    pub at: DateTime<Utc>,
}

/// The last API usage a source reported for an integration, if any.
pub(crate) fn api_usage(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    integration_id: &str,
) -> Result<Option<ApiUsageRow>, ProjectionError> {
    let template = "SELECT api_usage_used, api_usage_limit, api_usage_at FROM {integrations}
        WHERE member_id = ?1 AND integration_id = ?2 AND api_usage_at IS NOT NULL";
    let mut statement = snapshot.statement(ReadModel::Integrations, template)?;
    let row = statement
        .query_row(params![member_id, integration_id], |row| {
            Ok(ApiUsageRow { used: u64_at(row, 0)?, limit: u64_at(row, 1)?, at: instant_at(row, 2)? })
        })
        .optional()?;
    Ok(row)
}

/// An integration the health scheduler may probe: neither disabled nor
/// removed, with when it was last checked (or created).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeCandidate {
    pub member_id: String,
    pub integration_id: String,
    pub checked_at: DateTime<Utc>,
}

/// Up to `limit` active integrations of every member, least recently
/// checked first.
pub(crate) fn probe_candidates(snapshot: &Snapshot<'_>, limit: usize) -> Result<Vec<ProbeCandidate>, ProjectionError> {
    let template = "SELECT member_id, integration_id, coalesce(last_test_at, created_at) AS checked_at
        FROM {integrations} WHERE status NOT IN ('disabled', 'removed') ORDER BY checked_at LIMIT ?1";
    let mut statement = snapshot.statement(ReadModel::Integrations, template)?;
    let rows = statement.query_map(params![limit as i64], |row| {
        Ok(ProbeCandidate { member_id: row.get(0)?, integration_id: row.get(1)?, checked_at: instant_at(row, 2)? })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_bucket_of_their_inclusive_bound() {
        assert_eq!(duration_bucket(0), 0);
        assert_eq!(duration_bucket(10), 0);
        assert_eq!(duration_bucket(11), 1);
        assert_eq!(duration_bucket(10_000), DURATION_BUCKETS_MS.len() - 1);
        assert_eq!(duration_bucket(10_001), DURATION_BUCKETS_MS.len());
    }

    #[test]
    fn histograms_round_trip_and_refuse_damage() {
        let mut buckets = Buckets::default();
        buckets[3] = 7;
        buckets[10] = 1;
        assert_eq!(parse_buckets(&buckets_text(&buckets)), Some(buckets));
        assert_eq!(parse_buckets(""), Some(Buckets::default()));
        assert_eq!(parse_buckets("1,2,3"), None);
        assert_eq!(parse_buckets("a,0,0,0,0,0,0,0,0,0,0"), None);
    }

    #[test]
    fn quantiles_name_the_bucket_bound() {
        let histogram = [(Some(10), 90), (Some(25), 9), (None, 1)]
            .into_iter()
            .map(|(le_ms, count)| HistogramBucket { le_ms, count })
            .collect();
        let stats = QueryStats {
            integration_id: "i".into(),
            query_id: "q".into(),
            executions: 100,
            errors: 0,
            timeouts: 0,
            cache_hits: 0,
            rows: 0,
            bytes: 0,
            credits: 0,
            duration_ms_total: 0,
            duration_ms_max: 0,
            duration_histogram: histogram,
            last_executed_at: Utc::now(),
        };
        assert_eq!(stats.duration_quantile_ms(0.5), Some(10));
        assert_eq!(stats.duration_quantile_ms(0.95), Some(25));
        assert_eq!(stats.duration_quantile_ms(1.0), None);
    }

    #[test]
    fn statuses_distinguish_timeouts() {
        assert_eq!(execution_status(QueryStatus::Succeeded, None), "ok");
        assert_eq!(execution_status(QueryStatus::Failed, Some("integration_timeout")), "timeout");
        assert_eq!(execution_status(QueryStatus::Failed, Some("integration_upstream_error")), "error");
    }
}
