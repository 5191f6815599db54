//! Where a plugin call runs.
//!
//! A call starts on the thread of the task that makes it: most calls take
//! about a microsecond, and handing each to another thread would cost more
//! than the call. One still running when it first yields (at an epoch
//! tick) moves to the *slow lane*: threads of their own at the lowest CPU
//! priority (nice 19), so a plugin that computes for long delays the other
//! connections of a worker by one slice at most, and the kernel runs every
//! worker's ready work before it. A plugin one of whose calls went on
//! computing through [`SLOW_TICKS`] ticks starts its calls in the slow lane
//! for the next [`SLOW_FOR`], so it cannot come back to the workers with a
//! call that computes a slice each time. (One tick is not enough to tell: a
//! call of a microsecond sees one if it is preempted, or straddles a tick.)

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::plugin::PluginError;

/// How long a plugin whose call computed through [`SLOW_TICKS`] ticks stays
/// in the slow lane.
pub(crate) const SLOW_FOR: Duration = Duration::from_secs(10);

/// The ticks a call sees that make its plugin slow: it computed for at
/// least two whole ticks (0.5 ms) after its first.
pub(crate) const SLOW_TICKS: u64 = 3;

/// The nice value of the slow lane's threads: the lowest priority.
const SLOW_LANE_NICE: i32 = 19;

/// Whether a plugin's calls start in the slow lane: until when (in
/// milliseconds of [`since_start`]; 0: they do not).
#[derive(Debug, Default)]
pub(crate) struct Slowness(AtomicU64);

impl Slowness {
    /// Whether calls start in the slow lane now.
    pub(crate) fn slow(&self) -> bool {
        let until = self.0.load(Ordering::Relaxed);
        until != 0 && since_start() < until
    }

    /// Records how many ticks a call saw: [`SLOW_TICKS`] send the plugin's
    /// calls to the slow lane for [`SLOW_FOR`].
    pub(crate) fn observe(&self, ticks: u64) {
        if ticks >= SLOW_TICKS {
            let until = since_start() + SLOW_FOR.as_millis() as u64;
            self.0.fetch_max(until, Ordering::Relaxed);
        }
    }
}

/// Milliseconds since the first use (at least 1).
fn since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    start.elapsed().as_millis() as u64 + 1
}

/// Runs `work` — on this thread until it first yields, then on the slow
/// lane; from the start on the slow lane when `slow` — and returns what it
/// returned with the CPU time `meter` measured while polling it (the plugin
/// computing, wherever it ran). Dropping the returned future cancels the
/// work.
pub(crate) fn run<F>(work: F, slow: bool, meter: Meter) -> Lane<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let timed = Timed::new(work, meter);
    if slow && let Some(lane) = lane() {
        return Lane::Moved(Moved(lane.spawn(timed)));
    }
    Lane::Here(Some(timed))
}

/// A call in progress: polled here until it first yields, then moved.
pub(crate) enum Lane<F: Future> {
    /// Still on the caller's thread (taken when moved).
    Here(Option<Timed<F>>),
    /// In the slow lane.
    Moved(Moved<(F::Output, Duration)>),
}

impl<F> Future for Lane<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = Result<(F::Output, Duration), PluginError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is Unpin (the work itself is boxed).
        let this = &mut *self;
        if let Lane::Here(here) = this {
            let Some(timed) = here.as_mut() else {
                return Poll::Ready(Err(PluginError::Trap("polled after it finished".into())));
            };
            match Pin::new(timed).poll(cx) {
                Poll::Ready(done) => {
                    *here = None;
                    return Poll::Ready(Ok(done));
                }
                Poll::Pending => {
                    let Some(lane) = lane() else { return Poll::Pending };
                    let Some(timed) = here.take() else { return Poll::Pending };
                    *this = Lane::Moved(Moved(lane.spawn(timed)));
                }
            }
        }
        match this {
            Lane::Moved(moved) => Pin::new(moved).poll(cx),
            Lane::Here(_) => Poll::Pending,
        }
    }
}

/// Runs `work` in the background on the slow lane (on the current runtime
/// when there is no slow lane); false outside any runtime.
pub(crate) fn spawn(work: impl Future<Output = ()> + Send + 'static) -> bool {
    if let Some(lane) = lane() {
        lane.spawn(work);
        return true;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(work);
            true
        }
        Err(_) => false,
    }
}

/// The slow lane's runtime, started at its first use; none when its
/// threads cannot be started (then long calls stay where they began, and
/// a warning says so once).
fn lane() -> Option<&'static tokio::runtime::Handle> {
    static LANE: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    LANE.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("weir-plugin-slow")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()
            .inspect_err(|error| {
                tracing::warn!(%error, "cannot start the slow lane for plugin calls: long calls stay on the workers");
            })
            .ok()
    })
    .as_ref()
    .map(tokio::runtime::Runtime::handle)
}

/// Gives the calling thread the lowest CPU priority. On Linux the nice
/// value is a thread's own; a thread cannot raise it again without
/// privileges, so neither can a plugin running on it.
pub(crate) fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(None, SLOW_LANE_NICE) {
        tracing::warn!(%error, "cannot lower the slow lane's CPU priority");
    }
}

/// wasmtime compiles a component's functions in parallel on rayon's global
/// pool: its threads are made here, at the lowest CPU priority (as the slow
/// lane's), so that compiling a component — a tenant's republished plugin,
/// say — takes only the CPU the connections leave. Once per process; a pool
/// someone else built first is kept as it is.
pub(crate) fn compile_at_low_priority() {
    static POOL: std::sync::Once = std::sync::Once::new();
    POOL.call_once(|| {
        let built = rayon::ThreadPoolBuilder::new()
            .thread_name(|n| format!("weir-compile-{n}"))
            .start_handler(|_| lower_priority())
            .build_global();
        if let Err(error) = built {
            tracing::debug!(%error, "compiling on a thread pool built before weir's");
        }
    });
}

/// How a call's CPU time is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Meter {
    /// Not at all (no budget is charged with it): zero.
    Off,
    /// With the polling thread's CPU clock, so time the thread spent
    /// preempted, throttled or stolen by the hypervisor mid-call is not
    /// charged (a wall clock charged a call frozen for 30 ms with 30 ms, and
    /// emptied a busy but harmless tenant's budget on a loaded machine).
    /// Two clock reads a poll, about 0.2 µs each.
    ThreadCpu,
}

impl Meter {
    /// With the thread's CPU clock when a tenant's budget is charged with
    /// what is measured, else not at all.
    pub(crate) fn charging(budget: bool) -> Meter {
        if budget { Meter::ThreadCpu } else { Meter::Off }
    }

    /// A reading, to subtract from a later one on the same thread.
    fn read(self) -> Duration {
        match self {
            Meter::Off => Duration::ZERO,
            Meter::ThreadCpu => thread_cpu(),
        }
    }
}

/// The calling thread's CPU time so far.
#[cfg(unix)]
pub(crate) fn thread_cpu() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(now.tv_sec.max(0) as u64, now.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// Where threads have no CPU clock of their own: the wall clock.
#[cfg(not(unix))]
pub(crate) fn thread_cpu() -> Duration {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// A future and the CPU time spent polling it.
pub(crate) struct Timed<F> {
    inner: Pin<Box<F>>,
    meter: Meter,
    spent: Duration,
}

impl<F: Future> Timed<F> {
    pub(crate) fn new(inner: F, meter: Meter) -> Self {
        Timed {
            inner: Box::pin(inner),
            meter,
            spent: Duration::ZERO,
        }
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = (F::Output, Duration);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let started = self.meter.read();
        let polled = self.inner.as_mut().poll(cx);
        let spent = self.meter.read().saturating_sub(started);
        self.spent += spent;
        polled.map(|done| (done, self.spent))
    }
}

/// Work moved to the slow lane, cancelled when dropped.
pub(crate) struct Moved<T>(tokio::task::JoinHandle<T>);

impl<T> Future for Moved<T> {
    type Output = Result<T, PluginError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| match joined {
            Ok(done) => Ok(done),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(PluginError::Trap("the call was cancelled in the slow lane".into())),
        })
    }
}

impl<T> Drop for Moved<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that is pending once, then says on which thread it ended.
    async fn yields_once() -> std::thread::ThreadId {
        tokio::task::yield_now().await;
        std::thread::current().id()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn work_done_at_once_stays_and_work_that_yields_moves() {
        let here = std::thread::current().id();
        let (stayed, _) = run(async { std::thread::current().id() }, false, Meter::Off)
            .await
            .expect("ran");
        assert_eq!(stayed, here);
        let (moved, _) = run(yields_once(), false, Meter::Off).await.expect("ran");
        assert_ne!(moved, here, "work that yielded went on elsewhere");
        let (started_there, _) = run(async { std::thread::current().id() }, true, Meter::Off)
            .await
            .expect("ran");
        assert_ne!(started_there, here, "slow work starts in the slow lane");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_slow_lane_runs_at_the_lowest_priority() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let nice = runtime.block_on(async {
            let (nice, _) = run(async { rustix::process::getpriority_process(None) }, true, Meter::Off)
                .await
                .expect("ran");
            nice
        });
        assert_eq!(nice.expect("getpriority"), SLOW_LANE_NICE);
    }

    #[test]
    fn a_call_computing_through_ticks_sends_its_plugin_to_the_slow_lane() {
        let slowness = Slowness::default();
        assert!(!slowness.slow());
        slowness.observe(0);
        slowness.observe(SLOW_TICKS - 1);
        assert!(!slowness.slow(), "a call that saw fewer ticks leaves it on the workers");
        slowness.observe(SLOW_TICKS);
        assert!(slowness.slow());
    }

    #[test]
    fn the_meter_charges_computing_and_not_waiting() {
        fn spin_for(wall: Duration) {
            let start = Instant::now();
            while start.elapsed() < wall {
                std::hint::black_box(0u64);
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let (_, asleep) = runtime.block_on(Timed::new(
            async { std::thread::sleep(Duration::from_millis(40)) },
            Meter::ThreadCpu,
        ));
        assert!(
            asleep < Duration::from_millis(10),
            "a poll that waited 40 ms was charged {asleep:?}"
        );
        let (_, computing) = runtime.block_on(Timed::new(
            async { spin_for(Duration::from_millis(40)) },
            Meter::ThreadCpu,
        ));
        // At least half of it, should another process share the CPU.
        assert!(
            computing >= Duration::from_millis(20),
            "40 ms of computing was charged {computing:?}"
        );
        let (_, off) = runtime.block_on(Timed::new(async { spin_for(Duration::from_millis(5)) }, Meter::Off));
        assert_eq!(off, Duration::ZERO);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dropping_the_caller_cancels_the_moved_work() {
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        struct Tell(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Tell {
            fn drop(&mut self) {
                let _ = self.0.take().map(|tx| tx.send(()));
            }
        }
        let tell = Tell(Some(dropped_tx));
        let forever = async move {
            let _tell = tell;
            std::future::pending::<()>().await;
        };
        let running = run(forever, true, Meter::Off);
        let _ = tokio::time::timeout(Duration::from_millis(50), running).await;
        tokio::time::timeout(Duration::from_secs(10), dropped_rx)
            .await
            .expect("the moved work was dropped")
            .expect("told");
    }
}
