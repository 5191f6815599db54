//! Bytes parked before routing: a client that sends its hello slowly holds
//! a growing buffer (up to 16 KiB of hello, and the task around it) for as
//! long as its sniff deadline lets it. Over all listeners those bytes are
//! bounded (`limits.max_parked_bytes`): past the bound, the connections
//! parked longest are shed first, until the total fits again.
//!
//! A hello that arrives in its first read never parks: only a connection
//! that must read again registers here, so the common path takes no lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use tokio::sync::Notify;

/// What a parked connection holds beyond its buffer: its task, its read
/// chunk and socket state, as measured (22.7 KiB for a 15 KiB hello).
pub(crate) const OVERHEAD: usize = 6 * 1024;

/// The default `limits.max_parked_bytes`.
pub const DEFAULT_MAX_PARKED_BYTES: usize = 64 * 1024 * 1024;

/// The bound in force (set with each snapshot).
pub(crate) static MAX_PARKED_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_PARKED_BYTES);

/// Every parked connection by id (ids grow with time, so the first is the
/// oldest), with the bytes it holds and how to tell it to go.
#[derive(Default)]
struct Parking {
    total: usize,
    parked: BTreeMap<u64, (usize, Arc<Notify>)>,
}

static PARKING: LazyLock<Mutex<Parking>> = LazyLock::new(Mutex::default);

/// A connection's place among the parked ones; leaves when dropped.
pub(crate) struct Parked {
    id: u64,
    shed: Arc<Notify>,
}

impl Parking {
    /// Sheds the oldest until the total fits the bound (never `spare`, the
    /// connection that is growing, which goes last if it alone is too
    /// much: it is then the oldest).
    fn shed_past_bound(&mut self, spare: u64) {
        let max = MAX_PARKED_BYTES.load(Ordering::Relaxed);
        while self.total > max {
            let oldest = self.parked.keys().copied().find(|id| *id != spare);
            let Some(id) = oldest.or_else(|| self.parked.keys().next().copied()) else {
                return;
            };
            if let Some((bytes, shed)) = self.parked.remove(&id) {
                self.total -= bytes;
                shed.notify_one();
            }
        }
    }
}

impl Parked {
    /// Parks connection `id`, holding `bytes`.
    pub(crate) fn park(id: u64, bytes: usize) -> Parked {
        let shed = Arc::new(Notify::new());
        let mut parking = crate::sync::lock(&PARKING);
        let held = bytes + OVERHEAD;
        parking.total += held;
        parking.parked.insert(id, (held, Arc::clone(&shed)));
        parking.shed_past_bound(id);
        Parked { id, shed }
    }

    /// It holds `bytes` now.
    pub(crate) fn holds(&self, bytes: usize) {
        let mut parking = crate::sync::lock(&PARKING);
        let held = bytes + OVERHEAD;
        let Some((was, _)) = parking.parked.get_mut(&self.id) else {
            return;
        };
        let was = std::mem::replace(was, held);
        parking.total = parking.total - was + held;
        parking.shed_past_bound(self.id);
    }

    /// Completes when the connection is shed.
    pub(crate) async fn shed(&self) {
        self.shed.notified().await;
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        let mut parking = crate::sync::lock(&PARKING);
        if let Some((bytes, _)) = parking.parked.remove(&self.id) {
            parking.total -= bytes;
        }
    }
}

/// The bytes parked now, over all connections.
pub(crate) fn parked_bytes() -> usize {
    crate::sync::lock(&PARKING).total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_parked_connection_is_shed_first() {
        // Ids far from those other tests use; the bound is process-wide,
        // so the room is counted from what is parked already.
        let base = parked_bytes();
        MAX_PARKED_BYTES.store(base + 3 * (OVERHEAD + 1000), Ordering::Relaxed);
        let first = Parked::park(u64::MAX - 30, 1000);
        let second = Parked::park(u64::MAX - 20, 1000);
        let third = Parked::park(u64::MAX - 10, 1000);
        assert_eq!(parked_bytes(), base + 3 * (OVERHEAD + 1000));
        // The third grows past the bound: the first goes, not the third.
        third.holds(1500);
        tokio::time::timeout(std::time::Duration::from_secs(1), first.shed())
            .await
            .expect("the oldest was shed");
        assert_eq!(parked_bytes(), base + 2 * OVERHEAD + 2500);
        drop((first, second, third));
        assert_eq!(parked_bytes(), base);
        MAX_PARKED_BYTES.store(DEFAULT_MAX_PARKED_BYTES, Ordering::Relaxed);
    }
}
