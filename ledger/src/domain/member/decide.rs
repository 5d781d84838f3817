//! The member decider: every rule of the ledger lives here, in pure
//! functions. `decide` reads no clock and does no I/O: `now`, the catalog and
//! what the store knows of a usage id come in through [`Context`].
//!
//! A decision first runs whatever fell due up to `now` (expiries, reservation
//! timeouts, period closes and renewals, scheduled grants), so that a command
//! at T sees everything due at T done; then it decides the command itself.
//! Events are applied to a draft state as they are emitted, so each later
//! step decides against the state the earlier ones left.

use super::commands::*;
use super::events::*;
use super::state::*;
use crate::domain::amount::{Credits, MinorUnits, prorate};
use crate::domain::catalog::{Catalog, PlanTerms};
use crate::domain::error::DomainError;
use crate::domain::limits::*;
use crate::domain::validate;
use chrono::{Duration, Months};

/// Everything a decision needs from outside the member's own stream.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    pub member_id: &'a str,
    pub now: Timestamp,
    pub catalog: &'a Catalog,
    /// What the store's usage index holds for the command's usage id
    /// (`RecordUsage`, `ReverseUsage`); `None` for other commands.
    pub usage: Option<UsageFacts>,
}

pub type Decision = Vec<Occurred<MemberEvent>>;

/// Decide a command against a member's state. On success the events to
/// append, in order (possibly none: a retried settle, an unchanged profile);
/// on rejection nothing is to be written.
pub fn decide(state: &MemberState, command: &MemberCommand, context: &Context) -> Result<Decision, DomainError> {
    let mut draft = Draft { state: state.clone(), events: Vec::new(), now: context.now, running_due: false };
    if !state.is_registered() {
        if !command.registers_implicitly() {
            return Err(DomainError::MemberNotFound { member_id: context.member_id.to_owned() });
        }
        validate::identifier("member_id", context.member_id)?;
        if !matches!(command, MemberCommand::Register(_)) {
            let mut profile = MemberProfile::default();
            if let MemberCommand::StartSubscription { plan_id, .. } = command
                && let Some(entry) = context.catalog.plan(plan_id)
            {
                profile.currency = entry.terms.plan.currency.clone();
            }
            draft.register(context.member_id, profile);
        }
    }
    run_due(&mut draft, context.now, context.catalog);
    decide_command(&mut draft, command, context)?;
    Ok(draft.events)
}

/// The state as of `now`: what fell due applied, nothing written. Reads
/// that must not lag behind time (a balance check) use it.
pub fn state_at(state: &MemberState, now: Timestamp, catalog: &Catalog) -> MemberState {
    let mut draft = Draft { state: state.clone(), events: Vec::new(), now, running_due: false };
    run_due(&mut draft, now, catalog);
    draft.state
}

/// The answer to "would a deduction of these credits be allowed now?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckOutcome {
    pub allowed: bool,
    pub requested: Credits,
    pub available: Credits,
    /// How much more debt (overage) the plan allows now: zero when the plan
    /// has no overage, the member is past due, or the limit is reached.
    pub overage_room: Credits,
    /// How much of the deduction would become debt; zero when refused.
    pub would_incur_debt: Credits,
    /// Why it would be refused; `None` when allowed.
    pub refusal: Option<CheckRefusal>,
}

/// Why a check says no, most specific first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckRefusal {
    /// Not enough credits, and the plan (or the lack of one) allows no overage.
    InsufficientCredits,
    /// The plan allows overage, but not while the member is past due.
    PastDueNoOverage,
    /// The plan allows overage, but the shortfall is beyond what is left of its limit.
    OverageLimitReached,
}

impl CheckRefusal {
    /// The stable code a client branches on.
    pub fn code(self) -> &'static str {
        match self {
            CheckRefusal::InsufficientCredits => "insufficient_credits",
            CheckRefusal::PastDueNoOverage => "past_due_no_overage",
            CheckRefusal::OverageLimitReached => "overage_limit_reached",
        }
    }
}

pub fn check(state: &MemberState, credits: Credits, context: &Context) -> Result<CheckOutcome, DomainError> {
    if !state.is_registered() {
        return Err(DomainError::MemberNotFound { member_id: context.member_id.to_owned() });
    }
    validate::range("credits", credits.0, 1, COMMAND_CREDITS_MAX)?;
    let state = state_at(state, context.now, context.catalog);
    let available = state.available();
    let overage_room = debt_room(&state);
    let outcome = CheckOutcome {
        allowed: true,
        requested: credits,
        available,
        overage_room: overage_room.unwrap_or(Credits::ZERO),
        would_incur_debt: Credits::ZERO,
        refusal: None,
    };
    match plan_spend(&state, credits, overage_room) {
        Ok(spend) => Ok(CheckOutcome { would_incur_debt: spend.debt, ..outcome }),
        Err(_) => Ok(CheckOutcome { allowed: false, refusal: Some(check_refusal(&state, overage_room)), ..outcome }),
    }
}

fn check_refusal(state: &MemberState, overage_room: Option<Credits>) -> CheckRefusal {
    let overage_plan = state.subscription.as_ref().filter(|subscription| subscription.terms.plan.overage.allowed);
    match (overage_plan, overage_room) {
        (Some(_), Some(_)) => CheckRefusal::OverageLimitReached,
        (Some(subscription), None) if subscription.status == SubscriptionStatus::PastDue => {
            CheckRefusal::PastDueNoOverage
        }
        _ => CheckRefusal::InsufficientCredits,
    }
}

/// The stream id of a member.
pub fn member_stream(member_id: &str) -> String {
    format!("member-{member_id}")
}

/// The end of period `index` (0 = the first) of a subscription anchored at
/// `anchor`: calendar months, the day clamped to the month's end
/// (Jan 31 → Feb 28 → Mar 31), always counted from the anchor.
pub fn period_end(anchor: Timestamp, index: u32) -> Timestamp {
    anchor.checked_add_months(Months::new(index + 1)).expect("period end within chrono's range")
}

pub(super) struct Draft {
    pub(super) state: MemberState,
    events: Decision,
    pub(super) now: Timestamp,
    /// Set while running what fell due, so those events are marked `by_time`.
    running_due: bool,
}

impl Draft {
    fn emit(&mut self, occurred_at: Timestamp, event: MemberEvent) {
        self.state.apply(&event);
        self.events.push(Occurred { occurred_at, by_time: self.running_due, event });
    }

    pub(super) fn emit_now(&mut self, event: MemberEvent) {
        self.emit(self.now, event);
    }

    /// The version the next emitted event will have; ids made here derive
    /// from it, never from a random source, so a replay makes the same ids.
    pub(super) fn next_version(&self) -> u64 {
        self.state.version + 1
    }

    fn register(&mut self, member_id: &str, profile: MemberProfile) {
        self.emit_now(MemberEvent::MemberRegistered {
            member_id: member_id.to_owned(),
            time_zone: profile.time_zone,
            currency: profile.currency,
            stripe_customer_id: profile.stripe_customer_id,
        });
    }

    fn grant(
        &mut self,
        occurred_at: Timestamp,
        terms: GrantTerms,
        transferred_from: Vec<GrantPart>,
        usage_id: Option<String>,
    ) {
        self.grant_scheduled(occurred_at, terms, transferred_from, usage_id, None);
    }

    fn grant_scheduled(
        &mut self,
        occurred_at: Timestamp,
        terms: GrantTerms,
        transferred_from: Vec<GrantPart>,
        usage_id: Option<String>,
        schedule_id: Option<String>,
    ) {
        let grant_id = format!("g{}", self.next_version());
        self.emit(
            occurred_at,
            MemberEvent::CreditsGranted {
                grant_id,
                terms,
                transferred_from,
                usage_id,
                schedule_id,
                stripe_period_start: None,
                stripe_checkout_session_id: None,
                stripe_invoice_item: false,
                stripe_payment: None,
            },
        );
    }

    fn allocation(&mut self, occurred_at: Timestamp, amount: Credits, expires_at: Timestamp) {
        if amount.is_positive() {
            let terms = ledger_grant(GrantSource::MonthlyAllocation, amount, Some(expires_at));
            self.grant(occurred_at, terms, Vec::new(), None);
        }
    }
}

fn ledger_grant(source: GrantSource, amount: Credits, expires_at: Option<Timestamp>) -> GrantTerms {
    GrantTerms {
        source,
        category: source.default_category(),
        amount,
        priority: source.default_priority(),
        expires_at,
        reason: None,
        price: None,
    }
}

// ---------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------

/// The earliest instant at which something falls due for this member: the
/// scheduler's index of members to visit.
pub fn next_due(state: &MemberState) -> Option<Timestamp> {
    let deadlines = state.reservations.values().map(|reservation| reservation.deadline);
    let expiries = state.grants.values().filter(|grant| !grant.expired).filter_map(|grant| grant.expires_at);
    let scheduled = state.scheduled_grants.values().map(|(effective_at, _)| *effective_at);
    let period_end = state
        .subscription
        .as_ref()
        .filter(|subscription| subscription.is_live() && !subscription.period_closed)
        .map(|subscription| subscription.period_end);
    deadlines.chain(expiries).chain(scheduled).chain(period_end).min()
}

/// Process every due instant up to `now`, earliest first. At one instant,
/// per DESIGN.md: reservation timeouts → the period's close (rollover or
/// expiry of the allocation, invoice, scheduled change or cancel, the new
/// allocation) → other expiries → scheduled grants.
fn run_due(draft: &mut Draft, now: Timestamp, catalog: &Catalog) {
    draft.running_due = true;
    let mut steps = 0;
    while let Some(instant) = next_due(&draft.state).filter(|instant| *instant <= now) {
        steps += 1;
        assert!(steps <= DUE_STEPS_MAX, "member has more than {DUE_STEPS_MAX} due instants: a scheduling bug");

        let timed_out: Vec<String> = draft
            .state
            .reservations
            .values()
            .filter(|reservation| reservation.deadline <= instant)
            .map(|reservation| reservation.reservation_id.clone())
            .collect();
        for reservation_id in timed_out {
            release_reservation(draft, instant, &reservation_id, ReleaseReason::Expired);
        }

        if let Some(subscription) = &draft.state.subscription
            && subscription.is_live()
            && !subscription.period_closed
            && subscription.period_end <= instant
        {
            close_period(draft, instant, catalog);
        }

        let expiring: Vec<String> = draft
            .state
            .grants
            .values()
            .filter(|grant| !grant.expired && grant.expires_at.is_some_and(|expires_at| expires_at <= instant))
            .map(|grant| grant.grant_id.clone())
            .collect();
        for grant_id in expiring {
            expire_grant(draft, instant, &grant_id);
        }

        let falling_due: Vec<(String, GrantTerms)> = draft
            .state
            .scheduled_grants
            .iter()
            .filter(|(_, (effective_at, _))| *effective_at <= instant)
            .map(|(schedule_id, (_, terms))| (schedule_id.clone(), terms.clone()))
            .collect();
        for (schedule_id, terms) in falling_due {
            grant_with_invoice(draft, instant, terms, Some(schedule_id));
        }
    }
    draft.running_due = false;
}

/// Expire what is spendable of a grant. A held part lives on, marked
/// expired, until its reservation ends.
fn expire_grant(draft: &mut Draft, instant: Timestamp, grant_id: &str) {
    let Some(grant) = draft.state.grants.get(grant_id) else { return };
    let amount = grant.remaining.minus(grant.held);
    draft.emit(instant, MemberEvent::CreditsExpired { grant_id: grant_id.to_owned(), amount });
}

/// Close the current period of a live subscription at `instant` (its end).
fn close_period(draft: &mut Draft, instant: Timestamp, catalog: &Catalog) {
    let subscription = draft.state.subscription.clone().expect("close_period needs a subscription");
    let next_period_end = match subscription.billing {
        Billing::Tally => period_end(subscription.anchor, subscription.period_index + 1),
        Billing::Stripe => subscription.period_end.checked_add_months(Months::new(1)).expect("in range"),
    };

    let rollover = &subscription.terms.plan.rollover;
    let rollover_cap =
        if rollover.enabled && !subscription.cancel_at_period_end { rollover.max_credits } else { Credits::ZERO };
    roll_over_or_expire_allocation(draft, instant, instant, rollover_cap, next_period_end);

    match subscription.billing {
        Billing::Tally => {
            let invoice = period_invoice(&draft.state, &subscription, instant);
            draft.emit(instant, invoice);
        }
        Billing::Stripe => {
            let debt_cleared = draft.state.debt();
            let overage_lines = overage_lines(&draft.state.debt);
            draft.emit(
                instant,
                MemberEvent::SubscriptionPeriodClosed {
                    period_start: subscription.period_start,
                    period_end: subscription.period_end,
                    debt_cleared,
                    overage_lines,
                },
            );
            return;
        }
    }

    if subscription.cancel_at_period_end {
        draft.emit(instant, MemberEvent::SubscriptionCanceled { canceled_at: instant, immediately: false });
        return;
    }
    // A revision of the plan taking effect reaches the subscriber here too.
    let terms = latest_terms(subscription.scheduled_change.as_ref().unwrap_or(&subscription.terms), catalog);
    let monthly_credits = terms.plan.monthly_credits;
    draft.emit(instant, MemberEvent::SubscriptionRenewed { terms, period_start: instant, period_end: next_period_end });
    draft.allocation(instant, monthly_credits, next_period_end);
}

/// A plan revision reaches a subscriber at renewal, unless it changed the
/// currency (which the catalog refuses anyway).
fn latest_terms(current: &PlanTerms, catalog: &Catalog) -> PlanTerms {
    match catalog.plan(&current.plan.plan_id) {
        Some(entry) if entry.terms.plan.currency == current.plan.currency => entry.terms.clone(),
        _ => current.clone(),
    }
}

/// The unheld rest of the ending period's allocation grants rolls over up to
/// `cap` as one `rollover` grant (a transfer); the rest expires.
/// At `instant`, roll over (up to `cap`) or expire the allocation grants of
/// the period ending at `period_end` (the same instant, unless Stripe renewed
/// ahead of tally's clock).
fn roll_over_or_expire_allocation(
    draft: &mut Draft,
    instant: Timestamp,
    period_end: Timestamp,
    cap: Credits,
    rollover_expires_at: Timestamp,
) {
    let mut allocation: Vec<&Grant> = draft
        .state
        .grants
        .values()
        .filter(|grant| grant.source == GrantSource::MonthlyAllocation && !grant.expired)
        .filter(|grant| grant.expires_at.is_some_and(|expires_at| expires_at <= period_end.max(instant)))
        .collect();
    allocation.sort_by_key(|grant| burn_order_key(grant));
    let allocation_ids: Vec<String> = allocation.iter().map(|grant| grant.grant_id.clone()).collect();

    let mut to_roll = cap;
    let mut transferred_from = Vec::new();
    for grant in &allocation {
        let part = grant.spendable().min(to_roll);
        if part.is_positive() {
            transferred_from.push(GrantPart { grant_id: grant.grant_id.clone(), amount: part });
            to_roll = to_roll.minus(part);
        }
    }
    let rolled: Credits = transferred_from.iter().map(|part| part.amount).sum();
    if rolled.is_positive() {
        let terms = ledger_grant(GrantSource::Rollover, rolled, Some(rollover_expires_at));
        draft.grant(instant, terms, transferred_from, None);
    }
    for grant_id in allocation_ids {
        expire_grant(draft, instant, &grant_id);
    }
}

/// The invoice of the period that ends at `instant`: its fee (the price at
/// period start), the lines gathered during the period, and the overage.
fn period_invoice(state: &MemberState, subscription: &Subscription, instant: Timestamp) -> MemberEvent {
    let mut lines = vec![InvoiceLine {
        kind: InvoiceLineKind::Fee,
        description: format!("{} subscription", subscription.period_plan_name),
        quantity: 1,
        unit_amount: subscription.period_price,
        amount: subscription.period_price,
    }];
    lines.extend(state.period_lines.iter().cloned());
    lines.extend(overage_lines(&state.debt));
    let total = lines.iter().map(|line| line.amount).sum();
    MemberEvent::InvoiceIssued {
        invoice_id: next_invoice_id(state),
        period_start: Some(subscription.period_start),
        period_end: Some(instant),
        currency: subscription.terms.plan.currency.clone(),
        lines,
        total,
        debt_cleared: state.debt(),
        stripe_invoice_id: None,
    }
}

/// One overage line per unit price in force when the debt was incurred, in
/// the order the prices first appeared.
fn overage_lines(debt: &[DebtEntry]) -> Vec<InvoiceLine> {
    let mut by_price: Vec<(MinorUnits, Credits)> = Vec::new();
    for entry in debt {
        match by_price.iter_mut().find(|(unit_price, _)| *unit_price == entry.unit_price) {
            Some((_, credits)) => *credits = credits.plus(entry.credits),
            None => by_price.push((entry.unit_price, entry.credits)),
        }
    }
    by_price
        .into_iter()
        .map(|(unit_price, credits)| InvoiceLine {
            kind: InvoiceLineKind::Overage,
            description: format!("Overage: {credits} credits"),
            quantity: credits.0,
            unit_amount: unit_price,
            amount: MinorUnits(credits.0.checked_mul(unit_price.0).expect("limits bound overage amounts")),
        })
        .collect()
}

pub(super) fn next_invoice_id(state: &MemberState) -> String {
    let member_id = state.member_id.as_deref().expect("invoices belong to registered members");
    format!("inv_{member_id}_{}", state.invoices_issued + 1)
}

// ---------------------------------------------------------------------------
// Spending
// ---------------------------------------------------------------------------

/// Burn-down order: lowest priority number, then soonest expiry (none last),
/// then promotional before paid, then oldest.
fn burn_order_key(grant: &Grant) -> (u8, bool, Option<Timestamp>, GrantCategory, u64) {
    (grant.priority, grant.expires_at.is_none(), grant.expires_at, grant.category, grant.granted_version)
}

fn grants_in_burn_order(state: &MemberState) -> Vec<&Grant> {
    let mut grants: Vec<&Grant> = state.grants.values().filter(|grant| grant.spendable().is_positive()).collect();
    grants.sort_by_key(|grant| burn_order_key(grant));
    grants
}

struct Spend {
    parts: Vec<GrantPart>,
    debt: Credits,
}

/// How much more debt the member may take on now, if any.
fn debt_room(state: &MemberState) -> Option<Credits> {
    let subscription = state.subscription.as_ref().filter(|subscription| subscription.allows_overage())?;
    let limit = subscription.terms.plan.overage.limit_credits;
    Some(limit.checked_sub(state.debt()).unwrap_or(Credits::ZERO).max(Credits::ZERO))
}

/// Take `amount` from spendable grants in burn order; a shortfall becomes
/// debt if `debt_room` covers it, else the whole deduction is refused.
fn plan_spend(state: &MemberState, amount: Credits, debt_room: Option<Credits>) -> Result<Spend, DomainError> {
    let mut parts = Vec::new();
    let mut wanted = amount;
    for grant in grants_in_burn_order(state) {
        if wanted.is_zero() {
            break;
        }
        let part = grant.spendable().min(wanted);
        parts.push(GrantPart { grant_id: grant.grant_id.clone(), amount: part });
        wanted = wanted.minus(part);
    }
    if wanted.is_zero() {
        return Ok(Spend { parts, debt: Credits::ZERO });
    }
    match debt_room {
        Some(room) if wanted <= room => Ok(Spend { parts, debt: wanted }),
        _ => Err(DomainError::InsufficientCredits { requested: amount, available: state.available() }),
    }
}

/// Split a reservation's holds into the part charged (taken in hold order)
/// and the part released.
fn split_holds(holds: &[GrantPart], charged: Credits) -> (Vec<GrantPart>, Vec<GrantPart>) {
    let mut to_charge = charged;
    let mut charged_parts = Vec::new();
    let mut released_parts = Vec::new();
    for hold in holds {
        let charge = hold.amount.min(to_charge);
        to_charge = to_charge.minus(charge);
        if charge.is_positive() {
            charged_parts.push(GrantPart { grant_id: hold.grant_id.clone(), amount: charge });
        }
        let release = hold.amount.minus(charge);
        if release.is_positive() {
            released_parts.push(GrantPart { grant_id: hold.grant_id.clone(), amount: release });
        }
    }
    (charged_parts, released_parts)
}

/// Credit released onto a grant that expired meanwhile expires at once.
fn expire_released_parts(draft: &mut Draft, instant: Timestamp, released_parts: &[GrantPart]) {
    for part in released_parts {
        if draft.state.grants.get(&part.grant_id).is_some_and(|grant| grant.expired) {
            draft.emit(instant, MemberEvent::CreditsExpired { grant_id: part.grant_id.clone(), amount: part.amount });
        }
    }
}

fn release_reservation(draft: &mut Draft, instant: Timestamp, reservation_id: &str, reason: ReleaseReason) {
    let reservation = draft.state.reservations.get(reservation_id).cloned().expect("releasing an open reservation");
    let released_parts = reservation.holds.clone();
    draft.emit(
        instant,
        MemberEvent::ReservationReleased {
            reservation_id: reservation_id.to_owned(),
            reason,
            released: reservation.amount,
            released_parts: released_parts.clone(),
        },
    );
    expire_released_parts(draft, instant, &released_parts);
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

fn decide_command(draft: &mut Draft, command: &MemberCommand, context: &Context) -> Result<(), DomainError> {
    match command {
        MemberCommand::Register(profile) => register_or_change_profile(draft, profile, context),
        MemberCommand::StartSubscription { plan_id, billing, stripe_subscription_id } => {
            start_subscription(draft, plan_id, *billing, stripe_subscription_id.clone(), context)
        }
        MemberCommand::ChangePlan { plan_id } => change_plan(draft, plan_id, context),
        MemberCommand::CancelSubscription { at_period_end } => cancel_subscription(draft, *at_period_end),
        MemberCommand::GrantCredits(grant) => grant_credits(draft, grant),
        MemberCommand::DebitCredits { amount, reason } => debit_credits(draft, *amount, reason),
        MemberCommand::RecordUsage(usage) => record_usage(draft, usage, context.usage),
        MemberCommand::ReverseUsage { usage_id, reason } => reverse_usage(draft, usage_id, reason, context.usage),
        MemberCommand::Reserve { amount, ttl_s } => reserve(draft, *amount, *ttl_s),
        MemberCommand::Settle { reservation_id, amount, query } => settle(draft, reservation_id, *amount, query),
        MemberCommand::Release { reservation_id } => release(draft, reservation_id),
        MemberCommand::PayInvoice { invoice_id } => pay_invoice(draft, invoice_id),
        MemberCommand::RecordPaymentFailed { invoice_id, reason } => record_payment_failed(draft, invoice_id, reason),
        MemberCommand::VoidInvoice { invoice_id } => void_invoice(draft, invoice_id),
        MemberCommand::MarkInvoiceUncollectible { invoice_id } => mark_uncollectible(draft, invoice_id),
        MemberCommand::SetAlertRules { overrides } => set_alert_rules(draft, overrides),
        MemberCommand::RaiseAlert(notice) => raise_alert(draft, notice),
        MemberCommand::ResolveAlert(notice) => resolve_alert(draft, notice),
        MemberCommand::CreateWebhookEndpoint { endpoint_id, config, secret } => {
            create_webhook_endpoint(draft, endpoint_id, config, secret)
        }
        MemberCommand::ChangeWebhookEndpoint { endpoint_id, config } => {
            change_webhook_endpoint(draft, endpoint_id, config)
        }
        MemberCommand::DisableWebhookEndpoint { endpoint_id, reason } => {
            disable_webhook_endpoint(draft, endpoint_id, reason)
        }
        MemberCommand::RotateWebhookSecret { endpoint_id, secret, previous_until } => {
            rotate_webhook_secret(draft, endpoint_id, secret, *previous_until)
        }
        MemberCommand::DeleteWebhookEndpoint { endpoint_id } => {
            webhook_endpoint(&draft.state, endpoint_id)?;
            draft.emit_now(MemberEvent::WebhookEndpointDeleted { endpoint_id: endpoint_id.clone() });
            Ok(())
        }
        MemberCommand::AdvanceTime => Ok(()),
        MemberCommand::Stripe(command) => super::stripe::decide_stripe(draft, command, context.catalog),
    }
}

fn validate_profile(profile: &MemberProfile) -> Result<(), DomainError> {
    validate::time_zone("time_zone", &profile.time_zone)?;
    validate::currency("currency", &profile.currency)?;
    if let Some(customer_id) = &profile.stripe_customer_id {
        validate::identifier("stripe_customer_id", customer_id)?;
    }
    Ok(())
}

fn register_or_change_profile(
    draft: &mut Draft,
    profile: &MemberProfile,
    context: &Context,
) -> Result<(), DomainError> {
    validate_profile(profile)?;
    if !draft.state.is_registered() {
        draft.register(context.member_id, profile.clone());
        return Ok(());
    }
    if draft.state.profile == *profile {
        return Ok(());
    }
    if profile.currency != draft.state.profile.currency
        && draft.state.subscription.as_ref().is_some_and(Subscription::is_live)
    {
        return Err(DomainError::invalid("currency", "cannot change while a subscription is active"));
    }
    draft.emit_now(MemberEvent::MemberProfileChanged {
        time_zone: profile.time_zone.clone(),
        currency: profile.currency.clone(),
        stripe_customer_id: profile.stripe_customer_id.clone(),
    });
    Ok(())
}

fn choosable_plan(plan_id: &str, context: &Context) -> Result<PlanTerms, DomainError> {
    validate::identifier("plan_id", plan_id)?;
    let entry =
        context.catalog.plan(plan_id).ok_or_else(|| DomainError::PlanNotFound { plan_id: plan_id.to_owned() })?;
    if entry.retired {
        return Err(DomainError::invalid("plan_id", "the plan is retired and cannot be newly chosen"));
    }
    Ok(entry.terms.clone())
}

fn start_subscription(
    draft: &mut Draft,
    plan_id: &str,
    billing: Billing,
    stripe_subscription_id: Option<String>,
    context: &Context,
) -> Result<(), DomainError> {
    let terms = choosable_plan(plan_id, context)?;
    if draft.state.subscription.as_ref().is_some_and(Subscription::is_live) {
        return Err(DomainError::invalid("plan_id", "the member already has an active subscription"));
    }
    if terms.plan.currency != draft.state.profile.currency {
        return Err(DomainError::invalid("plan_id", "the plan's currency differs from the member's"));
    }
    let now = draft.now;
    let end = period_end(now, 0);
    let monthly_credits = terms.plan.monthly_credits;
    draft.emit_now(MemberEvent::SubscriptionStarted {
        terms,
        status: SubscriptionStatus::Active,
        billing,
        period_start: now,
        period_end: end,
        stripe_subscription_id,
    });
    // Stripe-managed credits come with Stripe's paid invoices.
    if billing == Billing::Tally {
        draft.allocation(now, monthly_credits, end);
    }
    Ok(())
}

fn live_subscription(state: &MemberState) -> Result<&Subscription, DomainError> {
    state
        .subscription
        .as_ref()
        .filter(|subscription| subscription.is_live())
        .ok_or_else(|| DomainError::SubscriptionNotFound { member_id: state.member_id.clone().unwrap_or_default() })
}

fn change_plan(draft: &mut Draft, plan_id: &str, context: &Context) -> Result<(), DomainError> {
    let subscription = live_subscription(&draft.state)?.clone();
    let terms = choosable_plan(plan_id, context)?;
    if terms.plan.plan_id == subscription.terms.plan.plan_id {
        return Err(DomainError::invalid("plan_id", "the member is already on this plan"));
    }
    if terms.plan.currency != subscription.terms.plan.currency {
        return Err(DomainError::invalid("plan_id", "a plan change cannot change the currency"));
    }
    if terms.plan.price <= subscription.terms.plan.price {
        draft.emit_now(MemberEvent::SubscriptionDowngradeScheduled { terms, effective_at: subscription.period_end });
        return Ok(());
    }

    let period_seconds = (subscription.period_end - subscription.period_start).num_seconds();
    let remaining_seconds = (subscription.period_end - draft.now).num_seconds().clamp(0, period_seconds);
    let credits_difference = terms.plan.monthly_credits.0 - subscription.terms.plan.monthly_credits.0;
    let proration_credits = Credits(prorate(credits_difference.max(0), remaining_seconds, period_seconds));
    let proration_amount = match subscription.billing {
        Billing::Tally => {
            MinorUnits(prorate(terms.plan.price.0 - subscription.terms.plan.price.0, remaining_seconds, period_seconds))
        }
        Billing::Stripe => MinorUnits::ZERO,
    };
    draft.emit_now(MemberEvent::SubscriptionPlanChanged {
        terms,
        proration_credits,
        proration_amount,
        remaining_seconds,
        period_seconds,
    });
    draft.allocation(draft.now, proration_credits, subscription.period_end);
    Ok(())
}

fn cancel_subscription(draft: &mut Draft, at_period_end: bool) -> Result<(), DomainError> {
    let subscription = live_subscription(&draft.state)?.clone();
    if at_period_end {
        // Already scheduled: the caller's intent holds; nothing to write.
        if subscription.cancel_at_period_end {
            return Ok(());
        }
        draft.emit_now(MemberEvent::SubscriptionCancelScheduled { effective_at: subscription.period_end });
        return Ok(());
    }

    let now = draft.now;
    match subscription.billing {
        Billing::Tally => {
            lapse_allocations(draft);
            let invoice = period_invoice(&draft.state, &subscription, now);
            draft.emit_now(invoice);
        }
        Billing::Stripe if subscription.period_closed => lapse_allocations(draft),
        Billing::Stripe => close_period_now(draft, &subscription, None),
    }
    draft.emit_now(MemberEvent::SubscriptionCanceled { canceled_at: now, immediately: true });
    Ok(())
}

/// Cancel now lapses what the subscription gave: allocation and rollover.
pub(super) fn lapse_allocations(draft: &mut Draft) {
    let now = draft.now;
    let lapsing: Vec<String> = draft
        .state
        .grants
        .values()
        .filter(|grant| {
            !grant.expired && matches!(grant.source, GrantSource::MonthlyAllocation | GrantSource::Rollover)
        })
        .map(|grant| grant.grant_id.clone())
        .collect();
    for grant_id in lapsing {
        expire_grant(draft, now, &grant_id);
    }
}

/// Close a Stripe-managed period now, ahead of its end on tally's clock:
/// Stripe renewed early (`rollover_expires_at` is the new period's end) or
/// ended the subscription (`None`: allocation and rollover lapse).
pub(super) fn close_period_now(draft: &mut Draft, subscription: &Subscription, rollover_expires_at: Option<Timestamp>) {
    let now = draft.now;
    match rollover_expires_at {
        Some(expires_at) => {
            let rollover = &subscription.terms.plan.rollover;
            let cap = if rollover.enabled && !subscription.cancel_at_period_end {
                rollover.max_credits
            } else {
                Credits::ZERO
            };
            roll_over_or_expire_allocation(draft, now, subscription.period_end, cap, expires_at);
        }
        None => lapse_allocations(draft),
    }
    let debt_cleared = draft.state.debt();
    let overage_lines = overage_lines(&draft.state.debt);
    draft.emit_now(MemberEvent::SubscriptionPeriodClosed {
        period_start: subscription.period_start,
        period_end: now,
        debt_cleared,
        overage_lines,
    });
}

fn optional_text(field: &'static str, value: &Option<String>) -> Result<(), DomainError> {
    match value {
        Some(text) => validate::text(field, text),
        None => Ok(()),
    }
}

fn grant_credits(draft: &mut Draft, grant: &GrantCredits) -> Result<(), DomainError> {
    if !matches!(grant.source, GrantSource::Purchase | GrantSource::Promotional | GrantSource::Adjustment) {
        return Err(DomainError::invalid("source", "must be purchase, promotional or adjustment"));
    }
    validate::range("amount", grant.amount.0, 1, COMMAND_CREDITS_MAX)?;
    if let Some(priority) = grant.priority {
        validate::range("priority", i64::from(priority), 0, i64::from(PRIORITY_MAX))?;
    }
    if grant.category.is_some() && grant.source != GrantSource::Adjustment {
        return Err(DomainError::invalid("category", "only an adjustment names its own category"));
    }
    if grant.source == GrantSource::Adjustment && grant.reason.is_none() {
        return Err(DomainError::invalid("reason", "an adjustment needs a reason"));
    }
    optional_text("reason", &grant.reason)?;
    if let Some(price) = grant.price {
        if grant.source != GrantSource::Purchase {
            return Err(DomainError::invalid("price", "only a purchase carries a price"));
        }
        validate::range("price", price.0, 0, PRICE_MINOR_MAX)?;
    }
    let now = draft.now;
    let horizon = now.checked_add_months(Months::new(12 * FUTURE_INSTANT_YEARS_MAX)).unwrap_or(now);
    for (field, instant) in [("effective_at", grant.effective_at), ("expires_at", grant.expires_at)] {
        if instant.is_some_and(|instant| instant > horizon) {
            return Err(DomainError::invalid(field, format!("must be within {FUTURE_INSTANT_YEARS_MAX} years")));
        }
    }
    let effective_at = grant.effective_at.filter(|effective_at| *effective_at > now);
    let starts_at = effective_at.unwrap_or(now);
    if let Some(expires_at) = grant.expires_at
        && expires_at <= starts_at
    {
        return Err(DomainError::invalid("expires_at", "must be later than now and than effective_at"));
    }

    let terms = GrantTerms {
        source: grant.source,
        category: grant.category.unwrap_or_else(|| grant.source.default_category()),
        amount: grant.amount,
        priority: grant.priority.unwrap_or_else(|| grant.source.default_priority()),
        expires_at: grant.expires_at,
        reason: grant.reason.clone(),
        price: grant.price,
    };
    match effective_at {
        Some(effective_at) => {
            let schedule_id = format!("sg{}", draft.next_version());
            draft.emit_now(MemberEvent::CreditsGrantScheduled { schedule_id, effective_at, terms });
        }
        None => grant_with_invoice(draft, now, terms, None),
    }
    Ok(())
}

/// Grant, and bill a priced purchase: on the open period's invoice (the
/// grant's evolve adds the line), or on a one-off invoice issued at once.
fn grant_with_invoice(draft: &mut Draft, instant: Timestamp, terms: GrantTerms, schedule_id: Option<String>) {
    let priced_purchase = terms.price.filter(|price| terms.source == GrantSource::Purchase && price.is_positive());
    let stripe_managed = draft
        .state
        .subscription
        .as_ref()
        .is_some_and(|subscription| subscription.is_live() && subscription.billing == Billing::Stripe);
    if priced_purchase.is_some() && stripe_managed {
        // Stripe bills this member: the price goes to Stripe as an invoice item.
        let grant_id = format!("g{}", draft.next_version());
        let granted = MemberEvent::CreditsGranted {
            grant_id,
            terms,
            transferred_from: Vec::new(),
            usage_id: None,
            schedule_id,
            stripe_period_start: None,
            stripe_checkout_session_id: None,
            stripe_invoice_item: true,
            stripe_payment: None,
        };
        draft.emit(instant, granted);
        return;
    }
    let one_off_price = priced_purchase.filter(|_| !draft.state.has_billing_period());
    let amount = terms.amount;
    draft.grant_scheduled(instant, terms, Vec::new(), None, schedule_id);
    if let Some(price) = one_off_price {
        let invoice = MemberEvent::InvoiceIssued {
            invoice_id: next_invoice_id(&draft.state),
            period_start: None,
            period_end: None,
            currency: draft.state.profile.currency.clone(),
            lines: vec![purchase_line(amount, price)],
            total: price,
            debt_cleared: Credits::ZERO,
            stripe_invoice_id: None,
        };
        draft.emit(instant, invoice);
    }
}

fn debit_credits(draft: &mut Draft, amount: Credits, reason: &str) -> Result<(), DomainError> {
    validate::range("amount", amount.0, 1, COMMAND_CREDITS_MAX)?;
    validate::text("reason", reason)?;
    let spend = plan_spend(&draft.state, amount, None)?;
    draft.emit_now(MemberEvent::CreditsDebited { amount, parts: spend.parts, reason: reason.to_owned() });
    Ok(())
}

fn validate_usage(usage: &RecordUsage, now: Timestamp) -> Result<(), DomainError> {
    validate::identifier("usage_id", &usage.usage_id)?;
    validate::identifier("metric", &usage.metric)?;
    validate::range("quantity", usage.quantity, 1, QUANTITY_MAX)?;
    validate::range("credits", usage.credits.0, 1, COMMAND_CREDITS_MAX)?;
    if let Some(occurred_at) = usage.occurred_at
        && (occurred_at < now - OCCURRED_AT_PAST_MAX || occurred_at > now + OCCURRED_AT_FUTURE_MAX)
    {
        return Err(DomainError::invalid("occurred_at", "must be within the last 7 days and at most 5 minutes ahead"));
    }
    if let Some(integration_id) = &usage.integration_id {
        validate::identifier("integration_id", integration_id)?;
    }
    if let Some(query_id) = &usage.query_id {
        validate::identifier("query_id", query_id)?;
    }
    Ok(())
}

fn record_usage(draft: &mut Draft, usage: &RecordUsage, known: Option<UsageFacts>) -> Result<(), DomainError> {
    validate_usage(usage, draft.now)?;
    if known.is_some() {
        return Err(DomainError::invalid("usage_id", "this usage id was already recorded for the member"));
    }
    let spend = plan_spend(&draft.state, usage.credits, debt_room(&draft.state))?;
    let unit_price = match &draft.state.subscription {
        Some(subscription) if spend.debt.is_positive() => subscription.terms.plan.overage.unit_price,
        _ => MinorUnits::ZERO,
    };
    draft.emit_now(MemberEvent::UsageRecorded {
        usage_id: usage.usage_id.clone(),
        metric: usage.metric.clone(),
        quantity: usage.quantity,
        credits: usage.credits,
        occurred_at: usage.occurred_at.unwrap_or(draft.now),
        integration_id: usage.integration_id.clone(),
        query_id: usage.query_id.clone(),
    });
    draft.emit_now(MemberEvent::CreditsDeducted {
        usage_id: usage.usage_id.clone(),
        amount: usage.credits,
        parts: spend.parts,
        debt: spend.debt,
        unit_price,
    });
    Ok(())
}

fn reverse_usage(
    draft: &mut Draft,
    usage_id: &str,
    reason: &Option<String>,
    known: Option<UsageFacts>,
) -> Result<(), DomainError> {
    validate::identifier("usage_id", usage_id)?;
    optional_text("reason", reason)?;
    let facts = known.ok_or_else(|| DomainError::UsageNotFound { usage_id: usage_id.to_owned() })?;
    if facts.reversed {
        return Err(DomainError::invalid("usage_id", "this usage was already reversed"));
    }
    let debt_reduced = facts.credits.min(draft.state.debt());
    let refunded = facts.credits.minus(debt_reduced);
    draft.emit_now(MemberEvent::UsageReversed {
        usage_id: usage_id.to_owned(),
        credits: facts.credits,
        debt_reduced,
        refunded,
        reason: reason.clone(),
    });
    if refunded.is_positive() {
        let terms = ledger_grant(GrantSource::Refund, refunded, None);
        draft.grant(draft.now, terms, Vec::new(), Some(usage_id.to_owned()));
    }
    Ok(())
}

fn reserve(draft: &mut Draft, amount: Credits, ttl_s: Option<i64>) -> Result<(), DomainError> {
    validate::range("amount", amount.0, 1, COMMAND_CREDITS_MAX)?;
    let ttl_s = ttl_s.unwrap_or(RESERVATION_TIMEOUT_DEFAULT_S);
    validate::range("ttl_s", ttl_s, 1, RESERVATION_TIMEOUT_MAX_S)?;
    // Reservations never dip into overage: they need the credits to exist.
    let spend = plan_spend(&draft.state, amount, None)?;
    let reservation_id = format!("rsv_{}", draft.next_version());
    let deadline = draft.now + Duration::seconds(ttl_s);
    draft.emit_now(MemberEvent::CreditsReserved { reservation_id, amount, holds: spend.parts, deadline });
    Ok(())
}

/// A reservation that is no longer open: the same request again gets the
/// same (empty) answer, a late one `reservation_expired`.
fn closed_reservation(state: &MemberState, reservation_id: &str) -> Result<ClosedReservation, DomainError> {
    state
        .closed_reservations
        .get(reservation_id)
        .copied()
        .ok_or_else(|| DomainError::ReservationNotFound { reservation_id: reservation_id.to_owned() })
}

fn settle(
    draft: &mut Draft,
    reservation_id: &str,
    amount: Credits,
    query: &Option<QueryExecution>,
) -> Result<(), DomainError> {
    validate::identifier("reservation_id", reservation_id)?;
    if let Some(query) = query {
        validate::identifier("query.integration_id", &query.integration_id)?;
        validate::identifier("query.query_id", &query.query_id)?;
        validate::range("query.duration_ms", query.duration_ms, 0, QUERY_DURATION_MS_MAX)?;
        validate::range("query.rows", query.rows, 0, i64::MAX)?;
        validate::range("query.bytes", query.bytes, 0, i64::MAX)?;
        if let Some(code) = &query.error_code {
            validate::identifier("query.error_code", code)?;
        }
        if let Some(usage) = &query.api_usage {
            usage.validate("query.api_usage")?;
        }
    }
    let Some(reservation) = draft.state.reservations.get(reservation_id).cloned() else {
        return match closed_reservation(&draft.state, reservation_id)? {
            ClosedReservation::Settled { charged } if charged == amount => Ok(()),
            ClosedReservation::Settled { charged } => Err(DomainError::invalid(
                "amount",
                format!(
                    "reservation `{reservation_id}` was already settled for {charged} credits; \
                     settle again with amount {charged} to read that answer, or reserve anew"
                ),
            )),
            ClosedReservation::Released => Err(DomainError::invalid(
                "reservation_id",
                format!(
                    "reservation `{reservation_id}` was released before this settle, so nothing can be charged \
                     on it; reserve again, or record the work as usage"
                ),
            )),
            ClosedReservation::Expired => {
                Err(DomainError::ReservationExpired { reservation_id: reservation_id.to_owned() })
            }
        };
    };
    validate::range("amount", amount.0, 0, reservation.amount.0)?;
    let (parts, released_parts) = split_holds(&reservation.holds, amount);
    let released = reservation.amount.minus(amount);
    let now = draft.now;
    draft.emit_now(MemberEvent::ReservationSettled {
        reservation_id: reservation_id.to_owned(),
        charged: amount,
        parts,
        released,
        released_parts: released_parts.clone(),
    });
    if let Some(execution) = query {
        draft.emit_now(MemberEvent::QueryExecuted {
            reservation_id: reservation_id.to_owned(),
            execution: execution.clone(),
            credits: amount,
        });
    }
    expire_released_parts(draft, now, &released_parts);
    Ok(())
}

fn release(draft: &mut Draft, reservation_id: &str) -> Result<(), DomainError> {
    validate::identifier("reservation_id", reservation_id)?;
    if draft.state.reservations.contains_key(reservation_id) {
        release_reservation(draft, draft.now, reservation_id, ReleaseReason::Released);
        return Ok(());
    }
    match closed_reservation(&draft.state, reservation_id)? {
        ClosedReservation::Released => Ok(()),
        ClosedReservation::Settled { charged } => Err(DomainError::invalid(
            "reservation_id",
            format!(
                "reservation `{reservation_id}` was settled for {charged} credits before this release, and its \
                 unused part was released then; there is nothing left to release"
            ),
        )),
        ClosedReservation::Expired => {
            Err(DomainError::ReservationExpired { reservation_id: reservation_id.to_owned() })
        }
    }
}

fn invoice(state: &MemberState, invoice_id: &str) -> Result<InvoiceRecord, DomainError> {
    state
        .invoices
        .get(invoice_id)
        .cloned()
        .ok_or_else(|| DomainError::InvoiceNotFound { invoice_id: invoice_id.to_owned() })
}

fn invoice_status_error(status: InvoiceStatus) -> DomainError {
    DomainError::invalid("invoice_id", format!("the invoice is {}", status.as_str()))
}

fn pay_invoice(draft: &mut Draft, invoice_id: &str) -> Result<(), DomainError> {
    let record = invoice(&draft.state, invoice_id)?;
    if !matches!(record.status, InvoiceStatus::Open | InvoiceStatus::Uncollectible) {
        return Err(invoice_status_error(record.status));
    }
    draft.emit_now(MemberEvent::PaymentSucceeded { invoice_id: invoice_id.to_owned(), amount: record.total });
    if draft.state.subscription.as_ref().is_some_and(|subscription| subscription.status == SubscriptionStatus::PastDue)
    {
        draft.emit_now(MemberEvent::SubscriptionReactivated {});
    }
    Ok(())
}

fn record_payment_failed(draft: &mut Draft, invoice_id: &str, reason: &Option<String>) -> Result<(), DomainError> {
    optional_text("reason", reason)?;
    let record = invoice(&draft.state, invoice_id)?;
    if record.status != InvoiceStatus::Open {
        return Err(invoice_status_error(record.status));
    }
    draft.emit_now(MemberEvent::PaymentFailed { invoice_id: invoice_id.to_owned(), reason: reason.clone() });
    if draft.state.subscription.as_ref().is_some_and(|subscription| {
        matches!(subscription.status, SubscriptionStatus::Active | SubscriptionStatus::Trialing)
    }) {
        draft.emit_now(MemberEvent::SubscriptionPastDue { invoice_id: Some(invoice_id.to_owned()) });
    }
    Ok(())
}

fn void_invoice(draft: &mut Draft, invoice_id: &str) -> Result<(), DomainError> {
    let record = invoice(&draft.state, invoice_id)?;
    if !matches!(record.status, InvoiceStatus::Open | InvoiceStatus::Uncollectible) {
        return Err(invoice_status_error(record.status));
    }
    draft.emit_now(MemberEvent::InvoiceVoided { invoice_id: invoice_id.to_owned() });
    Ok(())
}

fn mark_uncollectible(draft: &mut Draft, invoice_id: &str) -> Result<(), DomainError> {
    let record = invoice(&draft.state, invoice_id)?;
    if record.status != InvoiceStatus::Open {
        return Err(invoice_status_error(record.status));
    }
    draft.emit_now(MemberEvent::InvoiceMarkedUncollectible { invoice_id: invoice_id.to_owned() });
    Ok(())
}

// ---------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------

fn small_object(field: &'static str, value: &serde_json::Value, bytes_max: usize) -> Result<(), DomainError> {
    if !value.is_object() {
        return Err(DomainError::invalid(field, "must be a JSON object"));
    }
    if value.to_string().len() > bytes_max {
        return Err(DomainError::invalid(field, format!("must be at most {bytes_max} bytes of JSON")));
    }
    Ok(())
}

fn set_alert_rules(draft: &mut Draft, overrides: &serde_json::Value) -> Result<(), DomainError> {
    small_object("overrides", overrides, ALERT_JSON_BYTES_MAX)?;
    let unchanged = match &draft.state.alert_rules {
        Some(current) => current == overrides,
        None => overrides.as_object().is_some_and(serde_json::Map::is_empty),
    };
    if !unchanged {
        draft.emit_now(MemberEvent::AlertRulesChanged { overrides: overrides.clone() });
    }
    Ok(())
}

fn check_notice(notice: &AlertNotice) -> Result<(), DomainError> {
    validate::identifier("rule", &notice.rule)?;
    if let Some(subject) = &notice.subject {
        validate::identifier("subject", subject)?;
    }
    validate::range("episode", i64::from(notice.episode), 1, i64::from(u32::MAX))?;
    small_object("figures", &notice.figures, ALERT_JSON_BYTES_MAX)
}

fn raise_alert(draft: &mut Draft, notice: &AlertNotice) -> Result<(), DomainError> {
    check_notice(notice)?;
    let last = draft.state.alert_episodes.get(&notice.key()).copied().unwrap_or(0);
    if notice.episode > last {
        draft.emit_now(MemberEvent::AlertTriggered { alert_id: notice.alert_id(), notice: notice.clone() });
    }
    Ok(())
}

fn resolve_alert(draft: &mut Draft, notice: &AlertNotice) -> Result<(), DomainError> {
    check_notice(notice)?;
    let alert_id = notice.alert_id();
    if draft.state.open_alerts.contains_key(&alert_id) {
        draft.emit_now(MemberEvent::AlertResolved { alert_id, notice: notice.clone() });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Webhook endpoints
// ---------------------------------------------------------------------------

fn webhook_endpoint<'state>(
    state: &'state MemberState,
    endpoint_id: &str,
) -> Result<&'state WebhookEndpoint, DomainError> {
    state
        .webhook_endpoints
        .get(endpoint_id)
        .ok_or_else(|| DomainError::WebhookEndpointNotFound { endpoint_id: endpoint_id.to_owned() })
}

/// What the ledger checks of a config: sizes and shapes. Whether the URL
/// may be reached, and which event types exist, the API checks first.
fn check_webhook_config(config: &WebhookEndpointConfig) -> Result<(), DomainError> {
    if config.url.is_empty() || config.url.len() > WEBHOOK_URL_BYTES_MAX {
        return Err(DomainError::invalid("url", format!("must be 1 to {WEBHOOK_URL_BYTES_MAX} bytes")));
    }
    if config.event_types.is_empty() || config.event_types.len() > WEBHOOK_EVENT_TYPES_MAX {
        return Err(DomainError::invalid("event_types", format!("must name 1 to {WEBHOOK_EVENT_TYPES_MAX} types")));
    }
    for event_type in &config.event_types {
        if event_type != "*" {
            validate::identifier("event_types", event_type)?;
        }
    }
    if let Some(description) = &config.description {
        validate::text("description", description)?;
    }
    Ok(())
}

fn create_webhook_endpoint(
    draft: &mut Draft,
    endpoint_id: &str,
    config: &WebhookEndpointConfig,
    secret: &crate::domain::integration::CredentialRef,
) -> Result<(), DomainError> {
    validate::identifier("endpoint_id", endpoint_id)?;
    check_webhook_config(config)?;
    if draft.state.webhook_endpoints.contains_key(endpoint_id) {
        return Err(DomainError::invalid("endpoint_id", "is already an endpoint of this member"));
    }
    if draft.state.webhook_endpoints.len() >= WEBHOOK_ENDPOINTS_MAX {
        return Err(DomainError::invalid(
            "url",
            format!("a member has at most {WEBHOOK_ENDPOINTS_MAX} webhook endpoints; delete one first"),
        ));
    }
    draft.emit_now(MemberEvent::WebhookEndpointCreated {
        endpoint_id: endpoint_id.to_owned(),
        config: config.clone(),
        secret: secret.clone(),
    });
    Ok(())
}

fn change_webhook_endpoint(
    draft: &mut Draft,
    endpoint_id: &str,
    config: &WebhookEndpointConfig,
) -> Result<(), DomainError> {
    check_webhook_config(config)?;
    if &webhook_endpoint(&draft.state, endpoint_id)?.config != config {
        draft.emit_now(MemberEvent::WebhookEndpointChanged {
            endpoint_id: endpoint_id.to_owned(),
            config: config.clone(),
        });
    }
    Ok(())
}

fn disable_webhook_endpoint(draft: &mut Draft, endpoint_id: &str, reason: &str) -> Result<(), DomainError> {
    validate::text("reason", reason)?;
    if webhook_endpoint(&draft.state, endpoint_id)?.config.enabled {
        draft.emit_now(MemberEvent::WebhookEndpointDisabled {
            endpoint_id: endpoint_id.to_owned(),
            reason: reason.to_owned(),
        });
    }
    Ok(())
}

fn rotate_webhook_secret(
    draft: &mut Draft,
    endpoint_id: &str,
    secret: &crate::domain::integration::CredentialRef,
    previous_until: Timestamp,
) -> Result<(), DomainError> {
    let endpoint = webhook_endpoint(&draft.state, endpoint_id)?;
    if endpoint.secret.credential_id == secret.credential_id && endpoint.secret.version >= secret.version {
        return Err(DomainError::invalid("secret", "must be a newer version"));
    }
    draft.emit_now(MemberEvent::WebhookSecretRotated {
        endpoint_id: endpoint_id.to_owned(),
        secret: secret.clone(),
        previous_until,
    });
    Ok(())
}
