//! What callers ask of a member. Commands are imperative; a decision turns
//! one into events or a [`DomainError`](crate::domain::DomainError).

use super::events::{
    AlertNotice, Billing, GrantCategory, GrantSource, QueryExecution, Timestamp, WebhookEndpointConfig,
};
use crate::domain::amount::{Credits, MinorUnits};
use crate::domain::integration::CredentialRef;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberProfile {
    pub time_zone: String,
    pub currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_customer_id: Option<String>,
}

impl Default for MemberProfile {
    fn default() -> Self {
        MemberProfile { time_zone: "UTC".to_owned(), currency: "USD".to_owned(), stripe_customer_id: None }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantCredits {
    /// `purchase`, `promotional` or `adjustment` from callers; the ledger's
    /// own sources (allocation, rollover, refund) are refused.
    pub source: GrantSource,
    pub amount: Credits,
    pub priority: Option<u8>,
    /// Only an adjustment names its own category.
    pub category: Option<GrantCategory>,
    pub expires_at: Option<Timestamp>,
    /// A future instant schedules the grant instead of granting now.
    pub effective_at: Option<Timestamp>,
    /// Required for an adjustment.
    pub reason: Option<String>,
    /// What a purchase cost, in the member's currency (0 when absent).
    pub price: Option<MinorUnits>,
}

impl GrantCredits {
    pub fn new(source: GrantSource, amount: i64) -> GrantCredits {
        GrantCredits {
            source,
            amount: Credits(amount),
            priority: None,
            category: None,
            expires_at: None,
            effective_at: None,
            reason: None,
            price: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordUsage {
    pub usage_id: String,
    pub metric: String,
    pub quantity: i64,
    pub credits: Credits,
    /// When the usage happened; `now` when absent.
    pub occurred_at: Option<Timestamp>,
    pub integration_id: Option<String>,
    pub query_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberCommand {
    /// Register the member, or change its profile if it exists.
    Register(MemberProfile),
    StartSubscription {
        plan_id: String,
        billing: Billing,
        stripe_subscription_id: Option<String>,
    },
    ChangePlan {
        plan_id: String,
    },
    CancelSubscription {
        at_period_end: bool,
    },
    GrantCredits(GrantCredits),
    DebitCredits {
        amount: Credits,
        reason: String,
    },
    RecordUsage(RecordUsage),
    ReverseUsage {
        usage_id: String,
        reason: Option<String>,
    },
    Reserve {
        amount: Credits,
        ttl_s: Option<i64>,
    },
    Settle {
        reservation_id: String,
        amount: Credits,
        query: Option<QueryExecution>,
    },
    Release {
        reservation_id: String,
    },
    PayInvoice {
        invoice_id: String,
    },
    RecordPaymentFailed {
        invoice_id: String,
        reason: Option<String>,
    },
    VoidInvoice {
        invoice_id: String,
    },
    MarkInvoiceUncollectible {
        invoice_id: String,
    },
    /// Replace the member's overrides of the alert rules (checked against
    /// the rules by the caller; the ledger keeps them as given).
    SetAlertRules {
        overrides: serde_json::Value,
    },
    /// Open an alert's episode; nothing when that episode (or a later one)
    /// was already opened: a retried or replayed raise writes nothing.
    RaiseAlert(AlertNotice),
    /// Close an alert's episode; nothing when it is not open.
    ResolveAlert(AlertNotice),
    /// A new webhook endpoint, its id and secret chosen (and the secret
    /// sealed in the vault) by the caller.
    CreateWebhookEndpoint {
        endpoint_id: String,
        config: WebhookEndpointConfig,
        secret: CredentialRef,
    },
    /// The endpoint's whole config after the change; nothing when unchanged.
    ChangeWebhookEndpoint {
        endpoint_id: String,
        config: WebhookEndpointConfig,
    },
    /// Turned off by the dispatcher; nothing when already off.
    DisableWebhookEndpoint {
        endpoint_id: String,
        reason: String,
    },
    RotateWebhookSecret {
        endpoint_id: String,
        secret: CredentialRef,
        previous_until: Timestamp,
    },
    DeleteWebhookEndpoint {
        endpoint_id: String,
    },
    /// Run whatever fell due up to `now`: nothing else.
    AdvanceTime,
    /// What a verified Stripe event means for this member.
    Stripe(super::stripe::StripeCommand),
}

impl MemberCommand {
    /// Whether the command may create the member with default settings, in
    /// the same append (a first subscription or grant). Everything else on a
    /// member that does not exist is `not_found`.
    pub fn registers_implicitly(&self) -> bool {
        matches!(
            self,
            MemberCommand::Register(_) | MemberCommand::StartSubscription { .. } | MemberCommand::GrantCredits(_)
        )
    }
}

/// What the store knows of a usage id, looked up by the shell before deciding
/// so that member state stays bounded (usage ids live in a store index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageFacts {
    pub credits: Credits,
    pub reversed: bool,
}
