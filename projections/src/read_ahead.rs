//! Reading the log ahead of a build, on a thread of its own.
//!
//! A build spends a good share of its time reading events and decoding
//! their payloads. A [`ReadAhead`] does both on its own thread, one batch
//! ahead of the writer, which meanwhile applies and commits the previous
//! batch: on two cores the two halves overlap. It hands over exactly what
//! the writer would have read itself (`read_all` from the build's
//! checkpoint, batch after batch, gapless), only earlier; a batch shorter
//! than asked for means the log's head was reached then, and ends it.

use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;

use tally_ledger::codec::{self, CodecError};
use tally_ledger::domain::integration::parse_integration_stream;
use tally_ledger::domain::{IntegrationEvent, MemberEvent};
use tally_ledger::store::{EventReader, READ_PAGE_SIZE_MAX, RecordedEvent};

use crate::error::ProjectionError;

/// The stream prefix of member streams.
pub(crate) const MEMBER_STREAM_PREFIX: &str = "member-";

/// An event of a projected stream, decoded: a member's, or one of a
/// member's integrations'. Other streams (the catalog, Stripe) are not
/// projected.
pub(crate) enum Decoded {
    Member(MemberEvent),
    Integration(IntegrationEvent),
}

/// Whether an event's stream is projected at all.
pub(crate) fn projected_stream(stream_id: &str) -> bool {
    stream_id.starts_with(MEMBER_STREAM_PREFIX) || parse_integration_stream(stream_id).is_some()
}

/// Decodes an event of a projected stream by its stream's kind.
pub(crate) fn decode(recorded: &RecordedEvent) -> Result<Decoded, CodecError> {
    if recorded.stream_id.starts_with(MEMBER_STREAM_PREFIX) {
        codec::decode_member(recorded).map(Decoded::Member)
    } else {
        codec::decode_integration(recorded).map(Decoded::Integration)
    }
}

/// Batches read and waiting to be taken: none, so that a build holds at
/// most two batches of `build_batch_events_max` events (the one applied,
/// the one read meanwhile), which still overlaps reading and applying.
const BATCHES_WAITING_MAX: usize = 0;

/// A run of events from the log, with the events of projected streams
/// decoded where a projector may want them.
pub(crate) struct EventBatch {
    pub(crate) events: Vec<RecordedEvent>,
    /// One per event: `None` when not decoded yet (not of a projected
    /// stream, or of a type no projector of the build handles), `Some(None)`
    /// when it does not decode (the error is produced again where it
    /// matters).
    pub(crate) decoded: Vec<Option<Option<Decoded>>>,
}

impl EventBatch {
    /// Events with nothing decoded yet.
    pub(crate) fn undecoded(events: Vec<RecordedEvent>) -> EventBatch {
        let decoded = (0..events.len()).map(|_| None).collect();
        EventBatch { events, decoded }
    }
}

/// Reads up to `batch_events_max` events after `after_position`, in pages
/// of at most [`READ_PAGE_SIZE_MAX`], and decodes the events of projected
/// streams whose type is in `decoded_types`.
pub(crate) fn read_batch(
    reader: &EventReader,
    after_position: u64,
    batch_events_max: usize,
    decoded_types: &[&'static str],
) -> Result<EventBatch, ProjectionError> {
    read_pages(reader, after_position, batch_events_max, READ_PAGE_SIZE_MAX, decoded_types)
}

fn read_pages(
    reader: &EventReader,
    after_position: u64,
    batch_events_max: usize,
    page_events_max: usize,
    decoded_types: &[&'static str],
) -> Result<EventBatch, ProjectionError> {
    let mut events: Vec<RecordedEvent> = Vec::with_capacity(batch_events_max.min(page_events_max));
    let mut after = after_position;
    while events.len() < batch_events_max {
        let wanted = (batch_events_max - events.len()).min(page_events_max);
        let page = reader.read_all(after, wanted)?;
        let at_head = page.len() < wanted;
        if let Some(last) = page.last() {
            after = last.position;
        }
        events.extend(page);
        if at_head {
            break;
        }
    }
    let decoded = events
        .iter()
        .map(|event| {
            let wanted = projected_stream(&event.stream_id) && decoded_types.contains(&event.event_type.as_str());
            wanted.then(|| decode(event).ok())
        })
        .collect();
    Ok(EventBatch { events, decoded })
}

/// A thread reading one build's batches ahead. Dropping it stops the
/// thread (after the read it is in, if any) and waits for it.
pub(crate) struct ReadAhead {
    /// Where the next batch starts: after this position.
    next_after: u64,
    batch_events_max: usize,
    batches: Option<Receiver<Result<EventBatch, ProjectionError>>>,
    /// Applied batches handed back, to be freed on the read-ahead thread
    /// (tens of thousands of strings: not the writer's time).
    applied: Sender<EventBatch>,
    thread: Option<JoinHandle<()>>,
}

impl ReadAhead {
    /// Starts reading after `after_position`, on a reader of its own (a
    /// new connection that hides what `events` hides).
    pub(crate) fn start(
        events: &EventReader,
        after_position: u64,
        batch_events_max: usize,
        decoded_types: Vec<&'static str>,
    ) -> Result<ReadAhead, ProjectionError> {
        let reader = events.reopen()?;
        let (sender, batches) = sync_channel(BATCHES_WAITING_MAX);
        let (applied, to_free) = channel();
        let thread = std::thread::Builder::new()
            .name("tally-read-ahead".to_owned())
            .spawn(move || {
                read_until_head(&reader, after_position, batch_events_max, &decoded_types, &sender, &to_free)
            })
            .map_err(|error| ProjectionError::Runner(format!("cannot start the read-ahead thread: {error}")))?;
        Ok(ReadAhead {
            next_after: after_position,
            batch_events_max,
            batches: Some(batches),
            applied,
            thread: Some(thread),
        })
    }

    /// Hands an applied batch back, to be freed by the read-ahead thread
    /// (here, if that thread has ended).
    pub(crate) fn free(&self, batch: EventBatch) {
        let _ = self.applied.send(batch);
    }

    /// Whether the next batch this reads is the one asked for.
    pub(crate) fn reads(&self, after_position: u64, batch_events_max: usize) -> bool {
        self.next_after == after_position && self.batch_events_max == batch_events_max && self.thread.is_some()
    }

    /// The next batch; after a short batch (the head) or an error, this
    /// read-ahead is spent and [`ReadAhead::reads`] answers false.
    pub(crate) fn next(&mut self) -> Result<EventBatch, ProjectionError> {
        let received = self.batches.as_ref().map(Receiver::recv);
        let batch = match received {
            Some(Ok(batch)) => batch,
            _ => Err(ProjectionError::Runner("the read-ahead thread stopped".to_owned())),
        };
        match &batch {
            Ok(batch) if batch.events.len() == self.batch_events_max => {
                self.next_after = batch.events.last().map_or(self.next_after, |last| last.position);
            }
            _ => self.stop(),
        }
        batch
    }

    fn stop(&mut self) {
        // Dropping the receiver makes the thread's next send fail, which
        // ends it.
        self.batches = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_until_head(
    reader: &EventReader,
    mut after_position: u64,
    batch_events_max: usize,
    decoded_types: &[&'static str],
    sender: &SyncSender<Result<EventBatch, ProjectionError>>,
    to_free: &Receiver<EventBatch>,
) {
    loop {
        while let Ok(applied) = to_free.try_recv() {
            drop(applied);
        }
        let batch = read_batch(reader, after_position, batch_events_max, decoded_types);
        let next_after = match &batch {
            Ok(batch) if batch.events.len() == batch_events_max => batch.events.last().map(|last| last.position),
            _ => None,
        };
        if sender.send(batch).is_err() {
            return;
        }
        match next_after {
            Some(position) => after_position = position,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};
    use tally_ledger::domain::{MemberCommand, MemberProfile};
    use tally_ledger::{Ledger, LedgerOptions, ManualClock, Request};

    use super::*;
    use std::path::Path;

    /// A log of `members` registrations (and the catalog's nothing).
    fn log_of_registrations(path: &Path, members: usize) {
        let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()));
        let ledger = Ledger::open(path, LedgerOptions::default(), clock).unwrap();
        for member in 0..members {
            let profile =
                MemberProfile { time_zone: "UTC".to_owned(), currency: "USD".to_owned(), stripe_customer_id: None };
            ledger.execute(&format!("m{member}"), Request::new(MemberCommand::Register(profile), "test")).unwrap();
        }
        ledger.shutdown();
    }

    fn positions(batch: &EventBatch) -> Vec<u64> {
        batch.events.iter().map(|event| event.position).collect()
    }

    #[test]
    fn a_batch_spans_pages_gaplessly_and_ends_short_at_the_head() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("events.db");
        log_of_registrations(&path, 7);
        let reader = EventReader::open(&path).unwrap();
        assert_eq!(reader.head().unwrap().position, 7);

        let full = read_pages(&reader, 1, 4, 3, &["MemberRegistered"]).unwrap();
        assert_eq!(positions(&full), [2, 3, 4, 5]);
        assert!(
            full.decoded
                .iter()
                .all(|decoded| matches!(decoded, Some(Some(Decoded::Member(MemberEvent::MemberRegistered { .. })))))
        );

        let at_head = read_pages(&reader, 5, 4, 3, &[]).unwrap();
        assert_eq!(positions(&at_head), [6, 7]);
        assert!(at_head.decoded.iter().all(Option::is_none), "types no projector wants are left undecoded");
    }

    #[test]
    fn a_read_ahead_hands_over_what_the_writer_would_read_then_stops() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("events.db");
        log_of_registrations(&path, 5);
        let events = EventReader::open(&path).unwrap();
        let mut read_ahead = ReadAhead::start(&events, 0, 2, vec!["MemberRegistered"]).unwrap();
        let mut read = Vec::new();
        while read_ahead.reads(read.last().copied().unwrap_or(0), 2) {
            let batch = read_ahead.next().unwrap();
            read.extend(positions(&batch));
            read_ahead.free(batch);
        }
        assert_eq!(read, [1, 2, 3, 4, 5]);
    }
}
