//! The config file as written (TOML), and the checks that need nothing but
//! the file: references between sections, addresses, limits. Checks that need
//! the plugins themselves (loading, `configure`) happen when a
//! [`Snapshot`](crate::snapshot::Snapshot) is built from this.
//!
//! Every section refuses unknown fields, so a misspelt setting is an error,
//! never a silently ignored line. The README's config reference documents
//! each field below.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::addr::HostPort;
use crate::relay::RelayMode;

/// Most servers in one pool.
pub const MAX_POOL_SERVERS: usize = 10_000;
/// Shortest interval between a pool's health checks: each check of each
/// server is a connection, so a short interval on a large pool is load.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);

/// Whether `name` can name a pool: 1 to 64 ASCII letters, digits, `-`, `_`
/// and `.`, starting with a letter or digit. Decisions name pools as
/// `pool` or `pool:port`, and names reach URLs, logs and metrics, so
/// `:`, `/`, spaces and the empty name are refused.
pub fn check_pool_name(name: &str) -> Result<(), String> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a pool name (1-64 letters, digits, `-`, `_`, `.`, starting with a letter or digit)"
        ))
    }
}

/// Most calls of one plugin in flight at once, over all connections; more
/// are refused without running. Each call in flight holds an instance (up
/// to `max_memory_mib` each), so this bounds a slow plugin's memory.
pub const MAX_PLUGIN_CALLS: usize = 64;

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
    /// Where the file was read from; relative paths in it are relative to its
    /// directory.
    #[serde(skip)]
    pub path: PathBuf,
}

/// What a listener expects its clients to send first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerProtocol {
    /// A TLS ClientHello; anything else is closed.
    #[default]
    Tls,
    /// PostgreSQL clients: an SSLRequest is answered `S` and the
    /// ClientHello that follows is routed (`postgres-tls`); a ClientHello
    /// first (PostgreSQL 17 direct TLS) is routed as `tls`; a StartupMessage
    /// without TLS is routed as `plain`.
    Postgres,
    /// Nothing is sniffed; plugins route on addresses alone.
    Plain,
}

/// One listening socket and the plugin chain that routes its connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on, `ip:port`.
    pub bind: SocketAddr,
    /// What clients send first.
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Plugin names, in the order they are asked; the first decision that is
    /// not `next` wins.
    pub plugins: Vec<String>,
    /// Deadline for everything before routing: the ClientHello must have
    /// arrived by then.
    #[serde(default = "defaults::sniff_timeout", with = "humantime_serde")]
    pub sniff_timeout: Duration,
    /// Deadline for connecting to an upstream server.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A relayed connection with no bytes in either direction for this long
    /// is closed.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Source ranges (CIDR) of load balancers that put a PROXY protocol v1
    /// or v2 header in front of every connection. A connection from these
    /// ranges must begin with one, and its source and destination become the
    /// connection's client and local addresses (for plugins, PROXY headers
    /// sent upstream, and logs). A header from any other source is refused.
    #[serde(default)]
    pub accept_proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Once either side of a relayed connection has sent FIN, no byte for
    /// this long closes it (the idle timeout still applies if shorter).
    #[serde(default = "defaults::half_close_timeout", with = "humantime_serde")]
    pub half_close_timeout: Duration,
    /// How passthrough bytes are moved: `copy` (the default), `auto` (copy,
    /// then `splice(2)` past 64 KiB in a direction), or `splice`.
    #[serde(default)]
    pub relay: RelayMode,
    /// Most connections this listener serves at once; more are closed as
    /// soon as they are accepted (those in progress are untouched).
    pub max_connections: Option<usize>,
    /// Most connections one client holds on this listener at once (the
    /// PROXY header's source behind a trusted load balancer); more are
    /// closed before their first byte is read. A client is its address cut
    /// to `client_prefix_v4` / `client_prefix_v6` bits, so one IPv6 /64 (a
    /// single customer's network) is one client.
    #[serde(default = "defaults::max_connections_per_client")]
    pub max_connections_per_client: u32,
    /// Bits of an IPv4 client address that name one client (1-32).
    #[serde(default = "defaults::client_prefix_v4")]
    pub client_prefix_v4: u8,
    /// Bits of an IPv6 client address that name one client (1-128).
    #[serde(default = "defaults::client_prefix_v6")]
    pub client_prefix_v6: u8,
    /// Deadline for the TLS handshake with the client when the gateway
    /// terminates, counted from the routing decision.
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// TLS settings used when a decision terminates TLS on this listener.
    #[serde(default)]
    pub tls: ListenerTls,
}

/// A listener's TLS settings for terminated connections.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Lowest TLS version accepted from clients.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Cipher suites offered, by their IANA names (e.g.
    /// `TLS13_AES_128_GCM_SHA256`, `TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384`),
    /// in order of preference. Empty means rustls's defaults.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    /// ALPN protocols offered to clients when a decision names none.
    #[serde(default)]
    pub alpn: Vec<String>,
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3).
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// The chain, end-entity certificate first, relative to the config file.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 RSA or SEC1 EC), relative to the
    /// config file.
    pub key: PathBuf,
    /// A DER OCSP response for the certificate, stapled to handshakes
    /// while it is current; relative to the config file.
    pub ocsp: Option<PathBuf>,
    /// Obtain and renew the certificate from an ACME CA, keeping it in
    /// `cert` and `key`.
    pub acme: Option<AcmeConfig>,
}

/// Where and how a certificate is ordered over ACME (RFC 8555), validated
/// with TLS-ALPN-01 (RFC 8737) on weir's own TLS listeners.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL (`https://`).
    pub directory: String,
    /// The names the certificate is for; no wildcards (TLS-ALPN-01 cannot
    /// validate them).
    pub domains: Vec<String>,
    /// Contact URLs for the account (`mailto:ops@example.com`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// PEM file of roots trusted for the directory's own HTTPS, for a
    /// private CA (the system roots otherwise); relative to the config file.
    pub directory_ca: Option<PathBuf>,
    /// Where the account's credentials are kept; `cert` with the extension
    /// `account.json` when absent. Relative to the config file.
    pub account: Option<PathBuf>,
    /// Renew when the certificate expires within this long.
    #[serde(default = "defaults::renew_before", with = "humantime_serde")]
    pub renew_before: Duration,
}

impl AcmeConfig {
    /// The account credentials file for a certificate kept in `cert`.
    pub fn account_file(&self, cert: &Path) -> PathBuf {
        self.account
            .clone()
            .unwrap_or_else(|| cert.with_extension("account.json"))
    }
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
    /// IP ranges its decisions may name as addresses (DNS names are refused).
    #[serde(default)]
    pub upstreams: Vec<ipnet::IpNet>,
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

/// A named set of upstream servers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Servers: `"host:port"`, or `{ address = "host:port", weight = 3 }`.
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
}

/// One server of a pool.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ServerConfig {
    /// `"host:port"`, weight 1.
    Address(String),
    /// `{ address = "host:port", weight = N }`.
    Weighted {
        /// `host:port`.
        address: String,
        /// Relative share under the `weighted` policy (1 to 1000).
        #[serde(default = "defaults::weight")]
        weight: u32,
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
}

/// How a pool picks the first server to try.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

mod defaults {
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
        32
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
    pub fn plugin_memory_mib() -> u32 {
        16
    }
    pub fn yes() -> bool {
        true
    }
}

impl Config {
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

    fn invalid(&self, field: String, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            field,
            reason: reason.into(),
        }
    }

    fn check_tenants(&self) -> Result<(), ConfigError> {
        let mut owners: BTreeMap<String, &str> = BTreeMap::new();
        let mut plugin_users: BTreeMap<&str, String> = BTreeMap::new();
        for (name, listener) in &self.listeners {
            for plugin in &listener.plugins {
                plugin_users.insert(plugin, format!("listener `{name}`"));
            }
        }
        for (name, tenant) in &self.tenants {
            let field = |f: &str| format!("tenants.{name}.{f}");
            if tenant.domains.is_empty() {
                return Err(self.invalid(field("domains"), "a tenant needs at least one domain"));
            }
            for domain in &tenant.domains {
                let canonical = match weir_plugin_sdk::names::Pattern::parse(domain) {
                    Ok(weir_plugin_sdk::names::Pattern::Exact(name)) => name,
                    Ok(_) => {
                        return Err(self.invalid(field("domains"), format!("`{domain}`: write a suffix without `*.`")));
                    }
                    Err(e) => return Err(self.invalid(field("domains"), format!("`{domain}`: {e}"))),
                };
                if let Some(other) = owners.insert(canonical, name) {
                    return Err(self.invalid(field("domains"), format!("`{domain}` is also tenant `{other}`'s")));
                }
            }
            if tenant.plugins.is_empty() {
                return Err(self.invalid(field("plugins"), "the plugin chain is empty"));
            }
            if tenant.max_plugin_timeout < Duration::from_millis(1)
                || tenant.max_plugin_timeout > Duration::from_secs(1)
            {
                return Err(self.invalid(field("max_plugin_timeout"), "must be between 1ms and 1s"));
            }
            if tenant.plugin_cpu < Duration::from_millis(1) || tenant.plugin_cpu > Duration::from_secs(64) {
                return Err(self.invalid(field("plugin_cpu"), "must be between 1ms and 64s (of CPU a second)"));
            }
            if tenant
                .max_plugin_calls
                .is_some_and(|calls| !(1..=MAX_PLUGIN_CALLS).contains(&calls))
            {
                return Err(self.invalid(
                    field("max_plugin_calls"),
                    format!("must be between 1 and {}", MAX_PLUGIN_CALLS),
                ));
            }
            for plugin in &tenant.plugins {
                let Some(settings) = self.plugins.get(plugin) else {
                    return Err(self.invalid(field("plugins"), format!("no plugin named `{plugin}`")));
                };
                if let Some(user) = plugin_users.insert(plugin, format!("tenant `{name}`")) {
                    return Err(self.invalid(
                        field("plugins"),
                        format!("plugin `{plugin}` is also used by {user}; a tenant's plugins are its own"),
                    ));
                }
                if let Some(max) = tenant.max_plugin_memory_mib
                    && settings.max_memory_mib > max
                {
                    return Err(self.invalid(
                        format!("plugins.{plugin}.max_memory_mib"),
                        format!(
                            "{} MiB exceeds tenant `{name}`'s max_plugin_memory_mib of {max}",
                            settings.max_memory_mib
                        ),
                    ));
                }
                let max = tenant.max_plugin_timeout;
                if settings.timeout > max {
                    return Err(self.invalid(
                        format!("plugins.{plugin}.timeout"),
                        format!(
                            "{:?} exceeds tenant `{name}`'s max_plugin_timeout of {max:?}",
                            settings.timeout
                        ),
                    ));
                }
            }
            for (what, names, known) in [
                ("pools", &tenant.pools, self.pools.keys().collect::<Vec<_>>()),
                ("certificates", &tenant.certificates, self.certificates.keys().collect()),
                ("cas", &tenant.cas, self.cas.keys().collect()),
            ] {
                if let Some(missing) = names.iter().find(|n| !known.contains(n)) {
                    return Err(self.invalid(field(what), format!("no {what} entry named `{missing}`")));
                }
            }
            if tenant.max_connections == Some(0) {
                return Err(self.invalid(field("max_connections"), "must be at least 1"));
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(self.invalid("listeners".into(), "no listener is configured"));
        }
        let mut binds: BTreeMap<SocketAddr, &str> = BTreeMap::new();
        for (name, listener) in &self.listeners {
            let field = |f: &str| format!("listeners.{name}.{f}");
            if listener.plugins.is_empty() {
                return Err(self.invalid(field("plugins"), "the plugin chain is empty"));
            }
            for plugin in &listener.plugins {
                if !self.plugins.contains_key(plugin) {
                    return Err(self.invalid(field("plugins"), format!("no plugin named `{plugin}`")));
                }
            }
            if let Some(other) = binds.insert(listener.bind, name)
                && listener.bind.port() != 0
            {
                return Err(self.invalid(
                    field("bind"),
                    format!("{} is also the address of listener `{other}`", listener.bind),
                ));
            }
            for (what, value) in [
                ("sniff_timeout", listener.sniff_timeout),
                ("connect_timeout", listener.connect_timeout),
                ("idle_timeout", listener.idle_timeout),
                ("half_close_timeout", listener.half_close_timeout),
                ("handshake_timeout", listener.handshake_timeout),
            ] {
                if value.is_zero() {
                    return Err(self.invalid(field(what), "must be longer than zero"));
                }
            }
            if listener.max_connections_per_client == 0 {
                return Err(self.invalid(field("max_connections_per_client"), "must be at least 1"));
            }
            if !(1..=32).contains(&listener.client_prefix_v4) {
                return Err(self.invalid(field("client_prefix_v4"), "must be between 1 and 32"));
            }
            if !(1..=128).contains(&listener.client_prefix_v6) {
                return Err(self.invalid(field("client_prefix_v6"), "must be between 1 and 128"));
            }
            if listener.max_connections == Some(0) {
                return Err(self.invalid(field("max_connections"), "must be at least 1"));
            }
            crate::tls::check_listener(&listener.tls)
                .map_err(|(f, reason)| self.invalid(field(&format!("tls.{f}")), reason))?;
        }
        for (name, certificate) in &self.certificates {
            let Some(acme) = &certificate.acme else { continue };
            let field = |f: &str| format!("certificates.{name}.acme.{f}");
            if !acme.directory.starts_with("https://") {
                return Err(self.invalid(field("directory"), "must be an https:// URL"));
            }
            if acme.domains.is_empty() {
                return Err(self.invalid(field("domains"), "must name at least one domain"));
            }
            for domain in &acme.domains {
                if domain.starts_with("*.") {
                    return Err(self.invalid(
                        field("domains"),
                        format!(
                            "`{domain}`: a wildcard needs the DNS-01 challenge; weir validates with TLS-ALPN-01 only"
                        ),
                    ));
                }
                if weir_plugin_sdk::names::canonicalize(domain.as_bytes()).as_deref() != Ok(domain.as_str()) {
                    return Err(self.invalid(
                        field("domains"),
                        format!("`{domain}` is not a host name in canonical form (lower case, no trailing dot)"),
                    ));
                }
            }
        }
        for (name, plugin) in &self.plugins {
            let field = |f: &str| format!("plugins.{name}.{f}");
            // A call runs on a gateway worker thread: a long deadline would let
            // one plugin stall unrelated connections.
            if plugin.timeout < Duration::from_millis(1) || plugin.timeout > Duration::from_secs(1) {
                return Err(self.invalid(field("timeout"), "must be between 1ms and 1s"));
            }
            if plugin.configure_timeout < Duration::from_millis(1) || plugin.configure_timeout > Duration::from_secs(60)
            {
                return Err(self.invalid(field("configure_timeout"), "must be between 1ms and 60s"));
            }
            if !(1..=4096).contains(&plugin.max_memory_mib) {
                return Err(self.invalid(field("max_memory_mib"), "must be between 1 and 4096"));
            }
            if plugin
                .config
                .as_ref()
                .is_some_and(|c| !matches!(c, toml::Value::String(_) | toml::Value::Table(_)))
            {
                return Err(self.invalid(field("config"), "must be a table or a string"));
            }
            if plugin.config.is_some() && plugin.config_file.is_some() {
                return Err(self.invalid(field("config_file"), "give `config` or `config_file`, not both"));
            }
        }
        for (name, ca) in &self.cas {
            let field = |f: &str| format!("cas.{name}.{f}");
            if ca.file.is_none() && ca.pin_sha256.is_empty() {
                return Err(self.invalid(format!("cas.{name}"), "give `file`, `pin_sha256`, or both"));
            }
            for pin in &ca.pin_sha256 {
                crate::tls::parse_pin(pin).map_err(|reason| self.invalid(field("pin_sha256"), reason))?;
            }
        }
        self.check_tenants()?;
        for (name, pool) in &self.pools {
            let field = |f: &str| format!("pools.{name}.{f}");
            check_pool_name(name).map_err(|reason| self.invalid(format!("pools.{name:?}"), reason))?;
            if pool.servers.is_empty() {
                return Err(self.invalid(field("servers"), "a pool needs at least one server"));
            }
            if pool.servers.len() > MAX_POOL_SERVERS {
                return Err(self.invalid(
                    field("servers"),
                    format!("{} servers; a pool has at most {MAX_POOL_SERVERS}", pool.servers.len()),
                ));
            }
            for server in &pool.servers {
                HostPort::parse(server.address()).map_err(|e| self.invalid(field("servers"), e.to_string()))?;
                if !(1..=1000).contains(&server.weight()) {
                    return Err(self.invalid(field("servers"), "a weight is between 1 and 1000"));
                }
            }
            if let Some(version) = pool.proxy_protocol {
                weir_plugin_sdk::proxy::check_version(version).map_err(|e| self.invalid(field("proxy_protocol"), e))?;
            }
            if pool.max_attempts == Some(0) {
                return Err(self.invalid(field("max_attempts"), "must be at least 1"));
            }
            if let Some(health) = &pool.health {
                if health.interval < MIN_HEALTH_INTERVAL || health.interval > Duration::from_secs(3600) {
                    return Err(self.invalid(field("health.interval"), "must be between 100ms and 1h"));
                }
                if health.timeout.is_zero() {
                    return Err(self.invalid(field("health.timeout"), "must be longer than zero"));
                }
                if health.rise == 0 || health.fall == 0 {
                    return Err(self.invalid(field("health"), "rise and fall must be at least 1"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/weir/weir.toml"))
    }

    const MINIMAL: &str = r#"
        [listeners.public]
        bind = "127.0.0.1:8443"
        plugins = ["router"]

        [plugins.router]
        wasm = "static_router.wasm"
        config = { routes = { "a.example" = { pool = "app" } } }

        [pools.app]
        servers = ["127.0.0.1:9000", "backend.internal:9000"]
    "#;

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let config = parse(MINIMAL).expect("valid");
        let listener = &config.listeners["public"];
        assert_eq!(listener.protocol, ListenerProtocol::Tls);
        assert_eq!(listener.sniff_timeout, Duration::from_secs(5));
        assert_eq!(listener.relay, RelayMode::Copy);
        let plugin = &config.plugins["router"];
        assert_eq!(plugin.on_error, OnError::Deny);
        assert_eq!(plugin.timeout, Duration::from_millis(10));
        assert_eq!(plugin.configure_timeout, Duration::from_secs(1));
        assert_eq!(plugin.max_memory_mib, 16);
        assert_eq!(
            plugin.config_string().expect("inline"),
            r#"{"routes":{"a.example":{"pool":"app"}}}"#
        );
        assert_eq!(config.resolve(&plugin.wasm), Path::new("/etc/weir/static_router.wasm"));
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_reason() {
        let cases = [
            (
                MINIMAL.replace("plugins = [\"router\"]", "plugins = [\"ruoter\"]"),
                "listeners.public.plugins: no plugin named `ruoter`",
            ),
            (MINIMAL.replace("bind =", "bnid ="), "unknown field `bnid`"),
            (
                MINIMAL.replace("\"127.0.0.1:9000\"", "\"127.0.0.1\""),
                "pools.app.servers",
            ),
            (MINIMAL.replace("[\"router\"]", "[]"), "the plugin chain is empty"),
            (
                MINIMAL.replace("wasm =", "timeout = \"0ms\"\nwasm ="),
                "plugins.router.timeout",
            ),
            (
                format!(
                    "{MINIMAL}\n[certificates.site]\ncert = \"s.pem\"\nkey = \"s.key\"\nacme = {{ directory = \"https://ca.example/dir\", domains = [\"*.example.com\"] }}\n"
                ),
                "certificates.site.acme.domains: `*.example.com`: a wildcard needs the DNS-01 challenge",
            ),
            (
                format!(
                    "{MINIMAL}\n[certificates.site]\ncert = \"s.pem\"\nkey = \"s.key\"\nacme = {{ directory = \"http://ca.example/dir\", domains = [\"a.example.com\"] }}\n"
                ),
                "certificates.site.acme.directory: must be an https:// URL",
            ),
            (
                MINIMAL.replace("bind =", "max_connections_per_client = 0\nbind ="),
                "listeners.public.max_connections_per_client: must be at least 1",
            ),
            (
                MINIMAL.replace("wasm =", "configure_timeout = \"2m\"\nwasm ="),
                "plugins.router.configure_timeout: must be between 1ms and 60s",
            ),
            (
                MINIMAL.replace("wasm =", "on_error = \"ignore\"\nwasm ="),
                "unknown variant `ignore`",
            ),
            (MINIMAL.replace("wasm =", "config = 3\nwasm ="), "duplicate key"),
        ];
        for (text, expected) in cases {
            let err = parse(&text).expect_err(expected).to_string();
            assert!(err.starts_with("/etc/weir/weir.toml: "), "{err}");
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
    }

    #[test]
    fn a_string_config_is_passed_verbatim() {
        let text = MINIMAL.replace(
            r#"config = { routes = { "a.example" = { pool = "app" } } }"#,
            r#"config = "tcp:\n  routers: {}""#,
        );
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.plugins["router"].config_string().expect("inline"),
            "tcp:\n  routers: {}"
        );
    }
}
