//! `tally events export | import`: the log as NDJSON, one event per line,
//! carrying every stored byte the hash chain covers.
//!
//! The payload and the metadata are JSON text inside a JSON string, exactly
//! as stored, rather than parsed objects: re-serialising an object may
//! reorder keys or respell numbers, and then the hashes could no longer be
//! recomputed from the file. `recorded_at` is the stored text too, and the
//! hash is lowercase hex. Anyone can re-verify an export with the formula of
//! DESIGN.md §4 (`tally_ledger::store::chain_hash`) without the database.

use crate::data_dir::DataDir;
use anyhow::{Context, Result, anyhow, bail};
use chrono::NaiveDateTime;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use tally_ledger::import::Import;
use tally_ledger::store::{
    EventMetadata, EventReader, EventStore, RECORDED_AT_FORMAT, RecordedEvent, StoreOptions, format_recorded_at,
};
use uuid::Uuid;

/// Events read from the log per page while exporting.
const EXPORT_PAGE_EVENTS: usize = 1_000;
/// Longest line an import reads: a payload at the store's limit (1 MiB),
/// escaped, with room to spare. A longer line is not an event tally wrote.
const IMPORT_LINE_BYTES_MAX: u64 = 8 * 1024 * 1024;

#[derive(Subcommand)]
pub enum EventsCommand {
    /// Write events as NDJSON on stdout, one per line, with position, hash
    /// and the exact stored payload and metadata.
    Export(ExportArgs),
    /// Append the events of an NDJSON export into this data directory's log
    /// (created if missing). The log must be empty or hold the same events
    /// at the positions the file shares with it; every hash is verified, and
    /// a file that does not chain is refused with nothing written.
    Import(ImportArgs),
}

#[derive(Args)]
pub struct ExportArgs {
    /// Only events after this position.
    #[arg(long, value_name = "POS", default_value_t = 0)]
    after: u64,
    /// Only events of this stream (`catalog`, `member-{id}`, …).
    #[arg(long, value_name = "STREAM")]
    stream: Option<String>,
}

#[derive(Args)]
pub struct ImportArgs {
    /// The NDJSON file, or `-` for stdin.
    file: PathBuf,
}

/// One line of an export.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedEvent {
    pub position: u64,
    pub stream_id: String,
    pub version: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub event_id: Uuid,
    /// As stored: RFC 3339, UTC, six fractional digits.
    pub recorded_at: String,
    /// The stored payload JSON, byte for byte.
    pub payload: String,
    /// The stored metadata JSON, byte for byte.
    pub metadata: String,
    /// SHA-256 chain hash, lowercase hex.
    pub hash: String,
}

impl From<&RecordedEvent> for ExportedEvent {
    fn from(event: &RecordedEvent) -> ExportedEvent {
        ExportedEvent {
            position: event.position,
            stream_id: event.stream_id.clone(),
            version: event.version,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            event_id: event.event_id,
            recorded_at: format_recorded_at(event.recorded_at),
            payload: event.payload.clone(),
            metadata: event.metadata_json.clone(),
            hash: hex::encode(event.hash),
        }
    }
}

impl ExportedEvent {
    /// The event as the store holds it; refuses fields the store would not
    /// have written.
    pub fn into_recorded(self) -> Result<RecordedEvent> {
        let recorded_at = NaiveDateTime::parse_from_str(&self.recorded_at, RECORDED_AT_FORMAT)
            .ok()
            .map(|instant| instant.and_utc())
            .filter(|instant| format_recorded_at(*instant) == self.recorded_at)
            .ok_or_else(|| {
                anyhow!("recorded_at {:?} is not in the stored form 2026-01-31T23:59:59.000000Z", self.recorded_at)
            })?;
        let metadata: EventMetadata =
            serde_json::from_str(&self.metadata).map_err(|error| anyhow!("metadata is not event metadata: {error}"))?;
        let hash = hex::decode(&self.hash)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| anyhow!("hash {:?} is not 64 hex digits", self.hash))?;
        Ok(RecordedEvent {
            position: self.position,
            stream_id: self.stream_id,
            version: self.version,
            event_type: self.event_type,
            schema_version: self.schema_version,
            event_id: self.event_id,
            payload: self.payload,
            metadata,
            metadata_json: self.metadata,
            recorded_at,
            hash,
        })
    }
}

pub fn run(data_dir: &Path, command: EventsCommand) -> Result<()> {
    match command {
        EventsCommand::Export(args) => export(&DataDir::existing(data_dir)?, &args),
        EventsCommand::Import(args) => import(&DataDir::new(data_dir), &args.file),
    }
}

fn export(data_dir: &DataDir, args: &ExportArgs) -> Result<()> {
    let reader = EventReader::open(&data_dir.events())?;
    let events: Box<dyn Iterator<Item = Result<RecordedEvent, _>>> = match &args.stream {
        Some(stream_id) => Box::new(
            reader
                .stream_events(stream_id, None, EXPORT_PAGE_EVENTS)
                .filter(|event| event.as_ref().map_or(true, |event| event.position > args.after)),
        ),
        None => Box::new(reader.catch_up(args.after, EXPORT_PAGE_EVENTS)),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut exported: u64 = 0;
    let mut last_position = None;
    for event in events {
        let event = event?;
        let mut line = serde_json::to_string(&ExportedEvent::from(&event)).expect("an exported event serialises");
        line.push('\n');
        match out.write_all(line.as_bytes()) {
            Ok(()) => {}
            // The reader went away (`| head`): not an error of the export.
            Err(error) if error.kind() == ErrorKind::BrokenPipe => return Ok(()),
            Err(error) => return Err(error).context("cannot write to stdout"),
        }
        exported += 1;
        last_position = Some(event.position);
    }
    match out.flush() {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::BrokenPipe => return Ok(()),
        Err(error) => return Err(error).context("cannot write to stdout"),
    }
    match last_position {
        Some(last) => eprintln!("exported {exported} events, through position {last}"),
        None => eprintln!("exported no events (nothing after position {})", args.after),
    }
    Ok(())
}

fn import(data_dir: &DataDir, file: &Path) -> Result<()> {
    let input: Box<dyn Read> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?)
    };
    let source = if file == Path::new("-") { "stdin".to_owned() } else { file.display().to_string() };
    let created_dir = !data_dir.root().exists();
    let created_log = !data_dir.events().exists();
    data_dir.create()?;
    let result = import_into(data_dir, BufReader::new(input), &source);
    if result.is_err() {
        remove_created(data_dir, created_dir, created_log);
    }
    let report = result?;
    println!(
        "imported {} events ({} already present); the log's head is position {}, hash {}",
        report.appended,
        report.already_present,
        report.head.position,
        report.head.hash_hex()
    );
    Ok(())
}

fn import_into(
    data_dir: &DataDir,
    mut input: impl BufRead,
    source: &str,
) -> Result<tally_ledger::import::ImportReport> {
    let mut store = EventStore::open(&data_dir.events(), StoreOptions::default())?;
    let mut import = Import::begin(&mut store)?;
    let mut line = Vec::new();
    let mut line_number: u64 = 0;
    loop {
        line.clear();
        let read = input
            .by_ref()
            .take(IMPORT_LINE_BYTES_MAX + 1)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read {source}"))?;
        if read == 0 {
            break;
        }
        line_number += 1;
        if line.len() as u64 > IMPORT_LINE_BYTES_MAX {
            bail!("{source} line {line_number}: longer than {IMPORT_LINE_BYTES_MAX} bytes, not an event");
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let event = serde_json::from_slice::<ExportedEvent>(&line)
            .map_err(|error| anyhow!("not an event: {error}"))
            .and_then(ExportedEvent::into_recorded)
            .with_context(|| format!("{source} line {line_number}"))?;
        import.add(&event).with_context(|| format!("{source} line {line_number}"))?;
    }
    Ok(import.commit()?)
}

/// Undoes what a failed import created, so that it leaves nothing behind.
fn remove_created(data_dir: &DataDir, created_dir: bool, created_log: bool) {
    if created_log {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = data_dir.events().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(path));
        }
    }
    if created_dir {
        let _ = std::fs::remove_dir(data_dir.root());
    }
}
