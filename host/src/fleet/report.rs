//! What each node says of itself, under its lease at `<prefix>nodes/<node>`
//! (and of each tenant's policy, under the tenant's prefix), and how the
//! commands and the admin API read it: on demand, never through a watch.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fleet::node::Node;
use crate::fleet::{FleetError, Keys};

/// What a node says of itself at `<prefix>nodes/<node>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Its name.
    pub node: String,
    /// weir's version.
    pub version: String,
    /// Its admin address, if it serves one.
    pub admin: Option<String>,
    /// Its listeners' addresses.
    pub listeners: BTreeMap<String, String>,
    /// The etcd revision of the state it serves (0: none from etcd yet).
    pub revision: i64,
    /// The revision that published the config it serves.
    pub config_revision: i64,
    /// When it applied that state (seconds since the Unix epoch).
    pub applied_at: u64,
    /// `etcd`, or `disk` while it serves the state it kept there.
    pub serving: String,
    /// Why the latest state it read was not applied, if it was not.
    pub error: Option<String>,
    /// The revision of that state.
    pub failed_revision: Option<i64>,
    /// Why etcd cannot be read now, and since when (seconds since the Unix
    /// epoch): the node serves what it has meanwhile. Seen in its admin API
    /// (the copy in etcd is the one written before it was cut off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<(String, u64)>,
    /// Each tenant's own policy: what the node serves of it, and why it
    /// refused the latest one, if it did.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantReport>,
}

impl Report {
    /// Whether the node serves what etcd holds now: the latest config and
    /// pools, and each tenant's latest policy (or has refused it, and says
    /// why).
    pub fn is_current(&self, now: &crate::fleet::Revisions) -> bool {
        self.revision >= now.state
            && now.tenants.iter().all(|(tenant, latest)| {
                self.tenants
                    .get(tenant)
                    .is_some_and(|t| t.revision >= *latest || t.failed_revision.is_some_and(|f| f >= *latest))
            })
    }
}

/// What a node says of a tenant's policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantReport {
    /// The revision of the policy it serves (0: none, the operator's section alone).
    pub revision: i64,
    /// Why it refused the latest one.
    pub error: Option<String>,
    /// That policy's revision.
    pub failed_revision: Option<i64>,
}

impl Node {
    /// Keeps `nodes/<node>` saying what the node serves, under a lease kept
    /// alive every third of its time to live; a new lease after etcd lost
    /// the old one.
    pub(super) async fn keep_reporting(self: Arc<Self>) {
        let ttl = self.file.fleet.lease_ttl;
        while self.gateway.get().and_then(Weak::upgrade).is_some() {
            if let Err(error) = self.report_under_lease(ttl).await {
                tracing::debug!(%error, "node report interrupted");
                self.forget_client().await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn report_under_lease(&self, ttl: Duration) -> Result<(), FleetError> {
        let mut client = self.client().await?;
        let lease = client
            .lease_grant(i64::try_from(ttl.as_secs()).unwrap_or(10), None)
            .await?
            .id();
        *crate::sync::lock(&self.lease) = Some(lease);
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
        let mut tick = tokio::time::interval(ttl / 3);
        let mut said_to_tenants: BTreeMap<String, TenantReport> = BTreeMap::new();
        loop {
            let report = self.report();
            let value = serde_json::to_vec(&report).unwrap_or_default();
            let options = || Some(etcd_client::PutOptions::new().with_lease(lease));
            client.put(self.keys.node(&self.name), value, options()).await?;
            // Each tenant reads what the node says of its policy under its
            // own prefix, not the others' reports; only what changed since
            // the last put under this lease is written again.
            for (tenant, said) in &report.tenants {
                if said_to_tenants.get(tenant) == Some(said) {
                    continue;
                }
                let value = serde_json::to_vec(&(&report.node, said)).unwrap_or_default();
                client
                    .put(self.keys.tenant_node(tenant, &self.name), value, options())
                    .await?;
                said_to_tenants.insert(tenant.clone(), said.clone());
            }
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        keeper.keep_alive().await?;
                        match answers.message().await? {
                            Some(answer) if answer.ttl() > 0 => {}
                            _ => return Err(FleetError::Etcd("the node's lease expired".into())),
                        }
                    }
                    () = self.report_changed.notified() => break,
                }
            }
        }
    }

    /// Every node's report, by name.
    pub async fn nodes(&self) -> Result<BTreeMap<String, Report>, FleetError> {
        let mut client = self.client().await?;
        list_nodes(&mut client, &self.keys).await
    }
}

/// Every node's report under `keys`, by name.
pub async fn list_nodes(client: &mut etcd_client::Client, keys: &Keys) -> Result<BTreeMap<String, Report>, FleetError> {
    let answer = client
        .get(keys.nodes(), Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    let mut nodes = BTreeMap::new();
    let prefix = keys.nodes();
    for kv in answer.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        // One unreadable report is that entry's, not the whole list's.
        let report = super::decode::<Report>(&key, kv.value()).unwrap_or_else(|e| Report {
            node: key.strip_prefix(&prefix).unwrap_or(&key).escape_debug().to_string(),
            error: Some(e.to_string()),
            ..Report::default()
        });
        nodes.insert(report.node.clone(), report);
    }
    Ok(nodes)
}

/// The fleet's status as `weir fleet status --json` and the admin API give
/// it: the revisions etcd holds now, and each node's report with whether it
/// is current.
pub fn status_json(keys: &Keys, now: &crate::fleet::Revisions, nodes: &BTreeMap<String, Report>) -> serde_json::Value {
    let nodes: serde_json::Map<String, serde_json::Value> = nodes
        .iter()
        .map(|(name, report)| {
            let mut value = serde_json::json!(report);
            value["current"] = serde_json::json!(report.is_current(now));
            (name.clone(), value)
        })
        .collect();
    serde_json::json!({ "prefix": keys.prefix(), "revision": now.state, "tenant_revisions": now.tenants, "nodes": nodes })
}

/// What every live node says of `tenant`'s policy, by node (read from the
/// tenant's own prefix).
pub async fn list_tenant_nodes(
    client: &mut etcd_client::Client,
    keys: &Keys,
    tenant: &str,
) -> Result<BTreeMap<String, TenantReport>, FleetError> {
    let answer = client
        .get(
            keys.tenant_nodes(tenant),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let mut nodes = BTreeMap::new();
    for kv in answer.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let (node, report): (String, TenantReport) = super::decode(&key, kv.value())?;
        nodes.insert(node, report);
    }
    Ok(nodes)
}
