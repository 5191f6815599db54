//! The capabilities (`counters`, `metrics`, `dns`, `pools`, since 0.2.0): what
//! a plugin's grants link, the load error for an import not granted, and the
//! host side of each call — every argument bounded, every bad one an error
//! returned to the plugin, never a trap.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

use crate::config::{Capability, ResolverConfig};
use crate::metrics::own::OwnMetrics;
use crate::plugin::contract::Version;
use crate::plugin::counters::Counters;
use crate::plugin::state::State;
use crate::wit;

/// What one plugin's grants give its instances, shared by all of them.
#[derive(Default)]
pub(crate) struct Capabilities {
    pub(crate) counters: Option<Arc<Counters>>,
    pub(crate) metrics: Option<Arc<OwnMetrics>>,
    pub(crate) dns: Option<Arc<Dns>>,
    /// The pools it may name, set by each snapshot that holds the plugin.
    pub(crate) pools: arc_swap::ArcSwap<PoolView>,
    /// Its tenant's DNS lookups a second, shared by all the tenant's
    /// plugins and shadows; set by each snapshot that holds the plugin.
    pub(crate) dns_rate: arc_swap::ArcSwapOption<crate::throttle::Rate>,
}

/// Pools by name, as a plugin may see them.
pub type PoolView = std::collections::BTreeMap<String, Arc<crate::pool::Pool>>;

/// Most servers of one pool shown to a plugin (a pool holds at most
/// [`crate::config::MAX_POOL_SERVERS`]).
const MAX_SHOWN_SERVERS: usize = crate::config::MAX_POOL_SERVERS;

impl wit::pools::Host for State {
    fn names(&mut self) -> Vec<String> {
        self.caps.pools.load().keys().cloned().collect()
    }

    fn servers(&mut self, pool: String) -> Option<Vec<wit::pools::Server>> {
        let view = self.caps.pools.load();
        let pool = view.get(&pool)?;
        Some(
            pool.backends()
                .iter()
                .take(MAX_SHOWN_SERVERS)
                .map(|backend| {
                    let stats = backend.stats();
                    wit::pools::Server {
                        address: stats.address,
                        weight: stats.weight,
                        up: stats.healthy && !stats.ejected,
                        draining: stats.draining,
                        active: u32::try_from(stats.active).unwrap_or(u32::MAX),
                    }
                })
                .collect(),
        )
    }
}

/// Links the interfaces `grants` name, in the contract version the plugin
/// speaks (0.1.0 has none).
pub(crate) fn link_granted(
    linker: &mut Linker<State>,
    grants: &[Capability],
    version: Version,
) -> wasmtime::Result<()> {
    use wit::v0_2;
    for grant in grants {
        match (version, grant) {
            (Version::V0_1, _) => {}
            (Version::V0_2, Capability::Counters) => {
                v0_2::counters::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?
            }
            (Version::V0_2, Capability::Metrics) => {
                v0_2::metrics::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?
            }
            (Version::V0_2, Capability::Dns) => v0_2::dns::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?,
            (Version::V0_2, Capability::Pools) => v0_2::pools::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?,
            (Version::V0_3, Capability::Counters) => {
                wit::counters::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?
            }
            (Version::V0_3, Capability::Metrics) => {
                wit::metrics::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?
            }
            (Version::V0_3, Capability::Dns) => wit::dns::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?,
            (Version::V0_3, Capability::Pools) => wit::pools::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?,
        }
    }
    Ok(())
}

/// The capabilities `component` imports that `grants` does not give, said
/// as the load error: which, and the config line that grants them all.
pub(crate) fn ungranted_import(
    component: &Component,
    engine: &Engine,
    plugin: &str,
    grants: &[Capability],
) -> Option<String> {
    let missing: Vec<(String, Capability)> = component
        .component_type()
        .imports(engine)
        .filter_map(|(name, _)| Capability::of_import(name).map(|c| (name.to_owned(), c)))
        .filter(|(_, capability)| !grants.contains(capability))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let imports: Vec<String> = missing.iter().map(|(import, _)| format!("`{import}`")).collect();
    let mut wanted: Vec<Capability> = grants.iter().copied().chain(missing.iter().map(|(_, c)| *c)).collect();
    wanted.sort();
    wanted.dedup();
    let list: Vec<String> = wanted.iter().map(|g| format!("\"{}\"", g.name())).collect();
    Some(format!(
        "it imports {}, which its section does not grant: add `grants = [{}]` to [plugins.{plugin}]",
        imports.join(" and "),
        list.join(", ")
    ))
}

/// A plugin's resolver: its own cache, bounded, and the lookup deadline.
pub(crate) struct Dns {
    resolver: hickory_resolver::Resolver<crate::door::DoorRuntime>,
    timeout: Duration,
    /// The settings it was made from.
    pub(crate) config: ResolverConfig,
}

impl Dns {
    /// A resolver asking `config.servers` (the system's when empty).
    pub(crate) fn new(config: &ResolverConfig) -> Result<Dns, String> {
        use hickory_resolver::config::{NameServerConfig, ResolverConfig as Servers, ResolverOpts};
        let (servers, mut options) = if config.servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| format!("cannot read the system's resolver config: {e}"))?
        } else {
            let mut servers = Servers::from_parts(None, Vec::new(), Vec::new());
            for addr in &config.servers {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                servers.add_name_server(server);
            }
            (servers, ResolverOpts::default())
        };
        options.cache_size = config.cache_entries as u64;
        options.timeout = config.timeout;
        options.attempts = 1;
        options.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        let resolver = hickory_resolver::Resolver::builder_with_config(servers, crate::door::DoorRuntime::default())
            .with_options(options)
            .build()
            .map_err(|e| format!("cannot set up the resolver: {e}"))?;
        Ok(Dns {
            resolver,
            timeout: config.timeout,
            config: config.clone(),
        })
    }
}

/// Most records one lookup returns to the plugin.
const MAX_RECORDS: usize = 64;

/// A host name a plugin asked about, canonical and fully qualified, or why
/// it is not one.
fn lookup_name(name: &str) -> Result<String, wit::dns::LookupError> {
    let canonical = weir_plugin_sdk::names::canonicalize(name.as_bytes()).map_err(|e| {
        let shown: String = name.chars().take(64).collect();
        wit::dns::LookupError::InvalidName(format!(
            "{:?} is not a host name: {e}",
            shown.escape_debug().to_string()
        ))
    })?;
    Ok(format!("{canonical}."))
}

fn lookup_failure(error: hickory_resolver::net::NetError) -> wit::dns::LookupError {
    if error.is_no_records_found() {
        return wit::dns::LookupError::NoRecords;
    }
    let mut text = error.to_string();
    text.truncate(text.floor_char_boundary(256));
    wit::dns::LookupError::Failed(text)
}

impl State {
    /// The resolver and how long a lookup may wait now: the resolver's
    /// timeout, cut to what is left of the call's deadline. Lookups need the
    /// tokio runtime a connection's call runs on; `configure` (run at load)
    /// gets an error.
    fn dns(&self) -> Result<(Arc<Dns>, Duration), wit::dns::LookupError> {
        let Some(dns) = self.caps.dns.clone() else {
            return Err(wit::dns::LookupError::Failed("the plugin is not granted `dns`".into()));
        };
        if !self.defer_yield || tokio::runtime::Handle::try_current().is_err() {
            return Err(wit::dns::LookupError::Failed(
                "DNS lookups are made in route and admit, not in configure".into(),
            ));
        }
        if let Some(rate) = self.caps.dns_rate.load().as_deref()
            && !rate.take()
        {
            return Err(wit::dns::LookupError::Failed(format!(
                "its tenant has made its {} DNS lookups this second (dns_queries_per_second)",
                rate.per_second()
            )));
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        Ok((Arc::clone(&dns), dns.timeout.min(left)))
    }
}

impl wit::dns::Host for State {
    async fn txt(&mut self, name: String) -> Result<Vec<String>, wit::dns::LookupError> {
        let name = lookup_name(&name)?;
        let (dns, wait) = self.dns()?;
        let looked = tokio::time::timeout(wait, dns.resolver.txt_lookup(name)).await;
        let found = looked
            .map_err(|_| wit::dns::LookupError::Timeout)?
            .map_err(lookup_failure)?;
        Ok(found
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                hickory_resolver::proto::rr::RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .take(MAX_RECORDS)
            .collect())
    }

    async fn ip(&mut self, name: String) -> Result<Vec<wit::IpAddress>, wit::dns::LookupError> {
        let name = lookup_name(&name)?;
        let (dns, wait) = self.dns()?;
        let looked = tokio::time::timeout(wait, dns.resolver.lookup_ip(name)).await;
        let found = looked
            .map_err(|_| wit::dns::LookupError::Timeout)?
            .map_err(lookup_failure)?;
        Ok(found.iter().take(MAX_RECORDS).map(wit::IpAddress::from).collect())
    }
}

impl wit::counters::Host for State {
    fn hit(&mut self, key: String, window_seconds: u32) -> Result<u64, String> {
        self.counter(&key, window_seconds, true)
    }

    fn peek(&mut self, key: String, window_seconds: u32) -> Result<u64, String> {
        self.counter(&key, window_seconds, false)
    }
}

impl State {
    fn counter(&self, key: &str, window_seconds: u32, hit: bool) -> Result<u64, String> {
        let Some(counters) = &self.caps.counters else {
            return Err("the plugin is not granted `counters`".into());
        };
        counters.checked_count(key, window_seconds, hit)
    }
}

impl wit::metrics::Host for State {
    fn count(&mut self, name: String, label: String, value: u64) -> Result<(), String> {
        let Some(metrics) = &self.caps.metrics else {
            return Err("the plugin is not granted `metrics`".into());
        };
        metrics.count(&name, &label, value)
    }

    fn observe(&mut self, name: String, label: String, value: f64) -> Result<(), String> {
        let Some(metrics) = &self.caps.metrics else {
            return Err("the plugin is not granted `metrics`".into());
        };
        metrics.observe(&name, &label, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_takes_host_names_only() {
        assert_eq!(
            lookup_name("Shop.Example.ORG.").ok().as_deref(),
            Some("shop.example.org.")
        );
        for bad in ["", "a..b", "10.0.0.1", "a b.test", "x\n.test", &"a".repeat(300)] {
            match lookup_name(bad) {
                Err(wit::dns::LookupError::InvalidName(why)) => assert!(why.contains("is not a host name"), "{why}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
