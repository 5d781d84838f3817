//! Read routes, served from the projections. Each accepts `min_position`
//! (the `position` of a write's answer) and waits, at most 2 s, until the
//! read models it uses have applied the log that far: read-your-writes.
//! The audit route replays the member's stream instead.

use crate::admin::query;
use crate::auth::Principal;
use crate::error::{ApiError, Problem};
use crate::{AppState, MIN_POSITION_WAIT_MAX, authenticate};
use actix_web::web::{Data, Path};
use actix_web::{HttpRequest, HttpResponse, get};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tally_ledger::domain::{MemberState, member_stream, validate};
use tally_projections::{
    Cursor, ExecutionFilter, Order, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX, Page, PageRequest, ProjectionError, Projections,
    ReadModel,
};
use utoipa::{IntoParams, ToSchema};

/// The longest date range of one daily usage read.
pub const DAILY_RANGE_DAYS_MAX: i64 = 366;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// Wait until the read models reached this log position (from a write's answer).
    pub min_position: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub min_position: Option<u64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1–1,000; 100 by default.
    pub limit: Option<usize>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DailyQuery {
    pub min_position: Option<u64>,
    /// First day, `YYYY-MM-DD`, in the member's time zone.
    pub from: String,
    /// Last day, inclusive.
    pub to: String,
    pub cursor: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExecutionsQuery {
    pub min_position: Option<u64>,
    /// Only this integration's executions.
    pub integration: Option<String>,
    /// Only this query's (`adhoc` for the unsaved ones).
    pub query: Option<String>,
    /// `ok`, `error` or `timeout`.
    pub status: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1–1,000; 100 by default.
    pub limit: Option<usize>,
}

/// The statuses an execution is listed with.
pub const EXECUTION_STATUSES: [&str; 3] = ["ok", "error", "timeout"];

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// RFC 3339 instant: only events recorded at or before it count. Now by default.
    pub as_of: Option<String>,
    /// Accepted like on every read; the audit replays the log itself, so it
    /// only checks that the position exists.
    pub min_position: Option<u64>,
}

pub(crate) fn projection_error(error: ProjectionError) -> ApiError {
    match error {
        ProjectionError::Lagging { position, reached } => ApiError::ProjectionLagging(format!(
            "the read models reached position {reached}, not yet {position}; retry shortly"
        )),
        ProjectionError::PositionBeyondHead { position, head } => {
            ApiError::validation("min_position", format!("{position} is beyond the log's head ({head})"))
        }
        ProjectionError::InvalidArgument { field, reason } => ApiError::validation(field, reason),
        ProjectionError::NotReady { read_model } => {
            ApiError::Unavailable(format!("the read model {read_model} is being built; retry shortly"))
        }
        other => ApiError::Internal(other.to_string()),
    }
}

/// Authorise, then run a blocking read after waiting for `min_position`.
pub(crate) async fn read<T: Send + 'static>(
    state: &AppState,
    principal: &Principal,
    member_id: &str,
    read_models: &'static [ReadModel],
    min_position: Option<u64>,
    run: impl FnOnce(&Projections) -> Result<T, ProjectionError> + Send + 'static,
) -> Result<T, ApiError> {
    validate::identifier("member", member_id).map_err(ApiError::from)?;
    principal.require_member(member_id)?;
    if min_position.is_some_and(|position| position > i64::MAX as u64) {
        return Err(ApiError::validation("min_position", "is too large"));
    }
    let projections: Arc<Projections> = state.projections.clone();
    actix_web::web::block(move || {
        if let Some(position) = min_position {
            projections.wait_for(read_models, position, MIN_POSITION_WAIT_MAX)?;
        }
        run(&projections)
    })
    .await?
    .map_err(projection_error)
}

fn not_found(member_id: &str) -> ApiError {
    ApiError::NotFound(format!("member `{member_id}` not found"))
}

pub(crate) fn page_request(cursor: Option<String>, limit: Option<usize>) -> Result<PageRequest, ApiError> {
    let limit = limit.unwrap_or(PAGE_SIZE_DEFAULT);
    if limit == 0 || limit > PAGE_SIZE_MAX {
        return Err(ApiError::validation("limit", format!("must be between 1 and {PAGE_SIZE_MAX}")));
    }
    Ok(match cursor {
        Some(cursor) => PageRequest::after(Cursor::new(cursor), limit, Order::OldestFirst),
        None => PageRequest::first(limit),
    })
}

#[utoipa::path(get, path = "/v1/members/{member}/balance", tag = "reads", params(("member" = String, Path), ReadQuery),
    responses((status = 200, description = "balance, available, held, debt, totals, next expiry", body = Object),
        (status = 404, body = Problem), (status = 503, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/balance")]
pub async fn balance(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let params: ReadQuery = query(&request)?;
    let member_id = path.into_inner();
    let member = member_id.clone();
    let balance =
        read(&state, &principal, &member_id, &[ReadModel::CreditBalances], params.min_position, move |projections| {
            projections.balance(&member)
        })
        .await?;
    let balance = balance.ok_or_else(|| not_found(&member_id))?;
    Ok(HttpResponse::Ok().json(balance))
}

/// Credentials, then the right to the path's member, before anything of the
/// request is parsed: a refused caller learns nothing from validation.
pub(crate) fn authorize_member(state: &AppState, request: &HttpRequest) -> Result<Principal, ApiError> {
    let principal = authenticate(state, request)?;
    principal.require_member(request.match_info().get("member").unwrap_or_default())?;
    Ok(principal)
}

/// A page of one member's rows as `{member_id, <list>: [...], next_cursor}`,
/// plus `extra` fields; `not_found` when the member was never registered.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn member_page<T: Serialize + Send + 'static>(
    state: &AppState,
    principal: &Principal,
    member_id: String,
    read_models: &'static [ReadModel],
    min_position: Option<u64>,
    list: &'static str,
    mut extra: serde_json::Map<String, serde_json::Value>,
    fetch: impl FnOnce(&Projections, &str) -> Result<Page<T>, ProjectionError> + Send + 'static,
) -> Result<HttpResponse, ApiError> {
    let member = member_id.clone();
    let (exists, page) = read(state, principal, &member_id, read_models, min_position, move |projections| {
        Ok((projections.balance(&member)?.is_some(), fetch(projections, &member)?))
    })
    .await?;
    if !exists {
        return Err(not_found(&member_id));
    }
    extra.insert("member_id".to_owned(), member_id.into());
    extra.insert(
        list.to_owned(),
        serde_json::to_value(page.items).map_err(|error| ApiError::Internal(error.to_string()))?,
    );
    extra.insert("next_cursor".to_owned(), page.next_cursor.as_ref().map(Cursor::as_str).into());
    Ok(HttpResponse::Ok().json(extra))
}

/// A plain paged list of one member's rows: [`PageQuery`] in (after the
/// caller's right to the member), one page of `list` out. A new list route
/// is this and its query function.
async fn paged_list<T: Serialize + Send + 'static>(
    state: &AppState,
    request: &HttpRequest,
    member_id: String,
    read_models: &'static [ReadModel],
    list: &'static str,
    fetch: impl FnOnce(&Projections, &str, &PageRequest) -> Result<Page<T>, ProjectionError> + Send + 'static,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(state, request)?;
    let params: PageQuery = query(request)?;
    let page = page_request(params.cursor, params.limit)?;
    let fetch_page = move |projections: &Projections, member: &str| fetch(projections, member, &page);
    member_page(state, &principal, member_id, read_models, params.min_position, list, Default::default(), fetch_page)
        .await
}

#[utoipa::path(get, path = "/v1/members/{member}/transactions", tag = "reads", params(("member" = String, Path), PageQuery),
    responses((status = 200, description = "`transactions`: signed amount, balance after, type, ids; `next_cursor`", body = Object),
        (status = 404, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/transactions")]
pub async fn transactions(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    let read_models = &[ReadModel::CreditBalances, ReadModel::CreditTransactions];
    paged_list(&state, &request, path.into_inner(), read_models, "transactions", |projections, member, page| {
        projections.transactions(member, page)
    })
    .await
}

fn date(field: &'static str, text: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| ApiError::validation(field, "must be a date YYYY-MM-DD"))
}

#[utoipa::path(get, path = "/v1/members/{member}/usage/daily", tag = "reads", params(("member" = String, Path), DailyQuery),
    responses((status = 200, description = "`days`: per day × metric: quantity, credits, records, query count and errors, durations", body = Object),
        (status = 422, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/usage/daily")]
pub async fn daily_usage(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let params: DailyQuery = query(&request)?;
    let from = date("from", &params.from)?;
    let to = date("to", &params.to)?;
    if to < from {
        return Err(ApiError::validation("to", "must not be before from"));
    }
    if (to - from).num_days() >= DAILY_RANGE_DAYS_MAX {
        return Err(ApiError::validation("to", format!("a range covers at most {DAILY_RANGE_DAYS_MAX} days")));
    }
    let page = page_request(params.cursor, params.limit.or(Some(PAGE_SIZE_MAX)))?;
    let mut range = serde_json::Map::new();
    range.insert("from".to_owned(), from.to_string().into());
    range.insert("to".to_owned(), to.to_string().into());
    let read_models = &[ReadModel::CreditBalances, ReadModel::DailyUsageStats];
    member_page(
        &state,
        &principal,
        path.into_inner(),
        read_models,
        params.min_position,
        "days",
        range,
        move |projections, member| projections.daily_usage(member, from, to, &page),
    )
    .await
}

#[utoipa::path(get, path = "/v1/members/{member}/invoices", tag = "reads", params(("member" = String, Path), PageQuery),
    responses((status = 200, description = "`invoices` with lines, subtotal, total and status", body = Object),
        (status = 404, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/invoices")]
pub async fn invoices(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    let read_models = &[ReadModel::CreditBalances, ReadModel::Invoices];
    paged_list(&state, &request, path.into_inner(), read_models, "invoices", |projections, member, page| {
        projections.invoices(member, page)
    })
    .await
}

#[utoipa::path(get, path = "/v1/members/{member}/invoices/{invoice}", tag = "reads",
    params(("member" = String, Path), ("invoice" = String, Path), ReadQuery),
    responses((status = 200, description = "one invoice with its lines", body = Object), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[get("/v1/members/{member}/invoices/{invoice}")]
pub async fn invoice(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let params: ReadQuery = query(&request)?;
    let (member_id, invoice_id) = path.into_inner();
    let member = member_id.clone();
    let id = invoice_id.clone();
    let invoice =
        read(&state, &principal, &member_id, &[ReadModel::Invoices], params.min_position, move |projections| {
            projections.invoice(&member, &id)
        })
        .await?;
    let invoice = invoice.ok_or_else(|| ApiError::NotFound(format!("invoice `{invoice_id}` not found")))?;
    Ok(HttpResponse::Ok().json(invoice))
}

#[utoipa::path(get, path = "/v1/members/{member}/executions", tag = "integrations",
    params(("member" = String, Path), ExecutionsQuery),
    responses((status = 200, description = "`executions`, newest first: id, integration, query, status, rows, bytes, duration, cache hit, credits, error code; `next_cursor`", body = Object),
        (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/executions")]
pub async fn executions(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let params: ExecutionsQuery = query(&request)?;
    if let Some(integration) = &params.integration {
        validate::identifier("integration", integration).map_err(ApiError::from)?;
    }
    if let Some(query_id) = &params.query {
        validate::identifier("query", query_id).map_err(ApiError::from)?;
    }
    if let Some(status) = &params.status
        && !EXECUTION_STATUSES.contains(&status.as_str())
    {
        return Err(ApiError::validation("status", format!("must be one of {}", EXECUTION_STATUSES.join(", "))));
    }
    let limit = params.limit.unwrap_or(PAGE_SIZE_DEFAULT);
    let page = match params.cursor {
        Some(cursor) => PageRequest::after(Cursor::new(cursor), limit, Order::NewestFirst),
        None => PageRequest::first(limit).newest_first(),
    };
    let filter = ExecutionFilter { integration_id: params.integration, query_id: params.query, status: params.status };
    let read_models = &[ReadModel::CreditBalances, ReadModel::QueryExecutions];
    member_page(
        &state,
        &principal,
        path.into_inner(),
        read_models,
        params.min_position,
        "executions",
        Default::default(),
        move |projections, member| projections.executions(member, &filter, &page),
    )
    .await
}

#[utoipa::path(get, path = "/v1/members/{member}/subscription", tag = "reads", params(("member" = String, Path), ReadQuery),
    responses((status = 200, description = "plan, status, period, scheduled change, Stripe ids", body = Object),
        (status = 404, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/subscription")]
pub async fn subscription(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let params: ReadQuery = query(&request)?;
    let member_id = path.into_inner();
    let member = member_id.clone();
    let read_models = &[ReadModel::Subscriptions, ReadModel::CreditBalances];
    let (subscription, registered) =
        read(&state, &principal, &member_id, read_models, params.min_position, move |projections| {
            // Every registered member has a balance row: without one, it is the member that is missing.
            Ok((projections.subscription(&member)?, projections.balance(&member)?.is_some()))
        })
        .await?;
    let subscription = subscription.ok_or_else(|| match registered {
        true => ApiError::NotFound(format!("subscription of member `{member_id}` not found")),
        false => not_found(&member_id),
    })?;
    Ok(HttpResponse::Ok().json(subscription))
}

#[derive(Serialize, ToSchema)]
pub struct AuditGrant {
    pub grant_id: String,
    pub source: String,
    pub category: String,
    pub priority: u8,
    pub amount: i64,
    pub remaining: i64,
    pub held: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub expired: bool,
}

#[derive(Serialize, ToSchema)]
pub struct AuditView {
    pub member_id: String,
    pub as_of: DateTime<Utc>,
    /// The position of the last event counted.
    pub position: u64,
    pub events: u64,
    pub balance: i64,
    pub available: i64,
    pub held: i64,
    pub debt: i64,
    pub grants: Vec<AuditGrant>,
    pub subscription_plan_id: Option<String>,
    pub subscription_status: Option<String>,
}

/// Replay a member's stream up to `as_of` (by `recorded_at`).
pub fn replay_member(
    reader: &tally_ledger::store::EventReader,
    member_id: &str,
    as_of: DateTime<Utc>,
) -> Result<(MemberState, u64, u64), tally_ledger::LedgerError> {
    let mut state = MemberState::default();
    let mut position = 0;
    let mut events = 0;
    for recorded in reader.stream_events(&member_stream(member_id), Some(as_of), 1_000) {
        let recorded = recorded?;
        state.apply(&tally_ledger::codec::decode_member(&recorded)?);
        position = recorded.position;
        events += 1;
    }
    Ok((state, position, events))
}

#[utoipa::path(get, path = "/v1/members/{member}/audit", tag = "audit", params(("member" = String, Path), AuditQuery),
    responses((status = 200, body = AuditView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
#[get("/v1/members/{member}/audit")]
pub async fn audit(state: Data<AppState>, request: HttpRequest, path: Path<String>) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(&state, &request)?;
    let member_id = path.into_inner();
    validate::identifier("member", &member_id).map_err(ApiError::from)?;
    principal.require_member(&member_id)?;
    let params: AuditQuery = query(&request)?;
    let as_of = match params.as_of {
        Some(text) => DateTime::parse_from_rfc3339(&text)
            .map(|at| at.with_timezone(&Utc))
            .map_err(|_| ApiError::validation("as_of", "must be an RFC 3339 instant"))?,
        None => state.ledger.now(),
    };
    let ledger = state.ledger.clone();
    let member = member_id.clone();
    let min_position = params.min_position;
    let (replayed, position, events) = actix_web::web::block(move || {
        let reader = ledger.reader()?;
        let head = reader.head()?.position;
        if min_position.is_some_and(|position| position > head) {
            return Ok(Err(ApiError::validation("min_position", format!("is beyond the log's head ({head})"))));
        }
        replay_member(&reader, &member, as_of).map(Ok)
    })
    .await??
    .map_err(|error: ApiError| error)?;
    if !replayed.is_registered() {
        return Err(not_found(&member_id));
    }
    let grants = replayed
        .grants
        .values()
        .map(|grant| AuditGrant {
            grant_id: grant.grant_id.clone(),
            source: grant.source.as_str().to_owned(),
            category: match grant.category {
                tally_ledger::domain::GrantCategory::Paid => "paid".to_owned(),
                tally_ledger::domain::GrantCategory::Promotional => "promotional".to_owned(),
            },
            priority: grant.priority,
            amount: grant.amount.0,
            remaining: grant.remaining.0,
            held: grant.held.0,
            expires_at: grant.expires_at,
            expired: grant.expired,
        })
        .collect();
    let current = replayed.subscription.as_ref();
    Ok(HttpResponse::Ok().json(AuditView {
        member_id,
        as_of,
        position,
        events,
        balance: replayed.balance().0,
        available: replayed.available().0,
        held: replayed.held().0,
        debt: replayed.debt().0,
        grants,
        subscription_plan_id: current.map(|current| current.terms.plan.plan_id.clone()),
        subscription_status: current.map(|current| {
            serde_json::to_value(current.status)
                .ok()
                .and_then(|value| value.as_str().map(str::to_owned))
                .unwrap_or_default()
        }),
    }))
}
