//! A running gateway: started from a config (snapshot built, listeners
//! bound, accept loops spawned), and changed only through
//! `Gateway::swap`, the one rebuild-and-swap that reloads, pool changes
//! and any configuration source use. Connections themselves are served by
//! `conn`; file watching is [`crate::watch`].

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::conn::accept::{DESCRIPTOR_LIMIT, accept_loop, deferral, max_pipes, set_deferral};
use crate::plugin::{PluginError, Runtime};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::source::{ConfigSource, FileSource, SetPoolError, SharedPools};

pub use crate::conn::accept::ListenerStats;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The plugin engine could not be set up.
    #[error(transparent)]
    Runtime(#[from] PluginError),
    /// The routing state could not be built.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A listener's address could not be bound.
    #[error("listeners.{listener}.bind: cannot listen on {addr}: {error}")]
    Bind {
        /// The listener.
        listener: String,
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        error: io::Error,
    },
}

/// A running gateway. Dropping it stops accepting; connections in flight
/// finish on their own.
pub struct Gateway {
    pub(crate) snapshot: Arc<ArcSwap<Snapshot>>,
    addrs: BTreeMap<String, SocketAddr>,
    accept_tasks: Vec<JoinHandle<()>>,
    /// The listening sockets by listener name, for options a reload changes.
    /// Weak: the accept task owns its socket, so stopping it closes the port.
    sockets: BTreeMap<Arc<str>, std::sync::Weak<TcpListener>>,
    runtime: Arc<Runtime>,
    /// Where the configuration comes from.
    pub(crate) source: Box<dyn ConfigSource>,
    reloads: tokio::sync::Mutex<ReloadStatus>,
    stats: BTreeMap<String, Arc<ListenerStats>>,
    /// Pools created or changed through the admin API: applied over the
    /// config file at every build, kept across reloads, lost on restart.
    runtime_pools: std::sync::Mutex<BTreeMap<String, Option<crate::config::PoolConfig>>>,
    /// The listeners' addresses, registered so that no decision reaches them.
    _own: Vec<crate::own::OwnAddress>,
    /// Where pool changes go when nodes share them (fleet mode).
    shared: std::sync::OnceLock<Arc<dyn SharedPools>>,
    /// Shared pool changes made through this node, one at a time.
    shared_edits: tokio::sync::Mutex<()>,
}

/// A change to one pool through the admin API.
#[derive(Debug)]
pub enum PoolEdit {
    /// Create the pool, or replace it.
    Set(crate::config::PoolConfig),
    /// Add a server.
    AddServer(crate::config::ServerConfig),
    /// Remove the server with this address.
    RemoveServer(String),
    /// Drain (`true`: no new connections, the open ones run to their end)
    /// or undrain the server with this address.
    Drain(String, bool),
    /// Remove the pool.
    Delete,
}

impl PoolEdit {
    /// The pool `name` after this change to `current` (`None`: removed).
    fn apply(
        &self,
        name: &str,
        current: Option<crate::config::PoolConfig>,
    ) -> Result<Option<crate::config::PoolConfig>, PoolEditError> {
        match (self, current) {
            (PoolEdit::Set(pool), _) => {
                crate::config::check_pool_name(name).map_err(PoolEditError::Invalid)?;
                Ok(Some(pool.clone()))
            }
            (PoolEdit::Delete, Some(_)) => Ok(None),
            (PoolEdit::AddServer(server), Some(mut pool)) => {
                if pool.servers.iter().any(|s| s.address() == server.address()) {
                    return Err(PoolEditError::Conflict(format!(
                        "`{}` is already in the pool",
                        server.address()
                    )));
                }
                pool.servers.push(server.clone());
                Ok(Some(pool))
            }
            (PoolEdit::RemoveServer(address), Some(mut pool)) => {
                let before = pool.servers.len();
                pool.servers.retain(|s| s.address() != address);
                if pool.servers.len() == before {
                    return Err(PoolEditError::NotFound(format!("`{address}` is not in the pool")));
                }
                if pool.servers.is_empty() {
                    return Err(PoolEditError::Conflict("a pool needs at least one server".into()));
                }
                Ok(Some(pool))
            }
            (PoolEdit::Drain(address, drain), Some(mut pool)) => {
                let server = pool
                    .servers
                    .iter_mut()
                    .find(|s| s.address() == address)
                    .ok_or_else(|| PoolEditError::NotFound(format!("`{address}` is not in the pool")))?;
                *server = server.draining(*drain);
                Ok(Some(pool))
            }
            (_, None) => Err(PoolEditError::NotFound(format!("no pool named `{name}`"))),
        }
    }
}

/// Why a pool change was not made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolEditError {
    /// The pool, or the server, does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change contradicts the pool as it is (a server already there, the
    /// last server removed).
    #[error("{0}")]
    Conflict(String),
    /// The config with the change does not check or build.
    #[error("{0}")]
    Invalid(String),
}

/// What reloads have done so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    /// Successful reloads.
    pub succeeded: u64,
    /// Failed reloads (the previous snapshot stayed).
    pub failed: u64,
    /// The latest one.
    pub last: Option<ReloadReport>,
}

/// One reload.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// What asked for it: `file`, `SIGHUP`, `api`.
    pub trigger: String,
    /// When it finished, seconds since the Unix epoch.
    pub at: u64,
    /// How long building the snapshot took, in milliseconds.
    pub millis: u64,
    /// Why it failed; `None` when the new snapshot is in use.
    pub error: Option<String>,
    /// Plugins loaded anew (the others were kept, instances and all).
    pub reloaded_plugins: Vec<String>,
}

impl Gateway {
    /// Builds the snapshot (loading every plugin), binds every listener and
    /// starts accepting on the current tokio runtime; reloads read the
    /// config file again.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let source = Box::new(FileSource::new(config.path.clone()));
        Gateway::start_with_source(config, source).await
    }

    /// Like [`Gateway::start`], with reloads reading `source`.
    pub async fn start_with_source(config: Config, source: Box<dyn ConfigSource>) -> Result<Gateway, GatewayError> {
        let runtime = Arc::new(Runtime::for_config(&config)?);
        let snapshot = Snapshot::build(config, &runtime)?;
        let mut sockets = Vec::new();
        for listener in snapshot.listeners() {
            let addr = listener.config.bind;
            let bind_error = |error| GatewayError::Bind {
                listener: listener.name.to_string(),
                addr,
                error,
            };
            let socket = TcpListener::bind(addr).await.map_err(bind_error)?;
            set_deferral(&socket, deferral(&listener.config)).map_err(bind_error)?;
            crate::conn::accept::set_listener_nodelay(&socket).map_err(bind_error)?;
            let local = socket.local_addr().map_err(bind_error)?;
            sockets.push((Arc::clone(&listener.name), local, socket));
        }
        // The admin address is weir's own before the admin server binds it:
        // no probe or decision may reach it in between.
        let mut own = Vec::new();
        if let Some(admin) = snapshot.config.admin.as_ref().filter(|a| a.bind.port() != 0) {
            own.push(crate::own::OwnAddress::register(admin.bind));
        }
        put_in_force(&snapshot);
        crate::relay::set_max_pipes(max_pipes(&snapshot.config.limits));
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let mut addrs = BTreeMap::new();
        let mut accept_tasks = Vec::new();
        let mut stats = BTreeMap::new();
        let all = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::sync::LazyLock::force(&DESCRIPTOR_LIMIT);
        let mut by_name = BTreeMap::new();
        for (name, local, socket) in sockets {
            let socket = Arc::new(socket);
            by_name.insert(Arc::clone(&name), Arc::downgrade(&socket));
            addrs.insert(name.to_string(), local);
            own.push(crate::own::OwnAddress::register(local));
            let listener_stats = Arc::new(ListenerStats::default());
            stats.insert(name.to_string(), Arc::clone(&listener_stats));
            accept_tasks.push(tokio::spawn(accept_loop(
                name,
                socket,
                Arc::clone(&snapshot),
                listener_stats,
                Arc::clone(&all),
            )));
        }
        Ok(Gateway {
            snapshot,
            addrs,
            accept_tasks,
            sockets: by_name,
            runtime,
            source,
            reloads: tokio::sync::Mutex::new(ReloadStatus::default()),
            stats,
            runtime_pools: std::sync::Mutex::new(BTreeMap::new()),
            _own: own,
            shared: std::sync::OnceLock::new(),
            shared_edits: tokio::sync::Mutex::new(()),
        })
    }

    /// Reads the configuration again from its source (the config file) and
    /// makes it current through `Gateway::swap`: on success new
    /// connections use it, connections in flight keep theirs. Any failure
    /// (unreadable or invalid config, a plugin that does not load or refuses
    /// its config, a certificate that does not load, a listener added,
    /// removed or moved) keeps the current snapshot and is returned, logged
    /// and counted. Reloads run one at a time.
    pub async fn reload(&self, trigger: &str) -> ReloadReport {
        let mut status = self.reloads.lock().await;
        let overrides = crate::sync::lock(&self.runtime_pools).clone();
        let loaded = self.source.load().and_then(|config| config.with_pools(&overrides));
        self.swap(&mut status, trigger, loaded.map_err(|e| e.to_string())).await
    }

    /// The one way a configuration takes effect — a reload, a pool change
    /// through the admin API, and any other source of configuration: the
    /// listeners must be the same, the snapshot is built off the runtime's
    /// workers (plugins whose component and config did not change are kept,
    /// instances and all), its health checks start, and it is stored for
    /// new connections; compiled code is kept for it and the snapshot
    /// before. Each swap is counted (`weir_reloads_total{result}`), logged
    /// and recorded with its trigger. The caller holds the reload lock.
    async fn swap(&self, status: &mut ReloadStatus, trigger: &str, config: Result<Config, String>) -> ReloadReport {
        let started = Instant::now();
        let old = self.snapshot.load_full();
        let built = match config.and_then(|config| same_listeners(&old.config, &config).map(|()| config)) {
            Err(e) => Err(e),
            Ok(config) => {
                let runtime = Arc::clone(&self.runtime);
                let previous = Arc::clone(&old);
                build_aside(move || Snapshot::rebuild(config, &runtime, Some(&previous)))
                    .await
                    .and_then(|built| built.map_err(|e| e.to_string()))
            }
        };
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let at = crate::clock::unix_now();
        let (current, previous, report) = match built {
            Ok(new) => {
                let reloaded_plugins: Vec<String> = new
                    .plugins()
                    .iter()
                    .filter(|(name, plugin)| old.plugins().get(*name).is_none_or(|o| !Arc::ptr_eq(o, plugin)))
                    .map(|(name, _)| name.clone())
                    .collect();
                put_in_force(&new);
                let new = Arc::new(new);
                self.snapshot.store(Arc::clone(&new));
                self.apply_socket_options(&old, &new);
                status.succeeded += 1;
                tracing::info!(trigger, millis, reloaded = ?reloaded_plugins, "reloaded");
                let report = ReloadReport {
                    trigger: trigger.into(),
                    at,
                    millis,
                    error: None,
                    reloaded_plugins,
                };
                (new, Some(old), report)
            }
            Err(error) => {
                status.failed += 1;
                tracing::error!(trigger, %error, "reload failed; the previous config stays in use");
                let report = ReloadReport {
                    trigger: trigger.into(),
                    at,
                    millis,
                    error: Some(error),
                    reloaded_plugins: Vec::new(),
                };
                (old, None, report)
            }
        };
        // Compiled code is kept for what runs now and what ran before (a
        // rollback), not for every component a build ever brought.
        let in_use = current
            .plugins()
            .values()
            .chain(previous.iter().flat_map(|p| p.plugins().values()));
        self.runtime.retain_compiled(in_use.map(|plugin| &**plugin));
        // A build's compile frees hundreds of MiB that the allocator would
        // otherwise keep.
        crate::heap::trim();
        crate::metrics::METRICS.reloaded(report.error.is_none());
        status.last = Some(report.clone());
        report
    }

    /// Applies the socket options of `new`'s listeners that differ from
    /// `old`'s (the deferred accept); a socket that refuses keeps its
    /// options, and says so.
    fn apply_socket_options(&self, old: &Snapshot, new: &Snapshot) {
        crate::relay::set_max_pipes(max_pipes(&new.config.limits));
        for listener in new.listeners() {
            let seconds = deferral(&listener.config);
            let unchanged = old
                .listener(&listener.name)
                .is_some_and(|before| deferral(&before.config) == seconds);
            if unchanged {
                continue;
            }
            if let Some(socket) = self.sockets.get(&listener.name).and_then(std::sync::Weak::upgrade)
                && let Err(error) = set_deferral(&socket, seconds)
            {
                tracing::warn!(listener = &*listener.name, %error, "defer_accept could not be changed; the old setting stays");
            }
        }
    }

    /// How many compiled plugin components are kept for reuse: those of
    /// the running snapshot and of the one before it.
    pub fn compiled_components(&self) -> usize {
        self.runtime.compiled_count()
    }

    /// Sends the admin API's pool changes to `shared` (every node's store)
    /// instead of keeping them in this process.
    pub fn share_pools(&self, shared: Arc<dyn SharedPools>) {
        let _ = self.shared.set(shared);
    }

    /// The fleet as this node sees it, in fleet mode.
    pub async fn fleet_status(&self) -> Option<serde_json::Value> {
        match self.shared.get() {
            Some(shared) => Some(shared.fleet_status().await),
            None => None,
        }
    }

    /// The earliest a tenant's component refused since the last call (its
    /// compile allowance spent) may be compiled, taken.
    pub fn compile_retry_at(&self) -> Option<Instant> {
        self.runtime.compile_budgets().take_retry_at()
    }

    /// Changes a pool at runtime: the current config with the change,
    /// checked and built whole like a reload; nothing changes when anything
    /// fails. The pool is read, changed and stored under the reload lock, so
    /// concurrent changes never lose one another. Runtime changes are kept
    /// across reloads, not restarts — except in fleet mode, where they are
    /// stored for every node (and kept across restarts), a change made
    /// meanwhile by another node being read before this one is made again.
    pub async fn edit_pool(&self, name: &str, edit: PoolEdit) -> Result<(), PoolEditError> {
        if let Some(shared) = self.shared.get() {
            return self.edit_shared_pool(shared.as_ref(), name, &edit).await;
        }
        let mut status = self.reloads.lock().await;
        let old = self.snapshot.load_full();
        let changed = edit.apply(name, old.config.pools.get(name).cloned())?;
        let mut overrides = crate::sync::lock(&self.runtime_pools).clone();
        overrides.insert(name.to_owned(), changed);
        let config = old
            .config
            .with_pools(&overrides)
            .map_err(|e| PoolEditError::Invalid(e.to_string()))?;
        let report = self.swap(&mut status, "pools", Ok(config)).await;
        if let Some(error) = report.error {
            return Err(PoolEditError::Invalid(error));
        }
        *crate::sync::lock(&self.runtime_pools) = overrides;
        tracing::info!(pool = name, "pool changed at runtime");
        Ok(())
    }

    async fn edit_shared_pool(
        &self,
        shared: &dyn SharedPools,
        name: &str,
        edit: &PoolEdit,
    ) -> Result<(), PoolEditError> {
        let _one = self.shared_edits.lock().await;
        for _ in 0..5 {
            let old = self.snapshot.load_full();
            let changed = edit.apply(name, old.config.pools.get(name).cloned())?;
            let overrides = BTreeMap::from([(name.to_owned(), changed.clone())]);
            old.config
                .with_pools(&overrides)
                .map_err(|e| PoolEditError::Invalid(e.to_string()))?;
            match shared.set_pool(name, changed).await {
                Ok(()) => {
                    tracing::info!(pool = name, "pool changed for the fleet");
                    return Ok(());
                }
                Err(SetPoolError::Conflict) => continue,
                Err(SetPoolError::Failed(error)) => return Err(PoolEditError::Invalid(error)),
            }
        }
        Err(PoolEditError::Conflict(
            "the pool kept being changed by other nodes; try again".into(),
        ))
    }

    /// What reloads have done so far.
    pub async fn reload_status(&self) -> ReloadStatus {
        self.reloads.lock().await.clone()
    }

    /// Connection counts by listener.
    pub fn stats(&self) -> &BTreeMap<String, Arc<ListenerStats>> {
        &self.stats
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.addrs.get(listener).copied()
    }

    /// Every listener's bound address, by name.
    pub fn local_addrs(&self) -> &BTreeMap<String, SocketAddr> {
        &self.addrs
    }

    /// Stops accepting: every listener's socket is closed, so the kernel
    /// refuses new connections, while the connections in progress go on.
    pub fn stop_accepting(&self) {
        for task in &self.accept_tasks {
            task.abort();
        }
    }

    /// Connections in progress over all listeners.
    pub fn active_connections(&self) -> u64 {
        self.stats.values().map(|s| s.active.load(Ordering::Relaxed)).sum()
    }

    /// The routing state new connections use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

/// Checks that a new config binds the same listeners to the same
/// addresses: sockets are bound once, at start.
fn same_listeners(old: &Config, new: &Config) -> Result<(), String> {
    for (name, listener) in &new.listeners {
        match old.listeners.get(name) {
            None => return Err(format!("listeners.{name} is new: restart weir to bind it")),
            Some(before) if before.bind != listener.bind => {
                return Err(format!(
                    "listeners.{name}.bind changed from {} to {}: restart weir to move it",
                    before.bind, listener.bind
                ));
            }
            Some(_) => {}
        }
    }
    match old.listeners.keys().find(|name| !new.listeners.contains_key(*name)) {
        Some(gone) => Err(format!("listeners.{gone} was removed: restart weir to unbind it")),
        None => Ok(()),
    }
}

impl crate::acme::Renewing for Gateway {
    fn current(&self) -> (Config, Arc<crate::acme::AcmeState>) {
        let snapshot = self.snapshot.load();
        (snapshot.config.clone(), snapshot.acme())
    }

    async fn reload(&self) {
        Gateway::reload(self, "acme").await;
    }
}

/// Makes `snapshot` the one whose process-wide bounds hold for what runs
/// outside a routed connection — the descriptor reserve health probes leave
/// free, the bytes parked before routing — and starts its health checks.
fn put_in_force(snapshot: &Snapshot) {
    let limits = &snapshot.config.limits;
    crate::descriptors::RESERVE_IN_FORCE.store(limits.descriptor_reserve.unwrap_or(u64::MAX), Ordering::Relaxed);
    crate::parked::MAX_PARKED_BYTES.store(
        limits
            .max_parked_bytes
            .unwrap_or(crate::parked::DEFAULT_MAX_PARKED_BYTES),
        Ordering::Relaxed,
    );
    snapshot.start_health_checks();
}

/// Runs a build (compiling, configuring, checking a new snapshot) on the
/// build thread, at the lowest CPU priority as the slow lane's and the
/// compiler's threads run: a reload — a tenant republishing components
/// again and again — takes only the CPU the connections leave. One thread
/// for the life of the process, not one per build: glibc gives each new
/// thread a heap arena of its own, and five failed reloads of the Python
/// plugin, each on a new thread, left RSS at 163 MiB and rising, where on
/// one thread it stays flat.
async fn build_aside<T: Send + 'static>(build: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    type Job = Box<dyn FnOnce() + Send>;
    static BUILDS: std::sync::OnceLock<Result<std::sync::mpsc::Sender<Job>, String>> = std::sync::OnceLock::new();
    let builds = BUILDS.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("weir-build".into())
            .spawn(move || {
                crate::plugin::lower_priority();
                for job in queue {
                    // A build that panics is that build's failure; the
                    // thread goes on to the next.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map(|_| jobs)
            .map_err(|e| format!("cannot start the build thread: {e}"))
    });
    let jobs = builds.as_ref().map_err(Clone::clone)?;
    let (done, built) = tokio::sync::oneshot::channel();
    // What the build starts on the runtime (resolvers, timers) needs its handle.
    let runtime = tokio::runtime::Handle::current();
    jobs.send(Box::new(move || {
        let _inside = runtime.enter();
        let _ = done.send(build());
    }))
    .map_err(|_| "the build thread is gone".to_owned())?;
    built
        .await
        .map_err(|_| "the build ended without a result (it panicked)".to_owned())
}

#[cfg(test)]
mod tests {
    /// Builds run at the lowest priority, on a thread of their own (the
    /// caller's stays as it was), with the runtime at hand.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn builds_run_aside_at_the_lowest_priority() {
        let before = rustix::process::getpriority_process(None).expect("nice");
        let (nice, handle) = super::build_aside(|| {
            (
                rustix::process::getpriority_process(None).expect("nice"),
                tokio::runtime::Handle::try_current().is_ok(),
            )
        })
        .await
        .expect("built");
        assert_eq!(nice, 19);
        assert!(handle, "the build sees the runtime");
        assert_eq!(rustix::process::getpriority_process(None).expect("nice"), before);
        let panicked = super::build_aside(|| -> u8 { panic!("a build that panics") }).await;
        assert!(panicked.expect_err("no result").contains("panicked"));
    }
}
