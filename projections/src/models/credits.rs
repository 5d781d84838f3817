//! `credit_balances` and `credit_transactions`, built by one projector.
//!
//! The projector keeps one internal row per live grant (`credit_grants`:
//! remaining, held, expiry, expired) and moves it exactly as the events say:
//! `CreditsDeducted.parts`, `CreditsDebited.parts`, settled parts and a
//! rollover's `transferred_from` reduce `remaining`; reservations move
//! `held`; `CreditsExpired` reduces `remaining` and marks the grant expired.
//! From those rows, with the debt counter, every figure follows by
//! definition (DESIGN.md §3):
//!
//! - available = Σ (remaining − held) over unexpired grants,
//! - held = Σ held (a held part outlives its grant's expiry),
//! - balance = available + held − debt,
//! - next expiry = the soonest `expires_at` among unexpired grants with
//!   spendable credit, and the spendable credit expiring then.
//!
//! Each credit event also appends one `credit_transactions` row whose signed
//! `amount` is the change of the balance it caused, and `balance_after` the
//! balance after it. So the amounts of a member always sum to its balance,
//! at every position, by construction; `credits` holds the event's own
//! figure (a reservation's 0-amount row still says how much it held).
//! A grant with nothing left and nothing held is dropped, as the ledger
//! drops it, which keeps the table bounded by the live grants.
//!
//! Within a batch a member's balance row and grants are read once, moved
//! by each event in memory, and written once at the end of the batch
//! (its transaction rows too, in key order): the same rows as one statement
//! per movement would leave, for a fraction of the statements.

use std::collections::HashMap;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tally_ledger::domain::{GrantPart, MemberEvent, ReleaseReason};

use crate::error::ProjectionError;
use crate::page::{Cursor, Order, Page, PageRequest};
use crate::projector::{BatchState, ProjectedEvent, Projector, ProjectorTx, TableSpec};
use crate::read::Snapshot;
use crate::registry::ReadModel;
use crate::values::{checked, instant_at, instant_text, optional_instant_at, u64_at};
use chrono::{DateTime, Utc};

pub const PROJECTOR_NAME: &str = "credits";
pub const PROJECTOR_VERSION: u32 = 1;

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "credit_balances",
        columns: "member_id TEXT NOT NULL PRIMARY KEY,
            balance INTEGER NOT NULL,
            available INTEGER NOT NULL,
            held INTEGER NOT NULL,
            debt INTEGER NOT NULL,
            granted INTEGER NOT NULL,
            used INTEGER NOT NULL,
            debited INTEGER NOT NULL,
            expired INTEGER NOT NULL,
            debt_incurred INTEGER NOT NULL,
            debt_reduced INTEGER NOT NULL,
            debt_billed INTEGER NOT NULL,
            next_expiry_at TEXT,
            next_expiry_amount INTEGER NOT NULL,
            transactions INTEGER NOT NULL,
            last_position INTEGER NOT NULL,
            updated_at TEXT NOT NULL",
        key: "member_id",
        indexes: &[],
        read_model: "credit_balances",
    },
    TableSpec {
        name: "credit_grants",
        columns: "member_id TEXT NOT NULL,
            grant_id TEXT NOT NULL,
            source TEXT NOT NULL,
            category TEXT NOT NULL,
            priority INTEGER NOT NULL,
            amount INTEGER NOT NULL,
            remaining INTEGER NOT NULL,
            held INTEGER NOT NULL,
            expires_at TEXT,
            expired INTEGER NOT NULL,
            granted_at TEXT NOT NULL,
            position INTEGER NOT NULL,
            PRIMARY KEY (member_id, grant_id)",
        key: "member_id, grant_id",
        indexes: &[],
        read_model: "credit_balances",
    },
    TableSpec {
        name: "credit_transactions",
        columns: "member_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            position INTEGER NOT NULL,
            type TEXT NOT NULL,
            amount INTEGER NOT NULL,
            credits INTEGER NOT NULL,
            balance_after INTEGER NOT NULL,
            grant_id TEXT,
            usage_id TEXT,
            reservation_id TEXT,
            invoice_id TEXT,
            reason TEXT,
            occurred_at TEXT NOT NULL,
            PRIMARY KEY (member_id, seq)",
        key: "member_id, seq",
        indexes: &[],
        read_model: "credit_transactions",
    },
];

const HANDLES: &[&str] = &[
    "MemberRegistered",
    "CreditsGranted",
    "CreditsDeducted",
    "CreditsDebited",
    "CreditsExpired",
    "CreditsReserved",
    "ReservationSettled",
    "ReservationReleased",
    "UsageReversed",
    "InvoiceIssued",
    "SubscriptionPeriodClosed",
    "StripeRefundRecorded",
];

/// The type of a `credit_transactions` row.
pub mod transaction_type {
    pub const USAGE_DEDUCTION: &str = "usage_deduction";
    /// An admin took credits back (`CreditsDebited`).
    pub const DEBIT: &str = "debit";
    pub const EXPIRATION: &str = "expiration";
    /// Credits held: amount 0 (they stay in the balance, as held).
    pub const RESERVATION: &str = "reservation";
    pub const RESERVATION_SETTLEMENT: &str = "reservation_settlement";
    pub const RESERVATION_RELEASE: &str = "reservation_release";
    /// A reversal cutting open debt (`+debt_reduced`); the rest of the usage
    /// comes back as a `refund` grant row.
    pub const USAGE_REVERSAL: &str = "usage_reversal";
    /// Debt billed on an invoice (or handed to Stripe) and cleared.
    pub const OVERAGE_BILLED: &str = "overage_billed";
    /// A Stripe refund took back the refunded share of the credits a payment
    /// bought: out of the grant, as debt, or written off (`credits` counts
    /// all three; the balance moves by the first two).
    pub const STRIPE_REFUND: &str = "stripe_refund";
    // Grants use their source's name: monthly_allocation, rollover (amount
    // 0: a transfer from the ending allocation), purchase, promotional,
    // refund, adjustment.
}

pub struct CreditsProjector;

impl Projector for CreditsProjector {
    fn name(&self) -> &'static str {
        PROJECTOR_NAME
    }

    fn version(&self) -> u32 {
        PROJECTOR_VERSION
    }

    fn handles(&self) -> &'static [&'static str] {
        HANDLES
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    fn apply(&self, tx: &ProjectorTx<'_>, event: &ProjectedEvent<'_>) -> Result<(), ProjectionError> {
        let mut batch = tx.batch_state::<CreditsBatch>();
        batch.apply(tx, event)
    }
}

/// A member's `credit_balances` row.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BalanceRow {
    balance: i64,
    available: i64,
    held: i64,
    debt: i64,
    granted: i64,
    used: i64,
    debited: i64,
    expired: i64,
    debt_incurred: i64,
    debt_reduced: i64,
    debt_billed: i64,
    next_expiry_at: Option<String>,
    next_expiry_amount: i64,
    transactions: i64,
    last_position: i64,
    updated_at: String,
}

impl BalanceRow {
    /// The row of a member first seen at this event: nothing yet.
    fn empty(last_position: i64, updated_at: String) -> BalanceRow {
        BalanceRow {
            balance: 0,
            available: 0,
            held: 0,
            debt: 0,
            granted: 0,
            used: 0,
            debited: 0,
            expired: 0,
            debt_incurred: 0,
            debt_reduced: 0,
            debt_billed: 0,
            next_expiry_at: None,
            next_expiry_amount: 0,
            transactions: 0,
            last_position,
            updated_at,
        }
    }
}

/// One `credit_grants` row, with what the table holds for it.
#[derive(Clone, Debug)]
struct GrantRow {
    grant_id: String,
    source: String,
    category: String,
    priority: i64,
    amount: i64,
    remaining: i64,
    held: i64,
    expires_at: Option<String>,
    expired: bool,
    granted_at: String,
    position: i64,
    /// (remaining, held, expired) as stored; `None` for a grant made in
    /// this batch.
    stored: Option<(i64, i64, bool)>,
}

/// One `credit_transactions` row to insert.
struct TransactionRow {
    seq: i64,
    position: i64,
    kind: &'static str,
    amount: i64,
    credits: i64,
    balance_after: i64,
    grant_id: Option<String>,
    usage_id: Option<String>,
    reservation_id: Option<String>,
    invoice_id: Option<String>,
    reason: Option<String>,
    occurred_at: String,
}

/// A member's rows during a batch: read once, moved by each event in
/// memory, written once by [`CreditsBatch::flush`].
struct MemberCredits {
    balance: BalanceRow,
    /// Whether `balance` differs from the stored row (or no row is stored).
    balance_changed: bool,
    /// Every grant the member has, as the table would hold it now.
    grants: Vec<GrantRow>,
    /// Stored grants dropped (exhausted) during the batch.
    dropped: Vec<String>,
    /// The member's new `credit_transactions` rows, in log order.
    transactions: Vec<TransactionRow>,
}

/// The credits projector's batch state.
#[derive(Default)]
pub(crate) struct CreditsBatch {
    members: HashMap<String, MemberCredits>,
}

/// What one event adds to `credit_transactions`.
struct Entry<'event> {
    kind: &'static str,
    credits: i64,
    grant_id: Option<&'event str>,
    usage_id: Option<&'event str>,
    reservation_id: Option<&'event str>,
    invoice_id: Option<&'event str>,
    reason: Option<&'event str>,
}

impl<'event> Entry<'event> {
    fn new(kind: &'static str, credits: i64) -> Entry<'event> {
        Entry { kind, credits, grant_id: None, usage_id: None, reservation_id: None, invoice_id: None, reason: None }
    }
}

/// How a grant movement changes a grant, and when it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Movement {
    /// Spend unheld credit of an unexpired grant.
    TakeRemaining,
    /// Spend held credit (a settled part).
    TakeHeld,
    /// Hold unheld credit of an unexpired grant.
    Hold,
    /// Give held credit back (a released part).
    Unhold,
    /// Lapse unheld credit, and mark the grant expired.
    Expire,
}

const SELECT_BALANCE: &str = "SELECT balance, available, held, debt, granted, used, debited, expired, debt_incurred,
    debt_reduced, debt_billed, next_expiry_at, next_expiry_amount, transactions, last_position, updated_at
    FROM {credit_balances} WHERE member_id = ?1";
const WRITE_BALANCE: &str = "INSERT OR REPLACE INTO {credit_balances} (member_id, balance, available, held, debt,
    granted, used, debited, expired, debt_incurred, debt_reduced, debt_billed, next_expiry_at, next_expiry_amount,
    transactions, last_position, updated_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";
const SELECT_GRANTS: &str = "SELECT grant_id, source, category, priority, amount, remaining, held, expires_at, expired,
    granted_at, position FROM {credit_grants} WHERE member_id = ?1";
const INSERT_GRANT: &str = "INSERT INTO {credit_grants} (member_id, grant_id, source, category, priority, amount,
    remaining, held, expires_at, expired, granted_at, position) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";
const UPDATE_GRANT: &str = "UPDATE {credit_grants} SET remaining = ?3, held = ?4, expired = ?5
    WHERE member_id = ?1 AND grant_id = ?2";
const DELETE_GRANT: &str = "DELETE FROM {credit_grants} WHERE member_id = ?1 AND grant_id = ?2";
const INSERT_TRANSACTION: &str = "INSERT INTO {credit_transactions} (member_id, seq, position, type, amount,
    credits, balance_after, grant_id, usage_id, reservation_id, invoice_id, reason, occurred_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";

impl CreditsBatch {
    fn apply(&mut self, tx: &ProjectorTx<'_>, event: &ProjectedEvent<'_>) -> Result<(), ProjectionError> {
        let position = crate::storage::to_sql_integer(event.position());
        if !self.members.contains_key(event.member_id) {
            let member = load_member(tx, event.member_id, position, || instant_text(event.occurred_at))?;
            self.members.insert(event.member_id.to_owned(), member);
        }
        let member = self.members.get_mut(event.member_id).expect("loaded above");
        let apply = Apply { event };
        let before = member.balance.balance;
        let Some(entry) = apply.apply_event(member)? else { return Ok(()) };
        member.drop_exhausted();
        let (available, held) = apply.sums(&member.grants)?;
        let next_expiry = apply.next_expiry(&member.grants)?;
        let balance = apply.difference(apply.sum(available, held)?, member.balance.debt)?;
        let amount = apply.difference(balance, before)?;
        let occurred_at = instant_text(event.occurred_at);
        let row = &mut member.balance;
        row.balance = balance;
        row.available = available;
        row.held = held;
        row.transactions = apply.sum(row.transactions, 1)?;
        (row.next_expiry_at, row.next_expiry_amount) = match next_expiry {
            Some((at, amount)) => (Some(at.to_owned()), amount),
            None => (None, 0),
        };
        row.last_position = position;
        row.updated_at.clone_from(&occurred_at);
        member.balance_changed = true;
        member.transactions.push(TransactionRow {
            seq: row.transactions,
            position,
            kind: entry.kind,
            amount,
            credits: entry.credits,
            balance_after: balance,
            grant_id: entry.grant_id.map(str::to_owned),
            usage_id: entry.usage_id.map(str::to_owned),
            reservation_id: entry.reservation_id.map(str::to_owned),
            invoice_id: entry.invoice_id.map(str::to_owned),
            reason: entry.reason.map(str::to_owned),
            occurred_at,
        });
        Ok(())
    }
}

impl BatchState for CreditsBatch {
    fn flush(&mut self, tx: &ProjectorTx<'_>) -> Result<(), ProjectionError> {
        // In key order, so that each member's rows go into the same pages
        // one after the other.
        let mut members: Vec<(&String, &MemberCredits)> = self.members.iter().collect();
        members.sort_unstable_by_key(|(member_id, _)| *member_id);
        for (member_id, member) in members {
            member.write(tx, member_id)?;
        }
        Ok(())
    }
}

/// Reads a member's balance row and grants, or makes the empty row a member
/// gets at the first event this projector handles for it.
fn load_member(
    tx: &ProjectorTx<'_>,
    member_id: &str,
    position: i64,
    occurred_at: impl FnOnce() -> String,
) -> Result<MemberCredits, ProjectionError> {
    let stored = tx
        .statement(SELECT_BALANCE)?
        .query_row(params![member_id], |row| {
            Ok(BalanceRow {
                balance: row.get(0)?,
                available: row.get(1)?,
                held: row.get(2)?,
                debt: row.get(3)?,
                granted: row.get(4)?,
                used: row.get(5)?,
                debited: row.get(6)?,
                expired: row.get(7)?,
                debt_incurred: row.get(8)?,
                debt_reduced: row.get(9)?,
                debt_billed: row.get(10)?,
                next_expiry_at: row.get(11)?,
                next_expiry_amount: row.get(12)?,
                transactions: row.get(13)?,
                last_position: row.get(14)?,
                updated_at: row.get(15)?,
            })
        })
        .optional()?;
    let Some(balance) = stored else {
        let balance = BalanceRow::empty(position, occurred_at());
        return Ok(MemberCredits {
            balance,
            balance_changed: true,
            grants: Vec::new(),
            dropped: Vec::new(),
            transactions: Vec::new(),
        });
    };
    let grants = tx
        .statement(SELECT_GRANTS)?
        .query_map(params![member_id], |row| {
            let remaining: i64 = row.get(5)?;
            let held: i64 = row.get(6)?;
            let expired = row.get::<_, i64>(8)? != 0;
            Ok(GrantRow {
                grant_id: row.get(0)?,
                source: row.get(1)?,
                category: row.get(2)?,
                priority: row.get(3)?,
                amount: row.get(4)?,
                remaining,
                held,
                expires_at: row.get(7)?,
                expired,
                granted_at: row.get(9)?,
                position: row.get(10)?,
                stored: Some((remaining, held, expired)),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MemberCredits { balance, balance_changed: false, grants, dropped: Vec::new(), transactions: Vec::new() })
}

impl MemberCredits {
    /// A grant with nothing left and nothing held goes, as in the ledger.
    fn drop_exhausted(&mut self) {
        let dropped = &mut self.dropped;
        self.grants.retain(|grant| {
            let exhausted = grant.remaining == 0 && grant.held == 0;
            if exhausted && grant.stored.is_some() {
                dropped.push(grant.grant_id.clone());
            }
            !exhausted
        });
    }

    fn write(&self, tx: &ProjectorTx<'_>, member_id: &str) -> Result<(), ProjectionError> {
        // Deletes first: a grant id dropped and granted again in one batch
        // is deleted, then inserted anew.
        for grant_id in &self.dropped {
            tx.statement(DELETE_GRANT)?.execute(params![member_id, grant_id])?;
        }
        for grant in &self.grants {
            let now = (grant.remaining, grant.held, grant.expired);
            match grant.stored {
                Some(stored) if stored == now => {}
                Some(_) => {
                    tx.statement(UPDATE_GRANT)?.execute(params![
                        member_id,
                        grant.grant_id,
                        grant.remaining,
                        grant.held,
                        i64::from(grant.expired)
                    ])?;
                }
                None => {
                    tx.statement(INSERT_GRANT)?.execute(params![
                        member_id,
                        grant.grant_id,
                        grant.source,
                        grant.category,
                        grant.priority,
                        grant.amount,
                        grant.remaining,
                        grant.held,
                        grant.expires_at,
                        i64::from(grant.expired),
                        grant.granted_at,
                        grant.position,
                    ])?;
                }
            }
        }
        let mut insert = tx.statement(INSERT_TRANSACTION)?;
        for row in &self.transactions {
            insert.execute(params![
                member_id,
                row.seq,
                row.position,
                row.kind,
                row.amount,
                row.credits,
                row.balance_after,
                row.grant_id,
                row.usage_id,
                row.reservation_id,
                row.invoice_id,
                row.reason,
                row.occurred_at,
            ])?;
        }
        if self.balance_changed {
            let row = &self.balance;
            tx.statement(WRITE_BALANCE)?.execute(params![
                member_id,
                row.balance,
                row.available,
                row.held,
                row.debt,
                row.granted,
                row.used,
                row.debited,
                row.expired,
                row.debt_incurred,
                row.debt_reduced,
                row.debt_billed,
                row.next_expiry_at,
                row.next_expiry_amount,
                row.transactions,
                row.last_position,
                row.updated_at,
            ])?;
        }
        Ok(())
    }
}

/// The rules of one event, on a member's rows in memory.
struct Apply<'tx, 'event> {
    event: &'tx ProjectedEvent<'event>,
}

impl<'event> Apply<'_, 'event> {
    fn inconsistent(&self, reason: impl Into<String>) -> ProjectionError {
        self.event.inconsistent(PROJECTOR_NAME, reason)
    }

    fn sum(&self, left: i64, right: i64) -> Result<i64, ProjectionError> {
        checked(left.checked_add(right), PROJECTOR_NAME, self.event.position())
    }

    fn difference(&self, left: i64, right: i64) -> Result<i64, ProjectionError> {
        checked(left.checked_sub(right), PROJECTOR_NAME, self.event.position())
    }

    /// Moves grants and counters as the event says; returns the
    /// transaction row it makes, if any.
    fn apply_event(&self, member: &mut MemberCredits) -> Result<Option<Entry<'event>>, ProjectionError> {
        let event: &'event MemberEvent = self.event.event;
        let counters = &mut member.balance;
        let grants = &mut member.grants;
        let entry = match event {
            MemberEvent::MemberRegistered { .. } => return Ok(None),
            MemberEvent::CreditsGranted { grant_id, terms, transferred_from, usage_id, .. } => {
                self.move_parts(grants, Movement::TakeRemaining, transferred_from, "transfer")?;
                self.insert_grant(grants, grant_id, terms)?;
                // Rolled credit is a transfer, not new credit.
                if transferred_from.is_empty() {
                    counters.granted = self.sum(counters.granted, terms.amount.0)?;
                }
                Entry {
                    grant_id: Some(grant_id),
                    usage_id: usage_id.as_deref(),
                    reason: terms.reason.as_deref(),
                    ..Entry::new(terms.source.as_str(), terms.amount.0)
                }
            }
            MemberEvent::CreditsDeducted { usage_id, amount, parts, debt, .. } => {
                self.move_parts(grants, Movement::TakeRemaining, parts, "deduction")?;
                counters.used = self.sum(counters.used, amount.0)?;
                counters.debt = self.sum(counters.debt, debt.0)?;
                counters.debt_incurred = self.sum(counters.debt_incurred, debt.0)?;
                Entry { usage_id: Some(usage_id), ..Entry::new(transaction_type::USAGE_DEDUCTION, amount.0) }
            }
            MemberEvent::CreditsDebited { amount, parts, reason } => {
                self.move_parts(grants, Movement::TakeRemaining, parts, "debit")?;
                counters.debited = self.sum(counters.debited, amount.0)?;
                Entry { reason: Some(reason), ..Entry::new(transaction_type::DEBIT, amount.0) }
            }
            MemberEvent::CreditsExpired { grant_id, amount } => {
                let part = GrantPart { grant_id: grant_id.clone(), amount: *amount };
                self.move_parts(grants, Movement::Expire, std::slice::from_ref(&part), "expiry")?;
                counters.expired = self.sum(counters.expired, amount.0)?;
                Entry { grant_id: Some(grant_id), ..Entry::new(transaction_type::EXPIRATION, amount.0) }
            }
            MemberEvent::CreditsReserved { reservation_id, amount, holds, .. } => {
                self.move_parts(grants, Movement::Hold, holds, "hold")?;
                Entry { reservation_id: Some(reservation_id), ..Entry::new(transaction_type::RESERVATION, amount.0) }
            }
            MemberEvent::ReservationSettled { reservation_id, charged, parts, released_parts, .. } => {
                self.move_parts(grants, Movement::TakeHeld, parts, "settled part")?;
                self.move_parts(grants, Movement::Unhold, released_parts, "released part")?;
                counters.used = self.sum(counters.used, charged.0)?;
                Entry {
                    reservation_id: Some(reservation_id),
                    ..Entry::new(transaction_type::RESERVATION_SETTLEMENT, charged.0)
                }
            }
            MemberEvent::ReservationReleased { reservation_id, reason, released, released_parts } => {
                self.move_parts(grants, Movement::Unhold, released_parts, "released part")?;
                let reason = match reason {
                    ReleaseReason::Released => "released",
                    ReleaseReason::Expired => "expired",
                };
                Entry {
                    reservation_id: Some(reservation_id),
                    reason: Some(reason),
                    ..Entry::new(transaction_type::RESERVATION_RELEASE, released.0)
                }
            }
            MemberEvent::UsageReversed { usage_id, credits, debt_reduced, reason, .. } => {
                counters.debt = self.difference(counters.debt, debt_reduced.0)?;
                counters.debt_reduced = self.sum(counters.debt_reduced, debt_reduced.0)?;
                Entry {
                    usage_id: Some(usage_id),
                    reason: reason.as_deref(),
                    ..Entry::new(transaction_type::USAGE_REVERSAL, credits.0)
                }
            }
            MemberEvent::InvoiceIssued { invoice_id, debt_cleared, .. } => {
                if !debt_cleared.is_positive() {
                    return Ok(None);
                }
                self.clear_debt(counters, debt_cleared.0)?;
                Entry { invoice_id: Some(invoice_id), ..Entry::new(transaction_type::OVERAGE_BILLED, debt_cleared.0) }
            }
            MemberEvent::SubscriptionPeriodClosed { debt_cleared, .. } => {
                if !debt_cleared.is_positive() {
                    return Ok(None);
                }
                self.clear_debt(counters, debt_cleared.0)?;
                Entry::new(transaction_type::OVERAGE_BILLED, debt_cleared.0)
            }
            MemberEvent::StripeRefundRecorded { parts, debt, written_off, grant_id, invoice_id, .. } => {
                let mut taken = 0i64;
                for part in parts {
                    taken = self.sum(taken, part.amount.0)?;
                }
                let moved = self.sum(taken, debt.0)?;
                let credits = self.sum(moved, written_off.0)?;
                if credits == 0 {
                    return Ok(None);
                }
                self.move_parts(grants, Movement::TakeRemaining, parts, "refund")?;
                counters.debited = self.sum(counters.debited, moved)?;
                counters.debt = self.sum(counters.debt, debt.0)?;
                counters.debt_incurred = self.sum(counters.debt_incurred, debt.0)?;
                Entry {
                    grant_id: grant_id.as_deref(),
                    invoice_id: invoice_id.as_deref(),
                    ..Entry::new(transaction_type::STRIPE_REFUND, credits)
                }
            }
            _ => return Ok(None),
        };
        if counters.debt < 0 {
            return Err(self.inconsistent(format!("debt would become {}", counters.debt)));
        }
        Ok(Some(entry))
    }

    fn clear_debt(&self, counters: &mut BalanceRow, cleared: i64) -> Result<(), ProjectionError> {
        counters.debt = self.difference(counters.debt, cleared)?;
        counters.debt_billed = self.sum(counters.debt_billed, cleared)?;
        Ok(())
    }

    fn insert_grant(
        &self,
        grants: &mut Vec<GrantRow>,
        grant_id: &str,
        terms: &tally_ledger::domain::GrantTerms,
    ) -> Result<(), ProjectionError> {
        if grants.iter().any(|grant| grant.grant_id == grant_id) {
            return Err(self.inconsistent(format!("grant {grant_id} is granted twice")));
        }
        let category = match terms.category {
            tally_ledger::domain::GrantCategory::Promotional => "promotional",
            tally_ledger::domain::GrantCategory::Paid => "paid",
        };
        grants.push(GrantRow {
            grant_id: grant_id.to_owned(),
            source: terms.source.as_str().to_owned(),
            category: category.to_owned(),
            priority: i64::from(terms.priority),
            amount: terms.amount.0,
            remaining: terms.amount.0,
            held: 0,
            expires_at: terms.expires_at.map(instant_text),
            expired: false,
            granted_at: instant_text(self.event.occurred_at),
            position: crate::storage::to_sql_integer(self.event.position()),
            stored: None,
        });
        Ok(())
    }

    /// Applies one grant movement per part; a part the grant cannot give is
    /// a contradiction of the log.
    fn move_parts(
        &self,
        grants: &mut [GrantRow],
        movement: Movement,
        parts: &[GrantPart],
        what: &str,
    ) -> Result<(), ProjectionError> {
        for part in parts {
            let amount = part.amount.0;
            if amount < 0 {
                return Err(self.inconsistent(format!("a {what} of {} on grant {}", part.amount, part.grant_id)));
            }
            let grant = grants.iter_mut().find(|grant| grant.grant_id == part.grant_id);
            let moved = grant.is_some_and(|grant| move_grant(grant, movement, amount));
            if !moved {
                return Err(self.inconsistent(format!(
                    "grant {} cannot take a {what} of {} (unknown, expired or short)",
                    part.grant_id, part.amount
                )));
            }
        }
        Ok(())
    }

    /// Available (the unheld rest of unexpired grants) and held.
    fn sums(&self, grants: &[GrantRow]) -> Result<(i64, i64), ProjectionError> {
        let (mut available, mut held) = (0i64, 0i64);
        for grant in grants {
            if !grant.expired {
                available = self.sum(available, self.difference(grant.remaining, grant.held)?)?;
            }
            held = self.sum(held, grant.held)?;
        }
        Ok((available, held))
    }

    /// The soonest expiry among unexpired grants with spendable credit, and
    /// the spendable credit of every grant expiring then.
    fn next_expiry<'grants>(
        &self,
        grants: &'grants [GrantRow],
    ) -> Result<Option<(&'grants str, i64)>, ProjectionError> {
        let spendable = || {
            grants
                .iter()
                .filter(|grant| !grant.expired && grant.remaining > grant.held)
                .filter_map(|grant| grant.expires_at.as_deref().map(|at| (at, grant)))
        };
        let Some(soonest) = spendable().map(|(at, _)| at).min() else { return Ok(None) };
        let mut amount = 0i64;
        for (_, grant) in spendable().filter(|(at, _)| *at == soonest) {
            amount = self.sum(amount, self.difference(grant.remaining, grant.held)?)?;
        }
        Ok(Some((soonest, amount)))
    }
}

/// Moves one part on one grant if the grant can give it, as the conditions
/// of [`Movement`] say; false (nothing moved) otherwise.
fn move_grant(grant: &mut GrantRow, movement: Movement, amount: i64) -> bool {
    // In i128: the conditions compare exactly whatever the figures.
    let unheld = i128::from(grant.remaining) - i128::from(grant.held);
    let (remaining, held, expired) = match movement {
        Movement::TakeRemaining if !grant.expired && unheld >= i128::from(amount) => {
            (grant.remaining.checked_sub(amount), Some(grant.held), grant.expired)
        }
        Movement::TakeHeld if grant.held >= amount => {
            (grant.remaining.checked_sub(amount), grant.held.checked_sub(amount), grant.expired)
        }
        Movement::Hold if !grant.expired && unheld >= i128::from(amount) => {
            (Some(grant.remaining), grant.held.checked_add(amount), grant.expired)
        }
        Movement::Unhold if grant.held >= amount => {
            (Some(grant.remaining), grant.held.checked_sub(amount), grant.expired)
        }
        Movement::Expire if unheld >= i128::from(amount) => {
            (grant.remaining.checked_sub(amount), Some(grant.held), true)
        }
        _ => return false,
    };
    let (Some(remaining), Some(held)) = (remaining, held) else { return false };
    grant.remaining = remaining;
    grant.held = held;
    grant.expired = expired;
    true
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

/// A member's credit position, from `credit_balances`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub member_id: String,
    /// available + held − debt; negative when debt exceeds credit.
    pub balance: i64,
    /// Spendable now: the unheld rest of unexpired grants.
    pub available: i64,
    pub held: i64,
    /// Overage not yet billed.
    pub debt: i64,
    /// Credits granted, rollover transfers excluded.
    pub granted: i64,
    /// Charged by usage and settled reservations.
    pub used: i64,
    /// Taken back by admins.
    pub debited: i64,
    /// Breakage: credit that lapsed.
    pub expired: i64,
    /// Debt ever incurred, gross (a reversal's cut included).
    pub debt_incurred: i64,
    pub debt_reduced: i64,
    pub debt_billed: i64,
    pub next_expiry: Option<NextExpiry>,
    /// How many `credit_transactions` rows the member has.
    pub transactions: u64,
    /// The position of the last event that changed this row.
    pub last_position: u64,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NextExpiry {
    pub at: DateTime<Utc>,
    /// The credit spendable now that lapses then, unless spent first.
    pub amount: i64,
}

/// One `credit_transactions` row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CreditTransaction {
    /// 1, 2, 3, … per member, in log order.
    pub seq: u64,
    pub position: u64,
    /// A grant source (`monthly_allocation`, `rollover`, `purchase`,
    /// `promotional`, `refund`, `adjustment`) or one of [`transaction_type`].
    #[serde(rename = "type")]
    pub kind: String,
    /// The signed change of the balance.
    pub amount: i64,
    /// The event's own figure: credits granted, charged, held, expired, …
    pub credits: i64,
    pub balance_after: i64,
    pub grant_id: Option<String>,
    pub usage_id: Option<String>,
    pub reservation_id: Option<String>,
    pub invoice_id: Option<String>,
    pub reason: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

/// One live grant, from the internal `credit_grants` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub grant_id: String,
    pub source: String,
    pub category: String,
    pub priority: u8,
    pub amount: i64,
    /// What is left, held part included.
    pub remaining: i64,
    pub held: i64,
    pub expires_at: Option<DateTime<Utc>>,
    /// Lapsed; only a held part may remain, until its reservation ends.
    pub expired: bool,
    pub granted_at: DateTime<Utc>,
    pub position: u64,
}

pub(crate) fn balance(snapshot: &Snapshot<'_>, member_id: &str) -> Result<Option<Balance>, ProjectionError> {
    let mut statement = snapshot.statement(
        ReadModel::CreditBalances,
        "SELECT member_id, balance, available, held, debt, granted, used, debited, expired, debt_incurred,
            debt_reduced, debt_billed, next_expiry_at, next_expiry_amount, transactions, last_position, updated_at
         FROM {credit_balances} WHERE member_id = ?1",
    )?;
    let balance = statement
        .query_row(params![member_id], |row| {
            let next_expiry_at = optional_instant_at(row, 12)?;
            let next_expiry_amount: i64 = row.get(13)?;
            Ok(Balance {
                member_id: row.get(0)?,
                balance: row.get(1)?,
                available: row.get(2)?,
                held: row.get(3)?,
                debt: row.get(4)?,
                granted: row.get(5)?,
                used: row.get(6)?,
                debited: row.get(7)?,
                expired: row.get(8)?,
                debt_incurred: row.get(9)?,
                debt_reduced: row.get(10)?,
                debt_billed: row.get(11)?,
                next_expiry: next_expiry_at.map(|at| NextExpiry { at, amount: next_expiry_amount }),
                transactions: u64_at(row, 14)?,
                last_position: u64_at(row, 15)?,
                updated_at: instant_at(row, 16)?,
            })
        })
        .optional()?;
    Ok(balance)
}

pub(crate) fn grants(snapshot: &Snapshot<'_>, member_id: &str) -> Result<Vec<Grant>, ProjectionError> {
    let mut statement = snapshot.statement(
        ReadModel::CreditBalances,
        "SELECT grant_id, source, category, priority, amount, remaining, held, expires_at, expired, granted_at,
            position FROM {credit_grants} WHERE member_id = ?1 ORDER BY position, grant_id",
    )?;
    let rows = statement.query_map(params![member_id], |row| {
        Ok(Grant {
            grant_id: row.get(0)?,
            source: row.get(1)?,
            category: row.get(2)?,
            priority: row.get(3)?,
            amount: row.get(4)?,
            remaining: row.get(5)?,
            held: row.get(6)?,
            expires_at: optional_instant_at(row, 7)?,
            expired: row.get::<_, i64>(8)? != 0,
            granted_at: instant_at(row, 9)?,
            position: u64_at(row, 10)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

const TRANSACTION_COLUMNS: &str = "seq, position, type, amount, credits, balance_after, grant_id, usage_id,
    reservation_id, invoice_id, reason, occurred_at";

pub(crate) fn transactions(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    page: &PageRequest,
) -> Result<Page<CreditTransaction>, ProjectionError> {
    let limit = page.checked_limit()?;
    let after = page.after.as_ref().map(Cursor::sequence).transpose()?;
    let template = match page.order {
        Order::OldestFirst => {
            "SELECT {columns} FROM {credit_transactions} WHERE member_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
        }
        Order::NewestFirst => {
            "SELECT {columns} FROM {credit_transactions} WHERE member_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
        }
    };
    let bound = match (page.order, after) {
        (_, Some(sequence)) => crate::storage::to_sql_integer(sequence),
        (Order::OldestFirst, None) => 0,
        (Order::NewestFirst, None) => i64::MAX,
    };
    let sql = template.replace("{columns}", TRANSACTION_COLUMNS);
    let sql = snapshot.render(PROJECTOR_NAME, ReadModel::CreditTransactions.name(), &sql)?;
    let mut statement = snapshot.connection().prepare_cached(&sql)?;
    let rows = statement.query_map(params![member_id, bound, (limit + 1) as i64], |row| {
        Ok(CreditTransaction {
            seq: u64_at(row, 0)?,
            position: u64_at(row, 1)?,
            kind: row.get(2)?,
            amount: row.get(3)?,
            credits: row.get(4)?,
            balance_after: row.get(5)?,
            grant_id: row.get(6)?,
            usage_id: row.get(7)?,
            reservation_id: row.get(8)?,
            invoice_id: row.get(9)?,
            reason: row.get(10)?,
            occurred_at: instant_at(row, 11)?,
        })
    })?;
    let rows = rows.collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(rows, limit, |transaction| Cursor::from_sequence(transaction.seq)))
}
