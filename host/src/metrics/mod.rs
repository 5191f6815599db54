//! The gateway's Prometheus metrics, process-wide, served by the admin
//! server at `GET /metrics`.

use std::sync::LazyLock;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

mod labels;
pub mod own;
pub mod shadow;
pub use labels::{
    AcmeOrderLabels, BytesLabels, CertificateLabels, ConnectionLabels, FailureLabels, ListenerLabels, PluginLabels,
    PoolServerLabels, ReloadLabels, RouteActiveLabels, RouteBytesLabels, ShedLabels, SniffLabels, TenantLabels,
};

/// A label value, escaped as Prometheus's text format requires (`\\`, `\"`
/// and `\n`). prometheus-client 0.24 writes label values verbatim, so a
/// route name such as `x",outcome="fake` from a plugin would otherwise add
/// a label and make the whole scrape invalid; every label value that is a
/// name goes through this type.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LabelValue(String);

impl LabelValue {
    /// The value as given, unescaped.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for LabelValue {
    fn from(value: String) -> LabelValue {
        LabelValue(value)
    }
}

impl From<&str> for LabelValue {
    fn from(value: &str) -> LabelValue {
        LabelValue(value.to_owned())
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        let mut rest = self.0.as_str();
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

/// Seconds of plugin CPU, counted as budgets are charged.
pub type CpuCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// Every metric weir exports.
pub struct Metrics {
    registry: Registry,
    /// Finished connections.
    pub connections: Family<ConnectionLabels, Counter>,
    /// Connections in progress.
    pub active: Family<ListenerLabels, Gauge>,
    /// Bytes relayed.
    pub bytes: Family<BytesLabels, Counter>,
    /// Plugin call durations.
    pub plugin_calls: Family<PluginLabels, Histogram>,
    /// Plugin failures.
    pub plugin_failures: Family<FailureLabels, Counter>,
    /// CPU time of tenants' plugin calls, charged to their budgets.
    pub plugin_cpu: Family<PluginLabels, CpuCounter>,
    /// Loaded plugins alive (set at scrape time).
    plugins_loaded: Gauge,
    /// Plugin instances alive (set at scrape time).
    plugin_instances: Gauge,
    /// Plugin log lines dropped over the plugin's log allowance.
    pub plugin_log_dropped: Family<PluginLabels, Counter>,
    /// Connections refused before routing.
    pub sniff_failures: Family<SniffLabels, Counter>,
    /// Reloads.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Tenant decisions that named something outside the tenant.
    pub tenant_violations: Family<TenantLabels, Counter>,
    /// Tenant connections refused at the tenant's connection limit.
    pub tenant_limited: Family<TenantLabels, Counter>,
    /// Connections closed on accept at a listener's or the global limit.
    pub shed: Family<ShedLabels, Counter>,
    /// Failed `accept` calls (out of descriptors or memory).
    pub accept_errors: Family<ListenerLabels, Counter>,
    /// Bytes by route, counted at each connection's end.
    pub route_bytes: Family<RouteBytesLabels, Counter>,
    /// Connections being relayed, by route.
    route_active: Family<RouteActiveLabels, Gauge>,
    /// Certificates' notAfter.
    certificate_not_after: Family<CertificateLabels, Gauge>,
    /// Stapled OCSP responses' nextUpdate.
    ocsp_next_update: Family<CertificateLabels, Gauge>,
    /// Whether an OCSP response is stapled now.
    ocsp_stapled: Family<CertificateLabels, Gauge>,
    /// Pool servers passing their checks and not ejected.
    pool_server_up: Family<PoolServerLabels, Gauge>,
    /// Pool servers draining.
    pool_server_draining: Family<PoolServerLabels, Gauge>,
    /// Connections in progress per pool server.
    pool_server_active: Family<PoolServerLabels, Gauge>,
    /// When each ACME certificate is due for its next order.
    acme_next_renewal: Family<CertificateLabels, Gauge>,
    /// When each ACME certificate's last order ended, by its result.
    acme_last_order: Family<AcmeOrderLabels, Gauge>,
    /// Splice pipes open, in use or pooled (set at scrape time).
    splice_pipes_open: Gauge,
    /// Splice pipes carrying a burst (set at scrape time).
    splice_pipes_in_use: Gauge,
    /// Bytes held by connections parked before routing (set at scrape time).
    parked_bytes: Gauge,
    /// Route names with a series, for [`MAX_ROUTE_LABELS`].
    route_labels: RouteLabels,
}

/// What the ACME gauges show of one certificate.
#[derive(Debug, Clone)]
pub struct AcmeStatus {
    /// Its name in the config.
    pub name: String,
    /// `tls-alpn-01` or `dns-01`.
    pub challenge: &'static str,
    /// When its last order ended and how (`issued`, `failed`).
    pub last_order: Option<(u64, &'static str)>,
    /// When it is due for its next order, seconds since the Unix epoch.
    pub next_renewal: Option<u64>,
}

/// Most distinct route names counted in `weir_connections_total` for one
/// listener or tenant; routes named after it are counted as `other`, so a
/// plugin that names a route per connection cannot grow the scrape (or
/// weir's memory) without bound.
pub const MAX_ROUTE_LABELS: usize = 1000;

/// The route names already given a series: per tenant, and per listener for
/// connections of no tenant.
#[derive(Default)]
struct RouteLabels {
    tenants: std::sync::RwLock<RouteNames>,
    listeners: std::sync::RwLock<RouteNames>,
}

type RouteNames = std::collections::HashMap<String, std::collections::HashSet<String>>;

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("weir"),
            connections: Family::<ConnectionLabels, Counter>::default(),
            active: Family::<ListenerLabels, Gauge>::default(),
            bytes: Family::<BytesLabels, Counter>::default(),
            plugin_calls: Family::<PluginLabels, Histogram>::new_with_constructor(|| {
                // 1 µs .. ~1 s
                Histogram::new(exponential_buckets(1e-6, 4.0, 11))
            }),
            plugin_failures: Family::<FailureLabels, Counter>::default(),
            plugin_cpu: Family::default(),
            plugin_log_dropped: Family::<PluginLabels, Counter>::default(),
            plugins_loaded: Gauge::default(),
            plugin_instances: Gauge::default(),
            sniff_failures: Family::<SniffLabels, Counter>::default(),
            reloads: Family::<ReloadLabels, Counter>::default(),
            tenant_violations: Family::<TenantLabels, Counter>::default(),
            tenant_limited: Family::<TenantLabels, Counter>::default(),
            shed: Family::<ShedLabels, Counter>::default(),
            accept_errors: Family::<ListenerLabels, Counter>::default(),
            route_bytes: Family::<RouteBytesLabels, Counter>::default(),
            route_active: Family::<RouteActiveLabels, Gauge>::default(),
            certificate_not_after: Family::<CertificateLabels, Gauge>::default(),
            ocsp_next_update: Family::<CertificateLabels, Gauge>::default(),
            ocsp_stapled: Family::<CertificateLabels, Gauge>::default(),
            pool_server_up: Family::<PoolServerLabels, Gauge>::default(),
            pool_server_draining: Family::<PoolServerLabels, Gauge>::default(),
            pool_server_active: Family::<PoolServerLabels, Gauge>::default(),
            acme_next_renewal: Family::<CertificateLabels, Gauge>::default(),
            acme_last_order: Family::<AcmeOrderLabels, Gauge>::default(),
            splice_pipes_open: Gauge::default(),
            splice_pipes_in_use: Gauge::default(),
            parked_bytes: Gauge::default(),
            route_labels: RouteLabels::default(),
        };
        let mut registry = Registry::with_prefix("weir");
        metrics.register_traffic(&mut registry);
        metrics.register_plugins_and_certificates(&mut registry);
        own::register(&mut registry);
        shadow::register(&mut registry);
        metrics.registry = registry;
        // Alerts on `result="error"` must see 0 before the first failure, not
        // a missing series.
        for result in ["ok", "error"] {
            drop(metrics.reloads.get_or_create(&ReloadLabels { result }));
        }
        metrics
    }

    /// Connections, bytes, refusals, reloads and tenants.
    fn register_traffic(&self, registry: &mut Registry) {
        registry.register(
            "accept_errors",
            "Failed accept calls (out of file descriptors or memory); the connection waits in the kernel's backlog",
            self.accept_errors.clone(),
        );
        registry.register("shed", "Connections closed on accept at a listener's or the global connection limit, or at a client's limit on a listener", self.shed.clone());
        registry.register(
            "tenant_violations",
            "Tenant decisions naming a pool, address, certificate or CA outside the tenant",
            self.tenant_violations.clone(),
        );
        registry.register(
            "tenant_limited",
            "Tenant connections refused at the tenant's connection limit",
            self.tenant_limited.clone(),
        );
        registry.register(
            "connections",
            "Finished connections by listener, tenant, route and outcome",
            self.connections.clone(),
        );
        registry.register(
            "connections_active",
            "Connections in progress by listener",
            self.active.clone(),
        );
        registry.register("bytes", "Bytes relayed by listener and direction", self.bytes.clone());
        registry.register(
            "route_bytes",
            "Bytes relayed by route (as in weir_connections_total) and direction, counted when a connection ends",
            self.route_bytes.clone(),
        );
        registry.register(
            "route_connections_active",
            "Connections being relayed by route (as in weir_connections_total), from their decision to their end",
            self.route_active.clone(),
        );
        registry.register(
            "sniff_failures",
            "Connections closed before routing, by reason",
            self.sniff_failures.clone(),
        );
        registry.register("reloads", "Config reloads by result", self.reloads.clone());
        registry.register(
            "splice_pipes_open",
            "Pipes open for splice(2) relaying, carrying a burst or pooled ([limits] max_pipes bounds them)",
            self.splice_pipes_open.clone(),
        );
        registry.register(
            "parked_bytes",
            "Bytes held by connections whose first bytes are still arriving ([limits] max_parked_bytes bounds them)",
            self.parked_bytes.clone(),
        );
        registry.register(
            "splice_pipes_in_use",
            "Pipes for splice(2) relaying carrying a burst now",
            self.splice_pipes_in_use.clone(),
        );
        registry.register(
            "splice_pipe_refusals",
            "Bursts of a splicing direction copied instead, for want of a pipe (at [limits] max_pipes, or out of descriptors)",
            crate::relay::PIPE_REFUSALS.clone(),
        );
    }

    /// Plugins, their instances and failures, and certificates.
    fn register_plugins_and_certificates(&self, registry: &mut Registry) {
        registry.register(
            "plugins_loaded",
            "Loaded plugins in memory: the running config's, and any older one a connection or task still holds",
            self.plugins_loaded.clone(),
        );
        registry.register(
            "plugin_instances",
            "Plugin instances in memory, idle or in a call",
            self.plugin_instances.clone(),
        );
        registry.register(
            "certificate_not_after_timestamp_seconds",
            "When each certificate expires (its notAfter), seconds since the Unix epoch",
            self.certificate_not_after.clone(),
        );
        registry.register(
            "certificate_ocsp_next_update_timestamp_seconds",
            "When each certificate's OCSP response goes stale (its nextUpdate), for responses that say",
            self.ocsp_next_update.clone(),
        );
        registry.register(
            "certificate_ocsp_stapled",
            "1 while an OCSP response is stapled to the certificate's handshakes",
            self.ocsp_stapled.clone(),
        );
        registry.register(
            "pool_server_up",
            "1 while a pool's server passes its health checks and is not ejected",
            self.pool_server_up.clone(),
        );
        registry.register(
            "pool_server_draining",
            "1 while a pool's server is draining: no new connections, the open ones run to their end",
            self.pool_server_draining.clone(),
        );
        registry.register(
            "pool_server_active_connections",
            "Connections in progress to each pool server",
            self.pool_server_active.clone(),
        );
        registry.register(
            "acme_next_renewal_timestamp_seconds",
            "When each ACME certificate is due for its next order (renew_before ahead of its notAfter)",
            self.acme_next_renewal.clone(),
        );
        registry.register(
            "acme_last_order_timestamp_seconds",
            "When each ACME certificate's last order ended, labelled by challenge and result (issued, failed)",
            self.acme_last_order.clone(),
        );
        registry.register(
            "plugin_call_seconds",
            "Duration of plugin calls (route and admit)",
            self.plugin_calls.clone(),
        );
        registry.register(
            "plugin_failures",
            "Plugin traps, timeouts, memory refusals, invalid decisions and calls refused over budget",
            self.plugin_failures.clone(),
        );
        registry.register(
            "plugin_cpu_seconds",
            "CPU time of a tenant's plugin calls and instances, as its threads' CPU clocks counted it: what its plugin_cpu budget was charged",
            self.plugin_cpu.clone(),
        );
        registry.register(
            "plugin_log_dropped",
            "Plugin log lines dropped because the plugin logged faster than 32 KiB a second",
            self.plugin_log_dropped.clone(),
        );
    }

    /// The gauge of `listener`'s connections in progress.
    pub fn active(&self, listener: &str) -> Gauge {
        let labels = ListenerLabels {
            listener: listener.into(),
        };
        self.active.get_or_create(&labels).clone()
    }

    /// The gauge of connections being relayed on `route` (a label from
    /// [`Metrics::route_label`]) of `tenant`, or of `listener` for no tenant.
    pub fn route_active(&self, listener: &str, tenant: Option<&str>, route: &LabelValue) -> Gauge {
        let labels = RouteActiveLabels {
            listener: listener.into(),
            tenant: tenant.unwrap_or("-").into(),
            route: route.clone(),
        };
        self.route_active.get_or_create(&labels).clone()
    }

    /// Records a finished connection: its outcome (with its route, capped
    /// per tenant and listener), its sniff failure if any, its bytes.
    pub fn connection_ended(&self, ended: &Ended<'_>) {
        let listener = LabelValue::from(ended.listener);
        for (direction, bytes) in [("up", ended.bytes_up), ("down", ended.bytes_down)] {
            let labels = BytesLabels {
                listener: listener.clone(),
                direction,
            };
            self.bytes.get_or_create(&labels).inc_by(bytes);
        }
        if let Some(reason) = ended.sniff_failure {
            let labels = SniffLabels {
                listener: listener.clone(),
                reason,
            };
            self.sniff_failures.get_or_create(&labels).inc();
        }
        let route = ended.route.clone();
        let tenant: LabelValue = ended.tenant.unwrap_or("-").into();
        if ended.bytes_up > 0 || ended.bytes_down > 0 {
            let mut labels = RouteBytesLabels {
                listener: listener.clone(),
                tenant: tenant.clone(),
                route: route.clone(),
                direction: "up",
            };
            self.route_bytes.get_or_create(&labels).inc_by(ended.bytes_up);
            labels.direction = "down";
            self.route_bytes.get_or_create(&labels).inc_by(ended.bytes_down);
        }
        let labels = ConnectionLabels {
            tenant,
            listener,
            route,
            outcome: ended.outcome.into(),
        };
        self.connections.get_or_create(&labels).inc();
    }

    /// Counts a connection closed at accept (or at its client's limit) on
    /// `listener`; `limit` is `listener`, `global`, `client` or
    /// `descriptors`.
    pub fn shed(&self, listener: &str, limit: &'static str) {
        let labels = ShedLabels {
            listener: listener.into(),
            limit,
        };
        self.shed.get_or_create(&labels).inc();
    }

    /// Counts a failed `accept` on `listener`.
    pub fn accept_failed(&self, listener: &str) {
        let labels = ListenerLabels {
            listener: listener.into(),
        };
        self.accept_errors.get_or_create(&labels).inc();
    }

    /// Counts a tenant connection refused at the tenant's limit.
    pub fn tenant_limited(&self, tenant: &str) {
        let labels = TenantLabels { tenant: tenant.into() };
        self.tenant_limited.get_or_create(&labels).inc();
    }

    /// Counts a tenant decision that named something outside the tenant.
    pub fn tenant_violation(&self, tenant: &str) {
        let labels = TenantLabels { tenant: tenant.into() };
        self.tenant_violations.get_or_create(&labels).inc();
    }

    /// Counts a plugin log line dropped over the plugin's log budget.
    pub fn plugin_log_dropped(&self, plugin: &str) {
        let labels = PluginLabels { plugin: plugin.into() };
        self.plugin_log_dropped.get_or_create(&labels).inc();
    }

    /// The counter of the CPU time `plugin` spent under a tenant's budget,
    /// kept by the plugin so that a call does not look it up.
    pub fn plugin_cpu(&self, plugin: &str) -> CpuCounter {
        let labels = PluginLabels { plugin: plugin.into() };
        self.plugin_cpu.get_or_create(&labels).clone()
    }

    /// Records a plugin call's duration, and its failure's kind if it failed.
    pub fn plugin_call(&self, plugin: &str, seconds: f64, failure: Option<&'static str>) {
        let labels = PluginLabels { plugin: plugin.into() };
        self.plugin_calls.get_or_create(&labels).observe(seconds);
        if let Some(kind) = failure {
            let labels = FailureLabels {
                plugin: labels.plugin,
                kind,
            };
            self.plugin_failures.get_or_create(&labels).inc();
        }
    }

    /// Counts a rebuild-and-swap of the configuration by its result.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// The `route` label for a route name decided for a tenant's connection
    /// (`tenant`), or else for `listener`'s: the name itself while that owner
    /// has fewer than [`MAX_ROUTE_LABELS`] names with a series, `other` for
    /// new ones after.
    pub fn route_label(&self, tenant: Option<&str>, listener: &str, route: &str) -> LabelValue {
        let (owners, owner) = match tenant {
            Some(tenant) => (&self.route_labels.tenants, tenant),
            None => (&self.route_labels.listeners, listener),
        };
        let known = crate::sync::read(owners)
            .get(owner)
            .is_some_and(|names| names.contains(route));
        if known {
            return route.into();
        }
        let mut owners = crate::sync::write(owners);
        let names = owners.entry(owner.to_owned()).or_default();
        if names.len() >= MAX_ROUTE_LABELS && !names.contains(route) {
            return "other".into();
        }
        names.insert(route.to_owned());
        route.into()
    }

    /// Sets the certificate gauges to the certificates in use now (those
    /// a reload removed disappear).
    pub fn set_certificates(&self, certificates: &[CertificateStatus]) {
        self.certificate_not_after.clear();
        self.ocsp_next_update.clear();
        self.ocsp_stapled.clear();
        let seconds = |at: u64| i64::try_from(at).unwrap_or(i64::MAX);
        for status in certificates {
            let labels = CertificateLabels {
                certificate: status.name.as_str().into(),
            };
            self.certificate_not_after
                .get_or_create(&labels)
                .set(seconds(status.not_after));
            if let Some(next) = status.ocsp_next_update {
                self.ocsp_next_update.get_or_create(&labels).set(seconds(next));
            }
            self.ocsp_stapled
                .get_or_create(&labels)
                .set(i64::from(status.ocsp_stapled));
        }
    }

    /// Sets the pool server gauges to `pools`' servers, dropping any other
    /// series.
    pub fn set_pools(&self, pools: &std::collections::BTreeMap<String, std::sync::Arc<crate::pool::Pool>>) {
        self.pool_server_up.clear();
        self.pool_server_draining.clear();
        self.pool_server_active.clear();
        for (name, pool) in pools {
            for backend in pool.backends() {
                let stats = backend.stats();
                let labels = PoolServerLabels {
                    pool: name.as_str().into(),
                    server: stats.address.as_str().into(),
                };
                let flag = |on: bool| i64::from(on);
                self.pool_server_up
                    .get_or_create(&labels)
                    .set(flag(stats.healthy && !stats.ejected));
                self.pool_server_draining
                    .get_or_create(&labels)
                    .set(flag(stats.draining));
                self.pool_server_active
                    .get_or_create(&labels)
                    .set(i64::try_from(stats.active).unwrap_or(i64::MAX));
            }
        }
    }

    /// Sets the ACME gauges to `certificates`, dropping any other series.
    pub fn set_acme(&self, certificates: &[AcmeStatus]) {
        self.acme_next_renewal.clear();
        self.acme_last_order.clear();
        let seconds = |at: u64| i64::try_from(at).unwrap_or(i64::MAX);
        for status in certificates {
            if let Some(next) = status.next_renewal {
                let labels = CertificateLabels {
                    certificate: status.name.as_str().into(),
                };
                self.acme_next_renewal.get_or_create(&labels).set(seconds(next));
            }
            if let Some((at, result)) = status.last_order {
                let labels = AcmeOrderLabels {
                    certificate: status.name.as_str().into(),
                    challenge: status.challenge,
                    result,
                };
                self.acme_last_order.get_or_create(&labels).set(seconds(at));
            }
        }
    }

    /// Sets the gauges of plugins and instances in memory.
    pub fn set_plugins(&self, loaded: usize, instances: usize) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.plugins_loaded.set(gauge(loaded));
        self.plugin_instances.set(gauge(instances));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let (open, in_use) = crate::relay::pipes();
        self.splice_pipes_open.set(gauge(open));
        self.splice_pipes_in_use.set(gauge(in_use));
        self.parked_bytes.set(gauge(crate::parked::parked_bytes()));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_from_plugins_cannot_break_the_scrape() {
        let metrics = Metrics::new();
        let labels = ConnectionLabels {
            listener: "public".into(),
            tenant: "-".into(),
            route: "x\",outcome=\"fake\\\nweir_forged 1".into(),
            outcome: "closed".into(),
        };
        metrics.connections.get_or_create(&labels).inc();
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("weir_connections_total{"))
            .expect("the series");
        assert_eq!(
            line,
            r#"weir_connections_total{listener="public",tenant="-",route="x\",outcome=\"fake\\\nweir_forged 1",outcome="closed"} 1"#
        );
        assert!(!text.lines().any(|l| l.starts_with("weir_forged")), "{text}");
        // Counters operators alert on exist from the start.
        assert!(text.contains("weir_reloads_total{result=\"error\"} 0"), "{text}");
    }

    #[test]
    fn route_names_beyond_the_cap_count_as_other() {
        let metrics = Metrics::new();
        for n in 0..MAX_ROUTE_LABELS {
            let route = format!("r{n}");
            assert_eq!(metrics.route_label(Some("a"), "public", &route).as_str(), route);
        }
        assert_eq!(metrics.route_label(Some("a"), "public", "one-more").as_str(), "other");
        // Names seen before keep their series; another owner has its own cap.
        assert_eq!(metrics.route_label(Some("a"), "public", "r7").as_str(), "r7");
        assert_eq!(
            metrics.route_label(Some("b"), "public", "one-more").as_str(),
            "one-more"
        );
        assert_eq!(metrics.route_label(None, "a", "one-more").as_str(), "one-more");
    }
}

/// What the admin API and the metrics say about a certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateStatus {
    /// Its name in the config.
    pub name: String,
    /// The end-entity certificate's notAfter, seconds since the Unix epoch.
    pub not_after: u64,
    /// Its OCSP response's nextUpdate (seconds since the Unix epoch), if
    /// one is stapled and says.
    pub ocsp_next_update: Option<u64>,
    /// Whether an OCSP response is stapled right now.
    pub ocsp_stapled: bool,
}

/// A finished connection, as [`Metrics::connection_ended`] counts it.
#[derive(Debug)]
pub struct Ended<'a> {
    /// Its listener.
    pub listener: &'a str,
    /// Its tenant, if it had one.
    pub tenant: Option<&'a str>,
    /// The `route` label ([`Metrics::route_label`]) of the route the
    /// decision named, or of `-` before one.
    pub route: LabelValue,
    /// How it ended (`closed`, `rejected`, ...).
    pub outcome: &'static str,
    /// Why it ended before routing, if it did.
    pub sniff_failure: Option<&'static str>,
    /// Bytes from the client to the upstream.
    pub bytes_up: u64,
    /// Bytes from the upstream to the client.
    pub bytes_down: u64,
}
