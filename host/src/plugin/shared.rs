//! What plugins' capabilities keep from one load of a plugin to the next
//! (a reload that changes its bytes or settings): its counters and its own
//! metrics' series, by plugin name, for as long as some load of it lives;
//! and the resolver settings `dns` lookups use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::config::{Capability, PluginConfig, ResolverConfig};
use crate::metrics::own::OwnMetrics;
use crate::plugin::Runtime;
use crate::plugin::caps::{Capabilities, Dns};
use crate::plugin::counters::Counters;

#[derive(Default)]
pub(crate) struct Shared {
    counters: Mutex<HashMap<String, Weak<Counters>>>,
    metrics: Mutex<HashMap<String, Weak<OwnMetrics>>>,
    resolver: Mutex<ResolverConfig>,
}

/// The live value kept for `name`, or a new one made by `make`; entries of
/// plugins no load holds any more are dropped on the way.
fn kept<T>(map: &Mutex<HashMap<String, Weak<T>>>, name: &str, make: impl FnOnce() -> T) -> Arc<T> {
    let mut map = crate::sync::lock(map);
    if let Some(live) = map.get(name).and_then(Weak::upgrade) {
        return live;
    }
    map.retain(|_, weak| weak.strong_count() > 0);
    let fresh = Arc::new(make());
    map.insert(name.to_owned(), Arc::downgrade(&fresh));
    fresh
}

impl Runtime {
    /// Sets what plugins loaded from now on resolve `dns` lookups with.
    pub fn set_resolver(&self, resolver: &ResolverConfig) {
        *crate::sync::lock(&self.shared.resolver) = resolver.clone();
    }

    /// Whether `dns` lookups of a plugin loaded now would use other
    /// resolver settings than `plugin` has (so a reload must load it again).
    pub(crate) fn resolver_changed(&self, plugin: &crate::plugin::Plugin) -> bool {
        plugin
            .caps
            .dns
            .as_ref()
            .is_some_and(|dns| dns.config != *crate::sync::lock(&self.shared.resolver))
    }

    /// What `config`'s grants give plugin `name`.
    pub(crate) fn capabilities(&self, name: &str, config: &PluginConfig) -> Result<Arc<Capabilities>, String> {
        let mut caps = Capabilities::default();
        for grant in &config.grants {
            match grant {
                Capability::Counters => {
                    let counters = kept(&self.shared.counters, name, || Counters::new(name, config.counter_keys));
                    counters.resize(config.counter_keys);
                    caps.counters = Some(counters);
                }
                Capability::Metrics => caps.metrics = Some(kept(&self.shared.metrics, name, || OwnMetrics::new(name))),
                // Set by each snapshot that holds the plugin.
                Capability::Pools => {}
                Capability::Dns => {
                    let resolver = crate::sync::lock(&self.shared.resolver).clone();
                    caps.dns = Some(Arc::new(Dns::new(&resolver)?));
                }
            }
        }
        Ok(Arc::new(caps))
    }
}
