//! Outbound webhooks (DESIGN.md §11): which of the log's events a member's
//! endpoints hear of, and the durable queue that delivers them.
//!
//! The [`Dispatcher`] keeps its own SQLite file (`webhooks.sqlite` in the
//! data directory). It follows the log from a checkpoint and, in the same
//! transaction as it moves the checkpoint, keeps the endpoints as their
//! events describe them and puts one delivery per (event, endpoint that
//! wants it) in the endpoint's queue. Each endpoint's queue is its cursor
//! on the log: its deliveries go out one at a time, oldest first, so an
//! endpoint hears of events in the log's order, and a delivery leaves the
//! queue only once it succeeded (or gave up after its last retry). A kill
//! -9 loses nothing: what was queued is on disk, and what was being sent is
//! sent again with the same `webhook-id`.
//!
//! Sending is the caller's (the API's HTTP client, behind the target
//! guard): [`Dispatcher::due`] says what to send, [`Dispatcher::record`]
//! what came of it, with the retry schedule of [`crate::schedule`].

use crate::schedule;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tally_ledger::domain::{IntegrationEvent, MemberEvent, parse_integration_stream};
use tally_ledger::store::RecordedEvent;
use tally_ledger::{Ledger, LedgerError, codec};

/// Events read per page (one transaction each).
const PAGE_EVENTS: usize = 500;
/// A response body is kept up to this many bytes in the delivery log.
pub const RESPONSE_BYTES_MAX: usize = 4_096;
/// How long a receiver has to answer.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// Deliveries listed per page, at most.
pub const DELIVERIES_PAGE_MAX: usize = 100;

/// The event types an endpoint may ask for, and what each is.
pub const EVENT_TYPES: &[(&str, &str)] = &[
    ("usage.recorded", "usage was recorded"),
    ("usage.reversed", "usage was reversed and its credits given back"),
    ("credits.granted", "credits were granted (a purchase, an allocation, a promotion, a refund)"),
    ("credits.debited", "an operator took credits back"),
    ("credits.expired", "the rest of a grant expired"),
    ("subscription.started", "a subscription started"),
    ("subscription.plan_changed", "the plan changed at once (an upgrade)"),
    ("subscription.change_scheduled", "a downgrade or a cancellation was scheduled for the period's end"),
    ("subscription.renewed", "a new period began"),
    ("subscription.past_due", "a payment failed and the subscription is past due"),
    ("subscription.canceled", "the subscription ended"),
    ("subscription.reactivated", "a past-due subscription is active again"),
    ("invoice.issued", "an invoice was issued"),
    ("invoice.voided", "an invoice was voided"),
    ("invoice.uncollectible", "an invoice was marked uncollectible"),
    ("payment.succeeded", "an invoice was paid"),
    ("payment.failed", "a payment failed"),
    ("query.executed", "a saved or ad hoc query ran and was charged"),
    ("alert.triggered", "an alert's condition began"),
    ("alert.resolved", "an alert's condition ended"),
    ("integration.tested", "an integration's health was checked (a probe or an execution's outcome)"),
    ("integration.disabled", "an integration was disabled"),
    ("integration.enabled", "an integration was enabled again"),
];

/// The type a test delivery (`POST …/test`) carries; no filter stops it.
pub const TEST_EVENT_TYPE: &str = "webhook.test";

/// Whether `event_type` names a type of [`EVENT_TYPES`] (or `*`).
pub fn is_event_type(event_type: &str) -> bool {
    event_type == "*" || EVENT_TYPES.iter().any(|(name, _)| *name == event_type)
}

/// The public type of a member event, if endpoints hear of it.
pub fn member_event_type(event: &MemberEvent) -> Option<&'static str> {
    public_type(event.event_type())
}

/// The public type of a member event by its stored type name: the
/// dispatcher reads it without decoding the payload.
pub fn public_type(event_type: &str) -> Option<&'static str> {
    Some(match event_type {
        "UsageRecorded" => "usage.recorded",
        "UsageReversed" => "usage.reversed",
        "CreditsGranted" => "credits.granted",
        "CreditsDebited" => "credits.debited",
        "CreditsExpired" => "credits.expired",
        "SubscriptionStarted" => "subscription.started",
        "SubscriptionPlanChanged" => "subscription.plan_changed",
        "SubscriptionDowngradeScheduled" | "SubscriptionCancelScheduled" => "subscription.change_scheduled",
        "SubscriptionRenewed" => "subscription.renewed",
        "SubscriptionPastDue" => "subscription.past_due",
        "SubscriptionCanceled" => "subscription.canceled",
        "SubscriptionReactivated" => "subscription.reactivated",
        "InvoiceIssued" => "invoice.issued",
        "InvoiceVoided" => "invoice.voided",
        "InvoiceMarkedUncollectible" => "invoice.uncollectible",
        "PaymentSucceeded" => "payment.succeeded",
        "PaymentFailed" => "payment.failed",
        "QueryExecuted" => "query.executed",
        "AlertTriggered" => "alert.triggered",
        "AlertResolved" => "alert.resolved",
        _ => return None,
    })
}

/// The integration event types endpoints hear of.
const INTEGRATION_EVENT_TYPES: [&str; 3] = ["IntegrationTested", "IntegrationDisabled", "IntegrationEnabled"];

/// The public type and data of an integration event, if endpoints hear of
/// it: never its config or credential.
fn integration_event(integration_id: &str, event: &IntegrationEvent) -> Option<(&'static str, Value)> {
    Some(match event {
        IntegrationEvent::IntegrationTested { ok, latency_ms, error_code, source, .. } => (
            "integration.tested",
            json!({"integration_id": integration_id, "ok": ok, "latency_ms": latency_ms,
                "error_code": error_code, "source": source}),
        ),
        IntegrationEvent::IntegrationDisabled { reason } => {
            ("integration.disabled", json!({"integration_id": integration_id, "reason": reason}))
        }
        IntegrationEvent::IntegrationEnabled {} => ("integration.enabled", json!({"integration_id": integration_id})),
        _ => return None,
    })
}

/// The body every delivery carries: `{type, id, created_at, data}`.
pub fn body(event_type: &str, message_id: &str, created_at: DateTime<Utc>, data: Value) -> String {
    json!({"type": event_type, "id": message_id, "created_at": created_at, "data": data}).to_string()
}

/// An endpoint as the dispatcher knows it from the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointRow {
    pub endpoint_id: String,
    pub member_id: String,
    pub url: String,
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// The vault's credential id and version of the signing secret.
    pub secret: (String, i64),
    /// The previous secret and until when it signs too.
    pub previous_secret: Option<(String, i64, DateTime<Utc>)>,
}

impl EndpointRow {
    fn wants(&self, event_type: &str) -> bool {
        self.enabled && self.event_types.iter().any(|wanted| wanted == "*" || wanted == event_type)
    }
}

/// A delivery at the head of its endpoint's queue, due now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    pub seq: i64,
    pub message_id: String,
    pub endpoint: EndpointRow,
    pub body: String,
    /// Attempts so far.
    pub attempts: u32,
}

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The receiver's status, when it answered.
    pub status: Option<u16>,
    pub latency_ms: i64,
    /// What went wrong before an answer (timeout, refused, …).
    pub error: Option<String>,
    /// The answer's body, cut at [`RESPONSE_BYTES_MAX`].
    pub response: Option<String>,
}

impl Attempt {
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|status| (200..300).contains(&status))
    }
}

/// What the dispatcher decided after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum After {
    Delivered,
    /// Tried again at this instant.
    Retry(DateTime<Utc>),
    /// No retry is left; the queue moves on.
    GaveUp,
    /// The endpoint is to be turned off (the caller tells the ledger).
    Disable {
        member_id: String,
        endpoint_id: String,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttemptView {
    pub attempt: u32,
    pub at: DateTime<Utc>,
    pub status: Option<u16>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub response: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeliveryView {
    /// The `webhook-id` of every attempt.
    pub delivery_id: String,
    pub endpoint_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    pub attempts: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The log position of the event (none for a test).
    pub position: Option<u64>,
    pub attempt_log: Vec<AttemptView>,
}

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error("the webhook dispatcher's file: {0}")]
    Store(#[from] rusqlite::Error),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the webhook dispatcher's file holds something it cannot read: {0}")]
    Corrupt(String),
}

const SCHEMA: &str = "
    PRAGMA journal_mode = WAL;
    -- NORMAL: a kill -9 loses nothing in WAL mode; a power cut may lose the
    -- last commits, and then the same events are followed again from the
    -- older checkpoint, to the same decisions (at least once, never twice).
    PRAGMA synchronous = NORMAL;
    CREATE TABLE IF NOT EXISTS dispatcher (id INTEGER PRIMARY KEY CHECK (id = 1), position INTEGER NOT NULL);
    INSERT OR IGNORE INTO dispatcher (id, position) VALUES (1, 0);
    CREATE TABLE IF NOT EXISTS endpoints (endpoint_id TEXT NOT NULL, member_id TEXT NOT NULL, url TEXT NOT NULL,
        event_types TEXT NOT NULL, enabled INTEGER NOT NULL, secret_id TEXT NOT NULL, secret_version INTEGER NOT NULL,
        previous_secret_id TEXT, previous_secret_version INTEGER, previous_until TEXT,
        failing_since TEXT, last_success_at TEXT, PRIMARY KEY (member_id, endpoint_id));
    CREATE TABLE IF NOT EXISTS deliveries (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL,
        member_id TEXT NOT NULL, endpoint_id TEXT NOT NULL, event_type TEXT NOT NULL, body TEXT NOT NULL,
        position INTEGER, state TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt_at TEXT,
        created_at TEXT NOT NULL, UNIQUE (member_id, endpoint_id, message_id));
    CREATE INDEX IF NOT EXISTS deliveries_queue ON deliveries (state, member_id, endpoint_id, seq);
    CREATE TABLE IF NOT EXISTS attempts (seq INTEGER NOT NULL, attempt INTEGER NOT NULL, at TEXT NOT NULL,
        status INTEGER, latency_ms INTEGER NOT NULL, error TEXT, response TEXT, PRIMARY KEY (seq, attempt));
";

fn instant_text(instant: DateTime<Utc>) -> String {
    instant.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn instant_of(text: &str) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(error)))
}

pub struct Dispatcher {
    connection: Connection,
    position: u64,
}

const ENDPOINT_COLUMNS: &str = "endpoint_id, member_id, url, event_types, enabled, secret_id, secret_version,
    previous_secret_id, previous_secret_version, previous_until";

fn endpoint_at(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<EndpointRow> {
    let event_types: String = row.get(first + 3)?;
    let previous_id: Option<String> = row.get(first + 7)?;
    let previous_version: Option<i64> = row.get(first + 8)?;
    let previous_until: Option<String> = row.get(first + 9)?;
    let previous_secret = match (previous_id, previous_version, previous_until) {
        (Some(id), Some(version), Some(until)) => Some((id, version, instant_of(&until)?)),
        _ => None,
    };
    Ok(EndpointRow {
        endpoint_id: row.get(first)?,
        member_id: row.get(first + 1)?,
        url: row.get(first + 2)?,
        event_types: serde_json::from_str(&event_types).unwrap_or_default(),
        enabled: row.get(first + 4)?,
        secret: (row.get(first + 5)?, row.get(first + 6)?),
        previous_secret,
    })
}

impl Dispatcher {
    pub fn open(path: &std::path::Path) -> Result<Dispatcher, DispatcherError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(SCHEMA)?;
        let position: i64 =
            connection.query_row("SELECT position FROM dispatcher WHERE id = 1", [], |row| row.get(0))?;
        Ok(Dispatcher { connection, position: position as u64 })
    }

    /// The log position fanned out so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Follows the log to its head: endpoints kept up to date, deliveries
    /// queued. Returns how many deliveries were queued.
    pub fn fan_out(&mut self, ledger: &Ledger) -> Result<u64, DispatcherError> {
        let mut queued = 0;
        loop {
            let page = ledger.reader()?.read_all(self.position, PAGE_EVENTS).map_err(LedgerError::from)?;
            let Some(last) = page.last().map(|event| event.position) else { return Ok(queued) };
            let transaction = self.connection.transaction()?;
            for recorded in &page {
                queued += apply(&transaction, recorded)?;
            }
            transaction.execute("UPDATE dispatcher SET position = ?1 WHERE id = 1", params![last as i64])?;
            transaction.commit()?;
            self.position = last;
        }
    }

    /// The deliveries to send at `now`: the head of each endpoint's queue,
    /// if it is due; at most `limit`.
    pub fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<Due>, DispatcherError> {
        let sql = format!(
            "SELECT d.seq, d.message_id, d.body, d.attempts, {columns}
             FROM (SELECT member_id, endpoint_id, min(seq) AS seq FROM deliveries WHERE state = 'pending'
                   GROUP BY member_id, endpoint_id) AS head
             JOIN deliveries AS d ON d.seq = head.seq
             JOIN endpoints AS e ON e.member_id = d.member_id AND e.endpoint_id = d.endpoint_id
             WHERE e.enabled = 1 AND d.next_attempt_at <= ?1 ORDER BY d.next_attempt_at LIMIT ?2",
            columns = ENDPOINT_COLUMNS
                .split(", ")
                .map(|column| format!("e.{}", column.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut statement = self.connection.prepare_cached(&sql)?;
        let rows = statement.query_map(params![instant_text(now), limit as i64], |row| {
            Ok(Due {
                seq: row.get(0)?,
                message_id: row.get(1)?,
                body: row.get(2)?,
                attempts: row.get(3)?,
                endpoint: endpoint_at(row, 4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The head of one endpoint's queue, if it is due at `now`.
    pub fn due_of(
        &self,
        member_id: &str,
        endpoint_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Due>, DispatcherError> {
        let sql = format!(
            "SELECT d.seq, d.message_id, d.body, d.attempts, {columns}, d.next_attempt_at
             FROM deliveries AS d JOIN endpoints AS e ON e.member_id = d.member_id AND e.endpoint_id = d.endpoint_id
             WHERE d.member_id = ?1 AND d.endpoint_id = ?2 AND d.state = 'pending' AND e.enabled = 1
             ORDER BY d.seq LIMIT 1",
            columns = ENDPOINT_COLUMNS
                .split(", ")
                .map(|column| format!("e.{}", column.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let head = self
            .connection
            .prepare_cached(&sql)?
            .query_row(params![member_id, endpoint_id], |row| {
                let next: Option<String> = row.get(14)?;
                Ok((
                    Due {
                        seq: row.get(0)?,
                        message_id: row.get(1)?,
                        body: row.get(2)?,
                        attempts: row.get(3)?,
                        endpoint: endpoint_at(row, 4)?,
                    },
                    next,
                ))
            })
            .optional()?;
        Ok(head.and_then(|(due, next)| {
            let at = next.as_deref().and_then(|text| instant_of(text).ok());
            at.is_some_and(|at| at <= now).then_some(due)
        }))
    }

    /// Whether `due` is still to be sent as it was read: pending, with the
    /// same attempts (a round that read it before an attempt was recorded
    /// must not send it again), to an endpoint still on and at the same URL.
    pub fn still_due(&self, due: &Due) -> Result<bool, DispatcherError> {
        let row: Option<(String, u32, bool, String)> = self
            .connection
            .prepare_cached(
                "SELECT d.state, d.attempts, e.enabled, e.url FROM deliveries AS d
                 JOIN endpoints AS e ON e.member_id = d.member_id AND e.endpoint_id = d.endpoint_id
                 WHERE d.seq = ?1",
            )?
            .query_row(params![due.seq], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))
            .optional()?;
        Ok(row.is_some_and(|(state, attempts, enabled, url)| {
            state == "pending" && attempts == due.attempts && enabled && url == due.endpoint.url
        }))
    }

    /// Records what an attempt of `due` came to at `now`; `jitter` in
    /// 0..1000 spreads the retry.
    pub fn record(
        &mut self,
        due: &Due,
        attempt: &Attempt,
        now: DateTime<Utc>,
        jitter: u64,
    ) -> Result<After, DispatcherError> {
        let attempts = due.attempts + 1;
        let endpoint = &due.endpoint;
        let transaction = self.connection.transaction()?;
        transaction.execute(
            "INSERT OR REPLACE INTO attempts (seq, attempt, at, status, latency_ms, error, response)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                due.seq,
                attempts,
                instant_text(now),
                attempt.status,
                attempt.latency_ms,
                attempt.error,
                attempt.response
            ],
        )?;
        let key = params![endpoint.member_id, endpoint.endpoint_id];
        let after = if attempt.succeeded() {
            transaction.execute(
                "UPDATE deliveries SET state = 'delivered', attempts = ?2, next_attempt_at = NULL WHERE seq = ?1",
                params![due.seq, attempts],
            )?;
            transaction.execute(
                "UPDATE endpoints SET failing_since = NULL, last_success_at = ?3 WHERE member_id = ?1 AND endpoint_id = ?2",
                params![endpoint.member_id, endpoint.endpoint_id, instant_text(now)],
            )?;
            After::Delivered
        } else {
            transaction.execute(
                "UPDATE endpoints SET failing_since = coalesce(failing_since, ?3) WHERE member_id = ?1 AND endpoint_id = ?2",
                params![endpoint.member_id, endpoint.endpoint_id, instant_text(now)],
            )?;
            let failing_since: String = transaction.query_row(
                "SELECT failing_since FROM endpoints WHERE member_id = ?1 AND endpoint_id = ?2",
                key,
                |row| row.get(0),
            )?;
            let failing_since = instant_of(&failing_since)?;
            let retry = schedule::retry_delay(attempts, jitter)
                .map(|delay| now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero()));
            match retry {
                Some(at) => transaction.execute(
                    "UPDATE deliveries SET attempts = ?2, next_attempt_at = ?3 WHERE seq = ?1",
                    params![due.seq, attempts, instant_text(at)],
                )?,
                None => transaction.execute(
                    "UPDATE deliveries SET state = 'failed', attempts = ?2, next_attempt_at = NULL WHERE seq = ?1",
                    params![due.seq, attempts],
                )?,
            };
            let gone = attempt.status == Some(410);
            if gone || schedule::should_disable(failing_since.timestamp(), now.timestamp()) {
                // The ledger's `WebhookEndpointDisabled` turns it off here
                // when the fan-out reads it. Until then (or if asking the
                // ledger failed) its next failure asks again.
                let reason = if gone {
                    "the receiver answered 410 Gone".to_owned()
                } else {
                    format!("every delivery failed since {}", failing_since.format("%Y-%m-%d %H:%M UTC"))
                };
                After::Disable {
                    member_id: endpoint.member_id.clone(),
                    endpoint_id: endpoint.endpoint_id.clone(),
                    reason,
                }
            } else {
                match retry {
                    Some(at) => After::Retry(at),
                    None => After::GaveUp,
                }
            }
        };
        transaction.commit()?;
        Ok(after)
    }

    pub fn endpoint(&self, member_id: &str, endpoint_id: &str) -> Result<Option<EndpointRow>, DispatcherError> {
        let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE member_id = ?1 AND endpoint_id = ?2");
        Ok(self
            .connection
            .prepare_cached(&sql)?
            .query_row(params![member_id, endpoint_id], |row| endpoint_at(row, 0))
            .optional()?)
    }

    /// An endpoint's deliveries, newest first, with their attempts; at
    /// most `limit` older than `before` (a delivery's `seq`).
    pub fn deliveries(
        &self,
        member_id: &str,
        endpoint_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<DeliveryView>, Option<i64>), DispatcherError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT seq, message_id, event_type, state, attempts, next_attempt_at, created_at, position
             FROM deliveries WHERE member_id = ?1 AND endpoint_id = ?2 AND seq < ?3 ORDER BY seq DESC LIMIT ?4",
        )?;
        let rows = statement.query_map(
            params![member_id, endpoint_id, before.unwrap_or(i64::MAX), (limit + 1) as i64],
            |row| {
                let next: Option<String> = row.get(5)?;
                let created: String = row.get(6)?;
                let position: Option<i64> = row.get(7)?;
                Ok((
                    row.get::<_, i64>(0)?,
                    DeliveryView {
                        delivery_id: row.get(1)?,
                        endpoint_id: endpoint_id.to_owned(),
                        event_type: row.get(2)?,
                        state: row.get(3)?,
                        attempts: row.get(4)?,
                        next_attempt_at: next.as_deref().map(instant_of).transpose()?,
                        created_at: instant_of(&created)?,
                        position: position.map(|position| position as u64),
                        attempt_log: Vec::new(),
                    },
                ))
            },
        )?;
        let mut rows: Vec<(i64, DeliveryView)> = rows.collect::<Result<_, _>>()?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let mut attempts = self.connection.prepare_cached(
            "SELECT attempt, at, status, latency_ms, error, response FROM attempts WHERE seq = ?1 ORDER BY attempt",
        )?;
        for (seq, view) in &mut rows {
            let log = attempts.query_map(params![*seq], |row| {
                let at: String = row.get(1)?;
                Ok(AttemptView {
                    attempt: row.get(0)?,
                    at: instant_of(&at)?,
                    status: row.get(2)?,
                    latency_ms: row.get(3)?,
                    error: row.get(4)?,
                    response: row.get(5)?,
                })
            })?;
            view.attempt_log = log.collect::<Result<_, _>>()?;
        }
        let next = if more { rows.last().map(|(seq, _)| *seq) } else { None };
        Ok((rows.into_iter().map(|(_, view)| view).collect(), next))
    }

    /// Puts a delivery back in its queue to be sent at `now`. Its attempts
    /// go on counting (the log keeps every one): a redelivery that fails
    /// is retried only while the schedule has retries left.
    /// `Ok(false)` when the endpoint has no such delivery.
    pub fn redeliver(
        &mut self,
        member_id: &str,
        endpoint_id: &str,
        message_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, DispatcherError> {
        let changed = self.connection.execute(
            "UPDATE deliveries SET state = 'pending', next_attempt_at = ?4
             WHERE member_id = ?1 AND endpoint_id = ?2 AND message_id = ?3",
            params![member_id, endpoint_id, message_id, instant_text(now)],
        )?;
        Ok(changed == 1)
    }

    /// Queues a `webhook.test` delivery to the endpoint, behind what it
    /// already has to send. Returns its id.
    pub fn enqueue_test(
        &mut self,
        member_id: &str,
        endpoint_id: &str,
        message_id: &str,
        now: DateTime<Utc>,
    ) -> Result<String, DispatcherError> {
        let data = json!({"member_id": member_id, "endpoint_id": endpoint_id,
            "message": "A test delivery from tally: your endpoint receives and verifies webhooks."});
        let body = body(TEST_EVENT_TYPE, message_id, now, data);
        self.connection.execute(
            "INSERT INTO deliveries (message_id, member_id, endpoint_id, event_type, body, position, state, attempts,
                next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, NULL, 'pending', 0, ?6, ?6)",
            params![message_id, member_id, endpoint_id, TEST_EVENT_TYPE, body, instant_text(now)],
        )?;
        Ok(message_id.to_owned())
    }

    /// Deliveries waiting to be sent, all endpoints together.
    pub fn pending(&self) -> Result<u64, DispatcherError> {
        let count: i64 =
            self.connection
                .query_row("SELECT count(*) FROM deliveries WHERE state = 'pending'", [], |row| row.get(0))?;
        Ok(count as u64)
    }
}

/// Applies one event: endpoints from the member's webhook events, and
/// deliveries for the member's endpoints that want it. Only what is
/// delivered, or changes an endpoint, is decoded.
fn apply(transaction: &rusqlite::Transaction<'_>, recorded: &RecordedEvent) -> Result<u64, DispatcherError> {
    let (member_id, event_type) = if let Some(member_id) = recorded.stream_id.strip_prefix("member-") {
        if recorded.event_type.starts_with("Webhook") {
            let event = codec::decode_member(recorded).map_err(LedgerError::from)?;
            keep_endpoints(transaction, member_id, &event)?;
            return Ok(0);
        }
        let Some(event_type) = public_type(&recorded.event_type) else { return Ok(0) };
        (member_id, event_type)
    } else if let Some((member_id, _)) = parse_integration_stream(&recorded.stream_id) {
        if !INTEGRATION_EVENT_TYPES.contains(&recorded.event_type.as_str()) {
            return Ok(0);
        }
        (member_id, "integration")
    } else {
        return Ok(0);
    };
    let endpoints: Vec<EndpointRow> = {
        let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE member_id = ?1");
        let mut statement = transaction.prepare_cached(&sql)?;
        let rows = statement.query_map(params![member_id], |row| endpoint_at(row, 0))?;
        rows.collect::<Result<_, _>>()?
    };
    if !endpoints.iter().any(|endpoint| endpoint.enabled) {
        return Ok(0);
    }
    let (event_type, data) = if event_type == "integration" {
        let (_, integration_id) = parse_integration_stream(&recorded.stream_id).expect("an integration stream");
        let event = codec::decode_integration(recorded).map_err(LedgerError::from)?;
        let Some((event_type, mut data)) = integration_event(integration_id, &event) else { return Ok(0) };
        data["member_id"] = member_id.into();
        (event_type, data)
    } else {
        if !endpoints.iter().any(|endpoint| endpoint.wants(event_type)) {
            return Ok(0);
        }
        let mut data: Map<String, Value> =
            serde_json::from_str(&recorded.payload).map_err(|error| DispatcherError::Corrupt(error.to_string()))?;
        data.remove("type");
        data.insert("member_id".to_owned(), member_id.into());
        (event_type, Value::Object(data))
    };
    let message_id = format!("msg_{}", recorded.event_id.simple());
    let body = body(event_type, &message_id, recorded.recorded_at, data);
    let mut queued = 0;
    let mut insert = transaction.prepare_cached(
        "INSERT OR IGNORE INTO deliveries (message_id, member_id, endpoint_id, event_type, body, position, state,
            attempts, next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7, ?7)",
    )?;
    for endpoint in endpoints.iter().filter(|endpoint| endpoint.wants(event_type)) {
        queued += insert.execute(params![
            message_id,
            member_id,
            endpoint.endpoint_id,
            event_type,
            body,
            recorded.position as i64,
            instant_text(recorded.recorded_at),
        ])? as u64;
    }
    Ok(queued)
}

/// Keeps the endpoints table in step with a member's webhook events;
/// `true` when the event was one of them.
fn keep_endpoints(
    transaction: &rusqlite::Transaction<'_>,
    member_id: &str,
    event: &MemberEvent,
) -> Result<bool, DispatcherError> {
    match event {
        MemberEvent::WebhookEndpointCreated { endpoint_id, config, secret } => {
            transaction.execute(
                "INSERT OR REPLACE INTO endpoints (endpoint_id, member_id, url, event_types, enabled, secret_id,
                    secret_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    endpoint_id,
                    member_id,
                    config.url,
                    serde_json::to_string(&config.event_types).expect("serialises"),
                    config.enabled,
                    secret.credential_id,
                    secret.version
                ],
            )?;
        }
        MemberEvent::WebhookEndpointChanged { endpoint_id, config } => {
            // Turned on again: its failures so far are forgiven.
            transaction.execute(
                "UPDATE endpoints SET url = ?3, event_types = ?4,
                    failing_since = CASE WHEN ?5 AND enabled = 0 THEN NULL ELSE failing_since END, enabled = ?5
                 WHERE member_id = ?1 AND endpoint_id = ?2",
                params![
                    member_id,
                    endpoint_id,
                    config.url,
                    serde_json::to_string(&config.event_types).expect("serialises"),
                    config.enabled
                ],
            )?;
        }
        MemberEvent::WebhookEndpointDisabled { endpoint_id, .. } => {
            transaction.execute(
                "UPDATE endpoints SET enabled = 0 WHERE member_id = ?1 AND endpoint_id = ?2",
                params![member_id, endpoint_id],
            )?;
        }
        MemberEvent::WebhookSecretRotated { endpoint_id, secret, previous_until } => {
            transaction.execute(
                "UPDATE endpoints SET previous_secret_id = secret_id, previous_secret_version = secret_version,
                    previous_until = ?5, secret_id = ?3, secret_version = ?4
                 WHERE member_id = ?1 AND endpoint_id = ?2",
                params![member_id, endpoint_id, secret.credential_id, secret.version, instant_text(*previous_until)],
            )?;
        }
        MemberEvent::WebhookEndpointDeleted { endpoint_id } => {
            transaction.execute(
                "DELETE FROM endpoints WHERE member_id = ?1 AND endpoint_id = ?2",
                params![member_id, endpoint_id],
            )?;
            transaction.execute(
                "UPDATE deliveries SET state = 'failed', next_attempt_at = NULL
                 WHERE member_id = ?1 AND endpoint_id = ?2 AND state = 'pending'",
                params![member_id, endpoint_id],
            )?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_public_type_is_listed_and_named_by_a_stored_type() {
        let mapped: std::collections::BTreeSet<&str> = [
            "UsageRecorded",
            "UsageReversed",
            "CreditsGranted",
            "CreditsDebited",
            "CreditsExpired",
            "SubscriptionStarted",
            "SubscriptionPlanChanged",
            "SubscriptionDowngradeScheduled",
            "SubscriptionRenewed",
            "SubscriptionPastDue",
            "SubscriptionCanceled",
            "SubscriptionReactivated",
            "InvoiceIssued",
            "InvoiceVoided",
            "InvoiceMarkedUncollectible",
            "PaymentSucceeded",
            "PaymentFailed",
            "QueryExecuted",
            "AlertTriggered",
            "AlertResolved",
        ]
        .into_iter()
        .filter_map(public_type)
        .collect();
        let listed: std::collections::BTreeSet<&str> =
            EVENT_TYPES.iter().map(|(name, _)| *name).filter(|name| !name.starts_with("integration.")).collect();
        assert_eq!(mapped, listed);
    }

    #[test]
    fn every_public_type_is_listed_once() {
        let mut names: Vec<&str> = EVENT_TYPES.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count);
        assert!(is_event_type("*") && is_event_type("usage.recorded") && !is_event_type("usage.deleted"));
    }
}
