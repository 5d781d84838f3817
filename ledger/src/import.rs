//! Importing an exported log (`tally events import`) into an event log file.
//!
//! The store checks each event and writes it exactly as it was stored
//! ([`Batch::import_event`]); what this adds is meaning. The writer keeps two
//! indexes beside the events — usage ids, unique per member for ever, and
//! each member's next due instant for the scheduler — and both derive from
//! what the payloads say, which the store does not read. An import writes
//! them in the same transaction as the events, so a log that was imported
//! rejects a reused usage id and renews on time like one that was written
//! command by command. Payloads of member and catalog events must decode, so
//! that a file which chains but carries no tally events is refused too.
//!
//! Everything is one transaction: dropping an [`Import`] without
//! [`Import::commit`], or any error, leaves the log as it was.

use std::collections::{BTreeSet, HashMap};

use crate::codec;
use crate::domain::{CATALOG_STREAM, MemberEvent, MemberState, next_due};
use crate::service::{LedgerError, relink_stripe_customer};
use crate::store::{Batch, EventStore, Head, Imported, RecordedEvent, StoreError};

/// The prefix of member streams, `member-{member_id}`.
const MEMBER_STREAM_PREFIX: &str = "member-";
/// Events read per page when folding a member's stream for its due instant.
const STREAM_PAGE_SIZE: usize = 1_000;

/// What an import did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImportReport {
    /// Events the log already held (same position, same hash).
    pub already_present: u64,
    /// Events appended.
    pub appended: u64,
    /// The log's head after the import.
    pub head: Head,
}

/// An import in progress: one transaction on the log's write connection.
pub struct Import<'store> {
    batch: Batch<'store>,
    /// Member streams that received events, whose due instant is refreshed
    /// at commit.
    member_streams: BTreeSet<String>,
    /// The Stripe customer each imported member stream names so far.
    customers: HashMap<String, Option<String>>,
    report: ImportReport,
}

impl std::fmt::Debug for Import<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Import").field("report", &self.report).finish_non_exhaustive()
    }
}

impl<'store> Import<'store> {
    /// Starts the import's transaction (waiting for another writer, such as
    /// a running server, up to the store's busy timeout).
    pub fn begin(store: &'store mut EventStore) -> Result<Import<'store>, LedgerError> {
        let batch = store.begin_batch()?;
        let head = batch.head();
        Ok(Import {
            batch,
            member_streams: BTreeSet::new(),
            customers: HashMap::new(),
            report: ImportReport { already_present: 0, appended: 0, head },
        })
    }

    /// Checks and imports the next event of the file (see
    /// [`Batch::import_event`]), and indexes it if it was appended.
    ///
    /// An appended event whose payload is not a tally event is refused even
    /// when its hash chains; the error leaves the whole import unwritten.
    pub fn add(&mut self, event: &RecordedEvent) -> Result<Imported, LedgerError> {
        let imported = self.batch.import_event(event)?;
        match imported {
            Imported::AlreadyPresent => self.report.already_present += 1,
            Imported::Appended => {
                self.report.appended += 1;
                if event.stream_id.starts_with(MEMBER_STREAM_PREFIX) {
                    let member_event = codec::decode_member(event)?;
                    self.index_usage(&event.stream_id, &member_event, event.position)?;
                    self.member_streams.insert(event.stream_id.clone());
                } else if event.stream_id == CATALOG_STREAM {
                    codec::decode_catalog(event)?;
                } else if event.stream_id.starts_with(crate::domain::integration::INTEGRATION_STREAM_PREFIX) {
                    codec::decode_integration(event)?;
                }
            }
        }
        Ok(imported)
    }

    fn index_usage(&mut self, stream_id: &str, event: &MemberEvent, position: u64) -> Result<(), LedgerError> {
        match event {
            MemberEvent::UsageRecorded { usage_id, credits, .. } => {
                self.batch.record_usage(stream_id, usage_id, position, credits.0)?;
            }
            MemberEvent::UsageReversed { usage_id, .. } => {
                self.batch.mark_usage_reversed(stream_id, usage_id, position)?;
            }
            MemberEvent::MemberRegistered { stripe_customer_id, .. }
            | MemberEvent::MemberProfileChanged { stripe_customer_id, .. } => {
                let current = self.customers.entry(stream_id.to_owned()).or_default();
                relink_stripe_customer(&mut self.batch, stream_id, current, stripe_customer_id.as_deref())?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Refreshes the due instant of every member that received events, and
    /// commits. Nothing of the import is visible before this returns.
    pub fn commit(mut self) -> Result<ImportReport, LedgerError> {
        for stream_id in std::mem::take(&mut self.member_streams) {
            let state = self.fold_stream(&stream_id)?;
            self.batch.set_due(&stream_id, next_due(&state))?;
        }
        self.report.head = self.batch.head();
        self.batch.commit()?;
        Ok(self.report)
    }

    fn fold_stream(&mut self, stream_id: &str) -> Result<MemberState, LedgerError> {
        let mut state = MemberState::default();
        loop {
            let page = self.batch.read_stream(stream_id, state.version + 1, STREAM_PAGE_SIZE)?;
            for recorded in &page {
                let event = codec::decode_member(recorded)?;
                // A re-chained file can hold events that each decode but
                // contradict one another (a part of a grant never granted):
                // the fold's own checks stop there, and the file is refused.
                let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state.apply(&event)));
                if let Err(panic) = applied {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                        .unwrap_or_else(|| "a broken invariant".to_owned());
                    return Err(StoreError::ImportRefused {
                        position: recorded.position,
                        reason: format!("the stream {stream_id} contradicts itself: {message}"),
                    }
                    .into());
                }
            }
            if page.len() < STREAM_PAGE_SIZE {
                return Ok(state);
            }
        }
    }
}
