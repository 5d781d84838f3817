//! The plan catalog: one stream (`catalog`) of plan definitions.
//!
//! Subscriptions copy a plan's terms into their own events, so a member's
//! history never needs the catalog to be understood, and an audit as of T
//! sees the terms of T.

use super::amount::{Credits, MinorUnits};
use super::error::DomainError;
use super::limits::*;
use super::validate;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const CATALOG_STREAM: &str = "catalog";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollover {
    pub enabled: bool,
    pub max_credits: Credits,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overage {
    pub allowed: bool,
    pub limit_credits: Credits,
    /// The price of one credit of overage, in minor units.
    pub unit_price: MinorUnits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interval {
    Month,
}

/// A plan as published. Its terms are copied into subscription events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub plan_id: String,
    pub name: String,
    pub price: MinorUnits,
    /// ISO 4217 code, upper case.
    pub currency: String,
    pub interval: Interval,
    pub monthly_credits: Credits,
    pub rollover: Rollover,
    pub overage: Overage,
    pub rate_limit_per_minute: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_price_id: Option<String>,
}

/// A plan's terms at one revision, as a subscription carries them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTerms {
    pub plan_version: u32,
    #[serde(flatten)]
    pub plan: Plan,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    pub terms: PlanTerms,
    pub retired: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum CatalogEvent {
    PlanPublished { plan: Plan },
    PlanRevised { plan: Plan, plan_version: u32 },
    PlanRetired { plan_id: String },
}

impl CatalogEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            CatalogEvent::PlanPublished { .. } => "PlanPublished",
            CatalogEvent::PlanRevised { .. } => "PlanRevised",
            CatalogEvent::PlanRetired { .. } => "PlanRetired",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatalogCommand {
    PublishPlan(Plan),
    /// New terms for an existing plan; they reach subscribers at renewal.
    RevisePlan(Plan),
    RetirePlan {
        plan_id: String,
    },
}

/// The fold of the catalog stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub plans: BTreeMap<String, CatalogEntry>,
    pub version: u64,
}

impl Catalog {
    pub fn plan(&self, plan_id: &str) -> Option<&CatalogEntry> {
        self.plans.get(plan_id)
    }

    pub fn plan_by_stripe_price(&self, stripe_price_id: &str) -> Option<&CatalogEntry> {
        self.plans.values().find(|entry| entry.terms.plan.stripe_price_id.as_deref() == Some(stripe_price_id))
    }

    pub fn evolve(mut self, event: &CatalogEvent) -> Catalog {
        self.apply(event);
        self
    }

    pub fn apply(&mut self, event: &CatalogEvent) {
        self.version += 1;
        match event {
            CatalogEvent::PlanPublished { plan } => {
                let terms = PlanTerms { plan_version: 1, plan: plan.clone() };
                self.plans.insert(plan.plan_id.clone(), CatalogEntry { terms, retired: false });
            }
            CatalogEvent::PlanRevised { plan, plan_version } => {
                if let Some(entry) = self.plans.get_mut(&plan.plan_id) {
                    entry.terms = PlanTerms { plan_version: *plan_version, plan: plan.clone() };
                }
            }
            CatalogEvent::PlanRetired { plan_id } => {
                if let Some(entry) = self.plans.get_mut(plan_id) {
                    entry.retired = true;
                }
            }
        }
    }

    pub fn decide(&self, command: &CatalogCommand) -> Result<Vec<CatalogEvent>, DomainError> {
        match command {
            CatalogCommand::PublishPlan(plan) => {
                validate_plan(plan)?;
                if self.plans.contains_key(&plan.plan_id) {
                    return Err(DomainError::PlanAlreadyExists { plan_id: plan.plan_id.clone() });
                }
                self.check_stripe_price_unique(plan)?;
                Ok(vec![CatalogEvent::PlanPublished { plan: plan.clone() }])
            }
            CatalogCommand::RevisePlan(plan) => {
                validate_plan(plan)?;
                let entry = self
                    .plans
                    .get(&plan.plan_id)
                    .ok_or_else(|| DomainError::PlanNotFound { plan_id: plan.plan_id.clone() })?;
                if entry.terms.plan.currency != plan.currency {
                    return Err(DomainError::invalid("currency", "a plan revision cannot change the currency"));
                }
                self.check_stripe_price_unique(plan)?;
                let plan_version = entry.terms.plan_version + 1;
                Ok(vec![CatalogEvent::PlanRevised { plan: plan.clone(), plan_version }])
            }
            CatalogCommand::RetirePlan { plan_id } => {
                let entry =
                    self.plans.get(plan_id).ok_or_else(|| DomainError::PlanNotFound { plan_id: plan_id.clone() })?;
                if entry.retired {
                    return Err(DomainError::invalid("plan_id", "the plan is already retired"));
                }
                Ok(vec![CatalogEvent::PlanRetired { plan_id: plan_id.clone() }])
            }
        }
    }

    fn check_stripe_price_unique(&self, plan: &Plan) -> Result<(), DomainError> {
        let Some(price_id) = plan.stripe_price_id.as_deref() else { return Ok(()) };
        match self.plan_by_stripe_price(price_id) {
            Some(other) if other.terms.plan.plan_id != plan.plan_id => Err(DomainError::invalid(
                "stripe_price_id",
                format!("already used by plan {}", other.terms.plan.plan_id),
            )),
            _ => Ok(()),
        }
    }
}

pub fn validate_plan(plan: &Plan) -> Result<(), DomainError> {
    validate::identifier("plan_id", &plan.plan_id)?;
    validate::text("name", &plan.name)?;
    validate::currency("currency", &plan.currency)?;
    validate::range("price", plan.price.0, 0, PRICE_MINOR_MAX)?;
    validate::range("monthly_credits", plan.monthly_credits.0, 0, PLAN_CREDITS_MAX)?;
    validate::range("rollover.max_credits", plan.rollover.max_credits.0, 0, PLAN_CREDITS_MAX)?;
    validate::range("overage.limit_credits", plan.overage.limit_credits.0, 0, PLAN_CREDITS_MAX)?;
    validate::range("overage.unit_price", plan.overage.unit_price.0, 0, UNIT_PRICE_MINOR_MAX)?;
    validate::range(
        "rate_limit_per_minute",
        i64::from(plan.rate_limit_per_minute),
        1,
        i64::from(RATE_LIMIT_PER_MINUTE_MAX),
    )?;
    if let Some(price_id) = &plan.stripe_price_id {
        validate::identifier("stripe_price_id", price_id)?;
    }
    Ok(())
}
