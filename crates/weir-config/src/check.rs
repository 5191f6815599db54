//! The rules a config must meet beyond its schema — references that
//! resolve, bounds on every timeout and limit, TLS settings that resolve —
//! each failure naming the file, the field and what is wrong.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::{Config, ConfigError, MAX_COUNTER_KEYS, MAX_PLUGIN_CALLS, MAX_POOL_SERVERS, MIN_HEALTH_INTERVAL, tls};
use crate::addr::HostPort;

/// Whether `name` can name a pool: 1 to 64 ASCII letters, digits, `-`, `_`
/// and `.`, starting with a letter or digit. Decisions name pools as
/// `pool` or `pool:port`, and names reach URLs, logs and metrics, so
/// `:`, `/`, spaces and the empty name are refused.
pub fn check_pool_name(name: &str) -> Result<(), String> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a pool name (1-64 letters, digits, `-`, `_`, `.`, starting with a letter or digit)"
        ))
    }
}

impl Config {
    pub(super) fn invalid(&self, field: String, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            field,
            reason: reason.into(),
        }
    }

    pub(super) fn check_tenants(&self) -> Result<(), ConfigError> {
        let mut owners: BTreeMap<String, &str> = BTreeMap::new();
        let mut plugin_users: BTreeMap<&str, String> = BTreeMap::new();
        for (name, listener) in &self.listeners {
            for plugin in &listener.plugins {
                plugin_users.insert(plugin, format!("listener `{name}`"));
            }
        }
        for (name, tenant) in &self.tenants {
            let field = |f: &str| format!("tenants.{name}.{f}");
            if tenant.domains.is_empty() {
                return Err(self.invalid(field("domains"), "a tenant needs at least one domain"));
            }
            for domain in &tenant.domains {
                let canonical = match weir_plugin_sdk::names::Pattern::parse(domain) {
                    Ok(weir_plugin_sdk::names::Pattern::Exact(name)) => name,
                    Ok(_) => {
                        return Err(self.invalid(field("domains"), format!("`{domain}`: write a suffix without `*.`")));
                    }
                    Err(e) => return Err(self.invalid(field("domains"), format!("`{domain}`: {e}"))),
                };
                if let Some(other) = owners.insert(canonical, name) {
                    return Err(self.invalid(field("domains"), format!("`{domain}` is also tenant `{other}`'s")));
                }
            }
            if tenant.plugins.is_empty() {
                return Err(self.invalid(field("plugins"), "the plugin chain is empty"));
            }
            if tenant.max_plugin_timeout < Duration::from_millis(1)
                || tenant.max_plugin_timeout > Duration::from_secs(1)
            {
                return Err(self.invalid(field("max_plugin_timeout"), "must be between 1ms and 1s"));
            }
            if tenant.compile_per_minute < Duration::from_millis(100)
                || tenant.compile_per_minute > Duration::from_secs(600)
            {
                return Err(self.invalid(field("compile_per_minute"), "must be between 100ms and 10m"));
            }
            if tenant.plugin_cpu < Duration::from_millis(1) || tenant.plugin_cpu > Duration::from_secs(64) {
                return Err(self.invalid(field("plugin_cpu"), "must be between 1ms and 64s (of CPU a second)"));
            }
            if tenant
                .max_plugin_calls
                .is_some_and(|calls| !(1..=MAX_PLUGIN_CALLS).contains(&calls))
            {
                return Err(self.invalid(
                    field("max_plugin_calls"),
                    format!("must be between 1 and {}", MAX_PLUGIN_CALLS),
                ));
            }
            // A shadow of a tenant's plugin sees its connections: it is the
            // tenant's too, under the same limits.
            let shadows = self.plugins.iter().filter_map(|(name, settings)| {
                let live = settings.shadow_of.as_ref()?;
                tenant.plugins.contains(live).then_some(name)
            });
            for plugin in tenant.plugins.iter().chain(shadows) {
                let Some(settings) = self.plugins.get(plugin) else {
                    return Err(self.invalid(field("plugins"), format!("no plugin named `{plugin}`")));
                };
                if let Some(user) = plugin_users.insert(plugin, format!("tenant `{name}`")) {
                    return Err(self.invalid(
                        field("plugins"),
                        format!("plugin `{plugin}` is also used by {user}; a tenant's plugins are its own"),
                    ));
                }
                if let Some(max) = tenant.max_plugin_memory_mib
                    && settings.max_memory_mib > max
                {
                    return Err(self.invalid(
                        format!("plugins.{plugin}.max_memory_mib"),
                        format!(
                            "{} MiB exceeds tenant `{name}`'s max_plugin_memory_mib of {max}",
                            settings.max_memory_mib
                        ),
                    ));
                }
                if let Some(grant) = settings.grants.iter().find(|g| !tenant.grants.contains(g)) {
                    return Err(self.invalid(
                        format!("plugins.{plugin}.grants"),
                        format!(
                            "`{}` is not among the grants tenant `{name}` may give its plugins \
                             (the operator's [tenants.{name}] grants)",
                            grant.name()
                        ),
                    ));
                }
                if settings.counter_keys > tenant.max_counter_keys {
                    return Err(self.invalid(
                        format!("plugins.{plugin}.counter_keys"),
                        format!(
                            "{} exceeds tenant `{name}`'s max_counter_keys of {}",
                            settings.counter_keys, tenant.max_counter_keys
                        ),
                    ));
                }
                let max = tenant.max_plugin_timeout;
                if settings.timeout > max {
                    return Err(self.invalid(
                        format!("plugins.{plugin}.timeout"),
                        format!(
                            "{:?} exceeds tenant `{name}`'s max_plugin_timeout of {max:?}",
                            settings.timeout
                        ),
                    ));
                }
            }
            for (what, names, known) in [
                ("pools", &tenant.pools, self.pools.keys().collect::<Vec<_>>()),
                ("certificates", &tenant.certificates, self.certificates.keys().collect()),
                ("cas", &tenant.cas, self.cas.keys().collect()),
            ] {
                if let Some(missing) = names.iter().find(|n| !known.contains(n)) {
                    return Err(self.invalid(field(what), format!("no {what} entry named `{missing}`")));
                }
            }
            if tenant.max_connections == Some(0) {
                return Err(self.invalid(field("max_connections"), "must be at least 1"));
            }
            if tenant.max_descriptors == Some(0) {
                return Err(self.invalid(field("max_descriptors"), "must be at least 1"));
            }
            let shadows = self
                .plugins
                .values()
                .filter(|p| p.shadow_of.as_ref().is_some_and(|live| tenant.plugins.contains(live)))
                .count();
            if shadows > tenant.max_shadows {
                return Err(self.invalid(
                    field("plugins"),
                    format!(
                        "{shadows} shadow plugins exceed tenant `{name}`'s max_shadows of {}",
                        tenant.max_shadows
                    ),
                ));
            }
        }
        self.check_published_pools()
    }

    /// A pool a tenant's fleet policy published names servers on the
    /// tenant's word: each must be an address (no DNS name, which could
    /// point anywhere later) inside the tenant's `upstreams`, port included.
    fn check_published_pools(&self) -> Result<(), ConfigError> {
        for (pool, settings) in &self.pools {
            let Some(owner) = &settings.published_by else { continue };
            let field = format!("pools.{pool}.servers");
            let Some(tenant) = self.tenants.get(owner) else {
                return Err(self.invalid(field, format!("published by tenant `{owner}`, which the config lacks")));
            };
            for server in &settings.servers {
                let parsed = crate::addr::HostPort::parse(server.address())
                    .map_err(|e| self.invalid(field.clone(), e.to_string()))?;
                let Some(addr) = parsed.socket_addr() else {
                    return Err(self.invalid(
                        field,
                        format!("`{parsed}`: a tenant's pool names addresses, not DNS names"),
                    ));
                };
                if !tenant.upstreams.iter().any(|range| range.contains(addr)) {
                    return Err(self.invalid(
                        field,
                        format!(
                            "`{addr}` is outside tenant `{owner}`'s upstream ranges ({}; tenants.{owner}.upstreams)",
                            crate::addr::ranges_text(&tenant.upstreams)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every rule a config must meet beyond its schema, section by section.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        self.check_listeners()?;
        self.check_acme()?;
        self.check_plugins()?;
        self.check_cas()?;
        self.check_tenants()?;
        self.check_pools()?;
        let resolver = &self.resolver;
        if resolver.timeout < Duration::from_millis(1) || resolver.timeout > Duration::from_secs(1) {
            return Err(self.invalid("resolver.timeout".into(), "must be between 1ms and 1s"));
        }
        if !(1..=100_000).contains(&resolver.cache_entries) {
            return Err(self.invalid("resolver.cache_entries".into(), "must be between 1 and 100000"));
        }
        if resolver.servers.len() > 8 {
            return Err(self.invalid("resolver.servers".into(), "at most 8 name servers"));
        }
        if !(1..=1_048_576).contains(&self.cache.max_size_mib) {
            return Err(self.invalid("cache.max_size_mib".into(), "must be between 1 and 1048576 (1 TiB)"));
        }
        let most = super::MAX_ISOLATED_INSTANCES;
        if let Some(slots) = self.limits.isolated_instances
            && !(1..=most).contains(&slots)
        {
            return Err(self.invalid(
                "limits.isolated_instances".into(),
                format!("must be between 1 and {most}"),
            ));
        }
        Ok(())
    }

    /// Listeners: a plugin chain of known plugins, distinct addresses, timeouts and limits, TLS settings.
    fn check_listeners(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(self.invalid("listeners".into(), "no listener is configured"));
        }
        let mut binds: BTreeMap<SocketAddr, &str> = BTreeMap::new();
        for (name, listener) in &self.listeners {
            let field = |f: &str| format!("listeners.{name}.{f}");
            if listener.plugins.is_empty() {
                return Err(self.invalid(field("plugins"), "the plugin chain is empty"));
            }
            for plugin in &listener.plugins {
                if !self.plugins.contains_key(plugin) {
                    return Err(self.invalid(field("plugins"), format!("no plugin named `{plugin}`")));
                }
            }
            if let Some(other) = binds.insert(listener.bind, name)
                && listener.bind.port() != 0
            {
                return Err(self.invalid(
                    field("bind"),
                    format!("{} is also the address of listener `{other}`", listener.bind),
                ));
            }
            for (what, value) in [
                ("sniff_timeout", listener.sniff_timeout),
                ("connect_timeout", listener.connect_timeout),
                ("idle_timeout", listener.idle_timeout),
                ("half_close_timeout", listener.half_close_timeout),
                ("handshake_timeout", listener.handshake_timeout),
            ] {
                if value.is_zero() {
                    return Err(self.invalid(field(what), "must be longer than zero"));
                }
            }
            if listener.defer_accept && listener.protocol == crate::ListenerProtocol::Plain {
                return Err(self.invalid(
                    field("defer_accept"),
                    "a plain listener's clients may wait for the server to speak first; only tls and postgres listeners can defer",
                ));
            }
            if listener.max_connections_per_client == 0 {
                return Err(self.invalid(field("max_connections_per_client"), "must be at least 1"));
            }
            if !(1..=32).contains(&listener.client_prefix_v4) {
                return Err(self.invalid(field("client_prefix_v4"), "must be between 1 and 32"));
            }
            if !(1..=128).contains(&listener.client_prefix_v6) {
                return Err(self.invalid(field("client_prefix_v6"), "must be between 1 and 128"));
            }
            if listener.max_connections == Some(0) {
                return Err(self.invalid(field("max_connections"), "must be at least 1"));
            }
            tls::check_listener(&listener.tls)
                .map_err(|e| self.invalid(field(&format!("tls.{}", e.field)), e.reason))?;
        }
        Ok(())
    }

    /// Plugins: deadlines, memory, and one way of giving their config.
    fn check_plugins(&self) -> Result<(), ConfigError> {
        for (name, plugin) in &self.plugins {
            let field = |f: &str| format!("plugins.{name}.{f}");
            // A call runs on a gateway worker thread: a long deadline would let
            // one plugin stall unrelated connections.
            if plugin.timeout < Duration::from_millis(1) || plugin.timeout > Duration::from_secs(1) {
                return Err(self.invalid(field("timeout"), "must be between 1ms and 1s"));
            }
            if plugin.configure_timeout < Duration::from_millis(1) || plugin.configure_timeout > Duration::from_secs(60)
            {
                return Err(self.invalid(field("configure_timeout"), "must be between 1ms and 60s"));
            }
            if !(1..=4096).contains(&plugin.max_memory_mib) {
                return Err(self.invalid(field("max_memory_mib"), "must be between 1 and 4096"));
            }
            if let Some(live) = &plugin.shadow_of {
                match self.plugins.get(live) {
                    None => return Err(self.invalid(field("shadow_of"), format!("no plugin named `{live}`"))),
                    Some(live_plugin) if live_plugin.shadow_of.is_some() => {
                        return Err(self.invalid(field("shadow_of"), format!("`{live}` is itself a shadow plugin")));
                    }
                    Some(_) => {}
                }
                let in_chain = self.listeners.values().any(|l| l.plugins.contains(name))
                    || self.tenants.values().any(|t| t.plugins.contains(name));
                if in_chain {
                    return Err(self.invalid(
                        field("shadow_of"),
                        "a shadow plugin decides nothing: take it out of the chains it is in",
                    ));
                }
            }
            if !(1..=MAX_COUNTER_KEYS).contains(&plugin.counter_keys) {
                return Err(self.invalid(
                    field("counter_keys"),
                    format!("must be between 1 and {MAX_COUNTER_KEYS}"),
                ));
            }
            if plugin
                .config
                .as_ref()
                .is_some_and(|c| !matches!(c, toml::Value::String(_) | toml::Value::Table(_)))
            {
                return Err(self.invalid(field("config"), "must be a table or a string"));
            }
            if plugin.config.is_some() && plugin.config_file.is_some() {
                return Err(self.invalid(field("config_file"), "give `config` or `config_file`, not both"));
            }
        }
        Ok(())
    }

    /// Trust anchors: a file or pins, and pins that parse.
    fn check_cas(&self) -> Result<(), ConfigError> {
        for (name, ca) in &self.cas {
            let field = |f: &str| format!("cas.{name}.{f}");
            if ca.file.is_none() && ca.pin_sha256.is_empty() {
                return Err(self.invalid(format!("cas.{name}"), "give `file`, `pin_sha256`, or both"));
            }
            for pin in &ca.pin_sha256 {
                tls::parse_pin(pin).map_err(|reason| self.invalid(field("pin_sha256"), reason))?;
            }
        }
        Ok(())
    }

    /// Pools: names, servers and weights, PROXY version, attempts, health checks.
    fn check_pools(&self) -> Result<(), ConfigError> {
        for (name, pool) in &self.pools {
            let field = |f: &str| format!("pools.{name}.{f}");
            check_pool_name(name).map_err(|reason| self.invalid(format!("pools.{name:?}"), reason))?;
            if pool.servers.is_empty() {
                return Err(self.invalid(field("servers"), "a pool needs at least one server"));
            }
            if pool.servers.len() > MAX_POOL_SERVERS {
                return Err(self.invalid(
                    field("servers"),
                    format!("{} servers; a pool has at most {MAX_POOL_SERVERS}", pool.servers.len()),
                ));
            }
            for server in &pool.servers {
                HostPort::parse(server.address()).map_err(|e| self.invalid(field("servers"), e.to_string()))?;
                if !(1..=1000).contains(&server.weight()) {
                    return Err(self.invalid(field("servers"), "a weight is between 1 and 1000"));
                }
            }
            if let Some(version) = pool.proxy_protocol {
                weir_plugin_sdk::proxy::check_version(version).map_err(|e| self.invalid(field("proxy_protocol"), e))?;
            }
            if pool.max_attempts == Some(0) {
                return Err(self.invalid(field("max_attempts"), "must be at least 1"));
            }
            if let Some(health) = &pool.health {
                if health.interval < MIN_HEALTH_INTERVAL || health.interval > Duration::from_secs(3600) {
                    return Err(self.invalid(field("health.interval"), "must be between 100ms and 1h"));
                }
                if health.timeout.is_zero() {
                    return Err(self.invalid(field("health.timeout"), "must be longer than zero"));
                }
                if health.rise == 0 || health.fall == 0 {
                    return Err(self.invalid(field("health"), "rise and fall must be at least 1"));
                }
            }
        }
        Ok(())
    }
}
