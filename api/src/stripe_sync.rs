//! `POST /v1/admin/stripe/sync`: backfill from an existing Stripe account
//! (issue 19, item 6), one page of customers per request so that the
//! caller (`tally stripe sync`) shows progress and may stop and go on.
//!
//! For each customer: find its member (the customer's link, else the
//! customer's `metadata.tally_member_id`; anything else is reported, never
//! guessed), link it, then read its subscriptions that have not ended (each
//! with its latest invoice, when paid) and its open invoices through
//! async-stripe's list APIs, and apply each as the webhook would: the same
//! parse-free facts, the same mapping, the same ledger commands. Each
//! object's synthetic event id is `sync_{object id}_{hash of its facts}`, so
//! a sync run again over unchanged objects writes nothing.

use crate::commands::execute_member;
use crate::error::ApiError;
use crate::stripe::{Origin, apply};
use crate::{AppState, State, authenticate};
use actix_web::{HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tally_ledger::LedgerError;
use tally_ledger::domain::{MemberCommand, MemberProfile, validate};
use tally_stripe::{CustomerFacts, EventObject, Mapped, ParsedBy, ParsedEvent, StripeApi};

/// Customers per page when the request names no `limit`.
pub const SYNC_PAGE_DEFAULT: u8 = 20;
/// Stripe lists at most 100 objects a page.
pub const SYNC_PAGE_MAX: u8 = 100;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SyncQuery {
    /// Sync this one customer (`cus_…`) only.
    pub customer: Option<String>,
    /// The last customer id of the previous page (`next_starting_after`).
    pub starting_after: Option<String>,
    /// Customers in this page, 1 to 100; default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u8>,
}

#[derive(Serialize, Default, utoipa::ToSchema)]
pub struct SyncPage {
    pub customers: Vec<SyncedCustomer>,
    /// More customers after this page: ask again with `next_starting_after`.
    pub has_more: bool,
    pub next_starting_after: Option<String>,
    /// Objects applied (or found already applied), in this page.
    pub applied: u64,
    /// Objects tally acknowledged and left alone (e.g. a member that does not exist).
    pub ignored: u64,
    /// Objects tally could not apply (e.g. a price no plan has): see each customer's `reasons`.
    pub unprocessed: u64,
    /// Customers linked to no member and naming none: link them, then sync again.
    pub unmatched: u64,
}

#[derive(Serialize, Default, utoipa::ToSchema)]
pub struct SyncedCustomer {
    pub customer_id: String,
    /// Given for unmatched customers only, to find their member by.
    pub email: Option<String>,
    pub member_id: Option<String>,
    /// `customer_id` (linked before), `metadata` (its `tally_member_id`), or absent: unmatched.
    pub matched_by: Option<String>,
    pub subscriptions: u64,
    pub invoices: u64,
    pub applied: u64,
    pub ignored: u64,
    pub unprocessed: u64,
    /// Why objects were not applied, or why the customer is unmatched.
    pub reasons: Vec<String>,
}

/// Read customers of the Stripe account and apply their subscriptions and
/// invoices as the webhooks would: a page of customers per request, or one
/// customer with `customer`. Needs `TALLY_STRIPE_SECRET_KEY`. A Stripe
/// error is `502 payment_provider_error`; what was applied before it stays,
/// and running the sync again applies nothing twice.
#[utoipa::path(post, path = "/v1/admin/stripe/sync", tag = "stripe", params(SyncQuery),
    responses((status = 200, body = SyncPage), (status = 404, description = "stripe_not_configured: no TALLY_STRIPE_SECRET_KEY", body = crate::error::Problem)),
    security(("bearer" = [])))]
#[actix_web::post("/v1/admin/stripe/sync")]
pub async fn sync(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &request)?.require_admin()?;
    let query: SyncQuery = crate::admin::query(&request)?;
    for (field, value) in [("customer", &query.customer), ("starting_after", &query.starting_after)] {
        if let Some(value) = value {
            validate::identifier(field, value).map_err(ApiError::from)?;
        }
    }
    let limit = query.limit.unwrap_or(SYNC_PAGE_DEFAULT);
    if !(1..=SYNC_PAGE_MAX).contains(&limit) {
        return Err(ApiError::validation("limit", format!("must be 1 to {SYNC_PAGE_MAX}")));
    }
    let Some(api) = state.stripe.api.clone() else {
        return Err(ApiError::StripeNotConfigured("set TALLY_STRIPE_SECRET_KEY to read from Stripe".into()));
    };
    let (customers, has_more) = match &query.customer {
        Some(customer_id) => match api.customer(customer_id).await? {
            Some(customer) => (vec![customer], false),
            None => return Err(ApiError::NotFound(format!("Stripe customer `{customer_id}` was deleted"))),
        },
        None => {
            let page = api.customers(query.starting_after.as_deref(), limit).await?;
            (page.customers, page.has_more)
        }
    };
    let mut page = SyncPage {
        has_more,
        next_starting_after: customers.last().filter(|_| has_more).map(|customer| customer.id.clone()),
        ..SyncPage::default()
    };
    for customer in customers {
        let synced = sync_customer(&state, &api, customer).await?;
        page.applied += synced.applied;
        page.ignored += synced.ignored;
        page.unprocessed += synced.unprocessed;
        page.unmatched += u64::from(synced.matched_by.is_none());
        page.customers.push(synced);
    }
    Ok(HttpResponse::Ok().json(page))
}

async fn sync_customer(state: &AppState, api: &StripeApi, customer: CustomerFacts) -> Result<SyncedCustomer, ApiError> {
    let mut synced = SyncedCustomer { customer_id: customer.id.clone(), ..SyncedCustomer::default() };
    let Some((member_id, matched_by)) = match_member(state, &customer, &mut synced.reasons).await? else {
        synced.email = customer.email;
        return Ok(synced);
    };
    synced.member_id = Some(member_id);
    synced.matched_by = Some(matched_by.to_owned());

    let now = chrono::Utc::now().timestamp();
    let mut objects = Vec::new();
    for (subscription, latest_invoice) in api.subscriptions(&customer.id).await? {
        synced.subscriptions += 1;
        let object_id = subscription.id.clone();
        objects.push((object_id, "customer.subscription.updated", EventObject::Subscription(subscription)));
        // The paid invoice of the current period brings its credits, as
        // `invoice.paid` would have.
        if let Some(invoice_id) = latest_invoice {
            let invoice = api.invoice(&invoice_id).await?;
            if invoice.status.as_deref() == Some("paid") {
                synced.invoices += 1;
                objects.push((invoice_id, "invoice.paid", EventObject::Invoice(invoice)));
            }
        }
    }
    for invoice in api.open_invoices(&customer.id).await? {
        synced.invoices += 1;
        objects.push((invoice.id.clone(), "invoice.finalized", EventObject::Invoice(invoice)));
    }
    for (object_id, event_type, object) in objects {
        let digest = Sha256::digest(format!("{event_type} {object:?}").as_bytes());
        let parsed = ParsedEvent {
            id: format!("sync_{object_id}_{}", hex::encode(&digest[..8])),
            event_type: event_type.to_owned(),
            created: now,
            livemode: false,
            api_version: None,
            object,
            parsed_by: ParsedBy::Typed,
        };
        let answer = match tally_stripe::map(&parsed) {
            Mapped::Command { customer_id, member_hint, command } => {
                apply(state, &parsed, customer_id, member_hint, *command, Origin::Sync).await?
            }
            Mapped::Ignored { reason } => serde_json::json!({"status": "ignored", "reason": reason}),
            Mapped::Unprocessed { reason } => serde_json::json!({"status": "unprocessed", "reason": reason}),
        };
        match answer["status"].as_str() {
            Some("applied") => synced.applied += 1,
            Some("ignored") => synced.ignored += 1,
            _ => synced.unprocessed += 1,
        }
        if let Some(reason) = answer["reason"].as_str() {
            synced.reasons.push(format!("{object_id}: {reason}"));
        }
    }
    Ok(synced)
}

/// The customer's member and how it was found, linking a member named by
/// metadata to the customer; `None` (with the reason) when unmatched.
async fn match_member(
    state: &AppState,
    customer: &CustomerFacts,
    reasons: &mut Vec<String>,
) -> Result<Option<(String, &'static str)>, ApiError> {
    let ledger = state.ledger.clone();
    let customer_id = customer.id.clone();
    let linked = actix_web::web::block(move || -> Result<Option<String>, LedgerError> {
        Ok(ledger.reader()?.stripe_customer_stream(&customer_id)?)
    })
    .await??;
    if let Some(member_id) = linked.and_then(|stream| stream.strip_prefix("member-").map(str::to_owned)) {
        return Ok(Some((member_id, "customer_id")));
    }
    let Some(member_id) = customer.metadata.get(tally_stripe::mapping::MEMBER_METADATA_KEY).cloned() else {
        reasons.push("linked to no member and no metadata.tally_member_id: link it with PUT /v1/members/{id}".into());
        return Ok(None);
    };
    if validate::identifier("tally_member_id", &member_id).is_err() {
        reasons.push(format!("metadata.tally_member_id {member_id:?} is not a member id"));
        return Ok(None);
    }
    let ledger = state.ledger.clone();
    let member = member_id.clone();
    let current = actix_web::web::block(move || ledger.member_state(&member)).await?;
    let profile = match current {
        Ok(current) if current.is_registered() => current.profile,
        _ => {
            reasons.push(format!("metadata.tally_member_id names member `{member_id}`, which does not exist"));
            return Ok(None);
        }
    };
    match &profile.stripe_customer_id {
        Some(other) if *other != customer.id => {
            reasons.push(format!("member `{member_id}` is linked to another Stripe customer, `{other}`"));
            Ok(None)
        }
        Some(_) => Ok(Some((member_id, "metadata"))),
        None => {
            let profile = MemberProfile { stripe_customer_id: Some(customer.id.clone()), ..profile };
            let principal = crate::auth::Principal::Admin;
            let route = crate::commands::ROUTE_MEMBER;
            execute_member(state, &principal, member_id.clone(), route, MemberCommand::Register(profile), None).await?;
            Ok(Some((member_id, "metadata")))
        }
    }
}
