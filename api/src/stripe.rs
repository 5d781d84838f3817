//! Stripe at the HTTP edge (DESIGN.md §8): `POST /v1/webhooks/stripe`, and
//! starting a Stripe-billed subscription through Stripe's API.
//!
//! A webhook is verified on its raw bytes first (any `v1`, constant time,
//! tolerance), then parsed, mapped and executed as a member command with
//! Stripe's event id as the idempotency key: a redelivery is answered from
//! the idempotency record and changes nothing. A genuine event tally does
//! not act on, or that the ledger refuses for good (a currency that is not
//! the member's, say), is acknowledged (200) and recorded on the
//! `stripe-intake` stream, never answered with a status that Stripe would
//! retry for days. An event whose price no plan has gets a 422: Stripe
//! retries it, and a retry after the catalog is fixed succeeds.

use crate::commands::{Route, execute_member, member_path};
use crate::error::ApiError;
use crate::{AppState, State, authenticate};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tally_ledger::LedgerError;
use tally_ledger::domain::{
    DomainError, IntakeEvent, MemberCommand, RefundPolicy, StripeCommand, StripeEventRef, validate,
};
use tally_ledger::service::{Idempotency, Request};
use tally_stripe::{Mapped, StripeApi};

/// Webhook bodies are larger than API bodies: an invoice with many lines.
pub const WEBHOOK_BODY_BYTES_MAX: usize = 512 * 1024;
/// Idempotency scopes: an applied event's record (written with its member
/// events) and an ignored or unprocessed event's record on `stripe-intake`.
/// Apart, so that an event ignored today (its customer not yet linked) is
/// applied when Stripe sends it again after the link.
const WEBHOOK_SCOPE: &str = "stripe/webhook";
const INTAKE_SCOPE: &str = "stripe/intake";

/// Stripe settings, from the environment of `tally serve`.
#[derive(Clone, Default)]
pub struct StripeSettings {
    /// `TALLY_STRIPE_WEBHOOK_SECRET` (`whsec_…`); without it the webhook
    /// route answers 404 `stripe_not_configured`.
    pub webhook_secret: Option<String>,
    /// `TALLY_STRIPE_WEBHOOK_TOLERANCE_S`, default 300.
    pub tolerance_s: i64,
    /// From `TALLY_STRIPE_SECRET_KEY` and `TALLY_STRIPE_API_BASE`.
    pub api: Option<Arc<StripeApi>>,
    /// `TALLY_STRIPE_REFUND_SPENT` and `TALLY_STRIPE_REFUND_SUBSCRIPTION_CREDITS`:
    /// what a refund takes back (ARCHITECTURE.md, "Refunds").
    pub refund_policy: RefundPolicy,
}

impl StripeSettings {
    pub fn new() -> StripeSettings {
        StripeSettings { tolerance_s: tally_stripe::DEFAULT_TOLERANCE_S, ..StripeSettings::default() }
    }
}

fn wall_clock_now() -> i64 {
    // Signatures are about real time (replay protection), whatever the
    // ledger's clock says (`--test-clock`).
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
}

#[utoipa::path(post, path = "/v1/webhooks/stripe", tag = "stripe",
    request_body(content = Object, description = "A Stripe event, signed in the Stripe-Signature header"),
    params(("Stripe-Signature" = String, Header, description = "t=<unix seconds>,v1=<hex>[,v1=<hex>…]")),
    responses(
        (status = 200, description = "applied, ignored or unprocessed (kept for an operator)", body = Object),
        (status = 400, description = "invalid_signature, with a reason", body = crate::error::Problem),
        (status = 404, description = "stripe_not_configured: no webhook secret is set", body = crate::error::Problem),
        (status = 413, body = crate::error::Problem),
        (status = 422, description = "the ledger refused the event; Stripe will retry", body = crate::error::Problem),
        (status = 503, description = "the ledger is unavailable; Stripe will retry", body = crate::error::Problem)))]
pub async fn webhook(state: State, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let Some(secret) = state.stripe.webhook_secret.clone() else {
        return Err(ApiError::StripeNotConfigured("set TALLY_STRIPE_WEBHOOK_SECRET to receive Stripe webhooks".into()));
    };
    let header = match request.headers().get("Stripe-Signature") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            state.metrics.stripe_webhook("invalid_signature", "none", "none");
            ApiError::InvalidSignature {
                reason: "malformed_header",
                detail: "the Stripe-Signature header is not ASCII".to_owned(),
            }
        })?),
    };
    if let Err(error) = tally_stripe::verify(header, &bytes, &secret, wall_clock_now(), Some(state.stripe.tolerance_s))
    {
        state.metrics.stripe_webhook("invalid_signature", "none", "none");
        return Err(ApiError::InvalidSignature { reason: error.reason(), detail: error.to_string() });
    }

    let (answer, labels) = process(&state, &bytes).await;
    let outcome = match &answer {
        Ok(answer) => answer["status"].as_str().unwrap_or("applied"),
        Err(_) => "refused",
    };
    state.metrics.stripe_webhook(outcome, labels.parsed_by, &labels.api_version);
    Ok(HttpResponse::Ok().json(answer?))
}

/// Which reader understood a delivery, and its API version, for the metrics.
struct ParseLabels {
    parsed_by: &'static str,
    api_version: String,
}

/// Longest API version label kept as it is; others count as `other`.
const API_VERSION_LABEL_BYTES_MAX: usize = 40;

/// The event's API version as a metric label: Stripe's versions look like
/// `2020-03-02` or `2026-09-30.endive`; anything else is `other`, so a
/// label's values stay few.
fn api_version_label(api_version: Option<&str>) -> &str {
    match api_version {
        None => "none",
        Some(version)
            if !version.is_empty()
                && version.len() <= API_VERSION_LABEL_BYTES_MAX
                && version.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_')) =>
        {
            version
        }
        Some(_) => "other",
    }
}

/// What a verified body leads to: applied, ignored or unprocessed (the JSON
/// answer), or a refusal Stripe should retry (an error); and the labels a
/// delivery is counted under (a replay is not a delivery, and is not counted).
async fn process(state: &AppState, bytes: &[u8]) -> (Result<serde_json::Value, ApiError>, ParseLabels) {
    let parsed = tally_stripe::parse(bytes);
    let labels = match &parsed {
        Ok(parsed) => ParseLabels {
            parsed_by: match parsed.parsed_by {
                tally_stripe::ParsedBy::Typed => "typed",
                tally_stripe::ParsedBy::Fallback => "fallback",
            },
            api_version: api_version_label(parsed.api_version.as_deref()).to_owned(),
        },
        Err(_) => ParseLabels { parsed_by: "unreadable", api_version: "unknown".to_owned() },
    };
    (process_parsed(state, parsed, bytes).await, labels)
}

async fn process_parsed(
    state: &AppState,
    parsed: Result<tally_stripe::ParsedEvent, tally_stripe::ParseError>,
    bytes: &[u8],
) -> Result<serde_json::Value, ApiError> {
    let parsed = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            let event_id = match &error {
                tally_stripe::ParseError::UnreadableObject { event_id, .. } => Some(event_id.clone()),
                _ => None,
            };
            return unprocessed(state, event_id, None, error.to_string(), bytes).await;
        }
    };
    match tally_stripe::map(&parsed) {
        Mapped::Unprocessed { reason } => {
            unprocessed(state, Some(parsed.id.clone()), Some(parsed.event_type.clone()), reason, bytes).await
        }
        Mapped::Ignored { reason } => {
            ignored(state, &parsed.id, &parsed.event_type, parsed.created, reason, None).await
        }
        Mapped::Command { customer_id, member_hint, command } => {
            apply(state, &parsed, customer_id, member_hint, *command, Origin::Webhook(bytes)).await
        }
    }
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ReplayReport {
    /// Unprocessed events found on `stripe-intake` and run again.
    pub replayed: u64,
    pub applied: u64,
    pub ignored: u64,
    pub still_unprocessed: u64,
    /// Refused by the ledger (a price no plan has): fix and replay again.
    pub refused: u64,
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReplayQuery {
    /// A Stripe customer id: replay the events ignored because this
    /// customer was linked to no member (link it first, with
    /// `PUT /v1/members/{member}` and its `stripe_customer_id`), in Stripe's
    /// order. Without it, every unprocessed event is replayed.
    pub customer: Option<String>,
}

/// Run kept Stripe events through parsing, mapping and the ledger again:
/// every `StripeEventUnprocessed` on `stripe-intake` (as after an upgrade or
/// a catalog fix), or, with `customer`, the events ignored because that
/// customer was linked to no member, in Stripe's order (`created`). Their
/// signatures were verified when they arrived. Exactly once: an event
/// applied once is answered from its record.
#[utoipa::path(post, path = "/v1/admin/stripe/replay", tag = "stripe", params(ReplayQuery),
    responses((status = 200, body = ReplayReport)), security(("bearer" = [])))]
#[actix_web::post("/v1/admin/stripe/replay")]
pub async fn replay(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &request)?.require_admin()?;
    let query: ReplayQuery = crate::admin::query(&request)?;
    if let Some(customer) = &query.customer {
        validate::identifier("customer", customer).map_err(ApiError::from)?;
    }
    let ledger = state.ledger.clone();
    let payloads = actix_web::web::block(move || -> Result<Vec<String>, ApiError> {
        let reader = ledger.reader().map_err(ApiError::from)?;
        // (created, payload), in log order; sorted by Stripe's order below.
        let mut kept: Vec<(chrono::DateTime<chrono::Utc>, String)> = Vec::new();
        for recorded in reader.stream_events(tally_ledger::domain::STRIPE_INTAKE_STREAM, None, 1_000) {
            let recorded = recorded.map_err(|error| ApiError::from(LedgerError::from(error)))?;
            let event = tally_ledger::codec::decode_intake(&recorded)
                .map_err(|error| ApiError::from(LedgerError::from(error)))?;
            let payload = match (&query.customer, event) {
                (None, IntakeEvent::StripeEventUnprocessed { payload, .. }) => (recorded.recorded_at, payload),
                (
                    Some(wanted),
                    IntakeEvent::StripeEventIgnored {
                        created,
                        customer_id: Some(customer),
                        payload: Some(payload),
                        ..
                    },
                ) if customer == *wanted => (created, payload),
                _ => continue,
            };
            if !kept.iter().any(|(_, seen)| *seen == payload.1) {
                kept.push(payload);
            }
        }
        // A customer's events in Stripe's order (stable: events of one second
        // keep the order they arrived in); unprocessed ones in log order.
        if query.customer.is_some() {
            kept.sort_by_key(|(created, _)| *created);
        }
        Ok(kept.into_iter().map(|(_, payload)| payload).collect())
    })
    .await??;
    let mut report = ReplayReport { replayed: 0, applied: 0, ignored: 0, still_unprocessed: 0, refused: 0 };
    for payload in payloads {
        report.replayed += 1;
        match process(&state, payload.as_bytes()).await.0 {
            Ok(answer) => match answer["status"].as_str() {
                Some("applied") => report.applied += 1,
                Some("ignored") => report.ignored += 1,
                _ => report.still_unprocessed += 1,
            },
            Err(ApiError::Ledger(LedgerError::Rejected(_))) => report.refused += 1,
            Err(error) => return Err(error),
        }
    }
    Ok(HttpResponse::Ok().json(report))
}

fn webhook_idempotency(scope: &str, key: &str) -> Idempotency {
    Idempotency {
        scope: scope.to_owned(),
        key: key.to_owned(),
        fingerprint: Sha256::digest(key.as_bytes()).into(),
        status: 200,
    }
}

async fn record_intake(state: &AppState, key: &str, event: IntakeEvent) -> Result<(), ApiError> {
    let ledger = state.ledger.clone();
    let request = Request::new(event, "stripe").with_idempotency(webhook_idempotency(INTAKE_SCOPE, key));
    actix_web::web::block(move || ledger.record_intake(request)).await??;
    Ok(())
}

async fn unprocessed(
    state: &AppState,
    event_id: Option<String>,
    event_type: Option<String>,
    reason: String,
    bytes: &[u8],
) -> Result<serde_json::Value, ApiError> {
    let key = event_id.clone().unwrap_or_else(|| format!("body-{}", hex::encode(Sha256::digest(bytes))));
    tracing::warn!(stripe_event_id = %key, %reason, "a genuine Stripe event could not be processed; kept on stripe-intake");
    let payload = String::from_utf8_lossy(bytes).into_owned();
    let event = IntakeEvent::StripeEventUnprocessed {
        stripe_event_id: event_id.clone(),
        event_type,
        reason: reason.clone(),
        payload,
    };
    // Keyed apart from an ignored record of the same event: an event ignored
    // before its customer was linked, and refused for good when replayed
    // after, is still kept for an operator.
    record_intake(state, &format!("{key}/unprocessed"), event).await?;
    Ok(json!({"status": "unprocessed", "stripe_event_id": event_id, "reason": reason}))
}

/// Record an event as ignored. `unlinked` is the customer and the body of
/// an event ignored only because its customer is linked to no member: kept
/// so that a replay for that customer can apply it once it is linked.
async fn ignored(
    state: &AppState,
    event_id: &str,
    event_type: &str,
    created: i64,
    reason: String,
    unlinked: Option<(String, &[u8])>,
) -> Result<serde_json::Value, ApiError> {
    let created = chrono::DateTime::from_timestamp(created, 0).unwrap_or_default();
    let (customer_id, payload) = match unlinked {
        Some((customer_id, bytes)) => (Some(customer_id), Some(String::from_utf8_lossy(bytes).into_owned())),
        None => (None, None),
    };
    let event = IntakeEvent::StripeEventIgnored {
        stripe_event_id: event_id.to_owned(),
        event_type: event_type.to_owned(),
        created,
        reason: reason.clone(),
        customer_id,
        payload,
    };
    record_intake(state, event_id, event).await?;
    Ok(json!({"status": "ignored", "stripe_event_id": event_id, "reason": reason}))
}

/// The member a Stripe object belongs to: the customer's link first, then
/// `metadata.tally_member_id`.
pub(crate) async fn find_member(
    state: &AppState,
    customer_id: Option<String>,
    member_hint: Option<String>,
) -> Result<Option<String>, ApiError> {
    if let Some(customer_id) = customer_id {
        let ledger = state.ledger.clone();
        let stream = actix_web::web::block(move || -> Result<Option<String>, LedgerError> {
            Ok(ledger.reader()?.stripe_customer_stream(&customer_id)?)
        })
        .await??;
        if let Some(member_id) = stream.and_then(|stream| stream.strip_prefix("member-").map(str::to_owned)) {
            return Ok(Some(member_id));
        }
    }
    Ok(member_hint.filter(|member_id| validate::identifier("tally_member_id", member_id).is_ok()))
}

/// Where an event comes from: Stripe's webhook (its body kept on
/// `stripe-intake` when it is not applied, for a replay) or `stripe sync`
/// (answered, not kept: running the sync again is its retry).
#[derive(Clone, Copy)]
pub(crate) enum Origin<'a> {
    Webhook(&'a [u8]),
    Sync,
}

pub(crate) async fn apply(
    state: &AppState,
    parsed: &tally_stripe::ParsedEvent,
    customer_id: Option<String>,
    member_hint: Option<String>,
    mut command: StripeCommand,
    origin: Origin<'_>,
) -> Result<serde_json::Value, ApiError> {
    command.event_mut().refund_policy = state.stripe.refund_policy;
    let customer = customer_id.clone().unwrap_or_else(|| "(none)".to_owned());
    let (bytes, unlinked) = match origin {
        Origin::Webhook(bytes) => (Some(bytes), customer_id.clone().map(|customer_id| (customer_id, bytes))),
        Origin::Sync => (None, None),
    };
    let not_applied =
        |status: &str, reason: String| json!({"status": status, "stripe_event_id": parsed.id, "reason": reason});
    let Some(member_id) = find_member(state, customer_id, member_hint).await? else {
        let reason = format!("Stripe customer {customer} is linked to no member");
        if bytes.is_none() {
            return Ok(not_applied("ignored", reason));
        }
        return ignored(state, &parsed.id, &parsed.event_type, parsed.created, reason, unlinked).await;
    };
    let ledger = state.ledger.clone();
    let request = Request::new(MemberCommand::Stripe(command), "stripe")
        .with_idempotency(webhook_idempotency(WEBHOOK_SCOPE, &parsed.id));
    let member = member_id.clone();
    match actix_web::web::block(move || ledger.execute(&member, request)).await? {
        Ok(executed) => {
            state.metrics.command("stripe.webhook", executed.outcome.events.len());
            state.projections.notify();
            let outcome = &executed.outcome;
            Ok(json!({
                "status": "applied",
                "stripe_event_id": parsed.id,
                "member_id": member_id,
                "replayed": executed.replayed,
                "position": outcome.position,
                "events": outcome.events.iter().map(|appended| &appended.event).collect::<Vec<_>>(),
            }))
        }
        Err(LedgerError::Rejected(DomainError::MemberNotFound { .. })) => {
            let reason = format!("member {member_id} (from Stripe customer {customer}) does not exist");
            if bytes.is_none() {
                return Ok(not_applied("ignored", reason));
            }
            ignored(state, &parsed.id, &parsed.event_type, parsed.created, reason, unlinked).await
        }
        // A price no plan has: refused, so that Stripe retries, and a retry
        // after the catalog is fixed goes through.
        Err(LedgerError::Rejected(rejection)) if rejection.field() == Some("stripe_price_id") && bytes.is_some() => {
            Err(LedgerError::Rejected(rejection).into())
        }
        // Anything else the ledger refuses would be refused again on every
        // retry: acknowledged, kept verbatim with the reason for an operator.
        Err(LedgerError::Rejected(rejection)) => {
            let reason = format!("member {member_id}: {rejection}");
            let Some(bytes) = bytes else { return Ok(not_applied("unprocessed", reason)) };
            unprocessed(state, Some(parsed.id.clone()), Some(parsed.event_type.clone()), reason, bytes).await
        }
        Err(error) => Err(error.into()),
    }
}

// ---------------------------------------------------------------------------
// Outbound: a Stripe-billed subscription
// ---------------------------------------------------------------------------

/// Start a Stripe-billed subscription: create the Stripe customer (unless
/// the member has one) and subscription, then record Stripe's answer. A
/// Stripe error leaves the ledger unchanged (`payment_provider_error`).
/// Stripe's idempotency keys derive from the request's, so a retried
/// request gets the same customer and subscription.
pub(crate) async fn start_with_stripe(
    state: &AppState,
    request: &HttpRequest,
    bytes: &[u8],
    plan_id: String,
    route: Route,
) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(state, request)?;
    principal.require_admin()?;
    let member_id = member_path(request.match_info().get("member").unwrap_or_default())?;
    let Some(api) = state.stripe.api.clone() else {
        return Err(ApiError::validation("billing", "Stripe is not configured: set TALLY_STRIPE_SECRET_KEY"));
    };
    let idempotency =
        crate::commands::idempotency(request, &principal, &member_id, route.name, bytes, route.status, true)?
            .ok_or_else(|| ApiError::InvalidHeader {
                header: "Idempotency-Key",
                message: "this route needs an Idempotency-Key header".to_owned(),
            })?;
    // A retried request is answered from its record before anything is
    // checked or sent to Stripe again (a different body is refused).
    let ledger = state.ledger.clone();
    let lookup = idempotency.clone();
    if let Some(executed) = actix_web::web::block(move || ledger.recorded(&lookup)).await?? {
        return Ok(crate::commands::render(route.object, Some(member_id), executed, route.status));
    }
    let key = idempotency.key.clone();
    let entry = state.ledger.catalog().plan(&plan_id).cloned().ok_or_else(|| {
        ApiError::Ledger(LedgerError::Rejected(DomainError::PlanNotFound { plan_id: plan_id.clone() }))
    })?;
    let Some(price_id) = entry.terms.plan.stripe_price_id.clone() else {
        return Err(ApiError::validation("plan_id", "the plan has no stripe_price_id: it cannot be billed by Stripe"));
    };
    if entry.retired {
        return Err(ApiError::validation("plan_id", "the plan is retired and cannot be newly chosen"));
    }
    let ledger = state.ledger.clone();
    let member = member_id.clone();
    let member_state = actix_web::web::block(move || ledger.member_state(&member)).await??;
    if !member_state.is_registered() {
        return Err(ApiError::Ledger(LedgerError::Rejected(DomainError::MemberNotFound { member_id })));
    }
    if member_state.subscription.as_ref().is_some_and(|subscription| subscription.is_live()) {
        return Err(ApiError::validation("plan_id", "the member already has an active subscription"));
    }
    if !entry.terms.plan.currency.eq_ignore_ascii_case(&member_state.profile.currency) {
        return Err(ApiError::validation("plan_id", "the plan's currency differs from the member's"));
    }
    // Stripe's keys: the request's key within its scope (principal, member,
    // route), hashed to a fixed length.
    let key = hex::encode(Sha256::digest(format!("{}\n{key}", idempotency.scope).as_bytes()));

    let customer_id = match member_state.profile.stripe_customer_id.clone() {
        Some(customer_id) => customer_id,
        None => api.create_customer(&member_id, &key).await.map_err(ApiError::from)?,
    };
    let facts = api.create_subscription(&customer_id, &price_id, &member_id, &key).await?;
    let subscription =
        tally_stripe::mapping::subscription_snapshot(&facts, false).map_err(|mapped| ApiError::PaymentProvider {
            status: None,
            code: "unexpected_response".to_owned(),
            message: format!("Stripe's subscription cannot be recorded: {mapped:?}"),
        })?;
    let command = MemberCommand::Stripe(StripeCommand::Subscription {
        event: StripeEventRef {
            event_id: format!("tally_created_{}", facts.id),
            // Not a Stripe event type: tally's own creation sets no watermark,
            // so Stripe's `customer.subscription.*` events still apply.
            event_type: "tally.subscription.created".to_owned(),
            created: state.ledger.now(),
            customer_id: Some(customer_id),
            refund_policy: state.stripe.refund_policy,
        },
        subscription,
    });
    let (view, status) = execute_member(state, &principal, member_id, route, command, Some(idempotency)).await?;
    Ok(crate::commands::respond(view, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_are_labels_only_when_they_look_like_stripes() {
        assert_eq!(api_version_label(Some("2020-03-02")), "2020-03-02");
        assert_eq!(api_version_label(Some("2026-09-30.endive")), "2026-09-30.endive");
        assert_eq!(api_version_label(None), "none");
        assert_eq!(api_version_label(Some("")), "other");
        assert_eq!(api_version_label(Some("a\"b")), "other");
        assert_eq!(api_version_label(Some(&"9".repeat(41))), "other");
    }
}
