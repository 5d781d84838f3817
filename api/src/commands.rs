//! The write routes: each maps a request to one ledger command, sends it to
//! the single writer, and answers once the command is durable.

use crate::auth::Principal;
use crate::body;
use crate::dto::*;
use crate::error::{ApiError, Problem};
use crate::{AppState, authenticate};
use actix_web::web::{Bytes, Data, Path};
use actix_web::{HttpRequest, HttpResponse, post, put};
use tally_ledger::domain::*;
use tally_ledger::service::{Executed, Idempotency};
use tally_ledger::{LedgerError, Request};

/// Longest accepted `Idempotency-Key`.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

fn missing_idempotency_key() -> ApiError {
    ApiError::InvalidHeader {
        header: "Idempotency-Key",
        message: "this route moves credits or money and needs an Idempotency-Key header".to_owned(),
    }
}

/// Refuse a request without the header before its body is read, where the
/// body decides which path the route takes.
fn require_idempotency_header(request: &HttpRequest) -> Result<(), ApiError> {
    match request.headers().contains_key("Idempotency-Key") {
        true => Ok(()),
        false => Err(missing_idempotency_key()),
    }
}

pub(crate) fn idempotency(
    request: &HttpRequest,
    principal: &Principal,
    member_id: &str,
    route: &str,
    bytes: &[u8],
    status: u16,
    required: bool,
) -> Result<Option<Idempotency>, ApiError> {
    let Some(header) = request.headers().get("Idempotency-Key") else {
        return if required { Err(missing_idempotency_key()) } else { Ok(None) };
    };
    let key = header
        .to_str()
        .ok()
        .filter(|key| {
            !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_BYTES_MAX && key.bytes().all(|byte| byte.is_ascii_graphic())
        })
        .ok_or_else(|| ApiError::InvalidHeader {
            header: "Idempotency-Key",
            message: format!("must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} printable ASCII characters"),
        })?;
    // Scoped to (principal, member, route): a key never reveals another member's request.
    let scope = format!("{}/{member_id}/{route}", principal.actor());
    Ok(Some(Idempotency {
        scope,
        key: key.to_owned(),
        fingerprint: body::fingerprint(request.method().as_str(), request.path(), bytes),
        status,
    }))
}

pub(crate) fn balance_view(balance: &tally_ledger::service::BalanceView) -> BalanceView {
    BalanceView {
        balance: balance.balance.0,
        available: balance.available.0,
        held: balance.held.0,
        debt: balance.debt.0,
    }
}

/// The answer to a command, in the envelope every write route shares: what
/// it acted on (`object` and its ids, read from the command's own events),
/// the log `position`, the balance where credits moved, and the events. A
/// replay answers with the status and body of the original.
pub(crate) fn command_view(
    object: Object,
    member_id: Option<String>,
    executed: Executed,
    status: u16,
) -> (CommandView, u16) {
    let Executed { outcome, replayed, status: replayed_status } = executed;
    let status = if replayed { replayed_status } else { status };
    let mut view = CommandView {
        object: object.as_str(),
        member_id,
        position: outcome.position,
        balance: outcome.balance.as_ref().map(balance_view),
        replayed,
        // Describes the original outcome, so a replay of it says the same.
        already: outcome.events.is_empty(),
        ..CommandView::default()
    };
    for appended in &outcome.events {
        describe(&mut view, &appended.event);
    }
    view.events = outcome
        .events
        .into_iter()
        .map(|appended| {
            let mut event = appended.event;
            if let Some(object) = event.as_object_mut() {
                object.insert("position".to_owned(), appended.position.into());
            }
            event
        })
        .collect();
    (view, status)
}

/// The events as stored (v1 JSON, the shapes of `MemberEvent` and
/// `CatalogEvent`), read by field rather than decoded whole: an answer is on
/// every write's path, and a full decode cost the usage route ~7 % of its
/// capacity over HTTP.
mod stored {
    use super::GrantPartView;
    use chrono::{DateTime, Utc};
    use serde_json::Value;

    pub(super) fn text(event: &Value, field: &str) -> Option<String> {
        event.get(field)?.as_str().map(str::to_owned)
    }

    pub(super) fn number(event: &Value, field: &str) -> Option<i64> {
        event.get(field)?.as_i64()
    }

    pub(super) fn instant(event: &Value, field: &str) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(event.get(field)?.as_str()?).ok().map(|at| at.with_timezone(&Utc))
    }

    /// `[{grant_id, amount}]`, as `CreditsDeducted.parts` and friends store it.
    pub(super) fn parts(event: &Value, field: &str) -> Option<Vec<GrantPartView>> {
        let parts = event.get(field)?.as_array()?;
        Some(
            parts
                .iter()
                .filter_map(|part| {
                    Some(GrantPartView { grant_id: text(part, "grant_id")?, amount: number(part, "amount")? })
                })
                .collect(),
        )
    }
}

/// Lift the ids and amounts a client needs from one of the command's events.
fn describe(view: &mut CommandView, event: &serde_json::Value) {
    use stored::{instant, number, parts, text};
    let Some(event_type) = event.get("type").and_then(|kind| kind.as_str()) else { return };
    match event_type {
        "CreditsGranted" => {
            if let Some(grant_id) = text(event, "grant_id") {
                view.grant_id.get_or_insert_with(|| grant_id.clone());
                view.grant_ids.push(grant_id);
            }
        }
        "CreditsGrantScheduled" => {
            view.schedule_id = text(event, "schedule_id");
            view.effective_at = instant(event, "effective_at");
        }
        "UsageRecorded" => view.usage_id = text(event, "usage_id"),
        "CreditsDeducted" => {
            view.usage_id = text(event, "usage_id");
            view.burned = parts(event, "parts");
            view.debt_incurred = number(event, "debt");
        }
        "CreditsDebited" => view.burned = parts(event, "parts"),
        "UsageReversed" => {
            view.usage_id = text(event, "usage_id");
            view.debt_reduced = number(event, "debt_reduced");
            view.refunded = number(event, "refunded");
        }
        "CreditsReserved" => {
            view.reservation_id = text(event, "reservation_id");
            view.deadline = instant(event, "deadline");
            view.held = number(event, "amount");
            view.holds = parts(event, "holds");
        }
        "ReservationSettled" => {
            view.reservation_id = text(event, "reservation_id");
            view.charged = number(event, "charged");
            view.burned = parts(event, "parts");
            view.released = number(event, "released");
        }
        "ReservationReleased" => {
            view.reservation_id = text(event, "reservation_id");
            view.released = number(event, "released");
        }
        "SubscriptionStarted" => {
            view.plan_id = event.get("terms").and_then(|terms| text(terms, "plan_id"));
            view.subscription_status = event.get("status").and_then(|status| status.as_str()).and_then(status_word);
            view.period_start = instant(event, "period_start");
            view.period_end = instant(event, "period_end");
        }
        "SubscriptionPlanChanged" => view.plan_id = event.get("terms").and_then(|terms| text(terms, "plan_id")),
        "SubscriptionDowngradeScheduled" => {
            view.plan_id = event.get("terms").and_then(|terms| text(terms, "plan_id"));
            view.effective_at = instant(event, "effective_at");
        }
        "SubscriptionCancelScheduled" => view.cancel_at = instant(event, "effective_at"),
        "SubscriptionCanceled" => {
            view.subscription_status = Some("canceled");
            view.canceled_at = instant(event, "canceled_at");
        }
        "InvoiceIssued" | "PaymentSucceeded" | "InvoiceVoided" | "InvoiceMarkedUncollectible"
            if view.invoice_id.is_none() =>
        {
            view.invoice_id = text(event, "invoice_id");
        }
        "PlanPublished" | "PlanRevised" => view.plan_id = event.get("plan").and_then(|plan| text(plan, "plan_id")),
        _ => {}
    }
}

/// A stored status as the answer words it.
fn status_word(status: &str) -> Option<&'static str> {
    SubscriptionStatus::ALL.into_iter().map(SubscriptionStatus::as_str).find(|known| *known == status)
}

/// The HTTP response for a command's view.
pub(crate) fn respond(view: CommandView, status: u16) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK);
    let mut response = HttpResponse::build(status);
    if view.replayed {
        response.insert_header(("Idempotent-Replayed", "true"));
    }
    response.json(view)
}

pub(crate) fn render(object: Object, member_id: Option<String>, executed: Executed, status: u16) -> HttpResponse {
    let (view, status) = command_view(object, member_id, executed, status);
    respond(view, status)
}

/// What a command acts on: the `object` of its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Object {
    Member,
    Plan,
    Subscription,
    Grant,
    Debit,
    Usage,
    UsageReversal,
    Reservation,
    Invoice,
}

impl Object {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Object::Member => "member",
            Object::Plan => "plan",
            Object::Subscription => "subscription",
            Object::Grant => "grant",
            Object::Debit => "debit",
            Object::Usage => "usage",
            Object::UsageReversal => "usage_reversal",
            Object::Reservation => "reservation",
            Object::Invoice => "invoice",
        }
    }
}

/// What a write route needs to say about itself. Every one is in
/// [`WRITE_ROUTES`], which the OpenAPI document reads for its
/// `Idempotency-Key` parameters.
pub(crate) struct Route {
    pub(crate) name: &'static str,
    pub(crate) method: &'static str,
    pub(crate) path: &'static str,
    pub(crate) object: Object,
    pub(crate) status: u16,
    /// Routes that move credits or money refuse a request without a key.
    pub(crate) idempotency_required: bool,
    /// Whether a member key may call it on its own member (usage, check,
    /// reservations); everything else is admin only.
    pub(crate) member_key_allowed: bool,
}

pub(crate) const ROUTE_MEMBER: Route = Route {
    name: "member",
    method: "PUT",
    path: "/v1/members/{member}",
    object: Object::Member,
    status: 200,
    idempotency_required: false,
    member_key_allowed: false,
};
const ROUTE_SUBSCRIPTION_START: Route = Route {
    name: "subscription.start",
    method: "POST",
    path: "/v1/members/{member}/subscription",
    object: Object::Subscription,
    status: 201,
    idempotency_required: true,
    member_key_allowed: false,
};

/// Every member write route (POST /v1/plans keys its requests apart).
pub(crate) const WRITE_ROUTES: &[Route] = &[
    ROUTE_MEMBER,
    ROUTE_SUBSCRIPTION_START,
    ROUTE_SUBSCRIPTION_CHANGE,
    ROUTE_SUBSCRIPTION_CANCEL,
    ROUTE_CREDITS_GRANT,
    ROUTE_CREDITS_DEBIT,
    ROUTE_USAGE,
    ROUTE_USAGE_REVERSE,
    ROUTE_RESERVATIONS,
    ROUTE_RESERVATIONS_SETTLE,
    ROUTE_RESERVATIONS_RELEASE,
    ROUTE_INVOICES_PAY,
    ROUTE_INVOICES_VOID,
    ROUTE_INVOICES_UNCOLLECTIBLE,
];

/// Send one member command to the writer and describe what it did.
pub(crate) async fn execute_member(
    state: &AppState,
    principal: &Principal,
    member_id: String,
    route: Route,
    command: MemberCommand,
    idempotency: Option<Idempotency>,
) -> Result<(CommandView, u16), ApiError> {
    let ledger = state.ledger.clone();
    let mut ledger_request = Request::new(command, &principal.actor());
    ledger_request.idempotency = idempotency;
    let member = member_id.clone();
    let executed = actix_web::web::block(move || ledger.execute(&member, ledger_request)).await??;
    state.metrics.command(route.name, executed.outcome.events.len());
    // Wake the projection runner and the webhook sender now rather than at
    // their next poll.
    state.projections.notify();
    state.webhooks.wake.notify_one();
    Ok(command_view(route.object, Some(member_id), executed, route.status))
}

fn grant_source(source: &str) -> Result<GrantSource, ApiError> {
    match source {
        "purchase" => Ok(GrantSource::Purchase),
        "promotional" => Ok(GrantSource::Promotional),
        "adjustment" => Ok(GrantSource::Adjustment),
        _ => Err(ApiError::validation("source", "must be purchase, promotional or adjustment")),
    }
}

fn category(category: &str) -> Result<GrantCategory, ApiError> {
    match category {
        "paid" => Ok(GrantCategory::Paid),
        "promotional" => Ok(GrantCategory::Promotional),
        _ => Err(ApiError::validation("category", "must be paid or promotional")),
    }
}

fn priority(priority: Option<i64>) -> Result<Option<u8>, ApiError> {
    priority
        .map(|value| u8::try_from(value).ok().filter(|value| *value <= 100))
        .map(|value| value.ok_or_else(|| ApiError::validation("priority", "must be between 0 and 100")))
        .transpose()
}

pub(crate) fn member_path(path: &str) -> Result<String, ApiError> {
    validate::identifier("member", path).map_err(ApiError::from)?;
    Ok(path.to_owned())
}

#[utoipa::path(put, path = "/v1/members/{member}", tag = "members", request_body = MemberBody,
    params(("member" = String, Path, description = "The member id")),
    responses((status = 200, body = CommandView), (status = 422, body = Problem)), security(("bearer" = [])))]
#[put("/v1/members/{member}")]
pub async fn put_member(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
    bytes: Bytes,
) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(&state, &request)?;
    principal.require_admin()?;
    let member_id = member_path(&path)?;
    let body: MemberBody = body::parse(&bytes)?;
    // Omitted fields keep their current values (or the defaults for a new member).
    let ledger = state.ledger.clone();
    let member = member_id.clone();
    let current = actix_web::web::block(move || ledger.member_state(&member)).await?;
    let defaults = match current {
        Ok(current) if current.is_registered() => current.profile,
        _ => MemberProfile::default(),
    };
    let profile = MemberProfile {
        time_zone: body.time_zone.unwrap_or(defaults.time_zone),
        currency: body.currency.unwrap_or(defaults.currency),
        stripe_customer_id: body.stripe_customer_id.or(defaults.stripe_customer_id),
    };
    let route = ROUTE_MEMBER;
    let command = MemberCommand::Register(profile);
    let idempotency = idempotency(&request, &principal, &member_id, route.name, &bytes, route.status, false)?;
    let (view, status) = execute_member(&state, &principal, member_id, route, command, idempotency).await?;
    Ok(respond(view, status))
}

pub(crate) fn plan_from_body(body: PlanBody) -> Result<Plan, ApiError> {
    if body.interval != "month" {
        return Err(ApiError::validation("interval", "only month is supported"));
    }
    Ok(Plan {
        plan_id: body.plan_id,
        name: body.name,
        price: MinorUnits(body.price),
        currency: body.currency,
        interval: Interval::Month,
        monthly_credits: Credits(body.monthly_credits),
        rollover: Rollover { enabled: body.rollover.enabled, max_credits: Credits(body.rollover.max_credits) },
        overage: Overage {
            allowed: body.overage.allowed,
            limit_credits: Credits(body.overage.limit_credits),
            unit_price: MinorUnits(body.overage.unit_price),
        },
        rate_limit_per_minute: body.rate_limit_per_minute,
        stripe_price_id: body.stripe_price_id,
    })
}

#[utoipa::path(post, path = "/v1/plans", tag = "plans", request_body = PlanBody,
    responses((status = 201, body = CommandView), (status = 422, body = Problem)), security(("bearer" = [])))]
#[post("/v1/plans")]
pub async fn post_plan(state: Data<AppState>, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(&state, &request)?;
    principal.require_admin()?;
    let plan = plan_from_body(body::parse(&bytes)?)?;
    let idempotency = idempotency(&request, &principal, "-", "plans", &bytes, 201, false)?;
    let ledger = state.ledger.clone();
    let mut ledger_request = Request::new(CatalogCommand::PublishPlan(plan), &principal.actor());
    ledger_request.idempotency = idempotency;
    let executed = actix_web::web::block(move || ledger.execute_catalog(ledger_request)).await??;
    Ok(render(Object::Plan, None, executed, 201))
}

/// One member write route: its `Route` (path and status written once, for
/// the handler, the document and `WRITE_ROUTES`), its OpenAPI operation
/// (the status it answers, and the problems every such route may answer),
/// its actix handler, and the command its body and path ids make. Everything else is
/// [`member_post`]'s, once for all: credentials, the member's right, the
/// `Idempotency-Key`, the body, the answer.
macro_rules! member_write {
    (
        $name:ident, $route:ident = ($route_name:literal, $object:ident, member_key_allowed: $member_key:literal),
        $path:literal, $status:literal, params($($params:tt)*),
        |$body:ident: $body_type:ident, $ids:ident| $command:expr
    ) => {
        // Every one moves credits or money: the key is required.
        const $route: Route = Route {
            name: $route_name,
            method: "POST",
            path: $path,
            object: Object::$object,
            status: $status,
            idempotency_required: true,
            member_key_allowed: $member_key,
        };

        #[utoipa::path(post, path = $path, tag = "members", request_body = $body_type,
            params($($params)*),
            responses((status = $status, body = CommandView), (status = 402, body = Problem),
                (status = 404, body = Problem), (status = 422, body = Problem)),
            security(("bearer" = [])))]
        #[post($path)]
        pub async fn $name(
            state: Data<AppState>,
            request: HttpRequest,
            bytes: Bytes,
        ) -> Result<HttpResponse, ApiError> {
            member_post(state, request, bytes, $route, |$body: $body_type, $ids: &[String]| $command).await
        }
    };
}

/// Parse, authorise and execute one member route; `to_command` gets the
/// body and the path ids after the member's.
async fn member_post<B: serde::de::DeserializeOwned>(
    state: Data<AppState>,
    request: HttpRequest,
    bytes: Bytes,
    route: Route,
    to_command: impl FnOnce(B, &[String]) -> Result<MemberCommand, ApiError>,
) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(&state, &request)?;
    let member_id = member_path(request.match_info().get("member").unwrap_or_default())?;
    // The path's other ids, in order (usage, reservation or invoice).
    let path: Vec<String> =
        request.match_info().iter().filter(|(name, _)| *name != "member").map(|(_, value)| value.to_owned()).collect();
    if route.member_key_allowed {
        principal.require_member(&member_id)?;
    } else {
        principal.require_admin()?;
    }
    // The header before the body: its absence is the same mistake whatever the body says.
    let idempotency =
        idempotency(&request, &principal, &member_id, route.name, &bytes, route.status, route.idempotency_required)?;
    let body: B = body::parse(&bytes)?;
    let command = to_command(body, &path)?;
    let object = route.object;
    let (mut view, status) = execute_member(&state, &principal, member_id, route, command, idempotency).await?;
    // A command that found its intent already done wrote nothing: name
    // what it acted on from the path, and say where things stand.
    if let Some(id) = path.first().cloned() {
        match object {
            Object::Reservation => view.reservation_id = view.reservation_id.or(Some(id)),
            Object::Invoice => view.invoice_id = view.invoice_id.or(Some(id)),
            Object::UsageReversal => view.usage_id = view.usage_id.or(Some(id)),
            _ => {}
        }
    }
    if view.already && object == Object::Subscription {
        let ledger = state.ledger.clone();
        let member = view.member_id.clone().unwrap_or_default();
        let current = actix_web::web::block(move || ledger.member_state(&member)).await??;
        if let Some(subscription) = current.subscription {
            view.plan_id = Some(subscription.terms.plan.plan_id.clone());
            view.subscription_status = Some(subscription.status.as_str());
            view.cancel_at = subscription.cancel_at_period_end.then_some(subscription.period_end);
            view.period_end = Some(subscription.period_end);
        }
    }
    Ok(respond(view, status))
}

fn grant_command(body: GrantBody) -> Result<MemberCommand, ApiError> {
    Ok(MemberCommand::GrantCredits(GrantCredits {
        source: grant_source(&body.source)?,
        amount: Credits(body.amount),
        priority: priority(body.priority)?,
        category: body.category.as_deref().map(category).transpose()?,
        expires_at: body.expires_at,
        effective_at: body.effective_at,
        reason: body.reason,
        price: body.price.map(MinorUnits),
    }))
}

pub(crate) fn usage_command(body: UsageBody) -> MemberCommand {
    MemberCommand::RecordUsage(RecordUsage {
        usage_id: body.usage_id,
        metric: body.metric,
        quantity: body.quantity,
        credits: Credits(body.credits),
        occurred_at: body.occurred_at,
        integration_id: body.integration_id,
        query_id: body.query_id,
    })
}

fn settle_command(body: SettleBody, reservation_id: &str) -> Result<MemberCommand, ApiError> {
    let query = body
        .query
        .map(|query| {
            let status = match query.status.as_str() {
                "succeeded" => QueryStatus::Succeeded,
                "failed" => QueryStatus::Failed,
                _ => return Err(ApiError::validation("query.status", "must be succeeded or failed")),
            };
            Ok(QueryExecution {
                integration_id: query.integration_id,
                query_id: query.query_id,
                status,
                duration_ms: query.duration_ms,
                rows: query.rows,
                bytes: 0,
                cache_hit: false,
                error_code: None,
                api_usage: None,
            })
        })
        .transpose()?;
    Ok(MemberCommand::Settle { reservation_id: reservation_id.to_owned(), amount: Credits(body.amount), query })
}

#[utoipa::path(post, path = "/v1/members/{member}/subscription", tag = "members", request_body = StartSubscriptionBody,
    params(("member" = String, Path)),
    responses((status = 201, body = CommandView), (status = 402, body = Problem), (status = 404, body = Problem),
        (status = 422, body = Problem), (status = 502, description = "payment_provider_error", body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/members/{member}/subscription")]
pub async fn start_subscription(
    state: Data<AppState>,
    request: HttpRequest,
    bytes: Bytes,
) -> Result<HttpResponse, ApiError> {
    let route = ROUTE_SUBSCRIPTION_START;
    // Credentials before the body: a refused caller learns nothing from validation.
    authenticate(&state, &request)?.require_admin()?;
    require_idempotency_header(&request)?;
    let body: StartSubscriptionBody = body::parse(&bytes)?;
    match body.billing.as_deref() {
        None | Some("tally") => {}
        Some("stripe") => return crate::stripe::start_with_stripe(&state, &request, &bytes, body.plan_id, route).await,
        Some(_) => return Err(ApiError::validation("billing", "must be tally or stripe")),
    }
    member_post(state, request, bytes, route, |body: StartSubscriptionBody, _ids: &[String]| {
        Ok(MemberCommand::StartSubscription {
            plan_id: body.plan_id,
            billing: Billing::Tally,
            stripe_subscription_id: None,
        })
    })
    .await
}

member_write! {
    change_subscription, ROUTE_SUBSCRIPTION_CHANGE = ("subscription.change", Subscription, member_key_allowed: false),
    "/v1/members/{member}/subscription/change", 200,
    params(("member" = String, Path)),
    |body: PlanChoiceBody, _ids| {
        Ok(MemberCommand::ChangePlan { plan_id: body.plan_id })
    }
}

member_write! {
    cancel_subscription, ROUTE_SUBSCRIPTION_CANCEL = ("subscription.cancel", Subscription, member_key_allowed: false),
    "/v1/members/{member}/subscription/cancel", 200,
    params(("member" = String, Path)),
    |body: CancelBody, _ids| {
        Ok(MemberCommand::CancelSubscription { at_period_end: body.at_period_end })
    }
}

member_write! {
    grant_credits, ROUTE_CREDITS_GRANT = ("credits.grant", Grant, member_key_allowed: false),
    "/v1/members/{member}/credits/grants", 201,
    params(("member" = String, Path)),
    |body: GrantBody, _ids| grant_command(body)
}

member_write! {
    debit_credits, ROUTE_CREDITS_DEBIT = ("credits.debit", Debit, member_key_allowed: false),
    "/v1/members/{member}/credits/debits", 201,
    params(("member" = String, Path)),
    |body: DebitBody, _ids| {
        Ok(MemberCommand::DebitCredits { amount: Credits(body.amount), reason: body.reason })
    }
}

member_write! {
    record_usage, ROUTE_USAGE = ("usage", Usage, member_key_allowed: true),
    "/v1/members/{member}/usage", 201,
    params(("member" = String, Path)),
    |body: UsageBody, _ids| Ok(usage_command(body))
}

member_write! {
    reverse_usage, ROUTE_USAGE_REVERSE = ("usage.reverse", UsageReversal, member_key_allowed: false),
    "/v1/members/{member}/usage/{usage}/reverse", 200,
    params(("member" = String, Path), ("usage" = String, Path)),
    |body: ReverseBody, ids| {
        Ok(MemberCommand::ReverseUsage { usage_id: ids[0].clone(), reason: body.reason })
    }
}

member_write! {
    reserve, ROUTE_RESERVATIONS = ("reservations", Reservation, member_key_allowed: true),
    "/v1/members/{member}/reservations", 201,
    params(("member" = String, Path)),
    |body: ReserveBody, _ids| {
        Ok(MemberCommand::Reserve { amount: Credits(body.amount), ttl_s: body.ttl_s })
    }
}

member_write! {
    settle, ROUTE_RESERVATIONS_SETTLE = ("reservations.settle", Reservation, member_key_allowed: true),
    "/v1/members/{member}/reservations/{reservation}/settle", 200,
    params(("member" = String, Path), ("reservation" = String, Path)),
    |body: SettleBody, ids| settle_command(body, &ids[0])
}

member_write! {
    release, ROUTE_RESERVATIONS_RELEASE = ("reservations.release", Reservation, member_key_allowed: true),
    "/v1/members/{member}/reservations/{reservation}/release", 200,
    params(("member" = String, Path), ("reservation" = String, Path)),
    |_body: EmptyBody, ids| {
        Ok(MemberCommand::Release { reservation_id: ids[0].clone() })
    }
}

member_write! {
    pay_invoice, ROUTE_INVOICES_PAY = ("invoices.pay", Invoice, member_key_allowed: false),
    "/v1/members/{member}/invoices/{invoice}/pay", 200,
    params(("member" = String, Path), ("invoice" = String, Path)),
    |_body: EmptyBody, ids| {
        Ok(MemberCommand::PayInvoice { invoice_id: ids[0].clone() })
    }
}

member_write! {
    void_invoice, ROUTE_INVOICES_VOID = ("invoices.void", Invoice, member_key_allowed: false),
    "/v1/members/{member}/invoices/{invoice}/void", 200,
    params(("member" = String, Path), ("invoice" = String, Path)),
    |_body: EmptyBody, ids| {
        Ok(MemberCommand::VoidInvoice { invoice_id: ids[0].clone() })
    }
}

member_write! {
    uncollectible_invoice, ROUTE_INVOICES_UNCOLLECTIBLE = ("invoices.uncollectible", Invoice, member_key_allowed: false),
    "/v1/members/{member}/invoices/{invoice}/uncollectible", 200,
    params(("member" = String, Path), ("invoice" = String, Path)),
    |_body: EmptyBody, ids| {
        Ok(MemberCommand::MarkInvoiceUncollectible { invoice_id: ids[0].clone() })
    }
}

#[utoipa::path(post, path = "/v1/members/{member}/check", tag = "members", request_body = CheckBody,
    params(("member" = String, Path, description = "The member id")),
    responses((status = 200, body = CheckView), (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
#[post("/v1/members/{member}/check")]
pub async fn check(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
    bytes: Bytes,
) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(&state, &request)?;
    let member_id = member_path(&path)?;
    principal.require_member(&member_id)?;
    let body: CheckBody = body::parse(&bytes)?;
    let ledger = state.ledger.clone();
    let outcome = actix_web::web::block(move || ledger.check(&member_id, Credits(body.credits))).await?;
    let outcome = outcome.map_err(|error| match error {
        LedgerError::Rejected(DomainError::Validation { message, .. }) => ApiError::validation("credits", message),
        other => ApiError::Ledger(other),
    })?;
    Ok(HttpResponse::Ok().json(CheckView {
        allowed: outcome.allowed,
        requested: outcome.requested.0,
        available: outcome.available.0,
        overage_room: outcome.overage_room.0,
        would_incur_debt: outcome.would_incur_debt.0,
        reason: outcome.refusal.map(CheckRefusal::code),
        debt: outcome.would_incur_debt.0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn described(events: Vec<MemberEvent>) -> CommandView {
        let mut view = CommandView::default();
        for event in events {
            describe(&mut view, &serde_json::to_value(event).expect("events serialise"));
        }
        view
    }

    fn part(grant_id: &str, amount: i64) -> GrantPart {
        GrantPart { grant_id: grant_id.to_owned(), amount: Credits(amount) }
    }

    /// `describe` reads the events' stored JSON by field: these are the
    /// events themselves, serialised, so a renamed field fails here.
    #[test]
    fn answers_read_their_ids_from_the_events_as_stored() {
        let deadline = chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 10, 0).unwrap();
        let usage = described(vec![MemberEvent::CreditsDeducted {
            usage_id: "u1".into(),
            amount: Credits(7),
            parts: vec![part("g1", 5), part("g2", 2)],
            debt: Credits(0),
            unit_price: MinorUnits(0),
        }]);
        assert_eq!(usage.usage_id.as_deref(), Some("u1"));
        let burned: Vec<(String, i64)> =
            usage.burned.unwrap().into_iter().map(|part| (part.grant_id, part.amount)).collect();
        assert_eq!(burned, vec![("g1".to_owned(), 5), ("g2".to_owned(), 2)]);
        assert_eq!(usage.debt_incurred, Some(0));

        let reserved = described(vec![MemberEvent::CreditsReserved {
            reservation_id: "rsv_3".into(),
            amount: Credits(40),
            holds: vec![part("g1", 40)],
            deadline,
        }]);
        assert_eq!(
            (reserved.reservation_id.as_deref(), reserved.held, reserved.deadline),
            (Some("rsv_3"), Some(40), Some(deadline))
        );
        let released = described(vec![MemberEvent::ReservationReleased {
            reservation_id: "rsv_3".into(),
            reason: ReleaseReason::Released,
            released: Credits(40),
            released_parts: vec![part("g1", 40)],
        }]);
        assert_eq!((released.reservation_id.as_deref(), released.released), (Some("rsv_3"), Some(40)));
        let reversed = described(vec![MemberEvent::UsageReversed {
            usage_id: "u1".into(),
            credits: Credits(7),
            debt_reduced: Credits(3),
            refunded: Credits(4),
            reason: None,
        }]);
        assert_eq!((reversed.debt_reduced, reversed.refunded), (Some(3), Some(4)));
        let canceled = described(vec![MemberEvent::SubscriptionCancelScheduled { effective_at: deadline }]);
        assert_eq!(canceled.cancel_at, Some(deadline));
        let voided = described(vec![MemberEvent::InvoiceVoided { invoice_id: "inv_m1_2".into() }]);
        assert_eq!(voided.invoice_id.as_deref(), Some("inv_m1_2"));
    }
}
