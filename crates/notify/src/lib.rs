//! tally's outbound notices (DESIGN.md §11), following the log like a
//! projector. So far:
//!
//! - [`signature`]: webhook signatures as the Standard Webhooks spec
//!   writes them (`webhook-id`, `webhook-timestamp`, `webhook-signature:
//!   v1,<base64 HMAC-SHA256 of id.timestamp.body>`), with two secrets
//!   signing during a rotation, and the verification a receiver does;
//! - [`schedule`]: when a failed delivery is tried again, and when an
//!   endpoint that keeps failing is disabled;
//! - [`rules`]: the alert rules, their installation defaults and a
//!   member's overrides, checked;
//! - [`alerts`]: when the rules' conditions hold, a pure function, and
//!   how they become episodes;
//! - [`reactor`]: the alert reactor, which follows the log and appends
//!   the episodes exactly once;
//! - [`webhooks`]: which events endpoints hear of, and the dispatcher's
//!   durable per-endpoint queues with their delivery log.

pub mod alerts;
pub mod reactor;
pub mod rules;
pub mod schedule;
pub mod signature;
pub mod webhooks;
