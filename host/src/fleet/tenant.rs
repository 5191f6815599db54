//! Tenants' own policies in fleet mode: a tenant publishes its plugin
//! chain, its plugins and the pools its section lets it have, at
//! `<prefix>policies/<tenant>` (its files under `<prefix>tenants/<tenant>/`),
//! with an etcd user whose role may write only there. A node lays each
//! policy over the operator's config; what the tenant may route to —
//! domains, pools' names, address ranges, certificates, limits — stays the
//! operator's, and the namespace checks hold its decisions to it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{Config, PluginConfig, PoolConfig, check_pool_name};

/// A tenant's policy file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicy {
    /// The tenant's plugin chain: names of plugins of this policy.
    pub chain: Vec<String>,
    /// Its plugins, each named `<tenant>-…`.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Its pools: only names its `[tenants.NAME]` section lists in `pools`.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
}

impl TenantPolicy {
    /// Parses `text` as `tenant`'s policy and checks what it can say of
    /// itself: a chain of its own plugins, each named `<tenant>-…`.
    pub fn parse(text: &str, tenant: &str) -> Result<TenantPolicy, String> {
        let policy: TenantPolicy = toml::from_str(text).map_err(|e| e.to_string())?;
        if policy.chain.is_empty() {
            return Err("chain: the plugin chain is empty".into());
        }
        for name in &policy.chain {
            if !policy.plugins.contains_key(name) {
                return Err(format!("chain: no plugin named `{name}` in this policy"));
            }
        }
        let own = format!("{tenant}-");
        for name in policy.plugins.keys().chain(policy.pools.keys()) {
            check_pool_name(name).map_err(|reason| format!("`{}`: {reason}", name.escape_debug()))?;
            if !name.starts_with(&own) {
                return Err(format!(
                    "`{name}`: the plugins and pools of tenant `{tenant}` are named `{own}…`"
                ));
            }
        }
        // What a policy can say of its pools without the operator's config
        // (a tenant's etcd user cannot read it): servers are addresses. The
        // ranges they must lie in are checked by every node.
        for (name, pool) in &policy.pools {
            for server in &pool.servers {
                match crate::addr::HostPort::parse(server.address()) {
                    Ok(addr) if addr.socket_addr().is_some() => {}
                    Ok(addr) => {
                        return Err(format!(
                            "pools.{name}.servers: `{addr}`: a tenant's pool names addresses, not DNS names"
                        ));
                    }
                    Err(e) => return Err(format!("pools.{name}.servers: {e}")),
                }
            }
        }
        if let Some((name, live)) = policy.plugins.iter().find_map(|(name, p)| {
            p.shadow_of
                .as_ref()
                .filter(|live| !policy.plugins.contains_key(*live))
                .map(|l| (name, l))
        }) {
            return Err(format!("`{name}`: shadow_of `{live}` names no plugin of this policy"));
        }
        Ok(policy)
    }

    /// Every file the policy names, by field, as written.
    pub fn files_mut(&mut self) -> Vec<(String, &mut PathBuf)> {
        crate::config::plugin_files_mut(&mut self.plugins)
    }

    /// Lays the policy over `config`'s tenant `tenant`: its chain replaces
    /// the section's, its plugins and pools are added. The pools must be
    /// ones the section lists, the plugins new names; the whole config is
    /// then checked, so a policy that breaks a rule (a timeout above the
    /// tenant's `max_plugin_timeout`, say) is refused here.
    pub fn apply(self, tenant: &str, config: &mut Config) -> Result<(), String> {
        let Some(section) = config.tenants.get(tenant) else {
            return Err(format!("the published config has no tenant `{tenant}`"));
        };
        if let Some(name) = self.pools.keys().find(|name| !section.pools.contains(name)) {
            return Err(format!(
                "pool `{name}` is not one of tenant `{tenant}`'s pools (tenants.{tenant}.pools)"
            ));
        }
        if let Some(name) = self.plugins.keys().find(|name| config.plugins.contains_key(*name)) {
            return Err(format!("plugin `{name}` is already in the published config"));
        }
        let mut merged = config.clone();
        if let Some(section) = merged.tenants.get_mut(tenant) {
            section.plugins = self.chain;
        }
        merged
            .plugins
            .extend(self.plugins.into_iter().map(|(name, mut plugin)| {
                plugin.published_by = Some(tenant.to_owned());
                (name, plugin)
            }));
        merged.pools.extend(self.pools.into_iter().map(|(name, mut pool)| {
            pool.published_by = Some(tenant.to_owned());
            (name, pool)
        }));
        *config = merged.with_pools(&BTreeMap::new()).map_err(|e| e.to_string())?;
        Ok(())
    }
}
