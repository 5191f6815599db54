//! The capabilities (contract 0.2.0 and later), each callable only when the plugin's
//! `[plugins.NAME]` section grants it (`grants = ["counters"]`); a plugin
//! that calls one it was not granted fails to load, with the line to add.
//! Natively (in a plugin's unit tests) counters count in memory without
//! expiring, metrics go nowhere, DNS lookups fail and no pool is seen.

/// Node-local sliding-window counters shared by all the plugin's instances
/// (grant `counters`).
pub mod counters {
    /// Records a hit on `key` and returns the hits in the last
    /// `window_seconds` (1 to 86400), this one included. Keys are at most
    /// 256 bytes.
    pub fn hit(key: &str, window_seconds: u32) -> Result<u64, String> {
        #[cfg(target_arch = "wasm32")]
        return crate::__bindings::weir::plugin::counters::hit(key, window_seconds);
        #[cfg(not(target_arch = "wasm32"))]
        return native::count(key, window_seconds, true);
    }

    /// The hits `hit` would count, without recording one.
    pub fn peek(key: &str, window_seconds: u32) -> Result<u64, String> {
        #[cfg(target_arch = "wasm32")]
        return crate::__bindings::weir::plugin::counters::peek(key, window_seconds);
        #[cfg(not(target_arch = "wasm32"))]
        return native::count(key, window_seconds, false);
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod native {
        use std::cell::RefCell;
        use std::collections::HashMap;

        std::thread_local! {
            static HITS: RefCell<HashMap<(String, u32), u64>> = RefCell::new(HashMap::new());
        }

        pub(super) fn count(key: &str, window_seconds: u32, hit: bool) -> Result<u64, String> {
            HITS.with(|hits| {
                let mut hits = hits.borrow_mut();
                let count = hits.entry((key.to_owned(), window_seconds)).or_default();
                *count += u64::from(hit);
                Ok(*count)
            })
        }
    }
}

/// The plugin's own metrics in the host's `/metrics` (grant `metrics`).
pub mod metrics {
    /// Adds `value` to counter `name` (a Prometheus name) with one free
    /// `label` value (empty for none): `weir_plugin_counter_total`.
    pub fn count(name: &str, label: &str, value: u64) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        return crate::__bindings::weir::plugin::metrics::count(name, label, value);
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (name, label, value);
            Ok(())
        }
    }

    /// Records `value` in histogram `name`: `weir_plugin_histogram`.
    pub fn observe(name: &str, label: &str, value: f64) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        return crate::__bindings::weir::plugin::metrics::observe(name, label, value);
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (name, label, value);
            Ok(())
        }
    }
}

/// A read-only view of the pools the plugin may name (grant `pools`).
pub mod pools {
    pub use crate::__bindings::weir::plugin::pools::Server;

    /// The pools the plugin may name.
    pub fn names() -> Vec<String> {
        #[cfg(target_arch = "wasm32")]
        return crate::__bindings::weir::plugin::pools::names();
        #[cfg(not(target_arch = "wasm32"))]
        return Vec::new();
    }

    /// The servers of `pool` as the host sees them now; none when the
    /// plugin may not name it.
    pub fn servers(pool: &str) -> Option<Vec<Server>> {
        #[cfg(target_arch = "wasm32")]
        return crate::__bindings::weir::plugin::pools::servers(pool);
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = pool;
            None
        }
    }
}

/// DNS lookups through the host's resolver and cache (grant `dns`).
pub mod dns {
    pub use crate::__bindings::weir::plugin::dns::LookupError;
    use crate::IpAddress;

    /// The TXT records of `name`, each record's strings joined.
    pub fn txt(name: &str) -> Result<Vec<String>, LookupError> {
        #[cfg(target_arch = "wasm32")]
        return crate::__bindings::weir::plugin::dns::txt(name);
        #[cfg(not(target_arch = "wasm32"))]
        return native(name);
    }

    /// The A and AAAA records of `name`.
    pub fn ip(name: &str) -> Result<Vec<IpAddress>, LookupError> {
        #[cfg(target_arch = "wasm32")]
        return crate::__bindings::weir::plugin::dns::ip(name);
        #[cfg(not(target_arch = "wasm32"))]
        return native(name);
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn native<T>(name: &str) -> Result<T, LookupError> {
        Err(LookupError::Failed(format!("no DNS outside weir (looked up {name})")))
    }
}
