//! The pools section: servers, weights, balancing policy, active and passive
//! health checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::defaults;

/// A named set of upstream servers.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Servers: `"host:port"`, or `{ address = "host:port", weight = 3,
    /// drain = true }`.
    pub servers: Vec<ServerConfig>,
    /// How the first server to try is picked.
    #[serde(default)]
    pub policy: Policy,
    /// Active health checks; none when absent.
    pub health: Option<HealthConfig>,
    /// Passive ejection: a server whose connects fail this many times in a
    /// row is skipped for `eject_for`.
    #[serde(default)]
    pub passive: PassiveConfig,
    /// PROXY protocol version sent to this pool's servers when the decision
    /// asks for none.
    pub proxy_protocol: Option<u8>,
    /// Most servers tried for one connection (all of them when absent),
    /// within the listener's connect_timeout.
    pub max_attempts: Option<usize>,
    /// The tenant whose fleet policy published the pool, set by the node
    /// that lays the policy over the operator's config; never read from a
    /// file. Such a pool's servers are the tenant's word, not the
    /// operator's: each must lie in the tenant's `upstreams`.
    #[serde(skip)]
    pub published_by: Option<String>,
}

/// One server of a pool.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ServerConfig {
    /// `"host:port"`, weight 1.
    Address(String),
    /// `{ address = "host:port", weight = N, drain = false }`.
    Weighted {
        /// `host:port`.
        address: String,
        /// Relative share under the `weighted` policy (1 to 1000).
        #[serde(default = "defaults::weight")]
        weight: u32,
        /// Draining: no new connections, those open run to their end.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        drain: bool,
    },
}

impl ServerConfig {
    /// The `host:port`.
    pub fn address(&self) -> &str {
        match self {
            ServerConfig::Address(address) | ServerConfig::Weighted { address, .. } => address,
        }
    }

    /// The weight.
    pub fn weight(&self) -> u32 {
        match self {
            ServerConfig::Address(_) => 1,
            ServerConfig::Weighted { weight, .. } => *weight,
        }
    }

    /// Whether it is draining.
    pub fn drain(&self) -> bool {
        matches!(self, ServerConfig::Weighted { drain: true, .. })
    }

    /// The same server, draining or not.
    pub fn draining(&self, drain: bool) -> ServerConfig {
        ServerConfig::Weighted {
            address: self.address().to_owned(),
            weight: self.weight(),
            drain,
        }
    }
}

/// How a pool picks the first server to try.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Each connection starts one server further along.
    #[default]
    RoundRobin,
    /// The server with the fewest connections in progress (ties in turn).
    LeastConnections,
    /// A uniformly random server.
    Random,
    /// In proportion to the servers' weights (smooth weighted round robin).
    Weighted,
}

/// Active health checks of a pool's servers.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between checks.
    #[serde(default = "defaults::health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Deadline of one check (connect, send, expect).
    #[serde(default = "defaults::health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring a server back.
    #[serde(default = "defaults::rise")]
    pub rise: u32,
    /// Consecutive failures that take a server out.
    #[serde(default = "defaults::fall")]
    pub fall: u32,
    /// Bytes to send after connecting (escapes `\r`, `\n`, `\t`, `\\`).
    pub send: Option<String>,
    /// Bytes the answer must contain for the check to pass.
    pub expect: Option<String>,
}

/// Passive ejection settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveConfig {
    /// Consecutive connect failures that eject a server (0 turns it off).
    #[serde(default = "defaults::passive_failures")]
    pub failures: u32,
    /// How long an ejected server is skipped.
    #[serde(default = "defaults::eject_for", with = "humantime_serde")]
    pub eject_for: Duration,
}

impl Default for PassiveConfig {
    fn default() -> PassiveConfig {
        PassiveConfig {
            failures: defaults::passive_failures(),
            eject_for: defaults::eject_for(),
        }
    }
}
