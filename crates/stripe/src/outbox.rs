//! The Stripe outbox: what a Stripe-managed member owes beyond Stripe's own
//! fees goes to Stripe as invoice items on the customer's next invoice
//! (DESIGN.md §3): overage (each `SubscriptionPeriodClosed` carries its
//! `overage_lines`, one invoice item per line) and priced purchases granted
//! through tally (`CreditsGranted` with `stripe_invoice_item`).
//!
//! It follows the log like a projector: from a checkpoint (a small file in
//! the data directory) it reads the events after it, sends what they ask,
//! and moves the checkpoint past an event only once Stripe took all of its
//! items. Stripe's idempotency key for a line is the event's id and the
//! line's index, so a resend after a crash (between Stripe's answer and the
//! checkpoint) is deduplicated by Stripe: each line is billed once.

use crate::outbound::{OutboundError, StripeApi};
use std::path::{Path, PathBuf};
use tally_ledger::domain::MemberEvent;
use tally_ledger::{Ledger, LedgerError, codec};

/// Events read per page.
const PAGE_EVENTS: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Stripe(#[from] OutboundError),
    #[error("the outbox checkpoint {path}: {source}")]
    Checkpoint { path: PathBuf, source: std::io::Error },
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxReport {
    pub events_read: u64,
    pub invoice_items: u64,
    /// The log position the outbox has handled up to.
    pub position: u64,
}

pub struct Outbox {
    api: std::sync::Arc<StripeApi>,
    checkpoint: PathBuf,
}

impl Outbox {
    pub fn new(api: std::sync::Arc<StripeApi>, checkpoint: &Path) -> Outbox {
        Outbox { api, checkpoint: checkpoint.to_path_buf() }
    }

    /// The position handled so far (0 before the first pass).
    pub fn position(&self) -> Result<u64, OutboxError> {
        match std::fs::read_to_string(&self.checkpoint) {
            Ok(text) => text.trim().parse().map_err(|_| OutboxError::Checkpoint {
                path: self.checkpoint.clone(),
                source: std::io::Error::other(format!("not a position: {text:?}")),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(OutboxError::Checkpoint { path: self.checkpoint.clone(), source }),
        }
    }

    fn save(&self, position: u64) -> Result<(), OutboxError> {
        let checkpoint_error = |source| OutboxError::Checkpoint { path: self.checkpoint.clone(), source };
        let temporary = self.checkpoint.with_extension("tmp");
        std::fs::write(&temporary, position.to_string()).map_err(checkpoint_error)?;
        std::fs::rename(&temporary, &self.checkpoint).map_err(checkpoint_error)
    }

    /// Send everything the log asks for up to its head. On a Stripe error
    /// the pass stops before the event that failed, to be tried again.
    pub async fn run_once(&self, ledger: &Ledger) -> Result<OutboxReport, OutboxError> {
        let mut report = OutboxReport { position: self.position()?, ..OutboxReport::default() };
        loop {
            let page = ledger.reader()?.read_all(report.position, PAGE_EVENTS).map_err(LedgerError::from)?;
            let Some(last) = page.last().map(|event| event.position) else { return Ok(report) };
            for recorded in &page {
                report.events_read += 1;
                let items = invoice_items(recorded)?;
                if items.is_empty() {
                    continue;
                }
                let Some(member_id) = recorded.stream_id.strip_prefix("member-") else { continue };
                let profile = ledger.member_state(member_id)?.profile;
                let Some(customer_id) = profile.stripe_customer_id else {
                    tracing::warn!(%member_id, "a charge of a Stripe-managed member without a Stripe customer: not sent");
                    continue;
                };
                for (index, (amount, description)) in items.iter().enumerate() {
                    let key = format!("tally-{}-{index}", recorded.event_id);
                    self.api.create_invoice_item(&customer_id, *amount, &profile.currency, description, &key).await?;
                    report.invoice_items += 1;
                }
                report.position = recorded.position;
                self.save(report.position)?;
            }
            report.position = last;
            self.save(last)?;
        }
    }
}

/// The invoice items an event asks for: (amount, description).
fn invoice_items(recorded: &tally_ledger::store::RecordedEvent) -> Result<Vec<(i64, String)>, OutboxError> {
    if !matches!(recorded.event_type.as_str(), "SubscriptionPeriodClosed" | "CreditsGranted") {
        return Ok(Vec::new());
    }
    let event = codec::decode_member(recorded).map_err(LedgerError::from)?;
    Ok(match event {
        MemberEvent::SubscriptionPeriodClosed { overage_lines, period_end, .. } => overage_lines
            .into_iter()
            .map(|line| (line.amount.0, format!("{} (period ending {})", line.description, period_end.date_naive())))
            .collect(),
        MemberEvent::CreditsGranted { terms, stripe_invoice_item: true, .. } => {
            let price = terms.price.map_or(0, |price| price.0);
            vec![(price, format!("Purchase of {} credits", terms.amount))]
        }
        _ => Vec::new(),
    })
}
