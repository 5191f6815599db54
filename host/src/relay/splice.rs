//! Zero-copy relaying with `splice(2)`: socket → pipe → socket, through
//! rustix's safe wrappers.
//!
//! A direction holds a pipe only for a burst: from the moment its socket
//! has data until a read would wait and the pipe is drained, so an idle
//! connection holds none. Pipes are pooled and reused; one that could
//! still hold bytes (an error mid-burst, a connection closed mid-burst)
//! is closed instead. At most [`max_pipes`] pipes are open at once, in
//! use or pooled; a burst that finds none free (or whose pipe the system
//! refuses, out of descriptors) is copied instead, so splicing never
//! costs a connection.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{Activity, SocketPermit};

/// Splice is built in on Linux.
pub const AVAILABLE: bool = true;
/// Most bytes moved per splice call: the capacity each pipe is given.
const CHUNK: usize = 256 * 1024;
/// Most idle pipes kept for reuse.
const POOL_MAX: usize = 1024;

/// Pipes open now, in use or pooled.
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// Most pipes open at once; see [`set_max_pipes`].
static MAX: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Bursts copied because no pipe could be had (exported as
/// `weir_splice_pipe_refusals_total`).
pub static PIPE_REFUSALS: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
    std::sync::LazyLock::new(Default::default);

/// A pipe's read and write ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// Sets the most pipes open at once (0: none; every burst is copied).
/// Pooled pipes beyond a lowered bound are closed at once; pipes in use
/// beyond it are closed as their bursts end.
pub fn set_max_pipes(max: usize) {
    MAX.store(max, Ordering::Relaxed);
    let mut pool = crate::sync::lock(&POOL);
    let busy = OPEN.load(Ordering::Relaxed).saturating_sub(pool.len());
    let keep = max.saturating_sub(busy).min(pool.len());
    let surplus = pool.split_off(keep);
    drop(pool);
    drop(surplus);
}

/// Pipes open now (in use or pooled), and of those, in use.
pub fn pipes() -> (usize, usize) {
    let pooled = crate::sync::lock(&POOL).len();
    let open = OPEN.load(Ordering::Relaxed);
    (open, open.saturating_sub(pooled))
}

/// A pooled pipe, or a new one within the bound; `None` when neither.
fn take_pipe() -> Option<Pipe> {
    if let Some(pipe) = crate::sync::lock(&POOL).pop() {
        return Some(pipe);
    }
    let max = MAX.load(Ordering::Relaxed);
    if OPEN.fetch_add(1, Ordering::Relaxed) >= max {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        PIPE_REFUSALS.inc();
        return None;
    }
    match pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) {
        Ok((read, write)) => {
            // A larger pipe moves more per call; when the system refuses
            // (a user past fs.pipe-user-pages-soft), the default capacity
            // still works.
            let _ = rustix::pipe::fcntl_setpipe_size(&write, CHUNK);
            Some(Pipe { read, write })
        }
        Err(_) => {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            PIPE_REFUSALS.inc();
            None
        }
    }
}

/// Returns an empty pipe to the pool, or closes it when the pool is
/// full or the bound has been lowered below the pipes open.
fn give_back(pipe: Pipe) {
    let mut pool = crate::sync::lock(&POOL);
    if pool.len() < POOL_MAX && OPEN.load(Ordering::Relaxed) <= MAX.load(Ordering::Relaxed) {
        pool.push(pipe);
    }
}

/// Splices (or, without a pipe, copies) from `reader` to `writer` until
/// EOF, a burst at a time: a pipe is taken once `reader` has data and
/// given back empty once a read would wait. One function, not two: a
/// burst's own future would copy every borrow into each connection's
/// task.
pub async fn pump(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    count: &AtomicU64,
    spliced: &AtomicU64,
    activity: &Activity,
    tenant: Option<&SocketPermit>,
) -> io::Result<()> {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        reader.readable().await?;
        // A tenant's pipe is two of its descriptors while the burst
        // lasts (dropped with the pipe, at the end of this iteration).
        let charged = tenant.map(SocketPermit::pipe);
        let pipe = match charged {
            Some(None) => None,
            _ => take_pipe(),
        };
        let Some(pipe) = pipe else {
            if super::copy_burst(reader, writer, None, count, activity).await? {
                return Ok(());
            }
            continue;
        };
        // From here on an error leaves the pipe maybe holding bytes: it
        // is dropped (closed) with the `?`, never pooled.
        loop {
            // The pipe is empty here: fill it from the socket...
            let source = reader.as_ref();
            let filled = match source.try_io(Interest::READABLE, || {
                splice(source.as_fd(), None, pipe.write.as_fd(), None, CHUNK, flags).map_err(io::Error::from)
            }) {
                Ok(0) => {
                    give_back(pipe);
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    give_back(pipe);
                    break;
                }
                Err(e) => return Err(e),
            };
            // ...then drain it into the other socket.
            let mut pending = filled;
            while pending > 0 {
                let sink = writer.as_ref();
                sink.writable().await?;
                match sink.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_fd(), None, sink.as_fd(), None, pending, flags).map_err(io::Error::from)
                }) {
                    Ok(n) => pending -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            count.fetch_add(filled as u64, Ordering::Relaxed);
            spliced.fetch_add(filled as u64, Ordering::Relaxed);
            activity.touch();
        }
    }
}
