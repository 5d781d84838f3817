//! The result cache (DESIGN.md §9): bounded by bytes, entries living for
//! their query's `cache_ttl_s`, keyed so that nothing is ever shared
//! between members, credential versions or query versions. Eviction is
//! moka's (TinyLFU admission, LRU eviction, weighed by the bytes an entry
//! holds), not a hand-made map.

use moka::Expiry;
use moka::future::Cache;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The default bound of the whole cache.
pub const CACHE_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// What identifies a result. Built from everything that changes it: a
/// changed config, a rotated credential or a re-saved query makes a new
/// key, so stale entries are never found (and age out).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub member_id: String,
    pub integration_id: String,
    /// The integration's config version (its stream version when last changed).
    pub config_version: u64,
    pub credential_version: i64,
    /// The canonical request after parameters were bound (a hash of it).
    pub request_digest: [u8; 32],
}

/// A cached result: rows as JSON, with what the execution record needs.
#[derive(Clone, Debug)]
pub struct CachedResult {
    pub rows: Arc<Vec<crate::provider::Row>>,
    pub bytes: u64,
    pub truncated: bool,
    pub ttl: Duration,
    pub stored_at: Instant,
}

struct PerEntryTtl;

impl Expiry<CacheKey, CachedResult> for PerEntryTtl {
    fn expire_after_create(&self, _key: &CacheKey, value: &CachedResult, _created_at: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

#[derive(Clone)]
pub struct ResultCache {
    inner: Cache<CacheKey, CachedResult>,
}

impl ResultCache {
    pub fn new(max_bytes: u64) -> ResultCache {
        let inner = Cache::builder()
            .max_capacity(max_bytes)
            // The weight is the result's bytes (at least 1), capped at u32.
            .weigher(|_key: &CacheKey, value: &CachedResult| u32::try_from(value.bytes.max(1)).unwrap_or(u32::MAX))
            .expire_after(PerEntryTtl)
            .support_invalidation_closures()
            .build();
        ResultCache { inner }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<CachedResult> {
        self.inner.get(key).await
    }

    /// Stores a result; a TTL of zero stores nothing.
    pub async fn put(&self, key: CacheKey, value: CachedResult) {
        if !value.ttl.is_zero() {
            self.inner.insert(key, value).await;
        }
    }

    /// Forgets every entry of an integration (removed, disabled, changed).
    pub fn forget_integration(&self, member_id: &str, integration_id: &str) {
        let (member_id, integration_id) = (member_id.to_owned(), integration_id.to_owned());
        self.inner
            .invalidate_entries_if(move |key, _| key.member_id == member_id && key.integration_id == integration_id)
            .expect("the cache is built with support_invalidation_closures");
    }

    /// Bytes held now (after pending maintenance).
    pub async fn weighted_size(&self) -> u64 {
        self.inner.run_pending_tasks().await;
        self.inner.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(member: &str, credential_version: i64) -> CacheKey {
        CacheKey {
            member_id: member.into(),
            integration_id: "weather".into(),
            config_version: 1,
            credential_version,
            request_digest: [7; 32],
        }
    }

    fn result(bytes: u64, ttl_ms: u64) -> CachedResult {
        CachedResult {
            rows: Arc::new(vec![crate::provider::row(&serde_json::json!({"n": 1}))]),
            bytes,
            truncated: false,
            ttl: Duration::from_millis(ttl_ms),
            stored_at: Instant::now(),
        }
    }

    #[tokio::test]
    async fn entries_are_per_member_and_credential_version_and_die_with_their_ttl() {
        let cache = ResultCache::new(1_000_000);
        cache.put(key("acme", 1), result(10, 60_000)).await;
        assert!(cache.get(&key("acme", 1)).await.is_some());
        assert!(cache.get(&key("globex", 1)).await.is_none(), "never shared between members");
        assert!(cache.get(&key("acme", 2)).await.is_none(), "a rotated credential misses");
        cache.put(key("acme", 3), result(10, 50)).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(cache.get(&key("acme", 3)).await.is_none(), "expired");
        cache.put(key("acme", 4), result(10, 0)).await;
        assert!(cache.get(&key("acme", 4)).await.is_none(), "a TTL of zero caches nothing");
        cache.forget_integration("acme", "weather");
        cache.inner.run_pending_tasks().await;
        assert!(cache.get(&key("acme", 1)).await.is_none(), "forgotten with its integration");
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_byte_bound() {
        let cache = ResultCache::new(10_000);
        for version in 0..100 {
            cache.put(key("acme", version), result(1_000, 60_000)).await;
        }
        assert!(cache.weighted_size().await <= 10_000, "{}", cache.weighted_size().await);
    }
}
