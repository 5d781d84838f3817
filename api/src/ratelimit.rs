//! Per member key rate limits, from the member's plan
//! (`rate_limit_per_minute`), with governor's GCRA.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;

/// For members without a subscription.
pub const RATE_LIMIT_PER_MINUTE_DEFAULT: u32 = 600;
/// How many keys' limiters are kept before the map is cleared.
const LIMITERS_MAX: usize = 100_000;

#[derive(Default)]
pub struct RateLimits {
    limiters: Mutex<HashMap<String, (u32, DefaultDirectRateLimiter)>>,
}

impl RateLimits {
    /// Ok, or the seconds to wait.
    pub fn check(&self, key_id: &str, per_minute: u32) -> Result<(), u64> {
        let per_minute = NonZeroU32::new(per_minute.max(1)).expect("at least one");
        let mut limiters = self.limiters.lock().expect("rate limit lock");
        if limiters.len() > LIMITERS_MAX {
            limiters.clear();
        }
        let entry = limiters
            .entry(key_id.to_owned())
            .or_insert_with(|| (per_minute.get(), DefaultDirectRateLimiter::direct(Quota::per_minute(per_minute))));
        if entry.0 != per_minute.get() {
            *entry = (per_minute.get(), DefaultDirectRateLimiter::direct(Quota::per_minute(per_minute)));
        }
        entry.1.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}
