//! Shadow rollouts' metrics: what each candidate plugin decided against the
//! live one it shadows.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::LabelValue;

/// One candidate against its live plugin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    /// The candidate (the plugin with `shadow_of`).
    pub plugin: LabelValue,
    /// The live plugin it shadows.
    pub live: LabelValue,
    /// `agreed`, `disagreed` or `failed`.
    pub result: &'static str,
}

/// A disagreement, by the live decision's route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DisagreementLabels {
    /// The candidate.
    pub plugin: LabelValue,
    /// The live plugin.
    pub live: LabelValue,
    /// The live decision's route name (bounded as in `weir_connections_total`).
    pub route: LabelValue,
}

struct Families {
    decisions: Family<ShadowLabels, Counter>,
    disagreements: Family<DisagreementLabels, Counter>,
}

static FAMILIES: LazyLock<Families> = LazyLock::new(|| Families {
    decisions: Family::default(),
    disagreements: Family::default(),
});

pub(super) fn register(registry: &mut Registry) {
    registry.register(
        "shadow_decisions",
        "Decisions of shadow plugins (shadow_of) beside the live plugin's: agreed, disagreed, failed",
        FAMILIES.decisions.clone(),
    );
    registry.register(
        "shadow_disagreements",
        "Connections on which a shadow plugin decided otherwise than the live one, by the live decision's route",
        FAMILIES.disagreements.clone(),
    );
}

/// Counts one shadow decision, and the disagreement on `route` if it was one.
pub fn shadow_decision(plugin: &str, live: &str, result: &'static str, route: Option<LabelValue>) {
    let (plugin, live) = (LabelValue::from(plugin), LabelValue::from(live));
    if let Some(route) = route {
        let labels = DisagreementLabels {
            plugin: plugin.clone(),
            live: live.clone(),
            route,
        };
        FAMILIES.disagreements.get_or_create(&labels).inc();
    }
    FAMILIES
        .decisions
        .get_or_create(&ShadowLabels { plugin, live, result })
        .inc();
}
