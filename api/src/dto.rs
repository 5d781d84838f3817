//! The API's request and response shapes: the OpenAPI document is built from
//! these. They are separate from the domain types so the wire format is a
//! contract of its own; amounts are plain integers (credits, or minor units).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    /// IANA time zone for daily usage statistics; `UTC` by default.
    pub time_zone: Option<String>,
    /// ISO 4217 currency; `USD` by default.
    pub currency: Option<String>,
    pub stripe_customer_id: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloverBody {
    pub enabled: bool,
    #[serde(default)]
    pub max_credits: i64,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OverageBody {
    pub allowed: bool,
    #[serde(default)]
    pub limit_credits: i64,
    /// Minor units per credit.
    #[serde(default)]
    pub unit_price: i64,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    pub plan_id: String,
    pub name: String,
    /// Minor units per month.
    pub price: i64,
    pub currency: String,
    /// Only `month`.
    #[serde(default = "month")]
    pub interval: String,
    pub monthly_credits: i64,
    pub rollover: RolloverBody,
    pub overage: OverageBody,
    pub rate_limit_per_minute: u32,
    pub stripe_price_id: Option<String>,
}

fn month() -> String {
    "month".to_owned()
}

/// A plan as the catalog holds it: the fields of [`PlanBody`] (spelled out,
/// since a request body refuses unknown fields and this answer has more),
/// its version and whether it is retired.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub plan_id: String,
    pub name: String,
    pub price: i64,
    pub currency: String,
    pub interval: String,
    pub monthly_credits: i64,
    pub rollover: RolloverBody,
    pub overage: OverageBody,
    pub rate_limit_per_minute: u32,
    pub stripe_price_id: Option<String>,
    pub plan_version: u32,
    pub retired: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    pub plans: Vec<PlanView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanChoiceBody {
    pub plan_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSubscriptionBody {
    pub plan_id: String,
    /// `tally` (the default: tally bills) or `stripe` (tally creates the
    /// Stripe customer and subscription; Stripe bills).
    #[serde(default)]
    pub billing: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Cancel when the period ends (true) or now (false, the default).
    #[serde(default)]
    pub at_period_end: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// `purchase`, `promotional` or `adjustment`.
    pub source: String,
    pub amount: i64,
    /// 0–100, lower burns first; a default per source.
    pub priority: Option<i64>,
    /// `paid` or `promotional`; only for an adjustment.
    pub category: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// A future instant schedules the grant.
    pub effective_at: Option<DateTime<Utc>>,
    /// Required for an adjustment.
    pub reason: Option<String>,
    /// For a purchase: what it cost, in minor units.
    pub price: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DebitBody {
    pub amount: i64,
    pub reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBody {
    /// Unique per member for ever.
    pub usage_id: String,
    pub metric: String,
    #[serde(default = "one")]
    pub quantity: i64,
    pub credits: i64,
    /// When the usage happened: within the last 7 days and at most 5 minutes ahead.
    pub occurred_at: Option<DateTime<Utc>>,
    pub integration_id: Option<String>,
    pub query_id: Option<String>,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReverseBody {
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    pub credits: i64,
}

/// Would a deduction of `requested` credits be allowed now? Answered from
/// the writer's state, never from a read model; nothing is written.
#[derive(Debug, Serialize, ToSchema)]
pub struct CheckView {
    pub allowed: bool,
    /// The credits asked about.
    pub requested: i64,
    /// Credits spendable now, without debt.
    pub available: i64,
    /// How much more debt (overage) the plan allows now: 0 without overage,
    /// while past due, or at the limit.
    pub overage_room: i64,
    /// How much of `requested` would become debt; 0 when refused.
    pub would_incur_debt: i64,
    /// Why it would be refused: `insufficient_credits`,
    /// `past_due_no_overage` or `overage_limit_reached`. Absent when allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, nullable = false)]
    pub reason: Option<&'static str>,
    /// Deprecated alias of `would_incur_debt` (on `balance`, `debt` is the
    /// debt owed now; here it never was). Removed in the next release.
    #[schema(deprecated)]
    pub debt: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveBody {
    pub amount: i64,
    /// 1–86,400; 600 by default.
    pub ttl_s: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryBody {
    pub integration_id: String,
    pub query_id: String,
    /// `succeeded` or `failed`.
    pub status: String,
    pub duration_ms: i64,
    #[serde(default)]
    pub rows: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettleBody {
    /// 0..=reserved; the rest is released.
    pub amount: i64,
    pub query: Option<QueryBody>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClockBody {
    pub now: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClockView {
    pub now: DateTime<Utc>,
    pub position: u64,
    pub members: u64,
    pub events: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct BalanceView {
    pub balance: i64,
    pub available: i64,
    pub held: i64,
    pub debt: i64,
}

/// One grant's part of an amount: which grant paid (or holds) how much.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GrantPartView {
    pub grant_id: String,
    pub amount: i64,
}

/// The answer to every write: what the command acted on (`object` and its
/// ids, at top level), where its last event landed (`position`: use it as
/// `min_position` on reads), the balance right after it where credits
/// moved, and its events. Fields that do not apply to the object are
/// absent.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct CommandView {
    /// `member`, `plan`, `subscription`, `grant`, `debit`, `usage`,
    /// `usage_reversal`, `reservation` or `invoice`.
    pub object: &'static str,
    /// Absent for catalog commands (`POST /v1/plans`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub member_id: Option<String>,
    pub position: u64,
    /// The member's balance right after the command.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub balance: Option<BalanceView>,
    /// A grant's id (the first, when the command granted several).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub grant_id: Option<String>,
    /// Every grant the command created: a subscription's allocation, a
    /// reversal's refund, a purchase.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grant_ids: Vec<String>,
    /// A grant with a future `effective_at` is scheduled under this id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub schedule_id: Option<String>,
    /// When a scheduled grant or plan change takes effect.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub effective_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub usage_id: Option<String>,
    /// The grants that paid, and how much each (usage, debit, settlement).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub burned: Option<Vec<GrantPartView>>,
    /// The part of a usage that became debt (overage).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub debt_incurred: Option<i64>,
    /// A reversal: the debt it cut, and the credits it refunded as a grant.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub debt_reduced: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub refunded: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reservation_id: Option<String>,
    /// A reservation's deadline: settle or release before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub deadline: Option<DateTime<Utc>>,
    /// The credits a reservation holds, and on which grants.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub held: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub holds: Option<Vec<GrantPartView>>,
    /// A settlement's charge, and what it (or a release) gave back.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub charged: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub released: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub plan_id: Option<String>,
    /// A subscription's status after the command: `active`, `trialing`,
    /// `past_due` or `canceled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, value_type = Option<String>)]
    pub subscription_status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub period_start: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub period_end: Option<DateTime<Utc>>,
    /// When a scheduled cancel ends the subscription.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cancel_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub canceled_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub invoice_id: Option<String>,
    /// The events the command appended, each with its `position`.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
    /// True when this is the stored answer to an earlier request with the same `Idempotency-Key`.
    pub replayed: bool,
    /// True when what the command asks for already held (a second cancel
    /// at period end, a release of a released reservation, a settle
    /// repeated with the same amount, an unchanged profile): the command
    /// wrote no event of its own (time that fell due may still have been
    /// recorded before it, which moves `position`), and the answer says
    /// where things stand.
    pub already: bool,
}
