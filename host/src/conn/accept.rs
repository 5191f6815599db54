//! Accepting: one task per listener, shedding before any byte is read when
//! a limit is reached (connections, descriptors), one task per connection.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::conn::handle;
pub(crate) use crate::descriptors::{DESCRIPTOR_LIMIT, in_descriptor_reserve};
use crate::snapshot::Snapshot;

/// Counter behind connection ids.
pub(crate) static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// The most splice pipes open at once (`limits.max_pipes`): by default an
/// eighth of the descriptor limit (a quarter of the descriptors, two a
/// pipe), between 16 and 16,384.
pub(crate) fn max_pipes(limits: &crate::config::Limits) -> usize {
    limits.max_pipes.unwrap_or_else(|| {
        let limit = DESCRIPTOR_LIMIT.unwrap_or(8192);
        usize::try_from((limit / 8).clamp(16, 16_384)).unwrap_or(16_384)
    })
}

/// Seconds the kernel holds a new connection for its first bytes on this
/// listener (0: it hands connections over at once). See
/// `ListenerConfig::defer_accept`.
pub(crate) fn deferral(config: &crate::config::ListenerConfig) -> u32 {
    if !config.defer_accept {
        return 0;
    }
    let seconds = config.sniff_timeout.as_secs() + u64::from(config.sniff_timeout.subsec_nanos() > 0);
    u32::try_from(seconds).unwrap_or(u32::MAX).max(1)
}

/// Has the kernel hold new connections on `socket` until their first bytes
/// arrive, for up to `seconds` (`TCP_DEFER_ACCEPT`); 0 turns it off.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn set_deferral(socket: &TcpListener, seconds: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: setsockopt reads `len` bytes, the size of `value`, from the
    // address of `value`, a local that outlives the call; the descriptor is
    // borrowed from `socket`, which stays open for the whole call.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const value).cast(),
            len,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `TCP_NODELAY` on a listening socket: Linux copies it to every
/// connection the socket accepts, which saves a `setsockopt` per connection.
/// Relayed handshake flights must not wait on Nagle.
#[cfg(target_os = "linux")]
pub(crate) fn set_listener_nodelay(socket: &TcpListener) -> io::Result<()> {
    rustix::net::sockopt::set_tcp_nodelay(socket, true).map_err(io::Error::from)
}

/// Elsewhere each accepted connection gets it (see [`accept_loop`]).
#[cfg(not(target_os = "linux"))]
pub(crate) fn set_listener_nodelay(_socket: &TcpListener) -> io::Result<()> {
    Ok(())
}

/// Off Linux connections are handed over at once.
#[cfg(not(target_os = "linux"))]
pub(crate) fn set_deferral(_socket: &TcpListener, seconds: u32) -> io::Result<()> {
    if seconds == 0 {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::Unsupported, "defer_accept needs Linux"))
    }
}

pub(crate) async fn accept_loop(
    name: Arc<str>,
    socket: Arc<TcpListener>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    stats: Arc<ListenerStats>,
    // Connections in progress over all of the gateway's listeners.
    all: Arc<AtomicUsize>,
) {
    let mut accept_errors = AcceptErrors::default();
    let mut reserve_reports = crate::throttle::EverySecond::default();
    // A socket bound to one address accepts connections to that address
    // only: each connection's local address is known without asking the
    // kernel (a getsockname per connection). Bound to 0.0.0.0 or [::], it
    // is asked.
    let bound = socket.local_addr().ok().filter(|addr| !addr.ip().is_unspecified());
    loop {
        match socket.accept().await {
            Ok((stream, client)) => {
                let snapshot = snapshot.load_full();
                let Some(listener) = snapshot.listener(&name).cloned() else {
                    continue;
                };
                // Shed at the limits before any work: closing at once costs
                // less than anything else, and those in progress go on.
                let shed = if listener
                    .config
                    .max_connections
                    .is_some_and(|max| stats.active.load(Ordering::Relaxed) >= max as u64)
                {
                    Some("listener")
                } else if snapshot
                    .config
                    .limits
                    .max_connections
                    .is_some_and(|max| all.load(Ordering::Relaxed) >= max)
                {
                    Some("global")
                } else if in_descriptor_reserve(&stream, snapshot.config.limits.descriptor_reserve) {
                    Some("descriptors")
                } else {
                    None
                };
                if let Some(limit) = shed {
                    drop(stream);
                    crate::metrics::METRICS.shed(&name, limit);
                    tracing::debug!(listener = &*name, %client, limit, "connection shed at its limit");
                    if limit == "descriptors"
                        && let Some(shed) = reserve_reports.event()
                    {
                        tracing::warn!(
                            listener = &*name,
                            shed,
                            "connections shed: weir keeps its last descriptors free (limits.descriptor_reserve)"
                        );
                    }
                    continue;
                }
                // On Linux the socket has it from the listener
                // ([`set_listener_nodelay`]).
                #[cfg(not(target_os = "linux"))]
                let _ = stream.set_nodelay(true);
                stats.total.fetch_add(1, Ordering::Relaxed);
                stats.active.fetch_add(1, Ordering::Relaxed);
                all.fetch_add(1, Ordering::Relaxed);
                let (stats, all) = (Arc::clone(&stats), Arc::clone(&all));
                tokio::spawn(async move {
                    handle(stream, client, bound, listener, snapshot).await;
                    stats.active.fetch_sub(1, Ordering::Relaxed);
                    all.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) =>
            {
                // That one connection went away before it was accepted.
                tracing::debug!(listener = &*name, error = %e, "connection gone before accept");
            }
            Err(e) => {
                // Out of file descriptors or memory. The connection stays
                // in the kernel's backlog, to be accepted once descriptors
                // free up: back off instead of spinning on the error.
                crate::metrics::METRICS.accept_failed(&name);
                accept_errors.failed(&name, &e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// How long a listener waits after a failed `accept` before trying again,
/// and a connect out of descriptors before it tries to open a socket again.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Reports failed `accept` calls at most once a second, with how many
/// there were: at the descriptor limit every retry fails, and a line per
/// retry would bury the log.
#[derive(Default)]
pub(crate) struct AcceptErrors(crate::throttle::EverySecond);

impl AcceptErrors {
    pub(crate) fn failed(&mut self, listener: &str, error: &io::Error) {
        let Some(failures) = self.0.event() else {
            return;
        };
        let limit = if out_of_descriptors(error) {
            " (out of file descriptors: raise `ulimit -n` or set max_connections below it)"
        } else {
            ""
        };
        tracing::error!(
            listener,
            error = %error,
            failures,
            "accept failed{limit}; new connections wait in the backlog"
        );
    }
}

/// Whether `error` is "too many open files", per process (EMFILE) or
/// system-wide (ENFILE): weir's own shortage, not the peer's fault. (The
/// errno values are the same on Linux and the BSDs.)
pub(crate) fn out_of_descriptors(error: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    matches!(error.raw_os_error(), Some(code) if code == EMFILE || code == ENFILE)
}

/// Connection counts of one listener.
#[derive(Debug, Default, Serialize)]
pub struct ListenerStats {
    /// Connections in progress.
    pub active: AtomicU64,
    /// Connections accepted since start.
    pub total: AtomicU64,
}

#[cfg(test)]
mod tests {
    /// The per-connection `setsockopt` is left out on Linux because an
    /// accepted socket inherits `TCP_NODELAY` from its listener: if a kernel
    /// stopped doing so, this fails.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        super::set_listener_nodelay(&listener).expect("nodelay");
        let addr = listener.local_addr().expect("addr");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("nodelay"));
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _other = std::net::TcpStream::connect(plain.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = plain.accept().await.expect("accept");
        assert!(
            !accepted.nodelay().expect("nodelay"),
            "the default is off, so the check above means something"
        );
    }
}
