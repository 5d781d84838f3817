//! `tally audit replay`: a member's books as of an instant, from the log
//! alone.
//!
//! Only events recorded at or before the instant are folded (`recorded_at`
//! never decreases along the log, so they are a prefix of the stream), with
//! the catalog as it stood then. Time effects that had fallen due by then
//! but were not recorded yet — the scheduler runs every few seconds, and not
//! at all while no server runs — are decided by the same pure function the
//! writer uses (`decide` with `AdvanceTime` at the instant) and shown apart,
//! so that the figures are those the ledger would answer at that instant,
//! whether or not the scheduler had caught up. No read model is consulted:
//! the replay is an independent check on them.

use anyhow::{Result, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tally_ledger::codec;
use tally_ledger::domain::{
    Billing, CATALOG_STREAM, Catalog, Context, GrantCategory, MemberCommand, MemberEvent, MemberState, decide,
    member_stream, validate,
};
use tally_ledger::store::{EventReader, RecordedEvent};

use crate::table::{Align, Table, grouped, money, signed};

/// Events read per page while replaying a stream.
const REPLAY_PAGE_EVENTS: usize = 1_000;

#[derive(Debug, Serialize)]
pub struct MemberReplay {
    pub member_id: String,
    pub as_of: DateTime<Utc>,
    /// The position of the last event replayed.
    pub position: u64,
    /// Events of the member's stream recorded at or before `as_of`.
    pub events_replayed: u64,
    /// Effects of time due by `as_of` that the log did not hold yet; they are
    /// included in every figure and listed last in `transactions`.
    pub pending_time_effects: u64,
    pub time_zone: String,
    pub currency: String,
    /// available + held − debt, in credits.
    pub balance: i64,
    pub available: i64,
    pub held: i64,
    pub debt: i64,
    pub totals: TotalsView,
    pub grants: Vec<GrantView>,
    pub subscription: Option<SubscriptionView>,
    /// Every event of the member up to `as_of`, oldest first.
    pub transactions: Vec<TransactionView>,
}

#[derive(Debug, Serialize)]
pub struct TotalsView {
    pub granted: i64,
    pub used: i64,
    pub debited: i64,
    pub expired: i64,
    pub debt_incurred: i64,
}

#[derive(Debug, Serialize)]
pub struct GrantView {
    pub grant_id: String,
    pub source: &'static str,
    pub category: &'static str,
    pub priority: u8,
    pub amount: i64,
    /// Includes `held`.
    pub remaining: i64,
    pub held: i64,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct SubscriptionView {
    pub plan_id: String,
    pub plan_name: String,
    pub plan_version: u32,
    pub status: &'static str,
    pub billing: &'static str,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// The fee of the current period, in minor units.
    pub period_price: i64,
    pub currency: String,
    pub monthly_credits: i64,
    pub cancel_at_period_end: bool,
    /// The plan a scheduled downgrade moves to at the period's end.
    pub scheduled_plan_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TransactionView {
    /// `None` for a time effect due but not recorded yet.
    pub position: Option<u64>,
    pub recorded_at: Option<DateTime<Utc>>,
    /// When it took effect: the caller's time, or the instant it fell due.
    pub occurred_at: DateTime<Utc>,
    pub event_type: &'static str,
    pub detail: String,
    /// The change of `balance`, in credits.
    pub change: i64,
    pub balance_after: i64,
    pub available_after: i64,
    pub held_after: i64,
    pub debt_after: i64,
}

/// Replays `member_id`'s stream as of `as_of`.
pub fn replay(reader: &EventReader, member_id: &str, as_of: DateTime<Utc>) -> Result<MemberReplay> {
    if let Err(error) = validate::identifier("member", member_id) {
        bail!("{error}");
    }
    let stream_id = member_stream(member_id);
    let catalog = catalog_as_of(reader, as_of)?;
    let mut state = MemberState::default();
    let mut transactions = Vec::new();
    let mut position = 0;
    for recorded in reader.stream_events(&stream_id, Some(as_of), REPLAY_PAGE_EVENTS) {
        let recorded = recorded?;
        let event = codec::decode_member(&recorded)?;
        let occurred_at = recorded.metadata.occurred_at.unwrap_or(recorded.recorded_at);
        transactions.push(fold(&mut state, &event, Some(&recorded), occurred_at));
        position = recorded.position;
    }
    let events_replayed = transactions.len() as u64;
    if !state.is_registered() {
        return Err(not_registered(reader, &stream_id, member_id, as_of));
    }
    let context = Context { member_id, now: as_of, catalog: &catalog, usage: None };
    let due = decide(&state, &MemberCommand::AdvanceTime, &context)?;
    let pending_time_effects = due.len() as u64;
    for occurred in &due {
        transactions.push(fold(&mut state, &occurred.event, None, occurred.occurred_at));
    }
    Ok(MemberReplay {
        member_id: member_id.to_owned(),
        as_of,
        position,
        events_replayed,
        pending_time_effects,
        time_zone: state.profile.time_zone.clone(),
        currency: state.profile.currency.clone(),
        balance: state.balance().0,
        available: state.available().0,
        held: state.held().0,
        debt: state.debt().0,
        totals: TotalsView {
            granted: state.totals.granted.0,
            used: state.totals.used.0,
            debited: state.totals.debited.0,
            expired: state.totals.expired.0,
            debt_incurred: state.totals.debt_incurred.0,
        },
        grants: live_grants(&state),
        subscription: subscription(&state),
        transactions,
    })
}

fn catalog_as_of(reader: &EventReader, as_of: DateTime<Utc>) -> Result<Catalog> {
    let mut catalog = Catalog::default();
    for recorded in reader.stream_events(CATALOG_STREAM, Some(as_of), REPLAY_PAGE_EVENTS) {
        catalog.apply(&codec::decode_catalog(&recorded?)?);
    }
    Ok(catalog)
}

/// Why a member has no books as of `as_of`: unknown, or not yet there.
fn not_registered(reader: &EventReader, stream_id: &str, member_id: &str, as_of: DateTime<Utc>) -> anyhow::Error {
    let first = match reader.read_stream(stream_id, 1, 1) {
        Ok(first) => first,
        Err(error) => return error.into(),
    };
    match first.first() {
        None => anyhow::anyhow!("unknown member {member_id}: the log has no events for it"),
        Some(event) => anyhow::anyhow!(
            "member {member_id} did not exist yet at {}: its first event was recorded at {}",
            as_of.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            event.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    }
}

/// Applies one event and describes it with the balance it leads to.
fn fold(
    state: &mut MemberState,
    event: &MemberEvent,
    recorded: Option<&RecordedEvent>,
    occurred_at: DateTime<Utc>,
) -> TransactionView {
    let balance_before = state.balance().0;
    state.apply(event);
    TransactionView {
        position: recorded.map(|recorded| recorded.position),
        recorded_at: recorded.map(|recorded| recorded.recorded_at),
        occurred_at,
        event_type: event.event_type(),
        detail: describe(event, &state.profile.currency),
        change: state.balance().0 - balance_before,
        balance_after: state.balance().0,
        available_after: state.available().0,
        held_after: state.held().0,
        debt_after: state.debt().0,
    }
}

fn live_grants(state: &MemberState) -> Vec<GrantView> {
    let mut grants: Vec<GrantView> = state
        .grants
        .values()
        .filter(|grant| !grant.expired && grant.remaining.0 > 0)
        .map(|grant| GrantView {
            grant_id: grant.grant_id.clone(),
            source: grant.source.as_str(),
            category: category_name(grant.category),
            priority: grant.priority,
            amount: grant.amount.0,
            remaining: grant.remaining.0,
            held: grant.held.0,
            expires_at: grant.expires_at,
        })
        .collect();
    // Burn-down order: what is spent first comes first.
    grants.sort_by(|left, right| {
        (left.priority, left.expires_at.is_none(), left.expires_at, left.category != "promotional").cmp(&(
            right.priority,
            right.expires_at.is_none(),
            right.expires_at,
            right.category != "promotional",
        ))
    });
    grants
}

fn subscription(state: &MemberState) -> Option<SubscriptionView> {
    let subscription = state.subscription.as_ref()?;
    let plan = &subscription.terms.plan;
    Some(SubscriptionView {
        plan_id: plan.plan_id.clone(),
        plan_name: plan.name.clone(),
        plan_version: subscription.terms.plan_version,
        status: subscription.status.as_str(),
        billing: match subscription.billing {
            Billing::Tally => "tally",
            Billing::Stripe => "stripe",
        },
        period_start: subscription.period_start,
        period_end: subscription.period_end,
        period_price: subscription.period_price.0,
        currency: plan.currency.clone(),
        monthly_credits: plan.monthly_credits.0,
        cancel_at_period_end: subscription.cancel_at_period_end,
        scheduled_plan_id: subscription.scheduled_change.as_ref().map(|terms| terms.plan.plan_id.clone()),
    })
}

fn category_name(category: GrantCategory) -> &'static str {
    match category {
        GrantCategory::Paid => "paid",
        GrantCategory::Promotional => "promotional",
    }
}

fn instant(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// One line a finance reader can follow, from the event's own fields.
fn describe(event: &MemberEvent, currency: &str) -> String {
    match event {
        MemberEvent::MemberRegistered { time_zone, currency, .. } => {
            format!("registered (time zone {time_zone}, currency {currency})")
        }
        MemberEvent::MemberProfileChanged { time_zone, currency, .. } => {
            format!("profile changed (time zone {time_zone}, currency {currency})")
        }
        MemberEvent::SubscriptionStarted { terms, status, period_start, period_end, .. } => format!(
            "subscribed to {} ({}), period {} to {}",
            terms.plan.plan_id,
            status.as_str(),
            instant(*period_start),
            instant(*period_end)
        ),
        MemberEvent::SubscriptionPlanChanged { terms, proration_credits, proration_amount, .. } => format!(
            "upgraded to {}: {} prorated credits, {} on the next invoice",
            terms.plan.plan_id,
            grouped(proration_credits.0),
            money(proration_amount.0, currency)
        ),
        MemberEvent::SubscriptionDowngradeScheduled { terms, effective_at } => {
            format!("change to {} scheduled for {}", terms.plan.plan_id, instant(*effective_at))
        }
        MemberEvent::SubscriptionCancelScheduled { effective_at } => {
            format!("cancellation scheduled for {}", instant(*effective_at))
        }
        MemberEvent::SubscriptionRenewed { terms, period_start, period_end } => {
            format!("renewed on {}, period {} to {}", terms.plan.plan_id, instant(*period_start), instant(*period_end))
        }
        MemberEvent::SubscriptionPeriodClosed { period_end, debt_cleared, .. } => {
            format!(
                "period ending {} closed, {} credits of overage billed",
                instant(*period_end),
                grouped(debt_cleared.0)
            )
        }
        MemberEvent::SubscriptionPastDue { invoice_id } => match invoice_id {
            Some(invoice_id) => format!("past due ({invoice_id} unpaid)"),
            None => "past due".to_owned(),
        },
        MemberEvent::SubscriptionCanceled { immediately, .. } => {
            if *immediately {
                "canceled at once".to_owned()
            } else {
                "canceled at the period's end".to_owned()
            }
        }
        MemberEvent::SubscriptionReactivated {} => "reactivated".to_owned(),
        MemberEvent::CreditsGranted { grant_id, terms, transferred_from, usage_id, .. } => {
            let mut detail = format!("{} grant {grant_id} of {}", terms.source.as_str(), grouped(terms.amount.0));
            if let Some(expires_at) = terms.expires_at {
                detail.push_str(&format!(", expires {}", instant(expires_at)));
            }
            if !transferred_from.is_empty() {
                detail.push_str(" (carried over, not new credit)");
            }
            if let Some(usage_id) = usage_id {
                detail.push_str(&format!(" (refund of usage {usage_id})"));
            }
            if let Some(reason) = &terms.reason {
                detail.push_str(&format!(": {reason}"));
            }
            detail
        }
        MemberEvent::CreditsGrantScheduled { terms, effective_at, .. } => format!(
            "{} grant of {} scheduled for {}",
            terms.source.as_str(),
            grouped(terms.amount.0),
            instant(*effective_at)
        ),
        MemberEvent::CreditsDeducted { usage_id, amount, debt, unit_price, .. } => {
            let mut detail = format!("usage {usage_id}: {} credits", grouped(amount.0));
            if debt.0 > 0 {
                detail.push_str(&format!(", {} as overage at {} each", grouped(debt.0), money(unit_price.0, currency)));
            }
            detail
        }
        MemberEvent::CreditsDebited { amount, reason, .. } => {
            format!("debit of {} credits: {reason}", grouped(amount.0))
        }
        MemberEvent::CreditsExpired { grant_id, amount } => {
            format!("{} credits of grant {grant_id} expired", grouped(amount.0))
        }
        MemberEvent::CreditsReserved { reservation_id, amount, deadline, .. } => {
            format!("{} credits held for {reservation_id} until {}", grouped(amount.0), instant(*deadline))
        }
        MemberEvent::ReservationSettled { reservation_id, charged, released, .. } => {
            format!("{reservation_id} settled: {} charged, {} released", grouped(charged.0), grouped(released.0))
        }
        MemberEvent::ReservationReleased { reservation_id, released, reason, .. } => {
            let why = match reason {
                tally_ledger::domain::ReleaseReason::Released => "released",
                tally_ledger::domain::ReleaseReason::Expired => "timed out",
            };
            format!("{reservation_id} {why}: {} credits back", grouped(released.0))
        }
        MemberEvent::UsageRecorded { usage_id, metric, quantity, credits, .. } => {
            format!("usage {usage_id}: {} {metric} for {} credits", grouped(*quantity), grouped(credits.0))
        }
        MemberEvent::UsageReversed { usage_id, debt_reduced, refunded, .. } => format!(
            "usage {usage_id} reversed: {} off the debt, {} refunded",
            grouped(debt_reduced.0),
            grouped(refunded.0)
        ),
        MemberEvent::QueryExecuted { execution, credits, .. } => {
            format!("query {}/{} ran for {} credits", execution.integration_id, execution.query_id, grouped(credits.0))
        }
        MemberEvent::InvoiceIssued { invoice_id, total, currency, debt_cleared, .. } => {
            let mut detail = format!("invoice {invoice_id} issued for {}", money(total.0, currency));
            if debt_cleared.0 > 0 {
                detail.push_str(&format!(", billing {} credits of overage", grouped(debt_cleared.0)));
            }
            detail
        }
        MemberEvent::PaymentSucceeded { invoice_id, amount } => {
            format!("invoice {invoice_id} paid, {}", money(amount.0, currency))
        }
        MemberEvent::PaymentFailed { invoice_id, reason } => match reason {
            Some(reason) => format!("payment of {invoice_id} failed: {reason}"),
            None => format!("payment of {invoice_id} failed"),
        },
        MemberEvent::InvoiceVoided { invoice_id } => format!("invoice {invoice_id} voided"),
        MemberEvent::InvoiceMarkedUncollectible { invoice_id } => format!("invoice {invoice_id} marked uncollectible"),
        MemberEvent::SubscriptionCancelRevoked {} => "scheduled cancel revoked".to_owned(),
        MemberEvent::StripeEventApplied { stripe_event_id, event_type, stale, .. } => {
            let stale = if *stale { " (older than what was applied: no change)" } else { "" };
            format!("Stripe event {stripe_event_id} ({event_type}){stale}")
        }
        MemberEvent::CheckoutPaymentFailed { stripe_checkout_session_id, credits, price } => format!(
            "checkout {stripe_checkout_session_id}: the delayed payment of {} for {} credits failed; nothing granted",
            money(price.0, currency),
            grouped(credits.0)
        ),
        MemberEvent::StripeRefundRecorded { stripe_payment, refunded, parts, debt, written_off, .. } => {
            let taken: i64 = parts.iter().map(|part| part.amount.0).sum();
            let mut detail = format!("Stripe payment {stripe_payment}: {} refunded", money(refunded.0, currency));
            if taken > 0 || debt.0 > 0 || written_off.0 > 0 {
                detail.push_str(&format!(
                    "; {} credits taken back, {} as debt, {} written off",
                    grouped(taken),
                    grouped(debt.0),
                    grouped(written_off.0)
                ));
            }
            detail
        }
        MemberEvent::AlertRulesChanged { .. } => "alert rules changed".to_owned(),
        MemberEvent::AlertTriggered { alert_id, .. } => format!("alert {alert_id} raised"),
        MemberEvent::AlertResolved { alert_id, .. } => format!("alert {alert_id} resolved"),
        MemberEvent::WebhookEndpointCreated { endpoint_id, .. } => format!("webhook endpoint {endpoint_id} added"),
        MemberEvent::WebhookEndpointChanged { endpoint_id, .. } => format!("webhook endpoint {endpoint_id} changed"),
        MemberEvent::WebhookEndpointDisabled { endpoint_id, reason } => {
            format!("webhook endpoint {endpoint_id} disabled: {reason}")
        }
        MemberEvent::WebhookSecretRotated { endpoint_id, .. } => {
            format!("webhook endpoint {endpoint_id}'s signing secret rotated")
        }
        MemberEvent::WebhookEndpointDeleted { endpoint_id } => format!("webhook endpoint {endpoint_id} deleted"),
    }
}

/// The replay as a finance reader wants it: the position, the subscription,
/// the grants in burn order, and every transaction with the balance after it.
pub fn render_table(replay: &MemberReplay) -> String {
    let mut out = String::new();
    out.push_str(&format!("Member {}, as of {} UTC\n", replay.member_id, instant(replay.as_of)));
    out.push_str(&format!(
        "Replayed {} events recorded up to then (through position {}).\n",
        replay.events_replayed, replay.position
    ));
    if replay.pending_time_effects > 0 {
        out.push_str(&format!(
            "{} effects of time had fallen due by then but were not recorded yet; they are included (marked \"due\").\n",
            replay.pending_time_effects
        ));
    }
    out.push('\n');

    let mut figures = Table::new(&[("", Align::Left), ("CREDITS", Align::Right)]);
    for (label, value) in [
        ("Balance", replay.balance),
        ("  available", replay.available),
        ("  held", replay.held),
        ("  debt", -replay.debt),
        ("Granted", replay.totals.granted),
        ("Used", replay.totals.used),
        ("Debited", replay.totals.debited),
        ("Expired", replay.totals.expired),
    ] {
        figures.row(vec![label.to_owned(), grouped(value)]);
    }
    out.push_str(&figures.render(0));
    out.push('\n');

    match &replay.subscription {
        Some(subscription) => {
            out.push_str(&format!(
                "Subscription: {} ({}, version {}), {}, billed by {}\n",
                subscription.plan_id,
                subscription.plan_name,
                subscription.plan_version,
                subscription.status,
                subscription.billing
            ));
            out.push_str(&format!(
                "  period {} to {} UTC, fee {}, {} credits a month\n",
                instant(subscription.period_start),
                instant(subscription.period_end),
                money(subscription.period_price, &subscription.currency),
                grouped(subscription.monthly_credits)
            ));
            match (subscription.cancel_at_period_end, subscription.status) {
                (true, "canceled") => out.push_str("  ended at the period's end, as asked\n"),
                (true, _) => out.push_str("  cancels at the period's end\n"),
                _ => {}
            }
            if let Some(plan_id) = &subscription.scheduled_plan_id {
                out.push_str(&format!("  moves to {plan_id} at the period's end\n"));
            }
        }
        None => out.push_str("Subscription: none\n"),
    }
    out.push('\n');

    if replay.grants.is_empty() {
        out.push_str("Live grants: none\n");
    } else {
        out.push_str("Live grants, in the order they are spent:\n");
        let mut grants = Table::new(&[
            ("GRANT", Align::Left),
            ("SOURCE", Align::Left),
            ("CATEGORY", Align::Left),
            ("PRIORITY", Align::Right),
            ("GRANTED", Align::Right),
            ("REMAINING", Align::Right),
            ("HELD", Align::Right),
            ("EXPIRES (UTC)", Align::Left),
        ]);
        for grant in &replay.grants {
            grants.row(vec![
                grant.grant_id.clone(),
                grant.source.to_owned(),
                grant.category.to_owned(),
                grant.priority.to_string(),
                grouped(grant.amount),
                grouped(grant.remaining),
                grouped(grant.held),
                grant.expires_at.map_or_else(|| "never".to_owned(), instant),
            ]);
        }
        out.push_str(&grants.render(2));
    }
    out.push('\n');

    out.push_str("Transactions, oldest first:\n");
    let mut transactions = Table::new(&[
        ("POSITION", Align::Right),
        ("OCCURRED (UTC)", Align::Left),
        ("EVENT", Align::Left),
        ("DETAIL", Align::Left),
        ("CHANGE", Align::Right),
        ("BALANCE", Align::Right),
    ]);
    for transaction in &replay.transactions {
        transactions.row(vec![
            transaction.position.map_or_else(|| "due".to_owned(), |position| position.to_string()),
            instant(transaction.occurred_at),
            transaction.event_type.to_owned(),
            transaction.detail.clone(),
            signed(transaction.change),
            grouped(transaction.balance_after),
        ]);
    }
    out.push_str(&transactions.render(2));
    out
}
