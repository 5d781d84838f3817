//! A reference model of charged query execution (DESIGN.md §9), written
//! from the rules and nothing else, for property tests that drive the real
//! server: what one execution should answer and charge, given what the
//! source does.
//!
//! The rules it encodes:
//! - a key seen before answers as it did the first time, charging nothing
//!   more (a retry never runs twice); with other parameters it is refused
//!   (`idempotency_key_reused`);
//! - a request whose result is cached (same query and parameters, source
//!   answered before, TTL not over) costs `credits_base` (the cache-hit
//!   price), whatever the source does now;
//! - a source that fails (down, timeout) charges nothing, caches nothing;
//! - a source that answers costs `credits_base` + `credits_per_1k_rows` ×
//!   ⌈rows / 1000⌉, and its result is cached;
//! - too few available credits for the price bound refuses before anything
//!   runs: nothing charged, nothing recorded, the key left unused;
//! - no hold outlives its execution.

use std::collections::{HashMap, HashSet};

/// The price of one saved query.
#[derive(Clone, Copy, Debug)]
pub struct Pricing {
    pub credits_base: i64,
    pub credits_per_1k_rows: i64,
    pub max_rows: u64,
}

impl Pricing {
    /// What is reserved before the run.
    pub fn bound(&self) -> i64 {
        self.credits_base + self.credits_per_1k_rows * self.max_rows.div_ceil(1000) as i64
    }

    /// What a run that returned `rows` costs.
    pub fn price(&self, rows: u64) -> i64 {
        (self.credits_base + self.credits_per_1k_rows * rows.div_ceil(1000) as i64).min(self.bound())
    }
}

/// What the source does when it is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Answers { rows: u64 },
    Down,
    TimesOut,
}

/// The expected answer of one execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Ran (or was served from the cache) and charged `credits`.
    Charged { credits: i64, cache_hit: bool },
    /// The source failed: recorded, charged nothing.
    Failed { timeout: bool },
    /// Refused before running: `insufficient_credits`.
    Refused,
    /// A key seen before: the first answer again.
    Replayed(&'static str),
    /// A key seen before with other parameters: `idempotency_key_reused`.
    KeyReused,
}

#[derive(Debug)]
pub struct ExecutionModel {
    pricing: Pricing,
    available: i64,
    charged: i64,
    recorded: usize,
    /// Keys answered, with their request and what they answered.
    keys: HashMap<String, (String, Expected)>,
    /// Request digests (the parameters) whose result is cached.
    cached: HashSet<String>,
}

impl ExecutionModel {
    pub fn new(pricing: Pricing, available: i64) -> ExecutionModel {
        ExecutionModel { pricing, available, charged: 0, recorded: 0, keys: HashMap::new(), cached: HashSet::new() }
    }

    /// One execution with `key` of the query with `request` as its
    /// parameters, the source doing `source` if called.
    pub fn execute(&mut self, key: &str, request: &str, source: Source) -> Expected {
        if let Some((first_request, first)) = self.keys.get(key) {
            return match first {
                _ if first_request != request => Expected::KeyReused,
                _ => Expected::Replayed("the first answer"),
            };
        }
        self.run(key, request, source)
    }

    fn run(&mut self, key: &str, request: &str, source: Source) -> Expected {
        let expected = if self.available < self.pricing.bound() {
            Expected::Refused
        } else if self.cached.contains(request) {
            Expected::Charged { credits: self.pricing.credits_base.min(self.pricing.bound()), cache_hit: true }
        } else {
            match source {
                Source::Answers { rows } => {
                    self.cached.insert(request.to_owned());
                    Expected::Charged { credits: self.pricing.price(rows.min(self.pricing.max_rows)), cache_hit: false }
                }
                Source::Down => Expected::Failed { timeout: false },
                Source::TimesOut => Expected::Failed { timeout: true },
            }
        };
        match expected {
            Expected::Charged { credits, .. } => {
                self.available -= credits;
                self.charged += credits;
                self.recorded += 1;
            }
            Expected::Failed { .. } => self.recorded += 1,
            // A refusal writes nothing, not even the key's record.
            Expected::Refused => return expected,
            Expected::Replayed(_) | Expected::KeyReused => {}
        }
        self.keys.insert(key.to_owned(), (request.to_owned(), expected));
        expected
    }

    pub fn available(&self) -> i64 {
        self.available
    }

    /// Credits charged by all executions: the sum of their settlements.
    pub fn charged(&self) -> i64 {
        self.charged
    }

    /// Executions recorded (`QueryExecuted`), failures included.
    pub fn recorded(&self) -> usize {
        self.recorded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRICING: Pricing = Pricing { credits_base: 5, credits_per_1k_rows: 1, max_rows: 1000 };

    #[test]
    fn a_retry_answers_once_a_cache_hit_costs_the_base_and_failures_nothing() {
        let mut model = ExecutionModel::new(PRICING, 20);
        assert_eq!(
            model.execute("k1", "paris", Source::Answers { rows: 7 }),
            Expected::Charged { credits: 6, cache_hit: false }
        );
        assert_eq!(model.execute("k1", "paris", Source::Down), Expected::Replayed("the first answer"));
        assert_eq!(model.execute("k2", "paris", Source::Down), Expected::Charged { credits: 5, cache_hit: true });
        assert_eq!(model.execute("k3", "oslo", Source::TimesOut), Expected::Failed { timeout: true });
        assert_eq!(model.execute("k3", "lyon", Source::Answers { rows: 1 }), Expected::KeyReused);
        assert_eq!((model.available(), model.charged(), model.recorded()), (9, 11, 3));
        assert_eq!(
            model.execute("k4", "rome", Source::Answers { rows: 1 }),
            Expected::Charged { credits: 6, cache_hit: false }
        );
        assert_eq!(model.execute("k5", "kyiv", Source::Answers { rows: 1 }), Expected::Refused, "3 left, 6 bound");
        assert_eq!(model.recorded(), 4);
    }
}
