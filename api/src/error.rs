//! Every rejection as an `application/problem+json` response with a stable
//! `code`. Domain and ledger errors are mapped here, once.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use tally_ledger::LedgerError;
use tally_ledger::domain::DomainError;
use tally_ledger::store::StoreError;
use utoipa::ToSchema;

/// The body of every error response (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type: `https://tally.dev/problems/{code}`.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// A short human sentence, one per `code` ("Not enough credits").
    pub title: String,
    pub status: u16,
    /// What went wrong in this request, and what to do about it.
    pub detail: String,
    /// The stable code clients branch on.
    pub code: String,
    /// The body field (or path or query parameter) at fault, for `validation_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The request header at fault (`Idempotency-Key`), for `validation_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available: Option<i64>,
    /// Seconds to wait, for `rate_limited` (and a busy `service_unavailable`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// Why a Stripe signature was refused (`invalid_signature`):
    /// `missing_header`, `malformed_header`, `no_v1_signature`,
    /// `timestamp_outside_tolerance` or `signature_mismatch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Stripe's own error code, for `payment_provider_error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_code: Option<String>,
    /// Stripe's HTTP status, for `payment_provider_error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_status: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 422 `validation_failed` naming the field.
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
    /// 422 `validation_failed` naming a request header (missing or bad).
    #[error("header {header}: {message}")]
    InvalidHeader { header: &'static str, message: String },
    /// 400 `malformed_request`: the body is not JSON, or not the expected shape.
    #[error("{0}")]
    Malformed(String),
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("this key may not do that")]
    Forbidden,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("rate limit reached; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("the request body is larger than {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    #[error("{0}")]
    ProjectionLagging(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
    /// 503 `service_unavailable` with `Retry-After`: too much work at once.
    #[error("{message}; retry in {retry_after_s} s")]
    Busy { retry_after_s: u64, message: String },
    /// 400: a Stripe webhook whose signature does not verify; writes nothing.
    #[error("the Stripe signature was refused: {detail}")]
    InvalidSignature { reason: &'static str, detail: String },
    /// 404: the webhook endpoint is not enabled (no secret is set).
    #[error("{0}")]
    StripeNotConfigured(String),
    /// 502: Stripe refused an outbound call or could not be reached; the
    /// ledger was left unchanged.
    #[error("Stripe: {message}")]
    PaymentProvider { status: Option<u16>, code: String, message: String },
    /// A data source's refusal or failure (`target_forbidden`,
    /// `integration_*`), from `tally-integrations`.
    #[error("{0}")]
    Integration(tally_integrations::ProviderError),
    /// 409 `integration_disabled`: a disabled integration runs nothing.
    #[error("{0}")]
    IntegrationDisabled(String),
    /// 409 `execution_in_progress`: the same Idempotency-Key is running.
    #[error("{0}")]
    InProgress(String),
    /// 429 `too_many_executions` with `Retry-After`: the member's (or the
    /// server's) concurrent executions stayed at their cap for the whole
    /// queueing wait.
    #[error("{message}; retry in {retry_after_s} s")]
    TooManyExecutions { retry_after_s: u64, message: String },
}

impl From<tally_integrations::ProviderError> for ApiError {
    fn from(error: tally_integrations::ProviderError) -> ApiError {
        match error {
            tally_integrations::ProviderError::Invalid { field, message } => ApiError::Validation { field, message },
            other => ApiError::Integration(other),
        }
    }
}

impl From<tally_stripe::OutboundError> for ApiError {
    fn from(error: tally_stripe::OutboundError) -> ApiError {
        ApiError::PaymentProvider { status: error.status, code: error.code, message: error.message }
    }
}

impl From<DomainError> for ApiError {
    /// A domain rejection as the API answers it: a validation failure names
    /// its field once (the message is not prefixed with it again).
    fn from(error: DomainError) -> ApiError {
        match error {
            DomainError::Validation { field, message } => ApiError::Validation { field: field.to_owned(), message },
            rejection => ApiError::Ledger(LedgerError::Rejected(rejection)),
        }
    }
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Validation { field: field.into(), message: message.into() }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Validation { .. } | ApiError::InvalidHeader { .. } => "validation_failed",
            ApiError::Malformed(_) => "malformed_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::ProjectionLagging(_) => "projection_lagging",
            ApiError::Internal(_) => "internal_error",
            ApiError::Unavailable(_) | ApiError::Busy { .. } => "service_unavailable",
            ApiError::InvalidSignature { .. } => "invalid_signature",
            ApiError::StripeNotConfigured(_) => "stripe_not_configured",
            ApiError::PaymentProvider { .. } => "payment_provider_error",
            ApiError::Integration(error) => error.code(),
            ApiError::IntegrationDisabled(_) => "integration_disabled",
            ApiError::InProgress(_) => "execution_in_progress",
            ApiError::TooManyExecutions { .. } => "too_many_executions",
            ApiError::Ledger(error) => ledger_code(error),
        }
    }

    /// The problem document of this error, for answers that carry several
    /// (a batch's refused records).
    pub fn problem(&self) -> Problem {
        let status = self.status_code();
        let code = self.code();
        let mut problem = Problem {
            problem_type: format!("https://tally.dev/problems/{code}"),
            title: title(code).to_owned(),
            status: status.as_u16(),
            detail: format!("{self}; {}", advice(code)),
            code: code.to_owned(),
            field: None,
            header: None,
            requested: None,
            available: None,
            retry_after_s: None,
            reason: None,
            provider_code: None,
            provider_status: None,
        };
        match self {
            ApiError::Validation { field, .. } => problem.field = Some(field.clone()),
            ApiError::InvalidHeader { header, .. } => problem.header = Some((*header).to_owned()),
            ApiError::RateLimited { retry_after_s }
            | ApiError::Busy { retry_after_s, .. }
            | ApiError::TooManyExecutions { retry_after_s, .. }
            | ApiError::Integration(tally_integrations::ProviderError::RateLimited { retry_after_s, .. }) => {
                problem.retry_after_s = Some(*retry_after_s)
            }
            ApiError::InvalidSignature { reason, .. } => problem.reason = Some((*reason).to_owned()),
            ApiError::PaymentProvider { status, code, .. } => {
                problem.provider_code = Some(code.clone());
                problem.provider_status = *status;
            }
            ApiError::Ledger(LedgerError::Rejected(rejection)) => {
                problem.field = rejection.field().map(str::to_owned);
                if let DomainError::InsufficientCredits { requested, available } = rejection {
                    problem.requested = Some(requested.0);
                    problem.available = Some(available.0);
                }
            }
            _ => {}
        }
        problem
    }
}

/// Every problem `code` the API answers with, and its `title`: a short
/// sentence a person can read, the same for every occurrence of the code.
pub const PROBLEM_TITLES: &[(&str, &str)] = &[
    ("validation_failed", "A field of the request is not valid"),
    ("malformed_request", "The request could not be read"),
    ("unauthorized", "Missing or unknown API key"),
    ("forbidden", "This key may not do that"),
    ("not_found", "Nothing found with this id"),
    ("method_not_allowed", "This method is not allowed here"),
    ("rate_limited", "Too many requests for this key"),
    ("payload_too_large", "The request body is too large"),
    ("projection_lagging", "The read models have not caught up yet"),
    ("internal_error", "Something went wrong inside tally"),
    ("service_unavailable", "tally cannot take this request now"),
    ("invalid_signature", "The webhook signature was refused"),
    ("stripe_not_configured", "Stripe is not configured"),
    ("payment_provider_error", "The payment provider refused or failed"),
    ("target_forbidden", "That address may not be reached"),
    ("integration_unreachable", "The data source cannot be reached"),
    ("integration_timeout", "The data source did not answer in time"),
    ("integration_auth_failed", "The data source refused the credential"),
    ("integration_query_failed", "The data source refused the query"),
    ("integration_response_too_large", "The data source answered too much"),
    ("integration_rate_limited", "The data source asked for a pause"),
    ("integration_disabled", "The integration is disabled"),
    ("execution_in_progress", "This execution is still running"),
    ("too_many_executions", "Too many executions at once"),
    ("insufficient_credits", "Not enough credits"),
    ("reservation_expired", "The reservation has expired"),
    ("idempotency_key_reused", "This Idempotency-Key was used for another request"),
    ("version_conflict", "The member changed too often to decide; retry"),
];

fn title(code: &str) -> &'static str {
    PROBLEM_TITLES.iter().find(|(known, _)| *known == code).map(|(_, title)| *title).unwrap_or("Request refused")
}

/// What a client does about a problem, appended to its `detail`.
fn advice(code: &str) -> &'static str {
    match code {
        "validation_failed" => "fix it and send the request again",
        "malformed_request" => "send a JSON object shaped as the OpenAPI document (/openapi.json) says",
        "unauthorized" => "send `Authorization: Bearer <key>` with the admin key or a member key",
        "forbidden" => "use the admin key, or a key of the member named in the path",
        "not_found" => "check the path and the ids in it",
        "method_not_allowed" => "use one of the methods in the Allow header",
        "rate_limited" => "wait for Retry-After seconds, then retry",
        "payload_too_large" => "send a smaller body",
        "projection_lagging" => "retry shortly with the same min_position",
        "internal_error" => "retry later; if it persists, an operator should read tally's log",
        "service_unavailable" => {
            "retry with backoff, with the same idempotency key (the Idempotency-Key header, or a batch record's usage_id)"
        }
        "invalid_signature" => "check the webhook signing secret; nothing was recorded",
        "stripe_not_configured" => {
            "set TALLY_STRIPE_WEBHOOK_SECRET for webhooks, TALLY_STRIPE_SECRET_KEY for calls to Stripe, then restart tally"
        }
        "payment_provider_error" => "nothing was changed in tally; retry, or check the Stripe account",
        "target_forbidden" => "use a public https address, or ask the operator to allow-list the range",
        "integration_unreachable" | "integration_timeout" => "nothing was charged; retry later or check the source",
        "integration_auth_failed" => "rotate the integration's credential; nothing was charged",
        "integration_query_failed" => "fix the query or its parameters; nothing was charged",
        "integration_response_too_large" => "ask for fewer rows or a narrower query; nothing was charged",
        "integration_rate_limited" => {
            "the source asked for a pause: retry after Retry-After seconds; nothing was charged and nothing more \
             was sent to it"
        }
        "integration_disabled" => "enable the integration first",
        "execution_in_progress" => {
            "retry with the same Idempotency-Key in a moment: it answers once the first run settles"
        }
        "too_many_executions" => "wait for Retry-After seconds, then retry with the same Idempotency-Key; nothing ran",
        "insufficient_credits" => "grant or purchase credits, or ask for fewer; nothing was written",
        "reservation_expired" => "record the work as usage instead, or reserve again",
        "idempotency_key_reused" => "use a new Idempotency-Key for a new request",
        "version_conflict" => "retry the request with the same Idempotency-Key",
        _ => "see the OpenAPI document (/openapi.json)",
    }
}

fn ledger_code(error: &LedgerError) -> &'static str {
    match error {
        LedgerError::Rejected(rejection) => rejection.code(),
        LedgerError::IdempotencyKeyReused => "idempotency_key_reused",
        LedgerError::VersionConflict { .. } | LedgerError::Store(StoreError::VersionConflict { .. }) => {
            "version_conflict"
        }
        LedgerError::Overloaded { .. } | LedgerError::Unavailable => "service_unavailable",
        LedgerError::Store(StoreError::Busy | StoreError::Full) => "service_unavailable",
        LedgerError::Store(_) | LedgerError::Codec(_) => "internal_error",
    }
}

fn ledger_status(error: &LedgerError) -> StatusCode {
    match error {
        LedgerError::Rejected(rejection) => match rejection.code() {
            "validation_failed" => StatusCode::UNPROCESSABLE_ENTITY,
            "insufficient_credits" => StatusCode::PAYMENT_REQUIRED,
            "not_found" => StatusCode::NOT_FOUND,
            "reservation_expired" => StatusCode::GONE,
            _ => StatusCode::BAD_REQUEST,
        },
        LedgerError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        LedgerError::VersionConflict { .. } | LedgerError::Store(StoreError::VersionConflict { .. }) => {
            StatusCode::CONFLICT
        }
        LedgerError::Overloaded { .. } | LedgerError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        LedgerError::Store(StoreError::Busy | StoreError::Full) => StatusCode::SERVICE_UNAVAILABLE,
        LedgerError::Store(_) | LedgerError::Codec(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Validation { .. } | ApiError::InvalidHeader { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ProjectionLagging(_) | ApiError::Unavailable(_) | ApiError::Busy { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::InvalidSignature { .. } => StatusCode::BAD_REQUEST,
            ApiError::StripeNotConfigured(_) => StatusCode::NOT_FOUND,
            ApiError::PaymentProvider { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Integration(error) => match error.code() {
                "target_forbidden" | "integration_query_failed" => StatusCode::UNPROCESSABLE_ENTITY,
                "integration_timeout" => StatusCode::GATEWAY_TIMEOUT,
                "integration_rate_limited" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            },
            ApiError::IntegrationDisabled(_) | ApiError::InProgress(_) => StatusCode::CONFLICT,
            ApiError::TooManyExecutions { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Ledger(error) => ledger_status(error),
        }
    }

    fn error_response(&self) -> HttpResponse {
        if self.status_code().is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json")));
        if let ApiError::RateLimited { retry_after_s }
        | ApiError::Busy { retry_after_s, .. }
        | ApiError::TooManyExecutions { retry_after_s, .. }
        | ApiError::Integration(tally_integrations::ProviderError::RateLimited { retry_after_s, .. }) = self
        {
            response.insert_header((header::RETRY_AFTER, retry_after_s.to_string()));
        }
        if let ApiError::Unauthorized = self {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.body(serde_json::to_string(&self.problem()).expect("problems serialise"))
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> ApiError {
        ApiError::Unavailable("the server is shutting down".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_ledger::domain::Credits;

    /// Every code the API can answer has its own title: none falls back to
    /// the generic one, and none is an HTTP reason phrase.
    #[test]
    fn every_code_has_a_human_title() {
        let errors = vec![
            ApiError::validation("f", "m"),
            ApiError::InvalidHeader { header: "Idempotency-Key", message: "m".into() },
            ApiError::Malformed("m".into()),
            ApiError::Unauthorized,
            ApiError::Forbidden,
            ApiError::NotFound("m".into()),
            ApiError::MethodNotAllowed("m".into()),
            ApiError::RateLimited { retry_after_s: 1 },
            ApiError::PayloadTooLarge { limit_bytes: 1 },
            ApiError::ProjectionLagging("m".into()),
            ApiError::Internal("m".into()),
            ApiError::Unavailable("m".into()),
            ApiError::Busy { retry_after_s: 1, message: "m".into() },
            ApiError::TooManyExecutions { retry_after_s: 1, message: "m".into() },
            ApiError::InvalidSignature { reason: "r", detail: "m".into() },
            ApiError::StripeNotConfigured("m".into()),
            ApiError::PaymentProvider { status: None, code: "c".into(), message: "m".into() },
            ApiError::Integration(tally_integrations::ProviderError::RateLimited {
                retry_after_s: 30,
                message: "m".into(),
            }),
            ApiError::Ledger(LedgerError::IdempotencyKeyReused),
            ApiError::Ledger(LedgerError::VersionConflict { stream_id: "s".into(), attempts: 1 }),
            ApiError::Ledger(LedgerError::Rejected(DomainError::InsufficientCredits {
                requested: Credits(2),
                available: Credits(1),
            })),
            ApiError::Ledger(LedgerError::Rejected(DomainError::ReservationExpired { reservation_id: "r".into() })),
        ];
        for error in errors {
            let problem = error.problem();
            assert_ne!(problem.title, "Request refused", "{} has no title", problem.code);
            assert_ne!(Some(problem.title.as_str()), error.status_code().canonical_reason(), "{}", problem.code);
            assert!(problem.detail.contains("; "), "{}: the detail says what to do: {}", problem.code, problem.detail);
        }
    }
}
