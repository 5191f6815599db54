//! Wall-clock times as the admin API, the metrics and etcd values give
//! them: whole seconds since the Unix epoch (0 for a time before it).

use std::time::{SystemTime, UNIX_EPOCH};

/// `at` in seconds since the Unix epoch.
pub fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    unix_seconds(SystemTime::now())
}
