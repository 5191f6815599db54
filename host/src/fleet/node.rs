//! A fleet node: reads its revision from etcd, applies it through the
//! gateway's rebuild-and-swap, follows the prefix with a watch, stores the
//! admin API's pool changes in etcd, and reports itself under a lease.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use crate::clock::unix_now as now;
use crate::config::{Config, ConfigError, PoolConfig};
use crate::fleet::store::LocalStore;
use crate::fleet::{FleetError, Keys, NodeFile, State, connect, fetch_state};
use crate::gateway::Gateway;
use crate::source::{ConfigSource, SetPoolError, SharedPools};

/// How long a node waits for etcd at start before it serves the revision
/// it kept on disk.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait between two attempts to reach etcd while it is away: a
/// node sees the first publish after etcd returns within about this.
const RETRY_CAP: Duration = Duration::from_millis(500);

/// Largest watch message a node takes: the largest state it reads, so that
/// history etcd holds (several large values in one revision) never stops
/// the watch. etcd's own limit on one write (`--max-request-bytes`) is far
/// below it.
const MAX_WATCH_BYTES: usize = super::MAX_STATE_BYTES;

pub use super::report::{Report, TenantReport, list_nodes, list_tenant_nodes, status_json};

/// A running fleet node.
pub struct Node {
    pub(super) file: NodeFile,
    pub(super) name: String,
    pub(super) keys: Keys,
    pub(super) client: tokio::sync::Mutex<Option<etcd_client::Client>>,
    pub(super) store: LocalStore,
    /// The state the running snapshot was built from (with the tenants'
    /// policies it accepted).
    pub(super) applied: Mutex<Option<State>>,
    /// The revision of the last read, applied or not.
    pub(super) last_read: Mutex<i64>,
    /// The config the next reload builds (what [`FleetSource`] gives).
    pub(super) pending: Mutex<Option<Config>>,
    pub(super) report: Mutex<Report>,
    pub(super) report_changed: tokio::sync::Notify,
    /// One read-and-apply at a time.
    pub(super) syncing: tokio::sync::Mutex<()>,
    pub(super) gateway: OnceLock<Weak<Gateway>>,
    pub(super) lease: Mutex<Option<i64>>,
    /// When a tenant's component refused for its spent compile allowance
    /// may be compiled: the node reads and applies the state again then.
    pub(super) retry_at: Mutex<Option<std::time::Instant>>,
}

/// The configuration a fleet node builds: the state it read last.
pub struct FleetSource(Arc<Node>);

impl ConfigSource for FleetSource {
    fn load(&self) -> Result<Config, ConfigError> {
        crate::sync::lock(&self.0.pending)
            .clone()
            .ok_or_else(|| ConfigError::Invalid {
                path: PathBuf::from(self.0.keys.config()),
                field: "fleet".into(),
                reason: "no revision has been read from etcd".into(),
            })
    }

    fn files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

fn default_state_dir(node: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    base.join("weir").join(node)
}

impl Node {
    /// Reads the fleet's current revision (or, if etcd cannot be reached
    /// within a few seconds, the one kept on disk) and builds the config to
    /// start the gateway with.
    pub async fn start(file: NodeFile) -> Result<(Arc<Node>, Config), FleetError> {
        let name = file.node_name();
        let keys = file.fleet.keys();
        let state_dir = file.fleet.state_dir.clone().unwrap_or_else(|| default_state_dir(&name));
        let store = LocalStore::open(&state_dir)?;
        let node = Arc::new(Node {
            report: Mutex::new(Report {
                node: name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                serving: "etcd".into(),
                admin: file.admin.as_ref().map(|a| a.bind.to_string()),
                ..Report::default()
            }),
            file,
            name,
            keys,
            client: tokio::sync::Mutex::new(None),
            store,
            applied: Mutex::new(None),
            last_read: Mutex::new(0),
            pending: Mutex::new(None),
            report_changed: tokio::sync::Notify::new(),
            syncing: tokio::sync::Mutex::new(()),
            gateway: OnceLock::new(),
            lease: Mutex::new(None),
            retry_at: Mutex::new(None),
        });
        let kept = node.store.load_state().unwrap_or_default();
        let fallback = kept.as_ref().map(super::apply::candidates).unwrap_or_default();
        let online = tokio::time::timeout(START_TIMEOUT, async {
            let mut client = node.client().await?;
            let state = fetch_state(&mut client, &node.keys).await?;
            let built = node
                .materialize(Some(&mut client), &state, &super::apply::candidates(&state), &fallback)
                .await?;
            Ok::<_, FleetError>((state, built))
        })
        .await
        .unwrap_or_else(|_| Err(FleetError::Etcd(format!("no answer within {START_TIMEOUT:?}"))));
        let (state, built) = match online {
            Ok(read) => read,
            Err(error) => {
                // Settings that cannot reach etcd (a CA that does not sign its
                // certificate) are refused at start, not waited out.
                let Some(state) = kept.filter(|_| !error.is_tls_refused()) else {
                    return Err(error);
                };
                let built = node.materialize(None, &state, &fallback, &fallback).await?;
                tracing::warn!(
                    %error,
                    revision = state.revision,
                    dir = %node.store.dir().display(),
                    "etcd cannot be read; serving the revision kept on disk until it can"
                );
                crate::sync::lock(&node.report).serving = "disk".into();
                (state, built)
            }
        };
        let config = built.config.clone();
        node.accept(state, built);
        Ok((node, config))
    }

    /// The config to start on when the one [`Node::start`] gave did not
    /// start: the tenants' policies it had not served before left out (each
    /// reported with `error`), if any were in it.
    pub async fn start_without_new_policies(&self, error: &str) -> Option<Config> {
        let applied = crate::sync::lock(&self.applied).clone()?;
        let kept = self.store.load_state().ok().flatten();
        let fallback = kept.as_ref().map(super::apply::candidates).unwrap_or_default();
        let used = super::apply::candidates(&applied);
        if used
            .iter()
            .all(|(tenant, (revision, _))| fallback.get(tenant).is_some_and(|(r, _)| r == revision))
        {
            return None;
        }
        let built = self.materialize(None, &applied, &fallback, &fallback).await.ok()?;
        let config = built.config.clone();
        self.accept(applied, built);
        for (tenant, (revision, _)) in &used {
            if fallback.get(tenant).is_none_or(|(r, _)| r != revision) {
                self.tenant_failed(tenant, *revision, format!("did not build: {error}"));
            }
        }
        Some(config)
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration source for [`Gateway::start_with_source`].
    pub fn source(self: &Arc<Self>) -> Box<dyn ConfigSource> {
        Box::new(FleetSource(Arc::clone(self)))
    }

    /// Follows the fleet for `gateway` (which must have been started with
    /// [`Node::source`]): applies every new revision, keeps the report
    /// alive, takes the admin API's pool changes. Runs until the gateway is
    /// dropped.
    pub fn attach(self: &Arc<Self>, gateway: &Arc<Gateway>) -> Vec<tokio::task::JoinHandle<()>> {
        let _ = self.gateway.set(Arc::downgrade(gateway));
        {
            let mut report = crate::sync::lock(&self.report);
            report.listeners = gateway
                .local_addrs()
                .iter()
                .map(|(name, addr)| (name.clone(), addr.to_string()))
                .collect();
        }
        gateway.share_pools(Arc::clone(self) as Arc<dyn SharedPools>);
        vec![
            tokio::spawn(Arc::clone(self).follow()),
            tokio::spawn(Arc::clone(self).keep_reporting()),
            tokio::spawn(Arc::clone(self).follow_challenges()),
        ]
    }

    /// Takes the node out of `nodes/` at once (its lease revoked), at
    /// shutdown.
    pub async fn leave(&self) {
        let lease = crate::sync::lock(&self.lease).take();
        if let (Some(lease), Ok(mut client)) = (lease, self.client().await) {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
        }
    }

    /// What the node reports now.
    pub fn report(&self) -> Report {
        crate::sync::lock(&self.report).clone()
    }

    pub(super) async fn client(&self) -> Result<etcd_client::Client, FleetError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = connect(&self.file.fleet).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Drops the client after a failed request: the next one is opened on
    /// the members that answer then.
    pub(super) async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    pub(super) fn applied_state(&self, state: State) {
        let mut report = crate::sync::lock(&self.report);
        report.revision = state.content_revision();
        report.config_revision = state.config_revision;
        report.applied_at = now();
        report.error = None;
        report.failed_revision = None;
        *crate::sync::lock(&self.last_read) = state.revision;
        *crate::sync::lock(&self.applied) = Some(state);
        drop(report);
        self.report_changed.notify_one();
    }

    /// Reports that the state at `revision` was refused; the report is
    /// written again only if that is news (a state read again and again is
    /// not a write each time).
    pub(super) fn failed(&self, revision: i64, error: String) {
        let mut report = crate::sync::lock(&self.report);
        if report.failed_revision == Some(revision) && report.error.as_deref() == Some(error.as_str()) {
            return;
        }
        tracing::error!(revision, %error, "fleet revision not applied; the previous one stays in use");
        report.error = Some(error);
        report.failed_revision = Some(revision);
        drop(report);
        self.report_changed.notify_one();
    }

    /// Reads the fleet's state and applies it if it changed. An error is
    /// returned only when etcd cannot be read; a state that does not build
    /// is reported (and the running one stays).
    pub async fn sync(&self) -> Result<(), FleetError> {
        let _one = self.syncing.lock().await;
        let mut client = self.client().await?;
        let state = match fetch_state(&mut client, &self.keys).await {
            Ok(state) => state,
            Err(FleetError::Etcd(e)) => return Err(FleetError::Etcd(e)),
            Err(error @ FleetError::BadState { revision, read_at, .. }) => {
                // Read: the watch goes on from here, not back over it.
                *crate::sync::lock(&self.last_read) = read_at;
                self.failed(revision, error.to_string());
                return Ok(());
            }
            Err(other) => {
                let revision = crate::sync::lock(&self.report).revision;
                self.failed(revision, other.to_string());
                return Ok(());
            }
        };
        *crate::sync::lock(&self.last_read) = state.revision;
        let unchanged = crate::sync::lock(&self.applied)
            .as_ref()
            .is_some_and(|applied| applied.same_content(&state));
        let was_serving_disk = {
            let mut report = crate::sync::lock(&self.report);
            std::mem::replace(&mut report.serving, "etcd".into()) != "etcd"
        };
        if was_serving_disk {
            self.report_changed.notify_one();
        }
        if unchanged {
            return Ok(());
        }
        self.apply(&mut client, state).await
    }

    /// Applies every change to the fleet's state until the gateway is gone:
    /// a read of the whole state, then a watch from the revision after it;
    /// when the watch ends (etcd away, history compacted past it) the node
    /// reads the whole state again. While etcd cannot be reached it tries
    /// again every [`RETRY_CAP`] at most, each node at its own offset; a
    /// watch that keeps failing at once is retried at most every 5 s.
    async fn follow(self: Arc<Self>) {
        let mut unreachable = false;
        let mut attempts = 0u32;
        let mut watch_failures = 0u32;
        while self.gateway.get().and_then(Weak::upgrade).is_some() {
            if let Err(error) = self.sync().await {
                self.forget_client().await;
                if !unreachable {
                    tracing::warn!(%error, endpoints = ?self.file.fleet.endpoints, "etcd cannot be read; serving the current revision until it can");
                    crate::sync::lock(&self.report).unreachable = Some((error.to_string(), now()));
                    unreachable = true;
                }
                attempts = attempts.saturating_add(1);
                tokio::time::sleep(self.retry_delay(attempts, RETRY_CAP)).await;
                continue;
            }
            if unreachable {
                tracing::info!("etcd can be read again");
                crate::sync::lock(&self.report).unreachable = None;
                self.report_changed.notify_one();
                unreachable = false;
            }
            attempts = 0;
            let start = *crate::sync::lock(&self.last_read) + 1;
            let began = std::time::Instant::now();
            match self.watch_from(start).await {
                Ok(()) => watch_failures = 0,
                Err(error) => {
                    self.forget_client().await;
                    // A watch that ends at once, again and again (a value
                    // etcd holds that this node cannot take) must not turn
                    // into a loop of reads.
                    watch_failures = if began.elapsed() < Duration::from_secs(5) {
                        watch_failures.saturating_add(1)
                    } else {
                        1
                    };
                    let wait = self.retry_delay(watch_failures, Duration::from_secs(5));
                    tracing::warn!(%error, retry_in = ?wait, "etcd watch ended; reading the whole state again");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// How long to wait before attempt `n` (from 1): 100 ms doubling up to
    /// `cap`, plus up to a tenth of it that is this node's own (so that a
    /// fleet does not retry in step).
    fn retry_delay(&self, n: u32, cap: Duration) -> Duration {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let base = Duration::from_millis(100)
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(cap);
        let spread = BuildHasherDefault::<DefaultHasher>::default().hash_one(&self.name) % 1000;
        base + cap / 10 * u32::try_from(spread).unwrap_or(0) / 1000
    }

    /// Watches what the node serves (the config, the pools, the tenants'
    /// policies: three watches on one stream, not the whole prefix with
    /// every node's report in it) from `start`, reading the state again on
    /// each change, until the watch ends.
    async fn watch_from(&self, start: i64) -> Result<(), FleetError> {
        let client = self.client().await?;
        let options = || {
            etcd_client::WatchOptions::new()
                .with_start_revision(start)
                .with_fragment()
        };
        let mut watches = client.watch_client().max_decoding_message_size(MAX_WATCH_BYTES);
        let mut stream = watches.watch(self.keys.config(), Some(options())).await?;
        stream.watch(self.keys.pools(), Some(options().with_prefix())).await?;
        stream
            .watch(self.keys.policies(), Some(options().with_prefix()))
            .await?;
        loop {
            let retry_at = *crate::sync::lock(&self.retry_at);
            let message = match retry_at {
                None => stream.message().await?,
                Some(at) => tokio::select! {
                    message = stream.message() => message?,
                    () = tokio::time::sleep_until(at.into()) => {
                        *crate::sync::lock(&self.retry_at) = None;
                        self.sync().await?;
                        continue;
                    }
                },
            };
            let Some(response) = message else { break };
            if response.canceled() {
                if response.compact_revision() > 0 {
                    tracing::info!(
                        compacted = response.compact_revision(),
                        "etcd's history was compacted past this node's revision"
                    );
                    return Ok(());
                }
                // Cancelled for another reason (a permission taken away):
                // an error, so that the node does not watch again at once.
                return Err(FleetError::Etcd(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason().escape_debug()
                )));
            }
            // Events the last read already took in (the fragments of one
            // revision, a burst of writes) need no read of their own.
            let read = *crate::sync::lock(&self.last_read);
            let newer = response
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .any(|kv| kv.mod_revision() > read);
            if newer {
                self.sync().await?;
            }
        }
        Ok(())
    }
}

type Boxed<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl SharedPools for Node {
    fn set_pool<'a>(&'a self, name: &'a str, pool: Option<PoolConfig>) -> Boxed<'a, Result<(), SetPoolError>> {
        Box::pin(async move {
            use etcd_client::{Compare, CompareOp, Txn, TxnOp};
            let seen = crate::sync::lock(&self.applied)
                .as_ref()
                .and_then(|state| state.pool_revisions.get(name).copied())
                .unwrap_or(0);
            let key = self.keys.pool(name);
            let value = serde_json::to_vec(&pool).map_err(|e| SetPoolError::Failed(e.to_string()))?;
            if value.len() > crate::fleet::MAX_POOL_BYTES {
                return Err(SetPoolError::Failed(format!(
                    "the pool is {} bytes as JSON; a fleet's pool may have {} at most",
                    value.len(),
                    crate::fleet::MAX_POOL_BYTES
                )));
            }
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(key.clone(), CompareOp::Equal, seen)])
                .and_then(vec![TxnOp::put(key, value, None)]);
            let failed = |e: FleetError| SetPoolError::Failed(e.to_string());
            let mut client = self.client().await.map_err(failed)?;
            let answer = client.txn(txn).await.map_err(|e| failed(e.into()))?;
            let written = answer.header().map_or(0, |h| h.revision());
            self.sync().await.map_err(failed)?;
            if !answer.succeeded() {
                return Err(SetPoolError::Conflict);
            }
            let report = self.report();
            match (report.error, report.failed_revision) {
                (Some(error), Some(revision)) if revision >= written => Err(SetPoolError::Failed(error)),
                _ => Ok(()),
            }
        })
    }

    fn fleet_status(&self) -> Boxed<'_, serde_json::Value> {
        Box::pin(async move {
            let this = self.report();
            let read = async {
                let mut client = self.client().await?;
                let now = crate::fleet::current_revisions(&mut client, &self.keys).await?;
                let nodes = list_nodes(&mut client, &self.keys).await?;
                Ok::<_, FleetError>(status_json(&self.keys, &now, &nodes))
            };
            match read.await {
                Ok(mut status) => {
                    status["node"] = serde_json::json!(this);
                    status
                }
                Err(e) => serde_json::json!({ "node": this, "prefix": self.keys.prefix(), "error": e.to_string() }),
            }
        })
    }
}
