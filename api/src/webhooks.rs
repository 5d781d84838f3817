//! Outbound webhooks (DESIGN.md §11): a member's endpoints (the URL
//! through the target guard, the event types, a signing secret sealed in
//! the vault and shown once, rotation with both secrets signing for 24 h),
//! their delivery log, redelivery and test deliveries; and the sender that
//! drains the dispatcher's queues, signing per the Standard Webhooks spec.

use crate::AppState;
use crate::admin::query;
use crate::alerts::member_state;
use crate::auth::Principal;
use crate::commands::{Object, Route, execute_member, member_path};
use crate::error::{ApiError, Problem};
use crate::reads::authorize_member;
use actix_web::web::{Bytes, Data, Path};
use actix_web::{HttpRequest, HttpResponse, delete, get, patch, post};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tally_integrations::vault::Slot;
use tally_ledger::domain::{CredentialRef, MemberCommand, MemberState, WebhookEndpoint, WebhookEndpointConfig};
use tally_ledger::{LedgerError, Request};
use tally_notify::signature::{Secret, sign};
use tally_notify::webhooks::{
    After, Attempt, DELIVERIES_PAGE_MAX, Dispatcher, Due, EVENT_TYPES, RESPONSE_BYTES_MAX, TIMEOUT, is_event_type,
};
use utoipa::{IntoParams, ToSchema};

/// How long the previous secret signs too after a rotation.
pub const ROTATION_OVERLAP: chrono::Duration = chrono::Duration::hours(24);
/// Deliveries sent at once, all endpoints together (one per endpoint).
pub const SENDS_CONCURRENT_MAX: usize = 32;
const SECRET_ID: &str = "signing_secret";
/// The actor of the sender's own commands (turning an endpoint off).
pub const ACTOR: &str = "webhooks";

/// The dispatcher of a server (absent in servers built for tests of other
/// parts), and a bell that wakes the sender.
#[derive(Clone, Default)]
pub struct WebhookSettings {
    pub dispatcher: Option<Arc<Mutex<Dispatcher>>>,
    pub wake: Arc<tokio::sync::Notify>,
    /// Endpoints whose secret is being rotated now: one rotation at a time,
    /// since two would seal the same version.
    pub rotating: Arc<Mutex<HashSet<(String, String)>>>,
}

/// Holds an endpoint's rotation slot until dropped.
struct Rotating {
    slots: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl Drop for Rotating {
    fn drop(&mut self) {
        self.slots.lock().expect("rotation lock").remove(&self.key);
    }
}

const ROUTE_ENDPOINTS: Route = Route {
    name: "webhook_endpoints",
    method: "POST",
    path: "/v1/members/{member}/webhook-endpoints",
    object: Object::Member,
    status: 201,
    idempotency_required: false,
    member_key_allowed: true,
};

fn dispatcher(state: &AppState) -> Result<Arc<Mutex<Dispatcher>>, ApiError> {
    state.webhooks.dispatcher.clone().ok_or_else(|| ApiError::Unavailable("this server sends no webhooks".to_owned()))
}

/// Where an endpoint's secret lives in the vault: a name no integration
/// can have (integration ids hold no `/`).
fn slot(member_id: &str, endpoint_id: &str, version: i64) -> Slot {
    Slot {
        member_id: member_id.to_owned(),
        integration_id: format!("webhook/{endpoint_id}"),
        credential_id: SECRET_ID.to_owned(),
        version,
    }
}

fn vault(state: &AppState) -> Result<&Arc<tally_integrations::vault::Vault>, ApiError> {
    state.integrations.vault.as_ref().ok_or_else(|| {
        ApiError::Unavailable(
            "this server has no vault key, so it keeps no signing secret: the operator sets TALLY_VAULT_KEY \
             (32 bytes, base64) or --vault-key-file and restarts"
                .to_owned(),
        )
    })
}

/// Seals a new secret; returns its text (to show once) and its reference.
fn seal_secret(
    state: &AppState,
    member_id: &str,
    endpoint_id: &str,
    version: i64,
) -> Result<(String, CredentialRef), ApiError> {
    let vault = vault(state)?;
    let secret = Secret::generate();
    let text = secret.expose().to_string();
    let sealed = vault
        .put(&slot(member_id, endpoint_id, version), &SecretString::from(text.clone()))
        .map_err(|error| ApiError::Internal(format!("vault: {error}")))?;
    let reference = CredentialRef {
        credential_id: sealed.credential_id,
        version: sealed.version,
        fingerprint: sealed.fingerprint,
        hint: None,
    };
    Ok((text, reference))
}

fn shred(state: &AppState, member_id: &str, endpoint_id: &str, version: i64) {
    if let Some(vault) = &state.integrations.vault
        && let Err(error) = vault.shred_version(&slot(member_id, endpoint_id, version))
    {
        tracing::error!(%error, member_id, endpoint_id, "an unused signing secret could not be shredded");
    }
}

fn check_url(state: &AppState, url: &str) -> Result<(), ApiError> {
    if url.len() > tally_ledger::domain::limits::WEBHOOK_URL_BYTES_MAX {
        return Err(ApiError::validation("url", "is too long"));
    }
    state.integrations.guard.check_url(url).map(|_| ()).map_err(|refused| {
        ApiError::validation("url", format!("{refused} (https to a public address, or a target on the allow-list)"))
    })
}

fn check_event_types(event_types: &[String]) -> Result<(), ApiError> {
    if event_types.is_empty() || event_types.len() > tally_ledger::domain::limits::WEBHOOK_EVENT_TYPES_MAX {
        return Err(ApiError::validation("event_types", "must name 1 to 64 event types, or [\"*\"]"));
    }
    for (index, event_type) in event_types.iter().enumerate() {
        if !is_event_type(event_type) {
            return Err(ApiError::validation(
                format!("event_types[{index}]"),
                format!("`{event_type}` is not an event type; GET /v1/webhook-event-types lists them"),
            ));
        }
    }
    Ok(())
}

fn endpoint_of<'state>(current: &'state MemberState, endpoint_id: &str) -> Result<&'state WebhookEndpoint, ApiError> {
    current
        .webhook_endpoints
        .get(endpoint_id)
        .ok_or_else(|| ApiError::NotFound(format!("webhook endpoint `{endpoint_id}` not found")))
}

#[derive(Serialize, ToSchema)]
pub struct EndpointView {
    pub endpoint_id: String,
    pub member_id: String,
    pub url: String,
    pub event_types: Vec<String>,
    pub description: Option<String>,
    pub enabled: bool,
    /// Why tally turned it off (failing for 5 days, or 410 Gone).
    pub disabled_reason: Option<String>,
    /// During a rotation: until when the previous secret signs too.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// The signing secret: in the answer that made it, and never again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The log position of the change (for `min_position` reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
}

fn view(member_id: &str, endpoint_id: &str, endpoint: &WebhookEndpoint) -> EndpointView {
    EndpointView {
        endpoint_id: endpoint_id.to_owned(),
        member_id: member_id.to_owned(),
        url: endpoint.config.url.clone(),
        event_types: endpoint.config.event_types.clone(),
        description: endpoint.config.description.clone(),
        enabled: endpoint.config.enabled,
        disabled_reason: endpoint.disabled_reason.clone(),
        previous_secret_expires_at: endpoint.previous_secret.as_ref().map(|(_, until)| *until),
        secret: None,
        position: None,
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointBody {
    /// https to a public address (or a target on the operator's allow-list).
    pub url: String,
    /// `["*"]` (the default) or event types from `GET /v1/webhook-event-types`.
    pub event_types: Option<Vec<String>>,
    pub description: Option<String>,
    /// True by default.
    pub enabled: Option<bool>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
}

async fn execute(
    state: &AppState,
    principal: &Principal,
    member_id: &str,
    command: MemberCommand,
) -> Result<u64, ApiError> {
    let (view, _) = execute_member(state, principal, member_id.to_owned(), ROUTE_ENDPOINTS, command, None).await?;
    state.webhooks.wake.notify_one();
    Ok(view.position)
}

#[utoipa::path(get, path = "/v1/webhook-event-types", tag = "webhooks", operation_id = "event_types",
    responses((status = 200, description = "`event_types`: every type an endpoint may ask for, with what it is", body = Object)))]
#[get("/v1/webhook-event-types")]
pub async fn list_event_types() -> HttpResponse {
    let types: Vec<Value> =
        EVENT_TYPES.iter().map(|(name, description)| json!({"type": name, "description": description})).collect();
    HttpResponse::Ok().json(json!({"event_types": types, "test_type": tally_notify::webhooks::TEST_EVENT_TYPE}))
}

#[utoipa::path(post, path = "/v1/members/{member}/webhook-endpoints", tag = "webhooks", request_body = EndpointBody,
    params(("member" = String, Path)),
    responses((status = 201, description = "the endpoint, with its signing `secret` (shown once)", body = EndpointView),
        (status = 404, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/members/{member}/webhook-endpoints")]
pub async fn create_endpoint(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
    bytes: Bytes,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let member_id = member_path(&path)?;
    let body: EndpointBody = crate::body::parse(&bytes)?;
    check_url(&state, &body.url)?;
    let event_types = body.event_types.unwrap_or_else(|| vec!["*".to_owned()]);
    check_event_types(&event_types)?;
    let current = member_state(&state, &member_id).await?;
    if current.webhook_endpoints.len() >= tally_ledger::domain::limits::WEBHOOK_ENDPOINTS_MAX {
        return Err(ApiError::validation("url", "a member has at most 20 webhook endpoints; delete one first"));
    }
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(|error| ApiError::Internal(error.to_string()))?;
    let endpoint_id = format!("ep_{}", hex::encode(random));
    let (secret, reference) = seal_secret(&state, &member_id, &endpoint_id, 1)?;
    let config = WebhookEndpointConfig {
        url: body.url,
        event_types,
        description: body.description,
        enabled: body.enabled.unwrap_or(true),
    };
    let command = MemberCommand::CreateWebhookEndpoint {
        endpoint_id: endpoint_id.clone(),
        config: config.clone(),
        secret: reference,
    };
    let position = match execute(&state, &principal, &member_id, command).await {
        Ok(position) => position,
        Err(error) => {
            shred(&state, &member_id, &endpoint_id, 1);
            return Err(error);
        }
    };
    let endpoint = WebhookEndpoint {
        config,
        secret: CredentialRef {
            credential_id: SECRET_ID.to_owned(),
            version: 1,
            fingerprint: String::new(),
            hint: None,
        },
        previous_secret: None,
        disabled_reason: None,
    };
    let mut answer = view(&member_id, &endpoint_id, &endpoint);
    answer.secret = Some(secret);
    answer.position = Some(position);
    Ok(HttpResponse::Created().json(answer))
}

#[utoipa::path(get, path = "/v1/members/{member}/webhook-endpoints", tag = "webhooks", params(("member" = String, Path)),
    responses((status = 200, description = "`endpoints`, never their secrets", body = Object), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[get("/v1/members/{member}/webhook-endpoints")]
pub async fn list_endpoints(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize_member(&state, &request)?;
    let member_id = member_path(&path)?;
    let current = member_state(&state, &member_id).await?;
    let endpoints: Vec<EndpointView> = current
        .webhook_endpoints
        .iter()
        .map(|(endpoint_id, endpoint)| view(&member_id, endpoint_id, endpoint))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"member_id": member_id, "endpoints": endpoints})))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct EndpointPath {
    pub member: String,
    pub endpoint: String,
}

#[utoipa::path(get, path = "/v1/members/{member}/webhook-endpoints/{endpoint}", tag = "webhooks", params(EndpointPath),
    responses((status = 200, body = EndpointView), (status = 404, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/webhook-endpoints/{endpoint}")]
pub async fn get_endpoint(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<EndpointPath>,
) -> Result<HttpResponse, ApiError> {
    authorize_member(&state, &request)?;
    let member_id = member_path(&path.member)?;
    let current = member_state(&state, &member_id).await?;
    let endpoint = endpoint_of(&current, &path.endpoint)?;
    Ok(HttpResponse::Ok().json(view(&member_id, &path.endpoint, endpoint)))
}

#[utoipa::path(patch, path = "/v1/members/{member}/webhook-endpoints/{endpoint}", tag = "webhooks",
    request_body = EndpointPatch, params(EndpointPath),
    responses((status = 200, body = EndpointView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
#[patch("/v1/members/{member}/webhook-endpoints/{endpoint}")]
pub async fn update_endpoint(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<EndpointPath>,
    bytes: Bytes,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let member_id = member_path(&path.member)?;
    let patch: EndpointPatch = crate::body::parse(&bytes)?;
    if let Some(url) = &patch.url {
        check_url(&state, url)?;
    }
    if let Some(event_types) = &patch.event_types {
        check_event_types(event_types)?;
    }
    let current = member_state(&state, &member_id).await?;
    let endpoint = endpoint_of(&current, &path.endpoint)?;
    let mut config = endpoint.config.clone();
    config.url = patch.url.unwrap_or(config.url);
    config.event_types = patch.event_types.unwrap_or(config.event_types);
    config.description = patch.description.or(config.description);
    config.enabled = patch.enabled.unwrap_or(config.enabled);
    let command = MemberCommand::ChangeWebhookEndpoint { endpoint_id: path.endpoint.clone(), config };
    let position = execute(&state, &principal, &member_id, command).await?;
    let current = member_state(&state, &member_id).await?;
    let mut answer = view(&member_id, &path.endpoint, endpoint_of(&current, &path.endpoint)?);
    answer.position = Some(position);
    Ok(HttpResponse::Ok().json(answer))
}

#[utoipa::path(delete, path = "/v1/members/{member}/webhook-endpoints/{endpoint}", tag = "webhooks", params(EndpointPath),
    responses((status = 200, description = "deleted; its pending deliveries are dropped and its secrets shredded", body = Object),
        (status = 404, body = Problem)), security(("bearer" = [])))]
#[delete("/v1/members/{member}/webhook-endpoints/{endpoint}")]
pub async fn delete_endpoint(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<EndpointPath>,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let member_id = member_path(&path.member)?;
    let command = MemberCommand::DeleteWebhookEndpoint { endpoint_id: path.endpoint.clone() };
    let position = execute(&state, &principal, &member_id, command).await?;
    if let Some(vault) = &state.integrations.vault
        && let Err(error) = vault.shred_integration(&member_id, &format!("webhook/{}", path.endpoint))
    {
        tracing::error!(%error, %member_id, "a deleted endpoint's secrets could not be shredded");
    }
    Ok(HttpResponse::Ok().json(json!({"endpoint_id": path.endpoint, "deleted": true, "position": position})))
}

#[utoipa::path(post, path = "/v1/members/{member}/webhook-endpoints/{endpoint}/rotate-secret", tag = "webhooks",
    params(EndpointPath),
    responses((status = 200, description = "the new `secret` (shown once); the previous one signs too until `previous_secret_expires_at`", body = EndpointView),
        (status = 404, body = Problem)), security(("bearer" = [])))]
#[post("/v1/members/{member}/webhook-endpoints/{endpoint}/rotate-secret")]
pub async fn rotate_secret(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<EndpointPath>,
) -> Result<HttpResponse, ApiError> {
    let principal = authorize_member(&state, &request)?;
    let member_id = member_path(&path.member)?;
    let key = (member_id.clone(), path.endpoint.clone());
    if !state.webhooks.rotating.lock().expect("rotation lock").insert(key.clone()) {
        return Err(ApiError::from(tally_ledger::LedgerError::VersionConflict {
            stream_id: format!("member-{member_id}"),
            attempts: 1,
        }));
    }
    let _rotating = Rotating { slots: state.webhooks.rotating.clone(), key };
    let current = member_state(&state, &member_id).await?;
    let version = endpoint_of(&current, &path.endpoint)?.secret.version + 1;
    let (secret, reference) = seal_secret(&state, &member_id, &path.endpoint, version)?;
    let previous_until = state.ledger.now() + ROTATION_OVERLAP;
    let command =
        MemberCommand::RotateWebhookSecret { endpoint_id: path.endpoint.clone(), secret: reference, previous_until };
    let position = match execute(&state, &principal, &member_id, command).await {
        Ok(position) => position,
        Err(error) => {
            shred(&state, &member_id, &path.endpoint, version);
            return Err(error);
        }
    };
    let current = member_state(&state, &member_id).await?;
    let mut answer = view(&member_id, &path.endpoint, endpoint_of(&current, &path.endpoint)?);
    answer.secret = Some(secret);
    answer.position = Some(position);
    Ok(HttpResponse::Ok().json(answer))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1–100; 20 by default.
    pub limit: Option<usize>,
}

/// The member's endpoint, as the dispatcher knows it (after catching up
/// with the log, so that one just made is known).
async fn known_endpoint(
    state: &AppState,
    member_id: &str,
    endpoint_id: &str,
) -> Result<Arc<Mutex<Dispatcher>>, ApiError> {
    let current = member_state(state, member_id).await?;
    endpoint_of(&current, endpoint_id)?;
    let dispatcher = dispatcher(state)?;
    let ledger = state.ledger.clone();
    let shared = dispatcher.clone();
    actix_web::web::block(move || shared.lock().expect("dispatcher lock").fan_out(&ledger))
        .await?
        .map_err(|error| ApiError::Internal(error.to_string()))?;
    Ok(dispatcher)
}

#[utoipa::path(get, path = "/v1/members/{member}/webhook-endpoints/{endpoint}/deliveries", tag = "webhooks",
    params(EndpointPath, DeliveriesQuery),
    responses((status = 200, description = "`deliveries`, newest first, each with its attempts (status, latency, response code, the answer's first 4 KiB); `next_cursor`", body = Object),
        (status = 404, body = Problem), (status = 422, body = Problem)), security(("bearer" = [])))]
#[get("/v1/members/{member}/webhook-endpoints/{endpoint}/deliveries")]
pub async fn deliveries(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<EndpointPath>,
) -> Result<HttpResponse, ApiError> {
    authorize_member(&state, &request)?;
    let params: DeliveriesQuery = query(&request)?;
    let member_id = member_path(&path.member)?;
    let limit = params.limit.unwrap_or(20);
    if limit == 0 || limit > DELIVERIES_PAGE_MAX {
        return Err(ApiError::validation("limit", format!("must be between 1 and {DELIVERIES_PAGE_MAX}")));
    }
    let before = params
        .cursor
        .map(|cursor| cursor.parse::<i64>().ok().filter(|seq| *seq > 0))
        .map(|cursor| cursor.ok_or_else(|| ApiError::validation("cursor", "not a cursor this list returned")))
        .transpose()?;
    let dispatcher = known_endpoint(&state, &member_id, &path.endpoint).await?;
    let (member, endpoint) = (member_id.clone(), path.endpoint.clone());
    let (items, next) = actix_web::web::block(move || {
        dispatcher.lock().expect("dispatcher lock").deliveries(&member, &endpoint, before, limit)
    })
    .await?
    .map_err(|error| ApiError::Internal(error.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({"member_id": member_id, "endpoint_id": path.endpoint, "deliveries": items,
        "next_cursor": next.map(|seq| seq.to_string())})))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DeliveryPath {
    pub member: String,
    pub endpoint: String,
    pub delivery: String,
}

#[utoipa::path(post, path = "/v1/members/{member}/webhook-endpoints/{endpoint}/deliveries/{delivery}/redeliver",
    tag = "webhooks", params(DeliveryPath),
    responses((status = 202, description = "queued again, with the same `webhook-id`", body = Object), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/members/{member}/webhook-endpoints/{endpoint}/deliveries/{delivery}/redeliver")]
pub async fn redeliver(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<DeliveryPath>,
) -> Result<HttpResponse, ApiError> {
    authorize_member(&state, &request)?;
    let member_id = member_path(&path.member)?;
    let dispatcher = known_endpoint(&state, &member_id, &path.endpoint).await?;
    let (member, endpoint, delivery) = (member_id.clone(), path.endpoint.clone(), path.delivery.clone());
    let now = state.ledger.now();
    let found = actix_web::web::block(move || {
        dispatcher.lock().expect("dispatcher lock").redeliver(&member, &endpoint, &delivery, now)
    })
    .await?
    .map_err(|error| ApiError::Internal(error.to_string()))?;
    if !found {
        return Err(ApiError::NotFound(format!("delivery `{}` not found", path.delivery)));
    }
    state.webhooks.wake.notify_one();
    Ok(HttpResponse::Accepted().json(json!({"delivery_id": path.delivery, "state": "pending"})))
}

#[utoipa::path(post, path = "/v1/members/{member}/webhook-endpoints/{endpoint}/test", tag = "webhooks",
    params(EndpointPath),
    responses((status = 202, description = "a `webhook.test` delivery queued behind the endpoint's others: its `delivery_id`", body = Object),
        (status = 404, body = Problem)), security(("bearer" = [])))]
#[post("/v1/members/{member}/webhook-endpoints/{endpoint}/test")]
pub async fn test_endpoint(
    state: Data<AppState>,
    request: HttpRequest,
    path: Path<EndpointPath>,
) -> Result<HttpResponse, ApiError> {
    authorize_member(&state, &request)?;
    let member_id = member_path(&path.member)?;
    let dispatcher = known_endpoint(&state, &member_id, &path.endpoint).await?;
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(|error| ApiError::Internal(error.to_string()))?;
    let message_id = format!("msg_test_{}", hex::encode(random));
    let (member, endpoint, message) = (member_id.clone(), path.endpoint.clone(), message_id.clone());
    let now = state.ledger.now();
    actix_web::web::block(move || {
        dispatcher.lock().expect("dispatcher lock").enqueue_test(&member, &endpoint, &message, now)
    })
    .await?
    .map_err(|error| ApiError::Internal(error.to_string()))?;
    state.webhooks.wake.notify_one();
    Ok(HttpResponse::Accepted().json(json!({"delivery_id": message_id, "state": "pending"})))
}

// ---------------------------------------------------------------------------
// The sender
// ---------------------------------------------------------------------------

/// The secrets that sign for an endpoint now: its own, and the previous
/// one until its overlap ends.
fn signing_secrets(state: &AppState, due: &Due, now: DateTime<Utc>) -> Result<Vec<Secret>, String> {
    let vault = state.integrations.vault.as_ref().ok_or("this server has no vault key")?;
    let endpoint = &due.endpoint;
    let mut slots = vec![slot(&endpoint.member_id, &endpoint.endpoint_id, endpoint.secret.1)];
    if let Some((_, version, until)) = &endpoint.previous_secret
        && *until > now
    {
        slots.push(slot(&endpoint.member_id, &endpoint.endpoint_id, *version));
    }
    slots
        .iter()
        .map(|slot| {
            let text = vault.get(slot).map_err(|error| format!("the signing secret is not in the vault: {error}"))?;
            Secret::parse(text.expose_secret()).map_err(|error| format!("the signing secret does not parse: {error}"))
        })
        .collect()
}

/// Sends one delivery and says what came of it. Never follows a redirect;
/// reads at most [`RESPONSE_BYTES_MAX`] of the answer.
async fn send(state: &AppState, client: &reqwest::Client, due: &Due) -> Attempt {
    let started = std::time::Instant::now();
    let failed = |error: String| Attempt {
        status: None,
        latency_ms: started.elapsed().as_millis() as i64,
        error: Some(error),
        response: None,
    };
    let secrets = match signing_secrets(state, due, state.ledger.now()) {
        Ok(secrets) => secrets,
        Err(error) => return failed(error),
    };
    if let Err(refused) = state.integrations.http.guard().check_url(&due.endpoint.url) {
        return failed(format!("the target guard refused the URL: {refused}"));
    }
    // The signature's timestamp is the wall clock's: receivers check it
    // against theirs, whatever clock the ledger runs on.
    let timestamp = Utc::now().timestamp();
    let refs: Vec<&Secret> = secrets.iter().collect();
    let signature = sign(&refs, &due.message_id, timestamp, due.body.as_bytes());
    let request = client
        .post(&due.endpoint.url)
        .header("content-type", "application/json")
        .header("webhook-id", &due.message_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(due.body.clone());
    let mut response = match request.send().await {
        Ok(response) => response,
        Err(error) if error.is_timeout() => return failed(format!("no answer within {} s", TIMEOUT.as_secs())),
        Err(error) => return failed(format!("could not deliver: {}", error.without_url())),
    };
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let mut error = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = RESPONSE_BYTES_MAX.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= RESPONSE_BYTES_MAX {
                    break;
                }
            }
            Ok(None) => break,
            Err(read) => {
                error = Some(format!("the answer broke off: {}", read.without_url()));
                break;
            }
        }
    }
    let redirect = (300..400).contains(&status).then(|| "redirects are not followed".to_owned());
    Attempt {
        status: Some(status),
        latency_ms: started.elapsed().as_millis() as i64,
        error: redirect.or(error),
        response: Some(String::from_utf8_lossy(&body).into_owned()),
    }
}

/// Records an attempt and acts on it: turns off an endpoint the
/// dispatcher gave up on (the ledger's event raises the alert).
async fn record(state: &AppState, due: Due, attempt: Attempt) {
    let Ok(dispatcher) = dispatcher(state) else { return };
    let mut jitter = [0u8; 2];
    let _ = getrandom::fill(&mut jitter);
    let jitter = u64::from(u16::from_le_bytes(jitter)) % 1_000;
    let now = state.ledger.now();
    let recorded =
        actix_web::web::block(move || dispatcher.lock().expect("dispatcher lock").record(&due, &attempt, now, jitter))
            .await;
    let after = match recorded {
        Ok(Ok(after)) => after,
        Ok(Err(error)) => return tracing::error!(%error, "a delivery attempt could not be recorded"),
        Err(error) => return tracing::error!(%error, "a delivery attempt could not be recorded"),
    };
    if let After::Disable { member_id, endpoint_id, reason } = after {
        tracing::warn!(%member_id, %endpoint_id, %reason, "a webhook endpoint is turned off");
        let ledger = state.ledger.clone();
        let command = MemberCommand::DisableWebhookEndpoint { endpoint_id, reason };
        let disabled = actix_web::web::block(move || ledger.execute(&member_id, Request::new(command, ACTOR))).await;
        match disabled {
            Ok(Ok(_)) | Ok(Err(LedgerError::Rejected(_))) => {}
            Ok(Err(error)) => tracing::error!(%error, "a failing endpoint could not be turned off"),
            Err(error) => tracing::error!(%error, "a failing endpoint could not be turned off"),
        }
    }
}

/// The head of one endpoint's queue, if due now.
async fn due_of(state: &AppState, member_id: &str, endpoint_id: &str) -> Option<Due> {
    let dispatcher = dispatcher(state).ok()?;
    let (member, endpoint, now) = (member_id.to_owned(), endpoint_id.to_owned(), state.ledger.now());
    let head =
        actix_web::web::block(move || dispatcher.lock().expect("dispatcher lock").due_of(&member, &endpoint, now))
            .await;
    head.ok()?.ok()?
}

async fn still_due(state: &AppState, due: &Due) -> bool {
    let Ok(dispatcher) = dispatcher(state) else { return false };
    let due = due.clone();
    let checked = actix_web::web::block(move || dispatcher.lock().expect("dispatcher lock").still_due(&due)).await;
    matches!(checked, Ok(Ok(true)))
}

/// Endpoints with a delivery being sent now: their queues wait for it.
#[derive(Default)]
pub struct InFlight(Mutex<HashSet<(String, String)>>);

/// One round of the sender: fan the log out, then start sending each due
/// queue head whose endpoint has nothing in flight. Returns how many
/// deliveries it started.
pub async fn send_round(state: &Data<AppState>, client: &reqwest::Client, in_flight: &Arc<InFlight>) -> usize {
    let Ok(dispatcher) = dispatcher(state) else { return 0 };
    let ledger = state.ledger.clone();
    let now = state.ledger.now();
    let due = actix_web::web::block(move || {
        let mut dispatcher = dispatcher.lock().expect("dispatcher lock");
        dispatcher.fan_out(&ledger)?;
        dispatcher.due(now, SENDS_CONCURRENT_MAX * 2)
    })
    .await;
    let due = match due {
        Ok(Ok(due)) => due,
        Ok(Err(error)) => {
            tracing::warn!(%error, "the webhook dispatcher will try again");
            return 0;
        }
        Err(_) => return 0,
    };
    let mut started = 0;
    for due in due {
        let key = (due.endpoint.member_id.clone(), due.endpoint.endpoint_id.clone());
        {
            let mut flying = in_flight.0.lock().expect("in-flight lock");
            if flying.len() >= SENDS_CONCURRENT_MAX || !flying.insert(key.clone()) {
                continue;
            }
        }
        started += 1;
        let (state, client, in_flight) = (state.clone(), client.clone(), in_flight.clone());
        actix_web::rt::spawn(async move {
            // The endpoint's queue, one delivery after the other while they
            // are due; the round that started it read its head before the
            // slot was taken, so it is checked again first.
            let mut next = Some(due);
            while let Some(due) = next.take() {
                if !still_due(&state, &due).await {
                    break;
                }
                let attempt = send(&state, &client, &due).await;
                let delivered = attempt.succeeded();
                let (member_id, endpoint_id) = (due.endpoint.member_id.clone(), due.endpoint.endpoint_id.clone());
                record(&state, due, attempt).await;
                if delivered {
                    next = due_of(&state, &member_id, &endpoint_id).await;
                }
            }
            in_flight.0.lock().expect("in-flight lock").remove(&key);
        });
    }
    started
}

/// The sender's client: behind the target guard, no redirects, 15 s for
/// a whole exchange.
pub fn client(state: &AppState) -> reqwest::Client {
    state.integrations.http.without_redirects(TIMEOUT)
}
