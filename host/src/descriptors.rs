//! The process's file descriptors: the limit weir runs under, and the
//! reserve it keeps free of everything but accepted connections (a
//! connection accepted with one of the last descriptors is shed; a health
//! probe never takes one of them).

use std::sync::atomic::{AtomicU64, Ordering};

/// Whether a connection was accepted with one of the last descriptors the
/// reserve keeps free. The kernel hands out the lowest free descriptor, so
/// a connection's number is a lower bound of the descriptors open.
pub(crate) fn in_descriptor_reserve(stream: &impl std::os::fd::AsRawFd, reserve: Option<u64>) -> bool {
    #[cfg(unix)]
    {
        let Some(limit) = *DESCRIPTOR_LIMIT else {
            return false;
        };
        let reserve = reserve.unwrap_or_else(|| (limit / 16).clamp(16, 1024));
        let fd = u64::try_from(stream.as_raw_fd()).unwrap_or(0);
        fd.saturating_add(reserve) >= limit
    }
    #[cfg(not(unix))]
    {
        let _ = (stream, reserve);
        false
    }
}

/// The `limits.descriptor_reserve` of the snapshot in force, for what is
/// opened outside a connection (health probes): `u64::MAX` for the default.
pub(crate) static RESERVE_IN_FORCE: AtomicU64 = AtomicU64::new(u64::MAX);

/// The reserve in force, as [`in_descriptor_reserve`] takes it.
pub(crate) fn reserve_in_force() -> Option<u64> {
    match RESERVE_IN_FORCE.load(Ordering::Relaxed) {
        u64::MAX => None,
        reserve => Some(reserve),
    }
}

/// The soft descriptor limit in force when the first gateway started
/// (`weir run` raises it to the hard limit first); `None`: unlimited.
pub(crate) static DESCRIPTOR_LIMIT: std::sync::LazyLock<Option<u64>> = std::sync::LazyLock::new(|| {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
});
