//! How a node turns a state into the config it serves: the operator's
//! config with every file taken from the state directory, the node's own
//! sections over it, each tenant's policy laid over its section, then the
//! admin API's pools — and how a tenant's policy that does not build stays
//! that tenant's failure: the node builds without it, then adds the changed
//! policies one at a time, keeping each that builds.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::fleet::node::{Node, TenantReport};
use crate::fleet::tenant::TenantPolicy;
use crate::fleet::{Blobs, FleetError, Published, State, fetch_blob, is_sha256_hex};
use crate::gateway::Gateway;

/// Tenants' policies by tenant: the revision that published each, and it.
pub(super) type Policies = BTreeMap<String, (i64, Published)>;

/// What a node built from a state.
pub(super) struct Built {
    pub(super) config: Config,
    /// The policies in it.
    pub(super) used: Policies,
    /// The policies refused, by tenant: their revision and why.
    pub(super) errors: BTreeMap<String, (i64, String)>,
}

/// The well-formed policies a state carries (of an applied state: those
/// the node accepted).
pub(super) fn candidates(state: &State) -> Policies {
    state
        .tenants
        .iter()
        .filter_map(|(tenant, policy)| {
            let revision = state.tenant_revisions.get(tenant).copied().unwrap_or(0);
            policy.as_ref().ok().map(|p| (tenant.clone(), (revision, p.clone())))
        })
        .collect()
}

/// Refuses what is not a file the publish uploaded.
fn blob_name<'a>(published: &'a Published, field: &str) -> Result<&'a String, String> {
    published
        .files
        .get(field)
        .filter(|sha256| is_sha256_hex(sha256))
        .ok_or_else(|| format!("{field} names a file the publish did not upload"))
}

impl Node {
    /// The blob `sha256` of `owner` (the operator, or a tenant) from
    /// `blobs`, from the state directory (where each owner's are kept
    /// apart) or else fetched (and checked against its name); its local
    /// path.
    async fn blob(
        &self,
        client: Option<&mut etcd_client::Client>,
        owner: Option<&str>,
        blobs: &Blobs,
        sha256: &str,
    ) -> Result<std::path::PathBuf, FleetError> {
        if !self.store.has_blob(owner, sha256) {
            let Some(client) = client else {
                return Err(FleetError::BadValue {
                    key: blobs.meta(sha256),
                    reason: "not in the state directory, and etcd cannot be read".into(),
                });
            };
            let bytes = fetch_blob(client, blobs, sha256).await?;
            self.store.put_blob(owner, sha256, &bytes)?;
        }
        self.store.blob_path(owner, sha256)
    }

    /// The operator's config of `state`, its files local, this node's own
    /// sections and addresses over it.
    async fn operator_config(
        &self,
        mut client: Option<&mut etcd_client::Client>,
        state: &State,
    ) -> Result<Config, FleetError> {
        let config_key = self.keys.config();
        let bad = |reason: String| FleetError::BadValue {
            key: config_key.clone(),
            reason,
        };
        let mut config = Config::parse(&state.published.toml, &self.store.dir().join("fleet.toml"))
            .map_err(|e| bad(format!("revision {}: {e}", state.config_revision)))?;
        let blobs = self.keys.blobs();
        let ordered = config.acme_files();
        for (field, path) in config.files_mut() {
            if ordered.contains(&field) {
                // `certificates.NAME.cert` → `<state>/acme/certificates.NAME.cert`,
                // written by the node from what the fleet issued.
                *path = self.store.dir().join("acme").join(super::acme::segment(&field));
                continue;
            }
            let sha256 = blob_name(&state.published, &field).map_err(bad)?;
            *path = self.blob(client.as_deref_mut(), None, &blobs, sha256).await?;
        }
        for (name, certificate) in &mut config.certificates {
            if let Some(acme) = &mut certificate.acme {
                let file = super::acme::segment(&format!("certificates.{name}.account.json"));
                acme.account = Some(self.store.dir().join("acme").join(file));
            }
        }
        if let Some(admin) = &self.file.admin {
            config.admin = Some(admin.clone());
        }
        if let Some(cache) = &self.file.cache {
            config.cache = cache.clone();
        }
        for (listener, addr) in &self.file.fleet.binds {
            match config.listeners.get_mut(listener) {
                Some(settings) => settings.bind = *addr,
                None => {
                    return Err(bad(format!(
                        "{}: fleet.binds names listener `{listener}`, which the published config does not have",
                        self.file.path.display()
                    )));
                }
            }
        }
        config.reload.watch = false;
        Ok(config)
    }

    /// Lays `tenant`'s policy over `config`. Errors are the policy's (a
    /// message), but etcd's, which end the read.
    async fn lay_policy(
        &self,
        mut client: Option<&mut etcd_client::Client>,
        tenant: &str,
        published: &Published,
        config: &mut Config,
    ) -> Result<Result<(), String>, FleetError> {
        let key = self.keys.policy(tenant);
        let mut policy = match TenantPolicy::parse(&published.toml, tenant) {
            Ok(policy) => policy,
            Err(reason) => return Ok(Err(format!("etcd key {key}: {reason}"))),
        };
        let blobs = self.keys.tenant_blobs(tenant);
        for (field, path) in policy.files_mut() {
            let sha256 = match blob_name(published, &field) {
                Ok(sha256) => sha256,
                Err(reason) => return Ok(Err(format!("etcd key {key}: {reason}"))),
            };
            match self.blob(client.as_deref_mut(), Some(tenant), &blobs, sha256).await {
                Ok(local) => *path = local,
                Err(FleetError::Etcd(e)) => return Err(FleetError::Etcd(e)),
                Err(other) => return Ok(Err(other.to_string())),
            }
        }
        Ok(policy
            .apply(tenant, config)
            .map_err(|reason| format!("etcd key {key}: {reason}")))
    }

    /// The config `state` describes with the tenants' policies
    /// `candidates` (one that is refused replaced by the one in `fallback`,
    /// if any), then the admin API's pools.
    pub(super) async fn materialize(
        &self,
        mut client: Option<&mut etcd_client::Client>,
        state: &State,
        candidates: &Policies,
        fallback: &Policies,
    ) -> Result<Built, FleetError> {
        let mut config = self.operator_config(client.as_deref_mut(), state).await?;
        let mut used = Policies::new();
        let mut errors = BTreeMap::new();
        for (tenant, value) in &state.tenants {
            if let Err(reason) = value {
                let revision = state.tenant_revisions.get(tenant).copied().unwrap_or(0);
                errors.insert(tenant.clone(), (revision, reason.clone()));
            }
        }
        let tenants: std::collections::BTreeSet<&String> = candidates.keys().chain(errors.keys()).collect();
        let tenants: Vec<String> = tenants.into_iter().cloned().collect();
        for tenant in tenants {
            if let Some((revision, published)) = candidates.get(&tenant) {
                match self
                    .lay_policy(client.as_deref_mut(), &tenant, published, &mut config)
                    .await?
                {
                    Ok(()) => {
                        used.insert(tenant, (*revision, published.clone()));
                        continue;
                    }
                    Err(reason) => {
                        errors.insert(tenant.clone(), (*revision, reason));
                    }
                }
            }
            if let Some((revision, published)) = fallback.get(&tenant)
                && candidates.get(&tenant).is_none_or(|(r, _)| r != revision)
                && self
                    .lay_policy(client.as_deref_mut(), &tenant, published, &mut config)
                    .await?
                    .is_ok()
            {
                used.insert(tenant, (*revision, published.clone()));
            }
        }
        Ok(Built {
            config: config.with_pools(&state.pools)?,
            used,
            errors,
        })
    }

    /// Makes `config` the gateway's; the error if it did not build.
    async fn reload(&self, gateway: &Gateway, config: Config) -> Option<String> {
        *crate::sync::lock(&self.pending) = Some(config);
        gateway.reload("fleet").await.error
    }

    /// Builds `state` and makes it current. When it does not build and
    /// tenants' policies changed, builds it with the policies served before,
    /// then adds each changed one, keeping those that build: a tenant's
    /// policy fails that tenant alone.
    pub(super) async fn apply(&self, client: &mut etcd_client::Client, state: State) -> Result<(), FleetError> {
        let Some(gateway) = self.gateway.get().and_then(std::sync::Weak::upgrade) else {
            return Ok(());
        };
        let good = crate::sync::lock(&self.applied)
            .as_ref()
            .map(candidates)
            .unwrap_or_default();
        let built = match self.materialize(Some(client), &state, &candidates(&state), &good).await {
            Ok(built) => built,
            Err(FleetError::Etcd(e)) => return Err(FleetError::Etcd(e)),
            Err(other) => {
                self.failed(state.content_revision(), other.to_string());
                return Ok(());
            }
        };
        let Some(error) = self.reload(&gateway, built.config.clone()).await else {
            self.accept(state, built);
            return Ok(());
        };
        let revision_of = |policies: &Policies, tenant: &String| policies.get(tenant).map(|(r, _)| *r);
        let changed: Vec<String> = built
            .used
            .keys()
            .chain(good.keys())
            .filter(|tenant| revision_of(&built.used, tenant) != revision_of(&good, tenant))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if changed.is_empty() {
            self.failed(state.content_revision(), error);
            return Ok(());
        }
        let mut current = match self.materialize(Some(client), &state, &good, &good).await {
            Ok(base) if self.reload(&gateway, base.config.clone()).await.is_none() => base,
            Ok(_) | Err(_) => {
                self.failed(state.content_revision(), error);
                return Ok(());
            }
        };
        for tenant in changed {
            let mut trial = current.used.clone();
            match built.used.get(&tenant) {
                Some(policy) => trial.insert(tenant.clone(), policy.clone()),
                None => trial.remove(&tenant),
            };
            let attempt = self.materialize(Some(client), &state, &trial, &current.used).await?;
            match self.reload(&gateway, attempt.config.clone()).await {
                None => current = attempt,
                Some(error) => {
                    let revision = revision_of(&built.used, &tenant).unwrap_or(0);
                    current
                        .errors
                        .insert(tenant, (revision, format!("did not build: {error}")));
                }
            }
        }
        for (tenant, refusal) in built.errors {
            current.errors.entry(tenant).or_insert(refusal);
        }
        self.accept(state, current);
        if let Some(at) = gateway.compile_retry_at() {
            *crate::sync::lock(&self.retry_at) = Some(at);
        }
        Ok(())
    }

    /// Records `built` (from `state`) as what the node serves: kept on
    /// disk, reported, and the config the next reload gives.
    pub(super) fn accept(&self, mut state: State, built: Built) {
        state.tenant_revisions = built.used.iter().map(|(t, (r, _))| (t.clone(), *r)).collect();
        state.tenants = built
            .used
            .iter()
            .map(|(t, (_, p))| (t.clone(), Ok(p.clone())))
            .collect();
        if let Err(e) = self.store.save_state(&state) {
            tracing::warn!(error = %e, "cannot keep the applied revision on disk");
        }
        tracing::info!(
            revision = state.content_revision(),
            config_revision = state.config_revision,
            read_at = state.revision,
            "fleet revision applied"
        );
        {
            let mut report = crate::sync::lock(&self.report);
            // Every tenant of the config is reported (revision 0 without a
            // policy of its own), so a tenant waiting on its publish sees
            // every live node.
            let mut tenants: BTreeMap<String, TenantReport> = built
                .config
                .tenants
                .keys()
                .map(|tenant| (tenant.clone(), TenantReport::default()))
                .collect();
            for (tenant, (revision, _)) in &built.used {
                tenants.insert(
                    tenant.clone(),
                    TenantReport {
                        revision: *revision,
                        ..TenantReport::default()
                    },
                );
            }
            for (tenant, (revision, error)) in &built.errors {
                tracing::error!(tenant = tenant.as_str(), revision, %error, "tenant policy refused; the tenant keeps the one it had");
                let entry = tenants.entry(tenant.clone()).or_default();
                entry.error = Some(error.clone());
                entry.failed_revision = Some(*revision);
            }
            report.tenants = tenants;
        }
        *crate::sync::lock(&self.pending) = Some(built.config);
        self.applied_state(state);
    }

    /// Reports that `tenant`'s policy at `revision` was refused.
    pub(super) fn tenant_failed(&self, tenant: &str, revision: i64, error: String) {
        tracing::error!(tenant, revision, %error, "tenant policy refused; the tenant keeps the one it had");
        let mut report = crate::sync::lock(&self.report);
        let entry = report.tenants.entry(tenant.to_owned()).or_default();
        entry.error = Some(error);
        entry.failed_revision = Some(revision);
        drop(report);
        self.report_changed.notify_one();
    }
}
