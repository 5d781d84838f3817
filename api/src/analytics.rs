//! Analytics (DESIGN.md §11), all from rebuildable read models, days in
//! the member's time zone: usage trends with the previous period beside
//! them, cost analysis and projection, the breakdown of resources, query
//! performance, and the operators' overview.

use crate::admin::query;
use crate::error::{ApiError, Problem};
use crate::reads::{authorize_member, projection_error, read};
use crate::{AppState, MIN_POSITION_WAIT_MAX, authenticate};
use actix_web::web::{Data, Path};
use actix_web::{HttpRequest, HttpResponse, get};
use chrono::{Datelike, Days, NaiveDate};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use tally_projections::cost::{CostInputs, PeriodInputs};
use tally_projections::{PageRequest, ProjectionError, Projections, QueryStats, ReadModel, UsageRow};
use utoipa::IntoParams;

/// The longest range one analytics read covers.
pub const RANGE_DAYS_MAX: i64 = 366;
/// The default range: the 30 days up to today.
pub const RANGE_DAYS_DEFAULT: u64 = 30;
/// Keys a breakdown lists before summing the rest.
pub const TOP_MAX: usize = 100;
pub const TOP_DEFAULT: usize = 10;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    pub min_position: Option<u64>,
    /// First day, `YYYY-MM-DD`, in the member's time zone (30 days before `to` by default).
    pub from: Option<String>,
    /// Last day, inclusive (today by default).
    pub to: Option<String>,
    /// `day` (default), `week` (ISO weeks, from Monday) or `month`; trends only.
    pub granularity: Option<String>,
    /// `metric` (default), `integration` or `query`.
    pub group_by: Option<String>,
    /// Breakdowns only: keys listed before the rest is summed (1–100, 10 by default).
    pub top: Option<usize>,
}

/// Days analytics cover: with these bounds a range and the period before
/// it stay far inside what a date can be.
pub const YEAR_MIN: i32 = 1970;
pub const YEAR_MAX: i32 = 9999;

fn date(field: &'static str, text: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .filter(|day| (YEAR_MIN..=YEAR_MAX).contains(&day.year()) && text.len() == 10)
        .ok_or_else(|| ApiError::validation(field, format!("must be a date YYYY-MM-DD from {YEAR_MIN} to {YEAR_MAX}")))
}

/// The member's time zone and today, from the read models and the ledger's clock.
fn today_of(
    projections: &Projections,
    member_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Tz, NaiveDate), ProjectionError> {
    let zone: Tz =
        projections.analytics_member(member_id)?.and_then(|member| member.time_zone.parse().ok()).unwrap_or(Tz::UTC);
    Ok((zone, now.with_timezone(&zone).date_naive()))
}

/// `[from, to]` of a request: the given days, or the 30 days up to today.
fn range(params: &RangeQuery, today: NaiveDate) -> Result<(NaiveDate, NaiveDate), ApiError> {
    let to = params.to.as_deref().map(|text| date("to", text)).transpose()?.unwrap_or(today);
    let from = match params.from.as_deref() {
        Some(text) => date("from", text)?,
        None => to - Days::new(RANGE_DAYS_DEFAULT - 1),
    };
    if to < from {
        return Err(ApiError::validation("to", "must not be before from"));
    }
    if (to - from).num_days() >= RANGE_DAYS_MAX {
        return Err(ApiError::validation("to", format!("a range covers at most {RANGE_DAYS_MAX} days")));
    }
    Ok((from, to))
}

fn group_by(params: &RangeQuery) -> Result<&'static str, ApiError> {
    match params.group_by.as_deref() {
        None | Some("metric") => Ok("metric"),
        Some("integration") => Ok("integration"),
        Some("query") => Ok("query"),
        Some(_) => Err(ApiError::validation("group_by", "must be metric, integration or query")),
    }
}

/// The first day of the bucket `day` falls in.
fn bucket_start(day: NaiveDate, granularity: &str) -> NaiveDate {
    match granularity {
        "week" => day - Days::new(u64::from(day.weekday().num_days_from_monday())),
        "month" => day.with_day(1).expect("the first of a month"),
        _ => day,
    }
}

/// Usage rows summed into buckets, each bucket's groups by key, every
/// bucket of the range present (empty ones too).
fn buckets(rows: &[UsageRow], from: NaiveDate, to: NaiveDate, granularity: &str) -> (Vec<Value>, Value) {
    let mut sums: BTreeMap<NaiveDate, BTreeMap<&str, (i64, i64, i64)>> = BTreeMap::new();
    let mut day = from;
    while day <= to {
        sums.entry(bucket_start(day, granularity)).or_default();
        day = day + Days::new(1);
    }
    let mut total = (0i64, 0i64, 0i64);
    for row in rows {
        let group = sums.entry(bucket_start(row.day, granularity)).or_default().entry(row.key.as_str()).or_default();
        group.0 += row.credits;
        group.1 += row.quantity;
        group.2 += row.records;
        total.0 += row.credits;
        total.1 += row.quantity;
        total.2 += row.records;
    }
    let buckets = sums
        .into_iter()
        .map(|(start, groups)| {
            let credits: i64 = groups.values().map(|group| group.0).sum();
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(key, (credits, quantity, records))| {
                    json!({"key": key, "credits": credits, "quantity": quantity, "records": records})
                })
                .collect();
            json!({"start": start.max(from), "credits": credits, "groups": groups})
        })
        .collect();
    (buckets, json!({"credits": total.0, "quantity": total.1, "records": total.2}))
}

/// Waits for `min_position` on `read_models`, then reads (member routes).
async fn member_read<T: Send + 'static>(
    state: &AppState,
    request: &HttpRequest,
    member_id: &str,
    read_models: &'static [ReadModel],
    min_position: Option<u64>,
    run: impl FnOnce(&Projections) -> Result<T, ProjectionError> + Send + 'static,
) -> Result<T, ApiError> {
    let principal = authorize_member(state, request)?;
    let member = member_id.to_owned();
    let (exists, value) = read(state, &principal, member_id, read_models, min_position, move |projections| {
        Ok((projections.balance(&member)?.is_some(), run(projections)?))
    })
    .await?;
    if !exists {
        return Err(ApiError::NotFound(format!("member `{member_id}` not found")));
    }
    Ok(value)
}

#[utoipa::path(get, path = "/v1/members/{member}/analytics/usage", tag = "analytics",
    params(("member" = String, Path), RangeQuery),
    responses((status = 200, description = "`buckets` of the range (each with its `groups` by key) and their `total`, and the same for the `previous` period of equal length just before", body = Object),
        (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/analytics/usage")]
pub async fn usage(state: Data<AppState>, request: HttpRequest, path: Path<String>) -> Result<HttpResponse, ApiError> {
    // Credentials and the right to the member before anything is parsed.
    authorize_member(&state, &request)?;
    let params: RangeQuery = query(&request)?;
    let member_id = path.into_inner();
    let dimension = group_by(&params)?;
    let granularity = match params.granularity.as_deref() {
        None | Some("day") => "day",
        Some("week") => "week",
        Some("month") => "month",
        Some(_) => return Err(ApiError::validation("granularity", "must be day, week or month")),
    };
    if params.top.is_some() {
        return Err(ApiError::validation("top", "is for breakdowns (analytics/resources)"));
    }
    let now = state.ledger.now();
    let read_models = &[ReadModel::CreditBalances, ReadModel::Analytics];
    let member = member_id.clone();
    let today = member_read(&state, &request, &member_id, read_models, params.min_position, move |projections| {
        Ok(today_of(projections, &member, now)?.1)
    })
    .await?;
    let current = range(&params, today)?;
    let length = (current.1 - current.0).num_days() as u64 + 1;
    let previous = (current.0 - Days::new(length), current.0 - Days::new(1));
    let member = member_id.clone();
    let projections = state.projections.clone();
    let (rows, previous_rows) = actix_web::web::block(move || -> Result<_, ProjectionError> {
        Ok((
            projections.analytics_usage(&member, dimension, current.0, current.1)?,
            projections.analytics_usage(&member, dimension, previous.0, previous.1)?,
        ))
    })
    .await?
    .map_err(projection_error)?;
    let (buckets_now, total) = buckets(&rows, current.0, current.1, granularity);
    let (buckets_before, total_before) = buckets(&previous_rows, previous.0, previous.1, granularity);
    let change = total["credits"].as_i64().unwrap_or(0) - total_before["credits"].as_i64().unwrap_or(0);
    Ok(HttpResponse::Ok().json(json!({
        "member_id": member_id, "from": current.0, "to": current.1, "granularity": granularity, "group_by": dimension,
        "buckets": buckets_now, "total": total,
        "previous": {"from": previous.0, "to": previous.1, "buckets": buckets_before, "total": total_before},
        "change": {"credits": change}
    })))
}

#[utoipa::path(get, path = "/v1/members/{member}/analytics/resources", tag = "analytics",
    params(("member" = String, Path), RangeQuery),
    responses((status = 200, description = "the `top` keys by credits (with their `share` of the total) and the `rest` summed", body = Object),
        (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/analytics/resources")]
pub async fn resources(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    // Credentials and the right to the member before anything is parsed.
    authorize_member(&state, &request)?;
    let params: RangeQuery = query(&request)?;
    let member_id = path.into_inner();
    let dimension = group_by(&params)?;
    if params.granularity.is_some() {
        return Err(ApiError::validation("granularity", "is for trends (analytics/usage)"));
    }
    let top = params.top.unwrap_or(TOP_DEFAULT);
    if top == 0 || top > TOP_MAX {
        return Err(ApiError::validation("top", format!("must be between 1 and {TOP_MAX}")));
    }
    let now = state.ledger.now();
    let read_models = &[ReadModel::CreditBalances, ReadModel::Analytics];
    let member = member_id.clone();
    let today = member_read(&state, &request, &member_id, read_models, params.min_position, move |projections| {
        Ok(today_of(projections, &member, now)?.1)
    })
    .await?;
    let (from, to) = range(&params, today)?;
    let member = member_id.clone();
    let projections = state.projections.clone();
    let keys = actix_web::web::block(move || projections.analytics_breakdown(&member, dimension, from, to))
        .await?
        .map_err(projection_error)?;
    let total: i64 = keys.iter().map(|(_, credits, _, _)| credits).sum();
    let share =
        |credits: i64| if total > 0 { (credits as f64 / total as f64 * 10_000.0).round() / 10_000.0 } else { 0.0 };
    let items: Vec<Value> = keys
        .iter()
        .take(top)
        .map(|(key, credits, quantity, records)| {
            json!({"key": key, "credits": credits, "quantity": quantity, "records": records, "share": share(*credits)})
        })
        .collect();
    let rest = &keys[top.min(keys.len())..];
    let rest_credits: i64 = rest.iter().map(|(_, credits, _, _)| credits).sum();
    Ok(HttpResponse::Ok().json(json!({
        "member_id": member_id, "from": from, "to": to, "group_by": dimension, "top": items,
        "rest": {"keys": rest.len(), "credits": rest_credits,
            "quantity": rest.iter().map(|(_, _, quantity, _)| quantity).sum::<i64>(),
            "records": rest.iter().map(|(_, _, _, records)| records).sum::<i64>(), "share": share(rest_credits)},
        "total": {"credits": total, "keys": keys.len()}
    })))
}

fn performance(stats: &QueryStats) -> Value {
    let ratio = |part: i64| {
        if stats.executions > 0 { (part as f64 / stats.executions as f64 * 10_000.0).round() / 10_000.0 } else { 0.0 }
    };
    json!({
        "integration_id": stats.integration_id, "query_id": stats.query_id, "executions": stats.executions,
        "errors": stats.errors, "error_rate": ratio(stats.errors), "timeouts": stats.timeouts,
        "cache_hits": stats.cache_hits, "cache_hit_ratio": ratio(stats.cache_hits), "credits": stats.credits,
        "rows": stats.rows, "duration_ms_p50": stats.duration_quantile_ms(0.5),
        "duration_ms_p95": stats.duration_quantile_ms(0.95), "duration_ms_p99": stats.duration_quantile_ms(0.99),
        "duration_ms_max": stats.duration_ms_max, "last_executed_at": stats.last_executed_at,
    })
}

#[utoipa::path(get, path = "/v1/members/{member}/analytics/queries", tag = "analytics",
    params(("member" = String, Path), RangeQuery),
    responses((status = 200, description = "per query and per integration: executions, error rate, timeouts, cache hit ratio, p50/p95/p99 duration (the upper bound of the histogram bucket holding it; null beyond the last), credits", body = Object),
        (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/analytics/queries")]
pub async fn queries(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    // Credentials and the right to the member before anything is parsed.
    authorize_member(&state, &request)?;
    let params: RangeQuery = query(&request)?;
    let member_id = path.into_inner();
    for (given, field) in [
        (params.granularity.is_some(), "granularity"),
        (params.group_by.is_some(), "group_by"),
        (params.top.is_some(), "top"),
    ] {
        if given {
            return Err(ApiError::validation(field, "is not a parameter of query performance"));
        }
    }
    let today = state.ledger.now().date_naive();
    let (from, to) = range(&params, today)?;
    let read_models = &[ReadModel::CreditBalances, ReadModel::QueryStats];
    let member = member_id.clone();
    let stats = member_read(&state, &request, &member_id, read_models, params.min_position, move |projections| {
        projections.query_performance(&member, from, to)
    })
    .await?;
    let mut by_integration: BTreeMap<String, Vec<QueryStats>> = BTreeMap::new();
    for query in &stats {
        by_integration.entry(query.integration_id.clone()).or_default().push(query.clone());
    }
    let integrations: Vec<Value> = by_integration
        .values()
        .filter_map(|queries| QueryStats::combined(queries))
        .map(|all| performance(&all))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "member_id": member_id, "from": from, "to": to, "days": "UTC",
        "queries": stats.iter().map(performance).collect::<Vec<_>>(), "integrations": integrations
    })))
}

#[utoipa::path(get, path = "/v1/members/{member}/analytics/cost", tag = "analytics",
    params(("member" = String, Path), ("min_position" = Option<u64>, Query)),
    responses((status = 200, description = "burn rate (7 and 30 days), exhaustion date, projected period use and overage, the next invoice's estimate, the last 30 days' value, and the `method`", body = Object),
        (status = 404, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/analytics/cost")]
pub async fn cost(state: Data<AppState>, request: HttpRequest, path: Path<String>) -> Result<HttpResponse, ApiError> {
    // Credentials and the right to the member before anything is parsed.
    authorize_member(&state, &request)?;
    let params: crate::reads::ReadQuery = query(&request)?;
    let member_id = path.into_inner();
    let now = state.ledger.now();
    let read_models = &[ReadModel::CreditBalances, ReadModel::Analytics, ReadModel::Subscriptions, ReadModel::Invoices];
    let member = member_id.clone();
    let (inputs, currency): (CostInputs, Option<String>) =
        member_read(&state, &request, &member_id, read_models, params.min_position, move |projections| {
            let (zone, today) = today_of(projections, &member, now)?;
            // An unknown member is answered `not_found` by `member_read`.
            let Some(balance) = projections.balance(&member)? else { return Ok(None) };
            let analytics = projections.analytics_member(&member)?;
            let used_by_day = projections
                .analytics_days(&member, today - Days::new(62), today)?
                .into_iter()
                .map(|day| (day.day, day.used))
                .collect();
            let expiring = projections
                .grants(&member)?
                .into_iter()
                .filter(|grant| !grant.expired)
                .filter_map(|grant| grant.expires_at.map(|at| (at, grant.remaining - grant.held)))
                .collect();
            let subscription =
                projections.subscription(&member)?.filter(|subscription| subscription.status != "canceled");
            let draft = projections
                .invoices(&member, &PageRequest::first(5).newest_first())?
                .items
                .into_iter()
                .find(|invoice| invoice.status == "draft");
            let currency = subscription.as_ref().map(|subscription| subscription.currency.clone());
            let period = subscription.filter(|subscription| subscription.billing == "tally").map(|subscription| {
                let line_sum = |kinds: &[&str]| -> i64 {
                    draft
                        .iter()
                        .flat_map(|draft| &draft.lines)
                        .filter(|line| kinds.contains(&line.kind.as_str()))
                        .map(|line| line.amount)
                        .sum()
                };
                PeriodInputs {
                    start: subscription.period_start,
                    end: subscription.period_end,
                    fee: line_sum(&["fee"]),
                    other_lines: line_sum(&["proration", "purchase", "adjustment"]),
                    overage_amount: line_sum(&["overage"]),
                    overage_allowed: subscription.overage_allowed && subscription.status != "past_due",
                    overage_limit: subscription.overage_limit_credits,
                    unit_price: subscription.overage_unit_price,
                    currency: subscription.currency.clone(),
                }
            });
            let inputs = CostInputs {
                now,
                time_zone: zone,
                used_by_day,
                available: balance.available,
                debt: balance.debt,
                expiring,
                period,
                purchased_credits: analytics.as_ref().map_or(0, |member| member.purchased_credits),
                purchase_price: analytics.as_ref().map_or(0, |member| member.purchase_price),
            };
            Ok(Some((inputs, currency)))
        })
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("member `{member_id}` not found")))?;
    let projection = tally_projections::cost::project(&inputs);
    let mut answer = serde_json::to_value(&projection).map_err(|error| ApiError::Internal(error.to_string()))?;
    answer["member_id"] = member_id.into();
    answer["as_of"] = json!(now);
    answer["available"] = inputs.available.into();
    answer["debt"] = inputs.debt.into();
    answer["currency"] = currency.into();
    Ok(HttpResponse::Ok().json(answer))
}

#[utoipa::path(get, path = "/v1/analytics/overview", tag = "analytics", params(("min_position" = Option<u64>, Query)),
    responses((status = 200, description = "members, subscriptions by plan, monthly recurring revenue, credits granted, used and expired, payment failures, failing integrations, open alerts, projection lag", body = Object),
        (status = 403, body = Problem)), security(("bearer" = [])))]
#[get("/v1/analytics/overview")]
pub async fn overview(state: Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &request)?.require_admin()?;
    let params: crate::reads::ReadQuery = query(&request)?;
    if params.min_position.is_some_and(|position| position > i64::MAX as u64) {
        return Err(ApiError::validation("min_position", "is too large"));
    }
    let projections = state.projections.clone();
    let ledger = state.ledger.clone();
    let read_models: &'static [ReadModel] =
        &[ReadModel::Analytics, ReadModel::Subscriptions, ReadModel::Integrations, ReadModel::Alerts];
    let (totals, plans, failing, alerts, statuses, head) =
        actix_web::web::block(move || -> Result<_, ProjectionError> {
            if let Some(position) = params.min_position {
                projections.wait_for(read_models, position, MIN_POSITION_WAIT_MAX)?;
            }
            let head = ledger.reader().ok().and_then(|reader| reader.head().ok()).map_or(0, |head| head.position);
            Ok((
                projections.analytics_totals()?,
                projections.plan_counts()?,
                projections.failing_integrations(20)?,
                projections.alert_counts()?,
                projections.status()?,
                head,
            ))
        })
        .await?
        .map_err(projection_error)?;
    let live = |status: &str| matches!(status, "active" | "trialing" | "past_due");
    let mut by_plan: BTreeMap<&str, Value> = BTreeMap::new();
    let mut mrr: BTreeMap<&str, i64> = BTreeMap::new();
    for plan in plans.iter().filter(|plan| live(&plan.status)) {
        let entry = by_plan.entry(plan.plan_id.as_str()).or_insert_with(
            || json!({"plan_id": plan.plan_id, "plan_name": plan.plan_name, "subscriptions": 0, "by_status": {}}),
        );
        entry["subscriptions"] = (entry["subscriptions"].as_u64().unwrap_or(0) + plan.subscriptions).into();
        let by_status = entry["by_status"][plan.status.as_str()].as_u64().unwrap_or(0) + plan.subscriptions;
        entry["by_status"][plan.status.as_str()] = by_status.into();
        *mrr.entry(plan.currency.as_str()).or_default() += plan.price_total;
    }
    let lag = statuses.iter().map(|status| status.lag).max().unwrap_or(0);
    let open: u64 = alerts.iter().map(|count| count.open).sum();
    let open_by_rule: BTreeMap<&str, u64> =
        alerts.iter().filter(|count| count.open > 0).map(|count| (count.rule.as_str(), count.open)).collect();
    Ok(HttpResponse::Ok().json(json!({
        "members": totals.members,
        "subscriptions": {"active": by_plan.values().map(|plan| plan["subscriptions"].as_u64().unwrap_or(0)).sum::<u64>(),
            "by_plan": by_plan.into_values().collect::<Vec<_>>()},
        "mrr": mrr.into_iter().map(|(currency, amount)| json!({"currency": currency, "amount": amount})).collect::<Vec<_>>(),
        "credits": {"granted": totals.credits_granted, "used": totals.credits_used, "expired": totals.credits_expired},
        "payment_failures": totals.payment_failures,
        "failing_integrations": {"count": failing.0, "first": failing.1},
        "open_alerts": {"count": open, "by_rule": open_by_rule},
        "projection_lag": {"events": lag, "head": head},
    })))
}
