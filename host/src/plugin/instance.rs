//! A loaded plugin: its instances (idle ones reused, fresh ones configured
//! off the connection path), and each call — checked out, deadline armed,
//! CPU time measured and charged, instance returned or dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtx;

use crate::config::MAX_PLUGIN_CALLS as MAX_CALLS_IN_FLIGHT;
use crate::config::{OnError, PluginConfig};
use crate::plugin::budget::Spending;
use crate::plugin::caps::Capabilities;
use crate::plugin::contract::{Exports, Pre, Version};
use crate::plugin::lane;
use crate::plugin::state::{Busy, LogBudget, MemoryCap, State, Ticker};
use crate::plugin::{Budget, EPOCH_TICK, MAX_IDLE_INSTANCES, PluginError};
use crate::throttle::EverySecond;
use crate::wit;

/// A configured, live instance of a plugin.
pub(crate) struct Instance {
    pub(crate) store: Store<State>,
    pub(crate) exports: Exports,
}

/// Plugins loaded and instances alive in this process, for the gauges that
/// show whether anything (a long-lived connection, say) keeps replaced
/// plugins in memory.
pub(crate) static LIVE_PLUGINS: AtomicUsize = AtomicUsize::new(0);

pub(crate) static LIVE_INSTANCES: AtomicUsize = AtomicUsize::new(0);

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
    pub(crate) fn new(store: Store<State>, exports: Exports) -> Instance {
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
    pub(crate) name: Arc<str>,
    pub(crate) pre: Pre,
    /// The contract version the component speaks.
    pub(crate) version: Version,
    /// What its grants give it.
    pub(crate) caps: Arc<Capabilities>,
    pub(crate) wasm: PathBuf,
    pub(crate) sha256: [u8; 32],
    pub(crate) settings: PluginConfig,
    pub(crate) loaded_at: std::time::SystemTime,
    /// The latest failure of a call, and when (seconds since the Unix epoch).
    pub(crate) last_error: Mutex<Option<(u64, String)>>,
    pub(crate) config: String,
    pub(crate) timeout: Duration,
    pub(crate) configure_timeout: Duration,
    pub(crate) max_memory_mib: u32,
    pub(crate) on_error: OnError,
    pub(crate) reuse_instances: bool,
    pub(crate) idle: Mutex<Vec<Instance>>,
    pub(crate) ticker: Arc<Ticker>,
    /// The budget of the tenant that owns the plugin, if any.
    pub(crate) budget: arc_swap::ArcSwapOption<Budget>,
    /// What it spent of that budget (`weir_plugin_cpu_seconds_total`).
    pub(crate) cpu_spent: crate::metrics::CpuCounter,
    /// Calls in flight.
    pub(crate) calls: AtomicUsize,
    /// Its log volume, over all its instances.
    pub(crate) log: Arc<LogBudget>,
    /// When a failure was last logged, and how many were not since.
    pub(crate) failure_reports: Mutex<EverySecond>,
    /// Likewise for its disagreements as a shadow plugin.
    pub(crate) shadow_reports: Mutex<EverySecond>,
    /// Whether a background task is configuring replacement instances.
    pub(crate) replenishing: AtomicBool,
    /// Whether its calls start in the slow lane.
    pub(crate) slowness: lane::Slowness,
    /// How many configured instances the stock should hold.
    pub(crate) warm: usize,
    /// The isolated engine's instance slots (for the refusal when all are
    /// in use).
    pub(crate) isolated_slots: u32,
    /// The compiled-code key of its configured image, when its instances
    /// start from one (see [`image`](crate::plugin::image)).
    pub(crate) image: Option<[u8; 32]>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

/// Sets the deadline for the next call: whole ticks, plus one because the
/// current tick is already partly gone. The call yields at each tick. (The
/// first tick of a call that begins while the ticker is slow comes up to
/// [`SLOW_TICK`](crate::plugin::state::SLOW_TICK) late, once.)
pub(crate) fn arm(store: &mut Store<State>, budget: Duration) {
    let ticks = budget.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64 + 1;
    let state = store.data_mut();
    state.ticks_left = ticks;
    let now = Instant::now();
    state.deadline = now + budget;
    state.cut_off_at = now + crate::plugin::state::wall_cap(budget);
    store.set_epoch_deadline(1);
}

/// Arms a call made from a tokio task: its yields go behind other work.
/// Outside a tokio runtime (a caller's plain `block_on`) a deferred yield
/// would never be woken, so the call yields and resumes at once instead.
pub(crate) fn arm_task_call(store: &mut Store<State>, budget: Duration) {
    arm(store, budget);
    store.data_mut().defer_yield = tokio::runtime::Handle::try_current().is_ok();
}

/// One call of a plugin in progress: its place among the plugin's calls in
/// flight and in its tenant's budget, and the CPU it has spent, charged to
/// the budget when it ends.
pub(crate) struct Call<'a> {
    pub(crate) plugin: &'a Arc<Plugin>,
    pub(crate) _busy: Option<Busy<'a>>,
    pub(crate) spending: Option<Spending>,
    pub(crate) spent: Duration,
}

impl Call<'_> {
    /// How the call's CPU time is measured (see [`lane::Meter::charging`]).
    fn meter(&self) -> lane::Meter {
        lane::Meter::charging(self.spending.is_some())
    }

    /// Ends a call that was refused before it ran, recording why.
    pub(crate) fn refuse(self, error: PluginError) -> PluginError {
        self.plugin.record(&error);
        error
    }

    /// An idle instance, or a fresh one configured within
    /// `configure_timeout` (the connection waits for it).
    pub(crate) async fn checkout(&mut self) -> Result<Instance, PluginError> {
        let idle = crate::sync::lock(&self.plugin.idle).pop();
        if let Some(instance) = idle {
            return Ok(instance);
        }
        let plugin = Arc::clone(self.plugin);
        // A fresh instance per call (no reuse) is part of the call, within
        // its `timeout`; a stock that ran dry waits within `configure_timeout`.
        let making = async move {
            if plugin.reuse_instances {
                plugin.configured_instance(true).await
            } else {
                plugin.instantiate(plugin.timeout, true).await
            }
        };
        let made = lane::run(making, self.plugin.slowness.slow(), self.meter())
            .await
            .and_then(|(made, spent)| {
                self.spent += spent;
                made
            });
        made.inspect_err(|error| self.plugin.record(error))
    }

    /// Runs `body` on `instance` under the plugin's deadline — on this
    /// thread, or in the slow lane if it computes for long (see
    /// [`lane`]) — and returns the instance to the stock, or discards it
    /// after a failure.
    pub(crate) async fn run<R, F>(
        mut self,
        mut instance: Instance,
        body: impl FnOnce(Instance) -> F,
    ) -> Result<R, PluginError>
    where
        F: std::future::Future<Output = (Instance, wasmtime::Result<R>)> + Send + 'static,
        R: Send + 'static,
    {
        arm_task_call(&mut instance.store, self.plugin.timeout);
        let armed = instance.store.data().ticks_left;
        let ran = lane::run(body(instance), self.plugin.slowness.slow(), self.meter()).await;
        let ((instance, result), spent) = ran.inspect_err(|error| self.plugin.record(error))?;
        self.spent += spent;
        self.plugin
            .slowness
            .observe(armed.saturating_sub(instance.store.data().ticks_left));
        self.finish(instance, result)
    }

    /// Returns the instance to the stock after a good call; discards it after
    /// a failed one (its state may be broken) and has a replacement made.
    pub(crate) fn finish<R>(self, instance: Instance, result: wasmtime::Result<R>) -> Result<R, PluginError> {
        let plugin = self.plugin;
        match result {
            Ok(value) if instance.store.data().limiter.nearly_full() => {
                // Retired before a later call runs out of memory; its
                // replacement is configured off the connection path.
                drop(instance);
                plugin.replenish();
                Ok(value)
            }
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
            spending.end(self.spent, &self.plugin.cpu_spent);
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

    /// The contract version its component speaks: `weir:plugin@0.1.0`,
    /// `@0.2.0` or `@0.3.0`.
    pub fn contract(&self) -> &'static str {
        self.version.name()
    }

    /// The capabilities its section grants.
    pub fn grants(&self) -> &[crate::config::Capability] {
        &self.settings.grants
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

    /// Sets the pools the `pools` capability shows it.
    pub fn set_pools(&self, pools: crate::plugin::caps::PoolView) {
        self.caps.pools.store(Arc::new(pools));
    }

    /// Holds the plugin's DNS lookups to its tenant's rate (or none).
    pub fn set_dns_rate(&self, rate: Option<Arc<crate::throttle::Rate>>) {
        self.caps.dns_rate.store(rate);
    }

    /// Puts the plugin under a tenant's budget (or none).
    pub fn set_budget(&self, budget: Option<Arc<Budget>>) {
        self.budget.store(budget);
    }

    /// Counts the series its `metrics` capability makes towards its
    /// tenant's `max_metric_series` (or no one's).
    pub fn set_metric_series(&self, series: Option<Arc<crate::metrics::own::TenantSeries>>) {
        if let Some(metrics) = &self.caps.metrics {
            metrics.set_tenant(series);
        }
    }

    /// Asks the plugin to route a connection.
    pub async fn route(self: &Arc<Self>, conn: &Arc<wit::Connection>) -> Result<wit::Decision, PluginError> {
        let mut call = self.begin()?;
        let instance = call.checkout().await?;
        let conn = Arc::clone(conn);
        call.run(instance, |mut instance| async move {
            let Instance { store, exports } = &mut instance;
            let result = exports.route(store, &conn).await;
            (instance, result)
        })
        .await
    }

    /// Asks the plugin whether to admit an authenticated peer.
    pub async fn admit(
        self: &Arc<Self>,
        conn: &Arc<wit::Connection>,
        side: wit::Side,
        peer: &Arc<wit::Peer>,
    ) -> Result<wit::Verdict, PluginError> {
        let mut call = self.begin()?;
        let instance = call.checkout().await?;
        let (conn, peer) = (Arc::clone(conn), Arc::clone(peer));
        call.run(instance, |mut instance| async move {
            let Instance { store, exports } = &mut instance;
            let result = exports.admit(store, &conn, side, &peer).await;
            (instance, result)
        })
        .await
    }

    /// Takes a place for a call: within the plugin's calls in flight and
    /// its tenant's budget, or refused without running.
    pub(crate) fn begin(self: &Arc<Self>) -> Result<Call<'_>, PluginError> {
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
    pub(crate) async fn configured_instance(&self, defer_yield: bool) -> Result<Instance, PluginError> {
        self.instantiate(self.configure_timeout, defer_yield)
            .await
            .map_err(|e| match e {
                PluginError::Timeout(budget) => PluginError::ConfigureTimeout(budget),
                other => other,
            })
    }

    /// A store for one instance: its WASI context, memory cap and epoch
    /// deadline (armed for `budget`); `defer_yield` says whether it runs in
    /// a tokio task (see [`State`]).
    pub(crate) fn new_store(&self, budget: Duration, defer_yield: bool) -> Store<State> {
        let state = State {
            plugin: Arc::clone(&self.name),
            log: Arc::clone(&self.log),
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: MemoryCap {
                max_bytes: self.max_memory_mib as usize * 1024 * 1024,
                refused: false,
                grown_to: 0,
                configured_at: 0,
            },
            ticks_left: 0,
            deadline: Instant::now(),
            cut_off_at: Instant::now(),
            defer_yield,
            caps: Arc::clone(&self.caps),
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        // At every tick the call yields to the scheduler, until its ticks
        // are spent, or the wall clock passes its cap; then it is
        // interrupted.
        store.epoch_deadline_callback(|mut store| {
            let state = store.data_mut();
            if state.ticks_left == 0 || Instant::now() >= state.cut_off_at {
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
        store
    }

    /// Creates and configures a fresh instance, each step within `budget`;
    /// `defer_yield` says whether it runs in a tokio task (see [`State`]).
    /// An instance of a configured image starts configured.
    pub(crate) async fn instantiate(&self, budget: Duration, defer_yield: bool) -> Result<Instance, PluginError> {
        let _busy = self.ticker.busy();
        let mut store = self.new_store(budget, defer_yield);
        let exports = self
            .pre
            .instantiate(&mut store)
            .await
            .map_err(|e| self.classify(e, &store, budget))?;
        if self.image.is_none() {
            arm(&mut store, budget);
            exports
                .configure(&mut store, &self.config)
                .await
                .map_err(|e| self.classify(e, &store, budget))?
                .map_err(PluginError::Configure)?;
        }
        let limiter = &mut store.data_mut().limiter;
        limiter.configured_at = limiter.grown_to;
        Ok(Instance::new(store, exports))
    }

    /// Refills the stock of configured instances in the background, one at
    /// a time, after a failed call discarded one. Off the connection path,
    /// and under `configure_timeout`, so a plugin whose `configure` is slower
    /// than its call deadline recovers from a trap.
    pub(crate) fn replenish(self: &Arc<Self>) {
        if self.warm == 0 || self.replenishing.swap(true, Ordering::AcqRel) {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            self.replenishing.store(false, Ordering::Release);
            return;
        }
        let plugin = Arc::clone(self);
        let refill = async move {
            while plugin.idle_instances() < plugin.warm {
                let budget = plugin.budget.load_full();
                let meter = lane::Meter::charging(budget.is_some());
                let (made, spent) = lane::Timed::new(plugin.configured_instance(true), meter).await;
                if let Some(budget) = budget {
                    budget.charge(spent, &plugin.cpu_spent);
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
        };
        lane::spawn(refill);
    }

    /// Whether to log this failure of a call: one a second is, with how
    /// many there were since (this one included); the rest are only counted
    /// (metrics and the connection log line say each), so a storm of
    /// failures, or of refusals over budget, cannot flood the log.
    pub fn report_failure(&self) -> Option<u64> {
        crate::sync::lock(&self.failure_reports).event()
    }

    /// Remembers a call's failure for the admin API.
    pub(crate) fn record(&self, error: &PluginError) {
        let at = crate::clock::unix_now();
        *crate::sync::lock(&self.last_error) = Some((at, error.to_string()));
    }

    pub(crate) fn put_back(&self, instance: Instance) {
        if !self.reuse_instances {
            return;
        }
        let mut idle = crate::sync::lock(&self.idle);
        if idle.len() < MAX_IDLE_INSTANCES {
            idle.push(instance);
        }
    }

    pub(crate) fn classify(&self, error: wasmtime::Error, store: &Store<State>, budget: Duration) -> PluginError {
        if store.data().limiter.refused {
            return PluginError::OutOfMemory(self.max_memory_mib);
        }
        if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
            return PluginError::Timeout(budget);
        }
        if error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
            return PluginError::OverBudget(format!(
                "all {} isolated instance slots ([limits] isolated_instances) are in use",
                self.isolated_slots
            ));
        }
        PluginError::Trap(format!("{error:#}"))
    }
}
