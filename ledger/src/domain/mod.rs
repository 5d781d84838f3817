//! The pure domain: catalog and member deciders, their events and commands.
//! Nothing here does I/O or reads a clock.

pub mod amount;
pub mod catalog;
pub mod error;
pub mod intake;
pub mod integration;
pub mod limits;
pub mod member;
pub mod validate;

pub use amount::{Credits, MinorUnits, Overflow};
pub use catalog::*;
pub use error::DomainError;
pub use intake::{IntakeEvent, STRIPE_INTAKE_STREAM};
pub use integration::{
    ApiUsage, CredentialRef, IntegrationCommand, IntegrationEvent, IntegrationState, IntegrationStatus, TestSource,
    integration_stream, parse_integration_stream,
};
pub use member::*;
