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
//! A property test runs each step of a generated [`Scenario`] on both sides
//! and compares: the model gets the command as generated, the ledger gets it
//! through [`resolve_reservation_ref`] (see [`strategies`] for why), and
//! after each step the rejection codes and the balances must agree.
//!
//! ```
//! use chrono::{TimeZone, Utc};
//! use tally_ledger::domain::{Billing, MemberCommand};
//! use tally_testkit::{Model, strategies};
//!
//! let mut model = Model::new(strategies::plans());
//! let now = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
//! let start = MemberCommand::StartSubscription {
//!     plan_id: "pro".to_owned(),
//!     billing: Billing::Tally,
//!     stripe_subscription_id: None,
//! };
//! assert_eq!(model.apply("m1", &start, now), Ok(()));
//! assert_eq!(model.balance("m1").unwrap().available, 10_000);
//! assert_eq!(model.apply("m2", &MemberCommand::AdvanceTime, now), Err("not_found"));
//! ```

pub mod alerts;
pub mod executions;
pub mod fuzz;
pub mod model;
pub mod strategies;

pub use model::{Model, ModelBalance, ModelGrant, ModelInvoice, Rejection};
pub use strategies::{Scenario, Step, resolve_reservation_ref};
