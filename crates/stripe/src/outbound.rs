//! Outbound calls to Stripe through async-stripe: create a customer and a
//! subscription for a member. The base URL is configurable
//! (`TALLY_STRIPE_API_BASE`) so that tests point it at a local fake.

use crate::event::{InvoiceFacts, SubscriptionFacts, typed_invoice_facts, typed_subscription_facts};
use futures_util::TryStreamExt;
use std::collections::{BTreeMap, HashMap};
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::invoice::{ListInvoice, RetrieveInvoice};
use stripe_billing::invoice_item::CreateInvoiceItem;
use stripe_billing::subscription::{CreateSubscription, CreateSubscriptionItems, ListSubscription};
use stripe_core::customer::{CreateCustomer, ListCustomer, RetrieveCustomer, RetrieveCustomerReturned};

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
    /// For reads (`tally stripe sync`): retried with exponential backoff on
    /// what Stripe says may be retried (429 rate limits, 5xx, conflicts).
    reader: Client,
}

/// A Stripe customer as `tally stripe sync` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerFacts {
    pub id: String,
    pub email: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// One page of customers, oldest page first as Stripe lists them.
#[derive(Clone, Debug)]
pub struct CustomerPage {
    pub customers: Vec<CustomerFacts>,
    pub has_more: bool,
}

/// Read attempts of one Stripe request before giving up.
const READ_ATTEMPTS: u32 = 5;

impl StripeApi {
    /// `api_base` must end in `/` (async-stripe joins paths to it).
    pub fn new(secret_key: &str, api_base: Option<&str>) -> Result<StripeApi, OutboundError> {
        let builder = |strategy: Option<RequestStrategy>| {
            let mut builder = ClientBuilder::new(secret_key);
            if let Some(base) = api_base {
                let base = if base.ends_with('/') { base.to_owned() } else { format!("{base}/") };
                builder = builder.url(base);
            }
            if let Some(strategy) = strategy {
                builder = builder.request_strategy(strategy);
            }
            builder.build()
        };
        Ok(StripeApi {
            client: builder(None)?,
            reader: builder(Some(RequestStrategy::ExponentialBackoff(READ_ATTEMPTS)))?,
        })
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
        Ok(typed_subscription_facts(&subscription))
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

/// Reads for `tally stripe sync`: customers page by page, and each
/// customer's subscriptions and open invoices, every list auto-paginated.
impl StripeApi {
    pub async fn customers(&self, starting_after: Option<&str>, limit: u8) -> Result<CustomerPage, OutboundError> {
        let mut list = ListCustomer::new().limit(i64::from(limit));
        if let Some(after) = starting_after {
            list = list.starting_after(after);
        }
        let page = list.send(&self.reader).await?;
        Ok(CustomerPage { customers: page.data.iter().map(customer_facts).collect(), has_more: page.has_more })
    }

    /// One customer; `None` when Stripe deleted it.
    pub async fn customer(&self, customer_id: &str) -> Result<Option<CustomerFacts>, OutboundError> {
        match RetrieveCustomer::new(customer_id).send(&self.reader).await? {
            RetrieveCustomerReturned::Customer(customer) => Ok(Some(customer_facts(&customer))),
            RetrieveCustomerReturned::DeletedCustomer(_) => Ok(None),
        }
    }

    /// The customer's subscriptions that have not ended, each with the id
    /// of its latest invoice.
    pub async fn subscriptions(
        &self,
        customer_id: &str,
    ) -> Result<Vec<(SubscriptionFacts, Option<String>)>, OutboundError> {
        let subscriptions: Vec<_> =
            ListSubscription::new().customer(customer_id).paginate().stream(&self.reader).try_collect().await?;
        Ok(subscriptions
            .iter()
            .map(|subscription| {
                let latest = subscription
                    .latest_invoice
                    .as_ref()
                    .and_then(|invoice| invoice.id().as_ref())
                    .map(ToString::to_string);
                (typed_subscription_facts(subscription), latest)
            })
            .collect())
    }

    pub async fn open_invoices(&self, customer_id: &str) -> Result<Vec<InvoiceFacts>, OutboundError> {
        let invoices: Vec<_> = ListInvoice::new()
            .customer(customer_id)
            .status(stripe_billing::InvoiceStatus::Open)
            .paginate()
            .stream(&self.reader)
            .try_collect()
            .await?;
        Ok(invoices.iter().filter_map(|invoice| typed_invoice_facts(invoice).ok()).collect())
    }

    pub async fn invoice(&self, invoice_id: &str) -> Result<InvoiceFacts, OutboundError> {
        let invoice = RetrieveInvoice::new(invoice_id).send(&self.reader).await?;
        typed_invoice_facts(&invoice).map_err(|field| OutboundError {
            status: None,
            code: "unexpected_response".to_owned(),
            message: format!("Stripe's invoice {invoice_id} has no {field}"),
        })
    }
}

fn customer_facts(customer: &stripe_core::Customer) -> CustomerFacts {
    CustomerFacts {
        id: customer.id.to_string(),
        email: customer.email.clone(),
        metadata: customer.metadata.iter().flatten().map(|(key, value)| (key.clone(), value.clone())).collect(),
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
