//! The gateway's Prometheus metrics, process-wide, served by the admin
//! server at `GET /metrics`.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of finished connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// The listener.
    pub listener: String,
    /// The tenant, `-` for none.
    pub tenant: String,
    /// The decision's route name, `-` before one.
    pub route: String,
    /// How it ended: `closed`, `rejected`, `denied`, `connect-failed`, ...
    pub outcome: String,
}

/// A listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// The listener.
    pub listener: String,
}

/// Bytes of one direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// The listener.
    pub listener: String,
    /// `up` (client to upstream) or `down`.
    pub direction: &'static str,
}

/// A plugin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// The plugin's name.
    pub plugin: String,
}

/// A plugin failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The plugin's name.
    pub plugin: String,
    /// `trap`, `timeout`, `memory` or `invalid-decision`.
    pub kind: &'static str,
}

/// A refused first flight.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SniffLabels {
    /// The listener.
    pub listener: String,
    /// `timeout`, `client-closed`, `bad-hello`, `bad-startup`, `bad-proxy-header`.
    pub reason: &'static str,
}

/// A tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// The tenant's name.
    pub tenant: String,
}

/// A connection shed at a limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// The listener.
    pub listener: String,
    /// `listener`, `global` or `client` (`max_connections_per_client`).
    pub limit: &'static str,
}

/// A certificate from `[certificates]`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// Its name in the config.
    pub certificate: String,
}

/// A reload's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

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
    /// Certificates' notAfter.
    certificate_not_after: Family<CertificateLabels, Gauge>,
    /// Stapled OCSP responses' nextUpdate.
    ocsp_next_update: Family<CertificateLabels, Gauge>,
    /// Whether an OCSP response is stapled now.
    ocsp_stapled: Family<CertificateLabels, Gauge>,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("weir");
        let connections = Family::<ConnectionLabels, Counter>::default();
        let active = Family::<ListenerLabels, Gauge>::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let plugin_calls = Family::<PluginLabels, Histogram>::new_with_constructor(|| {
            // 1 µs .. ~1 s
            Histogram::new(exponential_buckets(1e-6, 4.0, 11))
        });
        let plugin_failures = Family::<FailureLabels, Counter>::default();
        let sniff_failures = Family::<SniffLabels, Counter>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let tenant_violations = Family::<TenantLabels, Counter>::default();
        let tenant_limited = Family::<TenantLabels, Counter>::default();
        let shed = Family::<ShedLabels, Counter>::default();
        let accept_errors = Family::<ListenerLabels, Counter>::default();
        let certificate_not_after = Family::<CertificateLabels, Gauge>::default();
        let ocsp_next_update = Family::<CertificateLabels, Gauge>::default();
        let ocsp_stapled = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "certificate_not_after_timestamp_seconds",
            "When each certificate expires (its notAfter), seconds since the Unix epoch",
            certificate_not_after.clone(),
        );
        registry.register(
            "certificate_ocsp_next_update_timestamp_seconds",
            "When each certificate's OCSP response goes stale (its nextUpdate), for responses that say",
            ocsp_next_update.clone(),
        );
        registry.register(
            "certificate_ocsp_stapled",
            "1 while an OCSP response is stapled to the certificate's handshakes",
            ocsp_stapled.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accept calls (out of file descriptors or memory); the connection waits in the kernel's backlog",
            accept_errors.clone(),
        );
        registry.register(
            "shed",
            "Connections closed on accept at a listener's or the global connection limit, or at a client's limit on a listener",
            shed.clone(),
        );
        registry.register(
            "tenant_violations",
            "Tenant decisions naming a pool, address, certificate or CA outside the tenant",
            tenant_violations.clone(),
        );
        registry.register(
            "tenant_limited",
            "Tenant connections refused at the tenant's connection limit",
            tenant_limited.clone(),
        );
        registry.register(
            "connections",
            "Finished connections by listener, tenant, route and outcome",
            connections.clone(),
        );
        registry.register(
            "connections_active",
            "Connections in progress by listener",
            active.clone(),
        );
        registry.register("bytes", "Bytes relayed by listener and direction", bytes.clone());
        registry.register(
            "plugin_call_seconds",
            "Duration of plugin calls (route and admit)",
            plugin_calls.clone(),
        );
        registry.register(
            "plugin_failures",
            "Plugin traps, timeouts, memory refusals and invalid decisions",
            plugin_failures.clone(),
        );
        registry.register(
            "sniff_failures",
            "Connections closed before routing, by reason",
            sniff_failures.clone(),
        );
        registry.register("reloads", "Config reloads by result", reloads.clone());
        Metrics {
            registry,
            connections,
            active,
            bytes,
            plugin_calls,
            plugin_failures,
            sniff_failures,
            reloads,
            tenant_violations,
            tenant_limited,
            shed,
            accept_errors,
            certificate_not_after,
            ocsp_next_update,
            ocsp_stapled,
        }
    }

    /// Sets the certificate gauges to the certificates in use now (those
    /// a reload removed disappear).
    pub fn set_certificates(&self, certificates: &[crate::tls::CertificateStatus]) {
        self.certificate_not_after.clear();
        self.ocsp_next_update.clear();
        self.ocsp_stapled.clear();
        let seconds = |at: u64| i64::try_from(at).unwrap_or(i64::MAX);
        for status in certificates {
            let labels = CertificateLabels {
                certificate: status.name.clone(),
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

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
