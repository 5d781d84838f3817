//! The health scheduler (DESIGN.md §9): probes every active integration
//! about once per `health_check_interval_s`, each at its own jittered
//! moment so that a thousand integrations created together are not probed
//! together. A probe is the `test` route's (`IntegrationTested`, actor
//! [`HEALTH_ACTOR`]); three failures in a row make an integration `failing`.
//!
//! Which integrations are due comes from the `integrations` read model
//! (least recently checked first); a sweep probes at most
//! [`PROBES_PER_SWEEP_MAX`], one after another, so a slow source delays the
//! next probes rather than piling up connections.

use crate::AppState;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// The default time between two probes of one integration.
pub const HEALTH_CHECK_INTERVAL_DEFAULT: Duration = Duration::from_secs(300);
/// The actor recorded on scheduled probes.
pub const HEALTH_ACTOR: &str = "health_scheduler";
/// Integrations one sweep probes at most.
pub const PROBES_PER_SWEEP_MAX: usize = 100;
/// Integrations one sweep looks at: more than it probes, so that those
/// tried lately without a record do not hide the others.
const CANDIDATES_PER_SWEEP_MAX: usize = 1_000;

/// When an integration checked at `checked_at` is next due: one interval
/// later, plus a jitter of up to a fifth of it that depends only on the
/// integration, so its probes keep their own rhythm.
pub fn next_due(member_id: &str, integration_id: &str, checked_at: DateTime<Utc>, interval: Duration) -> DateTime<Utc> {
    let digest = Sha256::new().chain_update(member_id).chain_update([0]).chain_update(integration_id).finalize();
    let fraction = f64::from(u16::from_be_bytes([digest[0], digest[1]])) / f64::from(u16::MAX);
    let jitter = interval.mul_f64(fraction / 5.0);
    let wait = chrono::Duration::from_std(interval + jitter).unwrap_or(chrono::Duration::MAX);
    checked_at.checked_add_signed(wait).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The scheduler's memory between sweeps: when it last tried each
/// integration (`member/integration`), so that one whose probe could not
/// be recorded (no vault key, a read model not caught up yet) waits for its
/// next turn like the others instead of being tried at every sweep.
#[derive(Default)]
pub struct Attempts(std::collections::HashMap<String, DateTime<Utc>>);

impl Attempts {
    fn last(&self, member_id: &str, integration_id: &str) -> Option<DateTime<Utc>> {
        self.0.get(&format!("{member_id}/{integration_id}")).copied()
    }

    fn record(&mut self, member_id: &str, integration_id: &str, at: DateTime<Utc>, interval: Duration) {
        // Forget what is older than two intervals: those are due anyway.
        let horizon = at - chrono::Duration::from_std(interval * 2).unwrap_or(chrono::Duration::MAX);
        self.0.retain(|_, attempted| *attempted > horizon);
        self.0.insert(format!("{member_id}/{integration_id}"), at);
    }
}

/// One sweep: probes the integrations due at `now`, until `stopping` says
/// the server is shutting down. Returns how many were probed.
pub async fn sweep(
    state: &AppState,
    attempts: &mut Attempts,
    interval: Duration,
    now: DateTime<Utc>,
    stopping: impl Fn() -> bool,
) -> usize {
    let projections = state.projections.clone();
    let candidates = match actix_web::web::block(move || projections.probe_candidates(CANDIDATES_PER_SWEEP_MAX)).await {
        Ok(Ok(candidates)) => candidates,
        // A read model still being built: the next sweep.
        Ok(Err(tally_projections::ProjectionError::NotReady { .. })) => return 0,
        Ok(Err(error)) => {
            tracing::warn!(%error, "the health scheduler cannot list integrations");
            return 0;
        }
        Err(error) => {
            tracing::warn!(%error, "the health scheduler's blocking read did not run");
            return 0;
        }
    };
    let mut probed = 0;
    for candidate in candidates {
        if stopping() || probed >= PROBES_PER_SWEEP_MAX {
            break;
        }
        let (member_id, integration_id) = (candidate.member_id, candidate.integration_id);
        let checked_at = attempts
            .last(&member_id, &integration_id)
            .map_or(candidate.checked_at, |tried| tried.max(candidate.checked_at));
        if next_due(&member_id, &integration_id, checked_at, interval) > now {
            continue;
        }
        attempts.record(&member_id, &integration_id, now, interval);
        match crate::integrations::probe(state, HEALTH_ACTOR, member_id.clone(), integration_id.clone()).await {
            Ok(test) => {
                probed += 1;
                if !test.ok {
                    tracing::info!(
                        member = %member_id,
                        integration = %integration_id,
                        code = test.error_code.as_deref().unwrap_or_default(),
                        status = test.status,
                        "a scheduled probe failed"
                    );
                }
            }
            // Removed or disabled since the read model was read, or no vault key.
            Err(error) => tracing::debug!(member = %member_id, integration = %integration_id, %error, "not probed"),
        }
    }
    probed
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn an_integration_is_due_within_one_fifth_past_its_interval() {
        let checked = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
        let interval = Duration::from_secs(300);
        let mut dues = std::collections::BTreeSet::new();
        for index in 0..50 {
            let due = next_due("acme", &format!("i{index}"), checked, interval);
            assert!(due >= checked + chrono::Duration::seconds(300), "{due}");
            assert!(due <= checked + chrono::Duration::seconds(360), "{due}");
            dues.insert(due);
        }
        assert!(dues.len() > 40, "integrations spread over the window: {}", dues.len());
        assert_eq!(next_due("acme", "i1", checked, interval), next_due("acme", "i1", checked, interval));
    }
}
