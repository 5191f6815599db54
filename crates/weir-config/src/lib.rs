//! weir's config file as written (TOML), and the checks that need nothing but
//! the file: references between sections, addresses, limits. Checks that need
//! the plugins themselves (loading, `configure`) happen when the gateway
//! builds a snapshot from this.
//!
//! A crate of its own so that what parses hostile text (a config file, a
//! fleet's shared config from etcd) builds and fuzzes without the runtime.
//!
//! Every section refuses unknown fields, so a misspelt setting is an error,
//! never a silently ignored line. The README's config reference documents
//! each field below.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod addr;
pub mod private;

mod acme;
pub use acme::{AcmeConfig, Challenge, DnsConfig, DnsProvider, TsigAlgorithm};
mod check;
mod defaults;
mod files;
pub use files::plugin_files_mut;
mod grants;
mod listener;
pub use grants::{Capability, MAX_COUNTER_KEYS, ResolverConfig};
pub use listener::{CertificateConfig, ListenerConfig, ListenerProtocol, ListenerTls, TlsVersion};
mod pool;
pub mod tls;

pub use check::check_pool_name;
pub use pool::{HealthConfig, PassiveConfig, Policy, PoolConfig, ServerConfig};

/// How a listener relays passthrough bytes.
///
/// Measured on loopback (bench/results): splicing halves the gateway's CPU
/// per GiB, but the endpoints receive spliced data more slowly, so end-to-end
/// throughput drops by 10-20 %; the copy loop beats HAProxy on both. Copy is
/// therefore the default, and `auto` the choice where the gateway's own CPU is
/// the bottleneck.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayMode {
    /// Copy, then `splice(2)` once a direction has carried 64 KiB
    /// bytes (Linux; elsewhere the same as `copy`).
    Auto,
    /// `splice(2)` from the first byte (Linux; elsewhere the same as `copy`).
    Splice,
    /// Always copy through a userspace buffer.
    #[default]
    Copy,
}

/// Most servers in one pool.
pub const MAX_POOL_SERVERS: usize = 10_000;
/// Shortest interval between a pool's health checks: each check of each
/// server is a connection, so a short interval on a large pool is load.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);

/// Most calls of one plugin in flight at once, over all connections; more
/// are refused without running. Each call in flight holds an instance (up
/// to `max_memory_mib` each), so this bounds a slow plugin's memory.
pub const MAX_PLUGIN_CALLS: usize = 64;

/// Instances of `reuse_instances = false` plugins alive at once, over all
/// of them, unless `[limits] isolated_instances` says otherwise.
pub const DEFAULT_ISOLATED_INSTANCES: u32 = 1000;

/// Most `[limits] isolated_instances`: each slot reserves (not commits)
/// 4 GiB of address space for its linear memory.
pub const MAX_ISOLATED_INSTANCES: u32 = 10_000;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file is not valid TOML, or a field has the wrong name or type.
    #[error("{path}: {error}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The TOML error, with line, column and field.
        error: toml::de::Error,
    },
    /// The file parses but says something impossible.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The dotted path of the offending field, e.g. `listeners.public.plugins`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Sockets that accept clients, by name.
    #[serde(default)]
    pub listeners: BTreeMap<String, ListenerConfig>,
    /// WebAssembly plugins, by name; listeners refer to them in their chain.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Named groups of upstream servers that decisions can target.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    /// Certificates (chain and key) the gateway presents, by name: to
    /// clients when it terminates TLS, to upstreams as a client certificate.
    #[serde(default)]
    pub certificates: BTreeMap<String, CertificateConfig>,
    /// DNS providers, by name, that ACME DNS-01 challenges are published
    /// through.
    #[serde(default)]
    pub dns: BTreeMap<String, DnsConfig>,
    /// Trust anchors, by name: CA bundles that verify client certificates
    /// and upstreams, and pinned upstream certificate fingerprints.
    #[serde(default)]
    pub cas: BTreeMap<String, CaConfig>,
    /// How RA-TLS attestations are checked.
    #[serde(default)]
    pub attestation: AttestationConfig,
    /// Tenants: who owns which server names, and what their plugins may
    /// route to.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// The admin HTTP server (metrics, status, reload); off when absent.
    pub admin: Option<AdminConfig>,
    /// When the config is read again.
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Process-wide limits.
    #[serde(default)]
    pub limits: Limits,
    /// What `weir run` does on SIGTERM or SIGINT.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Where compiled plugin code is kept between starts.
    #[serde(default)]
    pub cache: CacheConfig,
    /// The resolver behind plugins' `dns` capability.
    #[serde(default)]
    pub resolver: ResolverConfig,
    /// Where the file was read from; relative paths in it are relative to its
    /// directory.
    #[serde(skip)]
    pub path: PathBuf,
    /// The SHA-256 of the text it was parsed from, hex.
    #[serde(skip)]
    pub sha256: String,
}

/// A tenant: the server names it owns, its plugin chain, what its
/// decisions may name, and its limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Domain suffixes: a connection whose SNI is one of these or lies below
    /// one belongs to the tenant (the longest match among all tenants wins).
    pub domains: Vec<String>,
    /// The tenant's plugin chain, used instead of the listener's for its
    /// connections. Its plugins may not be used by anyone else.
    pub plugins: Vec<String>,
    /// Pools its decisions may name.
    #[serde(default)]
    pub pools: Vec<String>,
    /// Address ranges, optionally with ports, weir may connect to for the
    /// tenant beyond its pools' own servers: the addresses its decisions
    /// name (DNS names are refused), a `pool:port` target, the servers of
    /// pools it publishes in fleet mode. `10.0.0.0/8`, `10.0.0.0/8:443`,
    /// `127.0.0.1/32:8000-8099`, `[fd00::/8]:443`.
    #[serde(default)]
    pub upstreams: Vec<addr::UpstreamRange>,
    /// Certificates its terminations may present (also when chosen by SNI).
    #[serde(default)]
    pub certificates: Vec<String>,
    /// CAs its decisions may name.
    #[serde(default)]
    pub cas: Vec<String>,
    /// Most connections of the tenant at once; more are refused at once.
    pub max_connections: Option<usize>,
    /// Largest `max_memory_mib` its plugins may have.
    pub max_plugin_memory_mib: Option<u32>,
    /// Longest `timeout` its plugins may have (an operator may raise it, up
    /// to the 1 s every plugin is held to).
    #[serde(default = "defaults::tenant_plugin_timeout", with = "humantime_serde")]
    pub max_plugin_timeout: Duration,
    /// Plugin CPU the tenant may spend a second (a bucket that holds a tenth
    /// of a second's worth): while it is spent, its connections get their
    /// plugin's `on_error` at once, without the plugin running.
    #[serde(default = "defaults::tenant_plugin_cpu", with = "humantime_serde")]
    pub plugin_cpu: Duration,
    /// Most calls into the tenant's plugins in flight at once; more are
    /// refused the same way. Default: 4, or the number of worker threads if
    /// more (a fast plugin's calls overlap at most once per worker).
    pub max_plugin_calls: Option<usize>,
    /// Capabilities its plugins may be granted: `counters`, `metrics` and
    /// `pools` unless given; `dns` only when listed.
    #[serde(default = "grants::default_tenant_grants")]
    pub grants: Vec<Capability>,
    /// Largest `counter_keys` its plugins may have.
    #[serde(default = "grants::default_counter_keys")]
    pub max_counter_keys: usize,
    /// Most sockets weir holds open towards upstreams for the tenant at
    /// once: its connections' upstream sides and its pools' health probes.
    /// Default: an eighth of the descriptor limit, at least 64.
    pub max_descriptors: Option<usize>,
    /// Health probes of the tenant's pools a second, over all of them: a
    /// probe past it is skipped, and the server keeps its state.
    #[serde(default = "defaults::tenant_probes_per_second")]
    pub health_probes_per_second: u32,
    /// DNS lookups its plugins (`dns` capability) may make a second, over
    /// all of them; a lookup past it fails at once with `failed`.
    #[serde(default = "defaults::tenant_dns_per_second")]
    pub dns_queries_per_second: u32,
    /// Most shadow plugins beside its live ones.
    #[serde(default = "defaults::tenant_max_shadows")]
    pub max_shadows: usize,
    /// Most metric series (`metrics` capability) all its plugins and
    /// shadows have together; each plugin has at most 256 as well.
    #[serde(default = "defaults::tenant_max_metric_series")]
    pub max_metric_series: usize,
    /// Compile time a minute the components it publishes in fleet mode may
    /// take, over all of them. Its plugins compile one at a time on one
    /// low-priority thread; a new component found with the allowance spent
    /// is refused until it returns, and the node tries again then.
    #[serde(default = "defaults::tenant_compile_per_minute", with = "humantime_serde")]
    pub compile_per_minute: Duration,
}

/// Process-wide limits.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most connections served at once over all listeners; more are closed
    /// as soon as they are accepted.
    pub max_connections: Option<usize>,
    /// File descriptors kept free: a connection accepted with one of the
    /// last `descriptor_reserve` descriptors is closed at once, so weir never
    /// runs out (an accepted connection still finds one for its upstream,
    /// the admin API one for its client). Default: 1/16 of the descriptor
    /// limit, between 16 and 1024; 0 turns it off.
    pub descriptor_reserve: Option<u64>,
    /// Most pipes open at once for `relay = "auto"` and `"splice"`, in use
    /// or pooled (each is two descriptors). A spliced direction holds one
    /// only while a burst moves; a burst that finds none free is copied.
    /// Default: 1/8 of the descriptor limit, between 16 and 16,384; 0: never
    /// splice.
    pub max_pipes: Option<usize>,
    /// Most bytes all connections may hold before routing while their
    /// first bytes arrive slowly (their buffers and a few KiB each); past
    /// it, those parked longest are shed. Default 64 MiB.
    pub max_parked_bytes: Option<usize>,
    /// Most instances of `reuse_instances = false` plugins alive at once
    /// (their calls in flight, over all of them): slots reserved at start,
    /// so read at start only. Default 1000.
    pub isolated_instances: Option<u32>,
}

/// What `weir run` does on SIGTERM or SIGINT.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest weir waits, once it has stopped accepting, for the
    /// connections in progress to end before it closes them (0 s: at once).
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> ShutdownConfig {
        ShutdownConfig {
            drain_timeout: defaults::drain_timeout(),
        }
    }
}

/// The admin HTTP server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on; keep it on loopback or a management network.
    #[serde(default = "defaults::admin_bind")]
    pub bind: SocketAddr,
    /// When set, every request must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// The compiled-code cache: plugins compiled once, loaded from disk by
/// every later start, check and route. Read at start.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Use the cache (`weir run|check|route --no-cache` turns it off too).
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// The directory (relative to the config file); by default
    /// `$XDG_CACHE_HOME/weir/compiled`, else `~/.cache/weir/compiled`.
    pub dir: Option<PathBuf>,
    /// Most MiB kept; the entries used longest ago are evicted beyond it.
    #[serde(default = "defaults::cache_max_mib")]
    pub max_size_mib: u64,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            enabled: true,
            dir: None,
            max_size_mib: defaults::cache_max_mib(),
        }
    }
}

impl Config {
    /// The cache directory this config names, or the default one; `None`
    /// when the cache is off or there is no home to put it in.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if !self.cache.enabled {
            return None;
        }
        match &self.cache.dir {
            Some(dir) => Some(self.resolve(dir)),
            None => std::env::var_os("XDG_CACHE_HOME")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .filter(|d| !d.is_empty())
                        .map(|h| PathBuf::from(h).join(".cache"))
                })
                .map(|base| base.join("weir").join("compiled")),
        }
    }
}

/// When the config is read again.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Reload when the config file or a file it names changes.
    #[serde(default = "defaults::yes")]
    pub watch: bool,
    /// Quiet time after the last file event before reloading.
    #[serde(default = "defaults::debounce", with = "humantime_serde")]
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> ReloadConfig {
        ReloadConfig {
            watch: true,
            debounce: defaults::debounce(),
        }
    }
}

/// How the attestations in RA-TLS certificates are checked.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// DCAP collateral files (JSON), relative to the config file. A quote
    /// verifies when one of them verifies it; with none, every attestation
    /// is reported unverified.
    #[serde(default)]
    pub collateral: Vec<PathBuf>,
    /// Accept TDs that run with the debug attribute (never in production:
    /// the host can read a debug TD's memory).
    #[serde(default)]
    pub allow_debug: bool,
}

/// A trust anchor: a CA bundle, pinned certificate fingerprints, or both (then
/// both must hold).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// PEM file of CA certificates, relative to the config file.
    pub file: Option<PathBuf>,
    /// SHA-256 fingerprints (hex, colons allowed) of accepted upstream
    /// end-entity certificates. Only for verifying upstreams.
    #[serde(default)]
    pub pin_sha256: Vec<String>,
}

/// What the host does with a connection when a plugin fails (traps, runs out
/// of time or memory, or returns an invalid decision).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Refuse the connection.
    #[default]
    Deny,
    /// Ask the next plugin in the chain, as if this one had abstained.
    Next,
}

/// One plugin: a WebAssembly component and its settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Path of the `.wasm` component, relative to the config file.
    pub wasm: PathBuf,
    /// Handed to the plugin's `configure`: a table becomes JSON, a string is
    /// passed verbatim. Absent means an empty string.
    #[serde(default)]
    pub config: Option<toml::Value>,
    /// A file whose text is handed to `configure` verbatim, in place of
    /// `config` (e.g. a Traefik dynamic configuration for mesh-router).
    /// Relative to the config file; read whenever the config is loaded.
    pub config_file: Option<PathBuf>,
    /// What a failure of this plugin means for the connection.
    #[serde(default)]
    pub on_error: OnError,
    /// Longest a single call into the plugin may run (1 ms to 1 s). A call runs
    /// on one of the gateway's worker threads.
    #[serde(default = "defaults::plugin_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest instantiating the plugin and running its `configure` may take
    /// when it is loaded (1 ms to 60 s). Loads run off the connection path;
    /// an instance created for a connection (none idle) is bounded by
    /// `timeout` instead, as that connection's wait.
    #[serde(default = "defaults::configure_timeout", with = "humantime_serde")]
    pub configure_timeout: Duration,
    /// Most linear memory one instance may grow to, in MiB.
    #[serde(default = "defaults::plugin_memory_mib")]
    pub max_memory_mib: u32,
    /// Keep configured instances for later calls (the default). `false` gives
    /// every call a fresh instance, configured and then discarded, so no state
    /// survives from one connection to the next, at the price of an
    /// instantiation and a `configure` per call.
    #[serde(default = "defaults::yes")]
    pub reuse_instances: bool,
    /// With `reuse_instances = false`: start every instance from a snapshot
    /// of the plugin's memory taken once after `configure` (its configured
    /// image), instead of running `configure` in each. `false` runs it in
    /// each, for a plugin whose `configure` must differ per instance (one
    /// that seeds a random generator there, say).
    #[serde(default = "defaults::yes")]
    pub snapshot: bool,
    /// Capabilities (contract 0.2.0 and later) the plugin may call (`counters`,
    /// `metrics`, `dns`, `pools`); a component importing one not listed fails
    /// to load.
    #[serde(default)]
    pub grants: Vec<Capability>,
    /// Most keys its counters hold; the least recently hit is evicted.
    #[serde(default = "grants::default_counter_keys")]
    pub counter_keys: usize,
    /// Makes this plugin a candidate for the named (live) plugin: it decides
    /// every connection the live one does, off the connection's path, and
    /// only its agreement is counted. A shadow is in no chain.
    pub shadow_of: Option<String>,
    /// The tenant whose fleet policy published it: set by the node that
    /// lays the policy over the operator's config, never read from a file.
    /// Its compile time is the tenant's (`compile_per_minute`).
    #[serde(skip)]
    pub published_by: Option<String>,
}

impl PluginConfig {
    /// The string handed to `configure`: `config_file`'s text, or `config`.
    pub fn config_string(&self) -> std::io::Result<String> {
        if let Some(file) = &self.config_file {
            return std::fs::read_to_string(file);
        }
        Ok(match &self.config {
            None => String::new(),
            Some(toml::Value::String(verbatim)) => verbatim.clone(),
            // A TOML value always serialises to JSON: same data model.
            Some(table) => serde_json::to_string(table).unwrap_or_default(),
        })
    }
}

impl Config {
    /// The tenant plugin `name` belongs to: the tenant whose chain names it,
    /// or names the live plugin it shadows.
    pub fn plugin_tenant(&self, name: &str) -> Option<&str> {
        let live = self
            .plugins
            .get(name)
            .and_then(|p| p.shadow_of.as_deref())
            .unwrap_or(name);
        self.tenants
            .iter()
            .find(|(_, t)| t.plugins.iter().any(|p| p == live))
            .map(|(tenant, _)| tenant.as_str())
    }

    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks config text that was read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error,
        })?;
        config.path = path.to_owned();
        config.sha256 =
            weir_plugin_sdk::hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref());
        config.check()?;
        let resolved: Vec<(String, PathBuf)> = config
            .plugins
            .iter()
            .filter_map(|(name, p)| p.config_file.as_ref().map(|f| (name.clone(), config.resolve(f))))
            .collect();
        for (name, file) in resolved {
            if let Some(plugin) = config.plugins.get_mut(&name) {
                plugin.config_file = Some(file);
            }
        }
        Ok(config)
    }

    /// This config with `pools` added or replaced (`None`: removed),
    /// checked whole again.
    pub fn with_pools(&self, pools: &BTreeMap<String, Option<PoolConfig>>) -> Result<Config, ConfigError> {
        let mut config = self.clone();
        for (name, pool) in pools {
            match pool {
                Some(pool) => config.pools.insert(name.clone(), pool.clone()),
                None => config.pools.remove(name),
            };
        }
        config.check()?;
        Ok(config)
    }

    /// Resolves a path written in the file against the file's directory.
    pub fn resolve(&self, relative: &Path) -> PathBuf {
        match self.path.parent() {
            Some(dir) if relative.is_relative() => dir.join(relative),
            _ => relative.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests;
