//! tally-ledger: the pure ledger core and its append-only SQLite event store.
//!
//! # Layout
//!
//! - [`domain`]: the deciders. `decide(state, command, context)` and
//!   `evolve(state, event)` for the plan catalog and for members hold every
//!   credit rule; they do no I/O and read no clock.
//! - [`store`]: the event log on SQLite: gapless positions, per-stream
//!   versions, a SHA-256 hash chain, triggers that make it append-only,
//!   idempotency records and the indexes the writer needs.
//! - [`codec`]: events to stored rows and back, with upcasting.
//! - [`service`]: the [`Ledger`](service::Ledger), a single writer with
//!   group commit that loads state, decides, appends with the expected
//!   version and answers callers once their batch is durable.
//! - [`import`]: an exported log written back exactly as it was stored,
//!   with the writer's indexes, in one transaction.
//!
//! The crate knows nothing of HTTP, actix or Stripe.

pub mod codec;
pub mod domain;
pub mod import;
pub mod service;
pub mod store;

pub use service::{
    Clock, Executed, Idempotency, Ledger, LedgerError, LedgerOptions, ManualClock, Request, SystemClock,
};
