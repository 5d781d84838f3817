//! From a parsed Stripe event to what the ledger should do with it
//! (DESIGN.md §8): a member command, or an acknowledgement that it is
//! ignored, or an event that is genuine but lacks a fact tally needs.
//!
//! Finding the member (through the customer id, else
//! `metadata.tally_member_id`) needs the store, so it is the caller's.

use crate::event::{
    ChargeFacts, CheckoutFacts, CreditNoteFacts, EventObject, InvoiceFacts, ParsedEvent, RefundFacts, SubscriptionFacts,
};
use chrono::{DateTime, Utc};
use tally_ledger::domain::{
    Credits, MinorUnits, RefundPolicy, StripeCommand, StripeEventRef, StripeInvoice, StripeInvoiceLine,
    StripeInvoiceOutcome, StripeRefundPart, StripeSubscription,
};

/// The metadata key that names the tally member of a Stripe object.
pub const MEMBER_METADATA_KEY: &str = "tally_member_id";
/// The checkout metadata key that makes a session a credit purchase.
pub const PURCHASE_METADATA_KEY: &str = "tally_purchase_credits";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mapped {
    /// A command for the member linked to `customer_id`, or named by
    /// `member_hint` (`metadata.tally_member_id`).
    Command { customer_id: Option<String>, member_hint: Option<String>, command: Box<StripeCommand> },
    /// Acknowledged and recorded as ignored, with why.
    Ignored { reason: String },
    /// Genuine, of a type tally maps, but without a fact tally needs: kept
    /// verbatim for an operator.
    Unprocessed { reason: String },
}

fn ignored(reason: impl Into<String>) -> Mapped {
    Mapped::Ignored { reason: reason.into() }
}

fn unprocessed(reason: impl Into<String>) -> Mapped {
    Mapped::Unprocessed { reason: reason.into() }
}

fn instant(seconds: i64, field: &str) -> Result<DateTime<Utc>, Mapped> {
    DateTime::from_timestamp(seconds, 0).ok_or_else(|| unprocessed(format!("{field} is not a valid instant")))
}

pub fn map(event: &ParsedEvent) -> Mapped {
    let result = match &event.object {
        EventObject::Subscription(subscription) => map_subscription(event, subscription),
        EventObject::Invoice(invoice) => map_invoice(event, invoice),
        EventObject::CheckoutSession(session) => map_checkout(event, session),
        EventObject::Charge(charge) => map_charge(event, charge),
        EventObject::Refund(refund) => map_refund(event, refund),
        EventObject::CreditNote(note) => map_credit_note(event, note),
        EventObject::Other => Err(ignored(format!("event type {} is not handled", event.event_type))),
    };
    result.unwrap_or_else(|mapped| mapped)
}

fn event_ref(event: &ParsedEvent, customer_id: Option<&String>) -> Result<StripeEventRef, Mapped> {
    Ok(StripeEventRef {
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        created: instant(event.created, "created")?,
        customer_id: customer_id.cloned(),
        // The server puts the operator's settings in (`serve --stripe-refund-…`).
        refund_policy: RefundPolicy::default(),
    })
}

fn map_subscription(event: &ParsedEvent, facts: &SubscriptionFacts) -> Result<Mapped, Mapped> {
    let deleted = match event.event_type.as_str() {
        "customer.subscription.created" | "customer.subscription.updated" => false,
        "customer.subscription.deleted" => true,
        other => return Err(ignored(format!("event type {other} is not handled"))),
    };
    let subscription = subscription_snapshot(facts, deleted)?;
    Ok(Mapped::Command {
        customer_id: Some(facts.customer.clone()),
        member_hint: facts.metadata.get(MEMBER_METADATA_KEY).cloned(),
        command: Box::new(StripeCommand::Subscription {
            event: event_ref(event, Some(&facts.customer))?,
            subscription,
        }),
    })
}

/// Stripe's subscription as a ledger snapshot; `Err` is [`Mapped::Unprocessed`].
/// Every item's price goes with it: the ledger picks the one its catalog
/// knows.
pub fn subscription_snapshot(facts: &SubscriptionFacts, deleted: bool) -> Result<StripeSubscription, Mapped> {
    let mut price_ids: Vec<String> = Vec::new();
    for price_id in &facts.price_ids {
        if !price_ids.contains(price_id) {
            price_ids.push(price_id.clone());
        }
    }
    if price_ids.is_empty() {
        return Err(unprocessed("the subscription has no priced item"));
    }
    let (Some(start), Some(end)) = (facts.current_period_start, facts.current_period_end) else {
        return Err(unprocessed("the subscription has no current period"));
    };
    // When it ended, by Stripe's clock, for one that did: `ended_at`, else
    // (an older shape) `canceled_at`. On a live subscription `canceled_at`
    // only says a cancel was asked for.
    let ended = deleted || facts.status == "canceled" || facts.status == "incomplete_expired";
    let ended_at = if ended { facts.ended_at.or(facts.canceled_at) } else { None };
    Ok(StripeSubscription {
        subscription_id: facts.id.clone(),
        status: facts.status.clone(),
        price_ids,
        period_start: instant(start, "current_period_start")?,
        period_end: instant(end, "current_period_end")?,
        cancel_at_period_end: facts.cancel_at_period_end,
        ended_at: ended_at.map(|at| instant(at, "ended_at")).transpose()?,
        deleted,
    })
}

fn map_invoice(event: &ParsedEvent, facts: &InvoiceFacts) -> Result<Mapped, Mapped> {
    let outcome = match event.event_type.as_str() {
        "invoice.finalized" => StripeInvoiceOutcome::Finalized,
        "invoice.paid" => StripeInvoiceOutcome::Paid,
        "invoice.payment_failed" => StripeInvoiceOutcome::PaymentFailed,
        "invoice.voided" => StripeInvoiceOutcome::Voided,
        "invoice.marked_uncollectible" => StripeInvoiceOutcome::MarkedUncollectible,
        other => return Err(ignored(format!("event type {other} is not handled"))),
    };
    let lines = facts
        .lines
        .iter()
        .map(|line| {
            Ok(StripeInvoiceLine {
                amount: MinorUnits(line.amount),
                description: line.description.clone(),
                price_id: line.price_id.clone(),
                period_start: line.period_start.map(|at| instant(at, "lines.period.start")).transpose()?,
                period_end: line.period_end.map(|at| instant(at, "lines.period.end")).transpose()?,
                proration: line.proration,
            })
        })
        .collect::<Result<Vec<_>, Mapped>>()?;
    let invoice = StripeInvoice {
        invoice_id: facts.id.clone(),
        subscription_id: facts.subscription.clone(),
        billing_reason: facts.billing_reason.clone(),
        currency: facts.currency.clone(),
        total: MinorUnits(facts.total),
        lines,
    };
    Ok(Mapped::Command {
        customer_id: facts.customer.clone(),
        member_hint: facts.metadata.get(MEMBER_METADATA_KEY).cloned(),
        command: Box::new(StripeCommand::Invoice {
            event: event_ref(event, facts.customer.as_ref())?,
            invoice,
            outcome,
        }),
    })
}

/// A credit purchase through Stripe Checkout. Paid at once (a card),
/// `checkout.session.completed` comes `paid` and grants. Paid by a delayed
/// method (a bank debit, a voucher), it comes `unpaid` and only records
/// that the payment is pending; `checkout.session.async_payment_succeeded`
/// then grants (once per session, whichever event brings it: the ledger
/// keeps the sessions it granted), and `…async_payment_failed` records the
/// failure and grants nothing.
fn map_checkout(event: &ParsedEvent, facts: &CheckoutFacts) -> Result<Mapped, Mapped> {
    let succeeded = match event.event_type.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => true,
        "checkout.session.async_payment_failed" => false,
        other => return Err(ignored(format!("event type {other} is not handled"))),
    };
    let Some(credits) = facts.metadata.get(PURCHASE_METADATA_KEY) else {
        return Err(ignored(format!("the session has no metadata.{PURCHASE_METADATA_KEY}: not a credit purchase")));
    };
    // `no_payment_required`: a checkout whose total came to nothing (a
    // 100 % coupon, say): nothing to wait for, the credits are bought.
    if succeeded && !matches!(facts.payment_status.as_str(), "paid" | "no_payment_required") {
        return Err(ignored(format!(
            "the session's payment_status is {}, not paid: its credits are granted when \
             checkout.session.async_payment_succeeded comes",
            facts.payment_status
        )));
    }
    let credits = credits.parse::<i64>().ok().filter(|credits| *credits > 0).ok_or_else(|| {
        unprocessed(format!("metadata.{PURCHASE_METADATA_KEY} is not a positive integer: {credits:?}"))
    })?;
    let event = event_ref(event, facts.customer.as_ref())?;
    let session_id = facts.id.clone();
    let price = MinorUnits(facts.amount_total.unwrap_or(0));
    let command = if succeeded {
        let currency = facts.currency.clone().ok_or_else(|| unprocessed("the paid session has no currency"))?;
        let payment_intent = facts.payment_intent.clone();
        StripeCommand::Purchase { event, session_id, payment_intent, credits: Credits(credits), price, currency }
    } else {
        StripeCommand::CheckoutPaymentFailed { event, session_id, credits: Credits(credits), price }
    };
    Ok(Mapped::Command {
        customer_id: facts.customer.clone(),
        member_hint: facts.metadata.get(MEMBER_METADATA_KEY).cloned(),
        command: Box::new(command),
    })
}

/// A refund fact as a command for the member of `customer`.
fn refund_command(
    event: &ParsedEvent,
    customer: Option<&String>,
    metadata: &std::collections::BTreeMap<String, String>,
    payment: String,
    amount_refunded: Option<i64>,
    refunds: Vec<StripeRefundPart>,
    currency: &str,
) -> Result<Mapped, Mapped> {
    Ok(Mapped::Command {
        customer_id: customer.cloned(),
        member_hint: metadata.get(MEMBER_METADATA_KEY).cloned(),
        command: Box::new(StripeCommand::Refund {
            event: event_ref(event, customer)?,
            payment,
            amount_refunded: amount_refunded.map(MinorUnits),
            refunds,
            currency: currency.to_owned(),
        }),
    })
}

/// `charge.refunded`: the charge's refunded total, for the invoice it paid
/// (API versions that name it) or else its PaymentIntent.
fn map_charge(event: &ParsedEvent, facts: &ChargeFacts) -> Result<Mapped, Mapped> {
    let Some(payment) = facts.invoice.clone().or_else(|| facts.payment_intent.clone()) else {
        return Err(ignored("the charge has no PaymentIntent or invoice: no purchase or invoice of tally's"));
    };
    refund_command(
        event,
        facts.customer.as_ref(),
        &facts.metadata,
        payment,
        Some(facts.amount_refunded),
        Vec::new(),
        &facts.currency,
    )
}

/// `refund.created` / `refund.updated`: one refund of a PaymentIntent, once
/// it is under way (a failed or canceled refund gave nothing back).
fn map_refund(event: &ParsedEvent, facts: &RefundFacts) -> Result<Mapped, Mapped> {
    if matches!(facts.status.as_deref(), Some("failed" | "canceled")) {
        return Err(ignored(format!(
            "the refund is {}: nothing was given back",
            facts.status.as_deref().unwrap_or("")
        )));
    }
    let Some(payment_intent) = facts.payment_intent.clone() else {
        return Err(ignored("the refund has no PaymentIntent; charge.refunded carries it"));
    };
    if facts.customer.is_none() && !facts.metadata.contains_key(MEMBER_METADATA_KEY) {
        return Err(ignored("the refund names no customer (older API versions); charge.refunded carries it"));
    }
    let refund = StripeRefundPart { refund_id: facts.id.clone(), amount: MinorUnits(facts.amount) };
    refund_command(event, facts.customer.as_ref(), &facts.metadata, payment_intent, None, vec![refund], &facts.currency)
}

/// `credit_note.created`: the refunds of a Stripe invoice it makes (and
/// what it says was refunded out of band, under the note's own id).
fn map_credit_note(event: &ParsedEvent, facts: &CreditNoteFacts) -> Result<Mapped, Mapped> {
    let mut refunds: Vec<StripeRefundPart> = facts
        .refunds
        .iter()
        .map(|(refund_id, amount)| StripeRefundPart { refund_id: refund_id.clone(), amount: MinorUnits(*amount) })
        .collect();
    if facts.out_of_band_amount > 0 {
        refunds.push(StripeRefundPart { refund_id: facts.id.clone(), amount: MinorUnits(facts.out_of_band_amount) });
    }
    if refunds.is_empty() {
        return Err(ignored("the credit note refunds nothing (it credits the customer's balance or the invoice)"));
    }
    refund_command(
        event,
        facts.customer.as_ref(),
        &facts.metadata,
        facts.invoice.clone(),
        None,
        refunds,
        &facts.currency,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse;

    fn fixture(path: &str) -> Vec<u8> {
        let full = format!("{}/../../fixtures/stripe/events/{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&full).unwrap_or_else(|error| panic!("{full}: {error}"))
    }

    fn mapped(path: &str) -> Mapped {
        map(&parse(&fixture(path)).unwrap())
    }

    #[test]
    fn composed_subscription_events_become_snapshots() {
        let Mapped::Command { customer_id, command, .. } = mapped("composed/customer.subscription.deleted.json") else {
            panic!("not a command")
        };
        let StripeCommand::Subscription { event, subscription } = *command else { panic!("not a subscription") };
        assert_eq!(event.event_id, "evt_fixture_customer_subscription_deleted");
        assert_eq!(customer_id, event.customer_id);
        assert!(subscription.deleted);
        assert_eq!(subscription.subscription_id, "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw");
    }

    #[test]
    fn genuine_pre_basil_events_map_through_the_fallback() {
        let Mapped::Command { command, .. } = mapped("genuine/supabase-stripe-sync-engine/subscription_created.json")
        else {
            panic!("not a command")
        };
        let StripeCommand::Subscription { subscription, .. } = *command else { panic!("not a subscription") };
        assert!(subscription.period_start < subscription.period_end);
        let Mapped::Command { command, .. } = mapped("genuine/supabase-stripe-sync-engine/invoice_paid.json") else {
            panic!("not a command")
        };
        assert!(matches!(*command, StripeCommand::Invoice { outcome: StripeInvoiceOutcome::Paid, .. }));
        // invoice.updated is not one tally maps.
        assert!(matches!(mapped("genuine/supabase-stripe-sync-engine/invoice_updated.json"), Mapped::Ignored { .. }));
    }

    #[test]
    fn checkouts_without_tally_metadata_or_payment_are_ignored() {
        // Stripe's own fixture: unpaid, no tally metadata.
        assert!(matches!(mapped("composed/checkout.session.completed.json"), Mapped::Ignored { .. }));
        assert!(matches!(mapped("genuine/stripe-dotnet/customer_updated.json"), Mapped::Ignored { .. }));
    }

    #[test]
    fn a_paid_checkout_with_credits_is_a_purchase_and_a_bad_count_is_unprocessed() {
        let body = |credits: &str| {
            format!(
                r#"{{"id":"evt_c","object":"event","type":"checkout.session.completed","created":1767225600,"livemode":false,
                "data":{{"object":{{"id":"cs_1","object":"checkout.session","customer":"cus_1","mode":"payment","payment_status":"paid",
                "amount_total":999,"currency":"usd","metadata":{{"tally_purchase_credits":"{credits}"}}}}}}}}"#
            )
        };
        let parsed = parse(body("500").as_bytes()).unwrap();
        let Mapped::Command { command, .. } = map(&parsed) else { panic!("not a command: {:?}", map(&parsed)) };
        let StripeCommand::Purchase { credits, price, currency, .. } = *command else { panic!("not a purchase") };
        assert_eq!((credits, price, currency.as_str()), (Credits(500), MinorUnits(999), "usd"));
        for bad in ["0", "-3", "lots", "1.5"] {
            assert!(matches!(map(&parse(body(bad).as_bytes()).unwrap()), Mapped::Unprocessed { .. }), "{bad}");
        }
    }

    #[test]
    fn a_delayed_payment_waits_for_its_outcome() {
        let body = |event_type: &str, payment_status: &str| {
            format!(
                r#"{{"id":"evt_d","object":"event","type":"{event_type}","created":1767225600,"livemode":false,
                "data":{{"object":{{"id":"cs_2","object":"checkout.session","customer":"cus_1","mode":"payment",
                "payment_status":"{payment_status}","amount_total":999,"currency":"usd",
                "metadata":{{"tally_purchase_credits":"500"}}}}}}}}"#
            )
        };
        let mapped =
            |event_type: &str, payment_status: &str| map(&parse(body(event_type, payment_status).as_bytes()).unwrap());
        let Mapped::Ignored { reason } = mapped("checkout.session.completed", "unpaid") else { panic!("not ignored") };
        assert!(reason.contains("async_payment_succeeded"), "{reason}");
        // A total of nothing (a 100 % coupon): nothing to wait for.
        let Mapped::Command { command, .. } = mapped("checkout.session.completed", "no_payment_required") else {
            panic!("not a command")
        };
        assert!(matches!(*command, StripeCommand::Purchase { .. }));
        let Mapped::Command { command, .. } = mapped("checkout.session.async_payment_succeeded", "paid") else {
            panic!("not a command")
        };
        assert!(
            matches!(*command, StripeCommand::Purchase { ref session_id, credits: Credits(500), .. } if session_id == "cs_2")
        );
        let Mapped::Command { command, .. } = mapped("checkout.session.async_payment_failed", "unpaid") else {
            panic!("not a command")
        };
        assert!(matches!(
            *command,
            StripeCommand::CheckoutPaymentFailed { credits: Credits(500), price: MinorUnits(999), .. }
        ));
    }

    fn event_of(event_type: &str, object: serde_json::Value) -> ParsedEvent {
        let body = serde_json::json!({"id": "evt_r", "object": "event", "type": event_type, "created": 1767225600,
            "livemode": false, "data": {"object": object}});
        parse(body.to_string().as_bytes()).unwrap()
    }

    fn refund_of(mapped: Mapped) -> (String, Option<MinorUnits>, Vec<StripeRefundPart>) {
        let Mapped::Command { command, .. } = mapped else { panic!("not a command: {mapped:?}") };
        let StripeCommand::Refund { payment, amount_refunded, refunds, .. } = *command else { panic!("not a refund") };
        (payment, amount_refunded, refunds)
    }

    #[test]
    fn refunds_name_their_payment_and_what_was_given_back() {
        let charge = |invoice: serde_json::Value, payment_intent: serde_json::Value| {
            serde_json::json!({"id": "ch_1", "object": "charge", "amount": 999, "amount_refunded": 500,
                "currency": "usd", "customer": "cus_1", "invoice": invoice, "payment_intent": payment_intent})
        };
        let (payment, amount, refunds) =
            refund_of(map(&event_of("charge.refunded", charge(json_null(), "pi_1".into()))));
        assert_eq!((payment.as_str(), amount, refunds.len()), ("pi_1", Some(MinorUnits(500)), 0));
        // An older charge that paid an invoice refunds that invoice.
        let (payment, ..) = refund_of(map(&event_of("charge.refunded", charge("in_1".into(), "pi_1".into()))));
        assert_eq!(payment, "in_1");
        assert!(matches!(map(&event_of("charge.refunded", charge(json_null(), json_null()))), Mapped::Ignored { .. }));

        let refund = |status: &str| {
            serde_json::json!({"id": "re_1", "object": "refund", "amount": 300, "currency": "usd", "customer": "cus_1",
                "payment_intent": "pi_1", "status": status})
        };
        let (payment, amount, refunds) = refund_of(map(&event_of("refund.created", refund("succeeded"))));
        assert_eq!((payment.as_str(), amount), ("pi_1", None));
        assert_eq!(refunds, [StripeRefundPart { refund_id: "re_1".into(), amount: MinorUnits(300) }]);
        for status in ["failed", "canceled"] {
            assert!(matches!(map(&event_of("refund.updated", refund(status))), Mapped::Ignored { .. }), "{status}");
        }

        let note = |refunds: serde_json::Value, out_of_band: i64| {
            serde_json::json!({"id": "cn_1", "object": "credit_note", "amount": 700, "currency": "usd",
                "customer": "cus_1", "invoice": "in_1", "refunds": refunds, "out_of_band_amount": out_of_band})
        };
        let (payment, _, refunds) = refund_of(map(&event_of(
            "credit_note.created",
            note(serde_json::json!([{"refund": "re_2", "amount_refunded": 600}]), 100),
        )));
        assert_eq!(payment, "in_1");
        assert_eq!(
            refunds.iter().map(|part| (part.refund_id.as_str(), part.amount.0)).collect::<Vec<_>>(),
            [("re_2", 600), ("cn_1", 100)]
        );
        // Credited to the balance: nothing refunded.
        assert!(matches!(
            map(&event_of("credit_note.created", note(serde_json::json!([]), 0))),
            Mapped::Ignored { .. }
        ));
    }

    fn json_null() -> serde_json::Value {
        serde_json::Value::Null
    }
}
