//! The documented defaults of the config's fields (serde `default = ...`).

use std::time::Duration;

pub fn sniff_timeout() -> Duration {
    Duration::from_secs(5)
}
pub fn connect_timeout() -> Duration {
    Duration::from_secs(5)
}
pub fn idle_timeout() -> Duration {
    Duration::from_secs(600)
}
pub fn half_close_timeout() -> Duration {
    Duration::from_secs(60)
}
pub fn weight() -> u32 {
    1
}
pub fn health_interval() -> Duration {
    Duration::from_secs(2)
}
pub fn health_timeout() -> Duration {
    Duration::from_secs(1)
}
pub fn rise() -> u32 {
    2
}
pub fn fall() -> u32 {
    3
}
pub fn passive_failures() -> u32 {
    3
}
pub fn eject_for() -> Duration {
    Duration::from_secs(10)
}
pub fn admin_bind() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9900))
}
pub fn debounce() -> Duration {
    Duration::from_millis(50)
}
pub fn handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
pub fn plugin_timeout() -> Duration {
    Duration::from_millis(10)
}
pub fn configure_timeout() -> Duration {
    Duration::from_secs(1)
}
pub fn max_connections_per_client() -> u32 {
    512
}
pub fn client_prefix_v4() -> u8 {
    24
}
pub fn client_prefix_v6() -> u8 {
    64
}
pub fn tenant_plugin_timeout() -> Duration {
    Duration::from_millis(50)
}
pub fn tenant_plugin_cpu() -> Duration {
    Duration::from_millis(100)
}

pub fn drain_timeout() -> Duration {
    Duration::from_secs(30)
}
pub fn renew_before() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
pub fn dns_command_timeout() -> Duration {
    Duration::from_secs(30)
}
pub fn dns_propagation_timeout() -> Duration {
    Duration::from_secs(120)
}
pub fn dns_ttl() -> u32 {
    60
}
pub fn plugin_memory_mib() -> u32 {
    16
}
pub fn yes() -> bool {
    true
}

pub fn cache_max_mib() -> u64 {
    1024
}
pub fn tenant_probes_per_second() -> u32 {
    50
}
pub fn tenant_dns_per_second() -> u32 {
    200
}
pub fn tenant_max_shadows() -> usize {
    2
}
pub fn tenant_compile_per_minute() -> Duration {
    Duration::from_secs(10)
}
pub fn tenant_max_metric_series() -> usize {
    1024
}
