//! Decisions for Stripe-managed members: what a verified Stripe event means
//! for the ledger (DESIGN.md §3 "Who bills", §8).
//!
//! The edge crate (`tally-stripe`) reads the few facts below out of Stripe's
//! payloads; everything they cause is decided here, purely, like any other
//! command. Three rules make delivery order and redelivery harmless:
//!
//! - **Snapshots, not deltas.** A subscription event carries the whole
//!   subscription as Stripe has it; tally moves its own state to match.
//! - **Watermarks per Stripe subscription.** Every append a Stripe event
//!   causes holds a `StripeEventApplied` before the event's own effects (time
//!   effects that fell due come first). It moves the subscription's snapshot
//!   watermark (the newest snapshot applied: an older one changes nothing)
//!   and its status watermark (the newest snapshot or invoice payment: an
//!   older one does not decide the status). A Stripe subscription, once
//!   canceled, stays canceled.
//! - **Monotone invoice facts.** An invoice is recorded once per Stripe id
//!   (by whichever of finalized / paid / payment_failed comes first), paid is
//!   final, a failure after payment is history, and each Stripe period is
//!   allocated for once, with the credits of the plan priced on that invoice.
//!
//! Stripe owns period bounds, fees and proration of Stripe-managed members,
//! so a plan change from Stripe grants no prorated credits: credits come
//! with each paid subscription invoice.

use super::decide::{Draft, close_period_now, lapse_allocations, next_invoice_id};
use super::events::*;
use super::state::*;
use crate::domain::amount::{Credits, MinorUnits};
use crate::domain::catalog::{Catalog, PlanTerms};
use crate::domain::error::DomainError;
use crate::domain::limits::*;
use crate::domain::validate;

/// The Stripe event behind a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeEventRef {
    pub event_id: String,
    pub event_type: String,
    /// Stripe's `created` of the event.
    pub created: Timestamp,
    /// The Stripe customer the object belongs to: linked to the member when
    /// the member has none yet.
    pub customer_id: Option<String>,
    /// The operator's refund settings in force when the event is applied.
    pub refund_policy: RefundPolicy,
}

/// What a Stripe refund takes back (ARCHITECTURE.md, "Refunds"): the
/// operator's settings `serve --stripe-refund-spent` and
/// `--stripe-refund-subscription-credits`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefundPolicy {
    /// What becomes of refunded credits the member already spent.
    pub spent: SpentRefund,
    /// Whether a refund of a subscription invoice takes back the refunded
    /// share of that invoice's monthly allocation too (by default it is
    /// only recorded on the invoice).
    pub subscription_credits: bool,
}

/// Refunded credits that were already spent: billed, or let go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpentRefund {
    /// Recorded as debt, billed like overage: at the overage price of the
    /// plan in force, or with no plan at the payment's own price per
    /// credit, rounded down.
    #[default]
    Debt,
    /// Written off: recorded as an adjustment, not billed.
    WriteOff,
}

impl SpentRefund {
    pub fn as_str(self) -> &'static str {
        match self {
            SpentRefund::Debt => "debt",
            SpentRefund::WriteOff => "write_off",
        }
    }
}

/// A subscription as Stripe has it after the event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeSubscription {
    pub subscription_id: String,
    /// Stripe's status: `active`, `trialing`, `past_due`, `unpaid`,
    /// `incomplete`, `incomplete_expired`, `paused`, `canceled`.
    pub status: String,
    /// Its items' prices, each once, in item order: the one a catalog plan
    /// has is the subscription's plan (several such: refused).
    pub price_ids: Vec<String>,
    pub period_start: Timestamp,
    pub period_end: Timestamp,
    pub cancel_at_period_end: bool,
    /// When it ended by Stripe's clock (`ended_at`, or `canceled_at` of an
    /// ended one): the `canceled_at` tally records for it.
    pub ended_at: Option<Timestamp>,
    /// `customer.subscription.deleted`: it ended, whatever `status` says.
    pub deleted: bool,
}

/// What happened to a Stripe invoice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StripeInvoiceOutcome {
    Finalized,
    Paid,
    PaymentFailed,
    /// `invoice.voided`: void is final; a paid invoice stays paid.
    Voided,
    /// `invoice.marked_uncollectible`: an open invoice only; it may still be
    /// paid later (Stripe allows it), and then it is paid.
    MarkedUncollectible,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeInvoiceLine {
    pub amount: MinorUnits,
    pub description: Option<String>,
    pub price_id: Option<String>,
    pub period_start: Option<Timestamp>,
    pub period_end: Option<Timestamp>,
    pub proration: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeInvoice {
    pub invoice_id: String,
    pub subscription_id: Option<String>,
    /// `subscription_create`, `subscription_cycle`, `subscription_update`,
    /// `manual`, …
    pub billing_reason: Option<String>,
    /// ISO code as Stripe writes it (lowercase); compared case-insensitively.
    pub currency: String,
    pub total: MinorUnits,
    pub lines: Vec<StripeInvoiceLine>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StripeCommand {
    /// `customer.subscription.created` / `updated` / `deleted`, or tally's
    /// own creation of a Stripe subscription.
    Subscription { event: StripeEventRef, subscription: StripeSubscription },
    /// `invoice.finalized` / `invoice.paid` / `invoice.payment_failed`.
    Invoice { event: StripeEventRef, invoice: StripeInvoice, outcome: StripeInvoiceOutcome },
    /// `checkout.session.completed` (paid) or
    /// `checkout.session.async_payment_succeeded`, with
    /// `metadata.tally_purchase_credits`: granted once per session.
    Purchase {
        event: StripeEventRef,
        session_id: String,
        /// The session's PaymentIntent, by which its refunds find it.
        payment_intent: Option<String>,
        credits: Credits,
        price: MinorUnits,
        currency: String,
    },
    /// `checkout.session.async_payment_failed` of such a session: recorded,
    /// nothing granted.
    CheckoutPaymentFailed { event: StripeEventRef, session_id: String, credits: Credits, price: MinorUnits },
    /// `charge.refunded`, `refund.created`/`updated` (a PaymentIntent) or
    /// `credit_note.created` (a Stripe invoice): what of a payment was
    /// refunded, as lower bounds of its refunded total.
    Refund {
        event: StripeEventRef,
        /// `pi_…` or `in_…`.
        payment: String,
        /// A charge's `amount_refunded`: the refunded total so far.
        amount_refunded: Option<MinorUnits>,
        /// Refunds by id (a refund event's own, a credit note's).
        refunds: Vec<StripeRefundPart>,
        currency: String,
    },
}

impl StripeCommand {
    pub fn event_mut(&mut self) -> &mut StripeEventRef {
        match self {
            StripeCommand::Subscription { event, .. }
            | StripeCommand::Invoice { event, .. }
            | StripeCommand::Purchase { event, .. }
            | StripeCommand::CheckoutPaymentFailed { event, .. }
            | StripeCommand::Refund { event, .. } => event,
        }
    }

    pub fn event(&self) -> &StripeEventRef {
        match self {
            StripeCommand::Subscription { event, .. }
            | StripeCommand::Invoice { event, .. }
            | StripeCommand::Purchase { event, .. }
            | StripeCommand::CheckoutPaymentFailed { event, .. }
            | StripeCommand::Refund { event, .. } => event,
        }
    }
}

/// Stripe's subscription status in tally's terms: spending stays allowed
/// but overage is off for every state of doubt.
pub fn status_from_stripe(status: &str) -> SubscriptionStatus {
    match status {
        "active" => SubscriptionStatus::Active,
        "trialing" => SubscriptionStatus::Trialing,
        "canceled" | "incomplete_expired" => SubscriptionStatus::Canceled,
        // past_due, unpaid, incomplete, paused and anything newer.
        _ => SubscriptionStatus::PastDue,
    }
}

pub(super) fn decide_stripe(draft: &mut Draft, command: &StripeCommand, catalog: &Catalog) -> Result<(), DomainError> {
    let event = command.event();
    validate::identifier("stripe_event_id", &event.event_id)?;
    stripe_instant("created", event.created)?;
    // Rejections come before anything is emitted, so that they write nothing.
    match command {
        StripeCommand::Subscription { subscription, .. } => check_subscription(&draft.state, subscription, catalog)?,
        StripeCommand::Invoice { invoice, outcome, .. } => check_invoice(&draft.state, invoice, *outcome, catalog)?,
        StripeCommand::Purchase { credits, price, currency, .. } => {
            validate::range("tally_purchase_credits", credits.0, 1, COMMAND_CREDITS_MAX)?;
            validate::range("amount_total", price.0, 0, PRICE_MINOR_MAX)?;
            if !currency.eq_ignore_ascii_case(&draft.state.profile.currency) {
                return Err(DomainError::invalid("currency", "the checkout's currency differs from the member's"));
            }
        }
        StripeCommand::CheckoutPaymentFailed { credits, price, .. } => {
            validate::range("tally_purchase_credits", credits.0, 1, COMMAND_CREDITS_MAX)?;
            validate::range("amount_total", price.0, 0, PRICE_MINOR_MAX)?;
        }
        StripeCommand::Refund { payment, amount_refunded, refunds, currency, .. } => {
            check_refund(&draft.state, payment, *amount_refunded, refunds, currency)?
        }
    }
    if let StripeCommand::Purchase { payment_intent: Some(payment_intent), .. } = command {
        validate::identifier("payment_intent", payment_intent)?;
    }

    let (mut stale, synced, status_fresh) = order(&draft.state, command);
    match command {
        // A session's credits are granted once, whichever event brings them.
        StripeCommand::Purchase { session_id, .. } => {
            stale |= draft.state.stripe_checkout_sessions.contains(session_id);
        }
        // A refund fact tally already holds (or a smaller one) is news to
        // no one.
        StripeCommand::Refund { payment, amount_refunded, refunds, .. } => {
            stale |= new_refund_facts(&draft.state, payment, *amount_refunded, refunds).is_none();
        }
        _ => {}
    }
    draft.emit_now(MemberEvent::StripeEventApplied {
        stripe_event_id: event.event_id.clone(),
        event_type: event.event_type.clone(),
        created: event.created,
        stale,
        synced,
    });
    link_customer(draft, event)?;
    if stale {
        return Ok(());
    }
    match command {
        StripeCommand::Subscription { subscription, .. } => {
            apply_subscription(draft, subscription, catalog, status_fresh)
        }
        StripeCommand::Invoice { invoice, outcome, .. } => {
            apply_invoice(draft, invoice, *outcome, status_fresh, catalog, event.refund_policy)
        }
        StripeCommand::Purchase { session_id, payment_intent, credits, price, .. } => {
            let terms = GrantTerms {
                source: GrantSource::Purchase,
                category: GrantSource::Purchase.default_category(),
                amount: *credits,
                priority: GrantSource::Purchase.default_priority(),
                expires_at: None,
                reason: None,
                price: Some(*price),
            };
            let grant_id = format!("g{}", draft.next_version());
            draft.emit_now(MemberEvent::CreditsGranted {
                grant_id,
                terms,
                transferred_from: Vec::new(),
                usage_id: None,
                schedule_id: None,
                stripe_period_start: None,
                stripe_checkout_session_id: Some(session_id.clone()),
                stripe_invoice_item: false,
                stripe_payment: payment_intent.clone(),
            });
            // A refund delivered before its purchase takes back now.
            if let Some(payment_intent) = payment_intent {
                settle_refund(draft, payment_intent, RefundFacts::default(), event.refund_policy);
            }
        }
        StripeCommand::CheckoutPaymentFailed { session_id, credits, price, .. } => {
            draft.emit_now(MemberEvent::CheckoutPaymentFailed {
                stripe_checkout_session_id: session_id.clone(),
                credits: *credits,
                price: *price,
            });
        }
        StripeCommand::Refund { payment, amount_refunded, refunds, .. } => {
            let facts = new_refund_facts(&draft.state, payment, *amount_refunded, refunds).expect("not stale");
            settle_refund(draft, payment, facts, event.refund_policy);
        }
    }
    Ok(())
}

fn check_refund(
    state: &MemberState,
    payment: &str,
    amount_refunded: Option<MinorUnits>,
    refunds: &[StripeRefundPart],
    currency: &str,
) -> Result<(), DomainError> {
    validate::identifier("payment_intent", payment)?;
    if let Some(amount) = amount_refunded {
        validate::range("amount_refunded", amount.0, 0, PRICE_MINOR_MAX)?;
    }
    if refunds.len() > STRIPE_REFUNDS_MAX {
        return Err(DomainError::invalid("refunds", format!("more than {STRIPE_REFUNDS_MAX} refunds")));
    }
    for refund in refunds {
        validate::identifier("refund", &refund.refund_id)?;
        validate::range("refunds.amount", refund.amount.0, 0, PRICE_MINOR_MAX)?;
    }
    if !currency.eq_ignore_ascii_case(&state.profile.currency) {
        return Err(DomainError::invalid("currency", "the refund's currency differs from the member's"));
    }
    Ok(())
}

/// What a refund event tells that tally does not hold yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RefundFacts {
    amount_refunded: Option<MinorUnits>,
    refunds: Vec<StripeRefundPart>,
}

/// `None` when the event brings nothing new: a smaller (older) refunded
/// total, refunds already seen.
fn new_refund_facts(
    state: &MemberState,
    payment: &str,
    amount_refunded: Option<MinorUnits>,
    refunds: &[StripeRefundPart],
) -> Option<RefundFacts> {
    let record = state.stripe_refunds.get(payment);
    let amount_refunded = amount_refunded.filter(|amount| record.is_none_or(|record| *amount > record.amount_refunded));
    let mut new_refunds: Vec<StripeRefundPart> = Vec::new();
    for refund in refunds {
        let seen = record.is_some_and(|record| record.refunds.contains_key(&refund.refund_id))
            || new_refunds.iter().any(|new| new.refund_id == refund.refund_id);
        if !seen {
            new_refunds.push(refund.clone());
        }
    }
    let facts = RefundFacts { amount_refunded, refunds: new_refunds };
    (facts != RefundFacts::default()).then_some(facts)
}

/// Record what is known of a payment's refunds and take back what the
/// refunded share of its grant comes to that was not taken back yet: out
/// of the grant's unspent rest first, the spent rest as debt or written
/// off, by the policy. A purchase is always taken back from; a
/// subscription invoice's allocation only when the policy says so. Writes
/// nothing when nothing is new (the facts, the refunded total, the credits).
fn settle_refund(draft: &mut Draft, payment: &str, facts: RefundFacts, policy: RefundPolicy) {
    let state = &draft.state;
    let mut record = state.stripe_refunds.get(payment).cloned().unwrap_or_default();
    if let Some(amount) = facts.amount_refunded {
        record.amount_refunded = record.amount_refunded.max(amount);
    }
    for refund in &facts.refunds {
        record.refunds.insert(refund.refund_id.clone(), refund.amount);
    }
    let invoice_id = state.stripe_invoices.get(payment).cloned();
    let paid = state.stripe_paid_grants.get(payment).cloned();
    let paid_amount = match (&paid, &invoice_id) {
        (Some(paid), _) => Some(paid.price),
        (None, Some(invoice_id)) => state.invoices.get(invoice_id).map(|record| record.total),
        (None, None) => None,
    };
    let refunded = match paid_amount {
        Some(paid_amount) => record.known().min(paid_amount.max(MinorUnits::ZERO)),
        None => record.known(),
    };

    let mut take = Credits::ZERO;
    let mut parts = Vec::new();
    let (mut debt, mut unit_price, mut written_off) = (Credits::ZERO, MinorUnits::ZERO, Credits::ZERO);
    if let Some(paid) = paid.as_ref().filter(|paid| paid.source == GrantSource::Purchase || policy.subscription_credits)
        && paid.price.is_positive()
        && paid.credits.is_positive()
    {
        // The refunded share, rounded down: a refund never takes back more
        // than it paid back.
        let share = i128::from(paid.credits.0) * i128::from(refunded.0) / i128::from(paid.price.0);
        let share = Credits(i64::try_from(share).expect("at most the grant's credits"));
        take = Credits(share.0.saturating_sub(record.taken_back.0).max(0));
        let unspent = state.grants.get(&paid.grant_id).map_or(Credits::ZERO, Grant::spendable);
        let from_grant = take.min(unspent);
        if from_grant.is_positive() {
            parts.push(GrantPart { grant_id: paid.grant_id.clone(), amount: from_grant });
        }
        let spent = take.minus(from_grant);
        match policy.spent {
            // Debt like any other: at the overage price of the plan in
            // force; with no plan, the payment's own price per credit.
            SpentRefund::Debt => {
                debt = spent;
                unit_price = match &state.subscription {
                    Some(subscription) if subscription.is_live() => subscription.terms.plan.overage.unit_price,
                    _ => MinorUnits(paid.price.0 / paid.credits.0),
                };
            }
            SpentRefund::WriteOff => written_off = spent,
        }
    }
    if facts == RefundFacts::default() && refunded == record.refunded && take.is_zero() {
        return;
    }
    draft.emit_now(MemberEvent::StripeRefundRecorded {
        stripe_payment: payment.to_owned(),
        amount_refunded: facts.amount_refunded,
        refunds: facts.refunds,
        refunded,
        invoice_id,
        grant_id: paid.map(|paid| paid.grant_id),
        parts,
        debt,
        unit_price,
        written_off,
    });
}

/// Where an event stands in its subscription's order: whether it is stale
/// (changes nothing), which watermarks it moves, and whether it may still
/// decide the status.
///
/// - A snapshot older than the newest applied snapshot of the same Stripe
///   subscription is stale; so is any snapshot of a subscription tally saw
///   end, and a `created` of one tally already has (`created` and the first
///   `updated` often share a second).
/// - The status follows the newest of the snapshots and the invoice
///   payments (paid or failed) of a subscription tally knows.
fn order(state: &MemberState, command: &StripeCommand) -> (bool, Option<StripeSynced>, bool) {
    let created = command.event().created;
    // A failure of an invoice no longer open is history only: it decides no
    // status, so it moves no watermark either.
    if let StripeCommand::Invoice { invoice, outcome: StripeInvoiceOutcome::PaymentFailed, .. } = command
        && let Some(status) = stripe_invoice_status(state, &invoice.invoice_id)
        && status != InvoiceStatus::Open
    {
        return (false, None, false);
    }
    let (subscription_id, snapshot) = match command {
        StripeCommand::Subscription { subscription, .. } => (subscription.subscription_id.as_str(), true),
        StripeCommand::Invoice {
            invoice,
            outcome: StripeInvoiceOutcome::Paid | StripeInvoiceOutcome::PaymentFailed,
            ..
        } => match invoice.subscription_id.as_deref() {
            Some(id) if same_subscription(state, id).is_some() => (id, false),
            _ => return (false, None, false),
        },
        _ => return (false, None, false),
    };
    let watermarks = state.stripe_subscriptions.get(subscription_id).copied().unwrap_or_default();
    let status_fresh = watermarks.status_at.is_none_or(|at| created >= at);
    let known = same_subscription(state, subscription_id);
    let stale = snapshot
        && (watermarks.snapshot_at.is_some_and(|at| created < at)
            || known.is_some_and(|current| !current.is_live())
            || (known.is_some() && command.event().event_type == "customer.subscription.created"));
    let synced =
        (!stale).then(|| StripeSynced { subscription_id: subscription_id.to_owned(), snapshot, status: status_fresh });
    (stale, synced, status_fresh && !stale)
}

fn stripe_instant(field: &'static str, instant: Timestamp) -> Result<(), DomainError> {
    use chrono::Datelike;
    if (STRIPE_YEAR_MIN..=STRIPE_YEAR_MAX).contains(&instant.year()) {
        Ok(())
    } else {
        Err(DomainError::invalid(field, format!("must lie in the years {STRIPE_YEAR_MIN} to {STRIPE_YEAR_MAX}")))
    }
}

/// The status of tally's record of a Stripe invoice, if it has one.
fn stripe_invoice_status(state: &MemberState, stripe_invoice_id: &str) -> Option<InvoiceStatus> {
    let invoice_id = state.stripe_invoices.get(stripe_invoice_id)?;
    state.invoices.get(invoice_id).map(|record| record.status)
}

/// The member's subscription with this Stripe id, live or not.
fn same_subscription<'a>(state: &'a MemberState, subscription_id: &str) -> Option<&'a Subscription> {
    state.subscription.as_ref().filter(|current| current.stripe_subscription_id.as_deref() == Some(subscription_id))
}

/// The plan of a subscription's items: the one item price a catalog plan
/// has. None is `stripe_price_id` (Stripe retries; a catalog fix lets it
/// through); several are `items`, refused for good, so the event is kept
/// for an operator.
fn plan_for_items<'a>(catalog: &'a Catalog, subscription: &StripeSubscription) -> Result<&'a PlanTerms, DomainError> {
    let known: Vec<&str> = subscription
        .price_ids
        .iter()
        .filter(|price_id| catalog.plan_by_stripe_price(price_id).is_some())
        .map(String::as_str)
        .collect();
    match known.as_slice() {
        [price_id] => plan_for_price(catalog, price_id),
        [] => Err(DomainError::invalid(
            "stripe_price_id",
            format!("no plan in the catalog has any of the Stripe prices {}", subscription.price_ids.join(", ")),
        )),
        several => Err(DomainError::invalid(
            "items",
            format!(
                "several items have prices of catalog plans ({}): tally follows one plan per subscription",
                several.join(", ")
            ),
        )),
    }
}

fn plan_for_price<'a>(catalog: &'a Catalog, price_id: &str) -> Result<&'a PlanTerms, DomainError> {
    catalog.plan_by_stripe_price(price_id).map(|entry| &entry.terms).ok_or_else(|| {
        DomainError::invalid("stripe_price_id", format!("no plan in the catalog has the Stripe price {price_id}"))
    })
}

fn check_subscription(
    state: &MemberState,
    subscription: &StripeSubscription,
    catalog: &Catalog,
) -> Result<(), DomainError> {
    validate::identifier("stripe_subscription_id", &subscription.subscription_id)?;
    stripe_instant("current_period_start", subscription.period_start)?;
    stripe_instant("current_period_end", subscription.period_end)?;
    if subscription.period_end <= subscription.period_start {
        return Err(DomainError::invalid("current_period_end", "the period ends before it starts"));
    }
    if subscription.price_ids.len() > STRIPE_SUBSCRIPTION_ITEMS_MAX {
        return Err(DomainError::invalid("items", format!("more than {STRIPE_SUBSCRIPTION_ITEMS_MAX} items")));
    }
    if let Some(ended_at) = subscription.ended_at {
        stripe_instant("ended_at", ended_at)?;
    }
    let terms = plan_for_items(catalog, subscription)?;
    let currency = &terms.plan.currency;
    if !currency.eq_ignore_ascii_case(&state.profile.currency) {
        return Err(DomainError::invalid("currency", "the plan's currency differs from the member's"));
    }
    if let Some(current) = state.subscription.as_ref().filter(|current| current.is_live())
        && current.stripe_subscription_id.as_deref() != Some(subscription.subscription_id.as_str())
    {
        return Err(DomainError::invalid(
            "stripe_subscription_id",
            "the member already has another live subscription; cancel it first",
        ));
    }
    Ok(())
}

fn check_invoice(
    state: &MemberState,
    invoice: &StripeInvoice,
    outcome: StripeInvoiceOutcome,
    catalog: &Catalog,
) -> Result<(), DomainError> {
    validate::identifier("stripe_invoice_id", &invoice.invoice_id)?;
    if !state.stripe_invoices.contains_key(&invoice.invoice_id)
        && !invoice.currency.eq_ignore_ascii_case(&state.profile.currency)
    {
        return Err(DomainError::invalid("currency", "the invoice's currency differs from the member's"));
    }
    if invoice.lines.len() > STRIPE_INVOICE_LINES_MAX {
        return Err(DomainError::invalid("lines", format!("more than {STRIPE_INVOICE_LINES_MAX} lines")));
    }
    validate::range("total", invoice.total.0, -PRICE_MINOR_MAX, PRICE_MINOR_MAX)?;
    for line in &invoice.lines {
        validate::range("lines.amount", line.amount.0, -PRICE_MINOR_MAX, PRICE_MINOR_MAX)?;
        for instant in [line.period_start, line.period_end].into_iter().flatten() {
            stripe_instant("lines.period", instant)?;
        }
        if let (Some(start), Some(end)) = (line.period_start, line.period_end)
            && end < start
        {
            return Err(DomainError::invalid("lines.period", "a line's period ends before it starts"));
        }
    }
    // A paid subscription invoice must bring its period's credits: a price no
    // plan has is refused (Stripe retries; a catalog fix lets it through).
    if outcome == StripeInvoiceOutcome::Paid
        && brings_allocation(invoice)
        && let Some(price_id) = subscription_line(invoice, catalog).and_then(|line| line.price_id.as_deref())
    {
        plan_for_price(catalog, price_id)?;
    }
    Ok(())
}

fn brings_allocation(invoice: &StripeInvoice) -> bool {
    matches!(invoice.billing_reason.as_deref(), Some("subscription_create" | "subscription_cycle"))
}

fn link_customer(draft: &mut Draft, event: &StripeEventRef) -> Result<(), DomainError> {
    let Some(customer_id) = &event.customer_id else { return Ok(()) };
    match &draft.state.profile.stripe_customer_id {
        Some(linked) if linked == customer_id => Ok(()),
        Some(_) => Err(DomainError::invalid("customer", "the member is linked to another Stripe customer")),
        None => {
            validate::identifier("stripe_customer_id", customer_id)?;
            let profile = &draft.state.profile;
            let changed = MemberEvent::MemberProfileChanged {
                time_zone: profile.time_zone.clone(),
                currency: profile.currency.clone(),
                stripe_customer_id: Some(customer_id.clone()),
            };
            draft.emit_now(changed);
            Ok(())
        }
    }
}

/// Move tally's subscription to Stripe's snapshot (checked before).
fn apply_subscription(draft: &mut Draft, snapshot: &StripeSubscription, catalog: &Catalog, status_fresh: bool) {
    let terms = plan_for_items(catalog, snapshot).expect("checked").clone();
    let status = if snapshot.deleted { SubscriptionStatus::Canceled } else { status_from_stripe(&snapshot.status) };
    let Some(current) = same_subscription(&draft.state, &snapshot.subscription_id).cloned() else {
        // New to tally (or its `created` event is still on its way): start it
        // as Stripe has it. Stripe's first paid invoice brings the credits.
        draft.emit_now(MemberEvent::SubscriptionStarted {
            terms,
            status,
            billing: Billing::Stripe,
            period_start: snapshot.period_start,
            period_end: snapshot.period_end,
            stripe_subscription_id: Some(snapshot.subscription_id.clone()),
        });
        if snapshot.cancel_at_period_end && status != SubscriptionStatus::Canceled {
            draft.emit_now(MemberEvent::SubscriptionCancelScheduled { effective_at: snapshot.period_end });
        }
        return;
    };

    if status == SubscriptionStatus::Canceled {
        cancel(draft, &current, snapshot.ended_at);
        return;
    }
    if snapshot.period_start > current.period_start {
        renew(draft, terms.clone(), snapshot.period_start, snapshot.period_end);
    }
    let current = draft.state.subscription.clone().expect("still there");
    if terms.plan.plan_id != current.terms.plan.plan_id {
        let period_seconds = (current.period_end - current.period_start).num_seconds();
        let remaining_seconds = (current.period_end - draft.now).num_seconds().clamp(0, period_seconds);
        draft.emit_now(MemberEvent::SubscriptionPlanChanged {
            terms,
            proration_credits: Credits::ZERO,
            proration_amount: MinorUnits::ZERO,
            remaining_seconds,
            period_seconds,
        });
    }
    match (current.cancel_at_period_end, snapshot.cancel_at_period_end) {
        (false, true) => draft.emit_now(MemberEvent::SubscriptionCancelScheduled { effective_at: current.period_end }),
        (true, false) => draft.emit_now(MemberEvent::SubscriptionCancelRevoked {}),
        _ => {}
    }
    if status_fresh {
        set_status(draft, status, None);
    }
}

fn set_status(draft: &mut Draft, status: SubscriptionStatus, invoice_id: Option<String>) {
    let Some(current) = draft.state.subscription.as_ref().filter(|current| current.is_live()) else { return };
    match (current.status, status) {
        (SubscriptionStatus::Active | SubscriptionStatus::Trialing, SubscriptionStatus::PastDue) => {
            draft.emit_now(MemberEvent::SubscriptionPastDue { invoice_id })
        }
        (SubscriptionStatus::PastDue | SubscriptionStatus::Trialing, SubscriptionStatus::Active) => {
            draft.emit_now(MemberEvent::SubscriptionReactivated {})
        }
        _ => {}
    }
}

/// Stripe ended the subscription: close the period if tally's clock has not
/// yet (allocation and rollover lapse), then cancel, at the instant Stripe
/// says it ended (tally's clock when Stripe says none).
fn cancel(draft: &mut Draft, current: &Subscription, ended_at: Option<Timestamp>) {
    let now = draft.now;
    let immediately = !current.period_closed;
    if immediately {
        close_period_now(draft, current, None);
    } else {
        lapse_allocations(draft);
    }
    draft.emit_now(MemberEvent::SubscriptionCanceled { canceled_at: ended_at.unwrap_or(now), immediately });
}

/// Move to a later Stripe period, closing the one before if tally's clock
/// has not closed it yet.
fn renew(draft: &mut Draft, terms: PlanTerms, period_start: Timestamp, period_end: Timestamp) {
    let current = draft.state.subscription.clone().expect("renewing a subscription");
    if !current.period_closed {
        close_period_now(draft, &current, Some(period_end));
    }
    draft.emit_now(MemberEvent::SubscriptionRenewed { terms, period_start, period_end });
}

fn apply_invoice(
    draft: &mut Draft,
    invoice: &StripeInvoice,
    outcome: StripeInvoiceOutcome,
    fresh: bool,
    catalog: &Catalog,
    policy: RefundPolicy,
) {
    let invoice_id = match draft.state.stripe_invoices.get(&invoice.invoice_id) {
        Some(invoice_id) => invoice_id.clone(),
        None => record_invoice(draft, invoice, catalog),
    };
    let status = draft.state.invoices.get(&invoice_id).map(|record| record.status);
    let total = draft.state.invoices.get(&invoice_id).map_or(MinorUnits::ZERO, |record| record.total);
    match outcome {
        StripeInvoiceOutcome::Finalized => {}
        StripeInvoiceOutcome::Paid => {
            if matches!(status, Some(InvoiceStatus::Open | InvoiceStatus::Uncollectible)) {
                draft.emit_now(MemberEvent::PaymentSucceeded { invoice_id: invoice_id.clone(), amount: total });
            }
            let made_past_due = draft.state.subscription.as_ref().and_then(|current| current.past_due_invoice.clone());
            if fresh
                && of_live_subscription(&draft.state, invoice)
                && made_past_due.is_none_or(|past_due| past_due == invoice_id)
            {
                set_status(draft, SubscriptionStatus::Active, None);
            }
            allocate(draft, invoice, catalog);
        }
        // Every failure is the invoice's history, whenever it is delivered
        // (a failure delivered after the invoice was paid counts the same as
        // one delivered before); only a failure of a still open invoice can
        // make the member past due.
        StripeInvoiceOutcome::PaymentFailed => {
            draft.emit_now(MemberEvent::PaymentFailed { invoice_id: invoice_id.clone(), reason: None });
            if status == Some(InvoiceStatus::Open) && fresh && of_live_subscription(&draft.state, invoice) {
                set_status(draft, SubscriptionStatus::PastDue, Some(invoice_id));
            }
        }
        // Statuses only move forward whatever the delivery order: open →
        // uncollectible → paid or void; paid and void are final. The
        // subscription's status is Stripe's to say, in its own events.
        StripeInvoiceOutcome::Voided => {
            if matches!(status, Some(InvoiceStatus::Open | InvoiceStatus::Uncollectible)) {
                draft.emit_now(MemberEvent::InvoiceVoided { invoice_id });
            }
        }
        StripeInvoiceOutcome::MarkedUncollectible => {
            if status == Some(InvoiceStatus::Open) {
                draft.emit_now(MemberEvent::InvoiceMarkedUncollectible { invoice_id });
            }
        }
    }
    // A refund (a credit note) delivered before the invoice it refunds.
    if draft.state.stripe_refunds.contains_key(&invoice.invoice_id) {
        settle_refund(draft, &invoice.invoice_id, RefundFacts::default(), policy);
    }
}

fn of_live_subscription(state: &MemberState, invoice: &StripeInvoice) -> bool {
    invoice
        .subscription_id
        .as_deref()
        .and_then(|subscription_id| same_subscription(state, subscription_id))
        .is_some_and(Subscription::is_live)
}

/// Record Stripe's invoice of record. Lines follow Stripe's; what its total
/// holds beyond them (discounts, taxes) is one adjustment line, so the lines
/// always sum to the total.
fn record_invoice(draft: &mut Draft, invoice: &StripeInvoice, catalog: &Catalog) -> String {
    let invoice_id = next_invoice_id(&draft.state);
    let mut lines: Vec<InvoiceLine> = invoice
        .lines
        .iter()
        .map(|line| {
            let kind = if line.proration {
                InvoiceLineKind::Proration
            } else if line.price_id.is_some() && line.period_start.is_some() {
                InvoiceLineKind::Fee
            } else {
                InvoiceLineKind::Purchase
            };
            InvoiceLine {
                kind,
                description: line.description.clone().unwrap_or_else(|| "Stripe invoice line".to_owned()),
                quantity: 1,
                unit_amount: line.amount,
                amount: line.amount,
            }
        })
        .collect();
    let lines_sum = MinorUnits(lines.iter().map(|line| line.amount.0).sum());
    if lines_sum != invoice.total {
        let rest = MinorUnits(invoice.total.0 - lines_sum.0);
        lines.push(InvoiceLine {
            kind: InvoiceLineKind::Adjustment,
            description: "Discounts, taxes and credit applied by Stripe".to_owned(),
            quantity: 1,
            unit_amount: rest,
            amount: rest,
        });
    }
    let (period_start, period_end) = match subscription_line(invoice, catalog) {
        Some(line) => (line.period_start, line.period_end),
        None => (None, None),
    };
    draft.emit_now(MemberEvent::InvoiceIssued {
        invoice_id: invoice_id.clone(),
        period_start,
        period_end,
        currency: draft.state.profile.currency.clone(),
        lines,
        total: invoice.total,
        debt_cleared: Credits::ZERO,
        stripe_invoice_id: Some(invoice.invoice_id.clone()),
    });
    invoice_id
}

/// The line that bills the subscription's period: priced, with a period, not
/// a proration; of several such (a plan and its add-ons), the one whose
/// price a catalog plan has, as for the subscription's items.
fn subscription_line<'a>(invoice: &'a StripeInvoice, catalog: &Catalog) -> Option<&'a StripeInvoiceLine> {
    let mut candidates =
        invoice.lines.iter().filter(|line| !line.proration && line.price_id.is_some() && line.period_start.is_some());
    let first = candidates.clone().next();
    candidates
        .find(|line| line.price_id.as_deref().is_some_and(|price_id| catalog.plan_by_stripe_price(price_id).is_some()))
        .or(first)
}

/// A paid subscription invoice (create or cycle) brings its period's monthly
/// allocation, once per period start, in the amount of the plan priced on it;
/// a period that already ended gets none. A later period than the
/// subscription's own renews it first.
fn allocate(draft: &mut Draft, invoice: &StripeInvoice, catalog: &Catalog) {
    if !brings_allocation(invoice) {
        return;
    }
    // Credits of a subscription tally saw end would outlive it.
    let known = invoice.subscription_id.as_deref().and_then(|id| same_subscription(&draft.state, id));
    if known.is_some_and(|current| !current.is_live()) {
        return;
    }
    let Some(line) = subscription_line(invoice, catalog) else { return };
    let (Some(price_id), Some(period_start), Some(period_end)) = (&line.price_id, line.period_start, line.period_end)
    else {
        return;
    };
    let Some(entry) = catalog.plan_by_stripe_price(price_id) else { return };
    if draft.state.stripe_allocations.contains(&period_start) || period_end <= draft.now {
        return;
    }
    let terms = entry.terms.clone();
    let monthly_credits = terms.plan.monthly_credits;
    if let Some(current) = invoice.subscription_id.as_deref().and_then(|id| same_subscription(&draft.state, id))
        && current.is_live()
        && period_start > current.period_start
    {
        renew(draft, terms, period_start, period_end);
    }
    if monthly_credits.is_positive() {
        let grant_id = format!("g{}", draft.next_version());
        draft.emit_now(MemberEvent::CreditsGranted {
            grant_id,
            terms: GrantTerms {
                source: GrantSource::MonthlyAllocation,
                category: GrantSource::MonthlyAllocation.default_category(),
                amount: monthly_credits,
                priority: GrantSource::MonthlyAllocation.default_priority(),
                expires_at: Some(period_end),
                reason: None,
                price: None,
            },
            transferred_from: Vec::new(),
            usage_id: None,
            schedule_id: None,
            stripe_period_start: Some(period_start),
            stripe_checkout_session_id: None,
            stripe_invoice_item: false,
            stripe_payment: Some(invoice.invoice_id.clone()),
        });
    }
}
