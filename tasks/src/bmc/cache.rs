//! A bounded cache of what drivers share per BMC endpoint (a Redfish endpoint's pooled
//! client, concurrency limit and session tokens; an IPMI BMC's concurrency limit), so that
//! the jobs of one BMC share one of each while the set of BMCs ever seen does not grow
//! without end.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Shared values by key, handed out as `Arc`s and bounded two ways:
///
/// - an entry nobody else holds is dropped once it has not been handed out for `idle`;
/// - when adding an entry would exceed `capacity`, entries nobody else holds are dropped,
///   least recently handed out first.
///
/// An entry still held outside the cache (by a driver in the middle of an operation) is
/// never dropped: a second value for the same key would then live beside it, and one BMC
/// would get two clients and two concurrency limits. So the cache exceeds `capacity` only
/// by entries in use, which the running operations bound. Entries are dropped when a new
/// one is added, not by a background task; until then an idle entry costs only memory.
pub(crate) struct SharedCache<K, V> {
    entries: Mutex<HashMap<K, Entry<V>>>,
    idle: Duration,
    capacity: usize,
}

struct Entry<V> {
    value: Arc<V>,
    /// When the entry was last handed out.
    last_used: Instant,
}

impl<V> Entry<V> {
    /// Whether only the cache holds the value. Clones are made only from the cache, under
    /// its lock, or from a clone someone holds, so the answer cannot turn stale while the
    /// lock is held.
    fn unused(&self) -> bool {
        Arc::strong_count(&self.value) == 1
    }
}

impl<K: Eq + Hash + Clone, V> SharedCache<K, V> {
    pub(crate) fn new(idle: Duration, capacity: usize) -> Self {
        Self {
            entries: Mutex::default(),
            idle,
            capacity: capacity.max(1),
        }
    }

    /// The value for `key`, made with `make` when there is none; `now` is the time of the
    /// call (a parameter, so that tests control the clock).
    pub(crate) fn get_or_try_insert<E>(
        &self,
        key: &K,
        now: Instant,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E> {
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(key) {
            entry.last_used = now;
            return Ok(entry.value.clone());
        }
        let value = Arc::new(make()?);
        self.evict(&mut map, now);
        map.insert(
            key.clone(),
            Entry {
                value: value.clone(),
                last_used: now,
            },
        );
        Ok(value)
    }

    /// How many entries the cache holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Drops idle entries, then makes room for one more within the capacity.
    fn evict(&self, map: &mut HashMap<K, Entry<V>>, now: Instant) {
        map.retain(|_, e| !e.unused() || now.saturating_duration_since(e.last_used) < self.idle);
        while map.len() >= self.capacity {
            let oldest = map
                .iter()
                .filter(|(_, e)| e.unused())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                // Everything is in use: over capacity until some operation ends.
                None => break,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    const IDLE: Duration = Duration::from_secs(600);

    fn get(cache: &SharedCache<String, String>, key: &str, now: Instant) -> Arc<String> {
        cache
            .get_or_try_insert(&key.to_owned(), now, || {
                Ok::<_, Infallible>(format!("value of {key}"))
            })
            .unwrap()
    }

    #[test]
    fn one_value_per_key_while_it_is_cached() {
        let cache = SharedCache::new(IDLE, 4);
        let t0 = Instant::now();
        let a = get(&cache, "a", t0);
        let again = get(&cache, "a", t0 + Duration::from_secs(1));
        assert!(Arc::ptr_eq(&a, &again));
        let failed = cache.get_or_try_insert(&"b".to_owned(), t0, || Err::<String, _>("no client"));
        assert_eq!(failed.err(), Some("no client"));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn idle_entries_nobody_holds_are_dropped() {
        let cache = SharedCache::new(IDLE, 100);
        let t0 = Instant::now();
        drop(get(&cache, "idle", t0));
        let held = get(&cache, "held", t0);
        drop(get(&cache, "recent", t0 + IDLE / 2));
        // Adding an entry after the idle time sweeps "idle" only: "held" is in use and
        // "recent" was handed out since.
        let later = t0 + IDLE + Duration::from_secs(1);
        drop(get(&cache, "new", later));
        assert_eq!(cache.len(), 3);
        assert!(Arc::ptr_eq(&held, &get(&cache, "held", later)));
        // Once released and idle, "held" goes too.
        drop(held);
        drop(get(&cache, "newer", later + IDLE));
        assert_eq!(cache.len(), 1, "only the entry just added stays");
    }

    #[test]
    fn the_capacity_drops_the_least_recently_used_unheld_entries() {
        let cache = SharedCache::new(IDLE, 3);
        let t0 = Instant::now();
        let second = |n: u64| t0 + Duration::from_secs(n);
        let a = get(&cache, "a", second(0));
        drop(get(&cache, "b", second(1)));
        drop(get(&cache, "c", second(2)));
        // "a" is in use, so the least recently used unheld entry, "b", makes room.
        drop(get(&cache, "d", second(3)));
        assert_eq!(cache.len(), 3);
        // "c" was used before "d": it goes next; "a" stays the same value throughout.
        drop(get(&cache, "e", second(4)));
        assert!(Arc::ptr_eq(&a, &get(&cache, "a", second(5))));
        let b = get(&cache, "b", second(6));
        assert_eq!(cache.len(), 3);
        assert_eq!(*b, "value of b", "b was made again");

        // Everything in use: the cache grows past its capacity rather than split a key.
        let all: Vec<_> = ["x", "y", "z", "w"]
            .iter()
            .map(|k| get(&cache, k, second(7)))
            .collect();
        assert!(cache.len() >= all.len());
        drop((a, b, all));
        drop(get(&cache, "v", second(8)));
        assert_eq!(cache.len(), 3, "back within the capacity once released");
    }
}
