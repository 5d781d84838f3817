//! Integration routes (DESIGN.md §9, issue 20 item 3): connect a source,
//! change it, rotate its credential, remove it, and save its queries. The
//! provider checks a config and a query (`tally-integrations`) before the
//! ledger decides; a credential is sealed in the vault first, so that an
//! event never names a secret that is not there, and shredded again if the
//! ledger refuses. Secrets never leave the vault except to their source:
//! answers show the credential's id, version, fingerprint and hint only.
//!
//! Member keys act on their own member's integrations; the admin key on
//! anyone's. Another member's key gets `forbidden` and learns nothing.

use crate::commands::{idempotency, member_path};
use crate::error::{ApiError, Problem};
use crate::{AppState, State, authenticate, body};
use actix_web::web::{Bytes, Path};
use actix_web::{HttpRequest, HttpResponse, delete, get, post, put};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;
use tally_integrations::guard::Guard;
use tally_integrations::http::GuardedHttp;
use tally_integrations::query::QuerySpec;
use tally_integrations::vault::{Slot, Vault};
use tally_ledger::domain::integration::short_identifier;
use tally_ledger::domain::{ApiUsage, CredentialRef, DomainError, IntegrationCommand, IntegrationState};
use tally_ledger::service::Request;
use tally_projections::QueryStats;
use utoipa::ToSchema;

/// The credential id every integration's credential has: one at a time.
const CREDENTIAL_ID: &str = "c1";
/// Integrations listed per page.
pub const INTEGRATIONS_PAGE_MAX: usize = 100;
/// Fields of a credential, each a string.
const CREDENTIAL_FIELDS_MAX: usize = 10;

/// The integrations runtime of a server: the vault (absent without a key),
/// the guard that checks configs, and the HTTP client whose own guard
/// (the same allow-list, perhaps allow-list only) checks every call.
#[derive(Clone)]
pub struct IntegrationSettings {
    pub vault: Option<Arc<Vault>>,
    pub guard: Arc<Guard>,
    pub http: GuardedHttp,
    /// Results by (member, integration, config and credential version, request).
    pub cache: tally_integrations::cache::ResultCache,
    /// The caps on executions running at once.
    pub slots: Arc<crate::execution::ExecutionSlots>,
}

impl IntegrationSettings {
    pub fn new(vault: Option<Arc<Vault>>, guard: Guard, outbound: Guard) -> IntegrationSettings {
        IntegrationSettings {
            vault,
            guard: Arc::new(guard),
            http: GuardedHttp::new(outbound),
            cache: tally_integrations::cache::ResultCache::new(tally_integrations::cache::CACHE_BYTES_DEFAULT),
            slots: Arc::default(),
        }
    }

    /// The same, with other caps on concurrent executions.
    pub fn with_slots(mut self, slots: crate::execution::ExecutionSlots) -> IntegrationSettings {
        self.slots = Arc::new(slots);
        self
    }
}

impl Default for IntegrationSettings {
    fn default() -> IntegrationSettings {
        IntegrationSettings::new(None, Guard::default(), Guard::default())
    }
}

/// The plaintext of an integration's current credential, from the vault.
pub(crate) fn vault_secret(
    state: &AppState,
    member_id: &str,
    integration_id: &str,
    credential: &CredentialRef,
) -> Result<SecretString, ApiError> {
    let slot = Slot {
        member_id: member_id.to_owned(),
        integration_id: integration_id.to_owned(),
        credential_id: credential.credential_id.clone(),
        version: credential.version,
    };
    vault(state)?.get(&slot).map_err(|error| ApiError::Internal(format!("vault: {error}")))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntegrationBody {
    /// `rest`, `graphql`, `postgres`, `mysql`, `mongodb`, `airtable`,
    /// `google_sheets` or `salesforce` (`GET /v1/providers` describes each).
    pub provider: String,
    pub name: String,
    /// The provider's non-secret config (REST: `base_url`, `auth`, `headers`, `health_path`;
    /// GraphQL: `endpoint`, `auth`, `headers`; PostgreSQL and MySQL: `host`, `port`, `database`,
    /// `user`, `sslmode`, `ca_cert`; MongoDB: `hosts`, `database`, `user`, `auth_source`, `sslmode`).
    #[schema(value_type = Object)]
    pub config: Value,
    /// The secret fields the config's auth needs (`token`; `username` and `password`; `key`;
    /// `client_id` and `client_secret`; a database's `password`; MongoDB's `uri`). Sealed in
    /// the vault; never shown again.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub credential: Option<Map<String, Value>>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialBody {
    #[schema(value_type = Object)]
    pub credential: Map<String, Value>,
}

#[derive(Serialize, ToSchema)]
pub struct CredentialView {
    pub id: String,
    pub version: i64,
    /// A keyed fingerprint: equal for equal secrets, useless to guess them.
    pub fingerprint: String,
    /// The last four characters of a secret of 16 or more, else absent.
    pub hint: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct LastTestView {
    pub at: chrono::DateTime<chrono::Utc>,
    pub ok: bool,
    pub latency_ms: i64,
    pub error_code: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct IntegrationView {
    /// `integration`.
    pub object: &'static str,
    pub member_id: String,
    pub integration_id: String,
    pub provider: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub config: Value,
    /// `untested`, `healthy`, `failing` or `disabled`.
    pub status: &'static str,
    pub credential: Option<CredentialView>,
    pub last_test: Option<LastTestView>,
    /// Saved query ids.
    pub queries: Vec<String>,
    /// Its executions so far, all queries together (reads of one
    /// integration only; from the `query_stats` read model).
    pub stats: Option<ExecutionStatsView>,
    /// How many API calls the source says were used of its allowance
    /// (Salesforce: the org's calls in the last 24 hours), as of its last
    /// answer that said (reads of one integration only).
    pub api_usage: Option<ApiUsageView>,
    /// The log position of this write (writes only).
    pub position: Option<u64>,
    /// True when this answer repeats a recorded one (same Idempotency-Key).
    pub replayed: bool,
}

#[derive(Serialize, ToSchema)]
pub struct IntegrationList {
    pub integrations: Vec<IntegrationView>,
    /// The last id of this page, when there may be more: pass as `cursor`.
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct QueryView {
    /// `query`.
    pub object: &'static str,
    pub integration_id: String,
    pub query_id: String,
    #[schema(value_type = Object)]
    pub query: Value,
    /// Its executions so far (reads of one query only).
    pub stats: Option<ExecutionStatsView>,
    pub position: Option<u64>,
}

/// Executions of a query (or of all of an integration's), from the
/// `query_stats` read model.
#[derive(Serialize, ToSchema)]
pub struct ExecutionStatsView {
    pub executions: i64,
    pub errors: i64,
    pub timeouts: i64,
    pub cache_hits: i64,
    pub rows: i64,
    pub credits: i64,
    pub duration_ms_avg: i64,
    /// The upper bound of the histogram bucket holding the median (absent
    /// when beyond the last bound).
    pub duration_ms_p50: Option<i64>,
    pub duration_ms_p95: Option<i64>,
    pub duration_ms_max: i64,
    /// Executions per duration bucket, `le_ms` its inclusive upper bound.
    #[schema(value_type = Vec<Object>)]
    pub duration_histogram: Vec<tally_projections::HistogramBucket>,
    pub last_executed_at: chrono::DateTime<chrono::Utc>,
}

impl From<QueryStats> for ExecutionStatsView {
    fn from(stats: QueryStats) -> ExecutionStatsView {
        ExecutionStatsView {
            executions: stats.executions,
            errors: stats.errors,
            timeouts: stats.timeouts,
            cache_hits: stats.cache_hits,
            rows: stats.rows,
            credits: stats.credits,
            duration_ms_avg: stats.duration_ms_total.checked_div(stats.executions).unwrap_or(0),
            duration_ms_p50: stats.duration_quantile_ms(0.5),
            duration_ms_p95: stats.duration_quantile_ms(0.95),
            duration_ms_max: stats.duration_ms_max,
            last_executed_at: stats.last_executed_at,
            duration_histogram: stats.duration_histogram,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ApiUsageView {
    pub used: u64,
    pub limit: u64,
    /// `used / limit`, 0 to 1 (or more, past the allowance).
    pub ratio: f64,
    /// When the source said so.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// The source's last report of its API usage (none while the read model
/// is being built).
async fn api_usage_of(
    state: &AppState,
    member_id: &str,
    integration_id: &str,
) -> Result<Option<ApiUsageView>, ApiError> {
    let projections = state.projections.clone();
    let (member, integration) = (member_id.to_owned(), integration_id.to_owned());
    match actix_web::web::block(move || projections.api_usage(&member, &integration)).await? {
        Ok(usage) => Ok(usage.map(|usage| ApiUsageView {
            used: usage.used,
            limit: usage.limit,
            ratio: if usage.limit == 0 { 0.0 } else { usage.used as f64 / usage.limit as f64 },
            at: usage.at,
        })),
        Err(tally_projections::ProjectionError::NotReady { .. }) => Ok(None),
        Err(error) => Err(ApiError::Internal(error.to_string())),
    }
}

/// The statistics of an integration's queries, as the read model has them
/// now (a read model still being built counts as none yet).
async fn stats_of(state: &AppState, member_id: &str, integration_id: &str) -> Result<Vec<QueryStats>, ApiError> {
    let projections = state.projections.clone();
    let (member, integration) = (member_id.to_owned(), integration_id.to_owned());
    match actix_web::web::block(move || projections.query_stats(&member, &integration)).await? {
        Ok(stats) => Ok(stats),
        Err(tally_projections::ProjectionError::NotReady { .. }) => Ok(Vec::new()),
        Err(error) => Err(ApiError::Internal(error.to_string())),
    }
}

#[derive(Serialize, ToSchema)]
pub struct QueryList {
    pub queries: Vec<QueryView>,
}

/// The path of an integration's routes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct IntegrationPath {
    /// The member id.
    member: String,
    /// The integration id (at most 64 characters).
    integration: String,
}

/// The path of a saved query's routes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct QueryPath {
    /// The member id.
    member: String,
    /// The integration id (at most 64 characters).
    integration: String,
    /// The query id (at most 64 characters).
    query: String,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// 1 to 100; default 100.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn view(member_id: &str, integration_id: &str, state: &IntegrationState) -> IntegrationView {
    IntegrationView {
        object: "integration",
        member_id: member_id.to_owned(),
        integration_id: integration_id.to_owned(),
        provider: state.provider.clone(),
        name: state.name.clone(),
        config: state.config.clone(),
        status: state.status().as_str(),
        credential: state.credential.as_ref().map(|credential| CredentialView {
            id: credential.credential_id.clone(),
            version: credential.version,
            fingerprint: credential.fingerprint.clone(),
            hint: credential.hint.clone(),
        }),
        last_test: state.last_test.as_ref().map(|test| LastTestView {
            at: test.at,
            ok: test.ok,
            latency_ms: test.latency_ms,
            error_code: test.error_code.clone(),
        }),
        queries: state.queries.keys().cloned().collect(),
        stats: None,
        api_usage: None,
        position: None,
        replayed: false,
    }
}

/// The member and integration ids of the path, checked, and the caller
/// allowed to act for the member.
fn target(state: &AppState, request: &HttpRequest) -> Result<(crate::auth::Principal, String, String), ApiError> {
    let principal = authenticate(state, request)?;
    let member_id = member_path(request.match_info().get("member").unwrap_or_default())?;
    principal.require_member(&member_id)?;
    let integration_id = request.match_info().get("integration").unwrap_or_default().to_owned();
    short_identifier("integration", &integration_id).map_err(ApiError::from)?;
    Ok((principal, member_id, integration_id))
}

async fn load(state: &AppState, member_id: &str, integration_id: &str) -> Result<IntegrationState, ApiError> {
    let ledger = state.ledger.clone();
    let (member, integration) = (member_id.to_owned(), integration_id.to_owned());
    Ok(actix_web::web::block(move || ledger.integration_state(&member, &integration)).await??)
}

async fn live(state: &AppState, member_id: &str, integration_id: &str) -> Result<IntegrationState, ApiError> {
    let current = load(state, member_id, integration_id).await?;
    if !current.live {
        return Err(DomainError::IntegrationNotFound {
            member_id: member_id.to_owned(),
            integration_id: integration_id.to_owned(),
        }
        .into());
    }
    Ok(current)
}

async fn execute(
    state: &AppState,
    actor: &str,
    member_id: &str,
    integration_id: &str,
    command: IntegrationCommand,
    idempotency: Option<tally_ledger::service::Idempotency>,
) -> Result<tally_ledger::service::Executed, ApiError> {
    let ledger = state.ledger.clone();
    // A new config or credential, a disable or a removal: connections kept
    // open for the old one are closed.
    let closes_connections = matches!(
        command,
        IntegrationCommand::Put { .. }
            | IntegrationCommand::RotateCredential { .. }
            | IntegrationCommand::Disable { .. }
            | IntegrationCommand::Remove
    );
    let mut ledger_request = Request::new(command, actor);
    ledger_request.idempotency = idempotency;
    let (member, integration) = (member_id.to_owned(), integration_id.to_owned());
    let executed =
        actix_web::web::block(move || ledger.execute_integration(&member, &integration, ledger_request)).await??;
    state.metrics.command("integration", executed.outcome.events.len());
    if closes_connections {
        tally_integrations::forget(&format!("{member_id}/{integration_id}"));
    }
    Ok(executed)
}

/// The provider an integration was registered with.
pub(crate) fn provider_of(current: &IntegrationState) -> Result<&'static dyn tally_integrations::Provider, ApiError> {
    tally_integrations::provider(&current.provider)
        .ok_or_else(|| ApiError::Internal(format!("provider {} is not in this build", current.provider)))
}

/// A query's own rules, its fields named under `prefix` (`query.` for an
/// ad-hoc run's body).
fn validate_spec(spec: &QuerySpec, prefix: &str) -> Result<(), ApiError> {
    spec.validate(
        tally_integrations::provider::MAX_ROWS_MAX as u64,
        tally_integrations::provider::TIMEOUT_MAX.as_millis() as u64,
    )
    .map_err(|error| ApiError::Validation { field: format!("{prefix}{}", error.field), message: error.message })
}

/// A credential's fields: strings only, a few, bounded.
fn credential_secret(fields: &Map<String, Value>) -> Result<SecretString, ApiError> {
    if fields.len() > CREDENTIAL_FIELDS_MAX {
        return Err(ApiError::validation("credential", format!("at most {CREDENTIAL_FIELDS_MAX} fields")));
    }
    if let Some((name, _)) = fields.iter().find(|(_, value)| !value.is_string()) {
        return Err(ApiError::validation(format!("credential.{name}"), "must be a string"));
    }
    let text = serde_json::to_string(fields).expect("a JSON object serialises");
    if text.len() > tally_integrations::vault::SECRET_BYTES_MAX {
        return Err(ApiError::validation("credential", "is too large"));
    }
    Ok(SecretString::from(text))
}

/// The hint of a credential: of its secret field, never of a user name or
/// client id.
fn hint_of(fields: &Map<String, Value>) -> Option<String> {
    ["token", "key", "password", "client_secret"]
        .iter()
        .find_map(|name| fields.get(*name).and_then(Value::as_str))
        .and_then(tally_integrations::vault::hint)
}

fn vault(state: &AppState) -> Result<&Arc<Vault>, ApiError> {
    state.integrations.vault.as_ref().ok_or_else(|| {
        ApiError::validation(
            "credential",
            "this server has no vault key, so it stores no credential: the operator sets TALLY_VAULT_KEY \
             (32 bytes, base64) or --vault-key-file and restarts",
        )
    })
}

/// Seals a new credential version unless the secret is the current one;
/// returns the reference and the slot sealed now (to shred on a refusal).
fn seal(
    state: &AppState,
    member_id: &str,
    integration_id: &str,
    current: &IntegrationState,
    fields: &Map<String, Value>,
) -> Result<(CredentialRef, Option<Slot>), ApiError> {
    let vault = vault(state)?;
    let secret = credential_secret(fields)?;
    let fingerprint = vault.fingerprint(secret.expose_secret().as_bytes());
    if let Some(credential) = current.credential.as_ref().filter(|credential| credential.fingerprint == fingerprint) {
        return Ok((credential.clone(), None));
    }
    let slot = Slot {
        member_id: member_id.to_owned(),
        integration_id: integration_id.to_owned(),
        credential_id: CREDENTIAL_ID.to_owned(),
        version: current.last_credential_version + 1,
    };
    let sealed = vault.put(&slot, &secret).map_err(|error| ApiError::Internal(format!("vault: {error}")))?;
    let credential = CredentialRef {
        credential_id: sealed.credential_id,
        version: sealed.version,
        fingerprint: sealed.fingerprint,
        hint: hint_of(fields),
    };
    Ok((credential, Some(slot)))
}

/// The current credential's fields, for checking a changed config against.
fn stored_fields(
    state: &AppState,
    member_id: &str,
    integration_id: &str,
    current: &IntegrationState,
) -> Result<Option<Map<String, Value>>, ApiError> {
    let Some(credential) = &current.credential else { return Ok(None) };
    let slot = Slot {
        member_id: member_id.to_owned(),
        integration_id: integration_id.to_owned(),
        credential_id: credential.credential_id.clone(),
        version: credential.version,
    };
    let secret = vault(state)?.get(&slot).map_err(|error| ApiError::Internal(format!("vault: {error}")))?;
    match serde_json::from_str::<Value>(secret.expose_secret()) {
        Ok(Value::Object(fields)) => Ok(Some(fields)),
        _ => Err(ApiError::Internal("vault: a stored credential is not a JSON object".into())),
    }
}

/// Runs a command that may have sealed a new credential version: shreds
/// it again if the ledger refuses.
async fn execute_sealed(
    state: &AppState,
    principal: &crate::auth::Principal,
    member_id: &str,
    integration_id: &str,
    command: IntegrationCommand,
    idempotency: Option<tally_ledger::service::Idempotency>,
    sealed: Option<Slot>,
) -> Result<tally_ledger::service::Executed, ApiError> {
    let result = execute(state, &principal.actor(), member_id, integration_id, command, idempotency).await;
    // Refused, or answered from an earlier record (a retried request whose
    // secret the log does not name): the version sealed now is no one's.
    let unused = result.as_ref().map_or(true, |executed| executed.replayed);
    if unused
        && let (Some(slot), Some(vault)) = (sealed, state.integrations.vault.as_ref())
        && let Err(error) = vault.shred_version(&slot)
    {
        tracing::error!(%error, member_id, integration_id, "an unused credential version could not be shredded");
    }
    result
}

#[utoipa::path(put, path = "/v1/members/{member}/integrations/{integration}", tag = "integrations",
    request_body = IntegrationBody,
    params(IntegrationPath),
    responses((status = 201, description = "Created", body = IntegrationView), (status = 200, description = "Changed", body = IntegrationView),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
#[put("/v1/members/{member}/integrations/{integration}")]
pub async fn put_integration(state: State, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    let idempotency = idempotency(&request, &principal, &member_id, "integrations.put", &bytes, 200, false)?;
    let body: IntegrationBody = body::parse(&bytes)?;
    let Some(provider) = tally_integrations::provider(&body.provider) else {
        let known = tally_integrations::PROVIDERS.join(", ");
        return Err(ApiError::validation("provider", format!("must be one of {known}")));
    };
    let current = load(&state, &member_id, &integration_id).await?;
    let fields = match &body.credential {
        Some(fields) => Some(fields.clone()),
        None if current.live && current.provider == body.provider => {
            stored_fields(&state, &member_id, &integration_id, &current)?
        }
        None => None,
    };
    tally_integrations::validate_config(provider, &body.config, fields.as_ref(), &state.integrations.guard)?;
    let (credential, sealed) = match &body.credential {
        Some(fields) => {
            let (credential, sealed) = seal(&state, &member_id, &integration_id, &current, fields)?;
            (Some(credential), sealed)
        }
        None => (None, None),
    };
    let command = IntegrationCommand::Put { provider: body.provider, name: body.name, config: body.config, credential };
    let executed =
        execute_sealed(&state, &principal, &member_id, &integration_id, command, idempotency, sealed).await?;
    let after = load(&state, &member_id, &integration_id).await?;
    let mut answer = view(&member_id, &integration_id, &after);
    answer.position = Some(executed.outcome.position);
    answer.replayed = executed.replayed;
    let created = !current.live
        || executed.outcome.events.iter().any(|appended| appended.event["type"] == "IntegrationRegistered");
    Ok(if created { HttpResponse::Created() } else { HttpResponse::Ok() }.json(answer))
}

#[utoipa::path(get, path = "/v1/members/{member}/integrations/{integration}", tag = "integrations",
    params(IntegrationPath),
    responses((status = 200, body = IntegrationView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[get("/v1/members/{member}/integrations/{integration}")]
pub async fn get_integration(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (_, member_id, integration_id) = target(&state, &request)?;
    let current = live(&state, &member_id, &integration_id).await?;
    let stats = stats_of(&state, &member_id, &integration_id).await?;
    let mut answer = view(&member_id, &integration_id, &current);
    answer.stats = QueryStats::combined(&stats).map(ExecutionStatsView::from);
    answer.api_usage = api_usage_of(&state, &member_id, &integration_id).await?;
    Ok(HttpResponse::Ok().json(answer))
}

#[utoipa::path(get, path = "/v1/members/{member}/integrations", tag = "integrations",
    params(("member" = String, Path, description = "The member id"), ListQuery),
    responses((status = 200, body = IntegrationList), (status = 403, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
#[get("/v1/members/{member}/integrations")]
pub async fn list_integrations(
    state: State,
    request: HttpRequest,
    path: Path<String>,
) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(&state, &request)?;
    let member_id = member_path(&path)?;
    principal.require_member(&member_id)?;
    let query: ListQuery = crate::admin::query(&request)?;
    let limit = query.limit.unwrap_or(INTEGRATIONS_PAGE_MAX);
    if !(1..=INTEGRATIONS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::validation("limit", format!("must be 1 to {INTEGRATIONS_PAGE_MAX}")));
    }
    if let Some(cursor) = &query.cursor {
        short_identifier("cursor", cursor).map_err(ApiError::from)?;
    }
    let ledger = state.ledger.clone();
    let (member, cursor) = (member_id.clone(), query.cursor.clone());
    let found = actix_web::web::block(move || ledger.integrations_of(&member, cursor.as_deref(), limit)).await??;
    let next_cursor = (found.len() == limit).then(|| found.last().map(|(id, _)| id.clone())).flatten();
    let integrations = found
        .iter()
        .filter(|(_, current)| current.live)
        .map(|(integration_id, current)| view(&member_id, integration_id, current))
        .collect();
    Ok(HttpResponse::Ok().json(IntegrationList { integrations, next_cursor }))
}

#[utoipa::path(delete, path = "/v1/members/{member}/integrations/{integration}", tag = "integrations",
    params(IntegrationPath),
    responses((status = 200, body = IntegrationView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[delete("/v1/members/{member}/integrations/{integration}")]
pub async fn delete_integration(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    let current = live(&state, &member_id, &integration_id).await?;
    let executed =
        execute(&state, &principal.actor(), &member_id, &integration_id, IntegrationCommand::Remove, None).await?;
    // Crypto-shredding: the log's fingerprints now point at nothing.
    if let Some(vault) = &state.integrations.vault {
        vault
            .shred_integration(&member_id, &integration_id)
            .map_err(|error| ApiError::Internal(format!("vault: {error}")))?;
    }
    let mut answer = view(&member_id, &integration_id, &current);
    answer.status = "removed";
    answer.credential = None;
    answer.position = Some(executed.outcome.position);
    Ok(HttpResponse::Ok().json(answer))
}

#[utoipa::path(post, path = "/v1/members/{member}/integrations/{integration}/credential", tag = "integrations",
    request_body = CredentialBody,
    params(IntegrationPath),
    responses((status = 200, body = IntegrationView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/members/{member}/integrations/{integration}/credential")]
pub async fn rotate_credential(state: State, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    let idempotency = idempotency(&request, &principal, &member_id, "integrations.credential", &bytes, 200, false)?;
    let body: CredentialBody = body::parse(&bytes)?;
    let current = live(&state, &member_id, &integration_id).await?;
    let provider = provider_of(&current)?;
    tally_integrations::validate_config(provider, &current.config, Some(&body.credential), &state.integrations.guard)?;
    let (credential, sealed) = seal(&state, &member_id, &integration_id, &current, &body.credential)?;
    let executed = match sealed {
        Some(_) => {
            let command = IntegrationCommand::RotateCredential { credential };
            Some(execute_sealed(&state, &principal, &member_id, &integration_id, command, idempotency, sealed).await?)
        }
        // The same secret again: nothing to rotate.
        None => None,
    };
    let after = load(&state, &member_id, &integration_id).await?;
    let mut answer = view(&member_id, &integration_id, &after);
    answer.position = executed.as_ref().map(|executed| executed.outcome.position);
    answer.replayed = executed.is_some_and(|executed| executed.replayed);
    Ok(HttpResponse::Ok().json(answer))
}

#[derive(Serialize, ToSchema)]
pub struct TestView {
    /// `integration_test`.
    pub object: &'static str,
    pub integration_id: String,
    pub ok: bool,
    pub latency_ms: i64,
    /// The problem code of a failed probe (`integration_auth_failed`, …).
    pub error_code: Option<String>,
    /// What went wrong, with no secret in it.
    pub message: Option<String>,
    /// The integration's status after this test.
    pub status: &'static str,
    /// The source's count of API calls against its allowance, when its
    /// answer gave one (Salesforce).
    #[schema(value_type = Option<Object>)]
    pub api_usage: Option<ApiUsage>,
    pub position: Option<u64>,
}

/// The cheapest call that proves the source answers with this credential
/// (REST: the `health_path`, or HEAD of the base; GraphQL: `{ __typename }`),
/// recorded as `IntegrationTested`. Failures are answers, not errors: a
/// source that is down is what a test is for.
#[utoipa::path(post, path = "/v1/members/{member}/integrations/{integration}/test", tag = "integrations",
    params(IntegrationPath),
    responses((status = 200, body = TestView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/members/{member}/integrations/{integration}/test")]
pub async fn test_integration(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    Ok(HttpResponse::Ok().json(probe(&state, &principal.actor(), member_id, integration_id).await?))
}

/// Probes a live integration and records the outcome as `IntegrationTested`,
/// for the `test` route and the health scheduler.
pub(crate) async fn probe(
    state: &AppState,
    actor: &str,
    member_id: String,
    integration_id: String,
) -> Result<TestView, ApiError> {
    let current = live(state, &member_id, &integration_id).await?;
    let provider = provider_of(&current)?;
    let credential = match &current.credential {
        Some(credential) => Some(vault_secret(state, &member_id, &integration_id, credential)?),
        None => None,
    };
    let version = current.credential.as_ref().map_or(0, |credential| credential.version);
    let call = tally_integrations::Call {
        config: &current.config,
        credential: credential.as_ref(),
        credential_key: format!("{member_id}/{integration_id}/{version}"),
        limits: tally_integrations::Limits::default(),
        http: &state.integrations.http,
    };
    let started = std::time::Instant::now();
    let outcome = provider.probe(&call).await;
    let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    let usage = match &outcome {
        Ok(usage) => usage.or_else(|| provider.last_usage(call.integration_key())),
        Err(_) => provider.last_usage(call.integration_key()),
    };
    let api_usage = usage.map(|usage| ApiUsage { used: usage.used, limit: usage.limit });
    let (ok, error_code, message) = match &outcome {
        Ok(_) => (true, None, None),
        Err(error) => (false, Some(error.code().to_owned()), Some(error.to_string())),
    };
    // A source that asks for a pause is not unhealthy: nothing is recorded.
    let (status, position) = if matches!(outcome, Err(tally_integrations::ProviderError::RateLimited { .. })) {
        (current.status(), None)
    } else {
        let command = IntegrationCommand::RecordTest {
            ok,
            latency_ms,
            error_code: error_code.clone(),
            api_usage,
            source: tally_ledger::domain::TestSource::Probe,
        };
        let executed = execute(state, actor, &member_id, &integration_id, command, None).await?;
        (load(state, &member_id, &integration_id).await?.status(), Some(executed.outcome.position))
    };
    Ok(TestView {
        object: "integration_test",
        integration_id,
        ok,
        latency_ms,
        error_code,
        message,
        status: status.as_str(),
        api_usage,
        position,
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableBody {
    /// Why, for whoever enables it again.
    pub reason: String,
}

/// Disable an integration: it refuses executions (`integration_disabled`)
/// until enabled again; tests still run. Doing it twice is no change.
#[utoipa::path(post, path = "/v1/members/{member}/integrations/{integration}/disable", tag = "integrations",
    request_body = DisableBody, params(IntegrationPath),
    responses((status = 200, body = IntegrationView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/members/{member}/integrations/{integration}/disable")]
pub async fn disable_integration(state: State, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    let body: DisableBody = body::parse(&bytes)?;
    status_change(&state, &principal, &member_id, &integration_id, IntegrationCommand::Disable { reason: body.reason })
        .await
}

/// Enable a disabled integration: `untested` until its next test or run.
#[utoipa::path(post, path = "/v1/members/{member}/integrations/{integration}/enable", tag = "integrations",
    params(IntegrationPath),
    responses((status = 200, body = IntegrationView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/members/{member}/integrations/{integration}/enable")]
pub async fn enable_integration(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    status_change(&state, &principal, &member_id, &integration_id, IntegrationCommand::Enable).await
}

async fn status_change(
    state: &AppState,
    principal: &crate::auth::Principal,
    member_id: &str,
    integration_id: &str,
    command: IntegrationCommand,
) -> Result<HttpResponse, ApiError> {
    let executed = execute(state, &principal.actor(), member_id, integration_id, command, None).await?;
    let after = load(state, member_id, integration_id).await?;
    let mut answer = view(member_id, integration_id, &after);
    answer.position = Some(executed.outcome.position);
    Ok(HttpResponse::Ok().json(answer))
}

fn query_target(request: &HttpRequest) -> Result<String, ApiError> {
    let query_id = request.match_info().get("query").unwrap_or_default().to_owned();
    short_identifier("query", &query_id).map_err(ApiError::from)?;
    Ok(query_id)
}

#[utoipa::path(put, path = "/v1/members/{member}/integrations/{integration}/queries/{query}", tag = "integrations",
    request_body(content = Object, description = "The query: kind (request, graphql, sql, find, aggregate), request, graphql, sql, collection, filter, projection, sort, limit, pipeline, params, rows_pointer, cache_ttl_s, credits_base, credits_per_1k_rows, cache_hit_credits, max_rows, timeout_ms"),
    params(QueryPath),
    responses((status = 200, body = QueryView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
#[put("/v1/members/{member}/integrations/{integration}/queries/{query}")]
pub async fn put_query(state: State, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    let query_id = query_target(&request)?;
    let idempotency = idempotency(&request, &principal, &member_id, "integrations.query.put", &bytes, 200, false)?;
    let spec: QuerySpec = body::parse(&bytes)?;
    validate_spec(&spec, "")?;
    let current = live(&state, &member_id, &integration_id).await?;
    let provider = provider_of(&current)?;
    provider.validate_query(&current.config, &spec)?;
    let spec_json = serde_json::to_value(&spec).expect("a query serialises");
    let command = IntegrationCommand::SaveQuery { query_id: query_id.clone(), spec: spec_json.clone() };
    let executed = execute(&state, &principal.actor(), &member_id, &integration_id, command, idempotency).await?;
    Ok(HttpResponse::Ok().json(QueryView {
        object: "query",
        integration_id,
        query_id,
        query: spec_json,
        stats: None,
        position: Some(executed.outcome.position),
    }))
}

#[utoipa::path(get, path = "/v1/members/{member}/integrations/{integration}/queries", tag = "integrations",
    params(IntegrationPath),
    responses((status = 200, body = QueryList), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[get("/v1/members/{member}/integrations/{integration}/queries")]
pub async fn list_queries(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (_, member_id, integration_id) = target(&state, &request)?;
    let current = live(&state, &member_id, &integration_id).await?;
    let queries = current
        .queries
        .iter()
        .map(|(query_id, spec)| QueryView {
            object: "query",
            integration_id: integration_id.clone(),
            query_id: query_id.clone(),
            query: spec.clone(),
            stats: None,
            position: None,
        })
        .collect();
    Ok(HttpResponse::Ok().json(QueryList { queries }))
}

#[utoipa::path(get, path = "/v1/members/{member}/integrations/{integration}/queries/{query}", tag = "integrations",
    params(QueryPath),
    responses((status = 200, body = QueryView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[get("/v1/members/{member}/integrations/{integration}/queries/{query}")]
pub async fn get_query(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (_, member_id, integration_id) = target(&state, &request)?;
    let query_id = query_target(&request)?;
    let current = live(&state, &member_id, &integration_id).await?;
    let Some(spec) = current.queries.get(&query_id) else {
        return Err(DomainError::QueryNotFound { integration_id, query_id }.into());
    };
    let stats = stats_of(&state, &member_id, &integration_id).await?;
    let stats = stats.into_iter().find(|stats| stats.query_id == query_id).map(ExecutionStatsView::from);
    Ok(HttpResponse::Ok().json(QueryView {
        object: "query",
        integration_id,
        query_id,
        query: spec.clone(),
        stats,
        position: None,
    }))
}

#[utoipa::path(delete, path = "/v1/members/{member}/integrations/{integration}/queries/{query}", tag = "integrations",
    params(QueryPath),
    responses((status = 200, body = QueryView), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
#[delete("/v1/members/{member}/integrations/{integration}/queries/{query}")]
pub async fn delete_query(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    let query_id = query_target(&request)?;
    let current = live(&state, &member_id, &integration_id).await?;
    let spec = current.queries.get(&query_id).cloned().unwrap_or(Value::Null);
    let command = IntegrationCommand::RemoveQuery { query_id: query_id.clone() };
    let executed = execute(&state, &principal.actor(), &member_id, &integration_id, command, None).await?;
    Ok(HttpResponse::Ok().json(QueryView {
        object: "query",
        integration_id,
        query_id,
        query: spec,
        stats: None,
        position: Some(executed.outcome.position),
    }))
}

/// `Idempotency-Key` is required: an execution charges credits.
fn execution_key(
    request: &HttpRequest,
    principal: &crate::auth::Principal,
    member_id: &str,
    route: &str,
    bytes: &[u8],
) -> Result<tally_ledger::service::Idempotency, ApiError> {
    Ok(idempotency(request, principal, member_id, route, bytes, 200, true)?.expect("required keys are present"))
}

#[utoipa::path(post, path = "/v1/members/{member}/integrations/{integration}/queries/{query}/execute", tag = "integrations",
    request_body = crate::execution::ExecuteBody,
    params(QueryPath),
    responses((status = 200, body = crate::execution::ExecutionAnswer), (status = 402, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem), (status = 502, body = Problem),
        (status = 503, body = Problem, description = "`integration_rate_limited` (the source asked for a pause; Retry-After), or the server is busy"),
        (status = 504, body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/members/{member}/integrations/{integration}/queries/{query}/execute")]
pub async fn execute_query(state: State, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    let query_id = query_target(&request)?;
    let key = execution_key(&request, &principal, &member_id, "integrations.execute", &bytes)?;
    let body: crate::execution::ExecuteBody = body::parse(&bytes)?;
    let current = live(&state, &member_id, &integration_id).await?;
    let Some(saved) = current.queries.get(&query_id) else {
        return Err(DomainError::QueryNotFound { integration_id, query_id }.into());
    };
    let spec: QuerySpec = serde_json::from_value(saved.clone())
        .map_err(|error| ApiError::Internal(format!("saved query `{query_id}` does not read: {error}")))?;
    let run = crate::execution::Execution {
        member_id: &member_id,
        integration_id: &integration_id,
        query_id: &query_id,
        spec: &spec,
        params: &body.params,
        idempotency: key,
    };
    Ok(crate::execution::execute(&state, &principal, &current, run).await?.respond())
}

#[utoipa::path(post, path = "/v1/members/{member}/integrations/{integration}/execute", tag = "integrations",
    request_body = crate::execution::AdhocBody,
    params(IntegrationPath),
    responses((status = 200, body = crate::execution::ExecutionAnswer), (status = 402, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem), (status = 502, body = Problem),
        (status = 503, body = Problem, description = "`integration_rate_limited` (the source asked for a pause; Retry-After), or the server is busy"),
        (status = 504, body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/members/{member}/integrations/{integration}/execute")]
pub async fn execute_adhoc(state: State, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let (principal, member_id, integration_id) = target(&state, &request)?;
    let key = execution_key(&request, &principal, &member_id, "integrations.execute_adhoc", &bytes)?;
    // `{"query": {…}, "params": {…}}`, or the query alone (its parameters
    // then take their defaults).
    let raw: Value = body::parse(&bytes)?;
    let flat = raw.get("kind").is_some() && raw.get("query").is_none();
    let (mut spec, params, prefix): (QuerySpec, Map<String, Value>, &str) = if flat {
        (body::parse_value(raw)?, Map::new(), "")
    } else {
        let body: crate::execution::AdhocBody = body::parse_value(raw)?;
        let spec =
            serde_json::from_value(body.query).map_err(|error| ApiError::validation("query", error.to_string()))?;
        (spec, body.params, "query.")
    };
    // The editor's run of a query with no price costs one credit.
    if spec.credits_base == 0 && spec.credits_per_1k_rows == 0 {
        spec.credits_base = crate::execution::ADHOC_CREDITS_DEFAULT;
    }
    validate_spec(&spec, prefix)?;
    let current = live(&state, &member_id, &integration_id).await?;
    let run = crate::execution::Execution {
        member_id: &member_id,
        integration_id: &integration_id,
        query_id: crate::execution::ADHOC_QUERY_ID,
        spec: &spec,
        params: &params,
        idempotency: key,
    };
    Ok(crate::execution::execute(&state, &principal, &current, run).await?.respond())
}

#[derive(Serialize, ToSchema)]
pub struct ProviderList {
    /// One form per provider: its query kinds, its config fields and its
    /// credential shapes, each field with its type, whether it is
    /// required or secret, its default and help.
    #[schema(value_type = Vec<Object>)]
    pub providers: Vec<Value>,
}

/// The providers this server runs, each described as the form a person
/// fills in to connect one: generated from the same description that
/// checks a config and a credential when an integration is saved. Public:
/// it says nothing of any member.
#[utoipa::path(get, path = "/v1/providers", tag = "integrations",
    responses((status = 200, body = ProviderList)))]
#[get("/v1/providers")]
pub async fn list_providers() -> HttpResponse {
    let providers = tally_integrations::PROVIDERS
        .iter()
        .filter_map(|name| tally_integrations::provider(name))
        .map(|provider| provider.form().document())
        .collect();
    HttpResponse::Ok().json(ProviderList { providers })
}

/// One provider's form, as in `GET /v1/providers`.
#[utoipa::path(get, path = "/v1/providers/{provider}", tag = "integrations",
    params(("provider" = String, Path, description = "`rest`, `graphql`, `postgres`, `mysql`, `mongodb`, `airtable`, `google_sheets` or `salesforce`")),
    responses((status = 200, body = Object), (status = 404, body = Problem)))]
#[get("/v1/providers/{provider}")]
pub async fn get_provider(path: Path<String>) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    match tally_integrations::provider(&name) {
        Some(provider) => Ok(HttpResponse::Ok().json(provider.form().document())),
        None => Err(ApiError::NotFound(format!(
            "no provider `{}`: the providers are {}",
            name.chars().take(64).collect::<String>(),
            tally_integrations::PROVIDERS.join(", ")
        ))),
    }
}
