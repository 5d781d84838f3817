//! tally-api: the HTTP face of the ledger, on actix-web.
//!
//! # Layout
//!
//! - [`commands`]: write routes. Each maps a request to one ledger command
//!   and answers once the command is durable, in one envelope: what it
//!   acted on (`object` and its ids), the `position` of its last event, the
//!   balance.
//! - [`batch`]: batch usage, many records a request, each its own command.
//! - [`reads`]: read routes, served from the projections (with
//!   `min_position` to read one's own writes) or from a replay of the log.
//! - [`admin`]: plans, member keys, the event feed, the test clock, health,
//!   readiness, metrics and the OpenAPI document.
//! - [`ops`]: projection status and rebuilds, for `tally projections`.
//! - [`auth`], [`body`], [`error`], [`ratelimit`], [`metrics`]: bearer keys,
//!   request parsing and fingerprints, problem responses, limits.
//!
//! Handlers never write SQL against read models: they call the projections'
//! query functions.

pub mod admin;
pub mod alerts;
pub mod analytics;
pub mod auth;
pub mod batch;
pub mod body;
pub mod commands;
pub mod dto;
pub mod error;
pub mod execution;
pub mod health;
pub mod integrations;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod ratelimit;
pub mod reads;
pub mod stripe;
pub mod stripe_sync;
pub mod webhooks;

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
    pub stripe: stripe::StripeSettings,
    /// The vault and the target guard (`serve --vault-key-file`, `TALLY_VAULT_KEY`).
    pub integrations: integrations::IntegrationSettings,
    /// Outbound webhooks: the dispatcher and the sender's bell.
    pub webhooks: webhooks::WebhookSettings,
    /// The installation's alert rules (`serve --alert-rules`).
    pub alerts: alerts::AlertSettings,
    /// Usage batches running now, at most `batch::USAGE_BATCHES_CONCURRENT_MAX`.
    pub usage_batches: batch::BatchSlots,
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
            stripe: stripe::StripeSettings::new(),
            integrations: integrations::IntegrationSettings::default(),
            alerts: alerts::AlertSettings::default(),
            webhooks: webhooks::WebhookSettings::default(),
            usage_batches: batch::BatchSlots::default(),
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
        .service(
            web::resource("/v1/members/{member}/usage/batch")
                .app_data(web::PayloadConfig::new(batch::USAGE_BATCH_BODY_BYTES_MAX))
                .route(web::post().to(batch::member_batch)),
        )
        .service(
            web::resource("/v1/usage/batch")
                .app_data(web::PayloadConfig::new(batch::USAGE_BATCH_BODY_BYTES_MAX))
                .route(web::post().to(batch::admin_batch)),
        )
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
        .service(reads::executions)
        .service(reads::audit)
        .service(analytics::usage)
        .service(analytics::resources)
        .service(analytics::queries)
        .service(analytics::cost)
        .service(analytics::overview)
        .service(alerts::get_alert_rules)
        .service(alerts::put_alert_rules)
        .service(alerts::member_alerts)
        .service(alerts::all_alerts)
        .service(webhooks::list_event_types)
        .service(webhooks::create_endpoint)
        .service(webhooks::list_endpoints)
        .service(webhooks::get_endpoint)
        .service(webhooks::update_endpoint)
        .service(webhooks::delete_endpoint)
        .service(webhooks::rotate_secret)
        .service(webhooks::deliveries)
        .service(webhooks::redeliver)
        .service(webhooks::test_endpoint)
        .service(admin::list_plans)
        .service(admin::issue_key)
        .service(admin::list_keys)
        .service(admin::events)
        .service(admin::advance_clock)
        .service(ops::projections_status)
        .service(ops::rebuild_projections)
        .service(admin::healthz)
        .service(admin::readyz)
        .service(admin::metrics)
        .service(admin::openapi_json)
        .service(stripe::replay)
        .service(stripe_sync::sync)
        .service(integrations::list_providers)
        .service(integrations::get_provider)
        .service(integrations::list_integrations)
        .service(integrations::put_integration)
        .service(integrations::get_integration)
        .service(integrations::delete_integration)
        .service(integrations::rotate_credential)
        .service(integrations::test_integration)
        .service(integrations::disable_integration)
        .service(integrations::enable_integration)
        .service(integrations::execute_adhoc)
        .service(integrations::execute_query)
        .service(integrations::list_queries)
        .service(integrations::put_query)
        .service(integrations::get_query)
        .service(integrations::delete_query)
        .service(
            web::resource("/v1/webhooks/stripe")
                .app_data(web::PayloadConfig::new(stripe::WEBHOOK_BODY_BYTES_MAX))
                .route(web::post().to(stripe::webhook)),
        );
}

/// The answer to a request no route matches, in the same problem format:
/// 405 with `Allow` when the path exists under other methods, else 404.
pub async fn not_found(request: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    let allowed = allowed_methods(request.path());
    if allowed.is_empty() {
        return ApiError::NotFound(format!("no route for {} {}", request.method(), request.path())).error_response();
    }
    let mut response = ApiError::MethodNotAllowed(format!("{} is not allowed on {}", request.method(), request.path()))
        .error_response();
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&allowed.join(", ")) {
        response.headers_mut().insert(actix_web::http::header::ALLOW, value);
    }
    response
}

/// The methods the OpenAPI document lists for a concrete path.
fn allowed_methods(path: &str) -> Vec<String> {
    static ROUTES: std::sync::OnceLock<Vec<(Vec<String>, Vec<String>)>> = std::sync::OnceLock::new();
    let routes = ROUTES.get_or_init(|| {
        let mut routes: Vec<(Vec<String>, Vec<String>)> = openapi::document()
            .paths
            .paths
            .iter()
            .map(|(template, item)| {
                let segments = template.split('/').map(str::to_owned).collect();
                let item = serde_json::to_value(item).unwrap_or_default();
                let methods = ["get", "put", "post", "delete", "patch"]
                    .iter()
                    .filter(|method| item.get(**method).is_some())
                    .map(|method| method.to_uppercase())
                    .collect();
                (segments, methods)
            })
            .collect();
        routes.push((vec![String::new(), "openapi.json".to_owned()], vec!["GET".to_owned()]));
        routes
    });
    let segments: Vec<&str> = path.split('/').collect();
    let mut allowed: Vec<String> = routes
        .iter()
        .filter(|(template, _)| {
            template.len() == segments.len()
                && template
                    .iter()
                    .zip(&segments)
                    .all(|(expected, actual)| expected.starts_with('{') || expected == actual)
        })
        .flat_map(|(_, methods)| methods.iter().cloned())
        .collect();
    allowed.sort();
    allowed.dedup();
    allowed
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
        let limit_bytes = match route.as_str() {
            "/v1/webhooks/stripe" => stripe::WEBHOOK_BODY_BYTES_MAX,
            "/v1/members/{member}/usage/batch" | "/v1/usage/batch" => batch::USAGE_BATCH_BODY_BYTES_MAX,
            _ => REQUEST_BODY_BYTES_MAX,
        };
        let problem = ApiError::PayloadTooLarge { limit_bytes }.error_response();
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
