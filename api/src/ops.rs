//! Operator routes over the read models: where each projector stands, and a
//! rebuild from the log while the server keeps serving the old generation
//! (DESIGN.md §5). Only the process that owns the projections may rebuild
//! them, so `tally projections rebuild` calls these when a server runs on
//! its data directory.

use crate::error::{ApiError, Problem};
use crate::{AppState, authenticate, body};
use actix_web::web::{Bytes, Data};
use actix_web::{HttpRequest, HttpResponse, get, post};
use serde::{Deserialize, Serialize};
use tally_projections::{ProjectionError, ProjectorStatus, RebuildReport};
use utoipa::ToSchema;

/// A generation being built beside the live one.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BuildView {
    pub generation: u64,
    /// Events replayed into it so far.
    pub checkpoint: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProjectorView {
    pub name: String,
    pub version: u32,
    pub read_models: Vec<String>,
    /// Whether its read models are served (a generation of this version is live).
    pub serving: bool,
    pub generation: Option<u64>,
    /// The last event applied to the live generation.
    pub checkpoint: u64,
    /// Events between the checkpoint and the log's head.
    pub lag: u64,
    pub build: Option<BuildView>,
    pub last_error: Option<String>,
}

impl From<ProjectorStatus> for ProjectorView {
    fn from(status: ProjectorStatus) -> ProjectorView {
        ProjectorView {
            name: status.name.to_owned(),
            version: status.version,
            read_models: status.read_models.iter().map(|name| (*name).to_owned()).collect(),
            serving: status.serving,
            generation: status.generation,
            checkpoint: status.checkpoint,
            lag: status.lag,
            build: status.build.map(|build| BuildView { generation: build.generation, checkpoint: build.checkpoint }),
            last_error: status.last_error,
        }
    }
}

/// A follower of the log that acts rather than projects.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReactorView {
    /// `alerts` (the alert reactor) or `webhooks` (the dispatcher's fan-out).
    pub name: String,
    /// The last event it handled.
    pub checkpoint: u64,
    pub lag: u64,
    /// What it decided and has not finished: alert commands not yet taken
    /// by the ledger, or webhook deliveries waiting to be sent.
    pub pending: u64,
    /// Passes the alert reactor completed (it starts one when this route is
    /// read): wait for two more to know it looked after you asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passes: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProjectionsView {
    /// The log's last position.
    pub head: u64,
    pub projectors: Vec<ProjectorView>,
    #[serde(default)]
    pub reactors: Vec<ReactorView>,
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RebuildBody {
    /// A projector or one of its read models (`credits`, `credit_balances`,
    /// …); every projector when absent.
    #[serde(default)]
    pub projector: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RebuildView {
    pub projectors: Vec<String>,
    /// The checkpoint the new generations went live at.
    pub position: u64,
    pub events: u64,
    pub elapsed_s: f64,
    pub events_per_s: f64,
}

impl From<RebuildReport> for RebuildView {
    fn from(report: RebuildReport) -> RebuildView {
        RebuildView {
            projectors: report.projectors.iter().map(|name| (*name).to_owned()).collect(),
            position: report.position,
            events: report.events,
            elapsed_s: report.elapsed_s,
            events_per_s: report.events_per_s,
        }
    }
}

fn projection_error(error: ProjectionError) -> ApiError {
    match error {
        ProjectionError::UnknownProjector { name } => {
            ApiError::NotFound(format!("projector or read model `{name}` not found"))
        }
        other => ApiError::Internal(other.to_string()),
    }
}

#[utoipa::path(get, path = "/v1/admin/projections", tag = "admin",
    responses((status = 200, body = ProjectionsView), (status = 403, body = Problem)), security(("bearer" = [])))]
#[get("/v1/admin/projections")]
pub async fn projections_status(state: Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &request)?.require_admin()?;
    let ledger = state.ledger.clone();
    let projections = state.projections.clone();
    let (head, statuses) = actix_web::web::block(move || -> Result<_, ApiError> {
        let head = ledger.reader()?.head().map_err(tally_ledger::LedgerError::from)?.position;
        Ok((head, projections.status().map_err(projection_error)?))
    })
    .await??;
    let projectors = statuses.into_iter().map(ProjectorView::from).collect();
    let mut reactors = Vec::new();
    let progress = &state.alerts.progress;
    progress.wake();
    {
        use std::sync::atomic::Ordering::SeqCst;
        let checkpoint = progress.position.load(SeqCst);
        reactors.push(ReactorView {
            name: "alerts".to_owned(),
            checkpoint,
            lag: head.saturating_sub(checkpoint),
            pending: progress.outbox.load(SeqCst),
            passes: Some(progress.passes.load(SeqCst)),
        });
    }
    if let Some(dispatcher) = state.webhooks.dispatcher.clone() {
        let (checkpoint, pending) = actix_web::web::block(move || {
            let dispatcher = dispatcher.lock().expect("dispatcher lock");
            (dispatcher.position(), dispatcher.pending().unwrap_or(0))
        })
        .await?;
        reactors.push(ReactorView {
            name: "webhooks".to_owned(),
            checkpoint,
            lag: head.saturating_sub(checkpoint),
            pending,
            passes: None,
        });
    }
    Ok(HttpResponse::Ok().json(ProjectionsView { head, projectors, reactors }))
}

/// Answers once the new generations are live; reads are served from the old
/// ones meanwhile. Poll `GET /v1/admin/projections` for progress.
#[utoipa::path(post, path = "/v1/admin/projections/rebuild", tag = "admin", request_body = RebuildBody,
    responses((status = 200, body = RebuildView), (status = 404, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = [])))]
#[post("/v1/admin/projections/rebuild")]
pub async fn rebuild_projections(
    state: Data<AppState>,
    request: HttpRequest,
    bytes: Bytes,
) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &request)?.require_admin()?;
    let body: RebuildBody = body::parse(&bytes)?;
    let projections = state.projections.clone();
    let report = actix_web::web::block(move || projections.rebuild(body.projector.as_deref(), |_| {}))
        .await?
        .map_err(projection_error)?;
    tracing::info!(projectors = ?report.projectors, position = report.position, "rebuilt read models");
    Ok(HttpResponse::Ok().json(RebuildView::from(report)))
}
