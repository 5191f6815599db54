//! What plugins may call beyond `log`: the capabilities (contract 0.2.0 and later)
//! a `[plugins.NAME]` section grants, what a tenant's plugins may be
//! granted, and the resolver behind the `dns` capability.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// A host interface of `weir:plugin` (0.2.0 and later) that a plugin may call only
/// when its section grants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Node-local sliding-window counters (`weir:plugin/counters`).
    Counters,
    /// The plugin's own metrics in `/metrics` (`weir:plugin/metrics`).
    Metrics,
    /// DNS lookups through the host's resolver (`weir:plugin/dns`).
    Dns,
    /// A read-only view of the pools it may name (`weir:plugin/pools`).
    Pools,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 4] = [
        Capability::Counters,
        Capability::Metrics,
        Capability::Dns,
        Capability::Pools,
    ];

    /// Its name in `grants`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Counters => "counters",
            Capability::Metrics => "metrics",
            Capability::Dns => "dns",
            Capability::Pools => "pools",
        }
    }

    /// The capability a component import (`weir:plugin/dns@0.3.0`) is, if
    /// it is one.
    pub fn of_import(import: &str) -> Option<Capability> {
        let interface = import.split_once('@').map_or(import, |(interface, _)| interface);
        let name = interface.strip_prefix("weir:plugin/")?;
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// What a tenant's plugins may be granted when `[tenants.NAME] grants`
/// says nothing: the capabilities that stay on the node and are bounded
/// per plugin (`pools` shows a tenant's plugin its own pools only). `dns`
/// (lookups that leave the node) must be given by name.
pub fn default_tenant_grants() -> Vec<Capability> {
    vec![Capability::Counters, Capability::Metrics, Capability::Pools]
}

/// Most keys a plugin's counters may hold when its section says nothing.
pub fn default_counter_keys() -> usize {
    10_000
}

/// Most keys `counter_keys` may be set to.
pub const MAX_COUNTER_KEYS: usize = 1_000_000;

/// The resolver of plugins' `dns` lookups (`[resolver]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    /// Name servers to ask (UDP, then TCP for a truncated answer); the
    /// system's (`/etc/resolv.conf`) when empty.
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
    /// Longest one lookup may wait (never longer than what is left of the
    /// plugin call's deadline).
    #[serde(default = "default_lookup_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Answers (positive and negative) each plugin's cache holds.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
}

impl Default for ResolverConfig {
    fn default() -> ResolverConfig {
        ResolverConfig {
            servers: Vec::new(),
            timeout: default_lookup_timeout(),
            cache_entries: default_cache_entries(),
        }
    }
}

fn default_lookup_timeout() -> Duration {
    Duration::from_millis(200)
}

fn default_cache_entries() -> usize {
    1024
}
