//! Real logs for the tests: a ledger on a temporary SQLite file driven by a
//! manual clock, and projections opened beside it.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use tally_ledger::domain::{
    Billing, CatalogCommand, Credits, GrantCredits, GrantSource, Interval, MemberCommand, MemberProfile, MinorUnits,
    Overage, Plan, QueryExecution, QueryStatus, RecordUsage, Rollover,
};
use tally_ledger::store::StoreOptions;
use tally_ledger::{Executed, Ledger, LedgerError, LedgerOptions, ManualClock, Request};
use tally_projections::{ProjectionError, ProjectionOptions, Projections, Projector, builtin_projectors};
use tempfile::TempDir;

pub fn instant(year: i32, month: u32, day: u32, hour: u32, minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, hour, minute, 0).single().expect("a valid instant")
}

pub fn plan(
    plan_id: &str,
    name: &str,
    price: i64,
    monthly_credits: i64,
    rollover_max_credits: Option<i64>,
    overage_limit_and_unit_price: Option<(i64, i64)>,
) -> Plan {
    let (limit_credits, unit_price) = overage_limit_and_unit_price.unwrap_or((0, 0));
    Plan {
        plan_id: plan_id.to_owned(),
        name: name.to_owned(),
        price: MinorUnits(price),
        currency: "USD".to_owned(),
        interval: Interval::Month,
        monthly_credits: Credits(monthly_credits),
        rollover: Rollover {
            enabled: rollover_max_credits.is_some(),
            max_credits: Credits(rollover_max_credits.unwrap_or(0)),
        },
        overage: Overage {
            allowed: overage_limit_and_unit_price.is_some(),
            limit_credits: Credits(limit_credits),
            unit_price: MinorUnits(unit_price),
        },
        rate_limit_per_minute: 600,
        stripe_price_id: None,
    }
}

/// Starter: 1,000 credits for 1,000, rollover up to 500, no overage.
/// Pro: 10,000 credits for 5,000, rollover up to 2,000, overage up to 2,000
/// credits at 2 each.
pub fn standard_plans() -> Vec<Plan> {
    vec![
        plan("starter", "Starter", 1_000, 1_000, Some(500), None),
        plan("pro", "Pro", 5_000, 10_000, Some(2_000), Some((2_000, 2))),
    ]
}

/// A ledger on a temporary file, its clock, and where projections go.
pub struct TestLog {
    pub directory: TempDir,
    pub clock: Arc<ManualClock>,
    pub ledger: Ledger,
}

impl TestLog {
    pub fn new(start: DateTime<Utc>) -> TestLog {
        let directory = tempfile::tempdir().expect("a temporary directory");
        let clock = Arc::new(ManualClock::new(start));
        let options = LedgerOptions {
            store: StoreOptions { synchronous_full: false, ..StoreOptions::default() },
            ..LedgerOptions::default()
        };
        let ledger =
            Ledger::open(&directory.path().join("events.db"), options, clock.clone()).expect("the ledger opens");
        TestLog { directory, clock, ledger }
    }

    pub fn with_plans(start: DateTime<Utc>, plans: Vec<Plan>) -> TestLog {
        let log = TestLog::new(start);
        for plan in plans {
            log.ledger
                .execute_catalog(Request::new(CatalogCommand::PublishPlan(plan), "admin"))
                .expect("the plan is published");
        }
        log
    }

    pub fn events_path(&self) -> PathBuf {
        self.directory.path().join("events.db")
    }

    pub fn projections_path(&self, name: &str) -> PathBuf {
        self.directory.path().join(format!("{name}.db"))
    }

    pub fn at(&self, now: DateTime<Utc>) {
        assert!(self.clock.advance_to(now), "the clock only moves forward");
    }

    pub fn try_execute(&self, member_id: &str, command: MemberCommand) -> Result<Executed, LedgerError> {
        self.ledger.execute(member_id, Request::new(command, "admin"))
    }

    pub fn execute(&self, member_id: &str, command: MemberCommand) -> Executed {
        let description = format!("{command:?}");
        self.try_execute(member_id, command).unwrap_or_else(|error| panic!("{description} was refused: {error}"))
    }

    pub fn head(&self) -> u64 {
        self.ledger.reader().expect("a reader").head().expect("the head").position
    }

    /// Projections with small batches, so that every scenario spans many.
    pub fn projections(&self, name: &str) -> Projections {
        self.projections_with(name, small_batches(), builtin_projectors())
    }

    pub fn projections_with(
        &self,
        name: &str,
        options: ProjectionOptions,
        projectors: Vec<Arc<dyn Projector>>,
    ) -> Projections {
        Projections::open_with(&self.projections_path(name), &self.events_path(), options, projectors)
            .expect("the projections open")
    }

    /// Opens, catches up and returns projections.
    pub fn caught_up(&self, name: &str) -> Projections {
        let projections = self.projections(name);
        projections.catch_up().expect("the projections catch up");
        projections
    }
}

pub fn small_batches() -> ProjectionOptions {
    ProjectionOptions { batch_events_max: 7, build_batch_events_max: 5, ..ProjectionOptions::default() }
}

pub fn register(time_zone: &str) -> MemberCommand {
    MemberCommand::Register(MemberProfile {
        time_zone: time_zone.to_owned(),
        currency: "USD".to_owned(),
        stripe_customer_id: None,
    })
}

pub fn start(plan_id: &str) -> MemberCommand {
    MemberCommand::StartSubscription {
        plan_id: plan_id.to_owned(),
        billing: Billing::Tally,
        stripe_subscription_id: None,
    }
}

pub fn usage(
    usage_id: &str,
    metric: &str,
    quantity: i64,
    credits: i64,
    occurred_at: Option<DateTime<Utc>>,
) -> MemberCommand {
    MemberCommand::RecordUsage(RecordUsage {
        usage_id: usage_id.to_owned(),
        metric: metric.to_owned(),
        quantity,
        credits: Credits(credits),
        occurred_at,
        integration_id: None,
        query_id: None,
    })
}

pub fn purchase(amount: i64, price: i64) -> MemberCommand {
    MemberCommand::GrantCredits(GrantCredits {
        price: Some(MinorUnits(price)),
        ..GrantCredits::new(GrantSource::Purchase, amount)
    })
}

pub fn reserve(amount: i64, ttl_s: Option<i64>) -> MemberCommand {
    MemberCommand::Reserve { amount: Credits(amount), ttl_s }
}

pub fn settle_with_query(
    reservation_id: &str,
    amount: i64,
    status: QueryStatus,
    duration_ms: i64,
    rows: i64,
) -> MemberCommand {
    MemberCommand::Settle {
        reservation_id: reservation_id.to_owned(),
        amount: Credits(amount),
        query: Some(QueryExecution {
            integration_id: "int1".to_owned(),
            query_id: "q1".to_owned(),
            status,
            duration_ms,
            rows,
            bytes: 0,
            cache_hit: false,
            error_code: None,
            api_usage: None,
        }),
    }
}

/// A projector that fails at the first event it handles at or after a
/// position: a crash in the middle of a batch, whose transaction is then
/// dropped without commit.
pub struct CrashingAt {
    pub inner: Arc<dyn Projector>,
    pub position: u64,
}

impl Projector for CrashingAt {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn version(&self) -> u32 {
        self.inner.version()
    }

    fn handles(&self) -> &'static [&'static str] {
        self.inner.handles()
    }

    fn tables(&self) -> &'static [tally_projections::TableSpec] {
        self.inner.tables()
    }

    fn apply(
        &self,
        tx: &tally_projections::ProjectorTx<'_>,
        event: &tally_projections::ProjectedEvent<'_>,
    ) -> Result<(), ProjectionError> {
        if event.position() >= self.position {
            return Err(ProjectionError::ProjectorFailed {
                projector: self.name().to_owned(),
                position: event.position(),
                reason: "simulated crash".to_owned(),
            });
        }
        self.inner.apply(tx, event)
    }
}

/// A projector that panics at the first event it handles at or after a
/// position: the process dying in the middle of a batch.
pub struct PanickingAt {
    pub inner: Arc<dyn Projector>,
    pub position: u64,
}

impl Projector for PanickingAt {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn version(&self) -> u32 {
        self.inner.version()
    }

    fn handles(&self) -> &'static [&'static str] {
        self.inner.handles()
    }

    fn tables(&self) -> &'static [tally_projections::TableSpec] {
        self.inner.tables()
    }

    fn apply(
        &self,
        tx: &tally_projections::ProjectorTx<'_>,
        event: &tally_projections::ProjectedEvent<'_>,
    ) -> Result<(), ProjectionError> {
        assert!(event.position() < self.position, "simulated death at position {}", event.position());
        self.inner.apply(tx, event)
    }
}

/// The same projector under another version number: an upgrade.
pub struct Reversioned {
    pub inner: Arc<dyn Projector>,
    pub version: u32,
}

impl Projector for Reversioned {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn handles(&self) -> &'static [&'static str] {
        self.inner.handles()
    }

    fn tables(&self) -> &'static [tally_projections::TableSpec] {
        self.inner.tables()
    }

    fn apply(
        &self,
        tx: &tally_projections::ProjectorTx<'_>,
        event: &tally_projections::ProjectedEvent<'_>,
    ) -> Result<(), ProjectionError> {
        self.inner.apply(tx, event)
    }
}

/// The built-in projectors with the one named `name` replaced.
pub fn projectors_replacing(
    name: &str,
    replace: impl FnOnce(Arc<dyn Projector>) -> Arc<dyn Projector>,
) -> Vec<Arc<dyn Projector>> {
    let mut replace = Some(replace);
    builtin_projectors()
        .into_iter()
        .map(|projector| {
            if projector.name() == name {
                (replace.take().expect("one projector has the name"))(projector)
            } else {
                projector
            }
        })
        .collect()
}
