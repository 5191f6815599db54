//! Metrics plugins define through the `metrics` capability
//! (`weir_plugin_counter_total`, `weir_plugin_histogram`), and the
//! `counters` capability's evictions. A plugin's series are bounded
//! ([`MAX_SERIES`]) and go when the plugin does.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::{LabelValue, PluginLabels};

/// Most series (name and label pairs, counters and histograms together)
/// one plugin may have.
pub const MAX_SERIES: usize = 256;

/// Longest metric name.
pub const MAX_NAME_LEN: usize = 64;

/// Longest label value.
pub const MAX_LABEL_LEN: usize = 128;

/// One series a plugin defined.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OwnLabels {
    /// The plugin's name in the config.
    pub plugin: LabelValue,
    /// The name the plugin gave.
    pub name: LabelValue,
    /// Its free label value (empty for none).
    pub label: LabelValue,
}

struct Families {
    counters: Family<OwnLabels, Counter>,
    histograms: Family<OwnLabels, Histogram>,
    evictions: Family<PluginLabels, Counter>,
}

static FAMILIES: LazyLock<Families> = LazyLock::new(|| Families {
    counters: Family::default(),
    histograms: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 20))),
    evictions: Family::default(),
});

pub(super) fn register(registry: &mut Registry) {
    registry.register(
        "plugin_counter",
        "Counters plugins define (the metrics capability), by plugin, name and label",
        FAMILIES.counters.clone(),
    );
    registry.register(
        "plugin_histogram",
        "Histograms plugins define (the metrics capability), by plugin, name and label",
        FAMILIES.histograms.clone(),
    );
    registry.register(
        "plugin_counter_evictions",
        "Keys of a plugin's counters (the counters capability) evicted at its counter_keys cap",
        FAMILIES.evictions.clone(),
    );
}

/// Counts `keys` keys of `plugin`'s counters evicted.
pub fn counter_evictions(plugin: &LabelValue, keys: u64) {
    let labels = PluginLabels { plugin: plugin.clone() };
    FAMILIES.evictions.get_or_create(&labels).inc_by(keys);
}

/// One plugin's metrics: the series it has, within [`MAX_SERIES`], and
/// for a tenant's plugin (or shadow) within its tenant's
/// `max_metric_series` too.
pub struct OwnMetrics {
    plugin: LabelValue,
    series: Mutex<HashSet<(bool, OwnLabels)>>,
    tenant: arc_swap::ArcSwapOption<TenantSeries>,
}

/// The series all of one tenant's plugins have, and how many they may
/// have; carried across reloads while the limit is the same.
#[derive(Debug)]
pub struct TenantSeries {
    tenant: Box<str>,
    max: usize,
    held: std::sync::atomic::AtomicUsize,
}

impl TenantSeries {
    /// No series yet, at most `max`.
    pub fn new(tenant: &str, max: usize) -> TenantSeries {
        TenantSeries {
            tenant: tenant.into(),
            max,
            held: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Its limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The series its plugins have now.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl OwnMetrics {
    /// No series yet.
    pub fn new(plugin: &str) -> OwnMetrics {
        OwnMetrics {
            plugin: plugin.into(),
            series: Mutex::new(HashSet::new()),
            tenant: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Counts the plugin's series towards `tenant`'s (or no one's): those
    /// it has move from the count it was under before.
    pub fn set_tenant(&self, tenant: Option<Arc<TenantSeries>>) {
        use std::sync::atomic::Ordering;
        let series = crate::sync::lock(&self.series);
        let before = self.tenant.swap(tenant.clone());
        if before.as_ref().map(Arc::as_ptr) == tenant.as_ref().map(Arc::as_ptr) {
            return;
        }
        if let Some(before) = before {
            before.held.fetch_sub(series.len(), Ordering::AcqRel);
        }
        if let Some(tenant) = tenant {
            tenant.held.fetch_add(series.len(), Ordering::AcqRel);
        }
    }

    /// Adds `value` to counter `name`, `label`.
    pub fn count(&self, name: &str, label: &str, value: u64) -> Result<(), String> {
        let labels = self.series(false, name, label)?;
        FAMILIES.counters.get_or_create(&labels).inc_by(value);
        Ok(())
    }

    /// Records `value` in histogram `name`, `label`.
    pub fn observe(&self, name: &str, label: &str, value: f64) -> Result<(), String> {
        if !value.is_finite() {
            return Err(format!("{value} is not a finite number"));
        }
        let labels = self.series(true, name, label)?;
        FAMILIES.histograms.get_or_create(&labels).observe(value);
        Ok(())
    }

    /// The series' labels, checked, and counted against the cap.
    fn series(&self, histogram: bool, name: &str, label: &str) -> Result<OwnLabels, String> {
        check_name(name)?;
        if label.len() > MAX_LABEL_LEN {
            return Err(format!("a label of {} bytes (at most {MAX_LABEL_LEN})", label.len()));
        }
        let labels = OwnLabels {
            plugin: self.plugin.clone(),
            name: name.into(),
            label: label.into(),
        };
        let mut series = crate::sync::lock(&self.series);
        let key = (histogram, labels);
        if !series.contains(&key) {
            if series.len() >= MAX_SERIES {
                return Err(format!(
                    "the plugin has {MAX_SERIES} series already (names and labels); no more are made"
                ));
            }
            if let Some(tenant) = self.tenant.load().as_deref() {
                use std::sync::atomic::Ordering;
                if tenant.held.fetch_add(1, Ordering::AcqRel) >= tenant.max {
                    tenant.held.fetch_sub(1, Ordering::AcqRel);
                    return Err(format!(
                        "tenant `{}`'s plugins have {} series already (max_metric_series); no more are made",
                        tenant.tenant, tenant.max
                    ));
                }
            }
            series.insert(key.clone());
        }
        Ok(key.1)
    }
}

impl Drop for OwnMetrics {
    /// The plugin is gone (removed, or reloaded under other settings): its
    /// series leave `/metrics` with it.
    fn drop(&mut self) {
        let series = crate::sync::lock(&self.series).len();
        if let Some(tenant) = self.tenant.load().as_deref() {
            tenant.held.fetch_sub(series, std::sync::atomic::Ordering::AcqRel);
        }
        for (histogram, labels) in crate::sync::lock(&self.series).drain() {
            if histogram {
                FAMILIES.histograms.remove(&labels);
            } else {
                FAMILIES.counters.remove(&labels);
            }
        }
        FAMILIES.evictions.remove(&PluginLabels {
            plugin: self.plugin.clone(),
        });
    }
}

/// A Prometheus metric name of at most [`MAX_NAME_LEN`] bytes.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
    if valid {
        return Ok(());
    }
    let shown: String = name.chars().take(MAX_NAME_LEN).collect();
    Err(format!(
        "{:?} is not a metric name (1 to {MAX_NAME_LEN} of a-z, A-Z, 0-9 and _, not starting with a digit)",
        shown.escape_debug().to_string()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_labels_and_the_series_cap_are_enforced() {
        let own = OwnMetrics::new("own-test");
        own.count("refused", "", 1).expect("a good name");
        assert!(
            own.count("9lives", "", 1)
                .expect_err("refused")
                .contains("not a metric name")
        );
        assert!(
            own.count("a-b", "", 1)
                .expect_err("refused")
                .contains("not a metric name")
        );
        assert!(own.count("", "", 1).is_err());
        assert!(own.count(&"a".repeat(65), "", 1).is_err());
        assert!(
            own.count("x", &"l".repeat(129), 1)
                .expect_err("refused")
                .contains("label")
        );
        assert!(own.observe("x", "", f64::NAN).is_err());
        for i in 1..MAX_SERIES {
            own.count("many", &i.to_string(), 1).expect("within the cap");
        }
        let refused = own.count("many", "one-more", 1).expect_err("refused");
        assert!(refused.contains("256 series"), "{refused}");
        own.count("many", "1", 1).expect("an existing series still counts");
        // A hostile label is escaped in the exposition.
        let own2 = OwnMetrics::new("own-test-2");
        own2.count("evil", "x\",plugin=\"other\n", 1).expect("any label text");
        let text = crate::metrics::METRICS.encode();
        assert!(
            text.contains(
                r#"weir_plugin_counter_total{plugin="own-test-2",name="evil",label="x\",plugin=\"other\n"} 1"#
            ),
            "{text}"
        );
        drop(own2);
        assert!(
            !crate::metrics::METRICS.encode().contains("own-test-2"),
            "series go with the plugin"
        );
    }

    /// Ten plugins of one tenant (its shadows, say) share its series: the
    /// tenant's cap holds over all of them, and a plugin that goes gives
    /// its series back.
    #[test]
    fn a_tenants_plugins_share_its_series() {
        let tenant = Arc::new(TenantSeries::new("acme", 300));
        let plugins: Vec<OwnMetrics> = (0..10)
            .map(|n| OwnMetrics::new(&format!("tenant-series-{n}")))
            .collect();
        for plugin in &plugins {
            plugin.set_tenant(Some(Arc::clone(&tenant)));
        }
        let mut made = 0;
        for plugin in &plugins {
            for i in 0..MAX_SERIES {
                if plugin.count("series", &i.to_string(), 1).is_ok() {
                    made += 1;
                }
            }
        }
        assert_eq!(made, 300);
        assert_eq!(tenant.held(), 300);
        let refused = plugins[9].count("series", "more", 1).expect_err("refused");
        assert!(
            refused.contains("tenant `acme`'s plugins have 300 series already"),
            "{refused}"
        );
        let mut plugins = plugins;
        drop(plugins.remove(0));
        assert_eq!(tenant.held(), 300 - MAX_SERIES);
        plugins[8].count("series", "room again", 1).expect("room");
        // Moved to no tenant: its series (300 - 256) leave the tenant's count.
        plugins[0].set_tenant(None);
        assert_eq!(tenant.held(), 1);
    }
}
