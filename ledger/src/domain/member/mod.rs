//! The member aggregate: one stream per member, the consistency boundary of
//! every credit rule.

pub mod commands;
pub mod decide;
pub mod events;
pub mod state;
pub mod stripe;

pub use commands::*;
pub use decide::{
    CheckOutcome, CheckRefusal, Context, Decision, check, decide, member_stream, next_due, period_end, state_at,
};
pub use events::*;
pub use state::*;
pub use stripe::*;

#[cfg(test)]
mod tests;
