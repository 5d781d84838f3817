//! Every limit of the domain, named with its unit last. Requests beyond them
//! are `validation_failed` naming the field; with these bounds no derived
//! value (a proration in `i128`, an overage line) can overflow `i64`.

use chrono::Duration;

/// Credit amounts in commands: grants, usage, debits, reservations.
pub const COMMAND_CREDITS_MAX: i64 = 1_000_000_000;
/// Plan credit fields: `monthly_credits`, `max_credits`, `limit_credits`.
pub const PLAN_CREDITS_MAX: i64 = 1_000_000_000;
/// Prices, in minor units.
pub const PRICE_MINOR_MAX: i64 = 1_000_000_000_000;
/// The overage price of one credit, in minor units.
pub const UNIT_PRICE_MINOR_MAX: i64 = 1_000_000;
pub const PRIORITY_MAX: u8 = 100;
pub const QUANTITY_MAX: i64 = 1_000_000_000;
pub const RATE_LIMIT_PER_MINUTE_MAX: u32 = 1_000_000;
/// How far in the past a caller may date usage (`occurred_at`).
pub const OCCURRED_AT_PAST_MAX: Duration = Duration::days(7);
/// How far in the future a caller may date usage, for clock skew.
pub const OCCURRED_AT_FUTURE_MAX: Duration = Duration::minutes(5);
/// The longest query execution a settlement may report: a day.
pub const QUERY_DURATION_MS_MAX: i64 = 86_400_000;
pub const RESERVATION_TIMEOUT_DEFAULT_S: i64 = 600;
pub const RESERVATION_TIMEOUT_MAX_S: i64 = 86_400;
/// Identifiers chosen by callers: member ids, plan ids, usage ids, metrics.
pub const ID_LENGTH_MAX: usize = 128;
/// Free text: plan names, reasons.
pub const TEXT_LENGTH_MAX: usize = 500;
/// The most due instants one member may process in one decision: ten years
/// of monthly periods with expiries and timeouts on each. More means a bug.
/// How far ahead a caller may date a grant's expiry or start: beyond it an
/// instant is a typo, and the store keeps years 1–9999 only.
pub const FUTURE_INSTANT_YEARS_MAX: u32 = 100;
pub const DUE_STEPS_MAX: usize = 100_000;
/// Items of one Stripe subscription tally reads (Stripe allows 20).
pub const STRIPE_SUBSCRIPTION_ITEMS_MAX: usize = 100;
/// Lines of one Stripe invoice tally records.
pub const STRIPE_INVOICE_LINES_MAX: usize = 1_000;
/// Refunds one Stripe refund event names (a charge embeds up to 100).
pub const STRIPE_REFUNDS_MAX: usize = 100;
/// Instants from Stripe (event `created`, periods) lie in these years.
pub const STRIPE_YEAR_MIN: i32 = 1970;
pub const STRIPE_YEAR_MAX: i32 = 9000;
/// An alert's figures, a member's alert-rule overrides: small JSON objects.
pub const ALERT_JSON_BYTES_MAX: usize = 4_096;
/// Webhook endpoints one member may have.
pub const WEBHOOK_ENDPOINTS_MAX: usize = 20;
/// Event types one endpoint may name.
pub const WEBHOOK_EVENT_TYPES_MAX: usize = 64;
/// An endpoint's URL, in bytes.
pub const WEBHOOK_URL_BYTES_MAX: usize = 2_048;
