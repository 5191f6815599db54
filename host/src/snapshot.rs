//! The routing state a connection runs against: listeners with their plugin
//! chains, pools, loaded plugins. A snapshot is built and checked whole from a
//! [`Config`] — every plugin compiled and configured, every reference
//! resolved — and never changes after that. A new config means a new
//! snapshot; a connection keeps the one it started with.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::addr::HostPort;
use crate::config::tls::{Invalid, ListenerSettings, check_listener};
use crate::config::{Config, ListenerConfig};
use crate::plugin::chain;
use crate::plugin::chain::Routing;
use crate::plugin::decision::Known;
use crate::plugin::{Plugin, PluginError, Runtime};
use crate::pool::Pool;
use crate::tls::TlsMaterial;
use crate::wit;

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A plugin failed to load or refused its config.
    #[error("{}: plugins.{name}: {error}", config.display())]
    Plugin {
        /// The config file that names the plugin.
        config: std::path::PathBuf,
        /// The plugin's name in the config.
        name: String,
        /// What went wrong.
        error: PluginError,
    },
    /// A certificate, CA, TLS setting or DNS-01 secret could not be loaded.
    #[error("{}: {field}: {reason}", config.display())]
    Tls {
        /// The config file.
        config: std::path::PathBuf,
        /// The dotted path of the field.
        field: String,
        /// What went wrong.
        reason: String,
    },
}

/// A listener's settings and its plugin chain.
#[derive(Debug)]
pub struct Listener {
    /// The listener's name in the config.
    pub name: Arc<str>,
    /// Its settings.
    pub config: ListenerConfig,
    /// TLS settings for terminated connections.
    pub tls: ListenerSettings,
    /// Connections in progress by client address, carried across reloads.
    pub clients: Arc<ClientCounts>,
    chain: Vec<Arc<Plugin>>,
}

/// Connections in progress per client on one listener (only clients with
/// at least one are kept). A client is an address cut to a prefix.
#[derive(Debug, Default)]
pub struct ClientCounts(Mutex<HashMap<IpAddr, u32>>);

/// The client an address belongs to: the address with all but its first
/// `v4` (IPv4) or `v6` (IPv6) bits cleared.
pub fn client_of(addr: IpAddr, v4: u8, v6: u8) -> IpAddr {
    let addr = addr.to_canonical();
    let prefix = if addr.is_ipv4() { v4 } else { v6 };
    ipnet::IpNet::new(addr, prefix).map_or(addr, |net| net.network())
}

/// A connection's place in its client's count, given back when dropped.
#[derive(Debug)]
pub struct ClientSlot {
    counts: Arc<ClientCounts>,
    client: IpAddr,
}

impl ClientCounts {
    /// Takes a place for `client`, or returns how many it holds already
    /// when that is `max`.
    pub fn admit(self: &Arc<Self>, client: IpAddr, max: u32) -> Result<ClientSlot, u32> {
        let mut counts = crate::sync::lock(&self.0);
        let held = counts.get(&client).copied().unwrap_or(0);
        if held >= max {
            return Err(held);
        }
        counts.insert(client, held + 1);
        Ok(ClientSlot {
            counts: Arc::clone(self),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = crate::sync::lock(&self.counts.0);
        if let std::collections::hash_map::Entry::Occupied(mut held) = counts.entry(self.client) {
            *held.get_mut() -= 1;
            if *held.get() == 0 {
                held.remove();
            }
        }
    }
}

impl Listener {
    /// The listener's plugin chain.
    pub fn chain(&self) -> &[Arc<Plugin>] {
        &self.chain
    }
}

/// A tenant: the names it owns, its chain, what its decisions may name.
#[derive(Debug)]
pub struct Tenant {
    /// Its name in the config.
    pub name: Arc<str>,
    chain: Vec<Arc<Plugin>>,
    pools: std::collections::BTreeSet<String>,
    /// What weir may connect to for it, and the sockets it holds.
    pub reach: Arc<crate::door::Reach>,
    /// Its plugins' DNS lookups a second; carried across reloads while the
    /// rate is the same.
    dns: Arc<crate::throttle::Rate>,
    /// The metric series its plugins have; carried likewise.
    series: Arc<crate::metrics::own::TenantSeries>,
    certificates: std::collections::BTreeSet<String>,
    cas: std::collections::BTreeSet<String>,
    max_connections: Option<usize>,
    /// Its connections in progress; carried across reloads.
    active: Arc<AtomicUsize>,
    /// What its plugins may spend; carried across reloads while its limits
    /// are the same.
    budget: Arc<crate::plugin::Budget>,
}

/// A tenant connection in progress; dropping it frees the slot.
#[derive(Debug)]
pub struct TenantSlot(Arc<AtomicUsize>);

impl Drop for TenantSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Tenant {
    /// The tenant's plugin chain.
    pub fn chain(&self) -> &[Arc<Plugin>] {
        &self.chain
    }

    /// Its connections in progress.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// The certificates it may present.
    pub fn certificates(&self) -> &std::collections::BTreeSet<String> {
        &self.certificates
    }

    /// Takes a connection slot, or says the tenant is at its limit.
    pub fn admit_connection(&self) -> Result<TenantSlot, String> {
        let taken = self.active.fetch_add(1, Ordering::AcqRel);
        let slot = TenantSlot(Arc::clone(&self.active));
        match self.max_connections {
            Some(max) if taken >= max => Err(format!("tenant `{}` is at its limit of {max} connections", self.name)),
            _ => Ok(slot),
        }
    }
}

/// What a tenant's decisions may name: a subset of the snapshot.
struct TenantScope<'a> {
    snapshot: &'a Snapshot,
    tenant: &'a Tenant,
}

impl Known for TenantScope<'_> {
    fn has_pool(&self, name: &str) -> bool {
        self.tenant.pools.contains(name) && self.snapshot.has_pool(name)
    }

    fn has_certificate(&self, name: &str) -> bool {
        self.tenant.certificates.contains(name) && self.snapshot.has_certificate(name)
    }

    fn ca(&self, name: &str) -> Option<bool> {
        self.snapshot.ca(name).filter(|_| self.tenant.cas.contains(name))
    }

    fn check_address(&self, addr: &HostPort) -> Result<(), String> {
        match addr.socket_addr() {
            Some(socket) if self.tenant.reach.contains(socket) => Ok(()),
            _ => Err(format!(
                "address `{addr}` is outside tenant `{}`'s upstream ranges",
                self.tenant.name
            )),
        }
    }
}

/// Immutable routing state.
#[derive(Debug)]
pub struct Snapshot {
    /// The config it was built from.
    pub config: Config,
    listeners: BTreeMap<String, Arc<Listener>>,
    pools: BTreeMap<String, Arc<Pool>>,
    tls: TlsMaterial,
    plugins: BTreeMap<String, Arc<Plugin>>,
    tenants: BTreeMap<String, Arc<Tenant>>,
    /// Domain suffix → tenant name.
    domains: std::collections::HashMap<String, String>,
    /// Open TLS-ALPN-01 challenges and last orders, carried across reloads.
    acme: Arc<crate::acme::AcmeState>,
    /// Shadow plugins, by the live plugin they shadow.
    shadows: crate::plugin::shadow::Shadows,
    /// When it was built.
    pub built_at: std::time::SystemTime,
}

impl Known for Snapshot {
    fn has_pool(&self, name: &str) -> bool {
        self.pools.contains_key(name)
    }

    fn has_certificate(&self, name: &str) -> bool {
        self.tls.has_certificate(name)
    }

    fn ca(&self, name: &str) -> Option<bool> {
        self.tls.ca(name)
    }
}

impl Snapshot {
    /// Loads and configures every plugin, and resolves every reference.
    pub fn build(config: Config, runtime: &Runtime) -> Result<Snapshot, SnapshotError> {
        Snapshot::rebuild(config, runtime, None)
    }

    /// Builds a snapshot that keeps `previous`'s plugins wherever their bytes,
    /// settings and config are unchanged (instances and all), and compiles
    /// only what changed.
    pub fn rebuild(config: Config, runtime: &Runtime, previous: Option<&Snapshot>) -> Result<Snapshot, SnapshotError> {
        let tls_error = |Invalid { field, reason }| SnapshotError::Tls {
            config: config.path.clone(),
            field,
            reason,
        };
        let tls = TlsMaterial::load(&config).map_err(tls_error)?;
        // A TSIG secret that is unreadable, malformed or readable by others
        // stops the build here, not at the first order.
        for (name, dns) in &config.dns {
            if dns.tsig_secret_file.is_some() {
                dns.tsig_secret(&config)
                    .map_err(|reason| tls_error(Invalid::new(format!("dns.{name}.tsig_secret_file"), reason)))?;
            }
        }
        runtime.set_resolver(&config.resolver);
        runtime
            .compile_budgets()
            .retain(&|tenant| config.tenants.contains_key(tenant));
        let mut plugins = BTreeMap::new();
        for (name, plugin) in &config.plugins {
            let path = config.resolve(&plugin.wasm);
            let old = previous.and_then(|p| p.plugins.get(name));
            let scope = match config.plugin_tenant(name) {
                None => crate::plugin::CompileScope::Operator,
                Some(tenant) => crate::plugin::CompileScope::Tenant {
                    tenant,
                    // What the tenant published is charged to it; the first
                    // build (a start) compiles everything it is given.
                    charged: plugin
                        .published_by
                        .as_ref()
                        .filter(|_| previous.is_some())
                        .and_then(|t| config.tenants.get(t))
                        .map(|t| t.compile_per_minute),
                },
            };
            let loaded =
                runtime
                    .load_reusing(name, &path, plugin, old, scope)
                    .map_err(|error| SnapshotError::Plugin {
                        config: config.path.clone(),
                        name: name.clone(),
                        error,
                    })?;
            plugins.insert(name.clone(), loaded);
        }
        let listeners = config
            .listeners
            .iter()
            .map(|(name, listener)| {
                let settings = check_listener(&listener.tls)
                    .map_err(|e| tls_error(Invalid::new(format!("listeners.{name}.tls.{}", e.field), e.reason)))?;
                // `Config::check` proved every chain entry names a plugin.
                let chain = listener
                    .plugins
                    .iter()
                    .filter_map(|p| plugins.get(p).cloned())
                    .collect();
                let clients = previous
                    .and_then(|p| p.listeners.get(name))
                    .map_or_else(Arc::default, |l| Arc::clone(&l.clients));
                let listener = Listener {
                    name: name.as_str().into(),
                    config: listener.clone(),
                    tls: settings,
                    clients,
                    chain,
                };
                Ok((name.clone(), Arc::new(listener)))
            })
            .collect::<Result<_, SnapshotError>>()?;
        let pools = config
            .pools
            .iter()
            .map(|(name, pool)| {
                let previous = previous.and_then(|p| p.pools.get(name)).map(|p| &**p);
                (name.clone(), Arc::new(Pool::new(name, pool, previous)))
            })
            .collect();
        let (tenants, domains) = build_tenants(&config, &plugins, previous);
        show_pools(&config, &plugins, &pools);
        let shadows = crate::plugin::shadow::Shadows::new(config.plugins.iter().filter_map(|(name, settings)| {
            let live = settings.shadow_of.as_deref()?;
            Some((Arc::clone(plugins.get(live)?.name()), Arc::clone(plugins.get(name)?)))
        }));
        Ok(Snapshot {
            shadows,
            config,
            listeners,
            pools,
            tls,
            plugins,
            tenants,
            domains,
            acme: previous.map_or_else(Arc::default, |p| Arc::clone(&p.acme)),
            built_at: std::time::SystemTime::now(),
        })
    }

    /// The TLS-ALPN-01 challenges of ACME orders in progress.
    pub fn acme_challenges(&self) -> &crate::acme::Challenges {
        &self.acme.challenges
    }

    /// What the ACME task shares with the gateway.
    pub fn acme(&self) -> Arc<crate::acme::AcmeState> {
        Arc::clone(&self.acme)
    }

    /// A listener by name.
    pub fn listener(&self, name: &str) -> Option<&Arc<Listener>> {
        self.listeners.get(name)
    }

    /// All listeners, by name.
    pub fn listeners(&self) -> impl Iterator<Item = &Arc<Listener>> {
        self.listeners.values()
    }

    /// Certificates, trust anchors and the TLS configs built from them.
    pub fn tls(&self) -> &TlsMaterial {
        &self.tls
    }

    /// Every loaded plugin, by name.
    pub fn plugins(&self) -> &BTreeMap<String, Arc<Plugin>> {
        &self.plugins
    }

    /// Every pool, by name.
    pub fn pools(&self) -> &BTreeMap<String, Arc<Pool>> {
        &self.pools
    }

    /// A pool by name.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    /// Starts the active health checks of every pool that has them; each
    /// stops when no snapshot holds its pool any more. Needs a tokio runtime.
    pub fn start_health_checks(&self) {
        for pool in self.pools.values() {
            // A pool a tenant published is probed as the tenant's: its
            // ranges, its sockets, its probes a second.
            let owner = pool
                .config
                .published_by
                .as_deref()
                .and_then(|tenant| self.tenants.get(tenant))
                .map(|tenant| Arc::clone(&tenant.reach));
            Pool::spawn_health_checks(pool, owner);
        }
    }

    /// The tenant owning a server name: the longest of all tenants' domain
    /// suffixes that the name is, or lies below.
    pub fn tenant_for(&self, sni: Option<&str>) -> Option<&Arc<Tenant>> {
        let mut name = sni?;
        loop {
            if let Some(tenant) = self.domains.get(name) {
                return self.tenants.get(tenant);
            }
            name = weir_plugin_sdk::names::split_first_label(name)?.1;
        }
    }

    /// Every tenant, by name.
    pub fn tenants(&self) -> &BTreeMap<String, Arc<Tenant>> {
        &self.tenants
    }

    /// Asks the chain — the tenant's for a tenant's connection, else the
    /// listener's — in order, until a plugin decides. A failed plugin either
    /// ends the chain with a rejection (`on_error = "deny"`) or is skipped
    /// (`"next"`). A tenant's decision that names something outside the
    /// tenant is a failure of its plugin. When no plugin decides, the
    /// connection is rejected.
    pub async fn route(&self, listener: &Listener, tenant: Option<&Tenant>, conn: &Arc<wit::Connection>) -> Routing {
        match tenant {
            None => chain::route(&listener.chain, conn, self, &self.shadows, || {}).await,
            Some(tenant) => {
                let scope = TenantScope { snapshot: self, tenant };
                let violated = || crate::metrics::METRICS.tenant_violation(&tenant.name);
                chain::route(&tenant.chain, conn, &scope, &self.shadows, violated).await
            }
        }
    }
}

/// The tenants of `config`, their budgets and connection counts carried over
/// from `previous`, and the index of their domains.
fn build_tenants(
    config: &Config,
    plugins: &BTreeMap<String, Arc<Plugin>>,
    previous: Option<&Snapshot>,
) -> (BTreeMap<String, Arc<Tenant>>, std::collections::HashMap<String, String>) {
    let mut tenants = BTreeMap::new();
    let mut domains = std::collections::HashMap::new();
    // A plugin kept from the previous snapshot may have been a tenant's
    // and be no one's now.
    let owned = |name: &String| config.plugin_tenant(name).is_some();
    for (_, plugin) in plugins.iter().filter(|(name, _)| !owned(name)) {
        plugin.set_budget(None);
        plugin.set_dns_rate(None);
        plugin.set_metric_series(None);
    }
    for (name, tenant) in &config.tenants {
        // `Config::check` proved every name and reference.
        let before = previous.and_then(|p| p.tenants.get(name));
        let active = before.map_or_else(Arc::default, |t| Arc::clone(&t.active));
        let reach = Arc::new(crate::door::Reach::new(
            name.as_str().into(),
            tenant,
            before.map(|t| &*t.reach),
        ));
        let dns = before
            .map(|t| Arc::clone(&t.dns))
            .filter(|rate| rate.per_second() == tenant.dns_queries_per_second)
            .unwrap_or_else(|| Arc::new(crate::throttle::Rate::new(tenant.dns_queries_per_second)));
        let series = before
            .map(|t| Arc::clone(&t.series))
            .filter(|series| series.max() == tenant.max_metric_series)
            .unwrap_or_else(|| Arc::new(crate::metrics::own::TenantSeries::new(name, tenant.max_metric_series)));
        let max_calls = tenant
            .max_plugin_calls
            .unwrap_or_else(crate::plugin::default_tenant_calls);
        let budget = previous
            .and_then(|p| p.tenants.get(name))
            .map(|t| Arc::clone(&t.budget))
            .filter(|b| b.has_limits(tenant.plugin_cpu, max_calls))
            .unwrap_or_else(|| crate::plugin::Budget::new(tenant.plugin_cpu, max_calls));
        for domain in &tenant.domains {
            if let Ok(canonical) = weir_plugin_sdk::names::canonicalize(domain.as_bytes()) {
                domains.insert(canonical, name.clone());
            }
        }
        let chain: Vec<Arc<Plugin>> = tenant.plugins.iter().filter_map(|p| plugins.get(p).cloned()).collect();
        // A tenant's plugins are its own (`Config::check`), and so are the
        // shadows of them (at most `max_shadows`): all spend the tenant's
        // one budget of plugin time and DNS lookups, so that shadows cannot
        // multiply what a tenant may spend.
        let shadows = config.plugins.iter().filter_map(|(shadow, settings)| {
            settings
                .shadow_of
                .as_ref()
                .filter(|live| tenant.plugins.contains(live))
                .and_then(|_| plugins.get(shadow))
        });
        for plugin in chain.iter().chain(shadows) {
            plugin.set_budget(Some(Arc::clone(&budget)));
            plugin.set_dns_rate(Some(Arc::clone(&dns)));
            plugin.set_metric_series(Some(Arc::clone(&series)));
        }
        let tenant = Tenant {
            name: name.as_str().into(),
            chain,
            pools: tenant.pools.iter().cloned().collect(),
            reach,
            dns,
            series,
            certificates: tenant.certificates.iter().cloned().collect(),
            cas: tenant.cas.iter().cloned().collect(),
            max_connections: tenant.max_connections,
            active,
            budget,
        };
        tenants.insert(name.clone(), Arc::new(tenant));
    }
    (tenants, domains)
}

/// Gives each plugin granted `pools` the pools it may name: a tenant's
/// plugin (and a shadow of one) its tenant's, any other plugin all of them.
fn show_pools(config: &Config, plugins: &BTreeMap<String, Arc<Plugin>>, pools: &BTreeMap<String, Arc<Pool>>) {
    use crate::config::Capability;
    for (name, settings) in &config.plugins {
        let Some(plugin) = plugins
            .get(name)
            .filter(|_| settings.grants.contains(&Capability::Pools))
        else {
            continue;
        };
        let owner = |plugin: &str| config.tenants.values().find(|t| t.plugins.iter().any(|p| p == plugin));
        let tenant = owner(name).or_else(|| settings.shadow_of.as_deref().and_then(owner));
        let view = pools
            .iter()
            .filter(|(pool, _)| tenant.is_none_or(|t| t.pools.contains(*pool)))
            .map(|(pool, p)| (pool.clone(), Arc::clone(p)))
            .collect();
        plugin.set_pools(view);
    }
}
