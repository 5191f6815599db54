//! Locks that outlive a panic, and blocking work kept off the async
//! workers ([`off_the_worker`]).
//!
//! Locks that outlive a panic. Every mutex and read-write lock in weir
//! guards data that is consistent between statements (caches, counters,
//! idle lists, registries), so a thread that panicked holding one leaves
//! nothing half-written: the next user takes the data as it is rather than
//! failing every connection after it.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, poisoned or not.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes `lock` for reading, poisoned or not.
pub(crate) fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes `lock` for writing, poisoned or not.
pub(crate) fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `work`, which may take long and cannot yield, off the tokio
/// scheduler: on a multi-threaded runtime the worker hands its other tasks
/// to another thread meanwhile (and a plugin's yield inside wakes at once:
/// no core, no deferral); on a current-thread runtime, which would never
/// see a deferred wake while it is blocked here, on a thread of no runtime;
/// outside any runtime, right here.
pub fn off_the_worker<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        Ok(_) => std::thread::scope(|scope| {
            scope
                .spawn(work)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }),
        Err(_) => work(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_while_locked_does_not_lock_everyone_out() {
        let mutex = std::sync::Arc::new(std::sync::Mutex::new(1));
        let held = std::sync::Arc::clone(&mutex);
        let _ = std::thread::spawn(move || {
            let _guard = held.lock();
            panic!("while holding the lock");
        })
        .join();
        assert!(mutex.is_poisoned());
        *super::lock(&mutex) += 1;
        assert_eq!(*super::lock(&mutex), 2);
    }
}
