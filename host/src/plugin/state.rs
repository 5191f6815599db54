//! What a plugin's store holds: its WASI context, the host functions it may
//! call (`log`, bounded by a per-plugin log budget), its memory cap, and the
//! epoch ticker that interrupts and yields long calls.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

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
    /// When the running call's deadline passes, by the wall clock: what a
    /// DNS lookup may wait is cut to it (waiting runs no wasm, so no tick
    /// is spent).
    pub(crate) deadline: std::time::Instant,
    /// When the running call is cut off however few ticks it has seen
    /// ([`wall_cap`]): a call that computes in the slow lane of a machine
    /// kept busy at a higher priority sees ticks only while it runs, and
    /// would otherwise hold its connection and instance for minutes.
    pub(crate) cut_off_at: std::time::Instant,
    /// Whether the call runs in a tokio task, where a yield waits until the
    /// worker has polled for I/O and run every task that was ready (a slow
    /// plugin call then goes last, behind other connections). Calls under a
    /// plain `block_on` (loading) yield and resume at once instead: a
    /// deferred wake there would wait for a scheduler that is blocked.
    pub(crate) defer_yield: bool,
    /// What the plugin's grants give it.
    pub(crate) caps: Arc<crate::plugin::caps::Capabilities>,
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
    /// The most linear memory it has allowed (the largest of its memories).
    pub(crate) grown_to: usize,
    /// `grown_to` once the instance was configured.
    pub(crate) configured_at: usize,
}

impl MemoryCap {
    /// Whether calls have spent half the room the instance had left after
    /// `configure`: a guest whose memory only grows (a runtime that leaks a
    /// little per call, or does not collect before it grows) is retired
    /// before a call of its runs out, and one that does not grow never is.
    pub(crate) fn nearly_full(&self) -> bool {
        let room = self.max_bytes.saturating_sub(self.configured_at);
        self.grown_to > self.configured_at + room / 2
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_bytes;
        self.refused |= !allowed;
        if allowed {
            self.grown_to = self.grown_to.max(desired);
        }
        Ok(allowed)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 16)
    }
}

/// How often the epoch advances while no call is seen running: a call that
/// begins meanwhile wakes no thread (a wake per call cost a context switch
/// per connection: 255 µs of CPU per passed-through connection on one core
/// with it, 225 without), and gets its first tick within this long.
pub(crate) const SLOW_TICK: Duration = Duration::from_millis(5);

/// Fast ticks ([`EPOCH_TICK`]) with no call running after which the ticker
/// goes back to [`SLOW_TICK`]s.
const FAST_TICKS_AFTER_LAST_CALL: u32 = 4;

/// Slow ticks in which no call began after which the ticker sleeps until
/// the next call (a second): an idle gateway has no thread waking.
const QUIET_TICKS_BEFORE_PARKING: u32 = 200;

/// The clock of plugin deadlines: a thread that advances the engines' epoch
/// every [`EPOCH_TICK`] while it sees a plugin call running, every
/// [`SLOW_TICK`] while calls come and go between its ticks, and not at all
/// once none has begun for a while. A call yields at each tick and is
/// interrupted once it has seen as many as its deadline has
/// ([`State::ticks_left`]).
///
/// No call may run unticked (its deadline would never come): a call first
/// counts itself in `in_flight` and sets `called`, then wakes the thread if
/// `parked` is set; the thread first sets `parked`, then parks only if
/// `in_flight` is still zero and `called` unset. With sequentially
/// consistent ordering one of the two always sees the other.
#[derive(Default)]
pub(crate) struct Ticker {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) called: AtomicBool,
    pub(crate) parked: AtomicBool,
    pub(crate) stop: AtomicBool,
    pub(crate) thread: OnceLock<std::thread::Thread>,
}

impl Ticker {
    pub(crate) fn run(&self, engines: &[Engine]) {
        let (mut fast, mut idle_fast, mut quiet) = (false, 0, 0);
        while !self.stop.load(Ordering::SeqCst) {
            let called = self.called.swap(false, Ordering::SeqCst);
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                (fast, idle_fast, quiet) = (true, 0, 0);
            } else if fast {
                idle_fast += 1;
                fast = idle_fast < FAST_TICKS_AFTER_LAST_CALL;
            } else if called {
                quiet = 0;
            } else if quiet >= QUIET_TICKS_BEFORE_PARKING {
                self.parked.store(true, Ordering::SeqCst);
                if self.in_flight.load(Ordering::SeqCst) == 0
                    && !self.called.load(Ordering::SeqCst)
                    && !self.stop.load(Ordering::SeqCst)
                {
                    std::thread::park();
                }
                self.parked.store(false, Ordering::SeqCst);
                quiet = 0;
                continue;
            } else {
                quiet += 1;
            }
            std::thread::sleep(if fast { EPOCH_TICK } else { SLOW_TICK });
            for engine in engines {
                engine.increment_epoch();
            }
        }
    }

    /// Marks a plugin call as running until the guard drops.
    pub(crate) fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if !self.called.load(Ordering::Relaxed) {
            self.called.store(true, Ordering::SeqCst);
        }
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

/// How long a call with deadline `timeout` may take by the wall clock,
/// whatever it computed: four times its deadline, and at least a second
/// more. A fast call that is preempted is not cut off for it unless it is
/// frozen for over a second; a call starved at the lowest priority is, in
/// bounded time.
pub(crate) fn wall_cap(timeout: Duration) -> Duration {
    (timeout * 4).max(timeout + Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (at most 10 s) until `check` holds.
    fn eventually(what: &str, check: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !check() {
            assert!(started.elapsed() < Duration::from_secs(10), "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Without calls the ticker parks; a call wakes it and is ticked while
    /// it runs, however it began; it parks again once calls stop.
    #[test]
    fn the_ticker_ticks_running_calls_and_parks_when_none_come() {
        let engine = Engine::new(wasmtime::Config::new().epoch_interruption(true)).expect("engine");
        let ticker = Arc::new(Ticker::default());
        let running = Arc::clone(&ticker);
        let engines = vec![engine.clone()];
        let thread = std::thread::spawn(move || running.run(&engines));
        let _ = ticker.thread.set(thread.thread().clone());
        eventually("parked with no call", || ticker.parked.load(Ordering::SeqCst));
        // An epoch counter of our own: a store's deadline passes once the
        // engine has ticked.
        let mut store = wasmtime::Store::new(&engine, ());
        store.set_epoch_deadline(1);
        {
            let _call = ticker.busy();
            eventually("woken by the call", || !ticker.parked.load(Ordering::SeqCst));
            // `(module (func (export "f")))`: its entry checks the epoch.
            let wasm = [
                0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x04, 0x01, 0x60, 0x00, 0x00, 0x03, 0x02, 0x01,
                0x00, 0x07, 0x05, 0x01, 0x01, b'f', 0x00, 0x00, 0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b,
            ];
            let module = wasmtime::Module::new(&engine, wasm).expect("module");
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).expect("instance");
            let f = instance.get_typed_func::<(), ()>(&mut store, "f").expect("f");
            let ticked = |store: &mut wasmtime::Store<()>| f.call(&mut *store, ()).is_err();
            let started = std::time::Instant::now();
            while !ticked(&mut store) {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "a running call was never ticked"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        eventually("parked again after the last call", || {
            ticker.parked.load(Ordering::SeqCst)
        });
        ticker.stop.store(true, Ordering::SeqCst);
        ticker.wake();
        thread.join().expect("the ticker ends");
    }
}
