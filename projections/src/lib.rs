//! tally-projections: the read models of the event log (credit balances,
//! credit transactions, daily usage statistics, invoices, subscriptions,
//! integrations, query executions and query statistics),
//! the runner that keeps them caught up, rebuilds, digests, and the query
//! functions the API serves them with. The API never writes SQL against
//! these tables.
//!
//! # Layout
//!
//! - [`projector`]: the [`Projector`] trait (name, version, handled event
//!   types, tables, `apply`) and [`ProjectorTx`], through which `apply`
//!   writes into the generation being built.
//! - [`models`]: the five built-in projectors. `credits` builds both
//!   `credit_balances` and `credit_transactions` (a transaction's amount is
//!   the balance change it causes, so both come from the same grant rows);
//!   `daily_usage`, `invoices` and `subscriptions` one read model each;
//!   `integrations` builds `integrations` (from the integration streams),
//!   `query_executions` and `query_stats` (from `QueryExecuted`).
//! - [`runner`]: [`Projections`], the owner of a projections file: catch-up
//!   in batches, the background runner thread, `wait_for` (read-your-writes),
//!   rebuilds with progress, status.
//! - [`read`]: [`ReadModels`], the query side: pooled read connections and
//!   snapshots that resolve live table names.
//! - [`page`]: cursor pagination. [`digest`]: SHA-256 digests of read models.
//! - `storage`: the projections file, its bookkeeping tables and table
//!   generations; `registry`: the projector set and [`ReadModel`].
//! - `read_ahead`: the thread that reads and decodes a build's next batch
//!   of events while the writer applies the current one.
//!
//! # Decisions
//!
//! - **Own file.** Read models live in their own SQLite file (WAL,
//!   `synchronous=NORMAL`: a lost commit is re-applied from the log), so
//!   neither projecting nor rebuilding ever takes the event log's write
//!   lock, and readers never wait for the runner.
//! - **Exactly once.** A batch of at most `batch_events_max` events is
//!   applied and the checkpoint moved in one transaction; an error or a
//!   crash mid-batch leaves both as they were. A checkpoint moves past every
//!   event, those a projector ignores included, and stores the chain hash of
//!   its event: at start-up a read model whose checkpoint does not match the
//!   log (another log, an older backup) is rebuilt.
//! - **Rows in memory for a batch.** The built-in projectors read a
//!   member's rows once per batch, move them in memory event by event with
//!   the same rules, and write each changed row once at the end of the
//!   batch (`ProjectorTx::finish`, before the checkpoint moves in the same
//!   transaction). The rows are the ones a statement per event would leave;
//!   it is what makes a build fast (most of a build's time was statements).
//!   Rare events (subscriptions, issued invoices, payments) stay one
//!   statement each.
//! - **Builds read ahead.** A build's events are read and decoded on a
//!   thread of its own, one batch ahead, in batches larger than a live
//!   step's (`build_batch_events_max`): a rebuild writes every member's
//!   rows once per batch, so fewer, larger batches write less. Between two
//!   build steps a rebuild also takes a live step, so the served read
//!   models lag by one build step at most while it runs.
//! - **Durability is not traded for speed.** A build writes into the same
//!   file as the served generation, so it keeps the file's settings (WAL,
//!   `synchronous=NORMAL`); `synchronous=OFF` or another journal mode
//!   during a build could lose or damage the served read models on a power
//!   cut, not only the generation being built.
//! - **Failures stay local.** Each projector applies a batch in its own
//!   savepoint: one that fails is rolled back alone, reported in its status
//!   and retried after a pause, while the others go on. A failed explicit
//!   rebuild is dropped and the live generation kept.
//! - **Generations.** Each build of a read model has its own tables,
//!   `{table}_v{version}_g{generation}`; `projection_live` names the one
//!   served. A rebuild fills a new generation in bounded transactions beside
//!   the live one (which keeps being updated and served), and when it
//!   reaches the head it becomes live in the same transaction that drops the
//!   old one. Queries resolve names and read inside one read transaction, so
//!   a swap never shows them an empty, partial or missing table.
//! - **Upgrades.** A projector whose version differs from the one that built
//!   its live generation is rebuilt automatically (by the runner thread, or
//!   by `catch_up`); until then its read models answer
//!   [`ProjectionError::NotReady`] (the old tables may not fit the new
//!   queries), while the other read models are served as usual.
//! - **No ledger rules.** Every figure comes from event fields: grants move
//!   by the parts events name, debt by `debt`, `debt_reduced` and
//!   `debt_cleared`; available, held and balance follow by definition.
//!   Projections never read a clock: instants come from events (the
//!   metadata's `occurred_at`, else `recorded_at`; a usage's own
//!   `occurred_at` for daily statistics).
//! - **One owner.** A process owns a projections file through a lock file
//!   (`{file}.lock`); others get [`ProjectionError::Locked`] and may still
//!   query it through [`ReadModels::open`].
//! - **Limits.** [`page::PAGE_SIZE_MAX`] rows per page,
//!   [`models::daily_usage::DAILY_USAGE_DAYS_MAX`] days per range,
//!   `batch_events_max` events per live transaction
//!   ([`runner::BATCH_EVENTS_MAX_DEFAULT`]) and `build_batch_events_max` per
//!   build transaction ([`runner::BUILD_BATCH_EVENTS_MAX_DEFAULT`]), a
//!   read-your-writes wait of
//!   [`runner::WAIT_FOR_POSITION_DEFAULT`] by default.

pub mod cost;
pub mod digest;
pub mod error;
pub mod models;
pub mod page;
pub mod projector;
pub mod read;
mod read_ahead;
mod registry;
pub mod runner;
mod storage;
mod values;

pub use digest::Digest;
pub use error::ProjectionError;
pub use models::alerts::{AlertCount, AlertFilter, AlertRow};
pub use models::analytics::{AnalyticsTotals, DayRow, MemberAnalytics, UsageRow};
pub use models::credits::{Balance, CreditTransaction, Grant, NextExpiry};
pub use models::daily_usage::DailyUsage;
pub use models::integrations::{
    ApiUsageRow, ExecutionFilter, ExecutionRow, FailingIntegration, HistogramBucket, ProbeCandidate, QueryStats,
};
pub use models::invoices::{Invoice, InvoiceLineView};
pub use models::subscriptions::{PlanCount, Subscription};
pub use page::{Cursor, Order, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX, Page, PageRequest};
pub use projector::{ProjectedEvent, Projector, ProjectorTx, TableSpec};
pub use read::ReadModels;
pub use registry::{ReadModel, builtin_projectors};
pub use runner::{
    BATCH_EVENTS_MAX_DEFAULT, BUILD_BATCH_EVENTS_MAX_DEFAULT, BUILD_BATCH_EVENTS_MAX_LIMIT, BuildStatus, CatchUpReport,
    Progress, ProjectionOptions, Projections, ProjectorStatus, RebuildReport, RunnerHandle, WAIT_FOR_POSITION_DEFAULT,
};
