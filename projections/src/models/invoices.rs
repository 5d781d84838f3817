//! `invoices` and their lines.
//!
//! Lifecycle: `draft` → `open` → `paid` / `void` / `uncollectible`.
//!
//! - **draft** exists only here, for the open period of a subscription tally
//!   bills itself (`billing: tally`): the fee at period start, then lines as
//!   the period's events come (an upgrade's proration, priced purchases),
//!   and overage lines regrouped from the debt incurred and not yet billed
//!   (one line per unit price, in the order the prices first appeared; a
//!   reversal cuts the newest debt first). It carries the id the issued
//!   invoice will have (`inv_{member}_{n}`, n one more than the invoices
//!   issued so far) and is a preview: `InvoiceIssued` replaces it.
//! - **open**: `InvoiceIssued` is authoritative. Its lines and total are
//!   copied as they are (the subtotal is the sum of the lines); a zero total
//!   is issued already `paid`, as the ledger records it.
//! - `PaymentSucceeded` → `paid` (with the amount), `PaymentFailed` counts a
//!   failure and keeps it `open`, `InvoiceVoided` → `void`,
//!   `InvoiceMarkedUncollectible` → `uncollectible`.
//! - `StripeRefundRecorded` of a Stripe invoice sets `refunded_amount`;
//!   its debt (spent credits of a refund) is unbilled debt like overage.
//!
//! Internal tables: `invoice_members` (billing of the live subscription,
//! invoices issued, the sequence used for pagination, the draft's id) and
//! `invoice_debts` (unbilled overage entries with their unit price).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tally_ledger::domain::{Billing, GrantSource, InvoiceLine, InvoiceLineKind, MemberEvent, PlanTerms, Timestamp};

use crate::error::ProjectionError;
use crate::page::{Cursor, Order, Page, PageRequest};
use crate::projector::{BatchState, ProjectedEvent, Projector, ProjectorTx, TableSpec};
use crate::read::Snapshot;
use crate::registry::ReadModel;
use crate::storage::to_sql_integer;
use crate::values::{checked, instant_text, optional_instant_at, u64_at};

pub const PROJECTOR_NAME: &str = "invoices";
/// 2 added `refunded_amount` (Stripe refunds of the invoice).
pub const PROJECTOR_VERSION: u32 = 2;

/// Invoice statuses as stored and served.
pub mod invoice_status {
    pub const DRAFT: &str = "draft";
    pub const OPEN: &str = "open";
    pub const PAID: &str = "paid";
    pub const VOID: &str = "void";
    pub const UNCOLLECTIBLE: &str = "uncollectible";
}

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "invoices",
        columns: "member_id TEXT NOT NULL,
            invoice_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            status TEXT NOT NULL,
            period_start TEXT,
            period_end TEXT,
            currency TEXT NOT NULL,
            subtotal INTEGER NOT NULL,
            total INTEGER NOT NULL,
            amount_paid INTEGER NOT NULL,
            debt_cleared INTEGER NOT NULL,
            stripe_invoice_id TEXT,
            issued_at TEXT,
            paid_at TEXT,
            voided_at TEXT,
            uncollectible_at TEXT,
            payment_failures INTEGER NOT NULL,
            last_payment_failure TEXT,
            refunded_amount INTEGER NOT NULL DEFAULT 0,
            updated_position INTEGER NOT NULL,
            PRIMARY KEY (member_id, invoice_id)",
        key: "member_id, invoice_id",
        indexes: &[("by_seq", "member_id, seq")],
        read_model: "invoices",
    },
    TableSpec {
        name: "invoice_lines",
        columns: "member_id TEXT NOT NULL,
            invoice_id TEXT NOT NULL,
            line_no INTEGER NOT NULL,
            kind TEXT NOT NULL,
            description TEXT NOT NULL,
            quantity INTEGER NOT NULL,
            unit_amount INTEGER NOT NULL,
            amount INTEGER NOT NULL,
            PRIMARY KEY (member_id, invoice_id, line_no)",
        key: "member_id, invoice_id, line_no",
        indexes: &[],
        read_model: "invoices",
    },
    TableSpec {
        name: "invoice_members",
        columns: "member_id TEXT NOT NULL PRIMARY KEY,
            billing TEXT,
            invoices_issued INTEGER NOT NULL,
            next_seq INTEGER NOT NULL,
            draft_invoice_id TEXT",
        key: "member_id",
        indexes: &[],
        read_model: "invoices",
    },
    TableSpec {
        name: "invoice_debts",
        columns: "member_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            credits INTEGER NOT NULL,
            unit_price INTEGER NOT NULL,
            PRIMARY KEY (member_id, seq)",
        key: "member_id, seq",
        indexes: &[],
        read_model: "invoices",
    },
];

const HANDLES: &[&str] = &[
    "SubscriptionStarted",
    "SubscriptionPlanChanged",
    "SubscriptionRenewed",
    "SubscriptionPeriodClosed",
    "SubscriptionCanceled",
    "CreditsGranted",
    "CreditsDeducted",
    "UsageReversed",
    "InvoiceIssued",
    "PaymentSucceeded",
    "PaymentFailed",
    "InvoiceVoided",
    "InvoiceMarkedUncollectible",
    "StripeRefundRecorded",
];

const SELECT_MEMBER: &str =
    "SELECT billing, invoices_issued, next_seq, draft_invoice_id FROM {invoice_members} WHERE member_id = ?1";
const UPSERT_MEMBER: &str = "INSERT INTO {invoice_members} (member_id, billing, invoices_issued, next_seq,
    draft_invoice_id) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (member_id) DO UPDATE SET billing = excluded.billing,
    invoices_issued = excluded.invoices_issued, next_seq = excluded.next_seq,
    draft_invoice_id = excluded.draft_invoice_id";
const INSERT_INVOICE: &str = "INSERT INTO {invoices} (member_id, invoice_id, seq, status, period_start, period_end,
    currency, subtotal, total, amount_paid, debt_cleared, stripe_invoice_id, issued_at, paid_at, voided_at,
    uncollectible_at, payment_failures, last_payment_failure, updated_position)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, NULL, NULL, 0, NULL, ?15)";
const SELECT_SEQ: &str = "SELECT seq FROM {invoices} WHERE member_id = ?1 AND invoice_id = ?2";
const DELETE_INVOICE: &str = "DELETE FROM {invoices} WHERE member_id = ?1 AND invoice_id = ?2";
const DELETE_LINES: &str = "DELETE FROM {invoice_lines} WHERE member_id = ?1 AND invoice_id = ?2";
const DELETE_OVERAGE_LINES: &str =
    "DELETE FROM {invoice_lines} WHERE member_id = ?1 AND invoice_id = ?2 AND kind = 'overage'";
const NEXT_LINE_NO: &str =
    "SELECT coalesce(max(line_no), 0) + 1 FROM {invoice_lines} WHERE member_id = ?1 AND invoice_id = ?2";
const INSERT_LINE: &str = "INSERT INTO {invoice_lines} (member_id, invoice_id, line_no, kind, description, quantity,
    unit_amount, amount) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const SUM_LINES: &str = "SELECT coalesce(sum(amount), 0) FROM {invoice_lines} WHERE member_id = ?1 AND invoice_id = ?2";
const SET_DRAFT_TOTALS: &str = "UPDATE {invoices} SET subtotal = ?3, total = ?3, updated_position = ?4
    WHERE member_id = ?1 AND invoice_id = ?2";
const RENAME_INVOICE: &str = "UPDATE {invoices} SET invoice_id = ?3 WHERE member_id = ?1 AND invoice_id = ?2";
const RENAME_LINES: &str = "UPDATE {invoice_lines} SET invoice_id = ?3 WHERE member_id = ?1 AND invoice_id = ?2";
const SELECT_DEBTS_NEWEST_FIRST: &str =
    "SELECT seq, credits FROM {invoice_debts} WHERE member_id = ?1 ORDER BY seq DESC";
const SET_DEBT: &str = "UPDATE {invoice_debts} SET credits = ?3 WHERE member_id = ?1 AND seq = ?2";
const DELETE_DEBT: &str = "DELETE FROM {invoice_debts} WHERE member_id = ?1 AND seq = ?2";
const CLEAR_DEBTS: &str = "DELETE FROM {invoice_debts} WHERE member_id = ?1";
const OVERAGE_BY_PRICE: &str = "SELECT unit_price, sum(credits), min(seq) AS first_seq FROM {invoice_debts}
    WHERE member_id = ?1 GROUP BY unit_price ORDER BY first_seq";
const SET_PAID: &str = "UPDATE {invoices} SET status = 'paid', amount_paid = ?3, paid_at = ?4, updated_position = ?5
    WHERE member_id = ?1 AND invoice_id = ?2 AND status <> 'draft'";
const RECORD_FAILURE: &str = "UPDATE {invoices} SET payment_failures = payment_failures + 1,
    last_payment_failure = ?3, updated_position = ?4 WHERE member_id = ?1 AND invoice_id = ?2 AND status <> 'draft'";
const SET_REFUNDED: &str = "UPDATE {invoices} SET refunded_amount = ?3, updated_position = ?4
    WHERE member_id = ?1 AND invoice_id = ?2 AND status <> 'draft'";
const SET_VOID: &str = "UPDATE {invoices} SET status = 'void', voided_at = ?3, updated_position = ?4
    WHERE member_id = ?1 AND invoice_id = ?2 AND status <> 'draft'";
const SET_UNCOLLECTIBLE: &str = "UPDATE {invoices} SET status = 'uncollectible', uncollectible_at = ?3,
    updated_position = ?4 WHERE member_id = ?1 AND invoice_id = ?2 AND status <> 'draft'";

fn insert_line(
    tx: &ProjectorTx<'_>,
    member_id: &str,
    invoice_id: &str,
    line_no: i64,
    line: &InvoiceLine,
) -> Result<(), ProjectionError> {
    tx.statement(INSERT_LINE)?.execute(params![
        member_id,
        invoice_id,
        line_no,
        kind_text(line.kind),
        line.description,
        line.quantity,
        line.unit_amount.0,
        line.amount.0,
    ])?;
    Ok(())
}

pub struct InvoicesProjector;

impl Projector for InvoicesProjector {
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
        let mut batch = tx.batch_state::<InvoicesBatch>();
        if let MemberEvent::CreditsDeducted { debt, unit_price, .. } = event.event {
            if !debt.is_positive() {
                return Ok(());
            }
            return batch.add_debt(tx, event, debt.0, unit_price.0);
        }
        // A refund's spent credits billed as debt, like overage; its amount
        // recorded on the refunded invoice.
        if let MemberEvent::StripeRefundRecorded { debt, unit_price, invoice_id, refunded, .. } = event.event {
            if let Some(invoice_id) = invoice_id {
                batch.write_member(tx, event.member_id)?;
                tx.statement(SET_REFUNDED)?.execute(params![
                    event.member_id,
                    invoice_id,
                    refunded.0,
                    to_sql_integer(event.position())
                ])?;
            }
            if !debt.is_positive() {
                return Ok(());
            }
            return batch.add_debt(tx, event, debt.0, unit_price.0);
        }
        // The other events are rare and read the member's rows in SQL:
        // write what the batch holds of the member first.
        batch.write_member(tx, event.member_id)?;
        drop(batch);
        Apply { tx, event }.run()
    }
}

/// The invoices projector's batch state: overage, the one event that comes
/// with usage. Each `CreditsDeducted` with debt adds a debt entry and, with
/// a draft open, rewrites the draft's overage lines and totals; here a
/// member's debt and draft are read once per batch and written once.
#[derive(Default)]
pub(crate) struct InvoicesBatch {
    members: HashMap<String, MemberOverage>,
}

/// A member's unbilled debt and draft, as the tables would hold them now.
struct MemberOverage {
    /// Unbilled debt per unit price, in the order the prices first
    /// appeared: (unit price, credits, first entry's seq).
    by_price: Vec<(i64, i64, i64)>,
    /// The highest debt entry seq.
    last_seq: i64,
    /// Entries added during the batch: (seq, credits, unit price).
    added: Vec<(i64, i64, i64)>,
    draft: Option<DraftOverage>,
}

/// The open draft's figures that overage changes.
struct DraftOverage {
    invoice_id: String,
    /// The sum of the lines that are not overage.
    other_lines_amount: i64,
    /// The number of the first overage line: after every other line.
    first_overage_line_no: i64,
    /// Set once overage changed during the batch: the overage lines and
    /// totals are then rewritten, with this `updated_position`.
    changed_at: Option<i64>,
    subtotal: i64,
}

const SELECT_LAST_DEBT_SEQ: &str = "SELECT coalesce(max(seq), 0) FROM {invoice_debts} WHERE member_id = ?1";
const INSERT_DEBT_AT: &str =
    "INSERT INTO {invoice_debts} (member_id, seq, credits, unit_price) VALUES (?1, ?2, ?3, ?4)";
const OTHER_LINES: &str = "SELECT coalesce(max(line_no), 0) + 1, coalesce(sum(amount), 0) FROM {invoice_lines}
    WHERE member_id = ?1 AND invoice_id = ?2 AND kind <> 'overage'";

impl BatchState for InvoicesBatch {
    fn flush(&mut self, tx: &ProjectorTx<'_>) -> Result<(), ProjectionError> {
        let mut members: Vec<(&String, &MemberOverage)> = self.members.iter().collect();
        members.sort_unstable_by_key(|(member_id, _)| *member_id);
        for (member_id, member) in members {
            member.write(tx, member_id)?;
        }
        self.members.clear();
        Ok(())
    }
}

impl InvoicesBatch {
    /// Writes and forgets what the batch holds of a member.
    fn write_member(&mut self, tx: &ProjectorTx<'_>, member_id: &str) -> Result<(), ProjectionError> {
        match self.members.remove(member_id) {
            Some(member) => member.write(tx, member_id),
            None => Ok(()),
        }
    }

    /// A debt entry, and the draft's overage lines and totals refreshed.
    fn add_debt(
        &mut self,
        tx: &ProjectorTx<'_>,
        event: &ProjectedEvent<'_>,
        credits: i64,
        unit_price: i64,
    ) -> Result<(), ProjectionError> {
        if !self.members.contains_key(event.member_id) {
            let member = MemberOverage::load(tx, event.member_id)?;
            self.members.insert(event.member_id.to_owned(), member);
        }
        let member = self.members.get_mut(event.member_id).expect("loaded above");
        let position = event.position();
        let seq = checked(member.last_seq.checked_add(1), PROJECTOR_NAME, position)?;
        member.last_seq = seq;
        member.added.push((seq, credits, unit_price));
        match member.by_price.iter_mut().find(|(price, _, _)| *price == unit_price) {
            Some((_, sum, _)) => *sum = checked(sum.checked_add(credits), PROJECTOR_NAME, position)?,
            None => member.by_price.push((unit_price, credits, seq)),
        }
        let Some(draft) = &mut member.draft else { return Ok(()) };
        let mut subtotal = draft.other_lines_amount;
        for (unit_price, credits, _) in &member.by_price {
            let line = overage_line(*credits, *unit_price, position)?;
            subtotal = checked(subtotal.checked_add(line.amount.0), PROJECTOR_NAME, position)?;
        }
        draft.subtotal = subtotal;
        draft.changed_at = Some(to_sql_integer(position));
        Ok(())
    }
}

impl MemberOverage {
    fn load(tx: &ProjectorTx<'_>, member_id: &str) -> Result<MemberOverage, ProjectionError> {
        let draft_invoice_id: Option<String> =
            tx.statement(SELECT_MEMBER)?.query_row(params![member_id], |row| row.get(3)).optional()?.flatten();
        let by_price: Vec<(i64, i64, i64)> = tx
            .statement(OVERAGE_BY_PRICE)?
            .query_map(params![member_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let last_seq: i64 = tx.statement(SELECT_LAST_DEBT_SEQ)?.query_row(params![member_id], |row| row.get(0))?;
        let draft = match draft_invoice_id {
            Some(invoice_id) => {
                let (first_overage_line_no, other_lines_amount): (i64, i64) = tx
                    .statement(OTHER_LINES)?
                    .query_row(params![member_id, invoice_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
                Some(DraftOverage {
                    invoice_id,
                    other_lines_amount,
                    first_overage_line_no,
                    changed_at: None,
                    subtotal: other_lines_amount,
                })
            }
            None => None,
        };
        Ok(MemberOverage { by_price, last_seq, added: Vec::new(), draft })
    }

    fn write(&self, tx: &ProjectorTx<'_>, member_id: &str) -> Result<(), ProjectionError> {
        let mut insert = tx.statement(INSERT_DEBT_AT)?;
        for (seq, credits, unit_price) in &self.added {
            insert.execute(params![member_id, seq, credits, unit_price])?;
        }
        let Some(draft) = &self.draft else { return Ok(()) };
        let Some(updated_position) = draft.changed_at else { return Ok(()) };
        tx.statement(DELETE_OVERAGE_LINES)?.execute(params![member_id, draft.invoice_id])?;
        for (line_no, (unit_price, credits, _)) in (draft.first_overage_line_no..).zip(&self.by_price) {
            // Computed without overflow when the debt was added.
            let line = overage_line(*credits, *unit_price, 0)?;
            insert_line(tx, member_id, &draft.invoice_id, line_no, &line)?;
        }
        tx.statement(SET_DRAFT_TOTALS)?.execute(params![
            member_id,
            draft.invoice_id,
            draft.subtotal,
            updated_position
        ])?;
        Ok(())
    }
}

/// The draft line for the unbilled debt at one unit price.
fn overage_line(credits: i64, unit_price: i64, position: u64) -> Result<InvoiceLine, ProjectionError> {
    let amount = checked(credits.checked_mul(unit_price), PROJECTOR_NAME, position)?;
    Ok(InvoiceLine {
        kind: InvoiceLineKind::Overage,
        description: format!("Overage: {credits} credits"),
        quantity: credits,
        unit_amount: tally_ledger::domain::MinorUnits(unit_price),
        amount: tally_ledger::domain::MinorUnits(amount),
    })
}

/// The internal per-member row.
#[derive(Clone, Debug, Default)]
struct MemberRow {
    /// `tally` or `stripe` while a subscription is live.
    billing: Option<String>,
    invoices_issued: i64,
    next_seq: i64,
    draft_invoice_id: Option<String>,
}

fn kind_text(kind: InvoiceLineKind) -> &'static str {
    match kind {
        InvoiceLineKind::Fee => "fee",
        InvoiceLineKind::Proration => "proration",
        InvoiceLineKind::Purchase => "purchase",
        InvoiceLineKind::Overage => "overage",
        InvoiceLineKind::Adjustment => "adjustment",
    }
}

fn billing_text(billing: Billing) -> &'static str {
    match billing {
        Billing::Tally => "tally",
        Billing::Stripe => "stripe",
    }
}

struct Apply<'tx, 'conn, 'event> {
    tx: &'tx ProjectorTx<'conn>,
    event: &'tx ProjectedEvent<'event>,
}

impl Apply<'_, '_, '_> {
    fn member_id(&self) -> &str {
        self.event.member_id
    }

    fn position(&self) -> i64 {
        to_sql_integer(self.event.position())
    }

    fn inconsistent(&self, reason: impl Into<String>) -> ProjectionError {
        self.event.inconsistent(PROJECTOR_NAME, reason)
    }

    fn run(&self) -> Result<(), ProjectionError> {
        match self.event.event {
            MemberEvent::SubscriptionStarted { terms, billing, period_start, period_end, .. } => {
                let mut member = self.member()?;
                member.billing = Some(billing_text(*billing).to_owned());
                self.discard_draft(&mut member)?;
                if *billing == Billing::Tally {
                    self.open_draft(&mut member, terms, *period_start, *period_end)?;
                }
                self.save_member(&member)
            }
            MemberEvent::SubscriptionRenewed { terms, period_start, period_end } => {
                let mut member = self.member()?;
                self.discard_draft(&mut member)?;
                if member.billing.as_deref() == Some("tally") {
                    self.open_draft(&mut member, terms, *period_start, *period_end)?;
                }
                self.save_member(&member)
            }
            MemberEvent::SubscriptionPlanChanged { terms, proration_amount, .. } => {
                let member = self.member()?;
                let Some(draft_id) = &member.draft_invoice_id else { return Ok(()) };
                if proration_amount.is_zero() {
                    return Ok(());
                }
                let line = InvoiceLine {
                    kind: InvoiceLineKind::Proration,
                    description: format!("Upgrade to {} (prorated)", terms.plan.name),
                    quantity: 1,
                    unit_amount: *proration_amount,
                    amount: *proration_amount,
                };
                self.add_draft_line(draft_id, &line)?;
                self.refresh_draft(draft_id)
            }
            MemberEvent::SubscriptionCanceled { .. } => {
                let mut member = self.member()?;
                member.billing = None;
                self.discard_draft(&mut member)?;
                self.save_member(&member)
            }
            MemberEvent::SubscriptionPeriodClosed { debt_cleared, .. } => {
                if debt_cleared.is_positive() {
                    self.tx.statement(CLEAR_DEBTS)?.execute(params![self.member_id()])?;
                }
                Ok(())
            }
            MemberEvent::CreditsGranted { terms, .. } => {
                let Some(price) = terms.price.filter(|price| price.is_positive()) else { return Ok(()) };
                if terms.source != GrantSource::Purchase {
                    return Ok(());
                }
                let member = self.member()?;
                let Some(draft_id) = &member.draft_invoice_id else { return Ok(()) };
                let line = InvoiceLine {
                    kind: InvoiceLineKind::Purchase,
                    description: format!("Purchase of {} credits", terms.amount),
                    quantity: 1,
                    unit_amount: price,
                    amount: price,
                };
                self.add_draft_line(draft_id, &line)?;
                self.refresh_draft(draft_id)
            }
            // `CreditsDeducted` goes through the batch state
            // (`InvoicesBatch::add_debt`).
            MemberEvent::UsageReversed { debt_reduced, .. } => {
                if !debt_reduced.is_positive() {
                    return Ok(());
                }
                self.cut_debt_newest_first(debt_reduced.0)?;
                self.refresh_member_draft()
            }
            MemberEvent::InvoiceIssued {
                invoice_id,
                period_start,
                period_end,
                currency,
                lines,
                total,
                debt_cleared,
                stripe_invoice_id,
            } => {
                let issued = Issued {
                    invoice_id,
                    period_start: *period_start,
                    period_end: *period_end,
                    currency,
                    lines,
                    total: total.0,
                    debt_cleared: debt_cleared.0,
                    stripe_invoice_id: stripe_invoice_id.as_deref(),
                };
                self.issue(&issued)
            }
            MemberEvent::PaymentSucceeded { invoice_id, amount } => {
                let paid_at = instant_text(self.event.occurred_at);
                self.update_issued(
                    SET_PAID,
                    invoice_id,
                    params![self.member_id(), invoice_id, amount.0, paid_at, self.position()],
                )
            }
            MemberEvent::PaymentFailed { invoice_id, reason } => {
                let reason = reason.clone().unwrap_or_else(|| "payment failed".to_owned());
                self.update_issued(
                    RECORD_FAILURE,
                    invoice_id,
                    params![self.member_id(), invoice_id, reason, self.position()],
                )
            }
            MemberEvent::InvoiceVoided { invoice_id } => {
                let at = instant_text(self.event.occurred_at);
                self.update_issued(SET_VOID, invoice_id, params![self.member_id(), invoice_id, at, self.position()])
            }
            MemberEvent::InvoiceMarkedUncollectible { invoice_id } => {
                let at = instant_text(self.event.occurred_at);
                self.update_issued(
                    SET_UNCOLLECTIBLE,
                    invoice_id,
                    params![self.member_id(), invoice_id, at, self.position()],
                )
            }
            _ => Ok(()),
        }
    }

    fn member(&self) -> Result<MemberRow, ProjectionError> {
        let row = self
            .tx
            .statement(SELECT_MEMBER)?
            .query_row(params![self.member_id()], |row| {
                Ok(MemberRow {
                    billing: row.get(0)?,
                    invoices_issued: row.get(1)?,
                    next_seq: row.get(2)?,
                    draft_invoice_id: row.get(3)?,
                })
            })
            .optional()?;
        Ok(row.unwrap_or(MemberRow { next_seq: 1, ..MemberRow::default() }))
    }

    fn save_member(&self, member: &MemberRow) -> Result<(), ProjectionError> {
        self.tx.statement(UPSERT_MEMBER)?.execute(params![
            self.member_id(),
            member.billing,
            member.invoices_issued,
            member.next_seq,
            member.draft_invoice_id,
        ])?;
        Ok(())
    }

    fn predicted_invoice_id(&self, member: &MemberRow) -> String {
        format!("inv_{}_{}", self.member_id(), member.invoices_issued + 1)
    }

    fn take_seq(&self, member: &mut MemberRow) -> i64 {
        let seq = member.next_seq;
        member.next_seq += 1;
        seq
    }

    fn open_draft(
        &self,
        member: &mut MemberRow,
        terms: &PlanTerms,
        period_start: Timestamp,
        period_end: Timestamp,
    ) -> Result<(), ProjectionError> {
        let invoice_id = self.predicted_invoice_id(member);
        let seq = self.take_seq(member);
        self.tx.statement(INSERT_INVOICE)?.execute(params![
            self.member_id(),
            invoice_id,
            seq,
            invoice_status::DRAFT,
            instant_text(period_start),
            instant_text(period_end),
            terms.plan.currency,
            0,
            0,
            0,
            0,
            None::<String>,
            None::<String>,
            None::<String>,
            self.position(),
        ])?;
        let fee = InvoiceLine {
            kind: InvoiceLineKind::Fee,
            description: format!("{} subscription", terms.plan.name),
            quantity: 1,
            unit_amount: terms.plan.price,
            amount: terms.plan.price,
        };
        self.add_draft_line(&invoice_id, &fee)?;
        self.refresh_draft(&invoice_id)?;
        member.draft_invoice_id = Some(invoice_id);
        Ok(())
    }

    /// Removes the member's draft (its period closed, or the subscription
    /// ended); returns its sequence number for the invoice replacing it.
    fn discard_draft(&self, member: &mut MemberRow) -> Result<Option<i64>, ProjectionError> {
        let Some(draft_id) = member.draft_invoice_id.take() else { return Ok(None) };
        let seq: Option<i64> = self
            .tx
            .statement(SELECT_SEQ)?
            .query_row(params![self.member_id(), draft_id], |row| row.get(0))
            .optional()?;
        self.tx.statement(DELETE_LINES)?.execute(params![self.member_id(), draft_id])?;
        self.tx.statement(DELETE_INVOICE)?.execute(params![self.member_id(), draft_id])?;
        Ok(seq)
    }

    fn insert_line(&self, invoice_id: &str, line_no: i64, line: &InvoiceLine) -> Result<(), ProjectionError> {
        insert_line(self.tx, self.member_id(), invoice_id, line_no, line)
    }

    /// Appends a line to a draft, before its overage lines (which
    /// [`Self::refresh_draft`] puts back at the end).
    fn add_draft_line(&self, invoice_id: &str, line: &InvoiceLine) -> Result<(), ProjectionError> {
        self.tx.statement(DELETE_OVERAGE_LINES)?.execute(params![self.member_id(), invoice_id])?;
        let line_no: i64 =
            self.tx.statement(NEXT_LINE_NO)?.query_row(params![self.member_id(), invoice_id], |row| row.get(0))?;
        self.insert_line(invoice_id, line_no, line)
    }

    fn refresh_member_draft(&self) -> Result<(), ProjectionError> {
        match self.member()?.draft_invoice_id {
            Some(draft_id) => self.refresh_draft(&draft_id),
            None => Ok(()),
        }
    }

    /// Rewrites the draft's overage lines from the unbilled debt and its
    /// totals from its lines.
    fn refresh_draft(&self, invoice_id: &str) -> Result<(), ProjectionError> {
        let member_id = self.member_id();
        self.tx.statement(DELETE_OVERAGE_LINES)?.execute(params![member_id, invoice_id])?;
        let by_price: Vec<(i64, i64)> = self
            .tx
            .statement(OVERAGE_BY_PRICE)?
            .query_map(params![member_id], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let first_line_no: i64 =
            self.tx.statement(NEXT_LINE_NO)?.query_row(params![member_id, invoice_id], |row| row.get(0))?;
        for (line_no, (unit_price, credits)) in (first_line_no..).zip(by_price) {
            let line = overage_line(credits, unit_price, self.event.position())?;
            self.insert_line(invoice_id, line_no, &line)?;
        }
        let subtotal: i64 =
            self.tx.statement(SUM_LINES)?.query_row(params![member_id, invoice_id], |row| row.get(0))?;
        self.tx.statement(SET_DRAFT_TOTALS)?.execute(params![member_id, invoice_id, subtotal, self.position()])?;
        Ok(())
    }

    fn cut_debt_newest_first(&self, credits: i64) -> Result<(), ProjectionError> {
        let member_id = self.member_id();
        let entries: Vec<(i64, i64)> = self
            .tx
            .statement(SELECT_DEBTS_NEWEST_FIRST)?
            .query_map(params![member_id], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut to_cut = credits;
        for (seq, entry_credits) in entries {
            if to_cut == 0 {
                break;
            }
            let cut = entry_credits.min(to_cut);
            to_cut -= cut;
            if cut == entry_credits {
                self.tx.statement(DELETE_DEBT)?.execute(params![member_id, seq])?;
            } else {
                self.tx.statement(SET_DEBT)?.execute(params![member_id, seq, entry_credits - cut])?;
            }
        }
        if to_cut > 0 {
            return Err(
                self.inconsistent(format!("a reversal cuts {credits} credits of debt, {to_cut} more than open"))
            );
        }
        Ok(())
    }

    fn issue(&self, issued: &Issued<'_>) -> Result<(), ProjectionError> {
        let member_id = self.member_id();
        let mut member = self.member()?;
        let draft_seq = if issued.period_start.is_some() { self.discard_draft(&mut member)? } else { None };
        if issued.debt_cleared > 0 {
            self.tx.statement(CLEAR_DEBTS)?.execute(params![member_id])?;
        }
        let seq = match draft_seq {
            Some(seq) => seq,
            None => self.take_seq(&mut member),
        };
        let mut subtotal: i64 = 0;
        for line in issued.lines {
            subtotal = checked(subtotal.checked_add(line.amount.0), PROJECTOR_NAME, self.event.position())?;
        }
        let issued_at = instant_text(self.event.occurred_at);
        let (status, paid_at) = if issued.total == 0 {
            (invoice_status::PAID, Some(issued_at.clone()))
        } else {
            (invoice_status::OPEN, None)
        };
        // A draft may carry the id this invoice takes only if the ledger
        // issued an invoice outside the period (it does not today): the
        // draft moves on to the next id.
        if member.draft_invoice_id.as_deref() == Some(issued.invoice_id) {
            member.invoices_issued += 1;
            let next_id = self.predicted_invoice_id(&member);
            member.invoices_issued -= 1;
            self.tx.statement(RENAME_INVOICE)?.execute(params![member_id, issued.invoice_id, next_id])?;
            self.tx.statement(RENAME_LINES)?.execute(params![member_id, issued.invoice_id, next_id])?;
            member.draft_invoice_id = Some(next_id);
        }
        let inserted = self.tx.statement(INSERT_INVOICE)?.execute(params![
            member_id,
            issued.invoice_id,
            seq,
            status,
            issued.period_start.map(instant_text),
            issued.period_end.map(instant_text),
            issued.currency,
            subtotal,
            issued.total,
            if status == invoice_status::PAID { issued.total } else { 0 },
            issued.debt_cleared,
            issued.stripe_invoice_id,
            issued_at,
            paid_at,
            self.position(),
        ]);
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(error, _)) if error.code == rusqlite::ErrorCode::ConstraintViolation => {
                return Err(self.inconsistent(format!("invoice {} is issued twice", issued.invoice_id)));
            }
            Err(error) => return Err(error.into()),
        }
        for (index, line) in issued.lines.iter().enumerate() {
            self.insert_line(issued.invoice_id, index as i64 + 1, line)?;
        }
        member.invoices_issued += 1;
        self.save_member(&member)
    }

    fn update_issued(
        &self,
        template: &'static str,
        invoice_id: &str,
        parameters: &[&dyn rusqlite::ToSql],
    ) -> Result<(), ProjectionError> {
        let changed = self.tx.statement(template)?.execute(parameters)?;
        if changed != 1 {
            return Err(self.inconsistent(format!("invoice {invoice_id} was never issued")));
        }
        Ok(())
    }
}

/// The fields of an `InvoiceIssued`.
struct Issued<'event> {
    invoice_id: &'event str,
    period_start: Option<Timestamp>,
    period_end: Option<Timestamp>,
    currency: &'event str,
    lines: &'event [InvoiceLine],
    total: i64,
    debt_cleared: i64,
    stripe_invoice_id: Option<&'event str>,
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Invoice {
    pub invoice_id: String,
    pub member_id: String,
    /// 1, 2, 3, … per member, in the order invoices were opened.
    pub seq: u64,
    /// One of [`invoice_status`].
    pub status: String,
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
    pub currency: String,
    pub lines: Vec<InvoiceLineView>,
    /// The sum of the lines, in minor units.
    pub subtotal: i64,
    /// Equal to the subtotal (no tax in v1).
    pub total: i64,
    pub amount_paid: i64,
    /// Overage credits this invoice billed and cleared.
    pub debt_cleared: i64,
    pub stripe_invoice_id: Option<String>,
    pub issued_at: Option<DateTime<Utc>>,
    pub paid_at: Option<DateTime<Utc>>,
    pub voided_at: Option<DateTime<Utc>>,
    pub uncollectible_at: Option<DateTime<Utc>>,
    pub payment_failures: i64,
    pub last_payment_failure: Option<String>,
    /// What Stripe refunded of it, in minor units (Stripe invoices only).
    pub refunded_amount: i64,
    pub updated_position: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InvoiceLineView {
    pub line_no: u32,
    /// `fee`, `proration`, `purchase` or `overage`.
    pub kind: String,
    pub description: String,
    pub quantity: i64,
    pub unit_amount: i64,
    pub amount: i64,
}

const INVOICE_COLUMNS: &str = "invoice_id, member_id, seq, status, period_start, period_end, currency, subtotal,
    total, amount_paid, debt_cleared, stripe_invoice_id, issued_at, paid_at, voided_at, uncollectible_at,
    payment_failures, last_payment_failure, updated_position, refunded_amount";

fn invoice_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Invoice> {
    Ok(Invoice {
        invoice_id: row.get(0)?,
        member_id: row.get(1)?,
        seq: u64_at(row, 2)?,
        status: row.get(3)?,
        period_start: optional_instant_at(row, 4)?,
        period_end: optional_instant_at(row, 5)?,
        currency: row.get(6)?,
        lines: Vec::new(),
        subtotal: row.get(7)?,
        total: row.get(8)?,
        amount_paid: row.get(9)?,
        debt_cleared: row.get(10)?,
        stripe_invoice_id: row.get(11)?,
        issued_at: optional_instant_at(row, 12)?,
        paid_at: optional_instant_at(row, 13)?,
        voided_at: optional_instant_at(row, 14)?,
        uncollectible_at: optional_instant_at(row, 15)?,
        payment_failures: row.get(16)?,
        last_payment_failure: row.get(17)?,
        updated_position: u64_at(row, 18)?,
        refunded_amount: row.get(19)?,
    })
}

fn with_lines(snapshot: &Snapshot<'_>, mut invoice: Invoice) -> Result<Invoice, ProjectionError> {
    let mut statement = snapshot.statement(
        ReadModel::Invoices,
        "SELECT line_no, kind, description, quantity, unit_amount, amount FROM {invoice_lines}
         WHERE member_id = ?1 AND invoice_id = ?2 ORDER BY line_no",
    )?;
    let lines = statement.query_map(params![invoice.member_id, invoice.invoice_id], |row| {
        Ok(InvoiceLineView {
            line_no: row.get(0)?,
            kind: row.get(1)?,
            description: row.get(2)?,
            quantity: row.get(3)?,
            unit_amount: row.get(4)?,
            amount: row.get(5)?,
        })
    })?;
    invoice.lines = lines.collect::<Result<Vec<_>, _>>()?;
    Ok(invoice)
}

pub(crate) fn invoice(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    invoice_id: &str,
) -> Result<Option<Invoice>, ProjectionError> {
    let sql = format!("SELECT {INVOICE_COLUMNS} FROM {{invoices}} WHERE member_id = ?1 AND invoice_id = ?2");
    let sql = snapshot.render(PROJECTOR_NAME, ReadModel::Invoices.name(), &sql)?;
    let found = snapshot
        .connection()
        .prepare_cached(&sql)?
        .query_row(params![member_id, invoice_id], invoice_from_row)
        .optional()?;
    found.map(|invoice| with_lines(snapshot, invoice)).transpose()
}

pub(crate) fn invoices(
    snapshot: &Snapshot<'_>,
    member_id: &str,
    page: &PageRequest,
) -> Result<Page<Invoice>, ProjectionError> {
    let limit = page.checked_limit()?;
    let after = page.after.as_ref().map(Cursor::sequence).transpose()?;
    let (condition, order, bound) = match (page.order, after) {
        (Order::OldestFirst, after) => ("seq > ?2", "seq", after.map_or(0, to_sql_integer)),
        (Order::NewestFirst, after) => ("seq < ?2", "seq DESC", after.map_or(i64::MAX, to_sql_integer)),
    };
    let sql = format!(
        "SELECT {INVOICE_COLUMNS} FROM {{invoices}} WHERE member_id = ?1 AND {condition} ORDER BY {order} LIMIT ?3"
    );
    let sql = snapshot.render(PROJECTOR_NAME, ReadModel::Invoices.name(), &sql)?;
    let rows = snapshot
        .connection()
        .prepare_cached(&sql)?
        .query_map(params![member_id, bound, (limit + 1) as i64], invoice_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    let page = Page::from_rows(rows, limit, |invoice| Cursor::from_sequence(invoice.seq));
    let items = page.items.into_iter().map(|invoice| with_lines(snapshot, invoice)).collect::<Result<Vec<_>, _>>()?;
    Ok(Page { items, next_cursor: page.next_cursor })
}
