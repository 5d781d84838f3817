//! The query side: a small pool of read connections, and snapshots in which
//! a query resolves the live table names and reads them.
//!
//! Resolving and reading happen in one read transaction, so a rebuild that
//! swaps generations and drops the old tables meanwhile is invisible to a
//! query in flight: WAL keeps its snapshot, old tables included, until it
//! ends. A query started after the swap sees only the new tables.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;
use rusqlite::{CachedStatement, Connection};

use crate::digest::{Digest, digest_read_model};
use crate::error::ProjectionError;
use crate::models::alerts::{self, AlertCount, AlertFilter, AlertRow};
use crate::models::analytics::{self, AnalyticsTotals, DayRow, MemberAnalytics, UsageRow};
use crate::models::credits::{self, Balance, CreditTransaction, Grant};
use crate::models::daily_usage::{self, DailyUsage};
use crate::models::integrations::{
    self, ApiUsageRow, ExecutionFilter, ExecutionRow, FailingIntegration, ProbeCandidate, QueryStats,
};
use crate::models::invoices::{self, Invoice};
use crate::models::subscriptions::{self, PlanCount, Subscription};
use crate::page::{Page, PageRequest};
use crate::projector::render;
use crate::registry::{ReadModel, Registry};
use crate::storage::{self, GenerationRow};

/// Idle read connections kept for reuse; more are opened under load and
/// closed when returned beyond this.
pub const READ_CONNECTIONS_IDLE_MAX: usize = 16;

/// Query functions over the read models. Cheap to clone; safe to share
/// between threads.
#[derive(Clone)]
pub struct ReadModels {
    shared: Arc<ReadShared>,
}

struct ReadShared {
    path: PathBuf,
    busy_timeout: Duration,
    registry: Arc<Registry>,
    idle: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for ReadModels {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ReadModels").field("path", &self.shared.path).finish_non_exhaustive()
    }
}

impl ReadModels {
    pub(crate) fn new(path: &Path, busy_timeout: Duration, registry: Arc<Registry>) -> ReadModels {
        ReadModels {
            shared: Arc::new(ReadShared {
                path: path.to_path_buf(),
                busy_timeout,
                registry,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Queries on a projections file without owning it (the CLI's `status`
    /// beside a running server), for the built-in projectors.
    pub fn open(path: &Path) -> Result<ReadModels, ProjectionError> {
        let read_models = ReadModels::new(
            path,
            Duration::from_millis(crate::runner::BUSY_TIMEOUT_DEFAULT_MS),
            Arc::new(Registry::new(crate::registry::builtin_projectors())),
        );
        let initialised = read_models.with_connection(storage::is_initialised)?;
        if !initialised {
            return Err(ProjectionError::Foreign {
                path: path.to_path_buf(),
                reason: "no projections were ever written to it".to_owned(),
            });
        }
        Ok(read_models)
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    fn take_connection(&self) -> Result<Connection, ProjectionError> {
        if let Some(connection) = self.shared.idle.lock().expect("pool lock").pop() {
            return Ok(connection);
        }
        storage::open_for_reading(&self.shared.path, self.shared.busy_timeout)
    }

    fn return_connection(&self, connection: Connection) {
        let mut idle = self.shared.idle.lock().expect("pool lock");
        if idle.len() < READ_CONNECTIONS_IDLE_MAX {
            idle.push(connection);
        }
    }

    pub(crate) fn with_connection<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, ProjectionError>,
    ) -> Result<T, ProjectionError> {
        let connection = self.take_connection()?;
        let result = read(&connection);
        // A connection whose statement failed mid-transaction is not reused.
        if connection.is_autocommit() {
            self.return_connection(connection);
        }
        result
    }

    /// Runs `read` in one read transaction: every table it names resolves
    /// to the generation live at the snapshot's start.
    pub(crate) fn snapshot<T>(
        &self,
        read: impl FnOnce(&Snapshot<'_>) -> Result<T, ProjectionError>,
    ) -> Result<T, ProjectionError> {
        self.with_connection(|connection| {
            let transaction = connection.unchecked_transaction()?;
            let live = storage::live_rows(&transaction)?;
            let snapshot = Snapshot { connection: &transaction, registry: &self.shared.registry, live };
            let result = read(&snapshot);
            drop(snapshot);
            transaction.commit()?;
            result
        })
    }
}

/// One consistent view of the read models.
pub(crate) struct Snapshot<'conn> {
    connection: &'conn Connection,
    registry: &'conn Registry,
    live: Vec<GenerationRow>,
}

impl<'conn> Snapshot<'conn> {
    pub(crate) fn connection(&self) -> &'conn Connection {
        self.connection
    }

    /// The live generation of a projector, if it was built by the version
    /// this process runs; older versions' tables are not served.
    pub(crate) fn live(&self, projector_name: &str) -> Option<&GenerationRow> {
        let projector = self.registry.get(projector_name)?;
        self.live.iter().find(|row| row.projector == projector_name && row.version == projector.version())
    }

    /// A statement over the live tables of `read_model`'s projector.
    pub(crate) fn statement(
        &self,
        read_model: ReadModel,
        template: &str,
    ) -> Result<CachedStatement<'conn>, ProjectionError> {
        let sql = self.render(read_model.projector(), read_model.name(), template)?;
        Ok(self.connection.prepare_cached(&sql)?)
    }

    pub(crate) fn render(
        &self,
        projector_name: &str,
        read_model_name: &str,
        template: &str,
    ) -> Result<String, ProjectionError> {
        let not_ready = || ProjectionError::NotReady { read_model: read_model_name.to_owned() };
        let projector = self.registry.get(projector_name).ok_or_else(not_ready)?;
        let live = self.live(projector_name).ok_or_else(not_ready)?;
        Ok(render(template, projector.tables(), live.version, live.generation))
    }
}

impl ReadModels {
    /// A member's balance; `None` for a member the log never registered.
    pub fn balance(&self, member_id: &str) -> Result<Option<Balance>, ProjectionError> {
        self.snapshot(|snapshot| credits::balance(snapshot, member_id))
    }

    /// A member's live grants, oldest first.
    pub fn grants(&self, member_id: &str) -> Result<Vec<Grant>, ProjectionError> {
        self.snapshot(|snapshot| credits::grants(snapshot, member_id))
    }

    pub fn transactions(
        &self,
        member_id: &str,
        page: &PageRequest,
    ) -> Result<Page<CreditTransaction>, ProjectionError> {
        self.snapshot(|snapshot| credits::transactions(snapshot, member_id, page))
    }

    /// Daily rows with `from <= day <= to` (both in the member's time zone),
    /// ordered by day then metric.
    pub fn daily_usage(
        &self,
        member_id: &str,
        from: NaiveDate,
        to: NaiveDate,
        page: &PageRequest,
    ) -> Result<Page<DailyUsage>, ProjectionError> {
        self.snapshot(|snapshot| daily_usage::daily_usage(snapshot, member_id, from, to, page))
    }

    /// A member's invoices with their lines, by the order they were opened.
    pub fn invoices(&self, member_id: &str, page: &PageRequest) -> Result<Page<Invoice>, ProjectionError> {
        self.snapshot(|snapshot| invoices::invoices(snapshot, member_id, page))
    }

    /// One invoice of a member; `None` if the member has no such invoice
    /// (an id of another member's invoice included).
    pub fn invoice(&self, member_id: &str, invoice_id: &str) -> Result<Option<Invoice>, ProjectionError> {
        self.snapshot(|snapshot| invoices::invoice(snapshot, member_id, invoice_id))
    }

    pub fn subscription(&self, member_id: &str) -> Result<Option<Subscription>, ProjectionError> {
        self.snapshot(|snapshot| subscriptions::subscription(snapshot, member_id))
    }

    /// A member's query executions, newest first unless asked otherwise.
    pub fn executions(
        &self,
        member_id: &str,
        filter: &ExecutionFilter,
        page: &PageRequest,
    ) -> Result<Page<ExecutionRow>, ProjectionError> {
        self.snapshot(|snapshot| integrations::executions(snapshot, member_id, filter, page))
    }

    /// The statistics of one integration's queries.
    pub fn query_stats(&self, member_id: &str, integration_id: &str) -> Result<Vec<QueryStats>, ProjectionError> {
        self.snapshot(|snapshot| integrations::query_stats(snapshot, member_id, integration_id))
    }

    /// The last API usage a source reported for an integration.
    pub fn api_usage(&self, member_id: &str, integration_id: &str) -> Result<Option<ApiUsageRow>, ProjectionError> {
        self.snapshot(|snapshot| integrations::api_usage(snapshot, member_id, integration_id))
    }

    /// Alerts, one member's or every member's, by the position they opened at.
    pub fn alerts(&self, filter: &AlertFilter, page: &PageRequest) -> Result<Page<AlertRow>, ProjectionError> {
        self.snapshot(|snapshot| alerts::alerts(snapshot, filter, page))
    }

    /// Per rule, the episodes opened and those still open.
    pub fn alert_counts(&self) -> Result<Vec<AlertCount>, ProjectionError> {
        self.snapshot(alerts::counts)
    }

    /// A member's usage by dimension (`metric`, `integration`, `query`)
    /// per day and key, over `[from, to]` (the member's days).
    pub fn analytics_usage(
        &self,
        member_id: &str,
        dimension: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<UsageRow>, ProjectionError> {
        self.snapshot(|snapshot| analytics::usage(snapshot, member_id, dimension, from, to))
    }

    /// A member's usage by dimension over `[from, to]` per key, most
    /// credits first: (key, credits, quantity, records).
    pub fn analytics_breakdown(
        &self,
        member_id: &str,
        dimension: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<(String, i64, i64, i64)>, ProjectionError> {
        self.snapshot(|snapshot| analytics::breakdown(snapshot, member_id, dimension, from, to))
    }

    /// A member's credit flow per day over `[from, to]`.
    pub fn analytics_days(
        &self,
        member_id: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DayRow>, ProjectionError> {
        self.snapshot(|snapshot| analytics::days(snapshot, member_id, from, to))
    }

    pub fn analytics_member(&self, member_id: &str) -> Result<Option<MemberAnalytics>, ProjectionError> {
        self.snapshot(|snapshot| analytics::member(snapshot, member_id))
    }

    pub fn analytics_totals(&self) -> Result<AnalyticsTotals, ProjectionError> {
        self.snapshot(analytics::totals)
    }

    /// A member's queries over the UTC days `[from, to]`, by integration and query.
    pub fn query_performance(
        &self,
        member_id: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<QueryStats>, ProjectionError> {
        self.snapshot(|snapshot| integrations::query_performance(snapshot, member_id, from, to))
    }

    /// How many integrations are failing, and the first `limit`.
    pub fn failing_integrations(&self, limit: usize) -> Result<(u64, Vec<FailingIntegration>), ProjectionError> {
        self.snapshot(|snapshot| integrations::failing(snapshot, limit))
    }

    /// Subscriptions by plan, status and currency.
    pub fn plan_counts(&self) -> Result<Vec<PlanCount>, ProjectionError> {
        self.snapshot(subscriptions::plan_counts)
    }

    /// Active integrations, least recently checked first.
    pub fn probe_candidates(&self, limit: usize) -> Result<Vec<ProbeCandidate>, ProjectionError> {
        self.snapshot(|snapshot| integrations::probe_candidates(snapshot, limit))
    }

    /// The live checkpoint a read model is served at.
    pub fn position(&self, read_model: ReadModel) -> Result<u64, ProjectionError> {
        self.snapshot(|snapshot| {
            snapshot
                .live(read_model.projector())
                .map(|row| row.checkpoint)
                .ok_or_else(|| ProjectionError::NotReady { read_model: read_model.name().to_owned() })
        })
    }

    pub fn digest(&self, read_model: ReadModel) -> Result<Digest, ProjectionError> {
        let projector = self
            .registry()
            .get(read_model.projector())
            .ok_or_else(|| ProjectionError::NotReady { read_model: read_model.name().to_owned() })?;
        self.snapshot(|snapshot| digest_read_model(snapshot, projector.as_ref(), read_model.name()))
    }

    /// The digests of every read model of one projector, in one snapshot.
    pub fn digests_of_projector(&self, projector_name: &str) -> Result<Vec<Digest>, ProjectionError> {
        let projector = self
            .registry()
            .get(projector_name)
            .ok_or_else(|| ProjectionError::UnknownProjector { name: projector_name.to_owned() })?;
        self.snapshot(|snapshot| {
            projector
                .read_models()
                .into_iter()
                .map(|read_model| digest_read_model(snapshot, projector.as_ref(), read_model))
                .collect()
        })
    }

    /// Where each projector stands, from the file alone (no log head: `lag`
    /// is 0 and `checkpoint` the live one).
    pub fn status(&self) -> Result<Vec<crate::runner::ProjectorStatus>, ProjectionError> {
        let statuses = crate::runner::status_of(self, 0)?;
        Ok(statuses.into_iter().map(|status| crate::runner::ProjectorStatus { lag: 0, ..status }).collect())
    }
}
