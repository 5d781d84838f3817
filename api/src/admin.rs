//! Plans, member keys, the admin event feed, the test clock, health,
//! readiness, metrics and the OpenAPI document.

use crate::auth::{IssuedKey, KeyInfo};
use crate::dto::*;
use crate::error::{ApiError, Problem};
use crate::{AppState, authenticate, body};
use actix_web::web::{Bytes, Data, Path};
use actix_web::{HttpRequest, HttpResponse, get, post};
use chrono::Datelike;
use serde::{Deserialize, Serialize};
use tally_ledger::domain::validate;
use utoipa::{IntoParams, ToSchema};

/// The test clock stays well inside the years the store can record.
pub const CLOCK_YEAR_MAX: i32 = 9000;
/// Most events one page of the feed returns.
pub const EVENTS_PAGE_SIZE_MAX: usize = 1_000;
pub const EVENTS_PAGE_SIZE_DEFAULT: usize = 100;

pub(crate) fn plan_view(entry: &tally_ledger::domain::CatalogEntry) -> PlanView {
    let plan = &entry.terms.plan;
    PlanView {
        plan_id: plan.plan_id.clone(),
        name: plan.name.clone(),
        price: plan.price.0,
        currency: plan.currency.clone(),
        interval: "month".to_owned(),
        monthly_credits: plan.monthly_credits.0,
        rollover: RolloverBody { enabled: plan.rollover.enabled, max_credits: plan.rollover.max_credits.0 },
        overage: OverageBody {
            allowed: plan.overage.allowed,
            limit_credits: plan.overage.limit_credits.0,
            unit_price: plan.overage.unit_price.0,
        },
        rate_limit_per_minute: plan.rate_limit_per_minute,
        stripe_price_id: plan.stripe_price_id.clone(),
        plan_version: entry.terms.plan_version,
        retired: entry.retired,
    }
}

#[utoipa::path(get, path = "/v1/plans", tag = "plans", responses((status = 200, body = PlanList), (status = 401, body = Problem)),
    security(("bearer" = [])))]
#[get("/v1/plans")]
pub async fn list_plans(state: Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &request)?;
    let catalog = state.ledger.catalog();
    let plans = catalog.plans.values().map(plan_view).collect();
    Ok(HttpResponse::Ok().json(PlanList { plans }))
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyInfo>,
}

fn member_path(path: &str) -> Result<String, ApiError> {
    validate::identifier("member", path).map_err(ApiError::from)?;
    Ok(path.to_owned())
}

#[utoipa::path(post, path = "/v1/members/{member}/api-keys", tag = "keys", request_body = EmptyBody,
    params(("member" = String, Path, description = "The member id")),
    responses((status = 201, body = IssuedKey), (status = 404, body = Problem)), security(("bearer" = [])))]
#[post("/v1/members/{member}/api-keys")]
pub async fn issue_key(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
    bytes: Bytes,
) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &request)?.require_admin()?;
    let member_id = member_path(&path)?;
    let _: EmptyBody = body::parse(&bytes)?;
    let ledger = state.ledger.clone();
    let member = member_id.clone();
    let exists = actix_web::web::block(move || ledger.member_state(&member)).await??.is_registered();
    if !exists {
        return Err(ApiError::NotFound(format!("member `{member_id}` not found")));
    }
    let issued = state.keys.issue(&member_id).map_err(|error| ApiError::Internal(error.to_string()))?;
    Ok(HttpResponse::Created().json(issued))
}

#[utoipa::path(get, path = "/v1/members/{member}/api-keys", tag = "keys",
    params(("member" = String, Path, description = "The member id")),
    responses((status = 200, body = KeyList)), security(("bearer" = [])))]
#[get("/v1/members/{member}/api-keys")]
pub async fn list_keys(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &request)?.require_admin()?;
    let member_id = member_path(&path)?;
    let keys = state.keys.list(&member_id).map_err(|error| ApiError::Internal(error.to_string()))?;
    Ok(HttpResponse::Ok().json(KeyList { keys }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this position (0 = from the start).
    pub after: Option<u64>,
    /// 1–1,000; 100 by default.
    pub limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct EventView {
    pub position: u64,
    pub stream_id: String,
    pub version: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub event_id: uuid::Uuid,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// SHA-256 chain hash, hex.
    pub hash: String,
}

#[derive(Serialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `after` for the next page; absent at the head.
    pub next_after: Option<u64>,
    pub head: u64,
}

/// Parse the query string; a failure names the parameter at fault.
pub(crate) fn query<T: serde::de::DeserializeOwned>(request: &HttpRequest) -> Result<T, ApiError> {
    let pairs = form_urlencoded::parse(request.query_string().as_bytes());
    serde_path_to_error::deserialize(serde_urlencoded::Deserializer::new(pairs)).map_err(|error| {
        let path = error.path().to_string();
        let message = error.into_inner().to_string();
        let field =
            if path == "." { body::field_in_message(&message).unwrap_or_else(|| "query".to_owned()) } else { path };
        ApiError::validation(field, message)
    })
}

#[utoipa::path(get, path = "/v1/events", tag = "audit", params(EventsQuery),
    responses((status = 200, body = EventPage), (status = 403, body = Problem)), security(("bearer" = [])))]
#[get("/v1/events")]
pub async fn events(state: Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &request)?.require_admin()?;
    let params: EventsQuery = query(&request)?;
    let limit = params.limit.unwrap_or(EVENTS_PAGE_SIZE_DEFAULT);
    if limit == 0 || limit > EVENTS_PAGE_SIZE_MAX {
        return Err(ApiError::validation("limit", format!("must be between 1 and {EVENTS_PAGE_SIZE_MAX}")));
    }
    let after = params.after.unwrap_or(0);
    if after > i64::MAX as u64 {
        return Err(ApiError::validation("after", "is too large"));
    }
    let ledger = state.ledger.clone();
    let (page, head) = actix_web::web::block(move || -> Result<_, tally_ledger::LedgerError> {
        let reader = ledger.reader()?;
        Ok((reader.read_all(after, limit)?, reader.head()?.position))
    })
    .await??;
    let events: Vec<EventView> = page
        .into_iter()
        .map(|event| EventView {
            position: event.position,
            stream_id: event.stream_id,
            version: event.version,
            event_type: event.event_type,
            schema_version: event.schema_version,
            event_id: event.event_id,
            recorded_at: event.recorded_at,
            payload: serde_json::from_str(&event.payload).unwrap_or(serde_json::Value::Null),
            metadata: serde_json::from_str(&event.metadata_json).unwrap_or(serde_json::Value::Null),
            hash: hex::encode(event.hash),
        })
        .collect();
    let next_after = events.last().map(|event| event.position).filter(|last| *last < head);
    Ok(HttpResponse::Ok().json(EventPage { events, next_after, head }))
}

#[utoipa::path(post, path = "/v1/admin/clock", tag = "admin", request_body = ClockBody,
    responses((status = 200, body = ClockView), (status = 422, body = Problem)), security(("bearer" = [])))]
#[post("/v1/admin/clock")]
pub async fn advance_clock(
    state: Data<AppState>,
    request: HttpRequest,
    bytes: Bytes,
) -> Result<HttpResponse, ApiError> {
    let Some(clock) = state.test_clock.clone() else {
        return Err(ApiError::NotFound("the test clock is off: start tally serve with --test-clock".to_owned()));
    };
    authenticate(&state, &request)?.require_admin()?;
    let body: ClockBody = body::parse(&bytes)?;
    if body.now.year() > CLOCK_YEAR_MAX {
        return Err(ApiError::validation("now", format!("must be before the year {CLOCK_YEAR_MAX}")));
    }
    if !clock.advance_to(body.now) {
        return Err(ApiError::validation("now", "the test clock only moves forward"));
    }
    let ledger = state.ledger.clone();
    let report = actix_web::web::block(move || ledger.run_due()).await??;
    Ok(HttpResponse::Ok().json(ClockView {
        now: body.now,
        position: report.position,
        members: report.members,
        events: report.events,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    pub status: &'static str,
    pub head: u64,
    /// Events each read model is behind the head.
    pub lag: std::collections::BTreeMap<String, u64>,
}

/// Ready while every projection is within this many events of the head.
pub const READY_LAG_EVENTS_MAX: u64 = 10_000;

#[utoipa::path(get, path = "/readyz", tag = "ops", responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
#[get("/readyz")]
pub async fn readyz(state: Data<AppState>) -> Result<HttpResponse, ApiError> {
    let projections = state.projections.clone();
    let statuses = actix_web::web::block(move || projections.status())
        .await?
        .map_err(|error| ApiError::Internal(error.to_string()))?;
    let head = statuses.iter().map(|status| status.checkpoint + status.lag).max().unwrap_or(0);
    let lag: std::collections::BTreeMap<String, u64> =
        statuses.iter().map(|status| (status.name.to_string(), status.lag)).collect();
    let worst = lag.values().copied().max().unwrap_or(0);
    state.metrics.projection_lag_events.set(worst as i64);
    let ready = worst <= READY_LAG_EVENTS_MAX;
    let body = Readiness { status: if ready { "ready" } else { "lagging" }, head, lag };
    Ok(if ready { HttpResponse::Ok().json(body) } else { HttpResponse::ServiceUnavailable().json(body) })
}

#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format")))]
#[get("/metrics")]
pub async fn metrics(state: Data<AppState>) -> HttpResponse {
    let projections = state.projections.clone();
    if let Ok(Ok(statuses)) = actix_web::web::block(move || projections.status()).await {
        let worst = statuses.iter().map(|status| status.lag).max().unwrap_or(0);
        state.metrics.projection_lag_events.set(i64::try_from(worst).unwrap_or(i64::MAX));
    }
    let mut text = state.metrics.render(state.ledger.stats());
    let projections = state.projections.clone();
    if let Ok(Ok(counts)) = actix_web::web::block(move || projections.alert_counts()).await {
        text.push_str(&alert_metrics(&counts));
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(text)
}

/// Per rule, the alert episodes opened (a counter: the read model keeps
/// every episode, so a rebuild gives the same count) and those open now.
fn alert_metrics(counts: &[tally_projections::AlertCount]) -> String {
    use std::fmt::Write;
    let mut text = String::from(
        "# HELP tally_alerts_triggered_total Alert episodes opened, by rule.\n\
         # TYPE tally_alerts_triggered_total counter\n",
    );
    for count in counts {
        let _ = writeln!(text, "tally_alerts_triggered_total{{rule=\"{}\"}} {}", count.rule, count.triggered);
    }
    text.push_str("# HELP tally_alerts_open Alert episodes open now, by rule.\n# TYPE tally_alerts_open gauge\n");
    for count in counts {
        let _ = writeln!(text, "tally_alerts_open{{rule=\"{}\"}} {}", count.rule, count.open);
    }
    text
}

#[get("/openapi.json")]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(crate::openapi::document())
}
