//! The events of a member stream (`member-{member_id}`), version 1.
//!
//! Each event says everything its consumers need: a projection or an audit
//! never has to re-run a rule to know which grant paid for what.

use crate::domain::amount::{Credits, MinorUnits};
use crate::domain::catalog::PlanTerms;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub type Timestamp = DateTime<Utc>;

/// Where a grant's credits came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantSource {
    MonthlyAllocation,
    Rollover,
    Purchase,
    Promotional,
    Refund,
    Adjustment,
}

impl GrantSource {
    /// Credits that expire or were free burn before credits paid for.
    pub fn default_priority(self) -> u8 {
        match self {
            GrantSource::Rollover => 10,
            GrantSource::MonthlyAllocation => 20,
            GrantSource::Promotional => 30,
            GrantSource::Refund | GrantSource::Adjustment => 40,
            GrantSource::Purchase => 50,
        }
    }

    pub fn default_category(self) -> GrantCategory {
        match self {
            GrantSource::Promotional => GrantCategory::Promotional,
            _ => GrantCategory::Paid,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GrantSource::MonthlyAllocation => "monthly_allocation",
            GrantSource::Rollover => "rollover",
            GrantSource::Purchase => "purchase",
            GrantSource::Promotional => "promotional",
            GrantSource::Refund => "refund",
            GrantSource::Adjustment => "adjustment",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantCategory {
    /// Burns first among equals: free credit goes before credit paid for.
    Promotional,
    Paid,
}

/// A part of an amount taken from (or held on) one grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantPart {
    pub grant_id: String,
    pub amount: Credits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Trialing,
    Active,
    PastDue,
    Canceled,
}

impl SubscriptionStatus {
    pub const ALL: [SubscriptionStatus; 4] = [
        SubscriptionStatus::Trialing,
        SubscriptionStatus::Active,
        SubscriptionStatus::PastDue,
        SubscriptionStatus::Canceled,
    ];

    /// The status as stored and answered (its serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Canceled => "canceled",
        }
    }
}

/// Who owns billing periods, fees and invoices of a subscription.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Billing {
    /// tally renews, prorates and issues invoices itself.
    #[default]
    Tally,
    /// Stripe owns periods and invoices; tally follows its webhooks.
    Stripe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    Released,
    Expired,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceLineKind {
    Fee,
    Proration,
    Purchase,
    Overage,
    /// What a Stripe invoice's total holds beyond its lines (discounts,
    /// taxes, credit applied), so that the lines always sum to the total.
    Adjustment,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLine {
    pub kind: InvoiceLineKind,
    pub description: String,
    pub quantity: i64,
    pub unit_amount: MinorUnits,
    pub amount: MinorUnits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryStatus {
    Succeeded,
    Failed,
}

/// One execution of an integration's saved query, charged by a settlement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryExecution {
    pub integration_id: String,
    pub query_id: String,
    pub status: QueryStatus,
    pub duration_ms: i64,
    pub rows: i64,
    /// Bytes of the source's answer (0 when not measured).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub bytes: i64,
    /// Served from the result cache.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache_hit: bool,
    /// The problem code of a failed execution (`integration_timeout`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// The source's count of API calls against its allowance, when its
    /// answer gave one (Salesforce's `Sforce-Limit-Info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_usage: Option<crate::domain::integration::ApiUsage>,
}

/// An alert of a member's rules (DESIGN.md §11) as the alert reactor
/// raises or resolves it. One `(rule, subject)` has numbered episodes: an
/// episode opens once and closes once, and its number never comes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertNotice {
    /// `low_balance`, `usage_spike`, …
    pub rule: String,
    /// What the alert is about within the member, for rules that can fire
    /// for several things at once: the integration, the invoice, the grant,
    /// the webhook endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// From 1, per `(rule, subject)`.
    pub episode: u32,
    /// The figures that made the condition true (or false again): a small
    /// JSON object of numbers, ids and instants; never a secret.
    pub figures: serde_json::Value,
}

impl AlertNotice {
    /// `rule` or `rule:subject`: what has episodes.
    pub fn key(&self) -> String {
        alert_key(&self.rule, self.subject.as_deref())
    }

    /// `rule:episode` or `rule:subject:episode`: one episode, unique in the
    /// member.
    pub fn alert_id(&self) -> String {
        format!("{}:{}", self.key(), self.episode)
    }
}

pub fn alert_key(rule: &str, subject: Option<&str>) -> String {
    match subject {
        Some(subject) => format!("{rule}:{subject}"),
        None => rule.to_owned(),
    }
}

/// A member's outbound webhook endpoint (DESIGN.md §11), as its events
/// describe it. The signing secret is in the vault; the log has its
/// reference (id, version, keyed fingerprint), never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEndpointConfig {
    pub url: String,
    /// `["*"]` or event type names (`usage.recorded`, …).
    pub event_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub enabled: bool,
}

fn is_zero_i64(value: &i64) -> bool {
    *value == 0
}

/// What a grant is before it exists: the part of `CreditsGranted` a caller
/// chooses. Kept whole in `CreditsGrantScheduled` until it falls due.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantTerms {
    pub source: GrantSource,
    pub category: GrantCategory,
    pub amount: Credits,
    pub priority: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the member paid for a purchase, in the member's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<MinorUnits>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum MemberEvent {
    MemberRegistered {
        member_id: String,
        time_zone: String,
        currency: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stripe_customer_id: Option<String>,
    },
    /// The whole profile after the change.
    MemberProfileChanged {
        time_zone: String,
        currency: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stripe_customer_id: Option<String>,
    },

    SubscriptionStarted {
        terms: PlanTerms,
        status: SubscriptionStatus,
        billing: Billing,
        period_start: Timestamp,
        period_end: Timestamp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stripe_subscription_id: Option<String>,
    },
    /// An upgrade, in force at once. The prorated credits come as a
    /// `monthly_allocation` grant in the same append; the prorated price
    /// difference goes on the period's invoice.
    SubscriptionPlanChanged {
        terms: PlanTerms,
        proration_credits: Credits,
        proration_amount: MinorUnits,
        remaining_seconds: i64,
        period_seconds: i64,
    },
    SubscriptionDowngradeScheduled {
        terms: PlanTerms,
        effective_at: Timestamp,
    },
    SubscriptionCancelScheduled {
        effective_at: Timestamp,
    },
    /// A scheduled cancel was taken back (Stripe: `cancel_at_period_end`
    /// turned false again).
    SubscriptionCancelRevoked {},
    /// A new period begins, on the terms it names (a scheduled downgrade or a
    /// plan revision takes effect here).
    SubscriptionRenewed {
        terms: PlanTerms,
        period_start: Timestamp,
        period_end: Timestamp,
    },
    /// A Stripe-managed period ended on tally's clock.
    SubscriptionPeriodClosed {
        period_start: Timestamp,
        period_end: Timestamp,
        /// Overage handed to Stripe as invoice items, cleared here.
        debt_cleared: Credits,
        /// What that overage costs: one line per unit price in force when
        /// it was incurred. tally's Stripe outbox sends each line to Stripe
        /// as an invoice item on the customer's next invoice.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        overage_lines: Vec<InvoiceLine>,
    },
    SubscriptionPastDue {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        invoice_id: Option<String>,
    },
    SubscriptionCanceled {
        canceled_at: Timestamp,
        /// True for "cancel now", false when a scheduled cancel took effect.
        immediately: bool,
    },
    SubscriptionReactivated {},

    CreditsGranted {
        grant_id: String,
        #[serde(flatten)]
        terms: GrantTerms,
        /// For a rollover: the allocation grants whose rest it carries over.
        /// Rolled credit is a transfer, not new credit.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        transferred_from: Vec<GrantPart>,
        /// For a refund: the usage it gives back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage_id: Option<String>,
        /// For a scheduled grant falling due: its `CreditsGrantScheduled`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schedule_id: Option<String>,
        /// For a Stripe-managed member's allocation: the Stripe period it is
        /// for. One allocation per (member, period start).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stripe_period_start: Option<Timestamp>,
        /// For a purchase paid through Stripe Checkout: the session. Stripe
        /// collected the price, so it goes on no tally invoice.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stripe_checkout_session_id: Option<String>,
        /// A priced purchase of a Stripe-managed member: its price goes to
        /// Stripe as an invoice item (tally's Stripe outbox), on no tally
        /// invoice.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stripe_invoice_item: bool,
        /// The Stripe payment these credits were bought with, whose refund
        /// takes them back: the PaymentIntent (`pi_…`) of a Checkout
        /// purchase, or the Stripe invoice (`in_…`) of a monthly allocation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stripe_payment: Option<String>,
    },
    CreditsGrantScheduled {
        schedule_id: String,
        effective_at: Timestamp,
        #[serde(flatten)]
        terms: GrantTerms,
    },
    /// Usage paid for by these grants, plus any part that became debt.
    CreditsDeducted {
        usage_id: String,
        amount: Credits,
        parts: Vec<GrantPart>,
        debt: Credits,
        /// The overage price of one credit of `debt`, in force when incurred.
        unit_price: MinorUnits,
    },
    /// An admin takes credits back, in burn order, never into debt.
    CreditsDebited {
        amount: Credits,
        parts: Vec<GrantPart>,
        reason: String,
    },
    /// The rest of a grant lapsed (breakage). Marks the grant expired.
    CreditsExpired {
        grant_id: String,
        amount: Credits,
    },
    CreditsReserved {
        reservation_id: String,
        amount: Credits,
        holds: Vec<GrantPart>,
        deadline: Timestamp,
    },
    ReservationSettled {
        reservation_id: String,
        charged: Credits,
        parts: Vec<GrantPart>,
        released: Credits,
        released_parts: Vec<GrantPart>,
    },
    ReservationReleased {
        reservation_id: String,
        reason: ReleaseReason,
        released: Credits,
        released_parts: Vec<GrantPart>,
    },

    UsageRecorded {
        usage_id: String,
        metric: String,
        quantity: i64,
        credits: Credits,
        occurred_at: Timestamp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        integration_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        query_id: Option<String>,
    },
    /// Reduces open debt first (newest first); the rest comes back as a
    /// `refund` grant in the same append.
    UsageReversed {
        usage_id: String,
        credits: Credits,
        debt_reduced: Credits,
        refunded: Credits,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    QueryExecuted {
        reservation_id: String,
        #[serde(flatten)]
        execution: QueryExecution,
        credits: Credits,
    },

    /// An invoice leaves draft: its lines and total are fixed, debt is billed.
    InvoiceIssued {
        invoice_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        period_start: Option<Timestamp>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        period_end: Option<Timestamp>,
        currency: String,
        lines: Vec<InvoiceLine>,
        total: MinorUnits,
        debt_cleared: Credits,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stripe_invoice_id: Option<String>,
    },
    PaymentSucceeded {
        invoice_id: String,
        amount: MinorUnits,
    },
    PaymentFailed {
        invoice_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    InvoiceVoided {
        invoice_id: String,
    },
    InvoiceMarkedUncollectible {
        invoice_id: String,
    },

    /// A Stripe Checkout purchase paid by a delayed method (a bank debit, a
    /// voucher) failed (`checkout.session.async_payment_failed`): nothing
    /// was granted, and this records what was not bought.
    CheckoutPaymentFailed {
        stripe_checkout_session_id: String,
        credits: Credits,
        /// What the purchase would have cost, in the member's currency.
        price: MinorUnits,
    },

    /// Stripe says (part of) a payment was refunded (`charge.refunded`,
    /// `refund.created`/`updated`, `credit_note.created`), and what tally
    /// did about it (ARCHITECTURE.md, "Refunds"). Each fact is a lower bound
    /// of what the payment has refunded in all, so the state keeps the
    /// largest: redelivery and delivery order change nothing.
    StripeRefundRecorded {
        /// The payment: a PaymentIntent (`pi_…`) or a Stripe invoice (`in_…`).
        stripe_payment: String,
        /// New: the payment's refunded total as a charge event said it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        amount_refunded: Option<MinorUnits>,
        /// New: refunds seen by their own id.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        refunds: Vec<StripeRefundPart>,
        /// What of the payment is refunded after this event, as far as tally
        /// knows (never more than was paid, once the payment is known).
        refunded: MinorUnits,
        /// The tally invoice recording the refunded Stripe invoice.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        invoice_id: Option<String>,
        /// The grant whose credits the payment bought.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grant_id: Option<String>,
        /// Credits taken back now: `parts` out of the grant's unspent rest,
        /// then `debt` (to be billed, at `unit_price`) or `written_off` for
        /// what was already spent.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        parts: Vec<GrantPart>,
        debt: Credits,
        unit_price: MinorUnits,
        written_off: Credits,
    },

    /// A Stripe event reached this member. Written in every append a Stripe
    /// event causes, before the event's own effects: the audit trail names
    /// the Stripe event behind each change, and its `created` moves the
    /// watermarks that keep an older subscription state from overwriting a
    /// newer one.
    StripeEventApplied {
        stripe_event_id: String,
        event_type: String,
        /// Stripe's `created` of the event.
        created: Timestamp,
        /// True when the event was older than what was already applied and
        /// so changed nothing.
        stale: bool,
        /// The Stripe subscription whose order this event moves: its
        /// snapshot watermark (subscription events) and its status watermark
        /// (those and `invoice.paid` / `invoice.payment_failed`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        synced: Option<StripeSynced>,
    },

    /// The member's overrides of the installation's alert rules, whole: an
    /// empty object goes back to the defaults.
    AlertRulesChanged {
        overrides: serde_json::Value,
    },
    /// An alert's condition became true: its episode opens.
    AlertTriggered {
        alert_id: String,
        #[serde(flatten)]
        notice: AlertNotice,
    },
    /// The condition cleared: the episode closes and the rule re-arms.
    AlertResolved {
        alert_id: String,
        #[serde(flatten)]
        notice: AlertNotice,
    },

    WebhookEndpointCreated {
        endpoint_id: String,
        #[serde(flatten)]
        config: WebhookEndpointConfig,
        secret: crate::domain::integration::CredentialRef,
    },
    /// The whole config after the change.
    WebhookEndpointChanged {
        endpoint_id: String,
        #[serde(flatten)]
        config: WebhookEndpointConfig,
    },
    /// Turned off because it kept failing (the delivery log says how).
    WebhookEndpointDisabled {
        endpoint_id: String,
        reason: String,
    },
    /// A new signing secret; the previous one signs too until
    /// `previous_until`.
    WebhookSecretRotated {
        endpoint_id: String,
        secret: crate::domain::integration::CredentialRef,
        previous_until: Timestamp,
    },
    WebhookEndpointDeleted {
        endpoint_id: String,
    },
}

impl MemberEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            MemberEvent::MemberRegistered { .. } => "MemberRegistered",
            MemberEvent::MemberProfileChanged { .. } => "MemberProfileChanged",
            MemberEvent::SubscriptionStarted { .. } => "SubscriptionStarted",
            MemberEvent::SubscriptionPlanChanged { .. } => "SubscriptionPlanChanged",
            MemberEvent::SubscriptionDowngradeScheduled { .. } => "SubscriptionDowngradeScheduled",
            MemberEvent::SubscriptionCancelScheduled { .. } => "SubscriptionCancelScheduled",
            MemberEvent::SubscriptionCancelRevoked { .. } => "SubscriptionCancelRevoked",
            MemberEvent::SubscriptionRenewed { .. } => "SubscriptionRenewed",
            MemberEvent::SubscriptionPeriodClosed { .. } => "SubscriptionPeriodClosed",
            MemberEvent::SubscriptionPastDue { .. } => "SubscriptionPastDue",
            MemberEvent::SubscriptionCanceled { .. } => "SubscriptionCanceled",
            MemberEvent::SubscriptionReactivated { .. } => "SubscriptionReactivated",
            MemberEvent::CreditsGranted { .. } => "CreditsGranted",
            MemberEvent::CreditsGrantScheduled { .. } => "CreditsGrantScheduled",
            MemberEvent::CreditsDeducted { .. } => "CreditsDeducted",
            MemberEvent::CreditsDebited { .. } => "CreditsDebited",
            MemberEvent::CreditsExpired { .. } => "CreditsExpired",
            MemberEvent::CreditsReserved { .. } => "CreditsReserved",
            MemberEvent::ReservationSettled { .. } => "ReservationSettled",
            MemberEvent::ReservationReleased { .. } => "ReservationReleased",
            MemberEvent::UsageRecorded { .. } => "UsageRecorded",
            MemberEvent::UsageReversed { .. } => "UsageReversed",
            MemberEvent::QueryExecuted { .. } => "QueryExecuted",
            MemberEvent::InvoiceIssued { .. } => "InvoiceIssued",
            MemberEvent::PaymentSucceeded { .. } => "PaymentSucceeded",
            MemberEvent::PaymentFailed { .. } => "PaymentFailed",
            MemberEvent::InvoiceVoided { .. } => "InvoiceVoided",
            MemberEvent::InvoiceMarkedUncollectible { .. } => "InvoiceMarkedUncollectible",
            MemberEvent::StripeEventApplied { .. } => "StripeEventApplied",
            MemberEvent::CheckoutPaymentFailed { .. } => "CheckoutPaymentFailed",
            MemberEvent::StripeRefundRecorded { .. } => "StripeRefundRecorded",
            MemberEvent::AlertRulesChanged { .. } => "AlertRulesChanged",
            MemberEvent::AlertTriggered { .. } => "AlertTriggered",
            MemberEvent::AlertResolved { .. } => "AlertResolved",
            MemberEvent::WebhookEndpointCreated { .. } => "WebhookEndpointCreated",
            MemberEvent::WebhookEndpointChanged { .. } => "WebhookEndpointChanged",
            MemberEvent::WebhookEndpointDisabled { .. } => "WebhookEndpointDisabled",
            MemberEvent::WebhookSecretRotated { .. } => "WebhookSecretRotated",
            MemberEvent::WebhookEndpointDeleted { .. } => "WebhookEndpointDeleted",
        }
    }
}

/// One Stripe refund (`re_…`) and its amount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeRefundPart {
    pub refund_id: String,
    pub amount: MinorUnits,
}

/// Which watermarks of a Stripe subscription a Stripe event moves to its
/// `created`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeSynced {
    pub subscription_id: String,
    pub snapshot: bool,
    pub status: bool,
}

/// An event with the instant it took effect: the caller's time for a
/// command, the instant it fell due for an effect of time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occurred<E> {
    pub occurred_at: Timestamp,
    /// True for an effect of time (an expiry, a timeout, a renewal) that a
    /// decision ran before its command: its actor is the scheduler.
    pub by_time: bool,
    pub event: E,
}
