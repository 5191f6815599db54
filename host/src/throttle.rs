//! Small rate limits the gateway uses wherever something may happen
//! faster than anyone should be told or allowed: [`EverySecond`] (report an
//! event at most once a second, with how many there were), [`Bucket`]
//! (a token bucket: an allowance refilled continuously, up to a cap) and
//! [`Rate`] (so many events a second, a second's worth at once).

use std::time::{Duration, Instant};

/// Says when an event that may come in storms (a failed accept, a shed
/// connection, a plugin failure) is to be reported: the first one, then at
/// most once a second, each time with how many there were since.
#[derive(Debug, Default)]
pub struct EverySecond {
    last: Option<Instant>,
    unreported: u64,
}

impl EverySecond {
    /// Counts one event; `Some(n)` when it is to be reported, `n` being the
    /// events since the last report, this one included.
    pub fn event(&mut self) -> Option<u64> {
        self.unreported += 1;
        if self.last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.unreported))
    }
}

/// A token bucket: `available` grows at a rate, up to a capacity, and is
/// spent by what it allows (it may be overdrawn: a cost known only after
/// the fact is charged whole).
#[derive(Debug)]
pub struct Bucket {
    available: f64,
    at: Instant,
}

impl Bucket {
    /// A bucket holding `capacity`.
    pub fn full(capacity: f64) -> Bucket {
        Bucket {
            available: capacity,
            at: Instant::now(),
        }
    }

    /// Adds what `rate` (a second) earned since the last refill, up to
    /// `capacity`, and returns what the bucket holds.
    pub fn refill(&mut self, rate: f64, capacity: f64) -> f64 {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * rate;
        self.available = (self.available + earned).min(capacity);
        self.at = now;
        self.available
    }

    /// What the bucket holds, as of the last refill.
    pub fn available(&self) -> f64 {
        self.available
    }

    /// Spends `amount`.
    pub fn spend(&mut self, amount: f64) {
        self.available -= amount;
    }
}

/// At most `per_second` events a second, up to a second's worth at once;
/// shared by whoever spends it (a tenant's probes, its DNS lookups).
#[derive(Debug)]
pub struct Rate {
    per_second: u32,
    bucket: std::sync::Mutex<Bucket>,
}

impl Rate {
    /// A full allowance of `per_second` events a second.
    pub fn new(per_second: u32) -> Rate {
        Rate {
            per_second,
            bucket: std::sync::Mutex::new(Bucket::full(f64::from(per_second))),
        }
    }

    /// The events it allows a second.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Takes one event's allowance; `false` when there is none left.
    pub fn take(&self) -> bool {
        let rate = f64::from(self.per_second);
        let mut bucket = crate::sync::lock(&self.bucket);
        if bucket.refill(rate, rate) < 1.0 {
            return false;
        }
        bucket.spend(1.0);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_is_reported_once_with_its_count() {
        let mut reports = EverySecond::default();
        assert_eq!(reports.event(), Some(1));
        for _ in 0..99 {
            assert_eq!(reports.event(), None);
        }
        reports.last = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(reports.event(), Some(100));
    }

    #[test]
    fn a_bucket_refills_up_to_its_capacity_and_may_be_overdrawn() {
        let mut bucket = Bucket::full(10.0);
        bucket.spend(25.0);
        assert!(bucket.refill(1.0, 10.0) < -14.9);
        bucket.at -= Duration::from_secs(100);
        assert_eq!(bucket.refill(1.0, 10.0), 10.0);
    }

    #[test]
    fn a_rate_allows_a_seconds_worth_then_refills() {
        let rate = Rate::new(5);
        assert_eq!((0..20).filter(|_| rate.take()).count(), 5);
        crate::sync::lock(&rate.bucket).at -= Duration::from_millis(400);
        assert_eq!((0..20).filter(|_| rate.take()).count(), 2);
        assert!(!Rate::new(0).take());
    }
}
