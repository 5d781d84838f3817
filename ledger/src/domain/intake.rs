//! The `stripe-intake` stream: genuine Stripe events that changed no member,
//! kept so that an operator sees what arrived and can replay it after an
//! upgrade or a catalog fix.

use super::member::Timestamp;
use serde::{Deserialize, Serialize};

pub const STRIPE_INTAKE_STREAM: &str = "stripe-intake";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum IntakeEvent {
    /// Acknowledged on purpose: a type tally does not map, a customer linked
    /// to no member, a checkout that buys no credits.
    StripeEventIgnored {
        stripe_event_id: String,
        event_type: String,
        created: Timestamp,
        reason: String,
        /// For an event ignored because its customer was linked to no
        /// member: the customer, and the event verbatim, so that once the
        /// customer is linked an operator can apply it
        /// (`POST /v1/admin/stripe/replay?customer=…`) without Stripe
        /// sending it again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        customer_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload: Option<String>,
    },
    /// Genuine (its signature verified) but not understood: kept verbatim
    /// with the reason, for an operator to replay after an upgrade.
    StripeEventUnprocessed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stripe_event_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event_type: Option<String>,
        reason: String,
        payload: String,
    },
}

impl IntakeEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            IntakeEvent::StripeEventIgnored { .. } => "StripeEventIgnored",
            IntakeEvent::StripeEventUnprocessed { .. } => "StripeEventUnprocessed",
        }
    }
}
