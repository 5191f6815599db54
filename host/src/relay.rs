//! Moves bytes both ways between a client and an upstream until both
//! directions have ended, propagating half-close: when one side stops
//! sending (FIN), the other side's write half is shut down and the opposite
//! direction keeps flowing. A connection with no bytes either way for the
//! idle timeout is closed; an error in either direction closes both.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Bytes per read.
const BUFFER_SIZE: usize = 16 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished sending.
    Closed,
    /// No byte moved for the idle timeout.
    Idle,
}

/// What a relay moved.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Bytes from the client to the upstream.
    pub client_to_upstream: AtomicU64,
    /// Bytes from the upstream to the client.
    pub upstream_to_client: AtomicU64,
}

/// Relays until both directions end, the connection idles out, or an error.
/// Counts land in `transfer` as they move, so they are right even on error.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    idle_timeout: Duration,
    transfer: &Transfer,
) -> io::Result<RelayEnd> {
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let up = copy_until_eof(
        &mut client_read,
        &mut upstream_write,
        &transfer.client_to_upstream,
        &last_activity,
        start,
    );
    let down = copy_until_eof(
        &mut upstream_read,
        &mut client_write,
        &transfer.upstream_to_client,
        &last_activity,
        start,
    );
    let both = async {
        tokio::try_join!(up, down)?;
        Ok(RelayEnd::Closed)
    };
    tokio::select! {
        result = both => result,
        () = idle_watch(&last_activity, start, idle_timeout) => Ok(RelayEnd::Idle),
    }
}

/// Copies until `reader` reaches EOF, then shuts `writer` down (sends FIN).
///
/// A buffer exists only while the socket has data ready: an idle direction
/// holds no memory but its task, which keeps idle connections cheap.
async fn copy_until_eof(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    count: &AtomicU64,
    last_activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    loop {
        reader.readable().await?;
        let mut buf = Vec::with_capacity(BUFFER_SIZE);
        loop {
            buf.clear();
            match reader.try_read_buf(&mut buf) {
                Ok(0) => {
                    writer.shutdown().await?;
                    return Ok(());
                }
                Ok(n) => {
                    writer.write_all(&buf[..n]).await?;
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    last_activity.store(millis_since(start), Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Resolves once no byte has moved for `idle`.
async fn idle_watch(last_activity: &AtomicU64, start: Instant, idle: Duration) {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        let deadline_ms = last_activity.load(Ordering::Relaxed).saturating_add(idle_ms);
        let now_ms = millis_since(start);
        if now_ms >= deadline_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(deadline_ms - now_ms)).await;
    }
}

fn millis_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}
