//! When a failed webhook delivery is tried again (DESIGN.md §11): at once,
//! then after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h, each delay
//! stretched or shrunk by up to a tenth at random (jitter, so that many
//! endpoints failing together do not retry together), then no more. An
//! endpoint whose deliveries have failed for 5 days without a success is
//! disabled.
//!
//! Pure: the jitter is a number the caller draws, the clock the caller's.

use std::time::Duration;

/// The delay before each retry, the first retry being immediate.
pub const RETRY_DELAYS: [Duration; 8] = [
    Duration::ZERO,
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3_600),
    Duration::from_secs(5 * 3_600),
    Duration::from_secs(10 * 3_600),
    Duration::from_secs(10 * 3_600),
];

/// Attempts of one delivery, at most: the first and its retries.
pub const ATTEMPTS_MAX: u32 = RETRY_DELAYS.len() as u32 + 1;

/// How long an endpoint may fail, without one success, before it is
/// disabled.
pub const DISABLE_AFTER: Duration = Duration::from_secs(5 * 24 * 3_600);

/// The jitter's span, in thousandths of a delay, each side.
pub const JITTER_PER_MILLE: u64 = 100;

/// The delay after the `attempts`-th failed attempt of a delivery (1 for
/// the first), with `jitter` drawn uniformly from 0..1000; `None` when no
/// retry is left.
pub fn retry_delay(attempts: u32, jitter: u64) -> Option<Duration> {
    let base = *RETRY_DELAYS.get(usize::try_from(attempts.checked_sub(1)?).ok()?)?;
    // jitter 0..1000 maps to 900..1100 thousandths of the delay.
    let per_mille = 1_000 - JITTER_PER_MILLE + (jitter % 1_000) * 2 * JITTER_PER_MILLE / 1_000;
    let millis = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).saturating_mul(per_mille) / 1_000;
    Some(Duration::from_millis(millis))
}

/// Whether an endpoint failing since `failing_since` (its first failure
/// after its last success) is to be disabled at `now` (both in seconds).
pub fn should_disable(failing_since_s: i64, now_s: i64) -> bool {
    now_s.saturating_sub(failing_since_s) >= DISABLE_AFTER.as_secs() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_the_designs_with_a_tenth_of_jitter() {
        let middle: Vec<u64> = (1..ATTEMPTS_MAX).map(|attempt| retry_delay(attempt, 500).unwrap().as_secs()).collect();
        assert_eq!(middle, [0, 5, 300, 1_800, 7_200, 18_000, 36_000, 36_000]);
        assert_eq!(retry_delay(ATTEMPTS_MAX, 500), None, "after the last retry, none");
        assert_eq!(retry_delay(0, 500), None);
        assert_eq!(retry_delay(4, 0), Some(Duration::from_secs(1_620)), "30 min less a tenth");
        assert_eq!(retry_delay(4, 999), Some(Duration::from_millis(1_978_200)), "30 min and 99 thousandths");
        assert_eq!(retry_delay(1, 999), Some(Duration::ZERO), "the first retry is at once, jitter or not");
        // A delivery is given up about 27.6 hours after its first attempt.
        let total: Duration = RETRY_DELAYS.iter().sum();
        assert_eq!(total.as_secs(), 99_305);
    }

    #[test]
    fn an_endpoint_is_disabled_after_five_days_of_failures() {
        let since = 1_000_000;
        assert!(!should_disable(since, since + 5 * 86_400 - 1));
        assert!(should_disable(since, since + 5 * 86_400));
    }
}
