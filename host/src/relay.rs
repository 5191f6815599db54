//! Moves bytes both ways between a client and an upstream until both
//! directions have ended, propagating half-close: when one side stops
//! sending (FIN), the other side's write half is shut down and the opposite
//! direction keeps flowing, for as long as it stays busy: once either side has
//! sent FIN, the half-close timeout (usually shorter) replaces the idle
//! timeout, so half-closed connections cannot pile up. A connection with no
//! bytes either way for the idle timeout is closed; an error in either
//! direction closes both.
//!
//! Each direction starts with a userspace copy loop. On Linux, with
//! [`RelayMode::Auto`] once a direction has carried [`SPLICE_AFTER`] bytes
//! (or from the first byte with [`RelayMode::Splice`]), it moves to
//! `splice(2)` through a pipe, so the payload never enters userspace; short
//! exchanges never pay for the pipe. The copy loop is the default, the
//! portable fallback and the reference in tests.

use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub use crate::config::RelayMode;
pub use splice::{PIPE_REFUSALS, pipes, set_max_pipes};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;

use crate::door::SocketPermit;

/// Bytes per read in the copy loop.
const BUFFER_SIZE: usize = 16 * 1024;

/// Bytes a direction carries by copying before it switches to splice in
/// [`RelayMode::Auto`]: below this the pipe's setup costs more than it saves.
pub const SPLICE_AFTER: u64 = 64 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished sending.
    Closed,
    /// No byte moved for the idle timeout.
    Idle,
    /// One side had finished, and the other moved no byte for the
    /// half-close timeout.
    HalfCloseTimeout,
}

/// What a relay moved.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Bytes from the client to the upstream.
    pub client_to_upstream: AtomicU64,
    /// Bytes from the upstream to the client.
    pub upstream_to_client: AtomicU64,
    /// Of both, the bytes moved by `splice(2)` rather than copied.
    pub spliced: AtomicU64,
}

/// The shared clock of one relay's idle timeout.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Either side has sent FIN.
    half_closed: AtomicBool,
    /// Wakes the idle watch when `half_closed` changes its deadline.
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            half_closed: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn touch(&self) {
        self.last_ms.store(millis_since(self.start), Ordering::Relaxed);
    }

    fn half_close(&self) {
        self.half_closed.store(true, Ordering::Relaxed);
        self.changed.notify_one();
    }
}

/// How long a relayed connection may sit without traffic.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// No byte in either direction for this long closes the connection.
    pub idle: Duration,
    /// Once either side has sent FIN, no byte for this long closes it.
    pub half_close: Duration,
}

/// Relays until both directions end, the connection idles out, or an error.
/// Counts land in `transfer` as they move, so they are right even on error.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    mode: RelayMode,
    timeouts: Timeouts,
    transfer: &Transfer,
    tenant: Option<&SocketPermit>,
) -> io::Result<RelayEnd> {
    let activity = Activity::new();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let end = {
        // Pinned here and lent to `both_ways`: moving them into it would make
        // the task carry two copies of each (rustc does not overlap the
        // storage of a future moved into another), and every idle connection
        // pays for its task's size.
        let up = pin!(pump(
            &mut client_read,
            &mut upstream_write,
            mode,
            &transfer.client_to_upstream,
            transfer,
            &activity,
            tenant,
        ));
        let down = pin!(pump(
            &mut upstream_read,
            &mut client_write,
            mode,
            &transfer.upstream_to_client,
            transfer,
            &activity,
            tenant,
        ));
        both_ways(up, down, &activity, timeouts).await
    };
    // Closed whole: a write half dropped on its own shuts its side down
    // first, one more system call where `close` sends the FIN anyway.
    drop(client_read.reunite(client_write));
    drop(upstream_read.reunite(upstream_write));
    end
}

/// Relays between any two streams (TLS on either side) by copying, with
/// the same half-close and timeout rules as [`relay`]. A peer that closes its
/// TCP connection without a TLS close_notify counts as having finished.
pub async fn relay_streams<C, U>(
    client: C,
    upstream: U,
    timeouts: Timeouts,
    transfer: &Transfer,
) -> io::Result<RelayEnd>
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    let activity = Activity::new();
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let up = pin!(pump_stream(
        &mut client_read,
        &mut upstream_write,
        &transfer.client_to_upstream,
        &activity,
    ));
    let down = pin!(pump_stream(
        &mut upstream_read,
        &mut client_write,
        &transfer.upstream_to_client,
        &activity,
    ));
    both_ways(up, down, &activity, timeouts).await
}

/// Runs both directions until both end, an error ends either, or the
/// connection idles out.
async fn both_ways(
    up: impl Future<Output = io::Result<()>>,
    down: impl Future<Output = io::Result<()>>,
    activity: &Activity,
    timeouts: Timeouts,
) -> io::Result<RelayEnd> {
    let both = async {
        tokio::try_join!(up, down)?;
        Ok(RelayEnd::Closed)
    };
    tokio::select! {
        result = both => result,
        end = idle_watch(activity, timeouts) => Ok(end),
    }
}

/// One direction between generic streams: copy until EOF, then shut the
/// writer down (FIN, or close_notify and FIN for TLS).
///
/// As in [`copy`], a buffer exists only while the reader has data: it is
/// dropped whenever a read has to wait, so an idle direction of a
/// terminated connection holds no buffer of its own.
async fn pump_stream<R, W>(reader: &mut R, writer: &mut W, count: &AtomicU64, activity: &Activity) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    loop {
        let read = std::future::poll_fn(|cx| {
            if buf.is_empty() {
                buf = vec![0u8; BUFFER_SIZE];
            }
            let mut read = ReadBuf::new(&mut buf);
            match std::pin::Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Ready(result) => Poll::Ready(result.map(|()| read.filled().len())),
                Poll::Pending => {
                    buf = Vec::new();
                    Poll::Pending
                }
            }
        });
        let n = match read.await {
            Ok(n) => n,
            // TLS without close_notify: the peer is gone all the same.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        writer.write_all(&buf[..n]).await?;
        // TLS streams buffer records until flushed.
        writer.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
    activity.half_close();
    writer.shutdown().await
}

/// One direction: copy, then splice where the mode and platform allow, until
/// `reader` reaches EOF; then shut `writer` down (sends FIN).
async fn pump(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    mode: RelayMode,
    count: &AtomicU64,
    transfer: &Transfer,
    activity: &Activity,
    tenant: Option<&SocketPermit>,
) -> io::Result<()> {
    let copy_limit = match mode {
        RelayMode::Copy => None,
        RelayMode::Auto => Some(SPLICE_AFTER),
        RelayMode::Splice => Some(0),
    };
    let eof = copy(
        reader,
        writer,
        copy_limit.filter(|_| splice::AVAILABLE),
        count,
        activity,
    )
    .await?;
    if !eof {
        // Boxed: only a direction that moves to splice pays for its state;
        // an idle copied connection's task holds none of it.
        Box::pin(splice::pump(reader, writer, count, &transfer.spliced, activity, tenant)).await?;
    }
    // When the other direction has ended already, the relay is over and
    // closing the sockets sends this FIN: shutting down first would cost a
    // system call, one that fails when the peer has gone (reset).
    let other_ended = activity.half_closed.load(Ordering::Relaxed);
    activity.half_close();
    if other_ended {
        return Ok(());
    }
    writer.shutdown().await
}

/// Copies until EOF (returns true) or until `count` reaches `limit` (false).
///
/// A buffer exists only while the socket has data ready: an idle direction
/// holds no memory but its task, which keeps idle connections cheap.
async fn copy(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    limit: Option<u64>,
    count: &AtomicU64,
    activity: &Activity,
) -> io::Result<bool> {
    while !reached(limit, count) {
        reader.readable().await?;
        if copy_burst(reader, writer, limit, count, activity).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether `count` has reached `limit` (never, without one).
fn reached(limit: Option<u64>, count: &AtomicU64) -> bool {
    limit.is_some_and(|limit| count.load(Ordering::Relaxed) >= limit)
}

/// Copies what `reader` has ready, until a read would wait, EOF (returns
/// true) or `count` reaches `limit`.
async fn copy_burst(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    limit: Option<u64>,
    count: &AtomicU64,
    activity: &Activity,
) -> io::Result<bool> {
    let mut buf = Vec::with_capacity(BUFFER_SIZE);
    while !reached(limit, count) {
        buf.clear();
        match reader.try_read_buf(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                writer.write_all(&buf[..n]).await?;
                count.fetch_add(n as u64, Ordering::Relaxed);
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

#[cfg(target_os = "linux")]
mod splice;

#[cfg(not(target_os = "linux"))]
mod splice {
    //! No splice here: the copy loop carries everything.

    use std::io;
    use std::sync::atomic::AtomicU64;

    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

    use super::Activity;

    pub const AVAILABLE: bool = false;

    pub fn set_max_pipes(_: usize) {}

    /// Never counts: nothing splices here.
    pub static PIPE_REFUSALS: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
        std::sync::LazyLock::new(Default::default);

    pub fn pipes() -> (usize, usize) {
        (0, 0)
    }

    pub async fn pump(
        _: &mut OwnedReadHalf,
        _: &mut OwnedWriteHalf,
        _: &AtomicU64,
        _: &AtomicU64,
        _: &Activity,
        _: Option<&super::SocketPermit>,
    ) -> io::Result<()> {
        Ok(())
    }
}

/// Resolves once no byte has moved for the idle timeout, or, after a
/// half-close, for the half-close timeout; says which.
async fn idle_watch(activity: &Activity, timeouts: Timeouts) -> RelayEnd {
    let as_ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    loop {
        let half_closed = activity.half_closed.load(Ordering::Relaxed);
        let limit_ms = match half_closed {
            true => as_ms(timeouts.half_close.min(timeouts.idle)),
            false => as_ms(timeouts.idle),
        };
        let deadline_ms = activity.last_ms.load(Ordering::Relaxed).saturating_add(limit_ms);
        let now_ms = millis_since(activity.start);
        if now_ms >= deadline_ms {
            return if half_closed {
                RelayEnd::HalfCloseTimeout
            } else {
                RelayEnd::Idle
            };
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(deadline_ms - now_ms)) => {}
            () = activity.changed.notified() => {}
        }
    }
}

fn millis_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every relayed connection's task holds a relay future for its whole
    /// life, so its size is memory per idle connection. Handing the two
    /// directions to `both_ways` by value made it 2,832 bytes; pinned in
    /// place it is about half that (1,512), and with the splice phase
    /// boxed, 1,448.
    #[tokio::test]
    async fn a_relay_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (upstream, _) = listener.accept().await.expect("accept");
        let transfer = Transfer::default();
        let timeouts = Timeouts {
            idle: Duration::from_secs(1),
            half_close: Duration::from_secs(1),
        };
        let future = relay(client, upstream, RelayMode::Auto, timeouts, &transfer, None);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1450, "a relay future takes {size} bytes");
    }
}
