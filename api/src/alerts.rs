//! Alert rules and alerts (DESIGN.md §11): a member's overrides of the
//! installation's rules, checked against them before the ledger keeps
//! them; the alerts the reactor raised, per member and for operators.

use crate::admin::query;
use crate::commands::{Object, Route, execute_member, idempotency, member_path};
use crate::dto::CommandView;
use crate::error::{ApiError, Problem};
use crate::reads::{authorize_member, member_page, projection_error};
use crate::{AppState, MIN_POSITION_WAIT_MAX, authenticate};
use actix_web::web::{Bytes, Data, Path};
use actix_web::{HttpRequest, HttpResponse, get, put};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_ledger::domain::{MemberCommand, MemberState};
use tally_notify::rules::RuleSet;
use tally_projections::{AlertFilter, Cursor, Order, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX, PageRequest, ReadModel};
use utoipa::IntoParams;

/// The installation's alert settings (`serve --alert-rules`), and where
/// the alert reactor stands.
#[derive(Clone, Debug, Default)]
pub struct AlertSettings {
    pub defaults: RuleSet,
    pub progress: std::sync::Arc<ReactorProgress>,
}

/// Where the alert reactor stands, for operators (`GET /v1/admin/projections`)
/// and for anyone who must wait until it has caught up; and its bell.
#[derive(Debug, Default)]
pub struct ReactorProgress {
    /// The log position evaluated.
    pub position: std::sync::atomic::AtomicU64,
    /// Decisions not yet taken by the ledger.
    pub outbox: std::sync::atomic::AtomicU64,
    /// Passes completed (each follows the log to its head, then sweeps).
    pub passes: std::sync::atomic::AtomicU64,
    wake: std::sync::Mutex<bool>,
    bell: std::sync::Condvar,
}

impl ReactorProgress {
    /// Rings the bell: the reactor starts a pass now.
    pub fn wake(&self) {
        *self.wake.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        self.bell.notify_all();
    }

    /// Waits for the bell, or `timeout`.
    pub fn wait(&self, timeout: std::time::Duration) {
        let rung = self.wake.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut rung, _) = self
            .bell
            .wait_timeout_while(rung, timeout, |rung| !*rung)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *rung = false;
    }

    /// After a pass: where it got to.
    pub fn passed(&self, position: u64, outbox: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.position.store(position, SeqCst);
        self.outbox.store(outbox, SeqCst);
        self.passes.fetch_add(1, SeqCst);
    }
}

pub(crate) const ROUTE_ALERT_RULES: Route = Route {
    name: "alert_rules",
    method: "PUT",
    path: "/v1/members/{member}/alert-rules",
    object: Object::Member,
    status: 200,
    idempotency_required: false,
    member_key_allowed: true,
};

/// `{member_id, rules, overrides, defaults}`: the rules in force, the
/// member's overrides as set, and the installation's defaults.
fn rules_view(settings: &AlertSettings, member_id: &str, state: &MemberState) -> Value {
    let overrides = state.alert_rules.clone().unwrap_or_else(|| json!({}));
    let rules = tally_notify::reactor::rules_of(&settings.defaults, state);
    json!({"member_id": member_id, "rules": rules.document(), "overrides": overrides,
        "defaults": settings.defaults.document()})
}

/// The member's state as the writer holds it; `not_found` for a member never registered.
pub(crate) async fn member_state(state: &AppState, member_id: &str) -> Result<MemberState, ApiError> {
    let ledger = state.ledger.clone();
    let member = member_id.to_owned();
    let current = actix_web::web::block(move || ledger.member_state(&member)).await??;
    if !current.is_registered() {
        return Err(ApiError::NotFound(format!("member `{member_id}` not found")));
    }
    Ok(current)
}

#[utoipa::path(get, path = "/v1/members/{member}/alert-rules", tag = "alerts", params(("member" = String, Path)),
    responses((status = 200, description = "`rules` in force, the member's `overrides`, the installation's `defaults`", body = Object),
        (status = 404, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/alert-rules")]
pub async fn get_alert_rules(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize_member(&state, &request)?;
    let member_id = member_path(&path)?;
    let current = member_state(&state, &member_id).await?;
    Ok(HttpResponse::Ok().json(rules_view(&state.alerts, &member_id, &current)))
}

#[utoipa::path(put, path = "/v1/members/{member}/alert-rules", tag = "alerts", params(("member" = String, Path)),
    request_body(content = Object, description = "The member's overrides, whole: `{rule: {setting: value}}`, any subset; `{}` goes back to the defaults"),
    responses((status = 200, description = "the rules in force after the change, with `position`", body = Object),
        (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
#[put("/v1/members/{member}/alert-rules")]
pub async fn put_alert_rules(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
    bytes: Bytes,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let member_id = member_path(&path)?;
    let route = ROUTE_ALERT_RULES;
    let idempotency = idempotency(&request, &principal, &member_id, route.name, &bytes, route.status, false)?;
    let overrides: Value = crate::body::parse(&bytes)?;
    state.alerts.defaults.apply(&overrides).map_err(|error| ApiError::validation(error.field, error.message))?;
    member_state(&state, &member_id).await?;
    let command = MemberCommand::SetAlertRules { overrides };
    let (view, _): (CommandView, u16) =
        execute_member(&state, &principal, member_id.clone(), route, command, idempotency).await?;
    let current = member_state(&state, &member_id).await?;
    let mut answer = rules_view(&state.alerts, &member_id, &current);
    answer["position"] = view.position.into();
    Ok(HttpResponse::Ok().json(answer))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    pub min_position: Option<u64>,
    /// `open` or `resolved`.
    pub state: Option<String>,
    /// One rule's alerts (`low_balance`, …).
    pub rule: Option<String>,
    /// Operators only (`GET /v1/alerts`): one member's.
    pub member: Option<String>,
    /// `newest_first` (the default) or `oldest_first`.
    pub order: Option<String>,
    pub cursor: Option<String>,
    /// 1–1,000; 100 by default.
    pub limit: Option<usize>,
}

impl AlertsQuery {
    fn filter(&self, member_id: Option<String>) -> Result<AlertFilter, ApiError> {
        if let Some(state) = &self.state
            && !["open", "resolved"].contains(&state.as_str())
        {
            return Err(ApiError::validation("state", "must be open or resolved"));
        }
        if let Some(rule) = &self.rule
            && !tally_notify::rules::RULES.contains(&rule.as_str())
        {
            return Err(ApiError::validation(
                "rule",
                format!("is not a rule; the rules are {}", tally_notify::rules::RULES.join(", ")),
            ));
        }
        Ok(AlertFilter { member_id, state: self.state.clone(), rule: self.rule.clone() })
    }

    fn page(&self) -> Result<PageRequest, ApiError> {
        let limit = self.limit.unwrap_or(PAGE_SIZE_DEFAULT);
        if limit == 0 || limit > PAGE_SIZE_MAX {
            return Err(ApiError::validation("limit", format!("must be between 1 and {PAGE_SIZE_MAX}")));
        }
        let order = match self.order.as_deref() {
            None | Some("newest_first") => Order::NewestFirst,
            Some("oldest_first") => Order::OldestFirst,
            Some(_) => return Err(ApiError::validation("order", "must be newest_first or oldest_first")),
        };
        Ok(PageRequest { after: self.cursor.clone().map(Cursor::new), limit, order })
    }
}

#[utoipa::path(get, path = "/v1/members/{member}/alerts", tag = "alerts", params(("member" = String, Path), AlertsQuery),
    responses((status = 200, description = "`alerts`, newest first: id, rule, subject, episode, state, figures, when; `next_cursor`", body = Object),
        (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/alerts")]
pub async fn member_alerts(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let params: AlertsQuery = query(&request)?;
    if params.member.is_some() {
        return Err(ApiError::validation("member", "is the path's here; it filters GET /v1/alerts only"));
    }
    let member_id = path.into_inner();
    let filter = params.filter(Some(member_id.clone()))?;
    let page = params.page()?;
    let read_models = &[ReadModel::CreditBalances, ReadModel::Alerts];
    member_page(
        &state,
        &principal,
        member_id,
        read_models,
        params.min_position,
        "alerts",
        Default::default(),
        move |projections, _| projections.alerts(&filter, &page),
    )
    .await
}

#[utoipa::path(get, path = "/v1/alerts", tag = "alerts", params(AlertsQuery),
    responses((status = 200, description = "every member's `alerts`, newest first; `next_cursor`", body = Object),
        (status = 403, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
#[get("/v1/alerts")]
pub async fn all_alerts(state: Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(&state, &request)?;
    principal.require_admin()?;
    let params: AlertsQuery = query(&request)?;
    let member = params.member.as_deref().map(member_path).transpose()?;
    let filter = params.filter(member)?;
    let page = params.page()?;
    if params.min_position.is_some_and(|position| position > i64::MAX as u64) {
        return Err(ApiError::validation("min_position", "is too large"));
    }
    let projections = state.projections.clone();
    let min_position = params.min_position;
    let page = actix_web::web::block(move || {
        if let Some(position) = min_position {
            projections.wait_for(&[ReadModel::Alerts], position, MIN_POSITION_WAIT_MAX)?;
        }
        projections.alerts(&filter, &page)
    })
    .await?
    .map_err(projection_error)?;
    Ok(HttpResponse::Ok()
        .json(json!({"alerts": page.items, "next_cursor": page.next_cursor.as_ref().map(Cursor::as_str)})))
}
