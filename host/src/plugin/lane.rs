//! Where a plugin call runs.
//!
//! A call starts on the thread of the task that makes it: most calls take
//! about a microsecond, and handing each to another thread would cost more
//! than the call. One still running when it first yields (at an epoch
//! tick) moves to the *slow lane*: threads of their own at the lowest CPU
//! priority (nice 19), so a plugin that computes for long delays the other
//! connections of a worker by one slice at most, and the kernel runs every
//! worker's ready work before it. A plugin one of whose calls computed for
//! longer than a tick starts its calls in the slow lane for the next
//! [`SLOW_FOR`], so it cannot come back to the workers with a call that
//! computes a slice each time.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::plugin::PluginError;

/// How long a plugin that computed for longer than a tick stays in the slow
/// lane.
pub(crate) const SLOW_FOR: Duration = Duration::from_secs(10);

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

    /// Records a call's CPU time: one longer than a tick sends the
    /// plugin's calls to the slow lane for [`SLOW_FOR`].
    pub(crate) fn observe(&self, spent: Duration) {
        if spent > crate::plugin::EPOCH_TICK {
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
/// returned with the time spent polling it (the plugin computing, wherever
/// it ran). Dropping the returned future cancels the work.
pub(crate) async fn run<F>(work: F, slow: bool) -> Result<(F::Output, Duration), PluginError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut work = Timed::new(work);
    if !slow && let Poll::Ready(done) = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut work).poll(cx))).await {
        return Ok(done);
    }
    match lane() {
        Some(lane) => Moved(lane.spawn(work)).await,
        None => Ok(work.await),
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
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(None, SLOW_LANE_NICE) {
        tracing::warn!(%error, "cannot lower the slow lane's CPU priority");
    }
}

/// A future and the time spent polling it.
pub(crate) struct Timed<F> {
    inner: Pin<Box<F>>,
    spent: Duration,
}

impl<F: Future> Timed<F> {
    pub(crate) fn new(inner: F) -> Self {
        Timed {
            inner: Box::pin(inner),
            spent: Duration::ZERO,
        }
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = (F::Output, Duration);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let started = Instant::now();
        let polled = self.inner.as_mut().poll(cx);
        self.spent += started.elapsed();
        polled.map(|done| (done, self.spent))
    }
}

/// Work moved to the slow lane, cancelled when dropped.
struct Moved<T>(tokio::task::JoinHandle<T>);

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
        let (stayed, _) = run(async { std::thread::current().id() }, false).await.expect("ran");
        assert_eq!(stayed, here);
        let (moved, _) = run(yields_once(), false).await.expect("ran");
        assert_ne!(moved, here, "work that yielded went on elsewhere");
        let (started_there, _) = run(async { std::thread::current().id() }, true).await.expect("ran");
        assert_ne!(started_there, here, "slow work starts in the slow lane");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_slow_lane_runs_at_the_lowest_priority() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let nice = runtime.block_on(async {
            let (nice, _) = run(async { rustix::process::getpriority_process(None) }, true)
                .await
                .expect("ran");
            nice
        });
        assert_eq!(nice.expect("getpriority"), SLOW_LANE_NICE);
    }

    #[test]
    fn a_call_longer_than_a_tick_sends_its_plugin_to_the_slow_lane() {
        let slowness = Slowness::default();
        assert!(!slowness.slow());
        slowness.observe(crate::plugin::EPOCH_TICK / 2);
        assert!(!slowness.slow(), "a short call leaves it on the workers");
        slowness.observe(crate::plugin::EPOCH_TICK * 2);
        assert!(slowness.slow());
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
        let running = run(forever, true);
        let _ = tokio::time::timeout(Duration::from_millis(50), running).await;
        tokio::time::timeout(Duration::from_secs(10), dropped_rx)
            .await
            .expect("the moved work was dropped")
            .expect("told");
    }
}
