//! The data path: accept, sniff under a deadline, ask the plugin chain,
//! connect, replay the sniffed bytes, relay. One task per connection; a
//! connection holds the snapshot it started with to the end.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::addr::HostPort;
use rustls::pki_types::ServerName;

use crate::config::{Config, ListenerConfig, ListenerProtocol};
use crate::decision::{Action, After, ClientAuth, Decision, Target, Termination, Upstream, UpstreamTls};
use crate::plugin::{PluginError, Runtime};
use crate::pool::BackendGuard;
use crate::relay::{RelayEnd, Timeouts, Transfer, relay, relay_streams};
use crate::rewind::Rewind;
use crate::snapshot::{ClientSlot, Listener, Snapshot, SnapshotError, Tenant, TenantSlot};
use crate::tls::{Admission, TerminateError, describe};
use crate::wit;
use weir_wire::postgres::{self, First, PostgresError};
use weir_wire::proxy_protocol;
use weir_wire::sniff::{self, ClientHello, SniffError, Sniffed};

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

/// Connections in progress over all listeners.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Counter behind connection ids.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// A running gateway. Dropping it stops accepting; connections in flight
/// finish on their own.
pub struct Gateway {
    snapshot: Arc<ArcSwap<Snapshot>>,
    addrs: BTreeMap<String, SocketAddr>,
    accept_tasks: Vec<JoinHandle<()>>,
    runtime: Arc<Runtime>,
    config_path: PathBuf,
    reloads: tokio::sync::Mutex<ReloadStatus>,
    stats: BTreeMap<String, Arc<ListenerStats>>,
    /// Pools created or changed through the admin API: applied over the
    /// config file at every build, kept across reloads, lost on restart.
    runtime_pools: std::sync::Mutex<BTreeMap<String, Option<crate::config::PoolConfig>>>,
    /// The listeners' addresses, registered so that no decision reaches them.
    _own: Vec<crate::own::OwnAddress>,
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
    /// Remove the pool.
    Delete,
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

/// Connection counts of one listener.
#[derive(Debug, Default, Serialize)]
pub struct ListenerStats {
    /// Connections in progress.
    pub active: AtomicU64,
    /// Connections accepted since start.
    pub total: AtomicU64,
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
    /// starts accepting on the current tokio runtime.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let runtime = Arc::new(Runtime::new()?);
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
            let local = socket.local_addr().map_err(bind_error)?;
            sockets.push((Arc::clone(&listener.name), local, socket));
        }
        let config_path = snapshot.config.path.clone();
        snapshot.start_health_checks();
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let mut addrs = BTreeMap::new();
        let mut accept_tasks = Vec::new();
        let mut stats = BTreeMap::new();
        std::sync::LazyLock::force(&DESCRIPTOR_LIMIT);
        let mut own = Vec::new();
        for (name, local, socket) in sockets {
            addrs.insert(name.to_string(), local);
            own.push(crate::own::OwnAddress::register(local));
            let listener_stats = Arc::new(ListenerStats::default());
            stats.insert(name.to_string(), Arc::clone(&listener_stats));
            accept_tasks.push(tokio::spawn(accept_loop(
                name,
                socket,
                Arc::clone(&snapshot),
                listener_stats,
            )));
        }
        Ok(Gateway {
            snapshot,
            addrs,
            accept_tasks,
            runtime,
            config_path,
            reloads: tokio::sync::Mutex::new(ReloadStatus::default()),
            stats,
            runtime_pools: std::sync::Mutex::new(BTreeMap::new()),
            _own: own,
        })
    }

    /// Reads the config file again and builds a new snapshot from it, off
    /// the accept path; on success new connections use it, connections in
    /// flight keep theirs. Any failure (unreadable or invalid config, a
    /// plugin that does not load or refuses its config, a certificate that
    /// does not load, a listener added, removed or moved) keeps the current
    /// snapshot and is returned, logged and counted. Reloads run one at a
    /// time.
    pub async fn reload(&self, trigger: &str) -> ReloadReport {
        let mut status = self.reloads.lock().await;
        let started = Instant::now();
        let old = self.snapshot.load_full();
        let overrides = self.runtime_pools.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let loaded = Config::load(&self.config_path).and_then(|config| config.with_pools(&overrides));
        let result = match loaded {
            Err(e) => Err(e.to_string()),
            Ok(config) => match same_listeners(&old.config, &config) {
                Err(e) => Err(e),
                Ok(()) => {
                    let runtime = Arc::clone(&self.runtime);
                    let previous = Arc::clone(&old);
                    tokio::task::spawn_blocking(move || Snapshot::rebuild(config, &runtime, Some(&previous)))
                        .await
                        .map_err(|e| format!("the reload task failed: {e}"))
                        .and_then(|built| built.map_err(|e| e.to_string()))
                }
            },
        };
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Compiled code is kept for what runs now and what ran before (a
        // rollback), not for every component a reload ever brought.
        let prune = |current: &Snapshot, previous: Option<&Snapshot>| {
            let in_use = current
                .plugins()
                .values()
                .chain(previous.into_iter().flat_map(|p| p.plugins().values()));
            self.runtime.retain_compiled(in_use.map(|plugin| &**plugin));
            // A build's compile frees hundreds of MiB that the allocator
            // would otherwise keep.
            crate::heap::trim();
        };
        let report = match result {
            Ok(new) => {
                let reloaded_plugins: Vec<String> = new
                    .plugins()
                    .iter()
                    .filter(|(name, plugin)| old.plugins().get(*name).is_none_or(|o| !Arc::ptr_eq(o, plugin)))
                    .map(|(name, _)| name.clone())
                    .collect();
                new.start_health_checks();
                prune(&new, Some(&old));
                self.snapshot.store(Arc::new(new));
                status.succeeded += 1;
                tracing::info!(trigger, millis, reloaded = ?reloaded_plugins, "reloaded");
                ReloadReport {
                    trigger: trigger.into(),
                    at,
                    millis,
                    error: None,
                    reloaded_plugins,
                }
            }
            Err(error) => {
                prune(&old, None);
                status.failed += 1;
                tracing::error!(trigger, %error, "reload failed; the previous config stays in use");
                ReloadReport {
                    trigger: trigger.into(),
                    at,
                    millis,
                    error: Some(error),
                    reloaded_plugins: Vec::new(),
                }
            }
        };
        let result = if report.error.is_none() { "ok" } else { "error" };
        crate::metrics::METRICS
            .reloads
            .get_or_create(&crate::metrics::ReloadLabels { result })
            .inc();
        status.last = Some(report.clone());
        report
    }

    /// How many compiled plugin components are kept for reuse: those of
    /// the running snapshot and of the one before it.
    pub fn compiled_components(&self) -> usize {
        self.runtime.compiled_count()
    }

    /// Changes a pool at runtime: the current config with the change,
    /// checked and built whole like a reload; nothing changes when anything
    /// fails. The pool is read, changed and stored under the reload lock, so
    /// concurrent changes never lose one another. Runtime changes are kept
    /// across reloads, not restarts.
    pub async fn edit_pool(&self, name: &str, edit: PoolEdit) -> Result<(), PoolEditError> {
        let _status = self.reloads.lock().await;
        let old = self.snapshot.load_full();
        let current = old.config.pools.get(name).cloned();
        let changed = match (edit, current) {
            (PoolEdit::Set(pool), _) => {
                crate::config::check_pool_name(name).map_err(PoolEditError::Invalid)?;
                Some(pool)
            }
            (PoolEdit::Delete, Some(_)) => None,
            (PoolEdit::AddServer(server), Some(mut pool)) => {
                if pool.servers.iter().any(|s| s.address() == server.address()) {
                    return Err(PoolEditError::Conflict(format!(
                        "`{}` is already in the pool",
                        server.address()
                    )));
                }
                pool.servers.push(server);
                Some(pool)
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
                Some(pool)
            }
            (_, None) => return Err(PoolEditError::NotFound(format!("no pool named `{name}`"))),
        };
        let mut overrides = self.runtime_pools.lock().unwrap_or_else(|p| p.into_inner()).clone();
        overrides.insert(name.to_owned(), changed);
        let config = old
            .config
            .with_pools(&overrides)
            .map_err(|e| PoolEditError::Invalid(e.to_string()))?;
        let runtime = Arc::clone(&self.runtime);
        let previous = Arc::clone(&old);
        let new = tokio::task::spawn_blocking(move || Snapshot::rebuild(config, &runtime, Some(&previous)))
            .await
            .map_err(|e| PoolEditError::Invalid(format!("the build task failed: {e}")))?
            .map_err(|e| PoolEditError::Invalid(e.to_string()))?;
        new.start_health_checks();
        self.snapshot.store(Arc::new(new));
        *self.runtime_pools.lock().unwrap_or_else(|p| p.into_inner()) = overrides;
        tracing::info!(pool = name, "pool changed at runtime");
        Ok(())
    }

    /// What reloads have done so far.
    pub async fn reload_status(&self) -> ReloadStatus {
        self.reloads.lock().await.clone()
    }

    /// Connection counts by listener.
    pub fn stats(&self) -> &BTreeMap<String, Arc<ListenerStats>> {
        &self.stats
    }

    /// Every file the current config depends on: itself, plugin `.wasm` and
    /// config files, certificates, keys, OCSP responses, CA bundles,
    /// collateral.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let snapshot = self.snapshot.load();
        let config = &snapshot.config;
        let mut files = vec![self.config_path.clone()];
        for plugin in config.plugins.values() {
            files.push(config.resolve(&plugin.wasm));
            files.extend(plugin.config_file.clone());
        }
        for cert in config.certificates.values() {
            files.push(config.resolve(&cert.cert));
            files.push(config.resolve(&cert.key));
            files.extend(cert.ocsp.as_ref().map(|f| config.resolve(f)));
        }
        files.extend(
            config
                .cas
                .values()
                .filter_map(|ca| ca.file.as_ref())
                .map(|f| config.resolve(f)),
        );
        files.extend(config.attestation.collateral.iter().map(|f| config.resolve(f)));
        files
    }

    /// Watches every file the config depends on and reloads when one
    /// changes; bursts of events (an editor's write-rename-chmod, a build
    /// writing several plugins) become one reload after they settle for
    /// `debounce`. Runs until the gateway is dropped.
    pub fn watch(self: &Arc<Self>, debounce: Duration) -> Result<JoinHandle<()>, String> {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading a file (as a reload does) is not a change.
            if let Ok(event) = event
                && !matches!(event.kind, notify::EventKind::Access(_))
            {
                let _ = tx.send(event.paths);
            }
        })
        .map_err(|e| format!("cannot watch files: {e}"))?;
        let gateway = Arc::downgrade(self);
        let mut files = self.watched_files();
        let mut watched = watch_set(&files);
        for dir in watched.keys() {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        }
        let mut last = signature(&files);
        Ok(tokio::spawn(async move {
            // An event only says that something in a watched directory
            // changed; what weir reads changed when the files' signatures
            // did. That catches a symlink swapped above a file (Kubernetes
            // ConfigMaps swap `..data`) and ignores other files' churn (a
            // log written beside the config).
            while rx.recv().await.is_some() {
                let mut settled = signature(&files);
                if settled == last {
                    continue;
                }
                // Let the burst settle: only changes to what weir reads
                // extend the quiet period.
                let mut quiet_until = tokio::time::Instant::now() + debounce;
                loop {
                    match tokio::time::timeout_at(quiet_until, rx.recv()).await {
                        Ok(Some(_)) => {
                            let now = signature(&files);
                            if now != settled {
                                settled = now;
                                quiet_until = tokio::time::Instant::now() + debounce;
                            }
                        }
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let Some(gateway) = gateway.upgrade() else { return };
                gateway.reload("file").await;
                // What the reload read is what `settled` describes: a change
                // made while it ran still differs from it. Files the new
                // config adds are taken as they are now.
                files = gateway.watched_files();
                let mut next = signature(&files);
                for (file, seen) in &mut next {
                    if let Some(before) = settled.get(file) {
                        seen.clone_from(before);
                    }
                }
                last = next;
                let now = watch_set(&files);
                for dir in now.keys().filter(|d| !watched.contains_key(*d)) {
                    if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch");
                    }
                }
                for dir in watched.keys().filter(|d| !now.contains_key(*d)) {
                    let _ = watcher.unwatch(dir);
                }
                watched = now;
            }
        }))
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

/// The directories to watch for `files` (non-recursively, so that files
/// replaced by rename are seen): each file's own directory and, when it is
/// reached through a symlink, its target's.
fn watch_set(files: &[PathBuf]) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut set: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for file in files {
        let absolute = std::path::absolute(file).unwrap_or_else(|_| file.clone());
        let target = std::fs::canonicalize(&absolute).ok();
        for path in std::iter::once(absolute).chain(target) {
            // A directory that does not exist yet (where an ACME certificate
            // will be kept) is watched from the first reload after it appears.
            if let (Some(dir), Some(name)) = (path.parent(), path.file_name())
                && dir.is_dir()
            {
                let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
                let entry = set.entry(dir.clone()).or_default();
                entry.push(dir.join(name));
            }
        }
    }
    set
}

/// What a reload would read, as far as the file system says without
/// reading it: each file's resolved path (a swapped symlink changes it),
/// inode, length and modification time; `None` for a missing file.
type Signature = BTreeMap<PathBuf, Option<(PathBuf, u64, u64, Option<std::time::SystemTime>)>>;

fn signature(files: &[PathBuf]) -> Signature {
    files
        .iter()
        .map(|file| {
            let seen = std::fs::canonicalize(file).ok().and_then(|resolved| {
                let meta = std::fs::metadata(&resolved).ok()?;
                #[cfg(unix)]
                let inode = std::os::unix::fs::MetadataExt::ino(&meta);
                #[cfg(not(unix))]
                let inode = 0;
                Some((resolved, inode, meta.len(), meta.modified().ok()))
            });
            (file.clone(), seen)
        })
        .collect()
}

/// Whether a connection was accepted with one of the last descriptors the
/// reserve keeps free. The kernel hands out the lowest free descriptor, so
/// a connection's number is a lower bound of the descriptors open.
fn in_descriptor_reserve(stream: &TcpStream, reserve: Option<u64>) -> bool {
    #[cfg(unix)]
    {
        let Some(limit) = *DESCRIPTOR_LIMIT else {
            return false;
        };
        let reserve = reserve.unwrap_or_else(|| (limit / 16).clamp(16, 1024));
        let fd = u64::try_from(std::os::fd::AsRawFd::as_raw_fd(stream)).unwrap_or(0);
        fd.saturating_add(reserve) >= limit
    }
    #[cfg(not(unix))]
    {
        let _ = (stream, reserve);
        false
    }
}

/// The soft descriptor limit in force when the first gateway started
/// (`weir run` raises it to the hard limit first); `None`: unlimited.
static DESCRIPTOR_LIMIT: std::sync::LazyLock<Option<u64>> = std::sync::LazyLock::new(|| {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
});

async fn accept_loop(name: Arc<str>, socket: TcpListener, snapshot: Arc<ArcSwap<Snapshot>>, stats: Arc<ListenerStats>) {
    let mut accept_errors = AcceptErrors::default();
    let mut reserve_reports = crate::throttle::EverySecond::default();
    loop {
        match socket.accept().await {
            Ok((stream, client)) => {
                let snapshot = snapshot.load_full();
                let Some(listener) = snapshot.listener(&name).cloned() else {
                    continue;
                };
                // Shed at the limits before any work: closing at once costs
                // less than anything else, and those in progress go on.
                let shed = if listener
                    .config
                    .max_connections
                    .is_some_and(|max| stats.active.load(Ordering::Relaxed) >= max as u64)
                {
                    Some("listener")
                } else if snapshot
                    .config
                    .limits
                    .max_connections
                    .is_some_and(|max| ACTIVE.load(Ordering::Relaxed) >= max)
                {
                    Some("global")
                } else if in_descriptor_reserve(&stream, snapshot.config.limits.descriptor_reserve) {
                    Some("descriptors")
                } else {
                    None
                };
                if let Some(limit) = shed {
                    drop(stream);
                    let labels = crate::metrics::ShedLabels {
                        listener: name.to_string().into(),
                        limit,
                    };
                    crate::metrics::METRICS.shed.get_or_create(&labels).inc();
                    tracing::debug!(listener = &*name, %client, limit, "connection shed at its limit");
                    if limit == "descriptors"
                        && let Some(shed) = reserve_reports.event()
                    {
                        tracing::warn!(
                            listener = &*name,
                            shed,
                            "connections shed: weir keeps its last descriptors free (limits.descriptor_reserve)"
                        );
                    }
                    continue;
                }
                // Relayed handshake flights must not wait on Nagle.
                let _ = stream.set_nodelay(true);
                stats.total.fetch_add(1, Ordering::Relaxed);
                stats.active.fetch_add(1, Ordering::Relaxed);
                ACTIVE.fetch_add(1, Ordering::Relaxed);
                let stats = Arc::clone(&stats);
                tokio::spawn(async move {
                    handle(stream, client, listener, snapshot).await;
                    stats.active.fetch_sub(1, Ordering::Relaxed);
                    ACTIVE.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) =>
            {
                // That one connection went away before it was accepted.
                tracing::debug!(listener = &*name, error = %e, "connection gone before accept");
            }
            Err(e) => {
                // Out of file descriptors or memory. The connection stays
                // in the kernel's backlog, to be accepted once descriptors
                // free up: back off instead of spinning on the error.
                crate::metrics::METRICS
                    .accept_errors
                    .get_or_create(&crate::metrics::ListenerLabels {
                        listener: name.to_string().into(),
                    })
                    .inc();
                accept_errors.failed(&name, &e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// How long a listener waits after a failed `accept` before trying again,
/// and a connect out of descriptors before it tries to open a socket again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Reports failed `accept` calls at most once a second, with how many
/// there were: at the descriptor limit every retry fails, and a line per
/// retry would bury the log.
#[derive(Default)]
struct AcceptErrors(crate::throttle::EverySecond);

impl AcceptErrors {
    fn failed(&mut self, listener: &str, error: &io::Error) {
        let Some(failures) = self.0.event() else {
            return;
        };
        let limit = if out_of_descriptors(error) {
            " (out of file descriptors: raise `ulimit -n` or set max_connections below it)"
        } else {
            ""
        };
        tracing::error!(
            listener,
            error = %error,
            failures,
            "accept failed{limit}; new connections wait in the backlog"
        );
    }
}

/// Whether `error` is "too many open files", per process (EMFILE) or
/// system-wide (ENFILE): weir's own shortage, not the peer's fault. (The
/// errno values are the same on Linux and the BSDs.)
fn out_of_descriptors(error: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    matches!(error.raw_os_error(), Some(code) if code == EMFILE || code == ENFILE)
}

/// How a connection ended, for the log line.
enum Outcome {
    Relayed(RelayEnd),
    SniffTimeout,
    ClientGone,
    BadHello(SniffError),
    BadStartup(PostgresError),
    BadProxyHeader(String),
    /// Closed at the listener's per-client limit.
    ClientLimit {
        client: std::net::IpAddr,
        /// The prefix that names one client.
        prefix: u8,
        held: u32,
    },
    Rejected(String),
    /// A TLS-ALPN-01 validation of weir's own ACME order, answered.
    AcmeChallenge,
    HandshakeTimeout,
    HandshakeFailed(io::Error),
    Denied(String),
    ConnectFailed(String),
    Io(io::Error),
}

impl Outcome {
    /// A short label for metrics.
    fn kind(&self) -> &'static str {
        match self {
            Outcome::Relayed(RelayEnd::Closed) => "closed",
            Outcome::Relayed(RelayEnd::Idle) => "idle-timeout",
            Outcome::Relayed(RelayEnd::HalfCloseTimeout) => "half-close-timeout",
            Outcome::SniffTimeout => "sniff-timeout",
            Outcome::ClientGone => "client-closed",
            Outcome::BadHello(_) => "bad-hello",
            Outcome::BadStartup(_) => "bad-startup",
            Outcome::BadProxyHeader(_) => "bad-proxy-header",
            Outcome::ClientLimit { .. } => "client-limit",
            Outcome::Rejected(_) => "rejected",
            Outcome::AcmeChallenge => "acme-challenge",
            Outcome::HandshakeTimeout => "handshake-timeout",
            Outcome::HandshakeFailed(_) => "handshake-failed",
            Outcome::Denied(_) => "denied",
            Outcome::ConnectFailed(_) => "connect-failed",
            Outcome::Io(_) => "io-error",
        }
    }

    /// For a connection refused before routing, why.
    fn sniff_failure(&self) -> Option<&'static str> {
        match self {
            Outcome::SniffTimeout => Some("timeout"),
            Outcome::ClientGone => Some("client-closed"),
            Outcome::BadHello(_) => Some("bad-hello"),
            Outcome::BadStartup(_) => Some("bad-startup"),
            Outcome::BadProxyHeader(_) => Some("bad-proxy-header"),
            _ => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Relayed(RelayEnd::Closed) => f.write_str("closed"),
            Outcome::Relayed(RelayEnd::Idle) => f.write_str("idle-timeout"),
            Outcome::Relayed(RelayEnd::HalfCloseTimeout) => f.write_str("half-close-timeout"),
            Outcome::SniffTimeout => f.write_str("sniff-timeout: no complete ClientHello before the deadline"),
            Outcome::ClientGone => f.write_str("client-closed: before its first bytes were complete"),
            Outcome::BadProxyHeader(reason) => write!(f, "bad-proxy-header: {reason}"),
            Outcome::ClientLimit { client, prefix, held } => {
                let full = if client.is_ipv4() { 32 } else { 128 };
                let network = if *prefix < full {
                    format!("/{prefix}")
                } else {
                    String::new()
                };
                write!(
                    f,
                    "client-limit: {client}{network} already has {held} connections here (max_connections_per_client)"
                )
            }
            Outcome::BadHello(e) => write!(f, "bad-hello: {e}"),
            Outcome::BadStartup(e) => write!(f, "bad-startup: {e}"),
            // Plugin-supplied text: escaped so it cannot forge log lines.
            Outcome::Rejected(reason) => write!(f, "rejected: {reason:?}"),
            Outcome::AcmeChallenge => f.write_str("acme-challenge: a TLS-ALPN-01 validation, answered"),
            Outcome::HandshakeTimeout => f.write_str("handshake-timeout: the client's TLS handshake took too long"),
            Outcome::HandshakeFailed(e) => write!(f, "handshake-failed: {}", handshake_error(e)),
            Outcome::Denied(reason) => write!(f, "denied: {reason:?}"),
            Outcome::ConnectFailed(reason) => write!(f, "connect-failed: {reason}"),
            Outcome::Io(e) => write!(f, "io-error: {e}"),
        }
    }
}

/// Everything the per-connection log line reports.
struct Record {
    id: u64,
    started: Instant,
    client: SocketAddr,
    sni: Option<String>,
    tenant: Option<Arc<str>>,
    route: Option<String>,
    mode: Option<&'static str>,
    upstream: Option<String>,
    /// The pool server in use, counted active until the record is dropped.
    backend: Option<BackendGuard>,
    /// The connection's place in its tenant's `max_connections`, held
    /// until the record is dropped.
    tenant_slot: Option<TenantSlot>,
    /// Its place in the listener's `max_connections_per_client`, likewise.
    client_slot: Option<ClientSlot>,
    transfer: Transfer,
}

/// Serves one connection to its end and records it. The routing state
/// (`listener`, `snapshot`: compiled plugins, TLS material, pools) is let go
/// before the relay starts, so a connection relayed for days holds only its
/// streams and counters, however many reloads happen meanwhile.
async fn handle(client: TcpStream, client_addr: SocketAddr, listener: Arc<Listener>, snapshot: Arc<Snapshot>) {
    let mut record = Record {
        id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
        started: Instant::now(),
        client: client_addr,
        sni: None,
        tenant: None,
        route: None,
        mode: None,
        upstream: None,
        backend: None,
        tenant_slot: None,
        client_slot: None,
        transfer: Transfer::default(),
    };
    let metrics = &crate::metrics::METRICS;
    let listener_labels = crate::metrics::ListenerLabels {
        listener: (*listener.name).into(),
    };
    let active = metrics.active.get_or_create(&listener_labels).clone();
    active.inc();
    let proxied = proxy(client, &listener, &snapshot, &mut record).await;
    let (name, mode, timeouts) = (
        Arc::clone(&listener.name),
        listener.config.relay,
        relay_timeouts(&listener.config),
    );
    drop((listener, snapshot));
    let ended = match proxied {
        Proxied::Ended(outcome) => Err(outcome),
        Proxied::Relay(client, upstream) => Ok(relay(client, upstream, mode, timeouts, &record.transfer).await),
        // Boxed: the TLS relay's state does not size every connection's task.
        Proxied::Terminated(streams) => Ok(Box::pin(streams.relay(timeouts, &record.transfer)).await),
    };
    let outcome = match ended {
        Err(outcome) => outcome,
        Ok(Ok(end)) => Outcome::Relayed(end),
        Ok(Err(e)) => Outcome::Io(e),
    };
    active.dec();
    let transfer = &record.transfer;
    let bytes_up = transfer.client_to_upstream.load(Ordering::Relaxed);
    let bytes_down = transfer.upstream_to_client.load(Ordering::Relaxed);
    if let Some(guard) = &record.backend {
        guard.backend().bytes_up.fetch_add(bytes_up, Ordering::Relaxed);
        guard.backend().bytes_down.fetch_add(bytes_down, Ordering::Relaxed);
    }
    for (direction, bytes) in [("up", bytes_up), ("down", bytes_down)] {
        let labels = crate::metrics::BytesLabels {
            listener: listener_labels.listener.clone(),
            direction,
        };
        metrics.bytes.get_or_create(&labels).inc_by(bytes);
    }
    if let Some(reason) = outcome.sniff_failure() {
        let labels = crate::metrics::SniffLabels {
            listener: listener_labels.listener.clone(),
            reason,
        };
        metrics.sniff_failures.get_or_create(&labels).inc();
    }
    let labels = crate::metrics::ConnectionLabels {
        tenant: record.tenant.as_deref().unwrap_or("-").into(),
        listener: listener_labels.listener,
        route: metrics.route_label(record.tenant.as_deref(), &name, record.route.as_deref().unwrap_or("-")),
        outcome: outcome.kind().into(),
    };
    metrics.connections.get_or_create(&labels).inc();
    let spliced = transfer.spliced.load(Ordering::Relaxed);
    let ms = u64::try_from(record.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let sni = record.sni.as_deref().unwrap_or("-");
    let route = record.route.as_deref().unwrap_or("-");
    let tenant = record.tenant.as_deref().unwrap_or("-");
    let mode = record.mode.unwrap_or("-");
    let upstream = record.upstream.as_deref().unwrap_or("-");
    let listener = &*name;
    let (id, client) = (record.id, record.client);
    tracing::info!(id, listener, %client, sni, tenant, route, mode, upstream, bytes_up, bytes_down, spliced, ms, %outcome, "connection");
}

/// What the client sent before routing, and how.
struct Front {
    client: TcpStream,
    local_addr: SocketAddr,
    /// Every byte read that the upstream (or rustls) has yet to see.
    sniffed: Vec<u8>,
    protocol: wit::Protocol,
    hello: ClientHello,
}

impl Front {
    /// Whether the client is speaking TLS, so refusals can be TLS alerts.
    fn speaks_tls(&self) -> bool {
        self.protocol != wit::Protocol::Plain
    }

    /// The client's socket alone: the hello and the replay buffer are not
    /// needed during the relay.
    fn into_client(self) -> TcpStream {
        self.client
    }

    /// Tells a client that is about to be closed why, in its own protocol:
    /// a TLS alert, or a PostgreSQL ErrorResponse to a client without TLS.
    async fn refuse(&mut self, listener: &Listener, alert: u8, reason: &str) {
        if self.speaks_tls() {
            send_alert(&mut self.client, alert).await;
        } else if listener.config.protocol == ListenerProtocol::Postgres {
            let message = postgres::error_response(&format!("weir: {reason}"));
            let _ = tokio::time::timeout(Duration::from_millis(100), self.client.write_all(&message)).await;
        }
    }
}

/// Completes a TLS-ALPN-01 validation handshake with the challenge
/// certificate and `acme-tls/1`, then closes (RFC 8737: nothing else is
/// said on such a connection).
async fn answer_acme_challenge(
    front: Front,
    challenge: Arc<rustls::sign::CertifiedKey>,
    config: &ListenerConfig,
) -> Outcome {
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|builder| {
            builder
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(challenge)))
        });
    let mut server = match server {
        Ok(server) => server,
        Err(e) => return Outcome::Io(io::Error::other(e)),
    };
    server.alpn_protocols = vec![crate::acme::ACME_TLS_ALPN.as_bytes().to_vec()];
    let client = Rewind::new(front.sniffed, front.client);
    let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(client);
    match tokio::time::timeout(config.handshake_timeout, accept).await {
        Err(_) => Outcome::HandshakeTimeout,
        Ok(Err(e)) => Outcome::HandshakeFailed(e),
        Ok(Ok(mut tls)) => {
            close_tls(&mut tls).await;
            Outcome::AcmeChallenge
        }
    }
}

/// Where [`proxy`] leaves a connection.
enum Proxied {
    Ended(Outcome),
    /// A passthrough connection, introduced to its upstream, to be relayed.
    /// The relay runs in [`handle`] rather than here so that a connection
    /// relayed for hours keeps nothing of the routing in its task.
    Relay(TcpStream, TcpStream),
    /// A terminated connection, handshakes done, to be relayed likewise.
    Terminated(Box<Terminated>),
}

/// The two sides of a terminated connection, ready to relay. (Carried
/// boxed, in [`Proxied::Terminated`], so its variants' sizes matter little.)
#[allow(clippy::large_enum_variant)]
enum Terminated {
    Plain(tokio_rustls::server::TlsStream<Rewind<TcpStream>>, TcpStream),
    Reencrypted(
        tokio_rustls::server::TlsStream<Rewind<TcpStream>>,
        tokio_rustls::client::TlsStream<TcpStream>,
    ),
}

impl Terminated {
    async fn relay(self, timeouts: Timeouts, transfer: &Transfer) -> std::io::Result<RelayEnd> {
        match self {
            Terminated::Plain(client, upstream) => relay_streams(client, upstream, timeouts, transfer).await,
            Terminated::Reencrypted(client, upstream) => relay_streams(client, upstream, timeouts, transfer).await,
        }
    }
}

/// Takes a connection from sniffing through routing to its end, or, for a
/// passthrough, to the point where [`handle`] relays it. Returning
/// `Ended` drops (closes) the client socket.
async fn proxy(client: TcpStream, listener: &Arc<Listener>, snapshot: &Snapshot, record: &mut Record) -> Proxied {
    // Boxed, like `terminate` below: freed before the relay starts.
    let mut front = match Box::pin(read_front(client, listener, record)).await {
        Ok(front) => front,
        Err(outcome) => return Proxied::Ended(outcome),
    };
    record.sni.clone_from(&front.hello.sni);
    // A CA validating one of weir's own ACME orders: answered here, never
    // routed. Any other `acme-tls/1` connection (an upstream's own order,
    // behind passthrough) is routed like the rest.
    if front.protocol == wit::Protocol::Tls
        && let [protocol] = front.hello.alpn.as_slice()
        && protocol == crate::acme::ACME_TLS_ALPN
        && let Some(challenge) = front
            .hello
            .sni
            .as_deref()
            .and_then(|sni| snapshot.acme_challenges().get(sni))
    {
        record.mode = Some("acme-challenge");
        return Proxied::Ended(Box::pin(answer_acme_challenge(front, challenge, &listener.config)).await);
    }
    let conn = wit::Connection {
        id: record.id,
        listener: listener.name.to_string(),
        tenant: None,
        client_addr: record.client.to_string(),
        local_addr: front.local_addr.to_string(),
        protocol: front.protocol,
        sni: front.hello.sni.clone(),
        alpn: std::mem::take(&mut front.hello.alpn),
        tls_versions: std::mem::take(&mut front.hello.versions),
    };
    let mut conn = conn;
    let tenant = snapshot.tenant_for(conn.sni.as_deref()).cloned();
    record.tenant_slot = match &tenant {
        None => None,
        Some(tenant) => {
            conn.tenant = Some(tenant.name.to_string());
            record.tenant = Some(Arc::clone(&tenant.name));
            match tenant.admit_connection() {
                Ok(slot) => Some(slot),
                Err(reason) => {
                    crate::metrics::METRICS
                        .tenant_limited
                        .get_or_create(&crate::metrics::TenantLabels {
                            tenant: tenant.name.to_string().into(),
                        })
                        .inc();
                    record.route = Some("tenant-limit".into());
                    front.refuse(listener, ALERT_INTERNAL_ERROR, &reason).await;
                    return Proxied::Ended(Outcome::Rejected(reason));
                }
            }
        }
    };
    // Boxed like the sniffing: an asynchronous plugin call's state (the
    // wasm call's future) would otherwise size every connection's task, for
    // the connection's whole life.
    let routing = Box::pin(snapshot.route(listener, tenant.as_deref(), &conn)).await;
    let refusal_alert = match (routing.plugin.is_some(), routing.failed()) {
        (_, true) => ALERT_INTERNAL_ERROR,
        (true, false) => ALERT_ACCESS_DENIED,
        (false, false) => ALERT_UNRECOGNIZED_NAME,
    };
    let Decision { route, action } = routing.decision;
    record.route = Some(route);
    match action {
        Action::Reject(reason) => {
            front.refuse(listener, refusal_alert, &reason).await;
            Proxied::Ended(Outcome::Rejected(reason))
        }
        Action::Passthrough(target) => {
            record.mode = Some("passthrough");
            passthrough(front, &target, listener, snapshot, record).await
        }
        // Boxed, so that the task's own allocation is sized for the
        // passthrough relay, not for a TLS handshake.
        Action::Terminate(termination) => match Box::pin(terminate(
            front,
            conn,
            &termination,
            listener,
            tenant.as_deref(),
            snapshot,
            record,
        ))
        .await
        {
            Ok(streams) => Proxied::Terminated(Box::new(streams)),
            Err(outcome) => Proxied::Ended(outcome),
        },
    }
}

/// Reads the PROXY header (from trusted sources) and the client's first
/// bytes, all under the listener's sniff deadline.
async fn read_front(mut client: TcpStream, listener: &Listener, record: &mut Record) -> Result<Front, Outcome> {
    let config = &listener.config;
    let mut local_addr = match client.local_addr() {
        Ok(addr) => addr,
        Err(e) => return Err(Outcome::Io(e)),
    };
    // One deadline for everything before routing: PROXY header and hello.
    let deadline = tokio::time::Instant::now() + config.sniff_timeout;
    let peer = record.client.ip().to_canonical();
    let trusted = config.accept_proxy_protocol_from.iter().any(|net| net.contains(&peer));
    let mut preread = Vec::new();
    if trusted {
        let (received, rest) = match tokio::time::timeout_at(deadline, read_proxy_header(&mut client)).await {
            Err(_) => return Err(Outcome::SniffTimeout),
            Ok(Err(failure)) => return Err(failure.into()),
            Ok(Ok(header)) => header,
        };
        if let Some((source, destination)) = received.addresses {
            record.client = source;
            local_addr = destination;
        }
        preread = rest;
    }
    // Counted once the client's address is known (behind a load balancer,
    // from its PROXY header), before any of its bytes are read.
    {
        let max = config.max_connections_per_client;
        let client = crate::snapshot::client_of(record.client.ip(), config.client_prefix_v4, config.client_prefix_v6);
        let prefix = if client.is_ipv4() {
            config.client_prefix_v4
        } else {
            config.client_prefix_v6
        };
        match listener.clients.admit(client, max) {
            Ok(slot) => record.client_slot = Some(slot),
            Err(held) => {
                let labels = crate::metrics::ShedLabels {
                    listener: listener.name.to_string().into(),
                    limit: "client",
                };
                crate::metrics::METRICS.shed.get_or_create(&labels).inc();
                return Err(Outcome::ClientLimit { client, prefix, held });
            }
        }
    }
    let read = match config.protocol {
        ListenerProtocol::Plain => Ok((preread, wit::Protocol::Plain, None)),
        ListenerProtocol::Tls => tokio::time::timeout_at(deadline, read_client_hello(&mut client, preread))
            .await
            .map_err(|_| Outcome::SniffTimeout)?
            .map(|(bytes, hello)| (bytes, wit::Protocol::Tls, Some(hello))),
        ListenerProtocol::Postgres => tokio::time::timeout_at(deadline, read_postgres(&mut client, preread))
            .await
            .map_err(|_| Outcome::SniffTimeout)?,
    };
    let (sniffed, protocol, hello) = match read {
        Ok(read) => read,
        Err(SniffFailure::Bad(SniffError::NotTls(first))) if proxy_protocol::looks_like_header(&first) => {
            return Err(Outcome::BadProxyHeader(format!(
                "a PROXY header from {peer}, which accept_proxy_protocol_from does not trust"
            )));
        }
        Err(failure) => return Err(failure.into()),
    };
    let hello = hello.unwrap_or(ClientHello {
        sni: None,
        alpn: Vec::new(),
        versions: Vec::new(),
    });
    Ok(Front {
        client,
        local_addr,
        sniffed,
        protocol,
        hello,
    })
}

/// Passthrough: connect, introduce the client (PROXY header; for PostgreSQL
/// TLS, weir's own SSLRequest, which must be answered `S`), replay the sniffed
/// bytes; the caller relays.
async fn passthrough(
    mut front: Front,
    target: &Target,
    listener: &Listener,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Proxied {
    let ssl_request = front.protocol == wit::Protocol::PostgresTls;
    // Boxed for the same reason as the sniffing: the connect attempts'
    // state would otherwise set the size of every connection's task.
    let connecting = open_upstream(target, ssl_request, front.local_addr, None, listener, snapshot, record);
    let mut upstream = match Box::pin(connecting).await {
        Ok(upstream) => upstream,
        Err(outcome) => {
            front
                .refuse(listener, ALERT_INTERNAL_ERROR, "no upstream is reachable")
                .await;
            return Proxied::Ended(outcome);
        }
    };
    if let Err(e) = upstream.write_all(&front.sniffed).await {
        return Proxied::Ended(Outcome::Io(e));
    }
    record
        .transfer
        .client_to_upstream
        .fetch_add(front.sniffed.len() as u64, Ordering::Relaxed);
    Proxied::Relay(front.into_client(), upstream)
}

/// Connects to the target and sends what precedes the client's own bytes:
/// the PROXY header (version 2 also says what `tls`, a terminated
/// connection's handshake with the client, was), and with `ssl_request` (a PostgreSQL upstream that is to speak TLS)
/// an SSLRequest whose answer must be exactly `S`; all within the connect
/// deadline.
async fn open_upstream(
    target: &Target,
    ssl_request: bool,
    local_addr: SocketAddr,
    tls: Option<&rustls::ServerConnection>,
    listener: &Listener,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Result<TcpStream, Outcome> {
    let config = &listener.config;
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let (mut upstream, upstream_addr, backend) = connect(target, snapshot, deadline)
        .await
        .map_err(Outcome::ConnectFailed)?;
    record.upstream = Some(upstream_addr.to_string());
    record.backend = backend;
    let pool_proxy = match &target.upstream {
        Upstream::Pool(name) | Upstream::PoolOnPort(name, _) => {
            snapshot.pool(name).and_then(|p| p.config.proxy_protocol)
        }
        Upstream::Address(_) => None,
    };
    let mut first = match target.proxy_protocol.or(pool_proxy) {
        Some(version) => {
            let facts = tls.filter(|_| version == 2).map(crate::tls::facts);
            match proxy_protocol::encode(
                version,
                record.client,
                local_addr,
                record.sni.as_deref(),
                facts.as_ref(),
            ) {
                Ok(header) => header,
                Err(e) => return Err(Outcome::Io(e)),
            }
        }
        None => Vec::new(),
    };
    if ssl_request {
        first.extend_from_slice(&postgres::SSL_REQUEST);
        let answer = async {
            upstream.write_all(&first).await?;
            let mut answer = [0u8; 64];
            let n = upstream.read(&mut answer).await?;
            Ok::<_, io::Error>(answer[..n].to_vec())
        };
        let checked = match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => Err("no answer to the SSLRequest before the connect deadline".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(answer)) => postgres::check_answer(&answer),
        };
        if let Err(reason) = checked {
            return Err(Outcome::ConnectFailed(format!("{upstream_addr}: {reason}")));
        }
    } else if let Err(e) = upstream.write_all(&first).await {
        return Err(Outcome::Io(e));
    }
    Ok(upstream)
}

/// Termination: TLS handshake with the client (client authentication and
/// `admit` inside it), then plain or re-encrypted to the target.
async fn terminate(
    mut front: Front,
    conn: wit::Connection,
    termination: &Termination,
    listener: &Arc<Listener>,
    tenant: Option<&Tenant>,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Result<Terminated, Outcome> {
    let chain = tenant.map_or(listener.chain(), Tenant::chain);
    let reencrypting = matches!(termination.then, After::Reencrypt(..));
    record.mode = Some(if reencrypting { "reencrypt" } else { "terminate" });
    if !front.speaks_tls() {
        let reason = "the decision terminates TLS, but this client did not start TLS";
        front.refuse(listener, ALERT_INTERNAL_ERROR, reason).await;
        return Err(Outcome::Rejected(reason.into()));
    }
    let admission = match termination.client_auth {
        ClientAuth::None => None,
        _ => Some(Arc::new(Admission::new(chain, conn.clone()))),
    };
    let sni = conn.sni.as_deref();
    let server_config = match snapshot.tls().server_config(
        &listener.name,
        &listener.tls,
        termination,
        sni,
        tenant.map(|t| (&t.name, t.certificates())),
        admission.clone(),
    ) {
        Ok(config) => config,
        Err(e) => {
            let alert = match e {
                TerminateError::NoCertificate(_) => ALERT_UNRECOGNIZED_NAME,
                TerminateError::Config(_) => ALERT_INTERNAL_ERROR,
            };
            front.refuse(listener, alert, &e.to_string()).await;
            return Err(Outcome::Rejected(e.to_string()));
        }
    };
    let config = &listener.config;
    let client = Rewind::new(std::mem::take(&mut front.sniffed), front.client);
    let accept = tokio_rustls::TlsAcceptor::from(server_config)
        .accept(client)
        .into_fallible();
    let mut tls = match tokio::time::timeout(config.handshake_timeout, accept).await {
        Err(_) => return Err(Outcome::HandshakeTimeout),
        Ok(Err((e, client))) => {
            // rustls has queued its alert; let it reach the client.
            linger_close(client).await;
            return Err(match admission.and_then(|a| a.outcome()) {
                Some(Err(reason)) => Outcome::Denied(reason),
                _ => Outcome::HandshakeFailed(e),
            });
        }
        Ok(Ok(tls)) => tls,
    };
    // A resumed session skips certificate verification, and with it the
    // `admit` inside the handshake: ask the plugins now.
    if let Some(admission) = &admission
        && admission.outcome().is_none()
        && let Some(cert) = tls.get_ref().1.peer_certificates().and_then(<[_]>::first)
    {
        let attestation =
            (termination.client_auth == ClientAuth::Attested).then(|| snapshot.tls().attestation().examine(cert));
        if let Err(reason) = admission.check(wit::Side::Client, describe(cert, attestation)) {
            close_tls(&mut tls).await;
            return Err(Outcome::Denied(reason));
        }
    }
    // The connection's server config (which rustls keeps) need not keep
    // the plugins alive once they have spoken.
    if let Some(admission) = &admission {
        admission.release();
    }
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let target = termination.then.target();
    let ssl_request = reencrypting && front.protocol == wit::Protocol::PostgresTls;
    let opening = open_upstream(
        target,
        ssl_request,
        front.local_addr,
        Some(tls.get_ref().1),
        listener,
        snapshot,
        record,
    );
    let upstream = match opening.await {
        Ok(upstream) => upstream,
        Err(outcome) => {
            close_tls(&mut tls).await;
            return Err(outcome);
        }
    };
    match &termination.then {
        After::Plain(_) => Ok(Terminated::Plain(tls, upstream)),
        After::Reencrypt(_, upstream_tls) => {
            match reencrypt(
                upstream,
                upstream_tls,
                &conn,
                alpn.as_deref(),
                listener,
                chain,
                snapshot,
            )
            .await
            {
                Ok(upstream) => Ok(Terminated::Reencrypted(tls, upstream)),
                Err(outcome) => {
                    close_tls(&mut tls).await;
                    Err(outcome)
                }
            }
        }
    }
}

/// The TLS handshake with an upstream, then the plugins' `admit` on its
/// certificate.
async fn reencrypt(
    upstream: TcpStream,
    upstream_tls: &UpstreamTls,
    conn: &wit::Connection,
    alpn: Option<&[u8]>,
    listener: &Listener,
    chain: &[Arc<crate::plugin::Plugin>],
    snapshot: &Snapshot,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Outcome> {
    let peer_ip = upstream.peer_addr().map(|a| a.ip());
    let name = match (&upstream_tls.server_name, &conn.sni, peer_ip) {
        (Some(name), _, _) | (None, Some(name), _) => ServerName::try_from(name.clone()),
        (None, None, Ok(ip)) => Ok(ServerName::IpAddress(ip.into())),
        (None, None, Err(e)) => return Err(Outcome::Io(e)),
    };
    let name = name.map_err(|e| Outcome::ConnectFailed(format!("upstream server name: {e}")))?;
    let client_config = snapshot
        .tls()
        .client_config(upstream_tls, alpn)
        .map_err(|reason| Outcome::ConnectFailed(format!("upstream TLS: {reason}")))?;
    let connect = tokio_rustls::TlsConnector::from(client_config).connect(name, upstream);
    let tls = match tokio::time::timeout(listener.config.handshake_timeout, connect).await {
        Err(_) => return Err(Outcome::ConnectFailed("upstream TLS handshake timed out".into())),
        Ok(Err(e)) => {
            return Err(Outcome::ConnectFailed(format!(
                "upstream TLS handshake: {}",
                handshake_error(&e)
            )));
        }
        Ok(Ok(tls)) => tls,
    };
    let Some(cert) = tls.get_ref().1.peer_certificates().and_then(<[_]>::first) else {
        return Err(Outcome::ConnectFailed("the upstream presented no certificate".into()));
    };
    let attestation = upstream_tls
        .attested
        .then(|| snapshot.tls().attestation().examine(cert));
    let admitted = match describe(cert, attestation) {
        Ok(peer) => crate::snapshot::admit(chain, conn, wit::Side::Upstream, &peer).await,
        Err(reason) => Err(reason),
    };
    match admitted {
        Ok(()) => Ok(tls),
        Err(reason) => Err(Outcome::Denied(format!("upstream: {reason}"))),
    }
}

/// A failed handshake in words: rustls shows a certificate refusal that
/// carries weir's own reason (a failed RA-TLS key binding, a chain over
/// its bounds) as Rust debug output; this says the reason itself.
fn handshake_error(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error, OtherError};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Other(OtherError(reason)))) => {
            format!("invalid peer certificate: {reason}")
        }
        _ => e.to_string(),
    }
}

/// TLS alert descriptions (RFC 8446, 6) sent when a TLS client is refused,
/// so that it reports why instead of a bare connection reset.
const ALERT_ACCESS_DENIED: u8 = 49;
const ALERT_INTERNAL_ERROR: u8 = 80;
const ALERT_UNRECOGNIZED_NAME: u8 = 112;

/// Sends a fatal alert record in the clear (the handshake has not begun), best
/// effort and briefly: the connection is closed either way.
async fn send_alert(client: &mut TcpStream, description: u8) {
    let record = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description];
    let _ = tokio::time::timeout(Duration::from_millis(100), client.write_all(&record)).await;
}

/// A listener's timeouts for a relayed connection.
fn relay_timeouts(config: &ListenerConfig) -> Timeouts {
    Timeouts {
        idle: config.idle_timeout,
        half_close: config.half_close_timeout,
    }
}

/// Sends close_notify and FIN to a TLS client that will not be served,
/// briefly: a client that does not read cannot hold the task.
async fn close_tls<S: AsyncWriteExt + Unpin>(tls: &mut S) {
    let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
}

/// Closes gracefully: FIN after whatever was written, then a short wait for
/// the client's own close. Closing with unread bytes would send a reset,
/// which can destroy the alert the client has yet to read.
async fn linger_close<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut stream: S) {
    let drain = async {
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 1024];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

/// Why reading the first bytes (PROXY header, hello) ended without them.
enum SniffFailure {
    /// The client closed before they were complete.
    Gone,
    /// The bytes are not a hello weir accepts.
    Bad(SniffError),
    /// The bytes are not a PostgreSQL start weir accepts.
    Postgres(PostgresError),
    /// The bytes are not a PROXY header weir accepts.
    BadProxy(String),
    /// The socket failed.
    Io(io::Error),
}

impl From<SniffFailure> for Outcome {
    fn from(failure: SniffFailure) -> Outcome {
        match failure {
            SniffFailure::Gone => Outcome::ClientGone,
            SniffFailure::Bad(e) => Outcome::BadHello(e),
            SniffFailure::Postgres(e) => Outcome::BadStartup(e),
            SniffFailure::BadProxy(reason) => Outcome::BadProxyHeader(reason),
            SniffFailure::Io(e) => Outcome::Io(e),
        }
    }
}

/// Reads a PROXY header from a trusted load balancer; returns it and the
/// bytes that followed it (the client's own stream, to be sniffed and
/// replayed).
async fn read_proxy_header(client: &mut TcpStream) -> Result<(proxy_protocol::Received, Vec<u8>), SniffFailure> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = client.read(&mut chunk).await.map_err(SniffFailure::Io)?;
        if n == 0 {
            return Err(SniffFailure::Gone);
        }
        buf.extend_from_slice(&chunk[..n]);
        match proxy_protocol::decode(&buf) {
            Ok(Some(received)) => {
                let rest = buf.split_off(received.len);
                return Ok((received, rest));
            }
            Ok(None) => {}
            Err(reason) => return Err(SniffFailure::BadProxy(reason)),
        }
    }
}

/// Reads until the ClientHello is complete and returns every byte read, to
/// be replayed unchanged. The parser says how many bytes it needs, so a hello
/// trickling in one byte per segment is not re-parsed for every byte.
async fn read_client_hello(client: &mut TcpStream, already: Vec<u8>) -> Result<(Vec<u8>, ClientHello), SniffFailure> {
    let mut buf = already;
    buf.reserve(1024);
    let mut chunk = [0u8; 2048];
    let mut needed = 1;
    loop {
        while buf.len() < needed {
            if buf.len() >= sniff::MAX_SNIFF_BYTES {
                return Err(SniffFailure::Bad(SniffError::TooLarge(buf.len())));
            }
            let room = (sniff::MAX_SNIFF_BYTES - buf.len()).min(chunk.len());
            let n = client.read(&mut chunk[..room]).await.map_err(SniffFailure::Io)?;
            if n == 0 {
                return Err(SniffFailure::Gone);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        match sniff::parse_client_hello(&buf) {
            Ok(Sniffed::Hello(hello)) => return Ok((buf, hello)),
            Ok(Sniffed::Incomplete(more)) => needed = more,
            Err(e) => return Err(SniffFailure::Bad(e)),
        }
    }
}

/// Reads a PostgreSQL client's start: an SSLRequest is answered `S` (only
/// when nothing followed it) and the ClientHello after it read; a
/// GSSENCRequest is answered `N` and the next message read; a ClientHello
/// first is direct TLS; a StartupMessage or CancelRequest is plain.
async fn read_postgres(
    client: &mut TcpStream,
    already: Vec<u8>,
) -> Result<(Vec<u8>, wit::Protocol, Option<ClientHello>), SniffFailure> {
    let mut buf = already;
    let mut chunk = [0u8; 512];
    loop {
        match postgres::classify(&buf).map_err(SniffFailure::Postgres)? {
            First::Incomplete(_) => {
                let n = client.read(&mut chunk).await.map_err(SniffFailure::Io)?;
                if n == 0 {
                    return Err(SniffFailure::Gone);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            First::Tls => {
                let (bytes, hello) = read_client_hello(client, buf).await?;
                return Ok((bytes, wit::Protocol::Tls, Some(hello)));
            }
            First::SslRequest { trailing: 0 } => {
                client.write_all(b"S").await.map_err(SniffFailure::Io)?;
                let (bytes, hello) = read_client_hello(client, Vec::new()).await?;
                return Ok((bytes, wit::Protocol::PostgresTls, Some(hello)));
            }
            First::SslRequest { trailing } => {
                return Err(SniffFailure::Postgres(PostgresError::BytesAfterSslRequest(trailing)));
            }
            First::GssEncRequest { trailing: 0 } => {
                client.write_all(b"N").await.map_err(SniffFailure::Io)?;
                buf.clear();
            }
            First::GssEncRequest { trailing } => {
                return Err(SniffFailure::Postgres(PostgresError::BytesAfterGssEncRequest(trailing)));
            }
            First::Plain => return Ok((buf, wit::Protocol::Plain, None)),
        }
    }
}

/// Connects to a server named by a DNS name: each address it resolves to
/// in turn, skipping weir's own (a name may point at weir itself as well).
async fn connect_by_name(server: &HostPort) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(server.to_string()).await? {
        if let Err(reason) = crate::own::check(addr) {
            last = Some(std::io::Error::other(reason));
            continue;
        }
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the name resolves to no address")))
}

/// Connects to the target: the one address, or the pool's servers in the
/// order the pool gives (its policy's choice first, available servers
/// before the others, at most `max_attempts`), all within one connect
/// deadline. Failed connects count towards passive ejection; a socket
/// that cannot be opened because weir is out of descriptors does not.
async fn connect(
    target: &Target,
    snapshot: &Snapshot,
    deadline: tokio::time::Instant,
) -> Result<(TcpStream, HostPort, Option<BackendGuard>), String> {
    let (pool, port) = match &target.upstream {
        Upstream::Address(_) => (None, None),
        Upstream::Pool(name) => (Some(name), None),
        Upstream::PoolOnPort(name, port) => (Some(name), Some(*port)),
    };
    let (candidates, passive) = match (&target.upstream, pool) {
        (Upstream::Address(addr), _) => (vec![(addr.clone(), None)], None),
        (_, Some(name)) => match snapshot.pool(name) {
            Some(pool) => (
                pool.candidates()
                    .into_iter()
                    .map(|b| {
                        let mut addr = b.addr.clone();
                        if let Some(port) = port {
                            addr.port = port;
                        }
                        (addr, Some(b))
                    })
                    .collect(),
                // A port the decision chose (`pool:port`, often the client's
                // choice) that nothing serves says nothing of the server:
                // such failures eject no one.
                port.is_none().then(|| pool.config.passive.clone()),
            ),
            None => return Err(format!("pool `{name}` vanished")),
        },
        (_, None) => return Err("no upstream".into()),
    };
    let mut failures = Vec::new();
    for (server, backend) in candidates {
        // Never weir itself: a loop, or the admin API for anyone.
        if let Some(addr) = server.socket_addr()
            && let Err(reason) = crate::own::check(addr)
        {
            failures.push(reason);
            continue;
        }
        // Out of descriptors, no socket can be opened: that is weir's
        // shortage, not the server's. Wait for one to free up (as accept
        // does) within the same deadline, and blame no one.
        let mut short_of_descriptors = None;
        let attempt = async {
            loop {
                let result = match server.socket_addr() {
                    Some(addr) => TcpStream::connect(addr).await,
                    None => connect_by_name(&server).await,
                };
                match result {
                    Err(e) if out_of_descriptors(&e) => {
                        short_of_descriptors = Some(e);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    other => return other,
                }
            }
        };
        let outcome = tokio::time::timeout_at(deadline, attempt).await;
        if let (Err(_), Some(e)) = (&outcome, short_of_descriptors) {
            failures.push(format!(
                "{server}: no socket before the connect deadline, weir is out of file descriptors ({e})"
            ));
            break;
        }
        match outcome {
            Ok(Ok(stream)) => {
                // Latency matters more than segment count for proxied protocols.
                let _ = stream.set_nodelay(true);
                let guard = backend.map(|backend| {
                    backend.connected();
                    BackendGuard::new(backend)
                });
                return Ok((stream, server, guard));
            }
            Ok(Err(e)) => {
                if let (Some(backend), Some(passive)) = (&backend, &passive) {
                    backend.failed(passive);
                }
                failures.push(format!("{server}: {e}"));
            }
            Err(_) => {
                if let (Some(backend), Some(passive)) = (&backend, &passive) {
                    backend.failed(passive);
                }
                failures.push(format!("{server}: no answer before the connect deadline"));
                break;
            }
        }
    }
    Err(failures.join("; "))
}
