//! The alert rules (DESIGN.md §11) and their settings: installation
//! defaults, then a member's overrides (`PUT /v1/members/{m}/alert-rules`),
//! each checked with the field named. A rule's condition is evaluated by
//! the alert reactor; here is only what a rule is and what it may be set
//! to.
//!
//! | rule | fires when | settings |
//! | --- | --- | --- |
//! | `low_balance` | available credits fall below `below_credits`, or below `below_days` days of the trailing 7-day burn | `below_credits`, `below_days` |
//! | `usage_spike` | today's credits exceed `factor` × the trailing 7-day daily mean, and `floor_credits` | `factor` (1 to 100, tenths allowed), `floor_credits` |
//! | `integration_failing` | an integration turns `failing` | — |
//! | `payment_failed` | a payment fails | — |
//! | `credits_expiring` | a grant with credits left expires within `within_days` | `within_days` |
//! | `overage_started` | the member starts using credits beyond its allowance (debt) | — |
//! | `webhook_endpoint_failing` | a webhook endpoint was turned off after failing for 5 days (or answering 410 Gone) | — |
//!
//! Every rule has `enabled`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const RULES: &[&str] = &[
    "low_balance",
    "usage_spike",
    "integration_failing",
    "payment_failed",
    "credits_expiring",
    "overage_started",
    "webhook_endpoint_failing",
];

/// Limits of the settings.
pub const CREDITS_MAX: i64 = 1_000_000_000;
pub const DAYS_MAX: u32 = 365;
pub const FACTOR_TENTHS_MIN: u32 = 10;
pub const FACTOR_TENTHS_MAX: u32 = 1_000;

/// A refusal: `validation_failed` on `field`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    pub field: String,
    pub message: String,
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> RuleError {
    RuleError { field: field.into(), message: message.into() }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowBalance {
    pub enabled: bool,
    pub below_credits: Option<i64>,
    pub below_days: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageSpike {
    pub enabled: bool,
    /// The multiple of the trailing mean, in tenths (30 = 3×).
    pub factor_tenths: u32,
    pub floor_credits: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditsExpiring {
    pub enabled: bool,
    pub within_days: u32,
}

/// Every rule's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub low_balance: LowBalance,
    pub usage_spike: UsageSpike,
    pub integration_failing: bool,
    pub payment_failed: bool,
    pub credits_expiring: CreditsExpiring,
    pub overage_started: bool,
    pub webhook_endpoint_failing: bool,
}

impl Default for RuleSet {
    /// The installation's defaults unless the operator sets others: every
    /// rule on, a low balance below 100 credits or 3 days of burn, a spike
    /// at 3× and 100 credits, grants expiring within 7 days.
    fn default() -> RuleSet {
        RuleSet {
            low_balance: LowBalance { enabled: true, below_credits: Some(100), below_days: Some(3) },
            usage_spike: UsageSpike { enabled: true, factor_tenths: 30, floor_credits: 100 },
            integration_failing: true,
            payment_failed: true,
            credits_expiring: CreditsExpiring { enabled: true, within_days: 7 },
            overage_started: true,
            webhook_endpoint_failing: true,
        }
    }
}

/// The settings of one rule in an override, each checked.
struct Settings<'a> {
    rule: &'a str,
    fields: &'a Map<String, Value>,
}

impl Settings<'_> {
    fn field(&self, name: &str) -> String {
        format!("{}.{name}", self.rule)
    }

    /// Refuses settings the rule does not have.
    fn only(&self, names: &[&str]) -> Result<(), RuleError> {
        match self.fields.keys().find(|key| !names.contains(&key.as_str())) {
            Some(key) => Err(refuse(
                self.field(key),
                format!("is not a setting of `{}`; its settings are {}", self.rule, names.join(", ")),
            )),
            None => Ok(()),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, RuleError> {
        match self.fields.get(name) {
            None => Ok(None),
            Some(Value::Bool(value)) => Ok(Some(*value)),
            Some(_) => Err(refuse(self.field(name), "must be true or false")),
        }
    }

    /// An integer in `min..=max`; `null` clears an optional one.
    fn integer(&self, name: &str, min: i64, max: i64) -> Result<Option<Option<i64>>, RuleError> {
        match self.fields.get(name) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(value) => match value.as_i64() {
                Some(number) if (min..=max).contains(&number) => Ok(Some(Some(number))),
                _ => Err(refuse(self.field(name), format!("must be an integer from {min} to {max}"))),
            },
        }
    }

    /// A number of at most one decimal, as tenths, in `min..=max` tenths.
    fn tenths(&self, name: &str, min: u32, max: u32) -> Result<Option<u32>, RuleError> {
        let Some(value) = self.fields.get(name) else { return Ok(None) };
        let tenths = value.as_f64().map(|number| number * 10.0).filter(|tenths| (tenths - tenths.round()).abs() < 1e-9);
        match tenths {
            Some(tenths) if (f64::from(min)..=f64::from(max)).contains(&tenths) => Ok(Some(tenths.round() as u32)),
            _ => Err(refuse(
                self.field(name),
                format!("must be a number from {} to {} with at most one decimal", min / 10, max / 10),
            )),
        }
    }
}

impl RuleSet {
    /// These settings with `overrides` applied: `{rule: {setting: value}}`,
    /// any subset. Refuses an unknown rule or setting, or a value out of
    /// range, naming it; on a refusal nothing is applied.
    pub fn apply(&self, overrides: &Value) -> Result<RuleSet, RuleError> {
        let Some(rules) = overrides.as_object() else {
            return Err(refuse("body", "must be an object of rules: {\"low_balance\": {…}, …}"));
        };
        let mut next = self.clone();
        for (rule, settings) in rules {
            let Some(fields) = settings.as_object() else {
                if RULES.contains(&rule.as_str()) {
                    return Err(refuse(rule.as_str(), "must be an object of settings, such as {\"enabled\": true}"));
                }
                return Err(refuse(rule.as_str(), format!("is not a rule; the rules are {}", RULES.join(", "))));
            };
            let settings = Settings { rule, fields };
            match rule.as_str() {
                "low_balance" => {
                    settings.only(&["enabled", "below_credits", "below_days"])?;
                    let rule = &mut next.low_balance;
                    rule.enabled = settings.boolean("enabled")?.unwrap_or(rule.enabled);
                    if let Some(value) = settings.integer("below_credits", 1, CREDITS_MAX)? {
                        rule.below_credits = value;
                    }
                    if let Some(value) = settings.integer("below_days", 1, i64::from(DAYS_MAX))? {
                        rule.below_days = value.map(|days| days as u32);
                    }
                    if rule.enabled && rule.below_credits.is_none() && rule.below_days.is_none() {
                        return Err(refuse(
                            "low_balance",
                            "an enabled low_balance needs below_credits, below_days or both",
                        ));
                    }
                }
                "usage_spike" => {
                    settings.only(&["enabled", "factor", "floor_credits"])?;
                    let rule = &mut next.usage_spike;
                    rule.enabled = settings.boolean("enabled")?.unwrap_or(rule.enabled);
                    if let Some(tenths) = settings.tenths("factor", FACTOR_TENTHS_MIN, FACTOR_TENTHS_MAX)? {
                        rule.factor_tenths = tenths;
                    }
                    match settings.integer("floor_credits", 0, CREDITS_MAX)? {
                        Some(Some(floor)) => rule.floor_credits = floor,
                        Some(None) => return Err(refuse(settings.field("floor_credits"), "must be an integer")),
                        None => {}
                    }
                }
                "credits_expiring" => {
                    settings.only(&["enabled", "within_days"])?;
                    let rule = &mut next.credits_expiring;
                    rule.enabled = settings.boolean("enabled")?.unwrap_or(rule.enabled);
                    match settings.integer("within_days", 1, i64::from(DAYS_MAX))? {
                        Some(Some(days)) => rule.within_days = days as u32,
                        Some(None) => return Err(refuse(settings.field("within_days"), "must be an integer")),
                        None => {}
                    }
                }
                "integration_failing" | "payment_failed" | "overage_started" | "webhook_endpoint_failing" => {
                    settings.only(&["enabled"])?;
                    let flag = match rule.as_str() {
                        "integration_failing" => &mut next.integration_failing,
                        "payment_failed" => &mut next.payment_failed,
                        "overage_started" => &mut next.overage_started,
                        _ => &mut next.webhook_endpoint_failing,
                    };
                    *flag = settings.boolean("enabled")?.unwrap_or(*flag);
                }
                other => {
                    return Err(refuse(other, format!("is not a rule; the rules are {}", RULES.join(", "))));
                }
            }
        }
        Ok(next)
    }

    /// The settings as the API shows them: `{rule: {enabled, …}}`, the
    /// factor as a number.
    pub fn document(&self) -> Value {
        serde_json::json!({
            "low_balance": {"enabled": self.low_balance.enabled, "below_credits": self.low_balance.below_credits,
                "below_days": self.low_balance.below_days},
            "usage_spike": {"enabled": self.usage_spike.enabled,
                "factor": f64::from(self.usage_spike.factor_tenths) / 10.0,
                "floor_credits": self.usage_spike.floor_credits},
            "integration_failing": {"enabled": self.integration_failing},
            "payment_failed": {"enabled": self.payment_failed},
            "credits_expiring": {"enabled": self.credits_expiring.enabled,
                "within_days": self.credits_expiring.within_days},
            "overage_started": {"enabled": self.overage_started},
            "webhook_endpoint_failing": {"enabled": self.webhook_endpoint_failing},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overrides_change_only_what_they_name() {
        let defaults = RuleSet::default();
        let set = defaults
            .apply(&json!({"low_balance": {"enabled": true, "below_credits": 500},
                "usage_spike": {"enabled": true, "factor": 3, "floor_credits": 100},
                "payment_failed": {"enabled": false}}))
            .unwrap();
        assert_eq!(set.low_balance, LowBalance { enabled: true, below_credits: Some(500), below_days: Some(3) });
        assert_eq!(set.usage_spike.factor_tenths, 30);
        assert!(!set.payment_failed);
        assert_eq!(set.credits_expiring, defaults.credits_expiring);
        let decimal = set.apply(&json!({"usage_spike": {"factor": 2.5}})).unwrap();
        assert_eq!(decimal.usage_spike.factor_tenths, 25);
        assert_eq!(decimal.document()["usage_spike"]["factor"], json!(2.5));
        let cleared = set.apply(&json!({"low_balance": {"below_days": null}})).unwrap();
        assert_eq!(cleared.low_balance.below_days, None);
    }

    #[test]
    fn refusals_name_their_field_and_apply_nothing() {
        let defaults = RuleSet::default();
        for (overrides, field) in [
            (json!({"nonsense": {"enabled": true}}), "nonsense"),
            (json!({"low_balance": {"below_credits": 0}}), "low_balance.below_credits"),
            (json!({"low_balance": {"below_credits": null, "below_days": null}}), "low_balance"),
            (json!({"low_balance": {"colour": 1}}), "low_balance.colour"),
            (json!({"usage_spike": {"factor": 0.5}}), "usage_spike.factor"),
            (json!({"usage_spike": {"factor": 2.55}}), "usage_spike.factor"),
            (json!({"usage_spike": {"floor_credits": -1}}), "usage_spike.floor_credits"),
            (json!({"credits_expiring": {"within_days": 366}}), "credits_expiring.within_days"),
            (json!({"payment_failed": {"enabled": "yes"}}), "payment_failed.enabled"),
            (json!({"payment_failed": true}), "payment_failed"),
            (json!([]), "body"),
        ] {
            assert_eq!(defaults.apply(&overrides).unwrap_err().field, field, "{overrides}");
        }
    }

    #[test]
    fn the_document_names_every_rule() {
        let document = RuleSet::default().document();
        let names: Vec<&String> = document.as_object().unwrap().keys().collect();
        let mut rules = RULES.to_vec();
        rules.sort();
        assert_eq!(names, rules);
        assert!(RULES.iter().all(|rule| document[rule]["enabled"].is_boolean()));
    }
}
