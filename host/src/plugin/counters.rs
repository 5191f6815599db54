//! The `counters` capability's store: one per plugin, shared by all its
//! instances and kept across reloads, holding at most its `counter_keys`
//! keys (the least recently hit evicted, and counted).

use std::num::NonZeroUsize;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use crate::metrics::LabelValue;

/// Longest key a plugin may count under.
pub(crate) const MAX_KEY_LEN: usize = 256;

/// Longest window, a day.
pub(crate) const MAX_WINDOW_SECONDS: u32 = 86_400;

/// The clock the windows are cut from.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// One key's hits: the current fixed window's and the one before.
#[derive(Clone, Copy)]
struct Window {
    index: u64,
    current: u64,
    previous: u64,
}

/// A plugin's counters.
pub(crate) struct Counters {
    plugin: LabelValue,
    keys: Mutex<lru::LruCache<(Box<str>, u32), Window>>,
}

impl Counters {
    pub(crate) fn new(plugin: &str, max_keys: usize) -> Counters {
        Counters {
            plugin: plugin.into(),
            keys: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(max_keys).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// Holds at most `max_keys` keys from now on (the least recently hit
    /// beyond go).
    pub(crate) fn resize(&self, max_keys: usize) {
        let mut keys = crate::sync::lock(&self.keys);
        let before = keys.len();
        keys.resize(NonZeroUsize::new(max_keys).unwrap_or(NonZeroUsize::MIN));
        self.evicted(before - keys.len());
    }

    /// [`Counters::count`] for a plugin's arguments: a key over
    /// [`MAX_KEY_LEN`] or a window outside 1 s to a day is an error.
    pub(crate) fn checked_count(&self, key: &str, window_seconds: u32, hit: bool) -> Result<u64, String> {
        if key.len() > MAX_KEY_LEN {
            return Err(format!("a key of {} bytes (at most {MAX_KEY_LEN})", key.len()));
        }
        if !(1..=MAX_WINDOW_SECONDS).contains(&window_seconds) {
            return Err(format!("a window of {window_seconds} s (1 to {MAX_WINDOW_SECONDS})"));
        }
        Ok(self.count(key, window_seconds, hit))
    }

    /// Hits `key` in the last `window_seconds`, after recording one when
    /// `hit`: the current window's, plus the previous window's weighted by
    /// the share of it still inside the sliding window.
    pub(crate) fn count(&self, key: &str, window_seconds: u32, hit: bool) -> u64 {
        let window_ms = u64::from(window_seconds) * 1000;
        let now_ms = EPOCH.elapsed().as_millis() as u64;
        let index = now_ms / window_ms;
        let mut keys = crate::sync::lock(&self.keys);
        let entry = (Box::<str>::from(key), window_seconds);
        let window = match keys.get_mut(&entry) {
            Some(window) => window,
            None if !hit => return 0,
            None => {
                let fresh = Window {
                    index,
                    current: 0,
                    previous: 0,
                };
                if keys.push(entry.clone(), fresh).is_some_and(|(old, _)| old != entry) {
                    self.evicted(1);
                }
                keys.get_mut(&entry).expect("just pushed")
            }
        };
        if window.index + 1 == index {
            window.previous = window.current;
            window.current = 0;
        } else if window.index != index {
            window.previous = 0;
            window.current = 0;
        }
        window.index = index;
        if hit {
            window.current = window.current.saturating_add(1);
        }
        let into = now_ms % window_ms;
        let previous = u128::from(window.previous) * u128::from(window_ms - into) / u128::from(window_ms);
        window.current.saturating_add(previous as u64)
    }

    fn evicted(&self, keys: usize) {
        if keys > 0 {
            crate::metrics::own::counter_evictions(&self.plugin, keys as u64);
        }
    }

    /// Keys held.
    #[cfg(test)]
    fn len(&self) -> usize {
        crate::sync::lock(&self.keys).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_counts_its_hits_and_the_oldest_key_goes_at_the_cap() {
        let counters = Counters::new("limiter", 2);
        assert_eq!(counters.count("a", 60, false), 0, "peek of an unknown key");
        assert_eq!(counters.len(), 0, "a peek adds no key");
        assert_eq!(counters.count("a", 60, true), 1);
        assert_eq!(counters.count("a", 60, true), 2);
        assert_eq!(counters.count("a", 60, false), 2);
        assert_eq!(counters.count("a", 1, true), 1, "another window is another counter");
        // A third key evicts the least recently hit: `a` over 60 s.
        assert_eq!(counters.count("b", 60, true), 1);
        assert_eq!(counters.len(), 2);
        assert_eq!(counters.count("a", 60, false), 0, "evicted");
        counters.resize(1);
        assert_eq!(counters.len(), 1);
    }

    #[test]
    fn bad_keys_and_windows_are_errors() {
        let counters = Counters::new("limiter", 10);
        assert_eq!(counters.checked_count(&"k".repeat(256), 60, true), Ok(1));
        let long = counters
            .checked_count(&"k".repeat(257), 60, true)
            .expect_err("too long");
        assert!(long.contains("257 bytes"), "{long}");
        assert!(counters.checked_count("k", 0, true).is_err());
        assert!(counters.checked_count("k", 86_401, true).is_err());
        assert_eq!(counters.checked_count("k", 86_400, true), Ok(1));
    }

    #[test]
    fn hits_leave_the_window_as_it_slides() {
        let counters = Counters::new("limiter", 10);
        for _ in 0..5 {
            counters.count("k", 1, true);
        }
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(counters.count("k", 1, false), 0, "two windows later nothing is left");
    }
}
