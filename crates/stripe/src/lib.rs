//! tally's Stripe edge: what happens to a webhook request before the ledger sees it.
//!
//! Layout:
//! - [`signature`] verifies the `Stripe-Signature` header over the raw body bytes (HMAC-SHA256, any matching `v1`,
//!   constant-time comparison, two-sided timestamp tolerance), without parsing the body. It is tested against every
//!   vector in `fixtures/stripe/signature-vectors.json`.
//! - [`event`] reads a verified body into the few facts tally maps (subscription, invoice and checkout session
//!   facts), through async-stripe's typed events first and a tolerant raw-JSON reader when those reject the shape, as
//!   they do for accounts pinned to older Stripe API versions.
//!
//! - [`mapping`] turns those facts into a ledger [`StripeCommand`](tally_ledger::domain::StripeCommand), or says
//!   why the event is ignored or cannot be processed.
//! - [`outbound`] creates Stripe customers and subscriptions through async-stripe, against a configurable base URL.
//! - [`outbox`] follows the log and sends a Stripe-managed member's overage to Stripe as invoice items.
//!
//! Invariant: apart from [`outbound`], nothing here does I/O or reads a clock; the caller passes `now` in. Verification always comes before
//! parsing, and a genuine event that cannot be read is an error value, never a panic.

pub mod event;
pub mod mapping;
pub mod outbound;
pub mod outbox;
pub mod signature;

pub use event::{
    ChargeFacts, CheckoutFacts, CreditNoteFacts, EventObject, InvoiceFacts, InvoiceLineFacts, ParseError, ParsedBy,
    ParsedEvent, RefundFacts, SubscriptionFacts, parse,
};
pub use mapping::{Mapped, map};
pub use outbound::{CustomerFacts, CustomerPage, OutboundError, StripeApi};
pub use outbox::{Outbox, OutboxError, OutboxReport};
pub use signature::{DEFAULT_TOLERANCE_S, SignatureError, SignatureHeader, parse_header, sign, verify};
