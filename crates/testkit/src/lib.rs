//! tally-testkit: an independent reference model of tally's credit rules and
//! proptest strategies that generate member command sequences, so that
//! property tests can run the real ledger and the model side by side and
//! compare every answer and every balance.
//!
//! # Layout
//!
//! - [`model`]: [`Model`], tally's rules from DESIGN.md §3 written a second
//!   time as a plain fold over `BTreeMap`s. It never reads the ledger's
//!   decider; it uses only the ledger's command and plan types, and answers
//!   with the same rejection codes as `DomainError::code()`.
//! - [`strategies`]: the fixed plan catalog, [`Scenario`]s of valid and
//!   invalid commands, the `#k` reservation references and how to resolve
//!   them for the ledger.
//!
//! # Using it
//!
//! ```ignore
//! let mut model = Model::new(strategies::plans());
//! for plan_id in strategies::RETIRED_PLAN_IDS { model.retire_plan(plan_id) }
//! for (now, step) in scenario.timeline() {
//!     let expected = model.apply(&step.member, &step.command, now);
//!     let command = resolve_reservation_ref(&step.command, &reservations_made[&step.member]);
//!     // decide `command` with the ledger at `now`, compare the result's
//!     // code and the balances, remember any reservation id it returned.
//! }
//! ```

pub mod model;
pub mod strategies;

pub use model::{Model, ModelBalance, ModelGrant, ModelInvoice, Rejection};
pub use strategies::{Scenario, Step, resolve_reservation_ref};
