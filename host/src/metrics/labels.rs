//! The label sets of weir's metric families.

use prometheus_client::encoding::EncodeLabelSet;

use super::LabelValue;

/// Labels of finished connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// The listener.
    pub listener: LabelValue,
    /// The tenant, `-` for none.
    pub tenant: LabelValue,
    /// The decision's route name, `-` before one.
    pub route: LabelValue,
    /// How it ended: `closed`, `rejected`, `denied`, `connect-failed`, ...
    pub outcome: LabelValue,
}

/// Bytes of one route, one way.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBytesLabels {
    /// The listener.
    pub listener: LabelValue,
    /// The tenant, `-` for none.
    pub tenant: LabelValue,
    /// The decision's route name (bounded as in `weir_connections_total`).
    pub route: LabelValue,
    /// `up` (client to server) or `down`.
    pub direction: &'static str,
}

/// One route of a listener or tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteActiveLabels {
    /// The listener.
    pub listener: LabelValue,
    /// The tenant, `-` for none.
    pub tenant: LabelValue,
    /// The decision's route name (bounded as in `weir_connections_total`).
    pub route: LabelValue,
}

/// A listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// The listener.
    pub listener: LabelValue,
}

/// Bytes of one direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// The listener.
    pub listener: LabelValue,
    /// `up` (client to upstream) or `down`.
    pub direction: &'static str,
}

/// A plugin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// The plugin's name.
    pub plugin: LabelValue,
}

/// A plugin failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The plugin's name.
    pub plugin: LabelValue,
    /// `trap`, `timeout`, `memory`, `invalid-decision` or `budget`.
    pub kind: &'static str,
}

/// A refused first flight.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SniffLabels {
    /// The listener.
    pub listener: LabelValue,
    /// `timeout`, `client-closed`, `bad-hello`, `bad-startup`, `bad-proxy-header`.
    pub reason: &'static str,
}

/// A tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// The tenant's name.
    pub tenant: LabelValue,
}

/// A connection shed at a limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// The listener.
    pub listener: LabelValue,
    /// `listener`, `global`, `client` (`max_connections_per_client`) or
    /// `descriptors` (`limits.descriptor_reserve`).
    pub limit: &'static str,
}

/// A certificate from `[certificates]`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// Its name in the config.
    pub certificate: LabelValue,
}

/// A reload's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// One server of a pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolServerLabels {
    /// The pool.
    pub pool: LabelValue,
    /// The server's `host:port`.
    pub server: LabelValue,
}

/// An ACME certificate's last order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeOrderLabels {
    /// Its name in the config.
    pub certificate: LabelValue,
    /// `tls-alpn-01` or `dns-01`.
    pub challenge: &'static str,
    /// `issued` or `failed`.
    pub result: &'static str,
}
