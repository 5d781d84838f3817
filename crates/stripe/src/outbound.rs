//! Outbound calls to Stripe through async-stripe: create a customer and a
//! subscription for a member. The base URL is configurable
//! (`TALLY_STRIPE_API_BASE`) so that tests point it at a local fake.

use crate::event::SubscriptionFacts;
use std::collections::HashMap;
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::invoice_item::CreateInvoiceItem;
use stripe_billing::subscription::{CreateSubscription, CreateSubscriptionItems};
use stripe_core::customer::CreateCustomer;

/// Stripe answered with an error, or could not be reached: the ledger is
/// left unchanged and the caller gets `payment_provider_error`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OutboundError {
    /// Stripe's HTTP status, when it answered.
    pub status: Option<u16>,
    /// Stripe's error code (`card_declined`, `resource_missing`, …) or
    /// `unreachable`.
    pub code: String,
    pub message: String,
}

impl From<StripeError> for OutboundError {
    fn from(error: StripeError) -> OutboundError {
        match error {
            StripeError::Stripe(errors, status) => OutboundError {
                status: Some(status),
                code: errors.code.as_ref().map(|code| code.to_string()).unwrap_or_else(|| errors.type_.to_string()),
                message: errors.message.clone().unwrap_or_else(|| "Stripe refused the request".to_owned()),
            },
            other => OutboundError { status: None, code: "unreachable".to_owned(), message: other.to_string() },
        }
    }
}

pub struct StripeApi {
    client: Client,
}

impl StripeApi {
    /// `api_base` must end in `/` (async-stripe joins paths to it).
    pub fn new(secret_key: &str, api_base: Option<&str>) -> Result<StripeApi, OutboundError> {
        let mut builder = ClientBuilder::new(secret_key);
        if let Some(base) = api_base {
            let base = if base.ends_with('/') { base.to_owned() } else { format!("{base}/") };
            builder = builder.url(base);
        }
        Ok(StripeApi { client: builder.build()? })
    }

    /// Creates a customer carrying `metadata.tally_member_id`; returns its id.
    pub async fn create_customer(&self, member_id: &str, idempotency_key: &str) -> Result<String, OutboundError> {
        let metadata = HashMap::from([(crate::mapping::MEMBER_METADATA_KEY.to_owned(), member_id.to_owned())]);
        let customer = CreateCustomer::new()
            .metadata(metadata)
            .customize()
            .request_strategy(strategy(idempotency_key, "customer")?)
            .send(&self.client)
            .await?;
        Ok(customer.id.to_string())
    }

    /// Creates a subscription to one price; returns Stripe's view of it.
    pub async fn create_subscription(
        &self,
        customer_id: &str,
        price_id: &str,
        member_id: &str,
        idempotency_key: &str,
    ) -> Result<SubscriptionFacts, OutboundError> {
        let metadata = HashMap::from([(crate::mapping::MEMBER_METADATA_KEY.to_owned(), member_id.to_owned())]);
        let mut item = CreateSubscriptionItems::new();
        item.price = Some(price_id.to_owned());
        let subscription = CreateSubscription::new()
            .customer(customer_id)
            .items(vec![item])
            .metadata(metadata)
            .customize()
            .request_strategy(strategy(idempotency_key, "subscription")?)
            .send(&self.client)
            .await?;
        let items = &subscription.items.data;
        Ok(SubscriptionFacts {
            id: subscription.id.to_string(),
            customer: subscription.customer.id().to_string(),
            status: subscription.status.to_string(),
            price_ids: items.iter().map(|item| item.price.id.to_string()).collect(),
            current_period_start: items.iter().map(|item| item.current_period_start).min(),
            current_period_end: items.iter().map(|item| item.current_period_end).max(),
            cancel_at_period_end: subscription.cancel_at_period_end,
            canceled_at: subscription.canceled_at,
            ended_at: subscription.ended_at,
            metadata: subscription.metadata.into_iter().collect(),
        })
    }
}

impl StripeApi {
    /// Adds a pending invoice item (overage) to the customer's next invoice;
    /// returns its id. `idempotency_key` is the caller's, used as is.
    pub async fn create_invoice_item(
        &self,
        customer_id: &str,
        amount: i64,
        currency: &str,
        description: &str,
        idempotency_key: &str,
    ) -> Result<String, OutboundError> {
        let currency = currency.to_ascii_lowercase().parse::<stripe_types::Currency>().map_err(|_| OutboundError {
            status: None,
            code: "invalid_currency".to_owned(),
            message: format!("{currency} is not a currency Stripe knows"),
        })?;
        let item = CreateInvoiceItem::new()
            .customer(customer_id)
            .amount(amount)
            .currency(currency)
            .description(description)
            .customize()
            .request_strategy(idempotent(idempotency_key)?)
            .send(&self.client)
            .await?;
        Ok(item.id.to_string())
    }
}

/// Stripe deduplicates on its idempotency key: a retried API call (same
/// `Idempotency-Key`) gets the same customer and subscription back.
fn strategy(idempotency_key: &str, what: &str) -> Result<RequestStrategy, OutboundError> {
    idempotent(&format!("tally-{what}-{idempotency_key}"))
}

fn idempotent(key: &str) -> Result<RequestStrategy, OutboundError> {
    let key = IdempotencyKey::new(key).map_err(|error| OutboundError {
        status: None,
        code: "invalid_idempotency_key".to_owned(),
        message: error.to_string(),
    })?;
    Ok(RequestStrategy::Idempotent(key))
}
