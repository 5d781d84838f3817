//! tally-api: the HTTP face of the ledger, on actix-web.
//!
//! # Layout
//!
//! - [`commands`]: write routes. Each maps a request to one ledger command
//!   and answers once the command is durable, with the `position` of its
//!   last event.
//! - [`reads`]: read routes, served from the projections (with
//!   `min_position` to read one's own writes) or from a replay of the log.
//! - [`admin`]: plans, member keys, the event feed, the test clock, health,
//!   readiness, metrics and the OpenAPI document.
//! - [`auth`], [`body`], [`error`], [`ratelimit`], [`metrics`]: bearer keys,
//!   request parsing and fingerprints, problem responses, limits.
//!
//! Handlers never write SQL against read models: they call the projections'
//! query functions.

pub mod admin;
pub mod auth;
pub mod body;
pub mod commands;
pub mod dto;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod ratelimit;
pub mod reads;

use actix_web::web::{self, Data};
use actix_web::{HttpRequest, HttpResponse};
use auth::{KeyStore, Principal};
use error::ApiError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_ledger::{Ledger, ManualClock};
use tally_projections::Projections;

/// Largest accepted request body.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest a read waits for `min_position` before `projection_lagging`.
pub const MIN_POSITION_WAIT_MAX: Duration = Duration::from_secs(2);
/// How long a member's rate limit (from its plan) is cached.
const RATE_CACHE_TTL: Duration = Duration::from_secs(30);

pub struct AppState {
    pub ledger: Arc<Ledger>,
    pub projections: Arc<Projections>,
    pub keys: Arc<KeyStore>,
    /// Present only with `serve --test-clock`: enables `POST /v1/admin/clock`.
    pub test_clock: Option<Arc<ManualClock>>,
    pub metrics: metrics::Metrics,
    pub rate_limits: ratelimit::RateLimits,
    rates: Mutex<HashMap<String, (u32, Instant)>>,
}

impl AppState {
    pub fn new(
        ledger: Arc<Ledger>,
        projections: Arc<Projections>,
        keys: Arc<KeyStore>,
        test_clock: Option<Arc<ManualClock>>,
    ) -> AppState {
        AppState {
            ledger,
            projections,
            keys,
            test_clock,
            metrics: metrics::Metrics::new(),
            rate_limits: ratelimit::RateLimits::default(),
            rates: Mutex::new(HashMap::new()),
        }
    }

    /// The member's plan's `rate_limit_per_minute`, cached briefly.
    fn rate_per_minute(&self, member_id: &str) -> u32 {
        if let Some((rate, at)) = self.rates.lock().expect("rates lock").get(member_id)
            && at.elapsed() < RATE_CACHE_TTL
        {
            return *rate;
        }
        let rate = self
            .projections
            .subscription(member_id)
            .ok()
            .flatten()
            .filter(|subscription| subscription.status != "canceled")
            .and_then(|subscription| {
                self.ledger.catalog().plan(&subscription.plan_id).map(|entry| entry.terms.plan.rate_limit_per_minute)
            })
            .unwrap_or(ratelimit::RATE_LIMIT_PER_MINUTE_DEFAULT);
        let mut rates = self.rates.lock().expect("rates lock");
        if rates.len() > 100_000 {
            rates.clear();
        }
        rates.insert(member_id.to_owned(), (rate, Instant::now()));
        rate
    }
}

/// Who is calling, from `Authorization: Bearer <key>`; member keys are rate
/// limited here.
pub fn authenticate(state: &AppState, request: &HttpRequest) -> Result<Principal, ApiError> {
    let header = request.headers().get(actix_web::http::header::AUTHORIZATION).ok_or(ApiError::Unauthorized)?;
    let token = header.to_str().ok().and_then(|value| value.strip_prefix("Bearer ")).ok_or(ApiError::Unauthorized)?;
    let principal = state.keys.authenticate(token.trim()).ok_or(ApiError::Unauthorized)?;
    if let Principal::Member { member_id, key_id } = &principal {
        let rate = state.rate_per_minute(member_id);
        state.rate_limits.check(key_id, rate).map_err(|retry_after_s| ApiError::RateLimited { retry_after_s })?;
    }
    Ok(principal)
}

/// Every route, for `App::configure`.
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .app_data(web::PayloadConfig::new(REQUEST_BODY_BYTES_MAX))
        .service(commands::put_member)
        .service(commands::post_plan)
        .service(commands::start_subscription)
        .service(commands::change_subscription)
        .service(commands::cancel_subscription)
        .service(commands::grant_credits)
        .service(commands::debit_credits)
        .service(commands::record_usage)
        .service(commands::reverse_usage)
        .service(commands::check)
        .service(commands::reserve)
        .service(commands::settle)
        .service(commands::release)
        .service(commands::pay_invoice)
        .service(commands::void_invoice)
        .service(commands::uncollectible_invoice)
        .service(reads::balance)
        .service(reads::transactions)
        .service(reads::daily_usage)
        .service(reads::invoices)
        .service(reads::invoice)
        .service(reads::subscription)
        .service(reads::audit)
        .service(admin::list_plans)
        .service(admin::issue_key)
        .service(admin::list_keys)
        .service(admin::events)
        .service(admin::advance_clock)
        .service(admin::healthz)
        .service(admin::readyz)
        .service(admin::metrics)
        .service(admin::openapi_json);
}

/// The answer to a path no route matches, in the same problem format.
pub async fn not_found(request: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    ApiError::NotFound(format!("no route for {} {}", request.method(), request.path())).error_response()
}

pub type State = Data<AppState>;

/// Middleware: count and time every request by its route pattern, and turn
/// actix's own plain-text errors (body too large, bad path) into problems.
pub async fn observe(
    request: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<actix_web::body::BoxBody>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::ResponseError;
    use actix_web::http::StatusCode;
    let started = Instant::now();
    let route = request.match_pattern().unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().to_string();
    let state = request.app_data::<Data<AppState>>().cloned();
    let response = next.call(request).await?;
    let is_problem = response
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .is_some_and(|content_type| content_type.as_bytes().starts_with(b"application/problem+json"));
    let response = if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_problem {
        let problem = ApiError::PayloadTooLarge { limit_bytes: REQUEST_BODY_BYTES_MAX }.error_response();
        response.into_response(problem)
    } else if response.status().is_client_error() && !is_problem {
        let detail =
            response.response().error().map(|error| error.to_string()).unwrap_or_else(|| "bad request".to_owned());
        let problem = match response.status() {
            StatusCode::NOT_FOUND => ApiError::NotFound(detail),
            _ => ApiError::Malformed(detail),
        }
        .error_response();
        response.into_response(problem)
    } else {
        response
    };
    if let Some(state) = state {
        state.metrics.request(&route, &method, response.status().as_u16(), started.elapsed().as_secs_f64());
    }
    Ok(response)
}
