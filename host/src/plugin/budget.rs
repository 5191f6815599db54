//! A tenant's budget of plugin time: CPU per second (a token bucket charged
//! with the CPU time of its calls) and calls in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::CpuCounter;
use crate::throttle::Bucket;

/// A tenant's allowance of plugin time: CPU a second, as a bucket that holds
/// a tenth of a second's worth and refills continuously, and calls in flight
/// at once. (A bucket of a whole second's worth let a looping tenant spend
/// 250 ms at once, and the bystanders' p99 rose with it.) A call is refused while the bucket is empty or the calls are at
/// their limit, so a tenant whose plugin loops spends its own allowance
/// and no one else's. Carried across reloads while its limits are the same.
#[derive(Debug)]
pub struct Budget {
    cpu_per_second: Duration,
    max_calls: usize,
    calls: AtomicUsize,
    bucket: Mutex<Bucket>,
}

/// The share of a second of a tenant's `plugin_cpu` its budget holds at once.
pub(crate) const BUDGET_BURST: f64 = 0.1;

/// A call's place in a [`Budget`]; [`Spending::end`] charges what it spent.
#[derive(Debug)]
pub(crate) struct Spending(Arc<Budget>);

impl Spending {
    pub(crate) fn end(self, spent: Duration, counted: &CpuCounter) {
        self.0.charge(spent, counted);
        // Dropping `self` gives the call's place back.
    }
}

impl Drop for Spending {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Budget {
    /// A budget of `cpu_per_second` of plugin CPU a second and `max_calls`
    /// calls at once.
    pub fn new(cpu_per_second: Duration, max_calls: usize) -> Arc<Budget> {
        Arc::new(Budget {
            cpu_per_second,
            max_calls,
            calls: AtomicUsize::new(0),
            bucket: Mutex::new(Bucket::full(cpu_per_second.as_secs_f64() * BUDGET_BURST)),
        })
    }

    /// Whether this budget has these limits (a reload keeps it if so).
    pub fn has_limits(&self, cpu_per_second: Duration, max_calls: usize) -> bool {
        self.cpu_per_second == cpu_per_second && self.max_calls == max_calls
    }

    /// Takes a place for a call, or says why not.
    pub(crate) fn start(self: &Arc<Self>) -> Result<Spending, String> {
        let held = self.calls.fetch_add(1, Ordering::AcqRel);
        // Dropped on refusal, it gives the place back.
        let spending = Spending(Arc::clone(self));
        if held >= self.max_calls {
            return Err(format!(
                "its tenant has {} plugin calls in flight (max_plugin_calls)",
                self.max_calls
            ));
        }
        if self.refill().available() <= 0.0 {
            return Err(format!(
                "its tenant has spent its plugin CPU budget of {:?} a second (plugin_cpu)",
                self.cpu_per_second
            ));
        }
        Ok(spending)
    }

    /// The bucket brought up to date, locked: seconds of CPU that may
    /// still be spent (below zero after a call that overdrew it).
    pub(crate) fn refill(&self) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = crate::sync::lock(&self.bucket);
        let rate = self.cpu_per_second.as_secs_f64();
        bucket.refill(rate, rate * BUDGET_BURST);
        bucket
    }

    /// Charges CPU spent by one of the tenant's plugins, and counts it in
    /// that plugin's `weir_plugin_cpu_seconds_total`.
    pub(crate) fn charge(&self, spent: Duration, counted: &CpuCounter) {
        counted.inc_by(spent.as_secs_f64());
        self.refill().spend(spent.as_secs_f64());
    }
}
