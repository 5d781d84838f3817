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

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tally_ledger::domain::{GrantPart, MemberEvent, ReleaseReason};

use crate::error::ProjectionError;
use crate::page::{Cursor, Order, Page, PageRequest};
use crate::projector::{ProjectedEvent, Projector, ProjectorTx, TableSpec};
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
        let mut apply = Apply { tx, event, member_id: event.member_id };
        apply.run()
    }
}

/// The counters of a member's balance row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    balance: i64,
    debt: i64,
    granted: i64,
    used: i64,
    debited: i64,
    expired: i64,
    debt_incurred: i64,
    debt_reduced: i64,
    debt_billed: i64,
    transactions: i64,
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

const INSERT_BALANCE: &str = "INSERT OR IGNORE INTO {credit_balances} (member_id, balance, available, held, debt,
    granted, used, debited, expired, debt_incurred, debt_reduced, debt_billed, next_expiry_at, next_expiry_amount,
    transactions, last_position, updated_at) VALUES (?1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, 0, 0, ?2, ?3)";
const SELECT_COUNTERS: &str = "SELECT balance, debt, granted, used, debited, expired, debt_incurred, debt_reduced,
    debt_billed, transactions FROM {credit_balances} WHERE member_id = ?1";
const UPDATE_BALANCE: &str = "UPDATE {credit_balances} SET balance = ?2, available = ?3, held = ?4, debt = ?5,
    granted = ?6, used = ?7, debited = ?8, expired = ?9, debt_incurred = ?10, debt_reduced = ?11, debt_billed = ?12,
    next_expiry_at = ?13, next_expiry_amount = ?14, transactions = ?15, last_position = ?16, updated_at = ?17
    WHERE member_id = ?1";
const INSERT_GRANT: &str = "INSERT INTO {credit_grants} (member_id, grant_id, source, category, priority, amount,
    remaining, held, expires_at, expired, granted_at, position) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 0, ?7, 0, ?8, ?9)";
const TAKE_REMAINING: &str = "UPDATE {credit_grants} SET remaining = remaining - ?3
    WHERE member_id = ?1 AND grant_id = ?2 AND expired = 0 AND remaining - held >= ?3";
const TAKE_HELD: &str = "UPDATE {credit_grants} SET remaining = remaining - ?3, held = held - ?3
    WHERE member_id = ?1 AND grant_id = ?2 AND held >= ?3";
const HOLD: &str = "UPDATE {credit_grants} SET held = held + ?3
    WHERE member_id = ?1 AND grant_id = ?2 AND expired = 0 AND remaining - held >= ?3";
const UNHOLD: &str = "UPDATE {credit_grants} SET held = held - ?3
    WHERE member_id = ?1 AND grant_id = ?2 AND held >= ?3";
const EXPIRE: &str = "UPDATE {credit_grants} SET remaining = remaining - ?3, expired = 1
    WHERE member_id = ?1 AND grant_id = ?2 AND remaining - held >= ?3";
const DROP_EXHAUSTED: &str = "DELETE FROM {credit_grants} WHERE member_id = ?1 AND remaining = 0 AND held = 0";
const SUM_GRANTS: &str = "SELECT coalesce(sum(CASE WHEN expired = 0 THEN remaining - held ELSE 0 END), 0),
    coalesce(sum(held), 0) FROM {credit_grants} WHERE member_id = ?1";
const NEXT_EXPIRY: &str = "SELECT expires_at, sum(remaining - held) FROM {credit_grants}
    WHERE member_id = ?1 AND expired = 0 AND expires_at IS NOT NULL AND remaining > held
    GROUP BY expires_at ORDER BY expires_at LIMIT 1";
const INSERT_TRANSACTION: &str = "INSERT INTO {credit_transactions} (member_id, seq, position, type, amount,
    credits, balance_after, grant_id, usage_id, reservation_id, invoice_id, reason, occurred_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";

struct Apply<'tx, 'conn, 'event> {
    tx: &'tx ProjectorTx<'conn>,
    event: &'tx ProjectedEvent<'event>,
    member_id: &'event str,
}

impl<'event> Apply<'_, '_, 'event> {
    fn inconsistent(&self, reason: impl Into<String>) -> ProjectionError {
        self.event.inconsistent(PROJECTOR_NAME, reason)
    }

    fn sum(&self, left: i64, right: i64) -> Result<i64, ProjectionError> {
        checked(left.checked_add(right), PROJECTOR_NAME, self.event.position())
    }

    fn difference(&self, left: i64, right: i64) -> Result<i64, ProjectionError> {
        checked(left.checked_sub(right), PROJECTOR_NAME, self.event.position())
    }

    fn run(&mut self) -> Result<(), ProjectionError> {
        self.ensure_balance_row()?;
        let before = self.counters()?;
        let mut counters = before;
        let Some(entry) = self.apply_event(&mut counters)? else { return Ok(()) };
        self.tx.statement(DROP_EXHAUSTED)?.execute(params![self.member_id])?;
        self.write(before, counters, entry)
    }

    fn ensure_balance_row(&self) -> Result<(), ProjectionError> {
        let occurred_at = instant_text(self.event.occurred_at);
        let position = crate::storage::to_sql_integer(self.event.position());
        self.tx.statement(INSERT_BALANCE)?.execute(params![self.member_id, position, occurred_at])?;
        Ok(())
    }

    fn counters(&self) -> Result<Counters, ProjectionError> {
        Ok(self.tx.statement(SELECT_COUNTERS)?.query_row(params![self.member_id], |row| {
            Ok(Counters {
                balance: row.get(0)?,
                debt: row.get(1)?,
                granted: row.get(2)?,
                used: row.get(3)?,
                debited: row.get(4)?,
                expired: row.get(5)?,
                debt_incurred: row.get(6)?,
                debt_reduced: row.get(7)?,
                debt_billed: row.get(8)?,
                transactions: row.get(9)?,
            })
        })?)
    }

    /// Moves grants and counters as the event says; returns the
    /// transaction row it makes, if any.
    fn apply_event(&self, counters: &mut Counters) -> Result<Option<Entry<'event>>, ProjectionError> {
        let event: &'event MemberEvent = self.event.event;
        let entry = match event {
            MemberEvent::MemberRegistered { .. } => return Ok(None),
            MemberEvent::CreditsGranted { grant_id, terms, transferred_from, usage_id, .. } => {
                self.move_parts(TAKE_REMAINING, transferred_from, "transfer")?;
                self.insert_grant(grant_id, terms)?;
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
                self.move_parts(TAKE_REMAINING, parts, "deduction")?;
                counters.used = self.sum(counters.used, amount.0)?;
                counters.debt = self.sum(counters.debt, debt.0)?;
                counters.debt_incurred = self.sum(counters.debt_incurred, debt.0)?;
                Entry { usage_id: Some(usage_id), ..Entry::new(transaction_type::USAGE_DEDUCTION, amount.0) }
            }
            MemberEvent::CreditsDebited { amount, parts, reason } => {
                self.move_parts(TAKE_REMAINING, parts, "debit")?;
                counters.debited = self.sum(counters.debited, amount.0)?;
                Entry { reason: Some(reason), ..Entry::new(transaction_type::DEBIT, amount.0) }
            }
            MemberEvent::CreditsExpired { grant_id, amount } => {
                let part = GrantPart { grant_id: grant_id.clone(), amount: *amount };
                self.move_parts(EXPIRE, std::slice::from_ref(&part), "expiry")?;
                counters.expired = self.sum(counters.expired, amount.0)?;
                Entry { grant_id: Some(grant_id), ..Entry::new(transaction_type::EXPIRATION, amount.0) }
            }
            MemberEvent::CreditsReserved { reservation_id, amount, holds, .. } => {
                self.move_parts(HOLD, holds, "hold")?;
                Entry { reservation_id: Some(reservation_id), ..Entry::new(transaction_type::RESERVATION, amount.0) }
            }
            MemberEvent::ReservationSettled { reservation_id, charged, parts, released_parts, .. } => {
                self.move_parts(TAKE_HELD, parts, "settled part")?;
                self.move_parts(UNHOLD, released_parts, "released part")?;
                counters.used = self.sum(counters.used, charged.0)?;
                Entry {
                    reservation_id: Some(reservation_id),
                    ..Entry::new(transaction_type::RESERVATION_SETTLEMENT, charged.0)
                }
            }
            MemberEvent::ReservationReleased { reservation_id, reason, released, released_parts } => {
                self.move_parts(UNHOLD, released_parts, "released part")?;
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
            _ => return Ok(None),
        };
        if counters.debt < 0 {
            return Err(self.inconsistent(format!("debt would become {}", counters.debt)));
        }
        Ok(Some(entry))
    }

    fn clear_debt(&self, counters: &mut Counters, cleared: i64) -> Result<(), ProjectionError> {
        counters.debt = self.difference(counters.debt, cleared)?;
        counters.debt_billed = self.sum(counters.debt_billed, cleared)?;
        Ok(())
    }

    fn insert_grant(&self, grant_id: &str, terms: &tally_ledger::domain::GrantTerms) -> Result<(), ProjectionError> {
        let category = match terms.category {
            tally_ledger::domain::GrantCategory::Promotional => "promotional",
            tally_ledger::domain::GrantCategory::Paid => "paid",
        };
        let inserted = self.tx.statement(INSERT_GRANT)?.execute(params![
            self.member_id,
            grant_id,
            terms.source.as_str(),
            category,
            terms.priority,
            terms.amount.0,
            terms.expires_at.map(instant_text),
            instant_text(self.event.occurred_at),
            crate::storage::to_sql_integer(self.event.position()),
        ]);
        match inserted {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(error, _)) if error.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(self.inconsistent(format!("grant {grant_id} is granted twice")))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Applies one grant movement per part; a part the grant cannot give is
    /// a contradiction of the log.
    fn move_parts(&self, template: &'static str, parts: &[GrantPart], what: &str) -> Result<(), ProjectionError> {
        if parts.is_empty() {
            return Ok(());
        }
        let mut statement = self.tx.statement(template)?;
        for part in parts {
            if part.amount.0 < 0 {
                return Err(self.inconsistent(format!("a {what} of {} on grant {}", part.amount, part.grant_id)));
            }
            let changed = statement.execute(params![self.member_id, part.grant_id, part.amount.0])?;
            if changed != 1 {
                return Err(self.inconsistent(format!(
                    "grant {} cannot take a {what} of {} (unknown, expired or short)",
                    part.grant_id, part.amount
                )));
            }
        }
        Ok(())
    }

    fn write(&self, before: Counters, mut counters: Counters, entry: Entry<'_>) -> Result<(), ProjectionError> {
        let (available, held): (i64, i64) =
            self.tx.statement(SUM_GRANTS)?.query_row(params![self.member_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
        let next_expiry: Option<(String, i64)> = self
            .tx
            .statement(NEXT_EXPIRY)?
            .query_row(params![self.member_id], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let balance = self.difference(self.sum(available, held)?, counters.debt)?;
        let amount = self.difference(balance, before.balance)?;
        counters.balance = balance;
        counters.transactions = self.sum(counters.transactions, 1)?;
        let position = crate::storage::to_sql_integer(self.event.position());
        let occurred_at = instant_text(self.event.occurred_at);
        let (next_expiry_at, next_expiry_amount) = match next_expiry {
            Some((at, amount)) => (Some(at), amount),
            None => (None, 0),
        };
        self.tx.statement(UPDATE_BALANCE)?.execute(params![
            self.member_id,
            counters.balance,
            available,
            held,
            counters.debt,
            counters.granted,
            counters.used,
            counters.debited,
            counters.expired,
            counters.debt_incurred,
            counters.debt_reduced,
            counters.debt_billed,
            next_expiry_at,
            next_expiry_amount,
            counters.transactions,
            position,
            occurred_at,
        ])?;
        self.tx.statement(INSERT_TRANSACTION)?.execute(params![
            self.member_id,
            counters.transactions,
            position,
            entry.kind,
            amount,
            entry.credits,
            balance,
            entry.grant_id,
            entry.usage_id,
            entry.reservation_id,
            entry.invoice_id,
            entry.reason,
            occurred_at,
        ])?;
        Ok(())
    }
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
