//! `subscriptions`: per member, its current (or last) subscription.
//!
//! Subscription events copy the plan's terms, so the row never needs the
//! catalog. A new `SubscriptionStarted` after a cancellation replaces the
//! row. The member's Stripe customer id comes from its profile events and
//! is kept in the internal `subscription_members` table until a
//! subscription row exists to carry it.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tally_ledger::domain::{Billing, MemberEvent, PlanTerms, SubscriptionStatus};

use crate::error::ProjectionError;
use crate::projector::{ProjectedEvent, Projector, ProjectorTx, TableSpec};
use crate::read::Snapshot;
use crate::registry::ReadModel;
use crate::storage::to_sql_integer;
use crate::values::{instant_at, instant_text, optional_instant_at, u64_at};

pub const PROJECTOR_NAME: &str = "subscriptions";
/// 2: a subscription canceled at its period's end keeps `cancel_at_period_end` and `cancel_at`.
pub const PROJECTOR_VERSION: u32 = 2;

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "subscriptions",
        columns: "member_id TEXT NOT NULL PRIMARY KEY,
            plan_id TEXT NOT NULL,
            plan_name TEXT NOT NULL,
            plan_version INTEGER NOT NULL,
            price INTEGER NOT NULL,
            currency TEXT NOT NULL,
            monthly_credits INTEGER NOT NULL,
            rollover_enabled INTEGER NOT NULL,
            rollover_max_credits INTEGER NOT NULL,
            overage_allowed INTEGER NOT NULL,
            overage_limit_credits INTEGER NOT NULL,
            overage_unit_price INTEGER NOT NULL,
            status TEXT NOT NULL,
            billing TEXT NOT NULL,
            started_at TEXT NOT NULL,
            period_start TEXT NOT NULL,
            period_end TEXT NOT NULL,
            period_closed INTEGER NOT NULL,
            cancel_at_period_end INTEGER NOT NULL,
            cancel_at TEXT,
            canceled_at TEXT,
            scheduled_plan_id TEXT,
            scheduled_change_at TEXT,
            past_due_invoice_id TEXT,
            stripe_subscription_id TEXT,
            stripe_customer_id TEXT,
            updated_position INTEGER NOT NULL",
        key: "member_id",
        indexes: &[],
        read_model: "subscriptions",
    },
    TableSpec {
        name: "subscription_members",
        columns: "member_id TEXT NOT NULL PRIMARY KEY, stripe_customer_id TEXT",
        key: "member_id",
        indexes: &[],
        read_model: "subscriptions",
    },
];

const HANDLES: &[&str] = &[
    "MemberRegistered",
    "MemberProfileChanged",
    "SubscriptionStarted",
    "SubscriptionPlanChanged",
    "SubscriptionDowngradeScheduled",
    "SubscriptionCancelScheduled",
    "SubscriptionCancelRevoked",
    "SubscriptionRenewed",
    "SubscriptionPeriodClosed",
    "SubscriptionPastDue",
    "SubscriptionCanceled",
    "SubscriptionReactivated",
];

const UPSERT_MEMBER: &str = "INSERT INTO {subscription_members} (member_id, stripe_customer_id) VALUES (?1, ?2)
    ON CONFLICT (member_id) DO UPDATE SET stripe_customer_id = excluded.stripe_customer_id";
const SET_CUSTOMER: &str = "UPDATE {subscriptions} SET stripe_customer_id = ?2, updated_position = ?3
    WHERE member_id = ?1";
const SELECT_CUSTOMER: &str = "SELECT stripe_customer_id FROM {subscription_members} WHERE member_id = ?1";
const START: &str = "INSERT OR REPLACE INTO {subscriptions} (member_id, plan_id, plan_name, plan_version, price,
    currency, monthly_credits, rollover_enabled, rollover_max_credits, overage_allowed, overage_limit_credits,
    overage_unit_price, status, billing, started_at, period_start, period_end, period_closed, cancel_at_period_end,
    cancel_at, canceled_at, scheduled_plan_id, scheduled_change_at, past_due_invoice_id, stripe_subscription_id,
    stripe_customer_id, updated_position) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
    ?15, ?16, 0, 0, NULL, NULL, NULL, NULL, NULL, ?17, ?18, ?19)";
const SET_TERMS: &str = "UPDATE {subscriptions} SET plan_id = ?2, plan_name = ?3, plan_version = ?4, price = ?5,
    currency = ?6, monthly_credits = ?7, rollover_enabled = ?8, rollover_max_credits = ?9, overage_allowed = ?10,
    overage_limit_credits = ?11, overage_unit_price = ?12, scheduled_plan_id = NULL, scheduled_change_at = NULL,
    updated_position = ?13 WHERE member_id = ?1";
const SET_PERIOD: &str = "UPDATE {subscriptions} SET period_start = ?2, period_end = ?3, period_closed = 0
    WHERE member_id = ?1";
const SCHEDULE_CHANGE: &str = "UPDATE {subscriptions} SET scheduled_plan_id = ?2, scheduled_change_at = ?3,
    updated_position = ?4 WHERE member_id = ?1";
const SCHEDULE_CANCEL: &str = "UPDATE {subscriptions} SET cancel_at_period_end = 1, cancel_at = ?2,
    updated_position = ?3 WHERE member_id = ?1";
const REVOKE_CANCEL: &str = "UPDATE {subscriptions} SET cancel_at_period_end = 0, cancel_at = NULL,
    updated_position = ?2 WHERE member_id = ?1";
const CLOSE_PERIOD: &str = "UPDATE {subscriptions} SET period_closed = 1, updated_position = ?2 WHERE member_id = ?1";
const PAST_DUE: &str = "UPDATE {subscriptions} SET status = 'past_due', past_due_invoice_id = ?2,
    updated_position = ?3 WHERE member_id = ?1";
/// A subscription that ended at its period's end as asked keeps
/// `cancel_at_period_end` and `cancel_at`; one ended at once does not.
const CANCEL_AT_PERIOD_END: &str = "UPDATE {subscriptions} SET status = 'canceled', canceled_at = ?2,
    scheduled_plan_id = NULL, scheduled_change_at = NULL, updated_position = ?3
    WHERE member_id = ?1";
const CANCEL_NOW: &str = "UPDATE {subscriptions} SET status = 'canceled', canceled_at = ?2, cancel_at_period_end = 0,
    cancel_at = NULL, scheduled_plan_id = NULL, scheduled_change_at = NULL, updated_position = ?3
    WHERE member_id = ?1";
const REACTIVATE: &str = "UPDATE {subscriptions} SET status = 'active', past_due_invoice_id = NULL,
    updated_position = ?2 WHERE member_id = ?1";

fn status_text(status: SubscriptionStatus) -> &'static str {
    match status {
        SubscriptionStatus::Trialing => "trialing",
        SubscriptionStatus::Active => "active",
        SubscriptionStatus::PastDue => "past_due",
        SubscriptionStatus::Canceled => "canceled",
    }
}

pub struct SubscriptionsProjector;

impl Projector for SubscriptionsProjector {
    fn name(&self) -> &'static str {
        PROJECTOR_NAME
    }

    fn version(&self) -> u32 {
        PROJECTOR_VERSION
    }

    fn handles(&self) -> &'static [&'static str] {
        HANDLES
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    fn apply(&self, tx: &ProjectorTx<'_>, event: &ProjectedEvent<'_>) -> Result<(), ProjectionError> {
        let member_id = event.member_id;
        let position = to_sql_integer(event.position());
        let changed = match event.event {
            MemberEvent::MemberRegistered { stripe_customer_id, .. }
            | MemberEvent::MemberProfileChanged { stripe_customer_id, .. } => {
                tx.statement(UPSERT_MEMBER)?.execute(params![member_id, stripe_customer_id])?;
                tx.statement(SET_CUSTOMER)?.execute(params![member_id, stripe_customer_id, position])?;
                return Ok(());
            }
            MemberEvent::SubscriptionStarted {
                terms,
                status,
                billing,
                period_start,
                period_end,
                stripe_subscription_id,
            } => {
                let customer: Option<String> = tx
                    .statement(SELECT_CUSTOMER)?
                    .query_row(params![member_id], |row| row.get(0))
                    .optional()?
                    .flatten();
                let plan = &terms.plan;
                let billing = match billing {
                    Billing::Tally => "tally",
                    Billing::Stripe => "stripe",
                };
                tx.statement(START)?.execute(params![
                    member_id,
                    plan.plan_id,
                    plan.name,
                    terms.plan_version,
                    plan.price.0,
                    plan.currency,
                    plan.monthly_credits.0,
                    plan.rollover.enabled,
                    plan.rollover.max_credits.0,
                    plan.overage.allowed,
                    plan.overage.limit_credits.0,
                    plan.overage.unit_price.0,
                    status_text(*status),
                    billing,
                    instant_text(*period_start),
                    instant_text(*period_end),
                    stripe_subscription_id,
                    customer,
                    position,
                ])?
            }
            MemberEvent::SubscriptionPlanChanged { terms, .. } => set_terms(tx, member_id, terms, position)?,
            MemberEvent::SubscriptionRenewed { terms, period_start, period_end } => {
                set_terms(tx, member_id, terms, position)?;
                tx.statement(SET_PERIOD)?.execute(params![
                    member_id,
                    instant_text(*period_start),
                    instant_text(*period_end)
                ])?
            }
            MemberEvent::SubscriptionDowngradeScheduled { terms, effective_at } => tx
                .statement(SCHEDULE_CHANGE)?
                .execute(params![member_id, terms.plan.plan_id, instant_text(*effective_at), position])?,
            MemberEvent::SubscriptionCancelScheduled { effective_at } => {
                tx.statement(SCHEDULE_CANCEL)?.execute(params![member_id, instant_text(*effective_at), position])?
            }
            MemberEvent::SubscriptionCancelRevoked {} => {
                tx.statement(REVOKE_CANCEL)?.execute(params![member_id, position])?
            }
            MemberEvent::SubscriptionPeriodClosed { .. } => {
                tx.statement(CLOSE_PERIOD)?.execute(params![member_id, position])?
            }
            MemberEvent::SubscriptionPastDue { invoice_id } => {
                tx.statement(PAST_DUE)?.execute(params![member_id, invoice_id, position])?
            }
            MemberEvent::SubscriptionCanceled { canceled_at, immediately } => {
                let statement = if *immediately { CANCEL_NOW } else { CANCEL_AT_PERIOD_END };
                tx.statement(statement)?.execute(params![member_id, instant_text(*canceled_at), position])?
            }
            MemberEvent::SubscriptionReactivated {} => {
                tx.statement(REACTIVATE)?.execute(params![member_id, position])?
            }
            _ => return Ok(()),
        };
        if changed != 1 {
            return Err(event.inconsistent(PROJECTOR_NAME, "a subscription event for a member without a subscription"));
        }
        Ok(())
    }
}

fn set_terms(
    tx: &ProjectorTx<'_>,
    member_id: &str,
    terms: &PlanTerms,
    position: i64,
) -> Result<usize, ProjectionError> {
    let plan = &terms.plan;
    Ok(tx.statement(SET_TERMS)?.execute(params![
        member_id,
        plan.plan_id,
        plan.name,
        terms.plan_version,
        plan.price.0,
        plan.currency,
        plan.monthly_credits.0,
        plan.rollover.enabled,
        plan.rollover.max_credits.0,
        plan.overage.allowed,
        plan.overage.limit_credits.0,
        plan.overage.unit_price.0,
        position,
    ])?)
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Subscription {
    pub member_id: String,
    pub plan_id: String,
    pub plan_name: String,
    pub plan_version: u32,
    /// The plan's price per period, in minor units.
    pub price: i64,
    pub currency: String,
    pub monthly_credits: i64,
    pub rollover_enabled: bool,
    pub rollover_max_credits: i64,
    pub overage_allowed: bool,
    pub overage_limit_credits: i64,
    pub overage_unit_price: i64,
    /// `trialing`, `active`, `past_due` or `canceled`.
    pub status: String,
    /// `tally` or `stripe`: who owns periods and invoices.
    pub billing: String,
    pub started_at: DateTime<Utc>,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// A Stripe-managed period that ended and awaits Stripe's renewal.
    pub period_closed: bool,
    pub cancel_at_period_end: bool,
    pub cancel_at: Option<DateTime<Utc>>,
    pub canceled_at: Option<DateTime<Utc>>,
    /// A downgrade taking effect at `scheduled_change_at`.
    pub scheduled_plan_id: Option<String>,
    pub scheduled_change_at: Option<DateTime<Utc>>,
    pub past_due_invoice_id: Option<String>,
    pub stripe_subscription_id: Option<String>,
    pub stripe_customer_id: Option<String>,
    pub updated_position: u64,
}

pub(crate) fn subscription(snapshot: &Snapshot<'_>, member_id: &str) -> Result<Option<Subscription>, ProjectionError> {
    let mut statement = snapshot.statement(
        ReadModel::Subscriptions,
        "SELECT member_id, plan_id, plan_name, plan_version, price, currency, monthly_credits, rollover_enabled,
            rollover_max_credits, overage_allowed, overage_limit_credits, overage_unit_price, status, billing,
            started_at, period_start, period_end, period_closed, cancel_at_period_end, cancel_at, canceled_at,
            scheduled_plan_id, scheduled_change_at, past_due_invoice_id, stripe_subscription_id,
            stripe_customer_id, updated_position
         FROM {subscriptions} WHERE member_id = ?1",
    )?;
    let found = statement
        .query_row(params![member_id], |row| {
            Ok(Subscription {
                member_id: row.get(0)?,
                plan_id: row.get(1)?,
                plan_name: row.get(2)?,
                plan_version: row.get(3)?,
                price: row.get(4)?,
                currency: row.get(5)?,
                monthly_credits: row.get(6)?,
                rollover_enabled: row.get(7)?,
                rollover_max_credits: row.get(8)?,
                overage_allowed: row.get(9)?,
                overage_limit_credits: row.get(10)?,
                overage_unit_price: row.get(11)?,
                status: row.get(12)?,
                billing: row.get(13)?,
                started_at: instant_at(row, 14)?,
                period_start: instant_at(row, 15)?,
                period_end: instant_at(row, 16)?,
                period_closed: row.get(17)?,
                cancel_at_period_end: row.get(18)?,
                cancel_at: optional_instant_at(row, 19)?,
                canceled_at: optional_instant_at(row, 20)?,
                scheduled_plan_id: row.get(21)?,
                scheduled_change_at: optional_instant_at(row, 22)?,
                past_due_invoice_id: row.get(23)?,
                stripe_subscription_id: row.get(24)?,
                stripe_customer_id: row.get(25)?,
                updated_position: u64_at(row, 26)?,
            })
        })
        .optional()?;
    Ok(found)
}

/// Subscriptions of one plan in one status and currency, and what their
/// fees add up to per period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanCount {
    pub plan_id: String,
    pub plan_name: String,
    pub status: String,
    pub currency: String,
    pub subscriptions: u64,
    /// The sum of their plans' prices, in minor units.
    pub price_total: i64,
}

pub(crate) fn plan_counts(snapshot: &Snapshot<'_>) -> Result<Vec<PlanCount>, ProjectionError> {
    let mut statement = snapshot.statement(
        ReadModel::Subscriptions,
        "SELECT plan_id, max(plan_name), status, currency, count(*), sum(price) FROM {subscriptions}
         GROUP BY plan_id, status, currency ORDER BY plan_id, status, currency",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(PlanCount {
            plan_id: row.get(0)?,
            plan_name: row.get(1)?,
            status: row.get(2)?,
            currency: row.get(3)?,
            subscriptions: u64_at(row, 4)?,
            price_total: row.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
