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
//! epoch tick (every 0.25 ms once the ticker sees it running, within 5 ms of
//! its start), so a plugin that runs to its deadline
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use crate::config::{DEFAULT_ISOLATED_INSTANCES, MAX_ISOLATED_INSTANCES, PluginConfig};
use crate::plugin::contract::{Pre, Version};
use crate::plugin::instance::LIVE_PLUGINS;
use crate::plugin::link::{link_harmless_wasi, stub_unprovided_imports};
use crate::plugin::state::{LogBudget, State, Ticker};
use crate::throttle::EverySecond;
use crate::wit;

mod budget;
pub mod cache;
pub mod caps;
pub mod chain;
pub mod compile;
mod contract;
pub use compile::CompileScope;
mod counters;
pub mod decision;
mod image;
mod instance;
mod lane;
mod link;
mod older;
pub mod shadow;
mod shared;
mod state;

pub use budget::Budget;
pub use instance::{Plugin, live_instances, live_plugins};
pub(crate) use lane::lower_priority;

/// How often the engine's epoch advances: the resolution of plugin deadlines,
/// and the longest a running call holds its worker thread before it yields.
/// A quarter of a millisecond keeps other connections' wait behind a
/// looping plugin short (with 1 ms slices, a bystander tenant's p99 was 8x
/// its quiet p99 in `bench/run.sh isolation`; with these, about 2x).
const EPOCH_TICK: Duration = Duration::from_micros(250);
/// Most idle instances kept per plugin. A call that finishes within a tick
/// never yields, so more than one per worker is rarely in use.
const MAX_IDLE_INSTANCES: usize = 16;

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
    /// A tenant's new component, found with its compile allowance spent.
    #[error(
        "tenant `{tenant}` has spent its compile time (compile_per_minute = {per_minute:?}): its new component is compiled in {} s at the earliest",
        wait.as_secs().max(1)
    )]
    CompileBudget {
        /// The tenant.
        tenant: String,
        /// Its allowance.
        per_minute: Duration,
        /// How long until it may compile again.
        wait: Duration,
    },
    /// The component does not implement a `weir:plugin` world this host
    /// runs (0.1.x or 0.2.x), or imports what it cannot be given.
    #[error("{path}: cannot be linked as a weir plugin: {reason}")]
    Link {
        /// The file.
        path: PathBuf,
        /// What wasmtime said.
        reason: String,
    },
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
    InvalidDecision(decision::DecisionError),
    /// The call was refused without running: the plugin or its tenant is
    /// over its budget (CPU a second, or calls in flight).
    #[error("was not run: {0}")]
    OverBudget(String),
}

/// An engine and the host imports linked for it.
struct Host {
    engine: Engine,
    linker: Linker<State>,
}

/// The engines every plugin runs on, and the clock of their deadlines.
///
/// Two engines, the same code: plugins that keep their instances run on
/// one that allocates each instance on demand (they instantiate rarely);
/// `reuse_instances = false` plugins, which instantiate on every call, run
/// on one with wasmtime's pooling allocator — linear memories, tables and
/// fiber stacks taken from slots reserved at start, memory reset from its
/// copy-on-write image, the pages a call touched kept resident — which
/// made a fresh instance per call about 7x cheaper (`host/benches/plugin.rs`).
/// Its slots are a fixed number ([`DEFAULT_ISOLATED_INSTANCES`]): a call
/// that finds none free is refused like one over budget.
pub struct Runtime {
    reused: Host,
    isolated: Host,
    isolated_slots: u32,
    ticker: Arc<Ticker>,
    /// Compiled components by SHA-256 of their bytes and whether they are
    /// compiled for the isolated engine, so a reload that
    /// keeps a `.wasm` file, or brings back the one before, does not compile
    /// it again. Pruned after every reload to what the running and the
    /// previous snapshot use ([`Runtime::retain_compiled`]), so replacing
    /// `.wasm` files does not accumulate compiled code.
    compiled: Mutex<HashMap<([u8; 32], bool), Component>>,
    /// Compiled code on disk, when the config keeps it.
    disk: Option<cache::CompiledCache>,
    /// Configured instances each plugin gets at load: one per thread that
    /// may call plugins at once (the gateway's worker threads).
    warm_instances: usize,
    /// What plugins' capabilities keep across reloads, by plugin name.
    shared: shared::Shared,
    /// Each tenant's compile allowance.
    compile_budgets: compile::CompileBudgets,
}

/// The engine settings both engines share: compiled code is the same for
/// both (and so is its entry in the compiled-code cache).
fn engine_config() -> Config {
    let mut config = Config::new();
    // No wasm backtraces: a failure is reported in one line, and traps are cheaper.
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .wasm_backtrace_max_frames(None);
    config
}

/// The pool of the isolated engine: `slots` component instances, with room
/// for the several core instances, memories and tables a component made by
/// a guest toolchain holds (componentize-py's hold more than Rust's).
fn isolated_pool(slots: u32) -> wasmtime::PoolingAllocationConfig {
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_component_instances(slots)
        .total_core_instances(slots.saturating_mul(8))
        .total_memories(slots.saturating_mul(2))
        .total_tables(slots.saturating_mul(4))
        .total_stacks(slots)
        .table_elements(100_000)
        // The largest `max_memory_mib` a plugin may have; the store's
        // limiter holds each plugin to its own.
        .max_memory_size(4096 << 20)
        .max_core_instance_size(4 << 20)
        // Reset the pages a call dirtied by copying instead of unmapping
        // them, so the next instance does not fault them in again.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
    pool
}

impl Host {
    fn new(config: &Config) -> Result<Host, PluginError> {
        let engine_error = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
        let engine = Engine::new(config).map_err(engine_error)?;
        let mut linker = Linker::new(&engine);
        // Every contract version's `log`; capabilities are linked per
        // plugin, as its grants say.
        wit::v0_1::WeirPlugin::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(engine_error)?;
        wit::v0_2::host::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(engine_error)?;
        wit::host::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(engine_error)?;
        link_harmless_wasi(&mut linker).map_err(engine_error)?;
        Ok(Host { engine, linker })
    }
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
    /// Sets up the engines, the host imports and the epoch ticker thread,
    /// with [`DEFAULT_ISOLATED_INSTANCES`] isolated slots.
    pub fn new() -> Result<Runtime, PluginError> {
        Runtime::with_isolated_slots(DEFAULT_ISOLATED_INSTANCES)
    }

    /// Like [`Runtime::new`], with `slots` instances of `reuse_instances =
    /// false` plugins alive at once.
    pub fn with_isolated_slots(slots: u32) -> Result<Runtime, PluginError> {
        let slots = slots.clamp(1, MAX_ISOLATED_INSTANCES);
        lane::compile_at_low_priority();
        let reused = Host::new(&engine_config())?;
        let mut pooled = engine_config();
        pooled.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(isolated_pool(slots)));
        let isolated = Host::new(&pooled)?;

        let ticker = Arc::new(Ticker::default());
        let engines = [reused.engine.clone(), isolated.engine.clone()];
        let ticker_state = Arc::clone(&ticker);
        let thread = std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || ticker_state.run(&engines))
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch thread: {e}")))?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(Runtime {
            reused,
            isolated,
            isolated_slots: slots,
            ticker,
            compiled: Mutex::new(HashMap::new()),
            disk: None,
            warm_instances: worker_threads(),
            shared: shared::Shared::default(),
            compile_budgets: compile::CompileBudgets::default(),
        })
    }

    /// Keeps compiled code in `dir` (bounded to `max_bytes`) and loads it
    /// from there; a directory others can write is refused.
    pub fn with_cache(mut self, dir: &Path, max_bytes: u64) -> Result<Runtime, cache::CacheError> {
        self.disk = Some(cache::CompiledCache::open(dir, max_bytes)?);
        Ok(self)
    }

    /// The runtime a config asks for: with its compiled-code cache unless
    /// the config (or `--no-cache`) turns it off or there is no home for it.
    pub fn for_config(config: &crate::config::Config) -> Result<Runtime, PluginError> {
        let slots = config.limits.isolated_instances.unwrap_or(DEFAULT_ISOLATED_INSTANCES);
        let runtime = Runtime::with_isolated_slots(slots)?;
        match config.cache_dir() {
            None => Ok(runtime),
            Some(dir) => runtime
                .with_cache(&dir, config.cache.max_size_mib.saturating_mul(1024 * 1024))
                .map_err(|e| PluginError::Engine(e.to_string())),
        }
    }

    /// The compiled-code cache in use, if any.
    pub fn disk_cache(&self) -> Option<&cache::CompiledCache> {
        self.disk.as_ref()
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
        let keep: std::collections::HashSet<([u8; 32], bool)> = in_use
            .into_iter()
            .flat_map(|plugin| {
                let isolated = !plugin.reuse_instances;
                std::iter::once((plugin.sha256, isolated)).chain(plugin.image.map(|key| (key, true)))
            })
            .collect();
        crate::sync::lock(&self.compiled).retain(|key, _| keep.contains(key));
    }

    /// How many compiled components are kept for reuse.
    pub fn compiled_count(&self) -> usize {
        crate::sync::lock(&self.compiled).len()
    }

    /// Compiles, links and configures a plugin: everything that can fail
    /// happens here, before any connection depends on it.
    pub fn load(&self, name: &str, path: &Path, config: &PluginConfig) -> Result<Plugin, PluginError> {
        self.instantiate(name, path, config, read(path, config)?, CompileScope::Operator)
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
        scope: CompileScope<'_>,
    ) -> Result<Arc<Plugin>, PluginError> {
        let read = read(path, config)?;
        if let Some(previous) = previous
            && previous.sha256 == read.sha256
            && previous.settings == *config
            && previous.config == read.config_text
            && !self.resolver_changed(previous)
        {
            return Ok(Arc::clone(previous));
        }
        self.instantiate(name, path, config, read, scope).map(Arc::new)
    }

    /// Links `component` for plugin `name`: its contract version, the
    /// capabilities it is granted (and none it is not), stubs for the rest.
    fn link(
        &self,
        host: &Host,
        name: &str,
        path: &Path,
        config: &PluginConfig,
        component: &Component,
    ) -> Result<(Linker<State>, Pre, Version), PluginError> {
        let mut linker = host.linker.clone();
        let refused = |reason: String| PluginError::Link {
            path: path.to_owned(),
            reason,
        };
        let link_error = |e: wasmtime::Error| refused(format!("{e:#}"));
        let version = Version::of(component, &host.engine).map_err(refused)?;
        if let Some(reason) = caps::ungranted_import(component, &host.engine, name, &config.grants) {
            return Err(refused(reason));
        }
        caps::link_granted(&mut linker, &config.grants, version).map_err(link_error)?;
        stub_unprovided_imports(&mut linker, component, &host.engine).map_err(link_error)?;
        let pre = linker.instantiate_pre(component).map_err(link_error)?;
        let pre = Pre::new(pre, version).map_err(link_error)?;
        Ok((linker, pre, version))
    }

    /// Compiles (or takes from the cache), links and configures a plugin.
    fn instantiate(
        &self,
        name: &str,
        path: &Path,
        config: &PluginConfig,
        read: Read,
        scope: CompileScope<'_>,
    ) -> Result<Plugin, PluginError> {
        let Read {
            bytes,
            sha256,
            config_text,
        } = read;
        let bytes = &bytes[..];
        let isolated = !config.reuse_instances;
        let host = if isolated { &self.isolated } else { &self.reused };
        let component = self.compiled(host, sha256, isolated, || {
            self.compile_for(scope, || {
                Component::new(&host.engine, bytes).map_err(|e| PluginError::Compile {
                    path: path.to_owned(),
                    reason: format!("{e:#}"),
                })
            })
        })?;
        let (linker, pre, version) = self.link(host, name, path, config, &component)?;
        let caps = self.capabilities(name, config).map_err(|reason| PluginError::Link {
            path: path.to_owned(),
            reason,
        })?;
        let mut plugin = Plugin {
            name: name.into(),
            pre,
            version,
            caps,
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
            cpu_spent: crate::metrics::METRICS.plugin_cpu(name),
            calls: AtomicUsize::new(0),
            log: Arc::new(LogBudget::new()),
            failure_reports: Mutex::new(EverySecond::default()),
            shadow_reports: Mutex::new(EverySecond::default()),
            replenishing: AtomicBool::new(false),
            slowness: lane::Slowness::default(),
            warm: if config.reuse_instances { self.warm_instances } else { 0 },
            isolated_slots: self.isolated_slots,
            image: None,
        };
        LIVE_PLUGINS.fetch_add(1, Ordering::Relaxed);
        if isolated && config.snapshot {
            self.start_from_image(&mut plugin, host, &linker, bytes, scope)?;
        }
        // Configure the instances now, one per worker thread, so that no
        // connection waits for an instantiation and a `configure` (which may
        // take longer than a call's deadline); a refused config fails the
        // load. Without reuse, one instance proves the config (or the image).
        for _ in 0..plugin.warm.max(1) {
            let instance = futures_executor::block_on(plugin.configured_instance(false))?;
            plugin.put_back(instance);
        }
        Ok(plugin)
    }

    /// Makes `plugin`'s instances start from its configured image (taken
    /// now, or found in the caches); a component that cannot be imaged goes
    /// on configuring each instance, and the log says why.
    fn start_from_image(
        &self,
        plugin: &mut Plugin,
        host: &Host,
        linker: &Linker<State>,
        bytes: &[u8],
        scope: CompileScope<'_>,
    ) -> Result<(), PluginError> {
        let key = image::key(&plugin.sha256, &plugin.config);
        match self.image_pre(plugin, host, linker, bytes, key, scope)? {
            Ok(pre) => {
                plugin.pre = pre;
                plugin.image = Some(key);
                tracing::debug!(plugin = &*plugin.name, "its instances start from its configured image");
            }
            Err(reason) => {
                tracing::info!(plugin = &*plugin.name, %reason, "no configured image: each instance runs configure");
            }
        }
        Ok(())
    }

    /// `plugin`'s configured image (kept under `key`), linked; `Ok(Err(why))`
    /// when the component cannot be imaged.
    fn image_pre(
        &self,
        plugin: &Plugin,
        host: &Host,
        linker: &Linker<State>,
        bytes: &[u8],
        key: [u8; 32],
        scope: CompileScope<'_>,
    ) -> Result<Result<Pre, String>, PluginError> {
        let mut unsupported = None;
        let mut take = || {
            let instrumented = |wasm: &[u8]| {
                let key = image::instrumented_key(&plugin.sha256);
                // Only on disk: it is needed again only for another config.
                self.disk_compiled(host, key, || {
                    self.compile_charged(scope, || {
                        Component::new(&host.engine, wasm).map_err(|e| PluginError::Engine(format!("{e:#}")))
                    })
                })
                .map_err(|e| e.to_string())
            };
            let compiled = match image::take_now(plugin, linker, bytes, instrumented) {
                Ok(image) => self
                    .compile_charged(scope, || Component::new(&host.engine, &image))
                    .map_err(|e| image::Refused::Unsupported(format!("its image does not compile: {e:#}"))),
                Err(refused) => Err(refused),
            };
            compiled.map_err(|refused| match refused {
                image::Refused::Plugin(error) => error,
                image::Refused::Unsupported(reason) => {
                    unsupported = Some(reason.clone());
                    PluginError::Engine(reason)
                }
            })
        };
        // What `configure` read through a capability (a DNS answer, a pool,
        // a counter) is in the image: such an image is taken at every load
        // of the plugin and kept nowhere else, so it never outlives it.
        let taken = if plugin.settings.grants.is_empty() {
            self.compiled(host, key, true, take)
        } else {
            take()
        };
        let component = match (taken, unsupported) {
            (Ok(component), _) => component,
            (Err(_), Some(reason)) => return Ok(Err(reason)),
            (Err(error), None) => return Err(error),
        };
        let linked = linker
            .instantiate_pre(&component)
            .and_then(|pre| Pre::new(pre, plugin.version));
        Ok(linked.map_err(|e| format!("its image does not link: {e:#}")))
    }
}

/// A plugin's component bytes, their SHA-256 and its config text.
struct Read {
    bytes: Vec<u8>,
    sha256: [u8; 32],
    config_text: String,
}

/// Reads a plugin's component and its config text.
fn read(path: &Path, config: &PluginConfig) -> Result<Read, PluginError> {
    let bytes = std::fs::read(path).map_err(|e| PluginError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let config_text = config.config_string().map_err(|e| PluginError::Read {
        path: config.config_file.clone().unwrap_or_default(),
        reason: e.to_string(),
    })?;
    let sha256 = cache::sha256(&[&bytes]);
    Ok(Read {
        bytes,
        sha256,
        config_text,
    })
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::SeqCst);
        self.ticker.wake();
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
