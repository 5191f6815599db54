//! What a plugin's store holds: its WASI context, the host functions it may
//! call (`log`, bounded by a per-plugin log budget), its memory cap, and the
//! epoch ticker that interrupts and yields long calls.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::plugin::EPOCH_TICK;
use crate::throttle::Bucket;
use crate::wit;

/// Longest log line a plugin may write; longer ones are cut.
pub(crate) const MAX_LOG_LINE: usize = 4096;

/// Bytes of log a plugin may write a second (over all its instances), and
/// at once; lines beyond are dropped and counted.
pub(crate) const LOG_BYTES_PER_SECOND: f64 = 32.0 * 1024.0;

pub(crate) const LOG_BURST_BYTES: f64 = 64.0 * 1024.0;

/// A plugin's allowance of log volume: a bucket of bytes refilled at
/// [`LOG_BYTES_PER_SECOND`]. A plugin that logs in a loop writes at most
/// that much; what it drops is counted in `weir_plugin_log_dropped_total`
/// and said in the next line it may write.
#[derive(Debug)]
pub(crate) struct LogBudget(Mutex<(Bucket, u64)>);

impl LogBudget {
    pub(crate) fn new() -> LogBudget {
        LogBudget(Mutex::new((Bucket::full(LOG_BURST_BYTES), 0)))
    }

    /// Takes `bytes` from the bucket: `Some(lines dropped since the last
    /// line written)` if they fit, `None` (counted) if not.
    pub(crate) fn take(&self, bytes: usize) -> Option<u64> {
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

/// The per-store state the host functions see.
pub(crate) struct State {
    pub(crate) plugin: Arc<str>,
    pub(crate) log: Arc<LogBudget>,
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryCap,
    /// Epoch ticks the running call may still observe before it is
    /// interrupted; the call yields at each one.
    pub(crate) ticks_left: u64,
    /// Whether the call runs in a tokio task, where a yield waits until the
    /// worker has polled for I/O and run every task that was ready (a slow
    /// plugin call then goes last, behind other connections). Calls under a
    /// plain `block_on` (loading) yield and resume at once instead: a
    /// deferred wake there would wait for a scheduler that is blocked.
    pub(crate) defer_yield: bool,
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
                crate::metrics::METRICS.plugin_log_dropped(plugin);
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
pub(crate) struct MemoryCap {
    pub(crate) max_bytes: usize,
    pub(crate) refused: bool,
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
pub(crate) const IDLE_TICKS_BEFORE_PARKING: u32 = 2;

/// The clock of plugin deadlines: a thread that advances the engines' epoch
/// every [`EPOCH_TICK`] while any plugin call may be running, and sleeps
/// otherwise.
///
/// No call may run unticked (its deadline would never come): a call first
/// counts itself in `in_flight`, then wakes the thread if `parked` is set; the
/// thread first sets `parked`, then parks only if `in_flight` is still zero.
/// With sequentially consistent ordering one of the two always sees the other.
pub(crate) struct Ticker {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) parked: AtomicBool,
    pub(crate) stop: AtomicBool,
    pub(crate) thread: OnceLock<std::thread::Thread>,
}

impl Ticker {
    pub(crate) fn run(&self, engines: &[Engine]) {
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
            for engine in engines {
                engine.increment_epoch();
            }
        }
    }

    /// Marks a plugin call as running until the guard drops.
    pub(crate) fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.wake();
        }
        Busy(self)
    }

    pub(crate) fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

/// A running plugin call, as the ticker counts it.
pub(crate) struct Busy<'a>(&'a Ticker);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
