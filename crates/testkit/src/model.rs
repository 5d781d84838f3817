//! The reference model: tally's credit rules (DESIGN.md §3) written a second
//! time, as a plain fold over `BTreeMap`s and `Vec`s, without looking at the
//! ledger's decider.
//!
//! It is deliberately naive. A command is tried on a clone of the member and
//! the clone is kept only when the command is accepted, so "a rejected
//! command writes nothing" holds by construction. Time is folded in lazily:
//! before any command at `now`, everything due at or before `now` runs for
//! that member, earliest instant first. Since the effects of time are a pure
//! function of the history and the clock, running them late gives the same
//! result as a scheduler running them on time.
//!
//! Only tally-billed subscriptions are modelled; Stripe-managed periods come
//! from webhooks that no command here carries, so `Billing::Stripe` panics.
//!
//! # Readings of open points
//!
//! Where DESIGN.md §3 and the ledger's stated readings leave a choice, the
//! model takes these (the generators avoid the ones marked *avoided*):
//!
//! - Checks run in a fixed order: the member exists (unless the command
//!   registers implicitly), then the command's own fields, then the rules in
//!   the order the brief lists them (lookups of usage, reservation and
//!   invoice ids before state). So an invalid field on an unknown member is
//!   `not_found`, and a duplicate usage id wins over insufficient credits.
//! - A settled or released reservation answers for itself even after its
//!   deadline (a retried settle is accepted); only one that timed out is
//!   `reservation_expired`, whatever the amount asked.
//! - `ChangePlan` to a retired plan is `validation_failed` (it cannot be
//!   newly chosen), checked after "same plan".
//! - `Register` of an existing member changes its profile; its currency may
//!   change only without a live subscription (*avoided*).
//! - `RecordPaymentFailed` is accepted on an open invoice only; on paid, void
//!   or uncollectible ones it is `validation_failed`. Voiding or marking an
//!   invoice uncollectible leaves the subscription's status alone; paying any
//!   invoice reactivates a past_due subscription.
//! - A priced purchase scheduled for later is billed when it is granted, on
//!   the period then open or on a one-off invoice (*avoided*).

use chrono::{DateTime, Months, Utc};
use std::collections::{BTreeMap, BTreeSet};
use tally_ledger::domain::{
    Billing, GrantCategory, GrantCredits, GrantSource, MemberCommand, MemberProfile, Plan, QueryExecution, RecordUsage,
};

pub type Timestamp = DateTime<Utc>;

/// A rejection, spelled as `DomainError::code()` spells it.
pub type Rejection = &'static str;

pub const VALIDATION_FAILED: Rejection = "validation_failed";
pub const INSUFFICIENT_CREDITS: Rejection = "insufficient_credits";
pub const NOT_FOUND: Rejection = "not_found";
pub const RESERVATION_EXPIRED: Rejection = "reservation_expired";

/// In `Settle` and `Release`, the member's latest reservation. The model's
/// own reservation ids are `#k`, k counting the member's reservations from 1.
pub const LAST_RESERVATION_REF: &str = "#last";

/// Credit amounts in commands: grants, usage, debits, reservations.
const COMMAND_CREDITS_MAX: i64 = 1_000_000_000;
const QUANTITY_MAX: i64 = 1_000_000_000;
const PRICE_MINOR_MAX: i64 = 1_000_000_000_000;
const PRIORITY_MAX: u8 = 100;
const IDENTIFIER_LENGTH_MAX: usize = 128;
const TEXT_LENGTH_MAX: usize = 500;
const RESERVATION_TTL_DEFAULT_S: i64 = 600;
const RESERVATION_TTL_MAX_S: i64 = 86_400;
const OCCURRED_AT_PAST_MAX_S: i64 = 7 * 86_400;
const OCCURRED_AT_FUTURE_MAX_S: i64 = 5 * 60;

/// Every counter of one member, as the model sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelBalance {
    /// Σ over unexpired grants of (remaining − held); never negative.
    pub available: i64,
    /// Σ held over all open reservations, on expired grants too.
    pub held: i64,
    /// Overage not yet billed.
    pub debt: i64,
    /// available + held − debt; may be negative.
    pub balance: i64,
    /// Every credit granted, rollover transfers excluded.
    pub granted: i64,
    /// Credits consumed by usage and settled reservations (never reduced by a reversal).
    pub used: i64,
    /// Credits taken back by admin debits.
    pub debited: i64,
    /// Breakage: credits that lapsed.
    pub expired: i64,
    /// Gross debt ever incurred, including debt a reversal later cut.
    pub debt_incurred: i64,
}

/// An invoice as the model tracks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInvoice {
    pub invoice_id: String,
    /// Minor units: fee + prorations + purchases + overage.
    pub total: i64,
    /// `open`, `paid`, `void` or `uncollectible`.
    pub status: &'static str,
}

/// One grant as the model tracks it, for tests that follow single credits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelGrant {
    pub source: GrantSource,
    pub category: GrantCategory,
    pub priority: u8,
    pub expires_at: Option<Timestamp>,
    /// Includes `held`; after expiry only the held part remains.
    pub remaining: i64,
    pub held: i64,
    pub expired: bool,
}

/// The reference model of a set of members and a plan catalog.
#[derive(Clone, Debug)]
pub struct Model {
    catalog: Catalog,
    members: BTreeMap<String, Member>,
    last_now: Option<Timestamp>,
}

#[derive(Clone, Debug, Default)]
struct Catalog {
    plans: BTreeMap<String, Plan>,
    retired: BTreeSet<String>,
}

impl Catalog {
    /// The defaults of an implicit registration: UTC and USD, or the plan's
    /// currency when a first subscription start registers the member.
    fn implicit_profile(&self, command: &MemberCommand) -> MemberProfile {
        let mut profile = MemberProfile::default();
        if let MemberCommand::StartSubscription { plan_id, .. } = command
            && let Some(plan) = self.plans.get(plan_id)
        {
            profile.currency = plan.currency.clone();
        }
        profile
    }
}

impl Model {
    pub fn new(plans: Vec<Plan>) -> Model {
        let plans = plans.into_iter().map(|plan| (plan.plan_id.clone(), plan)).collect();
        Model { catalog: Catalog { plans, retired: BTreeSet::new() }, members: BTreeMap::new(), last_now: None }
    }

    /// Retires a plan: it can no longer be chosen, existing subscriptions on
    /// it still renew.
    pub fn retire_plan(&mut self, plan_id: &str) {
        assert!(self.catalog.plans.contains_key(plan_id), "retiring unknown plan {plan_id}");
        self.catalog.retired.insert(plan_id.to_owned());
    }

    /// Decides `command` for `member_id` at `now`, after running what fell
    /// due. On a rejection nothing but the effects of time has changed.
    ///
    /// Reservation ids in the model are `#k`, the k-th reservation made for
    /// that member, and `#last` names the latest (see
    /// `strategies::resolve_reservation_ref`).
    pub fn apply(&mut self, member_id: &str, command: &MemberCommand, now: Timestamp) -> Result<(), Rejection> {
        self.observe(now);
        if let Some(member) = self.members.get_mut(member_id) {
            member.run_due(now);
        }
        let mut member = match self.members.get(member_id) {
            Some(member) => member.clone(),
            None if registers_implicitly(command) => Member::new(member_id, self.catalog.implicit_profile(command)),
            None => return Err(NOT_FOUND),
        };
        member.decide(&self.catalog, command, now)?;
        self.members.insert(member_id.to_owned(), member);
        Ok(())
    }

    /// Runs what fell due at or before `now` for every member.
    pub fn advance(&mut self, now: Timestamp) {
        self.observe(now);
        for member in self.members.values_mut() {
            member.run_due(now);
        }
    }

    pub fn balance(&self, member_id: &str) -> Option<ModelBalance> {
        self.members.get(member_id).map(Member::balance)
    }

    /// `active`, `past_due` or `canceled`; `None` before any subscription.
    pub fn subscription_status(&self, member_id: &str) -> Option<&'static str> {
        let subscription = self.members.get(member_id)?.subscription.as_ref()?;
        Some(subscription.status.as_str())
    }

    /// The current subscription's plan id, even when canceled.
    pub fn subscription_plan(&self, member_id: &str) -> Option<&str> {
        let subscription = self.members.get(member_id)?.subscription.as_ref()?;
        Some(subscription.plan.plan_id.as_str())
    }

    /// The open period `[start, end)` of a live subscription.
    pub fn subscription_period(&self, member_id: &str) -> Option<(Timestamp, Timestamp)> {
        let subscription = self.members.get(member_id)?.live_subscription()?;
        Some((subscription.period_start, subscription.period_end))
    }

    /// Every grant made to the member, in the order granted (scheduled
    /// grants appear once they fall due).
    pub fn grants(&self, member_id: &str) -> Vec<ModelGrant> {
        let Some(member) = self.members.get(member_id) else { return Vec::new() };
        member
            .grants
            .iter()
            .map(|grant| ModelGrant {
                source: grant.source,
                category: grant.category,
                priority: grant.priority,
                expires_at: grant.expires_at,
                remaining: grant.remaining,
                held: grant.held,
                expired: grant.expired,
            })
            .collect()
    }

    /// Every invoice issued to the member, oldest first.
    pub fn invoices(&self, member_id: &str) -> Vec<ModelInvoice> {
        let Some(member) = self.members.get(member_id) else { return Vec::new() };
        let invoices = member.invoices.iter().enumerate();
        invoices
            .map(|(index, invoice)| ModelInvoice {
                invoice_id: invoice_id(member_id, index + 1),
                total: invoice.total,
                status: invoice.status.as_str(),
            })
            .collect()
    }

    pub fn member_ids(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    /// The member's books balance and no counter is out of range. The model
    /// checks this itself in its tests; property tests may call it after
    /// every step.
    pub fn check_invariants(&self, member_id: &str) -> Result<(), String> {
        let Some(member) = self.members.get(member_id) else { return Ok(()) };
        member.check_invariants().map_err(|message| format!("member {member_id}: {message}"))
    }

    /// Time never goes backwards: a scenario that steps back is a bug in the test.
    fn observe(&mut self, now: Timestamp) {
        if let Some(last_now) = self.last_now {
            assert!(now >= last_now, "the model's clock went back from {last_now} to {now}");
        }
        self.last_now = Some(now);
    }
}

fn registers_implicitly(command: &MemberCommand) -> bool {
    matches!(
        command,
        MemberCommand::Register(_) | MemberCommand::StartSubscription { .. } | MemberCommand::GrantCredits(_)
    )
}

pub fn invoice_id(member_id: &str, number: usize) -> String {
    format!("inv_{member_id}_{number}")
}

fn period_end(anchor: Timestamp, period_index: u32) -> Timestamp {
    anchor.checked_add_months(Months::new(period_index + 1)).expect("period end within chrono's range")
}

#[derive(Clone, Debug)]
struct Member {
    member_id: String,
    profile: MemberProfile,
    /// In the order granted: the index is the "oldest first" tie-break.
    grants: Vec<Grant>,
    /// Grants waiting for their `effective_at`, in the order asked for.
    scheduled: Vec<ScheduledGrant>,
    /// Keyed `#k`, k counting every reservation made from 1.
    reservations: BTreeMap<String, Reservation>,
    usages: BTreeMap<String, Usage>,
    /// Open debt, oldest first, each part at the unit price in force when incurred.
    debt: Vec<DebtPart>,
    subscription: Option<Subscription>,
    invoices: Vec<Invoice>,
    totals: Totals,
}

#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    granted: i64,
    used: i64,
    debited: i64,
    expired: i64,
    debt_incurred: i64,
}

#[derive(Clone, Debug)]
struct Grant {
    source: GrantSource,
    category: GrantCategory,
    priority: u8,
    expires_at: Option<Timestamp>,
    /// Includes `held`.
    remaining: i64,
    held: i64,
    /// Once expired only the held part remains; it expires when released.
    expired: bool,
}

impl Grant {
    fn spendable(&self) -> i64 {
        if self.expired { 0 } else { self.remaining - self.held }
    }
}

#[derive(Clone, Debug)]
struct ScheduledGrant {
    effective_at: Timestamp,
    grant: Grant,
    price: i64,
}

#[derive(Clone, Debug)]
struct Reservation {
    amount: i64,
    /// (grant index, amount), in burn order at the time of reserving.
    holds: Vec<(usize, i64)>,
    deadline: Timestamp,
    state: ReservationState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReservationState {
    Open,
    Settled { charged: i64 },
    Released,
    TimedOut,
}

#[derive(Clone, Copy, Debug)]
struct Usage {
    credits: i64,
    reversed: bool,
}

#[derive(Clone, Copy, Debug)]
struct DebtPart {
    credits: i64,
    unit_price: i64,
}

#[derive(Clone, Debug)]
struct Subscription {
    plan: Plan,
    status: SubscriptionStatus,
    anchor: Timestamp,
    period_index: u32,
    period_start: Timestamp,
    period_end: Timestamp,
    cancel_at_period_end: bool,
    downgrade: Option<Plan>,
    /// The open period's invoice lines so far, in minor units (overage is
    /// added from the debt when the invoice is issued).
    draft: Draft,
}

impl Subscription {
    fn is_live(&self) -> bool {
        matches!(self.status, SubscriptionStatus::Active | SubscriptionStatus::PastDue)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Draft {
    fee: i64,
    prorations: i64,
    purchases: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubscriptionStatus {
    Active,
    PastDue,
    Canceled,
}

impl SubscriptionStatus {
    fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Canceled => "canceled",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Invoice {
    total: i64,
    status: InvoiceStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InvoiceStatus {
    Open,
    Paid,
    Void,
    Uncollectible,
}

impl InvoiceStatus {
    fn as_str(self) -> &'static str {
        match self {
            InvoiceStatus::Open => "open",
            InvoiceStatus::Paid => "paid",
            InvoiceStatus::Void => "void",
            InvoiceStatus::Uncollectible => "uncollectible",
        }
    }
}

impl Member {
    fn new(member_id: &str, profile: MemberProfile) -> Member {
        Member {
            member_id: member_id.to_owned(),
            profile,
            grants: Vec::new(),
            scheduled: Vec::new(),
            reservations: BTreeMap::new(),
            usages: BTreeMap::new(),
            debt: Vec::new(),
            subscription: None,
            invoices: Vec::new(),
            totals: Totals::default(),
        }
    }

    // ---- reading -------------------------------------------------------

    fn available(&self) -> i64 {
        self.grants.iter().map(Grant::spendable).sum()
    }

    fn held(&self) -> i64 {
        self.grants.iter().map(|grant| grant.held).sum()
    }

    fn debt(&self) -> i64 {
        self.debt.iter().map(|part| part.credits).sum()
    }

    fn balance(&self) -> ModelBalance {
        let available = self.available();
        let held = self.held();
        let debt = self.debt();
        ModelBalance {
            available,
            held,
            debt,
            balance: available + held - debt,
            granted: self.totals.granted,
            used: self.totals.used,
            debited: self.totals.debited,
            expired: self.totals.expired,
            debt_incurred: self.totals.debt_incurred,
        }
    }

    fn live_subscription(&self) -> Option<&Subscription> {
        self.subscription.as_ref().filter(|subscription| subscription.is_live())
    }

    fn live_subscription_mut(&mut self) -> Option<&mut Subscription> {
        self.subscription.as_mut().filter(|subscription| subscription.is_live())
    }

    /// Spendable grants, lowest priority number first, then soonest expiry
    /// (no expiry last), then promotional before paid, then oldest first.
    fn burn_order(&self) -> Vec<usize> {
        let mut indices: Vec<usize> =
            (0..self.grants.len()).filter(|&index| self.grants[index].spendable() > 0).collect();
        indices.sort_by_key(|&index| {
            let grant = &self.grants[index];
            let paid = grant.category != GrantCategory::Promotional;
            (grant.priority, grant.expires_at.is_none(), grant.expires_at, paid, index)
        });
        indices
    }

    fn check_invariants(&self) -> Result<(), String> {
        for (index, grant) in self.grants.iter().enumerate() {
            if grant.held < 0 || grant.held > grant.remaining {
                return Err(format!("grant {index} holds {} of {}", grant.held, grant.remaining));
            }
            if grant.expired && grant.remaining != grant.held {
                return Err(format!("expired grant {index} keeps {} unheld", grant.remaining - grant.held));
            }
        }
        let remaining: i64 = self.grants.iter().map(|grant| grant.remaining).sum();
        let totals = self.totals;
        let sources = totals.granted + totals.debt_incurred;
        let uses = totals.used + totals.debited + totals.expired + remaining;
        if sources != uses {
            return Err(format!(
                "granted {} + debt incurred {} != used {} + debited {} + expired {} + remaining {remaining}",
                totals.granted, totals.debt_incurred, totals.used, totals.debited, totals.expired
            ));
        }
        let debt = self.debt();
        if debt < 0 || debt > totals.debt_incurred {
            return Err(format!("debt {debt} outside 0..={}", totals.debt_incurred));
        }
        let held_by_reservations: i64 = self
            .reservations
            .values()
            .filter(|reservation| reservation.state == ReservationState::Open)
            .flat_map(|reservation| reservation.holds.iter().map(|(_, amount)| amount))
            .sum();
        if held_by_reservations != self.held() {
            return Err(format!("open reservations hold {held_by_reservations}, grants {}", self.held()));
        }
        Ok(())
    }

    // ---- changing credits ------------------------------------------------

    fn add_grant(&mut self, grant: Grant) {
        self.totals.granted += grant.remaining;
        self.grants.push(grant);
    }

    /// Consumes `amount` (≤ available) in burn order.
    fn consume(&mut self, amount: i64) {
        let mut rest = amount;
        for index in self.burn_order() {
            let taken = rest.min(self.grants[index].spendable());
            self.grants[index].remaining -= taken;
            rest -= taken;
        }
        assert_eq!(rest, 0, "consumed more than available");
    }

    /// Holds `amount` (≤ available) in burn order.
    fn hold(&mut self, amount: i64) -> Vec<(usize, i64)> {
        let mut rest = amount;
        let mut holds = Vec::new();
        for index in self.burn_order() {
            let taken = rest.min(self.grants[index].spendable());
            if taken > 0 {
                self.grants[index].held += taken;
                holds.push((index, taken));
                rest -= taken;
            }
        }
        assert_eq!(rest, 0, "held more than available");
        holds
    }

    /// Gives a held part back; on a grant that expired meanwhile it expires.
    fn release_hold(&mut self, index: usize, amount: i64) {
        let grant = &mut self.grants[index];
        grant.held -= amount;
        if grant.expired {
            grant.remaining -= amount;
            self.totals.expired += amount;
        }
    }

    /// Marks the grant expired; its unheld rest is breakage.
    fn expire_grant(&mut self, index: usize) {
        let grant = &mut self.grants[index];
        let unheld = grant.remaining - grant.held;
        grant.remaining = grant.held;
        grant.expired = true;
        self.totals.expired += unheld;
    }

    fn incur_debt(&mut self, credits: i64, unit_price: i64) {
        self.debt.push(DebtPart { credits, unit_price });
        self.totals.debt_incurred += credits;
    }

    /// Cuts open debt by up to `credits`, newest first; returns the cut.
    fn reduce_debt(&mut self, credits: i64) -> i64 {
        let mut rest = credits;
        while rest > 0 {
            let Some(newest) = self.debt.last_mut() else { break };
            let cut = rest.min(newest.credits);
            newest.credits -= cut;
            rest -= cut;
            if newest.credits == 0 {
                self.debt.pop();
            }
        }
        credits - rest
    }

    // ---- invoices --------------------------------------------------------

    fn issue_invoice(&mut self, total: i64) {
        let status = if total == 0 { InvoiceStatus::Paid } else { InvoiceStatus::Open };
        self.invoices.push(Invoice { total, status });
    }

    /// Issues the open period's invoice (fee, prorations, purchases, overage)
    /// and clears the debt it bills.
    fn bill_period(&mut self) {
        let draft = self.subscription.as_ref().expect("billing a subscription").draft;
        let overage: i64 = self.debt.iter().map(|part| part.credits * part.unit_price).sum();
        self.debt.clear();
        self.issue_invoice(draft.fee + draft.prorations + draft.purchases + overage);
    }

    /// A priced purchase goes on the open period's invoice, or with no live
    /// subscription on a one-off invoice issued at once.
    fn charge_purchase(&mut self, price: i64) {
        if let Some(subscription) = self.live_subscription_mut() {
            subscription.draft.purchases += price;
        } else if price > 0 {
            self.issue_invoice(price);
        }
    }

    // ---- time ------------------------------------------------------------

    fn next_due(&self) -> Option<Timestamp> {
        let deadlines = self
            .reservations
            .values()
            .filter(|reservation| reservation.state == ReservationState::Open)
            .map(|reservation| reservation.deadline);
        let period_end = self.live_subscription().map(|subscription| subscription.period_end);
        let expiries = self.grants.iter().filter(|grant| !grant.expired).filter_map(|grant| grant.expires_at);
        let scheduled = self.scheduled.iter().map(|scheduled| scheduled.effective_at);
        deadlines.chain(period_end).chain(expiries).chain(scheduled).min()
    }

    fn run_due(&mut self, now: Timestamp) {
        while let Some(instant) = self.next_due().filter(|instant| *instant <= now) {
            self.run_instant(instant);
        }
    }

    /// Everything due at `instant`, in the order DESIGN.md §3 fixes.
    fn run_instant(&mut self, instant: Timestamp) {
        let timed_out: Vec<String> = self
            .reservations
            .iter()
            .filter(|(_, reservation)| reservation.state == ReservationState::Open && reservation.deadline <= instant)
            .map(|(reservation_id, _)| reservation_id.clone())
            .collect();
        for reservation_id in timed_out {
            self.end_reservation(&reservation_id, 0, ReservationState::TimedOut);
        }

        if self.live_subscription().is_some_and(|subscription| subscription.period_end <= instant) {
            self.close_period(instant);
        }

        for index in 0..self.grants.len() {
            let grant = &self.grants[index];
            if !grant.expired && grant.expires_at.is_some_and(|expires_at| expires_at <= instant) {
                self.expire_grant(index);
            }
        }

        let (due, later) = std::mem::take(&mut self.scheduled)
            .into_iter()
            .partition::<Vec<_>, _>(|scheduled| scheduled.effective_at <= instant);
        self.scheduled = later;
        for scheduled in due {
            self.add_grant(scheduled.grant);
            self.charge_purchase(scheduled.price);
        }
    }

    /// Rollover or expiry of the allocation → invoice → scheduled cancel or
    /// downgrade → renewal with a new allocation.
    fn close_period(&mut self, instant: Timestamp) {
        let subscription = self.subscription.as_ref().expect("closing a subscription");
        let roll_cap = if subscription.plan.rollover.enabled && !subscription.cancel_at_period_end {
            subscription.plan.rollover.max_credits.0
        } else {
            0
        };
        let next_period_end = period_end(subscription.anchor, subscription.period_index + 1);

        let ending: Vec<usize> = (0..self.grants.len())
            .filter(|&index| {
                let grant = &self.grants[index];
                grant.source == GrantSource::MonthlyAllocation
                    && !grant.expired
                    && grant.expires_at.is_some_and(|expires_at| expires_at <= instant)
            })
            .collect();
        let unheld_rest: i64 = ending.iter().map(|&index| self.grants[index].spendable()).sum();
        let rolled = unheld_rest.min(roll_cap);
        for index in ending {
            self.expire_grant(index);
        }
        // The rolled part is a transfer, not breakage and not new credit.
        self.totals.expired -= rolled;

        self.bill_period();

        let subscription = self.subscription.as_mut().expect("closing a subscription");
        if subscription.cancel_at_period_end {
            subscription.status = SubscriptionStatus::Canceled;
            subscription.cancel_at_period_end = false;
            subscription.downgrade = None;
            return;
        }
        if let Some(plan) = subscription.downgrade.take() {
            subscription.plan = plan;
        }
        subscription.period_index += 1;
        subscription.period_start = instant;
        subscription.period_end = next_period_end;
        subscription.draft = Draft { fee: subscription.plan.price.0, ..Draft::default() };
        let monthly_credits = subscription.plan.monthly_credits.0;

        if rolled > 0 {
            self.grants.push(ledger_grant(GrantSource::Rollover, rolled, Some(next_period_end)));
        }
        if monthly_credits > 0 {
            self.add_grant(ledger_grant(GrantSource::MonthlyAllocation, monthly_credits, Some(next_period_end)));
        }
    }

    /// Settles `charged` of an open reservation from its holds in order and
    /// releases the rest.
    fn end_reservation(&mut self, reservation_id: &str, charged: i64, state: ReservationState) {
        let holds = self.reservations[reservation_id].holds.clone();
        let mut to_charge = charged;
        for (index, amount) in holds {
            let charged_here = to_charge.min(amount);
            to_charge -= charged_here;
            let grant = &mut self.grants[index];
            grant.held -= charged_here;
            grant.remaining -= charged_here;
            self.release_hold(index, amount - charged_here);
        }
        self.totals.used += charged;
        self.reservations.get_mut(reservation_id).expect("known reservation").state = state;
    }

    // ---- commands --------------------------------------------------------

    fn decide(&mut self, catalog: &Catalog, command: &MemberCommand, now: Timestamp) -> Result<(), Rejection> {
        match command {
            MemberCommand::Register(profile) => self.register(profile),
            MemberCommand::StartSubscription { plan_id, billing, stripe_subscription_id } => {
                self.start_subscription(catalog, plan_id, *billing, stripe_subscription_id.as_deref(), now)
            }
            MemberCommand::ChangePlan { plan_id } => self.change_plan(catalog, plan_id, now),
            MemberCommand::CancelSubscription { at_period_end } => self.cancel(*at_period_end),
            MemberCommand::GrantCredits(grant) => self.grant(grant, now),
            MemberCommand::DebitCredits { amount, reason } => self.debit(amount.0, reason),
            MemberCommand::RecordUsage(usage) => self.record_usage(usage, now),
            MemberCommand::ReverseUsage { usage_id, reason } => self.reverse_usage(usage_id, reason.as_deref()),
            MemberCommand::Reserve { amount, ttl_s } => self.reserve(amount.0, *ttl_s, now),
            MemberCommand::Settle { reservation_id, amount, query } => {
                self.settle(reservation_id, amount.0, query.as_ref())
            }
            MemberCommand::Release { reservation_id } => self.release(reservation_id),
            MemberCommand::PayInvoice { invoice_id } => self.pay_invoice(invoice_id),
            MemberCommand::RecordPaymentFailed { invoice_id, reason } => {
                self.record_payment_failed(invoice_id, reason.as_deref())
            }
            MemberCommand::VoidInvoice { invoice_id } => self.void_invoice(invoice_id),
            MemberCommand::MarkInvoiceUncollectible { invoice_id } => self.mark_uncollectible(invoice_id),
            MemberCommand::AdvanceTime => Ok(()),
            MemberCommand::Stripe(_) => panic!("the reference model covers tally-billed members only"),
            // Alerts, their settings and webhook endpoints move no credit
            // and no money: the alert reference evaluator models alerts.
            MemberCommand::SetAlertRules { .. }
            | MemberCommand::RaiseAlert(_)
            | MemberCommand::ResolveAlert(_)
            | MemberCommand::CreateWebhookEndpoint { .. }
            | MemberCommand::ChangeWebhookEndpoint { .. }
            | MemberCommand::DisableWebhookEndpoint { .. }
            | MemberCommand::RotateWebhookSecret { .. }
            | MemberCommand::DeleteWebhookEndpoint { .. } => Ok(()),
        }
    }

    fn register(&mut self, profile: &MemberProfile) -> Result<(), Rejection> {
        check(is_time_zone(&profile.time_zone))?;
        check(is_currency(&profile.currency))?;
        if let Some(customer_id) = &profile.stripe_customer_id {
            check(is_identifier(customer_id))?;
        }
        // A live subscription is priced in the member's currency, so the
        // currency cannot change under it.
        if self.live_subscription().is_some() {
            check(profile.currency == self.profile.currency)?;
        }
        self.profile = profile.clone();
        Ok(())
    }

    fn start_subscription(
        &mut self,
        catalog: &Catalog,
        plan_id: &str,
        billing: Billing,
        stripe_subscription_id: Option<&str>,
        now: Timestamp,
    ) -> Result<(), Rejection> {
        assert_eq!(billing, Billing::Tally, "the model covers tally-billed subscriptions only");
        if let Some(subscription_id) = stripe_subscription_id {
            check(is_identifier(subscription_id))?;
        }
        let plan = catalog.plans.get(plan_id).ok_or(NOT_FOUND)?;
        check(!catalog.retired.contains(plan_id))?;
        check(self.live_subscription().is_none())?;
        check(plan.currency == self.profile.currency)?;

        let period_end = period_end(now, 0);
        self.subscription = Some(Subscription {
            plan: plan.clone(),
            status: SubscriptionStatus::Active,
            anchor: now,
            period_index: 0,
            period_start: now,
            period_end,
            cancel_at_period_end: false,
            downgrade: None,
            draft: Draft { fee: plan.price.0, ..Draft::default() },
        });
        if plan.monthly_credits.0 > 0 {
            self.add_grant(ledger_grant(GrantSource::MonthlyAllocation, plan.monthly_credits.0, Some(period_end)));
        }
        Ok(())
    }

    fn change_plan(&mut self, catalog: &Catalog, plan_id: &str, now: Timestamp) -> Result<(), Rejection> {
        let current = self.live_subscription().ok_or(NOT_FOUND)?;
        let plan = catalog.plans.get(plan_id).ok_or(NOT_FOUND)?.clone();
        check(current.plan.plan_id != plan_id)?;
        check(!catalog.retired.contains(plan_id))?;
        check(plan.currency == current.plan.currency)?;

        if plan.price.0 <= current.plan.price.0 {
            // A later change replaces an earlier scheduled one.
            self.live_subscription_mut().expect("live").downgrade = Some(plan);
            return Ok(());
        }
        let remaining_s = (current.period_end - now).num_seconds();
        let period_s = (current.period_end - current.period_start).num_seconds();
        let credits_difference = plan.monthly_credits.0 - current.plan.monthly_credits.0;
        let price_difference = plan.price.0 - current.plan.price.0;
        let proration_credits = prorate(credits_difference, remaining_s, period_s);
        let proration_amount = prorate(price_difference, remaining_s, period_s);
        let period_end = current.period_end;

        let subscription = self.live_subscription_mut().expect("live");
        subscription.plan = plan;
        subscription.downgrade = None;
        subscription.draft.prorations += proration_amount;
        if proration_credits > 0 {
            self.add_grant(ledger_grant(GrantSource::MonthlyAllocation, proration_credits, Some(period_end)));
        }
        Ok(())
    }

    fn cancel(&mut self, at_period_end: bool) -> Result<(), Rejection> {
        let subscription = self.live_subscription_mut().ok_or(NOT_FOUND)?;
        if at_period_end {
            // A second cancel at period end asks for what already holds: accepted, no change.
            subscription.cancel_at_period_end = true;
            return Ok(());
        }
        for index in 0..self.grants.len() {
            let grant = &self.grants[index];
            let allocation = matches!(grant.source, GrantSource::MonthlyAllocation | GrantSource::Rollover);
            if allocation && !grant.expired {
                self.expire_grant(index);
            }
        }
        self.bill_period();
        let subscription = self.subscription.as_mut().expect("canceling a subscription");
        subscription.status = SubscriptionStatus::Canceled;
        subscription.cancel_at_period_end = false;
        subscription.downgrade = None;
        Ok(())
    }

    fn grant(&mut self, command: &GrantCredits, now: Timestamp) -> Result<(), Rejection> {
        let GrantCredits { source, amount, priority, category, expires_at, effective_at, reason, price } = command;
        check(matches!(source, GrantSource::Purchase | GrantSource::Promotional | GrantSource::Adjustment))?;
        check(is_command_credits(amount.0))?;
        check(priority.is_none_or(|priority| priority <= PRIORITY_MAX))?;
        check(category.is_none() || *source == GrantSource::Adjustment)?;
        match reason {
            Some(reason) => check(is_text(reason))?,
            None => check(*source != GrantSource::Adjustment)?,
        }
        if let Some(price) = price {
            check(*source == GrantSource::Purchase)?;
            check((0..=PRICE_MINOR_MAX).contains(&price.0))?;
        }
        if let Some(expires_at) = expires_at {
            let starts_at = effective_at.map_or(now, |effective_at| effective_at.max(now));
            check(*expires_at > starts_at)?;
        }

        let grant = Grant {
            source: *source,
            category: category.unwrap_or_else(|| default_category(*source)),
            priority: priority.unwrap_or_else(|| default_priority(*source)),
            expires_at: *expires_at,
            remaining: amount.0,
            held: 0,
            expired: false,
        };
        let price = price.map_or(0, |price| price.0);
        match effective_at {
            Some(effective_at) if *effective_at > now => {
                self.scheduled.push(ScheduledGrant { effective_at: *effective_at, grant, price });
            }
            _ => {
                self.add_grant(grant);
                self.charge_purchase(price);
            }
        }
        Ok(())
    }

    fn debit(&mut self, amount: i64, reason: &str) -> Result<(), Rejection> {
        check(is_command_credits(amount))?;
        check(is_text(reason))?;
        if amount > self.available() {
            return Err(INSUFFICIENT_CREDITS);
        }
        self.consume(amount);
        self.totals.debited += amount;
        Ok(())
    }

    fn record_usage(&mut self, usage: &RecordUsage, now: Timestamp) -> Result<(), Rejection> {
        let RecordUsage { usage_id, metric, quantity, credits, occurred_at, integration_id, query_id } = usage;
        check(is_identifier(usage_id))?;
        check(is_identifier(metric))?;
        check((1..=QUANTITY_MAX).contains(quantity))?;
        check(is_command_credits(credits.0))?;
        if let Some(occurred_at) = occurred_at {
            let earliest = now - chrono::Duration::seconds(OCCURRED_AT_PAST_MAX_S);
            let latest = now + chrono::Duration::seconds(OCCURRED_AT_FUTURE_MAX_S);
            check((earliest..=latest).contains(occurred_at))?;
        }
        for identifier in [integration_id, query_id].into_iter().flatten() {
            check(is_identifier(identifier))?;
        }
        check(!self.usages.contains_key(usage_id))?;

        let credits = credits.0;
        let available = self.available();
        let shortfall = (credits - available).max(0);
        if shortfall > 0 {
            let overage = self.subscription.as_ref().filter(|subscription| {
                subscription.status == SubscriptionStatus::Active && subscription.plan.overage.allowed
            });
            let Some(subscription) = overage else { return Err(INSUFFICIENT_CREDITS) };
            let headroom = subscription.plan.overage.limit_credits.0 - self.debt();
            if shortfall > headroom {
                return Err(INSUFFICIENT_CREDITS);
            }
            let unit_price = subscription.plan.overage.unit_price.0;
            self.incur_debt(shortfall, unit_price);
        }
        self.consume(credits - shortfall);
        self.totals.used += credits;
        self.usages.insert(usage_id.clone(), Usage { credits, reversed: false });
        Ok(())
    }

    fn reverse_usage(&mut self, usage_id: &str, reason: Option<&str>) -> Result<(), Rejection> {
        if let Some(reason) = reason {
            check(is_text(reason))?;
        }
        let usage = *self.usages.get(usage_id).ok_or(NOT_FOUND)?;
        check(!usage.reversed)?;
        let debt_reduced = self.reduce_debt(usage.credits);
        let refund = usage.credits - debt_reduced;
        if refund > 0 {
            self.add_grant(ledger_grant(GrantSource::Refund, refund, None));
        }
        self.usages.get_mut(usage_id).expect("known usage").reversed = true;
        Ok(())
    }

    fn reserve(&mut self, amount: i64, ttl_s: Option<i64>, now: Timestamp) -> Result<(), Rejection> {
        check(is_command_credits(amount))?;
        let ttl_s = ttl_s.unwrap_or(RESERVATION_TTL_DEFAULT_S);
        check((1..=RESERVATION_TTL_MAX_S).contains(&ttl_s))?;
        if amount > self.available() {
            return Err(INSUFFICIENT_CREDITS);
        }
        let holds = self.hold(amount);
        let reservation_id = format!("#{}", self.reservations.len() + 1);
        let deadline = now + chrono::Duration::seconds(ttl_s);
        let reservation = Reservation { amount, holds, deadline, state: ReservationState::Open };
        self.reservations.insert(reservation_id, reservation);
        Ok(())
    }

    /// The model's id for a reservation reference: `#last` is the latest.
    fn reservation_key(&self, reservation_id: &str) -> String {
        if reservation_id == LAST_RESERVATION_REF {
            format!("#{}", self.reservations.len())
        } else {
            reservation_id.to_owned()
        }
    }

    fn settle(&mut self, reservation_id: &str, amount: i64, query: Option<&QueryExecution>) -> Result<(), Rejection> {
        check((0..=COMMAND_CREDITS_MAX).contains(&amount))?;
        if let Some(query) = query {
            check(is_identifier(&query.integration_id) && is_identifier(&query.query_id))?;
            check(query.duration_ms >= 0 && query.rows >= 0)?;
        }
        let reservation_id = self.reservation_key(reservation_id);
        let reservation = self.reservations.get(&reservation_id).ok_or(NOT_FOUND)?;
        match reservation.state {
            ReservationState::TimedOut => Err(RESERVATION_EXPIRED),
            ReservationState::Settled { charged } => check(charged == amount),
            ReservationState::Released => Err(VALIDATION_FAILED),
            ReservationState::Open => {
                check(amount <= reservation.amount)?;
                self.end_reservation(&reservation_id, amount, ReservationState::Settled { charged: amount });
                Ok(())
            }
        }
    }

    fn release(&mut self, reservation_id: &str) -> Result<(), Rejection> {
        let reservation_id = self.reservation_key(reservation_id);
        let reservation = self.reservations.get(&reservation_id).ok_or(NOT_FOUND)?;
        match reservation.state {
            ReservationState::TimedOut => Err(RESERVATION_EXPIRED),
            ReservationState::Released => Ok(()),
            ReservationState::Settled { .. } => Err(VALIDATION_FAILED),
            ReservationState::Open => {
                self.end_reservation(&reservation_id, 0, ReservationState::Released);
                Ok(())
            }
        }
    }

    fn invoice_index(&self, invoice_id_asked: &str) -> Result<usize, Rejection> {
        (0..self.invoices.len())
            .find(|index| invoice_id(&self.member_id, index + 1) == invoice_id_asked)
            .ok_or(NOT_FOUND)
    }

    fn pay_invoice(&mut self, invoice_id: &str) -> Result<(), Rejection> {
        let index = self.invoice_index(invoice_id)?;
        let invoice = &mut self.invoices[index];
        check(matches!(invoice.status, InvoiceStatus::Open | InvoiceStatus::Uncollectible))?;
        invoice.status = InvoiceStatus::Paid;
        if let Some(subscription) = self.subscription.as_mut()
            && subscription.status == SubscriptionStatus::PastDue
        {
            subscription.status = SubscriptionStatus::Active;
        }
        Ok(())
    }

    fn record_payment_failed(&mut self, invoice_id: &str, reason: Option<&str>) -> Result<(), Rejection> {
        if let Some(reason) = reason {
            check(is_text(reason))?;
        }
        let index = self.invoice_index(invoice_id)?;
        check(self.invoices[index].status == InvoiceStatus::Open)?;
        if let Some(subscription) = self.subscription.as_mut()
            && subscription.status == SubscriptionStatus::Active
        {
            subscription.status = SubscriptionStatus::PastDue;
        }
        Ok(())
    }

    fn void_invoice(&mut self, invoice_id: &str) -> Result<(), Rejection> {
        let index = self.invoice_index(invoice_id)?;
        let invoice = &mut self.invoices[index];
        check(matches!(invoice.status, InvoiceStatus::Open | InvoiceStatus::Uncollectible))?;
        invoice.status = InvoiceStatus::Void;
        Ok(())
    }

    fn mark_uncollectible(&mut self, invoice_id: &str) -> Result<(), Rejection> {
        let index = self.invoice_index(invoice_id)?;
        let invoice = &mut self.invoices[index];
        check(invoice.status == InvoiceStatus::Open)?;
        invoice.status = InvoiceStatus::Uncollectible;
        Ok(())
    }
}

/// A grant the ledger makes itself, with its source's defaults.
fn ledger_grant(source: GrantSource, amount: i64, expires_at: Option<Timestamp>) -> Grant {
    Grant {
        source,
        category: default_category(source),
        priority: default_priority(source),
        expires_at,
        remaining: amount,
        held: 0,
        expired: false,
    }
}

fn default_priority(source: GrantSource) -> u8 {
    match source {
        GrantSource::Rollover => 10,
        GrantSource::MonthlyAllocation => 20,
        GrantSource::Promotional => 30,
        GrantSource::Refund | GrantSource::Adjustment => 40,
        GrantSource::Purchase => 50,
    }
}

fn default_category(source: GrantSource) -> GrantCategory {
    match source {
        GrantSource::Promotional => GrantCategory::Promotional,
        _ => GrantCategory::Paid,
    }
}

/// `amount × part / whole`, floored, in `i128`.
fn prorate(amount: i64, part_s: i64, whole_s: i64) -> i64 {
    let value = (i128::from(amount) * i128::from(part_s)).div_euclid(i128::from(whole_s));
    i64::try_from(value).expect("a prorated value fits")
}

fn check(condition: bool) -> Result<(), Rejection> {
    if condition { Ok(()) } else { Err(VALIDATION_FAILED) }
}

fn is_command_credits(amount: i64) -> bool {
    (1..=COMMAND_CREDITS_MAX).contains(&amount)
}

fn is_identifier(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= IDENTIFIER_LENGTH_MAX
        && value.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"_-.:".contains(&byte))
}

fn is_text(value: &str) -> bool {
    !value.trim().is_empty() && value.chars().count() <= TEXT_LENGTH_MAX && !value.chars().any(char::is_control)
}

fn is_currency(value: &str) -> bool {
    value.len() == 3 && value.bytes().all(|byte| byte.is_ascii_uppercase())
}

fn is_time_zone(value: &str) -> bool {
    value.parse::<chrono_tz::Tz>().is_ok()
}

#[cfg(test)]
mod tests;
