//! The projector abstraction: what a read model declares (name, version,
//! the event types it handles, its tables) and how it is fed (`apply`, one
//! event at a time, inside the runner's transaction).
//!
//! A projector never names its tables directly. Every generation of a read
//! model lives in its own tables, `{table}_v{version}_g{generation}`, so a
//! rebuild can fill new tables beside the live ones. SQL is written as
//! templates with `{table}` placeholders, and [`ProjectorTx::statement`]
//! renders them for the generation being written.
//!
//! A projector may also keep what it works on in memory for the rest of a
//! batch ([`ProjectorTx::batch_state`]): rows read once per batch rather
//! than once per event, and written once per batch, when the runner calls
//! [`ProjectorTx::finish`] before it moves the checkpoint in the same
//! transaction. That changes no result (the rows at the end of the batch are
//! the same) and keeps exactly-once: a batch that fails is rolled back with
//! its batch state dropped unwritten.

use std::any::Any;
use std::cell::{RefCell, RefMut};
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rusqlite::{CachedStatement, Connection};
use tally_ledger::domain::{IntegrationEvent, MemberEvent};
use tally_ledger::store::RecordedEvent;

use crate::error::ProjectionError;

/// One table of a projector, as created for each generation.
#[derive(Clone, Copy, Debug)]
pub struct TableSpec {
    /// The name without its version and generation suffix; SQL templates
    /// refer to it as `{name}`.
    pub name: &'static str,
    /// The body of `CREATE TABLE`: column definitions and the primary key.
    /// Tables are created `STRICT, WITHOUT ROWID`.
    pub columns: &'static str,
    /// The primary key's columns, in order: digests read rows in this order.
    pub key: &'static str,
    /// Secondary indexes as (name suffix, column list).
    pub indexes: &'static [(&'static str, &'static str)],
    /// The read model whose digest covers this table. Internal tables (per
    /// grant state, a member's time zone) belong to the read model they
    /// serve, so that a digest covers everything a build decides.
    pub read_model: &'static str,
}

/// An event from a member stream, decoded once and handed to every
/// projector that handles its type.
#[derive(Clone, Copy, Debug)]
pub struct ProjectedEvent<'event> {
    pub recorded: &'event RecordedEvent,
    /// The stream's member id (`member-{member_id}`).
    pub member_id: &'event str,
    pub event: &'event MemberEvent,
    /// When it took effect: the metadata's `occurred_at` (the caller's time
    /// for a command, the instant it fell due for an effect of time), or
    /// `recorded_at` when absent.
    pub occurred_at: DateTime<Utc>,
}

impl ProjectedEvent<'_> {
    pub fn position(&self) -> u64 {
        self.recorded.position
    }

    /// The error for an event that contradicts what the read model holds.
    pub fn inconsistent(&self, projector: &'static str, reason: impl Into<String>) -> ProjectionError {
        ProjectionError::Inconsistent { projector, position: self.position(), reason: reason.into() }
    }
}

/// An event from an integration stream (`integration-{member}/{integration}`),
/// decoded once and handed to every projector that handles its type.
#[derive(Clone, Copy, Debug)]
pub struct IntegrationProjected<'event> {
    pub recorded: &'event RecordedEvent,
    pub member_id: &'event str,
    pub integration_id: &'event str,
    pub event: &'event IntegrationEvent,
    /// When it took effect, as for [`ProjectedEvent::occurred_at`].
    pub occurred_at: DateTime<Utc>,
}

impl IntegrationProjected<'_> {
    pub fn position(&self) -> u64 {
        self.recorded.position
    }
}

/// A projector turns member events (and, if it asks for them, the events of
/// members' integrations) into rows of its own tables.
///
/// `apply` must be a function of the event and of the projector's own
/// tables only: no clock, no randomness, no other read model. That is what
/// makes a rebuild equal to the incremental build (and the digests
/// comparable). It must not re-run ledger rules either: every figure comes
/// from event fields.
pub trait Projector: Send + Sync {
    /// Stable and unique: checkpoints and generations are kept under it.
    fn name(&self) -> &'static str;
    /// Bump it when `apply` or the tables change: the read model is then
    /// rebuilt on start-up, and served again once the rebuild caught up.
    fn version(&self) -> u32;
    /// The event types `apply` wants; others are skipped without decoding
    /// (the checkpoint still moves past them).
    fn handles(&self) -> &'static [&'static str];
    fn tables(&self) -> &'static [TableSpec];
    /// Apply one event, writing through `tx`. An error rolls back the whole
    /// batch, rows and checkpoint alike.
    fn apply(&self, tx: &ProjectorTx<'_>, event: &ProjectedEvent<'_>) -> Result<(), ProjectionError>;

    /// Apply one event of an integration stream whose type `handles` names;
    /// projectors of member streams only keep this default.
    fn apply_integration(
        &self,
        _tx: &ProjectorTx<'_>,
        _event: &IntegrationProjected<'_>,
    ) -> Result<(), ProjectionError> {
        Ok(())
    }

    /// The read models this projector's tables make up, in declaration order.
    fn read_models(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        for table in self.tables() {
            if !names.contains(&table.read_model) {
                names.push(table.read_model);
            }
        }
        names
    }
}

/// The physical name of a table of one generation.
pub(crate) fn physical_name(table: &str, version: u32, generation: u64) -> String {
    format!("{table}_v{version}_g{generation}")
}

/// The suffix every table of one generation ends with. Generations are
/// numbered from one counter per file, so the suffix names one generation
/// of one projector.
pub(crate) fn generation_suffix(version: u32, generation: u64) -> String {
    format!("_v{version}_g{generation}")
}

/// Replaces every `{table}` placeholder of `template` with the physical
/// name of that table in one generation.
pub(crate) fn render(template: &str, tables: &[TableSpec], version: u32, generation: u64) -> String {
    let mut sql = template.to_owned();
    for table in tables {
        let placeholder = format!("{{{}}}", table.name);
        if sql.contains(&placeholder) {
            sql = sql.replace(&placeholder, &physical_name(table.name, version, generation));
        }
    }
    sql
}

/// Rendered SQL of one generation, by template.
pub(crate) type RenderedSql = RefCell<HashMap<&'static str, String>>;

/// What a projector holds in memory during one batch, written by
/// [`BatchState::flush`] at the end of the batch.
pub(crate) trait BatchState: Any {
    /// Writes everything the batch changed through `tx`. Called once, after
    /// the batch's last event and before the checkpoint moves.
    fn flush(&mut self, tx: &ProjectorTx<'_>) -> Result<(), ProjectionError>;
}

/// The write side of one projector generation inside the runner's open
/// transaction, for one batch.
pub struct ProjectorTx<'conn> {
    connection: &'conn Connection,
    tables: &'static [TableSpec],
    version: u32,
    generation: u64,
    rendered: &'conn RenderedSql,
    batch_state: RefCell<Option<Box<dyn BatchState>>>,
}

impl<'conn> ProjectorTx<'conn> {
    pub(crate) fn new(
        connection: &'conn Connection,
        tables: &'static [TableSpec],
        version: u32,
        generation: u64,
        rendered: &'conn RenderedSql,
    ) -> ProjectorTx<'conn> {
        ProjectorTx { connection, tables, version, generation, rendered, batch_state: RefCell::new(None) }
    }

    /// The projector's state for the rest of this batch, made on first use.
    /// A projector uses one state type; holding the state while calling
    /// `batch_state` again panics (a programmer error).
    pub(crate) fn batch_state<State: BatchState + Default>(&self) -> RefMut<'_, State> {
        let mut slot = self.batch_state.borrow_mut();
        if slot.is_none() {
            *slot = Some(Box::new(State::default()));
        }
        RefMut::map(slot, |slot| {
            let state: &mut dyn Any = slot.as_deref_mut().expect("made above");
            state.downcast_mut::<State>().expect("a projector keeps one type of batch state")
        })
    }

    /// Writes the batch state, if the batch made one. The runner calls it
    /// once, after the batch's last event, inside the projector's savepoint.
    pub(crate) fn finish(&self) -> Result<(), ProjectionError> {
        let state = self.batch_state.borrow_mut().take();
        match state {
            Some(mut state) => state.flush(self),
            None => Ok(()),
        }
    }

    /// A prepared (and cached) statement for a SQL template whose `{table}`
    /// placeholders name this projector's tables.
    pub fn statement(&self, template: &'static str) -> Result<CachedStatement<'conn>, ProjectionError> {
        let mut rendered = self.rendered.borrow_mut();
        let sql =
            rendered.entry(template).or_insert_with(|| render(template, self.tables, self.version, self.generation));
        Ok(self.connection.prepare_cached(sql)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLES: &[TableSpec] = &[
        TableSpec { name: "invoices", columns: "", key: "", indexes: &[], read_model: "invoices" },
        TableSpec { name: "invoice_lines", columns: "", key: "", indexes: &[], read_model: "invoices" },
    ];

    #[test]
    fn templates_name_the_tables_of_one_generation() {
        let sql = render("SELECT * FROM {invoices} JOIN {invoice_lines} USING (invoice_id)", TABLES, 2, 17);
        assert_eq!(sql, "SELECT * FROM invoices_v2_g17 JOIN invoice_lines_v2_g17 USING (invoice_id)");
    }

    #[test]
    fn a_generation_suffix_ends_every_physical_name() {
        assert!(physical_name("invoice_lines", 1, 3).ends_with(&generation_suffix(1, 3)));
    }
}
