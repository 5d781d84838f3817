//! Charged query execution (DESIGN.md §9, issue 20 item 4), in one place
//! that every caller (the API now, the dashboard later) goes through:
//!
//! 1. the integration is live and not disabled, the query and its
//!    parameters are valid, the base URL passes the guard: else a problem,
//!    and nothing is written;
//! 2. the price bound (`credits_base` + `credits_per_1k_rows` ×
//!    ⌈max_rows / 1000⌉) is reserved, with a deadline past the timeout, so
//!    that a crash leaves a hold that expires and charges nothing;
//! 3. the result cache answers, or the source is run within its limits;
//! 4. the actual price is settled (a cache hit costs `cache_hit_credits`,
//!    `credits_base` by default; a failure of the source costs nothing) and
//!    `QueryExecuted` goes in the same append as the settlement.
//!
//! The `Idempotency-Key` keys both steps (`…/reserve`, `…/settle`): a retry
//! after the settlement answers from its record and never runs again; a
//! retry while the first is still running is `execution_in_progress`.

use crate::error::ApiError;
use crate::integrations::{provider_of, vault_secret};
use crate::{AppState, auth::Principal};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tally_integrations::cache::{CacheKey, CachedResult};
use tally_integrations::query::QuerySpec;
use tally_integrations::{Call, Limits, ProviderError};
use tally_ledger::domain::{
    ApiUsage, Credits, IntegrationCommand, IntegrationState, IntegrationStatus, MemberCommand, QueryExecution,
    QueryStatus, TestSource,
};
use tally_ledger::service::{Executed, Idempotency, Request};
use utoipa::ToSchema;

/// How long past a query's timeout a provider may take to give up on its
/// own before the execution stops waiting for it.
const PROVIDER_GRACE: Duration = Duration::from_millis(500);

/// What an ad-hoc run costs when its query names no price.
pub const ADHOC_CREDITS_DEFAULT: i64 = 1;

/// Concurrent executions of one member, by default (DESIGN.md §9).
pub const EXECUTIONS_PER_MEMBER_DEFAULT: usize = 4;
/// Concurrent executions of the whole server, by default.
pub const EXECUTIONS_MAX_DEFAULT: usize = 64;
/// How long an execution waits for a free slot before `too_many_executions`.
pub const EXECUTION_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Members whose slots are remembered before idle ones are forgotten.
const MEMBER_SLOTS_KEPT: usize = 10_000;

/// The caps on executions running at once: per member and in all. An
/// execution holds one slot of each from before its reservation until its
/// settlement; one that finds no free slot waits up to
/// [`EXECUTION_QUEUE_WAIT`], then is refused with nothing written.
pub struct ExecutionSlots {
    per_member_max: usize,
    all_max: usize,
    all: Arc<tokio::sync::Semaphore>,
    members: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// The slots one execution holds; dropping it frees them.
pub struct ExecutionPermit {
    _member: tokio::sync::OwnedSemaphorePermit,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl ExecutionSlots {
    pub fn new(per_member_max: usize, all_max: usize) -> ExecutionSlots {
        ExecutionSlots {
            per_member_max: per_member_max.max(1),
            all_max: all_max.max(1),
            all: Arc::new(tokio::sync::Semaphore::new(all_max.max(1))),
            members: Default::default(),
        }
    }

    fn member(&self, member_id: &str) -> Arc<tokio::sync::Semaphore> {
        let mut members = self.members.lock().expect("slots lock");
        if members.len() >= MEMBER_SLOTS_KEPT && !members.contains_key(member_id) {
            // Forget the members with nothing running (nobody else holds
            // their semaphore).
            members.retain(|_, slots| Arc::strong_count(slots) > 1);
        }
        members
            .entry(member_id.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_member_max)))
            .clone()
    }

    /// A slot of the member's and one of the server's, waiting for them at
    /// most the queueing wait in all.
    pub async fn acquire(&self, member_id: &str) -> Result<ExecutionPermit, ApiError> {
        let refused = |whose: &str, cap: usize| ApiError::TooManyExecutions {
            retry_after_s: 1,
            message: format!("{whose} {cap} executions at once are already running"),
        };
        let deadline = std::time::Instant::now() + EXECUTION_QUEUE_WAIT;
        let member = self.member(member_id);
        let member = actix_web::rt::time::timeout(EXECUTION_QUEUE_WAIT, member.acquire_owned())
            .await
            .map_err(|_| refused("the member's", self.per_member_max))?
            .map_err(|_| ApiError::Internal("execution slots closed".into()))?;
        let all = actix_web::rt::time::timeout(
            deadline.saturating_duration_since(std::time::Instant::now()),
            self.all.clone().acquire_owned(),
        )
        .await
        .map_err(|_| refused("the server's", self.all_max))?
        .map_err(|_| ApiError::Internal("execution slots closed".into()))?;
        Ok(ExecutionPermit { _member: member, _all: all })
    }
}

impl Default for ExecutionSlots {
    fn default() -> ExecutionSlots {
        ExecutionSlots::new(EXECUTIONS_PER_MEMBER_DEFAULT, EXECUTIONS_MAX_DEFAULT)
    }
}

/// Seconds a hold outlives the execution's timeout.
const HOLD_MARGIN_S: i64 = 30;
/// The query id an ad-hoc run is recorded under.
pub const ADHOC_QUERY_ID: &str = "adhoc";

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBody {
    /// The query's parameters, by name.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: Map<String, Value>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdhocBody {
    /// An unsaved query, shaped as a saved one.
    #[schema(value_type = Object)]
    pub query: Value,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: Map<String, Value>,
}

#[derive(Serialize, ToSchema, Clone)]
pub struct ExecutionRecord {
    /// The reservation that paid for it.
    pub execution_id: String,
    /// `ok`, `error` or `timeout`.
    pub status: &'static str,
    pub rows: i64,
    pub bytes: i64,
    pub duration_ms: i64,
    pub cache_hit: bool,
    pub credits: i64,
    pub error_code: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ExecutionAnswer {
    pub execution: ExecutionRecord,
    /// The rows; absent on a replay whose rows left the cache.
    #[schema(value_type = Option<Vec<Object>>)]
    pub rows: Option<Arc<Vec<tally_integrations::provider::Row>>>,
    pub truncated: bool,
    pub position: u64,
    pub balance: Option<crate::dto::BalanceView>,
    pub replayed: bool,
}

/// Rows per chunk of a streamed answer.
const ROWS_PER_CHUNK: usize = 256;

/// What an answer says beside its rows.
#[derive(Serialize)]
struct AnswerHead<'a> {
    execution: &'a ExecutionRecord,
    truncated: bool,
    position: u64,
    balance: &'a Option<crate::dto::BalanceView>,
    replayed: bool,
}

impl ExecutionAnswer {
    /// The answer as HTTP. Its rows are streamed a chunk at a time from
    /// the result itself, never copied whole into a body: an answer of
    /// 10,000 rows holds its rows once, plus one chunk.
    pub fn respond(self) -> actix_web::HttpResponse {
        use actix_web::web::Bytes;
        let Some(rows) = self.rows.clone() else { return actix_web::HttpResponse::Ok().json(self) };
        let head = AnswerHead {
            execution: &self.execution,
            truncated: self.truncated,
            position: self.position,
            balance: &self.balance,
            replayed: self.replayed,
        };
        let head = serde_json::to_string(&head).expect("an answer serialises");
        let chunks = rows.len().div_ceil(ROWS_PER_CHUNK);
        let body = (0..chunks).map(move |index| {
            let mut chunk = String::new();
            for (offset, row) in rows[index * ROWS_PER_CHUNK..].iter().take(ROWS_PER_CHUNK).enumerate() {
                if index > 0 || offset > 0 {
                    chunk.push(',');
                }
                chunk.push_str(row.get());
            }
            Bytes::from(chunk)
        });
        let parts = std::iter::once(Bytes::from_static(b"{\"rows\":["))
            .chain(body)
            .chain(std::iter::once(Bytes::from(format!("],{}", &head[1..]))))
            .map(Ok::<_, std::convert::Infallible>);
        actix_web::HttpResponse::Ok().content_type("application/json").streaming(futures_util::stream::iter(parts))
    }
}

pub struct Execution<'a> {
    pub member_id: &'a str,
    pub integration_id: &'a str,
    pub query_id: &'a str,
    pub spec: &'a QuerySpec,
    pub params: &'a Map<String, Value>,
    pub idempotency: Idempotency,
}

fn keyed(idempotency: &Idempotency, step: &str, status: u16) -> Idempotency {
    Idempotency {
        scope: idempotency.scope.clone(),
        key: format!("{}/{step}", idempotency.key),
        fingerprint: idempotency.fingerprint,
        status,
    }
}

/// ⌈rows / 1000⌉ for rows ≥ 0.
fn thousands(rows: u64) -> i64 {
    i64::try_from(rows.div_ceil(1000)).unwrap_or(i64::MAX)
}

fn price_bound(spec: &QuerySpec) -> i64 {
    spec.credits_base.saturating_add(spec.credits_per_1k_rows.saturating_mul(thousands(spec.max_rows)))
}

fn price_of(spec: &QuerySpec, rows: u64) -> i64 {
    spec.credits_base.saturating_add(spec.credits_per_1k_rows.saturating_mul(thousands(rows))).min(price_bound(spec))
}

/// The status an execution is answered with, as the history lists it.
fn status_of(error: Option<&str>) -> &'static str {
    let status = if error.is_none() { QueryStatus::Succeeded } else { QueryStatus::Failed };
    tally_projections::models::integrations::execution_status(status, error)
}

/// Runs one execution as the module's steps say.
pub async fn execute(
    state: &AppState,
    principal: &Principal,
    current: &IntegrationState,
    run: Execution<'_>,
) -> Result<ExecutionAnswer, ApiError> {
    if current.status() == IntegrationStatus::Disabled {
        return Err(ApiError::IntegrationDisabled(format!("integration `{}` is disabled", run.integration_id)));
    }
    let provider = provider_of(current)?;
    provider.validate_query(&current.config, run.spec)?;
    let params = run
        .spec
        .bind(run.params)
        .map_err(|error| ApiError::Validation { field: error.field, message: error.message })?;
    if let Some(base) =
        current.config.get("base_url").or_else(|| current.config.get("endpoint")).and_then(Value::as_str)
    {
        state.integrations.http.guard().check_url(base).map_err(ProviderError::from)?;
    }
    let bound = price_bound(run.spec);
    let credential_version = current.credential.as_ref().map_or(0, |credential| credential.version);
    let digest: [u8; 32] = Sha256::new()
        .chain_update(serde_json::to_vec(run.spec).expect("a query serialises"))
        .chain_update(serde_json::to_vec(&params).expect("parameters serialise"))
        .finalize()
        .into();
    let cache_key = CacheKey {
        member_id: run.member_id.to_owned(),
        integration_id: run.integration_id.to_owned(),
        config_version: current.config_version,
        credential_version,
        request_digest: digest,
    };

    // A retry after the settlement: its record, never a second run.
    let settle_key = keyed(&run.idempotency, "settle", 200);
    let ledger = state.ledger.clone();
    let recorded_key = settle_key.clone();
    if let Some(executed) = actix_web::web::block(move || ledger.recorded(&recorded_key)).await?? {
        let cached = state.integrations.cache.get(&cache_key).await;
        return Ok(answer_of(&executed, cached.as_ref(), true));
    }

    // Slots before the hold: an execution refused for want of a slot has
    // written nothing.
    let _permit = state.integrations.slots.acquire(run.member_id).await?;
    let timeout = run.spec.timeout_ms.map_or(tally_integrations::provider::TIMEOUT_DEFAULT, Duration::from_millis);
    let reserve =
        MemberCommand::Reserve { amount: Credits(bound), ttl_s: Some(timeout.as_secs() as i64 + 1 + HOLD_MARGIN_S) };
    let reserved = member(state, principal, run.member_id, reserve, keyed(&run.idempotency, "reserve", 201)).await?;
    let reservation_id = reservation_of(&reserved)?;
    if reserved.replayed {
        let ledger = state.ledger.clone();
        let member_id = run.member_id.to_owned();
        let member_state = actix_web::web::block(move || ledger.member_state(&member_id)).await??;
        if !member_state.reservations.contains_key(&reservation_id) {
            return Err(ApiError::InvalidHeader {
                header: "Idempotency-Key",
                message: "the execution with this key ended without a result (its hold was released or expired, \
                          and nothing was charged): send the request again with a new key"
                    .into(),
            });
        }
        return Err(ApiError::InProgress(
            "an execution with this Idempotency-Key is still running (or its server stopped before it settled; \
             its hold then expires at its deadline)"
                .into(),
        ));
    }
    let settled = run_and_settle(
        state,
        principal,
        provider,
        current,
        &run,
        &params,
        &cache_key,
        &reservation_id,
        bound,
        timeout,
        settle_key,
    )
    .await;
    if settled.is_err() {
        // Whatever failed before the settlement (the vault, the settlement
        // itself), the hold goes back now rather than at its deadline.
        let release = MemberCommand::Release { reservation_id: reservation_id.clone() };
        let ledger = state.ledger.clone();
        let request = Request::new(release, &principal.actor());
        let member_id = run.member_id.to_owned();
        let _ = actix_web::web::block(move || ledger.execute(&member_id, request)).await;
    }
    // Settled: the rows, or the source's failure (charged nothing) as its problem.
    Ok(settled??)
}

/// Steps 3 and 4: the cache or the source, then the settlement. The outer
/// error is one before the settlement; the inner, a settled failure of
/// the source.
#[allow(clippy::too_many_arguments)]
async fn run_and_settle(
    state: &AppState,
    principal: &Principal,
    provider: &dyn tally_integrations::Provider,
    current: &IntegrationState,
    run: &Execution<'_>,
    params: &Map<String, Value>,
    cache_key: &CacheKey,
    reservation_id: &str,
    bound: i64,
    timeout: Duration,
    settle_key: Idempotency,
) -> Result<Result<ExecutionAnswer, ProviderError>, ApiError> {
    let credential_version = cache_key.credential_version;

    let started = std::time::Instant::now();
    let (outcome, cache_hit, api_usage) = match state.integrations.cache.get(cache_key).await {
        Some(cached) => (Ok(cached), true, None),
        None => {
            let credential = match &current.credential {
                Some(credential) => Some(vault_secret(state, run.member_id, run.integration_id, credential)?),
                None => None,
            };
            let call = Call {
                config: &current.config,
                credential: credential.as_ref(),
                credential_key: format!("{}/{}/{credential_version}", run.member_id, run.integration_id),
                limits: Limits {
                    timeout,
                    max_rows: run.spec.max_rows as usize,
                    max_bytes: tally_integrations::provider::RESPONSE_BYTES_DEFAULT,
                },
                http: &state.integrations.http,
            };
            // One deadline for the whole run (a token fetch and a retry on
            // 401 included), well inside the hold's. Providers keep the
            // timeout themselves and clean up after it (a statement
            // cancelled on the server); this one, a little later, is for
            // a provider that would not.
            let result =
                match actix_web::rt::time::timeout(timeout + PROVIDER_GRACE, provider.run(&call, run.spec, params))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(ProviderError::Timeout(timeout)),
                };
            // What the source said of its allowance, success or failure.
            let api_usage = provider.last_usage(call.integration_key());
            let result = result.map(|rows| CachedResult {
                rows: Arc::new(rows.rows),
                bytes: rows.bytes,
                truncated: rows.truncated,
                ttl: Duration::from_secs(run.spec.cache_ttl_s),
                stored_at: std::time::Instant::now(),
            });
            if let Ok(result) = &result {
                state.integrations.cache.put(cache_key.clone(), result.clone()).await;
            }
            (result, false, api_usage)
        }
    };
    let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    let api_usage = api_usage.map(|usage| ApiUsage { used: usage.used, limit: usage.limit });
    let (credits, execution) = match &outcome {
        Ok(result) => {
            let rows = result.rows.len() as i64;
            let credits = if cache_hit {
                run.spec.cache_hit_credits.unwrap_or(run.spec.credits_base).min(bound)
            } else {
                price_of(run.spec, rows as u64)
            };
            let execution = QueryExecution {
                integration_id: run.integration_id.to_owned(),
                query_id: run.query_id.to_owned(),
                status: QueryStatus::Succeeded,
                duration_ms,
                rows,
                bytes: result.bytes as i64,
                cache_hit,
                error_code: None,
                api_usage,
            };
            (credits, execution)
        }
        Err(error) => {
            let execution = QueryExecution {
                integration_id: run.integration_id.to_owned(),
                query_id: run.query_id.to_owned(),
                status: QueryStatus::Failed,
                duration_ms,
                rows: 0,
                bytes: 0,
                cache_hit: false,
                error_code: Some(error.code().to_owned()),
                api_usage,
            };
            (0, execution)
        }
    };
    let settle = MemberCommand::Settle {
        reservation_id: reservation_id.to_owned(),
        amount: Credits(credits),
        query: Some(execution),
    };
    let settled = member(state, principal, run.member_id, settle, settle_key).await?;
    // The source's health, from what the execution saw: its answers and
    // failures, not the caller's own mistakes. The ledger decides on fresh
    // state and writes nothing for a success after successes (this
    // request's `current` may be seconds old), so an integration's stream
    // does not grow by an event a run. A rate limit says nothing of the
    // source's health.
    let rate_limited = matches!(outcome, Err(ProviderError::RateLimited { .. }));
    if !cache_hit && !rate_limited && outcome.as_ref().err().is_none_or(ProviderError::is_upstream) {
        let health = IntegrationCommand::RecordTest {
            ok: outcome.is_ok(),
            latency_ms: duration_ms,
            error_code: outcome.as_ref().err().map(|error| error.code().to_owned()),
            api_usage: None,
            source: TestSource::Execution,
        };
        let ledger = state.ledger.clone();
        let (member_id, integration_id) = (run.member_id.to_owned(), run.integration_id.to_owned());
        let request = Request::new(health, &principal.actor());
        if let Err(error) =
            actix_web::web::block(move || ledger.execute_integration(&member_id, &integration_id, request)).await?
        {
            tracing::warn!(%error, "an execution's health could not be recorded");
        }
    }
    match outcome {
        Ok(result) => Ok(Ok(answer_of(&settled, Some(&result), false))),
        Err(error) => Ok(Err(error)),
    }
}

/// The reservation a `Reserve` made (or made the first time, when replayed).
fn reservation_of(reserved: &Executed) -> Result<String, ApiError> {
    reserved
        .outcome
        .events
        .iter()
        .find_map(|appended| appended.event["reservation_id"].as_str().map(str::to_owned))
        .ok_or_else(|| ApiError::Internal("the reservation has no id".into()))
}

async fn member(
    state: &AppState,
    principal: &Principal,
    member_id: &str,
    command: MemberCommand,
    idempotency: Idempotency,
) -> Result<Executed, ApiError> {
    let ledger = state.ledger.clone();
    let request = Request::new(command, &principal.actor()).with_idempotency(idempotency);
    let member_id = member_id.to_owned();
    let executed = actix_web::web::block(move || ledger.execute(&member_id, request)).await??;
    state.metrics.command("integration.execute", executed.outcome.events.len());
    state.projections.notify();
    Ok(executed)
}

/// The answer from a settlement's outcome (its `QueryExecuted`), with the
/// rows when they are at hand.
fn answer_of(settled: &Executed, result: Option<&CachedResult>, replayed: bool) -> ExecutionAnswer {
    let executed = settled.outcome.events.iter().find(|appended| appended.event["type"] == "QueryExecuted");
    let field = |name: &str| executed.map(|appended| appended.event[name].clone()).unwrap_or(Value::Null);
    let error_code = field("error_code").as_str().map(str::to_owned);
    let execution = ExecutionRecord {
        execution_id: field("reservation_id").as_str().unwrap_or_default().to_owned(),
        status: status_of(error_code.as_deref()),
        rows: field("rows").as_i64().unwrap_or(0),
        bytes: field("bytes").as_i64().unwrap_or(0),
        duration_ms: field("duration_ms").as_i64().unwrap_or(0),
        cache_hit: field("cache_hit").as_bool().unwrap_or(false),
        credits: field("credits").as_i64().unwrap_or(0),
        error_code,
    };
    ExecutionAnswer {
        execution,
        rows: result.map(|result| result.rows.clone()),
        truncated: result.is_some_and(|result| result.truncated),
        position: settled.outcome.position,
        balance: settled.outcome.balance.as_ref().map(crate::commands::balance_view),
        replayed: replayed || settled.replayed,
    }
}
