//! Every business rejection the ledger can give, as a value.
//!
//! Each variant says how a caller handles it. [`DomainError::code`] is the
//! stable problem `code` an HTTP client sees; it is mapped once, here.

use super::amount::Credits;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A field broke a rule or a limit. 422-style `validation_failed`; fix the
    /// request, retrying it unchanged fails again.
    #[error("{field}: {message}")]
    Validation { field: &'static str, message: String },

    /// The deduction is larger than what can be spent now (and overage does
    /// not cover the rest). `insufficient_credits`; nothing was written, so a
    /// retry after a top-up can succeed.
    #[error("insufficient credits: requested {requested}, available {available}")]
    InsufficientCredits { requested: Credits, available: Credits },

    /// The member stream does not exist. `not_found`.
    #[error("member `{member_id}` not found")]
    MemberNotFound { member_id: String },

    /// No plan with this id in the catalog. `not_found`.
    #[error("plan `{plan_id}` not found")]
    PlanNotFound { plan_id: String },

    /// Change or cancel without an active subscription. `not_found`.
    #[error("active subscription of member `{member_id}` not found")]
    SubscriptionNotFound { member_id: String },

    /// Settle or release of a reservation the member never had. `not_found`.
    #[error("reservation `{reservation_id}` not found")]
    ReservationNotFound { reservation_id: String },

    /// Settle or release after the reservation's deadline. `reservation_expired`
    /// (410): charge the work as usage instead.
    #[error("reservation `{reservation_id}` expired")]
    ReservationExpired { reservation_id: String },

    /// Reversal of a usage id never recorded for this member. `not_found`.
    #[error("usage `{usage_id}` not found")]
    UsageNotFound { usage_id: String },

    /// An invoice id that is not this member's. `not_found`.
    #[error("invoice `{invoice_id}` not found")]
    InvoiceNotFound { invoice_id: String },

    /// No live integration with this id for the member. `not_found`.
    #[error("integration `{integration_id}` of member `{member_id}` not found")]
    IntegrationNotFound { member_id: String, integration_id: String },

    /// No saved query with this id in the integration. `not_found`.
    #[error("query `{query_id}` of integration `{integration_id}` not found")]
    QueryNotFound { integration_id: String, query_id: String },

    /// No webhook endpoint with this id for the member. `not_found`.
    #[error("webhook endpoint `{endpoint_id}` not found")]
    WebhookEndpointNotFound { endpoint_id: String },

    /// The catalog already has a plan with this id: revise it instead.
    /// `validation_failed` on `plan_id`.
    #[error("plan `{plan_id}` already exists")]
    PlanAlreadyExists { plan_id: String },
}

impl DomainError {
    /// The stable problem code for HTTP clients and logs.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::Validation { .. } | DomainError::PlanAlreadyExists { .. } => "validation_failed",
            DomainError::InsufficientCredits { .. } => "insufficient_credits",
            DomainError::MemberNotFound { .. }
            | DomainError::PlanNotFound { .. }
            | DomainError::SubscriptionNotFound { .. }
            | DomainError::ReservationNotFound { .. }
            | DomainError::UsageNotFound { .. }
            | DomainError::InvoiceNotFound { .. }
            | DomainError::IntegrationNotFound { .. }
            | DomainError::QueryNotFound { .. }
            | DomainError::WebhookEndpointNotFound { .. } => "not_found",
            DomainError::ReservationExpired { .. } => "reservation_expired",
        }
    }

    /// The request field a validation failure names, if any.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            DomainError::Validation { field, .. } => Some(field),
            DomainError::PlanAlreadyExists { .. } => Some("plan_id"),
            _ => None,
        }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> DomainError {
        DomainError::Validation { field, message: message.into() }
    }
}
