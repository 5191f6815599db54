//! Runs plugins: one shared wasmtime [`Engine`], one compiled and
//! pre-linked component per plugin, and a small stock of configured
//! instances per plugin that connections borrow one call at a time.
//!
//! Every call runs under an epoch deadline and a memory cap. A trap, a
//! timeout or a refused memory grow discards the instance that failed (its
//! state may be broken); a replacement is configured in the background,
//! under `configure_timeout`. The host never dies of a plugin.
//!
//! Calls are asynchronous: a call yields to the tokio scheduler at every
//! epoch tick (1 ms of running), so a plugin that runs to its deadline
//! holds no worker thread while other connections wait. What a plugin may
//! spend is bounded twice: per plugin, calls in flight
//! ([`crate::config::MAX_PLUGIN_CALLS`]); per tenant, a [`Budget`] of CPU a second and
//! calls at once. A call over either is refused without running, and the
//! connection gets the plugin's `on_error`.
//!
//! Plugins get the host's `log` import, clocks, random numbers and an empty
//! environment. Every other import (files, sockets, stdio) is linked to a
//! trap: a plugin that reaches for the outside world fails its call.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::config::{OnError, PluginConfig};
use crate::throttle::{Bucket, EverySecond};
use crate::wit;

/// How often the engine's epoch advances: the resolution of plugin deadlines,
/// and the longest a running call holds its worker thread before it yields.
/// A quarter of a millisecond keeps other connections' wait behind a
/// looping plugin short (with 1 ms slices, a bystander tenant's p99 was 8x
/// its quiet p99 in `bench/run.sh isolation`; with these, about 2x).
const EPOCH_TICK: Duration = Duration::from_micros(250);
/// Most idle instances kept per plugin. A call that finishes within a tick
/// never yields, so more than one per worker is rarely in use.
const MAX_IDLE_INSTANCES: usize = 16;
use crate::config::MAX_PLUGIN_CALLS as MAX_CALLS_IN_FLIGHT;
/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_LINE: usize = 4096;
/// Bytes of log a plugin may write a second (over all its instances), and
/// at once; lines beyond are dropped and counted.
const LOG_BYTES_PER_SECOND: f64 = 32.0 * 1024.0;
const LOG_BURST_BYTES: f64 = 64.0 * 1024.0;

/// A plugin's allowance of log volume: a bucket of bytes refilled at
/// [`LOG_BYTES_PER_SECOND`]. A plugin that logs in a loop writes at most
/// that much; what it drops is counted in `weir_plugin_log_dropped_total`
/// and said in the next line it may write.
#[derive(Debug)]
struct LogBudget(Mutex<(Bucket, u64)>);

impl LogBudget {
    fn new() -> LogBudget {
        LogBudget(Mutex::new((Bucket::full(LOG_BURST_BYTES), 0)))
    }

    /// Takes `bytes` from the bucket: `Some(lines dropped since the last
    /// line written)` if they fit, `None` (counted) if not.
    fn take(&self, bytes: usize) -> Option<u64> {
        let mut guard = crate::sync::lock(&self.0);
        let (bucket, dropped) = &mut *guard;
        // Each line also costs its fixed fields.
        let cost = bytes as f64 + 128.0;
        if bucket.refill(LOG_BYTES_PER_SECOND, LOG_BURST_BYTES) < cost {
            *dropped += 1;
            return None;
        }
        bucket.spend(cost);
        Some(std::mem::take(dropped))
    }
}

/// Why a plugin could not be loaded or a call into it failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The engine could not be set up.
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    /// The `.wasm` file could not be read.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        reason: String,
    },
    /// The file is not a WebAssembly component that weir can run.
    #[error("{path}: not a loadable WebAssembly component: {reason}")]
    Compile {
        /// The file.
        path: PathBuf,
        /// What wasmtime said.
        reason: String,
    },
    /// The component does not implement the `weir:plugin` world.
    #[error("{path}: does not implement weir:plugin/plugin@0.1.0: {reason}")]
    Link {
        /// The file.
        path: PathBuf,
        /// What wasmtime said.
        reason: String,
    },
    /// Not an error: [`Runtime::load_reusing`] found nothing changed.
    #[error("unchanged")]
    Unchanged,
    /// The plugin's `configure` refused its config.
    #[error("configure refused the config: {0}")]
    Configure(String),
    /// The call did not finish within the plugin's deadline.
    #[error("did not return within {0:?}")]
    Timeout(Duration),
    /// Instantiating the plugin and running `configure` at load took longer
    /// than its `configure_timeout`.
    #[error("instantiation and configure did not finish within {0:?} (configure_timeout)")]
    ConfigureTimeout(Duration),
    /// The plugin tried to grow its memory beyond the cap.
    #[error("exceeded its memory limit of {0} MiB")]
    OutOfMemory(u32),
    /// The plugin trapped (a panic, an invalid operation, a forbidden import).
    #[error("trapped: {0}")]
    Trap(String),
    /// The plugin returned a decision the host cannot carry out.
    #[error("returned an invalid decision: {0}")]
    InvalidDecision(String),
    /// The call was refused without running: the plugin or its tenant is
    /// over its budget (CPU a second, or calls in flight).
    #[error("was not run: {0}")]
    OverBudget(String),
}

/// The per-store state the host functions see.
struct State {
    plugin: Arc<str>,
    log: Arc<LogBudget>,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryCap,
    /// Epoch ticks the running call may still observe before it is
    /// interrupted; the call yields at each one.
    ticks_left: u64,
    /// Whether the call runs in a tokio task, where a yield waits until the
    /// worker has polled for I/O and run every task that was ready (a slow
    /// plugin call then goes last, behind other connections). Calls under a
    /// plain `block_on` (loading) yield and resume at once instead: a
    /// deferred wake there would wait for a scheduler that is blocked.
    defer_yield: bool,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for State {}

impl wit::host::Host for State {
    fn log(&mut self, level: wit::host::Level, message: String) {
        use wit::host::Level;
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let cut = (0..=MAX_LOG_LINE)
                .rev()
                .find(|&i| message.is_char_boundary(i))
                .unwrap_or(0);
            message.truncate(cut);
        }
        let plugin = &*self.plugin;
        match self.log.take(message.len()) {
            None => {
                crate::metrics::METRICS
                    .plugin_log_dropped
                    .get_or_create(&crate::metrics::PluginLabels { plugin: plugin.into() })
                    .inc();
                return;
            }
            Some(0) => {}
            Some(dropped) => tracing::warn!(
                plugin,
                dropped,
                "the plugin logged faster than its log allowance; lines were dropped"
            ),
        }
        match level {
            Level::Trace => tracing::trace!(plugin, "{message:?}"),
            Level::Debug => tracing::debug!(plugin, "{message:?}"),
            Level::Info => tracing::info!(plugin, "{message:?}"),
            Level::Warn => tracing::warn!(plugin, "{message:?}"),
            Level::Error => tracing::error!(plugin, "{message:?}"),
        }
    }
}

/// Caps linear memory and remembers that it refused a grow, so an
/// allocation failure is reported as such and not as an anonymous trap.
struct MemoryCap {
    max_bytes: usize,
    refused: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_bytes;
        self.refused |= !allowed;
        Ok(allowed)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 16)
    }
}

/// Ticks of no plugin call after which the epoch thread sleeps until the
/// next call. Short: most calls end within a tick, and a ticker that
/// lingered after each would wake thousands of times a second for nothing
/// (100 ms of linger cost 3 % of a core at 80 connections a second).
const IDLE_TICKS_BEFORE_PARKING: u32 = 2;

/// The clock of plugin deadlines: a thread that advances the engine's epoch
/// every [`EPOCH_TICK`] while any plugin call may be running, and sleeps
/// otherwise.
///
/// No call may run unticked (its deadline would never come): a call first
/// counts itself in `in_flight`, then wakes the thread if `parked` is set; the
/// thread first sets `parked`, then parks only if `in_flight` is still zero.
/// With sequentially consistent ordering one of the two always sees the other.
struct Ticker {
    in_flight: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

impl Ticker {
    fn run(&self, engine: &Engine) {
        let mut idle_ticks = 0;
        while !self.stop.load(Ordering::SeqCst) {
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                idle_ticks = 0;
            } else if idle_ticks >= IDLE_TICKS_BEFORE_PARKING {
                self.parked.store(true, Ordering::SeqCst);
                if self.in_flight.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::SeqCst) {
                    std::thread::park();
                }
                self.parked.store(false, Ordering::SeqCst);
                idle_ticks = 0;
                continue;
            } else {
                idle_ticks += 1;
            }
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
        }
    }

    /// Marks a plugin call as running until the guard drops.
    fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.wake();
        }
        Busy(self)
    }

    fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

/// A running plugin call, as the ticker counts it.
struct Busy<'a>(&'a Ticker);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The engine every plugin runs on, and the clock of its deadlines.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    ticker: Arc<Ticker>,
    /// Compiled components by SHA-256 of their bytes, so a reload that
    /// keeps a `.wasm` file, or brings back the one before, does not compile
    /// it again. Pruned after every reload to what the running and the
    /// previous snapshot use ([`Runtime::retain_compiled`]), so replacing
    /// `.wasm` files does not accumulate compiled code.
    compiled: Mutex<HashMap<[u8; 32], Component>>,
    /// Configured instances each plugin gets at load: one per thread that
    /// may call plugins at once (the gateway's worker threads).
    warm_instances: usize,
}

/// A tenant's `max_plugin_calls` when its config says none: 4, or one per
/// worker thread if there are more.
pub fn default_tenant_calls() -> usize {
    worker_threads().max(4)
}

/// How many threads may call plugins at once: tokio's worker count
/// (`TOKIO_WORKER_THREADS`, else one per CPU), at most [`MAX_IDLE_INSTANCES`].
fn worker_threads() -> usize {
    let configured = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.trim().parse::<usize>().ok())
        .filter(|n| *n > 0);
    configured
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
        .clamp(1, MAX_IDLE_INSTANCES)
}

impl Runtime {
    /// Sets up the engine, the host imports and the epoch ticker thread.
    pub fn new() -> Result<Runtime, PluginError> {
        let engine_error = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
        let mut config = Config::new();
        // No wasm backtraces: a failure is reported in one line, and traps are cheaper.
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .wasm_backtrace_max_frames(None);
        let engine = Engine::new(&config).map_err(engine_error)?;

        let mut linker = Linker::new(&engine);
        wit::WeirPlugin::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(engine_error)?;
        link_harmless_wasi(&mut linker).map_err(engine_error)?;

        let ticker = Arc::new(Ticker {
            in_flight: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: OnceLock::new(),
        });
        let (ticker_engine, ticker_state) = (engine.clone(), Arc::clone(&ticker));
        let thread = std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || ticker_state.run(&ticker_engine))
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch thread: {e}")))?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(Runtime {
            engine,
            linker,
            ticker,
            compiled: Mutex::new(HashMap::new()),
            warm_instances: worker_threads(),
        })
    }

    /// Sets how many configured instances each plugin gets at load (at
    /// least one: it proves the config), for a caller that knows how many
    /// threads will call plugins at once.
    pub fn with_warm_instances(mut self, instances: usize) -> Runtime {
        self.warm_instances = instances.clamp(1, MAX_IDLE_INSTANCES);
        self
    }

    /// Drops the compiled components no plugin in `in_use` was loaded from.
    pub fn retain_compiled<'a>(&self, in_use: impl IntoIterator<Item = &'a Plugin>) {
        let keep: std::collections::HashSet<[u8; 32]> = in_use.into_iter().map(|plugin| plugin.sha256).collect();
        crate::sync::lock(&self.compiled).retain(|sha256, _| keep.contains(sha256));
    }

    /// How many compiled components are kept for reuse.
    pub fn compiled_count(&self) -> usize {
        crate::sync::lock(&self.compiled).len()
    }

    /// Compiles, links and configures a plugin: everything that can fail
    /// happens here, before any connection depends on it.
    pub fn load(&self, name: &str, path: &Path, config: &PluginConfig) -> Result<Plugin, PluginError> {
        self.load_reusing(name, path, config, None)
    }

    /// Like [`load`](Runtime::load), but returns `previous` itself when it was
    /// loaded from the same bytes with the same settings and config text, so
    /// a reload keeps its configured instances.
    pub fn load_reusing(
        &self,
        name: &str,
        path: &Path,
        config: &PluginConfig,
        previous: Option<&Arc<Plugin>>,
    ) -> Result<Plugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|e| PluginError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let config_text = config.config_string().map_err(|e| PluginError::Read {
            path: config.config_file.clone().unwrap_or_default(),
            reason: e.to_string(),
        })?;
        let sha256 = {
            let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
            let mut out = [0u8; 32];
            out.copy_from_slice(digest.as_ref());
            out
        };
        if let Some(previous) = previous
            && previous.sha256 == sha256
            && previous.settings == *config
            && previous.config == config_text
        {
            return Err(PluginError::Unchanged);
        }
        let cached = crate::sync::lock(&self.compiled).get(&sha256).cloned();
        let component = match cached {
            Some(component) => component,
            None => {
                let component = Component::new(&self.engine, &bytes).map_err(|e| PluginError::Compile {
                    path: path.to_owned(),
                    reason: format!("{e:#}"),
                })?;
                crate::sync::lock(&self.compiled).insert(sha256, component.clone());
                component
            }
        };
        let mut linker = self.linker.clone();
        let link_error = |e: wasmtime::Error| PluginError::Link {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        };
        stub_unprovided_imports(&mut linker, &component, &self.engine).map_err(link_error)?;
        let pre = linker.instantiate_pre(&component).map_err(link_error)?;
        let pre = wit::WeirPluginPre::new(pre).map_err(link_error)?;
        let plugin = Plugin {
            name: name.into(),
            pre,
            wasm: path.to_owned(),
            sha256,
            settings: config.clone(),
            loaded_at: std::time::SystemTime::now(),
            last_error: Mutex::new(None),
            config: config_text,
            timeout: config.timeout,
            configure_timeout: config.configure_timeout,
            max_memory_mib: config.max_memory_mib,
            on_error: config.on_error,
            reuse_instances: config.reuse_instances,
            idle: Mutex::new(Vec::new()),
            ticker: Arc::clone(&self.ticker),
            budget: arc_swap::ArcSwapOption::empty(),
            calls: AtomicUsize::new(0),
            log: Arc::new(LogBudget::new()),
            failure_reports: Mutex::new(EverySecond::default()),
            replenishing: AtomicBool::new(false),
            warm: if config.reuse_instances { self.warm_instances } else { 0 },
        };
        LIVE_PLUGINS.fetch_add(1, Ordering::Relaxed);
        // Configure the instances now, one per worker thread, so that no
        // connection waits for an instantiation and a `configure` (which may
        // take longer than a call's deadline); a refused config fails the
        // load. Without reuse, one instance proves the config.
        for _ in 0..plugin.warm.max(1) {
            let instance = futures_executor::block_on(plugin.configured_instance(false))?;
            plugin.put_back(instance);
        }
        Ok(plugin)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::SeqCst);
        self.ticker.wake();
    }
}

/// Interfaces (without their version) that plugins get for real; every
/// other import is linked to a trap by [`stub_unprovided_imports`].
const PROVIDED_INTERFACES: &[&str] = &[
    "weir:plugin/host",
    "weir:plugin/types",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/environment",
    "wasi:cli/exit",
];

/// Links the WASI interfaces that give a plugin nothing of the outside world
/// and never block: the wall clock, random numbers, an empty environment,
/// exit. (The monotonic clock is left out: its pollables need `wasi:io`.)
fn link_harmless_wasi(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::{cli, clocks, random};
    use wasmtime_wasi::{cli::WasiCli, clocks::WasiClocks, random::WasiRandom};
    use wasmtime_wasi::{cli::WasiCliView as _, clocks::WasiClocksView as _, random::WasiRandomView as _};
    clocks::wall_clock::add_to_linker::<State, WasiClocks>(linker, |s| s.clocks())?;
    random::random::add_to_linker::<State, WasiRandom>(linker, |s| s.random())?;
    random::insecure::add_to_linker::<State, WasiRandom>(linker, |s| s.random())?;
    random::insecure_seed::add_to_linker::<State, WasiRandom>(linker, |s| s.random())?;
    cli::environment::add_to_linker::<State, WasiCli>(linker, |s| s.cli())?;
    cli::exit::add_to_linker::<State, WasiCli>(linker, |s| s.cli())?;
    Ok(())
}

/// Links every import of `component` outside [`PROVIDED_INTERFACES`] to a
/// function that traps, naming what the plugin reached for. (wasmtime's own
/// `define_unknown_imports_as_traps` would also shadow the provided WASI
/// interfaces when the guest asks for an older 0.2.x version of them.)
fn stub_unprovided_imports(linker: &mut Linker<State>, component: &Component, engine: &Engine) -> wasmtime::Result<()> {
    use wasmtime::component::ResourceType;
    use wasmtime::component::types::ComponentItem;
    for (name, item) in component.component_type().imports(engine) {
        let interface = name.split_once('@').map_or(name, |(interface, _version)| interface);
        if PROVIDED_INTERFACES.contains(&interface) {
            continue;
        }
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            wasmtime::bail!("unsupported import `{name}`");
        };
        let mut stubs = linker.instance(name)?;
        for (export, item) in instance.exports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(_) => {
                    let what = format!("{name}#{export}");
                    stubs.func_new(export, move |_, _, _, _| {
                        wasmtime::bail!("called `{what}`, which weir does not give plugins")
                    })?;
                }
                ComponentItem::Resource(_) => stubs.resource(export, ResourceType::host::<()>(), |_, _| Ok(()))?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// A configured, live instance of a plugin.
struct Instance {
    store: Store<State>,
    exports: wit::WeirPlugin,
}

/// Plugins loaded and instances alive in this process, for the gauges that
/// show whether anything (a long-lived connection, say) keeps replaced
/// plugins in memory.
static LIVE_PLUGINS: AtomicUsize = AtomicUsize::new(0);
static LIVE_INSTANCES: AtomicUsize = AtomicUsize::new(0);

/// Loaded plugins alive in this process (those of the running snapshot, and
/// of any older one something still holds).
pub fn live_plugins() -> usize {
    LIVE_PLUGINS.load(Ordering::Relaxed)
}

/// Plugin instances alive in this process, idle or in a call.
pub fn live_instances() -> usize {
    LIVE_INSTANCES.load(Ordering::Relaxed)
}

impl Instance {
    fn new(store: Store<State>, exports: wit::WeirPlugin) -> Instance {
        LIVE_INSTANCES.fetch_add(1, Ordering::Relaxed);
        Instance { store, exports }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        LIVE_INSTANCES.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        LIVE_PLUGINS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A loaded plugin: its compiled component, settings, and idle instances.
pub struct Plugin {
    name: Arc<str>,
    pre: wit::WeirPluginPre<State>,
    wasm: PathBuf,
    sha256: [u8; 32],
    settings: PluginConfig,
    loaded_at: std::time::SystemTime,
    /// The latest failure of a call, and when (seconds since the Unix epoch).
    last_error: Mutex<Option<(u64, String)>>,
    config: String,
    timeout: Duration,
    configure_timeout: Duration,
    max_memory_mib: u32,
    on_error: OnError,
    reuse_instances: bool,
    idle: Mutex<Vec<Instance>>,
    ticker: Arc<Ticker>,
    /// The budget of the tenant that owns the plugin, if any.
    budget: arc_swap::ArcSwapOption<Budget>,
    /// Calls in flight.
    calls: AtomicUsize,
    /// Its log volume, over all its instances.
    log: Arc<LogBudget>,
    /// When a failure was last logged, and how many were not since.
    failure_reports: Mutex<EverySecond>,
    /// Whether a background task is configuring replacement instances.
    replenishing: AtomicBool,
    /// How many configured instances the stock should hold.
    warm: usize,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

impl PluginError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Timeout(_) | PluginError::ConfigureTimeout(_) => "timeout",
            PluginError::OutOfMemory(_) => "memory",
            PluginError::Trap(_) => "trap",
            PluginError::InvalidDecision(_) => "invalid-decision",
            PluginError::OverBudget(_) => "budget",
            _ => "load",
        }
    }
}

impl Plugin {
    /// The plugin's name in the config.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// What a failure of this plugin means for the connection.
    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    /// The `.wasm` file it was loaded from.
    pub fn wasm(&self) -> &Path {
        &self.wasm
    }

    /// SHA-256 of the `.wasm` bytes: the plugin's version.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// When it was loaded.
    pub fn loaded_at(&self) -> std::time::SystemTime {
        self.loaded_at
    }

    /// The latest failure of a call (seconds since the Unix epoch, what
    /// happened), if any.
    pub fn last_error(&self) -> Option<(u64, String)> {
        crate::sync::lock(&self.last_error).clone()
    }

    /// Configured instances waiting for a call.
    pub fn idle_instances(&self) -> usize {
        crate::sync::lock(&self.idle).len()
    }

    /// Puts the plugin under a tenant's budget (or none).
    pub fn set_budget(&self, budget: Option<Arc<Budget>>) {
        self.budget.store(budget);
    }

    /// Asks the plugin to route a connection.
    pub async fn route(self: &Arc<Self>, conn: &wit::Connection) -> Result<wit::Decision, PluginError> {
        let mut call = self.begin()?;
        let mut instance = call.checkout().await?;
        arm_task_call(&mut instance.store, self.timeout);
        let result = {
            let exports = instance.exports.weir_plugin_plugin();
            let running = std::pin::pin!(exports.call_route(&mut instance.store, conn));
            Timed::new(running, &mut call.spent).await
        };
        call.finish(instance, result)
    }

    /// Asks the plugin whether to admit an authenticated peer.
    pub async fn admit(
        self: &Arc<Self>,
        conn: &wit::Connection,
        side: wit::Side,
        peer: &wit::Peer,
    ) -> Result<wit::Verdict, PluginError> {
        let mut call = self.begin()?;
        let mut instance = call.checkout().await?;
        arm_task_call(&mut instance.store, self.timeout);
        let result = {
            let exports = instance.exports.weir_plugin_plugin();
            let running = std::pin::pin!(exports.call_admit(&mut instance.store, conn, side, peer));
            Timed::new(running, &mut call.spent).await
        };
        call.finish(instance, result)
    }

    /// Takes a place for a call: within the plugin's calls in flight and
    /// its tenant's budget, or refused without running.
    fn begin(self: &Arc<Self>) -> Result<Call<'_>, PluginError> {
        let held = self.calls.fetch_add(1, Ordering::AcqRel);
        let budget = self.budget.load_full();
        let call = Call {
            plugin: self,
            _busy: None,
            spending: None,
            spent: Duration::ZERO,
        };
        if held >= MAX_CALLS_IN_FLIGHT {
            return Err(call.refuse(PluginError::OverBudget(format!(
                "{MAX_CALLS_IN_FLIGHT} calls of this plugin are in flight"
            ))));
        }
        let mut call = call;
        if let Some(budget) = budget {
            match budget.start() {
                Ok(spending) => call.spending = Some(spending),
                Err(reason) => return Err(call.refuse(PluginError::OverBudget(reason))),
            }
        }
        // Only a call that runs needs the clock (a refusal wakes no ticker).
        call._busy = Some(self.ticker.busy());
        Ok(call)
    }

    /// Creates and configures a fresh instance within `configure_timeout`.
    async fn configured_instance(&self, defer_yield: bool) -> Result<Instance, PluginError> {
        self.instantiate(self.configure_timeout, defer_yield)
            .await
            .map_err(|e| match e {
                PluginError::Timeout(budget) => PluginError::ConfigureTimeout(budget),
                other => other,
            })
    }

    /// Creates and configures a fresh instance, each step within `budget`;
    /// `defer_yield` says whether it runs in a tokio task (see [`State`]).
    async fn instantiate(&self, budget: Duration, defer_yield: bool) -> Result<Instance, PluginError> {
        let _busy = self.ticker.busy();
        let state = State {
            plugin: Arc::clone(&self.name),
            log: Arc::clone(&self.log),
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: MemoryCap {
                max_bytes: self.max_memory_mib as usize * 1024 * 1024,
                refused: false,
            },
            ticks_left: 0,
            defer_yield,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        // At every tick the call yields to the scheduler, until its ticks
        // are spent; then it is interrupted.
        store.epoch_deadline_callback(|mut store| {
            let state = store.data_mut();
            if state.ticks_left == 0 {
                return Ok(UpdateDeadline::Interrupt);
            }
            state.ticks_left -= 1;
            if state.defer_yield {
                Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        arm(&mut store, budget);
        let exports = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| self.classify(e, &store, budget))?;
        arm(&mut store, budget);
        exports
            .weir_plugin_plugin()
            .call_configure(&mut store, &self.config)
            .await
            .map_err(|e| self.classify(e, &store, budget))?
            .map_err(PluginError::Configure)?;
        Ok(Instance::new(store, exports))
    }

    /// Refills the stock of configured instances in the background, one at
    /// a time, after a failed call discarded one. Off the connection path,
    /// and under `configure_timeout`, so a plugin whose `configure` is slower
    /// than its call deadline recovers from a trap.
    fn replenish(self: &Arc<Self>) {
        if self.warm == 0 || self.replenishing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.replenishing.store(false, Ordering::Release);
            return;
        };
        let plugin = Arc::clone(self);
        runtime.spawn(async move {
            while plugin.idle_instances() < plugin.warm {
                let mut spent = Duration::ZERO;
                let made = Timed::new(std::pin::pin!(plugin.configured_instance(true)), &mut spent).await;
                if let Some(budget) = plugin.budget.load_full() {
                    budget.charge(spent);
                }
                match made {
                    Ok(instance) => plugin.put_back(instance),
                    Err(error) => {
                        tracing::warn!(plugin = &*plugin.name, %error, "cannot configure a replacement instance");
                        break;
                    }
                }
            }
            plugin.replenishing.store(false, Ordering::Release);
        });
    }

    /// Whether to log this failure of a call: one a second is, with how
    /// many there were since (this one included); the rest are only counted
    /// (metrics and the connection log line say each), so a storm of
    /// failures, or of refusals over budget, cannot flood the log.
    pub fn report_failure(&self) -> Option<u64> {
        crate::sync::lock(&self.failure_reports).event()
    }

    /// Remembers a call's failure for the admin API.
    fn record(&self, error: &PluginError) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        *crate::sync::lock(&self.last_error) = Some((at, error.to_string()));
    }

    fn put_back(&self, instance: Instance) {
        if !self.reuse_instances {
            return;
        }
        let mut idle = crate::sync::lock(&self.idle);
        if idle.len() < MAX_IDLE_INSTANCES {
            idle.push(instance);
        }
    }

    fn classify(&self, error: wasmtime::Error, store: &Store<State>, budget: Duration) -> PluginError {
        if store.data().limiter.refused {
            return PluginError::OutOfMemory(self.max_memory_mib);
        }
        if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
            return PluginError::Timeout(budget);
        }
        PluginError::Trap(format!("{error:#}"))
    }
}

/// Sets the deadline for the next call: whole ticks, plus one because the
/// current tick is already partly gone. The call yields at each tick.
fn arm(store: &mut Store<State>, budget: Duration) {
    let ticks = budget.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64 + 1;
    store.data_mut().ticks_left = ticks;
    store.set_epoch_deadline(1);
}

/// Arms a call made from a tokio task: its yields go behind other work.
fn arm_task_call(store: &mut Store<State>, budget: Duration) {
    arm(store, budget);
    store.data_mut().defer_yield = true;
}

/// One call of a plugin in progress: its place among the plugin's calls in
/// flight and in its tenant's budget, and the CPU it has spent, charged to
/// the budget when it ends.
struct Call<'a> {
    plugin: &'a Arc<Plugin>,
    _busy: Option<Busy<'a>>,
    spending: Option<Spending>,
    spent: Duration,
}

impl Call<'_> {
    /// Ends a call that was refused before it ran, recording why.
    fn refuse(self, error: PluginError) -> PluginError {
        self.plugin.record(&error);
        error
    }

    /// An idle instance, or a fresh one configured within
    /// `configure_timeout` (the connection waits for it).
    async fn checkout(&mut self) -> Result<Instance, PluginError> {
        let idle = crate::sync::lock(&self.plugin.idle).pop();
        if let Some(instance) = idle {
            return Ok(instance);
        }
        let plugin = self.plugin;
        // A fresh instance per call (no reuse) is part of the call, within
        // its `timeout`; a stock that ran dry waits within `configure_timeout`.
        let making = async {
            if plugin.reuse_instances {
                plugin.configured_instance(true).await
            } else {
                plugin.instantiate(plugin.timeout, true).await
            }
        };
        let made = Timed::new(std::pin::pin!(making), &mut self.spent).await;
        made.inspect_err(|error| self.plugin.record(error))
    }

    /// Returns the instance to the stock after a good call; discards it after
    /// a failed one (its state may be broken) and has a replacement made.
    fn finish<R>(self, instance: Instance, result: wasmtime::Result<R>) -> Result<R, PluginError> {
        let plugin = self.plugin;
        match result {
            Ok(value) => {
                plugin.put_back(instance);
                Ok(value)
            }
            Err(e) => {
                let error = plugin.classify(e, &instance.store, plugin.timeout);
                drop(instance);
                plugin.record(&error);
                plugin.replenish();
                Err(error)
            }
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.plugin.calls.fetch_sub(1, Ordering::AcqRel);
        if let Some(spending) = self.spending.take() {
            spending.end(self.spent);
        }
    }
}

/// Adds the time spent polling a future — the plugin running on this
/// thread, not the time it waits to be polled again — to a total.
struct Timed<'a, F> {
    inner: F,
    spent: &'a mut Duration,
}

impl<'a, F> Timed<'a, F> {
    fn new(inner: F, spent: &'a mut Duration) -> Self {
        Timed { inner, spent }
    }
}

impl<F: std::future::Future + Unpin> std::future::Future for Timed<'_, F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let started = Instant::now();
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll(cx);
        *this.spent += started.elapsed();
        polled
    }
}

/// A tenant's allowance of plugin time: CPU a second, as a bucket that holds
/// a tenth of a second's worth and refills continuously, and calls in flight
/// at once. (A bucket of a whole second's worth let a looping tenant spend
/// 250 ms at once, and the bystanders' p99 rose with it.) A call is refused while the bucket is empty or the calls are at
/// their limit, so a tenant whose plugin loops spends its own allowance
/// and no one else's. Carried across reloads while its limits are the same.
#[derive(Debug)]
pub struct Budget {
    cpu_per_second: Duration,
    max_calls: usize,
    calls: AtomicUsize,
    bucket: Mutex<Bucket>,
}

/// The share of a second of a tenant's `plugin_cpu` its budget holds at once.
const BUDGET_BURST: f64 = 0.1;

/// A call's place in a [`Budget`]; [`Spending::end`] charges what it spent.
#[derive(Debug)]
struct Spending(Arc<Budget>);

impl Spending {
    fn end(self, spent: Duration) {
        self.0.charge(spent);
        // Dropping `self` gives the call's place back.
    }
}

impl Drop for Spending {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Budget {
    /// A budget of `cpu_per_second` of plugin CPU a second and `max_calls`
    /// calls at once.
    pub fn new(cpu_per_second: Duration, max_calls: usize) -> Arc<Budget> {
        Arc::new(Budget {
            cpu_per_second,
            max_calls,
            calls: AtomicUsize::new(0),
            bucket: Mutex::new(Bucket::full(cpu_per_second.as_secs_f64() * BUDGET_BURST)),
        })
    }

    /// Whether this budget has these limits (a reload keeps it if so).
    pub fn has_limits(&self, cpu_per_second: Duration, max_calls: usize) -> bool {
        self.cpu_per_second == cpu_per_second && self.max_calls == max_calls
    }

    /// Takes a place for a call, or says why not.
    fn start(self: &Arc<Self>) -> Result<Spending, String> {
        let held = self.calls.fetch_add(1, Ordering::AcqRel);
        // Dropped on refusal, it gives the place back.
        let spending = Spending(Arc::clone(self));
        if held >= self.max_calls {
            return Err(format!(
                "its tenant has {} plugin calls in flight (max_plugin_calls)",
                self.max_calls
            ));
        }
        if self.refill().available() <= 0.0 {
            return Err(format!(
                "its tenant has spent its plugin CPU budget of {:?} a second (plugin_cpu)",
                self.cpu_per_second
            ));
        }
        Ok(spending)
    }

    /// The bucket brought up to date, locked: seconds of CPU that may
    /// still be spent (below zero after a call that overdrew it).
    fn refill(&self) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = crate::sync::lock(&self.bucket);
        let rate = self.cpu_per_second.as_secs_f64();
        bucket.refill(rate, rate * BUDGET_BURST);
        bucket
    }

    /// Charges CPU spent by the tenant's plugins.
    fn charge(&self, spent: Duration) {
        self.refill().spend(spent.as_secs_f64());
    }
}
