//! The alert reactor (DESIGN.md §11): it follows the log from its own
//! checkpoint like a projector, evaluates each member's rules after each of
//! the member's appends (and when time alone may change a condition), and
//! appends `AlertTriggered` / `AlertResolved` through the ledger.
//!
//! Exactly once, by a transactional outbox in its own SQLite file
//! (`alerts.sqlite` in the data directory, not a read model: a projection
//! rebuild does not touch it):
//!
//! 1. A page of events is evaluated in memory. The episodes it opens and
//!    closes, the members' [`Watch`]es and the checkpoint are committed in
//!    one transaction, the commands to send in the `outbox` table.
//! 2. The outbox is drained: each command goes to the ledger with an
//!    idempotency key from (member, rule, subject, episode, action), and
//!    its row is deleted once the ledger took it.
//!
//! A crash before 1 commits redoes the page from the same checkpoint, and
//! the same events give the same episodes; a crash between 1 and 2 leaves
//! the rows to send at the next start; a crash in 2 resends a row, which
//! the key (and the member's own record of its episodes, which a raise of
//! an episode already opened never passes) turns into nothing. So an
//! alert fires once per episode, and none is missed.
//!
//! A member's appends are runs of consecutive events of its stream with the
//! same `recorded_at` and idempotency key: a command's events, with the
//! effects of time run before it, are one append and share both. (Two
//! commands without keys in the same microsecond are evaluated together.)

use crate::alerts::{self, Transition, Watch, local_day};
use crate::rules::RuleSet;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tally_ledger::domain::{
    IntegrationState, IntegrationStatus, MemberCommand, MemberEvent, MemberState, parse_integration_stream,
};
use tally_ledger::service::{Idempotency, Request};
use tally_ledger::store::RecordedEvent;
use tally_ledger::{Ledger, LedgerError, codec};

/// Events read per page (one transaction each).
const PAGE_EVENTS: usize = 500;
/// Members (and integrations) whose state is kept between pages; beyond
/// it the cache is emptied and states are read again from the log.
const CACHE_MAX: usize = 20_000;
/// Outbox rows sent per round.
const DRAIN_ROWS: usize = 200;
/// The actor of the reactor's commands.
pub const ACTOR: &str = "alerts";
const MEMBER_PREFIX: &str = "member-";

#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    #[error("the alert reactor's file: {0}")]
    Store(#[from] rusqlite::Error),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the alert reactor's file holds something it cannot read: {0}")]
    Corrupt(String),
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReactorReport {
    pub events_read: u64,
    pub members_evaluated: u64,
    /// Episodes opened and closed, by rule (sent to the ledger this pass).
    pub raised: BTreeMap<String, u64>,
    pub resolved: BTreeMap<String, u64>,
    /// The position handled so far.
    pub position: u64,
}

impl ReactorReport {
    /// Adds a later pass's counts; its position is the later one.
    pub fn absorb(&mut self, other: ReactorReport) {
        self.events_read += other.events_read;
        self.members_evaluated += other.members_evaluated;
        for (rule, count) in other.raised {
            *self.raised.entry(rule).or_default() += count;
        }
        for (rule, count) in other.resolved {
            *self.resolved.entry(rule).or_default() += count;
        }
        self.position = other.position;
    }
}

const SCHEMA: &str = "
    PRAGMA journal_mode = WAL;
    -- NORMAL: a kill -9 loses nothing in WAL mode; a power cut may lose the
    -- last commits, and then the same events are followed again from the
    -- older checkpoint, to the same decisions (at least once, never twice).
    PRAGMA synchronous = NORMAL;
    CREATE TABLE IF NOT EXISTS reactor (id INTEGER PRIMARY KEY CHECK (id = 1), position INTEGER NOT NULL);
    INSERT OR IGNORE INTO reactor (id, position) VALUES (1, 0);
    CREATE TABLE IF NOT EXISTS watches (member_id TEXT PRIMARY KEY, watch TEXT NOT NULL, due_at TEXT);
    CREATE INDEX IF NOT EXISTS watches_due ON watches (due_at) WHERE due_at IS NOT NULL;
    CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, member_id TEXT NOT NULL,
        transition TEXT NOT NULL);
";

pub struct AlertReactor {
    connection: Connection,
    defaults: RuleSet,
    position: u64,
    /// Members' states as of `position`.
    members: HashMap<String, MemberState>,
    /// Integrations' states as of `position`, by stream id.
    integrations: HashMap<String, IntegrationState>,
    watches: HashMap<String, Watch>,
}

/// What one page or sweep changed, before it is committed.
#[derive(Default)]
struct Pending {
    dirty: BTreeMap<String, Option<DateTime<Utc>>>,
    outbox: Vec<(String, Transition)>,
    members_evaluated: u64,
}

fn instant_text(instant: DateTime<Utc>) -> String {
    instant.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

impl AlertReactor {
    /// Opens (or creates) the reactor's file. `defaults` are the
    /// installation's rules; members' overrides apply on top.
    pub fn open(path: &Path, defaults: RuleSet) -> Result<AlertReactor, ReactorError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(SCHEMA)?;
        let position: i64 = connection.query_row("SELECT position FROM reactor WHERE id = 1", [], |row| row.get(0))?;
        Ok(AlertReactor {
            connection,
            defaults,
            position: position as u64,
            members: HashMap::new(),
            integrations: HashMap::new(),
            watches: HashMap::new(),
        })
    }

    /// The log position evaluated so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Commands decided but not yet taken by the ledger.
    pub fn outbox_len(&self) -> Result<u64, ReactorError> {
        let count: i64 = self.connection.query_row("SELECT count(*) FROM outbox", [], |row| row.get(0))?;
        Ok(count as u64)
    }

    /// Sends what an earlier pass left in the outbox, then follows the log
    /// to its head.
    pub fn run_once(&mut self, ledger: &Ledger) -> Result<ReactorReport, ReactorError> {
        let result = self.follow(ledger, true);
        self.forget_on_error(result)
    }

    /// A pass that failed may have moved the cached states past its
    /// checkpoint: they are read again from the log.
    fn forget_on_error<T>(&mut self, result: Result<T, ReactorError>) -> Result<T, ReactorError> {
        if result.is_err() {
            self.members.clear();
            self.integrations.clear();
            self.watches.clear();
        }
        result
    }

    /// Follows the log to its head and commits what it decided, sending
    /// nothing: what a process that stops right after its commits leaves
    /// behind (for tests of a crash between the two steps).
    pub fn evaluate_only(&mut self, ledger: &Ledger) -> Result<ReactorReport, ReactorError> {
        let result = self.follow(ledger, false);
        self.forget_on_error(result)
    }

    fn follow(&mut self, ledger: &Ledger, send: bool) -> Result<ReactorReport, ReactorError> {
        let mut report = if send { self.drain(ledger)? } else { ReactorReport::default() };
        loop {
            let mut page = ledger.reader()?.read_all(self.position, PAGE_EVENTS).map_err(LedgerError::from)?;
            // A full page may end inside an append: its last run waits for
            // the next page (unless it is the whole page).
            if page.len() == PAGE_EVENTS {
                let tail = page.last().expect("a full page").clone();
                let run = page.iter().rev().take_while(|event| same_append(event, &tail)).count();
                if run < page.len() {
                    page.truncate(page.len() - run);
                }
            }
            let Some(last) = page.last().map(|event| event.position) else { break };
            let mut pending = Pending::default();
            self.evaluate_page(ledger, &page, &mut pending)?;
            self.commit(pending, Some(last), &mut report)?;
            report.events_read += page.len() as u64;
            if send {
                report.absorb(self.drain(ledger)?);
            }
            self.trim_cache();
        }
        report.position = self.position;
        Ok(report)
    }

    /// Evaluates, at `now`, the members whose conditions time alone may
    /// have changed by then (a grant entering its expiry window, a new
    /// local day). Call it once [`AlertReactor::run_once`] reached the head.
    pub fn sweep(&mut self, ledger: &Ledger, now: DateTime<Utc>) -> Result<ReactorReport, ReactorError> {
        let result = self.sweep_due(ledger, now);
        self.forget_on_error(result)
    }

    fn sweep_due(&mut self, ledger: &Ledger, now: DateTime<Utc>) -> Result<ReactorReport, ReactorError> {
        let mut report = ReactorReport::default();
        loop {
            let due: Vec<String> = {
                let mut statement = self.connection.prepare_cached(
                    "SELECT member_id FROM watches WHERE due_at IS NOT NULL AND due_at <= ?1 ORDER BY due_at LIMIT 256",
                )?;
                let rows = statement.query_map(params![instant_text(now)], |row| row.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            if due.is_empty() {
                break;
            }
            let mut pending = Pending::default();
            for member_id in &due {
                self.load_member(ledger, member_id, self.position + 1)?;
                self.load_watch(member_id)?;
                self.evaluate_member(member_id, now, &mut pending);
            }
            self.commit(pending, None, &mut report)?;
            report.absorb(self.drain(ledger)?);
            self.trim_cache();
        }
        report.position = self.position;
        Ok(report)
    }

    fn evaluate_page(
        &mut self,
        ledger: &Ledger,
        page: &[RecordedEvent],
        pending: &mut Pending,
    ) -> Result<(), ReactorError> {
        let mut start = 0;
        while start < page.len() {
            let first = &page[start];
            let end = start + page[start..].iter().take_while(|event| same_append(event, first)).count();
            let append = &page[start..end];
            start = end;
            if let Some(member_id) = first.stream_id.strip_prefix(MEMBER_PREFIX) {
                self.member_append(ledger, member_id, append, pending)?;
            } else if let Some((member_id, _)) = parse_integration_stream(&first.stream_id) {
                self.integration_append(ledger, member_id, append, pending)?;
            }
        }
        Ok(())
    }

    fn member_append(
        &mut self,
        ledger: &Ledger,
        member_id: &str,
        append: &[RecordedEvent],
        pending: &mut Pending,
    ) -> Result<(), ReactorError> {
        let first = &append[0];
        self.load_member(ledger, member_id, first.position)?;
        self.load_watch(member_id)?;
        let state = self.members.get_mut(member_id).expect("loaded");
        let watch = self.watches.get_mut(member_id).expect("loaded");
        let mut only_alerts = true;
        for recorded in append {
            let event = codec::decode_member(recorded).map_err(LedgerError::from)?;
            let used_before = state.totals.used;
            state.apply(&event);
            let used = state.totals.used.minus(used_before).0;
            let occurred_at = recorded.metadata.occurred_at.unwrap_or(recorded.recorded_at);
            watch.add_use(local_day(state, occurred_at), used, local_day(state, recorded.recorded_at));
            match &event {
                MemberEvent::PaymentFailed { invoice_id, .. } => {
                    watch.failed_invoices.insert(invoice_id.clone());
                }
                MemberEvent::AlertTriggered { .. } | MemberEvent::AlertResolved { .. } => continue,
                _ => {}
            }
            only_alerts = false;
        }
        if !only_alerts {
            self.evaluate_member(member_id, first.recorded_at, pending);
        }
        Ok(())
    }

    fn integration_append(
        &mut self,
        ledger: &Ledger,
        member_id: &str,
        append: &[RecordedEvent],
        pending: &mut Pending,
    ) -> Result<(), ReactorError> {
        let first = &append[0];
        let stream_id = first.stream_id.clone();
        if !self.integrations.contains_key(&stream_id) {
            let state = integration_before(ledger, &stream_id, first.position)?;
            self.integrations.insert(stream_id.clone(), state);
        }
        let state = self.integrations.get_mut(&stream_id).expect("loaded");
        for recorded in append {
            state.apply(&codec::decode_integration(recorded).map_err(LedgerError::from)?, recorded.recorded_at);
        }
        let failing = state.live && state.status() == IntegrationStatus::Failing;
        let integration_id = parse_integration_stream(&stream_id).expect("an integration stream").1.to_owned();
        self.load_member(ledger, member_id, first.position)?;
        self.load_watch(member_id)?;
        let watch = self.watches.get_mut(member_id).expect("loaded");
        let changed = if failing {
            watch.failing_integrations.insert(integration_id)
        } else {
            watch.failing_integrations.remove(&integration_id)
        };
        if changed {
            self.evaluate_member(member_id, first.recorded_at, pending);
        }
        Ok(())
    }

    /// Evaluates a loaded member at `now` and records what changed.
    fn evaluate_member(&mut self, member_id: &str, now: DateTime<Utc>, pending: &mut Pending) {
        let state = &self.members[member_id];
        let watch = self.watches.get_mut(member_id).expect("a loaded watch");
        let rules = rules_of(&self.defaults, state);
        let findings = alerts::evaluate(&rules, state, watch, now);
        let transitions = watch.step(findings, state, now);
        let due = alerts::next_due(&rules, state, watch, now);
        pending.members_evaluated += 1;
        pending.dirty.insert(member_id.to_owned(), due);
        pending.outbox.extend(transitions.into_iter().map(|transition| (member_id.to_owned(), transition)));
    }

    /// The member's state as of just before `position` (cached when the
    /// reactor followed it there).
    fn load_member(&mut self, ledger: &Ledger, member_id: &str, position: u64) -> Result<(), ReactorError> {
        if !self.members.contains_key(member_id) {
            let state = member_before(ledger, member_id, position)?;
            self.members.insert(member_id.to_owned(), state);
        }
        Ok(())
    }

    fn load_watch(&mut self, member_id: &str) -> Result<(), ReactorError> {
        if self.watches.contains_key(member_id) {
            return Ok(());
        }
        let text: Option<String> = self
            .connection
            .prepare_cached("SELECT watch FROM watches WHERE member_id = ?1")?
            .query_row(params![member_id], |row| row.get(0))
            .optional()?;
        let watch = match text {
            Some(text) => serde_json::from_str(&text).map_err(|error| ReactorError::Corrupt(error.to_string()))?,
            // A member this file never saw: its episodes so far are the
            // stream's, so numbering goes on from them.
            None => self.members.get(member_id).map(Watch::seeded).unwrap_or_default(),
        };
        self.watches.insert(member_id.to_owned(), watch);
        Ok(())
    }

    fn commit(
        &mut self,
        pending: Pending,
        position: Option<u64>,
        report: &mut ReactorReport,
    ) -> Result<(), ReactorError> {
        let transaction = self.connection.transaction()?;
        {
            let mut upsert = transaction.prepare_cached(
                "INSERT INTO watches (member_id, watch, due_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (member_id) DO UPDATE SET watch = excluded.watch, due_at = excluded.due_at",
            )?;
            for (member_id, due) in &pending.dirty {
                let watch = serde_json::to_string(&self.watches[member_id]).expect("a watch serialises");
                upsert.execute(params![member_id, watch, due.map(instant_text)])?;
            }
            let mut insert =
                transaction.prepare_cached("INSERT INTO outbox (member_id, transition) VALUES (?1, ?2)")?;
            for (member_id, transition) in &pending.outbox {
                insert.execute(params![member_id, serde_json::to_string(transition).expect("serialises")])?;
            }
            if let Some(position) = position {
                transaction.execute("UPDATE reactor SET position = ?1 WHERE id = 1", params![position as i64])?;
            }
        }
        transaction.commit()?;
        if let Some(position) = position {
            self.position = position;
        }
        report.members_evaluated += pending.members_evaluated;
        Ok(())
    }

    /// Sends the outbox to the ledger, oldest first. A storage failure of
    /// the ledger stops the round, to be tried again.
    fn drain(&mut self, ledger: &Ledger) -> Result<ReactorReport, ReactorError> {
        let mut report = ReactorReport { position: self.position, ..ReactorReport::default() };
        loop {
            let rows: Vec<(i64, String, String)> = {
                let mut statement = self
                    .connection
                    .prepare_cached("SELECT seq, member_id, transition FROM outbox ORDER BY seq LIMIT ?1")?;
                let rows = statement
                    .query_map(params![DRAIN_ROWS as i64], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            if rows.is_empty() {
                return Ok(report);
            }
            for (seq, member_id, text) in rows {
                let transition: Transition =
                    serde_json::from_str(&text).map_err(|error| ReactorError::Corrupt(error.to_string()))?;
                let (action, command) = match &transition {
                    Transition::Raise { notice } => ("raise", MemberCommand::RaiseAlert(notice.clone())),
                    Transition::Resolve { notice } => ("resolve", MemberCommand::ResolveAlert(notice.clone())),
                };
                let notice = transition.notice();
                let key = format!("{member_id}/{}/{action}", notice.alert_id());
                let idempotency = Idempotency {
                    scope: "alert-reactor".to_owned(),
                    fingerprint: Sha256::digest(key.as_bytes()).into(),
                    key,
                    status: 200,
                };
                let request = Request::new(command, ACTOR).with_idempotency(idempotency);
                match ledger.execute(&member_id, request) {
                    Ok(_) | Err(LedgerError::IdempotencyKeyReused) => {}
                    Err(LedgerError::Rejected(error)) => {
                        tracing::warn!(%member_id, alert_id = %notice.alert_id(), %error, "the ledger refused an alert");
                    }
                    Err(error) => return Err(error.into()),
                }
                let counts = if action == "raise" { &mut report.raised } else { &mut report.resolved };
                *counts.entry(notice.rule.clone()).or_default() += 1;
                self.connection.execute("DELETE FROM outbox WHERE seq = ?1", params![seq])?;
            }
        }
    }

    fn trim_cache(&mut self) {
        if self.members.len() + self.integrations.len() > CACHE_MAX {
            self.members.clear();
            self.integrations.clear();
            self.watches.clear();
        }
    }
}

/// Whether two events belong to one append: one stream, one
/// `recorded_at`, one idempotency key.
fn same_append(event: &RecordedEvent, other: &RecordedEvent) -> bool {
    event.stream_id == other.stream_id
        && event.recorded_at == other.recorded_at
        && event.metadata.idempotency_key == other.metadata.idempotency_key
}

/// The rules in force for a member: the installation's defaults with the
/// member's overrides, or the defaults alone if the overrides no longer
/// fit them (the API checked them against the defaults of their day).
pub fn rules_of(defaults: &RuleSet, state: &MemberState) -> RuleSet {
    match &state.alert_rules {
        Some(overrides) => defaults.apply(overrides).unwrap_or_else(|error| {
            tracing::warn!(field = %error.field, "a member's alert overrides no longer apply; using the defaults");
            defaults.clone()
        }),
        None => defaults.clone(),
    }
}

/// A stream's state folded from its events before `position`.
fn fold_before<S: Default>(
    ledger: &Ledger,
    stream_id: &str,
    position: u64,
    mut apply: impl FnMut(&mut S, &RecordedEvent) -> Result<(), LedgerError>,
) -> Result<S, ReactorError> {
    let reader = ledger.reader()?;
    let mut state = S::default();
    for recorded in reader.stream_events(stream_id, None, 1_000) {
        let recorded = recorded.map_err(LedgerError::from)?;
        if recorded.position >= position {
            break;
        }
        apply(&mut state, &recorded)?;
    }
    Ok(state)
}

fn member_before(ledger: &Ledger, member_id: &str, position: u64) -> Result<MemberState, ReactorError> {
    fold_before(ledger, &format!("{MEMBER_PREFIX}{member_id}"), position, |state: &mut MemberState, recorded| {
        state.apply(&codec::decode_member(recorded)?);
        Ok(())
    })
}

fn integration_before(ledger: &Ledger, stream_id: &str, position: u64) -> Result<IntegrationState, ReactorError> {
    fold_before(ledger, stream_id, position, |state: &mut IntegrationState, recorded| {
        state.apply(&codec::decode_integration(recorded)?, recorded.recorded_at);
        Ok(())
    })
}
