//! Batch usage: up to [`USAGE_BATCH_RECORDS_MAX`] usage records in one
//! request, for one member (`POST /v1/members/{member}/usage/batch`) or,
//! with the admin key, across members (`POST /v1/usage/batch`).
//!
//! Each record is its own command, decided on its own: one refused record
//! refuses only itself, and a record's shape is checked on its own too. All
//! of them are queued to the writer before any answer is awaited, so they
//! ride the same group commits. A record's `usage_id` is its idempotency
//! key (scoped to the caller and the member, like a header key on the
//! single route, but apart from it), so a retried batch answers every
//! accepted record with its original outcome and writes nothing again; a
//! refused record wrote nothing and is decided afresh.

use crate::auth::Principal;
use crate::commands::{Object, command_view, member_path, usage_command};
use crate::dto::{BalanceView, GrantPartView, UsageBody};
use crate::error::{ApiError, Problem};
use crate::{AppState, authenticate, body};
use actix_web::web::{Bytes, Data};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use tally_ledger::Request;
use tally_ledger::domain::validate;
use tally_ledger::service::Idempotency;
use utoipa::ToSchema;

/// Most records one batch request may carry.
pub const USAGE_BATCH_RECORDS_MAX: usize = 1_000;
/// Largest batch request body: 1,000 records of about 1 KiB each.
pub const USAGE_BATCH_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Batch requests the server runs at once. Each queues up to 1,000
/// commands to the writer (whose queue holds `queue_commands_max`, 16,384
/// by default), so a burst of batches cannot crowd out single commands;
/// beyond it a batch is refused with 503 and `Retry-After`.
pub const USAGE_BATCHES_CONCURRENT_MAX: usize = 4;
/// How long a refused batch is asked to wait.
const BATCH_RETRY_AFTER_S: u64 = 1;
/// The route name records are scoped and counted under.
const ROUTE_NAME: &str = "usage.batch";

/// Counts the batches running; a slot is given back when its guard drops.
#[derive(Default)]
pub struct BatchSlots {
    running: std::sync::atomic::AtomicUsize,
}

pub struct BatchSlot<'a>(&'a BatchSlots);

impl BatchSlots {
    fn take(&self) -> Result<BatchSlot<'_>, ApiError> {
        use std::sync::atomic::Ordering;
        let taken = self.running.fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
            (running < USAGE_BATCHES_CONCURRENT_MAX).then_some(running + 1)
        });
        match taken {
            Ok(_) => Ok(BatchSlot(self)),
            Err(_) => Err(ApiError::Busy {
                retry_after_s: BATCH_RETRY_AFTER_S,
                message: format!("{USAGE_BATCHES_CONCURRENT_MAX} usage batches are running already"),
            }),
        }
    }
}

impl Drop for BatchSlot<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBatchBody {
    /// 1 to 1,000 usage records, each shaped as the single usage route's
    /// body (the document states the limit from `USAGE_BATCH_RECORDS_MAX`).
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberUsageBatchBody {
    /// 1 to 1,000 usage records, each with its `member_id`.
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<serde_json::Value>,
}

/// One record's outcome, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageRecordOutcome {
    /// The record's place in the request, from 0.
    pub index: usize,
    pub member_id: String,
    /// Absent only when the record has no readable `usage_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub usage_id: Option<String>,
    /// True when the usage is recorded (now, or by an earlier request with
    /// the same record: then `replayed`).
    pub accepted: bool,
    /// 201 when accepted, else the status the single route would answer.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub position: Option<u64>,
    /// The member's balance right after this record.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub balance: Option<BalanceView>,
    /// The grants that paid, and how much each.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub burned: Option<Vec<GrantPartView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub debt_incurred: Option<i64>,
    pub replayed: bool,
    /// Why the record was refused, as the single route would say it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub problem: Option<Problem>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageBatchView {
    pub accepted: usize,
    pub refused: usize,
    /// The highest position of an accepted record (0 when none was): use it
    /// as `min_position` to read every record's effect.
    pub position: u64,
    pub results: Vec<UsageRecordOutcome>,
}

/// A record ready for the writer, or why it never got there.
struct Prepared {
    member_id: String,
    usage_id: Option<String>,
    command: Result<Request<tally_ledger::domain::MemberCommand>, ApiError>,
}

fn records_count(records: &[serde_json::Value]) -> Result<(), ApiError> {
    if records.is_empty() || records.len() > USAGE_BATCH_RECORDS_MAX {
        return Err(ApiError::validation("records", format!("must hold 1 to {USAGE_BATCH_RECORDS_MAX} records")));
    }
    Ok(())
}

/// One record: its shape, its `usage_id` as the idempotency key, and the
/// command. `member_id` has been checked (or is the path's).
fn prepare(principal: &Principal, member_id: String, record: serde_json::Value) -> Prepared {
    let usage_id = record.get("usage_id").and_then(|id| id.as_str()).map(str::to_owned);
    if !record.is_object() {
        let command = Err(ApiError::validation("record", "must be a JSON object, shaped as a usage body"));
        return Prepared { member_id, usage_id, command };
    }
    // The fingerprint is the record alone, so the same record is the same
    // request through either batch route.
    let fingerprint = body::fingerprint("POST", ROUTE_NAME, record.to_string().as_bytes());
    let command = body::parse_value::<UsageBody>(record).and_then(|usage| {
        validate::identifier("usage_id", &usage.usage_id).map_err(ApiError::from)?;
        let key = usage.usage_id.clone();
        let mut request = Request::new(usage_command(usage), &principal.actor());
        request.idempotency = Some(Idempotency {
            scope: format!("{}/{member_id}/{ROUTE_NAME}", principal.actor()),
            key,
            fingerprint,
            status: 201,
        });
        Ok(request)
    });
    Prepared { member_id, usage_id, command }
}

fn refused(index: usize, member_id: String, usage_id: Option<String>, error: &ApiError) -> UsageRecordOutcome {
    if error.status_code().is_server_error() {
        tracing::error!(error = %error, index, "a usage batch record failed");
    }
    UsageRecordOutcome {
        index,
        member_id,
        usage_id,
        accepted: false,
        status: error.status_code().as_u16(),
        position: None,
        balance: None,
        burned: None,
        debt_incurred: None,
        replayed: false,
        problem: Some(error.problem()),
    }
}

/// Queue every well-formed record at once, then answer each in order.
async fn run(state: &AppState, prepared: Vec<Prepared>) -> Result<UsageBatchView, ApiError> {
    let mut commands = Vec::new();
    let mut records = Vec::with_capacity(prepared.len());
    for Prepared { member_id, usage_id, command } in prepared {
        let refusal = match command {
            Ok(request) => {
                commands.push((member_id.clone(), request));
                None
            }
            Err(error) => Some(error),
        };
        records.push((member_id, usage_id, refusal));
    }
    let ledger = state.ledger.clone();
    let mut answers = actix_web::web::block(move || ledger.execute_many(commands)).await?.into_iter();
    state.projections.notify();
    let mut results = Vec::with_capacity(records.len());
    for (index, (member_id, usage_id, refusal)) in records.into_iter().enumerate() {
        let answer = match refusal {
            Some(error) => Err(error),
            None => answers.next().expect("an answer for every queued record").map_err(ApiError::Ledger),
        };
        let outcome = match answer {
            Err(error) => refused(index, member_id, usage_id, &error),
            Ok(executed) => {
                state.metrics.command(ROUTE_NAME, executed.outcome.events.len());
                let (view, status) = command_view(Object::Usage, Some(member_id.clone()), executed, 201);
                UsageRecordOutcome {
                    index,
                    member_id,
                    usage_id: view.usage_id.or(usage_id),
                    accepted: true,
                    status,
                    position: Some(view.position),
                    balance: view.balance,
                    burned: view.burned,
                    debt_incurred: view.debt_incurred,
                    replayed: view.replayed,
                    problem: None,
                }
            }
        };
        results.push(outcome);
    }
    let accepted = results.iter().filter(|result| result.accepted).count();
    let position = results.iter().filter_map(|result| result.position).max().unwrap_or(0);
    // Nothing taken and the server at fault for every record (the writer
    // stopped, or its queue is full): the batch as a whole failed.
    if accepted == 0 && results.iter().all(|result| result.status >= 500) {
        return Err(ApiError::Busy {
            retry_after_s: BATCH_RETRY_AFTER_S,
            message: "the ledger took none of the batch's records".to_owned(),
        });
    }
    Ok(UsageBatchView { accepted, refused: results.len() - accepted, position, results })
}

#[utoipa::path(post, path = "/v1/members/{member}/usage/batch", tag = "members", request_body = UsageBatchBody,
    params(("member" = String, Path, description = "The member id")),
    responses((status = 200, description = "Every record's outcome, in request order", body = UsageBatchView),
        (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn member_batch(state: Data<AppState>, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(&state, &request)?;
    let member_id = member_path(request.match_info().get("member").unwrap_or_default())?;
    principal.require_member(&member_id)?;
    let body: UsageBatchBody = body::parse(&bytes)?;
    records_count(&body.records)?;
    let _slot = state.usage_batches.take()?;
    let prepared = body.records.into_iter().map(|record| prepare(&principal, member_id.clone(), record)).collect();
    Ok(HttpResponse::Ok().json(run(&state, prepared).await?))
}

#[utoipa::path(post, path = "/v1/usage/batch", tag = "admin", request_body = MemberUsageBatchBody,
    responses((status = 200, description = "Every record's outcome, in request order", body = UsageBatchView),
        (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn admin_batch(state: Data<AppState>, request: HttpRequest, bytes: Bytes) -> Result<HttpResponse, ApiError> {
    let principal = authenticate(&state, &request)?;
    principal.require_admin()?;
    let body: MemberUsageBatchBody = body::parse(&bytes)?;
    records_count(&body.records)?;
    let _slot = state.usage_batches.take()?;
    let prepared = body
        .records
        .into_iter()
        .map(|mut record| {
            let member_id = match record.as_object_mut().map(|fields| fields.remove("member_id")) {
                Some(Some(serde_json::Value::String(member_id))) => member_id,
                Some(_) => {
                    let usage_id = record.get("usage_id").and_then(|id| id.as_str()).map(str::to_owned);
                    let error = ApiError::validation("member_id", "is required: the member the usage is for, a string");
                    return Prepared { member_id: String::new(), usage_id, command: Err(error) };
                }
                None => return prepare(&principal, String::new(), record),
            };
            match validate::identifier("member_id", &member_id) {
                Ok(()) => prepare(&principal, member_id, record),
                Err(error) => Prepared {
                    member_id,
                    usage_id: record.get("usage_id").and_then(|id| id.as_str()).map(str::to_owned),
                    command: Err(ApiError::from(error)),
                },
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(run(&state, prepared).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_slots_refuse_beyond_the_limit_and_come_back_when_a_batch_ends() {
        let slots = BatchSlots::default();
        let running: Vec<BatchSlot> = (0..USAGE_BATCHES_CONCURRENT_MAX).map(|_| slots.take().unwrap()).collect();
        let refused = slots.take().err().expect("a batch beyond the limit is refused");
        assert_eq!(refused.status_code().as_u16(), 503);
        assert_eq!(refused.problem().retry_after_s, Some(BATCH_RETRY_AFTER_S));
        drop(running);
        assert!(slots.take().is_ok(), "slots come back when their batches end");
    }
}
