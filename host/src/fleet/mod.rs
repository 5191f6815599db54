//! Fleet mode: many weir nodes, one configuration, kept in etcd (v3 API).
//!
//! What lives under the fleet's prefix (default `/weir/`):
//!
//! - `config`: the published configuration, one JSON value ([`Published`]):
//!   the TOML text as its author wrote it (the schema `weir check` reads),
//!   and the SHA-256 of every file it names, by the field that names it
//!   (`plugins.router.wasm`, `certificates.site.key`, …).
//! - `blobs/<sha256>/meta` and `blobs/<sha256>/<n>`: those files' bytes, in
//!   chunks of [`CHUNK`] (etcd refuses requests over 1.5 MiB); a publish
//!   writes them before the config that names them, and a node uses a blob
//!   only if its bytes hash to its name.
//! - `pools/<name>`: pools set through any node's admin API, laid over the
//!   config's own (`null` removes a pool the config has).
//! - `nodes/<node>`: each node's report ([`node::Report`]), under a lease, so
//!   a node that dies disappears.
//!
//! A node reads the config and the pools in one transaction (one revision),
//! builds the files it names into a private state directory, and applies
//! the whole through the gateway's one rebuild-and-swap; a revision that
//! does not build is reported and the last good one keeps serving. The last
//! good revision is kept on disk too, so a node restarted while etcd is away
//! serves it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{AdminConfig, CacheConfig, ConfigError, PoolConfig};

pub mod node;
pub mod publish;
mod store;

pub use node::{Node, Report};

/// Bytes per blob chunk: one etcd value each, under its 1.5 MiB request limit.
pub const CHUNK: usize = 1 << 20;

/// Largest file a publish may carry (the Python example plugin is 18 MB).
pub const MAX_BLOB_BYTES: u64 = 256 << 20;

/// Largest published config text.
pub const MAX_CONFIG_BYTES: usize = 4 << 20;

/// The version of the [`Published`] format.
pub const FORMAT: u32 = 1;

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// etcd could not be reached, or refused the request.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A value in etcd is not what weir writes there.
    #[error("etcd key {key}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// The `[fleet]` settings are wrong.
    #[error("{path}: {field}: {reason}")]
    Settings {
        /// The node file.
        path: PathBuf,
        /// The offending field, e.g. `fleet.prefix`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        reason: String,
    },
    /// The configuration does not check.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl From<etcd_client::Error> for FleetError {
    fn from(error: etcd_client::Error) -> FleetError {
        FleetError::Etcd(error.to_string())
    }
}

/// How to reach the fleet's etcd: `[fleet]` in a node's file, or the
/// `--etcd` flags of `weir publish` and `weir fleet status`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSettings {
    /// etcd client URLs (`http://host:2379`, or `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// The key prefix the fleet lives under.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This node's name; default the host name.
    pub node: Option<String>,
    /// Where the node keeps the files of the revision it serves and the last
    /// good revision; default `$XDG_STATE_HOME/weir/<node>` (or
    /// `~/.local/state/weir/<node>`). Private to weir's user.
    pub state_dir: Option<PathBuf>,
    /// etcd user (with `password_file`).
    pub user: Option<String>,
    /// File holding the etcd user's password; must not be readable by
    /// group or others.
    pub password_file: Option<PathBuf>,
    /// TLS to etcd.
    pub tls: Option<EtcdTls>,
    /// Lifetime of the node's report without keep-alives.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// This node's own address for a listener of the published config, by
    /// listener name (nodes sharing a host, or binding a host's own address).
    #[serde(default)]
    pub binds: BTreeMap<String, SocketAddr>,
}

/// TLS to etcd.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// PEM bundle of the CAs that sign etcd's certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM), with `key`.
    pub cert: Option<PathBuf>,
    /// Client private key (PEM); must not be readable by group or others.
    pub key: Option<PathBuf>,
    /// The name etcd's certificate must carry, when not the endpoint's host.
    pub server_name: Option<String>,
}

fn default_prefix() -> String {
    "/weir/".into()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// A node's own file: `[fleet]`, and the sections that belong to the node
/// rather than to the fleet (replacing the published config's when given).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// How to reach the fleet.
    pub fleet: FleetSettings,
    /// This node's admin server.
    pub admin: Option<AdminConfig>,
    /// This node's compiled-code cache.
    pub cache: Option<CacheConfig>,
    /// Where the file was read from.
    #[serde(skip)]
    pub path: PathBuf,
}

impl NodeFile {
    /// Whether the file at `path` is a node's file (it has `[fleet]`).
    pub fn is_node_file(path: &Path) -> bool {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .is_some_and(|table| table.contains_key("fleet"))
    }

    /// Reads and checks a node's file; relative paths in it are resolved
    /// against its directory.
    pub fn load(path: &Path) -> Result<NodeFile, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|e| FleetError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut file: NodeFile = toml::from_str(&text).map_err(|e| FleetError::Settings {
            path: path.to_owned(),
            field: "fleet".into(),
            reason: e.to_string(),
        })?;
        file.path = path.to_owned();
        // Absolute, so what the node builds from these paths does not
        // depend on its working directory.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let dir = absolute.parent().unwrap_or(Path::new("/"));
        file.fleet.resolve(dir);
        file.fleet.check(path)?;
        Ok(file)
    }

    /// The node's name: `fleet.node`, else the host name.
    pub fn node_name(&self) -> String {
        self.fleet.node.clone().unwrap_or_else(host_name)
    }
}

/// The host name, as the kernel has it.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| valid_node_name(name))
        .unwrap_or_else(|| "weir".into())
}

/// A node name: 1 to 64 letters, digits, `.`, `-`, `_`.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl FleetSettings {
    /// Settings from flags: endpoints and a prefix, nothing else.
    pub fn from_endpoints(endpoints: Vec<String>, prefix: String) -> FleetSettings {
        FleetSettings {
            endpoints,
            prefix,
            node: None,
            state_dir: None,
            user: None,
            password_file: None,
            tls: None,
            lease_ttl: default_lease_ttl(),
            binds: BTreeMap::new(),
        }
    }

    fn resolve(&mut self, dir: &Path) {
        let join = |p: &mut Option<PathBuf>| {
            if let Some(path) = p
                && path.is_relative()
            {
                *path = dir.join(&*path);
            }
        };
        join(&mut self.state_dir);
        join(&mut self.password_file);
        if let Some(tls) = &mut self.tls {
            join(&mut tls.ca);
            join(&mut tls.cert);
            join(&mut tls.key);
        }
    }

    /// Checks the settings (`path` names the file in messages).
    pub fn check(&self, path: &Path) -> Result<(), FleetError> {
        let invalid = |field: &str, reason: String| FleetError::Settings {
            path: path.to_owned(),
            field: format!("fleet.{field}"),
            reason,
        };
        if self.endpoints.is_empty() {
            return Err(invalid("endpoints", "at least one etcd endpoint is needed".into()));
        }
        for endpoint in &self.endpoints {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) || endpoint.len() > 256 {
                return Err(invalid(
                    "endpoints",
                    format!("`{}` is not an http:// or https:// URL", endpoint.escape_debug()),
                ));
            }
        }
        if !valid_prefix(&self.prefix) {
            return Err(invalid(
                "prefix",
                format!(
                    "`{}` must start and end with `/` (at most 128 printable ASCII characters)",
                    self.prefix.escape_debug()
                ),
            ));
        }
        if let Some(node) = &self.node
            && !valid_node_name(node)
        {
            return Err(invalid(
                "node",
                format!(
                    "`{}` must be 1 to 64 letters, digits, `.`, `-`, `_`",
                    node.escape_debug()
                ),
            ));
        }
        if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&self.lease_ttl) {
            return Err(invalid("lease_ttl", "must be between 2 s and 300 s".into()));
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err(invalid("user", "`user` and `password_file` go together".into()));
        }
        for secret in [
            self.password_file.as_ref(),
            self.tls.as_ref().and_then(|t| t.key.as_ref()),
        ]
        .into_iter()
        .flatten()
        {
            store::check_secret(secret)?;
        }
        Ok(())
    }

    /// The key layout under the prefix.
    pub fn keys(&self) -> Keys {
        Keys {
            prefix: self.prefix.clone(),
        }
    }
}

fn valid_prefix(prefix: &str) -> bool {
    prefix.len() <= 128
        && prefix.starts_with('/')
        && prefix.ends_with('/')
        && prefix.bytes().all(|b| b.is_ascii_graphic())
}

/// Opens a client to the fleet's etcd. The connection itself is made on
/// first use: an unreachable etcd shows in the first request.
pub async fn connect(settings: &FleetSettings) -> Result<etcd_client::Client, FleetError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| FleetError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    };
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(3), Duration::from_secs(3));
    if let (Some(user), Some(file)) = (&settings.user, &settings.password_file) {
        let password = String::from_utf8_lossy(&read(file)?).trim().to_owned();
        options = options.with_user(user.clone(), password);
    }
    if let Some(tls) = &settings.tls {
        let mut config = etcd_client::TlsOptions::new();
        if let Some(ca) = &tls.ca {
            config = config.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            config = config.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &tls.server_name {
            config = config.domain_name(name.clone());
        }
        options = options.with_tls(config);
    }
    Ok(etcd_client::Client::connect(&settings.endpoints, Some(options)).await?)
}

/// Where each thing lives under the prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The published config.
    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }

    /// All pools set through the admin API.
    pub fn pools(&self) -> String {
        format!("{}pools/", self.prefix)
    }

    /// One pool.
    pub fn pool(&self, name: &str) -> String {
        format!("{}pools/{name}", self.prefix)
    }

    /// A blob's size and chunk count.
    pub fn blob_meta(&self, sha256: &str) -> String {
        format!("{}blobs/{sha256}/meta", self.prefix)
    }

    /// One chunk of a blob.
    pub fn blob_chunk(&self, sha256: &str, n: usize) -> String {
        format!("{}blobs/{sha256}/{n:05}", self.prefix)
    }

    /// All node reports.
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    /// One node's report.
    pub fn node(&self, name: &str) -> String {
        format!("{}nodes/{name}", self.prefix)
    }
}

/// The published configuration, as stored at `<prefix>config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Published {
    /// [`FORMAT`].
    pub format: u32,
    /// The config text as written.
    pub toml: String,
    /// SHA-256 (hex) of each file the config names, by field.
    pub files: BTreeMap<String, String>,
    /// When it was published (seconds since the Unix epoch).
    pub published_at: u64,
    /// Where it was published from (the file, as the publisher named it).
    pub source: String,
}

/// A blob's description, at `<prefix>blobs/<sha256>/meta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobMeta {
    /// Its length in bytes.
    pub size: u64,
    /// How many chunks hold it.
    pub chunks: usize,
}

/// Everything a node applies, read at one etcd revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The etcd revision it was read at.
    pub revision: i64,
    /// The revision that last changed the published config.
    pub config_revision: i64,
    /// The published config.
    pub published: Published,
    /// Pools set through the admin API (`None`: removed).
    pub pools: BTreeMap<String, Option<PoolConfig>>,
    /// The revision that last changed each of those pools.
    pub pool_revisions: BTreeMap<String, i64>,
}

impl State {
    /// Whether `other` holds the same config and pools (whatever revision it
    /// was read at).
    pub fn same_content(&self, other: &State) -> bool {
        self.config_revision == other.config_revision && self.pool_revisions == other.pool_revisions
    }
}

/// A value as UTF-8 JSON of type `T`, or an error naming its key.
fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, FleetError> {
    serde_json::from_slice(value).map_err(|e| FleetError::BadValue {
        key: key.to_owned(),
        reason: format!("not what weir writes there: {e}"),
    })
}

/// Reads the published config and the admin API's pools in one
/// transaction, so both come from one revision.
pub async fn fetch_state(client: &mut etcd_client::Client, keys: &Keys) -> Result<State, FleetError> {
    use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
    let txn = Txn::new().and_then(vec![
        TxnOp::get(keys.config(), None),
        TxnOp::get(keys.pools(), Some(GetOptions::new().with_prefix())),
    ]);
    let response = client.txn(txn).await?;
    let revision = response.header().map_or(0, |h| h.revision());
    let mut gets = response.op_responses().into_iter().filter_map(|r| match r {
        TxnOpResponse::Get(get) => Some(get),
        _ => None,
    });
    let (Some(config), Some(pools)) = (gets.next(), gets.next()) else {
        return Err(FleetError::Etcd("a transaction answered without its reads".into()));
    };
    let config_key = keys.config();
    let Some(kv) = config.kvs().first() else {
        return Err(FleetError::BadValue {
            key: config_key,
            reason: "nothing has been published under this prefix (run `weir publish`)".into(),
        });
    };
    if kv.value().len() > MAX_CONFIG_BYTES * 2 {
        return Err(FleetError::BadValue {
            key: config_key,
            reason: format!("{} bytes, more than a config may have", kv.value().len()),
        });
    }
    let published: Published = decode(&config_key, kv.value())?;
    if published.format != FORMAT {
        return Err(FleetError::BadValue {
            key: config_key,
            reason: format!("format {} (this weir reads format {FORMAT})", published.format),
        });
    }
    let mut state = State {
        revision,
        config_revision: kv.mod_revision(),
        published,
        pools: BTreeMap::new(),
        pool_revisions: BTreeMap::new(),
    };
    let pools_prefix = keys.pools();
    for kv in pools.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let name = key.strip_prefix(&pools_prefix).unwrap_or(&key).to_owned();
        crate::config::check_pool_name(&name).map_err(|reason| FleetError::BadValue {
            key: key.clone(),
            reason,
        })?;
        let pool: Option<PoolConfig> = decode(&key, kv.value())?;
        state.pool_revisions.insert(name.clone(), kv.mod_revision());
        state.pools.insert(name, pool);
    }
    Ok(state)
}

/// Reads a blob and checks that its bytes hash to its name.
pub async fn fetch_blob(client: &mut etcd_client::Client, keys: &Keys, sha256: &str) -> Result<Vec<u8>, FleetError> {
    let meta_key = keys.blob_meta(sha256);
    let meta = client.get(meta_key.clone(), None).await?;
    let Some(kv) = meta.kvs().first() else {
        return Err(FleetError::BadValue {
            key: meta_key,
            reason: "missing: the config names a file that was not uploaded".into(),
        });
    };
    let meta: BlobMeta = decode(&meta_key, kv.value())?;
    if meta.size > MAX_BLOB_BYTES || meta.chunks != usize::try_from(meta.size.div_ceil(CHUNK as u64)).unwrap_or(0) {
        return Err(FleetError::BadValue {
            key: meta_key,
            reason: format!(
                "{} bytes in {} chunks is not a blob weir writes",
                meta.size, meta.chunks
            ),
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.size).unwrap_or(0));
    for n in 0..meta.chunks {
        let key = keys.blob_chunk(sha256, n);
        let chunk = client.get(key.clone(), None).await?;
        let Some(kv) = chunk.kvs().first() else {
            return Err(FleetError::BadValue {
                key,
                reason: "missing chunk".into(),
            });
        };
        if kv.value().len() > CHUNK {
            return Err(FleetError::BadValue {
                key,
                reason: "a chunk larger than weir writes".into(),
            });
        }
        bytes.extend_from_slice(kv.value());
    }
    let actual = weir_plugin_sdk::hex::encode(&crate::plugin::cache::sha256(&[&bytes]));
    if bytes.len() as u64 != meta.size || actual != sha256 {
        return Err(FleetError::BadValue {
            key: keys.blob_meta(sha256),
            reason: format!(
                "its {} bytes hash to {actual}, not to the name they are stored under",
                bytes.len()
            ),
        });
    }
    Ok(bytes)
}

/// Whether `text` is a SHA-256 in lower-case hex.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
