//! Turning domain events into stored rows and back.
//!
//! Stored bytes are never rewritten (the hash chain covers them), so a change
//! to an event's shape bumps its `schema_version` and adds a step to
//! [`upcast`], which lifts old payloads to the current shape when they are
//! read. Today every event is at version 1.

use crate::domain::{CatalogEvent, IntakeEvent, IntegrationEvent, MemberEvent};
use crate::store::RecordedEvent;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The schema version every event is written with.
pub const SCHEMA_VERSION_CURRENT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A payload written by a newer tally: upgrade this binary.
    #[error(
        "event at position {position} has schema version {schema_version}, newer than this build's {SCHEMA_VERSION_CURRENT}"
    )]
    SchemaTooNew { position: u64, schema_version: u32 },
    /// A payload that does not decode: the log was damaged or written by
    /// something else. Stop and run `tally audit verify`.
    #[error("event at position {position} ({event_type}) does not decode: {reason}")]
    Undecodable { position: u64, event_type: String, reason: String },
}

/// An event ready for the store: type, schema version and JSON payload.
pub struct Encoded {
    pub event_type: &'static str,
    pub schema_version: u32,
    pub payload: String,
}

fn encode<E: Serialize>(event_type: &'static str, event: &E) -> Encoded {
    let payload = serde_json::to_string(event).expect("domain events always serialise");
    Encoded { event_type, schema_version: SCHEMA_VERSION_CURRENT, payload }
}

pub fn encode_member(event: &MemberEvent) -> Encoded {
    encode(event.event_type(), event)
}

pub fn encode_catalog(event: &CatalogEvent) -> Encoded {
    encode(event.event_type(), event)
}

pub fn encode_intake(event: &IntakeEvent) -> Encoded {
    encode(event.event_type(), event)
}

pub fn encode_integration(event: &IntegrationEvent) -> Encoded {
    encode(event.event_type(), event)
}

/// Lift a payload stored at `schema_version` to the current shape. Each
/// future version adds one step here (`1 → 2`, `2 → 3`, …) and never touches
/// the stored row.
pub fn upcast(recorded: &RecordedEvent) -> Result<serde_json::Value, CodecError> {
    let undecodable = |reason: String| CodecError::Undecodable {
        position: recorded.position,
        event_type: recorded.event_type.clone(),
        reason,
    };
    if recorded.schema_version > SCHEMA_VERSION_CURRENT {
        return Err(CodecError::SchemaTooNew { position: recorded.position, schema_version: recorded.schema_version });
    }
    if recorded.schema_version == 0 {
        return Err(undecodable("schema version 0 does not exist".to_owned()));
    }
    let payload: serde_json::Value =
        serde_json::from_str(&recorded.payload).map_err(|error| undecodable(error.to_string()))?;
    let found_type = payload.get("type").and_then(serde_json::Value::as_str);
    if found_type != Some(recorded.event_type.as_str()) {
        return Err(undecodable(format!("payload type {found_type:?} differs from the row's event type")));
    }
    Ok(payload)
}

/// An event that names its own type (the row's `event_type`).
trait Typed {
    fn event_type(&self) -> &'static str;
}

impl Typed for MemberEvent {
    fn event_type(&self) -> &'static str {
        MemberEvent::event_type(self)
    }
}

impl Typed for CatalogEvent {
    fn event_type(&self) -> &'static str {
        CatalogEvent::event_type(self)
    }
}

impl Typed for IntegrationEvent {
    fn event_type(&self) -> &'static str {
        IntegrationEvent::event_type(self)
    }
}

impl Typed for IntakeEvent {
    fn event_type(&self) -> &'static str {
        IntakeEvent::event_type(self)
    }
}

/// A payload at the current schema version decodes straight from its text
/// (one pass, no intermediate `Value` tree: rebuilds and member loads spend
/// their time here). Anything else — an older version to upcast, or a
/// payload that does not decode or names another type — takes the long way,
/// which also words the error.
fn decode<E: DeserializeOwned + Typed>(recorded: &RecordedEvent) -> Result<E, CodecError> {
    if recorded.schema_version == SCHEMA_VERSION_CURRENT
        && let Ok(event) = serde_json::from_str::<E>(&recorded.payload)
        && event.event_type() == recorded.event_type
    {
        return Ok(event);
    }
    let payload = upcast(recorded)?;
    serde_json::from_value(payload).map_err(|error| CodecError::Undecodable {
        position: recorded.position,
        event_type: recorded.event_type.clone(),
        reason: error.to_string(),
    })
}

pub fn decode_member(recorded: &RecordedEvent) -> Result<MemberEvent, CodecError> {
    decode(recorded)
}

pub fn decode_catalog(recorded: &RecordedEvent) -> Result<CatalogEvent, CodecError> {
    decode(recorded)
}

pub fn decode_intake(recorded: &RecordedEvent) -> Result<IntakeEvent, CodecError> {
    decode(recorded)
}

pub fn decode_integration(recorded: &RecordedEvent) -> Result<IntegrationEvent, CodecError> {
    decode(recorded)
}
